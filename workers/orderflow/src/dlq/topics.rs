//! Dead-letter topics named on the command line, offset ranges checked against the watermarks, and
//! reading them.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use orderflow_runtime::topology::Topology;

use crate::kafkaio::{Reader, Span};

use super::{DeadLetter, H_SOURCE_TOPIC};

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
pub(super) fn read(reader: &Reader, ranges: &[Range], with_values: bool) -> Result<Vec<DeadLetter>> {
    let spans: Vec<Span> = ranges.iter().map(Span::from).collect();
    let mut out = reader.collect(&spans, |m| DeadLetter::from_message(m, with_values))?;
    out.sort_by(|a, b| a.at.cmp(&b.at));
    Ok(out)
}

// ------------------------------------------------------------------------------------------
// Formatting.

/// `topic[partition]@offset`, or `?` when unknown.
pub(super) fn source_label(d: &DeadLetter) -> String {
    match d.source() {
        Some(s) => format!("{}[{}]@{}", s.topic, s.partition, s.offset),
        None => d.header(H_SOURCE_TOPIC).map(|t| format!("{t}[?]@?")).unwrap_or_else(|| "?".into()),
    }
}
