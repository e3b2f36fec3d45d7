//! The redrive plan (which records to re-produce where, no broker involved) and `orderflow dlq
//! redrive`.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{bail, Context as _, Result};
use orderflow_runtime::codec::Codec;
use orderflow_runtime::kafka::{client_config, Side};
use orderflow_runtime::worker::now_ms;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use serde::Serialize;
use serde_json::{json, Value};

use crate::kafkaio::limits::{topic_limits, SizeCheck};
use crate::kafkaio::{blocking, Reader};

use super::{
    find_topic, range, read, warn_unknown_class, Coordinates, DeadLetter, Filter, Found, RedriveArgs, FLUSH_TIMEOUT, H_REDRIVE_FROM,
    H_REDRIVE_TIME, H_SOURCE_TOPIC,
};

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
/// target topic missing on the broker; a record over its target's size limit
/// ([`SizeCheck`], also on a dry run). Exits non-zero after the summary when any delivery failed.
pub(super) async fn redrive(a: RedriveArgs) -> Result<()> {
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
    // Every record against its target's size limit before anything is sent (a dry run too).
    let targets: Vec<String> = targets.into_iter().map(str::to_string).collect();
    let mut sizes = SizeCheck::new(topic_limits(&loaded.topology.broker, &targets).await?);
    for s in &plan.sends {
        let headers = s.headers.iter().map(|(k, v)| (k.as_str(), v.as_deref()));
        sizes.record(|| s.from.to_string(), &s.target, s.key.as_deref(), s.value.as_deref(), headers);
    }
    sizes.finish()?;

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
    let records = plan
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
            record
        })
        .collect();
    let acks = orderflow_runtime::kafka::send_in_order(&producer, records).await;
    let _ = producer.flush(Timeout::After(FLUSH_TIMEOUT));
    for (s, ack) in plan.sends.iter().zip(acks) {
        match ack {
            Ok(_) => {
                summary.sent += 1;
                *summary.by_target.entry(s.target.clone()).or_default() += 1;
            }
            Err(e) => {
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
