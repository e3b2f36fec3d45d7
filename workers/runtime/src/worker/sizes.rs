//! Record size limits in the worker ([`crate::limits`], issue 20): looked up once at start for
//! every topic the worker writes, checked on every record of a unit before its commit, so a record
//! the producer or the broker would refuse on every retry stops the instance with a clear error
//! instead of an endless rewind.

use std::collections::BTreeMap;

use rdkafka::error::KafkaError;
use rdkafka::message::{Message, OwnedMessage};
use tracing::{info, warn};

use super::{Worker, WorkerError};
use crate::commit::{Failure, Unit};
use crate::limits::{self, Limits};
use crate::step::{Cause, Rejection};
use crate::topology::{BrokerConfig, Topology, WorkerSpec};

/// Longest key shown in an error, characters.
const KEY_SHOWN: usize = 120;

/// Every topic worker `name` writes: its outputs, the dead-letter topic of each input, its
/// changelog.
pub(super) fn written_topics(name: &str, spec: &WorkerSpec, t: &Topology) -> Vec<String> {
    let mut topics: Vec<String> = spec.outputs.values().cloned().collect();
    topics.extend(spec.inputs.iter().map(|i| t.dead_letter_of(i)));
    topics.push(crate::changelog::topic(name));
    topics.sort();
    topics.dedup();
    topics
}

/// The size limits of `topics` for worker `name` ([`limits::lookup`]). A broker that cannot
/// answer (unreachable, no DescribeConfigs, a topic missing) leaves the producer's limit alone,
/// logged: the commit path still turns a refusal for size into a clear stop.
pub(super) async fn topic_limits(name: &str, broker: &BrokerConfig, topics: &[String]) -> Limits {
    match limits::lookup(broker, topics).await {
        Ok(l) => {
            info!(worker = %name, producer_message_max_bytes = l.producer_message_max_bytes, topics = ?l.topics, "record size limits");
            l
        }
        Err(e) => {
            warn!(worker = %name, error = %e, "cannot look up the topics' record size limits; checking records against the producer's message.max.bytes only");
            Limits::producer_only(broker)
                .unwrap_or(Limits { producer_message_max_bytes: limits::DEFAULT_PRODUCER_MESSAGE_MAX_BYTES, topics: BTreeMap::new() })
        }
    }
}

/// What caused each output of a step, in order (kept for [`Worker::check_sizes`] while the
/// outputs are encoded).
pub(super) fn causes<T>(outputs: &[(T, Cause)]) -> Vec<Cause> {
    outputs.iter().map(|(_, c)| c.clone()).collect()
}

/// The topic and error of a unit that did not commit because a record was refused for its size
/// ([`limits::is_size_refusal`]; retrying would be refused again), else `None`. Inside a
/// transaction the failing topic is not known.
pub(super) fn refused_for_size(failure: &Failure) -> Option<(String, KafkaError)> {
    match failure {
        Failure::NotDelivered { topic, error } if limits::is_size_refusal(error) => Some((topic.clone(), error.clone())),
        Failure::Aborted(e) | Failure::Fatal(e) if limits::is_size_refusal(&e.source) => {
            Some(("a topic of the unit's transaction".to_string(), e.source.clone()))
        }
        _ => None,
    }
}

impl Worker {
    /// Checks every record of `unit` against its topic's limit (`self.limits`): the outputs
    /// (caused by `causes`, in order), then the dead letters (of the inputs `dead_letters` names),
    /// then each partition's changelog records (caused by the unit's inputs of that partition).
    ///
    /// Errors: [`WorkerError::Oversized`] for the first record over its limit, with its key and
    /// the input (or timer) it was produced for.
    pub(super) fn check_sizes(
        &self,
        unit: &Unit,
        causes: &[Cause],
        dead_letters: &[(usize, Rejection)],
        batch: &[OwnedMessage],
    ) -> Result<(), WorkerError> {
        let input = |i: usize| {
            batch.get(i).map_or_else(|| format!("input {i} of the unit"), |m| format!("{}[{}]@{}", m.topic(), m.partition(), m.offset()))
        };
        let oversized = |error, key: Option<&[u8]>, cause: String| WorkerError::Oversized { error, key: shown_key(key), input: cause };
        for (n, r) in unit.records.iter().enumerate() {
            if let Err(e) = self.limits.check_record(r) {
                let cause = match causes.get(n) {
                    Some(Cause::Input(i)) => input(*i),
                    Some(Cause::Timer { partition, key, due_ms }) => {
                        format!("the timer of partition {partition}, key {}, due at {due_ms} ms", shown_key(Some(key)))
                    }
                    None => dead_letters
                        .get(n - causes.len())
                        .map_or_else(|| "a dead letter of the unit".to_string(), |(i, _)| format!("the dead letter of {}", input(*i))),
                };
                return Err(oversized(e, r.key.as_deref(), cause));
            }
        }
        for (p, records) in &unit.changelog {
            for r in records {
                if let Err(e) = self.limits.check(&unit.changelog_topic, Some(&r.key), r.value.as_deref(), []) {
                    let mut spans: BTreeMap<&str, (i64, i64)> = BTreeMap::new();
                    for m in batch.iter().filter(|m| m.partition() == *p) {
                        let span = spans.entry(m.topic()).or_insert((m.offset(), m.offset()));
                        *span = (span.0.min(m.offset()), span.1.max(m.offset()));
                    }
                    let cause = if spans.is_empty() {
                        format!("the state written by the unit's timers of partition {p}")
                    } else {
                        let inputs: Vec<String> = spans.iter().map(|(t, (a, b))| format!("{t}[{p}]@{a}..={b}")).collect();
                        format!("the state written by the unit's inputs {}", inputs.join(", "))
                    };
                    return Err(oversized(e, Some(&r.key), cause));
                }
            }
        }
        Ok(())
    }
}

/// `key` as text for an error: lossy UTF-8, at most [`KEY_SHOWN`] characters, `(none)` without one.
fn shown_key(key: Option<&[u8]>) -> String {
    let Some(key) = key else { return "(none)".to_string() };
    let text = String::from_utf8_lossy(key);
    match text.char_indices().nth(KEY_SHOWN) {
        Some((at, _)) => format!("{}… ({} bytes)", &text[..at], key.len()),
        None => text.into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use rdkafka::message::{OwnedHeaders, Timestamp};
    use rdkafka::types::RDKafkaErrorCode;

    use super::*;
    use crate::deadletter::DeadLetterClass;
    use crate::kafka::dlq_header;
    use crate::txn::{TxnError, TxnErrorClass};

    fn too_large() -> KafkaError {
        KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge)
    }

    #[test]
    fn a_refusal_for_size_is_told_from_a_broker_outage() {
        let refused = Failure::NotDelivered { topic: "t".into(), error: too_large() };
        assert_eq!(refused_for_size(&refused).map(|(t, _)| t), Some("t".to_string()));
        let away = Failure::NotDelivered { topic: "t".into(), error: KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut) };
        assert!(refused_for_size(&away).is_none(), "an unacknowledged record is retried");
        let aborted = Failure::Aborted(TxnError { class: TxnErrorClass::Abortable, source: too_large(), step: "produce" });
        assert!(refused_for_size(&aborted).is_some(), "an aborted transaction refused for size is not redone either");
    }

    #[test]
    fn a_dead_letter_keeps_its_value_while_it_fits_the_dead_letter_topic() {
        let source = |value: usize| {
            OwnedMessage::new(
                Some(vec![b'v'; value]),
                Some(b"K-1".to_vec()),
                "in".into(),
                Timestamp::NotAvailable,
                0,
                7,
                Some(OwnedHeaders::new()),
            )
        };
        let limits = Limits { producer_message_max_bytes: 1_000_000, topics: BTreeMap::from([("in.dlq".to_string(), 4096)]) };
        let r = Rejection::new(DeadLetterClass::Oversized, "too large");
        let dropped = |rec: &crate::commit::OutRecord| rec.headers.iter().find(|(k, _)| k == dlq_header::VALUE_DROPPED).cloned();
        let small = super::super::kafka_io::dead_letter_record("in.dlq".into(), &source(100), &r, "w", 0, &limits);
        assert_eq!(small.value.as_ref().map(Vec::len), Some(100));
        assert!(dropped(&small).is_none());
        let big = super::super::kafka_io::dead_letter_record("in.dlq".into(), &source(5000), &r, "w", 0, &limits);
        assert_eq!(big.value, None, "the value is left out");
        assert_eq!(dropped(&big).and_then(|(_, v)| v), Some(b"5000".to_vec()));
        assert_eq!(limits.check_record(&big), Ok(()), "what is left fits the dead-letter topic");
        // Just over the room: dropped too, and the record with the dropped header still fits.
        let room = limits.of("in.dlq").record_bytes();
        let edge = super::super::kafka_io::dead_letter_record("in.dlq".into(), &source(room), &r, "w", 0, &limits);
        assert_eq!(edge.value, None);
        assert_eq!(limits.check_record(&edge), Ok(()));
    }
}
