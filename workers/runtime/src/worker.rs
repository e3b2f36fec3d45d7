//! The consume → process → produce loop of one worker instance.
//!
//! A *unit of work* gathers the input records already fetched, waiting for the first one at most
//! one `commit_interval` and ending at `max_batch` records or when no further record is at hand
//! (so at low load a record is processed as soon as it arrives, and under load units grow while
//! the previous one commits), then:
//! 1. decodes each record (undecodable ones are dead-lettered),
//! 2. runs the processor on each event with `eventId` dedupe (`orderflow_api::handle`), staging
//!    state writes per input partition, then fires the due timers of every assigned partition,
//! 3. produces every output, dead-letter record and changelog record of a state change and waits
//!    until the broker acknowledged all, then produces each touched partition's commit marker
//!    (carrying the input offsets and remembered `eventId`s) and waits for those (under
//!    `exactly_once` the markers go with the rest: the transaction commits all or nothing),
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
use futures::FutureExt as _;
use orderflow_api::{fire_timers, handle, Context, Event, Handled, Outputs, ProcessError, Processor, StateTxn};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientContext;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use crate::changelog;
use crate::codec::Codec;
use crate::kafka::{client_config, dlq_header, Side};
use crate::metrics::Metrics;
use crate::stall::{self, StallWatch};
use crate::store::{Shard, Store, StoreError};
use crate::topology::{BrokerConfig, Guarantee, Loaded, RetryPolicy};
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
    /// Set while every assigned partition is restored and being processed, the broker is
    /// reachable and outputs are being acknowledged (`/readyz`).
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
    /// What `consumer` was created from (a new one replaces it after a refused join).
    consumer_config: ClientConfig,
    /// Consecutive joins the group refused with `UNRELEASED_INSTANCE_ID` (backoff factor).
    refused_joins: u32,
    producer: FutureProducer,
    /// The transactional producer under `exactly_once` (then `producer` is its inner producer).
    txn: Option<TxnProducer>,
    broker: BrokerConfig,
    guarantee: Guarantee,
    changelog_topic: String,
    /// Partitions restored and being processed.
    owned: BTreeSet<i32>,
    health: Arc<Health>,
    store: Store,
    shards: BTreeMap<i32, Shard>,
    codec: Arc<Codec>,
    metrics: Metrics,
    commit_interval: Duration,
    max_batch: usize,
    /// Transient failures: how often and how long to retry.
    retry: RetryPolicy,
    /// Most time one unit may spend in retry waits: half of `max.poll.interval.ms`. Past it a
    /// transient record failure is dead-lettered at once and due timers wait for a later unit.
    retry_budget: Duration,
    /// Admission rules for input records.
    admission: Admission,
    /// Consecutive units whose outputs the broker did not acknowledge (backoff exponent).
    produce_failures: u32,
    /// Per partition, changelog keys written by a unit that never committed; the next unit
    /// committed for the partition compensates them ([`changelog`] module docs).
    orphans: BTreeMap<i32, changelog::Orphans>,
    /// Since when the group revoked this instance's partitions without assigning any since.
    revoked_since: Option<Instant>,
    /// Where this instance keeps its sled store.
    pub state_path: PathBuf,
}

/// What an input record must satisfy before its event reaches the processor; a record that
/// does not is dead-lettered with the class named on each rule.
#[derive(Debug, Clone)]
struct Admission {
    /// `oversized`: value longer than this many bytes (`max_record_bytes`).
    max_record_bytes: usize,
    /// `future_timestamp`: `occurredAt` more than this many ms after the worker's clock.
    max_clock_skew_ms: i64,
    /// `wrong_schema`: input topic → Avro record names it carries (topology `schema`).
    schemas: BTreeMap<String, Vec<String>>,
    /// Input topic → its dead-letter topic.
    dead_letter: BTreeMap<String, String>,
    /// Longest value a dead-letter record carries; a longer one is left out (header
    /// `orderflow.dlq.value-dropped` = its length) so the record can still be produced.
    max_dead_letter_value: usize,
}

/// The retry policy of a unit with its shared wait budget.
struct Retry<'a> {
    policy: &'a RetryPolicy,
    budget: Duration,
    waited: &'a mut Duration,
}

/// Why an input record was not processed.
#[derive(Debug, Clone)]
struct Rejection {
    /// Dead-letter error class (see [`crate::codec::CodecError::class`] and [`Admission`]).
    class: &'static str,
    message: String,
    /// Attempts made, retries included.
    attempts: u32,
}

impl Rejection {
    fn new(class: &'static str, message: impl Into<String>) -> Rejection {
        Rejection { class, message: message.into(), attempts: 1 }
    }
}

/// Readiness of one worker instance as `/readyz` reports it: its partitions restored, the broker
/// reachable (librdkafka statistics and error callbacks) and the last unit's outputs not stuck
/// waiting for acknowledgements (`ACK_STALL`).
struct Health {
    restored: AtomicBool,
    broker_up: AtomicBool,
    stalled: AtomicBool,
    /// The flag the HTTP endpoint reads.
    published: Arc<AtomicBool>,
}

impl Health {
    fn new(published: Arc<AtomicBool>) -> Health {
        Health { restored: AtomicBool::new(false), broker_up: AtomicBool::new(true), stalled: AtomicBool::new(false), published }
    }
    fn set(&self, flag: &AtomicBool, value: bool) {
        flag.store(value, Ordering::Relaxed);
        let ready =
            self.restored.load(Ordering::Relaxed) && self.broker_up.load(Ordering::Relaxed) && !self.stalled.load(Ordering::Relaxed);
        self.published.store(ready, Ordering::Relaxed);
    }
}

/// Holds a restore consumer and closes it on a blocking thread when dropped: closing a
/// librdkafka client blocks (~0.1 s), which must not stall the async worker threads.
struct CloseOffThread(Option<Arc<changelog::RestoreConsumer>>);

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

/// How long an instance waits for an assignment after a revocation before it rejoins the group
/// (longer than a normal rebalance: tansu pauses 3 s per join round, the rebalance timeout is
/// `max.poll.interval.ms`, 30 s in `topology.toml`).
const REJOIN_AFTER: Duration = Duration::from_secs(45);

/// How long a restore keeps retrying a broker it cannot reach before the instance gives up.
const RESTORE_BROKER_WAIT: Duration = Duration::from_secs(600);

/// How long a unit may wait for the broker's acknowledgements before the instance reports
/// not-ready (it keeps waiting: librdkafka retries until `message.timeout.ms`).
const ACK_STALL: Duration = Duration::from_secs(5);

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
    health: Arc<Health>,
    /// Input partitions this instance paused (assigned and not yet restored, or rewinding):
    /// not watched for stalls.
    paused: Mutex<BTreeSet<i32>>,
    stalls: Mutex<StallWatch>,
}

fn partitions_of(tpl: &TopicPartitionList) -> BTreeSet<i32> {
    tpl.elements().iter().map(|e| e.partition()).collect()
}

impl ClientContext for WorkerContext {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        self.broker_error(&error, reason);
    }

    /// librdkafka statistics (every `statistics.interval.ms`): exports consumer lag per input
    /// partition.
    fn stats(&self, stats: rdkafka::Statistics) {
        // Reachable when librdkafka holds an open connection to at least one broker.
        let up = stats.brokers.values().any(|b| b.state == "UP");
        if up != self.health.broker_up.load(Ordering::Relaxed) {
            if up {
                info!(worker = %self.worker, "broker reachable again");
            } else {
                warn!(worker = %self.worker, "no broker connection; not ready");
            }
        }
        self.health.set(&self.health.broker_up, up);
        self.metrics.broker_connected.with_label_values(&[self.worker.as_str()]).set(i64::from(up));
        let paused = self.paused.lock().expect("paused set").clone();
        let mut samples = Vec::new();
        for (topic, t) in &stats.topics {
            for (partition, p) in &t.partitions {
                if let Some(lag) = partition_lag(p).filter(|_| *partition >= 0) {
                    self.metrics.lag.with_label_values(&[self.worker.as_str(), topic, &partition.to_string()]).set(lag);
                    // Assigned partitions only (librdkafka also reports the ones it merely knows).
                    if p.fetch_state != "none" {
                        samples.push(stall::Sample {
                            topic,
                            partition: *partition,
                            position: p.app_offset,
                            lag,
                            fetch_state: &p.fetch_state,
                            paused: paused.contains(partition),
                        });
                    }
                }
            }
        }
        let mut stalls = self.stalls.lock().expect("stall watch");
        for change in stalls.observe(Instant::now(), samples) {
            match change {
                stall::Change::Stalled { topic, partition, position, lag, fetch_state, for_ } => warn!(
                    worker = %self.worker, %topic, partition, position, lag, %fetch_state, stalled_s = for_.as_secs(),
                    "input partition stalled: records waiting, position not moving"
                ),
                stall::Change::Resumed { topic, partition, position } => {
                    info!(worker = %self.worker, %topic, partition, position, "input partition moving again")
                }
            }
        }
        self.metrics.stalled.with_label_values(&[self.worker.as_str()]).set(stalls.stalled() as i64);
    }
}

/// A consumer from `config` with a fresh [`WorkerContext`], subscribed to `inputs`.
///
/// Errors: librdkafka refusing the configuration or the subscription.
fn subscribed_consumer(
    config: &ClientConfig,
    worker: &str,
    metrics: &Metrics,
    health: &Arc<Health>,
    inputs: &[String],
) -> Result<StreamConsumer<WorkerContext>, KafkaError> {
    let context = WorkerContext {
        events: Mutex::new(Vec::new()),
        worker: worker.to_string(),
        metrics: metrics.clone(),
        health: health.clone(),
        paused: Mutex::new(BTreeSet::new()),
        stalls: Mutex::new(StallWatch::default()),
    };
    let consumer: StreamConsumer<WorkerContext> = config.create_with_context(context)?;
    let inputs: Vec<&str> = inputs.iter().map(String::as_str).collect();
    consumer.subscribe(&inputs)?;
    Ok(consumer)
}

/// Consumer lag of one partition from a statistics report, in records: the partition's end (the
/// last stable offset, `ls_offset`, which is what a `read_committed` consumer can reach; the high
/// watermark when there is none) minus the next offset handed to the worker (`app_offset`).
/// librdkafka's own `consumer_lag` counts from the offset *it* committed, which offsets
/// committed inside a transaction (`exactly_once`) never update: it would be -1 for a new group
/// and stale after a restart (seen on Kafka 4.1). Falls back to `consumer_lag` before the first
/// record is fetched; None when neither is known.
fn partition_lag(p: &rdkafka::statistics::Partition) -> Option<i64> {
    let end = if p.ls_offset >= 0 { p.ls_offset } else { p.hi_offset };
    if end >= 0 && p.app_offset >= 0 {
        Some((end - p.app_offset).max(0))
    } else {
        (p.consumer_lag >= 0).then_some(p.consumer_lag)
    }
}

impl WorkerContext {
    /// librdkafka error callback: `AllBrokersDown` marks the broker unreachable until a
    /// statistics report shows a connection again.
    fn broker_error(&self, error: &rdkafka::error::KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::AllBrokersDown) {
            if self.health.broker_up.load(Ordering::Relaxed) {
                warn!(worker = %self.worker, %reason, "all brokers down; not ready, retrying");
            }
            self.health.set(&self.health.broker_up, false);
            self.metrics.broker_connected.with_label_values(&[self.worker.as_str()]).set(0);
        } else {
            warn!(worker = %self.worker, error = %error, %reason, "librdkafka error");
        }
    }
}

impl ConsumerContext for WorkerContext {
    fn pre_rebalance(&self, _base: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let ps = partitions_of(tpl);
            self.paused.lock().expect("paused set").retain(|p| !ps.contains(p));
            self.events.lock().expect("rebalance queue").push(RebalanceEvent::Revoked(ps));
        }
    }

    fn post_rebalance(&self, base: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            if let Err(e) = base.pause(tpl) {
                error!(error = %e, "cannot pause newly assigned partitions");
            }
            self.paused.lock().expect("paused set").extend(partitions_of(tpl));
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
    rejection: Rejection,
}

/// Waits `d` on the current thread (a processor retry, whose staged state cannot cross an
/// `.await`); on a multi-threaded runtime the thread's other tasks move elsewhere meanwhile.
fn wait_blocking(d: Duration) {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(|| std::thread::sleep(d)),
        _ => std::thread::sleep(d),
    }
}

/// The longest value a dead-letter record may carry: the producer's `message.max.bytes`
/// (librdkafka default 1,000,000) less 64 KiB for the key and headers.
fn max_dead_letter_value(broker: &BrokerConfig) -> usize {
    let limit = broker
        .producer
        .get("message.max.bytes")
        .or_else(|| broker.properties.get("message.max.bytes"))
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(1_000_000);
    limit.saturating_sub(64 * 1024)
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
        crate::kafka::set_group_protocol(&mut consumer_config, t.defaults.group_protocol);
        if t.defaults.static_membership {
            // KIP-345: a restarted pod rejoins under its old identity, so a crash-restart does
            // not wait for the dead member's session to expire (and, on tansu 0.6.0, does not
            // hit its coordinator stalling when a member expires during a join).
            consumer_config.set("group.instance.id", format!("{}-{}", setup.name, setup.instance));
        }
        if consumer_config.get("statistics.interval.ms").is_none() {
            // Consumer lag and broker reachability (readiness) are read from these reports.
            consumer_config.set("statistics.interval.ms", "1000");
        }
        let health = Arc::new(Health::new(setup.ready.clone()));
        let consumer = subscribed_consumer(&consumer_config, &setup.name, &setup.metrics, &health, &spec.inputs)?;
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
            consumer_config,
            refused_joins: 0,
            producer,
            txn,
            broker: t.broker.clone(),
            guarantee,
            changelog_topic: changelog::topic(&setup.name),
            owned: BTreeSet::new(),
            health,
            store,
            shards: BTreeMap::new(),
            codec: setup.codec,
            metrics: setup.metrics,
            commit_interval: spec.commit_interval(&t.defaults),
            max_batch: spec.max_batch(&t.defaults),
            retry: spec.retry(&t.defaults),
            retry_budget: crate::topology::max_poll_interval(&t.broker) / 2,
            admission: Admission {
                max_record_bytes: t.defaults.max_record_bytes,
                max_clock_skew_ms: t.defaults.max_clock_skew.as_millis() as i64,
                schemas: spec
                    .inputs
                    .iter()
                    .filter_map(|i| Some((i.clone(), t.topics.get(i)?.schema.as_ref()?.names().iter().map(|n| n.to_string()).collect())))
                    .collect(),
                dead_letter: spec.inputs.iter().map(|i| (i.clone(), t.dead_letter_of(i))).collect(),
                max_dead_letter_value: max_dead_letter_value(&t.broker),
            },
            produce_failures: 0,
            orphans: BTreeMap::new(),
            revoked_since: None,
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
            let mut consumer_error = None;
            while batch.len() < self.max_batch && !self.consumer.context().has_events() {
                if !batch.is_empty() {
                    // The unit closes as soon as no further record is already fetched: at low
                    // load a record is not held back for the rest of the commit interval (every
                    // hop of the saga would add it to an order's latency); under load records
                    // pile up while a unit commits, so units grow by themselves.
                    match self.consumer.recv().now_or_never() {
                        Some(Ok(m)) => {
                            batch.push(m.detach());
                            continue;
                        }
                        Some(Err(e)) => {
                            consumer_error = Some(e);
                            break;
                        }
                        None => break,
                    }
                }
                tokio::select! {
                    msg = self.consumer.recv() => match msg {
                        Ok(m) => batch.push(m.detach()),
                        Err(e) => {
                            consumer_error = Some(e);
                            break;
                        }
                    },
                    _ = tokio::time::sleep_until(deadline) => break,
                    _ = shutdown.changed() => break,
                }
            }
            if let Some(e) = consumer_error {
                self.on_consumer_error(e).await?;
            }
            let abandoned = self.rebalance().await?;
            self.rejoin_if_stuck()?;
            batch.retain(|m| self.owned.contains(&m.partition()) && !abandoned.contains(&m.partition()));
            self.unit(batch).await?;
        }
        self.health.set(&self.health.restored, false);
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
        if assigned.is_empty() && rewound.is_empty() {
            return Ok(abandoned);
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
            // A broker that is away (restarting, unreachable) is waited for with the retry
            // policy's backoff, up to RESTORE_BROKER_WAIT; a corrupt changelog fails at once.
            let waiting_since = Instant::now();
            let mut attempt = 0;
            let report = loop {
                let (consumer, topic, inputs, s) = (restorer.consumer(), self.changelog_topic.clone(), self.inputs.clone(), shard.clone());
                let result =
                    tokio::task::spawn_blocking(move || changelog::restore_with(&consumer, &topic, &inputs, &s, Duration::from_secs(600)))
                        .await
                        .map_err(|e| WorkerError::Restore(format!("restore task panicked: {e}")))?;
                match result {
                    Ok(report) => break report,
                    Err(e @ changelog::RestoreError::Kafka { .. }) if waiting_since.elapsed() < RESTORE_BROKER_WAIT => {
                        attempt += 1;
                        let wait = self.retry.backoff(attempt);
                        warn!(worker = %self.name, partition = p, attempt, wait_ms = wait.as_millis() as u64, error = %e, "restore cannot reach the broker; retrying");
                        self.metrics.retries.with_label_values(&[self.name.as_str(), "restore"]).inc();
                        tokio::time::sleep(wait).await;
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
        self.consumer.context().paused.lock().expect("paused set").retain(|p| !self.owned.contains(p));
        self.health.set(&self.health.restored, true);
        info!(worker = %self.name, partitions = ?self.owned, "worker ready");
        Ok(abandoned)
    }

    /// Leaves and rejoins the group when a revocation was not followed by any assignment within
    /// `REJOIN_AFTER`: a new JoinGroup restarts a rebalance a coordinator left unfinished. (On
    /// tansu 0.6.0 the stall seen after an outage longer than the session timeout is a dangling
    /// group leader that no client action clears, README "tansu 0.6.0: what we found"; the warning and the
    /// `rejoin` retry count still say that it happens.)
    fn rejoin_if_stuck(&mut self) -> Result<(), WorkerError> {
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
    async fn on_consumer_error(&mut self, e: KafkaError) -> Result<(), WorkerError> {
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
                self.consumer = subscribed_consumer(&self.consumer_config, &self.name, &self.metrics, &self.health, &self.inputs)?;
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

    /// The dead-letter topic of records read from `input`.
    fn dead_letter_topic(&self, input: &str) -> String {
        self.admission.dead_letter.get(input).cloned().unwrap_or_else(|| crate::kafka::dlq_topic(input))
    }

    /// Processes one unit of work and commits it (see the module docs for the order of steps).
    async fn unit(&mut self, batch: Vec<OwnedMessage>) -> Result<(), WorkerError> {
        let started = Instant::now();
        let now = now_ms();
        let assigned = self.owned.clone();
        self.metrics.assigned.with_label_values(&[self.name.as_str()]).set(assigned.len() as i64);

        // 1. Decode and admit (transient decode failures retried with the retry policy).
        // Retry waits of this unit share one budget (half of max.poll.interval.ms), so a burst of
        // transient failures cannot hold the consumer until the group evicts it.
        let mut retry_waited = Duration::ZERO;
        let mut decoded = Vec::with_capacity(batch.len());
        for m in &batch {
            let retry = Retry { policy: &self.retry, budget: self.retry_budget, waited: &mut retry_waited };
            decoded.push(admit(&self.codec, &self.admission, retry, &self.metrics, &self.name, m, now).await);
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
                    Err(r) => {
                        warn!(worker = %self.name, topic, partition = m.partition(), offset = m.offset(), class = r.class, attempts = r.attempts, error = %r.message, "record sent to the dead-letter topic");
                        dead_letters.push(DeadLetter { source: m.clone(), rejection: r });
                        self.metrics.consumed.with_label_values(&[self.name.as_str(), topic, "dead_lettered"]).inc();
                        continue;
                    }
                };
                if let Some(ts) = m.timestamp().to_millis() {
                    self.metrics.delay.with_label_values(&[self.name.as_str()]).observe((now - ts).max(0) as f64 / 1000.0);
                }
                let ctx = Context { topic: topic.to_string(), partition: m.partition(), offset: m.offset(), now_ms: now };
                let txn = txns.get_mut(&m.partition()).expect("shard opened for every partition in the batch");
                // A transient failure is retried in place (the failed attempt's staged changes and
                // outputs are discarded by `handle`); the partition waits, so per-key order holds.
                let mut attempts = 1;
                let result = loop {
                    match handle(self.processor.as_mut(), &ctx, &event, txn, &mut out) {
                        Err(ProcessError::Transient(msg))
                            if attempts <= self.retry.attempts && retry_waited + self.retry.backoff(attempts) <= self.retry_budget =>
                        {
                            let wait = self.retry.backoff(attempts);
                            retry_waited += wait;
                            warn!(worker = %self.name, topic, partition = m.partition(), offset = m.offset(), attempt = attempts, wait_ms = wait.as_millis() as u64, error = %msg, "transient processing failure; retrying");
                            self.metrics.retries.with_label_values(&[self.name.as_str(), "processor"]).inc();
                            wait_blocking(wait);
                            attempts += 1;
                        }
                        other => break other,
                    }
                };
                let outcome = match result {
                    Ok(Handled::Processed) => "processed",
                    Ok(Handled::Duplicate) => "duplicate",
                    Err(ProcessError::Invalid(msg)) => {
                        warn!(worker = %self.name, topic, partition = m.partition(), offset = m.offset(), event_id = event.event_id(), error = %msg, "invalid event sent to the dead-letter topic");
                        dead_letters
                            .push(DeadLetter { source: m.clone(), rejection: Rejection { class: "invalid", message: msg, attempts } });
                        "dead_lettered"
                    }
                    Err(ProcessError::Transient(msg)) => {
                        warn!(worker = %self.name, topic, partition = m.partition(), offset = m.offset(), event_id = event.event_id(), attempts, error = %msg, "retries exhausted; event sent to the dead-letter topic");
                        dead_letters
                            .push(DeadLetter { source: m.clone(), rejection: Rejection { class: "transient", message: msg, attempts } });
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
                // A timer cannot be dead-lettered: after the retries the instance stops and the
                // timer, still durable, fires again after the restart.
                // Attempts count per failing timer: they restart when a call got further (fewer
                // due timers left) than the previous one.
                let mut attempts = 1;
                let mut last_due = txn.due_timers(now).len();
                fired += loop {
                    match fire_timers(self.processor.as_mut(), &ctx, txn, &mut out) {
                        Err(ProcessError::Transient(msg)) if attempts <= self.retry.attempts || txn.due_timers(now).len() < last_due => {
                            let due_now = txn.due_timers(now).len();
                            if due_now < last_due {
                                attempts = 1;
                                last_due = due_now;
                            }
                            let wait = self.retry.backoff(attempts);
                            if retry_waited + wait > self.retry_budget {
                                warn!(worker = %self.name, partition = p, error = %msg, "retry budget of this unit spent; the due timers left fire in a later unit");
                                break 0;
                            }
                            warn!(worker = %self.name, partition = p, attempt = attempts, error = %msg, "transient timer failure; retrying");
                            self.metrics.retries.with_label_values(&[self.name.as_str(), "processor"]).inc();
                            wait_blocking(wait);
                            retry_waited += wait;
                            attempts += 1;
                        }
                        other => {
                            break other.map_err(|error| WorkerError::Process {
                                topic: "<timer>".into(),
                                partition: *p,
                                offset: -1,
                                error,
                            })?
                        }
                    }
                };
            }
            let mut changes: BTreeMap<i32, orderflow_api::Changes> = txns.into_iter().map(|(p, t)| (p, t.into_changes())).collect();
            // Neutralise the changelog records of units that never committed (module docs of
            // `changelog`): this unit also writes their keys' committed values.
            for (p, orphans) in &self.orphans {
                if let (Some(c), Some(shard)) = (changes.get_mut(p), self.shards.get(p)) {
                    orphans.compensate(shard, c);
                }
            }
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
                "saga_timeout" => {
                    // Seed 001: a saga cancelled at its timeout is reported, not only counted.
                    warn!(worker = %self.name, timeout = %n.label, "saga timed out; order cancelled with SAGA_TIMEOUT");
                    self.metrics.business.with_label_values(&[self.name.as_str(), n.measure, &n.label]).inc();
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
            dead_letters.iter().map(|d| (self.dead_letter_topic(d.source.topic()), self.dlq_headers(d, now))).collect();
        let dlq_sends = dead_letters.iter().zip(&dlq_payloads).map(|(d, (topic, headers))| {
            let mut record = FutureRecord::<[u8], [u8]>::to(topic).headers(headers.clone());
            if let Some(k) = d.source.key() {
                record = record.key(k);
            }
            if let Some(p) = d.source.payload().filter(|p| p.len() <= self.admission.max_dead_letter_value) {
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
        // Outside a transaction the commit markers wait until everything else of the unit is
        // acknowledged: a marker commits its unit for a restore, which resumes after the unit's
        // inputs, so a marker taken before the outputs would lose them if the instance died in
        // between. Inside a transaction all of it commits or none, so the markers go along.
        let markers_last = self.txn.is_none();
        let changelog_sends = changelog_records.iter().map(|(p, recs)| {
            // One partition's records in order; the marker is the last one.
            let n = if markers_last { recs.len() - 1 } else { recs.len() };
            let sends: Vec<_> = recs[..n].iter().map(|r| send_changelog(&self.producer, changelog_topic, *p, r)).collect();
            async move { (*p, join_all(sends).await) }
        });
        let all_acks = async { futures::join!(join_all(sends), join_all(dlq_sends), join_all(changelog_sends)) };
        let (acks, dlq_acks, mut changelog_acks) = await_acks(&self.health, &self.name, all_acks).await;
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
        // Outside a transaction, a record the broker did not take (librdkafka gave up after
        // `message.timeout.ms`, e.g. a long broker outage) fails the whole unit: nothing of it is
        // written to sled or committed, and it is processed again after a backoff. What was
        // delivered is absorbed downstream by eventId, and its changelog records are compensated by
        // the next unit committed for their partition.
        let failed = acks
            .iter()
            .zip(encoded.iter().map(|(t, ..)| t.to_string()))
            .chain(dlq_acks.iter().zip(dlq_payloads.iter().map(|(t, _)| t.clone())))
            .chain(changelog_acks.iter().flat_map(|(_, a)| a.iter().map(|a| (a, self.changelog_topic.clone()))))
            .find_map(|(a, topic)| a.as_ref().err().map(|(error, _)| (topic, error.clone())));
        if let Some((topic, error)) = failed {
            return self.produce_failed(topic, error, &batch, &changes).await;
        }
        if markers_last {
            let marker_sends = changelog_records.iter().map(|(p, recs)| {
                let send = send_changelog(&self.producer, changelog_topic, *p, recs.last().expect("every partition's records end with a marker"));
                async move { (*p, send.await) }
            });
            let marker_acks = await_acks(&self.health, &self.name, join_all(marker_sends)).await;
            if let Some((_, Err((error, _)))) = marker_acks.iter().find(|(_, a)| a.is_err()) {
                let error = error.clone();
                return self.produce_failed(self.changelog_topic.clone(), error, &batch, &changes).await;
            }
            for ((p, acks), (q, marker)) in changelog_acks.iter_mut().zip(marker_acks) {
                debug_assert_eq!(*p, q);
                acks.push(marker);
            }
        }
        self.produce_failures = 0;
        let mut changelog_next: BTreeMap<i32, i64> = BTreeMap::new();
        for (p, partition_acks) in changelog_acks {
            for delivery in partition_acks.into_iter().flatten() {
                let next = changelog_next.entry(p).or_insert(0);
                *next = (*next).max(delivery.offset + 1);
            }
        }
        for (topic, ..) in &encoded {
            self.metrics.produced.with_label_values(&[self.name.as_str(), topic]).inc();
        }
        for d in &dead_letters {
            self.metrics.dlq.with_label_values(&[self.name.as_str(), d.rejection.class]).inc();
        }

        // 4. State, seen eventIds, timers, next offsets and changelog position: one sled batch
        //    per partition, flushed before the offsets are committed.
        for (p, next) in &changelog_next {
            self.shards[p].commit(&changes[p], offsets.get(p).unwrap_or(&empty_offsets), Some(*next))?;
            self.orphans.remove(p);
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
        self.rewind(batch)
    }

    /// Handles an output the broker did not acknowledge outside a transaction: a fatal producer
    /// error stops the instance; anything else waits a backoff (the retry policy's, growing with
    /// consecutive failures, never giving up: the broker is expected back) and rewinds the unit.
    async fn produce_failed(
        &mut self,
        topic: String,
        error: rdkafka::error::KafkaError,
        batch: &[OwnedMessage],
        changes: &BTreeMap<i32, orderflow_api::Changes>,
    ) -> Result<(), WorkerError> {
        use rdkafka::producer::Producer;
        self.metrics.commit.with_label_values(&[self.name.as_str(), "produce_failed"]).observe(0.0);
        if let Some(fatal) = self.producer.client().fatal_error() {
            error!(worker = %self.name, %topic, error = %error, fatal = ?fatal, "fatal producer error; stopping this instance");
            return Err(WorkerError::Delivery { topic, error });
        }
        self.produce_failures += 1;
        let wait = self.retry.backoff(self.produce_failures);
        warn!(worker = %self.name, %topic, error = %error, failures = self.produce_failures, wait_ms = wait.as_millis() as u64, "broker did not take the unit's records; rewinding and retrying");
        self.metrics.retries.with_label_values(&[self.name.as_str(), "produce"]).inc();
        self.health.set(&self.health.stalled, true);
        // Some of the unit's changelog records may have been written: compensate them.
        for (p, c) in changes {
            self.orphans.entry(*p).or_default().extend_from(c);
        }
        tokio::time::sleep(wait).await;
        self.rewind(batch)
    }

    /// Pauses every owned partition and queues a [`RebalanceEvent::Rewind`] to where `batch`
    /// started reading: the next loop turn re-reads the unit from the last committed state.
    fn rewind(&mut self, batch: &[OwnedMessage]) -> Result<(), WorkerError> {
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

    fn dlq_headers(&self, d: &DeadLetter, now: i64) -> OwnedHeaders {
        let mut h = OwnedHeaders::new();
        if let Some(orig) = d.source.headers() {
            for header in orig.iter() {
                h = h.insert(Header { key: header.key, value: header.value });
            }
        }
        let fields = [
            (dlq_header::SOURCE_TOPIC, d.source.topic().to_string()),
            (dlq_header::SOURCE_PARTITION, d.source.partition().to_string()),
            (dlq_header::SOURCE_OFFSET, d.source.offset().to_string()),
            (dlq_header::WORKER, self.name.clone()),
            (dlq_header::ERROR_CLASS, d.rejection.class.to_string()),
            (dlq_header::ERROR_MESSAGE, d.rejection.message.clone()),
            (dlq_header::ATTEMPTS, d.rejection.attempts.to_string()),
            (dlq_header::TIME, now.to_string()),
        ];
        for (k, v) in fields {
            h = h.insert(Header { key: k, value: Some(v.as_bytes()) });
        }
        if let Some(p) = d.source.payload().filter(|p| p.len() > self.admission.max_dead_letter_value) {
            h = h.insert(Header { key: dlq_header::VALUE_DROPPED, value: Some(p.len().to_string().as_bytes()) });
        }
        h
    }
}

/// Decodes `m` and checks it against the admission rules. Errors name the dead-letter class:
/// a missing value is `truncated`; longer than `max_record_bytes` is `oversized`; a decode
/// failure has its [`crate::codec::CodecError::class`] (a registry failure is retried with the
/// retry policy first); an event the topic does not carry is `wrong_schema`; an empty
/// `eventId` is `invalid` (idempotency needs it, domain rule 7); `occurredAt` beyond the
/// allowed clock skew is `future_timestamp`.
async fn admit(
    codec: &Codec,
    a: &Admission,
    retry: Retry<'_>,
    metrics: &Metrics,
    worker: &str,
    m: &OwnedMessage,
    now: i64,
) -> Result<Event, Rejection> {
    let Some(payload) = m.payload() else {
        return Err(Rejection::new("truncated", "record has no value (a tombstone on an event topic)"));
    };
    if payload.len() > a.max_record_bytes {
        return Err(Rejection::new(
            "oversized",
            format!("value of {} bytes exceeds max_record_bytes {}", payload.len(), a.max_record_bytes),
        ));
    }
    let mut attempts = 1;
    let event = loop {
        match codec.decode(payload).await {
            Ok(e) => break e,
            Err(e)
                if !e.is_permanent()
                    && attempts <= retry.policy.attempts
                    && *retry.waited + retry.policy.backoff(attempts) <= retry.budget =>
            {
                let wait = retry.policy.backoff(attempts);
                *retry.waited += wait;
                warn!(%worker, topic = m.topic(), partition = m.partition(), offset = m.offset(), attempt = attempts, wait_ms = wait.as_millis() as u64, error = %e, "transient decode failure; retrying");
                metrics.retries.with_label_values(&[worker, "registry"]).inc();
                tokio::time::sleep(wait).await;
                attempts += 1;
            }
            Err(e) => return Err(Rejection { class: e.class(), message: e.to_string(), attempts }),
        }
    };
    if let Some(allowed) = a.schemas.get(m.topic()) {
        if !allowed.iter().any(|n| n == event.schema_name()) {
            return Err(Rejection::new(
                "wrong_schema",
                format!("{} event on topic {}, which carries {}", event.schema_name(), m.topic(), allowed.join(", ")),
            ));
        }
    }
    if event.event_id().is_empty() {
        return Err(Rejection::new("invalid", format!("{} with an empty eventId", event.schema_name())));
    }
    if event.occurred_at() > now.saturating_add(a.max_clock_skew_ms) {
        return Err(Rejection::new(
            "future_timestamp",
            format!(
                "{} {}: occurredAt {} is {} s ahead of the worker clock (max_clock_skew {} s)",
                event.schema_name(),
                event.event_id(),
                event.occurred_at(),
                (event.occurred_at() - now) / 1000,
                a.max_clock_skew_ms / 1000
            ),
        ));
    }
    Ok(event)
}

/// Awaits the unit's acknowledgements; while they take longer than [`ACK_STALL`] the
/// instance reports not-ready (librdkafka keeps retrying until `message.timeout.ms`).
/// Sends changelog record `r` to partition `p` of `topic` (a tombstone when it has no value).
fn send_changelog<'a>(
    producer: &'a FutureProducer,
    topic: &'a str,
    p: i32,
    r: &'a changelog::Record,
) -> impl std::future::Future<Output = rdkafka::producer::future_producer::OwnedDeliveryResult> + 'a {
    let mut record = FutureRecord::<[u8], [u8]>::to(topic).partition(p).key(r.key.as_slice());
    if let Some(v) = &r.value {
        record = record.payload(v.as_slice());
    }
    producer.send(record, Timeout::Never)
}

async fn await_acks<F: std::future::Future>(health: &Health, worker: &str, acks: F) -> F::Output {
    tokio::pin!(acks);
    let started = Instant::now();
    let mut stalled = false;
    loop {
        tokio::select! {
            out = &mut acks => {
                if stalled {
                    info!(%worker, waited_s = started.elapsed().as_secs_f64(), "broker acknowledged the unit; ready");
                }
                health.set(&health.stalled, false);
                return out;
            }
            _ = tokio::time::sleep(ACK_STALL), if !stalled => {
                stalled = true;
                warn!(%worker, "no acknowledgement from the broker for {} s; not ready, still waiting", ACK_STALL.as_secs());
                health.set(&health.stalled, true);
            }
        }
    }
}

/// Logs and returns a worker's result (for tasks spawned per worker).
pub fn log_exit(name: &str, result: &Result<(), WorkerError>) {
    match result {
        Ok(()) => info!(worker = name, "worker exited cleanly"),
        Err(e) => error!(worker = name, error = %e, "worker failed"),
    }
}
