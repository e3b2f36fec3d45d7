//! The consume → process → produce loop of one worker instance.
//!
//! A *unit of work* gathers the input records already fetched, waiting for the first one at most
//! one `commit_interval` and ending at `max_batch` records, [`MAX_UNIT_INPUT_BYTES`] of input, or
//! when no further record is at hand
//! (so at low load a record is processed as soon as it arrives, and under load units grow while
//! the previous one commits), then:
//! 1. decodes each record (undecodable ones are dead-lettered),
//! 2. runs the broker-free [`crate::step`] on them: the processor on each event with `eventId`
//!    dedupe, staging state writes per input partition, then the due timers of every assigned
//!    partition,
//! 3. commits with the guarantee's protocol ([`crate::commit`]): produces every output, dead-letter record and changelog record of a state change and waits
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

//!
//! # Layout
//!
//! - `mod.rs`: [`Worker`], [`WorkerSetup`], [`WorkerError`]; creating the clients; the loop
//!   (gather → rebalance → unit).
//! - `context`: readiness, the consumer context (rebalance queue, lag, broker reachability,
//!   stall watch).
//! - `rebalance`: restoring assigned partitions, dropping revoked ones, rewinding, rejoining.
//! - `unit`: one unit of work: admit, step, report, encode, commit, failure handling.
//! - `kafka_io`: the commit protocols' broker and store interfaces over rdkafka and sled; dead
//!   letter records.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt as _;
use orderflow_api::{ProcessError, Processor};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::producer::FutureProducer;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::changelog;
use crate::clock::{Clock, SystemClock};
use crate::codec::Codec;
use crate::kafka::{client_config, Side};
use crate::metrics::Metrics;
use crate::routing::{Misroute, Routes};
use crate::step::Rules;
use crate::store::{Shard, Store, StoreError};
use crate::topology::{BrokerConfig, Guarantee, Loaded, RetryPolicy, WorkerSpec};
use crate::txn::TxnProducer;

mod context;
mod kafka_io;
mod rebalance;
mod sizes;
mod unit;
mod watched;

pub use context::WorkerContext;
use context::{subscribed_consumer, Health};

/// Errors that stop a worker instance. All are fatal: the process exits non-zero so the pod
/// restarts and replays from the last committed unit.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("worker {0} is not in the topology")]
    UnknownWorker(String),
    /// A source kind's worker (the outbox relay, which does not run this loop) stopped with this
    /// error.
    #[error("{0}")]
    Source(String),
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
    /// `FAILPOINTS` names an action the `fail` crate cannot parse (test builds only).
    #[error("FAILPOINTS: {0}")]
    Failpoints(String),
    /// A restore left off because the instance was told to shut down ([`Worker::run`] turns it
    /// into a clean stop: nothing of the partition was processed yet).
    #[error("shutting down")]
    ShuttingDown,
    /// A record of a unit is larger than its topic accepts ([`crate::limits`]): it would be
    /// refused on every retry, so the instance stops before producing the unit.
    #[error(
        "{error}; the record (key {key}) comes from {input}: it would be refused on every retry, so this instance stops \
         (README \"Record size limits\"; `orderflow skip` moves the worker past that input)"
    )]
    Oversized { error: crate::limits::Oversized, key: String, input: String },
    /// The producer or the broker refused a record of `topic` for its size
    /// ([`crate::limits::is_size_refusal`]): no retry can get past it.
    #[error(
        "a record for {topic} was refused as too large: {error}; no retry can get past it, so this instance stops \
         (README \"Record size limits\")"
    )]
    RefusedForSize { topic: String, error: rdkafka::error::KafkaError },
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
    /// The kind's output ports the topology wires.
    wired: Vec<String>,
    /// Wired port → topic.
    outputs: BTreeMap<String, String>,
    inputs: Vec<String>,
    consumer: StreamConsumer<WorkerContext>,
    /// What `consumer` was created from (a new one replaces it after a refused join).
    consumer_config: ClientConfig,
    /// Consecutive joins the group refused with `UNRELEASED_INSTANCE_ID` (backoff factor).
    refused_joins: u32,
    producer: FutureProducer,
    /// The transactional producer under `exactly_once` (then `producer` is its first inner
    /// producer; units send through [`TxnProducer::producer`], which replaces a stuck one).
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
    rules: Rules,
    /// The key field and broker partition count of each external input (`routing`).
    routes: Routes,
    /// (topic, reason) of the misrouted records already logged (one warning each).
    misroutes_logged: BTreeSet<(String, Misroute)>,
    /// `state_retention` in ms (`Context::retention_ms`, the retention sweep).
    retention_ms: i64,
    /// `[defaults] record_headers`: outputs carry `headers::output_headers`.
    record_headers: bool,
    /// Input topic → its dead-letter topic.
    dead_letter: BTreeMap<String, String>,
    /// The size limits of the topics this instance writes ([`crate::limits`]); a dead-letter
    /// record leaves out a value past its topic's (header `orderflow.dlq.value-dropped`).
    limits: crate::limits::Limits,
    /// The wall clock (`now_ms` of processors, timer deadlines).
    clock: Arc<dyn Clock>,
    /// Consecutive units whose outputs the broker did not acknowledge (backoff exponent).
    produce_failures: u32,
    /// Per partition, changelog keys written by a unit that never committed; the next unit
    /// committed for the partition compensates them ([`changelog`] module docs).
    orphans: BTreeMap<i32, changelog::Orphans>,
    /// Since when the group revoked this instance's partitions without assigning any since.
    revoked_since: Option<Instant>,
    /// The shutdown signal [`Worker::run`] was given (None before it runs): restores check it.
    shutdown: Option<watch::Receiver<bool>>,
    /// The stalled-partition watch (`stall`): fed by the consumer's statistics, the loop and the
    /// processor ([`watched::Watched`]); evaluated by the task [`Worker::run`] spawns.
    stalls: Arc<std::sync::Mutex<crate::stall::StallWatch>>,
    /// Where this instance keeps its sled store.
    pub state_path: PathBuf,
}

/// The [`Routes`] of the worker's external inputs, with each one's partition count as the broker
/// has it. An input whose count differs from the topology's is logged and flagged in
/// `orderflow_partition_count_mismatch` (issue 19: its producers partition by the broker's count;
/// the deduplicator re-keys what it reads, so the records are still handled). A broker that does
/// not answer within 10 s leaves the declared counts (logged).
async fn external_routes(setup: &WorkerSetup, spec: &WorkerSpec) -> Routes {
    let t = &setup.topology.topology;
    let mut routes = Routes::of(&setup.topology, &spec.inputs);
    let inputs = spec.inputs.clone();
    let config = client_config(&t.broker, Side::Consumer);
    let counts = tokio::task::spawn_blocking(move || -> Result<BTreeMap<String, i32>, KafkaError> {
        let consumer: rdkafka::consumer::BaseConsumer = config.create()?;
        let meta = consumer.fetch_metadata(None, Duration::from_secs(10))?;
        Ok(meta
            .topics()
            .iter()
            .filter(|m| inputs.iter().any(|i| i == m.name()) && m.error().is_none() && !m.partitions().is_empty())
            .map(|m| (m.name().to_string(), m.partitions().len() as i32))
            .collect())
    })
    .await;
    let counts = match counts {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            warn!(worker = %setup.name, error = %e, "cannot read the input topics' partition counts; checking routes by the declared ones");
            return routes;
        }
        Err(e) => {
            warn!(worker = %setup.name, error = %e, "partition count lookup panicked; checking routes by the declared ones");
            return routes;
        }
    };
    for input in &spec.inputs {
        let (Some(actual), Some(declared)) = (counts.get(input), t.topics.get(input).map(|s| s.partitions)) else { continue };
        let mismatch = *actual != declared;
        setup.metrics.partition_mismatch.with_label_values(&[&setup.name, input]).set(i64::from(mismatch));
        if mismatch {
            warn!(
                worker = %setup.name,
                topic = %input,
                broker_partitions = actual,
                declared_partitions = declared,
                "input topic has another partition count on the broker than topology.toml declares"
            );
        }
        routes.set_partitions(input, *actual);
    }
    routes
}

/// Milliseconds since the Unix epoch ([`SystemClock`]).
pub fn now_ms() -> i64 {
    SystemClock.now_ms()
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
            require_transactions(&setup.name, &t.broker.bootstrap).await?;
        }
        watched::configure_failpoints().map_err(WorkerError::Failpoints)?;
        let consumer_config = consumer_config(&setup, spec);
        let health = Arc::new(Health::new(setup.ready.clone()));
        let stalls = Arc::new(std::sync::Mutex::new(crate::stall::StallWatch::new(spec.stall_after(&t.defaults))));
        let consumer = subscribed_consumer(&consumer_config, &setup.name, &setup.metrics, &health, &spec.inputs, stalls.clone())?;
        // The start-up steps that wait on the broker or the disk run side by side: the producer's
        // init_transactions (which waits for the coordinator to abort a killed predecessor's open
        // transaction), the sled open, the partition counts and the topics' size limits. One
        // after another they took ~0.5 s of a restart (`orderflow bench recovery`, issue 18).
        let state_path = t.defaults.state_dir.join(&setup.name).join(&setup.instance);
        let store_path = state_path.clone();
        let opening = tokio::task::spawn_blocking(move || Store::open_or_reset(&store_path));
        let written = sizes::written_topics(&setup.name, spec, t);
        let (made, routes, limits) = tokio::join!(
            producer(&setup, spec, guarantee),
            external_routes(&setup, spec),
            sizes::topic_limits(&setup.name, &t.broker, &written)
        );
        let (producer, txn) = made?;
        let (store, reset) = opening.await.map_err(|e| WorkerError::Restore(format!("opening the state store panicked: {e}")))??;
        if reset {
            warn!(worker = %setup.name, state = %state_path.display(), "state store was reset; partitions will be rebuilt from the changelog");
        }
        setup.metrics.guarantee.with_label_values(&[&setup.name, guarantee.as_str()]).set(1);
        // Exported as 0 from the start, so `rate()` sees the first ids forgotten a retention later.
        setup.metrics.forgotten.with_label_values(&[&setup.name]);
        for topic in &spec.inputs {
            setup.metrics.legacy_fingerprint.with_label_values(&[&setup.name, topic]);
        }
        info!(worker = %setup.name, instance = %setup.instance, guarantee = guarantee.as_str(), state = %state_path.display(), "worker started");
        Ok(Worker {
            name: setup.name.clone(),
            processor: Box::new(watched::Watched { inner: setup.processor, watch: stalls.clone() }),
            wired: setup.ports.iter().filter(|p| spec.outputs.contains_key(**p)).map(|s| s.to_string()).collect(),
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
            rules: Rules::of(&setup.topology, &spec.inputs),
            routes,
            misroutes_logged: BTreeSet::new(),
            retention_ms: spec.retention_ms(&t.defaults),
            record_headers: t.defaults.record_headers,
            dead_letter: spec.inputs.iter().map(|i| (i.clone(), t.dead_letter_of(i))).collect(),
            limits,
            clock: Arc::new(SystemClock),
            produce_failures: 0,
            orphans: BTreeMap::new(),
            revoked_since: None,
            shutdown: None,
            stalls,
            state_path,
        })
    }

    /// Replaces the wall clock (tests: [`crate::clock::PausedClock`]).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Worker {
        self.clock = clock;
        self
    }

    /// Runs units of work until `shutdown` turns true, then finishes the unit in flight and
    /// returns; partitions assigned after the signal are not restored (the instance is leaving
    /// the group), a restore in progress is left off. Dropping the consumer leaves the group;
    /// each step of the stop is logged with its duration.
    ///
    /// Errors: any [`WorkerError`]; the unit in flight is then not committed and will be replayed.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) -> Result<(), WorkerError> {
        self.shutdown = Some(shutdown.clone());
        let watch = context::spawn_stall_watch(self.name.clone(), self.metrics.clone(), self.stalls.clone());
        let result = self.work(&mut shutdown).await;
        watch.abort();
        result
    }

    /// The loop of [`Worker::run`], then the stop.
    async fn work(mut self, shutdown: &mut watch::Receiver<bool>) -> Result<(), WorkerError> {
        loop {
            if *shutdown.borrow() {
                break;
            }
            let (mut batch, consumer_error) = self.gather(shutdown).await;
            if let Some(e) = consumer_error {
                self.stalls.lock().expect("stall watch").consumer_error(Instant::now(), e.to_string());
                self.on_consumer_error(e).await?;
            }
            let abandoned = match self.rebalance().await {
                Ok(abandoned) => abandoned,
                Err(WorkerError::ShuttingDown) => break,
                Err(e) => return Err(e),
            };
            self.rejoin_if_stuck()?;
            batch.retain(|m| self.owned.contains(&m.partition()) && !abandoned.contains(&m.partition()));
            self.unit(batch).await?;
        }
        self.health.set(&self.health.restored, false);
        info!(worker = %self.name, "units finished; leaving the group");
        let started = Instant::now();
        let Worker { consumer, producer, txn, store, shards, name, .. } = self;
        // Closing the clients blocks (leave-group request, producer flush): off the async threads.
        let closed = tokio::task::spawn_blocking(move || {
            drop(consumer);
            drop(txn);
            drop(producer);
            drop(shards);
            drop(store);
        })
        .await;
        if let Err(e) = closed {
            warn!(worker = %name, error = %e, "closing the clients panicked");
        }
        info!(worker = %name, seconds = started.elapsed().as_secs_f64(), "worker stopped");
        Ok(())
    }

    /// Whether the instance was told to shut down.
    pub(super) fn stopping(&self) -> bool {
        signalled(&self.shutdown)
    }

    /// Gathers the records of one unit: waits for the first at most one commit interval, then
    /// takes the records already fetched, up to `max_batch` records or [`MAX_UNIT_INPUT_BYTES`]
    /// of keys and values; stops early for a rebalance or a shutdown. Returns the records and a
    /// consumer error that ended the gathering, if any.
    async fn gather(&mut self, shutdown: &mut watch::Receiver<bool>) -> (Vec<OwnedMessage>, Option<KafkaError>) {
        let deadline = tokio::time::Instant::now() + self.commit_interval;
        let mut batch: Vec<OwnedMessage> = Vec::new();
        let mut consumer_error = None;
        // Input bytes gathered (keys and values).
        let mut gathered = 0usize;
        while batch.len() < self.max_batch && gathered < MAX_UNIT_INPUT_BYTES && !self.consumer.context().has_events() {
            if !batch.is_empty() {
                // The unit closes as soon as no further record is already fetched: at low
                // load a record is not held back for the rest of the commit interval (every
                // hop of the saga would add it to an order's latency); under load records
                // pile up while a unit commits, so units grow by themselves.
                match self.consumer.recv().now_or_never() {
                    Some(Ok(m)) => {
                        gathered += m.payload_len() + m.key_len();
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
                    Ok(m) => {
                        gathered += m.payload_len() + m.key_len();
                        batch.push(m.detach());
                    }
                    Err(e) => {
                        consumer_error = Some(e);
                        break;
                    }
                },
                _ = tokio::time::sleep_until(deadline) => break,
                _ = shutdown.changed() => break,
            }
        }
        (batch, consumer_error)
    }
}

/// Most bytes of input (keys and values) one unit gathers, besides `max_batch` records: what a
/// unit stages grows with its input's content, not its record count (a restock of 200 products is
/// one record and 400 state changes), and a unit's staged state, changelog records and outputs are
/// held in memory until it commits, and again by a restore reading it back. Issue 18: at 10^6
/// stock keys loaded by restocks of 200 products, units of 2,000 such records peaked the stock
/// reserver at 2.3 GiB RSS. 512 KiB is more than `max_batch` orders (~150 bytes each), so
/// order traffic is not cut by it. A single larger record still makes a unit of its own.
pub const MAX_UNIT_INPUT_BYTES: usize = 512 * 1024;

/// Whether `shutdown` (a [`Worker::run`] signal, `None` before it runs) turned true; also read
/// from the blocking restore threads.
pub(super) fn signalled(shutdown: &Option<watch::Receiver<bool>>) -> bool {
    shutdown.as_ref().is_some_and(|rx| *rx.borrow())
}

/// Logs and returns a worker's result (for tasks spawned per worker).
pub fn log_exit(name: &str, result: &Result<(), WorkerError>) {
    match result {
        Ok(()) => info!(worker = name, "worker exited cleanly"),
        Err(e) => error!(worker = name, error = %e, "worker failed"),
    }
}

/// Refuses `exactly_once` on a broker without transactions (never silently downgraded).
///
/// Errors: [`WorkerError::Guarantee`] when the broker cannot be asked or lacks the APIs.
async fn require_transactions(worker: &str, bootstrap: &str) -> Result<(), WorkerError> {
    let refuse = |reason: String| WorkerError::Guarantee { worker: worker.to_string(), guarantee: Guarantee::ExactlyOnce.as_str(), reason };
    let support = crate::probe::broker_supports_transactions(bootstrap, Duration::from_secs(10))
        .await
        .map_err(|e| refuse(format!("cannot ask the broker which APIs it has: {e}")))?;
    if !support.supported {
        return Err(refuse(format!(
            "the broker at {bootstrap} does not support transactions (missing {}); use effectively_once (README \"Processing guarantees\")",
            support.missing.join(", ")
        )));
    }
    Ok(())
}

/// `fetch.wait.max.ms` of the workers' consumers unless the topology sets it (see
/// [`consumer_config`]).
const WORKER_FETCH_WAIT_MS: &str = "100";

/// The consumer configuration of one instance: the worker's group, its client id, the group
/// protocol, static membership (KIP-345) when the topology asks for it, statistics every second.
fn consumer_config(setup: &WorkerSetup, spec: &WorkerSpec) -> ClientConfig {
    let t = &setup.topology.topology;
    let mut config = client_config(&t.broker, Side::Consumer);
    config.set("group.id", spec.group_id(&setup.name)).set("client.id", format!("{}-{}", setup.name, setup.instance));
    crate::kafka::set_group_protocol(&mut config, t.defaults.group_protocol);
    if t.defaults.static_membership {
        // KIP-345: a restarted pod rejoins under its old identity, so a crash-restart does not
        // wait for the dead member's session to expire (and, on tansu 0.6.0, does not hit its
        // coordinator stalling when a member expires during a join).
        config.set("group.instance.id", format!("{}-{}", setup.name, setup.instance));
    }
    if config.get("statistics.interval.ms").is_none() {
        // Consumer lag and broker reachability (readiness) are read from these reports.
        config.set("statistics.interval.ms", "1000");
    }
    if config.get("fetch.wait.max.ms").is_none() {
        // librdkafka keeps one fetch in flight per broker; a partition resumed while it waits
        // (after its restore) is only asked for in the next one. With the default 500 ms long
        // poll a restarted stock reserver answered its first record 0.5–1.0 s after ready
        // (`orderflow bench recovery`, issue 18). An idle consumer asks 10 times a second.
        config.set("fetch.wait.max.ms", WORKER_FETCH_WAIT_MS);
    }
    config
}

/// The instance's producer; under `exactly_once` a transactional one with one transactional id
/// per worker instance, so a restarted instance fences its zombie.
///
/// Errors: client creation, `init_transactions`.
async fn producer(
    setup: &WorkerSetup,
    spec: &WorkerSpec,
    guarantee: Guarantee,
) -> Result<(FutureProducer, Option<TxnProducer>), WorkerError> {
    let t = &setup.topology.topology;
    let mut config = client_config(&t.broker, Side::Producer);
    config.set("client.id", format!("{}-{}", setup.name, setup.instance));
    if guarantee != Guarantee::ExactlyOnce {
        return Ok((config.create()?, None));
    }
    config.set("transactional.id", format!("{}-{}", spec.group_id(&setup.name), setup.instance));
    // Each blocking call gets 10 s (a timed-out one is resumed within the 60 s budget), so a call
    // librdkafka leaves stuck is found after 10 s + `txn::STUCK_GRACE`, well inside
    // `max.poll.interval.ms`.
    let txn =
        TxnProducer::init(config, Duration::from_secs(60)).await.map_err(WorkerError::Txn)?.with_attempt_timeout(Duration::from_secs(10));
    Ok((txn.producer(), Some(txn)))
}
