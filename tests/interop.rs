//! Issue 14 on a real broker: programs written in other languages read and write orderflow's
//! Kafka records, and records written before issue 14 are still processed.
//!
//! The foreign clients are the two programs of `tests/interop/` (see its README): Java (Apache
//! Avro 1.12 `BinaryMessageEncoder`/`BinaryMessageDecoder`, kafka-clients) and Python (fastavro,
//! confluent-kafka). They share no code with orderflow. `scripts/install-tools.sh interop`
//! installs them (scripts/test.sh runs it). Every test runs on Apache Kafka, whatever
//! `ORDERFLOW_BROKER` says, because the tansu profile turns record headers off.
//!
//! 1. `foreign_fingerprints_are_the_codecs` (no broker): both programs print the same Parsing
//!    Canonical Form and CRC-64-AVRO fingerprint for every schema of `avro/` and `avro/history/`,
//!    and these are the codec's.
//! 2. `java_and_python_exchange_single_object_records_with_the_workers` and
//!    3. `java_and_python_exchange_confluent_records_through_a_registry` run one saga. Only the
//!    foreign programs feed it. Every worker of `topology.toml` runs in one process, with a 20 s
//!    reservation TTL.
//!    - Python restocks the store and sends half of the orders, each with a `traceparent` of its
//!      own.
//!    - Java sends the other half without one. Once the orders are reserved, Java pays most of
//!      them; the payment of a Python order carries that order's trace. Java also cancels one
//!      order as the POS would (`PAYMENT_FAILED`) and leaves a few unpaid to expire.
//!    - One order asks for more than the store holds.
//!
//!    The inputs and outputs together use all 11 schemas. Once every order has reached its
//!    outcome, the workers are stopped. Each program then reads every topic of the topology.
//!    The test compares what it decoded (schema, value, key, headers) with the test's own Rust
//!    reading of the same records, matched by topic, partition and offset.
//!
//!    On every worker output, the test also checks the record headers: `ce_type` is the schema's
//!    full name, `ce_id` is the eventId, `ce_source` is the worker that writes the topic, and the
//!    `traceparent` is a valid W3C one. It checks the trace as well: every output of an order
//!    that Python traced carries that order's trace-id (under a span id of its own), and all the
//!    outputs of one order share one trace-id.
//!
//!    Test 2 uses single-object encoding, and its records carry the spec-exact fingerprint. Test
//!    3 runs a private Apicurio Registry (`scripts/registry.sh`), the workers with
//!    `ORDERFLOW_REGISTRY_URL` and the programs with `--framing confluent`. It then checks that
//!    the registry holds the subject `<topic>-orderflow.events.<Name>` for each topic and schema
//!    seen.
//! 4. `records_with_the_legacy_fingerprint_are_still_processed`: a restock and orders are sent
//!    with a single-object header that carries the fingerprint apache-avro 0.22 computed (what
//!    orderflow wrote before issue 14). The orders are reserved and confirmed. The deduplicator
//!    counts exactly those records in `orderflow_legacy_fingerprint_records_total`, and the
//!    outputs carry the new fingerprint.
//!
//! `ORDERFLOW_KEEP_INTEROP_DIR=1` keeps the run directory: the workers' log and state, and what
//! each program printed. It is always kept, and its path printed, when a test fails.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{wait_for, BrokerKind, Guarded, Kafka, RunDir};
use orderflow_api::events::{
    cancel_reason, change_reason, release_reason, settlement, AdjustedItem, InventoryAdjusted, OrderCancelled, OrderCompleted,
    OrderCreated, OrderItem, SoldItem, StockReserved,
};
use orderflow_api::Event;
use orderflow_runtime::codec::{canonical, Codec, EVENT_NAMESPACE, SINGLE_OBJECT_MARKER};
use rdkafka::message::Message;
use rdkafka::producer::FutureRecord;
use rdkafka::util::Timeout;
use serde_json::{json, Value};

/// Partitions of every topic of `topology.toml`.
const PARTITIONS: i32 = 6;
/// Orders of the saga, alternately Python's (traced) and Java's (untraced).
const ORDERS: usize = 24;
/// The reservation TTL the workers run with (5 minutes in production).
const TTL: Duration = Duration::from_secs(20);
/// A payment or POS cancellation must go out at least this long before its reservation expires.
/// Otherwise the test (not the saga) was too slow, and a payment could meet its expiry.
const ANSWER_MARGIN: Duration = Duration::from_secs(6);
const HQ: &str = "HQ-I14";
const STORE: &str = "ST-I14";
const PRODUCT: &str = "P-1";
const UNIT_PRICE: i64 = 1500;
const RESTOCK_UNITS: i64 = 1_000;
/// The quantity of the order the store cannot serve: above the restock, below the reserver's
/// maximum quantity, so it fails with `INSUFFICIENT_STOCK`.
const TOO_MANY: i32 = 5_000;
const STEP_WITHIN: Duration = Duration::from_secs(90);
const POLL: Duration = Duration::from_millis(300);
/// How many foreign consumers run at once (the CI machine has two cores, and a JVM's start uses
/// one).
const CONSUMERS_AT_ONCE: usize = 4;
const CONSUME_TIMEOUT_S: u64 = 90;
const KEEP_VAR: &str = "ORDERFLOW_KEEP_INTEROP_DIR";

/// `<repo>/avro`, the schemas the codec and both programs load.
fn avro_dir() -> PathBuf {
    common::repo_root().join("avro")
}

/// A progress line with the test's elapsed time.
fn say(started: Instant, what: &str) {
    println!("interop [{:5.1}s] {what}", started.elapsed().as_secs_f64());
}

// ------------------------------------------------------------------------------------------
// The foreign programs.

/// One of the two foreign programs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Lang {
    Java,
    Python,
}

const LANGS: [Lang; 2] = [Lang::Java, Lang::Python];

impl Lang {
    fn name(self) -> &'static str {
        match self {
            Lang::Java => "java",
            Lang::Python => "python",
        }
    }
}

/// The installed programs (`scripts/install-tools.sh interop`).
struct Tools {
    jar: PathBuf,
    python: PathBuf,
    script: PathBuf,
}

impl Tools {
    /// The programs under `${ORDERFLOW_TOOLS:-~/.cache/orderflow/tools}`. Panics, saying how to
    /// install them, when they are missing.
    fn installed() -> Tools {
        let dir = match std::env::var_os("ORDERFLOW_TOOLS").filter(|d| !d.is_empty()) {
            Some(d) => PathBuf::from(d),
            None => PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache/orderflow/tools"),
        };
        let tools = Tools {
            jar: dir.join("interop/orderflow-interop.jar"),
            python: dir.join("interop-venv/bin/python"),
            script: common::repo_root().join("tests/interop/python/interop.py"),
        };
        for path in [&tools.jar, &tools.python, &tools.script] {
            assert!(
                path.is_file(),
                "the interop clients are not installed: {} is missing. Run `scripts/install-tools.sh interop` (scripts/test.sh \
                 does), with ORDERFLOW_TOOLS set as for this test if it is set",
                path.display()
            );
        }
        tools
    }

    /// The program's `command`, run from the repository root with stdin closed.
    fn command(&self, lang: Lang, command: &str) -> Command {
        let mut c = match lang {
            Lang::Java => {
                let mut c = Command::new("java");
                c.arg("-jar").arg(&self.jar);
                c
            }
            Lang::Python => {
                let mut c = Command::new(&self.python);
                c.arg(&self.script);
                c
            }
        };
        c.arg(command).current_dir(common::repo_root()).stdin(Stdio::null());
        c
    }

    /// Runs the command and waits for it. Panics when it cannot be started.
    fn output(&self, lang: Lang, mut cmd: Command) -> Output {
        cmd.output().unwrap_or_else(|e| panic!("cannot run the {} interop client: {e}", lang.name()))
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// How the values of the records are framed: single-object encoding without a registry, the
/// Confluent wire format with one.
#[derive(Debug, Clone)]
enum Framing {
    SingleObject,
    Confluent { registry: String },
}

impl Framing {
    /// `--framing ...` (and `--registry URL`) of the programs' command line.
    fn args(&self) -> Vec<String> {
        match self {
            Framing::SingleObject => vec!["--framing".into(), "single-object".into()],
            Framing::Confluent { registry } => {
                vec!["--framing".into(), "confluent".into(), "--registry".into(), registry.clone()]
            }
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Framing::SingleObject => "single-object",
            Framing::Confluent { .. } => "confluent",
        }
    }
}

/// A record the test has one of the programs send.
struct Outgoing {
    key: String,
    event: Event,
    headers: BTreeMap<String, String>,
}

/// What the test had the foreign programs send, by eventId.
struct Sent {
    topic: &'static str,
    via: Lang,
    event: Event,
    headers: BTreeMap<String, String>,
}

/// The foreign producers of one saga, and everything they sent.
struct Foreign<'a> {
    tools: &'a Tools,
    bootstrap: String,
    framing: Framing,
    sent: BTreeMap<String, Sent>,
}

impl Foreign<'_> {
    /// `lang`'s `produce` to `topic` of `records`, each as a plain-JSON line on stdin. Panics
    /// unless the program reports every record produced.
    fn send(&mut self, lang: Lang, topic: &'static str, records: Vec<Outgoing>) {
        let lines: String = records
            .iter()
            .map(|r| {
                json!({"key": r.key, "schema": r.event.schema_name(), "value": r.event.to_json(), "headers": r.headers}).to_string() + "\n"
            })
            .collect();
        let mut cmd = self.tools.command(lang, "produce");
        cmd.args(["--bootstrap", &self.bootstrap, "--topic", topic])
            .args(self.framing.args())
            .arg("--avro-dir")
            .arg(avro_dir())
            .args(["--timeout-secs", "30"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot run the {} interop client: {e}", lang.name()));
        child.stdin.take().expect("stdin").write_all(lines.as_bytes()).expect("write the records to the producer's stdin");
        let out = child.wait_with_output().expect("wait for the producer");
        let err = text(&out.stderr);
        assert!(out.status.success(), "{} produce to {topic} failed ({}):\n{err}", lang.name(), out.status);
        assert!(
            err.contains(&format!("produced {}", records.len())),
            "{} produce to {topic} did not report {} records:\n{err}",
            lang.name(),
            records.len()
        );
        for r in records {
            let id = r.event.event_id().to_string();
            let previous = self.sent.insert(id.clone(), Sent { topic, via: lang, event: r.event, headers: r.headers });
            assert!(previous.is_none(), "the test sent eventId {id} twice");
        }
    }
}

/// Every topic's records as each program's `consume` prints them, its output kept in `dir`:
/// (program, topic) → the JSON lines. `counts` gives the records to read per topic. At most
/// [`CONSUMERS_AT_ONCE`] programs run at a time. Panics when a program fails.
fn consume_all(
    tools: &Tools,
    bootstrap: &str,
    framing: &Framing,
    counts: &BTreeMap<String, usize>,
    dir: &Path,
) -> BTreeMap<(Lang, String), Vec<Value>> {
    let jobs: Vec<(Lang, &String, usize)> = LANGS.iter().flat_map(|&l| counts.iter().map(move |(t, &n)| (l, t, n))).collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let run = |(lang, topic, count): (Lang, &String, usize)| {
        let mut cmd = tools.command(lang, "consume");
        cmd.args(["--bootstrap", bootstrap, "--topic", topic]).args(framing.args()).arg("--avro-dir").arg(avro_dir()).args([
            "--count",
            &count.to_string(),
            "--timeout-secs",
            &CONSUME_TIMEOUT_S.to_string(),
        ]);
        (lang, topic.clone(), tools.output(lang, cmd))
    };
    // A few runners take the next job each until none is left.
    let outputs: Vec<(Lang, String, Output)> = std::thread::scope(|s| {
        let runners: Vec<_> = (0..CONSUMERS_AT_ONCE)
            .map(|_| {
                s.spawn(|| {
                    let mut done = Vec::new();
                    while let Some(&job) = jobs.get(next.fetch_add(1, std::sync::atomic::Ordering::Relaxed)) {
                        done.push(run(job));
                    }
                    done
                })
            })
            .collect();
        runners.into_iter().flat_map(|r| r.join().expect("consumer runner")).collect()
    });
    let mut out = BTreeMap::new();
    for (lang, topic, o) in outputs {
        let stdout = text(&o.stdout);
        std::fs::write(dir.join(format!("{}-consume-{topic}.jsonl", lang.name())), &stdout).expect("keep the program's output");
        assert!(o.status.success(), "{} consume of {topic} failed ({}):\n{}", lang.name(), o.status, text(&o.stderr));
        let lines = stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{} consume of {topic}: not JSON ({e}): {l}", lang.name())))
            .collect();
        out.insert((lang, topic), lines);
    }
    out
}

// ------------------------------------------------------------------------------------------
// The schema registry.

/// A private Apicurio Registry (`scripts/registry.sh`) on a free port, with its state in a
/// temporary directory. It is stopped when dropped, also when the test fails (the tail of its
/// log is printed then).
struct Registry {
    /// The Confluent API base URL, `http://127.0.0.1:PORT/apis/ccompat/v7`.
    url: String,
    port: u16,
    dir: tempfile::TempDir,
}

impl Registry {
    fn script(dir: &Path, command: &str) -> Command {
        let mut c = Command::new(common::repo_root().join("scripts/registry.sh"));
        c.arg(command).env("ORDERFLOW_REGISTRY_DIR", dir).env_remove("ORDERFLOW_REGISTRY_COMPATIBILITY");
        c
    }

    fn start() -> Registry {
        let dir = tempfile::Builder::new().prefix("orderflow-test-registry-").tempdir().expect("temp dir");
        let port = common::free_port();
        // The guard exists before the start, so a registry that started but did not answer in
        // time is stopped too.
        let mut registry = Registry { url: String::new(), port, dir };
        let out = Registry::script(registry.dir.path(), "start")
            .env("ORDERFLOW_REGISTRY_PORT", port.to_string())
            .output()
            .expect("run scripts/registry.sh start");
        assert!(out.status.success(), "the schema registry did not start:\n{}", text(&out.stderr));
        registry.url = text(&out.stdout).lines().last().expect("the registry's URL").trim().to_string();
        assert!(registry.url.ends_with("/apis/ccompat/v7"), "scripts/registry.sh start printed {:?}", registry.url);
        registry
    }

    /// `GET {url}/subjects`: every subject the registry holds.
    fn subjects(&self) -> BTreeSet<String> {
        let (status, body) = common::http_get(self.port, "/apis/ccompat/v7/subjects").expect("the registry answers GET /subjects");
        assert_eq!(status, 200, "GET /subjects: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET /subjects is not a JSON list of strings ({e}): {body}"))
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("schema registry log:\n{}", common::tail(&self.dir.path().join("registry.log"), 30));
        }
        let _ = Registry::script(self.dir.path(), "stop").output();
    }
}

// ------------------------------------------------------------------------------------------
// Reading the topics with the Rust codec.

/// One record of a topic, read and decoded by the test.
struct Rec {
    topic: String,
    partition: i32,
    offset: i64,
    key: Option<String>,
    headers: Vec<(String, String)>,
    bytes: Vec<u8>,
    event: Event,
}

impl Rec {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
    fn full_name(&self) -> String {
        format!("{EVENT_NAMESPACE}.{}", self.event.schema_name())
    }
    fn at(&self) -> String {
        format!("{}/{}@{}", self.topic, self.partition, self.offset)
    }
}

/// Every committed record of each of `topics`, read in parallel (a reader waits out one empty
/// fetch at each end) and decoded with the test's codec (with the registry when it has one), topic
/// by topic in the order given. Panics on a record that does not decode.
fn records(k: &Kafka, topics: &[&str]) -> Vec<Rec> {
    let read: Vec<Vec<rdkafka::message::OwnedMessage>> = std::thread::scope(|s| {
        let readers: Vec<_> = topics.iter().map(|t| s.spawn(|| common::read_topic(&k.broker, t, PARTITIONS))).collect();
        readers.into_iter().map(|r| r.join().expect("a topic reader panicked")).collect()
    });
    read.into_iter()
        .flatten()
        .map(|m| {
            let bytes = m.payload().unwrap_or_default().to_vec();
            let event =
                k.rt.block_on(k.codec.decode(&bytes))
                    .unwrap_or_else(|e| panic!("{}/{}@{} does not decode: {e}", m.topic(), m.partition(), m.offset()));
            Rec {
                topic: m.topic().to_string(),
                partition: m.partition(),
                offset: m.offset(),
                key: m.key().map(text),
                headers: common::header_pairs(&m),
                bytes,
                event,
            }
        })
        .collect()
}

// ------------------------------------------------------------------------------------------
// The saga's orders.

/// What happens to an order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// Java pays it once it is reserved.
    Pay,
    /// Java cancels it as the POS does (`PAYMENT_FAILED`) once it is reserved.
    PosCancel,
    /// It asks for more than the store holds: `stock.reservation.failed`, then cancelled.
    NoStock,
    /// Nobody pays: the reservation expires.
    Expire,
}

struct Planned {
    id: String,
    via: Lang,
    fate: Fate,
    quantity: i32,
    /// (trace-id, span-id) of the `traceparent` Python sends with the order.
    trace: Option<(String, String)>,
}

impl Planned {
    fn traceparent(&self) -> Option<String> {
        self.trace.as_ref().map(|(t, s)| format!("00-{t}-{s}-01"))
    }
}

/// Even orders are Python's, traced: one is cancelled by the POS, one asks for too much and the
/// rest are paid. Odd ones are Java's, untraced: every third is left to expire and the rest are
/// paid. Only untraced orders expire, because an expiry is a timer's output and starts the
/// order's derived trace (see `workers/runtime/src/headers.rs`).
fn plan() -> Vec<Planned> {
    (0..ORDERS)
        .map(|i| {
            let via = if i % 2 == 0 { Lang::Python } else { Lang::Java };
            let fate = match (via, i) {
                (Lang::Python, 2) => Fate::PosCancel,
                (Lang::Python, 4) => Fate::NoStock,
                (Lang::Java, _) if i % 6 == 1 => Fate::Expire,
                _ => Fate::Pay,
            };
            let trace = (via == Lang::Python).then(|| {
                (
                    format!("{:032x}", 0x0af7_6519_16cd_43dd_8448_eb21_1c80_0000_u128 + i as u128),
                    format!("{:016x}", 0xb7ad_6b71_6920_0000_u64 + i as u64),
                )
            });
            let quantity = if fate == Fate::NoStock { TOO_MANY } else { 1 + (i % 3) as i32 };
            Planned { id: format!("O-I14-{i:03}"), via, fate, quantity, trace }
        })
        .collect()
}

fn restock() -> Event {
    InventoryAdjusted {
        event_id: "restock-i14".into(),
        occurred_at: common::now_ms(),
        hq_id: HQ.into(),
        store_id: STORE.into(),
        adjustment_type: "RESTOCK".into(),
        reference_id: "ref-restock-i14".into(),
        items: vec![AdjustedItem { product_id: PRODUCT.into(), delta: RESTOCK_UNITS }],
        to_store_id: None,
        reason: None,
        operator: None,
    }
    .into()
}

fn order_created(id: &str, quantity: i32) -> Event {
    OrderCreated {
        event_id: format!("created-{id}"),
        occurred_at: common::now_ms(),
        order_id: id.into(),
        customer_id: "C-I14".into(),
        hq_id: HQ.into(),
        store_id: STORE.into(),
        items: vec![OrderItem { product_id: PRODUCT.into(), quantity, unit_price: UNIT_PRICE }],
    }
    .into()
}

/// The POS's answer to a reserved order: (topic, event), or `None` for an order left to expire.
fn pos_answer(p: &Planned, r: &StockReserved) -> Option<(&'static str, Event)> {
    match p.fate {
        Fate::Pay => Some((
            "order.completed",
            OrderCompleted {
                event_id: format!("completed-{}", p.id),
                occurred_at: common::now_ms(),
                order_id: p.id.clone(),
                reservation_id: r.reservation_id.clone(),
                hq_id: HQ.into(),
                store_id: STORE.into(),
                items: vec![SoldItem { product_id: PRODUCT.into(), quantity: p.quantity, actual_price: UNIT_PRICE }],
                total_amount: UNIT_PRICE * i64::from(p.quantity),
            }
            .into(),
        )),
        Fate::PosCancel => Some((
            "order.cancelled",
            OrderCancelled {
                event_id: format!("pos-payment-failed-{}", p.id),
                occurred_at: common::now_ms(),
                order_id: p.id.clone(),
                hq_id: HQ.into(),
                store_id: STORE.into(),
                reason: cancel_reason::PAYMENT_FAILED.into(),
                reservation_id: Some(r.reservation_id.clone()),
                customer_message: "결제에 실패했습니다 — payment failed".into(),
                refund_required: false,
                customer_id: None,
            }
            .into(),
        )),
        Fate::NoStock | Fate::Expire => None,
    }
}

/// What the topics say happened to one order (each eventId counted once).
#[derive(Debug, Default)]
struct Seen {
    reserved: Vec<StockReserved>,
    failed: usize,
    confirmed: usize,
    settled: Vec<String>,
    sales: usize,
    expired: usize,
    released: Vec<String>,
    cancelled: Vec<String>,
}

/// The topics that tell an order's outcome.
const OUTCOME_TOPICS: &[&str] = &[
    "stock.reserved",
    "stock.reservation.failed",
    "order.confirmed",
    "order.settled",
    "stock.updated",
    "stock.reservation.expired",
    "stock.reservation.released",
    "order.cancelled",
];

fn seen_per_order(k: &Kafka) -> BTreeMap<String, Seen> {
    let mut seen: BTreeMap<String, Seen> = BTreeMap::new();
    let mut ids = BTreeSet::new();
    for r in records(k, OUTCOME_TOPICS) {
        if !ids.insert(r.event.event_id().to_string()) {
            continue;
        }
        let Some(order) = r.event.order_id() else { continue };
        let o = seen.entry(order.to_string()).or_default();
        match r.event {
            Event::StockReserved(e) => o.reserved.push(e),
            Event::StockReservationFailed(_) => o.failed += 1,
            Event::OrderConfirmed(_) => o.confirmed += 1,
            Event::OrderSettled(e) => o.settled.push(e.outcome),
            Event::StockUpdated(e) if e.change_reason == change_reason::SALE => o.sales += 1,
            Event::StockReservationExpired(_) => o.expired += 1,
            Event::StockReservationReleased(e) => o.released.push(e.reason),
            Event::OrderCancelled(e) => o.cancelled.push(e.reason),
            _ => {}
        }
    }
    seen
}

/// Whether the topics show the end of an order of `fate`.
fn reached(fate: Fate, o: &Seen) -> bool {
    let has = |list: &[String], x: &str| list.iter().any(|r| r == x);
    match fate {
        Fate::Pay => !o.reserved.is_empty() && o.confirmed > 0 && has(&o.settled, settlement::SOLD) && o.sales > 0,
        Fate::PosCancel => {
            !o.reserved.is_empty() && has(&o.cancelled, cancel_reason::PAYMENT_FAILED) && has(&o.released, release_reason::CANCELLED)
        }
        Fate::NoStock => o.failed > 0 && has(&o.cancelled, cancel_reason::INSUFFICIENT_STOCK),
        Fate::Expire => {
            !o.reserved.is_empty()
                && o.expired > 0
                && has(&o.released, release_reason::EXPIRED)
                && has(&o.cancelled, cancel_reason::RESERVATION_EXPIRED)
        }
    }
}

fn wait_ready(port: u16, log: &Path, workers: &mut Guarded) {
    wait_for("ready workers (/readyz 200)", log, workers, STEP_WITHIN, Duration::from_millis(100), || {
        matches!(common::http_get(port, "/readyz"), Some((200, _))).then_some(())
    });
}

/// `topology.toml` with an absolute `avro_dir` and both `reservation_ttl`s at [`TTL`].
fn short_ttl_topology(dir: &Path) -> PathBuf {
    common::topology_copy(dir, "topology.toml", |original| {
        let mut replaced = 0;
        let lines: Vec<String> = original
            .lines()
            .map(|l| {
                if l.starts_with("reservation_ttl = ") {
                    replaced += 1;
                    format!("reservation_ttl = \"{}s\"   # interop test", TTL.as_secs())
                } else {
                    l.to_string()
                }
            })
            .collect();
        assert_eq!(replaced, 2, "topology.toml sets reservation_ttl for the stock reserver and the reservation expirer");
        lines.join("\n") + "\n"
    })
}

// ------------------------------------------------------------------------------------------
// Checks.

/// A W3C `traceparent` of version 00 as (trace-id, span-id), or `None` when it is not a valid
/// one (lowercase hex of the right lengths, trace and span ids not all zeros).
fn parse_traceparent(v: &str) -> Option<(String, String)> {
    let parts: Vec<&str> = v.split('-').collect();
    let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    let nonzero = |s: &str| s.bytes().any(|b| b != b'0');
    match parts[..] {
        ["00", trace, span, flags] if hex(trace, 32) && hex(span, 16) && hex(flags, 2) && nonzero(trace) && nonzero(span) => {
            Some((trace.to_string(), span.to_string()))
        }
        _ => None,
    }
}

/// What is wrong with the headers of worker output `r` of a topic that `writers` write.
fn header_problems(r: &Rec, writers: &BTreeSet<String>) -> Vec<String> {
    let mut problems = Vec::new();
    let mut names: Vec<&str> = r.headers.iter().map(|(k, _)| k.as_str()).collect();
    names.sort_unstable();
    if names.windows(2).any(|w| w[0] == w[1]) {
        problems.push(format!("repeated header names {names:?}"));
    }
    let sources: BTreeSet<String> = writers.iter().map(|w| format!("orderflow/{w}")).collect();
    let full_name = r.full_name();
    let mut check = |name: &str, ok: &dyn Fn(&str) -> bool, want: &str| match r.header(name) {
        Some(v) if ok(v) => {}
        other => problems.push(format!("{name} is {other:?}, expected {want}")),
    };
    check("ce_specversion", &|v| v == "1.0", "1.0");
    check("ce_type", &|v| v == full_name, &full_name);
    check("ce_id", &|v| v == r.event.event_id(), r.event.event_id());
    check("ce_source", &|v| sources.contains(v), &format!("one of {sources:?}"));
    check("content-type", &|v| v == "application/avro", "application/avro");
    check("traceparent", &|v| parse_traceparent(v).is_some(), "a valid W3C traceparent");
    problems.into_iter().map(|p| format!("{} ({}): {p}", r.at(), r.event.event_id())).collect()
}

/// A JSON value with every number as an i64 (or f64 when it is not integral), so that equal
/// values compare equal whatever their JSON spelling. Objects compare regardless of key order.
fn normalized(v: &Value) -> Value {
    match v {
        Value::Number(n) => n.as_i64().map(Value::from).or_else(|| n.as_f64().map(Value::from)).unwrap_or_else(|| v.clone()),
        Value::Array(items) => Value::Array(items.iter().map(normalized).collect()),
        Value::Object(m) => Value::Object(m.iter().map(|(k, v)| (k.clone(), normalized(v))).collect()),
        other => other.clone(),
    }
}

/// What `lang`'s reading of `topic` (`lines`) disagrees with the test's (`recs`) on: record by
/// record (partition and offset), the schema, the value (as plain JSON with the Avro field
/// names), the key and the headers.
fn foreign_problems(lang: Lang, topic: &str, recs: &[&Rec], lines: &[Value]) -> Vec<String> {
    let mut problems = Vec::new();
    let mut by_place: BTreeMap<(i64, i64), &Value> = BTreeMap::new();
    for line in lines {
        let place = (line["partition"].as_i64().unwrap_or(-1), line["offset"].as_i64().unwrap_or(-1));
        if by_place.insert(place, line).is_some() {
            problems.push(format!("{} read {topic}/{}@{} twice", lang.name(), place.0, place.1));
        }
    }
    for r in recs {
        let Some(line) = by_place.remove(&(i64::from(r.partition), r.offset)) else {
            problems.push(format!("{} did not read {}", lang.name(), r.at()));
            continue;
        };
        if let Some(e) = line.get("error") {
            problems.push(format!("{} could not decode {} ({}): {e}", lang.name(), r.at(), r.event.event_id()));
            continue;
        }
        let mut differs = |what: &str, theirs: &Value, ours: &Value| {
            if theirs != ours {
                problems.push(format!(
                    "{} read {} ({}) with {what} {theirs}, the test with {ours}",
                    lang.name(),
                    r.at(),
                    r.event.event_id()
                ));
            }
        };
        differs("schema", &line["schema"], &Value::from(r.full_name()));
        differs("value", &normalized(&line["value"]), &normalized(&r.event.to_json()));
        differs("key", &line["key"], &r.key.clone().map_or(Value::Null, Value::from));
        let ours: serde_json::Map<String, Value> = r.headers.iter().map(|(k, v)| (k.clone(), Value::from(v.clone()))).collect();
        differs("headers", &line["headers"], &Value::Object(ours));
    }
    problems.extend(by_place.keys().map(|(p, o)| format!("{} read {topic}/{p}@{o}, which the test did not", lang.name())));
    problems
}

/// Panics with the problems, numbered, unless there are none.
fn assert_none(what: &str, problems: &[String]) {
    let shown: Vec<&str> = problems.iter().take(40).map(String::as_str).collect();
    assert!(problems.is_empty(), "{} problem(s) with {what}:\n{}", problems.len(), shown.join("\n"));
}

// ------------------------------------------------------------------------------------------
// The saga through the foreign programs.

/// Runs the saga of the module docs with `framing`: the foreign programs send every input and
/// read every topic back, and the test compares. Returns every record of every topic (for
/// [`Registry`] checks).
fn saga_through_foreign_programs(tools: &Tools, framing: Framing, name: &str) -> Vec<Rec> {
    let started = Instant::now();
    let broker = common::Broker::start_kind(BrokerKind::Kafka);
    let run_dir = RunDir::create(&format!("orderflow-interop-{name}-"), KEEP_VAR, "interop: log, state and the programs' outputs");
    let topology = short_ttl_topology(run_dir.path());
    common::create_topics(&topology, &broker.bootstrap);
    let mut k = Kafka::new(&broker.bootstrap);
    let registry = match &framing {
        Framing::SingleObject => None,
        Framing::Confluent { registry } => Some(registry.clone()),
    };
    k.codec = Codec::load(&avro_dir(), registry.as_deref()).expect("schemas load");
    let port = common::free_port();
    let log = run_dir.path().join("workers.log");
    let mut cmd = common::run_command(&topology, &broker.bootstrap, "interop", port, &run_dir.path().join("state"), &log);
    match &registry {
        Some(url) => cmd.env("ORDERFLOW_REGISTRY_URL", url),
        None => cmd.env_remove("ORDERFLOW_REGISTRY_URL"),
    };
    let mut workers = Guarded::new(cmd.spawn().expect("spawn orderflow run"), Duration::from_millis(50));
    wait_ready(port, &log, &mut workers);
    say(started, &format!("{name}: Kafka at {}, workers ready (reservation TTL {TTL:?})", broker.bootstrap));

    // 1. Python restocks the store; the restock is on the store's command stream before any order.
    let mut foreign = Foreign { tools, bootstrap: broker.bootstrap.clone(), framing: framing.clone(), sent: BTreeMap::new() };
    let store_key = format!("{HQ}:{STORE}");
    foreign.send(Lang::Python, "inventory.adjusted", vec![Outgoing { key: store_key, event: restock(), headers: BTreeMap::new() }]);
    wait_for("the restock on stock.commands", &log, &mut workers, STEP_WITHIN, POLL, || {
        records(&k, &["stock.commands"]).iter().any(|r| matches!(r.event, Event::InventoryAdjusted(_))).then_some(())
    });

    // 2. The orders: Python's with a traceparent each, Java's without.
    let plans = plan();
    for lang in LANGS {
        let orders = plans
            .iter()
            .filter(|p| p.via == lang)
            .map(|p| Outgoing {
                key: p.id.clone(),
                event: order_created(&p.id, p.quantity),
                headers: p.traceparent().map(|t| ("traceparent".to_string(), t)).into_iter().collect(),
            })
            .collect();
        foreign.send(lang, "order.created", orders);
    }
    say(started, &format!("{name}: restock and {ORDERS} orders sent (python {}, java {})", ORDERS / 2, ORDERS / 2));
    let answered = |seen: &BTreeMap<String, Seen>| {
        plans.iter().all(|p| seen.get(&p.id).is_some_and(|o| !o.reserved.is_empty() || o.failed > 0)).then_some(())
    };
    wait_for("a stock answer for every order", &log, &mut workers, STEP_WITHIN, POLL, || answered(&seen_per_order(&k)));

    // 3. Java answers as the POS: payments and one PAYMENT_FAILED cancellation, a Python order's
    //    answer with that order's trace (a span of the POS's own).
    let seen = seen_per_order(&k);
    let mut answers: BTreeMap<&'static str, Vec<Outgoing>> = BTreeMap::new();
    for p in &plans {
        let o = &seen[&p.id];
        let expect_reserved = p.fate != Fate::NoStock;
        assert_eq!(
            (o.reserved.len(), o.failed),
            (usize::from(expect_reserved), usize::from(!expect_reserved)),
            "{} ({:?}): stock answers (reserved, failed)",
            p.id,
            p.fate
        );
        let Some(r) = o.reserved.first() else { continue };
        let left = r.expires_at - common::now_ms();
        assert!(
            left > ANSWER_MARGIN.as_millis() as i64,
            "{} answered {left} ms before its expiry: the test is too slow for the {TTL:?} TTL",
            p.id
        );
        if let Some((topic, event)) = pos_answer(p, r) {
            let headers = p.trace.iter().map(|(t, _)| ("traceparent".to_string(), format!("00-{t}-00f067aa0ba902b7-01"))).collect();
            answers.entry(topic).or_default().push(Outgoing { key: p.id.clone(), event, headers });
        }
    }
    let answer_counts: Vec<String> = answers.iter().map(|(t, a)| format!("{} to {t}", a.len())).collect();
    for (topic, records) in answers {
        foreign.send(Lang::Java, topic, records);
    }
    say(started, &format!("{name}: every order answered by the store; java sent {}", answer_counts.join(", ")));

    // 4. Every order reaches its end: paid, cancelled by the POS, refused for stock, expired.
    wait_for("every order's outcome on the topics", &log, &mut workers, TTL + STEP_WITHIN, POLL, || {
        let seen = seen_per_order(&k);
        plans.iter().all(|p| seen.get(&p.id).is_some_and(|o| reached(p.fate, o))).then_some(())
    });
    let (stopped, took) = workers.terminate(Duration::from_secs(60));
    assert!(
        stopped.is_some_and(|s| s.success()),
        "the workers did not stop cleanly ({stopped:?}); log {}:\n{}",
        log.display(),
        common::tail(&log, 30)
    );
    say(started, &format!("{name}: every order reached its outcome; workers stopped in {:.1}s", took.as_secs_f64()));

    // 5. The test's own reading of every topic.
    let loaded = orderflow_runtime::topology::load(&topology).expect("topology copy loads");
    let dead_letter_topics: Vec<String> = loaded.topology.dead_letter_topics().into_keys().collect();
    let broker_config = &k.broker;
    let dead: Vec<String> = std::thread::scope(|s| {
        let readers: Vec<_> =
            dead_letter_topics.iter().map(|t| s.spawn(move || (t, common::read_topic(broker_config, t, PARTITIONS).len()))).collect();
        readers
            .into_iter()
            .map(|r| r.join().expect("a topic reader panicked"))
            .filter(|(_, n)| *n > 0)
            .map(|(t, n)| format!("{t}: {n}"))
            .collect()
    });
    assert!(dead.is_empty(), "dead letters: a worker refused something the foreign programs sent or the saga wrote: {dead:?}");
    let mut writers: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (worker, spec) in &loaded.topology.workers {
        for topic in spec.outputs.values() {
            writers.entry(topic.clone()).or_default().insert(worker.clone());
        }
    }
    let topics: Vec<&str> = loaded.topology.topics.keys().map(String::as_str).collect();
    let all: Vec<Rec> = records(&k, &topics);

    let schemas: BTreeSet<&str> = all.iter().map(|r| r.event.schema_name()).collect();
    let every: BTreeSet<&str> = Event::SCHEMA_NAMES.iter().copied().collect();
    assert_eq!(schemas, every, "the schemas of the records, inputs and outputs together");

    // Framing: what the foreign programs and the workers wrote is what the framing says.
    let framing_problems: Vec<String> = all
        .iter()
        .filter_map(|r| {
            let ok = match &framing {
                Framing::SingleObject => {
                    r.bytes.len() > 10
                        && r.bytes[..2] == SINGLE_OBJECT_MARKER
                        && k.codec.fingerprint(r.event.schema_name()).map(u64::to_le_bytes).as_ref().map(|b| &b[..])
                            == Some(&r.bytes[2..10])
                        && !k.codec.is_legacy(&r.bytes)
                }
                Framing::Confluent { .. } => r.bytes.len() > 5 && r.bytes[0] == 0,
            };
            (!ok).then(|| format!("{}: not {} with the current schema: {:02x?}", r.at(), framing.name(), &r.bytes[..r.bytes.len().min(10)]))
        })
        .collect();
    assert_none(&format!("the framing ({})", framing.name()), &framing_problems);

    // Inputs: every record the programs sent is there once, as the test built it, with exactly
    // the headers it was given. Everything else is a worker output.
    let mut input_problems = Vec::new();
    let mut inputs_seen: BTreeMap<&str, usize> = BTreeMap::new();
    let mut outputs: Vec<&Rec> = Vec::new();
    for r in &all {
        match foreign.sent.get(r.event.event_id()).filter(|s| s.topic == r.topic) {
            Some(s) => {
                *inputs_seen.entry(r.event.event_id()).or_default() += 1;
                if r.event != s.event {
                    input_problems.push(format!("{}: {} sent {:?}, the test decoded {:?}", r.at(), s.via.name(), s.event, r.event));
                }
                let headers: BTreeMap<String, String> = r.headers.iter().cloned().collect();
                if headers != s.headers {
                    input_problems.push(format!("{}: {} sent headers {:?}, the record has {headers:?}", r.at(), s.via.name(), s.headers));
                }
            }
            None => outputs.push(r),
        }
    }
    for id in foreign.sent.keys() {
        if inputs_seen.get(id.as_str()) != Some(&1) {
            input_problems.push(format!("{id}: on its topic {:?} times, not once", inputs_seen.get(id.as_str())));
        }
    }
    assert_none("the records the foreign programs sent", &input_problems);

    // Headers of every worker output, and the trace of every order.
    let none = BTreeSet::new();
    let mut problems: Vec<String> = outputs.iter().flat_map(|r| header_problems(r, writers.get(&r.topic).unwrap_or(&none))).collect();
    let input_spans: BTreeSet<String> = foreign
        .sent
        .values()
        .filter_map(|s| s.headers.get("traceparent").and_then(|v| parse_traceparent(v)))
        .map(|(_, span)| span)
        .collect();
    let mut traces: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    for r in &outputs {
        if let (Some(order), Some((trace, span))) = (r.event.order_id(), r.header("traceparent").and_then(parse_traceparent)) {
            if input_spans.contains(&span) {
                problems.push(format!("{} ({}): the span id of the input's traceparent, not one of its own", r.at(), r.event.event_id()));
            }
            traces.entry(order).or_default().insert(trace);
        }
    }
    let mut order_of_trace: BTreeMap<&String, &str> = BTreeMap::new();
    for p in &plans {
        let Some(ids) = traces.get(p.id.as_str()) else {
            problems.push(format!("{}: no worker output with a valid traceparent", p.id));
            continue;
        };
        let listed: Vec<&String> = ids.iter().collect();
        match (&p.trace, listed.as_slice()) {
            (Some((sent, _)), [only]) if *only == sent => {}
            (None, [only]) if !plans.iter().any(|q| q.trace.as_ref().is_some_and(|(t, _)| t == *only)) => {}
            (sent, _) => {
                problems.push(format!("{} ({:?} via {}): outputs in traces {ids:?}, expected one, {sent:?}", p.id, p.fate, p.via.name()))
            }
        }
        for id in ids {
            if let Some(other) = order_of_trace.insert(id, &p.id) {
                problems.push(format!("{} and {other} share trace {id}", p.id));
            }
        }
    }
    assert_none("the headers of the worker outputs", &problems);
    let traced = plans.iter().filter(|p| p.trace.is_some()).count();
    say(
        started,
        &format!(
            "{name}: {} records on {} topics, all 11 schemas; {} worker outputs with good headers; {traced} orders in Python's \
             traces, {} in their derived ones",
            all.len(),
            topics.len(),
            outputs.len(),
            ORDERS - traced
        ),
    );

    // 6. Each program reads every topic back; it must read exactly what the test read.
    let mut by_topic: BTreeMap<&str, Vec<&Rec>> = BTreeMap::new();
    for r in &all {
        by_topic.entry(r.topic.as_str()).or_default().push(r);
    }
    let counts: BTreeMap<String, usize> = by_topic.iter().map(|(t, rs)| (t.to_string(), rs.len())).collect();
    say(started, &format!("{name}: java and python consume the {} topics ({CONSUMERS_AT_ONCE} programs at a time)", counts.len()));
    let read = consume_all(tools, &broker.bootstrap, &framing, &counts, run_dir.path());
    let mut problems = Vec::new();
    for ((lang, topic), lines) in &read {
        problems.extend(foreign_problems(*lang, topic, &by_topic[topic.as_str()], lines));
    }
    assert_none("what the foreign programs decoded", &problems);
    for lang in LANGS {
        let schemas: BTreeSet<&str> =
            read.iter().filter(|((l, _), _)| *l == lang).flat_map(|(_, ls)| ls.iter().filter_map(|l| l["schema"].as_str())).collect();
        assert_eq!(schemas.len(), Event::SCHEMA_NAMES.len(), "{} decoded the schemas {schemas:?}", lang.name());
    }
    say(started, &format!("{name}: java and python each decoded the {} records on {} topics as the test did", all.len(), counts.len()));
    all
}

// ------------------------------------------------------------------------------------------

#[test]
fn foreign_fingerprints_are_the_codecs() {
    let started = Instant::now();
    let tools = Tools::installed();
    let codec = Codec::load(&avro_dir(), None).expect("schemas load");
    let printed: BTreeMap<Lang, String> = LANGS
        .iter()
        .map(|&lang| {
            let mut cmd = tools.command(lang, "fingerprints");
            cmd.arg("--avro-dir").arg(avro_dir());
            let out = tools.output(lang, cmd);
            assert!(out.status.success(), "{} fingerprints failed ({}):\n{}", lang.name(), out.status, text(&out.stderr));
            (lang, text(&out.stdout))
        })
        .collect();
    assert_eq!(printed[&Lang::Java], printed[&Lang::Python], "java and python print different fingerprints or canonical forms");

    let mut problems = Vec::new();
    let (mut current, mut history) = (BTreeSet::new(), 0);
    for line in printed[&Lang::Java].lines() {
        let mut parts = line.splitn(3, ' ');
        let (Some(file), Some(fp), Some(pcf)) = (parts.next(), parts.next(), parts.next()) else {
            problems.push(format!("not `<file> <fingerprint> <canonical form>`: {line}"));
            continue;
        };
        let Ok(fp) = u64::from_str_radix(fp, 16).map_err(|_| ()).and_then(|v| if fp.len() == 16 { Ok(v) } else { Err(()) }) else {
            problems.push(format!("{file}: fingerprint {fp} is not 16 hex digits"));
            continue;
        };
        let raw = std::fs::read_to_string(avro_dir().join(file)).unwrap_or_else(|e| panic!("read avro/{file}: {e}"));
        let ours = canonical::parsing_canonical_form(&raw).unwrap_or_else(|e| panic!("avro/{file}: {e}"));
        if pcf != ours {
            problems.push(format!("{file}: the programs' canonical form\n  {pcf}\nis not the codec's\n  {ours}"));
        }
        let theirs = |name: &str| format!("{file}: the programs' fingerprint {fp:016x} is not the codec's {name}");
        match file.strip_prefix("history/") {
            None => {
                let name = file.strip_suffix(".avsc").unwrap_or(file);
                current.insert(name.to_string());
                if codec.fingerprint(name) != Some(fp) {
                    problems.push(format!("{} {:?}", theirs("fingerprint"), codec.fingerprint(name).map(|f| format!("{f:016x}"))));
                }
                // The fingerprints orderflow wrote before issue 14 are the ones no other language computes.
                for (_, legacy) in codec.legacy_fingerprints(name).into_iter().filter(|(v, _)| v.is_none()) {
                    if legacy == fp {
                        problems.push(format!("{file}: the legacy fingerprint {legacy:016x} equals the programs'"));
                    }
                }
            }
            Some(old) => {
                history += 1;
                let parsed =
                    old.strip_suffix(".avsc").and_then(|s| s.rsplit_once(".v")).and_then(|(n, v)| Some((n, v.parse::<u32>().ok()?)));
                let Some((name, version)) = parsed else {
                    problems.push(format!("{file}: not history/<Name>.v<N>.avsc"));
                    continue;
                };
                if !codec.history_fingerprints(name).contains(&(version, fp)) {
                    problems.push(format!("{} history {:?}", theirs("history fingerprints"), codec.history_fingerprints(name)));
                }
            }
        }
    }
    assert_none("the fingerprints", &problems);
    let names: BTreeSet<String> = Event::SCHEMA_NAMES.iter().map(|n| n.to_string()).collect();
    assert_eq!(current, names, "the current schemas the programs printed");
    let codec_history: usize = Event::SCHEMA_NAMES.iter().map(|n| codec.history_fingerprints(n).len()).sum();
    assert_eq!(history, codec_history, "the history schemas the programs printed vs the codec's");
    assert!(history > 0, "avro/history holds no schema: the history path was not tested");
    say(started, &format!("fingerprints: java and python agree with the codec on {} current and {history} history schemas", current.len()));
}

#[test]
fn java_and_python_exchange_single_object_records_with_the_workers() {
    let tools = Tools::installed();
    saga_through_foreign_programs(&tools, Framing::SingleObject, "single-object");
}

#[test]
fn java_and_python_exchange_confluent_records_through_a_registry() {
    let started = Instant::now();
    let tools = Tools::installed();
    let registry = Registry::start();
    say(started, &format!("confluent: schema registry at {}", registry.url));
    let all = saga_through_foreign_programs(&tools, Framing::Confluent { registry: registry.url.clone() }, "confluent");
    let expected: BTreeSet<String> = all.iter().map(|r| format!("{}-{}", r.topic, r.full_name())).collect();
    let subjects = registry.subjects();
    let missing: Vec<&String> = expected.difference(&subjects).collect();
    assert!(missing.is_empty(), "subjects missing from the registry: {missing:?}; it holds {subjects:?}");
    say(
        started,
        &format!(
            "confluent: the registry holds the {} subjects <topic>-<record> of the records ({} in all)",
            expected.len(),
            subjects.len()
        ),
    );
}

#[test]
fn records_with_the_legacy_fingerprint_are_still_processed() {
    const N: usize = 20;
    let started = Instant::now();
    let broker = common::Broker::start_kind(BrokerKind::Kafka);
    let run_dir = RunDir::create("orderflow-interop-legacy-", KEEP_VAR, "interop: log and state");
    let topology = common::repo_root().join("topology.toml");
    common::create_topics(&topology, &broker.bootstrap);
    let k = Kafka::new(&broker.bootstrap);

    // Single-object records as orderflow wrote them before issue 14: apache-avro 0.22's fingerprint.
    let send_legacy = |topic: &str, key: &str, event: Event| {
        let mut bytes = k.codec.encode_local(&event).expect("event encodes");
        let legacy = k.codec.legacy_fingerprints(event.schema_name());
        let (version, fp) = *legacy.first().unwrap_or_else(|| panic!("{} has no legacy fingerprint", event.schema_name()));
        assert_eq!(version, None, "the first legacy fingerprint is the current schema's");
        bytes[2..10].copy_from_slice(&fp.to_le_bytes());
        assert!(k.codec.is_legacy(&bytes), "{}: the rewritten header is not recognised as legacy", event.event_id());
        assert_eq!(k.codec.decode_local(&bytes).ok(), Some(event.clone()), "a legacy record decodes to its event");
        k.rt.block_on(k.producer.send(FutureRecord::to(topic).key(key).payload(&bytes), Timeout::After(Duration::from_secs(30))))
            .unwrap_or_else(|(e, _)| panic!("producing {}: {e}", event.event_id()));
    };

    send_legacy("inventory.adjusted", &format!("{HQ}:{STORE}"), restock());
    let port = common::free_port();
    let log = run_dir.path().join("workers.log");
    let child = common::run_command(&topology, &broker.bootstrap, "legacy", port, &run_dir.path().join("state"), &log)
        .env_remove("ORDERFLOW_REGISTRY_URL")
        .spawn()
        .expect("spawn orderflow run");
    let mut workers = Guarded::new(child, Duration::from_millis(50));
    wait_ready(port, &log, &mut workers);
    say(started, &format!("legacy: Kafka at {}, workers ready", broker.bootstrap));
    wait_for("the restock on stock.commands", &log, &mut workers, STEP_WITHIN, POLL, || {
        records(&k, &["stock.commands"]).iter().any(|r| matches!(r.event, Event::InventoryAdjusted(_))).then_some(())
    });
    let ids: Vec<String> = (0..N).map(|i| format!("O-LEGACY-{i:03}")).collect();
    for id in &ids {
        send_legacy("order.created", id, order_created(id, 1));
    }
    say(started, &format!("legacy: a restock and {N} orders sent with apache-avro 0.22's fingerprints"));

    let seen = wait_for("every order reserved and confirmed", &log, &mut workers, STEP_WITHIN, POLL, || {
        let seen = seen_per_order(&k);
        ids.iter().all(|id| seen.get(id).is_some_and(|o| !o.reserved.is_empty() && o.confirmed > 0)).then_some(seen)
    });
    for id in &ids {
        let o = &seen[id];
        assert_eq!((o.reserved.len(), o.failed, o.confirmed), (1, 0, 1), "{id}: (reserved, failed, confirmed)");
    }
    // The deduplicator past every input record: its counts are final.
    common::wait_group_past(
        &k.broker,
        &[("deduplicator", "inventory.adjusted"), ("deduplicator", "order.created")],
        PARTITIONS,
        &log,
        &mut workers,
        STEP_WITHIN,
    );
    let name = "orderflow_legacy_fingerprint_records_total";
    let counted = |topic: &str| common::metric(port, name, &[("worker", "deduplicator"), ("topic", topic)]) as u64;
    assert_eq!(counted("order.created"), N as u64, "{name}{{worker=\"deduplicator\",topic=\"order.created\"}}");
    assert_eq!(counted("inventory.adjusted"), 1, "{name}{{worker=\"deduplicator\",topic=\"inventory.adjusted\"}}");
    assert_eq!(common::metric(port, name, &[]) as u64, N as u64 + 1, "{name} over every worker and topic: the outputs are not legacy");

    let mut problems = Vec::new();
    let outputs = records(&k, &["stock.commands", "order.created.repartition", "stock.reserved", "order.confirmed", "stock.updated"]);
    for r in &outputs {
        let current = k.codec.fingerprint(r.event.schema_name()).expect("a schema").to_le_bytes();
        if k.codec.is_legacy(&r.bytes) || r.bytes[2..10] != current {
            problems.push(format!("{} ({}): header {:02x?}, not the current fingerprint", r.at(), r.event.event_id(), &r.bytes[..10]));
        }
    }
    assert_none("the outputs' fingerprints", &problems);
    let (stopped, _) = workers.terminate(Duration::from_secs(60));
    assert!(stopped.is_some_and(|s| s.success()), "the workers did not stop cleanly: {stopped:?}");
    say(
        started,
        &format!(
            "legacy: {N} orders reserved and confirmed, {} legacy records counted, {} outputs with the new fingerprint",
            N + 1,
            outputs.len()
        ),
    );
}
