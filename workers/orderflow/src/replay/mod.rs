//! `orderflow replay`: re-read a range of a topic and republish it (`--into`) or run it through a
//! worker (`--through`, see [`crate::replay::through`]).
//!
//! The shared front end ([`ReplayArgs`], [`resolve`], [`read_range`]) turns the command line into
//! offset ranges per partition, checked against the broker's watermarks, and reads them by
//! assigning partitions to a consumer with a throwaway `group.id`: it joins no consumer group
//! and commits nothing, so it never disturbs the workers.
//!
//! Ranges: `--from-offset N [--to-offset M]` or `--from TIME [--to TIME]`, `from` inclusive and
//! `to` exclusive; without `--to-offset` / `--to` a range ends at the high watermark seen when it
//! is resolved. A time range is turned into offsets per partition with `offsets_for_times`
//! (the first record whose timestamp is `>=` the time). TIME is RFC 3339 (`2026-11-21T10:00:00Z`,
//! fractional seconds allowed) or relative to now (`now`, `-2h`, `-15m`, `-1h30m`, `-90s`).

pub mod through;

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use clap::Args;
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use orderflow_runtime::kafka::{client_config, Side};
use orderflow_runtime::topology::{BrokerConfig, Loaded};
use orderflow_runtime::worker::now_ms;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::util::Timeout;
use serde::Serialize;
use serde_json::Value;

use crate::kafkaio::{Reader, Span};

/// Reading gives up when no record of a pending range arrives for this long.
const STALL_TIMEOUT: Duration = Duration::from_secs(30);

// ------------------------------------------------------------------------------------------
// Command line.

/// `orderflow replay` flags.
///
/// One of `--from-offset` / `--from` selects the range, one of `--into` / `--through` the mode;
/// `--through` needs `--dry-run` or `--diff`.
#[derive(Args, Debug, Clone)]
#[command(group(clap::ArgGroup::new("range").required(true).args(["from_offset", "from"])))]
#[command(group(clap::ArgGroup::new("mode").required(true).args(["into", "through"])))]
#[command(group(clap::ArgGroup::new("through_mode").args(["dry_run", "diff"])))]
pub struct ReplayArgs {
    /// The topic to read (declared in the topology or present on the broker).
    #[arg(value_name = "TOPIC")]
    pub topic: String,
    /// Topology file: names the broker, the topics and the workers.
    #[arg(long, default_value = "topology.toml", env = "ORDERFLOW_TOPOLOGY")]
    pub topology: PathBuf,
    /// Bootstrap servers (overrides the topology and ORDERFLOW_BOOTSTRAP).
    #[arg(long)]
    pub bootstrap: Option<String>,
    /// Only this partition (repeatable); every partition of the topic when omitted.
    #[arg(long = "partition", value_name = "P")]
    pub partitions: Vec<i32>,
    /// First offset to read (inclusive), in every selected partition.
    #[arg(long, value_name = "N", conflicts_with_all = ["from", "to"])]
    pub from_offset: Option<i64>,
    /// End offset (exclusive), in every selected partition. Default: the high watermark.
    #[arg(long, value_name = "M", requires = "from_offset")]
    pub to_offset: Option<i64>,
    /// First record time (inclusive): RFC 3339 (2026-11-21T10:00:00Z) or relative (-2h, -15m, now).
    #[arg(long, value_name = "TIME", value_parser = parse_time_arg, allow_hyphen_values = true)]
    pub from: Option<TimeSpec>,
    /// End time (exclusive), same forms as --from. Default: up to the high watermark.
    #[arg(long, value_name = "TIME", value_parser = parse_time_arg, allow_hyphen_values = true, requires = "from")]
    pub to: Option<TimeSpec>,
    /// Republish the records to this topic (may be the source topic itself with --yes).
    #[arg(long, value_name = "TOPIC")]
    pub into: Option<String>,
    /// With --into: at most N records per second (paced sends, no bursts). Default: unlimited.
    #[arg(long, value_name = "N", conflicts_with = "through", value_parser = parse_rate)]
    pub rate: Option<f64>,
    /// Run the records through this worker of the topology (needs --dry-run or --diff).
    #[arg(long, value_name = "WORKER", requires = "through_mode")]
    pub through: Option<String>,
    /// With --through: report what the worker would emit; produce nothing.
    #[arg(long, conflicts_with = "into")]
    pub dry_run: bool,
    /// With --through: compare what the worker would emit with what it emitted.
    #[arg(long, conflicts_with_all = ["into", "dry_run"])]
    pub diff: bool,
    /// With --through: reservation TTL of the worker (overrides the topology).
    #[arg(long, value_name = "D", conflicts_with = "into", value_parser = humantime::parse_duration)]
    pub reservation_ttl: Option<Duration>,
    /// Also write the JSON summary (pretty-printed) to this file.
    #[arg(long, value_name = "PATH")]
    pub json_summary: Option<PathBuf>,
    /// Confirm a replay into the source topic itself.
    #[arg(long)]
    pub yes: bool,
}

/// A point in time on the command line: absolute, or a duration before now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeSpec {
    /// Milliseconds since the Unix epoch.
    At(i64),
    /// This long before the moment the range is resolved (`now` is `Ago(0)`).
    Ago(Duration),
}

impl TimeSpec {
    /// Milliseconds since the Unix epoch, relative forms taken from `now_ms`.
    pub fn at(self, now_ms: i64) -> i64 {
        match self {
            TimeSpec::At(ms) => ms,
            TimeSpec::Ago(d) => now_ms - i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 2),
        }
    }
}

/// Parses a TIME: `now`, `-<duration>` (humantime units: `-2h`, `-15m`, `-1h30m`, `-90s`,
/// `-500ms`), or RFC 3339 (`2026-11-21T10:00:00Z`, `2026-11-21T10:00:00.250Z`, or with a
/// `+01:00` style offset).
///
/// Errors: anything else, with the accepted forms in the message.
pub fn parse_time(s: &str) -> Result<TimeSpec> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("now") {
        return Ok(TimeSpec::Ago(Duration::ZERO));
    }
    if let Some(rel) = t.strip_prefix('-') {
        let d = humantime::parse_duration(rel.trim())
            .with_context(|| format!("bad relative time {s:?}: expected -<duration> such as -2h, -15m, -1h30m"))?;
        return Ok(TimeSpec::Ago(d));
    }
    crate::kafkaio::parse_rfc3339_ms(t).map(TimeSpec::At).with_context(|| {
        format!("bad time {s:?}: expected RFC 3339 (2026-11-21T10:00:00Z, 2026-11-21T11:00:00+01:00) or relative (now, -2h, -15m)")
    })
}

fn parse_time_arg(s: &str) -> Result<TimeSpec, String> {
    parse_time(s).map_err(|e| format!("{e:#}"))
}

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 => Ok(r),
        _ => Err(format!("--rate must be a positive number of records per second, not {s:?}")),
    }
}

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
fn reader(broker: &BrokerConfig) -> Result<Reader> {
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
    let resolved = tokio::task::spawn_blocking(move || -> Result<Resolved> {
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
    .await
    .context("resolve task panicked")??;
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

// ------------------------------------------------------------------------------------------
// The command.

/// Runs `orderflow replay`: loads the topology, [`resolve`]s the range, then republishes it
/// (`--into`, [`into`]) or runs it through a worker (`--through`, [`crate::replay::through::run`]).
/// Either mode's JSON summary is printed as the last line of stdout and, with `--json-summary`,
/// written pretty-printed to that file.
///
/// Errors: topology, [`resolve`], the mode's own errors; a failed delivery (after the summary).
pub async fn run(args: ReplayArgs) -> Result<()> {
    let loaded = crate::topology::load_topology(&args.topology, args.bootstrap.as_deref())?;
    let resolved = resolve(&args, &loaded).await?;
    let (summary, failed) = if args.through.is_some() {
        (crate::replay::through::run(&args, &loaded, &resolved).await?, 0)
    } else {
        let s = into(&args, &loaded, &resolved).await?;
        let failed = s.failed;
        (serde_json::to_value(&s)?, failed)
    };
    emit_summary(&summary, args.json_summary.as_ref())?;
    if failed > 0 {
        bail!("{failed} deliveries failed (see the summary's failures)");
    }
    Ok(())
}

/// Prints `summary` on one line of stdout and writes it pretty-printed to `path`.
fn emit_summary(summary: &Value, path: Option<&PathBuf>) -> Result<()> {
    println!("{}", serde_json::to_string(summary)?);
    if let Some(p) = path {
        std::fs::write(p, serde_json::to_string_pretty(summary)? + "\n").with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

/// The JSON summary of `replay --into`.
#[derive(Debug, Clone, Serialize, Default)]
pub struct IntoSummary {
    /// Always `"into"`.
    pub mode: &'static str,
    pub topic: String,
    pub target: String,
    /// `"same-partition"` (target has the source's partition count) or `"by-key"`.
    pub partitioning: &'static str,
    pub ranges: Vec<PartitionRange>,
    /// Records read from the ranges.
    pub read: u64,
    /// Records the broker acknowledged.
    pub sent: u64,
    /// Records whose delivery failed.
    pub failed: u64,
    /// Acknowledged records per target partition.
    pub by_target_partition: BTreeMap<i32, u64>,
    /// Wall time of reading and sending, seconds.
    pub seconds: f64,
    /// `sent / seconds`.
    pub records_per_sec: f64,
    /// `--rate`, records per second (`null`: unlimited).
    pub rate_limit: Option<f64>,
    /// `{record, error}` of the first failed deliveries (at most 20).
    pub failures: Vec<Value>,
}

/// Header added to every replayed record: where it was read, `<topic>/<partition>/<offset>`.
pub const H_REPLAY_SOURCE: &str = "orderflow.replay.source";
/// Header added to every replayed record: when the replay started, ms since the Unix epoch (decimal).
pub const H_REPLAY_TIME: &str = "orderflow.replay.time";
/// Prefix of the replay headers (an earlier replay's are replaced, not accumulated).
pub const REPLAY_HEADER_PREFIX: &str = "orderflow.replay.";
/// Failed deliveries listed in the summary (all are counted).
const MAX_LISTED_FAILURES: usize = 20;

/// `--rate` pacing: a token bucket of capacity one. Send `i` may start no earlier than
/// `interval = 1/rate` after send `i-1` was allowed, so the rate is never exceeded, even in a
/// burst after a stall (no credit is saved up while the producer or the reader is slow).
#[derive(Debug, Clone)]
pub struct Pacer {
    interval: Duration,
    next: Option<Instant>,
}

impl Pacer {
    /// A pacer for `rate` records per second (> 0).
    pub fn new(rate: f64) -> Pacer {
        Pacer { interval: Duration::from_secs_f64(1.0 / rate), next: None }
    }

    /// How long to wait at `now` before the next send; books that send.
    pub fn delay(&mut self, now: Instant) -> Duration {
        let at = match self.next {
            Some(next) if next > now => next,
            _ => now,
        };
        self.next = Some(at + self.interval);
        at - now
    }
}

/// The partition a replayed record goes to: its source partition when the target has the same
/// partition count (`same_partition`), else `None`: the producer's partitioner by key
/// (`murmur2_random`, as the workers use).
pub fn target_partition(same_partition: bool, source_partition: i32) -> Option<i32> {
    same_partition.then_some(source_partition)
}

/// The headers of a replayed record: its own (minus the `orderflow.replay.*` ones of an earlier
/// replay), then [`H_REPLAY_SOURCE`] and [`H_REPLAY_TIME`].
pub fn replay_headers(m: &OwnedMessage, replay_ms: i64) -> OwnedHeaders {
    let mut out = OwnedHeaders::new();
    if let Some(hs) = m.headers() {
        for h in hs.iter().filter(|h| !h.key.starts_with(REPLAY_HEADER_PREFIX)) {
            out = out.insert(Header { key: h.key, value: h.value });
        }
    }
    let source = format!("{}/{}/{}", m.topic(), m.partition(), m.offset());
    out.insert(Header { key: H_REPLAY_SOURCE, value: Some(source.as_bytes()) })
        .insert(Header { key: H_REPLAY_TIME, value: Some(replay_ms.to_string().as_bytes()) })
}

/// A progress bar on stderr with rate and ETA when stderr is a terminal; hidden otherwise.
fn progress_bar(total: u64) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} sent ({per_sec}, ETA {eta}) {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

/// `replay --into TARGET`: republishes every record of `resolved` to `TARGET`.
///
/// * Each record keeps its key, value, headers and timestamp (the original `CreateTime`, or the
///   `LogAppendTime` the broker gave it), plus [`H_REPLAY_SOURCE`] and [`H_REPLAY_TIME`] (the
///   same time for every record of one run).
/// * Partition: the source partition when the target has the same partition count (records of
///   one key stay together and in order), else by key with the default partitioner.
/// * The idempotent producer of the topology (`Side::Producer`: `enable.idempotence`,
///   `acks=all`): records of one partition are written once and in read order; every
///   acknowledgement is awaited before the summary.
/// * `--rate N`: at most N sends per second ([`Pacer`]).
///
/// Safe into a live topic, and safe to repeat: every worker deduplicates its inputs by `eventId`
/// (domain rule 7), so a replayed event that was processed already has no second effect.
/// Replaying into the source topic itself appends copies after the high watermark and needs `--yes`.
///
/// Errors: target not on the broker, target = source without `--yes`, reading ([`read_range`]),
/// producer creation. Failed deliveries are counted in the summary (`failed`, `failures`), and
/// [`run`] exits non-zero after printing it.
async fn into(args: &ReplayArgs, loaded: &Loaded, resolved: &Resolved) -> Result<IntoSummary> {
    let target = args.into.clone().expect("--into");
    if target == resolved.topic && !args.yes {
        bail!(
            "refusing to replay {} into itself: this appends copies of {} record(s) to it; every worker deduplicates by eventId so it is safe, but confirm with --yes",
            target,
            resolved.total()
        );
    }
    let broker = loaded.topology.broker.clone();
    let (source_count, target_count) = {
        let (b, s, t) = (broker.clone(), resolved.topic.clone(), target.clone());
        tokio::task::spawn_blocking(move || -> Result<(Option<i32>, Option<i32>)> {
            let topics = reader(&b)?.broker_topics()?;
            Ok((topics.get(&s).copied(), topics.get(&t).copied()))
        })
        .await
        .context("metadata task panicked")??
    };
    let Some(target_count) = target_count else {
        bail!("target topic {target} does not exist on the broker (create it first, e.g. `orderflow topics` for the topology's topics)");
    };
    let same_partition = source_count == Some(target_count);
    let replay_ms = now_ms();
    let producer: FutureProducer = client_config(&broker, Side::Producer).create().context("creating the producer")?;
    let bar = progress_bar(resolved.total());
    let started = Instant::now();

    // The reader (blocking) enqueues; this task collects the acknowledgements as they come.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, DeliveryFuture)>();
    let acks = {
        let bar = bar.clone();
        tokio::spawn(async move {
            let mut pending = futures::stream::FuturesUnordered::new();
            let mut s = IntoSummary::default();
            let mut open = true;
            loop {
                tokio::select! {
                    m = rx.recv(), if open => match m {
                        Some((from, fut)) => pending.push(async move { (from, fut.await) }),
                        None => open = false,
                    },
                    Some((from, r)) = pending.next(), if !pending.is_empty() => {
                        match r {
                            Ok(Ok(d)) => {
                                s.sent += 1;
                                *s.by_target_partition.entry(d.partition).or_default() += 1;
                            }
                            Ok(Err((e, _))) => s.fail(&from, &e.to_string()),
                            Err(_) => s.fail(&from, "the producer dropped the delivery"),
                        }
                        bar.inc(1);
                    }
                    else => break,
                }
            }
            s
        })
    };

    let read = {
        let (producer, resolved, target) = (producer.clone(), resolved.clone(), target.clone());
        let mut pacer = args.rate.map(Pacer::new);
        let bar = bar.clone();
        tokio::task::spawn_blocking(move || -> Result<(u64, Vec<(String, String)>)> {
            let mut refused = Vec::new();
            let n = read_range(&broker, &resolved, &mut |m| {
                if let Some(p) = pacer.as_mut() {
                    let wait = p.delay(Instant::now());
                    if !wait.is_zero() {
                        std::thread::sleep(wait);
                    }
                }
                let from = format!("{}/{}/{}", m.topic(), m.partition(), m.offset());
                let headers = replay_headers(&m, replay_ms);
                let mut record = FutureRecord::<[u8], [u8]>::to(&target).headers(headers);
                if let Some(k) = m.key() {
                    record = record.key(k);
                }
                if let Some(v) = m.payload() {
                    record = record.payload(v);
                }
                if let Some(ts) = m.timestamp().to_millis() {
                    record = record.timestamp(ts);
                }
                if let Some(p) = target_partition(same_partition, m.partition()) {
                    record = record.partition(p);
                }
                loop {
                    match producer.send_result(record) {
                        Ok(fut) => {
                            let _ = tx.send((from, fut));
                            break;
                        }
                        Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                            record = r;
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        Err((e, _)) => {
                            refused.push((from, e.to_string()));
                            bar.inc(1);
                            break;
                        }
                    }
                }
                Ok(())
            })?;
            drop(tx);
            Ok((n, refused))
        })
    };
    let read = read.await.context("reader task panicked")?;
    // Wait for every acknowledgement even when reading failed: what was sent is reported.
    let _ = producer.flush(Timeout::After(Duration::from_secs(60)));
    let mut s = acks.await.context("acknowledgement task panicked")?;
    bar.finish_and_clear();
    let (read, refused) = read?;
    for (from, e) in refused {
        s.fail(&from, &e);
    }
    s.mode = "into";
    s.topic = resolved.topic.clone();
    s.target = target;
    s.partitioning = if same_partition { "same-partition" } else { "by-key" };
    s.ranges = resolved.ranges.clone();
    s.read = read;
    s.seconds = started.elapsed().as_secs_f64();
    s.records_per_sec = if s.seconds > 0.0 { s.sent as f64 / s.seconds } else { 0.0 };
    s.rate_limit = args.rate;
    Ok(s)
}

impl IntoSummary {
    fn fail(&mut self, record: &str, error: &str) {
        self.failed += 1;
        eprintln!("delivery of {record} failed: {error}");
        if self.failures.len() < MAX_LISTED_FAILURES {
            self.failures.push(serde_json::json!({"record": record, "error": error}));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_as_rfc3339_or_relative() {
        assert_eq!(parse_time("2026-11-21T10:00:00Z").unwrap(), TimeSpec::At(1_795_255_200_000));
        assert_eq!(parse_time("2026-11-21T10:00:00.250Z").unwrap(), TimeSpec::At(1_795_255_200_250));
        assert_eq!(parse_time("2026-11-21T11:00:00+01:00").unwrap(), TimeSpec::At(1_795_255_200_000));
        assert_eq!(parse_time("2026-11-21T08:30:00-01:30").unwrap(), TimeSpec::At(1_795_255_200_000));
        assert_eq!(parse_time("now").unwrap(), TimeSpec::Ago(Duration::ZERO));
        assert_eq!(parse_time("-2h").unwrap(), TimeSpec::Ago(Duration::from_secs(7200)));
        assert_eq!(parse_time("-15m").unwrap(), TimeSpec::Ago(Duration::from_secs(900)));
        assert_eq!(parse_time("-1h30m").unwrap(), TimeSpec::Ago(Duration::from_secs(5400)));
        assert_eq!(TimeSpec::Ago(Duration::from_secs(2)).at(10_000), 8_000);
        assert_eq!(TimeSpec::At(5).at(10_000), 5);
        for bad in ["yesterday", "2026-11-21", "2026-11-21T10:00:00", "-2 parsecs", "2h"] {
            let e = format!("{:#}", parse_time(bad).unwrap_err());
            assert!(e.contains("RFC 3339") || e.contains("-<duration>"), "{bad}: {e}");
        }
    }
    #[test]
    fn offset_ranges_are_checked_against_the_watermarks() {
        let r = |wm, from, to| offset_range("t", 2, wm, from, to);
        assert_eq!(r((5, 12), 5, None).unwrap(), PartitionRange { partition: 2, from: 5, to: 12 });
        assert_eq!(r((5, 12), 6, Some(9)).unwrap(), PartitionRange { partition: 2, from: 6, to: 9 });
        assert_eq!(r((5, 12), 7, Some(12)).unwrap().len(), 5);
        assert!(r((5, 12), 12, None).unwrap().is_empty(), "from the high watermark: nothing, not an error");
        assert!(r((5, 12), 8, Some(8)).unwrap().is_empty());
        let err = |wm, from, to| r(wm, from, to).unwrap_err().to_string();
        assert_eq!(err((0, 12), 9, Some(3)), "--to-offset 3 is before --from-offset 9");
        assert_eq!(
            err((5, 12), 4, None),
            "--from-offset 4 is out of retention in t[2]: below the low watermark 5 (offsets before it are deleted); the partition holds offsets 5..=11"
        );
        assert_eq!(
            err((5, 12), 13, None),
            "--from-offset 13 is beyond the end of t[2]: above the high watermark 12; the partition holds offsets 5..=11"
        );
        assert_eq!(
            err((5, 12), 6, Some(20)),
            "--to-offset 20 is beyond the end of t[2]: above the high watermark 12 (--to-offset is exclusive); the partition holds offsets 5..=11"
        );
        assert!(err((3, 3), 0, None).ends_with("the partition holds no record (low and high watermark 3)"));
    }

    #[test]
    fn time_ranges_need_to_after_from_and_map_to_offsets() {
        assert!(time_range(1_000, None).is_ok());
        assert!(time_range(1_000, Some(1_001)).is_ok());
        assert_eq!(
            time_range(2_000, Some(1_000)).unwrap_err().to_string(),
            "--to 1970-01-01T00:00:01.000Z is before --from 1970-01-01T00:00:02.000Z"
        );
        assert_eq!(
            time_range(1_000, Some(1_000)).unwrap_err().to_string(),
            "empty range: --from and --to are both 1970-01-01T00:00:01.000Z (--to is exclusive)"
        );
        // offsets_for_times found both ends.
        assert_eq!(time_offsets((0, 10), Some(3), Some(7), 1), PartitionRange { partition: 1, from: 3, to: 7 });
        // No record at or after --to: up to the high watermark.
        assert_eq!(time_offsets((0, 10), Some(3), None, 1), PartitionRange { partition: 1, from: 3, to: 10 });
        // No record at or after --from: empty at the high watermark.
        assert!(time_offsets((0, 10), None, None, 1).is_empty());
        assert_eq!(time_offsets((0, 10), None, None, 1).from, 10);
        let total =
            Resolved { topic: "t".into(), ranges: vec![time_offsets((0, 10), Some(3), Some(7), 0), time_offsets((4, 9), None, None, 1)] };
        assert_eq!(total.total(), 4);
    }

    #[test]
    fn the_pacer_spaces_sends_by_one_over_the_rate_without_bursts() {
        let t0 = Instant::now();
        let mut p = Pacer::new(4.0); // one send per 250 ms
        assert_eq!(p.delay(t0), Duration::ZERO, "the first send goes at once");
        assert_eq!(p.delay(t0), Duration::from_millis(250));
        assert_eq!(p.delay(t0 + Duration::from_millis(100)), Duration::from_millis(400));
        // After a stall of 10 s no credit is saved up: the next send goes at once, the one after waits again.
        let later = t0 + Duration::from_secs(10);
        assert_eq!(p.delay(later), Duration::ZERO);
        assert_eq!(p.delay(later), Duration::from_millis(250));
        // 1000 sends at 500/s starting together take 1998 ms of waiting in total for the last one.
        let mut p = Pacer::new(500.0);
        let last = (0..1000).map(|_| p.delay(t0)).last().unwrap();
        assert_eq!(last, Duration::from_millis(1998));
        assert!(parse_rate("0").is_err() && parse_rate("-1").is_err() && parse_rate("inf").is_err() && parse_rate("x").is_err());
        assert_eq!(parse_rate("2.5"), Ok(2.5));
    }

    #[test]
    fn replayed_records_keep_their_headers_and_get_the_replay_ones() {
        let headers = OwnedHeaders::new()
            .insert(Header { key: "traceparent", value: Some(&b"00-abc"[..]) })
            .insert(Header { key: H_REPLAY_SOURCE, value: Some(&b"old/0/0"[..]) })
            .insert(Header { key: "empty", value: None::<&[u8]> });
        let m = OwnedMessage::new(
            Some(b"v".to_vec()),
            Some(b"k".to_vec()),
            "src".into(),
            rdkafka::Timestamp::CreateTime(1_700_000_000_000),
            3,
            42,
            Some(headers),
        );
        let out = replay_headers(&m, 1_800_000_000_000);
        let got: Vec<(String, Option<String>)> =
            out.iter().map(|h| (h.key.to_string(), h.value.map(|v| String::from_utf8_lossy(v).into_owned()))).collect();
        assert_eq!(
            got,
            vec![
                ("traceparent".into(), Some("00-abc".into())),
                ("empty".into(), None),
                (H_REPLAY_SOURCE.into(), Some("src/3/42".into())),
                (H_REPLAY_TIME.into(), Some("1800000000000".into())),
            ]
        );
        assert_eq!(target_partition(true, 3), Some(3));
        assert_eq!(target_partition(false, 3), None);
    }

    #[derive(clap::Parser, Debug)]
    struct TestCli {
        #[command(flatten)]
        args: ReplayArgs,
    }

    #[test]
    fn the_command_line_needs_one_range_and_one_mode() {
        use clap::Parser;
        let parse = |a: &[&str]| TestCli::try_parse_from([&["t", "stock.commands"], a].concat()).map(|c| c.args);
        let a = parse(&["--from-offset", "0", "--into", "x", "--rate", "100", "--partition", "1", "--partition", "3"]).unwrap();
        assert_eq!(
            (a.from_offset, a.to_offset, a.into.as_deref(), a.rate, a.partitions),
            (Some(0), None, Some("x"), Some(100.0), vec![1, 3])
        );
        let a = parse(&["--from", "-2h", "--to", "now", "--through", "stock-reserver", "--dry-run"]).unwrap();
        assert_eq!((a.from, a.to), (Some(TimeSpec::Ago(Duration::from_secs(7200))), Some(TimeSpec::Ago(Duration::ZERO))));
        assert!(parse(&["--from", "-2h", "--through", "w", "--diff", "--reservation-ttl", "5m"]).unwrap().diff);
        assert!(parse(&["--into", "x"]).is_err(), "no range");
        assert!(parse(&["--from-offset", "0"]).is_err(), "no mode");
        assert!(parse(&["--from-offset", "0", "--from", "now", "--into", "x"]).is_err(), "two ranges");
        assert!(parse(&["--from-offset", "0", "--into", "x", "--through", "w", "--dry-run"]).is_err(), "two modes");
        assert!(parse(&["--from-offset", "0", "--through", "w"]).is_err(), "--through needs --dry-run or --diff");
        assert!(parse(&["--from-offset", "0", "--through", "w", "--dry-run", "--diff"]).is_err());
        assert!(parse(&["--from-offset", "0", "--into", "x", "--dry-run"]).is_err(), "--dry-run is a --through flag");
        assert!(parse(&["--to-offset", "5", "--into", "x"]).is_err(), "--to-offset needs --from-offset");
        assert!(parse(&["--from-offset", "0", "--into", "x", "--reservation-ttl", "5m"]).is_err(), "--reservation-ttl is a --through flag");
        assert!(parse(&["--from", "yesterday", "--into", "x"]).is_err());
        assert!(parse(&["--from-offset", "0", "--through", "w", "--dry-run", "--rate", "5"]).is_err(), "--rate is an --into flag");
    }
}
