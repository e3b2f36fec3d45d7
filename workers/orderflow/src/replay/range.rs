//! The replayed range: offsets or times on the command line checked against the watermarks and
//! resolved per partition ([`resolve`]), and reading it ([`read_range`]).

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use orderflow_runtime::topology::{BrokerConfig, Loaded};
use orderflow_runtime::worker::now_ms;
use rdkafka::message::{Message, OwnedMessage};
use serde::Serialize;

use crate::kafkaio::{blocking, Reader, Span};

use super::{ReplayArgs, STALL_TIMEOUT};

// ------------------------------------------------------------------------------------------
// Ranges.

/// Offsets `[from, to)` of one partition of the replayed topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PartitionRange {
    pub partition: i32,
    /// First offset (inclusive).
    pub from: i64,
    /// End offset (exclusive); `from == to` is an empty range.
    pub to: i64,
}

impl PartitionRange {
    /// Offsets in the range (records, unless some are transaction markers or aborted).
    pub fn len(&self) -> u64 {
        (self.to - self.from).max(0) as u64
    }

    /// Whether the range holds no offset.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What to replay: one range per selected partition, in partition order (empty ranges kept,
/// so a summary shows every partition that was looked at).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Resolved {
    pub topic: String,
    pub ranges: Vec<PartitionRange>,
}

impl Resolved {
    /// Offsets in all ranges: an upper bound of the records read (transaction markers and
    /// aborted records take offsets but are not delivered to a `read_committed` reader).
    pub fn total(&self) -> u64 {
        self.ranges.iter().map(PartitionRange::len).sum()
    }
}

/// Checks an offset range `[from, to)` (`to` = `None`: the high watermark) of `topic[partition]`
/// against its watermarks `(low, high)`.
///
/// Errors: `to < from`; `from` below the low watermark (those records are gone: retention);
/// `from` or `to` above the high watermark (not written yet).
pub fn offset_range(topic: &str, partition: i32, (low, high): (i64, i64), from: i64, to: Option<i64>) -> Result<PartitionRange> {
    if let Some(t) = to {
        if t < from {
            bail!("--to-offset {t} is before --from-offset {from}");
        }
    }
    if from < low {
        bail!(
            "--from-offset {from} is out of retention in {topic}[{partition}]: below the low watermark {low} (offsets before it are deleted); {}",
            holds(low, high)
        );
    }
    if from > high {
        bail!("--from-offset {from} is beyond the end of {topic}[{partition}]: above the high watermark {high}; {}", holds(low, high));
    }
    if let Some(t) = to {
        if t > high {
            bail!(
                "--to-offset {t} is beyond the end of {topic}[{partition}]: above the high watermark {high} (--to-offset is exclusive); {}",
                holds(low, high)
            );
        }
    }
    Ok(PartitionRange { partition, from, to: to.unwrap_or(high) })
}

/// Checks a time range (ms since the epoch; `to` exclusive, `None`: no end).
///
/// Errors: `to` before `from`, or equal to it (an empty range).
pub fn time_range(from_ms: i64, to_ms: Option<i64>) -> Result<()> {
    if let Some(t) = to_ms {
        if t < from_ms {
            bail!("--to {} is before --from {}", crate::kafkaio::rfc3339(t), crate::kafkaio::rfc3339(from_ms));
        }
        if t == from_ms {
            bail!("empty range: --from and --to are both {} (--to is exclusive)", crate::kafkaio::rfc3339(t));
        }
    }
    Ok(())
}

/// The offset range of a time range in `topic[partition]`, given the offsets `offsets_for_times`
/// found for its ends (`None`: no record at or after that time) and the watermarks.
pub fn time_offsets((_, high): (i64, i64), from: Option<i64>, to: Option<i64>, partition: i32) -> PartitionRange {
    let from = from.unwrap_or(high).min(high);
    let to = to.unwrap_or(high).clamp(from, high);
    PartitionRange { partition, from, to }
}

/// `the partition holds offsets L..=H-1` / `the partition is empty (watermarks L, H)`.
fn holds(low: i64, high: i64) -> String {
    if low < high {
        format!("the partition holds offsets {low}..={}", high - 1)
    } else {
        format!("the partition holds no record (low and high watermark {low})")
    }
}

/// The range description for the empty-range error.
fn describe(args: &ReplayArgs, now: i64) -> String {
    match (args.from_offset, args.from) {
        (Some(f), _) => match args.to_offset {
            Some(t) => format!("at offsets {f}..{t}"),
            None => format!("from offset {f} to the high watermark"),
        },
        (None, Some(f)) => match args.to {
            Some(t) => format!("between {} and {}", crate::kafkaio::rfc3339(f.at(now)), crate::kafkaio::rfc3339(t.at(now))),
            None => format!("from {} to the high watermark", crate::kafkaio::rfc3339(f.at(now))),
        },
        (None, None) => "no range".into(),
    }
}

/// A reader for `replay` (the shared [`Reader`] with its own `group.id` prefix), giving up after
/// [`STALL_TIMEOUT`] without progress.
///
/// Errors: the client cannot be created.
pub(super) fn reader(broker: &BrokerConfig) -> Result<Reader> {
    Ok(Reader::new(broker, "orderflow-replay-reader", "creating the replay reader")?.stall_timeout(STALL_TIMEOUT))
}

/// Resolves the command line's topic, partitions and range against the broker.
///
/// Steps: the topic must be on the broker (declared in the topology or not); `--through` must
/// name a worker of the topology; `--partition`s must exist; each partition's range is checked
/// against its watermarks ([`offset_range`]) or found with `offsets_for_times` ([`time_range`],
/// [`time_offsets`]); the whole range must hold at least one offset.
///
/// Errors: unknown topic (not in the topology and not on the broker), a topology topic not
/// created on the broker, unknown worker, unknown partition, `--to` before `--from`, offsets out
/// of retention or beyond the high watermark, an empty range; broker errors. A time range whose
/// start resolves to a low watermark above 0 only warns (stderr): older records of the range may
/// have been deleted by retention.
pub async fn resolve(args: &ReplayArgs, loaded: &Loaded) -> Result<Resolved> {
    if let Some(w) = &args.through {
        if !loaded.topology.workers.contains_key(w) {
            bail!(
                "unknown worker {w} for --through: the topology's workers are {}",
                loaded.topology.workers.keys().cloned().collect::<Vec<_>>().join(", ")
            );
        }
    }
    let now = now_ms();
    let (from_ms, to_ms) = match args.from {
        Some(f) => {
            let (f, t) = (f.at(now), args.to.map(|t| t.at(now)));
            time_range(f, t)?;
            (Some(f), t)
        }
        None => (None, None),
    };
    let broker = loaded.topology.broker.clone();
    let declared = loaded.topology.topics.contains_key(&args.topic);
    let a = args.clone();
    let resolved = blocking(move || -> Result<Resolved> {
        let reader = reader(&broker)?;
        let on_broker = reader.broker_topics()?;
        let topic = &a.topic;
        let Some(&count) = on_broker.get(topic) else {
            if declared {
                bail!("topic {topic} is declared in the topology but does not exist on the broker (run `orderflow topics`)");
            }
            bail!("unknown topic {topic}: not in the topology and not on the broker");
        };
        let partitions: Vec<i32> = if a.partitions.is_empty() {
            (0..count).collect()
        } else {
            let mut ps = a.partitions.clone();
            ps.sort_unstable();
            ps.dedup();
            if let Some(p) = ps.iter().find(|p| !(0..count).contains(*p)) {
                bail!("{topic} has {count} partition(s) (0..={}); there is no partition {p}", count - 1);
            }
            ps
        };
        let mut watermarks = BTreeMap::new();
        for &p in &partitions {
            let wm = reader.watermarks(topic, p)?;
            watermarks.insert(p, wm);
        }
        let mut ranges = Vec::new();
        if let Some(from) = a.from_offset {
            for (&p, &wm) in &watermarks {
                ranges.push(offset_range(topic, p, wm, from, a.to_offset)?);
            }
        } else {
            let from_ms = from_ms.expect("clap requires --from-offset or --from");
            let find = |ms: i64| reader.offsets_for_time(topic, &partitions, ms);
            let starts = find(from_ms)?;
            let ends = match to_ms {
                Some(t) => find(t)?,
                None => BTreeMap::new(),
            };
            for (&p, &wm) in &watermarks {
                // The broker's answer is checked: the record there must be at or after the time
                // (tansu 0.6 answers a time after the last record with offset 0, not "none").
                let check = |o: Option<i64>, ms: i64| -> Result<Option<i64>> {
                    match o {
                        Some(o) if o < wm.1 => first_at_or_after(&broker, topic, p, o.max(wm.0), wm.1, ms).map(Some),
                        other => Ok(other),
                    }
                };
                let from = check(starts.get(&p).copied().flatten(), from_ms)?;
                let to = match to_ms {
                    Some(t) => check(ends.get(&p).copied().flatten(), t)?,
                    None => None,
                };
                let r = time_offsets(wm, from, to, p);
                let r = if to_ms.is_none() { PartitionRange { to: wm.1, ..r } } else { r };
                if r.from == wm.0 && wm.0 > 0 && r.from < r.to {
                    eprintln!(
                        "warning: {topic}[{p}] starts at offset {} (its low watermark): records of the range older than that were deleted by retention",
                        wm.0
                    );
                }
                ranges.push(r);
            }
        }
        Ok(Resolved { topic: topic.clone(), ranges })
    })
    .await?;
    if resolved.total() == 0 {
        bail!(
            "empty range: no record of {} {} (partitions {})",
            resolved.topic,
            describe(args, now),
            resolved.ranges.iter().map(|r| format!("{}: {}..{}", r.partition, r.from, r.to)).collect::<Vec<_>>().join(", ")
        );
    }
    Ok(resolved)
}

/// The first offset in `[start, high)` of `topic[partition]` whose record's timestamp is at or
/// after `ms`, or `high` when there is none. Reads from `start` on: one record when the broker's
/// `offsets_for_times` answer was right.
fn first_at_or_after(broker: &BrokerConfig, topic: &str, partition: i32, start: i64, high: i64, ms: i64) -> Result<i64> {
    let r = Resolved { topic: topic.to_string(), ranges: vec![PartitionRange { partition, from: start, to: high }] };
    let mut found = None;
    let read = read_range(broker, &r, &mut |m| {
        if m.timestamp().to_millis().is_some_and(|t| t >= ms) {
            found = Some(m.offset());
            bail!("found");
        }
        Ok(())
    });
    match found {
        Some(o) => Ok(o),
        None => read.map(|_| high),
    }
}

/// Reads every record of `resolved`'s ranges and calls `on_record` for each, in offset order
/// within a partition (partitions interleave). Blocking: call it from `spawn_blocking` or a
/// thread. Reads `read_committed` (the consumer default): transaction markers and aborted
/// records take offsets but are skipped. Returns the number of records passed to `on_record`.
///
/// Errors: an error of `on_record` (reading stops at once); no record of a pending range for
/// 30 s (broker unreachable, or an open transaction holding a `read_committed` reader back).
pub fn read_range(broker: &BrokerConfig, resolved: &Resolved, on_record: &mut dyn FnMut(OwnedMessage) -> Result<()>) -> Result<u64> {
    let topic = resolved.topic.as_str();
    let spans: Vec<Span> = resolved
        .ranges
        .iter()
        .filter(|r| !r.is_empty())
        .map(|r| Span { topic: topic.to_string(), partition: r.partition, start: r.from, end: Some(r.to) })
        .collect();
    if spans.is_empty() {
        return Ok(0);
    }
    let mut count = 0u64;
    let mut failed = None;
    reader(broker)?.scan(
        &spans,
        || true,
        |m| {
            count += 1;
            match on_record(m.detach()) {
                Ok(()) => true,
                Err(e) => {
                    failed = Some(e);
                    false
                }
            }
        },
    )?;
    match failed {
        Some(e) => Err(e),
        None => Ok(count),
    }
}
