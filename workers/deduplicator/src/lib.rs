//! Deduplicator: the repartition step in front of every join.
//!
//! Repeated `eventId`s are already dropped by the runtime (`orderflow_api::handle`, domain
//! rule 7), so by the time [`Deduplicator::process`] runs an event is new in its shard. This worker
//! re-keys every event that touches a store's stock by `hqId:storeId`
//! ([`Event::store_key`]), so the stock reserver sees all events of one store on one partition,
//! in order (domain rule 8), and can keep a store's stock in one state shard. It also re-keys the
//! order events the order joins need (`OrderCreated`, `OrderCancelled`) by `orderId` with
//! orderflow's partitioner (issue 19): an outside producer's partitioner (librdkafka's CRC32
//! default puts 5 keys in 6 elsewhere) or a missing or wrong record key then cannot split an
//! order over two partitions' states. Keys come from the event, never from the input record.
//!
//! # Layout
//!
//! - `lib.rs`: ports and [`Deduplicator`] (no settings of its own).
//! - `tests.rs`: unit tests through `orderflow_api::Harness`.

use orderflow_api::{Context, Event, Outputs, ProcessError, Processor, StateTxn};

/// The store-keyed command stream read by the stock reserver (`stock.commands`).
pub const PORT_OUT: &str = "out";
/// `OrderCreated` keyed by `orderId` (`order.created.repartition`, read by the canceller).
pub const PORT_CREATED: &str = "created";
/// `OrderCancelled` keyed by `orderId` (`order.cancelled.repartition`, read by the canceller,
/// the order confirmer and the reservation expirer).
pub const PORT_CANCELLED: &str = "cancelled";

/// Output ports this worker emits on (wire every one in `topology.toml`).
pub const PORTS: &[&str] = &[PORT_OUT, PORT_CREATED, PORT_CANCELLED];

/// Forwards stock-relevant events unchanged, re-keyed by store, and the order events of the
/// order joins re-keyed by order.
///
/// Forwarded: `OrderCreated`, `OrderCompleted`, `OrderCancelled`, `StockReservationExpired`,
/// `InventoryAdjusted` — the same event, same `eventId`, on port [`PORT_OUT`] with key
/// `hqId:storeId` ([`Event::command_key`]: `hqId:` for a `DISTRIBUTION` or an HQ-level movement); `OrderCreated` also on [`PORT_CREATED`] and `OrderCancelled` on
/// [`PORT_CANCELLED`], keyed `orderId`. Every other event type is ignored (no output).
/// Stateless apart from the runtime's `eventId` dedupe record.
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
    /// `hqId:storeId`, and an `OrderCreated` / `OrderCancelled` on `created` / `cancelled`, keyed
    /// `orderId`.
    ///
    /// Errors: [`ProcessError::Invalid`] when a forwarded event has an empty `hqId` or `storeId`
    /// (it could not be routed to its store) or, for the order events, an empty `orderId` (it
    /// belongs to no order; dead-lettered here, at the saga's entrance, rather than one hop
    /// later); [`ProcessError::UnwiredPort`] when a port it emits on is not wired.
    fn process(&mut self, _ctx: &Context, event: &Event, _state: &mut StateTxn, out: &mut Outputs) -> Result<(), ProcessError> {
        if !Self::forwards(event) {
            return Ok(());
        }
        if event.order_id() == Some("") {
            return Err(ProcessError::Invalid(format!("{} {}: empty orderId", event.schema_name(), event.event_id())));
        }
        let (hq, store) = event.store();
        // An admin movement of the HQ's own stock has no store (issue 16); everything else does.
        let hq_level = matches!(event, Event::InventoryAdjusted(_));
        if hq.is_empty() || (store.is_empty() && !hq_level) {
            return Err(ProcessError::Invalid(format!(
                "{} {} has an empty hqId or storeId (hqId={hq:?}, storeId={store:?}); it cannot be routed to a store",
                event.schema_name(),
                event.event_id()
            )));
        }
        out.emit(PORT_OUT, event.command_key(), event.clone())?;
        match event {
            Event::OrderCreated(e) => out.emit(PORT_CREATED, e.order_id.clone(), event.clone()),
            Event::OrderCancelled(e) => out.emit(PORT_CANCELLED, e.order_id.clone(), event.clone()),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests;
