//! The consume → process → produce loop of one worker instance.
//!
//! A *unit of work* gathers up to `max_batch` input records or one `commit_interval`, then:
//! 1. decodes each record (undecodable ones are dead-lettered),
//! 2. runs the processor on each event with `eventId` dedupe (`orderflow_api::handle`), staging
//!    state writes per input partition, then fires the due timers of every assigned partition,
//! 3. produces every output and dead-letter record and waits until the broker acknowledged all,
//! 4. writes each partition's staged state, remembered `eventId`s, timers and next input offsets
//!    to sled in one batch and flushes it,
//! 5. commits the input offsets to the consumer group.
//!
//! An input is therefore never acknowledged before its outputs, and the local store is never
//! ahead of the broker. A crash anywhere replays the unit: outputs are re-emitted with the same
//! deterministic `eventId`s, and state effects are applied once because the `eventId`s are
//! remembered in the same batch as the state they changed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::future::join_all;
use orderflow_api::{fire_timers, handle, Context, Event, Handled, Outputs, ProcessError, Processor, StateTxn};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use crate::codec::Codec;
use crate::kafka::{client_config, dlq_topic, Side};
use crate::metrics::Metrics;
use crate::store::{Shard, Store, StoreError};
use crate::topology::{Guarantee, Loaded};

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
}

/// A running worker instance.
pub struct Worker {
    name: String,
    processor: Box<dyn Processor>,
    ports: Vec<String>,
    outputs: BTreeMap<String, String>,
    inputs: Vec<String>,
    consumer: StreamConsumer,
    producer: FutureProducer,
    store: Store,
    shards: BTreeMap<i32, Shard>,
    codec: Arc<Codec>,
    metrics: Metrics,
    commit_interval: Duration,
    max_batch: usize,
    /// Where this instance keeps its sled store.
    pub state_path: PathBuf,
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
    pub fn new(setup: WorkerSetup) -> Result<Worker, WorkerError> {
        let t = &setup.topology.topology;
        let spec = t.workers.get(&setup.name).ok_or_else(|| WorkerError::UnknownWorker(setup.name.clone()))?;
        let guarantee = spec.guarantee(&t.defaults);
        if guarantee == Guarantee::ExactlyOnce {
            return Err(WorkerError::Guarantee {
                worker: setup.name.clone(),
                guarantee: guarantee.as_str(),
                reason: "the transactional path is not built yet; use effectively_once (see README \"Guarantees\")".into(),
            });
        }
        let mut consumer_config = client_config(&t.broker, Side::Consumer);
        consumer_config.set("group.id", spec.group_id(&setup.name)).set("client.id", format!("{}-{}", setup.name, setup.instance));
        let consumer: StreamConsumer = consumer_config.create()?;
        let inputs: Vec<&str> = spec.inputs.iter().map(String::as_str).collect();
        consumer.subscribe(&inputs)?;
        let mut producer_config = client_config(&t.broker, Side::Producer);
        producer_config.set("client.id", format!("{}-{}", setup.name, setup.instance));
        let producer: FutureProducer = producer_config.create()?;
        let state_path = t.defaults.state_dir.join(&setup.name).join(&setup.instance);
        let store = Store::open(&state_path)?;
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
            while batch.len() < self.max_batch {
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
            self.unit(batch).await?;
        }
        info!(worker = %self.name, "worker stopped");
        Ok(())
    }

    fn assigned_partitions(&self) -> Result<BTreeSet<i32>, WorkerError> {
        Ok(self.consumer.assignment()?.elements().iter().map(|e| e.partition()).collect())
    }

    fn shard(&mut self, partition: i32) -> Result<(), WorkerError> {
        if !self.shards.contains_key(&partition) {
            self.shards.insert(partition, self.store.shard(partition)?);
        }
        Ok(())
    }

    /// Processes one unit of work and commits it (see the module docs for the order of steps).
    async fn unit(&mut self, batch: Vec<OwnedMessage>) -> Result<(), WorkerError> {
        let started = Instant::now();
        let now = now_ms();
        let assigned = self.assigned_partitions()?;
        self.metrics.assigned.with_label_values(&[&self.name]).set(assigned.len() as i64);
        let mut partitions: BTreeSet<i32> = assigned.clone();
        partitions.extend(batch.iter().map(|m| m.partition()));
        for p in &partitions {
            self.shard(*p)?;
        }

        // 1. Decode.
        let mut decoded = Vec::with_capacity(batch.len());
        for m in &batch {
            decoded.push(self.codec.decode(m.payload().unwrap_or_default()).await);
        }

        // 2. Process and fire timers, staging changes per partition.
        let mut dead_letters = Vec::new();
        let mut offsets: BTreeMap<i32, BTreeMap<String, i64>> = BTreeMap::new();
        let (changes, records, notes, fired) = {
            let mut txns: BTreeMap<i32, StateTxn> = partitions.iter().map(|p| (*p, StateTxn::new(&self.shards[p]))).collect();
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
        for n in &notes {
            self.metrics.business.with_label_values(&[self.name.as_str(), n.measure, &n.label]).inc();
        }
        self.metrics.timers_fired.with_label_values(&[&self.name]).inc_by(fired as u64);
        self.metrics.processing.with_label_values(&[&self.name]).observe(started.elapsed().as_secs_f64());
        let nothing_to_commit = batch.is_empty() && changes.values().all(|c| c.is_empty());
        if nothing_to_commit {
            return Ok(());
        }

        // 3. Produce outputs and dead letters; wait for every acknowledgement.
        let commit_started = Instant::now();
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
        let (acks, dlq_acks) = futures::join!(join_all(sends), join_all(dlq_sends));
        for (ack, (topic, ..)) in acks.into_iter().zip(&encoded) {
            ack.map_err(|(error, _)| WorkerError::Delivery { topic: topic.to_string(), error })?;
            self.metrics.produced.with_label_values(&[self.name.as_str(), topic]).inc();
        }
        for (ack, d) in dlq_acks.into_iter().zip(&dead_letters) {
            ack.map_err(|(error, _)| WorkerError::Delivery { topic: dlq_topic(d.source.topic()), error })?;
            self.metrics.dlq.with_label_values(&[self.name.as_str(), d.class]).inc();
        }

        // 4. State, seen eventIds, timers and next offsets: one sled batch per partition.
        let empty = BTreeMap::new();
        for (p, c) in &changes {
            let offs = offsets.get(p).unwrap_or(&empty);
            if !c.is_empty() || !offs.is_empty() {
                self.shards[p].commit(c, offs)?;
            }
        }
        self.store.flush().await?;

        // 5. Input offsets to the consumer group.
        if !offsets.is_empty() {
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

    /// The input topics.
    pub fn inputs(&self) -> &[String] {
        &self.inputs
    }
}

/// Logs and returns a worker's result (for tasks spawned per worker).
pub fn log_exit(name: &str, result: &Result<(), WorkerError>) {
    match result {
        Ok(()) => info!(worker = name, "worker exited cleanly"),
        Err(e) => error!(worker = name, error = %e, "worker failed"),
    }
}
