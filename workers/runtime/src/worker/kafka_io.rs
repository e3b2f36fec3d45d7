//! The worker's Kafka and sled sides of a commit: [`KafkaBroker`] implements the commit
//! protocols' [`Broker`] over rdkafka (reporting not-ready while acknowledgements stall), and
//! [`SledUnit`] their [`LocalState`] over the instance's state store. Also the dead-letter record
//! of a rejected input.

use std::collections::BTreeMap;

use orderflow_api::Changes;
use prometheus::HistogramVec;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message, OwnedMessage};
use rdkafka::producer::FutureProducer;
use rdkafka::{Offset, TopicPartitionList};
use tracing::warn;

use super::context::{Health, WorkerContext};
use crate::commit::{Broker, LocalState, Offsets, OutRecord};
use crate::deadletter;
use crate::limits::Limits;
use crate::step::Rejection;
use crate::store::{Shard, Store, StoreError};
use crate::txn::{TxnError, TxnErrorClass, TxnProducer};

/// The instance's clients, as one unit's commit uses them.
pub(super) struct KafkaBroker<'a> {
    pub producer: &'a FutureProducer,
    /// Under `exactly_once`.
    pub txn: Option<&'a TxnProducer>,
    pub consumer: &'a StreamConsumer<WorkerContext>,
    pub health: &'a Health,
    pub worker: &'a str,
    /// `orderflow_commit_stage_seconds`.
    pub stages: &'a HistogramVec,
}

impl Broker for KafkaBroker<'_> {
    async fn send(&self, records: Vec<OutRecord>) -> Vec<Result<i64, KafkaError>> {
        let _timer = self.stages.with_label_values(&[self.worker, "produce"]).start_timer();
        // Under exactly_once the transactional producer's current one (a stuck call replaces it).
        let producer = self.txn.map_or_else(|| self.producer.clone(), TxnProducer::producer);
        // In order: a partition's commit marker must follow the unit's records on it.
        let sends = crate::kafka::send_in_order(&producer, records.iter().map(crate::kafka::future_record).collect());
        let health = self.health;
        let acks = crate::kafka::await_acks(self.worker, "unit", sends, |stalled| health.set(&health.unacked, stalled)).await;
        acks.into_iter().map(|a| a.map(|(_, offset)| offset)).collect()
    }

    async fn begin(&self) -> Result<(), TxnError> {
        self.txn.expect("a transactional producer under exactly_once").begin().await
    }

    async fn commit_transaction(&self, offsets: &Offsets) -> Result<(), TxnError> {
        let txn = self.txn.expect("a transactional producer under exactly_once");
        let _timer = self.stages.with_label_values(&[self.worker, "transaction"]).start_timer();
        let failed = |source: KafkaError| TxnError { class: TxnErrorClass::Abortable, source, step: "send_offsets_to_transaction" };
        let tpl = offset_list(offsets).map_err(failed)?;
        let group =
            self.consumer.group_metadata().ok_or_else(|| failed(KafkaError::ClientCreation("consumer has no group metadata".into())))?;
        txn.commit(tpl, group).await
    }

    async fn abort(&self) -> Result<(), TxnError> {
        self.txn.expect("a transactional producer under exactly_once").abort().await
    }

    fn commit_offsets(&self, offsets: &Offsets) {
        if offsets.is_empty() {
            return;
        }
        let result = offset_list(offsets).and_then(|tpl| self.consumer.commit(&tpl, CommitMode::Async));
        if let Err(e) = result {
            // The sled store already holds these offsets and eventIds; a replay is absorbed.
            warn!(worker = %self.worker, error = %e, "offset commit failed; inputs will be replayed and deduplicated");
        }
    }
}

/// `offsets` as an rdkafka list.
fn offset_list(offsets: &Offsets) -> Result<TopicPartitionList, KafkaError> {
    let mut tpl = TopicPartitionList::new();
    for (p, topics) in offsets {
        for (topic, next) in topics {
            tpl.add_partition_offset(topic, *p, Offset::Offset(*next))?;
        }
    }
    Ok(tpl)
}

/// One unit's staged state over the instance's sled store.
pub(super) struct SledUnit<'a> {
    pub store: &'a Store,
    pub shards: &'a BTreeMap<i32, Shard>,
    pub changes: &'a BTreeMap<i32, Changes>,
    pub offsets: &'a Offsets,
    pub worker: &'a str,
    /// `orderflow_commit_stage_seconds`.
    pub stages: &'a HistogramVec,
}

impl LocalState for SledUnit<'_> {
    fn persist(&mut self, partition: i32, changelog_next: i64) -> Result<(), StoreError> {
        let _timer = self.stages.with_label_values(&[self.worker, "state_write"]).start_timer();
        let (no_changes, no_offsets) = (Changes::default(), BTreeMap::new());
        let changes = self.changes.get(&partition).unwrap_or(&no_changes);
        self.shards[&partition].commit(changes, self.offsets.get(&partition).unwrap_or(&no_offsets), Some(changelog_next))
    }

    async fn flush(&self) -> Result<(), StoreError> {
        let _timer = self.stages.with_label_values(&[self.worker, "state_flush"]).start_timer();
        self.store.flush().await
    }
}

/// The dead-letter record of `source` rejected by `worker` at `now_ms` ([`crate::deadletter::record`]
/// with the record's own headers). Its value is left out (header `orderflow.dlq.value-dropped`)
/// when the record would not fit the dead-letter topic's limit in `limits` with it.
pub(super) fn dead_letter_record(
    topic: String,
    source: &OwnedMessage,
    r: &Rejection,
    worker: &str,
    now_ms: i64,
    limits: &Limits,
) -> OutRecord {
    let headers: Vec<(String, Option<Vec<u8>>)> =
        source.headers().map(|h| h.iter().map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec))).collect()).unwrap_or_default();
    let from = deadletter::Source {
        topic: source.topic(),
        partition: source.partition(),
        offset: source.offset(),
        key: source.key(),
        value: source.payload(),
    };
    let verdict = deadletter::Verdict { class: r.class, message: &r.message, attempts: r.attempts, worker, now_ms };
    deadletter::record_within(topic, from, headers, verdict, limits)
}
