//! Record size limits: how large a value may be for a topic, checked before anything is produced
//! (issue 20: a record the broker accepted but could not serve stalled partitions; a record the
//! broker refuses is refused on every retry).
//!
//! Two limits apply to every record, and the smaller one wins:
//!
//! - the **producer's** `message.max.bytes` (librdkafka, default [`DEFAULT_PRODUCER_MESSAGE_MAX_BYTES`]):
//!   librdkafka refuses a record whose `RECORD_OVERHEAD + key + value + headers` is larger, before
//!   sending it (`MSG_SIZE_TOO_LARGE`);
//! - the **topic's** `max.message.bytes` (broker; Kafka's default [`DEFAULT_TOPIC_MAX_MESSAGE_BYTES`],
//!   or the broker's `message.max.bytes` when the topic does not set it): the broker refuses a
//!   record batch larger than it (`MESSAGE_TOO_LARGE`). A batch of one record is
//!   [`BATCH_OVERHEAD`] bytes of batch header plus the record.
//!
//! So the largest record (as librdkafka counts it: framing, key, value, headers) is
//! `min(message.max.bytes, max.message.bytes − BATCH_OVERHEAD)`, and the largest value of a record
//! is that less [`RECORD_OVERHEAD`], its key and its serialized headers ([`headers_size`]). The
//! sizes are uncompressed: with `compression.type` set the broker checks the compressed batch, so
//! the check is conservative.
//!
//! [`lookup`] asks the broker for the topics' `max.message.bytes` (DescribeConfigs);
//! [`check`] / [`Limits::check`] are the pure checks the workers and the CLI's producers run on
//! every record before producing.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, OwnedResourceSpecifier, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;

use crate::commit::OutRecord;
use crate::kafka::{client_config, Side};
use crate::topology::BrokerConfig;

/// Bytes of a v2 record batch header, the 12 bytes of base offset and batch length included:
/// what the broker counts beside the records against a topic's `max.message.bytes`.
pub const BATCH_OVERHEAD: usize = 61;
/// Most bytes of a v2 record's framing (librdkafka's `RD_KAFKAP_MESSAGE_V2_MAX_OVERHEAD`): length
/// (varint, 5), attributes (1), timestamp delta (varint, 10), offset delta (5), key length (5),
/// value length (5), header count (5). librdkafka checks `RECORD_OVERHEAD + key + value +
/// headers` against the producer's `message.max.bytes`.
pub const RECORD_OVERHEAD: usize = 36;
/// librdkafka's default producer `message.max.bytes`, bytes.
pub const DEFAULT_PRODUCER_MESSAGE_MAX_BYTES: usize = 1_000_000;
/// Apache Kafka's default topic `max.message.bytes` (broker `message.max.bytes`), bytes: 1 MiB
/// plus the 12 bytes of a batch's offset and length. What `orderflow topics` creates.
pub const DEFAULT_TOPIC_MAX_MESSAGE_BYTES: usize = 1_048_588;
/// How long [`lookup`] waits for the broker's answer.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);

/// The size limits of one topic for one producer, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// The topic's `max.message.bytes` as the broker reported it (bytes of a record batch);
    /// `None` when the broker could not be asked (then only the producer's limit is known).
    pub topic_max_message_bytes: Option<usize>,
    /// The producer's `message.max.bytes` (bytes of one record, as librdkafka counts it).
    pub producer_message_max_bytes: usize,
}

impl Limit {
    /// The largest record, bytes of framing ([`RECORD_OVERHEAD`]), key, value and headers:
    /// `min(producer message.max.bytes, topic max.message.bytes − BATCH_OVERHEAD)`.
    pub fn record_bytes(&self) -> usize {
        let topic = self.topic_max_message_bytes.map_or(usize::MAX, |t| t.saturating_sub(BATCH_OVERHEAD));
        self.producer_message_max_bytes.min(topic)
    }

    /// The largest value a record with a key of `key_bytes` and headers of `headers_bytes`
    /// ([`headers_size`]) may carry, bytes; 0 when the key and headers alone take the record.
    pub fn value_bytes(&self, key_bytes: usize, headers_bytes: usize) -> usize {
        self.record_bytes().saturating_sub(RECORD_OVERHEAD + key_bytes + headers_bytes)
    }
}

impl fmt::Display for Limit {
    /// Where the limit comes from, e.g. `topic max.message.bytes 1048588, producer
    /// message.max.bytes 1000000`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.topic_max_message_bytes {
            Some(t) => write!(f, "topic max.message.bytes {t}")?,
            None => f.write_str("topic max.message.bytes unknown: the broker was not asked")?,
        }
        write!(f, ", producer message.max.bytes {}", self.producer_message_max_bytes)
    }
}

/// A record larger than its topic's [`Limit`]: the producer or the broker would refuse it, on
/// every attempt.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Oversized {
    /// The topic the record was for.
    pub topic: String,
    /// Bytes of the record's value (0 for a tombstone).
    pub value_bytes: usize,
    /// The largest value this record could carry with its key and headers, bytes.
    pub value_limit: usize,
    /// Bytes of the record's framing ([`RECORD_OVERHEAD`]), key and headers.
    pub overhead_bytes: usize,
    /// The topic's limit.
    pub limit: Limit,
}

impl fmt::Display for Oversized {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "value of {} bytes for {} exceeds its limit of {} bytes ({}; less {} bytes of record framing, key and headers",
            self.value_bytes, self.topic, self.value_limit, self.limit, self.overhead_bytes
        )?;
        if self.overhead_bytes > self.limit.record_bytes() {
            write!(f, ", which alone exceed the record limit of {} bytes", self.limit.record_bytes())?;
        }
        f.write_str(")")
    }
}

/// Serialized size of record headers as librdkafka counts them against `message.max.bytes`: per
/// header its name, its value (none: 0 bytes) and the two lengths as zigzag varints, bytes.
pub fn headers_size<'a>(headers: impl IntoIterator<Item = (&'a str, Option<&'a [u8]>)>) -> usize {
    headers.into_iter().map(|(k, v)| k.len() + varint_len(k.len()) + v.map_or(0, <[u8]>::len) + varint_len(v.map_or(0, <[u8]>::len))).sum()
}

/// Bytes of `n` as a zigzag varint (Kafka's record encoding of lengths).
fn varint_len(n: usize) -> usize {
    let mut z = (n as u64) << 1;
    let mut len = 1;
    while z >= 0x80 {
        z >>= 7;
        len += 1;
    }
    len
}

/// Checks one record for `topic` against `limit`: its framing, `key`, `value` (`None`: a
/// tombstone) and `headers` (name, value) together must not pass [`Limit::record_bytes`].
///
/// Errors: [`Oversized`], naming the topic, the value's size, the largest value the record could
/// carry, and where the limit comes from.
pub fn check<'a>(
    topic: &str,
    limit: Limit,
    key: Option<&[u8]>,
    value: Option<&[u8]>,
    headers: impl IntoIterator<Item = (&'a str, Option<&'a [u8]>)>,
) -> Result<(), Oversized> {
    let overhead_bytes = RECORD_OVERHEAD + key.map_or(0, <[u8]>::len) + headers_size(headers);
    let value_bytes = value.map_or(0, <[u8]>::len);
    if overhead_bytes + value_bytes <= limit.record_bytes() {
        return Ok(());
    }
    Err(Oversized {
        topic: topic.to_string(),
        value_bytes,
        value_limit: limit.record_bytes().saturating_sub(overhead_bytes),
        overhead_bytes,
        limit,
    })
}

/// The size limits of the topics one producer writes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// The producer's `message.max.bytes`, bytes.
    pub producer_message_max_bytes: usize,
    /// Topic → its `max.message.bytes` as the broker reported it, bytes.
    pub topics: BTreeMap<String, usize>,
}

impl Limits {
    /// The producer's limit alone, for topics whose `max.message.bytes` is not known: the
    /// producer configuration of `broker` ([`client_config`]: `[broker.properties]`, then
    /// `[broker.producer]`), else librdkafka's default.
    ///
    /// Errors: [`LimitError::Producer`] when `message.max.bytes` is not a byte count.
    pub fn producer_only(broker: &BrokerConfig) -> Result<Limits, LimitError> {
        let config = client_config(broker, Side::Producer);
        let producer_message_max_bytes = match config.get("message.max.bytes") {
            None => DEFAULT_PRODUCER_MESSAGE_MAX_BYTES,
            Some(v) => v.trim().parse().map_err(|_| LimitError::Producer { value: v.to_string() })?,
        };
        Ok(Limits { producer_message_max_bytes, topics: BTreeMap::new() })
    }

    /// The limit of `topic`: its `max.message.bytes` when looked up, and the producer's.
    pub fn of(&self, topic: &str) -> Limit {
        Limit { topic_max_message_bytes: self.topics.get(topic).copied(), producer_message_max_bytes: self.producer_message_max_bytes }
    }

    /// [`check`] of one record for `topic` against [`Limits::of`]`(topic)`.
    ///
    /// Errors: [`Oversized`].
    pub fn check<'a>(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: impl IntoIterator<Item = (&'a str, Option<&'a [u8]>)>,
    ) -> Result<(), Oversized> {
        check(topic, self.of(topic), key, value, headers)
    }

    /// [`Limits::check`] of an [`OutRecord`] (its topic, key, value and headers).
    ///
    /// Errors: [`Oversized`].
    pub fn check_record(&self, r: &OutRecord) -> Result<(), Oversized> {
        self.check(&r.topic, r.key.as_deref(), r.value.as_deref(), r.headers.iter().map(|(k, v)| (k.as_str(), v.as_deref())))
    }
}

/// Why the size limits could not be looked up.
#[derive(Debug, thiserror::Error)]
pub enum LimitError {
    /// The producer configuration's `message.max.bytes` does not parse.
    #[error("producer message.max.bytes {value:?} is not a byte count")]
    Producer { value: String },
    /// The admin client could not be created, or the DescribeConfigs request failed as a whole
    /// (broker unreachable within [`LOOKUP_TIMEOUT`], or it does not implement the request).
    #[error("cannot ask the broker for the max.message.bytes of {topics}: {source}")]
    Describe { topics: String, source: KafkaError },
    /// The broker answered with an error for one topic (e.g. it does not exist).
    #[error("cannot read the max.message.bytes of topic {topic}: {code}")]
    Topic { topic: String, code: RDKafkaErrorCode },
    /// The broker's description of the topic has no `max.message.bytes`, or not a number.
    #[error("topic {topic}: the broker reports max.message.bytes {value:?}, not a byte count")]
    Value { topic: String, value: Option<String> },
}

/// Asks the broker for the `max.message.bytes` of each of `topics` (one DescribeConfigs request,
/// [`LOOKUP_TIMEOUT`]) and reads the producer's `message.max.bytes` ([`Limits::producer_only`]).
///
/// Errors: [`LimitError`], naming the topic (or every topic asked when the request failed).
pub async fn lookup(broker: &BrokerConfig, topics: &[String]) -> Result<Limits, LimitError> {
    let mut limits = Limits::producer_only(broker)?;
    if topics.is_empty() {
        return Ok(limits);
    }
    let failed = |source: KafkaError| LimitError::Describe { topics: topics.join(", "), source };
    let admin: AdminClient<DefaultClientContext> = client_config(broker, Side::Admin).create().map_err(failed)?;
    let specs: Vec<ResourceSpecifier<'_>> = topics.iter().map(|t| ResourceSpecifier::Topic(t)).collect();
    let opts = AdminOptions::new().request_timeout(Some(LOOKUP_TIMEOUT));
    let results = admin.describe_configs(&specs, &opts).await.map_err(failed)?;
    for (asked, result) in topics.iter().zip(results) {
        let resource = result.map_err(|code| LimitError::Topic { topic: asked.clone(), code })?;
        let topic = match &resource.specifier {
            OwnedResourceSpecifier::Topic(t) => t.clone(),
            _ => asked.clone(),
        };
        let value = resource.get("max.message.bytes").and_then(|e| e.value.clone());
        let bytes = value.as_deref().and_then(|v| v.trim().parse::<usize>().ok());
        let Some(bytes) = bytes else { return Err(LimitError::Value { topic, value }) };
        limits.topics.insert(topic, bytes);
    }
    Ok(limits)
}

/// Whether `error` is a refusal for size, which no retry can get past: librdkafka's
/// `MSG_SIZE_TOO_LARGE` (its own `message.max.bytes` check, or the broker's `MESSAGE_TOO_LARGE`
/// for a batch over the topic's `max.message.bytes`) or the broker's `RECORD_LIST_TOO_LARGE`.
pub fn is_size_refusal(error: &KafkaError) -> bool {
    matches!(error.rdkafka_error_code(), Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::MessageBatchTooLarge))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KAFKA_DEFAULTS: Limit = Limit {
        topic_max_message_bytes: Some(DEFAULT_TOPIC_MAX_MESSAGE_BYTES),
        producer_message_max_bytes: DEFAULT_PRODUCER_MESSAGE_MAX_BYTES,
    };

    #[test]
    fn the_smaller_limit_wins() {
        assert_eq!(KAFKA_DEFAULTS.record_bytes(), 1_000_000, "librdkafka's 1,000,000 is below Kafka's 1 MiB");
        let small = Limit { topic_max_message_bytes: Some(4096), producer_message_max_bytes: 1_000_000 };
        assert_eq!(small.record_bytes(), 4096 - BATCH_OVERHEAD);
        assert_eq!(small.value_bytes(10, 20), 4096 - BATCH_OVERHEAD - RECORD_OVERHEAD - 30);
        let unknown = Limit { topic_max_message_bytes: None, producer_message_max_bytes: 2_000_000 };
        assert_eq!(unknown.record_bytes(), 2_000_000);
        assert_eq!(small.value_bytes(5000, 0), 0);
    }

    #[test]
    fn headers_count_as_librdkafka_counts_them() {
        assert_eq!(headers_size([]), 0);
        // name 1 + varint 1, value 3 + varint 1
        assert_eq!(headers_size([("a", Some(&b"xyz"[..]))]), 6);
        // a header without a value: name and two one-byte lengths
        assert_eq!(headers_size([("ab", None)]), 4);
        // zigzag: 63 fits one byte, 64 takes two
        assert_eq!(headers_size([("", Some(&[0u8; 63][..]))]), 1 + 63 + 1);
        assert_eq!(headers_size([("", Some(&[0u8; 64][..]))]), 1 + 64 + 2);
        assert_eq!(varint_len(8191), 2);
        assert_eq!(varint_len(8192), 3);
    }

    #[test]
    fn a_record_at_the_limit_passes_one_byte_more_does_not() {
        let limit = Limit { topic_max_message_bytes: Some(4096), producer_message_max_bytes: 1_000_000 };
        let key = b"K-1".as_slice();
        let headers = [("h", Some(b"v".as_slice()))];
        let room = limit.value_bytes(key.len(), headers_size(headers));
        let at = vec![0u8; room];
        assert_eq!(check("t", limit, Some(key), Some(&at), headers), Ok(()));
        let over = vec![0u8; room + 1];
        let e = check("t", limit, Some(key), Some(&over), headers).unwrap_err();
        assert_eq!((e.value_bytes, e.value_limit), (room + 1, room));
        assert_eq!(e.overhead_bytes, RECORD_OVERHEAD + key.len() + 4);
        assert_eq!(check("t", limit, None, None, []), Ok(()), "a tombstone without key fits");
    }

    #[test]
    fn the_message_names_topic_size_limit_and_where_it_comes_from() {
        let value = vec![0u8; 6 * 1024 * 1024];
        let e = check("order.created", KAFKA_DEFAULTS, Some(b"O-1"), Some(&value), []).unwrap_err();
        assert_eq!(
            e.to_string(),
            "value of 6291456 bytes for order.created exceeds its limit of 999961 bytes (topic max.message.bytes 1048588, \
             producer message.max.bytes 1000000; less 39 bytes of record framing, key and headers)"
        );
        let unknown = Limit { topic_max_message_bytes: None, producer_message_max_bytes: 1_000_000 };
        let e = check("x", unknown, None, Some(&value), []).unwrap_err();
        assert!(e.to_string().contains("topic max.message.bytes unknown"), "{e}");
    }

    #[test]
    fn key_and_headers_alone_over_the_limit_say_so() {
        let limit = Limit { topic_max_message_bytes: Some(1000), producer_message_max_bytes: 1_000_000 };
        let key = vec![b'k'; 2000];
        let e = check("t", limit, Some(&key), Some(b"v"), []).unwrap_err();
        assert_eq!(e.value_limit, 0);
        assert!(e.to_string().contains("which alone exceed the record limit of 939 bytes"), "{e}");
    }

    #[test]
    fn limits_of_a_topic_looked_up_or_not() {
        let limits = Limits { producer_message_max_bytes: 1_000_000, topics: BTreeMap::from([("small".to_string(), 4096)]) };
        assert_eq!(limits.of("small").topic_max_message_bytes, Some(4096));
        assert_eq!(limits.of("other").topic_max_message_bytes, None);
        let r = OutRecord { topic: "small".into(), partition: None, key: None, value: Some(vec![0; 5000]), headers: Vec::new() };
        assert!(limits.check_record(&r).is_err());
        let r = OutRecord { topic: "other".into(), ..r };
        assert!(limits.check_record(&r).is_ok());
    }

    #[test]
    fn producer_limit_from_the_topology() {
        let mut broker = BrokerConfig {
            bootstrap: "localhost:1".into(),
            registry_url: None,
            schema_compatibility: Default::default(),
            properties: BTreeMap::new(),
            producer: BTreeMap::new(),
            consumer: BTreeMap::new(),
        };
        assert_eq!(Limits::producer_only(&broker).unwrap().producer_message_max_bytes, DEFAULT_PRODUCER_MESSAGE_MAX_BYTES);
        broker.properties.insert("message.max.bytes".into(), "2000000".into());
        assert_eq!(Limits::producer_only(&broker).unwrap().producer_message_max_bytes, 2_000_000);
        broker.producer.insert("message.max.bytes".into(), "3000000".into());
        assert_eq!(Limits::producer_only(&broker).unwrap().producer_message_max_bytes, 3_000_000);
        broker.producer.insert("message.max.bytes".into(), "lots".into());
        assert!(matches!(Limits::producer_only(&broker), Err(LimitError::Producer { .. })));
    }

    #[test]
    fn size_refusals_are_recognised() {
        use rdkafka::error::KafkaError;
        assert!(is_size_refusal(&KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge)));
        assert!(is_size_refusal(&KafkaError::MessageProduction(RDKafkaErrorCode::MessageBatchTooLarge)));
        assert!(!is_size_refusal(&KafkaError::MessageProduction(RDKafkaErrorCode::BrokerTransportFailure)));
    }
}
