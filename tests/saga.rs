//! The whole saga on a real broker: 1,000 TPC-H orders plus the two seed 000 scenarios through
//! every worker (`orderflow demo`), then the invariants of the domain contract checked on what
//! the topics and the stock reserver's state store hold.

mod common;

use std::process::Command;

use serde_json::Value;

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
    let s: Value = serde_json::from_slice(&std::fs::read(&summary_path).expect("summary written")).expect("summary is JSON");

    // Every order reaches exactly one terminal outcome.
    assert_eq!(s["orders"], 1002, "{stdout}");
    assert_eq!(s["without_terminal_outcome"].as_array().unwrap().len(), 0, "{stdout}");
    assert_eq!(s["with_several_outcomes"].as_array().unwrap().len(), 0, "{stdout}");
    let by = &s["by_outcome"];
    let count = |k: &str| by[k].as_u64().unwrap_or(0);
    let terminal = count("ORDER_COMPLETED")
        + count("ORDER_CANCELLED/INSUFFICIENT_STOCK")
        + count("ORDER_CANCELLED/PAYMENT_FAILED")
        + count("ORDER_CANCELLED/RESERVATION_EXPIRED");
    assert_eq!(terminal, 1002, "outcomes {by}");
    // Every branch of the saga was taken: stock failure, payment, payment failure, expiry.
    for k in
        ["ORDER_COMPLETED", "ORDER_CANCELLED/INSUFFICIENT_STOCK", "ORDER_CANCELLED/PAYMENT_FAILED", "ORDER_CANCELLED/RESERVATION_EXPIRED"]
    {
        assert!(count(k) > 0, "no order ended {k}: {by}");
    }

    // The seed scenarios give the documented results.
    for seed in s["seed_scenarios"].as_array().unwrap() {
        assert_eq!(seed["pass"], true, "{seed}");
    }
    assert_eq!(s["seed_scenarios"].as_array().unwrap().len(), 2);

    // Stock conservation per store and product, nothing negative, one payload per eventId.
    assert_eq!(s["conservation_violations"].as_array().unwrap().len(), 0, "{}", s["conservation_violations"]);
    assert_eq!(s["negative_stock"].as_array().unwrap().len(), 0, "{}", s["negative_stock"]);
    assert_eq!(s["payload_conflicts"].as_array().unwrap().len(), 0);
    let stores = s["stores"].as_array().unwrap();
    assert_eq!(stores.len(), 27, "25 TPC-H nations + 2 seed stores");
    for st in stores {
        let (initial, available, reserved, sold) = (
            st["initial"].as_i64().unwrap(),
            st["available"].as_i64().unwrap(),
            st["reserved"].as_i64().unwrap(),
            st["sold"].as_i64().unwrap(),
        );
        assert_eq!(initial, available + reserved + sold, "{st}");
        assert_eq!(st["conserved"], true, "{st}");
    }

    // Nothing was dead-lettered and every order.created was consumed into the repartition topic.
    let topics = &s["events_per_topic"];
    for (topic, n) in topics.as_object().unwrap() {
        if topic.ends_with(".dlq") {
            assert_eq!(n, 0, "{topic} holds records");
        }
    }
    assert_eq!(topics["order.created"], 1002);
    // The stock answers, read by this test at read_committed (the raw high − low watermark counts
    // of the summary include transaction markers on Kafka): one per order, no eventId twice.
    let kafka = common::Kafka::new(&broker.bootstrap);
    let report = common::exactly_once_report(&kafka.broker, &kafka.codec, &["stock.reserved", "stock.reservation.failed"], 6);
    for (topic, r) in &report {
        assert!(r.repeated_event_ids.is_empty() && r.undecodable == 0, "{topic}: {r:?}");
    }
    assert_eq!(report["stock.reserved"].committed + report["stock.reservation.failed"].committed, 1002, "one stock answer per order: {report:?}");
}
