//! Stalled-partition watch: notices an input partition that has records waiting (a consumer
//! lag above 0), or whose fetcher is in a state other than `active`, and whose position has not moved for
//! [`STALL_AFTER`], from librdkafka's statistics reports (`statistics.interval.ms`, 1 s by default
//! in the worker). The lag comes from the last fetch response, so a fetcher that stopped fetching
//! shows a stale lag; its `fetch_state` is what tells.
//!
//! A stall is reported once per episode (a warning with librdkafka's `fetch_state`, which tells
//! a fetcher stuck on its leader, `validate-epoch-wait`, `offset-wait`, from a paused one,
//! `active` with nothing fetched) and counted in `orderflow_stalled_partitions`; it ends when the
//! position moves or the lag drops to 0. Paused partitions (restoring, rewinding) are not watched,
//! and time while the loop did not poll (reports further apart than [`REPORT_GAP`]: a unit blocked
//! on an absent broker, which the ack stall and `orderflow_broker_connected` report) does not
//! count.
//!
//! Pure logic: the caller passes the clock, so it is tested without a broker.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How long a partition with records waiting may keep the same position before it is reported.
pub const STALL_AFTER: Duration = Duration::from_secs(30);

/// One partition's figures from a statistics report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample<'a> {
    pub topic: &'a str,
    pub partition: i32,
    /// The next offset handed to the application (`app_offset`); -1 before the first record.
    pub position: i64,
    /// Records waiting: the partition's end (last stable offset) minus `position`.
    pub lag: i64,
    /// librdkafka's `fetch_state` (`active`, `offset-wait`, `validate-epoch-wait`, `stopped`, ...).
    pub fetch_state: &'a str,
    /// Whether librdkafka reports the partition paused (`fetch_state` absent or the app paused it).
    pub paused: bool,
}

/// What changed for one partition at a report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Lag > 0 and the position unchanged for at least [`STALL_AFTER`]: reported once.
    Stalled { topic: String, partition: i32, position: i64, lag: i64, fetch_state: String, for_: Duration },
    /// A reported stall ended (the position moved, the lag went to 0, or the partition paused).
    Resumed { topic: String, partition: i32, position: i64 },
}

#[derive(Debug)]
struct Track {
    position: i64,
    since: Instant,
    reported: bool,
}

/// A gap between two reports longer than this means the worker loop did not poll its consumer
/// (a unit blocked on the broker, reported by the ack stall and the broker gauge): the time in
/// the gap does not count towards a stall.
pub const REPORT_GAP: Duration = Duration::from_secs(5);

/// Per-partition tracking across statistics reports.
#[derive(Debug, Default)]
pub struct StallWatch {
    tracks: HashMap<(String, i32), Track>,
    last_report: Option<Instant>,
}

impl StallWatch {
    /// Feeds one report's `samples` taken at `now`; returns the stalls that began or ended.
    /// Partitions missing from the report (revoked) are forgotten.
    pub fn observe<'a>(&mut self, now: Instant, samples: impl IntoIterator<Item = Sample<'a>>) -> Vec<Change> {
        let mut changes = Vec::new();
        let mut seen = std::collections::HashSet::new();
        if self.last_report.is_some_and(|last| now.saturating_duration_since(last) > REPORT_GAP) {
            for t in self.tracks.values_mut() {
                t.since = now;
            }
        }
        self.last_report = Some(now);
        for s in samples {
            let key = (s.topic.to_string(), s.partition);
            seen.insert(key.clone());
            // A fetcher stuck outside `active` (`offset-wait`, `validate-epoch-wait`, ...) also
            // counts: its last stable offset, and so its lag, are stale.
            let waiting = (s.lag > 0 || s.fetch_state != "active") && !s.paused;
            let track = self.tracks.entry(key).or_insert(Track { position: s.position, since: now, reported: false });
            if !waiting || track.position != s.position {
                if track.reported {
                    changes.push(Change::Resumed { topic: s.topic.to_string(), partition: s.partition, position: s.position });
                }
                *track = Track { position: s.position, since: now, reported: false };
                continue;
            }
            let for_ = now.saturating_duration_since(track.since);
            if !track.reported && for_ >= STALL_AFTER {
                track.reported = true;
                changes.push(Change::Stalled {
                    topic: s.topic.to_string(),
                    partition: s.partition,
                    position: s.position,
                    lag: s.lag,
                    fetch_state: s.fetch_state.to_string(),
                    for_,
                });
            }
        }
        self.tracks.retain(|k, _| seen.contains(k));
        changes
    }

    /// Partitions currently reported stalled.
    pub fn stalled(&self) -> usize {
        self.tracks.values().filter(|t| t.reported).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(position: i64, lag: i64, paused: bool) -> Sample<'static> {
        Sample { topic: "in", partition: 0, position, lag, fetch_state: "active", paused }
    }

    /// Reports `s` every second from `from` (exclusive) to `to` (inclusive); returns the changes.
    fn report_until(w: &mut StallWatch, from: Instant, to: Instant, s: &[Sample<'static>]) -> Vec<Change> {
        let mut changes = Vec::new();
        let mut t = from;
        while t < to {
            t = (t + Duration::from_secs(1)).min(to);
            changes.extend(w.observe(t, s.iter().cloned()));
        }
        changes
    }

    #[test]
    fn a_partition_with_lag_and_a_still_position_is_reported_once_after_the_threshold() {
        let mut w = StallWatch::default();
        let t0 = Instant::now();
        let still = [sample(10, 5, false)];
        assert!(w.observe(t0, still.clone()).is_empty());
        assert!(report_until(&mut w, t0, t0 + STALL_AFTER - Duration::from_secs(1), &still).is_empty());
        let c = w.observe(t0 + STALL_AFTER, still.clone());
        assert!(matches!(&c[..], [Change::Stalled { position: 10, lag: 5, .. }]), "{c:?}");
        assert_eq!(w.stalled(), 1);
        assert!(report_until(&mut w, t0 + STALL_AFTER, t0 + STALL_AFTER * 2, &still).is_empty(), "reported once per episode");
        let c = w.observe(t0 + STALL_AFTER * 2, [sample(11, 4, false)]);
        assert!(matches!(&c[..], [Change::Resumed { position: 11, .. }]), "{c:?}");
        assert_eq!(w.stalled(), 0);
    }

    #[test]
    fn moving_idle_or_paused_partitions_are_never_reported() {
        let mut w = StallWatch::default();
        let t0 = Instant::now();
        for i in 0..100 {
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
        }
    }

    #[test]
    fn a_fetcher_stuck_outside_active_is_reported_even_with_a_stale_zero_lag() {
        let mut w = StallWatch::default();
        let t0 = Instant::now();
        let stuck = Sample { topic: "in", partition: 0, position: 10, lag: 0, fetch_state: "validate-epoch-wait", paused: false };
        w.observe(t0, [stuck.clone()]);
        let c = report_until(&mut w, t0, t0 + STALL_AFTER, &[stuck]);
        assert!(matches!(&c[..], [Change::Stalled { fetch_state, .. }] if fetch_state == "validate-epoch-wait"), "{c:?}");
    }

    #[test]
    fn a_gap_between_reports_does_not_count_towards_a_stall() {
        // The loop was blocked in a unit for 32 s (the broker away): the first report after it is
        // not a stall; one that stays still for STALL_AFTER after it is.
        let mut w = StallWatch::default();
        let t0 = Instant::now();
        let still = [sample(31, 122, false)];
        w.observe(t0, still.clone());
        let after_gap = t0 + STALL_AFTER + Duration::from_secs(2);
        assert!(w.observe(after_gap, still.clone()).is_empty());
        let c = report_until(&mut w, after_gap, after_gap + STALL_AFTER, &still);
        assert!(matches!(&c[..], [Change::Stalled { .. }]), "{c:?}");
    }

    #[test]
    fn a_revoked_partition_is_forgotten() {
        let mut w = StallWatch::default();
        let t0 = Instant::now();
        w.observe(t0, [sample(10, 5, false)]);
        report_until(&mut w, t0, t0 + STALL_AFTER, &[sample(10, 5, false)]);
        assert_eq!(w.stalled(), 1);
        assert!(w.observe(t0 + STALL_AFTER + Duration::from_secs(1), []).is_empty());
        assert_eq!(w.stalled(), 0);
    }
}
