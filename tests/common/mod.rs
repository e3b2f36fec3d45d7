//! Helpers shared by the integration tests: a private broker per test (Apache Kafka by default,
//! tansu with `ORDERFLOW_BROKER=tansu` or where a test asks for it; fresh data, free port), started
//! and stopped through `scripts/broker.sh`; child processes that
//! die with the test; run directories kept when a test fails; the workers' JSON logs
//! (tracing-subscriber output) and the driver's summary.

#![allow(dead_code)]

pub mod db;

use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

/// Repository root (two levels above the orderflow crate).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("repo root")
}

/// Which local broker a test runs on (`scripts/broker.sh`'s `ORDERFLOW_BROKER`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerKind {
    /// Apache Kafka, the reference broker: transactions, `exactly_once`.
    Kafka,
    /// tansu 0.6.0: no transactions, `effectively_once` (the topology's `tansu` profile).
    Tansu,
}

impl BrokerKind {
    /// The kind `ORDERFLOW_BROKER` names in the test's environment (`kafka` when unset), so
    /// `ORDERFLOW_BROKER=tansu scripts/test.sh` runs every broker-neutral test on tansu. Panics
    /// on another value.
    pub fn from_env() -> BrokerKind {
        match std::env::var("ORDERFLOW_BROKER").as_deref() {
            Err(_) | Ok("") | Ok("kafka") => BrokerKind::Kafka,
            Ok("tansu") => BrokerKind::Tansu,
            Ok(other) => panic!("ORDERFLOW_BROKER={other}: expected kafka or tansu"),
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            BrokerKind::Kafka => "kafka",
            BrokerKind::Tansu => "tansu",
        }
    }
}

/// A running broker; stopped when dropped.
pub struct Broker {
    pub bootstrap: String,
    pub kind: BrokerKind,
    dir: tempfile::TempDir,
}

impl Broker {
    /// Starts a fresh broker of [`BrokerKind::from_env`] on a free port.
    pub fn start() -> Broker {
        Broker::start_kind(BrokerKind::from_env())
    }

    /// Starts a fresh broker of `kind` on a free port (Kafka: newly formatted; tansu: a new
    /// SQLite database), with `properties` (`k=v`, Kafka only) added to its server properties.
    ///
    /// The topology profile goes with the broker: for tansu this process's `ORDERFLOW_PROFILE` is
    /// set to `tansu` (and removed for Kafka), so every client and child process the test
    /// creates afterwards loads `topology.toml` with the profile of the broker it talks to. The
    /// tests run one at a time (`--test-threads=1`, scripts/test.sh), which makes this safe.
    pub fn start_with(kind: BrokerKind, properties: &[&str]) -> Broker {
        match kind {
            BrokerKind::Kafka => std::env::remove_var("ORDERFLOW_PROFILE"),
            BrokerKind::Tansu => std::env::set_var("ORDERFLOW_PROFILE", "tansu"),
        }
        std::env::remove_var("ORDERFLOW_GUARANTEE");
        let dir = tempfile::Builder::new().prefix(&format!("orderflow-test-{}-", kind.as_str())).tempdir().expect("temp dir");
        let out = Command::new(repo_root().join("scripts/broker.sh"))
            .arg("start")
            .env("ORDERFLOW_BROKER", kind.as_str())
            .env("ORDERFLOW_BROKER_DIR", dir.path())
            .env("ORDERFLOW_BROKER_PROPERTIES", properties.join(" "))
            .env_remove("ORDERFLOW_BROKER_PORT")
            .env_remove("ORDERFLOW_BROKER_KEEP")
            .env_remove("ORDERFLOW_BROKER_ENGINE")
            .output()
            .expect("run scripts/broker.sh");
        assert!(out.status.success(), "{} did not start:\n{}", kind.as_str(), String::from_utf8_lossy(&out.stderr));
        let bootstrap = String::from_utf8_lossy(&out.stdout).lines().last().expect("bootstrap line").trim().to_string();
        Broker { bootstrap, kind, dir }
    }

    /// [`Broker::start_with`] without extra properties.
    pub fn start_kind(kind: BrokerKind) -> Broker {
        Broker::start_with(kind, &[])
    }

    /// The broker's state directory (`broker.log`, its data, `port`, `pid`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The broker's log file.
    pub fn log(&self) -> PathBuf {
        self.dir.path().join("broker.log")
    }

    /// Stops the broker process (SIGTERM, then SIGKILL after 30 s); its data stays.
    pub fn stop(&self) {
        let out = Command::new(repo_root().join("scripts/broker.sh"))
            .arg("stop")
            .env("ORDERFLOW_BROKER_DIR", self.dir.path())
            .output()
            .expect("run scripts/broker.sh stop");
        assert!(out.status.success(), "broker did not stop:\n{}", String::from_utf8_lossy(&out.stderr));
    }

    /// Starts the stopped broker again on the same port with the same data, so every topic,
    /// record, committed offset and open transaction is still there.
    pub fn start_again(&self) {
        let port = self.bootstrap.rsplit(':').next().expect("bootstrap host:port");
        let out = Command::new(repo_root().join("scripts/broker.sh"))
            .arg("start")
            .env("ORDERFLOW_BROKER", self.kind.as_str())
            .env("ORDERFLOW_BROKER_DIR", self.dir.path())
            .env("ORDERFLOW_BROKER_PORT", port)
            .env("ORDERFLOW_BROKER_KEEP", "1")
            .env_remove("ORDERFLOW_BROKER_ENGINE")
            .output()
            .expect("run scripts/broker.sh start");
        assert!(out.status.success(), "broker did not start again:\n{}", String::from_utf8_lossy(&out.stderr));
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = Command::new(repo_root().join("scripts/broker.sh")).arg("stop").env("ORDERFLOW_BROKER_DIR", self.dir.path()).output();
    }
}

/// The release or debug `orderflow` binary built for this test run.
pub fn orderflow_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_orderflow"))
}

// ------------------------------------------------------------------------------------------
// Processes.

/// Sends SIGTERM to the process with id `pid` (through `kill -TERM <pid>`; never by name).
pub fn sigterm(pid: u32) {
    let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status();
}

/// A child process that is SIGKILLed and reaped when dropped, so a failing assertion never
/// leaves a worker or the driver behind.
pub struct Guarded {
    child: Child,
    /// How often [`Guarded::wait_for`] and [`Guarded::terminate`] check whether it exited.
    poll: Duration,
}

impl Guarded {
    /// Guards `child`; waits for its exit check every `poll`.
    pub fn new(child: Child, poll: Duration) -> Guarded {
        Guarded { child, poll }
    }
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
    /// The exit status if the child has exited (None while it runs, or if it cannot be asked).
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
    /// SIGKILL, then waits for the exit.
    pub fn kill_and_wait(&mut self) -> ExitStatus {
        let _ = self.child.kill();
        self.child.wait().expect("wait for killed child")
    }
    /// Waits until the child exits or `timeout` passes.
    pub fn wait_for(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let until = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_wait() {
                return Some(s);
            }
            if Instant::now() >= until {
                return None;
            }
            std::thread::sleep(self.poll);
        }
    }
    /// SIGTERM, then waits up to `within`; returns the exit status and how long it took.
    pub fn terminate(&mut self, within: Duration) -> (Option<ExitStatus>, Duration) {
        let sent = Instant::now();
        sigterm(self.pid());
        let status = self.wait_for(within);
        (status, sent.elapsed())
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        if self.try_wait().is_none() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// A test's run directory (logs, state, summaries): removed after a passing test, kept and
/// printed after a failing one or when the environment variable `keep_var` is `1`.
pub struct RunDir {
    path: PathBuf,
    keep_var: &'static str,
    /// Printed before " kept in <path>" when the directory is kept.
    kept_note: &'static str,
}

impl RunDir {
    /// Creates a fresh temp directory whose name starts with `prefix`.
    pub fn create(prefix: &str, keep_var: &'static str, kept_note: &'static str) -> RunDir {
        let path = tempfile::Builder::new().prefix(prefix).tempdir().expect("temp dir").keep();
        RunDir { path, keep_var, kept_note }
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var(self.keep_var).is_ok_and(|v| v == "1") {
            eprintln!("{} kept in {}", self.kept_note, self.path.display());
        } else {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// The last `lines` lines of the file at `path` (empty if it cannot be read).
pub fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

// ------------------------------------------------------------------------------------------
// The `orderflow` CLI.

/// `orderflow <command> <args> --topology <repo>/topology.toml --bootstrap <bootstrap>`, run from
/// the repository root without `ORDERFLOW_BOOTSTRAP`/`ORDERFLOW_TOPOLOGY` from the environment
/// and with `RUST_BACKTRACE=0`; waits for it and returns its output. Panics if it cannot be run.
pub fn cli(bootstrap: &str, command: &str, args: &[&str]) -> Output {
    let root = repo_root();
    Command::new(orderflow_bin())
        .current_dir(&root)
        .arg(command)
        .args(args)
        .arg("--topology")
        .arg(root.join("topology.toml"))
        .args(["--bootstrap", bootstrap])
        .env("RUST_BACKTRACE", "0")
        .env_remove("ORDERFLOW_BOOTSTRAP")
        .env_remove("ORDERFLOW_TOPOLOGY")
        .output()
        .unwrap_or_else(|e| panic!("run orderflow {command}: {e}"))
}

/// The stdout of `o` as text (invalid UTF-8 replaced).
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The stderr of `o` as text (invalid UTF-8 replaced).
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs [`cli`]`(bootstrap, command, args)`, asserts it succeeded (panicking with its status,
/// stdout and stderr otherwise) and returns its stdout.
pub fn ok(bootstrap: &str, command: &str, args: &[&str]) -> String {
    let o = cli(bootstrap, command, args);
    assert!(o.status.success(), "orderflow {command} {args:?} failed ({}):\n{}\n{}", o.status, stdout(&o), stderr(&o));
    stdout(&o)
}

/// Runs [`cli`]`(bootstrap, command, args)`, asserts it failed with `expected` in its stderr
/// (panicking with its stdout or stderr otherwise) and returns its stderr.
pub fn fails(bootstrap: &str, command: &str, args: &[&str], expected: &str) -> String {
    let o = cli(bootstrap, command, args);
    assert!(!o.status.success(), "orderflow {command} {args:?} should fail:\n{}", stdout(&o));
    let err = stderr(&o);
    assert!(err.contains(expected), "orderflow {command} {args:?}: expected `{expected}` in stderr:\n{err}");
    err
}

// ------------------------------------------------------------------------------------------
// Worker processes and their endpoints.

/// A free TCP port on 127.0.0.1 in 20000–31999 (bound and released; the worker binds it right
/// after). Panics if none can be bound.
pub fn free_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::Mutex;
    // Below Linux's ephemeral range (32768–60999): a port picked there can be taken by any
    // outbound connection (a broker client's) between this check and the process binding it
    // (seen: a worker's metrics endpoint failing with "Address already in use"). Never the same
    // port twice in one test process.
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..1_000 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        let port = 20_000 + (h.finish() % 12_000) as u16;
        if !given.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return port;
        }
    }
    panic!("no bindable port in 20000–31999 after 1,000 tries")
}

/// A plain HTTP/1.0 GET of `path` on 127.0.0.1:`port` (connect timeout 500 ms, read and write
/// timeouts 5 s): (status, body), or None when nothing answers or the answer is not HTTP.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    http(port, "GET", path, &[], None)
}

/// One HTTP/1.0 request `method path` with `headers` and `body` to 127.0.0.1:`port`: the status
/// and the body, or None when nothing answers (read timeout 5 s for a GET, else 15 s).
pub fn http(port: u16, method: &str, path: &str, headers: &[(&str, &str)], body: Option<&[u8]>) -> Option<(u16, String)> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    // A GET (probes, metrics) answers at once; the API's reserve and release may wait 10 s.
    s.set_read_timeout(Some(Duration::from_secs(if method == "GET" { 5 } else { 15 }))).ok()?;
    s.set_write_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut head = format!("{method} {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        head.push_str(&format!("Content-Length: {}\r\n", b.len()));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).ok()?;
    if let Some(b) = body {
        // A server may answer (413) and close before reading a large body: the answer counts.
        let _ = s.write_all(b);
    }
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let code = head.lines().next()?.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, body.to_string()))
}

/// The HTTP status of a GET of `path` on 127.0.0.1:`port` ([`http_get`]), or None when nothing
/// answers.
pub fn http_status(port: u16, path: &str) -> Option<u16> {
    http_get(port, path).map(|(code, _)| code)
}

/// Sum of the samples of `name` in the Prometheus text `body` whose labels include every
/// `key="value"` of `labels` (0 when none; unparsable values are skipped).
pub fn metric_in(body: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let prefix = format!("{name}{{");
    body.lines()
        .filter(|l| l.starts_with(&prefix))
        .filter(|l| labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

/// [`metric_in`] of the `/metrics` scrape on 127.0.0.1:`port`; 0 when the scrape does not
/// answer 200.
pub fn metric(port: u16, name: &str, labels: &[(&str, &str)]) -> f64 {
    let Some((200, body)) = http_get(port, "/metrics") else { return 0.0 };
    metric_in(&body, name, labels)
}

/// Polls `check` every `every` until it returns `Some`, and returns that value. Panics (with
/// `what` and the last 30 lines of the worker log `log`) if `workers` exits first or `within`
/// passes.
pub fn wait_for<T>(
    what: &str,
    log: &Path,
    workers: &mut Guarded,
    within: Duration,
    every: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    let until = Instant::now() + within;
    loop {
        if let Some(v) = check() {
            return v;
        }
        if let Some(s) = workers.try_wait() {
            panic!("the workers exited ({s}) while waiting for {what}; log {}:\n{}", log.display(), tail(log, 30));
        }
        assert!(Instant::now() < until, "no {what} within {}s; log {}:\n{}", within.as_secs(), log.display(), tail(log, 30));
        std::thread::sleep(every);
    }
}

/// The command `orderflow --log-json run --topology <topology> --bootstrap <bootstrap>
/// --instance <instance> --metrics-addr 127.0.0.1:<port>`, from the repository root, with state
/// in `state_dir`, stdin and stdout null, stderr (the JSON log) to a new file `log`, and
/// `RUST_BACKTRACE=0` but none of `ORDERFLOW_BOOTSTRAP`, `ORDERFLOW_INSTANCE`,
/// `ORDERFLOW_METRICS_ADDR`, `ORDERFLOW_TOPOLOGY` from the environment. Add `--worker` and other
/// arguments, then spawn it. Panics if `log` cannot be created.
pub fn run_command(topology: &Path, bootstrap: &str, instance: &str, port: u16, state_dir: &Path, log: &Path) -> Command {
    let mut cmd = Command::new(orderflow_bin());
    cmd.current_dir(repo_root())
        .args(["--log-json", "run", "--topology"])
        .arg(topology)
        .args(["--bootstrap", bootstrap, "--instance", instance])
        .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
        .env("RUST_BACKTRACE", "0")
        .env("ORDERFLOW_STATE_DIR", state_dir)
        .env_remove("ORDERFLOW_BOOTSTRAP")
        .env_remove("ORDERFLOW_INSTANCE")
        .env_remove("ORDERFLOW_METRICS_ADDR")
        .env_remove("ORDERFLOW_TOPOLOGY")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(File::create(log).expect("create log file")));
    cmd
}

/// All the workers of `<repo>/topology.toml` in one [`run_command`] process (instance
/// `instance`, endpoints on `port`, state in `dir/state`, log `dir/workers.log`) with `extra`
/// arguments such as `["--reservation-ttl", "10m"]`; returns the guarded child (exit checks
/// every 50 ms) and the log's path. Panics if it cannot be spawned.
pub fn spawn_workers(bootstrap: &str, dir: &Path, port: u16, instance: &str, extra: &[&str]) -> (Guarded, PathBuf) {
    let log = dir.join("workers.log");
    let child = run_command(&repo_root().join("topology.toml"), bootstrap, instance, port, &dir.join("state"), &log)
        .args(extra)
        .spawn()
        .expect("spawn orderflow run");
    (Guarded::new(child, Duration::from_millis(50)), log)
}

// ------------------------------------------------------------------------------------------
// JSON logs (tracing-subscriber's JSON format) and timestamps.

/// The lines of `text` that parse as JSON (other lines are skipped).
pub fn json_lines(text: &str) -> Vec<Value> {
    text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// The JSON lines of the log file at `path` (none if it cannot be read).
pub fn log_lines(path: &Path) -> Vec<Value> {
    json_lines(&fs::read_to_string(path).unwrap_or_default())
}

/// Field `name` of a log line: under `fields`, else at the top level.
pub fn field<'a>(v: &'a Value, name: &str) -> Option<&'a Value> {
    v.get("fields").and_then(|f| f.get(name)).or_else(|| v.get(name))
}

/// The log line's message ("" when it has none).
pub fn message(v: &Value) -> &str {
    field(v, "message").and_then(Value::as_str).unwrap_or("")
}

/// Whether the log line is at level ERROR.
pub fn is_error(v: &Value) -> bool {
    v.get("level").and_then(Value::as_str) == Some("ERROR")
}

/// A numeric field: a JSON number, or a string such as `"1.5"` or `"1.5s"`.
pub fn num(v: Option<&Value>) -> Option<f64> {
    match v? {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim_end_matches('s').parse().ok(),
        _ => None,
    }
}

/// The log line's `timestamp` in seconds since the epoch.
pub fn timestamp(v: &Value) -> Option<f64> {
    v.get("timestamp").and_then(Value::as_str).and_then(parse_utc)
}

/// Seconds since the epoch of an RFC 3339 UTC timestamp as tracing-subscriber writes it
/// (`2025-11-21T09:26:01.123456Z`; a `+00:00` suffix is accepted too).
pub fn parse_utc(ts: &str) -> Option<f64> {
    let ts = ts.strip_suffix('Z').or_else(|| ts.strip_suffix("+00:00"))?;
    let (date, time) = ts.split_once('T')?;
    let mut d = date.splitn(3, '-').map(|x| x.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut t = time.splitn(3, ':');
    let (h, mi, s) = (t.next()?.parse::<i64>().ok()?, t.next()?.parse::<i64>().ok()?, t.next()?.parse::<f64>().ok()?);
    // Days from civil (Howard Hinnant).
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + h * 3_600 + mi * 60) as f64 + s)
}

/// Milliseconds since the epoch now. Panics if the clock is before the epoch.
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after the epoch").as_millis() as i64
}

/// `ms` milliseconds since the epoch as RFC 3339 UTC with milliseconds
/// (`2025-11-21T09:26:01.123Z`). Panics if `ms` is negative.
pub fn rfc3339(ms: i64) -> String {
    let ms = u64::try_from(ms).expect("a time after the epoch");
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// Seconds since the epoch of `t` (0 before the epoch).
pub fn unix_secs(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

// ------------------------------------------------------------------------------------------
// The driver's summary (`orderflow demo --json`).

/// Asserts the domain invariants every driver summary `s` of `expected` orders must show: one
/// terminal outcome per order, no payload conflict, stock conserved, the seed scenarios pass,
/// `order.created` holds exactly one record per order and no dead-letter topic holds any.
pub fn assert_summary_invariants(s: &Value, expected: u64) {
    let len = |k: &str| s[k].as_array().map(Vec::len).unwrap_or_else(|| panic!("summary has no list {k}"));
    assert_eq!(s["orders"], expected, "orders in the summary");
    assert_eq!(len("without_terminal_outcome"), 0, "orders without a terminal outcome: {}", s["without_terminal_outcome"]);
    assert_eq!(len("with_several_outcomes"), 0, "orders with several outcomes: {}", s["with_several_outcomes"]);
    let by = &s["by_outcome"];
    let terminal = outcome(s, "ORDER_COMPLETED")
        + outcome(s, "ORDER_CANCELLED/INSUFFICIENT_STOCK")
        + outcome(s, "ORDER_CANCELLED/PAYMENT_FAILED")
        + outcome(s, "ORDER_CANCELLED/RESERVATION_EXPIRED")
        + outcome(s, "ORDER_CANCELLED/PAYMENT_AFTER_EXPIRY");
    assert_eq!(terminal, expected, "one terminal outcome per order (no CONFLICT, none pending): {by}");
    assert_eq!(len("payload_conflicts"), 0, "eventIds with two payloads: {}", s["payload_conflicts"]);
    assert_eq!(len("conservation_violations"), 0, "{}", s["conservation_violations"]);
    assert_eq!(len("negative_stock"), 0, "{}", s["negative_stock"]);
    for st in s["stores"].as_array().expect("stores") {
        assert_eq!(st["conserved"], true, "{st}");
    }
    // Issue 16 (seed 004): per HQ and product, total = unallocated + Σ stores' on hand (nothing
    // in transit at rest) = initial − sold, never negative.
    let hqs = s["hqs"].as_array().expect("hqs");
    assert!(!hqs.is_empty(), "the summary names no HQ");
    for hq in hqs {
        assert_eq!(hq["holds"], true, "HQ invariant: {hq}");
        assert_eq!(hq["in_transit"], 0, "units in transit at rest: {hq}");
        assert_eq!(hq["total"], hq["unallocated"].as_i64().unwrap() + hq["at_stores"].as_i64().unwrap(), "HQ total: {hq}");
    }
    // Every HQ fallback request read on the reserver's commands topic got one answer.
    let step = |k: &str| s["hq_fallbacks"][k].as_u64().unwrap_or(0);
    assert_eq!(
        step("FALLBACK_GRANT") + step("FALLBACK_DENY"),
        step("FALLBACK_REQUEST"),
        "one grant or denial per HQ fallback request: {}",
        s["hq_fallbacks"]
    );
    for seed in s["seed_scenarios"].as_array().expect("seed_scenarios") {
        assert_eq!(seed["pass"], true, "{seed}");
    }
    let raw = &s["events_per_topic"];
    // order.created comes from the order service through the outbox relay (or the driver with
    // --direct): every order's event at least once. The offsets also hold the relay's transaction
    // markers under exactly_once, and a republished batch repeats eventIds, so the exact check is
    // on distinct eventIds where the observer read the topic.
    let created = raw["order.created"].as_i64().expect("order.created count");
    assert!(created >= expected as i64, "order.created records: {raw}");
    if let Some(distinct) = s["distinct_events_per_topic"].get("order.created") {
        assert_eq!(*distinct, expected, "distinct order.created eventIds: {}", s["distinct_events_per_topic"]);
    }
    for (topic, n) in raw.as_object().expect("events_per_topic") {
        if topic.ends_with(".dlq") {
            assert_eq!(n, 0, "{topic} holds records");
        }
    }
}

/// How many orders of summary `s` ended with outcome `k` (`by_outcome`; 0 when absent).
pub fn outcome(s: &Value, k: &str) -> u64 {
    s["by_outcome"][k].as_u64().unwrap_or(0)
}

// ------------------------------------------------------------------------------------------
// Reading topics and creating them.

/// Every record of `topic` from the low to the high watermark (as seen at the call) of each of
/// its `partitions`, in arrival order per partition, as a `read_committed` consumer sees them.
/// Reads by assignment (no group commits). Panics if the ends are not reached within 30 s.
pub fn read_topic(broker: &orderflow_runtime::topology::BrokerConfig, topic: &str, partitions: i32) -> Vec<rdkafka::message::OwnedMessage> {
    read_topic_at(broker, topic, partitions, Isolation::ReadCommitted)
}

/// The isolation level of a reader (`isolation.level`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isolation {
    /// Only records of committed transactions (and non-transactional ones), up to the last
    /// stable offset.
    ReadCommitted,
    /// Every record, aborted transactions and open ones included, up to the high watermark.
    ReadUncommitted,
}

/// [`read_topic`] at `isolation`. The end of each partition is where the consumer reports
/// end-of-partition (`enable.partition.eof`) at or beyond the high watermark seen at the call:
/// a transactional topic ends in a control record (the commit or abort marker) that is never
/// delivered, so "the record at high watermark − 1" cannot be waited for. Under `ReadCommitted`
/// a partition whose transaction is still open ends at its last stable offset instead (its
/// end-of-partition comes there) and the records after it are not returned.
pub fn read_topic_at(
    broker: &orderflow_runtime::topology::BrokerConfig,
    topic: &str,
    partitions: i32,
    isolation: Isolation,
) -> Vec<rdkafka::message::OwnedMessage> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::error::KafkaError;
    use rdkafka::message::Message;
    use rdkafka::{Offset, TopicPartitionList};
    let mut config = orderflow_runtime::kafka::client_config(broker, orderflow_runtime::kafka::Side::Consumer);
    config.set("group.id", format!("orderflow-test-read-{}", std::process::id())).set("enable.partition.eof", "true");
    config.set(
        "isolation.level",
        match isolation {
            Isolation::ReadCommitted => "read_committed",
            Isolation::ReadUncommitted => "read_uncommitted",
        },
    );
    let consumer: BaseConsumer = config.create().expect("consumer");
    let mut tpl = TopicPartitionList::new();
    let mut pending = std::collections::BTreeMap::new();
    for p in 0..partitions {
        let (low, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(10)).expect("watermarks");
        if high > low {
            tpl.add_partition_offset(topic, p, Offset::Offset(low)).unwrap();
            pending.insert(p, high);
        }
    }
    let mut out = Vec::new();
    if pending.is_empty() {
        return out;
    }
    consumer.assign(&tpl).unwrap();
    let until = Instant::now() + Duration::from_secs(30);
    while !pending.is_empty() {
        assert!(Instant::now() < until, "reading {topic} ({isolation:?}) did not reach the ends {pending:?}");
        match consumer.poll(Duration::from_millis(100)) {
            None => {}
            Some(Err(KafkaError::PartitionEOF(p))) => {
                let position = consumer.position().ok().and_then(|tpl| tpl.find_partition(topic, p).map(|e| e.offset()));
                let reached = match (position, pending.get(&p)) {
                    (Some(Offset::Offset(at)), Some(&high)) => at >= high || isolation == Isolation::ReadCommitted,
                    _ => isolation == Isolation::ReadCommitted,
                };
                if reached {
                    pending.remove(&p);
                }
            }
            Some(Err(e)) => panic!("reading {topic}: {e}"),
            Some(Ok(m)) if pending.get(&m.partition()).is_some_and(|&high| m.offset() < high) => out.push(m.detach()),
            Some(Ok(_)) => {}
        }
    }
    out
}

/// Partitions of `topic` (`partitions` of them) whose last stable offset (where a
/// `read_committed` reader stops) lags their high watermark: `(partition, high watermark, last
/// stable offset)`. Long after the producers have finished, such a partition holds a transaction
/// that is still open (a stalled or hanging transaction) and blocks every `read_committed` reader.
pub fn unstable_partitions(broker: &orderflow_runtime::topology::BrokerConfig, topic: &str, partitions: i32) -> Vec<(i32, i64, i64)> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let reader = |isolation: &str| -> BaseConsumer {
        let mut config = orderflow_runtime::kafka::client_config(broker, orderflow_runtime::kafka::Side::Consumer);
        config.set("group.id", format!("orderflow-test-ends-{}", std::process::id())).set("isolation.level", isolation);
        config.create().expect("consumer")
    };
    let (committed, uncommitted) = (reader("read_committed"), reader("read_uncommitted"));
    (0..partitions)
        .filter_map(|p| {
            let (_, hw) = uncommitted.fetch_watermarks(topic, p, Duration::from_secs(10)).ok()?;
            let (_, lso) = committed.fetch_watermarks(topic, p, Duration::from_secs(10)).ok()?;
            (lso < hw).then_some((p, hw, lso))
        })
        .collect()
}

/// For consumer group `group` and each of `topics` (`partitions` each): the partitions whose
/// committed offset is behind the last stable offset, as `(topic, partition, committed,
/// last stable offset)` (committed -1 when the group has none). Read without joining the group.
pub fn group_behind(
    broker: &orderflow_runtime::topology::BrokerConfig,
    group: &str,
    topics: &[&str],
    partitions: i32,
) -> Vec<(String, i32, i64, i64)> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{Offset, TopicPartitionList};
    let mut config = orderflow_runtime::kafka::client_config(broker, orderflow_runtime::kafka::Side::Consumer);
    config.set("group.id", group).set("isolation.level", "read_committed");
    let consumer: BaseConsumer = config.create().expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for t in topics {
        for p in 0..partitions {
            tpl.add_partition(t, p);
        }
    }
    let Ok(committed) = consumer.committed_offsets(tpl, Duration::from_secs(10)) else {
        return vec![(format!("(cannot read the offsets of {group})"), -1, -1, -1)];
    };
    committed
        .elements()
        .iter()
        .filter_map(|e| {
            let at = match e.offset() {
                Offset::Offset(o) => o,
                _ => -1,
            };
            let (_, lso) = consumer.fetch_watermarks(e.topic(), e.partition(), Duration::from_secs(10)).ok()?;
            // A transactional partition ends in a commit marker: committed may stop one short.
            (at < lso - 1).then(|| (e.topic().to_string(), e.partition(), at, lso))
        })
        .collect()
}

/// Partitions of `topic` (`partitions` of them) on which consumer group `group` has not
/// committed past the last record a `read_committed` reader sees now: `(partition, committed
/// offset or -1, offset of that record)`. Exact on transactional and plain topics alike (unlike
/// [`group_behind`], which allows for a trailing commit marker). Empty means the group's worker
/// processed every record of `topic` there is, and, as its offsets are committed with (exactly
/// once) or after (effectively once) its outputs, the outputs of those records are written: the
/// positive marker a "nothing more came of it" check waits for.
pub fn group_not_past(
    broker: &orderflow_runtime::topology::BrokerConfig,
    group: &str,
    topic: &str,
    partitions: i32,
) -> Vec<(i32, i64, i64)> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Message;
    use rdkafka::{Offset, TopicPartitionList};
    let mut last: std::collections::BTreeMap<i32, i64> = std::collections::BTreeMap::new();
    for m in read_topic(broker, topic, partitions) {
        let at = last.entry(m.partition()).or_insert(m.offset());
        *at = (*at).max(m.offset());
    }
    let mut config = orderflow_runtime::kafka::client_config(broker, orderflow_runtime::kafka::Side::Consumer);
    config.set("group.id", group);
    let consumer: BaseConsumer = config.create().expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in last.keys() {
        tpl.add_partition(topic, *p);
    }
    let committed = consumer.committed_offsets(tpl, Duration::from_secs(10)).unwrap_or_default();
    last.into_iter()
        .filter_map(|(p, record)| {
            let at = match committed.find_partition(topic, p).map(|e| e.offset()) {
                Some(Offset::Offset(o)) => o,
                _ => -1,
            };
            (at <= record).then_some((p, at, record))
        })
        .collect()
}

/// Waits (see [`wait_for`]: panics when `workers` exit first or `within` passes) until, for each
/// `(worker, topic)` of `steps` in turn, [`group_not_past`] of the worker's consumer group (as
/// `topology.toml` names it) is empty for `topic`. List an upstream worker's input before its
/// downstream's, so that the upstream's outputs are all there when the downstream's input is read.
pub fn wait_group_past(
    broker: &orderflow_runtime::topology::BrokerConfig,
    steps: &[(&str, &str)],
    partitions: i32,
    log: &Path,
    workers: &mut Guarded,
    within: Duration,
) {
    let loaded = orderflow_runtime::topology::load(&repo_root().join("topology.toml")).expect("topology loads");
    for (worker, topic) in steps {
        let group = loaded.topology.workers.get(*worker).unwrap_or_else(|| panic!("no worker {worker} in topology.toml")).group_id(worker);
        wait_for(&format!("{group} committing past every record of {topic}"), log, workers, within, Duration::from_millis(300), || {
            group_not_past(broker, &group, topic, partitions).is_empty().then_some(())
        });
    }
}

/// What a `read_committed` and a `read_uncommitted` reader found in one output topic
/// ([`exactly_once_report`]).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct TopicTxnReport {
    /// Records a `read_committed` reader sees.
    pub committed: usize,
    /// Records a `read_uncommitted` reader sees (aborted and open transactions included).
    pub uncommitted: usize,
    /// `uncommitted − committed`: records of aborted transactions.
    pub aborted: usize,
    /// eventIds the `read_committed` reader saw more than once, with their counts (first 10).
    pub repeated_event_ids: Vec<(String, usize)>,
    /// Records the `read_committed` reader could not decode.
    pub undecodable: usize,
}

/// Reads each of `topics` (`partitions` each) at both isolation levels and decodes every
/// committed record's eventId with `codec`: the test's own check of exactly-once output, not
/// the driver's. Returns topic → report; the caller asserts (`repeated_event_ids` empty: each
/// eventId once; `aborted` > 0 somewhere: kills landed mid-transaction).
pub fn exactly_once_report(
    broker: &orderflow_runtime::topology::BrokerConfig,
    codec: &orderflow_runtime::codec::Codec,
    topics: &[&str],
    partitions: i32,
) -> std::collections::BTreeMap<String, TopicTxnReport> {
    use rdkafka::message::Message;
    let mut out = std::collections::BTreeMap::new();
    for &topic in topics {
        let committed = read_topic_at(broker, topic, partitions, Isolation::ReadCommitted);
        let uncommitted = read_topic_at(broker, topic, partitions, Isolation::ReadUncommitted);
        let mut counts: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
        let mut undecodable = 0;
        for m in &committed {
            match m.payload().map(|b| codec.decode_local(b)) {
                Some(Ok(e)) => *counts.entry(e.event_id().to_string()).or_default() += 1,
                _ => undecodable += 1,
            }
        }
        let mut repeated: Vec<(String, usize)> = counts.into_iter().filter(|(_, n)| *n > 1).collect();
        repeated.sort();
        repeated.truncate(10);
        out.insert(
            topic.to_string(),
            TopicTxnReport {
                committed: committed.len(),
                uncommitted: uncommitted.len(),
                aborted: uncommitted.len().saturating_sub(committed.len()),
                repeated_event_ids: repeated,
                undecodable,
            },
        );
    }
    out
}

/// The topics the workers of `topology.toml` write (their `outputs`), without dead-letter and
/// changelog topics: where exactly-once output is checked.
pub fn worker_output_topics() -> Vec<String> {
    let loaded = orderflow_runtime::topology::load(&repo_root().join("topology.toml")).expect("topology loads");
    let mut topics: Vec<String> = loaded.topology.workers.values().flat_map(|w| w.outputs.values().cloned()).collect();
    topics.sort();
    topics.dedup();
    topics
}

/// The headers of `m` as `(key, value as lossy UTF-8)` pairs, in order.
pub fn header_pairs(m: &rdkafka::message::OwnedMessage) -> Vec<(String, String)> {
    use rdkafka::message::{Headers, Message};
    m.headers()
        .map(|hs| hs.iter().map(|h| (h.key.to_string(), String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned())).collect())
        .unwrap_or_default()
}

/// `<repo>/topology.toml` with `edit` applied to its text and an absolute `avro_dir` put first,
/// written to `dir/name` (so the copy loads from any directory); returns its path.
pub fn topology_copy(dir: &Path, name: &str, edit: impl FnOnce(String) -> String) -> PathBuf {
    let root = repo_root();
    let original = std::fs::read_to_string(root.join("topology.toml")).expect("read topology.toml");
    let text = format!("avro_dir = {:?}\n\n{}", root.join("avro").display().to_string(), edit(original));
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write topology copy");
    path
}

/// `orderflow topics` for the topology file `topology` on `bootstrap`; panics with its stderr if
/// it fails.
pub fn create_topics(topology: &Path, bootstrap: &str) {
    let out = Command::new(orderflow_bin())
        .current_dir(repo_root())
        .args(["topics", "--topology"])
        .arg(topology)
        .args(["--bootstrap", bootstrap])
        .env_remove("ORDERFLOW_BOOTSTRAP")
        .output()
        .expect("run orderflow topics");
    assert!(out.status.success(), "orderflow topics failed:\n{}", String::from_utf8_lossy(&out.stderr));
}

/// A test's clients of one broker: the topology's producer (idempotent, `murmur2_random`) on a
/// current-thread runtime to block on, its broker configuration (for [`read_topic`]) and the codec
/// of the repository's `avro/`. Test files add their own produce/read helpers with `impl Kafka`.
pub struct Kafka {
    pub rt: tokio::runtime::Runtime,
    pub broker: orderflow_runtime::topology::BrokerConfig,
    pub producer: rdkafka::producer::FutureProducer,
    pub codec: orderflow_runtime::codec::Codec,
}

impl Kafka {
    /// Clients of the broker at `bootstrap`, configured from the repository's `topology.toml`.
    pub fn new(bootstrap: &str) -> Kafka {
        let root = repo_root();
        let mut loaded = orderflow_runtime::topology::load(&root.join("topology.toml")).expect("topology loads");
        loaded.topology.broker.bootstrap = bootstrap.to_string();
        let broker = loaded.topology.broker.clone();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let producer = {
            let _guard = rt.enter();
            orderflow_runtime::kafka::client_config(&broker, orderflow_runtime::kafka::Side::Producer).create().expect("producer")
        };
        let codec = orderflow_runtime::codec::Codec::load(&root.join("avro"), None).expect("schemas load");
        Kafka { rt, broker, producer, codec }
    }

    /// Produces `event` (encoded by the local codec) to `topic` with `key`; panics if the broker
    /// does not acknowledge it within 30 s.
    pub fn produce_event(&self, topic: &str, key: &str, event: orderflow_api::Event) {
        let bytes = self.codec.encode_local(&event).expect("event encodes");
        let record = rdkafka::producer::FutureRecord::to(topic).key(key).payload(&bytes);
        self.rt
            .block_on(self.producer.send(record, rdkafka::util::Timeout::After(Duration::from_secs(30))))
            .unwrap_or_else(|(e, _)| panic!("producing to {topic}: {e}"));
    }
}

/// A private schema registry (Apicurio Registry's Confluent-compatible API, `scripts/registry.sh`)
/// on a free port with its own state directory; stopped when dropped. BACKWARD compatibility is
/// on from the start; every start begins empty.
pub struct Registry {
    /// The Confluent API base URL, `http://127.0.0.1:PORT/apis/ccompat/v7`.
    pub url: String,
    dir: tempfile::TempDir,
}

impl Registry {
    /// Starts it (installs it first if missing); panics with the script's output if it does not
    /// come up.
    pub fn start() -> Registry {
        let dir = tempfile::Builder::new().prefix("orderflow-test-registry-").tempdir().expect("temp dir");
        let out = Command::new(repo_root().join("scripts/registry.sh"))
            .arg("start")
            .env("ORDERFLOW_REGISTRY_DIR", dir.path())
            .env("ORDERFLOW_REGISTRY_PORT", free_port().to_string())
            .output()
            .expect("run scripts/registry.sh");
        assert!(out.status.success(), "the schema registry did not start:\n{}", String::from_utf8_lossy(&out.stderr));
        let url = String::from_utf8_lossy(&out.stdout).lines().last().expect("registry URL line").trim().to_string();
        Registry { url, dir }
    }

    /// The registry's log file.
    pub fn log(&self) -> PathBuf {
        self.dir.path().join("registry.log")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = Command::new(repo_root().join("scripts/registry.sh")).arg("stop").env("ORDERFLOW_REGISTRY_DIR", self.dir.path()).output();
    }
}
