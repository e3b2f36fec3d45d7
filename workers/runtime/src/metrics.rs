//! Prometheus metrics of the runtime, named `orderflow_<name>_<unit>` (`_total` for counters),
//! with low-cardinality labels only (worker, topic, outcome, measure, label, error class).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};

/// The metric families of a listing such as `deploy/metrics.txt` or `deploy/metrics-api.txt`
/// (`<name> <type>` per line; blank lines and `#` comments skipped), as (name, type) in file
/// order. Also reads the `# TYPE <name> <type>` lines of a Prometheus text scrape when given
/// `type_lines` true (other lines skipped).
pub fn listed_families(text: &str, type_lines: bool) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter_map(|l| if type_lines { l.strip_prefix("# TYPE ") } else { (!l.is_empty() && !l.starts_with('#')).then_some(l) })
        .map(|l| {
            let mut parts = l.split_whitespace();
            (parts.next().unwrap_or_default().to_string(), parts.next().unwrap_or_default().to_string())
        })
        .collect()
}

/// Every metric name the runtime exports (kept equal to `deploy/metrics.txt`, which the
/// Grafana dashboard and alert rules are checked against).
pub const NAMES: &[&str] = &[
    "orderflow_events_consumed_total",
    "orderflow_events_produced_total",
    "orderflow_unit_processing_seconds",
    "orderflow_commit_seconds",
    "orderflow_commit_stage_seconds",
    "orderflow_processing_delay_seconds",
    "orderflow_consumer_lag_records",
    "orderflow_business_events_total",
    "orderflow_dlq_records_total",
    "orderflow_timers_fired_total",
    "orderflow_state_forgotten_event_ids_total",
    "orderflow_misrouted_records_total",
    "orderflow_partition_count_mismatch",
    "orderflow_legacy_fingerprint_records_total",
    "orderflow_assigned_partitions",
    "orderflow_guarantee_info",
    "orderflow_state_restore_seconds",
    "orderflow_state_restored_records_total",
    "orderflow_out_of_stock_top",
    "orderflow_stock_conservation_mismatches_total",
    "orderflow_retries_total",
    "orderflow_broker_connected",
    "orderflow_stalled_partitions",
    "orderflow_partition_status",
    "orderflow_partition_seconds_since_progress",
    "orderflow_outbox_pending_rows",
    "orderflow_outbox_quarantined_rows",
    "orderflow_outbox_oldest_pending_seconds",
    "orderflow_outbox_publish_lag_seconds",
    "orderflow_outbox_publish_failures_total",
];

/// The `stage` label values of `orderflow_commit_stage_seconds` ([`Metrics::commit_stage`]), in
/// the order a unit's commit goes through them.
pub const COMMIT_STAGES: [&str; 4] = ["produce", "transaction", "state_write", "state_flush"];

/// How many products `orderflow_out_of_stock_top` shows.
pub const TOP_N: usize = 10;
/// How many products the top-N tracker remembers before it evicts the smallest counts.
const TOP_N_CAPACITY: usize = 10_000;

/// Every metric the runtime exports; one instance per process, shared by its workers.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    /// `orderflow_events_consumed_total{worker,topic,outcome}`; outcome is `processed`,
    /// `duplicate` or `dead_lettered`.
    pub consumed: IntCounterVec,
    /// `orderflow_events_produced_total{worker,topic}`.
    pub produced: IntCounterVec,
    /// `orderflow_unit_processing_seconds{worker}`: decode + process of one unit of work.
    pub processing: HistogramVec,
    /// `orderflow_commit_seconds{worker,outcome}`: produce acks + state flush + offset commit.
    pub commit: HistogramVec,
    /// `orderflow_commit_stage_seconds{worker,stage}`: where a unit's commit spends its time
    /// (issue 18's profile), per stage: `produce` (outputs, dead letters and changelog records
    /// sent and acknowledged; under effectively_once once for the records and once for the
    /// markers), `transaction` (offsets added to the transaction and the transaction committed;
    /// exactly_once only), `state_write` (the sled batches) and `state_flush` (sled's fsync).
    pub commit_stage: HistogramVec,
    /// `orderflow_business_events_total{worker,measure,label}`: what processors report
    /// (reservations by outcome/reason, confirmations, compensations by reason, expirations,
    /// late events).
    pub business: IntCounterVec,
    /// `orderflow_dlq_records_total{worker,error_class}`.
    pub dlq: IntCounterVec,
    /// `orderflow_retries_total{worker,cause}`: retries of transient failures; cause is
    /// `registry` (schema registry unreachable), `processor` (a processor's Transient error),
    /// `produce` (the broker did not take a unit's records), `restore` (the broker was not
    /// reachable for a state restore) or `rejoin` (no assignment after a revocation).
    pub retries: IntCounterVec,
    /// `orderflow_stalled_partitions{worker}`: input partitions of this instance with records
    /// waiting whose position has not moved for the worker's `stall_after` (see `stall`).
    pub stalled: IntGaugeVec,
    /// `orderflow_partition_status{worker,topic,partition,status}`: 1 for the partition's current
    /// status (`ok`, `lagging`, `stalled`; `stall::Status`), 0 for the others; removed on
    /// revocation.
    pub partition_status: IntGaugeVec,
    /// `orderflow_partition_seconds_since_progress{worker,topic,partition}`: seconds since the
    /// partition's position last moved while records waited; 0 while nothing waits.
    pub since_progress: IntGaugeVec,
    /// `orderflow_broker_connected{worker}`: 1 while librdkafka holds a broker connection.
    pub broker_connected: IntGaugeVec,
    /// `orderflow_timers_fired_total{worker}`.
    pub timers_fired: IntCounterVec,
    /// `orderflow_state_forgotten_event_ids_total{worker}`: remembered `eventId`s forgotten by
    /// the retention sweep (`retention`); flat while traffic flows means the sweep is not running.
    pub forgotten: IntCounterVec,
    /// `orderflow_misrouted_records_total{worker,topic,reason}`: records of an external topic an
    /// outside producer keyed or partitioned otherwise than orderflow's partitioner would
    /// (`routing`); reason is `partition`, `no_key` or `key_mismatch`. Handled (the deduplicator
    /// re-keys from the event), counted so the producer gets fixed.
    pub misrouted: IntCounterVec,
    /// `orderflow_legacy_fingerprint_records_total{worker,topic}`: input records decoded through a
    /// single-object fingerprint orderflow wrote before issue 14 (apache-avro 0.22's, not the
    /// specification's; `codec::legacy_fingerprint`). At 0 over the longest retention of the
    /// topics a worker reads (dead-letter topics included), the legacy fingerprints can go.
    pub legacy_fingerprint: IntCounterVec,
    /// `orderflow_partition_count_mismatch{worker,topic}`: 1 when an input topic on the broker has
    /// another partition count than `topology.toml` declares (checked at start), else 0.
    pub partition_mismatch: IntGaugeVec,
    /// `orderflow_assigned_partitions{worker}`.
    pub assigned: IntGaugeVec,
    /// `orderflow_guarantee_info{worker,guarantee}`: 1 for the guarantee in force.
    pub guarantee: IntGaugeVec,
    /// `orderflow_state_restore_seconds{worker,source}`: time to restore one partition's state;
    /// source is `local`, `local+changelog` or `changelog`.
    pub restore: HistogramVec,
    /// `orderflow_state_restored_records_total{worker}`: changelog records replayed.
    pub restored_records: IntCounterVec,
    /// `orderflow_processing_delay_seconds{worker}`: record timestamp → processed.
    pub delay: HistogramVec,
    /// `orderflow_consumer_lag_records{worker,topic,partition}`: from librdkafka statistics.
    pub lag: IntGaugeVec,
    /// `orderflow_out_of_stock_top{rank,product}`: the top N products by out-of-stock failures
    /// (bounded: a label per product would be unbounded cardinality).
    pub out_of_stock: IntGaugeVec,
    /// `orderflow_stock_conservation_mismatches_total{worker}`.
    pub conservation: IntCounterVec,
    /// The outbox relay's metrics (issue 15).
    pub outbox: OutboxMetrics,
    out_of_stock_counts: Arc<Mutex<HashMap<String, u64>>>,
}

/// Metrics of outbox-relay workers (issue 15; seed 003: average publish lag ≤ 3 s). Rows the relay
/// publishes count in `orderflow_events_produced_total`; database and broker outages in
/// `orderflow_retries_total{cause="database"|"produce"}`.
#[derive(Clone)]
pub struct OutboxMetrics {
    /// `orderflow_outbox_pending_rows{worker}`: `PENDING` rows of the relay's topic.
    pub pending: IntGaugeVec,
    /// `orderflow_outbox_quarantined_rows{worker}`: `QUARANTINED` rows waiting for an operator.
    pub quarantined: IntGaugeVec,
    /// `orderflow_outbox_oldest_pending_seconds{worker}`: age of the oldest `PENDING` row.
    pub oldest_pending: IntGaugeVec,
    /// `orderflow_outbox_publish_lag_seconds{worker}`: row written (`created_at`) → acknowledged.
    pub publish_lag: HistogramVec,
    /// `orderflow_outbox_publish_failures_total{worker,class}`: failed attempts of rows, by
    /// class (`invalid_payload`, `key_mismatch`, `encode`, `oversized`, `rejected`).
    pub failures: IntCounterVec,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric in a fresh registry.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry.register(Box::new(c.clone())).expect("unique metric");
            c
        };
        // Buckets from 0.5 ms to 10 minutes: unit times are milliseconds, but processing delay
        // must show the seed's 10 s alarm and a changelog rebuild can take minutes.
        let histogram = |name: &str, help: &str, labels: &[&str]| {
            let buckets =
                vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0];
            let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels).expect("valid metric");
            registry.register(Box::new(h.clone())).expect("unique metric");
            h
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry.register(Box::new(g.clone())).expect("unique metric");
            g
        };
        Metrics {
            consumed: counter(
                "orderflow_events_consumed_total",
                "Input records by worker, topic and outcome.",
                &["worker", "topic", "outcome"],
            ),
            produced: counter("orderflow_events_produced_total", "Output records acknowledged by the broker.", &["worker", "topic"]),
            processing: histogram("orderflow_unit_processing_seconds", "Decode and process time of one unit of work.", &["worker"]),
            commit: histogram(
                "orderflow_commit_seconds",
                "Produce acknowledgement, state flush and offset commit of one unit.",
                &["worker", "outcome"],
            ),
            commit_stage: histogram(
                "orderflow_commit_stage_seconds",
                "Time of one stage of a unit's commit: produce, transaction, state_write, state_flush.",
                &["worker", "stage"],
            ),
            business: counter(
                "orderflow_business_events_total",
                "Business measures reported by processors.",
                &["worker", "measure", "label"],
            ),
            dlq: counter("orderflow_dlq_records_total", "Records sent to a dead-letter topic.", &["worker", "error_class"]),
            retries: counter("orderflow_retries_total", "Retries of transient failures, by cause.", &["worker", "cause"]),
            broker_connected: gauge("orderflow_broker_connected", "1 while the worker holds a broker connection.", &["worker"]),
            stalled: gauge(
                "orderflow_stalled_partitions",
                "Input partitions with records waiting whose position has not moved for stall_after.",
                &["worker"],
            ),
            partition_status: gauge(
                "orderflow_partition_status",
                "1 for an input partition's current status (ok, lagging, stalled), 0 for the others.",
                &["worker", "topic", "partition", "status"],
            ),
            since_progress: gauge(
                "orderflow_partition_seconds_since_progress",
                "Seconds since an input partition's position last moved while records waited (0 while none wait).",
                &["worker", "topic", "partition"],
            ),
            timers_fired: counter("orderflow_timers_fired_total", "Durable timers fired (punctuations).", &["worker"]),
            forgotten: counter(
                "orderflow_state_forgotten_event_ids_total",
                "Remembered eventIds forgotten after the state retention.",
                &["worker"],
            ),
            misrouted: counter(
                "orderflow_misrouted_records_total",
                "External-topic records keyed or partitioned otherwise than orderflow's partitioner would.",
                &["worker", "topic", "reason"],
            ),
            legacy_fingerprint: counter(
                "orderflow_legacy_fingerprint_records_total",
                "Input records written with a pre-issue-14 (non-spec) Avro fingerprint, still decoded.",
                &["worker", "topic"],
            ),
            partition_mismatch: gauge(
                "orderflow_partition_count_mismatch",
                "1 when an input topic has another partition count on the broker than the topology declares.",
                &["worker", "topic"],
            ),
            assigned: gauge("orderflow_assigned_partitions", "Input partitions assigned to this instance.", &["worker"]),
            guarantee: gauge("orderflow_guarantee_info", "Processing guarantee in force (1).", &["worker", "guarantee"]),
            restore: histogram("orderflow_state_restore_seconds", "Time to restore one partition's state.", &["worker", "source"]),
            restored_records: counter("orderflow_state_restored_records_total", "Changelog records replayed while restoring.", &["worker"]),
            delay: histogram("orderflow_processing_delay_seconds", "Record timestamp to processed.", &["worker"]),
            lag: gauge(
                "orderflow_consumer_lag_records",
                "Records behind the high watermark, per input partition.",
                &["worker", "topic", "partition"],
            ),
            out_of_stock: gauge("orderflow_out_of_stock_top", "Top products by out-of-stock reservation failures.", &["rank", "product"]),
            conservation: counter(
                "orderflow_stock_conservation_mismatches_total",
                "Stock records written that break on hand >= reserved >= 0.",
                &["worker"],
            ),
            outbox: OutboxMetrics {
                pending: gauge("orderflow_outbox_pending_rows", "PENDING outbox rows of the relay's topic.", &["worker"]),
                quarantined: gauge("orderflow_outbox_quarantined_rows", "QUARANTINED outbox rows waiting for an operator.", &["worker"]),
                oldest_pending: gauge("orderflow_outbox_oldest_pending_seconds", "Age of the oldest PENDING outbox row.", &["worker"]),
                publish_lag: histogram(
                    "orderflow_outbox_publish_lag_seconds",
                    "Outbox row written to its record acknowledged by the broker.",
                    &["worker"],
                ),
                failures: counter(
                    "orderflow_outbox_publish_failures_total",
                    "Failed publish attempts of outbox rows, by class.",
                    &["worker", "class"],
                ),
            },
            out_of_stock_counts: Arc::new(Mutex::new(HashMap::new())),
            registry,
        }
    }

    /// Counts out-of-stock failures of `products` and republishes the top N.
    pub fn out_of_stock(&self, products: &[String]) {
        if products.is_empty() {
            return;
        }
        let mut counts = self.out_of_stock_counts.lock().expect("top-n counts");
        for p in products {
            *counts.entry(p.clone()).or_default() += 1;
        }
        if counts.len() > TOP_N_CAPACITY {
            // Keep the larger half: a product that matters keeps coming back.
            let mut all: Vec<(String, u64)> = counts.drain().collect();
            all.sort_by_key(|e| std::cmp::Reverse(e.1));
            counts.extend(all.into_iter().take(TOP_N_CAPACITY / 2));
        }
        let mut top: Vec<(&String, &u64)> = counts.iter().collect();
        top.sort_by(|a, b| b.1.cmp(a.1).then_with(|| a.0.cmp(b.0)));
        self.out_of_stock.reset();
        for (rank, (product, n)) in top.into_iter().take(TOP_N).enumerate() {
            self.out_of_stock.with_label_values(&[&(rank + 1).to_string(), product]).set(*n as i64);
        }
    }

    /// The text exposition format of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        use prometheus::Encoder;
        prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut buf).expect("text encoding");
        String::from_utf8(buf).expect("utf-8 exposition")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_stock_keeps_a_bounded_top_n() {
        let m = Metrics::new();
        let products: Vec<String> = (0..50).map(|i| format!("P-{i}")).collect();
        m.out_of_stock(&products);
        m.out_of_stock(&["P-7".to_string(), "P-7".to_string(), "P-3".to_string()]);
        let text = m.render();
        let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("orderflow_out_of_stock_top{")).collect();
        assert_eq!(lines.len(), TOP_N, "{text}");
        assert!(lines.iter().any(|l| l.contains("rank=\"1\"") && l.contains("product=\"P-7\"") && l.ends_with(" 3")), "{lines:?}");
        assert!(lines.iter().any(|l| l.contains("rank=\"2\"") && l.contains("product=\"P-3\"") && l.ends_with(" 2")), "{lines:?}");
    }

    #[test]
    fn every_exported_name_is_listed_for_the_dashboards() {
        let listed = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/metrics.txt")).expect("deploy/metrics.txt");
        let listed = listed_families(&listed, false);
        let mut names = NAMES.to_vec();
        names.sort_unstable();
        let mut listed_names: Vec<&str> = listed.iter().map(|(n, _)| n.as_str()).collect();
        listed_names.sort_unstable();
        assert_eq!(names, listed_names, "deploy/metrics.txt and metrics::NAMES differ");
        // And every listed name is really exported (vector metrics show once they have a child).
        let m = Metrics::new();
        m.consumed.with_label_values(&["w", "t", "o"]);
        m.produced.with_label_values(&["w", "t"]);
        m.processing.with_label_values(&["w"]);
        m.commit.with_label_values(&["w", "o"]);
        m.commit_stage.with_label_values(&["w", "produce"]);
        m.delay.with_label_values(&["w"]);
        m.lag.with_label_values(&["w", "t", "0"]);
        m.business.with_label_values(&["w", "m", "l"]);
        m.dlq.with_label_values(&["w", "c"]);
        m.timers_fired.with_label_values(&["w"]);
        m.forgotten.with_label_values(&["w"]);
        m.assigned.with_label_values(&["w"]);
        m.guarantee.with_label_values(&["w", "g"]);
        m.restore.with_label_values(&["w", "s"]);
        m.restored_records.with_label_values(&["w"]);
        m.out_of_stock.with_label_values(&["1", "p"]);
        m.conservation.with_label_values(&["w"]);
        m.retries.with_label_values(&["w", "c"]);
        m.broker_connected.with_label_values(&["w"]);
        m.stalled.with_label_values(&["w"]);
        m.partition_status.with_label_values(&["w", "t", "0", "ok"]);
        m.since_progress.with_label_values(&["w", "t", "0"]);
        m.misrouted.with_label_values(&["w", "t", "partition"]);
        m.partition_mismatch.with_label_values(&["w", "t"]);
        m.legacy_fingerprint.with_label_values(&["w", "t"]);
        m.outbox.pending.with_label_values(&["w"]);
        m.outbox.quarantined.with_label_values(&["w"]);
        m.outbox.oldest_pending.with_label_values(&["w"]);
        m.outbox.publish_lag.with_label_values(&["w"]);
        m.outbox.failures.with_label_values(&["w", "c"]);
        let text = m.render();
        for (n, kind) in &listed {
            assert!(text.lines().any(|l| l == format!("# TYPE {n} {kind}")), "{n} is not exported as a {kind}");
        }
    }
}
