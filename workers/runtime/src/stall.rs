//! Stalled-partition watch (issue 20), Burrow-style: per input partition of a worker instance,
//! records waiting and a position that has not moved for the worker's `stall_after` (topology,
//! default [`DEFAULT_STALL_AFTER`]) is a *stall*.
//!
//! What it is fed:
//! - librdkafka's statistics reports ([`StallWatch::observe`], every `statistics.interval.ms`,
//!   1 s in the worker): per assigned partition the position handed to the worker
//!   (`app_offset`), the records waiting behind it (end − position, the end being the last
//!   stable offset a `read_committed` consumer can reach) and the fetcher's `fetch_state`;
//! - the worker loop: the unit of work in flight ([`StallWatch::unit_started`],
//!   [`StallWatch::stage`], [`StallWatch::unit_ended`]) and the record its processor is on
//!   ([`StallWatch::processing`]), consumer errors ([`StallWatch::consumer_error`]) and produce
//!   retries ([`StallWatch::produce_retry`]).
//!
//! [`StallWatch::evaluate`] runs on its own timer (every second, in the worker's watch task), not
//! on the reports: a unit that never returns (a processor looping or blocked on one record, a
//! unit waiting for the broker) stops the reports with the loop, and its partitions still go from
//! `lagging` to `stalled`. A partition is waiting when it has records behind its position, its
//! fetcher is outside `active` (`offset-wait`, `validate-epoch-wait`: its lag is stale then), or a
//! unit holding its records has not finished; partitions the worker paused (restoring,
//! rewinding) are not watched. A waiting partition whose position moves is `lagging`; one that
//! has not moved for `stall_after` is `stalled`, reported once per episode with its position and
//! what the worker last saw ([`LastSeen`]); the episode ends when the position moves, nothing
//! waits any more, or the partition is paused or revoked.
//!
//! Pure logic: the caller passes the clock, so it is tested without a broker.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::{Duration, Instant};

/// Default `stall_after` (topology `[defaults]`): well above the commit interval and a retry
/// policy's worst case, short enough that a stuck partition pages within minutes.
pub const DEFAULT_STALL_AFTER: Duration = Duration::from_secs(180);

/// A partition's status, exported one-hot as `orderflow_partition_status{status}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Status {
    /// Nothing waiting (or paused by the worker: restoring, rewinding).
    Ok,
    /// Records waiting, position moved within `stall_after`.
    Lagging,
    /// Records waiting, position still for at least `stall_after`.
    Stalled,
}

impl Status {
    /// Every status, in the order of the metric's series.
    pub const ALL: [Status; 3] = [Status::Ok, Status::Lagging, Status::Stalled];

    /// The `status` label: `ok`, `lagging`, `stalled`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Lagging => "lagging",
            Status::Stalled => "stalled",
        }
    }
}

/// One partition's figures from a statistics report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample<'a> {
    pub topic: &'a str,
    pub partition: i32,
    /// The next offset handed to the worker (`app_offset`); -1 before the first record.
    pub position: i64,
    /// Records waiting: the partition's end (last stable offset) minus `position`.
    pub lag: i64,
    /// librdkafka's `fetch_state` (`active`, `offset-wait`, `validate-epoch-wait`, `stopped`, ...).
    pub fetch_state: &'a str,
    /// Whether the worker paused the partition (restoring, rewinding).
    pub paused: bool,
}

/// The record a processor was last given in the unit in flight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// The event's partition key (orderId / storeId), for the log line.
    pub key: String,
}

/// What the worker last saw, logged with a stall so the operator knows where to look.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LastSeen {
    /// The unit of work in flight, if one has been running for over a second: its stage
    /// (`processing`, `committing`, `retrying`), age, and the record its processor was last on.
    pub unit: Option<(String, Duration, Option<Cursor>)>,
    /// The last consumer error and how long ago.
    pub consumer_error: Option<(String, Duration)>,
    /// Consecutive units the broker did not take, the last error and how long ago.
    pub produce_retries: Option<(u32, String, Duration)>,
}

impl fmt::Display for LastSeen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        match &self.unit {
            Some((stage, age, Some(c))) => parts.push(format!(
                "unit {stage} for {}s, processor on {}[{}]@{} key {}",
                age.as_secs(),
                c.topic,
                c.partition,
                c.offset,
                c.key
            )),
            Some((stage, age, None)) => parts.push(format!("unit {stage} for {}s", age.as_secs())),
            None => parts.push("no unit in flight".into()),
        }
        if let Some((e, ago)) = &self.consumer_error {
            parts.push(format!("last consumer error {}s ago: {e}", ago.as_secs()));
        }
        if let Some((n, e, ago)) = &self.produce_retries {
            parts.push(format!("{n} produce retries, last {}s ago: {e}", ago.as_secs()));
        }
        f.write_str(&parts.join("; "))
    }
}

/// What changed for one partition at an evaluation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Waiting and the position unchanged for at least `stall_after`: reported once.
    Stalled { topic: String, partition: i32, position: i64, lag: i64, fetch_state: String, for_: Duration, seen: Box<LastSeen> },
    /// A reported stall ended (the position moved, nothing waits, the partition paused).
    Resumed { topic: String, partition: i32, position: i64, after: Duration },
    /// The partition left the report (revoked): its series are to be removed.
    Gone { topic: String, partition: i32 },
}

/// One partition's row for the metrics after an evaluation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub topic: String,
    pub partition: i32,
    pub status: Status,
    /// Seconds since the position last moved while records waited (0 when nothing waits).
    pub since_progress: Duration,
}

#[derive(Debug)]
struct Track {
    position: i64,
    lag: i64,
    fetch_state: String,
    paused: bool,
    /// When the position last moved or nothing waited.
    since: Instant,
    reported: bool,
}

#[derive(Debug)]
struct Unit {
    started: Instant,
    stage: &'static str,
    /// `(topic, partition)` of the unit's records.
    partitions: BTreeSet<(String, i32)>,
    cursor: Option<Cursor>,
}

/// Per-partition tracking of one worker instance (module docs).
#[derive(Debug)]
pub struct StallWatch {
    stall_after: Duration,
    tracks: BTreeMap<(String, i32), Track>,
    unit: Option<Unit>,
    consumer_error: Option<(String, Instant)>,
    produce_retries: Option<(u32, String, Instant)>,
}

impl StallWatch {
    /// A watch reporting partitions still for `stall_after`.
    pub fn new(stall_after: Duration) -> StallWatch {
        StallWatch { stall_after, tracks: BTreeMap::new(), unit: None, consumer_error: None, produce_retries: None }
    }

    /// The threshold this watch reports at.
    pub fn stall_after(&self) -> Duration {
        self.stall_after
    }

    /// Feeds one statistics report's `samples` taken at `now`. Partitions missing from it
    /// (revoked) are dropped at the next [`StallWatch::evaluate`], which reports them `Gone`.
    pub fn observe<'a>(&mut self, now: Instant, samples: impl IntoIterator<Item = Sample<'a>>) -> Vec<Change> {
        let mut seen = BTreeSet::new();
        for s in samples {
            let key = (s.topic.to_string(), s.partition);
            seen.insert(key.clone());
            let track = self.tracks.entry(key).or_insert(Track {
                position: s.position,
                lag: s.lag,
                fetch_state: s.fetch_state.to_string(),
                paused: s.paused,
                since: now,
                reported: false,
            });
            if track.position != s.position {
                track.since = now;
            }
            track.position = s.position;
            track.lag = s.lag;
            track.fetch_state = s.fetch_state.to_string();
            track.paused = s.paused;
        }
        let gone: Vec<(String, i32)> = self.tracks.keys().filter(|k| !seen.contains(*k)).cloned().collect();
        gone.into_iter()
            .map(|k| {
                self.tracks.remove(&k);
                Change::Gone { topic: k.0, partition: k.1 }
            })
            .collect()
    }

    /// A unit of work holding records of `partitions` (`(topic, partition)`) started at `now`.
    pub fn unit_started(&mut self, now: Instant, partitions: impl IntoIterator<Item = (String, i32)>) {
        self.unit = Some(Unit { started: now, stage: "processing", partitions: partitions.into_iter().collect(), cursor: None });
    }

    /// The unit in flight moved on to `stage` (`committing`, `retrying`).
    pub fn stage(&mut self, stage: &'static str) {
        if let Some(u) = &mut self.unit {
            u.stage = stage;
        }
    }

    /// The unit's processor was given this record.
    pub fn processing(&mut self, cursor: Cursor) {
        if let Some(u) = &mut self.unit {
            u.cursor = Some(cursor);
        }
    }

    /// The unit in flight finished (committed, rewound or failed).
    pub fn unit_ended(&mut self) {
        self.unit = None;
    }

    /// The consumer reported `error` at `now`.
    pub fn consumer_error(&mut self, now: Instant, error: String) {
        self.consumer_error = Some((error, now));
    }

    /// A unit's records were not taken by the broker (`failures` in a row; 0 clears).
    pub fn produce_retry(&mut self, now: Instant, failures: u32, error: String) {
        self.produce_retries = (failures > 0).then_some((failures, error, now));
    }

    fn last_seen(&self, now: Instant) -> LastSeen {
        let ago = |t: Instant| now.saturating_duration_since(t);
        LastSeen {
            unit: self
                .unit
                .as_ref()
                .filter(|u| ago(u.started) >= Duration::from_secs(1))
                .map(|u| (u.stage.to_string(), ago(u.started), u.cursor.clone())),
            consumer_error: self.consumer_error.as_ref().map(|(e, t)| (e.clone(), ago(*t))),
            produce_retries: self.produce_retries.as_ref().map(|(n, e, t)| (*n, e.clone(), ago(*t))),
        }
    }

    /// Evaluates every watched partition at `now`: returns the stalls that began or ended and
    /// each partition's row for the metrics.
    pub fn evaluate(&mut self, now: Instant) -> (Vec<Change>, Vec<Row>) {
        let held: BTreeSet<(String, i32)> = self.unit.as_ref().map(|u| u.partitions.clone()).unwrap_or_default();
        let seen = self.last_seen(now);
        let mut changes = Vec::new();
        let mut rows = Vec::new();
        for (key, t) in &mut self.tracks {
            let (topic, partition) = key;
            let waiting = !t.paused && (t.lag > 0 || t.fetch_state != "active" || held.contains(key));
            if !waiting {
                t.since = now;
            }
            let for_ = now.saturating_duration_since(t.since);
            let status = match (waiting, for_ >= self.stall_after) {
                (false, _) => Status::Ok,
                (true, false) => Status::Lagging,
                (true, true) => Status::Stalled,
            };
            if status == Status::Stalled && !t.reported {
                t.reported = true;
                changes.push(Change::Stalled {
                    topic: topic.clone(),
                    partition: *partition,
                    position: t.position,
                    lag: t.lag,
                    fetch_state: t.fetch_state.clone(),
                    for_,
                    seen: Box::new(seen.clone()),
                });
            } else if status != Status::Stalled && t.reported {
                t.reported = false;
                changes.push(Change::Resumed { topic: topic.clone(), partition: *partition, position: t.position, after: for_ });
            }
            rows.push(Row {
                topic: topic.clone(),
                partition: *partition,
                status,
                since_progress: if waiting { for_ } else { Duration::ZERO },
            });
        }
        (changes, rows)
    }

    /// Partitions currently reported stalled.
    pub fn stalled(&self) -> usize {
        self.tracks.values().filter(|t| t.reported).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AFTER: Duration = Duration::from_secs(60);

    fn sample(position: i64, lag: i64, paused: bool) -> Sample<'static> {
        Sample { topic: "in", partition: 0, position, lag, fetch_state: "active", paused }
    }

    /// Reports `s` and evaluates every second from `from` (exclusive) to `to` (inclusive);
    /// returns the changes.
    fn run(w: &mut StallWatch, from: Instant, to: Instant, s: &[Sample<'static>]) -> Vec<Change> {
        let mut changes = Vec::new();
        let mut t = from;
        while t < to {
            t = (t + Duration::from_secs(1)).min(to);
            changes.extend(w.observe(t, s.iter().cloned()));
            changes.extend(w.evaluate(t).0);
        }
        changes
    }

    fn status(w: &mut StallWatch, now: Instant) -> Vec<(Status, u64)> {
        w.evaluate(now).1.into_iter().map(|r| (r.status, r.since_progress.as_secs())).collect()
    }

    #[test]
    fn a_partition_with_lag_and_a_still_position_is_lagging_then_stalled_once() {
        let mut w = StallWatch::new(AFTER);
        let t0 = Instant::now();
        let still = [sample(10, 5, false)];
        w.observe(t0, still.clone());
        assert_eq!(status(&mut w, t0), vec![(Status::Lagging, 0)]);
        assert!(run(&mut w, t0, t0 + AFTER - Duration::from_secs(1), &still).is_empty());
        assert_eq!(status(&mut w, t0 + AFTER - Duration::from_secs(1)), vec![(Status::Lagging, 59)]);
        let c = run(&mut w, t0 + AFTER - Duration::from_secs(1), t0 + AFTER, &still);
        assert!(matches!(&c[..], [Change::Stalled { position: 10, lag: 5, .. }]), "{c:?}");
        assert_eq!(w.stalled(), 1);
        assert!(run(&mut w, t0 + AFTER, t0 + AFTER * 2, &still).is_empty(), "reported once per episode");
        assert_eq!(status(&mut w, t0 + AFTER * 2), vec![(Status::Stalled, 120)]);
        w.observe(t0 + AFTER * 2, [sample(11, 4, false)]);
        let (c, rows) = w.evaluate(t0 + AFTER * 2);
        assert!(matches!(&c[..], [Change::Resumed { position: 11, .. }]), "{c:?}");
        assert_eq!(rows[0].status, Status::Lagging);
        assert_eq!(w.stalled(), 0);
    }

    #[test]
    fn moving_idle_or_paused_partitions_are_never_reported() {
        let mut w = StallWatch::new(AFTER);
        let t0 = Instant::now();
        for i in 0..200 {
            let now = t0 + Duration::from_secs(1) * i;
            let c = w.observe(
                now,
                [
                    Sample { topic: "moving", partition: 0, position: i64::from(i), lag: 5, fetch_state: "active", paused: false },
                    Sample { topic: "idle", partition: 0, position: 7, lag: 0, fetch_state: "active", paused: false },
                    Sample { topic: "paused", partition: 0, position: 7, lag: 9, fetch_state: "active", paused: true },
                ],
            );
            assert!(c.is_empty(), "{c:?}");
            let (c, rows) = w.evaluate(now);
            assert!(c.is_empty(), "{c:?}");
            let by: Vec<(&str, Status)> = rows.iter().map(|r| (r.topic.as_str(), r.status)).collect();
            assert_eq!(by, vec![("idle", Status::Ok), ("moving", Status::Lagging), ("paused", Status::Ok)]);
        }
    }

    #[test]
    fn a_fetcher_stuck_outside_active_is_reported_even_with_a_stale_zero_lag() {
        let mut w = StallWatch::new(AFTER);
        let t0 = Instant::now();
        let stuck = Sample { topic: "in", partition: 0, position: 10, lag: 0, fetch_state: "validate-epoch-wait", paused: false };
        w.observe(t0, [stuck.clone()]);
        let c = run(&mut w, t0, t0 + AFTER, &[stuck]);
        assert!(matches!(&c[..], [Change::Stalled { fetch_state, .. }] if fetch_state == "validate-epoch-wait"), "{c:?}");
    }

    #[test]
    fn a_unit_that_never_returns_stalls_its_partitions_without_further_reports() {
        // The loop is blocked in a unit: no statistics report arrives, the evaluation still runs.
        let mut w = StallWatch::new(AFTER);
        let t0 = Instant::now();
        // The unit took every fetched record: the lag the last report saw is 0.
        w.observe(t0, [sample(20, 0, false), Sample { partition: 1, ..sample(5, 0, false) }]);
        w.unit_started(t0, [("in".to_string(), 0)]);
        w.processing(Cursor { topic: "in".into(), partition: 0, offset: 17, key: "order-17".into() });
        assert_eq!(status(&mut w, t0 + AFTER - Duration::from_secs(1)), vec![(Status::Lagging, 59), (Status::Ok, 0)]);
        let (c, _) = w.evaluate(t0 + AFTER);
        let [Change::Stalled { partition: 0, position: 20, seen, .. }] = &c[..] else { panic!("{c:?}") };
        let text = seen.to_string();
        assert!(text.contains("unit processing for 60s, processor on in[0]@17 key order-17"), "{text}");
        w.unit_ended();
        let (c, _) = w.evaluate(t0 + AFTER + Duration::from_secs(1));
        assert!(matches!(&c[..], [Change::Resumed { partition: 0, .. }]), "{c:?}");
    }

    #[test]
    fn the_last_errors_and_retries_are_named_with_a_stall() {
        let mut w = StallWatch::new(AFTER);
        let t0 = Instant::now();
        w.observe(t0, [sample(3, 9, false)]);
        w.consumer_error(t0, "Broker: Offset out of range".into());
        w.produce_retry(t0 + Duration::from_secs(10), 4, "Message timed out".into());
        let (c, _) = w.evaluate(t0 + AFTER);
        let [Change::Stalled { seen, .. }] = &c[..] else { panic!("{c:?}") };
        assert_eq!(
            seen.to_string(),
            "no unit in flight; last consumer error 60s ago: Broker: Offset out of range; 4 produce retries, last 50s ago: Message timed out"
        );
        w.produce_retry(t0 + AFTER, 0, String::new());
        assert!(w.last_seen(t0 + AFTER).produce_retries.is_none());
    }

    #[test]
    fn a_revoked_partition_is_gone() {
        let mut w = StallWatch::new(AFTER);
        let t0 = Instant::now();
        w.observe(t0, [sample(10, 5, false)]);
        run(&mut w, t0, t0 + AFTER, &[sample(10, 5, false)]);
        assert_eq!(w.stalled(), 1);
        let c = w.observe(t0 + AFTER + Duration::from_secs(1), []);
        assert_eq!(c, vec![Change::Gone { topic: "in".into(), partition: 0 }]);
        assert_eq!(w.stalled(), 0);
        assert!(w.evaluate(t0 + AFTER * 2).1.is_empty());
    }
}
