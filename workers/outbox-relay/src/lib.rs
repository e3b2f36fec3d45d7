//! The transactional outbox relay of seeds 002 and 003 (issue 15): a writer (the order service)
//! inserts an `outbox` row in the same database transaction as its business change, and relay
//! instances publish the `PENDING` rows to Kafka, marking them `COMPLETED` once the broker
//! acknowledged them. A row whose publish keeps failing for a reason of its own is retried with
//! exponential backoff and set `QUARANTINED` after `max_attempts` (6) failures, without holding
//! up other orders; database and broker outages are waited out and never counted.
//!
//! Guarantees (README "Outbox relay"):
//! - **no loss**: a row is `COMPLETED` only after the broker acknowledged its record (under
//!   `exactly_once`, after the batch's transaction committed);
//! - **per-order order**: rows of one `aggregate_id` and topic are published in `id` order: a
//!   row is claimed only when every earlier row of its aggregate is `COMPLETED` ([`store`]);
//! - **duplicates only across a crash, with the same `eventId`**: a relay that dies after the
//!   broker acknowledged and before the database was marked leaves its rows to be published
//!   again by the next claim, with the same deterministic `eventId`
//!   ([`OutboxRow::event_id_or_derived`]), which the deduplicator drops.
//!
//! # Layout
//!
//! - [`row`]: a row, its event, and the failure rules (pure, no database or broker);
//! - [`store`]: the table through `sqlx` on PostgreSQL, MariaDB/MySQL and SQLite; claims;
//! - [`relay`]: the loop that claims, produces and settles;
//! - [`config`]: the worker's settings in `topology.toml`;
//! - `migrations/<dialect>/`: the `sqlx` migrations of the outbox table (the demo's reference
//!   order service has its own, in the orderflow package).

pub mod config;
pub mod relay;
pub mod row;
pub mod store;

pub use config::Config;
pub use relay::{Relay, RelayError, RelaySetup};
pub use row::{Failure, OutboxRow, RetryPolicy, Status};
pub use store::{Dialect, ListFilter, OutboxStore, StoreError};

/// The kind name in `topology.toml` (`kind = "outbox-relay"`).
pub const KIND: &str = "outbox-relay";

/// The relay's one output port: the topic its rows are published to.
pub const PORTS: &[&str] = &["out"];
