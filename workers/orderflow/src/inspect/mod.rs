//! `orderflow tap` and `orderflow trace`: look at the saga's topics without disturbing it.
//!
//! * `orderflow tap TOPIC` prints the records of one topic as JSON lines, values decoded with the
//!   topology's [`Codec`] (see [`tap_json`] for the shape), filtered by key (`--key`) and by
//!   fields of the decoded value (`--where a.b=v`, see [`Where`]); it stops at the high
//!   watermark seen at start, or follows the topic until Ctrl-C (`--follow`).
//! * `orderflow trace ORDER_ID` collects every event of one order across the saga's topics and
//!   prints its timeline with the order's state after each event (see [`OrderState`]). It reads
//!   only the partitions the order's records can be on (see [`crate::kafkaio::partition_for`] and [`trace`]).
//!
//! Both read by assigning partitions to a consumer with a throwaway `group.id`, as `orderflow
//! dlq` does: they join no consumer group and commit nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::path::PathBuf;

use anyhow::{bail, Context as _, Result};
use clap::Args;
use orderflow_api::events::store_key;
use orderflow_api::Event;
use orderflow_runtime::codec::{Codec, CodecError};
use orderflow_runtime::topology::{BrokerConfig, Topology};
use rdkafka::message::{Headers, Message};
use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::dlq::{Coordinates, DeadLetter};
use crate::format::{cut, hex, print_table, text_or_hex};
use crate::kafkaio::{blocking, partition_for, rfc3339, Reader, Span};

/// Bytes of an undecodable value `tap` prints in hex.
const HEX_BYTES: usize = 256;
/// Characters of a timeline step's detail in the text output.
const DETAIL_WIDTH: usize = 90;

// ------------------------------------------------------------------------------------------
// Records and reading.

/// One record as read from the broker.
#[derive(Debug, Clone, PartialEq)]
pub struct Raw {
    pub at: Coordinates,
    /// The record's timestamp (producer create time, or broker append time), ms since the epoch.
    pub timestamp_ms: Option<i64>,
    pub key: Option<Vec<u8>>,
    /// Every header in record order (a null value is `None`).
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    pub value: Option<Vec<u8>>,
}

impl Raw {
    fn from_message<M: Message>(m: &M) -> Raw {
        Raw {
            at: Coordinates { topic: m.topic().to_string(), partition: m.partition(), offset: m.offset() },
            timestamp_ms: m.timestamp().to_millis(),
            key: m.key().map(<[u8]>::to_vec),
            headers: m
                .headers()
                .map(|hs| hs.iter().map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec))).collect())
                .unwrap_or_default(),
            value: m.payload().map(<[u8]>::to_vec),
        }
    }

    /// The record as a dead-letter record (its `orderflow.dlq.*` headers read by [`DeadLetter`]).
    fn into_dead_letter(self) -> DeadLetter {
        DeadLetter { at: self.at, key: self.key, value_len: self.value.as_ref().map(Vec::len), value: self.value, headers: self.headers }
    }
}

/// A reader for `inspect` (the shared [`Reader`] with its own `group.id` prefix).
fn scanner(broker: &BrokerConfig) -> Result<Reader> {
    Reader::new(broker, "orderflow-inspect", "creating the reader")
}

/// Every record of bounded `spans`, sorted by coordinates.
///
/// Errors: those of [`Reader::scan`].
fn read_all(reader: &Reader, spans: &[Span]) -> Result<Vec<Raw>> {
    let mut out = reader.collect(spans, |m| Raw::from_message(m))?;
    out.sort_by(|a, b| a.at.cmp(&b.at));
    Ok(out)
}

/// Checks that `topic` can be read: on the broker, with its partition count.
///
/// Errors: the topic is declared in the topology but not created yet (run `orderflow topics`),
/// or it is neither on the broker nor in the topology (naming the topology's topics).
pub fn find_topic(topic: &str, topology: &Topology, on_broker: &BTreeMap<String, i32>) -> Result<i32> {
    if let Some(&n) = on_broker.get(topic) {
        return Ok(n);
    }
    if topology.topics.contains_key(topic) || topology.dead_letter_topics().contains_key(topic) {
        bail!("topic {topic} is declared in the topology but does not exist on the broker yet (create it with `orderflow topics`)");
    }
    bail!(
        "unknown topic {topic}: not on the broker and not a topic of the topology ({})",
        topology.topics.keys().cloned().collect::<Vec<_>>().join(", ")
    )
}

// ------------------------------------------------------------------------------------------
// Formatting helpers.

/// The decode error of a record: `{"class", "message"}`; a record without a value is
/// `truncated` (as the workers classify it).
fn error_json(e: Option<&CodecError>) -> Value {
    match e {
        Some(e) => json!({"class": e.class(), "message": e.to_string()}),
        None => json!({"class": "truncated", "message": "the record has no value (null / tombstone)"}),
    }
}

/// Decodes a record's value: `Ok(None)` for a record without a value is reported as an error.
async fn decode(codec: &Codec, r: &Raw) -> Result<Event, Option<CodecError>> {
    match &r.value {
        Some(v) => codec.decode(v).await.map_err(Some),
        None => Err(None),
    }
}

/// The `tap` line of record `r` with its decoded value (`Err(None)`: the record has no value):
///
/// `{"topic", "partition", "offset", "timestamp" (ms since the epoch, null when the record has
/// none), "time" (the same as RFC 3339 UTC), "key" (UTF-8 text, or `0x…` hex, or null),
/// "headers": {name: text | 0x-hex | null} (the last occurrence of a repeated name wins),
/// "event": schema name, "value": the event as JSON (Avro field names)}`.
///
/// When the value does not decode, `"value"` is replaced by `"error": {"class", "message"}`
/// (the dead-letter class of the codec error and its text) and `"value_hex"` (the first 256
/// bytes in hex) plus `"value_bytes"` (the length); `"event"` is then the schema the
/// single-object fingerprint names, or null.
pub fn tap_json(r: &Raw, decoded: &Result<Event, Option<CodecError>>, codec: &Codec) -> Value {
    let headers: Map<String, Value> =
        r.headers.iter().map(|(k, v)| (k.clone(), v.as_deref().map_or(Value::Null, |v| Value::String(text_or_hex(v))))).collect();
    let mut out = json!({
        "topic": r.at.topic,
        "partition": r.at.partition,
        "offset": r.at.offset,
        "timestamp": r.timestamp_ms,
        "time": r.timestamp_ms.map(rfc3339),
        "key": r.key.as_deref().map(text_or_hex),
        "headers": headers,
    });
    match decoded {
        Ok(e) => {
            out["event"] = json!(e.schema_name());
            out["value"] = e.to_json();
        }
        Err(err) => {
            let v = r.value.as_deref().unwrap_or_default();
            out["event"] = json!(codec.schema_name_of(v));
            out["error"] = error_json(err.as_ref());
            out["value_hex"] = json!(hex(&v[..v.len().min(HEX_BYTES)]));
            out["value_bytes"] = json!(r.value.as_ref().map(Vec::len));
        }
    }
    out
}

// ------------------------------------------------------------------------------------------
// --where.

/// One `--where PATH=VALUE` condition on the decoded value.
///
/// `PATH` is a dotted field path in Avro field names (`orderId`, `storeStock.current`); a
/// segment that is a number indexes an array (`items.0.productId`), and a segment met on an
/// array otherwise matches when any element matches (`items.productId=P-1`). The field matches
/// when it is a JSON scalar whose text equals `VALUE`: a string as is, a number or boolean as
/// written in JSON (`3`, `true`), null as `null`. Objects and arrays never match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Where {
    pub path: Vec<String>,
    pub value: String,
}

impl std::str::FromStr for Where {
    type Err = String;

    /// Parses `a.b=v` (split at the first `=`; the value may be empty or hold `=`).
    fn from_str(s: &str) -> Result<Where, String> {
        let (path, value) = s.split_once('=').ok_or_else(|| format!("`{s}` is not FIELD=VALUE (e.g. orderId=O-1, items.productId=P-1)"))?;
        let path: Vec<String> = path.split('.').map(str::to_string).collect();
        if path.iter().any(String::is_empty) {
            return Err(format!("`{s}`: empty field name in the dotted path"));
        }
        Ok(Where { path, value: value.to_string() })
    }
}

impl Where {
    /// Whether the decoded value `v` has the field with the value.
    pub fn matches(&self, v: &Value) -> bool {
        fn at(v: &Value, path: &[String], want: &str) -> bool {
            let Some((first, rest)) = path.split_first() else {
                return match v {
                    Value::String(s) => s == want,
                    Value::Number(n) => n.to_string() == want,
                    Value::Bool(b) => b.to_string() == want,
                    Value::Null => want == "null",
                    Value::Array(_) | Value::Object(_) => false,
                };
            };
            match v {
                Value::Object(m) => m.get(first).is_some_and(|x| at(x, rest, want)),
                Value::Array(a) => match first.parse::<usize>() {
                    Ok(i) => a.get(i).is_some_and(|x| at(x, rest, want)),
                    Err(_) => a.iter().any(|x| at(x, path, want)),
                },
                _ => false,
            }
        }
        at(v, &self.path, &self.value)
    }
}

// ------------------------------------------------------------------------------------------
// tap.

/// `orderflow tap` flags.
#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("start").args(["from_beginning", "from_offset", "last"])))]
pub struct TapArgs {
    /// The topic to read (any topic on the broker: saga topics, dead-letter topics, ...).
    pub topic: String,
    /// Topology file: the broker and the Avro schemas.
    #[arg(long, default_value = "topology.toml", env = "ORDERFLOW_TOPOLOGY")]
    pub topology: PathBuf,
    /// Bootstrap servers (overrides the topology and ORDERFLOW_BOOTSTRAP).
    #[arg(long)]
    pub bootstrap: Option<String>,
    /// Only this partition (repeatable); every partition when omitted.
    #[arg(long = "partition")]
    pub partitions: Vec<i32>,
    /// Start at each partition's first record (the default).
    #[arg(long)]
    pub from_beginning: bool,
    /// Start at this offset in each partition (at the low watermark if it is below it).
    #[arg(long, value_name = "N")]
    pub from_offset: Option<i64>,
    /// Start at each partition's last N records.
    #[arg(long, value_name = "N")]
    pub last: Option<i64>,
    /// Keep reading new records until Ctrl-C / SIGTERM.
    #[arg(long, conflicts_with = "until_end")]
    pub follow: bool,
    /// Stop at the high watermarks seen at start (the default).
    #[arg(long)]
    pub until_end: bool,
    /// Only records with this key (compared as UTF-8 text).
    #[arg(long, value_name = "K")]
    pub key: Option<String>,
    /// Only records whose decoded value has FIELD (dotted path) = VALUE (repeatable, all must
    /// match); records that do not decode never match.
    #[arg(long = "where", value_name = "FIELD=VALUE")]
    pub conditions: Vec<Where>,
    /// Stop after printing N records.
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
}

/// Where a `tap` starts in a partition with watermarks `(low, high)`.
pub fn tap_start(a: &TapArgs, (low, high): (i64, i64)) -> i64 {
    match (a.from_offset, a.last) {
        (Some(n), _) => n.clamp(low, high.max(low)),
        (None, Some(n)) => (high - n.max(0)).max(low),
        (None, None) => low,
    }
}

/// Whether record `r` (decoded as `decoded`) passes `--key` and every `--where`.
fn tap_keeps(a: &TapArgs, r: &Raw, decoded: &Result<Event, Option<CodecError>>) -> bool {
    if let Some(k) = &a.key {
        if r.key.as_deref() != Some(k.as_bytes()) {
            return false;
        }
    }
    if a.conditions.is_empty() {
        return true;
    }
    match decoded {
        Ok(e) => {
            let v = e.to_json();
            a.conditions.iter().all(|w| w.matches(&v))
        }
        Err(_) => false,
    }
}

/// `orderflow tap TOPIC`: prints one [`tap_json`] line per record of `TOPIC` (its `--partition`s,
/// all by default) that passes `--key` and `--where`, from `--from-beginning` (default),
/// `--from-offset N` or `--last N`, up to the high watermarks seen at start (`--until-end`,
/// default) or on until Ctrl-C / SIGTERM (`--follow`), at most `--limit` records. Records of
/// one partition come in offset order; partitions are interleaved as they are fetched. A record
/// that does not decode is printed with its error and tap goes on. A summary goes to stderr.
///
/// Errors: topology; unknown topic ([`find_topic`]); a partition the topic does not have;
/// reading made no progress for 20 s while stopping at the end.
pub async fn tap(a: TapArgs) -> Result<()> {
    let loaded = crate::topology::load_topology(&a.topology, a.bootstrap.as_deref())?;
    let codec = Codec::load(&loaded.avro_dir(), loaded.topology.broker.registry_url.as_deref())?;
    let topology = loaded.topology.clone();
    let scanner = {
        let broker = topology.broker.clone();
        blocking(move || scanner(&broker)).await?
    };
    let scanner = std::sync::Arc::new(scanner);
    let (topic, chosen) = (a.topic.clone(), a.partitions.clone());
    let s = scanner.clone();
    let partitions: Vec<(i32, (i64, i64))> = blocking(move || {
        let n = find_topic(&topic, &topology, &s.broker_topics()?)?;
        let chosen: BTreeSet<i32> = if chosen.is_empty() { (0..n).collect() } else { chosen.into_iter().collect() };
        chosen
            .into_iter()
            .map(|p| {
                if !(0..n).contains(&p) {
                    bail!("{topic} has {n} partition(s) (0..={}); there is no partition {p}", n - 1);
                }
                Ok((p, s.watermarks(&topic, p)?))
            })
            .collect()
    })
    .await?;
    let spans: Vec<Span> = partitions
        .iter()
        .map(|&(p, wm)| Span {
            topic: a.topic.clone(),
            partition: p,
            start: tap_start(&a, wm),
            end: if a.follow { None } else { Some(wm.1) },
        })
        .collect();

    let (tx, mut rx) = tokio::sync::mpsc::channel::<Raw>(1024);
    let reader = tokio::task::spawn_blocking(move || {
        let alive = || !tx.is_closed();
        scanner.scan(&spans, alive, |m| tx.blocking_send(Raw::from_message(m)).is_ok())
    });
    let (mut read, mut printed, mut undecodable) = (0usize, 0usize, 0usize);
    let mut stdout = std::io::stdout().lock();
    let interrupted = {
        let print = async {
            while let Some(r) = rx.recv().await {
                read += 1;
                let decoded = decode(&codec, &r).await;
                undecodable += usize::from(decoded.is_err());
                if !tap_keeps(&a, &r, &decoded) {
                    continue;
                }
                let line = tap_json(&r, &decoded, &codec);
                if writeln!(stdout, "{line}").and_then(|()| stdout.flush()).is_err() {
                    return; // stdout closed (`| head`): stop quietly.
                }
                printed += 1;
                if a.limit.is_some_and(|l| printed >= l) {
                    return;
                }
            }
        };
        tokio::select! {
            _ = print => false,
            _ = crate::run::terminate_signal() => true,
        }
    };
    drop(rx);
    let scanned = reader.await.context("reader task panicked")?;
    eprintln!(
        "tap {}: {read} record(s) read, {printed} printed, {undecodable} undecodable{}",
        a.topic,
        if interrupted { " (interrupted)" } else { "" }
    );
    scanned
}

// ------------------------------------------------------------------------------------------
// The order's state.

/// The state of an order as the saga's events move it (domain: `ORDER_CREATED →
/// ORDER_CONFIRMED/PAYMENT_WAIT → ORDER_COMPLETED`, and `ORDER_CREATED | PAYMENT_WAIT →
/// ORDER_CANCELLED`). Displayed as `ORDER_CREATED`, `ORDER_CONFIRMED/<status>` (the confirmer's
/// status, `PAYMENT_WAIT`), `ORDER_COMPLETED`, `ORDER_CANCELLED(<reason>)`; `-` before any event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum OrderState {
    #[default]
    None,
    Created,
    Confirmed(String),
    Completed,
    Cancelled(String),
}

impl std::fmt::Display for OrderState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OrderState::None => write!(f, "-"),
            OrderState::Created => write!(f, "ORDER_CREATED"),
            OrderState::Confirmed(status) => write!(f, "ORDER_CONFIRMED/{status}"),
            OrderState::Completed => write!(f, "ORDER_COMPLETED"),
            OrderState::Cancelled(reason) => write!(f, "ORDER_CANCELLED({reason})"),
        }
    }
}

impl OrderState {
    /// `true` for `ORDER_COMPLETED` and `ORDER_CANCELLED`.
    pub fn is_terminal(&self) -> bool {
        matches!(self, OrderState::Completed | OrderState::Cancelled(_))
    }

    /// The state after `event`, and a note when the event does not move the state the way it
    /// normally would (a late event after a terminal state, which the saga ignores; a second
    /// confirmation or cancellation).
    ///
    /// `order.created`, a stock answer (`stock.reserved` / `stock.reservation.failed`) or any
    /// other event of the order opens it as `ORDER_CREATED` when nothing was seen before;
    /// `order.confirmed` moves an open order to `ORDER_CONFIRMED/<status>`; `order.completed` and
    /// `order.cancelled` close it unless it is closed already. Expiry, release and stock updates
    /// do not change the order's state (the cancellation that follows does).
    pub fn after(&self, event: &Event) -> (OrderState, Option<String>) {
        let same = |note: Option<String>| (self.clone(), note);
        let late = || Some(format!("late: the order is already {self}; ignored by the saga"));
        match event {
            Event::OrderConfirmed(e) => match self {
                OrderState::None | OrderState::Created => (OrderState::Confirmed(e.status.clone()), None),
                OrderState::Confirmed(_) => same(Some("confirmed again".into())),
                _ => same(late()),
            },
            Event::OrderCompleted(_) => match self {
                OrderState::Completed => same(Some("completed again".into())),
                OrderState::Cancelled(_) => same(late()),
                _ => (OrderState::Completed, None),
            },
            Event::OrderCancelled(e) => match self {
                OrderState::Cancelled(_) => same(Some("cancelled again".into())),
                OrderState::Completed => same(late()),
                _ => (OrderState::Cancelled(e.reason.clone()), None),
            },
            _ if *self == OrderState::None => (OrderState::Created, None),
            _ => same(None),
        }
    }
}

// ------------------------------------------------------------------------------------------
// trace.

/// `orderflow trace` flags.
#[derive(Args, Debug)]
pub struct TraceArgs {
    /// The order id (the key of the orderId-keyed topics).
    pub order_id: String,
    /// Topology file: the topics and what each is keyed by, the broker, the Avro schemas.
    #[arg(long, default_value = "topology.toml", env = "ORDERFLOW_TOPOLOGY")]
    pub topology: PathBuf,
    /// Bootstrap servers (overrides the topology and ORDERFLOW_BOOTSTRAP).
    #[arg(long)]
    pub bootstrap: Option<String>,
    /// Print the timeline as one JSON object (see `trace`'s documentation for its shape).
    #[arg(long)]
    pub json: bool,
}

/// One event of the order's timeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Step {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// The record's timestamp, ms since the epoch (the event's `occurredAt` if it has none).
    pub timestamp: i64,
    /// The same as RFC 3339 UTC.
    pub time: String,
    /// The event's `occurredAt`, ms since the epoch.
    pub occurred_at: i64,
    /// Avro record name (`OrderCreated`, ...).
    pub event: String,
    pub event_id: String,
    /// Short human-readable detail: reason, reservation id, items.
    pub detail: String,
    /// The order's state after this event ([`OrderState`] as text).
    pub state_after: String,
    /// A repartitioned copy (in `stock.commands`) of an event shown elsewhere in the timeline:
    /// that record's `topic[partition]@offset`. Copies do not move the state.
    pub copy_of: Option<String>,
    /// Why the event did not move the state as it normally would (late event, ...).
    pub note: Option<String>,
}

/// One partition the trace read, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Scanned {
    pub topic: String,
    pub partition: i32,
    /// What the topic is keyed by (`orderId`, `hqId:storeId`, `productId`, or `dead letters of
    /// <topics>`).
    pub keyed_by: String,
    /// The key whose partition this is.
    pub key: String,
    /// Records read in the partition.
    pub records: usize,
}

/// Sort rank of an event within one millisecond: the saga's causal order.
fn causal_rank(e: &Event) -> u8 {
    match e {
        Event::InventoryAdjusted(_) => 0,
        Event::OrderCreated(_) => 1,
        Event::StockReserved(_) | Event::StockReservationFailed(_) => 2,
        Event::OrderConfirmed(_) => 3,
        Event::OrderCompleted(_) | Event::StockReservationExpired(_) => 4,
        Event::StockReservationReleased(_) | Event::StockUpdated(_) => 5,
        Event::OrderCancelled(_) => 6,
    }
}

fn items<'a>(it: impl Iterator<Item = (&'a str, i64)>) -> String {
    it.map(|(p, q)| format!("{p}×{q}")).collect::<Vec<_>>().join(", ")
}

/// The short detail of an event in a timeline.
pub fn detail(e: &Event) -> String {
    match e {
        Event::OrderCreated(e) => format!(
            "store {}, customer {}, items {}",
            store_key(&e.hq_id, &e.store_id),
            e.customer_id,
            items(e.items.iter().map(|i| (i.product_id.as_str(), i64::from(i.quantity))))
        ),
        Event::StockReserved(e) => format!(
            "reservation {}, expires {}, items {}",
            e.reservation_id,
            rfc3339(e.expires_at),
            items(e.items.iter().map(|i| (i.product_id.as_str(), i64::from(i.reserved))))
        ),
        Event::StockReservationFailed(e) => format!(
            "reason {}: {}",
            e.reason,
            e.items
                .iter()
                .map(|i| format!("{} requested {}, available {}", i.product_id, i.requested, i.available))
                .collect::<Vec<_>>()
                .join("; ")
        ),
        Event::OrderConfirmed(e) => format!("reservation {}, status {}, expires {}", e.reservation_id, e.status, rfc3339(e.expires_at)),
        Event::OrderCancelled(e) => {
            format!("reason {}, reservation {}: {}", e.reason, e.reservation_id.as_deref().unwrap_or("-"), e.customer_message)
        }
        Event::OrderCompleted(e) => format!(
            "reservation {}, items {}, total {}",
            e.reservation_id,
            items(e.items.iter().map(|i| (i.product_id.as_str(), i64::from(i.quantity)))),
            e.total_amount
        ),
        Event::StockUpdated(e) => format!(
            "{} {} {:+}, store {} → {}",
            e.change_reason, e.product_id, e.change_amount, e.store_stock.previous, e.store_stock.current
        ),
        Event::StockReservationExpired(e) => format!("reservation {}, expired at {}", e.reservation_id, rfc3339(e.expires_at)),
        Event::StockReservationReleased(e) => format!(
            "reason {}, reservation {}, items {}",
            e.reason,
            e.reservation_id,
            items(e.items.iter().map(|i| (i.product_id.as_str(), i64::from(i.released))))
        ),
        Event::InventoryAdjusted(e) => {
            format!("{} {}, items {}", e.adjustment_type, e.reference_id, items(e.items.iter().map(|i| (i.product_id.as_str(), i.delta))))
        }
    }
}

/// Builds the timeline of `events` (decoded records of one order, any order): sorted by record
/// timestamp, then causal rank, then coordinates; a second record with the eventId of an earlier
/// one is a copy (`copy_of`) and keeps the state; every other step gets [`OrderState::after`].
/// Returns the steps and the final state.
pub fn timeline(mut events: Vec<(Raw, Event)>) -> (Vec<Step>, OrderState) {
    let ts = |(r, e): &(Raw, Event)| r.timestamp_ms.unwrap_or(e.occurred_at());
    events.sort_by(|a, b| (ts(a), causal_rank(&a.1), &a.0.at).cmp(&(ts(b), causal_rank(&b.1), &b.0.at)));
    let mut state = OrderState::None;
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    let mut steps = Vec::new();
    for (r, e) in &events {
        let here = format!("{}[{}]@{}", r.at.topic, r.at.partition, r.at.offset);
        let copy_of = seen.get(e.event_id()).cloned();
        let note = if copy_of.is_some() {
            None
        } else {
            seen.insert(e.event_id().to_string(), here);
            let (next, note) = state.after(e);
            state = next;
            note
        };
        let timestamp = r.timestamp_ms.unwrap_or(e.occurred_at());
        steps.push(Step {
            topic: r.at.topic.clone(),
            partition: r.at.partition,
            offset: r.at.offset,
            timestamp,
            time: rfc3339(timestamp),
            occurred_at: e.occurred_at(),
            event: e.schema_name().to_string(),
            event_id: e.event_id().to_string(),
            detail: detail(e),
            state_after: state.to_string(),
            copy_of,
            note,
        });
    }
    (steps, state)
}

/// What the trace of one order found.
struct Found {
    events: Vec<(Raw, Event)>,
    /// Records of the order (by key) that do not decode: coordinates, class, message.
    undecodable: Vec<Value>,
    dead_letters: Vec<DeadLetter>,
    scanned: Vec<Scanned>,
    /// Topics the trace would read but that are not on the broker.
    missing: Vec<String>,
    store: Option<String>,
}

/// Topics with a schema carrying an order (every record schema but `InventoryAdjusted`).
fn carries_orders(topology: &Topology, topic: &str) -> bool {
    topology.topics.get(topic).and_then(|t| t.schema.as_ref()).is_none_or(|s| s.names().iter().any(|n| *n != "InventoryAdjusted"))
}

/// Reads each wanted (topic, partition, key, `keyed_by` label) partition of a trace round to its
/// end, records it in `found.scanned` with its record count, and returns the records read.
async fn read_round(scanner: std::sync::Arc<Reader>, want: Vec<(String, i32, String, String)>, found: &mut Found) -> Result<Vec<Raw>> {
    let spans_of = want.iter().map(|(t, p, _, _)| (t.clone(), *p)).collect::<Vec<_>>();
    let raws = blocking(move || {
        let mut spans = Vec::new();
        for (t, p) in spans_of {
            spans.extend(scanner.spans_to_end(&t, [p])?);
        }
        read_all(&scanner, &spans)
    })
    .await?;
    for (topic, partition, key, keyed_by) in want {
        let records = raws.iter().filter(|r| r.at.topic == topic && r.at.partition == partition).count();
        found.scanned.push(Scanned { topic, partition, keyed_by, key, records });
    }
    Ok(raws)
}

/// Reads the partitions of one round of the trace and decodes what it read. `want`: for each
/// (topic, partition) the key and `keyed_by` label. Keeps the records whose decoded event
/// belongs to `order` (`Event::order_id`: for `stock.updated`, SALE records referencing it), and
/// undecodable records keyed by it.
async fn trace_round(
    scanner: std::sync::Arc<Reader>,
    codec: &Codec,
    order: &str,
    want: Vec<(String, i32, String, String)>,
    found: &mut Found,
) -> Result<()> {
    for r in read_round(scanner, want, found).await? {
        match decode(codec, &r).await {
            Ok(e) if e.order_id() == Some(order) => found.events.push((r, e)),
            Ok(_) => {}
            Err(err) if r.key.as_deref() == Some(order.as_bytes()) => {
                let mut v = error_json(err.as_ref());
                v["record"] = json!(format!("{}[{}]@{}", r.at.topic, r.at.partition, r.at.offset));
                found.undecodable.push(v);
            }
            Err(_) => {}
        }
    }
    Ok(())
}

/// `orderflow trace ORDER_ID`: the order's timeline across the saga's topics, read with a
/// partition-keyed scan:
///
/// 1. every topic keyed by `orderId` (the topology's `key`): only the partition
///    [`crate::kafkaio::partition_for`]`(orderId)` (partition count from the broker);
/// 2. every topic keyed by `hqId:storeId` that carries order events (`stock.commands`): only the
///    partition of the order's store key, learnt from the events of step 1, keeping its events;
/// 3. every topic keyed by `productId` (`stock.updated`): the partitions of the order's products
///    (from `order.created`, `stock.reserved` or `order.completed`), keeping the SALE records
///    whose `referenceId` is the order;
/// 4. the dead-letter topics of the topology: the partition of the order's key (or its store key,
///    for dead letters of store-keyed topics), keeping records keyed by the order or whose value
///    decodes to one of its events.
///
/// Each read goes from the low to the high watermark at the time of the read. Prints the
/// timeline (time, topic, partition@offset, event, detail, state after; see [`timeline`]),
/// the dead letters and the partitions read. `--json` prints one object: `{"order_id",
/// "store" (hqId:storeId or null), "final_state", "steps": [`Step`], "dead_letters": [dlq list
/// JSON lines], "undecodable": [{"record", "class", "message"}], "scanned": [`Scanned`],
/// "missing_topics": [..]}`.
///
/// Errors: topology; broker unreachable; no event, dead letter or undecodable record of the order
/// in any partition read (naming the partitions read).
pub async fn trace(a: TraceArgs) -> Result<()> {
    let loaded = crate::topology::load_topology(&a.topology, a.bootstrap.as_deref())?;
    let codec = Codec::load(&loaded.avro_dir(), loaded.topology.broker.registry_url.as_deref())?;
    let topology = loaded.topology.clone();
    let order = a.order_id.clone();
    let broker = topology.broker.clone();
    let scanner = std::sync::Arc::new(blocking(move || scanner(&broker)).await?);
    let s = scanner.clone();
    let on_broker = blocking(move || s.broker_topics()).await?;
    let mut found = Found {
        events: Vec::new(),
        undecodable: Vec::new(),
        dead_letters: Vec::new(),
        scanned: Vec::new(),
        missing: Vec::new(),
        store: None,
    };
    let present = |topic: &str, found: &mut Found| -> Option<i32> {
        let n = on_broker.get(topic).copied();
        if n.is_none() {
            found.missing.push(topic.to_string());
        }
        n
    };

    // 1. orderId-keyed topics: the order's partition.
    let mut want = Vec::new();
    for (name, spec) in &topology.topics {
        if spec.key == "orderId" {
            if let Some(n) = present(name, &mut found) {
                want.push((name.clone(), partition_for(order.as_bytes(), n), order.clone(), "orderId".to_string()));
            }
        }
    }
    trace_round(scanner.clone(), &codec, &order, want, &mut found).await?;

    // 2. and 3. the store's partition, the products' partitions.
    found.store = found.events.iter().map(|(_, e)| e.store_key()).next();
    let mut products = BTreeSet::new();
    for (_, e) in &found.events {
        match e {
            Event::OrderCreated(e) => products.extend(e.items.iter().map(|i| i.product_id.clone())),
            Event::StockReserved(e) => products.extend(e.items.iter().map(|i| i.product_id.clone())),
            Event::OrderCompleted(e) => products.extend(e.items.iter().map(|i| i.product_id.clone())),
            _ => {}
        }
    }
    let mut want = Vec::new();
    for (name, spec) in &topology.topics {
        match spec.key.as_str() {
            "hqId:storeId" if carries_orders(&topology, name) => {
                let store = found.store.clone();
                if let (Some(store), Some(n)) = (store, present(name, &mut found)) {
                    want.push((name.clone(), partition_for(store.as_bytes(), n), store.clone(), spec.key.clone()));
                }
            }
            "productId" if !products.is_empty() => {
                if let Some(n) = present(name, &mut found) {
                    let mut by_partition: BTreeMap<i32, Vec<&str>> = BTreeMap::new();
                    for p in &products {
                        by_partition.entry(partition_for(p.as_bytes(), n)).or_default().push(p);
                    }
                    for (p, keys) in by_partition {
                        want.push((name.clone(), p, keys.join(","), spec.key.clone()));
                    }
                }
            }
            _ => {}
        }
    }
    trace_round(scanner.clone(), &codec, &order, want, &mut found).await?;

    // 4. dead letters: the partition of the key their source topic is keyed by.
    let mut want = Vec::new();
    for (dlq, inputs) in topology.dead_letter_topics() {
        let Some(&n) = on_broker.get(&dlq) else { continue }; // nothing was ever dead-lettered there
        let mut keys = BTreeSet::new();
        for input in &inputs {
            match topology.topics.get(input).map(|t| t.key.as_str()) {
                Some("orderId") => {
                    keys.insert(("orderId", order.clone()));
                }
                Some("hqId:storeId") if carries_orders(&topology, input) => {
                    if let Some(s) = &found.store {
                        keys.insert(("hqId:storeId", s.clone()));
                    }
                }
                _ => {}
            }
        }
        let by = format!("dead letters of {}", inputs.iter().cloned().collect::<Vec<_>>().join(", "));
        let mut parts: BTreeMap<i32, Vec<String>> = BTreeMap::new();
        for (_, k) in keys {
            parts.entry(partition_for(k.as_bytes(), n)).or_default().push(k);
        }
        for (p, ks) in parts {
            want.push((dlq.clone(), p, ks.join(","), by.clone()));
        }
    }
    for r in read_round(scanner.clone(), want, &mut found).await? {
        let ours =
            r.key.as_deref() == Some(order.as_bytes()) || matches!(decode(&codec, &r).await, Ok(e) if e.order_id() == Some(order.as_str()));
        if ours {
            found.dead_letters.push(r.into_dead_letter());
        }
    }

    if found.events.is_empty() && found.dead_letters.is_empty() && found.undecodable.is_empty() {
        let read: Vec<String> = found.scanned.iter().map(|s| format!("{}[{}]", s.topic, s.partition)).collect();
        bail!(
            "no event of order {order}: none in the partitions its key maps to ({}){}",
            read.join(", "),
            if found.missing.is_empty() { String::new() } else { format!("; not on the broker: {}", found.missing.join(", ")) }
        );
    }
    let store = found.store.clone();
    let (steps, state) = timeline(std::mem::take(&mut found.events));
    if a.json {
        let out = json!({
            "order_id": order,
            "store": store,
            "final_state": state.to_string(),
            "steps": steps,
            "dead_letters": found.dead_letters.iter().map(DeadLetter::list_json).collect::<Vec<_>>(),
            "undecodable": found.undecodable,
            "scanned": found.scanned,
            "missing_topics": found.missing,
        });
        println!("{out}");
        return Ok(());
    }
    let originals = steps.iter().filter(|s| s.copy_of.is_none()).count();
    println!(
        "order {order}{}: {originals} event(s){}, final state {state}{}",
        store.as_deref().map(|s| format!(" (store {s})")).unwrap_or_default(),
        if originals < steps.len() { format!(" + {} repartitioned copies", steps.len() - originals) } else { String::new() },
        if state.is_terminal() { "" } else { " (saga still open)" }
    );
    if !steps.is_empty() {
        println!();
        let mut rows = vec![["TIME", "TOPIC", "AT", "EVENT", "STATE AFTER", "DETAIL"].map(String::from).to_vec()];
        for s in &steps {
            let mut d = s.detail.clone();
            if let Some(c) = &s.copy_of {
                d = format!("(copy of {c})");
            }
            if let Some(n) = &s.note {
                d = format!("{d} [{n}]");
            }
            rows.push(vec![
                s.time.clone(),
                s.topic.clone(),
                format!("{}@{}", s.partition, s.offset),
                s.event.clone(),
                if s.copy_of.is_some() { String::new() } else { s.state_after.clone() },
                cut(&d, DETAIL_WIDTH),
            ]);
        }
        print_table(&rows);
    }
    if !found.dead_letters.is_empty() {
        println!("\ndead letters:");
        for d in &found.dead_letters {
            println!(
                "  {}  {}  source {}  worker {}  class {}: {}",
                d.time_ms().map_or("?".into(), rfc3339),
                d.at,
                d.source().map_or("?".into(), |s| format!("{}[{}]@{}", s.topic, s.partition, s.offset)),
                d.worker().unwrap_or("?"),
                d.class().unwrap_or("?"),
                cut(d.message().unwrap_or(""), DETAIL_WIDTH)
            );
        }
    }
    if !found.undecodable.is_empty() {
        println!("\nrecords keyed by the order that do not decode:");
        for u in &found.undecodable {
            let text = |k: &str| u[k].as_str().unwrap_or("?").to_string();
            println!("  {}  {}: {}", text("record"), text("class"), text("message"));
        }
    }
    println!("\nread (partition-keyed scan; records read per partition):");
    let mut groups: BTreeMap<(bool, &str, &str, i32), Vec<String>> = BTreeMap::new();
    for s in &found.scanned {
        let dlq = s.keyed_by.starts_with("dead letters");
        let by = if dlq { "dead letters, key" } else { s.keyed_by.as_str() };
        groups.entry((dlq, by, s.key.as_str(), s.partition)).or_default().push(format!("{} {}", s.topic, s.records));
    }
    for ((_, by, key, partition), topics) in &groups {
        println!("  {by} {key} -> partition {partition}: {}", topics.join(", "));
    }
    if !found.missing.is_empty() {
        println!("  not on the broker: {}", found.missing.join(", "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use orderflow_api::events::*;

    fn w(s: &str) -> Where {
        s.parse().unwrap()
    }

    #[test]
    fn where_compares_scalars_along_dotted_paths() {
        let v = json!({
            "orderId": "O-1", "reason": "INSUFFICIENT_STOCK", "expiresAt": 1700000000000i64, "paid": true, "reservationId": null,
            "storeStock": {"previous": 10, "current": 7},
            "items": [{"productId": "P-1", "quantity": 3}, {"productId": "P-2", "quantity": 1}],
        });
        assert!(w("orderId=O-1").matches(&v));
        assert!(!w("orderId=O-2").matches(&v));
        assert!(w("expiresAt=1700000000000").matches(&v));
        assert!(w("paid=true").matches(&v));
        assert!(w("reservationId=null").matches(&v));
        assert!(w("storeStock.current=7").matches(&v));
        assert!(!w("storeStock=7").matches(&v), "objects never match");
        assert!(!w("items=P-1").matches(&v), "arrays never match");
        assert!(w("items.productId=P-2").matches(&v), "any element");
        assert!(w("items.1.quantity=1").matches(&v));
        assert!(!w("items.0.productId=P-2").matches(&v));
        assert!(!w("items.5.productId=P-1").matches(&v));
        assert!(!w("nope=O-1").matches(&v));
        assert!(!w("orderId.deeper=O-1").matches(&v));
        assert_eq!(w("customerMessage=a=b"), Where { path: vec!["customerMessage".into()], value: "a=b".into() });
        assert!(w("orderId=").matches(&json!({"orderId": ""})));
        assert!("orderId".parse::<Where>().unwrap_err().contains("FIELD=VALUE"));
        assert!("a..b=1".parse::<Where>().unwrap_err().contains("empty field name"));
    }

    #[derive(Parser, Debug)]
    struct TestCli {
        #[command(flatten)]
        tap: TapArgs,
    }

    fn tap_args(args: &[&str]) -> TapArgs {
        TestCli::try_parse_from([&["t", "order.created"], args].concat()).unwrap().tap
    }

    #[test]
    fn tap_flags_start_and_filter() {
        assert_eq!(tap_start(&tap_args(&[]), (5, 12)), 5);
        assert_eq!(tap_start(&tap_args(&["--from-beginning"]), (5, 12)), 5);
        assert_eq!(tap_start(&tap_args(&["--from-offset", "7"]), (5, 12)), 7);
        assert_eq!(tap_start(&tap_args(&["--from-offset", "1"]), (5, 12)), 5);
        assert_eq!(tap_start(&tap_args(&["--from-offset", "99"]), (5, 12)), 12);
        assert_eq!(tap_start(&tap_args(&["--last", "3"]), (5, 12)), 9);
        assert_eq!(tap_start(&tap_args(&["--last", "30"]), (5, 12)), 5);
        let parse = |args: &[&str]| TestCli::try_parse_from([&["t", "x"], args].concat());
        assert!(parse(&["--last", "1", "--from-beginning"]).is_err());
        assert!(parse(&["--follow", "--until-end"]).is_err());
        assert!(parse(&["--where", "nope"]).is_err());
        let a = tap_args(&[
            "--key",
            "O-1",
            "--where",
            "items.productId=P-1",
            "--where",
            "customerId=C-1",
            "--partition",
            "2",
            "--partition",
            "3",
        ]);
        assert_eq!((a.partitions.as_slice(), a.conditions.len()), (&[2, 3][..], 2));
        let created = |order: &str, customer: &str| -> Event {
            OrderCreated {
                event_id: "e".into(),
                occurred_at: 1,
                order_id: order.into(),
                customer_id: customer.into(),
                hq_id: "H".into(),
                store_id: "S".into(),
                items: vec![OrderItem { product_id: "P-1".into(), quantity: 1, unit_price: 1 }],
            }
            .into()
        };
        let raw = |key: &str| Raw {
            at: Coordinates { topic: "order.created".into(), partition: 2, offset: 0 },
            timestamp_ms: Some(0),
            key: Some(key.as_bytes().to_vec()),
            headers: vec![],
            value: None,
        };
        assert!(tap_keeps(&a, &raw("O-1"), &Ok(created("O-1", "C-1"))));
        assert!(!tap_keeps(&a, &raw("O-2"), &Ok(created("O-1", "C-1"))), "--key");
        assert!(!tap_keeps(&a, &raw("O-1"), &Ok(created("O-1", "C-2"))), "every --where must match");
        assert!(!tap_keeps(&a, &raw("O-1"), &Err(None)), "undecodable records never match --where");
        assert!(tap_keeps(&tap_args(&["--key", "O-1"]), &raw("O-1"), &Err(None)));
    }

    fn codec() -> Codec {
        Codec::load(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../avro"), None).unwrap()
    }

    #[tokio::test]
    async fn tap_lines_carry_coordinates_headers_and_the_value_or_the_error() {
        let codec = codec();
        let event: Event = OrderCancelled {
            event_id: "e-1".into(),
            occurred_at: 1_700_000_000_000,
            order_id: "O-1".into(),
            hq_id: "H".into(),
            store_id: "S".into(),
            reason: "INSUFFICIENT_STOCK".into(),
            reservation_id: None,
            customer_message: "sorry".into(),
        }
        .into();
        let mut r = Raw {
            at: Coordinates { topic: "order.cancelled".into(), partition: 4, offset: 17 },
            timestamp_ms: Some(1_700_000_000_123),
            key: Some(b"O-1".to_vec()),
            headers: vec![("traceparent".into(), Some(b"00-abc".to_vec())), ("bin".into(), Some(vec![0xff])), ("nil".into(), None)],
            value: Some(codec.encode_local(&event).unwrap()),
        };
        let line = tap_json(&r, &decode(&codec, &r).await, &codec);
        assert_eq!(
            line,
            json!({"topic": "order.cancelled", "partition": 4, "offset": 17, "timestamp": 1_700_000_000_123i64,
                   "time": "2023-11-14T22:13:20.123Z", "key": "O-1",
                   "headers": {"traceparent": "00-abc", "bin": "0xff", "nil": null},
                   "event": "OrderCancelled", "value": event.to_json()})
        );
        r.value = Some(b"not avro at all".to_vec());
        let line = tap_json(&r, &decode(&codec, &r).await, &codec);
        assert_eq!(line["error"]["class"], "not_avro", "{line}");
        assert_eq!(line["value_hex"], hex(b"not avro at all"));
        assert_eq!(line["event"], Value::Null);
        assert!(line.get("value").is_none());
        let mut cut_short = codec.encode_local(&event).unwrap();
        cut_short.truncate(cut_short.len() - 3);
        r.value = Some(cut_short);
        let line = tap_json(&r, &decode(&codec, &r).await, &codec);
        assert_eq!((line["error"]["class"].as_str(), line["event"].as_str()), (Some("truncated"), Some("OrderCancelled")), "{line}");
        r.value = Some(vec![0x5a; 1000]);
        assert_eq!(tap_json(&r, &decode(&codec, &r).await, &codec)["value_hex"].as_str().unwrap().len(), 2 * HEX_BYTES);
        r.value = None;
        let line = tap_json(&r, &decode(&codec, &r).await, &codec);
        assert_eq!((line["error"]["class"].as_str(), line["value_bytes"].clone()), (Some("truncated"), Value::Null));
    }

    fn cancelled(reason: &str) -> Event {
        OrderCancelled {
            event_id: format!("cancel-{reason}"),
            occurred_at: 0,
            order_id: "O".into(),
            hq_id: "H".into(),
            store_id: "S".into(),
            reason: reason.into(),
            reservation_id: None,
            customer_message: String::new(),
        }
        .into()
    }

    fn confirmed() -> Event {
        OrderConfirmed {
            event_id: "confirm".into(),
            occurred_at: 0,
            order_id: "O".into(),
            reservation_id: "R".into(),
            hq_id: "H".into(),
            store_id: "S".into(),
            status: "PAYMENT_WAIT".into(),
            expires_at: 0,
        }
        .into()
    }

    fn completed() -> Event {
        OrderCompleted {
            event_id: "complete".into(),
            occurred_at: 0,
            order_id: "O".into(),
            reservation_id: "R".into(),
            hq_id: "H".into(),
            store_id: "S".into(),
            items: vec![SoldItem { product_id: "P".into(), quantity: 1, actual_price: 5 }],
            total_amount: 5,
        }
        .into()
    }

    fn created() -> Event {
        OrderCreated {
            event_id: "create".into(),
            occurred_at: 0,
            order_id: "O".into(),
            customer_id: "C".into(),
            hq_id: "H".into(),
            store_id: "S".into(),
            items: vec![OrderItem { product_id: "P".into(), quantity: 1, unit_price: 5 }],
        }
        .into()
    }

    fn reserved() -> Event {
        StockReserved {
            event_id: "reserve".into(),
            occurred_at: 0,
            order_id: "O".into(),
            reservation_id: "R".into(),
            hq_id: "H".into(),
            store_id: "S".into(),
            expires_at: 0,
            items: vec![ReservedItem { product_id: "P".into(), reserved: 1 }],
        }
        .into()
    }

    fn expired() -> Event {
        StockReservationExpired {
            event_id: "expire".into(),
            occurred_at: 0,
            order_id: "O".into(),
            reservation_id: "R".into(),
            hq_id: "H".into(),
            store_id: "S".into(),
            expires_at: 0,
        }
        .into()
    }

    fn released() -> Event {
        StockReservationReleased {
            event_id: "release".into(),
            occurred_at: 0,
            order_id: "O".into(),
            reservation_id: "R".into(),
            hq_id: "H".into(),
            store_id: "S".into(),
            reason: "EXPIRED".into(),
            items: vec![ReleasedItem { product_id: "P".into(), released: 1 }],
        }
        .into()
    }

    fn sale() -> Event {
        StockUpdated {
            event_id: "sale".into(),
            occurred_at: 0,
            hq_id: "H".into(),
            store_id: "S".into(),
            product_id: "P".into(),
            hq_stock: None,
            store_stock: StockLevel { previous: 10, current: 9 },
            change_amount: -1,
            change_reason: "SALE".into(),
            reference_id: "O".into(),
        }
        .into()
    }

    /// The states after each event of `events`, applied in order.
    fn states(events: &[Event]) -> Vec<String> {
        let mut s = OrderState::None;
        events
            .iter()
            .map(|e| {
                s = s.after(e).0;
                s.to_string()
            })
            .collect()
    }

    #[test]
    fn state_after_follows_the_saga() {
        assert_eq!(
            states(&[created(), reserved(), confirmed(), completed(), sale()]),
            ["ORDER_CREATED", "ORDER_CREATED", "ORDER_CONFIRMED/PAYMENT_WAIT", "ORDER_COMPLETED", "ORDER_COMPLETED"]
        );
        let failed: Event = StockReservationFailed {
            event_id: "fail".into(),
            occurred_at: 0,
            order_id: "O".into(),
            hq_id: "H".into(),
            store_id: "S".into(),
            reason: "INSUFFICIENT_STOCK".into(),
            items: vec![FailedItem { product_id: "P".into(), requested: 3, available: 1 }],
        }
        .into();
        assert_eq!(
            states(&[created(), failed, cancelled("INSUFFICIENT_STOCK")]),
            ["ORDER_CREATED", "ORDER_CREATED", "ORDER_CANCELLED(INSUFFICIENT_STOCK)"]
        );
        assert_eq!(
            states(&[created(), reserved(), confirmed(), expired(), released(), cancelled("RESERVATION_EXPIRED")]),
            [
                "ORDER_CREATED",
                "ORDER_CREATED",
                "ORDER_CONFIRMED/PAYMENT_WAIT",
                "ORDER_CONFIRMED/PAYMENT_WAIT",
                "ORDER_CONFIRMED/PAYMENT_WAIT",
                "ORDER_CANCELLED(RESERVATION_EXPIRED)"
            ]
        );
        // Without order.created (retention, or a trace started late), the first event opens it.
        assert_eq!(states(&[reserved()]), ["ORDER_CREATED"]);
        assert_eq!(states(&[cancelled("PAYMENT_FAILED")]), ["ORDER_CANCELLED(PAYMENT_FAILED)"]);
    }

    #[test]
    fn late_events_do_not_reopen_a_closed_order() {
        let done = OrderState::Completed;
        let (s, note) = done.after(&cancelled("RESERVATION_EXPIRED"));
        assert_eq!(s, OrderState::Completed);
        assert!(note.unwrap().contains("late: the order is already ORDER_COMPLETED"));
        let gone = OrderState::Cancelled("SAGA_TIMEOUT".into());
        for e in [confirmed(), completed()] {
            let (s, note) = gone.after(&e);
            assert_eq!(s, gone);
            assert!(note.unwrap().starts_with("late"), "{e:?}");
        }
        assert_eq!(gone.after(&cancelled("PAYMENT_FAILED")), (gone.clone(), Some("cancelled again".into())));
        assert_eq!(gone.after(&released()), (gone.clone(), None));
        assert!(gone.is_terminal() && done.is_terminal() && !OrderState::Confirmed("PAYMENT_WAIT".into()).is_terminal());
    }

    fn raw(topic: &str, partition: i32, offset: i64, ts: i64) -> Raw {
        Raw { at: Coordinates { topic: topic.into(), partition, offset }, timestamp_ms: Some(ts), key: None, headers: vec![], value: None }
    }

    #[test]
    fn timeline_sorts_by_time_then_cause_and_marks_repartitioned_copies() {
        let (steps, state) = timeline(vec![
            (raw("stock.updated", 2, 9, 150), sale()),
            (raw("order.completed", 1, 0, 140), completed()),
            (raw("stock.commands", 5, 3, 101), created()),
            (raw("order.confirmed", 1, 0, 120), confirmed()),
            // Same millisecond: the cause first.
            (raw("stock.reserved", 1, 0, 100), reserved()),
            (raw("order.created", 1, 0, 100), created()),
            (raw("stock.commands", 5, 4, 141), completed()),
        ]);
        let got: Vec<(&str, &str, Option<&str>)> =
            steps.iter().map(|s| (s.topic.as_str(), s.state_after.as_str(), s.copy_of.as_deref())).collect();
        assert_eq!(
            got,
            vec![
                ("order.created", "ORDER_CREATED", None),
                ("stock.reserved", "ORDER_CREATED", None),
                ("stock.commands", "ORDER_CREATED", Some("order.created[1]@0")),
                ("order.confirmed", "ORDER_CONFIRMED/PAYMENT_WAIT", None),
                ("order.completed", "ORDER_COMPLETED", None),
                ("stock.commands", "ORDER_COMPLETED", Some("order.completed[1]@0")),
                ("stock.updated", "ORDER_COMPLETED", None),
            ]
        );
        assert_eq!(state, OrderState::Completed);
        assert_eq!(steps[0].time, "1970-01-01T00:00:00.100Z");
        assert!(steps[6].detail.contains("SALE P -1, store 10 → 9"), "{}", steps[6].detail);
        assert!(steps[1].detail.contains("reservation R"), "{}", steps[1].detail);
    }

    #[test]
    fn unknown_topics_are_named() {
        let t = orderflow_runtime::topology::parse(
            "[broker]\nbootstrap = \"x:1\"\n[topics.a]\npartitions = 2\nkey = \"orderId\"\n[workers.w]\nkind = \"k\"\ninputs = [\"a\"]\n",
            std::path::Path::new("t.toml"),
        )
        .unwrap()
        .topology;
        let broker = BTreeMap::from([("b".to_string(), 3)]);
        assert_eq!(find_topic("b", &t, &broker).unwrap(), 3);
        assert!(find_topic("a", &t, &broker).unwrap_err().to_string().contains("does not exist on the broker yet"));
        assert!(find_topic("a.dlq", &t, &broker).unwrap_err().to_string().contains("declared in the topology"));
        assert_eq!(
            find_topic("zz", &t, &broker).unwrap_err().to_string(),
            "unknown topic zz: not on the broker and not a topic of the topology (a)"
        );
    }
}
