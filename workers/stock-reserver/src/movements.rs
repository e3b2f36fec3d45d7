//! Admin stock movements (`inventory.adjusted`, seed 004, issue 16) and the units they send
//! between the HQ and the stores ([`crate::hierarchy`] has the design).
//!
//! | type | `storeId` | where it applies | effect |
//! |---|---|---|---|
//! | `RESTOCK` | empty | HQ shard | unallocated += delta (> 0) |
//! | `RESTOCK` | store | store shard | store on hand += delta (> 0): received through the HQ straight at the store |
//! | `DISTRIBUTION` | store | HQ shard, then store | unallocated −= delta (> 0), in transit; the store receives it |
//! | `TRANSFER` | source | source shard, then `toStoreId` | source on hand −= delta (> 0, from available), in transit; the destination receives it |
//! | `CORRECTION` | empty or store | HQ or store shard | signed delta, `reason` required, store must be known |
//!
//! Every movement is checked whole before anything applies (all lines or none): an unknown type,
//! a missing field, a sign the type does not allow, a result below zero (or, at a store, below
//! its reserved units), an unknown HQ or store is [`ProcessError::Invalid`], i.e. a dead-letter
//! record with the reason (the rejection an operator sees with `orderflow dlq list`), and
//! nothing changes. A destination store is registered by the units it receives.

use orderflow_api::events::{adjustment_type, allocation_step, change_reason, InventoryAdjusted, StockAllocation};
use orderflow_api::{ProcessError, StateTxn};

use crate::hierarchy::{self, allocate, load_hq, report, HqStock, Line};
use crate::{load_stock, reconcile, register_store, stock_key, store_registry_key, store_stock, StockRecord};

/// The checks of movement `e` that need no state: ids present, at least one line, a known
/// `adjustmentType`, the signs it allows, a `reason` for a `CORRECTION`, the stores a type
/// needs. Returns its lines with repeated products summed (one `stock.updated` per product).
/// `orderflow inventory` runs the same checks before it publishes anything.
///
/// Errors: the first problem, as a sentence.
pub fn check(e: &InventoryAdjusted) -> Result<Vec<(String, i64)>, String> {
    if e.event_id.is_empty() || e.hq_id.is_empty() {
        return Err("eventId and hqId are required".into());
    }
    if e.items.is_empty() {
        return Err("has no items".into());
    }
    let mut deltas: Vec<(String, i64)> = Vec::new();
    for item in &e.items {
        if item.product_id.is_empty() {
            return Err("an item has an empty productId".into());
        }
        match deltas.iter_mut().find(|(p, _)| *p == item.product_id) {
            Some((_, d)) => *d = d.checked_add(item.delta).ok_or("delta overflows")?,
            None => deltas.push((item.product_id.clone(), item.delta)),
        }
    }
    let t = e.adjustment_type.as_str();
    let at_hq = e.store_id.is_empty();
    let positive = || match deltas.iter().find(|(_, d)| *d <= 0) {
        Some((p, d)) => Err(format!("{t} moves units, so every delta must be positive; {p} has {d}")),
        None => Ok(()),
    };
    match t {
        adjustment_type::RESTOCK => positive()?,
        adjustment_type::DISTRIBUTION if at_hq => return Err("a DISTRIBUTION needs the receiving storeId".into()),
        adjustment_type::DISTRIBUTION => positive()?,
        adjustment_type::TRANSFER => {
            positive()?;
            let to = e.to_store_id.as_deref().unwrap_or_default();
            if at_hq || to.is_empty() || to == e.store_id {
                return Err("a TRANSFER needs a source storeId and a different toStoreId".into());
            }
        }
        adjustment_type::CORRECTION => {
            if e.reason.as_deref().map(str::trim).is_none_or(str::is_empty) {
                return Err("a CORRECTION needs a reason (the audit trail)".into());
            }
            if deltas.iter().any(|(_, d)| *d == 0) {
                return Err("a CORRECTION line with delta 0 changes nothing".into());
            }
        }
        other => return Err(format!("unknown adjustmentType {other:?} (expected one of {:?})", adjustment_type::ALL)),
    }
    if t != adjustment_type::TRANSFER && e.to_store_id.is_some() {
        return Err(format!("toStoreId is for a TRANSFER, not a {t}"));
    }
    Ok(deltas)
}

/// Applies admin movement `e` (see the module docs): [`check`], then the checks against the
/// state (figures, known HQ and stores), then every line or none.
///
/// Errors: [`ProcessError::Invalid`] naming the first problem; nothing applied.
pub(crate) fn movement(e: &InventoryAdjusted, state: &mut StateTxn, out: &mut orderflow_api::Outputs) -> Result<(), ProcessError> {
    let deltas = check(e).map_err(|m| invalid(e, &m))?;
    let at_hq = e.store_id.is_empty();
    match e.adjustment_type.as_str() {
        adjustment_type::RESTOCK if at_hq => hq_change(e, &deltas, state, out),
        adjustment_type::RESTOCK => store_change(e, &deltas, state, out),
        adjustment_type::CORRECTION if at_hq => {
            known_hq(e, state)?;
            hq_change(e, &deltas, state, out)
        }
        adjustment_type::CORRECTION => {
            known_store(e, &e.store_id, state)?;
            store_change(e, &deltas, state, out)
        }
        adjustment_type::DISTRIBUTION => {
            known_hq(e, state)?;
            distribute(e, &deltas, state, out)
        }
        _ => {
            known_store(e, &e.store_id, state)?;
            transfer(e, e.to_store_id.as_deref().unwrap_or_default(), &deltas, state, out)
        }
    }
}

/// A store receives units (`DISTRIBUTION` or `TRANSFER` [`StockAllocation`]): on hand += each
/// quantity, reported to the HQ as arrived (in transit −).
pub(crate) fn receive(a: &StockAllocation, state: &mut StateTxn, out: &mut orderflow_api::Outputs) -> Result<(), ProcessError> {
    if a.store_id.is_empty() || a.items.iter().any(|i| i.quantity <= 0) {
        return Err(ProcessError::Invalid(format!("StockAllocation {}: {} without a store or with a quantity ≤ 0", a.event_id, a.step)));
    }
    let reason = if a.step == allocation_step::TRANSFER { change_reason::TRANSFER } else { change_reason::DISTRIBUTION };
    let mut lines = Vec::with_capacity(a.items.len());
    for i in &a.items {
        let key = stock_key(&a.hq_id, &a.store_id, &i.product_id);
        let before = load_stock(state, &key)?;
        let after = StockRecord { on_hand: before.on_hand + i.quantity, reserved: before.reserved };
        store_stock(state, key, &after, out);
        reconcile::book(state, (&a.hq_id, &a.store_id, &i.product_id), before.on_hand, i.quantity, 0)?;
        lines.push(Line {
            product_id: i.product_id.clone(),
            previous: before.on_hand,
            current: after.on_hand,
            in_transit: -i.quantity,
            unallocated: 0,
        });
    }
    register_store(&a.hq_id, &a.store_id, &a.cause_event_id, state);
    out.note("movement", format!("{reason}_received"));
    report(&a.hq_id, &a.store_id, reason, &a.reference_id, &a.cause_event_id, "stock.ledger/in", a.occurred_at, lines, out)
}

/// `RESTOCK` / `CORRECTION` of the HQ's unallocated units.
fn hq_change(
    e: &InventoryAdjusted,
    deltas: &[(String, i64)],
    state: &mut StateTxn,
    out: &mut orderflow_api::Outputs,
) -> Result<(), ProcessError> {
    change_hq(e, deltas, &e.adjustment_type, state, out, |p, d, before| {
        let unallocated = before.unallocated.checked_add(d).ok_or_else(|| format!("delta {d} for {p} overflows"))?;
        if unallocated < 0 {
            return Err(format!("delta {d} for {p} would leave the HQ's unallocated units at {unallocated}"));
        }
        Ok(HqStock { unallocated, ..before })
    })?;
    register_store(&e.hq_id, "", &e.event_id, state);
    out.note("adjustment", e.adjustment_type.clone());
    Ok(())
}

/// `RESTOCK` / `CORRECTION` at a store: on hand += delta (never below zero or below reserved),
/// reported to the HQ.
fn store_change(
    e: &InventoryAdjusted,
    deltas: &[(String, i64)],
    state: &mut StateTxn,
    out: &mut orderflow_api::Outputs,
) -> Result<(), ProcessError> {
    let mut changes = Vec::with_capacity(deltas.len());
    for (p, d) in deltas {
        let key = stock_key(&e.hq_id, &e.store_id, p);
        let before = load_stock(state, &key)?;
        let on_hand = before.on_hand.checked_add(*d).ok_or_else(|| invalid(e, &format!("delta {d} for {p} overflows")))?;
        if on_hand < 0 || on_hand < before.reserved {
            return Err(invalid(
                e,
                &format!("delta {d} for {p} would leave on hand {on_hand} below zero or below the {} reserved units", before.reserved),
            ));
        }
        changes.push((key, p, *d, before, StockRecord { on_hand, reserved: before.reserved }));
    }
    let mut lines = Vec::with_capacity(changes.len());
    for (key, p, d, before, after) in changes {
        store_stock(state, key, &after, out);
        reconcile::book(state, (&e.hq_id, &e.store_id, p), before.on_hand, d, 0)?;
        lines.push(Line { product_id: p.clone(), previous: before.on_hand, current: after.on_hand, in_transit: 0, unallocated: 0 });
    }
    register_store(&e.hq_id, &e.store_id, &e.event_id, state);
    out.note("adjustment", e.adjustment_type.clone());
    report(&e.hq_id, &e.store_id, &e.adjustment_type, &e.reference_id, &e.event_id, "stock.ledger", e.occurred_at, lines, out)
}

/// Changes the HQ's figures for every line of `e`, all or none: `change` gives a product's new
/// figures from its delta and current ones, or why the movement is refused (nothing applied);
/// then each product gets its HQ `stock.updated` row with `reason`.
fn change_hq(
    e: &InventoryAdjusted,
    deltas: &[(String, i64)],
    reason: &str,
    state: &mut StateTxn,
    out: &mut orderflow_api::Outputs,
    change: impl Fn(&str, i64, HqStock) -> Result<HqStock, String>,
) -> Result<(), ProcessError> {
    let mut changes = Vec::with_capacity(deltas.len());
    for (p, d) in deltas {
        let before = load_hq(state, &e.hq_id, p)?;
        let after = change(p, *d, before).map_err(|m| invalid(e, &m))?;
        changes.push((p, before, after));
    }
    for (p, before, after) in changes {
        hierarchy::hq_row(&e.event_id, e.occurred_at, &e.hq_id, p, (before, after), reason, &e.reference_id, state, out)?;
    }
    Ok(())
}

/// `DISTRIBUTION` at the HQ: every line from unallocated (all or none), now in transit to the
/// store, which receives a `DISTRIBUTION` allocation.
fn distribute(
    e: &InventoryAdjusted,
    deltas: &[(String, i64)],
    state: &mut StateTxn,
    out: &mut orderflow_api::Outputs,
) -> Result<(), ProcessError> {
    change_hq(e, deltas, change_reason::DISTRIBUTION, state, out, |p, d, before| {
        if before.unallocated < d {
            return Err(format!("the HQ has {} unallocated units of {p}, {d} asked", before.unallocated));
        }
        Ok(HqStock { unallocated: before.unallocated - d, in_transit: before.in_transit + d, ..before })
    })?;
    out.note("adjustment", change_reason::DISTRIBUTION);
    let items = deltas.to_vec();
    let (hq, to) = (&e.hq_id, &e.store_id);
    allocate(&e.event_id, e.occurred_at, hq, "", to, allocation_step::DISTRIBUTION, &e.reference_id, None, &e.event_id, items, out)
}

/// `TRANSFER` at the source store: every line from its available units (all or none), reported
/// to the HQ as in transit, and sent to the destination store.
fn transfer(
    e: &InventoryAdjusted,
    to: &str,
    deltas: &[(String, i64)],
    state: &mut StateTxn,
    out: &mut orderflow_api::Outputs,
) -> Result<(), ProcessError> {
    let mut changes = Vec::with_capacity(deltas.len());
    for (p, d) in deltas {
        let key = stock_key(&e.hq_id, &e.store_id, p);
        let before = load_stock(state, &key)?;
        if before.available() < *d {
            return Err(invalid(e, &format!("store {} has {} available units of {p}, {d} asked", e.store_id, before.available())));
        }
        changes.push((key, p, *d, before, StockRecord { on_hand: before.on_hand - d, reserved: before.reserved }));
    }
    let mut lines = Vec::with_capacity(changes.len());
    for (key, p, d, before, after) in changes {
        store_stock(state, key, &after, out);
        reconcile::book(state, (&e.hq_id, &e.store_id, p), before.on_hand, -d, 0)?;
        lines.push(Line { product_id: p.clone(), previous: before.on_hand, current: after.on_hand, in_transit: d, unallocated: 0 });
    }
    out.note("adjustment", change_reason::TRANSFER);
    let (hq, from) = (&e.hq_id, &e.store_id);
    report(hq, from, change_reason::TRANSFER, &e.reference_id, &e.event_id, "stock.ledger", e.occurred_at, lines, out)?;
    let items = deltas.to_vec();
    allocate(&e.event_id, e.occurred_at, hq, from, to, allocation_step::TRANSFER, &e.reference_id, None, &e.event_id, items, out)
}

fn known_hq(e: &InventoryAdjusted, state: &StateTxn) -> Result<(), ProcessError> {
    match state.get(&store_registry_key(&e.hq_id, "")) {
        Some(_) => Ok(()),
        None => Err(invalid(e, &format!("unknown HQ {} (no RESTOCK ever reached it)", e.hq_id))),
    }
}

fn known_store(e: &InventoryAdjusted, store_id: &str, state: &StateTxn) -> Result<(), ProcessError> {
    match state.get(&store_registry_key(&e.hq_id, store_id)) {
        Some(_) => Ok(()),
        None => Err(invalid(e, &format!("unknown store {}:{store_id} (it never received stock)", e.hq_id))),
    }
}

fn invalid(e: &InventoryAdjusted, what: &str) -> ProcessError {
    ProcessError::Invalid(format!(
        "InventoryAdjusted {} ({} {}:{}): {what}; nothing applied",
        e.event_id, e.adjustment_type, e.hq_id, e.store_id
    ))
}
