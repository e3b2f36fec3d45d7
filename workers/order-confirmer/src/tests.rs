//! Unit tests of the processor, run in memory through `orderflow_api::Harness`.

use super::*;
use orderflow_api::fixtures::*;
use orderflow_api::Harness;

fn harness() -> Harness<OrderConfirmer> {
    Harness::new(OrderConfirmer::new(), PORTS)
}

fn reserved(id: &str, order_id: &str) -> StockReserved {
    stock_reserved(id, order_id, &format!("R-{order_id}"), 1_000, 301_000, &[("P-001", 2)])
}

fn failed(id: &str, order_id: &str) -> StockReservationFailed {
    stock_reservation_failed(id, order_id, 1_000, &[("P-001", 10, 5)])
}

fn cancelled(id: &str, order_id: &str) -> OrderCancelled {
    order_cancelled(id, order_id, "INSUFFICIENT_STOCK", 2_000)
}

fn completed(id: &str, order_id: &str) -> OrderSettled {
    OrderSettled { reservation_id: format!("R-{order_id}"), ..order_settled(id, order_id, orderflow_api::events::settlement::SOLD, 3_000) }
}

fn status(h: &Harness<OrderConfirmer>, order_id: &str) -> Option<OrderStatus> {
    h.store.get_json::<OrderState>(&order_key(order_id)).map(|s| s.status)
}

fn late(h: &Harness<OrderConfirmer>) -> Vec<String> {
    h.notes.iter().filter(|n| n.measure == "late_event").map(|n| n.label.clone()).collect()
}

#[test]
fn stock_reserved_confirms_into_payment_wait() {
    let mut h = harness();
    let outs = h.feed("stock.reserved", reserved("e1", "O-1"), 5).unwrap();
    assert_eq!(outs.len(), 1);
    assert_eq!((outs[0].port.as_str(), outs[0].key.as_str()), ("confirmed", "O-1"));
    let Event::OrderConfirmed(c) = &outs[0].event else { panic!() };
    assert_eq!(c.event_id, derive_event_id("e1", "order.confirmed"));
    assert_eq!(c.status, "PAYMENT_WAIT");
    assert_eq!((c.reservation_id.as_str(), c.hq_id.as_str(), c.store_id.as_str()), ("R-O-1", "HQ-1", "S-1"));
    assert_eq!((c.occurred_at, c.expires_at), (1_000, 301_000));
    assert_eq!(status(&h, "O-1"), Some(OrderStatus::PaymentWait));
    let stored: OrderState = h.store.get_json(&order_key("O-1")).unwrap();
    assert_eq!(stored.reservation_id.as_deref(), Some("R-O-1"));
    assert!(h.notes.iter().any(|n| n.measure == "confirmed" && n.label == "PAYMENT_WAIT"));
}

#[test]
fn state_is_stored_with_seed_names() {
    let json = serde_json::to_string(&OrderState { status: OrderStatus::PaymentWait, reservation_id: None }).unwrap();
    assert_eq!(json, r#"{"status":"PAYMENT_WAIT"}"#);
    assert_eq!(order_key("O-1"), b"order/O-1".to_vec());
}

#[test]
fn payment_completes_the_order() {
    let mut h = harness();
    h.feed("t", reserved("e1", "O-1"), 0).unwrap();
    assert!(h.feed("t", completed("c1", "O-1"), 0).unwrap().is_empty());
    assert_eq!(status(&h, "O-1"), Some(OrderStatus::Completed));
    // Cancellation after completion is late: never applied.
    h.feed("t", cancelled("k1", "O-1"), 0).unwrap();
    assert_eq!(status(&h, "O-1"), Some(OrderStatus::Completed));
    assert_eq!(late(&h), vec!["cancelled_when_ORDER_COMPLETED"]);
}

#[test]
fn a_cancelled_order_is_never_confirmed() {
    let mut h = harness();
    h.feed("t", cancelled("k1", "O-1"), 0).unwrap();
    assert_eq!(status(&h, "O-1"), Some(OrderStatus::Cancelled));
    assert!(h.feed("t", reserved("e1", "O-1"), 0).unwrap().is_empty());
    assert_eq!(status(&h, "O-1"), Some(OrderStatus::Cancelled));
    assert!(h.feed("t", completed("c1", "O-1"), 0).unwrap().is_empty());
    assert_eq!(status(&h, "O-1"), Some(OrderStatus::Cancelled));
    assert_eq!(late(&h), vec!["stock_reserved_when_ORDER_CANCELLED", "completed_when_ORDER_CANCELLED"]);
}

/// The canceller's `SAGA_TIMEOUT` cancellation (seed 001), with the reservation it ends if
/// the stock was reserved.
fn saga_timeout(order_id: &str, reservation_id: Option<&str>) -> OrderCancelled {
    OrderCancelled {
        reservation_id: reservation_id.map(Into::into),
        customer_message: "주문 처리 시간이 초과되어 주문이 취소되었습니다.".into(),
        refund_required: false,
        customer_id: None,
        ..order_cancelled(&derive_event_id(order_id, "order.cancelled"), order_id, "SAGA_TIMEOUT", 181_000)
    }
}

#[test]
fn a_saga_timeout_is_never_followed_by_a_confirmation() {
    // No stock answer within 3 minutes: cancelled; the reservation made late is not confirmed.
    let mut h = harness();
    assert!(h.feed("order.cancelled", saga_timeout("O-1", None), 0).unwrap().is_empty());
    assert_eq!(status(&h, "O-1"), Some(OrderStatus::Cancelled));
    assert!(h.feed("stock.reserved", reserved("e1", "O-1"), 0).unwrap().is_empty(), "never confirmed");
    assert_eq!(status(&h, "O-1"), Some(OrderStatus::Cancelled));
    assert!(h.feed("order.settled", completed("c1", "O-1"), 0).unwrap().is_empty());
    assert_eq!(status(&h, "O-1"), Some(OrderStatus::Cancelled));
    assert_eq!(late(&h), vec!["stock_reserved_when_ORDER_CANCELLED", "completed_when_ORDER_CANCELLED"]);
    assert!(!h.notes.iter().any(|n| n.measure == "confirmed"));
}

#[test]
fn the_saga_bound_cancels_an_order_waiting_for_payment() {
    let mut h = harness();
    assert_eq!(h.feed("stock.reserved", reserved("e1", "O-1"), 0).unwrap().len(), 1);
    assert!(h.feed("order.cancelled", saga_timeout("O-1", Some("R-O-1")), 0).unwrap().is_empty());
    let s: OrderState = h.store.get_json(&order_key("O-1")).unwrap();
    assert_eq!((s.status, s.reservation_id.as_deref()), (OrderStatus::Cancelled, Some("R-O-1")));
    // POS completing after the bound is late, never applied.
    h.feed("order.settled", completed("c1", "O-1"), 0).unwrap();
    assert_eq!(status(&h, "O-1"), Some(OrderStatus::Cancelled));
    assert_eq!(late(&h), vec!["completed_when_ORDER_CANCELLED"]);
}

#[test]
fn payment_wait_can_be_cancelled() {
    let mut h = harness();
    h.feed("t", reserved("e1", "O-1"), 0).unwrap();
    h.feed("t", cancelled("k1", "O-1"), 0).unwrap();
    assert_eq!(status(&h, "O-1"), Some(OrderStatus::Cancelled));
    assert!(late(&h).is_empty());
}

#[test]
fn failed_reservation_awaits_cancellation() {
    let mut h = harness();
    assert!(h.feed("t", failed("f1", "O-1"), 0).unwrap().is_empty());
    assert_eq!(status(&h, "O-1"), Some(OrderStatus::Failed));
    assert!(h.feed("t", reserved("e1", "O-1"), 0).unwrap().is_empty(), "a failed order is not confirmed");
    h.feed("t", cancelled("k1", "O-1"), 0).unwrap();
    assert_eq!(status(&h, "O-1"), Some(OrderStatus::Cancelled));
    // Failure after a terminal state is late.
    h.feed("t", failed("f2", "O-1"), 0).unwrap();
    assert_eq!(status(&h, "O-1"), Some(OrderStatus::Cancelled));
    assert_eq!(late(&h), vec!["stock_reserved_when_RESERVATION_FAILED", "reservation_failed_when_ORDER_CANCELLED"]);
}

#[test]
fn completion_without_payment_wait_is_late() {
    let mut h = harness();
    h.feed("t", completed("c1", "O-1"), 0).unwrap();
    assert_eq!(status(&h, "O-1"), None);
    assert_eq!(late(&h), vec!["completed_when_ORDER_CREATED"]);
}

#[test]
fn confirmed_once_per_order() {
    let mut h = harness();
    assert_eq!(h.feed("t", reserved("e1", "O-1"), 0).unwrap().len(), 1);
    // Same eventId: dropped by the runtime rule, no note.
    assert!(h.feed("t", reserved("e1", "O-1"), 0).unwrap().is_empty());
    assert!(late(&h).is_empty());
    // A different reservation event for the same order: late, not confirmed again.
    assert!(h.feed("t", reserved("e2", "O-1"), 0).unwrap().is_empty());
    assert_eq!(late(&h), vec!["stock_reserved_when_PAYMENT_WAIT"]);
}

#[test]
fn outputs_are_deterministic_in_the_input() {
    let run = |now| {
        let mut h = harness();
        let mut outs = h.feed("t", reserved("e1", "O-1"), now).unwrap();
        outs.extend(h.feed("t", reserved("e2", "O-2"), now + 1).unwrap());
        outs
    };
    let a = run(10);
    assert_eq!(a.len(), 2);
    assert_eq!(a, run(99_999));
}

#[test]
fn empty_order_id_is_invalid_and_other_events_ignored() {
    let mut h = harness();
    assert!(matches!(h.feed("t", reserved("e1", ""), 0), Err(ProcessError::Invalid(_))));
    assert!(matches!(h.feed("t", cancelled("k1", ""), 0), Err(ProcessError::Invalid(_))));
    let ev = order_created("x", "O-1", 0, &[]);
    assert!(h.feed("stock.reserved", ev, 0).unwrap().is_empty());
    assert_eq!(status(&h, "O-1"), None);
}

/// Issue 13: the order's paid outcome is the stock reserver's verdict. A late sale (the
/// reservation had expired and the order was cancelled, then the payment was deducted after
/// all) completes the order; a refund verdict and the POS's own payment change nothing.
#[test]
fn a_late_sale_completes_a_cancelled_order_and_other_verdicts_do_not() {
    let mut h = harness();
    h.feed("t", reserved("e1", "O-1"), 0).unwrap();
    h.feed("t", cancelled("k1", "O-1"), 0).unwrap();
    assert_eq!(status(&h, "O-1"), Some(OrderStatus::Cancelled));
    h.feed("t", OrderSettled { late: true, ..completed("c1", "O-1") }, 0).unwrap();
    assert_eq!(status(&h, "O-1"), Some(OrderStatus::Completed));
    assert_eq!(h.notes.iter().filter(|n| n.measure == "late_sale").count(), 1);

    let mut h = harness();
    h.feed("t", reserved("e2", "O-2"), 0).unwrap();
    h.feed("t", order_settled("s2", "O-2", orderflow_api::events::settlement::REFUND_REQUIRED, 0), 0).unwrap();
    h.feed("t", order_completed("p2", "O-2", "R-O-2", 0), 0).unwrap();
    assert_eq!(status(&h, "O-2"), Some(OrderStatus::PaymentWait));
}
