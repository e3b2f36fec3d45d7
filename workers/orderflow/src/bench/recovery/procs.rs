//! The worker under test as a child process: spawn, SIGKILL, wait for `/readyz`, read its consumed
//! count; a restart measured to ready and to processing.

use std::fs::File;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context as _, Result};
use orderflow_api::Event;
use tracing::info;

use crate::bench::{free_port, http_get, log_tail, metric_by_label, metric_sum, order, Rng};

use super::{memory, phases, produce, read_log, restore_log, wall, Ctx, Kind, Proc, Restart, RestoreMetrics, HTTP_TIMEOUT, INSTANCE, POLL};

/// Spawns `orderflow --log-json run --worker name` on a free port with `state_dir`.
pub(super) fn spawn(ctx: &mut Ctx, name: &str, state_dir: &Path, what: &str) -> Result<Proc> {
    ctx.spawns += 1;
    let port = free_port()?;
    let log = ctx.work_dir.join("logs").join(format!("{:02}-{name}-{what}.log", ctx.spawns));
    let exe = std::env::current_exe().context("locating the orderflow binary")?;
    let spawned_wall = SystemTime::now();
    let spawned = Instant::now();
    let child = Command::new(exe)
        .args(["--log-json", "run", "--topology"])
        .arg(&ctx.topology)
        .args(["--worker", name, "--instance", INSTANCE, "--bootstrap", &ctx.bootstrap])
        .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
        .env("ORDERFLOW_STATE_DIR", state_dir)
        // `ORDERFLOW_BENCH_WORKER_LOG`: the workers' `RUST_LOG` (e.g. librdkafka's debug lines).
        .env("RUST_LOG", std::env::var("ORDERFLOW_BENCH_WORKER_LOG").unwrap_or_else(|_| "info,librdkafka=warn,rdkafka=warn".into()))
        .env_remove("ORDERFLOW_INSTANCE")
        .env_remove("ORDERFLOW_METRICS_ADDR")
        .env_remove("ORDERFLOW_LOG_JSON")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(File::create(&log).with_context(|| format!("creating {}", log.display()))?))
        .spawn()
        .with_context(|| format!("spawning orderflow run --worker {name}"))?;
    info!(worker = name, pid = child.id(), port, log = %log.display(), "worker process started");
    Ok(Proc { child, port, log, spawned_wall, spawned })
}

impl Drop for Proc {
    /// A worker process never outlives the bench (an error on the way included).
    fn drop(&mut self) {
        stop(self);
    }
}

/// SIGKILLs the process (`Child::kill` sends SIGKILL on Unix, to this child's pid) and reaps it;
/// a no-op once it is reaped.
pub(super) fn stop(proc: &mut Proc) {
    let _ = proc.child.kill();
    let _ = proc.child.wait();
}

/// Fails when the process exited.
pub(super) fn check_alive(proc: &mut Proc) -> Result<()> {
    if let Some(status) = proc.child.try_wait()? {
        bail!("worker process exited ({status}); log {}:\n{}", proc.log.display(), log_tail(&proc.log, 15));
    }
    Ok(())
}

pub(super) async fn wait_ready(ctx: &Ctx, proc: &mut Proc) -> Result<()> {
    let until = Instant::now() + ctx.restart_timeout;
    loop {
        check_alive(proc)?;
        if matches!(http_get(proc.port, "/readyz", HTTP_TIMEOUT).await, Some((200, _))) {
            return Ok(());
        }
        if Instant::now() > until {
            bail!("worker not ready within {:?}; log {}:\n{}", ctx.restart_timeout, proc.log.display(), log_tail(&proc.log, 15));
        }
        tokio::time::sleep(POLL * 5).await;
    }
}

/// Records the worker process consumed (every input and outcome), from its `/metrics`.
pub(super) async fn consumed(proc: &Proc) -> Option<f64> {
    match http_get(proc.port, "/metrics", HTTP_TIMEOUT).await {
        Some((200, body)) => Some(metric_sum(&body, "orderflow_events_consumed_total")),
        _ => None,
    }
}

/// SIGKILLs `proc`, deletes its sled directory when `rebuild`, starts the worker again, offers
/// one new input record and measures until it is processed.
pub(super) async fn restart(
    ctx: &mut Ctx,
    mut proc: Proc,
    name: &str,
    kind: Kind,
    state_dir: &Path,
    rebuild: bool,
) -> Result<(Proc, Restart)> {
    let what = if rebuild { "rebuild" } else { "local" };
    let killed = Instant::now();
    stop(&mut proc);
    let delete_s = if rebuild {
        let t = Instant::now();
        let dir = state_dir.join(name);
        std::fs::remove_dir_all(&dir).with_context(|| format!("deleting {}", dir.display()))?;
        Some(t.elapsed().as_secs_f64())
    } else {
        None
    };
    let mut p = spawn(ctx, name, state_dir, what)?;
    // The record offered after the restart: an order (for the stock reserver: of a stocked
    // store and products, so it is reserved).
    ctx.probes += 1;
    let mut rng = Rng(ctx.probes);
    let o = order(1_000_000_000_000 + ctx.probes, &mut rng, ctx.now);
    let e = Event::OrderCreated(o);
    let key = match kind {
        Kind::StockReserver => e.store_key(),
        Kind::Deduplicator => e.order_id().unwrap_or_default().to_string(),
    };
    produce(ctx, vec![(kind.input().to_string(), key, e)]).await?;

    let until = Instant::now() + ctx.restart_timeout;
    let mut ready: Option<(Instant, SystemTime)> = None;
    let processed = loop {
        check_alive(&mut p)?;
        if ready.is_none() && matches!(http_get(p.port, "/readyz", HTTP_TIMEOUT).await, Some((200, _))) {
            ready = Some((Instant::now(), SystemTime::now()));
        }
        if ready.is_some() && consumed(&p).await.is_some_and(|n| n >= 1.0) {
            break Instant::now();
        }
        if Instant::now() > until {
            bail!(
                "{what} restart of {name}: ready {}, record not processed within {:?}; log {}:\n{}",
                ready.is_some(),
                ctx.restart_timeout,
                p.log.display(),
                log_tail(&p.log, 15)
            );
        }
        tokio::time::sleep(POLL).await;
    };
    let (ready_at, ready_wall) = ready.expect("ready before processed");
    let memory = memory(p.child.id())?;
    // "worker ready" is logged just after the flag turns: give it a moment to be written.
    let mut lines = Vec::new();
    for _ in 0..100 {
        lines = read_log(&p.log);
        if lines.iter().any(|l| l.message == "worker ready") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let text = match http_get(p.port, "/metrics", HTTP_TIMEOUT).await {
        Some((200, body)) => body,
        _ => String::new(),
    };
    let restore_metrics = RestoreMetrics {
        records: metric_sum(&text, "orderflow_state_restored_records_total"),
        seconds: metric_by_label(&text, "orderflow_state_restore_seconds_sum", "source"),
    };
    let mut phases = phases(&lines, wall(p.spawned_wall), wall(ready_wall));
    phases.ready_to_processed_s = processed.duration_since(ready_at).as_secs_f64();
    let r = Restart {
        kind: what,
        delete_s,
        start_to_ready_s: ready_at.duration_since(p.spawned).as_secs_f64(),
        kill_to_ready_s: ready_at.duration_since(killed).as_secs_f64(),
        kill_to_processed_s: processed.duration_since(killed).as_secs_f64(),
        phases,
        restore: restore_log(&lines),
        restore_metrics,
        memory,
        log: p.log.display().to_string(),
    };
    Ok((p, r))
}
