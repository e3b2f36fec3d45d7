//! Deduplicator: the repartition step in front of the stock reserver.
//!
//! Repeated `eventId`s are already dropped by the runtime (`orderflow_api::handle`, domain
//! rule 7), so by the time [`Deduplicator::process`] runs an event is new in its shard. This worker
//! re-keys every event that touches a store's stock by `hqId:storeId`
//! ([`Event::store_key`]), so the stock reserver sees all events of one store on one partition,
//! in order (domain rule 8), and can keep a store's stock in one state shard.

use orderflow_api::{Context, Event, Outputs, ProcessError, Processor, StateTxn};

/// The only output port: the store-keyed command stream read by the stock reserver.
pub const PORT_OUT: &str = "out";

/// Output ports this worker emits on (wire every one in `topology.toml`).
pub const PORTS: &[&str] = &[PORT_OUT];

/// Forwards stock-relevant events unchanged, re-keyed by store.
///
/// Forwarded: `OrderCreated`, `OrderCompleted`, `OrderCancelled`, `StockReservationExpired`,
/// `InventoryAdjusted` — the same event, same `eventId`, on port [`PORT_OUT`] with key
/// `hqId:storeId`. Every other event type is ignored (no output). Stateless apart from the
/// runtime's `eventId` dedupe record.
#[derive(Debug, Default, Clone)]
pub struct Deduplicator;

impl Deduplicator {
    /// A deduplicator; it takes no configuration.
    pub fn new() -> Self {
        Deduplicator
    }

    /// Whether `event` is one the stock reserver consumes (and so is forwarded).
    pub fn forwards(event: &Event) -> bool {
        matches!(
            event,
            Event::OrderCreated(_)
                | Event::OrderCompleted(_)
                | Event::OrderCancelled(_)
                | Event::StockReservationExpired(_)
                | Event::InventoryAdjusted(_)
        )
    }
}

impl Processor for Deduplicator {
    /// Emits a forwarded event (see [`Deduplicator::forwards`]) unchanged on `out`, keyed
    /// `hqId:storeId`.
    ///
    /// Errors: [`ProcessError::Invalid`] when a forwarded event has an empty `hqId` or `storeId`
    /// (it could not be routed to its store) or, for the order events, an empty `orderId` (it
    /// belongs to no order; dead-lettered here, at the saga's entrance, rather than one hop
    /// later); [`ProcessError::UnwiredPort`] when `out` is not wired.
    fn process(&mut self, _ctx: &Context, event: &Event, _state: &mut StateTxn, out: &mut Outputs) -> Result<(), ProcessError> {
        if !Self::forwards(event) {
            return Ok(());
        }
        if event.order_id() == Some("") {
            return Err(ProcessError::Invalid(format!("{} {}: empty orderId", event.schema_name(), event.event_id())));
        }
        let (hq, store) = event.store();
        if hq.is_empty() || store.is_empty() {
            return Err(ProcessError::Invalid(format!(
                "{} {} has an empty hqId or storeId (hqId={hq:?}, storeId={store:?}); it cannot be routed to a store",
                event.schema_name(),
                event.event_id()
            )));
        }
        out.emit(PORT_OUT, event.store_key(), event.clone())
    }
}

#[cfg(test)]
mod tests {
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
            assert_eq!(outs.len(), 1, "{}", ev.schema_name());
            assert_eq!(outs[0].port, "out");
            assert_eq!(outs[0].key, "HQ-1:S-1");
            assert_eq!(outs[0].event, ev, "same event, same eventId");
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
            assert_eq!(outs.len(), 1, "{ev:?}");
            assert_eq!((outs[0].key.as_str(), &outs[0].event), (format!("HQ-1:{}", ev.store_id).as_str(), &Event::from(ev)));
        }
    }

    #[test]
    fn repeated_event_id_is_forwarded_once() {
        let mut h = harness();
        assert_eq!(h.feed("t", created("e1", "S-1"), 0).unwrap().len(), 1);
        assert!(h.feed("t", created("e1", "S-1"), 1).unwrap().is_empty());
    }

    #[test]
    fn unwired_port_is_an_error() {
        let mut h = Harness::new(Deduplicator::new(), &[]);
        assert!(matches!(h.feed("t", created("e1", "S-1"), 0), Err(ProcessError::UnwiredPort(_))));
    }
}
