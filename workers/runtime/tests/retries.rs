//! The retry policy for transient processor failures, end to end: a real `Worker`
//! (`effectively_once`) against librdkafka's MockCluster with a scripted test processor.
//!
//! * a `ProcessError::Transient` is retried in place with the topology's exponential backoff and,
//!   once it passes, the event is processed exactly once and nothing is dead-lettered;
//! * an event still transient after `retry.attempts` retries is dead-lettered with class
//!   `transient`, its attempt count, its source coordinates and its original key, value and
//!   headers, and the partition keeps flowing;
//! * a `ProcessError::Invalid` is permanent: dead-lettered at once, never retried.
//!
//! The backoff assertions are behavioural lower bounds (the worker did wait between attempts),
//! not performance assertions.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use orderflow_api::events::{OrderCreated, OrderItem};
use orderflow_api::{Context, Event, Outputs, ProcessError, Processor, StateTxn};
use orderflow_runtime::codec::Codec;
use orderflow_runtime::metrics::Metrics;
use orderflow_runtime::store::Store;
use orderflow_runtime::topology::{self, KindInfo};
use orderflow_runtime::worker::{now_ms, Worker, WorkerError, WorkerSetup};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio::sync::watch;
use tokio::task::JoinHandle;

const WORKER: &str = "flaky";
const INPUT: &str = "order.created";
const OUTPUT: &str = "order.forwarded";
const DLQ: &str = "order.created.dlq";
const CHANGELOG: &str = "orderflow-flaky-changelog";
const PARTITIONS: i32 = 2;
/// Every input goes to this partition (not 0, so the partition header is really checked).
const PARTITION: i32 = 1;
const PORTS: &[&str] = &["out"];
const KINDS: &[KindInfo] =
    &[KindInfo { name: "flaky", ports: PORTS, settings: KindInfo::no_settings, reads_external: true, source: false }];

/// How long the worker may take to join the group, restore and handle the inputs.
const PROCESS_DEADLINE: Duration = Duration::from_secs(60);
/// How long a clean stop may take.
const STOP_DEADLINE: Duration = Duration::from_secs(20);
/// How long reading a topic back may take.
const READ_DEADLINE: Duration = Duration::from_secs(15);

/// The retry policy under test: 3 retries waiting 50 ms, 100 ms, 200 ms.
const INITIAL_BACKOFF: Duration = Duration::from_millis(50);
const RETRIES: u32 = 3;

fn avro_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../avro")
}

// ---------------------------------------------------------------------------------------------
// The scripted processor.

/// What the test processor does with one `eventId`; unscripted events are forwarded.
#[derive(Debug, Clone, Copy)]
enum Script {
    /// `ProcessError::Transient` on the first `n` calls, then forwarded.
    TransientTimes(u32),
    /// `ProcessError::Transient` on every call.
    AlwaysTransient,
    /// `ProcessError::Invalid` on every call.
    Invalid,
}

/// One call of `Processor::process`, as the processor saw it.
#[derive(Debug, Clone)]
struct Call {
    event_id: String,
    partition: i32,
    offset: i64,
    at: Instant,
    ok: bool,
}

type CallLog = Arc<Mutex<Vec<Call>>>;

/// Fails as scripted, otherwise forwards an `OrderCreated` on `out` with the derived
/// `eventId` `<input eventId>/forwarded`; logs every call.
struct Flaky {
    scripts: BTreeMap<String, Script>,
    calls: CallLog,
}

fn forwarded_id(event_id: &str) -> String {
    format!("{event_id}/forwarded")
}

impl Processor for Flaky {
    fn process(&mut self, ctx: &Context, event: &Event, _state: &mut StateTxn, out: &mut Outputs) -> Result<(), ProcessError> {
        let id = event.event_id().to_string();
        let earlier = self.calls.lock().unwrap().iter().filter(|c| c.event_id == id).count() as u32;
        let call = earlier + 1;
        let result = match self.scripts.get(&id) {
            Some(Script::TransientTimes(n)) if earlier < *n => {
                Err(ProcessError::Transient(format!("inventory service unavailable (call {call} of {id})")))
            }
            Some(Script::AlwaysTransient) => Err(ProcessError::Transient(format!("inventory service unavailable (call {call} of {id})"))),
            Some(Script::Invalid) => Err(ProcessError::Invalid(format!("OrderCreated {id}: quantity must be positive"))),
            _ => match event {
                Event::OrderCreated(o) => {
                    let mut fwd = o.clone();
                    fwd.event_id = forwarded_id(&o.event_id);
                    out.emit("out", o.order_id.clone(), fwd)
                }
                other => Err(ProcessError::Invalid(format!("unexpected {}", other.schema_name()))),
            },
        };
        self.calls.lock().unwrap().push(Call {
            event_id: id,
            partition: ctx.partition,
            offset: ctx.offset,
            at: Instant::now(),
            ok: result.is_ok(),
        });
        result
    }
}

// ---------------------------------------------------------------------------------------------
// Cluster, topology and worker.

struct Setup {
    mock: MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    dir: tempfile::TempDir,
    codec: Arc<Codec>,
}

fn setup() -> Setup {
    let mock = MockCluster::new(1).expect("mock cluster");
    for t in [INPUT, OUTPUT, DLQ, CHANGELOG] {
        mock.create_topic(t, PARTITIONS, 1).expect("mock topic");
    }
    let dir = tempfile::tempdir().unwrap();
    let codec = Arc::new(Codec::load(&avro_dir(), None).unwrap());
    Setup { mock, dir, codec }
}

/// The topology: one `flaky` worker, `effectively_once`, with its own retry policy
/// (3 retries, 50 ms × 2ⁿ, capped at 1 s).
fn topology_text(s: &Setup) -> String {
    format!(
        r#"
avro_dir = "{avro}"
[broker]
bootstrap = "{bootstrap}"
[defaults]
guarantee = "effectively_once"
commit_interval = "50ms"
state_dir = "{state}"
static_membership = false
[topics."{INPUT}"]
partitions = {PARTITIONS}
key = "orderId"
schema = "OrderCreated"
[topics."{OUTPUT}"]
partitions = {PARTITIONS}
key = "orderId"
schema = "OrderCreated"
[workers.{WORKER}]
kind = "flaky"
inputs = ["{INPUT}"]
outputs = {{ out = "{OUTPUT}" }}
[workers.{WORKER}.retry]
attempts = {RETRIES}
initial_backoff = "{backoff}ms"
multiplier = 2.0
max_backoff = "1s"
"#,
        avro = avro_dir().display(),
        bootstrap = s.mock.bootstrap_servers(),
        state = s.dir.path().join("state").display(),
        backoff = INITIAL_BACKOFF.as_millis(),
    )
}

struct Running {
    stop: watch::Sender<bool>,
    handle: JoinHandle<Result<(), WorkerError>>,
    metrics: Metrics,
    calls: CallLog,
}

async fn start(s: &Setup, scripts: &[(&str, Script)]) -> Running {
    let path = s.dir.path().join("topology.toml");
    let loaded = topology::parse(&topology_text(s), &path).expect("topology parses");
    let problems = topology::check(&loaded, KINDS);
    assert!(problems.is_empty(), "the test topology has problems: {problems:?}");
    let spec = &loaded.topology.workers[WORKER];
    let retry = spec.retry(&loaded.topology.defaults);
    assert_eq!(
        (retry.attempts, retry.initial_backoff, retry.multiplier, retry.max_backoff),
        (RETRIES, INITIAL_BACKOFF, 2.0, Duration::from_secs(1)),
        "the worker's retry policy is the one under test"
    );
    assert_eq!(spec.guarantee(&loaded.topology.defaults).as_str(), "effectively_once");
    let calls = CallLog::default();
    let metrics = Metrics::new();
    let worker = Worker::new(WorkerSetup {
        name: WORKER.into(),
        topology: Arc::new(loaded),
        processor: Box::new(Flaky { scripts: scripts.iter().map(|(id, sc)| (id.to_string(), *sc)).collect(), calls: calls.clone() }),
        ports: PORTS,
        codec: s.codec.clone(),
        metrics: metrics.clone(),
        instance: "0".into(),
        ready: Arc::new(AtomicBool::new(false)),
    })
    .await
    .expect("effectively_once worker starts");
    let (stop, rx) = watch::channel(false);
    Running { stop, handle: tokio::spawn(worker.run(rx)), metrics, calls }
}

impl Running {
    /// Waits until `done` holds, failing with `what` and the worker's counters after
    /// [`PROCESS_DEADLINE`] or at once if the worker stopped by itself.
    async fn wait_until(&self, what: &str, done: impl Fn(&Metrics) -> bool) {
        let deadline = Instant::now() + PROCESS_DEADLINE;
        while !done(&self.metrics) {
            assert!(!self.handle.is_finished(), "the worker stopped by itself while waiting until {what}");
            assert!(
                Instant::now() < deadline,
                "timed out after {PROCESS_DEADLINE:?} waiting until {what}; calls: {:?}\n{}",
                self.calls(),
                counters(&self.metrics)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the worker, which must exit cleanly within [`STOP_DEADLINE`]; returns the call log.
    async fn stop(self) -> (Metrics, Vec<Call>) {
        self.stop.send(true).unwrap();
        let result = tokio::time::timeout(STOP_DEADLINE, self.handle)
            .await
            .unwrap_or_else(|_| panic!("the worker did not stop within {STOP_DEADLINE:?}"))
            .expect("worker task panicked");
        result.expect("the worker stops cleanly");
        let calls = self.calls.lock().unwrap().clone();
        (self.metrics, calls)
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }
}

/// The runtime's counters, for failure messages.
fn counters(metrics: &Metrics) -> String {
    metrics
        .render()
        .lines()
        .filter(|l| {
            !l.starts_with('#') && ["consumed", "produced", "dlq_records", "retries", "commit_seconds_count"].iter().any(|n| l.contains(n))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

// ---------------------------------------------------------------------------------------------
// Inputs and reading back.

fn order(i: usize) -> Event {
    Event::OrderCreated(OrderCreated {
        event_id: format!("e-{i}"),
        occurred_at: 1_000,
        order_id: format!("O-{i}"),
        customer_id: "C".into(),
        hq_id: "HQ".into(),
        store_id: format!("S{}", i % 3),
        items: vec![OrderItem { product_id: "P".into(), quantity: 1, unit_price: 1 }],
    })
}

/// One input record as produced.
struct Input {
    event_id: String,
    key: Vec<u8>,
    value: Vec<u8>,
    partition: i32,
    offset: i64,
}

/// Produces `events` to [`INPUT`] partition [`PARTITION`] in order (keyed by orderId, encoded
/// with `Codec::encode_local`, each with a `trace-id` header) and returns where each landed.
async fn produce(s: &Setup, events: &[Event]) -> Vec<Input> {
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", s.mock.bootstrap_servers()).create().unwrap();
    let mut inputs = Vec::new();
    for e in events {
        let value = s.codec.encode_local(e).unwrap();
        let key = e.order_id().unwrap().as_bytes().to_vec();
        let trace = format!("trace-{}", e.event_id());
        let headers = OwnedHeaders::new().insert(Header { key: "trace-id", value: Some(trace.as_bytes()) });
        let record = FutureRecord::to(INPUT).partition(PARTITION).key(&key).payload(&value).headers(headers);
        let delivery = tokio::time::timeout(READ_DEADLINE, producer.send(record, Timeout::Never))
            .await
            .expect("the mock cluster acknowledges the inputs")
            .map_err(|(e, _)| e)
            .expect("input produced");
        inputs.push(Input { event_id: e.event_id().to_string(), key, value, partition: delivery.partition, offset: delivery.offset });
    }
    inputs
}

/// Every record of `topic` (all partitions, from the beginning up to the high watermark).
fn read_all(s: &Setup, topic: &str) -> Vec<OwnedMessage> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", s.mock.bootstrap_servers())
        .set("group.id", format!("reader-{topic}"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut high = BTreeMap::new();
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        let (low, hi) =
            consumer.fetch_watermarks(topic, p, Duration::from_secs(5)).unwrap_or_else(|e| panic!("watermarks of {topic}[{p}]: {e}"));
        assert_eq!(low, 0, "{topic}[{p}] starts at offset 0");
        high.insert(p, hi);
        tpl.add_partition_offset(topic, p, Offset::Beginning).unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut next: BTreeMap<i32, i64> = (0..PARTITIONS).map(|p| (p, 0)).collect();
    let mut out = Vec::new();
    let deadline = Instant::now() + READ_DEADLINE;
    while next.iter().any(|(p, n)| n < &high[p]) {
        assert!(Instant::now() < deadline, "read {} records of {topic} in {READ_DEADLINE:?}; watermarks {high:?}", out.len());
        if let Some(r) = consumer.poll(Duration::from_millis(100)) {
            let m = r.unwrap_or_else(|e| panic!("reading {topic}: {e}"));
            next.insert(m.partition(), m.offset() + 1);
            out.push(m.detach());
        }
    }
    out
}

/// The `eventId`s of the records of [`OUTPUT`], in the order read.
fn output_ids(s: &Setup) -> Vec<String> {
    read_all(s, OUTPUT)
        .iter()
        .map(|m| s.codec.decode_local(m.payload().expect("output has a value")).unwrap().event_id().to_string())
        .collect()
}

/// The headers of `m` as (key, value) pairs, in order.
fn headers(m: &OwnedMessage) -> Vec<(String, Option<Vec<u8>>)> {
    m.headers().map(|h| h.iter().map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec))).collect()).unwrap_or_default()
}

/// The value of header `key`, which must occur exactly once, as text.
fn header(m: &OwnedMessage, key: &str) -> String {
    let all = headers(m);
    let found: Vec<_> = all.iter().filter(|(k, _)| k == key).collect();
    assert_eq!(found.len(), 1, "header {key} occurs once on the dead-letter record; headers: {all:?}");
    String::from_utf8(found[0].1.clone().unwrap_or_else(|| panic!("header {key} has a value"))).unwrap()
}

/// Checks a dead-letter record against the input it came from.
fn assert_dead_letter(m: &OwnedMessage, source: &Input, class: &str, attempts: u32, message_part: &str, not_before_ms: i64) {
    assert_eq!(m.key(), Some(source.key.as_slice()), "the dead-letter record keeps the original key");
    assert_eq!(m.payload(), Some(source.value.as_slice()), "the dead-letter record keeps the original value bytes");
    assert_eq!(header(m, "orderflow.dlq.error-class"), class);
    assert_eq!(header(m, "orderflow.dlq.attempts"), attempts.to_string());
    assert_eq!(header(m, "orderflow.dlq.source-topic"), INPUT);
    assert_eq!(header(m, "orderflow.dlq.source-partition"), source.partition.to_string());
    assert_eq!(header(m, "orderflow.dlq.source-offset"), source.offset.to_string());
    assert_eq!(header(m, "orderflow.dlq.worker"), WORKER);
    let message = header(m, "orderflow.dlq.error-message");
    assert!(message.contains(message_part), "error message {message:?} names the failure ({message_part:?})");
    let time: i64 = header(m, "orderflow.dlq.time").parse().expect("orderflow.dlq.time is ms since the epoch");
    assert!(time >= not_before_ms, "orderflow.dlq.time {time} is not before the test started ({not_before_ms})");
    assert_eq!(header(m, "trace-id"), format!("trace-{}", source.event_id), "the original headers are kept");
    assert!(headers(m).iter().all(|(k, _)| k != "orderflow.dlq.value-dropped"), "a small value is not dropped");
}

/// The calls of the processor for `event_id`, in order.
fn calls_of<'a>(calls: &'a [Call], event_id: &str) -> Vec<&'a Call> {
    calls.iter().filter(|c| c.event_id == event_id).collect()
}

/// Asserts that consecutive calls were at least the policy's backoff apart (50 ms, 100 ms, …).
fn assert_backoff_between(calls: &[&Call]) {
    for (i, pair) in calls.windows(2).enumerate() {
        let expected = INITIAL_BACKOFF * 2u32.pow(i as u32);
        let gap = pair[1].at.duration_since(pair[0].at);
        assert!(gap >= expected, "retry {} came {gap:?} after the previous attempt; the backoff is {expected:?}", i + 1);
    }
}

/// The input offset sled recorded for `partition` (read after the worker stopped).
fn stored_offset(s: &Setup, partition: i32) -> Option<i64> {
    let store = Store::open(&s.dir.path().join("state").join(WORKER).join("0")).unwrap();
    store.shard(partition).unwrap().offset(INPUT).unwrap()
}

fn retries(metrics: &Metrics) -> u64 {
    metrics.retries.with_label_values(&[WORKER, "processor"]).get()
}

fn consumed(metrics: &Metrics, outcome: &str) -> u64 {
    metrics.consumed.with_label_values(&[WORKER, INPUT, outcome]).get()
}

fn produced(metrics: &Metrics) -> u64 {
    metrics.produced.with_label_values(&[WORKER, OUTPUT]).get()
}

fn dead_lettered(metrics: &Metrics, class: &str) -> u64 {
    metrics.dlq.with_label_values(&[WORKER, class]).get()
}

// ---------------------------------------------------------------------------------------------
// Tests.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transient_failure_is_retried_with_backoff_then_processed() {
    let s = setup();
    let inputs = produce(&s, &[order(1)]).await;
    let w = start(&s, &[("e-1", Script::TransientTimes(2))]).await;
    w.wait_until("the output of e-1 is acknowledged", |m| produced(m) >= 1).await;
    // Quiet time: a replay or a second delivery would show up here.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (metrics, calls) = w.stop().await;

    // Two transient failures, then one success, on the input's coordinates.
    let e1 = calls_of(&calls, "e-1");
    assert_eq!(e1.iter().map(|c| c.ok).collect::<Vec<_>>(), [false, false, true], "calls of e-1: {calls:?}");
    assert!(e1.iter().all(|c| (c.partition, c.offset) == (inputs[0].partition, inputs[0].offset)), "calls of e-1: {calls:?}");
    assert_eq!(retries(&metrics), 2, "orderflow_retries_total{{cause=\"processor\"}}\n{}", counters(&metrics));
    // The backoff was applied: 50 ms before the first retry, 100 ms before the second.
    assert_backoff_between(&e1);
    let elapsed = e1[2].at.duration_since(e1[0].at);
    assert!(elapsed >= Duration::from_millis(150), "processing e-1 took {elapsed:?}, less than the 50 + 100 ms of backoff");

    // Produced exactly once, nothing dead-lettered.
    assert_eq!(output_ids(&s), [forwarded_id("e-1")], "the output topic holds the output once");
    assert_eq!(produced(&metrics), 1);
    assert_eq!(consumed(&metrics, "processed"), 1);
    assert_eq!(consumed(&metrics, "dead_lettered"), 0);
    assert_eq!(dead_lettered(&metrics, "transient") + dead_lettered(&metrics, "invalid"), 0);
    assert!(read_all(&s, DLQ).is_empty(), "nothing on {DLQ}");
    assert_eq!(stored_offset(&s, PARTITION), Some(inputs[0].offset + 1), "the input is committed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_still_transient_after_the_retries_is_dead_lettered_with_its_attempt_count() {
    let s = setup();
    let started_ms = now_ms();
    let inputs = produce(&s, &[order(1), order(2)]).await;
    assert_eq!(inputs[1].offset, inputs[0].offset + 1, "both inputs on one partition, in order");
    let w = start(&s, &[("e-1", Script::AlwaysTransient)]).await;
    w.wait_until("e-1 is dead-lettered and the output of e-2 acknowledged", |m| dead_lettered(m, "transient") >= 1 && produced(m) >= 1)
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (metrics, calls) = w.stop().await;

    // 1 attempt + 3 retries, with the backoff between them, then dead-lettered.
    let e1 = calls_of(&calls, "e-1");
    assert_eq!(e1.len(), 1 + RETRIES as usize, "calls of e-1: {calls:?}");
    assert!(e1.iter().all(|c| !c.ok));
    assert_backoff_between(&e1);
    assert_eq!(retries(&metrics), u64::from(RETRIES), "orderflow_retries_total{{cause=\"processor\"}}\n{}", counters(&metrics));

    let dlq = read_all(&s, DLQ);
    assert_eq!(dlq.len(), 1, "one record on {DLQ}");
    assert_dead_letter(&dlq[0], &inputs[0], "transient", 1 + RETRIES, "inventory service unavailable", started_ms);
    assert_eq!(dead_lettered(&metrics, "transient"), 1);
    assert_eq!(consumed(&metrics, "dead_lettered"), 1);

    // The partition kept flowing: e-2 (next offset, same partition) was processed after e-1's
    // last attempt, exactly once.
    let e2 = calls_of(&calls, "e-2");
    assert_eq!(e2.len(), 1, "e-2 is processed once: {calls:?}");
    assert!(e2[0].ok && (e2[0].partition, e2[0].offset) == (inputs[1].partition, inputs[1].offset));
    assert!(e2[0].at >= e1.last().unwrap().at, "e-2 was processed after e-1 gave up");
    assert_eq!(output_ids(&s), [forwarded_id("e-2")], "only e-2 has an output, once");
    assert_eq!(produced(&metrics), 1);
    assert_eq!(consumed(&metrics, "processed"), 1);
    assert_eq!(stored_offset(&s, PARTITION), Some(inputs[1].offset + 1), "both inputs are committed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_failure_is_not_retried() {
    let s = setup();
    let started_ms = now_ms();
    let inputs = produce(&s, &[order(1), order(2)]).await;
    let w = start(&s, &[("e-1", Script::Invalid)]).await;
    w.wait_until("e-1 is dead-lettered and the output of e-2 acknowledged", |m| dead_lettered(m, "invalid") >= 1 && produced(m) >= 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (metrics, calls) = w.stop().await;

    assert_eq!(calls_of(&calls, "e-1").len(), 1, "an invalid event is not retried: {calls:?}");
    assert_eq!(retries(&metrics), 0, "orderflow_retries_total{{cause=\"processor\"}}\n{}", counters(&metrics));

    let dlq = read_all(&s, DLQ);
    assert_eq!(dlq.len(), 1, "one record on {DLQ}");
    assert_dead_letter(&dlq[0], &inputs[0], "invalid", 1, "quantity must be positive", started_ms);
    assert_eq!(dead_lettered(&metrics, "invalid"), 1);
    assert_eq!(dead_lettered(&metrics, "transient"), 0);

    assert_eq!(calls_of(&calls, "e-2").len(), 1, "e-2 is processed once: {calls:?}");
    assert_eq!(output_ids(&s), [forwarded_id("e-2")]);
    assert_eq!(stored_offset(&s, PARTITION), Some(inputs[1].offset + 1));
}
