//! Loading the worker's state: synthetic input per kind, produced in slices until the worker has
//! consumed it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use orderflow_api::events::*;
use orderflow_api::Event;

use crate::bench::{order, produce_all, store, Rng, STORES};
use crate::kafkaio::{high_watermarks, records_held};

use super::{check_alive, consumed, memory, Ctx, Kind, Load, Proc, LOAD_SLICE};

/// The input records that take the worker from `from` to `to` state keys: (topic, key, event).
pub(super) fn load_input(
    kind: Kind,
    from: u64,
    to: u64,
    items_per_restock: usize,
    now: i64,
    rng: &mut Rng,
) -> Vec<(String, String, Event)> {
    let mut out = Vec::new();
    match kind {
        Kind::StockReserver => {
            // Products per store so that STORES × products ≥ keys; products [from, to) of each
            // store restocked in chunks.
            let per_store = |k: u64| k.div_ceil(STORES as u64);
            let (lo, hi) = (per_store(from), per_store(to));
            let chunk = items_per_restock.max(1) as u64;
            for s in 0..STORES {
                let (hq_id, store_id) = store(s);
                let mut p = lo;
                while p < hi {
                    let end = (p + chunk).min(hi);
                    let inv = InventoryAdjusted {
                        event_id: format!("bench-recovery-stock-{store_id}-{p}"),
                        occurred_at: now,
                        hq_id: hq_id.clone(),
                        store_id: store_id.clone(),
                        adjustment_type: change_reason::RESTOCK.into(),
                        reference_id: "bench-recovery".into(),
                        items: (p..end).map(|p| AdjustedItem { product_id: format!("P-B{p}"), delta: 1_000_000 }).collect(),
                        to_store_id: None,
                        reason: None,
                        operator: None,
                    };
                    let e = Event::InventoryAdjusted(inv);
                    out.push((kind.input().to_string(), e.store_key(), e));
                    p = end;
                }
            }
        }
        Kind::Deduplicator => {
            for i in from..to {
                let o = order(i, rng, now);
                out.push((kind.input().to_string(), o.order_id.clone(), Event::OrderCreated(o)));
            }
        }
    }
    out
}

/// Stock keys the stock reserver holds after a load to `keys` (whole products per store).
pub(super) fn stock_keys(keys: u64) -> u64 {
    keys.div_ceil(STORES as u64) * STORES as u64
}

/// State keys of the step's kind a worker loaded to `keys` holds.
pub(super) fn held_keys(kind: Kind, keys: u64) -> u64 {
    match kind {
        Kind::StockReserver => stock_keys(keys),
        Kind::Deduplicator => keys,
    }
}

/// Encodes and produces `events`, waiting for every acknowledgement; returns the records produced.
pub(super) async fn produce(ctx: &Ctx, events: Vec<(String, String, Event)>) -> Result<u64> {
    let mut encoded = Vec::with_capacity(events.len());
    for (topic, key, event) in events {
        let value = ctx.codec.encode(&topic, &event).await?;
        encoded.push((topic, key, value));
    }
    let n = encoded.len() as u64;
    produce_all(&ctx.producer, encoded.into_iter()).await?;
    Ok(n)
}

/// Loads the running worker from `from` to `to` state keys and waits until it is idle.
#[allow(clippy::too_many_arguments)]
pub(super) async fn load(
    ctx: &Ctx,
    proc: &mut Proc,
    name: &str,
    kind: Kind,
    changelog: &str,
    partitions: i32,
    outputs: &BTreeMap<String, String>,
    from: u64,
    to: u64,
    items_per_restock: usize,
    rng: &mut Rng,
) -> Result<Load> {
    let before = consumed(proc).await.context("reading the worker's metrics")?;
    let started = Instant::now();
    let give_up = Instant::now() + Duration::from_secs(120).max(Duration::from_millis(to - from));
    // In slices of keys, at most two produced and not yet consumed: the bench never holds a
    // million events at once, and the worker's units stay the size they have in steady
    // operation (a backlog of restocks would make a unit of hundreds of thousands of stock
    // keys, and its RSS that of the unit rather than of the state held).
    let slice = match kind {
        Kind::StockReserver => (STORES * items_per_restock.max(1)) as u64,
        Kind::Deduplicator => LOAD_SLICE,
    };
    let (mut input_records, mut at, mut ends) = (0u64, from, Vec::new());
    while at < to {
        let end = (at + slice).min(to);
        if ends.len() >= 2 {
            wait_consumed(proc, name, before + ends[ends.len() - 2] as f64, give_up).await?;
        }
        input_records += produce(ctx, load_input(kind, at, end, items_per_restock, ctx.now, rng)).await?;
        ends.push(input_records);
        at = end;
    }
    wait_consumed(proc, name, before + input_records as f64, give_up).await?;
    // Idle: the last unit's changelog records are in and nothing more comes for 0.5 s. The
    // load ends when the changelog last grew.
    let (mut last, mut grew_at, mut quiet_since) = (-1, Instant::now(), Instant::now());
    while quiet_since.elapsed() < Duration::from_millis(500) {
        let n = high_watermarks(&ctx.watermarks, changelog, partitions)?;
        if n != last {
            (last, grew_at, quiet_since) = (n, Instant::now(), Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seconds = grew_at.duration_since(started).as_secs_f64();
    let keys_added = held_keys(kind, to) - held_keys(kind, from);
    let mut output_records = 0;
    for topic in outputs.values() {
        output_records += high_watermarks(&ctx.watermarks, topic, partitions)?;
    }
    Ok(Load {
        input_records,
        keys_added,
        seconds,
        keys_per_s: keys_added as f64 / seconds.max(1e-9),
        changelog_records: records_held(&ctx.watermarks, changelog, partitions)?,
        output_records,
        memory: memory(proc.child.id())?,
    })
}

/// Waits until the worker process consumed `target` records.
pub(super) async fn wait_consumed(proc: &mut Proc, name: &str, target: f64, give_up: Instant) -> Result<()> {
    loop {
        check_alive(proc)?;
        if consumed(proc).await.is_some_and(|n| n >= target) {
            return Ok(());
        }
        if Instant::now() > give_up {
            bail!("{name} consumed {:?} of {target} records in time; log {}", consumed(proc).await, proc.log.display());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
