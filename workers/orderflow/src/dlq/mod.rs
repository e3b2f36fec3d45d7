//! `orderflow dlq`: list, show and redrive dead-letter records.
//!
//! A dead-letter record is written by the worker runtime when a worker cannot process an input
//! record (it does not decode, breaks its event's shape rules, is too large, ...). It goes to the
//! dead-letter topic of the input (`Topology::dead_letter_of`, by default `<input>.dlq`) with the
//! original key, value and headers, plus these headers (values UTF-8 text):
//!
//! | header | value |
//! |---|---|
//! | `orderflow.dlq.source-topic` | topic the record was read from |
//! | `orderflow.dlq.source-partition` | its partition (decimal) |
//! | `orderflow.dlq.source-offset` | its offset (decimal) |
//! | `orderflow.dlq.worker` | worker (consumer group) that gave up on it |
//! | `orderflow.dlq.error-class` | `not_avro`, `truncated`, `unknown_schema`, `malformed`, `wrong_schema`, `oversized`, `invalid`, `future_timestamp`, `transient`, `registry_unavailable` |
//! | `orderflow.dlq.error-message` | human-readable reason |
//! | `orderflow.dlq.attempts` | processing attempts (decimal) |
//! | `orderflow.dlq.time` | when it was dead-lettered, ms since the Unix epoch (decimal) |
//! | `orderflow.dlq.value-dropped` | only when the value was too large to re-produce: its original length in bytes (decimal); the record then has no value |
//!
//! Several workers (consumer groups) read the same input topics, so one source record can have
//! several dead-letter records, one per worker that gave up on it (different `worker` header).
//!
//! The three actions:
//!
//! * `orderflow dlq list` reads the dead-letter topics (all of the topology's by default) from
//!   their low to their high watermark and prints one line per record, then a count per topic
//!   and error class;
//! * `orderflow dlq show DLQ_TOPIC PARTITION OFFSET` prints one record in full, its value decoded;
//! * `orderflow dlq redrive` re-produces selected records to their source topic (or `--into`
//!   another topic) once their cause is fixed; see [`plan`] for what is sent.
//!
//! Every action reads by assigning partitions to a consumer with a throwaway `group.id`: it joins
//! no consumer group and commits nothing, so it never disturbs the workers and can be repeated.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::{Args, Subcommand};
use orderflow_runtime::deadletter::DeadLetterClass;
use rdkafka::message::{Headers, Message};
use serde::Serialize;
use serde_json::{json, Value};

use crate::kafkaio::rfc3339;

/// The headers the runtime adds to a dead-letter record (`orderflow_runtime::kafka::dlq_header`;
/// the prefix's ones are dropped on redrive).
pub use orderflow_runtime::kafka::dlq_header::{
    ATTEMPTS as H_ATTEMPTS, ERROR_CLASS as H_ERROR_CLASS, ERROR_MESSAGE as H_ERROR_MESSAGE, PREFIX as DLQ_HEADER_PREFIX,
    SOURCE_OFFSET as H_SOURCE_OFFSET, SOURCE_PARTITION as H_SOURCE_PARTITION, SOURCE_TOPIC as H_SOURCE_TOPIC, TIME as H_TIME,
    VALUE_DROPPED as H_VALUE_DROPPED, WORKER as H_WORKER,
};

mod actions;
mod resend;
mod topics;

use actions::*;
pub use resend::*;
pub use topics::*;
/// Prefix of the headers a redrive adds (replaced, not accumulated, when a record is redriven again).
pub const REDRIVE_HEADER_PREFIX: &str = "orderflow.redrive.";
/// Added on redrive: the dead-letter record it came from, `<dlq topic>/<partition>/<offset>`.
pub const H_REDRIVE_FROM: &str = "orderflow.redrive.from";
/// Added on redrive: when it was re-produced, ms since the Unix epoch (decimal).
pub const H_REDRIVE_TIME: &str = "orderflow.redrive.time";

/// How long a redrive waits for the producer's queue to drain at the end.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(60);
/// Bytes of an undecodable value `show` dumps in hex.
const HEX_DUMP_BYTES: usize = 256;
/// Characters of the error message `list` shows in its table.
const MESSAGE_WIDTH: usize = 80;

// ------------------------------------------------------------------------------------------
// Command line.

/// `orderflow dlq` flags.
#[derive(Args, Debug)]
pub struct DlqArgs {
    #[command(subcommand)]
    action: DlqAction,
}

/// Where the topology and the broker are (every action).
#[derive(Args, Debug)]
struct Common {
    /// Topology file: names the dead-letter topics, the broker and the Avro schemas.
    #[arg(long, default_value = "topology.toml", env = "ORDERFLOW_TOPOLOGY")]
    topology: PathBuf,
    /// Bootstrap servers (overrides the topology and ORDERFLOW_BOOTSTRAP).
    #[arg(long)]
    bootstrap: Option<String>,
}

#[derive(Subcommand, Debug)]
enum DlqAction {
    /// List dead-letter records (every dead-letter topic of the topology unless --topic), then
    /// a count per topic and error class.
    List(ListArgs),
    /// Print one dead-letter record: every header, the key and the value decoded to JSON (or
    /// the decode error and a hex dump).
    Show(ShowArgs),
    /// Re-produce selected dead-letter records to their source topic (or --into), after the
    /// cause was fixed. Safe to repeat: every worker deduplicates by eventId.
    Redrive(RedriveArgs),
}

#[derive(Args, Debug)]
struct ListArgs {
    #[command(flatten)]
    common: Common,
    /// Dead-letter topic to read (repeatable); all of the topology's when omitted.
    #[arg(long = "topic", value_name = "DLQ_TOPIC")]
    topics: Vec<String>,
    /// Only records dead-lettered by this worker.
    #[arg(long)]
    worker: Option<String>,
    /// Only records of this error class (e.g. wrong_schema).
    #[arg(long)]
    class: Option<String>,
    /// One JSON object per line instead of a table; the last line holds the counts.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct ShowArgs {
    #[command(flatten)]
    common: Common,
    /// The dead-letter topic.
    #[arg(value_name = "DLQ_TOPIC")]
    topic: String,
    /// Its partition.
    partition: i32,
    /// The record's offset in that partition.
    offset: i64,
    /// One JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("selection").required(true).args(["all", "partition"])))]
struct RedriveArgs {
    #[command(flatten)]
    common: Common,
    /// The dead-letter topic to redrive from.
    #[arg(long, value_name = "DLQ_TOPIC")]
    topic: String,
    /// Only this partition of the dead-letter topic (every offset unless --from / --to).
    #[arg(long)]
    partition: Option<i32>,
    /// First offset to redrive (inclusive; needs --partition). Default: the low watermark.
    #[arg(long, requires = "partition", value_name = "OFFSET")]
    from: Option<i64>,
    /// Last offset to redrive (inclusive; needs --partition). Default: the last record.
    #[arg(long, requires = "partition", value_name = "OFFSET")]
    to: Option<i64>,
    /// Every record of every partition of the dead-letter topic.
    #[arg(long, conflicts_with_all = ["partition", "from", "to"])]
    all: bool,
    /// Only records dead-lettered by this worker.
    #[arg(long)]
    worker: Option<String>,
    /// Only records of this error class (e.g. wrong_schema).
    #[arg(long)]
    class: Option<String>,
    /// Re-produce to this topic instead of the source topic named in each record's headers.
    #[arg(long, value_name = "TOPIC")]
    into: Option<String>,
    /// Print what would be sent; send nothing.
    #[arg(long)]
    dry_run: bool,
    /// Per-record lines as JSON objects (the summary, always the last line, is JSON anyway).
    #[arg(long)]
    json: bool,
}

/// Runs `orderflow dlq <action>`.
///
/// Errors: see [`list`], [`show`] and [`redrive`].
pub async fn run(args: DlqArgs) -> Result<()> {
    match args.action {
        DlqAction::List(a) => list(a).await,
        DlqAction::Show(a) => show(a).await,
        DlqAction::Redrive(a) => redrive(a).await,
    }
}

// ------------------------------------------------------------------------------------------
// Records and their headers.

/// Coordinates of a Kafka record: topic, partition, offset.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Coordinates {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

impl std::fmt::Display for Coordinates {
    /// `<topic>/<partition>/<offset>`, the form of `orderflow.redrive.from` and of the
    /// `dlq show` arguments.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.topic, self.partition, self.offset)
    }
}

/// One record read from a dead-letter topic.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// Where the dead-letter record is (topic = the dead-letter topic).
    pub at: Coordinates,
    /// The original record's key.
    pub key: Option<Vec<u8>>,
    /// The original record's value; `None` when it was null or dropped (see
    /// [`DeadLetter::value_dropped`]), or when read without values (`dlq list`).
    pub value: Option<Vec<u8>>,
    /// Length of the value in bytes as stored in the dead-letter record (`None`: no value).
    pub value_len: Option<usize>,
    /// Every header in record order: the original record's, then the `orderflow.dlq.*` ones.
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

impl DeadLetter {
    /// Builds a dead-letter record from a consumed message (its value kept when `with_value`).
    fn from_message<M: Message>(m: &M, with_value: bool) -> DeadLetter {
        let headers =
            m.headers().map(|hs| hs.iter().map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec))).collect()).unwrap_or_default();
        DeadLetter {
            at: Coordinates { topic: m.topic().to_string(), partition: m.partition(), offset: m.offset() },
            key: m.key().map(<[u8]>::to_vec),
            value: if with_value { m.payload().map(<[u8]>::to_vec) } else { None },
            value_len: m.payload().map(<[u8]>::len),
            headers,
        }
    }

    /// The value of header `name` as text: its last occurrence (the runtime appends its headers
    /// after the original ones), `None` when absent, null or not UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().rev().find(|(k, _)| k == name).and_then(|(_, v)| v.as_deref()).and_then(|v| std::str::from_utf8(v).ok())
    }

    fn header_num<T: std::str::FromStr>(&self, name: &str) -> Option<T> {
        self.header(name).and_then(|v| v.trim().parse().ok())
    }

    /// Where the dead-lettered record was read from (`None` when a source header is missing or
    /// not a number).
    pub fn source(&self) -> Option<Coordinates> {
        Some(Coordinates {
            topic: self.header(H_SOURCE_TOPIC)?.to_string(),
            partition: self.header_num(H_SOURCE_PARTITION)?,
            offset: self.header_num(H_SOURCE_OFFSET)?,
        })
    }

    /// The worker that dead-lettered it.
    pub fn worker(&self) -> Option<&str> {
        self.header(H_WORKER)
    }

    /// Its error class (an `orderflow_runtime::deadletter::DeadLetterClass`, as written).
    pub fn class(&self) -> Option<&str> {
        self.header(H_ERROR_CLASS)
    }

    /// Its error message.
    pub fn message(&self) -> Option<&str> {
        self.header(H_ERROR_MESSAGE)
    }

    /// Processing attempts before it was dead-lettered.
    pub fn attempts(&self) -> Option<u32> {
        self.header_num(H_ATTEMPTS)
    }

    /// When it was dead-lettered, ms since the Unix epoch.
    pub fn time_ms(&self) -> Option<i64> {
        self.header_num(H_TIME)
    }

    /// The original value's length in bytes when the runtime left the value out (too large to
    /// re-produce); `None` when the value is there.
    pub fn value_dropped(&self) -> Option<u64> {
        self.header(H_VALUE_DROPPED).map(|v| v.trim().parse().unwrap_or(0))
    }

    /// The original record's headers: every header but the `orderflow.dlq.*` ones and those of
    /// an earlier redrive (`orderflow.redrive.*`), in record order.
    pub fn original_headers(&self) -> impl Iterator<Item = &(String, Option<Vec<u8>>)> {
        self.headers.iter().filter(|(k, _)| !k.starts_with(DLQ_HEADER_PREFIX) && !k.starts_with(REDRIVE_HEADER_PREFIX))
    }

    /// The `dlq list --json` line of this record: `dlq_topic`, `partition`, `offset`,
    /// `source_topic`, `source_partition`, `source_offset`, `worker`, `class`, `attempts`,
    /// `time_ms` (ms since the epoch), `time` (RFC 3339 UTC), `message`, `key` (UTF-8, lossy),
    /// `value_bytes` (length of the stored value, null when none) and `value_dropped` (original
    /// length when the value was left out, else null). Missing headers give nulls.
    pub fn list_json(&self) -> Value {
        let source = self.source();
        json!({
            "dlq_topic": self.at.topic,
            "partition": self.at.partition,
            "offset": self.at.offset,
            "source_topic": source.as_ref().map(|s| s.topic.clone()).or_else(|| self.header(H_SOURCE_TOPIC).map(str::to_string)),
            "source_partition": source.as_ref().map(|s| s.partition),
            "source_offset": source.as_ref().map(|s| s.offset),
            "worker": self.worker(),
            "class": self.class(),
            "attempts": self.attempts(),
            "time_ms": self.time_ms(),
            "time": self.time_ms().map(rfc3339),
            "message": self.message(),
            "key": self.key.as_deref().map(|k| String::from_utf8_lossy(k).into_owned()),
            "value_bytes": self.value_len,
            "value_dropped": self.value_dropped(),
        })
    }
}

/// Which dead-letter records an action keeps: by worker and error class (`None`: any).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    pub worker: Option<String>,
    pub class: Option<String>,
}

impl Filter {
    /// Whether `d` passes the filter.
    pub fn matches(&self, d: &DeadLetter) -> bool {
        self.worker.as_deref().is_none_or(|w| d.worker() == Some(w)) && self.class.as_deref().is_none_or(|c| d.class() == Some(c))
    }

    /// `" with worker W and class C"`, or `""` without conditions (for messages).
    fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(w) = &self.worker {
            parts.push(format!("worker {w}"));
        }
        if let Some(c) = &self.class {
            parts.push(format!("class {c}"));
        }
        if parts.is_empty() {
            String::new()
        } else {
            format!(" with {}", parts.join(" and "))
        }
    }
}

/// Warns (stderr) when `class` is not one the runtime writes: probably a typo.
fn warn_unknown_class(class: Option<&str>) {
    if let Some(c) = class {
        if c.parse::<DeadLetterClass>().is_err() {
            let all: Vec<&str> = DeadLetterClass::ALL.iter().map(|d| d.as_str()).collect();
            eprintln!("warning: --class {c} is not an error class the runtime writes ({}); no record may match", all.join(", "));
        }
    }
}

#[cfg(test)]
mod tests;
