//! The transactional outbox relay (issue 15, seeds 002/003) on PostgreSQL, MariaDB and SQLite with
//! the real broker (Apache Kafka, `exactly_once`).
//!
//! Per database, [`ORDERS`] orders are written by [`WRITERS`] concurrent writer threads, each row
//! in its own database transaction; every fifth order has three rows (its first written in a
//! first pass, the other two in a second), so per-order order is exercised across batches and
//! relays. Two relay processes (`a`, `b`) and a deduplicator process run meanwhile; `a` is
//! SIGKILLed and restarted [`KILLS`] times, the broker is stopped for 5 s once, and on the servers
//! the database is restarted once (every connection cut) while rows are written and published. One order, `O-BIG`, has a first
//! row too large for the broker (an oversized record) and a normal second row.
//!
//! By the test's own reading of the topics and the table:
//! - `O-BIG`'s first row ends `QUARANTINED` after exactly 6 attempts (`retry_count`, last error
//!   `oversized`) while the other orders flow, and its second row stays unpublished behind it;
//!   after the payload is fixed, `orderflow outbox requeue` publishes both, in order;
//! - every row ends `COMPLETED`; every row's `eventId` is on `order.created` (duplicates there are
//!   counted and reported: a relay killed between the broker's acknowledgement and the database
//!   update republishes its batch); for every order, its rows' first appearances on
//!   `order.created` are in the order they were written;
//! - `order.created.repartition`, the deduplicator's output, has every `eventId` exactly once.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::db::{Db, DbKind};
use common::{free_port, http_get, Guarded};
use orderflow_api::Event;
use outbox_relay::{OutboxStore, Status};
use rdkafka::message::Message;

/// Orders written per database.
const ORDERS: usize = 10_000;
/// Concurrent writer threads.
const WRITERS: usize = 4;
/// SIGKILLs of relay `a`.
const KILLS: usize = 4;
const PARTITIONS: i32 = 6;
const BIG: &str = "O-BIG";

/// Rows of order `i`: three for every fifth order, else one.
fn rows_of(i: usize) -> usize {
    if i.is_multiple_of(5) {
        3
    } else {
        1
    }
}

fn order_id(i: usize) -> String {
    format!("O-{i:05}")
}

/// The `eventId` of row `seq` (1-based) of `order`; the test reads the sequence back from it.
fn event_id(order: &str, seq: usize) -> String {
    format!("{order}#{seq}")
}

fn payload(order: &str, product: &str) -> String {
    serde_json::json!({
        "orderId": order, "customerId": "C-1", "hqId": "HQ-OUTBOX", "storeId": "ST-OUTBOX",
        "items": [{"productId": product, "quantity": 1, "unitPrice": 100}],
    })
    .to_string()
}

/// `topology.toml` with relay settings for a test: short claim lease (a killed relay's rows come
/// back in 3 s), fast retries (6 attempts within a few seconds), small batches.
fn outbox_topology(dir: &Path) -> PathBuf {
    common::topology_copy(dir, "topology.toml", |original| {
        let mut out = Vec::new();
        for line in original.lines() {
            let replaced = [
                ("batch_size = ", "batch_size = 200"),
                ("poll_interval = ", "poll_interval = \"50ms\""),
                ("claim_lease = ", "claim_lease = \"3s\""),
                ("retry_backoff = ", "retry_backoff = \"100ms\""),
                ("retry_backoff_max = ", "retry_backoff_max = \"500ms\""),
            ]
            .iter()
            .find(|(k, _)| line.starts_with(k));
            out.push(replaced.map_or(line.to_string(), |(_, v)| format!("{v}   # outbox test")));
        }
        out.join("\n")
    })
}

struct Proc {
    name: String,
    port: u16,
    log: PathBuf,
    process: Guarded,
}

fn spawn(topology: &Path, bootstrap: &str, dir: &Path, worker: &str, name: &str, db: &str) -> Proc {
    let port = free_port();
    let log = dir.join(format!("{name}-{}.log", common::now_ms()));
    let mut cmd = common::run_command(topology, bootstrap, name, port, &dir.join(format!("state-{name}")), &log);
    cmd.args(["--worker", worker]).env("ORDERFLOW_DATABASE_URL", db);
    Proc { name: name.to_string(), port, log, process: Guarded::new(cmd.spawn().expect("spawn orderflow run"), Duration::from_millis(50)) }
}

fn ready(port: u16) -> bool {
    matches!(http_get(port, "/readyz"), Some((200, _)))
}

fn wait_until<T>(what: &str, within: Duration, procs: &mut [&mut Proc], mut check: impl FnMut() -> Option<T>) -> T {
    let until = Instant::now() + within;
    loop {
        if let Some(v) = check() {
            return v;
        }
        for p in procs.iter_mut() {
            if let Some(s) = p.process.try_wait() {
                panic!("{} exited ({s}) while waiting for {what}; log:\n{}", p.name, common::tail(&p.log, 30));
            }
        }
        let logs: Vec<String> = procs.iter().map(|p| format!("{}:\n{}", p.name, common::tail(&p.log, 12))).collect();
        assert!(Instant::now() < until, "no {what} within {}s; logs:\n{}", within.as_secs(), logs.join("\n"));
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Inserts one outbox row in its own transaction, retrying while the database is away (a retry
/// first looks whether the lost commit went through, so no row is written twice).
async fn insert(store: &OutboxStore, order: &str, seq: usize, payload: &str) {
    let sql = store.dialect().sql(
        "INSERT INTO outbox (aggregate_id, topic, event_type, event_id, payload, created_at) VALUES (?, 'order.created', 'OrderCreated', ?, ?, ?)",
    );
    let exists = store.dialect().sql("SELECT COUNT(*) FROM outbox WHERE event_id = ?");
    let id = event_id(order, seq);
    let mut retried = false;
    for _ in 0..600 {
        let attempt = async {
            if retried {
                let n: i64 = sqlx::Row::try_get(&sqlx::query(&exists).bind(&id).fetch_one(store.pool()).await?, 0)?;
                if n > 0 {
                    return Ok::<_, sqlx::Error>(());
                }
            }
            let mut tx = store.pool().begin().await?;
            sqlx::query(&sql).bind(order).bind(&id).bind(payload).bind(common::now_ms()).execute(&mut *tx).await?;
            tx.commit().await
        };
        match attempt.await {
            Ok(()) => return,
            Err(_) => {
                retried = true;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    panic!("could not write {id} within a minute");
}

fn scalar(rt: &tokio::runtime::Runtime, store: &OutboxStore, sql: &str) -> i64 {
    rt.block_on(async {
        sqlx::Row::try_get::<i64, _>(&sqlx::query(&store.dialect().sql(sql)).fetch_one(store.pool()).await.unwrap(), 0).unwrap()
    })
}

/// `(key, eventId)` of every record of `topic`, in offset order per partition.
fn read(k: &common::Kafka, topic: &str) -> Vec<(String, String)> {
    common::read_topic(&k.broker, topic, PARTITIONS)
        .iter()
        .map(|m| {
            let e: Event = k.codec.decode_local(m.payload().expect("a value")).expect("decodes");
            (String::from_utf8_lossy(m.key().expect("a key")).into_owned(), e.event_id().to_string())
        })
        .collect()
}

fn percentile(sorted: &[i64], p: f64) -> i64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn scenario(kind: DbKind) {
    let started = Instant::now();
    let broker = common::Broker::start();
    let db = Db::start(kind);
    let run = common::RunDir::create(&format!("orderflow-outbox-{}-", kind.as_str()), "ORDERFLOW_KEEP_OUTBOX", "outbox test logs");
    let dir = run.path().to_path_buf();
    let topology = outbox_topology(&dir);
    common::create_topics(&topology, &broker.bootstrap);
    let k = common::Kafka::new(&broker.bootstrap);
    let rt = Arc::new(tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap());
    let store = rt.block_on(async {
        let s = OutboxStore::connect(db.url(), (WRITERS + 2) as u32, Duration::from_secs(30)).await.expect("connect");
        s.migrate().await.expect("migrate");
        s
    });

    let url = db.url().to_string();
    let mut a = spawn(&topology, &broker.bootstrap, &dir, "outbox-relay", "a", &url);
    let mut b = spawn(&topology, &broker.bootstrap, &dir, "outbox-relay", "b", &url);
    let mut d = spawn(&topology, &broker.bootstrap, &dir, "deduplicator", "dedup", &url);
    let ports = (a.port, b.port);
    wait_until("both relays ready", Duration::from_secs(90), &mut [&mut a, &mut b], || (ready(ports.0) && ready(ports.1)).then_some(()));

    // O-BIG: a first row over the broker's 1 MB, then a normal one.
    rt.block_on(insert(&store, BIG, 1, &payload(BIG, &"x".repeat(1_100_000))));
    rt.block_on(insert(&store, BIG, 2, &payload(BIG, "P-1")));

    // Writers: pass 1 writes each order's first row, pass 2 the rest.
    let written = Arc::new(AtomicUsize::new(0));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (store, written, rt) = (store.clone(), written.clone(), rt.clone());
            std::thread::spawn(move || {
                rt.block_on(async {
                    let mine: Vec<usize> = (0..ORDERS).filter(|i| i % WRITERS == w).collect();
                    for pass in [1, 2] {
                        for &i in &mine {
                            let o = order_id(i);
                            let seqs = if pass == 1 { 1..=1 } else { 2..=rows_of(i) };
                            for seq in seqs {
                                insert(&store, &o, seq, &payload(&o, "P-1")).await;
                                written.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                })
            })
        })
        .collect();
    let total_rows: usize = (0..ORDERS).map(rows_of).sum();

    // Chaos while rows are written and published: SIGKILL relay a and restart it; restart the
    // database server once (every connection of writers and relays cut).
    let mut restarted_db = false;
    for kill in 0..KILLS {
        std::thread::sleep(Duration::from_millis(2500));
        a.process.kill_and_wait();
        println!("{}: SIGKILLed relay a ({} of {total_rows} rows written)", kind.as_str(), written.load(Ordering::Relaxed));
        if kill == 1 && kind != DbKind::Sqlite {
            db.restart();
            restarted_db = true;
            println!("{}: restarted the database server", kind.as_str());
        }
        if kill == 2 {
            // A broker outage: waited out by the relays, never counted against a row.
            broker.stop();
            std::thread::sleep(Duration::from_secs(5));
            broker.start_again();
            println!("{}: stopped the broker for 5 s", kind.as_str());
        }
        std::thread::sleep(Duration::from_millis(500));
        a = spawn(&topology, &broker.bootstrap, &dir, "outbox-relay", "a", &url);
    }
    for w in writers {
        w.join().expect("writer");
    }
    println!("{}: {total_rows} rows written by {WRITERS} writers in {:.1}s", kind.as_str(), started.elapsed().as_secs_f64());

    // Every row but O-BIG's is published; O-BIG#1 is quarantined and O-BIG#2 waits behind it.
    let q = |sql: &str| scalar(&rt, &store, sql);
    wait_until(
        "every other row COMPLETED and O-BIG's first row QUARANTINED",
        Duration::from_secs(240),
        &mut [&mut a, &mut b, &mut d],
        || {
            let open = q("SELECT COUNT(*) FROM outbox WHERE status <> 'COMPLETED'");
            let quarantined = q("SELECT COUNT(*) FROM outbox WHERE status = 'QUARANTINED'");
            (open == 2 && quarantined == 1).then_some(())
        },
    );
    let rows =
        rt.block_on(store.list(&outbox_relay::ListFilter { aggregate_id: Some(BIG.into()), limit: 10, ..Default::default() })).unwrap();
    assert_eq!(rows.len(), 2);
    let (big1, big2) = (&rows[0], &rows[1]);
    assert_eq!(big1.status, Status::Quarantined, "{big1:?}");
    assert_eq!(big1.retry_count, 6, "seed 003: quarantined after exactly 6 failed attempts");
    assert!(big1.last_error.as_deref().unwrap_or_default().starts_with("oversized:"), "{:?}", big1.last_error);
    assert_eq!((big2.status, big2.retry_count), (Status::Pending, 0), "the second row waits behind the quarantined one");
    assert!(!read(&k, "order.created").iter().any(|(key, _)| key == BIG), "nothing of O-BIG published before the requeue");

    // `orderflow outbox list` shows it; fix the payload, requeue, and both rows go out in order.
    let list =
        Command::new(common::orderflow_bin()).args(["outbox", "list", "--database-url", &url]).env("RUST_BACKTRACE", "0").output().unwrap();
    assert!(list.status.success(), "{}", common::stderr(&list));
    assert!(
        common::stdout(&list).contains(&format!("\"id\":{}", big1.id)),
        "outbox list shows the quarantined row: {}",
        common::stdout(&list)
    );
    rt.block_on(async {
        let fix = store.dialect().sql("UPDATE outbox SET payload = ? WHERE id = ?");
        sqlx::query(&fix).bind(payload(BIG, "P-1")).bind(big1.id).execute(store.pool()).await.unwrap();
    });
    let requeue = Command::new(common::orderflow_bin())
        .args(["outbox", "requeue", &big1.id.to_string(), "--operator", "outbox-test", "--database-url", &url])
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    assert!(requeue.status.success(), "requeue: {}", common::stderr(&requeue));
    wait_until("every row COMPLETED after the requeue", Duration::from_secs(60), &mut [&mut a, &mut b, &mut d], || {
        (q("SELECT COUNT(*) FROM outbox WHERE status <> 'COMPLETED'") == 0).then_some(())
    });
    let requeued = rt.block_on(store.show(big1.id)).unwrap().unwrap();
    assert_eq!(requeued.requeued_by.as_deref(), Some("outbox-test"));
    assert_eq!(q("SELECT COUNT(*) FROM outbox") as usize, total_rows + 2, "no row written twice");

    // The topic, by the test's own reading: every eventId, per-order order of first appearances.
    let mut expected: Vec<String> = (0..ORDERS).flat_map(|i| (1..=rows_of(i)).map(move |s| event_id(&order_id(i), s))).collect();
    expected.extend([event_id(BIG, 1), event_id(BIG, 2)]);
    // The topic at rest first: a relay whose batch straddled the broker outage keeps its
    // transaction open until librdkafka's retries get the batch acknowledged (~25 s here) or the
    // transaction times out, and a read_committed reader stops short of it meanwhile.
    wait_until("no open transaction on order.created", Duration::from_secs(120), &mut [&mut a, &mut b, &mut d], || {
        common::unstable_partitions(&k.broker, "order.created", PARTITIONS).is_empty().then_some(())
    });
    let records = read(&k, "order.created");
    let mut seen: HashMap<&str, usize> = HashMap::new();
    let mut firsts: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (key, id) in &records {
        let n = seen.entry(id.as_str()).or_default();
        *n += 1;
        if *n == 1 {
            let (order, seq) = id.rsplit_once('#').expect("order#seq");
            assert_eq!(order, key, "{id} keyed by its order");
            firsts.entry(key.as_str()).or_default().push(seq.parse().unwrap());
        }
    }
    let missing: Vec<&String> = expected.iter().filter(|e| !seen.contains_key(e.as_str())).collect();
    if !missing.is_empty() {
        // Tell a transaction still open (its records past the last stable offset) from a loss.
        let uncommitted: std::collections::HashSet<String> =
            common::read_topic_at(&k.broker, "order.created", PARTITIONS, common::Isolation::ReadUncommitted)
                .iter()
                .map(|m| k.codec.decode_local(m.payload().expect("a value")).expect("decodes").event_id().to_string())
                .collect();
        let open = missing.iter().filter(|e| uncommitted.contains(e.as_str())).count();
        panic!(
            "{} eventIds never published, e.g. {:?}; {open} of them are on the topic read_uncommitted; partitions with an open transaction (partition, high watermark, last stable offset): {:?}",
            missing.len(),
            &missing[..missing.len().min(5)],
            common::unstable_partitions(&k.broker, "order.created", PARTITIONS)
        );
    }
    assert_eq!(seen.len(), expected.len(), "only the rows' eventIds");
    for (order, seqs) in &firsts {
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "order {order}: rows published out of order: {seqs:?}");
    }
    let duplicates = records.len() - seen.len();

    // Downstream after deduplication: each eventId exactly once.
    // As above for the deduplicator's own transactions (one may straddle the broker outage).
    let (mut last_count, mut open) = (0, Vec::new());
    let deduped = wait_until("the deduplicator's output complete", Duration::from_secs(240), &mut [&mut d], || {
        open = common::unstable_partitions(&k.broker, "order.created.repartition", PARTITIONS);
        let r = read(&k, "order.created.repartition");
        if r.len() != last_count {
            println!("{}: deduplicated {} of {} (open transactions: {open:?})", kind.as_str(), r.len(), expected.len());
            last_count = r.len();
        }
        (r.len() >= expected.len()).then_some(r)
    });
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for (_, id) in &deduped {
        *counts.entry(id.as_str()).or_default() += 1;
    }
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "after deduplication some eventIds are not once: {:?}", &twice[..twice.len().min(5)]);
    assert_eq!(counts.len(), expected.len());

    // Publish lag from the table (published_at − created_at), for the closing note.
    let mut lags: Vec<i64> = rt.block_on(async {
        sqlx::query(&store.dialect().sql("SELECT published_at - created_at FROM outbox WHERE aggregate_id <> ?"))
            .bind(BIG)
            .fetch_all(store.pool())
            .await
            .unwrap()
            .iter()
            .map(|r| sqlx::Row::try_get::<i64, _>(r, 0).unwrap())
            .collect()
    });
    lags.sort_unstable();
    let mean = lags.iter().sum::<i64>() as f64 / lags.len() as f64;
    println!(
        "{}: {} rows COMPLETED; {} duplicate record(s) on order.created from {KILLS} SIGKILLs, a broker outage{}; deduplicated output exactly once; \
         publish lag under chaos p50 {} ms, p99 {} ms, max {} ms, mean {mean:.0} ms; {:.1}s in all",
        kind.as_str(),
        total_rows + 2,
        duplicates,
        if restarted_db { " and a database restart" } else { "" },
        percentile(&lags, 0.5),
        percentile(&lags, 0.99),
        lags.last().unwrap(),
        started.elapsed().as_secs_f64()
    );
    for p in [&mut a, &mut b, &mut d] {
        p.process.terminate(Duration::from_secs(30));
    }
}

#[test]
fn outbox_relay_on_postgres_publishes_every_row_once_in_order_through_kills_and_database_and_broker_restarts() {
    scenario(DbKind::Postgres);
}

#[test]
fn outbox_relay_on_mariadb_publishes_every_row_once_in_order_through_kills_and_database_and_broker_restarts() {
    scenario(DbKind::MariaDb);
}

#[test]
fn outbox_relay_on_sqlite_publishes_every_row_once_in_order_through_kills_and_a_broker_restart() {
    scenario(DbKind::Sqlite);
}
