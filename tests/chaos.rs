//! Chaos: the whole topology as separate OS processes (several instances per consumer group, 6
//! partitions per input) on TPC-H orders (10,000 at 150/s on Kafka, 5,000 at once on tansu) plus the two seed 000 scenarios, while a random
//! worker process is SIGKILLed every ~4 s (one that is up and processing) and restarted with the same instance id (its sled
//! directory deleted on every third restart), and the order confirmer is scaled from 1 to 3
//! processes and back. The driver (`orderflow demo --external-workers`) produces the input,
//! plays the POS and checks the domain invariants; this test asserts them from its summary and
//! prints the chaos figures (kills, restores, records restored, time to ready after a kill)
//! computed from the workers' JSON logs, also written to `target/chaos-figures.json`.
//!
//! Three variants, each on a private broker: Apache Kafka under `exactly_once` with the classic
//! group protocol and with the KIP-848 consumer protocol, and tansu under `effectively_once` (its
//! profile). On Kafka the test also reads every worker output topic itself at both isolation
//! levels: a `read_committed` reader must see each eventId once, and a `read_uncommitted` reader
//! must see records of aborted transactions (proof that kills landed mid-transaction).
//!
//! `CHAOS_SEED=<u64>` replays a run's kill schedule (the seed is printed at start);
//! `ORDERFLOW_KEEP_CHAOS_DIR=1` keeps the logs, state and summary (they are always kept, with
//! their path printed, when the test fails).
//!
//! The test runs its workers and driver from a copy of `topology.toml` that differs in three
//! places only: the reservation TTL is the run's `--ttl` (10 s instead of 5 minutes, so the
//! expiry branch is taken within the run: the driver overrides the TTL only for itself), the
//! consumers' session timeout is 10 s (replacing `topology.toml`'s; see `SESSION_TIMEOUT_MS`),
//! and `avro_dir` is absolute (the copy lives in a temp dir).

mod common;

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{sigterm, tail, unix_secs, BrokerKind, Guarded, RunDir};
use serde_json::{json, Value};

/// The two seed 000 scenarios the driver adds to the TPC-H orders.
const SEED_ORDERS: u64 = 2;
const TTL: &str = "20s";
const KILL_EVERY: Duration = Duration::from_secs(4);
const SCALE_UP_AT: Duration = Duration::from_secs(10);
const SCALE_DOWN_AT: Duration = Duration::from_secs(30);
const CLEAN_EXIT_WITHIN: Duration = Duration::from_secs(30);
const HARD_CAP: Duration = Duration::from_secs(300);
/// Consumer session timeout of the run. A SIGKILLed member stays in its group until its session
/// expires, and the group's next rebalance waits for it: with the topology's 30 s and a kill
/// every ~4 s the groups would spend most of the run waiting for dead members. Not shorter: on 2
/// busy cores a live member can miss a 6 s session, and tansu 0.6.0 can then strand the group
/// (README "tansu 0.6.0: what we found").
const SESSION_TIMEOUT_MS: u64 = 10_000;
/// A SIGTERM that lands before the worker installed its handler kills it like SIGKILL, so
/// clean stops wait until the incarnation logged "worker ready" or is at least this old.
const MIN_AGE_BEFORE_SIGTERM: Duration = Duration::from_secs(10);
/// How often a child process is checked while waiting for its exit.
const EXIT_POLL: Duration = Duration::from_millis(50);

/// The initial fleet: (worker, processes).
const FLEET: &[(&str, usize)] =
    &[("deduplicator", 2), ("stock-reserver", 2), ("order-confirmer", 1), ("canceller", 1), ("reservation-expirer", 2)];
const SCALED: &str = "order-confirmer";

// ------------------------------------------------------------------------------------------
// Small utilities: RNG, figures.

/// splitmix64: a seeded, dependency-free RNG (the schedule only needs to be replayable).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    /// `base` ± 20 %.
    fn jitter(&mut self, base: Duration) -> Duration {
        let f = 0.8 + (self.next() % 401) as f64 / 1000.0;
        base.mul_f64(f)
    }
}

fn stats(mut v: Vec<f64>) -> Value {
    if v.is_empty() {
        return json!({ "n": 0, "median_s": null, "max_s": null });
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    let median = if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 };
    let r = |x: f64| (x * 1000.0).round() / 1000.0;
    json!({ "n": n, "median_s": r(median), "max_s": r(v[n - 1]) })
}

// ------------------------------------------------------------------------------------------
// The fleet of worker processes.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Start {
    Initial,
    ScaleUp,
    /// Restarted after a SIGKILL with its sled directory in place.
    RestartLocal,
    /// Restarted after a SIGKILL with its sled directory deleted.
    RestartWiped,
    /// Restarted after exiting on its own (a fatal error: the pod restarts).
    RestartAfterExit,
}

impl Start {
    fn as_str(self) -> &'static str {
        match self {
            Start::Initial => "initial",
            Start::ScaleUp => "scale_up",
            Start::RestartLocal => "restart_local",
            Start::RestartWiped => "restart_wiped",
            Start::RestartAfterExit => "restart_after_exit",
        }
    }
}

/// One process incarnation of a worker instance.
struct Incarnation {
    worker: &'static str,
    instance: String,
    start: Start,
    log: PathBuf,
    spawned_at: SystemTime,
    spawned: Instant,
    /// How it ended: "sigkill", "sigterm exit 0", "exited on its own: …", "still running".
    end: String,
}

struct Slot {
    worker: &'static str,
    instance: String,
    child: Option<Guarded>,
    /// Index into `Fleet::incarnations` of the running (or last) incarnation.
    current: usize,
    retired: bool,
}

struct Fleet {
    bin: PathBuf,
    root: PathBuf,
    topology: PathBuf,
    bootstrap: String,
    state_dir: PathBuf,
    logs: PathBuf,
    slots: Vec<Slot>,
    incarnations: Vec<Incarnation>,
    kills: usize,
    restarts: usize,
    self_exits: Vec<String>,
    /// Extra environment of every worker process (the variant's group protocol).
    env: Vec<(&'static str, &'static str)>,
}

impl Fleet {
    fn spawn(&mut self, worker: &'static str, instance: &str, start: Start) -> usize {
        let n = self.incarnations.iter().filter(|i| i.worker == worker && i.instance == instance).count();
        let log = self.logs.join(format!("{worker}-{instance}-{n:02}-{}.log", start.as_str()));
        let stderr = File::create(&log).expect("create log file");
        let spawned_at = SystemTime::now();
        let child = Command::new(&self.bin)
            .current_dir(&self.root)
            .args(["--log-json", "run", "--worker", worker, "--instance", instance, "--topology"])
            .arg(&self.topology)
            .args(["--bootstrap", &self.bootstrap])
            .env("RUST_BACKTRACE", "0")
            .env("ORDERFLOW_STATE_DIR", &self.state_dir)
            .envs(self.env.iter().copied())
            .env_remove("ORDERFLOW_BOOTSTRAP")
            .env_remove("ORDERFLOW_INSTANCE")
            .env_remove("ORDERFLOW_METRICS_ADDR")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(stderr))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {worker} {instance}: {e}"));
        self.incarnations.push(Incarnation {
            worker,
            instance: instance.to_string(),
            start,
            log,
            spawned_at,
            spawned: Instant::now(),
            end: "still running".into(),
        });
        let idx = self.incarnations.len() - 1;
        match self.slots.iter_mut().find(|s| s.worker == worker && s.instance == instance) {
            Some(slot) => {
                slot.child = Some(Guarded::new(child, EXIT_POLL));
                slot.current = idx;
                slot.retired = false;
            }
            None => self.slots.push(Slot {
                worker,
                instance: instance.to_string(),
                child: Some(Guarded::new(child, EXIT_POLL)),
                current: idx,
                retired: false,
            }),
        }
        idx
    }

    fn live(&self) -> Vec<usize> {
        (0..self.slots.len()).filter(|&i| !self.slots[i].retired && self.slots[i].child.is_some()).collect()
    }

    /// SIGKILLs slot `i`, waits for the exit, deletes its sled directory on every third restart,
    /// and restarts it with the same instance id.
    fn kill_and_restart(&mut self, i: usize, t: Duration) {
        let (worker, instance) = (self.slots[i].worker, self.slots[i].instance.clone());
        let pid = self.slots[i].child.as_ref().expect("live slot").pid();
        let status = self.slots[i].child.as_mut().expect("live slot").kill_and_wait();
        self.slots[i].child = None;
        let cur = self.slots[i].current;
        self.incarnations[cur].end = format!("sigkill ({status})");
        self.kills += 1;
        self.restarts += 1;
        let wipe = matches!(self.restarts % 3, 0); // every third restart (MSRV 1.85: no is_multiple_of)
        if wipe {
            let dir = self.state_dir.join(worker).join(&instance);
            if dir.exists() {
                fs::remove_dir_all(&dir).unwrap_or_else(|e| panic!("delete {}: {e}", dir.display()));
            }
        }
        println!(
            "chaos: t={:>5.1}s kill #{:<3} {worker} {instance} (pid {}){}",
            t.as_secs_f64(),
            self.kills,
            pid,
            if wipe { ", sled directory deleted" } else { "" }
        );
        self.spawn(worker, &instance, if wipe { Start::RestartWiped } else { Start::RestartLocal });
    }

    /// Restarts workers that exited on their own (as the orchestrator would), recording why.
    fn reap_self_exits(&mut self, t: Duration) {
        for i in self.live() {
            if let Some(status) = self.slots[i].child.as_mut().and_then(Guarded::try_wait) {
                let (worker, instance) = (self.slots[i].worker, self.slots[i].instance.clone());
                let cur = self.slots[i].current;
                let last = tail(&self.incarnations[cur].log, 3);
                self.incarnations[cur].end = format!("exited on its own ({status})");
                let note = format!("t={:.1}s {worker} {instance} exited on its own ({status}); last log lines:\n{last}", t.as_secs_f64());
                println!("chaos: WARNING {note}");
                self.self_exits.push(note);
                self.slots[i].child = None;
                self.spawn(worker, &instance, Start::RestartAfterExit);
            }
        }
    }

    /// Whether incarnation `idx` logged "worker ready".
    fn is_ready(&self, idx: usize) -> bool {
        parse_log(&self.incarnations[idx].log).ready_at.is_some()
    }

    /// SIGTERMs the given slots (once each incarnation is ready or old enough for its handler
    /// to be installed) and waits up to `within` for them; returns (slot, exit status or None).
    fn stop_cleanly(&mut self, slots: &[usize], within: Duration) -> Vec<(usize, Option<ExitStatus>)> {
        for &i in slots {
            let cur = self.slots[i].current;
            while !self.is_ready(cur) && self.incarnations[cur].spawned.elapsed() < MIN_AGE_BEFORE_SIGTERM {
                if self.slots[i].child.as_mut().and_then(Guarded::try_wait).is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            if let Some(c) = &self.slots[i].child {
                sigterm(c.pid());
            }
        }
        let until = Instant::now() + within;
        let mut out = Vec::new();
        for &i in slots {
            let cur = self.slots[i].current;
            let status = match self.slots[i].child.as_mut() {
                Some(c) => c.wait_for(until.saturating_duration_since(Instant::now())),
                None => None,
            };
            self.incarnations[cur].end = match status {
                Some(s) => format!("sigterm ({s})"),
                None => "sigterm: did not exit in time (killed)".into(),
            };
            self.slots[i].child = None; // drops the guard: SIGKILL if it is still running
            self.slots[i].retired = true;
            out.push((i, status));
        }
        out
    }

    fn diagnostics(&self) -> String {
        let mut s = String::new();
        for slot in &self.slots {
            let inc = &self.incarnations[slot.current];
            s += &format!(
                "\n--- {} {} ({}, {}), {}:\n{}",
                slot.worker,
                slot.instance,
                inc.start.as_str(),
                inc.end,
                inc.log.display(),
                tail(&inc.log, 5)
            );
        }
        s
    }
}

// ------------------------------------------------------------------------------------------
// Log parsing.

#[derive(Default, Debug)]
struct LogFacts {
    /// (source, records, seconds) of each "state restored" line.
    restored: Vec<(String, u64, f64)>,
    /// Timestamp (epoch seconds) of the first "worker ready" line.
    ready_at: Option<f64>,
    lines: usize,
    errors: usize,
}

/// A count field: a JSON number or a numeric string (0 otherwise).
fn as_u64(v: Option<&Value>) -> u64 {
    match v {
        Some(Value::Number(n)) => n.as_u64().unwrap_or(0),
        Some(Value::String(s)) => s.parse().unwrap_or(0),
        _ => 0,
    }
}

fn parse_log(path: &Path) -> LogFacts {
    let mut facts = LogFacts::default();
    for v in common::log_lines(path) {
        facts.lines += 1;
        if common::is_error(&v) {
            facts.errors += 1;
        }
        match common::message(&v) {
            "state restored" => facts.restored.push((
                common::field(&v, "source").and_then(Value::as_str).unwrap_or("?").to_string(),
                as_u64(common::field(&v, "records")),
                common::num(common::field(&v, "seconds")).unwrap_or(0.0),
            )),
            "worker ready" if facts.ready_at.is_none() => {
                facts.ready_at = common::timestamp(&v);
            }
            _ => {}
        }
    }
    facts
}

// ------------------------------------------------------------------------------------------
// Setup helpers.

/// `topology.toml` with the run's reservation TTL and an absolute `avro_dir`.
fn chaos_topology(root: &Path, dir: &Path) -> PathBuf {
    let original = fs::read_to_string(root.join("topology.toml")).expect("read topology.toml");
    let mut ttl_lines = 0;
    let mut consumer_table = false;
    let mut body: Vec<String> = Vec::new();
    for l in original.lines() {
        if l.trim_start().starts_with("reservation_ttl") {
            ttl_lines += 1;
            body.push(format!("reservation_ttl = \"{TTL}\"   # chaos test: the run's --ttl"));
            continue;
        }
        // The run's own session timeout and heartbeat replace the topology's.
        let property = l.trim_start();
        if property.starts_with("\"session.timeout.ms\"") || property.starts_with("\"heartbeat.interval.ms\"") {
            continue;
        }
        body.push(l.to_string());
        if l.trim() == "[broker.consumer]" {
            consumer_table = true;
            body.push(format!("\"session.timeout.ms\" = \"{SESSION_TIMEOUT_MS}\"   # chaos test: see SESSION_TIMEOUT_MS"));
            body.push("\"heartbeat.interval.ms\" = \"1000\"".into());
        }
    }
    assert!(ttl_lines > 0, "topology.toml sets no reservation_ttl: the chaos test's copy needs updating");
    assert!(consumer_table, "topology.toml has no [broker.consumer] table: the chaos test's copy needs updating");
    assert!(!original.lines().any(|l| l.trim_start().starts_with("avro_dir")), "topology.toml sets avro_dir: update chaos_topology");
    let text = format!(
        "# Copy of topology.toml for the chaos test (reservation TTL {TTL}, absolute avro_dir).\navro_dir = {:?}\n\n{}\n",
        root.join("avro").display().to_string(),
        body.join("\n")
    );
    let path = dir.join("topology.toml");
    fs::write(&path, text).expect("write topology copy");
    path
}

fn figures_path(variant: &str) -> PathBuf {
    let root = common::repo_root();
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(t) if Path::new(&t).is_absolute() => PathBuf::from(t),
        Some(t) => root.join(t),
        None => root.join("target"),
    };
    target.join(format!("chaos-figures-{variant}.json"))
}

// ------------------------------------------------------------------------------------------

/// Computes the chaos figures from the workers' logs, prints them and writes them to
/// `target/chaos-figures.json`.
#[allow(clippy::too_many_arguments)]
fn report_figures(
    variant: &str,
    expected_orders: u64,
    fleet: &Fleet,
    seed: u64,
    chaos_seconds: f64,
    test_started: Instant,
    scale_down_statuses: &[(usize, Option<ExitStatus>)],
) -> Value {
    let mut restored_by_source: BTreeMap<String, u64> = BTreeMap::new();
    let mut records_by_source: BTreeMap<String, u64> = BTreeMap::new();
    let mut restore_seconds: Vec<f64> = Vec::new();
    let mut ready_local = Vec::new();
    let mut ready_wiped = Vec::new();
    let mut records_local = 0u64;
    let mut records_wiped = 0u64;
    let mut not_ready = 0usize;
    let mut ready_lines = 0usize;
    let mut error_lines = 0usize;
    let mut per_incarnation = Vec::new();
    for inc in &fleet.incarnations {
        let f = parse_log(&inc.log);
        error_lines += f.errors;
        for (source, records, secs) in &f.restored {
            *restored_by_source.entry(source.clone()).or_default() += 1;
            *records_by_source.entry(source.clone()).or_default() += records;
            restore_seconds.push(*secs);
        }
        let own_records: u64 = f.restored.iter().map(|r| r.1).sum();
        let to_ready = f.ready_at.map(|r| r - unix_secs(inc.spawned_at));
        ready_lines += usize::from(f.ready_at.is_some());
        match (inc.start, to_ready) {
            (Start::RestartLocal, Some(d)) => ready_local.push(d),
            (Start::RestartWiped, Some(d)) => ready_wiped.push(d),
            (Start::RestartLocal | Start::RestartWiped, None) => not_ready += 1,
            _ => {}
        }
        match inc.start {
            Start::RestartLocal => records_local += own_records,
            Start::RestartWiped => records_wiped += own_records,
            _ => {}
        }
        per_incarnation.push(json!({
            "worker": inc.worker, "instance": inc.instance, "start": inc.start.as_str(), "end": inc.end,
            "restores": f.restored.len(), "records_restored": own_records,
            "seconds_to_ready": to_ready.map(|d| (d * 1000.0).round() / 1000.0),
            "log": inc.log.file_name().map(|n| n.to_string_lossy().into_owned()),
        }));
    }
    let count = |s: Start| fleet.incarnations.iter().filter(|i| i.start == s).count();
    let restore_lines: u64 = restored_by_source.values().sum();
    let figures = json!({
        "variant": variant,
        "seed": seed,
        "orders": expected_orders,
        "worker_processes_started": fleet.incarnations.len(),
        "kills": fleet.kills,
        "restarts_with_local_state": count(Start::RestartLocal),
        "restarts_with_sled_deleted": count(Start::RestartWiped),
        "restarts_after_own_exit": count(Start::RestartAfterExit),
        "scale": { "worker": SCALED, "up_at_s": SCALE_UP_AT.as_secs(), "down_at_s": SCALE_DOWN_AT.as_secs(),
                   "extras_exit_0": !scale_down_statuses.is_empty() && scale_down_statuses.iter().all(|(_, s)| s.is_some_and(|s| s.success())) },
        "restore_log_lines_present": restore_lines > 0 || ready_lines > 0,
        "state_restored_lines_by_source": restored_by_source,
        "records_restored_by_source": records_by_source,
        "records_restored_total": records_by_source.values().sum::<u64>(),
        "records_restored_by_restarts_with_local_state": records_local,
        "records_restored_by_restarts_with_sled_deleted": records_wiped,
        "restore_seconds_per_partition": stats(restore_seconds),
        "time_to_ready_after_kill": {
            "with_local_state": stats(ready_local),
            "with_sled_deleted": stats(ready_wiped),
            "restarts_killed_or_stopped_before_ready": not_ready,
        },
        "error_log_lines": error_lines,
        "self_exits": fleet.self_exits,
        "driver_seconds": chaos_seconds,
        "test_seconds": test_started.elapsed().as_secs_f64(),
        "incarnations": per_incarnation,
    });
    println!("\n== chaos figures ({variant}, seed {seed})");
    println!("  kills (SIGKILL)                     {}", fleet.kills);
    println!("  restarts with local state           {}", count(Start::RestartLocal));
    println!("  restarts with sled deleted          {}", count(Start::RestartWiped));
    println!("  restarts after exiting on their own {}", count(Start::RestartAfterExit));
    if restore_lines == 0 && ready_lines == 0 {
        println!("  no \"state restored\" / \"worker ready\" log lines: the runtime does not log restores yet");
    } else {
        println!("  \"state restored\" lines by source    {}", figures["state_restored_lines_by_source"]);
        println!("  records restored (total)            {}", figures["records_restored_total"]);
        println!("  records restored by source          {}", figures["records_restored_by_source"]);
        println!("    by restarts with local state      {records_local}");
        println!("    by restarts with sled deleted     {records_wiped}");
        println!("  restore seconds per partition       {}", figures["restore_seconds_per_partition"]);
        println!("  time to ready after a kill, local   {}", figures["time_to_ready_after_kill"]["with_local_state"]);
        println!("  time to ready after a kill, wiped   {}", figures["time_to_ready_after_kill"]["with_sled_deleted"]);
        println!("  restarts killed/stopped before ready {not_ready}");
    }
    println!("  ERROR log lines (all workers)       {error_lines}");
    println!("  driver ran {chaos_seconds:.1}s; test {:.1}s", test_started.elapsed().as_secs_f64());
    let fig_path = figures_path(variant);
    if let Some(parent) = fig_path.parent() {
        let _ = fs::create_dir_all(parent);
    }
    fs::write(&fig_path, serde_json::to_vec_pretty(&figures).unwrap()).expect("write chaos figures");
    println!("  written to {}", fig_path.display());

    figures
}

/// Scales the order confirmer back to one process: SIGTERM on the extras, which must exit 0
/// within `CLEAN_EXIT_WITHIN`.
fn scale_down(fleet: &mut Fleet, extras: &[usize], t: Duration) -> Vec<(usize, Option<ExitStatus>)> {
    println!("chaos: t={:>5.1}s scaling {SCALED} 3 → 1 (SIGTERM on p1, p2)", t.as_secs_f64());
    let stopped = Instant::now();
    let statuses = fleet.stop_cleanly(extras, CLEAN_EXIT_WITHIN);
    println!(
        "chaos: t={:>5.1}s scaled {SCALED} back to 1 in {:.1}s: {:?}",
        t.as_secs_f64() + stopped.elapsed().as_secs_f64(),
        stopped.elapsed().as_secs_f64(),
        statuses.iter().map(|(_, s)| s.map(|s| s.to_string())).collect::<Vec<_>>()
    );
    for (i, status) in &statuses {
        let inc = &fleet.incarnations[fleet.slots[*i].current];
        assert!(
            status.is_some_and(|s| s.success()),
            "{SCALED} {} did not exit 0 within {}s of SIGTERM ({:?}); log {}:\n{}",
            fleet.slots[*i].instance,
            CLEAN_EXIT_WITHIN.as_secs(),
            status,
            inc.log.display(),
            tail(&inc.log, 10)
        );
    }
    statuses
}

/// One way to run the chaos test: the broker, the workers' environment, the extra checks.
struct Variant {
    /// Names the figures file (`target/chaos-figures-<name>.json`).
    name: &'static str,
    broker: BrokerKind,
    /// Environment of every worker and of the driver.
    env: &'static [(&'static str, &'static str)],
    /// TPC-H orders the driver offers (plus the two seed scenarios).
    orders: u64,
    /// Orders per second the driver offers (0: as fast as it can).
    rate: u32,
}

/// On Kafka the pipeline takes 5,000 orders offered at once in a few seconds, before the kill
/// schedule has started: offered at 150 orders/s, 10,000 orders keep every worker busy for
/// about 70 s, so kills land while units (transactions) are in flight.
const KAFKA_ORDERS: u64 = 10_000;
const KAFKA_RATE: u32 = 150;

#[test]
fn chaos_on_kafka_exactly_once_classic_protocol() {
    run_chaos(&Variant {
        name: "kafka-classic",
        broker: BrokerKind::Kafka,
        env: &[("ORDERFLOW_GROUP_PROTOCOL", "classic")],
        orders: KAFKA_ORDERS,
        rate: KAFKA_RATE,
    });
}

#[test]
fn chaos_on_kafka_exactly_once_consumer_protocol() {
    run_chaos(&Variant {
        name: "kafka-consumer",
        broker: BrokerKind::Kafka,
        env: &[("ORDERFLOW_GROUP_PROTOCOL", "consumer")],
        orders: KAFKA_ORDERS,
        rate: KAFKA_RATE,
    });
}

/// tansu has no transactions: its profile runs the workers under `effectively_once`, the claim
/// "effectively-once on any Kafka-compatible broker" rests on this variant.
#[test]
fn chaos_on_tansu_effectively_once() {
    run_chaos(&Variant { name: "tansu", broker: BrokerKind::Tansu, env: &[], orders: 5_000, rate: 0 });
}

fn run_chaos(variant: &Variant) {
    let test_started = Instant::now();
    let expected_orders = variant.orders + SEED_ORDERS;
    let seed: u64 = std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64);
    println!("chaos: seed {seed} (replay the kill schedule with CHAOS_SEED={seed})");
    let mut rng = Rng(seed);

    let bin = common::orderflow_bin();
    let root = common::repo_root();
    let help = Command::new(&bin).args(["demo", "--help"]).output().expect("run orderflow demo --help");
    assert!(
        String::from_utf8_lossy(&help.stdout).contains("--external-workers"),
        "`orderflow demo` has no --external-workers flag: the chaos test needs the driver without in-process workers"
    );

    // Dropped in reverse order: the fleet (SIGKILL of every child) first, then the run
    // directory, then the broker.
    let broker = common::Broker::start_kind(variant.broker);
    let run_dir =
        RunDir::create(&format!("orderflow-chaos-{}-", variant.name), "ORDERFLOW_KEEP_CHAOS_DIR", "chaos: logs, state and summary");
    let dir = run_dir.path().to_path_buf();
    let logs = dir.join("logs");
    let state_dir = dir.join("state");
    fs::create_dir_all(&logs).unwrap();
    fs::create_dir_all(&state_dir).unwrap();
    let topology = chaos_topology(&root, &dir);
    println!("chaos: broker {}, run directory {}", broker.bootstrap, dir.display());

    // 1. Topics, then the fleet.
    let out = Command::new(&bin)
        .current_dir(&root)
        .arg("topics")
        .arg("--topology")
        .arg(&topology)
        .args(["--bootstrap", &broker.bootstrap])
        .output()
        .expect("run orderflow topics");
    assert!(out.status.success(), "orderflow topics failed:\n{}", String::from_utf8_lossy(&out.stderr));
    print!("chaos: {}", String::from_utf8_lossy(&out.stdout));

    let mut fleet = Fleet {
        bin: bin.clone(),
        root: root.clone(),
        topology: topology.clone(),
        bootstrap: broker.bootstrap.clone(),
        state_dir: state_dir.clone(),
        logs: logs.clone(),
        slots: Vec::new(),
        incarnations: Vec::new(),
        kills: 0,
        restarts: 0,
        self_exits: Vec::new(),
        env: variant.env.to_vec(),
    };
    for (worker, n) in FLEET {
        for i in 0..*n {
            fleet.spawn(worker, &format!("p{i}"), Start::Initial);
        }
    }
    println!("chaos: started {} worker processes", fleet.slots.len());

    // 2. The driver.
    let summary_path = dir.join("summary.json");
    let driver_out = dir.join("driver.stdout");
    let driver_err = dir.join("driver.stderr");
    let mut driver = Guarded::new(
        Command::new(&bin)
            .current_dir(&root)
            .args(["demo", "--external-workers", "--direct", "--topology"])
            .arg(&topology)
            .args(["--bootstrap", &broker.bootstrap])
            .args(["--orders", &variant.orders.to_string(), "--stock-scale", "0.07", "--ttl", TTL, "--settle-timeout", "240s"])
            .args(["--rate", &variant.rate.to_string()])
            .arg("--state-dir")
            .arg(dir.join("driver-state"))
            .arg("--json")
            .arg(&summary_path)
            .env("RUST_BACKTRACE", "0")
            .env("ORDERFLOW_STATE_DIR", dir.join("driver-state"))
            .envs(variant.env.iter().copied())
            .env_remove("ORDERFLOW_BOOTSTRAP")
            .stdin(Stdio::null())
            .stdout(Stdio::from(File::create(&driver_out).unwrap()))
            .stderr(Stdio::from(File::create(&driver_err).unwrap()))
            .spawn()
            .expect("spawn orderflow demo"),
        EXIT_POLL,
    );
    let chaos_started = Instant::now();

    // 3. Chaos until the driver exits.
    let mut next_kill = chaos_started + rng.jitter(KILL_EVERY);
    let mut extras: Vec<usize> = Vec::new();
    let mut scaled_down = false;
    let mut scale_down_statuses = Vec::new();
    let driver_status = loop {
        if let Some(s) = driver.try_wait() {
            break s;
        }
        let t = chaos_started.elapsed();
        if t > HARD_CAP {
            driver.kill_and_wait();
            report_figures(variant.name, expected_orders, &fleet, seed, t.as_secs_f64(), test_started, &scale_down_statuses);
            panic!(
                "the driver did not finish within {}s (seed {seed}, {} kills)\n--- driver stdout:\n{}\n--- driver stderr:\n{}\n{}",
                HARD_CAP.as_secs(),
                fleet.kills,
                tail(&driver_out, 40),
                tail(&driver_err, 20),
                fleet.diagnostics()
            );
        }
        fleet.reap_self_exits(t);
        if extras.is_empty() && !scaled_down && t >= SCALE_UP_AT {
            for instance in ["p1", "p2"] {
                fleet.spawn(SCALED, instance, Start::ScaleUp);
                extras.push(fleet.slots.len() - 1);
            }
            println!("chaos: t={:>5.1}s scaled {SCALED} 1 → 3 processes", t.as_secs_f64());
        }
        if !extras.is_empty() && !scaled_down && t >= SCALE_DOWN_AT {
            scale_down_statuses = scale_down(&mut fleet, &extras, t);
            scaled_down = true;
            next_kill = Instant::now() + rng.jitter(KILL_EVERY);
        }
        if Instant::now() >= next_kill {
            // Only processes that are up and processing are killed: a pod that never gets to
            // finish its restart measures nothing but the group's rejoin time.
            let live: Vec<usize> = fleet.live().into_iter().filter(|&i| fleet.is_ready(fleet.slots[i].current)).collect();
            if !live.is_empty() {
                let victim = live[rng.below(live.len())];
                fleet.kill_and_restart(victim, t);
            }
            next_kill = Instant::now() + rng.jitter(KILL_EVERY);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let chaos_seconds = chaos_started.elapsed().as_secs_f64();
    if !extras.is_empty() && !scaled_down {
        println!("chaos: WARNING the driver finished before the scale-down was due; scaling down now");
        scale_down_statuses = scale_down(&mut fleet, &extras, chaos_started.elapsed());
    }
    println!("chaos: driver exited ({driver_status}) after {chaos_seconds:.1}s; stopping the workers with SIGTERM");

    // 4. Clean shutdown of every worker.
    let live = fleet.live();
    let final_statuses = fleet.stop_cleanly(&live, CLEAN_EXIT_WITHIN);
    let unclean: Vec<String> = final_statuses
        .iter()
        .filter(|(_, s)| !s.is_some_and(|s| s.success()))
        .map(|(i, s)| {
            let log = &fleet.incarnations[fleet.slots[*i].current].log;
            format!(
                "{} {}: {:?}; last log lines of {}:\n{}",
                fleet.slots[*i].worker,
                fleet.slots[*i].instance,
                s,
                log.display(),
                tail(log, 40)
            )
        })
        .collect();

    // 5. Figures from the logs.
    let figures = report_figures(variant.name, expected_orders, &fleet, seed, chaos_seconds, test_started, &scale_down_statuses);

    // The driver's view of the run goes into the figures file too (for the closing note).
    let summary: Option<Value> = fs::read(&summary_path).ok().and_then(|b| serde_json::from_slice(&b).ok());
    if let Some(s) = &summary {
        let mut figures = figures;
        figures["driver"] = json!({
            "by_outcome": s["by_outcome"], "pos_decisions": s["pos_decisions"],
            "confirm_latency_ms": s["confirm_latency_ms"], "distinct_events_per_topic": s["distinct_events_per_topic"],
            "events_per_topic": s["events_per_topic"], "wall_seconds": s["wall_seconds"],
        });
        fs::write(figures_path(variant.name), serde_json::to_vec_pretty(&figures).unwrap()).expect("write chaos figures");
    }

    // 6. The invariants, from the driver's summary.
    // The driver's whole report (~150 lines) goes next to the figures; only its outcome section
    // is printed, so a failing assertion's message stays near the end of the test's output (CI
    // shows a bounded part of it).
    let stdout = fs::read_to_string(&driver_out).unwrap_or_default();
    let report = figures_path(variant.name).with_extension("driver.txt");
    fs::write(&report, &stdout).expect("write the driver's report");
    let outcomes: Vec<&str> = stdout.lines().skip_while(|l| !l.starts_with("== orders by final state")).take(10).collect();
    println!("\n== driver output (whole report: {})\n{}", report.display(), outcomes.join("\n"));
    assert!(
        driver_status.success(),
        "the driver failed ({driver_status}, seed {seed}):\n--- stderr:\n{}\n{}",
        tail(&driver_err, 30),
        fleet.diagnostics()
    );
    assert!(unclean.is_empty(), "workers did not exit 0 within {}s of SIGTERM:\n{}", CLEAN_EXIT_WITHIN.as_secs(), unclean.join("\n"));
    let s = summary.expect("the driver wrote a JSON summary");
    common::assert_summary_invariants(&s, expected_orders);
    assert_eq!(s["seed_scenarios"].as_array().expect("seed_scenarios").len(), 2, "seed scenarios");
    // Part of the stock starts unallocated at HQ (the demo's default --hq-share), so some short
    // stores are served by an HQ fallback while processes are killed (issue 16).
    assert!(s["hq_fallbacks"]["FALLBACK_GRANT"].as_u64().unwrap_or(0) > 0, "no HQ fallback granted: {}", s["hq_fallbacks"]);
    let outcome = |k: &str| common::outcome(&s, k);
    let raw = &s["events_per_topic"];
    // No record lost: every order got exactly one stock answer and every reservation one
    // confirmation; every input event of the deduplicator reached the repartition topic.
    match s.get("distinct_events_per_topic").and_then(Value::as_object) {
        Some(d) => {
            let n = |t: &str| d.get(t).and_then(Value::as_u64);
            let get = |t: &str| n(t).unwrap_or_else(|| panic!("distinct_events_per_topic has no {t}: {d:?}"));
            if let Some(created) = n("order.created") {
                assert_eq!(created, expected_orders, "distinct order.created");
            }
            assert_eq!(
                get("stock.reserved") + get("stock.reservation.failed"),
                expected_orders,
                "one stock answer per order (distinct stock.reserved + stock.reservation.failed)"
            );
            assert_eq!(
                outcome("ORDER_CANCELLED/INSUFFICIENT_STOCK"),
                get("stock.reservation.failed"),
                "a cancellation per failed reservation"
            );
            if let Some(confirmed) = n("order.confirmed") {
                // A reservation whose order was cancelled before the confirmer read it is not
                // confirmed, and the driver stops once every order is terminal: at most one.
                assert!(confirmed <= get("stock.reserved"), "more order.confirmed ({confirmed}) than stock.reserved: {d:?}");
            }
            let dedup_inputs = ["order.created", "order.completed", "order.cancelled", "stock.reservation.expired", "inventory.adjusted"];
            if let (Some(commands), true) = (n("stock.commands"), dedup_inputs.iter().all(|t| n(t).is_some())) {
                let inputs: u64 = dedup_inputs.iter().map(|t| get(t)).sum();
                assert_eq!(commands, inputs, "every deduplicator input forwarded once to stock.commands: {d:?}");
            }
        }
        None => {
            println!("chaos: the summary has no distinct_events_per_topic; checking raw record counts only");
            assert!(raw["order.created"].as_u64().unwrap_or(0) >= expected_orders, "order.created records: {raw}");
            assert!(
                raw["stock.reserved"].as_u64().unwrap_or(0) + raw["stock.reservation.failed"].as_u64().unwrap_or(0) >= expected_orders,
                "stock answers: {raw}"
            );
        }
    }
    if variant.broker == BrokerKind::Kafka {
        // The test's own reading of every worker output topic.
        let kafka = common::Kafka::new(&broker.bootstrap);
        let outputs = common::worker_output_topics();
        let outputs: Vec<&str> = outputs.iter().map(String::as_str).collect();
        let report = common::exactly_once_report(&kafka.broker, &kafka.codec, &outputs, 6);
        let aborted: usize = report.values().map(|r| r.aborted).sum();
        println!("chaos: output topics at read_committed / read_uncommitted:");
        for (topic, r) in &report {
            println!("  {topic:30} committed {:>7}  uncommitted {:>7}  aborted {:>5}", r.committed, r.uncommitted, r.aborted);
        }
        let mut figures: Value = serde_json::from_slice(&fs::read(figures_path(variant.name)).unwrap()).unwrap();
        figures["transactions"] = json!({ "aborted_records": aborted, "per_topic": report });
        fs::write(figures_path(variant.name), serde_json::to_vec_pretty(&figures).unwrap()).expect("write chaos figures");
        for (topic, r) in &report {
            assert!(r.repeated_event_ids.is_empty(), "{topic}: a read_committed reader sees eventIds more than once: {r:?}");
            assert_eq!(r.undecodable, 0, "{topic}: undecodable records at read_committed: {r:?}");
        }
        assert!(aborted > 0, "no aborted records in any output topic: no kill landed mid-transaction ({} kills)", fleet.kills);
    }
    assert!(fleet.kills >= 5, "too few kills to call this chaos: {}", fleet.kills);
    let wiped = fleet.incarnations.iter().filter(|i| i.start == Start::RestartWiped).count();
    assert!(wiped >= 1, "no restart with the sled directory deleted");
    println!("chaos: passed in {:.1}s (seed {seed})", test_started.elapsed().as_secs_f64());
}
