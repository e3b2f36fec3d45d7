//! The synthetic input of the benchmarks: deterministic stores, products, orders and their answers,
//! and producing them.

use std::time::Instant;

use anyhow::Result;
use futures::StreamExt;
use orderflow_api::events::*;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use serde::Serialize;

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
    order_in(Layout::FiveHqs, i, rng, now)
}

/// The stores, HQs and stock of the stock reserver's benchmark input (`bench worker --layout`;
/// issue 16 measures the HQ fallback against the store-only reservation on the same stores).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Layout {
    /// [`STORES`] stores under 5 HQs, every product stocked at every store.
    FiveHqs,
    /// One HQ and [`HIERARCHY_STORES`] stores, every product stocked at every store: every
    /// order is reserved at its store (the store-only reservation).
    StoreOnly,
    /// One HQ and [`HIERARCHY_STORES`] stores; every [`HQ_ONLY_EVERY`]th product is stocked only
    /// at the HQ, so an order naming one (about 12% of them) is served by an HQ fallback
    /// (request, grant, received: three records more on `stock.commands`, through the HQ's one
    /// partition).
    HqFallback,
}

/// Stores of the one-HQ layouts: seed 004's "one HQ, hundreds of stores", at 100.
pub(crate) const HIERARCHY_STORES: usize = 100;
/// In [`Layout::HqFallback`], products `P-B{p}` with `p % HQ_ONLY_EVERY == 0` are at the HQ only.
pub(crate) const HQ_ONLY_EVERY: usize = 20;

impl Layout {
    fn stores(self) -> usize {
        match self {
            Layout::FiveHqs => STORES,
            Layout::StoreOnly | Layout::HqFallback => HIERARCHY_STORES,
        }
    }

    /// Store `i` of the layout: `(hqId, storeId)`.
    pub(crate) fn store(self, i: usize) -> (String, String) {
        match self {
            Layout::FiveHqs => store(i),
            Layout::StoreOnly | Layout::HqFallback => ("HQ-H".to_string(), format!("ST-H{i:03}")),
        }
    }

    /// Whether the layout stocks product `p` at the stores (else at the HQ only).
    pub(crate) fn at_stores(self, p: usize) -> bool {
        self != Layout::HqFallback || !p.is_multiple_of(HQ_ONLY_EVERY)
    }
}

/// Order `i` of the synthetic input of `layout`: one of its stores, 1–4 distinct products of
/// [`PRODUCTS`], 1–5 units each.
pub(crate) fn order_in(layout: Layout, i: u64, rng: &mut Rng, now: i64) -> OrderCreated {
    let (hq_id, store_id) = layout.store(rng.below(layout.stores() as u64) as usize);
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
    inventory_in(Layout::FiveHqs, now)
}

/// The stock of `layout`: one restock per store of the products it stocks there, and for
/// [`Layout::HqFallback`] first one restock of every product into the HQ (store id ""); always
/// enough units that no order of the run fails for stock.
pub(crate) fn inventory_in(layout: Layout, now: i64) -> Vec<InventoryAdjusted> {
    let restock = |hq_id: String, store_id: String, products: Vec<usize>| InventoryAdjusted {
        event_id: format!("bench-stock-{hq_id}-{store_id}"),
        occurred_at: now,
        hq_id,
        store_id,
        adjustment_type: change_reason::RESTOCK.into(),
        reference_id: "bench".into(),
        items: products.into_iter().map(|p| AdjustedItem { product_id: format!("P-B{p}"), delta: 100_000_000 }).collect(),
        to_store_id: None,
        reason: None,
        operator: None,
    };
    let mut out = Vec::with_capacity(layout.stores() + 1);
    if layout == Layout::HqFallback {
        out.push(restock(layout.store(0).0, String::new(), (0..PRODUCTS).collect()));
    }
    for s in 0..layout.stores() {
        let (hq_id, store_id) = layout.store(s);
        out.push(restock(hq_id, store_id, (0..PRODUCTS).filter(|p| layout.at_stores(*p)).collect()));
    }
    out
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
