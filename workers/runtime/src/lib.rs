//! The orderflow runtime: it owns Kafka, sled and the clock; workers are plain
//! [`orderflow_api::Processor`]s.
//!
//! # Layout
//!
//! - [`changelog`]: changelog records of a unit (state changes, timers, commit markers) and the
//!   restore of a partition's state from local sled and/or the compacted changelog topic.
//! - [`clock`]: the injectable wall clock ([`clock::SystemClock`], [`clock::PausedClock`] for tests).
//! - [`commit`]: the commit protocols, one per guarantee, over a narrow broker and store interface.
//! - [`codec`]: Avro encoding (Confluent wire format or single-object encoding).
//! - [`deadletter`]: the dead-letter classes, one enum.
//! - [`headers`]: the output records' headers (CloudEvents type/id/source, W3C trace context).
//! - [`kafka`]: client configuration per side, the group protocol, topic creation (waiting for
//!   leaders), dead-letter header names.
//! - [`limits`]: record size limits: each topic's `max.message.bytes` bounded by the producer's
//!   `message.max.bytes`, and the check every producer runs before producing (issue 20).
//! - [`metrics`]: the Prometheus families the binary exports.
//! - [`partitioner`]: the producers' partitioner (murmur2, as the Java client) and librdkafka's
//!   default (CRC32), to compute where a key goes.
//! - [`probe`]: does the broker implement transactions? (one `ApiVersions` request).
//! - [`retention`]: bounded state: closed records and remembered `eventId`s forgotten after
//!   `state_retention` (the marker index and its sweep punctuation).
//! - [`routing`]: records of external topics keyed or partitioned otherwise than orderflow's
//!   partitioner would (issue 19), and the producer's likely partitioner.
//! - [`stall`]: the stalled-partition watch (records waiting, position not moving).
//! - [`step`]: the broker-free unit step (admission, processing, timers, staged effects), shared
//!   by the worker, replay and fuzzing.
//! - [`store`]: the sled state store, sharded by input partition.
//! - [`topology`]: `topology.toml` parsing, broker profiles, environment overrides, checking and
//!   drawing.
//! - [`txn`]: the transactional producer behind `exactly_once`.
//! - [`worker`]: the consume → process → produce loop, rebalances, restores, commits.

pub mod changelog;
pub mod clock;
pub mod codec;
pub mod commit;
pub mod deadletter;
pub mod headers;
pub mod kafka;
pub mod limits;
pub mod metrics;
pub mod partitioner;
pub mod probe;
pub mod replica;
pub mod retention;
pub mod routing;
pub mod stall;
pub mod step;
pub mod store;
pub mod topology;
pub mod txn;
pub mod worker;
