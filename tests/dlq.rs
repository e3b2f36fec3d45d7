//! Dead-letter tooling on a real broker (issue 4): `orderflow dlq list | show | redrive`.
//!
//! `redrive_after_fixing_the_cause_is_processed_once`: the five workers run in one
//! `orderflow run` process. A store is restocked (`inventory.adjusted`), an order reserved
//! (`order.created`), and then the POS's `OrderCompleted` of that order is produced by mistake
//! onto `order.created`: the one worker reading that topic (the deduplicator: no other worker
//! reads an external topic since issue 19, the canceller reads `order.created.repartition`)
//! dead-letters it as `wrong_schema`, and no sale is applied. `dlq list` shows the record (the
//! `--worker` filter selects it by the deduplicator and nothing by the canceller), `dlq show`
//! decodes it, the CLI's errors are checked, a `--dry-run` redrive sends nothing, and
//! `dlq redrive --into order.completed` sends the event once: the sale is applied exactly once.
//! A second redrive is absorbed by the workers' `eventId` dedupe: still exactly one sale once the
//! pipeline settled. (One send per source record when several workers dead-lettered it is
//! covered by the `dlq` unit tests: no external topic has two readers any more.)
//!
//! `ORDERFLOW_KEEP_DLQ_DIR=1` keeps the worker log and state (always kept, with their path
//! printed, when the test fails).

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use common::{cli, fails, free_port, http_get, metric, ok, spawn_workers, stderr, stdout, tail, wait_for, Guarded, RunDir};
use orderflow_api::events::*;
use orderflow_api::Event;
use rdkafka::message::Message;
use rdkafka::producer::FutureRecord;
use rdkafka::util::Timeout;
use serde_json::Value;

const HQ: &str = "HQ-DLQ";
const STORE: &str = "ST-DLQ";
const PRODUCT: &str = "P-DLQ-1";
const ORDER: &str = "O-DLQ-1";
const RESTOCK: i64 = 10;
const QUANTITY: i32 = 3;
/// Partitions of every saga topic in `topology.toml`.
const PARTITIONS: i32 = 6;
/// How long each step may take to show its effect.
const STEP: Duration = Duration::from_secs(90);
/// How often a step's effect is checked.
const POLL: Duration = Duration::from_millis(300);

// ------------------------------------------------------------------------------------------
// The broker from the test's side: producing events, reading topics.

/// The test's broker clients (see `common::Kafka`).
type Kafka = common::Kafka;

/// One record read back: its value decoded (if it decodes), its headers as text.
struct Record {
    event: Option<Event>,
    headers: Vec<(String, String)>,
}

impl Kafka {
    /// Produces `event` (Avro single-object encoding) to `topic` with `key`; returns where it landed.
    fn produce(&self, topic: &str, key: &str, event: &Event) -> (i32, i64) {
        let bytes = self.codec.encode_local(event).expect("event encodes");
        let delivery = self
            .rt
            .block_on(self.producer.send(FutureRecord::to(topic).key(key).payload(&bytes), Timeout::After(Duration::from_secs(30))))
            .unwrap_or_else(|(e, _)| panic!("producing to {topic}: {e}"));
        (delivery.partition, delivery.offset)
    }

    /// Every record of `topic`, from the low to the high watermark of each partition.
    fn read_all(&self, topic: &str) -> Vec<Record> {
        common::read_topic(&self.broker, topic, PARTITIONS)
            .iter()
            .map(|m| Record { event: m.payload().and_then(|v| self.codec.decode_local(v).ok()), headers: common::header_pairs(m) })
            .collect()
    }

    /// `stock.updated` SALE records of [`ORDER`].
    fn sales(&self) -> Vec<StockUpdated> {
        self.read_all("stock.updated")
            .into_iter()
            .filter_map(|r| match r.event {
                Some(Event::StockUpdated(u)) if u.change_reason == change_reason::SALE && u.reference_id == ORDER => Some(u),
                _ => None,
            })
            .collect()
    }

    fn count(&self, topic: &str) -> usize {
        self.read_all(topic).len()
    }
}

// ------------------------------------------------------------------------------------------
// `orderflow dlq` output.

/// The redrive summary: the last line of stdout.
fn summary(out: &str) -> Value {
    serde_json::from_str(out.lines().last().expect("a summary line")).unwrap_or_else(|e| panic!("summary is not JSON ({e}):\n{out}"))
}

/// The `dlq list --json` record lines (the last line holds the counts).
fn listed(out: &str) -> Vec<Value> {
    common::json_lines(out).into_iter().filter(|v| v.get("dlq_topic").is_some()).collect()
}

// ------------------------------------------------------------------------------------------

#[test]
fn redrive_after_fixing_the_cause_is_processed_once() {
    let broker = common::Broker::start();
    let b = broker.bootstrap.as_str();
    let run_dir = RunDir::create("orderflow-dlq-", "ORDERFLOW_KEEP_DLQ_DIR", "dlq: worker log and state");
    common::create_topics(&common::repo_root().join("topology.toml"), b);
    let port = free_port();
    let (mut workers, log) = spawn_workers(b, run_dir.path(), port, "dlq-test", &["--reservation-ttl", "10m"]);
    wait_for("ready workers (/readyz 200)", &log, &mut workers, STEP, POLL, || {
        matches!(http_get(port, "/readyz"), Some((200, _))).then_some(())
    });
    let k = Kafka::new(b);
    let t0 = orderflow_runtime::worker::now_ms();

    // A restocked store and a reserved order.
    let restock = InventoryAdjusted {
        event_id: "dlq-test-restock".into(),
        occurred_at: t0,
        hq_id: HQ.into(),
        store_id: STORE.into(),
        adjustment_type: change_reason::RESTOCK.into(),
        reference_id: "dlq-test".into(),
        items: vec![AdjustedItem { product_id: PRODUCT.into(), delta: RESTOCK }],
        to_store_id: None,
        reason: None,
        operator: None,
    };
    k.produce("inventory.adjusted", &store_key(HQ, STORE), &restock.into());
    // Inputs of different topics are not ordered: the order waits until the stock is there.
    wait_for("the restock (stock.updated RESTOCK)", &log, &mut workers, STEP, POLL, || {
        k.read_all("stock.updated").into_iter().find(
            |r| matches!(&r.event, Some(Event::StockUpdated(u)) if u.change_reason == change_reason::RESTOCK && u.product_id == PRODUCT),
        )
    });
    let created = OrderCreated {
        event_id: "dlq-test-order".into(),
        occurred_at: t0,
        order_id: ORDER.into(),
        customer_id: "C-DLQ".into(),
        hq_id: HQ.into(),
        store_id: STORE.into(),
        items: vec![OrderItem { product_id: PRODUCT.into(), quantity: QUANTITY, unit_price: 1000 }],
    };
    k.produce("order.created", ORDER, &created.into());
    let reservation_id = wait_for("stock.reserved for the order", &log, &mut workers, STEP, POLL, || {
        if let Some(Event::StockReservationFailed(f)) = k.read_all("stock.reservation.failed").into_iter().find_map(|r| r.event) {
            panic!("the order was not reserved: {f:?}");
        }
        k.read_all("stock.reserved").into_iter().find_map(|r| match r.event {
            Some(Event::StockReserved(e)) if e.order_id == ORDER => Some(e.reservation_id),
            _ => None,
        })
    });

    // The POS's completion, produced onto the wrong topic.
    let completed = OrderCompleted {
        event_id: "dlq-test-pos-complete".into(),
        occurred_at: orderflow_runtime::worker::now_ms(),
        order_id: ORDER.into(),
        reservation_id,
        hq_id: HQ.into(),
        store_id: STORE.into(),
        items: vec![SoldItem { product_id: PRODUCT.into(), quantity: QUANTITY, actual_price: 1000 }],
        total_amount: 3000,
    };
    let (src_partition, src_offset) = k.produce("order.created", ORDER, &completed.into());

    // The one reader of order.created, the deduplicator, dead-letters it as wrong_schema.
    let readers = readers_of("order.created");
    assert_eq!(readers, BTreeSet::from(["deduplicator".to_string()]), "the workers reading order.created in topology.toml");
    let records = wait_for("the dead-letter record of the misplaced OrderCompleted", &log, &mut workers, STEP, POLL, || {
        let recs = listed(&ok(b, "dlq", &["list", "--json"]));
        let ours: Vec<Value> =
            recs.into_iter().filter(|r| r["source_offset"] == src_offset && r["source_topic"] == "order.created").collect();
        (!ours.is_empty()).then_some(ours)
    });
    // (A doubled one would also fail the count of all dead-letter records at the end.)
    assert_eq!(records.len(), 1, "{records:#?}");
    let by: BTreeSet<String> = records.iter().map(|r| r["worker"].as_str().unwrap().to_string()).collect();
    assert_eq!(by, readers, "{records:#?}");
    for r in &records {
        assert_eq!(r["dlq_topic"], "order.created.dlq", "{r}");
        assert_eq!(r["class"], "wrong_schema", "{r}");
        assert_eq!(r["source_partition"], src_partition, "{r}");
        assert_eq!(r["key"], ORDER, "{r}");
        assert!(r["attempts"].as_u64().is_some_and(|n| n >= 1), "{r}");
        assert!(r["time"].as_str().is_some_and(|t| t.ends_with('Z')), "{r}");
    }
    assert!(k.sales().is_empty(), "the misplaced completion must not be applied");

    // The table and the filters.
    let table = ok(b, "dlq", &["list"]);
    println!("$ orderflow dlq list\n{table}");
    assert!(table.contains(&format!("order.created[{src_partition}]@{src_offset}")) && table.contains("wrong_schema"), "{table}");
    assert!(table.contains("1 dead-letter record(s)"), "{table}");
    let only =
        listed(&ok(b, "dlq", &["list", "--json", "--topic", "order.created.dlq", "--worker", "deduplicator", "--class", "wrong_schema"]));
    assert_eq!(only.len(), 1, "{only:#?}");
    // The canceller no longer reads order.created: it dead-lettered nothing of it.
    assert!(listed(&ok(b, "dlq", &["list", "--json", "--topic", "order.created.dlq", "--worker", "canceller"])).is_empty());
    assert!(listed(&ok(b, "dlq", &["list", "--json", "--class", "invalid"])).is_empty());

    // One record in full, its value decoded.
    let (dp, doff) = (records[0]["partition"].as_i64().unwrap().to_string(), records[0]["offset"].as_i64().unwrap().to_string());
    let shown: Value =
        serde_json::from_str(ok(b, "dlq", &["show", "order.created.dlq", &dp, &doff, "--json"]).trim()).expect("show --json");
    assert_eq!(shown["schema"], "OrderCompleted", "{shown}");
    assert_eq!(shown["event"]["orderId"], ORDER, "{shown}");
    let headers: Vec<&str> = shown["headers"].as_array().unwrap().iter().map(|h| h["key"].as_str().unwrap()).collect();
    for h in ["orderflow.dlq.source-topic", "orderflow.dlq.worker", "orderflow.dlq.error-class", "orderflow.dlq.time"] {
        assert!(headers.contains(&h), "{h} missing from {headers:?}");
    }
    println!("$ orderflow dlq show order.created.dlq {dp} {doff}\n{}", ok(b, "dlq", &["show", "order.created.dlq", &dp, &doff]));

    // Clear errors.
    fails(b, "dlq", &["list", "--topic", "nope.dlq"], "unknown dead-letter topic nope.dlq");
    fails(b, "dlq", &["redrive", "--topic", "order.created", "--all"], "not a dead-letter topic");
    fails(
        b,
        "dlq",
        &["redrive", "--topic", "order.created.dlq", "--partition", &dp, "--from", "5", "--to", "2"],
        "--from 5 is after --to 2",
    );
    fails(
        b,
        "dlq",
        &["redrive", "--topic", "order.created.dlq", "--partition", &dp, "--from", "999"],
        "--from 999 is outside order.created.dlq",
    );
    fails(b, "dlq", &["redrive", "--topic", "order.created.dlq", "--all", "--class", "invalid"], "empty selection");
    fails(b, "dlq", &["show", "order.created.dlq", &dp, "999"], "offset 999 is outside");
    fails(
        b,
        "dlq",
        &["redrive", "--topic", "order.created.dlq", "--all", "--into", "no.such.topic"],
        "target topic no.such.topic does not exist",
    );

    // Back to the source topic it would only be dead-lettered again: the redrive says so.
    let o = cli(b, "dlq", &["redrive", "--topic", "order.created.dlq", "--all", "--dry-run"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("OrderCompleted is not a schema order.created carries"), "{}", stderr(&o));
    assert_eq!(summary(&stdout(&o))["by_target"]["order.created"], 1, "{}", stdout(&o));

    // A dry run sends nothing.
    let redrive = ["redrive", "--topic", "order.created.dlq", "--all", "--class", "wrong_schema", "--into", "order.completed"];
    let dry = ok(b, "dlq", &[&redrive[..], &["--dry-run"]].concat());
    println!("$ orderflow dlq {} --dry-run\n{dry}", redrive.join(" "));
    let s = summary(&dry);
    assert_eq!(
        (s["dry_run"].as_bool(), s["selected"].as_u64(), s["planned"].as_u64(), s["sent"].as_u64()),
        (Some(true), Some(1), Some(1), Some(0)),
        "{s}"
    );
    assert_eq!(s["skipped_same_source"], 0, "{s}");
    // `dlq redrive` flushes its producer before it exits: whatever it sent is in the topic now.
    // The redrive below is the later marker: only its record may be there after it.
    assert_eq!(k.count("order.completed"), 0, "a dry run produced something");

    // The redrive: one record for the dead letter; one sale.
    let sent = ok(b, "dlq", &redrive);
    println!("$ orderflow dlq {}\n{sent}", redrive.join(" "));
    let s = summary(&sent);
    assert_eq!(
        (s["dry_run"].as_bool(), s["selected"].as_u64(), s["sent"].as_u64(), s["failed"].as_u64()),
        (Some(false), Some(1), Some(1), Some(0)),
        "{s}"
    );
    assert_eq!((s["skipped_same_source"].as_u64(), s["refused"].as_u64()), (Some(0), Some(0)), "{s}");
    assert_eq!(s["by_target"]["order.completed"], 1, "{s}");
    let sale = wait_for("the sale (stock.updated SALE)", &log, &mut workers, STEP, POLL, || k.sales().into_iter().next());
    assert_eq!(
        (sale.store_stock.previous, sale.store_stock.current, sale.change_amount),
        (RESTOCK, RESTOCK - QUANTITY as i64, -(QUANTITY as i64)),
        "{sale:?}"
    );
    let redriven = k.read_all("order.completed");
    assert_eq!(redriven.len(), 1, "one record: the redrive's (the dry run's would precede it)");
    let h = &redriven[0].headers;
    assert!(h.iter().any(|(k, v)| k == "orderflow.redrive.from" && v.starts_with("order.created.dlq/")), "{h:?}");
    assert!(h.iter().any(|(k, _)| k == "orderflow.redrive.time"), "{h:?}");
    assert!(!h.iter().any(|(k, _)| k.starts_with("orderflow.dlq.")), "dead-letter headers must not be re-produced: {h:?}");
    assert!(matches!(&redriven[0].event, Some(Event::OrderCompleted(e)) if e.order_id == ORDER));
    settle(&k, port, &log, &mut workers);
    assert_eq!(k.sales().len(), 1, "exactly one sale after the first redrive");
    let commands = k.count("stock.commands");

    // Again: re-produced, and absorbed by the eventId dedupe.
    let again = summary(&ok(b, "dlq", &redrive));
    assert_eq!((again["sent"].as_u64(), again["skipped_same_source"].as_u64()), (Some(1), Some(0)), "{again}");
    assert_eq!(k.count("order.completed"), 2);
    settle(&k, port, &log, &mut workers);
    let sales = k.sales();
    assert_eq!(sales.len(), 1, "still exactly one sale after the second redrive: {sales:?}");
    assert_eq!(k.count("stock.commands"), commands, "the deduplicator forwarded the repeated completion");
    assert_eq!(
        metric(
            port,
            "orderflow_events_consumed_total",
            &[("worker", "deduplicator"), ("topic", "order.completed"), ("outcome", "duplicate")]
        ),
        1.0
    );
    let dead = listed(&ok(b, "dlq", &["list", "--json"]));
    assert_eq!(dead.len(), 1, "nothing else was dead-lettered: {dead:#?}");

    let (status, _) = workers.terminate(Duration::from_secs(30));
    assert!(status.is_some_and(|s| s.success()), "workers did not stop cleanly ({status:?}); log:\n{}", tail(&log, 20));
}

/// The workers of `topology.toml` reading `topic`.
fn readers_of(topic: &str) -> BTreeSet<String> {
    let loaded = orderflow_runtime::topology::load(&common::repo_root().join("topology.toml")).expect("topology.toml loads");
    loaded.topology.workers.iter().filter(|(_, w)| w.inputs.iter().any(|i| i == topic)).map(|(n, _)| n.clone()).collect()
}

/// Waits until every worker consumed every record of its inputs that matter here: the
/// deduplicator all of `order.completed`, the stock reserver all of `stock.commands` (counted by
/// `orderflow_events_consumed_total`, any outcome), and then until each committed its group
/// offsets past the last of them, which it does with (or after) the outputs of those records:
/// what they led to is in the topics when this returns.
fn settle(k: &Kafka, port: u16, log: &Path, workers: &mut Guarded) {
    let steps = [("deduplicator", "order.completed"), ("stock-reserver", "stock.commands")];
    for (worker, topic) in steps {
        let n = k.count(topic) as f64;
        wait_for(&format!("{worker} consuming all {n} record(s) of {topic}"), log, workers, STEP, POLL, || {
            (metric(port, "orderflow_events_consumed_total", &[("worker", worker), ("topic", topic)]) >= n).then_some(())
        });
    }
    common::wait_group_past(&k.broker, &steps, PARTITIONS, log, workers, STEP);
}
