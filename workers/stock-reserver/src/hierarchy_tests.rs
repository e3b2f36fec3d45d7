//! Unit tests of the stock hierarchy (issue 16), in memory: one harness holds the HQ's and the
//! stores' shards, and every record the reserver writes to `stock.commands` is fed back to it,
//! as the runtime does through the topic.

use std::collections::VecDeque;

use orderflow_api::events::{InventoryAdjusted, StockLevel, StockUpdated};
use orderflow_api::fixtures::*;
use orderflow_api::{Harness, Output};

use super::*;

const TTL: i64 = 300_000;
const OTHER: &str = "S-2";

fn harness(policy: FallbackPolicy) -> Harness<StockReserver> {
    Harness::new(StockReserver::new(TTL).with_fallback(policy), PORTS)
}

/// Feeds `event`, then every `stock.commands` record it causes, until none is left; returns the
/// other outputs.
fn feed(h: &mut Harness<StockReserver>, event: impl Into<Event>) -> Result<Vec<Output>, ProcessError> {
    let mut queue: VecDeque<Output> = h.feed("stock.commands", event, 0)?.into();
    let mut outs = Vec::new();
    while let Some(o) = queue.pop_front() {
        if o.port == PORT_COMMANDS {
            assert_eq!(o.key, o.event.command_key(), "a protocol record goes to the shard that handles it");
            queue.extend(h.feed("stock.commands", o.event.clone(), 0)?);
        } else {
            outs.push(o);
        }
    }
    Ok(outs)
}

fn movement(id: &str, kind: &str, store: &str, items: &[(&str, i64)]) -> InventoryAdjusted {
    InventoryAdjusted {
        adjustment_type: kind.into(),
        store_id: store.into(),
        reference_id: format!("ref-{id}"),
        ..inventory_adjusted(id, 500, items)
    }
}

fn transfer(id: &str, from: &str, to: &str, items: &[(&str, i64)]) -> InventoryAdjusted {
    InventoryAdjusted { to_store_id: Some(to.into()), ..movement(id, "TRANSFER", from, items) }
}

fn hq(h: &Harness<StockReserver>, product: &str) -> HqStock {
    h.store.get_json(&hq_key(HQ, product)).unwrap_or_default()
}

fn store(h: &Harness<StockReserver>, s: &str, product: &str) -> StockRecord {
    h.store.get_json(&stock_key(HQ, s, product)).unwrap_or_default()
}

fn updates(outs: &[Output]) -> Vec<&StockUpdated> {
    outs.iter()
        .filter_map(|o| match &o.event {
            Event::StockUpdated(u) => {
                assert_eq!((o.port.as_str(), o.key.as_str()), (PORT_UPDATED, u.product_id.as_str()));
                Some(u)
            }
            _ => None,
        })
        .collect()
}

/// The order's answer among `outs`: its `stock.reserved` or `stock.reservation.failed`.
fn answer(outs: &[Output]) -> &Event {
    outs.iter()
        .map(|o| &o.event)
        .find(|e| matches!(e, Event::StockReserved(_) | Event::StockReservationFailed(_)))
        .unwrap_or_else(|| panic!("no answer in {outs:?}"))
}

fn level(previous: i64, current: i64) -> StockLevel {
    StockLevel { previous, current }
}

/// Seed 004: HQ total = unallocated + in transit + Σ stores, and at rest `stores` is exactly the
/// stores' on-hand units and nothing is in transit.
fn assert_conserved(h: &Harness<StockReserver>, product: &str, stores: &[&str]) {
    let figures = hq(h, product);
    let on_hand: i64 = stores.iter().map(|s| store(h, s, product).on_hand).sum();
    assert_eq!((figures.stores, figures.in_transit), (on_hand, 0), "{product}: {figures:?} vs stores {on_hand}");
    assert!(figures.unallocated >= 0, "{figures:?}");
}

/// 100 units at HQ, 30 distributed to S-1.
fn stocked(policy: FallbackPolicy) -> Harness<StockReserver> {
    let mut h = harness(policy);
    feed(&mut h, movement("r1", "RESTOCK", "", &[("P-1", 100)])).unwrap();
    feed(&mut h, movement("d1", "DISTRIBUTION", STORE, &[("P-1", 30)])).unwrap();
    h
}

#[test]
fn restock_arrives_at_hq_and_distribution_moves_it_to_a_store_keeping_the_total() {
    let mut h = harness(FallbackPolicy::default());
    let outs = feed(&mut h, movement("r1", "RESTOCK", "", &[("P-1", 100)])).unwrap();
    let u = updates(&outs);
    assert_eq!(u.len(), 1);
    assert_eq!((u[0].store_id.as_str(), u[0].store_stock, u[0].hq_stock), ("", level(0, 100), Some(level(0, 100))));
    assert_eq!(u[0].event_id, derive_event_id("r1", "stock.updated/P-1/hq"));
    assert_eq!(hq(&h, "P-1"), HqStock { unallocated: 100, in_transit: 0, stores: 0 });

    let outs = feed(&mut h, movement("d1", "DISTRIBUTION", STORE, &[("P-1", 30)])).unwrap();
    let u = updates(&outs);
    assert_eq!(u.len(), 2, "the HQ's row and the store's row");
    assert_eq!((u[0].store_id.as_str(), u[0].store_stock, u[0].hq_stock), ("", level(100, 70), Some(level(100, 100))));
    assert_eq!((u[1].store_id.as_str(), u[1].store_stock, u[1].hq_stock), (STORE, level(0, 30), Some(level(100, 100))));
    assert_eq!((u[1].change_reason.as_str(), u[1].reference_id.as_str()), ("DISTRIBUTION", "ref-d1"));
    assert_eq!(u[1].event_id, derive_event_id("d1", "stock.updated/P-1"));
    assert_eq!(hq(&h, "P-1"), HqStock { unallocated: 70, in_transit: 0, stores: 30 });
    assert_eq!(store(&h, STORE, "P-1").on_hand, 30);
    assert_conserved(&h, "P-1", &[STORE]);
}

#[test]
fn transfer_between_stores_leaves_the_hq_total_unchanged() {
    let mut h = stocked(FallbackPolicy::default());
    let outs = feed(&mut h, transfer("t1", STORE, OTHER, &[("P-1", 10)])).unwrap();
    let u = updates(&outs);
    assert_eq!(u.len(), 2);
    assert_eq!((u[0].store_id.as_str(), u[0].store_stock, u[0].change_amount), (STORE, level(30, 20), -10));
    assert_eq!((u[1].store_id.as_str(), u[1].store_stock, u[1].change_amount), (OTHER, level(0, 10), 10));
    assert!(u.iter().all(|u| u.hq_stock == Some(level(100, 100)) && u.change_reason == "TRANSFER"));
    assert_ne!(u[0].event_id, u[1].event_id);
    assert_conserved(&h, "P-1", &[STORE, OTHER]);
    assert_eq!(hq(&h, "P-1").total(), 100);
    // The receiving store is known now: an order there reserves.
    let outs = feed(&mut h, OrderCreated { store_id: OTHER.into(), ..order_created("o1", "O-1", 1_000, &[("P-1", 10)]) }).unwrap();
    assert!(matches!(answer(&outs), Event::StockReserved(_)), "{outs:?}");
}

#[test]
fn a_sale_lowers_the_store_and_the_hq_together() {
    let mut h = stocked(FallbackPolicy::default());
    let outs = feed(&mut h, order_created("o1", "O-1", 1_000, &[("P-1", 5)])).unwrap();
    let Event::StockReserved(r) = answer(&outs) else { panic!("{outs:?}") };
    let outs = feed(&mut h, order_completed("c1", "O-1", &r.reservation_id, 3_000)).unwrap();
    let u = updates(&outs);
    assert_eq!(u.len(), 1);
    assert_eq!((u[0].store_stock, u[0].hq_stock, u[0].change_reason.as_str()), (level(30, 25), Some(level(100, 95)), "SALE"));
    assert_eq!((u[0].event_id.clone(), u[0].reference_id.as_str()), (derive_event_id("c1", "stock.updated/P-1"), "O-1"));
    assert_conserved(&h, "P-1", &[STORE]);
}

#[test]
fn a_short_store_is_served_from_hq_stock_and_a_release_gives_those_units_back() {
    let mut h = stocked(FallbackPolicy::default());
    // 30 at the store, 70 at HQ: an order of 40 takes 10 from the HQ.
    let outs = feed(&mut h, order_created("o1", "O-1", 1_000, &[("P-1", 40)])).unwrap();
    let Event::StockReserved(r) = answer(&outs) else { panic!("{outs:?}") };
    assert_eq!((r.event_id.clone(), r.expires_at, r.items[0].reserved), (derive_event_id("o1", "stock.reserved"), 1_000 + TTL, 40));
    assert_eq!(store(&h, STORE, "P-1"), StockRecord { on_hand: 40, reserved: 40 });
    assert_eq!(hq(&h, "P-1"), HqStock { unallocated: 60, in_transit: 0, stores: 40 });
    let res = h.store.get_json::<Reservation>(&reservation_key("O-1")).unwrap();
    assert_eq!(
        (res.status, res.from_hq.clone()),
        (ReservationStatus::Live, vec![ReservationItem { product_id: "P-1".into(), quantity: 10 }])
    );
    let u = updates(&outs);
    assert!(u.iter().any(|u| u.store_id.is_empty() && u.store_stock == level(70, 60) && u.change_reason == "HQ_FALLBACK"));
    assert!(u.iter().any(|u| u.store_id == STORE && u.store_stock == level(30, 40) && u.hq_stock == Some(level(100, 100))));
    assert_conserved(&h, "P-1", &[STORE]);

    // Cancelled: the store's 30 become available again, the HQ's 10 go back to the HQ.
    let outs = feed(&mut h, order_cancelled("x1", "O-1", "PAYMENT_FAILED", 2_000)).unwrap();
    assert!(outs.iter().any(|o| matches!(o.event, Event::StockReservationReleased(_))));
    assert_eq!(store(&h, STORE, "P-1"), StockRecord { on_hand: 30, reserved: 0 });
    assert_eq!(hq(&h, "P-1"), HqStock { unallocated: 70, in_transit: 0, stores: 30 });
    assert!(updates(&outs).iter().any(|u| u.change_reason == "HQ_RETURN" && u.store_stock == level(40, 30)));
    assert_conserved(&h, "P-1", &[STORE]);
    assert_eq!(reconcile(&StateTxn::new(&h.store)).unwrap().mismatches, vec![]);
}

#[test]
fn a_partial_sale_of_a_fallback_reservation_returns_the_unsold_hq_units_first() {
    let mut h = stocked(FallbackPolicy::default());
    let outs = feed(&mut h, order_created("o1", "O-1", 1_000, &[("P-1", 40)])).unwrap();
    let Event::StockReserved(r) = answer(&outs) else { panic!("{outs:?}") };
    let paid = OrderCompleted {
        items: vec![orderflow_api::events::SoldItem { product_id: "P-1".into(), quantity: 25, actual_price: 100 }],
        ..order_completed("c1", "O-1", &r.reservation_id, 3_000)
    };
    feed(&mut h, paid).unwrap();
    // Sold 25 of 40; 15 unsold, 10 of them the HQ's.
    assert_eq!(store(&h, STORE, "P-1"), StockRecord { on_hand: 5, reserved: 0 });
    assert_eq!(hq(&h, "P-1"), HqStock { unallocated: 70, in_transit: 0, stores: 5 });
    assert_eq!(hq(&h, "P-1").total(), 75);
    assert_conserved(&h, "P-1", &[STORE]);
}

#[test]
fn hq_short_too_fails_the_order_whole_and_changes_nothing() {
    let mut h = stocked(FallbackPolicy::default());
    let outs = feed(&mut h, order_created("o1", "O-1", 1_000, &[("P-1", 101)])).unwrap();
    let Event::StockReservationFailed(f) = answer(&outs) else { panic!("{outs:?}") };
    assert_eq!((f.reason.as_str(), f.items[0].requested, f.items[0].available), ("INSUFFICIENT_STOCK", 101, 100));
    assert_eq!(f.event_id, derive_event_id("o1", "stock.reservation.failed"));
    assert_eq!(store(&h, STORE, "P-1"), StockRecord { on_hand: 30, reserved: 0 });
    assert_eq!(hq(&h, "P-1"), HqStock { unallocated: 70, in_transit: 0, stores: 30 });
    assert_eq!(h.store.get_json::<Reservation>(&reservation_key("O-1")).unwrap().status, ReservationStatus::Failed);
    // All or nothing across products: one line the HQ cannot cover fails the order.
    let outs = feed(&mut h, order_created("o2", "O-2", 1_000, &[("P-1", 35), ("P-2", 1)])).unwrap();
    assert!(matches!(answer(&outs), Event::StockReservationFailed(_)), "{outs:?}");
    assert_eq!(hq(&h, "P-1").unallocated, 70, "nothing taken from the HQ");
}

#[test]
fn the_policy_switches_fallback_off_per_hq_and_limits_it() {
    let off =
        FallbackPolicy { hqs: [(HQ.to_string(), HqOverride { enabled: Some(false), ..Default::default() })].into(), ..Default::default() };
    let mut h = stocked(off);
    let outs = feed(&mut h, order_created("o1", "O-1", 1_000, &[("P-1", 31)])).unwrap();
    assert!(matches!(answer(&outs), Event::StockReservationFailed(_)));
    assert_eq!(notes(&h, "hq_fallback"), Vec::<String>::new(), "never asked");

    let mut h = stocked(FallbackPolicy { keep_at_hq: 65, ..Default::default() });
    assert!(matches!(answer(&feed(&mut h, order_created("o1", "O-1", 1_000, &[("P-1", 36)])).unwrap()), Event::StockReservationFailed(_)));
    assert!(matches!(answer(&feed(&mut h, order_created("o2", "O-2", 1_000, &[("P-1", 35)])).unwrap()), Event::StockReserved(_)));

    let mut h = stocked(FallbackPolicy { max_units_per_order: 4, ..Default::default() });
    assert!(matches!(answer(&feed(&mut h, order_created("o1", "O-1", 1_000, &[("P-1", 35)])).unwrap()), Event::StockReservationFailed(_)));
    assert!(matches!(answer(&feed(&mut h, order_created("o2", "O-2", 1_000, &[("P-1", 34)])).unwrap()), Event::StockReserved(_)));
}

#[test]
fn an_hq_grant_for_an_order_closed_meanwhile_goes_back_to_the_hq() {
    let mut h = stocked(FallbackPolicy::default());
    // Step by step: the request is answered only after the order was cancelled.
    let request = h.feed("stock.commands", order_created("o1", "O-1", 1_000, &[("P-1", 40)]), 0).unwrap();
    assert_eq!(store(&h, STORE, "P-1").reserved, 0, "nothing held while the HQ answers");
    let grant = h.feed("stock.commands", request[0].event.clone(), 0).unwrap();
    assert_eq!(hq(&h, "P-1").in_transit, 10);
    feed(&mut h, order_cancelled("x1", "O-1", "PAYMENT_FAILED", 2_000)).unwrap();
    assert_eq!(store(&h, STORE, "P-1"), StockRecord { on_hand: 30, reserved: 0 });
    let grant = grant.into_iter().find(|o| o.port == PORT_COMMANDS).unwrap();
    feed(&mut h, grant.event).unwrap();
    assert_eq!(hq(&h, "P-1"), HqStock { unallocated: 70, in_transit: 0, stores: 30 });
    assert_eq!(store(&h, STORE, "P-1"), StockRecord { on_hand: 30, reserved: 0 });
    assert_conserved(&h, "P-1", &[STORE]);
}

#[test]
fn an_order_waiting_for_the_hq_blocks_no_other_order_and_fails_if_the_store_sold_its_part() {
    let mut h = stocked(FallbackPolicy::default());
    let request = h.feed("stock.commands", order_created("o1", "O-1", 1_000, &[("P-1", 40)]), 0).unwrap();
    // Meanwhile another order takes 25 of the store's 30: it is served, not blocked.
    let outs = feed(&mut h, order_created("o2", "O-2", 1_000, &[("P-1", 25)])).unwrap();
    assert!(matches!(answer(&outs), Event::StockReserved(_)), "{outs:?}");
    // The HQ grants O-1's 10, but the store's 30 are no longer there: O-1 fails, the 10 go back.
    let outs = feed(&mut h, request[0].event.clone()).unwrap();
    let Event::StockReservationFailed(f) = answer(&outs) else { panic!("{outs:?}") };
    assert_eq!((f.items[0].requested, f.items[0].available), (40, 15), "5 at the store + the 10 granted");
    assert_eq!(hq(&h, "P-1"), HqStock { unallocated: 70, in_transit: 0, stores: 30 });
    assert_eq!(store(&h, STORE, "P-1"), StockRecord { on_hand: 30, reserved: 25 });
    assert_conserved(&h, "P-1", &[STORE]);
}

#[test]
fn invalid_movements_are_rejected_whole_with_a_reason() {
    let mut h = stocked(FallbackPolicy::default());
    let rejected = |h: &mut Harness<StockReserver>, e: InventoryAdjusted, says: &str| {
        let before = h.store.data.clone();
        match feed(h, e) {
            Err(ProcessError::Invalid(m)) => assert!(m.contains(says), "{m}"),
            other => panic!("expected a rejection saying {says:?}, got {other:?}"),
        }
        assert_eq!(h.store.data, before, "nothing applied");
    };
    rejected(&mut h, movement("b1", "GIFT", STORE, &[("P-1", 1)]), "unknown adjustmentType");
    rejected(&mut h, movement("b2", "DISTRIBUTION", STORE, &[("P-1", 50), ("P-2", 1)]), "unallocated units of P-2");
    rejected(&mut h, movement("b3", "DISTRIBUTION", STORE, &[("P-1", 71)]), "unallocated units of P-1");
    rejected(&mut h, movement("b4", "RESTOCK", "", &[("P-1", -1)]), "must be positive");
    rejected(&mut h, movement("b5", "CORRECTION", STORE, &[("P-1", -1)]), "needs a reason");
    rejected(&mut h, transfer("b6", STORE, STORE, &[("P-1", 1)]), "different toStoreId");
    rejected(&mut h, transfer("b7", STORE, OTHER, &[("P-1", 31)]), "available units of P-1");
    rejected(&mut h, transfer("b8", "S-404", OTHER, &[("P-1", 1)]), "unknown store");
    rejected(&mut h, InventoryAdjusted { hq_id: "HQ-404".into(), ..movement("b9", "DISTRIBUTION", STORE, &[("P-1", 1)]) }, "unknown HQ");
    let over = InventoryAdjusted { reason: Some("count".into()), ..movement("b10", "CORRECTION", "", &[("P-1", -71)]) };
    rejected(&mut h, over, "unallocated units at -1");
    // A reasoned correction at the HQ applies.
    let ok = InventoryAdjusted { reason: Some("count".into()), ..movement("c1", "CORRECTION", "", &[("P-1", -70)]) };
    feed(&mut h, ok).unwrap();
    assert_eq!(hq(&h, "P-1"), HqStock { unallocated: 0, in_transit: 0, stores: 30 });
}

fn notes(h: &Harness<StockReserver>, measure: &str) -> Vec<String> {
    h.notes.iter().filter(|n| n.measure == measure).map(|n| n.label.clone()).collect()
}

#[test]
fn the_topology_policy_parses_with_per_hq_overrides() {
    let c: Config = toml::from_str(
        r#"
        [hq_fallback]
        keep_at_hq = 2
        [hq_fallback.hqs."HQ-9"]
        enabled = false
        "#,
    )
    .unwrap();
    assert_eq!(c.hq_fallback.for_hq("HQ-1"), (true, 2, 0));
    assert_eq!(c.hq_fallback.for_hq("HQ-9"), (false, 2, 0));
    assert!(toml::from_str::<Config>("[hq_fallback]\nkeep_at_hq = -1").unwrap().validate().is_err());
}

/// The cross-shard reconciliation (`orderflow reconcile`): after restock, distribution,
/// transfer, a fallback and a sale the HQ ledger matches its stores; a figure changed behind the
/// reserver's back is found, units in transit are judged only at rest, negatives always.
#[test]
fn hq_reconciliation_matches_the_stores_and_finds_a_tampered_ledger() {
    let mut h = stocked(FallbackPolicy::default());
    feed(&mut h, transfer("t1", STORE, OTHER, &[("P-1", 10)])).unwrap();
    // S-1 holds 20 after the transfer: 5 of the 25 come from the HQ.
    let outs = feed(&mut h, order_created("o1", "O-1", 1_000, &[("P-1", 25)])).unwrap();
    let Event::StockReserved(r) = answer(&outs) else { panic!("{outs:?}") };
    feed(&mut h, order_completed("c1", "O-1", &r.reservation_id, 3_000)).unwrap();
    assert_eq!(hq(&h, "P-1"), HqStock { unallocated: 65, in_transit: 0, stores: 10 });
    let check = |h: &Harness<StockReserver>, at_rest| reconcile_hqs(&[StateTxn::new(&h.store)], at_rest).unwrap();
    let clean = check(&h, true);
    assert_eq!((clean.records, clean.unledgered, clean.mismatches.len()), (1, 0, 0), "{clean:?}");
    assert_conserved(&h, "P-1", &[STORE, OTHER]);

    let key = format!("{HQ}/P-1");
    let good = hq(&h, "P-1");
    let tampered = HqStock { stores: good.stores + 3, in_transit: 2, ..good };
    h.store.data.insert(hq_key(HQ, "P-1"), serde_json::to_vec(&tampered).unwrap());
    let rules: Vec<(&str, i64, i64)> = check(&h, true).mismatches.iter().map(|m| (m.rule, m.expected, m.found)).collect();
    assert_eq!(rules, vec![("hq_in_transit", 0, 2), ("hq_stores", good.stores, good.stores + 3)]);
    assert!(check(&h, false).mismatches.is_empty(), "entries may be in flight when not at rest");

    h.store.data.insert(hq_key(HQ, "P-1"), serde_json::to_vec(&HqStock { unallocated: -1, ..good }).unwrap());
    let m = check(&h, false).mismatches;
    assert_eq!((m.len(), m[0].key.as_str(), m[0].rule), (1, key.as_str(), "negative_hq_unallocated"));
}
