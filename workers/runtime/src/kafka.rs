//! librdkafka client configuration and topic administration.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::ToBytes;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;

use crate::topology::{BrokerConfig, GroupProtocol, Topology};

/// How long produced records may wait for the broker's acknowledgements before their producer
/// reports not-ready (it keeps waiting: librdkafka retries until `message.timeout.ms`).
pub const ACK_STALL: Duration = Duration::from_secs(5);

/// Awaits `acks` (the delivery futures of one unit or batch, `what` in the log lines). Past
/// [`ACK_STALL`] it logs once and calls `report(true)` (the caller reports not-ready); when the
/// acknowledgements arrive it logs how long a stalled wait took and calls `report(false)`.
/// Used by the workers' commit and the outbox relay: one rule for both.
pub async fn await_acks<F: std::future::Future>(worker: &str, what: &str, acks: F, mut report: impl FnMut(bool)) -> F::Output {
    tokio::pin!(acks);
    let started = std::time::Instant::now();
    let mut stalled = false;
    loop {
        tokio::select! {
            out = &mut acks => {
                if stalled {
                    tracing::info!(%worker, waited_s = started.elapsed().as_secs_f64(), "broker acknowledged the {what}; ready");
                }
                report(false);
                return out;
            }
            _ = tokio::time::sleep(ACK_STALL), if !stalled => {
                stalled = true;
                tracing::warn!(%worker, "no acknowledgement from the broker for {} s; not ready, still waiting", ACK_STALL.as_secs());
                report(true);
            }
        }
    }
}

/// How long [`send_in_order`] waits before offering a record again to a full producer queue.
pub const QUEUE_FULL_WAIT: Duration = Duration::from_millis(2);

/// Produces `records` through `producer` in their order and waits for every acknowledgement: per
/// record, `(partition, offset)` where the broker wrote it, or why it did not.
///
/// librdkafka keeps a partition's records in the order they were enqueued, and the idempotent
/// producer keeps that order on the broker through retries. rdkafka's `FutureProducer::send`
/// does not keep it across concurrent sends: a record refused with `QueueFull` (more than
/// `queue.buffering.max.messages` or `queue.buffering.max.kbytes` waiting) retries on its own
/// 100 ms timer, so the records of one batch sent as concurrent futures overtake each other once
/// the queue is full. Issue 18 saw it in the changelog: a 200,000-record unit's commit marker
/// written before 49,009 of its own state records, which a restore then dropped as an unfinished
/// unit (35,333 stock records lost). Here a record is enqueued only after the one before it,
/// waiting [`QUEUE_FULL_WAIT`] at a time while the queue is full; the acknowledgements are
/// awaited after the last one is enqueued. Used by every producer whose order matters: the
/// workers' commit, the outbox relay, `dlq resend`, and the raw passthrough baseline.
pub async fn send_in_order<'a, K, P>(producer: &FutureProducer, records: Vec<FutureRecord<'a, K, P>>) -> Vec<Result<(i32, i64), KafkaError>>
where
    K: ToBytes + ?Sized + 'a,
    P: ToBytes + ?Sized + 'a,
{
    let mut enqueued = Vec::new();
    for mut record in records {
        loop {
            match producer.send_result(record) {
                Ok(delivery) => {
                    enqueued.push(Ok(delivery));
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    tokio::time::sleep(QUEUE_FULL_WAIT).await;
                }
                Err((e, _)) => {
                    enqueued.push(Err(e));
                    break;
                }
            }
        }
    }
    let mut acks = Vec::with_capacity(enqueued.len());
    for e in enqueued {
        acks.push(match e {
            Ok(delivery) => match delivery.await {
                Ok(Ok(d)) => Ok((d.partition, d.offset)),
                Ok(Err((e, _))) => Err(e),
                Err(_canceled) => Err(KafkaError::Canceled),
            },
            Err(e) => Err(e),
        });
    }
    acks
}

/// Which side of a worker a client is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Producer,
    Consumer,
    Admin,
}

/// Headers the runtime adds to every dead-letter record, beside the original record's own.
pub mod dlq_header {
    /// Prefix of every header the runtime adds to a dead-letter record.
    pub const PREFIX: &str = "orderflow.dlq.";
    /// Topic the dead-lettered record was read from.
    pub const SOURCE_TOPIC: &str = "orderflow.dlq.source-topic";
    /// Partition the dead-lettered record was read from (decimal).
    pub const SOURCE_PARTITION: &str = "orderflow.dlq.source-partition";
    /// Offset of the dead-lettered record in its source partition (decimal).
    pub const SOURCE_OFFSET: &str = "orderflow.dlq.source-offset";
    /// Worker (consumer group) that dead-lettered the record.
    pub const WORKER: &str = "orderflow.dlq.worker";
    /// Error class (`CodecError::class`, or an admission / processor class).
    pub const ERROR_CLASS: &str = "orderflow.dlq.error-class";
    /// Human-readable error message.
    pub const ERROR_MESSAGE: &str = "orderflow.dlq.error-message";
    /// Processing attempts before the record was dead-lettered (decimal).
    pub const ATTEMPTS: &str = "orderflow.dlq.attempts";
    /// When the record was dead-lettered, ms since the Unix epoch (decimal).
    pub const TIME: &str = "orderflow.dlq.time";
    /// Present when the value was left out (too large to re-produce): its original length in bytes.
    pub const VALUE_DROPPED: &str = "orderflow.dlq.value-dropped";
    /// Who moved a worker past the record (`orderflow skip --operator`; class `skipped` only).
    pub const OPERATOR: &str = "orderflow.dlq.operator";
    /// The whole range one `orderflow skip` moved past, `<topic>/<partition>/<first>..=<last>`
    /// (class `skipped` only).
    pub const SKIPPED_RANGE: &str = "orderflow.dlq.skipped-range";
}

/// The rdkafka record of `r` (its partition, key, value and headers as given; `None` fields left
/// to the producer: partitioner by key, tombstone, no headers). The one conversion from the
/// commit protocols' [`crate::commit::OutRecord`], for the workers and the CLI.
pub fn future_record(r: &crate::commit::OutRecord) -> rdkafka::producer::FutureRecord<'_, [u8], [u8]> {
    let mut record = rdkafka::producer::FutureRecord::<[u8], [u8]>::to(&r.topic);
    if let Some(p) = r.partition {
        record = record.partition(p);
    }
    if let Some(k) = &r.key {
        record = record.key(k.as_slice());
    }
    if let Some(v) = &r.value {
        record = record.payload(v.as_slice());
    }
    if !r.headers.is_empty() {
        let headers = r.headers.iter().fold(rdkafka::message::OwnedHeaders::new_with_capacity(r.headers.len()), |h, (k, v)| {
            h.insert(rdkafka::message::Header { key: k, value: v.as_deref() })
        });
        record = record.headers(headers);
    }
    record
}

/// Name of the dead-letter topic of `topic` (`<topic>.dlq`, domain contract).
pub fn dlq_topic(topic: &str) -> String {
    format!("{topic}.dlq")
}

/// Client configuration: orderflow's defaults, then `[broker.properties]`, then the side's own
/// table, so the topology can override anything (SASL/TLS settings pass through untouched).
///
/// Producer defaults: idempotent (`enable.idempotence=true`, `acks=all`) and the `murmur2_random`
/// partitioner, so keys land on the same partitions as with Java clients (co-partitioning of
/// topics written by different producers). Consumer defaults: manual commits, no automatic
/// offset store, `earliest` reset, `read_committed`.
pub fn client_config(broker: &BrokerConfig, side: Side) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &broker.bootstrap);
    match side {
        Side::Producer => {
            c.set("enable.idempotence", "true").set("acks", "all").set("partitioner", "murmur2_random");
        }
        Side::Consumer => {
            c.set("enable.auto.commit", "false")
                .set("enable.auto.offset.store", "false")
                .set("auto.offset.reset", "earliest")
                .set("isolation.level", "read_committed")
                .set("enable.partition.eof", "false");
        }
        Side::Admin => {}
    }
    for (k, v) in &broker.properties {
        c.set(k, v);
    }
    let side_props = match side {
        Side::Producer => &broker.producer,
        Side::Consumer => &broker.consumer,
        Side::Admin => return c,
    };
    for (k, v) in side_props {
        c.set(k, v);
    }
    if side == Side::Producer
        && c.get("enable.idempotence") == Some("false")
        && c.get("max.in.flight.requests.per.connection").is_none()
        && c.get("max.in.flight").is_none()
    {
        // Without idempotence a retried request can land after a later one; one request in
        // flight keeps each partition in send order (a unit's changelog records before its
        // commit marker, per-key order of outputs). Retries may then duplicate records, which
        // eventId dedupe and changelog compensation absorb.
        c.set("max.in.flight.requests.per.connection", "1");
    }
    c
}

/// Client properties the KIP-848 consumer protocol leaves to the broker (`group.consumer.*`);
/// librdkafka refuses a consumer that sets them with `group.protocol=consumer`.
pub const CLASSIC_ONLY_PROPERTIES: [&str; 3] = ["session.timeout.ms", "heartbeat.interval.ms", "partition.assignment.strategy"];

/// Sets `group.protocol` on a group member's configuration. For [`GroupProtocol::Consumer`]
/// also removes [`CLASSIC_ONLY_PROPERTIES`], so one topology serves both protocols (its session
/// and heartbeat settings apply to the classic protocol only), and asks the broker for the
/// `range` assignor (`group.remote.assignor`) unless the topology names one: a worker's state
/// is kept per partition number across its co-partitioned inputs, so partition p of every input
/// must go to the same member. The broker's default, `uniform`, does not keep that (seen on
/// Kafka 4.1: a member got `stock.reserved[2]` without `order.cancelled[2]`); the classic
/// protocol's client-side `range` assignor does, as does the broker-side one.
pub fn set_group_protocol(config: &mut ClientConfig, protocol: GroupProtocol) {
    config.set("group.protocol", protocol.as_str());
    if protocol == GroupProtocol::Consumer {
        for k in CLASSIC_ONLY_PROPERTIES {
            config.remove(k);
        }
        if config.get("group.remote.assignor").is_none() {
            config.set("group.remote.assignor", "range");
        }
    }
}

/// Errors of topic administration.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("kafka admin client: {0}")]
    Client(#[from] rdkafka::error::KafkaError),
    #[error("cannot create topic {topic}: {code}")]
    Create { topic: String, code: RDKafkaErrorCode },
    #[error("topic {topic} has partitions without a leader {within:?} after it was created")]
    NotReady { topic: String, within: Duration },
}

/// Creates every topic the topology declares, plus the dead-letter topic of every worker input
/// and the compacted changelog topic of every worker, with the declared partitions and cleanup
/// policy. Topics that already exist are left alone.
/// Returns the names of the topics it created, once every partition of every topic (new or
/// existing) has a leader ([`TOPICS_READY_WITHIN`]).
pub async fn create_topics(topology: &Topology) -> Result<Vec<String>, AdminError> {
    let admin: AdminClient<DefaultClientContext> = client_config(&topology.broker, Side::Admin).create()?;
    let mut specs: Vec<(String, i32, i32, String)> =
        topology.topics.iter().map(|(name, t)| (name.clone(), t.partitions, t.replication_factor, t.cleanup_policy.clone())).collect();
    for (name, w) in &topology.workers {
        // The worker's changelog: compacted, co-partitioned with its inputs.
        if let Some(t) = w.inputs.first().and_then(|i| topology.topics.get(i)) {
            specs.push((crate::changelog::topic(name), t.partitions, t.replication_factor, "compact".into()));
        }
        for input in &w.inputs {
            if let Some(t) = topology.topics.get(input) {
                let dlq = topology.dead_letter_of(input);
                if !specs.iter().any(|s| s.0 == dlq) {
                    specs.push((dlq, t.partitions, t.replication_factor, "delete".into()));
                }
            }
        }
    }
    let new_topics: Vec<NewTopic> = specs
        .iter()
        .map(|(name, partitions, rf, cleanup)| {
            NewTopic::new(name, *partitions, TopicReplication::Fixed(*rf)).set("cleanup.policy", cleanup)
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let mut created = Vec::new();
    for result in admin.create_topics(&new_topics, &opts).await? {
        match result {
            Ok(name) => created.push(name),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => return Err(AdminError::Create { topic, code }),
        }
    }
    let expected: Vec<(String, i32)> = specs.iter().map(|(name, partitions, _, _)| (name.clone(), *partitions)).collect();
    wait_for_leaders(admin, expected, TOPICS_READY_WITHIN).await?;
    Ok(created)
}

/// How long [`create_topics`] waits for every partition to have a leader.
pub const TOPICS_READY_WITHIN: Duration = Duration::from_secs(30);

/// Waits until the broker's metadata shows every topic of `expected` (name, partitions) with all
/// its partitions and a leader for each, and each leader answers a watermark (ListOffsets) query. Apache Kafka answers CreateTopics once the controller
/// has recorded the topics, before the brokers have taken leadership: a client that asks for
/// offsets in between gets `NOT_LEADER_OR_FOLLOWER` (seen on Kafka 4.1 right after `orderflow
/// topics`). Polls the metadata every 100 ms on the blocking pool.
///
/// Errors: [`AdminError::NotReady`] with the first topic still without leaders after `within`.
async fn wait_for_leaders(
    admin: AdminClient<DefaultClientContext>,
    expected: Vec<(String, i32)>,
    within: Duration,
) -> Result<(), AdminError> {
    tokio::task::spawn_blocking(move || {
        let until = std::time::Instant::now() + within;
        loop {
            let pending = match admin.inner().fetch_metadata(None, Duration::from_secs(5)) {
                Ok(md) => expected.iter().find(|(name, partitions)| {
                    !md.topics().iter().any(|t| {
                        t.name() == name
                            && t.error().is_none()
                            && t.partitions().len() == *partitions as usize
                            && t.partitions().iter().all(|p| p.leader() >= 0 && p.error().is_none())
                    })
                }),
                Err(_) => expected.first(),
            };
            // Leaders in the metadata cache may still be taking over their partitions: ask
            // each one for its offsets too (what the first consumer or tool will do).
            let pending = pending.or_else(|| {
                expected.iter().find(|(name, partitions)| {
                    (0..*partitions).any(|p| admin.inner().fetch_watermarks(name, p, Duration::from_secs(5)).is_err())
                })
            });
            let Some((topic, _)) = pending else { return Ok(()) };
            if std::time::Instant::now() >= until {
                return Err(AdminError::NotReady { topic: topic.clone(), within });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    })
    .await
    .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::DefaultProducerContext;

    /// A full producer queue must not reorder a batch: with room for 20 records and 3,000 sent,
    /// every record lands at its own index (a fresh one-partition topic starts at offset 0).
    /// rdkafka's concurrent `send` futures put records out of order here (each refused record
    /// retries on its own timer), which is how a unit's commit marker once overtook its records.
    #[tokio::test]
    async fn a_full_queue_keeps_the_batch_in_order() {
        let mock = MockCluster::<'static, DefaultProducerContext>::new(1).unwrap();
        mock.create_topic("ordered", 1, 1).unwrap();
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", mock.bootstrap_servers())
            .set("enable.idempotence", "true")
            .set("queue.buffering.max.messages", "20")
            .set("linger.ms", "1")
            .create()
            .unwrap();
        let payloads: Vec<String> = (0..3_000).map(|i| i.to_string()).collect();
        let records = payloads.iter().map(|p| FutureRecord::<str, str>::to("ordered").partition(0).payload(p.as_str())).collect();
        let acks = send_in_order(&producer, records).await;
        let offsets: Vec<i64> = acks.into_iter().map(|a| a.expect("delivered").1).collect();
        assert_eq!(offsets, (0..3_000).collect::<Vec<i64>>());
    }
}
