//! Reconciliation that can fire (issue 13, seed 004 재고 대사), on a real broker with the
//! workers as a real process:
//!
//! 1. a healthy run (a restock and orders through the saga) reconciles clean: the stock
//!    reserver's punctuation has run (`orderflow_business_events_total{measure="reconciliation",
//!    label="clean"}` > 0, the positive marker) and `orderflow_stock_conservation_mismatches_total`
//!    is 0; `orderflow reconcile` over the changelog exits 0;
//! 2. the workers are stopped (SIGTERM), one stored figure is changed in the stock reserver's
//!    local store (on hand of one product, as a disk fault or a bad hand edit would), the workers
//!    start again on that store: the punctuation finds it, the metric the alert
//!    `OrderflowStockConservationMismatch` watches goes above 0 and the ERROR log names the key
//!    and both figures. (The alert's PromQL itself is checked by `promtool test rules`,
//!    `deploy/prometheus/alerts.test.yaml`.)
//! 3. the changelog still holds the right figure, so `orderflow reconcile` (which checks the
//!    durable copy) stays clean: the local store alone is wrong, and rebuilding it from the
//!    changelog (delete the state directory) is the way out, which the README documents.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{free_port, http_get, metric, Guarded};
use orderflow_api::events::{change_reason, store_key, AdjustedItem, InventoryAdjusted, OrderCreated, OrderItem};
use orderflow_api::Changes;

const HQ: &str = "HQ-RECON";
const STORE: &str = "ST-RECON";
const PRODUCTS: [&str; 3] = ["P-R1", "P-R2", "P-R3"];

/// `topology.toml` with an absolute `avro_dir` and the stock reserver reconciling every second.
fn run_topology(dir: &Path) -> PathBuf {
    common::topology_copy(dir, "topology.toml", |original| {
        let marker = "[workers.stock-reserver]";
        assert_eq!(original.matches(marker).count(), 1, "topology.toml should have one {marker}");
        original.replace(marker, &format!("{marker}\nreconcile_interval = \"1s\"   # reconcile test"))
    })
}

fn reconcile_cli(topology: &Path, bootstrap: &str) -> std::process::Output {
    std::process::Command::new(common::orderflow_bin())
        .current_dir(common::repo_root())
        .args(["reconcile", "--json", "--topology"])
        .arg(topology)
        .args(["--bootstrap", bootstrap])
        .output()
        .expect("run orderflow reconcile")
}

#[test]
fn a_corrupted_stock_figure_is_found_by_the_reconciliation_and_a_healthy_run_shows_none() {
    let broker = common::Broker::start();
    let dir = broker.dir().to_path_buf();
    let topology = run_topology(&dir);
    common::create_topics(&topology, &broker.bootstrap);
    let port = free_port();
    let spawn = |n: usize| {
        let log = dir.join(format!("workers-{n}.log"));
        let child = common::run_command(&topology, &broker.bootstrap, "recon", port, &dir.join("state"), &log).spawn().expect("spawn");
        (Guarded::new(child, Duration::from_millis(50)), log)
    };
    let (mut workers, log) = spawn(0);
    common::wait_for("ready workers", &log, &mut workers, Duration::from_secs(90), Duration::from_millis(100), || {
        matches!(http_get(port, "/readyz"), Some((200, _))).then_some(())
    });

    // 1. Healthy: a restock and orders, some reserved.
    let k = common::Kafka::new(&broker.bootstrap);
    let restock = InventoryAdjusted {
        event_id: "ev-recon-restock".into(),
        occurred_at: common::now_ms(),
        hq_id: HQ.into(),
        store_id: STORE.into(),
        adjustment_type: change_reason::RESTOCK.into(),
        reference_id: "recon".into(),
        items: PRODUCTS.iter().map(|p| AdjustedItem { product_id: (*p).into(), delta: 20 }).collect(),
        to_store_id: None,
        reason: None,
        operator: None,
    };
    k.produce_event("inventory.adjusted", &store_key(HQ, STORE), restock.into());
    for n in 0..10 {
        let order = OrderCreated {
            event_id: format!("ev-recon-{n}"),
            occurred_at: common::now_ms(),
            order_id: format!("O-RECON-{n}"),
            customer_id: "C-1".into(),
            hq_id: HQ.into(),
            store_id: STORE.into(),
            items: vec![OrderItem { product_id: PRODUCTS[n % 3].into(), quantity: 1 + (n % 2) as i32, unit_price: 100 }],
        };
        k.produce_event("order.created", &order.order_id.clone(), order.into());
    }
    let reconciliations = |port: u16, label: &str| {
        metric(port, "orderflow_business_events_total", &[("worker", "stock-reserver"), ("measure", "reconciliation"), ("label", label)])
    };
    common::wait_for(
        "a clean reconciliation after the orders",
        &log,
        &mut workers,
        Duration::from_secs(60),
        Duration::from_millis(200),
        || {
            let reserved = common::read_topic(&k.broker, "stock.reserved", 6).len();
            (reserved == 10 && reconciliations(port, "clean") >= 2.0).then_some(())
        },
    );
    assert_eq!(metric(port, "orderflow_stock_conservation_mismatches_total", &[("worker", "stock-reserver")]), 0.0, "healthy run");
    assert_eq!(reconciliations(port, "mismatch"), 0.0);
    // The cross-shard HQ rules (issue 16) are judged once the reserver has nothing in flight: the
    // ledger entries the store's changes sent to its HQ are applied shortly after the orders.
    let report = common::wait_for("reconcile at rest", &log, &mut workers, Duration::from_secs(60), Duration::from_millis(500), || {
        let out = reconcile_cli(&topology, &broker.bootstrap);
        assert!(out.status.success(), "orderflow reconcile on a healthy run: {}", String::from_utf8_lossy(&out.stderr));
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("reconcile --json");
        (report["at_rest"] == true).then_some(report)
    });
    assert_eq!((report["stock_records"].as_u64(), report["mismatches"].as_u64()), (Some(3), Some(0)), "{report}");
    // One HQ ledger per product, its `stores` = the store's 20 units, nothing in transit.
    assert_eq!((report["hq"]["records"].as_u64(), report["hq"]["mismatches"].as_array().map(Vec::len)), (Some(3), Some(0)), "{report}");
    let waiting: u64 = report["backlog"].as_array().expect("backlog").iter().map(|b| b["pending"].as_u64().expect("pending")).sum();
    assert_eq!(waiting, 0, "{report}");

    // 2. Stop, change one figure in the local store, start again.
    let (stopped, _) = workers.terminate(Duration::from_secs(30));
    assert!(stopped.is_some_and(|s| s.success()), "workers did not stop cleanly: {stopped:?}");
    let key = stock_reserver::stock_key(HQ, STORE, PRODUCTS[0]);
    let (partition, before) = {
        let store = orderflow_runtime::store::Store::open(&dir.join("state").join("stock-reserver").join("recon")).expect("open sled");
        let shard = store
            .partitions()
            .into_iter()
            .map(|p| store.shard(p).expect("shard"))
            .find(|s| !s.scan(&key).expect("scan").is_empty())
            .expect("the product's stock record in some shard");
        let before: stock_reserver::StockRecord = serde_json::from_slice(&shard.scan(&key).unwrap()[0].1).unwrap();
        let corrupted = stock_reserver::StockRecord { on_hand: before.on_hand + 5, ..before };
        let mut changes = Changes::default();
        changes.writes.insert(key.clone(), Some(serde_json::to_vec(&corrupted).unwrap()));
        // Same offsets and changelog position: the restart keeps this store as it is.
        shard.commit(&changes, &shard.offsets().unwrap(), shard.changelog_next().unwrap()).expect("write the corrupted figure");
        k.rt.block_on(store.flush()).expect("flush the store");
        (shard.partition, before)
    };
    let (mut workers, log) = spawn(1);
    let found =
        common::wait_for("the mismatch in the metric", &log, &mut workers, Duration::from_secs(60), Duration::from_millis(200), || {
            let n = metric(port, "orderflow_stock_conservation_mismatches_total", &[("worker", "stock-reserver")]);
            (n > 0.0).then_some(n)
        });
    assert!(reconciliations(port, "mismatch") >= 1.0);
    let expected = format!("on_hand {HQ}:{STORE}/{}: expected {}, stored {}", PRODUCTS[0], before.on_hand, before.on_hand + 5);
    let lines = common::log_lines(&log);
    assert!(
        lines.iter().any(|l| common::is_error(l) && common::field(l, "kind").and_then(|v| v.as_str()) == Some(expected.as_str())),
        "no ERROR line naming {expected:?} (partition {partition}, metric {found}):\n{}",
        common::tail(&log, 20)
    );

    // 3. The changelog holds the right figure: the durable copy reconciles.
    let out = reconcile_cli(&topology, &broker.bootstrap);
    assert!(out.status.success(), "orderflow reconcile over the changelog: {}", String::from_utf8_lossy(&out.stderr));
    let (stopped, _) = workers.terminate(Duration::from_secs(30));
    assert!(stopped.is_some_and(|s| s.success()), "workers did not stop cleanly: {stopped:?}");
}
