//! The relay loop: claim a batch of rows ([`OutboxStore::claim`]), build and check their records,
//! produce them (one Kafka transaction per batch under `exactly_once`, an idempotent producer
//! otherwise), then mark them: `COMPLETED` once acknowledged, a failed attempt for a row the
//! broker or the codec refused, unchanged (released) when the broker could not be reached.
//!
//! Outages are waited out: a database error or a broker outage never counts against a row. Only
//! faults of the row itself do ([`Failure`] classes): a payload that does not fit its event, a
//! record over the topic's size limit, a record the broker refused.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use orderflow_runtime::codec::Codec;
use orderflow_runtime::commit::OutRecord;
use orderflow_runtime::headers::output_headers;
use orderflow_runtime::kafka::{await_acks, client_config, future_record, send_in_order, Side};
use orderflow_runtime::limits::{self, Limits};
use orderflow_runtime::metrics::Metrics;
use orderflow_runtime::topology::{BrokerConfig, Guarantee};
use orderflow_runtime::txn::{TxnError, TxnErrorClass, TxnProducer};
use rdkafka::error::KafkaError;
use rdkafka::producer::FutureProducer;
use rdkafka::types::RDKafkaErrorCode;
use tokio::sync::{watch, Notify};
use tracing::{info, warn};

use crate::config::Config;
use crate::row::{Failure, OutboxRow};
use crate::store::{Dialect, OutboxStore, StoreError};

/// What a relay instance needs: its place in the topology and the shared process objects.
pub struct RelaySetup {
    /// Worker name in the topology (metric label, client id).
    pub name: String,
    /// The topic of its `out` port: it publishes the rows whose `topic` is this one.
    pub topic: String,
    /// The topic's key field (`orderId`), checked against each row's `aggregate_id`.
    pub key_field: Option<String>,
    pub config: Config,
    pub broker: BrokerConfig,
    pub guarantee: Guarantee,
    /// The worker's group name: with the instance, the `transactional.id` under `exactly_once`.
    pub group: String,
    /// Instance id (pod name).
    pub instance: String,
    pub codec: Arc<Codec>,
    pub metrics: Metrics,
    /// CloudEvents and trace headers on every record (`record_headers`).
    pub record_headers: bool,
    /// Set while the database and the broker answer (`/readyz`).
    pub ready: Arc<AtomicBool>,
}

/// Why a relay stopped.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("producer: {0}")]
    Kafka(#[from] KafkaError),
    /// Fenced by another instance with the same transactional id, or unusable.
    #[error(transparent)]
    Txn(#[from] TxnError),
    #[error("topic size limits: {0}")]
    Limits(#[from] limits::LimitError),
}

/// How long to wait after a database or broker outage before trying again.
const OUTAGE_BACKOFF: Duration = Duration::from_secs(1);
/// How often the pending / quarantined gauges are refreshed.
const STATS_EVERY: Duration = Duration::from_secs(2);
/// How often completed rows past their retention are purged, and how many at a time.
const PURGE_EVERY: Duration = Duration::from_secs(60);
const PURGE_BATCH: i64 = 10_000;

/// The outcome of one batch's publish attempt.
#[derive(Default)]
struct Outcome {
    /// Acknowledged (inside a committed transaction under `exactly_once`).
    published: Vec<i64>,
    /// Refused for a reason of their own.
    failed: Vec<(usize, Failure)>,
    /// Neither: the broker or the registry did not answer; given back untouched.
    outage: Option<String>,
}

/// A running relay instance.
pub struct Relay {
    setup: RelaySetup,
    store: OutboxStore,
    producer: FutureProducer,
    txn: Option<TxnProducer>,
    limits: Limits,
    wake: Arc<Notify>,
    /// PostgreSQL's `LISTEN` task, stopped with the relay.
    listener: Option<tokio::task::JoinHandle<()>>,
}

impl Relay {
    /// Connects to the database (waiting while it is unreachable), applies the migrations,
    /// creates the producer (transactional under `exactly_once`) and reads the topic's size
    /// limit. `None` when `shutdown` came first.
    ///
    /// Errors: a bad URL or migration; producer creation or `init_transactions`; the limit lookup.
    pub async fn start(setup: RelaySetup, shutdown: &mut watch::Receiver<bool>) -> Result<Option<Relay>, RelayError> {
        let url = setup.config.url();
        let store = loop {
            match OutboxStore::connect(&url, setup.config.pool_size, Duration::from_secs(10)).await {
                Ok(s) => break s,
                Err(StoreError::Db(e)) => {
                    setup.metrics.retries.with_label_values(&[&setup.name, "database"]).inc();
                    warn!(worker = %setup.name, error = %e, "outbox database not reachable; retrying");
                    if wait_or_shutdown(shutdown, OUTAGE_BACKOFF).await {
                        return Ok(None);
                    }
                }
                Err(e) => return Err(e.into()),
            }
        };
        store.migrate().await?;
        let mut config = client_config(&setup.broker, Side::Producer);
        config.set("client.id", format!("{}-{}", setup.name, setup.instance));
        let (producer, txn) = if setup.guarantee == Guarantee::ExactlyOnce {
            config.set("transactional.id", format!("{}-{}", setup.group, setup.instance));
            let txn = TxnProducer::init(config, Duration::from_secs(60)).await?;
            (txn.producer(), Some(txn))
        } else {
            (config.create()?, None)
        };
        let limits = match limits::lookup(&setup.broker, std::slice::from_ref(&setup.topic)).await {
            Ok(l) => l,
            Err(e @ limits::LimitError::Producer { .. }) => return Err(e.into()),
            Err(e) => {
                warn!(worker = %setup.name, error = %e, "topic size limit unknown; checking against the producer's message.max.bytes only");
                Limits::producer_only(&setup.broker)?
            }
        };
        setup.metrics.guarantee.with_label_values(&[&setup.name, setup.guarantee.as_str()]).set(1);
        info!(worker = %setup.name, topic = %setup.topic, database = ?store.dialect(), guarantee = setup.guarantee.as_str(),
              limit_bytes = limits.of(&setup.topic).record_bytes(), "outbox relay started");
        let wake = Arc::new(Notify::new());
        let listener = (store.dialect() == Dialect::Postgres).then(|| tokio::spawn(listen(url, wake.clone(), setup.name.clone())));
        Ok(Some(Relay { setup, store, producer, txn, limits, wake, listener }))
    }

    /// Publishes until `shutdown`; a claim in hand is released on the way out.
    ///
    /// Errors: a fatal producer error (fenced by a newer instance with the same id).
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) -> Result<(), RelayError> {
        let s = &self.setup;
        let (mut last_stats, mut last_purge) = (Instant::now() - STATS_EVERY, Instant::now());
        loop {
            if *shutdown.borrow() {
                break;
            }
            if last_stats.elapsed() >= STATS_EVERY {
                last_stats = Instant::now();
                self.refresh_stats().await;
            }
            if last_purge.elapsed() >= PURGE_EVERY && !s.config.completed_retention.is_zero() {
                last_purge = Instant::now();
                let before = now_ms() - s.config.completed_retention.as_millis() as i64;
                if let Ok(n) = self.store.purge_completed(before, PURGE_BATCH).await {
                    if n > 0 {
                        info!(worker = %s.name, rows = n, "purged completed outbox rows past their retention");
                    }
                }
            }
            let (token, rows) = match self.store.claim(&s.topic, s.config.batch_size, s.config.claim_lease, now_ms()).await {
                Ok(c) => c,
                Err(e) => {
                    self.outage("database", &e.to_string());
                    if wait_or_shutdown(&mut shutdown, OUTAGE_BACKOFF).await {
                        break;
                    }
                    continue;
                }
            };
            if rows.is_empty() {
                s.ready.store(true, Ordering::Relaxed);
                tokio::select! {
                    _ = self.wake.notified() => {}
                    _ = tokio::time::sleep(s.config.poll_interval) => {}
                    _ = shutdown.changed() => {}
                }
                continue;
            }
            let outcome = self.publish(&rows).await?;
            self.settle(&token, &rows, outcome, &mut shutdown).await;
        }
        s.ready.store(false, Ordering::Relaxed);
        if let Some(l) = &self.listener {
            l.abort();
        }
        info!(worker = %s.name, "outbox relay stopped");
        Ok(())
    }

    fn outage(&self, cause: &'static str, error: &str) {
        let s = &self.setup;
        s.ready.store(false, Ordering::Relaxed);
        s.metrics.retries.with_label_values(&[&s.name, cause]).inc();
        warn!(worker = %s.name, cause, error, "outbox relay waiting out an outage");
    }

    async fn refresh_stats(&self) {
        let s = &self.setup;
        let Ok(stats) = self.store.stats(Some(&s.topic)).await else { return };
        let m = &s.metrics.outbox;
        m.pending.with_label_values(&[&s.name]).set(stats.pending);
        m.quarantined.with_label_values(&[&s.name]).set(stats.quarantined);
        let age = stats.oldest_pending_created_at.map_or(0, |t| (now_ms() - t).max(0) / 1000);
        m.oldest_pending.with_label_values(&[&s.name]).set(age);
    }

    /// Builds, checks and produces the records of `rows` (module docs).
    ///
    /// Errors: a fatal transactional error.
    async fn publish(&self, rows: &[OutboxRow]) -> Result<Outcome, RelayError> {
        let s = &self.setup;
        let mut out = Outcome::default();
        let mut records = Vec::with_capacity(rows.len());
        for (i, row) in rows.iter().enumerate() {
            match self.record(row).await {
                Ok(r) => records.push((i, r)),
                Err(RecordError::Row(f)) => out.failed.push((i, f)),
                Err(RecordError::Outage(e)) => {
                    out.outage = Some(e);
                    return Ok(out);
                }
            }
        }
        if records.is_empty() {
            return Ok(out);
        }
        if let Some(txn) = &self.txn {
            if let Err(e) = txn.begin().await {
                return self.txn_failed(e, out).await;
            }
        }
        // Under exactly_once the transactional producer's current one (a stuck call replaces it).
        let producer = self.txn.as_ref().map_or_else(|| self.producer.clone(), TxnProducer::producer);
        // In order: an aggregate's rows reach its partition in outbox order.
        let sends = send_in_order(&producer, records.iter().map(|(_, r)| future_record(r)).collect());
        // Past ACK_STALL the relay reports not-ready: the batch's transaction stays open meanwhile
        // and holds back read_committed readers of the partitions it wrote to.
        let ready = &s.ready;
        let acks = await_acks(&s.name, "batch", sends, |stalled| {
            if stalled {
                ready.store(false, Ordering::Relaxed);
            }
        })
        .await;
        let mut delivered = Vec::new();
        for ((i, _), ack) in records.iter().zip(acks) {
            match ack {
                Ok(_) => delivered.push(rows[*i].id),
                Err(e) if refused(&e) => out.failed.push((*i, Failure::new("rejected", e.to_string()))),
                Err(e) => out.outage = Some(e.to_string()),
            }
        }
        if let Some(txn) = &self.txn {
            // One refused record fails the transaction: nothing of it is visible, the others go
            // again in the next batch (not counted).
            if !out.failed.is_empty() || out.outage.is_some() {
                if let Err(e) = txn.abort().await {
                    if e.class == TxnErrorClass::Fatal {
                        return Err(e.into());
                    }
                }
                return Ok(out);
            }
            if let Err(e) = txn.commit_records().await {
                return self.txn_failed(e, out).await;
            }
        }
        let topic = s.topic.as_str();
        s.metrics.produced.with_label_values(&[&s.name, topic]).inc_by(delivered.len() as u64);
        let now = now_ms();
        for row in rows.iter().filter(|r| delivered.contains(&r.id)) {
            s.metrics.outbox.publish_lag.with_label_values(&[&s.name]).observe((now - row.created_at).max(0) as f64 / 1000.0);
        }
        out.published = delivered;
        Ok(out)
    }

    /// A failed transactional step: fatal stops the relay; otherwise the batch is an outage
    /// (aborted, released, tried again).
    async fn txn_failed(&self, e: TxnError, mut out: Outcome) -> Result<Outcome, RelayError> {
        if e.class == TxnErrorClass::Fatal {
            return Err(e.into());
        }
        if let Some(txn) = &self.txn {
            if let Err(abort) = txn.abort().await {
                if abort.class == TxnErrorClass::Fatal {
                    return Err(abort.into());
                }
            }
        }
        out.failed.clear();
        out.outage = Some(e.to_string());
        Ok(out)
    }

    /// The record of `row`: its event encoded for the topic, keyed by `aggregate_id`, with the
    /// output headers, within the topic's size limit.
    async fn record(&self, row: &OutboxRow) -> Result<OutRecord, RecordError> {
        let s = &self.setup;
        let event = row.event(s.key_field.as_deref()).map_err(RecordError::Row)?;
        let value = match s.codec.encode(&s.topic, &event).await {
            Ok(v) => v,
            Err(e) if e.is_permanent() => return Err(RecordError::Row(Failure::new("encode", e.to_string()))),
            Err(e) => return Err(RecordError::Outage(format!("schema registry: {e}"))),
        };
        let headers = if s.record_headers { output_headers(&event, &s.name, []) } else { Vec::new() };
        let record = OutRecord {
            topic: s.topic.clone(),
            partition: None,
            key: Some(row.aggregate_id.clone().into_bytes()),
            value: Some(value),
            headers,
        };
        self.limits.check_record(&record).map_err(|o| RecordError::Row(Failure::new("oversized", o.to_string())))?;
        Ok(record)
    }

    /// Writes the outcome of a batch to the database, retrying while it is unreachable (the
    /// claim's lease is renewed meanwhile, so no other relay republishes the batch needlessly).
    async fn settle(&self, token: &str, rows: &[OutboxRow], outcome: Outcome, shutdown: &mut watch::Receiver<bool>) {
        let s = &self.setup;
        let policy = s.config.retry();
        for (i, f) in &outcome.failed {
            s.metrics.outbox.failures.with_label_values(&[&s.name, f.class]).inc();
            let row = &rows[*i];
            let after = f.apply(row, &policy, now_ms());
            warn!(worker = %s.name, id = row.id, aggregate_id = %row.aggregate_id, attempt = after.retry_count,
                  status = after.status.as_str(), error = %after.last_error, "outbox row failed to publish");
        }
        if let Some(e) = &outcome.outage {
            self.outage("produce", e);
        }
        loop {
            match self.settle_once(token, rows, &outcome, &policy).await {
                Ok(()) => return,
                Err(e) => {
                    self.outage("database", &e.to_string());
                    // Keep the claim while the result is not written; past its lease another
                    // relay may publish the rows again (same eventIds, dropped downstream).
                    let _ = self.store.renew(token, s.config.claim_lease, now_ms()).await;
                    if wait_or_shutdown(shutdown, OUTAGE_BACKOFF).await {
                        return;
                    }
                }
            }
        }
    }

    async fn settle_once(
        &self,
        token: &str,
        rows: &[OutboxRow],
        outcome: &Outcome,
        policy: &crate::row::RetryPolicy,
    ) -> Result<(), StoreError> {
        let s = &self.setup;
        if !outcome.published.is_empty() {
            let marked = self.store.complete(token, &outcome.published, now_ms()).await?;
            if marked < outcome.published.len() as u64 {
                warn!(worker = %s.name, published = outcome.published.len(), marked,
                      "claim lease passed before the rows were marked; another relay publishes them again (same eventIds)");
            }
        }
        for (i, f) in &outcome.failed {
            self.store.fail(token, rows[*i].id, &f.apply(&rows[*i], policy, now_ms())).await?;
        }
        self.store.release(token).await?;
        if outcome.outage.is_none() {
            s.ready.store(true, Ordering::Relaxed);
        }
        Ok(())
    }
}

enum RecordError {
    Row(Failure),
    Outage(String),
}

/// Whether a delivery error is the broker refusing this record (counted against the row)
/// rather than an outage (waited out).
fn refused(e: &KafkaError) -> bool {
    limits::is_size_refusal(e)
        || matches!(
            e.rdkafka_error_code(),
            Some(
                RDKafkaErrorCode::InvalidMessage
                    | RDKafkaErrorCode::InvalidMessageSize
                    | RDKafkaErrorCode::InvalidRecord
                    | RDKafkaErrorCode::MessageSizeTooLarge
                    | RDKafkaErrorCode::MessageBatchTooLarge
                    | RDKafkaErrorCode::InvalidTimestamp
            )
        )
}

/// Sleeps `d` unless `shutdown` comes first; true when it did.
async fn wait_or_shutdown(shutdown: &mut watch::Receiver<bool>, d: Duration) -> bool {
    if *shutdown.borrow() {
        return true;
    }
    tokio::select! {
        _ = tokio::time::sleep(d) => *shutdown.borrow(),
        _ = shutdown.changed() => true,
    }
}

/// PostgreSQL only: `LISTEN orderflow_outbox` (the migration's trigger notifies on every insert)
/// and wake the relay on each notification; reconnects after a lost connection.
async fn listen(url: String, wake: Arc<Notify>, worker: String) {
    loop {
        match sqlx::postgres::PgListener::connect(&url).await {
            Ok(mut l) => {
                if let Err(e) = l.listen("orderflow_outbox").await {
                    warn!(%worker, error = %e, "LISTEN orderflow_outbox failed; polling only until it works");
                } else {
                    while l.recv().await.is_ok() {
                        wake.notify_one();
                    }
                }
            }
            Err(e) => warn!(%worker, error = %e, "LISTEN connection failed; polling only until it works"),
        }
        // Rows committed while the listener was away are found by the poll.
        wake.notify_one();
        tokio::time::sleep(OUTAGE_BACKOFF).await;
    }
}

/// Wall-clock time in ms since the Unix epoch.
pub fn now_ms() -> i64 {
    orderflow_runtime::worker::now_ms()
}
