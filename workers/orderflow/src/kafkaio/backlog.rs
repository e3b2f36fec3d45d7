//! A consumer group's backlog on its inputs, counted by reading: the records a worker has not
//! processed yet. Consumer lag from offsets alone (high watermark − committed offset) also counts
//! transaction markers, which are never delivered, so "at rest" is decided here by reading the
//! records between the group's committed offset and the end (`read_committed`).

use std::time::Duration;

use anyhow::Result;
use orderflow_runtime::kafka::{client_config, Side};
use orderflow_runtime::topology::Topology;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use super::{Reader, Span, META_TIMEOUT};

/// How long [`backlog`] reads one partition without progress before calling it unreadable.
const READ_STALL: Duration = Duration::from_secs(5);

/// One input partition of a group: where the group stands and what waits after it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PartitionBacklog {
    pub topic: String,
    pub partition: i32,
    /// The group's committed offset (`None`: nothing committed; reading starts at the low
    /// watermark).
    pub committed: Option<i64>,
    /// The high watermark when read.
    pub high: i64,
    /// Records (markers excluded) from the committed offset to the high watermark; `None` when
    /// the end could not be reached within 5 s (a transaction still open on the partition).
    pub pending: Option<u64>,
}

/// The offset `group` committed for each of `partitions` of `topic` (`None` where nothing is).
/// Blocking.
///
/// Errors: the coordinator cannot be reached within 10 s.
pub fn committed_offsets(t: &Topology, group: &str, topic: &str, partitions: &[i32]) -> Result<Vec<Option<i64>>> {
    let client: BaseConsumer =
        client_config(&t.broker, Side::Consumer).set("group.id", group).set("enable.auto.commit", "false").create()?;
    let mut tpl = TopicPartitionList::new();
    for p in partitions {
        tpl.add_partition(topic, *p);
    }
    let got = client.committed_offsets(tpl, META_TIMEOUT)?;
    Ok(partitions
        .iter()
        .map(|p| match got.find_partition(topic, *p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => Some(o),
            _ => None,
        })
        .collect())
}

/// The backlog of `group` on every partition of `inputs`. Blocking.
///
/// Errors: metadata, watermark or committed-offset requests fail.
pub fn backlog(t: &Topology, group: &str, inputs: &[String]) -> Result<Vec<PartitionBacklog>> {
    let reader = Reader::new(&t.broker, "orderflow-backlog", "creating the backlog reader")?.stall_timeout(READ_STALL);
    let mut out = Vec::new();
    for topic in inputs {
        let partitions: Vec<i32> = (0..reader.partitions(topic)?).collect();
        let committed = committed_offsets(t, group, topic, &partitions)?;
        for (p, committed) in partitions.into_iter().zip(committed) {
            let (low, high) = reader.watermarks(topic, p)?;
            let start = committed.unwrap_or(low).max(low);
            let pending = if start >= high {
                Some(0)
            } else {
                let span = Span { topic: topic.clone(), partition: p, start, end: Some(high) };
                reader.collect(&[span], |_| ()).ok().map(|records| records.len() as u64)
            };
            out.push(PartitionBacklog { topic: topic.clone(), partition: p, committed, high, pending });
        }
    }
    Ok(out)
}
