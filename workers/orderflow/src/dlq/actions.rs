//! `orderflow dlq list` and `orderflow dlq show`.

use std::collections::BTreeMap;

use anyhow::{bail, Context as _, Result};
use orderflow_runtime::codec::Codec;
use serde_json::json;

use crate::kafkaio::{blocking, rfc3339, Reader};
use crate::text::{cut, hex, hex_dump, print_table, text_or_hex};

use super::{
    find_topic, range, read, source_label, warn_unknown_class, DeadLetter, Filter, Found, ListArgs, Range, ShowArgs, HEX_DUMP_BYTES,
    H_TIME, MESSAGE_WIDTH,
};

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
pub(super) async fn list(a: ListArgs) -> Result<()> {
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
pub(super) async fn show(a: ShowArgs) -> Result<()> {
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
