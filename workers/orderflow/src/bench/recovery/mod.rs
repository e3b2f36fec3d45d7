//! `orderflow bench recovery`: recovery after SIGKILL and peak memory (issue 7, items 5 and 6).
//!
//! For each worker of `--workers` (default the stock reserver, then the deduplicator) and each
//! key count of `--keys` (ascending; default 10^5 and 10^6) the bench:
//!
//! 1. **loads** the worker, a child process `orderflow --log-json run --worker W` (this same
//!    binary) with a fresh state directory, up to that many state keys: the stock reserver gets
//!    `InventoryAdjusted` restocks on `stock.commands` (one stock key per store and product,
//!    [`STORES`] stores), the deduplicator distinct `OrderCreated` events on `order.created` (one
//!    remembered `eventId` each). Key counts are cumulative: the 10^6 step adds 9 × 10^5 keys to
//!    the worker that already holds 10^5. Once the worker is idle its RSS is read
//!    (`/proc/<pid>/status`: `VmRSS` now, `VmHWM` the peak so far);
//! 2. measures one bare consumer's **raw read rate** of the worker's changelog topic (an rdkafka
//!    `BaseConsumer` assigned every partition from the beginning, until the high watermarks);
//! 3. **local restart**: SIGKILL, start again on the same state directory, offer one new input
//!    record, and time process start → `/readyz` 200 and SIGKILL → that record processed
//!    (`orderflow_events_consumed_total` of the new process turns 1);
//! 4. **rebuild**: SIGKILL, delete the worker's sled directory, start again (the state is rebuilt
//!    from the changelog alone) and time the same; the new process's `VmHWM` is the peak RSS of a
//!    changelog rebuild. The rebuilt worker is the one loaded further for the next key count.
//!
//! Restore figures come from the worker's `state restored` JSON log lines (records, units,
//! seconds, source) and its restore metrics; changelog records are counted with watermarks, never
//! decoded (their format is the runtime's business). Where the time of a restart goes (process
//! start and sled open, group join, restore, the rest) comes from the log's timestamps.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _, Result};
use orderflow_api::events::*;
use orderflow_api::Event;
use orderflow_runtime::codec::Codec;
use orderflow_runtime::kafka::{client_config, create_topics, Side};
use orderflow_runtime::topology::Topology;
use orderflow_runtime::worker::now_ms;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::FutureProducer;
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;
use serde_json::Value;
use tracing::{info, warn};

use crate::kafkaio::{high_watermarks, records_held, watermark_client};

use crate::bench::{
    free_port, http_get, log_tail, metric_by_label, metric_sum, order, produce_all, settings, store,
    Common, Rng, STORES,
};

/// How long a `/readyz` or `/metrics` request to a worker may take.
const HTTP_TIMEOUT: Duration = Duration::from_secs(2);

/// `orderflow bench recovery` flags.
#[derive(clap::Args, Debug)]
pub struct RecoveryArgs {
    /// `--topology` and `--bootstrap` are used; `--records`, `--warmup`, `--duration` and
    /// `--commit-interval` are accepted like every scenario's and ignored (the worker processes
    /// run with the topology's settings).
    #[command(flatten)]
    common: Common,
    /// State key counts, ascending, comma-separated or repeated (stock keys for the stock
    /// reserver, remembered eventIds for the deduplicator). Cumulative: each step adds keys to
    /// the worker loaded by the previous one.
    #[arg(long, value_delimiter = ',', default_value = "100000,1000000")]
    keys: Vec<u64>,
    /// Workers to measure, in order: stock-reserver and/or deduplicator. The stock reserver
    /// must come first (the deduplicator writes into its input topic).
    #[arg(long, value_delimiter = ',', default_value = "stock-reserver,deduplicator")]
    workers: Vec<String>,
    /// Items (stock keys) per `InventoryAdjusted` restock of the stock reserver's load. The
    /// load is produced one restock per store at a time, at most two such rounds ahead of the
    /// worker, so a unit of work holds at most 2 × 25 × this many stock keys.
    #[arg(long, default_value_t = 200)]
    items_per_restock: usize,
    /// Longest wait for a restarted worker to be ready and process the new record.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    restart_timeout: Duration,
    /// Folder of the worker processes' state directories and JSON logs (default:
    /// target/bench/recovery-<ms>). State is removed at the end, logs are kept.
    #[arg(long)]
    work_dir: Option<PathBuf>,
}

/// Peak-RSS target of issue 7, MiB.
const RSS_TARGET_MIB: f64 = 200.0;
/// Ready-after-restart target of issue 7 (local state, 10^6 keys), seconds.
const READY_TARGET_S: f64 = 1.0;
/// Rebuild rate ÷ raw read rate target of issue 7.
const REBUILD_RATIO_TARGET: f64 = 0.5;
/// Instance name of the worker processes (names the sled directory and the static member).
const INSTANCE: &str = "bench";
/// Orders generated and produced at a time while loading the deduplicator.
const LOAD_SLICE: u64 = 50_000;
/// How often `/readyz` and `/metrics` are polled during a restart.
const POLL: Duration = Duration::from_millis(10);

/// `bench recovery` result (one JSON object on stdout).
#[derive(Debug, Serialize)]
pub struct RecoveryResult {
    /// Always `"recovery"`.
    pub scenario: &'static str,
    /// Key counts measured, ascending.
    pub keys: Vec<u64>,
    /// One bare consumer joining a consumer group on this broker, for comparison with the
    /// workers' `phases.group_join_s`.
    pub bare_join: BareJoin,
    /// One entry per (worker, key count), in run order.
    pub runs: Vec<RunResult>,
    /// The targets the figures are reported against.
    pub targets: Targets,
    /// Unit settings of the topology's defaults (the workers run with their own, see `runs`).
    pub settings: crate::bench::Settings,
    /// Where the worker logs of this run are kept.
    pub work_dir: String,
    /// Wall time of the whole scenario, seconds.
    pub total_s: f64,
}

/// Issue 7's targets for these figures.
#[derive(Debug, Serialize)]
pub struct Targets {
    /// Local restart at 10^6 keys: process start → ready, seconds.
    pub ready_after_local_restart_s: f64,
    /// Changelog rebuild rate ÷ one consumer's raw read rate of the changelog.
    pub rebuild_to_raw_read: f64,
    /// Peak RSS at 10^6 keys, MiB.
    pub peak_rss_mib: f64,
}

/// A bare rdkafka consumer (the topology's consumer settings, static membership) subscribing
/// to a topic: subscribe → partitions assigned, seconds.
#[derive(Debug, Serialize, Default)]
pub struct BareJoin {
    pub topic: String,
    /// The first member of a new group.
    pub first_s: f64,
    /// The same static member (`group.instance.id`) again after the first was dropped without
    /// leaving, as a SIGKILLed worker rejoins.
    pub rejoin_s: f64,
}

/// One worker at one key count.
#[derive(Debug, Serialize)]
pub struct RunResult {
    pub worker: String,
    /// The guarantee the worker ran with (`effectively_once` on tansu).
    pub guarantee: &'static str,
    /// State keys loaded so far (stock keys, or remembered eventIds), this step's target.
    pub keys: u64,
    /// State keys the worker holds of that kind (stock keys are whole products per store:
    /// `keys` rounded up to a multiple of 25), besides the restocks' own eventIds.
    pub state_keys: u64,
    /// What the state keys are: `stock` (store × product) or `event_ids`.
    pub key_kind: &'static str,
    pub load: Load,
    /// One bare consumer reading the whole changelog topic.
    pub raw_read: RawRead,
    /// SIGKILL and restart on the same sled directory (`source="local"` restores).
    pub local: Restart,
    /// SIGKILL, sled directory deleted, restart (`source="changelog"` restores).
    pub rebuild: Restart,
    /// `rebuild.restore.records_per_s ÷ raw_read.records_per_s` (target ≥ 0.5). Both read the
    /// whole changelog (the rebuild also the few records of the local restart's unit), so this
    /// is also `raw_read.seconds ÷ rebuild.restore.seconds`, whatever the records hold.
    pub rebuild_to_raw_read: Option<f64>,
    /// State keys rebuilt per second: `keys ÷ rebuild.restore.seconds`.
    pub rebuild_keys_per_s: Option<f64>,
    /// Peak RSS of this step, MiB: the larger of the loading process's `VmHWM` and the
    /// rebuilding process's `VmHWM`.
    pub peak_rss_mib: Option<f64>,
    /// Whether `peak_rss_mib` ≤ 200 MiB.
    pub within_rss_target: Option<bool>,
    /// Whether `local.start_to_ready_s` ≤ 1 s.
    pub within_ready_target: Option<bool>,
}

/// Loading the worker up to the step's key count.
#[derive(Debug, Serialize)]
pub struct Load {
    /// Input records produced in this step (restocks, or orders).
    pub input_records: u64,
    /// State keys added in this step.
    pub keys_added: u64,
    /// Seconds from the first record produced to the changelog's last growth (± 50 ms), i.e.
    /// to the last unit committed; produce overlaps processing.
    pub seconds: f64,
    /// Keys added per second over `seconds`.
    pub keys_per_s: f64,
    /// Records in the worker's changelog topic after loading (Σ high − low watermarks).
    pub changelog_records: i64,
    /// Output records the worker wrote so far (Σ high watermarks of its output topics).
    pub output_records: i64,
    /// Memory of the loading process once idle.
    pub memory: Memory,
}

/// Resident memory of a worker process, from `/proc/<pid>/status`.
#[derive(Debug, Serialize, Clone, Copy, Default, PartialEq)]
pub struct Memory {
    /// `VmRSS`: resident now, MiB.
    pub rss_mib: f64,
    /// `VmHWM`: the process's peak resident set so far, MiB.
    pub peak_rss_mib: f64,
}

/// One bare consumer's read of a whole topic.
#[derive(Debug, Serialize, Default)]
pub struct RawRead {
    pub topic: String,
    pub partitions: i32,
    /// Records read (every partition, low to high watermark).
    pub records: u64,
    /// Key and value bytes read.
    pub bytes: u64,
    /// Seconds from assigning the partitions to the last record.
    pub seconds: f64,
    /// `records / seconds`.
    pub records_per_s: f64,
    /// `bytes / seconds`, MiB/s.
    pub mib_per_s: f64,
}

/// One SIGKILL and restart.
#[derive(Debug, Serialize, Default)]
pub struct Restart {
    /// `local` or `rebuild`.
    pub kind: &'static str,
    /// Seconds to delete the sled directory between the kill and the start (rebuild only; part
    /// of `kill_to_processed_s`).
    pub delete_s: Option<f64>,
    /// Process start (spawn) → `/readyz` 200, seconds.
    pub start_to_ready_s: f64,
    /// SIGKILL → `/readyz` 200, seconds.
    pub kill_to_ready_s: f64,
    /// SIGKILL → the record offered after the start processed (the new process's
    /// `orderflow_events_consumed_total` ≥ 1), seconds.
    pub kill_to_processed_s: f64,
    /// Where the start → ready time went, from the worker's log timestamps.
    pub phases: Phases,
    /// The `state restored` log lines.
    pub restore: RestoreLog,
    /// The restore metrics of the new process (`orderflow_state_restored_records_total`,
    /// `orderflow_state_restore_seconds_sum` by source).
    pub restore_metrics: RestoreMetrics,
    /// Memory of the new process once it processed the record: its `peak_rss_mib` is the peak
    /// of start-up and restore (for `rebuild`, the changelog rebuild).
    pub memory: Memory,
    /// The new process's log file.
    pub log: String,
}

/// Start → ready, split at the worker's log lines; seconds, `None` when a line is missing.
#[derive(Debug, Serialize, Default, PartialEq)]
pub struct Phases {
    /// Spawn → `worker started` (exec, topology, Kafka clients, opening sled).
    pub process_start_s: Option<f64>,
    /// `worker started` → the first partition's restore began (`partitions assigned` when the
    /// worker logs it, else the first `state restored` time minus its `seconds`): consumer group
    /// join and assignment, plus up to one commit interval before the worker acts on it.
    pub group_join_s: Option<f64>,
    /// First restore began → last `state restored` (partitions are restored one after another).
    pub restore_s: Option<f64>,
    /// Last `state restored` → `worker ready` (seek and resume).
    pub resume_s: Option<f64>,
    /// `worker ready` → `/readyz` 200 seen by the bench (polling every 10 ms).
    pub readyz_poll_s: Option<f64>,
    /// `/readyz` 200 → the offered record processed.
    pub ready_to_processed_s: f64,
    /// JoinGroup rounds seen in the log (`partitions assigned` lines), when the worker logs them.
    pub assignments: Option<usize>,
}

/// Sum of a restart's `state restored` log lines.
#[derive(Debug, Serialize, Default, PartialEq)]
pub struct RestoreLog {
    /// Lines (one per partition restored).
    pub partitions: usize,
    /// Lines per `source` (`local`, `local+changelog`, `changelog`).
    pub sources: BTreeMap<String, usize>,
    /// Changelog records read.
    pub records: u64,
    /// Units (commit markers) applied.
    pub units: u64,
    /// Σ `seconds` (restores run one partition at a time, so this is the restore's wall time).
    pub seconds: f64,
    /// `records / seconds`, records/s (`None` when nothing was read).
    pub records_per_s: Option<f64>,
}

/// A process's restore metrics.
#[derive(Debug, Serialize, Default, PartialEq)]
pub struct RestoreMetrics {
    /// `orderflow_state_restored_records_total`.
    pub records: f64,
    /// `orderflow_state_restore_seconds_sum` by `source`.
    pub seconds: BTreeMap<String, f64>,
}

/// What a worker kind is loaded with.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    StockReserver,
    Deduplicator,
}

impl Kind {
    fn of(name: &str, kind: &str) -> Result<Kind> {
        match kind {
            "stock-reserver" => Ok(Kind::StockReserver),
            "deduplicator" => Ok(Kind::Deduplicator),
            other => bail!("bench recovery measures stock-reserver and deduplicator workers; {name} is a {other}"),
        }
    }

    fn key_kind(self) -> &'static str {
        match self {
            Kind::StockReserver => "stock",
            Kind::Deduplicator => "event_ids",
        }
    }

    /// The topic this kind's load and probes are produced to.
    fn input(self) -> &'static str {
        match self {
            Kind::StockReserver => "stock.commands",
            Kind::Deduplicator => "order.created",
        }
    }
}

/// Everything a run needs.
struct Ctx {
    topology: PathBuf,
    bootstrap: String,
    t: Topology,
    codec: Arc<Codec>,
    producer: FutureProducer,
    watermarks: BaseConsumer,
    work_dir: PathBuf,
    restart_timeout: Duration,
    now: i64,
    /// Spawns so far (names the log files).
    spawns: u32,
    /// Probe records offered so far (unique order ids).
    probes: u64,
}

/// A running worker process.
struct Proc {
    child: Child,
    port: u16,
    log: PathBuf,
    /// Wall clock at spawn.
    spawned_wall: SystemTime,
    spawned: Instant,
}

/// Runs the scenario; its JSON object is printed by the caller.
pub async fn run(args: RecoveryArgs) -> Result<serde_json::Value> {
    let started = Instant::now();
    let c = &args.common;
    if c.commit_interval.is_some() || c.records.is_some() {
        warn!("bench recovery ignores --commit-interval and --records: the workers run with the topology's settings");
    }
    let mut keys = args.keys.clone();
    keys.sort_unstable();
    keys.dedup();
    if keys.is_empty() || keys[0] == 0 {
        bail!("--keys needs at least one positive key count");
    }
    let loaded = crate::topology::load_topology(&c.topology, c.bootstrap.as_deref())?;
    let t = loaded.topology.clone();
    let mut kinds = Vec::new();
    for name in &args.workers {
        let spec = t.workers.get(name).with_context(|| format!("worker {name} is not in the topology"))?;
        kinds.push((name.clone(), Kind::of(name, &spec.kind)?));
    }
    if kinds.iter().position(|(_, k)| *k == Kind::Deduplicator) < kinds.iter().position(|(_, k)| *k == Kind::StockReserver)
        && kinds.iter().any(|(_, k)| *k == Kind::StockReserver)
        && kinds.iter().any(|(_, k)| *k == Kind::Deduplicator)
    {
        bail!("--workers: put the stock reserver before the deduplicator (the deduplicator writes into stock.commands)");
    }
    let work_dir = args.work_dir.clone().unwrap_or_else(|| PathBuf::from("target/bench").join(format!("recovery-{}", now_ms())));
    std::fs::create_dir_all(work_dir.join("logs")).with_context(|| format!("creating {}", work_dir.display()))?;
    let work_dir = work_dir.canonicalize()?;
    create_topics(&t).await.context("creating topics")?;
    let mut ctx = Ctx {
        topology: c.topology.clone(),
        bootstrap: t.broker.bootstrap.clone(),
        codec: Arc::new(Codec::load(&loaded.avro_dir(), t.broker.registry_url.as_deref())?),
        producer: client_config(&t.broker, Side::Producer).create().context("producer")?,
        watermarks: watermark_client(&t.broker, "orderflow-bench-watermarks")?,
        t,
        work_dir: work_dir.clone(),
        restart_timeout: args.restart_timeout,
        now: now_ms(),
        spawns: 0,
        probes: 0,
    };

    let first_input = kinds.first().map(|(_, k)| k.input()).unwrap_or("stock.commands");
    info!(topic = first_input, "timing a bare consumer's group join");
    let bare_join = bare_join(&ctx.t, first_input).await?;
    info!(first_s = bare_join.first_s, rejoin_s = bare_join.rejoin_s, "bare group join timed");
    let mut runs = Vec::new();
    for (name, kind) in &kinds {
        runs.extend(worker_runs(&mut ctx, name, *kind, &keys, args.items_per_restock).await?);
    }
    let partitions = ctx.t.topics.get("order.created").map(|s| s.partitions).unwrap_or(6);
    let result = RecoveryResult {
        scenario: "recovery",
        keys,
        bare_join,
        runs,
        targets: Targets {
            ready_after_local_restart_s: READY_TARGET_S,
            rebuild_to_raw_read: REBUILD_RATIO_TARGET,
            peak_rss_mib: RSS_TARGET_MIB,
        },
        settings: settings(&ctx.t, ctx.t.defaults.commit_interval, ctx.t.defaults.max_batch, partitions),
        work_dir: work_dir.display().to_string(),
        total_s: started.elapsed().as_secs_f64(),
    };
    Ok(serde_json::to_value(result)?)
}

/// Every key count of one worker: load, raw read, local restart, rebuild.
async fn worker_runs(ctx: &mut Ctx, name: &str, kind: Kind, keys: &[u64], items_per_restock: usize) -> Result<Vec<RunResult>> {
    let spec = ctx.t.workers[name].clone();
    let changelog = orderflow_runtime::changelog::topic(name);
    let partitions = spec.inputs.first().and_then(|i| ctx.t.topics.get(i)).map(|s| s.partitions).unwrap_or(6);
    for topic in spec.inputs.iter().chain(std::iter::once(&changelog)) {
        let n = high_watermarks(&ctx.watermarks, topic, partitions)?;
        if n > 0 {
            bail!("{topic} already holds {n} records: bench recovery needs a fresh broker (scripts/bench starts one per scenario)");
        }
    }
    let state_dir = ctx.work_dir.join("state");
    let _ = std::fs::remove_dir_all(state_dir.join(name));
    let mut proc = spawn(ctx, name, &state_dir, "load")?;
    wait_ready(ctx, &mut proc).await?;
    let mut rng = Rng(11);
    let mut loaded = 0u64;
    let mut runs = Vec::new();
    for &k in keys {
        info!(worker = name, keys = k, "loading");
        let load = load(ctx, &mut proc, name, kind, &changelog, partitions, &spec.outputs, loaded, k, items_per_restock, &mut rng).await?;
        loaded = k;
        info!(worker = name, keys = k, seconds = load.seconds, rss_mib = load.memory.rss_mib, "loaded; reading the changelog raw");
        let raw_read = raw_read(&ctx.t, &changelog).await?;
        info!(worker = name, records_per_s = raw_read.records_per_s as u64, "raw read done; restarting with local state");
        let (p, local) = restart(ctx, proc, name, kind, &state_dir, false).await?;
        info!(worker = name, kill_to_ready_s = local.kill_to_ready_s, "local restart done; restarting without sled");
        let (p, rebuild) = restart(ctx, p, name, kind, &state_dir, true).await?;
        proc = p;
        info!(worker = name, kill_to_ready_s = rebuild.kill_to_ready_s, "rebuild done");
        let rebuild_to_raw_read =
            rebuild.restore.records_per_s.filter(|_| raw_read.records_per_s > 0.0).map(|r| r / raw_read.records_per_s);
        let rebuild_keys_per_s = (rebuild.restore.seconds > 0.0).then(|| held_keys(kind, k) as f64 / rebuild.restore.seconds);
        let peak = load.memory.peak_rss_mib.max(rebuild.memory.peak_rss_mib).max(local.memory.peak_rss_mib);
        runs.push(RunResult {
            worker: name.to_string(),
            guarantee: spec.guarantee(&ctx.t.defaults).as_str(),
            keys: k,
            state_keys: held_keys(kind, k),
            key_kind: kind.key_kind(),
            within_ready_target: Some(local.start_to_ready_s <= READY_TARGET_S),
            load,
            raw_read,
            local,
            rebuild,
            rebuild_to_raw_read,
            rebuild_keys_per_s,
            peak_rss_mib: (peak > 0.0).then_some(peak),
            within_rss_target: (peak > 0.0).then_some(peak <= RSS_TARGET_MIB),
        });
    }
    stop(&mut proc);
    let _ = std::fs::remove_dir_all(state_dir.join(name));
    Ok(runs)
}

/// Spawns `orderflow --log-json run --worker name` on a free port with `state_dir`.
fn spawn(ctx: &mut Ctx, name: &str, state_dir: &Path, what: &str) -> Result<Proc> {
    ctx.spawns += 1;
    let port = free_port()?;
    let log = ctx.work_dir.join("logs").join(format!("{:02}-{name}-{what}.log", ctx.spawns));
    let exe = std::env::current_exe().context("locating the orderflow binary")?;
    let spawned_wall = SystemTime::now();
    let spawned = Instant::now();
    let child = Command::new(exe)
        .args(["--log-json", "run", "--topology"])
        .arg(&ctx.topology)
        .args(["--worker", name, "--instance", INSTANCE, "--bootstrap", &ctx.bootstrap])
        .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
        .env("ORDERFLOW_STATE_DIR", state_dir)
        .env("RUST_LOG", "info,librdkafka=warn,rdkafka=warn")
        .env_remove("ORDERFLOW_INSTANCE")
        .env_remove("ORDERFLOW_METRICS_ADDR")
        .env_remove("ORDERFLOW_LOG_JSON")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(File::create(&log).with_context(|| format!("creating {}", log.display()))?))
        .spawn()
        .with_context(|| format!("spawning orderflow run --worker {name}"))?;
    info!(worker = name, pid = child.id(), port, log = %log.display(), "worker process started");
    Ok(Proc { child, port, log, spawned_wall, spawned })
}

impl Drop for Proc {
    /// A worker process never outlives the bench (an error on the way included).
    fn drop(&mut self) {
        stop(self);
    }
}

/// SIGKILLs the process (`Child::kill` sends SIGKILL on Unix, to this child's pid) and reaps it;
/// a no-op once it is reaped.
fn stop(proc: &mut Proc) {
    let _ = proc.child.kill();
    let _ = proc.child.wait();
}

/// Fails when the process exited.
fn check_alive(proc: &mut Proc) -> Result<()> {
    if let Some(status) = proc.child.try_wait()? {
        bail!("worker process exited ({status}); log {}:\n{}", proc.log.display(), log_tail(&proc.log, 15));
    }
    Ok(())
}

async fn wait_ready(ctx: &Ctx, proc: &mut Proc) -> Result<()> {
    let until = Instant::now() + ctx.restart_timeout;
    loop {
        check_alive(proc)?;
        if matches!(http_get(proc.port, "/readyz", HTTP_TIMEOUT).await, Some((200, _))) {
            return Ok(());
        }
        if Instant::now() > until {
            bail!("worker not ready within {:?}; log {}:\n{}", ctx.restart_timeout, proc.log.display(), log_tail(&proc.log, 15));
        }
        tokio::time::sleep(POLL * 5).await;
    }
}

/// Records the worker process consumed (every input and outcome), from its `/metrics`.
async fn consumed(proc: &Proc) -> Option<f64> {
    match http_get(proc.port, "/metrics", HTTP_TIMEOUT).await {
        Some((200, body)) => Some(metric_sum(&body, "orderflow_events_consumed_total")),
        _ => None,
    }
}

/// The input records that take the worker from `from` to `to` state keys: (topic, key, event).
fn load_input(kind: Kind, from: u64, to: u64, items_per_restock: usize, now: i64, rng: &mut Rng) -> Vec<(String, String, Event)> {
    let mut out = Vec::new();
    match kind {
        Kind::StockReserver => {
            // Products per store so that STORES × products ≥ keys; products [from, to) of each
            // store restocked in chunks.
            let per_store = |k: u64| k.div_ceil(STORES as u64);
            let (lo, hi) = (per_store(from), per_store(to));
            let chunk = items_per_restock.max(1) as u64;
            for s in 0..STORES {
                let (hq_id, store_id) = store(s);
                let mut p = lo;
                while p < hi {
                    let end = (p + chunk).min(hi);
                    let inv = InventoryAdjusted {
                        event_id: format!("bench-recovery-stock-{store_id}-{p}"),
                        occurred_at: now,
                        hq_id: hq_id.clone(),
                        store_id: store_id.clone(),
                        adjustment_type: change_reason::RESTOCK.into(),
                        reference_id: "bench-recovery".into(),
                        items: (p..end).map(|p| AdjustedItem { product_id: format!("P-B{p}"), delta: 1_000_000 }).collect(),
                    };
                    let e = Event::InventoryAdjusted(inv);
                    out.push((kind.input().to_string(), e.store_key(), e));
                    p = end;
                }
            }
        }
        Kind::Deduplicator => {
            for i in from..to {
                let o = order(i, rng, now);
                out.push((kind.input().to_string(), o.order_id.clone(), Event::OrderCreated(o)));
            }
        }
    }
    out
}

/// Stock keys the stock reserver holds after a load to `keys` (whole products per store).
fn stock_keys(keys: u64) -> u64 {
    keys.div_ceil(STORES as u64) * STORES as u64
}

/// State keys of the step's kind a worker loaded to `keys` holds.
fn held_keys(kind: Kind, keys: u64) -> u64 {
    match kind {
        Kind::StockReserver => stock_keys(keys),
        Kind::Deduplicator => keys,
    }
}

/// Encodes and produces `events`, waiting for every acknowledgement; returns the records produced.
async fn produce(ctx: &Ctx, events: Vec<(String, String, Event)>) -> Result<u64> {
    let mut encoded = Vec::with_capacity(events.len());
    for (topic, key, event) in events {
        let value = ctx.codec.encode(&topic, &event).await?;
        encoded.push((topic, key, value));
    }
    let n = encoded.len() as u64;
    produce_all(&ctx.producer, encoded.into_iter()).await?;
    Ok(n)
}

/// Loads the running worker from `from` to `to` state keys and waits until it is idle.
#[allow(clippy::too_many_arguments)]
async fn load(
    ctx: &Ctx,
    proc: &mut Proc,
    name: &str,
    kind: Kind,
    changelog: &str,
    partitions: i32,
    outputs: &BTreeMap<String, String>,
    from: u64,
    to: u64,
    items_per_restock: usize,
    rng: &mut Rng,
) -> Result<Load> {
    let before = consumed(proc).await.context("reading the worker's metrics")?;
    let started = Instant::now();
    let give_up = Instant::now() + Duration::from_secs(120).max(Duration::from_millis(to - from));
    // In slices of keys, at most two produced and not yet consumed: the bench never holds a
    // million events at once, and the worker's units stay the size they have in steady
    // operation (a backlog of restocks would make a unit of hundreds of thousands of stock
    // keys, and its RSS that of the unit rather than of the state held).
    let slice = match kind {
        Kind::StockReserver => (STORES * items_per_restock.max(1)) as u64,
        Kind::Deduplicator => LOAD_SLICE,
    };
    let (mut input_records, mut at, mut ends) = (0u64, from, Vec::new());
    while at < to {
        let end = (at + slice).min(to);
        if ends.len() >= 2 {
            wait_consumed(proc, name, before + ends[ends.len() - 2] as f64, give_up).await?;
        }
        input_records += produce(ctx, load_input(kind, at, end, items_per_restock, ctx.now, rng)).await?;
        ends.push(input_records);
        at = end;
    }
    wait_consumed(proc, name, before + input_records as f64, give_up).await?;
    // Idle: the last unit's changelog records are in and nothing more comes for 0.5 s. The
    // load ends when the changelog last grew.
    let (mut last, mut grew_at, mut quiet_since) = (-1, Instant::now(), Instant::now());
    while quiet_since.elapsed() < Duration::from_millis(500) {
        let n = high_watermarks(&ctx.watermarks, changelog, partitions)?;
        if n != last {
            (last, grew_at, quiet_since) = (n, Instant::now(), Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seconds = grew_at.duration_since(started).as_secs_f64();
    let keys_added = held_keys(kind, to) - held_keys(kind, from);
    let mut output_records = 0;
    for topic in outputs.values() {
        output_records += high_watermarks(&ctx.watermarks, topic, partitions)?;
    }
    Ok(Load {
        input_records,
        keys_added,
        seconds,
        keys_per_s: keys_added as f64 / seconds.max(1e-9),
        changelog_records: records_held(&ctx.watermarks, changelog, partitions)?,
        output_records,
        memory: memory(proc.child.id())?,
    })
}

/// Waits until the worker process consumed `target` records.
async fn wait_consumed(proc: &mut Proc, name: &str, target: f64, give_up: Instant) -> Result<()> {
    loop {
        check_alive(proc)?;
        if consumed(proc).await.is_some_and(|n| n >= target) {
            return Ok(());
        }
        if Instant::now() > give_up {
            bail!("{name} consumed {:?} of {target} records in time; log {}", consumed(proc).await, proc.log.display());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One bare `BaseConsumer` reading every partition of `topic` from the beginning to the high
/// watermarks seen at the start.
async fn raw_read(t: &Topology, topic: &str) -> Result<RawRead> {
    let (broker, topic) = (t.broker.clone(), topic.to_string());
    tokio::task::spawn_blocking(move || -> Result<RawRead> {
        let consumer: BaseConsumer = client_config(&broker, Side::Consumer)
            .set("group.id", format!("orderflow-bench-raw-read-{}", now_ms()))
            .set("enable.auto.commit", "false")
            .create()
            .context("raw read consumer")?;
        let md = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10)).context("changelog metadata")?;
        let partitions = md.topics().first().map(|t| t.partitions().len() as i32).unwrap_or(0);
        let mut ends = BTreeMap::new();
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            let (low, high) = consumer.fetch_watermarks(&topic, p, Duration::from_secs(10))?;
            if high > low {
                ends.insert(p, high);
                tpl.add_partition_offset(&topic, p, Offset::Offset(low))?;
            }
        }
        let started = Instant::now();
        let (mut records, mut bytes) = (0u64, 0u64);
        if !ends.is_empty() {
            consumer.assign(&tpl)?;
            while !ends.is_empty() {
                if started.elapsed() > Duration::from_secs(1800) {
                    bail!("raw read of {topic}: {records} records in 30 min, partitions {ends:?} unfinished");
                }
                let Some(m) = consumer.poll(Duration::from_millis(500)) else { continue };
                let m = m.with_context(|| format!("reading {topic}"))?;
                records += 1;
                bytes += (m.key_len() + m.payload_len()) as u64;
                if ends.get(&m.partition()).is_some_and(|h| m.offset() + 1 >= *h) {
                    ends.remove(&m.partition());
                }
            }
        }
        let seconds = started.elapsed().as_secs_f64();
        let per_s = |n: f64| if seconds > 0.0 { n / seconds } else { 0.0 };
        Ok(RawRead {
            topic,
            partitions,
            records,
            bytes,
            seconds,
            records_per_s: per_s(records as f64),
            mib_per_s: per_s(bytes as f64 / (1024.0 * 1024.0)),
        })
    })
    .await?
}

/// A client context that does not log librdkafka's errors: the join consumer is dropped while
/// its offset fetch is in flight, which librdkafka reports as a (harmless) transport failure.
struct Quiet;

impl rdkafka::ClientContext for Quiet {
    fn error(&self, _error: rdkafka::error::KafkaError, _reason: &str) {}
}

impl rdkafka::consumer::ConsumerContext for Quiet {}

/// Times a bare consumer joining a new group on `topic` twice under one static member id.
async fn bare_join(t: &Topology, topic: &str) -> Result<BareJoin> {
    let (broker, topic) = (t.broker.clone(), topic.to_string());
    tokio::task::spawn_blocking(move || -> Result<BareJoin> {
        let group = format!("orderflow-bench-join-{}", now_ms());
        let mut took = Vec::new();
        for _ in 0..2 {
            let consumer: BaseConsumer<Quiet> = client_config(&broker, Side::Consumer)
                .set("group.id", &group)
                .set("group.instance.id", format!("{group}-0"))
                .create_with_context(Quiet)
                .context("join consumer")?;
            let started = Instant::now();
            consumer.subscribe(&[&topic])?;
            while consumer.assignment()?.count() == 0 {
                if started.elapsed() > Duration::from_secs(120) {
                    bail!("a bare consumer got no assignment of {topic} in 120 s");
                }
                let _ = consumer.poll(Duration::from_millis(10));
            }
            took.push(started.elapsed().as_secs_f64());
        }
        Ok(BareJoin { topic, first_s: took[0], rejoin_s: took[1] })
    })
    .await?
}

/// SIGKILLs `proc`, deletes its sled directory when `rebuild`, starts the worker again, offers
/// one new input record and measures until it is processed.
async fn restart(ctx: &mut Ctx, mut proc: Proc, name: &str, kind: Kind, state_dir: &Path, rebuild: bool) -> Result<(Proc, Restart)> {
    let what = if rebuild { "rebuild" } else { "local" };
    let killed = Instant::now();
    stop(&mut proc);
    let delete_s = if rebuild {
        let t = Instant::now();
        let dir = state_dir.join(name);
        std::fs::remove_dir_all(&dir).with_context(|| format!("deleting {}", dir.display()))?;
        Some(t.elapsed().as_secs_f64())
    } else {
        None
    };
    let mut p = spawn(ctx, name, state_dir, what)?;
    // The record offered after the restart: an order (for the stock reserver: of a stocked
    // store and products, so it is reserved).
    ctx.probes += 1;
    let mut rng = Rng(ctx.probes);
    let o = order(1_000_000_000_000 + ctx.probes, &mut rng, ctx.now);
    let e = Event::OrderCreated(o);
    let key = match kind {
        Kind::StockReserver => e.store_key(),
        Kind::Deduplicator => e.order_id().unwrap_or_default().to_string(),
    };
    produce(ctx, vec![(kind.input().to_string(), key, e)]).await?;

    let until = Instant::now() + ctx.restart_timeout;
    let mut ready: Option<(Instant, SystemTime)> = None;
    let processed = loop {
        check_alive(&mut p)?;
        if ready.is_none() && matches!(http_get(p.port, "/readyz", HTTP_TIMEOUT).await, Some((200, _))) {
            ready = Some((Instant::now(), SystemTime::now()));
        }
        if ready.is_some() && consumed(&p).await.is_some_and(|n| n >= 1.0) {
            break Instant::now();
        }
        if Instant::now() > until {
            bail!(
                "{what} restart of {name}: ready {}, record not processed within {:?}; log {}:\n{}",
                ready.is_some(),
                ctx.restart_timeout,
                p.log.display(),
                log_tail(&p.log, 15)
            );
        }
        tokio::time::sleep(POLL).await;
    };
    let (ready_at, ready_wall) = ready.expect("ready before processed");
    let memory = memory(p.child.id())?;
    // "worker ready" is logged just after the flag turns: give it a moment to be written.
    let mut lines = Vec::new();
    for _ in 0..100 {
        lines = read_log(&p.log);
        if lines.iter().any(|l| l.message == "worker ready") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let text = match http_get(p.port, "/metrics", HTTP_TIMEOUT).await {
        Some((200, body)) => body,
        _ => String::new(),
    };
    let restore_metrics = RestoreMetrics {
        records: metric_sum(&text, "orderflow_state_restored_records_total"),
        seconds: metric_by_label(&text, "orderflow_state_restore_seconds_sum", "source"),
    };
    let mut phases = phases(&lines, wall(p.spawned_wall), wall(ready_wall));
    phases.ready_to_processed_s = processed.duration_since(ready_at).as_secs_f64();
    let r = Restart {
        kind: what,
        delete_s,
        start_to_ready_s: ready_at.duration_since(p.spawned).as_secs_f64(),
        kill_to_ready_s: ready_at.duration_since(killed).as_secs_f64(),
        kill_to_processed_s: processed.duration_since(killed).as_secs_f64(),
        phases,
        restore: restore_log(&lines),
        restore_metrics,
        memory,
        log: p.log.display().to_string(),
    };
    Ok((p, r))
}

// ------------------------------------------------------------------ pure parts

/// Seconds since the Unix epoch.
fn wall(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// One JSON log line of a worker (`tracing_subscriber`'s JSON format).
#[derive(Debug, Clone, PartialEq)]
struct LogLine {
    /// Seconds since the Unix epoch.
    ts: f64,
    message: String,
    /// The event's fields (`fields` object, or the top level when flattened).
    fields: serde_json::Map<String, Value>,
}

impl LogLine {
    fn num(&self, k: &str) -> Option<f64> {
        self.fields.get(k).and_then(Value::as_f64)
    }
}

/// Parses one JSON log line; `None` for anything else.
fn parse_log_line(line: &str) -> Option<LogLine> {
    let v: Value = serde_json::from_str(line.trim()).ok()?;
    let ts = humantime::parse_rfc3339_weak(v.get("timestamp")?.as_str()?).ok()?;
    let fields = match v.get("fields") {
        Some(Value::Object(f)) => f.clone(),
        _ => v.as_object()?.clone(),
    };
    let message = fields.get("message")?.as_str()?.to_string();
    Some(LogLine { ts: wall(ts), message, fields })
}

fn read_log(path: &Path) -> Vec<LogLine> {
    std::fs::read_to_string(path).unwrap_or_default().lines().filter_map(parse_log_line).collect()
}

/// Splits spawn (`spawned`) → `/readyz` 200 (`ready`), both seconds since the epoch, at the log
/// lines of the first time the worker got ready.
fn phases(lines: &[LogLine], spawned: f64, ready: f64) -> Phases {
    let first = |m: &str| lines.iter().find(|l| l.message == m).map(|l| l.ts);
    let started = first("worker started");
    let ready_line = first("worker ready");
    let before_ready = |l: &LogLine| ready_line.is_none_or(|r| l.ts <= r);
    let restores: Vec<&LogLine> = lines.iter().filter(|l| l.message == "state restored" && before_ready(l)).collect();
    let assigned_lines: Vec<&LogLine> = lines.iter().filter(|l| l.message == "partitions assigned").collect();
    let restore_began = restores.iter().map(|l| l.ts - l.num("seconds").unwrap_or(0.0)).reduce(f64::min);
    let assigned = assigned_lines.iter().filter(|l| before_ready(l)).map(|l| l.ts).reduce(f64::max).or(restore_began);
    let last_restored = restores.iter().map(|l| l.ts).reduce(f64::max);
    let d = |a: Option<f64>, b: Option<f64>| Some(b? - a?);
    Phases {
        process_start_s: d(Some(spawned), started),
        group_join_s: d(started, assigned),
        restore_s: d(assigned, last_restored),
        resume_s: d(last_restored, ready_line),
        readyz_poll_s: d(ready_line, Some(ready)),
        ready_to_processed_s: 0.0,
        assignments: (!assigned_lines.is_empty()).then_some(assigned_lines.len()),
    }
}

/// Sums the `state restored` lines.
fn restore_log(lines: &[LogLine]) -> RestoreLog {
    let mut r = RestoreLog::default();
    for l in lines.iter().filter(|l| l.message == "state restored") {
        r.partitions += 1;
        let source = l.fields.get("source").and_then(Value::as_str).unwrap_or("?");
        *r.sources.entry(source.to_string()).or_default() += 1;
        r.records += l.num("records").unwrap_or(0.0) as u64;
        r.units += l.num("units").unwrap_or(0.0) as u64;
        r.seconds += l.num("seconds").unwrap_or(0.0);
    }
    r.records_per_s = (r.records > 0 && r.seconds > 0.0).then(|| r.records as f64 / r.seconds);
    r
}

/// `VmRSS` and `VmHWM` of a `/proc/<pid>/status` text.
fn parse_status(text: &str) -> Option<Memory> {
    let kib = |name: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(name) && l[name.len()..].starts_with(':'))?;
        let mut parts = line[name.len() + 1..].split_whitespace();
        let n: u64 = parts.next()?.parse().ok()?;
        (parts.next()? == "kB").then_some(n)
    };
    let mib = |k: u64| (k as f64 / 1024.0 * 10.0).round() / 10.0;
    Some(Memory { rss_mib: mib(kib("VmRSS")?), peak_rss_mib: mib(kib("VmHWM")?) })
}

/// The memory of process `pid` now.
fn memory(pid: u32) -> Result<Memory> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_status(&text).with_context(|| format!("no VmRSS/VmHWM in {path}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_gives_rss_and_peak_in_mib() {
        let text = "Name:\torderflow\nVmPeak:\t 1000000 kB\nVmHWM:\t  204800 kB\nVmRSS:\t  102400 kB\nThreads:\t9\n";
        assert_eq!(parse_status(text), Some(Memory { rss_mib: 100.0, peak_rss_mib: 200.0 }));
        assert_eq!(parse_status("VmRSS:\t1 kB\n"), None);
        // A field whose name only starts alike does not count.
        assert_eq!(parse_status("VmHWMx:\t5 kB\nVmHWM:\t2048 kB\nVmRSS:\t1024 kB\n"), Some(Memory { rss_mib: 1.0, peak_rss_mib: 2.0 }));
    }

    fn line(ts: &str, message: &str, fields: &str) -> String {
        let extra = if fields.is_empty() { String::new() } else { format!(",{fields}") };
        format!(r#"{{"timestamp":"{ts}","level":"INFO","fields":{{"message":"{message}"{extra}}},"target":"orderflow_runtime::worker"}}"#)
    }

    #[test]
    fn log_lines_parse_with_nested_or_flat_fields() {
        let l = parse_log_line(&line("2026-11-21T13:25:30.250000Z", "state restored", r#""records":10,"seconds":0.5,"source":"local""#))
            .expect("parses");
        assert_eq!(l.message, "state restored");
        assert_eq!(l.num("records"), Some(10.0));
        assert!((l.ts - 1_795_267_530.25).abs() < 1e-6, "{}", l.ts);
        let flat = parse_log_line(r#"{"timestamp":"2026-11-21T13:25:30Z","level":"INFO","message":"worker ready","worker":"w"}"#).unwrap();
        assert_eq!(flat.message, "worker ready");
        assert!(parse_log_line("not json").is_none());
        assert!(parse_log_line(r#"{"fields":{"message":"no time"}}"#).is_none());
    }

    #[test]
    fn phases_split_start_to_ready_at_the_log_lines() {
        let lines: Vec<LogLine> = [
            line("2026-11-21T13:25:30.200Z", "worker started", ""),
            line(
                "2026-11-21T13:25:33.500Z",
                "state restored",
                r#""partition":0,"records":100,"units":2,"seconds":0.25,"source":"changelog""#,
            ),
            line(
                "2026-11-21T13:25:33.750Z",
                "state restored",
                r#""partition":1,"records":300,"units":3,"seconds":0.25,"source":"changelog""#,
            ),
            line("2026-11-21T13:25:33.800Z", "worker ready", ""),
            // A later rebalance does not move the phases.
            line("2026-11-21T13:25:40.000Z", "state restored", r#""partition":1,"records":0,"units":0,"seconds":0.1,"source":"local""#),
        ]
        .iter()
        .filter_map(|l| parse_log_line(l))
        .collect();
        let t0 = lines[0].ts - 0.2;
        let p = phases(&lines, t0, lines[3].ts + 0.01);
        let close = |a: Option<f64>, b: f64| (a.unwrap() - b).abs() < 1e-3;
        assert!(close(p.process_start_s, 0.2), "{p:?}");
        assert!(close(p.group_join_s, 3.05), "{p:?}");
        assert!(close(p.restore_s, 0.5), "{p:?}");
        assert!(close(p.resume_s, 0.05), "{p:?}");
        assert!(close(p.readyz_poll_s, 0.01), "{p:?}");
        assert_eq!(p.assignments, None);
        let r = restore_log(&lines);
        assert_eq!((r.partitions, r.records, r.units), (3, 400, 5));
        assert_eq!(r.sources, BTreeMap::from([("changelog".to_string(), 2), ("local".to_string(), 1)]));
        assert!((r.seconds - 0.6).abs() < 1e-9);
        assert!((r.records_per_s.unwrap() - 400.0 / 0.6).abs() < 1e-6);
        // Without any line nothing is claimed.
        let none = phases(&[], 0.0, 1.0);
        assert_eq!((none.process_start_s, none.group_join_s, none.restore_s), (None, None, None));
        assert_eq!(restore_log(&[]).records_per_s, None);
    }

    #[test]
    fn an_assignment_line_is_the_join_end_when_the_worker_logs_one() {
        let lines: Vec<LogLine> = [
            line("2026-11-21T13:25:30.000Z", "worker started", ""),
            line("2026-11-21T13:25:33.000Z", "partitions assigned", ""),
            line("2026-11-21T13:25:36.000Z", "partitions assigned", ""),
            line("2026-11-21T13:25:36.500Z", "state restored", r#""records":0,"seconds":0.01,"source":"local""#),
            line("2026-11-21T13:25:36.600Z", "worker ready", ""),
        ]
        .iter()
        .filter_map(|l| parse_log_line(l))
        .collect();
        let p = phases(&lines, lines[0].ts, lines[4].ts);
        assert!((p.group_join_s.unwrap() - 6.0).abs() < 1e-3, "{p:?}");
        assert!((p.restore_s.unwrap() - 0.5).abs() < 1e-3, "{p:?}");
        assert_eq!(p.assignments, Some(2));
    }

    #[test]
    fn loads_are_cumulative_and_count_keys() {
        let mut rng = Rng(1);
        // Stock: 1,000 keys over 25 stores = 40 products each, in restocks of 15 items.
        let a = load_input(Kind::StockReserver, 0, 1_000, 15, 0, &mut rng);
        assert_eq!(a.len(), 25 * 3);
        let items = |v: &[(String, String, Event)]| -> usize {
            v.iter().map(|(_, _, e)| if let Event::InventoryAdjusted(i) = e { i.items.len() } else { 0 }).sum()
        };
        assert_eq!(items(&a) as u64, stock_keys(1_000));
        let b = load_input(Kind::StockReserver, 1_000, 2_000, 15, 0, &mut rng);
        assert_eq!(items(&b) as u64, stock_keys(2_000) - stock_keys(1_000));
        let ids: std::collections::BTreeSet<&str> = a.iter().chain(&b).map(|(_, _, e)| e.event_id()).collect();
        assert_eq!(ids.len(), a.len() + b.len(), "restock eventIds are unique across steps");
        for (topic, key, e) in &a {
            assert_eq!(topic, "stock.commands");
            assert_eq!(key, &e.store_key());
        }
        assert_eq!(stock_keys(1_001), 1_025);
        // Orders: one remembered eventId each, keyed by orderId.
        let o = load_input(Kind::Deduplicator, 10, 20, 15, 0, &mut rng);
        assert_eq!(o.len(), 10);
        assert!(o.iter().all(|(t, k, e)| t == "order.created" && Some(k.as_str()) == e.order_id()));
        assert_eq!(o[0].2.event_id(), "bench-order-10");
    }
}
