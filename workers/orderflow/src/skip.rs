//! `orderflow skip` (issue 20): moves one worker's position on one input partition past a record
//! it cannot get past (a processor stuck on it, a record the broker cannot serve), on purpose and
//! on the record.
//!
//! A worker resumes from the input offsets stored with its state (the commit markers of its
//! changelog, module `orderflow_runtime::changelog`), not from its consumer group's offsets, so
//! the skip moves both, in this order, refusing at the first problem:
//! 1. **Stopped**: the worker's consumer group must have no members (every instance stopped;
//!    a statically-named member counts until its session times out, so the command waits up to
//!    `--wait` for the group to empty). A non-member offset commit of the worker's current
//!    position is the second check: the group coordinator refuses it while members exist.
//! 2. **Where it is**: the partition's state is restored from the changelog into a scratch store
//!    (the worker's own restore), giving its position and any unfinished unit's records.
//! 3. **Audit first**: every skipped record (`position ..= --past`) is written to the input's
//!    dead-letter topic with class `skipped`, the operator, the reason and the whole range
//!    (headers `orderflow.dlq.operator`, `orderflow.dlq.skipped-range`); a record that cannot be
//!    read, or that does not fit the dead-letter topic's size limit, is written without its value
//!    (`orderflow.dlq.value-dropped` gives its length). `orderflow dlq list --class skipped` shows them and
//!    `orderflow dlq redrive` re-sends them once the cause is fixed.
//! 4. **Move**: a commit marker with the new position (plus the compensation of an unfinished
//!    unit's records, as the worker's next unit would write) on the changelog partition, then the
//!    group's offset. The worker's next restore applies the marker and resumes at `--past + 1`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use clap::Args;
use orderflow_api::Changes;
use orderflow_runtime::changelog;
use orderflow_runtime::commit::OutRecord;
use orderflow_runtime::deadletter::{self, DeadLetterClass};
use orderflow_runtime::kafka::{client_config, dlq_header, Side};
use orderflow_runtime::store::Store;
use orderflow_runtime::topology::Topology;
use orderflow_runtime::worker::now_ms;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::FutureProducer;
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};

use crate::kafkaio::{blocking, Reader, Span, META_TIMEOUT};

/// Most records one skip moves past unless `--max-records` says more: a skip is for a record
/// or a few, not for draining a partition.
pub const DEFAULT_MAX_RECORDS: i64 = 100;

/// `orderflow skip` flags.
#[derive(Args, Debug)]
pub struct SkipArgs {
    /// Topology file: names the worker's group, inputs, changelog and dead-letter topics.
    #[arg(long, default_value = "topology.toml", env = "ORDERFLOW_TOPOLOGY")]
    topology: PathBuf,
    /// Bootstrap servers (overrides the topology and ORDERFLOW_BOOTSTRAP).
    #[arg(long)]
    bootstrap: Option<String>,
    /// The worker (its consumer group) to move.
    #[arg(long)]
    worker: String,
    /// The input topic; may be left out when the worker has one input.
    #[arg(long)]
    topic: Option<String>,
    /// The input partition.
    #[arg(long)]
    partition: i32,
    /// The last offset to skip: the worker resumes at `past + 1`. Every record from its current
    /// position to `past` is skipped (and dead-lettered as `skipped`).
    #[arg(long)]
    past: i64,
    /// Why (required, written to every audit record).
    #[arg(long)]
    reason: String,
    /// Who (written to every audit record); default `$USER@<hostname>`.
    #[arg(long, env = "ORDERFLOW_OPERATOR")]
    operator: Option<String>,
    /// How long to wait for the worker's group to have no members (a stopped instance with a
    /// static `group.instance.id` stays a member until its session times out).
    #[arg(long, default_value = "90s", value_parser = humantime::parse_duration)]
    wait: Duration,
    /// Refuse to skip more records than this.
    #[arg(long, default_value_t = DEFAULT_MAX_RECORDS)]
    max_records: i64,
    /// Print what would be skipped and change nothing.
    #[arg(long)]
    dry_run: bool,
}

/// What a skip does, printed as JSON.
#[derive(Debug, serde::Serialize)]
struct Plan {
    worker: String,
    group: String,
    topic: String,
    partition: i32,
    /// The worker's position before the skip (the first offset skipped).
    from: i64,
    /// The last offset skipped (`--past`).
    to: i64,
    /// Where the worker resumes.
    resumes_at: i64,
    operator: String,
    reason: String,
    /// Skipped records read (the rest of the range had no record or could not be read).
    records_read: usize,
    /// Why some of the range could not be read, if so.
    read_error: Option<String>,
    /// Changelog records of an unfinished unit compensated with the skip.
    compensated: usize,
    /// `<dead-letter topic>/<partition>/<offset>` of each audit record written.
    audit: Vec<String>,
    dry_run: bool,
}

/// `orderflow skip`: see the module docs.
///
/// Errors: a bad argument (unknown worker or topic, partition out of range, blank reason, `--past`
/// before the position or past the end, more than `--max-records`); the group still has members
/// after `--wait`; a broker or restore failure. Nothing is moved when the audit records were not
/// all acknowledged.
pub async fn run(args: SkipArgs) -> Result<()> {
    let loaded = crate::topology::load_topology(&args.topology, args.bootstrap.as_deref())?;
    let t = loaded.topology;
    let spec = t.workers.get(&args.worker).with_context(|| format!("worker {} is not in the topology", args.worker))?;
    let topic = match (&args.topic, spec.inputs.as_slice()) {
        (Some(topic), inputs) if inputs.contains(topic) => topic.clone(),
        (Some(topic), inputs) => bail!("{topic} is not an input of worker {} (inputs: {})", args.worker, inputs.join(", ")),
        (None, [only]) => only.clone(),
        (None, inputs) => bail!("worker {} has several inputs; name one with --topic ({})", args.worker, inputs.join(", ")),
    };
    if args.reason.trim().is_empty() {
        bail!("--reason must say why the records are skipped (it is written to every audit record)");
    }
    let partitions = t.topics.get(&topic).map(|s| s.partitions).unwrap_or(1);
    if args.partition < 0 || args.partition >= partitions {
        bail!("{topic} has partitions 0..{partitions}; --partition {} is not one", args.partition);
    }
    let operator = args.operator.clone().unwrap_or_else(default_operator);
    let group = spec.group_id(&args.worker);

    wait_for_no_members(&t, &group, args.wait).await?;

    // Where the worker is: its state restored from the changelog, as its next restore would.
    let scratch = tempfile::tempdir().context("creating a scratch state store")?;
    let (restored, shard) = {
        let (t2, worker, scratch_path, p) = (t.clone(), args.worker.clone(), scratch.path().to_path_buf(), args.partition);
        blocking(move || {
            let store = Store::open(&scratch_path.join("state"))?;
            let shard = store.shard(p)?;
            let spec = &t2.workers[&worker];
            let report = changelog::restore(&t2.broker, &changelog::topic(&worker), &spec.inputs, &shard, Duration::from_secs(300))
                .with_context(|| format!("restoring {}[{p}]", changelog::topic(&worker)))?;
            Ok((report, shard))
        })
        .await?
    };
    let (low, high) = {
        let (broker, topic, p) = (t.broker.clone(), topic.clone(), args.partition);
        blocking(move || Reader::new(&broker, "orderflow-skip", "creating the reader")?.watermarks(&topic, p)).await?
    };
    let from = match restored.offsets.get(&topic) {
        Some(next) => *next,
        None => committed_offset(&t, &group, &topic, args.partition).await?.unwrap_or(low),
    };
    if args.past < from {
        bail!(
            "worker {} is already at offset {from} of {topic}[{}]: nothing before it to skip (--past {})",
            args.worker,
            args.partition,
            args.past
        );
    }
    if args.past >= high {
        bail!("{topic}[{}] ends at offset {} (high watermark {high}): --past {} names no record yet", args.partition, high - 1, args.past);
    }
    let count = args.past - from + 1;
    if count > args.max_records {
        bail!(
            "skipping {from}..={} of {topic}[{}] is {count} records, more than --max-records {}",
            args.past,
            args.partition,
            args.max_records
        );
    }

    // The skipped records, as far as they can be read.
    let (records, read_error) = {
        let (broker, topic, p, past) = (t.broker.clone(), topic.clone(), args.partition, args.past);
        blocking(move || {
            let reader = Reader::new(&broker, "orderflow-skip", "creating the reader")?.stall_timeout(Duration::from_secs(15));
            let mut got = Vec::new();
            let span = Span { topic: topic.clone(), partition: p, start: from, end: Some(past + 1) };
            let error = reader
                .scan(
                    &[span],
                    || true,
                    |m| {
                        let headers: Vec<(String, Option<Vec<u8>>)> = m
                            .headers()
                            .map(|h| h.iter().map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec))).collect())
                            .unwrap_or_default();
                        got.push((m.offset(), m.key().map(<[u8]>::to_vec), m.payload().map(<[u8]>::to_vec), headers));
                        true
                    },
                )
                .err()
                .map(|e| format!("{e:#}"));
            Ok((got, error))
        })
        .await?
    };

    let mut plan = Plan {
        worker: args.worker.clone(),
        group: group.clone(),
        topic: topic.clone(),
        partition: args.partition,
        from,
        to: args.past,
        resumes_at: args.past + 1,
        operator: operator.clone(),
        reason: args.reason.clone(),
        records_read: records.len(),
        read_error,
        compensated: restored.orphans.writes.len() + restored.orphans.timers.len(),
        audit: Vec::new(),
        dry_run: args.dry_run,
    };
    if args.dry_run {
        println!("{}", serde_json::to_string_pretty(&plan)?);
        return Ok(());
    }

    // The same check once more, right before anything is written: a non-member commit of the
    // position the worker would resume from anyway, refused by the coordinator while the group
    // has members (this also covers groups of the `consumer` protocol, which the describe above
    // cannot see into).
    commit_position(&t, &group, &topic, args.partition, from)
        .await
        .with_context(|| format!("the group {group} refused an offset commit: are all instances of {} stopped?", args.worker))?;

    // 3. Audit first.
    let now = now_ms();
    let range = format!("{topic}/{}/{from}..={}", args.partition, args.past);
    let message = format!("skipped by {operator}: {} (orderflow skip of {range})", args.reason.trim());
    let dlq_topic = t.dead_letter_of(&topic);
    // A record the input topic took may not fit its dead-letter topic (a raised input limit):
    // its audit record then goes without the value (`orderflow.dlq.value-dropped`).
    let limits = crate::kafkaio::limits::topic_limits(&t.broker, std::slice::from_ref(&dlq_topic)).await?;
    let audit_headers = |mut h: Vec<(String, Option<Vec<u8>>)>| {
        h.push((dlq_header::OPERATOR.to_string(), Some(operator.clone().into_bytes())));
        h.push((dlq_header::SKIPPED_RANGE.to_string(), Some(range.clone().into_bytes())));
        h
    };
    let verdict =
        deadletter::Verdict { class: DeadLetterClass::Skipped, message: &message, attempts: 0, worker: &args.worker, now_ms: now };
    let mut audit: Vec<OutRecord> = records
        .iter()
        .map(|(offset, key, value, headers)| {
            let source = deadletter::Source {
                topic: &topic,
                partition: args.partition,
                offset: *offset,
                key: key.as_deref(),
                value: value.as_deref(),
            };
            deadletter::record_within(dlq_topic.clone(), source, audit_headers(headers.clone()), verdict, &limits)
        })
        .collect();
    if audit.is_empty() {
        // Nothing could be read: one record for the range, without a value.
        let source = deadletter::Source { topic: &topic, partition: args.partition, offset: from, key: None, value: None };
        audit.push(deadletter::record_within(dlq_topic.clone(), source, audit_headers(Vec::new()), verdict, &limits));
    }
    let producer: FutureProducer = client_config(&t.broker, Side::Producer).create().context("creating the producer")?;
    for r in &audit {
        let (p, o) = produce(&producer, r).await.with_context(|| format!("writing the audit record to {dlq_topic}; nothing was moved"))?;
        plan.audit.push(format!("{dlq_topic}/{p}/{o}"));
    }

    // 4. Move: the compensation of an unfinished unit and the new position, as one unit's
    // records on the changelog partition, then the group's offset.
    let mut changes = Changes::default();
    restored.orphans.compensate(&shard, &mut changes);
    let mut offsets = restored.offsets.clone();
    offsets.insert(topic.clone(), args.past + 1);
    let changelog_topic = changelog::topic(&args.worker);
    for r in changelog::records(&spec.inputs, &changes, &offsets) {
        let out = OutRecord {
            topic: changelog_topic.clone(),
            partition: Some(args.partition),
            key: Some(r.key),
            value: r.value,
            headers: Vec::new(),
        };
        produce(&producer, &out).await.with_context(|| {
            format!("writing the new position to {changelog_topic}[{}]; the audit records are written, run the skip again", args.partition)
        })?;
    }
    commit_position(&t, &group, &topic, args.partition, args.past + 1).await.with_context(|| {
        format!("the changelog holds the new position (the worker resumes at {}), but the group's offset was not moved", args.past + 1)
    })?;
    tracing::warn!(worker = %args.worker, %topic, partition = args.partition, from, to = args.past, %operator, reason = %args.reason, audit = ?plan.audit, "skipped");
    println!("{}", serde_json::to_string_pretty(&plan)?);
    Ok(())
}

/// `$USER@<hostname>` (either part `unknown` when not set).
fn default_operator() -> String {
    let user = std::env::var("USER").or_else(|_| std::env::var("LOGNAME")).unwrap_or_else(|_| "unknown".into());
    let host = std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "unknown".into());
    format!("{user}@{host}")
}

/// Produces `r` and waits for the broker's acknowledgement; returns its partition and offset.
async fn produce(producer: &FutureProducer, r: &OutRecord) -> Result<(i32, i64)> {
    let record = orderflow_runtime::kafka::future_record(r);
    let delivery = producer.send(record, Timeout::After(Duration::from_secs(30))).await.map_err(|(e, _)| e)?;
    Ok((delivery.partition, delivery.offset))
}

/// A consumer in `group` that never joins it (assigns by hand, commits as a non-member).
fn group_client(t: &Topology, group: &str) -> Result<BaseConsumer> {
    Ok(client_config(&t.broker, Side::Consumer).set("group.id", group).set("enable.auto.commit", "false").create()?)
}

/// Waits up to `wait` for `group` to have no members (classic protocol groups; a group the
/// describe cannot see, of the `consumer` protocol, is left to the commit check).
///
/// Errors: the group still has members after `wait`, naming them.
async fn wait_for_no_members(t: &Topology, group: &str, wait: Duration) -> Result<()> {
    let (t, group) = (t.clone(), group.to_string());
    blocking(move || {
        let client = group_client(&t, &group)?;
        let started = Instant::now();
        let mut announced = false;
        loop {
            let members: Vec<String> = match client.fetch_group_list(Some(&group), META_TIMEOUT) {
                Ok(list) => list
                    .groups()
                    .iter()
                    .filter(|g| g.name() == group && !matches!(g.state(), "Empty" | "Dead" | ""))
                    .flat_map(|g| g.members().iter().map(|m| format!("{} ({})", m.client_id(), m.client_host())))
                    .collect(),
                Err(e) => {
                    tracing::info!(%group, error = %e, "cannot describe the group; the offset commit checks it instead");
                    Vec::new()
                }
            };
            if members.is_empty() {
                return Ok(());
            }
            if started.elapsed() >= wait {
                bail!(
                    "group {group} still has {} member(s) after {}s: {}; stop every instance of the worker first (scale it to 0), \
                     a stopped instance with a static group.instance.id stays a member until its session times out",
                    members.len(),
                    wait.as_secs(),
                    members.join(", ")
                );
            }
            if !announced {
                eprintln!("waiting up to {}s for group {group} to have no members: {}", wait.as_secs(), members.join(", "));
                announced = true;
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    })
    .await
}

/// The offset `group` committed for `topic[partition]`, if any.
async fn committed_offset(t: &Topology, group: &str, topic: &str, partition: i32) -> Result<Option<i64>> {
    let (t, group, topic) = (t.clone(), group.to_string(), topic.to_string());
    blocking(move || Ok(crate::kafkaio::backlog::committed_offsets(&t, &group, &topic, &[partition])?[0])).await
}

/// Commits `offset` for `topic[partition]` in `group` as a non-member.
///
/// Errors: the coordinator refuses (the group has members: `UNKNOWN_MEMBER_ID`,
/// `ILLEGAL_GENERATION`, `REBALANCE_IN_PROGRESS`), or the broker is unreachable.
async fn commit_position(t: &Topology, group: &str, topic: &str, partition: i32, offset: i64) -> Result<()> {
    let (t, group, topic) = (t.clone(), group.to_string(), topic.to_string());
    blocking(move || {
        let client = group_client(&t, &group)?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&topic, partition, Offset::Offset(offset))?;
        client.commit(&tpl, CommitMode::Sync)?;
        Ok(())
    })
    .await
}
