//! `orderflow bench`: throughput against the local broker, measured the same way every time
//! (issue 7). Each scenario prints one JSON object on stdout; `scripts/bench` runs them on a
//! fresh tansu broker each, collects them into `target/bench/<timestamp>.json` and appends a
//! table to `BENCHMARKS.md`.
//!
//! - `bench raw`: the raw baseline. Encoded `OrderCreated` events are produced first into a
//!   source topic, then a bare rdkafka consume → produce passthrough copies them to a sink topic
//!   with the workers' batching and commit settings (the topology's client properties through
//!   [`client_config`](orderflow_runtime::kafka::client_config), units of up to `max_batch` records or one `commit_interval`, every
//!   acknowledgement awaited, then the offsets committed). The practical limit of this broker
//!   and machine for one consume → produce hop.
//! - `bench worker --name W`: one real [`Worker`](orderflow_runtime::worker::Worker) of the topology, in-process, over input records
//!   produced first into its input topics, measured for `--duration` after `--warmup`; also
//!   counts the broker writes it made per input record (outputs, dead letters and changelog
//!   records, from the topics' high watermarks).
//!
//! Both measure from the consumer's side: the warm-up starts with the first record processed
//! (group join and state restore are not counted), the measurement window follows it and ends
//! when the input is drained or the duration is over.

pub mod outbox;
pub mod peer;
pub mod peer_latency;
pub mod recovery;
pub mod retention;
pub mod saga;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use orderflow_runtime::topology::Topology;
use serde::Serialize;

mod input;
mod procs;
mod raw;
mod worker;

pub(crate) use input::*;
pub(crate) use procs::*;
pub(crate) use raw::*;
use worker::*;

/// `orderflow bench` flags.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(clap::Subcommand, Debug)]
enum Scenario {
    /// Raw baseline: a bare rdkafka consume → produce passthrough of pre-produced OrderCreated
    /// records with the workers' batching and commit settings; prints records/s as JSON.
    Raw(RawArgs),
    /// One worker of the topology, in-process, over pre-produced input; prints events/s, the
    /// ratio to `--baseline` and the broker writes per input record as JSON.
    Worker(WorkerArgs),
    /// The whole saga on TPC-H orders: throughput to a terminal state (all workers in one
    /// process, or one process per worker) and latency percentiles at fixed offered loads.
    Saga(crate::bench::saga::SagaArgs),
    /// Recovery after SIGKILL (local state, and sled deleted: changelog rebuild) and peak RSS of
    /// a worker holding many state keys.
    Recovery(crate::bench::recovery::RecoveryArgs),
    /// State and changelog size over a long run with a short `state_retention` (issue 13):
    /// samples over time, exact key counts at the end.
    Retention(crate::bench::retention::RetentionArgs),
    /// The transactional outbox relay (issue 15) on one database: rows/s over a backlog, then
    /// the publish lag under a steady write rate against seed 003's 3 s mean.
    Outbox(crate::bench::outbox::OutboxArgs),
    /// Issue 18: orderflow's stock reserver and a Kafka Streams application with the same rules
    /// (peers/kafka-streams) on the same input: orders answered/s, time to the last answer, peak
    /// RSS, and their answers compared order by order.
    Peer(crate::bench::peer::PeerArgs),
}

/// Flags every scenario shares.
#[derive(clap::Args, Debug)]
pub(crate) struct Common {
    #[arg(long, default_value = "topology.toml")]
    pub(crate) topology: PathBuf,
    /// Bootstrap servers of the broker (e.g. started by scripts/broker.sh).
    #[arg(long, env = "ORDERFLOW_BOOTSTRAP")]
    pub(crate) bootstrap: Option<String>,
    /// Records produced into the input before the measurement starts.
    #[arg(long)]
    pub(crate) records: Option<u64>,
    /// Time after the first processed record that is not measured.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub(crate) warmup: Duration,
    /// Longest measurement window after the warm-up (it ends earlier when the input is drained).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub(crate) duration: Duration,
    /// Commit interval of the units (default: the topology's `commit_interval` for the worker).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub(crate) commit_interval: Option<Duration>,
}

#[derive(clap::Args, Debug)]
struct RawArgs {
    #[command(flatten)]
    common: Common,
    /// Partitions of the source and sink topics (default: those of `order.created`).
    #[arg(long)]
    partitions: Option<i32>,
}

#[derive(clap::Args, Debug)]
struct WorkerArgs {
    #[command(flatten)]
    common: Common,
    /// The worker: deduplicator, stock-reserver or order-confirmer.
    #[arg(long)]
    name: String,
    /// Raw baseline of the same run, records/s (from `bench raw`), for the ratio.
    #[arg(long)]
    baseline: Option<f64>,
    /// State directory of this run (default: a fresh folder under target/bench/state).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Stores and stock of the stock reserver's input (issue 16): `five-hqs` (25 stores),
    /// `store-only` (one HQ, 100 stores, all stock at the stores) or `hq-fallback` (the same
    /// stores, some products at the HQ only); the one-HQ layouts are measured in orders answered.
    #[arg(long, value_enum, default_value = "five-hqs")]
    layout: Layout,
}

/// The settings a figure was taken with.
#[derive(Debug, Serialize)]
pub struct Settings {
    /// Unit of work: at most this many input records...
    pub max_batch: usize,
    /// ...or this long, milliseconds (then outputs acknowledged, offsets committed).
    pub commit_interval_ms: u64,
    /// librdkafka producer `batch.size`, bytes (`[broker.producer]`; librdkafka's default if unset).
    pub producer_batch_size: Option<String>,
    /// librdkafka producer `linger.ms`.
    pub producer_linger_ms: Option<String>,
    /// librdkafka consumer `fetch.wait.max.ms`.
    pub fetch_wait_max_ms: Option<String>,
    /// Partitions of the input topics.
    pub partitions: i32,
}

/// What a measurement window saw.
#[derive(Debug, Serialize, Clone, Copy)]
pub struct Window {
    /// Seconds from the first processed record to the start of the window (the warm-up).
    pub warmup_s: f64,
    /// Length of the window, seconds.
    pub measured_s: f64,
    /// Records processed inside the window.
    pub measured_records: u64,
    /// `measured_records / measured_s`.
    pub records_per_s: f64,
    /// Whether the window ended because the input was drained (else: the duration was over).
    pub drained: bool,
}

/// `bench raw` result (one JSON object on stdout).
#[derive(Debug, Serialize)]
pub struct RawResult {
    /// Always `"raw"`.
    pub scenario: &'static str,
    /// Records produced into the source topic first.
    pub records: u64,
    /// Mean size of one record's value, bytes.
    pub value_bytes: f64,
    /// Rate at which the bench produced the input (idempotent producer, all in flight), records/s.
    pub produce_records_per_s: f64,
    /// The consume → produce passthrough.
    pub passthrough: Window,
    /// How the passthrough's units went (whole run, warm-up included).
    pub units: Units,
    /// The settings of the run.
    pub settings: Settings,
}

/// Units of work of a whole run (warm-up included): where the time went.
#[derive(Debug, Serialize, Default)]
pub struct Units {
    /// Units committed.
    pub count: u64,
    /// Mean input records per unit.
    pub mean_records: f64,
    /// Mean time to decode and process one unit, milliseconds (0 for the raw passthrough).
    pub mean_processing_ms: f64,
    /// Mean time from the first send of a unit to its last acknowledgement, sled flush and
    /// offset commit, milliseconds.
    pub mean_commit_ms: f64,
    /// `mean_commit_ms` by stage of the commit (`orderflow_commit_stage_seconds`: produce,
    /// transaction, state_write, state_flush), milliseconds per committed unit; empty where not
    /// measured (the raw passthrough, the saga's scraped workers).
    pub commit_stages_ms: BTreeMap<String, f64>,
}

/// `bench worker` result (one JSON object on stdout).
#[derive(Debug, Serialize)]
pub struct WorkerResult {
    /// Always `"worker"`.
    pub scenario: &'static str,
    pub worker: String,
    /// The input's stores and stock (`--layout`).
    pub layout: Layout,
    /// What `window` counts: `input records` (consumed) or `orders answered` (the one-HQ
    /// layouts: `stock.reserved` + `stock.reservation.failed` produced).
    pub metered: &'static str,
    /// Orders of the input naming a product its store does not stock (served by an HQ fallback).
    pub orders_needing_hq: u64,
    /// Orders in the input.
    pub orders_offered: u64,
    /// Orders answered when the worker stopped.
    pub orders_answered: u64,
    /// The guarantee the worker ran with (`effectively_once` on tansu).
    pub guarantee: &'static str,
    /// Input records produced first, per topic.
    pub input: BTreeMap<String, u64>,
    /// Rate at which the bench produced the input, records/s.
    pub produce_records_per_s: f64,
    /// Input records (events) processed, or orders answered (see `metered`).
    pub window: Window,
    /// Raw baseline of the same run, records/s (`--baseline`).
    pub baseline_records_per_s: Option<f64>,
    /// `window.records_per_s / baseline_records_per_s`.
    pub ratio_to_baseline: Option<f64>,
    /// Input records the worker had processed when it stopped (all units committed).
    pub processed_total: u64,
    /// Records the worker wrote, per topic (outputs, dead letters, its changelog).
    pub writes: BTreeMap<String, i64>,
    /// Sum of `writes` / `processed_total`: broker writes per input record.
    pub writes_per_input: f64,
    /// Changelog records per input record (part of `writes_per_input`).
    pub changelog_writes_per_input: f64,
    /// How the worker's units went (its `unit_processing_seconds` and `commit_seconds`).
    pub units: Units,
    /// The settings of the run.
    pub settings: Settings,
}

/// Runs one scenario and prints its JSON object on stdout.
pub async fn run(args: BenchArgs) -> Result<()> {
    let json = match args.scenario {
        Scenario::Raw(a) => serde_json::to_string(&raw(a).await?)?,
        Scenario::Worker(a) => serde_json::to_string(&worker(a).await?)?,
        Scenario::Saga(a) => serde_json::to_string(&crate::bench::saga::run(a).await?)?,
        Scenario::Recovery(a) => serde_json::to_string(&crate::bench::recovery::run(a).await?)?,
        Scenario::Retention(a) => serde_json::to_string(&crate::bench::retention::run(a).await?)?,
        Scenario::Outbox(a) => serde_json::to_string(&crate::bench::outbox::run(a).await?)?,
        Scenario::Peer(a) => serde_json::to_string(&crate::bench::peer::peer(a).await?)?,
    };
    println!("{json}");
    Ok(())
}

pub(crate) fn settings(t: &Topology, commit_interval: Duration, max_batch: usize, partitions: i32) -> Settings {
    let get = |side: &BTreeMap<String, String>, k: &str| side.get(k).or_else(|| t.broker.properties.get(k)).cloned();
    Settings {
        max_batch,
        commit_interval_ms: commit_interval.as_millis() as u64,
        producer_batch_size: get(&t.broker.producer, "batch.size"),
        producer_linger_ms: get(&t.broker.producer, "linger.ms"),
        fetch_wait_max_ms: get(&t.broker.consumer, "fetch.wait.max.ms"),
        partitions,
    }
}

#[cfg(test)]
mod tests;
