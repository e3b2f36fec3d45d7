//! The stock hierarchy of seed 004 (issue 16) on the real broker, with the workers as a real
//! process that is SIGKILLed twice along the way:
//!
//! restock into the HQ → distribute to two stores → transfer between them (all through
//! `orderflow inventory`, one refused by the CLI and one refused by the reserver and
//! dead-lettered) → orders that need the HQ fallback (served, and one the HQ cannot cover) →
//! payments and cancellations (units from the HQ go back to it).
//!
//! The test keeps its own model of every figure and checks `stock.updated`, by its own reading:
//! per (HQ, product) the `hqStock` previous/current chain and per (store, product) the
//! `storeStock` chain are continuous (each row starts where the last ended), no figure is
//! negative, every eventId appears once, and the last rows equal the model: per product, HQ
//! total = unallocated + Σ stores and unallocated and every store as computed here.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{free_port, http_get, Guarded};
use orderflow_api::events::{OrderCancelled, OrderCompleted, OrderCreated, OrderItem, SoldItem, StockUpdated};
use orderflow_api::Event;
use rdkafka::message::Message;

const HQ: &str = "HQ-H16";
const S1: &str = "S-H16-1";
const S2: &str = "S-H16-2";
const P1: &str = "P-H16-1";
const P2: &str = "P-H16-2";
const STEP: Duration = Duration::from_secs(90);
const POLL: Duration = Duration::from_millis(200);

struct Run {
    topology: PathBuf,
    bootstrap: String,
    dir: PathBuf,
    port: u16,
    workers: Guarded,
    log: PathBuf,
    starts: usize,
}

impl Run {
    fn spawn(topology: &Path, bootstrap: &str, dir: &Path, port: u16, starts: usize) -> (Guarded, PathBuf) {
        let log = dir.join(format!("workers-{starts}.log"));
        let child = common::run_command(topology, bootstrap, "h16", port, &dir.join("state"), &log).spawn().expect("spawn");
        (Guarded::new(child, Duration::from_millis(50)), log)
    }

    fn ready(&mut self) {
        let port = self.port;
        common::wait_for("ready workers", &self.log.clone(), &mut self.workers, STEP, POLL, || {
            matches!(http_get(port, "/readyz"), Some((200, _))).then_some(())
        });
    }

    /// SIGKILL and start again on the same state.
    fn kill_and_restart(&mut self) {
        self.workers.kill_and_wait();
        self.starts += 1;
        let (w, log) = Run::spawn(&self.topology, &self.bootstrap, &self.dir, self.port, self.starts);
        self.workers = w;
        self.log = log;
        self.ready();
    }

    fn wait<T>(&mut self, what: &str, check: impl FnMut() -> Option<T>) -> T {
        common::wait_for(what, &self.log.clone(), &mut self.workers, STEP, POLL, check)
    }
}

fn inventory(bootstrap: &str, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--operator", "h16-test"];
    all.extend_from_slice(args);
    let out = common::ok(bootstrap, "inventory", &all);
    serde_json::from_str(out.trim()).expect("one JSON object")
}

fn order(k: &common::Kafka, id: &str, store: &str, product: &str, quantity: i32) {
    let e = OrderCreated {
        event_id: format!("created-{id}"),
        occurred_at: common::now_ms(),
        order_id: id.into(),
        customer_id: "C-H16".into(),
        hq_id: HQ.into(),
        store_id: store.into(),
        items: vec![OrderItem { product_id: product.into(), quantity, unit_price: 100 }],
    };
    k.produce_event("order.created", id, e.into());
}

fn events(k: &common::Kafka, topic: &str) -> Vec<Event> {
    common::read_topic(&k.broker, topic, 6).iter().filter_map(|m| k.codec.decode_local(m.payload()?).ok()).collect()
}

/// `stock.updated` rows of the test's HQ, per partition in offset order (one product's rows are
/// on one partition: its key).
fn updates(k: &common::Kafka) -> Vec<StockUpdated> {
    let mut msgs = common::read_topic(&k.broker, "stock.updated", 6);
    msgs.sort_by_key(|m| (m.partition(), m.offset()));
    msgs.iter()
        .filter_map(|m| match k.codec.decode_local(m.payload()?).ok()? {
            Event::StockUpdated(u) if u.hq_id == HQ => Some(u),
            _ => None,
        })
        .collect()
}

/// The last figures `stock.updated` shows: (HQ total, HQ unallocated, store on hand) per
/// product / (store, product).
#[derive(Debug, Default, PartialEq)]
struct Figures {
    total: BTreeMap<String, i64>,
    unallocated: BTreeMap<String, i64>,
    stores: BTreeMap<(String, String), i64>,
}

/// Checks the chains of `rows` (module docs) and returns the last figures.
fn figures(rows: &[StockUpdated]) -> Figures {
    let mut f = Figures::default();
    let mut seen = std::collections::BTreeSet::new();
    for u in rows {
        assert!(seen.insert(u.event_id.clone()), "stock.updated {} twice", u.event_id);
        let hq = u.hq_stock.unwrap_or_else(|| panic!("no hqStock in {u:?}"));
        let last_total = f.total.get(&u.product_id).copied().unwrap_or(0);
        assert_eq!(hq.previous, last_total, "HQ total chain of {} broken at {u:?}", u.product_id);
        assert!(hq.current >= 0 && u.store_stock.current >= 0, "negative figure in {u:?}");
        assert_eq!(u.change_amount, u.store_stock.current - u.store_stock.previous, "{u:?}");
        f.total.insert(u.product_id.clone(), hq.current);
        let slot = if u.store_id.is_empty() {
            f.unallocated.entry(u.product_id.clone()).or_insert(0)
        } else {
            f.stores.entry((u.store_id.clone(), u.product_id.clone())).or_insert(0)
        };
        assert_eq!(u.store_stock.previous, *slot, "{}/{} chain broken at {u:?}", u.store_id, u.product_id);
        *slot = u.store_stock.current;
    }
    f
}

/// The figures of the model: HQ unallocated `[P-1, P-2]`, S-1 `[P-1, P-2]`, S-2's P-1 (S-2
/// never holds P-2, so it has no row).
fn expected(unallocated: [i64; 2], s1: [i64; 2], s2_p1: i64) -> Figures {
    let mut f = Figures::default();
    for (i, p) in [P1, P2].iter().enumerate() {
        let s2 = if i == 0 { s2_p1 } else { 0 };
        f.unallocated.insert(p.to_string(), unallocated[i]);
        f.total.insert(p.to_string(), unallocated[i] + s1[i] + s2);
        f.stores.insert((S1.to_string(), p.to_string()), s1[i]);
    }
    f.stores.insert((S2.to_string(), P1.to_string()), s2_p1);
    f
}

fn reserved_of(k: &common::Kafka, order: &str) -> Option<String> {
    events(k, "stock.reserved").into_iter().find_map(|e| match e {
        Event::StockReserved(r) if r.order_id == order => Some(r.reservation_id),
        _ => None,
    })
}

fn failed(k: &common::Kafka, order: &str) -> bool {
    events(k, "stock.reservation.failed").iter().any(|e| matches!(e, Event::StockReservationFailed(f) if f.order_id == order))
}

#[test]
fn restock_distribute_transfer_fallback_sales_and_cancellations_keep_every_figure() {
    let broker = common::Broker::start();
    let dir = broker.dir().to_path_buf();
    let topology = common::topology_copy(&dir, "topology.toml", |t| t.to_string());
    common::create_topics(&topology, &broker.bootstrap);
    let port = free_port();
    let (workers, log) = Run::spawn(&topology, &broker.bootstrap, &dir, port, 0);
    let mut run = Run { topology, bootstrap: broker.bootstrap.clone(), dir: dir.clone(), port, workers, log, starts: 0 };
    run.ready();
    let k = common::Kafka::new(&broker.bootstrap);
    let b = broker.bootstrap.as_str();

    // Movements through the CLI.
    let restock =
        inventory(b, &["--reference", "RCV-1", "restock", "--hq", HQ, "--item", &format!("{P1}=100"), "--item", &format!("{P2}=40")]);
    assert_eq!((restock["key"].as_str(), restock["topic"].as_str()), (Some(format!("{HQ}:").as_str()), Some("inventory.adjusted")));
    inventory(
        b,
        &["--reference", "DST-1", "distribute", "--hq", HQ, "--store", S1, "--item", &format!("{P1}=20"), "--item", &format!("{P2}=10")],
    );
    inventory(b, &["--reference", "DST-2", "distribute", "--hq", HQ, "--store", S2, "--item", &format!("{P1}=5")]);
    inventory(b, &["--reference", "TRF-1", "transfer", "--hq", HQ, "--from", S1, "--to", S2, "--item", &format!("{P1}=5")]);
    // Refused before publishing (same store) and refused by the reserver (more than the HQ has).
    common::fails(
        b,
        "inventory",
        &["--reference", "TRF-X", "transfer", "--hq", HQ, "--from", S1, "--to", S1, "--item", "P=1"],
        "refused before publishing",
    );
    let too_much = inventory(b, &["--reference", "DST-X", "distribute", "--hq", HQ, "--store", S1, "--item", &format!("{P1}=1000")]);
    let moved = expected([75, 30], [15, 10], 10);
    run.wait("the movements on stock.updated", || (figures(&updates(&k)) == moved).then_some(()));
    let refused_id = too_much["eventId"].as_str().unwrap().to_string();
    run.wait("the refused distribution dead-lettered", || {
        let dlq = common::read_topic(&k.broker, "stock.commands.dlq", 6);
        dlq.iter()
            .any(|m| matches!(k.codec.decode_local(m.payload().unwrap_or_default()), Ok(e) if e.event_id() == refused_id))
            .then_some(())
    });

    // Orders: O-1 and O-4 and O-5 need the HQ, O-2 is more than the HQ has, O-3 is store-only.
    order(&k, "O-H16-1", S1, P1, 30);
    order(&k, "O-H16-2", S2, P1, 500);
    order(&k, "O-H16-3", S1, P2, 5);
    run.kill_and_restart();
    run.wait("the first orders answered", || {
        (reserved_of(&k, "O-H16-1").is_some() && reserved_of(&k, "O-H16-3").is_some() && failed(&k, "O-H16-2")).then_some(())
    });
    order(&k, "O-H16-4", S2, P1, 12);
    order(&k, "O-H16-5", S1, P2, 30);
    let ids = run.wait("every order answered", || {
        let ids: Vec<Option<String>> = ["O-H16-1", "O-H16-3", "O-H16-4", "O-H16-5"].iter().map(|o| reserved_of(&k, o)).collect();
        (ids.iter().all(Option::is_some) && failed(&k, "O-H16-2")).then(|| ids.into_iter().map(Option::unwrap).collect::<Vec<_>>())
    });
    assert!(reserved_of(&k, "O-H16-2").is_none(), "all or nothing: the order the HQ could not cover holds nothing");
    let Some(Event::StockReservationFailed(f)) = events(&k, "stock.reservation.failed")
        .into_iter()
        .find(|e| matches!(e, Event::StockReservationFailed(f) if f.order_id == "O-H16-2"))
    else {
        unreachable!()
    };
    // The store's 10 and the HQ's spare units: 75, or 60 when O-1's request reached the HQ first.
    assert_eq!(f.reason, "INSUFFICIENT_STOCK");
    assert!([10 + 75, 10 + 60].contains(&f.items[0].available), "{f:?}");
    // Units from the HQ: O-1 15, O-4 2, O-5 25 (P-2).
    run.wait("the fallbacks on stock.updated", || (figures(&updates(&k)) == expected([58, 5], [30, 35], 12)).then_some(()));

    // Payments (O-1, O-3) and POS cancellations (O-4, O-5: their HQ units go back).
    let pay = |order: &str, rid: &str, store: &str, product: &str, q: i32| OrderCompleted {
        event_id: format!("paid-{order}"),
        occurred_at: common::now_ms(),
        order_id: order.into(),
        reservation_id: rid.into(),
        hq_id: HQ.into(),
        store_id: store.into(),
        items: vec![SoldItem { product_id: product.into(), quantity: q, actual_price: 100 }],
        total_amount: 100 * i64::from(q),
    };
    let cancel = |order: &str, rid: &str, store: &str| OrderCancelled {
        event_id: format!("cancel-{order}"),
        occurred_at: common::now_ms(),
        order_id: order.into(),
        hq_id: HQ.into(),
        store_id: store.into(),
        reason: "PAYMENT_FAILED".into(),
        reservation_id: Some(rid.into()),
        customer_message: "payment failed".into(),
        refund_required: false,
        customer_id: None,
    };
    k.produce_event("order.completed", "O-H16-1", pay("O-H16-1", &ids[0], S1, P1, 30).into());
    k.produce_event("order.cancelled", "O-H16-4", cancel("O-H16-4", &ids[2], S2).into());
    run.kill_and_restart();
    k.produce_event("order.completed", "O-H16-3", pay("O-H16-3", &ids[1], S1, P2, 5).into());
    k.produce_event("order.cancelled", "O-H16-5", cancel("O-H16-5", &ids[3], S1).into());
    // P-1: S-1 30 sold (→ 0), S-2 12 → 10 with 2 back at HQ (58 → 60); P-2: S-1 35 − 5 sold − 25
    // back (→ 5), HQ 5 → 30. Totals: P-1 100 − 30 = 70, P-2 40 − 5 = 35.
    let last = expected([60, 30], [0, 5], 10);
    run.wait("the sales and returns on stock.updated", || (figures(&updates(&k)) == last).then_some(()));
    assert_eq!(last.total.get(P1), Some(&70));
    assert_eq!(last.total.get(P2), Some(&35));
    let sales: Vec<StockUpdated> = updates(&k).into_iter().filter(|u| u.change_reason == "SALE").collect();
    assert_eq!(sales.len(), 2, "one SALE row per paid product: {sales:?}");
    assert!(
        sales.iter().all(|u| u.hq_stock.is_some_and(|h| h.current - h.previous == u.change_amount)),
        "a sale lowers the HQ total with the store"
    );
}
