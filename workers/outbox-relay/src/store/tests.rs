//! The claim rules on a real SQLite file (the same SQL runs on PostgreSQL and MariaDB in
//! tests/outbox.rs).

use std::time::Duration;

use super::*;
use crate::row::Failure;

const LEASE: Duration = Duration::from_secs(30);

async fn store() -> (tempfile::TempDir, OutboxStore) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/outbox.db?mode=rwc", dir.path().display());
    let s = OutboxStore::connect(&url, 4, Duration::from_secs(5)).await.unwrap();
    s.migrate().await.unwrap();
    s.migrate().await.unwrap();
    (dir, s)
}

async fn insert(s: &OutboxStore, aggregate: &str, topic: &str) -> i64 {
    let sql =
        s.dialect().sql("INSERT INTO outbox (aggregate_id, topic, event_type, payload, created_at) VALUES (?, ?, 'OrderCreated', '{}', ?)");
    sqlx::query(&sql).bind(aggregate).bind(topic).bind(1_000i64).execute(s.pool()).await.unwrap();
    sqlx::query("SELECT MAX(id) FROM outbox").fetch_one(s.pool()).await.unwrap().try_get::<i64, _>(0).unwrap()
}

fn ids(rows: &[OutboxRow]) -> Vec<i64> {
    rows.iter().map(|r| r.id).collect()
}

#[test]
fn placeholders_per_dialect() {
    assert_eq!(Dialect::Postgres.sql("a = ? AND b IN (?, ?)"), "a = $1 AND b IN ($2, $3)");
    assert_eq!(Dialect::MySql.sql("a = ?"), "a = ?");
    assert_eq!(Dialect::of_url("postgresql://x").unwrap(), Dialect::Postgres);
    assert_eq!(Dialect::of_url("mariadb://x").unwrap(), Dialect::MySql);
    assert_eq!(Dialect::of_url("sqlite::memory:").unwrap(), Dialect::Sqlite);
    assert!(Dialect::of_url("oracle://x").is_err());
}

/// Only the oldest unfinished row of each aggregate is claimed; the next one only after it is
/// COMPLETED; a claimed row is not claimed twice; other topics are not touched.
#[tokio::test]
async fn claims_keep_per_aggregate_order() {
    let (_d, s) = store().await;
    let a1 = insert(&s, "A", "t").await;
    let b1 = insert(&s, "B", "t").await;
    let a2 = insert(&s, "A", "t").await;
    let _other = insert(&s, "A", "other").await;
    let (t1, rows) = s.claim("t", 10, LEASE, 10_000).await.unwrap();
    assert_eq!(ids(&rows), [a1, b1]);
    let (_, none) = s.claim("t", 10, LEASE, 10_000).await.unwrap();
    assert!(none.is_empty(), "a2 waits for a1; a1 and b1 are claimed");
    assert_eq!(s.complete(&t1, &[a1, b1], 10_001).await.unwrap(), 2);
    let (_, rows) = s.claim("t", 10, LEASE, 10_002).await.unwrap();
    assert_eq!(ids(&rows), [a2]);
    let done = s.show(a1).await.unwrap().unwrap();
    assert_eq!((done.status, done.published_at), (Status::Completed, Some(10_001)));
}

/// A claim whose lease passed is taken by the next relay; the first relay's late completion
/// then marks nothing.
#[tokio::test]
async fn expired_claims_move_on() {
    let (_d, s) = store().await;
    let a1 = insert(&s, "A", "t").await;
    let (t1, _) = s.claim("t", 10, LEASE, 10_000).await.unwrap();
    let (t2, rows) = s.claim("t", 10, LEASE, 10_000 + LEASE.as_millis() as i64).await.unwrap();
    assert_eq!(ids(&rows), [a1]);
    assert_eq!(s.complete(&t1, &[a1], 50_000).await.unwrap(), 0);
    assert_eq!(s.renew(&t2, LEASE, 50_000).await.unwrap(), 1);
    assert_eq!(s.complete(&t2, &[a1], 50_001).await.unwrap(), 1);
}

/// Concurrent claims never hand one row to two relays.
#[tokio::test]
async fn concurrent_claims_do_not_overlap() {
    let (_d, s) = store().await;
    for i in 0..200 {
        insert(&s, &format!("O-{i}"), "t").await;
    }
    let claims = futures::future::join_all((0..4).map(|_| s.claim("t", 80, LEASE, 10_000))).await;
    let mut all: Vec<i64> = claims.into_iter().flat_map(|c| ids(&c.unwrap().1)).collect();
    let n = all.len();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), n, "a row was claimed twice");
    assert!(n > 0);
}

/// Seed 003: failures back off, the sixth quarantines; a quarantined row holds back later rows of
/// its aggregate but not other aggregates; requeue releases it with its attempts reset.
#[tokio::test]
async fn failures_quarantine_and_requeue_releases() {
    let (_d, s) = store().await;
    let a1 = insert(&s, "A", "t").await;
    let a2 = insert(&s, "A", "t").await;
    let b1 = insert(&s, "B", "t").await;
    let policy = crate::row::RetryPolicy {
        max_attempts: 2,
        initial_backoff: Duration::from_secs(1),
        multiplier: 2.0,
        max_backoff: Duration::from_secs(5),
    };
    let f = Failure::new("oversized", "too big");
    let (t, rows) = s.claim("t", 10, LEASE, 10_000).await.unwrap();
    assert_eq!(ids(&rows), [a1, b1]);
    assert!(s.fail(&t, a1, &f.apply(&rows[0], &policy, 10_000)).await.unwrap());
    s.complete(&t, &[b1], 10_000).await.unwrap();
    let (_, rows) = s.claim("t", 10, LEASE, 10_500).await.unwrap();
    assert!(rows.is_empty(), "a1 is backing off and a2 waits behind it");
    let (t, rows) = s.claim("t", 10, LEASE, 11_000).await.unwrap();
    assert_eq!(ids(&rows), [a1]);
    assert_eq!(rows[0].retry_count, 1);
    s.fail(&t, a1, &f.apply(&rows[0], &policy, 11_000)).await.unwrap();
    let q = s.show(a1).await.unwrap().unwrap();
    assert_eq!((q.status, q.retry_count, q.last_error.as_deref()), (Status::Quarantined, 2, Some("oversized: too big")));
    let (_, rows) = s.claim("t", 10, LEASE, 99_000).await.unwrap();
    assert!(rows.is_empty(), "a2 stays behind the quarantined a1");
    let stats = s.stats(Some("t")).await.unwrap();
    assert_eq!((stats.pending, stats.quarantined), (1, 1));
    let listed = s.list(&ListFilter { status: Some(Status::Quarantined), limit: 10, ..Default::default() }).await.unwrap();
    assert_eq!(ids(&listed), [a1]);
    assert_eq!(s.requeue(&[a1, a2], "alice", 100_000).await.unwrap(), [a1]);
    let r = s.show(a1).await.unwrap().unwrap();
    assert_eq!((r.status, r.retry_count, r.requeued_by.as_deref(), r.requeued_at), (Status::Pending, 0, Some("alice"), Some(100_000)));
    let (_, rows) = s.claim("t", 10, LEASE, 100_001).await.unwrap();
    assert_eq!(ids(&rows), [a1]);
}

/// A released claim is claimable at once, its attempts untouched.
#[tokio::test]
async fn release_counts_nothing() {
    let (_d, s) = store().await;
    let a1 = insert(&s, "A", "t").await;
    let (t, _) = s.claim("t", 10, LEASE, 10_000).await.unwrap();
    assert_eq!(s.release(&t).await.unwrap(), 1);
    let (_, rows) = s.claim("t", 10, LEASE, 10_001).await.unwrap();
    assert_eq!((ids(&rows), rows[0].retry_count), (vec![a1], 0));
}

#[tokio::test]
async fn purge_deletes_old_completed_rows_only() {
    let (_d, s) = store().await;
    let a1 = insert(&s, "A", "t").await;
    let b1 = insert(&s, "B", "t").await;
    let (t, _) = s.claim("t", 10, LEASE, 10_000).await.unwrap();
    s.complete(&t, &[a1], 10_000).await.unwrap();
    assert_eq!(s.purge_completed(20_000, 100).await.unwrap(), 1);
    assert!(s.show(a1).await.unwrap().is_none());
    assert!(s.show(b1).await.unwrap().is_some());
}
