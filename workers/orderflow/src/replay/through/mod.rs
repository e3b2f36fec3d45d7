//! `orderflow replay TOPIC ... --through WORKER (--dry-run | --diff)`: runs one worker's logic over
//! a replayed range of one of its input topics against a *shadow* copy of its state, never the
//! live store, and prints what it would emit (`--dry-run`) or how that compares with what was
//! actually emitted downstream (`--diff`).
//!
//! # Shadow state
//!
//! For every replayed partition the worker's state is rebuilt in memory (a fresh
//! [`MemoryStore`], nothing is written anywhere) from changelog partition N of
//! `orderflow-<worker>-changelog` (see `orderflow_runtime::changelog`): records are gathered and a
//! unit is applied at its commit marker, as long as the marker's next input offset of the
//! replayed topic is ≤ the range start. The shadow is then the state the live worker had after its
//! last unit that ended at or before the range start. When that unit ended before the range start
//! (units are batches, so a marker exactly at the start rarely exists), the records between its
//! end and the range start are *warmed up*: processed silently through the shadow (outputs, dead
//! letters and timers of that stretch are not reported). See [`ShadowBuilder`] for the limits
//! (compaction, retention, several inputs), which are reported in the summary as `approximate`.
//!
//! # Replay
//!
//! The range's records are processed in offset order per partition, partitions merged by record
//! timestamp, through the live worker's own code: admission by `orderflow_runtime::step::admit`
//! and each record as a unit of work of `orderflow_runtime::step::step` (eventId dedupe, timers
//! one at a time), so replay and live processing cannot drift apart. The clock (`now_ms`) is the
//! record's timestamp (never earlier than the previous one), so the replay is deterministic and
//! timers fire as the replayed time passes (before and after each record, every partition). Timers due after the last replayed record's timestamp do not fire. The
//! processor is built by `kinds::build` from the topology entry; `--reservation-ttl` overrides the
//! worker's TTL so a changed configuration can be compared. Records that fail to decode, break the
//! admission rules or are `Invalid` are reported as the dead letters the live worker would write;
//! a processor failure the live worker would stop on (`CorruptState`, `UnwiredPort`) is reported
//! under `failures` and the record skipped.
//!
//! # Diff
//!
//! Output `eventId`s are deterministic (`derive_event_id` of the input), so every event the
//! replay emits is looked up by `eventId` among the records of the worker's output topics (the
//! topology `outputs`): whole topics when they are small (≤ [`WHOLE_TOPIC_LIMIT`] records in
//! all), else the time window of the range widened by the worker's longest timer horizon
//! (reservation TTL, saga timeout) and [`WINDOW_MARGIN_MS`]. See [`diff`] for the classes.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use orderflow_api::{derive_event_id, Event, MemoryStore, Processor};
use orderflow_runtime::changelog::{decode_offsets, decode_record, Entry, TAG_DATA, TAG_MARKER, TAG_TIMER};
use orderflow_runtime::codec::Codec;
use orderflow_runtime::step::{self, Input, Outcome, Rejection, RetryBudget, Rules};
use orderflow_runtime::topology::{BrokerConfig, Guarantee, Loaded, WorkerSpec};
use rdkafka::message::{Message, OwnedMessage};
use serde::Serialize;
use serde_json::{json, Value};

use crate::format::hex;
use crate::kafkaio::{blocking, Reader, Span};
use crate::replay::{ReplayArgs, Resolved};

/// Output topics holding at most this many records in all are read whole for `--diff`; larger
/// ones are read within the time window of the range.
pub const WHOLE_TOPIC_LIMIT: i64 = 200_000;
/// Added on both sides of the `--diff` time window (ms): producer batching, commit intervals,
/// clock differences between the input's timestamps and the outputs'.
pub const WINDOW_MARGIN_MS: i64 = 60_000;

// ------------------------------------------------------------------------------------------
// Admission: the live worker's rules (`orderflow_runtime::step`), with the record time as clock.

/// The timestamp of `m` in ms (its Kafka timestamp), if it has one.
pub fn timestamp_of(m: &OwnedMessage) -> Option<i64> {
    m.timestamp().to_millis()
}

/// Decodes `m` and applies the live worker's admission rules (`orderflow_runtime::step::admit`:
/// `truncated`, `oversized`, the codec's classes, `wrong_schema`, `invalid`, `future_timestamp`)
/// with `now_ms` as the clock (the record's timestamp in a replay). A schema registry that does
/// not answer is not retried: it is reported as `registry_unavailable`. `worker` names the logs.
///
/// Errors: the [`Rejection`] naming the dead-letter class the live worker would write.
pub async fn admit(codec: &Codec, rules: &Rules, worker: &str, m: &OwnedMessage, now_ms: i64) -> std::result::Result<Event, Rejection> {
    let input = Input { topic: m.topic(), partition: m.partition(), offset: m.offset() };
    step::admit(codec, rules, input, m.payload(), now_ms, &mut RetryBudget::none(), worker).await
}

// ------------------------------------------------------------------------------------------
// Shadow state from the changelog.

/// What the rebuild of one partition's shadow did (part of the summary).
#[derive(Debug, Clone, Default, Serialize)]
pub struct ShadowReport {
    /// Input (and changelog) partition.
    pub partition: i32,
    /// First replayed offset of the input topic.
    pub range_from: i64,
    /// Changelog offsets read, `[low, high)`.
    pub changelog_low: i64,
    pub changelog_high: i64,
    /// Changelog records used: up to the marker of the first unit past the range start (the
    /// rest of the partition is read and ignored).
    pub records: u64,
    /// Units (commit markers) applied.
    pub units: u64,
    /// Next input offset of the replayed topic after the last applied unit (0 when none): the
    /// shadow is the live state just before this offset; `[position, range_from)` is warmed up.
    pub position: i64,
    /// Records of the replayed topic processed silently between `position` and `range_from`.
    pub warmed_up: u64,
    /// Records read after the last applied unit and not applied (that unit's, or later ones).
    pub not_applied: u64,
    /// True when the shadow may differ from the live state before the range (see `notes`).
    pub approximate: bool,
    /// Why the shadow is approximate, or what else the rebuild noticed.
    pub notes: Vec<String>,
}

/// A gathered changelog record: key (with its tag byte), value (`None`: tombstone) and the
/// replayed topic's input position it carries (`None` for a tombstone).
type Pending = (Vec<u8>, Option<Vec<u8>>, Option<i64>);

/// Rebuilds one partition's shadow from its changelog records, fed in offset order with
/// [`ShadowBuilder::push`].
///
/// Rules: records are gathered per unit; at a commit marker, the unit is applied when the
/// marker's next offset of the replayed topic (the previous position when the marker does not
/// name the topic: a timer-only unit, or a unit of another input) is ≤ the range start. At the
/// first marker past the range start the rebuild stops. Records after the last marker belong to a
/// unit that never committed and are dropped (the live restore does the same).
///
/// Limits, reported as `approximate` with a note:
/// - the changelog's low watermark is above 0, or offsets are missing between records (log
///   compaction keeps only the newest record of each key, including the marker `m`; retention
///   may delete the oldest): a key whose last pre-range record was superseded by a later one is
///   missing from the shadow, and several units' records arrive without their markers. Records
///   gathered when the rebuild stops are then applied when they carry a position ≤ the range
///   start (every non-tombstone record carries its unit's input offsets), tombstones are not.
///   Under `exactly_once`, transaction markers also leave offset gaps, so gaps are not reported
///   for that guarantee;
/// - a worker with several inputs: the warm-up replays only the replayed topic, so a unit that
///   mixed inputs and ended past the range start is missing the other topics' records.
pub struct ShadowBuilder {
    inputs: Vec<String>,
    topic: String,
    from: i64,
    exactly_once: bool,
    store: MemoryStore,
    pending: Vec<Pending>,
    next_expected: Option<i64>,
    done: bool,
    gaps: u64,
    report: ShadowReport,
}

impl ShadowBuilder {
    /// A builder for partition `partition` of input `topic` (one of the worker's `inputs`), whose
    /// range starts at offset `from`; `low`/`high` are the changelog partition's watermarks.
    pub fn new(inputs: &[String], topic: &str, partition: i32, from: i64, (low, high): (i64, i64), guarantee: Guarantee) -> ShadowBuilder {
        let mut report = ShadowReport { partition, range_from: from, changelog_low: low, changelog_high: high, ..Default::default() };
        if low > 0 {
            report.approximate = true;
            report.notes.push(format!(
                "the changelog starts at offset {low}: its first records were removed (retention or compaction); keys last written there are missing"
            ));
        }
        ShadowBuilder {
            inputs: inputs.to_vec(),
            topic: topic.to_string(),
            from,
            exactly_once: guarantee == Guarantee::ExactlyOnce,
            store: MemoryStore::default(),
            pending: Vec::new(),
            next_expected: Some(low),
            done: false,
            gaps: 0,
            report,
        }
    }

    /// Feeds the changelog record at `offset` (`value == None`: a tombstone). Records after the
    /// rebuild stopped are ignored.
    ///
    /// Errors: a record that does not decode (unknown key tag, bad version, bad offsets).
    pub fn push(&mut self, offset: i64, key: &[u8], value: Option<&[u8]>) -> std::result::Result<(), String> {
        if self.done {
            return Ok(());
        }
        self.report.records += 1;
        if let Some(expected) = self.next_expected {
            if offset > expected && !self.exactly_once {
                self.gaps += (offset - expected) as u64;
            }
        }
        self.next_expected = Some(offset + 1);
        let at = |e: String| format!("changelog offset {offset}: {e}");
        let position_of = |offsets: &BTreeMap<String, i64>, current: i64| offsets.get(&self.topic).copied().unwrap_or(current);
        match key.first() {
            Some(&TAG_DATA) | Some(&TAG_TIMER) => {
                let pos = match value {
                    Some(v) => Some(position_of(&decode_offsets(&self.inputs, v).map_err(at)?.0, self.report.position)),
                    None => None,
                };
                self.pending.push((key.to_vec(), value.map(<[u8]>::to_vec), pos));
            }
            Some(&TAG_MARKER) => {
                let Entry::Marker { offsets, seen } = decode_record(&self.inputs, key, value).map_err(at)? else {
                    return Err(at("an m… key that is not a commit marker".into()));
                };
                let pos = position_of(&offsets, self.report.position);
                if pos <= self.from {
                    let pending = std::mem::take(&mut self.pending);
                    self.apply(pending.into_iter().map(|(k, v, _)| (k, v)))?;
                    self.store.apply(orderflow_api::Changes {
                        writes: seen.into_iter().map(|(k, v)| (k, Some(v))).collect(),
                        ..Default::default()
                    });
                    self.report.units += 1;
                    self.report.position = pos;
                } else {
                    self.stop()?;
                }
            }
            _ => return Err(at(format!("unknown changelog key {key:?}"))),
        }
        Ok(())
    }

    /// Stops at the first unit past the range start; with gaps seen (compaction), applies the
    /// gathered records that carry a position ≤ the range start.
    fn stop(&mut self) -> std::result::Result<(), String> {
        self.done = true;
        let pending = std::mem::take(&mut self.pending);
        if self.gaps > 0 || self.report.changelog_low > 0 {
            let from = self.from;
            let (early, late): (Vec<_>, Vec<_>) = pending.into_iter().partition(|(_, _, pos)| pos.is_some_and(|p| p <= from));
            self.report.not_applied += late.len() as u64;
            if !early.is_empty() {
                self.report.notes.push(format!(
                    "{} record(s) of units whose markers were compacted away applied by their own input offsets",
                    early.len()
                ));
                self.apply(early.into_iter().map(|(k, v, _)| (k, v)))?;
            }
        } else {
            self.report.not_applied += pending.len() as u64;
        }
        Ok(())
    }

    fn apply(&mut self, records: impl Iterator<Item = (Vec<u8>, Option<Vec<u8>>)>) -> std::result::Result<(), String> {
        let mut changes = orderflow_api::Changes::default();
        for (key, value) in records {
            match decode_record(&self.inputs, &key, value.as_deref())? {
                Entry::Data { key, value, .. } => {
                    changes.writes.insert(key, value);
                }
                Entry::Timer { key, deadline, .. } => {
                    changes.timers.insert(key, deadline);
                }
                Entry::Marker { .. } => return Err("a commit marker among a unit's records".into()),
            }
        }
        self.store.apply(changes);
        Ok(())
    }

    /// The shadow store and the report. Records after the last marker (a unit that never
    /// committed, or the stopping unit) are not applied.
    pub fn finish(mut self) -> (MemoryStore, ShadowReport) {
        if !self.done {
            self.report.not_applied += self.pending.len() as u64;
        }
        if self.gaps > 0 {
            self.report.approximate = true;
            self.report.notes.push(format!(
                "{} changelog offset(s) missing between records (log compaction): markers and superseded records are gone, so the shadow is approximate",
                self.gaps
            ));
        }
        (self.store, self.report)
    }
}

// ------------------------------------------------------------------------------------------
// The replay engine.

/// What caused an emitted event.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Cause {
    /// An input record.
    Input {
        partition: i32,
        offset: i64,
        #[serde(rename = "eventId")]
        event_id: String,
    },
    /// A timer of the partition's state, due at `due_ms`, fired at replay time `at_ms`.
    Timer { partition: i32, key: String, due_ms: i64, at_ms: i64 },
}

/// One event the shadow emits (one `--dry-run` line).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Emitted {
    /// Output port.
    pub port: String,
    /// Topic the port is wired to.
    pub topic: String,
    /// Record key.
    pub key: String,
    /// Avro record name of the event.
    pub event: String,
    #[serde(rename = "eventId")]
    pub event_id: String,
    /// The event's fields (Avro names).
    pub value: Value,
    pub cause: Cause,
    /// The event itself (not printed: `value` is its JSON).
    #[serde(skip)]
    pub record: Event,
    /// The record value the live worker would write for it (`Codec::encode` for its topic),
    /// set by `--diff` and compared byte for byte with the live record's; not printed.
    #[serde(skip)]
    pub payload: Option<Vec<u8>>,
}

/// A record the live worker would dead-letter (or stop on, under `failures`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeadLetter {
    /// Input partition.
    pub partition: i32,
    /// Input offset; -1 for a timer.
    pub offset: i64,
    #[serde(rename = "eventId", skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
    /// A dead letter's [`orderflow_runtime::deadletter::DeadLetterClass`] (`invalid`,
    /// `not_avro`, ...); for a failure, `fatal` (an input) or `timer`.
    pub class: String,
    pub message: String,
}

/// Counts of a replay.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Stats {
    /// Records of the range.
    pub inputs: u64,
    /// Processed (new eventId).
    pub processed: u64,
    /// Skipped as a repeated eventId.
    pub duplicates: u64,
    /// Would be dead-lettered.
    pub dead_letters: u64,
    /// Processor failures the live worker would stop on.
    pub failures: u64,
    /// Timers fired.
    pub timers_fired: u64,
    /// Events emitted.
    pub outputs: u64,
    /// Events emitted per topic.
    pub outputs_per_topic: BTreeMap<String, u64>,
}

/// Runs one processor over shadow shards through the live worker's unit step
/// (`orderflow_runtime::step::step`), one record per unit of work, without retries (a replay
/// reports the first failure as the live worker's last).
pub struct Engine {
    processor: Box<dyn Processor>,
    /// The worker replayed through (names the logs).
    worker: String,
    /// The replayed input topic (`Context::topic` of its records).
    topic: String,
    /// Wired port → topic.
    ports: BTreeMap<String, String>,
    shards: BTreeMap<i32, MemoryStore>,
    clock: i64,
    /// Counts of the reported (non-warm-up) part.
    pub stats: Stats,
    /// Events emitted by the reported part, in order.
    pub emitted: Vec<Emitted>,
    /// Records the live worker would dead-letter.
    pub dead_letters: Vec<DeadLetter>,
    /// Records and timers the live worker would stop on (`CorruptState`, `UnwiredPort`, a
    /// failing timer).
    pub failures: Vec<DeadLetter>,
}

impl Engine {
    /// An engine running `worker`'s `processor` on records of input `topic`, with its wired
    /// ports `port → topic` (the kind's ports the topology wires), over `shards` (partition →
    /// shadow state; a partition without one starts empty).
    pub fn new(worker: &str, processor: Box<dyn Processor>, topic: &str, ports: BTreeMap<String, String>, shards: BTreeMap<i32, MemoryStore>) -> Engine {
        Engine {
            processor,
            worker: format!("replay --through {worker}"),
            topic: topic.to_string(),
            ports,
            shards,
            clock: i64::MIN,
            stats: Stats::default(),
            emitted: Vec::new(),
            dead_letters: Vec::new(),
            failures: Vec::new(),
        }
    }

    /// The replay clock (ms): the latest record timestamp seen.
    pub fn clock_ms(&self) -> i64 {
        self.clock
    }

    /// Timers still scheduled in the shadow (due after the clock: they did not fire).
    pub fn pending_timers(&self) -> usize {
        self.shards.values().map(|s| s.timers.len()).sum()
    }

    /// Processes one record of `partition` at `offset`, timestamp `ts_ms`, already admitted (or
    /// rejected, [`admit`]). The clock moves to `ts_ms` (never back). Timers due at the clock
    /// fire first in a unit of their own, as the live worker's timer punctuation would have
    /// fired them before the record arrived (on every partition; on `partition` only during a
    /// warm-up); then the record is one unit over its partition, whose timers due at the clock
    /// fire after it, as in the live worker. `report == false` is a warm-up: nothing is recorded,
    /// only the state moves.
    pub async fn step(&mut self, partition: i32, offset: i64, ts_ms: i64, admitted: std::result::Result<Event, Rejection>, report: bool) {
        self.clock = self.clock.max(ts_ms);
        self.shards.entry(partition).or_default();
        let partitions: Vec<i32> = if report { self.shards.keys().copied().collect() } else { vec![partition] };
        self.unit(&partitions, Vec::new(), report).await;
        if report {
            self.stats.inputs += 1;
        }
        let topic = self.topic.clone();
        self.unit(&[partition], vec![(Input { topic: &topic, partition, offset }, admitted)], report).await;
    }

    /// One unit of work over `partitions` at the clock: the shared step, its state and timer
    /// changes applied to the shadow (also after a failure: the step already discarded the
    /// failing record's or timer's own changes), and, when `report`, its effects recorded.
    async fn unit(&mut self, partitions: &[i32], records: Vec<(Input<'_>, std::result::Result<Event, Rejection>)>, report: bool) {
        let now = self.clock;
        let inputs: Vec<(i32, i64, Option<String>)> =
            records.iter().map(|(i, r)| (i.partition, i.offset, r.as_ref().ok().map(|e| e.event_id().to_string()))).collect();
        let wired: Vec<String> = self.ports.keys().cloned().collect();
        let states: BTreeMap<i32, &MemoryStore> = partitions.iter().map(|p| (*p, &self.shards[p])).collect();
        let staged = step::step(self.processor.as_mut(), &wired, &states, records, now, &mut RetryBudget::none(), &self.worker).await;
        for (p, changes) in staged.changes {
            self.shards.get_mut(&p).expect("a shard for every partition of the unit").apply(changes);
        }
        if !report {
            return;
        }
        for outcome in &staged.outcomes {
            match outcome {
                Outcome::Processed => self.stats.processed += 1,
                Outcome::Duplicate => self.stats.duplicates += 1,
                Outcome::DeadLettered | Outcome::NotReached => {}
            }
        }
        for (i, r) in staged.dead_letters {
            let (partition, offset, event_id) = inputs[i].clone();
            self.stats.dead_letters += 1;
            self.dead_letters.push(DeadLetter { partition, offset, event_id, class: r.class.as_str().to_string(), message: r.message });
        }
        self.stats.timers_fired += staged.timers_fired as u64;
        for (output, cause) in staged.outputs {
            let cause = match cause {
                step::Cause::Input(i) => {
                    let (partition, offset, event_id) = inputs[i].clone();
                    Cause::Input { partition, offset, event_id: event_id.unwrap_or_default() }
                }
                step::Cause::Timer { partition, key, due_ms } => {
                    Cause::Timer { partition, key: String::from_utf8_lossy(&key).into_owned(), due_ms, at_ms: now }
                }
            };
            self.record(output, cause);
        }
        if let Some(stop) = staged.stop {
            self.stats.failures += 1;
            self.failures.push(match stop.cause {
                step::Cause::Input(i) => {
                    let (partition, offset, event_id) = inputs[i].clone();
                    DeadLetter { partition, offset, event_id, class: "fatal".into(), message: stop.error.to_string() }
                }
                step::Cause::Timer { partition, key, .. } => DeadLetter {
                    partition,
                    offset: -1,
                    event_id: None,
                    class: "timer".into(),
                    message: format!("timer {}: {}", String::from_utf8_lossy(&key), stop.error),
                },
            });
        }
    }

    fn record(&mut self, r: orderflow_api::Output, cause: Cause) {
        let topic = self.ports.get(&r.port).cloned().unwrap_or_default();
        *self.stats.outputs_per_topic.entry(topic.clone()).or_default() += 1;
        self.stats.outputs += 1;
        self.emitted.push(Emitted {
            port: r.port,
            topic,
            key: r.key,
            event: r.event.schema_name().to_string(),
            event_id: r.event.event_id().to_string(),
            value: r.event.to_json(),
            cause,
            record: r.event,
            payload: None,
        });
    }
}

/// The order in which records of several partitions are replayed: offset order within each
/// partition, partitions merged by timestamp (ties by partition). `items` are
/// `(partition, offset, timestamp, payload)` in any order; returns their indices.
pub fn replay_order(items: &[(i32, i64, i64)]) -> Vec<usize> {
    let mut queues: BTreeMap<i32, Vec<usize>> = BTreeMap::new();
    for (i, (p, _, _)) in items.iter().enumerate() {
        queues.entry(*p).or_default().push(i);
    }
    for q in queues.values_mut() {
        q.sort_by_key(|i| items[*i].1);
        q.reverse();
    }
    let mut order = Vec::with_capacity(items.len());
    loop {
        let next = queues.iter().filter_map(|(p, q)| q.last().map(|i| (items[*i].2, *p))).min();
        let Some((_, p)) = next else { break };
        order.push(queues.get_mut(&p).expect("queue").pop().expect("non-empty"));
    }
    order
}

// ------------------------------------------------------------------------------------------
// Diff.

/// An event read back from an output topic.
#[derive(Debug, Clone)]
pub struct Actual {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// Record timestamp, ms.
    pub timestamp_ms: Option<i64>,
    pub key: Option<String>,
    pub event: Event,
    /// The record value as read (empty when unknown).
    pub payload: Vec<u8>,
}

/// One field that differs between the replay's event and the live one: `path` in the event's
/// JSON (`expiresAt`, `items[0].reserved`, or `topic` / `key` for the record itself).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FieldDiff {
    pub path: String,
    pub replay: Value,
    pub actual: Value,
}

/// The paths where `replay` and `actual` differ (objects by key, arrays of equal length by
/// index, anything else as a whole).
pub fn field_diffs(replay: &Value, actual: &Value) -> Vec<FieldDiff> {
    fn walk(path: &str, a: &Value, b: &Value, out: &mut Vec<FieldDiff>) {
        match (a, b) {
            (Value::Object(x), Value::Object(y)) => {
                let keys: BTreeSet<&String> = x.keys().chain(y.keys()).collect();
                for k in keys {
                    let p = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                    walk(&p, x.get(k).unwrap_or(&Value::Null), y.get(k).unwrap_or(&Value::Null), out);
                }
            }
            (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
                for (i, (u, v)) in x.iter().zip(y).enumerate() {
                    walk(&format!("{path}[{i}]"), u, v, out);
                }
            }
            _ if a != b => out.push(FieldDiff { path: path.to_string(), replay: a.clone(), actual: b.clone() }),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk("", replay, actual, &mut out);
    out
}

/// How one event compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// The replay emits it and the same event (topic, key, fields) was emitted live.
    Same,
    /// Same `eventId` emitted live with a different topic, key or fields.
    Changed,
    /// The replay emits it; nothing with its `eventId` was emitted live.
    Missing,
    /// Emitted live for one of the replayed inputs, not by the replay.
    Extra,
}

/// Where a live event was read.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct At {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// One line of the `--diff` report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DiffEntry {
    pub status: Status,
    pub topic: String,
    pub key: String,
    pub event: String,
    #[serde(rename = "eventId")]
    pub event_id: String,
    /// What caused the replay's event (absent for `extra`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cause: Option<Cause>,
    /// Where the live event is (absent for `missing`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actual_at: Option<At>,
    /// Both values, for `changed`; the one there is, for `missing` / `extra`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replay: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actual: Option<Value>,
    /// The differing fields, for `changed`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<FieldDiff>,
}

/// Counts of a diff.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DiffCounts {
    pub same: u64,
    pub changed: u64,
    pub missing: u64,
    pub extra: u64,
}

/// The ids a replayed input can cause live outputs under: its `eventId`, its `orderId` and its
/// `reservationId` (the workers derive output ids from these, see [`Causes::explains`]).
#[derive(Debug, Default)]
pub struct Causes {
    event_ids: HashSet<String>,
    all: Vec<String>,
    derived: HashMap<String, HashSet<String>>,
}

impl Causes {
    /// The causes of the replayed input events.
    pub fn of<'a>(inputs: impl IntoIterator<Item = &'a Event>) -> Causes {
        let mut c = Causes::default();
        let mut all = BTreeSet::new();
        for e in inputs {
            c.event_ids.insert(e.event_id().to_string());
            all.insert(e.event_id().to_string());
            if let Some(o) = e.order_id().filter(|o| !o.is_empty()) {
                all.insert(o.to_string());
            }
            let reservation = match e {
                Event::OrderCompleted(x) => Some(&x.reservation_id),
                Event::StockReserved(x) => Some(&x.reservation_id),
                Event::StockReservationExpired(x) => Some(&x.reservation_id),
                Event::StockReservationReleased(x) => Some(&x.reservation_id),
                _ => None,
            };
            if let Some(r) = reservation.filter(|r| !r.is_empty()) {
                all.insert(r.clone());
            }
        }
        c.all = all.into_iter().collect();
        c
    }

    /// Whether live event `a` was caused by a replayed input: its `eventId` is an input's (the
    /// deduplicator forwards events as they are), or `derive_event_id(cause, tag)` of a cause,
    /// the tag being the event's topic, its canonical topic name (`stock.reserved`, ...) or, for
    /// `stock.updated`, `<tag>/<productId>`: the tags the workers use.
    pub fn explains(&mut self, a: &Actual) -> bool {
        let id = a.event.event_id();
        if self.event_ids.contains(id) {
            return true;
        }
        let canonical = match &a.event {
            Event::StockReserved(_) => "stock.reserved",
            Event::StockReservationFailed(_) => "stock.reservation.failed",
            Event::StockReservationReleased(_) => "stock.reservation.released",
            Event::StockReservationExpired(_) => "stock.reservation.expired",
            Event::StockUpdated(_) => "stock.updated",
            Event::OrderConfirmed(_) => "order.confirmed",
            Event::OrderCancelled(_) => "order.cancelled",
            Event::OrderCreated(_) => "order.created",
            Event::OrderCompleted(_) => "order.completed",
            Event::InventoryAdjusted(_) => "inventory.adjusted",
        };
        let mut tags = vec![canonical.to_string(), a.topic.clone()];
        if let Event::StockUpdated(u) = &a.event {
            tags = tags.iter().map(|t| format!("{t}/{}", u.product_id)).collect();
        }
        tags.dedup();
        for tag in tags {
            let all = &self.all;
            let set = self.derived.entry(tag.clone()).or_insert_with(|| all.iter().map(|c| derive_event_id(c, &tag)).collect());
            if set.contains(id) {
                return true;
            }
        }
        false
    }
}

/// Compares the replay's events with the live ones.
///
/// - `same`: an actual event with the same `eventId` has the same topic, key and fields, and,
///   when the replay's event carries its encoded `payload`, the same record value byte for byte;
/// - `changed`: the `eventId` was emitted live but (every copy of it) differs: both values and
///   the differing fields are reported (against the first copy; `payload` with both values in
///   hex when only the encoded bytes differ);
/// - `missing`: no actual event has the `eventId`;
/// - `extra`: an actual event `in_window` whose `eventId` the replay did not emit but that
///   [`Causes::explains`] attributes to a replayed input. Detectable: outputs derived from an
///   input's `eventId`, `orderId` or `reservationId` with the workers' tags. Not detectable: a
///   live output derived some other way; and an event derived from an `orderId` can be caused by
///   an input outside the range of the same order (then it shows as `extra` too).
///
/// Returns one entry per replayed event (in replay order) and per extra event, and the counts.
pub fn diff(
    emitted: &[Emitted],
    actual: &[Actual],
    causes: &mut Causes,
    in_window: impl Fn(&Actual) -> bool,
) -> (Vec<DiffEntry>, DiffCounts) {
    let mut by_id: HashMap<&str, Vec<&Actual>> = HashMap::new();
    for a in actual {
        by_id.entry(a.event.event_id()).or_default().push(a);
    }
    let mut entries = Vec::new();
    let mut counts = DiffCounts::default();
    let mut seen: HashSet<&str> = HashSet::new();
    for e in emitted {
        seen.insert(e.event_id.as_str());
        let entry = |status, a: Option<&Actual>, fields: Vec<FieldDiff>| DiffEntry {
            status,
            topic: e.topic.clone(),
            key: e.key.clone(),
            event: e.event.clone(),
            event_id: e.event_id.clone(),
            cause: Some(e.cause.clone()),
            actual_at: a.map(|a| At { topic: a.topic.clone(), partition: a.partition, offset: a.offset }),
            replay: (status != Status::Same).then(|| e.value.clone()),
            actual: a.filter(|_| status == Status::Changed).map(|a| a.event.to_json()),
            fields,
        };
        let Some(copies) = by_id.get(e.event_id.as_str()) else {
            counts.missing += 1;
            entries.push(entry(Status::Missing, None, Vec::new()));
            continue;
        };
        let compare = |a: &Actual| {
            let mut f = Vec::new();
            if a.topic != e.topic {
                f.push(FieldDiff { path: "topic".into(), replay: json!(e.topic), actual: json!(a.topic) });
            }
            if a.key.as_deref() != Some(e.key.as_str()) {
                f.push(FieldDiff { path: "key".into(), replay: json!(e.key), actual: json!(a.key) });
            }
            if a.event.schema_name() != e.event {
                f.push(FieldDiff { path: "event".into(), replay: json!(e.event), actual: json!(a.event.schema_name()) });
            }
            f.extend(field_diffs(&e.value, &a.event.to_json()));
            if let Some(p) = e.payload.as_ref().filter(|p| f.is_empty() && **p != a.payload) {
                f.push(FieldDiff { path: "payload".into(), replay: json!(hex(p)), actual: json!(hex(&a.payload)) });
            }
            f
        };
        if let Some(a) = copies.iter().find(|a| compare(a).is_empty()) {
            counts.same += 1;
            entries.push(entry(Status::Same, Some(a), Vec::new()));
        } else {
            counts.changed += 1;
            entries.push(entry(Status::Changed, Some(copies[0]), compare(copies[0])));
        }
    }
    let mut extra_ids: HashSet<&str> = HashSet::new();
    for a in actual {
        let id = a.event.event_id();
        if seen.contains(id) || extra_ids.contains(id) || !in_window(a) || !causes.explains(a) {
            continue;
        }
        extra_ids.insert(id);
        counts.extra += 1;
        entries.push(DiffEntry {
            status: Status::Extra,
            topic: a.topic.clone(),
            key: a.key.clone().unwrap_or_default(),
            event: a.event.schema_name().to_string(),
            event_id: id.to_string(),
            cause: None,
            actual_at: Some(At { topic: a.topic.clone(), partition: a.partition, offset: a.offset }),
            replay: None,
            actual: Some(a.event.to_json()),
            fields: Vec::new(),
        });
    }
    (entries, counts)
}

// ------------------------------------------------------------------------------------------
// The broker side.

/// A reader for `replay --through` (the shared [`Reader`] with its own `group.id` prefix).
///
/// Errors: the client cannot be created.
fn reader(broker: &BrokerConfig) -> Result<Reader> {
    Reader::new(broker, "orderflow-replay-through", "creating the replay reader")
}

/// The first offset of each partition `0..partitions` of `topic` whose timestamp is ≥ `ts_ms`
/// (the high watermark when none).
///
/// Errors: the `offsets_for_times` or a watermark request fails.
fn offsets_for_time(reader: &Reader, topic: &str, partitions: i32, ts_ms: i64) -> Result<BTreeMap<i32, i64>> {
    let partitions: Vec<i32> = (0..partitions).collect();
    let mut out = BTreeMap::new();
    for (p, o) in reader.offsets_for_time(topic, &partitions, ts_ms)? {
        let o = match o {
            Some(o) => o,
            None => reader.watermarks(topic, p)?.1,
        };
        out.insert(p, o);
    }
    Ok(out)
}

/// Every record of `topic` in each `(partition, start, end)` range (end exclusive), sorted by
/// partition and offset.
///
/// Errors: those of [`Reader::scan`] (no progress for its stall timeout).
fn read(reader: &Reader, topic: &str, ranges: &[(i32, i64, i64)]) -> Result<Vec<OwnedMessage>> {
    let spans: Vec<Span> =
        ranges.iter().map(|&(partition, start, end)| Span { topic: topic.to_string(), partition, start, end: Some(end) }).collect();
    let mut out = reader.collect(&spans, |m| m.detach())?;
    out.sort_by_key(|m| (m.partition(), m.offset()));
    Ok(out)
}

/// The longest time after an input a timer of `spec` can emit (ms): its reservation TTL and
/// saga timeouts, whichever its kind uses.
fn timer_horizon_ms(spec: &WorkerSpec) -> i64 {
    let mut h = Duration::ZERO;
    for k in crate::kinds::KINDS.iter().filter(|k| k.name == spec.kind) {
        if k.uses_ttl {
            h = h.max(spec.reservation_ttl());
        }
        if k.uses_saga_timeouts {
            h = h.max(spec.saga_timeout()).max(spec.stock_answer_timeout());
        }
    }
    h.as_millis() as i64
}

/// `orderflow replay ... --through WORKER`: rebuilds the shadow state, replays the range through
/// the worker's logic, prints one JSON line per emitted event (`--dry-run`) or per compared event
/// (`--diff`, see [`diff`]) on stdout, and returns the summary:
///
/// ```json
/// {"mode": "dry-run" | "diff", "worker", "topic", "ranges": [{"partition","from","to"}],
///  "reservation_ttl_ms", "approximate": bool, "limits": [text], "shadow": [ShadowReport],
///  "inputs", "processed", "duplicates", "dead_letters", "failures", "timers_fired",
///  "outputs", "outputs_per_topic": {topic: n}, "dead_lettered": [DeadLetter],
///  "failed": [DeadLetter], "time_window_ms": [first, last] | null,
///  "diff": {"same","changed","missing","extra", "read": {topic: records}, "window_ms": [from, to],
///           "whole_topics": bool, "not_same": [DiffEntry]}}   // --diff only
/// ```
///
/// Errors: no `--through` worker, a worker not in the topology or not reading the replayed
/// topic, neither `--dry-run` nor `--diff`, broker errors, an undecodable changelog record.
/// Differences are not errors.
pub async fn run(args: &ReplayArgs, loaded: &Loaded, resolved: &Resolved) -> Result<Value> {
    let t = &loaded.topology;
    let worker = args.through.clone().context("--through WORKER is required here")?;
    let Some(spec) = t.workers.get(&worker) else {
        bail!("worker {worker} is not in the topology (workers: {})", t.workers.keys().cloned().collect::<Vec<_>>().join(", "));
    };
    let topic = resolved.topic.clone();
    if !spec.inputs.contains(&topic) {
        bail!("worker {worker} does not read {topic} (its inputs: {})", spec.inputs.join(", "));
    }
    let mode = match (args.dry_run, args.diff) {
        (_, true) => "diff",
        (true, false) => "dry-run",
        (false, false) => bail!("--through needs --dry-run or --diff"),
    };
    let mut spec = spec.clone();
    let kind = crate::kinds::KINDS.iter().find(|k| k.name == spec.kind).with_context(|| format!("unknown kind {}", spec.kind))?;
    if let Some(ttl) = args.reservation_ttl {
        if kind.uses_ttl {
            spec.reservation_ttl = Some(ttl);
        } else {
            tracing::warn!(%worker, kind = %spec.kind, "--reservation-ttl ignored: this kind has no reservation TTL");
        }
    }
    let processor = crate::kinds::build(&spec).with_context(|| format!("worker {worker}: unknown kind {}", spec.kind))?;
    let ports: BTreeMap<String, String> =
        spec.outputs.iter().filter(|(p, _)| kind.ports.contains(&p.as_str())).map(|(p, t)| (p.clone(), t.clone())).collect();
    let codec = Codec::load(&loaded.avro_dir(), t.broker.registry_url.as_deref())?;
    let rules = Rules::of(loaded, &spec.inputs);
    let broker = t.broker.clone();

    // 1. The range's records.
    let inputs = {
        let (broker, resolved) = (broker.clone(), resolved.clone());
        blocking(move || {
            let mut v = Vec::new();
            crate::replay::read_range(&broker, &resolved, &mut |m| {
                v.push(m);
                Ok(())
            })?;
            Ok(v)
        })
        .await?
    };

    // 2. The shadow of every replayed partition.
    let changelog = orderflow_runtime::changelog::topic(&worker);
    let guarantee = spec.guarantee(&t.defaults);
    // Partitions with an empty range replay nothing: no shadow needed.
    let ranges: Vec<(i32, i64, i64)> = resolved.ranges.iter().filter(|r| r.from < r.to).map(|r| (r.partition, r.from, r.to)).collect();
    let (shards, mut reports) = {
        let (broker, changelog, inputs_of, topic, ranges) =
            (broker.clone(), changelog.clone(), spec.inputs.clone(), topic.clone(), ranges.clone());
        blocking(move || {
            let reader = reader(&broker)?;
            let mut shards = BTreeMap::new();
            let mut reports = Vec::new();
            for (p, from, _) in ranges {
                let marks = reader
                    .watermarks(&changelog, p)
                    .with_context(|| format!("the changelog {changelog} (created by `orderflow topics`)"))?;
                let mut b = ShadowBuilder::new(&inputs_of, &topic, p, from, marks, guarantee);
                for m in read(&reader, &changelog, &[(p, marks.0, marks.1)])? {
                    b.push(m.offset(), m.key().unwrap_or_default(), m.payload()).map_err(|e| anyhow::anyhow!("{changelog}[{p}]: {e}"))?;
                }
                let (store, report) = b.finish();
                shards.insert(p, store);
                reports.push(report);
            }
            Ok((shards, reports))
        })
        .await?
    };
    if spec.inputs.len() > 1 {
        for r in reports.iter_mut().filter(|r| r.position < r.range_from) {
            r.approximate = true;
            r.notes.push(format!(
                "the last unit before the range ended at offset {}; its records of other inputs than {topic} are not warmed up",
                r.position
            ));
        }
    }

    // 3. Warm-up records between each shadow's position and the range start.
    let warm: Vec<(i32, i64, i64)> =
        reports.iter().filter(|r| r.position < r.range_from).map(|r| (r.partition, r.position, r.range_from)).collect();
    let warm_records = if warm.is_empty() {
        Vec::new()
    } else {
        let (broker, topic) = (broker.clone(), topic.clone());
        blocking(move || {
            let reader = reader(&broker)?;
            let mut lows = Vec::new();
            for (p, from, to) in warm {
                let (low, _) = reader.watermarks(&topic, p)?;
                lows.push((p, from.max(low), to));
            }
            read(&reader, &topic, &lows)
        })
        .await?
    };
    let mut engine = Engine::new(&worker, processor, &topic, ports.clone(), shards);
    for m in &warm_records {
        let ts = timestamp_of(m).unwrap_or(i64::MIN);
        let decoded = admit(&codec, &rules, &worker, m, ts).await;
        engine.step(m.partition(), m.offset(), ts, decoded, false).await;
    }
    for r in reports.iter_mut() {
        r.warmed_up = warm_records.iter().filter(|m| m.partition() == r.partition).count() as u64;
    }

    // 4. The range.
    let keys: Vec<(i32, i64, i64)> = inputs.iter().map(|m| (m.partition(), m.offset(), timestamp_of(m).unwrap_or(i64::MIN))).collect();
    let mut decoded_inputs = Vec::new();
    for i in replay_order(&keys) {
        let m = &inputs[i];
        let ts = keys[i].2;
        let decoded = admit(&codec, &rules, &worker, m, ts).await;
        if let Ok(e) = &decoded {
            decoded_inputs.push(e.clone());
        }
        engine.step(m.partition(), m.offset(), ts, decoded, true).await;
    }
    let times: Vec<i64> = keys.iter().map(|k| k.2).filter(|t| *t != i64::MIN).collect();
    let window = times.iter().min().zip(times.iter().max()).map(|(a, b)| (*a, *b));

    let approximate = reports.iter().any(|r| r.approximate);
    let mut limits = Vec::new();
    let others: Vec<&String> = spec.inputs.iter().filter(|i| **i != topic).collect();
    if !others.is_empty() {
        limits.push(format!(
            "only {topic} is replayed: records of the worker's other inputs ({}) are not, so outputs and timers that depend on them can differ from the live run",
            others.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
        ));
    }
    if engine.pending_timers() > 0 {
        limits.push(format!(
            "{} timer(s) due after the last replayed record's time ({}) did not fire",
            engine.pending_timers(),
            engine.clock_ms()
        ));
    }
    let mut summary = json!({
        "mode": mode,
        "worker": worker,
        "topic": topic,
        "ranges": resolved.ranges.iter().map(|r| json!({"partition": r.partition, "from": r.from, "to": r.to})).collect::<Vec<_>>(),
        "reservation_ttl_ms": kind.uses_ttl.then(|| spec.reservation_ttl().as_millis() as i64),
        "approximate": approximate,
        "limits": limits,
        "shadow": reports,
        "time_window_ms": window.map(|(a, b)| json!([a, b])),
    });
    let stats = serde_json::to_value(&engine.stats)?;
    for (k, v) in stats.as_object().expect("stats is an object") {
        summary[k] = v.clone();
    }
    summary["dead_lettered"] = serde_json::to_value(&engine.dead_letters)?;
    summary["failed"] = serde_json::to_value(&engine.failures)?;

    if mode == "dry-run" {
        for e in &engine.emitted {
            println!("{}", serde_json::to_string(e)?);
        }
        return Ok(summary);
    }

    // 5. --diff: what was emitted live.
    let horizon = timer_horizon_ms(&spec).max(spec.reservation_ttl.map(|d| d.as_millis() as i64).unwrap_or(0));
    let (w_from, w_to) = match window {
        Some((a, b)) => (a.saturating_sub(WINDOW_MARGIN_MS), b.saturating_add(horizon).saturating_add(WINDOW_MARGIN_MS)),
        None => (i64::MIN, i64::MAX),
    };
    let out_topics: BTreeSet<String> = ports.values().cloned().collect();
    let (records, whole) = {
        let (broker, out_topics) = (broker.clone(), out_topics.clone());
        blocking(move || {
            let reader = reader(&broker)?;
            let mut marks = BTreeMap::new();
            let mut total = 0;
            for t in &out_topics {
                for p in 0..reader.partitions(t)? {
                    let m = reader.watermarks(t, p)?;
                    total += m.1 - m.0;
                    marks.insert((t.clone(), p), m);
                }
            }
            let whole = total <= WHOLE_TOPIC_LIMIT || w_from == i64::MIN;
            let mut records = Vec::new();
            for t in &out_topics {
                let parts: Vec<i32> = marks.keys().filter(|(x, _)| x == t).map(|(_, p)| *p).collect();
                let all: Vec<(i32, i64, i64)> = parts.iter().map(|p| (*p, marks[&(t.clone(), *p)].0, marks[&(t.clone(), *p)].1)).collect();
                let ranges = if whole {
                    all
                } else {
                    let by_time = offsets_for_time(&reader, t, parts.len() as i32, w_from)
                        .and_then(|s| Ok((s, offsets_for_time(&reader, t, parts.len() as i32, w_to.saturating_add(1))?)));
                    match by_time {
                        // Clamped to the watermarks; an end at or before the start (tansu answers a
                        // time past the end with 0) reads to the high watermark: a superset, the
                        // window filter applies afterwards.
                        Ok((starts, ends)) => all
                            .iter()
                            .map(|&(p, low, high)| {
                                let start = starts.get(&p).copied().unwrap_or(low).clamp(low, high);
                                let end = ends.get(&p).copied().filter(|e| *e > start).map_or(high, |e| e.min(high));
                                (p, start, end)
                            })
                            .collect(),
                        Err(e) => {
                            eprintln!("warning: {e:#}; reading the whole of {t} instead of the time window");
                            all
                        }
                    }
                };
                records.extend(read(&reader, t, &ranges)?);
            }
            Ok((records, whole))
        })
        .await?
    };
    let mut read: BTreeMap<String, u64> = out_topics.iter().map(|t| (t.clone(), 0)).collect();
    let mut actual = Vec::new();
    let mut undecodable = 0u64;
    for m in &records {
        *read.entry(m.topic().to_string()).or_default() += 1;
        let decoded = match m.payload() {
            Some(p) => codec.decode(p).await.ok(),
            None => None,
        };
        let Some(event) = decoded else {
            undecodable += 1;
            continue;
        };
        actual.push(Actual {
            topic: m.topic().to_string(),
            partition: m.partition(),
            offset: m.offset(),
            timestamp_ms: timestamp_of(m),
            key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
            event,
            payload: m.payload().unwrap_or_default().to_vec(),
        });
    }
    // Byte for byte: each replayed event encoded as the live worker encodes it.
    for e in engine.emitted.iter_mut() {
        e.payload = Some(codec.encode(&e.topic, &e.record).await.with_context(|| format!("encoding {} {}", e.event, e.event_id))?);
    }
    let mut causes = Causes::of(&decoded_inputs);
    let in_window = |a: &Actual| a.timestamp_ms.is_none_or(|ts| ts >= w_from && ts <= w_to);
    let (entries, counts) = diff(&engine.emitted, &actual, &mut causes, in_window);
    for e in &entries {
        println!("{}", serde_json::to_string(e)?);
    }
    let not_same: Vec<&DiffEntry> = entries.iter().filter(|e| e.status != Status::Same).collect();
    summary["diff"] = json!({
        "same": counts.same,
        "changed": counts.changed,
        "missing": counts.missing,
        "extra": counts.extra,
        "read": read,
        "undecodable": undecodable,
        "whole_topics": whole,
        "window_ms": window.map(|_| json!([w_from, w_to])),
        "not_same": not_same,
    });
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use orderflow_api::events::StockUpdated;
    use orderflow_api::fixtures::*;
    use orderflow_api::{handle, Changes, Context, StateTxn};
    use orderflow_runtime::deadletter::DeadLetterClass;
    use orderflow_runtime::changelog;

    const TOPIC: &str = "stock.commands";
    const T0: i64 = 1_700_000_000_000;
    const TTL: i64 = 60_000;

    fn inputs() -> Vec<String> {
        vec![TOPIC.to_string()]
    }

    /// Changelog records `(offset, key, value)` of `units` (changes, next input offset), from
    /// offset 0, as the runtime writes them.
    /// A changelog record: offset, key, value.
    type Rec = (i64, Vec<u8>, Option<Vec<u8>>);

    fn changelog_of(units: &[(Changes, i64)]) -> Vec<Rec> {
        let mut out = Vec::new();
        for (changes, next) in units {
            for r in changelog::records(&inputs(), changes, &BTreeMap::from([(TOPIC.to_string(), *next)])) {
                out.push((out.len() as i64, r.key, r.value));
            }
        }
        out
    }

    fn rebuild(records: &[Rec], from: i64) -> (MemoryStore, ShadowReport) {
        let low = records.first().map(|r| r.0).unwrap_or(0);
        let high = records.last().map(|r| r.0 + 1).unwrap_or(0);
        let mut b = ShadowBuilder::new(&inputs(), TOPIC, 0, from, (low, high), Guarantee::EffectivelyOnce);
        for (o, k, v) in records {
            b.push(*o, k, v.as_deref()).unwrap();
        }
        b.finish()
    }

    fn changes(writes: &[(&str, Option<&str>)], timers: &[(&str, Option<i64>)]) -> Changes {
        let mut c = Changes::default();
        for (k, v) in writes {
            c.writes.insert(k.as_bytes().to_vec(), v.map(|v| v.as_bytes().to_vec()));
        }
        for (k, at) in timers {
            c.timers.insert(k.as_bytes().to_vec(), *at);
        }
        c
    }

    /// Three committed units ending at input offsets 3, 5 and 9, then an orphan record.
    fn three_units() -> Vec<Rec> {
        let mut recs = changelog_of(&[
            (changes(&[("a", Some("1"))], &[("t", Some(100))]), 3),
            (changes(&[("a", Some("2")), ("b", Some("1"))], &[]), 5),
            (changes(&[("a", None)], &[]), 9),
        ]);
        let orphan = changelog::records(&inputs(), &changes(&[("c", Some("1"))], &[]), &BTreeMap::from([(TOPIC.to_string(), 12)]));
        recs.push((recs.len() as i64, orphan[0].key.clone(), orphan[0].value.clone()));
        recs
    }

    #[test]
    fn shadow_applies_the_units_that_ended_at_or_before_the_range_start() {
        let recs = three_units();
        let (store, r) = rebuild(&recs, 5);
        assert_eq!(store.data, BTreeMap::from([(b"a".to_vec(), b"2".to_vec()), (b"b".to_vec(), b"1".to_vec())]));
        assert_eq!(store.timers, BTreeMap::from([(b"t".to_vec(), 100)]));
        assert_eq!((r.units, r.position, r.not_applied, r.approximate), (2, 5, 1, false), "{r:?}");

        // No marker at offset 4: the shadow is at 3, and 3..4 is warmed up by the caller.
        let (store, r) = rebuild(&recs, 4);
        assert_eq!(store.data, BTreeMap::from([(b"a".to_vec(), b"1".to_vec())]));
        assert_eq!((r.units, r.position), (1, 3));

        // Past every marker: everything committed, the orphan dropped.
        let (store, r) = rebuild(&recs, 100);
        assert_eq!(store.data, BTreeMap::from([(b"b".to_vec(), b"1".to_vec())]));
        assert_eq!((r.units, r.position, r.not_applied), (3, 9, 1));

        // Before every unit: empty.
        let (store, r) = rebuild(&recs, 0);
        assert!(store.data.is_empty() && store.timers.is_empty());
        assert_eq!((r.units, r.position), (0, 0));
    }

    #[test]
    fn a_compacted_changelog_gives_an_approximate_shadow_from_the_records_own_offsets() {
        // Compaction removed unit 1's marker and its superseded `a=1`: offsets 0 and 2 are gone.
        let recs: Vec<_> = three_units().into_iter().filter(|r| r.0 != 0 && r.0 != 2).collect();
        let (store, r) = rebuild(&recs, 4);
        assert_eq!(store.timers, BTreeMap::from([(b"t".to_vec(), 100)]), "the timer record carries offset 3 ≤ 4");
        assert!(store.data.is_empty(), "a=1 was compacted away and a=2 belongs to a unit past the start");
        assert!(r.approximate, "{r:?}");
        assert!(r.notes.iter().any(|n| n.contains("compaction")), "{:?}", r.notes);

        // A changelog starting above 0 (retention) is approximate too.
        let recs: Vec<_> = three_units().into_iter().skip(3).collect();
        let (_, r) = rebuild(&recs, 100);
        assert!(r.approximate && r.notes[0].contains("starts at offset 3"), "{r:?}");
    }

    #[test]
    fn garbage_changelog_records_are_errors() {
        let mut b = ShadowBuilder::new(&inputs(), TOPIC, 0, 5, (0, 2), Guarantee::EffectivelyOnce);
        assert!(b.push(0, b"x", Some(&[1, 0])).unwrap_err().contains("unknown changelog key"));
        assert!(b.push(1, b"m", Some(&[7, 0])).unwrap_err().contains("version"));
    }

    fn reserver_ports() -> BTreeMap<String, String> {
        [
            ("reserved", "stock.reserved"),
            ("failed", "stock.reservation.failed"),
            ("released", "stock.reservation.released"),
            ("updated", "stock.updated"),
        ]
        .into_iter()
        .map(|(p, t)| (p.to_string(), t.to_string()))
        .collect()
    }

    /// A stock reserver (TTL `ttl`) over a shadow rebuilt from a changelog holding a restock of
    /// 10 × P-1, committed at input offset 1.
    fn reserver_engine(ttl: i64) -> Engine {
        let mut empty = MemoryStore::default();
        let mut p = stock_reserver::StockReserver::new(ttl);
        let ctx = Context { topic: TOPIC.into(), partition: 0, offset: 0, now_ms: T0 };
        let mut out = orderflow_api::Outputs::new(reserver_ports().into_keys());
        let mut txn = StateTxn::new(&empty);
        handle(&mut p, &ctx, &inventory_adjusted("restock-1", T0, &[("P-1", 10)]).into(), &mut txn, &mut out).unwrap();
        let c = txn.into_changes();
        let (shadow, report) = rebuild(&changelog_of(&[(c.clone(), 1)]), 1);
        assert_eq!(report.position, 1);
        empty.apply(c);
        assert_eq!(shadow.data, empty.data, "the shadow is the committed state");
        Engine::new("stock-reserver", Box::new(stock_reserver::StockReserver::new(ttl)), TOPIC, reserver_ports(), BTreeMap::from([(0, shadow)]))
    }

    /// Inputs 1..=5: an order, its repeat, an order without a store, a record that does not
    /// decode, an order the stock cannot serve.
    async fn replay(engine: &mut Engine) {
        let o1: Event = order_created("e-o1", "O-1", T0 + 1_000, &[("P-1", 3)]).into();
        let no_store: Event =
            orderflow_api::events::OrderCreated { store_id: String::new(), ..order_created("e-o3", "O-3", T0 + 3_000, &[("P-1", 1)]) }
                .into();
        let o2: Event = order_created("e-o2", "O-2", T0 + 5_000, &[("P-1", 20)]).into();
        engine.step(0, 1, T0 + 1_000, Ok(o1.clone()), true).await;
        engine.step(0, 2, T0 + 2_000, Ok(o1), true).await;
        engine.step(0, 3, T0 + 3_000, Ok(no_store), true).await;
        engine.step(0, 4, T0 + 4_000, Err(Rejection::new(DeadLetterClass::NotAvro, "not Avro")), true).await;
        engine.step(0, 5, T0 + 5_000, Ok(o2), true).await;
    }

    #[tokio::test]
    async fn dry_run_emits_what_the_worker_would_with_dead_letters_and_duplicates() {
        let mut engine = reserver_engine(TTL);
        replay(&mut engine).await;
        let got: Vec<(&str, &str, &str, &str)> =
            engine.emitted.iter().map(|e| (e.port.as_str(), e.topic.as_str(), e.key.as_str(), e.event.as_str())).collect();
        assert_eq!(
            got,
            vec![
                ("reserved", "stock.reserved", "O-1", "StockReserved"),
                ("failed", "stock.reservation.failed", "O-2", "StockReservationFailed")
            ]
        );
        let reserved = &engine.emitted[0];
        assert_eq!(reserved.event_id, derive_event_id("e-o1", "stock.reserved"));
        assert_eq!(reserved.value["expiresAt"], T0 + 1_000 + TTL);
        assert_eq!(reserved.cause, Cause::Input { partition: 0, offset: 1, event_id: "e-o1".into() });
        assert_eq!(engine.emitted[1].value["reason"], "INSUFFICIENT_STOCK");
        assert_eq!(engine.emitted[1].value["items"][0]["available"], 7, "the shadow's restock minus O-1's reservation");
        let s = &engine.stats;
        assert_eq!((s.inputs, s.processed, s.duplicates, s.dead_letters, s.failures, s.outputs), (5, 2, 1, 2, 0, 2), "{s:?}");
        assert_eq!(s.outputs_per_topic, BTreeMap::from([("stock.reserved".into(), 1), ("stock.reservation.failed".into(), 1)]));
        let dl: Vec<(i64, &str)> = engine.dead_letters.iter().map(|d| (d.offset, d.class.as_str())).collect();
        assert_eq!(dl, vec![(3, "invalid"), (4, "not_avro")]);
        let line = serde_json::to_value(reserved).unwrap();
        for k in ["port", "topic", "key", "event", "eventId", "value", "cause"] {
            assert!(line.get(k).is_some(), "{k} missing from {line}");
        }
        // The shadow moved; nothing else did.
        let res: Value = engine.shards[&0].get_json(&stock_reserver::reservation_key("O-1")).unwrap();
        assert_eq!(res["status"], "LIVE");
    }

    #[tokio::test]
    async fn a_warm_up_moves_the_state_without_reporting() {
        let mut engine = reserver_engine(TTL);
        engine.step(0, 1, T0 + 1_000, Ok(order_created("e-o1", "O-1", T0 + 1_000, &[("P-1", 9)]).into()), false).await;
        assert!(engine.emitted.is_empty());
        assert_eq!(engine.stats.inputs, 0);
        engine.step(0, 2, T0 + 2_000, Ok(order_created("e-o2", "O-2", T0 + 2_000, &[("P-1", 2)]).into()), true).await;
        assert_eq!(engine.emitted.len(), 1);
        assert_eq!(engine.emitted[0].event, "StockReservationFailed", "9 of 10 were reserved during the warm-up");
    }

    #[tokio::test]
    async fn timers_fire_as_the_replayed_time_passes() {
        let ports = BTreeMap::from([("expired".to_string(), "stock.reservation.expired".to_string())]);
        let mut engine = Engine::new("reservation-expirer", Box::new(reservation_expirer::ReservationExpirer::new(TTL)), "stock.reserved", ports, BTreeMap::new());
        let r1 = stock_reserved("e-r1", "O-1", "R-1", T0, T0 + TTL, &[("P-1", 1)]);
        let r2 = stock_reserved("e-r2", "O-2", "R-2", T0 + TTL + 5, T0 + 2 * TTL + 5, &[("P-1", 1)]);
        engine.step(0, 0, T0, Ok(r1.into()), true).await;
        engine.step(0, 1, T0 + TTL - 1, Ok(stock_reserved("e-r3", "O-3", "R-3", T0, T0 + TTL, &[]).into()), true).await;
        assert!(engine.emitted.is_empty(), "not due yet");
        engine.step(1, 0, T0 + TTL + 5, Ok(r2.into()), true).await;
        assert_eq!(engine.stats.timers_fired, 2, "O-1 and O-3 (O-3 has no items but still a timer)");
        let e = &engine.emitted[0];
        assert_eq!((e.event.as_str(), e.key.as_str()), ("StockReservationExpired", "O-1"));
        assert_eq!(e.event_id, derive_event_id("R-1", "stock.reservation.expired"));
        assert!(matches!(&e.cause, Cause::Timer { partition: 0, due_ms, at_ms, .. } if *due_ms == T0 + TTL && *at_ms == T0 + TTL + 5));
    }

    fn actual_of(e: &Emitted, offset: i64) -> Actual {
        Actual {
            topic: e.topic.clone(),
            partition: 0,
            offset,
            timestamp_ms: Some(T0),
            key: Some(e.key.clone()),
            event: Event::from_json(&e.event, e.value.clone()).unwrap(),
            payload: e.payload.clone().unwrap_or_default(),
        }
    }

    #[tokio::test]
    async fn diff_classifies_same_changed_missing_and_extra() {
        // Live: the run's TTL. Replay: the same inputs with another TTL.
        let mut live = reserver_engine(TTL);
        replay(&mut live).await;
        let mut actual: Vec<Actual> = live.emitted.iter().enumerate().map(|(i, e)| actual_of(e, i as i64)).collect();
        let mut shadow = reserver_engine(TTL);
        replay(&mut shadow).await;
        let inputs: Vec<Event> = vec![
            order_created("e-o1", "O-1", T0 + 1_000, &[("P-1", 3)]).into(),
            order_created("e-o2", "O-2", T0 + 5_000, &[("P-1", 20)]).into(),
        ];

        // Identical runs: all same.
        let (entries, counts) = diff(&shadow.emitted, &actual, &mut Causes::of(&inputs), |_| true);
        assert_eq!(counts, DiffCounts { same: 2, changed: 0, missing: 0, extra: 0 });
        assert!(entries.iter().all(|e| e.status == Status::Same && e.replay.is_none()));

        // Another TTL: stock.reserved changed in expiresAt only.
        let mut other = reserver_engine(2 * TTL);
        replay(&mut other).await;
        let (entries, counts) = diff(&other.emitted, &actual, &mut Causes::of(&inputs), |_| true);
        assert_eq!(counts, DiffCounts { same: 1, changed: 1, missing: 0, extra: 0 });
        let changed = entries.iter().find(|e| e.status == Status::Changed).unwrap();
        assert_eq!(changed.event, "StockReserved");
        assert_eq!(
            changed.fields,
            vec![FieldDiff { path: "expiresAt".into(), replay: json!(T0 + 1_000 + 2 * TTL), actual: json!(T0 + 1_000 + TTL) }]
        );
        assert_eq!(changed.replay.as_ref().unwrap()["expiresAt"], T0 + 1_000 + 2 * TTL);
        assert_eq!(changed.actual.as_ref().unwrap()["expiresAt"], T0 + 1_000 + TTL);

        // Nothing emitted live for O-2 (missing), a live stock.updated derived from O-1's input
        // that the replay does not emit (extra), and an unrelated live event (ignored).
        actual.retain(|a| a.event.order_id() != Some("O-2"));
        let stray = |id: String| StockUpdated {
            event_id: id,
            occurred_at: T0,
            product_id: "P-1".into(),
            hq_id: HQ.into(),
            store_id: STORE.into(),
            hq_stock: Some(orderflow_api::events::StockLevel { previous: 0, current: 1 }),
            store_stock: orderflow_api::events::StockLevel { previous: 0, current: 1 },
            change_amount: 1,
            change_reason: "CORRECTION".into(),
            reference_id: "x".into(),
        };
        for (i, id) in [derive_event_id("e-o1", "stock.updated/P-1"), "unrelated".to_string()].into_iter().enumerate() {
            actual.push(Actual {
                topic: "stock.updated".into(),
                partition: 1,
                offset: i as i64,
                timestamp_ms: Some(T0),
                key: Some("P-1".into()),
                event: stray(id).into(),
                payload: Vec::new(),
            });
        }
        let (entries, counts) = diff(&shadow.emitted, &actual, &mut Causes::of(&inputs), |_| true);
        assert_eq!(counts, DiffCounts { same: 1, changed: 0, missing: 1, extra: 1 });
        let missing = entries.iter().find(|e| e.status == Status::Missing).unwrap();
        assert_eq!((missing.key.as_str(), missing.event.as_str()), ("O-2", "StockReservationFailed"));
        let extra = entries.iter().find(|e| e.status == Status::Extra).unwrap();
        assert_eq!(extra.event_id, derive_event_id("e-o1", "stock.updated/P-1"));
        // Outside the window it is not reported.
        let (_, counts) = diff(&shadow.emitted, &actual, &mut Causes::of(&inputs), |a| a.topic != "stock.updated");
        assert_eq!(counts.extra, 0);
    }

    #[tokio::test]
    async fn field_diffs_name_nested_paths_and_the_record_key() {
        let a = json!({"x": 1, "items": [{"p": "A", "n": 1}, {"p": "B", "n": 2}], "y": [1]});
        let b = json!({"x": 1, "items": [{"p": "A", "n": 1}, {"p": "B", "n": 3}], "y": [1, 2], "z": true});
        let paths: Vec<String> = field_diffs(&a, &b).into_iter().map(|d| d.path).collect();
        assert_eq!(paths, vec!["items[1].n", "y", "z"]);
        let mut e = reserver_engine(TTL);
        replay(&mut e).await;
        let mut a = actual_of(&e.emitted[0], 0);
        a.key = Some("other".into());
        let (entries, _) = diff(&e.emitted[..1], &[a], &mut Causes::default(), |_| true);
        assert_eq!(entries[0].status, Status::Changed);
        assert_eq!(entries[0].fields[0].path, "key");
    }

    #[tokio::test]
    async fn same_fields_with_other_bytes_is_changed_in_payload() {
        let mut e = reserver_engine(TTL);
        replay(&mut e).await;
        let mut emitted = e.emitted[..1].to_vec();
        emitted[0].payload = Some(vec![0xc3, 0x01, 0xaa]);
        let mut a = actual_of(&emitted[0], 0);
        let (_, counts) = diff(&emitted, std::slice::from_ref(&a), &mut Causes::default(), |_| true);
        assert_eq!(counts.same, 1, "identical bytes");
        a.payload = vec![0xc3, 0x01, 0xab];
        let (entries, counts) = diff(&emitted, &[a], &mut Causes::default(), |_| true);
        assert_eq!(counts.changed, 1);
        assert_eq!(entries[0].fields, vec![FieldDiff { path: "payload".into(), replay: json!("c301aa"), actual: json!("c301ab") }]);
    }

    #[test]
    fn records_are_replayed_in_offset_order_per_partition_merged_by_time() {
        // (partition, offset, timestamp); partition 0 has a timestamp going backwards.
        let items = [(0, 11, 300), (1, 5, 100), (0, 10, 200), (1, 6, 250), (0, 12, 150)];
        let order: Vec<(i32, i64)> = replay_order(&items).into_iter().map(|i| (items[i].0, items[i].1)).collect();
        assert_eq!(order, vec![(1, 5), (0, 10), (1, 6), (0, 11), (0, 12)]);
    }
}
