//! A read replica of a worker's state, kept by another process from the worker's changelog
//! (issue 17: the inventory API answers stock queries from the stock reserver's state without a
//! second database, as a Kafka Streams standby replica or interactive query would).
//!
//! [`Replica::start`] tails every partition of `orderflow-<worker>-changelog` from the beginning
//! (`read_committed`), on a thread of its own. Each unit's records are held per partition until
//! the unit's commit marker arrives and are then applied together, exactly as a restore applies
//! them (module [`changelog`](crate::changelog)): a unit that never committed (orphans) is
//! overwritten by the compensation records of the next unit before that unit's marker, so the
//! replica only ever shows committed units. Only state keys under the chosen prefixes are kept
//! (timers are not), so a replica of the stock reserver holds its stock and reservation records,
//! not its remembered `eventId`s.
//!
//! **Read-your-writes.** A marker carries the `eventId`s its unit processed. The replica keeps
//! the most recent [`RECENT_EVENT_IDS`] of them, so a caller that produced an input with a known
//! `eventId` can [`Replica::wait_for_event`] until the unit that processed it is visible, on both
//! brokers (no reliance on transactions or offsets).
//!
//! **Freshness.** A query sees the state as of the last marker the replica applied: behind the
//! worker by its commit interval plus the replica's fetch latency (`fetch.wait.max.ms`, set to
//! [`FETCH_WAIT_MS`]); [`Replica::lag_records`] and [`Replica::caught_up`] say where it stands,
//! and the optional staleness histogram given to [`Replica::start`] observes, per applied unit, the
//! seconds from the unit's first changelog record (written when the worker processed the unit's
//! first input; the record's CreateTime, the worker's clock) to the replica applying it: how stale
//! a query answered just before that unit was.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::watch;

use crate::changelog::{self, Entry};
use crate::kafka::{client_config, Side};
use crate::topology::BrokerConfig;

/// How many processed `eventId`s the replica remembers for [`Replica::wait_for_event`].
pub const RECENT_EVENT_IDS: usize = 200_000;
/// `fetch.wait.max.ms` of the replica's consumer: how long the broker may hold an empty fetch.
pub const FETCH_WAIT_MS: &str = "20";

/// Errors of a replica.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    /// The consumer could not be created or assigned.
    #[error("changelog replica of {topic}: {source}")]
    Kafka {
        topic: String,
        #[source]
        source: rdkafka::error::KafkaError,
    },
    /// [`Replica::wait_for_event`] gave up.
    #[error("event {event_id} not visible in the replica within {waited:?}")]
    Timeout { event_id: String, waited: Duration },
}

/// A secondary index of a replica: for a kept state key and its value, the index key to find it
/// by (e.g. a reservation's `reservationId` for its `res/{orderId}` record).
pub type Indexer = fn(&[u8], &[u8]) -> Option<String>;

#[derive(Default)]
struct Inner {
    data: BTreeMap<Vec<u8>, Vec<u8>>,
    /// [`Indexer`] key → state key, and back.
    index: std::collections::HashMap<String, Vec<u8>>,
    indexed: std::collections::HashMap<Vec<u8>, String>,
    recent: HashSet<String>,
    order: VecDeque<String>,
    /// Per changelog partition: next offset to read, and the log end seen at the last check.
    position: BTreeMap<i32, i64>,
    end: BTreeMap<i32, i64>,
    /// Records that failed to decode (a changelog this build does not understand).
    undecodable: u64,
}

impl Inner {
    fn apply(&mut self, indexer: Option<Indexer>, key: Vec<u8>, value: Option<Vec<u8>>) {
        if let Some(old) = self.indexed.remove(&key) {
            self.index.remove(&old);
        }
        match value {
            Some(v) => {
                if let Some(ix) = indexer.and_then(|f| f(&key, &v)) {
                    self.index.insert(ix.clone(), key.clone());
                    self.indexed.insert(key.clone(), ix);
                }
                self.data.insert(key, v);
            }
            None => {
                self.data.remove(&key);
            }
        }
    }

    fn remember(&mut self, seen: &changelog::Seen) {
        for (key, _) in seen {
            let id = String::from_utf8_lossy(&key[orderflow_api::SEEN_PREFIX.len()..]).into_owned();
            if self.recent.insert(id.clone()) {
                self.order.push_back(id);
            }
        }
        while self.order.len() > RECENT_EVENT_IDS {
            if let Some(old) = self.order.pop_front() {
                self.recent.remove(&old);
            }
        }
    }
}

/// A read replica of one worker's state (module docs). Cheap to clone; the tailing thread stops
/// when the last clone is dropped.
#[derive(Clone)]
pub struct Replica {
    inner: Arc<RwLock<Inner>>,
    applied: watch::Receiver<u64>,
    caught_up: Arc<AtomicBool>,
    _stop: Arc<StopOnDrop>,
}

struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

impl Replica {
    /// Starts tailing `topic` (a worker's changelog, `partitions` partitions, the worker's
    /// `inputs` in topology order for decoding), keeping state keys that start with one of
    /// `prefixes`.
    ///
    /// Errors: [`ReplicaError::Kafka`] when the consumer cannot be created or assigned.
    /// `indexer`, if any, builds a secondary index ([`Replica::get_indexed`]); `staleness`, if
    /// any, observes each applied unit's staleness in seconds (module docs, "Freshness").
    pub fn start(
        broker: &BrokerConfig,
        topic: &str,
        partitions: i32,
        inputs: Vec<String>,
        prefixes: Vec<Vec<u8>>,
        indexer: Option<Indexer>,
        staleness: Option<prometheus::Histogram>,
    ) -> Result<Replica, ReplicaError> {
        let kafka = |source| ReplicaError::Kafka { topic: topic.to_string(), source };
        let mut cfg = client_config(broker, Side::Consumer);
        cfg.set("group.id", format!("{topic}-replica"))
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .set("fetch.wait.max.ms", FETCH_WAIT_MS);
        let consumer: BaseConsumer = cfg.create().map_err(kafka)?;
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(topic, p, Offset::Beginning).map_err(kafka)?;
        }
        consumer.assign(&tpl).map_err(kafka)?;
        let inner = Arc::new(RwLock::new(Inner::default()));
        let (tx, rx) = watch::channel(0u64);
        let stop = Arc::new(AtomicBool::new(false));
        let caught_up = Arc::new(AtomicBool::new(false));
        let thread = Tail {
            consumer,
            topic: topic.to_string(),
            partitions,
            inputs,
            prefixes,
            indexer,
            staleness,
            inner: inner.clone(),
            applied: tx,
            stop: stop.clone(),
            caught_up: caught_up.clone(),
        };
        std::thread::Builder::new()
            .name(format!("replica-{topic}"))
            .spawn(move || thread.run())
            .map_err(|e| kafka(rdkafka::error::KafkaError::ClientCreation(e.to_string())))?;
        Ok(Replica { inner, applied: rx, caught_up, _stop: Arc::new(StopOnDrop(stop)) })
    }

    /// The value of state key `key` as of the last applied unit.
    pub fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.inner.read().expect("replica lock").data.get(key).cloned()
    }

    /// The state key and value the secondary index maps `index_key` to.
    pub fn get_indexed(&self, index_key: &str) -> Option<(Vec<u8>, Vec<u8>)> {
        let inner = self.inner.read().expect("replica lock");
        let key = inner.index.get(index_key)?;
        inner.data.get(key).map(|v| (key.clone(), v.clone()))
    }

    /// Waits until `check` returns `Some`, re-checking after every unit the replica applies.
    ///
    /// Errors: `None` after `timeout`.
    pub async fn wait_until<T>(&self, timeout: Duration, check: impl Fn(&Replica) -> Option<T>) -> Option<T> {
        let mut applied = self.applied.clone();
        let wait = async {
            loop {
                if let Some(t) = check(self) {
                    return t;
                }
                if applied.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.ok()
    }

    /// Every kept key under `prefix` with its value, in key order.
    pub fn scan_prefix(&self, prefix: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
        let inner = self.inner.read().expect("replica lock");
        inner.data.range(prefix.to_vec()..).take_while(|(k, _)| k.starts_with(prefix)).map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// Whether the replica has read every partition up to the log end it saw when it started (or
    /// since); until then queries may answer from old state.
    pub fn caught_up(&self) -> bool {
        self.caught_up.load(Ordering::Relaxed)
    }

    /// Records between the replica's position and the log end last seen, summed over partitions.
    pub fn lag_records(&self) -> i64 {
        let inner = self.inner.read().expect("replica lock");
        inner.end.iter().map(|(p, end)| (end - inner.position.get(p).copied().unwrap_or(0)).max(0)).sum()
    }

    /// Records of the changelog that did not decode (skipped).
    pub fn undecodable(&self) -> u64 {
        self.inner.read().expect("replica lock").undecodable
    }

    /// Whether a unit that processed `event_id` has been applied (among the last
    /// [`RECENT_EVENT_IDS`]).
    pub fn has_event(&self, event_id: &str) -> bool {
        self.inner.read().expect("replica lock").recent.contains(event_id)
    }

    /// Waits until [`Replica::has_event`] holds for `event_id`.
    ///
    /// Errors: [`ReplicaError::Timeout`] after `timeout`.
    pub async fn wait_for_event(&self, event_id: &str, timeout: Duration) -> Result<(), ReplicaError> {
        self.wait_until(timeout, |r| r.has_event(event_id).then_some(()))
            .await
            .ok_or_else(|| ReplicaError::Timeout { event_id: event_id.to_string(), waited: timeout })
    }
}

/// Seconds from `written_ms` (ms since the epoch) to now; 0 when the writer's clock is ahead.
fn staleness_seconds(written_ms: i64) -> f64 {
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0);
    (now_ms - written_ms).max(0) as f64 / 1000.0
}

/// The tailing thread's side.
struct Tail {
    consumer: BaseConsumer,
    topic: String,
    partitions: i32,
    inputs: Vec<String>,
    prefixes: Vec<Vec<u8>>,
    indexer: Option<Indexer>,
    staleness: Option<prometheus::Histogram>,
    inner: Arc<RwLock<Inner>>,
    applied: watch::Sender<u64>,
    stop: Arc<AtomicBool>,
    caught_up: Arc<AtomicBool>,
}

/// A unit's records waiting for its marker: state key → value (`None`: deleted), and the
/// timestamp (ms since the epoch) of the unit's first changelog record.
#[derive(Default)]
struct Pending {
    records: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    first_ms: Option<i64>,
}

impl Tail {
    fn run(self) {
        let mut pending: BTreeMap<i32, Pending> = BTreeMap::new();
        let mut units = 0u64;
        let mut last_ends = std::time::Instant::now() - Duration::from_secs(60);
        while !self.stop.load(Ordering::Relaxed) {
            if last_ends.elapsed() >= Duration::from_secs(1) {
                self.refresh_ends();
                last_ends = std::time::Instant::now();
            }
            let Some(msg) = self.consumer.poll(Duration::from_millis(100)) else { continue };
            let Ok(msg) = msg else {
                continue;
            };
            let partition = msg.partition();
            let written_ms = msg.timestamp().to_millis();
            let entry = changelog::decode_record(&self.inputs, msg.key().unwrap_or_default(), msg.payload());
            let mut inner = self.inner.write().expect("replica lock");
            inner.position.insert(partition, msg.offset() + 1);
            match entry {
                Ok(Entry::Data { key, value, .. }) => {
                    let unit = pending.entry(partition).or_default();
                    unit.first_ms = unit.first_ms.or(written_ms);
                    if self.prefixes.iter().any(|p| key.starts_with(p)) {
                        unit.records.insert(key, value);
                    }
                }
                Ok(Entry::Marker { seen, .. }) => {
                    let unit = pending.remove(&partition).unwrap_or_default();
                    for (key, value) in unit.records {
                        inner.apply(self.indexer, key, value);
                    }
                    if let (Some(h), Some(first)) = (&self.staleness, unit.first_ms.or(written_ms)) {
                        if self.caught_up.load(Ordering::Relaxed) {
                            h.observe(staleness_seconds(first));
                        }
                    }
                    inner.remember(&seen);
                    units += 1;
                    drop(inner);
                    let _ = self.applied.send(units);
                    continue;
                }
                Ok(_) => {}
                Err(e) => {
                    inner.undecodable += 1;
                    tracing::warn!(topic = %self.topic, partition, offset = msg.offset(), error = %e, "replica: changelog record does not decode; skipped");
                }
            }
            if !self.caught_up.load(Ordering::Relaxed)
                && inner.end.iter().all(|(p, end)| inner.position.get(p).copied().unwrap_or(0) >= *end)
            {
                self.caught_up.store(true, Ordering::Relaxed);
            }
        }
    }

    /// Reads each partition's log end (read_committed: the last stable offset) for
    /// [`Replica::lag_records`] and [`Replica::caught_up`].
    fn refresh_ends(&self) {
        let mut ends = BTreeMap::new();
        for p in 0..self.partitions {
            if let Ok((_, high)) = self.consumer.fetch_watermarks(&self.topic, p, Duration::from_secs(5)) {
                ends.insert(p, high);
            }
        }
        let mut inner = self.inner.write().expect("replica lock");
        inner.end = ends;
        // The consumer's position also passes transaction markers, which are never delivered.
        if let Ok(pos) = self.consumer.position() {
            for e in pos.elements() {
                if let Offset::Offset(o) = e.offset() {
                    let at = inner.position.entry(e.partition()).or_insert(0);
                    *at = (*at).max(o);
                }
            }
        }
        // An empty or fully read changelog is caught up without a record to read.
        let done = inner.end.iter().all(|(p, end)| inner.position.get(p).copied().unwrap_or(0) >= *end || *end == 0);
        if done && inner.end.len() == self.partitions as usize {
            self.caught_up.store(true, Ordering::Relaxed);
        }
    }
}
