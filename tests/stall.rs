//! A stalled partition is noticed and can be unblocked on purpose (issue 20), on the real broker
//! with the deduplicator as two real processes (`a` and `b`, three partitions each) and a
//! `stall_after` of [`STALL_AFTER_S`] s.
//!
//! Both processes are started with the test build's fail point `orderflow::process` set to block
//! forever on the events of order `O-POISON`, as a processor bug would. The test then:
//! 1. sends good orders and waits until its own reading of `stock.commands` has all of them;
//! 2. sends `O-POISON`, then more good orders to every partition: the instance owning the poison's
//!    partition stops, and within the configured time its `/metrics` say
//!    `orderflow_partition_status{status="stalled"}` for that partition, its log has the
//!    "input partition stalled" line naming the record the processor is stuck on, and the alert
//!    rule `OrderflowPartitionStalled` of `deploy/prometheus/alerts.yaml` fires on the scraped
//!    series (its expression, under promtool); meanwhile the other instance's partitions keep flowing (their new orders
//!    reach `stock.commands`) and readiness is unchanged;
//! 3. `orderflow skip` is refused while the instances run, then, with both stopped, moves the
//!    group past the poison's offset: its audit record (class `skipped`, operator, reason, range,
//!    the record itself) is on `order.created.dlq` by the test's own reading;
//! 4. both instances start again without the fail point: every good order reaches
//!    `stock.commands` exactly once and the poison never does; `orderflow dlq redrive` of the
//!    skipped record then processes it once.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{free_port, http_get, Guarded};
use orderflow_api::events::{OrderCreated, OrderItem};
use orderflow_api::Event;
use orderflow_runtime::partitioner::partition_for;
use rdkafka::message::Message;
use rdkafka::producer::FutureRecord;
use rdkafka::util::Timeout;

/// The test's `stall_after` (topology `[defaults]`).
const STALL_AFTER_S: u64 = 10;
const POISON: &str = "O-POISON";
const PARTITIONS: i32 = 6;

/// `topology.toml` with `stall_after` of [`STALL_AFTER_S`], a 6 s session timeout (a stopped
/// static member leaves the group soon) and a 120 s poll interval (the blocked instance stays in
/// the group through the test, so its partitions are not handed to the other one).
fn stall_topology(dir: &Path) -> PathBuf {
    common::topology_copy(dir, "topology.toml", |original| {
        let mut out = Vec::new();
        for line in original.lines() {
            if line.starts_with("\"session.timeout.ms\"") {
                out.push("\"session.timeout.ms\" = \"6000\"   # stall test".to_string());
            } else if line.starts_with("\"max.poll.interval.ms\"") {
                out.push("\"max.poll.interval.ms\" = \"120000\"   # stall test".to_string());
            } else if line.starts_with("stall_after = ") {
                out.push(format!("stall_after = \"{STALL_AFTER_S}s\"   # stall test"));
            } else {
                out.push(line.to_string());
            }
        }
        assert!(out.iter().any(|l| l.starts_with("stall_after = ")), "topology.toml sets stall_after in [defaults]");
        out.join("\n")
    })
}

fn order(order_id: &str) -> OrderCreated {
    OrderCreated {
        event_id: format!("E-{order_id}"),
        occurred_at: common::now_ms(),
        order_id: order_id.into(),
        customer_id: "C-1".into(),
        hq_id: "HQ-STALL".into(),
        store_id: "ST-STALL".into(),
        items: vec![OrderItem { product_id: "P-1".into(), quantity: 1, unit_price: 100 }],
    }
}

/// Sends `order_id`'s OrderCreated keyed by it; returns its partition and offset.
fn send(k: &common::Kafka, order_id: &str) -> (i32, i64) {
    let o = order(order_id);
    let bytes = k.codec.encode_local(&Event::OrderCreated(o.clone())).expect("event encodes");
    k.rt.block_on(
        k.producer.send(FutureRecord::to("order.created").key(&o.order_id).payload(&bytes), Timeout::After(Duration::from_secs(30))),
    )
    .map(|d| (d.partition, d.offset))
    .unwrap_or_else(|(e, _)| panic!("producing {order_id}: {e}"))
}

/// Order ids `prefix-0..` with `n` on each partition in `partitions`.
fn orders_on(prefix: &str, partitions: &[i32], n: usize) -> Vec<String> {
    let mut got: BTreeMap<i32, Vec<String>> = BTreeMap::new();
    for i in 0.. {
        if partitions.iter().all(|p| got.get(p).is_some_and(|v| v.len() >= n)) {
            break;
        }
        let id = format!("{prefix}-{i}");
        let p = partition_for(id.as_bytes(), PARTITIONS);
        if partitions.contains(&p) && got.get(&p).is_none_or(|v| v.len() < n) {
            got.entry(p).or_default().push(id);
        }
    }
    got.into_values().flatten().collect()
}

/// How many times each order's event reached `stock.commands` (the test's own reading).
fn forwarded(k: &common::Kafka) -> BTreeMap<String, usize> {
    let mut n = BTreeMap::new();
    for m in common::read_topic(&k.broker, "stock.commands", PARTITIONS) {
        let e = k.codec.decode_local(m.payload().expect("a value")).expect("stock.commands decodes");
        *n.entry(e.event_id().trim_start_matches("E-").to_string()).or_default() += 1;
    }
    n
}

struct Instance {
    name: &'static str,
    port: u16,
    log: PathBuf,
    process: Guarded,
}

fn spawn(topology: &Path, bootstrap: &str, dir: &Path, name: &'static str, failpoint: bool) -> Instance {
    let port = free_port();
    let log = dir.join(format!("{name}-{}.log", common::now_ms()));
    let mut cmd = common::run_command(topology, bootstrap, name, port, &dir.join("state"), &log);
    cmd.args(["--worker", "deduplicator"]);
    if failpoint {
        cmd.env("FAILPOINTS", format!("orderflow::process=return({POISON})"));
    } else {
        cmd.env_remove("FAILPOINTS");
    }
    let process = Guarded::new(cmd.spawn().expect("spawn orderflow run"), Duration::from_millis(50));
    Instance { name, port, log, process }
}

/// The input partitions the instance with metrics on `port` reports a status for (its assignment).
fn owned(port: u16) -> Vec<i32> {
    let Some((200, body)) = http_get(port, "/metrics") else { return Vec::new() };
    let mut ps: Vec<i32> = body
        .lines()
        .filter(|l| l.starts_with("orderflow_partition_status{") && l.contains("topic=\"order.created\"") && l.contains("status=\"ok\""))
        .filter_map(|l| l.split("partition=\"").nth(1).and_then(|r| r.split('"').next()).and_then(|p| p.parse().ok()))
        .collect();
    ps.sort_unstable();
    ps.dedup();
    ps
}

fn wait_until<T>(what: &str, within: Duration, instances: &mut [&mut Instance], mut check: impl FnMut() -> Option<T>) -> T {
    let until = Instant::now() + within;
    loop {
        if let Some(v) = check() {
            return v;
        }
        for i in instances.iter_mut() {
            if let Some(s) = i.process.try_wait() {
                panic!("instance {} exited ({s}) while waiting for {what}; log:\n{}", i.name, common::tail(&i.log, 30));
            }
        }
        let logs: Vec<String> = instances.iter().map(|i| format!("{}:\n{}", i.name, common::tail(&i.log, 15))).collect();
        assert!(Instant::now() < until, "no {what} within {}s; logs:\n{}", within.as_secs(), logs.join("\n"));
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// promtool: on PATH, or where `scripts/validate-deploy.sh` unpacks it.
fn promtool() -> PathBuf {
    if let Ok(out) = Command::new("sh").args(["-c", "command -v promtool"]).output() {
        let p = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !p.is_empty() {
            return PathBuf::from(p);
        }
    }
    let tools = std::env::var("ORDERFLOW_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").expect("HOME")).join(".cache/orderflow/tools"));
    std::fs::read_dir(&tools)
        .ok()
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("promtool"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("promtool not found on PATH or under {} (scripts/validate-deploy.sh installs it)", tools.display()))
}

/// The `expr` of alert `name` in `deploy/prometheus/alerts.yaml`.
fn alert_expr(name: &str) -> String {
    let rules = std::fs::read_to_string(common::repo_root().join("deploy/prometheus/alerts.yaml")).expect("read alerts.yaml");
    let mut lines = rules.lines().skip_while(|l| l.trim() != format!("- alert: {name}"));
    lines.find_map(|l| l.trim().strip_prefix("expr: ").map(str::to_string)).unwrap_or_else(|| panic!("alert {name} has no expr"))
}

/// Evaluates the expression of alert `OrderflowPartitionStalled` under promtool over the scraped
/// `series` (label sets of samples equal to 1, `pod` added) and checks it returns 1 for the
/// poison's partition (the rule's `for` and annotations are checked by
/// deploy/prometheus/alerts.test.yaml).
fn alert_fires(dir: &Path, series: &[String], pod: &str, partition: i32) -> Result<(), String> {
    let input: Vec<String> = series
        .iter()
        .map(|s| format!("      - series: '{}'\n        values: '1x5'", s.replacen('{', &format!("{{pod=\"{pod}\","), 1)))
        .collect();
    let test = format!(
        "tests:\n  - interval: 1m\n    input_series:\n{}\n    promql_expr_test:\n      - expr: '{}'\n        eval_time: 2m\n        exp_samples:\n          - labels: '{{partition=\"{partition}\",pod=\"{pod}\",topic=\"order.created\",worker=\"deduplicator\"}}'\n            value: 1\n",
        input.join("\n"),
        alert_expr("OrderflowPartitionStalled")
    );
    let path = dir.join("stall-alert.test.yaml");
    std::fs::write(&path, test).expect("write the promtool test");
    let out = Command::new(promtool()).arg("test").arg("rules").arg(&path).output().expect("run promtool");
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
    }
}

#[test]
fn a_partition_blocked_on_one_record_is_reported_stalled_and_skip_unblocks_it_with_an_audit_record() {
    let broker = common::Broker::start();
    let run = common::RunDir::create("orderflow-stall-", "ORDERFLOW_KEEP_STALL", "stall test logs and state");
    let dir = run.path().to_path_buf();
    let topology = stall_topology(&dir);
    common::create_topics(&topology, &broker.bootstrap);
    let bootstrap = broker.bootstrap.clone();
    let k = common::Kafka::new(&bootstrap);

    let mut a = spawn(&topology, &bootstrap, &dir, "a", true);
    let mut b = spawn(&topology, &bootstrap, &dir, "b", true);
    let (port_a, port_b) = (a.port, b.port);
    let (pa, pb) = wait_until("both instances owning three partitions", Duration::from_secs(90), &mut [&mut a, &mut b], || {
        let (pa, pb) = (owned(port_a), owned(port_b));
        (pa.len() == 3 && pb.len() == 3).then_some((pa, pb))
    });
    let poison_partition = partition_for(POISON.as_bytes(), PARTITIONS);
    let (stuck, flowing) = if pa.contains(&poison_partition) { (&mut a, &mut b) } else { (&mut b, &mut a) };
    let flowing_partitions = if pa.contains(&poison_partition) { pb.clone() } else { pa.clone() };

    // 1. Good orders on every partition pass.
    let warm = orders_on("O-WARM", &(0..PARTITIONS).collect::<Vec<_>>(), 2);
    for id in &warm {
        send(&k, id);
    }
    wait_until("the warm-up orders on stock.commands", Duration::from_secs(60), &mut [&mut *stuck, &mut *flowing], || {
        let f = forwarded(&k);
        warm.iter().all(|id| f.contains_key(id)).then_some(())
    });

    // 2. The poison, then good orders on every partition.
    let sent_at = Instant::now();
    let (p, poison_offset) = send(&k, POISON);
    assert_eq!(p, poison_partition);
    let after = orders_on("O-AFTER", &(0..PARTITIONS).collect::<Vec<_>>(), 3);
    for id in &after {
        send(&k, id);
    }
    let labels = [("worker", "deduplicator"), ("topic", "order.created"), ("status", "stalled")];
    let partition_label = poison_partition.to_string();
    let stuck_port = stuck.port;
    let detected = wait_until("the stalled status of the poison's partition", Duration::from_secs(STALL_AFTER_S + 30), &mut [], || {
        let mut l = labels.to_vec();
        l.push(("partition", partition_label.as_str()));
        (common::metric(stuck_port, "orderflow_partition_status", &l) == 1.0).then(|| sent_at.elapsed())
    });
    eprintln!("stall detected {:.1}s after the poison was sent (stall_after {STALL_AFTER_S}s)", detected.as_secs_f64());
    assert!(
        detected <= Duration::from_secs(STALL_AFTER_S + 5),
        "detection took {detected:?}, over stall_after {STALL_AFTER_S}s + 5s (1 s evaluation, 1 s statistics)"
    );
    assert!(
        common::metric(stuck.port, "orderflow_partition_seconds_since_progress", &[("partition", partition_label.as_str())])
            >= STALL_AFTER_S as f64
    );
    assert!(common::metric(stuck.port, "orderflow_stalled_partitions", &[("worker", "deduplicator")]) >= 1.0);
    assert_eq!(common::http_status(stuck.port, "/readyz"), Some(200), "a stall leaves readiness as it is");
    // Meanwhile the other instance's partitions flow: every order sent to them after the poison
    // is forwarded, and none of them is reported stalled.
    let flowing_orders: Vec<&String> =
        after.iter().filter(|id| flowing_partitions.contains(&partition_for(id.as_bytes(), PARTITIONS))).collect();
    wait_until("the other partitions' new orders on stock.commands", Duration::from_secs(30), &mut [&mut *flowing], || {
        let f = forwarded(&k);
        flowing_orders.iter().all(|id| f.contains_key(*id)).then_some(())
    });
    assert_eq!(common::metric(flowing.port, "orderflow_partition_status", &labels), 0.0, "a flowing instance reports a stall");
    assert!(!forwarded(&k).contains_key(POISON));
    // The log line, once, with the record the processor is stuck on.
    let stalled_lines: Vec<serde_json::Value> = common::log_lines(&stuck.log)
        .into_iter()
        .filter(|l| common::message(l).starts_with("input partition stalled"))
        .filter(|l| common::field(l, "partition").and_then(|v| v.as_i64()) == Some(i64::from(poison_partition)))
        .filter(|l| common::field(l, "topic").and_then(|v| v.as_str()) == Some("order.created"))
        .collect();
    assert_eq!(stalled_lines.len(), 1, "one stall line for the partition; log:\n{}", common::tail(&stuck.log, 30));
    let seen = common::field(&stalled_lines[0], "last_seen").and_then(|v| v.as_str()).unwrap_or_default().to_string();
    let cursor = format!("processor on order.created[{poison_partition}]@{poison_offset} key {POISON}");
    assert!(seen.contains(&cursor), "the stall line names the record: {seen:?} lacks {cursor:?}");
    eprintln!("stall log line: {}", stalled_lines[0]);
    // The alert rule's expression over the scraped series.
    let (_, body) = http_get(stuck.port, "/metrics").expect("scrape");
    let series: Vec<String> = body
        .lines()
        .filter(|l| l.starts_with("orderflow_partition_status{") && l.contains("status=\"stalled\"") && l.ends_with(" 1"))
        .filter(|l| l.contains("topic=\"order.created\"") && l.contains(&format!("partition=\"{poison_partition}\"")))
        .map(|l| l.trim_end_matches(" 1").to_string())
        .collect();
    assert_eq!(series.len(), 1, "{body}");
    alert_fires(&dir, &series, &format!("orderflow-deduplicator-{}", stuck.name), poison_partition)
        .unwrap_or_else(|e| panic!("OrderflowPartitionStalled does not fire on {series:?}:\n{e}"));

    // 3. The skip: refused while the worker runs, then done with it stopped.
    let past = poison_offset.to_string();
    let partition = poison_partition.to_string();
    let skip = |extra: &[&str]| {
        let mut args = vec![
            "--worker",
            "deduplicator",
            "--topic",
            "order.created",
            "--partition",
            &partition,
            "--past",
            &past,
            "--operator",
            "stall-test",
        ];
        args.extend_from_slice(extra);
        common::cli(&bootstrap, "skip", &args)
    };
    let refused = skip(&["--reason", "poison record (test)", "--wait", "3s"]);
    assert!(!refused.status.success(), "skip ran while the worker runs");
    assert!(common::stderr(&refused).contains("member"), "{}", common::stderr(&refused));
    let no_reason = skip(&["--reason", "  "]);
    assert!(!no_reason.status.success() && common::stderr(&no_reason).contains("--reason"), "{}", common::stderr(&no_reason));
    stuck.process.kill_and_wait();
    flowing.process.kill_and_wait();
    let done = skip(&["--reason", "poison record: the processor blocks on O-POISON (stall test)"]);
    assert!(done.status.success(), "skip failed:\n{}", common::stderr(&done));
    let plan: serde_json::Value = serde_json::from_str(&common::stdout(&done)).expect("skip prints JSON");
    eprintln!("skip: {plan}");
    assert_eq!(plan["from"], poison_offset, "the skip starts at the worker's position: the poison");
    assert_eq!(plan["to"], poison_offset);
    assert_eq!(plan["resumes_at"], poison_offset + 1);
    assert_eq!(plan["audit"].as_array().map(Vec::len), Some(1));
    // The audit record, by the test's own reading of the dead-letter topic.
    let audit: Vec<_> = common::read_topic(&k.broker, "order.created.dlq", PARTITIONS)
        .into_iter()
        .filter(|m| common::header_pairs(m).iter().any(|(k, v)| k == "orderflow.dlq.error-class" && v == "skipped"))
        .collect();
    assert_eq!(audit.len(), 1, "one audit record");
    let h: BTreeMap<String, String> = common::header_pairs(&audit[0]).into_iter().collect();
    assert_eq!(h["orderflow.dlq.operator"], "stall-test");
    assert_eq!(h["orderflow.dlq.source-offset"], past);
    assert_eq!(h["orderflow.dlq.source-partition"], partition);
    assert_eq!(h["orderflow.dlq.worker"], "deduplicator");
    assert_eq!(h["orderflow.dlq.skipped-range"], format!("order.created/{partition}/{past}..={past}"));
    assert!(h["orderflow.dlq.error-message"].contains("the processor blocks on O-POISON"), "{h:?}");
    assert!(h["orderflow.dlq.time"].parse::<i64>().is_ok());
    assert_eq!(audit[0].key(), Some(POISON.as_bytes()));
    let decoded = k.codec.decode_local(audit[0].payload().expect("the skipped record's value")).expect("decodes");
    assert_eq!(decoded.order_id(), Some(POISON));

    // 4. Without the fail point, everything else is answered once; the poison only on redrive.
    let mut a2 = spawn(&topology, &bootstrap, &dir, "a", false);
    let mut b2 = spawn(&topology, &bootstrap, &dir, "b", false);
    let all: Vec<&String> = warm.iter().chain(after.iter()).collect();
    wait_until("every good order on stock.commands", Duration::from_secs(90), &mut [&mut a2, &mut b2], || {
        let f = forwarded(&k);
        all.iter().all(|id| f.contains_key(*id)).then_some(())
    });
    let f = forwarded(&k);
    let doubled: Vec<_> = f.iter().filter(|(_, n)| **n != 1).collect();
    assert!(doubled.is_empty(), "forwarded more than once: {doubled:?}");
    assert!(!f.contains_key(POISON), "the skipped record was processed");
    let listed = common::ok(&bootstrap, "dlq", &["list", "--class", "skipped", "--json"]);
    assert!(listed.contains(POISON) || listed.contains(&format!("\"offset\":{}", audit[0].offset())), "dlq list shows it:\n{listed}");
    common::ok(&bootstrap, "dlq", &["redrive", "--topic", "order.created.dlq", "--all", "--class", "skipped"]);
    wait_until("the redriven record on stock.commands", Duration::from_secs(60), &mut [&mut a2, &mut b2], || {
        forwarded(&k).get(POISON).is_some_and(|n| *n == 1).then_some(())
    });
}
