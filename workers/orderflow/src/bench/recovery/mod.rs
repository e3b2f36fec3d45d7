//! `orderflow bench recovery`: recovery after SIGKILL and peak memory (issue 7, items 5 and 6).
//!
//! For each worker of `--workers` (default the stock reserver, then the deduplicator) and each
//! key count of `--keys` (ascending; default 10^5 and 10^6) the bench:
//!
//! 1. **loads** the worker, a child process `orderflow --log-json run --worker W` (this same
//!    binary) with a fresh state directory, up to that many state keys: the stock reserver gets
//!    `InventoryAdjusted` restocks on `stock.commands` (one stock key per store and product,
//!    [`STORES`](crate::bench::STORES) stores), the deduplicator distinct `OrderCreated` events on `order.created` (one
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
use std::path::PathBuf;
use std::process::Child;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context as _, Result};
use orderflow_runtime::codec::Codec;
use orderflow_runtime::kafka::{client_config, create_topics, Side};
use orderflow_runtime::topology::Topology;
use orderflow_runtime::worker::now_ms;
use rdkafka::consumer::BaseConsumer;
use rdkafka::producer::FutureProducer;
use serde::Serialize;
use tracing::{info, warn};

use crate::kafkaio::{high_watermarks, watermark_client};

use crate::bench::{settings, Common, Rng};

mod baseline;
mod load;
mod logs;
pub(crate) use logs::memory;
mod procs;

use baseline::*;
use load::*;
use logs::*;
use procs::*;

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

#[cfg(test)]
mod tests;
