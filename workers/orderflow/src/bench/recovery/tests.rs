use orderflow_api::Event;

use super::*;

#[test]
fn status_gives_rss_and_peak_in_mib() {
    let text = "Name:\torderflow\nVmPeak:\t 1000000 kB\nVmHWM:\t  204800 kB\nVmRSS:\t  102400 kB\nThreads:\t9\n";
    assert_eq!(parse_status(text), Some(Memory { rss_mib: 100.0, peak_rss_mib: 200.0 }));
    assert_eq!(parse_status("VmRSS:\t1 kB\n"), None);
    // A field whose name only starts alike does not count.
    assert_eq!(parse_status("VmHWMx:\t5 kB\nVmHWM:\t2048 kB\nVmRSS:\t1024 kB\n"), Some(Memory { rss_mib: 1.0, peak_rss_mib: 2.0 }));
}

fn line(ts: &str, message: &str, fields: &str) -> String {
    let extra = if fields.is_empty() { String::new() } else { format!(",{fields}") };
    format!(r#"{{"timestamp":"{ts}","level":"INFO","fields":{{"message":"{message}"{extra}}},"target":"orderflow_runtime::worker"}}"#)
}

#[test]
fn log_lines_parse_with_nested_or_flat_fields() {
    let l = parse_log_line(&line("2026-11-21T13:25:30.250000Z", "state restored", r#""records":10,"seconds":0.5,"source":"local""#))
        .expect("parses");
    assert_eq!(l.message, "state restored");
    assert_eq!(l.num("records"), Some(10.0));
    assert!((l.ts - 1_795_267_530.25).abs() < 1e-6, "{}", l.ts);
    let flat = parse_log_line(r#"{"timestamp":"2026-11-21T13:25:30Z","level":"INFO","message":"worker ready","worker":"w"}"#).unwrap();
    assert_eq!(flat.message, "worker ready");
    assert!(parse_log_line("not json").is_none());
    assert!(parse_log_line(r#"{"fields":{"message":"no time"}}"#).is_none());
}

#[test]
fn phases_split_start_to_ready_at_the_log_lines() {
    let lines: Vec<LogLine> = [
        line("2026-11-21T13:25:30.200Z", "worker started", ""),
        line("2026-11-21T13:25:33.500Z", "state restored", r#""partition":0,"records":100,"units":2,"seconds":0.25,"source":"changelog""#),
        line("2026-11-21T13:25:33.750Z", "state restored", r#""partition":1,"records":300,"units":3,"seconds":0.25,"source":"changelog""#),
        line("2026-11-21T13:25:33.800Z", "worker ready", ""),
        // A later rebalance does not move the phases.
        line("2026-11-21T13:25:40.000Z", "state restored", r#""partition":1,"records":0,"units":0,"seconds":0.1,"source":"local""#),
    ]
    .iter()
    .filter_map(|l| parse_log_line(l))
    .collect();
    let t0 = lines[0].ts - 0.2;
    let p = phases(&lines, t0, lines[3].ts + 0.01);
    let close = |a: Option<f64>, b: f64| (a.unwrap() - b).abs() < 1e-3;
    assert!(close(p.process_start_s, 0.2), "{p:?}");
    assert!(close(p.group_join_s, 3.05), "{p:?}");
    assert!(close(p.restore_s, 0.5), "{p:?}");
    assert!(close(p.resume_s, 0.05), "{p:?}");
    assert!(close(p.readyz_poll_s, 0.01), "{p:?}");
    assert_eq!(p.assignments, None);
    let r = restore_log(&lines);
    assert_eq!((r.partitions, r.records, r.units), (3, 400, 5));
    assert_eq!(r.sources, BTreeMap::from([("changelog".to_string(), 2), ("local".to_string(), 1)]));
    assert!((r.seconds - 0.6).abs() < 1e-9);
    assert!((r.records_per_s.unwrap() - 400.0 / 0.6).abs() < 1e-6);
    // Without any line nothing is claimed.
    let none = phases(&[], 0.0, 1.0);
    assert_eq!((none.process_start_s, none.group_join_s, none.restore_s), (None, None, None));
    assert_eq!(restore_log(&[]).records_per_s, None);
}

#[test]
fn an_assignment_line_is_the_join_end_when_the_worker_logs_one() {
    let lines: Vec<LogLine> = [
        line("2026-11-21T13:25:30.000Z", "worker started", ""),
        line("2026-11-21T13:25:33.000Z", "partitions assigned", ""),
        line("2026-11-21T13:25:36.000Z", "partitions assigned", ""),
        line("2026-11-21T13:25:36.500Z", "state restored", r#""records":0,"seconds":0.01,"source":"local""#),
        line("2026-11-21T13:25:36.600Z", "worker ready", ""),
    ]
    .iter()
    .filter_map(|l| parse_log_line(l))
    .collect();
    let p = phases(&lines, lines[0].ts, lines[4].ts);
    assert!((p.group_join_s.unwrap() - 6.0).abs() < 1e-3, "{p:?}");
    assert!((p.restore_s.unwrap() - 0.5).abs() < 1e-3, "{p:?}");
    assert_eq!(p.assignments, Some(2));
}

#[test]
fn loads_are_cumulative_and_count_keys() {
    let mut rng = Rng(1);
    // Stock: 1,000 keys over 25 stores = 40 products each, in restocks of 15 items.
    let a = load_input(Kind::StockReserver, 0, 1_000, 15, 0, &mut rng);
    assert_eq!(a.len(), 25 * 3);
    let items = |v: &[(String, String, Event)]| -> usize {
        v.iter().map(|(_, _, e)| if let Event::InventoryAdjusted(i) = e { i.items.len() } else { 0 }).sum()
    };
    assert_eq!(items(&a) as u64, stock_keys(1_000));
    let b = load_input(Kind::StockReserver, 1_000, 2_000, 15, 0, &mut rng);
    assert_eq!(items(&b) as u64, stock_keys(2_000) - stock_keys(1_000));
    let ids: std::collections::BTreeSet<&str> = a.iter().chain(&b).map(|(_, _, e)| e.event_id()).collect();
    assert_eq!(ids.len(), a.len() + b.len(), "restock eventIds are unique across steps");
    for (topic, key, e) in &a {
        assert_eq!(topic, "stock.commands");
        assert_eq!(key, &e.store_key());
    }
    assert_eq!(stock_keys(1_001), 1_025);
    // Orders: one remembered eventId each, keyed by orderId.
    let o = load_input(Kind::Deduplicator, 10, 20, 15, 0, &mut rng);
    assert_eq!(o.len(), 10);
    assert!(o.iter().all(|(t, k, e)| t == "order.created" && Some(k.as_str()) == e.order_id()));
    assert_eq!(o[0].2.event_id(), "bench-order-10");
}
