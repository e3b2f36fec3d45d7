//! The inventory API (issue 17) over real HTTP against the running topology on the real broker:
//! every worker in one `orderflow run` process, `orderflow api` as a process of its own with an
//! admin token. Stock is put in place with `orderflow inventory`; payments are `order.completed`
//! records the test produces, as a POS would. The test checks, by its own HTTP calls and its own
//! reading of `order.created`:
//! 1. query → reserve → the next query shows the reservation (read-your-writes, no polling) →
//!    the same transactionId again gives the same reservation → payment → the query shows the sale
//!    (store and HQ figures);
//! 2. reserve → DELETE → released;
//! 3. five concurrent reservations for the last 3 units of a product (none at the HQ): exactly one
//!    succeeds, the others are 409;
//! 4. admin distribution: 401 without a token, 403 with a wrong one, 200 with the right one and
//!    visible in the store's figure;
//! 5. a table of malformed requests, each answered with its documented 4xx and a JSON error body,
//!    none producing anything or changing any stock.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, Guarded};
use orderflow_api::events::{OrderCompleted, SoldItem};
use orderflow_api::Event;
use rdkafka::message::Message;
use serde_json::{json, Value};

const HQ: &str = "HQ-API";
const STORE: &str = "ST-API";
/// 100 at the HQ, 10 distributed to the store.
const P1: &str = "P-API1";
/// 3 restocked straight at the store, none unallocated at the HQ: no fallback can serve more.
const P3: &str = "P-API3";
const TOKEN: &str = "test-admin-token";

fn call(port: u16, method: &str, path: &str, headers: &[(&str, &str)], body: Option<Value>) -> (u16, Value) {
    let bytes = body.map(|b| b.to_string().into_bytes());
    let mut h = vec![("Content-Type", "application/json")];
    h.extend_from_slice(headers);
    let (status, text) = common::http(port, method, path, &h, bytes.as_deref()).unwrap_or_else(|| panic!("{method} {path}: no answer"));
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

fn stock(port: u16, product: &str) -> Value {
    let (status, body) = call(port, "GET", &format!("/api/v1/stores/{STORE}/products/{product}/stock"), &[], None);
    assert_eq!(status, 200, "stock query: {body}");
    body
}

/// (hqStock, storeStock, availableStock, reservedStock) of `product` at the store.
fn figures(port: u16, product: &str) -> (i64, i64, i64, i64) {
    let s = stock(port, product);
    let n = |k: &str| s[k].as_i64().unwrap_or_else(|| panic!("{k} in {s}"));
    (n("hqStock"), n("storeStock"), n("availableStock"), n("reservedStock"))
}

fn wait_figures(port: u16, product: &str, expected: (i64, i64, i64, i64), what: &str) {
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let got = figures(port, product);
        if got == expected {
            return;
        }
        assert!(Instant::now() < until, "{what}: {product} stays at {got:?}, expected {expected:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn inventory(topology: &Path, bootstrap: &str, args: &[&str]) {
    let out = Command::new(common::orderflow_bin())
        .current_dir(common::repo_root())
        .arg("inventory")
        .arg("--topology")
        .arg(topology)
        .args(["--bootstrap", bootstrap])
        .args(args)
        .output()
        .expect("run orderflow inventory");
    assert!(out.status.success(), "orderflow inventory {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn reserve_body(tx: &str, product: &str, quantity: i64) -> Value {
    json!({"hqId": HQ, "storeId": STORE, "items": [{"productId": product, "quantity": quantity}], "transactionId": tx})
}

#[test]
fn the_inventory_api_queries_reserves_releases_and_distributes_over_the_event_log() {
    let broker = common::Broker::start();
    let dir = broker.dir().to_path_buf();
    let topology = common::repo_root().join("topology.toml");
    common::create_topics(&topology, &broker.bootstrap);
    let wport = free_port();
    let (mut workers, wlog) = common::spawn_workers(&broker.bootstrap, &dir, wport, "api", &[]);
    common::wait_for("ready workers", &wlog, &mut workers, Duration::from_secs(90), Duration::from_millis(100), || {
        matches!(common::http_get(wport, "/readyz"), Some((200, _))).then_some(())
    });
    let port = free_port();
    let alog = dir.join("api.log");
    let mut api = Guarded::new(
        Command::new(common::orderflow_bin())
            .current_dir(common::repo_root())
            .args(["--log-json", "api", "--topology"])
            .arg(&topology)
            .args(["--bootstrap", &broker.bootstrap, "--listen", &format!("127.0.0.1:{port}")])
            .env("ORDERFLOW_API_ADMIN_TOKEN", TOKEN)
            .env_remove("ORDERFLOW_BOOTSTRAP")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&alog).unwrap())
            .spawn()
            .expect("spawn orderflow api"),
        Duration::from_millis(50),
    );
    common::wait_for("a ready API", &alog, &mut api, Duration::from_secs(60), Duration::from_millis(100), || {
        matches!(common::http_get(port, "/readyz"), Some((200, _))).then_some(())
    });

    // Stock: 100 of P1 at the HQ, 10 of them distributed to the store; 3 of P3 at the store only.
    inventory(&topology, &broker.bootstrap, &["--reference", "RCV-API-1", "restock", "--hq", HQ, "--item", &format!("{P1}=100")]);
    inventory(
        &topology,
        &broker.bootstrap,
        &["--reference", "DST-API-1", "distribute", "--hq", HQ, "--store", STORE, "--item", &format!("{P1}=10")],
    );
    inventory(
        &topology,
        &broker.bootstrap,
        &["--reference", "RCV-API-3", "restock", "--hq", HQ, "--store", STORE, "--item", &format!("{P3}=3")],
    );
    wait_figures(port, P1, (100, 10, 10, 0), "the distribution");
    wait_figures(port, P3, (3, 3, 3, 0), "the store restock");

    // 1. Reserve; the very next query shows it; the same transactionId again is the same
    //    reservation; payment turns it into a sale.
    let (status, r1) = call(port, "POST", "/api/v1/inventory/reserve", &[], Some(reserve_body("TX-API-1", P1, 4)));
    assert_eq!(status, 200, "{r1}");
    assert_eq!(r1["items"], json!([{"productId": P1, "reserved": 4}]));
    assert!(r1["expiresAt"].as_i64().unwrap() > common::now_ms() + 200_000, "seed 004 TTL 5 minutes: {r1}");
    assert_eq!(figures(port, P1), (100, 10, 6, 4), "read-your-writes after the reserve answer");
    let (status, again) = call(port, "POST", "/api/v1/inventory/reserve", &[], Some(reserve_body("TX-API-1", P1, 4)));
    assert_eq!((status, &again["reservationId"]), (200, &r1["reservationId"]), "{again}");
    assert_eq!(figures(port, P1), (100, 10, 6, 4), "a repeated request reserves nothing more");
    let reservation_id = r1["reservationId"].as_str().unwrap().to_string();
    let k = common::Kafka::new(&broker.bootstrap);
    let paid = OrderCompleted {
        event_id: "pay-TX-API-1".into(),
        occurred_at: common::now_ms(),
        order_id: "TX-API-1".into(),
        reservation_id: reservation_id.clone(),
        hq_id: HQ.into(),
        store_id: STORE.into(),
        items: vec![SoldItem { product_id: P1.into(), quantity: 4, actual_price: 100 }],
        total_amount: 400,
    };
    k.produce_event("order.completed", "TX-API-1", Event::OrderCompleted(paid));
    wait_figures(port, P1, (96, 6, 6, 0), "the sale (store and HQ lowered together)");

    // 2. Reserve, then release.
    let (status, r2) = call(port, "POST", "/api/v1/inventory/reserve", &[], Some(reserve_body("TX-API-2", P1, 2)));
    assert_eq!(status, 200, "{r2}");
    assert_eq!(figures(port, P1), (96, 6, 4, 2));
    let (status, released) =
        call(port, "DELETE", &format!("/api/v1/inventory/reserve/{}", r2["reservationId"].as_str().unwrap()), &[], None);
    assert_eq!((status, &released["success"]), (200, &json!(true)), "{released}");
    assert_eq!(figures(port, P1), (96, 6, 6, 0), "released");

    // 3. Five concurrent reservations for the last 3 units of P3: exactly one wins.
    let answers: Vec<(u16, Value)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..5)
            .map(|i| {
                s.spawn(move || call(port, "POST", "/api/v1/inventory/reserve", &[], Some(reserve_body(&format!("TX-API-C{i}"), P3, 3))))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let statuses: Vec<u16> = answers.iter().map(|(s, _)| *s).collect();
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 1, "{answers:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 409).count(), 4, "{answers:?}");
    assert_eq!(figures(port, P3), (3, 3, 0, 3));

    // 4. Admin distribution.
    let dist = json!({"hqId": HQ, "storeId": STORE, "items": [{"productId": P1, "quantity": 5}], "reason": "api test", "distributionId": "D-API-1"});
    let path = "/api/v1/admin/inventory/distribute";
    assert_eq!(call(port, "POST", path, &[], Some(dist.clone())).0, 401);
    assert_eq!(call(port, "POST", path, &[("Authorization", "Bearer wrong")], Some(dist.clone())).0, 403);
    let bearer = format!("Bearer {TOKEN}");
    let auth = [("Authorization", bearer.as_str()), ("X-Operator", "api-test")];
    let (status, d) = call(port, "POST", path, &auth, Some(dist.clone()));
    assert_eq!((status, &d["distributionId"]), (200, &json!("D-API-1")), "{d}");
    wait_figures(port, P1, (96, 11, 11, 0), "the admin distribution");
    let audit = common::log_lines(&alog);
    assert!(
        audit.iter().any(|l| l["target"] == "orderflow::audit" && l.to_string().contains("D-API-1") && l.to_string().contains("api-test")),
        "no audit line for D-API-1:\n{}",
        common::tail(&alog, 20)
    );
    assert!(!std::fs::read_to_string(&alog).unwrap().contains(TOKEN), "the token is never logged");

    // 5. Malformed requests: each its documented 4xx with a JSON error body; nothing changes.
    let before = (figures(port, P1), figures(port, P3));
    let created_before = created_orders(&k);
    let big = format!("{{\"hqId\":\"{}\"}}", "x".repeat(70 * 1024));
    let cases: Vec<Case> = vec![
        ("POST", "/api/v1/inventory/reserve".into(), vec![], Some(b"{".to_vec()), 400, Some("body")),
        ("POST", "/api/v1/inventory/reserve".into(), vec![], Some(br#"{"hqId":"HQ-API","storeId":"ST-API","items":[{"productId":"P-API1","quantity":1}],"transactionId":"TX-M1","extra":1}"#.to_vec()), 400, Some("body")),
        ("POST", "/api/v1/inventory/reserve".into(), vec![], Some(br#"{"hqId":"HQ-API","storeId":"ST-API","items":[{"productId":"P-API1","quantity":1}]}"#.to_vec()), 400, Some("body")),
        ("POST", "/api/v1/inventory/reserve".into(), vec![], Some(reserve_body("TX-M2", P1, 0).to_string().into_bytes()), 400, Some("items.quantity")),
        ("POST", "/api/v1/inventory/reserve".into(), vec![], Some(reserve_body("TX-M3", P1, -5).to_string().into_bytes()), 400, Some("items.quantity")),
        ("POST", "/api/v1/inventory/reserve".into(), vec![], Some(reserve_body("TX-M4", P1, 1_000_000).to_string().into_bytes()), 400, Some("items.quantity")),
        ("POST", "/api/v1/inventory/reserve".into(), vec![], Some(br#"{"hqId":"HQ-API","storeId":"ST-API","items":[{"productId":"P-API1","quantity":"3"}],"transactionId":"TX-M5"}"#.to_vec()), 400, Some("body")),
        ("POST", "/api/v1/inventory/reserve".into(), vec![], Some(json!({"hqId": HQ, "storeId": STORE, "items": [], "transactionId": "TX-M6"}).to_string().into_bytes()), 400, Some("items")),
        ("POST", "/api/v1/inventory/reserve".into(), vec![], Some(json!({"hqId": HQ, "storeId": STORE, "items": [{"productId": P1, "quantity": 1}, {"productId": P1, "quantity": 1}], "transactionId": "TX-M7"}).to_string().into_bytes()), 400, Some("items.productId")),
        ("POST", "/api/v1/inventory/reserve".into(), vec![], Some(json!({"hqId": HQ, "storeId": "ST API", "items": [{"productId": P1, "quantity": 1}], "transactionId": "TX-M8"}).to_string().into_bytes()), 400, Some("storeId")),
        ("POST", "/api/v1/inventory/reserve".into(), vec![], Some(json!({"hqId": "H".repeat(200), "storeId": STORE, "items": [{"productId": P1, "quantity": 1}], "transactionId": "TX-M9"}).to_string().into_bytes()), 400, Some("hqId")),
        ("POST", "/api/v1/inventory/reserve".into(), vec![], Some(reserve_body("TX/M10", P1, 1).to_string().into_bytes()), 400, Some("transactionId")),
        ("POST", "/api/v1/inventory/reserve".into(), vec![], Some(big.into_bytes()), 413, Some("body")),
        ("GET", format!("/api/v1/stores/{STORE}/products/P%20X/stock"), vec![], None, 400, Some("productId")),
        ("GET", format!("/api/v1/stores/{STORE}/products/{P1}/stock?color=red"), vec![], None, 400, Some("query")),
        ("GET", format!("/api/v1/stores/ST-NOWHERE/products/{P1}/stock"), vec![], None, 404, None),
        ("DELETE", "/api/v1/inventory/reserve/R-NOT-THERE".into(), vec![], None, 404, None),
        ("DELETE", "/api/v1/inventory/reserve/R%2FX".into(), vec![], None, 400, Some("reservationId")),
        ("POST", path.into(), auth.to_vec(), Some(json!({"hqId": HQ, "storeId": STORE, "items": [{"productId": P1, "quantity": 0}], "reason": "x"}).to_string().into_bytes()), 400, Some("items")),
        ("POST", path.into(), auth.to_vec(), Some(json!({"hqId": HQ, "storeId": STORE, "items": [{"productId": P1, "quantity": 1}]}).to_string().into_bytes()), 400, Some("body")),
        ("POST", path.into(), auth.to_vec(), Some(json!({"hqId": HQ, "storeId": STORE, "items": [{"productId": P1, "quantity": 5000}], "reason": "too many"}).to_string().into_bytes()), 409, None),
        ("POST", "/api/v1/nothing-here".into(), vec![], Some(b"{}".to_vec()), 404, None),
    ];
    assert!(cases.len() >= 15);
    for (method, path, headers, body, expected, field) in &cases {
        let mut h = vec![("Content-Type", "application/json")];
        h.extend_from_slice(headers);
        let (status, text) = common::http(port, method, path, &h, body.as_deref()).unwrap_or_else(|| panic!("{method} {path}: no answer"));
        assert_eq!(status, *expected, "{method} {path}: {text}");
        let err: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{method} {path}: not a JSON error ({e}): {text}"));
        assert!(err["error"].is_string() && err["message"].is_string(), "{method} {path}: {err}");
        if let Some(f) = field {
            assert_eq!(err["field"], json!(f), "{method} {path}: {err}");
        }
    }
    assert_eq!((figures(port, P1), figures(port, P3)), before, "a malformed request changed stock");
    assert_eq!(created_orders(&k), created_before, "a malformed request produced an order");
    let expected: BTreeSet<String> =
        ["TX-API-1", "TX-API-2"].iter().map(|s| s.to_string()).chain((0..5).map(|i| format!("TX-API-C{i}"))).collect();
    assert_eq!(created_before, expected, "order.created holds exactly the API's reservations");

    // The API's own metrics count the requests by route template, time the replica's staleness
    // of the units it applied (the reservations above among them), and are the families
    // deploy/metrics-api.txt lists for the dashboard and the alerts.
    let (_, metrics) = common::http_get(port, "/metrics").expect("metrics");
    assert!(
        common::metric_in(&metrics, "orderflow_api_requests_total", &[("route", "/api/v1/inventory/reserve"), ("status", "200")]) >= 4.0
    );
    let staleness_units: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("orderflow_api_replica_staleness_seconds_count "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    assert!(staleness_units >= 4.0, "units applied after catching up, timed: {staleness_units}\n{metrics}");
    let listed = std::fs::read_to_string(common::repo_root().join("deploy/metrics-api.txt")).expect("deploy/metrics-api.txt");
    let listed: BTreeSet<&str> =
        listed.lines().filter(|l| !l.trim().is_empty() && !l.starts_with('#')).filter_map(|l| l.split_whitespace().next()).collect();
    let exported: BTreeSet<&str> =
        metrics.lines().filter_map(|l| l.strip_prefix("# TYPE ")).filter_map(|l| l.split_whitespace().next()).collect();
    assert_eq!(exported, listed, "the API's /metrics families and deploy/metrics-api.txt");
    let (ws, _) = workers.terminate(Duration::from_secs(30));
    assert!(ws.is_some_and(|s| s.success()), "workers did not stop cleanly: {ws:?}");
    let (a, _) = api.terminate(Duration::from_secs(10));
    assert!(a.is_some_and(|s| s.success()), "the API did not stop cleanly on SIGTERM: {a:?}");
}

/// A malformed request: method, path, extra headers, body; the expected status and the field
/// its error body names (if one is to blame).
type Case<'a> = (&'a str, String, Vec<(&'a str, &'a str)>, Option<Vec<u8>>, u16, Option<&'a str>);

/// Distinct order ids on `order.created`, by the test's own reading.
fn created_orders(k: &common::Kafka) -> BTreeSet<String> {
    common::read_topic(&k.broker, "order.created", 6)
        .iter()
        .filter_map(|m| k.codec.decode_local(m.payload()?).ok())
        .filter_map(|e| match e {
            Event::OrderCreated(o) => Some(o.order_id),
            _ => None,
        })
        .collect()
}
