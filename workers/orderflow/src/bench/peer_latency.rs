//! Latency at fixed offered loads for `bench peer` (issue 18: "p50/p99 latency at fixed offered
//! loads", the same harness for orderflow and the Kafka Streams peer).
//!
//! With a side running and caught up, [`offer`] produces new orders to `stock.commands` on a fixed
//! schedule (`rate` orders/s for `duration`, each stamped with its wall-clock creation time in
//! `occurredAt` just before it is sent); the side's `read_committed` answer reader
//! ([`super::peer`]'s `Answers`) notes when each answer arrives. An order's latency is created →
//! its answer read, in milliseconds, so it includes both commit intervals' worth of waiting a
//! `read_committed` reader sees (the side's transaction commit). Both sides run on one machine,
//! so one clock serves both ends.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context as _, Result};
use futures::{FutureExt as _, StreamExt as _};
use orderflow_api::events::store_key;
use orderflow_api::Event;
use orderflow_runtime::codec::Codec;
use orderflow_runtime::worker::now_ms;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::Serialize;
use tracing::info;

use super::saga::{due, due_at, percentiles, Percentiles};
use super::{order_in, Layout, Rng};

/// Order ids of the latency phase start with this, then `<label>-<rate>-<n>`.
pub const LATENCY_PREFIX: &str = "O-LAT-";

/// One offered load on one side.
#[derive(Debug, Serialize)]
pub struct LatencyResult {
    /// The schedule's rate, orders/s.
    pub target_orders_per_s: u32,
    /// Orders produced over the schedule's time (short of the target when the producer lagged).
    pub offered_orders_per_s: f64,
    pub orders: u64,
    /// Created → answer read, ms; `None` when nothing was answered.
    pub latency_ms: Option<Percentiles>,
    /// Orders not answered within the settle time after the schedule ended.
    pub unanswered: u64,
}

/// Offers `rate` orders/s for `duration` on `stock.commands`, then waits up to `settle` for their
/// answers (`arrivals`: order id → the ms its answer was read, filled by the side's answer
/// reader) and returns the latency percentiles.
///
/// Errors: the producer refusing a record.
pub async fn offer(
    producer: &FutureProducer,
    codec: &Codec,
    label: &str,
    rate: u32,
    duration: Duration,
    settle: Duration,
    arrivals: &dyn Fn(&str) -> BTreeMap<String, i64>,
) -> Result<LatencyResult> {
    let prefix = format!("{LATENCY_PREFIX}{label}-{rate}-");
    let mut rng = Rng(17 + rate as u64);
    let mut created: BTreeMap<String, i64> = BTreeMap::new();
    let mut in_flight = futures::stream::FuturesUnordered::new();
    let t0 = tokio::time::Instant::now();
    let fail = |e: rdkafka::error::KafkaError| anyhow::anyhow!("producing stock.commands: {e}");
    loop {
        let elapsed = t0.elapsed();
        if elapsed >= duration {
            break;
        }
        while (created.len() as u64) < due(rate as f64, elapsed) {
            let n = created.len() as u64;
            let mut o = order_in(Layout::FiveHqs, n, &mut rng, now_ms());
            o.order_id = format!("{prefix}{n}");
            o.event_id = format!("lat-{label}-{rate}-{n}");
            let key = store_key(&o.hq_id, &o.store_id);
            let at = now_ms();
            o.occurred_at = at;
            let value = codec.encode("stock.commands", &Event::OrderCreated(o.clone())).await?;
            let delivery = producer.send_result(FutureRecord::to("stock.commands").key(&key).payload(&value)).map_err(|(e, _)| fail(e))?;
            in_flight.push(delivery);
            created.insert(o.order_id, at);
        }
        while let Some(Some(ack)) = in_flight.next().now_or_never() {
            ack.context("producer dropped")?.map_err(|(e, _)| fail(e))?;
        }
        tokio::time::sleep_until((t0 + due_at(rate as f64, created.len() as u64)).min(t0 + duration)).await;
    }
    let offered_s = t0.elapsed().as_secs_f64();
    while let Some(ack) = in_flight.next().await {
        ack.context("producer dropped")?.map_err(|(e, _)| fail(e))?;
    }
    let deadline = tokio::time::Instant::now() + settle;
    let mut answered = arrivals(&prefix);
    while answered.len() < created.len() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        answered = arrivals(&prefix);
    }
    let latencies: Vec<i64> = created.iter().filter_map(|(o, at)| answered.get(o).map(|read| (read - at).max(0))).collect();
    let result = LatencyResult {
        target_orders_per_s: rate,
        offered_orders_per_s: created.len() as f64 / offered_s.max(1e-9),
        orders: created.len() as u64,
        unanswered: (created.len() - latencies.len()) as u64,
        latency_ms: percentiles(latencies),
    };
    info!(label, rate, latency = ?result.latency_ms, unanswered = result.unanswered, "offered load done");
    Ok(result)
}
