//! `orderflow replay --into`: republishes the range, paced, with the replay headers, and its
//! summary ([`IntoSummary`]).

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use orderflow_runtime::kafka::{client_config, Side};
use orderflow_runtime::topology::{BrokerConfig, Loaded};
use orderflow_runtime::worker::now_ms;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::util::Timeout;
use serde::Serialize;
use serde_json::Value;

use crate::kafkaio::blocking;
use crate::kafkaio::limits::{topic_limits, SizeCheck};

use super::{read_range, reader, PartitionRange, ReplayArgs, Resolved};

/// The JSON summary of `replay --into`.
#[derive(Debug, Clone, Serialize, Default)]
pub struct IntoSummary {
    /// Always `"into"`.
    pub mode: &'static str,
    pub topic: String,
    pub target: String,
    /// `"same-partition"` (target has the source's partition count) or `"by-key"`.
    pub partitioning: &'static str,
    pub ranges: Vec<PartitionRange>,
    /// Records read from the ranges.
    pub read: u64,
    /// Records the broker acknowledged.
    pub sent: u64,
    /// Records whose delivery failed.
    pub failed: u64,
    /// Acknowledged records per target partition.
    pub by_target_partition: BTreeMap<i32, u64>,
    /// Wall time of reading and sending, seconds.
    pub seconds: f64,
    /// `sent / seconds`.
    pub records_per_sec: f64,
    /// `--rate`, records per second (`null`: unlimited).
    pub rate_limit: Option<f64>,
    /// `{record, error}` of the first failed deliveries (at most 20).
    pub failures: Vec<Value>,
}

/// Header added to every replayed record: where it was read, `<topic>/<partition>/<offset>`.
pub const H_REPLAY_SOURCE: &str = "orderflow.replay.source";
/// Header added to every replayed record: when the replay started, ms since the Unix epoch (decimal).
pub const H_REPLAY_TIME: &str = "orderflow.replay.time";
/// Prefix of the replay headers (an earlier replay's are replaced, not accumulated).
pub const REPLAY_HEADER_PREFIX: &str = "orderflow.replay.";
/// Failed deliveries listed in the summary (all are counted).
const MAX_LISTED_FAILURES: usize = 20;

/// `--rate` pacing: a token bucket of capacity one. Send `i` may start no earlier than
/// `interval = 1/rate` after send `i-1` was allowed, so the rate is never exceeded, even in a
/// burst after a stall (no credit is saved up while the producer or the reader is slow).
#[derive(Debug, Clone)]
pub struct Pacer {
    interval: Duration,
    next: Option<Instant>,
}

impl Pacer {
    /// A pacer for `rate` records per second (> 0).
    pub fn new(rate: f64) -> Pacer {
        Pacer { interval: Duration::from_secs_f64(1.0 / rate), next: None }
    }

    /// How long to wait at `now` before the next send; books that send.
    pub fn delay(&mut self, now: Instant) -> Duration {
        let at = match self.next {
            Some(next) if next > now => next,
            _ => now,
        };
        self.next = Some(at + self.interval);
        at - now
    }
}

/// The partition a replayed record goes to: its source partition when the target has the same
/// partition count (`same_partition`), else `None`: the producer's partitioner by key
/// (`murmur2_random`, as the workers use).
pub fn target_partition(same_partition: bool, source_partition: i32) -> Option<i32> {
    same_partition.then_some(source_partition)
}

/// The headers of a replayed record: its own (minus the `orderflow.replay.*` ones of an earlier
/// replay), then [`H_REPLAY_SOURCE`] and [`H_REPLAY_TIME`].
pub fn replay_headers(m: &OwnedMessage, replay_ms: i64) -> OwnedHeaders {
    let mut out = OwnedHeaders::new();
    if let Some(hs) = m.headers() {
        for h in hs.iter().filter(|h| !h.key.starts_with(REPLAY_HEADER_PREFIX)) {
            out = out.insert(Header { key: h.key, value: h.value });
        }
    }
    let source = format!("{}/{}/{}", m.topic(), m.partition(), m.offset());
    out.insert(Header { key: H_REPLAY_SOURCE, value: Some(source.as_bytes()) })
        .insert(Header { key: H_REPLAY_TIME, value: Some(replay_ms.to_string().as_bytes()) })
}

/// A progress bar on stderr with rate and ETA when stderr is a terminal; hidden otherwise.
fn progress_bar(total: u64) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} sent ({per_sec}, ETA {eta}) {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

/// `replay --into TARGET`: republishes every record of `resolved` to `TARGET`.
///
/// * Each record keeps its key, value, headers and timestamp (the original `CreateTime`, or the
///   `LogAppendTime` the broker gave it), plus [`H_REPLAY_SOURCE`] and [`H_REPLAY_TIME`] (the
///   same time for every record of one run).
/// * Partition: the source partition when the target has the same partition count (records of
///   one key stay together and in order), else by key with the default partitioner.
/// * The idempotent producer of the topology (`Side::Producer`: `enable.idempotence`,
///   `acks=all`): records of one partition are written once and in read order; every
///   acknowledgement is awaited before the summary.
/// * `--rate N`: at most N sends per second ([`Pacer`]).
///
/// Safe into a live topic, and safe to repeat: every worker deduplicates its inputs by `eventId`
/// (domain rule 7), so a replayed event that was processed already has no second effect.
/// Replaying into the source topic itself appends copies after the high watermark and needs `--yes`.
///
/// Errors: before anything is sent, target not on the broker, target = source without `--yes`,
/// a record over the target's size limit ([`check_sizes`], a first pass over the range); then
/// reading ([`read_range`]), producer creation. Failed deliveries are counted in the summary
/// (`failed`, `failures`), and [`run`] exits non-zero after printing it.
pub(super) async fn into(args: &ReplayArgs, loaded: &Loaded, resolved: &Resolved) -> Result<IntoSummary> {
    let target = args.into.clone().expect("--into");
    if target == resolved.topic && !args.yes {
        bail!(
            "refusing to replay {} into itself: this appends copies of {} record(s) to it; every worker deduplicates by eventId so it is safe, but confirm with --yes",
            target,
            resolved.total()
        );
    }
    let broker = loaded.topology.broker.clone();
    let (source_count, target_count) = {
        let (b, s, t) = (broker.clone(), resolved.topic.clone(), target.clone());
        blocking(move || -> Result<(Option<i32>, Option<i32>)> {
            let topics = reader(&b)?.broker_topics()?;
            Ok((topics.get(&s).copied(), topics.get(&t).copied()))
        })
        .await?
    };
    let Some(target_count) = target_count else {
        bail!("target topic {target} does not exist on the broker (create it first, e.g. `orderflow topics` for the topology's topics)");
    };
    let same_partition = source_count == Some(target_count);
    let replay_ms = now_ms();
    check_sizes(&broker, resolved, &target, replay_ms).await?;
    let producer: FutureProducer = client_config(&broker, Side::Producer).create().context("creating the producer")?;
    let bar = progress_bar(resolved.total());
    let started = Instant::now();

    // The reader (blocking) enqueues; this task collects the acknowledgements as they come.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, DeliveryFuture)>();
    let acks = {
        let bar = bar.clone();
        tokio::spawn(async move {
            let mut pending = futures::stream::FuturesUnordered::new();
            let mut s = IntoSummary::default();
            let mut open = true;
            loop {
                tokio::select! {
                    m = rx.recv(), if open => match m {
                        Some((from, fut)) => pending.push(async move { (from, fut.await) }),
                        None => open = false,
                    },
                    Some((from, r)) = pending.next(), if !pending.is_empty() => {
                        match r {
                            Ok(Ok(d)) => {
                                s.sent += 1;
                                *s.by_target_partition.entry(d.partition).or_default() += 1;
                            }
                            Ok(Err((e, _))) => s.fail(&from, &e.to_string()),
                            Err(_) => s.fail(&from, "the producer dropped the delivery"),
                        }
                        bar.inc(1);
                    }
                    else => break,
                }
            }
            s
        })
    };

    let read = {
        let (producer, resolved, target) = (producer.clone(), resolved.clone(), target.clone());
        let mut pacer = args.rate.map(Pacer::new);
        let bar = bar.clone();
        tokio::task::spawn_blocking(move || -> Result<(u64, Vec<(String, String)>)> {
            let mut refused = Vec::new();
            let n = read_range(&broker, &resolved, &mut |m| {
                if let Some(p) = pacer.as_mut() {
                    let wait = p.delay(Instant::now());
                    if !wait.is_zero() {
                        std::thread::sleep(wait);
                    }
                }
                let from = format!("{}/{}/{}", m.topic(), m.partition(), m.offset());
                let headers = replay_headers(&m, replay_ms);
                let mut record = FutureRecord::<[u8], [u8]>::to(&target).headers(headers);
                if let Some(k) = m.key() {
                    record = record.key(k);
                }
                if let Some(v) = m.payload() {
                    record = record.payload(v);
                }
                if let Some(ts) = m.timestamp().to_millis() {
                    record = record.timestamp(ts);
                }
                if let Some(p) = target_partition(same_partition, m.partition()) {
                    record = record.partition(p);
                }
                loop {
                    match producer.send_result(record) {
                        Ok(fut) => {
                            let _ = tx.send((from, fut));
                            break;
                        }
                        Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                            record = r;
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        Err((e, _)) => {
                            refused.push((from, e.to_string()));
                            bar.inc(1);
                            break;
                        }
                    }
                }
                Ok(())
            })?;
            drop(tx);
            Ok((n, refused))
        })
    };
    let read = read.await.context("reader task panicked")?;
    // Wait for every acknowledgement even when reading failed: what was sent is reported.
    let _ = producer.flush(Timeout::After(Duration::from_secs(60)));
    let mut s = acks.await.context("acknowledgement task panicked")?;
    bar.finish_and_clear();
    let (read, refused) = read?;
    for (from, e) in refused {
        s.fail(&from, &e);
    }
    s.mode = "into";
    s.topic = resolved.topic.clone();
    s.target = target;
    s.partitioning = if same_partition { "same-partition" } else { "by-key" };
    s.ranges = resolved.ranges.clone();
    s.read = read;
    s.seconds = started.elapsed().as_secs_f64();
    s.records_per_sec = if s.seconds > 0.0 { s.sent as f64 / s.seconds } else { 0.0 };
    s.rate_limit = args.rate;
    Ok(s)
}

/// The size check of `replay --into` ([`SizeCheck`]): a first pass over the whole range checks
/// every record, with the replay headers it would get, against `target`'s size limit, so an
/// oversized record refuses the replay before anything is sent. (The source topic's own limit
/// proves nothing: it may have been larger when the records were written.)
///
/// Errors: a record over the limit (nothing is sent), reading the range ([`read_range`]).
async fn check_sizes(broker: &BrokerConfig, resolved: &Resolved, target: &str, replay_ms: i64) -> Result<()> {
    let limits = topic_limits(broker, &[target.to_string()]).await?;
    let (broker, resolved, target) = (broker.clone(), resolved.clone(), target.to_string());
    let sizes = blocking(move || {
        let mut sizes = SizeCheck::new(limits);
        read_range(&broker, &resolved, &mut |m| {
            let headers = replay_headers(&m, replay_ms);
            let what = || format!("{}/{}/{}", m.topic(), m.partition(), m.offset());
            sizes.record(what, &target, m.key(), m.payload(), headers.iter().map(|h| (h.key, h.value)));
            Ok(())
        })?;
        Ok(sizes)
    })
    .await?;
    sizes.finish()
}

impl IntoSummary {
    fn fail(&mut self, record: &str, error: &str) {
        self.failed += 1;
        eprintln!("delivery of {record} failed: {error}");
        if self.failures.len() < MAX_LISTED_FAILURES {
            self.failures.push(serde_json::json!({"record": record, "error": error}));
        }
    }
}
