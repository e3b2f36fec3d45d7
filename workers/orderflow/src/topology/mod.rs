//! `orderflow topology check|graph` and `orderflow topics`, and the topology loading every
//! command shares: [`load_topology`] (checked, with a `--bootstrap` override) and
//! [`override_ttl`] (a `--reservation-ttl` / `--ttl` override).

use std::path::Path;

use anyhow::{bail, Result};
use orderflow_kinds as kinds;
use orderflow_runtime::topology::{self, Loaded};

/// Loads and checks the topology, applying a `--bootstrap` override.
pub fn load_topology(path: &Path, bootstrap: Option<&str>) -> Result<Loaded> {
    let mut loaded = topology::load_checked(path, kinds::KINDS)?;
    if let Some(b) = bootstrap {
        loaded.topology.broker.bootstrap = b.to_string();
    }
    Ok(loaded)
}

/// Sets the reservation TTL of every worker whose kind uses one.
pub fn override_ttl(loaded: &mut Loaded, ttl: std::time::Duration) {
    for w in loaded.topology.workers.values_mut() {
        kinds::set_reservation_ttl(w, ttl);
    }
}

/// `orderflow topology check FILE`: reports every problem of the topology at once.
///
/// Errors: the file cannot be loaded; any problem (each printed to stderr first).
pub fn check(file: &Path) -> Result<()> {
    let loaded = topology::load(file)?;
    let problems = topology::check(&loaded, kinds::KINDS);
    if problems.is_empty() {
        println!("{}: ok ({} topics, {} workers)", file.display(), loaded.topology.topics.len(), loaded.topology.workers.len());
        Ok(())
    } else {
        for p in &problems {
            eprintln!("error: {p}");
        }
        bail!("{}: {} problem(s)", file.display(), problems.len())
    }
}

/// `orderflow topology graph FILE`: prints the wiring as a Mermaid flowchart.
///
/// Errors: the file cannot be loaded.
pub fn graph(file: &Path) -> Result<()> {
    let loaded = topology::load(file)?;
    print!("{}", topology::mermaid(&loaded.topology));
    Ok(())
}

/// `orderflow topics`: creates the topics the topology declares (and each input's dead-letter
/// topic).
///
/// Errors: topology, broker.
pub async fn create_topics(path: &Path, bootstrap: Option<&str>) -> Result<()> {
    let loaded = load_topology(path, bootstrap)?;
    let created = orderflow_runtime::kafka::create_topics(&loaded.topology).await?;
    println!("created {} topic(s): {}", created.len(), created.join(", "));
    Ok(())
}

/// The stock reserver a command works on: worker `named`, or the topology's one of kind
/// `stock-reserver` (`orderflow reconcile`, `orderflow api`).
///
/// Errors: `named` is not in the topology or is not a stock reserver; no stock reserver at all.
pub fn stock_reserver<'a>(t: &'a topology::Topology, named: Option<&str>) -> Result<(String, &'a topology::WorkerSpec)> {
    let (name, spec) = match named {
        Some(w) => (w.to_string(), t.workers.get(w).ok_or_else(|| anyhow::anyhow!("worker {w} is not in the topology"))?),
        None => t
            .workers
            .iter()
            .find(|(_, w)| w.kind == "stock-reserver")
            .map(|(n, w)| (n.clone(), w))
            .ok_or_else(|| anyhow::anyhow!("the topology has no worker of kind stock-reserver"))?,
    };
    if spec.kind != "stock-reserver" {
        bail!("worker {name} is a {}, not a stock-reserver", spec.kind);
    }
    Ok((name, spec))
}
