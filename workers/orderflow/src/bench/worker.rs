//! `bench worker`: one worker of the topology in-process over pre-produced input.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use orderflow_api::events::*;
use orderflow_api::Event;
use orderflow_runtime::codec::Codec;
use orderflow_runtime::kafka::{client_config, create_topics, Side};
use orderflow_runtime::metrics::Metrics;
use orderflow_runtime::topology::{Guarantee, Loaded};
use orderflow_runtime::worker::{now_ms, Worker, WorkerSetup};
use rdkafka::producer::FutureProducer;
use tokio::sync::watch;
use tracing::info;

use crate::kafkaio::{high_watermarks, watermark_client};

use super::{
    inventory, inventory_in, order, order_in, produce_all, reserved, settings, Layout, Meter, Rng, Units, WorkerArgs, WorkerResult, STORES,
};

// ------------------------------------------------------------------ one worker

/// The input a worker kind is benchmarked on: (topic, key, event) in production order.
/// `layout` (issue 16) applies to the stock reserver only.
pub(super) fn worker_input(kind: &str, layout: Layout, records: u64, now: i64) -> Result<Vec<(&'static str, String, Event)>> {
    let mut rng = Rng(7);
    let mut out = Vec::with_capacity(records as usize + STORES);
    if layout != Layout::FiveHqs && kind != "stock-reserver" {
        bail!("--layout {layout:?} is for the stock-reserver benchmark only");
    }
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
            for inv in inventory_in(layout, now) {
                out.push(("stock.commands", store_key(&inv.hq_id, &inv.store_id), Event::InventoryAdjusted(inv)));
            }
            for i in 0..records {
                let o = order_in(layout, i, &mut rng, now);
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

/// Orders the stock reserver `name` answered so far (`stock.reserved` + `stock.reservation.failed`
/// produced), the measure of the one-HQ layouts, where the input also carries the HQ protocol's
/// own records.
fn answered(metrics: &Metrics, name: &str, outputs: &BTreeMap<String, String>) -> u64 {
    ["reserved", "failed"]
        .iter()
        .filter_map(|port| outputs.get(*port))
        .map(|topic| metrics.produced.with_label_values(&[name, topic.as_str()]).get())
        .sum()
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
        commit_stages_ms: orderflow_runtime::metrics::COMMIT_STAGES
            .iter()
            .map(|stage| (stage.to_string(), mean(metrics.commit_stage.with_label_values(&[name, stage]).get_sample_sum(), count)))
            .collect(),
    }
}

/// Starts worker `name` of `loaded` in-process (instance `bench`); returns its task and the
/// sender that stops it.
///
/// Errors: an unknown kind, or the worker failing to start (broker, state store).
pub(super) async fn spawn_worker(
    loaded: &Arc<Loaded>,
    name: &str,
    codec: Arc<Codec>,
    metrics: &Metrics,
) -> Result<(tokio::task::JoinHandle<Result<(), orderflow_runtime::worker::WorkerError>>, watch::Sender<bool>)> {
    let spec = &loaded.topology.workers[name];
    let processor = crate::kinds::build(spec).with_context(|| format!("unknown kind {}", spec.kind))?;
    let w = Worker::new(WorkerSetup {
        name: name.to_string(),
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
    Ok((tokio::spawn(w.run(stop_rx)), stop_tx))
}

pub(super) async fn worker(args: WorkerArgs) -> Result<WorkerResult> {
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
    let events = worker_input(&spec.kind, args.layout, records, now)?;
    // The one-HQ layouts are measured in orders answered; the stock reserver's input there also
    // holds the records it sends itself (HQ fallback, ledger entries).
    let by_answers = args.layout != Layout::FiveHqs;
    let orders = events.iter().filter(|(_, _, e)| matches!(e, Event::OrderCreated(_))).count() as u64;
    let orders_needing_hq = events
        .iter()
        .filter(|(_, _, e)| match e {
            Event::OrderCreated(o) => {
                o.items.iter().any(|i| i.product_id.trim_start_matches("P-B").parse().is_ok_and(|p| !args.layout.at_stores(p)))
            }
            _ => false,
        })
        .count() as u64;
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
    let (handle, stop_tx) = spawn_worker(&loaded, &name, codec, &metrics).await?;
    let progress =
        |metrics: &Metrics| if by_answers { answered(metrics, &name, &spec.outputs) } else { consumed(metrics, &name, &spec.inputs) };
    let mut meter = Meter::new(c.warmup, c.duration, if by_answers { orders } else { total });
    let give_up = Instant::now() + c.warmup + c.duration + Duration::from_secs(120);
    let window = loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if handle.is_finished() {
            handle.await??;
            bail!("worker {name} stopped by itself");
        }
        if let Some(w) = meter.observe(Instant::now(), progress(&metrics)) {
            break w;
        }
        if Instant::now() > give_up {
            bail!(
                "worker {name} got to {} of {} ({}); gave up",
                progress(&metrics),
                if by_answers { orders } else { total },
                if by_answers { "orders answered" } else { "records" }
            );
        }
    };
    let _ = stop_tx.send(true);
    handle.await.context("worker task panicked")??;
    let processed_total = consumed(&metrics, &name, &spec.inputs);
    let orders_answered = answered(&metrics, &name, &spec.outputs);

    // A topic both read and written (the stock reserver's `stock.commands`) holds the bench's
    // input too: only what the worker added counts as its writes.
    let mut writes = BTreeMap::new();
    for topic in &written {
        let held = high_watermarks(&watermarks, topic, partitions)?;
        writes.insert(topic.clone(), held - input.get(topic).copied().unwrap_or(0) as i64);
    }
    let all: i64 = writes.values().sum();
    let per = |n: i64| if processed_total > 0 { n as f64 / processed_total as f64 } else { 0.0 };
    let _ = std::fs::remove_dir_all(&state_dir);
    Ok(WorkerResult {
        scenario: "worker",
        worker: name,
        layout: args.layout,
        metered: if by_answers { "orders answered" } else { "input records" },
        orders_needing_hq,
        orders_offered: orders,
        orders_answered,
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
