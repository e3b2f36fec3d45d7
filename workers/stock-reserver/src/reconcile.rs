//! Reconciliation (재고 대사, seed 004; issue 13): the stock figures checked against what
//! produced them, so a wrong figure is found, logged and alerted on instead of being trusted.
//!
//! Every change of on-hand stock is also booked in a **ledger** per store and product
//! ([`ledger_key`] → [`Ledger`]: units adjusted in, units sold), kept beside the stock record and
//! written in the same unit. [`reconcile`] recomputes, for one state shard:
//!
//! - `on_hand`: on hand = initial + adjustments − sales (`ledger.adjusted − ledger.sold`);
//! - `reserved`: reserved = Σ units of the live reservations of that store and product;
//! - `negative_on_hand`, `negative_reserved`, `reserved_above_on_hand`: rule 2 (`0 ≤ reserved ≤
//!   on hand`).
//!
//! It runs as a punctuation of the stock reserver ([`RECONCILE_TIMER`], every
//! `reconcile_interval`, default [`DEFAULT_RECONCILE_INTERVAL_MS`]) and from `orderflow
//! reconcile` over the state restored from the changelog. A mismatch is reported with the key,
//! the rule and both figures (`orderflow_stock_conservation_mismatches_total` and an ERROR log
//! line in the worker, alert `OrderflowStockConservationMismatch`).
//!
//! Stock written before the ledger existed has none: its first change books the on-hand figure
//! before the change as the opening balance, and until then the `on_hand` rule skips it
//! (counted in [`Report::unledgered`]).

use std::collections::BTreeMap;

use orderflow_api::{ProcessError, StateTxn};
use serde::{Deserialize, Serialize};

use crate::{Reservation, ReservationStatus, StockRecord, RESERVATION_PREFIX, STOCK_PREFIX};

/// Prefix of every ledger key (see [`ledger_key`]).
pub const LEDGER_PREFIX: &[u8] = b"ledger/";

/// Timer key of the reconciliation punctuation (one per state shard).
pub const RECONCILE_TIMER: &[u8] = b"punctuate/reconcile";

/// Default interval of the reconciliation punctuation, ms: 1 minute.
pub const DEFAULT_RECONCILE_INTERVAL_MS: i64 = 60_000;

/// State key of one product's ledger in one store: `ledger/{hqId}:{storeId}/{productId}`
/// (the same suffix as its [`crate::stock_key`]).
pub fn ledger_key(hq_id: &str, store_id: &str, product_id: &str) -> Vec<u8> {
    format!("ledger/{hq_id}:{store_id}/{product_id}").into_bytes()
}

/// What has moved one product's on-hand stock in one store, in units since the ledger was
/// opened. Stored as JSON `{"adjusted":…,"sold":…}`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Ledger {
    /// Σ `inventory.adjusted` deltas (the initial stock included; the opening balance for stock
    /// older than the ledger).
    pub adjusted: i64,
    /// Σ units sold (`stock.updated` `SALE`).
    pub sold: i64,
}

/// Books a change of on-hand stock in the ledger of `(hq_id, store_id, product_id)`: `adjusted`
/// units in, `sold` units out; `on_hand_before` opens a ledger that does not exist yet.
///
/// Errors: [`ProcessError::CorruptState`] for an unreadable ledger.
pub(crate) fn book(
    state: &mut StateTxn,
    (hq_id, store_id, product_id): (&str, &str, &str),
    on_hand_before: i64,
    adjusted: i64,
    sold: i64,
) -> Result<(), ProcessError> {
    let key = ledger_key(hq_id, store_id, product_id);
    let mut ledger = state.get_json::<Ledger>(&key)?.unwrap_or(Ledger { adjusted: on_hand_before, sold: 0 });
    ledger.adjusted = ledger.adjusted.saturating_add(adjusted);
    ledger.sold = ledger.sold.saturating_add(sold);
    state.put_json(key, &ledger);
    Ok(())
}

/// One broken rule: `rule` (see the module docs) at `key` (`{hqId}:{storeId}/{productId}`),
/// with the figure the rule expects and the one stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Mismatch {
    pub key: String,
    pub rule: &'static str,
    pub expected: i64,
    pub found: i64,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: expected {}, stored {}", self.rule, self.key, self.expected, self.found)
    }
}

/// What one reconciliation of a shard found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    /// Stock records checked.
    pub records: usize,
    /// Stock records without a ledger (written before it existed, never changed since).
    pub unledgered: usize,
    /// Broken rules, in key order.
    pub mismatches: Vec<Mismatch>,
}

/// Reconciles the stock of the shard `state` reads (see the module docs for the rules).
///
/// Errors: [`ProcessError::CorruptState`] for a stock record, ledger or reservation that does
/// not parse.
pub fn reconcile(state: &StateTxn) -> Result<Report, ProcessError> {
    let corrupt = |key: &[u8], e: serde_json::Error| ProcessError::CorruptState {
        key: String::from_utf8_lossy(key).into_owned(),
        message: format!("reconciliation cannot read it: {e}"),
    };
    let suffix = |key: &[u8], prefix: &[u8]| String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
    let mut live: BTreeMap<String, i64> = BTreeMap::new();
    for (k, v) in state.scan_prefix(RESERVATION_PREFIX) {
        let r: Reservation = serde_json::from_slice(&v).map_err(|e| corrupt(&k, e))?;
        // One awaiting its HQ (issue 16) holds nothing yet.
        if r.status == ReservationStatus::Live {
            for item in &r.items {
                *live.entry(format!("{}:{}/{}", r.hq_id, r.store_id, item.product_id)).or_default() += i64::from(item.quantity);
            }
        }
    }
    let mut ledgers: BTreeMap<String, Ledger> = BTreeMap::new();
    for (k, v) in state.scan_prefix(LEDGER_PREFIX) {
        ledgers.insert(suffix(&k, LEDGER_PREFIX), serde_json::from_slice(&v).map_err(|e| corrupt(&k, e))?);
    }
    let mut report = Report::default();
    let mut stocked = BTreeMap::new();
    for (k, v) in state.scan_prefix(STOCK_PREFIX) {
        let key = suffix(&k, STOCK_PREFIX);
        let rec: StockRecord = serde_json::from_slice(&v).map_err(|e| corrupt(&k, e))?;
        report.records += 1;
        let mut broken = |rule, expected, found| report.mismatches.push(Mismatch { key: key.clone(), rule, expected, found });
        match ledgers.get(&key) {
            Some(l) if l.adjusted - l.sold != rec.on_hand => broken("on_hand", l.adjusted - l.sold, rec.on_hand),
            Some(_) => {}
            None => report.unledgered += 1,
        }
        let held = live.get(&key).copied().unwrap_or(0);
        if held != rec.reserved {
            broken("reserved", held, rec.reserved);
        }
        if rec.on_hand < 0 {
            broken("negative_on_hand", 0, rec.on_hand);
        }
        if rec.reserved < 0 {
            broken("negative_reserved", 0, rec.reserved);
        }
        if rec.reserved > rec.on_hand {
            broken("reserved_above_on_hand", rec.on_hand, rec.reserved);
        }
        stocked.insert(key, ());
    }
    // Figures with no stock record at all: a ledger that moved stock, or units held for it.
    for (key, l) in &ledgers {
        if !stocked.contains_key(key) && l.adjusted - l.sold != 0 {
            report.mismatches.push(Mismatch { key: key.clone(), rule: "on_hand", expected: l.adjusted - l.sold, found: 0 });
        }
    }
    for (key, held) in &live {
        if !stocked.contains_key(key) {
            report.mismatches.push(Mismatch { key: key.clone(), rule: "reserved", expected: *held, found: 0 });
        }
    }
    report.mismatches.sort_by(|a, b| a.key.cmp(&b.key).then(a.rule.cmp(b.rule)));
    Ok(report)
}

/// What the cross-shard HQ check found (issue 16, seed 004: "HQ 총 재고 = 미할당 + Σ 매장").
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct HqReport {
    /// HQ stock records (`hq/{hqId}/{productId}`) checked.
    pub records: usize,
    /// (HQ, product) pairs with store stock but no HQ record: stock written before the HQ ledger
    /// existed and never changed since (not a mismatch, like [`Report::unledgered`]).
    pub unledgered: usize,
    /// Broken rules, in key order; the keys are `{hqId}/{productId}`.
    pub mismatches: Vec<Mismatch>,
}

/// Checks every HQ's figures against its stores' across **all** state shards of the stock
/// reserver (the HQ's record lives on the HQ key's shard, its stores on theirs):
///
/// - `hq_stores`: the HQ ledger's `stores` = Σ on hand of the HQ's stores (only when `at_rest`);
/// - `hq_in_transit`: nothing in transit (only when `at_rest`);
/// - `negative_hq_unallocated`, `negative_hq_in_transit`, `negative_hq_stores`: always.
///
/// `at_rest` says that no record waits on the reserver's input: a [`StockLedgerEntry`] in flight
/// legitimately leaves the two levels apart until it is applied, so the cross-shard rules are
/// only judged when nothing is in flight (the caller checks the consumer group's position).
///
/// Errors: [`ProcessError::CorruptState`] for a stock or HQ record that does not parse.
///
/// [`StockLedgerEntry`]: orderflow_api::events::StockLedgerEntry
pub fn reconcile_hqs(shards: &[StateTxn], at_rest: bool) -> Result<HqReport, ProcessError> {
    let corrupt = |key: &[u8], e: serde_json::Error| ProcessError::CorruptState {
        key: String::from_utf8_lossy(key).into_owned(),
        message: format!("reconciliation cannot read it: {e}"),
    };
    // "{hqId}/{productId}" → Σ on hand of its stores.
    let mut at_stores: BTreeMap<String, i64> = BTreeMap::new();
    let mut hqs: BTreeMap<String, crate::HqStock> = BTreeMap::new();
    for state in shards {
        for (k, v) in state.scan_prefix(STOCK_PREFIX) {
            let key = String::from_utf8_lossy(&k[STOCK_PREFIX.len()..]).into_owned();
            let (store, product) = key.rsplit_once('/').unwrap_or((key.as_str(), ""));
            let hq = store.split_once(':').map_or(store, |(hq, _)| hq);
            let rec: StockRecord = serde_json::from_slice(&v).map_err(|e| corrupt(&k, e))?;
            *at_stores.entry(format!("{hq}/{product}")).or_default() += rec.on_hand;
        }
        for (k, v) in state.scan_prefix(crate::HQ_PREFIX) {
            hqs.insert(
                String::from_utf8_lossy(&k[crate::HQ_PREFIX.len()..]).into_owned(),
                serde_json::from_slice(&v).map_err(|e| corrupt(&k, e))?,
            );
        }
    }
    let mut report = HqReport { records: hqs.len(), ..HqReport::default() };
    for (key, rec) in &hqs {
        let mut broken = |rule, expected, found| report.mismatches.push(Mismatch { key: key.clone(), rule, expected, found });
        let stores = at_stores.get(key).copied().unwrap_or(0);
        if at_rest && rec.stores != stores {
            broken("hq_stores", stores, rec.stores);
        }
        if at_rest && rec.in_transit != 0 {
            broken("hq_in_transit", 0, rec.in_transit);
        }
        for (rule, found) in
            [("negative_hq_unallocated", rec.unallocated), ("negative_hq_in_transit", rec.in_transit), ("negative_hq_stores", rec.stores)]
        {
            if found < 0 {
                broken(rule, 0, found);
            }
        }
    }
    report.unledgered = at_stores.iter().filter(|(k, units)| !hqs.contains_key(*k) && **units != 0).count();
    report.mismatches.sort_by(|a, b| a.key.cmp(&b.key).then(a.rule.cmp(b.rule)));
    Ok(report)
}
