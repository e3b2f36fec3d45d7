//! The whole saga on a real broker: 1,000 TPC-H orders plus the two seed 000 scenarios through
//! every worker (`orderflow demo`), then the invariants of the domain contract checked by this
//! test from its own reading of the topics (`read_committed`, decoded with the repository's
//! codec), not from the demo's summary:
//!
//! * every order of `order.created` gets exactly one stock answer (`stock.reserved` or
//!   `stock.reservation.failed`) and ends exactly once: *sold* (`stock.updated` `SALE` records
//!   referencing it, one per item, with the order's quantities, after the POS's `order.completed`)
//!   or *cancelled* (one `order.cancelled`, with its reason); each branch of the saga is taken;
//! * no `eventId` appears with two different payloads on any topic a worker writes (on Kafka,
//!   under `exactly_once`, none appears twice at all);
//! * per store and product: the `stock.updated` records form one chain (each `previous` is the
//!   last `current`, `current = previous + changeAmount`, never below zero), the restocks in it
//!   are the `inventory.adjusted` deltas, and initial stock = on hand at the end + units sold;
//!   reservations (`stock.reserved` items, less those released by `stock.reservation.released`
//!   or sold) never exceed what is on hand, and no order is both released and sold;
//! * the seed 000 scenarios end as documented, nothing is dead-lettered.
//!
//! The demo's own summary is checked too, as a cross-check only.
//!
//! A third test drives issue 13's race (payments at the reservation's expiry, workers killed
//! meanwhile) and checks the verdict rules from the topics.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::process::Command;
use std::time::{Duration, Instant};

use orderflow_api::events::{cancel_reason, change_reason, store_key, StockReservationFailed};
use orderflow_api::Event;
use rdkafka::message::Message;
use serde_json::Value;

/// TPC-H orders of the run, plus the demo's two seed scenarios.
const ORDERS: usize = 1000 + 2;

#[test]
fn saga_on_tpch_orders_and_seed_scenarios_keeps_every_invariant() {
    run_saga(common::BrokerKind::from_env());
}

/// The same run on tansu, under its profile (`effectively_once`): the whole saga on the
/// transaction-less path, whatever broker the rest of the suite runs on.
#[test]
fn saga_on_tansu_effectively_once_keeps_every_invariant() {
    run_saga(common::BrokerKind::Tansu);
}

fn run_saga(kind: common::BrokerKind) {
    let broker = common::Broker::start_kind(kind);
    let summary_path = broker.dir().join("summary.json");
    let out = Command::new(common::orderflow_bin())
        .current_dir(common::repo_root())
        .args(["demo", "--topology", "topology.toml", "--orders", "1000", "--stock-scale", "0.07", "--ttl", "8s"])
        .arg("--bootstrap")
        .arg(&broker.bootstrap)
        .arg("--state-dir")
        .arg(broker.dir().join("state"))
        .arg("--json")
        .arg(&summary_path)
        .output()
        .expect("run orderflow demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));

    let topics = Topics::read(&broker.bootstrap);
    let failures = [check_outcomes(&topics), check_event_ids(&topics, kind), check_stock(&topics), check_dead_letters(&topics)].concat();
    assert!(
        failures.is_empty(),
        "{} invariant(s) broken, from the topics (first 50):\n{}",
        failures.len(),
        failures.iter().take(50).cloned().collect::<Vec<_>>().join("\n")
    );

    // Cross-check only: the demo's summary agrees.
    let s: Value = serde_json::from_slice(&std::fs::read(&summary_path).expect("summary written")).expect("summary is JSON");
    common::assert_summary_invariants(&s, ORDERS as u64);
}

// ------------------------------------------------------------------------------------------
// Issue 13: payment and expiry racing on purpose.

/// TPC-H orders of the race run (plus the demo's two seed scenarios and the hot orders).
const RACE_ORDERS: usize = 600;
/// Orders of the race run for one unit of the scarce `P-HOT` (demo `--hot-orders`).
const HOT_ORDERS: usize = 150;

/// Issue 13's race, driven on purpose: the POS pays 85 % of the orders (150 of them for one unit
/// of a scarce product, so late payments also find the units gone) at their reservation's
/// expiry (TTL 4 s) give or take 1.5 s, so payments and expiries meet at the stock reserver in
/// both orders, while the worker process is SIGKILLed and restarted twice (every worker in one
/// process; state kept the first time, wiped the second). From its own reading of the topics:
/// every paid order has exactly one verdict and either exactly one `SALE` per item or exactly one
/// refund-required cancellation, never both, never neither; every unpaid order exactly one
/// cancellation; stock conserved per store and product; nothing dead-lettered.
#[test]
fn payments_at_the_ttl_boundary_are_each_sold_or_refunded_exactly_once() {
    let kind = common::BrokerKind::from_env();
    let broker = common::Broker::start_kind(kind);
    let dir = broker.dir().to_path_buf();
    let topology = common::repo_root().join("topology.toml");
    common::create_topics(&topology, &broker.bootstrap);
    let port = common::free_port();
    let spawn = |n: usize| {
        let log = dir.join(format!("workers-{n}.log"));
        let child = common::run_command(&topology, &broker.bootstrap, "race", port, &dir.join("state"), &log)
            .args(["--reservation-ttl", "4s"])
            .spawn()
            .expect("spawn orderflow run");
        (common::Guarded::new(child, Duration::from_millis(50)), log)
    };
    let (mut workers, mut log) = spawn(0);
    let demo_out = File::create(dir.join("demo.out")).expect("demo output file");
    let mut demo = common::Guarded::new(
        Command::new(common::orderflow_bin())
            .current_dir(common::repo_root())
            .args(["demo", "--topology", "topology.toml", "--external-workers", "--direct", "--orders", &RACE_ORDERS.to_string()])
            .args(["--hot-orders", &HOT_ORDERS.to_string()])
            .args(["--stock-scale", "0.06", "--ttl", "4s", "--pay-at-expiry", "1500ms", "--rate", "40"])
            .args(["--complete-pct", "85", "--payment-fail-pct", "0", "--settle-timeout", "120s"])
            .arg("--bootstrap")
            .arg(&broker.bootstrap)
            .arg("--state-dir")
            .arg(dir.join("driver-state"))
            .stdout(demo_out.try_clone().expect("clone file"))
            .stderr(demo_out)
            .spawn()
            .expect("spawn orderflow demo"),
        Duration::from_millis(100),
    );
    // Two kills while orders flow and payments meet expiries.
    let started = Instant::now();
    for (n, at) in [(1, Duration::from_secs(9)), (2, Duration::from_secs(18))] {
        while started.elapsed() < at && demo.try_wait().is_none() {
            std::thread::sleep(Duration::from_millis(100));
        }
        workers.kill_and_wait();
        if n == 2 {
            std::fs::remove_dir_all(dir.join("state")).expect("wipe the workers' state");
        }
        println!("race: t={:.1}s SIGKILLed the workers (kill {n}), restarting", started.elapsed().as_secs_f64());
        (workers, log) = spawn(n);
    }
    let status = demo.wait_for(Duration::from_secs(400));
    let demo_text = std::fs::read_to_string(dir.join("demo.out")).unwrap_or_default();
    assert!(status.is_some_and(|s| s.success()), "demo: {status:?}\n{demo_text}\n--- workers log:\n{}", common::tail(&log, 30));
    let (stopped, _) = workers.terminate(Duration::from_secs(30));
    assert!(stopped.is_some_and(|s| s.success()), "workers did not stop cleanly: {stopped:?}\n{}", common::tail(&log, 30));

    let topics = Topics::read(&broker.bootstrap);
    let orders = orders(&topics);
    let mut broken = Vec::new();
    if orders.len() != RACE_ORDERS + HOT_ORDERS + 2 {
        broken.push(format!("{} orders in order.created, expected {}", orders.len(), RACE_ORDERS + HOT_ORDERS + 2));
    }
    let (mut paid, mut late_sales, mut refunds, mut by_outcome) = (0, 0, 0, BTreeMap::<String, usize>::new());
    for (id, o) in &orders {
        broken.extend(order_problems(id, o));
        let outcome = o.outcome();
        paid += usize::from(!o.payments.is_empty());
        late_sales += usize::from(o.late_sale());
        refunds += o.refunds.len();
        *by_outcome.entry(outcome).or_default() += 1;
    }
    println!("race: {paid} payments at the TTL boundary, {late_sales} late sales, {refunds} refunds; outcomes {by_outcome:?}");
    broken.extend([check_event_ids(&topics, kind), check_stock(&topics), check_dead_letters(&topics)].concat());
    assert!(
        broken.is_empty(),
        "{} invariant(s) broken, from the topics (first 50):\n{}",
        broken.len(),
        broken.iter().take(50).cloned().collect::<Vec<_>>().join("\n")
    );
    // The race was run: payments on both sides of the expiry, and the branch the issue is about.
    assert!(late_sales > 0 && refunds > 0, "the late-sale and refund branches were not both taken: {by_outcome:?}");
    assert!(by_outcome.get("SOLD").copied().unwrap_or(0) > late_sales, "no payment beat its expiry: {by_outcome:?}");
}

// ------------------------------------------------------------------------------------------
// The topics, as this test reads them.

/// Records of one topic as read: the raw payload and its event (None when it does not decode).
type Records = Vec<(Vec<u8>, Option<Event>)>;

/// Every record of every saga topic, read at `read_committed` and decoded.
struct Topics {
    kafka: common::Kafka,
    topology: orderflow_runtime::topology::Topology,
    /// topic → records (partition, offset order within a partition), each with its raw payload
    /// and its event (None when it does not decode).
    records: BTreeMap<String, Records>,
}

impl Topics {
    fn read(bootstrap: &str) -> Topics {
        let kafka = common::Kafka::new(bootstrap);
        let loaded = orderflow_runtime::topology::load(&common::repo_root().join("topology.toml")).expect("topology loads");
        let topology = loaded.topology;
        let mut records = BTreeMap::new();
        for (topic, spec) in &topology.topics {
            let read: Records = common::read_topic(&kafka.broker, topic, spec.partitions)
                .iter()
                .map(|m| {
                    let payload = m.payload().unwrap_or_default().to_vec();
                    let event = kafka.codec.decode_local(&payload).ok();
                    (payload, event)
                })
                .collect();
            records.insert(topic.clone(), read);
        }
        Topics { kafka, topology, records }
    }

    /// The decoded events of `topic` (records that do not decode are left out; see
    /// [`check_event_ids`]), each eventId once (its first record).
    fn events(&self, topic: &str) -> Vec<&Event> {
        let mut seen = BTreeSet::new();
        self.records[topic].iter().filter_map(|(_, e)| e.as_ref()).filter(|e| seen.insert(e.event_id().to_string())).collect()
    }
}

/// What happened to one order.
#[derive(Default)]
struct Order {
    store: String,
    items: BTreeMap<String, i64>,
    reserved: Option<BTreeMap<String, i64>>,
    failed: Option<StockReservationFailed>,
    released: bool,
    /// eventIds of the POS's `order.completed` records (payments taken).
    payments: BTreeSet<String>,
    /// The stock reserver's verdicts (`order.settled`): (outcome, late).
    settlements: Vec<(String, bool)>,
    /// product → units, from `stock.updated` SALE records referencing the order.
    sold: BTreeMap<String, i64>,
    /// reasons of its distinct `order.cancelled` events without `refundRequired`.
    cancellations: Vec<String>,
    /// reasons of its distinct refund-required `order.cancelled` events (issue 13).
    refunds: Vec<String>,
}

impl Order {
    /// The order's end as the topics tell it. A paid order ends `SOLD` (its `SALE` records; an
    /// earlier cancellation only when the reserver settled it as a late sale) or `REFUNDED`
    /// (exactly one refund-required cancellation, no `SALE`); an unpaid one `CANCELLED` with
    /// exactly one cancellation. Anything else is `NONE` or `SEVERAL`.
    fn outcome(&self) -> String {
        let late = self.settlements.iter().any(|(_, late)| *late);
        match (self.sold.is_empty(), self.refunds.as_slice(), self.cancellations.as_slice()) {
            (false, [], []) => "SOLD".into(),
            (false, [], _) if late => "SOLD".into(),
            (true, [reason], _) => format!("REFUNDED/{reason}"),
            (true, [], [reason]) => format!("CANCELLED/{reason}"),
            (true, [], []) => "NONE".into(),
            _ => format!("SEVERAL (sold {:?}, cancelled {:?}, refunds {:?})", self.sold, self.cancellations, self.refunds),
        }
    }

    /// Sold after a cancellation (the reservation had expired; the payment was deducted).
    fn late_sale(&self) -> bool {
        !self.sold.is_empty() && self.settlements.iter().any(|(_, late)| *late)
    }
}

fn orders(t: &Topics) -> BTreeMap<String, Order> {
    let mut orders: BTreeMap<String, Order> = BTreeMap::new();
    for e in t.events("order.created") {
        if let Event::OrderCreated(o) = e {
            let order = orders.entry(o.order_id.clone()).or_default();
            order.store = store_key(&o.hq_id, &o.store_id);
            for i in &o.items {
                *order.items.entry(i.product_id.clone()).or_default() += i64::from(i.quantity);
            }
        }
    }
    let topics = [
        "stock.reserved",
        "stock.reservation.failed",
        "stock.reservation.released",
        "stock.updated",
        "order.cancelled",
        "order.completed",
        "order.settled",
    ];
    for topic in topics {
        for e in t.events(topic) {
            match e {
                Event::StockReserved(r) => {
                    let o = orders.entry(r.order_id.clone()).or_insert_with(|| unknown(&r.order_id));
                    o.reserved = Some(r.items.iter().map(|i| (i.product_id.clone(), i64::from(i.reserved))).collect());
                }
                Event::StockReservationFailed(f) => {
                    orders.entry(f.order_id.clone()).or_insert_with(|| unknown(&f.order_id)).failed = Some(f.clone());
                }
                Event::StockReservationReleased(r) => {
                    orders.entry(r.order_id.clone()).or_insert_with(|| unknown(&r.order_id)).released = true;
                }
                Event::StockUpdated(u) if u.change_reason == change_reason::SALE => {
                    let o = orders.entry(u.reference_id.clone()).or_insert_with(|| unknown(&u.reference_id));
                    *o.sold.entry(u.product_id.clone()).or_default() -= u.change_amount;
                }
                Event::OrderCompleted(c) => {
                    orders.entry(c.order_id.clone()).or_insert_with(|| unknown(&c.order_id)).payments.insert(c.event_id.clone());
                }
                Event::OrderSettled(v) => {
                    orders.entry(v.order_id.clone()).or_insert_with(|| unknown(&v.order_id)).settlements.push((v.outcome.clone(), v.late));
                }
                Event::OrderCancelled(c) => {
                    let o = orders.entry(c.order_id.clone()).or_insert_with(|| unknown(&c.order_id));
                    if c.refund_required {
                        o.refunds.push(c.reason.clone());
                    } else {
                        o.cancellations.push(c.reason.clone());
                    }
                }
                _ => {}
            }
        }
    }
    orders
}

/// One order's end: exactly one terminal outcome, a sale of exactly what was ordered, and the
/// verdict rules of [`verdict_problems`].
fn order_problems(id: &str, o: &Order) -> Vec<String> {
    let mut broken = Vec::new();
    let outcome = o.outcome();
    if outcome == "NONE" || outcome.starts_with("SEVERAL") {
        broken.push(format!("{id}: not exactly one terminal outcome: {outcome}"));
    }
    if !o.sold.is_empty() && o.sold != o.items {
        broken.push(format!("{id}: sold {:?}, ordered {:?}", o.sold, o.items));
    }
    broken.extend(verdict_problems(id, o));
    broken
}

/// Issue 13, per order: a paid order has exactly one verdict of the stock reserver per payment
/// and ends `SOLD` or `REFUNDED` as that verdict says; an unpaid one has no verdict, no sale and
/// no refund.
fn verdict_problems(id: &str, o: &Order) -> Vec<String> {
    let mut broken = Vec::new();
    let outcome = o.outcome();
    if o.payments.is_empty() {
        if !o.settlements.is_empty() || !o.sold.is_empty() || !o.refunds.is_empty() {
            broken.push(format!("{id}: unpaid, but settled {:?} / sold {:?} / refunds {:?}", o.settlements, o.sold, o.refunds));
        }
        return broken;
    }
    if o.settlements.len() != o.payments.len() {
        broken.push(format!("{id}: {} payment(s), {} verdict(s) {:?}", o.payments.len(), o.settlements.len(), o.settlements));
    }
    let sold_verdict = o.settlements.iter().any(|(v, _)| v == "SOLD");
    let expected = if sold_verdict { outcome == "SOLD" } else { outcome.starts_with("REFUNDED/") };
    if !expected {
        broken.push(format!("{id}: paid, verdicts {:?}, but the topics say {outcome}", o.settlements));
    }
    broken
}

fn unknown(id: &str) -> Order {
    panic!("an event of order {id}, which is not in order.created")
}

// ------------------------------------------------------------------------------------------
// The invariants. Each returns what it found broken.

/// One stock answer and one terminal outcome per order, every branch taken, the seed scenarios.
fn check_outcomes(t: &Topics) -> Vec<String> {
    let mut broken = Vec::new();
    let orders = orders(t);
    if orders.len() != ORDERS || t.records["order.created"].len() != ORDERS {
        broken.push(format!(
            "order.created holds {} records of {} orders, expected {ORDERS}",
            t.records["order.created"].len(),
            orders.len()
        ));
    }
    let mut by_outcome: BTreeMap<String, usize> = BTreeMap::new();
    for (id, o) in &orders {
        if o.reserved.is_some() == o.failed.is_some() {
            broken.push(format!("{id}: {} stock answers", u8::from(o.reserved.is_some()) + u8::from(o.failed.is_some())));
        }
        broken.extend(order_problems(id, o));
        *by_outcome.entry(o.outcome()).or_default() += 1;
    }
    for branch in ["SOLD", "CANCELLED/INSUFFICIENT_STOCK", "CANCELLED/PAYMENT_FAILED", "CANCELLED/RESERVATION_EXPIRED"] {
        if by_outcome.get(branch).copied().unwrap_or(0) == 0 {
            broken.push(format!("no order ended {branch}: {by_outcome:?}"));
        }
    }
    println!("saga: outcomes from the topics {by_outcome:?}");

    // Seed 000: one product short; all or nothing with one of two products short.
    let failed_items = |id: &str| -> Vec<(String, i32, i32)> {
        let o = &orders[id];
        o.failed.iter().flat_map(|f| f.items.iter().map(|i| (i.product_id.clone(), i.requested, i.available))).collect()
    };
    let insufficient = format!("CANCELLED/{}", cancel_reason::INSUFFICIENT_STOCK);
    for (id, short) in [("SEED-000-1", ("P-001", 10, 5)), ("SEED-000-2", ("P-002", 3, 1))] {
        let (outcome, items) = (orders[id].outcome(), failed_items(id));
        if outcome != insufficient || items != [(short.0.to_string(), short.1, short.2)] {
            broken.push(format!("{id}: {outcome}, failed items {items:?}; expected {insufficient} naming only {short:?}"));
        }
    }
    broken
}

/// No eventId with two payloads on a worker's output topic; on Kafka (exactly once) none twice.
fn check_event_ids(t: &Topics, kind: common::BrokerKind) -> Vec<String> {
    let mut broken = Vec::new();
    for topic in common::worker_output_topics() {
        let mut payloads: HashMap<&str, Vec<&[u8]>> = HashMap::new();
        for (payload, event) in &t.records[&topic] {
            match event {
                Some(e) => payloads.entry(e.event_id()).or_default().push(payload),
                None => broken.push(format!("{topic}: a record that does not decode")),
            }
        }
        for (id, ps) in payloads {
            if ps.iter().any(|p| *p != ps[0]) {
                broken.push(format!("{topic}: eventId {id} with {} different payloads", ps.iter().collect::<BTreeSet<_>>().len()));
            } else if ps.len() > 1 && kind == common::BrokerKind::Kafka {
                broken.push(format!("{topic}: eventId {id} {} times under exactly_once", ps.len()));
            }
        }
    }
    broken
}

/// Stock per store, HQ and product, from `inventory.adjusted`, `stock.updated` and the
/// reservations. Issue 16 (seed 004): the demo leaves part of the stock unallocated at each HQ
/// (rows with an empty `storeId`, `storeStock` = the unallocated units) and short stores are
/// served by HQ fallbacks (`HQ_FALLBACK` / `HQ_RETURN` rows at both ends), so per key on hand =
/// initial + moved − sold, the moves of one HQ and product net to zero at the end (nothing in
/// transit), and the `hqStock` chain of an HQ and product is continuous and ends at its initial
/// stock (HQ and stores) − sold.
fn check_stock(t: &Topics) -> Vec<String> {
    let mut broken = Vec::new();
    // Initial stock: the demo's restocks (an HQ's under the key `hqId:`).
    let mut initial: BTreeMap<(String, String), i64> = BTreeMap::new();
    for e in t.events("inventory.adjusted") {
        if let Event::InventoryAdjusted(a) = e {
            for i in &a.items {
                *initial.entry((store_key(&a.hq_id, &a.store_id), i.product_id.clone())).or_default() += i.delta;
            }
        }
    }
    // The on-hand chain of each store (or HQ) and product, and the HQ-total chain of each HQ and
    // product: the HQ's ledger writes every row of its stores, all on the product's partition,
    // in the order it applied them.
    let mut on_hand: BTreeMap<(String, String), i64> = BTreeMap::new();
    let mut hq_total: BTreeMap<(String, String), i64> = BTreeMap::new();
    let mut restocked: BTreeMap<(String, String), i64> = BTreeMap::new();
    let mut sold: BTreeMap<(String, String), i64> = BTreeMap::new();
    let mut moved: BTreeMap<(String, String), i64> = BTreeMap::new();
    for e in t.events("stock.updated") {
        let Event::StockUpdated(u) = e else { continue };
        let key = (store_key(&u.hq_id, &u.store_id), u.product_id.clone());
        let last = on_hand.get(&key).copied().unwrap_or(0);
        let level = u.store_stock;
        if level.previous != last || level.current != level.previous + u.change_amount || level.current < 0 {
            broken.push(format!("{}/{}: {} {level:?} change {} after on hand {last}", key.0, key.1, u.event_id, u.change_amount));
        }
        on_hand.insert(key.clone(), level.current);
        let hq_key = (u.hq_id.clone(), u.product_id.clone());
        match u.hq_stock {
            Some(h) if h.previous == hq_total.get(&hq_key).copied().unwrap_or(0) && h.current >= 0 => {
                hq_total.insert(hq_key, h.current);
            }
            other => {
                broken.push(format!("{}/{}: {} hqStock {other:?} after HQ total {:?}", key.0, key.1, u.event_id, hq_total.get(&hq_key)))
            }
        }
        match u.change_reason.as_str() {
            change_reason::SALE => *sold.entry(key).or_default() -= u.change_amount,
            change_reason::RESTOCK => *restocked.entry(key).or_default() += u.change_amount,
            _ => *moved.entry(key).or_default() += u.change_amount,
        }
    }
    if restocked != initial {
        broken.push(format!(
            "restocks in stock.updated differ from inventory.adjusted on {} store/product(s)",
            initial.keys().chain(restocked.keys()).collect::<BTreeSet<_>>().iter().filter(|k| initial.get(k) != restocked.get(k)).count()
        ));
    }
    let hq_of = |store: &str| store.split_once(':').map_or(store, |(hq, _)| hq).to_string();
    // (hqId, productId) → (initial, sold, moved) over the HQ and its stores.
    let mut per_hq: BTreeMap<(String, String), (i64, i64, i64)> = BTreeMap::new();
    let hq_product = |(store, product): &(String, String)| (hq_of(store), product.clone());
    for (k, v) in &initial {
        per_hq.entry(hq_product(k)).or_default().0 += v;
    }
    for (k, v) in &sold {
        per_hq.entry(hq_product(k)).or_default().1 += v;
    }
    for (k, v) in &moved {
        per_hq.entry(hq_product(k)).or_default().2 += v;
    }
    for ((hq, product), (init, out, net_moved)) in &per_hq {
        if *net_moved != 0 {
            broken.push(format!("{hq}/{product}: moves between the HQ and its stores net to {net_moved}, expected 0 at rest"));
        }
        let total = hq_total.get(&(hq.clone(), product.clone())).copied();
        if total.is_some_and(|t| t != init - out) {
            broken.push(format!("{hq}/{product}: last hqStock {total:?} != initial {init} − sold {out}"));
        }
    }
    let fallbacks = t
        .events("stock.updated")
        .into_iter()
        .filter(|e| matches!(e, Event::StockUpdated(u) if u.change_reason == change_reason::HQ_FALLBACK && !u.store_id.is_empty()))
        .count();
    if fallbacks == 0 {
        broken.push("no store received units by an HQ fallback (the demo keeps a quarter of the stock at the HQs)".to_string());
    }
    // Live reservations: reserved, neither released nor sold.
    let mut live: BTreeMap<(String, String), i64> = BTreeMap::new();
    for (id, o) in orders(t) {
        let Some(reserved) = &o.reserved else {
            if !o.sold.is_empty() || o.released {
                broken.push(format!("{id}: sold or released without a reservation"));
            }
            continue;
        };
        if o.released && !o.sold.is_empty() && !o.late_sale() {
            broken.push(format!("{id}: its reservation was both released and sold (not a late sale)"));
        }
        if !o.released && o.sold.is_empty() {
            for (p, q) in reserved {
                *live.entry((o.store.clone(), p.clone())).or_default() += q;
            }
        }
    }
    let stores: BTreeSet<&str> = initial.keys().map(|(s, _)| s.as_str()).filter(|s| !s.ends_with(':')).collect();
    let hot = usize::from(stores.contains("HQ-SEED:ST-HOT"));
    if stores.len() != 27 + hot {
        broken.push(format!("{} stores restocked, expected {} (25 TPC-H nations + 2 seed stores + {hot} hot)", stores.len(), 27 + hot));
    }
    // Every key with a figure: a store may hold only units an HQ fallback brought it.
    let keys: BTreeSet<&(String, String)> = initial.keys().chain(moved.keys()).collect();
    for key in keys {
        let (now, out, held) =
            (on_hand.get(key).copied().unwrap_or(0), sold.get(key).copied().unwrap_or(0), live.get(key).copied().unwrap_or(0));
        let (init, m) = (initial.get(key).copied().unwrap_or(0), moved.get(key).copied().unwrap_or(0));
        if init + m != now + out {
            broken.push(format!("{}/{}: initial {init} + moved {m} != on hand {now} + sold {out}", key.0, key.1));
        }
        if held > now {
            broken.push(format!("{}/{}: {held} units reserved, {now} on hand", key.0, key.1));
        }
    }
    for key in sold.keys().chain(live.keys()) {
        if !initial.contains_key(key) && !moved.contains_key(key) {
            broken.push(format!("{}/{}: sold or reserved, never restocked nor allocated", key.0, key.1));
        }
    }
    // Seed 000 scenario 2: nothing of P-001 was taken from ST-SEED-2.
    let p001 = (store_key("HQ-SEED", "ST-SEED-2"), "P-001".to_string());
    let left = on_hand.get(&p001).copied().unwrap_or(0) - live.get(&p001).copied().unwrap_or(0);
    if left != 10 {
        broken.push(format!("SEED-000-2: {left} units of P-001 available at ST-SEED-2, expected 10 (all or nothing)"));
    }
    broken
}

/// No dead-letter topic holds a record.
fn check_dead_letters(t: &Topics) -> Vec<String> {
    t.topology
        .dead_letter_topics()
        .into_keys()
        .filter_map(|dlq| {
            let partitions = t.topology.topics.get(dlq.trim_end_matches(".dlq")).map(|s| s.partitions).unwrap_or(1);
            let n = common::read_topic(&t.kafka.broker, &dlq, partitions).len();
            (n > 0).then(|| format!("{dlq} holds {n} record(s)"))
        })
        .collect()
}
