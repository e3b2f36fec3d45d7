//! Dead-letter classes: why a record went to its topic's dead-letter queue (`<topic>.dlq`).
//!
//! The one list of them. A class is written as the `orderflow.dlq.error-class` header
//! ([`crate::kafka::dlq_header::ERROR_CLASS`]), as the `error_class` label of
//! `orderflow_dlq_records_total`, and read back by `orderflow dlq list --class`.

use std::fmt;
use std::str::FromStr;

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
}

impl DeadLetterClass {
    /// Every class, in the order `orderflow dlq` documents them.
    pub const ALL: [DeadLetterClass; 11] = [
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
