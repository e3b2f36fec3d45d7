//! Unit tests of the processor, run in memory through `orderflow_api::Harness`.

use super::*;
use orderflow_api::fixtures::*;
use orderflow_api::{Harness, Output};

fn harness() -> Harness<Canceller> {
    Harness::new(Canceller::default(), PORTS)
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
    assert_eq!(customer_message("INVALID_ORDER"), "주문 정보가 올바르지 않아 주문이 취소되었습니다.");
    assert_eq!(customer_message("???"), "주문이 취소되었습니다.");
}

#[test]
fn insufficient_stock_cancels_with_seed_000_message() {
    let mut h = harness();
    h.feed("order.created", created("c1", "O-1"), 5).unwrap();
    let outs = h.feed("stock.reservation.failed", failed("f1", "O-1"), 7).unwrap();
    assert_eq!(outs.len(), 1);
    assert_eq!((outs[0].port.as_str(), outs[0].key.as_str()), ("cancelled", "O-1"));
    let Event::OrderCancelled(c) = &outs[0].event else { panic!() };
    assert_eq!(c.event_id, derive_event_id("O-1", "order.cancelled"));
    assert_eq!(c.reason, "INSUFFICIENT_STOCK");
    assert_eq!(c.customer_message, "재고 부족으로 주문이 취소되었습니다. 다른 상품을 확인해보세요.");
    assert_eq!(c.reservation_id, None);
    assert_eq!((c.hq_id.as_str(), c.store_id.as_str(), c.occurred_at), ("HQ-1", "S-1", 1_000));
    assert_eq!(c.customer_id.as_deref(), Some(CUSTOMER));
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
    h.feed("t", created("c1", "O-1"), 0).unwrap();
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
        let mut outs = h.feed("t", created("c1", "O-1"), now).unwrap();
        outs.extend(h.feed("t", failed("f1", "O-1"), now).unwrap());
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

// ---------------------------------------------------------------- saga timeouts (seed 001)

/// Processing time at which the canceller reads `order.created` in these tests, far from the
/// events' `occurredAt` (1_000): the clocks run on processing time.
const T0: i64 = 1_000_000;
const ANSWER: i64 = DEFAULT_STOCK_ANSWER_TIMEOUT_MS;
const BOUND: i64 = DEFAULT_SAGA_TIMEOUT_MS;

fn created(id: &str, order_id: &str) -> OrderCreated {
    order_created(id, order_id, 1_000, &[("P-001", 2)])
}

fn reserved(id: &str, order_id: &str) -> StockReserved {
    stock_reserved(id, order_id, "R-1", 1_000, 301_000, &[("P-001", 2)])
}

/// The stock reserver's `SOLD` verdict on a payment of `order_id`.
fn completed(id: &str, order_id: &str) -> OrderSettled {
    order_settled(id, order_id, settlement::SOLD, 5_000)
}

fn refund(id: &str, order_id: &str) -> OrderSettled {
    order_settled(id, order_id, settlement::REFUND_REQUIRED, 6_000)
}

fn notes(h: &Harness<Canceller>, measure: &str) -> Vec<String> {
    h.notes.iter().filter(|n| n.measure == measure).map(|n| n.label.clone()).collect()
}

fn saga(h: &Harness<Canceller>, order_id: &str) -> Option<Saga> {
    h.store.get_json(&saga_key(order_id))
}

/// The saga's timers (not the `forget_later` ones of closed records).
fn timers(h: &Harness<Canceller>) -> Vec<(String, i64)> {
    h.store
        .timers
        .iter()
        .filter(|(k, _)| orderflow_api::forgotten(k).is_none())
        .map(|(k, at)| (String::from_utf8_lossy(k).into_owned(), *at))
        .collect()
}

fn only_cancellation(outs: &[Output]) -> OrderCancelled {
    assert_eq!(outs.len(), 1, "{outs:?}");
    assert_eq!((outs[0].port.as_str(), outs[0].key.as_str()), (PORT_CANCELLED, "O-1"));
    let Event::OrderCancelled(c) = &outs[0].event else { panic!("{outs:?}") };
    c.clone()
}

fn closed_cancelled() -> Option<Saga> {
    Some(Saga::Closed { outcome: Outcome::Cancelled, customer_id: Some(CUSTOMER.into()) })
}

#[test]
fn defaults_are_the_seed_001_clocks_and_configuration_is_checked() {
    let c = Canceller::default();
    assert_eq!((c.stock_answer_timeout_ms(), c.saga_timeout_ms()), (180_000, 600_000));
    let c = Canceller::new(3_000, 8_000);
    assert_eq!((c.stock_answer_timeout_ms(), c.saga_timeout_ms()), (3_000, 8_000));
    assert!(std::panic::catch_unwind(|| Canceller::new(0, 1)).is_err());
    assert!(std::panic::catch_unwind(|| Canceller::new(1, -1)).is_err());
    assert_eq!(saga_key("O-1"), b"saga/O-1".to_vec());
    assert_eq!(answer_timer_key("O-1"), b"timeout/answer/O-1".to_vec());
    assert_eq!(saga_timer_key("O-1"), b"timeout/saga/O-1".to_vec());
}

#[test]
fn order_created_starts_both_clocks_on_processing_time() {
    let mut h = harness();
    assert!(h.feed("order.created", created("c1", "O-1"), T0).unwrap().is_empty());
    // occurredAt is 1_000; the deadlines count from T0, when the canceller read the order.
    assert_eq!(timers(&h), vec![("timeout/answer/O-1".into(), T0 + ANSWER), ("timeout/saga/O-1".into(), T0 + BOUND)]);
    let Some(Saga::Open(open)) = saga(&h, "O-1") else { panic!("{:?}", saga(&h, "O-1")) };
    assert_eq!(
        open,
        OpenSaga {
            hq_id: HQ.into(),
            store_id: STORE.into(),
            created_seen_at: Some(T0),
            answered: false,
            reservation_id: None,
            customer_id: Some(CUSTOMER.into()),
            pending_failure: None,
        }
    );
    let json = String::from_utf8(h.store.data[&saga_key("O-1")].clone()).unwrap();
    assert_eq!(
        json,
        format!(r#"{{"state":"OPEN","hqId":"HQ-1","storeId":"S-1","createdSeenAt":{T0},"answered":false,"customerId":"C-1"}}"#)
    );
}

#[test]
fn no_stock_answer_cancels_with_saga_timeout_exactly_at_the_answer_timeout() {
    let mut h = harness();
    h.feed("order.created", created("c1", "O-1"), T0).unwrap();
    assert!(h.advance(T0 + ANSWER - 1).unwrap().is_empty(), "not a millisecond early");
    assert!(notes(&h, "saga_timeout").is_empty());
    let c = only_cancellation(&h.advance(T0 + ANSWER).unwrap());
    assert_eq!(c.event_id, cancellation_event_id("O-1"));
    assert_eq!((c.reason.as_str(), c.reservation_id.as_deref()), ("SAGA_TIMEOUT", None));
    assert_eq!(c.customer_message, "주문 처리 시간이 초과되어 주문이 취소되었습니다.");
    assert_eq!((c.hq_id.as_str(), c.store_id.as_str(), c.occurred_at), (HQ, STORE, T0 + ANSWER), "occurredAt = the deadline");
    assert_eq!(notes(&h, "saga_timeout"), vec!["stock_answer"]);
    assert_eq!(notes(&h, "compensation"), vec!["SAGA_TIMEOUT"]);
    // Closed: no timer left, the record shrunk to a tombstone, the bound never fires.
    assert!(timers(&h).is_empty(), "{:?}", timers(&h));
    assert_eq!(saga(&h, "O-1"), closed_cancelled());
    assert_eq!(
        String::from_utf8(h.store.data[&saga_key("O-1")].clone()).unwrap(),
        r#"{"state":"CLOSED","outcome":"ORDER_CANCELLED","customerId":"C-1"}"#
    );
    assert!(h.advance(T0 + BOUND).unwrap().is_empty());
    assert_eq!(
        h.store.get_json::<CancelRecord>(&cancel_key("O-1")).unwrap(),
        CancelRecord { reason: "SAGA_TIMEOUT".into(), emitted: true }
    );
}

#[test]
fn configured_clocks_are_used() {
    let mut h = Harness::new(Canceller::new(3_000, 8_000), PORTS);
    h.feed("order.created", created("c1", "O-1"), T0).unwrap();
    assert!(h.advance(T0 + 2_999).unwrap().is_empty());
    assert_eq!(only_cancellation(&h.advance(T0 + 3_000).unwrap()).reason, "SAGA_TIMEOUT");
    let mut h = Harness::new(Canceller::new(3_000, 8_000), PORTS);
    h.feed("order.created", created("c1", "O-1"), T0).unwrap();
    h.feed("stock.reserved", reserved("r1", "O-1"), T0 + 1).unwrap();
    assert!(h.advance(T0 + 7_999).unwrap().is_empty());
    assert_eq!(only_cancellation(&h.advance(T0 + 8_000).unwrap()).occurred_at, T0 + 8_000);
    assert_eq!(notes(&h, "saga_timeout"), vec!["saga_bound"]);
}

#[test]
fn an_answer_in_time_cancels_the_answer_timer() {
    let mut h = harness();
    h.feed("order.created", created("c1", "O-1"), T0).unwrap();
    assert!(h.feed("stock.reserved", reserved("r1", "O-1"), T0 + ANSWER - 1).unwrap().is_empty());
    assert_eq!(timers(&h), vec![("timeout/saga/O-1".into(), T0 + BOUND)], "only the bound is left");
    let Some(Saga::Open(open)) = saga(&h, "O-1") else { panic!() };
    assert!(open.answered);
    assert_eq!(open.reservation_id.as_deref(), Some("R-1"));
    assert!(h.advance(T0 + ANSWER).unwrap().is_empty());
    assert!(h.advance(T0 + BOUND - 1).unwrap().is_empty());
    assert!(notes(&h, "saga_timeout").is_empty());
    assert!(notes(&h, "late_event").is_empty());
}

#[test]
fn a_stock_failure_in_time_cancels_for_stock_and_stops_both_clocks() {
    let mut h = harness();
    h.feed("order.created", created("c1", "O-1"), T0).unwrap();
    let c = only_cancellation(&h.feed("stock.reservation.failed", failed("f1", "O-1"), T0 + 10).unwrap());
    assert_eq!(c.reason, "INSUFFICIENT_STOCK");
    assert!(timers(&h).is_empty());
    assert_eq!(saga(&h, "O-1"), closed_cancelled());
    assert!(h.advance(T0 + 2 * BOUND).unwrap().is_empty());
    assert!(notes(&h, "saga_timeout").is_empty());
}

#[test]
fn the_bound_cancels_a_reserved_order_never_completed_or_expired() {
    let mut h = harness();
    h.feed("order.created", created("c1", "O-1"), T0).unwrap();
    h.feed("stock.reserved", reserved("r1", "O-1"), T0 + 5).unwrap();
    assert!(h.advance(T0 + BOUND - 1).unwrap().is_empty());
    let c = only_cancellation(&h.advance(T0 + BOUND).unwrap());
    assert_eq!((c.reason.as_str(), c.reservation_id.as_deref(), c.occurred_at), ("SAGA_TIMEOUT", Some("R-1"), T0 + BOUND));
    assert_eq!(notes(&h, "saga_timeout"), vec!["saga_bound"]);
    assert!(timers(&h).is_empty());
    assert_eq!(saga(&h, "O-1"), closed_cancelled());
    // The stock reserver releases on it and says so: the expected echo, silent.
    assert!(h.feed("order.cancelled", c, T0 + BOUND + 1).unwrap().is_empty());
    assert!(h.feed("stock.reservation.released", released("x1", "O-1", "CANCELLED"), T0 + BOUND + 2).unwrap().is_empty());
    assert!(notes(&h, "late_event").is_empty());
}

#[test]
fn the_bound_also_cancels_an_order_that_never_got_an_answer_when_it_is_shorter() {
    // Answer timeout longer than the bound: the bound fires first, the answer timer is dropped.
    let mut h = Harness::new(Canceller::new(9_000, 8_000), PORTS);
    h.feed("order.created", created("c1", "O-1"), T0).unwrap();
    only_cancellation(&h.advance(T0 + 8_000).unwrap());
    assert_eq!(notes(&h, "saga_timeout"), vec!["saga_bound"]);
    assert!(timers(&h).is_empty());
    assert!(h.advance(T0 + 9_000).unwrap().is_empty());
}

#[test]
fn both_deadlines_passed_at_once_cancel_once() {
    // The runtime was stopped past both deadlines: they fire in one pass, earliest first.
    let mut h = harness();
    h.feed("order.created", created("c1", "O-1"), T0).unwrap();
    let c = only_cancellation(&h.advance(T0 + 5 * BOUND).unwrap());
    assert_eq!((c.reason.as_str(), c.occurred_at), ("SAGA_TIMEOUT", T0 + ANSWER));
    assert_eq!(notes(&h, "saga_timeout"), vec!["stock_answer"]);
    assert!(timers(&h).is_empty());
}

#[test]
fn completion_closes_the_saga_and_no_timer_fires() {
    let mut h = harness();
    h.feed("order.created", created("c1", "O-1"), T0).unwrap();
    h.feed("stock.reserved", reserved("r1", "O-1"), T0 + 1).unwrap();
    assert!(h.feed("order.settled", completed("d1", "O-1"), T0 + 2).unwrap().is_empty());
    assert!(timers(&h).is_empty());
    assert_eq!(saga(&h, "O-1"), Some(Saga::Closed { outcome: Outcome::Completed, customer_id: Some(CUSTOMER.into()) }));
    assert!(h.advance(T0 + 2 * BOUND).unwrap().is_empty());
    assert!(notes(&h, "saga_timeout").is_empty());
    assert!(h.store.get_json::<CancelRecord>(&cancel_key("O-1")).is_none());
}

#[test]
fn any_cancellation_closes_the_saga_and_no_timer_fires() {
    // POS payment failure, before the stock answer.
    let mut h = harness();
    h.feed("order.created", created("c1", "O-1"), T0).unwrap();
    assert!(h.feed("order.cancelled", pos_cancel("p1", "O-1"), T0 + 1).unwrap().is_empty());
    assert!(timers(&h).is_empty());
    assert_eq!(saga(&h, "O-1"), closed_cancelled());
    assert!(h.advance(T0 + 2 * BOUND).unwrap().is_empty());
    // Expiry after the answer.
    let mut h = harness();
    h.feed("order.created", created("c1", "O-1"), T0).unwrap();
    h.feed("stock.reserved", reserved("r1", "O-1"), T0 + 1).unwrap();
    let c = only_cancellation(&h.feed("stock.reservation.released", released("x1", "O-1", "EXPIRED"), T0 + 2).unwrap());
    assert_eq!(c.reason, "RESERVATION_EXPIRED");
    assert!(timers(&h).is_empty());
    assert!(h.advance(T0 + 2 * BOUND).unwrap().is_empty());
    assert!(notes(&h, "saga_timeout").is_empty());
    // The reserver's release for a cancellation it saw before the canceller did.
    let mut h = harness();
    h.feed("order.created", created("c1", "O-1"), T0).unwrap();
    h.feed("stock.reservation.released", released("x1", "O-1", "CANCELLED"), T0 + 1).unwrap();
    assert!(timers(&h).is_empty());
    assert!(h.advance(T0 + 2 * BOUND).unwrap().is_empty());
}

#[test]
fn a_stock_answer_before_order_created_leaves_no_answer_timer() {
    let mut h = harness();
    assert!(h.feed("stock.reserved", reserved("r1", "O-1"), T0).unwrap().is_empty());
    assert_eq!(timers(&h), vec![("timeout/saga/O-1".into(), T0 + BOUND)], "bounded from the first sight of the saga");
    assert!(h.feed("order.created", created("c1", "O-1"), T0 + 100).unwrap().is_empty());
    assert_eq!(timers(&h), vec![("timeout/saga/O-1".into(), T0 + BOUND)], "no answer timer, bound unchanged");
    let Some(Saga::Open(open)) = saga(&h, "O-1") else { panic!() };
    assert_eq!((open.created_seen_at, open.answered), (Some(T0 + 100), true));
    assert!(h.advance(T0 + 100 + ANSWER).unwrap().is_empty());
    // Completed in time: nothing left.
    h.feed("order.settled", completed("d1", "O-1"), T0 + 200).unwrap();
    assert!(timers(&h).is_empty());
    assert!(h.advance(T0 + 2 * BOUND).unwrap().is_empty());
    assert!(notes(&h, "late_event").is_empty());
}

#[test]
fn a_stock_answer_before_order_created_is_still_bounded() {
    let mut h = harness();
    h.feed("stock.reserved", reserved("r1", "O-1"), T0).unwrap();
    h.feed("order.created", created("c1", "O-1"), T0 + 100).unwrap();
    assert!(h.advance(T0 + BOUND - 1).unwrap().is_empty());
    let c = only_cancellation(&h.advance(T0 + BOUND).unwrap());
    assert_eq!((c.reason.as_str(), c.reservation_id.as_deref()), ("SAGA_TIMEOUT", Some("R-1")));
    assert_eq!(notes(&h, "saga_timeout"), vec!["saga_bound"]);
}

#[test]
fn a_stock_failure_before_order_created_waits_for_it_and_cancels_with_the_same_payload() {
    // Issue 19: the cancellation must not depend on which input the canceller read first (a
    // rewound unit re-read in another interleaving would otherwise write a second payload under
    // the same eventId).
    let in_order = {
        let mut h = harness();
        h.feed("order.created", created("c1", "O-1"), T0).unwrap();
        only_cancellation(&h.feed("stock.reservation.failed", failed("f1", "O-1"), T0 + 100).unwrap())
    };
    let mut h = harness();
    assert!(h.feed("stock.reservation.failed", failed("f1", "O-1"), T0).unwrap().is_empty(), "waits for order.created");
    assert_eq!(timers(&h), vec![("timeout/saga/O-1".into(), T0 + BOUND)], "the saga bound runs");
    let overtaken = only_cancellation(&h.feed("order.created", created("c1", "O-1"), T0 + 100).unwrap());
    assert_eq!(overtaken, in_order, "one payload whatever the order");
    assert_eq!(overtaken.customer_id.as_deref(), Some(CUSTOMER));
    assert!(timers(&h).is_empty(), "the saga closed with its timers: {:?}", timers(&h));
    assert!(h.advance(T0 + 2 * BOUND).unwrap().is_empty());
    assert!(notes(&h, "late_event").is_empty());
}

#[test]
fn a_stock_failure_whose_order_never_arrives_is_cancelled_at_the_saga_bound() {
    let mut h = harness();
    assert!(h.feed("stock.reservation.failed", failed("f1", "O-1"), T0).unwrap().is_empty());
    assert!(h.advance(T0 + BOUND - 1).unwrap().is_empty());
    let c = only_cancellation(&h.advance(T0 + BOUND).unwrap());
    assert_eq!((c.reason.as_str(), c.occurred_at, c.customer_id.as_deref()), ("INSUFFICIENT_STOCK", 1_000, None));
    assert!(notes(&h, "saga_timeout").is_empty(), "the failure is the answer, not a timeout");
}

#[test]
fn late_events_after_a_saga_timeout_are_noted_and_ignored() {
    let mut h = harness();
    h.feed("order.created", created("c1", "O-1"), T0).unwrap();
    let c = only_cancellation(&h.advance(T0 + ANSWER).unwrap());
    let store = h.store.clone();
    // The reserver answers late: the reservation is not adopted, the saga stays closed.
    assert!(h.feed("stock.reserved", reserved("r1", "O-1"), T0 + ANSWER + 1).unwrap().is_empty());
    assert!(h.feed("order.created", created("c2", "O-1"), T0 + ANSWER + 3).unwrap().is_empty());
    // The expected echoes are silent: the canceller's own cancellation and the release of
    // the late reservation.
    assert!(h.feed("order.cancelled", c, T0 + ANSWER + 4).unwrap().is_empty());
    assert!(h.feed("stock.reservation.released", released("x1", "O-1", "CANCELLED"), T0 + ANSWER + 5).unwrap().is_empty());
    assert_eq!(notes(&h, "late_event"), vec!["stock_reserved_after_close", "created_after_close"]);
    assert!(timers(&h).is_empty());
    assert!(h.advance(T0 + 2 * BOUND).unwrap().is_empty());
    // Nothing was applied: the state is the tombstone and the cancel record, as before (bar
    // the remembered eventIds).
    let business = |s: &orderflow_api::MemoryStore| {
        s.data.iter().filter(|(k, _)| !k.starts_with(b"\x00")).map(|(k, v)| (k.clone(), v.clone())).collect::<Vec<_>>()
    };
    assert_eq!(business(&h.store), business(&store));
}

#[test]
fn late_events_after_completion_are_noted_and_ignored() {
    let mut h = harness();
    h.feed("order.created", created("c1", "O-1"), T0).unwrap();
    h.feed("stock.reserved", reserved("r1", "O-1"), T0 + 1).unwrap();
    h.feed("order.settled", completed("d1", "O-1"), T0 + 2).unwrap();
    assert!(h.feed("stock.reservation.failed", failed("f1", "O-1"), T0 + 3).unwrap().is_empty());
    assert!(h.feed("stock.reservation.released", released("x1", "O-1", "EXPIRED"), T0 + 4).unwrap().is_empty());
    assert!(h.feed("order.cancelled", pos_cancel("p1", "O-1"), T0 + 5).unwrap().is_empty());
    assert!(h.feed("stock.reserved", reserved("r2", "O-1"), T0 + 6).unwrap().is_empty());
    assert!(h.feed("order.settled", completed("d2", "O-1"), T0 + 7).unwrap().is_empty());
    assert_eq!(
        notes(&h, "late_event"),
        vec![
            "cancel_after_completion",
            "cancel_after_completion",
            "cancelled_after_completion",
            "stock_reserved_after_close",
            "settled_twice"
        ]
    );
    assert_eq!(saga(&h, "O-1"), Some(Saga::Closed { outcome: Outcome::Completed, customer_id: Some(CUSTOMER.into()) }));
    assert!(h.store.get_json::<CancelRecord>(&cancel_key("O-1")).is_none());
    assert!(notes(&h, "compensation").is_empty());
}

#[test]
fn a_saga_timeout_is_emitted_once_even_when_a_stock_failure_arrives_after() {
    let mut h = harness();
    h.feed("order.created", created("c1", "O-1"), T0).unwrap();
    assert_eq!(only_cancellation(&h.advance(T0 + ANSWER).unwrap()).reason, "SAGA_TIMEOUT");
    assert!(h.feed("stock.reservation.failed", failed("f1", "O-1"), T0 + ANSWER + 1).unwrap().is_empty());
    assert!(h.feed("stock.reservation.released", released("x1", "O-1", "EXPIRED"), T0 + ANSWER + 2).unwrap().is_empty());
    assert!(h.advance(T0 + 2 * BOUND).unwrap().is_empty());
    assert_eq!(notes(&h, "compensation"), vec!["SAGA_TIMEOUT"]);
    assert_eq!(notes(&h, "late_event"), vec!["already_cancelled", "already_cancelled"]);
    assert_eq!(h.store.get_json::<CancelRecord>(&cancel_key("O-1")).unwrap().reason, "SAGA_TIMEOUT");
}

#[test]
fn a_second_order_created_for_an_open_saga_changes_no_clock() {
    let mut h = harness();
    h.feed("order.created", created("c1", "O-1"), T0).unwrap();
    h.feed("order.created", created("c1-resent", "O-1"), T0 + 50_000).unwrap();
    assert_eq!(notes(&h, "late_event"), vec!["duplicate_order"]);
    assert_eq!(timers(&h), vec![("timeout/answer/O-1".into(), T0 + ANSWER), ("timeout/saga/O-1".into(), T0 + BOUND)]);
    // The same eventId again is dropped before the worker.
    h.feed("order.created", created("c1", "O-1"), T0 + 60_000).unwrap();
    assert_eq!(notes(&h, "late_event").len(), 1);
}

#[test]
fn timers_survive_a_restart_and_are_per_order() {
    let mut h = harness();
    h.feed("order.created", created("c1", "O-1"), T0).unwrap();
    h.feed("order.created", created("c2", "O-2"), T0 + 10).unwrap();
    h.feed("stock.reserved", reserved("r2", "O-2"), T0 + 20).unwrap();
    // A new process over the same durable state.
    let mut restarted = harness();
    restarted.store = h.store.clone();
    let c = only_cancellation(&restarted.advance(T0 + ANSWER + 10).unwrap());
    assert_eq!(c.order_id, "O-1");
    assert_eq!(timers(&restarted), vec![("timeout/saga/O-2".into(), T0 + 10 + BOUND)]);
}

#[test]
fn a_timer_for_a_closed_or_unknown_saga_or_a_foreign_key_does_nothing() {
    let mut h = harness();
    h.feed("order.created", created("c1", "O-1"), T0).unwrap();
    h.feed("order.settled", completed("d1", "O-1"), T0 + 1).unwrap();
    // Re-arm the timers behind the canceller's back: they find the saga closed.
    h.store.timers.insert(answer_timer_key("O-1"), T0 + 5);
    h.store.timers.insert(saga_timer_key("O-1"), T0 + 6);
    h.store.timers.insert(answer_timer_key("O-404"), T0 + 7);
    h.store.timers.insert(b"something/else".to_vec(), T0 + 8);
    h.store.timers.insert(vec![0xff, 0xfe], T0 + 9);
    assert!(h.advance(T0 + 10).unwrap().is_empty());
    assert!(timers(&h).is_empty());
    assert!(notes(&h, "saga_timeout").is_empty());
}

#[test]
fn order_created_without_ids_is_invalid() {
    let mut h = harness();
    for ev in [
        OrderCreated { order_id: String::new(), ..created("c1", "O-1") },
        OrderCreated { hq_id: String::new(), ..created("c2", "O-1") },
        OrderCreated { store_id: String::new(), ..created("c3", "O-1") },
    ] {
        assert!(matches!(h.feed("order.created", ev, T0), Err(ProcessError::Invalid(_))));
    }
    assert!(timers(&h).is_empty());
    // Invalid content is the reserver's to answer: the canceller opens the saga as usual.
    h.feed("order.created", OrderCreated { items: vec![], ..created("c4", "O-1") }, T0).unwrap();
    assert_eq!(timers(&h).len(), 2);
}

#[test]
fn timeout_outputs_depend_on_the_state_only() {
    let run = || {
        let mut h = harness();
        h.feed("order.created", created("c1", "O-1"), T0).unwrap();
        h.feed("order.created", created("c2", "O-2"), T0).unwrap();
        h.feed("stock.reserved", reserved("r2", "O-2"), T0 + 1).unwrap();
        let mut outs = h.advance(T0 + ANSWER + 123).unwrap();
        outs.extend(h.advance(T0 + BOUND + 456).unwrap());
        outs
    };
    let a = run();
    assert_eq!(a.len(), 2);
    assert_eq!(a, run());
}

// ---------------------------------------------------------------- failure reasons (issue 4)

#[test]
fn failure_reasons_map_to_cancellation_reasons() {
    assert_eq!(cancel_reason_for_failure("INSUFFICIENT_STOCK"), Some("INSUFFICIENT_STOCK"));
    for r in ["INVALID_QUANTITY", "EMPTY_ORDER", "DUPLICATE_PRODUCT", "UNKNOWN_STORE", "INVALID_PRODUCT"] {
        assert_eq!(cancel_reason_for_failure(r), Some("INVALID_ORDER"), "{r}");
    }
    assert_eq!(failure_reason::INVALID_CONTENT.len(), 5);
    assert_eq!(cancel_reason_for_failure("SOMETHING_NEW"), None);
}

#[test]
fn invalid_content_failures_cancel_with_invalid_order() {
    for (i, r) in failure_reason::INVALID_CONTENT.iter().enumerate() {
        let mut h = harness();
        h.feed("order.created", created("c1", "O-1"), T0).unwrap();
        let ev = StockReservationFailed { reason: r.to_string(), ..failed(&format!("f{i}"), "O-1") };
        let c = only_cancellation(&h.feed("stock.reservation.failed", ev, T0 + 1).unwrap());
        assert_eq!(c.reason, "INVALID_ORDER", "{r}");
        assert_eq!(c.customer_message, "주문 정보가 올바르지 않아 주문이 취소되었습니다.");
        assert_eq!((c.event_id, c.reservation_id), (cancellation_event_id("O-1"), None));
        assert_eq!(notes(&h, "compensation"), vec!["INVALID_ORDER"]);
        assert!(timers(&h).is_empty(), "a failure is an answer and ends the saga");
    }
}

#[test]
fn an_unknown_failure_reason_still_cancels_and_is_reported() {
    let mut h = harness();
    let ev = StockReservationFailed { reason: "SOMETHING_NEW".into(), ..failed("f1", "O-1") };
    h.feed("order.created", created("c1", "O-1"), T0).unwrap();
    let c = only_cancellation(&h.feed("stock.reservation.failed", ev, T0).unwrap());
    assert_eq!(c.reason, "INSUFFICIENT_STOCK");
    assert_eq!(notes(&h, "unknown_failure_reason"), vec!["OTHER"]);
}

/// The units a partial sale did not sell come back as a release with reason `UNSOLD`: the order
/// was sold, so nothing is cancelled, and the saga still closes on the payment.
#[test]
fn unsold_units_released_after_a_partial_sale_cancel_nothing() {
    let mut h = harness();
    h.feed("order.created", created("e1", "O-1"), 0).unwrap();
    assert!(h.feed("stock.reservation.released", released("r1", "O-1", release_reason::UNSOLD), 0).unwrap().is_empty());
    assert!(h.feed("order.settled", completed("c1", "O-1"), 0).unwrap().is_empty());
    assert!(h.advance(3_600_000).unwrap().is_empty(), "no saga timeout: the order completed");
}

/// Issue 13: a payment the stock reserver could not serve (its reservation expired and the units
/// were gone) ends in exactly one refund-required cancellation, distinct from the order's
/// `RESERVATION_EXPIRED` one, carrying the customer.
#[test]
fn a_refund_verdict_emits_one_refund_required_cancellation_after_an_expiry() {
    let mut h = harness();
    h.feed("order.created", created("c1", "O-1"), T0).unwrap();
    h.feed("stock.reserved", reserved("r1", "O-1"), T0 + 1).unwrap();
    let expired = only_cancellation(&h.feed("stock.reservation.released", released("x1", "O-1", "EXPIRED"), T0 + 2).unwrap());
    assert_eq!((expired.reason.as_str(), expired.refund_required), ("RESERVATION_EXPIRED", false));
    assert_eq!(expired.customer_id.as_deref(), Some(CUSTOMER));
    let c = only_cancellation(&h.feed("order.settled", refund("s1", "O-1"), T0 + 3).unwrap());
    assert_eq!((c.reason.as_str(), c.refund_required), (cancel_reason::PAYMENT_AFTER_EXPIRY, true));
    assert_eq!((c.event_id.clone(), c.customer_id.as_deref()), (refund_event_id("O-1"), Some(CUSTOMER)));
    assert_ne!(c.event_id, expired.event_id);
    assert_eq!(c.customer_message, customer_message(cancel_reason::PAYMENT_AFTER_EXPIRY));
    assert_eq!(saga(&h, "O-1"), closed_cancelled());
    // Its own echo is silent and emits nothing.
    assert!(h.feed("order.cancelled", c, T0 + 4).unwrap().is_empty());
    assert_eq!(notes(&h, "compensation"), vec!["RESERVATION_EXPIRED", cancel_reason::PAYMENT_AFTER_EXPIRY]);
}

/// Issue 13: a late sale (the reservation expired, the payment re-reserved and deducted) closes
/// the saga as completed even after the `RESERVATION_EXPIRED` cancellation, and no timer or
/// later release cancels it again.
#[test]
fn a_sold_verdict_after_an_expiry_cancellation_closes_the_saga_as_completed() {
    let mut h = harness();
    h.feed("order.created", created("c1", "O-1"), T0).unwrap();
    h.feed("stock.reserved", reserved("r1", "O-1"), T0 + 1).unwrap();
    only_cancellation(&h.feed("stock.reservation.released", released("x1", "O-1", "EXPIRED"), T0 + 2).unwrap());
    assert!(h.feed("order.settled", OrderSettled { late: true, ..completed("s1", "O-1") }, T0 + 3).unwrap().is_empty());
    assert_eq!(saga(&h, "O-1"), Some(Saga::Closed { outcome: Outcome::Completed, customer_id: Some(CUSTOMER.into()) }));
    assert_eq!(notes(&h, "settlement"), vec!["late_sale_after_cancel"]);
    assert!(h.advance(T0 + 2 * BOUND).unwrap().is_empty());
}

/// The POS's payment itself is not a verdict: only `order.settled` closes a saga.
#[test]
fn the_pos_payment_is_ignored() {
    let mut h = harness();
    h.feed("order.created", created("c1", "O-1"), T0).unwrap();
    assert!(h.feed("order.completed", order_completed("p1", "O-1", "R-1", 5_000), T0 + 1).unwrap().is_empty());
    assert!(matches!(saga(&h, "O-1"), Some(Saga::Open(_))));
}

#[test]
fn an_unknown_settlement_outcome_is_invalid() {
    let mut h = harness();
    let err = h.feed("order.settled", order_settled("s1", "O-1", "MAYBE", 0), T0).unwrap_err();
    assert!(matches!(&err, ProcessError::Invalid(m) if m.contains("unknown outcome")), "{err}");
}
