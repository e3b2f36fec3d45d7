//! Unit tests of the inventory API's rules that need no broker: request validation, how a
//! reservation record answers a request, the admin token check, error bodies and the OpenAPI
//! document. The endpoints over real HTTP against the running topology are tests/api.rs's.

use axum::http::{HeaderMap, HeaderValue, StatusCode};
use stock_reserver::{Reservation, ReservationItem, ReservationStatus};

use super::admin::authorize;
use super::error::ApiError;
use super::reserve::{answer, index_reservation, order_of, validate, ItemRequest, ReserveRequest};
use super::stock::check_id;

fn request(items: &[(&str, i32)]) -> ReserveRequest {
    ReserveRequest {
        hq_id: "HQ-1".into(),
        store_id: "S-1".into(),
        items: items.iter().map(|(p, q)| ItemRequest { product_id: (*p).into(), quantity: *q }).collect(),
        transaction_id: "TX-1".into(),
    }
}

fn reservation(status: ReservationStatus, items: &[(&str, i32)]) -> Reservation {
    Reservation {
        reservation_id: "R-1".into(),
        order_id: "TX-1".into(),
        hq_id: "HQ-1".into(),
        store_id: "S-1".into(),
        items: items.iter().map(|(p, q)| ReservationItem { product_id: (*p).into(), quantity: *q }).collect(),
        status,
        expires_at: 300_000,
        from_hq: Vec::new(),
    }
}

fn field_of(e: ApiError) -> (StatusCode, Option<&'static str>) {
    let (status, body) = e.parts();
    (status, body.field)
}

#[test]
fn requests_are_validated_field_by_field() {
    assert!(validate(&request(&[("P-1", 1), ("P-2", 10_000)])).is_ok());
    let cases: Vec<(ReserveRequest, &str)> = vec![
        (request(&[]), "items"),
        (request(&[("P-1", 0)]), "items.quantity"),
        (request(&[("P-1", -3)]), "items.quantity"),
        (request(&[("P-1", 10_001)]), "items.quantity"),
        (request(&[("P-1", 1), ("P-1", 2)]), "items.productId"),
        (request(&[("P 1", 1)]), "items.productId"),
        (ReserveRequest { transaction_id: String::new(), ..request(&[("P-1", 1)]) }, "transactionId"),
        (ReserveRequest { hq_id: "x".repeat(129), ..request(&[("P-1", 1)]) }, "hqId"),
        (ReserveRequest { store_id: "S/1".into(), ..request(&[("P-1", 1)]) }, "storeId"),
        (request(&vec![("P-1", 1); 101]), "items"),
    ];
    for (r, field) in cases {
        let e = validate(&r).expect_err(field);
        assert_eq!(field_of(e), (StatusCode::BAD_REQUEST, Some(field)), "{r:?}");
    }
    assert!(check_id("id", "A-b_c.9").is_ok());
}

#[test]
fn a_request_becomes_one_order_whose_event_id_depends_on_the_transaction_only() {
    let a = order_of(&request(&[("P-1", 2)]), 1);
    let b = order_of(&request(&[("P-1", 2)]), 99);
    assert_eq!(a.event_id, b.event_id, "a retried request is the same event");
    assert_eq!((a.order_id.as_str(), a.hq_id.as_str(), a.store_id.as_str()), ("TX-1", "HQ-1", "S-1"));
    let other = order_of(&ReserveRequest { transaction_id: "TX-2".into(), ..request(&[("P-1", 2)]) }, 1);
    assert_ne!(a.event_id, other.event_id);
}

#[test]
fn the_reservation_record_answers_the_request() {
    let r = request(&[("P-1", 2), ("P-2", 1)]);
    assert!(answer(&r, None).is_none(), "no record yet: wait");
    assert!(answer(&r, Some(reservation(ReservationStatus::AwaitingHq, &[]))).is_none(), "waiting for the HQ: wait");
    let ok = answer(&r, Some(reservation(ReservationStatus::Live, &[("P-2", 1), ("P-1", 2)]))).unwrap().unwrap();
    assert_eq!((ok.reservation_id.as_str(), ok.expires_at, ok.items.len()), ("R-1", 300_000, 2));
    for (status, items) in [
        (ReservationStatus::Failed, vec![]),
        (ReservationStatus::Live, vec![("P-1", 3)]),
        (ReservationStatus::Deducted, vec![("P-1", 2), ("P-2", 1)]),
        (ReservationStatus::Released, vec![("P-1", 2), ("P-2", 1)]),
    ] {
        let e = answer(&r, Some(reservation(status, &items))).unwrap().unwrap_err();
        assert_eq!(e.parts().0, StatusCode::CONFLICT, "{status:?}");
    }
}

#[test]
fn reservations_are_indexed_by_their_id() {
    let v = serde_json::to_vec(&reservation(ReservationStatus::Live, &[("P-1", 1)])).unwrap();
    assert_eq!(index_reservation(b"res/TX-1", &v), Some("R-1".to_string()));
    assert_eq!(index_reservation(b"stock/HQ-1:S-1/P-1", &v), None);
    let closed = serde_json::to_vec(&Reservation { reservation_id: String::new(), ..reservation(ReservationStatus::Closed, &[]) }).unwrap();
    assert_eq!(index_reservation(b"res/TX-1", &closed), None);
}

#[test]
fn admin_routes_need_the_right_bearer_token() {
    let headers = |v: Option<&str>| {
        let mut h = HeaderMap::new();
        if let Some(v) = v {
            h.insert("authorization", HeaderValue::from_str(v).unwrap());
        }
        h
    };
    let status = |r: Result<(), ApiError>| r.map_err(|e| e.parts().0);
    assert_eq!(status(authorize(&headers(None), Some("s3cret"))), Err(StatusCode::UNAUTHORIZED));
    assert_eq!(status(authorize(&headers(Some("Basic s3cret")), Some("s3cret"))), Err(StatusCode::UNAUTHORIZED));
    assert_eq!(status(authorize(&headers(Some("Bearer nope")), Some("s3cret"))), Err(StatusCode::FORBIDDEN));
    assert_eq!(status(authorize(&headers(Some("Bearer s3cre")), Some("s3cret"))), Err(StatusCode::FORBIDDEN));
    assert_eq!(status(authorize(&headers(Some("Bearer s3cret")), None)), Err(StatusCode::UNAUTHORIZED), "no token configured: closed");
    assert_eq!(status(authorize(&headers(Some("Bearer s3cret")), Some("s3cret"))), Ok(()));
}

#[test]
fn errors_are_json_without_internals() {
    let (status, body) = ApiError::Internal("sled exploded at /var/lib".into()).parts();
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(!body.message.contains("sled"), "{}", body.message);
    let (status, body) = ApiError::Timeout("no answer".into()).parts();
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert!(body.message.contains("retrying it unchanged is safe"));
}

#[test]
fn the_openapi_document_names_every_route() {
    let doc = serde_json::to_value(super::openapi()).unwrap();
    let paths = doc["paths"].as_object().unwrap();
    for p in [
        "/api/v1/stores/{storeId}/products/{productId}/stock",
        "/api/v1/inventory/reserve",
        "/api/v1/inventory/reserve/{reservationId}",
        "/api/v1/admin/inventory/distribute",
    ] {
        assert!(paths.contains_key(p), "{p} missing from {:?}", paths.keys().collect::<Vec<_>>());
    }
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
}

#[test]
fn every_exported_name_is_listed_for_the_dashboards() {
    let listed =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/metrics-api.txt")).expect("deploy/metrics-api.txt");
    let mut listed = orderflow_runtime::metrics::listed_families(&listed, false);
    listed.sort();
    let m = super::ApiMetrics::new();
    // Vector families show once they have a child.
    m.requests.with_label_values(&["/healthz", "200"]).inc();
    m.seconds.with_label_values(&["/healthz"]).observe(0.001);
    let mut exported = orderflow_runtime::metrics::listed_families(&m.render(), true);
    exported.sort();
    assert_eq!(exported, listed, "deploy/metrics-api.txt and the API's registry differ");
}
