//! Prometheus metrics of the runtime, named `orderflow_<name>_<unit>` (`_total` for counters),
//! with low-cardinality labels only (worker, topic, outcome, measure, label, error class).

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};

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
    /// `orderflow_business_events_total{worker,measure,label}`: what processors report
    /// (reservations by outcome/reason, confirmations, compensations by reason, expirations,
    /// late events).
    pub business: IntCounterVec,
    /// `orderflow_dlq_records_total{worker,error_class}`.
    pub dlq: IntCounterVec,
    /// `orderflow_timers_fired_total{worker}`.
    pub timers_fired: IntCounterVec,
    /// `orderflow_assigned_partitions{worker}`.
    pub assigned: IntGaugeVec,
    /// `orderflow_guarantee_info{worker,guarantee}`: 1 for the guarantee in force.
    pub guarantee: IntGaugeVec,
    /// `orderflow_state_restore_seconds{worker,source}`: time to restore one partition's state;
    /// source is `local`, `local+changelog` or `changelog`.
    pub restore: HistogramVec,
    /// `orderflow_state_restored_records_total{worker}`: changelog records replayed.
    pub restored_records: IntCounterVec,
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
        let histogram = |name: &str, help: &str, labels: &[&str]| {
            let buckets = vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];
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
            business: counter(
                "orderflow_business_events_total",
                "Business measures reported by processors.",
                &["worker", "measure", "label"],
            ),
            dlq: counter("orderflow_dlq_records_total", "Records sent to a dead-letter topic.", &["worker", "error_class"]),
            timers_fired: counter("orderflow_timers_fired_total", "Durable timers fired (punctuations).", &["worker"]),
            assigned: gauge("orderflow_assigned_partitions", "Input partitions assigned to this instance.", &["worker"]),
            guarantee: gauge("orderflow_guarantee_info", "Processing guarantee in force (1).", &["worker", "guarantee"]),
            restore: histogram("orderflow_state_restore_seconds", "Time to restore one partition's state.", &["worker", "source"]),
            restored_records: counter("orderflow_state_restored_records_total", "Changelog records replayed while restoring.", &["worker"]),
            registry,
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
