//! `bench outbox` (issue 15): the transactional outbox relay of seeds 002/003 on one database
//! (`--database-url`: PostgreSQL, MariaDB/MySQL or SQLite), with `--relays` relay instances
//! running in-process against the broker, under the topology's guarantee (`exactly_once` on
//! Kafka: one producer transaction per claimed batch).
//!
//! The outbox table is migrated and emptied first, then two phases run:
//! 1. **throughput**: `--rows` `OrderCreated` rows (one order each) are inserted while no relay
//!    runs (multi-row inserts), then the relays start and the bench times, polling every 100 ms,
//!    until every row is `COMPLETED`: rows/s from the relays' start (their connect, migrations
//!    and `init_transactions` are reported apart) to the last row completed;
//! 2. **steady load**: with the relays running, `--writers` writers insert rows at `--rate` rows/s
//!    in total (each row its own database transaction, paced) for `--duration`; once every row
//!    is `COMPLETED` the publish lag of each row of this phase, `published_at − created_at`, is
//!    read back from the table: p50, p99, max and mean, and whether the mean meets seed 003's
//!    target (an average publish lag of at most 3 s).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use orderflow_runtime::codec::Codec;
use orderflow_runtime::kafka::create_topics;
use orderflow_runtime::metrics::Metrics;
use orderflow_runtime::worker::now_ms;
use outbox_relay::{Dialect, OutboxStore, Relay};
use serde::Serialize;
use sqlx::Row as _;
use tokio::sync::watch;
use tracing::{info, warn};

/// The relay worker of the topology this scenario runs.
const RELAY: &str = "outbox-relay";
/// Seed 003: the average publish lag must not exceed this.
const TARGET_MEAN_LAG_MS: f64 = 3000.0;
/// Rows per multi-row insert of the throughput phase.
const INSERT_CHUNK: usize = 250;
/// How long to wait for the outbox to drain before giving up.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(900);

/// `orderflow bench outbox` flags.
#[derive(clap::Args, Debug)]
pub struct OutboxArgs {
    #[arg(long, default_value = "topology.toml")]
    topology: PathBuf,
    /// Bootstrap servers of the broker (e.g. started by scripts/broker.sh).
    #[arg(long, env = "ORDERFLOW_BOOTSTRAP")]
    bootstrap: Option<String>,
    /// The outbox database: `postgres://…`, `mysql://…` / `mariadb://…` or `sqlite://…`. Its
    /// `outbox` table is migrated and emptied.
    #[arg(long)]
    database_url: String,
    /// Rows of the throughput phase (inserted before the relays start).
    #[arg(long, default_value_t = 50_000)]
    rows: u64,
    /// Rows per second offered by all writers together in the steady phase.
    #[arg(long, default_value_t = 1_000)]
    rate: u64,
    /// Length of the steady phase.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Concurrent writers of the steady phase (each row its own transaction).
    #[arg(long, default_value_t = 4)]
    writers: usize,
    /// Relay instances, in-process, each with its own instance id (and `transactional.id`).
    #[arg(long, default_value_t = 1)]
    relays: usize,
}

/// `bench outbox` result (one JSON object on stdout).
#[derive(Debug, Serialize)]
pub struct OutboxResult {
    /// Always `"outbox"`.
    pub scenario: &'static str,
    /// `postgres`, `mysql` (MariaDB or MySQL) or `sqlite`, from the URL's scheme.
    pub database: &'static str,
    /// The server's version string (`SELECT version()`, `sqlite_version()`).
    pub database_version: String,
    /// The relays' guarantee (`exactly_once` on Kafka).
    pub guarantee: &'static str,
    pub relays: usize,
    pub writers: usize,
    /// The relay's `batch_size`, `poll_interval` and `pool_size` from the topology.
    pub batch_size: i64,
    pub poll_interval_ms: u64,
    pub pool_size: u32,
    pub throughput: Throughput,
    pub steady: Steady,
}

/// The throughput phase.
#[derive(Debug, Serialize)]
pub struct Throughput {
    pub rows: u64,
    /// Rate of the multi-row inserts before the relays started, rows/s.
    pub insert_rows_per_s: f64,
    /// Time for the relays to start (connect, migrations, `init_transactions`, topic limit),
    /// seconds; not part of `seconds`.
    pub relay_start_s: f64,
    /// From the relays running to the last row `COMPLETED`, seconds (100 ms polling).
    pub seconds: f64,
    /// `rows / seconds`.
    pub rows_per_s: f64,
}

/// The steady-load phase.
#[derive(Debug, Serialize)]
pub struct Steady {
    /// `--rate`.
    pub offered_rows_per_s: u64,
    pub duration_s: f64,
    /// Rows the writers inserted.
    pub rows: u64,
    /// `rows / duration_s`.
    pub achieved_rows_per_s: f64,
    /// Mean time of one writer's insert transaction (begin, insert, commit), ms.
    pub mean_insert_ms: f64,
    /// From the end of the writes to the last row `COMPLETED`, seconds.
    pub drain_s: f64,
    /// `published_at − created_at` of this phase's rows, ms.
    pub lag_ms: Lag,
    /// Seed 003's target for the mean lag, ms.
    pub target_mean_lag_ms: f64,
    /// `lag_ms.mean <= target_mean_lag_ms`.
    pub target_met: bool,
}

#[derive(Debug, Serialize, Default)]
pub struct Lag {
    pub p50: i64,
    pub p99: i64,
    pub max: i64,
    pub mean: f64,
}

fn payload(order: &str) -> String {
    serde_json::json!({
        "orderId": order, "customerId": "C-BENCH", "hqId": "HQ-BENCH", "storeId": "ST-BENCH",
        "items": [{"productId": "P-1", "quantity": 1, "unitPrice": 100}],
    })
    .to_string()
}

fn database_name(d: Dialect) -> &'static str {
    match d {
        Dialect::Postgres => "postgres",
        Dialect::MySql => "mysql",
        Dialect::Sqlite => "sqlite",
    }
}

/// Runs both phases; see the module docs.
pub async fn run(args: OutboxArgs) -> Result<OutboxResult> {
    if args.writers == 0 || args.relays == 0 || args.rate == 0 {
        bail!("--writers, --relays and --rate must be at least 1");
    }
    if let Ok(env) = std::env::var(outbox_relay::config::DATABASE_URL_ENV) {
        if !env.is_empty() && env != args.database_url {
            bail!("{} is set to another database than --database-url; unset it", outbox_relay::config::DATABASE_URL_ENV);
        }
    }
    let loaded = Arc::new(crate::topology::load_topology(&args.topology, args.bootstrap.as_deref())?);
    let t = &loaded.topology;
    let spec = t.workers.get(RELAY).with_context(|| format!("worker {RELAY} is not in the topology"))?;
    let mut config = orderflow_kinds::relay_config(spec).with_context(|| format!("worker {RELAY}: not an outbox-relay or bad settings"))?;
    config.database_url = args.database_url.clone();
    let guarantee = spec.guarantee(&t.defaults);
    create_topics(t).await.context("creating topics")?;
    let codec = Arc::new(Codec::load(&loaded.avro_dir(), t.broker.registry_url.as_deref())?);
    let metrics = Metrics::new();
    let run = now_ms();
    // The relays as `orderflow run` sets them up (topic of the `out` port, its key field, group).
    let setups = (0..args.relays)
        .map(|i| {
            let ready = Arc::new(AtomicBool::new(false));
            crate::run::relay_setup(&loaded, RELAY, config.clone(), &format!("bench-{run}-{i}"), codec.clone(), metrics.clone(), ready)
        })
        .collect::<Result<Vec<_>>>()?;
    let topic = setups[0].topic.clone();

    // The database the relays use (`relay_setup` resolved it as the relay does).
    let store = OutboxStore::connect(&setups[0].config.database_url, args.writers as u32 + 2, Duration::from_secs(30)).await?;
    store.migrate().await?;
    let dialect = store.dialect();
    sqlx::query("DELETE FROM outbox").execute(store.pool()).await?;
    let version_sql = if dialect == Dialect::Sqlite { "SELECT sqlite_version()" } else { "SELECT version()" };
    let database_version: String = sqlx::query(version_sql).fetch_one(store.pool()).await?.try_get(0)?;
    info!(database = database_name(dialect), version = %database_version, "outbox emptied");

    // ---- phase 1: throughput over a backlog
    let started = Instant::now();
    insert_backlog(&store, &topic, run, args.rows).await?;
    let insert_s = started.elapsed().as_secs_f64();
    info!(rows = args.rows, seconds = insert_s, "backlog inserted; starting the relays");

    let (stop_tx, stop_rx) = watch::channel(false);
    let started = Instant::now();
    let mut relays = Vec::new();
    for setup in setups {
        let mut rx = stop_rx.clone();
        let relay = Relay::start(setup, &mut rx).await?.context("relay stopped while starting")?;
        relays.push(relay);
    }
    let relay_start_s = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let handles: Vec<_> = relays.into_iter().map(|r| tokio::spawn(r.run(stop_rx.clone()))).collect();
    drain(&store, &handles).await?;
    let seconds = started.elapsed().as_secs_f64();
    let throughput = Throughput {
        rows: args.rows,
        insert_rows_per_s: args.rows as f64 / insert_s.max(1e-9),
        relay_start_s,
        seconds,
        rows_per_s: args.rows as f64 / seconds.max(1e-9),
    };
    info!(rows_per_s = throughput.rows_per_s, "backlog published");

    // ---- phase 2: steady load
    let boundary: i64 = sqlx::query("SELECT COALESCE(MAX(id), 0) FROM outbox").fetch_one(store.pool()).await?.try_get(0)?;
    let inserted = Arc::new(AtomicU64::new(0));
    let insert_us = Arc::new(AtomicU64::new(0));
    let t0 = tokio::time::Instant::now() + Duration::from_millis(100);
    let end = t0 + args.duration;
    let per_writer = Duration::from_secs_f64(args.writers as f64 / args.rate as f64);
    let mut writers = Vec::new();
    for w in 0..args.writers {
        let (store, topic, inserted, insert_us) = (store.clone(), topic.clone(), inserted.clone(), insert_us.clone());
        let offset = Duration::from_secs_f64(w as f64 / args.rate as f64);
        writers.push(tokio::spawn(async move {
            let sql = store.dialect().sql(&format!(
                "INSERT INTO outbox (aggregate_id, topic, event_type, event_id, payload, created_at) VALUES (?, '{topic}', 'OrderCreated', ?, ?, ?)"
            ));
            let mut next = t0 + offset;
            let mut k = 0u64;
            // Paced: row k at t0 + k / per-writer rate; a writer behind schedule inserts at once, and
            // stops at `end` whatever it has not written (then achieved < offered).
            while next < end && tokio::time::Instant::now() < end {
                tokio::time::sleep_until(next).await;
                let order = format!("S{run}-{w}-{k}");
                let event = format!("{order}#1");
                let body = payload(&order);
                let began = Instant::now();
                let mut attempts = 0;
                loop {
                    let attempt = async {
                        let mut tx = store.pool().begin().await?;
                        sqlx::query(&sql).bind(&order).bind(&event).bind(&body).bind(now_ms()).execute(&mut *tx).await?;
                        tx.commit().await
                    };
                    match attempt.await {
                        Ok(()) => break,
                        Err(e) if attempts < 20 => {
                            attempts += 1;
                            warn!(writer = w, error = %e, "insert failed; retrying");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        Err(e) => return Err(anyhow::Error::from(e).context("steady insert")),
                    }
                }
                insert_us.fetch_add(began.elapsed().as_micros() as u64, Ordering::Relaxed);
                inserted.fetch_add(1, Ordering::Relaxed);
                k += 1;
                next += per_writer;
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for w in writers {
        w.await??;
    }
    let duration_s = args.duration.as_secs_f64();
    let rows = inserted.load(Ordering::Relaxed);
    let started = Instant::now();
    drain(&store, &handles).await?;
    let drain_s = started.elapsed().as_secs_f64();
    let _ = stop_tx.send(true);
    for h in handles {
        h.await?.context("relay")?;
    }

    let mut lags: Vec<i64> =
        sqlx::query(&dialect.sql("SELECT published_at - created_at FROM outbox WHERE id > ? AND status = 'COMPLETED'"))
            .bind(boundary)
            .fetch_all(store.pool())
            .await?
            .iter()
            .map(|r| r.try_get::<i64, _>(0))
            .collect::<Result<_, _>>()?;
    if lags.len() as u64 != rows {
        bail!("{} rows of the steady phase are COMPLETED, {rows} were inserted", lags.len());
    }
    lags.sort_unstable();
    let lag_ms = lag_of(&lags);
    let steady = Steady {
        offered_rows_per_s: args.rate,
        duration_s,
        rows,
        achieved_rows_per_s: rows as f64 / duration_s.max(1e-9),
        mean_insert_ms: insert_us.load(Ordering::Relaxed) as f64 / 1000.0 / rows.max(1) as f64,
        drain_s,
        target_met: lag_ms.mean <= TARGET_MEAN_LAG_MS,
        lag_ms,
        target_mean_lag_ms: TARGET_MEAN_LAG_MS,
    };
    Ok(OutboxResult {
        scenario: "outbox",
        database: database_name(dialect),
        database_version,
        guarantee: guarantee.as_str(),
        relays: args.relays,
        writers: args.writers,
        batch_size: config.batch_size,
        poll_interval_ms: config.poll_interval.as_millis() as u64,
        pool_size: config.pool_size,
        throughput,
        steady,
    })
}

/// Inserts `rows` rows (one order each) in multi-row inserts of [`INSERT_CHUNK`].
async fn insert_backlog(store: &OutboxStore, topic: &str, run: i64, rows: u64) -> Result<()> {
    let mut i = 0u64;
    while i < rows {
        let n = (rows - i).min(INSERT_CHUNK as u64);
        let values = vec![format!("(?, '{topic}', 'OrderCreated', ?, ?, ?)"); n as usize].join(", ");
        let sql = store
            .dialect()
            .sql(&format!("INSERT INTO outbox (aggregate_id, topic, event_type, event_id, payload, created_at) VALUES {values}"));
        let now = now_ms();
        let mut q = sqlx::query(&sql);
        for j in i..i + n {
            let order = format!("T{run}-{j}");
            q = q.bind(order.clone()).bind(format!("{order}#1")).bind(payload(&order)).bind(now);
        }
        q.execute(store.pool()).await?;
        i += n;
    }
    Ok(())
}

/// Waits until no row is left unpublished (polling every 100 ms); fails when a row is
/// quarantined, a relay stopped, or [`DRAIN_TIMEOUT`] passed.
async fn drain(store: &OutboxStore, relays: &[tokio::task::JoinHandle<Result<(), outbox_relay::RelayError>>]) -> Result<()> {
    let until = Instant::now() + DRAIN_TIMEOUT;
    loop {
        let row =
            sqlx::query("SELECT COUNT(*), COUNT(CASE WHEN status = 'QUARANTINED' THEN 1 END) FROM outbox WHERE status <> 'COMPLETED'")
                .fetch_one(store.pool())
                .await?;
        let (open, quarantined): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
        if quarantined > 0 {
            bail!("{quarantined} outbox rows were QUARANTINED");
        }
        if open == 0 {
            return Ok(());
        }
        if relays.iter().any(|h| h.is_finished()) {
            bail!("a relay stopped with {open} rows unpublished");
        }
        if Instant::now() > until {
            bail!("{open} rows still unpublished after {} s", DRAIN_TIMEOUT.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Nearest-rank percentiles and mean of sorted `v`.
fn lag_of(v: &[i64]) -> Lag {
    if v.is_empty() {
        return Lag::default();
    }
    let rank = |p: f64| v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    Lag { p50: rank(0.50), p99: rank(0.99), max: v[v.len() - 1], mean: v.iter().sum::<i64>() as f64 / v.len() as f64 }
}
