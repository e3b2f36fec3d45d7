//! The `orderflow` command line as a library: every command of the binary, and the Kafka I/O
//! they share. The binary (`src/main.rs`) parses [`cli::Cli`] and calls [`cli::run`].
//!
//! # Layout
//!
//! - [`cli`]: the clap command line and its dispatch to the command modules.
//! - [`run`]: `orderflow run`: workers as tasks of this process, the health/metrics server.
//! - [`topology`]: `orderflow topology check|graph`, `orderflow topics`, topology loading.
//! - [`dlq`]: `orderflow dlq list|show|redrive`: dead-letter records.
//! - [`inspect`]: `orderflow tap` and `orderflow trace`: decoded records, an order's timeline.
//! - [`replay`]: `orderflow replay --into|--through`: republish a range or run it through a worker.
//! - [`reconcile`]: `orderflow reconcile`: the stock reserver's reconciliation over its changelog.
//! - [`doctor`]: `orderflow doctor`: a live broker against the topology (partition counts, external
//!   records keyed and partitioned as orderflow would, issue 19).
//! - [`schemas`]: `orderflow schemas list|register|check`: fingerprints, registry subjects, compatibility (issue 14).
//! - [`skip`]: `orderflow skip`: an audited move of a stopped worker past records it cannot get
//!   past (issue 20).
//! - [`outbox`]: `orderflow outbox list|show|requeue`: the transactional outbox's rows (issue 15;
//!   the relay itself is the `outbox-relay` crate, run by [`run`]).
//! - [`demo`]: `orderflow demo`: TPC-H orders and the seed scenarios through the whole saga.
//! - [`bench`](mod@bench): `orderflow bench raw|worker|saga|recovery`: the benchmarks.
//! - [`kafkaio`]: the Kafka I/O every command uses: topic reader, watermarks, offsets by time, partitioner, RFC 3339 times.
//! - [`text`]: text output helpers: cut lines, hex, tables.

pub mod api;
pub mod bench;
pub mod cli;
pub mod demo;
pub mod dlq;
pub mod doctor;
pub mod inspect;
pub mod inventory;
pub mod kafkaio;
pub mod outbox;
pub mod reconcile;
pub mod replay;
pub mod run;
pub mod schemas;
pub mod skip;
pub mod text;
pub mod topology;

pub(crate) use orderflow_kinds as kinds;
