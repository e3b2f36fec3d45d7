//! The two measurements: throughput to a terminal state, and latency at fixed offered loads.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use futures::{FutureExt as _, StreamExt as _};
use rdkafka::producer::FutureRecord;
use tracing::{info, warn};

use crate::bench::{produce_all, Meter};
use crate::demo::port_topic;

use super::{
    backlog_limit, due, due_at, percentiles, quiesce, snapshot, writes_per_order, LatencyResult, LoadResult, Mode, Rig, SagaArgs,
    ThroughputResult, Track, TARGET_RATIO,
};

// ------------------------------------------------------------------ throughput

pub(super) async fn throughput(args: &SagaArgs) -> Result<ThroughputResult> {
    let started = Instant::now();
    let c = &args.common;
    let n = c.records.unwrap_or(60_000);
    let rig = Rig::start(args).await?;
    let before = quiesce(&rig.watermarks, &rig.counted, Duration::from_secs(60)).await?;
    let load = rig.book.lock().expect("book").new_load();

    let mut records = Vec::with_capacity(n as usize);
    for seq in 0..n {
        let (key, bytes) = rig.next_order(seq, load, true).await?;
        records.push(("order.created".to_string(), key, bytes));
    }
    info!(orders = n, "producing the orders");
    let producer = rig.producer.clone();
    let produce = tokio::spawn(async move {
        let rate = produce_all(&producer, records.into_iter()).await;
        (rate, Instant::now())
    });

    let mut meter = Meter::new(c.warmup, c.duration, n);
    let mut first: Option<Instant> = None;
    let give_up = Instant::now() + c.warmup + c.duration + args.settle_timeout + Duration::from_secs(60);
    let window = loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = Instant::now();
        let terminal = rig.book.lock().expect("book").loads[load].terminal;
        if terminal > 0 {
            first.get_or_insert(now);
        }
        if let Some(w) = meter.observe(now, terminal) {
            break w;
        }
        if now > give_up {
            bail!("{terminal} of {n} orders terminal; gave up (logs in {})", rig.run_dir.display());
        }
    };
    let (rate, produced_at) = produce.await.context("producer task")?;
    let produce_orders_per_s = rate?;
    let window_start = first.expect("window over") + Duration::from_secs_f64(window.warmup_s);
    info!(orders_per_s = window.records_per_s as u64, drained = window.drained, "window over");

    let settle = Instant::now() + args.settle_timeout;
    while rig.book.lock().expect("book").loads[load].terminal < n && Instant::now() < settle {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    quiesce(&rig.watermarks, &rig.counted, Duration::from_secs(60)).await?;
    let (counts, outcomes) = {
        let b = rig.book.lock().expect("book");
        (b.loads[load].clone(), b.outcomes.clone())
    };
    let pos = (rig.pos.completed.load(Ordering::Relaxed) as i64, rig.pos.cancelled.load(Ordering::Relaxed) as i64);
    let loaded = rig.loaded.clone();
    let t = &loaded.topology;
    let (commit_interval_ms, settings_, workers_ready_s, stock_applied_s, stock_lines) =
        (rig.commit_intervals(), rig.settings(), rig.workers_ready_s, rig.stock_applied_s, rig.stock_lines);
    let guarantees = rig.guarantees();
    let counted = rig.counted.clone();
    let (workers, watermarks, run_dir) = rig.stop().await?;

    let after = snapshot(&watermarks, &counted)?;
    let added: BTreeMap<String, i64> = after.iter().map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0))).collect();
    let bench = BTreeMap::from([("order.created".to_string(), n as i64)]);
    let pos_writes = BTreeMap::from([("order.completed".to_string(), pos.0), (port_topic(t, "canceller", "cancelled")?, pos.1)]);
    let changelogs: BTreeSet<String> =
        t.workers.iter().filter(|(_, w)| !w.is_source()).map(|(n, _)| orderflow_runtime::changelog::topic(n)).collect();
    let writes = writes_per_order(&added, &bench, &pos_writes, &changelogs, n);
    let limit = args.baseline.filter(|b| *b > 0.0 && writes.per_order > 0.0).map(|b| b / writes.per_order);
    let span = match (counts.first_terminal, counts.last_terminal) {
        (Some(a), Some(b)) if b > a => b.duration_since(a).as_secs_f64(),
        _ => 0.0,
    };
    let _ = std::fs::remove_dir_all(&run_dir);
    Ok(ThroughputResult {
        scenario: "saga",
        measure: "throughput",
        mode: args.mode.as_str(),
        processes: match args.mode {
            Mode::OneProcess => 1,
            Mode::ProcessPerWorker => t.workers.len(),
        },
        guarantees,
        commit_interval_ms,
        orders: n,
        produce_orders_per_s,
        produced_before_window: produced_at <= window_start,
        orders_per_s: window.records_per_s,
        window,
        first_to_last_orders_per_s: if span > 0.0 { counts.terminal as f64 / span } else { 0.0 },
        outcomes,
        without_terminal: n - counts.terminal.min(n),
        baseline_records_per_s: args.baseline,
        broker_bound_orders_per_s: limit,
        ratio_to_limit: limit.map(|l| window.records_per_s / l),
        target_ratio: TARGET_RATIO,
        writes,
        workers,
        workers_ready_s,
        stock_applied_s,
        stock_lines,
        wall_s: started.elapsed().as_secs_f64(),
        settings: settings_,
    })
}

// ------------------------------------------------------------------ latency

pub(super) async fn latency(args: &SagaArgs) -> Result<LatencyResult> {
    let started = Instant::now();
    let c = &args.common;
    if args.loads.is_empty() || args.loads.contains(&0) {
        bail!("--loads needs at least one rate, each > 0 orders/s");
    }
    let rig = Rig::start(args).await?;
    let mut seq = 0u64;
    let mut loads = Vec::new();
    for &target in &args.loads {
        loads.push(offer_load(&rig, target, c.warmup, c.duration, args.settle_timeout, &mut seq).await?);
    }
    let outcomes = rig.book.lock().expect("book").outcomes.clone();
    let (commit_interval_ms, settings_, workers_ready_s) = (rig.commit_intervals(), rig.settings(), rig.workers_ready_s);
    let guarantees = rig.guarantees();
    let processes = rig.procs.len();
    let (workers, _, run_dir) = rig.stop().await?;
    let _ = std::fs::remove_dir_all(&run_dir);
    Ok(LatencyResult {
        scenario: "saga",
        measure: "latency",
        mode: args.mode.as_str(),
        processes,
        guarantees,
        commit_interval_ms,
        warmup_s: c.warmup.as_secs_f64(),
        duration_s: c.duration.as_secs_f64(),
        loads,
        outcomes,
        workers,
        workers_ready_s,
        wall_s: started.elapsed().as_secs_f64(),
        settings: settings_,
    })
}

/// Offers `target` orders/s for `warmup + duration` (or until the backlog is too large), then
/// waits for the load's orders to be answered and terminal.
pub(super) async fn offer_load(
    rig: &Rig,
    target: u32,
    warmup: Duration,
    duration: Duration,
    settle: Duration,
    seq: &mut u64,
) -> Result<LoadResult> {
    let load = rig.book.lock().expect("book").new_load();
    let rate = target as f64;
    let limit = backlog_limit(rate);
    info!(target, "offering a load");
    let t0 = tokio::time::Instant::now();
    let total = warmup + duration;
    let (mut sent, mut max_backlog, mut gave_up) = (0u64, 0u64, false);
    let mut in_flight = futures::stream::FuturesUnordered::new();
    loop {
        let elapsed = t0.elapsed();
        if elapsed >= total {
            break;
        }
        let due_now = due(rate, elapsed);
        while sent < due_now {
            let (key, bytes) = rig.next_order(*seq, load, elapsed >= warmup).await?;
            *seq += 1;
            // Enqueued now (not when a future is first polled), so records leave on schedule.
            let delivery = rig
                .producer
                .send_result(FutureRecord::to("order.created").key(&key).payload(&bytes))
                .map_err(|(e, _)| anyhow::anyhow!("producing order.created: {e}"))?;
            in_flight.push(delivery);
            sent += 1;
        }
        while let Some(Some(ack)) = in_flight.next().now_or_never() {
            ack.context("producer dropped")?.map_err(|(e, _)| anyhow::anyhow!("producing order.created: {e}"))?;
        }
        let backlog = sent - rig.book.lock().expect("book").loads[load].answered;
        max_backlog = max_backlog.max(backlog);
        if backlog > limit {
            warn!(target, backlog, "the saga is not keeping up: giving up this load");
            gave_up = true;
            break;
        }
        tokio::time::sleep_until((t0 + due_at(rate, sent)).min(t0 + total)).await;
    }
    let offered_s = t0.elapsed().as_secs_f64();
    let offer_end = Instant::now();
    while let Some(ack) = in_flight.next().await {
        ack.context("producer dropped")?.map_err(|(e, _)| anyhow::anyhow!("producing order.created: {e}"))?;
    }
    let deadline = Instant::now() + settle;
    loop {
        let l = rig.book.lock().expect("book").loads[load].clone();
        if (l.answered >= sent && l.terminal >= sent) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let b = rig.book.lock().expect("book");
    let counts = b.loads[load].clone();
    let of_load: Vec<&Track> = b.orders.values().filter(|tr| tr.load == load).collect();
    let window_orders = of_load.iter().filter(|tr| tr.measured).count() as u64;
    let latency_includes_warmup = window_orders == 0;
    let latencies: Vec<i64> = of_load.iter().filter(|tr| tr.measured || latency_includes_warmup).filter_map(|tr| tr.latency_ms).collect();
    let offered_orders_per_s = if offered_s > 0.0 { sent as f64 / offered_s } else { 0.0 };
    let unanswered = sent - counts.answered.min(sent);
    let result = LoadResult {
        target_orders_per_s: target,
        offered_orders_per_s,
        orders: sent,
        window_orders,
        offered_s,
        latency_ms: percentiles(latencies),
        latency_includes_warmup,
        unanswered,
        without_terminal: sent - counts.terminal.min(sent),
        max_backlog,
        gave_up,
        drain_s: counts.last_answer.map(|a| a.saturating_duration_since(offer_end).as_secs_f64()).unwrap_or(0.0),
        kept_up: !gave_up && unanswered == 0 && offered_orders_per_s >= 0.9 * rate,
    };
    info!(target, offered = offered_orders_per_s as u64, kept_up = result.kept_up, latency = ?result.latency_ms, "load done");
    Ok(result)
}
