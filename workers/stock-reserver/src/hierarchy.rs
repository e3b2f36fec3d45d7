//! The stock hierarchy of seed 004 (issue 16): HQ → store → product.
//!
//! # Design: the HQ's ledger lives on the HQ's own partition
//!
//! `stock.commands` carries two kinds of keys: `hqId:storeId` for a store and `hqId:` (empty
//! store) for the HQ itself. So the HQ's figures ([`HqStock`] at [`hq_key`]: unallocated units, units
//! in transit, units at its stores) are owned by exactly one state shard, the one the HQ's key
//! hashes to, while its stores stay spread over every partition: one HQ with hundreds of stores
//! does not put them on one partition. The two levels talk only through `stock.commands`
//! records written in the same Kafka transaction as the state change that caused them, with ids
//! derived from that cause (domain rule 7), so a crash anywhere replays to the same records and
//! the runtime's `eventId` dedupe drops the copies:
//!
//! - **Store → HQ, [`StockLedgerEntry`]**: every change of a store's on-hand figure (sale,
//!   restock, correction, a transfer's two ends, units received from or returned to the HQ) is
//!   reported to the HQ's ledger with the store's previous/current figure. The HQ applies it and
//!   publishes the `stock.updated` with both figures (seed 004: `hqStock` and `storeStock`): the
//!   ledger sees every change of the HQ total in one order, so its previous/current are exact.
//! - **HQ fallback, [`StockAllocation`]** (seed 004 "매장 재고 부족 시 HQ 재고 확인"): an order
//!   short at its store is recorded `AWAITING_HQ`, holding nothing at the store (so an order the
//!   HQ cannot serve never blocks the store's units for others), and sends a `FALLBACK_REQUEST`
//!   for the missing units; the HQ takes them from its unallocated stock (all or nothing, never
//!   below the policy's `keep_at_hq`) and answers `FALLBACK_GRANT` (the units are now *in
//!   transit*) or `FALLBACK_DENY`. On the grant the store receives the units, reserves the whole
//!   order from its own part and the HQ's (`stock.reserved`) and reports them received; if its
//!   own part was sold meanwhile, or on the deny, the order fails `INSUFFICIENT_STOCK` and
//!   granted units go straight back. The reservation records the units that came from the HQ
//!   (`fromHq`), and a release gives exactly those back to the HQ (`HQ_RETURN`).
//! - **Movements**: `DISTRIBUTION` is debited at the HQ and credited at the store, `TRANSFER` is
//!   debited at the source store and credited at the destination; between the two steps the
//!   units are in transit, so at every instant, per HQ and product,
//!   `total = unallocated + in transit + stores` and `stores` = Σ store on hand once every entry
//!   has arrived (the invariant the tests and `orderflow reconcile` check, the latter with
//!   [`crate::reconcile_hqs`] only at rest).
//!
//! The HQ's own rows of `stock.updated` have an empty `storeId` and carry the unallocated units
//! as `storeStock`.

use std::collections::BTreeMap;

use orderflow_api::events::store_key;
use orderflow_api::events::{AllocationItem, LedgerLine, StockAllocation, StockLedgerEntry, StockLevel, StockUpdated};
use orderflow_api::{derive_event_id, Outputs, ProcessError, StateTxn};
use serde::{Deserialize, Serialize};

use crate::{PORT_COMMANDS, PORT_UPDATED};

/// Prefix of every HQ stock key (see [`hq_key`]).
pub const HQ_PREFIX: &[u8] = b"hq/";

/// State key of one product's stock at one HQ: `hq/{hqId}/{productId}` (in the HQ's shard).
pub fn hq_key(hq_id: &str, product_id: &str) -> Vec<u8> {
    format!("hq/{hq_id}/{product_id}").into_bytes()
}

/// One product's figures at one HQ, in units. JSON `{"unallocated":…,"inTransit":…,"stores":…}`.
///
/// Invariants: every field ≥ 0; `stores` = Σ on hand of the HQ's stores once every
/// [`StockLedgerEntry`] in flight has arrived.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HqStock {
    /// Units at the HQ not allocated to any store.
    pub unallocated: i64,
    /// Units between two places: debited from the HQ or a store, not yet credited.
    pub in_transit: i64,
    /// Units on hand at the HQ's stores (as reported by their ledger entries).
    pub stores: i64,
}

impl HqStock {
    /// The HQ total (seed 004: "HQ 총 재고"): unallocated + in transit + stores.
    pub fn total(&self) -> i64 {
        self.unallocated + self.in_transit + self.stores
    }
}

/// The HQ fallback policy (`[workers.<reserver>.hq_fallback]` in `topology.toml`), with
/// per-HQ overrides under `hqs."<hqId>"`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FallbackPolicy {
    /// Whether a short store asks its HQ (default true).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Units of each product the HQ never gives to a fallback (safety stock; default 0).
    #[serde(default)]
    pub keep_at_hq: i64,
    /// Most units one order may take from the HQ, all products together (0 = no limit).
    #[serde(default)]
    pub max_units_per_order: i64,
    /// Per-HQ overrides of the three settings above.
    #[serde(default)]
    pub hqs: BTreeMap<String, HqOverride>,
}

/// Per-HQ settings of [`FallbackPolicy`]; an absent one keeps the policy's.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HqOverride {
    pub enabled: Option<bool>,
    pub keep_at_hq: Option<i64>,
    pub max_units_per_order: Option<i64>,
}

fn yes() -> bool {
    true
}

impl Default for FallbackPolicy {
    fn default() -> Self {
        FallbackPolicy { enabled: true, keep_at_hq: 0, max_units_per_order: 0, hqs: BTreeMap::new() }
    }
}

impl FallbackPolicy {
    /// `(enabled, keep_at_hq, max_units_per_order)` for `hq_id`.
    pub fn for_hq(&self, hq_id: &str) -> (bool, i64, i64) {
        let o = self.hqs.get(hq_id).cloned().unwrap_or_default();
        (
            o.enabled.unwrap_or(self.enabled),
            o.keep_at_hq.unwrap_or(self.keep_at_hq),
            o.max_units_per_order.unwrap_or(self.max_units_per_order),
        )
    }

    /// Errors: a negative `keep_at_hq` or `max_units_per_order`, here or in an override.
    pub fn validate(&self) -> Result<(), String> {
        let check = |what: &str, v: i64| if v < 0 { Err(format!("hq_fallback {what} must not be negative, got {v}")) } else { Ok(()) };
        check("keep_at_hq", self.keep_at_hq)?;
        check("max_units_per_order", self.max_units_per_order)?;
        for (hq, o) in &self.hqs {
            check(&format!("hqs.{hq}.keep_at_hq"), o.keep_at_hq.unwrap_or(0))?;
            check(&format!("hqs.{hq}.max_units_per_order"), o.max_units_per_order.unwrap_or(0))?;
        }
        Ok(())
    }
}

/// Loads `hq_id`'s figures for `product_id` (zero when never seen).
pub fn load_hq(state: &StateTxn, hq_id: &str, product_id: &str) -> Result<HqStock, ProcessError> {
    Ok(state.get_json::<HqStock>(&hq_key(hq_id, product_id))?.unwrap_or_default())
}

/// Writes an HQ figure, noting `conservation_mismatch` when a field went negative.
pub fn store_hq(state: &mut StateTxn, hq_id: &str, product_id: &str, rec: &HqStock, out: &mut Outputs) {
    if rec.unallocated < 0 || rec.in_transit < 0 || rec.stores < 0 {
        out.note_as("conservation_mismatch", "negative_hq_stock", orderflow_api::Export::InvariantBroken);
    }
    state.put_json(hq_key(hq_id, product_id), rec);
}

/// What a store tells its HQ about one product: on hand `previous` → `current`, and the change
/// of the HQ's in-transit and unallocated units that goes with it.
#[derive(Debug, Clone)]
pub struct Line {
    pub product_id: String,
    pub previous: i64,
    pub current: i64,
    pub in_transit: i64,
    pub unallocated: i64,
}

/// Emits a [`StockLedgerEntry`] from store `store_id` to its HQ (key `hqId:`), id
/// `derive(id_cause, id_tag)`; the HQ derives the `stock.updated` ids from `cause_event_id`.
#[allow(clippy::too_many_arguments)]
pub fn report(
    hq_id: &str,
    store_id: &str,
    reason: &str,
    reference_id: &str,
    cause_event_id: &str,
    id_tag: &str,
    occurred_at: i64,
    lines: Vec<Line>,
    out: &mut Outputs,
) -> Result<(), ProcessError> {
    if lines.is_empty() {
        return Ok(());
    }
    out.emit(
        PORT_COMMANDS,
        store_key(hq_id, ""),
        StockLedgerEntry {
            event_id: derive_event_id(cause_event_id, id_tag),
            occurred_at,
            hq_id: hq_id.to_string(),
            store_id: store_id.to_string(),
            change_reason: reason.to_string(),
            reference_id: reference_id.to_string(),
            cause_event_id: cause_event_id.to_string(),
            lines: lines
                .into_iter()
                .map(|l| LedgerLine {
                    product_id: l.product_id,
                    store_previous: l.previous,
                    store_current: l.current,
                    in_transit: l.in_transit,
                    unallocated: l.unallocated,
                })
                .collect(),
        },
    )
}

/// Emits a [`StockAllocation`] `step` to `hqId:to_store` (the HQ when `to_store` is empty), id
/// `derive(cause, "stock.allocation")`.
#[allow(clippy::too_many_arguments)]
pub fn allocate(
    cause: &str,
    occurred_at: i64,
    hq_id: &str,
    from_store: &str,
    to_store: &str,
    step: &str,
    reference_id: &str,
    order_id: Option<&str>,
    cause_event_id: &str,
    items: Vec<(String, i64)>,
    out: &mut Outputs,
) -> Result<(), ProcessError> {
    out.emit(
        PORT_COMMANDS,
        store_key(hq_id, to_store),
        StockAllocation {
            event_id: derive_event_id(cause, "stock.allocation"),
            occurred_at,
            hq_id: hq_id.to_string(),
            store_id: to_store.to_string(),
            from_store_id: from_store.to_string(),
            step: step.to_string(),
            reference_id: reference_id.to_string(),
            order_id: order_id.map(str::to_string),
            cause_event_id: cause_event_id.to_string(),
            items: items.into_iter().map(|(product_id, quantity)| AllocationItem { product_id, quantity }).collect(),
        },
    )
}

/// The `stock.updated` tag suffix of a store row: `/in` for a transfer's receiving end,
/// `/return` for units given back to the HQ, none otherwise; `/hq` marks the HQ's own rows.
fn suffix(reason: &str, previous: i64, current: i64) -> &'static str {
    use orderflow_api::events::change_reason::*;
    match reason {
        TRANSFER if current > previous => "/in",
        HQ_RETURN => "/return",
        _ => "",
    }
}

/// Publishes one `stock.updated` (key productId): a store row (`store_id` set, its on hand
/// `store`) or the HQ's own row (`store_id` empty, its unallocated units), with the HQ total
/// `hq` before/after.
#[allow(clippy::too_many_arguments)]
pub fn publish(
    event_id: String,
    occurred_at: i64,
    hq_id: &str,
    store_id: &str,
    product_id: &str,
    hq: (i64, i64),
    store: (i64, i64),
    reason: &str,
    reference_id: &str,
    out: &mut Outputs,
) -> Result<(), ProcessError> {
    out.emit(
        PORT_UPDATED,
        product_id.to_string(),
        StockUpdated {
            event_id,
            occurred_at,
            hq_id: hq_id.to_string(),
            store_id: store_id.to_string(),
            product_id: product_id.to_string(),
            hq_stock: Some(StockLevel { previous: hq.0, current: hq.1 }),
            store_stock: StockLevel { previous: store.0, current: store.1 },
            change_amount: store.1 - store.0,
            change_reason: reason.to_string(),
            reference_id: reference_id.to_string(),
        },
    )
}

/// Writes `after` as `hq_id`'s figures of `product_id` and publishes the HQ's own row
/// (`storeId` empty, unallocated `before` → `after`, the HQ total before/after), id
/// `derive(cause, "stock.updated/<productId>/hq")`.
#[allow(clippy::too_many_arguments)]
pub fn hq_row(
    cause: &str,
    occurred_at: i64,
    hq_id: &str,
    product_id: &str,
    (before, after): (HqStock, HqStock),
    reason: &str,
    reference_id: &str,
    state: &mut StateTxn,
    out: &mut Outputs,
) -> Result<(), ProcessError> {
    store_hq(state, hq_id, product_id, &after, out);
    let id = derive_event_id(cause, &format!("stock.updated/{product_id}/hq"));
    let (hq, own) = ((before.total(), after.total()), (before.unallocated, after.unallocated));
    publish(id, occurred_at, hq_id, "", product_id, hq, own, reason, reference_id, out)
}

/// The HQ's ledger applies a store's entry: `stores += current − previous`, `in_transit` and
/// `unallocated` by the line's changes; publishes the store row (when the store's figure
/// changed) and the HQ row (when the unallocated figure changed).
pub fn apply_entry(e: &StockLedgerEntry, state: &mut StateTxn, out: &mut Outputs) -> Result<(), ProcessError> {
    for l in &e.lines {
        let before = load_hq(state, &e.hq_id, &l.product_id)?;
        let after = HqStock {
            unallocated: before.unallocated + l.unallocated,
            in_transit: before.in_transit + l.in_transit,
            stores: before.stores + (l.store_current - l.store_previous),
        };
        store_hq(state, &e.hq_id, &l.product_id, &after, out);
        let hq = (before.total(), after.total());
        if l.store_current != l.store_previous {
            let tag = format!("stock.updated/{}{}", l.product_id, suffix(&e.change_reason, l.store_previous, l.store_current));
            let id = derive_event_id(&e.cause_event_id, &tag);
            let store = (l.store_previous, l.store_current);
            publish(id, e.occurred_at, &e.hq_id, &e.store_id, &l.product_id, hq, store, &e.change_reason, &e.reference_id, out)?;
        }
        if l.unallocated != 0 {
            let id = derive_event_id(&e.event_id, &format!("stock.updated/{}/hq", l.product_id));
            let own = (before.unallocated, after.unallocated);
            publish(id, e.occurred_at, &e.hq_id, "", &l.product_id, hq, own, &e.change_reason, &e.reference_id, out)?;
        }
    }
    out.note("hq_ledger", e.change_reason.clone());
    Ok(())
}

/// The HQ answers a `FALLBACK_REQUEST`: grants every line from its unallocated units (keeping
/// `keep_at_hq` of each, at most `max_units_per_order` in all) or denies the whole request.
/// A grant moves the units to in transit and publishes the HQ rows (`HQ_FALLBACK`).
pub fn answer_fallback(a: &StockAllocation, policy: &FallbackPolicy, state: &mut StateTxn, out: &mut Outputs) -> Result<(), ProcessError> {
    use orderflow_api::events::allocation_step::{FALLBACK_DENY, FALLBACK_GRANT};
    use orderflow_api::events::change_reason::HQ_FALLBACK;
    let (enabled, keep, max_units) = policy.for_hq(&a.hq_id);
    let mut levels = Vec::with_capacity(a.items.len());
    let mut grantable = enabled;
    for i in &a.items {
        let rec = load_hq(state, &a.hq_id, &i.product_id)?;
        let spare = (rec.unallocated - keep).max(0);
        grantable &= i.quantity > 0 && spare >= i.quantity;
        levels.push((i, rec, spare));
    }
    let asked: i64 = a.items.iter().map(|i| i.quantity).sum();
    if max_units > 0 && asked > max_units {
        grantable = false;
    }
    let order_id = a.order_id.as_deref();
    if !grantable {
        let items = levels.iter().map(|(i, _, spare)| (i.product_id.clone(), if enabled { *spare } else { 0 })).collect();
        out.note("hq_fallback", if enabled { "denied" } else { "disabled" });
        return allocate(
            &a.event_id,
            a.occurred_at,
            &a.hq_id,
            "",
            &a.from_store_id,
            FALLBACK_DENY,
            &a.reference_id,
            order_id,
            &a.cause_event_id,
            items,
            out,
        );
    }
    for (i, before, _) in &levels {
        let after = HqStock { unallocated: before.unallocated - i.quantity, in_transit: before.in_transit + i.quantity, ..*before };
        let reference = order_id.unwrap_or(&a.reference_id);
        hq_row(&a.event_id, a.occurred_at, &a.hq_id, &i.product_id, (*before, after), HQ_FALLBACK, reference, state, out)?;
    }
    out.note("hq_fallback", "granted");
    let items = a.items.iter().map(|i| (i.product_id.clone(), i.quantity)).collect();
    allocate(
        &a.event_id,
        a.occurred_at,
        &a.hq_id,
        "",
        &a.from_store_id,
        FALLBACK_GRANT,
        &a.reference_id,
        order_id,
        &a.cause_event_id,
        items,
        out,
    )
}
