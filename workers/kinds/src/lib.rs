//! The worker kinds, registered once: what `topology check` knows of each (its output ports,
//! how its own settings are parsed and checked) and how its processor is built from a topology
//! entry. Each kind's settings are a config type beside its crate (`stock_reserver::Config`,
//! `canceller::Config`, ...), parsed here from the entry's keys beyond the common ones
//! (`WorkerSpec::settings`). The `orderflow` binary (run, topology check, replay, bench) and the
//! fuzz targets all take kinds from here, so a new kind is added in one place.
//!
//! # Layout
//!
//! - `lib.rs`: [`KINDS`], [`ports`], [`build`], and the settings every kind-aware command
//!   needs: [`reservation_ttl`], [`set_reservation_ttl`], [`timer_horizon`].

use std::time::Duration;

use orderflow_api::Processor;
use orderflow_runtime::topology::{KindInfo, WorkerSpec};
use serde::de::DeserializeOwned;

/// Every kind, as `topology check` knows them.
pub const KINDS: &[KindInfo] = &[
    KindInfo { name: "deduplicator", ports: deduplicator::PORTS, settings: KindInfo::no_settings, reads_external: true, source: false },
    KindInfo { name: "stock-reserver", ports: stock_reserver::PORTS, settings: reserver_settings, reads_external: false, source: false },
    KindInfo {
        name: "order-confirmer",
        ports: order_confirmer::PORTS,
        settings: KindInfo::no_settings,
        reads_external: false,
        source: false,
    },
    KindInfo { name: "canceller", ports: canceller::PORTS, settings: canceller_settings, reads_external: false, source: false },
    KindInfo {
        name: "reservation-expirer",
        ports: reservation_expirer::PORTS,
        settings: ttl_settings,
        reads_external: false,
        source: false,
    },
    KindInfo { name: outbox_relay::KIND, ports: outbox_relay::PORTS, settings: relay_settings, reads_external: false, source: true },
];

/// The output ports of `kind`, if it is one of [`KINDS`].
pub fn ports(kind: &str) -> Option<&'static [&'static str]> {
    KINDS.iter().find(|k| k.name == kind).map(|k| k.ports)
}

/// Parses a worker's settings table into its kind's config type.
///
/// Errors: serde's message (an unknown key names the keys the kind has; a bad duration the
/// value).
fn parse<C: DeserializeOwned>(settings: &toml::Table) -> Result<C, String> {
    toml::Value::Table(settings.clone()).try_into().map_err(|e: toml::de::Error| e.message().to_string())
}

/// The stock reserver's and the expirer's settings: the TTL, which both must agree on.
fn ttl_settings(t: &toml::Table) -> Result<Vec<(&'static str, String)>, String> {
    let c: orderflow_api::ReservationTtlConfig = parse(t)?;
    c.ttl_ms()?;
    Ok(vec![("reservation_ttl", humantime::format_duration(c.reservation_ttl).to_string())])
}

/// The stock reserver's settings: the TTL (which must agree with the expirer's) and the
/// reconciliation interval.
fn reserver_settings(t: &toml::Table) -> Result<Vec<(&'static str, String)>, String> {
    let c: stock_reserver::Config = parse(t)?;
    c.validate()?;
    Ok(vec![("reservation_ttl", humantime::format_duration(c.reservation_ttl).to_string())])
}

/// The outbox relay's settings (issue 15; seed 003: 6 attempts before quarantine).
fn relay_settings(t: &toml::Table) -> Result<Vec<(&'static str, String)>, String> {
    parse::<outbox_relay::Config>(t)?.validate().map(|()| Vec::new())
}

/// The outbox relay's settings of a worker entry, seed defaults where the entry has none; `None`
/// for another kind or settings the kind rejects (`topology check` reports those).
pub fn relay_config(spec: &WorkerSpec) -> Option<outbox_relay::Config> {
    (spec.kind == outbox_relay::KIND).then(|| parse::<outbox_relay::Config>(&spec.settings).ok()).flatten()
}

fn canceller_settings(t: &toml::Table) -> Result<Vec<(&'static str, String)>, String> {
    parse::<canceller::Config>(t)?.validate().map(|()| Vec::new())
}

/// Builds the processor of a worker from its topology entry, with its kind's settings (seed
/// defaults where the entry has none). `None` for an unknown kind, a source kind (the outbox
/// relay, which runs no processor: [`relay_config`]) or settings the kind rejects (`topology
/// check` reports both before this is reached).
pub fn build(spec: &WorkerSpec) -> Option<Box<dyn Processor>> {
    let s = &spec.settings;
    Some(match spec.kind.as_str() {
        "deduplicator" => Box::new(deduplicator::Deduplicator::new()),
        "stock-reserver" => Box::new(parse::<stock_reserver::Config>(s).ok()?.processor().ok()?),
        "order-confirmer" => Box::new(order_confirmer::OrderConfirmer::new()),
        "canceller" => Box::new(parse::<canceller::Config>(s).ok()?.processor()),
        "reservation-expirer" => {
            Box::new(reservation_expirer::ReservationExpirer::new(parse::<reservation_expirer::Config>(s).ok()?.ttl_ms().ok()?))
        }
        _ => return None,
    })
}

/// The reservation TTL of a worker whose kind has one (stock reserver, reservation expirer;
/// seed 004 default 5 minutes), else `None`.
pub fn reservation_ttl(spec: &WorkerSpec) -> Option<Duration> {
    match spec.kind.as_str() {
        "stock-reserver" => parse::<stock_reserver::Config>(&spec.settings).ok().map(|c| c.reservation_ttl),
        "reservation-expirer" => parse::<reservation_expirer::Config>(&spec.settings).ok().map(|c| c.reservation_ttl),
        _ => None,
    }
}

/// Overrides the reservation TTL of a worker whose kind has one (`orderflow run
/// --reservation-ttl`, `replay --through ... --reservation-ttl`); returns whether it applied.
pub fn set_reservation_ttl(spec: &mut WorkerSpec, ttl: Duration) -> bool {
    let applies = reservation_ttl(spec).is_some();
    if applies {
        spec.set_duration("reservation_ttl", ttl);
    }
    applies
}

/// The longest a worker's timers reach ahead of the input that scheduled them: its reservation
/// TTL, or the canceller's saga bound (the longer of its two clocks); zero for kinds without
/// timers. `replay --diff` widens its window of live outputs by it.
pub fn timer_horizon(spec: &WorkerSpec) -> Duration {
    match spec.kind.as_str() {
        "canceller" => parse::<canceller::Config>(&spec.settings).map(|c| c.saga_timeout.max(c.stock_answer_timeout)).unwrap_or_default(),
        _ => reservation_ttl(spec).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use orderflow_runtime::topology::{check, parse as parse_topology};

    fn spec(text: &str) -> WorkerSpec {
        toml::from_str(text).expect("a worker entry")
    }

    /// Every registered kind builds with its defaults, and nothing else does.
    #[test]
    fn every_kind_builds_and_only_those() {
        for k in KINDS {
            let spec = spec(&format!("kind = \"{}\"\ninputs = []\n", k.name));
            assert_eq!(build(&spec).is_some(), !k.source, "{} builds a processor iff it is not a source", k.name);
            assert_eq!(relay_config(&spec).is_some(), k.source, "{}", k.name);
            assert_eq!(ports(k.name), Some(k.ports));
            assert_eq!((k.settings)(&spec.settings).map(|_| ()), Ok(()), "{}: defaults are accepted", k.name);
        }
        assert!(build(&spec("kind = \"nope\"\ninputs = []\n")).is_none());
        assert_eq!(ports("nope"), None);
    }

    /// Settings are the kind's own: parsed with seed defaults, unknown keys and broken rules
    /// named, the TTL shared by the stock reserver and the expirer reported for agreement.
    #[test]
    fn settings_are_parsed_and_checked_by_their_kind() {
        let reserver = spec("kind = \"stock-reserver\"\ninputs = []\nreservation_ttl = \"90s\"\n");
        assert_eq!(reservation_ttl(&reserver), Some(Duration::from_secs(90)));
        assert_eq!(ttl_settings(&reserver.settings), Ok(vec![("reservation_ttl", "1m 30s".to_string())]));
        let expirer = spec("kind = \"reservation-expirer\"\ninputs = []\n");
        assert_eq!(reservation_ttl(&expirer), Some(orderflow_api::DEFAULT_RESERVATION_TTL), "seed 004: 5 minutes");
        let canceller = spec("kind = \"canceller\"\ninputs = []\n");
        assert_eq!(timer_horizon(&canceller), Duration::from_secs(600), "seed 001: the 10-minute saga bound");
        assert_eq!(reservation_ttl(&canceller), None);

        let bad = spec("kind = \"canceller\"\ninputs = []\nstock_answer_timeout = \"10m\"\nsaga_timeout = \"3m\"\n");
        assert_eq!(
            canceller_settings(&bad.settings),
            Err("stock_answer_timeout 10m must be at least 1 ms and shorter than saga_timeout 3m".into())
        );
        let stray = spec("kind = \"deduplicator\"\ninputs = []\nreservation_ttl = \"1m\"\n");
        assert!(KindInfo::no_settings(&stray.settings).unwrap_err().contains("reservation_ttl"));
        let typo = spec("kind = \"stock-reserver\"\ninputs = []\nreservation_tll = \"1m\"\n");
        let e = ttl_settings(&typo.settings).unwrap_err();
        assert!(e.contains("reservation_tll") && e.contains("reservation_ttl"), "names the key and the known one: {e}");
        let zero = spec("kind = \"reservation-expirer\"\ninputs = []\nreservation_ttl = \"0s\"\n");
        assert!(ttl_settings(&zero.settings).unwrap_err().contains("at least 1 ms"));

        let mut over = expirer.clone();
        assert!(set_reservation_ttl(&mut over, Duration::from_secs(3600)));
        assert_eq!(reservation_ttl(&over), Some(Duration::from_secs(3600)));
        let mut c = canceller.clone();
        assert!(!set_reservation_ttl(&mut c, Duration::from_secs(3600)), "the canceller has no TTL");
        assert!(c.settings.is_empty());
    }

    /// The project's topology passes the registry's checks, and a TTL that differs between the
    /// reserver and the expirer does not.
    #[test]
    fn the_topology_passes_and_differing_ttls_do_not() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let path = root.join("topology.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let loaded = parse_topology(&text, &path).unwrap();
        assert_eq!(check(&loaded, KINDS), vec![]);
        let mut loaded = loaded;
        let expirer = loaded.topology.workers.values_mut().find(|w| w.kind == "reservation-expirer").unwrap();
        expirer.set_duration("reservation_ttl", Duration::from_secs(61));
        let problems: Vec<String> = check(&loaded, KINDS).iter().map(|p| p.to_string()).collect();
        assert!(problems.iter().any(|p| p.contains("reservation_ttl") && p.contains("differs") && p.contains("1m 1s")), "{problems:#?}");
    }
}
