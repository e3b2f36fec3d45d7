//! The topic reader: a consumer that assigns itself partitions ([`Reader`]) and reads bounded or
//! unbounded [`Span`]s of them; and the metadata queries on a plain consumer the benchmarks and
//! the demo use ([`watermarks`], [`watermark_sums`], [`partition_count`], [`offsets_for_time`]).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use orderflow_runtime::kafka::{client_config, Side};
use orderflow_runtime::topology::BrokerConfig;
use orderflow_runtime::worker::now_ms;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{Offset, TopicPartitionList};

use super::{META_TIMEOUT, STALL_TIMEOUT};

/// Offsets of one partition to read: `start` up to `end` (exclusive), or on forever (`None`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    pub topic: String,
    pub partition: i32,
    pub start: i64,
    pub end: Option<i64>,
}

/// A consumer that reads partitions it assigns itself (`read_committed`, the consumer default):
/// a throwaway `group.id`, no group membership, no commits. Shared by `dlq`, `inspect` and
/// `replay`. Blocking: call it from [`blocking`](super::blocking), `spawn_blocking` or a thread.
pub struct Reader {
    consumer: BaseConsumer,
    stall: Duration,
}

impl Reader {
    /// A reader whose `group.id` is `<group>-<pid>-<now ms>`, giving up a bounded read after
    /// [`STALL_TIMEOUT`] without progress (see [`Reader::stall_timeout`]).
    ///
    /// Errors: the client cannot be created (the error says `what`, e.g. `creating the reader`).
    pub fn new(broker: &BrokerConfig, group: &str, what: &'static str) -> Result<Reader> {
        let mut config = client_config(broker, Side::Consumer);
        // Required by librdkafka, never joined: partitions are assigned and nothing is committed.
        config.set("group.id", format!("{group}-{}-{}", std::process::id(), now_ms()));
        config.set("enable.auto.commit", "false");
        Ok(Reader { consumer: config.create().context(what)?, stall: STALL_TIMEOUT })
    }

    /// The same reader giving up after `stall` without progress.
    pub fn stall_timeout(self, stall: Duration) -> Reader {
        Reader { stall, ..self }
    }

    /// The underlying consumer (metadata and offset queries the reader does not wrap).
    pub fn consumer(&self) -> &BaseConsumer {
        &self.consumer
    }

    /// Every topic on the broker with its partition count (topics with a metadata error left out).
    ///
    /// Errors: the metadata request fails or times out (10 s).
    pub fn broker_topics(&self) -> Result<BTreeMap<String, i32>> {
        let md = self.consumer.fetch_metadata(None, META_TIMEOUT).context("asking the broker for its topics")?;
        Ok(md.topics().iter().filter(|t| t.error().is_none()).map(|t| (t.name().to_string(), t.partitions().len() as i32)).collect())
    }

    /// The `(low, high)` watermarks of `topic[partition]`.
    ///
    /// Errors: the request fails or times out (10 s), naming `topic[partition]`.
    pub fn watermarks(&self, topic: &str, partition: i32) -> Result<(i64, i64)> {
        watermarks(&self.consumer, topic, partition)
    }

    /// Partitions of `topic` on the broker ([`partition_count`]).
    ///
    /// Errors: those of [`partition_count`].
    pub fn partitions(&self, topic: &str) -> Result<i32> {
        partition_count(&self.consumer, topic)
    }

    /// The first offset of each of `partitions` of `topic` whose timestamp is at or after `ms`
    /// ([`offsets_for_time`]).
    ///
    /// Errors: those of [`offsets_for_time`].
    pub fn offsets_for_time(&self, topic: &str, partitions: &[i32], ms: i64) -> Result<BTreeMap<i32, Option<i64>>> {
        offsets_for_time(&self.consumer, topic, partitions, ms)
    }

    /// Bounded spans of `partitions` of `topic`: from the low to the high watermark now.
    ///
    /// Errors: a watermark request fails.
    pub fn spans_to_end(&self, topic: &str, partitions: impl IntoIterator<Item = i32>) -> Result<Vec<Span>> {
        partitions
            .into_iter()
            .map(|p| {
                let (low, high) = self.watermarks(topic, p)?;
                Ok(Span { topic: topic.to_string(), partition: p, start: low, end: Some(high) })
            })
            .collect()
    }

    /// Every record of bounded `spans`, each turned into a `T` by `f`, in the order read (offset
    /// order within a partition; partitions interleave).
    ///
    /// Errors: those of [`Reader::scan`].
    pub fn collect<T>(&self, spans: &[Span], mut f: impl FnMut(&BorrowedMessage<'_>) -> T) -> Result<Vec<T>> {
        let mut out = Vec::new();
        self.scan(
            spans,
            || true,
            |m| {
                out.push(f(m));
                true
            },
        )?;
        Ok(out)
    }

    /// Reads `spans`, giving each record in `[start, end)` to `sink` (in offset order within a
    /// partition; partitions interleave) until every bounded span is done and no span is
    /// unbounded, `sink` returns `false`, or `alive` returns `false` (checked between polls).
    /// Offsets without a record (transaction markers, aborted or compacted records) can end a
    /// span: the consumer's position passing its end ends it too.
    ///
    /// Errors: assigning the partitions; no progress for the stall timeout while only bounded
    /// spans remain (broker unreachable, or an open transaction holding a `read_committed` reader
    /// back), naming the spans still waited for and the last consumer error.
    pub fn scan(&self, spans: &[Span], alive: impl Fn() -> bool, mut sink: impl FnMut(&BorrowedMessage<'_>) -> bool) -> Result<()> {
        let spans: Vec<&Span> = spans.iter().filter(|s| s.end.is_none_or(|e| s.start < e)).collect();
        if spans.is_empty() {
            return Ok(());
        }
        let mut pending: BTreeMap<(String, i32), (i64, Option<i64>)> =
            spans.iter().map(|s| ((s.topic.clone(), s.partition), (s.start, s.end))).collect();
        let mut tpl = TopicPartitionList::new();
        for s in &spans {
            tpl.add_partition_offset(&s.topic, s.partition, Offset::Offset(s.start))?;
        }
        self.consumer.assign(&tpl)?;
        let mut progress = Instant::now();
        let mut last_error = None;
        while !pending.is_empty() && alive() {
            match self.consumer.poll(Duration::from_millis(200)) {
                Some(Ok(m)) => {
                    let k = (m.topic().to_string(), m.partition());
                    let Some(&(start, end)) = pending.get(&k) else { continue };
                    progress = Instant::now();
                    if m.offset() >= start && end.is_none_or(|e| m.offset() < e) && !sink(&m) {
                        break;
                    }
                    if end.is_some_and(|e| m.offset() >= e - 1) {
                        pending.remove(&k);
                    }
                }
                Some(Err(e)) => last_error = Some(e),
                None => {
                    if let Ok(pos) = self.consumer.position() {
                        for e in pos.elements() {
                            let k = (e.topic().to_string(), e.partition());
                            if let (Offset::Offset(o), Some((_, Some(end)))) = (e.offset(), pending.get(&k)) {
                                if o >= *end {
                                    pending.remove(&k);
                                }
                            }
                        }
                    }
                    let following = pending.values().any(|(_, end)| end.is_none());
                    if !following && !pending.is_empty() && progress.elapsed() > self.stall {
                        let waiting: Vec<String> =
                            pending.iter().map(|((t, p), (_, end))| format!("{t}[{p}] up to offset {}", end.unwrap_or(0) - 1)).collect();
                        bail!(
                            "reading made no progress for {}s; still waiting for {} (broker unreachable, or an open transaction holds read_committed readers back){}",
                            self.stall.as_secs(),
                            waiting.join(", "),
                            last_error.map(|e| format!("; last error: {e}")).unwrap_or_default()
                        );
                    }
                }
            }
        }
        let _ = self.consumer.unassign();
        Ok(())
    }
}

/// A plain consumer for metadata and watermark queries: `group.id` `group`, never joined.
///
/// Errors: the client cannot be created.
pub fn watermark_client(broker: &BrokerConfig, group: &str) -> Result<BaseConsumer> {
    Ok(client_config(broker, Side::Consumer).set("group.id", group).create()?)
}

/// The `(low, high)` watermarks of `topic[partition]`.
///
/// Errors: the request fails or times out (10 s), naming `topic[partition]`.
pub fn watermarks(consumer: &BaseConsumer, topic: &str, partition: i32) -> Result<(i64, i64)> {
    consumer.fetch_watermarks(topic, partition, META_TIMEOUT).with_context(|| format!("watermarks of {topic}[{partition}]"))
}

/// Sums over partitions 0..`partitions` of `topic`'s (low, high) watermarks: high − low is the
/// records it holds now (after retention and compaction), high alone the records ever written.
///
/// Errors: a watermark request fails.
pub fn watermark_sums(consumer: &BaseConsumer, topic: &str, partitions: i32) -> Result<(i64, i64)> {
    let (mut lows, mut highs) = (0, 0);
    for p in 0..partitions {
        let (low, high) = watermarks(consumer, topic, p)?;
        lows += low;
        highs += high;
    }
    Ok((lows, highs))
}

/// Sum over partitions 0..`partitions` of the high watermarks of `topic` (records written since
/// it was created).
///
/// Errors: a watermark request fails.
pub fn high_watermarks(consumer: &BaseConsumer, topic: &str, partitions: i32) -> Result<i64> {
    Ok(watermark_sums(consumer, topic, partitions)?.1)
}

/// Records `topic` holds now: Σ (high − low) over partitions 0..`partitions`.
///
/// Errors: a watermark request fails.
pub fn records_held(consumer: &BaseConsumer, topic: &str, partitions: i32) -> Result<i64> {
    let (low, high) = watermark_sums(consumer, topic, partitions)?;
    Ok(high - low)
}

/// Partitions of `topic` on the broker.
///
/// Errors: the metadata request fails, or names an error for `topic` (e.g. it does not exist).
pub fn partition_count(consumer: &BaseConsumer, topic: &str) -> Result<i32> {
    let md = consumer.fetch_metadata(Some(topic), META_TIMEOUT).with_context(|| format!("metadata of {topic}"))?;
    let t = md.topics().first().with_context(|| format!("no metadata for {topic}"))?;
    if let Some(e) = t.error() {
        bail!("topic {topic}: {e:?}");
    }
    Ok(t.partitions().len() as i32)
}

/// The first offset of each of `partitions` of `topic` whose record's timestamp is at or after
/// `ms` (`offsets_for_times`), `None` where the broker has no such record.
///
/// Errors: the request fails or times out, or names an error for a partition.
pub fn offsets_for_time(consumer: &BaseConsumer, topic: &str, partitions: &[i32], ms: i64) -> Result<BTreeMap<i32, Option<i64>>> {
    let mut tpl = TopicPartitionList::new();
    for &p in partitions {
        tpl.add_partition_offset(topic, p, Offset::Offset(ms))?;
    }
    let found = consumer.offsets_for_times(tpl, META_TIMEOUT).with_context(|| format!("offsets_for_times of {topic}"))?;
    let mut out = BTreeMap::new();
    for e in found.elements() {
        if let Err(err) = e.error() {
            bail!("offsets_for_times of {topic}[{}]: {err}", e.partition());
        }
        out.insert(
            e.partition(),
            match e.offset() {
                Offset::Offset(o) if o >= 0 => Some(o),
                _ => None,
            },
        );
    }
    Ok(out)
}
