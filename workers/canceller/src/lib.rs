//! Canceller: the compensation step of the saga (seed 000).
//!
//! A failed reservation (`INSUFFICIENT_STOCK`, seed 000) or an expired one (`RESERVATION_EXPIRED`,
//! seed 004) cancels the order with an `order.cancelled` carrying the customer push text
//! ([`customer_message`]). Each order is cancelled at most once: the output id is
//! `derive_event_id(orderId, "order.cancelled")` whatever the cause, so even two causes racing
//! produce one cancellation downstream (domain rule 7), and the canceller remembers cancelled
//! orders at [`cancel_key`].

use orderflow_api::events::{cancel_reason, release_reason, OrderCancelled, StockReservationFailed, StockReservationReleased};
use orderflow_api::{derive_event_id, Context, Event, Outputs, ProcessError, Processor, StateTxn};
use serde::{Deserialize, Serialize};

/// Port of `order.cancelled` (key orderId).
pub const PORT_CANCELLED: &str = "cancelled";

/// Output ports this worker emits on (wire every one in `topology.toml`).
pub const PORTS: &[&str] = &[PORT_CANCELLED];

/// State key marking an order cancelled: `cancel/{orderId}`.
pub fn cancel_key(order_id: &str) -> Vec<u8> {
    format!("cancel/{order_id}").into_bytes()
}

/// The `eventId` of an order's (single) cancellation: `derive_event_id(orderId, "order.cancelled")`.
pub fn cancellation_event_id(order_id: &str) -> String {
    derive_event_id(order_id, "order.cancelled")
}

/// The customer push text for a cancellation `reason` (a [`cancel_reason`] code).
///
/// `INSUFFICIENT_STOCK` is the seed 000 push text; unknown reasons get a generic text.
pub fn customer_message(reason: &str) -> &'static str {
    match reason {
        cancel_reason::INSUFFICIENT_STOCK => "재고 부족으로 주문이 취소되었습니다. 다른 상품을 확인해보세요.",
        cancel_reason::RESERVATION_EXPIRED => "결제 시간이 초과되어 주문이 취소되었습니다.",
        cancel_reason::PAYMENT_FAILED => "결제에 실패하여 주문이 취소되었습니다.",
        cancel_reason::SAGA_TIMEOUT => "주문 처리 시간이 초과되어 주문이 취소되었습니다.",
        _ => "주문이 취소되었습니다.",
    }
}

/// What the canceller stores per cancelled order at [`cancel_key`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CancelRecord {
    /// The cancellation reason as known to the canceller (its own, or the one it observed).
    pub reason: String,
    /// Whether this canceller emitted the `order.cancelled` (false: observed someone else's).
    pub emitted: bool,
}

/// The canceller worker. See the crate docs.
#[derive(Debug, Default, Clone)]
pub struct Canceller;

impl Canceller {
    /// A canceller; it takes no configuration.
    pub fn new() -> Self {
        Canceller
    }

    #[allow(clippy::too_many_arguments)]
    fn compensate(
        &self,
        order_id: &str,
        hq_id: &str,
        store_id: &str,
        reason: &str,
        reservation_id: Option<String>,
        occurred_at: i64,
        state: &mut StateTxn,
        out: &mut Outputs,
    ) -> Result<(), ProcessError> {
        let key = cancel_key(order_id);
        if state.get(&key).is_some() {
            out.note("late_event", "already_cancelled");
            return Ok(());
        }
        out.emit(
            PORT_CANCELLED,
            order_id.to_string(),
            OrderCancelled {
                event_id: cancellation_event_id(order_id),
                occurred_at,
                order_id: order_id.to_string(),
                hq_id: hq_id.to_string(),
                store_id: store_id.to_string(),
                reason: reason.to_string(),
                reservation_id,
                customer_message: customer_message(reason).to_string(),
            },
        )?;
        state.put_json(key, &CancelRecord { reason: reason.to_string(), emitted: true });
        out.note("compensation", reason.to_string());
        Ok(())
    }

    fn failed(&self, e: &StockReservationFailed, state: &mut StateTxn, out: &mut Outputs) -> Result<(), ProcessError> {
        orderflow_api::require("StockReservationFailed", &e.event_id, "orderId", &e.order_id)?;
        // Every failure reason the reserver emits is a stock shortage (seed 000).
        self.compensate(&e.order_id, &e.hq_id, &e.store_id, cancel_reason::INSUFFICIENT_STOCK, None, e.occurred_at, state, out)
    }

    fn released(&self, e: &StockReservationReleased, state: &mut StateTxn, out: &mut Outputs) -> Result<(), ProcessError> {
        orderflow_api::require("StockReservationReleased", &e.event_id, "orderId", &e.order_id)?;
        match e.reason.as_str() {
            release_reason::EXPIRED => self.compensate(
                &e.order_id,
                &e.hq_id,
                &e.store_id,
                cancel_reason::RESERVATION_EXPIRED,
                Some(e.reservation_id.clone()),
                e.occurred_at,
                state,
                out,
            ),
            // Released because the order was already cancelled: remember it, nothing to emit.
            release_reason::CANCELLED => {
                mark_observed(&e.order_id, &e.reason, state)?;
                Ok(())
            }
            other => Err(ProcessError::Invalid(format!("StockReservationReleased {}: unknown reason {other:?}", e.event_id))),
        }
    }

    fn cancelled(&self, e: &OrderCancelled, state: &mut StateTxn, out: &mut Outputs) -> Result<(), ProcessError> {
        orderflow_api::require("OrderCancelled", &e.event_id, "orderId", &e.order_id)?;
        let own_echo = e.event_id == cancellation_event_id(&e.order_id);
        if !mark_observed(&e.order_id, &e.reason, state)? && !own_echo {
            out.note("late_event", "cancelled_twice");
        }
        Ok(())
    }
}

/// Marks `order_id` cancelled by someone else; returns false if it already was.
fn mark_observed(order_id: &str, reason: &str, state: &mut StateTxn) -> Result<bool, ProcessError> {
    let key = cancel_key(order_id);
    if state.get_json::<CancelRecord>(&key)?.is_some() {
        return Ok(false);
    }
    state.put_json(key, &CancelRecord { reason: reason.to_string(), emitted: false });
    Ok(true)
}

impl Processor for Canceller {
    /// Dispatches on the event variant:
    /// - `StockReservationFailed` → `order.cancelled` reason `INSUFFICIENT_STOCK`, no reservationId.
    /// - `StockReservationReleased` reason `EXPIRED` → `order.cancelled` reason
    ///   `RESERVATION_EXPIRED` with the reservationId; reason `CANCELLED` → marks the order
    ///   cancelled, no output.
    /// - `OrderCancelled` (anyone's, including this worker's own output) → marks the order
    ///   cancelled, no output.
    ///
    /// Outputs: key orderId, id [`cancellation_event_id`], `occurredAt` of the cause. A cause for
    /// an already-cancelled order is a `late_event` (`already_cancelled`); a second foreign
    /// cancellation is `cancelled_twice`; the canceller's own echo and the reserver's
    /// `CANCELLED` release are expected and silent. Other events are ignored.
    ///
    /// Errors: [`ProcessError::Invalid`] for an empty `orderId` or an unknown release reason;
    /// [`ProcessError::UnwiredPort`] when `cancelled` is not wired.
    fn process(&mut self, _ctx: &Context, event: &Event, state: &mut StateTxn, out: &mut Outputs) -> Result<(), ProcessError> {
        match event {
            Event::StockReservationFailed(e) => self.failed(e, state, out),
            Event::StockReservationReleased(e) => self.released(e, state, out),
            Event::OrderCancelled(e) => self.cancelled(e, state, out),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use orderflow_api::fixtures::*;
    use orderflow_api::Harness;

    fn harness() -> Harness<Canceller> {
        Harness::new(Canceller::new(), PORTS)
    }

    fn failed(id: &str, order_id: &str) -> StockReservationFailed {
        stock_reservation_failed(id, order_id, 1_000, &[("P-001", 10, 5)])
    }

    fn released(id: &str, order_id: &str, reason: &str) -> StockReservationReleased {
        stock_reservation_released(id, order_id, "R-1", reason, 301_000, &[("P-001", 2)])
    }

    fn pos_cancel(id: &str, order_id: &str) -> OrderCancelled {
        OrderCancelled {
            reservation_id: Some("R-1".into()),
            customer_message: customer_message("PAYMENT_FAILED").into(),
            ..order_cancelled(id, order_id, "PAYMENT_FAILED", 2_000)
        }
    }

    fn late(h: &Harness<Canceller>) -> Vec<String> {
        h.notes.iter().filter(|n| n.measure == "late_event").map(|n| n.label.clone()).collect()
    }

    #[test]
    fn customer_messages() {
        assert_eq!(customer_message("INSUFFICIENT_STOCK"), "재고 부족으로 주문이 취소되었습니다. 다른 상품을 확인해보세요.");
        assert_eq!(customer_message("RESERVATION_EXPIRED"), "결제 시간이 초과되어 주문이 취소되었습니다.");
        assert_eq!(customer_message("PAYMENT_FAILED"), "결제에 실패하여 주문이 취소되었습니다.");
        assert_eq!(customer_message("SAGA_TIMEOUT"), "주문 처리 시간이 초과되어 주문이 취소되었습니다.");
        assert_eq!(customer_message("???"), "주문이 취소되었습니다.");
    }

    #[test]
    fn insufficient_stock_cancels_with_seed_000_message() {
        let mut h = harness();
        let outs = h.feed("stock.reservation.failed", failed("f1", "O-1"), 7).unwrap();
        assert_eq!(outs.len(), 1);
        assert_eq!((outs[0].port.as_str(), outs[0].key.as_str()), ("cancelled", "O-1"));
        let Event::OrderCancelled(c) = &outs[0].event else { panic!() };
        assert_eq!(c.event_id, derive_event_id("O-1", "order.cancelled"));
        assert_eq!(c.reason, "INSUFFICIENT_STOCK");
        assert_eq!(c.customer_message, "재고 부족으로 주문이 취소되었습니다. 다른 상품을 확인해보세요.");
        assert_eq!(c.reservation_id, None);
        assert_eq!((c.hq_id.as_str(), c.store_id.as_str(), c.occurred_at), ("HQ-1", "S-1", 1_000));
        assert!(h.notes.iter().any(|n| n.measure == "compensation" && n.label == "INSUFFICIENT_STOCK"));
        let rec: CancelRecord = h.store.get_json(&cancel_key("O-1")).unwrap();
        assert!(rec.emitted);
    }

    #[test]
    fn expiry_release_cancels_with_reservation_expired() {
        let mut h = harness();
        let outs = h.feed("t", released("r1", "O-1", "EXPIRED"), 0).unwrap();
        let Event::OrderCancelled(c) = &outs[0].event else { panic!() };
        assert_eq!(c.reason, "RESERVATION_EXPIRED");
        assert_eq!(c.reservation_id.as_deref(), Some("R-1"));
        assert_eq!(c.customer_message, "결제 시간이 초과되어 주문이 취소되었습니다.");
        assert_eq!(c.event_id, cancellation_event_id("O-1"));
        assert_eq!(c.occurred_at, 301_000);
    }

    #[test]
    fn one_cancellation_per_order() {
        let mut h = harness();
        let first = h.feed("t", failed("f1", "O-1"), 0).unwrap();
        assert_eq!(first.len(), 1);
        // Duplicate eventId: no effect at all.
        assert!(h.feed("t", failed("f1", "O-1"), 0).unwrap().is_empty());
        assert!(late(&h).is_empty());
        // Another cause for the same order: late, no second cancellation.
        assert!(h.feed("t", failed("f2", "O-1"), 0).unwrap().is_empty());
        assert!(h.feed("t", released("r1", "O-1", "EXPIRED"), 0).unwrap().is_empty());
        assert_eq!(late(&h), vec!["already_cancelled", "already_cancelled"]);
        // Its own output wired back is silent.
        let Event::OrderCancelled(own) = first[0].event.clone() else { panic!() };
        assert!(h.feed("order.cancelled", own, 0).unwrap().is_empty());
        assert_eq!(late(&h).len(), 2);
    }

    #[test]
    fn cancellation_by_someone_else_suppresses_compensation() {
        let mut h = harness();
        assert!(h.feed("t", pos_cancel("p1", "O-1"), 0).unwrap().is_empty());
        let rec: CancelRecord = h.store.get_json(&cancel_key("O-1")).unwrap();
        assert_eq!(rec, CancelRecord { reason: "PAYMENT_FAILED".into(), emitted: false });
        assert!(h.feed("t", released("r1", "O-1", "EXPIRED"), 0).unwrap().is_empty());
        assert_eq!(late(&h), vec!["already_cancelled"]);
        // A second foreign cancellation is late.
        h.feed("t", pos_cancel("p2", "O-1"), 0).unwrap();
        assert_eq!(late(&h), vec!["already_cancelled", "cancelled_twice"]);
    }

    #[test]
    fn release_for_cancelled_marks_without_output() {
        let mut h = harness();
        assert!(h.feed("t", released("r1", "O-1", "CANCELLED"), 0).unwrap().is_empty());
        assert!(h.store.get_json::<CancelRecord>(&cancel_key("O-1")).is_some());
        assert!(h.feed("t", failed("f1", "O-1"), 0).unwrap().is_empty());
        assert!(matches!(h.feed("t", released("r2", "O-2", "WHATEVER"), 0), Err(ProcessError::Invalid(_))));
    }

    #[test]
    fn outputs_are_deterministic_in_the_input() {
        let run = |now| {
            let mut h = harness();
            let mut outs = h.feed("t", failed("f1", "O-1"), now).unwrap();
            outs.extend(h.feed("t", released("r1", "O-2", "EXPIRED"), now + 5).unwrap());
            outs
        };
        let a = run(1);
        assert_eq!(a.len(), 2);
        assert_eq!(a, run(123_456));
    }

    #[test]
    fn empty_order_id_is_invalid_and_other_events_ignored() {
        let mut h = harness();
        assert!(matches!(h.feed("t", failed("f1", ""), 0), Err(ProcessError::Invalid(_))));
        let ev = stock_reservation_expired("x", "O-1", "R", 0);
        assert!(h.feed("stock.reservation.failed", ev, 0).unwrap().is_empty());
        assert!(h.store.get_json::<CancelRecord>(&cancel_key("O-1")).is_none());
    }
}
