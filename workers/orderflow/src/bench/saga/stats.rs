//! The pure parts of `bench saga`: percentiles, the offered-load schedule, writes per order, the
//! topology copy, worker stats from `/metrics`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use crate::bench::{metric_samples, Units};

use super::{Percentiles, WorkerStats, Writes, BACKLOG_FLOOR, BACKLOG_SECONDS};

// ------------------------------------------------------------------ pure parts

/// Nearest-rank percentile of ascending `sorted` values, `q` in (0, 1]: the value at rank
/// ⌈q·n⌉. `None` when empty.
pub fn percentile(sorted: &[i64], q: f64) -> Option<i64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// p50/p95/p99/max of `values` (any order), milliseconds.
pub fn percentiles(mut values: Vec<i64>) -> Option<Percentiles> {
    values.sort_unstable();
    Some(Percentiles {
        p50: percentile(&values, 0.50)?,
        p95: percentile(&values, 0.95)?,
        p99: percentile(&values, 0.99)?,
        max: *values.last()?,
    })
}

/// Orders due by `elapsed` on a schedule of `rate` orders/s whose first order is due at 0:
/// ⌊elapsed·rate⌋ + 1.
pub fn due(rate: f64, elapsed: Duration) -> u64 {
    (elapsed.as_secs_f64() * rate).floor() as u64 + 1
}

/// When order number `n` (0-based) is due on that schedule: n ÷ rate.
pub fn due_at(rate: f64, n: u64) -> Duration {
    Duration::from_secs_f64(n as f64 / rate)
}

/// Backlog (orders) above which a load of `rate` orders/s gives up: [`BACKLOG_SECONDS`] of
/// orders, at least [`BACKLOG_FLOOR`].
pub fn backlog_limit(rate: f64) -> u64 {
    ((rate * BACKLOG_SECONDS) as u64).max(BACKLOG_FLOOR)
}

/// Writes per order from the records added per topic (`records`), those of them the bench
/// wrote (`bench`: its orders and the POS's answers; `pos_topics` names the POS's topics),
/// the changelog topics, and the orders.
pub fn writes_per_order(
    records: &BTreeMap<String, i64>,
    bench: &BTreeMap<String, i64>,
    pos: &BTreeMap<String, i64>,
    changelogs: &BTreeSet<String>,
    orders: u64,
) -> Writes {
    let per = |n: i64| if orders > 0 { n as f64 / orders as f64 } else { 0.0 };
    let mut bench_by_topic = bench.clone();
    for (t, n) in pos {
        *bench_by_topic.entry(t.clone()).or_default() += n;
    }
    let mut per_order_by_topic = BTreeMap::new();
    let (mut saga, mut changelog) = (0i64, 0i64);
    for (topic, n) in records {
        let own = (n - bench_by_topic.get(topic).copied().unwrap_or(0)).max(0);
        if own == 0 {
            continue;
        }
        saga += own;
        if changelogs.contains(topic) {
            changelog += own;
        }
        per_order_by_topic.insert(topic.clone(), per(own));
    }
    Writes {
        records_by_topic: records.iter().filter(|(_, n)| **n > 0).map(|(t, n)| (t.clone(), *n)).collect(),
        bench_by_topic: bench_by_topic.into_iter().filter(|(_, n)| *n > 0).collect(),
        per_order_by_topic,
        per_order: per(saga),
        changelog_per_order: per(changelog),
        pos_per_order: per(pos.values().sum()),
    }
}

/// The topology text with `[defaults] commit_interval` set to `commit_interval` (the line
/// replaced, or added after the `[defaults]` header, or a `[defaults]` table appended) and the
/// top-level `avro_dir` set to `avro_dir` (the copy lives elsewhere than the schemas).
pub fn topology_copy(text: &str, commit_interval: Duration, avro_dir: &Path) -> String {
    let ci = format!("commit_interval = \"{}\"", humantime::format_duration(commit_interval));
    // A JSON string is a valid TOML basic string.
    let avro = format!("avro_dir = {}", serde_json::Value::String(avro_dir.display().to_string()));
    let key_of = |line: &str| line.trim_start().split(['=', ' ', '\t']).next().unwrap_or("").to_string();
    let mut out: Vec<String> = vec![avro];
    let (mut section, mut ci_done, mut saw_defaults) = (String::new(), false, false);
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('[') {
            if section == "[defaults]" && !ci_done {
                out.push(ci.clone());
                ci_done = true;
            }
            section = trimmed.split('#').next().unwrap_or("").trim().to_string();
            saw_defaults |= section == "[defaults]";
        } else if section.is_empty() && key_of(line) == "avro_dir" {
            continue;
        } else if section == "[defaults]" && key_of(line) == "commit_interval" {
            out.push(ci.clone());
            ci_done = true;
            continue;
        }
        out.push(line.to_string());
    }
    if !ci_done {
        if !saw_defaults {
            out.push("[defaults]".into());
        }
        out.push(ci);
    }
    out.join("\n") + "\n"
}

/// Per worker of `text` (one process's `/metrics`): consumed records and unit statistics.
pub(super) fn worker_stats(text: &str, process: &str, workers: &[String]) -> BTreeMap<String, WorkerStats> {
    let sum = |metric: &str, worker: &str, extra: Option<(&str, &str)>| -> f64 {
        metric_samples(text, metric)
            .iter()
            .filter(|(l, _)| l.get("worker").map(String::as_str) == Some(worker))
            .filter(|(l, _)| extra.is_none_or(|(k, v)| l.get(k).map(String::as_str) == Some(v)))
            .map(|(_, v)| v)
            .sum()
    };
    workers
        .iter()
        .map(|w| {
            let consumed = sum("orderflow_events_consumed_total", w, None) as u64;
            let count = sum("orderflow_commit_seconds_count", w, Some(("outcome", "ok"))) as u64;
            let mean = |s: f64| if count > 0 { s * 1000.0 / count as f64 } else { 0.0 };
            let units = Units {
                count,
                mean_records: consumed as f64 / count.max(1) as f64,
                // Idle units are observed too but take ~0: divide by the committed ones (as bench worker).
                mean_processing_ms: mean(sum("orderflow_unit_processing_seconds_sum", w, None)),
                mean_commit_ms: mean(sum("orderflow_commit_seconds_sum", w, Some(("outcome", "ok")))),
                commit_stages_ms: orderflow_runtime::metrics::COMMIT_STAGES
                    .iter()
                    .map(|stage| (stage.to_string(), mean(sum("orderflow_commit_stage_seconds_sum", w, Some(("stage", stage))))))
                    .collect(),
            };
            let delays = sum("orderflow_processing_delay_seconds_count", w, None);
            let mean_processing_delay_ms =
                if delays > 0.0 { sum("orderflow_processing_delay_seconds_sum", w, None) * 1000.0 / delays } else { 0.0 };
            (w.clone(), WorkerStats { process: process.to_string(), consumed, units, mean_processing_delay_ms })
        })
        .collect()
}
