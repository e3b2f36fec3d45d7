//! `orderflow api`: the inventory HTTP API of seed 004 (issue 17), a stateless Deployment of its
//! own beside the workers.
//!
//! **Reads from the reserver's state, not a second database.** The API keeps a read replica of
//! the stock reserver's state store ([`orderflow_runtime::replica`]): it tails the reserver's
//! changelog topic (compacted, `read_committed`) and applies each unit when its commit marker
//! arrives, so a query sees committed state only, at most the reserver's commit interval plus
//! one fetch behind. Chosen over interactive queries routed to the owning reserver instance
//! (Kafka Streams' `application.server`): the workers stay free of HTTP request load and of a
//! membership protocol, any API replica answers any store, and the changelog already holds
//! exactly the figures to serve. The cost: every API replica holds the stock and reservation
//! records in memory.
//!
//! Endpoints (JSON; errors `{"error", "field", "message"}`, never a stack trace):
//! - `GET /api/v1/stores/{storeId}/products/{productId}/stock[?hqId=]` → [`stock::StockView`];
//! - `GET /api/v1/openapi.json`: the OpenAPI document, generated from the handlers;
//! - `/healthz` (alive), `/readyz` (the replica has caught up), `/metrics` (Prometheus:
//!   `orderflow_api_requests_total{route,status}`, `orderflow_api_request_seconds{route}`,
//!   `orderflow_api_replica_lag_records`, `orderflow_api_replica_staleness_seconds`; the families
//!   are listed in `deploy/metrics-api.txt` for the dashboard and alerts).

pub mod admin;
pub mod error;
pub mod reserve;
pub mod stock;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context as _, Result};
use axum::extract::{MatchedPath, Path, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use orderflow_runtime::replica::Replica;
use prometheus::{Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};
use serde::Deserialize;
use utoipa::OpenApi;

use self::error::{ApiError, ErrorBody};
use self::stock::{check_id, StockView};
use crate::topology::load_topology;

/// `orderflow api` flags.
#[derive(clap::Args, Debug)]
pub struct ApiArgs {
    #[arg(long, default_value = "topology.toml", env = "ORDERFLOW_TOPOLOGY")]
    topology: PathBuf,
    /// Bootstrap servers (overrides the topology and ORDERFLOW_BOOTSTRAP).
    #[arg(long)]
    bootstrap: Option<String>,
    /// Address to serve on.
    #[arg(long, default_value = "0.0.0.0:8080", env = "ORDERFLOW_API_ADDR")]
    listen: SocketAddr,
    /// The stock reserver whose state is served (default: the topology's one of kind `stock-reserver`).
    #[arg(long)]
    worker: Option<String>,
    /// File holding the admin bearer token (else ORDERFLOW_API_ADMIN_TOKEN; neither: admin
    /// routes answer 401).
    #[arg(long)]
    admin_token_file: Option<PathBuf>,
}

/// Largest request body, bytes (413 above it).
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Topics the API produces to (the topology's external topics for each schema).
#[derive(Clone, Debug)]
pub struct Topics {
    pub order_created: String,
    pub order_cancelled: String,
    pub inventory_adjusted: String,
}

/// Encodes and produces events, each acknowledged before the call returns.
#[derive(Clone)]
pub struct Publisher {
    producer: rdkafka::producer::FutureProducer,
    codec: Arc<orderflow_runtime::codec::Codec>,
}

impl Publisher {
    /// Produces `event` to `topic` with `key`.
    ///
    /// Errors: encoding, or the broker not acknowledging within 10 s.
    pub async fn send(&self, topic: &str, key: &str, event: &orderflow_api::Event) -> Result<()> {
        let bytes = self.codec.encode(topic, event).await?;
        self.producer
            .send(rdkafka::producer::FutureRecord::to(topic).key(key).payload(&bytes), std::time::Duration::from_secs(10))
            .await
            .map_err(|(e, _)| anyhow::anyhow!("producing to {topic}: {e}"))?;
        Ok(())
    }
}

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub replica: Replica,
    pub metrics: Arc<ApiMetrics>,
    pub producer: Publisher,
    pub topics: Topics,
    /// The admin bearer token (never logged).
    pub admin_token: Option<Arc<String>>,
}

/// The API's Prometheus metrics (its own registry).
pub struct ApiMetrics {
    registry: Registry,
    requests: IntCounterVec,
    seconds: HistogramVec,
    replica_lag: IntGauge,
    replica_staleness: Histogram,
}

impl ApiMetrics {
    /// A fresh registry with the API's metrics.
    ///
    /// # Panics
    /// Never with these static definitions.
    pub fn new() -> ApiMetrics {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new("orderflow_api_requests_total", "HTTP requests by route template and status."),
            &["route", "status"],
        )
        .expect("metric");
        let seconds = HistogramVec::new(
            HistogramOpts::new("orderflow_api_request_seconds", "HTTP request latency by route template, seconds.")
                .buckets(vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
            &["route"],
        )
        .expect("metric");
        let replica_lag =
            IntGauge::new("orderflow_api_replica_lag_records", "Changelog records the API's replica has not applied yet.").expect("metric");
        registry.register(Box::new(requests.clone())).expect("register");
        registry.register(Box::new(seconds.clone())).expect("register");
        let replica_staleness = Histogram::with_opts(
            HistogramOpts::new(
                "orderflow_api_replica_staleness_seconds",
                "Per unit the replica applies: seconds from the unit's first changelog record (the reserver's clock) to applied; how stale a query just before it was.",
            )
            .buckets(vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
        )
        .expect("metric");
        registry.register(Box::new(replica_lag.clone())).expect("register");
        registry.register(Box::new(replica_staleness.clone())).expect("register");
        ApiMetrics { registry, requests, seconds, replica_lag, replica_staleness }
    }

    fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out).expect("text encoding");
        String::from_utf8(out).expect("utf-8")
    }
}

impl Default for ApiMetrics {
    fn default() -> Self {
        ApiMetrics::new()
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "orderflow inventory API", description = "Seed 004: stock queries, synchronous reservations for POS, admin distribution."),
    paths(get_stock, reserve::reserve, reserve::release, admin::distribute),
    components(schemas(StockView, ErrorBody, reserve::ReserveRequest, reserve::ReserveResponse, reserve::ItemRequest, reserve::ReservedLine,
        reserve::ReleaseResponse, admin::DistributeRequest, admin::DistributeResponse)),
    modifiers(&BearerAuth)
)]
struct ApiDoc;

/// Declares the admin routes' bearer scheme.
struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme("bearer", SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()));
    }
}

/// The OpenAPI document of the API, as JSON.
pub fn openapi() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// `?hqId=` of the stock query.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct StockParams {
    hq_id: Option<String>,
}

/// One product's stock in one store.
#[utoipa::path(
    get,
    path = "/api/v1/stores/{storeId}/products/{productId}/stock",
    params(
        ("storeId" = String, Path, description = "Store id"),
        ("productId" = String, Path, description = "Product id"),
        ("hqId" = Option<String>, Query, description = "The store's HQ (default: from the reserver's store registry)")
    ),
    responses(
        (status = 200, body = StockView),
        (status = 400, body = ErrorBody, description = "a malformed id or parameter"),
        (status = 404, body = ErrorBody, description = "a store the reserver has never stocked"),
        (status = 503, body = ErrorBody, description = "the replica has not caught up yet")
    )
)]
async fn get_stock(
    State(app): State<AppState>,
    Path((store_id, product_id)): Path<(String, String)>,
    params: Result<Query<StockParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<StockView>, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::BadField { field: "query", message: e.body_text() })?;
    check_id("storeId", &store_id)?;
    check_id("productId", &product_id)?;
    if let Some(hq) = &params.hq_id {
        check_id("hqId", hq)?;
    }
    if !app.replica.caught_up() {
        return Err(ApiError::Unavailable("the stock replica is still catching up with the reserver's changelog".into()));
    }
    let hq = stock::hq_of(&app.replica, &store_id, params.hq_id.as_deref())
        .ok_or_else(|| ApiError::NotFound(format!("store {store_id} is not known to the stock reserver")))?;
    Ok(Json(stock::query(&app.replica, &hq, &store_id, &product_id)?))
}

/// Counts and times every request by its route template (not the raw path: ids would explode
/// the series).
async fn observe(State(app): State<AppState>, req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().map(|m| m.as_str().to_string()).unwrap_or_else(|| "unmatched".into());
    let started = Instant::now();
    let resp = next.run(req).await;
    app.metrics.seconds.with_label_values(&[route.as_str()]).observe(started.elapsed().as_secs_f64());
    app.metrics.requests.with_label_values(&[route.as_str(), resp.status().as_str()]).inc();
    resp
}

/// The API's router over `app` (every route, the metrics middleware, a JSON 404).
pub fn router(app: AppState) -> Router {
    Router::new()
        .route("/api/v1/stores/{store_id}/products/{product_id}/stock", get(get_stock))
        .route("/api/v1/inventory/reserve", axum::routing::post(reserve::reserve))
        .route("/api/v1/inventory/reserve/{reservation_id}", axum::routing::delete(reserve::release))
        .route("/api/v1/admin/inventory/distribute", axum::routing::post(admin::distribute))
        .route("/api/v1/openapi.json", get(|| async { Json(openapi()) }))
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|State(app): State<AppState>| async move {
                if app.replica.caught_up() {
                    (StatusCode::OK, "ready")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "replica catching up")
                }
            }),
        )
        .route(
            "/metrics",
            get(|State(app): State<AppState>| async move {
                app.metrics.replica_lag.set(app.replica.lag_records());
                app.metrics.render()
            }),
        )
        .fallback(|| async { ApiError::NotFound("no such route".into()).into_response() })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(app.clone(), observe))
        .with_state(app)
}

/// Runs `orderflow api` until SIGTERM / Ctrl-C (requests in flight are finished first).
///
/// Errors: topology, the replica's consumer, binding the address.
pub async fn run(args: ApiArgs) -> Result<()> {
    let loaded = load_topology(&args.topology, args.bootstrap.as_deref())?;
    let t = &loaded.topology;
    let (name, spec) = crate::topology::stock_reserver(t, args.worker.as_deref())?;
    let metrics = Arc::new(ApiMetrics::new());
    let partitions = spec.inputs.iter().filter_map(|i| t.topics.get(i)).map(|s| s.partitions).max().unwrap_or(1);
    let prefixes = vec![
        stock_reserver::STOCK_PREFIX.to_vec(),
        stock_reserver::HQ_PREFIX.to_vec(),
        b"store/".to_vec(),
        stock_reserver::RESERVATION_PREFIX.to_vec(),
    ];
    let replica = Replica::start(
        &t.broker,
        &orderflow_runtime::changelog::topic(&name),
        partitions,
        spec.inputs.clone(),
        prefixes,
        Some(reserve::index_reservation),
        Some(metrics.replica_staleness.clone()),
    )?;
    let topics = Topics {
        order_created: crate::inventory::external_topic(t, "OrderCreated")?,
        order_cancelled: crate::inventory::external_topic(t, "OrderCancelled")?,
        inventory_adjusted: crate::inventory::external_topic(t, "InventoryAdjusted")?,
    };
    let codec = Arc::new(orderflow_runtime::codec::Codec::load(&loaded.avro_dir(), t.broker.registry_url.as_deref())?);
    let producer = orderflow_runtime::kafka::client_config(&t.broker, orderflow_runtime::kafka::Side::Producer).create()?;
    let admin_token = match &args.admin_token_file {
        Some(f) => Some(std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?.trim().to_string()),
        None => std::env::var("ORDERFLOW_API_ADMIN_TOKEN").ok().filter(|t| !t.is_empty()),
    };
    if admin_token.is_none() {
        tracing::warn!("no admin token configured: admin routes answer 401");
    }
    let app = AppState { replica, metrics, producer: Publisher { producer, codec }, topics, admin_token: admin_token.map(Arc::new) };
    let listener = tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("binding {}", args.listen))?;
    tracing::info!(addr = %args.listen, worker = %name, "inventory API serving");
    axum::serve(listener, router(app).into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(crate::run::terminate_signal())
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests;
