//! The transactional producer behind the `exactly_once` guarantee (Kafka transactions, KIP-98,
//! with consumer offsets committed inside the transaction, KIP-447).
//!
//! [`TxnProducer`] wraps an rdkafka [`FutureProducer`] configured with `transactional.id`. One
//! unit of work is one transaction:
//!
//! 1. [`TxnProducer::begin`],
//! 2. produce the unit's outputs with [`TxnProducer::producer`] (ordinary `send`s),
//! 3. [`TxnProducer::commit`] with the input offsets the unit consumed up to and the consumer's
//!    [`ConsumerGroupMetadata`]: the offsets are added to the transaction
//!    (`send_offsets_to_transaction`) and the transaction is committed, so outputs and input
//!    progress become visible to `read_committed` consumers atomically.
//!
//! librdkafka's transactional calls block the calling thread (up to their timeout), so every one
//! of them runs on a thread of its own; the async executor is never blocked.
//!
//! A call that does not return within its timeout plus [`STUCK_GRACE`] is *stuck*: librdkafka
//! 2.x can block in `rd_kafka_send_offsets_to_transaction` forever when the group coordinator goes
//! away mid-transaction, its timeout ignored (confluentinc/librdkafka#5456, #5511; seen here after
//! a Kafka restart). The wrapper then abandons that producer (its thread stays blocked; the
//! thread is detached, so it holds up neither the executor nor the process's exit) and creates a
//! new one with the same `transactional.id`, whose `init_transactions` fences the abandoned one
//! and aborts the transaction it left open. What the step reports then depends on what the stuck
//! call was doing:
//!
//! - `send_offsets_to_transaction` or `begin_transaction`: the transaction had not reached its
//!   commit, so the coordinator aborts it: [`TxnErrorClass::Abortable`]; the caller's
//!   [`TxnProducer::abort`] then has nothing left to do and returns at once.
//! - `abort_transaction`: the new producer's initialisation completed the abort: `Ok`.
//! - `commit_transaction` or `init_transactions`: [`TxnErrorClass::Fatal`]. A stuck commit may
//!   have been decided either way; only a restart (restore from the changelog and the group's
//!   committed offsets, which the transaction either moved or did not) tells which.
//!
//! Errors are sorted into [`TxnErrorClass`]es, following librdkafka's transactional API contract
//! (`rdkafka.h`, "Transactional producer API"):
//!
//! - [`TxnErrorClass::Retriable`]: the step may be called again. The wrapper does so itself, with
//!   exponential backoff (100 ms, doubling, at most 5 s between attempts) until the step's time
//!   budget is spent; a retriable error is returned only when the budget ran out.
//! - [`TxnErrorClass::Abortable`]: the transaction cannot commit. The caller calls
//!   [`TxnProducer::abort`], rewinds its consumer to the unit's start offsets, discards the unit's
//!   staged state and reprocesses the unit in a new transaction.
//! - [`TxnErrorClass::Fatal`]: the producer is unusable (fenced by a newer instance with the same
//!   `transactional.id` — `PRODUCER_FENCED` / `INVALID_PRODUCER_EPOCH` —, authorization failure,
//!   misuse of the API, broker without transactions, ...). The caller exits non-zero; the restarted
//!   instance's `init` aborts whatever this one left open.
//!
//! Cancellation: dropping one of the async methods' futures does not stop the librdkafka call
//! already running on its thread; it finishes (or times out) in the background. Do not start
//! another step before the previous one has returned.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::producer::{FutureProducer, Producer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::TopicPartitionList;
use tokio::time::Instant;
use tracing::{error, warn};

/// First pause before retrying a step that failed with a retriable error.
pub const INITIAL_BACKOFF: Duration = Duration::from_millis(100);

/// Longest pause between two attempts of a step.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// How long a blocking transactional call may run past its own timeout before it is deemed stuck
/// and its producer replaced (module docs; librdkafka#5456).
pub const STUCK_GRACE: Duration = Duration::from_secs(5);

/// What the caller must do about a failed transactional step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TxnErrorClass {
    /// Transient (typically a timeout): the step can be called again. [`TxnProducer`] already
    /// retried until its time budget ran out before returning this.
    Retriable,
    /// The current transaction must be aborted ([`TxnProducer::abort`]); the producer stays
    /// usable for the next transaction once the unit has been rewound and is reprocessed.
    Abortable,
    /// The producer cannot continue (fenced, unauthorized, unsupported, misused): exit non-zero.
    Fatal,
}

impl TxnErrorClass {
    /// Lower-case name, for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            TxnErrorClass::Retriable => "retriable",
            TxnErrorClass::Abortable => "abortable",
            TxnErrorClass::Fatal => "fatal",
        }
    }
}

impl std::fmt::Display for TxnErrorClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Error codes that mean another producer with the same `transactional.id` took over (or the
/// producer is otherwise no longer allowed to write): always fatal, whatever the flags say.
fn is_fencing(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::ProducerFenced
            | RDKafkaErrorCode::InvalidProducerEpoch
            | RDKafkaErrorCode::TransactionalIdAuthorizationFailed
            | RDKafkaErrorCode::Fatal
    )
}

/// Error codes of non-transactional errors that are transient (timeouts, connection trouble,
/// coordinator moving).
fn is_transient(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::OperationTimedOut
            | RDKafkaErrorCode::TimedOutQueue
            | RDKafkaErrorCode::RequestTimedOut
            | RDKafkaErrorCode::BrokerTransportFailure
            | RDKafkaErrorCode::AllBrokersDown
            | RDKafkaErrorCode::NetworkException
            | RDKafkaErrorCode::CoordinatorLoadInProgress
            | RDKafkaErrorCode::CoordinatorNotAvailable
            | RDKafkaErrorCode::NotCoordinator
            | RDKafkaErrorCode::ConcurrentTransactions
    )
}

/// Classifies an error of a transactional call.
///
/// [`KafkaError::Transaction`] carries librdkafka's `rd_kafka_error_t`, whose flags decide:
/// fatal (`is_fatal`, or a fencing code) → [`TxnErrorClass::Fatal`]; `txn_requires_abort` →
/// [`TxnErrorClass::Abortable`]; `is_retriable` → [`TxnErrorClass::Retriable`]; an error with no
/// flag (wrong state, unsupported feature, ...) → [`TxnErrorClass::Fatal`].
///
/// Any other error (for instance [`KafkaError::Flush`], which rdkafka's `commit_transaction`
/// returns when flushing the outputs times out) is Fatal unless its code is clearly transient
/// (timeouts, transport failures, coordinator not available / loading / moved, concurrent
/// transactions), which makes it Retriable.
pub fn classify(err: &KafkaError) -> TxnErrorClass {
    if let KafkaError::Transaction(e) = err {
        return if e.is_fatal() || is_fencing(e.code()) {
            TxnErrorClass::Fatal
        } else if e.txn_requires_abort() {
            TxnErrorClass::Abortable
        } else if e.is_retriable() {
            TxnErrorClass::Retriable
        } else {
            TxnErrorClass::Fatal
        };
    }
    match err.rdkafka_error_code() {
        Some(code) if is_fencing(code) => TxnErrorClass::Fatal,
        Some(code) if is_transient(code) => TxnErrorClass::Retriable,
        _ => TxnErrorClass::Fatal,
    }
}

/// A failed transactional step.
#[derive(Debug, thiserror::Error)]
#[error("transactional producer: {step} failed ({class}): {source}")]
pub struct TxnError {
    /// What the caller must do (see [`TxnErrorClass`]).
    pub class: TxnErrorClass,
    /// The client's error.
    pub source: KafkaError,
    /// The step that failed: `create`, `init_transactions`, `begin_transaction`,
    /// `send_offsets_to_transaction`, `commit_transaction` or `abort_transaction`.
    pub step: &'static str,
}

/// A transactional producer: one transaction per unit of work (see the module docs).
///
/// Not meant to be shared between tasks: steps must not overlap.
pub struct TxnProducer {
    /// The current producer; replaced when a call on it got stuck.
    producer: Mutex<FutureProducer>,
    /// What `producer` was created from, to create its replacement.
    config: ClientConfig,
    timeout: Duration,
    attempt_timeout: Duration,
    stuck_grace: Duration,
    retries: Arc<AtomicU64>,
    replacements: AtomicU64,
    /// Set when `producer` replaced a stuck one mid-transaction: the replacement's
    /// `init_transactions` already aborted that transaction, so the next `abort` has nothing to do.
    aborted_by_replacement: AtomicBool,
}

impl TxnProducer {
    /// Creates the producer from `config` (which must set `transactional.id`; idempotence is
    /// implied) and runs `init_transactions`, which registers the `transactional.id` with its
    /// coordinator, fences any older producer with the same id and aborts the transaction such a
    /// producer left open. Both happen on the blocking pool.
    ///
    /// `timeout` is the time budget of each step (this one and every later `begin`, `commit`,
    /// `abort`), retries included. A good value is the unit's commit interval plus a margin,
    /// and at most `transaction.timeout.ms`.
    ///
    /// Errors: no `transactional.id` or invalid configuration (`step` = `create`, Fatal); any
    /// error of `init_transactions` that is not retriable, or a retriable one once `timeout` is
    /// spent.
    pub async fn init(config: ClientConfig, timeout: Duration) -> Result<TxnProducer, TxnError> {
        if config.get("transactional.id").is_none_or(str::is_empty) {
            return Err(TxnError {
                class: TxnErrorClass::Fatal,
                source: KafkaError::ClientCreation("transactional.id is not set".into()),
                step: "create",
            });
        }
        let producer = create(&config).await?;
        let txn = TxnProducer {
            producer: Mutex::new(producer),
            config,
            timeout,
            attempt_timeout: timeout,
            stuck_grace: STUCK_GRACE,
            retries: Arc::new(AtomicU64::new(0)),
            replacements: AtomicU64::new(0),
            aborted_by_replacement: AtomicBool::new(false),
        };
        txn.step("init_transactions", |p, t| p.init_transactions(t)).await?;
        Ok(txn)
    }

    /// Bounds each single blocking call to `attempt_timeout` (default: the whole step budget), so
    /// that a call timing out is retried within the budget instead of using all of it. Useful
    /// to see slow coordinators in the logs early; librdkafka resumes a timed-out
    /// `commit_transaction` / `abort_transaction` where it left off.
    pub fn with_attempt_timeout(mut self, attempt_timeout: Duration) -> Self {
        self.attempt_timeout = attempt_timeout;
        self
    }

    /// The current producer (a cheap handle), to `send` the unit's records inside the current
    /// transaction. Take it anew for each transaction: a stuck call replaces it (module docs).
    /// Do not call its transactional methods directly (they block).
    pub fn producer(&self) -> FutureProducer {
        self.producer.lock().expect("producer lock").clone()
    }

    /// How many times a step was retried after a retriable error, since `init`.
    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }

    /// How many times a stuck producer was replaced, since `init`.
    pub fn replacements(&self) -> u64 {
        self.replacements.load(Ordering::Relaxed)
    }

    /// Starts a transaction (`begin_transaction`).
    ///
    /// Errors: Fatal when the producer is in the wrong state (a transaction already open, or a
    /// previous fatal error).
    pub async fn begin(&self) -> Result<(), TxnError> {
        self.aborted_by_replacement.store(false, Ordering::Relaxed);
        self.step("begin_transaction", |p, _| p.begin_transaction()).await
    }

    /// Adds the consumer `offsets` to the transaction (`send_offsets_to_transaction`; skipped when
    /// `offsets` is empty) and commits it (`commit_transaction`, which first flushes the records
    /// produced in it). `offsets` are the *next* offsets to consume, as with a consumer commit;
    /// `group` comes from the input consumer's `group_metadata()`, taken after the unit's records
    /// were polled so that the broker can reject a commit from a zombie member (KIP-447).
    ///
    /// [`ConsumerGroupMetadata`] is `Send + Sync` but not `Clone`: it is moved into an [`Arc`]
    /// shared by the attempts that run on the blocking pool.
    ///
    /// Errors: Abortable → call [`TxnProducer::abort`] and reprocess the unit; Fatal → exit;
    /// Retriable → the budget ran out while the outcome was still unknown. To resume: if `step`
    /// is `send_offsets_to_transaction`, call `commit` again with the same offsets; if it is
    /// `commit_transaction`, call `commit` with an *empty* offset list (the offsets are already in
    /// the transaction, and librdkafka refuses new ones once the commit started). Otherwise treat
    /// it as Fatal.
    pub async fn commit(&self, offsets: TopicPartitionList, group: ConsumerGroupMetadata) -> Result<(), TxnError> {
        if offsets.count() > 0 {
            let offsets = Arc::new(offsets);
            let group = Arc::new(group);
            self.step("send_offsets_to_transaction", move |p, t| p.send_offsets_to_transaction(&offsets, &group, t)).await?;
        }
        self.step("commit_transaction", |p, t| p.commit_transaction(t)).await
    }

    /// Commits a transaction that holds records only, no consumer offsets (`commit_transaction`;
    /// the outbox relay, whose input position lives in its database).
    ///
    /// Errors: as [`TxnProducer::commit`]; Retriable → call it again.
    pub async fn commit_records(&self) -> Result<(), TxnError> {
        self.step("commit_transaction", |p, t| p.commit_transaction(t)).await
    }

    /// Aborts the current transaction (`abort_transaction`): its records are marked aborted and
    /// its offsets are not committed. Call it after an Abortable error (or to give up a unit),
    /// then rewind the consumer to the unit's start offsets and discard the unit's staged state.
    ///
    /// Returns at once when the transaction was already aborted by the replacement of a stuck
    /// producer (module docs).
    ///
    /// Errors: Fatal → exit; Retriable → budget ran out, may be called again.
    pub async fn abort(&self) -> Result<(), TxnError> {
        if self.aborted_by_replacement.swap(false, Ordering::Relaxed) {
            return Ok(());
        }
        self.step("abort_transaction", |p, t| p.abort_transaction(t)).await
    }

    /// Runs `call(producer, attempt_timeout)` on a thread of its own, retrying retriable errors
    /// with exponential backoff until the step's budget is spent; a call stuck past
    /// `attempt_timeout` + `stuck_grace` replaces the producer ([`TxnProducer::replace_stuck`]).
    async fn step<F>(&self, step: &'static str, call: F) -> Result<(), TxnError>
    where
        F: Fn(&FutureProducer, Duration) -> KafkaResult<()> + Send + Sync + 'static,
    {
        let call = Arc::new(call);
        let deadline = Instant::now() + self.timeout;
        let mut backoff = INITIAL_BACKOFF;
        loop {
            let attempt_timeout = deadline.saturating_duration_since(Instant::now()).min(self.attempt_timeout);
            let (producer, call_) = (self.producer(), call.clone());
            let attempt = blocking(step, move || call_(&producer, attempt_timeout));
            let source = match tokio::time::timeout(attempt_timeout + self.stuck_grace, attempt).await {
                Ok(result) => match result? {
                    Ok(()) => return Ok(()),
                    Err(e) => e,
                },
                Err(_) => return self.replace_stuck(step, attempt_timeout).await,
            };
            let class = classify(&source);
            if class == TxnErrorClass::Retriable && Instant::now() + backoff < deadline {
                warn!(step, error = %source, backoff_ms = backoff.as_millis() as u64, "transactional step failed, retrying");
                self.retries.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
            return Err(TxnError { class, source, step });
        }
    }
}

impl TxnProducer {
    /// A call of `step` on the current producer did not return within `attempt_timeout` plus the
    /// grace: abandons that producer to its blocked thread and puts in a new one with the same
    /// `transactional.id`, whose `init_transactions` fences the old one and aborts its open
    /// transaction. What the step then returns is in the module docs.
    async fn replace_stuck(&self, step: &'static str, attempt_timeout: Duration) -> Result<(), TxnError> {
        let stuck = TxnError { class: TxnErrorClass::Fatal, source: KafkaError::Global(RDKafkaErrorCode::OperationTimedOut), step };
        error!(
            step,
            waited_ms = (attempt_timeout + self.stuck_grace).as_millis() as u64,
            "transactional call stuck past its timeout (librdkafka#5456); replacing the producer"
        );
        if matches!(step, "commit_transaction" | "init_transactions") {
            return Err(stuck);
        }
        let producer = create(&self.config).await?;
        let budget = self.timeout;
        let init = producer.clone();
        match tokio::time::timeout(budget + self.stuck_grace, blocking("init_transactions", move || init.init_transactions(budget))).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(source))) => return Err(TxnError { class: TxnErrorClass::Fatal, source, step: "init_transactions" }),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(TxnError { step: "init_transactions", ..stuck }),
        }
        *self.producer.lock().expect("producer lock") = producer;
        self.replacements.fetch_add(1, Ordering::Relaxed);
        warn!(step, "stuck producer replaced; its transaction was aborted by the new one's init_transactions");
        if step == "abort_transaction" {
            return Ok(());
        }
        self.aborted_by_replacement.store(true, Ordering::Relaxed);
        Err(TxnError { class: TxnErrorClass::Abortable, ..stuck })
    }
}

/// A producer from `config`, created off the async threads.
///
/// Errors: invalid configuration (`step` = `create`, Fatal).
async fn create(config: &ClientConfig) -> Result<FutureProducer, TxnError> {
    let config = config.clone();
    blocking("create", move || {
        let producer = config.create::<FutureProducer>()?;
        // Learn the cluster before init_transactions: librdkafka replaces the bootstrap
        // connection by the brokers the metadata names, and an InitProducerId attempted in between
        // finds no broker up and is retried by a 500 ms timer (seen on every restart measured by
        // `orderflow bench recovery`, issue 18). Errors surface in init_transactions.
        let _ = producer.client().fetch_metadata(None, Duration::from_secs(5));
        Ok(producer)
    })
    .await?
    .map_err(|source| TxnError { class: TxnErrorClass::Fatal, source, step: "create" })
}

/// Runs `f` on a detached thread of its own (not tokio's blocking pool: a librdkafka call that
/// never returns must hold up neither the runtime's shutdown nor the process's exit). A panic in
/// `f` is propagated; a thread that cannot be spawned becomes a Fatal [`KafkaError::Canceled`].
async fn blocking<T, F>(step: &'static str, f: F) -> Result<T, TxnError>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new().name(format!("txn-{step}")).spawn(move || {
        let _ = tx.send(std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)));
    });
    let canceled = || TxnError { class: TxnErrorClass::Fatal, source: KafkaError::Canceled, step };
    if spawned.is_err() {
        return Err(canceled());
    }
    match rx.await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        Err(_) => Err(canceled()),
    }
}

#[cfg(test)]
mod tests {
    //! Against librdkafka's mock cluster (`rdkafka::mocking::MockCluster`). What the mock does
    //! NOT enforce (librdkafka 2.12.1, `rdkafka_mock_handlers.c`), asserted as such below:
    //! - `TxnOffsetCommit` is acknowledged but the offsets are not stored: the group's committed
    //!   offsets stay unset after a transactional commit;
    //! - no transaction markers and no aborted-transaction list in Fetch responses (LSO = high
    //!   watermark): `read_committed` consumers receive the records of aborted transactions;
    //! - `InitProducerId` without a current producer id always creates a *new* producer id with
    //!   epoch 0, so a second producer with the same `transactional.id` does not fence the first,
    //!   which keeps committing. Fencing is exercised by injecting `PRODUCER_FENCED` instead.
    use std::time::Duration;

    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::{DefaultProducerContext, FutureRecord};
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    use rdkafka::util::Timeout;
    use rdkafka::{Message, Offset};

    use super::*;

    const IN: &str = "in";
    const OUT: &str = "out";

    fn mock() -> MockCluster<'static, DefaultProducerContext> {
        let mock = MockCluster::new(1).unwrap();
        mock.create_topic(IN, 1, 1).unwrap();
        mock.create_topic(OUT, 1, 1).unwrap();
        mock
    }

    fn txn_config(bootstrap: &str, txn_id: &str) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", bootstrap).set("transactional.id", txn_id).set("message.timeout.ms", "10000");
        c
    }

    fn consumer_config(bootstrap: &str, group: &str) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", bootstrap)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("isolation.level", "read_committed");
        c
    }

    fn tpl(topic: &str, offset: i64) -> TopicPartitionList {
        let mut t = TopicPartitionList::new();
        t.add_partition_offset(topic, 0, Offset::Offset(offset)).unwrap();
        t
    }

    async fn send(p: &FutureProducer, topic: &str, payload: &str) {
        p.send(FutureRecord::<str, str>::to(topic).key("k").payload(payload), Timeout::After(Duration::from_secs(10)))
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }

    /// A group consumer on `in`, assigned partition 0, and its group metadata.
    async fn group_member(bootstrap: &str, group: &str) -> (BaseConsumer, ConsumerGroupMetadata) {
        let (b, g) = (bootstrap.to_string(), group.to_string());
        tokio::task::spawn_blocking(move || {
            let c: BaseConsumer = consumer_config(&b, &g).create().unwrap();
            c.assign(&tpl(IN, 0)).unwrap();
            let _ = c.poll(Duration::from_millis(100));
            let meta = c.group_metadata().expect("group metadata");
            (c, meta)
        })
        .await
        .unwrap()
    }

    /// Payloads a fresh `read_committed` consumer reads from `topic`: waits up to 15 s for
    /// `expect` records, then 500 ms more for any extra ones.
    async fn read_committed(bootstrap: &str, topic: &str, expect: usize) -> Vec<String> {
        let (b, t) = (bootstrap.to_string(), topic.to_string());
        tokio::task::spawn_blocking(move || {
            let c: BaseConsumer = consumer_config(&b, "reader").create().unwrap();
            let mut assignment = TopicPartitionList::new();
            assignment.add_partition_offset(&t, 0, Offset::Beginning).unwrap();
            c.assign(&assignment).unwrap();
            let mut seen = Vec::new();
            let started = std::time::Instant::now();
            let mut last = started;
            while started.elapsed() < Duration::from_secs(15) && (seen.len() < expect || last.elapsed() < Duration::from_millis(500)) {
                if let Some(m) = c.poll(Duration::from_millis(100)) {
                    let m = m.unwrap();
                    seen.push(String::from_utf8(m.payload().unwrap().to_vec()).unwrap());
                    last = std::time::Instant::now();
                }
            }
            seen
        })
        .await
        .unwrap()
    }

    /// The group's committed offset of `in`[0], read by a new member of `group`.
    async fn committed(bootstrap: &str, group: &str) -> Offset {
        let (b, g) = (bootstrap.to_string(), group.to_string());
        tokio::task::spawn_blocking(move || {
            let c: BaseConsumer = consumer_config(&b, &g).create().unwrap();
            let mut t = TopicPartitionList::new();
            t.add_partition(IN, 0);
            let got = c.committed_offsets(t, Duration::from_secs(10)).unwrap();
            got.find_partition(IN, 0).unwrap().offset()
        })
        .await
        .unwrap()
    }

    #[test]
    fn class_of_plain_errors() {
        assert_eq!(classify(&KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut)), TxnErrorClass::Retriable);
        assert_eq!(classify(&KafkaError::Global(RDKafkaErrorCode::NotCoordinator)), TxnErrorClass::Retriable);
        assert_eq!(classify(&KafkaError::Global(RDKafkaErrorCode::ProducerFenced)), TxnErrorClass::Fatal);
        assert_eq!(classify(&KafkaError::Global(RDKafkaErrorCode::InvalidProducerEpoch)), TxnErrorClass::Fatal);
        assert_eq!(classify(&KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge)), TxnErrorClass::Fatal);
        assert_eq!(classify(&KafkaError::Canceled), TxnErrorClass::Fatal);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn missing_transactional_id_is_fatal() {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", "127.0.0.1:1");
        let err = TxnProducer::init(c, Duration::from_secs(1)).await.err().unwrap();
        assert_eq!((err.class, err.step), (TxnErrorClass::Fatal, "create"));
        assert!(err.to_string().contains("create"), "{err}");
    }

    /// (a) init → begin → 3 records → commit with the group's offsets.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn commit_makes_records_visible() {
        let mock = mock();
        let bootstrap = mock.bootstrap_servers();
        let txn = TxnProducer::init(txn_config(&bootstrap, "t-commit"), Duration::from_secs(30)).await.unwrap();
        let (_member, meta) = group_member(&bootstrap, "g-commit").await;
        txn.begin().await.unwrap();
        for i in 0..3 {
            send(&txn.producer(), OUT, &format!("r{i}")).await;
        }
        txn.commit(tpl(IN, 3), meta).await.unwrap();
        assert_eq!(read_committed(&bootstrap, OUT, 3).await, ["r0", "r1", "r2"]);
        // A real broker would now return Offset(3). The mock acknowledges TxnOffsetCommit without
        // storing the offsets, so the group has no committed offset.
        assert_eq!(committed(&bootstrap, "g-commit").await, Offset::Invalid);
        // A second transaction on the same producer works.
        let (_member, meta) = group_member(&bootstrap, "g-commit").await;
        txn.begin().await.unwrap();
        send(&txn.producer(), OUT, "r3").await;
        txn.commit(TopicPartitionList::new(), meta).await.unwrap();
        assert_eq!(read_committed(&bootstrap, OUT, 4).await, ["r0", "r1", "r2", "r3"]);
        assert_eq!(txn.retries(), 0);
    }

    /// (b) begin → produce → abort: the transaction is closed. What the mock lets this test
    /// observe of that is the producer's transaction state: after `abort` a `commit` without a
    /// `begin` is refused (there is no transaction to commit; an `abort` that did nothing would
    /// leave the first one open and that commit would go through), and the next `begin` works.
    /// What abort does to the records (hidden from `read_committed`, visible at
    /// `read_uncommitted`) the mock cannot show: it writes no abort marker and delivers aborted
    /// records. That is checked on Kafka (`tests/transactions.rs`,
    /// `an_aborted_transaction_stays_invisible_and_a_committed_one_commits_its_offsets`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn abort() {
        let mock = mock();
        let bootstrap = mock.bootstrap_servers();
        let txn = TxnProducer::init(txn_config(&bootstrap, "t-abort"), Duration::from_secs(30)).await.unwrap();
        txn.begin().await.unwrap();
        send(&txn.producer(), OUT, "aborted").await;
        txn.abort().await.unwrap();
        // No transaction is open any more: committing one is refused (wrong state, Fatal class).
        let (_member, meta) = group_member(&bootstrap, "g-abort").await;
        let err = txn.commit(TopicPartitionList::new(), meta).await.expect_err("commit after abort without begin must fail");
        assert_eq!((err.class, err.step), (TxnErrorClass::Fatal, "commit_transaction"), "{err}");
        // The producer goes on with the next transaction.
        let (_member, meta) = group_member(&bootstrap, "g-abort").await;
        txn.begin().await.expect("begin after abort");
        send(&txn.producer(), OUT, "committed").await;
        txn.commit(tpl(IN, 1), meta).await.unwrap();
    }

    /// (c1) EndTxn keeps failing with COORDINATOR_LOAD_IN_PROGRESS: librdkafka retries the
    /// request internally, each `commit_transaction` attempt times out (retriable), and the wrapper
    /// calls it again until the commit goes through.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn retriable_commit_is_retried() {
        let mock = mock();
        let bootstrap = mock.bootstrap_servers();
        let txn = TxnProducer::init(txn_config(&bootstrap, "t-retry"), Duration::from_secs(30))
            .await
            .unwrap()
            .with_attempt_timeout(Duration::from_millis(300));
        let (_member, meta) = group_member(&bootstrap, "g-retry").await;
        txn.begin().await.unwrap();
        send(&txn.producer(), OUT, "x").await;
        mock.request_errors(RDKafkaApiKey::EndTxn, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_COORDINATOR_LOAD_IN_PROGRESS; 8]);
        txn.commit(tpl(IN, 1), meta).await.unwrap();
        eprintln!("commit succeeded after {} retries", txn.retries());
        assert!(txn.retries() >= 1, "retries: {}", txn.retries());
        assert_eq!(read_committed(&bootstrap, OUT, 1).await, ["x"]);
    }

    /// (c1') The same with a budget too short: the retriable error comes back as such, and the
    /// commit can be resumed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn retriable_commit_out_of_budget() {
        let mock = mock();
        let bootstrap = mock.bootstrap_servers();
        let txn = TxnProducer::init(txn_config(&bootstrap, "t-budget"), Duration::from_secs(30)).await.unwrap();
        let txn = TxnProducer { timeout: Duration::from_millis(700), ..txn }.with_attempt_timeout(Duration::from_millis(200));
        let (_member, meta) = group_member(&bootstrap, "g-budget").await;
        txn.begin().await.unwrap();
        send(&txn.producer(), OUT, "x").await;
        mock.request_errors(RDKafkaApiKey::EndTxn, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_COORDINATOR_LOAD_IN_PROGRESS; 30]);
        let err = txn.commit(tpl(IN, 1), meta).await.unwrap_err();
        eprintln!("{err} (after {} retries)", txn.retries());
        assert_eq!((err.class, err.step), (TxnErrorClass::Retriable, "commit_transaction"), "{err}");
        assert!(txn.retries() >= 1);
        // Resuming as documented: `commit` with no offsets only calls commit_transaction again.
        mock.clear_request_errors(RDKafkaApiKey::EndTxn);
        let (_member, meta) = group_member(&bootstrap, "g-budget").await;
        let txn = TxnProducer { timeout: Duration::from_secs(30), ..txn };
        txn.commit(TopicPartitionList::new(), meta).await.unwrap();
        assert_eq!(read_committed(&bootstrap, OUT, 1).await, ["x"]);
    }

    /// (c2) EndTxn fails with INVALID_PRODUCER_ID_MAPPING: abortable; abort, then the producer
    /// commits the reprocessed unit.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn abortable_commit() {
        let mock = mock();
        let bootstrap = mock.bootstrap_servers();
        let txn = TxnProducer::init(txn_config(&bootstrap, "t-abortable"), Duration::from_secs(30)).await.unwrap();
        let (_member, meta) = group_member(&bootstrap, "g-abortable").await;
        txn.begin().await.unwrap();
        send(&txn.producer(), OUT, "first try").await;
        mock.request_errors(RDKafkaApiKey::EndTxn, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_PRODUCER_ID_MAPPING]);
        let err = txn.commit(tpl(IN, 1), meta).await.unwrap_err();
        eprintln!("{err}");
        assert_eq!((err.class, err.step), (TxnErrorClass::Abortable, "commit_transaction"), "{err}");
        assert!(err.to_string().contains("commit_transaction"), "{err}");
        txn.abort().await.unwrap();
        let (_member, meta) = group_member(&bootstrap, "g-abortable").await;
        txn.begin().await.unwrap();
        send(&txn.producer(), OUT, "second try").await;
        txn.commit(tpl(IN, 1), meta).await.unwrap();
    }

    /// A transactional producer on the mock whose calls count as stuck after 200 ms + 300 ms.
    async fn quick_to_call_stuck(bootstrap: &str, txn_id: &str) -> TxnProducer {
        let txn = TxnProducer::init(txn_config(bootstrap, txn_id), Duration::from_secs(30)).await.unwrap();
        TxnProducer { stuck_grace: Duration::from_millis(300), ..txn }.with_attempt_timeout(Duration::from_millis(200))
    }

    /// A call that blocks for 3 s whatever its timeout, as `send_offsets_to_transaction` does in
    /// librdkafka#5456.
    fn never_returns(_: &FutureProducer, _: Duration) -> KafkaResult<()> {
        std::thread::sleep(Duration::from_secs(3));
        Ok(())
    }

    /// (e) `send_offsets_to_transaction` stuck past its timeout: the producer is replaced (a new
    /// client, initialised), the step is Abortable, the caller's abort has nothing left to do, and
    /// the next transaction commits on the new producer, well before the stuck call returns.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stuck_send_offsets_replaces_the_producer() {
        let mock = mock();
        let bootstrap = mock.bootstrap_servers();
        let txn = quick_to_call_stuck(&bootstrap, "t-stuck").await;
        let stuck = txn.producer();
        txn.begin().await.unwrap();
        send(&txn.producer(), OUT, "abandoned").await;
        let started = Instant::now();
        let err = txn.step("send_offsets_to_transaction", never_returns).await.unwrap_err();
        eprintln!("{err}");
        assert_eq!((err.class, err.step), (TxnErrorClass::Abortable, "send_offsets_to_transaction"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(2), "gave up after {:?}", started.elapsed());
        assert_eq!(txn.replacements(), 1);
        assert_ne!(stuck.client().native_ptr(), txn.producer().client().native_ptr(), "the producer was not replaced");
        txn.abort().await.expect("nothing left to abort");
        let (_member, meta) = group_member(&bootstrap, "g-stuck").await;
        txn.begin().await.unwrap();
        send(&txn.producer(), OUT, "after").await;
        txn.commit(tpl(IN, 1), meta).await.unwrap();
        assert!(started.elapsed() < Duration::from_secs(3), "the new producer waited for the stuck call");
        // The mock delivers aborted records too (module docs), so only the commit is checked here.
        assert!(read_committed(&bootstrap, OUT, 2).await.contains(&"after".to_string()));
        // The next abort is a real one again: with no transaction open it is refused.
        assert_eq!(txn.abort().await.unwrap_err().class, TxnErrorClass::Fatal);
    }

    /// (e') A stuck `abort_transaction` is done by the replacement's `init_transactions`: Ok; a
    /// stuck `commit_transaction` may have committed or not: Fatal, the producer left as it is.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stuck_abort_is_done_and_stuck_commit_is_fatal() {
        let mock = mock();
        let bootstrap = mock.bootstrap_servers();
        let txn = quick_to_call_stuck(&bootstrap, "t-stuck-2").await;
        txn.begin().await.unwrap();
        txn.step("abort_transaction", never_returns).await.expect("the replacement aborted it");
        assert_eq!(txn.replacements(), 1);
        txn.begin().await.expect("the new producer starts a transaction");
        let err = txn.step("commit_transaction", never_returns).await.unwrap_err();
        assert_eq!((err.class, err.step), (TxnErrorClass::Fatal, "commit_transaction"), "{err}");
        assert_eq!(txn.replacements(), 1);
    }

    /// (d) Two producers with the same `transactional.id`. On Kafka the second `init` fences the
    /// first, whose next commit fails with PRODUCER_FENCED (Fatal). The mock gives the second
    /// producer a new producer id and lets the first one go on committing; fencing as the
    /// broker reports it is then injected.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fencing() {
        let mock = mock();
        let bootstrap = mock.bootstrap_servers();
        let first = TxnProducer::init(txn_config(&bootstrap, "t-fence"), Duration::from_secs(30)).await.unwrap();
        let second = TxnProducer::init(txn_config(&bootstrap, "t-fence"), Duration::from_secs(30)).await.unwrap();
        let (_member, meta) = group_member(&bootstrap, "g-fence").await;
        first.begin().await.unwrap();
        send(&first.producer(), OUT, "zombie").await;
        // Real Kafka: Err with class Fatal (PRODUCER_FENCED). The mock does not fence.
        first.commit(tpl(IN, 1), meta).await.expect("the mock cluster does not fence (behaviour changed?)");

        let (_member, meta) = group_member(&bootstrap, "g-fence").await;
        first.begin().await.unwrap();
        send(&first.producer(), OUT, "zombie 2").await;
        mock.request_errors(RDKafkaApiKey::EndTxn, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_PRODUCER_FENCED]);
        let err = first.commit(tpl(IN, 2), meta).await.unwrap_err();
        eprintln!("{err}");
        assert_eq!((err.class, err.step), (TxnErrorClass::Fatal, "commit_transaction"), "{err}");
        assert_eq!(first.retries(), 0);
        // Fatal is final: the fenced producer cannot start another transaction.
        let err = first.begin().await.unwrap_err();
        eprintln!("{err}");
        assert_eq!(err.class, TxnErrorClass::Fatal, "{err}");
        // The second producer is unaffected.
        let (_member, meta) = group_member(&bootstrap, "g-fence").await;
        second.begin().await.unwrap();
        send(&second.producer(), OUT, "owner").await;
        second.commit(tpl(IN, 3), meta).await.unwrap();
    }

    /// (d') INVALID_PRODUCER_EPOCH from EndTxn: librdkafka reports it as fencing ("fenced by a
    /// newer instance"), Fatal.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn invalid_epoch_is_fatal() {
        let mock = mock();
        let bootstrap = mock.bootstrap_servers();
        let txn = TxnProducer::init(txn_config(&bootstrap, "t-epoch"), Duration::from_secs(30)).await.unwrap();
        let (_member, meta) = group_member(&bootstrap, "g-epoch").await;
        txn.begin().await.unwrap();
        send(&txn.producer(), OUT, "x").await;
        mock.request_errors(RDKafkaApiKey::EndTxn, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_PRODUCER_EPOCH]);
        let err = txn.commit(tpl(IN, 1), meta).await.unwrap_err();
        eprintln!("{err}");
        assert_eq!(err.class, TxnErrorClass::Fatal, "{err}");
    }
}
