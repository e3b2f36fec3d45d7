//! `orderflow tap` and `orderflow trace`: look at the saga's topics without disturbing it.
//!
//! * `orderflow tap TOPIC` prints the records of one topic as JSON lines, values decoded with the
//!   topology's [`Codec`](orderflow_runtime::codec::Codec) (see [`tap_json`] for the shape), filtered by key (`--key`) and by
//!   fields of the decoded value (`--where a.b=v`, see [`Where`]); it stops at the high
//!   watermark seen at start, or follows the topic until Ctrl-C (`--follow`).
//! * `orderflow trace ORDER_ID` collects every event of one order across the saga's topics and
//!   prints its timeline with the order's state after each event (see [`OrderState`]). It reads
//!   only the partitions the order's records can be on (see [`crate::kafkaio::partition_for`] and [`trace`]).
//!
//! Both read by assigning partitions to a consumer with a throwaway `group.id`, as `orderflow
//! dlq` does: they join no consumer group and commit nothing.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use orderflow_runtime::topology::{BrokerConfig, Topology};
use rdkafka::message::{Headers, Message};

use crate::dlq::{Coordinates, DeadLetter};
use crate::kafkaio::{Reader, Span};

mod order;
mod topic;

pub use order::*;
pub use topic::*;

/// Bytes of an undecodable value `tap` prints in hex.
const HEX_BYTES: usize = 256;
/// Characters of a timeline step's detail in the text output.
const DETAIL_WIDTH: usize = 90;

// ------------------------------------------------------------------------------------------
// Records and reading.

/// One record as read from the broker.
#[derive(Debug, Clone, PartialEq)]
pub struct Raw {
    pub at: Coordinates,
    /// The record's timestamp (producer create time, or broker append time), ms since the epoch.
    pub timestamp_ms: Option<i64>,
    pub key: Option<Vec<u8>>,
    /// Every header in record order (a null value is `None`).
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    pub value: Option<Vec<u8>>,
}

impl Raw {
    fn from_message<M: Message>(m: &M) -> Raw {
        Raw {
            at: Coordinates { topic: m.topic().to_string(), partition: m.partition(), offset: m.offset() },
            timestamp_ms: m.timestamp().to_millis(),
            key: m.key().map(<[u8]>::to_vec),
            headers: m
                .headers()
                .map(|hs| hs.iter().map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec))).collect())
                .unwrap_or_default(),
            value: m.payload().map(<[u8]>::to_vec),
        }
    }

    /// The record as a dead-letter record (its `orderflow.dlq.*` headers read by [`DeadLetter`]).
    fn into_dead_letter(self) -> DeadLetter {
        DeadLetter { at: self.at, key: self.key, value_len: self.value.as_ref().map(Vec::len), value: self.value, headers: self.headers }
    }
}

/// A reader for `inspect` (the shared [`Reader`] with its own `group.id` prefix).
fn scanner(broker: &BrokerConfig) -> Result<Reader> {
    Reader::new(broker, "orderflow-inspect", "creating the reader")
}

/// Every record of bounded `spans`, sorted by coordinates.
///
/// Errors: those of [`Reader::scan`].
fn read_all(reader: &Reader, spans: &[Span]) -> Result<Vec<Raw>> {
    let mut out = reader.collect(spans, |m| Raw::from_message(m))?;
    out.sort_by(|a, b| a.at.cmp(&b.at));
    Ok(out)
}

/// Checks that `topic` can be read: on the broker, with its partition count.
///
/// Errors: the topic is declared in the topology but not created yet (run `orderflow topics`),
/// or it is neither on the broker nor in the topology (naming the topology's topics).
pub fn find_topic(topic: &str, topology: &Topology, on_broker: &BTreeMap<String, i32>) -> Result<i32> {
    if let Some(&n) = on_broker.get(topic) {
        return Ok(n);
    }
    if topology.topics.contains_key(topic) || topology.dead_letter_topics().contains_key(topic) {
        bail!("topic {topic} is declared in the topology but does not exist on the broker yet (create it with `orderflow topics`)");
    }
    bail!(
        "unknown topic {topic}: not on the broker and not a topic of the topology ({})",
        topology.topics.keys().cloned().collect::<Vec<_>>().join(", ")
    )
}

#[cfg(test)]
mod tests;
