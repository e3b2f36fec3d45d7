//! The demo's summary: the stock as the reserver's changelog holds it, the per-order outcomes and
//! latencies, records per topic, and printing it.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{Context as _, Result};
use orderflow_api::events::*;

use super::{HqSummary, Observed, OrderTrack, SeedResult, StoreSummary, Summary, SEED_HQ};

/// The stock reserver's figures as its changelog holds them: every partition restored from the
/// changelog alone into a scratch store, so the summary checks the durable copy of the state,
/// whichever processes wrote it.
pub(super) struct Durable {
    /// (storeKey, productId) → (on hand, reserved).
    pub(super) stores: BTreeMap<(String, String), stock_reserver::StockRecord>,
    /// (hqId, productId) → the HQ's figures (issue 16).
    pub(super) hqs: BTreeMap<(String, String), stock_reserver::HqStock>,
}

/// Reads [`Durable`] of worker `reserver`, restoring it into `scratch`.
///
/// Errors: the restore (broker, changelog), a key without a product, a record that does not parse.
pub(super) fn read_stock(t: &orderflow_runtime::topology::Topology, reserver: &str, scratch: &std::path::Path) -> Result<Durable> {
    let mut out = Durable { stores: BTreeMap::new(), hqs: BTreeMap::new() };
    let split = |k: &[u8], prefix: &[u8]| -> Result<(String, String)> {
        let key = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
        let (owner, product) = key.rsplit_once('/').context("stock key without product")?;
        Ok((owner.to_string(), product.to_string()))
    };
    for shard in crate::kafkaio::restore_worker_state(t, reserver, scratch)? {
        for (k, v) in shard.scan(stock_reserver::STOCK_PREFIX)? {
            out.stores.insert(split(&k, stock_reserver::STOCK_PREFIX)?, serde_json::from_slice(&v)?);
        }
        for (k, v) in shard.scan(stock_reserver::HQ_PREFIX)? {
            out.hqs.insert(split(&k, stock_reserver::HQ_PREFIX)?, serde_json::from_slice(&v)?);
        }
    }
    Ok(out)
}

/// The HQ of a store key `hqId:storeId`.
fn hq_of(store_key: &str) -> &str {
    store_key.split_once(':').map_or(store_key, |(hq, _)| hq)
}

/// Checks every HQ and product (issue 16, seed 004): the ledger's total = initial (HQ and
/// stores) − sold = unallocated + Σ stores' on hand, nothing in transit at rest, nothing below
/// zero, and the last `stock.updated` row read ends at the same total. Returns the per-HQ sums
/// and the broken rules.
fn check_hqs(o: &Observed, initial: &BTreeMap<(String, String), i64>, stock: &Durable) -> (Vec<HqSummary>, Vec<String>) {
    // (hqId, productId) → (initial, sold, Σ on hand at its stores).
    let mut figures: BTreeMap<(String, String), (i64, i64, i64)> = BTreeMap::new();
    let hq_product = |(store, product): &(String, String)| (hq_of(store).to_string(), product.clone());
    for (key, units) in initial {
        figures.entry(hq_product(key)).or_default().0 += units;
    }
    for (key, units) in &o.sold {
        figures.entry(hq_product(key)).or_default().1 += units;
    }
    for (key, rec) in &stock.stores {
        figures.entry(hq_product(key)).or_default().2 += rec.on_hand;
    }
    for key in stock.hqs.keys() {
        figures.entry(key.clone()).or_default();
    }
    let mut violations = Vec::new();
    let mut hqs: BTreeMap<String, HqSummary> = BTreeMap::new();
    for ((hq, product), (init, sold, at_stores)) in figures {
        let rec = stock.hqs.get(&(hq.clone(), product.clone())).copied().unwrap_or_default();
        let expected = init - sold;
        let read = o.last_hq_total.get(&(hq.clone(), product.clone())).copied();
        let mut broken = |what: String| violations.push(format!("{hq}/{product}: {what}"));
        if rec.total() != expected {
            broken(format!("HQ total {} != initial {init} − sold {sold}", rec.total()));
        }
        if rec.stores != at_stores {
            broken(format!("HQ ledger's stores {} != Σ stores' on hand {at_stores}", rec.stores));
        }
        if rec.in_transit != 0 {
            broken(format!("{} units still in transit at rest", rec.in_transit));
        }
        if rec.unallocated < 0 || rec.stores < 0 || rec.in_transit < 0 {
            broken(format!("negative HQ figure {rec:?}"));
        }
        if read.is_some_and(|r| r != expected) {
            broken(format!("last stock.updated row read ends at HQ total {read:?}, expected {expected}"));
        }
        let ok = rec.total() == expected
            && rec.stores == at_stores
            && rec.in_transit == 0
            && rec.unallocated >= 0
            && read.is_none_or(|r| r == expected);
        let h = hqs.entry(hq.clone()).or_insert_with(|| HqSummary {
            hq: hq.clone(),
            products: 0,
            initial: 0,
            sold: 0,
            unallocated: 0,
            in_transit: 0,
            at_stores: 0,
            total: 0,
            holds: true,
        });
        h.products += 1;
        h.initial += init;
        h.sold += sold;
        h.unallocated += rec.unallocated;
        h.in_transit += rec.in_transit;
        h.at_stores += at_stores;
        h.total += rec.total();
        h.holds &= ok;
    }
    (hqs.into_values().collect(), violations)
}

pub(super) fn summarize(
    o: &Observed,
    initial: &BTreeMap<(String, String), i64>,
    durable: &Durable,
    t: &orderflow_runtime::topology::Topology,
    ttl: Duration,
    wall: Duration,
) -> Result<Summary> {
    let mut by_outcome: BTreeMap<String, usize> = BTreeMap::new();
    let mut pos_decisions: BTreeMap<String, usize> = BTreeMap::new();
    let mut late_sales = 0;
    let mut latencies: Vec<i64> = o.orders.values().filter_map(|t| t.confirm_latency_ms).collect();
    latencies.sort_unstable();
    let pct = |q: f64| latencies.get(((latencies.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or(0);
    let confirm_latency_ms = BTreeMap::from([("p50".to_string(), pct(0.5)), ("p99".to_string(), pct(0.99)), ("max".to_string(), pct(1.0))]);
    let mut without = Vec::new();
    let mut several = Vec::new();
    // Live reservations by (store, product), from the events: reserved, neither released nor sold.
    let mut live: BTreeMap<(String, String), i64> = BTreeMap::new();
    for (id, tr) in &o.orders {
        *by_outcome.entry(tr.outcome()).or_default() += 1;
        if tr.late_sale() {
            late_sales += 1;
        }
        if let Some(d) = tr.pos {
            *pos_decisions.entry(d.to_string()).or_default() += 1;
        }
        match tr.outcomes() {
            0 => without.push(id.clone()),
            1 => {}
            _ => several.push(id.clone()),
        }
        if tr.reserved && !tr.released && tr.sales.is_empty() {
            for (p, q) in &tr.items {
                *live.entry((tr.store.clone(), p.clone())).or_default() += *q as i64;
            }
        }
    }
    without.sort();
    several.sort();
    let stock = &durable.stores;
    let (hqs, mut violations) = check_hqs(o, initial, durable);
    let mut negative = o.negative_rows.clone();
    let mut stores: BTreeMap<String, StoreSummary> = BTreeMap::new();
    // Store figures: the HQ's own initial stock (key `hqId:`) is checked by check_hqs.
    let keys: BTreeSet<&(String, String)> = initial.keys().chain(stock.keys()).filter(|(store, _)| !store.ends_with(':')).collect();
    for key in keys {
        let init = initial.get(key).copied().unwrap_or(0);
        let rec = stock.get(key).cloned().unwrap_or(stock_reserver::StockRecord { on_hand: 0, reserved: 0 });
        let sold = o.sold.get(key).copied().unwrap_or(0);
        let moved = o.moved.get(key).copied().unwrap_or(0);
        let available = rec.on_hand - rec.reserved;
        let expected_live = live.get(key).copied().unwrap_or(0);
        let ok = init + moved == available + rec.reserved + sold && rec.reserved == expected_live;
        if !ok {
            violations.push(format!(
                "{}/{}: initial {init} + moved {moved} != available {available} + reserved {} + sold {sold} (live reservations from events: {expected_live})",
                key.0, key.1, rec.reserved
            ));
        }
        if rec.on_hand < 0 || rec.reserved < 0 || available < 0 {
            negative.push(format!("{}/{}: on hand {}, reserved {}", key.0, key.1, rec.on_hand, rec.reserved));
        }
        let s = stores.entry(key.0.clone()).or_insert_with(|| StoreSummary {
            store: key.0.clone(),
            products: 0,
            initial: 0,
            moved: 0,
            available: 0,
            reserved: 0,
            sold: 0,
            conserved: true,
        });
        s.products += 1;
        s.initial += init;
        s.moved += moved;
        s.available += available;
        s.reserved += rec.reserved;
        s.sold += sold;
        s.conserved &= ok;
    }

    // Events per topic from the high watermarks (the SQLite engine reports them correctly).
    let mut events_per_topic = BTreeMap::new();
    let mut topics: Vec<String> = t.topics.keys().cloned().collect();
    topics.extend(t.dead_letter_topics().into_keys());
    let watermarks = watermark_client(t)?;
    for topic in topics {
        let n = records_in(&watermarks, t, &topic)?;
        events_per_topic.insert(topic, n);
    }

    let seed = |id: &str| o.orders.get(id).cloned().unwrap_or_default();
    let s1 = seed("SEED-000-1");
    let s2 = seed("SEED-000-2");
    let describe = |tr: &OrderTrack| {
        let failed = tr.failed.as_ref().map(|f| {
            f.items
                .iter()
                .map(|i| format!("{} requested {} available {}", i.product_id, i.requested, i.available))
                .collect::<Vec<_>>()
                .join(", ")
        });
        format!("{} ({})", tr.outcome(), failed.unwrap_or_else(|| "no failure event".into()))
    };
    let p001_left = durable.stores.get(&(store_key(SEED_HQ, "ST-SEED-2"), "P-001".into())).map(|r| r.on_hand - r.reserved);
    let seeds = vec![
        SeedResult {
            scenario: "seed 000 scenario 1: P-001 ×10, stock 5".into(),
            expected: "ORDER_CANCELLED/INSUFFICIENT_STOCK (P-001 requested 10 available 5)".into(),
            observed: describe(&s1),
            pass: s1.outcome() == "ORDER_CANCELLED/INSUFFICIENT_STOCK"
                && s1.failed.as_ref().is_some_and(|f| {
                    f.items.len() == 1 && f.items[0].product_id == "P-001" && f.items[0].requested == 10 && f.items[0].available == 5
                }),
        },
        SeedResult {
            scenario: "seed 000 scenario 2: P-001 ×5 (stock 10), P-002 ×3 (stock 1)".into(),
            expected: "ORDER_CANCELLED/INSUFFICIENT_STOCK naming only P-002 (requested 3 available 1); P-001 stays 10 available".into(),
            observed: format!(
                "{}; P-001 available {}",
                describe(&s2),
                p001_left.map(|v| v.to_string()).unwrap_or_else(|| "unknown".into())
            ),
            pass: s2.outcome() == "ORDER_CANCELLED/INSUFFICIENT_STOCK"
                && s2.failed.as_ref().is_some_and(|f| {
                    f.items.len() == 1 && f.items[0].product_id == "P-002" && f.items[0].requested == 3 && f.items[0].available == 1
                })
                && p001_left == Some(10),
        },
    ];
    Ok(Summary {
        orders: o.orders.len(),
        by_outcome,
        pos_decisions,
        late_sales,
        confirm_latency_ms,
        without_terminal_outcome: without,
        with_several_outcomes: several,
        events_per_topic,
        distinct_events_per_topic: o.distinct.clone(),
        duplicate_records: o.duplicates,
        stores: stores.into_values().collect(),
        hqs,
        hq_fallbacks: o.fallbacks.iter().map(|(step, ids)| (step.clone(), ids.len())).collect(),
        hq_fallback_units: o.fallback_units,
        conservation_violations: violations,
        negative_stock: negative,
        payload_conflicts: o.payload_conflicts.clone(),
        seed_scenarios: seeds,
        outbox: None,
        wall_seconds: wall.as_secs_f64(),
        ttl_seconds: ttl.as_secs_f64(),
    })
}

/// A client for [`records_in`].
pub(super) fn watermark_client(t: &orderflow_runtime::topology::Topology) -> Result<rdkafka::consumer::BaseConsumer> {
    crate::kafkaio::watermark_client(&t.broker, "orderflow-demo-watermarks")
}

/// Records in `topic` (sum of high − low watermarks over its declared partitions; a `.dlq`
/// topic has its source's partitions).
pub(super) fn records_in(
    consumer: &rdkafka::consumer::BaseConsumer,
    t: &orderflow_runtime::topology::Topology,
    topic: &str,
) -> Result<i64> {
    let partitions = t.topics.get(topic).or_else(|| t.topics.get(topic.trim_end_matches(".dlq"))).map(|s| s.partitions).unwrap_or(1);
    crate::kafkaio::records_held(consumer, topic, partitions)
}

pub(super) fn print_summary(s: &Summary) {
    println!("\n== orders by final state ({} orders)", s.orders);
    for (k, v) in &s.by_outcome {
        println!("  {k:40} {v:>7}  {:>5.1}%", *v as f64 * 100.0 / s.orders.max(1) as f64);
    }
    println!("  without a terminal outcome: {}   with several: {}", s.without_terminal_outcome.len(), s.with_several_outcomes.len());
    println!("  POS decisions on confirmed orders: {:?}", s.pos_decisions);
    println!("  late sales (paid after the reservation expired, deducted all the same): {}", s.late_sales);
    println!("  created → confirmed read (ms): {:?}", s.confirm_latency_ms);
    println!("\n== events per topic");
    for (k, v) in &s.events_per_topic {
        println!("  {k:40} {v:>7}");
    }
    println!("\n== stock conservation per store (initial + moved from/to the HQ = available + reserved + sold)");
    println!("  {:30} {:>8} {:>10} {:>8} {:>10} {:>9} {:>9}  ok", "store", "products", "initial", "moved", "available", "reserved", "sold");
    for st in &s.stores {
        println!(
            "  {:30} {:>8} {:>10} {:>8} {:>10} {:>9} {:>9}  {}",
            st.store,
            st.products,
            st.initial,
            st.moved,
            st.available,
            st.reserved,
            st.sold,
            if st.conserved { "yes" } else { "NO" }
        );
    }
    println!("\n== HQ stock (issue 16: total = unallocated + in transit + Σ stores = initial − sold)");
    println!(
        "  {:18} {:>8} {:>10} {:>8} {:>11} {:>10} {:>10} {:>10}  ok",
        "HQ", "products", "initial", "sold", "unallocated", "in transit", "at stores", "total"
    );
    for h in &s.hqs {
        println!(
            "  {:18} {:>8} {:>10} {:>8} {:>11} {:>10} {:>10} {:>10}  {}",
            h.hq,
            h.products,
            h.initial,
            h.sold,
            h.unallocated,
            h.in_transit,
            h.at_stores,
            h.total,
            if h.holds { "yes" } else { "NO" }
        );
    }
    let step = |k: &str| s.hq_fallbacks.get(k).copied().unwrap_or(0);
    println!(
        "  HQ fallbacks: {} requested, {} served ({} units from HQ), {} refused",
        step(allocation_step::FALLBACK_REQUEST),
        step(allocation_step::FALLBACK_GRANT),
        s.hq_fallback_units,
        step(allocation_step::FALLBACK_DENY)
    );
    println!(
        "  violations: {}   negative stock: {}   payload conflicts: {}",
        s.conservation_violations.len(),
        s.negative_stock.len(),
        s.payload_conflicts.len()
    );
    for v in s.conservation_violations.iter().chain(&s.negative_stock).take(10) {
        println!("    {v}");
    }
    println!("\n== seed 000 scenarios");
    for sd in &s.seed_scenarios {
        println!(
            "  [{}] {}\n        expected {}\n        observed {}",
            if sd.pass { "PASS" } else { "FAIL" },
            sd.scenario,
            sd.expected,
            sd.observed
        );
    }
    if let Some(o) = &s.outbox {
        print_outbox(o);
    }
    println!("\nwall time {:.1}s (reservation TTL {:.0}s)", s.wall_seconds, s.ttl_seconds);
}

fn print_outbox(o: &super::OutboxSummary) {
    println!("\n== outbox (reference order service on {}, {} writers; read back from the database)", o.database, o.writers);
    let rows: Vec<String> = o.rows_by_status.iter().map(|(k, v)| format!("{k} {v}")).collect();
    println!("  order.created rows by status: {}   orders rows: {}", rows.join(", "), o.orders_rows);
    println!("  orders rejected by the order service: {} {:?}", o.rejected_orders, o.rejected);
    let lag = |k: &str| o.publish_lag_ms.get(k).copied().unwrap_or(0);
    println!(
        "  publish lag (published_at − created_at, ms): p50 {}, p99 {}, max {}, mean {:.0}; seed 003 target mean ≤ {:.0} ms: {}",
        lag("p50"),
        lag("p99"),
        lag("max"),
        o.publish_lag_mean_ms,
        o.lag_target_mean_ms,
        if o.lag_target_met { "met" } else { "NOT met" }
    );
}
