//! The seam between the orderflow runtime and its workers.
//!
//! A worker is a [`Processor`]: plain business logic that reads one decoded [`Event`], reads and
//! stages writes in a [`StateTxn`], schedules durable timers, and emits events on named output
//! ports through [`Outputs`]. It never sees Kafka, sled or the wall clock: the runtime
//! (`orderflow-runtime`) owns those and decides when staged writes become durable (only after the
//! outputs are acknowledged by the broker). [`Harness`] runs a processor in memory for unit tests
//! and for shadow replays.
//!
//! # Layout
//!
//! - `lib.rs`: [`Processor`], [`Context`], [`Outputs`], [`ProcessError`], eventId helpers, the
//!   shared setting [`ReservationTtlConfig`] ([`DEFAULT_RESERVATION_TTL`]) and [`millis`].
//! - [`events`]: the event types of `avro/` ([`Event`] and one struct per schema).
//! - [`fixtures`]: event builders shared by the workers' unit tests.
//! - `harness`: [`Harness`] and [`MemoryStore`], the in-memory runner.
//! - `state`: [`StateTxn`], [`StateRead`], [`Changes`]: staged state and timers.

pub mod events;
pub mod fixtures;
mod harness;
mod state;

/// Seed 004: a reservation holds its units 5 minutes unless the topology says otherwise. The
/// stock reserver and the reservation expirer share it (their `reservation_ttl` settings must
/// agree).
pub const DEFAULT_RESERVATION_TTL: std::time::Duration = std::time::Duration::from_secs(300);

/// How long closed orders and remembered `eventId`s are kept when the topology says nothing
/// (`state_retention`): 7 days, far above the longest window anything re-reads (the 5-minute
/// reservation TTL, the saga timeouts, a replay of yesterday's traffic). Issue 13: state must not
/// grow without bound.
pub const DEFAULT_STATE_RETENTION: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

/// `d` in whole milliseconds (the unit of `Context::now_ms` and timer deadlines), saturating
/// at `i64::MAX`.
pub fn millis(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The settings of a kind whose one setting is the reservation TTL (the stock reserver's and the
/// reservation expirer's `Config`): the keys of its `[workers.<name>]` entry in `topology.toml`
/// beyond the common ones, parsed by the kinds registry (`orderflow_kinds`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReservationTtlConfig {
    /// `reservation_ttl` (seed 004): how long a reservation holds its units after the order's
    /// `occurredAt`; default 5 minutes ([`DEFAULT_RESERVATION_TTL`]), at least 1 ms. The stock
    /// reserver's and the expirer's must agree (`topology check` says so).
    #[serde(default = "default_reservation_ttl", with = "humantime_serde")]
    pub reservation_ttl: std::time::Duration,
}

fn default_reservation_ttl() -> std::time::Duration {
    DEFAULT_RESERVATION_TTL
}

impl Default for ReservationTtlConfig {
    fn default() -> ReservationTtlConfig {
        ReservationTtlConfig { reservation_ttl: DEFAULT_RESERVATION_TTL }
    }
}

impl ReservationTtlConfig {
    /// The TTL in ms.
    ///
    /// Errors: a TTL under 1 ms.
    pub fn ttl_ms(&self) -> Result<i64, String> {
        if self.reservation_ttl < std::time::Duration::from_millis(1) {
            return Err(format!("reservation_ttl {} must be at least 1 ms", humantime::format_duration(self.reservation_ttl)));
        }
        Ok(millis(self.reservation_ttl))
    }
}

pub use events::Event;
pub use harness::{Harness, MemoryStore};
pub use state::{prefix_end, Changes, StateRead, StateTxn};

use std::collections::BTreeSet;

/// Where and when the event being processed was read.
#[derive(Debug, Clone)]
pub struct Context {
    /// Input topic name.
    pub topic: String,
    /// Input partition; also the task (state shard) the state belongs to.
    pub partition: i32,
    /// Input offset.
    pub offset: i64,
    /// Processing time chosen by the runtime, ms since the epoch (never read the clock yourself).
    pub now_ms: i64,
    /// The worker's `state_retention` in ms: how long [`forget_later`] keeps a key, and how long
    /// the runtime remembers an `eventId` ([`DEFAULT_STATE_RETENTION`] unless configured).
    pub retention_ms: i64,
}

/// Errors a processor returns. The runtime decides what each means for the unit of work.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The event is well-formed Avro but breaks a business rule of its shape (e.g. quantity ≤ 0).
    /// Permanent: reprocessing cannot help.
    #[error("invalid event: {0}")]
    Invalid(String),
    /// A failure that may pass by itself (a dependency briefly unavailable). The runtime retries
    /// the event with the worker's retry policy (staged changes of the failed attempt are
    /// discarded), then dead-letters it with class `transient`.
    #[error("transient failure: {0}")]
    Transient(String),
    /// The processor emitted on a port the topology did not wire. A deployment error.
    #[error("output port `{0}` is not wired in the topology")]
    UnwiredPort(String),
    /// Stored state could not be read back. Fatal for the instance.
    #[error("corrupt state at `{key}`: {message}")]
    CorruptState { key: String, message: String },
}

/// One record a processor emits.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    /// Output port name, resolved to a topic by `topology.toml`.
    pub port: String,
    /// Record key (e.g. orderId, or `hqId:storeId` for the stock repartition topic).
    pub key: String,
    pub event: Event,
}

/// A business measure a processor reports; [`Note::export`] declares how the runtime exports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    /// Low-cardinality measure name, e.g. `reservation_failed`.
    pub measure: &'static str,
    /// Label, e.g. a reason code. Never an id, except under [`Export::TopN`] and
    /// [`Export::InvariantBroken`] (logged, never a metric label).
    pub label: String,
    /// How the runtime exports it.
    pub export: Export,
}

/// How the runtime exports a [`Note`], declared by the processor that reports it (the runtime
/// never matches measure names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Export {
    /// `orderflow_business_events_total{worker, measure, label}` ([`Outputs::note`]).
    Counter,
    /// The counter, and a WARN log line with this message: something an operator should see
    /// (e.g. seed 001's saga timeout).
    Logged(&'static str),
    /// An unbounded label (a product id): counted per label in the process, only a bounded top
    /// N exported (`orderflow_out_of_stock_top`).
    TopN,
    /// A broken invariant (label: which, where and both figures, for the log line): an ERROR log
    /// line and `orderflow_stock_conservation_mismatches_total{worker}`.
    InvariantBroken,
}

/// Collects what a processor emits while handling one event or timer.
#[derive(Debug, Default)]
pub struct Outputs {
    wired: BTreeSet<String>,
    records: Vec<Output>,
    notes: Vec<Note>,
}

impl Outputs {
    /// `wired`: the output ports the topology connects for this worker.
    pub fn new<I: IntoIterator<Item = S>, S: Into<String>>(wired: I) -> Self {
        Outputs { wired: wired.into_iter().map(Into::into).collect(), records: Vec::new(), notes: Vec::new() }
    }

    /// Emits `event` on `port` with record key `key`.
    ///
    /// Errors: [`ProcessError::UnwiredPort`] when the topology did not wire `port`.
    pub fn emit(&mut self, port: &str, key: impl Into<String>, event: impl Into<Event>) -> Result<(), ProcessError> {
        if !self.wired.contains(port) {
            return Err(ProcessError::UnwiredPort(port.to_string()));
        }
        self.records.push(Output { port: port.to_string(), key: key.into(), event: event.into() });
        Ok(())
    }

    /// Reports a business measure exported as a counter (see [`Note`]).
    pub fn note(&mut self, measure: &'static str, label: impl Into<String>) {
        self.note_as(measure, label, Export::Counter);
    }

    /// Reports a business measure exported as `export` declares.
    pub fn note_as(&mut self, measure: &'static str, label: impl Into<String>, export: Export) {
        self.notes.push(Note { measure, label: label.into(), export });
    }

    /// Whether `port` is wired.
    pub fn is_wired(&self, port: &str) -> bool {
        self.wired.contains(port)
    }

    /// Takes the records emitted so far.
    pub fn take_records(&mut self) -> Vec<Output> {
        std::mem::take(&mut self.records)
    }

    /// Takes the notes reported so far.
    pub fn take_notes(&mut self) -> Vec<Note> {
        std::mem::take(&mut self.notes)
    }

    /// Number of records emitted so far.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// True when nothing was emitted.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    fn truncate(&mut self, records: usize, notes: usize) {
        self.records.truncate(records);
        self.notes.truncate(notes);
    }
}

/// A worker's business logic.
pub trait Processor: Send {
    /// Handles one input event. Staged writes and outputs are kept only if this returns `Ok`.
    fn process(&mut self, ctx: &Context, event: &Event, state: &mut StateTxn, out: &mut Outputs) -> Result<(), ProcessError>;

    /// Handles a due timer `key` scheduled with [`StateTxn::schedule_timer`]. `ctx.now_ms` is the
    /// runtime's clock; the timer was due at `due_ms` ≤ `ctx.now_ms`. The runtime removes the
    /// timer before calling this (reschedule to keep it).
    fn on_timer(&mut self, ctx: &Context, key: &[u8], due_ms: i64, state: &mut StateTxn, out: &mut Outputs) -> Result<(), ProcessError> {
        let _ = (ctx, key, due_ms, state, out);
        Ok(())
    }
}

/// Checks that a required id field of an event is not empty.
///
/// Errors: [`ProcessError::Invalid`] naming the event kind, its `eventId` and the field, e.g.
/// `OrderCreated e-1: empty storeId`.
pub fn require(kind: &str, event_id: &str, field: &str, value: &str) -> Result<(), ProcessError> {
    if value.is_empty() {
        Err(ProcessError::Invalid(format!("{kind} {event_id}: empty {field}")))
    } else {
        Ok(())
    }
}

/// What [`handle`] did with an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    /// Processed; its effects are staged.
    Processed,
    /// Its `eventId` was seen before in this state shard; nothing was done (domain rule 7).
    Duplicate,
}

/// Prefix of the state keys under which `eventId`s are remembered ([`seen_key`]); the runtime
/// recognises them to write them compactly (in the changelog's commit markers).
pub const SEEN_PREFIX: &[u8] = b"\x00seen/";

/// Whether `key` is a remembered-`eventId` key ([`seen_key`]).
pub fn is_seen_key(key: &[u8]) -> bool {
    key.starts_with(SEEN_PREFIX)
}

/// State key under which an `eventId` is remembered.
pub fn seen_key(event_id: &str) -> Vec<u8> {
    let mut k = SEEN_PREFIX.to_vec();
    k.extend_from_slice(event_id.as_bytes());
    k
}

/// Prefix of the timer keys [`forget_later`] schedules: `\x00gc/<state key>`.
pub const GC_PREFIX: &[u8] = b"\x00gc/";

/// Schedules the deletion of state `key` at `ctx.now_ms + ctx.retention_ms`: for records of
/// closed business objects (a completed saga, a settled reservation) that must still answer late
/// or duplicate events for a while, and then go (issue 13: bounded state). Calling it again
/// moves the deadline. The key is deleted at the deadline whatever it holds then; the processor
/// is not called (see [`fire_timer`]).
pub fn forget_later(ctx: &Context, state: &mut StateTxn, key: &[u8]) {
    state.schedule_timer(gc_timer_key(key), ctx.now_ms.saturating_add(ctx.retention_ms));
}

/// The state key a [`forget_later`] timer deletes, if `timer_key` is one.
pub fn forgotten(timer_key: &[u8]) -> Option<&[u8]> {
    timer_key.strip_prefix(GC_PREFIX)
}

fn gc_timer_key(key: &[u8]) -> Vec<u8> {
    let mut k = GC_PREFIX.to_vec();
    k.extend_from_slice(key);
    k
}

/// Runs `processor` on `event` with `eventId` deduplication: a repeated `eventId` has no effect,
/// a new one is remembered in the same staged transaction as the processor's writes, so the two
/// become durable together. On error, the staged writes and outputs of this event are discarded.
/// Used by the runtime and by [`Harness`], so both apply the same rule.
pub fn handle<P: Processor + ?Sized>(
    processor: &mut P,
    ctx: &Context,
    event: &Event,
    state: &mut StateTxn,
    out: &mut Outputs,
) -> Result<Handled, ProcessError> {
    let key = seen_key(event.event_id());
    if state.get(&key).is_some() {
        return Ok(Handled::Duplicate);
    }
    let mark = state.savepoint();
    let (records, notes) = (out.records.len(), out.notes.len());
    match processor.process(ctx, event, state, out) {
        Ok(()) => {
            state.put(key, ctx.now_ms.to_be_bytes().to_vec());
            Ok(Handled::Processed)
        }
        Err(e) => {
            state.rollback_to(mark);
            out.truncate(records, notes);
            Err(e)
        }
    }
}

/// Fires every timer due at `ctx.now_ms`, earliest first, each with [`fire_timer`]. Returns how
/// many fired. Errors abort at the failing timer, with its changes discarded (the timers before
/// it keep theirs).
pub fn fire_timers<P: Processor + ?Sized>(
    processor: &mut P,
    ctx: &Context,
    state: &mut StateTxn,
    out: &mut Outputs,
) -> Result<usize, ProcessError> {
    let due = state.due_timers(ctx.now_ms);
    for (key, due_ms) in &due {
        fire_timer(processor, ctx, key, *due_ms, state, out)?;
    }
    Ok(due.len())
}

/// Fires one due timer: removes it, then runs [`Processor::on_timer`] (which may reschedule it).
/// On error the timer's removal, its staged writes and its outputs and notes are discarded, so
/// the timer stays scheduled. A [`forget_later`] timer deletes its key instead, without calling
/// the processor. Used by the runtime's unit step and by [`fire_timers`].
pub fn fire_timer<P: Processor + ?Sized>(
    processor: &mut P,
    ctx: &Context,
    key: &[u8],
    due_ms: i64,
    state: &mut StateTxn,
    out: &mut Outputs,
) -> Result<(), ProcessError> {
    if let Some(gone) = forgotten(key) {
        state.cancel_timer(key);
        state.delete(gone.to_vec());
        return Ok(());
    }
    let mark = state.savepoint();
    let (records, notes) = (out.records.len(), out.notes.len());
    state.cancel_timer(key);
    processor.on_timer(ctx, key, due_ms, state, out).inspect_err(|_| {
        state.rollback_to(mark);
        out.truncate(records, notes);
    })
}

/// A deterministic event id: UUIDv5 of `cause` (the input's `eventId`, or a timer key) and a
/// `tag` naming what was derived (e.g. `stock.reserved`). Re-processing the same input yields the
/// same id, so downstream deduplication absorbs re-emitted outputs (domain rule 7).
pub fn derive_event_id(cause: &str, tag: &str) -> String {
    const NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x6f72_6465_7266_6c6f_7700_0000_0000_0001);
    let mut name = Vec::with_capacity(cause.len() + tag.len() + 1);
    name.extend_from_slice(cause.as_bytes());
    name.push(0);
    name.extend_from_slice(tag.as_bytes());
    uuid::Uuid::new_v5(&NAMESPACE, &name).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_ids_are_deterministic_and_distinct_per_tag() {
        assert_eq!(derive_event_id("e1", "a"), derive_event_id("e1", "a"));
        assert_ne!(derive_event_id("e1", "a"), derive_event_id("e1", "b"));
        assert_ne!(derive_event_id("e1", "a"), derive_event_id("e2", "a"));
    }

    #[test]
    fn a_key_given_to_forget_later_is_deleted_at_the_retention_deadline_without_the_processor() {
        struct Panics;
        impl Processor for Panics {
            fn process(&mut self, _: &Context, _: &Event, _: &mut StateTxn, _: &mut Outputs) -> Result<(), ProcessError> {
                Ok(())
            }
            fn on_timer(&mut self, _: &Context, _: &[u8], _: i64, _: &mut StateTxn, _: &mut Outputs) -> Result<(), ProcessError> {
                panic!("a forget_later timer reached the processor")
            }
        }
        let mut store = MemoryStore::default();
        let ctx = |now_ms| Context { topic: String::new(), partition: 0, offset: 0, now_ms, retention_ms: 1_000 };
        let mut txn = StateTxn::new(&store);
        txn.put(b"order/1".to_vec(), b"closed".to_vec());
        forget_later(&ctx(10), &mut txn, b"order/1");
        forget_later(&ctx(500), &mut txn, b"order/1");
        let changes = txn.into_changes();
        store.apply(changes);
        let mut out = Outputs::new(Vec::<String>::new());
        let mut txn = StateTxn::new(&store);
        assert_eq!(fire_timers(&mut Panics, &ctx(1_499), &mut txn, &mut out).unwrap(), 0, "the second call moved the deadline");
        assert_eq!(fire_timers(&mut Panics, &ctx(1_500), &mut txn, &mut out).unwrap(), 1);
        assert_eq!(txn.get(b"order/1"), None);
        assert_eq!(txn.timer(&gc_timer_key(b"order/1")), None);
    }

    #[test]
    fn a_range_scan_stops_at_its_limit_and_skips_staged_deletions() {
        let mut store = MemoryStore::default();
        for k in ["a/1", "a/2", "a/3", "a/4"] {
            store.data.insert(k.as_bytes().to_vec(), vec![]);
        }
        let mut txn = StateTxn::new(&store);
        txn.delete(b"a/1".to_vec());
        txn.delete(b"a/2".to_vec());
        let got: Vec<Vec<u8>> = txn.scan_range(b"a/", b"a/9", 2).into_iter().map(|(k, _)| k).collect();
        assert_eq!(got, vec![b"a/3".to_vec(), b"a/4".to_vec()]);
        assert_eq!(prefix_end(b"a/"), Some(b"a0".to_vec()));
        assert_eq!(prefix_end(b"a\xff"), Some(b"b".to_vec()));
    }

    #[test]
    fn a_prefix_scan_sees_staged_writes_and_deletions_over_the_stored_entries() {
        let mut store = MemoryStore::default();
        for (k, v) in [("a/1", "x"), ("a/2", "y"), ("a/3", "z"), ("b/1", "w")] {
            store.data.insert(k.as_bytes().to_vec(), v.as_bytes().to_vec());
        }
        let mut txn = StateTxn::new(&store);
        txn.delete(b"a/2".to_vec());
        txn.put(b"a/0".to_vec(), b"new".to_vec());
        txn.put(b"a/3".to_vec(), b"changed".to_vec());
        txn.put(b"ab".to_vec(), b"other prefix".to_vec());
        let seen: Vec<(String, String)> =
            txn.scan_prefix(b"a/").into_iter().map(|(k, v)| (String::from_utf8(k).unwrap(), String::from_utf8(v).unwrap())).collect();
        let want = [("a/0", "new"), ("a/1", "x"), ("a/3", "changed")].map(|(k, v)| (k.to_string(), v.to_string()));
        assert_eq!(seen, want);
    }
}
