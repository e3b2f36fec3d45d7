//! `bench retention` (issue 13): does state stay flat over a long run? The order confirmer runs
//! in-process with `state_retention = --retention` while a paced producer offers `--orders`
//! orders at `--rate` per second (each a `stock.reserved` and, a second later, its
//! `order.settled` SOLD, so every order is closed). Every `--sample` the bench records the state
//! store's size on disk, the changelog's size on the broker's disk (`--log-dir`), and the
//! `eventId`s forgotten so far. At the end it stops the worker and counts, exactly, the keys left
//! in the state store (by kind) and the records and live keys left in the changelog. Run it once
//! with a short retention and once with the default (7 days, nothing forgotten within the run)
//! to compare.
//!
//! The changelog topic gets small segments (`segment.ms` = the sample period) and eager
//! compaction, so the log cleaner can act within the run; the topology's own topics keep
//! Kafka's defaults (README "Bounded state").

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use futures::StreamExt;
use orderflow_api::events::*;
use orderflow_api::Event;
use orderflow_runtime::codec::Codec;
use orderflow_runtime::kafka::{client_config, create_topics, Side};
use orderflow_runtime::metrics::Metrics;
use orderflow_runtime::store::Store;
use orderflow_runtime::topology::Loaded;
use orderflow_runtime::worker::now_ms;
use rdkafka::admin::{AdminClient, AdminOptions, AlterConfig, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use serde::Serialize;
use tracing::info;

use super::worker::spawn_worker;
use super::{order, reserved, Common, Rng};
use crate::kafkaio::{blocking, Reader};

/// The worker this scenario runs: its state holds one record per open or recently closed order
/// and two remembered `eventId`s per order.
const WORKER: &str = "order-confirmer";

/// `orderflow bench retention` flags.
#[derive(clap::Args, Debug)]
pub struct RetentionArgs {
    #[command(flatten)]
    common: Common,
    /// Orders offered (each: `stock.reserved`, then `order.settled` a second later).
    #[arg(long, default_value_t = 1_000_000)]
    orders: u64,
    /// Orders per second offered.
    #[arg(long, default_value_t = 4_000)]
    rate: u64,
    /// `state_retention` of the worker.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    retention: Duration,
    /// Time between samples; also the changelog's `segment.ms`.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    sample: Duration,
    /// The broker's log directory (`log.dirs`), to measure the changelog's size on disk; without
    /// it only record counts are reported.
    #[arg(long)]
    log_dir: Option<PathBuf>,
}

/// One sample of a run.
#[derive(Debug, Serialize, Clone)]
pub struct Sample {
    /// Seconds since the producer started.
    pub t_s: f64,
    /// Orders offered so far.
    pub orders: u64,
    /// Input records the worker has processed so far.
    pub consumed: u64,
    /// Bytes of the worker's state store directory.
    pub state_bytes: u64,
    /// Bytes of the changelog's log segments (with `--log-dir`; index files left out).
    pub changelog_bytes: Option<u64>,
    /// `orderflow_state_forgotten_event_ids_total` of the worker.
    pub forgotten_event_ids: u64,
}

/// What the state store held after the run, by key kind.
#[derive(Debug, Serialize, Default)]
pub struct StateKeys {
    pub total: u64,
    /// Remembered `eventId`s.
    pub event_ids: u64,
    /// The marker index (two entries per indexed marker).
    pub marker_index: u64,
    /// Order records.
    pub orders: u64,
    /// Pending timers (`forget_later`, the sweep).
    pub timers: u64,
}

/// `bench retention` result (one JSON object on stdout).
#[derive(Debug, Serialize)]
pub struct RetentionResult {
    /// Always `"retention"`.
    pub scenario: &'static str,
    pub worker: &'static str,
    pub orders: u64,
    pub rate_per_s: u64,
    pub retention_s: f64,
    pub samples: Vec<Sample>,
    /// Keys in the state store after the run.
    pub state_keys: StateKeys,
    /// Records the worker wrote to its changelog (sum of high watermarks).
    pub changelog_written: i64,
    /// Records still in the changelog after the run (what compaction left).
    pub changelog_records: u64,
    /// Distinct keys whose newest changelog record is not a tombstone (what a restore rebuilds).
    pub changelog_live_keys: u64,
    /// Seconds from the first offer to the worker having processed every input record.
    pub elapsed_s: f64,
}

/// Runs the scenario (module docs).
///
/// Errors: broker or store failures, the worker stopping by itself, or the worker not catching
/// up within 5 minutes after the last offer.
pub async fn run(args: RetentionArgs) -> Result<RetentionResult> {
    let c = &args.common;
    let mut loaded: Loaded = crate::topology::load_topology(&c.topology, c.bootstrap.as_deref())?;
    let state_dir = PathBuf::from("target/bench/state").join(format!("retention-{}", now_ms()));
    loaded.topology.defaults.state_dir = state_dir.clone();
    {
        let spec = loaded.topology.workers.get_mut(WORKER).with_context(|| format!("worker {WORKER} is not in the topology"))?;
        spec.state_retention = Some(args.retention);
        if let Some(ci) = c.commit_interval {
            spec.commit_interval = Some(ci);
        }
    }
    let loaded = Arc::new(loaded);
    let t = &loaded.topology;
    let spec = &t.workers[WORKER];
    create_topics(t).await.context("creating topics")?;
    let changelog = orderflow_runtime::changelog::topic(WORKER);
    compact_eagerly(&loaded, &changelog, args.sample).await?;

    let codec = Arc::new(Codec::load(&loaded.avro_dir(), t.broker.registry_url.as_deref())?);
    let metrics = Metrics::new();
    let (worker, stop) = spawn_worker(&loaded, WORKER, codec.clone(), &metrics).await?;
    let consumed = || -> u64 {
        spec.inputs
            .iter()
            .flat_map(|topic| {
                ["processed", "duplicate", "dead_lettered"].map(|o| metrics.consumed.with_label_values(&[WORKER, topic, o]).get())
            })
            .sum()
    };

    let producer: FutureProducer = client_config(&t.broker, Side::Producer).create()?;
    let offered = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let started = Instant::now();
    let offer = tokio::spawn(offer(producer, codec, args.orders, args.rate, offered.clone()));
    let state_path = state_dir.join(WORKER).join("bench");
    let mut samples = Vec::new();
    let mut next_sample = started + args.sample;
    let expected = 2 * args.orders;
    let mut last_offer = None;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if worker.is_finished() {
            worker.await??;
            bail!("worker {WORKER} stopped by itself");
        }
        if offer.is_finished() && last_offer.is_none() {
            last_offer = Some(Instant::now());
        }
        let now = Instant::now();
        let done = consumed() >= expected;
        if now >= next_sample || done {
            next_sample += args.sample;
            let s = Sample {
                t_s: started.elapsed().as_secs_f64(),
                orders: offered.load(std::sync::atomic::Ordering::Relaxed),
                consumed: consumed(),
                state_bytes: dir_bytes(&state_path),
                changelog_bytes: args.log_dir.as_deref().map(|d| changelog_bytes(d, &changelog)),
                forgotten_event_ids: metrics.forgotten.with_label_values(&[WORKER]).get(),
            };
            info!(?s, "sample");
            samples.push(s);
        }
        if done {
            break;
        }
        if last_offer.is_some_and(|l| l.elapsed() > Duration::from_secs(300)) {
            bail!("worker {WORKER} processed {} of {expected} records 5 minutes after the last offer", consumed());
        }
    }
    offer.await.context("offer task")??;
    let elapsed_s = started.elapsed().as_secs_f64();
    let _ = stop.send(true);
    worker.await.context("worker task panicked")??;

    let state_keys = count_state(&state_path)?;
    let broker = t.broker.clone();
    let partitions = t.topics.get(&spec.inputs[0]).map(|s| s.partitions).unwrap_or(6);
    let (changelog_written, changelog_records, changelog_live_keys) =
        blocking(move || read_changelog(&broker, &changelog, partitions)).await?;
    let _ = std::fs::remove_dir_all(&state_dir);
    Ok(RetentionResult {
        scenario: "retention",
        worker: WORKER,
        orders: args.orders,
        rate_per_s: args.rate,
        retention_s: args.retention.as_secs_f64(),
        samples,
        state_keys,
        changelog_written,
        changelog_records,
        changelog_live_keys,
        elapsed_s,
    })
}

/// Offers `orders` orders at `rate` per second: order i's `stock.reserved` at i / rate seconds,
/// its `order.settled` SOLD a second later (so it follows the reservation on its partition).
async fn offer(
    producer: FutureProducer,
    codec: Arc<Codec>,
    orders: u64,
    rate: u64,
    offered: Arc<std::sync::atomic::AtomicU64>,
) -> Result<()> {
    let started = Instant::now();
    let lag = rate.max(1);
    let mut rng = Rng(13);
    let mut reserved_events: std::collections::VecDeque<StockReserved> = Default::default();
    let mut in_flight = futures::stream::FuturesUnordered::new();
    let mut i = 0u64;
    while i < orders + lag {
        let due = (started.elapsed().as_secs_f64() * rate as f64) as u64;
        while i < due.min(orders + lag) {
            let now = now_ms();
            let mut batch: Vec<(&'static str, String, Event)> = Vec::with_capacity(2);
            if i < orders {
                let o = order(i, &mut rng, now);
                let r = reserved(&o, now);
                batch.push(("stock.reserved", o.order_id.clone(), Event::StockReserved(r.clone())));
                reserved_events.push_back(r);
            }
            if i >= lag {
                let r = reserved_events.pop_front().expect("one reservation per order offered");
                let settled = OrderSettled {
                    event_id: format!("bench-settled-{}", r.order_id),
                    occurred_at: now,
                    order_id: r.order_id.clone(),
                    hq_id: r.hq_id.clone(),
                    store_id: r.store_id.clone(),
                    payment_event_id: format!("bench-paid-{}", r.order_id),
                    reservation_id: r.reservation_id.clone(),
                    outcome: settlement::SOLD.to_string(),
                    late: false,
                    reason: None,
                    items: r.items.iter().map(|i| SettledItem { product_id: i.product_id.clone(), quantity: i.reserved }).collect(),
                };
                batch.push(("order.settled", r.order_id.clone(), Event::OrderSettled(settled)));
            }
            for (topic, key, event) in batch {
                let value = codec.encode(topic, &event).await?;
                let producer = producer.clone();
                in_flight.push(async move {
                    producer
                        .send(FutureRecord::to(topic).key(&key).payload(&value), Timeout::Never)
                        .await
                        .map_err(|(e, _)| anyhow::anyhow!("offering to {topic}: {e}"))
                });
            }
            i += 1;
            offered.store(i.min(orders), std::sync::atomic::Ordering::Relaxed);
        }
        while in_flight.len() > 10_000 {
            if let Some(r) = in_flight.next().await {
                r?;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    while let Some(r) = in_flight.next().await {
        r?;
    }
    Ok(())
}

/// Sets the changelog's `segment.ms` to `segment` and lets the cleaner act at once
/// (`min.cleanable.dirty.ratio` 0.01, `delete.retention.ms` and `min.compaction.lag.ms` 0), so
/// compaction shows within a run.
async fn compact_eagerly(loaded: &Loaded, topic: &str, segment: Duration) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = client_config(&loaded.topology.broker, Side::Admin).create()?;
    let segment_ms = segment.as_millis().to_string();
    let config = AlterConfig::new(ResourceSpecifier::Topic(topic))
        .set("cleanup.policy", "compact")
        .set("segment.ms", &segment_ms)
        .set("min.cleanable.dirty.ratio", "0.01")
        .set("delete.retention.ms", "0")
        .set("min.compaction.lag.ms", "0");
    for r in admin.alter_configs(&[config], &AdminOptions::new().request_timeout(Some(Duration::from_secs(30)))).await? {
        r.map_err(|(what, e)| anyhow::anyhow!("altering the configuration of {what:?}: {e}"))?;
    }
    Ok(())
}

/// Total size of the files under `dir` whose name passes `keep` (0 when missing).
fn dir_bytes_of(dir: &Path, keep: &dyn Fn(&str) -> bool) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes_of(&e.path(), keep),
            Ok(m) if keep(&e.file_name().to_string_lossy()) => m.len(),
            _ => 0,
        })
        .sum()
}

/// Total size of the files under `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    dir_bytes_of(dir, &|_| true)
}

/// Size of `topic`'s partition directories under the broker's `log_dir`.
fn changelog_bytes(log_dir: &Path, topic: &str) -> u64 {
    let Ok(entries) = std::fs::read_dir(log_dir) else { return 0 };
    let prefix = format!("{topic}-");
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().strip_prefix(&prefix).is_some_and(|p| p.parse::<i32>().is_ok()))
        // Log segments only: Kafka preallocates each segment's index files (10 MiB apiece).
        .map(|e| dir_bytes_of(&e.path(), &|name| name.ends_with(".log")))
        .sum()
}

/// Counts the keys of the state store at `path` by kind (the worker is stopped).
fn count_state(path: &Path) -> Result<StateKeys> {
    let store = Store::open(path)?;
    let mut keys = StateKeys::default();
    for p in store.partitions() {
        let shard = store.shard(p)?;
        for (k, _) in shard.scan(b"")? {
            keys.total += 1;
            if orderflow_api::is_seen_key(&k) {
                keys.event_ids += 1;
            } else if orderflow_runtime::retention::is_local(&k) {
                keys.marker_index += 1;
            } else {
                keys.orders += 1;
            }
        }
        keys.timers += shard.timer_count() as u64;
    }
    Ok(keys)
}

/// The changelog's records written (high watermarks), records left, and live keys (newest
/// record not a tombstone).
fn read_changelog(broker: &orderflow_runtime::topology::BrokerConfig, topic: &str, partitions: i32) -> Result<(i64, u64, u64)> {
    let reader = Reader::new(broker, "orderflow-bench-retention", "creating the changelog reader")?;
    let spans = reader.spans_to_end(topic, 0..partitions)?;
    let written = spans.iter().map(|s| s.end.unwrap_or(0)).sum();
    let records = reader.collect(&spans, |m| ((m.partition(), m.key().unwrap_or_default().to_vec()), m.payload().is_some()))?;
    let mut newest: BTreeMap<(i32, Vec<u8>), bool> = BTreeMap::new();
    for (k, live) in &records {
        newest.insert(k.clone(), *live);
    }
    let live: BTreeSet<_> = newest.into_iter().filter(|(_, live)| *live).map(|(k, _)| k).collect();
    Ok((written, records.len() as u64, live.len() as u64))
}
