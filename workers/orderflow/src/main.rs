//! `orderflow`: run saga workers, check and draw the topology, create topics, run the demo.

mod bench;
mod bench_recovery;
mod bench_saga;
mod demo;
mod dlq;
mod inspect;
mod replay;
mod replay_through;
mod serve;
mod tpch;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};
use orderflow_kinds as kinds;
use orderflow_runtime::codec::Codec;
use orderflow_runtime::metrics::Metrics;
use orderflow_runtime::topology::{self, Loaded};
use orderflow_runtime::worker::{log_exit, Worker, WorkerSetup};
use tokio::sync::watch;
use tracing::info;

#[derive(Parser)]
#[command(name = "orderflow", version, about = "Kafka order and inventory saga workers")]
struct Cli {
    /// Log as JSON lines (for log shippers) instead of human-readable text.
    #[arg(long, global = true, env = "ORDERFLOW_LOG_JSON")]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run workers of the topology until SIGTERM / Ctrl-C.
    Run {
        #[arg(long, default_value = "topology.toml", env = "ORDERFLOW_TOPOLOGY")]
        topology: PathBuf,
        /// Worker to run (repeatable); all workers when omitted.
        #[arg(long = "worker")]
        workers: Vec<String>,
        /// Instance id within each worker's consumer group (the pod name); names the state dir.
        #[arg(long, env = "ORDERFLOW_INSTANCE", default_value = "0")]
        instance: String,
        /// Address of /metrics, /healthz and /readyz.
        #[arg(long, env = "ORDERFLOW_METRICS_ADDR")]
        metrics_addr: Option<SocketAddr>,
        /// Bootstrap servers (overrides the topology and ORDERFLOW_BOOTSTRAP).
        #[arg(long)]
        bootstrap: Option<String>,
        /// Reservation TTL for every worker that uses one (overrides the topology; tests and
        /// demos use short TTLs).
        #[arg(long, value_parser = humantime::parse_duration)]
        reservation_ttl: Option<std::time::Duration>,
        /// After SIGTERM / Ctrl-C, how long the units in flight may take to finish before the
        /// process gives up and exits non-zero. A second signal exits at once.
        #[arg(long, env = "ORDERFLOW_GRACE_PERIOD", default_value = "30s", value_parser = humantime::parse_duration)]
        grace_period: std::time::Duration,
    },
    /// Check or draw the topology.
    Topology {
        #[command(subcommand)]
        action: TopologyAction,
    },
    /// Create the topics the topology declares (and each input's dead-letter topic).
    Topics {
        #[arg(long, default_value = "topology.toml")]
        topology: PathBuf,
        #[arg(long)]
        bootstrap: Option<String>,
    },
    /// The main job: TPC-H orders and the seed scenarios through the whole saga, with a summary.
    Demo(demo::DemoArgs),
    /// Dead-letter records: list them, show one, redrive them once the cause is fixed.
    Dlq(dlq::DlqArgs),
    /// Print a topic's records as JSON lines, decoded, filtered by key and fields; --follow to tail it.
    Tap(inspect::TapArgs),
    /// One order's timeline across the saga's topics, with its state after each event.
    Trace(inspect::TraceArgs),
    /// Replay a range of a topic (by offsets or time): republish it --into a topic, or run it
    /// --through a worker. Safe into a live topic: every worker deduplicates by eventId.
    Replay(replay::ReplayArgs),
    /// Throughput benchmarks against the local broker (raw baseline, one worker); one JSON
    /// object per scenario on stdout. `scripts/bench` runs them all.
    Bench(bench::BenchArgs),
}

#[derive(Subcommand)]
enum TopologyAction {
    /// Report every problem of the topology at once; exit 1 if there is any.
    Check { file: PathBuf },
    /// Print the wiring as a Mermaid flowchart.
    Graph { file: PathBuf },
}

/// Loads and checks the topology, applying a `--bootstrap` override.
pub fn load_topology(path: &Path, bootstrap: Option<&str>) -> Result<Loaded> {
    let mut loaded = topology::load_checked(path, kinds::KINDS)?;
    if let Some(b) = bootstrap {
        loaded.topology.broker.bootstrap = b.to_string();
    }
    Ok(loaded)
}

/// Sets the reservation TTL of every worker whose kind uses one.
pub fn override_ttl(loaded: &mut Loaded, ttl: std::time::Duration) {
    for w in loaded.topology.workers.values_mut() {
        kinds::set_reservation_ttl(w, ttl);
    }
}

/// A spawned worker task.
pub type WorkerHandle = tokio::task::JoinHandle<Result<(), orderflow_runtime::worker::WorkerError>>;

/// Starts the named workers (all when empty) as tasks of this process; returns their handles.
pub async fn spawn_workers(
    loaded: Arc<Loaded>,
    names: &[String],
    instance: &str,
    metrics: Metrics,
    ready: &serve::Readiness,
    shutdown: watch::Receiver<bool>,
) -> Result<Vec<(String, WorkerHandle)>> {
    let t = &loaded.topology;
    let names: Vec<String> = if names.is_empty() { t.workers.keys().cloned().collect() } else { names.to_vec() };
    let codec = Arc::new(Codec::load(&loaded.avro_dir(), t.broker.registry_url.as_deref())?);
    let mut handles = Vec::new();
    for name in names {
        let spec = t.workers.get(&name).with_context(|| format!("worker {name} is not in the topology"))?;
        let processor = kinds::build(spec).with_context(|| format!("worker {name}: unknown kind {}", spec.kind))?;
        let ports = kinds::ports(&spec.kind).expect("known kind");
        let worker = Worker::new(WorkerSetup {
            name: name.clone(),
            topology: loaded.clone(),
            processor,
            ports,
            codec: codec.clone(),
            metrics: metrics.clone(),
            instance: instance.to_string(),
            ready: ready.worker(),
        })
        .await?;
        let rx = shutdown.clone();
        let n = name.clone();
        handles.push((
            name,
            tokio::spawn(async move {
                let r = worker.run(rx).await;
                log_exit(&n, &r);
                r
            }),
        ));
    }
    Ok(handles)
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,librdkafka=warn,rdkafka=warn".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Resolves on SIGTERM or Ctrl-C.
async fn terminate_signal() {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_json);
    match cli.command {
        Command::Topology { action: TopologyAction::Check { file } } => {
            let loaded = topology::load(&file)?;
            let problems = topology::check(&loaded, kinds::KINDS);
            if problems.is_empty() {
                println!("{}: ok ({} topics, {} workers)", file.display(), loaded.topology.topics.len(), loaded.topology.workers.len());
                Ok(())
            } else {
                for p in &problems {
                    eprintln!("error: {p}");
                }
                bail!("{}: {} problem(s)", file.display(), problems.len())
            }
        }
        Command::Topology { action: TopologyAction::Graph { file } } => {
            let loaded = topology::load(&file)?;
            print!("{}", topology::mermaid(&loaded.topology));
            Ok(())
        }
        Command::Topics { topology, bootstrap } => {
            let loaded = load_topology(&topology, bootstrap.as_deref())?;
            let created = orderflow_runtime::kafka::create_topics(&loaded.topology).await?;
            println!("created {} topic(s): {}", created.len(), created.join(", "));
            Ok(())
        }
        Command::Run { topology, workers, instance, metrics_addr, bootstrap, reservation_ttl, grace_period } => {
            let mut loaded = load_topology(&topology, bootstrap.as_deref())?;
            if let Some(ttl) = reservation_ttl {
                override_ttl(&mut loaded, ttl);
            }
            let loaded = Arc::new(loaded);
            let metrics = Metrics::new();
            let ready = serve::Readiness::default();
            if let Some(addr) = metrics_addr {
                let health = serve::Health { metrics: metrics.clone(), ready: ready.clone() };
                tokio::spawn(async move {
                    if let Err(e) = serve::serve(addr, health).await {
                        tracing::error!(error = %e, %addr, "metrics endpoint failed");
                    }
                });
            }
            let (tx, rx) = watch::channel(false);
            let handles = spawn_workers(loaded, &workers, &instance, metrics, &ready, rx).await?;
            let mut failed = None;
            let mut joins: futures::stream::FuturesUnordered<_> = handles.into_iter().map(|(n, h)| async move { (n, h.await) }).collect();
            use futures::StreamExt;
            tokio::select! {
                _ = terminate_signal() => info!(grace = %humantime::format_duration(grace_period), "signal received; finishing the units in flight"),
                Some((name, r)) = joins.next() => { failed = Some((name, r)); }
            }
            let _ = tx.send(true);
            let drain = async {
                while let Some((name, r)) = joins.next().await {
                    if failed.is_none() && !matches!(r, Ok(Ok(()))) {
                        failed = Some((name, r));
                    }
                }
            };
            tokio::select! {
                _ = drain => {}
                _ = terminate_signal() => {
                    tracing::warn!("second signal: exiting at once");
                    std::process::exit(130);
                }
                _ = tokio::time::sleep(grace_period) => {
                    bail!("workers did not stop within the grace period of {}", humantime::format_duration(grace_period));
                }
            }
            match failed {
                Some((name, Ok(Err(e)))) => bail!("worker {name} failed: {e}"),
                Some((name, Err(e))) => bail!("worker {name} panicked: {e}"),
                _ => Ok(()),
            }
        }
        Command::Demo(args) => demo::run(args).await,
        Command::Dlq(args) => dlq::run(args).await,
        Command::Tap(args) => inspect::tap(args).await,
        Command::Trace(args) => inspect::trace(args).await,
        Command::Replay(args) => replay::run(args).await,
        Command::Bench(args) => bench::run(args).await,
    }
}
