use std::collections::BTreeMap;

use clap::Parser;
use orderflow_runtime::topology::Topology;

use crate::text::{cut, hex_dump, text_or_hex};

use super::*;

fn h(k: &str, v: &str) -> (String, Option<Vec<u8>>) {
    (k.to_string(), Some(v.as_bytes().to_vec()))
}

/// A dead-letter record at `dlq/partition/offset` of source `order.created[sp]@so`.
fn dl(partition: i32, offset: i64, worker: &str, class: &str, so: i64) -> DeadLetter {
    DeadLetter {
        at: Coordinates { topic: "order.created.dlq".into(), partition, offset },
        key: Some(b"O-1".to_vec()),
        value: Some(vec![0xC3, 0x01, 1, 2]),
        value_len: Some(4),
        headers: vec![
            h("traceparent", "00-abc"),
            h(H_SOURCE_TOPIC, "order.created"),
            h(H_SOURCE_PARTITION, "3"),
            h(H_SOURCE_OFFSET, &so.to_string()),
            h(H_WORKER, worker),
            h(H_ERROR_CLASS, class),
            h(H_ERROR_MESSAGE, "OrderCompleted on order.created"),
            h(H_ATTEMPTS, "1"),
            h(H_TIME, "1700000000123"),
        ],
    }
}

#[test]
fn headers_give_source_worker_class_attempts_and_time() {
    let d = dl(3, 7, "canceller", "wrong_schema", 41);
    assert_eq!(d.source(), Some(Coordinates { topic: "order.created".into(), partition: 3, offset: 41 }));
    assert_eq!((d.worker(), d.class(), d.attempts(), d.time_ms()), (Some("canceller"), Some("wrong_schema"), Some(1), Some(1700000000123)));
    assert_eq!(d.value_dropped(), None);
    assert_eq!(d.original_headers().map(|(k, _)| k.as_str()).collect::<Vec<_>>(), vec!["traceparent"]);
    let j = d.list_json();
    assert_eq!(j["source_topic"], "order.created");
    assert_eq!(j["source_offset"], 41);
    assert_eq!(j["time"], "2023-11-14T22:13:20.123Z");
    assert_eq!(j["key"], "O-1");
    assert_eq!(j["value_bytes"], 4);
}

#[test]
fn the_last_occurrence_of_a_header_wins_and_bad_numbers_give_none() {
    let mut d = dl(0, 0, "w", "invalid", 1);
    d.headers.insert(0, h(H_WORKER, "spoofed-by-the-original-record"));
    d.headers.push(h(H_SOURCE_OFFSET, "not a number"));
    assert_eq!(d.worker(), Some("w"));
    assert_eq!(d.source(), None);
    assert_eq!(d.list_json()["source_topic"], "order.created");
    assert_eq!(source_label(&d), "order.created[?]@?");
}

#[test]
fn filter_by_worker_and_class() {
    let d = dl(0, 0, "canceller", "wrong_schema", 1);
    assert!(Filter::default().matches(&d));
    assert!(Filter { worker: Some("canceller".into()), class: Some("wrong_schema".into()) }.matches(&d));
    assert!(!Filter { worker: Some("deduplicator".into()), class: None }.matches(&d));
    assert!(!Filter { worker: None, class: Some("invalid".into()) }.matches(&d));
    assert_eq!(Filter { worker: Some("w".into()), class: Some("c".into()) }.describe(), " with worker w and class c");
}

#[test]
fn one_send_per_source_record_with_original_and_redrive_headers() {
    let records = vec![
        dl(3, 0, "deduplicator", "wrong_schema", 41),
        dl(3, 1, "canceller", "wrong_schema", 41),
        dl(3, 2, "canceller", "wrong_schema", 40),
    ];
    let p = plan(&records, None, 1_700_000_000_999);
    assert_eq!(p.selected, 3);
    assert_eq!(p.sends.len(), 2);
    // In source order: offset 40 first.
    assert_eq!(p.sends[0].from.to_string(), "order.created.dlq/3/2");
    assert_eq!(p.sends[1].from.to_string(), "order.created.dlq/3/0");
    assert_eq!(
        p.skipped_same_source,
        vec![Skipped { record: "order.created.dlq/3/1".into(), same_source_as: "order.created.dlq/3/0".into() }]
    );
    assert!(p.refused.is_empty());
    let s = &p.sends[1];
    assert_eq!(s.target, "order.created");
    assert_eq!((s.key.as_deref(), s.value.as_deref()), (Some(&b"O-1"[..]), Some(&[0xC3, 0x01, 1, 2][..])));
    assert_eq!(s.headers, vec![h("traceparent", "00-abc"), h(H_REDRIVE_FROM, "order.created.dlq/3/0"), h(H_REDRIVE_TIME, "1700000000999")]);
}

#[test]
fn into_overrides_the_target_and_an_earlier_redrive_header_is_replaced() {
    let mut d = dl(1, 5, "deduplicator", "wrong_schema", 2);
    d.headers.insert(1, h(H_REDRIVE_FROM, "order.created.dlq/0/0"));
    d.headers.insert(1, h(H_REDRIVE_TIME, "1"));
    let p = plan(&[d], Some("order.completed"), 7);
    assert_eq!(p.sends[0].target, "order.completed");
    assert_eq!(p.sends[0].headers, vec![h("traceparent", "00-abc"), h(H_REDRIVE_FROM, "order.created.dlq/1/5"), h(H_REDRIVE_TIME, "7")]);
}

#[test]
fn dropped_values_are_refused_and_a_full_copy_of_the_same_source_is_sent() {
    let mut dropped = dl(0, 0, "deduplicator", "oversized", 9);
    dropped.value = None;
    dropped.value_len = None;
    dropped.headers.push(h(H_VALUE_DROPPED, "2000000"));
    let full = dl(0, 1, "canceller", "oversized", 9);
    let p = plan(&[dropped, full], None, 0);
    assert_eq!(p.sends.len(), 1);
    assert_eq!(p.sends[0].from.to_string(), "order.created.dlq/0/1");
    assert_eq!(p.refused.len(), 1);
    assert_eq!(p.refused[0].record, "order.created.dlq/0/0");
    assert!(p.refused[0].reason.contains("2000000 bytes") && p.refused[0].reason.contains("order.created[3]@9"), "{}", p.refused[0].reason);
    assert!(p.skipped_same_source.is_empty());
}

#[test]
fn without_source_headers_a_record_needs_into() {
    let mut d = dl(2, 3, "w", "not_avro", 0);
    d.headers.retain(|(k, _)| !k.starts_with("orderflow.dlq.source"));
    let p = plan(std::slice::from_ref(&d), None, 0);
    assert!(p.sends.is_empty());
    assert!(p.refused[0].reason.contains("--into"), "{:?}", p.refused);
    let p = plan(&[d.clone(), d], Some("x"), 0);
    assert_eq!(p.sends.len(), 2, "no source coordinates: nothing to deduplicate on");
}

#[test]
fn ranges_default_to_every_record_and_reject_offsets_outside_the_watermarks() {
    assert_eq!(range("t", 1, (5, 12), None, None).unwrap(), Range { topic: "t".into(), partition: 1, start: 5, end: 12 });
    assert_eq!(range("t", 1, (5, 12), Some(6), Some(6)).unwrap(), Range { topic: "t".into(), partition: 1, start: 6, end: 7 });
    assert_eq!(range("t", 1, (5, 12), None, Some(11)).unwrap().end, 12);
    let err = |from, to, wm| range("t", 1, wm, from, to).unwrap_err().to_string();
    assert_eq!(err(Some(9), Some(3), (0, 12)), "--from 9 is after --to 3");
    assert_eq!(err(Some(4), None, (5, 12)), "--from 4 is outside t[1]: low watermark 5, high watermark 12 (offsets 5..=11)");
    assert_eq!(err(None, Some(12), (5, 12)), "--to 12 is outside t[1]: low watermark 5, high watermark 12 (offsets 5..=11)");
    assert_eq!(err(Some(0), None, (3, 3)), "--from 0 is outside t[1]: low watermark 3, high watermark 3 (no records)");
    assert_eq!(range("t", 0, (3, 3), None, None).unwrap().start, range("t", 0, (3, 3), None, None).unwrap().end);
}

fn topology() -> Topology {
    let text = r#"
[broker]
bootstrap = "x:1"
[topics.in]
partitions = 2
key = "k"
schema = "S"
[topics.other]
partitions = 2
key = "k"
schema = "S"
dead_letter = "other.poison"
[topics.out]
partitions = 2
key = "k"
schema = "S"
[workers.w]
kind = "a"
inputs = ["in", "other"]
outputs = { out = "out" }
"#;
    orderflow_runtime::topology::parse(text, std::path::Path::new("t.toml")).unwrap().topology
}

#[test]
fn topics_are_found_in_the_topology_or_on_the_broker() {
    let t = topology();
    let broker = BTreeMap::from([("in.dlq".to_string(), 2), ("legacy.dlq".to_string(), 1), ("in".to_string(), 2)]);
    assert_eq!(find_topic("in.dlq", &t, &broker).unwrap(), Found::Present(2));
    assert_eq!(find_topic("other.poison", &t, &broker).unwrap(), Found::NotCreated);
    assert_eq!(find_topic("legacy.dlq", &t, &broker).unwrap(), Found::Present(1));
    let e = find_topic("nope.dlq", &t, &broker).unwrap_err().to_string();
    assert_eq!(
        e,
        "unknown dead-letter topic nope.dlq: not a dead-letter topic of the topology (in.dlq, other.poison) and not a topic on the broker"
    );
    let e = find_topic("in", &t, &broker).unwrap_err().to_string();
    assert_eq!(e, "in is a topic of the topology, not a dead-letter topic; its dead-letter topic is in.dlq");
}

#[test]
fn formatting_helpers() {
    assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
    assert_eq!(cut("short", 80), "short");
    assert_eq!(cut("a\nb", 80), "a b");
    assert_eq!(cut("ééééé", 3), "éé…");
    let dump = hex_dump(&[0xC3, 0x01, b'O', b'-', b'1']);
    assert_eq!(dump, format!("00000000  {:<47}  |..O-1|\n", "c3 01 4f 2d 31"));
    assert_eq!(hex_dump(&[0u8; 17]).lines().count(), 2);
    assert_eq!(text_or_hex(&[0xff, 0x00]), "0xff00");
    assert_eq!(text_or_hex(b"O-1"), "O-1");
}

#[derive(Parser, Debug)]
struct TestCli {
    #[command(subcommand)]
    action: DlqAction,
}

#[test]
fn redrive_needs_all_or_a_partition_and_offsets_need_a_partition() {
    let parse = |args: &[&str]| TestCli::try_parse_from([&["t", "redrive", "--topic", "x.dlq"], args].concat());
    assert!(parse(&["--all"]).is_ok());
    assert!(parse(&["--partition", "1", "--from", "2", "--to", "3"]).is_ok());
    assert!(parse(&[]).is_err(), "no selection");
    assert!(parse(&["--all", "--partition", "1"]).is_err());
    assert!(parse(&["--from", "2"]).is_err(), "--from without --partition");
    let ok = parse(&["--all", "--class", "wrong_schema", "--into", "order.completed", "--dry-run", "--json"]).unwrap();
    match ok.action {
        DlqAction::Redrive(r) => {
            assert!(r.all && r.dry_run && r.json);
            assert_eq!((r.class.as_deref(), r.into.as_deref()), (Some("wrong_schema"), Some("order.completed")));
        }
        other => panic!("{other:?}"),
    }
    assert!(TestCli::try_parse_from(["t", "show", "x.dlq", "1", "2", "--json"]).is_ok());
    assert!(TestCli::try_parse_from(["t", "list", "--topic", "a.dlq", "--topic", "b.dlq", "--class", "invalid"]).is_ok());
}
