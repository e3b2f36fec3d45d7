//! The command line of `orderflow` ([`Cli`]) and its dispatch to the command modules ([`run`]):
//! the binary (`src/main.rs`) only parses the arguments and calls [`run`].

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::{bench, demo, dlq, doctor, inspect, outbox, reconcile, replay, schemas, skip, topology};

/// The command line of the `orderflow` binary.
#[derive(Parser)]
#[command(name = "orderflow", version, about = "Kafka order and inventory saga workers")]
pub struct Cli {
    /// Log as JSON lines (for log shippers) instead of human-readable text.
    #[arg(long, global = true, env = "ORDERFLOW_LOG_JSON")]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

/// The subcommands.
#[derive(Subcommand)]
pub enum Command {
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
    /// Reconcile the stock reserver's state as its changelog holds it (seed 004 재고 대사): on hand
    /// = initial + adjustments − sales, reserved = Σ live reservations, nothing negative; exit 1
    /// on any mismatch.
    Reconcile(reconcile::ReconcileArgs),
    /// Check a live broker against the topology: partition counts as declared, and the external
    /// topics' records keyed and partitioned as orderflow's partitioner would (a sample of each
    /// partition); exit 1 on any problem.
    Doctor(doctor::DoctorArgs),
    /// The event schemas as other languages and a schema registry see them: fingerprints
    /// (spec-exact and legacy), registration under the configured compatibility level, and a
    /// compatibility check against the registry (exit 1 on an incompatible change).
    Schemas(schemas::SchemasArgs),
    /// Move a stopped worker past records of one input partition it cannot get past (a stalled
    /// partition): audited (each record dead-lettered as `skipped` with --operator and --reason
    /// before anything moves), refused while any instance of the worker runs.
    Skip(skip::SkipArgs),
    /// The transactional outbox (seed 003): list rows (quarantined by default), show one, requeue
    /// quarantined rows once their cause is fixed.
    Outbox(outbox::OutboxArgs),
    /// Admin stock movements (seed 004): restock, distribute (HQ → store), transfer (store →
    /// store), correct; checked, then published to inventory.adjusted (--dry-run: printed only).
    Inventory(crate::inventory::InventoryArgs),
    /// The inventory HTTP API of seed 004 (issue 17): stock queries from a read replica of the
    /// stock reserver's state; OpenAPI at /api/v1/openapi.json, /healthz, /readyz, /metrics.
    Api(crate::api::ApiArgs),
    /// Throughput benchmarks against the local broker (raw baseline, one worker); one JSON
    /// object per scenario on stdout. `scripts/bench` runs them all.
    Bench(bench::BenchArgs),
}

/// `orderflow topology` actions.
#[derive(Subcommand)]
pub enum TopologyAction {
    /// Report every problem of the topology at once; exit 1 if there is any.
    Check { file: PathBuf },
    /// Print the wiring as a Mermaid flowchart.
    Graph { file: PathBuf },
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`, librdkafka warnings only), as text or
/// JSON lines.
fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,librdkafka=warn,rdkafka=warn".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Runs the parsed command line: sets up logging, then runs the command. The error, if any, is
/// the process's (`main` prints it and exits 1).
pub async fn run(cli: Cli) -> Result<()> {
    init_logging(cli.log_json);
    match cli.command {
        Command::Topology { action: TopologyAction::Check { file } } => topology::check(&file),
        Command::Topology { action: TopologyAction::Graph { file } } => topology::graph(&file),
        Command::Topics { topology, bootstrap } => topology::create_topics(&topology, bootstrap.as_deref()).await,
        Command::Run { topology, workers, instance, metrics_addr, bootstrap, reservation_ttl, grace_period } => {
            crate::run::run(crate::run::RunOptions { topology, workers, instance, metrics_addr, bootstrap, reservation_ttl, grace_period })
                .await
        }
        Command::Demo(args) => demo::run(args).await,
        Command::Dlq(args) => dlq::run(args).await,
        Command::Tap(args) => inspect::tap(args).await,
        Command::Trace(args) => inspect::trace(args).await,
        Command::Replay(args) => replay::run(args).await,
        Command::Reconcile(args) => reconcile::run(args).await,
        Command::Bench(args) => bench::run(args).await,
        Command::Doctor(args) => doctor::run(args).await,
        Command::Schemas(args) => schemas::run(args).await,
        Command::Skip(args) => skip::run(args).await,
        Command::Inventory(args) => crate::inventory::run(args).await,
        Command::Outbox(args) => outbox::run(args).await,
        Command::Api(args) => crate::api::run(args).await,
    }
}
