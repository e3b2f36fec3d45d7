//! `orderflow replay TOPIC ... --through WORKER (--dry-run | --diff)`: runs one worker's logic over
//! a replayed range of one of its input topics against a *shadow* copy of its state, never the
//! live store, and prints what it would emit (`--dry-run`) or how that compares with what was
//! actually emitted downstream (`--diff`).
//!
//! # Shadow state
//!
//! For every replayed partition the worker's state is rebuilt in memory (a fresh
//! [`MemoryStore`](orderflow_api::MemoryStore), nothing is written anywhere) from changelog partition N of
//! `orderflow-<worker>-changelog` (see `orderflow_runtime::changelog`): records are gathered and a
//! unit is applied at its commit marker, as long as the marker's next input offset of the
//! replayed topic is ≤ the range start. The shadow is then the state the live worker had after its
//! last unit that ended at or before the range start. When that unit ended before the range start
//! (units are batches, so a marker exactly at the start rarely exists), the records between its
//! end and the range start are *warmed up*: processed silently through the shadow (outputs, dead
//! letters and timers of that stretch are not reported). See [`ShadowBuilder`] for the limits
//! (compaction, retention, several inputs), which are reported in the summary as `approximate`.
//!
//! # Replay
//!
//! The range's records are processed in offset order per partition, partitions merged by record
//! timestamp, through the live worker's own code: admission by `orderflow_runtime::step::admit`
//! and each record as a unit of work of `orderflow_runtime::step::step` (eventId dedupe, timers
//! one at a time), so replay and live processing cannot drift apart. The clock (`now_ms`) is the
//! record's timestamp (never earlier than the previous one), so the replay is deterministic and
//! timers fire as the replayed time passes (before and after each record, every partition). Timers due after the last replayed record's timestamp do not fire. The
//! processor is built by `kinds::build` from the topology entry; `--reservation-ttl` overrides the
//! worker's TTL so a changed configuration can be compared. Records that fail to decode, break the
//! admission rules or are `Invalid` are reported as the dead letters the live worker would write;
//! a processor failure the live worker would stop on (`CorruptState`, `UnwiredPort`) is reported
//! under `failures` and the record skipped.
//!
//! # Diff
//!
//! Output `eventId`s are deterministic (`derive_event_id` of the input), so every event the
//! replay emits is looked up by `eventId` among the records of the worker's output topics (the
//! topology `outputs`): whole topics when they are small (≤ [`WHOLE_TOPIC_LIMIT`] records in
//! all), else the time window of the range widened by the worker's longest timer horizon
//! (reservation TTL, saga timeout) and [`WINDOW_MARGIN_MS`]. See [`diff`] for the classes.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{bail, Context as _, Result};
use orderflow_api::Event;
use orderflow_runtime::codec::Codec;
use orderflow_runtime::step::{self, Input, Rejection, RetryBudget, Rules};
use orderflow_runtime::topology::{BrokerConfig, Loaded};
use rdkafka::message::{Message, OwnedMessage};
use serde_json::{json, Value};

use crate::kafkaio::{blocking, Reader, Span};
use crate::replay::{ReplayArgs, Resolved};

mod diff;
mod engine;
mod shadow;

pub use diff::*;
pub use engine::*;
pub use shadow::*;

/// Output topics holding at most this many records in all are read whole for `--diff`; larger
/// ones are read within the time window of the range.
pub const WHOLE_TOPIC_LIMIT: i64 = 200_000;
/// Added on both sides of the `--diff` time window (ms): producer batching, commit intervals,
/// clock differences between the input's timestamps and the outputs'.
pub const WINDOW_MARGIN_MS: i64 = 60_000;

// ------------------------------------------------------------------------------------------
// Admission: the live worker's rules (`orderflow_runtime::step`), with the record time as clock.

/// The timestamp of `m` in ms (its Kafka timestamp), if it has one.
pub fn timestamp_of(m: &OwnedMessage) -> Option<i64> {
    m.timestamp().to_millis()
}

/// Decodes `m` and applies the live worker's admission rules (`orderflow_runtime::step::admit`:
/// `truncated`, `oversized`, the codec's classes, `wrong_schema`, `invalid`, `future_timestamp`)
/// with `now_ms` as the clock (the record's timestamp in a replay). A schema registry that does
/// not answer is not retried: it is reported as `registry_unavailable`. `worker` names the logs.
///
/// Errors: the [`Rejection`] naming the dead-letter class the live worker would write.
pub async fn admit(codec: &Codec, rules: &Rules, worker: &str, m: &OwnedMessage, now_ms: i64) -> std::result::Result<Event, Rejection> {
    let input = Input { topic: m.topic(), partition: m.partition(), offset: m.offset() };
    step::admit(codec, rules, input, m.payload(), now_ms, &mut RetryBudget::none(), worker).await
}

// ------------------------------------------------------------------------------------------
// The broker side.

/// A reader for `replay --through` (the shared [`Reader`] with its own `group.id` prefix).
///
/// Errors: the client cannot be created.
fn reader(broker: &BrokerConfig) -> Result<Reader> {
    Reader::new(broker, "orderflow-replay-through", "creating the replay reader")
}

/// The first offset of each partition `0..partitions` of `topic` whose timestamp is ≥ `ts_ms`
/// (the high watermark when none).
///
/// Errors: the `offsets_for_times` or a watermark request fails.
fn offsets_for_time(reader: &Reader, topic: &str, partitions: i32, ts_ms: i64) -> Result<BTreeMap<i32, i64>> {
    let partitions: Vec<i32> = (0..partitions).collect();
    let mut out = BTreeMap::new();
    for (p, o) in reader.offsets_for_time(topic, &partitions, ts_ms)? {
        let o = match o {
            Some(o) => o,
            None => reader.watermarks(topic, p)?.1,
        };
        out.insert(p, o);
    }
    Ok(out)
}

/// Every record of `topic` in each `(partition, start, end)` range (end exclusive), sorted by
/// partition and offset.
///
/// Errors: those of [`Reader::scan`] (no progress for its stall timeout).
fn read(reader: &Reader, topic: &str, ranges: &[(i32, i64, i64)]) -> Result<Vec<OwnedMessage>> {
    let spans: Vec<Span> =
        ranges.iter().map(|&(partition, start, end)| Span { topic: topic.to_string(), partition, start, end: Some(end) }).collect();
    let mut out = reader.collect(&spans, |m| m.detach())?;
    out.sort_by_key(|m| (m.partition(), m.offset()));
    Ok(out)
}

/// `orderflow replay ... --through WORKER`: rebuilds the shadow state, replays the range through
/// the worker's logic, prints one JSON line per emitted event (`--dry-run`) or per compared event
/// (`--diff`, see [`diff`]) on stdout, and returns the summary:
///
/// ```json
/// {"mode": "dry-run" | "diff", "worker", "topic", "ranges": [{"partition","from","to"}],
///  "reservation_ttl_ms", "approximate": bool, "limits": [text], "shadow": [ShadowReport],
///  "inputs", "processed", "duplicates", "dead_letters", "failures", "timers_fired",
///  "outputs", "outputs_per_topic": {topic: n}, "dead_lettered": [DeadLetter],
///  "failed": [DeadLetter], "time_window_ms": [first, last] | null,
///  "diff": {"same","changed","missing","extra", "read": {topic: records}, "window_ms": [from, to],
///           "whole_topics": bool, "not_same": [DiffEntry]}}   // --diff only
/// ```
///
/// Errors: no `--through` worker, a worker not in the topology or not reading the replayed
/// topic, neither `--dry-run` nor `--diff`, broker errors, an undecodable changelog record.
/// Differences are not errors.
pub async fn run(args: &ReplayArgs, loaded: &Loaded, resolved: &Resolved) -> Result<Value> {
    let t = &loaded.topology;
    let worker = args.through.clone().context("--through WORKER is required here")?;
    let Some(spec) = t.workers.get(&worker) else {
        bail!("worker {worker} is not in the topology (workers: {})", t.workers.keys().cloned().collect::<Vec<_>>().join(", "));
    };
    let topic = resolved.topic.clone();
    if !spec.inputs.contains(&topic) {
        bail!("worker {worker} does not read {topic} (its inputs: {})", spec.inputs.join(", "));
    }
    let mode = match (args.dry_run, args.diff) {
        (_, true) => "diff",
        (true, false) => "dry-run",
        (false, false) => bail!("--through needs --dry-run or --diff"),
    };
    let mut spec = spec.clone();
    let kind = crate::kinds::KINDS.iter().find(|k| k.name == spec.kind).with_context(|| format!("unknown kind {}", spec.kind))?;
    if let Some(ttl) = args.reservation_ttl {
        if !crate::kinds::set_reservation_ttl(&mut spec, ttl) {
            tracing::warn!(%worker, kind = %spec.kind, "--reservation-ttl ignored: this kind has no reservation TTL");
        }
    }
    let processor = crate::kinds::build(&spec).with_context(|| format!("worker {worker}: unknown kind {}", spec.kind))?;
    let ports: BTreeMap<String, String> =
        spec.outputs.iter().filter(|(p, _)| kind.ports.contains(&p.as_str())).map(|(p, t)| (p.clone(), t.clone())).collect();
    let codec = Codec::load(&loaded.avro_dir(), t.broker.registry_url.as_deref())?;
    let rules = Rules::of(loaded, &spec.inputs);
    let broker = t.broker.clone();

    // 1. The range's records.
    let inputs = {
        let (broker, resolved) = (broker.clone(), resolved.clone());
        blocking(move || {
            let mut v = Vec::new();
            crate::replay::read_range(&broker, &resolved, &mut |m| {
                v.push(m);
                Ok(())
            })?;
            Ok(v)
        })
        .await?
    };

    // 2. The shadow of every replayed partition.
    let changelog = orderflow_runtime::changelog::topic(&worker);
    let guarantee = spec.guarantee(&t.defaults);
    // Partitions with an empty range replay nothing: no shadow needed.
    let ranges: Vec<(i32, i64, i64)> = resolved.ranges.iter().filter(|r| r.from < r.to).map(|r| (r.partition, r.from, r.to)).collect();
    let (shards, mut reports) = {
        let (broker, changelog, inputs_of, topic, ranges) =
            (broker.clone(), changelog.clone(), spec.inputs.clone(), topic.clone(), ranges.clone());
        blocking(move || {
            let reader = reader(&broker)?;
            let mut shards = BTreeMap::new();
            let mut reports = Vec::new();
            for (p, from, _) in ranges {
                let marks = reader
                    .watermarks(&changelog, p)
                    .with_context(|| format!("the changelog {changelog} (created by `orderflow topics`)"))?;
                let mut b = ShadowBuilder::new(&inputs_of, &topic, p, from, marks, guarantee);
                for m in read(&reader, &changelog, &[(p, marks.0, marks.1)])? {
                    b.push(m.offset(), m.key().unwrap_or_default(), m.payload()).map_err(|e| anyhow::anyhow!("{changelog}[{p}]: {e}"))?;
                }
                let (store, report) = b.finish();
                shards.insert(p, store);
                reports.push(report);
            }
            Ok((shards, reports))
        })
        .await?
    };
    if spec.inputs.len() > 1 {
        for r in reports.iter_mut().filter(|r| r.position < r.range_from) {
            r.approximate = true;
            r.notes.push(format!(
                "the last unit before the range ended at offset {}; its records of other inputs than {topic} are not warmed up",
                r.position
            ));
        }
    }

    // 3. Warm-up records between each shadow's position and the range start.
    let warm: Vec<(i32, i64, i64)> =
        reports.iter().filter(|r| r.position < r.range_from).map(|r| (r.partition, r.position, r.range_from)).collect();
    let warm_records = if warm.is_empty() {
        Vec::new()
    } else {
        let (broker, topic) = (broker.clone(), topic.clone());
        blocking(move || {
            let reader = reader(&broker)?;
            let mut lows = Vec::new();
            for (p, from, to) in warm {
                let (low, _) = reader.watermarks(&topic, p)?;
                lows.push((p, from.max(low), to));
            }
            read(&reader, &topic, &lows)
        })
        .await?
    };
    let mut engine = Engine::new(&worker, processor, &topic, ports.clone(), shards).with_retention(spec.retention_ms(&t.defaults));
    for m in &warm_records {
        let ts = timestamp_of(m).unwrap_or(i64::MIN);
        let decoded = admit(&codec, &rules, &worker, m, ts).await;
        engine.step(m.partition(), m.offset(), ts, decoded, false).await;
    }
    for r in reports.iter_mut() {
        r.warmed_up = warm_records.iter().filter(|m| m.partition() == r.partition).count() as u64;
    }

    // 4. The range.
    let keys: Vec<(i32, i64, i64)> = inputs.iter().map(|m| (m.partition(), m.offset(), timestamp_of(m).unwrap_or(i64::MIN))).collect();
    let mut decoded_inputs = Vec::new();
    for i in replay_order(&keys) {
        let m = &inputs[i];
        let ts = keys[i].2;
        let decoded = admit(&codec, &rules, &worker, m, ts).await;
        if let Ok(e) = &decoded {
            decoded_inputs.push(e.clone());
        }
        engine.step(m.partition(), m.offset(), ts, decoded, true).await;
    }
    let times: Vec<i64> = keys.iter().map(|k| k.2).filter(|t| *t != i64::MIN).collect();
    let window = times.iter().min().zip(times.iter().max()).map(|(a, b)| (*a, *b));

    let approximate = reports.iter().any(|r| r.approximate);
    let mut limits = Vec::new();
    let others: Vec<&String> = spec.inputs.iter().filter(|i| **i != topic).collect();
    if !others.is_empty() {
        limits.push(format!(
            "only {topic} is replayed: records of the worker's other inputs ({}) are not, so outputs and timers that depend on them can differ from the live run",
            others.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
        ));
    }
    if engine.pending_timers() > 0 {
        limits.push(format!(
            "{} timer(s) due after the last replayed record's time ({}) did not fire",
            engine.pending_timers(),
            engine.clock_ms()
        ));
    }
    let mut summary = json!({
        "mode": mode,
        "worker": worker,
        "topic": topic,
        "ranges": resolved.ranges.iter().map(|r| json!({"partition": r.partition, "from": r.from, "to": r.to})).collect::<Vec<_>>(),
        "reservation_ttl_ms": crate::kinds::reservation_ttl(&spec).map(orderflow_api::millis),
        "approximate": approximate,
        "limits": limits,
        "shadow": reports,
        "time_window_ms": window.map(|(a, b)| json!([a, b])),
    });
    let stats = serde_json::to_value(&engine.stats)?;
    for (k, v) in stats.as_object().expect("stats is an object") {
        summary[k] = v.clone();
    }
    summary["dead_lettered"] = serde_json::to_value(&engine.dead_letters)?;
    summary["failed"] = serde_json::to_value(&engine.failures)?;

    if mode == "dry-run" {
        for e in &engine.emitted {
            println!("{}", serde_json::to_string(e)?);
        }
        return Ok(summary);
    }

    // 5. --diff: what was emitted live.
    let horizon = orderflow_api::millis(crate::kinds::timer_horizon(&spec));
    let (w_from, w_to) = match window {
        Some((a, b)) => (a.saturating_sub(WINDOW_MARGIN_MS), b.saturating_add(horizon).saturating_add(WINDOW_MARGIN_MS)),
        None => (i64::MIN, i64::MAX),
    };
    let out_topics: BTreeSet<String> = ports.values().cloned().collect();
    let (records, whole) = {
        let (broker, out_topics) = (broker.clone(), out_topics.clone());
        blocking(move || {
            let reader = reader(&broker)?;
            let mut marks = BTreeMap::new();
            let mut total = 0;
            for t in &out_topics {
                for p in 0..reader.partitions(t)? {
                    let m = reader.watermarks(t, p)?;
                    total += m.1 - m.0;
                    marks.insert((t.clone(), p), m);
                }
            }
            let whole = total <= WHOLE_TOPIC_LIMIT || w_from == i64::MIN;
            let mut records = Vec::new();
            for t in &out_topics {
                let parts: Vec<i32> = marks.keys().filter(|(x, _)| x == t).map(|(_, p)| *p).collect();
                let all: Vec<(i32, i64, i64)> = parts.iter().map(|p| (*p, marks[&(t.clone(), *p)].0, marks[&(t.clone(), *p)].1)).collect();
                let ranges = if whole {
                    all
                } else {
                    let by_time = offsets_for_time(&reader, t, parts.len() as i32, w_from)
                        .and_then(|s| Ok((s, offsets_for_time(&reader, t, parts.len() as i32, w_to.saturating_add(1))?)));
                    match by_time {
                        // Clamped to the watermarks; an end at or before the start (tansu answers a
                        // time past the end with 0) reads to the high watermark: a superset, the
                        // window filter applies afterwards.
                        Ok((starts, ends)) => all
                            .iter()
                            .map(|&(p, low, high)| {
                                let start = starts.get(&p).copied().unwrap_or(low).clamp(low, high);
                                let end = ends.get(&p).copied().filter(|e| *e > start).map_or(high, |e| e.min(high));
                                (p, start, end)
                            })
                            .collect(),
                        Err(e) => {
                            eprintln!("warning: {e:#}; reading the whole of {t} instead of the time window");
                            all
                        }
                    }
                };
                records.extend(read(&reader, t, &ranges)?);
            }
            Ok((records, whole))
        })
        .await?
    };
    let mut read: BTreeMap<String, u64> = out_topics.iter().map(|t| (t.clone(), 0)).collect();
    let mut actual = Vec::new();
    let mut undecodable = 0u64;
    for m in &records {
        *read.entry(m.topic().to_string()).or_default() += 1;
        let decoded = match m.payload() {
            Some(p) => codec.decode(p).await.ok(),
            None => None,
        };
        let Some(event) = decoded else {
            undecodable += 1;
            continue;
        };
        actual.push(Actual {
            topic: m.topic().to_string(),
            partition: m.partition(),
            offset: m.offset(),
            timestamp_ms: timestamp_of(m),
            key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
            event,
            payload: m.payload().unwrap_or_default().to_vec(),
        });
    }
    // Byte for byte: each replayed event encoded as the live worker encodes it.
    for e in engine.emitted.iter_mut() {
        e.payload = Some(codec.encode(&e.topic, &e.record).await.with_context(|| format!("encoding {} {}", e.event, e.event_id))?);
    }
    // An output topic that is also the replayed input (the stock reserver's HQ/store protocol
    // on `stock.commands`, issue 16) holds other writers' records too: of the records there that
    // are inputs of the range, only those the replay itself emitted are this worker's.
    let emitted_ids: std::collections::BTreeSet<&str> = engine.emitted.iter().map(|e| e.event_id.as_str()).collect();
    let input_ids: std::collections::BTreeSet<&str> = decoded_inputs.iter().map(|e| e.event_id()).collect();
    actual.retain(|a| a.topic != topic || !input_ids.contains(a.event.event_id()) || emitted_ids.contains(a.event.event_id()));
    let mut causes = Causes::of(&decoded_inputs);
    let in_window = |a: &Actual| a.timestamp_ms.is_none_or(|ts| ts >= w_from && ts <= w_to);
    // A replay of some partitions of a topic the worker also writes (its loop) does not follow
    // the records it wrote there for the other partitions: the causes of those records may have
    // live effects one hop later that the replay cannot emit ([`diff::Status::Beyond`]).
    let partial = t.topics.get(&topic).is_some_and(|s| (resolved.ranges.len() as i32) < s.partitions);
    let beyond: std::collections::HashSet<String> = if partial {
        engine
            .emitted
            .iter()
            .filter(|e| e.topic == topic)
            .filter_map(|e| match &e.cause {
                engine::Cause::Input { event_id, .. } => Some(event_id.clone()),
                _ => None,
            })
            .collect()
    } else {
        Default::default()
    };
    let (entries, counts) = diff(&engine.emitted, &actual, &mut causes, in_window, &beyond);
    for e in &entries {
        println!("{}", serde_json::to_string(e)?);
    }
    let not_same: Vec<&DiffEntry> = entries.iter().filter(|e| e.status != Status::Same).collect();
    summary["diff"] = json!({
        "same": counts.same,
        "changed": counts.changed,
        "missing": counts.missing,
        "extra": counts.extra,
        "beyond": counts.beyond,
        "read": read,
        "undecodable": undecodable,
        "whole_topics": whole,
        "window_ms": window.map(|_| json!([w_from, w_to])),
        "not_same": not_same,
    });
    Ok(summary)
}

#[cfg(test)]
mod tests;
