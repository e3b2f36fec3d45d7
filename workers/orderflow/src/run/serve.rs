//! The HTTP endpoints of a worker process: `/metrics` (Prometheus text format), `/healthz`
//! (process alive) and `/readyz` (every worker of the process has its assigned partitions
//! restored and is processing).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::{extract::State, http::StatusCode, routing::get, Router};
use orderflow_runtime::metrics::Metrics;

/// Readiness of the workers of this process: ready when every one is.
#[derive(Clone, Default)]
pub struct Readiness {
    workers: Arc<Mutex<Vec<Arc<AtomicBool>>>>,
}

impl Readiness {
    /// A new flag for one worker, initially not ready.
    pub fn worker(&self) -> Arc<AtomicBool> {
        let flag = Arc::new(AtomicBool::new(false));
        self.workers.lock().expect("readiness").push(flag.clone());
        flag
    }

    /// True when at least one worker runs and all are ready.
    pub fn is_ready(&self) -> bool {
        let workers = self.workers.lock().expect("readiness");
        !workers.is_empty() && workers.iter().all(|w| w.load(Ordering::Relaxed))
    }
}

/// Shared state of the endpoints.
#[derive(Clone)]
pub struct Health {
    pub metrics: Metrics,
    pub ready: Readiness,
}

/// Serves the endpoints on `addr` until the process ends.
///
/// Errors: the address cannot be bound.
pub async fn serve(addr: SocketAddr, health: Health) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(|State(h): State<Health>| async move { h.metrics.render() }))
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|State(h): State<Health>| async move {
                if h.ready.is_ready() {
                    (StatusCode::OK, "ready")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "not ready")
                }
            }),
        )
        .with_state(health);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, app).await
}
