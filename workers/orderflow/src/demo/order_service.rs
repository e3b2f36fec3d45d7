//! The demo's reference order service (seed 002's synchronous order, issue 15): it checks that
//! every product of an order exists in `products`, prices the order from that table, and writes
//! the `orders` row, its `order_lines` and the `order.created` outbox row in **one** database
//! transaction. The outbox relay (a worker of the topology) publishes the row; the saga never
//! hears of an order the database does not hold, nor the other way round.
//!
//! Tables: `workers/orderflow/migrations/<dialect>/1001_reference_order_service.sql` (applied
//! here, not by the relay) and the relay's own outbox table (`OutboxStore::migrate`).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use anyhow::{Context as _, Result};
use orderflow_api::events::{OrderCreated, OrderItem};
use orderflow_runtime::worker::now_ms;
use outbox_relay::{Dialect, OutboxStore};
use serde::Serialize;
use sqlx::Row as _;

/// `status` of an accepted order in `orders`.
pub(super) const ORDER_CREATED: &str = "ORDER_CREATED";

/// Seed 003's target for the average publish lag (row written → published), milliseconds.
pub(super) const LAG_TARGET_MEAN_MS: f64 = 3_000.0;

/// What the service did with one order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Placed {
    /// Written: the `orders` row, its lines and the outbox row, in one transaction.
    Accepted,
    /// Refused before anything was written: the products that are not in `products`.
    Rejected(Vec<String>),
}

/// The order service over one database (the relay's).
#[derive(Clone)]
pub(super) struct OrderService {
    store: OutboxStore,
    topic: String,
}

/// The `outbox` section of the summary: the rows of the order topic as the database holds them
/// after the run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct OutboxSummary {
    /// `postgres`, `mysql` or `sqlite`.
    pub database: String,
    /// Concurrent writer tasks of the order service.
    pub writers: usize,
    /// Outbox rows of `order.created` by final status.
    pub rows_by_status: BTreeMap<String, i64>,
    /// Rows of the `orders` table (every accepted order; one outbox row each).
    pub orders_rows: i64,
    /// Orders the service refused (unknown product): nothing written for them.
    pub rejected_orders: usize,
    pub rejected: Vec<String>,
    /// `published_at − created_at` of the `COMPLETED` rows, ms: p50, p99, max.
    pub publish_lag_ms: BTreeMap<String, i64>,
    pub publish_lag_mean_ms: f64,
    /// Seed 003: average publish lag at most 3 s.
    pub lag_target_mean_ms: f64,
    pub lag_target_met: bool,
}

impl OrderService {
    /// Connects with a pool of `connections`, applies the outbox migration and the service's own
    /// (1001…; both sets share `_sqlx_migrations`, so each ignores the other's versions).
    ///
    /// Errors: the database cannot be reached, a migration fails.
    pub(super) async fn open(url: &str, connections: u32, topic: &str) -> Result<OrderService> {
        let store = OutboxStore::connect(url, connections, Duration::from_secs(30))
            .await
            .with_context(|| format!("connecting to the order service's database {}", redact(url)))?;
        store.migrate().await.context("migrating the outbox table")?;
        let mut m = match store.dialect() {
            Dialect::Postgres => sqlx::migrate!("./migrations/postgres"),
            Dialect::MySql => sqlx::migrate!("./migrations/mysql"),
            Dialect::Sqlite => sqlx::migrate!("./migrations/sqlite"),
        };
        m.set_ignore_missing(true);
        m.run(store.pool()).await.context("migrating the reference order service's tables")?;
        Ok(OrderService { store, topic: topic.to_string() })
    }

    fn q(&self, sql: &str) -> String {
        self.store.dialect().sql(sql)
    }

    /// Empties the service's tables and the outbox rows of its topic: a rerun on a kept database
    /// starts like a fresh one (the demo insists on an empty broker for the same reason). Returns
    /// how many outbox rows an earlier run had left.
    pub(super) async fn reset(&self) -> Result<u64> {
        let mut tx = self.store.pool().begin().await?;
        for table in ["order_lines", "orders", "products"] {
            sqlx::query(&format!("DELETE FROM {table}")).execute(&mut *tx).await?;
        }
        let n = sqlx::query(&self.q("DELETE FROM outbox WHERE topic = ?")).bind(&self.topic).execute(&mut *tx).await?.rows_affected();
        tx.commit().await?;
        Ok(n)
    }

    /// Loads the catalogue: `productId → unit price` (smallest currency unit), all active.
    pub(super) async fn load_products(&self, products: &BTreeMap<String, i64>) -> Result<()> {
        let mut tx = self.store.pool().begin().await?;
        let rows: Vec<(&String, &i64)> = products.iter().collect();
        for chunk in rows.chunks(300) {
            let sql = self
                .q(&format!("INSERT INTO products (product_id, unit_price, active) VALUES {}", vec!["(?, ?, 1)"; chunk.len()].join(", ")));
            let mut q = sqlx::query(&sql);
            for (id, price) in chunk {
                q = q.bind(id.as_str()).bind(**price);
            }
            q.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Places `order` (its `eventId` becomes the outbox row's; `occurredAt` is set to now), retrying
    /// a transaction the database aborted (a lock timeout, a lost connection) for up to a minute;
    /// a retry first looks whether the earlier commit went through.
    ///
    /// Errors: the database failed for a minute.
    pub(super) async fn place(&self, order: &OrderCreated) -> Result<Placed> {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let mut retried = false;
        loop {
            let attempt = async {
                if retried && self.exists(&order.order_id).await? {
                    return Ok(Placed::Accepted);
                }
                self.try_place(order).await
            };
            match attempt.await {
                Ok(p) => return Ok(p),
                Err(e) if std::time::Instant::now() < deadline => {
                    tracing::debug!(order = %order.order_id, error = %e, "order service: transaction retried");
                    retried = true;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(e).with_context(|| format!("order service: writing order {}", order.order_id)),
            }
        }
    }

    async fn exists(&self, order_id: &str) -> Result<bool, sqlx::Error> {
        let row =
            sqlx::query(&self.q("SELECT COUNT(*) FROM orders WHERE order_id = ?")).bind(order_id).fetch_one(self.store.pool()).await?;
        Ok(row.try_get::<i64, _>(0)? > 0)
    }

    /// One transaction: the `orders` row first (its primary key refuses a second write of the
    /// order, and on SQLite the write lock is taken before anything is read, so concurrent
    /// writers wait on the busy timeout instead of failing on a stale snapshot), then the
    /// products check and prices (unknown → rollback, rejected), the lines, the total, the
    /// outbox row; commit.
    async fn try_place(&self, order: &OrderCreated) -> Result<Placed, sqlx::Error> {
        let now = now_ms();
        let mut tx = self.store.pool().begin().await?;
        sqlx::query(&self.q(
            "INSERT INTO orders (order_id, customer_id, hq_id, store_id, status, total_amount, created_at) VALUES (?, ?, ?, ?, ?, 0, ?)",
        ))
        .bind(&order.order_id)
        .bind(&order.customer_id)
        .bind(&order.hq_id)
        .bind(&order.store_id)
        .bind(ORDER_CREATED)
        .bind(now)
        .execute(&mut *tx)
        .await?;

        // Validate and price from the catalogue.
        let mut prices: HashMap<String, i64> = HashMap::new();
        if !order.items.is_empty() {
            let marks = vec!["?"; order.items.len()].join(", ");
            let sql = self.q(&format!("SELECT product_id, unit_price FROM products WHERE active = 1 AND product_id IN ({marks})"));
            let mut q = sqlx::query(&sql);
            for item in &order.items {
                q = q.bind(&item.product_id);
            }
            for row in q.fetch_all(&mut *tx).await? {
                prices.insert(row.try_get::<String, _>(0)?, row.try_get::<i64, _>(1)?);
            }
        }
        let unknown: Vec<String> =
            order.items.iter().filter(|i| !prices.contains_key(&i.product_id)).map(|i| i.product_id.clone()).collect();
        if order.items.is_empty() || !unknown.is_empty() {
            tx.rollback().await?;
            return Ok(Placed::Rejected(unknown));
        }
        let items: Vec<OrderItem> = order.items.iter().map(|i| OrderItem { unit_price: prices[&i.product_id], ..i.clone() }).collect();
        let total: i64 = items.iter().map(|i| i.unit_price * i64::from(i.quantity)).sum();

        let sql = self.q(&format!(
            "INSERT INTO order_lines (order_id, line_no, product_id, quantity, unit_price) VALUES {}",
            vec!["(?, ?, ?, ?, ?)"; items.len()].join(", ")
        ));
        let mut q = sqlx::query(&sql);
        for (n, item) in items.iter().enumerate() {
            q = q.bind(&order.order_id).bind(n as i64 + 1).bind(&item.product_id).bind(i64::from(item.quantity)).bind(item.unit_price);
        }
        q.execute(&mut *tx).await?;
        sqlx::query(&self.q("UPDATE orders SET total_amount = ? WHERE order_id = ?"))
            .bind(total)
            .bind(&order.order_id)
            .execute(&mut *tx)
            .await?;

        let event = OrderCreated { occurred_at: now, items, ..order.clone() };
        let payload = serde_json::to_string(&event).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
        sqlx::query(&self.q(
            "INSERT INTO outbox (aggregate_id, topic, event_type, event_id, payload, created_at) VALUES (?, ?, 'OrderCreated', ?, ?, ?)",
        ))
        .bind(&order.order_id)
        .bind(&self.topic)
        .bind(&order.event_id)
        .bind(payload)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Placed::Accepted)
    }

    /// True when no outbox row of the topic is `PENDING` (every one `COMPLETED` or `QUARANTINED`).
    pub(super) async fn drained(&self) -> Result<bool> {
        Ok(self.store.stats(Some(&self.topic)).await?.pending == 0)
    }

    /// Whether `order_id` has an `orders` row.
    pub(super) async fn has_order(&self, order_id: &str) -> Result<bool> {
        Ok(self.exists(order_id).await?)
    }

    /// The outbox section of the summary, read back from the database.
    pub(super) async fn summary(&self, writers: usize, rejected: Vec<String>) -> Result<OutboxSummary> {
        let pool = self.store.pool();
        let rows = sqlx::query(&self.q("SELECT status, created_at, published_at FROM outbox WHERE topic = ?"))
            .bind(&self.topic)
            .fetch_all(pool)
            .await?;
        let mut rows_by_status: BTreeMap<String, i64> =
            ["COMPLETED", "PENDING", "QUARANTINED"].iter().map(|s| (s.to_string(), 0)).collect();
        let mut lags = Vec::new();
        for row in &rows {
            let status: String = row.try_get(0)?;
            if status == "COMPLETED" {
                if let Some(published) = row.try_get::<Option<i64>, _>(2)? {
                    lags.push(published - row.try_get::<i64, _>(1)?);
                }
            }
            *rows_by_status.entry(status).or_default() += 1;
        }
        let orders_rows: i64 = sqlx::query("SELECT COUNT(*) FROM orders").fetch_one(pool).await?.try_get(0)?;
        let (publish_lag_ms, mean) = lag_stats(&mut lags);
        Ok(OutboxSummary {
            database: format!("{:?}", self.store.dialect()).to_lowercase(),
            writers,
            rows_by_status,
            orders_rows,
            rejected_orders: rejected.len(),
            rejected,
            publish_lag_ms,
            publish_lag_mean_ms: mean,
            lag_target_mean_ms: LAG_TARGET_MEAN_MS,
            lag_target_met: !lags.is_empty() && mean <= LAG_TARGET_MEAN_MS,
        })
    }
}

/// p50 / p99 / max (nearest rank) and the mean of `lags` (sorted in place); zeros when empty.
fn lag_stats(lags: &mut [i64]) -> (BTreeMap<String, i64>, f64) {
    lags.sort_unstable();
    let pct = |q: f64| lags.get(((lags.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or(0);
    let mean = if lags.is_empty() { 0.0 } else { lags.iter().sum::<i64>() as f64 / lags.len() as f64 };
    (BTreeMap::from([("p50".to_string(), pct(0.5)), ("p99".to_string(), pct(0.99)), ("max".to_string(), pct(1.0))]), mean)
}

/// `url` without its password (`postgres://user:***@host/db`).
pub(super) fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => match url[s + 3..at].split_once(':') {
            Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
            None => url.to_string(),
        },
        _ => url.to_string(),
    }
}

/// The catalogue the demo loads: every product its orders name, at the unit price of its first
/// line (TPC-H: the part's retail price; every line of a part carries the same).
pub(super) fn catalogue<'a>(orders: impl IntoIterator<Item = &'a OrderCreated>) -> BTreeMap<String, i64> {
    let mut out = BTreeMap::new();
    for order in orders {
        for item in &order.items {
            out.entry(item.product_id.clone()).or_insert(item.unit_price);
        }
    }
    out
}

/// Seed 002's refusal, on purpose: an order naming a product the catalogue does not hold. The
/// service must reject it and write nothing.
pub(super) const UNKNOWN_PRODUCT_ORDER: &str = "REJECT-UNKNOWN-PRODUCT";

pub(super) fn unknown_product_order(now: i64) -> OrderCreated {
    OrderCreated {
        event_id: format!("order-{UNKNOWN_PRODUCT_ORDER}"),
        occurred_at: now,
        order_id: UNKNOWN_PRODUCT_ORDER.into(),
        customer_id: "C-SEED".into(),
        hq_id: super::SEED_HQ.into(),
        store_id: "ST-SEED-1".into(),
        items: vec![
            OrderItem { product_id: "P-001".into(), quantity: 1, unit_price: 1000 },
            OrderItem { product_id: "P-UNKNOWN".into(), quantity: 1, unit_price: 1000 },
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_percentiles_and_mean() {
        let mut lags = vec![40, 10, 30, 20, 1000];
        let (p, mean) = lag_stats(&mut lags);
        assert_eq!((p["p50"], p["p99"], p["max"]), (30, 1000, 1000));
        assert!((mean - 220.0).abs() < 1e-9);
        let (p, mean) = lag_stats(&mut []);
        assert_eq!((p["p50"], mean), (0, 0.0));
    }

    #[test]
    fn passwords_are_hidden() {
        assert_eq!(redact("postgres://orderflow:secret@127.0.0.1:5432/orderflow"), "postgres://orderflow:***@127.0.0.1:5432/orderflow");
        assert_eq!(redact("sqlite://.state/outbox.db?mode=rwc"), "sqlite://.state/outbox.db?mode=rwc");
    }

    /// The whole service on an in-memory SQLite database: accepted orders are priced from the
    /// catalogue and written with their outbox row, an unknown product writes nothing.
    #[tokio::test]
    async fn accepts_known_products_and_rejects_unknown_ones() {
        let dir = std::env::temp_dir().join(format!("orderflow-order-service-{}-{}", std::process::id(), now_ms()));
        let url = format!("sqlite://{}/db.sqlite?mode=rwc", dir.display());
        let s = OrderService::open(&url, 2, "order.created").await.unwrap();
        s.reset().await.unwrap();
        s.load_products(&BTreeMap::from([("P-001".to_string(), 250), ("P-002".to_string(), 100)])).await.unwrap();
        let order = OrderCreated {
            event_id: "e-1".into(),
            occurred_at: 0,
            order_id: "O-1".into(),
            customer_id: "C-1".into(),
            hq_id: "HQ".into(),
            store_id: "ST".into(),
            items: vec![
                OrderItem { product_id: "P-001".into(), quantity: 2, unit_price: 1 },
                OrderItem { product_id: "P-002".into(), quantity: 3, unit_price: 1 },
            ],
        };
        assert_eq!(s.place(&order).await.unwrap(), Placed::Accepted);
        assert_eq!(s.place(&unknown_product_order(0)).await.unwrap(), Placed::Rejected(vec!["P-UNKNOWN".into()]));
        assert!(s.has_order("O-1").await.unwrap());
        assert!(!s.has_order(UNKNOWN_PRODUCT_ORDER).await.unwrap());
        let pool = s.store.pool();
        let total: i64 = sqlx::query("SELECT total_amount FROM orders WHERE order_id = 'O-1'").fetch_one(pool).await.unwrap().get(0);
        assert_eq!(total, 2 * 250 + 3 * 100);
        let payload: String = sqlx::query("SELECT payload FROM outbox").fetch_one(pool).await.unwrap().get(0);
        let event: OrderCreated = serde_json::from_str(&payload).unwrap();
        assert_eq!((event.event_id.as_str(), event.items[0].unit_price), ("e-1", 250));
        let sum = s.summary(1, vec![UNKNOWN_PRODUCT_ORDER.into()]).await.unwrap();
        assert_eq!((sum.rows_by_status["PENDING"], sum.orders_rows, sum.rejected_orders), (1, 1, 1));
        assert!(!s.drained().await.unwrap());
        // A rerun on the kept database starts empty.
        assert_eq!(s.reset().await.unwrap(), 1);
        assert!(s.drained().await.unwrap());
        drop(s);
        let _ = std::fs::remove_dir_all(dir);
    }
}
