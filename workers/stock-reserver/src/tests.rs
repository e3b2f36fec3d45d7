//! Unit tests of the processor, run in memory through `orderflow_api::Harness`.

use super::*;
use orderflow_api::events::SoldItem;
use orderflow_api::events::{InventoryAdjusted, StockLevel};
use orderflow_api::fixtures::*;
use orderflow_api::{Harness, Output};

/// Feeds `event` and then, as the runtime would through `stock.commands`, every record the
/// reserver writes to its own input (the HQ/store protocol of issue 16), until none is left.
/// Returns the other outputs in the order they were emitted (the event's own first).
fn feed(h: &mut Harness<StockReserver>, topic: &str, event: impl Into<Event>, now: i64) -> Result<Vec<Output>, ProcessError> {
    let mut queue: std::collections::VecDeque<Output> = h.feed(topic, event, now)?.into();
    let mut outs = Vec::new();
    while let Some(o) = queue.pop_front() {
        if o.port == PORT_COMMANDS {
            queue.extend(h.feed("stock.commands", o.event.clone(), now)?);
        } else {
            outs.push(o);
        }
    }
    Ok(outs)
}

const TTL: i64 = 300_000;

fn harness() -> Harness<StockReserver> {
    Harness::new(StockReserver::new(TTL), PORTS)
}

fn restock(h: &mut Harness<StockReserver>, id: &str, items: &[(&str, i64)]) -> Vec<Output> {
    feed(h, "stock.commands", adjust_ev(id, items), 0).unwrap()
}

/// A store `CORRECTION` (signed deltas, reason "stock count") of `items`.
fn correct(h: &mut Harness<StockReserver>, id: &str, items: &[(&str, i64)]) -> Vec<Output> {
    feed(h, "stock.commands", correction_ev(id, items), 0).unwrap()
}

fn correction_ev(id: &str, items: &[(&str, i64)]) -> InventoryAdjusted {
    InventoryAdjusted { adjustment_type: "CORRECTION".into(), reason: Some("stock count".into()), ..adjust_ev(id, items) }
}

fn adjust_ev(id: &str, items: &[(&str, i64)]) -> InventoryAdjusted {
    InventoryAdjusted { reference_id: format!("ref-{id}"), ..inventory_adjusted(id, 500, items) }
}

fn order(id: &str, order_id: &str, items: &[(&str, i32)]) -> OrderCreated {
    order_created(id, order_id, 1_000, items)
}

fn cancel(id: &str, order_id: &str) -> OrderCancelled {
    order_cancelled(id, order_id, "PAYMENT_FAILED", 2_000)
}

/// A payment for the live reservation of `order_id` (its `reservationId` read from `h`), listing
/// no items (the whole reservation sold).
fn complete(h: &Harness<StockReserver>, id: &str, order_id: &str) -> OrderCompleted {
    let rid = h.store.get_json::<Reservation>(&reservation_key(order_id)).map(|r| r.reservation_id).unwrap_or_default();
    order_completed(id, order_id, &rid, 3_000)
}

fn expire(id: &str, order_id: &str, reservation_id: &str) -> StockReservationExpired {
    stock_reservation_expired(id, order_id, reservation_id, 1_000 + TTL)
}

fn stock(h: &Harness<StockReserver>, product: &str) -> StockRecord {
    h.store.get_json(&stock_key(HQ, STORE, product)).unwrap_or_default()
}

fn reservation(h: &Harness<StockReserver>, order_id: &str) -> Option<Reservation> {
    h.store.get_json(&reservation_key(order_id))
}

fn notes(h: &Harness<StockReserver>, measure: &str) -> Vec<String> {
    h.notes.iter().filter(|n| n.measure == measure).map(|n| n.label.clone()).collect()
}

fn reserved_id(outs: &[Output]) -> String {
    match &outs[0].event {
        Event::StockReserved(e) => e.reservation_id.clone(),
        other => panic!("expected StockReserved, got {other:?}"),
    }
}

#[test]
fn key_helpers_have_the_documented_shape() {
    assert_eq!(stock_key("H", "S", "P"), b"stock/H:S/P".to_vec());
    assert!(stock_key("H", "S", "P").starts_with(STOCK_PREFIX));
    assert_eq!(reservation_key("O-1"), b"res/O-1".to_vec());
    assert!(reservation_key("O-1").starts_with(RESERVATION_PREFIX));
    let json = serde_json::to_string(&StockRecord { on_hand: 3, reserved: 1 }).unwrap();
    assert_eq!(json, r#"{"onHand":3,"reserved":1}"#);
    assert_eq!(StockRecord { on_hand: 3, reserved: 1 }.available(), 2);
}

#[test]
fn adjustment_updates_on_hand_and_reports_stock_updated() {
    let mut h = harness();
    let outs = restock(&mut h, "a1", &[("P-001", 10), ("P-002", 4)]);
    assert_eq!(stock(&h, "P-001"), StockRecord { on_hand: 10, reserved: 0 });
    assert_eq!(outs.len(), 2);
    let Event::StockUpdated(u) = &outs[0].event else { panic!() };
    assert_eq!(outs[0].port, PORT_UPDATED);
    assert_eq!(outs[0].key, "P-001");
    assert_eq!(u.event_id, derive_event_id("a1", "stock.updated/P-001"));
    assert_eq!(u.store_stock, StockLevel { previous: 0, current: 10 });
    assert_eq!((u.change_amount, u.change_reason.as_str(), u.reference_id.as_str()), (10, "RESTOCK", "ref-a1"));
    assert_eq!(u.hq_stock, Some(StockLevel { previous: 0, current: 10 }), "received through the HQ: its total rises too");
    assert_eq!(u.occurred_at, 500);
    let outs = correct(&mut h, "a2", &[("P-001", -3)]);
    let Event::StockUpdated(u) = &outs[0].event else { panic!() };
    assert_eq!(u.store_stock, StockLevel { previous: 10, current: 7 });
    assert_eq!(u.hq_stock, Some(StockLevel { previous: 10, current: 7 }));
    assert_eq!(notes(&h, "adjustment"), vec!["RESTOCK", "CORRECTION"]);
}

#[test]
fn adjustment_below_zero_or_below_reserved_is_rejected_whole() {
    let mut h = harness();
    restock(&mut h, "a1", &[("P-001", 5), ("P-002", 5)]);
    let err = feed(&mut h, "t", correction_ev("a2", &[("P-001", 1), ("P-002", -6)]), 0).unwrap_err();
    assert!(matches!(err, ProcessError::Invalid(ref m) if m.contains("P-002")), "{err}");
    assert_eq!(stock(&h, "P-001").on_hand, 5, "nothing applied");
    feed(&mut h, "t", order("o1", "O-1", &[("P-002", 4)]), 0).unwrap();
    let err = feed(&mut h, "t", correction_ev("a3", &[("P-002", -2)]), 0).unwrap_err();
    assert!(matches!(err, ProcessError::Invalid(_)), "on hand 3 < reserved 4");
    assert_eq!(stock(&h, "P-002"), StockRecord { on_hand: 5, reserved: 4 });
    assert!(matches!(feed(&mut h, "t", adjust_ev("a4", &[]), 0), Err(ProcessError::Invalid(_))));
}

#[test]
fn seed_000_scenario_1_single_item_short() {
    let mut h = harness();
    restock(&mut h, "a1", &[("P-001", 5)]);
    let outs = feed(&mut h, "t", order("o1", "O-1", &[("P-001", 10)]), 0).unwrap();
    assert_eq!(outs.len(), 1);
    assert_eq!((outs[0].port.as_str(), outs[0].key.as_str()), (PORT_FAILED, "O-1"));
    let Event::StockReservationFailed(f) = &outs[0].event else { panic!() };
    assert_eq!(f.reason, "INSUFFICIENT_STOCK");
    assert_eq!(f.items, vec![FailedItem { product_id: "P-001".into(), requested: 10, available: 5 }]);
    assert_eq!(f.event_id, derive_event_id("o1", "stock.reservation.failed"));
    assert_eq!(f.occurred_at, 1_000);
    assert_eq!(stock(&h, "P-001"), StockRecord { on_hand: 5, reserved: 0 }, "nothing reserved");
    assert_eq!(reservation(&h, "O-1").unwrap().status, ReservationStatus::Failed);
    assert_eq!(notes(&h, "reservation"), vec!["INSUFFICIENT_STOCK"]);
}

#[test]
fn seed_000_scenario_2_all_or_nothing_names_only_short_item() {
    let mut h = harness();
    restock(&mut h, "a1", &[("P-001", 10), ("P-002", 1)]);
    let outs = feed(&mut h, "t", order("o1", "O-1", &[("P-001", 5), ("P-002", 3)]), 0).unwrap();
    let Event::StockReservationFailed(f) = &outs[0].event else { panic!("{outs:?}") };
    assert_eq!(f.items, vec![FailedItem { product_id: "P-002".into(), requested: 3, available: 1 }]);
    assert_eq!(stock(&h, "P-001").available(), 10, "P-001 not reserved");
    assert_eq!(stock(&h, "P-002").available(), 1);
}

#[test]
fn reserves_all_items_and_available_is_on_hand_minus_reserved() {
    let mut h = harness();
    restock(&mut h, "a1", &[("P-001", 10), ("P-002", 3)]);
    let outs = feed(&mut h, "t", order("o1", "O-1", &[("P-001", 6), ("P-002", 3)]), 0).unwrap();
    assert_eq!((outs[0].port.as_str(), outs[0].key.as_str()), (PORT_RESERVED, "O-1"));
    let Event::StockReserved(r) = &outs[0].event else { panic!() };
    assert_eq!(r.event_id, derive_event_id("o1", "stock.reserved"));
    assert_eq!(r.reservation_id, derive_event_id("o1", "reservation"));
    assert_eq!(r.expires_at, 1_000 + TTL);
    assert_eq!(r.occurred_at, 1_000);
    assert_eq!(
        r.items,
        vec![ReservedItem { product_id: "P-001".into(), reserved: 6 }, ReservedItem { product_id: "P-002".into(), reserved: 3 }]
    );
    assert_eq!(stock(&h, "P-001"), StockRecord { on_hand: 10, reserved: 6 });
    assert_eq!(stock(&h, "P-001").available(), 4);
    // A second order sees only what is available, not what is on hand.
    let outs = feed(&mut h, "t", order("o2", "O-2", &[("P-001", 5)]), 0).unwrap();
    let Event::StockReservationFailed(f) = &outs[0].event else { panic!() };
    assert_eq!(f.items[0].available, 4);
    let outs = feed(&mut h, "t", order("o3", "O-3", &[("P-002", 1)]), 0).unwrap();
    let Event::StockReservationFailed(f) = &outs[0].event else { panic!() };
    assert_eq!(f.items[0].available, 0, "available never negative");
    let live = reservation(&h, "O-1").unwrap();
    assert_eq!(live.status, ReservationStatus::Live);
    assert_eq!(notes(&h, "reservation"), vec!["reserved", "INSUFFICIENT_STOCK", "INSUFFICIENT_STOCK"]);
}

#[test]
fn unknown_products_have_no_stock() {
    let mut h = harness();
    restock(&mut h, "a1", &[("P-001", 1)]);
    let outs = feed(&mut h, "t", order("o1", "O-1", &[("P-404", 1)]), 0).unwrap();
    let Event::StockReservationFailed(f) = &outs[0].event else { panic!() };
    assert_eq!(f.items, vec![FailedItem { product_id: "P-404".into(), requested: 1, available: 0 }]);
}

#[test]
fn orders_without_ids_are_dead_lettered_without_effect() {
    let mut h = harness();
    restock(&mut h, "a1", &[("P-001", 10)]);
    let blank = |f: fn(&mut OrderCreated)| {
        let mut ev = order("x1", "O-1", &[("P-001", 1)]);
        f(&mut ev);
        ev
    };
    for (ev, what) in [
        (blank(|e| e.order_id.clear()), "orderId"),
        (blank(|e| e.hq_id.clear()), "hqId"),
        (blank(|e| e.store_id.clear()), "storeId"),
        (blank(|e| e.event_id.clear()), "eventId"),
        // No ids and bad content: still dead-lettered, there is no order to answer.
        (OrderCreated { items: vec![], ..blank(|e| e.store_id.clear()) }, "storeId"),
    ] {
        let err = feed(&mut h, "t", ev, 0).unwrap_err();
        assert!(matches!(err, ProcessError::Invalid(ref m) if m.contains(what)), "{err}");
    }
    assert!(reservation(&h, "O-1").is_none());
    assert!(reservation(&h, "").is_none());
    assert_eq!(stock(&h, "P-001").reserved, 0);
    assert!(notes(&h, "reservation").is_empty());
}

/// Feeds `ev` to a harness whose store holds P-001 ×10 and P-002 ×3 (2 of them reserved by
/// O-0), and returns the failure it answers with.
fn invalid_answer(ev: OrderCreated) -> (Harness<StockReserver>, StockReservationFailed) {
    let mut h = harness();
    restock(&mut h, "a1", &[("P-001", 10), ("P-002", 3)]);
    feed(&mut h, "t", order("o0", "O-0", &[("P-002", 2)]), 0).unwrap();
    let outs = feed(&mut h, "t", ev.clone(), 0).unwrap();
    assert_eq!(outs.len(), 1, "{outs:?}");
    assert_eq!((outs[0].port.as_str(), outs[0].key.as_str()), (PORT_FAILED, ev.order_id.as_str()));
    let Event::StockReservationFailed(f) = outs[0].event.clone() else { panic!("{outs:?}") };
    assert_eq!(f.event_id, derive_event_id(&ev.event_id, "stock.reservation.failed"));
    assert_eq!((f.occurred_at, &f.hq_id, &f.store_id), (ev.occurred_at, &ev.hq_id, &ev.store_id));
    // Nothing reserved, and the order is closed for good (rule 5), like a stock failure.
    assert_eq!(stock(&h, "P-001"), StockRecord { on_hand: 10, reserved: 0 });
    assert_eq!(stock(&h, "P-002"), StockRecord { on_hand: 3, reserved: 2 });
    let r = reservation(&h, &ev.order_id).expect("failure recorded");
    assert_eq!((r.status, r.items.len()), (ReservationStatus::Failed, 0));
    assert_eq!(r.reservation_id, derive_event_id(&ev.event_id, "reservation"));
    assert_eq!(notes(&h, "reservation"), vec!["reserved".to_string(), f.reason.clone()]);
    (h, f)
}

fn item(p: &str, requested: i32, available: i32) -> FailedItem {
    FailedItem { product_id: p.into(), requested, available }
}

#[test]
fn invalid_quantity_is_answered_naming_the_offending_lines() {
    for q in [0, -1, MAX_QUANTITY + 1, i32::MIN, i32::MAX] {
        let (_, f) = invalid_answer(order("x1", "O-1", &[("P-001", 1), ("P-002", q)]));
        assert_eq!(f.reason, "INVALID_QUANTITY");
        assert_eq!(f.items, vec![item("P-002", q, 1)], "requested = the quantity, available = the real available");
    }
    let (_, f) = invalid_answer(order("x1", "O-1", &[("P-001", 0), ("P-002", 1), ("P-404", -5)]));
    assert_eq!(f.items, vec![item("P-001", 0, 10), item("P-404", -5, 0)]);
    // The bound itself is valid.
    let mut h = harness();
    restock(&mut h, "a1", &[("P-001", i64::from(MAX_QUANTITY))]);
    let outs = feed(&mut h, "t", order("o1", "O-1", &[("P-001", MAX_QUANTITY)]), 0).unwrap();
    assert!(matches!(outs[0].event, Event::StockReserved(_)), "{outs:?}");
}

#[test]
fn empty_order_is_answered() {
    let (_, f) = invalid_answer(order("x1", "O-1", &[]));
    assert_eq!(f.reason, "EMPTY_ORDER");
    assert!(f.items.is_empty());
}

#[test]
fn duplicate_product_is_rejected_not_merged() {
    let (_, f) = invalid_answer(order("x1", "O-1", &[("P-001", 4), ("P-002", 1), ("P-001", 2)]));
    assert_eq!(f.reason, "DUPLICATE_PRODUCT");
    assert_eq!(f.items, vec![item("P-001", 6, 10)], "each repeated product once, requested = its lines summed");
    let (_, f) = invalid_answer(order("x1", "O-1", &[("P-002", 1), ("P-001", 1), ("P-002", 1), ("P-001", 1), ("P-002", 1)]));
    assert_eq!(f.items, vec![item("P-002", 3, 1), item("P-001", 2, 10)]);
    let (_, f) = invalid_answer(order("x1", "O-1", &[("P-001", MAX_QUANTITY), ("P-001", MAX_QUANTITY), ("P-001", MAX_QUANTITY)]));
    assert_eq!(f.items, vec![item("P-001", 3 * MAX_QUANTITY, 10)]);
}

#[test]
fn invalid_product_is_answered() {
    let (_, f) = invalid_answer(order("x1", "O-1", &[("P-001", 1), ("", 3)]));
    assert_eq!(f.reason, "INVALID_PRODUCT");
    assert_eq!(f.items, vec![item("", 3, 0)]);
}

#[test]
fn content_checks_apply_in_the_documented_order() {
    // EMPTY_ORDER, INVALID_PRODUCT, INVALID_QUANTITY, DUPLICATE_PRODUCT, UNKNOWN_STORE, stock.
    let (_, f) = invalid_answer(order("x1", "O-1", &[("", 0), ("P-001", 0)]));
    assert_eq!(f.reason, "INVALID_PRODUCT");
    let (_, f) = invalid_answer(order("x1", "O-1", &[("P-001", 1), ("P-001", 0)]));
    assert_eq!((f.reason.as_str(), f.items.clone()), ("INVALID_QUANTITY", vec![item("P-001", 0, 10)]));
    let unknown = |items: &[(&str, i32)]| OrderCreated { store_id: "S-NEW".into(), ..order("x1", "O-1", items) };
    let (_, f) = invalid_answer(unknown(&[("P-001", 1), ("P-001", 1)]));
    assert_eq!(f.reason, "DUPLICATE_PRODUCT");
    let (_, f) = invalid_answer(unknown(&[("P-001", 1_000)]));
    assert_eq!(f.reason, "UNKNOWN_STORE", "the store is checked before the stock");
}

#[test]
fn order_for_a_store_never_adjusted_fails_with_unknown_store() {
    let mut h = harness();
    let outs = feed(&mut h, "t", order("o1", "O-1", &[("P-001", 1), ("P-002", 2)]), 0).unwrap();
    let Event::StockReservationFailed(f) = &outs[0].event else { panic!("{outs:?}") };
    assert_eq!(f.reason, "UNKNOWN_STORE");
    assert_eq!(f.items, vec![item("P-001", 1, 0), item("P-002", 2, 0)]);
    assert_eq!(reservation(&h, "O-1").unwrap().status, ReservationStatus::Failed);
    assert_eq!(notes(&h, "reservation"), vec!["UNKNOWN_STORE"]);
    // Stock arriving later does not revive the order (one answer per order), but the store
    // is known from then on, also for products it never stocked.
    let outs = restock(&mut h, "a1", &[("P-001", 10)]);
    assert_eq!(outs.len(), 1);
    assert_eq!(h.store.get_json::<StoreRecord>(&store_registry_key(HQ, STORE)).unwrap().first_adjustment, "a1");
    assert!(feed(&mut h, "t", order("o1b", "O-1", &[("P-001", 1)]), 0).unwrap().is_empty());
    assert_eq!(notes(&h, "late_event"), vec!["duplicate_order"]);
    let outs = feed(&mut h, "t", order("o2", "O-2", &[("P-002", 1)]), 0).unwrap();
    let Event::StockReservationFailed(f) = &outs[0].event else { panic!("{outs:?}") };
    assert_eq!(f.reason, "INSUFFICIENT_STOCK");
    // Another store of the same HQ is still unknown.
    let other = OrderCreated { store_id: "S-2".into(), ..order("o3", "O-3", &[("P-001", 1)]) };
    let outs = feed(&mut h, "t", other, 0).unwrap();
    let Event::StockReservationFailed(f) = &outs[0].event else { panic!("{outs:?}") };
    assert_eq!(f.reason, "UNKNOWN_STORE");
}

#[test]
fn every_adjustment_keeps_the_store_registered_and_a_rejected_one_registers_nothing() {
    let mut h = harness();
    assert!(feed(&mut h, "t", adjust_ev("a0", &[("P-001", -1)]), 0).is_err());
    assert!(!h.store.data.contains_key(&store_registry_key(HQ, STORE)), "rejected adjustment");
    restock(&mut h, "a1", &[("P-001", 1)]);
    correct(&mut h, "a2", &[("P-001", -1)]);
    assert_eq!(stock(&h, "P-001").on_hand, 0);
    assert_eq!(h.store.get_json::<StoreRecord>(&store_registry_key(HQ, STORE)).unwrap().first_adjustment, "a1");
    // Known, even with nothing on hand: a stock failure, not UNKNOWN_STORE.
    let outs = feed(&mut h, "t", order("o1", "O-1", &[("P-001", 1)]), 0).unwrap();
    let Event::StockReservationFailed(f) = &outs[0].event else { panic!("{outs:?}") };
    assert_eq!(f.reason, "INSUFFICIENT_STOCK");
    assert_eq!(store_registry_key("H", "S"), b"store/H:S".to_vec());
    assert!(!store_registry_key("H", "S").starts_with(STOCK_PREFIX));
}

#[test]
fn stock_written_before_the_store_registry_existed_counts_as_known() {
    let mut h = harness();
    h.store.data.insert(stock_key(HQ, STORE, "P-001"), serde_json::to_vec(&StockRecord { on_hand: 5, reserved: 0 }).unwrap());
    let outs = feed(&mut h, "t", order("o1", "O-1", &[("P-001", 2)]), 0).unwrap();
    assert!(matches!(outs[0].event, Event::StockReserved(_)), "{outs:?}");
    assert_eq!(h.store.get_json::<StoreRecord>(&store_registry_key(HQ, STORE)).unwrap().first_adjustment, "");
    // Now registered: a product it never stocked is a stock failure.
    let outs = feed(&mut h, "t", order("o2", "O-2", &[("P-009", 1)]), 0).unwrap();
    let Event::StockReservationFailed(f) = &outs[0].event else { panic!("{outs:?}") };
    assert_eq!(f.reason, "INSUFFICIENT_STOCK");
}

#[test]
fn invalid_order_after_close_is_late_not_answered() {
    let mut h = harness();
    restock(&mut h, "a1", &[("P-001", 10)]);
    feed(&mut h, "t", cancel("k1", "O-1"), 0).unwrap();
    assert!(feed(&mut h, "t", order("o1", "O-1", &[("P-001", 0)]), 0).unwrap().is_empty());
    assert_eq!(notes(&h, "late_event"), vec!["cancel_before_reservation", "created_after_close"]);
    assert!(notes(&h, "reservation").is_empty());
}

/// The canceller's `SAGA_TIMEOUT` cancellation (seed 001) as it arrives on `stock.commands`.
fn saga_timeout_cancel(id: &str, order_id: &str) -> OrderCancelled {
    order_cancelled(id, order_id, "SAGA_TIMEOUT", 180_000)
}

#[test]
fn saga_timeout_after_a_late_reservation_releases_it() {
    let mut h = harness();
    restock(&mut h, "a1", &[("P-001", 10)]);
    // The reserver was down past the stock answer timeout: it reserves late, then reads the
    // SAGA_TIMEOUT cancellation that followed the order on the store's partition.
    let res_id = reserved_id(&feed(&mut h, "t", order("o1", "O-1", &[("P-001", 4)]), 0).unwrap());
    assert_eq!(stock(&h, "P-001").reserved, 4);
    let outs = feed(&mut h, "t", saga_timeout_cancel("k1", "O-1"), 0).unwrap();
    let Event::StockReservationReleased(r) = &outs[0].event else { panic!("{outs:?}") };
    assert_eq!((r.reason.as_str(), r.reservation_id.as_str()), ("CANCELLED", res_id.as_str()));
    assert_eq!(stock(&h, "P-001"), StockRecord { on_hand: 10, reserved: 0 });
    assert_eq!(reservation(&h, "O-1").unwrap().status, ReservationStatus::Released);
}

#[test]
fn saga_timeout_before_the_order_reaches_the_reserver_blocks_it() {
    let mut h = harness();
    restock(&mut h, "a1", &[("P-001", 10)]);
    assert!(feed(&mut h, "t", saga_timeout_cancel("k1", "O-1"), 0).unwrap().is_empty());
    assert_eq!(reservation(&h, "O-1").unwrap().status, ReservationStatus::Closed);
    assert!(feed(&mut h, "t", order("o1", "O-1", &[("P-001", 4)]), 0).unwrap().is_empty(), "tombstone: never reserves");
    assert_eq!(stock(&h, "P-001").reserved, 0);
    assert_eq!(notes(&h, "late_event"), vec!["cancel_before_reservation", "created_after_close"]);
}

#[test]
fn one_reservation_per_order() {
    let mut h = harness();
    restock(&mut h, "a1", &[("P-001", 10)]);
    feed(&mut h, "t", order("o1", "O-1", &[("P-001", 2)]), 0).unwrap();
    // Same order, new eventId (e.g. a re-sent outbox row): not reserved again.
    let outs = feed(&mut h, "t", order("o1-again", "O-1", &[("P-001", 2)]), 0).unwrap();
    assert!(outs.is_empty());
    assert_eq!(stock(&h, "P-001").reserved, 2);
    assert_eq!(notes(&h, "late_event"), vec!["duplicate_order"]);
    // Also after a failure: the order never reserves later.
    feed(&mut h, "t", order("o2", "O-2", &[("P-001", 100)]), 0).unwrap();
    assert!(feed(&mut h, "t", order("o2b", "O-2", &[("P-001", 1)]), 0).unwrap().is_empty());
    assert_eq!(stock(&h, "P-001").reserved, 2);
}

#[test]
fn duplicate_event_id_has_no_effect() {
    let mut h = harness();
    assert_eq!(restock(&mut h, "a1", &[("P-001", 10)]).len(), 1);
    assert!(restock(&mut h, "a1", &[("P-001", 10)]).is_empty());
    assert_eq!(stock(&h, "P-001").on_hand, 10);
    assert_eq!(feed(&mut h, "t", order("o1", "O-1", &[("P-001", 2)]), 0).unwrap().len(), 1);
    assert!(feed(&mut h, "t", order("o1", "O-1", &[("P-001", 2)]), 0).unwrap().is_empty());
    assert_eq!(
        {
            let ev = complete(&h, "c1", "O-1");
            feed(&mut h, "t", ev, 0)
        }
        .unwrap()
        .len(),
        2,
        "SALE and order.settled"
    );
    assert!({
        let ev = complete(&h, "c1", "O-1");
        feed(&mut h, "t", ev, 0)
    }
    .unwrap()
    .is_empty());
    assert_eq!(stock(&h, "P-001"), StockRecord { on_hand: 8, reserved: 0 });
    assert!(notes(&h, "late_event").is_empty(), "repeats are dropped before the worker");
}

#[test]
fn cancel_releases_live_reservation() {
    let mut h = harness();
    restock(&mut h, "a1", &[("P-001", 10)]);
    let res_id = reserved_id(&feed(&mut h, "t", order("o1", "O-1", &[("P-001", 4)]), 0).unwrap());
    let outs = feed(&mut h, "t", cancel("k1", "O-1"), 0).unwrap();
    assert_eq!((outs[0].port.as_str(), outs[0].key.as_str()), (PORT_RELEASED, "O-1"));
    let Event::StockReservationReleased(r) = &outs[0].event else { panic!() };
    assert_eq!(r.reason, "CANCELLED");
    assert_eq!(r.reservation_id, res_id);
    assert_eq!(r.event_id, derive_event_id("k1", "stock.reservation.released"));
    assert_eq!(r.occurred_at, 2_000);
    assert_eq!(r.items, vec![ReleasedItem { product_id: "P-001".into(), released: 4 }]);
    assert_eq!(stock(&h, "P-001"), StockRecord { on_hand: 10, reserved: 0 });
    assert_eq!(reservation(&h, "O-1").unwrap().status, ReservationStatus::Released);
    // A second cancellation (new id) releases nothing.
    assert!(feed(&mut h, "t", cancel("k2", "O-1"), 0).unwrap().is_empty());
    assert_eq!(stock(&h, "P-001").reserved, 0);
    assert_eq!(notes(&h, "compensation_echo"), vec!["cancel_after_release"]);
    assert!(notes(&h, "late_event").is_empty());
    assert_eq!(notes(&h, "release"), vec!["CANCELLED"]);
}

#[test]
fn cancel_after_failure_is_a_compensation_echo_and_changes_nothing() {
    let mut h = harness();
    restock(&mut h, "a1", &[("P-001", 1)]);
    feed(&mut h, "t", order("o1", "O-1", &[("P-001", 4)]), 0).unwrap();
    assert!(feed(&mut h, "t", cancel("k1", "O-1"), 0).unwrap().is_empty());
    assert_eq!(stock(&h, "P-001"), StockRecord { on_hand: 1, reserved: 0 });
    assert_eq!(notes(&h, "compensation_echo"), vec!["cancel_after_failure"]);
    assert!(notes(&h, "late_event").is_empty());
}

#[test]
fn cancel_before_reservation_blocks_a_late_order_created() {
    let mut h = harness();
    restock(&mut h, "a1", &[("P-001", 10)]);
    assert!(feed(&mut h, "t", cancel("k1", "O-1"), 0).unwrap().is_empty());
    assert!(feed(&mut h, "t", order("o1", "O-1", &[("P-001", 4)]), 0).unwrap().is_empty());
    assert_eq!(stock(&h, "P-001").reserved, 0);
    assert_eq!(notes(&h, "late_event"), vec!["cancel_before_reservation", "created_after_close"]);
}

#[test]
fn expiry_releases_matching_live_reservation_only() {
    let mut h = harness();
    restock(&mut h, "a1", &[("P-001", 10)]);
    let res_id = reserved_id(&feed(&mut h, "t", order("o1", "O-1", &[("P-001", 4)]), 0).unwrap());
    assert!(feed(&mut h, "t", expire("x0", "O-1", "some-other-reservation"), 0).unwrap().is_empty());
    assert_eq!(stock(&h, "P-001").reserved, 4);
    let outs = feed(&mut h, "t", expire("x1", "O-1", &res_id), 0).unwrap();
    let Event::StockReservationReleased(r) = &outs[0].event else { panic!() };
    assert_eq!(r.reason, "EXPIRED");
    assert_eq!(r.event_id, derive_event_id("x1", "stock.reservation.released"));
    assert_eq!(stock(&h, "P-001"), StockRecord { on_hand: 10, reserved: 0 });
    assert_eq!(notes(&h, "late_event"), vec!["expired_other_reservation"]);
    assert_eq!(notes(&h, "release"), vec!["EXPIRED"]);
}

#[test]
fn expiry_after_completion_is_late() {
    let mut h = harness();
    restock(&mut h, "a1", &[("P-001", 10)]);
    let res_id = reserved_id(&feed(&mut h, "t", order("o1", "O-1", &[("P-001", 4)]), 0).unwrap());
    {
        let ev = complete(&h, "c1", "O-1");
        feed(&mut h, "t", ev, 0)
    }
    .unwrap();
    assert!(feed(&mut h, "t", expire("x1", "O-1", &res_id), 0).unwrap().is_empty());
    assert_eq!(stock(&h, "P-001"), StockRecord { on_hand: 6, reserved: 0 });
    assert_eq!(notes(&h, "late_event"), vec!["expired_after_deduction"]);
}

#[test]
fn completion_deducts_reserved_stock_with_previous_and_current() {
    let mut h = harness();
    restock(&mut h, "a1", &[("P-001", 10), ("P-002", 3)]);
    feed(&mut h, "t", order("o1", "O-1", &[("P-001", 4), ("P-002", 3)]), 0).unwrap();
    let outs = {
        let ev = complete(&h, "c1", "O-1");
        feed(&mut h, "t", ev, 0)
    }
    .unwrap();
    assert_eq!(outs.len(), 3);
    // order.settled first; the sales come back from the HQ's ledger (issue 16).
    let outs: Vec<Output> = outs[1..].iter().cloned().chain(outs[..1].iter().cloned()).collect();
    let Event::StockUpdated(u) = &outs[0].event else { panic!() };
    assert_eq!((outs[0].port.as_str(), outs[0].key.as_str()), (PORT_UPDATED, "P-001"));
    assert_eq!(u.store_stock, StockLevel { previous: 10, current: 6 });
    assert_eq!((u.change_amount, u.change_reason.as_str(), u.reference_id.as_str()), (-4, "SALE", "O-1"));
    assert_eq!(u.event_id, derive_event_id("c1", "stock.updated/P-001"));
    assert_eq!(u.occurred_at, 3_000);
    let Event::StockUpdated(u) = &outs[1].event else { panic!() };
    assert_eq!(u.store_stock, StockLevel { previous: 3, current: 0 }, "down to zero, never below");
    assert_eq!(stock(&h, "P-001"), StockRecord { on_hand: 6, reserved: 0 });
    assert_eq!(stock(&h, "P-002"), StockRecord { on_hand: 0, reserved: 0 });
    assert_eq!(reservation(&h, "O-1").unwrap().status, ReservationStatus::Deducted);
    assert_eq!(notes(&h, "deduction"), vec!["SALE"]);
    let s = settled(&outs);
    assert_eq!((s.outcome.as_str(), s.late, s.payment_event_id.as_str()), (settlement::SOLD, false, "c1"));
    assert_eq!(s.event_id, derive_event_id("c1", "order.settled"));
    assert_eq!(
        s.items,
        vec![SettledItem { product_id: "P-001".into(), quantity: 4 }, SettledItem { product_id: "P-002".into(), quantity: 3 }]
    );
    // A second payment (new id) for the settled order is rejected; a cancel after completion
    // releases nothing.
    let err = {
        let ev = complete(&h, "c2", "O-1");
        feed(&mut h, "t", ev, 0)
    }
    .unwrap_err();
    assert!(matches!(&err, ProcessError::Invalid(m) if m.contains("already settled")), "{err}");
    assert!(feed(&mut h, "t", cancel("k1", "O-1"), 0).unwrap().is_empty());
    assert_eq!(stock(&h, "P-001"), StockRecord { on_hand: 6, reserved: 0 });
    assert_eq!(notes(&h, "late_event"), vec!["cancel_after_deduction"]);
}

/// The `order.settled` among `outs` (exactly one).
fn settled(outs: &[Output]) -> &OrderSettled {
    let all: Vec<&OrderSettled> = outs
        .iter()
        .filter_map(|o| match &o.event {
            Event::OrderSettled(s) => {
                assert_eq!((o.port.as_str(), o.key.as_str()), (PORT_SETTLED, s.order_id.as_str()));
                Some(s)
            }
            _ => None,
        })
        .collect();
    assert_eq!(all.len(), 1, "one settlement per payment: {outs:?}");
    all[0]
}

fn sales(outs: &[Output]) -> Vec<(&str, i64)> {
    outs.iter()
        .filter_map(|o| match &o.event {
            Event::StockUpdated(u) if u.change_reason == change_reason::SALE => Some((u.product_id.as_str(), u.change_amount)),
            _ => None,
        })
        .collect()
}

#[test]
fn a_payment_after_expiry_is_a_late_sale_when_the_units_are_still_there() {
    let mut h = harness();
    restock(&mut h, "a1", &[("P-001", 10)]);
    let res_id = reserved_id(&feed(&mut h, "t", order("o1", "O-1", &[("P-001", 4)]), 0).unwrap());
    feed(&mut h, "t", expire("x1", "O-1", &res_id), 0).unwrap();
    assert_eq!(stock(&h, "P-001"), StockRecord { on_hand: 10, reserved: 0 });
    let outs = feed(&mut h, "t", order_completed("c1", "O-1", &res_id, 3_000), 0).unwrap();
    assert_eq!(sales(&outs), vec![("P-001", -4)], "the released units sold from available stock");
    let s = settled(&outs);
    assert_eq!((s.outcome.as_str(), s.late, s.reason.as_deref()), (settlement::SOLD, true, None));
    assert_eq!(stock(&h, "P-001"), StockRecord { on_hand: 6, reserved: 0 });
    assert_eq!(reservation(&h, "O-1").unwrap().status, ReservationStatus::Deducted);
    assert_eq!(notes(&h, "settlement"), vec!["late_sale"]);
}

#[test]
fn a_payment_after_expiry_whose_units_were_sold_again_requires_a_refund() {
    let mut h = harness();
    restock(&mut h, "a1", &[("P-001", 5)]);
    let res_id = reserved_id(&feed(&mut h, "t", order("o1", "O-1", &[("P-001", 4)]), 0).unwrap());
    feed(&mut h, "t", expire("x1", "O-1", &res_id), 0).unwrap();
    // The released units are reserved by another order before the late payment arrives.
    feed(&mut h, "t", order("o2", "O-2", &[("P-001", 3)]), 0).unwrap();
    let before = (stock(&h, "P-001"), h.store.get_json::<Reservation>(&reservation_key("O-2")));
    let outs = feed(&mut h, "t", order_completed("c1", "O-1", &res_id, 3_000), 0).unwrap();
    assert!(sales(&outs).is_empty(), "nothing deducted: {outs:?}");
    let s = settled(&outs);
    assert_eq!(
        (s.outcome.as_str(), s.late, s.reason.as_deref(), s.items.len()),
        (settlement::REFUND_REQUIRED, false, Some(cancel_reason::PAYMENT_AFTER_EXPIRY), 0)
    );
    assert_eq!((stock(&h, "P-001"), h.store.get_json::<Reservation>(&reservation_key("O-2"))), before, "O-2 keeps its units");
    assert_eq!(reservation(&h, "O-1").unwrap().status, ReservationStatus::Refunded);
    // Settled once: another payment for O-1 is rejected, a cancellation is an echo.
    assert!(feed(&mut h, "t", order_completed("c2", "O-1", &res_id, 3_000), 0).is_err());
    assert!(feed(&mut h, "t", cancel("k1", "O-1"), 0).unwrap().is_empty());
    assert_eq!(notes(&h, "settlement"), vec!["refund_required"]);
}

#[test]
fn a_payment_after_a_cancellation_is_settled_like_one_after_expiry() {
    let mut h = harness();
    restock(&mut h, "a1", &[("P-001", 10)]);
    let res_id = reserved_id(&feed(&mut h, "t", order("o1", "O-1", &[("P-001", 4)]), 0).unwrap());
    feed(&mut h, "t", cancel("k1", "O-1"), 0).unwrap();
    let outs = feed(&mut h, "t", order_completed("c1", "O-1", &res_id, 3_000), 0).unwrap();
    assert_eq!((settled(&outs).outcome.as_str(), settled(&outs).late), (settlement::SOLD, true));
    assert_eq!(stock(&h, "P-001"), StockRecord { on_hand: 6, reserved: 0 });
}

#[test]
fn a_payment_before_its_order_sells_its_own_items_or_requires_a_refund() {
    let mut h = harness();
    restock(&mut h, "a1", &[("P-001", 10)]);
    // Itemised: sold from available stock.
    let paid = OrderCompleted {
        items: vec![SoldItem { product_id: "P-001".into(), quantity: 2, actual_price: 100 }],
        ..order_completed("c1", "O-1", "R-1", 3_000)
    };
    let outs = feed(&mut h, "t", paid, 0).unwrap();
    assert_eq!(sales(&outs), vec![("P-001", -2)]);
    assert!(settled(&outs).late);
    // Not itemised: nothing known to sell, so a refund.
    let outs = feed(&mut h, "t", order_completed("c9", "O-9", "R-9", 3_000), 0).unwrap();
    assert_eq!(settled(&outs).outcome, settlement::REFUND_REQUIRED);
    assert_eq!(stock(&h, "P-001"), StockRecord { on_hand: 8, reserved: 0 });
    // The settled orders can no longer reserve.
    assert!(feed(&mut h, "t", order("o1", "O-1", &[("P-001", 1)]), 0).unwrap().is_empty());
    assert!(feed(&mut h, "t", order("o9", "O-9", &[("P-001", 1)]), 0).unwrap().is_empty());
    assert_eq!(stock(&h, "P-001").reserved, 0);
    assert_eq!(notes(&h, "late_event"), vec!["created_after_close", "created_after_close"]);
}

#[test]
fn deduction_that_would_go_negative_is_corrupt_state() {
    let mut h = harness();
    restock(&mut h, "a1", &[("P-001", 10)]);
    feed(&mut h, "t", order("o1", "O-1", &[("P-001", 4)]), 0).unwrap();
    // Tamper with the store to break the invariant.
    h.store.data.insert(stock_key(HQ, STORE, "P-001"), serde_json::to_vec(&StockRecord { on_hand: 2, reserved: 4 }).unwrap());
    let err = {
        let ev = complete(&h, "c1", "O-1");
        feed(&mut h, "t", ev, 0)
    }
    .unwrap_err();
    assert!(matches!(err, ProcessError::CorruptState { .. }), "{err}");
    assert_eq!(stock(&h, "P-001"), StockRecord { on_hand: 2, reserved: 4 }, "nothing applied");
    assert_eq!(reservation(&h, "O-1").unwrap().status, ReservationStatus::Live);
}

#[test]
fn outputs_are_deterministic_in_the_input() {
    let script: Vec<Event> = vec![
        adjust_ev("a1", &[("P-001", 10), ("P-002", 1)]).into(),
        order("o1", "O-1", &[("P-001", 5)]).into(),
        order("o2", "O-2", &[("P-001", 5), ("P-002", 3)]).into(),
        order("o3", "O-3", &[("P-001", 2)]).into(),
        order_completed("c1", "O-1", &derive_event_id("o1", "reservation"), 3_000).into(),
        cancel("k3", "O-3").into(),
    ];
    let run = || {
        let mut h = harness();
        let mut all = Vec::new();
        for (i, ev) in script.iter().enumerate() {
            // Processing time differs between runs: outputs must not depend on it.
            all.extend(feed(&mut h, "t", ev.clone(), i as i64 * 7).unwrap());
        }
        (all, h.store.data)
    };
    let (a, sa) = run();
    let (b, sb) = run();
    assert_eq!(a.len(), 8);
    assert_eq!(a, b);
    assert_eq!(
        sa.into_iter().filter(|(k, _)| !k.starts_with(b"\x00")).collect::<Vec<_>>(),
        sb.into_iter().filter(|(k, _)| !k.starts_with(b"\x00")).collect::<Vec<_>>()
    );
}

#[test]
fn ignores_unrelated_events() {
    let mut h = harness();
    let ev = stock_reservation_released("r", "O-1", "R", "EXPIRED", 0, &[]);
    assert!(feed(&mut h, "order.created", ev, 0).unwrap().is_empty());
    assert!(h.notes.is_empty());
}

/// A restock of 10 × P-001 and 5 × P-002 and order O-1 reserving 3 and 2 of them.
fn reserved_two_products() -> Harness<StockReserver> {
    let mut h = harness();
    restock(&mut h, "a1", &[("P-001", 10), ("P-002", 5)]);
    feed(&mut h, "t", order("o1", "O-1", &[("P-001", 3), ("P-002", 2)]), 0).unwrap();
    h
}

fn sold(h: &Harness<StockReserver>, items: &[(&str, i32)]) -> OrderCompleted {
    OrderCompleted {
        items: items.iter().map(|(p, q)| SoldItem { product_id: p.to_string(), quantity: *q, actual_price: 100 }).collect(),
        ..complete(h, "c1", "O-1")
    }
}

#[test]
fn a_partial_sale_deducts_what_was_sold_and_releases_the_rest() {
    let mut h = reserved_two_products();
    let outs = {
        let ev = sold(&h, &[("P-001", 2)]);
        feed(&mut h, "t", ev, 0)
    }
    .unwrap();
    assert_eq!(stock(&h, "P-001"), StockRecord { on_hand: 8, reserved: 0 }, "2 sold, 1 back to available");
    assert_eq!(stock(&h, "P-002"), StockRecord { on_hand: 5, reserved: 0 }, "none sold, all back");
    let sales: Vec<(&str, i64)> = outs
        .iter()
        .filter_map(|o| match &o.event {
            Event::StockUpdated(u) => Some((u.product_id.as_str(), u.change_amount)),
            _ => None,
        })
        .collect();
    assert_eq!(sales, vec![("P-001", -2)], "one SALE, for what was sold");
    let released: Vec<&StockReservationReleased> = outs
        .iter()
        .filter_map(|o| match &o.event {
            Event::StockReservationReleased(r) => Some(r),
            _ => None,
        })
        .collect();
    assert_eq!(released.len(), 1);
    assert_eq!(released[0].reason, release_reason::UNSOLD);
    let back: Vec<(&str, i32)> = released[0].items.iter().map(|i| (i.product_id.as_str(), i.released)).collect();
    assert_eq!(back, vec![("P-001", 1), ("P-002", 2)]);
    assert_eq!(reservation(&h, "O-1").unwrap().status, ReservationStatus::Deducted);
}

#[test]
fn a_full_itemised_sale_releases_nothing() {
    let mut h = reserved_two_products();
    let outs = {
        let ev = sold(&h, &[("P-002", 2), ("P-001", 3)]);
        feed(&mut h, "t", ev, 0)
    }
    .unwrap();
    assert_eq!(stock(&h, "P-001"), StockRecord { on_hand: 7, reserved: 0 });
    assert_eq!(stock(&h, "P-002"), StockRecord { on_hand: 3, reserved: 0 });
    assert!(outs.iter().all(|o| matches!(o.event, Event::StockUpdated(_) | Event::OrderSettled(_))), "{outs:?}");
    assert_eq!(settled(&outs).outcome, settlement::SOLD);
}

/// Builds a payment against a harness's live reservation.
type Payment = Box<dyn Fn(&Harness<StockReserver>) -> OrderCompleted>;

#[test]
fn a_payment_for_another_reservation_or_beyond_it_is_rejected_and_deducts_nothing() {
    let cases: Vec<(&str, Payment)> = vec![
        ("is not the reservation", Box::new(|h| OrderCompleted { reservation_id: "R-OTHER".into(), ..complete(h, "c1", "O-1") })),
        ("is not the reservation", Box::new(|h| OrderCompleted { reservation_id: String::new(), ..complete(h, "c1", "O-1") })),
        ("but 3 are reserved", Box::new(|h| sold(h, &[("P-001", 4)]))),
        ("is not reserved", Box::new(|h| sold(h, &[("P-009", 1)]))),
        ("is listed twice", Box::new(|h| sold(h, &[("P-001", 1), ("P-001", 1)]))),
        ("sold 0 of P-001", Box::new(|h| sold(h, &[("P-001", 0)]))),
    ];
    for (want, payment) in cases {
        let mut h = reserved_two_products();
        let before = h.store.data.clone();
        let err = {
            let ev = payment(&h);
            feed(&mut h, "t", ev, 0)
        }
        .unwrap_err();
        assert!(matches!(&err, ProcessError::Invalid(m) if m.contains(want) && m.contains("nothing deducted")), "{want}: {err}");
        assert_eq!(h.store.data, before, "{want}: nothing applied");
        assert_eq!(reservation(&h, "O-1").unwrap().status, ReservationStatus::Live, "{want}: the reservation is still live");
    }
}

// ------------------------------------------------------------------------------------------
// Reconciliation (issue 13, seed 004 재고 대사).

fn reconciled(h: &Harness<StockReserver>) -> reconcile::Report {
    reconcile(&StateTxn::new(&h.store)).unwrap()
}

/// Restock, a sale, a partial sale, a release, a late sale and a live reservation: every rule
/// holds, the punctuation says `clean` and re-arms.
#[test]
fn reconciliation_of_a_healthy_shard_finds_nothing_and_the_punctuation_re_arms() {
    let mut h = harness();
    restock(&mut h, "a1", &[("P-001", 10), ("P-002", 5)]);
    feed(&mut h, "t", order("o1", "O-1", &[("P-001", 3), ("P-002", 2)]), 0).unwrap();
    {
        let ev = sold(&h, &[("P-001", 2)]);
        feed(&mut h, "t", ev, 0)
    }
    .unwrap();
    let rid = reserved_id(&feed(&mut h, "t", order("o2", "O-2", &[("P-001", 1)]), 0).unwrap());
    feed(&mut h, "t", expire("x2", "O-2", &rid), 0).unwrap();
    feed(&mut h, "t", order_completed("c2", "O-2", &rid, 3_000), 0).unwrap();
    feed(&mut h, "t", order("o3", "O-3", &[("P-002", 1)]), 0).unwrap();
    correct(&mut h, "a2", &[("P-001", -1)]);
    let report = reconciled(&h);
    assert_eq!((report.records, report.unledgered, report.mismatches.len()), (2, 0, 0), "{report:?}");
    assert_eq!(h.store.timers.get(RECONCILE_TIMER), Some(&DEFAULT_RECONCILE_INTERVAL_MS), "armed by the first event (now 0)");
    assert!(h.advance(DEFAULT_RECONCILE_INTERVAL_MS).unwrap().is_empty());
    assert_eq!(notes(&h, "reconciliation"), vec!["clean"]);
    assert!(notes(&h, "conservation_mismatch").is_empty());
    assert_eq!(h.store.timers.get(RECONCILE_TIMER), Some(&(2 * DEFAULT_RECONCILE_INTERVAL_MS)), "re-armed");
}

/// A stored figure changed behind the reserver's back (on hand, reserved) is found with its key
/// and both figures, and reported as a broken invariant by the punctuation.
#[test]
fn reconciliation_finds_a_corrupted_figure_with_both_values() {
    let mut h = harness();
    restock(&mut h, "a1", &[("P-001", 10), ("P-002", 5)]);
    feed(&mut h, "t", order("o1", "O-1", &[("P-002", 2)]), 0).unwrap();
    h.store.data.insert(stock_key(HQ, STORE, "P-001"), serde_json::to_vec(&StockRecord { on_hand: 7, reserved: 0 }).unwrap());
    h.store.data.insert(stock_key(HQ, STORE, "P-002"), serde_json::to_vec(&StockRecord { on_hand: 5, reserved: 1 }).unwrap());
    let key = |p: &str| format!("{HQ}:{STORE}/{p}");
    assert_eq!(
        reconciled(&h).mismatches,
        vec![
            reconcile::Mismatch { key: key("P-001"), rule: "on_hand", expected: 10, found: 7 },
            reconcile::Mismatch { key: key("P-002"), rule: "reserved", expected: 2, found: 1 },
        ]
    );
    h.advance(DEFAULT_RECONCILE_INTERVAL_MS).unwrap();
    let broken: Vec<&orderflow_api::Note> = h.notes.iter().filter(|n| n.measure == "conservation_mismatch").collect();
    assert_eq!(broken.len(), 2);
    assert!(broken.iter().all(|n| n.export == Export::InvariantBroken));
    assert_eq!(broken[0].label, format!("on_hand {}: expected 10, stored 7", key("P-001")));
    assert_eq!(notes(&h, "reconciliation"), vec!["mismatch"]);
    // Rule 2 as well: more reserved than on hand, a negative figure.
    h.store.data.insert(stock_key(HQ, STORE, "P-002"), serde_json::to_vec(&StockRecord { on_hand: -1, reserved: 2 }).unwrap());
    let rules: Vec<&str> = reconciled(&h).mismatches.iter().filter(|m| m.key == key("P-002")).map(|m| m.rule).collect();
    assert_eq!(rules, vec!["negative_on_hand", "on_hand", "reserved_above_on_hand"]);
}

/// Stock written before the ledger existed is not a mismatch: it is counted as unledgered, and
/// its next change opens the ledger at the figure it had.
#[test]
fn stock_older_than_the_ledger_opens_it_at_its_first_change() {
    let mut h = harness();
    h.store.data.insert(stock_key(HQ, STORE, "P-001"), serde_json::to_vec(&StockRecord { on_hand: 9, reserved: 0 }).unwrap());
    h.store.data.insert(store_registry_key(HQ, STORE), br#"{"firstAdjustment":""}"#.to_vec());
    assert_eq!((reconciled(&h).unledgered, reconciled(&h).mismatches.len()), (1, 0));
    feed(&mut h, "t", order("o1", "O-1", &[("P-001", 4)]), 0).unwrap();
    {
        let ev = complete(&h, "c1", "O-1");
        feed(&mut h, "t", ev, 0)
    }
    .unwrap();
    let report = reconciled(&h);
    assert_eq!((report.unledgered, report.mismatches.len()), (0, 0), "{report:?}");
    assert_eq!(
        h.store.get_json::<reconcile::Ledger>(&reconcile::ledger_key(HQ, STORE, "P-001")),
        Some(reconcile::Ledger { adjusted: 9, sold: 4 })
    );
}
