//! The runtime's clock, injectable so tests can run on tokio's paused time.
//!
//! Processors never read a clock: the runtime passes `now_ms` in their `Context`, taken from a
//! [`Clock`]. Waits (retry backoffs, acknowledgement stalls, failure backoffs) always go through
//! `tokio::time`, which `tokio::time::pause` makes virtual; [`PausedClock`] derives the wall
//! time from the same virtual instant, so timers, retries and timeouts advance together.

use std::fmt::Debug;
use std::time::{SystemTime, UNIX_EPOCH};

/// Wall-clock time for the runtime: deadlines of timers, the `future_timestamp` admission rule,
/// record delay metrics.
pub trait Clock: Send + Sync + Debug {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> i64;
}

/// The system clock (`SystemTime`): what a deployed worker runs on.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        SystemTime::now().duration_since(UNIX_EPOCH).map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)).unwrap_or(0)
    }
}

/// A clock that starts at a fixed wall time and moves with `tokio::time::Instant`: under
/// `tokio::time::pause` it moves only when the test's sleeps and timeouts advance tokio's time.
#[derive(Debug, Clone, Copy)]
pub struct PausedClock {
    start_ms: i64,
    start: tokio::time::Instant,
}

impl PausedClock {
    /// A clock reading `start_ms` (ms since the Unix epoch) now. Call it inside the runtime whose
    /// time is paused.
    pub fn starting_at(start_ms: i64) -> PausedClock {
        PausedClock { start_ms, start: tokio::time::Instant::now() }
    }
}

impl Clock for PausedClock {
    fn now_ms(&self) -> i64 {
        let elapsed = i64::try_from(self.start.elapsed().as_millis()).unwrap_or(i64::MAX);
        self.start_ms.saturating_add(elapsed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn paused_clock_moves_with_tokio_time_only() {
        let clock = PausedClock::starting_at(1_000);
        assert_eq!(clock.now_ms(), 1_000);
        tokio::time::sleep(Duration::from_secs(300)).await;
        assert_eq!(clock.now_ms(), 301_000);
    }

    #[test]
    fn system_clock_is_after_2026() {
        assert!(SystemClock.now_ms() > 1_767_225_600_000);
    }
}
