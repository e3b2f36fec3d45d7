//! The broker-free step of a unit of work: admitted records and partition states in, staged
//! effects out. No Kafka, no sled, no wall clock: the worker loop (`worker`), `orderflow replay
//! --through` and the fuzz targets all run their records through [`admit`] (the fuzz targets
//! through its [`Rules`] around the registry-free decode they check) and [`step`], so live
//! processing, replay and fuzzing cannot drift apart.
//!
//! A step, given the unit's records (each already admitted or rejected), the states of the
//! partitions it may touch, the clock reading `now_ms` and a [`RetryBudget`]:
//! 1. runs the processor on each admitted event in order with `eventId` dedupe
//!    (`orderflow_api::handle`), retrying a transient failure in place with the retry policy's
//!    backoff (the partition waits, so per-key order holds);
//! 2. then fires the timers due at `now_ms` of every given partition, earliest first, one at a
//!    time (`orderflow_api::fire_timer`), so each output names the timer that caused it, and
//!    the runtime's retention sweep when due ([`crate::retention`]; armed by a partition's first
//!    records);
//! 3. returns [`Staged`]: outputs with their [`Cause`], dead letters with their class, the state
//!    and timer changes and next input offsets per partition, the notes, and the failure that
//!    would stop the instance, if any (the step stops there).
//!
//! Waits go through `tokio::time` (virtual under `tokio::time::pause`), never blocking a thread.

use std::collections::BTreeMap;
use std::time::Duration;

use orderflow_api::{
    fire_timer, handle, Changes, Context, Event, Handled, Note, Output, Outputs, ProcessError, Processor, StateRead, StateTxn,
};
use tracing::{debug, warn};

use crate::codec::Codec;
use crate::deadletter::DeadLetterClass;
use crate::retention;
use crate::topology::{Loaded, RetryPolicy};

/// When a step runs: the clock reading and the worker's `state_retention`, both in ms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct At {
    /// Processing time, ms since the epoch (`Context::now_ms`).
    pub now_ms: i64,
    /// `Context::retention_ms`: how long closed records and remembered `eventId`s are kept.
    pub retention_ms: i64,
}

impl At {
    /// `now_ms` with the default retention ([`orderflow_api::DEFAULT_STATE_RETENTION`]).
    pub fn now(now_ms: i64) -> At {
        At { now_ms, retention_ms: orderflow_api::millis(orderflow_api::DEFAULT_STATE_RETENTION) }
    }
}

/// Longest `eventId` a worker accepts, in bytes (UUIDs have 36): a longer one is `invalid`. Bounds
/// what a unit's remembered ids add to its commit marker (`changelog`), so they always fit one
/// (with `max_batch` ≤ [`crate::topology::MAX_BATCH_LIMIT`]) and are forgotten with it.
pub const MAX_EVENT_ID_BYTES: usize = 128;

/// Where an input record was read: no rdkafka type, so replays and tests build it freely.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Input<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
}

/// Why a record is dead-lettered instead of processed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub class: DeadLetterClass,
    pub message: String,
    /// Attempts made, retries included (the `orderflow.dlq.attempts` header).
    pub attempts: u32,
}

impl Rejection {
    /// A rejection after one attempt.
    pub fn new(class: DeadLetterClass, message: impl Into<String>) -> Rejection {
        Rejection { class, message: message.into(), attempts: 1 }
    }
}

/// The admission rules: what an input record must satisfy before its event reaches the
/// processor (`[defaults]` and the topics' `schema` in `topology.toml`).
#[derive(Debug, Clone, Default)]
pub struct Rules {
    /// `oversized`: a value longer than this many bytes (`max_record_bytes`).
    pub max_record_bytes: usize,
    /// `future_timestamp`: `occurredAt` more than this many ms after `now_ms` (`max_clock_skew`).
    pub max_clock_skew_ms: i64,
    /// `wrong_schema`: input topic → the Avro record names it carries. A topic without an entry
    /// carries any.
    pub schemas: BTreeMap<String, Vec<String>>,
}

impl Rules {
    /// The rules of the input topics `inputs` in `loaded`.
    pub fn of(loaded: &Loaded, inputs: &[String]) -> Rules {
        let t = &loaded.topology;
        Rules {
            max_record_bytes: t.defaults.max_record_bytes,
            max_clock_skew_ms: i64::try_from(t.defaults.max_clock_skew.as_millis()).unwrap_or(i64::MAX),
            schemas: inputs
                .iter()
                .filter_map(|i| Some((i.clone(), t.topics.get(i)?.schema.as_ref()?.names().iter().map(|n| n.to_string()).collect())))
                .collect(),
        }
    }

    /// The rules on the raw value: none at all is `truncated` (a tombstone on an event topic),
    /// longer than `max_record_bytes` is `oversized`.
    pub fn check_value<'v>(&self, value: Option<&'v [u8]>) -> Result<&'v [u8], Rejection> {
        let Some(value) = value else {
            return Err(Rejection::new(DeadLetterClass::Truncated, "record has no value (a tombstone on an event topic)"));
        };
        if value.len() > self.max_record_bytes {
            return Err(Rejection::new(
                DeadLetterClass::Oversized,
                format!("value of {} bytes exceeds max_record_bytes {}", value.len(), self.max_record_bytes),
            ));
        }
        Ok(value)
    }

    /// The rules on the decoded event read from `topic`: a schema the topic does not carry is
    /// `wrong_schema`, an empty `eventId` is `invalid` (idempotency needs it, domain rule 7),
    /// `occurredAt` beyond the allowed clock skew of `now_ms` is `future_timestamp`.
    pub fn check_event(&self, topic: &str, event: &Event, now_ms: i64) -> Result<(), Rejection> {
        if let Some(allowed) = self.schemas.get(topic) {
            if !allowed.iter().any(|n| n == event.schema_name()) {
                return Err(Rejection::new(
                    DeadLetterClass::WrongSchema,
                    format!("{} event on topic {topic}, which carries {}", event.schema_name(), allowed.join(", ")),
                ));
            }
        }
        if event.event_id().is_empty() {
            return Err(Rejection::new(DeadLetterClass::Invalid, format!("{} with an empty eventId", event.schema_name())));
        }
        if event.event_id().len() > MAX_EVENT_ID_BYTES {
            return Err(Rejection::new(
                DeadLetterClass::Invalid,
                format!("{} with an eventId of {} bytes (at most {MAX_EVENT_ID_BYTES})", event.schema_name(), event.event_id().len()),
            ));
        }
        if event.occurred_at() > now_ms.saturating_add(self.max_clock_skew_ms) {
            return Err(Rejection::new(
                DeadLetterClass::FutureTimestamp,
                format!(
                    "{} {}: occurredAt {} is {} s ahead of the worker clock (max_clock_skew {} s)",
                    event.schema_name(),
                    event.event_id(),
                    event.occurred_at(),
                    (event.occurred_at() - now_ms) / 1000,
                    self.max_clock_skew_ms / 1000
                ),
            ));
        }
        Ok(())
    }
}

/// The retry policy of one unit with the wait budget its retries share, and what they used.
/// Half of `max.poll.interval.ms` in the worker, so a burst of transient failures cannot hold
/// the consumer until the group evicts it.
#[derive(Debug, Clone)]
pub struct RetryBudget {
    pub policy: RetryPolicy,
    /// Most total wait of the unit's retries.
    pub budget: Duration,
    /// Waited so far.
    pub waited: Duration,
    /// Retries of decodes whose schema registry did not answer (metric cause `registry`).
    pub registry_retries: u64,
    /// Retries of transient processor failures (metric cause `processor`).
    pub processor_retries: u64,
}

impl RetryBudget {
    /// A fresh budget for one unit.
    pub fn new(policy: RetryPolicy, budget: Duration) -> RetryBudget {
        RetryBudget { policy, budget, waited: Duration::ZERO, registry_retries: 0, processor_retries: 0 }
    }

    /// No retries at all (a replay reports the first failure as the live worker's last).
    pub fn none() -> RetryBudget {
        RetryBudget::new(RetryPolicy { attempts: 0, ..RetryPolicy::default() }, Duration::ZERO)
    }

    /// The wait before retry `attempt` (1-based) if the policy and the budget allow one; the
    /// wait is counted as spent.
    fn take(&mut self, attempt: u32) -> Option<Duration> {
        let wait = self.policy.backoff(attempt);
        (attempt <= self.policy.attempts && self.waited + wait <= self.budget).then(|| {
            self.waited += wait;
            wait
        })
    }
}

/// Decodes a record's value and applies [`Rules`]; a schema registry that does not answer is
/// retried within `retry` (then `registry_unavailable`). `worker` names the logs.
///
/// Errors: the [`Rejection`] naming the record's dead-letter class.
pub async fn admit(
    codec: &Codec,
    rules: &Rules,
    input: Input<'_>,
    value: Option<&[u8]>,
    now_ms: i64,
    retry: &mut RetryBudget,
    worker: &str,
) -> Result<Event, Rejection> {
    let value = rules.check_value(value)?;
    let mut attempts = 1;
    let event = loop {
        match codec.decode(value).await {
            Ok(e) => break e,
            Err(e) if !e.is_permanent() => match retry.take(attempts) {
                Some(wait) => {
                    warn!(%worker, topic = input.topic, partition = input.partition, offset = input.offset, attempt = attempts, wait_ms = wait.as_millis() as u64, error = %e, "transient decode failure; retrying");
                    retry.registry_retries += 1;
                    tokio::time::sleep(wait).await;
                    attempts += 1;
                }
                None => return Err(Rejection { class: e.dead_letter_class(), message: e.to_string(), attempts }),
            },
            Err(e) => return Err(Rejection { class: e.dead_letter_class(), message: e.to_string(), attempts }),
        }
    };
    rules.check_event(input.topic, &event, now_ms)?;
    Ok(event)
}

/// What caused an output (or a failure).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cause {
    /// The unit's input number `.0` (index into the step's records).
    Input(usize),
    /// A timer of `partition`, due at `due_ms`.
    Timer { partition: i32, key: Vec<u8>, due_ms: i64 },
}

/// What happened to one input record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Processed; its effects are staged.
    Processed,
    /// A repeated `eventId`: no effect (domain rule 7).
    Duplicate,
    /// Sent to its dead-letter topic.
    DeadLettered,
    /// Not reached: the step stopped at an earlier failure.
    NotReached,
}

impl Outcome {
    /// The `outcome` label of `orderflow_consumed_records_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Processed => "processed",
            Outcome::Duplicate => "duplicate",
            Outcome::DeadLettered => "dead_lettered",
            Outcome::NotReached => "not_reached",
        }
    }
}

/// A failure that stops the instance (the processor reported `CorruptState` or `UnwiredPort`,
/// or a timer kept failing): nothing after it was processed.
#[derive(Debug)]
pub struct Stop {
    pub cause: Cause,
    pub error: ProcessError,
}

/// Everything a step staged. Nothing is durable or sent yet.
#[derive(Debug, Default)]
pub struct Staged {
    /// Outputs in emission order, each with its cause.
    pub outputs: Vec<(Output, Cause)>,
    /// Input index → why it is dead-lettered.
    pub dead_letters: Vec<(usize, Rejection)>,
    /// Per input, in order.
    pub outcomes: Vec<Outcome>,
    /// Per partition given to the step: staged state and timer changes (possibly empty).
    pub changes: BTreeMap<i32, Changes>,
    /// Per partition read: input topic → next offset to read (last offset + 1).
    pub offsets: BTreeMap<i32, BTreeMap<String, i64>>,
    /// Business measures reported by the processor.
    pub notes: Vec<Note>,
    /// Timers fired (the retention sweep not counted).
    pub timers_fired: usize,
    /// What the retention sweeps of this step forgot.
    pub swept: retention::Swept,
    /// Set when the step stopped at a failure the instance cannot get past.
    pub stop: Option<Stop>,
}

/// Runs one unit of work over `states` (partition → its durable state) at `at`. `records`
/// are the unit's inputs in read order, each admitted (`Ok`) or rejected; every record's
/// partition must be in `states`. `wired` lists the output ports the topology connects.
/// `worker` names the logs. See the module docs for the order of steps.
pub async fn step<S: StateRead>(
    processor: &mut dyn Processor,
    wired: &[String],
    states: &BTreeMap<i32, S>,
    records: Vec<(Input<'_>, Result<Event, Rejection>)>,
    at: At,
    retry: &mut RetryBudget,
    worker: &str,
) -> Staged {
    let At { now_ms, retention_ms } = at;
    let mut staged = Staged::default();
    let mut txns: BTreeMap<i32, StateTxn> = states.iter().map(|(p, s)| (*p, StateTxn::new(s))).collect();
    let mut out = Outputs::new(wired.iter().cloned());
    for (i, (input, admitted)) in records.into_iter().enumerate() {
        staged.offsets.entry(input.partition).or_default().insert(input.topic.to_string(), input.offset + 1);
        if staged.stop.is_some() {
            staged.outcomes.push(Outcome::NotReached);
            continue;
        }
        let event = match admitted {
            Ok(e) => e,
            Err(r) => {
                warn!(%worker, topic = input.topic, partition = input.partition, offset = input.offset, class = %r.class, attempts = r.attempts, error = %r.message, "record sent to the dead-letter topic");
                staged.dead_letters.push((i, r));
                staged.outcomes.push(Outcome::DeadLettered);
                continue;
            }
        };
        let txn = txns.get_mut(&input.partition).expect("a state for every record's partition");
        let ctx = Context { topic: input.topic.to_string(), partition: input.partition, offset: input.offset, now_ms, retention_ms };
        let (result, attempts) = handle_with_retries(processor, &ctx, &event, txn, &mut out, retry, worker).await;
        staged.outputs.extend(out.take_records().into_iter().map(|o| (o, Cause::Input(i))));
        let outcome = match result {
            Ok(Handled::Processed) => Outcome::Processed,
            Ok(Handled::Duplicate) => Outcome::Duplicate,
            Err(ProcessError::Invalid(message)) => {
                warn!(%worker, topic = input.topic, partition = input.partition, offset = input.offset, event_id = event.event_id(), error = %message, "invalid event sent to the dead-letter topic");
                staged.dead_letters.push((i, Rejection { class: DeadLetterClass::Invalid, message, attempts }));
                Outcome::DeadLettered
            }
            Err(ProcessError::Transient(message)) => {
                warn!(%worker, topic = input.topic, partition = input.partition, offset = input.offset, event_id = event.event_id(), attempts, error = %message, "retries exhausted; event sent to the dead-letter topic");
                staged.dead_letters.push((i, Rejection { class: DeadLetterClass::Transient, message, attempts }));
                Outcome::DeadLettered
            }
            Err(error) => {
                staged.stop = Some(Stop { cause: Cause::Input(i), error });
                Outcome::NotReached
            }
        };
        staged.outcomes.push(outcome);
    }
    if staged.stop.is_none() {
        for (p, txn) in txns.iter_mut() {
            if staged.offsets.contains_key(p) {
                retention::arm(txn, now_ms, retention_ms);
            }
            if let Err(stop) = fire_due_timers(processor, *p, txn, &mut out, &mut staged, at, retry, worker).await {
                staged.stop = Some(stop);
                break;
            }
            if txn.timer(retention::SWEEP_TIMER).is_some_and(|due| due <= now_ms) {
                let swept = retention::sweep(txn, now_ms, retention_ms);
                if swept.markers > 0 {
                    debug!(%worker, partition = p, markers = swept.markers, event_ids = swept.ids, "forgot remembered eventIds past the state retention");
                }
                staged.swept.markers += swept.markers;
                staged.swept.ids += swept.ids;
            }
        }
    }
    staged.notes = out.take_notes();
    staged.changes = txns.into_iter().map(|(p, t)| (p, t.into_changes())).collect();
    staged
}

/// `handle` with transient failures retried in place; returns the last result and the attempts.
async fn handle_with_retries(
    processor: &mut dyn Processor,
    ctx: &Context,
    event: &Event,
    txn: &mut StateTxn<'_>,
    out: &mut Outputs,
    retry: &mut RetryBudget,
    worker: &str,
) -> (Result<Handled, ProcessError>, u32) {
    let mut attempts = 1;
    loop {
        match handle(processor, ctx, event, txn, out) {
            Err(ProcessError::Transient(msg)) => match retry.take(attempts) {
                Some(wait) => {
                    warn!(%worker, topic = %ctx.topic, partition = ctx.partition, offset = ctx.offset, attempt = attempts, wait_ms = wait.as_millis() as u64, error = %msg, "transient processing failure; retrying");
                    retry.processor_retries += 1;
                    tokio::time::sleep(wait).await;
                    attempts += 1;
                }
                None => return (Err(ProcessError::Transient(msg)), attempts),
            },
            other => return (other, attempts),
        }
    }
}

/// Fires partition `p`'s timers due at `now_ms`, earliest first, each retried on a transient
/// failure. A timer cannot be dead-lettered: one that keeps failing stops the step (the timer,
/// still scheduled, fires again after the restart). When the retry budget is spent the due
/// timers left wait for a later unit.
#[allow(clippy::too_many_arguments)]
async fn fire_due_timers(
    processor: &mut dyn Processor,
    p: i32,
    txn: &mut StateTxn<'_>,
    out: &mut Outputs,
    staged: &mut Staged,
    at: At,
    retry: &mut RetryBudget,
    worker: &str,
) -> Result<(), Stop> {
    let At { now_ms, retention_ms } = at;
    let ctx = Context { topic: String::new(), partition: p, offset: -1, now_ms, retention_ms };
    for (key, due_ms) in txn.due_timers(now_ms) {
        if key == retention::SWEEP_TIMER {
            continue;
        }
        let cause = Cause::Timer { partition: p, key: key.clone(), due_ms };
        let mut attempts = 1;
        loop {
            match fire_timer(processor, &ctx, &key, due_ms, txn, out) {
                Ok(()) => break,
                Err(ProcessError::Transient(msg)) if attempts <= retry.policy.attempts => match retry.take(attempts) {
                    Some(wait) => {
                        warn!(%worker, partition = p, attempt = attempts, error = %msg, "transient timer failure; retrying");
                        retry.processor_retries += 1;
                        tokio::time::sleep(wait).await;
                        attempts += 1;
                    }
                    None => {
                        warn!(%worker, partition = p, error = %msg, "retry budget of this unit spent; the due timers left fire in a later unit");
                        return Ok(());
                    }
                },
                Err(error) => return Err(Stop { cause, error }),
            }
        }
        staged.timers_fired += 1;
        staged.outputs.extend(out.take_records().into_iter().map(|o| (o, cause.clone())));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
