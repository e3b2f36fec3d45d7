//! Synchronous reservations for the POS over the event log (seed 004: `POST
//! /api/v1/inventory/reserve`, `DELETE /api/v1/inventory/reserve/{reservationId}`).
//!
//! A reserve request becomes an `order.created` of order `transactionId` (eventId derived from
//! the transactionId, so a retried request is the same event and the deduplicator drops the
//! copy), keyed like every order; it then goes the web orders' way (deduplicator → stock
//! reserver; the canceller's and expirer's clocks; 5-minute TTL, payment by `order.completed`).
//! The answer is read back from the replica of the reserver's state: the reservation record
//! `res/{transactionId}` once it is `LIVE` (reserved) or `FAILED`. A request whose reservation
//! already exists is answered from it without producing. A release produces an
//! `order.cancelled` (reason `CUSTOMER_CANCELLED`) for the reservation's order and waits for the
//! record to be released.

use std::time::Duration;

use orderflow_api::events::{OrderCancelled, OrderCreated, OrderItem};
use orderflow_api::{derive_event_id, Event};
use orderflow_runtime::replica::Replica;
use serde::{Deserialize, Serialize};
use stock_reserver::{reservation_key, Reservation, ReservationStatus, RESERVATION_PREFIX};

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::Json;
use orderflow_runtime::worker::now_ms;

use super::error::{ApiError, ErrorBody};
use super::stock::check_id;
use super::AppState;

/// Most items of one reservation request.
pub const MAX_ITEMS: usize = 100;
/// Most units of one item.
pub const MAX_QUANTITY: i32 = 10_000;
/// How long a request waits for the reserver's answer before answering 504.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// `reason` of the cancellation a `DELETE` produces.
pub const CUSTOMER_CANCELLED: &str = "CUSTOMER_CANCELLED";

/// One line of a reservation request.
#[derive(Debug, Clone, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ItemRequest {
    pub product_id: String,
    /// Units, 1..=10,000.
    pub quantity: i32,
}

/// `POST /api/v1/inventory/reserve` body.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ReserveRequest {
    pub hq_id: String,
    pub store_id: String,
    /// 1..=100 lines, each product once.
    pub items: Vec<ItemRequest>,
    /// The POS transaction: the reservation's order id and idempotency key.
    pub transaction_id: String,
}

/// One reserved line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReservedLine {
    pub product_id: String,
    pub reserved: i32,
}

/// A reservation made (200).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReserveResponse {
    pub reservation_id: String,
    /// ms since the epoch (seed 004: 5 minutes after the request).
    pub expires_at: i64,
    pub items: Vec<ReservedLine>,
}

/// `DELETE` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct ReleaseResponse {
    pub success: bool,
    pub message: String,
}

/// The [`orderflow_runtime::replica::Indexer`] of the API's replica: a live or past reservation
/// by its `reservationId`.
pub fn index_reservation(key: &[u8], value: &[u8]) -> Option<String> {
    if !key.starts_with(RESERVATION_PREFIX) {
        return None;
    }
    let r: Reservation = serde_json::from_slice(value).ok()?;
    (!r.reservation_id.is_empty()).then_some(r.reservation_id)
}

/// Checks a request: ids, 1..=[`MAX_ITEMS`] lines, 1..=[`MAX_QUANTITY`] units, each product once.
///
/// Errors: [`ApiError::BadField`] naming the field.
pub fn validate(r: &ReserveRequest) -> Result<(), ApiError> {
    check_id("hqId", &r.hq_id)?;
    check_id("storeId", &r.store_id)?;
    check_id("transactionId", &r.transaction_id)?;
    if r.items.is_empty() || r.items.len() > MAX_ITEMS {
        return Err(ApiError::BadField { field: "items", message: format!("1 to {MAX_ITEMS} lines, got {}", r.items.len()) });
    }
    let mut seen = std::collections::BTreeSet::new();
    for i in &r.items {
        check_id("items.productId", &i.product_id)?;
        if !(1..=MAX_QUANTITY).contains(&i.quantity) {
            return Err(ApiError::BadField { field: "items.quantity", message: format!("1 to {MAX_QUANTITY} units, got {}", i.quantity) });
        }
        if !seen.insert(&i.product_id) {
            return Err(ApiError::BadField { field: "items.productId", message: format!("{} named twice", i.product_id) });
        }
    }
    Ok(())
}

/// The `order.created` a request becomes (eventId derived from the transactionId).
pub fn order_of(r: &ReserveRequest, now_ms: i64) -> OrderCreated {
    OrderCreated {
        event_id: derive_event_id(&r.transaction_id, "pos-reserve"),
        occurred_at: now_ms,
        order_id: r.transaction_id.clone(),
        customer_id: "POS".into(),
        hq_id: r.hq_id.clone(),
        store_id: r.store_id.clone(),
        items: r.items.iter().map(|i| OrderItem { product_id: i.product_id.clone(), quantity: i.quantity, unit_price: 0 }).collect(),
    }
}

/// The answer a settled reservation record gives to request `r` (`None` while the reserver has
/// not decided: no record, or awaiting its HQ).
///
/// Errors: 409 when the transaction failed for stock, was closed, or reserved other items.
pub fn answer(r: &ReserveRequest, rec: Option<Reservation>) -> Option<Result<ReserveResponse, ApiError>> {
    let rec = rec?;
    let conflict = |m: String| Some(Err(ApiError::Conflict(m)));
    match rec.status {
        ReservationStatus::AwaitingHq => None,
        ReservationStatus::Failed => {
            conflict(format!("transaction {}: not enough stock for every item (nothing reserved)", r.transaction_id))
        }
        ReservationStatus::Live => {
            let mut asked: Vec<(&str, i32)> = r.items.iter().map(|i| (i.product_id.as_str(), i.quantity)).collect();
            let mut held: Vec<(&str, i32)> = rec.items.iter().map(|i| (i.product_id.as_str(), i.quantity)).collect();
            asked.sort();
            held.sort();
            if asked != held {
                return conflict(format!("transaction {} already reserved other items", r.transaction_id));
            }
            Some(Ok(ReserveResponse {
                reservation_id: rec.reservation_id,
                expires_at: rec.expires_at,
                items: rec.items.into_iter().map(|i| ReservedLine { product_id: i.product_id, reserved: i.quantity }).collect(),
            }))
        }
        other => conflict(format!("transaction {} is already closed ({other:?})", r.transaction_id)),
    }
}

/// The reservation record of order `order_id` in the replica.
pub fn record(replica: &Replica, order_id: &str) -> Option<Reservation> {
    replica.get(&reservation_key(order_id)).and_then(|v| serde_json::from_slice(&v).ok())
}

/// The `order.cancelled` a `DELETE` of reservation `rec` produces (eventId derived from the
/// reservation id: a repeated DELETE is the same event).
pub fn cancellation_of(rec: &Reservation, now_ms: i64) -> OrderCancelled {
    OrderCancelled {
        event_id: derive_event_id(&rec.reservation_id, "pos-release"),
        occurred_at: now_ms,
        order_id: rec.order_id.clone(),
        hq_id: rec.hq_id.clone(),
        store_id: rec.store_id.clone(),
        reason: CUSTOMER_CANCELLED.into(),
        reservation_id: Some(rec.reservation_id.clone()),
        customer_message: "reservation released by the POS".into(),
        refund_required: false,
        customer_id: None,
    }
}

/// Reserves stock for a POS transaction (same transactionId → same reservation).
#[utoipa::path(
    post,
    path = "/api/v1/inventory/reserve",
    request_body = ReserveRequest,
    responses(
        (status = 200, body = ReserveResponse),
        (status = 400, body = ErrorBody, description = "a malformed body or field"),
        (status = 409, body = ErrorBody, description = "not enough stock (nothing reserved), or the transaction is closed or reserved other items"),
        (status = 413, description = "body over 64 KiB"),
        (status = 504, body = ErrorBody, description = "no answer in 10 s: the request may still complete; retrying with the same transactionId is safe")
    )
)]
pub async fn reserve(
    State(app): State<AppState>,
    body: Result<Json<ReserveRequest>, JsonRejection>,
) -> Result<Json<ReserveResponse>, ApiError> {
    let Json(req) = body.map_err(ApiError::from_json)?;
    validate(&req)?;
    if let Some(done) = answer(&req, record(&app.replica, &req.transaction_id)) {
        return done.map(Json);
    }
    let order = order_of(&req, now_ms());
    app.producer.send(&app.topics.order_created, &order.order_id.clone(), &Event::OrderCreated(order)).await?;
    app.replica
        .wait_until(ANSWER_TIMEOUT, |r| answer(&req, record(r, &req.transaction_id)))
        .await
        .ok_or_else(|| ApiError::Timeout(format!("no answer for transaction {} within {ANSWER_TIMEOUT:?}", req.transaction_id)))?
        .map(Json)
}

/// Releases a reservation the POS will not pay (cancellation rules of web orders).
#[utoipa::path(
    delete,
    path = "/api/v1/inventory/reserve/{reservationId}",
    params(("reservationId" = String, Path, description = "From the reserve answer")),
    responses(
        (status = 200, body = ReleaseResponse),
        (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody, description = "no such reservation"),
        (status = 409, body = ErrorBody, description = "already sold"),
        (status = 504, body = ErrorBody, description = "not released within 10 s; retrying is safe")
    )
)]
pub async fn release(State(app): State<AppState>, Path(reservation_id): Path<String>) -> Result<Json<ReleaseResponse>, ApiError> {
    check_id("reservationId", &reservation_id)?;
    let find = |r: &Replica| r.get_indexed(&reservation_id).and_then(|(_, v)| serde_json::from_slice::<Reservation>(&v).ok());
    let rec = find(&app.replica).ok_or_else(|| ApiError::NotFound(format!("reservation {reservation_id} is not known")))?;
    let done = |rec: &Reservation| match rec.status {
        ReservationStatus::Released | ReservationStatus::Closed => Some(Ok(ReleaseResponse { success: true, message: "released".into() })),
        ReservationStatus::Deducted | ReservationStatus::Refunded => {
            Some(Err(ApiError::Conflict(format!("reservation {} was already paid", rec.reservation_id))))
        }
        _ => None,
    };
    if let Some(d) = done(&rec) {
        return d.map(Json);
    }
    let cancel = cancellation_of(&rec, now_ms());
    app.producer.send(&app.topics.order_cancelled, &rec.order_id, &Event::OrderCancelled(cancel)).await?;
    app.replica
        .wait_until(ANSWER_TIMEOUT, |r| find(r).and_then(|rec| done(&rec)))
        .await
        .ok_or_else(|| ApiError::Timeout(format!("reservation {reservation_id} not released within {ANSWER_TIMEOUT:?}")))?
        .map(Json)
}
