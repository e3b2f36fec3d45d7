//! Dead-letter classes: why a record went to its topic's dead-letter queue (`<topic>.dlq`).
//!
//! The one list of them. A class is written as the `orderflow.dlq.error-class` header
//! ([`crate::kafka::dlq_header::ERROR_CLASS`]), as the `error_class` label of
//! `orderflow_dlq_records_total`, and read back by `orderflow dlq list --class`.

use std::fmt;
use std::str::FromStr;

use crate::commit::OutRecord;
use crate::kafka::dlq_header;

/// Why a record was dead-lettered. [`DeadLetterClass::as_str`] is its header value and metric
/// label (snake case, stable: dashboards and `dlq --class` filters use it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DeadLetterClass {
    /// `not_avro`: the value starts with neither the single-object marker `C3 01` nor the
    /// Confluent magic byte `00`.
    NotAvro,
    /// `truncated`: no value at all (a tombstone on an event topic), or a header or datum cut short.
    Truncated,
    /// `unknown_schema`: a fingerprint or registry id no known schema has, or Confluent framing
    /// without a registry configured.
    UnknownSchema,
    /// `malformed`: the datum does not decode with the schema its header names.
    Malformed,
    /// `wrong_schema`: a decodable event of a schema its topic does not carry (topology `schema`).
    WrongSchema,
    /// `oversized`: a value longer than `max_record_bytes`.
    Oversized,
    /// `invalid`: an empty `eventId` (domain rule 7), or the processor rejected the event
    /// (`ProcessError::Invalid`).
    Invalid,
    /// `future_timestamp`: `occurredAt` further ahead of the worker's clock than `max_clock_skew`.
    FutureTimestamp,
    /// `transient`: the processor kept failing transiently until the retry policy gave up.
    Transient,
    /// `registry_unavailable`: the schema registry did not answer within the retry policy.
    RegistryUnavailable,
    /// `codec`: the schema files or an encoding failed, not a property of the record.
    Codec,
    /// `skipped`: an operator moved the worker past the record with `orderflow skip` (issue 20);
    /// written by that command, never by a worker, with the operator and the reason.
    Skipped,
}

impl DeadLetterClass {
    /// Every class, in the order `orderflow dlq` documents them.
    pub const ALL: [DeadLetterClass; 12] = [
        DeadLetterClass::NotAvro,
        DeadLetterClass::Truncated,
        DeadLetterClass::UnknownSchema,
        DeadLetterClass::Malformed,
        DeadLetterClass::WrongSchema,
        DeadLetterClass::Oversized,
        DeadLetterClass::Invalid,
        DeadLetterClass::FutureTimestamp,
        DeadLetterClass::Transient,
        DeadLetterClass::RegistryUnavailable,
        DeadLetterClass::Codec,
        DeadLetterClass::Skipped,
    ];

    /// The header value and metric label, e.g. `wrong_schema`.
    pub const fn as_str(self) -> &'static str {
        match self {
            DeadLetterClass::NotAvro => "not_avro",
            DeadLetterClass::Truncated => "truncated",
            DeadLetterClass::UnknownSchema => "unknown_schema",
            DeadLetterClass::Malformed => "malformed",
            DeadLetterClass::WrongSchema => "wrong_schema",
            DeadLetterClass::Oversized => "oversized",
            DeadLetterClass::Invalid => "invalid",
            DeadLetterClass::FutureTimestamp => "future_timestamp",
            DeadLetterClass::Transient => "transient",
            DeadLetterClass::RegistryUnavailable => "registry_unavailable",
            DeadLetterClass::Codec => "codec",
            DeadLetterClass::Skipped => "skipped",
        }
    }
}

impl fmt::Display for DeadLetterClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Parsing a class name that is not one of [`DeadLetterClass::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown dead-letter class {0:?} (one of: {list})", list = DeadLetterClass::ALL.map(DeadLetterClass::as_str).join(", "))]
pub struct UnknownClass(pub String);

impl FromStr for DeadLetterClass {
    type Err = UnknownClass;

    /// The class whose [`DeadLetterClass::as_str`] is `s`.
    fn from_str(s: &str) -> Result<Self, UnknownClass> {
        DeadLetterClass::ALL.into_iter().find(|c| c.as_str() == s).ok_or_else(|| UnknownClass(s.to_string()))
    }
}

/// The record a dead-letter record is made of: where it was read and what it held.
#[derive(Debug, Clone, Copy)]
pub struct Source<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<&'a [u8]>,
    /// `None`: a tombstone, or a record that could not be read (`orderflow skip`).
    pub value: Option<&'a [u8]>,
}

/// Why and by whom a record is dead-lettered.
#[derive(Debug, Clone, Copy)]
pub struct Verdict<'a> {
    pub class: DeadLetterClass,
    pub message: &'a str,
    /// Processing attempts made (0 for a record skipped unprocessed).
    pub attempts: u32,
    /// The worker (consumer group name in the topology) whose input it was.
    pub worker: &'a str,
    /// When, ms since the epoch.
    pub now_ms: i64,
}

/// The dead-letter record of `source` for `dead_letter_topic` (one builder for the workers and
/// `orderflow skip`): the source's key and value (the value left out beyond `max_value` bytes,
/// header `orderflow.dlq.value-dropped` = its length), the source's own `headers`, and the
/// `orderflow.dlq.*` headers saying where it came from and why. `orderflow dlq list|show|redrive`
/// read exactly these.
pub fn record(
    dead_letter_topic: String,
    source: Source<'_>,
    mut headers: Vec<(String, Option<Vec<u8>>)>,
    verdict: Verdict<'_>,
    max_value: usize,
) -> OutRecord {
    let fields = [
        (dlq_header::SOURCE_TOPIC, source.topic.to_string()),
        (dlq_header::SOURCE_PARTITION, source.partition.to_string()),
        (dlq_header::SOURCE_OFFSET, source.offset.to_string()),
        (dlq_header::WORKER, verdict.worker.to_string()),
        (dlq_header::ERROR_CLASS, verdict.class.to_string()),
        (dlq_header::ERROR_MESSAGE, verdict.message.to_string()),
        (dlq_header::ATTEMPTS, verdict.attempts.to_string()),
        (dlq_header::TIME, verdict.now_ms.to_string()),
    ];
    headers.extend(fields.into_iter().map(|(k, v)| (k.to_string(), Some(v.into_bytes()))));
    let value = source.value.filter(|p| p.len() <= max_value).map(<[u8]>::to_vec);
    if let Some(p) = source.value.filter(|p| p.len() > max_value) {
        headers.push((dlq_header::VALUE_DROPPED.to_string(), Some(p.len().to_string().into_bytes())));
    }
    OutRecord { topic: dead_letter_topic, partition: None, key: source.key.map(<[u8]>::to_vec), value, headers }
}

/// [`record`] for `dead_letter_topic` under its limit in `limits`: the whole record when it fits,
/// otherwise without its value (header `orderflow.dlq.value-dropped` = the value's length), so
/// the dead-letter record itself can always be produced. Used by the workers and `orderflow skip`.
pub fn record_within(
    dead_letter_topic: String,
    source: Source<'_>,
    headers: Vec<(String, Option<Vec<u8>>)>,
    verdict: Verdict<'_>,
    limits: &crate::limits::Limits,
) -> OutRecord {
    let limit = limits.of(&dead_letter_topic);
    let whole = record(dead_letter_topic.clone(), source, headers.clone(), verdict, usize::MAX);
    if limits.check_record(&whole).is_ok() {
        return whole;
    }
    // Room for the value beside the key, the headers and the value-dropped header (a length of
    // at most 20 digits).
    let dropped = crate::limits::headers_size([(dlq_header::VALUE_DROPPED, Some(&[0u8; 20][..]))]);
    let fixed = whole.key.as_ref().map_or(0, Vec::len);
    let headers_bytes = crate::limits::headers_size(whole.headers.iter().map(|(k, v)| (k.as_str(), v.as_deref()))) + dropped;
    record(dead_letter_topic, source, headers, verdict, limit.value_bytes(fixed, headers_bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_parse_back() {
        let names: std::collections::BTreeSet<&str> = DeadLetterClass::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(names.len(), DeadLetterClass::ALL.len());
        for c in DeadLetterClass::ALL {
            assert_eq!(c.as_str().parse::<DeadLetterClass>(), Ok(c));
        }
        let err = "nope".parse::<DeadLetterClass>().unwrap_err();
        assert!(err.to_string().contains("wrong_schema"), "{err}");
    }
}
