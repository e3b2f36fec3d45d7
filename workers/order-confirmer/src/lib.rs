//! Order confirmer: the order state machine of the saga (seed 001).
//!
//! `ORDER_CREATED → ORDER_CONFIRMED → PAYMENT_WAIT → ORDER_COMPLETED`, and
//! `ORDER_CREATED | PAYMENT_WAIT → ORDER_CANCELLED`; a payment's outcome is the stock reserver's
//! verdict (`order.settled`, issue 13), so a late sale also moves `ORDER_CANCELLED → ORDER_COMPLETED`. On `stock.reserved` the order is confirmed and
//! moves straight to `PAYMENT_WAIT` (one `order.confirmed` carrying that status). A cancelled order
//! is never confirmed; a late event for an order in a terminal state is recorded
//! (`late_event` note) and ignored, never applied.
//!
//! State (JSON): [`order_key`] → [`OrderState`]. An order without state is `ORDER_CREATED` (the
//! confirmer does not consume `order.created`).
//!
//! # Layout
//!
//! - `lib.rs`: ports, the per-order state ([`order_key`], [`OrderStatus`], [`OrderState`]) and
//!   [`OrderConfirmer`] (no settings of its own).
//! - `tests.rs`: unit tests through `orderflow_api::Harness`.

use orderflow_api::events::{settlement, OrderCancelled, OrderConfirmed, OrderSettled, StockReservationFailed, StockReserved};
use orderflow_api::{derive_event_id, Context, Event, Outputs, ProcessError, Processor, StateTxn};
use serde::{Deserialize, Serialize};

/// Port of `order.confirmed` (key orderId).
pub const PORT_CONFIRMED: &str = "confirmed";

/// Output ports this worker emits on (wire every one in `topology.toml`).
pub const PORTS: &[&str] = &[PORT_CONFIRMED];

/// State key of an order: `order/{orderId}`.
pub fn order_key(order_id: &str) -> Vec<u8> {
    format!("order/{order_id}").into_bytes()
}

/// Order status (seed 001), serialised with the seed's names (`ORDER_CREATED`, …).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OrderStatus {
    /// Accepted by the Order Service; no stock answer yet (implied by absent state).
    #[serde(rename = "ORDER_CREATED")]
    Created,
    /// Stock reserved; immediately followed by [`OrderStatus::PaymentWait`].
    #[serde(rename = "ORDER_CONFIRMED")]
    Confirmed,
    /// Confirmed and waiting for payment at the POS.
    #[serde(rename = "PAYMENT_WAIT")]
    PaymentWait,
    /// Stock reservation failed; awaiting the canceller's `order.cancelled` (seed 000).
    #[serde(rename = "RESERVATION_FAILED")]
    Failed,
    /// Paid (terminal).
    #[serde(rename = "ORDER_COMPLETED")]
    Completed,
    /// Cancelled (terminal).
    #[serde(rename = "ORDER_CANCELLED")]
    Cancelled,
}

impl OrderStatus {
    /// The seed's name of the status, e.g. `PAYMENT_WAIT`.
    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::Created => "ORDER_CREATED",
            OrderStatus::Confirmed => "ORDER_CONFIRMED",
            OrderStatus::PaymentWait => "PAYMENT_WAIT",
            OrderStatus::Failed => "RESERVATION_FAILED",
            OrderStatus::Completed => "ORDER_COMPLETED",
            OrderStatus::Cancelled => "ORDER_CANCELLED",
        }
    }

    /// Whether no further transition is allowed (`ORDER_COMPLETED`, `ORDER_CANCELLED`).
    pub fn is_terminal(self) -> bool {
        matches!(self, OrderStatus::Completed | OrderStatus::Cancelled)
    }
}

/// What the confirmer stores per order at [`order_key`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderState {
    /// Where the order is in the state machine.
    pub status: OrderStatus,
    /// The live reservation, once stock was reserved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reservation_id: Option<String>,
}

/// The order confirmer worker. See the crate docs for the state machine.
#[derive(Debug, Default, Clone)]
pub struct OrderConfirmer;

impl OrderConfirmer {
    /// An order confirmer; it takes no configuration.
    pub fn new() -> Self {
        OrderConfirmer
    }

    fn reserved(&self, e: &StockReserved, state: &mut StateTxn, out: &mut Outputs) -> Result<(), ProcessError> {
        orderflow_api::require("StockReserved", &e.event_id, "orderId", &e.order_id)?;
        orderflow_api::require("StockReserved", &e.event_id, "reservationId", &e.reservation_id)?;
        let key = order_key(&e.order_id);
        if let Some(s) = state.get_json::<OrderState>(&key)? {
            // Never confirm twice, and never confirm a cancelled (or failed/completed) order.
            out.note("late_event", format!("stock_reserved_when_{}", s.status.as_str()));
            return Ok(());
        }
        out.emit(
            PORT_CONFIRMED,
            e.order_id.clone(),
            OrderConfirmed {
                event_id: derive_event_id(&e.event_id, "order.confirmed"),
                occurred_at: e.occurred_at,
                order_id: e.order_id.clone(),
                reservation_id: e.reservation_id.clone(),
                hq_id: e.hq_id.clone(),
                store_id: e.store_id.clone(),
                status: OrderStatus::PaymentWait.as_str().to_string(),
                expires_at: e.expires_at,
            },
        )?;
        state.put_json(key, &OrderState { status: OrderStatus::PaymentWait, reservation_id: Some(e.reservation_id.clone()) });
        out.note("confirmed", OrderStatus::PaymentWait.as_str());
        Ok(())
    }

    fn failed(&self, ctx: &Context, e: &StockReservationFailed, state: &mut StateTxn, out: &mut Outputs) -> Result<(), ProcessError> {
        orderflow_api::require("StockReservationFailed", &e.event_id, "orderId", &e.order_id)?;
        let key = order_key(&e.order_id);
        let current = state.get_json::<OrderState>(&key)?;
        if let Some(s) = current.as_ref().filter(|s| s.status.is_terminal()) {
            out.note("late_event", format!("reservation_failed_when_{}", s.status.as_str()));
            return Ok(());
        }
        let reservation_id = current.and_then(|s| s.reservation_id);
        close(ctx, state, key, OrderState { status: OrderStatus::Failed, reservation_id });
        out.note("order_status", OrderStatus::Failed.as_str());
        Ok(())
    }

    fn cancelled(&self, ctx: &Context, e: &OrderCancelled, state: &mut StateTxn, out: &mut Outputs) -> Result<(), ProcessError> {
        orderflow_api::require("OrderCancelled", &e.event_id, "orderId", &e.order_id)?;
        let key = order_key(&e.order_id);
        let current = state.get_json::<OrderState>(&key)?;
        if let Some(s) = current.as_ref().filter(|s| s.status.is_terminal()) {
            out.note("late_event", format!("cancelled_when_{}", s.status.as_str()));
            return Ok(());
        }
        let reservation_id = current.and_then(|s| s.reservation_id).or_else(|| e.reservation_id.clone());
        close(ctx, state, key, OrderState { status: OrderStatus::Cancelled, reservation_id });
        out.note("order_status", OrderStatus::Cancelled.as_str());
        Ok(())
    }

    /// `order.settled` (issue 13): `SOLD` → `ORDER_COMPLETED` from `PAYMENT_WAIT`, and also over
    /// an earlier cancellation (a late sale: the payment re-reserved and was deducted, noted
    /// `late_sale`); `REFUND_REQUIRED` changes nothing here (the canceller's refund-required
    /// `order.cancelled` follows).
    fn settled(&self, ctx: &Context, e: &OrderSettled, state: &mut StateTxn, out: &mut Outputs) -> Result<(), ProcessError> {
        orderflow_api::require("OrderSettled", &e.event_id, "orderId", &e.order_id)?;
        if e.outcome != settlement::SOLD {
            return Ok(());
        }
        let key = order_key(&e.order_id);
        let current = state.get_json::<OrderState>(&key)?;
        match current.as_ref().map(|s| s.status) {
            Some(OrderStatus::PaymentWait) => {}
            Some(OrderStatus::Cancelled) | Some(OrderStatus::Failed) | None if e.late => out.note("late_sale", "completed"),
            Some(other) => {
                out.note("late_event", format!("completed_when_{}", other.as_str()));
                return Ok(());
            }
            None => {
                out.note("late_event", format!("completed_when_{}", OrderStatus::Created.as_str()));
                return Ok(());
            }
        }
        let reservation_id = current.and_then(|s| s.reservation_id).or_else(|| Some(e.reservation_id.clone()));
        close(ctx, state, key, OrderState { status: OrderStatus::Completed, reservation_id });
        out.note("order_status", OrderStatus::Completed.as_str());
        Ok(())
    }
}

/// Writes a terminal state of the order at `key`, forgotten after the worker's retention (issue
/// 13: bounded state; a later event for the order is still answered until then).
fn close(ctx: &Context, state: &mut StateTxn, key: Vec<u8>, order: OrderState) {
    orderflow_api::forget_later(ctx, state, &key);
    state.put_json(key, &order);
}

impl Processor for OrderConfirmer {
    /// Dispatches on the event variant:
    /// - `StockReserved`: no state → emit `order.confirmed` (`status = PAYMENT_WAIT`, key orderId,
    ///   id `derive(eventId, "order.confirmed")`), state `PAYMENT_WAIT`; any state → `late_event`.
    /// - `StockReservationFailed`: → `RESERVATION_FAILED` unless terminal (`late_event`).
    /// - `OrderCancelled`: → `ORDER_CANCELLED` unless terminal (`late_event`).
    /// - `OrderSettled` `SOLD` (the stock reserver's verdict on a payment, issue 13):
    ///   `PAYMENT_WAIT` → `ORDER_COMPLETED`; a late sale (`late`) also from `ORDER_CANCELLED`,
    ///   `RESERVATION_FAILED` or no state; else `late_event`. The POS's `order.completed` is
    ///   ignored.
    ///
    /// Other events are ignored. Errors: [`ProcessError::Invalid`] for an empty `orderId` (or an
    /// empty `reservationId` on `StockReserved`); [`ProcessError::CorruptState`] for unreadable
    /// state; [`ProcessError::UnwiredPort`] when `confirmed` is not wired.
    fn process(&mut self, ctx: &Context, event: &Event, state: &mut StateTxn, out: &mut Outputs) -> Result<(), ProcessError> {
        match event {
            Event::StockReserved(e) => self.reserved(e, state, out),
            Event::StockReservationFailed(e) => self.failed(ctx, e, state, out),
            Event::OrderCancelled(e) => self.cancelled(ctx, e, state, out),
            Event::OrderSettled(e) => self.settled(ctx, e, state, out),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests;
