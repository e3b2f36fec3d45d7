//! The Kafka I/O every command uses, in one place: the topic [`Reader`] (partitions assigned, no
//! group membership, no commits) and [`blocking`] to call it from async code; watermarks,
//! partition counts and offsets by time ([`reader`]); the producers' murmur2 partitioner
//! ([`partitioner`]); and RFC 3339 record times ([`time`]).

pub mod partitioner;
pub mod reader;
pub mod time;

use std::time::Duration;

use anyhow::{Context as _, Result};

pub use partitioner::{murmur2, partition_for};
pub use reader::{
    high_watermarks, offsets_for_time, partition_count, records_held, watermark_client, watermark_sums, watermarks, Reader, Span,
};
pub use time::{parse_rfc3339_ms, rfc3339};

/// How long a metadata, watermark or `offsets_for_times` request may take.
pub const META_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a [`Reader`] may go without progress before it gives up (default).
pub const STALL_TIMEOUT: Duration = Duration::from_secs(20);

/// Runs blocking Kafka client calls off the async runtime.
///
/// Errors: `f`'s error, or `reader task panicked`.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.context("reader task panicked")?
}
