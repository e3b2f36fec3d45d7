//! TPC-H as a load source for the saga: turns the `tpchgen` tables into `OrderCreated` events
//! plus the initial `InventoryAdjusted` restocks: one per HQ (its unallocated stock) and one per
//! store.
//!
//! # Mapping
//!
//! * **HQ = REGION**: `hqId` = `"HQ-"` + `r_name` (spaces → `_`), e.g. `HQ-ASIA`, `HQ-MIDDLE_EAST`.
//! * **Store = NATION**: `storeId` = `"ST-"` + `n_name` (spaces → `_`), e.g. `ST-UNITED_STATES`;
//!   its HQ is the nation's region.
//! * **Product = PART**: `productId` = `"P-"` + `p_partkey`.
//! * **ORDER → one `OrderCreated`**: `orderId` = `"O-"` + `o_orderkey`, `customerId` = `"C-"` +
//!   `o_custkey`, store = the customer's nation, HQ = that nation's region, `eventId` =
//!   `"tpch-order-"` + `o_orderkey`, `occurredAt` = `base_time_ms` + position in the list (0, 1, …).
//!   Items are the order's LINEITEMs: `quantity` = `l_quantity`, `unitPrice` =
//!   `l_extendedprice / l_quantity` in cents (the part's retail price). Lines of one order that
//!   name the same part (rare) are merged into one item with the summed quantity.
//! * **Initial stock**: for every store and every part ordered at that store, on-hand =
//!   `max(0, round(stock_scale × Σ_suppliers ps_availqty / 25))` (PARTSUPP availability spread
//!   over the 25 nations, then scaled). Of each such figure the store gets
//!   `round((1 − hq_share) × on-hand)` and its HQ keeps the rest unallocated (seed 004: new stock
//!   arrives at HQ first; a store that is short is served from there, issue 16). One
//!   `InventoryAdjusted` per HQ (`storeId` empty, `eventId` `"tpch-stock-"` + `hqId`, the sum of
//!   its stores' HQ parts per part) and then one per store (`eventId` `"tpch-stock-"` +
//!   `storeId`), both `adjustmentType` `RESTOCK`, `referenceId` `tpch-initial-stock`,
//!   `occurredAt` = `base_time_ms − 1`, listing every item with units > 0 as `delta`; an HQ or
//!   store with no such item gets no event.
//!
//! `max_orders` keeps the first N orders by order key, and the stock is computed for those orders
//! only. Everything is deterministic: the same options give the same events, ids included.
//! [`DEFAULT_STOCK_SCALE`] is calibrated so that all-or-nothing reservation of the SF 0.01 orders
//! in order fails for insufficient stock for about 30% of them with no stock at HQ, and
//! [`DEFAULT_HQ_SHARE`] puts a quarter of it at HQ, where the fallback serves part of the short
//! orders ([`simulate`] models both; the example
//! `tpch_calibrate` prints the share for a range of scales:
//! `cargo run --release -p orderflow --example tpch_calibrate`).
//!
//! Free-text columns (comments) are not used, so the generators run on a small private text pool
//! instead of `tpchgen`'s 300 MiB default one; the key, quantity, price and availability columns
//! come from their own random streams and are identical to `tpchgen`'s standard output (checked
//! by the test `matches_the_standard_tables`).

use std::collections::{BTreeMap, BTreeSet};

use orderflow_api::events::{change_reason, AdjustedItem, InventoryAdjusted, OrderCreated, OrderItem};
use tpchgen::distribution::Distributions;
use tpchgen::generators::{CustomerGenerator, LineItemGenerator, NationGenerator, OrderGenerator, PartSuppGenerator, RegionGenerator};
use tpchgen::text::TextPool;

/// Default [`TpchOptions::stock_scale`]: with it, reserving the SF 0.01 orders one after the
/// other (all-or-nothing, a reservation holds its stock) fails for insufficient stock for 29.5%
/// of them. Fewer orders fail with a truncated list (8.8% of the first 1,000), since each
/// (store, part) pair then sees less demand; use about 0.07 there for a similar share.
pub const DEFAULT_STOCK_SCALE: f64 = 0.1;

/// Default [`TpchOptions::hq_share`]: a quarter of the initial stock stays unallocated at HQ, so
/// the demo shows HQ fallbacks served and refused (issue 16). With it, [`simulate`] of the SF 0.01
/// orders (15,000) fails 14.8% of them (2,226, each after its HQ refused the fallback) and serves
/// 6,165 by a fallback; of the first 1,000, 73 fail and 168 are served by a fallback.
pub const DEFAULT_HQ_SHARE: f64 = 0.25;

/// `referenceId` of the initial restock events.
pub const INITIAL_STOCK_REFERENCE: &str = "tpch-initial-stock";

/// Number of TPC-H nations (= stores); PARTSUPP availability is spread evenly over them.
const NATIONS: f64 = 25.0;

/// Size of the private text pool. Only comments are drawn from it and they are discarded; it
/// must merely exceed the longest comment (~200 bytes).
const TEXT_POOL_BYTES: i32 = 64 * 1024;

/// What to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct TpchOptions {
    /// TPC-H scale factor; 0.01 gives 15,000 orders, 1 gives 1.5 million. Must be ≥ 0.0001
    /// (at least one supplier).
    pub scale_factor: f64,
    /// Keep only the first N orders (by order key); `None` keeps all of them.
    pub max_orders: Option<usize>,
    /// Multiplier of the initial stock (see the module docs); finite and ≥ 0.
    pub stock_scale: f64,
    /// Share of the initial stock kept unallocated at HQ, in `[0, 1]` (see the module docs).
    pub hq_share: f64,
    /// `occurredAt` of the first order, ms since the epoch; order *i* gets `base_time_ms + i`,
    /// the restock events `base_time_ms − 1`.
    pub base_time_ms: i64,
}

impl Default for TpchOptions {
    /// SF 0.01, all orders, [`DEFAULT_STOCK_SCALE`], [`DEFAULT_HQ_SHARE`], `base_time_ms` 0.
    fn default() -> Self {
        TpchOptions { scale_factor: 0.01, max_orders: None, stock_scale: DEFAULT_STOCK_SCALE, hq_share: DEFAULT_HQ_SHARE, base_time_ms: 0 }
    }
}

/// The generated events, ready to publish: first `inventory` (to `inventory.adjusted`), then
/// `orders` (to `order.created`) in list order.
#[derive(Debug, Clone, PartialEq)]
pub struct TpchInput {
    /// One `RESTOCK` per HQ that keeps stock (region-key order), then one per store that has
    /// stock (nation-key order).
    pub inventory: Vec<InventoryAdjusted>,
    /// One `OrderCreated` per TPC-H order, in order-key order.
    pub orders: Vec<OrderCreated>,
    /// Distinct stores the orders go to (≤ 25).
    pub stores: usize,
    /// Distinct products the orders name.
    pub products: usize,
}

/// Generates the orders and the initial stock described in the module docs.
///
/// Deterministic; SF 0.01 takes a few tens of milliseconds in release builds.
///
/// # Panics
///
/// If `scale_factor` is not finite or below 0.0001, `stock_scale` is negative or not finite, or
/// `hq_share` is outside `[0, 1]`.
pub fn generate(opts: &TpchOptions) -> TpchInput {
    let sf = opts.scale_factor;
    assert!(sf.is_finite() && (10_000.0 * sf) as i64 >= 1, "TPC-H scale factor must be finite and at least 0.0001, got {sf}");
    assert!(
        opts.stock_scale.is_finite() && opts.stock_scale >= 0.0,
        "stock_scale must be finite and non-negative, got {}",
        opts.stock_scale
    );
    assert!((0.0..=1.0).contains(&opts.hq_share), "hq_share must be within [0, 1], got {}", opts.hq_share);

    let dists = Distributions::static_default();
    let pool = TextPool::new(TEXT_POOL_BYTES, dists);

    // REGION → HQ ids, NATION → (store id, region key).
    let hqs: Vec<String> =
        RegionGenerator::new_with_distributions_and_text_pool(dists, &pool).iter().map(|r| format!("HQ-{}", id_part(r.r_name))).collect();
    let nations: Vec<(String, usize)> = NationGenerator::new_with_distributions_and_text_pool(dists, &pool)
        .iter()
        .map(|n| (format!("ST-{}", id_part(n.n_name)), n.n_regionkey as usize))
        .collect();

    // CUSTOMER → nation key, indexed by custkey − 1.
    let customer_nation: Vec<usize> =
        CustomerGenerator::new_with_distributions_and_text_pool(sf, 1, 1, dists, &pool).iter().map(|c| c.c_nationkey as usize).collect();

    // ORDERS zipped with LINEITEM (both come out in order-key order).
    let limit = opts.max_orders.unwrap_or(usize::MAX);
    let order_gen = OrderGenerator::new_with_distributions_and_text_pool(sf, 1, 1, dists, &pool);
    let line_gen = LineItemGenerator::new_with_distributions_and_text_pool(sf, 1, 1, dists, &pool);
    let mut lines = line_gen.iter().peekable();
    let capacity = limit.min(OrderGenerator::calculate_row_count(sf, 1, 1) as usize);
    let mut orders = Vec::with_capacity(capacity);
    // Per nation key: the parts ordered there (sorted, for a deterministic inventory).
    let mut demand: Vec<BTreeSet<i64>> = vec![BTreeSet::new(); nations.len()];
    let mut all_parts: BTreeSet<i64> = BTreeSet::new();

    for (index, order) in order_gen.iter().take(limit).enumerate() {
        let key = order.o_orderkey;
        // (partkey, quantity, unit price); merge repeated parts, keep first-seen order.
        let mut items: Vec<(i64, i64, i64)> = Vec::with_capacity(7);
        while let Some(line) = lines.next_if(|l| l.l_orderkey == key) {
            let quantity = line.l_quantity;
            let unit_price = line.l_extendedprice.into_inner() / quantity;
            match items.iter_mut().find(|(p, _, _)| *p == line.l_partkey) {
                Some(item) => item.1 += quantity,
                None => items.push((line.l_partkey, quantity, unit_price)),
            }
        }
        debug_assert!(!items.is_empty(), "TPC-H order {key} has no line items");

        let nation = customer_nation[(order.o_custkey - 1) as usize];
        let (store_id, region) = &nations[nation];
        for &(part, _, _) in &items {
            demand[nation].insert(part);
            all_parts.insert(part);
        }
        orders.push(OrderCreated {
            event_id: format!("tpch-order-{key}"),
            occurred_at: opts.base_time_ms + index as i64,
            order_id: format!("O-{key}"),
            customer_id: format!("C-{}", order.o_custkey),
            hq_id: hqs[*region].clone(),
            store_id: store_id.clone(),
            items: items
                .into_iter()
                .map(|(part, quantity, unit_price)| OrderItem { product_id: product_id(part), quantity: quantity as i32, unit_price })
                .collect(),
        });
    }

    // PARTSUPP → Σ ps_availqty per ordered part (parts are 1..=max, four suppliers each).
    let mut available: BTreeMap<i64, i64> = all_parts.iter().map(|&p| (p, 0)).collect();
    if let Some(&max_part) = all_parts.last() {
        for ps in PartSuppGenerator::new_with_text_pool(sf, 1, 1, &pool).iter() {
            if ps.ps_partkey > max_part {
                break;
            }
            if let Some(sum) = available.get_mut(&ps.ps_partkey) {
                *sum += i64::from(ps.ps_availqty);
            }
        }
    }

    // Per store: (part, units at the store); per region: part → units kept at its HQ.
    let mut at_hq: Vec<BTreeMap<i64, i64>> = vec![BTreeMap::new(); hqs.len()];
    let mut at_stores: Vec<Vec<(i64, i64)>> = Vec::with_capacity(nations.len());
    for ((_, region), parts) in nations.iter().zip(&demand) {
        let mut lines = Vec::with_capacity(parts.len());
        for part in parts {
            let on_hand = initial_on_hand(available[part], opts.stock_scale);
            let store_part = ((1.0 - opts.hq_share) * on_hand as f64).round() as i64;
            *at_hq[*region].entry(*part).or_default() += on_hand - store_part;
            lines.push((*part, store_part));
        }
        at_stores.push(lines);
    }
    let restock = |hq_id: &str, store_id: &str, lines: &mut dyn Iterator<Item = (i64, i64)>| {
        let items: Vec<AdjustedItem> = lines
            .filter(|(_, units)| *units > 0)
            .map(|(part, units)| AdjustedItem { product_id: product_id(part), delta: units })
            .collect();
        (!items.is_empty()).then(|| InventoryAdjusted {
            event_id: format!("tpch-stock-{}", if store_id.is_empty() { hq_id } else { store_id }),
            occurred_at: opts.base_time_ms - 1,
            hq_id: hq_id.to_string(),
            store_id: store_id.to_string(),
            adjustment_type: change_reason::RESTOCK.to_string(),
            reference_id: INITIAL_STOCK_REFERENCE.to_string(),
            items,
            to_store_id: None,
            reason: None,
            operator: None,
        })
    };
    let hq_events = hqs.iter().zip(&at_hq).filter_map(|(hq_id, parts)| restock(hq_id, "", &mut parts.iter().map(|(p, u)| (*p, *u))));
    let store_events = nations
        .iter()
        .zip(&at_stores)
        .filter_map(|((store_id, region), lines)| restock(&hqs[*region], store_id, &mut lines.iter().copied()));
    let inventory = hq_events.chain(store_events).collect();

    TpchInput { inventory, orders, stores: demand.iter().filter(|parts| !parts.is_empty()).count(), products: all_parts.len() }
}

/// Initial on-hand of one part at one store from the part's total PARTSUPP availability.
fn initial_on_hand(total_availqty: i64, stock_scale: f64) -> i64 {
    (stock_scale * total_availqty as f64 / NATIONS).round().max(0.0) as i64
}

fn product_id(partkey: i64) -> String {
    format!("P-{partkey}")
}

/// A TPC-H name as an id fragment: spaces become `_` (`UNITED STATES` → `UNITED_STATES`).
fn id_part(name: &str) -> String {
    name.trim().replace(' ', "_")
}

/// Outcome of reserving every order of an input in list order, all-or-nothing, with no
/// releases, and the HQ fallback of issue 16 (an order short at its store takes the missing
/// units from its HQ's unallocated stock when the HQ has them all): how [`DEFAULT_STOCK_SCALE`]
/// and [`DEFAULT_HQ_SHARE`] are calibrated (the tests, and the example `tpch_calibrate`:
/// `cargo run --release -p orderflow --example tpch_calibrate`). Not used by the binary itself.
#[allow(dead_code)]
#[derive(Debug)]
pub struct Simulation {
    pub orders: usize,
    pub failed: usize,
    /// Orders short at their store that the HQ served.
    pub fallbacks_served: usize,
    /// Orders short at their store that the HQ could not serve (among `failed`).
    pub fallbacks_refused: usize,
}

#[allow(dead_code)]
impl Simulation {
    /// Share of the orders that failed.
    pub fn share(&self) -> f64 {
        self.failed as f64 / self.orders as f64
    }
}

/// Reserves every order of `input` in list order against its initial stock ([`Simulation`]).
#[allow(dead_code)]
pub fn simulate(input: &TpchInput) -> Simulation {
    // (hqId, storeId or "" for the HQ's unallocated units, productId) → units left.
    let mut left: std::collections::HashMap<(&str, &str, &str), i64> = std::collections::HashMap::new();
    for adj in &input.inventory {
        for item in &adj.items {
            *left.entry((&adj.hq_id, &adj.store_id, &item.product_id)).or_default() += item.delta;
        }
    }
    let mut sim = Simulation { orders: input.orders.len(), failed: 0, fallbacks_served: 0, fallbacks_refused: 0 };
    for order in &input.orders {
        let (hq, store) = (order.hq_id.as_str(), order.store_id.as_str());
        // Per item: (product, units from the store, units missing there).
        let plan: Vec<(&str, i64, i64)> = order
            .items
            .iter()
            .map(|item| {
                let at_store = left.get(&(hq, store, item.product_id.as_str())).copied().unwrap_or(0);
                let wanted = i64::from(item.quantity);
                (item.product_id.as_str(), wanted.min(at_store), (wanted - at_store).max(0))
            })
            .collect();
        let short = plan.iter().any(|(_, _, missing)| *missing > 0);
        let hq_has = |(p, _, missing): &(&str, i64, i64)| left.get(&(hq, "", *p)).copied().unwrap_or(0) >= *missing;
        if short && !plan.iter().all(hq_has) {
            sim.failed += 1;
            sim.fallbacks_refused += 1;
            continue;
        }
        sim.fallbacks_served += usize::from(short);
        for (p, from_store, missing) in plan {
            *left.entry((hq, store, p)).or_default() -= from_store;
            *left.entry((hq, "", p)).or_default() -= missing;
        }
    }
    sim
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{HashMap, HashSet};

    fn sf001() -> &'static TpchInput {
        static INPUT: std::sync::OnceLock<TpchInput> = std::sync::OnceLock::new();
        INPUT.get_or_init(|| generate(&TpchOptions::default()))
    }

    #[test]
    fn sf001_has_the_tpch_sizes() {
        let input = sf001();
        assert_eq!(input.orders.len(), 15_000);
        assert_eq!(input.stores, 25);
        assert!(input.products > 1_900 && input.products <= 2_000, "{}", input.products);
        // 5 HQs (their unallocated stock), then 25 stores.
        assert_eq!(input.inventory.len(), 30);
        assert!(input.inventory[..5].iter().all(|a| a.store_id.is_empty()));
        let lines: usize = input.orders.iter().map(|o| o.items.len()).sum();
        // SF 0.01 has 60,175 LINEITEM rows; a few repeated parts per order are merged.
        assert!(lines <= 60_175 && lines > 60_000, "{lines}");
        println!("SF 0.01: {lines} items from 60,175 line items");
        let mut event_ids = HashSet::new();
        for order in &input.orders {
            assert!(event_ids.insert(order.event_id.as_str()));
            assert!((1..=7).contains(&order.items.len()));
            for item in &order.items {
                // l_quantity is 1..=50; merged repeats of a part can exceed 50.
                assert!((1..=350).contains(&item.quantity), "{item:?}");
                assert!(item.unit_price > 0);
            }
        }
        for adj in &input.inventory {
            assert!(event_ids.insert(adj.event_id.as_str()));
        }
    }

    #[test]
    fn ids_follow_the_mapping() {
        let input = generate(&TpchOptions { max_orders: Some(50), base_time_ms: 1_000, ..TpchOptions::default() });
        let first = &input.orders[0];
        assert_eq!(first.order_id, "O-1");
        assert_eq!(first.event_id, "tpch-order-1");
        assert_eq!(first.occurred_at, 1_000);
        assert_eq!(input.orders[49].occurred_at, 1_049);
        // TPC-H order keys are sparse: 1..=7, then 32..
        assert_eq!(input.orders[8].order_id, "O-33");
        let regions: HashMap<&str, &str> = [
            ("ST-UNITED_STATES", "HQ-AMERICA"),
            ("ST-JAPAN", "HQ-ASIA"),
            ("ST-GERMANY", "HQ-EUROPE"),
            ("ST-SAUDI_ARABIA", "HQ-MIDDLE_EAST"),
            ("ST-KENYA", "HQ-AFRICA"),
        ]
        .into();
        for (store, hq) in regions {
            let adj = sf001().inventory.iter().find(|a| a.store_id == store).expect(store);
            assert_eq!(adj.hq_id, hq);
            assert_eq!(adj.event_id, format!("tpch-stock-{store}"));
            assert_eq!(adj.adjustment_type, "RESTOCK");
            assert_eq!(adj.reference_id, "tpch-initial-stock");
            assert_eq!(adj.occurred_at, -1);
        }
        for hq in ["HQ-AFRICA", "HQ-AMERICA", "HQ-ASIA", "HQ-EUROPE", "HQ-MIDDLE_EAST"] {
            let adj = sf001().inventory.iter().find(|a| a.hq_id == hq && a.store_id.is_empty()).expect(hq);
            assert_eq!(adj.event_id, format!("tpch-stock-{hq}"));
            assert_eq!(adj.adjustment_type, "RESTOCK");
        }
        for order in &sf001().orders {
            assert!(order.customer_id.starts_with("C-"));
            assert!(order.items.iter().all(|i| i.product_id.starts_with("P-")));
            let adj = sf001().inventory.iter().find(|a| a.store_id == order.store_id).unwrap();
            assert_eq!(adj.hq_id, order.hq_id);
        }
    }

    /// The columns we use match `tpchgen`'s standard generators (default text pool).
    #[test]
    fn matches_the_standard_tables() {
        let input = generate(&TpchOptions { max_orders: Some(200), ..TpchOptions::default() });
        let customers: Vec<_> = CustomerGenerator::new(0.01, 1, 1).iter().map(|c| c.c_nationkey).collect();
        let nations: Vec<_> = NationGenerator::default().iter().map(|n| (n.n_name.to_string(), n.n_regionkey)).collect();
        let regions: Vec<_> = RegionGenerator::default().iter().map(|r| r.r_name.to_string()).collect();
        let mut lines = LineItemGenerator::new(0.01, 1, 1).iter().peekable();
        for (order, expected) in input.orders.iter().zip(OrderGenerator::new(0.01, 1, 1).iter()) {
            assert_eq!(order.order_id, format!("O-{}", expected.o_orderkey));
            assert_eq!(order.customer_id, format!("C-{}", expected.o_custkey));
            let (nation, region) = &nations[customers[(expected.o_custkey - 1) as usize] as usize];
            assert_eq!(order.store_id, format!("ST-{}", nation.replace(' ', "_")));
            assert_eq!(order.hq_id, format!("HQ-{}", regions[*region as usize].replace(' ', "_")));
            let mut total = 0;
            while let Some(line) = lines.next_if(|l| l.l_orderkey == expected.o_orderkey) {
                let item = order.items.iter().find(|i| i.product_id == format!("P-{}", line.l_partkey)).unwrap();
                assert_eq!(item.unit_price * line.l_quantity, line.l_extendedprice.into_inner());
                total += line.l_quantity;
            }
            assert_eq!(order.items.iter().map(|i| i64::from(i.quantity)).sum::<i64>(), total);
        }
        // Availability of one part at the first store, by hand: its share of the nation's part.
        let adj = input.inventory.iter().find(|a| !a.store_id.is_empty()).unwrap();
        let item = &adj.items[0];
        let part: i64 = item.product_id[2..].parse().unwrap();
        let sum: i64 =
            PartSuppGenerator::new(0.01, 1, 1).iter().filter(|ps| ps.ps_partkey == part).map(|ps| i64::from(ps.ps_availqty)).sum();
        let nation_part = (DEFAULT_STOCK_SCALE * sum as f64 / 25.0).round();
        assert_eq!(item.delta, ((1.0 - DEFAULT_HQ_SHARE) * nation_part).round() as i64);
    }

    #[test]
    fn is_deterministic() {
        let opts = TpchOptions { max_orders: Some(500), ..TpchOptions::default() };
        assert_eq!(generate(&opts), generate(&opts));
    }

    #[test]
    fn max_orders_truncates_and_stocks_only_what_is_ordered() {
        let input = generate(&TpchOptions { max_orders: Some(1_000), ..TpchOptions::default() });
        assert_eq!(input.orders.len(), 1_000);
        assert_eq!(input.orders[..], sf001().orders[..1_000]);
        let ordered: HashSet<(&str, &str)> =
            input.orders.iter().flat_map(|o| o.items.iter().map(move |i| (o.store_id.as_str(), i.product_id.as_str()))).collect();
        let products: HashSet<&str> = ordered.iter().map(|(_, p)| *p).collect();
        assert_eq!(input.products, products.len());
        assert!(input.stores <= 25);
        for adj in input.inventory.iter().filter(|a| !a.store_id.is_empty()) {
            for item in &adj.items {
                assert!(item.delta > 0);
                assert!(ordered.contains(&(adj.store_id.as_str(), item.product_id.as_str())));
            }
        }
        // Stock per (store, product) does not depend on the truncation.
        let full: HashMap<(&str, &str), i64> = sf001()
            .inventory
            .iter()
            .flat_map(|a| a.items.iter().map(move |i| ((a.store_id.as_str(), i.product_id.as_str()), i.delta)))
            .collect();
        for adj in input.inventory.iter().filter(|a| !a.store_id.is_empty()) {
            for item in &adj.items {
                assert_eq!(full[&(adj.store_id.as_str(), item.product_id.as_str())], item.delta);
            }
        }
    }

    #[test]
    fn zero_stock_scale_gives_no_inventory_and_every_order_fails() {
        let input = generate(&TpchOptions { max_orders: Some(100), stock_scale: 0.0, ..TpchOptions::default() });
        assert!(input.inventory.is_empty());
        assert_eq!(simulate(&input).failed, 100);
    }

    #[test]
    #[should_panic(expected = "scale factor")]
    fn rejects_a_zero_scale_factor() {
        generate(&TpchOptions { scale_factor: 0.0, ..TpchOptions::default() });
    }

    #[test]
    fn default_stock_scale_fails_about_30_percent_of_sf001_without_hq_stock() {
        let sim = simulate(&generate(&TpchOptions { hq_share: 0.0, ..TpchOptions::default() }));
        println!("SF 0.01, stock_scale {DEFAULT_STOCK_SCALE}, nothing at HQ: {sim:?}, failure share {:.3}", sim.share());
        assert!((0.20..=0.35).contains(&sim.share()), "{sim:?} share {}", sim.share());
        assert_eq!(sim.fallbacks_served, 0);
        let small = simulate(&generate(&TpchOptions { max_orders: Some(1_000), ..TpchOptions::default() }));
        println!("SF 0.01, max_orders 1000: {small:?}, failure share {:.3}", small.share());
    }

    /// The default split shows the fallback both ways, and moving stock to HQ moves units
    /// without creating or losing any: per region and part, HQ + Σ stores = the store-only total.
    #[test]
    fn default_hq_share_serves_and_refuses_fallbacks_and_keeps_every_unit() {
        let sim = simulate(sf001());
        println!("SF 0.01, hq_share {DEFAULT_HQ_SHARE}: {sim:?}, failure share {:.3}", sim.share());
        assert!(sim.fallbacks_served > 500 && sim.fallbacks_refused > 500, "{sim:?}");
        let totals = |input: &TpchInput| {
            let mut t: BTreeMap<(String, String), i64> = BTreeMap::new();
            for a in &input.inventory {
                for i in &a.items {
                    *t.entry((a.hq_id.clone(), i.product_id.clone())).or_default() += i.delta;
                }
            }
            t
        };
        let store_only = generate(&TpchOptions { hq_share: 0.0, ..TpchOptions::default() });
        assert!(store_only.inventory.iter().all(|a| !a.store_id.is_empty()));
        assert_eq!(totals(sf001()), totals(&store_only));
        let all_at_hq = generate(&TpchOptions { hq_share: 1.0, max_orders: Some(300), ..TpchOptions::default() });
        assert!(all_at_hq.inventory.iter().all(|a| a.store_id.is_empty()));
    }
}
