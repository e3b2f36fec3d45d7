//! `orderflow replay`: re-read a range of a topic and republish it (`--into`) or run it through a
//! worker (`--through`, see [`crate::replay_through`]).
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

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _, Result};
use clap::Args;
use orderflow_runtime::kafka::{client_config, Side};
use orderflow_runtime::topology::{BrokerConfig, Loaded};
use orderflow_runtime::worker::now_ms;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;
use serde_json::Value;

/// How long a metadata, watermark or `offsets_for_times` request may take.
const META_TIMEOUT: Duration = Duration::from_secs(10);
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
    #[arg(long, value_name = "N", requires = "into", value_parser = parse_rate)]
    pub rate: Option<f64>,
    /// Run the records through this worker of the topology (needs --dry-run or --diff).
    #[arg(long, value_name = "WORKER", requires = "through_mode")]
    pub through: Option<String>,
    /// With --through: report what the worker would emit; produce nothing.
    #[arg(long, requires = "through")]
    pub dry_run: bool,
    /// With --through: compare what the worker would emit with what it emitted.
    #[arg(long, requires = "through", conflicts_with = "dry_run")]
    pub diff: bool,
    /// With --through: reservation TTL of the worker (overrides the topology).
    #[arg(long, value_name = "D", requires = "through", value_parser = humantime::parse_duration)]
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
    parse_rfc3339_ms(t).map(TimeSpec::At).with_context(|| {
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

/// RFC 3339 to ms since the epoch: `Z` or a numeric `±HH:MM` offset.
fn parse_rfc3339_ms(t: &str) -> Result<i64> {
    // humantime takes UTC (`Z`) only; a numeric offset is applied here.
    let (utc, offset_s): (String, i64) = if t.ends_with('Z') || t.ends_with('z') {
        (t.to_string(), 0)
    } else if t.len() > 6 && matches!(&t.as_bytes()[t.len() - 6], b'+' | b'-') && t.as_bytes()[t.len() - 3] == b':' {
        let (base, off) = t.split_at(t.len() - 6);
        let sign = if off.starts_with('-') { -1 } else { 1 };
        let h: i64 = off[1..3].parse().context("offset hours")?;
        let m: i64 = off[4..6].parse().context("offset minutes")?;
        (format!("{base}Z"), sign * (h * 3600 + m * 60))
    } else {
        bail!("no time zone (Z or ±HH:MM)");
    };
    let st = humantime::parse_rfc3339(&utc)?;
    let ms = match st.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis())?,
        Err(e) => -i64::try_from(e.duration().as_millis())?,
    };
    Ok(ms - offset_s * 1000)
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
            bail!("--to {} is before --from {}", crate::dlq::rfc3339(t), crate::dlq::rfc3339(from_ms));
        }
        if t == from_ms {
            bail!("empty range: --from and --to are both {} (--to is exclusive)", crate::dlq::rfc3339(t));
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
            Some(t) => format!("offsets {f}..{t}"),
            None => format!("offsets from {f} to the high watermark"),
        },
        (None, Some(f)) => match args.to {
            Some(t) => format!("{} .. {}", crate::dlq::rfc3339(f.at(now)), crate::dlq::rfc3339(t.at(now))),
            None => format!("from {} to the high watermark", crate::dlq::rfc3339(f.at(now))),
        },
        (None, None) => "no range".into(),
    }
}

/// A consumer that reads by assigning partitions: no group membership, no commits.
fn reader(broker: &BrokerConfig) -> Result<BaseConsumer> {
    let mut config = client_config(broker, Side::Consumer);
    // Required by librdkafka, never joined: partitions are assigned and nothing is committed.
    config.set("group.id", format!("orderflow-replay-reader-{}-{}", std::process::id(), now_ms()));
    config.set("enable.auto.commit", "false");
    config.create().context("creating the replay reader")
}

/// Every topic on the broker with its partition count.
pub(crate) fn broker_topics(consumer: &BaseConsumer) -> Result<BTreeMap<String, i32>> {
    let md = consumer.fetch_metadata(None, META_TIMEOUT).context("asking the broker for its topics")?;
    Ok(md.topics().iter().filter(|t| t.error().is_none()).map(|t| (t.name().to_string(), t.partitions().len() as i32)).collect())
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
        let consumer = reader(&broker)?;
        let on_broker = broker_topics(&consumer)?;
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
            let wm = consumer.fetch_watermarks(topic, p, META_TIMEOUT).with_context(|| format!("watermarks of {topic}[{p}]"))?;
            watermarks.insert(p, wm);
        }
        let mut ranges = Vec::new();
        if let Some(from) = a.from_offset {
            for (&p, &wm) in &watermarks {
                ranges.push(offset_range(topic, p, wm, from, a.to_offset)?);
            }
        } else {
            let from_ms = from_ms.expect("clap requires --from-offset or --from");
            let find = |ms: i64| -> Result<BTreeMap<i32, Option<i64>>> {
                let mut tpl = TopicPartitionList::new();
                for &p in &partitions {
                    tpl.add_partition_offset(topic, p, Offset::Offset(ms))?;
                }
                let found = consumer.offsets_for_times(tpl, META_TIMEOUT).with_context(|| format!("offsets_for_times of {topic}"))?;
                let mut out = BTreeMap::new();
                for e in found.elements() {
                    if let Err(err) = e.error() {
                        bail!("offsets_for_times of {topic}[{}]: {err}", e.partition());
                    }
                    out.insert(e.partition(), match e.offset() { Offset::Offset(o) if o >= 0 => Some(o), _ => None });
                }
                Ok(out)
            };
            let starts = find(from_ms)?;
            let ends = match to_ms {
                Some(t) => find(t)?,
                None => BTreeMap::new(),
            };
            for (&p, &wm) in &watermarks {
                let r = time_offsets(wm, starts.get(&p).copied().flatten(), ends.get(&p).copied().flatten(), p);
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
            "empty range: no record of {} in {} (partitions {})",
            resolved.topic,
            describe(args, now),
            resolved.ranges.iter().map(|r| format!("{}: {}..{}", r.partition, r.from, r.to)).collect::<Vec<_>>().join(", ")
        );
    }
    Ok(resolved)
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
    let mut pending: BTreeMap<i32, (i64, i64)> =
        resolved.ranges.iter().filter(|r| r.from < r.to).map(|r| (r.partition, (r.from, r.to))).collect();
    let mut count = 0u64;
    if pending.is_empty() {
        return Ok(0);
    }
    let consumer = reader(broker)?;
    let mut tpl = TopicPartitionList::new();
    for (p, (from, _)) in &pending {
        tpl.add_partition_offset(topic, *p, Offset::Offset(*from))?;
    }
    consumer.assign(&tpl)?;
    let mut progress = Instant::now();
    let mut last_error = None;
    while !pending.is_empty() {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                let p = m.partition();
                let Some(&(from, to)) = pending.get(&p) else { continue };
                progress = Instant::now();
                if m.topic() == topic && (from..to).contains(&m.offset()) {
                    count += 1;
                    on_record(m.detach())?;
                }
                if m.offset() >= to - 1 {
                    pending.remove(&p);
                }
            }
            Some(Err(e)) => last_error = Some(e),
            None => {
                // Offsets without a record (transaction markers, aborted records) can end a
                // range: the consumer's position then passes its end without a message.
                if let Ok(pos) = consumer.position() {
                    for e in pos.elements() {
                        if let (Offset::Offset(o), Some(&(_, to))) = (e.offset(), pending.get(&e.partition())) {
                            if o >= to {
                                pending.remove(&e.partition());
                            }
                        }
                    }
                }
                if progress.elapsed() > STALL_TIMEOUT && !pending.is_empty() {
                    let waiting: Vec<String> = pending.iter().map(|(p, (_, to))| format!("{topic}[{p}] up to offset {}", to - 1)).collect();
                    bail!(
                        "reading made no progress for {}s; still waiting for {} (broker unreachable, or an open transaction holds read_committed readers back){}",
                        STALL_TIMEOUT.as_secs(),
                        waiting.join(", "),
                        last_error.map(|e| format!("; last error: {e}")).unwrap_or_default()
                    );
                }
            }
        }
    }
    let _ = consumer.unassign();
    Ok(count)
}

// ------------------------------------------------------------------------------------------
// The command.

/// Runs `orderflow replay`: loads the topology, [`resolve`]s the range, then republishes it
/// (`--into`, [`into`]) or runs it through a worker (`--through`, [`crate::replay_through::run`]).
/// Either mode's JSON summary is printed as the last line of stdout and, with `--json-summary`,
/// written pretty-printed to that file.
///
/// Errors: topology, [`resolve`], the mode's own errors; a failed delivery (after the summary).
pub async fn run(args: ReplayArgs) -> Result<()> {
    let loaded = crate::load_topology(&args.topology, args.bootstrap.as_deref())?;
    let resolved = resolve(&args, &loaded).await?;
    let (summary, failed) = if args.through.is_some() {
        (crate::replay_through::run(&args, &loaded, &resolved).await?, 0)
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

/// `replay --into`: not implemented yet.
async fn into(args: &ReplayArgs, _loaded: &Loaded, resolved: &Resolved) -> Result<IntoSummary> {
    let _ = (args, resolved, SystemTime::now());
    bail!("--into is not implemented yet")
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
}
