//! `orderflow run`: runs workers of the topology as tasks of this process ([`spawn_workers`],
//! also used by `demo`) until SIGTERM / Ctrl-C, with the health and metrics endpoints of
//! [`serve`]; a signal lets the units in flight finish within the grace period.

pub mod serve;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context as _, Result};
use orderflow_kinds as kinds;
use orderflow_runtime::codec::Codec;
use orderflow_runtime::metrics::Metrics;
use orderflow_runtime::topology::Loaded;
use orderflow_runtime::worker::{log_exit, Worker, WorkerSetup};
use tokio::sync::watch;
use tracing::info;

use crate::topology::{load_topology, override_ttl};

/// The flags of `orderflow run` (see `crate::cli::Command::Run`).
pub struct RunOptions {
    pub topology: PathBuf,
    /// Workers to run; all when empty.
    pub workers: Vec<String>,
    pub instance: String,
    pub metrics_addr: Option<SocketAddr>,
    pub bootstrap: Option<String>,
    pub reservation_ttl: Option<std::time::Duration>,
    pub grace_period: std::time::Duration,
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
        if let Some(config) = kinds::relay_config(spec) {
            let setup = relay_setup(&loaded, &name, config, instance, codec.clone(), metrics.clone(), ready.worker())?;
            let mut rx = shutdown.clone();
            let n = name.clone();
            handles.push((
                name,
                tokio::spawn(async move {
                    let r = match outbox_relay::Relay::start(setup, &mut rx).await {
                        Ok(Some(relay)) => relay.run(rx).await,
                        Ok(None) => Ok(()),
                        Err(e) => Err(e),
                    };
                    if let Err(e) = &r {
                        tracing::error!(worker = %n, error = %e, "outbox relay failed");
                    }
                    r.map_err(|e| orderflow_runtime::worker::WorkerError::Source(e.to_string()))
                }),
            ));
            continue;
        }
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

/// The setup of outbox-relay worker `name` (issue 15): its `out` topic and that topic's key field,
/// the topology's broker, guarantee and record headers.
///
/// Errors: the `out` port is not wired.
pub(crate) fn relay_setup(
    loaded: &Loaded,
    name: &str,
    config: outbox_relay::Config,
    instance: &str,
    codec: Arc<Codec>,
    metrics: Metrics,
    ready: Arc<std::sync::atomic::AtomicBool>,
) -> Result<outbox_relay::RelaySetup> {
    let t = &loaded.topology;
    let spec = &t.workers[name];
    let topic = spec.outputs.get("out").with_context(|| format!("worker {name}: output port `out` is not wired"))?.clone();
    let key_field = t.topics.get(&topic).map(|s| s.key.clone()).filter(|k| !k.contains(':'));
    let mut config = config;
    config.database_url = config.url_in(&t.defaults.state_dir);
    Ok(outbox_relay::RelaySetup {
        name: name.to_string(),
        topic,
        key_field,
        config,
        broker: t.broker.clone(),
        guarantee: spec.guarantee(&t.defaults),
        group: spec.group_id(name),
        instance: instance.to_string(),
        codec,
        metrics,
        record_headers: t.defaults.record_headers,
        ready,
    })
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn terminate_signal() {
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

/// `orderflow run`: starts the workers and the endpoints, waits for a signal or a worker's end,
/// then stops every worker within the grace period (a second signal exits at once, code 130).
///
/// Errors: topology, worker start-up; a worker that failed or panicked; workers not stopped
/// within the grace period.
pub async fn run(opts: RunOptions) -> Result<()> {
    let RunOptions { topology, workers, instance, metrics_addr, bootstrap, reservation_ttl, grace_period } = opts;
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
