//! `orderflow outbox`: the operator's view of the transactional outbox (issue 15, seed 003):
//! `list` rows (quarantined ones by default) with counts per status, `show` one row with its
//! payload, and `requeue` quarantined rows once their cause is fixed (their attempts reset, who
//! and when recorded in `requeued_by` / `requeued_at`; the relay publishes them on its next
//! claim). The database comes from `--database-url`, else `ORDERFLOW_DATABASE_URL`, else the
//! topology's outbox-relay worker (`--worker`, default the only one).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use clap::{Args, Subcommand, ValueEnum};
use outbox_relay::{ListFilter, OutboxRow, OutboxStore, Status};
use serde_json::json;

use crate::kafkaio::rfc3339;

/// `orderflow outbox` flags.
#[derive(Args, Debug)]
pub struct OutboxArgs {
    #[arg(long, default_value = "topology.toml", env = "ORDERFLOW_TOPOLOGY", global = true)]
    pub topology: PathBuf,
    /// The outbox-relay worker whose database to use (default: the topology's only one).
    #[arg(long, global = true)]
    pub worker: Option<String>,
    /// Database URL (postgres://, mysql://, mariadb://, sqlite:); overrides the worker's.
    #[arg(long, env = "ORDERFLOW_DATABASE_URL", global = true, hide_env_values = true)]
    pub database_url: Option<String>,
    #[command(subcommand)]
    pub action: OutboxAction,
}

/// Row statuses as flags.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum StatusArg {
    Pending,
    Completed,
    Quarantined,
    /// Every status.
    All,
}

/// `orderflow outbox` actions.
#[derive(Subcommand, Debug)]
pub enum OutboxAction {
    /// Rows of one status (default quarantined), oldest first, one JSON object per line, then the
    /// counts per status on stderr.
    List {
        #[arg(long, value_enum, default_value = "quarantined")]
        status: StatusArg,
        /// Only rows of this topic.
        #[arg(long)]
        topic: Option<String>,
        /// Only rows of this aggregate (orderId).
        #[arg(long)]
        aggregate: Option<String>,
        /// At most this many rows.
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
    /// One row in full, its payload parsed, as one JSON object.
    Show { id: i64 },
    /// Release quarantined rows back to PENDING with their attempts reset; rows in another status
    /// are left alone and named. Exit 1 if any id was not quarantined.
    Requeue {
        /// Row ids.
        #[arg(required = true)]
        ids: Vec<i64>,
        /// Who requeues (stored in requeued_by).
        #[arg(long, env = "USER")]
        operator: String,
    },
}

/// Runs an `orderflow outbox` action.
///
/// Errors: no database URL, the database unreachable, an unknown row; `requeue` of a row that
/// is not quarantined.
pub async fn run(args: OutboxArgs) -> Result<()> {
    let url = database_url(&args)?;
    let store = OutboxStore::connect(&url, 2, Duration::from_secs(10)).await.with_context(|| format!("connecting to {}", redact(&url)))?;
    store.migrate().await.context("applying the outbox migrations")?;
    match args.action {
        OutboxAction::List { status, topic, aggregate, limit } => {
            let status = match status {
                StatusArg::Pending => Some(Status::Pending),
                StatusArg::Completed => Some(Status::Completed),
                StatusArg::Quarantined => Some(Status::Quarantined),
                StatusArg::All => None,
            };
            let rows = store.list(&ListFilter { status, topic: topic.clone(), aggregate_id: aggregate, limit }).await?;
            for row in &rows {
                println!("{}", summary(row));
            }
            let stats = store.stats(topic.as_deref()).await?;
            let oldest = stats.oldest_pending_created_at.map(rfc3339).unwrap_or_else(|| "-".into());
            eprintln!(
                "{} row(s) listed; pending {}, quarantined {}, oldest pending {oldest}",
                rows.len(),
                stats.pending,
                stats.quarantined
            );
        }
        OutboxAction::Show { id } => {
            let row = store.show(id).await?.with_context(|| format!("no outbox row {id}"))?;
            let payload: serde_json::Value = serde_json::from_str(&row.payload).unwrap_or(serde_json::Value::String(row.payload.clone()));
            let mut v = summary(&row);
            v["payload"] = payload;
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        OutboxAction::Requeue { ids, operator } => {
            if operator.trim().is_empty() {
                bail!("--operator must name who requeues");
            }
            let released = store.requeue(&ids, &operator, outbox_relay::relay::now_ms()).await?;
            let skipped: Vec<i64> = ids.iter().copied().filter(|i| !released.contains(i)).collect();
            println!("{}", json!({ "requeued": released, "not_quarantined": skipped, "operator": operator }));
            if !skipped.is_empty() {
                bail!("{} row(s) were not quarantined and were left alone: {skipped:?}", skipped.len());
            }
        }
    }
    Ok(())
}

/// The URL in force: `--database-url` / `ORDERFLOW_DATABASE_URL`, else the outbox-relay worker's
/// `database_url` in the topology.
fn database_url(args: &OutboxArgs) -> Result<String> {
    if let Some(u) = args.database_url.as_ref().filter(|u| !u.is_empty()) {
        return Ok(u.clone());
    }
    let loaded = crate::topology::load_topology(&args.topology, None)?;
    let relays: Vec<(&String, _)> =
        loaded.topology.workers.iter().filter_map(|(n, w)| orderflow_kinds::relay_config(w).map(|c| (n, c))).collect();
    let config = match &args.worker {
        Some(w) => relays
            .iter()
            .find(|(n, _)| *n == w)
            .map(|(_, c)| c.clone())
            .with_context(|| format!("{w} is not an outbox-relay worker of the topology"))?,
        None => match relays.as_slice() {
            [(_, c)] => c.clone(),
            [] => bail!("the topology has no outbox-relay worker: pass --database-url"),
            _ => bail!("the topology has several outbox-relay workers: pass --worker"),
        },
    };
    Ok(config.url_in(&loaded.topology.defaults.state_dir))
}

/// A row as JSON without its payload, times as RFC 3339.
fn summary(row: &OutboxRow) -> serde_json::Value {
    json!({
        "id": row.id,
        "status": row.status,
        "aggregate_id": row.aggregate_id,
        "topic": row.topic,
        "event_type": row.event_type,
        "event_id": row.event_id,
        "retry_count": row.retry_count,
        "last_error": row.last_error,
        "created_at": rfc3339(row.created_at),
        "next_attempt_at": (row.next_attempt_at > 0).then(|| rfc3339(row.next_attempt_at)),
        "published_at": row.published_at.map(rfc3339),
        "requeued_at": row.requeued_at.map(rfc3339),
        "requeued_by": row.requeued_by,
    })
}

/// `url` without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            let user = creds.split(':').next().unwrap_or_default();
            format!("{}://{user}:***{}", &url[..s], &url[at..])
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn passwords_are_not_printed() {
        assert_eq!(redact("postgres://orderflow:secret@127.0.0.1:5432/db"), "postgres://orderflow:***@127.0.0.1:5432/db");
        assert_eq!(redact("sqlite://.state/outbox.db"), "sqlite://.state/outbox.db");
    }
}
