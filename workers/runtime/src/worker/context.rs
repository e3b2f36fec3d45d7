//! The consumer side of a worker instance: its readiness ([`Health`]), the consumer context that
//! queues rebalances for the loop, exports consumer lag and broker reachability from librdkafka's
//! statistics and feeds them to the stall watch, and the task that evaluates that watch
//! ([`spawn_stall_watch`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::ClientContext;
use rdkafka::TopicPartitionList;
use tracing::{error, info, warn};

use crate::metrics::Metrics;
use crate::stall::{self, StallWatch};

/// Readiness of one worker instance as `/readyz` reports it: its partitions restored, the broker
/// reachable (librdkafka statistics and error callbacks) and the last unit's outputs not stuck
/// waiting for acknowledgements (`crate::kafka::ACK_STALL`).
pub(super) struct Health {
    pub(super) restored: AtomicBool,
    pub(super) broker_up: AtomicBool,
    pub(super) unacked: AtomicBool,
    /// The flag the HTTP endpoint reads.
    pub(super) published: Arc<AtomicBool>,
}

impl Health {
    pub(super) fn new(published: Arc<AtomicBool>) -> Health {
        Health { restored: AtomicBool::new(false), broker_up: AtomicBool::new(true), unacked: AtomicBool::new(false), published }
    }
    pub(super) fn set(&self, flag: &AtomicBool, value: bool) {
        flag.store(value, Ordering::Relaxed);
        let ready =
            self.restored.load(Ordering::Relaxed) && self.broker_up.load(Ordering::Relaxed) && !self.unacked.load(Ordering::Relaxed);
        self.published.store(ready, Ordering::Relaxed);
    }
}

/// What the consumer's rebalance callbacks saw, for the loop to act on between units.
#[derive(Debug)]
pub(super) enum RebalanceEvent {
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
    pub(super) events: Mutex<Vec<RebalanceEvent>>,
    pub(super) worker: String,
    pub(super) metrics: Metrics,
    pub(super) health: Arc<Health>,
    /// Input partitions this instance paused (assigned and not yet restored, or rewinding):
    /// not watched for stalls.
    pub(super) paused: Mutex<BTreeSet<i32>>,
    pub(super) stalls: Arc<Mutex<StallWatch>>,
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
                if *partition < 0 {
                    continue;
                }
                let lag = partition_lag(p);
                if let Some(lag) = lag {
                    self.metrics.lag.with_label_values(&[self.worker.as_str(), topic, &partition.to_string()]).set(lag);
                }
                // Assigned partitions only: librdkafka also reports the ones it merely knows
                // (`none`) and revoked ones whose fetcher it stopped (`stopping`, `stopped`). One
                // that never had a record has no lag yet: nothing waits.
                if !matches!(p.fetch_state.as_str(), "none" | "stopping" | "stopped") {
                    samples.push(stall::Sample {
                        topic,
                        partition: *partition,
                        position: p.app_offset,
                        lag: lag.unwrap_or(0),
                        fetch_state: &p.fetch_state,
                        paused: paused.contains(partition),
                    });
                }
            }
        }
        let gone = self.stalls.lock().expect("stall watch").observe(Instant::now(), samples);
        for change in gone {
            if let stall::Change::Gone { topic, partition } = change {
                let p = partition.to_string();
                let _ = self.metrics.since_progress.remove_label_values(&[self.worker.as_str(), &topic, &p]);
                let _ = self.metrics.lag.remove_label_values(&[self.worker.as_str(), &topic, &p]);
                for s in stall::Status::ALL {
                    let _ = self.metrics.partition_status.remove_label_values(&[self.worker.as_str(), &topic, &p, s.as_str()]);
                }
            }
        }
    }
}

/// How often the stall watch evaluates its partitions (module `stall`).
const STALL_TICK: Duration = Duration::from_secs(1);

/// Evaluates `watch` every [`STALL_TICK`] until the returned task is aborted: logs each stall
/// once (a warning with the partition, its position, records waiting, librdkafka's fetch state
/// and what the worker last saw) and its end, and exports `orderflow_partition_status`,
/// `orderflow_partition_seconds_since_progress` and `orderflow_stalled_partitions`. Runs on its
/// own task so a unit that never returns does not stop it.
pub(super) fn spawn_stall_watch(worker: String, metrics: Metrics, watch: Arc<Mutex<StallWatch>>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(STALL_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let (changes, rows, stalled, after) = {
                let mut w = watch.lock().expect("stall watch");
                let (changes, rows) = w.evaluate(Instant::now());
                (changes, rows, w.stalled(), w.stall_after())
            };
            for change in changes {
                match change {
                    stall::Change::Stalled { topic, partition, position, lag, fetch_state, for_, seen } => warn!(
                        worker = %worker, %topic, partition, position, lag, %fetch_state, stalled_s = for_.as_secs(),
                        stall_after_s = after.as_secs(), last_seen = %seen,
                        "input partition stalled: records waiting, position not moving (orderflow skip moves past a record that cannot be processed; README \"Stalled partitions\")"
                    ),
                    stall::Change::Resumed { topic, partition, position, after } => {
                        info!(worker = %worker, %topic, partition, position, stalled_s = after.as_secs(), "input partition moving again")
                    }
                    stall::Change::Gone { .. } => {}
                }
            }
            for r in rows {
                let p = r.partition.to_string();
                for s in stall::Status::ALL {
                    metrics.partition_status.with_label_values(&[worker.as_str(), &r.topic, &p, s.as_str()]).set(i64::from(s == r.status));
                }
                metrics.since_progress.with_label_values(&[worker.as_str(), &r.topic, &p]).set(r.since_progress.as_secs() as i64);
            }
            metrics.stalled.with_label_values(&[worker.as_str()]).set(stalled as i64);
        }
    })
}

/// A consumer from `config` with a fresh [`WorkerContext`], subscribed to `inputs`.
///
/// Errors: librdkafka refusing the configuration or the subscription.
pub(super) fn subscribed_consumer(
    config: &ClientConfig,
    worker: &str,
    metrics: &Metrics,
    health: &Arc<Health>,
    inputs: &[String],
    stalls: Arc<Mutex<StallWatch>>,
) -> Result<StreamConsumer<WorkerContext>, KafkaError> {
    let context = WorkerContext {
        events: Mutex::new(Vec::new()),
        worker: worker.to_string(),
        metrics: metrics.clone(),
        health: health.clone(),
        paused: Mutex::new(BTreeSet::new()),
        stalls,
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
    /// The rebalance events queued since the last call.
    pub(super) fn take(&self) -> Vec<RebalanceEvent> {
        std::mem::take(&mut *self.events.lock().expect("rebalance queue"))
    }
    /// Whether a rebalance event is waiting.
    pub(super) fn has_events(&self) -> bool {
        !self.events.lock().expect("rebalance queue").is_empty()
    }
}
