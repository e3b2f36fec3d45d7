//! The seed corpus of the fuzz targets (`fuzz/corpus/<target>/`), generated: valid encoded
//! events of every type, the bad-input corpus (`tests/corpus/bad_input/*.bin`, see
//! `tests/bad_input.rs`), and for `process` whole sagas framed as record sequences.
//!
//! [`write`] (re)writes them: `cargo run --release -p orderflow --example write_fuzz_seed_corpus`
//! (`workers/orderflow/examples/write_fuzz_seed_corpus.rs`). The stable test
//! `tests/fuzz_corpus.rs` checks with [`generate`] that every seed is committed as generated.

use std::fs;
use std::path::Path;

use orderflow_api::derive_event_id;
use orderflow_api::events::*;
use orderflow_api::fixtures;
use orderflow_api::Event;

use super::{frame, Fuzz, BASE_TIME_MS};

/// The command that rewrites the seeds, for messages.
pub const WRITE_COMMAND: &str = "cargo run --release -p orderflow --example write_fuzz_seed_corpus";

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
            refund_required: false,
            customer_id: None,
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
        OrderSettled {
            reservation_id: reservation.clone(),
            late: true,
            items: vec![SettledItem { product_id: "P-001".into(), quantity: 2 }],
            ..fixtures::order_settled("seed-settled", "O-1", settlement::SOLD, T + 2_000)
        }
        .into(),
        StockAllocation {
            event_id: "seed-allocation".into(),
            occurred_at: T,
            hq_id: fixtures::HQ.into(),
            store_id: String::new(),
            from_store_id: fixtures::STORE.into(),
            step: allocation_step::FALLBACK_REQUEST.into(),
            reference_id: reservation.clone(),
            order_id: Some("O-1".into()),
            cause_event_id: "seed-created".into(),
            items: vec![AllocationItem { product_id: "P-001".into(), quantity: 2 }],
        }
        .into(),
        StockLedgerEntry {
            event_id: "seed-ledger".into(),
            occurred_at: T,
            hq_id: fixtures::HQ.into(),
            store_id: fixtures::STORE.into(),
            change_reason: change_reason::SALE.into(),
            reference_id: "O-1".into(),
            cause_event_id: "seed-completed".into(),
            lines: vec![LedgerLine { product_id: "P-001".into(), store_previous: 10, store_current: 8, in_transit: 0, unallocated: 0 }],
        }
        .into(),
    ]
}

/// The bad-input corpus values, by case name, plus the tombstone (no file there: a null value,
/// which the runtime decodes as an empty payload).
fn bad_inputs(repo_root: &Path) -> Vec<(String, Vec<u8>)> {
    let dir = repo_root.join("tests/corpus/bad_input");
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

/// Every seed: `(target, file name, bytes)`, the bad-input corpus read under `repo_root`.
pub fn generate(fuzz: &Fuzz, repo_root: &Path) -> Vec<(&'static str, String, Vec<u8>)> {
    let codec = fuzz.codec();
    let enc = |e: &Event| codec.encode_local(e).expect("seed events encode");
    let mut seeds = Vec::new();
    for e in every_event() {
        seeds.push(("decode", format!("event-{}.bin", e.schema_name()), enc(&e)));
    }
    let bad = bad_inputs(repo_root);
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

/// (Re)writes the generated seeds into `fuzz/corpus/<target>/` under `repo_root` (other files are
/// left alone); returns how many.
///
/// Errors: a directory or file that cannot be written.
pub fn write(fuzz: &Fuzz, repo_root: &Path) -> std::io::Result<usize> {
    let root = repo_root.join("fuzz/corpus");
    let seeds = generate(fuzz, repo_root);
    for (target, name, bytes) in &seeds {
        let dir = root.join(target);
        fs::create_dir_all(&dir)?;
        fs::write(dir.join(name), bytes)?;
    }
    Ok(seeds.len())
}
