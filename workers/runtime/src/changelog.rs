//! Changelog topics: the durable copy of every worker's state store.
//!
//! Each worker has one compacted changelog topic, `orderflow-<worker>-changelog`, co-partitioned
//! with its inputs (changelog partition N holds the state of input partition N). A unit of work
//! writes, per input partition it touched, one record per state change and then one *commit
//! marker*; they are produced and acknowledged together with the unit's outputs, before the
//! local store is written.
//!
//! Record layout (key / value):
//! - state write: `d<key>` / `[1][offsets][value]`; state delete: `d<key>` / null (tombstone);
//! - timer set: `t<key>` / `[1][offsets][deadline i64 BE]`; timer cancel: `t<key>` / null;
//! - commit marker: `m[1][offsets]` / `[1][offsets][seen]`, where `[seen]` is the `eventId`s the
//!   unit remembered in this partition (state keys under [`orderflow_api::SEEN_PREFIX`]): `u32 BE
//!   n` then n × (`u16 BE` length, key without the prefix, `u16 BE` length, value); a unit that
//!   remembered none writes `m` / `[1][offsets]` (the one marker key compaction may thin out, as
//!   every marker was before markers carried `eventId`s).
//!
//! `[offsets]` is the unit's input position in this partition, `u8 n` then n × (`u8` index of
//! the input topic in the worker's `inputs`, `i64 BE` next offset): every non-tombstone record
//! carries the input offsets it came from. Restore applies records when it reaches a commit
//! marker; records after the last marker are dropped and reported as *orphans*.
//!
//! Why remembered `eventId`s ride in the marker: each input remembers its `eventId` (domain rule
//! 7), and as a record of its own that was one broker write per input on top of the outputs and
//! the state it changed (issue 7 measured it: the deduplicator wrote 2.0 records per input, the
//! order confirmer 3.0). In the marker they cost one write per unit and partition. Such a
//! marker's key carries the unit's offsets, so markers of different units are different keys and
//! compaction keeps every one of them (as it kept every remembered `eventId` record before; a
//! redone unit over the same range rewrites the same key with the same `eventId`s); a unit that
//! never committed has no marker, so its `eventId`s are never remembered. A marker
//! whose `[seen]` would pass [`MAX_MARKER_SEEN_BYTES`] leaves the rest as ordinary `d` records.
//!
//! Remembered `eventId`s are forgotten after the worker's `state_retention` a marker at a time
//! (module [`retention`](crate::retention)): the unit that forgets them deletes the marker's
//! local index entry, written here as the marker's tombstone (`m[1][offsets]` / null); the ids'
//! own deletions and the index are local and never written. A restore that meets a marker
//! tombstone forgets the ids that marker brought.
//!
//! Orphans are the records of a unit that never committed (the instance crashed, or the broker did
//! not take all of the unit's records): that unit's inputs are processed again, so its writes must
//! not survive. They are neutralised by *compensation*: the next unit the worker commits for that
//! partition also writes, for every orphan key it does not write itself, the key's committed value
//! (or a tombstone / timer cancel). Those records come after the orphans and before the next
//! marker, so a later restore applies the committed value over the orphan, and log compaction
//! (the topic is compacted) keeps the later record. A per-unit begin marker would not survive
//! compaction, which keeps only the newest record of each key.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use orderflow_api::Changes;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use crate::kafka::{client_config, Side};
use crate::store::{Shard, StoreError};
use crate::topology::BrokerConfig;

/// Version byte every non-tombstone changelog value starts with.
pub const VERSION: u8 = 1;
/// First key byte of a state write / delete record: `d<key>`.
pub const TAG_DATA: u8 = b'd';
/// First key byte of a timer set / cancel record: `t<key>`.
pub const TAG_TIMER: u8 = b't';
/// First key byte of a commit marker (`m[1][offsets]`; a bare `m` in older changelogs).
pub const TAG_MARKER: u8 = b'm';
/// Largest `[seen]` part of one marker, bytes; remembered `eventId`s past it are written as `d`
/// records (module docs). Keeps markers well under the broker's `message.max.bytes` (1 MiB).
pub const MAX_MARKER_SEEN_BYTES: usize = 512 * 1024;

/// Name of worker `worker`'s changelog topic.
pub fn topic(worker: &str) -> String {
    format!("orderflow-{worker}-changelog")
}

/// One changelog record to produce: `value == None` is a tombstone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
}

fn encode_offsets(inputs: &[String], offsets: &BTreeMap<String, i64>) -> Vec<u8> {
    let mut v = vec![VERSION, 0];
    for (topic, next) in offsets {
        if let Some(i) = inputs.iter().position(|t| t == topic) {
            v.push(i as u8);
            v.extend_from_slice(&next.to_be_bytes());
            v[1] += 1;
        }
    }
    v
}

/// Decodes a changelog value `[1][n][n × (u8 input index, i64 BE next offset)][payload]` (module
/// docs) into the input offsets (`topic → next offset`, topics named through `inputs`, the
/// worker's input topics in topology order) and the rest of the value (the state value, the
/// timer deadline, or nothing for a marker).
///
/// Errors: a first byte other than [`VERSION`] (or a value shorter than 2 bytes), offsets
/// truncated, an input index `inputs` lacks.
pub fn decode_offsets<'a>(inputs: &[String], value: &'a [u8]) -> Result<(BTreeMap<String, i64>, &'a [u8]), String> {
    if value.len() < 2 || value[0] != VERSION {
        return Err(format!("unknown changelog record version {:?}", value.first()));
    }
    let n = value[1] as usize;
    let body = &value[2..];
    if body.len() < n * 9 {
        return Err("truncated changelog offsets".into());
    }
    let mut offsets = BTreeMap::new();
    for i in 0..n {
        let entry = &body[i * 9..i * 9 + 9];
        let topic = inputs.get(entry[0] as usize).ok_or_else(|| format!("changelog names input #{} the worker lacks", entry[0]))?;
        offsets.insert(topic.clone(), i64::from_be_bytes(entry[1..9].try_into().expect("8 bytes")));
    }
    Ok((offsets, &body[n * 9..]))
}

/// The records of one partition's unit: every state write and timer change, then the marker,
/// which carries the unit's remembered `eventId`s (module docs).
pub fn records(inputs: &[String], changes: &Changes, offsets: &BTreeMap<String, i64>) -> Vec<Record> {
    let prefix = encode_offsets(inputs, offsets);
    let with_prefix = |payload: &[u8]| {
        let mut v = prefix.clone();
        v.extend_from_slice(payload);
        v
    };
    let mut out = Vec::with_capacity(changes.writes.len() + changes.timers.len() + 1);
    let mut seen: Vec<(&[u8], &[u8])> = Vec::new();
    let mut seen_bytes = 4;
    for (k, v) in &changes.writes {
        if crate::retention::is_local(k) || (v.is_none() && orderflow_api::is_seen_key(k)) {
            // The marker index is local; forgotten ids go with their marker's tombstone.
            if let (None, Some(marker)) = (v, crate::retention::indexed_marker(k)) {
                out.push(Record { key: marker.to_vec(), value: None });
            }
            continue;
        }
        if let (Some(v), Some(id)) = (v, k.strip_prefix(orderflow_api::SEEN_PREFIX)) {
            let size = 4 + id.len() + v.len();
            if id.len() <= u16::MAX as usize && v.len() <= u16::MAX as usize && seen_bytes + size <= MAX_MARKER_SEEN_BYTES {
                seen.push((id, v));
                seen_bytes += size;
                continue;
            }
        }
        let mut key = vec![TAG_DATA];
        key.extend_from_slice(k);
        out.push(Record { key, value: v.as_deref().map(with_prefix) });
    }
    for (k, at) in &changes.timers {
        let mut key = vec![TAG_TIMER];
        key.extend_from_slice(k);
        out.push(Record { key, value: at.map(|at| with_prefix(&at.to_be_bytes())) });
    }
    let mut key = vec![TAG_MARKER];
    if !seen.is_empty() {
        key.extend_from_slice(&prefix);
    }
    let mut marker = prefix;
    if !seen.is_empty() {
        marker.reserve(seen_bytes);
        marker.extend_from_slice(&(seen.len() as u32).to_be_bytes());
        for (id, v) in seen {
            marker.extend_from_slice(&(id.len() as u16).to_be_bytes());
            marker.extend_from_slice(id);
            marker.extend_from_slice(&(v.len() as u16).to_be_bytes());
            marker.extend_from_slice(v);
        }
    }
    out.push(Record { key, value: Some(marker) });
    out
}

/// Remembered `eventId`s of a marker: full state keys (under [`orderflow_api::SEEN_PREFIX`]) and
/// their values, in key order.
pub type Seen = Vec<(Vec<u8>, Vec<u8>)>;

/// The remembered `eventId`s a marker record carries (empty for any other record): for the
/// committing unit to index its marker ([`crate::retention::index`]) without the worker's inputs.
pub fn marker_seen(record: &Record) -> Seen {
    match (record.key.first(), &record.value) {
        (Some(&TAG_MARKER), Some(v)) if v.len() >= 2 => {
            v.get(2 + v[1] as usize * 9..).and_then(|body| decode_seen(body).ok()).unwrap_or_default()
        }
        _ => Vec::new(),
    }
}

/// Decodes the `[seen]` part of a marker value (module docs) into full state keys and values.
fn decode_seen(mut body: &[u8]) -> Result<Seen, String> {
    if body.is_empty() {
        return Ok(Vec::new());
    }
    let truncated = || "truncated remembered eventIds in a commit marker".to_string();
    let mut take = |n: usize| -> Result<&[u8], String> {
        let (head, rest) = body.split_at_checked(n).ok_or_else(truncated)?;
        body = rest;
        Ok(head)
    };
    let n = u32::from_be_bytes(take(4)?.try_into().expect("4 bytes")) as usize;
    let mut seen = Vec::with_capacity(n.min(1 << 16));
    for _ in 0..n {
        let len = u16::from_be_bytes(take(2)?.try_into().expect("2 bytes")) as usize;
        let mut key = orderflow_api::SEEN_PREFIX.to_vec();
        key.extend_from_slice(take(len)?);
        let len = u16::from_be_bytes(take(2)?.try_into().expect("2 bytes")) as usize;
        seen.push((key, take(len)?.to_vec()));
    }
    if !body.is_empty() {
        return Err("trailing bytes after the remembered eventIds of a commit marker".into());
    }
    Ok(seen)
}

/// One decoded changelog record (keys without their tag byte).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// `d<key>`: a state write (`value: Some`, with the unit's input `offsets`) or a delete (a
    /// tombstone: `value: None`, no offsets).
    Data { key: Vec<u8>, value: Option<Vec<u8>>, offsets: Option<BTreeMap<String, i64>> },
    /// `t<key>`: a timer set to `deadline` ms (with the unit's input `offsets`), or cancelled (a
    /// tombstone: `deadline: None`, no offsets).
    Timer { key: Vec<u8>, deadline: Option<i64>, offsets: Option<BTreeMap<String, i64>> },
    /// `m…`: the commit marker of a unit, with its input offsets and the `eventId`s it
    /// remembered (full state keys under [`orderflow_api::SEEN_PREFIX`] → values), to be written
    /// with the unit's other records.
    Marker { offsets: BTreeMap<String, i64>, seen: Seen },
    /// `m…` / null: the tombstone of marker `key` (the whole key, tag included), written by the
    /// unit that forgot its `eventId`s after the retention.
    MarkerGone { key: Vec<u8> },
}

/// Decodes the changelog record `key` / `value` (`None`: a tombstone) of a worker whose input
/// topics are `inputs` (module docs for the layout).
///
/// Errors: the value does not decode ([`decode_offsets`]), a timer deadline that is not 8 bytes,
/// a marker's remembered `eventId`s truncated, or a key that is neither `d…`, `t…` nor `m…`
/// (`unknown changelog key [..]`).
pub fn decode_record(inputs: &[String], key: &[u8], value: Option<&[u8]>) -> Result<Entry, String> {
    match key.first() {
        Some(&TAG_DATA) => {
            let (value, offsets) = match value {
                Some(v) => {
                    let (offsets, body) = decode_offsets(inputs, v)?;
                    (Some(body.to_vec()), Some(offsets))
                }
                None => (None, None),
            };
            Ok(Entry::Data { key: key[1..].to_vec(), value, offsets })
        }
        Some(&TAG_TIMER) => {
            let (deadline, offsets) = match value {
                Some(v) => {
                    let (offsets, body) = decode_offsets(inputs, v)?;
                    let deadline = i64::from_be_bytes(body.try_into().map_err(|_| "timer deadline is not 8 bytes".to_string())?);
                    (Some(deadline), Some(offsets))
                }
                None => (None, None),
            };
            Ok(Entry::Timer { key: key[1..].to_vec(), deadline, offsets })
        }
        Some(&TAG_MARKER) if value.is_none() && key.len() > 1 => Ok(Entry::MarkerGone { key: key.to_vec() }),
        Some(&TAG_MARKER) => {
            let (offsets, body) = decode_offsets(inputs, value.unwrap_or_default())?;
            Ok(Entry::Marker { offsets, seen: decode_seen(body)? })
        }
        _ => Err(format!("unknown changelog key {key:?}")),
    }
}

/// Errors of a restore.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("kafka while restoring {topic}[{partition}]: {source}")]
    Kafka { topic: String, partition: i32, source: rdkafka::error::KafkaError },
    #[error("changelog {topic}[{partition}] at offset {offset}: {message}")]
    Corrupt { topic: String, partition: i32, offset: i64, message: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("restoring {topic}[{partition}] timed out at offset {at} of {high}")]
    Timeout { topic: String, partition: i32, at: i64, high: i64 },
    /// The caller's `stop` turned true (the instance is shutting down); the shard holds what
    /// was restored so far, committed unit by unit, and a later restore goes on from there.
    #[error("restoring {topic}[{partition}] stopped at offset {at} of {high}: shutting down")]
    Stopped { topic: String, partition: i32, at: i64, high: i64 },
}

/// Where a restore took the state from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The local store was at the changelog's end: nothing replayed.
    Local,
    /// The local store was behind: the changelog tail was replayed on top.
    LocalAndChangelog,
    /// No usable local state: rebuilt from the changelog alone.
    Changelog,
}

impl Source {
    /// Label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Local => "local",
            Source::LocalAndChangelog => "local+changelog",
            Source::Changelog => "changelog",
        }
    }
}

/// What a restore did.
#[derive(Debug, Clone)]
pub struct Report {
    pub partition: i32,
    pub source: Source,
    /// Changelog records read.
    pub records: u64,
    /// Units (markers) applied.
    pub units: u64,
    pub elapsed: Duration,
    /// Input offsets the partition resumes from (`topic → next offset`).
    pub offsets: BTreeMap<String, i64>,
    /// Keys written after the last commit marker (a unit that never committed); the worker's
    /// next unit must compensate them (module docs).
    pub orphans: Orphans,
}

/// Keys of changelog records a unit wrote without committing (state keys and timer keys, without
/// the changelog's tag byte).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Orphans {
    pub writes: std::collections::BTreeSet<Vec<u8>>,
    pub timers: std::collections::BTreeSet<Vec<u8>>,
}

impl Orphans {
    /// True when there is nothing to compensate.
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty() && self.timers.is_empty()
    }

    /// Adds every key `changes` writes or schedules (not the local marker index: it is never
    /// written to the changelog, see [`crate::retention`]).
    pub fn extend_from(&mut self, changes: &Changes) {
        self.writes.extend(changes.writes.keys().filter(|k| !crate::retention::is_local(k)).cloned());
        self.timers.extend(changes.timers.keys().cloned());
    }

    /// Adds to `changes` the committed value (read from `committed`) of every orphan key that
    /// `changes` does not already write: a deletion when the key holds nothing, a timer cancel
    /// when no timer is scheduled.
    pub fn compensate(&self, committed: &dyn orderflow_api::StateRead, changes: &mut Changes) {
        for k in &self.writes {
            changes.writes.entry(k.clone()).or_insert_with(|| committed.get(k));
        }
        for k in &self.timers {
            changes.timers.entry(k.clone()).or_insert_with(|| committed.timer(k));
        }
    }
}

/// Brings `shard` up to date with changelog partition `shard.partition` of `topic`: keeps the
/// local state if it is at the changelog's end, replays the tail if it is behind, rebuilds from
/// the changelog alone if it is missing or inconsistent (ahead of the changelog, or behind its
/// retention). Blocking: call it from `spawn_blocking`.
///
/// Errors: broker errors, a changelog record that does not decode, or `timeout` passing.
pub fn restore(broker: &BrokerConfig, topic: &str, inputs: &[String], shard: &Shard, timeout: Duration) -> Result<Report, RestoreError> {
    let consumer = restore_consumer(broker, topic).map_err(|source| RestoreError::Kafka {
        topic: topic.to_string(),
        partition: shard.partition,
        source,
    })?;
    restore_with(&consumer, topic, inputs, shard, timeout, &|| false)
}

/// A consumer for [`restore_with`]: assigned by hand, never subscribed, commits nothing. One can
/// serve every partition of a rebalance (creating and closing one per partition cost ~0.1 s
/// each, measured by `orderflow bench recovery`).
///
/// Errors: librdkafka refusing the configuration.
pub fn restore_consumer(broker: &BrokerConfig, topic: &str) -> Result<RestoreConsumer, rdkafka::error::KafkaError> {
    let mut cfg = client_config(broker, Side::Consumer);
    cfg.set("group.id", format!("{topic}-restore")).set("enable.auto.commit", "false").set("enable.partition.eof", "true");
    // A restore reads one partition front to back: 8 MiB of prefetched records keep it fed, where
    // librdkafka's default (64 MiB) only adds to the process's peak (`orderflow bench recovery`,
    // 10^6 stock keys: rebuild peak RSS 358 → 297 MiB, restore 28.8k → 36.7k records/s).
    cfg.set("queued.max.messages.kbytes", RESTORE_PREFETCH_KBYTES);
    // A restore stops at the partition's end, which it learns from a fetch that finds nothing
    // more: with the broker holding such a fetch for librdkafka's default 500 ms, each partition's
    // restore took ~1 s even with nothing to read (chaos test on Kafka, median 1.0 s/partition).
    cfg.set("fetch.wait.max.ms", RESTORE_FETCH_WAIT_MS);
    let reader = cfg.create_with_context(RestoreContext)?;
    // The log end (high watermark), which a read_committed client does not report: past the
    // stable end while a transaction on the changelog is undecided or its markers are pending.
    cfg.set("isolation.level", "read_uncommitted").set("group.id", format!("{topic}-restore-ends"));
    let ends = cfg.create_with_context(RestoreContext)?;
    Ok(RestoreConsumer { reader, ends })
}

/// The consumers a restore reads the changelog with: `reader` (read_committed: its watermarks
/// end at the last stable offset) and `ends` (read_uncommitted, only asked for the log end).
pub struct RestoreConsumer {
    reader: BaseConsumer<RestoreContext>,
    ends: BaseConsumer<RestoreContext>,
}

/// How long a restore waits for the changelog's stable end to reach its log end (a previous
/// owner's last transaction committed, its markers not yet written) before it restores up to the
/// stable end (an open transaction of a killed instance, aborted later by its coordinator).
const PENDING_TXN_WAIT: Duration = Duration::from_secs(5);

/// Context of the restore consumer: a restore ends at each partition's end-of-partition event,
/// and such events that reach the client's main queue instead (after the restore of that
/// partition returned) are expected, not errors; other errors are logged as warnings.
pub struct RestoreContext;

impl rdkafka::ClientContext for RestoreContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() != Some(rdkafka::types::RDKafkaErrorCode::PartitionEOF) {
            tracing::warn!(%error, reason, "changelog restore consumer error");
        }
    }
}

impl rdkafka::consumer::ConsumerContext for RestoreContext {}

/// `fetch.wait.max.ms` of the restore consumer (see [`restore_consumer`]).
const RESTORE_FETCH_WAIT_MS: &str = "10";

/// `queued.max.messages.kbytes` of the restore consumer (see [`restore_consumer`]).
const RESTORE_PREFETCH_KBYTES: &str = "8192";

/// How long a restore waits for the changelog's end to reach the local store's position (the
/// commit markers of the last unit being written) before it rebuilds from the changelog.
const MARKERS_WAIT: Duration = Duration::from_secs(15);

/// [`restore`] with a consumer from [`restore_consumer`] (its assignment is replaced), checking
/// `stop` between polls (every 500 ms at most): a worker told to shut down leaves the restore of
/// a partition it is about to give up instead of finishing it first.
///
/// Errors: as [`restore`], and [`RestoreError::Stopped`] once `stop` returns true.
pub fn restore_with(
    consumer: &RestoreConsumer,
    topic: &str,
    inputs: &[String],
    shard: &Shard,
    timeout: Duration,
    stop: &dyn Fn() -> bool,
) -> Result<Report, RestoreError> {
    let started = Instant::now();
    let p = shard.partition;
    let kafka = |source| RestoreError::Kafka { topic: topic.to_string(), partition: p, source };
    let watermarks = || consumer.reader.fetch_watermarks(topic, p, Duration::from_secs(30)).map_err(kafka);
    let (low, mut high) = watermarks()?;
    // Another instance's last unit on this partition (a graceful hand-over: scale-down, a
    // rebalance) may be committed with its commit markers still being written: the stable end is
    // then short of it, and restoring now would lose that unit and process its inputs again
    // (duplicated outputs, seen in the chaos test after a scale-down). The local-position wait
    // below cannot see it (this instance never had that unit). Wait for the stable end to reach
    // the log end, briefly: an undecided transaction of a killed instance stays open until its
    // coordinator aborts it, and its records are not state.
    let log_end = || consumer.ends.fetch_watermarks(topic, p, Duration::from_secs(30)).map(|w| w.1).map_err(kafka);
    let pending_since = Instant::now();
    let mut end = log_end()?;
    while end > high && pending_since.elapsed() < PENDING_TXN_WAIT {
        if stop() {
            return Err(RestoreError::Stopped { topic: topic.to_string(), partition: p, at: high, high });
        }
        std::thread::sleep(Duration::from_millis(50));
        high = watermarks()?.1;
        end = log_end()?;
    }
    if end > high {
        tracing::info!(
            topic,
            partition = p,
            stable_end = high,
            log_end = end,
            waited_s = PENDING_TXN_WAIT.as_secs(),
            "an open transaction on the changelog did not resolve; restoring to the stable end"
        );
    }
    let local = shard.changelog_next()?;
    // The local store is written only after its unit's transaction committed, so a local
    // position past the changelog's end (for this read_committed consumer, the last stable
    // offset) means the commit markers of that unit are still being written (Kafka writes them
    // after EndTxn returns). Rebuilding from the changelog now would lose that unit, and its
    // inputs would be processed again: duplicated outputs (seen in the chaos test when a
    // partition came back to the instance that had just committed it). Wait for the markers.
    let waiting_since = Instant::now();
    while let Some(next) = local.filter(|n| *n > high && waiting_since.elapsed() < MARKERS_WAIT) {
        if stop() {
            return Err(RestoreError::Stopped { topic: topic.to_string(), partition: p, at: next, high });
        }
        std::thread::sleep(Duration::from_millis(100));
        high = watermarks()?.1;
    }
    if local.is_some_and(|n| n > high) {
        tracing::warn!(topic, partition = p, local = ?local, high, waited_s = MARKERS_WAIT.as_secs(), "the changelog did not reach the local state's position");
    }
    let (start, source) = match local {
        Some(next) if next == high => (None, Source::Local),
        Some(next) if next >= low && next < high => (Some(next), Source::LocalAndChangelog),
        _ => {
            if !shard.is_empty() {
                tracing::warn!(topic, partition = p, local = ?local, low, high, "local state inconsistent with the changelog; rebuilding");
            }
            shard.clear()?;
            (Some(low), Source::Changelog)
        }
    };
    let mut report = Report {
        partition: p,
        source,
        records: 0,
        units: 0,
        elapsed: Duration::ZERO,
        offsets: BTreeMap::new(),
        orphans: Orphans::default(),
    };
    if let Some(start) = start.filter(|s| *s < high) {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, p, Offset::Offset(start)).map_err(kafka)?;
        consumer.reader.assign(&tpl).map_err(kafka)?;
        let mut pending = Changes::default();
        let mut gone = Vec::new();
        let mut at = start;
        while at < high {
            if started.elapsed() > timeout {
                return Err(RestoreError::Timeout { topic: topic.to_string(), partition: p, at, high });
            }
            if stop() {
                return Err(RestoreError::Stopped { topic: topic.to_string(), partition: p, at, high });
            }
            // The end is where the consumer reports end-of-partition, not "offset high − 1":
            // under exactly_once the changelog is written in transactions and its last offset is a
            // commit marker (a control record no consumer is given), and a read_committed
            // consumer ends at the last stable offset.
            let msg = match consumer.reader.poll(Duration::from_millis(500)) {
                None => continue,
                Some(Err(KafkaError::PartitionEOF(q))) if q == p => break,
                Some(Err(KafkaError::PartitionEOF(_))) => continue,
                Some(msg) => msg.map_err(kafka)?,
            };
            at = msg.offset() + 1;
            report.records += 1;
            let corrupt = |message: String| RestoreError::Corrupt { topic: topic.to_string(), partition: p, offset: msg.offset(), message };
            match decode_record(inputs, msg.key().unwrap_or_default(), msg.payload()).map_err(corrupt)? {
                Entry::Data { key, value, .. } => {
                    pending.writes.insert(key, value);
                }
                Entry::Timer { key, deadline, .. } => {
                    pending.timers.insert(key, deadline);
                }
                Entry::MarkerGone { key } => gone.push(key),
                Entry::Marker { offsets, seen } => {
                    let mut unit = std::mem::take(&mut pending);
                    apply_marker(shard, msg.key().unwrap_or_default(), seen, &std::mem::take(&mut gone), &mut unit);
                    shard.commit(&unit, &offsets, Some(msg.offset() + 1))?;
                    report.units += 1;
                }
            }
        }
        if !pending.is_empty() {
            tracing::info!(
                topic,
                partition = p,
                dropped = pending.writes.len() + pending.timers.len(),
                "discarded changelog records of an unfinished unit; the next unit compensates them"
            );
            report.orphans = Orphans { writes: pending.writes.into_keys().collect(), timers: pending.timers.into_keys().collect() };
        }
    }
    if report.source == Source::LocalAndChangelog && report.records == 0 {
        // Only control records (transaction markers) lay past the local state's end.
        report.source = Source::Local;
    }
    report.offsets = shard.offsets()?;
    report.elapsed = started.elapsed();
    Ok(report)
}

/// Completes a unit read back from the changelog at its marker `marker` (the whole key): adds
/// the `eventId`s the marker carries (`seen`) and their index entries to `unit`, and the
/// forgetting of the markers the unit tombstoned (`gone`), whose ids `committed` (the state
/// before the unit) remembers. The unit's own records win over what is derived. Used by the
/// restore and by `replay --through`'s shadow rebuild, so both rebuild the same state.
pub fn apply_marker(committed: &dyn orderflow_api::StateRead, marker: &[u8], seen: Seen, gone: &[Vec<u8>], unit: &mut Changes) {
    let mut derived = Changes::default();
    if !gone.is_empty() {
        let mut txn = orderflow_api::StateTxn::new(committed);
        for key in gone {
            crate::retention::forget_marker(&mut txn, key);
        }
        derived = txn.into_changes();
    }
    crate::retention::index(marker, &seen, &mut derived);
    derived.writes.extend(seen.into_iter().map(|(k, v)| (k, Some(v))));
    for (k, v) in derived.writes {
        unit.writes.entry(k).or_insert(v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_carry_offsets_and_end_with_a_marker() {
        let inputs = vec!["a".to_string(), "b".to_string()];
        let mut changes = Changes::default();
        changes.writes.insert(b"k1".to_vec(), Some(b"v1".to_vec()));
        changes.writes.insert(b"k2".to_vec(), None);
        changes.timers.insert(b"t1".to_vec(), Some(99));
        let offsets = BTreeMap::from([("b".to_string(), 7)]);
        let recs = records(&inputs, &changes, &offsets);
        assert_eq!(recs.len(), 4);
        assert_eq!(recs[0].key, b"dk1");
        let (o, rest) = decode_offsets(&inputs, recs[0].value.as_ref().unwrap()).unwrap();
        assert_eq!((o, rest), (offsets.clone(), &b"v1"[..]));
        assert_eq!(recs[1], Record { key: b"dk2".to_vec(), value: None });
        assert_eq!(recs[2].key, b"tt1");
        assert_eq!(decode_offsets(&inputs, recs[2].value.as_ref().unwrap()).unwrap().1, &99i64.to_be_bytes()[..]);
        assert_eq!(recs[3].key, b"m");
        assert_eq!(decode_offsets(&inputs, recs[3].value.as_ref().unwrap()).unwrap(), (offsets, &b""[..]));
    }

    #[test]
    fn compensation_writes_committed_values_of_orphan_keys_not_rewritten() {
        let mut committed = orderflow_api::MemoryStore::default();
        let mut base = Changes::default();
        base.writes.insert(b"kept".to_vec(), Some(b"committed".to_vec()));
        base.timers.insert(b"t-kept".to_vec(), Some(42));
        committed.apply(base);
        let mut orphan = Changes::default();
        orphan.writes.insert(b"kept".to_vec(), Some(b"orphan".to_vec()));
        orphan.writes.insert(b"new".to_vec(), Some(b"orphan".to_vec()));
        orphan.writes.insert(b"mine".to_vec(), Some(b"orphan".to_vec()));
        orphan.timers.insert(b"t-kept".to_vec(), None);
        orphan.timers.insert(b"t-new".to_vec(), Some(7));
        let mut orphans = Orphans::default();
        orphans.extend_from(&orphan);
        let mut next = Changes::default();
        next.writes.insert(b"mine".to_vec(), Some(b"redo".to_vec()));
        orphans.compensate(&committed, &mut next);
        assert_eq!(next.writes[&b"kept"[..]], Some(b"committed".to_vec()));
        assert_eq!(next.writes[&b"new"[..]], None, "a key that held nothing is deleted");
        assert_eq!(next.writes[&b"mine"[..]], Some(b"redo".to_vec()), "the unit's own write wins");
        assert_eq!(next.timers[&b"t-kept"[..]], Some(42));
        assert_eq!(next.timers[&b"t-new"[..]], None);
    }

    #[test]
    fn garbage_offsets_are_rejected() {
        let inputs = vec!["a".to_string()];
        assert!(decode_offsets(&inputs, &[9, 0]).is_err());
        assert!(decode_offsets(&inputs, &[1, 1, 0]).is_err());
        assert!(decode_offsets(&inputs, &[1, 1, 5, 0, 0, 0, 0, 0, 0, 0, 1]).is_err());
        assert!(decode_record(&inputs, b"x", Some(&[1, 0])).unwrap_err().contains("unknown changelog key"));
        assert!(decode_record(&inputs, b"tk", Some(&[1, 0, 1])).unwrap_err().contains("not 8 bytes"));
        assert!(decode_record(&inputs, b"m", None).is_err(), "a marker needs offsets");
        assert_eq!(decode_record(&inputs, b"mX", None).unwrap(), Entry::MarkerGone { key: b"mX".to_vec() });
    }

    #[test]
    fn records_decode_back_to_entries() {
        let inputs = vec!["a".to_string(), "b".to_string()];
        let mut changes = Changes::default();
        changes.writes.insert(b"k1".to_vec(), Some(b"v1".to_vec()));
        changes.writes.insert(b"k2".to_vec(), None);
        changes.timers.insert(b"t1".to_vec(), Some(99));
        changes.timers.insert(b"t2".to_vec(), None);
        let offsets = BTreeMap::from([("a".to_string(), 3)]);
        let got: Vec<Entry> =
            records(&inputs, &changes, &offsets).iter().map(|r| decode_record(&inputs, &r.key, r.value.as_deref()).unwrap()).collect();
        let o = Some(offsets.clone());
        assert_eq!(
            got,
            vec![
                Entry::Data { key: b"k1".to_vec(), value: Some(b"v1".to_vec()), offsets: o.clone() },
                Entry::Data { key: b"k2".to_vec(), value: None, offsets: None },
                Entry::Timer { key: b"t1".to_vec(), deadline: Some(99), offsets: o },
                Entry::Timer { key: b"t2".to_vec(), deadline: None, offsets: None },
                Entry::Marker { offsets, seen: vec![] },
            ]
        );
    }

    #[test]
    fn remembered_event_ids_ride_in_a_marker_keyed_by_the_units_offsets() {
        let inputs = vec!["a".to_string()];
        let mut changes = Changes::default();
        changes.writes.insert(orderflow_api::seen_key("e1"), Some(7i64.to_be_bytes().to_vec()));
        changes.writes.insert(orderflow_api::seen_key("e2"), Some(8i64.to_be_bytes().to_vec()));
        changes.writes.insert(orderflow_api::seen_key("gone"), None);
        changes.writes.insert(b"order/1".to_vec(), Some(b"v".to_vec()));
        let recs = records(&inputs, &changes, &BTreeMap::from([("a".to_string(), 5)]));
        // The state write is a record; e1 and e2 are not, nor the forgotten id (it goes with its
        // marker's tombstone).
        assert_eq!(recs.len(), 2, "{recs:?}");
        let marker = recs.last().unwrap();
        assert_eq!(marker.key[0], TAG_MARKER);
        assert!(marker.key.len() > 1, "a marker with eventIds is keyed by its unit");
        let Entry::Marker { offsets, seen } = decode_record(&inputs, &marker.key, marker.value.as_deref()).unwrap() else {
            panic!("not a marker")
        };
        assert_eq!(offsets, BTreeMap::from([("a".to_string(), 5)]));
        assert_eq!(
            seen,
            vec![
                (orderflow_api::seen_key("e1"), 7i64.to_be_bytes().to_vec()),
                (orderflow_api::seen_key("e2"), 8i64.to_be_bytes().to_vec())
            ]
        );
        // Another unit's marker is another key (compaction keeps both).
        let next = records(&inputs, &changes, &BTreeMap::from([("a".to_string(), 9)]));
        assert_ne!(next.last().unwrap().key, marker.key);
        // A truncated marker is an error, not a shorter list.
        let mut cut = marker.value.clone().unwrap();
        cut.truncate(cut.len() - 3);
        assert!(decode_record(&inputs, &marker.key, Some(&cut)).unwrap_err().contains("truncated"));
        // An older changelog's bare `m` marker still decodes.
        let old = encode_offsets(&inputs, &BTreeMap::from([("a".to_string(), 5)]));
        assert_eq!(decode_record(&inputs, b"m", Some(&old)).unwrap(), Entry::Marker { offsets, seen: vec![] });
    }

    #[test]
    fn the_marker_index_is_local_and_its_deletion_is_the_markers_tombstone() {
        let inputs = vec!["a".to_string()];
        let mut unit = Changes::default();
        unit.writes.insert(orderflow_api::seen_key("e1"), Some(7i64.to_be_bytes().to_vec()));
        let recs = records(&inputs, &unit, &BTreeMap::from([("a".to_string(), 5)]));
        let marker = recs.last().unwrap().clone();
        let seen = marker_seen(&marker);
        assert_eq!(seen, vec![(orderflow_api::seen_key("e1"), 7i64.to_be_bytes().to_vec())]);
        let mut indexed = Changes::default();
        crate::retention::index(&marker.key, &seen, &mut indexed);
        assert_eq!(indexed.writes.len(), 2);
        assert_eq!(records(&inputs, &indexed, &BTreeMap::new()).len(), 1, "only the (bare) marker: the index is local");
        let mut store = orderflow_api::MemoryStore::default();
        store.apply(indexed);
        let mut txn = orderflow_api::StateTxn::new(&store);
        crate::retention::sweep(&mut txn, 7 + 1_000, 999);
        let sweep = records(&inputs, txn.changes(), &BTreeMap::new());
        assert!(sweep.contains(&Record { key: marker.key.clone(), value: None }), "{sweep:?}");
        assert!(sweep.iter().all(|r| r.key[0] != TAG_DATA), "no record per forgotten id: {sweep:?}");
        // Read back in order, the tombstone forgets what the marker brought.
        let mut restored = orderflow_api::MemoryStore::default();
        let mut first = Changes::default();
        apply_marker(&restored, &marker.key, seen, &[], &mut first);
        restored.apply(first);
        assert!(restored.data.contains_key(&orderflow_api::seen_key("e1")));
        let mut second = Changes::default();
        apply_marker(&restored, b"m", Vec::new(), std::slice::from_ref(&marker.key), &mut second);
        restored.apply(second);
        assert!(restored.data.is_empty(), "{:?}", restored.data);
    }

    #[test]
    fn remembered_event_ids_past_the_marker_limit_stay_data_records() {
        let inputs = vec!["a".to_string()];
        let mut changes = Changes::default();
        let id = "x".repeat(1000);
        let n = MAX_MARKER_SEEN_BYTES / 1000 + 10;
        for i in 0..n {
            changes.writes.insert(orderflow_api::seen_key(&format!("{i:05}{id}")), Some(vec![0; 8]));
        }
        let recs = records(&inputs, &changes, &BTreeMap::from([("a".to_string(), 1)]));
        let marker = recs.last().unwrap();
        assert!(marker.value.as_ref().unwrap().len() <= MAX_MARKER_SEEN_BYTES + 16);
        let Entry::Marker { seen, .. } = decode_record(&inputs, &marker.key, marker.value.as_deref()).unwrap() else { panic!() };
        let data = recs.len() - 1;
        assert!(data > 0, "the overflow is written as data records");
        assert_eq!(seen.len() + data, n, "every remembered id is written once");
    }
}
