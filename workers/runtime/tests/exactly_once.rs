//! The `exactly_once` path of the worker loop, end to end against librdkafka's MockCluster:
//! transactional produce of outputs and changelog, offsets sent to the transaction, an abortable
//! commit error rewinding and reprocessing the unit, and fencing stopping the instance.
//!
//! MockCluster caveats (see `txn.rs`): it stores no transactional offset commits, delivers
//! aborted records to `read_committed` consumers and does not fence by itself. So these tests
//! check the worker's call sequence and reactions, and count outputs by distinct `eventId`.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use orderflow_api::events::{OrderCreated, OrderItem};
use orderflow_api::Event;
use orderflow_runtime::codec::Codec;
use orderflow_runtime::metrics::Metrics;
use orderflow_runtime::store::Store;
use orderflow_runtime::topology::{self, KindInfo};
use orderflow_runtime::worker::{Worker, WorkerError, WorkerSetup};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rdkafka::util::Timeout;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio::sync::watch;

const KINDS: &[KindInfo] =
    &[KindInfo { name: "deduplicator", ports: deduplicator::PORTS, settings: KindInfo::no_settings, reads_external: true, source: false }];

fn avro_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../avro")
}

struct Setup {
    mock: MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    dir: tempfile::TempDir,
    codec: Arc<Codec>,
}

fn setup() -> Setup {
    let mock = MockCluster::new(1).expect("mock cluster");
    for t in [
        "order.created",
        "stock.commands",
        "order.created.repartition",
        "order.cancelled.repartition",
        "order.created.dlq",
        "orderflow-deduplicator-changelog",
    ] {
        mock.create_topic(t, 2, 1).expect("mock topic");
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("topology.toml"),
        format!(
            r#"
avro_dir = "{avro}"
[broker]
bootstrap = "{bootstrap}"
[defaults]
guarantee = "exactly_once"
commit_interval = "50ms"
state_dir = "{state}"
static_membership = false
[topics."order.created"]
partitions = 2
key = "orderId"
schema = "OrderCreated"
[topics."stock.commands"]
partitions = 2
key = "hqId:storeId"
schema = "OrderCreated"
[topics."order.created.repartition"]
partitions = 2
key = "orderId"
schema = "OrderCreated"
[topics."order.cancelled.repartition"]
partitions = 2
key = "orderId"
schema = "OrderCancelled"
[workers.deduplicator]
kind = "deduplicator"
inputs = ["order.created"]
outputs = {{ out = "stock.commands", created = "order.created.repartition", cancelled = "order.cancelled.repartition" }}
"#,
            avro = avro_dir().display(),
            bootstrap = mock.bootstrap_servers(),
            state = dir.path().join("state").display()
        ),
    )
    .unwrap();
    let codec = Arc::new(Codec::load(&avro_dir(), None).unwrap());
    Setup { mock, dir, codec }
}

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

async fn produce(s: &Setup, events: &[Event]) {
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", s.mock.bootstrap_servers()).create().unwrap();
    for e in events {
        let bytes = s.codec.encode("order.created", e).await.unwrap();
        producer.send(FutureRecord::to("order.created").key(e.order_id().unwrap()).payload(&bytes), Timeout::Never).await.unwrap();
    }
}

async fn start(s: &Setup) -> (watch::Sender<bool>, tokio::task::JoinHandle<Result<(), WorkerError>>, Metrics) {
    let mut loaded = topology::load_checked(&s.dir.path().join("topology.toml"), KINDS).expect("topology");
    // The environment may point at another broker (scripts/test.sh exports ORDERFLOW_BOOTSTRAP
    // and ORDERFLOW_STATE_DIR); this test runs against its own mock cluster and state dir.
    loaded.topology.broker.bootstrap = s.mock.bootstrap_servers();
    loaded.topology.defaults.state_dir = s.dir.path().join("state");
    let loaded = Arc::new(loaded);
    let metrics = Metrics::new();
    let worker = Worker::new(WorkerSetup {
        name: "deduplicator".into(),
        topology: loaded,
        processor: Box::new(deduplicator::Deduplicator::new()),
        ports: deduplicator::PORTS,
        codec: s.codec.clone(),
        metrics: metrics.clone(),
        instance: "0".into(),
        ready: Arc::new(AtomicBool::new(false)),
    })
    .await
    .expect("exactly_once worker starts on a broker with transactions");
    let (tx, rx) = watch::channel(false);
    (tx, tokio::spawn(worker.run(rx)), metrics)
}

/// Distinct eventIds readable from `topic` with `read_committed`.
fn distinct_outputs(s: &Setup, topic: &str) -> BTreeSet<String> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", s.mock.bootstrap_servers())
        .set("group.id", "reader")
        .set("isolation.level", "read_committed")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..2 {
        tpl.add_partition_offset(topic, p, Offset::Beginning).unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let codec = Codec::load(&avro_dir(), None).unwrap();
    let mut ids = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            ids.insert(codec.decode_local(m.payload().unwrap()).unwrap().event_id().to_string());
        }
    }
    ids
}

async fn wait_for(metrics: &Metrics, outputs: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while metrics.produced.with_label_values(&["deduplicator", "stock.commands"]).get() < outputs {
        assert!(
            Instant::now() < deadline,
            "worker produced {} of {outputs}",
            metrics.produced.with_label_values(&["deduplicator", "stock.commands"]).get()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn stored_offsets(s: &Setup) -> i64 {
    let store = Store::open(&s.dir.path().join("state/deduplicator/0")).unwrap();
    (0..2).map(|p| store.shard(p).unwrap().offset("order.created").unwrap().unwrap_or(0)).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactional_units_commit_outputs_changelog_and_offsets_and_drop_duplicates() {
    let s = setup();
    let mut events: Vec<Event> = (0..5).map(order).collect();
    events.push(order(2)); // a repeated eventId
    produce(&s, &events).await;
    let (stop, handle, metrics) = start(&s).await;
    wait_for(&metrics, 5).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.send(true).unwrap();
    handle.await.unwrap().expect("clean stop");
    assert_eq!(distinct_outputs(&s, "stock.commands").len(), 5);
    assert_eq!(metrics.consumed.with_label_values(&["deduplicator", "order.created", "duplicate"]).get(), 1);
    assert!(!distinct_changelog_markers(&s).is_empty(), "the changelog holds commit markers");
    assert_eq!(stored_offsets(&s), 6, "sled holds the next offsets of both partitions");
}

fn distinct_changelog_markers(s: &Setup) -> Vec<i64> {
    let consumer: BaseConsumer =
        ClientConfig::new().set("bootstrap.servers", s.mock.bootstrap_servers()).set("group.id", "cl").create().unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..2 {
        tpl.add_partition_offset("orderflow-deduplicator-changelog", p, Offset::Beginning).unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut markers = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            if m.key().and_then(|k| k.first()) == Some(&orderflow_runtime::changelog::TAG_MARKER) {
                markers.push(m.offset());
            }
        }
    }
    markers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abortable_commit_error_rewinds_and_reprocesses_without_double_effects() {
    let s = setup();
    // The first EndTxn fails with an abortable error; the worker must abort, rewind and redo.
    s.mock.request_errors(RDKafkaApiKey::EndTxn, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_PRODUCER_ID_MAPPING]);
    produce(&s, &(0..5).map(order).collect::<Vec<_>>()).await;
    let (stop, handle, metrics) = start(&s).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !redone(&metrics) {
        assert!(
            Instant::now() < deadline,
            "the unit was not redone after the abort:\n{}",
            metrics
                .render()
                .lines()
                .filter(|l| !l.starts_with('#') && (l.contains("commit_seconds_count") || l.contains("consumed") || l.contains("produced")))
                .collect::<Vec<_>>()
                .join("\n")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.send(true).unwrap();
    handle.await.unwrap().expect("clean stop after an abortable error");
    assert!(metrics.commit.with_label_values(&["deduplicator", "abortable"]).get_sample_count() >= 1, "the abort was taken");
    // Every input processed exactly once in the committed state: no event was remembered twice
    // and the next offsets are exact.
    assert_eq!(stored_offsets(&s), 5);
    assert_eq!(
        metrics.consumed.with_label_values(&["deduplicator", "order.created", "duplicate"]).get(),
        0,
        "the redo started from clean state"
    );
    assert_eq!(distinct_outputs(&s, "stock.commands").len(), 5);
}

/// Units committed after at least one abort: every input's output committed (outputs are counted
/// only once their unit committed) and more inputs processed than there are (the aborted unit's
/// were processed again). A unit takes the records at hand, so the aborted one may hold 1 to 5.
fn redone(metrics: &Metrics) -> bool {
    metrics.commit.with_label_values(&["deduplicator", "abortable"]).get_sample_count() >= 1
        && metrics.commit.with_label_values(&["deduplicator", "ok"]).get_sample_count() >= 1
        && metrics.produced.with_label_values(&["deduplicator", "stock.commands"]).get() >= 5
        && metrics.consumed.with_label_values(&["deduplicator", "order.created", "processed"]).get() >= 6
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_instance_stops_at_once_with_an_error() {
    let s = setup();
    s.mock.request_errors(RDKafkaApiKey::EndTxn, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_PRODUCER_FENCED]);
    produce(&s, &(0..3).map(order).collect::<Vec<_>>()).await;
    let (_stop, handle, _metrics) = start(&s).await;
    let result = tokio::time::timeout(Duration::from_secs(30), handle).await.expect("the fenced worker stops by itself").unwrap();
    match result {
        Err(WorkerError::Txn(e)) => assert_eq!(e.class, orderflow_runtime::txn::TxnErrorClass::Fatal, "{e}"),
        other => panic!("expected a fatal transactional error, got {other:?}"),
    }
    assert_eq!(stored_offsets(&s), 0, "nothing of the fenced unit reached the local store");
}
