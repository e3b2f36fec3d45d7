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

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use clap::{Args, Subcommand};
use orderflow_runtime::codec::Codec;
use orderflow_runtime::deadletter::DeadLetterClass;
use orderflow_runtime::kafka::{client_config, Side};
use orderflow_runtime::topology::Topology;
use orderflow_runtime::worker::now_ms;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use serde::Serialize;
use serde_json::{json, Value};

use crate::format::{cut, hex, hex_dump, print_table, text_or_hex};
use crate::kafkaio::{blocking, rfc3339, Reader, Span};

/// The headers the runtime adds to a dead-letter record (`orderflow_runtime::kafka::dlq_header`;
/// the prefix's ones are dropped on redrive).
pub use orderflow_runtime::kafka::dlq_header::{
    ATTEMPTS as H_ATTEMPTS, ERROR_CLASS as H_ERROR_CLASS, ERROR_MESSAGE as H_ERROR_MESSAGE, PREFIX as DLQ_HEADER_PREFIX,
    SOURCE_OFFSET as H_SOURCE_OFFSET, SOURCE_PARTITION as H_SOURCE_PARTITION, SOURCE_TOPIC as H_SOURCE_TOPIC, TIME as H_TIME,
    VALUE_DROPPED as H_VALUE_DROPPED, WORKER as H_WORKER,
};
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

// ------------------------------------------------------------------------------------------
// Redrive plan (no broker involved).

/// One record to re-produce.
#[derive(Debug, Clone, PartialEq)]
pub struct Resend {
    /// The dead-letter record it comes from.
    pub from: Coordinates,
    /// The dead-lettered record's own coordinates, when its headers name them.
    pub source: Option<Coordinates>,
    /// Topic to produce to: `--into`, else the source topic.
    pub target: String,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    /// The original headers, then `orderflow.redrive.from` and `orderflow.redrive.time`.
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

/// A selected record that is not sent, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Refusal {
    /// `<dlq topic>/<partition>/<offset>`.
    pub record: String,
    pub reason: String,
}

/// A selected record left out because another one of the same source record is sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Skipped {
    /// `<dlq topic>/<partition>/<offset>` of the record left out.
    pub record: String,
    /// `<dlq topic>/<partition>/<offset>` of the record sent for the same source record.
    pub same_source_as: String,
}

/// What a redrive of some selected records does.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Plan {
    /// Records selected (sent + skipped + refused).
    pub selected: usize,
    /// Records to re-produce, in the order to produce them.
    pub sends: Vec<Resend>,
    /// Records left out: the same source record is already sent by this run.
    pub skipped_same_source: Vec<Skipped>,
    /// Records that cannot be sent.
    pub refused: Vec<Refusal>,
}

/// Plans the redrive of `selected` dead-letter records, produced at `now_ms` (ms since the
/// epoch) to `into`, or else to each record's source topic.
///
/// * Sent: the original key, value and headers (minus the `orderflow.dlq.*` ones and the
///   `orderflow.redrive.*` ones of an earlier redrive), plus `orderflow.redrive.from` =
///   `<dlq topic>/<partition>/<offset>` and `orderflow.redrive.time` = `now_ms` (decimal).
/// * Order: by source coordinates (topic, partition, offset), so records of one source partition
///   go out in their original order; records without source headers last, by dead-letter
///   coordinates.
/// * Refused: a record whose value was dropped (`orderflow.dlq.value-dropped`: there is nothing to
///   re-produce), and, without `into`, a record whose source topic header is missing.
/// * Skipped: several records of the same source record (several workers dead-lettered it): the
///   first one that can be sent is, the others are counted in `skipped_same_source`.
pub fn plan(selected: &[DeadLetter], into: Option<&str>, now_ms: i64) -> Plan {
    let mut order: Vec<&DeadLetter> = selected.iter().collect();
    order.sort_by_cached_key(|d| (d.source().is_none(), d.source(), d.at.clone()));
    let mut out = Plan { selected: selected.len(), ..Plan::default() };
    let mut sent_for: BTreeMap<Coordinates, Coordinates> = BTreeMap::new();
    for d in order {
        let record = d.at.to_string();
        if let Some(len) = d.value_dropped() {
            out.refused.push(Refusal {
                record,
                reason: format!(
                    "its value ({len} bytes) was too large to keep in the dead-letter record (orderflow.dlq.value-dropped); \
                     re-produce it from {} while it is retained there",
                    d.source().map(|s| format!("{}[{}]@{}", s.topic, s.partition, s.offset)).unwrap_or_else(|| "its source topic".into())
                ),
            });
            continue;
        }
        let source = d.source();
        let target = match (into, &source, d.header(H_SOURCE_TOPIC)) {
            (Some(t), ..) => t.to_string(),
            (None, Some(s), _) => s.topic.clone(),
            (None, None, Some(t)) if !t.is_empty() => t.to_string(),
            (None, None, _) => {
                out.refused.push(Refusal { record, reason: format!("it has no {H_SOURCE_TOPIC} header; name a target with --into") });
                continue;
            }
        };
        if let Some(s) = &source {
            if let Some(first) = sent_for.get(s) {
                out.skipped_same_source.push(Skipped { record, same_source_as: first.to_string() });
                continue;
            }
            sent_for.insert(s.clone(), d.at.clone());
        }
        let mut headers: Vec<(String, Option<Vec<u8>>)> = d.original_headers().cloned().collect();
        headers.push((H_REDRIVE_FROM.to_string(), Some(record.into_bytes())));
        headers.push((H_REDRIVE_TIME.to_string(), Some(now_ms.to_string().into_bytes())));
        out.sends.push(Resend { from: d.at.clone(), source, target, key: d.key.clone(), value: d.value.clone(), headers });
    }
    out
}

/// The JSON summary a redrive ends with (the last line on stdout).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct Summary {
    /// `true` when nothing was sent on purpose (`--dry-run`).
    pub dry_run: bool,
    /// Records that passed the selection.
    pub selected: usize,
    /// Records planned to be sent (selected − skipped − refused).
    pub planned: usize,
    /// Records the broker acknowledged (0 on a dry run).
    pub sent: usize,
    /// Records whose delivery failed.
    pub failed: usize,
    /// Records left out because another record of the same source record was sent.
    pub skipped_same_source: usize,
    /// Records that cannot be sent (see `refusals`).
    pub refused: usize,
    /// Per target topic: records acknowledged, or on a dry run records that would be sent.
    pub by_target: BTreeMap<String, usize>,
    pub refusals: Vec<Refusal>,
    /// `{record, target, error}` of each failed delivery.
    pub failures: Vec<Value>,
}

// ------------------------------------------------------------------------------------------
// Topics, ranges, reading.

/// A dead-letter topic named on the command line, as found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// On the broker, with this many partitions.
    Present(i32),
    /// A dead-letter topic of the topology that the broker does not have yet (nothing was ever
    /// dead-lettered there and `orderflow topics` did not run).
    NotCreated,
}

/// Finds dead-letter topic `name`: on the broker (`on_broker`: topic → partitions) or among the
/// topology's dead-letter topics.
///
/// Errors: `name` is a declared (non dead-letter) topic of the topology, such as an input; or it
/// is neither a dead-letter topic of the topology nor a topic on the broker.
pub fn find_topic(name: &str, topology: &Topology, on_broker: &BTreeMap<String, i32>) -> Result<Found> {
    let dlqs = topology.dead_letter_topics();
    if topology.topics.contains_key(name) && !dlqs.contains_key(name) {
        bail!("{name} is a topic of the topology, not a dead-letter topic; its dead-letter topic is {}", topology.dead_letter_of(name));
    }
    match on_broker.get(name) {
        Some(&partitions) => Ok(Found::Present(partitions)),
        None if dlqs.contains_key(name) => Ok(Found::NotCreated),
        None => bail!(
            "unknown dead-letter topic {name}: not a dead-letter topic of the topology ({}) and not a topic on the broker",
            dlqs.keys().cloned().collect::<Vec<_>>().join(", ")
        ),
    }
}

/// Offsets `[start, end)` of one partition to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Range {
    pub topic: String,
    pub partition: i32,
    pub start: i64,
    /// Exclusive.
    pub end: i64,
}

/// The offsets `[start, end)` of `topic[partition]` to read, given its watermarks `(low, high)`
/// and the inclusive `--from` / `--to` (defaults: every record).
///
/// Errors: `from > to`; `from` or `to` outside `low..high` (the partition's records), naming the
/// watermarks; an explicit offset in an empty partition.
pub fn range(topic: &str, partition: i32, (low, high): (i64, i64), from: Option<i64>, to: Option<i64>) -> Result<Range> {
    if let (Some(f), Some(t)) = (from, to) {
        if f > t {
            bail!("--from {f} is after --to {t}");
        }
    }
    let holds = if low < high { format!("offsets {low}..={}", high - 1) } else { "no records".to_string() };
    for (flag, o) in [("--from", from), ("--to", to)] {
        if let Some(o) = o {
            if o < low || o >= high {
                bail!("{flag} {o} is outside {topic}[{partition}]: low watermark {low}, high watermark {high} ({holds})");
            }
        }
    }
    Ok(Range { topic: topic.to_string(), partition, start: from.unwrap_or(low), end: to.map_or(high, |t| t + 1) })
}

impl From<&Range> for Span {
    fn from(r: &Range) -> Span {
        Span { topic: r.topic.clone(), partition: r.partition, start: r.start, end: Some(r.end) }
    }
}

/// The dead-letter records of every range, sorted by (topic, partition, offset); values kept
/// when `with_values`.
///
/// Errors: those of [`Reader::scan`].
fn read(reader: &Reader, ranges: &[Range], with_values: bool) -> Result<Vec<DeadLetter>> {
    let spans: Vec<Span> = ranges.iter().map(Span::from).collect();
    let mut out = reader.collect(&spans, |m| DeadLetter::from_message(m, with_values))?;
    out.sort_by(|a, b| a.at.cmp(&b.at));
    Ok(out)
}

// ------------------------------------------------------------------------------------------
// Formatting.

/// `topic[partition]@offset`, or `?` when unknown.
fn source_label(d: &DeadLetter) -> String {
    match d.source() {
        Some(s) => format!("{}[{}]@{}", s.topic, s.partition, s.offset),
        None => d.header(H_SOURCE_TOPIC).map(|t| format!("{t}[?]@?")).unwrap_or_else(|| "?".into()),
    }
}

// ------------------------------------------------------------------------------------------
// The actions.

/// `orderflow dlq list`: reads each dead-letter topic (every one of the topology's unless
/// `--topic`) from its low to its high watermark and prints, per record matching `--worker` /
/// `--class`: dead-letter topic, partition, offset, source `topic[partition]@offset`, worker,
/// class, attempts, time (RFC 3339 UTC) and the message cut to 80 characters; then the count
/// per topic and class. With `--json`: one [`DeadLetter::list_json`] object per line, then a
/// last line `{"counts": {"<dlq topic>": {"<class>": n}}, "total": n}` (every topic read appears,
/// `{}` when it holds no matching record).
///
/// Errors: topology, broker metadata, an unknown topic ([`find_topic`]), reading ([`read`]).
async fn list(a: ListArgs) -> Result<()> {
    let loaded = crate::topology::load_topology(&a.common.topology, a.common.bootstrap.as_deref())?;
    warn_unknown_class(a.class.as_deref());
    let topology = loaded.topology.clone();
    let topics: Vec<String> = if a.topics.is_empty() { topology.dead_letter_topics().into_keys().collect() } else { a.topics.clone() };
    let explicit = !a.topics.is_empty();
    let (records, read_topics) = blocking(move || {
        let reader = Reader::new(&topology.broker, "orderflow-dlq-reader", "creating the dead-letter reader")?;
        let on_broker = reader.broker_topics()?;
        let mut ranges = Vec::new();
        for t in &topics {
            match find_topic(t, &topology, &on_broker)? {
                Found::Present(n) => {
                    for p in 0..n {
                        ranges.push(range(t, p, reader.watermarks(t, p)?, None, None)?);
                    }
                }
                Found::NotCreated if explicit => eprintln!("note: {t} does not exist on the broker yet: nothing was dead-lettered there"),
                Found::NotCreated => {}
            }
        }
        Ok((read(&reader, &ranges, false)?, topics))
    })
    .await?;
    let filter = Filter { worker: a.worker, class: a.class };
    let records: Vec<&DeadLetter> = records.iter().filter(|d| filter.matches(d)).collect();
    let mut counts: BTreeMap<String, BTreeMap<String, usize>> = read_topics.iter().map(|t| (t.clone(), BTreeMap::new())).collect();
    for d in &records {
        *counts.entry(d.at.topic.clone()).or_default().entry(d.class().unwrap_or("?").to_string()).or_default() += 1;
    }
    if a.json {
        for d in &records {
            println!("{}", d.list_json());
        }
        println!("{}", json!({ "counts": counts, "total": records.len() }));
        return Ok(());
    }
    if !records.is_empty() {
        let mut rows =
            vec![["DLQ TOPIC", "PART", "OFFSET", "SOURCE", "WORKER", "CLASS", "ATTEMPTS", "TIME", "MESSAGE"].map(String::from).to_vec()];
        for d in &records {
            rows.push(vec![
                d.at.topic.clone(),
                d.at.partition.to_string(),
                d.at.offset.to_string(),
                source_label(d),
                d.worker().unwrap_or("?").to_string(),
                d.class().unwrap_or("?").to_string(),
                d.attempts().map_or("?".into(), |n| n.to_string()),
                d.time_ms().map_or("?".into(), rfc3339),
                cut(d.message().unwrap_or(""), MESSAGE_WIDTH),
            ]);
        }
        print_table(&rows);
        println!();
    }
    println!("{} dead-letter record(s){}", records.len(), filter.describe());
    let mut rows = Vec::new();
    for (topic, by_class) in &counts {
        if by_class.is_empty() {
            rows.push(vec![format!("  {topic}"), "-".into(), "0".into()]);
        }
        for (class, n) in by_class {
            rows.push(vec![format!("  {topic}"), class.clone(), n.to_string()]);
        }
    }
    print_table(&rows);
    Ok(())
}

/// `orderflow dlq show DLQ_TOPIC PARTITION OFFSET`: every header (text, or `0x…` hex when not
/// UTF-8; `orderflow.dlq.time` also as RFC 3339), the key, and the value decoded to JSON with the
/// topology's codec, or the decode error and a hex dump of its first 256 bytes. With `--json`:
/// one object `{dlq_topic, partition, offset, headers: [{key, value}], key, value_bytes,
/// value_dropped, schema, event}` where a value that does not decode has `decode_error` and
/// `value_hex` (first 256 bytes) instead of `schema` and `event`.
///
/// Errors: unknown topic ([`find_topic`]), no such partition, the offset outside the partition's
/// watermarks, no record at that offset (a transaction marker or a removed record).
async fn show(a: ShowArgs) -> Result<()> {
    let loaded = crate::topology::load_topology(&a.common.topology, a.common.bootstrap.as_deref())?;
    let codec = Codec::load(&loaded.avro_dir(), loaded.topology.broker.registry_url.as_deref())?;
    let topology = loaded.topology.clone();
    let (topic, partition, offset) = (a.topic.clone(), a.partition, a.offset);
    let record = blocking(move || {
        let reader = Reader::new(&topology.broker, "orderflow-dlq-reader", "creating the dead-letter reader")?;
        let on_broker = reader.broker_topics()?;
        let partitions = match find_topic(&topic, &topology, &on_broker)? {
            Found::Present(n) => n,
            Found::NotCreated => bail!("{topic} does not exist on the broker yet: nothing was dead-lettered there"),
        };
        if !(0..partitions).contains(&partition) {
            bail!("{topic} has {partitions} partition(s) (0..={}); there is no partition {partition}", partitions - 1);
        }
        let (low, high) = reader.watermarks(&topic, partition)?;
        if offset < low || offset >= high {
            let holds = if low < high { format!("offsets {low}..={}", high - 1) } else { "no records".to_string() };
            bail!("offset {offset} is outside {topic}[{partition}]: low watermark {low}, high watermark {high} ({holds})");
        }
        let r = Range { topic: topic.clone(), partition, start: offset, end: offset + 1 };
        read(&reader, &[r], true)?.into_iter().next().with_context(|| {
            format!("{topic}/{partition}/{offset} holds no record (a transaction marker, or a record removed by retention)")
        })
    })
    .await?;
    let decoded = match &record.value {
        Some(v) => Some(codec.decode(v).await),
        None => None,
    };
    if a.json {
        let mut out = json!({
            "dlq_topic": record.at.topic,
            "partition": record.at.partition,
            "offset": record.at.offset,
            "headers": record.headers.iter().map(|(k, v)| json!({"key": k, "value": v.as_deref().map(text_or_hex)})).collect::<Vec<_>>(),
            "key": record.key.as_deref().map(text_or_hex),
            "value_bytes": record.value_len,
            "value_dropped": record.value_dropped(),
        });
        match &decoded {
            Some(Ok(event)) => {
                out["schema"] = json!(event.schema_name());
                out["event"] = event.to_json();
            }
            Some(Err(e)) => {
                out["decode_error"] = json!(e.to_string());
                let v = record.value.as_deref().unwrap_or_default();
                out["value_hex"] = json!(hex(&v[..v.len().min(HEX_DUMP_BYTES)]));
            }
            None => {}
        }
        println!("{out}");
        return Ok(());
    }
    println!("{}", record.at);
    println!("headers:");
    if record.headers.is_empty() {
        println!("  (none)");
    }
    for (k, v) in &record.headers {
        let shown = v.as_deref().map_or("(null)".to_string(), text_or_hex);
        match (k.as_str(), record.time_ms()) {
            (H_TIME, Some(ms)) => println!("  {k}: {shown} ({})", rfc3339(ms)),
            _ => println!("  {k}: {shown}"),
        }
    }
    println!("key: {}", record.key.as_deref().map_or("(null)".to_string(), text_or_hex));
    match (&record.value, decoded) {
        (None, _) => match record.value_dropped() {
            Some(len) => println!("value: none (dropped by the runtime: the original was {len} bytes)"),
            None => println!("value: none (null)"),
        },
        (Some(v), Some(Ok(event))) => {
            println!("value: {} bytes, {}", v.len(), event.schema_name());
            println!("{}", serde_json::to_string_pretty(&event.to_json())?);
        }
        (Some(v), Some(Err(e))) => {
            println!("value: {} bytes, does not decode: {e}", v.len());
            let shown = &v[..v.len().min(HEX_DUMP_BYTES)];
            if shown.len() < v.len() {
                println!("first {} bytes:", shown.len());
            }
            print!("{}", hex_dump(shown));
        }
        (Some(_), None) => unreachable!("a value is always decoded"),
    }
    Ok(())
}

/// `orderflow dlq redrive`: re-produces the selected records of one dead-letter topic — `--all`,
/// or `--partition P [--from A] [--to B]` (inclusive offsets), then `--worker` / `--class` — to
/// their source topic (`orderflow.dlq.source-topic`) or to `--into`; see [`plan`] for what each
/// record becomes, which are refused (value dropped) and which are skipped (same source record
/// already sent by this run).
///
/// Uses an idempotent producer (`enable.idempotence`, `acks=all`; the topology's producer
/// properties) with the default partitioner, so each record lands on its key's partition, and
/// waits for every acknowledgement. Prints one line per planned send, skip and refusal (JSON
/// objects with `--json`), then the [`Summary`] as one JSON line on stdout. `--dry-run` checks
/// and prints everything but sends nothing.
///
/// **Safe to repeat**: a redriven record carries its original `eventId`, and every worker
/// deduplicates by `eventId` (domain rule 7), so an event that was already applied (by an earlier
/// redrive, or because only some workers had dead-lettered it) has no second effect. A redriven
/// event arrives after later events of its key; the workers treat it as any late event.
/// Before sending, each value is decoded and a warning printed when it does not decode or its
/// schema is not one the target topic carries (it would be dead-lettered again).
///
/// Errors (nothing is sent): `--from` after `--to`; unknown topic ([`find_topic`]); no such
/// partition; `--from` / `--to` outside the partition's watermarks; an empty selection; a
/// target topic missing on the broker. Exits non-zero after the summary when any delivery failed.
async fn redrive(a: RedriveArgs) -> Result<()> {
    if let (Some(f), Some(t)) = (a.from, a.to) {
        if f > t {
            bail!("--from {f} is after --to {t}");
        }
    }
    let loaded = crate::topology::load_topology(&a.common.topology, a.common.bootstrap.as_deref())?;
    warn_unknown_class(a.class.as_deref());
    let codec = Codec::load(&loaded.avro_dir(), loaded.topology.broker.registry_url.as_deref())?;
    let topology = loaded.topology.clone();
    let (topic, partition, from, to) = (a.topic.clone(), a.partition, a.from, a.to);
    let (records, on_broker, what) = blocking(move || {
        let reader = Reader::new(&topology.broker, "orderflow-dlq-reader", "creating the dead-letter reader")?;
        let on_broker = reader.broker_topics()?;
        let partitions = match find_topic(&topic, &topology, &on_broker)? {
            Found::Present(n) => n,
            Found::NotCreated => bail!("empty selection: {topic} does not exist on the broker yet (nothing was dead-lettered there)"),
        };
        let mut ranges = Vec::new();
        let what = match partition {
            Some(p) => {
                if !(0..partitions).contains(&p) {
                    bail!("{topic} has {partitions} partition(s) (0..={}); there is no partition {p}", partitions - 1);
                }
                let r = range(&topic, p, reader.watermarks(&topic, p)?, from, to)?;
                let what = format!("{topic}[{p}] offsets {}..={}", r.start, r.end - 1);
                ranges.push(r);
                what
            }
            None => {
                for p in 0..partitions {
                    ranges.push(range(&topic, p, reader.watermarks(&topic, p)?, None, None)?);
                }
                format!("{topic} (all {partitions} partitions)")
            }
        };
        Ok((read(&reader, &ranges, true)?, on_broker, what))
    })
    .await?;
    let filter = Filter { worker: a.worker, class: a.class };
    let selected: Vec<DeadLetter> = records.iter().filter(|d| filter.matches(d)).cloned().collect();
    if records.is_empty() {
        bail!("empty selection: {what} holds no record");
    }
    if selected.is_empty() {
        bail!("empty selection: {} record(s) in {what}, none{}", records.len(), filter.describe());
    }
    let plan = plan(&selected, a.into.as_deref(), now_ms());
    let targets: BTreeSet<&str> = plan.sends.iter().map(|s| s.target.as_str()).collect();
    for t in &targets {
        if !on_broker.contains_key(*t) {
            bail!("target topic {t} does not exist on the broker; nothing was sent (create it, or choose another with --into)");
        }
    }

    // What will be sent, with a warning for values the target's workers would dead-letter again.
    for s in &plan.sends {
        let (schema, warning) = match &s.value {
            None => (None, None),
            Some(v) => match codec.decode(v).await {
                Ok(event) => {
                    let name = event.schema_name();
                    let carried = loaded.topology.topics.get(&s.target).and_then(|t| t.schema.as_ref()).map(|sc| sc.names());
                    let warning = match carried {
                        Some(names) if !names.contains(&name) => Some(format!(
                            "{name} is not a schema {} carries ({}): it will be dead-lettered again",
                            s.target,
                            names.join(", ")
                        )),
                        _ => None,
                    };
                    (Some(name), warning)
                }
                Err(e) => (None, Some(format!("the value does not decode ({e}): it will be dead-lettered again"))),
            },
        };
        if let Some(w) = &warning {
            eprintln!("warning: {}: {w}", s.from);
        }
        let key = s.key.as_deref().map(|k| String::from_utf8_lossy(k).into_owned());
        if a.json {
            println!(
                "{}",
                json!({"action": if a.dry_run { "would_send" } else { "send" }, "record": s.from.to_string(), "target": s.target,
                       "key": key, "schema": schema, "value_bytes": s.value.as_ref().map(Vec::len),
                       "source": s.source.as_ref().map(|c| c.to_string()), "warning": warning})
            );
        } else {
            println!(
                "{} {} -> {} key {} ({}, {} bytes)",
                if a.dry_run { "would send" } else { "sending" },
                s.from,
                s.target,
                key.as_deref().unwrap_or("(null)"),
                schema.unwrap_or("not decodable"),
                s.value.as_ref().map_or(0, Vec::len)
            );
        }
    }
    for k in &plan.skipped_same_source {
        if a.json {
            println!("{}", json!({"action": "skip_same_source", "record": k.record, "same_source_as": k.same_source_as}));
        } else {
            println!("skip {}: same source record as {}", k.record, k.same_source_as);
        }
    }
    for r in &plan.refused {
        eprintln!("refused {}: {}", r.record, r.reason);
        if a.json {
            println!("{}", json!({"action": "refuse", "record": r.record, "reason": r.reason}));
        }
    }

    let mut summary = Summary {
        dry_run: a.dry_run,
        selected: plan.selected,
        planned: plan.sends.len(),
        skipped_same_source: plan.skipped_same_source.len(),
        refused: plan.refused.len(),
        refusals: plan.refused.clone(),
        ..Summary::default()
    };
    if a.dry_run {
        for s in &plan.sends {
            *summary.by_target.entry(s.target.clone()).or_default() += 1;
        }
        println!("{}", serde_json::to_string(&summary)?);
        return Ok(());
    }
    let producer: FutureProducer = client_config(&loaded.topology.broker, Side::Producer).create().context("creating the producer")?;
    // Enqueued in plan order (the idempotent producer keeps it per partition), acknowledged together.
    let deliveries: Vec<_> = plan
        .sends
        .iter()
        .map(|s| {
            let mut headers = OwnedHeaders::new_with_capacity(s.headers.len());
            for (k, v) in &s.headers {
                headers = headers.insert(Header { key: k.as_str(), value: v.as_deref() });
            }
            let mut record = FutureRecord::<[u8], [u8]>::to(&s.target).headers(headers);
            if let Some(k) = &s.key {
                record = record.key(k.as_slice());
            }
            if let Some(v) = &s.value {
                record = record.payload(v.as_slice());
            }
            producer.send(record, Timeout::Never)
        })
        .collect();
    let acks = futures::future::join_all(deliveries).await;
    let _ = producer.flush(Timeout::After(FLUSH_TIMEOUT));
    for (s, ack) in plan.sends.iter().zip(acks) {
        match ack {
            Ok(_) => {
                summary.sent += 1;
                *summary.by_target.entry(s.target.clone()).or_default() += 1;
            }
            Err((e, _)) => {
                eprintln!("delivery of {} to {} failed: {e}", s.from, s.target);
                summary.failed += 1;
                summary.failures.push(json!({"record": s.from.to_string(), "target": s.target, "error": e.to_string()}));
            }
        }
    }
    println!("{}", serde_json::to_string(&summary)?);
    if summary.failed > 0 {
        bail!("{} of {} deliveries failed", summary.failed, summary.planned);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn h(k: &str, v: &str) -> (String, Option<Vec<u8>>) {
        (k.to_string(), Some(v.as_bytes().to_vec()))
    }

    /// A dead-letter record at `dlq/partition/offset` of source `order.created[sp]@so`.
    fn dl(partition: i32, offset: i64, worker: &str, class: &str, so: i64) -> DeadLetter {
        DeadLetter {
            at: Coordinates { topic: "order.created.dlq".into(), partition, offset },
            key: Some(b"O-1".to_vec()),
            value: Some(vec![0xC3, 0x01, 1, 2]),
            value_len: Some(4),
            headers: vec![
                h("traceparent", "00-abc"),
                h(H_SOURCE_TOPIC, "order.created"),
                h(H_SOURCE_PARTITION, "3"),
                h(H_SOURCE_OFFSET, &so.to_string()),
                h(H_WORKER, worker),
                h(H_ERROR_CLASS, class),
                h(H_ERROR_MESSAGE, "OrderCompleted on order.created"),
                h(H_ATTEMPTS, "1"),
                h(H_TIME, "1700000000123"),
            ],
        }
    }

    #[test]
    fn headers_give_source_worker_class_attempts_and_time() {
        let d = dl(3, 7, "canceller", "wrong_schema", 41);
        assert_eq!(d.source(), Some(Coordinates { topic: "order.created".into(), partition: 3, offset: 41 }));
        assert_eq!(
            (d.worker(), d.class(), d.attempts(), d.time_ms()),
            (Some("canceller"), Some("wrong_schema"), Some(1), Some(1700000000123))
        );
        assert_eq!(d.value_dropped(), None);
        assert_eq!(d.original_headers().map(|(k, _)| k.as_str()).collect::<Vec<_>>(), vec!["traceparent"]);
        let j = d.list_json();
        assert_eq!(j["source_topic"], "order.created");
        assert_eq!(j["source_offset"], 41);
        assert_eq!(j["time"], "2023-11-14T22:13:20.123Z");
        assert_eq!(j["key"], "O-1");
        assert_eq!(j["value_bytes"], 4);
    }

    #[test]
    fn the_last_occurrence_of_a_header_wins_and_bad_numbers_give_none() {
        let mut d = dl(0, 0, "w", "invalid", 1);
        d.headers.insert(0, h(H_WORKER, "spoofed-by-the-original-record"));
        d.headers.push(h(H_SOURCE_OFFSET, "not a number"));
        assert_eq!(d.worker(), Some("w"));
        assert_eq!(d.source(), None);
        assert_eq!(d.list_json()["source_topic"], "order.created");
        assert_eq!(source_label(&d), "order.created[?]@?");
    }

    #[test]
    fn filter_by_worker_and_class() {
        let d = dl(0, 0, "canceller", "wrong_schema", 1);
        assert!(Filter::default().matches(&d));
        assert!(Filter { worker: Some("canceller".into()), class: Some("wrong_schema".into()) }.matches(&d));
        assert!(!Filter { worker: Some("deduplicator".into()), class: None }.matches(&d));
        assert!(!Filter { worker: None, class: Some("invalid".into()) }.matches(&d));
        assert_eq!(Filter { worker: Some("w".into()), class: Some("c".into()) }.describe(), " with worker w and class c");
    }

    #[test]
    fn one_send_per_source_record_with_original_and_redrive_headers() {
        let records = vec![
            dl(3, 0, "deduplicator", "wrong_schema", 41),
            dl(3, 1, "canceller", "wrong_schema", 41),
            dl(3, 2, "canceller", "wrong_schema", 40),
        ];
        let p = plan(&records, None, 1_700_000_000_999);
        assert_eq!(p.selected, 3);
        assert_eq!(p.sends.len(), 2);
        // In source order: offset 40 first.
        assert_eq!(p.sends[0].from.to_string(), "order.created.dlq/3/2");
        assert_eq!(p.sends[1].from.to_string(), "order.created.dlq/3/0");
        assert_eq!(
            p.skipped_same_source,
            vec![Skipped { record: "order.created.dlq/3/1".into(), same_source_as: "order.created.dlq/3/0".into() }]
        );
        assert!(p.refused.is_empty());
        let s = &p.sends[1];
        assert_eq!(s.target, "order.created");
        assert_eq!((s.key.as_deref(), s.value.as_deref()), (Some(&b"O-1"[..]), Some(&[0xC3, 0x01, 1, 2][..])));
        assert_eq!(
            s.headers,
            vec![h("traceparent", "00-abc"), h(H_REDRIVE_FROM, "order.created.dlq/3/0"), h(H_REDRIVE_TIME, "1700000000999")]
        );
    }

    #[test]
    fn into_overrides_the_target_and_an_earlier_redrive_header_is_replaced() {
        let mut d = dl(1, 5, "deduplicator", "wrong_schema", 2);
        d.headers.insert(1, h(H_REDRIVE_FROM, "order.created.dlq/0/0"));
        d.headers.insert(1, h(H_REDRIVE_TIME, "1"));
        let p = plan(&[d], Some("order.completed"), 7);
        assert_eq!(p.sends[0].target, "order.completed");
        assert_eq!(
            p.sends[0].headers,
            vec![h("traceparent", "00-abc"), h(H_REDRIVE_FROM, "order.created.dlq/1/5"), h(H_REDRIVE_TIME, "7")]
        );
    }

    #[test]
    fn dropped_values_are_refused_and_a_full_copy_of_the_same_source_is_sent() {
        let mut dropped = dl(0, 0, "deduplicator", "oversized", 9);
        dropped.value = None;
        dropped.value_len = None;
        dropped.headers.push(h(H_VALUE_DROPPED, "2000000"));
        let full = dl(0, 1, "canceller", "oversized", 9);
        let p = plan(&[dropped, full], None, 0);
        assert_eq!(p.sends.len(), 1);
        assert_eq!(p.sends[0].from.to_string(), "order.created.dlq/0/1");
        assert_eq!(p.refused.len(), 1);
        assert_eq!(p.refused[0].record, "order.created.dlq/0/0");
        assert!(
            p.refused[0].reason.contains("2000000 bytes") && p.refused[0].reason.contains("order.created[3]@9"),
            "{}",
            p.refused[0].reason
        );
        assert!(p.skipped_same_source.is_empty());
    }

    #[test]
    fn without_source_headers_a_record_needs_into() {
        let mut d = dl(2, 3, "w", "not_avro", 0);
        d.headers.retain(|(k, _)| !k.starts_with("orderflow.dlq.source"));
        let p = plan(std::slice::from_ref(&d), None, 0);
        assert!(p.sends.is_empty());
        assert!(p.refused[0].reason.contains("--into"), "{:?}", p.refused);
        let p = plan(&[d.clone(), d], Some("x"), 0);
        assert_eq!(p.sends.len(), 2, "no source coordinates: nothing to deduplicate on");
    }

    #[test]
    fn ranges_default_to_every_record_and_reject_offsets_outside_the_watermarks() {
        assert_eq!(range("t", 1, (5, 12), None, None).unwrap(), Range { topic: "t".into(), partition: 1, start: 5, end: 12 });
        assert_eq!(range("t", 1, (5, 12), Some(6), Some(6)).unwrap(), Range { topic: "t".into(), partition: 1, start: 6, end: 7 });
        assert_eq!(range("t", 1, (5, 12), None, Some(11)).unwrap().end, 12);
        let err = |from, to, wm| range("t", 1, wm, from, to).unwrap_err().to_string();
        assert_eq!(err(Some(9), Some(3), (0, 12)), "--from 9 is after --to 3");
        assert_eq!(err(Some(4), None, (5, 12)), "--from 4 is outside t[1]: low watermark 5, high watermark 12 (offsets 5..=11)");
        assert_eq!(err(None, Some(12), (5, 12)), "--to 12 is outside t[1]: low watermark 5, high watermark 12 (offsets 5..=11)");
        assert_eq!(err(Some(0), None, (3, 3)), "--from 0 is outside t[1]: low watermark 3, high watermark 3 (no records)");
        assert_eq!(range("t", 0, (3, 3), None, None).unwrap().start, range("t", 0, (3, 3), None, None).unwrap().end);
    }

    fn topology() -> Topology {
        let text = r#"
[broker]
bootstrap = "x:1"
[topics.in]
partitions = 2
key = "k"
schema = "S"
[topics.other]
partitions = 2
key = "k"
schema = "S"
dead_letter = "other.poison"
[topics.out]
partitions = 2
key = "k"
schema = "S"
[workers.w]
kind = "a"
inputs = ["in", "other"]
outputs = { out = "out" }
"#;
        orderflow_runtime::topology::parse(text, std::path::Path::new("t.toml")).unwrap().topology
    }

    #[test]
    fn topics_are_found_in_the_topology_or_on_the_broker() {
        let t = topology();
        let broker = BTreeMap::from([("in.dlq".to_string(), 2), ("legacy.dlq".to_string(), 1), ("in".to_string(), 2)]);
        assert_eq!(find_topic("in.dlq", &t, &broker).unwrap(), Found::Present(2));
        assert_eq!(find_topic("other.poison", &t, &broker).unwrap(), Found::NotCreated);
        assert_eq!(find_topic("legacy.dlq", &t, &broker).unwrap(), Found::Present(1));
        let e = find_topic("nope.dlq", &t, &broker).unwrap_err().to_string();
        assert_eq!(e, "unknown dead-letter topic nope.dlq: not a dead-letter topic of the topology (in.dlq, other.poison) and not a topic on the broker");
        let e = find_topic("in", &t, &broker).unwrap_err().to_string();
        assert_eq!(e, "in is a topic of the topology, not a dead-letter topic; its dead-letter topic is in.dlq");
    }

    #[test]
    fn formatting_helpers() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(cut("short", 80), "short");
        assert_eq!(cut("a\nb", 80), "a b");
        assert_eq!(cut("ééééé", 3), "éé…");
        let dump = hex_dump(&[0xC3, 0x01, b'O', b'-', b'1']);
        assert_eq!(dump, format!("00000000  {:<47}  |..O-1|\n", "c3 01 4f 2d 31"));
        assert_eq!(hex_dump(&[0u8; 17]).lines().count(), 2);
        assert_eq!(text_or_hex(&[0xff, 0x00]), "0xff00");
        assert_eq!(text_or_hex(b"O-1"), "O-1");
    }

    #[derive(Parser, Debug)]
    struct TestCli {
        #[command(subcommand)]
        action: DlqAction,
    }

    #[test]
    fn redrive_needs_all_or_a_partition_and_offsets_need_a_partition() {
        let parse = |args: &[&str]| TestCli::try_parse_from([&["t", "redrive", "--topic", "x.dlq"], args].concat());
        assert!(parse(&["--all"]).is_ok());
        assert!(parse(&["--partition", "1", "--from", "2", "--to", "3"]).is_ok());
        assert!(parse(&[]).is_err(), "no selection");
        assert!(parse(&["--all", "--partition", "1"]).is_err());
        assert!(parse(&["--from", "2"]).is_err(), "--from without --partition");
        let ok = parse(&["--all", "--class", "wrong_schema", "--into", "order.completed", "--dry-run", "--json"]).unwrap();
        match ok.action {
            DlqAction::Redrive(r) => {
                assert!(r.all && r.dry_run && r.json);
                assert_eq!((r.class.as_deref(), r.into.as_deref()), (Some("wrong_schema"), Some("order.completed")));
            }
            other => panic!("{other:?}"),
        }
        assert!(TestCli::try_parse_from(["t", "show", "x.dlq", "1", "2", "--json"]).is_ok());
        assert!(TestCli::try_parse_from(["t", "list", "--topic", "a.dlq", "--topic", "b.dlq", "--class", "invalid"]).is_ok());
    }
}
