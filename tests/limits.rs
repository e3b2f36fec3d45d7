//! Record size limits on a real broker (issue 20, "oversized values refused at the door").
//!
//! `replay_refuses_a_value_above_the_targets_limit_and_produces_nothing`: scratch topics only, no
//! workers. `limits.small` is created with `max.message.bytes=4096`; `limits.src` (Kafka's
//! default limit) holds a 100-byte value, a 10,000-byte one and another 100-byte one. `orderflow
//! replay limits.src --into limits.small` must fail before sending anything: non-zero exit, its
//! stderr naming the target topic, its limit and the oversized record, and `limits.small` still
//! empty (high watermark 0, nothing to read). As the positive control, the replay of the first
//! record alone then succeeds and that one record is read back from `limits.small` (so the
//! reading that found nothing would have found a record).

mod common;

use std::time::Duration;

use common::{cli, stderr, stdout};
use orderflow_runtime::kafka::{client_config, Side};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::FutureRecord;
use rdkafka::util::Timeout;

/// `max.message.bytes` of the small target topic.
const SMALL_LIMIT: usize = 4096;
/// Size of the value that does not fit it.
const BIG_VALUE: usize = 10_000;

type Kafka = common::Kafka;

impl Kafka {
    /// Creates `name` with one partition and the topic configs `configs`.
    fn create_topic_with(&self, name: &str, configs: &[(&str, &str)]) {
        let admin: AdminClient<DefaultClientContext> = client_config(&self.broker, Side::Admin).create().expect("admin");
        let mut topic = NewTopic::new(name, 1, TopicReplication::Fixed(1));
        for (k, v) in configs {
            topic = topic.set(k, v);
        }
        let r = self.rt.block_on(admin.create_topics([&topic], &AdminOptions::new())).expect("create topics");
        for t in r {
            t.unwrap_or_else(|(t, e)| panic!("creating {t}: {e}"));
        }
    }

    /// Produces `value` to partition 0 of `topic` with `key`; returns its offset.
    fn produce_raw(&self, topic: &str, key: &str, value: &[u8]) -> i64 {
        let record = FutureRecord::to(topic).partition(0).key(key).payload(value);
        let d = self
            .rt
            .block_on(self.producer.send(record, Timeout::After(Duration::from_secs(30))))
            .unwrap_or_else(|(e, _)| panic!("producing to {topic}: {e}"));
        d.offset
    }

    /// (low, high) watermarks of partition 0 of `topic`.
    fn watermarks(&self, topic: &str) -> (i64, i64) {
        let mut config = client_config(&self.broker, Side::Consumer);
        config.set("group.id", format!("orderflow-limits-test-{}", std::process::id()));
        let c: BaseConsumer = config.create().expect("consumer");
        c.fetch_watermarks(topic, 0, Duration::from_secs(10)).expect("watermarks")
    }

    /// Values of every record of `topic` (one partition), read to its end.
    fn values(&self, topic: &str) -> Vec<Vec<u8>> {
        common::read_topic(&self.broker, topic, 1).iter().map(|m| m.payload().unwrap_or_default().to_vec()).collect()
    }
}

#[test]
fn replay_refuses_a_value_above_the_targets_limit_and_produces_nothing() {
    let broker = common::Broker::start();
    let b = broker.bootstrap.as_str();
    let k = Kafka::new(b);
    k.create_topic_with("limits.src", &[]);
    k.create_topic_with("limits.small", &[("max.message.bytes", &SMALL_LIMIT.to_string())]);
    let small = vec![b's'; 100];
    let big = vec![b'b'; BIG_VALUE];
    assert_eq!(k.produce_raw("limits.src", "K-0", &small), 0);
    assert_eq!(k.produce_raw("limits.src", "K-1", &big), 1);
    assert_eq!(k.produce_raw("limits.src", "K-2", &small), 2);
    assert_eq!(k.values("limits.src").len(), 3, "the source holds the three records");

    // The whole range: refused, nothing sent.
    let o = cli(b, "replay", &["limits.src", "--from-offset", "0", "--into", "limits.small"]);
    let err = stderr(&o);
    println!("$ orderflow replay limits.src --from-offset 0 --into limits.small\n{}\n{err}", stdout(&o));
    assert!(!o.status.success(), "the replay must fail:\n{}\n{err}", stdout(&o));
    for expected in [
        "refusing to produce: 1 of 3 record(s) exceed their topic's size limit",
        "limits.src/0/1: value of 10000 bytes for limits.small exceeds its limit of",
        "topic max.message.bytes 4096",
        "producer message.max.bytes",
        "nothing was produced",
    ] {
        assert!(err.contains(expected), "expected `{expected}` in stderr:\n{err}");
    }
    assert_eq!(k.watermarks("limits.small"), (0, 0), "nothing was produced to limits.small");
    assert!(k.values("limits.small").is_empty(), "limits.small holds no record");

    // Control: the first record alone fits, is sent, and is read back where nothing was before.
    let o = cli(b, "replay", &["limits.src", "--from-offset", "0", "--to-offset", "1", "--into", "limits.small"]);
    assert!(o.status.success(), "replaying the small record must succeed:\n{}\n{}", stdout(&o), stderr(&o));
    assert_eq!(k.watermarks("limits.small"), (0, 1));
    assert_eq!(k.values("limits.small"), vec![small], "exactly the small record arrived");
}

/// `max.message.bytes` of `stock.commands` in the worker test: an order of [`WIDE_ORDER_ITEMS`]
/// lines does not fit it (the deduplicator forwards the order there), while the input topic keeps
/// Kafka's default.
const OUTPUT_LIMIT: usize = 600;
const WIDE_ORDER_ITEMS: usize = 60;

/// `a_worker_whose_output_exceeds_its_topic_limit_stops_with_a_clear_error`: `stock.commands` is
/// created (before `orderflow topics`, which leaves it alone) with `max.message.bytes` =
/// [`OUTPUT_LIMIT`]; the deduplicator runs as a real process; a small order passes, then an order
/// of [`WIDE_ORDER_ITEMS`] lines, whose forwarded copy cannot fit. The worker must stop (exit
/// non-zero, no endless retry) with an error naming the output topic, its limit and the input
/// record (stock.commands is keyed by store); by the test's own reading `stock.commands` holds the small order only.
#[test]
fn a_worker_whose_output_exceeds_its_topic_limit_stops_with_a_clear_error() {
    use orderflow_api::events::{OrderCreated, OrderItem};
    use orderflow_api::Event;

    let broker = common::Broker::start();
    let b = broker.bootstrap.as_str();
    let k = Kafka::new(b);
    let admin: AdminClient<DefaultClientContext> = client_config(&k.broker, Side::Admin).create().expect("admin");
    let limit = OUTPUT_LIMIT.to_string();
    let topic = NewTopic::new("stock.commands", 6, TopicReplication::Fixed(1)).set("max.message.bytes", &limit);
    for r in k.rt.block_on(admin.create_topics([&topic], &AdminOptions::new())).expect("create topics") {
        r.unwrap_or_else(|(t, e)| panic!("creating {t}: {e}"));
    }
    common::create_topics(&common::repo_root().join("topology.toml"), b);

    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("deduplicator.log");
    let port = common::free_port();
    let child = common::run_command(&common::repo_root().join("topology.toml"), b, "0", port, &dir.path().join("state"), &log)
        .args(["--worker", "deduplicator"])
        .spawn()
        .expect("spawn orderflow run");
    let mut worker = common::Guarded::new(child, Duration::from_millis(50));

    let send = |order_id: &str, lines: usize| {
        let o = OrderCreated {
            event_id: format!("E-{order_id}"),
            occurred_at: common::now_ms(),
            order_id: order_id.into(),
            customer_id: "C-1".into(),
            hq_id: "HQ-LIM".into(),
            store_id: "ST-LIM".into(),
            items: (0..lines).map(|i| OrderItem { product_id: format!("P-{i:05}"), quantity: 1, unit_price: 100 }).collect(),
        };
        let bytes = k.codec.encode_local(&Event::OrderCreated(o)).expect("encodes");
        k.rt.block_on(
            k.producer.send(FutureRecord::to("order.created").key(order_id).payload(&bytes), Timeout::After(Duration::from_secs(30))),
        )
        .unwrap_or_else(|(e, _)| panic!("producing {order_id}: {e}"));
        bytes.len()
    };
    let forwarded = || -> Vec<String> {
        common::read_topic(&k.broker, "stock.commands", 6)
            .iter()
            .map(|m| k.codec.decode_local(m.payload().expect("a value")).expect("decodes").event_id().to_string())
            .collect()
    };
    send("O-SMALL", 1);
    common::wait_for("the small order on stock.commands", &log, &mut worker, Duration::from_secs(90), Duration::from_millis(200), || {
        forwarded().contains(&"E-O-SMALL".to_string()).then_some(())
    });
    let wide = send("O-WIDE", WIDE_ORDER_ITEMS);
    assert!(wide > OUTPUT_LIMIT, "the wide order ({wide} bytes) must not fit {OUTPUT_LIMIT}");
    let status = worker
        .wait_for(Duration::from_secs(60))
        .unwrap_or_else(|| panic!("the worker did not stop on the oversized output; log:\n{}", common::tail(&log, 20)));
    assert!(!status.success(), "the worker exited 0");
    let errors: Vec<String> = common::log_lines(&log)
        .iter()
        .filter(|l| common::is_error(l))
        .map(|l| format!("{} {}", common::message(l), common::field(l, "error").and_then(|v| v.as_str()).unwrap_or_default()))
        .collect();
    let text = errors.join("\n");
    println!("worker errors:\n{text}");
    for expected in ["stock.commands", &format!("topic max.message.bytes {OUTPUT_LIMIT}"), "key HQ-LIM:ST-LIM", "comes from order.created["]
    {
        assert!(text.contains(expected), "expected `{expected}` in the worker's errors:\n{text}\nlog:\n{}", common::tail(&log, 20));
    }
    assert_eq!(forwarded(), vec!["E-O-SMALL".to_string()], "only the small order reached stock.commands");
}
