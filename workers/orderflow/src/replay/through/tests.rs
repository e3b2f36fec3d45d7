use std::collections::HashSet;

use orderflow_api::events::StockUpdated;
use orderflow_api::fixtures::*;
use orderflow_api::{derive_event_id, MemoryStore};
use orderflow_api::{handle, Changes, Context, StateTxn};
use orderflow_runtime::changelog;
use orderflow_runtime::deadletter::DeadLetterClass;
use orderflow_runtime::topology::Guarantee;

use super::*;

const TOPIC: &str = "stock.commands";
const T0: i64 = 1_700_000_000_000;
const TTL: i64 = 60_000;

fn inputs() -> Vec<String> {
    vec![TOPIC.to_string()]
}

/// Changelog records `(offset, key, value)` of `units` (changes, next input offset), from
/// offset 0, as the runtime writes them.
/// A changelog record: offset, key, value.
type Rec = (i64, Vec<u8>, Option<Vec<u8>>);

fn changelog_of(units: &[(Changes, i64)]) -> Vec<Rec> {
    let mut out = Vec::new();
    for (changes, next) in units {
        for r in changelog::records(&inputs(), changes, &BTreeMap::from([(TOPIC.to_string(), *next)])) {
            out.push((out.len() as i64, r.key, r.value));
        }
    }
    out
}

fn rebuild(records: &[Rec], from: i64) -> (MemoryStore, ShadowReport) {
    let low = records.first().map(|r| r.0).unwrap_or(0);
    let high = records.last().map(|r| r.0 + 1).unwrap_or(0);
    let mut b = ShadowBuilder::new(&inputs(), TOPIC, 0, from, (low, high), Guarantee::EffectivelyOnce);
    for (o, k, v) in records {
        b.push(*o, k, v.as_deref()).unwrap();
    }
    b.finish()
}

fn changes(writes: &[(&str, Option<&str>)], timers: &[(&str, Option<i64>)]) -> Changes {
    let mut c = Changes::default();
    for (k, v) in writes {
        c.writes.insert(k.as_bytes().to_vec(), v.map(|v| v.as_bytes().to_vec()));
    }
    for (k, at) in timers {
        c.timers.insert(k.as_bytes().to_vec(), *at);
    }
    c
}

/// Three committed units ending at input offsets 3, 5 and 9, then an orphan record.
fn three_units() -> Vec<Rec> {
    let mut recs = changelog_of(&[
        (changes(&[("a", Some("1"))], &[("t", Some(100))]), 3),
        (changes(&[("a", Some("2")), ("b", Some("1"))], &[]), 5),
        (changes(&[("a", None)], &[]), 9),
    ]);
    let orphan = changelog::records(&inputs(), &changes(&[("c", Some("1"))], &[]), &BTreeMap::from([(TOPIC.to_string(), 12)]));
    recs.push((recs.len() as i64, orphan[0].key.clone(), orphan[0].value.clone()));
    recs
}

#[test]
fn shadow_applies_the_units_that_ended_at_or_before_the_range_start() {
    let recs = three_units();
    let (store, r) = rebuild(&recs, 5);
    assert_eq!(store.data, BTreeMap::from([(b"a".to_vec(), b"2".to_vec()), (b"b".to_vec(), b"1".to_vec())]));
    assert_eq!(store.timers, BTreeMap::from([(b"t".to_vec(), 100)]));
    assert_eq!((r.units, r.position, r.not_applied, r.approximate), (2, 5, 1, false), "{r:?}");

    // No marker at offset 4: the shadow is at 3, and 3..4 is warmed up by the caller.
    let (store, r) = rebuild(&recs, 4);
    assert_eq!(store.data, BTreeMap::from([(b"a".to_vec(), b"1".to_vec())]));
    assert_eq!((r.units, r.position), (1, 3));

    // Past every marker: everything committed, the orphan dropped.
    let (store, r) = rebuild(&recs, 100);
    assert_eq!(store.data, BTreeMap::from([(b"b".to_vec(), b"1".to_vec())]));
    assert_eq!((r.units, r.position, r.not_applied), (3, 9, 1));

    // Before every unit: empty.
    let (store, r) = rebuild(&recs, 0);
    assert!(store.data.is_empty() && store.timers.is_empty());
    assert_eq!((r.units, r.position), (0, 0));
}

#[test]
fn a_compacted_changelog_gives_an_approximate_shadow_from_the_records_own_offsets() {
    // Compaction removed unit 1's marker and its superseded `a=1`: offsets 0 and 2 are gone.
    let recs: Vec<_> = three_units().into_iter().filter(|r| r.0 != 0 && r.0 != 2).collect();
    let (store, r) = rebuild(&recs, 4);
    assert_eq!(store.timers, BTreeMap::from([(b"t".to_vec(), 100)]), "the timer record carries offset 3 ≤ 4");
    assert!(store.data.is_empty(), "a=1 was compacted away and a=2 belongs to a unit past the start");
    assert!(r.approximate, "{r:?}");
    assert!(r.notes.iter().any(|n| n.contains("compaction")), "{:?}", r.notes);

    // A changelog starting above 0 (retention) is approximate too.
    let recs: Vec<_> = three_units().into_iter().skip(3).collect();
    let (_, r) = rebuild(&recs, 100);
    assert!(r.approximate && r.notes[0].contains("starts at offset 3"), "{r:?}");
}

#[test]
fn garbage_changelog_records_are_errors() {
    let mut b = ShadowBuilder::new(&inputs(), TOPIC, 0, 5, (0, 2), Guarantee::EffectivelyOnce);
    assert!(b.push(0, b"x", Some(&[1, 0])).unwrap_err().contains("unknown changelog key"));
    assert!(b.push(1, b"m", Some(&[7, 0])).unwrap_err().contains("version"));
}

fn reserver_ports() -> BTreeMap<String, String> {
    [
        ("reserved", "stock.reserved"),
        ("failed", "stock.reservation.failed"),
        ("released", "stock.reservation.released"),
        ("updated", "stock.updated"),
        ("commands", "stock.commands"),
    ]
    .into_iter()
    .map(|(p, t)| (p.to_string(), t.to_string()))
    .collect()
}

/// A store-only stock reserver (TTL `ttl`, no HQ fallback: a short order is answered at once
/// rather than through the HQ's records on `stock.commands`, which a replay of the topic reads
/// as inputs of their own).
fn store_only(ttl: i64) -> stock_reserver::StockReserver {
    let off = stock_reserver::FallbackPolicy { enabled: false, ..Default::default() };
    stock_reserver::StockReserver::new(ttl).with_fallback(off)
}

/// A stock reserver (TTL `ttl`) over a shadow rebuilt from a changelog holding a restock of
/// 10 × P-1, committed at input offset 1.
fn reserver_engine(ttl: i64) -> Engine {
    let mut empty = MemoryStore::default();
    let mut p = store_only(ttl);
    let ctx = Context {
        topic: TOPIC.into(),
        partition: 0,
        offset: 0,
        now_ms: T0,
        retention_ms: orderflow_api::millis(orderflow_api::DEFAULT_STATE_RETENTION),
    };
    let mut out = orderflow_api::Outputs::new(reserver_ports().into_keys());
    let mut txn = StateTxn::new(&empty);
    handle(&mut p, &ctx, &inventory_adjusted("restock-1", T0, &[("P-1", 10)]).into(), &mut txn, &mut out).unwrap();
    let c = txn.into_changes();
    let (shadow, report) = rebuild(&changelog_of(&[(c.clone(), 1)]), 1);
    assert_eq!(report.position, 1);
    empty.apply(c);
    let state = |s: &MemoryStore| -> BTreeMap<Vec<u8>, Vec<u8>> {
        s.data.iter().filter(|(k, _)| !orderflow_runtime::retention::is_local(k)).map(|(k, v)| (k.clone(), v.clone())).collect()
    };
    assert_eq!(state(&shadow), state(&empty), "the shadow is the committed state");
    assert!(shadow.data.keys().any(|k| orderflow_runtime::retention::indexed_marker(k).is_some()), "with its marker indexed");
    Engine::new("stock-reserver", Box::new(store_only(ttl)), TOPIC, reserver_ports(), BTreeMap::from([(0, shadow)]))
}

/// Inputs 1..=5: an order, its repeat, an order without a store, a record that does not
/// decode, an order the stock cannot serve.
async fn replay(engine: &mut Engine) {
    let o1: Event = order_created("e-o1", "O-1", T0 + 1_000, &[("P-1", 3)]).into();
    let no_store: Event =
        orderflow_api::events::OrderCreated { store_id: String::new(), ..order_created("e-o3", "O-3", T0 + 3_000, &[("P-1", 1)]) }.into();
    let o2: Event = order_created("e-o2", "O-2", T0 + 5_000, &[("P-1", 20)]).into();
    engine.step(0, 1, T0 + 1_000, Ok(o1.clone()), true).await;
    engine.step(0, 2, T0 + 2_000, Ok(o1), true).await;
    engine.step(0, 3, T0 + 3_000, Ok(no_store), true).await;
    engine.step(0, 4, T0 + 4_000, Err(Rejection::new(DeadLetterClass::NotAvro, "not Avro")), true).await;
    engine.step(0, 5, T0 + 5_000, Ok(o2), true).await;
}

#[tokio::test]
async fn dry_run_emits_what_the_worker_would_with_dead_letters_and_duplicates() {
    let mut engine = reserver_engine(TTL);
    replay(&mut engine).await;
    let got: Vec<(&str, &str, &str, &str)> =
        engine.emitted.iter().map(|e| (e.port.as_str(), e.topic.as_str(), e.key.as_str(), e.event.as_str())).collect();
    assert_eq!(
        got,
        vec![
            ("reserved", "stock.reserved", "O-1", "StockReserved"),
            ("failed", "stock.reservation.failed", "O-2", "StockReservationFailed")
        ]
    );
    let reserved = &engine.emitted[0];
    assert_eq!(reserved.event_id, derive_event_id("e-o1", "stock.reserved"));
    assert_eq!(reserved.value["expiresAt"], T0 + 1_000 + TTL);
    assert_eq!(reserved.cause, Cause::Input { partition: 0, offset: 1, event_id: "e-o1".into() });
    assert_eq!(engine.emitted[1].value["reason"], "INSUFFICIENT_STOCK");
    assert_eq!(engine.emitted[1].value["items"][0]["available"], 7, "the shadow's restock minus O-1's reservation");
    let s = &engine.stats;
    assert_eq!((s.inputs, s.processed, s.duplicates, s.dead_letters, s.failures, s.outputs), (5, 2, 1, 2, 0, 2), "{s:?}");
    assert_eq!(s.outputs_per_topic, BTreeMap::from([("stock.reserved".into(), 1), ("stock.reservation.failed".into(), 1)]));
    let dl: Vec<(i64, &str)> = engine.dead_letters.iter().map(|d| (d.offset, d.class.as_str())).collect();
    assert_eq!(dl, vec![(3, "invalid"), (4, "not_avro")]);
    let line = serde_json::to_value(reserved).unwrap();
    for k in ["port", "topic", "key", "event", "eventId", "value", "cause"] {
        assert!(line.get(k).is_some(), "{k} missing from {line}");
    }
    // The shadow moved; nothing else did.
    let res: Value = engine.shards[&0].get_json(&stock_reserver::reservation_key("O-1")).unwrap();
    assert_eq!(res["status"], "LIVE");
}

#[tokio::test]
async fn a_warm_up_moves_the_state_without_reporting() {
    let mut engine = reserver_engine(TTL);
    engine.step(0, 1, T0 + 1_000, Ok(order_created("e-o1", "O-1", T0 + 1_000, &[("P-1", 9)]).into()), false).await;
    assert!(engine.emitted.is_empty());
    assert_eq!(engine.stats.inputs, 0);
    engine.step(0, 2, T0 + 2_000, Ok(order_created("e-o2", "O-2", T0 + 2_000, &[("P-1", 2)]).into()), true).await;
    assert_eq!(engine.emitted.len(), 1);
    assert_eq!(engine.emitted[0].event, "StockReservationFailed", "9 of 10 were reserved during the warm-up");
}

#[tokio::test]
async fn timers_fire_as_the_replayed_time_passes() {
    let ports = BTreeMap::from([("expired".to_string(), "stock.reservation.expired".to_string())]);
    let mut engine = Engine::new(
        "reservation-expirer",
        Box::new(reservation_expirer::ReservationExpirer::new(TTL)),
        "stock.reserved",
        ports,
        BTreeMap::new(),
    );
    let r1 = stock_reserved("e-r1", "O-1", "R-1", T0, T0 + TTL, &[("P-1", 1)]);
    let r2 = stock_reserved("e-r2", "O-2", "R-2", T0 + TTL + 5, T0 + 2 * TTL + 5, &[("P-1", 1)]);
    engine.step(0, 0, T0, Ok(r1.into()), true).await;
    engine.step(0, 1, T0 + TTL - 1, Ok(stock_reserved("e-r3", "O-3", "R-3", T0, T0 + TTL, &[]).into()), true).await;
    assert!(engine.emitted.is_empty(), "not due yet");
    engine.step(1, 0, T0 + TTL + 5, Ok(r2.into()), true).await;
    assert_eq!(engine.stats.timers_fired, 2, "O-1 and O-3 (O-3 has no items but still a timer)");
    let e = &engine.emitted[0];
    assert_eq!((e.event.as_str(), e.key.as_str()), ("StockReservationExpired", "O-1"));
    assert_eq!(e.event_id, derive_event_id("R-1", "stock.reservation.expired"));
    assert!(matches!(&e.cause, Cause::Timer { partition: 0, due_ms, at_ms, .. } if *due_ms == T0 + TTL && *at_ms == T0 + TTL + 5));
}

fn actual_of(e: &Emitted, offset: i64) -> Actual {
    Actual {
        topic: e.topic.clone(),
        partition: 0,
        offset,
        timestamp_ms: Some(T0),
        key: Some(e.key.clone()),
        event: Event::from_json(&e.event, e.value.clone()).unwrap(),
        payload: e.payload.clone().unwrap_or_default(),
    }
}

#[tokio::test]
async fn diff_classifies_same_changed_missing_and_extra() {
    // Live: the run's TTL. Replay: the same inputs with another TTL.
    let mut live = reserver_engine(TTL);
    replay(&mut live).await;
    let mut actual: Vec<Actual> = live.emitted.iter().enumerate().map(|(i, e)| actual_of(e, i as i64)).collect();
    let mut shadow = reserver_engine(TTL);
    replay(&mut shadow).await;
    let inputs: Vec<Event> = vec![
        order_created("e-o1", "O-1", T0 + 1_000, &[("P-1", 3)]).into(),
        order_created("e-o2", "O-2", T0 + 5_000, &[("P-1", 20)]).into(),
    ];

    // Identical runs: all same.
    let (entries, counts) = diff(&shadow.emitted, &actual, &mut Causes::of(&inputs), |_| true, &HashSet::new());
    assert_eq!(counts, DiffCounts { same: 2, changed: 0, missing: 0, extra: 0, beyond: 0 });
    assert!(entries.iter().all(|e| e.status == Status::Same && e.replay.is_none()));

    // Another TTL: stock.reserved changed in expiresAt only.
    let mut other = reserver_engine(2 * TTL);
    replay(&mut other).await;
    let (entries, counts) = diff(&other.emitted, &actual, &mut Causes::of(&inputs), |_| true, &HashSet::new());
    assert_eq!(counts, DiffCounts { same: 1, changed: 1, missing: 0, extra: 0, beyond: 0 });
    let changed = entries.iter().find(|e| e.status == Status::Changed).unwrap();
    assert_eq!(changed.event, "StockReserved");
    assert_eq!(
        changed.fields,
        vec![FieldDiff { path: "expiresAt".into(), replay: json!(T0 + 1_000 + 2 * TTL), actual: json!(T0 + 1_000 + TTL) }]
    );
    assert_eq!(changed.replay.as_ref().unwrap()["expiresAt"], T0 + 1_000 + 2 * TTL);
    assert_eq!(changed.actual.as_ref().unwrap()["expiresAt"], T0 + 1_000 + TTL);

    // Nothing emitted live for O-2 (missing), a live stock.updated derived from O-1's input
    // that the replay does not emit (extra), and an unrelated live event (ignored).
    actual.retain(|a| a.event.order_id() != Some("O-2"));
    let stray = |id: String| StockUpdated {
        event_id: id,
        occurred_at: T0,
        product_id: "P-1".into(),
        hq_id: HQ.into(),
        store_id: STORE.into(),
        hq_stock: Some(orderflow_api::events::StockLevel { previous: 0, current: 1 }),
        store_stock: orderflow_api::events::StockLevel { previous: 0, current: 1 },
        change_amount: 1,
        change_reason: "CORRECTION".into(),
        reference_id: "x".into(),
    };
    for (i, id) in [derive_event_id("e-o1", "stock.updated/P-1"), "unrelated".to_string()].into_iter().enumerate() {
        actual.push(Actual {
            topic: "stock.updated".into(),
            partition: 1,
            offset: i as i64,
            timestamp_ms: Some(T0),
            key: Some("P-1".into()),
            event: stray(id).into(),
            payload: Vec::new(),
        });
    }
    let (entries, counts) = diff(&shadow.emitted, &actual, &mut Causes::of(&inputs), |_| true, &HashSet::new());
    assert_eq!(counts, DiffCounts { same: 1, changed: 0, missing: 1, extra: 1, beyond: 0 });
    let missing = entries.iter().find(|e| e.status == Status::Missing).unwrap();
    assert_eq!((missing.key.as_str(), missing.event.as_str()), ("O-2", "StockReservationFailed"));
    let extra = entries.iter().find(|e| e.status == Status::Extra).unwrap();
    assert_eq!(extra.event_id, derive_event_id("e-o1", "stock.updated/P-1"));
    // Outside the window it is not reported.
    let (_, counts) = diff(&shadow.emitted, &actual, &mut Causes::of(&inputs), |a| a.topic != "stock.updated", &HashSet::new());
    assert_eq!(counts.extra, 0);
    // Caused by a record the replay wrote to a partition it did not replay: beyond, not extra.
    let beyond = HashSet::from(["e-o1".to_string()]);
    let (entries, counts) = diff(&shadow.emitted, &actual, &mut Causes::of(&inputs), |_| true, &beyond);
    assert_eq!(counts, DiffCounts { same: 1, changed: 0, missing: 1, extra: 0, beyond: 1 }, "{entries:?}");
}

#[tokio::test]
async fn field_diffs_name_nested_paths_and_the_record_key() {
    let a = json!({"x": 1, "items": [{"p": "A", "n": 1}, {"p": "B", "n": 2}], "y": [1]});
    let b = json!({"x": 1, "items": [{"p": "A", "n": 1}, {"p": "B", "n": 3}], "y": [1, 2], "z": true});
    let paths: Vec<String> = field_diffs(&a, &b).into_iter().map(|d| d.path).collect();
    assert_eq!(paths, vec!["items[1].n", "y", "z"]);
    let mut e = reserver_engine(TTL);
    replay(&mut e).await;
    let mut a = actual_of(&e.emitted[0], 0);
    a.key = Some("other".into());
    let (entries, _) = diff(&e.emitted[..1], &[a], &mut Causes::default(), |_| true, &HashSet::new());
    assert_eq!(entries[0].status, Status::Changed);
    assert_eq!(entries[0].fields[0].path, "key");
}

#[tokio::test]
async fn same_fields_with_other_bytes_is_changed_in_payload() {
    let mut e = reserver_engine(TTL);
    replay(&mut e).await;
    let mut emitted = e.emitted[..1].to_vec();
    emitted[0].payload = Some(vec![0xc3, 0x01, 0xaa]);
    let mut a = actual_of(&emitted[0], 0);
    let (_, counts) = diff(&emitted, std::slice::from_ref(&a), &mut Causes::default(), |_| true, &HashSet::new());
    assert_eq!(counts.same, 1, "identical bytes");
    a.payload = vec![0xc3, 0x01, 0xab];
    let (entries, counts) = diff(&emitted, &[a], &mut Causes::default(), |_| true, &HashSet::new());
    assert_eq!(counts.changed, 1);
    assert_eq!(entries[0].fields, vec![FieldDiff { path: "payload".into(), replay: json!("c301aa"), actual: json!("c301ab") }]);
}

#[test]
fn records_are_replayed_in_offset_order_per_partition_merged_by_time() {
    // (partition, offset, timestamp); partition 0 has a timestamp going backwards.
    let items = [(0, 11, 300), (1, 5, 100), (0, 10, 200), (1, 6, 250), (0, 12, 150)];
    let order: Vec<(i32, i64)> = replay_order(&items).into_iter().map(|i| (items[i].0, items[i].1)).collect();
    assert_eq!(order, vec![(1, 5), (0, 10), (1, 6), (0, 11), (0, 12)]);
}
