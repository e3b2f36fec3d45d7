//! What a scenario runs on ([`Rig`]): the worker processes, the observer/POS, the producer, and the
//! broker's write counts.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use orderflow_api::events::*;
use orderflow_api::Event;
use orderflow_runtime::codec::Codec;
use orderflow_runtime::kafka::{client_config, create_topics, Side};
use orderflow_runtime::topology::{Loaded, Topology};
use orderflow_runtime::worker::now_ms;
use rdkafka::consumer::BaseConsumer;
use rdkafka::producer::FutureProducer;
use tracing::{info, warn};

use crate::bench::{free_port, http_get, log_tail, settings, Settings};
use crate::demo::send;
use crate::demo::tpch;
use crate::kafkaio::{high_watermarks, watermark_client};

use super::{
    spawn_observer, topology_copy, worker_stats, Book, Mode, Orders, PosCounts, SagaArgs, SagaTopics, Track, WorkerStats, HTTP_TIMEOUT,
    POOL_SCALE_FACTOR,
};

// ------------------------------------------------------------------ worker processes

/// One child process running workers.
pub(super) struct Proc {
    pub(super) name: String,
    pub(super) workers: Vec<String>,
    pub(super) port: u16,
    pub(super) log: PathBuf,
    pub(super) child: tokio::process::Child,
}

/// Spawns the workers as children (`current_exe() run …`), in `mode`, and waits for each
/// `/readyz` to answer 200.
pub(super) async fn spawn_procs(mode: Mode, topology: &Path, t: &Topology, run_dir: &Path) -> Result<Vec<Proc>> {
    let exe = std::env::current_exe().context("locating the orderflow binary")?;
    let all: Vec<String> = t.workers.keys().cloned().collect();
    let groups: Vec<(String, Vec<String>)> = match mode {
        Mode::OneProcess => vec![("orderflow".into(), all)],
        Mode::ProcessPerWorker => all.into_iter().map(|w| (w.clone(), vec![w])).collect(),
    };
    let mut procs = Vec::new();
    for (name, workers) in groups {
        let port = free_port()?;
        let log = run_dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = tokio::process::Command::new(&exe);
        cmd.arg("run")
            .arg("--topology")
            .arg(topology)
            .args(["--bootstrap", &t.broker.bootstrap, "--instance", "bench", "--metrics-addr", &format!("127.0.0.1:{port}")])
            .env("ORDERFLOW_STATE_DIR", run_dir.join("state"))
            .stdin(std::process::Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .kill_on_drop(true);
        if mode == Mode::ProcessPerWorker {
            for w in &workers {
                cmd.args(["--worker", w]);
            }
        }
        let child = cmd.spawn().with_context(|| format!("spawning {} run ({name})", exe.display()))?;
        info!(process = %name, pid = child.id(), port, "worker process started");
        procs.push(Proc { name, workers, port, log, child });
    }
    let deadline = Instant::now() + Duration::from_secs(180);
    for p in &mut procs {
        loop {
            if matches!(http_get(p.port, "/readyz", HTTP_TIMEOUT).await, Some((200, _))) {
                break;
            }
            if let Some(status) = p.child.try_wait()? {
                bail!(
                    "worker process {} exited ({status}) before it was ready; log {}:\n{}",
                    p.name,
                    p.log.display(),
                    log_tail(&p.log, 20)
                );
            }
            if Instant::now() > deadline {
                bail!("worker process {} not ready within 180 s; log {}:\n{}", p.name, p.log.display(), log_tail(&p.log, 20));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(procs)
}

/// Scrapes each process's `/metrics`, then stops them: SIGTERM by PID, SIGKILL after 60 s.
pub(super) async fn stop_procs(procs: Vec<Proc>) -> Result<BTreeMap<String, WorkerStats>> {
    let mut stats = BTreeMap::new();
    for p in &procs {
        match http_get(p.port, "/metrics", HTTP_TIMEOUT).await {
            Some((200, text)) => stats.extend(worker_stats(&text, &p.name, &p.workers)),
            other => warn!(process = %p.name, answer = ?other.map(|(c, _)| c), "could not read /metrics"),
        }
    }
    for p in &procs {
        if let Some(pid) = p.child.id() {
            let status = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status().context("running kill -TERM")?;
            if !status.success() {
                warn!(process = %p.name, pid, "kill -TERM failed");
            }
        }
    }
    for mut p in procs {
        match tokio::time::timeout(Duration::from_secs(60), p.child.wait()).await {
            Ok(Ok(s)) if s.success() => info!(process = %p.name, "worker process stopped"),
            Ok(Ok(s)) => warn!(process = %p.name, status = %s, log = %p.log.display(), "worker process exited non-zero"),
            Ok(Err(e)) => warn!(process = %p.name, error = %e, "waiting for the worker process"),
            Err(_) => {
                warn!(process = %p.name, "no exit 60 s after SIGTERM: killing it");
                let _ = p.child.kill().await;
            }
        }
    }
    Ok(stats)
}

// ------------------------------------------------------------------ the rig

/// Topics whose writes are counted, with their partitions: every declared topic, every
/// dead-letter topic (its source's partitions) and every worker's changelog (its inputs').
pub(super) fn counted_topics(t: &Topology) -> Vec<(String, i32)> {
    let parts = |topic: &str| t.topics.get(topic).map(|s| s.partitions).unwrap_or(1);
    let mut out: Vec<(String, i32)> = t.topics.iter().map(|(n, s)| (n.clone(), s.partitions)).collect();
    for (dlq, sources) in t.dead_letter_topics() {
        let p = sources.iter().next().map(|s| parts(s)).unwrap_or(1);
        out.push((dlq, p));
    }
    for (name, w) in t.workers.iter().filter(|(_, w)| !w.is_source()) {
        out.push((orderflow_runtime::changelog::topic(name), w.inputs.first().map(|i| parts(i)).unwrap_or(1)));
    }
    out
}

pub(super) fn snapshot(client: &BaseConsumer, topics: &[(String, i32)]) -> Result<BTreeMap<String, i64>> {
    topics.iter().map(|(t, p)| Ok((t.clone(), high_watermarks(client, t, *p)?))).collect()
}

/// Waits until no counted topic grows for 2 s (at most `max`); returns the last snapshot.
pub(super) async fn quiesce(client: &BaseConsumer, topics: &[(String, i32)], max: Duration) -> Result<BTreeMap<String, i64>> {
    let give_up = Instant::now() + max;
    let mut last = snapshot(client, topics)?;
    let mut stable_since = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = snapshot(client, topics)?;
        if now != last {
            last = now;
            stable_since = Instant::now();
        } else if stable_since.elapsed() >= Duration::from_secs(2) {
            return Ok(last);
        }
        if Instant::now() > give_up {
            warn!("the broker did not go quiet within {max:?}");
            return Ok(last);
        }
    }
}

/// Everything a scenario runs on: the workers, the observer/POS, the producer.
pub(super) struct Rig {
    pub(super) loaded: Arc<Loaded>,
    pub(super) codec: Arc<Codec>,
    pub(super) producer: FutureProducer,
    pub(super) book: Arc<Mutex<Book>>,
    pub(super) orders: Arc<Orders>,
    pub(super) pos: Arc<PosCounts>,
    pub(super) procs: Vec<Proc>,
    pub(super) observer: tokio::task::JoinHandle<()>,
    pub(super) watermarks: BaseConsumer,
    pub(super) counted: Vec<(String, i32)>,
    pub(super) run_dir: PathBuf,
    pub(super) workers_ready_s: f64,
    pub(super) stock_applied_s: f64,
    pub(super) stock_lines: usize,
}

impl Rig {
    /// Loads the topology (copying it with `--commit-interval`), checks the broker is empty,
    /// creates the topics, starts the workers, the observer and the POS, and applies the initial
    /// stock.
    pub(super) async fn start(args: &SagaArgs) -> Result<Rig> {
        let c = &args.common;
        let run_dir = args.state_dir.clone().unwrap_or_else(|| {
            PathBuf::from("target/bench/state").join(format!("saga-{:?}-{}-{}", args.measure, args.mode.as_str(), now_ms()).to_lowercase())
        });
        let run_dir = std::path::absolute(&run_dir).with_context(|| format!("resolving {}", run_dir.display()))?;
        std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
        let mut topology_path = c.topology.clone();
        if let Some(ci) = c.commit_interval {
            let original = crate::topology::load_topology(&c.topology, c.bootstrap.as_deref())?;
            let avro = std::path::absolute(original.avro_dir())?;
            let text = std::fs::read_to_string(&c.topology).with_context(|| format!("reading {}", c.topology.display()))?;
            topology_path = run_dir.join("topology.toml");
            std::fs::write(&topology_path, topology_copy(&text, ci, &avro))
                .with_context(|| format!("writing {}", topology_path.display()))?;
        }
        let mut loaded = crate::topology::load_topology(&topology_path, c.bootstrap.as_deref())
            .with_context(|| format!("loading {}", topology_path.display()))?;
        loaded.topology.defaults.state_dir = run_dir.join("state");
        let loaded = Arc::new(loaded);
        let t = &loaded.topology;
        if let Some(ci) = c.commit_interval {
            for (name, w) in &t.workers {
                if w.commit_interval(&t.defaults) != ci {
                    warn!(worker = %name, "the worker sets its own commit_interval: --commit-interval does not apply to it");
                }
            }
        }

        let watermarks = watermark_client(&t.broker, "orderflow-bench-saga-watermarks")?;
        create_topics(t).await.context("creating topics")?;
        let previous = high_watermarks(&watermarks, "order.created", t.topics.get("order.created").map(|s| s.partitions).unwrap_or(1))?;
        if previous > 0 {
            bail!("order.created already holds {previous} records: the saga benchmark needs an empty broker (scripts/bench starts a fresh one per scenario)");
        }
        let counted = counted_topics(t);

        let codec = Arc::new(Codec::load(&loaded.avro_dir(), t.broker.registry_url.as_deref())?);
        let producer: FutureProducer = client_config(&t.broker, Side::Producer).create()?;
        let input = tpch::generate(&tpch::TpchOptions {
            scale_factor: POOL_SCALE_FACTOR,
            max_orders: None,
            stock_scale: args.stock_scale,
            // Every unit at the stores: the saga benchmark measures the store-level path (the
            // HQ fallback has its own scenario, `bench hierarchy`).
            hq_share: 0.0,
            base_time_ms: now_ms(),
        });
        let orders = Arc::new(Orders { pool: input.orders });

        let spawned = Instant::now();
        let procs = spawn_procs(args.mode, &topology_path, t, &run_dir).await?;
        let workers_ready_s = spawned.elapsed().as_secs_f64();
        info!(seconds = workers_ready_s, processes = procs.len(), "workers ready");

        let book = Arc::new(Mutex::new(Book::default()));
        let pos = Arc::new(PosCounts::default());
        let observer = spawn_observer(
            t,
            SagaTopics::of(t)?,
            codec.clone(),
            producer.clone(),
            book.clone(),
            orders.clone(),
            pos.clone(),
            args.complete_pct,
        )?;

        // The initial stock, applied before any order (orders and stock travel on different topics).
        let stock_lines: usize = input.inventory.iter().map(|i| i.items.iter().map(|x| &x.product_id).collect::<BTreeSet<_>>().len()).sum();
        let stock_started = Instant::now();
        for inv in &input.inventory {
            send(&producer, &codec, "inventory.adjusted", &store_key(&inv.hq_id, &inv.store_id), &Event::InventoryAdjusted(inv.clone()))
                .await?;
        }
        loop {
            let applied = book.lock().expect("book").stock_lines;
            if applied >= stock_lines {
                break;
            }
            if stock_started.elapsed() > Duration::from_secs(180) {
                bail!("the initial stock was not applied within 180 s ({applied} of {stock_lines} stock lines)");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let stock_applied_s = stock_started.elapsed().as_secs_f64();
        info!(stock_lines, seconds = stock_applied_s, "initial stock applied");
        Ok(Rig {
            loaded,
            codec,
            producer,
            book,
            orders,
            pos,
            procs,
            observer,
            watermarks,
            counted,
            run_dir,
            workers_ready_s,
            stock_applied_s,
            stock_lines,
        })
    }

    fn topology(&self) -> &Topology {
        &self.loaded.topology
    }

    pub(super) fn commit_intervals(&self) -> BTreeMap<String, u64> {
        let t = self.topology();
        t.workers.iter().map(|(n, w)| (n.clone(), w.commit_interval(&t.defaults).as_millis() as u64)).collect()
    }

    /// Each worker's processing guarantee (the topology's, after `ORDERFLOW_PROFILE`).
    pub(super) fn guarantees(&self) -> BTreeMap<String, &'static str> {
        let t = self.topology();
        t.workers.iter().map(|(n, w)| (n.clone(), w.guarantee(&t.defaults).as_str())).collect()
    }

    pub(super) fn settings(&self) -> Settings {
        let t = self.topology();
        let partitions = t.topics.get("order.created").map(|s| s.partitions).unwrap_or(1);
        settings(t, t.defaults.commit_interval, t.defaults.max_batch, partitions)
    }

    /// Encodes order `seq`, created now, and records it in the book.
    pub(super) async fn next_order(&self, seq: u64, load: usize, measured: bool) -> Result<(String, Vec<u8>)> {
        let mut o = self.orders.nth(seq);
        let created_ms = now_ms();
        o.occurred_at = created_ms;
        let bytes = self.codec.encode("order.created", &Event::OrderCreated(o.clone())).await?;
        self.book.lock().expect("book").orders.insert(o.order_id.clone(), Track::new(seq, created_ms, load, measured));
        Ok((o.order_id, bytes))
    }

    /// Stops the workers and the observer; returns the workers' statistics.
    pub(super) async fn stop(self) -> Result<(BTreeMap<String, WorkerStats>, BaseConsumer, PathBuf)> {
        let stats = stop_procs(self.procs).await?;
        self.observer.abort();
        Ok((stats, self.watermarks, self.run_dir))
    }
}
