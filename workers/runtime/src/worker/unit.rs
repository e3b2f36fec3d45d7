//! One unit of work: admit the gathered records, run the [`step`], export what it saw, encode
//! its outputs, dead letters and changelog records, and commit them with the guarantee's
//! protocol ([`commit::commit`]); a unit that did not commit is rewound and processed again.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use orderflow_api::{Changes, Export, Note};
use rdkafka::message::{Headers, Message, OwnedMessage};
use rdkafka::producer::Producer;
use tracing::{debug, error, warn};

use super::kafka_io::{dead_letter_record, KafkaBroker, SledUnit};
use super::{Worker, WorkerError};
use crate::changelog;
use crate::commit::{self, Failure, OutRecord, Unit};
use crate::headers;
use crate::step::{self, Input, Outcome, RetryBudget, Staged};
use crate::store::Shard;

impl Worker {
    /// Counts an external record keyed or partitioned otherwise than orderflow's partitioner
    /// would (`routing`), logging the first of each topic and reason. The record is processed as
    /// it is: only the deduplicator reads external topics, and it re-keys from the event.
    fn check_route(&mut self, m: &OwnedMessage, event: &orderflow_api::Event) {
        let Some(f) = self.routes.check(m.topic(), m.partition(), m.key(), event) else {
            return;
        };
        self.metrics.misrouted.with_label_values(&[self.name.as_str(), m.topic(), f.reason.as_str()]).inc();
        if self.misroutes_logged.insert((m.topic().to_string(), f.reason)) {
            warn!(
                worker = %self.name,
                topic = m.topic(),
                partition = m.partition(),
                offset = m.offset(),
                reason = f.reason.as_str(),
                key = %String::from_utf8_lossy(m.key().unwrap_or_default()),
                expected_key = %f.expected_key,
                expected_partition = f.expected_partition,
                likely_partitioner = f.likely_partitioner,
                "an outside producer keyed or partitioned this record otherwise than orderflow would; re-keyed from the event, \
                 counted in orderflow_misrouted_records_total (logged once per topic and reason)"
            );
        }
    }

    /// Processes one unit of work and commits it (see the module docs of `worker` for the order
    /// of steps), telling the stall watch when it starts and ends.
    ///
    /// Errors: a failure the instance cannot get past (processor stop, fatal producer or
    /// transactional error, state store); the unit is then not committed and will be replayed.
    pub(super) async fn unit(&mut self, batch: Vec<OwnedMessage>) -> Result<(), WorkerError> {
        let partitions: std::collections::BTreeSet<(String, i32)> = batch.iter().map(|m| (m.topic().to_string(), m.partition())).collect();
        self.stalls.lock().expect("stall watch").unit_started(Instant::now(), partitions);
        let result = self.process_and_commit(batch).await;
        self.stalls.lock().expect("stall watch").unit_ended();
        result
    }

    /// [`Worker::unit`] without the stall watch's bookkeeping.
    async fn process_and_commit(&mut self, batch: Vec<OwnedMessage>) -> Result<(), WorkerError> {
        let started = Instant::now();
        let now = self.clock.now_ms();
        self.metrics.assigned.with_label_values(&[self.name.as_str()]).set(self.owned.len() as i64);
        let mut retry = RetryBudget::new(self.retry, self.retry_budget);
        let mut records = Vec::with_capacity(batch.len());
        for m in &batch {
            let input = Input { topic: m.topic(), partition: m.partition(), offset: m.offset() };
            let admitted = step::admit(&self.codec, &self.rules, input, m.payload(), now, &mut retry, &self.name).await;
            if let Ok(event) = &admitted {
                self.check_route(m, event);
                if self.codec.is_legacy(m.payload().unwrap_or_default()) {
                    self.metrics.legacy_fingerprint.with_label_values(&[self.name.as_str(), m.topic()]).inc();
                }
            }
            records.push((input, admitted));
        }
        let admitted: Vec<bool> = records.iter().map(|(_, r)| r.is_ok()).collect();
        let staged = {
            let states: BTreeMap<i32, &Shard> = self.owned.iter().map(|p| (*p, &self.shards[p])).collect();
            let at = step::At { now_ms: now, retention_ms: self.retention_ms };
            step::step(self.processor.as_mut(), &self.wired, &states, records, at, &mut retry, &self.name).await
        };
        self.report(&batch, &admitted, &staged, &retry, now, started);
        if let Some(stop) = staged.stop {
            let (topic, partition, offset) = match stop.cause {
                step::Cause::Input(i) => (batch[i].topic().to_string(), batch[i].partition(), batch[i].offset()),
                step::Cause::Timer { partition, .. } => ("<timer>".to_string(), partition, -1),
            };
            return Err(WorkerError::Process { topic, partition, offset, error: stop.error });
        }
        let Staged { outputs, dead_letters, mut changes, offsets, timers_fired, .. } = staged;
        // Neutralise the changelog records of units that never committed (module docs of
        // `changelog`): this unit also writes their keys' committed values.
        for (p, orphans) in &self.orphans {
            if let (Some(c), Some(shard)) = (changes.get_mut(p), self.shards.get(p)) {
                orphans.compensate(shard, c);
            }
        }
        if batch.is_empty() && changes.values().all(Changes::is_empty) {
            return Ok(());
        }

        let commit_started = Instant::now();
        let mut records = Vec::with_capacity(outputs.len() + dead_letters.len());
        let causes = super::sizes::causes(&outputs);
        for (o, cause) in outputs {
            let topic = self.outputs[&o.port].clone();
            let value = self.codec.encode(&topic, &o.event).await.map_err(|error| WorkerError::Encode { topic: topic.clone(), error })?;
            let headers = match (self.record_headers, cause) {
                (false, _) => Vec::new(),
                (true, step::Cause::Input(i)) => {
                    let input = batch[i].headers().map(|h| h.iter().map(|h| (h.key, h.value)).collect::<Vec<_>>()).unwrap_or_default();
                    headers::output_headers(&o.event, &self.name, input)
                }
                (true, step::Cause::Timer { .. }) => headers::output_headers(&o.event, &self.name, []),
            };
            records.push(OutRecord { topic, partition: None, key: Some(o.key.into_bytes()), value: Some(value), headers });
        }
        let produced: Vec<String> = records.iter().map(|r| r.topic.clone()).collect();
        for (i, r) in &dead_letters {
            let topic = self.dead_letter[batch[*i].topic()].clone();
            records.push(dead_letter_record(topic, &batch[*i], r, &self.name, now, &self.limits));
        }
        let empty = BTreeMap::new();
        let mut changelog = Vec::new();
        for (p, c) in changes.iter_mut().filter(|(p, c)| !c.is_empty() || offsets.contains_key(*p)) {
            let records = changelog::records(&self.inputs, c, offsets.get(p).unwrap_or(&empty));
            // The unit's marker carries its remembered eventIds: index it locally, so the
            // retention sweep can forget them with it (`retention`).
            if let Some(marker) = records.last() {
                crate::retention::index(&marker.key, &changelog::marker_seen(marker), c);
            }
            changelog.push((*p, records));
        }
        let unit = Unit { records, changelog_topic: self.changelog_topic.clone(), changelog, offsets };
        // A record over its topic's size limit would be refused on every retry: stop instead.
        self.check_sizes(&unit, &causes, &dead_letters, &batch)?;
        let offsets = unit.offsets.clone();
        let broker = KafkaBroker {
            producer: &self.producer,
            txn: self.txn.as_ref(),
            consumer: &self.consumer,
            health: &self.health,
            worker: &self.name,
            stages: &self.metrics.commit_stage,
        };
        let mut local = SledUnit {
            store: &self.store,
            shards: &self.shards,
            changes: &changes,
            offsets: &offsets,
            worker: &self.name,
            stages: &self.metrics.commit_stage,
        };
        self.stalls.lock().expect("stall watch").stage("committing");
        match commit::commit(self.guarantee, &broker, &mut local, unit).await {
            Ok(persisted) => {
                for p in persisted.keys() {
                    self.orphans.remove(p);
                }
                if self.produce_failures > 0 {
                    self.stalls.lock().expect("stall watch").produce_retry(Instant::now(), 0, String::new());
                }
                self.produce_failures = 0;
                for topic in &produced {
                    self.metrics.produced.with_label_values(&[self.name.as_str(), topic]).inc();
                }
                for (_, r) in &dead_letters {
                    self.metrics.dlq.with_label_values(&[self.name.as_str(), r.class.as_str()]).inc();
                }
                self.metrics.commit.with_label_values(&[self.name.as_str(), "ok"]).observe(commit_started.elapsed().as_secs_f64());
                debug!(worker = %self.name, inputs = batch.len(), outputs = produced.len(), dead_letters = dead_letters.len(), timers = timers_fired, "unit committed");
                Ok(())
            }
            Err(failure) => self.commit_failed(failure, &batch, &changes).await,
        }
    }

    /// Exports what a step saw: consumed records by outcome, record delay, notes as their
    /// processor declared them, timers fired, retries, processing time.
    fn report(&self, batch: &[OwnedMessage], admitted: &[bool], staged: &Staged, retry: &RetryBudget, now: i64, started: Instant) {
        let w = self.name.as_str();
        for ((m, outcome), admitted) in batch.iter().zip(&staged.outcomes).zip(admitted) {
            if *outcome != Outcome::NotReached {
                self.metrics.consumed.with_label_values(&[w, m.topic(), outcome.as_str()]).inc();
            }
            if let (true, Some(ts)) = (*admitted, m.timestamp().to_millis()) {
                self.metrics.delay.with_label_values(&[w]).observe((now - ts).max(0) as f64 / 1000.0);
            }
        }
        self.report_notes(&staged.notes);
        self.metrics.retries.with_label_values(&[w, "registry"]).inc_by(retry.registry_retries);
        self.metrics.retries.with_label_values(&[w, "processor"]).inc_by(retry.processor_retries);
        self.metrics.timers_fired.with_label_values(&[w]).inc_by(staged.timers_fired as u64);
        self.metrics.forgotten.with_label_values(&[w]).inc_by(staged.swept.ids as u64);
        self.metrics.processing.with_label_values(&[w]).observe(started.elapsed().as_secs_f64());
    }

    /// Exports each note as its processor declared ([`Export`]).
    fn report_notes(&self, notes: &[Note]) {
        let w = self.name.as_str();
        let mut top_n = Vec::new();
        for n in notes {
            match n.export {
                Export::Counter => self.metrics.business.with_label_values(&[w, n.measure, &n.label]).inc(),
                Export::Logged(message) => {
                    warn!(worker = %w, measure = n.measure, label = %n.label, "{message}");
                    self.metrics.business.with_label_values(&[w, n.measure, &n.label]).inc();
                }
                Export::TopN => top_n.push(n.label.clone()),
                Export::InvariantBroken => {
                    error!(worker = %w, measure = n.measure, kind = %n.label, "invariant broken");
                    self.metrics.conservation.with_label_values(&[w]).inc();
                }
            }
        }
        self.metrics.out_of_stock(&top_n);
    }

    /// A unit that did not commit: an aborted transaction rewinds; a record the broker did not
    /// take waits a backoff (the retry policy's, growing with consecutive failures, never giving
    /// up: the broker is expected back), compensates the changelog records it may have written
    /// and rewinds; anything fatal stops the instance, and so does a record refused for its size
    /// (`limits`: it would be refused again on every retry).
    async fn commit_failed(
        &mut self,
        failure: Failure,
        batch: &[OwnedMessage],
        changes: &BTreeMap<i32, Changes>,
    ) -> Result<(), WorkerError> {
        let w = self.name.clone();
        if let Some((topic, error)) = super::sizes::refused_for_size(&failure) {
            return Err(WorkerError::RefusedForSize { topic, error });
        }
        match failure {
            Failure::Aborted(e) => {
                self.metrics.commit.with_label_values(&[w.as_str(), e.class.as_str()]).observe(0.0);
                warn!(worker = %w, error = %e, "aborting the unit and rewinding");
                self.rewind(batch)
            }
            Failure::Fatal(e) => {
                self.metrics.commit.with_label_values(&[w.as_str(), e.class.as_str()]).observe(0.0);
                error!(worker = %w, error = %e, "fatal transactional error; stopping this instance");
                Err(WorkerError::Txn(e))
            }
            Failure::NotDelivered { topic, error } => {
                self.metrics.commit.with_label_values(&[w.as_str(), "produce_failed"]).observe(0.0);
                if let Some(fatal) = self.producer.client().fatal_error() {
                    error!(worker = %w, %topic, error = %error, fatal = ?fatal, "fatal producer error; stopping this instance");
                    return Err(WorkerError::Delivery { topic, error });
                }
                self.produce_failures += 1;
                {
                    let mut stalls = self.stalls.lock().expect("stall watch");
                    stalls.produce_retry(Instant::now(), self.produce_failures, format!("{topic}: {error}"));
                    stalls.stage("retrying");
                }
                let wait: Duration = self.retry.backoff(self.produce_failures);
                warn!(worker = %w, %topic, error = %error, failures = self.produce_failures, wait_ms = wait.as_millis() as u64, "broker did not take the unit's records; rewinding and retrying");
                self.metrics.retries.with_label_values(&[w.as_str(), "produce"]).inc();
                self.health.set(&self.health.unacked, true);
                for (p, c) in changes {
                    self.orphans.entry(*p).or_default().extend_from(c);
                }
                tokio::time::sleep(wait).await;
                self.rewind(batch)
            }
            Failure::Store(e) => Err(e.into()),
        }
    }
}
