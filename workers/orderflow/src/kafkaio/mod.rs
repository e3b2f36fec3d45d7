//! The Kafka I/O every command uses, in one place: the topic [`Reader`] (partitions assigned, no
//! group membership, no commits) and [`blocking`] to call it from async code; watermarks,
//! partition counts and offsets by time ([`reader`]); the producers' murmur2 partitioner
//! (`orderflow_runtime::partitioner`, re-exported); RFC 3339 record times ([`time`]); a worker's state restored from its
//! changelog ([`restore_worker_state`]); the producers' size check ([`limits`]: every record
//! against its topic's limit before anything is produced); a group's unprocessed records
//! ([`backlog`]).

pub mod backlog;
pub mod limits;
pub mod reader;
pub mod time;

use std::time::Duration;

use anyhow::{Context as _, Result};

pub use orderflow_runtime::partitioner::{murmur2, partition_for};
pub use reader::{
    high_watermarks, offsets_for_time, partition_count, records_held, watermark_client, watermark_sums, watermarks, Reader, Span,
};
pub use time::{parse_rfc3339_ms, rfc3339};

/// How long a metadata, watermark or `offsets_for_times` request may take.
pub const META_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a [`Reader`] may go without progress before it gives up (default).
pub const STALL_TIMEOUT: Duration = Duration::from_secs(20);

/// The state of worker `worker` of topology `t` as its changelog holds it: every partition
/// (one per partition of its co-partitioned inputs) restored from the changelog alone into a new
/// store at `scratch` (emptied first), so a tool sees the durable copy of the state, whichever
/// processes wrote it. Blocking.
///
/// Errors: an unknown worker; the scratch store cannot be opened; a restore fails (broker,
/// corrupt changelog, 300 s).
pub fn restore_worker_state(
    t: &orderflow_runtime::topology::Topology,
    worker: &str,
    scratch: &std::path::Path,
) -> Result<Vec<orderflow_runtime::store::Shard>> {
    let spec = t.workers.get(worker).with_context(|| format!("worker {worker} is not in the topology"))?;
    let (broker, inputs) = (&t.broker, &spec.inputs);
    let partitions = inputs.iter().filter_map(|i| t.topics.get(i)).map(|s| s.partitions).max().unwrap_or(1);
    let _ = std::fs::remove_dir_all(scratch);
    let store = orderflow_runtime::store::Store::open(scratch).with_context(|| format!("opening {}", scratch.display()))?;
    let topic = orderflow_runtime::changelog::topic(worker);
    (0..partitions)
        .map(|p| {
            let shard = store.shard(p)?;
            orderflow_runtime::changelog::restore(broker, &topic, inputs, &shard, Duration::from_secs(300))
                .with_context(|| format!("restoring {topic}[{p}]"))?;
            Ok(shard)
        })
        .collect()
}

/// Runs blocking Kafka client calls off the async runtime.
///
/// Errors: `f`'s error, or `reader task panicked`.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.context("reader task panicked")?
}
