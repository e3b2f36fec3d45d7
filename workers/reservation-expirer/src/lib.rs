//! Reservation expirer: enforces the reservation TTL (seed 004, domain rule 3).
//!
//! On `stock.reserved` it schedules a durable timer at `occurredAt + TTL` (5 minutes by default,
//! the value comes from the caller). If neither `order.settled` (the stock reserver's verdict on
//! a payment) nor `order.cancelled` arrives first, the timer emits `stock.reservation.expired`; the stock reserver then releases the stock
//! and the canceller cancels the order with `RESERVATION_EXPIRED`.
//!
//! State (JSON): [`reservation_key`] → [`TrackedReservation`] while open, [`closed_key`] → `true`
//! once the order is closed (completed, cancelled or expired); timer [`timer_key`] at `expiresAt`.
//! Timers live in the state store, so they survive restarts.
//!
//! # Layout
//!
//! - `lib.rs`: [`Config`] (the reservation TTL), ports, state and timer keys,
//!   [`TrackedReservation`] and [`ReservationExpirer`].
//! - `tests.rs`: unit tests through `orderflow_api::Harness`.

use orderflow_api::events::{OrderCancelled, OrderSettled, StockReservationExpired, StockReserved};
use orderflow_api::{derive_event_id, Context, Event, Outputs, ProcessError, Processor, StateTxn};
use serde::{Deserialize, Serialize};

/// Its settings in `topology.toml`: the reservation TTL alone (seed 004), which must agree with
/// the stock reserver's.
pub type Config = orderflow_api::ReservationTtlConfig;

/// Port of `stock.reservation.expired` (key orderId).
pub const PORT_EXPIRED: &str = "expired";

/// Output ports this worker emits on (wire every one in `topology.toml`).
pub const PORTS: &[&str] = &[PORT_EXPIRED];

/// Default reservation TTL, ms: 5 minutes (seed 004).
pub const DEFAULT_RESERVATION_TTL_MS: i64 = orderflow_api::DEFAULT_RESERVATION_TTL.as_millis() as i64;

/// Prefix of expiry timer keys (see [`timer_key`]).
pub const TIMER_PREFIX: &[u8] = b"exp/";

/// State key of an open reservation: `resv/{orderId}`.
pub fn reservation_key(order_id: &str) -> Vec<u8> {
    format!("resv/{order_id}").into_bytes()
}

/// State key marking an order closed: `closed/{orderId}`.
pub fn closed_key(order_id: &str) -> Vec<u8> {
    format!("closed/{order_id}").into_bytes()
}

/// Timer key of an order's expiry: `exp/{orderId}`.
pub fn timer_key(order_id: &str) -> Vec<u8> {
    format!("exp/{order_id}").into_bytes()
}

/// An open reservation the expirer watches, stored at [`reservation_key`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TrackedReservation {
    /// The reserver's reservation id (cause of the expiry event id).
    pub reservation_id: String,
    /// Store of the reservation.
    pub hq_id: String,
    /// Store of the reservation.
    pub store_id: String,
    /// `stock.reserved occurredAt + TTL`, ms since the epoch; the timer's deadline.
    pub expires_at: i64,
}

/// The reservation expirer worker. See the crate docs.
#[derive(Debug, Clone)]
pub struct ReservationExpirer {
    reservation_ttl_ms: i64,
}

impl ReservationExpirer {
    /// An expirer that expires reservations `reservation_ttl_ms` ms after the `stock.reserved`
    /// `occurredAt` ([`DEFAULT_RESERVATION_TTL_MS`] = 5 minutes in seed 004).
    ///
    /// # Panics
    /// If `reservation_ttl_ms ≤ 0` (a configuration error).
    pub fn new(reservation_ttl_ms: i64) -> Self {
        assert!(reservation_ttl_ms > 0, "reservation TTL must be positive, got {reservation_ttl_ms} ms");
        ReservationExpirer { reservation_ttl_ms }
    }

    /// The configured reservation TTL, ms.
    pub fn reservation_ttl_ms(&self) -> i64 {
        self.reservation_ttl_ms
    }

    fn reserved(&self, e: &StockReserved, state: &mut StateTxn, out: &mut Outputs) -> Result<(), ProcessError> {
        orderflow_api::require("StockReserved", &e.event_id, "orderId", &e.order_id)?;
        orderflow_api::require("StockReserved", &e.event_id, "reservationId", &e.reservation_id)?;
        if state.get(&closed_key(&e.order_id)).is_some() {
            out.note("late_event", "reserved_after_close");
            return Ok(());
        }
        let key = reservation_key(&e.order_id);
        if state.get(&key).is_some() {
            out.note("late_event", "duplicate_reservation");
            return Ok(());
        }
        let expires_at = e.occurred_at.saturating_add(self.reservation_ttl_ms);
        state.put_json(
            key,
            &TrackedReservation {
                reservation_id: e.reservation_id.clone(),
                hq_id: e.hq_id.clone(),
                store_id: e.store_id.clone(),
                expires_at,
            },
        );
        state.schedule_timer(timer_key(&e.order_id), expires_at);
        Ok(())
    }

    /// Closes the order: no expiry any more. The closed mark is forgotten after the worker's
    /// `state_retention` (issue 13: bounded state); a `StockReserved` for the order arriving
    /// later than that would be tracked again.
    fn close(&self, ctx: &Context, order_id: &str, state: &mut StateTxn) {
        state.cancel_timer(&timer_key(order_id));
        state.delete(reservation_key(order_id));
        state.put_json(closed_key(order_id), &true);
        orderflow_api::forget_later(ctx, state, &closed_key(order_id));
    }
}

impl Processor for ReservationExpirer {
    /// Dispatches on the event variant:
    /// - `StockReserved`: unless the order is closed (then `late_event`), tracks the reservation
    ///   and schedules timer `exp/{orderId}` at `occurredAt + TTL`.
    /// - `OrderSettled` (the stock reserver's verdict on a payment, issue 13) / `OrderCancelled`:
    ///   cancels the timer and marks the order closed, so a later `StockReserved` schedules
    ///   nothing. The POS's `order.completed` is not read: a payment the reserver rejected (dead
    ///   letter) must not stop the reservation from expiring.
    ///
    /// Other events are ignored. Errors: [`ProcessError::Invalid`] for an empty `orderId` (or an
    /// empty `reservationId` on `StockReserved`).
    fn process(&mut self, ctx: &Context, event: &Event, state: &mut StateTxn, out: &mut Outputs) -> Result<(), ProcessError> {
        match event {
            Event::StockReserved(e) => self.reserved(e, state, out),
            Event::OrderSettled(OrderSettled { event_id, order_id, .. })
            | Event::OrderCancelled(OrderCancelled { event_id, order_id, .. }) => {
                orderflow_api::require(event.schema_name(), event_id, "orderId", order_id)?;
                self.close(ctx, order_id, state);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Timer `exp/{orderId}` due: if the reservation is still open, emits
    /// `stock.reservation.expired` (key orderId, id `derive(reservationId,
    /// "stock.reservation.expired")`, `occurredAt = due_ms`, `expiresAt`), marks the order closed
    /// and notes `expiration/RESERVATION_EXPIRED`. Closed or unknown orders and foreign timer keys
    /// are ignored.
    ///
    /// Errors: [`ProcessError::CorruptState`] for unreadable state; [`ProcessError::UnwiredPort`]
    /// when `expired` is not wired.
    fn on_timer(&mut self, ctx: &Context, key: &[u8], due_ms: i64, state: &mut StateTxn, out: &mut Outputs) -> Result<(), ProcessError> {
        let Some(order_id) = key.strip_prefix(TIMER_PREFIX) else {
            return Ok(());
        };
        let order_id = String::from_utf8_lossy(order_id).into_owned();
        if state.get(&closed_key(&order_id)).is_some() {
            return Ok(());
        }
        let Some(r) = state.get_json::<TrackedReservation>(&reservation_key(&order_id))? else {
            return Ok(());
        };
        out.emit(
            PORT_EXPIRED,
            order_id.clone(),
            StockReservationExpired {
                event_id: derive_event_id(&r.reservation_id, "stock.reservation.expired"),
                occurred_at: due_ms,
                order_id: order_id.clone(),
                reservation_id: r.reservation_id.clone(),
                hq_id: r.hq_id.clone(),
                store_id: r.store_id.clone(),
                expires_at: r.expires_at,
            },
        )?;
        self.close(ctx, &order_id, state);
        out.note("expiration", "RESERVATION_EXPIRED");
        Ok(())
    }
}

#[cfg(test)]
mod tests;
