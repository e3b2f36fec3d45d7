//! Stock queries (seed 004: `GET /api/v1/stores/{storeId}/products/{productId}/stock`), answered
//! from the read replica of the stock reserver's state (module docs of [`super`]).

use orderflow_runtime::replica::Replica;
use serde::Serialize;
use stock_reserver::{hq_key, stock_key, store_registry_key, HqStock, StockRecord};

use super::error::ApiError;

/// One product's stock in one store (seed 004's stock response), in units.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StockView {
    pub hq_id: String,
    pub store_id: String,
    pub product_id: String,
    /// The HQ total (unallocated + in transit + Σ its stores), seed 004 "HQ 총 재고".
    pub hq_stock: i64,
    /// On hand at the store (available + reserved).
    pub store_stock: i64,
    /// On hand not held by a live reservation: what a new reservation can take.
    pub available_stock: i64,
    /// Held by live reservations.
    pub reserved_stock: i64,
}

/// Largest length of an id in a path, bytes (ids of the domain are short).
pub const MAX_ID_BYTES: usize = 128;

/// Checks a path id: 1..=[`MAX_ID_BYTES`] bytes of letters, digits, `-`, `_`, `.`.
///
/// Errors: [`ApiError::BadField`] naming `field`.
pub fn check_id(field: &'static str, v: &str) -> Result<(), ApiError> {
    let ok = !v.is_empty() && v.len() <= MAX_ID_BYTES && v.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::BadField { field, message: format!("must be 1 to {MAX_ID_BYTES} letters, digits, '-', '_' or '.'") })
    }
}

/// The HQ of store `store_id`, from the reserver's store registry (`store/{hqId}:{storeId}`),
/// unless `hq_id` names it. `None` for a store the reserver has never stocked.
pub fn hq_of(replica: &Replica, store_id: &str, hq_id: Option<&str>) -> Option<String> {
    if let Some(hq) = hq_id {
        return replica.get(&store_registry_key(hq, store_id)).map(|_| hq.to_string());
    }
    let suffix = format!(":{store_id}");
    replica.scan_prefix(b"store/").into_iter().find_map(|(k, _)| {
        let key = String::from_utf8_lossy(&k["store/".len()..]).into_owned();
        key.strip_suffix(&suffix).map(str::to_string)
    })
}

/// The stock of `product_id` at store `store_id` of `hq_id`: zero figures for a product the
/// store never had.
///
/// Errors: [`ApiError::Internal`] when a record in the replica does not parse.
pub fn query(replica: &Replica, hq_id: &str, store_id: &str, product_id: &str) -> Result<StockView, ApiError> {
    let store: StockRecord = replica
        .get(&stock_key(hq_id, store_id, product_id))
        .map(|b| {
            serde_json::from_slice(&b)
                .map_err(|e| ApiError::Internal(format!("stock record {hq_id}:{store_id}/{product_id} does not parse: {e}")))
        })
        .transpose()?
        .unwrap_or_default();
    let hq = hq_figures(replica, hq_id, product_id)?;
    Ok(StockView {
        hq_id: hq_id.to_string(),
        store_id: store_id.to_string(),
        product_id: product_id.to_string(),
        hq_stock: hq.total(),
        store_stock: store.on_hand,
        available_stock: store.on_hand - store.reserved,
        reserved_stock: store.reserved,
    })
}

/// The figures of `hq_id` for `product_id` in the replica (zero when never seen).
///
/// Errors: [`ApiError::Internal`] when the record does not parse.
pub fn hq_figures(replica: &Replica, hq_id: &str, product_id: &str) -> Result<HqStock, ApiError> {
    replica
        .get(&hq_key(hq_id, product_id))
        .map(|b| serde_json::from_slice(&b).map_err(|e| ApiError::Internal(format!("HQ record {hq_id}/{product_id} does not parse: {e}"))))
        .transpose()
        .map(Option::unwrap_or_default)
}
