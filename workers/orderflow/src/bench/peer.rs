//! `bench peer` (issue 18): orderflow's stock reserver beside a Kafka Streams application with the
//! same business rules (`peers/kafka-streams`, built with Maven), on the same broker and the same
//! input, one after the other, measured from outside the same way.
//!
//! 1. **Input**: `--records` orders (1–4 lines of 1–5 units) over the 25 stores of the five-HQ
//!    layout, after one restock per store of every product: `--stock-share` (0.85) × the units
//!    the orders ask of a store and product on average, so that the later orders of a store fail
//!    for stock and the comparison covers both answers; all on `stock.commands`.
//! 2. **orderflow**: `orderflow run --worker stock-reserver` as a child process, on a copy of the
//!    topology with the HQ fallback switched off (the peer has no HQ level: both do the same work)
//!    and the commit interval both use (`--commit-interval`, default the reserver's).
//! 3. **The peer**: `java <--jvm-opts> -jar <--peer-jar>` (`exactly_once_v2` when orderflow runs
//!    `exactly_once`, else `at_least_once`; RocksDB stores; one stream thread; orderflow's commit
//!    interval), on the same `stock.commands` under its own application id, answering on
//!    `peer.stock.reserved` / `peer.stock.reservation.failed`.
//!
//! Each side is metered by a `read_committed` consumer of its two answer topics: orders answered
//! over the window after the warm-up (the [`Meter`] of every scenario), then it runs until every
//! order is answered, and its peak RSS is the process's `VmHWM` at that point. Then it is offered
//! new orders at fixed loads (`--loads`, each for `--load-duration`): created → answered
//! latency, p50/p99 ([`super::peer_latency`]). Then it is
//! SIGKILLed and started again, twice: on its local state, and with its state directory deleted
//! (rebuilt from its changelog); each time [`PROBE_ORDERS`] new orders wait for it, and the time
//! from the kill to their first answer is "SIGKILL → processing". Both use static membership (the
//! same instance id again), so neither waits for a session timeout. Last, the answers are compared
//! order by order: reserved with the same lines, or failed for the same reason.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use orderflow_api::events::store_key;
use orderflow_api::Event;
use orderflow_runtime::codec::Codec;
use orderflow_runtime::kafka::{client_config, create_topics, Side};
use orderflow_runtime::topology::{BrokerConfig, Guarantee};
use orderflow_runtime::worker::now_ms;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::FutureProducer;
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;
use tracing::info;

use super::peer_latency::{LatencyResult, LATENCY_PREFIX};
use super::recovery::memory;
use super::{create_bench_topics, free_port, inventory_in, log_tail, order_in, produce_all, Common, Layout, Meter, Rng, Window};

const WORKER: &str = "stock-reserver";
/// Prefix of the peer's output topics.
const PEER_PREFIX: &str = "peer.";

/// `orderflow bench peer` flags.
#[derive(clap::Args, Debug)]
pub struct PeerArgs {
    #[command(flatten)]
    common: Common,
    /// The peer's shaded jar (`mvn -f peers/kafka-streams/pom.xml package`).
    #[arg(long)]
    peer_jar: PathBuf,
    /// Stock of each product at every store, as a share of the units the orders ask of it on
    /// average: below 1, the later orders of a store fail for stock.
    #[arg(long, default_value_t = 0.85)]
    stock_share: f64,
    /// The java launcher.
    #[arg(long, default_value = "java")]
    java: String,
    /// JVM options of the peer, whitespace-separated.
    #[arg(long, default_value = "-Xmx1g")]
    jvm_opts: String,
    /// Folder for the logs and both sides' state (default: a fresh one under target/bench/state).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Offered loads of the latency phase, orders/s, each for `--load-duration` on each side
    /// once it has answered the run's orders ([`super::peer_latency`]).
    #[arg(long, value_delimiter = ',', default_value = "1000,4000")]
    loads: Vec<u32>,
    /// How long each offered load runs.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    load_duration: Duration,
}

/// One side's figures.
#[derive(Debug, Serialize)]
pub struct SideResult {
    /// `orderflow` or `kafka-streams`.
    pub implementation: &'static str,
    /// orderflow's guarantee, or the peer's `processing.guarantee`.
    pub guarantee: String,
    /// Orders answered (reserved + failed) over the measurement window.
    pub window: Window,
    /// Seconds from the process's start to its first answer.
    pub first_answer_s: f64,
    /// Seconds from the process's start to its last answer (every order answered).
    pub all_answered_s: f64,
    /// `VmHWM` once every order was answered, MiB.
    pub peak_rss_mib: f64,
    /// Created → answered at each offered load, after the run's orders were answered.
    pub latency: Vec<LatencyResult>,
    /// Answers read, by kind.
    pub reserved: u64,
    pub failed: u64,
    /// SIGKILL, then started again on its local state.
    pub restart_local: RestartResult,
    /// SIGKILL, state directory deleted, started again (state rebuilt from its changelog).
    pub restart_rebuild: RestartResult,
}

/// A restart after SIGKILL, timed by new orders waiting for it.
#[derive(Debug, Serialize)]
pub struct RestartResult {
    /// Seconds from the kill until the probe orders were produced (the process starts after).
    pub produced_s: f64,
    /// Seconds from the kill to the first probe order answered: processing again.
    pub kill_to_first_answer_s: f64,
    /// Seconds from the kill to the last probe order answered.
    pub kill_to_all_answered_s: f64,
    /// `VmHWM` of the restarted process once the probes were answered, MiB.
    pub peak_rss_mib: f64,
}

/// `bench peer` result (one JSON object on stdout).
#[derive(Debug, Serialize)]
pub struct PeerResult {
    /// Always `"peer"`.
    pub scenario: &'static str,
    pub orders: u64,
    pub stores: usize,
    pub stock_per_product: i64,
    pub commit_interval_ms: u64,
    pub jvm_opts: String,
    pub orderflow: SideResult,
    pub kafka_streams: SideResult,
    /// orderflow ÷ peer, orders answered/s over the window.
    pub throughput_ratio: f64,
    /// orderflow ÷ peer, peak RSS.
    pub peak_rss_ratio: f64,
    /// Every order has the same answer from both.
    pub answers_equal: bool,
    /// Orders whose answers differ, and up to 5 of them: (orderId, orderflow's, the peer's).
    pub mismatched_orders: u64,
    pub mismatch_examples: Vec<(String, String, String)>,
}

/// Runs the scenario (module docs).
///
/// Errors: a non-empty broker, a side that stops or does not answer every order within the
/// window plus 5 minutes, Kafka and codec errors.
pub async fn peer(args: PeerArgs) -> Result<PeerResult> {
    let c = &args.common;
    let loaded = crate::topology::load_topology(&c.topology, c.bootstrap.as_deref())?;
    let t = &loaded.topology;
    let spec = t.workers.get(WORKER).context("the topology has no stock-reserver worker")?;
    let guarantee = spec.guarantee(&t.defaults);
    let commit_interval_ms = c.commit_interval.unwrap_or(spec.commit_interval(&t.defaults)).as_millis() as u64;
    let partitions = t.topics.get("stock.commands").map(|s| s.partitions).unwrap_or(6);
    let dir = std::path::absolute(
        args.state_dir.clone().unwrap_or_else(|| PathBuf::from("target/bench/state").join(format!("peer-{}", now_ms()))),
    )?;
    std::fs::create_dir_all(dir.join("logs"))?;
    let topology = dir.join("topology.toml");
    let copy = super::saga::topology_copy(
        &std::fs::read_to_string(&c.topology)?,
        Duration::from_millis(commit_interval_ms),
        &std::path::absolute(loaded.avro_dir())?,
    );
    std::fs::write(&topology, without_hq_fallback(&copy)?)?;

    create_topics(t).await.context("creating topics")?;
    let peer_topics: Vec<String> = ["stock.reserved", "stock.reservation.failed", "stock.reservation.released", "order.settled"]
        .iter()
        .map(|s| format!("{PEER_PREFIX}{s}"))
        .collect();
    create_bench_topics(&t.broker, &peer_topics, partitions).await?;
    let held =
        crate::kafkaio::records_held(&crate::kafkaio::watermark_client(&t.broker, "orderflow-bench-peer")?, "stock.commands", partitions)?;
    if held > 0 {
        bail!("stock.commands already holds {held} records: the peer benchmark needs an empty broker (scripts/bench starts a fresh one per scenario)");
    }

    // The input.
    let orders = c.records.unwrap_or(200_000);
    let codec = Arc::new(Codec::load(&loaded.avro_dir(), t.broker.registry_url.as_deref())?);
    let now = now_ms();
    let mut rng = Rng(11);
    let list: Vec<_> = (0..orders).map(|i| order_in(Layout::FiveHqs, i, &mut rng, now)).collect();
    let units: i64 = list.iter().flat_map(|o| o.items.iter()).map(|i| i.quantity as i64).sum();
    let stock = ((units as f64 / (super::STORES * super::PRODUCTS) as f64) * args.stock_share).round() as i64;
    let mut encoded = Vec::new();
    for mut inv in inventory_in(Layout::FiveHqs, now) {
        inv.items.iter_mut().for_each(|i| i.delta = stock);
        let key = store_key(&inv.hq_id, &inv.store_id);
        encoded.push(("stock.commands".to_string(), key, codec.encode("stock.commands", &Event::InventoryAdjusted(inv)).await?));
    }
    for o in list {
        let key = store_key(&o.hq_id, &o.store_id);
        encoded.push(("stock.commands".to_string(), key, codec.encode("stock.commands", &Event::OrderCreated(o)).await?));
    }
    let producer: FutureProducer = client_config(&t.broker, Side::Producer).create()?;
    produce_all(&producer, encoded.into_iter()).await?;
    info!(orders, "input produced");

    // orderflow, then the peer: each started by its launcher (again for the restarts).
    let bootstrap = t.broker.bootstrap.clone();
    let exe = std::env::current_exe()?;
    let of_state = dir.join("orderflow-state");
    let of_launch = Launcher {
        implementation: "orderflow",
        state_dir: of_state.clone(),
        log_dir: dir.join("logs"),
        command: Box::new(move || {
            let mut cmd = Command::new(&exe);
            cmd.args(["--log-json", "run", "--topology"])
                .arg(&topology)
                .args(["--worker", WORKER, "--instance", "bench-peer", "--bootstrap", &bootstrap])
                .args(["--metrics-addr", &format!("127.0.0.1:{}", free_port()?)])
                .env("ORDERFLOW_STATE_DIR", &of_state)
                .env("RUST_LOG", "warn")
                .env_remove("ORDERFLOW_INSTANCE")
                .env_remove("ORDERFLOW_METRICS_ADDR");
            Ok(cmd)
        }),
    };
    let probes =
        Probes { producer: &producer, codec: &codec, now, count: PROBE_ORDERS, loads: &args.loads, load_duration: args.load_duration };
    let answers =
        Answers::start(&t.broker, &[spec.outputs["reserved"].clone(), spec.outputs["failed"].clone()], partitions, codec.clone())?;
    let (mut of, of_answers) = run_side(&of_launch, answers, orders, c, &probes).await?;
    of.guarantee = guarantee.as_str().to_string();

    let peer_guarantee = if guarantee == Guarantee::ExactlyOnce { "exactly_once_v2" } else { "at_least_once" };
    let (java, jar, jvm_opts, avro) =
        (args.java.clone(), args.peer_jar.clone(), args.jvm_opts.clone(), std::path::absolute(loaded.avro_dir())?);
    let (peer_state, bootstrap, ci) = (dir.join("peer-state"), t.broker.bootstrap.clone(), commit_interval_ms.to_string());
    let ks_launch = Launcher {
        implementation: "kafka-streams",
        state_dir: peer_state.clone(),
        log_dir: dir.join("logs"),
        command: Box::new(move || {
            let mut cmd = Command::new(&java);
            cmd.args(jvm_opts.split_whitespace())
                .arg("-jar")
                .arg(&jar)
                .args(["--bootstrap", &bootstrap, "--avro-dir"])
                .arg(&avro)
                .arg("--state-dir")
                .arg(&peer_state)
                .args(["--application-id", &format!("peer-stock-reserver-{now}"), "--output-prefix", PEER_PREFIX])
                .args(["--guarantee", peer_guarantee, "--commit-interval-ms", &ci, "--instance-id", "bench-peer"]);
            Ok(cmd)
        }),
    };
    let answers = Answers::start(&t.broker, &peer_topics[..2], partitions, codec.clone())?;
    // The peer reads what orderflow's phases left on the input too: its latency and probe orders.
    let of_extra: u64 = of.latency.iter().map(|l| l.orders).sum::<u64>() + 2 * PROBE_ORDERS;
    let (mut ks, ks_answers) = run_side(&ks_launch, answers, orders + of_extra, c, &probes).await?;
    ks.guarantee = peer_guarantee.to_string();

    // The run's orders only (the probe and latency orders differ by side).
    let (of_answers, ks_answers): (BTreeMap<_, _>, BTreeMap<_, _>) = (
        of_answers.into_iter().filter(|(o, _)| !beside_the_run(o)).collect(),
        ks_answers.into_iter().filter(|(o, _)| !beside_the_run(o)).collect(),
    );
    let mut mismatches = Vec::new();
    for (order, a) in &of_answers {
        let b = ks_answers.get(order).cloned().unwrap_or_else(|| "no answer".into());
        if *a != b {
            mismatches.push((order.clone(), a.clone(), b));
        }
    }
    mismatches
        .extend(ks_answers.keys().filter(|o| !of_answers.contains_key(*o)).map(|o| (o.clone(), "no answer".into(), ks_answers[o].clone())));
    let _ = std::fs::remove_dir_all(dir.join("orderflow-state"));
    let _ = std::fs::remove_dir_all(dir.join("peer-state"));
    Ok(PeerResult {
        scenario: "peer",
        orders,
        stores: super::STORES,
        stock_per_product: stock,
        commit_interval_ms,
        jvm_opts: args.jvm_opts.clone(),
        throughput_ratio: of.window.records_per_s / ks.window.records_per_s.max(f64::MIN_POSITIVE),
        peak_rss_ratio: of.peak_rss_mib / ks.peak_rss_mib.max(f64::MIN_POSITIVE),
        answers_equal: mismatches.is_empty(),
        mismatched_orders: mismatches.len() as u64,
        mismatch_examples: mismatches.into_iter().take(5).collect(),
        orderflow: of,
        kafka_streams: ks,
    })
}

/// `text` (a topology file) with `enabled = false` in `[workers.stock-reserver.hq_fallback]`.
///
/// Errors: the section or its `enabled` line is missing.
pub fn without_hq_fallback(text: &str) -> Result<String> {
    let header = "[workers.stock-reserver.hq_fallback]";
    let start = text.find(header).with_context(|| format!("the topology has no {header}"))?;
    let rest = &text[start + header.len()..];
    let end = rest.find("\n[").unwrap_or(rest.len());
    let line =
        rest[..end].lines().find(|l| l.trim_start().starts_with("enabled")).with_context(|| format!("no `enabled` under {header}"))?;
    let at = start + header.len() + rest.find(line).expect("found above");
    let mut out = String::with_capacity(text.len() + 64);
    out.push_str(&text[..at]);
    out.push_str("enabled = false   # bench peer: the Kafka Streams peer has no HQ level");
    out.push_str(&text[at + line.len()..]);
    Ok(out)
}

/// Orders produced before each restart (their answers time it).
const PROBE_ORDERS: u64 = 100;

/// Orders a side answers besides the run's: the restarts' probes and the latency phase's (their
/// answers differ by side and are not compared).
fn beside_the_run(order_id: &str) -> bool {
    order_id.starts_with("O-PROBE-") || order_id.starts_with(LATENCY_PREFIX)
}

/// Starts one side's process: a fresh command each time, its log in `log_dir`.
struct Launcher {
    implementation: &'static str,
    state_dir: PathBuf,
    log_dir: PathBuf,
    command: Box<dyn Fn() -> Result<Command> + Send + Sync>,
}

impl Launcher {
    fn start(&self, what: &str) -> Result<(Child, PathBuf)> {
        let log = self.log_dir.join(format!("{}-{what}.log", self.implementation));
        let child = (self.command)()?
            .stdin(Stdio::null())
            .stdout(File::create(self.log_dir.join(format!("{}-{what}.out", self.implementation)))?)
            .stderr(File::create(&log)?)
            .spawn()
            .with_context(|| format!("starting {} ({what})", self.implementation))?;
        Ok((child, log))
    }
}

/// What the restarts produce: `count` new orders each, before the process starts again.
struct Probes<'a> {
    producer: &'a FutureProducer,
    codec: &'a Codec,
    now: i64,
    count: u64,
    /// The latency phase's offered loads (orders/s) and how long each runs.
    loads: &'a [u32],
    load_duration: Duration,
}

impl Probes<'_> {
    async fn produce(&self, label: &str) -> Result<()> {
        let mut rng = Rng(13);
        let mut encoded = Vec::new();
        for i in 0..self.count {
            let mut o = order_in(Layout::FiveHqs, i, &mut rng, self.now);
            o.order_id = format!("O-PROBE-{label}-{i}");
            o.event_id = format!("probe-{label}-{i}");
            encoded.push((
                "stock.commands".to_string(),
                store_key(&o.hq_id, &o.store_id),
                self.codec.encode("stock.commands", &Event::OrderCreated(o)).await?,
            ));
        }
        produce_all(self.producer, encoded.into_iter()).await?;
        Ok(())
    }
}

/// One side's whole run: throughput until every order is answered, then a SIGKILL and a restart
/// on its local state, then a SIGKILL and a restart with its state deleted (rebuilt from its
/// changelog); returns its figures and its answers by order.
///
/// `orders` counts every order on the input when the side starts: the run's and the probe orders
/// an earlier side's restarts left there (the peer answers those too, after the run's).
async fn run_side(
    l: &Launcher,
    answers: Answers,
    orders: u64,
    c: &Common,
    probes: &Probes<'_>,
) -> Result<(SideResult, BTreeMap<String, String>)> {
    let implementation = l.implementation;
    let (mut child, log) = l.start("throughput")?;
    let started = Instant::now();
    let mut meter = Meter::new(c.warmup, c.duration, orders);
    let mut first = None;
    let give_up = started + c.warmup + c.duration + Duration::from_secs(300);
    let mut window = None;
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if let Some(status) = child.try_wait()? {
            bail!("{implementation} exited ({status}) after {} answers:\n{}", answers.count(), log_tail(&log, 30));
        }
        let n = answers.count();
        if n > 0 && first.is_none() {
            first = Some(started.elapsed().as_secs_f64());
        }
        if window.is_none() {
            window = meter.observe(Instant::now(), n);
        }
        if window.is_some() && n >= orders {
            break;
        }
        if Instant::now() > give_up {
            let _ = child.kill();
            bail!("{implementation} answered {n} of {orders} orders; gave up:\n{}", log_tail(&log, 30));
        }
    }
    let all_answered_s = started.elapsed().as_secs_f64();
    let peak_rss_mib = memory(child.id()).map(|m| m.peak_rss_mib).unwrap_or(0.0);
    let mut latency = Vec::new();
    for rate in probes.loads {
        let arrivals = |prefix: &str| answers.arrivals(prefix);
        latency.push(
            super::peer_latency::offer(
                probes.producer,
                probes.codec,
                implementation,
                *rate,
                probes.load_duration,
                Duration::from_secs(60),
                &arrivals,
            )
            .await?,
        );
    }
    let restart_local = restart(l, &mut child, &answers, probes, "local").await?;
    let restart_rebuild = restart(l, &mut child, &answers, probes, "rebuild").await?;
    let _ = child.kill();
    let _ = child.wait();
    let outcomes = answers.finish();
    info!(implementation, answers = outcomes.len(), "side done");
    let count = |kind: &str| outcomes.iter().filter(|(o, v)| !beside_the_run(o) && v.starts_with(kind)).count() as u64;
    Ok((
        SideResult {
            implementation,
            guarantee: String::new(),
            window: window.expect("set before the loop ends"),
            first_answer_s: first.unwrap_or(0.0),
            all_answered_s,
            peak_rss_mib,
            latency,
            reserved: count("reserved"),
            failed: count("failed"),
            restart_local,
            restart_rebuild,
        },
        outcomes,
    ))
}

/// SIGKILLs `child` and starts the side again (`what`: `local` keeps its state directory,
/// `rebuild` deletes it first), with [`PROBE_ORDERS`] new orders waiting: the time from the kill
/// to their first and to their last answer.
async fn restart(l: &Launcher, child: &mut Child, answers: &Answers, probes: &Probes<'_>, what: &str) -> Result<RestartResult> {
    let before = answers.count();
    let _ = child.kill();
    let _ = child.wait();
    let killed = Instant::now();
    if what == "rebuild" {
        std::fs::remove_dir_all(&l.state_dir).with_context(|| format!("deleting {}", l.state_dir.display()))?;
    }
    probes.produce(&format!("{}-{what}", l.implementation)).await?;
    let produced_s = killed.elapsed().as_secs_f64();
    let (next, log) = l.start(what)?;
    *child = next;
    let give_up = Instant::now() + Duration::from_secs(300);
    let mut first = None;
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if let Some(status) = child.try_wait()? {
            bail!("{} exited ({status}) after the {what} restart:\n{}", l.implementation, log_tail(&log, 30));
        }
        let n = answers.count();
        if n > before && first.is_none() {
            first = Some(killed.elapsed().as_secs_f64());
        }
        if n >= before + probes.count {
            break;
        }
        if Instant::now() > give_up {
            bail!(
                "{} answered {} of {} orders after the {what} restart; gave up:\n{}",
                l.implementation,
                n - before,
                probes.count,
                log_tail(&log, 30)
            );
        }
    }
    Ok(RestartResult {
        produced_s,
        kill_to_first_answer_s: first.unwrap_or(0.0),
        kill_to_all_answered_s: killed.elapsed().as_secs_f64(),
        peak_rss_mib: memory(child.id()).map(|m| m.peak_rss_mib).unwrap_or(0.0),
    })
}

/// A `read_committed` reader of a side's answer topics on a thread of its own: how many it read,
/// and each order's answer as a comparable string (`reserved P-B1=2,P-B7=1` / `failed REASON`).
struct Answers {
    count: Arc<AtomicU64>,
    outcomes: Arc<Mutex<BTreeMap<String, String>>>,
    /// Orders of the latency phase ([`LATENCY_PREFIX`]): when their answer was read, ms.
    arrivals: Arc<Mutex<BTreeMap<String, i64>>>,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Answers {
    fn start(broker: &BrokerConfig, topics: &[String], partitions: i32, codec: Arc<Codec>) -> Result<Answers> {
        let mut cfg = client_config(broker, Side::Consumer);
        cfg.set("group.id", "orderflow-bench-peer-answers").set("enable.auto.commit", "false").set("isolation.level", "read_committed");
        let consumer: BaseConsumer = cfg.create()?;
        let mut tpl = TopicPartitionList::new();
        for topic in topics {
            for p in 0..partitions {
                tpl.add_partition_offset(topic, p, Offset::Beginning)?;
            }
        }
        consumer.assign(&tpl)?;
        let (count, outcomes, stop) =
            (Arc::new(AtomicU64::new(0)), Arc::new(Mutex::new(BTreeMap::new())), Arc::new(AtomicBool::new(false)));
        let arrivals = Arc::new(Mutex::new(BTreeMap::new()));
        let (c, o, s, a) = (count.clone(), outcomes.clone(), stop.clone(), arrivals.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let Some(Ok(m)) = consumer.poll(Duration::from_millis(50)) else { continue };
                let answer = match m.payload().map(|p| codec.decode_local(p)) {
                    Some(Ok(Event::StockReserved(r))) => {
                        let mut lines: Vec<String> = r.items.iter().map(|i| format!("{}={}", i.product_id, i.reserved)).collect();
                        lines.sort();
                        (r.order_id, format!("reserved {}", lines.join(",")))
                    }
                    Some(Ok(Event::StockReservationFailed(f))) => (f.order_id, format!("failed {}", f.reason)),
                    _ => (String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(), "undecodable".into()),
                };
                if answer.0.starts_with(LATENCY_PREFIX) {
                    a.lock().expect("arrivals").insert(answer.0.clone(), now_ms());
                }
                o.lock().expect("answers").insert(answer.0, answer.1);
                c.fetch_add(1, Ordering::Relaxed);
            }
        });
        Ok(Answers { count, outcomes, arrivals, stop, thread })
    }

    /// The latency-phase orders whose id starts with `prefix`: when their answer was read, ms.
    fn arrivals(&self, prefix: &str) -> BTreeMap<String, i64> {
        self.arrivals
            .lock()
            .expect("arrivals")
            .range(prefix.to_string()..)
            .take_while(|(o, _)| o.starts_with(prefix))
            .map(|(o, t)| (o.clone(), *t))
            .collect()
    }

    fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn finish(self) -> BTreeMap<String, String> {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
        std::mem::take(&mut *self.outcomes.lock().expect("answers"))
    }
}
