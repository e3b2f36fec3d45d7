//! Deduplicator: the repartition step in front of the stock reserver.
//!
//! Repeated `eventId`s are already dropped by the runtime (`orderflow_api::handle`, domain
//! rule 7), so by the time [`Deduplicator::process`] runs an event is new in its shard. This worker
//! re-keys every event that touches a store's stock by `hqId:storeId`
//! ([`Event::store_key`]), so the stock reserver sees all events of one store on one partition,
//! in order (domain rule 8), and can keep a store's stock in one state shard.
//!
//! # Layout
//!
//! - `lib.rs`: ports and [`Deduplicator`] (no settings of its own).
//! - `tests.rs`: unit tests through `orderflow_api::Harness`.

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
mod tests;
