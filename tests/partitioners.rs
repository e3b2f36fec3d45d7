//! Issue 19 on a real broker: outside producers that partition otherwise than orderflow never
//! make the workers mis-join an order's events.
//!
//! orderflow's producers use librdkafka's `murmur2_random` partitioner (the Java client's
//! default); a producer on another librdkafka client keeps its default, `consistent_random`
//! (CRC32), which puts most keys on another partition. Here the saga is fed only by outside
//! producers of the test's own, one of each partitioner: a restock, then orders split between
//! the two, then the POS's payments and `PAYMENT_FAILED` cancellations (all `consistent_random`,
//! so an order created through `murmur2_random` is paid on another partition than it was
//! created on). The rest of the orders are left to expire at a 15 s reservation TTL. Every
//! worker of `topology.toml` runs in one process.
//!
//! From its own reading of the topics, the test checks that every order still ends as its
//! events say: a paid order is sold once (one `SALE` `stock.updated`) and never expired or
//! cancelled; a POS-cancelled order is cancelled only by the POS; an unpaid order is expired
//! once and cancelled once with `RESERVATION_EXPIRED`; no order with a stock answer times out.
//! And it checks that the deduplicator counted, per external topic, exactly the records the test
//! knows it sent to a partition other than orderflow's
//! (`orderflow_misrouted_records_total{reason="partition"}`).
//!
//! `ORDERFLOW_KEEP_PARTITIONERS_DIR=1` keeps the workers' log and state (kept, with the path
//! printed, whenever the test fails).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use common::{metric, wait_for, Guarded, Kafka, RunDir};
use orderflow_api::events::{
    cancel_reason, change_reason, settlement, AdjustedItem, InventoryAdjusted, OrderCancelled, OrderCompleted, OrderCreated, OrderItem,
    SoldItem, StockReserved,
};
use orderflow_api::Event;
use orderflow_runtime::kafka::{client_config, Side};
use orderflow_runtime::partitioner::partition_for;
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;

/// Partitions of every topic of `topology.toml`.
const PARTITIONS: i32 = 6;
/// Orders of the first wave; one more, left to expire, follows the POS's answers.
const ORDERS: usize = 60;
/// The reservation TTL the workers run with (5 minutes in production).
const TTL: Duration = Duration::from_secs(15);
/// A payment or POS cancellation must be sent at least this long before the reservation
/// expires, or the test (not the saga) was too slow and a payment could meet its expiry.
const ANSWER_MARGIN: Duration = Duration::from_secs(5);
const HQ: &str = "HQ-P19";
const STORE: &str = "ST-P19";
const PRODUCT: &str = "P-1";
const UNIT_PRICE: i64 = 1000;
/// The external topics, which only the deduplicator reads.
const EXTERNAL: &[&str] = &["order.created", "order.completed", "order.cancelled", "inventory.adjusted"];
const STEP_WITHIN: Duration = Duration::from_secs(90);
const POLL: Duration = Duration::from_millis(300);

// ------------------------------------------------------------------------------------------
// The outside producers.

/// The partitioner of an outside producer (librdkafka's `partitioner` property).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Partitioner {
    /// librdkafka's default (CRC32): Python, Go, .NET, Node, C/C++ clients.
    ConsistentRandom,
    /// orderflow's own (murmur2, the Java client's default).
    Murmur2Random,
}

impl Partitioner {
    fn property(self) -> &'static str {
        match self {
            Partitioner::ConsistentRandom => "consistent_random",
            Partitioner::Murmur2Random => "murmur2_random",
        }
    }
}

/// One record the test sent: where it landed, and where orderflow's partitioner puts its key.
struct Sent {
    topic: &'static str,
    via: Partitioner,
    partition: i32,
    expected: i32,
}

/// Two idempotent producers with the runtime's settings but their own `partitioner`, and every
/// record they sent.
struct Outside<'a> {
    k: &'a Kafka,
    producers: BTreeMap<Partitioner, FutureProducer>,
    sent: Vec<Sent>,
}

impl<'a> Outside<'a> {
    fn new(k: &'a Kafka) -> Outside<'a> {
        let _guard = k.rt.enter();
        let producers = [Partitioner::ConsistentRandom, Partitioner::Murmur2Random]
            .into_iter()
            .map(|p| {
                let mut config = client_config(&k.broker, Side::Producer);
                config.set("partitioner", p.property());
                (p, config.create().expect("outside producer"))
            })
            .collect();
        Outside { k, producers, sent: Vec::new() }
    }

    /// Sends `event` to `topic` with record key `key` through the `via` producer, records the
    /// partition the broker acknowledged and returns it.
    fn send(&mut self, via: Partitioner, topic: &'static str, key: &str, event: Event) -> i32 {
        let bytes = self.k.codec.encode_local(&event).expect("event encodes");
        let record = FutureRecord::to(topic).key(key).payload(&bytes);
        let delivery = self
            .k
            .rt
            .block_on(self.producers[&via].send(record, Timeout::After(Duration::from_secs(30))))
            .unwrap_or_else(|(e, _)| panic!("producing {} to {topic}: {e}", event.event_id()));
        let expected = partition_for(key.as_bytes(), PARTITIONS);
        self.sent.push(Sent { topic, via, partition: delivery.partition, expected });
        delivery.partition
    }

    /// Per topic: records sent to another partition than orderflow's partitioner gives their key.
    fn misrouted(&self) -> BTreeMap<&'static str, u64> {
        let mut n: BTreeMap<&'static str, u64> = EXTERNAL.iter().map(|t| (*t, 0)).collect();
        for s in self.sent.iter().filter(|s| s.partition != s.expected) {
            *n.entry(s.topic).or_default() += 1;
        }
        n
    }

    /// How many records of `topic` went through `via`, and how many of them were misrouted.
    fn count(&self, topic: &str, via: Partitioner) -> (usize, usize) {
        let of: Vec<&Sent> = self.sent.iter().filter(|s| s.topic == topic && s.via == via).collect();
        (of.len(), of.iter().filter(|s| s.partition != s.expected).count())
    }
}

// ------------------------------------------------------------------------------------------
// The orders and the POS.

/// What the POS does with an order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// `order.completed` once reserved.
    Pay,
    /// `order.cancelled` `PAYMENT_FAILED` once reserved.
    PosCancel,
    /// Nothing: the reservation expires.
    Expire,
}

struct Planned {
    via: Partitioner,
    fate: Fate,
    quantity: i32,
    /// The partition its `order.created` landed on.
    sent_to: i32,
}

/// Order `i` of the first wave: producers alternate, so each fate has orders of both; per 10
/// consecutive pairs, 5 are paid, 1 POS-cancelled and 4 left to expire.
fn plan(i: usize) -> (String, Planned) {
    let via = match i % 2 {
        0 => Partitioner::ConsistentRandom, // MSRV 1.85: no is_multiple_of
        _ => Partitioner::Murmur2Random,
    };
    let fate = match (i / 2) % 10 {
        0..=4 => Fate::Pay,
        5 => Fate::PosCancel,
        _ => Fate::Expire,
    };
    (format!("O-P19-{i:03}"), Planned { via, fate, quantity: 1 + (i % 3) as i32, sent_to: -1 })
}

fn restock(units: i64) -> Event {
    InventoryAdjusted {
        event_id: "restock-p19".into(),
        occurred_at: common::now_ms(),
        hq_id: HQ.into(),
        store_id: STORE.into(),
        adjustment_type: "RESTOCK".into(),
        reference_id: "ref-restock-p19".into(),
        items: vec![AdjustedItem { product_id: PRODUCT.into(), delta: units }],
        to_store_id: None,
        reason: None,
        operator: None,
    }
    .into()
}

fn order_created(order_id: &str, quantity: i32) -> Event {
    OrderCreated {
        event_id: format!("created-{order_id}"),
        occurred_at: common::now_ms(),
        order_id: order_id.into(),
        customer_id: "C-P19".into(),
        hq_id: HQ.into(),
        store_id: STORE.into(),
        items: vec![OrderItem { product_id: PRODUCT.into(), quantity, unit_price: UNIT_PRICE }],
    }
    .into()
}

/// The POS's answer to a reserved order: a payment or a `PAYMENT_FAILED` cancellation (`None`
/// for an order left to expire).
fn pos_answer(r: &StockReserved, planned: &Planned) -> Option<(&'static str, Event)> {
    match planned.fate {
        Fate::Pay => Some((
            "order.completed",
            OrderCompleted {
                event_id: format!("completed-{}", r.order_id),
                occurred_at: common::now_ms(),
                order_id: r.order_id.clone(),
                reservation_id: r.reservation_id.clone(),
                hq_id: HQ.into(),
                store_id: STORE.into(),
                items: vec![SoldItem { product_id: PRODUCT.into(), quantity: planned.quantity, actual_price: UNIT_PRICE }],
                total_amount: UNIT_PRICE * i64::from(planned.quantity),
            }
            .into(),
        )),
        Fate::PosCancel => Some((
            "order.cancelled",
            OrderCancelled {
                event_id: format!("pos-payment-failed-{}", r.order_id),
                occurred_at: common::now_ms(),
                order_id: r.order_id.clone(),
                hq_id: HQ.into(),
                store_id: STORE.into(),
                reason: cancel_reason::PAYMENT_FAILED.into(),
                reservation_id: Some(r.reservation_id.clone()),
                customer_message: canceller::customer_message(cancel_reason::PAYMENT_FAILED).into(),
                refund_required: false,
                customer_id: None,
            }
            .into(),
        )),
        Fate::Expire => None,
    }
}

// ------------------------------------------------------------------------------------------
// Reading the topics.

/// The events of `topic`, each eventId once (its first record). Panics on a record that does not
/// decode.
fn events(k: &Kafka, topic: &str) -> Vec<Event> {
    let mut seen = BTreeSet::new();
    common::read_topic(&k.broker, topic, PARTITIONS)
        .iter()
        .map(|m| k.codec.decode_local(m.payload().unwrap_or_default()).unwrap_or_else(|e| panic!("a record of {topic}: {e}")))
        .filter(|e| seen.insert(e.event_id().to_string()))
        .collect()
}

/// The reservations on `stock.reserved`, by order.
fn reservations(k: &Kafka) -> BTreeMap<String, StockReserved> {
    events(k, "stock.reserved")
        .into_iter()
        .filter_map(|e| match e {
            Event::StockReserved(r) => Some((r.order_id.clone(), r)),
            _ => None,
        })
        .collect()
}

/// The orders with a `stock.reservation.expired`.
fn expired_orders(k: &Kafka) -> BTreeSet<String> {
    events(k, "stock.reservation.expired").iter().filter_map(|e| e.order_id().map(str::to_string)).collect()
}

/// What the topics say happened to one order.
#[derive(Debug, Default)]
struct Seen {
    created: usize,
    reserved: usize,
    failed: usize,
    expired: usize,
    /// Reasons of its `order.cancelled` events.
    cancelled: Vec<String>,
    /// Outcomes of its `order.settled` verdicts.
    settled: Vec<String>,
    /// `changeAmount` of its `SALE` `stock.updated` records.
    sales: Vec<i64>,
}

fn seen_per_order(k: &Kafka) -> BTreeMap<String, Seen> {
    let mut seen: BTreeMap<String, Seen> = BTreeMap::new();
    let topics =
        ["order.created", "stock.reserved", "stock.reservation.failed", "stock.reservation.expired", "order.cancelled", "order.settled"];
    for topic in topics {
        for e in events(k, topic) {
            let Some(id) = e.order_id() else { continue };
            let o = seen.entry(id.to_string()).or_default();
            match &e {
                Event::OrderCreated(_) => o.created += 1,
                Event::StockReserved(_) => o.reserved += 1,
                Event::StockReservationFailed(_) => o.failed += 1,
                Event::StockReservationExpired(_) => o.expired += 1,
                Event::OrderCancelled(c) => o.cancelled.push(c.reason.clone()),
                Event::OrderSettled(s) => o.settled.push(s.outcome.clone()),
                _ => {}
            }
        }
    }
    for e in events(k, "stock.updated") {
        if let Event::StockUpdated(u) = e {
            if u.change_reason == change_reason::SALE {
                seen.entry(u.reference_id.clone()).or_default().sales.push(u.change_amount);
            }
        }
    }
    seen
}

/// What is wrong with order `id` (planned `p`) as the topics tell it (`o`).
fn order_problems(id: &str, p: &Planned, o: &Seen) -> Vec<String> {
    let mut broken = Vec::new();
    let mut expect = |ok: bool, what: &str| {
        if !ok {
            let theirs = partition_for(id.as_bytes(), PARTITIONS);
            let how = format!("{:?}, created via {} on partition {} (orderflow's: {theirs})", p.fate, p.via.property(), p.sent_to);
            broken.push(format!("{id} ({how}): {what}; seen {o:?}"));
        }
    };
    expect(o.created == 1, "not exactly one order.created");
    expect(o.reserved == 1 && o.failed == 0, "not exactly one stock answer, a reservation");
    let timed_out = o.cancelled.iter().any(|r| r == cancel_reason::SAGA_TIMEOUT);
    expect(!(timed_out && o.reserved + o.failed > 0), "cancelled with SAGA_TIMEOUT although its stock answer exists");
    match p.fate {
        Fate::Pay => {
            expect(o.expired == 0, "paid, but its reservation expired");
            expect(o.cancelled.is_empty(), "paid, but cancelled");
            expect(o.settled == [settlement::SOLD], "paid, but not settled SOLD exactly once");
            expect(o.sales == [-i64::from(p.quantity)], "paid, but not exactly one SALE of its quantity");
        }
        Fate::PosCancel => {
            expect(o.expired == 0, "cancelled by the POS, but its reservation expired");
            expect(o.cancelled == [cancel_reason::PAYMENT_FAILED], "not cancelled by the POS alone");
            expect(o.settled.is_empty() && o.sales.is_empty(), "cancelled by the POS, but settled or sold");
        }
        Fate::Expire => {
            expect(o.expired == 1, "unpaid, but not expired exactly once");
            expect(o.cancelled == [cancel_reason::RESERVATION_EXPIRED], "unpaid, but not cancelled exactly once with RESERVATION_EXPIRED");
            expect(o.settled.is_empty() && o.sales.is_empty(), "unpaid, but settled or sold");
        }
    }
    broken
}

/// `orderflow_misrouted_records_total{worker="deduplicator",topic,reason}` per external topic.
fn misrouted_counted(port: u16, reason: &str) -> BTreeMap<&'static str, u64> {
    EXTERNAL
        .iter()
        .map(|t| {
            let labels = [("worker", "deduplicator"), ("topic", *t), ("reason", reason)];
            (*t, metric(port, "orderflow_misrouted_records_total", &labels) as u64)
        })
        .collect()
}

fn wait_ready(port: u16, log: &Path, workers: &mut Guarded) {
    wait_for("ready workers", log, workers, STEP_WITHIN, Duration::from_millis(100), || {
        matches!(common::http_get(port, "/readyz"), Some((200, _))).then_some(())
    });
}

// ------------------------------------------------------------------------------------------

#[test]
fn outside_producers_partitioning_otherwise_never_mis_join() {
    let started = Instant::now();
    let broker = common::Broker::start();
    let run_dir = RunDir::create("orderflow-partitioners-", "ORDERFLOW_KEEP_PARTITIONERS_DIR", "partitioners: log and state");
    common::create_topics(&common::repo_root().join("topology.toml"), &broker.bootstrap);
    let k = Kafka::new(&broker.bootstrap);
    let port = common::free_port();
    let ttl = format!("{}s", TTL.as_secs());
    let (mut workers, log) = common::spawn_workers(&broker.bootstrap, run_dir.path(), port, "p19", &["--reservation-ttl", &ttl]);
    wait_ready(port, &log, &mut workers);
    let mut outside = Outside::new(&k);

    // 1. A restock through consistent_random, on the store's command stream before any order.
    outside.send(Partitioner::ConsistentRandom, "inventory.adjusted", &format!("{HQ}:{STORE}"), restock(10_000));
    wait_for("the restock on stock.commands", &log, &mut workers, STEP_WITHIN, POLL, || {
        events(&k, "stock.commands").iter().any(|e| matches!(e, Event::InventoryAdjusted(_))).then_some(())
    });

    // 2. The orders, alternating between the two producers.
    let mut plans: BTreeMap<String, Planned> = BTreeMap::new();
    for i in 0..ORDERS {
        let (id, mut p) = plan(i);
        p.sent_to = outside.send(p.via, "order.created", &id, order_created(&id, p.quantity));
        plans.insert(id, p);
    }

    // 3. The POS answers each order once it is reserved, through consistent_random.
    let mut answered = BTreeSet::new();
    let mut pos = |outside: &mut Outside, plans: &BTreeMap<String, Planned>| {
        let reserved = reservations(&k);
        for (id, r) in &reserved {
            let Some(p) = plans.get(id).filter(|_| !answered.contains(id)) else { continue };
            let left = r.expires_at - common::now_ms();
            assert!(
                left > ANSWER_MARGIN.as_millis() as i64,
                "{id} answered {left} ms before its expiry: the test is too slow for the {TTL:?} TTL"
            );
            if let Some((topic, event)) = pos_answer(r, p) {
                outside.send(Partitioner::ConsistentRandom, topic, id, event);
            }
            answered.insert(id.clone());
        }
        (answered.len() == plans.len()).then_some(reserved)
    };
    wait_for("every order reserved and answered", &log, &mut workers, STEP_WITHIN, POLL, || {
        let failed = events(&k, "stock.reservation.failed");
        assert!(failed.is_empty(), "stock answers that are failures: {failed:?}");
        pos(&mut outside, &plans)
    });

    // 4. A last order, left to expire: reserved after every other order was answered, its expiry
    //    is the positive marker that the expirer's clock passed every other reservation's deadline.
    let last = "O-P19-LAST".to_string();
    let sent_to = outside.send(Partitioner::ConsistentRandom, "order.created", &last, order_created(&last, 1));
    plans.insert(last.clone(), Planned { via: Partitioner::ConsistentRandom, fate: Fate::Expire, quantity: 1, sent_to });
    let reserved = wait_for("the last order reserved", &log, &mut workers, STEP_WITHIN, POLL, || pos(&mut outside, &plans));
    let latest = reserved.values().map(|r| r.expires_at).max().expect("reservations");
    assert_eq!(reserved[&last].expires_at, latest, "the last order's reservation should expire last");

    let expiring: BTreeSet<&String> = plans.iter().filter(|(_, p)| p.fate == Fate::Expire).map(|(id, _)| id).collect();
    wait_for("every unpaid order expired and cancelled", &log, &mut workers, TTL + STEP_WITHIN, POLL, || {
        let expired = expired_orders(&k);
        let cancelled: BTreeSet<String> = events(&k, "order.cancelled")
            .into_iter()
            .filter_map(|e| match e {
                Event::OrderCancelled(c) if c.reason == cancel_reason::RESERVATION_EXPIRED => Some(c.order_id),
                _ => None,
            })
            .collect();
        expiring.iter().all(|id| expired.contains(*id) && cancelled.contains(*id)).then_some(())
    });
    // Then every hop past its inputs, upstream first: whatever the expiries and answers led to is
    // on the topics (the deduplicator's order.cancelled twice: it also reads the canceller's).
    common::wait_group_past(
        &k.broker,
        &[
            ("reservation-expirer", "stock.reserved"),
            ("reservation-expirer", "order.settled"),
            ("deduplicator", "inventory.adjusted"),
            ("deduplicator", "order.created"),
            ("deduplicator", "order.completed"),
            ("deduplicator", "stock.reservation.expired"),
            ("deduplicator", "order.cancelled"),
            ("stock-reserver", "stock.commands"),
            ("canceller", "order.created.repartition"),
            ("canceller", "stock.reservation.released"),
            ("canceller", "order.settled"),
            ("canceller", "order.cancelled.repartition"),
            ("deduplicator", "order.cancelled"),
        ],
        PARTITIONS,
        &log,
        &mut workers,
        STEP_WITHIN,
    );

    // 5. Every order ended as its events say, from the test's own reading.
    let seen = seen_per_order(&k);
    let mut broken: Vec<String> = plans
        .iter()
        .flat_map(|(id, p)| match seen.get(id) {
            Some(o) => order_problems(id, p, o),
            None => vec![format!("{id}: no event at all")],
        })
        .collect();
    broken.extend(seen.keys().filter(|id| !plans.contains_key(*id)).map(|id| format!("{id}: events of an order never created")));
    let loaded = orderflow_runtime::topology::load(&common::repo_root().join("topology.toml")).expect("topology loads");
    for dlq in loaded.topology.dead_letter_topics().into_keys() {
        let n = common::read_topic(&k.broker, &dlq, PARTITIONS).len();
        if n > 0 {
            broken.push(format!("{dlq} holds {n} record(s)"));
        }
    }
    assert!(broken.is_empty(), "{} problem(s), from the topics:\n{}", broken.len(), broken.join("\n"));

    // 6. The deduplicator counted exactly the records sent to another partition than orderflow's.
    let expected = outside.misrouted();
    let group = loaded.topology.workers["deduplicator"].group_id("deduplicator");
    let dedup_done = || EXTERNAL.iter().all(|t| common::group_not_past(&k.broker, &group, t, PARTITIONS).is_empty());
    let counted = wait_for("the misrouted counters to settle", &log, &mut workers, STEP_WITHIN, POLL, || {
        let counted = misrouted_counted(port, "partition");
        (counted == expected || dedup_done()).then_some(counted)
    });
    assert_eq!(counted, expected, "orderflow_misrouted_records_total{{reason=\"partition\"}} per topic vs records sent elsewhere");
    for reason in ["no_key", "key_mismatch"] {
        assert!(misrouted_counted(port, reason).values().all(|n| *n == 0), "misrouted records with reason {reason}");
    }
    let (created_crc, misrouted_crc) = outside.count("order.created", Partitioner::ConsistentRandom);
    let (created_murmur, misrouted_murmur) = outside.count("order.created", Partitioner::Murmur2Random);
    assert!(misrouted_crc > 0, "no order.created through consistent_random landed elsewhere: nothing was tested");
    assert_eq!(misrouted_murmur, 0, "murmur2_random is orderflow's partitioner");

    let fates = |f: Fate| plans.values().filter(|p| p.fate == f).count();
    println!(
        "partitioners: order.created {created_crc} via consistent_random ({misrouted_crc} elsewhere), {created_murmur} via \
         murmur2_random ({misrouted_murmur} elsewhere); misrouted per topic {counted:?}; {} paid, {} cancelled by the POS, {} \
         expired; passed in {:.1}s",
        fates(Fate::Pay),
        fates(Fate::PosCancel),
        fates(Fate::Expire),
        started.elapsed().as_secs_f64()
    );
}
