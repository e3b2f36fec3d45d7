//! The fuzz seed corpus on stable Rust: every file of `fuzz/corpus/decode/` and
//! `fuzz/corpus/process/` goes through the same checks as the cargo-fuzz targets (`fuzz/src/lib.rs`,
//! compiled here as a module), so the normal `cargo test` exercises them; `scripts/fuzz.sh` runs
//! the targets themselves on nightly.
//!
//! The seeds are generated: valid encoded events of every type, the bad-input corpus
//! (`tests/corpus/bad_input/*.bin`, see `tests/bad_input.rs`), and for `process` whole sagas
//! framed as record sequences. Regenerate them with
//!
//! ```text
//! cargo test --release -p orderflow --test fuzz_corpus -- --ignored write_fuzz_seed_corpus
//! ```
//!
//! `fuzz_seed_corpus_matches_its_generator` checks that every generated seed is committed as
//! generated; further files (e.g. minimised crash reproducers, `regression-*`) may be added by
//! hand and are run too.

#[path = "../fuzz/src/lib.rs"]
#[allow(dead_code)]
mod fuzz;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use orderflow_api::derive_event_id;
use orderflow_api::events::*;
use orderflow_api::fixtures;
use orderflow_api::Event;

use fuzz::{frame, Fuzz, BASE_TIME_MS, DECODE_CLASSES};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("repo root")
}

fn load() -> Fuzz {
    Fuzz::load(&repo_root()).unwrap_or_else(|e| panic!("{e}"))
}

/// `(file name, bytes)` of every file of `fuzz/corpus/<target>/`, sorted by name.
fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = repo_root().join("fuzz/corpus").join(target);
    let mut files: Vec<(String, Vec<u8>)> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.is_file())
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), fs::read(&p).unwrap()))
        .collect();
    files.sort();
    files
}

// ------------------------------------------------------------------------------------------
// The generator.

const T: i64 = BASE_TIME_MS;

/// One valid event of every type (store HQ-1/S-1 of the fixtures), stamped around the fuzz clock.
fn every_event() -> Vec<Event> {
    let reservation = derive_event_id("seed-created", "reservation");
    vec![
        fixtures::order_created("seed-created", "O-1", T, &[("P-001", 2), ("P-002", 1)]).into(),
        fixtures::stock_reserved("seed-reserved", "O-1", &reservation, T, T + 300_000, &[("P-001", 2), ("P-002", 1)]).into(),
        fixtures::stock_reservation_failed("seed-failed", "O-2", T, &[("P-001", 10, 5)]).into(),
        OrderConfirmed {
            event_id: "seed-confirmed".into(),
            occurred_at: T,
            order_id: "O-1".into(),
            reservation_id: reservation.clone(),
            hq_id: fixtures::HQ.into(),
            store_id: fixtures::STORE.into(),
            status: "PAYMENT_WAIT".into(),
            expires_at: T + 300_000,
        }
        .into(),
        OrderCancelled {
            reservation_id: Some(reservation.clone()),
            customer_message: "결제에 실패하여 주문이 취소되었습니다.".into(),
            ..fixtures::order_cancelled("seed-cancelled", "O-1", cancel_reason::PAYMENT_FAILED, T + 1_000)
        }
        .into(),
        OrderCompleted {
            items: vec![SoldItem { product_id: "P-001".into(), quantity: 2, actual_price: 1_000 }],
            total_amount: 2_000,
            ..fixtures::order_completed("seed-completed", "O-1", &reservation, T + 2_000)
        }
        .into(),
        StockUpdated {
            event_id: "seed-updated".into(),
            occurred_at: T,
            hq_id: fixtures::HQ.into(),
            store_id: fixtures::STORE.into(),
            product_id: "P-001".into(),
            hq_stock: Some(StockLevel { previous: 100, current: 98 }),
            store_stock: StockLevel { previous: 10, current: 8 },
            change_amount: -2,
            change_reason: change_reason::SALE.into(),
            reference_id: "O-1".into(),
        }
        .into(),
        fixtures::stock_reservation_expired("seed-expired", "O-1", &reservation, T + 300_000).into(),
        fixtures::stock_reservation_released("seed-released", "O-1", &reservation, release_reason::EXPIRED, T + 300_000, &[("P-001", 2)])
            .into(),
        fixtures::inventory_adjusted("seed-restock", T - 1_000, &[("P-001", 10), ("P-002", 1)]).into(),
    ]
}

/// The bad-input corpus values, by case name, plus the tombstone (no file there: a null value,
/// which the runtime decodes as an empty payload).
fn bad_inputs() -> Vec<(String, Vec<u8>)> {
    let dir = repo_root().join("tests/corpus/bad_input");
    let mut out: Vec<(String, Vec<u8>)> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "bin"))
        .map(|p| (p.file_stem().unwrap().to_string_lossy().into_owned(), fs::read(&p).unwrap()))
        .collect();
    out.push(("tombstone".to_string(), Vec::new()));
    out.sort();
    out
}

/// Every seed: `(target, file name, bytes)`.
fn generate(fuzz: &Fuzz) -> Vec<(&'static str, String, Vec<u8>)> {
    let codec = fuzz.codec();
    let enc = |e: &Event| codec.encode_local(e).expect("seed events encode");
    let mut seeds = Vec::new();
    for e in every_event() {
        seeds.push(("decode", format!("event-{}.bin", e.schema_name()), enc(&e)));
    }
    let bad = bad_inputs();
    for (name, bytes) in &bad {
        seeds.push(("decode", format!("bad-{name}.bin"), bytes.clone()));
    }

    // process: sagas as record sequences (control byte = clock advance, see fuzz::advance_ms).
    let restock: Event = fixtures::inventory_adjusted("restock", T - 1_000, &[("P-001", 10), ("P-002", 3)]).into();
    let order = |id: &str, order_id: &str, items: &[(&str, i32)]| -> Event { fixtures::order_created(id, order_id, T, items).into() };
    let reservation = |created: &str| derive_event_id(created, "reservation");
    let completed = |id: &str, order_id: &str, created: &str| -> Event {
        OrderCompleted {
            items: vec![SoldItem { product_id: "P-001".into(), quantity: 2, actual_price: 1_000 }],
            total_amount: 2_000,
            ..fixtures::order_completed(id, order_id, &reservation(created), T + 60_000)
        }
        .into()
    };
    let cancelled = |id: &str, order_id: &str, created: &str| -> Event {
        OrderCancelled {
            reservation_id: Some(reservation(created)),
            ..fixtures::order_cancelled(id, order_id, cancel_reason::PAYMENT_FAILED, T + 60_000)
        }
        .into()
    };
    let seq = |records: &[(u8, &Event)]| -> Vec<u8> {
        let encoded: Vec<(u8, Vec<u8>)> = records.iter().map(|(c, e)| (*c, enc(e))).collect();
        frame(&encoded.iter().map(|(c, v)| (*c, v.as_slice())).collect::<Vec<_>>())
    };
    let o1 = order("c1", "O-1", &[("P-001", 2), ("P-002", 1)]);
    seeds.push(("process", "saga-completed.bin".into(), seq(&[(0, &restock), (10, &o1), (20, &completed("done1", "O-1", "c1"))])));
    seeds.push(("process", "saga-payment-failed.bin".into(), seq(&[(0, &restock), (10, &o1), (20, &cancelled("pf1", "O-1", "c1"))])));
    seeds.push(("process", "saga-expired.bin".into(), seq(&[(0, &restock), (10, &o1)])));
    let big = order("c2", "O-2", &[("P-001", 5), ("P-002", 4)]);
    seeds.push(("process", "saga-insufficient-stock.bin".into(), seq(&[(0, &restock), (10, &big)])));
    // Completion racing expiry: the completion arrives after the TTL (control 180 ≈ 54 min).
    seeds.push(("process", "saga-late-completion.bin".into(), seq(&[(0, &restock), (10, &o1), (180, &completed("late1", "O-1", "c1"))])));
    let events = every_event();
    seeds.push(("process", "every-event.bin".into(), seq(&events.iter().map(|e| (5u8, e)).collect::<Vec<_>>())));
    // Each bad record between good orders, then all of them in one run.
    let o2 = order("c3", "O-3", &[("P-001", 1)]);
    let (restock_b, o1_b, o2_b, done_b) = (enc(&restock), enc(&o1), enc(&o2), enc(&completed("done1", "O-1", "c1")));
    for (name, bytes) in &bad {
        let records: Vec<(u8, &[u8])> = vec![(0, &restock_b), (10, &o1_b), (10, bytes), (10, &o2_b), (20, &done_b)];
        seeds.push(("process", format!("bad-{name}.bin"), frame(&records)));
    }
    let mut all: Vec<(u8, &[u8])> = vec![(0, &restock_b), (10, &o1_b)];
    all.extend(bad.iter().map(|(_, b)| (3u8, b.as_slice())));
    all.extend([(10, &o2_b[..]), (20, &done_b[..])]);
    seeds.push(("process", "bad-all.bin".into(), frame(&all)));
    seeds
}

/// (Re)writes the generated seeds into `fuzz/corpus/<target>/` (other files are left alone).
#[test]
#[ignore = "writes the committed seed corpus; run by hand after changing the generator or the bad-input corpus"]
fn write_fuzz_seed_corpus() {
    let fuzz = load();
    let root = repo_root().join("fuzz/corpus");
    let seeds = generate(&fuzz);
    for (target, name, bytes) in &seeds {
        let dir = root.join(target);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(name), bytes).unwrap();
    }
    println!("wrote {} seeds under {}", seeds.len(), root.display());
}

#[test]
fn fuzz_seed_corpus_matches_its_generator() {
    let fuzz = load();
    let mut committed: BTreeMap<(String, String), Vec<u8>> = BTreeMap::new();
    for target in ["decode", "process"] {
        for (name, bytes) in corpus(target) {
            committed.insert((target.to_string(), name), bytes);
        }
    }
    for (target, name, bytes) in generate(&fuzz) {
        match committed.get(&(target.to_string(), name.clone())) {
            Some(b) => assert!(b == &bytes, "fuzz/corpus/{target}/{name} differs from the generator: run write_fuzz_seed_corpus"),
            None => panic!("fuzz/corpus/{target}/{name} is missing: run write_fuzz_seed_corpus"),
        }
    }
}

// ------------------------------------------------------------------------------------------
// The checks.

#[test]
fn decode_seed_corpus_passes_the_fuzz_checks() {
    let fuzz = load();
    let files = corpus("decode");
    let mut classes: BTreeMap<&str, usize> = BTreeMap::new();
    let mut schemas: BTreeMap<&str, usize> = BTreeMap::new();
    for (name, bytes) in &files {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| fuzz.decode(bytes))) {
            Ok(Ok(event)) => *schemas.entry(event.schema_name()).or_default() += 1,
            Ok(Err(class)) => *classes.entry(class).or_default() += 1,
            Err(_) => panic!("fuzz/corpus/decode/{name} breaks a decode property (message above)"),
        }
    }
    println!("decode: {} seeds: decoded {schemas:?}, failed {classes:?}", files.len());
    for name in Event::SCHEMA_NAMES {
        assert!(schemas.contains_key(name), "no decode seed of {name}");
    }
    for class in DECODE_CLASSES {
        assert!(classes.contains_key(class), "no decode seed of class {class}");
    }
}

#[test]
fn process_seed_corpus_passes_the_fuzz_checks() {
    let fuzz = load();
    let files = corpus("process");
    assert!(!files.is_empty(), "no process seeds");
    let mut emitted: BTreeMap<String, usize> = BTreeMap::new();
    let mut dropped: BTreeMap<&str, usize> = BTreeMap::new();
    for (name, bytes) in &files {
        let report = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| fuzz.process(bytes))) {
            Ok(r) => r,
            Err(_) => panic!("fuzz/corpus/process/{name} breaks a process property (message above)"),
        };
        for (t, n) in report.emitted {
            *emitted.entry(t).or_default() += n;
        }
        for (c, n) in report.dropped {
            *dropped.entry(c).or_default() += n;
        }
    }
    println!("process: {} seeds: emitted {emitted:?}; dropped {dropped:?}", files.len());
    // The seeds reach every branch of the saga.
    for topic in [
        "stock.reserved",
        "stock.reservation.failed",
        "stock.reservation.released",
        "stock.reservation.expired",
        "order.confirmed",
        "order.cancelled",
        "stock.updated",
    ] {
        assert!(emitted.get(topic).is_some_and(|n| *n > 0), "no process seed makes a worker emit on {topic}: {emitted:?}");
    }
}
