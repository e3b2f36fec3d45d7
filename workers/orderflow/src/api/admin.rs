//! Admin routes of the inventory API (seed 004: HQ → store distribution is a manual, admin-only
//! action with a `distributionId`): `POST /api/v1/admin/inventory/distribute`.
//!
//! **Authorization**: `Authorization: Bearer <token>` against the token configured with
//! `ORDERFLOW_API_ADMIN_TOKEN` (or `--admin-token-file`), compared in constant time and never
//! logged: 401 without a token (or with no token configured: admin routes are then closed), 403
//! with a wrong one. **Audit**: every admin request that passes authorization is logged at INFO
//! under target `orderflow::audit` with who (`X-Operator`, else `unknown`), the client address,
//! what (the movement) and when, before anything is produced, and again with the outcome.

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{ConnectInfo, State};
use axum::http::HeaderMap;
use axum::Json;
use orderflow_api::events::adjustment_type;
use orderflow_api::Event;
use orderflow_runtime::worker::now_ms;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use super::error::{ApiError, ErrorBody};
use super::reserve::{ItemRequest, MAX_ITEMS, MAX_QUANTITY};
use super::stock::check_id;
use super::AppState;

/// How long a distribution waits for the HQ's unit to be visible in the replica.
pub const APPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest `reason`, characters.
pub const MAX_REASON_CHARS: usize = 500;

/// `POST /api/v1/admin/inventory/distribute` body.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DistributeRequest {
    pub hq_id: String,
    /// The receiving store.
    pub store_id: String,
    pub items: Vec<ItemRequest>,
    /// Why (audited), 1..=500 characters.
    pub reason: String,
    /// The distribution's id; a retry with the same one applies once. Default: a new UUID (a
    /// retry without it distributes again).
    pub distribution_id: Option<String>,
}

/// A distribution taken by the HQ.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DistributeResponse {
    pub distribution_id: String,
    /// `ACCEPTED`: the HQ moved the units to in transit; the store receives them in its next unit.
    pub status: &'static str,
    pub items: Vec<ItemRequest>,
}

/// Checks the bearer token of `headers` against `configured` in constant time.
///
/// Errors: 401 without a token or with none configured, 403 with a wrong one.
pub fn authorize(headers: &HeaderMap, configured: Option<&str>) -> Result<(), ApiError> {
    let given = headers.get(axum::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    let (Some(given), Some(configured)) = (given, configured) else {
        return Err(ApiError::Unauthorized("admin routes need `Authorization: Bearer <token>`".into()));
    };
    if bool::from(given.as_bytes().ct_eq(configured.as_bytes())) {
        Ok(())
    } else {
        Err(ApiError::Forbidden("the token is not the admin token".into()))
    }
}

/// Moves units from an HQ's unallocated stock to one of its stores (admin only).
#[utoipa::path(
    post,
    path = "/api/v1/admin/inventory/distribute",
    request_body = DistributeRequest,
    security(("bearer" = [])),
    responses(
        (status = 200, body = DistributeResponse),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody, description = "no bearer token"),
        (status = 403, body = ErrorBody, description = "a wrong token"),
        (status = 409, body = ErrorBody, description = "the HQ has fewer unallocated units"),
        (status = 504, body = ErrorBody, description = "not visible within 10 s; retrying with the same distributionId is safe")
    )
)]
pub async fn distribute(
    State(app): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Result<Json<DistributeRequest>, JsonRejection>,
) -> Result<Json<DistributeResponse>, ApiError> {
    authorize(&headers, app.admin_token.as_deref().map(String::as_str))?;
    let Json(req) = body.map_err(ApiError::from_json)?;
    check_id("hqId", &req.hq_id)?;
    check_id("storeId", &req.store_id)?;
    if req.reason.trim().is_empty() || req.reason.chars().count() > MAX_REASON_CHARS {
        return Err(ApiError::BadField { field: "reason", message: format!("1 to {MAX_REASON_CHARS} characters") });
    }
    if req.items.is_empty() || req.items.len() > MAX_ITEMS || req.items.iter().any(|i| !(1..=MAX_QUANTITY).contains(&i.quantity)) {
        return Err(ApiError::BadField { field: "items", message: format!("1 to {MAX_ITEMS} lines of 1 to {MAX_QUANTITY} units") });
    }
    for i in &req.items {
        check_id("items.productId", &i.product_id)?;
    }
    let distribution_id = match &req.distribution_id {
        Some(id) => {
            check_id("distributionId", id)?;
            id.clone()
        }
        None => uuid::Uuid::new_v4().to_string(),
    };
    let operator = headers.get("x-operator").and_then(|v| v.to_str().ok()).unwrap_or("unknown").to_string();
    // Known HQ and enough unallocated units, from the replica (the reserver checks again).
    for i in &req.items {
        let hq = super::stock::hq_figures(&app.replica, &req.hq_id, &i.product_id)?;
        if hq.unallocated < i64::from(i.quantity) {
            return Err(ApiError::Conflict(format!(
                "HQ {} has {} unallocated units of {}, {} asked",
                req.hq_id, hq.unallocated, i.product_id, i.quantity
            )));
        }
    }
    let movement = crate::inventory::Movement {
        kind: adjustment_type::DISTRIBUTION,
        hq_id: req.hq_id.clone(),
        store_id: req.store_id.clone(),
        to_store_id: None,
        items: req.items.iter().map(|i| (i.product_id.clone(), i64::from(i.quantity))).collect(),
        reason: Some(req.reason.clone()),
        reference: distribution_id.clone(),
        operator: Some(operator.clone()),
    };
    let e = crate::inventory::build(movement, now_ms()).map_err(|e| ApiError::BadField { field: "body", message: format!("{e:#}") })?;
    tracing::info!(target: "orderflow::audit", who = %operator, client = %peer, what = "distribute", distribution_id = %distribution_id,
        hq = %req.hq_id, store = %req.store_id, items = ?movement_items(&req.items), reason = %req.reason, at_ms = now_ms(), "admin request");
    let event_id = e.event_id.clone();
    let key = orderflow_api::events::store_key(&e.hq_id, &e.store_id);
    app.producer.send(&app.topics.inventory_adjusted, &key, &Event::InventoryAdjusted(e)).await?;
    let applied = app.replica.wait_until(APPLY_TIMEOUT, |r| r.has_event(&event_id).then_some(())).await;
    tracing::info!(target: "orderflow::audit", who = %operator, what = "distribute", distribution_id = %distribution_id, applied = applied.is_some(), "admin request done");
    applied.ok_or_else(|| ApiError::Timeout(format!("distribution {distribution_id} not visible within {APPLY_TIMEOUT:?}")))?;
    Ok(Json(DistributeResponse { distribution_id, status: "ACCEPTED", items: req.items }))
}

fn movement_items(items: &[ItemRequest]) -> Vec<(String, i32)> {
    items.iter().map(|i| (i.product_id.clone(), i.quantity)).collect()
}
