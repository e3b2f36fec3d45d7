//! Saga timeouts (seed 001, issue 4) on a real broker, with the canceller's clocks shortened in a
//! copy of `topology.toml`: `stock_answer_timeout = "3s"` (3 minutes in production) and
//! `saga_timeout = "8s"` (10 minutes), the reservation TTL raised to 60 s so that no expiry can
//! end a saga inside a test, and `avro_dir` made absolute (the copy lives in a temp dir).
//!
//! - `no_stock_answer_cancels_with_saga_timeout_and_the_late_reservation_is_released`: every
//!   worker runs except the stock reserver. An order gets no stock answer and is cancelled with
//!   `SAGA_TIMEOUT` no earlier than 3 s after it was produced. The stock reserver is then started:
//!   it reserves for the order late, reads the cancellation that followed the order on the
//!   store's partition and releases the reservation; the order is never confirmed and is
//!   cancelled exactly once, and the store's full stock can be reserved (and sold) again.
//! - `an_order_still_open_at_the_saga_bound_is_cancelled_and_its_stock_released`: every worker
//!   runs; an order is reserved and confirmed but POS never answers. At the 8 s bound (the TTL
//!   is 60 s) it is cancelled with `SAGA_TIMEOUT` naming its reservation, the reservation is
//!   released, and the store's full stock can be reserved again.
//!
//! Each test starts its own broker. `ORDERFLOW_KEEP_TIMEOUTS_DIR=1` keeps the logs and state (they
//! are always kept, with their path printed, when a test fails).

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{free_port, http_get, now_ms, tail, Guarded, RunDir};
use orderflow_api::events::{
    AdjustedItem, InventoryAdjusted, OrderCancelled, OrderCompleted, OrderConfirmed, OrderCreated, OrderItem, SoldItem,
    StockReservationReleased, StockReserved, StockUpdated,
};
use orderflow_api::Event;
use orderflow_runtime::codec::Codec;
use orderflow_runtime::kafka::{client_config, Side};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::util::Timeout;
use rdkafka::{Message, Offset, TopicPartitionList};

/// The canceller's stock answer timeout in the test topology (seed 001: 3 minutes).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(3);
/// The canceller's saga bound in the test topology (seed 001: 10 minutes).
const SAGA_TIMEOUT: Duration = Duration::from_secs(8);
/// Reservation TTL of the test topology: longer than the saga bound, so only the bound can end
/// an unpaid order within a test.
const TTL: &str = "60s";
/// How long after its deadline a timeout may be observed (the canceller fires timers every
/// commit interval; the hops to the observer add broker latency). Generous: the machine is shared.
const SLACK: Duration = Duration::from_secs(25);
/// How long a worker process may take to be ready (group join, assignment, restore).
const READY_WITHIN: Duration = Duration::from_secs(90);
/// How long to wait for a pipeline step that has no deadline of its own (a reservation, a release).
const STEP_WITHIN: Duration = Duration::from_secs(60);
const HQ: &str = "HQ-T";
const STORE: &str = "ST-T";
const PRODUCT: &str = "P-1";
/// Units of [`PRODUCT`] on hand at the store.
const STOCK: i64 = 10;
const EXIT_POLL: Duration = Duration::from_millis(20);

/// Topics the observer reads from the beginning.
const OBSERVED: &[&str] = &[
    "stock.commands",
    "stock.reserved",
    "stock.reservation.failed",
    "stock.reservation.released",
    "stock.reservation.expired",
    "stock.updated",
    "order.confirmed",
    "order.cancelled",
];

// ------------------------------------------------------------------------------------------
// The run: broker, topology copy, topics, worker processes.

struct Run {
    topology: PathBuf,
    bootstrap: String,
    dir: PathBuf,
    /// (worker process, its metrics port, its log), in start order.
    processes: Vec<(Guarded, u16, PathBuf)>,
}

impl Run {
    /// Writes the topology copy into `dir` and creates the topics on `broker`.
    fn new(broker: &common::Broker, dir: &Path) -> Run {
        let root = common::repo_root();
        let topology = timeouts_topology(&root, dir);
        let bin = common::orderflow_bin();
        let check = Command::new(&bin).args(["topology", "check"]).arg(&topology).output().expect("run orderflow topology check");
        assert!(
            check.status.success(),
            "the test topology does not check:\n{}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
        let out = Command::new(&bin)
            .current_dir(&root)
            .arg("topics")
            .arg("--topology")
            .arg(&topology)
            .args(["--bootstrap", &broker.bootstrap])
            .env_remove("ORDERFLOW_BOOTSTRAP")
            .output()
            .expect("run orderflow topics");
        assert!(out.status.success(), "orderflow topics failed:\n{}", String::from_utf8_lossy(&out.stderr));
        fs::create_dir_all(dir.join("logs")).unwrap();
        Run { topology, bootstrap: broker.bootstrap.clone(), dir: dir.to_path_buf(), processes: Vec::new() }
    }

    /// Starts one `orderflow run` process with `workers` (instance `instance`) and waits until its
    /// `/readyz` answers 200.
    fn start(&mut self, workers: &[&str], instance: &str) {
        let port = free_port();
        let log = self.dir.join("logs").join(format!("{instance}.log"));
        let mut cmd = common::run_command(&self.topology, &self.bootstrap, instance, port, &self.dir.join("state"), &log);
        for w in workers {
            cmd.args(["--worker", w]);
        }
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn orderflow run {workers:?}: {e}"));
        let mut child = Guarded::new(child, EXIT_POLL);
        let started = Instant::now();
        loop {
            if let Some(s) = child.try_wait() {
                panic!("{instance} exited ({s}) before it was ready; log {}:\n{}", log.display(), tail(&log, 20));
            }
            if matches!(http_get(port, "/readyz"), Some((200, _))) {
                break;
            }
            assert!(
                started.elapsed() < READY_WITHIN,
                "{instance}: /readyz not 200 within {}s; log {}:\n{}",
                READY_WITHIN.as_secs(),
                log.display(),
                tail(&log, 20)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let which = if workers.is_empty() { "every worker".to_string() } else { workers.join(", ") };
        println!("timeouts: {instance} ({which}) ready in {:.1}s", started.elapsed().as_secs_f64());
        self.processes.push((child, port, log));
    }

    /// The value of `orderflow_business_events_total{worker="canceller",measure,label}` on the
    /// process that runs the canceller (0 when absent).
    fn canceller_measure(&self, measure: &str, label: &str) -> f64 {
        let wanted = [("worker", "canceller"), ("measure", measure), ("label", label)];
        let mut total = 0.0;
        for (_, port, _) in &self.processes {
            let Some((200, body)) = http_get(*port, "/metrics") else { panic!("GET /metrics on port {port} failed") };
            total += common::metric_in(&body, "orderflow_business_events_total", &wanted);
        }
        total
    }

    /// The last log lines of every worker process, for failure messages.
    fn diagnostics(&self) -> String {
        self.processes.iter().map(|(_, _, log)| format!("\n--- {}:\n{}", log.display(), tail(log, 12))).collect()
    }
}

/// `topology.toml` with the test's clocks, TTL and an absolute `avro_dir`, written to `dir`.
fn timeouts_topology(root: &Path, dir: &Path) -> PathBuf {
    let original = fs::read_to_string(root.join("topology.toml")).expect("read topology.toml");
    assert!(!original.lines().any(|l| l.trim_start().starts_with("avro_dir")), "topology.toml sets avro_dir: update timeouts_topology");
    let (mut answer, mut bound, mut ttl) = (0, 0, 0);
    let mut body = Vec::new();
    for l in original.lines() {
        let key = l.trim_start();
        if key.starts_with("stock_answer_timeout") {
            answer += 1;
            body.push(format!("stock_answer_timeout = \"{}s\"   # timeouts test", ANSWER_TIMEOUT.as_secs()));
        } else if key.starts_with("saga_timeout") {
            bound += 1;
            body.push(format!("saga_timeout = \"{}s\"   # timeouts test", SAGA_TIMEOUT.as_secs()));
        } else if key.starts_with("reservation_ttl") {
            ttl += 1;
            body.push(format!("reservation_ttl = \"{TTL}\"   # timeouts test: longer than saga_timeout"));
        } else {
            body.push(l.to_string());
        }
    }
    assert_eq!((answer, bound), (1, 1), "topology.toml should set stock_answer_timeout and saga_timeout once (the canceller's)");
    assert!(ttl >= 2, "topology.toml should set reservation_ttl for the reserver and the expirer");
    let text = format!(
        "# Copy of topology.toml for the timeouts test (clocks {}s/{}s, TTL {TTL}, absolute avro_dir).\navro_dir = {:?}\n\n{}\n",
        ANSWER_TIMEOUT.as_secs(),
        SAGA_TIMEOUT.as_secs(),
        root.join("avro").display().to_string(),
        body.join("\n")
    );
    let path = dir.join("topology.toml");
    fs::write(&path, text).expect("write topology copy");
    path
}

// ------------------------------------------------------------------------------------------
// Producing and observing events.

/// Produces events the way the outside world does (order service, admin tooling, POS), with the
/// runtime's producer settings (the `murmur2_random` partitioner: same partitions as the workers).
struct Client {
    producer: BaseProducer,
    codec: Codec,
}

impl Client {
    fn new(run: &Run) -> Client {
        let mut loaded = orderflow_runtime::topology::load(&run.topology).expect("load the test topology");
        loaded.topology.broker.bootstrap = run.bootstrap.clone();
        let producer = client_config(&loaded.topology.broker, Side::Producer).create().expect("create producer");
        let codec = Codec::load(&loaded.avro_dir(), None).expect("load the Avro schemas");
        Client { producer, codec }
    }

    fn send(&self, topic: &str, key: &str, event: Event) {
        let bytes = self.codec.encode_local(&event).expect("encode");
        self.producer.send(BaseRecord::to(topic).key(key).payload(&bytes)).map_err(|(e, _)| e).expect("enqueue a record");
        self.producer.flush(Timeout::After(Duration::from_secs(30))).expect("records acknowledged");
    }

    fn restock(&self, id: &str, units: i64) {
        let ev = InventoryAdjusted {
            event_id: id.into(),
            occurred_at: now_ms(),
            hq_id: HQ.into(),
            store_id: STORE.into(),
            adjustment_type: "RESTOCK".into(),
            reference_id: format!("ref-{id}"),
            items: vec![AdjustedItem { product_id: PRODUCT.into(), delta: units }],
            to_store_id: None,
            reason: None,
            operator: None,
        };
        self.send("inventory.adjusted", &format!("{HQ}:{STORE}"), ev.into());
    }

    /// Produces `order.created` for `quantity` × [`PRODUCT`]; returns when it was produced (ms).
    fn order(&self, order_id: &str, quantity: i32) -> i64 {
        let at = now_ms();
        let ev = OrderCreated {
            event_id: format!("created-{order_id}"),
            occurred_at: at,
            order_id: order_id.into(),
            customer_id: "C-T".into(),
            hq_id: HQ.into(),
            store_id: STORE.into(),
            items: vec![OrderItem { product_id: PRODUCT.into(), quantity, unit_price: 1000 }],
        };
        self.send("order.created", order_id, ev.into());
        at
    }

    /// POS: payment taken for a confirmed order.
    fn complete(&self, confirmed: &OrderConfirmed, quantity: i32) {
        let ev = OrderCompleted {
            event_id: format!("completed-{}", confirmed.order_id),
            occurred_at: now_ms(),
            order_id: confirmed.order_id.clone(),
            reservation_id: confirmed.reservation_id.clone(),
            hq_id: HQ.into(),
            store_id: STORE.into(),
            items: vec![SoldItem { product_id: PRODUCT.into(), quantity, actual_price: 1000 }],
            total_amount: 1000 * i64::from(quantity),
        };
        self.send("order.completed", &confirmed.order_id, ev.into());
    }
}

/// One record read by the [`Observer`].
#[derive(Debug, Clone)]
struct Seen {
    topic: String,
    event: Event,
    at: Instant,
}

/// Reads [`OBSERVED`] from the beginning and keeps every decoded record.
struct Observer {
    consumer: BaseConsumer,
    codec: Codec,
    seen: Vec<Seen>,
}

impl Observer {
    fn new(run: &Run) -> Observer {
        let mut loaded = orderflow_runtime::topology::load(&run.topology).expect("load the test topology");
        loaded.topology.broker.bootstrap = run.bootstrap.clone();
        let mut cfg = client_config(&loaded.topology.broker, Side::Consumer);
        cfg.set("group.id", format!("timeouts-observer-{}", now_ms()));
        let consumer: BaseConsumer = cfg.create().expect("create observer");
        let mut tpl = TopicPartitionList::new();
        for topic in OBSERVED {
            let partitions = loaded.topology.topics[*topic].partitions;
            for p in 0..partitions {
                tpl.add_partition_offset(topic, p, Offset::Beginning).unwrap();
            }
        }
        consumer.assign(&tpl).expect("assign observed partitions");
        Observer { consumer, codec: Codec::load(&loaded.avro_dir(), None).expect("load the Avro schemas"), seen: Vec::new() }
    }

    /// Reads whatever arrives within `d`.
    fn pump(&mut self, d: Duration) {
        let until = Instant::now() + d;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            match self.consumer.poll(left.min(Duration::from_millis(100))) {
                Some(Ok(m)) => {
                    let event = self.codec.decode_local(m.payload().unwrap_or_default()).expect("observed records decode");
                    self.seen.push(Seen { topic: m.topic().to_string(), event, at: Instant::now() });
                }
                Some(Err(e)) => println!("timeouts: observer poll error (retried): {e}"),
                None => {}
            }
        }
    }

    /// Every record seen on `topic` for order `order_id`.
    fn of(&self, topic: &str, order_id: &str) -> Vec<Seen> {
        self.seen.iter().filter(|s| s.topic == topic && s.event.order_id() == Some(order_id)).cloned().collect()
    }

    /// Waits up to `within` for the first record on `topic` matching `pred`; panics with `run`'s
    /// diagnostics if none comes.
    fn wait_for(&mut self, run: &Run, topic: &str, within: Duration, what: &str, pred: impl Fn(&Event) -> bool) -> Seen {
        let until = Instant::now() + within;
        loop {
            if let Some(s) = self.seen.iter().find(|s| s.topic == topic && pred(&s.event)) {
                return s.clone();
            }
            if Instant::now() >= until {
                let on_topic: Vec<String> = self.seen.iter().filter(|s| s.topic == topic).map(|s| format!("{:?}", s.event)).collect();
                panic!("no {what} on {topic} within {}s; seen there: {on_topic:#?}\n{}", within.as_secs(), run.diagnostics());
            }
            self.pump(Duration::from_millis(200));
        }
    }
}

fn cancelled(e: &Event) -> &OrderCancelled {
    match e {
        Event::OrderCancelled(c) => c,
        other => panic!("expected OrderCancelled, got {other:?}"),
    }
}

fn reserved(e: &Event) -> &StockReserved {
    match e {
        Event::StockReserved(r) => r,
        other => panic!("expected StockReserved, got {other:?}"),
    }
}

fn released(e: &Event) -> &StockReservationReleased {
    match e {
        Event::StockReservationReleased(r) => r,
        other => panic!("expected StockReservationReleased, got {other:?}"),
    }
}

fn for_order(order_id: &str) -> impl Fn(&Event) -> bool + '_ {
    move |e| e.order_id() == Some(order_id)
}

/// Restocks the store with [`STOCK`] units and waits until the adjustment is on the store's
/// command stream (`stock.commands`), so every order produced afterwards reaches the stock
/// reserver after it (the store is known, issue 4).
fn restock_store(run: &Run, client: &Client, observer: &mut Observer) {
    client.restock("restock-1", STOCK);
    observer.wait_for(run, "stock.commands", STEP_WITHIN, "the restock", |e| matches!(e, Event::InventoryAdjusted(_)));
}

// ------------------------------------------------------------------------------------------

#[test]
fn no_stock_answer_cancels_with_saga_timeout_and_the_late_reservation_is_released() {
    let started = Instant::now();
    let broker = common::Broker::start();
    let run_dir = RunDir::create("orderflow-timeouts-answer-", "ORDERFLOW_KEEP_TIMEOUTS_DIR", "timeouts: logs and state");
    let mut run = Run::new(&broker, run_dir.path());
    println!("timeouts: broker {}, run directory {}", broker.bootstrap, run_dir.path().display());

    // 1. Everything but the stock reserver.
    run.start(&["deduplicator", "order-confirmer", "canceller", "reservation-expirer"], "no-reserver");
    let client = Client::new(&run);
    let mut observer = Observer::new(&run);
    restock_store(&run, &client, &mut observer);

    // 2. An order nobody answers: SAGA_TIMEOUT, not before the 3 s answer timeout.
    let order = "O-NO-ANSWER";
    // Taken before the send: the saga clock starts at the order's occurredAt (set inside
    // `order`), and the acknowledgement the send waits for would shorten the measured wait.
    let produced_at = Instant::now();
    let produced = client.order(order, 4);
    let c = observer.wait_for(&run, "order.cancelled", ANSWER_TIMEOUT + SLACK, "cancellation", for_order(order));
    let cancel = cancelled(&c.event).clone();
    let waited = c.at.duration_since(produced_at);
    println!("timeouts: {order} cancelled {:.1}s after it was produced: {cancel:?}", waited.as_secs_f64());
    assert_eq!(cancel.reason, "SAGA_TIMEOUT", "{cancel:?}");
    assert_eq!(cancel.reservation_id, None, "nothing was reserved");
    assert_eq!(cancel.customer_message, "주문 처리 시간이 초과되어 주문이 취소되었습니다.");
    assert!(waited >= ANSWER_TIMEOUT, "cancelled {waited:?} after the order, before the {ANSWER_TIMEOUT:?} answer timeout");
    // occurredAt is the deadline: the canceller's processing time of order.created + 3 s.
    let deadline = cancel.occurred_at - produced;
    assert!(
        (ANSWER_TIMEOUT.as_millis() as i64..(ANSWER_TIMEOUT + SLACK).as_millis() as i64).contains(&deadline),
        "occurredAt {deadline} ms after the order was produced"
    );
    assert!(observer.of("stock.reserved", order).is_empty() && observer.of("stock.reservation.failed", order).is_empty());
    assert_eq!(run.canceller_measure("saga_timeout", "stock_answer"), 1.0, "{}", run.diagnostics());

    // 3. The stock reserver comes up: it reserves late, then releases on the cancellation.
    run.start(&["stock-reserver"], "reserver");
    let r = observer.wait_for(&run, "stock.reserved", STEP_WITHIN, "the late reservation", for_order(order));
    let late = reserved(&r.event).clone();
    assert_eq!(late.items.iter().map(|i| i.reserved).sum::<i32>(), 4);
    let rel = observer.wait_for(&run, "stock.reservation.released", STEP_WITHIN, "the release", for_order(order));
    let rel = released(&rel.event).clone();
    assert_eq!((rel.reason.as_str(), rel.reservation_id.as_str()), ("CANCELLED", late.reservation_id.as_str()), "{rel:?}");
    assert_eq!(rel.items.iter().map(|i| (i.product_id.as_str(), i.released)).collect::<Vec<_>>(), vec![(PRODUCT, 4)]);

    // 4. The stock is back: the store's whole stock can be reserved and sold by a new order,
    //    whose completion closes its saga (no timeout for it later).
    let full = "O-FULL";
    let full_produced_at = Instant::now();
    client.order(full, STOCK as i32);
    let r = observer.wait_for(&run, "stock.reserved", STEP_WITHIN, "the full-stock reservation", for_order(full));
    assert_eq!(reserved(&r.event).items.iter().map(|i| i.reserved).sum::<i32>(), STOCK as i32, "all {STOCK} units available again");
    let conf = observer.wait_for(&run, "order.confirmed", STEP_WITHIN, "the confirmation", for_order(full));
    let Event::OrderConfirmed(conf) = conf.event else { unreachable!() };
    client.complete(&conf, STOCK as i32);
    let sale = observer.wait_for(
        &run,
        "stock.updated",
        STEP_WITHIN,
        "the sale",
        |e| matches!(e, Event::StockUpdated(u) if u.change_reason == "SALE"),
    );
    let Event::StockUpdated(StockUpdated { store_stock, .. }) = sale.event else { unreachable!() };
    assert_eq!((store_stock.previous, store_stock.current), (STOCK, 0));

    // 5. Past both sagas' bounds: one cancellation for the first order, none for the second,
    //    and the first order was never confirmed.
    let settle = (produced_at + SAGA_TIMEOUT).max(full_produced_at + SAGA_TIMEOUT) + Duration::from_secs(4);
    observer.pump(settle.saturating_duration_since(Instant::now()));
    assert_eq!(observer.of("order.cancelled", order).len(), 1, "exactly one order.cancelled for {order}");
    assert!(observer.of("order.confirmed", order).is_empty(), "{order} confirmed after its SAGA_TIMEOUT");
    assert!(observer.of("order.cancelled", full).is_empty(), "{full} was completed within its bound");
    assert!(observer.seen.iter().all(|s| s.topic != "stock.reservation.failed"), "no stock failure expected");
    assert_eq!(run.canceller_measure("saga_timeout", "saga_bound"), 0.0);
    assert!(run.canceller_measure("late_event", "stock_reserved_after_close") >= 1.0, "the late reservation is a late event");
    println!("timeouts: passed in {:.1}s", started.elapsed().as_secs_f64());
}

#[test]
fn an_order_still_open_at_the_saga_bound_is_cancelled_and_its_stock_released() {
    let started = Instant::now();
    let broker = common::Broker::start();
    let run_dir = RunDir::create("orderflow-timeouts-bound-", "ORDERFLOW_KEEP_TIMEOUTS_DIR", "timeouts: logs and state");
    let mut run = Run::new(&broker, run_dir.path());
    println!("timeouts: broker {}, run directory {}", broker.bootstrap, run_dir.path().display());
    run.start(&[], "all");
    let client = Client::new(&run);
    let mut observer = Observer::new(&run);
    restock_store(&run, &client, &mut observer);

    // Reserved and confirmed, then POS never answers; the TTL (60 s) is past the bound (8 s).
    let order = "O-UNPAID";
    // Taken before the send: the saga clock starts at the order's occurredAt (set inside
    // `order`), and the acknowledgement the send waits for would shorten the measured wait.
    let produced_at = Instant::now();
    let produced = client.order(order, 3);
    let r = observer.wait_for(&run, "stock.reserved", STEP_WITHIN, "the reservation", for_order(order));
    let res = reserved(&r.event).clone();
    observer.wait_for(&run, "order.confirmed", STEP_WITHIN, "the confirmation", for_order(order));

    let c = observer.wait_for(&run, "order.cancelled", SAGA_TIMEOUT + SLACK, "cancellation", for_order(order));
    let cancel = cancelled(&c.event).clone();
    let waited = c.at.duration_since(produced_at);
    println!("timeouts: {order} cancelled {:.1}s after it was produced: {cancel:?}", waited.as_secs_f64());
    assert_eq!(cancel.reason, "SAGA_TIMEOUT", "{cancel:?}");
    assert_eq!(cancel.reservation_id.as_deref(), Some(res.reservation_id.as_str()), "names the reservation it ends");
    assert!(waited >= SAGA_TIMEOUT, "cancelled {waited:?} after the order, before the {SAGA_TIMEOUT:?} bound");
    let deadline = cancel.occurred_at - produced;
    assert!(
        (SAGA_TIMEOUT.as_millis() as i64..(SAGA_TIMEOUT + SLACK).as_millis() as i64).contains(&deadline),
        "occurredAt {deadline} ms after the order was produced"
    );

    // The reservation is released and the whole stock can be reserved again.
    let rel = observer.wait_for(&run, "stock.reservation.released", STEP_WITHIN, "the release", for_order(order));
    let rel = released(&rel.event).clone();
    assert_eq!((rel.reason.as_str(), rel.reservation_id.as_str()), ("CANCELLED", res.reservation_id.as_str()), "{rel:?}");
    assert_eq!(rel.items.iter().map(|i| (i.product_id.as_str(), i.released)).collect::<Vec<_>>(), vec![(PRODUCT, 3)]);
    let full = "O-FULL";
    client.order(full, STOCK as i32);
    let r = observer.wait_for(&run, "stock.reserved", STEP_WITHIN, "the full-stock reservation", for_order(full));
    assert_eq!(reserved(&r.event).items.iter().map(|i| i.reserved).sum::<i32>(), STOCK as i32, "all {STOCK} units available again");

    observer.pump(Duration::from_secs(3));
    assert_eq!(observer.of("order.cancelled", order).len(), 1, "exactly one order.cancelled for {order}");
    assert!(observer.of("stock.reservation.expired", order).is_empty(), "the TTL is 60 s: no expiry within the test");
    assert_eq!(run.canceller_measure("saga_timeout", "saga_bound"), 1.0, "{}", run.diagnostics());
    assert_eq!(run.canceller_measure("saga_timeout", "stock_answer"), 0.0);
    println!("timeouts: passed in {:.1}s", started.elapsed().as_secs_f64());
}
