//! Commit protocols: how a unit's staged effects become durable, one per guarantee.
//!
//! Every protocol takes an encoded [`Unit`] (outputs, dead letters, changelog records, input
//! offsets) and works through two narrow interfaces, so each is testable without a broker:
//! [`Broker`] (produce and wait for acknowledgements, transactions, group offsets) and
//! [`LocalState`] (the sled batch per partition and its flush).
//!
//! - [`exactly_once`]: one Kafka transaction per unit (KIP-98): begin, produce everything
//!   including the commit markers, commit with the input offsets inside the transaction
//!   (KIP-447); then the local state. Any failure before the commit aborts the transaction.
//! - [`effectively_once`]: produce everything except the commit markers and wait for every
//!   acknowledgement, then the markers (a marker commits its unit for a restore, which resumes
//!   after the unit's inputs, so a marker acknowledged before the outputs could lose them), then
//!   the local state, flushed, then the input offsets to the group (advisory).
//! - [`at_least_once`]: as `effectively_once` without the flush: a crash may lose the last
//!   units' state and eventIds, whose inputs are then re-read.
//!
//! The local state is never ahead of the broker: it is written only after the broker took the
//! unit.

use std::collections::BTreeMap;

use rdkafka::error::KafkaError;

use crate::changelog;
use crate::store::StoreError;
use crate::topology::Guarantee;
use crate::txn::{TxnError, TxnErrorClass};

/// Per input partition: input topic → next offset to read.
pub type Offsets = BTreeMap<i32, BTreeMap<String, i64>>;

/// One record to produce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutRecord {
    pub topic: String,
    /// Explicit partition (changelog records); `None`: the producer's partitioner (by key).
    pub partition: Option<i32>,
    pub key: Option<Vec<u8>>,
    /// `None`: a tombstone.
    pub value: Option<Vec<u8>>,
    /// `(name, value)`; a `None` value is a header without one.
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

/// A unit of work, encoded, ready to commit.
#[derive(Debug, Default)]
pub struct Unit {
    /// Outputs and dead-letter records.
    pub records: Vec<OutRecord>,
    /// Changelog topic name.
    pub changelog_topic: String,
    /// Per partition with anything to commit: its changelog records, the commit marker last.
    pub changelog: Vec<(i32, Vec<changelog::Record>)>,
    /// The input offsets the unit read up to.
    pub offsets: Offsets,
}

/// The broker side of a commit. Implemented over rdkafka by the worker, by fakes in tests.
#[allow(async_fn_in_trait)]
pub trait Broker {
    /// Produces `records` in order and waits until the broker acknowledged or refused each:
    /// per record, the offset it was written at or the error.
    async fn send(&self, records: Vec<OutRecord>) -> Vec<Result<i64, KafkaError>>;
    /// Begins a transaction (exactly_once only).
    async fn begin(&self) -> Result<(), TxnError>;
    /// Adds `offsets` to the transaction and commits it (exactly_once only).
    async fn commit_transaction(&self, offsets: &Offsets) -> Result<(), TxnError>;
    /// Aborts the open transaction (exactly_once only).
    async fn abort(&self) -> Result<(), TxnError>;
    /// Commits `offsets` to the consumer group, asynchronously and advisory: restores resume from
    /// the offsets stored with the state.
    fn commit_offsets(&self, offsets: &Offsets);
}

/// The local side of a commit: the state store.
#[allow(async_fn_in_trait)]
pub trait LocalState {
    /// Writes partition `partition`'s staged changes, its next input offsets and the changelog
    /// position after the unit's records (`changelog_next`), in one batch.
    fn persist(&mut self, partition: i32, changelog_next: i64) -> Result<(), StoreError>;
    /// Waits until every persisted batch is on disk.
    async fn flush(&self) -> Result<(), StoreError>;
}

/// Why a unit did not commit; what the worker does about it is named per variant.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// exactly_once: the transaction was aborted, nothing of the unit is visible to
    /// `read_committed` readers. The worker rewinds and processes the unit again.
    #[error("unit aborted: {0}")]
    Aborted(TxnError),
    /// The transactional producer is unusable (fenced, or the abort failed). The instance stops.
    #[error("fatal: {0}")]
    Fatal(TxnError),
    /// Outside a transaction: the broker did not take a record of `topic`. Part of the unit may
    /// be written; the worker backs off, compensates its changelog records and rewinds.
    #[error("not delivered to {topic}: {error}")]
    NotDelivered { topic: String, error: KafkaError },
    /// The local state store failed after the broker took the unit. The instance stops.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Commits `unit` under `guarantee`. Returns, per partition persisted, the changelog position
/// after the unit's records.
///
/// Errors: see [`Failure`].
pub async fn commit<B: Broker, S: LocalState>(
    guarantee: Guarantee,
    broker: &B,
    state: &mut S,
    unit: Unit,
) -> Result<BTreeMap<i32, i64>, Failure> {
    match guarantee {
        Guarantee::ExactlyOnce => exactly_once(broker, state, unit).await,
        Guarantee::EffectivelyOnce => effectively_once(broker, state, unit).await,
        Guarantee::AtLeastOnce => at_least_once(broker, state, unit).await,
    }
}

/// One transaction per unit; then the local state, flushed.
pub async fn exactly_once<B: Broker, S: LocalState>(broker: &B, state: &mut S, unit: Unit) -> Result<BTreeMap<i32, i64>, Failure> {
    if let Err(e) = broker.begin().await {
        return Err(abort(broker, e).await);
    }
    let (records, shape) = flatten(unit.records, &unit.changelog_topic, &unit.changelog, true);
    let acks = broker.send(records).await;
    if let Some((_, error)) = first_failure(&acks, &shape) {
        // A failed delivery makes the transaction abortable; a producer that is gone (fenced)
        // says so in a transactional error, or fails the abort, which is fatal.
        let class = match &error {
            KafkaError::Transaction(_) if crate::txn::classify(&error) == TxnErrorClass::Fatal => TxnErrorClass::Fatal,
            _ => TxnErrorClass::Abortable,
        };
        return Err(abort(broker, TxnError { class, source: error, step: "produce" }).await);
    }
    if let Err(e) = broker.commit_transaction(&unit.offsets).await {
        return Err(abort(broker, e).await);
    }
    let next = changelog_next(&acks, &shape);
    persist(state, &next)?;
    state.flush().await?;
    Ok(next)
}

/// Markers last, then the local state, flushed, then the group offsets.
pub async fn effectively_once<B: Broker, S: LocalState>(broker: &B, state: &mut S, unit: Unit) -> Result<BTreeMap<i32, i64>, Failure> {
    let offsets = unit.offsets.clone();
    let next = markers_last(broker, unit).await?;
    persist(state, &next)?;
    state.flush().await?;
    broker.commit_offsets(&offsets);
    Ok(next)
}

/// Markers last, then the local state (not flushed), then the group offsets.
pub async fn at_least_once<B: Broker, S: LocalState>(broker: &B, state: &mut S, unit: Unit) -> Result<BTreeMap<i32, i64>, Failure> {
    let offsets = unit.offsets.clone();
    let next = markers_last(broker, unit).await?;
    persist(state, &next)?;
    broker.commit_offsets(&offsets);
    Ok(next)
}

/// Where each flattened record came from: `None` for outputs and dead letters, the partition
/// for changelog records.
type Shape = Vec<(Option<i32>, String)>;

/// The unit's records in send order: outputs and dead letters, then per partition its changelog
/// records (with or without the final commit marker).
fn flatten(
    records: Vec<OutRecord>,
    topic: &str,
    changelog: &[(i32, Vec<changelog::Record>)],
    with_markers: bool,
) -> (Vec<OutRecord>, Shape) {
    let mut shape: Shape = records.iter().map(|r| (None, r.topic.clone())).collect();
    let mut all = records;
    for (p, recs) in changelog {
        let n = if with_markers { recs.len() } else { recs.len().saturating_sub(1) };
        for r in &recs[..n] {
            all.push(changelog_record(topic, *p, r));
            shape.push((Some(*p), topic.to_string()));
        }
    }
    (all, shape)
}

fn changelog_record(topic: &str, p: i32, r: &changelog::Record) -> OutRecord {
    OutRecord { topic: topic.to_string(), partition: Some(p), key: Some(r.key.clone()), value: r.value.clone(), headers: Vec::new() }
}

/// Everything but the markers, acknowledged; then the markers, acknowledged.
async fn markers_last<B: Broker>(broker: &B, unit: Unit) -> Result<BTreeMap<i32, i64>, Failure> {
    let (records, shape) = flatten(unit.records, &unit.changelog_topic, &unit.changelog, false);
    let acks = broker.send(records).await;
    if let Some((topic, error)) = first_failure(&acks, &shape) {
        return Err(Failure::NotDelivered { topic, error });
    }
    let markers: Vec<OutRecord> =
        unit.changelog.iter().filter_map(|(p, recs)| recs.last().map(|m| changelog_record(&unit.changelog_topic, *p, m))).collect();
    let marker_shape: Shape = markers.iter().map(|m| (m.partition, m.topic.clone())).collect();
    let marker_acks = broker.send(markers).await;
    if let Some((topic, error)) = first_failure(&marker_acks, &marker_shape) {
        return Err(Failure::NotDelivered { topic, error });
    }
    let mut next = changelog_next(&acks, &shape);
    for (p, offset) in changelog_next(&marker_acks, &marker_shape) {
        let n = next.entry(p).or_insert(0);
        *n = (*n).max(offset);
    }
    Ok(next)
}

/// A failed transactional step: a fatal one stops the instance; otherwise the transaction is
/// aborted (an abort that fails is fatal).
async fn abort<B: Broker>(broker: &B, e: TxnError) -> Failure {
    if e.class == TxnErrorClass::Fatal {
        return Failure::Fatal(e);
    }
    match broker.abort().await {
        Ok(()) => Failure::Aborted(e),
        Err(abort_error) => Failure::Fatal(abort_error),
    }
}

fn first_failure(acks: &[Result<i64, KafkaError>], shape: &Shape) -> Option<(String, KafkaError)> {
    acks.iter().zip(shape).find_map(|(a, (_, topic))| a.as_ref().err().map(|e| (topic.clone(), e.clone())))
}

/// Per partition, the changelog offset after its last acknowledged record.
fn changelog_next(acks: &[Result<i64, KafkaError>], shape: &Shape) -> BTreeMap<i32, i64> {
    let mut next = BTreeMap::new();
    for (ack, (p, _)) in acks.iter().zip(shape) {
        if let (Ok(offset), Some(p)) = (ack, p) {
            let n = next.entry(*p).or_insert(0);
            *n = (*n).max(offset + 1);
        }
    }
    next
}

fn persist<S: LocalState>(state: &mut S, next: &BTreeMap<i32, i64>) -> Result<(), StoreError> {
    next.iter().try_for_each(|(p, n)| state.persist(*p, *n))
}

#[cfg(test)]
mod tests;
