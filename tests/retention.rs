//! Bounded state (issue 13) on a real broker, with the deduplicator as a real process and a
//! `state_retention` of 20 s. The deduplicator's state is only its remembered `eventId`s, and
//! what it does with an `order.created` is visible on `stock.commands`: a remembered id is
//! dropped, a forgotten one is forwarded again. The test reads the topics and the changelog
//! itself:
//!
//! 1. `E1` is forwarded once; sent again within the retention it is dropped (a later `E2`
//!    arriving is the positive marker);
//! 2. after the retention the changelog holds the tombstone of a commit marker (its ids
//!    forgotten) and never a record per remembered id;
//! 3. `E4` is sent, the worker is stopped, its state directory deleted, and it starts again,
//!    rebuilding its state from the changelog: `E4` (within the retention) is still a
//!    duplicate, `E1` (forgotten) is forwarded again: the rebuild neither forgot early nor
//!    brought a forgotten id back.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{free_port, http_get, Guarded};
use orderflow_api::events::{OrderCreated, OrderItem};
use orderflow_api::Event;
use rdkafka::message::Message;
use rdkafka::producer::FutureRecord;
use rdkafka::util::Timeout;

const RETENTION_S: u64 = 20;

/// `topology.toml` with an absolute `avro_dir` and `state_retention` of [`RETENTION_S`].
fn retention_topology(dir: &Path) -> PathBuf {
    common::topology_copy(dir, "topology.toml", |original| {
        let line =
            original.lines().find(|l| l.starts_with("state_retention = ")).expect("topology.toml sets state_retention in [defaults]");
        original.replace(line, &format!("state_retention = \"{RETENTION_S}s\"   # retention test"))
    })
}

fn order(event_id: &str) -> OrderCreated {
    OrderCreated {
        event_id: event_id.into(),
        occurred_at: common::now_ms(),
        order_id: format!("O-{event_id}"),
        customer_id: "C-1".into(),
        hq_id: "HQ-RET".into(),
        store_id: "ST-RET".into(),
        items: vec![OrderItem { product_id: "P-1".into(), quantity: 1, unit_price: 100 }],
    }
}

fn send(k: &common::Kafka, event_id: &str) {
    let o = order(event_id);
    let bytes = k.codec.encode_local(&Event::OrderCreated(o.clone())).expect("event encodes");
    k.rt.block_on(
        k.producer.send(FutureRecord::to("order.created").key(&o.order_id).payload(&bytes), Timeout::After(Duration::from_secs(30))),
    )
    .unwrap_or_else(|(e, _)| panic!("producing {event_id}: {e}"));
}

/// How many times each `eventId` was forwarded to `stock.commands`.
fn forwarded(k: &common::Kafka) -> std::collections::BTreeMap<String, usize> {
    let mut n = std::collections::BTreeMap::new();
    for m in common::read_topic(&k.broker, "stock.commands", 6) {
        let e = k.codec.decode_local(m.payload().expect("a value")).expect("stock.commands decodes");
        *n.entry(e.event_id().to_string()).or_default() += 1;
    }
    n
}

#[test]
fn a_remembered_event_id_is_forgotten_after_the_retention_and_stays_forgotten_across_a_rebuild() {
    let broker = common::Broker::start();
    let dir = broker.dir().to_path_buf();
    let topology = retention_topology(&dir);
    common::create_topics(&topology, &broker.bootstrap);
    let k = common::Kafka::new(&broker.bootstrap);
    let port = free_port();
    let state = dir.join("state");
    let spawn = |n: usize| {
        let log = dir.join(format!("deduplicator-{n}.log"));
        let child = common::run_command(&topology, &broker.bootstrap, "ret", port, &state, &log)
            .args(["--worker", "deduplicator"])
            .spawn()
            .expect("spawn orderflow run");
        let mut g = Guarded::new(child, Duration::from_millis(50));
        common::wait_for("a ready deduplicator", &log, &mut g, Duration::from_secs(90), Duration::from_millis(100), || {
            matches!(http_get(port, "/readyz"), Some((200, _))).then_some(())
        });
        (g, log)
    };
    let (mut worker, log) = spawn(0);
    let arrived = |worker: &mut Guarded, log: &Path, id: &str| {
        common::wait_for(&format!("{id} on stock.commands"), log, worker, Duration::from_secs(60), Duration::from_millis(200), || {
            let n = forwarded(&k);
            n.contains_key(id).then_some(n)
        })
    };

    // 1. Within the retention a repeated eventId is dropped.
    let first_sent = Instant::now();
    send(&k, "E1");
    arrived(&mut worker, &log, "E1");
    send(&k, "E1");
    send(&k, "E2");
    let n = arrived(&mut worker, &log, "E2");
    assert_eq!(n.get("E1"), Some(&1), "E1 repeated within the retention must be dropped: {n:?}");

    // 2. After the retention: a marker tombstone in the changelog, no record per id.
    let changelog = orderflow_runtime::changelog::topic("deduplicator");
    let tombstones = common::wait_for(
        "a commit marker's tombstone in the changelog",
        &log,
        &mut worker,
        Duration::from_secs(RETENTION_S + 60),
        Duration::from_millis(500),
        || {
            let records = common::read_topic(&k.broker, &changelog, 6);
            let n = records.iter().filter(|m| m.payload().is_none() && m.key().is_some_and(|k| k.len() > 1 && k[0] == b'm')).count();
            (n > 0).then_some(records)
        },
    );
    assert!(first_sent.elapsed() >= Duration::from_secs(RETENTION_S), "forgotten before the retention passed");
    let per_id: Vec<_> = tombstones.iter().filter(|m| m.key().is_some_and(|k| k.starts_with(b"d\x00seen/"))).collect();
    assert!(per_id.is_empty(), "remembered ids are never records of their own: {} found", per_id.len());

    // 3. E4 within the retention, then a rebuild from the changelog.
    send(&k, "E4");
    arrived(&mut worker, &log, "E4");
    let (stopped, _) = worker.terminate(Duration::from_secs(30));
    assert!(stopped.is_some_and(|s| s.success()), "the deduplicator did not stop cleanly: {stopped:?}");
    fs::remove_dir_all(&state).expect("delete the state directory");
    let (mut worker, log) = spawn(1);
    let rebuilt = common::log_lines(&log)
        .iter()
        .filter(|l| common::message(l) == "state restored" && common::field(l, "source").and_then(|v| v.as_str()) == Some("changelog"))
        .count();
    assert!(rebuilt > 0, "the restart should rebuild from the changelog:\n{}", common::tail(&log, 20));
    send(&k, "E4");
    send(&k, "E1");
    send(&k, "E3");
    let n = arrived(&mut worker, &log, "E3");
    assert_eq!(n.get("E4"), Some(&1), "E4, within the retention, must still be remembered after the rebuild: {n:?}");
    assert_eq!(n.get("E1"), Some(&2), "E1, forgotten, must be forwarded again and not brought back by the rebuild: {n:?}");
    let (stopped, _) = worker.terminate(Duration::from_secs(30));
    assert!(stopped.is_some_and(|s| s.success()), "the deduplicator did not stop cleanly: {stopped:?}");
}
