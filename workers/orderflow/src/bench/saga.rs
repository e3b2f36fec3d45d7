//! `orderflow bench saga`: whole-saga throughput and latency (issue 7, items 3 and 4).
//!
//! The workers run as child processes of the bench (the same binary, `orderflow run`), either
//! all in one process (`--mode one-process`) or one process per worker (`--mode
//! process-per-worker`, each with `--worker W --metrics-addr …`). Each child gets a fresh state
//! directory (`ORDERFLOW_STATE_DIR`) under the run folder, is waited for until its `/readyz`
//! answers 200, and is stopped with SIGTERM (by PID) at the end. With `--commit-interval` the
//! children get a copy of the topology whose `[defaults] commit_interval` is that value.
//!
//! The bench itself plays the order service (produces `order.created`), the observer (reads
//! `order.confirmed`, `order.cancelled`, `stock.reservation.released` and `stock.updated` from
//! the beginning) and the POS ([`crate::demo::pos_decision`] / [`crate::demo::pos_answer`]:
//! `--complete-pct` of the confirmed orders are completed, the rest cancelled with
//! `PAYMENT_FAILED`; none is left to expire, so every order reaches a terminal state without
//! waiting for a reservation TTL).
//!
//! Orders are TPC-H orders (SF 0.01, [`crate::demo::tpch`]) cycled: order `seq` is TPC-H order
//! `seq mod 15,000` with `-c<copy>` appended to its ids from the second copy on. The initial
//! stock is the TPC-H restock scaled by `--stock-scale` (default 100: every order is reserved),
//! produced and applied (every stock line's `stock.updated` read) before any order.
//!
//! An order is **answered** when its first `order.confirmed` or `order.cancelled` is read, and
//! **terminal** when the saga is done with it: COMPLETED when the stock reserver's `stock.updated`
//! `SALE` for it is read (the POS's `order.completed` went through the deduplicator to the
//! reserver), CANCELLED when its `order.cancelled` is read and either its reservation's
//! `stock.reservation.released` is read too or the reason is `INSUFFICIENT_STOCK` (nothing was
//! reserved).
//!
//! - `--measure throughput`: `--records` orders (default 60,000) are produced as fast as the
//!   producer goes ([`produce_all`]) once the stock is applied, and the count of terminal orders
//!   is fed to [`Meter`]: the warm-up (`--warmup`) starts with the first terminal order, the
//!   window follows and ends when every order is terminal or `--duration` is over. Orders/s =
//!   terminal orders in the window ÷ window length. The bench then waits for every order to be
//!   terminal and the broker to go quiet, stops the workers and counts the broker writes per
//!   order ([`Writes`]).
//! - `--measure latency`: for each offered load of `--loads` (orders/s, in the given order),
//!   orders are produced on a fixed schedule ([`due`]) for `--warmup` + `--duration`; the
//!   latency of an order is the observer's clock when its answer is read minus the order's
//!   `occurredAt` (set just before it is encoded and handed to the producer), for the orders
//!   created after the warm-up. A load gives up when more than [`BACKLOG_SECONDS`] worth of
//!   orders are unanswered; every load waits for its orders to be terminal (up to
//!   `--settle-timeout`) before the next one starts.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use futures::{FutureExt as _, StreamExt as _};
use orderflow_api::events::*;
use orderflow_api::Event;
use orderflow_runtime::codec::Codec;
use orderflow_runtime::kafka::{client_config, create_topics, Side};
use orderflow_runtime::topology::{Loaded, Topology};
use orderflow_runtime::worker::now_ms;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;
use tracing::{info, warn};

use crate::bench::{
    free_port, http_get, log_tail, metric_samples, produce_all, settings, Common, Meter, Settings, Units, Window,
};

/// How long a `/readyz` or `/metrics` request to a worker process may take.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
use crate::demo::{port_topic, pos_answer, pos_decision, send};
use crate::demo::tpch;
use crate::kafkaio::{high_watermarks, watermark_client};

/// A latency load gives up when more than this many seconds' worth of its orders (at the target
/// rate, at least [`BACKLOG_FLOOR`] orders) are offered but not answered. In steady state the
/// unanswered orders are rate × latency (Little's law), so this is a latency of 5 s (the top of
/// the seeds' 2–5 s saga): the saga is not keeping up, and offering more would only grow the
/// backlog the next load has to wait for.
pub const BACKLOG_SECONDS: f64 = 5.0;
/// Smallest backlog (orders) a latency load tolerates before giving up.
pub const BACKLOG_FLOOR: u64 = 200;
/// The issue 7 target: whole-saga orders/s ≥ this × the broker-bound limit.
pub const TARGET_RATIO: f64 = 0.5;
/// TPC-H scale factor of the order pool (15,000 orders), cycled for longer runs.
const POOL_SCALE_FACTOR: f64 = 0.01;

/// How the workers run.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `orderflow run` with every worker in one child process.
    OneProcess,
    /// One child process per worker (`orderflow run --worker W`).
    ProcessPerWorker,
}

impl Mode {
    /// The flag value: `one-process` or `process-per-worker`.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::OneProcess => "one-process",
            Mode::ProcessPerWorker => "process-per-worker",
        }
    }
}

/// What is measured.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Measure {
    /// Orders/s to a terminal state over a pre-produced batch, and broker writes per order.
    Throughput,
    /// Created → answered latency percentiles at fixed offered loads.
    Latency,
}

/// `orderflow bench saga` flags. `--records` (throughput: orders, default 60,000), `--warmup`,
/// `--duration` (throughput: longest window; latency: measured time per load) and
/// `--commit-interval` (written into a copy of the topology's `[defaults]` for the workers) come
/// from [`Common`].
#[derive(clap::Args, Debug)]
pub struct SagaArgs {
    #[command(flatten)]
    common: Common,
    /// What to measure.
    #[arg(long, value_enum, default_value = "throughput")]
    measure: Measure,
    /// How the workers run: all in one process, or one process per worker.
    #[arg(long, value_enum, default_value = "one-process")]
    mode: Mode,
    /// Raw baseline of the same machine and broker, records/s (`bench raw`), for the
    /// broker-bound limit of the throughput.
    #[arg(long)]
    baseline: Option<f64>,
    /// Offered loads of `--measure latency`, orders/s, comma-separated, run in this order.
    #[arg(long, value_delimiter = ',', default_value = "500,2000,10000")]
    loads: Vec<u32>,
    /// Percent of confirmed orders the POS completes; the rest fail payment (order.cancelled
    /// PAYMENT_FAILED).
    #[arg(long, default_value_t = 85, value_parser = clap::value_parser!(u32).range(0..=100))]
    complete_pct: u32,
    /// Initial stock = this × the TPC-H availability (see tpch.rs); 100 reserves every order.
    #[arg(long, default_value_t = 100.0)]
    stock_scale: f64,
    /// How long to wait for the orders to be terminal after the window (throughput) or after a
    /// load's offering (latency).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    settle_timeout: Duration,
    /// Run folder (state of the workers, their logs, the topology copy); default a fresh folder
    /// under target/bench/state. Removed after a successful run.
    #[arg(long)]
    state_dir: Option<PathBuf>,
}

// ------------------------------------------------------------------ results

/// Latency percentiles, milliseconds (nearest rank, see [`percentile`]).
#[derive(Debug, Serialize, Clone, Copy, PartialEq)]
pub struct Percentiles {
    pub p50: i64,
    pub p95: i64,
    pub p99: i64,
    pub max: i64,
}

/// Broker writes of the saga during the orders' processing, from high watermarks (summed over
/// partitions) taken after the initial stock was applied and again after the workers stopped.
#[derive(Debug, Serialize, Clone, PartialEq)]
pub struct Writes {
    /// Records added per topic between the two snapshots (every declared topic, every
    /// dead-letter topic, every worker's changelog `orderflow-<worker>-changelog`; topics with
    /// none left out), the bench's own records included.
    pub records_by_topic: BTreeMap<String, i64>,
    /// Records of those the bench wrote itself: the orders (`order.created`) and, as the POS,
    /// `order.completed` and `PAYMENT_FAILED` `order.cancelled`.
    pub bench_by_topic: BTreeMap<String, i64>,
    /// Saga writes (records − bench records) per order, by topic.
    pub per_order_by_topic: BTreeMap<String, f64>,
    /// Saga writes per order: outputs, dead letters and changelog records of the workers.
    pub per_order: f64,
    /// Of `per_order`, the changelog records.
    pub changelog_per_order: f64,
    /// The POS's records per order (not in `per_order`; the broker takes them too).
    pub pos_per_order: f64,
}

/// One worker's units over the whole run, from its process's `/metrics`.
#[derive(Debug, Serialize)]
pub struct WorkerStats {
    /// The child process it ran in (`orderflow` in one-process mode, else the worker's name).
    pub process: String,
    /// Input records consumed (`orderflow_events_consumed_total`, every topic and outcome).
    pub consumed: u64,
    /// Its units (`orderflow_commit_seconds{outcome="ok"}`, `orderflow_unit_processing_seconds`).
    pub units: Units,
    /// Mean time from an input record's timestamp to its processing, milliseconds
    /// (`orderflow_processing_delay_seconds`): this hop's share of the saga's latency, the wait
    /// for the previous hop's unit to commit included.
    pub mean_processing_delay_ms: f64,
}

/// `bench saga --measure throughput` result (one JSON object on stdout).
#[derive(Debug, Serialize)]
pub struct ThroughputResult {
    /// Always `"saga"`.
    pub scenario: &'static str,
    /// Always `"throughput"`.
    pub measure: &'static str,
    /// `one-process` or `process-per-worker`.
    pub mode: &'static str,
    /// Child processes the workers ran in.
    pub processes: usize,
    /// Guarantee per worker (`effectively_once` on tansu).
    pub guarantees: BTreeMap<String, &'static str>,
    /// Commit interval per worker, milliseconds.
    pub commit_interval_ms: BTreeMap<String, u64>,
    /// Orders produced (all of them once the stock was applied).
    pub orders: u64,
    /// Rate at which the bench produced them, orders/s (the saga was already running).
    pub produce_orders_per_s: f64,
    /// Whether the last order was acknowledged before the window started (else producing
    /// overlapped the window).
    pub produced_before_window: bool,
    /// Terminal orders over the window: `records_per_s` is orders/s to a terminal state.
    pub window: Window,
    /// `window.records_per_s`.
    pub orders_per_s: f64,
    /// All orders ÷ (last terminal − first terminal), seconds: the whole run, warm-up included.
    pub first_to_last_orders_per_s: f64,
    /// Orders by terminal state: `COMPLETED`, `CANCELLED/<reason>`.
    pub outcomes: BTreeMap<String, u64>,
    /// Orders that were not terminal within `--settle-timeout` after the window.
    pub without_terminal: u64,
    /// The broker writes per order.
    pub writes: Writes,
    /// Raw baseline, records/s (`--baseline`).
    pub baseline_records_per_s: Option<f64>,
    /// The broker-bound limit: `baseline ÷ writes.per_order`, orders/s.
    pub broker_bound_orders_per_s: Option<f64>,
    /// `orders_per_s ÷ broker_bound_orders_per_s` (target ≥ [`TARGET_RATIO`]).
    pub ratio_to_limit: Option<f64>,
    /// [`TARGET_RATIO`].
    pub target_ratio: f64,
    /// Units per worker over the whole run (initial stock included).
    pub workers: BTreeMap<String, WorkerStats>,
    /// Seconds from spawning the workers to every `/readyz` answering 200.
    pub workers_ready_s: f64,
    /// Seconds to apply the initial stock (produced → every stock line's stock.updated read).
    pub stock_applied_s: f64,
    /// Stock lines of the initial stock.
    pub stock_lines: usize,
    /// Wall time of the whole scenario, seconds.
    pub wall_s: f64,
    /// The settings of the run (the topology's defaults, after `--commit-interval`).
    pub settings: Settings,
}

/// One offered load of `bench saga --measure latency`.
#[derive(Debug, Serialize)]
pub struct LoadResult {
    /// The load asked for, orders/s.
    pub target_orders_per_s: u32,
    /// Orders offered ÷ time spent offering (warm-up included), orders/s.
    pub offered_orders_per_s: f64,
    /// Orders offered in this load (warm-up included).
    pub orders: u64,
    /// Of those, created after the warm-up: the ones the percentiles are over.
    pub window_orders: u64,
    /// Seconds spent offering (warm-up + duration unless it gave up).
    pub offered_s: f64,
    /// Created → answer read, milliseconds, over `window_orders` (over every order of the load
    /// when it gave up during the warm-up); `null` without any answered order.
    pub latency_ms: Option<Percentiles>,
    /// Whether the percentiles include warm-up orders (the load gave up during the warm-up).
    pub latency_includes_warmup: bool,
    /// Orders of the load without an answer within `--settle-timeout` after the offering.
    pub unanswered: u64,
    /// Orders of the load not terminal within `--settle-timeout` after the offering.
    pub without_terminal: u64,
    /// Largest count of offered-but-unanswered orders seen while offering.
    pub max_backlog: u64,
    /// Whether the offering stopped early because the backlog exceeded [`BACKLOG_SECONDS`].
    pub gave_up: bool,
    /// Seconds from the end of the offering to the load's last answer.
    pub drain_s: f64,
    /// Whether the saga kept up: it did not give up, every order was answered, and the
    /// offered rate reached 90 % of the target.
    pub kept_up: bool,
}

/// `bench saga --measure latency` result (one JSON object on stdout).
#[derive(Debug, Serialize)]
pub struct LatencyResult {
    /// Always `"saga"`.
    pub scenario: &'static str,
    /// Always `"latency"`.
    pub measure: &'static str,
    /// `one-process` or `process-per-worker`.
    pub mode: &'static str,
    /// Child processes the workers ran in.
    pub processes: usize,
    /// Commit interval per worker, milliseconds.
    pub commit_interval_ms: BTreeMap<String, u64>,
    /// Seconds of each load that are offered but not measured.
    pub warmup_s: f64,
    /// Seconds of each load whose orders are measured.
    pub duration_s: f64,
    /// One entry per `--loads` value, in order.
    pub loads: Vec<LoadResult>,
    /// Orders by terminal state over every load.
    pub outcomes: BTreeMap<String, u64>,
    /// Units per worker over the whole run.
    pub workers: BTreeMap<String, WorkerStats>,
    /// Seconds from spawning the workers to every `/readyz` answering 200.
    pub workers_ready_s: f64,
    /// Wall time of the whole scenario, seconds.
    pub wall_s: f64,
    /// The settings of the run.
    pub settings: Settings,
}

/// Runs the scenario; its JSON object is printed by the caller.
pub async fn run(args: SagaArgs) -> Result<serde_json::Value> {
    Ok(match args.measure {
        Measure::Throughput => serde_json::to_value(throughput(&args).await?)?,
        Measure::Latency => serde_json::to_value(latency(&args).await?)?,
    })
}

// ------------------------------------------------------------------ pure parts

/// Nearest-rank percentile of ascending `sorted` values, `q` in (0, 1]: the value at rank
/// ⌈q·n⌉. `None` when empty.
pub fn percentile(sorted: &[i64], q: f64) -> Option<i64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// p50/p95/p99/max of `values` (any order), milliseconds.
pub fn percentiles(mut values: Vec<i64>) -> Option<Percentiles> {
    values.sort_unstable();
    Some(Percentiles {
        p50: percentile(&values, 0.50)?,
        p95: percentile(&values, 0.95)?,
        p99: percentile(&values, 0.99)?,
        max: *values.last()?,
    })
}

/// Orders due by `elapsed` on a schedule of `rate` orders/s whose first order is due at 0:
/// ⌊elapsed·rate⌋ + 1.
pub fn due(rate: f64, elapsed: Duration) -> u64 {
    (elapsed.as_secs_f64() * rate).floor() as u64 + 1
}

/// When order number `n` (0-based) is due on that schedule: n ÷ rate.
pub fn due_at(rate: f64, n: u64) -> Duration {
    Duration::from_secs_f64(n as f64 / rate)
}

/// Backlog (orders) above which a load of `rate` orders/s gives up: [`BACKLOG_SECONDS`] of
/// orders, at least [`BACKLOG_FLOOR`].
pub fn backlog_limit(rate: f64) -> u64 {
    ((rate * BACKLOG_SECONDS) as u64).max(BACKLOG_FLOOR)
}

/// Writes per order from the records added per topic (`records`), those of them the bench
/// wrote (`bench`: its orders and the POS's answers; `pos_topics` names the POS's topics),
/// the changelog topics, and the orders.
pub fn writes_per_order(
    records: &BTreeMap<String, i64>,
    bench: &BTreeMap<String, i64>,
    pos: &BTreeMap<String, i64>,
    changelogs: &BTreeSet<String>,
    orders: u64,
) -> Writes {
    let per = |n: i64| if orders > 0 { n as f64 / orders as f64 } else { 0.0 };
    let mut bench_by_topic = bench.clone();
    for (t, n) in pos {
        *bench_by_topic.entry(t.clone()).or_default() += n;
    }
    let mut per_order_by_topic = BTreeMap::new();
    let (mut saga, mut changelog) = (0i64, 0i64);
    for (topic, n) in records {
        let own = (n - bench_by_topic.get(topic).copied().unwrap_or(0)).max(0);
        if own == 0 {
            continue;
        }
        saga += own;
        if changelogs.contains(topic) {
            changelog += own;
        }
        per_order_by_topic.insert(topic.clone(), per(own));
    }
    Writes {
        records_by_topic: records.iter().filter(|(_, n)| **n > 0).map(|(t, n)| (t.clone(), *n)).collect(),
        bench_by_topic: bench_by_topic.into_iter().filter(|(_, n)| *n > 0).collect(),
        per_order_by_topic,
        per_order: per(saga),
        changelog_per_order: per(changelog),
        pos_per_order: per(pos.values().sum()),
    }
}

/// The topology text with `[defaults] commit_interval` set to `commit_interval` (the line
/// replaced, or added after the `[defaults]` header, or a `[defaults]` table appended) and the
/// top-level `avro_dir` set to `avro_dir` (the copy lives elsewhere than the schemas).
pub fn topology_copy(text: &str, commit_interval: Duration, avro_dir: &Path) -> String {
    let ci = format!("commit_interval = \"{}\"", humantime::format_duration(commit_interval));
    // A JSON string is a valid TOML basic string.
    let avro = format!("avro_dir = {}", serde_json::Value::String(avro_dir.display().to_string()));
    let key_of = |line: &str| line.trim_start().split(['=', ' ', '\t']).next().unwrap_or("").to_string();
    let mut out: Vec<String> = vec![avro];
    let (mut section, mut ci_done, mut saw_defaults) = (String::new(), false, false);
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('[') {
            if section == "[defaults]" && !ci_done {
                out.push(ci.clone());
                ci_done = true;
            }
            section = trimmed.split('#').next().unwrap_or("").trim().to_string();
            saw_defaults |= section == "[defaults]";
        } else if section.is_empty() && key_of(line) == "avro_dir" {
            continue;
        } else if section == "[defaults]" && key_of(line) == "commit_interval" {
            out.push(ci.clone());
            ci_done = true;
            continue;
        }
        out.push(line.to_string());
    }
    if !ci_done {
        if !saw_defaults {
            out.push("[defaults]".into());
        }
        out.push(ci);
    }
    out.join("\n") + "\n"
}

/// Per worker of `text` (one process's `/metrics`): consumed records and unit statistics.
fn worker_stats(text: &str, process: &str, workers: &[String]) -> BTreeMap<String, WorkerStats> {
    let sum = |metric: &str, worker: &str, extra: Option<(&str, &str)>| -> f64 {
        metric_samples(text, metric)
            .iter()
            .filter(|(l, _)| l.get("worker").map(String::as_str) == Some(worker))
            .filter(|(l, _)| extra.is_none_or(|(k, v)| l.get(k).map(String::as_str) == Some(v)))
            .map(|(_, v)| v)
            .sum()
    };
    workers
        .iter()
        .map(|w| {
            let consumed = sum("orderflow_events_consumed_total", w, None) as u64;
            let count = sum("orderflow_commit_seconds_count", w, Some(("outcome", "ok"))) as u64;
            let mean = |s: f64| if count > 0 { s * 1000.0 / count as f64 } else { 0.0 };
            let units = Units {
                count,
                mean_records: consumed as f64 / count.max(1) as f64,
                // Idle units are observed too but take ~0: divide by the committed ones (as bench worker).
                mean_processing_ms: mean(sum("orderflow_unit_processing_seconds_sum", w, None)),
                mean_commit_ms: mean(sum("orderflow_commit_seconds_sum", w, Some(("outcome", "ok")))),
            };
            let delays = sum("orderflow_processing_delay_seconds_count", w, None);
            let mean_processing_delay_ms =
                if delays > 0.0 { sum("orderflow_processing_delay_seconds_sum", w, None) * 1000.0 / delays } else { 0.0 };
            (w.clone(), WorkerStats { process: process.to_string(), consumed, units, mean_processing_delay_ms })
        })
        .collect()
}

// ------------------------------------------------------------------ orders

/// TPC-H orders, cycled with fresh ids (see the module docs).
struct Orders {
    pool: Vec<OrderCreated>,
}

impl Orders {
    /// Order number `seq` of the run.
    fn nth(&self, seq: u64) -> OrderCreated {
        let len = self.pool.len() as u64;
        let mut o = self.pool[(seq % len) as usize].clone();
        let copy = seq / len;
        if copy > 0 {
            o.order_id = format!("{}-c{copy}", o.order_id);
            o.event_id = format!("{}-c{copy}", o.event_id);
        }
        o
    }
}

// ------------------------------------------------------------------ the observer

/// What the observer knows of one order.
#[derive(Debug, Clone)]
struct Track {
    seq: u64,
    created_ms: i64,
    load: usize,
    /// Created after the load's warm-up.
    measured: bool,
    latency_ms: Option<i64>,
    confirmed: bool,
    cancelled: Option<String>,
    released: bool,
    sold: bool,
    terminal: bool,
}

impl Track {
    fn new(seq: u64, created_ms: i64, load: usize, measured: bool) -> Track {
        Track {
            seq,
            created_ms,
            load,
            measured,
            latency_ms: None,
            confirmed: false,
            cancelled: None,
            released: false,
            sold: false,
            terminal: false,
        }
    }

    /// The terminal state, once the saga is done with the order (see the module docs).
    fn terminal_state(&self) -> Option<String> {
        if self.sold {
            return Some("COMPLETED".into());
        }
        match &self.cancelled {
            Some(reason) if self.released || reason == cancel_reason::INSUFFICIENT_STOCK => Some(format!("CANCELLED/{reason}")),
            _ => None,
        }
    }
}

/// Counts of one load.
#[derive(Debug, Default, Clone)]
struct LoadCounts {
    answered: u64,
    terminal: u64,
    first_terminal: Option<Instant>,
    last_terminal: Option<Instant>,
    last_answer: Option<Instant>,
}

/// The observer's book, shared with the offering side.
#[derive(Default)]
struct Book {
    orders: HashMap<String, Track>,
    loads: Vec<LoadCounts>,
    outcomes: BTreeMap<String, u64>,
    /// Initial-stock lines applied (their `stock.updated` read).
    stock_lines: usize,
}

impl Book {
    fn new_load(&mut self) -> usize {
        self.loads.push(LoadCounts::default());
        self.loads.len() - 1
    }

    /// Records an answer (first order.confirmed / order.cancelled) of `tr`, read at `read_ms`.
    fn answered(loads: &mut [LoadCounts], tr: &mut Track, read_ms: i64, now: Instant) {
        if tr.latency_ms.is_none() {
            tr.latency_ms = Some(read_ms - tr.created_ms);
            let l = &mut loads[tr.load];
            l.answered += 1;
            l.last_answer = Some(now);
        }
    }

    fn check_terminal(loads: &mut [LoadCounts], outcomes: &mut BTreeMap<String, u64>, tr: &mut Track, now: Instant) {
        if tr.terminal {
            return;
        }
        if let Some(state) = tr.terminal_state() {
            tr.terminal = true;
            *outcomes.entry(state).or_default() += 1;
            let l = &mut loads[tr.load];
            l.terminal += 1;
            l.first_terminal.get_or_insert(now);
            l.last_terminal = Some(now);
        }
    }
}

/// Records the POS wrote (acknowledged), by topic.
#[derive(Default)]
struct PosCounts {
    completed: AtomicU64,
    cancelled: AtomicU64,
}

/// Topics the observer and the POS use.
#[derive(Clone)]
struct SagaTopics {
    confirmed: String,
    cancelled: String,
    released: String,
    updated: String,
    completed: String,
}

impl SagaTopics {
    fn of(t: &Topology) -> Result<SagaTopics> {
        Ok(SagaTopics {
            confirmed: port_topic(t, "order-confirmer", "confirmed")?,
            cancelled: port_topic(t, "canceller", "cancelled")?,
            released: port_topic(t, "stock-reserver", "released")?,
            updated: port_topic(t, "stock-reserver", "updated")?,
            completed: "order.completed".into(),
        })
    }
}

/// Reads the saga's answers from the beginning, updates `book` and plays the POS.
#[allow(clippy::too_many_arguments)]
fn spawn_observer(
    t: &Topology,
    topics: SagaTopics,
    codec: Arc<Codec>,
    producer: FutureProducer,
    book: Arc<Mutex<Book>>,
    orders: Arc<Orders>,
    pos: Arc<PosCounts>,
    complete_pct: u32,
) -> Result<tokio::task::JoinHandle<()>> {
    let observer: StreamConsumer =
        client_config(&t.broker, Side::Consumer).set("group.id", format!("orderflow-bench-saga-observer-{}", now_ms())).create()?;
    let mut tpl = TopicPartitionList::new();
    for topic in [&topics.confirmed, &topics.cancelled, &topics.released, &topics.updated] {
        let partitions = t.topics.get(topic).map(|s| s.partitions).unwrap_or(1);
        for p in 0..partitions {
            tpl.add_partition_offset(topic, p, Offset::Beginning)?;
        }
    }
    observer.assign(&tpl)?;
    Ok(tokio::spawn(async move {
        let mut stream = observer.stream();
        while let Some(msg) = stream.next().await {
            let msg = match msg {
                Ok(m) => m,
                Err(e) => {
                    warn!(error = %e, "observer consumer error");
                    continue;
                }
            };
            let Ok(event) = codec.decode(msg.payload().unwrap_or_default()).await else { continue };
            let (read_ms, now) = (now_ms(), Instant::now());
            let mut pos_action = None;
            {
                let mut guard = book.lock().expect("book");
                let b = &mut *guard;
                let order_id = match &event {
                    Event::OrderConfirmed(e) => &e.order_id,
                    Event::OrderCancelled(e) => &e.order_id,
                    Event::StockReservationReleased(e) => &e.order_id,
                    Event::StockUpdated(u) if u.change_reason == change_reason::SALE => &u.reference_id,
                    Event::StockUpdated(u) => {
                        if u.reference_id == tpch::INITIAL_STOCK_REFERENCE {
                            b.stock_lines += 1;
                        }
                        continue;
                    }
                    _ => continue,
                };
                let Some(tr) = b.orders.get_mut(order_id) else { continue };
                match &event {
                    Event::OrderConfirmed(e) => {
                        Book::answered(&mut b.loads, tr, read_ms, now);
                        if !tr.confirmed {
                            tr.confirmed = true;
                            pos_action = Some((pos_decision(&e.order_id, complete_pct, 100 - complete_pct), tr.seq, e.clone()));
                        }
                    }
                    Event::OrderCancelled(e) => {
                        Book::answered(&mut b.loads, tr, read_ms, now);
                        tr.cancelled.get_or_insert_with(|| e.reason.clone());
                    }
                    Event::StockReservationReleased(_) => tr.released = true,
                    _ => tr.sold = true,
                }
                Book::check_terminal(&mut b.loads, &mut b.outcomes, tr, now);
            }
            if let Some((decision, seq, confirmed)) = pos_action {
                let order = orders.nth(seq);
                if let Some((topic, event)) = pos_answer(decision, &order, &confirmed, &topics.completed, &topics.cancelled) {
                    // In the background: reading answers never waits for the POS's acknowledgement.
                    let (producer, codec, pos) = (producer.clone(), codec.clone(), pos.clone());
                    let completed = topic == topics.completed;
                    tokio::spawn(async move {
                        match send(&producer, &codec, &topic, &order.order_id, &event).await {
                            Ok(()) if completed => pos.completed.fetch_add(1, Ordering::Relaxed),
                            Ok(()) => pos.cancelled.fetch_add(1, Ordering::Relaxed),
                            Err(e) => {
                                tracing::error!(error = %e, "POS could not produce");
                                0
                            }
                        };
                    });
                }
            }
        }
    }))
}

// ------------------------------------------------------------------ worker processes

/// One child process running workers.
struct Proc {
    name: String,
    workers: Vec<String>,
    port: u16,
    log: PathBuf,
    child: tokio::process::Child,
}

/// Spawns the workers as children (`current_exe() run …`), in `mode`, and waits for each
/// `/readyz` to answer 200.
async fn spawn_procs(mode: Mode, topology: &Path, t: &Topology, run_dir: &Path) -> Result<Vec<Proc>> {
    let exe = std::env::current_exe().context("locating the orderflow binary")?;
    let all: Vec<String> = t.workers.keys().cloned().collect();
    let groups: Vec<(String, Vec<String>)> = match mode {
        Mode::OneProcess => vec![("orderflow".into(), all)],
        Mode::ProcessPerWorker => all.into_iter().map(|w| (w.clone(), vec![w])).collect(),
    };
    let mut procs = Vec::new();
    for (name, workers) in groups {
        let port = free_port()?;
        let log = run_dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = tokio::process::Command::new(&exe);
        cmd.arg("run")
            .arg("--topology")
            .arg(topology)
            .args(["--bootstrap", &t.broker.bootstrap, "--instance", "bench", "--metrics-addr", &format!("127.0.0.1:{port}")])
            .env("ORDERFLOW_STATE_DIR", run_dir.join("state"))
            .stdin(std::process::Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .kill_on_drop(true);
        if mode == Mode::ProcessPerWorker {
            for w in &workers {
                cmd.args(["--worker", w]);
            }
        }
        let child = cmd.spawn().with_context(|| format!("spawning {} run ({name})", exe.display()))?;
        info!(process = %name, pid = child.id(), port, "worker process started");
        procs.push(Proc { name, workers, port, log, child });
    }
    let deadline = Instant::now() + Duration::from_secs(180);
    for p in &mut procs {
        loop {
            if matches!(http_get(p.port, "/readyz", HTTP_TIMEOUT).await, Some((200, _))) {
                break;
            }
            if let Some(status) = p.child.try_wait()? {
                bail!(
                    "worker process {} exited ({status}) before it was ready; log {}:\n{}",
                    p.name,
                    p.log.display(),
                    log_tail(&p.log, 20)
                );
            }
            if Instant::now() > deadline {
                bail!("worker process {} not ready within 180 s; log {}:\n{}", p.name, p.log.display(), log_tail(&p.log, 20));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(procs)
}

/// Scrapes each process's `/metrics`, then stops them: SIGTERM by PID, SIGKILL after 60 s.
async fn stop_procs(procs: Vec<Proc>) -> Result<BTreeMap<String, WorkerStats>> {
    let mut stats = BTreeMap::new();
    for p in &procs {
        match http_get(p.port, "/metrics", HTTP_TIMEOUT).await {
            Some((200, text)) => stats.extend(worker_stats(&text, &p.name, &p.workers)),
            other => warn!(process = %p.name, answer = ?other.map(|(c, _)| c), "could not read /metrics"),
        }
    }
    for p in &procs {
        if let Some(pid) = p.child.id() {
            let status = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status().context("running kill -TERM")?;
            if !status.success() {
                warn!(process = %p.name, pid, "kill -TERM failed");
            }
        }
    }
    for mut p in procs {
        match tokio::time::timeout(Duration::from_secs(60), p.child.wait()).await {
            Ok(Ok(s)) if s.success() => info!(process = %p.name, "worker process stopped"),
            Ok(Ok(s)) => warn!(process = %p.name, status = %s, log = %p.log.display(), "worker process exited non-zero"),
            Ok(Err(e)) => warn!(process = %p.name, error = %e, "waiting for the worker process"),
            Err(_) => {
                warn!(process = %p.name, "no exit 60 s after SIGTERM: killing it");
                let _ = p.child.kill().await;
            }
        }
    }
    Ok(stats)
}

// ------------------------------------------------------------------ the rig

/// Topics whose writes are counted, with their partitions: every declared topic, every
/// dead-letter topic (its source's partitions) and every worker's changelog (its inputs').
fn counted_topics(t: &Topology) -> Vec<(String, i32)> {
    let parts = |topic: &str| t.topics.get(topic).map(|s| s.partitions).unwrap_or(1);
    let mut out: Vec<(String, i32)> = t.topics.iter().map(|(n, s)| (n.clone(), s.partitions)).collect();
    for (dlq, sources) in t.dead_letter_topics() {
        let p = sources.iter().next().map(|s| parts(s)).unwrap_or(1);
        out.push((dlq, p));
    }
    for (name, w) in &t.workers {
        out.push((orderflow_runtime::changelog::topic(name), w.inputs.first().map(|i| parts(i)).unwrap_or(1)));
    }
    out
}

fn snapshot(client: &BaseConsumer, topics: &[(String, i32)]) -> Result<BTreeMap<String, i64>> {
    topics.iter().map(|(t, p)| Ok((t.clone(), high_watermarks(client, t, *p)?))).collect()
}

/// Waits until no counted topic grows for 2 s (at most `max`); returns the last snapshot.
async fn quiesce(client: &BaseConsumer, topics: &[(String, i32)], max: Duration) -> Result<BTreeMap<String, i64>> {
    let give_up = Instant::now() + max;
    let mut last = snapshot(client, topics)?;
    let mut stable_since = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = snapshot(client, topics)?;
        if now != last {
            last = now;
            stable_since = Instant::now();
        } else if stable_since.elapsed() >= Duration::from_secs(2) {
            return Ok(last);
        }
        if Instant::now() > give_up {
            warn!("the broker did not go quiet within {max:?}");
            return Ok(last);
        }
    }
}

/// Everything a scenario runs on: the workers, the observer/POS, the producer.
struct Rig {
    loaded: Arc<Loaded>,
    codec: Arc<Codec>,
    producer: FutureProducer,
    book: Arc<Mutex<Book>>,
    orders: Arc<Orders>,
    pos: Arc<PosCounts>,
    procs: Vec<Proc>,
    observer: tokio::task::JoinHandle<()>,
    watermarks: BaseConsumer,
    counted: Vec<(String, i32)>,
    run_dir: PathBuf,
    workers_ready_s: f64,
    stock_applied_s: f64,
    stock_lines: usize,
}

impl Rig {
    /// Loads the topology (copying it with `--commit-interval`), checks the broker is empty,
    /// creates the topics, starts the workers, the observer and the POS, and applies the initial
    /// stock.
    async fn start(args: &SagaArgs) -> Result<Rig> {
        let c = &args.common;
        let run_dir = args.state_dir.clone().unwrap_or_else(|| {
            PathBuf::from("target/bench/state").join(format!("saga-{:?}-{}-{}", args.measure, args.mode.as_str(), now_ms()).to_lowercase())
        });
        let run_dir = std::path::absolute(&run_dir).with_context(|| format!("resolving {}", run_dir.display()))?;
        std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
        let mut topology_path = c.topology.clone();
        if let Some(ci) = c.commit_interval {
            let original = crate::topology::load_topology(&c.topology, c.bootstrap.as_deref())?;
            let avro = std::path::absolute(original.avro_dir())?;
            let text = std::fs::read_to_string(&c.topology).with_context(|| format!("reading {}", c.topology.display()))?;
            topology_path = run_dir.join("topology.toml");
            std::fs::write(&topology_path, topology_copy(&text, ci, &avro))
                .with_context(|| format!("writing {}", topology_path.display()))?;
        }
        let mut loaded =
            crate::topology::load_topology(&topology_path, c.bootstrap.as_deref()).with_context(|| format!("loading {}", topology_path.display()))?;
        loaded.topology.defaults.state_dir = run_dir.join("state");
        let loaded = Arc::new(loaded);
        let t = &loaded.topology;
        if let Some(ci) = c.commit_interval {
            for (name, w) in &t.workers {
                if w.commit_interval(&t.defaults) != ci {
                    warn!(worker = %name, "the worker sets its own commit_interval: --commit-interval does not apply to it");
                }
            }
        }

        let watermarks = watermark_client(&t.broker, "orderflow-bench-saga-watermarks")?;
        create_topics(t).await.context("creating topics")?;
        let previous = high_watermarks(&watermarks, "order.created", t.topics.get("order.created").map(|s| s.partitions).unwrap_or(1))?;
        if previous > 0 {
            bail!("order.created already holds {previous} records: the saga benchmark needs an empty broker (scripts/bench starts a fresh one per scenario)");
        }
        let counted = counted_topics(t);

        let codec = Arc::new(Codec::load(&loaded.avro_dir(), t.broker.registry_url.as_deref())?);
        let producer: FutureProducer = client_config(&t.broker, Side::Producer).create()?;
        let input = tpch::generate(&tpch::TpchOptions {
            scale_factor: POOL_SCALE_FACTOR,
            max_orders: None,
            stock_scale: args.stock_scale,
            base_time_ms: now_ms(),
        });
        let orders = Arc::new(Orders { pool: input.orders });

        let spawned = Instant::now();
        let procs = spawn_procs(args.mode, &topology_path, t, &run_dir).await?;
        let workers_ready_s = spawned.elapsed().as_secs_f64();
        info!(seconds = workers_ready_s, processes = procs.len(), "workers ready");

        let book = Arc::new(Mutex::new(Book::default()));
        let pos = Arc::new(PosCounts::default());
        let observer = spawn_observer(
            t,
            SagaTopics::of(t)?,
            codec.clone(),
            producer.clone(),
            book.clone(),
            orders.clone(),
            pos.clone(),
            args.complete_pct,
        )?;

        // The initial stock, applied before any order (orders and stock travel on different topics).
        let stock_lines: usize = input.inventory.iter().map(|i| i.items.iter().map(|x| &x.product_id).collect::<BTreeSet<_>>().len()).sum();
        let stock_started = Instant::now();
        for inv in &input.inventory {
            send(&producer, &codec, "inventory.adjusted", &store_key(&inv.hq_id, &inv.store_id), &Event::InventoryAdjusted(inv.clone()))
                .await?;
        }
        loop {
            let applied = book.lock().expect("book").stock_lines;
            if applied >= stock_lines {
                break;
            }
            if stock_started.elapsed() > Duration::from_secs(180) {
                bail!("the initial stock was not applied within 180 s ({applied} of {stock_lines} stock lines)");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let stock_applied_s = stock_started.elapsed().as_secs_f64();
        info!(stock_lines, seconds = stock_applied_s, "initial stock applied");
        Ok(Rig {
            loaded,
            codec,
            producer,
            book,
            orders,
            pos,
            procs,
            observer,
            watermarks,
            counted,
            run_dir,
            workers_ready_s,
            stock_applied_s,
            stock_lines,
        })
    }

    fn topology(&self) -> &Topology {
        &self.loaded.topology
    }

    fn commit_intervals(&self) -> BTreeMap<String, u64> {
        let t = self.topology();
        t.workers.iter().map(|(n, w)| (n.clone(), w.commit_interval(&t.defaults).as_millis() as u64)).collect()
    }

    fn settings(&self) -> Settings {
        let t = self.topology();
        let partitions = t.topics.get("order.created").map(|s| s.partitions).unwrap_or(1);
        settings(t, t.defaults.commit_interval, t.defaults.max_batch, partitions)
    }

    /// Encodes order `seq`, created now, and records it in the book.
    async fn next_order(&self, seq: u64, load: usize, measured: bool) -> Result<(String, Vec<u8>)> {
        let mut o = self.orders.nth(seq);
        let created_ms = now_ms();
        o.occurred_at = created_ms;
        let bytes = self.codec.encode("order.created", &Event::OrderCreated(o.clone())).await?;
        self.book.lock().expect("book").orders.insert(o.order_id.clone(), Track::new(seq, created_ms, load, measured));
        Ok((o.order_id, bytes))
    }

    /// Stops the workers and the observer; returns the workers' statistics.
    async fn stop(self) -> Result<(BTreeMap<String, WorkerStats>, BaseConsumer, PathBuf)> {
        let stats = stop_procs(self.procs).await?;
        self.observer.abort();
        Ok((stats, self.watermarks, self.run_dir))
    }
}

// ------------------------------------------------------------------ throughput

async fn throughput(args: &SagaArgs) -> Result<ThroughputResult> {
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
    let counted = rig.counted.clone();
    let (workers, watermarks, run_dir) = rig.stop().await?;

    let after = snapshot(&watermarks, &counted)?;
    let added: BTreeMap<String, i64> = after.iter().map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0))).collect();
    let bench = BTreeMap::from([("order.created".to_string(), n as i64)]);
    let pos_writes = BTreeMap::from([("order.completed".to_string(), pos.0), (port_topic(t, "canceller", "cancelled")?, pos.1)]);
    let changelogs: BTreeSet<String> = t.workers.keys().map(|w| orderflow_runtime::changelog::topic(w)).collect();
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
        guarantees: t.workers.iter().map(|(n, w)| (n.clone(), w.guarantee(&t.defaults).as_str())).collect(),
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

async fn latency(args: &SagaArgs) -> Result<LatencyResult> {
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
    let processes = rig.procs.len();
    let (workers, _, run_dir) = rig.stop().await?;
    let _ = std::fs::remove_dir_all(&run_dir);
    Ok(LatencyResult {
        scenario: "saga",
        measure: "latency",
        mode: args.mode.as_str(),
        processes,
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
async fn offer_load(rig: &Rig, target: u32, warmup: Duration, duration: Duration, settle: Duration, seq: &mut u64) -> Result<LoadResult> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<i64> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.5), Some(50));
        assert_eq!(percentile(&v, 0.95), Some(95));
        assert_eq!(percentile(&v, 0.99), Some(99));
        assert_eq!(percentile(&v, 1.0), Some(100));
        assert_eq!(percentile(&[7], 0.5), Some(7));
        assert_eq!(percentile(&[], 0.5), None);
        let p = percentiles(vec![30, 10, 20]).unwrap();
        assert_eq!(p, Percentiles { p50: 20, p95: 30, p99: 30, max: 30 });
        assert!(percentiles(Vec::new()).is_none());
    }

    #[test]
    fn the_schedule_offers_rate_orders_per_second() {
        assert_eq!(due(500.0, Duration::ZERO), 1);
        assert_eq!(due(500.0, Duration::from_millis(1)), 1);
        assert_eq!(due(500.0, Duration::from_millis(2)), 2);
        assert_eq!(due(500.0, Duration::from_secs(1)), 501);
        assert_eq!(due(10_000.0, Duration::from_secs(3)), 30_001);
        assert_eq!(due_at(500.0, 0), Duration::ZERO);
        assert_eq!(due_at(500.0, 500), Duration::from_secs(1));
        // Sleeping until `due_at(sent)` makes exactly one more order due.
        for n in [1u64, 7, 499, 12_345] {
            assert_eq!(due(2_000.0, due_at(2_000.0, n)), n + 1);
        }
        assert_eq!(backlog_limit(10.0), BACKLOG_FLOOR);
        assert_eq!(backlog_limit(500.0), 2_500);
        assert_eq!(backlog_limit(10_000.0), 50_000);
    }

    #[test]
    fn writes_per_order_leave_out_the_bench_and_the_pos() {
        let records: BTreeMap<String, i64> = [
            ("order.created", 100),
            ("stock.commands", 185),
            ("order.completed", 85),
            ("order.cancelled", 15),
            ("orderflow-deduplicator-changelog", 190),
            ("order.created.dlq", 0),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let bench = BTreeMap::from([("order.created".to_string(), 100)]);
        let pos = BTreeMap::from([("order.completed".to_string(), 85), ("order.cancelled".to_string(), 15)]);
        let changelogs = BTreeSet::from(["orderflow-deduplicator-changelog".to_string()]);
        let w = writes_per_order(&records, &bench, &pos, &changelogs, 100);
        assert!((w.per_order - 3.75).abs() < 1e-9);
        assert!((w.changelog_per_order - 1.9).abs() < 1e-9);
        assert!((w.pos_per_order - 1.0).abs() < 1e-9);
        assert_eq!(w.per_order_by_topic.keys().collect::<Vec<_>>(), ["orderflow-deduplicator-changelog", "stock.commands"]);
        assert!(!w.records_by_topic.contains_key("order.created.dlq"));
        assert_eq!(w.bench_by_topic["order.cancelled"], 15);
        assert_eq!(writes_per_order(&records, &bench, &pos, &changelogs, 0).per_order, 0.0);
    }

    #[test]
    fn the_topology_copy_sets_the_commit_interval_and_the_schemas() {
        let text = "# c\n[broker]\nbootstrap = \"x\"\n\n[defaults]\nguarantee = \"effectively_once\"\ncommit_interval = \"100ms\"   # note\nmax_batch = 2000\n\n[topics.\"a\"]\npartitions = 6\n";
        let out = topology_copy(text, Duration::from_millis(20), Path::new("/r/avro"));
        assert!(out.starts_with("avro_dir = \"/r/avro\"\n"));
        assert!(out.contains("[defaults]\nguarantee = \"effectively_once\"\ncommit_interval = \"20ms\"\nmax_batch = 2000\n"));
        assert_eq!(out.matches("commit_interval").count(), 1);
        // No commit_interval in [defaults]: added at the end of the table.
        let out =
            topology_copy("[defaults]\nmax_batch = 1\n[workers.w]\ncommit_interval = \"5ms\"\n", Duration::from_secs(1), Path::new("/a"));
        assert!(out.contains("[defaults]\nmax_batch = 1\ncommit_interval = \"1s\"\n[workers.w]\ncommit_interval = \"5ms\"\n"));
        // No [defaults] at all: appended.
        let out = topology_copy("avro_dir = \"avro\"\n[broker]\n", Duration::from_millis(50), Path::new("/a"));
        assert_eq!(out, "avro_dir = \"/a\"\n[broker]\n[defaults]\ncommit_interval = \"50ms\"\n");
    }

    #[test]
    fn worker_stats_come_from_the_metrics_text() {
        let text = "# HELP x\norderflow_events_consumed_total{outcome=\"processed\",topic=\"a\",worker=\"w\"} 30\n\
            orderflow_events_consumed_total{outcome=\"duplicate\",topic=\"b\",worker=\"w\"} 10\n\
            orderflow_events_consumed_total{outcome=\"processed\",topic=\"a\",worker=\"v\"} 5\n\
            orderflow_commit_seconds_sum{outcome=\"ok\",worker=\"w\"} 0.5\n\
            orderflow_commit_seconds_count{outcome=\"ok\",worker=\"w\"} 4\n\
            orderflow_commit_seconds_count{outcome=\"error\",worker=\"w\"} 9\n\
            orderflow_unit_processing_seconds_sum{worker=\"w\"} 0.1\n\
            orderflow_processing_delay_seconds_sum{worker=\"w\"} 2\n\
            orderflow_processing_delay_seconds_count{worker=\"w\"} 40\n";
        let s = worker_stats(text, "p", &["w".to_string()]);
        let w = &s["w"];
        assert_eq!((w.consumed, w.units.count), (40, 4));
        assert!((w.units.mean_records - 10.0).abs() < 1e-9);
        assert!((w.units.mean_commit_ms - 125.0).abs() < 1e-9);
        assert!((w.units.mean_processing_ms - 25.0).abs() < 1e-9);
        assert!((w.mean_processing_delay_ms - 50.0).abs() < 1e-9);
    }

    #[test]
    fn cycled_orders_get_fresh_ids_and_terminal_states_follow_the_module_docs() {
        let o = |id: &str| OrderCreated {
            event_id: format!("e-{id}"),
            occurred_at: 0,
            order_id: id.into(),
            customer_id: "c".into(),
            hq_id: "h".into(),
            store_id: "s".into(),
            items: vec![],
        };
        let orders = Orders { pool: vec![o("O-1"), o("O-2")] };
        assert_eq!(orders.nth(1).order_id, "O-2");
        assert_eq!(orders.nth(2).order_id, "O-1-c1");
        assert_eq!(orders.nth(5).event_id, "e-O-2-c2");

        let mut tr = Track::new(0, 0, 0, true);
        assert_eq!(tr.terminal_state(), None);
        tr.cancelled = Some(cancel_reason::PAYMENT_FAILED.into());
        assert_eq!(tr.terminal_state(), None, "a reservation still held");
        tr.released = true;
        assert_eq!(tr.terminal_state().as_deref(), Some("CANCELLED/PAYMENT_FAILED"));
        let mut tr = Track::new(0, 0, 0, true);
        tr.cancelled = Some(cancel_reason::INSUFFICIENT_STOCK.into());
        assert_eq!(tr.terminal_state().as_deref(), Some("CANCELLED/INSUFFICIENT_STOCK"));
        let mut tr = Track::new(0, 0, 0, true);
        tr.sold = true;
        assert_eq!(tr.terminal_state().as_deref(), Some("COMPLETED"));
    }
}
