//! `orderflow reconcile`: the stock reserver's reconciliation (seed 004 재고 대사, issue 13) run
//! on demand over the durable copy of its state. Every partition of the stock reserver is
//! restored from its changelog into a scratch store and checked with
//! [`stock_reserver::reconcile`] (on hand = initial + adjustments − sales, reserved = Σ live
//! reservations, nothing negative). The workers run the same check as a punctuation over their
//! local stores every `reconcile_interval`.
//!
//! Output: one line per mismatch (partition, rule, key, expected and stored figures) and a
//! total, or one JSON object with `--json`. Exit status 1 when anything does not reconcile.

use std::path::PathBuf;

use anyhow::{bail, Context as _, Result};
use orderflow_api::StateTxn;
use serde_json::json;

use crate::topology::load_topology;

/// `orderflow reconcile` flags.
#[derive(clap::Args, Debug)]
pub struct ReconcileArgs {
    #[arg(long, default_value = "topology.toml", env = "ORDERFLOW_TOPOLOGY")]
    topology: PathBuf,
    /// Bootstrap servers (overrides the topology and ORDERFLOW_BOOTSTRAP).
    #[arg(long)]
    bootstrap: Option<String>,
    /// The stock reserver worker to reconcile (default: the topology's one of kind
    /// `stock-reserver`).
    #[arg(long)]
    worker: Option<String>,
    /// Where to restore the state (emptied first; default: a temporary directory removed after).
    #[arg(long)]
    scratch: Option<PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// Runs `orderflow reconcile`.
///
/// Errors: topology, restore (broker, changelog), unreadable state; and, after printing them,
/// any mismatch ("N mismatch(es)").
pub async fn run(args: ReconcileArgs) -> Result<()> {
    let loaded = load_topology(&args.topology, args.bootstrap.as_deref())?;
    let t = &loaded.topology;
    let (name, spec) = match &args.worker {
        Some(w) => (w.clone(), t.workers.get(w).with_context(|| format!("worker {w} is not in the topology"))?),
        None => t
            .workers
            .iter()
            .find(|(_, w)| w.kind == "stock-reserver")
            .map(|(n, w)| (n.clone(), w))
            .context("the topology has no worker of kind stock-reserver")?,
    };
    if spec.kind != "stock-reserver" {
        bail!("worker {name} is a {}, not a stock-reserver", spec.kind);
    }
    let temp = tempfile::tempdir()?;
    let scratch = args.scratch.clone().unwrap_or_else(|| temp.path().join("state"));
    let (topology, worker) = (t.clone(), name.clone());
    let reports = crate::kafkaio::blocking(move || {
        let shards = crate::kafkaio::restore_worker_state(&topology, &worker, &scratch)?;
        shards
            .iter()
            .map(|shard| {
                let report =
                    stock_reserver::reconcile(&StateTxn::new(shard)).map_err(|e| anyhow::anyhow!("partition {}: {e}", shard.partition))?;
                Ok((shard.partition, report))
            })
            .collect::<Result<Vec<_>>>()
    })
    .await?;
    let records: usize = reports.iter().map(|(_, r)| r.records).sum();
    let unledgered: usize = reports.iter().map(|(_, r)| r.unledgered).sum();
    let mismatches: usize = reports.iter().map(|(_, r)| r.mismatches.len()).sum();
    if args.json {
        let partitions: Vec<_> = reports.iter().map(|(p, r)| json!({"partition": p, "report": r})).collect();
        println!(
            "{}",
            json!({"worker": name, "stock_records": records, "unledgered": unledgered, "mismatches": mismatches, "partitions": partitions})
        );
    } else {
        for (p, r) in &reports {
            for m in &r.mismatches {
                println!("partition {p}: {m}");
            }
        }
        println!(
            "{name}: {records} stock records in {} partitions, {unledgered} without a ledger, {mismatches} mismatch(es)",
            reports.len()
        );
    }
    if mismatches > 0 {
        bail!("{mismatches} mismatch(es): stock figures of {name} do not reconcile");
    }
    Ok(())
}
