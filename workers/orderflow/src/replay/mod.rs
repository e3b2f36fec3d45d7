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

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use clap::Args;
use serde_json::Value;

mod range;
mod republish;

pub use range::*;
pub use republish::*;

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

#[cfg(test)]
mod tests;
