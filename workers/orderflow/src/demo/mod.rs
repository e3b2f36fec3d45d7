//! The main job: TPC-H orders and the two seed 000 scenarios through the whole saga, on a real
//! broker, with a POS simulator closing confirmed orders, ending in a summary (orders by final
//! state and reason, events per topic, stock conservation per store, wall time).

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
use orderflow_runtime::store::Store;
use orderflow_runtime::worker::now_ms;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;
use tokio::sync::watch;
use tracing::info;


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
    #[arg(long)]
    external_workers: bool,
}

/// Final outcome of one order as read back from the topics.
#[derive(Debug, Default, Clone)]
struct OrderTrack {
    store: String,
    items: Vec<(String, i32)>,
    reserved: bool,
    failed: Option<StockReservationFailed>,
    confirmed: Option<OrderConfirmed>,
    /// Distinct order.cancelled eventIds → reason.
    cancellations: BTreeMap<String, String>,
    /// Sale deductions seen (distinct stock.updated eventIds).
    sales: BTreeSet<String>,
    released: bool,
    pos: Option<&'static str>,
    confirm_latency_ms: Option<i64>,
}

impl OrderTrack {
    fn outcomes(&self) -> usize {
        self.cancellations.len() + usize::from(!self.sales.is_empty())
    }
    fn outcome(&self) -> String {
        match (self.cancellations.values().next(), self.sales.is_empty()) {
            (Some(reason), true) => format!("ORDER_CANCELLED/{reason}"),
            (None, false) => "ORDER_COMPLETED".into(),
            (None, true) if self.confirmed.is_some() => "PAYMENT_WAIT".into(),
            (None, true) => "ORDER_CREATED".into(),
            (Some(_), false) => "CONFLICT".into(),
        }
    }
}

#[derive(Default)]
struct Observed {
    orders: HashMap<String, OrderTrack>,
    /// (storeKey, productId) → units sold.
    sold: BTreeMap<(String, String), i64>,
    inventory_updates: usize,
    distinct: BTreeMap<String, u64>,
    duplicates: u64,
    seen_ids: HashMap<String, Vec<u8>>,
    payload_conflicts: Vec<String>,
}

/// The demo's summary (also written as JSON with `--json`).
#[derive(Debug, Serialize)]
pub struct Summary {
    pub orders: usize,
    pub by_outcome: BTreeMap<String, usize>,
    /// What the POS simulator did with confirmed orders (`late` = confirmation read within 2 s
    /// of the reservation's expiry, left to expire).
    pub pos_decisions: BTreeMap<String, usize>,
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
    pub conservation_violations: Vec<String>,
    pub negative_stock: Vec<String>,
    pub payload_conflicts: Vec<String>,
    pub seed_scenarios: Vec<SeedResult>,
    pub wall_seconds: f64,
    pub ttl_seconds: f64,
}

#[derive(Debug, Serialize)]
pub struct StoreSummary {
    pub store: String,
    pub products: usize,
    pub initial: i64,
    pub available: i64,
    pub reserved: i64,
    pub sold: i64,
    pub conserved: bool,
}

#[derive(Debug, Serialize)]
pub struct SeedResult {
    pub scenario: String,
    pub expected: String,
    pub observed: String,
    pub pass: bool,
}

const SEED_HQ: &str = "HQ-SEED";

/// Seed 000 scenario 1 (single product short) and 2 (multi-product, one short: all or nothing).
fn seed_inputs(now: i64) -> (Vec<InventoryAdjusted>, Vec<OrderCreated>) {
    let inv = |store: &str, items: &[(&str, i64)]| InventoryAdjusted {
        event_id: format!("seed-stock-{store}"),
        occurred_at: now,
        hq_id: SEED_HQ.into(),
        store_id: store.into(),
        adjustment_type: change_reason::RESTOCK.into(),
        reference_id: "seed-000".into(),
        items: items.iter().map(|(p, q)| AdjustedItem { product_id: p.to_string(), delta: *q }).collect(),
    };
    let order = |id: &str, store: &str, items: &[(&str, i32)]| OrderCreated {
        event_id: format!("seed-order-{id}"),
        occurred_at: now,
        order_id: id.into(),
        customer_id: "C-SEED".into(),
        hq_id: SEED_HQ.into(),
        store_id: store.into(),
        items: items.iter().map(|(p, q)| OrderItem { product_id: p.to_string(), quantity: *q, unit_price: 1000 }).collect(),
    };
    (
        vec![inv("ST-SEED-1", &[("P-001", 5)]), inv("ST-SEED-2", &[("P-001", 10), ("P-002", 1)])],
        vec![order("SEED-000-1", "ST-SEED-1", &[("P-001", 10)]), order("SEED-000-2", "ST-SEED-2", &[("P-001", 5), ("P-002", 3)])],
    )
}

/// What the POS does with a confirmed order: `"complete"` for `complete_pct` % of the order
/// ids, `"payment_failed"` for the next `fail_pct` %, else `"leave"` (to expire). A stable
/// share: a hash of the id, independent of arrival order.
pub(crate) fn pos_decision(order_id: &str, complete_pct: u32, fail_pct: u32) -> &'static str {
    // FNV-1a: a stable share, independent of arrival order.
    let h = order_id.bytes().fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3));
    let bucket = (h % 100) as u32;
    if bucket < complete_pct {
        "complete"
    } else if bucket < complete_pct + fail_pct {
        "payment_failed"
    } else {
        "leave"
    }
}

/// The POS's answer to a confirmed `order` for `decision` (of [`pos_decision`]): `(topic,
/// event)`, an `OrderCompleted` (payment taken, on `completed_topic`) or an `OrderCancelled`
/// `PAYMENT_FAILED` (on `cancelled_topic`); `None` for `"leave"` / `"late"`.
pub(crate) fn pos_answer(
    decision: &str,
    order: &OrderCreated,
    confirmed: &OrderConfirmed,
    completed_topic: &str,
    cancelled_topic: &str,
) -> Option<(String, Event)> {
    match decision {
        "complete" => Some((
            completed_topic.to_string(),
            Event::OrderCompleted(OrderCompleted {
                event_id: format!("pos-complete-{}", order.order_id),
                occurred_at: now_ms(),
                order_id: order.order_id.clone(),
                reservation_id: confirmed.reservation_id.clone(),
                hq_id: order.hq_id.clone(),
                store_id: order.store_id.clone(),
                items: order
                    .items
                    .iter()
                    .map(|i| SoldItem { product_id: i.product_id.clone(), quantity: i.quantity, actual_price: i.unit_price })
                    .collect(),
                total_amount: order.items.iter().map(|i| i.unit_price * i.quantity as i64).sum(),
            }),
        )),
        "payment_failed" => Some((
            cancelled_topic.to_string(),
            Event::OrderCancelled(OrderCancelled {
                event_id: format!("pos-payment-failed-{}", order.order_id),
                occurred_at: now_ms(),
                order_id: order.order_id.clone(),
                hq_id: order.hq_id.clone(),
                store_id: order.store_id.clone(),
                reason: cancel_reason::PAYMENT_FAILED.into(),
                reservation_id: Some(confirmed.reservation_id.clone()),
                customer_message: canceller::customer_message(cancel_reason::PAYMENT_FAILED).into(),
            }),
        )),
        _ => None,
    }
}

/// The topic the topology wires to port `port` of the (first) worker of kind `kind`.
pub(crate) fn port_topic(t: &orderflow_runtime::topology::Topology, kind: &str, port: &str) -> Result<String> {
    t.workers
        .values()
        .find(|w| w.kind == kind)
        .and_then(|w| w.outputs.get(port).cloned())
        .with_context(|| format!("the topology wires no {kind} port {port}"))
}

/// Encodes `event` for `topic` and produces it keyed by `key`; waits for the acknowledgement.
pub(crate) async fn send(producer: &FutureProducer, codec: &Codec, topic: &str, key: &str, event: &Event) -> Result<()> {
    let bytes = codec.encode(topic, event).await?;
    producer
        .send(FutureRecord::to(topic).key(key).payload(&bytes), Timeout::Never)
        .await
        .map_err(|(e, _)| anyhow::anyhow!("producing to {topic}: {e}"))?;
    Ok(())
}

/// Runs the demo end to end and prints the summary. Errors if the saga does not settle or an
/// invariant fails (the summary is printed first).
pub async fn run(args: DemoArgs) -> Result<()> {
    let started = Instant::now();
    let mut loaded = crate::topology::load_topology(&args.topology, args.bootstrap.as_deref())?;
    crate::topology::override_ttl(&mut loaded, args.ttl);
    let state_dir = args.state_dir.clone().unwrap_or_else(|| loaded.topology.defaults.state_dir.join(format!("demo-{}", now_ms())));
    loaded.topology.defaults.state_dir = state_dir.clone();
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
        base_time_ms: now_ms(),
    });
    let (seed_inv, seed_orders) = seed_inputs(now_ms());
    input.inventory.extend(seed_inv);
    input.orders.extend(seed_orders);
    let mut initial: BTreeMap<(String, String), i64> = BTreeMap::new();
    for inv in &input.inventory {
        for item in &inv.items {
            *initial.entry((store_key(&inv.hq_id, &inv.store_id), item.product_id.clone())).or_default() += item.delta;
        }
    }
    let order_count = input.orders.len();
    println!(
        "orderflow demo: {} TPC-H orders + 2 seed scenarios, {} stores, {} stock lines, TTL {}, broker {}",
        order_count - 2,
        input.inventory.len(),
        initial.len(),
        humantime::format_duration(args.ttl),
        t.broker.bootstrap
    );

    // Workers.
    let metrics = Metrics::new();
    let (stop_tx, stop_rx) = watch::channel(false);
    let handles = if args.external_workers {
        Vec::new()
    } else {
        crate::run::spawn_workers(loaded.clone(), &[], "demo", metrics.clone(), &crate::run::serve::Readiness::default(), stop_rx).await?
    };

    // Observer: reads every saga topic from the beginning; the POS simulator reacts to it.
    let topic_of = |port_kind: &str, port: &str| -> Result<String> { port_topic(t, port_kind, port) };
    let completed_topic = "order.completed".to_string();
    let cancelled_topic = topic_of("canceller", "cancelled")?;
    let observed_topics = [
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
        let (complete_pct, fail_pct) = (args.complete_pct, args.payment_fail_pct);
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
                    match o.seen_ids.get(event.event_id()) {
                        Some(prev) if prev.as_slice() != payload => o.payload_conflicts.push(event.event_id().to_string()),
                        Some(_) => {
                            o.duplicates += 1;
                            continue;
                        }
                        None => {
                            o.seen_ids.insert(event.event_id().to_string(), payload.to_vec());
                            *o.distinct.entry(topic.clone()).or_default() += 1;
                        }
                    }
                    match &event {
                        Event::StockUpdated(u) if u.change_reason == change_reason::SALE => {
                            *o.sold.entry((store_key(&u.hq_id, &u.store_id), u.product_id.clone())).or_default() += -u.change_amount;
                            if let Some(tr) = o.orders.get_mut(&u.reference_id) {
                                tr.sales.insert(u.event_id.clone());
                            }
                        }
                        Event::StockUpdated(_) => o.inventory_updates += 1,
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
                                tr.cancellations.insert(e.event_id.clone(), e.reason.clone());
                            }
                        }
                        Event::OrderConfirmed(e) => {
                            if let Some(tr) = o.orders.get_mut(&e.order_id) {
                                if tr.confirmed.is_none() && !e.order_id.starts_with("SEED") {
                                    // POS: pay, fail, or leave it to expire. An order whose
                                    // reservation is about to expire is left alone, as a till would.
                                    let decision = if now_ms() > e.expires_at - 2_000 {
                                        "late"
                                    } else {
                                        pos_decision(&e.order_id, complete_pct, fail_pct)
                                    };
                                    tr.confirm_latency_ms = Some(now_ms() - e.occurred_at);
                                    tr.pos = Some(decision);
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
                        tokio::spawn(async move {
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
    bar.set_message("producing");
    let produce_started = Instant::now();
    let pace = (args.rate > 0).then(|| Duration::from_secs_f64(1.0 / args.rate as f64));
    let mut in_flight = futures::stream::FuturesUnordered::new();
    for (i, mut order) in input.orders.into_iter().enumerate() {
        order.occurred_at = now_ms();
        let bytes = codec.encode("order.created", &Event::OrderCreated(order.clone())).await?;
        let producer = producer.clone();
        // A task per send, so records leave at the pace of this loop (`--rate`), not when the
        // futures are first polled after it.
        in_flight.push(tokio::spawn(async move {
            producer
                .send(FutureRecord::to("order.created").key(&order.order_id).payload(&bytes), Timeout::Never)
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
    bar.finish_and_clear();
    println!("produced {order_count} order.created in {:.1}s", produce_started.elapsed().as_secs_f64());

    // Wait until every order has a terminal outcome.
    let bar = ProgressBar::new(order_count as u64).with_style(
        ProgressStyle::with_template("{msg:12} [{bar:40}] {pos}/{len} {per_sec} eta {eta}").expect("valid template").progress_chars("=> "),
    );
    bar.set_message("settling");
    let settle_deadline = Instant::now() + args.ttl + args.settle_timeout;
    loop {
        let done = observed.lock().unwrap().orders.values().filter(|o| o.outcomes() >= 1).count();
        bar.set_position(done as u64);
        if done == order_count || Instant::now() > settle_deadline {
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
    let (reserver, spec) = t.workers.iter().find(|(_, w)| w.kind == "stock-reserver").context("no stock reserver in the topology")?;
    let partitions = spec.inputs.first().and_then(|i| t.topics.get(i)).map(|s| s.partitions).unwrap_or(1);
    let stock = read_stock(&t.broker, reserver, &spec.inputs, partitions, &state_dir.join("summary-restore"))?;

    let summary = summarize(&observed.lock().unwrap(), &initial, &stock, t, args.ttl, started.elapsed())?;
    print_summary(&summary);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&summary)?).with_context(|| format!("writing {}", path.display()))?;
    }
    let failed_seeds = summary.seed_scenarios.iter().filter(|s| !s.pass).count();
    if !summary.without_terminal_outcome.is_empty()
        || !summary.with_several_outcomes.is_empty()
        || !summary.conservation_violations.is_empty()
        || !summary.negative_stock.is_empty()
        || !summary.payload_conflicts.is_empty()
        || failed_seeds > 0
    {
        bail!("the saga broke an invariant (see the summary above)");
    }
    Ok(())
}

/// (storeKey, productId) → (on hand, reserved) as the stock reserver's changelog holds it:
/// every partition restored from the changelog alone into a scratch store, so the summary checks
/// the durable copy of the state, whichever processes wrote it.
fn read_stock(
    broker: &orderflow_runtime::topology::BrokerConfig,
    reserver: &str,
    inputs: &[String],
    partitions: i32,
    scratch: &std::path::Path,
) -> Result<BTreeMap<(String, String), stock_reserver::StockRecord>> {
    let _ = std::fs::remove_dir_all(scratch);
    let store = Store::open(scratch).with_context(|| format!("opening {}", scratch.display()))?;
    let topic = orderflow_runtime::changelog::topic(reserver);
    let mut out = BTreeMap::new();
    for p in 0..partitions {
        let shard = store.shard(p)?;
        orderflow_runtime::changelog::restore(broker, &topic, inputs, &shard, Duration::from_secs(300))?;
        for (k, v) in shard.scan(stock_reserver::STOCK_PREFIX)? {
            let key = String::from_utf8_lossy(&k[stock_reserver::STOCK_PREFIX.len()..]).into_owned();
            let (store_key, product) = key.rsplit_once('/').context("stock key without product")?;
            let record: stock_reserver::StockRecord = serde_json::from_slice(&v)?;
            out.insert((store_key.to_string(), product.to_string()), record);
        }
    }
    Ok(out)
}

fn summarize(
    o: &Observed,
    initial: &BTreeMap<(String, String), i64>,
    stock: &BTreeMap<(String, String), stock_reserver::StockRecord>,
    t: &orderflow_runtime::topology::Topology,
    ttl: Duration,
    wall: Duration,
) -> Result<Summary> {
    let mut by_outcome: BTreeMap<String, usize> = BTreeMap::new();
    let mut pos_decisions: BTreeMap<String, usize> = BTreeMap::new();
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
    let mut violations = Vec::new();
    let mut negative = Vec::new();
    let mut stores: BTreeMap<String, StoreSummary> = BTreeMap::new();
    let keys: BTreeSet<&(String, String)> = initial.keys().chain(stock.keys()).collect();
    for key in keys {
        let init = initial.get(key).copied().unwrap_or(0);
        let rec = stock.get(key).cloned().unwrap_or(stock_reserver::StockRecord { on_hand: 0, reserved: 0 });
        let sold = o.sold.get(key).copied().unwrap_or(0);
        let available = rec.on_hand - rec.reserved;
        let expected_live = live.get(key).copied().unwrap_or(0);
        let ok = init == available + rec.reserved + sold && rec.reserved == expected_live;
        if !ok {
            violations.push(format!(
                "{}/{}: initial {init} != available {available} + reserved {} + sold {sold} (live reservations from events: {expected_live})",
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
            available: 0,
            reserved: 0,
            sold: 0,
            conserved: true,
        });
        s.products += 1;
        s.initial += init;
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
    let p001_left = stock.get(&(store_key(SEED_HQ, "ST-SEED-2"), "P-001".into())).map(|r| r.on_hand - r.reserved);
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
        confirm_latency_ms,
        without_terminal_outcome: without,
        with_several_outcomes: several,
        events_per_topic,
        distinct_events_per_topic: o.distinct.clone(),
        duplicate_records: o.duplicates,
        stores: stores.into_values().collect(),
        conservation_violations: violations,
        negative_stock: negative,
        payload_conflicts: o.payload_conflicts.clone(),
        seed_scenarios: seeds,
        wall_seconds: wall.as_secs_f64(),
        ttl_seconds: ttl.as_secs_f64(),
    })
}

/// A client for [`records_in`].
fn watermark_client(t: &orderflow_runtime::topology::Topology) -> Result<rdkafka::consumer::BaseConsumer> {
    crate::kafkaio::watermark_client(&t.broker, "orderflow-demo-watermarks")
}

/// Records in `topic` (sum of high − low watermarks over its declared partitions; a `.dlq`
/// topic has its source's partitions).
fn records_in(consumer: &rdkafka::consumer::BaseConsumer, t: &orderflow_runtime::topology::Topology, topic: &str) -> Result<i64> {
    let partitions = t.topics.get(topic).or_else(|| t.topics.get(topic.trim_end_matches(".dlq"))).map(|s| s.partitions).unwrap_or(1);
    crate::kafkaio::records_held(consumer, topic, partitions)
}

fn print_summary(s: &Summary) {
    println!("\n== orders by final state ({} orders)", s.orders);
    for (k, v) in &s.by_outcome {
        println!("  {k:40} {v:>7}  {:>5.1}%", *v as f64 * 100.0 / s.orders.max(1) as f64);
    }
    println!("  without a terminal outcome: {}   with several: {}", s.without_terminal_outcome.len(), s.with_several_outcomes.len());
    println!("  POS decisions on confirmed orders: {:?}", s.pos_decisions);
    println!("  created → confirmed read (ms): {:?}", s.confirm_latency_ms);
    println!("\n== events per topic");
    for (k, v) in &s.events_per_topic {
        println!("  {k:40} {v:>7}");
    }
    println!("\n== stock conservation per store (initial = available + reserved + sold)");
    println!("  {:30} {:>8} {:>10} {:>10} {:>9} {:>9}  ok", "store", "products", "initial", "available", "reserved", "sold");
    for st in &s.stores {
        println!(
            "  {:24} {:>8} {:>10} {:>10} {:>9} {:>9}  {}",
            st.store,
            st.products,
            st.initial,
            st.available,
            st.reserved,
            st.sold,
            if st.conserved { "yes" } else { "NO" }
        );
    }
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
    println!("\nwall time {:.1}s (reservation TTL {:.0}s)", s.wall_seconds, s.ttl_seconds);
}
