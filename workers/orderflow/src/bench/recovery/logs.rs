//! The pure parts: the worker's JSON log lines split into start-up phases and restore figures,
//! memory from `/proc/<pid>/status`.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result};
use serde_json::Value;

use super::{Memory, Phases, RestoreLog};

// ------------------------------------------------------------------ pure parts

/// Seconds since the Unix epoch.
pub(super) fn wall(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// One JSON log line of a worker (`tracing_subscriber`'s JSON format).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct LogLine {
    /// Seconds since the Unix epoch.
    pub(super) ts: f64,
    pub(super) message: String,
    /// The event's fields (`fields` object, or the top level when flattened).
    pub(super) fields: serde_json::Map<String, Value>,
}

impl LogLine {
    pub(super) fn num(&self, k: &str) -> Option<f64> {
        self.fields.get(k).and_then(Value::as_f64)
    }
}

/// Parses one JSON log line; `None` for anything else.
pub(super) fn parse_log_line(line: &str) -> Option<LogLine> {
    let v: Value = serde_json::from_str(line.trim()).ok()?;
    let ts = humantime::parse_rfc3339_weak(v.get("timestamp")?.as_str()?).ok()?;
    let fields = match v.get("fields") {
        Some(Value::Object(f)) => f.clone(),
        _ => v.as_object()?.clone(),
    };
    let message = fields.get("message")?.as_str()?.to_string();
    Some(LogLine { ts: wall(ts), message, fields })
}

pub(super) fn read_log(path: &Path) -> Vec<LogLine> {
    std::fs::read_to_string(path).unwrap_or_default().lines().filter_map(parse_log_line).collect()
}

/// Splits spawn (`spawned`) → `/readyz` 200 (`ready`), both seconds since the epoch, at the log
/// lines of the first time the worker got ready.
pub(super) fn phases(lines: &[LogLine], spawned: f64, ready: f64) -> Phases {
    let first = |m: &str| lines.iter().find(|l| l.message == m).map(|l| l.ts);
    let started = first("worker started");
    let ready_line = first("worker ready");
    let before_ready = |l: &LogLine| ready_line.is_none_or(|r| l.ts <= r);
    let restores: Vec<&LogLine> = lines.iter().filter(|l| l.message == "state restored" && before_ready(l)).collect();
    let assigned_lines: Vec<&LogLine> = lines.iter().filter(|l| l.message == "partitions assigned").collect();
    let restore_began = restores.iter().map(|l| l.ts - l.num("seconds").unwrap_or(0.0)).reduce(f64::min);
    let assigned = assigned_lines.iter().filter(|l| before_ready(l)).map(|l| l.ts).reduce(f64::max).or(restore_began);
    let last_restored = restores.iter().map(|l| l.ts).reduce(f64::max);
    let d = |a: Option<f64>, b: Option<f64>| Some(b? - a?);
    Phases {
        process_start_s: d(Some(spawned), started),
        group_join_s: d(started, assigned),
        restore_s: d(assigned, last_restored),
        resume_s: d(last_restored, ready_line),
        readyz_poll_s: d(ready_line, Some(ready)),
        ready_to_processed_s: 0.0,
        assignments: (!assigned_lines.is_empty()).then_some(assigned_lines.len()),
    }
}

/// Sums the `state restored` lines.
pub(super) fn restore_log(lines: &[LogLine]) -> RestoreLog {
    let mut r = RestoreLog::default();
    for l in lines.iter().filter(|l| l.message == "state restored") {
        r.partitions += 1;
        let source = l.fields.get("source").and_then(Value::as_str).unwrap_or("?");
        *r.sources.entry(source.to_string()).or_default() += 1;
        r.records += l.num("records").unwrap_or(0.0) as u64;
        r.units += l.num("units").unwrap_or(0.0) as u64;
        r.seconds += l.num("seconds").unwrap_or(0.0);
    }
    r.records_per_s = (r.records > 0 && r.seconds > 0.0).then(|| r.records as f64 / r.seconds);
    r
}

/// `VmRSS` and `VmHWM` of a `/proc/<pid>/status` text.
pub(super) fn parse_status(text: &str) -> Option<Memory> {
    let kib = |name: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(name) && l[name.len()..].starts_with(':'))?;
        let mut parts = line[name.len() + 1..].split_whitespace();
        let n: u64 = parts.next()?.parse().ok()?;
        (parts.next()? == "kB").then_some(n)
    };
    let mib = |k: u64| (k as f64 / 1024.0 * 10.0).round() / 10.0;
    Some(Memory { rss_mib: mib(kib("VmRSS")?), peak_rss_mib: mib(kib("VmHWM")?) })
}

/// The memory of process `pid` now.
pub(crate) fn memory(pid: u32) -> Result<Memory> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_status(&text).with_context(|| format!("no VmRSS/VmHWM in {path}"))
}
