//! The synthetic input of the benchmarks: deterministic stores, products, orders and their answers,
//! and producing them.

use std::time::Instant;

use anyhow::Result;
use futures::StreamExt;
use orderflow_api::events::*;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;

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
                to_store_id: None,
                reason: None,
                operator: None,
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
