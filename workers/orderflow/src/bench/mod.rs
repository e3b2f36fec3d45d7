//! `orderflow bench`: throughput against the local broker, measured the same way every time
//! (issue 7). Each scenario prints one JSON object on stdout; `scripts/bench` runs them on a
//! fresh tansu broker each, collects them into `target/bench/<timestamp>.json` and appends a
//! table to `BENCHMARKS.md`.
//!
//! - `bench raw`: the raw baseline. Encoded `OrderCreated` events are produced first into a
//!   source topic, then a bare rdkafka consume → produce passthrough copies them to a sink topic
//!   with the workers' batching and commit settings (the topology's client properties through
//!   [`client_config`], units of up to `max_batch` records or one `commit_interval`, every
//!   acknowledgement awaited, then the offsets committed). The practical limit of this broker
//!   and machine for one consume → produce hop.
//! - `bench worker --name W`: one real [`Worker`] of the topology, in-process, over input records
//!   produced first into its input topics, measured for `--duration` after `--warmup`; also
//!   counts the broker writes it made per input record (outputs, dead letters and changelog
//!   records, from the topics' high watermarks).
//!
//! Both measure from the consumer's side: the warm-up starts with the first record processed
//! (group join and state restore are not counted), the measurement window follows it and ends
//! when the input is drained or the duration is over.

pub mod recovery;
pub mod saga;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use futures::future::join_all;
use futures::StreamExt;
use orderflow_api::events::*;
use orderflow_api::Event;
use orderflow_runtime::codec::Codec;
use orderflow_runtime::kafka::{client_config, create_topics, Side};
use orderflow_runtime::metrics::Metrics;
use orderflow_runtime::topology::{Guarantee, Loaded, Topology};
use orderflow_runtime::worker::{now_ms, Worker, WorkerSetup};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;
use tokio::sync::watch;
use tracing::info;

use crate::kafkaio::{high_watermarks, watermark_client};

/// `orderflow bench` flags.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(clap::Subcommand, Debug)]
enum Scenario {
    /// Raw baseline: a bare rdkafka consume → produce passthrough of pre-produced OrderCreated
    /// records with the workers' batching and commit settings; prints records/s as JSON.
    Raw(RawArgs),
    /// One worker of the topology, in-process, over pre-produced input; prints events/s, the
    /// ratio to `--baseline` and the broker writes per input record as JSON.
    Worker(WorkerArgs),
    /// The whole saga on TPC-H orders: throughput to a terminal state (all workers in one
    /// process, or one process per worker) and latency percentiles at fixed offered loads.
    Saga(crate::bench::saga::SagaArgs),
    /// Recovery after SIGKILL (local state, and sled deleted: changelog rebuild) and peak RSS of
    /// a worker holding many state keys.
    Recovery(crate::bench::recovery::RecoveryArgs),
}

/// Flags every scenario shares.
#[derive(clap::Args, Debug)]
pub(crate) struct Common {
    #[arg(long, default_value = "topology.toml")]
    pub(crate) topology: PathBuf,
    /// Bootstrap servers of the broker (e.g. started by scripts/broker.sh).
    #[arg(long, env = "ORDERFLOW_BOOTSTRAP")]
    pub(crate) bootstrap: Option<String>,
    /// Records produced into the input before the measurement starts.
    #[arg(long)]
    pub(crate) records: Option<u64>,
    /// Time after the first processed record that is not measured.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub(crate) warmup: Duration,
    /// Longest measurement window after the warm-up (it ends earlier when the input is drained).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub(crate) duration: Duration,
    /// Commit interval of the units (default: the topology's `commit_interval` for the worker).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub(crate) commit_interval: Option<Duration>,
}

#[derive(clap::Args, Debug)]
struct RawArgs {
    #[command(flatten)]
    common: Common,
    /// Partitions of the source and sink topics (default: those of `order.created`).
    #[arg(long)]
    partitions: Option<i32>,
}

#[derive(clap::Args, Debug)]
struct WorkerArgs {
    #[command(flatten)]
    common: Common,
    /// The worker: deduplicator, stock-reserver or order-confirmer.
    #[arg(long)]
    name: String,
    /// Raw baseline of the same run, records/s (from `bench raw`), for the ratio.
    #[arg(long)]
    baseline: Option<f64>,
    /// State directory of this run (default: a fresh folder under target/bench/state).
    #[arg(long)]
    state_dir: Option<PathBuf>,
}

/// The settings a figure was taken with.
#[derive(Debug, Serialize)]
pub struct Settings {
    /// Unit of work: at most this many input records...
    pub max_batch: usize,
    /// ...or this long, milliseconds (then outputs acknowledged, offsets committed).
    pub commit_interval_ms: u64,
    /// librdkafka producer `batch.size`, bytes (`[broker.producer]`; librdkafka's default if unset).
    pub producer_batch_size: Option<String>,
    /// librdkafka producer `linger.ms`.
    pub producer_linger_ms: Option<String>,
    /// librdkafka consumer `fetch.wait.max.ms`.
    pub fetch_wait_max_ms: Option<String>,
    /// Partitions of the input topics.
    pub partitions: i32,
}

/// What a measurement window saw.
#[derive(Debug, Serialize, Clone, Copy)]
pub struct Window {
    /// Seconds from the first processed record to the start of the window (the warm-up).
    pub warmup_s: f64,
    /// Length of the window, seconds.
    pub measured_s: f64,
    /// Records processed inside the window.
    pub measured_records: u64,
    /// `measured_records / measured_s`.
    pub records_per_s: f64,
    /// Whether the window ended because the input was drained (else: the duration was over).
    pub drained: bool,
}

/// `bench raw` result (one JSON object on stdout).
#[derive(Debug, Serialize)]
pub struct RawResult {
    /// Always `"raw"`.
    pub scenario: &'static str,
    /// Records produced into the source topic first.
    pub records: u64,
    /// Mean size of one record's value, bytes.
    pub value_bytes: f64,
    /// Rate at which the bench produced the input (idempotent producer, all in flight), records/s.
    pub produce_records_per_s: f64,
    /// The consume → produce passthrough.
    pub passthrough: Window,
    /// How the passthrough's units went (whole run, warm-up included).
    pub units: Units,
    /// The settings of the run.
    pub settings: Settings,
}

/// Units of work of a whole run (warm-up included): where the time went.
#[derive(Debug, Serialize, Default)]
pub struct Units {
    /// Units committed.
    pub count: u64,
    /// Mean input records per unit.
    pub mean_records: f64,
    /// Mean time to decode and process one unit, milliseconds (0 for the raw passthrough).
    pub mean_processing_ms: f64,
    /// Mean time from the first send of a unit to its last acknowledgement, sled flush and
    /// offset commit, milliseconds.
    pub mean_commit_ms: f64,
}

/// `bench worker` result (one JSON object on stdout).
#[derive(Debug, Serialize)]
pub struct WorkerResult {
    /// Always `"worker"`.
    pub scenario: &'static str,
    pub worker: String,
    /// The guarantee the worker ran with (`effectively_once` on tansu).
    pub guarantee: &'static str,
    /// Input records produced first, per topic.
    pub input: BTreeMap<String, u64>,
    /// Rate at which the bench produced the input, records/s.
    pub produce_records_per_s: f64,
    /// Input records (events) processed.
    pub window: Window,
    /// Raw baseline of the same run, records/s (`--baseline`).
    pub baseline_records_per_s: Option<f64>,
    /// `window.records_per_s / baseline_records_per_s`.
    pub ratio_to_baseline: Option<f64>,
    /// Input records the worker had processed when it stopped (all units committed).
    pub processed_total: u64,
    /// Records the worker wrote, per topic (outputs, dead letters, its changelog).
    pub writes: BTreeMap<String, i64>,
    /// Sum of `writes` / `processed_total`: broker writes per input record.
    pub writes_per_input: f64,
    /// Changelog records per input record (part of `writes_per_input`).
    pub changelog_writes_per_input: f64,
    /// How the worker's units went (its `unit_processing_seconds` and `commit_seconds`).
    pub units: Units,
    /// The settings of the run.
    pub settings: Settings,
}

/// Runs one scenario and prints its JSON object on stdout.
pub async fn run(args: BenchArgs) -> Result<()> {
    let json = match args.scenario {
        Scenario::Raw(a) => serde_json::to_string(&raw(a).await?)?,
        Scenario::Worker(a) => serde_json::to_string(&worker(a).await?)?,
        Scenario::Saga(a) => serde_json::to_string(&crate::bench::saga::run(a).await?)?,
        Scenario::Recovery(a) => serde_json::to_string(&crate::bench::recovery::run(a).await?)?,
    };
    println!("{json}");
    Ok(())
}

pub(crate) fn settings(t: &Topology, commit_interval: Duration, max_batch: usize, partitions: i32) -> Settings {
    let get = |side: &BTreeMap<String, String>, k: &str| side.get(k).or_else(|| t.broker.properties.get(k)).cloned();
    Settings {
        max_batch,
        commit_interval_ms: commit_interval.as_millis() as u64,
        producer_batch_size: get(&t.broker.producer, "batch.size"),
        producer_linger_ms: get(&t.broker.producer, "linger.ms"),
        fetch_wait_max_ms: get(&t.broker.consumer, "fetch.wait.max.ms"),
        partitions,
    }
}

// ------------------------------------------------------------------ synthetic input

/// Stores of the synthetic input: 25 (as TPC-H's nations), under 5 HQs.
pub(crate) const STORES: usize = 25;
/// Products each store stocks.
pub(crate) const PRODUCTS: usize = 200;

/// A small deterministic generator (splitmix64), so every run offers the same records.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e3779b97f4a7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
        z ^ (z >> 31)
    }
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

pub(crate) fn store(i: usize) -> (String, String) {
    (format!("HQ-B{}", i % 5), format!("ST-B{i:02}"))
}

/// Order `i` of the synthetic input: one of [`STORES`] stores, 1–4 distinct products of
/// [`PRODUCTS`], 1–5 units each.
pub(crate) fn order(i: u64, rng: &mut Rng, now: i64) -> OrderCreated {
    let (hq_id, store_id) = store(rng.below(STORES as u64) as usize);
    let n = 1 + rng.below(4) as usize;
    let mut products: Vec<u64> = Vec::with_capacity(n);
    while products.len() < n {
        let p = rng.below(PRODUCTS as u64);
        if !products.contains(&p) {
            products.push(p);
        }
    }
    OrderCreated {
        event_id: format!("bench-order-{i}"),
        occurred_at: now,
        order_id: format!("O-B{i}"),
        customer_id: format!("C-B{}", rng.below(10_000)),
        hq_id,
        store_id,
        items: products
            .into_iter()
            .map(|p| OrderItem {
                product_id: format!("P-B{p}"),
                quantity: 1 + rng.below(5) as i32,
                unit_price: 100 + rng.below(10_000) as i64,
            })
            .collect(),
    }
}

/// One restock per store: every product, enough units that no order of the run fails for stock.
pub(crate) fn inventory(now: i64) -> Vec<InventoryAdjusted> {
    (0..STORES)
        .map(|s| {
            let (hq_id, store_id) = store(s);
            InventoryAdjusted {
                event_id: format!("bench-stock-{store_id}"),
                occurred_at: now,
                hq_id,
                store_id,
                adjustment_type: change_reason::RESTOCK.into(),
                reference_id: "bench".into(),
                items: (0..PRODUCTS).map(|p| AdjustedItem { product_id: format!("P-B{p}"), delta: 100_000_000 }).collect(),
            }
        })
        .collect()
}

/// A `stock.reserved` answer for order `o` (input of the order confirmer).
pub(crate) fn reserved(o: &OrderCreated, now: i64) -> StockReserved {
    StockReserved {
        event_id: format!("bench-reserved-{}", o.order_id),
        occurred_at: now,
        order_id: o.order_id.clone(),
        reservation_id: format!("R-{}", o.order_id),
        hq_id: o.hq_id.clone(),
        store_id: o.store_id.clone(),
        expires_at: now + 3_600_000,
        items: o.items.iter().map(|i| ReservedItem { product_id: i.product_id.clone(), reserved: i.quantity }).collect(),
    }
}

/// Produces `records` (topic, key, value) with every send in flight at once (bounded), and
/// waits for every acknowledgement. Returns records/s.
pub(crate) async fn produce_all(producer: &FutureProducer, records: impl Iterator<Item = (String, String, Vec<u8>)>) -> Result<f64> {
    let started = Instant::now();
    let mut in_flight = futures::stream::FuturesUnordered::new();
    let mut n = 0u64;
    for (topic, key, value) in records {
        let producer = producer.clone();
        in_flight.push(async move {
            producer
                .send(FutureRecord::to(&topic).key(&key).payload(&value), Timeout::Never)
                .await
                .map_err(|(e, _)| anyhow::anyhow!("producing the input to {topic}: {e}"))
        });
        n += 1;
        if in_flight.len() >= 50_000 {
            if let Some(r) = in_flight.next().await {
                r?;
            }
        }
    }
    while let Some(r) = in_flight.next().await {
        r?;
    }
    Ok(n as f64 / started.elapsed().as_secs_f64().max(1e-9))
}

// ------------------------------------------------------------------ worker processes

// Shared by `bench saga` and `bench recovery`, which run workers as child processes and read
// their `/readyz`, `/metrics` and logs.

/// A free TCP port on 127.0.0.1 (for a child's `--metrics-addr`).
pub(crate) fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0").context("binding a free port")?.local_addr()?.port())
}

/// `GET path` on 127.0.0.1:`port`: (status, body), `None` when it cannot connect or does not
/// answer within `timeout`.
pub(crate) async fn http_get(port: u16, path: &str, timeout: Duration) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let get = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").as_bytes()).await.ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        parse_http(&String::from_utf8_lossy(&buf))
    };
    tokio::time::timeout(timeout, get).await.ok().flatten()
}

/// (status, body) of an HTTP/1.x response (the body as sent: `Connection: close` answers are
/// not chunked by axum for these small bodies; a chunked one keeps its chunk sizes, which the
/// Prometheus parser skips as unparsable lines).
pub(crate) fn parse_http(text: &str) -> Option<(u16, String)> {
    let status = text.lines().next()?.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Some((status, body))
}

/// The last `n` lines of a log, for error messages.
pub(crate) fn log_tail(path: &std::path::Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Splits a Prometheus sample line into (name, labels, value); `None` for comments, blank and
/// unparsable lines.
pub(crate) fn parse_sample(line: &str) -> Option<(&str, BTreeMap<String, String>, f64)> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(['{', ' '])?;
    let name = &line[..name_end];
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(r) = rest.strip_prefix('{') {
        let close = r.find('}')?;
        for pair in r[..close].split(',').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=')?;
            labels.insert(k.trim().to_string(), v.trim().trim_matches('"').to_string());
        }
        rest = &r[close + 1..];
    }
    Some((name, labels, rest.split_whitespace().next()?.parse().ok()?))
}

/// The samples of `name` in a Prometheus text exposition: (labels, value).
pub(crate) fn metric_samples(text: &str, name: &str) -> Vec<(BTreeMap<String, String>, f64)> {
    text.lines().filter_map(parse_sample).filter(|(n, _, _)| *n == name).map(|(_, l, v)| (l, v)).collect()
}

/// Σ of every sample of `name` (0 when none).
pub(crate) fn metric_sum(text: &str, name: &str) -> f64 {
    metric_samples(text, name).iter().map(|(_, v)| v).sum()
}

/// Σ of the samples of `name` per value of `label`.
pub(crate) fn metric_by_label(text: &str, name: &str, label: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for (labels, v) in metric_samples(text, name) {
        *out.entry(labels.get(label).cloned().unwrap_or_default()).or_default() += v;
    }
    out
}

// ------------------------------------------------------------------ measurement

/// Tracks processed counts over time and decides the measurement window.
pub(crate) struct Meter {
    warmup: Duration,
    duration: Duration,
    total: u64,
    first: Option<Instant>,
    /// (time, processed count) at the start of the window.
    start: Option<(Instant, u64)>,
}

impl Meter {
    pub(crate) fn new(warmup: Duration, duration: Duration, total: u64) -> Meter {
        Meter { warmup, duration, total, first: None, start: None }
    }

    /// Records `count` processed at `now`; returns the window once it is over.
    pub(crate) fn observe(&mut self, now: Instant, count: u64) -> Option<Window> {
        if count == 0 {
            return None;
        }
        let first = *self.first.get_or_insert(now);
        if self.start.is_none() && (now.duration_since(first) >= self.warmup || count >= self.total) {
            self.start = Some((now, count));
        }
        let (t0, c0) = self.start?;
        let drained = count >= self.total;
        let elapsed = now.duration_since(t0);
        if drained || elapsed >= self.duration {
            let measured_s = elapsed.as_secs_f64();
            let measured_records = count - c0;
            return Some(Window {
                warmup_s: t0.duration_since(first).as_secs_f64(),
                measured_s,
                measured_records,
                records_per_s: if measured_s > 0.0 { measured_records as f64 / measured_s } else { 0.0 },
                drained,
            });
        }
        None
    }
}

// ------------------------------------------------------------------ raw baseline

async fn raw(args: RawArgs) -> Result<RawResult> {
    let c = &args.common;
    let loaded = crate::topology::load_topology(&c.topology, c.bootstrap.as_deref())?;
    let t = &loaded.topology;
    let records = c.records.unwrap_or(1_000_000);
    let partitions = args.partitions.unwrap_or_else(|| t.topics.get("order.created").map(|s| s.partitions).unwrap_or(6));
    let commit_interval = c.commit_interval.unwrap_or(t.defaults.commit_interval);
    let max_batch = t.defaults.max_batch;
    let run = now_ms();
    let (source, sink) = (format!("bench.raw.{run}.source"), format!("bench.raw.{run}.sink"));

    let admin: AdminClient<DefaultClientContext> = client_config(&t.broker, Side::Admin).create()?;
    let topics: Vec<NewTopic> = [&source, &sink].iter().map(|n| NewTopic::new(n, partitions, TopicReplication::Fixed(1))).collect();
    for r in admin.create_topics(&topics, &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)))).await? {
        r.map_err(|(topic, code)| anyhow::anyhow!("cannot create {topic}: {code}"))?;
    }

    // The input: encoded OrderCreated events keyed by orderId.
    let codec = Codec::load(&loaded.avro_dir(), t.broker.registry_url.as_deref())?;
    let now = now_ms();
    let mut rng = Rng(7);
    let mut input = Vec::with_capacity(records as usize);
    let mut bytes = 0usize;
    for i in 0..records {
        let o = order(i, &mut rng, now);
        let value = codec.encode("order.created", &Event::OrderCreated(o.clone())).await?;
        bytes += value.len();
        input.push((source.clone(), o.order_id, value));
    }
    let producer: FutureProducer = client_config(&t.broker, Side::Producer).create()?;
    info!(records, topic = %source, "producing the input");
    let produce_records_per_s = produce_all(&producer, input.into_iter()).await?;
    info!(records_per_s = produce_records_per_s as u64, "input produced; starting the passthrough");

    // The passthrough: the worker loop without decode, process or state.
    let consumer: StreamConsumer =
        client_config(&t.broker, Side::Consumer).set("group.id", format!("bench-raw-{run}")).create().context("consumer")?;
    consumer.subscribe(&[&source])?;
    let mut meter = Meter::new(c.warmup, c.duration, records);
    let mut processed = 0u64;
    let (mut units, mut commit_s) = (0u64, 0f64);
    let window = loop {
        let deadline = tokio::time::Instant::now() + commit_interval;
        let mut batch = Vec::new();
        while batch.len() < max_batch {
            tokio::select! {
                m = consumer.recv() => batch.push(m?.detach()),
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        if batch.is_empty() {
            continue;
        }
        let commit_started = Instant::now();
        let sends = batch.iter().map(|m| {
            let mut r = FutureRecord::<[u8], [u8]>::to(&sink);
            if let Some(k) = m.key() {
                r = r.key(k);
            }
            if let Some(v) = m.payload() {
                r = r.payload(v);
            }
            producer.send(r, Timeout::Never)
        });
        for ack in join_all(sends).await {
            ack.map_err(|(e, _)| anyhow::anyhow!("passthrough produce: {e}"))?;
        }
        let mut next: BTreeMap<i32, i64> = BTreeMap::new();
        for m in &batch {
            let e = next.entry(m.partition()).or_insert(0);
            *e = (*e).max(m.offset() + 1);
        }
        let mut tpl = TopicPartitionList::new();
        for (p, o) in next {
            tpl.add_partition_offset(&source, p, Offset::Offset(o))?;
        }
        consumer.commit(&tpl, CommitMode::Async)?;
        commit_s += commit_started.elapsed().as_secs_f64();
        units += 1;
        processed += batch.len() as u64;
        if let Some(w) = meter.observe(Instant::now(), processed) {
            break w;
        }
    };
    Ok(RawResult {
        scenario: "raw",
        records,
        value_bytes: bytes as f64 / records.max(1) as f64,
        produce_records_per_s,
        passthrough: window,
        units: Units {
            count: units,
            mean_records: processed as f64 / units.max(1) as f64,
            mean_processing_ms: 0.0,
            mean_commit_ms: commit_s * 1000.0 / units.max(1) as f64,
        },
        settings: settings(t, commit_interval, max_batch, partitions),
    })
}

// ------------------------------------------------------------------ one worker

/// The input a worker kind is benchmarked on: (topic, key, event) in production order.
fn worker_input(kind: &str, records: u64, now: i64) -> Result<Vec<(&'static str, String, Event)>> {
    let mut rng = Rng(7);
    let mut out = Vec::with_capacity(records as usize + STORES);
    match kind {
        // The saga's external inputs: stock first, then orders.
        "deduplicator" => {
            for inv in inventory(now) {
                out.push(("inventory.adjusted", store_key(&inv.hq_id, &inv.store_id), Event::InventoryAdjusted(inv)));
            }
            for i in 0..records {
                let o = order(i, &mut rng, now);
                out.push(("order.created", o.order_id.clone(), Event::OrderCreated(o)));
            }
        }
        // The repartition topic as the deduplicator writes it: keyed by store, stock first.
        "stock-reserver" => {
            for inv in inventory(now) {
                out.push(("stock.commands", store_key(&inv.hq_id, &inv.store_id), Event::InventoryAdjusted(inv)));
            }
            for i in 0..records {
                let o = order(i, &mut rng, now);
                out.push(("stock.commands", store_key(&o.hq_id, &o.store_id), Event::OrderCreated(o)));
            }
        }
        // The stock reserver's answers: every order reserved.
        "order-confirmer" => {
            for i in 0..records {
                let o = order(i, &mut rng, now);
                out.push(("stock.reserved", o.order_id.clone(), Event::StockReserved(reserved(&o, now))));
            }
        }
        other => bail!("no benchmark input for worker kind {other}: use deduplicator, stock-reserver or order-confirmer"),
    }
    Ok(out)
}

/// Records the worker `name` consumed so far, all inputs and outcomes.
fn consumed(metrics: &Metrics, name: &str, inputs: &[String]) -> u64 {
    let mut n = 0;
    for topic in inputs {
        for outcome in ["processed", "duplicate", "dead_lettered"] {
            n += metrics.consumed.with_label_values(&[name, topic.as_str(), outcome]).get();
        }
    }
    n
}

/// The worker's unit statistics from its metrics.
fn worker_units(metrics: &Metrics, name: &str, processed: u64) -> Units {
    let processing = metrics.processing.with_label_values(&[name]);
    let commit = metrics.commit.with_label_values(&[name, "ok"]);
    let count = commit.get_sample_count();
    let mean = |sum: f64, n: u64| if n > 0 { sum * 1000.0 / n as f64 } else { 0.0 };
    Units {
        count,
        mean_records: processed as f64 / count.max(1) as f64,
        // Idle units (nothing read) are observed too but take ~0: divide by the committed ones.
        mean_processing_ms: mean(processing.get_sample_sum(), count),
        mean_commit_ms: mean(commit.get_sample_sum(), count),
    }
}

async fn worker(args: WorkerArgs) -> Result<WorkerResult> {
    let c = &args.common;
    let mut loaded: Loaded = crate::topology::load_topology(&c.topology, c.bootstrap.as_deref())?;
    let name = args.name.clone();
    let state_dir = args.state_dir.clone().unwrap_or_else(|| PathBuf::from("target/bench/state").join(format!("{name}-{}", now_ms())));
    loaded.topology.defaults.state_dir = state_dir.clone();
    {
        let spec = loaded.topology.workers.get_mut(&name).with_context(|| format!("worker {name} is not in the topology"))?;
        if let Some(ci) = c.commit_interval {
            spec.commit_interval = Some(ci);
        }
    }
    let loaded = Arc::new(loaded);
    let t = &loaded.topology;
    let spec = &t.workers[&name];
    let commit_interval = spec.commit_interval(&t.defaults);
    let max_batch = spec.max_batch(&t.defaults);
    let guarantee = spec.guarantee(&t.defaults);
    if guarantee == Guarantee::ExactlyOnce {
        info!("exactly_once: the broker must support transactions (tansu 0.6.0 does not)");
    }
    let partitions = spec.inputs.first().and_then(|i| t.topics.get(i)).map(|s| s.partitions).unwrap_or(6);
    let records = c.records.unwrap_or(600_000);

    create_topics(t).await.context("creating topics")?;
    let changelog = orderflow_runtime::changelog::topic(&name);
    let watermarks = watermark_client(&t.broker, "orderflow-bench-watermarks")?;
    let mut written: Vec<String> = spec.outputs.values().cloned().collect();
    let mut dlqs: Vec<String> = spec.inputs.iter().map(|i| t.dead_letter_of(i)).collect();
    dlqs.sort();
    dlqs.dedup();
    written.extend(dlqs);
    written.push(changelog.clone());
    for topic in spec.inputs.iter().chain(&written) {
        let n = high_watermarks(&watermarks, topic, partitions)?;
        if n > 0 {
            bail!("{topic} already holds {n} records: the worker benchmark needs an empty broker (scripts/bench starts a fresh one per scenario)");
        }
    }

    // The input, produced first.
    let codec = Arc::new(Codec::load(&loaded.avro_dir(), t.broker.registry_url.as_deref())?);
    let now = now_ms();
    let events = worker_input(&spec.kind, records, now)?;
    let mut input: BTreeMap<String, u64> = BTreeMap::new();
    let mut encoded = Vec::with_capacity(events.len());
    for (topic, key, event) in events {
        *input.entry(topic.to_string()).or_default() += 1;
        encoded.push((topic.to_string(), key, codec.encode(topic, &event).await?));
    }
    let total: u64 = input.values().sum();
    let producer: FutureProducer = client_config(&t.broker, Side::Producer).create()?;
    info!(records = total, worker = %name, "producing the input");
    let produce_records_per_s = produce_all(&producer, encoded.into_iter()).await?;
    info!(records_per_s = produce_records_per_s as u64, "input produced; starting the worker");

    // The worker, in-process.
    let metrics = Metrics::new();
    let processor = crate::kinds::build(spec).with_context(|| format!("unknown kind {}", spec.kind))?;
    let w = Worker::new(WorkerSetup {
        name: name.clone(),
        topology: loaded.clone(),
        processor,
        ports: crate::kinds::ports(&spec.kind).expect("known kind"),
        codec,
        metrics: metrics.clone(),
        instance: "bench".into(),
        ready: Arc::new(AtomicBool::new(false)),
    })
    .await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let handle = tokio::spawn(w.run(stop_rx));
    let mut meter = Meter::new(c.warmup, c.duration, total);
    let give_up = Instant::now() + c.warmup + c.duration + Duration::from_secs(120);
    let window = loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if handle.is_finished() {
            handle.await??;
            bail!("worker {name} stopped by itself");
        }
        if let Some(w) = meter.observe(Instant::now(), consumed(&metrics, &name, &spec.inputs)) {
            break w;
        }
        if Instant::now() > give_up {
            bail!("worker {name} processed {} of {total} records; gave up", consumed(&metrics, &name, &spec.inputs));
        }
    };
    let _ = stop_tx.send(true);
    handle.await.context("worker task panicked")??;
    let processed_total = consumed(&metrics, &name, &spec.inputs);

    let mut writes = BTreeMap::new();
    for topic in &written {
        writes.insert(topic.clone(), high_watermarks(&watermarks, topic, partitions)?);
    }
    let all: i64 = writes.values().sum();
    let per = |n: i64| if processed_total > 0 { n as f64 / processed_total as f64 } else { 0.0 };
    let _ = std::fs::remove_dir_all(&state_dir);
    Ok(WorkerResult {
        scenario: "worker",
        worker: name,
        guarantee: guarantee.as_str(),
        input,
        produce_records_per_s,
        window,
        baseline_records_per_s: args.baseline,
        ratio_to_baseline: args.baseline.filter(|b| *b > 0.0).map(|b| window.records_per_s / b),
        processed_total,
        writes_per_input: per(all),
        changelog_writes_per_input: per(writes[&changelog]),
        writes,
        units: worker_units(&metrics, &args.name, processed_total),
        settings: settings(t, commit_interval, max_batch, partitions),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_summed_over_labels() {
        let text = "# HELP orderflow_events_consumed_total x\n# TYPE orderflow_events_consumed_total counter\n\
            orderflow_events_consumed_total{outcome=\"processed\",topic=\"a\",worker=\"w\"} 3\n\
            orderflow_events_consumed_total{outcome=\"duplicate\",topic=\"a\",worker=\"w\"} 2\n\
            orderflow_events_consumed_totalx 100\n\
            orderflow_state_restore_seconds_sum{source=\"local\",worker=\"w\"} 0.5\n\
            orderflow_state_restore_seconds_sum{source=\"changelog\",worker=\"w\"} 1.5\n\
            orderflow_state_restore_seconds_sum{source=\"changelog\",worker=\"v\"} 1\n\
            orderflow_state_restored_records_total{worker=\"w\"} 1e6\n";
        assert_eq!(metric_sum(text, "orderflow_events_consumed_total"), 5.0);
        assert_eq!(metric_sum(text, "orderflow_state_restored_records_total"), 1_000_000.0);
        assert_eq!(metric_sum(text, "missing"), 0.0);
        let by = metric_by_label(text, "orderflow_state_restore_seconds_sum", "source");
        assert_eq!(by, BTreeMap::from([("changelog".to_string(), 2.5), ("local".to_string(), 0.5)]));
    }

    #[test]
    fn http_status_and_body() {
        assert_eq!(parse_http("HTTP/1.1 503 Service Unavailable\r\ncontent-length: 9\r\n\r\nnot ready"), Some((503, "not ready".into())));
        assert_eq!(parse_http("HTTP/1.1 200 OK\r\n\r\n"), Some((200, String::new())));
        assert_eq!(parse_http(""), None);
    }

    #[test]
    fn meter_skips_the_warmup_and_stops_at_the_duration() {
        let t0 = Instant::now();
        let mut m = Meter::new(Duration::from_secs(1), Duration::from_secs(2), 1_000_000);
        assert!(m.observe(t0, 0).is_none());
        assert!(m.observe(t0, 10).is_none());
        assert!(m.observe(t0 + Duration::from_secs(1), 100).is_none());
        let w = m.observe(t0 + Duration::from_secs(3), 300).expect("window over");
        assert_eq!(w.measured_records, 200);
        assert!((w.records_per_s - 100.0).abs() < 1e-9);
        assert!(!w.drained);
    }

    #[test]
    fn meter_stops_when_drained() {
        let t0 = Instant::now();
        let mut m = Meter::new(Duration::from_secs(1), Duration::from_secs(60), 500);
        m.observe(t0, 1);
        m.observe(t0 + Duration::from_secs(1), 100);
        let w = m.observe(t0 + Duration::from_secs(2), 500).expect("drained");
        assert!(w.drained);
        assert_eq!(w.measured_records, 400);
    }

    #[test]
    fn inputs_are_deterministic_and_keyed_as_the_topology_says() {
        let a = worker_input("stock-reserver", 100, 0).unwrap();
        let b = worker_input("stock-reserver", 100, 0).unwrap();
        assert_eq!(a.len(), 100 + STORES);
        assert!(a.iter().zip(&b).all(|(x, y)| x.1 == y.1 && x.2 == y.2));
        assert!(matches!(a[0].2, Event::InventoryAdjusted(_)));
        for (_, key, e) in &a {
            assert_eq!(key, &e.store_key());
        }
        assert!(worker_input("canceller", 1, 0).is_err());
    }
}
