//! The consume → process → produce loop of one worker instance.
//!
//! A *unit of work* gathers up to `max_batch` input records or one `commit_interval`, then:
//! 1. decodes each record (undecodable ones are dead-lettered),
//! 2. runs the processor on each event with `eventId` dedupe (`orderflow_api::handle`), staging
//!    state writes per input partition, then fires the due timers of every assigned partition,
//! 3. produces every output, dead-letter record and changelog record (each touched partition's
//!    state changes followed by a commit marker carrying the input offsets) and waits until the
//!    broker acknowledged all,
//! 4. writes each partition's staged state, remembered `eventId`s, timers, next input offsets and
//!    changelog position to sled in one batch and flushes it,
//! 5. commits the input offsets to the consumer group (advisory: restore resumes from the
//!    offsets stored with the state).
//!
//! Partitions are tasks: on assignment a partition is paused, its state restored
//! ([`changelog::restore`]: local sled if consistent, changelog tail, or a rebuild from the
//! changelog alone), its inputs positioned at the restored offsets and only then resumed. On
//! revocation the records gathered for it are abandoned (the new owner replays them).
//!
//! An input is therefore never acknowledged before its outputs, and the local store is never
//! ahead of the broker. A crash anywhere replays the unit: outputs are re-emitted with the same
//! deterministic `eventId`s, and state effects are applied once because the `eventId`s are
//! remembered in the same batch as the state they changed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::future::join_all;
use orderflow_api::{fire_timers, handle, Context, Event, Handled, Outputs, ProcessError, Processor, StateTxn};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::ClientContext;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use crate::changelog;
use crate::codec::Codec;
use crate::kafka::{client_config, dlq_topic, Side};
use crate::metrics::Metrics;
use crate::store::{Shard, Store, StoreError};
use crate::topology::{BrokerConfig, Guarantee, Loaded};
use crate::txn::{TxnErrorClass, TxnProducer};

/// Errors that stop a worker instance. All are fatal: the process exits non-zero so the pod
/// restarts and replays from the last committed unit.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("worker {0} is not in the topology")]
    UnknownWorker(String),
    #[error("worker {worker}: guarantee {guarantee} is not available: {reason}")]
    Guarantee { worker: String, guarantee: &'static str, reason: String },
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("delivery to {topic} failed: {error}")]
    Delivery { topic: String, error: rdkafka::error::KafkaError },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("encoding an output for {topic}: {error}")]
    Encode { topic: String, error: crate::codec::CodecError },
    #[error(transparent)]
    Txn(crate::txn::TxnError),
    #[error("state restore: {0}")]
    Restore(String),
    #[error("processor failed on {topic}[{partition}]@{offset}: {error}")]
    Process { topic: String, partition: i32, offset: i64, error: ProcessError },
}

/// Everything needed to start one worker instance.
pub struct WorkerSetup {
    /// Worker name in the topology.
    pub name: String,
    /// The loaded topology.
    pub topology: Arc<Loaded>,
    /// The business logic.
    pub processor: Box<dyn Processor>,
    /// Output ports the processor may emit on (its kind's ports).
    pub ports: &'static [&'static str],
    /// Shared codec.
    pub codec: Arc<Codec>,
    /// Shared metrics.
    pub metrics: Metrics,
    /// Instance id within the worker's group (pod name); names the state directory.
    pub instance: String,
    /// Set while every assigned partition is restored and being processed (`/readyz`).
    pub ready: Arc<AtomicBool>,
}

/// A running worker instance.
pub struct Worker {
    name: String,
    processor: Box<dyn Processor>,
    ports: Vec<String>,
    outputs: BTreeMap<String, String>,
    inputs: Vec<String>,
    consumer: StreamConsumer<WorkerContext>,
    producer: FutureProducer,
    /// The transactional producer under `exactly_once` (then `producer` is its inner producer).
    txn: Option<TxnProducer>,
    broker: BrokerConfig,
    guarantee: Guarantee,
    changelog_topic: String,
    /// Partitions restored and being processed.
    owned: BTreeSet<i32>,
    ready: Arc<AtomicBool>,
    store: Store,
    shards: BTreeMap<i32, Shard>,
    codec: Arc<Codec>,
    metrics: Metrics,
    commit_interval: Duration,
    max_batch: usize,
    /// Where this instance keeps its sled store.
    pub state_path: PathBuf,
}

/// What the consumer's rebalance callbacks saw, for the loop to act on between units.
#[derive(Debug)]
enum RebalanceEvent {
    Assigned(BTreeSet<i32>),
    Revoked(BTreeSet<i32>),
    /// Not from the group: an aborted transaction left these partitions paused; their local
    /// state is still the last committed unit's, so they only need re-positioning to where the
    /// aborted unit started reading: `(partition, [(topic, offset)])`.
    Rewind(BTreeMap<i32, Vec<(String, i64)>>),
}

/// Consumer context: pauses newly assigned partitions (they are restored before they are read)
/// and queues the rebalance for the worker loop.
pub struct WorkerContext {
    events: Mutex<Vec<RebalanceEvent>>,
    worker: String,
    metrics: Metrics,
}

fn partitions_of(tpl: &TopicPartitionList) -> BTreeSet<i32> {
    tpl.elements().iter().map(|e| e.partition()).collect()
}

impl ClientContext for WorkerContext {
    /// librdkafka statistics (every `statistics.interval.ms`): exports consumer lag per input
    /// partition.
    fn stats(&self, stats: rdkafka::Statistics) {
        for (topic, t) in &stats.topics {
            for (partition, p) in &t.partitions {
                if *partition >= 0 && p.consumer_lag >= 0 {
                    self.metrics.lag.with_label_values(&[self.worker.as_str(), topic, &partition.to_string()]).set(p.consumer_lag);
                }
            }
        }
    }
}

impl ConsumerContext for WorkerContext {
    fn pre_rebalance(&self, _base: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            self.events.lock().expect("rebalance queue").push(RebalanceEvent::Revoked(partitions_of(tpl)));
        }
    }

    fn post_rebalance(&self, base: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            if let Err(e) = base.pause(tpl) {
                error!(error = %e, "cannot pause newly assigned partitions");
            }
            self.events.lock().expect("rebalance queue").push(RebalanceEvent::Assigned(partitions_of(tpl)));
        }
    }
}

impl WorkerContext {
    fn take(&self) -> Vec<RebalanceEvent> {
        std::mem::take(&mut *self.events.lock().expect("rebalance queue"))
    }
    fn has_events(&self) -> bool {
        !self.events.lock().expect("rebalance queue").is_empty()
    }
}

/// One dead-letter record to write.
struct DeadLetter {
    source: OwnedMessage,
    class: &'static str,
    message: String,
}

/// Milliseconds since the Unix epoch: the runtime's clock.
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

impl Worker {
    /// Creates the clients and opens the state store at
    /// `<state_dir>/<worker>/<instance>`.
    ///
    /// Errors: unknown worker, a guarantee this build cannot honour (never silently downgraded),
    /// client creation, state store open.
    pub async fn new(setup: WorkerSetup) -> Result<Worker, WorkerError> {
        let t = &setup.topology.topology;
        let spec = t.workers.get(&setup.name).ok_or_else(|| WorkerError::UnknownWorker(setup.name.clone()))?;
        let guarantee = spec.guarantee(&t.defaults);
        if guarantee == Guarantee::ExactlyOnce {
            // Never silently downgraded: refuse to start on a broker without transactions.
            let support = crate::probe::broker_supports_transactions(&t.broker.bootstrap, Duration::from_secs(10)).await.map_err(|e| {
                WorkerError::Guarantee {
                    worker: setup.name.clone(),
                    guarantee: guarantee.as_str(),
                    reason: format!("cannot ask the broker which APIs it has: {e}"),
                }
            })?;
            if !support.supported {
                return Err(WorkerError::Guarantee {
                    worker: setup.name.clone(),
                    guarantee: guarantee.as_str(),
                    reason: format!(
                        "the broker at {} does not support transactions (missing {}); use effectively_once (README \"Processing guarantees\")",
                        t.broker.bootstrap,
                        support.missing.join(", ")
                    ),
                });
            }
        }
        let mut consumer_config = client_config(&t.broker, Side::Consumer);
        consumer_config.set("group.id", spec.group_id(&setup.name)).set("client.id", format!("{}-{}", setup.name, setup.instance));
        if t.defaults.static_membership {
            // KIP-345: a restarted pod rejoins under its old identity, so a crash-restart does
            // not wait for the dead member's session to expire (and, on tansu 0.6.0, does not
            // hit its coordinator stalling when a member expires during a join).
            consumer_config.set("group.instance.id", format!("{}-{}", setup.name, setup.instance));
        }
        if consumer_config.get("statistics.interval.ms").is_none() {
            consumer_config.set("statistics.interval.ms", "5000");
        }
        let context = WorkerContext { events: Mutex::new(Vec::new()), worker: setup.name.clone(), metrics: setup.metrics.clone() };
        let consumer: StreamConsumer<WorkerContext> = consumer_config.create_with_context(context)?;
        let inputs: Vec<&str> = spec.inputs.iter().map(String::as_str).collect();
        consumer.subscribe(&inputs)?;
        let mut producer_config = client_config(&t.broker, Side::Producer);
        producer_config.set("client.id", format!("{}-{}", setup.name, setup.instance));
        let (producer, txn) = if guarantee == Guarantee::ExactlyOnce {
            // One transactional id per worker instance: a restarted instance fences its zombie.
            producer_config.set("transactional.id", format!("{}-{}", spec.group_id(&setup.name), setup.instance));
            let txn = TxnProducer::init(producer_config, Duration::from_secs(60)).await.map_err(WorkerError::Txn)?;
            (txn.producer().clone(), Some(txn))
        } else {
            (producer_config.create()?, None)
        };
        let state_path = t.defaults.state_dir.join(&setup.name).join(&setup.instance);
        let (store, reset) = Store::open_or_reset(&state_path)?;
        if reset {
            warn!(worker = %setup.name, state = %state_path.display(), "state store was reset; partitions will be rebuilt from the changelog");
        }
        setup.metrics.guarantee.with_label_values(&[&setup.name, guarantee.as_str()]).set(1);
        info!(worker = %setup.name, instance = %setup.instance, guarantee = guarantee.as_str(), state = %state_path.display(), "worker started");
        Ok(Worker {
            name: setup.name.clone(),
            processor: setup.processor,
            ports: setup.ports.iter().map(|s| s.to_string()).collect(),
            outputs: spec.outputs.clone(),
            inputs: spec.inputs.clone(),
            consumer,
            producer,
            txn,
            broker: t.broker.clone(),
            guarantee,
            changelog_topic: changelog::topic(&setup.name),
            owned: BTreeSet::new(),
            ready: setup.ready,
            store,
            shards: BTreeMap::new(),
            codec: setup.codec,
            metrics: setup.metrics,
            commit_interval: spec.commit_interval(&t.defaults),
            max_batch: spec.max_batch(&t.defaults),
            state_path,
        })
    }

    /// Runs units of work until `shutdown` turns true, then finishes the unit in flight and
    /// returns (dropping the consumer leaves the group).
    ///
    /// Errors: any [`WorkerError`]; the unit in flight is then not committed and will be replayed.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) -> Result<(), WorkerError> {
        loop {
            if *shutdown.borrow() {
                break;
            }
            let deadline = tokio::time::Instant::now() + self.commit_interval;
            let mut batch = Vec::new();
            while batch.len() < self.max_batch && !self.consumer.context().has_events() {
                tokio::select! {
                    msg = self.consumer.recv() => match msg {
                        Ok(m) => batch.push(m.detach()),
                        Err(e) => {
                            warn!(worker = %self.name, error = %e, "consumer error");
                            break;
                        }
                    },
                    _ = tokio::time::sleep_until(deadline) => break,
                    _ = shutdown.changed() => break,
                }
            }
            let abandoned = self.rebalance().await?;
            batch.retain(|m| self.owned.contains(&m.partition()) && !abandoned.contains(&m.partition()));
            self.unit(batch).await?;
        }
        self.ready.store(false, Ordering::Relaxed);
        info!(worker = %self.name, "worker stopped");
        Ok(())
    }

    /// Acts on the rebalances the consumer saw: revoked partitions are dropped (their gathered
    /// records abandoned: returned so the caller discards them), assigned ones restored, then
    /// positioned at their restored offsets and resumed.
    async fn rebalance(&mut self) -> Result<BTreeSet<i32>, WorkerError> {
        let mut abandoned = BTreeSet::new();
        let mut assigned = BTreeSet::new();
        let mut rewound: BTreeMap<i32, Vec<(String, i64)>> = BTreeMap::new();
        for event in self.consumer.context().take() {
            match event {
                RebalanceEvent::Revoked(ps) => {
                    for p in &ps {
                        self.owned.remove(p);
                        self.shards.remove(p);
                        assigned.remove(p);
                    }
                    info!(worker = %self.name, partitions = ?ps, "partitions revoked");
                    abandoned.extend(ps);
                }
                RebalanceEvent::Assigned(ps) => {
                    if ps.is_empty() && self.owned.is_empty() {
                        // More members than partitions: an idle member is still a ready one.
                        self.ready.store(true, Ordering::Relaxed);
                        info!(worker = %self.name, "worker ready with no partitions assigned");
                    }
                    assigned.extend(ps)
                }
                RebalanceEvent::Rewind(ps) => rewound.extend(ps),
            }
        }
        if assigned.is_empty() && rewound.is_empty() {
            return Ok(abandoned);
        }
        self.ready.store(false, Ordering::Relaxed);
        let mut positions = TopicPartitionList::new();
        for (p, starts) in rewound.iter().filter(|(p, _)| !assigned.contains(p)) {
            for topic in &self.inputs {
                let offset = starts.iter().find(|(t, _)| t == topic).map(|(_, o)| Offset::Offset(*o)).unwrap_or(Offset::Stored);
                positions.add_partition_offset(topic, *p, offset)?;
            }
            self.owned.insert(*p);
        }
        for p in &assigned {
            let shard = self.store.shard(*p)?;
            let (broker, topic, inputs, s) = (self.broker.clone(), self.changelog_topic.clone(), self.inputs.clone(), shard.clone());
            let report = tokio::task::spawn_blocking(move || changelog::restore(&broker, &topic, &inputs, &s, Duration::from_secs(600)))
                .await
                .map_err(|e| WorkerError::Restore(format!("restore task panicked: {e}")))?
                .map_err(|e| WorkerError::Restore(e.to_string()))?;
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
        self.ready.store(true, Ordering::Relaxed);
        info!(worker = %self.name, partitions = ?self.owned, "worker ready");
        Ok(abandoned)
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

    /// Processes one unit of work and commits it (see the module docs for the order of steps).
    async fn unit(&mut self, batch: Vec<OwnedMessage>) -> Result<(), WorkerError> {
        let started = Instant::now();
        let now = now_ms();
        let assigned = self.owned.clone();
        self.metrics.assigned.with_label_values(&[self.name.as_str()]).set(assigned.len() as i64);

        // 1. Decode.
        let mut decoded = Vec::with_capacity(batch.len());
        for m in &batch {
            decoded.push(self.codec.decode(m.payload().unwrap_or_default()).await);
        }

        // 2. Process and fire timers, staging changes per partition.
        let mut dead_letters = Vec::new();
        let mut offsets: BTreeMap<i32, BTreeMap<String, i64>> = BTreeMap::new();
        let (changes, records, notes, fired) = {
            let mut txns: BTreeMap<i32, StateTxn> = assigned.iter().map(|p| (*p, StateTxn::new(&self.shards[p]))).collect();
            let mut out = Outputs::new(self.ports.iter().filter(|p| self.outputs.contains_key(*p)).cloned());
            for (m, event) in batch.iter().zip(decoded) {
                let topic = m.topic();
                offsets.entry(m.partition()).or_default().insert(topic.to_string(), m.offset() + 1);
                let event: Event = match event {
                    Ok(e) => e,
                    Err(e) => {
                        warn!(worker = %self.name, topic, partition = m.partition(), offset = m.offset(), error = %e, "undecodable record sent to the dead-letter topic");
                        dead_letters.push(DeadLetter { source: m.clone(), class: "decode", message: e.to_string() });
                        self.metrics.consumed.with_label_values(&[self.name.as_str(), topic, "dead_lettered"]).inc();
                        continue;
                    }
                };
                if let Some(ts) = m.timestamp().to_millis() {
                    self.metrics.delay.with_label_values(&[self.name.as_str()]).observe((now - ts).max(0) as f64 / 1000.0);
                }
                let ctx = Context { topic: topic.to_string(), partition: m.partition(), offset: m.offset(), now_ms: now };
                let txn = txns.get_mut(&m.partition()).expect("shard opened for every partition in the batch");
                let outcome = match handle(self.processor.as_mut(), &ctx, &event, txn, &mut out) {
                    Ok(Handled::Processed) => "processed",
                    Ok(Handled::Duplicate) => "duplicate",
                    Err(ProcessError::Invalid(msg)) => {
                        warn!(worker = %self.name, topic, partition = m.partition(), offset = m.offset(), event_id = event.event_id(), error = %msg, "invalid event sent to the dead-letter topic");
                        dead_letters.push(DeadLetter { source: m.clone(), class: "invalid", message: msg });
                        "dead_lettered"
                    }
                    Err(error) => {
                        return Err(WorkerError::Process { topic: topic.to_string(), partition: m.partition(), offset: m.offset(), error })
                    }
                };
                self.metrics.consumed.with_label_values(&[self.name.as_str(), topic, outcome]).inc();
            }
            let mut fired = 0;
            for p in &assigned {
                let ctx = Context { topic: String::new(), partition: *p, offset: -1, now_ms: now };
                let txn = txns.get_mut(p).expect("shard opened for every assigned partition");
                fired += fire_timers(self.processor.as_mut(), &ctx, txn, &mut out).map_err(|error| WorkerError::Process {
                    topic: "<timer>".into(),
                    partition: *p,
                    offset: -1,
                    error,
                })?;
            }
            let changes: BTreeMap<i32, orderflow_api::Changes> = txns.into_iter().map(|(p, t)| (p, t.into_changes())).collect();
            (changes, out.take_records(), out.take_notes(), fired)
        };
        let mut out_of_stock = Vec::new();
        for n in &notes {
            match n.measure {
                // Unbounded label (a product id): only a bounded top N is exported.
                "out_of_stock" => out_of_stock.push(n.label.clone()),
                "conservation_mismatch" => {
                    error!(worker = %self.name, kind = %n.label, "stock conservation mismatch");
                    self.metrics.conservation.with_label_values(&[self.name.as_str()]).inc();
                }
                _ => self.metrics.business.with_label_values(&[self.name.as_str(), n.measure, &n.label]).inc(),
            }
        }
        self.metrics.out_of_stock(&out_of_stock);
        self.metrics.timers_fired.with_label_values(&[&self.name]).inc_by(fired as u64);
        self.metrics.processing.with_label_values(&[&self.name]).observe(started.elapsed().as_secs_f64());
        let nothing_to_commit = batch.is_empty() && changes.values().all(|c| c.is_empty());
        if nothing_to_commit {
            return Ok(());
        }

        // 3. Produce outputs, dead letters and changelog records; wait for every acknowledgement
        //    (under exactly_once, inside one transaction that also commits the input offsets).
        let commit_started = Instant::now();
        if let Some(txn) = &self.txn {
            if let Err(e) = txn.begin().await {
                return self.transaction_failed(e, &batch).await;
            }
        }
        let mut encoded = Vec::with_capacity(records.len());
        for r in &records {
            let topic = &self.outputs[&r.port];
            let bytes = self.codec.encode(topic, &r.event).await.map_err(|error| WorkerError::Encode { topic: topic.clone(), error })?;
            encoded.push((topic.as_str(), r.key.as_str(), bytes));
        }
        let sends = encoded.iter().map(|(topic, key, bytes)| {
            let record = FutureRecord::to(topic).key(*key).payload(bytes.as_slice());
            self.producer.send(record, Timeout::Never)
        });
        let dlq_payloads: Vec<(String, OwnedHeaders)> =
            dead_letters.iter().map(|d| (dlq_topic(d.source.topic()), self.dlq_headers(d, now))).collect();
        let dlq_sends = dead_letters.iter().zip(&dlq_payloads).map(|(d, (topic, headers))| {
            let mut record = FutureRecord::<[u8], [u8]>::to(topic).headers(headers.clone());
            if let Some(k) = d.source.key() {
                record = record.key(k);
            }
            if let Some(p) = d.source.payload() {
                record = record.payload(p);
            }
            self.producer.send(record, Timeout::Never)
        });
        // Changelog: per partition with anything to commit, its changes then the marker.
        let empty_offsets = BTreeMap::new();
        let changelog_records: Vec<(i32, Vec<changelog::Record>)> = changes
            .iter()
            .filter(|(p, c)| !c.is_empty() || offsets.contains_key(*p))
            .map(|(p, c)| (*p, changelog::records(&self.inputs, c, offsets.get(p).unwrap_or(&empty_offsets))))
            .collect();
        let changelog_topic = self.changelog_topic.as_str();
        let changelog_sends = changelog_records.iter().map(|(p, recs)| {
            // One partition's records in order; the marker is the last one.
            let sends: Vec<_> = recs
                .iter()
                .map(|r| {
                    let mut record = FutureRecord::<[u8], [u8]>::to(changelog_topic).partition(*p).key(r.key.as_slice());
                    if let Some(v) = &r.value {
                        record = record.payload(v.as_slice());
                    }
                    self.producer.send(record, Timeout::Never)
                })
                .collect();
            async move { (*p, join_all(sends).await) }
        });
        let (acks, dlq_acks, changelog_acks) = futures::join!(join_all(sends), join_all(dlq_sends), join_all(changelog_sends));
        if let Some(txn) = &self.txn {
            // A failed send inside a transaction makes it abortable: abort, rewind, reprocess.
            let failed = acks.iter().chain(&dlq_acks).chain(changelog_acks.iter().flat_map(|(_, a)| a)).find_map(|a| a.as_ref().err());
            if let Some((error, _)) = failed {
                warn!(worker = %self.name, %error, "send failed inside the transaction; aborting the unit");
                let class = crate::txn::classify(error);
                let e = crate::txn::TxnError {
                    class: if class == TxnErrorClass::Fatal { class } else { TxnErrorClass::Abortable },
                    source: error.clone(),
                    step: "produce",
                };
                return self.transaction_failed(e, &batch).await;
            }
            let mut tpl = TopicPartitionList::new();
            for (p, topics) in &offsets {
                for (topic, next) in topics {
                    tpl.add_partition_offset(topic, *p, Offset::Offset(*next))?;
                }
            }
            let group = self.consumer.group_metadata().ok_or_else(|| WorkerError::Restore("consumer has no group metadata".into()))?;
            if let Err(e) = txn.commit(tpl, group).await {
                return self.transaction_failed(e, &batch).await;
            }
        }
        let mut changelog_next: BTreeMap<i32, i64> = BTreeMap::new();
        for (p, partition_acks) in changelog_acks {
            for ack in partition_acks {
                let delivery = ack.map_err(|(error, _)| WorkerError::Delivery { topic: self.changelog_topic.clone(), error })?;
                let next = changelog_next.entry(p).or_insert(0);
                *next = (*next).max(delivery.offset + 1);
            }
        }
        for (ack, (topic, ..)) in acks.into_iter().zip(&encoded) {
            ack.map_err(|(error, _)| WorkerError::Delivery { topic: topic.to_string(), error })?;
            self.metrics.produced.with_label_values(&[self.name.as_str(), topic]).inc();
        }
        for (ack, d) in dlq_acks.into_iter().zip(&dead_letters) {
            ack.map_err(|(error, _)| WorkerError::Delivery { topic: dlq_topic(d.source.topic()), error })?;
            self.metrics.dlq.with_label_values(&[self.name.as_str(), d.class]).inc();
        }

        // 4. State, seen eventIds, timers, next offsets and changelog position: one sled batch
        //    per partition, flushed before the offsets are committed.
        for (p, next) in &changelog_next {
            self.shards[p].commit(&changes[p], offsets.get(p).unwrap_or(&empty_offsets), Some(*next))?;
        }
        if self.guarantee != Guarantee::AtLeastOnce {
            self.store.flush().await?;
        }

        // 5. Input offsets to the consumer group (already committed by the transaction under
        //    exactly_once).
        if !offsets.is_empty() && self.txn.is_none() {
            let mut tpl = TopicPartitionList::new();
            for (p, topics) in &offsets {
                for (topic, next) in topics {
                    tpl.add_partition_offset(topic, *p, Offset::Offset(*next))?;
                }
            }
            if let Err(e) = self.consumer.commit(&tpl, CommitMode::Async) {
                // The sled store already holds these offsets and eventIds; a replay is absorbed.
                warn!(worker = %self.name, error = %e, "offset commit failed; inputs will be replayed and deduplicated");
            }
        }
        self.metrics.commit.with_label_values(&[self.name.as_str(), "ok"]).observe(commit_started.elapsed().as_secs_f64());
        debug!(worker = %self.name, inputs = batch.len(), outputs = encoded.len(), dead_letters = dead_letters.len(), timers = fired, "unit committed");
        Ok(())
    }

    /// Handles a failed transactional step: fatal errors (fencing included) stop the instance;
    /// abortable ones abort the transaction, discard the unit's staged state (never written to
    /// sled) and rewind every owned partition to its last committed offsets, which are restored
    /// and re-read as after an assignment.
    async fn transaction_failed(&mut self, e: crate::txn::TxnError, batch: &[OwnedMessage]) -> Result<(), WorkerError> {
        self.metrics.commit.with_label_values(&[self.name.as_str(), e.class.as_str()]).observe(0.0);
        if e.class == TxnErrorClass::Fatal {
            error!(worker = %self.name, error = %e, "fatal transactional error; stopping this instance");
            return Err(WorkerError::Txn(e));
        }
        warn!(worker = %self.name, error = %e, "aborting the unit and rewinding");
        if let Some(txn) = &self.txn {
            txn.abort().await.map_err(WorkerError::Txn)?;
        }
        let owned = std::mem::take(&mut self.owned);
        let mut tpl = TopicPartitionList::new();
        for p in &owned {
            for topic in &self.inputs {
                tpl.add_partition(topic, *p);
            }
        }
        self.consumer.pause(&tpl)?;
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

    fn dlq_headers(&self, d: &DeadLetter, now: i64) -> OwnedHeaders {
        let mut h = OwnedHeaders::new();
        if let Some(orig) = d.source.headers() {
            for header in orig.iter() {
                h = h.insert(Header { key: header.key, value: header.value });
            }
        }
        let fields = [
            ("orderflow.dlq.source-topic", d.source.topic().to_string()),
            ("orderflow.dlq.source-partition", d.source.partition().to_string()),
            ("orderflow.dlq.source-offset", d.source.offset().to_string()),
            ("orderflow.dlq.worker", self.name.clone()),
            ("orderflow.dlq.error-class", d.class.to_string()),
            ("orderflow.dlq.error-message", d.message.clone()),
            ("orderflow.dlq.attempts", "1".to_string()),
            ("orderflow.dlq.time", now.to_string()),
        ];
        for (k, v) in fields {
            h = h.insert(Header { key: k, value: Some(v.as_bytes()) });
        }
        h
    }
}

/// Logs and returns a worker's result (for tasks spawned per worker).
pub fn log_exit(name: &str, result: &Result<(), WorkerError>) {
    match result {
        Ok(()) => info!(worker = name, "worker exited cleanly"),
        Err(e) => error!(worker = name, error = %e, "worker failed"),
    }
}
