//! Unit tests of the processor, run in memory through `orderflow_api::Harness`.

use super::*;
use orderflow_api::fixtures::*;
use orderflow_api::Harness;

const TTL: i64 = DEFAULT_RESERVATION_TTL_MS;
const T0: i64 = 1_000_000;

fn harness() -> Harness<ReservationExpirer> {
    Harness::new(ReservationExpirer::new(TTL), PORTS)
}

fn reserved(id: &str, order_id: &str) -> StockReserved {
    stock_reserved(id, order_id, &format!("R-{order_id}"), T0, T0 + TTL, &[("P-001", 2)])
}

fn completed(id: &str, order_id: &str) -> OrderSettled {
    OrderSettled {
        reservation_id: format!("R-{order_id}"),
        ..order_settled(id, order_id, orderflow_api::events::settlement::SOLD, T0 + 10)
    }
}

fn cancelled(id: &str, order_id: &str) -> OrderCancelled {
    order_cancelled(id, order_id, "PAYMENT_FAILED", T0 + 10)
}

#[test]
fn fires_after_ttl_not_before() {
    let mut h = harness();
    assert!(h.feed("stock.reserved", reserved("e1", "O-1"), T0).unwrap().is_empty());
    assert_eq!(h.store.timers.get(&timer_key("O-1")), Some(&(T0 + TTL)));
    assert!(h.advance(T0 + TTL - 1).unwrap().is_empty(), "not before the TTL");
    let outs = h.advance(T0 + TTL + 250).unwrap();
    assert_eq!(outs.len(), 1);
    assert_eq!((outs[0].port.as_str(), outs[0].key.as_str()), ("expired", "O-1"));
    let Event::StockReservationExpired(x) = &outs[0].event else { panic!() };
    assert_eq!(x.event_id, derive_event_id("R-O-1", "stock.reservation.expired"));
    assert_eq!(x.occurred_at, T0 + TTL, "occurredAt is the deadline, not the clock");
    assert_eq!(x.expires_at, T0 + TTL);
    assert_eq!((x.reservation_id.as_str(), x.hq_id.as_str(), x.store_id.as_str()), ("R-O-1", "HQ-1", "S-1"));
    assert!(h.notes.iter().any(|n| n.measure == "expiration" && n.label == "RESERVATION_EXPIRED"));
    // Fires once.
    assert!(h.advance(T0 + 10 * TTL).unwrap().is_empty());
    assert!(!h.store.timers.contains_key(&timer_key("O-1")));
    assert!(h.store.data.contains_key(&closed_key("O-1")));
}

#[test]
fn a_closed_order_is_forgotten_after_the_state_retention() {
    let mut h = harness();
    h.retention_ms = 10 * TTL;
    h.feed("t", reserved("e1", "O-1"), T0).unwrap();
    h.feed("t", completed("c1", "O-1"), T0 + 10).unwrap();
    h.feed("t", reserved("e2", "O-2"), T0 + 20).unwrap();
    h.advance(T0 + 10 + 10 * TTL - 1).unwrap();
    assert!(h.store.data.contains_key(&closed_key("O-1")), "kept within the retention");
    h.advance(T0 + 10 + 10 * TTL).unwrap();
    assert!(!h.store.data.contains_key(&closed_key("O-1")), "forgotten at it");
    assert!(h.store.data.contains_key(&closed_key("O-2")), "O-2 expired and closed later");
    let pending: Vec<_> = h.store.timers.keys().filter_map(|k| orderflow_api::forgotten(k)).collect();
    assert_eq!(pending, vec![closed_key("O-2").as_slice()], "only O-2's closed mark waits to be forgotten");
    assert_eq!(h.store.timers.len(), 1, "no expiry left: {:?}", h.store.timers);
}

#[test]
fn not_after_completion_or_cancellation() {
    let mut h = harness();
    h.feed("t", reserved("e1", "O-1"), T0).unwrap();
    h.feed("t", reserved("e2", "O-2"), T0).unwrap();
    h.feed("t", completed("c1", "O-1"), T0 + 10).unwrap();
    h.feed("t", cancelled("k2", "O-2"), T0 + 10).unwrap();
    assert!(!h.store.timers.contains_key(&timer_key("O-1")) && !h.store.timers.contains_key(&timer_key("O-2")));
    assert!(h.advance(T0 + 2 * TTL).unwrap().is_empty());
    assert!(h.notes.is_empty());
}

#[test]
fn closed_order_does_not_schedule() {
    let mut h = harness();
    h.feed("t", cancelled("k1", "O-1"), T0).unwrap();
    assert!(h.feed("t", reserved("e1", "O-1"), T0).unwrap().is_empty());
    assert!(!h.store.timers.contains_key(&timer_key("O-1")), "no expiry scheduled for a closed order");
    assert!(h.advance(T0 + 2 * TTL).unwrap().is_empty());
    assert!(h.notes.iter().any(|n| n.measure == "late_event" && n.label == "reserved_after_close"));
}

#[test]
fn timer_survives_a_restart() {
    let mut h = harness();
    h.feed("t", reserved("e1", "O-1"), T0).unwrap();
    // A new processor instance over the same durable store (a restart).
    let mut restarted = Harness::new(ReservationExpirer::new(TTL), PORTS);
    restarted.store = h.store.clone();
    let outs = restarted.advance(T0 + TTL).unwrap();
    assert_eq!(outs.len(), 1);
    assert_eq!(outs, h.advance(T0 + TTL).unwrap(), "same output before and after restart");
}

#[test]
fn duplicate_and_second_reservation_do_not_reschedule() {
    let mut h = harness();
    h.feed("t", reserved("e1", "O-1"), T0).unwrap();
    h.feed("t", reserved("e1", "O-1"), T0).unwrap();
    assert!(h.notes.is_empty(), "same eventId dropped silently");
    let mut later = reserved("e2", "O-1");
    later.occurred_at = T0 + 60_000;
    h.feed("t", later, T0 + 60_000).unwrap();
    assert_eq!(h.store.timers.get(&timer_key("O-1")), Some(&(T0 + TTL)));
    assert!(h.notes.iter().any(|n| n.label == "duplicate_reservation"));
}

#[test]
fn outputs_are_deterministic_in_the_input() {
    let run = |now: i64| {
        let mut h = harness();
        h.feed("t", reserved("e1", "O-1"), now).unwrap();
        h.feed("t", reserved("e2", "O-2"), now).unwrap();
        h.advance(T0 + TTL + now).unwrap()
    };
    let a = run(T0);
    assert_eq!(a.len(), 2);
    assert_eq!(a, run(T0 + 77_777));
}

#[test]
fn empty_ids_are_invalid_and_other_events_ignored() {
    let mut h = harness();
    assert!(matches!(h.feed("t", reserved("e1", ""), T0), Err(ProcessError::Invalid(_))));
    assert!(matches!(h.feed("t", completed("c1", ""), T0), Err(ProcessError::Invalid(_))));
    let mut ev = reserved("e2", "O-1");
    ev.reservation_id.clear();
    assert!(matches!(h.feed("t", ev, T0), Err(ProcessError::Invalid(_))));
    assert!(h.store.timers.is_empty());
    let ev = stock_reservation_expired("x", "O-1", "R", 0);
    assert!(h.feed("stock.reserved", ev, T0).unwrap().is_empty());
    assert!(h.store.data.keys().all(|k| k.starts_with(b"\x00")));
}
