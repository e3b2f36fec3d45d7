use std::time::Instant;

use orderflow_api::Event;

use super::*;

#[test]
fn metrics_are_summed_over_labels() {
    let text = "# HELP orderflow_events_consumed_total x\n# TYPE orderflow_events_consumed_total counter\n\
        orderflow_events_consumed_total{outcome=\"processed\",topic=\"a\",worker=\"w\"} 3\n\
        orderflow_events_consumed_total{outcome=\"duplicate\",topic=\"a\",worker=\"w\"} 2\n\
        orderflow_events_consumed_totalx 100\n\
        orderflow_state_restore_seconds_sum{source=\"local\",worker=\"w\"} 0.5\n\
        orderflow_state_restore_seconds_sum{source=\"changelog\",worker=\"w\"} 1.5\n\
        orderflow_state_restore_seconds_sum{source=\"changelog\",worker=\"v\"} 1\n\
        orderflow_state_restored_records_total{worker=\"w\"} 1e6\n";
    assert_eq!(metric_sum(text, "orderflow_events_consumed_total"), 5.0);
    assert_eq!(metric_sum(text, "orderflow_state_restored_records_total"), 1_000_000.0);
    assert_eq!(metric_sum(text, "missing"), 0.0);
    let by = metric_by_label(text, "orderflow_state_restore_seconds_sum", "source");
    assert_eq!(by, BTreeMap::from([("changelog".to_string(), 2.5), ("local".to_string(), 0.5)]));
}

#[test]
fn http_status_and_body() {
    assert_eq!(parse_http("HTTP/1.1 503 Service Unavailable\r\ncontent-length: 9\r\n\r\nnot ready"), Some((503, "not ready".into())));
    assert_eq!(parse_http("HTTP/1.1 200 OK\r\n\r\n"), Some((200, String::new())));
    assert_eq!(parse_http(""), None);
}

#[test]
fn meter_skips_the_warmup_and_stops_at_the_duration() {
    let t0 = Instant::now();
    let mut m = Meter::new(Duration::from_secs(1), Duration::from_secs(2), 1_000_000);
    assert!(m.observe(t0, 0).is_none());
    assert!(m.observe(t0, 10).is_none());
    assert!(m.observe(t0 + Duration::from_secs(1), 100).is_none());
    let w = m.observe(t0 + Duration::from_secs(3), 300).expect("window over");
    assert_eq!(w.measured_records, 200);
    assert!((w.records_per_s - 100.0).abs() < 1e-9);
    assert!(!w.drained);
}

#[test]
fn meter_stops_when_drained() {
    let t0 = Instant::now();
    let mut m = Meter::new(Duration::from_secs(1), Duration::from_secs(60), 500);
    m.observe(t0, 1);
    m.observe(t0 + Duration::from_secs(1), 100);
    let w = m.observe(t0 + Duration::from_secs(2), 500).expect("drained");
    assert!(w.drained);
    assert_eq!(w.measured_records, 400);
}

#[test]
fn inputs_are_deterministic_and_keyed_as_the_topology_says() {
    let a = worker_input("stock-reserver", Layout::FiveHqs, 100, 0).unwrap();
    let b = worker_input("stock-reserver", Layout::FiveHqs, 100, 0).unwrap();
    assert_eq!(a.len(), 100 + STORES);
    assert!(a.iter().zip(&b).all(|(x, y)| x.1 == y.1 && x.2 == y.2));
    assert!(matches!(a[0].2, Event::InventoryAdjusted(_)));
    for (_, key, e) in &a {
        assert_eq!(key, &e.store_key());
    }
    assert!(worker_input("canceller", Layout::FiveHqs, 1, 0).is_err());
    assert!(worker_input("deduplicator", Layout::HqFallback, 1, 0).is_err(), "layouts are for the stock reserver");
}

/// Issue 16's benchmark input: one HQ and 100 stores; in `hq-fallback` the HQ's restock comes
/// first (keyed by the HQ), the stores lack every 20th product, and about 12% of the orders name
/// one; `store-only` stocks everything at the stores.
#[test]
fn hierarchy_layouts_put_one_hq_over_100_stores_and_some_products_at_hq_only() {
    let fallback = worker_input("stock-reserver", Layout::HqFallback, 10_000, 0).unwrap();
    assert_eq!(fallback.len(), 10_000 + 1 + HIERARCHY_STORES);
    let Event::InventoryAdjusted(hq) = &fallback[0].2 else { panic!("{:?}", fallback[0]) };
    assert_eq!((fallback[0].1.as_str(), hq.store_id.as_str(), hq.items.len()), ("HQ-H:", "", PRODUCTS));
    let Event::InventoryAdjusted(st) = &fallback[1].2 else { panic!() };
    assert_eq!(st.items.len(), PRODUCTS - PRODUCTS / HQ_ONLY_EVERY);
    assert!(st.items.iter().all(|i| i.product_id != "P-B0" && i.product_id != "P-B20"));
    let stores: std::collections::BTreeSet<&str> = fallback.iter().map(|(_, k, _)| k.as_str()).collect();
    assert_eq!(stores.len(), 1 + HIERARCHY_STORES);
    let short = fallback
        .iter()
        .filter(|(_, _, e)| matches!(e, Event::OrderCreated(o) if o.items.iter().any(|i| i.product_id.trim_start_matches("P-B").parse::<usize>().unwrap() % HQ_ONLY_EVERY == 0)))
        .count();
    assert!((1_000..1_400).contains(&short), "{short} of 10,000 orders need the HQ");
    let only = worker_input("stock-reserver", Layout::StoreOnly, 10_000, 0).unwrap();
    assert_eq!(only.len(), 10_000 + HIERARCHY_STORES);
    let Event::InventoryAdjusted(st) = &only[0].2 else { panic!() };
    assert_eq!(st.items.len(), PRODUCTS);
    // The same orders in both layouts.
    assert!(only[HIERARCHY_STORES..].iter().zip(&fallback[HIERARCHY_STORES + 1..]).all(|(a, b)| a.2 == b.2));
}

#[test]
fn the_peer_benchmark_switches_the_hq_fallback_off_in_its_topology_copy() {
    let text = "avro_dir = \"avro\"\n[workers.stock-reserver]\nkind = \"stock-reserver\"\n\n[workers.stock-reserver.hq_fallback]\nenabled = true\nkeep_at_hq = 0\n\n[workers.other]\nenabled = true\n";
    let out = super::peer::without_hq_fallback(text).unwrap();
    assert!(out.contains("[workers.stock-reserver.hq_fallback]\nenabled = false"), "{out}");
    assert!(out.contains("[workers.other]\nenabled = true\n"), "only the reserver's section changes: {out}");
    assert!(super::peer::without_hq_fallback("[workers.x]\n").is_err());
}
