//! Unit tests of the processor, run in memory through `orderflow_api::Harness`.

use super::*;
use orderflow_api::events::*;
use orderflow_api::fixtures::*;
use orderflow_api::Harness;

fn harness() -> Harness<Deduplicator> {
    Harness::new(Deduplicator::new(), PORTS)
}

fn created(id: &str, store: &str) -> OrderCreated {
    OrderCreated { store_id: store.into(), ..order_created(id, "O-1", 1_000, &[("P-001", 1)]) }
}

fn forwarded_events() -> Vec<Event> {
    vec![
        created("e1", "S-1").into(),
        order_completed("e2", "O-1", "R", 2).into(),
        order_cancelled("e3", "O-1", "PAYMENT_FAILED", 3).into(),
        stock_reservation_expired("e4", "O-1", "R", 4).into(),
        InventoryAdjusted { reference_id: "ADJ-1".into(), ..inventory_adjusted("e5", 5, &[("P-001", 3)]) }.into(),
    ]
}

#[test]
fn order_events_without_an_order_id_are_invalid() {
    let mut h = harness();
    for ev in forwarded_events().into_iter().filter(|e| e.order_id().is_some()) {
        let blank: Event = match ev {
            Event::OrderCreated(e) => OrderCreated { order_id: String::new(), ..e }.into(),
            Event::OrderCompleted(e) => OrderCompleted { order_id: String::new(), ..e }.into(),
            Event::OrderCancelled(e) => OrderCancelled { order_id: String::new(), ..e }.into(),
            Event::StockReservationExpired(e) => StockReservationExpired { order_id: String::new(), ..e }.into(),
            other => panic!("unexpected {}", other.schema_name()),
        };
        let err = h.feed("any", blank.clone(), 0).unwrap_err();
        assert!(matches!(&err, ProcessError::Invalid(m) if m.contains("empty orderId")), "{}: {err}", blank.schema_name());
    }
}

#[test]
fn forwards_stock_events_unchanged_keyed_by_store() {
    let mut h = harness();
    for ev in forwarded_events() {
        let outs = h.feed("any", ev.clone(), 0).unwrap();
        assert_eq!(outs[0].port, "out");
        assert_eq!(outs[0].key, "HQ-1:S-1");
        assert_eq!(outs[0].event, ev, "same event, same eventId");
    }
}

#[test]
fn order_events_of_the_order_joins_are_rekeyed_by_order_from_the_event() {
    let mut h = harness();
    for ev in forwarded_events() {
        let outs = h.feed("any", ev.clone(), 0).unwrap();
        let by_order: Vec<_> = outs.iter().filter(|o| o.port != "out").map(|o| (o.port.as_str(), o.key.as_str())).collect();
        let expected: Vec<(&str, &str)> = match &ev {
            Event::OrderCreated(_) => vec![("created", "O-1")],
            Event::OrderCancelled(_) => vec![("cancelled", "O-1")],
            _ => vec![],
        };
        assert_eq!(by_order, expected, "{}", ev.schema_name());
        assert!(outs.iter().all(|o| o.event == ev), "same event, same eventId");
    }
}

#[test]
fn ignores_other_event_types() {
    let mut h = harness();
    let ev = stock_reserved("x", "O-1", "R", 1, 2, &[]);
    assert!(h.feed("order.created", ev, 0).unwrap().is_empty(), "dispatch is on the variant, not the topic");
}

#[test]
fn rejects_empty_store_ids() {
    let mut h = harness();
    let err = h.feed("t", created("e1", ""), 0).unwrap_err();
    assert!(matches!(err, ProcessError::Invalid(ref m) if m.contains("storeId")), "{err}");
    let mut ev = created("e2", "S-1");
    ev.hq_id.clear();
    assert!(matches!(h.feed("t", ev, 0), Err(ProcessError::Invalid(_))));
}

#[test]
fn orders_with_invalid_content_are_forwarded_for_the_reserver_to_answer() {
    // Issue 4: only what routing needs (hqId, storeId) is checked here; the stock reserver
    // answers bad content with stock.reservation.failed.
    let mut h = harness();
    let base = || created("x", "S-1");
    for (i, ev) in [
        OrderCreated { items: vec![], ..base() },
        order_created("x", "O-1", 1, &[("P-001", 0)]),
        order_created("x", "O-1", 1, &[("P-001", -3), ("P-002", i32::MAX)]),
        order_created("x", "O-1", 1, &[("P-001", 1), ("P-001", 2)]),
        order_created("x", "O-1", 1, &[("", 1)]),
        OrderCreated { store_id: "S-NEVER-STOCKED".into(), ..base() },
    ]
    .into_iter()
    .enumerate()
    {
        let ev = OrderCreated { event_id: format!("bad-{i}"), ..ev };
        let outs = h.feed("order.created", ev.clone(), 0).unwrap();
        assert_eq!(outs.len(), 2, "to the reserver and to the canceller: {ev:?}");
        assert_eq!((outs[0].key.as_str(), &outs[0].event), (format!("HQ-1:{}", ev.store_id).as_str(), &Event::from(ev)));
    }
}

#[test]
fn repeated_event_id_is_forwarded_once() {
    let mut h = harness();
    assert_eq!(h.feed("t", created("e1", "S-1"), 0).unwrap().len(), 2, "by store and by order");
    assert!(h.feed("t", created("e1", "S-1"), 1).unwrap().is_empty());
}

#[test]
fn unwired_port_is_an_error() {
    let mut h = Harness::new(Deduplicator::new(), &[]);
    assert!(matches!(h.feed("t", created("e1", "S-1"), 0), Err(ProcessError::UnwiredPort(_))));
}
