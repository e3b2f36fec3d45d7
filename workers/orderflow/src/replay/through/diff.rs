//! `--diff`: the replay's events compared by `eventId` with what the live worker emitted ([`diff`],
//! [`Causes`], [`field_diffs`]).

use std::collections::{BTreeSet, HashMap, HashSet};

use orderflow_api::{derive_event_id, Event};
use serde::Serialize;
use serde_json::{json, Value};

use crate::text::hex;

use super::{Cause, Emitted};

// ------------------------------------------------------------------------------------------
// Diff.

/// An event read back from an output topic.
#[derive(Debug, Clone)]
pub struct Actual {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// Record timestamp, ms.
    pub timestamp_ms: Option<i64>,
    pub key: Option<String>,
    pub event: Event,
    /// The record value as read (empty when unknown).
    pub payload: Vec<u8>,
}

/// One field that differs between the replay's event and the live one: `path` in the event's
/// JSON (`expiresAt`, `items[0].reserved`, or `topic` / `key` for the record itself).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FieldDiff {
    pub path: String,
    pub replay: Value,
    pub actual: Value,
}

/// The paths where `replay` and `actual` differ (objects by key, arrays of equal length by
/// index, anything else as a whole).
pub fn field_diffs(replay: &Value, actual: &Value) -> Vec<FieldDiff> {
    fn walk(path: &str, a: &Value, b: &Value, out: &mut Vec<FieldDiff>) {
        match (a, b) {
            (Value::Object(x), Value::Object(y)) => {
                let keys: BTreeSet<&String> = x.keys().chain(y.keys()).collect();
                for k in keys {
                    let p = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                    walk(&p, x.get(k).unwrap_or(&Value::Null), y.get(k).unwrap_or(&Value::Null), out);
                }
            }
            (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
                for (i, (u, v)) in x.iter().zip(y).enumerate() {
                    walk(&format!("{path}[{i}]"), u, v, out);
                }
            }
            _ if a != b => out.push(FieldDiff { path: path.to_string(), replay: a.clone(), actual: b.clone() }),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk("", replay, actual, &mut out);
    out
}

/// How one event compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// The replay emits it and the same event (topic, key, fields) was emitted live.
    Same,
    /// Same `eventId` emitted live with a different topic, key or fields.
    Changed,
    /// The replay emits it; nothing with its `eventId` was emitted live.
    Missing,
    /// Emitted live for one of the replayed inputs, not by the replay.
    Extra,
    /// Emitted live one hop later, by the worker processing a record it wrote to its own input
    /// (the stock hierarchy's loop on `stock.commands`, issue 16) on a partition the replay did
    /// not cover: not compared, counted apart.
    Beyond,
}

/// Where a live event was read.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct At {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// One line of the `--diff` report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DiffEntry {
    pub status: Status,
    pub topic: String,
    pub key: String,
    pub event: String,
    #[serde(rename = "eventId")]
    pub event_id: String,
    /// What caused the replay's event (absent for `extra`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cause: Option<Cause>,
    /// Where the live event is (absent for `missing`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actual_at: Option<At>,
    /// Both values, for `changed`; the one there is, for `missing` / `extra`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replay: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actual: Option<Value>,
    /// The differing fields, for `changed`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<FieldDiff>,
}

/// Counts of a diff.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DiffCounts {
    pub same: u64,
    pub changed: u64,
    pub missing: u64,
    pub extra: u64,
    /// Live events of a later hop the replay did not follow ([`Status::Beyond`]).
    pub beyond: u64,
}

/// The ids a replayed input can cause live outputs under: its `eventId`, its `orderId` and its
/// `reservationId` (the workers derive output ids from these, see [`Causes::explains`]).
#[derive(Debug, Default)]
pub struct Causes {
    event_ids: HashSet<String>,
    all: Vec<String>,
    /// Tag → derived id → the cause it derives from.
    derived: HashMap<String, HashMap<String, String>>,
}

impl Causes {
    /// The causes of the replayed input events.
    pub fn of<'a>(inputs: impl IntoIterator<Item = &'a Event>) -> Causes {
        let mut c = Causes::default();
        let mut all = BTreeSet::new();
        for e in inputs {
            c.event_ids.insert(e.event_id().to_string());
            all.insert(e.event_id().to_string());
            if let Some(o) = e.order_id().filter(|o| !o.is_empty()) {
                all.insert(o.to_string());
            }
            let reservation = match e {
                Event::OrderCompleted(x) => Some(&x.reservation_id),
                Event::StockReserved(x) => Some(&x.reservation_id),
                Event::StockReservationExpired(x) => Some(&x.reservation_id),
                Event::StockReservationReleased(x) => Some(&x.reservation_id),
                _ => None,
            };
            if let Some(r) = reservation.filter(|r| !r.is_empty()) {
                all.insert(r.clone());
            }
        }
        c.all = all.into_iter().collect();
        c
    }

    /// Whether live event `a` was caused by a replayed input: its `eventId` is an input's (the
    /// deduplicator forwards events as they are), or `derive_event_id(cause, tag)` of a cause,
    /// the tag being the event's topic, its canonical topic name (`stock.reserved`, ...) or, for
    /// `stock.updated`, `<tag>/<productId>`: the tags the workers use.
    pub fn explains(&mut self, a: &Actual) -> bool {
        self.cause_of(a).is_some()
    }

    /// The cause [`Causes::explains`] attributes `a` to: an input's eventId, orderId or
    /// reservationId.
    pub fn cause_of(&mut self, a: &Actual) -> Option<String> {
        let id = a.event.event_id();
        if self.event_ids.contains(id) {
            return Some(id.to_string());
        }
        let canonical = match &a.event {
            Event::StockReserved(_) => "stock.reserved",
            Event::StockReservationFailed(_) => "stock.reservation.failed",
            Event::StockReservationReleased(_) => "stock.reservation.released",
            Event::StockReservationExpired(_) => "stock.reservation.expired",
            Event::StockUpdated(_) => "stock.updated",
            Event::OrderConfirmed(_) => "order.confirmed",
            Event::OrderCancelled(_) => "order.cancelled",
            Event::OrderCreated(_) => "order.created",
            Event::OrderCompleted(_) => "order.completed",
            Event::InventoryAdjusted(_) => "inventory.adjusted",
            Event::OrderSettled(_) => "order.settled",
            Event::StockAllocation(_) => "stock.allocation",
            Event::StockLedgerEntry(_) => "stock.ledger",
        };
        let mut tags = vec![canonical.to_string(), a.topic.clone()];
        if let Event::StockUpdated(u) = &a.event {
            tags = tags.iter().map(|t| format!("{t}/{}", u.product_id)).collect();
        }
        if matches!(&a.event, Event::OrderCancelled(c) if c.refund_required) {
            tags.push("order.cancelled/refund".to_string());
        }
        tags.dedup();
        for tag in tags {
            let all = &self.all;
            let map =
                self.derived.entry(tag.clone()).or_insert_with(|| all.iter().map(|c| (derive_event_id(c, &tag), c.clone())).collect());
            if let Some(cause) = map.get(id) {
                return Some(cause.clone());
            }
        }
        None
    }
}

/// Compares the replay's events with the live ones.
///
/// - `same`: an actual event with the same `eventId` has the same topic, key and fields, and,
///   when the replay's event carries its encoded `payload`, the same record value byte for byte;
/// - `changed`: the `eventId` was emitted live but (every copy of it) differs: both values and
///   the differing fields are reported (against the first copy; `payload` with both values in
///   hex when only the encoded bytes differ);
/// - `missing`: no actual event has the `eventId`;
/// - `extra`: an actual event `in_window` whose `eventId` the replay did not emit but that
///   [`Causes::explains`] attributes to a replayed input. Detectable: outputs derived from an
///   input's `eventId`, `orderId` or `reservationId` with the workers' tags. Not detectable: a
///   live output derived some other way; and an event derived from an `orderId` can be caused by
///   an input outside the range of the same order (then it shows as `extra` too).
///
/// Returns one entry per replayed event (in replay order) and per extra event, and the counts.
pub fn diff(
    emitted: &[Emitted],
    actual: &[Actual],
    causes: &mut Causes,
    in_window: impl Fn(&Actual) -> bool,
    beyond: &HashSet<String>,
) -> (Vec<DiffEntry>, DiffCounts) {
    let mut by_id: HashMap<&str, Vec<&Actual>> = HashMap::new();
    for a in actual {
        by_id.entry(a.event.event_id()).or_default().push(a);
    }
    let mut entries = Vec::new();
    let mut counts = DiffCounts::default();
    let mut seen: HashSet<&str> = HashSet::new();
    for e in emitted {
        seen.insert(e.event_id.as_str());
        let entry = |status, a: Option<&Actual>, fields: Vec<FieldDiff>| DiffEntry {
            status,
            topic: e.topic.clone(),
            key: e.key.clone(),
            event: e.event.clone(),
            event_id: e.event_id.clone(),
            cause: Some(e.cause.clone()),
            actual_at: a.map(|a| At { topic: a.topic.clone(), partition: a.partition, offset: a.offset }),
            replay: (status != Status::Same).then(|| e.value.clone()),
            actual: a.filter(|_| status == Status::Changed).map(|a| a.event.to_json()),
            fields,
        };
        let Some(copies) = by_id.get(e.event_id.as_str()) else {
            counts.missing += 1;
            entries.push(entry(Status::Missing, None, Vec::new()));
            continue;
        };
        let compare = |a: &Actual| {
            let mut f = Vec::new();
            if a.topic != e.topic {
                f.push(FieldDiff { path: "topic".into(), replay: json!(e.topic), actual: json!(a.topic) });
            }
            if a.key.as_deref() != Some(e.key.as_str()) {
                f.push(FieldDiff { path: "key".into(), replay: json!(e.key), actual: json!(a.key) });
            }
            if a.event.schema_name() != e.event {
                f.push(FieldDiff { path: "event".into(), replay: json!(e.event), actual: json!(a.event.schema_name()) });
            }
            f.extend(field_diffs(&e.value, &a.event.to_json()));
            if let Some(p) = e.payload.as_ref().filter(|p| f.is_empty() && **p != a.payload) {
                f.push(FieldDiff { path: "payload".into(), replay: json!(hex(p)), actual: json!(hex(&a.payload)) });
            }
            f
        };
        if let Some(a) = copies.iter().find(|a| compare(a).is_empty()) {
            counts.same += 1;
            entries.push(entry(Status::Same, Some(a), Vec::new()));
        } else {
            counts.changed += 1;
            entries.push(entry(Status::Changed, Some(copies[0]), compare(copies[0])));
        }
    }
    let mut extra_ids: HashSet<&str> = HashSet::new();
    for a in actual {
        let id = a.event.event_id();
        if seen.contains(id) || extra_ids.contains(id) || !in_window(a) {
            continue;
        }
        let Some(cause) = causes.cause_of(a) else { continue };
        extra_ids.insert(id);
        let status = if beyond.contains(&cause) {
            counts.beyond += 1;
            Status::Beyond
        } else {
            counts.extra += 1;
            Status::Extra
        };
        entries.push(DiffEntry {
            status,
            topic: a.topic.clone(),
            key: a.key.clone().unwrap_or_default(),
            event: a.event.schema_name().to_string(),
            event_id: id.to_string(),
            cause: None,
            actual_at: Some(At { topic: a.topic.clone(), partition: a.partition, offset: a.offset }),
            replay: None,
            actual: Some(a.event.to_json()),
            fields: Vec::new(),
        });
    }
    (entries, counts)
}
