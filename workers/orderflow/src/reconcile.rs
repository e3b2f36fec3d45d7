//! `orderflow reconcile`: the stock reserver's reconciliation (seed 004 재고 대사, issue 13) run
//! on demand over the durable copy of its state. Every partition of the stock reserver is
//! restored from its changelog into a scratch store and checked with
//! [`stock_reserver::reconcile`] (on hand = initial + adjustments − sales, reserved = Σ live
//! reservations, nothing negative). The workers run the same check as a punctuation over their
//! local stores every `reconcile_interval`.
//!
//! Across partitions (issue 16, seed 004) every HQ's ledger is checked against its stores with
//! [`stock_reserver::reconcile_hqs`]: the ledger's `stores` = Σ the stores' on hand and nothing in
//! transit. Those two rules are judged only **at rest**: the reserver's consumer group has no
//! record waiting on its inputs (read from its committed offset to the end, before and after the
//! restore, at the same offsets); otherwise the output says what is in flight and they are skipped.
//! Negative HQ figures are mismatches either way.
//!
//! Output: one line per mismatch (partition or `HQ`, rule, key, expected and stored figures), a
//! not-at-rest line when the cross-shard rules were skipped, and a total, or one JSON object with `--json`. Exit status 1 when anything does not reconcile.

use std::path::PathBuf;

use anyhow::{bail, Result};
use orderflow_api::StateTxn;
use serde_json::json;

use crate::kafkaio::backlog::{backlog, PartitionBacklog};
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
    let (name, spec) = crate::topology::stock_reserver(t, args.worker.as_deref())?;
    let temp = tempfile::tempdir()?;
    let scratch = args.scratch.clone().unwrap_or_else(|| temp.path().join("state"));
    let (topology, worker, group, inputs) = (t.clone(), name.clone(), spec.group_id(&name), spec.inputs.clone());
    let (reports, hq, rest) = crate::kafkaio::blocking(move || {
        // The cross-shard HQ rules hold only with nothing in flight between the shards: the
        // group's backlog is read before and after the restore, and the state counts as at rest
        // when both are empty at the same committed offsets.
        let before = backlog(&topology, &group, &inputs)?;
        let shards = crate::kafkaio::restore_worker_state(&topology, &worker, &scratch)?;
        let after = backlog(&topology, &group, &inputs)?;
        let rest = AtRest::judge(&before, &after);
        let states: Vec<StateTxn> = shards.iter().map(|s| StateTxn::new(s)).collect();
        let reports = shards
            .iter()
            .zip(&states)
            .map(|(shard, state)| {
                let report = stock_reserver::reconcile(state).map_err(|e| anyhow::anyhow!("partition {}: {e}", shard.partition))?;
                Ok((shard.partition, report))
            })
            .collect::<Result<Vec<_>>>()?;
        let hq = stock_reserver::reconcile_hqs(&states, rest.at_rest).map_err(|e| anyhow::anyhow!("HQ figures: {e}"))?;
        Ok((reports, hq, rest))
    })
    .await?;
    let records: usize = reports.iter().map(|(_, r)| r.records).sum();
    let unledgered: usize = reports.iter().map(|(_, r)| r.unledgered).sum();
    let mismatches: usize = reports.iter().map(|(_, r)| r.mismatches.len()).sum::<usize>() + hq.mismatches.len();
    if args.json {
        let partitions: Vec<_> = reports.iter().map(|(p, r)| json!({"partition": p, "report": r})).collect();
        println!(
            "{}",
            json!({"worker": name, "stock_records": records, "unledgered": unledgered, "mismatches": mismatches, "partitions": partitions,
                   "hq": hq, "at_rest": rest.at_rest, "backlog": rest.backlog})
        );
    } else {
        for (p, r) in &reports {
            for m in &r.mismatches {
                println!("partition {p}: {m}");
            }
        }
        for m in &hq.mismatches {
            println!("HQ: {m}");
        }
        if !rest.at_rest {
            println!("not at rest ({}): the HQ ledgers' stores and in-transit figures were not judged", rest.describe());
        }
        println!(
            "{name}: {records} stock records in {} partitions, {unledgered} without a ledger; {} HQ records ({} store figures without one); {mismatches} mismatch(es)",
            reports.len(),
            hq.records,
            hq.unledgered
        );
    }
    if mismatches > 0 {
        bail!("{mismatches} mismatch(es): stock figures of {name} do not reconcile");
    }
    Ok(())
}

/// Whether the stock reserver's state was read with nothing in flight: its group's backlog on
/// every input partition, as read before and after the restore.
struct AtRest {
    at_rest: bool,
    /// The backlog read after the restore.
    backlog: Vec<PartitionBacklog>,
    /// Partitions whose committed offset moved during the restore.
    moved: Vec<String>,
}

impl AtRest {
    fn judge(before: &[PartitionBacklog], after: &[PartitionBacklog]) -> AtRest {
        let moved: Vec<String> = before
            .iter()
            .zip(after)
            .filter(|(b, a)| b.committed != a.committed)
            .map(|(b, _)| format!("{}[{}]", b.topic, b.partition))
            .collect();
        let idle = before.iter().chain(after).all(|b| b.pending == Some(0));
        AtRest { at_rest: idle && moved.is_empty() && before.len() == after.len(), backlog: after.to_vec(), moved }
    }

    fn describe(&self) -> String {
        let mut parts: Vec<String> = self
            .backlog
            .iter()
            .filter(|b| b.pending != Some(0))
            .map(|b| match b.pending {
                Some(n) => format!("{n} records waiting on {}[{}]", b.topic, b.partition),
                None => format!("{}[{}] unreadable to its end (an open transaction?)", b.topic, b.partition),
            })
            .collect();
        if !self.moved.is_empty() {
            parts.push(format!("the group committed meanwhile on {}", self.moved.join(", ")));
        }
        parts.join("; ")
    }
}
