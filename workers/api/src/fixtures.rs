//! Event builders for tests and examples: fixed store HQ-1/S-1 unless given, deterministic ids.
//!
//! Each builder takes the values tests vary (event id, order id, items, reason, reservation id,
//! times) and fills the rest with fixed defaults: store [`HQ`]/[`STORE`], customer
//! [`CUSTOMER`], unit price [`UNIT_PRICE`], no customer message, no sold items. Nothing reads the
//! clock or a random source, so the same arguments always build the same event. Override any
//! other field with struct update syntax, e.g. `OrderCreated { store_id: "".into(), ..order_created(..) }`.

use crate::events::*;

/// HQ of the fixed store.
pub const HQ: &str = "HQ-1";
/// The fixed store.
pub const STORE: &str = "S-1";
/// Customer of every [`order_created`].
pub const CUSTOMER: &str = "C-1";
/// Unit price of every item of [`order_created`], minor units.
pub const UNIT_PRICE: i64 = 1000;

/// `order.created` for `(productId, quantity)` items, each at [`UNIT_PRICE`].
pub fn order_created(event_id: &str, order_id: &str, occurred_at: i64, items: &[(&str, i32)]) -> OrderCreated {
    OrderCreated {
        event_id: event_id.into(),
        occurred_at,
        order_id: order_id.into(),
        customer_id: CUSTOMER.into(),
        hq_id: HQ.into(),
        store_id: STORE.into(),
        items: items.iter().map(|&(p, quantity)| OrderItem { product_id: p.into(), quantity, unit_price: UNIT_PRICE }).collect(),
    }
}

/// `stock.reserved` for `(productId, reserved)` items.
pub fn stock_reserved(
    event_id: &str,
    order_id: &str,
    reservation_id: &str,
    occurred_at: i64,
    expires_at: i64,
    items: &[(&str, i32)],
) -> StockReserved {
    StockReserved {
        event_id: event_id.into(),
        occurred_at,
        order_id: order_id.into(),
        reservation_id: reservation_id.into(),
        hq_id: HQ.into(),
        store_id: STORE.into(),
        expires_at,
        items: items.iter().map(|&(p, reserved)| ReservedItem { product_id: p.into(), reserved }).collect(),
    }
}

/// `stock.reservation.failed` with reason `INSUFFICIENT_STOCK` for `(productId, requested,
/// available)` items.
pub fn stock_reservation_failed(event_id: &str, order_id: &str, occurred_at: i64, items: &[(&str, i32, i32)]) -> StockReservationFailed {
    StockReservationFailed {
        event_id: event_id.into(),
        occurred_at,
        order_id: order_id.into(),
        hq_id: HQ.into(),
        store_id: STORE.into(),
        reason: failure_reason::INSUFFICIENT_STOCK.into(),
        items: items.iter().map(|&(p, requested, available)| FailedItem { product_id: p.into(), requested, available }).collect(),
    }
}

/// `stock.reservation.released` for `(productId, released)` items.
pub fn stock_reservation_released(
    event_id: &str,
    order_id: &str,
    reservation_id: &str,
    reason: &str,
    occurred_at: i64,
    items: &[(&str, i32)],
) -> StockReservationReleased {
    StockReservationReleased {
        event_id: event_id.into(),
        occurred_at,
        order_id: order_id.into(),
        reservation_id: reservation_id.into(),
        hq_id: HQ.into(),
        store_id: STORE.into(),
        reason: reason.into(),
        items: items.iter().map(|&(p, released)| ReleasedItem { product_id: p.into(), released }).collect(),
    }
}

/// `order.cancelled` without a reservation id and with an empty customer message.
pub fn order_cancelled(event_id: &str, order_id: &str, reason: &str, occurred_at: i64) -> OrderCancelled {
    OrderCancelled {
        event_id: event_id.into(),
        occurred_at,
        order_id: order_id.into(),
        hq_id: HQ.into(),
        store_id: STORE.into(),
        reason: reason.into(),
        reservation_id: None,
        customer_message: String::new(),
        refund_required: false,
        customer_id: None,
    }
}

/// `order.completed` with no sold items and a zero total.
pub fn order_completed(event_id: &str, order_id: &str, reservation_id: &str, occurred_at: i64) -> OrderCompleted {
    OrderCompleted {
        event_id: event_id.into(),
        occurred_at,
        order_id: order_id.into(),
        reservation_id: reservation_id.into(),
        hq_id: HQ.into(),
        store_id: STORE.into(),
        items: vec![],
        total_amount: 0,
    }
}

/// `order.settled` with `outcome` (a [`crate::events::settlement`] code) for payment
/// `payment_event_id` of reservation `R-1`, not late, no items; `REFUND_REQUIRED` carries reason
/// `PAYMENT_AFTER_EXPIRY`.
pub fn order_settled(event_id: &str, order_id: &str, outcome: &str, occurred_at: i64) -> OrderSettled {
    OrderSettled {
        event_id: event_id.into(),
        occurred_at,
        order_id: order_id.into(),
        hq_id: HQ.into(),
        store_id: STORE.into(),
        payment_event_id: format!("pay-{event_id}"),
        reservation_id: "R-1".into(),
        outcome: outcome.into(),
        late: false,
        reason: (outcome == crate::events::settlement::REFUND_REQUIRED).then(|| crate::events::cancel_reason::PAYMENT_AFTER_EXPIRY.into()),
        items: vec![],
    }
}

/// `stock.reservation.expired` that occurred at its deadline `expires_at`.
pub fn stock_reservation_expired(event_id: &str, order_id: &str, reservation_id: &str, expires_at: i64) -> StockReservationExpired {
    StockReservationExpired {
        event_id: event_id.into(),
        occurred_at: expires_at,
        order_id: order_id.into(),
        reservation_id: reservation_id.into(),
        hq_id: HQ.into(),
        store_id: STORE.into(),
        expires_at,
    }
}

/// `inventory.adjusted` of type `RESTOCK` with reference id `ref-<eventId>` for `(productId,
/// delta)` items.
pub fn inventory_adjusted(event_id: &str, occurred_at: i64, items: &[(&str, i64)]) -> InventoryAdjusted {
    InventoryAdjusted {
        event_id: event_id.into(),
        occurred_at,
        hq_id: HQ.into(),
        store_id: STORE.into(),
        adjustment_type: change_reason::RESTOCK.into(),
        reference_id: format!("ref-{event_id}"),
        items: items.iter().map(|&(p, delta)| AdjustedItem { product_id: p.into(), delta }).collect(),
        to_store_id: None,
        reason: None,
        operator: None,
    }
}
