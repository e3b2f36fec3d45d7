//! Bad input (issue 4): records no well-behaved producer writes, interleaved with good orders on a
//! real broker, must each land where they belong while the good orders flow untouched.
//!
//! The corpus is `tests/corpus/bad_input/`: one `<nn>-<case>.bin` per case (the record value;
//! none for the tombstone) and `cases.json` naming each case's input topic, record key and
//! expected outcome. [`generate`] (`tests/bad_input_corpus/mod.rs`) makes every file from code
//! with the codec; regenerate them with
//!
//! ```text
//! cargo run --release -p orderflow --example bad_input_corpus
//! ```
//!
//! and `bad_input_corpus_matches_its_generator` (no broker) keeps the committed files equal to
//! what the generator makes. Expected outcomes:
//!
//! * a record the runtime must refuse goes to the input topic's dead-letter topic (`<topic>.dlq`)
//!   once **per worker reading that topic**, with the original key and value and the
//!   `orderflow.dlq.*` headers (source topic, partition and offset of the record as delivered,
//!   worker, error class, message, attempts, time), counted in
//!   `orderflow_dlq_records_total{worker,error_class}`, and has no other effect. Classes:
//!   `not_avro`, `unknown_schema`, `truncated`, `malformed`, `wrong_schema`, `invalid`,
//!   `future_timestamp`, `oversized`;
//! * an `order.created` whose ids are present but whose content cannot be served is not
//!   dead-lettered: the stock reserver answers `stock.reservation.failed` with a reason
//!   (`INVALID_QUANTITY`, `EMPTY_ORDER`, `DUPLICATE_PRODUCT`, `UNKNOWN_STORE`,
//!   `INVALID_PRODUCT`) and the canceller cancels the order with `INVALID_ORDER`;
//! * a payment (`order.completed`) the stock reserver must refuse while the order's reservation
//!   is live (issue 13: another `reservationId`, a product sold above what is reserved, a
//!   product the order does not hold, a product on two lines) is dead-lettered once, by the
//!   stock reserver, as it read it: from `stock.commands` (the deduplicator forwards every
//!   payment there, keyed by store) to `stock.commands.dlq`, class `invalid`, with the case's
//!   value and an error message saying what was wrong. Nothing is derived from it (no
//!   `stock.updated`, release or `order.settled`), and the order's good payment, which follows
//!   it, sells the order as usual: its `SALE` records equal its items and it is settled `SOLD`
//!   exactly once. Each such case names a good order the POS completes and is not spread
//!   between the good orders: the POS sends it when it sees that order's `order.confirmed`,
//!   just before the good payment (same key, same partition: the reserver sees it first);
//! * a good record of an external topic keyed otherwise than orderflow would (issue 19: sent
//!   without a record key, `no_key`, or with a key that is not the event's `orderId`, or
//!   `hqId:storeId` on `inventory.adjusted`, `key_mismatch`) is counted once in
//!   `orderflow_misrouted_records_total{worker,topic,reason}` by every worker reading the topic
//!   (the deduplicator alone: no other worker reads an external topic), logged (a warning per
//!   topic and reason), and processed like any good record, never dead-lettered: the
//!   deduplicator forwards it once to each of its output topics carrying its schema, keyed from
//!   the event as that topic's `key` says and on the partition orderflow's partitioner gives
//!   that key (`order.created.repartition` by `orderId`, `stock.commands` by `hqId:storeId`);
//!   then an order (all of [`MISROUTED_PRODUCT`], sent with `occurredAt` = send time) is
//!   reserved, confirmed, completed by the POS, sold and settled `SOLD` exactly once and never
//!   cancelled, and an adjustment gives one `stock.updated` per product with its delta.
//!
//! The run (`bad_input_lands_where_it_should_and_good_orders_flow`): a private broker, the five
//! workers in one `orderflow run` process on a copy of `topology.toml` with an absolute
//! `avro_dir` and `max_record_bytes = 4096` (so the oversized case stays small for the broker),
//! a restock of store `HQ-BADIN:ST-BADIN` ([`PRODUCTS`], and [`MISROUTED_PRODUCT`], which only
//! the misrouted orders buy, so they are reserved whatever the good orders took), then
//! [`GOOD_ORDERS`] good orders with the other cases spread between them (undecodable ones keyed
//! like good orders, so they share their partitions), while the test plays the POS (complete,
//! or `PAYMENT_FAILED` for every fifth confirmed good order; complete for the misrouted orders;
//! a bad payment first for the orders the payment cases name). The expected dead letters and
//! misrouted counts are derived from the topology (the workers reading each case's topic).
//! Every expectation is checked and all failures are reported together.
//! `ORDERFLOW_KEEP_BAD_INPUT_DIR=1` keeps the run directory (logs, state, topology copy).

mod bad_input_corpus;
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bad_input_corpus::*;
use common::{free_port, http_get, now_ms, Guarded, RunDir};
use orderflow_api::events::{
    cancel_reason, change_reason, failure_reason, settlement, store_key, AdjustedItem, InventoryAdjusted, OrderCancelled, OrderCompleted,
    OrderCreated, SoldItem,
};
use orderflow_api::{derive_event_id, Event};
use orderflow_runtime::codec::Codec;
use orderflow_runtime::kafka::{client_config, Side};
use orderflow_runtime::partitioner;
use orderflow_runtime::topology::{self, Topology};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};

/// Units of each of [`PRODUCTS`] the store gets.
const STOCK_PER_PRODUCT: i64 = 40;
/// Reservation TTL of the run (the POS answers long before).
const TTL: &str = "60s";
/// How long the run may take once the records are sent.
const SETTLE_WITHIN: Duration = Duration::from_secs(240);
/// Extra time after everything expected arrived, to catch doubles.
const QUIET: Duration = Duration::from_secs(5);

#[test]
fn bad_input_corpus_matches_its_generator() {
    let root = common::repo_root();
    let generated = generate(&codec(&root));
    let committed = load_corpus(&root);
    let regenerate = "run `cargo run --release -p orderflow --example bad_input_corpus`";
    assert_eq!(
        fs::read_to_string(root.join(CORPUS_DIR).join("cases.json")).unwrap(),
        manifest(&generated),
        "cases.json differs from the generator: {regenerate}"
    );
    assert_eq!(committed, generated, "corpus files differ from the generator: {regenerate}");
    let files: BTreeSet<String> =
        fs::read_dir(root.join(CORPUS_DIR)).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    let expected: BTreeSet<String> = generated.iter().filter_map(Case::file).chain(["cases.json".to_string()]).collect();
    assert_eq!(files, expected, "files in {CORPUS_DIR}");
}

// ------------------------------------------------------------------------------------------
// The run.

/// `topology.toml` with an absolute `avro_dir` and `max_record_bytes = 4096`.
fn run_topology(root: &Path, dir: &Path) -> PathBuf {
    let original = fs::read_to_string(root.join("topology.toml")).expect("read topology.toml");
    assert!(!original.lines().any(|l| l.trim_start().starts_with("avro_dir")), "topology.toml sets avro_dir: update run_topology");
    let mut replaced = 0;
    let body: Vec<String> = original
        .lines()
        .map(|l| {
            if l.trim_start().starts_with("max_record_bytes") {
                replaced += 1;
                format!("max_record_bytes = {MAX_RECORD_BYTES}   # bad input test: small, so the oversized case stays small")
            } else {
                l.to_string()
            }
        })
        .collect();
    assert_eq!(replaced, 1, "topology.toml should set max_record_bytes once in [defaults]: update run_topology");
    let text = format!(
        "# Copy of topology.toml for the bad input test (absolute avro_dir, max_record_bytes {MAX_RECORD_BYTES}).\navro_dir = {:?}\n\n{}\n",
        root.join("avro").display().to_string(),
        body.join("\n")
    );
    let path = dir.join("topology.toml");
    fs::write(&path, text).expect("write topology copy");
    path
}

/// The samples of counter `name` in the Prometheus text `body`: the values of `labels` (in
/// that order; "" when absent) → value.
fn counter(body: &str, name: &str, labels: &[&str]) -> BTreeMap<Vec<String>, u64> {
    let prefix = format!("{name}{{");
    let mut out = BTreeMap::new();
    for line in body.lines().filter(|l| l.starts_with(&prefix)) {
        let (sample_labels, value) = line[prefix.len()..].split_once('}').expect("labels");
        let get = |name: &str| {
            sample_labels
                .split(',')
                .find_map(|kv| kv.split_once('=').filter(|(k, _)| k.trim() == name).map(|(_, v)| v.trim().trim_matches('"').to_string()))
        };
        let value: f64 = value.trim().parse().expect("sample value");
        *out.entry(labels.iter().map(|l| get(l).unwrap_or_default()).collect()).or_default() += value as u64;
    }
    out
}

/// Checks that the non-zero samples of counter `name` (from [`counter`] with `labels`) are
/// exactly `want`.
fn check_counter(
    name: &str,
    labels: &[&str],
    want: &BTreeMap<Vec<String>, u64>,
    got: &BTreeMap<Vec<String>, u64>,
    failures: &mut Vec<String>,
) {
    let show = |k: &[String]| labels.iter().zip(k).map(|(l, v)| format!("{l}={v:?}")).collect::<Vec<_>>().join(",");
    for (k, n) in want {
        let g = got.get(k).copied().unwrap_or(0);
        if g != *n {
            failures.push(format!("{name}{{{}}} = {g} (expected {n})", show(k)));
        }
    }
    for (k, g) in got.iter().filter(|(_, g)| **g > 0) {
        if !want.contains_key(k) {
            failures.push(format!("{name}{{{}}} = {g} (expected none)", show(k)));
        }
    }
}

/// One record read back from the broker.
#[derive(Debug, Clone)]
struct Rec {
    topic: String,
    partition: i32,
    offset: i64,
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    headers: BTreeMap<String, String>,
}

impl Rec {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// What was sent: a good order or a case, where it landed.
#[derive(Debug, Clone)]
struct Sent {
    what: String,
    topic: String,
    partition: i32,
    offset: i64,
    /// `None`: sent without a key.
    key: Option<String>,
    value: Option<Vec<u8>>,
}

struct Io {
    rt: tokio::runtime::Runtime,
    producer: FutureProducer,
    observer: BaseConsumer,
    records: Vec<Rec>,
}

impl Io {
    /// Produces `value` to `topic` with `key` (`None`: no key); returns where it landed.
    fn send(&self, topic: &str, key: Option<&str>, value: Option<&[u8]>) -> (i32, i64) {
        let mut record = FutureRecord::<str, [u8]>::to(topic);
        if let Some(k) = key {
            record = record.key(k);
        }
        if let Some(v) = value {
            record = record.payload(v);
        }
        match self.rt.block_on(self.producer.send(record, Timeout::After(Duration::from_secs(30)))) {
            Ok(d) => (d.partition, d.offset),
            Err((e, _)) => panic!("producing to {topic}: {e}"),
        }
    }

    fn send_event(&self, codec: &Codec, topic: &str, key: &str, event: Event) -> (i32, i64) {
        self.send(topic, Some(key), Some(&codec.encode_local(&event).expect("encode")))
    }

    /// Reads what arrived for up to `wait`; returns the index of the first new record.
    fn poll(&mut self, wait: Duration) -> usize {
        let first = self.records.len();
        let until = Instant::now() + wait;
        while let Some(m) = self.observer.poll(until.saturating_duration_since(Instant::now()).max(Duration::from_millis(1))) {
            let m = m.expect("observer consumer");
            let mut headers = BTreeMap::new();
            if let Some(h) = m.headers() {
                for header in h.iter() {
                    headers
                        .insert(header.key.to_string(), header.value.map(|v| String::from_utf8_lossy(v).into_owned()).unwrap_or_default());
                }
            }
            self.records.push(Rec {
                topic: m.topic().to_string(),
                partition: m.partition(),
                offset: m.offset(),
                key: m.key().map(<[u8]>::to_vec),
                value: m.payload().map(<[u8]>::to_vec),
                headers,
            });
            if Instant::now() >= until {
                break;
            }
        }
        first
    }
}

/// The saga records read back, decoded.
struct Saga<'a> {
    /// (topic, event) of every decodable record of a non-dead-letter topic, in read order.
    events: Vec<(&'a str, Event)>,
    /// The topics the workers write (every worker output of the topology).
    written: BTreeSet<&'a str>,
}

impl<'a> Saga<'a> {
    fn new(records: &'a [Rec], codec: &Codec, t: &'a Topology) -> Saga<'a> {
        let events = records
            .iter()
            .filter(|r| !r.topic.ends_with(".dlq") && !r.topic.starts_with("orderflow-"))
            .filter_map(|r| r.value.as_deref().and_then(|v| codec.decode_local(v).ok()).map(|e| (r.topic.as_str(), e)))
            .collect();
        // What the stream workers write (a source kind's output, the outbox relay's order.created,
        // is an input here: the test produces it).
        let written = t.workers.values().filter(|w| !w.is_source()).flat_map(|w| w.outputs.values().map(String::as_str)).collect();
        Saga { events, written }
    }

    /// Distinct cancellations (eventId → reason) of `order_id`.
    fn cancellations(&self, order_id: &str) -> BTreeMap<String, String> {
        self.events
            .iter()
            .filter_map(|(t, e)| match e {
                Event::OrderCancelled(c) if *t == "order.cancelled" && c.order_id == order_id => {
                    Some((c.event_id.clone(), c.reason.clone()))
                }
                _ => None,
            })
            .collect()
    }

    /// Distinct `stock.reservation.failed` reasons (eventId → reason) of `order_id`.
    fn failures(&self, order_id: &str) -> BTreeMap<String, String> {
        self.events
            .iter()
            .filter_map(|(t, e)| match e {
                Event::StockReservationFailed(f) if *t == "stock.reservation.failed" && f.order_id == order_id => {
                    Some((f.event_id.clone(), f.reason.clone()))
                }
                _ => None,
            })
            .collect()
    }

    fn sold(&self, order_id: &str) -> bool {
        self.events.iter().any(|(t, e)| {
            *t == "stock.updated"
                && matches!(e, Event::StockUpdated(u) if u.change_reason == change_reason::SALE && u.reference_id == order_id)
        })
    }

    /// Terminal outcomes of an order: its distinct cancellations, plus `ORDER_COMPLETED` once
    /// stock was deducted for it.
    fn outcomes(&self, order_id: &str) -> Vec<String> {
        let mut out: Vec<String> = self.cancellations(order_id).into_values().map(|r| format!("ORDER_CANCELLED/{r}")).collect();
        if self.sold(order_id) {
            out.push("ORDER_COMPLETED".into());
        }
        out
    }

    /// Output events mentioning `order_id` or carrying `event_id` on a topic the workers write
    /// (the topology's worker outputs: the forwarded copy on `stock.commands` included).
    fn effects(&self, order_id: Option<&str>, event_id: Option<&str>) -> Vec<String> {
        self.events
            .iter()
            .filter(|(t, e)| {
                self.written.contains(t)
                    && (order_id.is_some_and(|o| e.order_id() == Some(o)) || event_id.is_some_and(|i| e.event_id() == i))
            })
            .map(|(t, e)| format!("{} on {t}", e.schema_name()))
            .collect()
    }

    /// Events derived from input `cause`: an `eventId` `derive_event_id(cause, tag)` with the
    /// workers' tags (the event's topic or canonical topic name, `<tag>/<productId>` for
    /// `stock.updated`; as `orderflow replay --through` attributes them), or an `order.settled`
    /// naming it as its payment.
    fn derived_from(&self, cause: &str) -> Vec<String> {
        self.events
            .iter()
            .filter(|(t, e)| {
                let canonical = match e {
                    Event::OrderCreated(_) => "order.created",
                    Event::OrderCompleted(_) => "order.completed",
                    Event::OrderCancelled(_) => "order.cancelled",
                    Event::OrderConfirmed(_) => "order.confirmed",
                    Event::OrderSettled(_) => "order.settled",
                    Event::StockReserved(_) => "stock.reserved",
                    Event::StockReservationFailed(_) => "stock.reservation.failed",
                    Event::StockReservationReleased(_) => "stock.reservation.released",
                    Event::StockReservationExpired(_) => "stock.reservation.expired",
                    Event::StockUpdated(_) => "stock.updated",
                    Event::InventoryAdjusted(_) => "inventory.adjusted",
                    Event::StockAllocation(_) => "stock.allocation",
                    Event::StockLedgerEntry(_) => "stock.ledger",
                };
                let mut tags = vec![canonical.to_string(), t.to_string()];
                if let Event::StockUpdated(u) = e {
                    tags = tags.iter().map(|tag| format!("{tag}/{}", u.product_id)).collect();
                }
                tags.iter().any(|tag| e.event_id() == derive_event_id(cause, tag))
                    || matches!(e, Event::OrderSettled(s) if s.payment_event_id == cause)
            })
            .map(|(t, e)| format!("{} {} on {t}", e.schema_name(), e.event_id()))
            .collect()
    }

    /// Distinct `order.settled` of `order_id` (eventId → event).
    fn settlements(&self, order_id: &str) -> BTreeMap<String, orderflow_api::events::OrderSettled> {
        self.events
            .iter()
            .filter_map(|(t, e)| match e {
                Event::OrderSettled(s) if *t == "order.settled" && s.order_id == order_id => Some((s.event_id.clone(), s.clone())),
                _ => None,
            })
            .collect()
    }

    /// What breaks "`order` was sold whole, once, by the POS's good payment
    /// (`pos-complete-<orderId>`)": its SALE records must be its items and its `order.settled`
    /// exactly one `SOLD`, not late, of that payment. One message per broken rule, led by `name`.
    fn sold_whole_once(&self, name: &str, order: &OrderCreated) -> Vec<String> {
        let order_id = &order.order_id;
        let mut faults = Vec::new();
        let mut want: Vec<(String, i64)> = order.items.iter().map(|i| (i.product_id.clone(), i64::from(i.quantity))).collect();
        want.sort();
        let mut got: Vec<(String, i64)> = self.sales(order_id).into_values().collect();
        got.sort();
        if got != want {
            faults.push(format!("{name}: SALE records of {order_id} {got:?} (expected its items {want:?})"));
        }
        let settled: Vec<_> = self.settlements(order_id).into_values().collect();
        let payment = format!("pos-complete-{order_id}");
        match settled.as_slice() {
            [one] if one.outcome == settlement::SOLD && one.payment_event_id == payment && !one.late => {}
            other => faults.push(format!(
                "{name}: order.settled of {order_id}: {:?} (expected exactly one SOLD, not late, of payment {payment})",
                other.iter().map(|s| format!("{} late={} payment={}", s.outcome, s.late, s.payment_event_id)).collect::<Vec<_>>()
            )),
        }
        faults
    }

    /// Distinct `SALE` records of `order_id` (eventId → (productId, units sold)).
    fn sales(&self, order_id: &str) -> BTreeMap<String, (String, i64)> {
        self.events
            .iter()
            .filter_map(|(t, e)| match e {
                Event::StockUpdated(u) if *t == "stock.updated" && u.change_reason == change_reason::SALE && u.reference_id == order_id => {
                    Some((u.event_id.clone(), (u.product_id.clone(), -u.change_amount)))
                }
                _ => None,
            })
            .collect()
    }
}

/// What is wrong with payment `p` of `order`, whose live reservation is `reservation_id`, as
/// the words the stock reserver's error message must contain (the first rule broken, in the
/// reserver's order: the reservation, then each line: held, listed once, within what is held);
/// `None` for a valid payment.
fn payment_fault(p: &OrderCompleted, order: &OrderCreated, reservation_id: &str) -> Option<Vec<String>> {
    let words = |w: &[&str]| Some(std::iter::once(p.event_id.as_str()).chain(w.iter().copied()).map(String::from).collect());
    if p.reservation_id != reservation_id {
        return words(&[&p.reservation_id]);
    }
    let mut seen = BTreeSet::new();
    for item in &p.items {
        let Some(held) = order.items.iter().find(|i| i.product_id == item.product_id) else {
            return words(&[&item.product_id, "not reserved"]);
        };
        if !seen.insert(item.product_id.as_str()) {
            return words(&[&item.product_id, "twice"]);
        }
        if item.quantity < 1 || item.quantity > held.quantity {
            return words(&[&item.product_id, &format!("{} are reserved", held.quantity)]);
        }
    }
    None
}

#[test]
fn bad_input_lands_where_it_should_and_good_orders_flow() {
    let started = Instant::now();
    let root = common::repo_root();
    let codec = codec(&root);
    let cases = load_corpus(&root);
    assert!(!cases.is_empty(), "empty corpus");

    let broker = common::Broker::start();
    let run_dir = RunDir::create("orderflow-bad-input-", "ORDERFLOW_KEEP_BAD_INPUT_DIR", "bad input: logs, state and topology");
    let dir = run_dir.path().to_path_buf();
    let topology_path = run_topology(&root, &dir);
    let mut loaded = topology::load(&topology_path).expect("topology copy loads");
    loaded.topology.broker.bootstrap = broker.bootstrap.clone();
    let t: &Topology = &loaded.topology;
    println!("bad input: {} cases, broker {}, run directory {}", cases.len(), broker.bootstrap, dir.display());

    let _bin = common::orderflow_bin();
    common::create_topics(&topology_path, &broker.bootstrap);

    // The five workers in one process.
    let port = free_port();
    let log = dir.join("workers.log");
    let mut workers = Guarded::new(
        common::run_command(&topology_path, &broker.bootstrap, "bad-input", port, &dir.join("state"), &log)
            .args(["--reservation-ttl", TTL])
            .spawn()
            .expect("spawn orderflow run"),
        Duration::from_millis(50),
    );
    common::wait_for("ready workers (/readyz 200)", &log, &mut workers, Duration::from_secs(90), Duration::from_millis(100), || {
        matches!(http_get(port, "/readyz"), Some((200, _))).then_some(())
    });
    println!("bad input: workers ready after {:.1}s", started.elapsed().as_secs_f64());

    // Observer of every topic (dead-letter topics included) from the beginning; producer.
    let mut consumer_cfg = client_config(&t.broker, Side::Consumer);
    consumer_cfg.set("group.id", format!("bad-input-observer-{}", now_ms()));
    let observer: BaseConsumer = consumer_cfg.create().expect("observer");
    let mut tpl = TopicPartitionList::new();
    let dead_letter_topics = t.dead_letter_topics();
    for (topic, spec) in &t.topics {
        for p in 0..spec.partitions {
            tpl.add_partition_offset(topic, p, Offset::Beginning).unwrap();
        }
    }
    for (dlq, sources) in &dead_letter_topics {
        let partitions = sources.iter().map(|s| t.topics[s].partitions).max().unwrap_or(1);
        for p in 0..partitions {
            tpl.add_partition_offset(dlq, p, Offset::Beginning).unwrap();
        }
    }
    observer.assign(&tpl).expect("assign");
    let producer: FutureProducer = client_config(&t.broker, Side::Producer).create().expect("producer");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut io = Io { rt, producer, observer, records: Vec::new() };

    // Stock first, applied before any order: the good orders' products, and the misrouted orders'.
    let restocked: Vec<(&str, i64)> =
        PRODUCTS.iter().map(|p| (*p, STOCK_PER_PRODUCT)).chain([(MISROUTED_PRODUCT, MISROUTED_STOCK)]).collect();
    let restock = InventoryAdjusted {
        event_id: "ev-restock-badin".into(),
        occurred_at: now_ms(),
        hq_id: HQ.into(),
        store_id: STORE.into(),
        adjustment_type: change_reason::RESTOCK.into(),
        reference_id: "restock-badin".into(),
        items: restocked.iter().map(|&(p, delta)| AdjustedItem { product_id: p.into(), delta }).collect(),
        to_store_id: None,
        reason: None,
        operator: None,
    };
    io.send_event(&codec, "inventory.adjusted", &store_key(HQ, STORE), restock.into());
    let stocked_by = Instant::now() + Duration::from_secs(60);
    loop {
        io.poll(Duration::from_millis(200));
        let updates = io.records.iter().filter(|r| r.topic == "stock.updated").count();
        if updates >= restocked.len() {
            break;
        }
        assert!(Instant::now() < stocked_by, "the restock was not applied within 60 s:\n{}", common::tail(&log, 30));
    }

    // Payment cases: sent by the POS below, each just before the good payment of its order.
    let payment_case: BTreeMap<String, usize> = cases
        .iter()
        .enumerate()
        .filter_map(|(i, c)| {
            let k = c.payment_of()?;
            assert!(k < GOOD_ORDERS && !pos_fails(k), "{}: good order {k} is not one the POS completes", c.name);
            assert_eq!(c.key.as_deref(), Some(good_order_id(k).as_str()), "{}: key", c.name);
            Some((good_order_id(k), i))
        })
        .collect();
    assert_eq!(
        payment_case.len(),
        cases.iter().filter(|c| matches!(c.expect, Expect::PaymentRejected { .. })).count(),
        "payment cases must name distinct good orders"
    );

    // Good orders with the other bad records spread between them.
    let mut sent: Vec<Sent> = Vec::new();
    let spread: Vec<usize> = (0..cases.len()).filter(|i| !payment_case.values().any(|p| p == i)).collect();
    let mut case_at: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (n, &i) in spread.iter().enumerate() {
        case_at.entry((n + 1) * GOOD_ORDERS / (spread.len() + 1)).or_default().push(i);
    }
    for k in 0..=GOOD_ORDERS {
        for &i in case_at.get(&k).map(Vec::as_slice).unwrap_or(&[]) {
            let c = &cases[i];
            let value = match (&c.value, c.restamp) {
                (Some(v), Some(by)) => {
                    let Ok(Event::OrderCreated(mut e)) = codec.decode_local(v) else { panic!("{}: not an OrderCreated", c.name) };
                    e.occurred_at = now_ms() + by.as_millis() as i64;
                    Some(codec.encode_local(&e.into()).unwrap())
                }
                (v, _) => v.clone(),
            };
            let (partition, offset) = io.send(&c.topic, c.key.as_deref(), value.as_deref());
            sent.push(Sent { what: c.name.clone(), topic: c.topic.clone(), partition, offset, key: c.key.clone(), value });
        }
        if k < GOOD_ORDERS {
            let order = good_order(k, now_ms());
            let value = codec.encode_local(&order.clone().into()).unwrap();
            let (partition, offset) = io.send("order.created", Some(&order.order_id), Some(&value));
            sent.push(Sent {
                what: order.order_id.clone(),
                topic: "order.created".into(),
                partition,
                offset,
                key: Some(order.order_id),
                value: Some(value),
            });
        }
    }
    println!(
        "bad input: sent {} good orders and {} cases ({} misrouted) in {:.1}s ({} bad payments wait for their orders' confirmation)",
        GOOD_ORDERS,
        spread.len(),
        cases.iter().filter(|c| matches!(c.expect, Expect::Misrouted(_))).count(),
        started.elapsed().as_secs_f64(),
        payment_case.len()
    );

    // Expected dead letters: (case index, dead-letter topic, worker, class).
    let readers = |topic: &str| -> Vec<String> {
        t.workers.iter().filter(|(_, w)| w.inputs.iter().any(|i| i == topic)).map(|(n, _)| n.clone()).collect()
    };
    let mut expected_dlq: Vec<(usize, String, String, String)> = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        if let Expect::DeadLetter(class) = &c.expect {
            for w in readers(&c.topic) {
                expected_dlq.push((i, t.dead_letter_of(&c.topic), w, class.clone()));
            }
        }
    }
    let good_ids: Vec<String> = (0..GOOD_ORDERS).map(good_order_id).collect();
    let rejected: Vec<(usize, String)> = cases
        .iter()
        .enumerate()
        .filter_map(|(i, c)| match &c.expect {
            Expect::Rejected(_) => Some((i, c.order_id(&codec).expect("rejected cases decode"))),
            _ => None,
        })
        .collect();
    // Misrouted records: (case index, the event as sent, re-stamped or not), and their orders.
    let misrouted: Vec<(usize, Event)> = cases
        .iter()
        .enumerate()
        .filter(|(_, c)| matches!(c.expect, Expect::Misrouted(_)))
        .map(|(i, c)| {
            let s = sent.iter().find(|s| s.what == c.name).expect("misrouted case sent");
            (i, codec.decode_local(s.value.as_deref().expect("misrouted cases have a value")).expect("misrouted cases decode"))
        })
        .collect();
    let misrouted_orders: BTreeMap<String, OrderCreated> = misrouted
        .iter()
        .filter_map(|(_, e)| match e {
            Event::OrderCreated(o) => Some((o.order_id.clone(), o.clone())),
            _ => None,
        })
        .collect();
    let misrouted_adjustments: Vec<String> =
        misrouted.iter().filter(|(_, e)| matches!(e, Event::InventoryAdjusted(_))).map(|(_, e)| e.event_id().to_string()).collect();

    // Play the POS until every order has an outcome and every dead letter arrived.
    let orders: BTreeMap<String, OrderCreated> =
        (0..GOOD_ORDERS).map(|k| (good_order_id(k), good_order(k, 0))).chain(misrouted_orders.clone()).collect();
    let mut paid: BTreeSet<String> = BTreeSet::new();
    let mut confirmed_count = 0usize;
    let mut reservation_mismatch: Vec<String> = Vec::new();
    let deadline = Instant::now() + SETTLE_WITHIN;
    let mut quiet_until: Option<Instant> = None;
    loop {
        let first = io.poll(Duration::from_millis(250));
        let new: Vec<Rec> = io.records[first..].to_vec();
        for r in new.iter().filter(|r| r.topic == "order.confirmed") {
            let Some(Ok(Event::OrderConfirmed(c))) = r.value.as_deref().map(|v| codec.decode_local(v)) else { continue };
            let Some(order) = orders.get(&c.order_id) else { continue };
            if !paid.insert(c.order_id.clone()) {
                continue;
            }
            confirmed_count += 1;
            // Good order k fails every fifth payment; the misrouted orders are completed.
            let good_k: Option<usize> = c.order_id.strip_prefix("O-GOOD-").and_then(|k| k.parse().ok());
            if let Some(&i) = payment_case.get(&c.order_id) {
                let k = cases[i].payment_of().expect("payment case");
                // The bad payment first, while the reservation is live; the good one right after.
                if c.reservation_id != good_reservation_id(k) {
                    reservation_mismatch.push(format!(
                        "{}: order.confirmed of {} names reservation {} (the corpus assumes {})",
                        cases[i].name,
                        c.order_id,
                        c.reservation_id,
                        good_reservation_id(k)
                    ));
                }
                let value = cases[i].value.clone().expect("payment cases have a value");
                let (partition, offset) = io.send(&cases[i].topic, cases[i].key.as_deref(), Some(&value));
                sent.push(Sent {
                    what: cases[i].name.clone(),
                    topic: cases[i].topic.clone(),
                    partition,
                    offset,
                    key: cases[i].key.clone(),
                    value: Some(value),
                });
            }
            let event: Event = if good_k.is_some_and(pos_fails) {
                OrderCancelled {
                    event_id: format!("pos-fail-{}", c.order_id),
                    occurred_at: now_ms(),
                    order_id: c.order_id.clone(),
                    hq_id: HQ.into(),
                    store_id: STORE.into(),
                    reason: cancel_reason::PAYMENT_FAILED.into(),
                    reservation_id: Some(c.reservation_id.clone()),
                    customer_message: "결제에 실패하여 주문이 취소되었습니다.".into(),
                    refund_required: false,
                    customer_id: None,
                }
                .into()
            } else {
                OrderCompleted {
                    event_id: format!("pos-complete-{}", c.order_id),
                    occurred_at: now_ms(),
                    order_id: c.order_id.clone(),
                    reservation_id: c.reservation_id.clone(),
                    hq_id: HQ.into(),
                    store_id: STORE.into(),
                    items: order
                        .items
                        .iter()
                        .map(|i| SoldItem { product_id: i.product_id.clone(), quantity: i.quantity, actual_price: i.unit_price })
                        .collect(),
                    total_amount: order.items.iter().map(|i| i64::from(i.quantity) * i.unit_price).sum(),
                }
                .into()
            };
            let topic = if matches!(event, Event::OrderCancelled(_)) { "order.cancelled" } else { "order.completed" };
            let (partition, offset) = io.send_event(&codec, topic, &c.order_id, event);
            sent.push(Sent {
                what: format!("pos {}", c.order_id),
                topic: topic.into(),
                partition,
                offset,
                key: Some(c.order_id.clone()),
                value: None,
            });
        }
        if let Some(until) = quiet_until {
            if Instant::now() >= until {
                break;
            }
            continue;
        }
        let saga = Saga::new(&io.records, &codec, t);
        let dlq_count = io.records.iter().filter(|r| dead_letter_topics.contains_key(&r.topic)).count();
        let outcomes_done = good_ids.iter().chain(misrouted_orders.keys()).all(|o| !saga.outcomes(o).is_empty())
            && rejected.iter().all(|(_, o)| !saga.failures(o).is_empty() && !saga.cancellations(o).is_empty())
            && misrouted_adjustments.iter().all(|id| !saga.derived_from(id).is_empty());
        if outcomes_done && dlq_count >= expected_dlq.len() + payment_case.len() {
            println!(
                "bad input: everything expected arrived after {:.1}s; {}s more for doubles",
                started.elapsed().as_secs_f64(),
                QUIET.as_secs()
            );
            quiet_until = Some(Instant::now() + QUIET);
        } else if Instant::now() >= deadline {
            println!(
                "bad input: gave up waiting after {}s (outcomes complete: {outcomes_done}, dead letters {dlq_count}/{})",
                SETTLE_WITHIN.as_secs(),
                expected_dlq.len() + payment_case.len()
            );
            break;
        }
    }
    println!("bad input: POS answered {confirmed_count} confirmed orders");

    // ---------------------------------------------------------------- checks
    let mut failures: Vec<String> = reservation_mismatch;
    let case_sent = |i: usize| sent.iter().find(|s| s.what == cases[i].name).expect("case sent");
    let saga = Saga::new(&io.records, &codec, t);
    let dlq_records: Vec<&Rec> = io.records.iter().filter(|r| dead_letter_topics.contains_key(&r.topic)).collect();
    let describe_source = |topic: &str, partition: &str, offset: &str| -> String {
        sent.iter()
            .find(|s| s.topic == topic && s.partition.to_string() == partition && s.offset.to_string() == offset)
            .map(|s| s.what.clone())
            .unwrap_or_else(|| format!("{topic}[{partition}]@{offset} (not sent by the test)"))
    };

    // 1. Dead letters: each expected one exactly once, with its headers, key and value.
    let mut matched: BTreeSet<(String, i32, i64)> = BTreeSet::new();
    for (i, dlq_topic, worker, class) in &expected_dlq {
        let s = case_sent(*i);
        let name = &cases[*i].name;
        let found: Vec<&&Rec> = dlq_records
            .iter()
            .filter(|r| {
                r.header("orderflow.dlq.source-topic") == Some(s.topic.as_str())
                    && r.header("orderflow.dlq.source-partition") == Some(s.partition.to_string().as_str())
                    && r.header("orderflow.dlq.source-offset") == Some(s.offset.to_string().as_str())
                    && r.header("orderflow.dlq.worker") == Some(worker.as_str())
            })
            .collect();
        for r in &found {
            matched.insert((r.topic.clone(), r.partition, r.offset));
        }
        let Some(r) = found.first() else {
            let effects = saga.effects(cases[*i].order_id(&codec).as_deref(), None);
            failures.push(format!(
                "{name} ({} on {}[{}]@{}): no dead letter from {worker} on {dlq_topic} (expected class {class}){}",
                cases[*i].why,
                s.topic,
                s.partition,
                s.offset,
                if effects.is_empty() { String::new() } else { format!("; it was processed instead: {}", effects.join(", ")) }
            ));
            continue;
        };
        if found.len() > 1 {
            failures.push(format!("{name}: {} dead letters from {worker} (expected one)", found.len()));
        }
        if r.topic != *dlq_topic {
            failures.push(format!("{name}: {worker} dead-lettered to {} (expected {dlq_topic})", r.topic));
        }
        let got = r.header("orderflow.dlq.error-class").unwrap_or("<none>");
        if got != class {
            failures.push(format!(
                "{name}: {worker} dead-lettered with class {got} (expected {class}): {}",
                r.header("orderflow.dlq.error-message").unwrap_or("<no message>")
            ));
        }
        for h in ["orderflow.dlq.error-message", "orderflow.dlq.attempts", "orderflow.dlq.time"] {
            if r.header(h).is_none_or(str::is_empty) {
                failures.push(format!("{name}: dead letter from {worker} lacks header {h}"));
            }
        }
        if r.header("orderflow.dlq.attempts").and_then(|a| a.parse::<u32>().ok()).is_none_or(|a| a < 1) {
            failures.push(format!("{name}: dead letter from {worker}: attempts header {:?}", r.header("orderflow.dlq.attempts")));
        }
        if r.value.as_deref().unwrap_or_default() != s.value.as_deref().unwrap_or_default() || r.value.is_some() != s.value.is_some() {
            failures.push(format!("{name}: dead letter from {worker} does not carry the original value"));
        }
        if r.key.as_deref().unwrap_or_default() != s.key.as_deref().unwrap_or_default().as_bytes() {
            failures.push(format!(
                "{name}: dead letter from {worker} has key {:?} (original {:?})",
                r.key.as_deref().map(String::from_utf8_lossy),
                s.key
            ));
        }
        // Dead-lettered means no effect downstream.
        let event_id = s.value.as_deref().and_then(|v| codec.decode_local(v).ok()).map(|e| e.event_id().to_string());
        let effects = saga.effects(cases[*i].order_id(&codec).filter(|o| !o.is_empty()).as_deref(), event_id.as_deref());
        if !effects.is_empty() {
            failures.push(format!("{name}: dead-lettered by {worker} but also processed: {}", effects.join(", ")));
        }
    }
    // Bad payments of live reservations: dead-lettered once by the stock reserver from
    // stock.commands (matched by dead-letter topic, worker, class and value: the source offset
    // is the forwarded copy's), nothing derived from them, their orders sold by the good payment.
    let reserver = "stock-reserver";
    for (order_id, &i) in &payment_case {
        let c = &cases[i];
        let name = &c.name;
        let Expect::PaymentRejected { class, dead_letter_topic } = &c.expect else { unreachable!() };
        let k = c.payment_of().expect("payment case");
        let Some(s) = sent.iter().find(|s| s.what == *name) else {
            failures.push(format!("{name} ({}): never sent: {order_id} was not confirmed", c.why));
            continue;
        };
        let value = s.value.as_deref().expect("payment cases have a value");
        let Ok(Event::OrderCompleted(bad)) = codec.decode_local(value) else { panic!("{name}: not an OrderCompleted") };
        if *dead_letter_topic != t.dead_letter_of("stock.commands") {
            failures.push(format!(
                "{name}: expects {dead_letter_topic}, but stock.commands dead-letters to {}",
                t.dead_letter_of("stock.commands")
            ));
        }
        let same_value: Vec<&&Rec> = dlq_records.iter().filter(|r| r.value.as_deref() == Some(value)).collect();
        for r in &same_value {
            matched.insert((r.topic.clone(), r.partition, r.offset));
        }
        let found: Vec<&&Rec> = same_value
            .iter()
            .copied()
            .filter(|r| {
                r.topic == *dead_letter_topic
                    && r.header("orderflow.dlq.worker") == Some(reserver)
                    && r.header("orderflow.dlq.error-class") == Some(class.as_str())
            })
            .collect();
        let describe = |rs: &[&&Rec]| -> String {
            rs.iter()
                .map(|r| {
                    format!(
                        "{} from {} (source {}, class {}: {})",
                        r.topic,
                        r.header("orderflow.dlq.worker").unwrap_or("<no worker>"),
                        r.header("orderflow.dlq.source-topic").unwrap_or("?"),
                        r.header("orderflow.dlq.error-class").unwrap_or("<none>"),
                        r.header("orderflow.dlq.error-message").unwrap_or("<no message>")
                    )
                })
                .collect::<Vec<_>>()
                .join("; ")
        };
        if found.len() != 1 || same_value.len() != 1 {
            failures.push(format!(
                "{name} ({}): {} dead letter(s) on {dead_letter_topic} by {reserver}, class {class} (expected one); all of its value: [{}]",
                c.why,
                found.len(),
                describe(&same_value)
            ));
        }
        if let Some(r) = found.first() {
            if r.header("orderflow.dlq.source-topic") != Some("stock.commands") {
                failures.push(format!(
                    "{name}: dead letter's source topic {:?} (expected stock.commands)",
                    r.header("orderflow.dlq.source-topic")
                ));
            }
            if r.key.as_deref() != Some(store_key(HQ, STORE).as_bytes()) {
                failures.push(format!(
                    "{name}: dead letter has key {:?} (expected the store key of stock.commands, {:?})",
                    r.key.as_deref().map(String::from_utf8_lossy),
                    store_key(HQ, STORE)
                ));
            }
            for h in ["orderflow.dlq.error-message", "orderflow.dlq.attempts", "orderflow.dlq.time"] {
                if r.header(h).is_none_or(str::is_empty) {
                    failures.push(format!("{name}: dead letter lacks header {h}"));
                }
            }
            let message = r.header("orderflow.dlq.error-message").unwrap_or_default();
            let order = good_order(k, 0);
            match payment_fault(&bad, &order, &good_reservation_id(k)) {
                None => failures.push(format!("{name}: the case is a valid payment of {order_id}")),
                Some(words) => {
                    let missing: Vec<&String> = words.iter().filter(|w| !message.contains(w.as_str())).collect();
                    if !missing.is_empty() {
                        failures.push(format!("{name}: error message {message:?} does not mention {missing:?}"));
                    }
                }
            }
        }
        // Nothing from it but the deduplicator's forward (the record dead-lettered).
        let effects = saga.effects(None, Some(&bad.event_id));
        let forwards = effects.iter().filter(|e| *e == "OrderCompleted on stock.commands").count();
        let others: Vec<&String> = effects.iter().filter(|e| *e != "OrderCompleted on stock.commands").collect();
        if forwards != 1 || !others.is_empty() {
            failures.push(format!(
                "{name}: records carrying its eventId {}: {effects:?} (expected only its forward to stock.commands)",
                bad.event_id
            ));
        }
        let derived = saga.derived_from(&bad.event_id);
        if !derived.is_empty() {
            failures.push(format!("{name}: dead-lettered but processed: derived from it: {}", derived.join(", ")));
        }
        // The order then sold by its good payment, whole, once.
        failures.extend(saga.sold_whole_once(name, &good_order(k, 0)));
        let released: Vec<String> = saga
            .events
            .iter()
            .filter_map(|(t, e)| match e {
                Event::StockReservationReleased(r) if *t == "stock.reservation.released" && r.order_id == *order_id => {
                    Some(r.reason.clone())
                }
                _ => None,
            })
            .collect();
        if !released.is_empty() {
            failures.push(format!("{name}: {order_id} had releases {released:?} (expected none: the good payment sells it whole)"));
        }
    }

    // Misrouted records: never dead-lettered; forwarded once, re-keyed from the event, by every
    // worker reading their topic (the deduplicator); then processed like any good record.
    let mut misrouted_want: BTreeMap<Vec<String>, u64> = BTreeMap::new();
    for (i, e) in &misrouted {
        let c = &cases[*i];
        let name = &c.name;
        let Expect::Misrouted(reason) = &c.expect else { unreachable!() };
        let s = case_sent(*i);
        let dead: Vec<&&Rec> = dlq_records.iter().filter(|r| r.value == s.value).collect();
        for r in &dead {
            matched.insert((r.topic.clone(), r.partition, r.offset));
            failures.push(format!(
                "{name} ({}): dead-lettered to {} by {}, class {}: {}",
                c.why,
                r.topic,
                r.header("orderflow.dlq.worker").unwrap_or("<no worker>"),
                r.header("orderflow.dlq.error-class").unwrap_or("<none>"),
                r.header("orderflow.dlq.error-message").unwrap_or("<no message>")
            ));
        }
        let readers = readers(&c.topic);
        if readers.is_empty() {
            failures.push(format!("{name}: no worker of the topology reads {}", c.topic));
        }
        for w in &readers {
            *misrouted_want.entry(vec![w.clone(), c.topic.clone(), reason.clone()]).or_default() += 1;
            // Its copies on the reader's outputs that carry its schema, keyed from the event.
            let forwarded_to: Vec<&String> = t.workers[w]
                .outputs
                .values()
                .filter(|o| t.topics.get(*o).and_then(|spec| spec.schema.as_ref()).is_some_and(|sc| sc.names().contains(&e.schema_name())))
                .collect();
            if forwarded_to.is_empty() {
                failures.push(format!("{name}: {w} writes no topic carrying {} (topology)", e.schema_name()));
            }
            for topic in forwarded_to {
                let spec = &t.topics[topic];
                let copies: Vec<&Rec> = io
                    .records
                    .iter()
                    .filter(|r| {
                        r.topic == *topic
                            && r.value.as_deref().and_then(|v| codec.decode_local(v).ok()).is_some_and(|f| f.event_id() == e.event_id())
                    })
                    .collect();
                if copies.len() != 1 {
                    failures.push(format!("{name} ({}): {} cop(ies) on {topic} (expected one, forwarded by {w})", c.why, copies.len()));
                }
                let key = match spec.key.as_str() {
                    "orderId" => e.order_id().map(str::to_string),
                    "hqId:storeId" => Some(e.store_key()),
                    _ => None,
                };
                let Some(key) = key else { continue };
                let partition = partitioner::partition_for(key.as_bytes(), spec.partitions);
                for r in copies {
                    if r.key.as_deref() != Some(key.as_bytes()) || r.partition != partition {
                        failures.push(format!(
                            "{name}: its copy on {topic} has key {:?} on partition {} (expected {} {key:?} on partition {partition})",
                            r.key.as_deref().map(String::from_utf8_lossy),
                            r.partition,
                            spec.key
                        ));
                    }
                }
            }
        }
        match e {
            Event::OrderCreated(o) => {
                let order_id = &o.order_id;
                let distinct = |topic: &str| -> usize {
                    saga.events
                        .iter()
                        .filter(|(t, f)| *t == topic && f.order_id() == Some(order_id))
                        .map(|(_, f)| f.event_id())
                        .collect::<BTreeSet<_>>()
                        .len()
                };
                for topic in ["stock.reserved", "order.confirmed"] {
                    let n = distinct(topic);
                    if n != 1 {
                        failures.push(format!("{name} ({}): {n} {topic} of {order_id} (expected one)", c.why));
                    }
                }
                let outcomes = saga.outcomes(order_id);
                if outcomes != ["ORDER_COMPLETED"] {
                    failures.push(format!("{name}: outcomes of {order_id} {outcomes:?} (expected exactly [ORDER_COMPLETED])"));
                }
                if !saga.failures(order_id).is_empty() {
                    failures.push(format!("{name}: stock.reservation.failed of {order_id}: {:?}", saga.failures(order_id)));
                }
                failures.extend(saga.sold_whole_once(name, o));
                if distinct("stock.reservation.released") != 0 {
                    failures.push(format!("{name}: {order_id} had releases (expected none: sold whole)"));
                }
            }
            Event::InventoryAdjusted(a) => {
                for item in &a.items {
                    let id = derive_event_id(&a.event_id, &format!("stock.updated/{}", item.product_id));
                    let updates: BTreeMap<&str, &orderflow_api::events::StockUpdated> = saga
                        .events
                        .iter()
                        .filter_map(|(t, f)| match f {
                            Event::StockUpdated(u) if *t == "stock.updated" && u.event_id == id => Some((u.event_id.as_str(), u)),
                            _ => None,
                        })
                        .collect();
                    match updates.values().collect::<Vec<_>>().as_slice() {
                        [u] if u.product_id == item.product_id
                            && u.change_amount == item.delta
                            && u.store_stock.current - u.store_stock.previous == item.delta
                            && u.change_reason == a.adjustment_type
                            && u.reference_id == a.reference_id => {}
                        other => failures.push(format!(
                            "{name} ({}): stock.updated of {} from it: {other:?} (expected one, {} {:+})",
                            c.why, item.product_id, a.adjustment_type, item.delta
                        )),
                    }
                }
                // The stock hierarchy's ledger entry (store → HQ, issue 16) is the step between
                // the restock and its stock.updated, not an output of its own.
                let derived: BTreeSet<String> =
                    saga.derived_from(&a.event_id).into_iter().filter(|d| !d.starts_with("StockLedgerEntry ")).collect();
                if derived.len() != a.items.len() {
                    failures.push(format!("{name}: derived from it: {derived:?} (expected one stock.updated per item)"));
                }
            }
            other => failures.push(format!("{name}: the run does not check a misrouted {}", other.schema_name())),
        }
    }

    // Unexpected dead letters.
    for r in &dlq_records {
        if !matched.contains(&(r.topic.clone(), r.partition, r.offset)) {
            failures.push(format!(
                "unexpected dead letter on {} from {} of {}: class {}, {}",
                r.topic,
                r.header("orderflow.dlq.worker").unwrap_or("<no worker>"),
                describe_source(
                    r.header("orderflow.dlq.source-topic").unwrap_or("?"),
                    r.header("orderflow.dlq.source-partition").unwrap_or("?"),
                    r.header("orderflow.dlq.source-offset").unwrap_or("?")
                ),
                r.header("orderflow.dlq.error-class").unwrap_or("<none>"),
                r.header("orderflow.dlq.error-message").unwrap_or("<no message>")
            ));
        }
    }

    // 2. Orders with invalid content: answered, cancelled INVALID_ORDER, nothing reserved.
    for (i, order_id) in &rejected {
        let Expect::Rejected(reason) = &cases[*i].expect else { unreachable!() };
        let name = &cases[*i].name;
        let failed = saga.failures(order_id);
        let reasons: Vec<&String> = failed.values().collect();
        if reasons != vec![reason] {
            failures
                .push(format!("{name} ({}): stock.reservation.failed reasons {reasons:?} (expected exactly [{reason}])", cases[*i].why));
        }
        let cancelled = saga.cancellations(order_id);
        let reasons: Vec<&String> = cancelled.values().collect();
        if reasons != vec![cancel_reason::INVALID_ORDER] {
            failures.push(format!("{name}: order.cancelled reasons {reasons:?} (expected exactly [INVALID_ORDER])"));
        }
        if saga.events.iter().any(|(t, e)| *t == "stock.reserved" && matches!(e, Event::StockReserved(r) if &r.order_id == order_id)) {
            failures.push(format!("{name}: stock was reserved for it"));
        }
    }

    // 3. Good orders: exactly one terminal outcome each.
    let mut by_outcome: BTreeMap<String, usize> = BTreeMap::new();
    for o in &good_ids {
        let outcomes = saga.outcomes(o);
        match outcomes.as_slice() {
            [one] => *by_outcome.entry(one.clone()).or_default() += 1,
            [] => failures.push(format!("good order {o}: no terminal outcome")),
            several => failures.push(format!("good order {o}: several terminal outcomes {several:?}")),
        }
        if !saga.failures(o).values().all(|r| r == failure_reason::INSUFFICIENT_STOCK) {
            failures.push(format!("good order {o}: reservation failed with {:?}", saga.failures(o)));
        }
    }
    println!("bad input: good orders by outcome {by_outcome:?}");

    // 4. No eventId with two payloads.
    let mut payloads: BTreeMap<String, BTreeSet<Vec<u8>>> = BTreeMap::new();
    for r in io.records.iter().filter(|r| !dead_letter_topics.contains_key(&r.topic) && !r.topic.starts_with("orderflow-")) {
        if let Some(Ok(e)) = r.value.as_deref().map(|v| codec.decode_local(v)) {
            payloads.entry(e.event_id().to_string()).or_default().insert(r.value.clone().unwrap());
        }
    }
    for (id, p) in &payloads {
        if p.len() > 1 {
            failures.push(format!("eventId {id:?} carries {} different payloads", p.len()));
        }
    }

    // 5. Stock of the store: initial = on hand + sold, reservations all settled, nothing negative.
    let mut initial: BTreeMap<&str, i64> = restocked.iter().copied().collect();
    for (_, e) in &misrouted {
        if let Event::InventoryAdjusted(a) = e {
            for item in &a.items {
                *initial.entry(item.product_id.as_str()).or_default() += item.delta;
            }
        }
    }
    for (&product, &initial) in &initial {
        let mut on_hand = None;
        let (mut sold, mut reserved, mut released) = (0i64, 0i64, 0i64);
        // Each event read from its own topic only (a misplaced one is a bad record, not stock).
        for (t, e) in &saga.events {
            match (*t, e) {
                ("stock.updated", Event::StockUpdated(u)) if u.hq_id == HQ && u.store_id == STORE && u.product_id == product => {
                    on_hand = Some(u.store_stock.current);
                    if u.store_stock.current < 0 {
                        failures.push(format!("{product}: on hand {} < 0 ({})", u.store_stock.current, u.event_id));
                    }
                    if u.change_reason == change_reason::SALE {
                        sold += -u.change_amount;
                    }
                }
                ("stock.reserved", Event::StockReserved(r)) if r.hq_id == HQ && r.store_id == STORE => {
                    reserved += r.items.iter().filter(|i| i.product_id == product).map(|i| i64::from(i.reserved)).sum::<i64>()
                }
                ("stock.reservation.released", Event::StockReservationReleased(r)) if r.hq_id == HQ && r.store_id == STORE => {
                    released += r.items.iter().filter(|i| i.product_id == product).map(|i| i64::from(i.released)).sum::<i64>()
                }
                _ => {}
            }
        }
        let on_hand = on_hand.unwrap_or(initial);
        if initial != on_hand + sold {
            failures.push(format!("{product}: initial {initial} ≠ on hand {on_hand} + sold {sold}"));
        }
        if reserved - released - sold != 0 {
            failures.push(format!("{product}: reserved {reserved} − released {released} − sold {sold} ≠ 0 (reservations left open)"));
        }
    }

    // 6. The workers stayed up, and counted each dead letter by class.
    let alive = workers.try_wait().is_none();
    if !alive {
        failures.push(format!("the workers' process exited: {:?}", workers.try_wait()));
    }
    let exits: Vec<String> = common::log_lines(&log)
        .iter()
        .filter(|l| common::is_error(l) || common::message(l).contains("worker failed"))
        .map(|l| format!("{} {}", common::message(l), common::field(l, "error").map(|e| e.to_string()).unwrap_or_default()))
        .collect();
    if !exits.is_empty() {
        failures.push(format!("ERROR lines in the workers' log: {exits:?}"));
    }
    // The first misrouted record of each topic and reason is logged.
    let warned: BTreeSet<(String, String)> = common::log_lines(&log)
        .iter()
        .filter(|l| common::message(l).contains("orderflow_misrouted_records_total"))
        .filter_map(|l| {
            let get = |f: &str| common::field(l, f).and_then(serde_json::Value::as_str).map(str::to_string);
            Some((get("topic")?, get("reason")?))
        })
        .collect();
    let want_warned: BTreeSet<(String, String)> = misrouted_want.keys().map(|k| (k[1].clone(), k[2].clone())).collect();
    if warned != want_warned {
        failures.push(format!("misrouted records logged for (topic, reason) {warned:?} (expected {want_warned:?})"));
    }
    if alive {
        let mut want: BTreeMap<Vec<String>, u64> = BTreeMap::new();
        for (_, _, worker, class) in &expected_dlq {
            *want.entry(vec![worker.clone(), class.clone()]).or_default() += 1;
        }
        for &i in payment_case.values() {
            if let Expect::PaymentRejected { class, .. } = &cases[i].expect {
                *want.entry(vec!["stock-reserver".to_string(), class.clone()]).or_default() += 1;
            }
        }
        let body = match http_get(port, "/metrics") {
            Some((200, body)) => body,
            other => {
                failures.push(format!("GET /metrics: {other:?}"));
                String::new()
            }
        };
        let dlq_labels = ["worker", "error_class"];
        check_counter(
            "orderflow_dlq_records_total",
            &dlq_labels,
            &want,
            &counter(&body, "orderflow_dlq_records_total", &dlq_labels),
            &mut failures,
        );
        let misrouted_labels = ["worker", "topic", "reason"];
        check_counter(
            "orderflow_misrouted_records_total",
            &misrouted_labels,
            &misrouted_want,
            &counter(&body, "orderflow_misrouted_records_total", &misrouted_labels),
            &mut failures,
        );
        let (status, took) = workers.terminate(Duration::from_secs(40));
        match status {
            Some(s) if s.success() => println!("bad input: workers stopped cleanly in {:.1}s", took.as_secs_f64()),
            other => failures.push(format!("workers did not stop cleanly after SIGTERM: {other:?}")),
        }
    }

    println!(
        "bad input: {} records read back, {} dead letters ({} expected), {} failure(s), {:.1}s",
        io.records.len(),
        dlq_records.len(),
        expected_dlq.len() + payment_case.len(),
        failures.len(),
        started.elapsed().as_secs_f64()
    );
    if !failures.is_empty() {
        panic!("{} expectation(s) failed:\n  - {}\nworkers' log: {}", failures.len(), failures.join("\n  - "), log.display());
    }
}
