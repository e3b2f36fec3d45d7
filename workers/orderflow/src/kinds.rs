//! The worker kinds this binary can run: their ports (for `topology check`) and constructors.

use orderflow_api::Processor;
use orderflow_runtime::topology::{KindInfo, WorkerSpec};

/// Every kind, as `topology check` knows them.
pub const KINDS: &[KindInfo] = &[
    KindInfo { name: "deduplicator", ports: deduplicator::PORTS, uses_ttl: false, uses_saga_timeouts: false },
    KindInfo { name: "stock-reserver", ports: stock_reserver::PORTS, uses_ttl: true, uses_saga_timeouts: false },
    KindInfo { name: "order-confirmer", ports: order_confirmer::PORTS, uses_ttl: false, uses_saga_timeouts: false },
    KindInfo { name: "canceller", ports: canceller::PORTS, uses_ttl: false, uses_saga_timeouts: true },
    KindInfo { name: "reservation-expirer", ports: reservation_expirer::PORTS, uses_ttl: true, uses_saga_timeouts: false },
];

/// The ports of `kind`, if known.
pub fn ports(kind: &str) -> Option<&'static [&'static str]> {
    KINDS.iter().find(|k| k.name == kind).map(|k| k.ports)
}

/// Builds the processor of a worker from its topology entry. `None` for an unknown kind
/// (`topology check` reports it before this is reached).
pub fn build(spec: &WorkerSpec) -> Option<Box<dyn Processor>> {
    let ttl_ms = spec.reservation_ttl().as_millis() as i64;
    Some(match spec.kind.as_str() {
        "deduplicator" => Box::new(deduplicator::Deduplicator::new()),
        "stock-reserver" => Box::new(stock_reserver::StockReserver::new(ttl_ms)),
        "order-confirmer" => Box::new(order_confirmer::OrderConfirmer::new()),
        // Seed 001 clocks (3 and 10 minutes unless the topology says otherwise).
        "canceller" => {
            Box::new(canceller::Canceller::new(spec.stock_answer_timeout().as_millis() as i64, spec.saga_timeout().as_millis() as i64))
        }
        "reservation-expirer" => Box::new(reservation_expirer::ReservationExpirer::new(ttl_ms)),
        _ => return None,
    })
}
