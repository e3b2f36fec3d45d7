//! The replay engine: the range's records through the live worker's step against the shadow state,
//! with the record time as clock ([`Engine`]).

use std::collections::BTreeMap;

use orderflow_api::{Event, MemoryStore, Processor};
use orderflow_runtime::step::{self, Input, Outcome, Rejection, RetryBudget};
use serde::Serialize;
use serde_json::Value;

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
    /// The wired ports (the keys of `ports`), as the step takes them.
    wired: Vec<String>,
    pub(super) shards: BTreeMap<i32, MemoryStore>,
    clock: i64,
    /// The worker's `state_retention` in ms (`Context::retention_ms`).
    retention_ms: i64,
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
    pub fn new(
        worker: &str,
        processor: Box<dyn Processor>,
        topic: &str,
        ports: BTreeMap<String, String>,
        shards: BTreeMap<i32, MemoryStore>,
    ) -> Engine {
        Engine {
            processor,
            worker: format!("replay --through {worker}"),
            topic: topic.to_string(),
            wired: ports.keys().cloned().collect(),
            ports,
            shards,
            clock: i64::MIN,
            retention_ms: orderflow_api::millis(orderflow_api::DEFAULT_STATE_RETENTION),
            stats: Stats::default(),
            emitted: Vec::new(),
            dead_letters: Vec::new(),
            failures: Vec::new(),
        }
    }

    /// Runs with the worker's `state_retention` (ms) instead of the default. Ids the replay itself
    /// remembers are not indexed (a replay writes no commit markers), so only ids of the shadow's
    /// changelog units are forgotten within a replay: far shorter than any retention in practice.
    pub fn with_retention(mut self, retention_ms: i64) -> Engine {
        self.retention_ms = retention_ms;
        self
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
    /// rejected, [`admit`](super::admit)). The clock moves to `ts_ms` (never back). Timers due at the clock
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
        let states: BTreeMap<i32, &MemoryStore> = partitions.iter().map(|p| (*p, &self.shards[p])).collect();
        let at = step::At { now_ms: now, retention_ms: self.retention_ms };
        let staged = step::step(self.processor.as_mut(), &self.wired, &states, records, at, &mut RetryBudget::none(), &self.worker).await;
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
