//! `orderflow replay --into` on a real broker (issue 5).
//!
//! `replay_into_by_offsets_and_by_time_and_errors`: scratch topics only, no workers.
//! (a) 20 encoded events on a 3-partition topic, `--from-offset 2 --to-offset 5` into another
//! 3-partition topic: exactly offsets 2, 3, 4 of every partition arrive, each on its source
//! partition, with key, value, original headers and timestamp preserved and the replay headers.
//! (b) two batches with explicit record timestamps ten minutes apart; `--from <second batch>`
//! into a 2-partition topic (so by key): only the second batch arrives.
//! (d) the errors: empty range, beyond the high watermark, unknown topic, unknown worker,
//! `--to` before `--from`, replay into the source without `--yes`, missing target.
//!
//! `replay_of_the_stock_reservers_live_input_is_absorbed`: the five workers in one
//! `orderflow run`; a store is restocked and three orders (one too large) run through the saga
//! until it settled; then all of `stock.commands` is replayed into itself (`--yes`). The stock
//! reserver counts every replayed record as a duplicate and emits nothing new: no second
//! reservation, failure or stock update.
//!
//! `ORDERFLOW_KEEP_REPLAY_DIR=1` keeps the worker log and state (always kept, with their path
//! printed, when the test fails).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::{fails, free_port, http_get, metric, ok, rfc3339, spawn_workers, tail, wait_for, RunDir};
use orderflow_api::events::*;
use orderflow_api::Event;
use orderflow_runtime::kafka::{client_config, Side};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use rdkafka::util::Timeout;
use serde_json::Value;

/// How long each step may take to show its effect.
const STEP: Duration = Duration::from_secs(90);
/// How often a step's effect is checked.
const POLL: Duration = Duration::from_millis(300);

// ------------------------------------------------------------------------------------------
// The broker from the test's side.

/// The test's broker clients (see `common::Kafka`).
type Kafka = common::Kafka;

/// One record read back.
#[derive(Debug, Clone)]
struct Record {
    partition: i32,
    offset: i64,
    key: Option<String>,
    value: Vec<u8>,
    timestamp: Option<i64>,
    headers: Vec<(String, String)>,
}

impl Record {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

impl Kafka {
    fn create_topic(&self, name: &str, partitions: i32) {
        let admin: AdminClient<DefaultClientContext> = client_config(&self.broker, Side::Admin).create().expect("admin");
        let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
        let r = self.rt.block_on(admin.create_topics([&topic], &AdminOptions::new())).expect("create topics");
        for t in r {
            t.unwrap_or_else(|(t, e)| panic!("creating {t}: {e}"));
        }
    }

    /// Produces `event` to `topic` with `key`, `headers` and an explicit timestamp (`None`: now);
    /// returns (partition, offset).
    fn produce(&self, topic: &str, key: &str, event: &Event, headers: &[(&str, &str)], timestamp: Option<i64>) -> (i32, i64) {
        let bytes = self.codec.encode_local(event).expect("event encodes");
        let mut hs = OwnedHeaders::new();
        for (k, v) in headers {
            hs = hs.insert(Header { key: k, value: Some(v.as_bytes()) });
        }
        let mut record = FutureRecord::to(topic).key(key).payload(&bytes).headers(hs);
        if let Some(ts) = timestamp {
            record = record.timestamp(ts);
        }
        let d = self
            .rt
            .block_on(self.producer.send(record, Timeout::After(Duration::from_secs(30))))
            .unwrap_or_else(|(e, _)| panic!("producing to {topic}: {e}"));
        (d.partition, d.offset)
    }

    fn partitions(&self, topic: &str) -> i32 {
        let c: BaseConsumer = self.consumer();
        let md = c.fetch_metadata(Some(topic), Duration::from_secs(10)).expect("metadata");
        md.topics()[0].partitions().len() as i32
    }

    fn consumer(&self) -> BaseConsumer {
        let mut config = client_config(&self.broker, Side::Consumer);
        config.set("group.id", format!("orderflow-replay-test-{}", std::process::id()));
        config.create().expect("consumer")
    }

    /// Records in `topic` (every partition, low to high watermark).
    fn read_all(&self, topic: &str) -> Vec<Record> {
        let mut out: Vec<Record> = common::read_topic(&self.broker, topic, self.partitions(topic))
            .iter()
            .map(|m| Record {
                partition: m.partition(),
                offset: m.offset(),
                key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                value: m.payload().unwrap_or_default().to_vec(),
                timestamp: m.timestamp().to_millis(),
                headers: common::header_pairs(m),
            })
            .collect();
        out.sort_by_key(|r| (r.partition, r.offset));
        out
    }

    fn count(&self, topic: &str) -> usize {
        self.read_all(topic).len()
    }
}

fn adjusted(id: &str, t: i64) -> Event {
    InventoryAdjusted {
        event_id: id.into(),
        occurred_at: t,
        hq_id: "HQ-R".into(),
        store_id: "ST-R".into(),
        adjustment_type: change_reason::RESTOCK.into(),
        reference_id: id.into(),
        items: vec![AdjustedItem { product_id: "P-R".into(), delta: 1 }],
        to_store_id: None,
        reason: None,
        operator: None,
    }
    .into()
}

// ------------------------------------------------------------------------------------------
// `orderflow replay`.

/// Runs `orderflow replay <args>`, asserts it succeeded, returns its summary (last stdout line).
fn replay_ok(bootstrap: &str, args: &[&str]) -> Value {
    let out = ok(bootstrap, "replay", args);
    println!("$ orderflow replay {}\n{out}", args.join(" "));
    serde_json::from_str(out.lines().last().expect("a summary line")).unwrap_or_else(|e| panic!("summary is not JSON ({e}):\n{out}"))
}

/// Runs `orderflow replay <args>`, asserts it failed with `expected` in its stderr.
fn replay_fails(bootstrap: &str, args: &[&str], expected: &str) {
    let err = fails(bootstrap, "replay", args, expected);
    println!("$ orderflow replay {}\n{}", args.join(" "), err.lines().filter(|l| !l.contains("librdkafka")).collect::<Vec<_>>().join("\n"));
}

// ------------------------------------------------------------------------------------------

#[test]
fn replay_into_by_offsets_and_by_time_and_errors() {
    let broker = common::Broker::start();
    let b = broker.bootstrap.as_str();
    let k = Kafka::new(b);
    let now = orderflow_runtime::worker::now_ms();
    let run_dir = RunDir::create("orderflow-replay-", "ORDERFLOW_KEEP_REPLAY_DIR", "replay: summaries");

    // (a) By offsets, into a topic with the same partition count: same partitions.
    k.create_topic("replay.src", 3);
    k.create_topic("replay.dst", 3);
    for i in 0..20 {
        let id = format!("replay-a-{i}");
        k.produce(
            "replay.src",
            &format!("K-{i}"),
            &adjusted(&id, now),
            &[("origin", "replay-test"), ("seq", &i.to_string())],
            Some(now - 1000 + i),
        );
    }
    let source = k.read_all("replay.src");
    assert_eq!(source.len(), 20);
    let summary_path = run_dir.path().join("summary-a.json");
    let s = replay_ok(
        b,
        &["replay.src", "--from-offset", "2", "--to-offset", "5", "--into", "replay.dst", "--json-summary", summary_path.to_str().unwrap()],
    );
    let expected: Vec<&Record> = source.iter().filter(|r| (2..5).contains(&r.offset)).collect();
    assert_eq!(s["mode"], "into", "{s}");
    assert_eq!(s["partitioning"], "same-partition", "{s}");
    assert_eq!(
        (s["read"].as_u64(), s["sent"].as_u64(), s["failed"].as_u64()),
        (Some(expected.len() as u64), Some(expected.len() as u64), Some(0)),
        "{s}"
    );
    assert_eq!(s["ranges"].as_array().unwrap().len(), 3, "{s}");
    let written: Value = serde_json::from_str(&std::fs::read_to_string(&summary_path).expect("--json-summary file")).unwrap();
    assert_eq!(written, s, "--json-summary holds the printed summary");
    let arrived = k.read_all("replay.dst");
    assert_eq!(arrived.len(), expected.len(), "{arrived:#?}");
    let by_source: BTreeMap<String, &Record> =
        arrived.iter().map(|r| (r.header("orderflow.replay.source").expect("source header").to_string(), r)).collect();
    for e in &expected {
        let r = by_source.get(&format!("replay.src/{}/{}", e.partition, e.offset)).unwrap_or_else(|| panic!("{e:?} did not arrive"));
        assert_eq!(r.partition, e.partition, "same partition count: same partition");
        assert_eq!((&r.key, &r.value, r.timestamp), (&e.key, &e.value, e.timestamp), "key, value, timestamp preserved");
        assert_eq!(&r.headers[..2], &e.headers[..], "original headers first, in order");
        let t: i64 = r.header("orderflow.replay.time").expect("time header").parse().unwrap();
        assert!((now..now + 600_000).contains(&t), "replay time {t}");
    }
    for (p, n) in s["by_target_partition"].as_object().unwrap() {
        let p: i32 = p.parse().unwrap();
        assert_eq!(n.as_u64(), Some(expected.iter().filter(|r| r.partition == p).count() as u64), "{s}");
    }

    // (b) By time: two batches ten minutes apart; from the second batch's time, into a topic
    // with another partition count (by key).
    k.create_topic("replay.timed", 3);
    k.create_topic("replay.timed.dst", 2);
    let (t1, t2) = (now - 20 * 60_000, now - 10 * 60_000);
    for i in 0..6 {
        k.produce("replay.timed", &format!("K-{i}"), &adjusted(&format!("replay-b1-{i}"), t1), &[("batch", "1")], Some(t1 + i));
    }
    for i in 0..6 {
        k.produce("replay.timed", &format!("K-{i}"), &adjusted(&format!("replay-b2-{i}"), t2), &[("batch", "2")], Some(t2 + i));
    }
    let s = replay_ok(b, &["replay.timed", "--from", &rfc3339(t2), "--into", "replay.timed.dst", "--rate", "50"]);
    assert_eq!(s["partitioning"], "by-key", "{s}");
    assert_eq!((s["sent"].as_u64(), s["failed"].as_u64()), (Some(6), Some(0)), "{s}");
    assert!(s["seconds"].as_f64().unwrap() >= 0.09, "6 records at 50/s take at least 100 ms: {s}");
    let arrived = k.read_all("replay.timed.dst");
    let batches: BTreeSet<&str> = arrived.iter().map(|r| r.header("batch").unwrap()).collect();
    assert_eq!(batches, BTreeSet::from(["2"]), "{arrived:#?}");
    assert_eq!(arrived.len(), 6);
    assert!(arrived.iter().all(|r| r.timestamp.is_some_and(|t| (t2..t2 + 6).contains(&t))), "{arrived:#?}");
    // A closed time range: the first batch only, relative times.
    let s = replay_ok(b, &["replay.timed", "--from", "-30m", "--to", "-15m", "--into", "replay.timed.dst"]);
    assert_eq!(s["sent"].as_u64(), Some(6), "{s}");
    assert_eq!(k.read_all("replay.timed.dst").iter().filter(|r| r.header("batch") == Some("1")).count(), 6);

    // (d) Errors.
    replay_fails(
        b,
        &["replay.src", "--from-offset", "3", "--to-offset", "3", "--into", "replay.dst"],
        "empty range: no record of replay.src",
    );
    replay_fails(b, &["replay.timed", "--from", "-1m", "--into", "replay.dst"], "empty range");
    replay_fails(b, &["replay.src", "--from-offset", "999", "--into", "replay.dst"], "above the high watermark");
    replay_fails(b, &["replay.src", "--from-offset", "0", "--to-offset", "999", "--into", "replay.dst"], "above the high watermark");
    replay_fails(
        b,
        &["replay.src", "--from-offset", "5", "--to-offset", "2", "--into", "replay.dst"],
        "--to-offset 2 is before --from-offset 5",
    );
    replay_fails(b, &["replay.timed", "--from", "-1m", "--to", "-2h", "--into", "replay.dst"], "is before --from");
    replay_fails(
        b,
        &["no.such.topic", "--from-offset", "0", "--into", "replay.dst"],
        "unknown topic no.such.topic: not in the topology and not on the broker",
    );
    replay_fails(b, &["replay.src", "--from-offset", "0", "--through", "no-such-worker", "--dry-run"], "unknown worker no-such-worker");
    replay_fails(b, &["replay.src", "--from-offset", "0", "--partition", "7", "--into", "replay.dst"], "there is no partition 7");
    replay_fails(b, &["replay.src", "--from-offset", "0", "--into", "replay.src"], "refusing to replay replay.src into itself");
    replay_fails(b, &["replay.src", "--from-offset", "0", "--into", "no.such.target"], "target topic no.such.target does not exist");
    replay_fails(b, &["replay.src", "--from", "yesterday", "--into", "replay.dst"], "RFC 3339");
    assert_eq!(k.count("replay.dst"), expected.len(), "a failed replay sent something");
}

#[test]
fn replay_of_the_stock_reservers_live_input_is_absorbed() {
    const HQ: &str = "HQ-RP";
    const STORE: &str = "ST-RP";
    const PRODUCT: &str = "P-RP-1";
    let broker = common::Broker::start();
    let b = broker.bootstrap.as_str();
    let run_dir = RunDir::create("orderflow-replay-", "ORDERFLOW_KEEP_REPLAY_DIR", "replay: worker log and state");
    common::create_topics(&common::repo_root().join("topology.toml"), b);
    let port = free_port();
    let (mut workers, log) = spawn_workers(b, run_dir.path(), port, "replay-test", &["--reservation-ttl", "10m"]);
    wait_for("ready workers (/readyz 200)", &log, &mut workers, STEP, POLL, || {
        matches!(http_get(port, "/readyz"), Some((200, _))).then_some(())
    });
    let k = Kafka::new(b);
    let t0 = orderflow_runtime::worker::now_ms();

    let restock = InventoryAdjusted {
        event_id: "replay-test-restock".into(),
        occurred_at: t0,
        hq_id: HQ.into(),
        store_id: STORE.into(),
        adjustment_type: change_reason::RESTOCK.into(),
        reference_id: "replay-test".into(),
        items: vec![AdjustedItem { product_id: PRODUCT.into(), delta: 10 }],
        to_store_id: None,
        reason: None,
        operator: None,
    };
    k.produce("inventory.adjusted", &store_key(HQ, STORE), &restock.into(), &[], None);
    wait_for("the restock (stock.updated RESTOCK)", &log, &mut workers, STEP, POLL, || {
        k.read_all("stock.updated").into_iter().find(|r| {
            matches!(k.codec.decode_local(&r.value), Ok(Event::StockUpdated(u)) if u.change_reason == change_reason::RESTOCK && u.product_id == PRODUCT)
        })
    });
    // Three orders: 4 + 3 reserved, then 5 more than what is left: INSUFFICIENT_STOCK.
    for (i, q) in [(1, 4), (2, 3), (3, 5)] {
        let created = OrderCreated {
            event_id: format!("replay-test-order-{i}"),
            occurred_at: t0,
            order_id: format!("O-RP-{i}"),
            customer_id: "C-RP".into(),
            hq_id: HQ.into(),
            store_id: STORE.into(),
            items: vec![OrderItem { product_id: PRODUCT.into(), quantity: q, unit_price: 1000 }],
        };
        k.produce("order.created", &created.order_id.clone(), &created.into(), &[], None);
        // One at a time, so which order fails is fixed.
        wait_for(&format!("a stock answer for O-RP-{i}"), &log, &mut workers, STEP, POLL, || {
            let answered = |topic| k.read_all(topic).iter().any(|r| r.key.as_deref() == Some(&format!("O-RP-{i}")));
            (answered("stock.reserved") || answered("stock.reservation.failed")).then_some(())
        });
    }
    let outputs = ["stock.reserved", "stock.reservation.failed", "stock.reservation.released", "stock.updated"];
    let counts = || outputs.iter().map(|t| (*t, k.count(t))).collect::<BTreeMap<_, _>>();
    // Settled: the reserver committed its group offsets past every record of its input, and with
    // them (one transaction) the outputs of those records.
    let commands = k.count("stock.commands");
    common::wait_group_past(&k.broker, &[("stock-reserver", "stock.commands")], k.partitions("stock.commands"), &log, &mut workers, STEP);
    let before = counts();
    assert_eq!(before["stock.reserved"], 2, "{before:?}");
    assert_eq!(before["stock.reservation.failed"], 1, "{before:?}");
    assert_eq!(before["stock.updated"], 1, "{before:?}");
    let dup_before = metric(port, "orderflow_events_consumed_total", &[("worker", "stock-reserver"), ("outcome", "duplicate")]);
    let processed_before = metric(port, "orderflow_events_consumed_total", &[("worker", "stock-reserver"), ("outcome", "processed")]);

    // Replay all of the reserver's live input into itself.
    let s = replay_ok(b, &["stock.commands", "--from-offset", "0", "--into", "stock.commands", "--yes"]);
    assert_eq!(
        (s["read"].as_u64(), s["sent"].as_u64(), s["failed"].as_u64()),
        (Some(commands as u64), Some(commands as u64), Some(0)),
        "{s}"
    );
    assert_eq!(s["partitioning"], "same-partition", "{s}");
    assert_eq!(k.count("stock.commands"), 2 * commands);

    let dup_after = wait_for("every replayed record counted as a duplicate by the stock reserver", &log, &mut workers, STEP, POLL, || {
        let d = metric(port, "orderflow_events_consumed_total", &[("worker", "stock-reserver"), ("outcome", "duplicate")]);
        (d - dup_before >= commands as f64).then_some(d)
    });
    assert_eq!(dup_after - dup_before, commands as f64);
    // The replayed records are behind the reserver's committed offsets: had one of them led to
    // an output, that output would be written now.
    common::wait_group_past(&k.broker, &[("stock-reserver", "stock.commands")], k.partitions("stock.commands"), &log, &mut workers, STEP);
    assert_eq!(counts(), before, "the replay changed the stock reserver's outputs (a double reservation?)");
    let processed_after = metric(port, "orderflow_events_consumed_total", &[("worker", "stock-reserver"), ("outcome", "processed")]);
    assert_eq!(processed_after, processed_before, "a replayed record was processed again");
    println!("stock.commands: {commands} records replayed, {} duplicates counted; outputs unchanged: {before:?}", dup_after - dup_before);
    let (status, _) = workers.terminate(Duration::from_secs(30));
    assert!(status.is_some_and(|s| s.success()), "orderflow run did not stop cleanly; log:\n{}", tail(&log, 30));
}
