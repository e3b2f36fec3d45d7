//! The worker kinds, registered once: what `topology check` knows of each (its output ports,
//! which per-kind settings apply) and how its processor is built from a topology entry. The
//! `orderflow` binary (run, topology check, replay, bench) and the fuzz targets all take kinds
//! from here, so a new kind is added in one place.
//!
//! # Layout
//!
//! - `lib.rs`: [`KINDS`], [`ports`], [`build`].

use std::time::Duration;

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

/// The output ports of `kind`, if it is one of [`KINDS`].
pub fn ports(kind: &str) -> Option<&'static [&'static str]> {
    KINDS.iter().find(|k| k.name == kind).map(|k| k.ports)
}

/// Builds the processor of a worker from its topology entry: the reservation TTL (seed 004: 5
/// minutes unless the topology says otherwise) for the stock reserver and the reservation
/// expirer, the seed 001 clocks (3 and 10 minutes) for the canceller. Durations become
/// milliseconds, saturating at `i64::MAX`. `None` for an unknown kind (`topology check` reports
/// it before this is reached).
pub fn build(spec: &WorkerSpec) -> Option<Box<dyn Processor>> {
    let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
    let ttl_ms = ms(spec.reservation_ttl());
    Some(match spec.kind.as_str() {
        "deduplicator" => Box::new(deduplicator::Deduplicator::new()),
        "stock-reserver" => Box::new(stock_reserver::StockReserver::new(ttl_ms)),
        "order-confirmer" => Box::new(order_confirmer::OrderConfirmer::new()),
        "canceller" => Box::new(canceller::Canceller::new(ms(spec.stock_answer_timeout()), ms(spec.saga_timeout()))),
        "reservation-expirer" => Box::new(reservation_expirer::ReservationExpirer::new(ttl_ms)),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every registered kind builds, and nothing else does.
    #[test]
    fn every_kind_builds_and_only_those() {
        for k in KINDS {
            let spec: WorkerSpec = toml::from_str(&format!("kind = \"{}\"\ninputs = []\n", k.name)).expect("a worker entry");
            assert!(build(&spec).is_some(), "{} does not build", k.name);
            assert_eq!(ports(k.name), Some(k.ports));
        }
        let spec: WorkerSpec = toml::from_str("kind = \"nope\"\ninputs = []\n").unwrap();
        assert!(build(&spec).is_none());
        assert_eq!(ports("nope"), None);
    }
}
