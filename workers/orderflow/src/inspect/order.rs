//! `orderflow trace`: one order's records across the saga's topics, its timeline and its state
//! after each event ([`OrderState`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use orderflow_api::events::store_key;
use orderflow_api::Event;
use orderflow_runtime::codec::Codec;
use orderflow_runtime::topology::Topology;
use serde::Serialize;
use serde_json::{json, Value};

use crate::dlq::DeadLetter;
use crate::kafkaio::{blocking, partition_for, rfc3339, Reader};
use crate::text::{cut, print_table};

use super::{decode, error_json, read_all, scanner, Raw, DETAIL_WIDTH};

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
    /// `order.cancelled` close it unless it is closed already. The stock reserver's verdict
    /// (`order.settled`, issue 13) has the last word on a paid order: `SOLD` completes it (a late
    /// sale also after a cancellation), and a refund-required cancellation cancels it after its
    /// payment. Expiry, release and stock updates do not change the order's state (the
    /// cancellation that follows does).
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
            Event::OrderCancelled(e) if e.refund_required => {
                (OrderState::Cancelled(e.reason.clone()), Some("refund required: the stock reserver could not sell the payment".into()))
            }
            Event::OrderCancelled(e) => match self {
                OrderState::Cancelled(_) => same(Some("cancelled again".into())),
                OrderState::Completed => same(late()),
                _ => (OrderState::Cancelled(e.reason.clone()), None),
            },
            Event::OrderSettled(e) if e.outcome == orderflow_api::events::settlement::SOLD && e.late => {
                (OrderState::Completed, Some("late sale: paid after the reservation expired, deducted all the same".into()))
            }
            Event::OrderSettled(e) if e.outcome == orderflow_api::events::settlement::SOLD => (OrderState::Completed, None),
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
    /// A repartitioned copy (in `stock.commands` or an `order.*.repartition` topic) of an event shown elsewhere in the timeline:
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
        Event::StockReserved(_) | Event::StockReservationFailed(_) | Event::StockAllocation(_) => 2,
        Event::OrderConfirmed(_) => 3,
        Event::OrderCompleted(_) | Event::StockReservationExpired(_) => 4,
        Event::StockReservationReleased(_) | Event::StockUpdated(_) | Event::StockLedgerEntry(_) => 5,
        Event::OrderSettled(_) => 6,
        Event::OrderCancelled(_) => 7,
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
        Event::OrderCancelled(e) => format!(
            "reason {}{}, reservation {}: {}",
            e.reason,
            if e.refund_required { " (refund required)" } else { "" },
            e.reservation_id.as_deref().unwrap_or("-"),
            e.customer_message
        ),
        Event::OrderSettled(e) => format!(
            "{}{}{}, payment {}, reservation {}, items {}",
            e.outcome,
            if e.late { " (late sale)" } else { "" },
            e.reason.as_deref().map(|r| format!(" {r}")).unwrap_or_default(),
            e.payment_event_id,
            e.reservation_id,
            items(e.items.iter().map(|i| (i.product_id.as_str(), i64::from(i.quantity))))
        ),
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
        Event::StockAllocation(e) => format!(
            "{} {}, {} → {}, items {}",
            e.step,
            e.reference_id,
            store_key(&e.hq_id, &e.from_store_id),
            store_key(&e.hq_id, &e.store_id),
            items(e.items.iter().map(|i| (i.product_id.as_str(), i.quantity)))
        ),
        Event::StockLedgerEntry(e) => format!(
            "{} {} at {}, items {}",
            e.change_reason,
            e.reference_id,
            store_key(&e.hq_id, &e.store_id),
            items(e.lines.iter().map(|l| (l.product_id.as_str(), l.store_current - l.store_previous)))
        ),
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
