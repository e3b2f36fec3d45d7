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
//!   producer goes ([`produce_all`](crate::bench::produce_all)) once the stock is applied, and the count of terminal orders
//!   is fed to [`Meter`](crate::bench::Meter): the warm-up (`--warmup`) starts with the first terminal order, the
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

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use serde::Serialize;

use crate::bench::{Common, Settings, Units, Window};

/// How long a `/readyz` or `/metrics` request to a worker process may take.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

mod observe;
mod rig;
mod scenarios;
mod stats;

use observe::*;
use rig::*;
use scenarios::*;
pub use stats::*;

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
    /// Processing guarantee per worker (`exactly_once` / `effectively_once`).
    pub guarantees: BTreeMap<String, &'static str>,
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

#[cfg(test)]
mod tests;
