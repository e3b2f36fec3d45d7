//! `bench raw`: the measurement window ([`Meter`]) and the raw rdkafka passthrough baseline.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use orderflow_api::Event;
use orderflow_runtime::codec::Codec;
use orderflow_runtime::kafka::{client_config, Side};
use orderflow_runtime::worker::now_ms;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use tracing::info;

use super::{create_bench_topics, order, produce_all, settings, RawArgs, RawResult, Rng, Units, Window};

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

pub(super) async fn raw(args: RawArgs) -> Result<RawResult> {
    let c = &args.common;
    let loaded = crate::topology::load_topology(&c.topology, c.bootstrap.as_deref())?;
    let t = &loaded.topology;
    let records = c.records.unwrap_or(1_000_000);
    let partitions = args.partitions.unwrap_or_else(|| t.topics.get("order.created").map(|s| s.partitions).unwrap_or(6));
    let commit_interval = c.commit_interval.unwrap_or(t.defaults.commit_interval);
    let max_batch = t.defaults.max_batch;
    let run = now_ms();
    let (source, sink) = (format!("bench.raw.{run}.source"), format!("bench.raw.{run}.sink"));

    create_bench_topics(&t.broker, &[source.clone(), sink.clone()], partitions).await?;

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
        let records = batch.iter().map(|m| {
            let mut r = FutureRecord::<[u8], [u8]>::to(&sink);
            if let Some(k) = m.key() {
                r = r.key(k);
            }
            if let Some(v) = m.payload() {
                r = r.payload(v);
            }
            r
        });
        let records = records.collect();
        // The workers' own send path, so the baseline pays what they pay.
        for ack in orderflow_runtime::kafka::send_in_order(&producer, records).await {
            ack.map_err(|e| anyhow::anyhow!("passthrough produce: {e}"))?;
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
            commit_stages_ms: BTreeMap::new(),
        },
        settings: settings(t, commit_interval, max_batch, partitions),
    })
}
