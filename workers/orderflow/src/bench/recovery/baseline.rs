//! The bare-client baselines a restart is compared with: reading a changelog with one consumer, a
//! consumer joining a group.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use orderflow_runtime::kafka::{client_config, Side};
use orderflow_runtime::topology::Topology;
use orderflow_runtime::worker::now_ms;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use super::{BareJoin, RawRead};

/// One bare `BaseConsumer` reading every partition of `topic` from the beginning to the high
/// watermarks seen at the start.
pub(super) async fn raw_read(t: &Topology, topic: &str) -> Result<RawRead> {
    let (broker, topic) = (t.broker.clone(), topic.to_string());
    tokio::task::spawn_blocking(move || -> Result<RawRead> {
        let consumer: BaseConsumer = client_config(&broker, Side::Consumer)
            .set("group.id", format!("orderflow-bench-raw-read-{}", now_ms()))
            .set("enable.auto.commit", "false")
            // The end of a partition is where the consumer says so: under exactly_once the last
            // offset of a changelog partition is a commit marker, which no consumer is given.
            .set("enable.partition.eof", "true")
            .create()
            .context("raw read consumer")?;
        let md = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10)).context("changelog metadata")?;
        let partitions = md.topics().first().map(|t| t.partitions().len() as i32).unwrap_or(0);
        let mut ends = BTreeMap::new();
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            let (low, high) = crate::kafkaio::watermarks(&consumer, &topic, p)?;
            if high > low {
                ends.insert(p, high);
                tpl.add_partition_offset(&topic, p, Offset::Offset(low))?;
            }
        }
        let started = Instant::now();
        let (mut records, mut bytes) = (0u64, 0u64);
        if !ends.is_empty() {
            consumer.assign(&tpl)?;
            while !ends.is_empty() {
                if started.elapsed() > Duration::from_secs(1800) {
                    bail!("raw read of {topic}: {records} records in 30 min, partitions {ends:?} unfinished");
                }
                let m = match consumer.poll(Duration::from_millis(500)) {
                    None => continue,
                    Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                        ends.remove(&p);
                        continue;
                    }
                    Some(m) => m.with_context(|| format!("reading {topic}"))?,
                };
                records += 1;
                bytes += (m.key_len() + m.payload_len()) as u64;
                if ends.get(&m.partition()).is_some_and(|h| m.offset() + 1 >= *h) {
                    ends.remove(&m.partition());
                }
            }
        }
        let seconds = started.elapsed().as_secs_f64();
        let per_s = |n: f64| if seconds > 0.0 { n / seconds } else { 0.0 };
        Ok(RawRead {
            topic,
            partitions,
            records,
            bytes,
            seconds,
            records_per_s: per_s(records as f64),
            mib_per_s: per_s(bytes as f64 / (1024.0 * 1024.0)),
        })
    })
    .await?
}

/// A client context that does not log librdkafka's errors: the join consumer is dropped while
/// its offset fetch is in flight, which librdkafka reports as a (harmless) transport failure.
pub(super) struct Quiet;

impl rdkafka::ClientContext for Quiet {
    fn error(&self, _error: rdkafka::error::KafkaError, _reason: &str) {}
}

impl rdkafka::consumer::ConsumerContext for Quiet {}

/// Times a bare consumer joining a new group on `topic` twice under one static member id.
pub(super) async fn bare_join(t: &Topology, topic: &str) -> Result<BareJoin> {
    let (broker, topic) = (t.broker.clone(), topic.to_string());
    tokio::task::spawn_blocking(move || -> Result<BareJoin> {
        let group = format!("orderflow-bench-join-{}", now_ms());
        let mut took = Vec::new();
        for _ in 0..2 {
            let consumer: BaseConsumer<Quiet> = client_config(&broker, Side::Consumer)
                .set("group.id", &group)
                .set("group.instance.id", format!("{group}-0"))
                .create_with_context(Quiet)
                .context("join consumer")?;
            let started = Instant::now();
            consumer.subscribe(&[&topic])?;
            while consumer.assignment()?.count() == 0 {
                if started.elapsed() > Duration::from_secs(120) {
                    bail!("a bare consumer got no assignment of {topic} in 120 s");
                }
                let _ = consumer.poll(Duration::from_millis(10));
            }
            took.push(started.elapsed().as_secs_f64());
        }
        Ok(BareJoin { topic, first_s: took[0], rejoin_s: took[1] })
    })
    .await?
}
