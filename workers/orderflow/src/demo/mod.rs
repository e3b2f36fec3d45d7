//! The main job: TPC-H orders and the two seed 000 scenarios through the whole saga, on a real
//! broker, with a POS simulator closing confirmed orders, ending in a summary (orders by final
//! state and reason, events per topic, stock conservation per store, the outbox, wall time).
//!
//! Orders enter through the reference order service ([`order_service`], seed 002): it writes each
//! order and its `order.created` outbox row in one database transaction, and the topology's
//! outbox relay publishes the rows. `--direct` produces `order.created` straight instead.

pub mod tpch;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use orderflow_api::events::*;
use orderflow_api::Event;
use orderflow_runtime::codec::Codec;
use orderflow_runtime::kafka::{client_config, create_topics, Side};
use orderflow_runtime::metrics::Metrics;
use orderflow_runtime::worker::now_ms;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;
use tokio::sync::watch;
use tracing::info;

mod inputs;
mod order_service;
mod summary;

pub(crate) use inputs::*;
use order_service::{OrderService, OutboxSummary, Placed};
use summary::*;

/// `orderflow demo` flags.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    #[arg(long, default_value = "topology.toml")]
    topology: PathBuf,
    /// Bootstrap servers of the broker (e.g. started by scripts/broker.sh).
    #[arg(long, env = "ORDERFLOW_BOOTSTRAP")]
    bootstrap: Option<String>,
    /// TPC-H scale factor (0.01 = 15,000 orders).
    #[arg(long, default_value_t = 0.01)]
    scale_factor: f64,
    /// Keep only the first N TPC-H orders.
    #[arg(long)]
    orders: Option<usize>,
    /// Initial stock = this × Σ ps_availqty / 25 per store and part (see README "TPC-H mapping").
    #[arg(long)]
    stock_scale: Option<f64>,
    /// Share of that stock kept unallocated at the HQ (region), in [0, 1]: stores that run
    /// short are served from it by the HQ fallback (issue 16; 0 puts everything at the stores).
    #[arg(long, default_value_t = tpch::DEFAULT_HQ_SHARE, value_parser = parse_share)]
    hq_share: f64,
    /// Reservation TTL of this run (overrides the topology's 5 minutes so expiries are seen).
    /// With `--external-workers`, start the workers with the same `--reservation-ttl`.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    ttl: Duration,
    /// Percent of confirmed orders the POS completes (payment taken).
    #[arg(long, default_value_t = 70)]
    complete_pct: u32,
    /// Percent of confirmed orders whose payment fails (POS sends order.cancelled PAYMENT_FAILED).
    /// The rest are left to expire.
    #[arg(long, default_value_t = 15)]
    payment_fail_pct: u32,
    /// Pay every order the POS completes at its reservation's expiry, give or take up to this
    /// much (a stable per-order offset), instead of at once: drives the race between payment and
    /// expiry on purpose (issue 13). Payments after the expiry become late sales or refunds.
    #[arg(long, value_parser = humantime::parse_duration)]
    pay_at_expiry: Option<Duration>,
    /// Add this many orders for one unit of a scarce product (`P-HOT` at `HQ-SEED:ST-HOT`, stock
    /// a fifth of them), spread through the run: with `--pay-at-expiry`, late payments find the
    /// units gone and are refunded (issue 13).
    #[arg(long, default_value_t = 0)]
    hot_orders: usize,
    /// Orders per second offered (0 = as fast as the producer goes).
    #[arg(long, default_value_t = 0)]
    rate: u32,
    /// Give up waiting for terminal outcomes after this long past the last order.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    settle_timeout: Duration,
    /// Write the summary as JSON here too.
    #[arg(long)]
    json: Option<PathBuf>,
    /// State directory of this run (default: a fresh folder under the topology's state_dir).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Do not start workers: they run as separate processes (`orderflow run`), e.g. under a
    /// chaos test. The demo then only drives input, plays POS and checks the outcome.
    /// With `--external-workers`, the outbox relay runs in those processes: give them the same
    /// `ORDERFLOW_DATABASE_URL`.
    #[arg(long)]
    external_workers: bool,
    /// Produce `order.created` straight to the broker, as before issue 15, instead of through the
    /// reference order service and the outbox relay (for comparisons and benchmarks; no database).
    #[arg(long)]
    direct: bool,
    /// Database of the reference order service and the outbox relay (`sqlite:…`, `postgres://…`,
    /// `mysql://…`). Default: the topology's outbox-relay `database_url` (SQLite: `outbox.db` in
    /// this run's state folder).
    /// Its demo tables and `order.created` outbox rows are emptied at start.
    #[arg(long, env = "ORDERFLOW_DATABASE_URL")]
    database_url: Option<String>,
    /// Concurrent writer tasks of the order service (each one transaction at a time).
    #[arg(long, default_value_t = 4)]
    writers: usize,
}

/// Final outcome of one order as read back from the topics.
#[derive(Debug, Default, Clone)]
struct OrderTrack {
    store: String,
    items: Vec<(String, i32)>,
    reserved: bool,
    failed: Option<StockReservationFailed>,
    confirmed: Option<OrderConfirmed>,
    /// Distinct order.cancelled eventIds → (reason, refund required).
    cancellations: BTreeMap<String, (String, bool)>,
    /// Sale deductions seen (distinct stock.updated eventIds).
    sales: BTreeSet<String>,
    /// The POS took payment (it produced `order.completed`).
    paid: bool,
    released: bool,
    pos: Option<&'static str>,
    confirm_latency_ms: Option<i64>,
}

impl OrderTrack {
    /// Refund-required cancellations (issue 13).
    fn refunds(&self) -> impl Iterator<Item = &String> {
        self.cancellations.values().filter(|(_, refund)| *refund).map(|(reason, _)| reason)
    }
    /// How many terminal verdicts the order has: a paid order's are its sale and its
    /// refund-required cancellations (an earlier `RESERVATION_EXPIRED` cancellation before a late
    /// sale or a refund is not a second verdict, issue 13); an unpaid order's are its
    /// cancellations.
    fn outcomes(&self) -> usize {
        let paid = usize::from(!self.sales.is_empty()) + self.refunds().count();
        if paid > 0 {
            paid
        } else {
            self.cancellations.len()
        }
    }
    /// Sold after a cancellation: the reservation had expired (or was cancelled) and the payment
    /// was deducted all the same (a late sale, issue 13).
    fn late_sale(&self) -> bool {
        !self.sales.is_empty() && !self.cancellations.is_empty()
    }
    /// Settled: a terminal outcome, and a paid order's verdict (its sale or refund) seen.
    fn settled(&self) -> bool {
        self.outcomes() >= 1 && (!self.paid || !self.sales.is_empty() || self.refunds().next().is_some())
    }
    fn outcome(&self) -> String {
        let refund = self.refunds().next();
        match (refund, self.cancellations.values().next(), self.sales.is_empty()) {
            (Some(_), _, false) => "CONFLICT".into(),
            (Some(reason), _, true) => format!("ORDER_CANCELLED/{reason}"),
            (None, _, false) => "ORDER_COMPLETED".into(),
            (None, Some((reason, _)), true) => format!("ORDER_CANCELLED/{reason}"),
            (None, None, true) if self.confirmed.is_some() => "PAYMENT_WAIT".into(),
            (None, None, true) => "ORDER_CREATED".into(),
        }
    }
}

#[derive(Default)]
struct Observed {
    orders: HashMap<String, OrderTrack>,
    /// (storeKey, productId) → units sold.
    sold: BTreeMap<(String, String), i64>,
    /// (storeKey, productId) → units a store's on-hand figure moved other than by a sale or a
    /// restock (issue 16: units from and back to the HQ, distributions, transfers, corrections),
    /// Σ `changeAmount` of its `stock.updated` rows.
    moved: BTreeMap<(String, String), i64>,
    /// (hqId, productId) → the HQ total of the last `stock.updated` row read (rows of one
    /// product arrive in order: the HQ's ledger publishes them all, keyed by productId).
    last_hq_total: BTreeMap<(String, String), i64>,
    /// `stock.updated` rows with a figure below zero.
    negative_rows: Vec<String>,
    /// HQ fallback protocol records read on the reserver's commands topic: step → distinct
    /// eventIds (`FALLBACK_REQUEST`, `FALLBACK_GRANT`, `FALLBACK_DENY`).
    fallbacks: BTreeMap<String, BTreeSet<String>>,
    /// Units the HQs granted (Σ items of the distinct `FALLBACK_GRANT` records).
    fallback_units: i64,
    inventory_updates: usize,
    distinct: BTreeMap<String, u64>,
    duplicates: u64,
    /// eventId → (topic first seen on, its value).
    seen_ids: HashMap<String, (String, Vec<u8>)>,
    payload_conflicts: Vec<String>,
}

impl Observed {
    /// Counts one HQ fallback record of the stock hierarchy protocol (other steps are left out).
    fn allocation(&mut self, a: &StockAllocation) {
        let fallback = [allocation_step::FALLBACK_REQUEST, allocation_step::FALLBACK_GRANT, allocation_step::FALLBACK_DENY];
        if fallback.contains(&a.step.as_str())
            && self.fallbacks.entry(a.step.clone()).or_default().insert(a.event_id.clone())
            && a.step == allocation_step::FALLBACK_GRANT
        {
            self.fallback_units += a.items.iter().map(|i| i.quantity).sum::<i64>();
        }
    }

    /// Books one `stock.updated` row: a sale (units sold, the order's sales), a restock (the
    /// initial stock's progress), any other move of a store's figure, the HQ total it ends
    /// with, and a figure below zero.
    fn stock_row(&mut self, u: &StockUpdated) {
        let store = (store_key(&u.hq_id, &u.store_id), u.product_id.clone());
        match u.change_reason.as_str() {
            change_reason::SALE => {
                *self.sold.entry(store).or_default() -= u.change_amount;
                if let Some(tr) = self.orders.get_mut(&u.reference_id) {
                    tr.sales.insert(u.event_id.clone());
                }
            }
            change_reason::RESTOCK => self.inventory_updates += 1,
            _ => {
                self.inventory_updates += 1;
                if !u.store_id.is_empty() {
                    *self.moved.entry(store).or_default() += u.change_amount;
                }
            }
        }
        let hq_total = u.hq_stock.as_ref().map(|l| l.current);
        if let Some(total) = hq_total {
            self.last_hq_total.insert((u.hq_id.clone(), u.product_id.clone()), total);
        }
        if u.store_stock.current < 0 || hq_total.is_some_and(|t| t < 0) {
            let row =
                format!("{} {}/{}/{}: store {}, HQ {hq_total:?}", u.event_id, u.hq_id, u.store_id, u.product_id, u.store_stock.current);
            self.negative_rows.push(row);
        }
    }
}

/// The demo's summary (also written as JSON with `--json`).
#[derive(Debug, Serialize)]
pub struct Summary {
    pub orders: usize,
    pub by_outcome: BTreeMap<String, usize>,
    /// What the POS simulator did with confirmed orders (`late` = confirmation read within 2 s
    /// of the reservation's expiry, left to expire).
    pub pos_decisions: BTreeMap<String, usize>,
    /// Orders sold after their reservation had expired or been released (issue 13: the payment
    /// was deducted from available stock; the order also has the earlier cancellation).
    pub late_sales: usize,
    /// Confirmation latency: order.created produced → order.confirmed read, milliseconds.
    pub confirm_latency_ms: BTreeMap<String, i64>,
    pub without_terminal_outcome: Vec<String>,
    pub with_several_outcomes: Vec<String>,
    pub events_per_topic: BTreeMap<String, i64>,
    /// Distinct eventIds per topic the observer read (a re-emitted event counts once).
    pub distinct_events_per_topic: BTreeMap<String, u64>,
    /// Records read that repeated an eventId already seen with the same payload.
    pub duplicate_records: u64,
    pub stores: Vec<StoreSummary>,
    /// Per HQ (issue 16): its figures from the reserver's changelog against the demo's input.
    pub hqs: Vec<HqSummary>,
    /// HQ fallbacks read on the reserver's commands topic: step (`FALLBACK_REQUEST`,
    /// `FALLBACK_GRANT`, `FALLBACK_DENY`) → distinct records.
    pub hq_fallbacks: BTreeMap<String, usize>,
    /// Units the HQs granted to short stores.
    pub hq_fallback_units: i64,
    pub conservation_violations: Vec<String>,
    pub negative_stock: Vec<String>,
    pub payload_conflicts: Vec<String>,
    pub seed_scenarios: Vec<SeedResult>,
    /// The order service's outbox (absent with `--direct`).
    pub outbox: Option<OutboxSummary>,
    pub wall_seconds: f64,
    pub ttl_seconds: f64,
}

#[derive(Debug, Serialize)]
pub struct StoreSummary {
    pub store: String,
    pub products: usize,
    pub initial: i64,
    /// Units moved in (+) or out (−) other than by restock or sale: from and back to the HQ
    /// (fallbacks), distributions, transfers, corrections.
    pub moved: i64,
    pub available: i64,
    pub reserved: i64,
    pub sold: i64,
    pub conserved: bool,
}

/// One HQ's stock at the end of the demo, summed over its products (issue 16, seed 004): the
/// changelog's figures and whether every product holds `total = unallocated + in transit +
/// Σ stores' on hand = initial − sold`, with nothing in transit and nothing below zero.
#[derive(Debug, Serialize)]
pub struct HqSummary {
    pub hq: String,
    pub products: usize,
    /// Units of the initial stock of the HQ and its stores.
    pub initial: i64,
    /// Units sold at its stores (`stock.updated` SALE rows).
    pub sold: i64,
    pub unallocated: i64,
    pub in_transit: i64,
    /// Σ on hand of its stores, from their stock records.
    pub at_stores: i64,
    /// The HQ total the ledger holds.
    pub total: i64,
    pub holds: bool,
}

#[derive(Debug, Serialize)]
pub struct SeedResult {
    pub scenario: String,
    pub expected: String,
    pub observed: String,
    pub pass: bool,
}

/// Runs the demo end to end and prints the summary. Errors if the saga does not settle or an
/// invariant fails (the summary is printed first).
pub async fn run(args: DemoArgs) -> Result<()> {
    let started = Instant::now();
    let mut loaded = crate::topology::load_topology(&args.topology, args.bootstrap.as_deref())?;
    crate::topology::override_ttl(&mut loaded, args.ttl);
    let state_dir = args.state_dir.clone().unwrap_or_else(|| loaded.topology.defaults.state_dir.join(format!("demo-{}", now_ms())));
    loaded.topology.defaults.state_dir = state_dir.clone();
    // The database the order service writes and the relay reads: one URL for both (by default
    // SQLite, outbox.db in this run's state folder).
    let database_url = if args.direct { None } else { Some(pin_database_url(&mut loaded, args.database_url.as_deref())?) };
    let loaded = Arc::new(loaded);
    let t = &loaded.topology;
    let created = create_topics(t).await.context("creating topics")?;
    info!(topics = created.len(), bootstrap = %t.broker.bootstrap, state = %state_dir.display(), "topics ready");
    let codec = Arc::new(Codec::load(&loaded.avro_dir(), t.broker.registry_url.as_deref())?);
    // The summary reads the topics back from the beginning: a broker holding an earlier run
    // would mix two runs (same TPC-H order ids), so insist on an empty one.
    let previous = records_in(&watermark_client(t)?, t, "order.created")?;
    if previous > 0 {
        bail!("order.created already holds {previous} records: the demo needs an empty broker (scripts/demo.sh starts a fresh one)");
    }

    // Input.
    let mut input = tpch::generate(&tpch::TpchOptions {
        scale_factor: args.scale_factor,
        max_orders: args.orders,
        stock_scale: args.stock_scale.unwrap_or(tpch::DEFAULT_STOCK_SCALE),
        hq_share: args.hq_share,
        base_time_ms: now_ms(),
    });
    let (seed_inv, seed_orders) = seed_inputs(now_ms());
    input.inventory.extend(seed_inv);
    input.orders.extend(seed_orders);
    if args.hot_orders > 0 {
        // Spread through the TPC-H orders, so the hot product is wanted all along the run.
        let (stock, hot) = hot_inputs(args.hot_orders, now_ms());
        input.inventory.push(stock);
        let every = (input.orders.len() / hot.len()).max(1);
        for (i, order) in hot.into_iter().enumerate() {
            let at = ((i + 1) * every + i).min(input.orders.len());
            input.orders.insert(at, order);
        }
    }
    let mut initial: BTreeMap<(String, String), i64> = BTreeMap::new();
    for inv in &input.inventory {
        for item in &inv.items {
            *initial.entry((store_key(&inv.hq_id, &inv.store_id), item.product_id.clone())).or_default() += item.delta;
        }
    }
    let order_count = input.orders.len();
    println!(
        "orderflow demo: {} TPC-H orders + 2 seed scenarios + {} hot orders, {} stores, {} stock lines, TTL {}, broker {}",
        order_count - 2 - args.hot_orders,
        args.hot_orders,
        input.inventory.len(),
        initial.len(),
        humantime::format_duration(args.ttl),
        t.broker.bootstrap
    );

    check_sizes(t, &codec, &input).await?;

    // The reference order service: its tables emptied (a rerun on a kept database starts like a
    // fresh one, before the relay could publish an earlier run's rows) and the catalogue loaded.
    let writers = args.writers.max(1);
    let service = match &database_url {
        Some(url) => {
            let service = OrderService::open(url, writers as u32 + 2, ORDER_TOPIC).await?;
            let left = service.reset().await?;
            let catalogue = order_service::catalogue(&input.orders);
            service.load_products(&catalogue).await?;
            println!(
                "order service: {} ({} products loaded{}), {writers} writers; the outbox relay {}",
                order_service::redact(url),
                catalogue.len(),
                if left > 0 { format!(", {left} outbox rows of an earlier run removed") } else { String::new() },
                if args.external_workers { "runs in the external worker processes (same ORDERFLOW_DATABASE_URL)" } else { "runs here" }
            );
            Some(service)
        }
        None => {
            println!("--direct: order.created produced straight to the broker (no order service, no outbox relay)");
            None
        }
    };

    // Workers (with --direct, without the outbox relay: nothing writes its table).
    let metrics = Metrics::new();
    let (stop_tx, stop_rx) = watch::channel(false);
    let handles = if args.external_workers {
        Vec::new()
    } else {
        let names: Vec<String> = if args.direct {
            t.workers.iter().filter(|(_, w)| w.kind != outbox_relay::KIND).map(|(n, _)| n.clone()).collect()
        } else {
            Vec::new()
        };
        crate::run::spawn_workers(loaded.clone(), &names, "demo", metrics.clone(), &crate::run::serve::Readiness::default(), stop_rx)
            .await?
    };

    // Observer: reads every saga topic from the beginning; the POS simulator reacts to it.
    let topic_of = |port_kind: &str, port: &str| -> Result<String> { port_topic(t, port_kind, port) };
    let completed_topic = "order.completed".to_string();
    let cancelled_topic = topic_of("canceller", "cancelled")?;
    // The stock reserver's own input: read for the HQ fallback protocol records only.
    let commands_topic = topic_of("stock-reserver", "commands")?;
    let observed_topics = [
        commands_topic.clone(),
        topic_of("stock-reserver", "reserved")?,
        topic_of("stock-reserver", "failed")?,
        topic_of("stock-reserver", "released")?,
        topic_of("stock-reserver", "updated")?,
        topic_of("order-confirmer", "confirmed")?,
        topic_of("reservation-expirer", "expired")?,
        cancelled_topic.clone(),
        completed_topic.clone(),
    ];
    let mut consumer_cfg = client_config(&t.broker, Side::Consumer);
    consumer_cfg.set("group.id", format!("orderflow-demo-observer-{}", now_ms()));
    let observer: StreamConsumer = consumer_cfg.create()?;
    let mut tpl = TopicPartitionList::new();
    for topic in &observed_topics {
        let partitions = t.topics.get(topic).map(|s| s.partitions).unwrap_or(1);
        for p in 0..partitions {
            tpl.add_partition_offset(topic, p, Offset::Beginning)?;
        }
    }
    observer.assign(&tpl)?;
    let producer: FutureProducer = client_config(&t.broker, Side::Producer).create()?;

    let observed = Arc::new(Mutex::new(Observed::default()));
    {
        let mut o = observed.lock().unwrap();
        for order in &input.orders {
            o.orders.insert(
                order.order_id.clone(),
                OrderTrack {
                    store: store_key(&order.hq_id, &order.store_id),
                    items: order.items.iter().map(|i| (i.product_id.clone(), i.quantity)).collect(),
                    ..Default::default()
                },
            );
        }
    }
    let orders_by_id: Arc<HashMap<String, OrderCreated>> = Arc::new(input.orders.iter().map(|o| (o.order_id.clone(), o.clone())).collect());
    let observer_task = {
        let observed = observed.clone();
        let codec = codec.clone();
        let producer = producer.clone();
        let orders_by_id = orders_by_id.clone();
        let (complete_pct, fail_pct, pay_at_expiry) = (args.complete_pct, args.payment_fail_pct, args.pay_at_expiry);
        let cancelled_topic = cancelled_topic.clone();
        tokio::spawn(async move {
            let mut stream = observer.stream();
            while let Some(msg) = stream.next().await {
                let msg = match msg {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::warn!(error = %e, "observer consumer error");
                        continue;
                    }
                };
                let payload = msg.payload().unwrap_or_default();
                let Ok(event) = codec.decode(payload).await else { continue };
                let topic = msg.topic().to_string();
                let mut pos_action = None;
                {
                    let mut o = observed.lock().unwrap();
                    if topic == commands_topic {
                        if let Event::StockAllocation(a) = &event {
                            o.allocation(a);
                        }
                        continue;
                    }
                    match o.seen_ids.get(event.event_id()) {
                        Some((first, prev)) if prev.as_slice() != payload => {
                            let conflict = format!("{} on {topic} (first on {first})", event.event_id());
                            o.payload_conflicts.push(conflict);
                        }
                        Some(_) => {
                            o.duplicates += 1;
                            continue;
                        }
                        None => {
                            o.seen_ids.insert(event.event_id().to_string(), (topic.clone(), payload.to_vec()));
                            *o.distinct.entry(topic.clone()).or_default() += 1;
                        }
                    }
                    match &event {
                        Event::StockUpdated(u) => o.stock_row(u),
                        Event::StockReserved(e) => {
                            if let Some(tr) = o.orders.get_mut(&e.order_id) {
                                tr.reserved = true;
                            }
                        }
                        Event::StockReservationFailed(e) => {
                            if let Some(tr) = o.orders.get_mut(&e.order_id) {
                                tr.failed = Some(e.clone());
                            }
                        }
                        Event::StockReservationReleased(e) => {
                            if let Some(tr) = o.orders.get_mut(&e.order_id) {
                                tr.released = true;
                            }
                        }
                        Event::OrderCancelled(e) => {
                            if let Some(tr) = o.orders.get_mut(&e.order_id) {
                                tr.cancellations.insert(e.event_id.clone(), (e.reason.clone(), e.refund_required));
                            }
                        }
                        Event::OrderConfirmed(e) => {
                            if let Some(tr) = o.orders.get_mut(&e.order_id) {
                                if tr.confirmed.is_none() && !e.order_id.starts_with("SEED") {
                                    // POS: pay, fail, or leave it to expire. An order whose
                                    // reservation is about to expire is left alone, as a till would.
                                    let decision = if now_ms() > e.expires_at - 2_000 && pay_at_expiry.is_none() {
                                        "late"
                                    } else {
                                        pos_decision(&e.order_id, complete_pct, fail_pct)
                                    };
                                    tr.confirm_latency_ms = Some(now_ms() - e.occurred_at);
                                    tr.pos = Some(decision);
                                    tr.paid = decision == "complete";
                                    pos_action = Some((decision, e.clone()));
                                }
                                tr.confirmed = Some(e.clone());
                            }
                        }
                        _ => {}
                    }
                }
                if let Some((decision, confirmed)) = pos_action {
                    let order = &orders_by_id[&confirmed.order_id];
                    let event = pos_answer(decision, order, &confirmed, &completed_topic, &cancelled_topic);
                    if let Some((topic, event)) = event {
                        // Produced in the background so that reading confirmations never waits
                        // for the broker's acknowledgement of the POS's answer.
                        let (producer, codec) = (producer.clone(), codec.clone());
                        let wait = pay_at_expiry
                            .filter(|_| decision == "complete")
                            .map(|j| payment_delay(&confirmed.order_id, confirmed.expires_at, j, now_ms()));
                        tokio::spawn(async move {
                            if let Some(wait) = wait {
                                tokio::time::sleep(wait).await;
                            }
                            if let Err(e) = send(&producer, &codec, &topic, &confirmed.order_id, &event).await {
                                tracing::error!(error = %e, "POS simulator could not produce");
                            }
                        });
                    }
                }
            }
        })
    };

    // Initial stock first, and wait until the stock reserver applied it: orders and stock travel
    // on different input topics, so their relative order is only fixed by waiting.
    let inventory_topic = "inventory.adjusted";
    let expected_updates: usize =
        input.inventory.iter().map(|i| i.items.iter().map(|x| &x.product_id).collect::<BTreeSet<_>>().len()).sum();
    for inv in &input.inventory {
        send(&producer, &codec, inventory_topic, &store_key(&inv.hq_id, &inv.store_id), &Event::InventoryAdjusted(inv.clone())).await?;
    }
    let wait_started = Instant::now();
    while observed.lock().unwrap().inventory_updates < expected_updates {
        if wait_started.elapsed() > Duration::from_secs(120) {
            bail!(
                "the stock reserver did not apply the initial stock within 120 s ({} of {expected_updates} stock.updated)",
                observed.lock().unwrap().inventory_updates
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("initial stock applied: {expected_updates} stock lines in {:.1}s", wait_started.elapsed().as_secs_f64());

    // Orders.
    let bar = ProgressBar::new(order_count as u64).with_style(
        ProgressStyle::with_template("{msg:12} [{bar:40}] {pos}/{len} {per_sec} eta {eta}").expect("valid template").progress_chars("=> "),
    );
    let produce_started = Instant::now();
    let pace = (args.rate > 0).then(|| Duration::from_secs_f64(1.0 / args.rate as f64));
    let rejected = match &service {
        None => {
            bar.set_message("producing");
            produce_direct(&codec, &producer, input.orders, pace, &bar).await?;
            bar.finish_and_clear();
            println!("produced {order_count} order.created in {:.1}s", produce_started.elapsed().as_secs_f64());
            Vec::new()
        }
        Some(service) => {
            bar.set_message("ordering");
            bar.set_length(order_count as u64 + 1);
            // Seed 002's refusal first: an order naming an unknown product.
            let mut orders = vec![order_service::unknown_product_order(now_ms())];
            orders.extend(input.orders);
            let rejected = place_orders(service, writers, orders, pace, &bar, &observed).await?;
            bar.finish_and_clear();
            println!(
                "order service: {} orders written with their outbox rows by {writers} writers in {:.1}s, {} rejected ({})",
                order_count + 1 - rejected.len(),
                produce_started.elapsed().as_secs_f64(),
                rejected.len(),
                rejected.iter().map(|(id, p)| format!("{id}: unknown {}", p.join(", "))).collect::<Vec<_>>().join("; ")
            );
            rejected
        }
    };
    let order_count = observed.lock().unwrap().orders.len();

    // Wait until every order has a terminal outcome.
    let bar = ProgressBar::new(order_count as u64).with_style(
        ProgressStyle::with_template("{msg:12} [{bar:40}] {pos}/{len} {per_sec} eta {eta}").expect("valid template").progress_chars("=> "),
    );
    bar.set_message("settling");
    let settle_deadline = Instant::now() + args.ttl + args.settle_timeout;
    let mut drained = service.is_none();
    let mut drain_checked = Instant::now() - Duration::from_secs(1);
    loop {
        let done = observed.lock().unwrap().orders.values().filter(|o| o.settled()).count();
        bar.set_position(done as u64);
        // The outbox is drained when no row of order.created is PENDING any more (each one
        // COMPLETED or QUARANTINED), read from the database about once a second.
        if let Some(service) = service.as_ref().filter(|_| !drained && drain_checked.elapsed() >= Duration::from_secs(1)) {
            drain_checked = Instant::now();
            match service.drained().await {
                Ok(d) => drained = d,
                Err(e) => tracing::warn!(error = %e, "reading the outbox"),
            }
        }
        if (done == order_count && drained) || Instant::now() > settle_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bar.finish_and_clear();
    // Late duplicates or conflicting outcomes would show up shortly after: give them a moment.
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Stop the workers cleanly (finishing units in flight), then read the reserver's state.
    let _ = stop_tx.send(true);
    for (name, h) in handles {
        h.await.with_context(|| format!("worker {name} panicked"))?.with_context(|| format!("worker {name} failed"))?;
    }
    observer_task.abort();
    let reserver =
        t.workers.iter().find(|(_, w)| w.kind == "stock-reserver").map(|(n, _)| n).context("no stock reserver in the topology")?;
    let stock = read_stock(t, reserver, &state_dir.join("summary-restore"))?;

    let mut summary = summarize(&observed.lock().unwrap(), &initial, &stock, t, args.ttl, started.elapsed())?;
    if let Some(service) = &service {
        let refused = rejected.iter().any(|(id, _)| id == order_service::UNKNOWN_PRODUCT_ORDER);
        let written = service.has_order(order_service::UNKNOWN_PRODUCT_ORDER).await?;
        summary.seed_scenarios.push(SeedResult {
            scenario: "seed 002: an order naming an unknown product (P-UNKNOWN)".into(),
            expected: "rejected by the order service, no orders row, no outbox row".into(),
            observed: format!(
                "{}, orders row {}",
                if refused { "rejected" } else { "accepted" },
                if written { "written" } else { "absent" }
            ),
            pass: refused && !written,
        });
        summary.outbox = Some(service.summary(writers, rejected.into_iter().map(|(id, _)| id).collect()).await?);
    }
    print_summary(&summary);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&summary)?).with_context(|| format!("writing {}", path.display()))?;
    }
    let failed_seeds = summary.seed_scenarios.iter().filter(|s| !s.pass).count();
    // One outbox row per accepted order, each published: the transaction wrote both or neither.
    let outbox_broken = summary.outbox.as_ref().is_some_and(|o| {
        o.orders_rows != o.rows_by_status.values().sum::<i64>() || o.rows_by_status.iter().any(|(s, n)| s != "COMPLETED" && *n > 0)
    });
    if !summary.without_terminal_outcome.is_empty()
        || !summary.with_several_outcomes.is_empty()
        || !summary.conservation_violations.is_empty()
        || !summary.negative_stock.is_empty()
        || !summary.payload_conflicts.is_empty()
        || failed_seeds > 0
        || outbox_broken
    {
        bail!("the saga broke an invariant (see the summary above)");
    }
    Ok(())
}

/// The topic the order service's outbox rows go to.
const ORDER_TOPIC: &str = "order.created";

/// The database URL of this run, written into every outbox-relay worker of `order.created` in
/// `loaded` so that the order service and the relay (when it runs here) use the same one:
/// `flag` (`--database-url` / `ORDERFLOW_DATABASE_URL`), else the relay's `database_url` (the
/// default SQLite one in this run's state folder, as the relay places it: `Config::url_in`).
///
/// Errors: no such relay in the topology; a `--database-url` other than the
/// `ORDERFLOW_DATABASE_URL` the relay would read.
/// `--hq-share`: a number within [0, 1].
fn parse_share(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?} is not a share within [0, 1]")),
    }
}

fn pin_database_url(loaded: &mut orderflow_runtime::topology::Loaded, flag: Option<&str>) -> Result<String> {
    let relays: Vec<String> = loaded
        .topology
        .workers
        .iter()
        .filter(|(_, w)| w.kind == outbox_relay::KIND && w.outputs.values().any(|t| t == ORDER_TOPIC))
        .map(|(n, _)| n.clone())
        .collect();
    let Some(first) = relays.first() else {
        bail!("the topology has no outbox-relay worker publishing {ORDER_TOPIC}: add one, or run the demo with --direct");
    };
    let config = orderflow_kinds::relay_config(&loaded.topology.workers[first])
        .with_context(|| format!("the settings of outbox-relay worker {first} do not parse (orderflow topology check)"))?;
    let url = flag.filter(|u| !u.is_empty()).map(str::to_string).unwrap_or_else(|| config.url_in(&loaded.topology.defaults.state_dir));
    if let Ok(env) = std::env::var(outbox_relay::config::DATABASE_URL_ENV) {
        if !env.is_empty() && env != url {
            bail!("--database-url differs from {}, which the outbox relay reads: set one of them", outbox_relay::config::DATABASE_URL_ENV);
        }
    }
    for name in &relays {
        if let Some(w) = loaded.topology.workers.get_mut(name) {
            w.settings.insert("database_url".into(), url.clone().into());
        }
    }
    Ok(url)
}

/// `--direct`: produces `orders` straight to `order.created`, at `pace` per order.
async fn produce_direct(
    codec: &Codec,
    producer: &FutureProducer,
    orders: Vec<OrderCreated>,
    pace: Option<Duration>,
    bar: &ProgressBar,
) -> Result<()> {
    let produce_started = Instant::now();
    let mut in_flight = futures::stream::FuturesUnordered::new();
    for (i, mut order) in orders.into_iter().enumerate() {
        order.occurred_at = now_ms();
        let bytes = codec.encode(ORDER_TOPIC, &Event::OrderCreated(order.clone())).await?;
        let producer = producer.clone();
        // A task per send, so records leave at the pace of this loop (`--rate`), not when the
        // futures are first polled after it.
        in_flight.push(tokio::spawn(async move {
            producer
                .send(FutureRecord::to(ORDER_TOPIC).key(&order.order_id).payload(&bytes), Timeout::Never)
                .await
                .map_err(|(e, _)| anyhow::anyhow!("producing order.created: {e}"))
        }));
        if in_flight.len() >= 10_000 {
            if let Some(r) = in_flight.next().await {
                r??;
            }
        }
        bar.set_position(i as u64 + 1);
        if let Some(p) = pace {
            let target = p * (i as u32 + 1);
            if let Some(wait) = target.checked_sub(produce_started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
    }
    while let Some(r) = in_flight.next().await {
        r??;
    }
    Ok(())
}

/// Places `orders` through the order service with `writers` concurrent tasks (each one
/// transaction at a time), offered at `pace` per order. A rejected order leaves `observed` (it
/// will never have an outcome). Returns the rejected orders with their unknown products.
///
/// Errors: a writer could not write an order for a minute.
async fn place_orders(
    service: &OrderService,
    writers: usize,
    orders: Vec<OrderCreated>,
    pace: Option<Duration>,
    bar: &ProgressBar,
    observed: &Arc<Mutex<Observed>>,
) -> Result<Vec<(String, Vec<String>)>> {
    let started = Instant::now();
    let (tx, rx) = tokio::sync::mpsc::channel::<OrderCreated>(writers * 4);
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let tasks: Vec<_> = (0..writers)
        .map(|_| {
            let (service, rx, bar, observed) = (service.clone(), rx.clone(), bar.clone(), observed.clone());
            tokio::spawn(async move {
                let mut rejected = Vec::new();
                loop {
                    let next = rx.lock().await.recv().await;
                    let Some(order) = next else { break };
                    if let Placed::Rejected(products) = service.place(&order).await? {
                        observed.lock().unwrap().orders.remove(&order.order_id);
                        rejected.push((order.order_id, products));
                    }
                    bar.inc(1);
                }
                anyhow::Ok(rejected)
            })
        })
        .collect();
    for (i, order) in orders.into_iter().enumerate() {
        if tx.send(order).await.is_err() {
            break; // every writer stopped: its error is below
        }
        if let Some(p) = pace {
            let target = p * (i as u32 + 1);
            if let Some(wait) = target.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
    }
    drop(tx);
    let mut rejected = Vec::new();
    for task in tasks {
        rejected.extend(task.await.context("an order service writer panicked")??);
    }
    rejected.sort();
    Ok(rejected)
}
