//! The orderflow runtime: it owns Kafka, sled and the clock; workers are plain
//! [`orderflow_api::Processor`]s.
//!
//! - [`topology`]: `topology.toml` parsing, checking and drawing.
//! - [`codec`]: Avro encoding (Confluent wire format or single-object encoding).
//! - [`store`]: the sled state store, sharded by input partition.
//! - [`worker`]: the consume → process → produce loop.
//! - [`kafka`]: client configuration and topic administration.

pub mod changelog;
pub mod codec;
pub mod kafka;
pub mod metrics;
pub mod probe;
pub mod store;
pub mod topology;
pub mod txn;
pub mod worker;
