//! `orderflow doctor`: checks a live broker against the topology for the producer mistakes that
//! split a join (issue 19), the same checks the workers count as they read:
//!
//! - every declared topic exists with the partition count the topology declares (a worker's
//!   inputs must be co-partitioned on the broker, not only on paper);
//! - the last `--sample` records of each partition of every external topic are keyed by the
//!   event's own key (`orderId`, `hqId:storeId`) and sit on the partition orderflow's partitioner
//!   gives that key ([`orderflow_runtime::routing`]); the misrouted ones are counted by reason
//!   with the producer's likely partitioner.
//!
//! Output: one line per topic, then the problems; `--json` prints one object instead. Exit
//! status 1 when anything is wrong. Records that do not decode are left to the dead-letter
//! path (`orderflow dlq`) and only counted here.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Result};
use orderflow_runtime::codec::Codec;
use orderflow_runtime::routing::Routes;
use rdkafka::message::Message;
use serde::Serialize;

use crate::kafkaio::{blocking, Reader, Span};
use crate::topology::load_topology;

/// `orderflow doctor` flags.
#[derive(clap::Args, Debug)]
pub struct DoctorArgs {
    #[arg(long, default_value = "topology.toml", env = "ORDERFLOW_TOPOLOGY")]
    topology: PathBuf,
    /// Bootstrap servers (overrides the topology and ORDERFLOW_BOOTSTRAP).
    #[arg(long)]
    bootstrap: Option<String>,
    /// Records read from the end of each partition of each external topic.
    #[arg(long, default_value_t = 1000)]
    sample: i64,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// What the doctor found on one topic.
#[derive(Debug, Default, Serialize)]
struct TopicReport {
    topic: String,
    declared_partitions: i32,
    /// `None` when the topic does not exist on the broker.
    broker_partitions: Option<i32>,
    external: bool,
    sampled: u64,
    undecodable: u64,
    /// reason (`no_key`, `key_mismatch`, `partition`) → records.
    misrouted: BTreeMap<String, u64>,
    /// likely partitioner → records, for `partition` misroutes.
    likely_partitioners: BTreeMap<String, u64>,
}

impl TopicReport {
    fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        match self.broker_partitions {
            None => out.push(format!("topic {} does not exist on the broker (orderflow topics creates it)", self.topic)),
            Some(n) if n != self.declared_partitions => out.push(format!(
                "topic {} has {n} partitions on the broker, the topology declares {}{}",
                self.topic,
                self.declared_partitions,
                if self.external {
                    " (its producers partition by the broker's count; the deduplicator re-keys it)"
                } else {
                    " (orderflow's producers partition it by the broker's count: a join of it with a topic of another count splits keys)"
                }
            )),
            Some(_) => {}
        }
        for (reason, n) in &self.misrouted {
            out.push(format!("topic {}: {n} of {} sampled records misrouted ({reason})", self.topic, self.sampled));
        }
        for (partitioner, n) in &self.likely_partitioners {
            out.push(format!("topic {}: {n} record(s) look partitioned by {partitioner}", self.topic));
        }
        out
    }
}

/// Runs `orderflow doctor`.
///
/// Errors: topology, broker (metadata, reads); after printing the report, any problem found
/// ("N problem(s)").
pub async fn run(args: DoctorArgs) -> Result<()> {
    let loaded = load_topology(&args.topology, args.bootstrap.as_deref())?;
    let t = loaded.topology.clone();
    let codec = Codec::load(&loaded.avro_dir(), t.broker.registry_url.as_deref())?;
    let external: Vec<String> = t.topics.iter().filter(|(_, s)| s.external.is_some()).map(|(n, _)| n.clone()).collect();
    let mut routes = Routes::of(&loaded, &external);
    let (broker, sample) = (t.broker.clone(), args.sample.max(0));
    let (counts, records) = blocking(move || {
        let reader = Reader::new(&broker, "orderflow-doctor", "creating the doctor's reader")?;
        let counts = reader.broker_topics()?;
        let mut spans = Vec::new();
        for topic in external.iter().filter(|t| counts.contains_key(*t)) {
            for p in 0..counts[topic] {
                let (low, high) = reader.watermarks(topic, p)?;
                spans.push(Span { topic: topic.clone(), partition: p, start: (high - sample).max(low), end: Some(high) });
            }
        }
        let records = reader
            .collect(&spans, |m| (m.topic().to_string(), m.partition(), m.key().map(<[u8]>::to_vec), m.payload().map(<[u8]>::to_vec)))?;
        Ok((counts, records))
    })
    .await?;
    let mut reports: BTreeMap<String, TopicReport> = t
        .topics
        .iter()
        .map(|(name, s)| {
            let r = TopicReport {
                topic: name.clone(),
                declared_partitions: s.partitions,
                broker_partitions: counts.get(name).copied(),
                external: s.external.is_some(),
                ..TopicReport::default()
            };
            (name.clone(), r)
        })
        .collect();
    for (topic, n) in &counts {
        routes.set_partitions(topic, *n);
    }
    for (topic, partition, key, value) in &records {
        let r = reports.get_mut(topic).expect("sampled topics are declared");
        r.sampled += 1;
        let Some(event) = (match value {
            Some(v) => codec.decode(v).await.ok(),
            None => None,
        }) else {
            r.undecodable += 1;
            continue;
        };
        if let Some(f) = routes.check(topic, *partition, key.as_deref(), &event) {
            *r.misrouted.entry(f.reason.as_str().to_string()).or_default() += 1;
            if f.reason == orderflow_runtime::routing::Misroute::Partition {
                *r.likely_partitioners.entry(f.likely_partitioner.to_string()).or_default() += 1;
            }
        }
    }
    let problems: Vec<String> = reports.values().flat_map(TopicReport::problems).collect();
    if args.json {
        let reports: Vec<&TopicReport> = reports.values().collect();
        println!("{}", serde_json::json!({"topics": reports, "problems": problems}));
    } else {
        println!("{:<34} {:>8} {:>8} {:>9} {:>8} {:>11}", "topic", "declared", "broker", "sampled", "bad", "misrouted");
        for r in reports.values() {
            let broker = r.broker_partitions.map_or("missing".to_string(), |n| n.to_string());
            let misrouted: u64 = r.misrouted.values().sum();
            let sampled = if r.external { r.sampled.to_string() } else { "-".to_string() };
            println!("{:<34} {:>8} {:>8} {:>9} {:>8} {:>11}", r.topic, r.declared_partitions, broker, sampled, r.undecodable, misrouted);
        }
        for p in &problems {
            println!("problem: {p}");
        }
    }
    if !problems.is_empty() {
        bail!("{} problem(s)", problems.len());
    }
    Ok(())
}
