//! `orderflow doctor` on a real broker (issue 19): it finds the producer mistakes that would
//! split a join, from the broker alone, with the same check the deduplicator counts.
//!
//! 1. Topics as `orderflow topics` created them and nothing produced: clean, exit 0.
//! 2. An outside producer on librdkafka's default partitioner (`consistent_random`, CRC32) writes
//!    orders keyed by `orderId`; a few more go without a key and with the customer id as key.
//!    The report counts, for `order.created`, exactly the records the test knows are on another
//!    partition than `murmur2_random` gives their key (`partition`), the keyless ones (`no_key`)
//!    and the foreign-keyed ones (`key_mismatch`), names the likely partitioner, and exits 1.
//! 3. A topology copy that declares another partition count for `stock.commands` than the
//!    broker has: reported as a partition count problem.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use orderflow_api::events::{OrderCreated, OrderItem};
use orderflow_api::Event;
use orderflow_runtime::kafka::{client_config, Side};
use orderflow_runtime::partitioner::partition_for;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use serde_json::Value;

/// Orders the outside producer sends keyed by `orderId`.
const KEYED: usize = 40;
const KEYLESS: usize = 3;
const FOREIGN_KEYED: usize = 2;

/// `orderflow doctor --json` against `topology`; returns its output and the parsed report.
fn doctor(topology: &Path, bootstrap: &str) -> (Output, Value) {
    let out = Command::new(common::orderflow_bin())
        .current_dir(common::repo_root())
        .args(["doctor", "--json", "--topology"])
        .arg(topology)
        .args(["--bootstrap", bootstrap])
        .env("RUST_BACKTRACE", "0")
        .env_remove("ORDERFLOW_BOOTSTRAP")
        .env_remove("ORDERFLOW_TOPOLOGY")
        .output()
        .expect("run orderflow doctor");
    let report = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("doctor --json prints JSON ({e}):\n{}\n{}", common::stdout(&out), common::stderr(&out)));
    (out, report)
}

fn topic<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["topics"].as_array().expect("topics").iter().find(|t| t["topic"] == name).unwrap_or_else(|| panic!("{name} in {report}"))
}

fn order(i: usize) -> OrderCreated {
    OrderCreated {
        event_id: format!("E-DOC-{i}"),
        occurred_at: common::now_ms(),
        order_id: format!("O-DOC-{i}"),
        customer_id: format!("C-DOC-{i}"),
        hq_id: "HQ-DOC".into(),
        store_id: "ST-DOC".into(),
        items: vec![OrderItem { product_id: "P-1".into(), quantity: 1, unit_price: 100 }],
    }
}

#[test]
fn doctor_reports_misrouted_records_and_partition_counts_from_the_broker() {
    let broker = common::Broker::start();
    let dir = broker.dir().to_path_buf();
    let b = broker.bootstrap.clone();
    let as_declared = common::topology_copy(&dir, "topology.toml", |t| t);
    common::create_topics(&as_declared, &b);

    // 1. Nothing produced, every topic as declared.
    let (out, report) = doctor(&as_declared, &b);
    assert!(out.status.success(), "a fresh broker is clean: {report:#}\n{}", common::stderr(&out));
    assert_eq!(report["problems"].as_array().map(Vec::len), Some(0), "{report:#}");

    // 2. An outside producer on librdkafka's default partitioner.
    let k = common::Kafka::new(&b);
    let mut outside = client_config(&k.broker, Side::Producer);
    outside.set("partitioner", "consistent_random");
    let outside: FutureProducer = {
        let _guard = k.rt.enter();
        outside.create().expect("outside producer")
    };
    let send = |key: Option<&str>, o: &OrderCreated| -> i32 {
        let bytes = k.codec.encode_local(&Event::OrderCreated(o.clone())).expect("encodes");
        let mut record = FutureRecord::<str, [u8]>::to("order.created").payload(&bytes);
        if let Some(key) = key {
            record = record.key(key);
        }
        k.rt.block_on(outside.send(record, Timeout::After(Duration::from_secs(30))))
            .unwrap_or_else(|(e, _)| panic!("produce: {e}"))
            .partition
    };
    let mut elsewhere = 0;
    for i in 0..KEYED {
        let o = order(i);
        if send(Some(&o.order_id), &o) != partition_for(o.order_id.as_bytes(), 6) {
            elsewhere += 1;
        }
    }
    for i in KEYED..KEYED + KEYLESS {
        send(None, &order(i));
    }
    for i in KEYED + KEYLESS..KEYED + KEYLESS + FOREIGN_KEYED {
        let o = order(i);
        send(Some(&o.customer_id), &o);
    }
    println!("doctor: {KEYED} keyed orders from a consistent_random producer, {elsewhere} of them off murmur2's partition");
    assert!(elsewhere > 0, "CRC32 and murmur2 agree on every one of {KEYED} keys: the test proves nothing");

    let (out, report) = doctor(&as_declared, &b);
    assert!(!out.status.success(), "misrouted records are a problem: {report:#}");
    let created = topic(&report, "order.created");
    assert_eq!(created["sampled"], (KEYED + KEYLESS + FOREIGN_KEYED) as u64, "{created:#}");
    assert_eq!(created["misrouted"]["partition"], elsewhere as u64, "{created:#}");
    assert_eq!(created["misrouted"]["no_key"], KEYLESS as u64, "{created:#}");
    assert_eq!(created["misrouted"]["key_mismatch"], FOREIGN_KEYED as u64, "{created:#}");
    let likely = created["likely_partitioners"].as_object().expect("likely partitioners");
    assert_eq!(likely.len(), 1, "every keyed one points at CRC32: {created:#}");
    assert!(likely.keys().all(|p| p.starts_with("consistent_random")), "{created:#}");
    assert!(topic(&report, "order.completed")["misrouted"].as_object().is_some_and(|m| m.is_empty()), "{report:#}");

    // 3. The topology declares 12 partitions for stock.commands (the stock reserver's only input,
    // so the copy still passes `topology check`); the broker has 6.
    let twelve = common::topology_copy(&dir, "topology-12.toml", |t| {
        t.replace("[topics.\"stock.commands\"]\npartitions = 6", "[topics.\"stock.commands\"]\npartitions = 12")
    });
    let (_, report) = doctor(&twelve, &b);
    let adjusted = topic(&report, "stock.commands");
    assert_eq!((adjusted["declared_partitions"].as_i64(), adjusted["broker_partitions"].as_i64()), (Some(12), Some(6)), "{adjusted:#}");
    let problems: Vec<&str> = report["problems"].as_array().expect("problems").iter().filter_map(Value::as_str).collect();
    assert!(
        problems.iter().any(|p| p.starts_with("topic stock.commands has 6 partitions on the broker, the topology declares 12")),
        "{problems:#?}"
    );
}
