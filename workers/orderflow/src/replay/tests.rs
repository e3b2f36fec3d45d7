use std::time::Instant;

use rdkafka::message::{Header, Headers, OwnedHeaders, OwnedMessage};

use super::*;

#[test]
fn times_parse_as_rfc3339_or_relative() {
    assert_eq!(parse_time("2026-11-21T10:00:00Z").unwrap(), TimeSpec::At(1_795_255_200_000));
    assert_eq!(parse_time("2026-11-21T10:00:00.250Z").unwrap(), TimeSpec::At(1_795_255_200_250));
    assert_eq!(parse_time("2026-11-21T11:00:00+01:00").unwrap(), TimeSpec::At(1_795_255_200_000));
    assert_eq!(parse_time("2026-11-21T08:30:00-01:30").unwrap(), TimeSpec::At(1_795_255_200_000));
    assert_eq!(parse_time("now").unwrap(), TimeSpec::Ago(Duration::ZERO));
    assert_eq!(parse_time("-2h").unwrap(), TimeSpec::Ago(Duration::from_secs(7200)));
    assert_eq!(parse_time("-15m").unwrap(), TimeSpec::Ago(Duration::from_secs(900)));
    assert_eq!(parse_time("-1h30m").unwrap(), TimeSpec::Ago(Duration::from_secs(5400)));
    assert_eq!(TimeSpec::Ago(Duration::from_secs(2)).at(10_000), 8_000);
    assert_eq!(TimeSpec::At(5).at(10_000), 5);
    for bad in ["yesterday", "2026-11-21", "2026-11-21T10:00:00", "-2 parsecs", "2h"] {
        let e = format!("{:#}", parse_time(bad).unwrap_err());
        assert!(e.contains("RFC 3339") || e.contains("-<duration>"), "{bad}: {e}");
    }
}
#[test]
fn offset_ranges_are_checked_against_the_watermarks() {
    let r = |wm, from, to| offset_range("t", 2, wm, from, to);
    assert_eq!(r((5, 12), 5, None).unwrap(), PartitionRange { partition: 2, from: 5, to: 12 });
    assert_eq!(r((5, 12), 6, Some(9)).unwrap(), PartitionRange { partition: 2, from: 6, to: 9 });
    assert_eq!(r((5, 12), 7, Some(12)).unwrap().len(), 5);
    assert!(r((5, 12), 12, None).unwrap().is_empty(), "from the high watermark: nothing, not an error");
    assert!(r((5, 12), 8, Some(8)).unwrap().is_empty());
    let err = |wm, from, to| r(wm, from, to).unwrap_err().to_string();
    assert_eq!(err((0, 12), 9, Some(3)), "--to-offset 3 is before --from-offset 9");
    assert_eq!(
        err((5, 12), 4, None),
        "--from-offset 4 is out of retention in t[2]: below the low watermark 5 (offsets before it are deleted); the partition holds offsets 5..=11"
    );
    assert_eq!(
        err((5, 12), 13, None),
        "--from-offset 13 is beyond the end of t[2]: above the high watermark 12; the partition holds offsets 5..=11"
    );
    assert_eq!(
        err((5, 12), 6, Some(20)),
        "--to-offset 20 is beyond the end of t[2]: above the high watermark 12 (--to-offset is exclusive); the partition holds offsets 5..=11"
    );
    assert!(err((3, 3), 0, None).ends_with("the partition holds no record (low and high watermark 3)"));
}

#[test]
fn time_ranges_need_to_after_from_and_map_to_offsets() {
    assert!(time_range(1_000, None).is_ok());
    assert!(time_range(1_000, Some(1_001)).is_ok());
    assert_eq!(
        time_range(2_000, Some(1_000)).unwrap_err().to_string(),
        "--to 1970-01-01T00:00:01.000Z is before --from 1970-01-01T00:00:02.000Z"
    );
    assert_eq!(
        time_range(1_000, Some(1_000)).unwrap_err().to_string(),
        "empty range: --from and --to are both 1970-01-01T00:00:01.000Z (--to is exclusive)"
    );
    // offsets_for_times found both ends.
    assert_eq!(time_offsets((0, 10), Some(3), Some(7), 1), PartitionRange { partition: 1, from: 3, to: 7 });
    // No record at or after --to: up to the high watermark.
    assert_eq!(time_offsets((0, 10), Some(3), None, 1), PartitionRange { partition: 1, from: 3, to: 10 });
    // No record at or after --from: empty at the high watermark.
    assert!(time_offsets((0, 10), None, None, 1).is_empty());
    assert_eq!(time_offsets((0, 10), None, None, 1).from, 10);
    let total =
        Resolved { topic: "t".into(), ranges: vec![time_offsets((0, 10), Some(3), Some(7), 0), time_offsets((4, 9), None, None, 1)] };
    assert_eq!(total.total(), 4);
}

#[test]
fn the_pacer_spaces_sends_by_one_over_the_rate_without_bursts() {
    let t0 = Instant::now();
    let mut p = Pacer::new(4.0); // one send per 250 ms
    assert_eq!(p.delay(t0), Duration::ZERO, "the first send goes at once");
    assert_eq!(p.delay(t0), Duration::from_millis(250));
    assert_eq!(p.delay(t0 + Duration::from_millis(100)), Duration::from_millis(400));
    // After a stall of 10 s no credit is saved up: the next send goes at once, the one after waits again.
    let later = t0 + Duration::from_secs(10);
    assert_eq!(p.delay(later), Duration::ZERO);
    assert_eq!(p.delay(later), Duration::from_millis(250));
    // 1000 sends at 500/s starting together take 1998 ms of waiting in total for the last one.
    let mut p = Pacer::new(500.0);
    let last = (0..1000).map(|_| p.delay(t0)).last().unwrap();
    assert_eq!(last, Duration::from_millis(1998));
    assert!(parse_rate("0").is_err() && parse_rate("-1").is_err() && parse_rate("inf").is_err() && parse_rate("x").is_err());
    assert_eq!(parse_rate("2.5"), Ok(2.5));
}

#[test]
fn replayed_records_keep_their_headers_and_get_the_replay_ones() {
    let headers = OwnedHeaders::new()
        .insert(Header { key: "traceparent", value: Some(&b"00-abc"[..]) })
        .insert(Header { key: H_REPLAY_SOURCE, value: Some(&b"old/0/0"[..]) })
        .insert(Header { key: "empty", value: None::<&[u8]> });
    let m = OwnedMessage::new(
        Some(b"v".to_vec()),
        Some(b"k".to_vec()),
        "src".into(),
        rdkafka::Timestamp::CreateTime(1_700_000_000_000),
        3,
        42,
        Some(headers),
    );
    let out = replay_headers(&m, 1_800_000_000_000);
    let got: Vec<(String, Option<String>)> =
        out.iter().map(|h| (h.key.to_string(), h.value.map(|v| String::from_utf8_lossy(v).into_owned()))).collect();
    assert_eq!(
        got,
        vec![
            ("traceparent".into(), Some("00-abc".into())),
            ("empty".into(), None),
            (H_REPLAY_SOURCE.into(), Some("src/3/42".into())),
            (H_REPLAY_TIME.into(), Some("1800000000000".into())),
        ]
    );
    assert_eq!(target_partition(true, 3), Some(3));
    assert_eq!(target_partition(false, 3), None);
}

#[derive(clap::Parser, Debug)]
struct TestCli {
    #[command(flatten)]
    args: ReplayArgs,
}

#[test]
fn the_command_line_needs_one_range_and_one_mode() {
    use clap::Parser;
    let parse = |a: &[&str]| TestCli::try_parse_from([&["t", "stock.commands"], a].concat()).map(|c| c.args);
    let a = parse(&["--from-offset", "0", "--into", "x", "--rate", "100", "--partition", "1", "--partition", "3"]).unwrap();
    assert_eq!((a.from_offset, a.to_offset, a.into.as_deref(), a.rate, a.partitions), (Some(0), None, Some("x"), Some(100.0), vec![1, 3]));
    let a = parse(&["--from", "-2h", "--to", "now", "--through", "stock-reserver", "--dry-run"]).unwrap();
    assert_eq!((a.from, a.to), (Some(TimeSpec::Ago(Duration::from_secs(7200))), Some(TimeSpec::Ago(Duration::ZERO))));
    assert!(parse(&["--from", "-2h", "--through", "w", "--diff", "--reservation-ttl", "5m"]).unwrap().diff);
    assert!(parse(&["--into", "x"]).is_err(), "no range");
    assert!(parse(&["--from-offset", "0"]).is_err(), "no mode");
    assert!(parse(&["--from-offset", "0", "--from", "now", "--into", "x"]).is_err(), "two ranges");
    assert!(parse(&["--from-offset", "0", "--into", "x", "--through", "w", "--dry-run"]).is_err(), "two modes");
    assert!(parse(&["--from-offset", "0", "--through", "w"]).is_err(), "--through needs --dry-run or --diff");
    assert!(parse(&["--from-offset", "0", "--through", "w", "--dry-run", "--diff"]).is_err());
    assert!(parse(&["--from-offset", "0", "--into", "x", "--dry-run"]).is_err(), "--dry-run is a --through flag");
    assert!(parse(&["--to-offset", "5", "--into", "x"]).is_err(), "--to-offset needs --from-offset");
    assert!(parse(&["--from-offset", "0", "--into", "x", "--reservation-ttl", "5m"]).is_err(), "--reservation-ttl is a --through flag");
    assert!(parse(&["--from", "yesterday", "--into", "x"]).is_err());
    assert!(parse(&["--from-offset", "0", "--through", "w", "--dry-run", "--rate", "5"]).is_err(), "--rate is an --into flag");
}
