use std::collections::BTreeSet;
use std::path::Path;

use orderflow_api::events::{cancel_reason, OrderCreated};

use super::*;

#[test]
fn percentiles_are_nearest_rank() {
    let v: Vec<i64> = (1..=100).collect();
    assert_eq!(percentile(&v, 0.5), Some(50));
    assert_eq!(percentile(&v, 0.95), Some(95));
    assert_eq!(percentile(&v, 0.99), Some(99));
    assert_eq!(percentile(&v, 1.0), Some(100));
    assert_eq!(percentile(&[7], 0.5), Some(7));
    assert_eq!(percentile(&[], 0.5), None);
    let p = percentiles(vec![30, 10, 20]).unwrap();
    assert_eq!(p, Percentiles { p50: 20, p95: 30, p99: 30, max: 30 });
    assert!(percentiles(Vec::new()).is_none());
}

#[test]
fn the_schedule_offers_rate_orders_per_second() {
    assert_eq!(due(500.0, Duration::ZERO), 1);
    assert_eq!(due(500.0, Duration::from_millis(1)), 1);
    assert_eq!(due(500.0, Duration::from_millis(2)), 2);
    assert_eq!(due(500.0, Duration::from_secs(1)), 501);
    assert_eq!(due(10_000.0, Duration::from_secs(3)), 30_001);
    assert_eq!(due_at(500.0, 0), Duration::ZERO);
    assert_eq!(due_at(500.0, 500), Duration::from_secs(1));
    // Sleeping until `due_at(sent)` makes exactly one more order due.
    for n in [1u64, 7, 499, 12_345] {
        assert_eq!(due(2_000.0, due_at(2_000.0, n)), n + 1);
    }
    assert_eq!(backlog_limit(10.0), BACKLOG_FLOOR);
    assert_eq!(backlog_limit(500.0), 2_500);
    assert_eq!(backlog_limit(10_000.0), 50_000);
}

#[test]
fn writes_per_order_leave_out_the_bench_and_the_pos() {
    let records: BTreeMap<String, i64> = [
        ("order.created", 100),
        ("stock.commands", 185),
        ("order.completed", 85),
        ("order.cancelled", 15),
        ("orderflow-deduplicator-changelog", 190),
        ("order.created.dlq", 0),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let bench = BTreeMap::from([("order.created".to_string(), 100)]);
    let pos = BTreeMap::from([("order.completed".to_string(), 85), ("order.cancelled".to_string(), 15)]);
    let changelogs = BTreeSet::from(["orderflow-deduplicator-changelog".to_string()]);
    let w = writes_per_order(&records, &bench, &pos, &changelogs, 100);
    assert!((w.per_order - 3.75).abs() < 1e-9);
    assert!((w.changelog_per_order - 1.9).abs() < 1e-9);
    assert!((w.pos_per_order - 1.0).abs() < 1e-9);
    assert_eq!(w.per_order_by_topic.keys().collect::<Vec<_>>(), ["orderflow-deduplicator-changelog", "stock.commands"]);
    assert!(!w.records_by_topic.contains_key("order.created.dlq"));
    assert_eq!(w.bench_by_topic["order.cancelled"], 15);
    assert_eq!(writes_per_order(&records, &bench, &pos, &changelogs, 0).per_order, 0.0);
}

#[test]
fn the_topology_copy_sets_the_commit_interval_and_the_schemas() {
    let text = "# c\n[broker]\nbootstrap = \"x\"\n\n[defaults]\nguarantee = \"effectively_once\"\ncommit_interval = \"100ms\"   # note\nmax_batch = 2000\n\n[topics.\"a\"]\npartitions = 6\n";
    let out = topology_copy(text, Duration::from_millis(20), Path::new("/r/avro"));
    assert!(out.starts_with("avro_dir = \"/r/avro\"\n"));
    assert!(out.contains("[defaults]\nguarantee = \"effectively_once\"\ncommit_interval = \"20ms\"\nmax_batch = 2000\n"));
    assert_eq!(out.matches("commit_interval").count(), 1);
    // No commit_interval in [defaults]: added at the end of the table.
    let out = topology_copy("[defaults]\nmax_batch = 1\n[workers.w]\ncommit_interval = \"5ms\"\n", Duration::from_secs(1), Path::new("/a"));
    assert!(out.contains("[defaults]\nmax_batch = 1\ncommit_interval = \"1s\"\n[workers.w]\ncommit_interval = \"5ms\"\n"));
    // No [defaults] at all: appended.
    let out = topology_copy("avro_dir = \"avro\"\n[broker]\n", Duration::from_millis(50), Path::new("/a"));
    assert_eq!(out, "avro_dir = \"/a\"\n[broker]\n[defaults]\ncommit_interval = \"50ms\"\n");
}

#[test]
fn worker_stats_come_from_the_metrics_text() {
    let text = "# HELP x\norderflow_events_consumed_total{outcome=\"processed\",topic=\"a\",worker=\"w\"} 30\n\
        orderflow_events_consumed_total{outcome=\"duplicate\",topic=\"b\",worker=\"w\"} 10\n\
        orderflow_events_consumed_total{outcome=\"processed\",topic=\"a\",worker=\"v\"} 5\n\
        orderflow_commit_seconds_sum{outcome=\"ok\",worker=\"w\"} 0.5\n\
        orderflow_commit_seconds_count{outcome=\"ok\",worker=\"w\"} 4\n\
        orderflow_commit_seconds_count{outcome=\"error\",worker=\"w\"} 9\n\
        orderflow_unit_processing_seconds_sum{worker=\"w\"} 0.1\n\
        orderflow_processing_delay_seconds_sum{worker=\"w\"} 2\n\
        orderflow_processing_delay_seconds_count{worker=\"w\"} 40\n";
    let s = worker_stats(text, "p", &["w".to_string()]);
    let w = &s["w"];
    assert_eq!((w.consumed, w.units.count), (40, 4));
    assert!((w.units.mean_records - 10.0).abs() < 1e-9);
    assert!((w.units.mean_commit_ms - 125.0).abs() < 1e-9);
    assert!((w.units.mean_processing_ms - 25.0).abs() < 1e-9);
    assert!((w.mean_processing_delay_ms - 50.0).abs() < 1e-9);
}

#[test]
fn cycled_orders_get_fresh_ids_and_terminal_states_follow_the_module_docs() {
    let o = |id: &str| OrderCreated {
        event_id: format!("e-{id}"),
        occurred_at: 0,
        order_id: id.into(),
        customer_id: "c".into(),
        hq_id: "h".into(),
        store_id: "s".into(),
        items: vec![],
    };
    let orders = Orders { pool: vec![o("O-1"), o("O-2")] };
    assert_eq!(orders.nth(1).order_id, "O-2");
    assert_eq!(orders.nth(2).order_id, "O-1-c1");
    assert_eq!(orders.nth(5).event_id, "e-O-2-c2");

    let mut tr = Track::new(0, 0, 0, true);
    assert_eq!(tr.terminal_state(), None);
    tr.cancelled = Some(cancel_reason::PAYMENT_FAILED.into());
    assert_eq!(tr.terminal_state(), None, "a reservation still held");
    tr.released = true;
    assert_eq!(tr.terminal_state().as_deref(), Some("CANCELLED/PAYMENT_FAILED"));
    let mut tr = Track::new(0, 0, 0, true);
    tr.cancelled = Some(cancel_reason::INSUFFICIENT_STOCK.into());
    assert_eq!(tr.terminal_state().as_deref(), Some("CANCELLED/INSUFFICIENT_STOCK"));
    let mut tr = Track::new(0, 0, 0, true);
    tr.sold = true;
    assert_eq!(tr.terminal_state().as_deref(), Some("COMPLETED"));
}
