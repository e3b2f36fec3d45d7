//! `orderflow tap` and `orderflow trace` on a real broker (issue 5, parts 2 and 3).
//!
//! `tap_and_trace_show_the_saga`: the five workers run in one `orderflow run` process with a
//! reservation TTL of 5 s. A store is restocked, then three orders are produced: one completed
//! by the POS (`order.completed`) once its `order.confirmed` appeared, one cancelled for
//! INSUFFICIENT_STOCK, one left to expire (RESERVATION_EXPIRED); a record that is not Avro is
//! produced onto `order.created` under the key of the second order (both readers dead-letter
//! it), and twelve more orders of a store that never received inventory (cancelled
//! INVALID_ORDER) spread keys over the partitions.
//!
//! Then `tap` reads every topic of the saga: all ten event schemas decode, with key, partition,
//! offset and headers; `--key`, `--where`, `--limit`, `--partition`/`--from-offset` select what
//! they should; the garbage record is printed with its error class and tap goes on; an unknown
//! topic is a clear error; `--follow` prints a record produced after it started and stops on
//! SIGINT. `trace` reconstructs each order's timeline with the state after each event, and
//! reads only the partition its key maps to: the partitions it reports (`--json` `scanned`) are
//! those rdkafka's `murmur2_random` partitioner chose for the records of that key (in the
//! producers of the test and of the workers).
//!
//! `ORDERFLOW_KEEP_INSPECT_DIR=1` keeps the worker log and state (always kept, with their path
//! printed, when the test fails). `--nocapture` shows the commands' output.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{fails, free_port, http_status, ok, spawn_workers, tail, wait_for, Guarded, RunDir};
use orderflow_api::events::*;
use orderflow_api::Event;
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use rdkafka::util::Timeout;
use serde_json::Value;

const HQ: &str = "HQ-INS";
const STORE: &str = "ST-INS";
/// A store that never received inventory: its orders fail UNKNOWN_STORE.
const NOWHERE: &str = "ST-INS-NOWHERE";
const P1: &str = "P-INS-1";
const P2: &str = "P-INS-2";
/// Completed by the POS: P1 ×3 (stock 10).
const DONE: &str = "O-INS-DONE";
/// Cancelled INSUFFICIENT_STOCK: P2 ×3 (stock 1).
const SHORT: &str = "O-INS-SHORT";
/// Left to expire: P1 ×2.
const LATE: &str = "O-INS-LATE";
/// Orders of the store without inventory, to spread keys over the partitions.
const HASH_ORDERS: usize = 12;
/// Partitions of every saga topic in `topology.toml`.
const PARTITIONS: i32 = 6;
/// How long each step may take to show its effect.
const STEP: Duration = Duration::from_secs(90);
/// Every event schema of the saga (the short order's HQ fallback request and the stores' ledger
/// entries on `stock.commands` included, issue 16).
const SCHEMAS: [&str; 13] = [
    "OrderCreated",
    "StockReserved",
    "StockReservationFailed",
    "OrderConfirmed",
    "OrderCancelled",
    "OrderCompleted",
    "StockUpdated",
    "StockReservationExpired",
    "StockReservationReleased",
    "InventoryAdjusted",
    "OrderSettled",
    "StockAllocation",
    "StockLedgerEntry",
];

// ------------------------------------------------------------------------------------------
// The broker from the test's side.

/// The test's broker clients (see `common::Kafka`).
type Kafka = common::Kafka;

impl Kafka {
    /// Produces `bytes` to `topic` with `key` and `headers` (the topology's producer: idempotent,
    /// `murmur2_random`); returns (partition, offset).
    fn produce_bytes(&self, topic: &str, key: &str, bytes: &[u8], headers: &[(&str, &str)]) -> (i32, i64) {
        let mut hs = OwnedHeaders::new();
        for (k, v) in headers {
            hs = hs.insert(Header { key: k, value: Some(*v) });
        }
        let record = FutureRecord::to(topic).key(key).payload(bytes).headers(hs);
        let delivery = self
            .rt
            .block_on(self.producer.send(record, Timeout::After(Duration::from_secs(30))))
            .unwrap_or_else(|(e, _)| panic!("producing to {topic}: {e}"));
        (delivery.partition, delivery.offset)
    }

    fn produce(&self, topic: &str, key: &str, event: &Event, headers: &[(&str, &str)]) -> (i32, i64) {
        self.produce_bytes(topic, key, &self.codec.encode_local(event).expect("event encodes"), headers)
    }

    /// Every decodable event of `topic`.
    fn events(&self, topic: &str) -> Vec<Event> {
        common::read_topic(&self.broker, topic, PARTITIONS)
            .iter()
            .filter_map(|m| m.payload().and_then(|v| self.codec.decode_local(v).ok()))
            .collect()
    }
}

// ------------------------------------------------------------------------------------------
// `orderflow tap` and `orderflow trace`.

/// `orderflow tap <args>`: its JSON lines.
fn tap(bootstrap: &str, args: &[&str]) -> Vec<Value> {
    let out = ok(bootstrap, "tap", args);
    out.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("tap line is not JSON ({e}): {l}"))).collect()
}

/// `orderflow trace ORDER --json`.
fn trace(bootstrap: &str, order: &str) -> Value {
    let out = ok(bootstrap, "trace", &[order, "--json"]);
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("trace --json is not JSON ({e}):\n{out}"))
}

fn created(order: &str, store: &str, product: &str, quantity: i32, t: i64) -> Event {
    OrderCreated {
        event_id: format!("inspect-test-{order}"),
        occurred_at: t,
        order_id: order.into(),
        customer_id: "C-INS".into(),
        hq_id: HQ.into(),
        store_id: store.into(),
        items: vec![OrderItem { product_id: product.into(), quantity, unit_price: 1000 }],
    }
    .into()
}

fn cancellation<'a>(events: &'a [Event], order: &str) -> Option<&'a OrderCancelled> {
    events.iter().find_map(|e| match e {
        Event::OrderCancelled(c) if c.order_id == order => Some(c),
        _ => None,
    })
}

/// The (event, state after) of the steps of a `trace --json` that are not repartitioned copies.
fn story(t: &Value) -> Vec<(String, String)> {
    t["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .filter(|s| s["copy_of"].is_null())
        .map(|s| (s["event"].as_str().unwrap().to_string(), s["state_after"].as_str().unwrap().to_string()))
        .collect()
}

fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
    v.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
}

/// The partitions a trace read in `topic`.
fn scanned(t: &Value, topic: &str) -> BTreeSet<i64> {
    t["scanned"].as_array().expect("scanned").iter().filter(|s| s["topic"] == topic).map(|s| s["partition"].as_i64().unwrap()).collect()
}

// ------------------------------------------------------------------------------------------

#[test]
fn tap_and_trace_show_the_saga() {
    let broker = common::Broker::start();
    let b = broker.bootstrap.as_str();
    let run_dir = RunDir::create("orderflow-inspect-", "ORDERFLOW_KEEP_INSPECT_DIR", "inspect: worker log and state");
    let root = common::repo_root();
    common::create_topics(&root.join("topology.toml"), b);
    let port = free_port();
    let (mut workers, log) = spawn_workers(b, run_dir.path(), port, "inspect-test", &["--reservation-ttl", "5s"]);
    let fast = Duration::from_millis(100);
    wait_for("ready workers (/readyz 200)", &log, &mut workers, STEP, fast * 3, || {
        (http_status(port, "/readyz") == Some(200)).then_some(())
    });
    let k = Kafka::new(b);
    let t0 = orderflow_runtime::worker::now_ms();

    // The store: P1 ×10, P2 ×1.
    let restock = InventoryAdjusted {
        event_id: "inspect-test-restock".into(),
        occurred_at: t0,
        hq_id: HQ.into(),
        store_id: STORE.into(),
        adjustment_type: change_reason::RESTOCK.into(),
        reference_id: "inspect-test".into(),
        items: vec![AdjustedItem { product_id: P1.into(), delta: 10 }, AdjustedItem { product_id: P2.into(), delta: 1 }],
        to_store_id: None,
        reason: None,
        operator: None,
    };
    k.produce("inventory.adjusted", &store_key(HQ, STORE), &restock.into(), &[("origin", "inspect-test")]);
    wait_for("the restock (stock.updated RESTOCK of both products)", &log, &mut workers, STEP, fast * 3, || {
        let restocked: BTreeSet<String> = k
            .events("stock.updated")
            .into_iter()
            .filter_map(|e| match e {
                Event::StockUpdated(u) if u.change_reason == change_reason::RESTOCK => Some(u.product_id),
                _ => None,
            })
            .collect();
        (restocked.len() == 2).then_some(())
    });

    // A record that is not Avro, under SHORT's key, then the three orders.
    let garbage = b"inspect-test: this is not Avro";
    let (gp, go) = k.produce_bytes("order.created", SHORT, garbage, &[]);
    let mut delivered: BTreeMap<String, i32> = BTreeMap::new();
    for (order, product, quantity) in [(SHORT, P2, 3), (LATE, P1, 2), (DONE, P1, 3)] {
        let (p, _) =
            k.produce("order.created", order, &created(order, STORE, product, quantity, t0), &[("traceparent", "00-inspect-test")]);
        delivered.insert(order.to_string(), p);
    }
    assert_eq!(delivered[SHORT], gp, "one key, one partition");

    // The POS completes DONE as soon as it is confirmed (well within the 5 s TTL).
    let reservation = wait_for("order.confirmed of DONE", &log, &mut workers, STEP, fast, || {
        k.events("order.confirmed").into_iter().find_map(|e| match e {
            Event::OrderConfirmed(c) if c.order_id == DONE => Some(c.reservation_id),
            _ => None,
        })
    });
    let completed = OrderCompleted {
        event_id: "inspect-test-pos-complete".into(),
        occurred_at: orderflow_runtime::worker::now_ms(),
        order_id: DONE.into(),
        reservation_id: reservation,
        hq_id: HQ.into(),
        store_id: STORE.into(),
        items: vec![SoldItem { product_id: P1.into(), quantity: 3, actual_price: 1000 }],
        total_amount: 3000,
    };
    k.produce("order.completed", DONE, &completed.into(), &[]);

    // Orders of a store without inventory: INVALID_ORDER, keys spread over the partitions.
    let hash_orders: Vec<String> = (0..HASH_ORDERS).map(|i| format!("O-INS-HASH-{i}")).collect();
    for o in &hash_orders {
        let (p, _) = k.produce("order.created", o, &created(o, NOWHERE, P1, 1, t0), &[]);
        delivered.insert(o.clone(), p);
    }

    wait_for("every order's outcome", &log, &mut workers, STEP, fast * 5, || {
        let cancelled = k.events("order.cancelled");
        if let Some(c) = cancellation(&cancelled, DONE) {
            panic!("DONE was cancelled: {c:?}");
        }
        let sold = k.events("stock.updated").iter().any(|e| matches!(e, Event::StockUpdated(u) if u.reference_id == DONE));
        let short = cancellation(&cancelled, SHORT).map(|c| c.reason.as_str()) == Some(cancel_reason::INSUFFICIENT_STOCK);
        let late = cancellation(&cancelled, LATE).map(|c| c.reason.as_str()) == Some(cancel_reason::RESERVATION_EXPIRED);
        let invalid = hash_orders.iter().all(|o| cancellation(&cancelled, o).is_some());
        (sold && short && late && invalid).then_some(())
    });
    // Every reader of order.created dead-lettered the garbage: the deduplicator alone since the
    // order joins read its repartition topics (issue 19).
    let readers = orderflow_runtime::topology::load(&root.join("topology.toml"))
        .unwrap()
        .topology
        .workers
        .values()
        .filter(|w| w.inputs.iter().any(|i| i == "order.created"))
        .count();
    assert_eq!(readers, 1, "only the deduplicator reads order.created");
    wait_for("the dead letter of the garbage", &log, &mut workers, STEP, fast * 5, || {
        (tap(b, &["order.created.dlq"]).len() >= readers).then_some(())
    });

    // ---------------------------------------------------------------- tap
    let topology = orderflow_runtime::topology::load(&root.join("topology.toml")).unwrap().topology;
    let mut schemas = BTreeSet::new();
    // (topic, key) -> partitions the records of that key are on.
    let mut placed: BTreeMap<(String, String), BTreeSet<i64>> = BTreeMap::new();
    for (topic, spec) in &topology.topics {
        let lines = tap(b, &[topic]);
        assert!(!lines.is_empty(), "tap {topic} printed nothing");
        for l in &lines {
            assert_eq!(l["topic"], topic.as_str(), "{l}");
            let (p, o) = (l["partition"].as_i64().expect("partition"), l["offset"].as_i64().expect("offset"));
            assert!((0..PARTITIONS as i64).contains(&p) && o >= 0, "{l}");
            assert!(l["timestamp"].as_i64().is_some_and(|t| t >= t0 - 60_000), "{l}");
            assert!(l["time"].as_str().is_some_and(|t| t.ends_with('Z')), "{l}");
            assert!(l["headers"].is_object(), "{l}");
            let key = l["key"].as_str().unwrap_or_else(|| panic!("no key: {l}")).to_string();
            placed.entry((topic.clone(), key.clone())).or_default().insert(p);
            if l.get("error").is_some() {
                continue;
            }
            let event = l["event"].as_str().unwrap_or_else(|| panic!("no event: {l}"));
            assert!(l["value"]["eventId"].is_string(), "{l}");
            schemas.insert(event.to_string());
            // The key is what the topology says the topic is keyed by.
            let v = &l["value"];
            let expected = match spec.key.as_str() {
                "orderId" => v["orderId"].as_str().map(str::to_string),
                "productId" => v["productId"].as_str().map(str::to_string),
                // On stock.commands the stock hierarchy's records go to the shard that handles
                // them (`hqId:` for the HQ's ledger, issue 16): the event's command key.
                "hqId:storeId" => {
                    let e = Event::from_json(event, v.clone()).unwrap_or_else(|err| panic!("{err}: {l}"));
                    Some(if topic == "stock.commands" { e.command_key() } else { e.store_key() })
                }
                other => panic!("unexpected key {other}"),
            };
            assert_eq!(Some(key), expected, "{topic}: {l}");
        }
        if topic == "order.created" {
            println!("$ orderflow tap order.created --key {DONE}  (one line of the full tap)");
            println!("{}", lines.iter().find(|l| l["key"] == DONE).unwrap());
            // The garbage, with its error class; tap went on to the next record of the partition.
            let g = lines.iter().find(|l| l["partition"] == gp && l["offset"] == go).expect("the garbage record");
            println!("$ orderflow tap order.created --partition {gp} --from-offset {go} --limit 2");
            println!(
                "{}",
                tap(b, &["order.created", "--partition", &gp.to_string(), "--from-offset", &go.to_string(), "--limit", "2"])
                    .iter()
                    .map(Value::to_string)
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            assert_eq!(g["error"]["class"], "not_avro", "{g}");
            assert!(g["error"]["message"].as_str().unwrap().contains("not Avro"), "{g}");
            assert_eq!(g["value_hex"], garbage.iter().map(|b| format!("{b:02x}")).collect::<String>(), "{g}");
            assert!(g.get("value").is_none(), "{g}");
            let next = lines.iter().find(|l| l["partition"] == gp && l["offset"] == go + 1).expect("the record after the garbage");
            assert_eq!((next["event"].as_str(), next["key"].as_str()), (Some("OrderCreated"), Some(SHORT)), "{next}");
            assert_eq!(next["headers"]["traceparent"], "00-inspect-test", "{next}");
        }
        if topic == "inventory.adjusted" {
            assert_eq!(lines[0]["headers"]["origin"], "inspect-test", "{}", lines[0]);
        }
    }
    assert_eq!(schemas, SCHEMAS.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>(), "every event schema decoded");
    // Dead-letter topics too, with the runtime's headers.
    let dead = tap(b, &["order.created.dlq"]);
    assert_eq!(dead.len(), readers, "one dead letter per reader: {dead:#?}");
    for d in &dead {
        assert_eq!((d["key"].as_str(), d["error"]["class"].as_str()), (Some(SHORT), Some("not_avro")), "{d}");
        assert_eq!(d["headers"]["orderflow.dlq.error-class"], "not_avro", "{d}");
        assert_eq!(d["headers"]["orderflow.dlq.source-offset"], go.to_string(), "{d}");
    }

    // --key, --where, --limit, --partition, --last.
    let one = tap(b, &["order.created", "--key", DONE]);
    assert_eq!(one.len(), 1, "{one:#?}");
    assert_eq!((one[0]["value"]["orderId"].as_str(), one[0]["partition"].as_i64()), (Some(DONE), Some(delivered[DONE] as i64)));
    let orders = |lines: &[Value]| -> Vec<String> { lines.iter().map(|l| l["value"]["orderId"].as_str().unwrap().to_string()).collect() };
    assert_eq!(orders(&tap(b, &["order.cancelled", "--where", "reason=INSUFFICIENT_STOCK"])), [SHORT]);
    assert_eq!(
        orders(&tap(b, &["order.cancelled", "--where", "reason=RESERVATION_EXPIRED", "--where", &format!("orderId={LATE}")])),
        [LATE]
    );
    assert!(tap(b, &["order.cancelled", "--where", "reason=RESERVATION_EXPIRED", "--where", &format!("orderId={DONE}")]).is_empty());
    assert_eq!(orders(&tap(b, &["order.created", "--where", &format!("items.productId={P2}")])), [SHORT]);
    assert_eq!(tap(b, &["order.cancelled", "--where", "reason=INVALID_ORDER"]).len(), HASH_ORDERS);
    let sale = tap(b, &["stock.updated", "--where", "changeReason=SALE", "--where", &format!("referenceId={DONE}")]);
    assert_eq!(sale.len(), 1, "{sale:#?}");
    assert_eq!((sale[0]["value"]["changeAmount"].as_i64(), sale[0]["value"]["storeStock"]["current"].as_i64()), (Some(-3), Some(7)));
    assert_eq!(tap(b, &["order.created", "--limit", "2"]).len(), 2);
    let last = tap(b, &["order.created", "--partition", &gp.to_string(), "--last", "1"]);
    assert_eq!(last.len(), 1, "{last:#?}");
    assert_eq!(last[0]["partition"].as_i64(), Some(gp as i64));
    fails(b, "tap", &["no.such.topic"], "unknown topic no.such.topic: not on the broker and not a topic of the topology");
    fails(b, "tap", &["order.created", "--partition", "9"], "there is no partition 9");

    // --follow prints a record produced after it started, and stops on SIGINT. It reads from the
    // beginning: a record of its key produced before it started is the marker that it is reading,
    // and only then is the record it must follow produced.
    let follow_record = |event_id: &str| -> Event {
        StockUpdated {
            event_id: event_id.into(),
            occurred_at: orderflow_runtime::worker::now_ms(),
            hq_id: HQ.into(),
            store_id: STORE.into(),
            product_id: "P-INS-FOLLOW".into(),
            hq_stock: None,
            store_stock: StockLevel { previous: 0, current: 1 },
            change_amount: 1,
            change_reason: change_reason::CORRECTION.into(),
            reference_id: "inspect-test".into(),
        }
        .into()
    };
    k.produce("stock.updated", "P-INS-FOLLOW", &follow_record("inspect-test-follow-started"), &[]);
    let mut follower = Command::new(common::orderflow_bin())
        .current_dir(&root)
        .args(["tap", "stock.updated", "--follow", "--key", "P-INS-FOLLOW", "--topology"])
        .arg(root.join("topology.toml"))
        .args(["--bootstrap", b])
        .env_remove("ORDERFLOW_BOOTSTRAP")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tap --follow");
    let pid = follower.id();
    let lines = BufReader::new(follower.stdout.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in lines.lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let line = rx.recv_timeout(Duration::from_secs(30)).expect("tap --follow printed the record produced before it started");
    let line: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(line["value"]["eventId"], "inspect-test-follow-started", "{line}");
    k.produce("stock.updated", "P-INS-FOLLOW", &follow_record("inspect-test-follow"), &[]);
    let line = rx.recv_timeout(Duration::from_secs(30)).expect("tap --follow printed the new record");
    let line: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(line["value"]["eventId"], "inspect-test-follow", "{line}");
    let _ = Command::new("kill").args(["-INT", &pid.to_string()]).status();
    let mut follower = Guarded::new(follower, Duration::from_millis(50));
    let status = follower.wait_for(Duration::from_secs(10)).expect("tap --follow stops on SIGINT");
    assert!(status.success(), "tap --follow exit status {status}");

    // ---------------------------------------------------------------- trace
    let orderid_topics: Vec<&String> = topology.topics.iter().filter(|(_, s)| s.key == "orderId").map(|(t, _)| t).collect();
    // The partitions trace reads are those rdkafka chose for the key, in every orderId topic.
    let check_partitions = |t: &Value, order: &str| {
        for topic in &orderid_topics {
            let read = scanned(t, topic);
            assert_eq!(read.len(), 1, "{order}: trace read {topic} partitions {read:?}");
            let p = *read.iter().next().unwrap();
            if topic.as_str() == "order.created" {
                assert_eq!(p, delivered[order] as i64, "{order}: partition of order.created");
            }
            if let Some(seen) = placed.get(&(topic.to_string(), order.to_string())) {
                assert_eq!(seen, &BTreeSet::from([p]), "{order}: {topic} records of the key are on {seen:?}, trace read {p}");
            }
        }
        assert_eq!(t["order_id"], order);
    };

    let done = trace(b, DONE);
    check_partitions(&done, DONE);
    assert_eq!(
        story(&done),
        pairs(&[
            ("OrderCreated", "ORDER_CREATED"),
            ("StockReserved", "ORDER_CREATED"),
            ("OrderConfirmed", "ORDER_CONFIRMED/PAYMENT_WAIT"),
            ("OrderCompleted", "ORDER_COMPLETED"),
            // The SALE row comes from the HQ's ledger, one hop after the settlement (issue 16).
            ("OrderSettled", "ORDER_COMPLETED"),
            ("StockUpdated", "ORDER_COMPLETED"),
        ]),
        "{done:#}"
    );
    assert_eq!(done["final_state"], "ORDER_COMPLETED");
    let steps = done["steps"].as_array().unwrap();
    let times: Vec<i64> = steps.iter().map(|s| s["timestamp"].as_i64().unwrap()).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "time order: {times:?}");
    let sale_step = steps.iter().find(|s| s["event"] == "StockUpdated").unwrap();
    assert!(sale_step["detail"].as_str().unwrap().contains(&format!("SALE {P1} -3")), "{sale_step}");
    // The repartitioned copies: in stock.commands (one partition, the store's, as the
    // deduplicator chose it) and the order's in order.created.repartition (issue 19).
    let mut copies: Vec<(&str, &str)> =
        steps.iter().filter(|s| !s["copy_of"].is_null()).map(|s| (s["event"].as_str().unwrap(), s["topic"].as_str().unwrap())).collect();
    copies.sort();
    assert_eq!(
        copies,
        [("OrderCompleted", "stock.commands"), ("OrderCreated", "order.created.repartition"), ("OrderCreated", "stock.commands")],
        "{done:#}"
    );
    let store = store_key(HQ, STORE);
    assert_eq!(done["store"], store.as_str());
    let commands = scanned(&done, "stock.commands");
    assert_eq!(commands.len(), 1);
    assert_eq!(placed.get(&("stock.commands".to_string(), store.clone())), Some(&commands), "stock.commands partition of {store}");
    assert_eq!(placed.get(&("stock.updated".to_string(), P1.to_string())), Some(&scanned(&done, "stock.updated")), "stock.updated of {P1}");
    assert!(done["dead_letters"].as_array().unwrap().is_empty());
    let text = ok(b, "trace", &[DONE]);
    println!("$ orderflow trace {DONE}\n{text}");
    assert!(text.contains("final state ORDER_COMPLETED") && text.contains("ORDER_CONFIRMED/PAYMENT_WAIT"), "{text}");

    let short = trace(b, SHORT);
    check_partitions(&short, SHORT);
    assert_eq!(
        story(&short),
        pairs(&[
            ("OrderCreated", "ORDER_CREATED"),
            // Short at the store: the HQ fallback's answer (a deny: this HQ holds no stock).
            ("StockAllocation", "ORDER_CREATED"),
            ("StockReservationFailed", "ORDER_CREATED"),
            ("OrderCancelled", "ORDER_CANCELLED(INSUFFICIENT_STOCK)"),
        ]),
        "{short:#}"
    );
    let failed = short["steps"].as_array().unwrap().iter().find(|s| s["event"] == "StockReservationFailed").unwrap();
    assert!(failed["detail"].as_str().unwrap().contains(&format!("{P2} requested 3, available 1")), "{failed}");
    let dls = short["dead_letters"].as_array().unwrap();
    assert_eq!(dls.len(), readers, "{short:#}");
    assert!(dls.iter().all(|d| d["class"] == "not_avro" && d["source_offset"] == go), "{dls:#?}");
    assert_eq!(short["undecodable"][0]["record"], format!("order.created[{gp}]@{go}"), "{short:#}");
    assert_eq!(short["undecodable"][0]["class"], "not_avro");
    println!("$ orderflow trace {SHORT}\n{}", ok(b, "trace", &[SHORT]));

    let late = trace(b, LATE);
    check_partitions(&late, LATE);
    assert_eq!(
        story(&late),
        pairs(&[
            ("OrderCreated", "ORDER_CREATED"),
            ("StockReserved", "ORDER_CREATED"),
            ("OrderConfirmed", "ORDER_CONFIRMED/PAYMENT_WAIT"),
            ("StockReservationExpired", "ORDER_CONFIRMED/PAYMENT_WAIT"),
            ("StockReservationReleased", "ORDER_CONFIRMED/PAYMENT_WAIT"),
            ("OrderCancelled", "ORDER_CANCELLED(RESERVATION_EXPIRED)"),
        ]),
        "{late:#}"
    );
    assert_eq!(late["final_state"], "ORDER_CANCELLED(RESERVATION_EXPIRED)");
    println!("$ orderflow trace {LATE}\n{}", ok(b, "trace", &[LATE]));
    println!("$ orderflow trace {LATE} --json\n{late}");

    // Twelve more keys: the partition trace computes is the one rdkafka chose, each time.
    let mut spread = BTreeSet::new();
    for o in &hash_orders {
        let t = trace(b, o);
        check_partitions(&t, o);
        spread.insert(delivered[o]);
        assert_eq!(t["final_state"], "ORDER_CANCELLED(INVALID_ORDER)", "{t:#}");
        let events: Vec<String> = story(&t).into_iter().map(|(e, _)| e).collect();
        assert_eq!(events, ["OrderCreated", "StockReservationFailed", "OrderCancelled"], "{t:#}");
        // The store without inventory: its stock.commands partition, as the deduplicator chose it.
        let nowhere = store_key(HQ, NOWHERE);
        assert_eq!(placed.get(&("stock.commands".to_string(), nowhere.clone())), Some(&scanned(&t, "stock.commands")), "{o}");
    }
    assert!(spread.len() >= 3, "the keys spread over the partitions: {spread:?}");

    fails(b, "trace", &["O-INS-NOPE"], "no event of order O-INS-NOPE");

    let (status, _) = workers.terminate(Duration::from_secs(30));
    assert!(status.is_some_and(|s| s.success()), "workers did not stop cleanly ({status:?}); log:\n{}", tail(&log, 20));
    drop(broker);
}
