//! The outbox table through `sqlx` (its `Any` driver over PostgreSQL, MariaDB/MySQL and SQLite):
//! migrations, claims, completions, failures, and the operator's list / show / requeue.
//!
//! # Claims
//!
//! A relay claims a batch in three statements, the same on every database:
//! 1. candidates: `PENDING` rows of its topic whose backoff and earlier claim have passed and
//!    that are the oldest unfinished row of their aggregate (no earlier row of the same
//!    `aggregate_id` and topic is `PENDING` or `QUARANTINED`), oldest first;
//! 2. a conditional `UPDATE` sets a fresh `claim_token` and `claimed_until = now + lease` on
//!    those still unclaimed: of two relays racing for a row, the database's row lock lets one
//!    update win, the other updates nothing;
//! 3. the rows holding the token, by id.
//!
//! Per-aggregate order comes from the row statuses, not from locks held across the publish: a
//! later row of an order is not a candidate until every earlier one is `COMPLETED`, and a row
//! is `COMPLETED` only after the broker acknowledged it. No database transaction stays open while
//! the relay talks to Kafka, and a relay killed mid-batch leaves its claim to expire (`lease`).

use std::str::FromStr;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, ConnectOptions as _, Row as _};

use crate::row::{AfterFailure, OutboxRow, Status};

/// Which database a URL names; the SQL that differs per database is chosen by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Postgres,
    MySql,
    Sqlite,
}

impl Dialect {
    /// The dialect of a `postgres://`, `postgresql://`, `mysql://`, `mariadb://` or `sqlite:` URL.
    ///
    /// Errors: any other scheme.
    pub fn of_url(url: &str) -> Result<Dialect, StoreError> {
        let scheme = url.split(':').next().unwrap_or_default().to_ascii_lowercase();
        match scheme.as_str() {
            "postgres" | "postgresql" => Ok(Dialect::Postgres),
            "mysql" | "mariadb" => Ok(Dialect::MySql),
            "sqlite" => Ok(Dialect::Sqlite),
            _ => Err(StoreError::Url(format!("unsupported database URL scheme {scheme:?} (postgres://, mysql://, mariadb://, sqlite:)"))),
        }
    }

    /// `sql` with its `?` placeholders in this dialect's syntax (`$1`, `$2`… on PostgreSQL).
    pub fn sql(self, sql: &str) -> String {
        if self != Dialect::Postgres {
            return sql.to_string();
        }
        let mut out = String::with_capacity(sql.len() + 16);
        let mut n = 0;
        for c in sql.chars() {
            if c == '?' {
                n += 1;
                out.push('$');
                out.push_str(&n.to_string());
            } else {
                out.push(c);
            }
        }
        out
    }
}

/// Database failures. Every one of them is an outage to wait out, never a reason to quarantine a
/// row, except [`StoreError::Url`] and [`StoreError::Migrate`], which stop the relay.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database URL: {0}")]
    Url(String),
    #[error("database migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
}

/// Counts for the metrics and `orderflow outbox list`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Stats {
    pub pending: i64,
    pub quarantined: i64,
    /// `created_at` of the oldest `PENDING` row, ms since the epoch.
    pub oldest_pending_created_at: Option<i64>,
}

/// A filter for [`OutboxStore::list`].
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub status: Option<Status>,
    pub topic: Option<String>,
    pub aggregate_id: Option<String>,
    /// At most this many rows, oldest first.
    pub limit: i64,
}

const COLUMNS: &str = "id, aggregate_id, topic, event_type, event_id, payload, status, retry_count, last_error, \
                       next_attempt_at, created_at, published_at, requeued_at, requeued_by";

/// The outbox table of one database.
#[derive(Clone)]
pub struct OutboxStore {
    pool: AnyPool,
    dialect: Dialect,
}

impl OutboxStore {
    /// Connects with a pool of at most `max_connections` (each checked out for at most
    /// `acquire_timeout`). SQLite files are put in WAL mode with a 5 s busy timeout, so several
    /// processes can share one.
    ///
    /// Errors: [`StoreError::Url`] for an unknown scheme, [`StoreError::Db`] when the database
    /// cannot be reached.
    pub async fn connect(url: &str, max_connections: u32, acquire_timeout: Duration) -> Result<OutboxStore, StoreError> {
        sqlx::any::install_default_drivers();
        let dialect = Dialect::of_url(url)?;
        if dialect == Dialect::Sqlite {
            create_sqlite_dir(url)?;
        }
        let options = AnyConnectOptions::from_str(url)?.disable_statement_logging();
        let pool = AnyPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(acquire_timeout)
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if dialect == Dialect::Sqlite {
                        sqlx::query("PRAGMA journal_mode = WAL").execute(&mut *conn).await?;
                        sqlx::query("PRAGMA busy_timeout = 5000").execute(&mut *conn).await?;
                    }
                    Ok(())
                })
            })
            .connect_with(options)
            .await?;
        Ok(OutboxStore { pool, dialect })
    }

    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// The connection pool, for writers that insert rows in their own transactions (the demo's
    /// reference order service, tests).
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Applies the migrations shipped in `workers/outbox-relay/migrations/<dialect>/` (the outbox
    /// table; versions below 1000); already applied ones are skipped. Migrations of other sets in
    /// the same database's `_sqlx_migrations` (the demo's reference order service, 1001…) are
    /// ignored.
    ///
    /// Errors: [`StoreError::Migrate`] (a changed migration, a failing statement).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let mut migrator = match self.dialect {
            Dialect::Postgres => sqlx::migrate!("./migrations/postgres"),
            Dialect::MySql => sqlx::migrate!("./migrations/mysql"),
            Dialect::Sqlite => sqlx::migrate!("./migrations/sqlite"),
        };
        migrator.set_ignore_missing(true);
        migrator.run(&self.pool).await?;
        Ok(())
    }

    fn q(&self, sql: &str) -> String {
        self.dialect.sql(sql)
    }

    /// Claims at most `limit` publishable rows of `topic` for `lease` (module docs); returns them
    /// by id, with the claim's token for [`OutboxStore::complete`] and [`OutboxStore::fail`].
    ///
    /// Errors: [`StoreError::Db`].
    pub async fn claim(&self, topic: &str, limit: i64, lease: Duration, now_ms: i64) -> Result<(String, Vec<OutboxRow>), StoreError> {
        let candidates: Vec<i64> =
            sqlx::query(&self.q("SELECT o.id FROM outbox o WHERE o.topic = ? AND o.status = 'PENDING' AND o.next_attempt_at <= ? \
             AND o.claimed_until <= ? AND NOT EXISTS (SELECT 1 FROM outbox p WHERE p.aggregate_id = o.aggregate_id \
             AND p.topic = o.topic AND p.id < o.id AND p.status <> 'COMPLETED') ORDER BY o.id LIMIT ?"))
            .bind(topic)
            .bind(now_ms)
            .bind(now_ms)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| r.try_get::<i64, _>(0))
            .collect::<Result<_, _>>()?;
        let token = uuid::Uuid::new_v4().to_string();
        if candidates.is_empty() {
            return Ok((token, Vec::new()));
        }
        let marks = vec!["?"; candidates.len()].join(", ");
        let sql = self.q(&format!(
            "UPDATE outbox SET claim_token = ?, claimed_until = ? WHERE status = 'PENDING' AND claimed_until <= ? AND id IN ({marks})"
        ));
        let mut update = sqlx::query(&sql).bind(&token).bind(now_ms.saturating_add(lease.as_millis() as i64)).bind(now_ms);
        for id in &candidates {
            update = update.bind(*id);
        }
        if update.execute(&self.pool).await?.rows_affected() == 0 {
            return Ok((token, Vec::new()));
        }
        let rows = sqlx::query(&self.q(&format!("SELECT {COLUMNS} FROM outbox WHERE claim_token = ? ORDER BY id")))
            .bind(&token)
            .fetch_all(&self.pool)
            .await?;
        let rows = rows.iter().map(row_of).collect::<Result<Vec<_>, _>>()?;
        Ok((token, rows))
    }

    /// Extends the claim `token` to `now + lease`; returns how many rows it still holds (fewer
    /// than claimed: the lease had passed and another relay took them).
    ///
    /// Errors: [`StoreError::Db`].
    pub async fn renew(&self, token: &str, lease: Duration, now_ms: i64) -> Result<u64, StoreError> {
        let r = sqlx::query(&self.q("UPDATE outbox SET claimed_until = ? WHERE claim_token = ? AND status = 'PENDING'"))
            .bind(now_ms.saturating_add(lease.as_millis() as i64))
            .bind(token)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected())
    }

    /// Marks the rows `ids` of claim `token` `COMPLETED` at `now_ms`; returns how many it
    /// marked (rows whose claim passed to another relay are left to it).
    ///
    /// Errors: [`StoreError::Db`].
    pub async fn complete(&self, token: &str, ids: &[i64], now_ms: i64) -> Result<u64, StoreError> {
        let mut done = 0;
        for chunk in ids.chunks(500) {
            let marks = vec!["?"; chunk.len()].join(", ");
            let sql = self.q(&format!(
                "UPDATE outbox SET status = 'COMPLETED', published_at = ?, claim_token = NULL, claimed_until = 0 \
                 WHERE claim_token = ? AND status = 'PENDING' AND id IN ({marks})"
            ));
            let mut q = sqlx::query(&sql).bind(now_ms).bind(token);
            for id in chunk {
                q = q.bind(*id);
            }
            done += q.execute(&self.pool).await?.rows_affected();
        }
        Ok(done)
    }

    /// Records a failed attempt of row `id` of claim `token` ([`crate::row::Failure::apply`]);
    /// false when the claim had passed to another relay.
    ///
    /// Errors: [`StoreError::Db`].
    pub async fn fail(&self, token: &str, id: i64, after: &AfterFailure) -> Result<bool, StoreError> {
        let r = sqlx::query(
            &self.q("UPDATE outbox SET status = ?, retry_count = ?, last_error = ?, next_attempt_at = ?, claim_token = NULL, \
             claimed_until = 0 WHERE id = ? AND claim_token = ? AND status = 'PENDING'"),
        )
        .bind(after.status.as_str())
        .bind(after.retry_count)
        .bind(&after.last_error)
        .bind(after.next_attempt_at)
        .bind(id)
        .bind(token)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Gives the rows of claim `token` back unchanged (the broker was not reachable, or the relay
    /// is stopping): no attempt is counted.
    ///
    /// Errors: [`StoreError::Db`].
    pub async fn release(&self, token: &str) -> Result<u64, StoreError> {
        let r =
            sqlx::query(&self.q("UPDATE outbox SET claim_token = NULL, claimed_until = 0 WHERE claim_token = ? AND status = 'PENDING'"))
                .bind(token)
                .execute(&self.pool)
                .await?;
        Ok(r.rows_affected())
    }

    /// Pending and quarantined counts and the oldest pending row's age, of `topic` (all topics
    /// when `None`).
    ///
    /// Errors: [`StoreError::Db`].
    pub async fn stats(&self, topic: Option<&str>) -> Result<Stats, StoreError> {
        let filter = if topic.is_some() { " AND topic = ?" } else { "" };
        let count = |status: &'static str| {
            let sql = self.q(&format!("SELECT COUNT(*), MIN(created_at) FROM outbox WHERE status = '{status}'{filter}"));
            async move {
                let mut q = sqlx::query(&sql);
                if let Some(t) = topic {
                    q = q.bind(t);
                }
                let row = q.fetch_one(&self.pool).await?;
                Ok::<_, StoreError>((row.try_get::<i64, _>(0)?, row.try_get::<Option<i64>, _>(1)?))
            }
        };
        let (pending, oldest) = count("PENDING").await?;
        let (quarantined, _) = count("QUARANTINED").await?;
        Ok(Stats { pending, quarantined, oldest_pending_created_at: oldest })
    }

    /// Rows matching `filter`, oldest first.
    ///
    /// Errors: [`StoreError::Db`].
    pub async fn list(&self, filter: &ListFilter) -> Result<Vec<OutboxRow>, StoreError> {
        let mut sql = format!("SELECT {COLUMNS} FROM outbox WHERE 1 = 1");
        if filter.status.is_some() {
            sql.push_str(" AND status = ?");
        }
        if filter.topic.is_some() {
            sql.push_str(" AND topic = ?");
        }
        if filter.aggregate_id.is_some() {
            sql.push_str(" AND aggregate_id = ?");
        }
        sql.push_str(" ORDER BY id LIMIT ?");
        let sql = self.q(&sql);
        let mut q = sqlx::query(&sql);
        if let Some(s) = filter.status {
            q = q.bind(s.as_str());
        }
        if let Some(t) = &filter.topic {
            q = q.bind(t.clone());
        }
        if let Some(a) = &filter.aggregate_id {
            q = q.bind(a.clone());
        }
        let rows = q.bind(filter.limit).fetch_all(&self.pool).await?;
        Ok(rows.iter().map(row_of).collect::<Result<_, _>>()?)
    }

    /// Row `id`, if it exists.
    ///
    /// Errors: [`StoreError::Db`].
    pub async fn show(&self, id: i64) -> Result<Option<OutboxRow>, StoreError> {
        let row = sqlx::query(&self.q(&format!("SELECT {COLUMNS} FROM outbox WHERE id = ?"))).bind(id).fetch_optional(&self.pool).await?;
        Ok(row.as_ref().map(row_of).transpose()?)
    }

    /// Releases quarantined rows `ids` back to `PENDING` with their attempts reset, recording who
    /// and when (`requeued_by`, `requeued_at`); `last_error` is kept until the next attempt.
    /// Returns the ids that were quarantined and are now pending (others are left alone).
    ///
    /// Errors: [`StoreError::Db`].
    pub async fn requeue(&self, ids: &[i64], operator: &str, now_ms: i64) -> Result<Vec<i64>, StoreError> {
        let mut released = Vec::new();
        for id in ids {
            let r =
                sqlx::query(&self.q("UPDATE outbox SET status = 'PENDING', retry_count = 0, next_attempt_at = 0, claim_token = NULL, \
                 claimed_until = 0, requeued_at = ?, requeued_by = ? WHERE id = ? AND status = 'QUARANTINED'"))
                .bind(now_ms)
                .bind(operator)
                .bind(*id)
                .execute(&self.pool)
                .await?;
            if r.rows_affected() == 1 {
                released.push(*id);
            }
        }
        if self.dialect == Dialect::Postgres && !released.is_empty() {
            sqlx::query("SELECT pg_notify('orderflow_outbox', '')").execute(&self.pool).await?;
        }
        Ok(released)
    }

    /// Deletes at most `limit` `COMPLETED` rows published before `before_ms` (the relay's
    /// `completed_retention`); returns how many.
    ///
    /// Errors: [`StoreError::Db`].
    pub async fn purge_completed(&self, before_ms: i64, limit: i64) -> Result<u64, StoreError> {
        let sql = match self.dialect {
            Dialect::MySql => "DELETE FROM outbox WHERE status = 'COMPLETED' AND published_at < ? ORDER BY id LIMIT ?".to_string(),
            _ => self.q(
                "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox WHERE status = 'COMPLETED' AND published_at < ? ORDER BY id LIMIT ?)",
            ),
        };
        Ok(sqlx::query(&sql).bind(before_ms).bind(limit).execute(&self.pool).await?.rows_affected())
    }
}

/// Creates the folder of a SQLite file URL (`sqlite://.state/outbox.db?mode=rwc`) if missing.
fn create_sqlite_dir(url: &str) -> Result<(), StoreError> {
    let path = url.trim_start_matches("sqlite:").trim_start_matches("//");
    let path = path.split('?').next().unwrap_or_default();
    if path.is_empty() || path == ":memory:" {
        return Ok(());
    }
    match std::path::Path::new(path).parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(dir) => std::fs::create_dir_all(dir).map_err(|e| StoreError::Url(format!("cannot create {}: {e}", dir.display()))),
        None => Ok(()),
    }
}

/// A text column: `TEXT`/`VARCHAR` arrive as text, MySQL's `LONGTEXT` as bytes through `Any`.
fn text(row: &AnyRow, col: &str) -> Result<Option<String>, sqlx::Error> {
    match row.try_get::<Option<String>, _>(col) {
        Ok(v) => Ok(v),
        Err(_) => row.try_get::<Option<Vec<u8>>, _>(col).map(|b| b.map(|b| String::from_utf8_lossy(&b).into_owned())),
    }
}

fn required(row: &AnyRow, col: &str) -> Result<String, sqlx::Error> {
    text(row, col)?.ok_or_else(|| sqlx::Error::ColumnDecode { index: col.into(), source: "NULL in a NOT NULL column".into() })
}

fn row_of(row: &AnyRow) -> Result<OutboxRow, sqlx::Error> {
    let status = required(row, "status")?;
    Ok(OutboxRow {
        id: row.try_get("id")?,
        aggregate_id: required(row, "aggregate_id")?,
        topic: required(row, "topic")?,
        event_type: required(row, "event_type")?,
        event_id: text(row, "event_id")?,
        payload: required(row, "payload")?,
        status: Status::parse(&status).map_err(|e| sqlx::Error::ColumnDecode { index: "status".into(), source: e.into() })?,
        retry_count: row.try_get("retry_count")?,
        last_error: text(row, "last_error")?,
        next_attempt_at: row.try_get("next_attempt_at")?,
        created_at: row.try_get("created_at")?,
        published_at: row.try_get("published_at")?,
        requeued_at: row.try_get("requeued_at")?,
        requeued_by: text(row, "requeued_by")?,
    })
}

#[cfg(test)]
mod tests;
