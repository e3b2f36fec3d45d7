//! Stalled-partition watch: notices an input partition that has records waiting (consumer lag
//! > 0) but whose position has not moved for [`STALL_AFTER`], from librdkafka's statistics
//! reports (`statistics.interval.ms`, 1 s by default in the worker).
//!
//! A stall is reported once per episode (a warning with librdkafka's `fetch_state`, which tells
//! a fetcher stuck on its leader, `validate-epoch-wait`, `offset-wait`, from a paused one,
//! `active` with nothing fetched) and counted in `orderflow_stalled_partitions`; it ends when the
//! position moves or the lag drops to 0. Paused partitions (restoring, rewinding) are not watched.
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

/// Per-partition tracking across statistics reports.
#[derive(Debug, Default)]
pub struct StallWatch {
    tracks: HashMap<(String, i32), Track>,
}

impl StallWatch {
    /// Feeds one report's `samples` taken at `now`; returns the stalls that began or ended.
    /// Partitions missing from the report (revoked) are forgotten.
    pub fn observe<'a>(&mut self, now: Instant, samples: impl IntoIterator<Item = Sample<'a>>) -> Vec<Change> {
        let mut changes = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for s in samples {
            let key = (s.topic.to_string(), s.partition);
            seen.insert(key.clone());
            let waiting = s.lag > 0 && !s.paused;
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

    #[test]
    fn a_partition_with_lag_and_a_still_position_is_reported_once_after_the_threshold() {
        let mut w = StallWatch::default();
        let t0 = Instant::now();
        assert!(w.observe(t0, [sample(10, 5, false)]).is_empty());
        assert!(w.observe(t0 + STALL_AFTER - Duration::from_secs(1), [sample(10, 5, false)]).is_empty());
        let c = w.observe(t0 + STALL_AFTER, [sample(10, 5, false)]);
        assert!(matches!(&c[..], [Change::Stalled { position: 10, lag: 5, .. }]), "{c:?}");
        assert_eq!(w.stalled(), 1);
        assert!(w.observe(t0 + STALL_AFTER * 2, [sample(10, 5, false)]).is_empty(), "reported once per episode");
        let c = w.observe(t0 + STALL_AFTER * 2, [sample(11, 4, false)]);
        assert!(matches!(&c[..], [Change::Resumed { position: 11, .. }]), "{c:?}");
        assert_eq!(w.stalled(), 0);
    }

    #[test]
    fn moving_idle_or_paused_partitions_are_never_reported() {
        let mut w = StallWatch::default();
        let t0 = Instant::now();
        for i in 0..10 {
            let now = t0 + STALL_AFTER * i;
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
    fn a_revoked_partition_is_forgotten() {
        let mut w = StallWatch::default();
        let t0 = Instant::now();
        w.observe(t0, [sample(10, 5, false)]);
        w.observe(t0 + STALL_AFTER, [sample(10, 5, false)]);
        assert_eq!(w.stalled(), 1);
        assert!(w.observe(t0 + STALL_AFTER * 2, []).is_empty());
        assert_eq!(w.stalled(), 0);
    }
}
