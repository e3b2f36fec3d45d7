//! Rebalances of a worker instance: partitions are tasks. An assigned partition stays paused
//! until its state is restored ([`changelog::restore_with`]), then it is positioned at the
//! restored offsets and resumed; a revoked one is dropped with the records gathered for it; a
//! unit that failed rewinds every owned partition to where it started reading. Also: rejoining a
//! group that left the instance without partitions, and consumer errors.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::error::KafkaError;
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};
use tracing::{debug, error, info, warn};

use super::context::{subscribed_consumer, RebalanceEvent};
use super::{Worker, WorkerError};
use crate::changelog;
use crate::store::Shard;
use crate::topology::Guarantee;

/// How long an instance waits for an assignment after a revocation before it rejoins the group
/// (longer than a normal rebalance: tansu pauses 3 s per join round, the rebalance timeout is
/// `max.poll.interval.ms`, 30 s in `topology.toml`).
const REJOIN_AFTER: Duration = Duration::from_secs(45);

/// Most time [`Worker::wake_fetcher`]'s watermark query may block the worker's thread. The
/// query wakes librdkafka's broker thread when it is sent; its answer is not needed, so the wait
/// is short: during a broker outage every rewind restores and wakes again, and a longer blocking
/// call on the runtime's threads starved the process's `/metrics` (stop 32: one query per
/// partition leader at 500 ms each left the HTTP endpoints unanswered for ~10 s).
const WAKE_TIMEOUT: Duration = Duration::from_millis(100);

/// How long a restore keeps retrying a broker it cannot reach before the instance gives up.
const RESTORE_BROKER_WAIT: Duration = Duration::from_secs(600);

/// Holds a restore consumer and closes it on a blocking thread when dropped: closing a
/// librdkafka client blocks (~0.1 s), which must not stall the async worker threads.
pub(super) struct CloseOffThread(Option<Arc<changelog::RestoreConsumer>>);

impl CloseOffThread {
    fn consumer(&self) -> Arc<changelog::RestoreConsumer> {
        self.0.clone().expect("held until dropped")
    }
}

impl Drop for CloseOffThread {
    fn drop(&mut self) {
        if let Some(consumer) = self.0.take() {
            tokio::task::spawn_blocking(move || drop(consumer));
        }
    }
}

impl Worker {
    /// Acts on the rebalances the consumer saw: revoked partitions are dropped (their gathered
    /// records abandoned: returned so the caller discards them), assigned ones restored, then
    /// positioned at their restored offsets and resumed.
    pub(super) async fn rebalance(&mut self) -> Result<BTreeSet<i32>, WorkerError> {
        let (abandoned, assigned, rewound) = self.take_rebalance_events();
        if assigned.is_empty() && rewound.is_empty() {
            return Ok(abandoned);
        }
        if self.stopping() {
            // Leaving the group: partitions assigned now stay paused for their next owner.
            info!(worker = %self.name, partitions = ?assigned, "shutting down; not restoring newly assigned partitions");
            return Err(WorkerError::ShuttingDown);
        }
        self.health.set(&self.health.restored, false);
        let mut positions = TopicPartitionList::new();
        for (p, starts) in rewound.iter().filter(|(p, _)| !assigned.contains(p)) {
            for topic in &self.inputs {
                let offset = starts.iter().find(|(t, _)| t == topic).map(|(_, o)| Offset::Offset(*o)).unwrap_or(Offset::Stored);
                positions.add_partition_offset(topic, *p, offset)?;
            }
            self.owned.insert(*p);
        }
        // One restore consumer serves every partition of this rebalance; it is closed off the
        // async threads (closing takes librdkafka ~0.1 s).
        let restorer = CloseOffThread(Some(Arc::new(
            changelog::restore_consumer(&self.broker, &self.changelog_topic)
                .map_err(|e| WorkerError::Restore(format!("cannot create the restore consumer: {e}")))?,
        )));
        for p in &assigned {
            let shard = self.store.shard(*p)?;
            let report = self.restore(*p, &shard, &restorer).await?;
            if !report.orphans.is_empty() {
                let o = self.orphans.entry(*p).or_default();
                o.writes.extend(report.orphans.writes);
                o.timers.extend(report.orphans.timers);
            }
            for topic in &self.inputs {
                let offset = match report.offsets.get(topic) {
                    Some(next) if self.guarantee != Guarantee::AtLeastOnce => Offset::Offset(*next),
                    _ => Offset::Stored,
                };
                positions.add_partition_offset(topic, *p, offset)?;
            }
            self.shards.insert(*p, shard);
            self.owned.insert(*p);
        }
        // Position the restored partitions, then let them flow. A partition whose committed
        // offset is wanted (`Stored`) needs no seek.
        let mut seeks = TopicPartitionList::new();
        for e in positions.elements() {
            if let Offset::Offset(o) = e.offset() {
                seeks.add_partition_offset(e.topic(), e.partition(), Offset::Offset(o))?;
            }
        }
        if seeks.count() > 0 {
            self.seek(seeks).await?;
        }
        self.consumer.resume(&positions)?;
        self.wake_fetcher(&positions);
        self.consumer.context().paused.lock().expect("paused set").retain(|p| !self.owned.contains(p));
        self.health.set(&self.health.restored, true);
        info!(worker = %self.name, partitions = ?self.owned, "worker ready");
        Ok(abandoned)
    }

    /// Drains the consumer's rebalance queue: revoked partitions are dropped with their state
    /// handles and orphans (returned as abandoned), assigned and rewound ones returned to restore
    /// or re-position.
    #[allow(clippy::type_complexity)]
    fn take_rebalance_events(&mut self) -> (BTreeSet<i32>, BTreeSet<i32>, BTreeMap<i32, Vec<(String, i64)>>) {
        let mut abandoned = BTreeSet::new();
        let mut assigned = BTreeSet::new();
        let mut rewound: BTreeMap<i32, Vec<(String, i64)>> = BTreeMap::new();
        for event in self.consumer.context().take() {
            match event {
                RebalanceEvent::Revoked(ps) => {
                    for p in &ps {
                        self.owned.remove(p);
                        self.shards.remove(p);
                        // The next owner finds them after the last marker and compensates them.
                        self.orphans.remove(p);
                        assigned.remove(p);
                    }
                    info!(worker = %self.name, partitions = ?ps, "partitions revoked");
                    abandoned.extend(ps);
                    self.revoked_since.get_or_insert_with(Instant::now);
                }
                RebalanceEvent::Assigned(ps) => {
                    self.revoked_since = None;
                    self.refused_joins = 0;
                    if ps.is_empty() && self.owned.is_empty() {
                        // More members than partitions: an idle member is still a ready one.
                        self.health.set(&self.health.restored, true);
                        info!(worker = %self.name, "worker ready with no partitions assigned");
                    }
                    assigned.extend(ps)
                }
                RebalanceEvent::Rewind(ps) => rewound.extend(ps),
            }
        }
        (abandoned, assigned, rewound)
    }

    /// Restores partition `p` into `shard` ([`changelog::restore_with`] on a blocking thread),
    /// waiting out a broker that is away with the retry policy's backoff up to
    /// [`RESTORE_BROKER_WAIT`]; logs and measures the restore.
    ///
    /// Errors: [`WorkerError::Restore`] for a corrupt changelog, a broker away for longer, or a
    /// panicked restore task.
    async fn restore(&mut self, p: i32, shard: &Shard, restorer: &CloseOffThread) -> Result<changelog::Report, WorkerError> {
        // A broker that is away (restarting, unreachable) is waited for with the retry
        // policy's backoff, up to RESTORE_BROKER_WAIT; a corrupt changelog fails at once.
        let waiting_since = Instant::now();
        let mut attempt = 0;
        let report = loop {
            let (consumer, topic, inputs, s) = (restorer.consumer(), self.changelog_topic.clone(), self.inputs.clone(), shard.clone());
            let shutdown = self.shutdown.clone();
            let result = tokio::task::spawn_blocking(move || {
                let stop = || super::signalled(&shutdown);
                changelog::restore_with(&consumer, &topic, &inputs, &s, Duration::from_secs(600), &stop)
            })
            .await
            .map_err(|e| WorkerError::Restore(format!("restore task panicked: {e}")))?;
            match result {
                Ok(report) => break report,
                Err(e @ changelog::RestoreError::Stopped { .. }) => {
                    info!(worker = %self.name, partition = p, reason = %e, "restore left off");
                    return Err(WorkerError::ShuttingDown);
                }
                Err(e @ changelog::RestoreError::Kafka { .. }) if waiting_since.elapsed() < RESTORE_BROKER_WAIT => {
                    attempt += 1;
                    let wait = self.retry.backoff(attempt);
                    warn!(worker = %self.name, partition = p, attempt, wait_ms = wait.as_millis() as u64, error = %e, "restore cannot reach the broker; retrying");
                    self.metrics.retries.with_label_values(&[self.name.as_str(), "restore"]).inc();
                    tokio::time::sleep(wait).await;
                    if self.stopping() {
                        return Err(WorkerError::ShuttingDown);
                    }
                }
                Err(e) => return Err(WorkerError::Restore(e.to_string())),
            }
        };
        info!(
            worker = %self.name,
            partition = p,
            source = report.source.as_str(),
            records = report.records,
            units = report.units,
            seconds = report.elapsed.as_secs_f64(),
            "state restored"
        );
        self.metrics.restore.with_label_values(&[self.name.as_str(), report.source.as_str()]).observe(report.elapsed.as_secs_f64());
        self.metrics.restored_records.with_label_values(&[self.name.as_str()]).inc_by(report.records);
        Ok(report)
    }

    /// Leaves and rejoins the group when a revocation was not followed by any assignment within
    /// `REJOIN_AFTER`: a new JoinGroup restarts a rebalance a coordinator left unfinished. (On
    /// tansu 0.6.0 the stall seen after an outage longer than the session timeout is a dangling
    /// group leader that no client action clears, README "tansu 0.6.0: what we found"; the warning and the
    /// `rejoin` retry count still say that it happens.)
    pub(super) fn rejoin_if_stuck(&mut self) -> Result<(), WorkerError> {
        if self.revoked_since.is_some_and(|t| t.elapsed() > REJOIN_AFTER) {
            warn!(worker = %self.name, waited_s = REJOIN_AFTER.as_secs(), "no partitions assigned since a revocation; rejoining the group");
            self.metrics.retries.with_label_values(&[self.name.as_str(), "rejoin"]).inc();
            self.consumer.unsubscribe();
            let inputs: Vec<&str> = self.inputs.iter().map(String::as_str).collect();
            self.consumer.subscribe(&inputs)?;
            self.revoked_since = Some(Instant::now());
        }
        Ok(())
    }

    /// Handles an error the consumer returned instead of a record. Most are transient (librdkafka
    /// retries them itself) and only logged. A fatal one leaves the consumer unusable:
    /// `UNRELEASED_INSTANCE_ID` is what the KIP-848 consumer protocol answers a static member
    /// (`group.instance.id`) whose previous incarnation is still in the group, i.e. a pod
    /// restarted after a SIGKILL before the broker expired the dead member's session
    /// (`group.consumer.session.timeout.ms`). It is waited out: a new consumer joins again after
    /// 1 s, 2 s, … (at most 5 s) while the instance owns no partition, counted in
    /// `orderflow_retries_total{cause="rejoin"}`. Other fatal errors are logged at ERROR and the
    /// loop goes on (see the arm's comment).
    ///
    /// Errors: [`WorkerError::Kafka`] when a new consumer cannot be created.
    pub(super) async fn on_consumer_error(&mut self, e: KafkaError) -> Result<(), WorkerError> {
        match e {
            KafkaError::MessageConsumptionFatal(RDKafkaErrorCode::UnreleasedInstanceId) if self.owned.is_empty() => {
                self.refused_joins += 1;
                let wait = Duration::from_secs(u64::from(self.refused_joins.min(5)));
                warn!(
                    worker = %self.name,
                    wait_s = wait.as_secs(),
                    "the group still holds this instance id (the previous incarnation's session has not expired); joining again"
                );
                self.metrics.retries.with_label_values(&[self.name.as_str(), "rejoin"]).inc();
                tokio::time::sleep(wait).await;
                self.consumer =
                    subscribed_consumer(&self.consumer_config, &self.name, &self.metrics, &self.health, &self.inputs, self.stalls.clone())?;
                Ok(())
            }
            e @ KafkaError::MessageConsumptionFatal(_) => {
                // Left as it was: stopping here turned a Kafka restart into an exit (after a session
                // timeout librdkafka reports FENCED_INSTANCE_ID as fatal, and the worker went on
                // processing without it in the outage test).
                error!(worker = %self.name, error = %e, "fatal consumer error");
                Ok(())
            }
            e => {
                warn!(worker = %self.name, error = %e, "consumer error");
                Ok(())
            }
        }
    }

    /// Seeks paused partitions, retrying while librdkafka is still setting up their fetchers.
    async fn seek(&mut self, tpl: TopicPartitionList) -> Result<(), WorkerError> {
        let mut attempt = 0;
        loop {
            let result = self.consumer.seek_partitions(tpl.clone(), Timeout::After(Duration::from_secs(5)));
            let failed: Vec<String> = match &result {
                Ok(out) => out
                    .elements()
                    .iter()
                    .filter_map(|e| e.error().err().map(|err| format!("{}[{}]: {err}", e.topic(), e.partition())))
                    .collect(),
                Err(e) => vec![e.to_string()],
            };
            if failed.is_empty() {
                return Ok(());
            }
            attempt += 1;
            if attempt >= 50 {
                return Err(WorkerError::Restore(format!("cannot position restored partitions: {}", failed.join("; "))));
            }
            debug!(worker = %self.name, attempt, errors = ?failed, "seek not yet possible; retrying");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Has librdkafka fetch the partitions just resumed now rather than up to a second later.
    ///
    /// librdkafka 2.12 decides what to fetch in the broker's own thread, which a resume or a seek
    /// does not wake: resumed partitions were first fetched when that thread woke on its own,
    /// ~1.0 s after `worker ready` in every restart `orderflow bench recovery` measured (issue 18;
    /// the same wait follows each rewind after an aborted unit). A request on the broker's
    /// connection wakes it: one watermark query (answered in ~1 ms by a local broker; its result
    /// is not needed, so a failure is ignored).
    fn wake_fetcher(&self, resumed: &TopicPartitionList) {
        if let Some(e) = resumed.elements().first() {
            let _ = self.consumer.fetch_watermarks(e.topic(), e.partition(), Timeout::After(WAKE_TIMEOUT));
        }
    }

    /// Pauses every owned partition and queues a [`RebalanceEvent::Rewind`] to where `batch`
    /// started reading: the next loop turn re-reads the unit from the last committed state.
    pub(super) fn rewind(&mut self, batch: &[OwnedMessage]) -> Result<(), WorkerError> {
        let owned = std::mem::take(&mut self.owned);
        let mut tpl = TopicPartitionList::new();
        for p in &owned {
            for topic in &self.inputs {
                tpl.add_partition(topic, *p);
            }
        }
        self.consumer.pause(&tpl)?;
        self.consumer.context().paused.lock().expect("paused set").extend(owned.iter().copied());
        // Where the aborted unit started reading; partitions it read nothing from stay put.
        let mut starts: BTreeMap<i32, Vec<(String, i64)>> = owned.iter().map(|p| (*p, Vec::new())).collect();
        for m in batch {
            let entry = starts.entry(m.partition()).or_default();
            if !entry.iter().any(|(t, _)| t == m.topic()) {
                entry.push((m.topic().to_string(), m.offset()));
            }
        }
        self.consumer.context().events.lock().expect("rebalance queue").push(RebalanceEvent::Rewind(starts));
        Ok(())
    }
}
