//! The relay's settings: the keys of an `outbox-relay` worker entry in `topology.toml` beyond the
//! common ones (`kind`, `outputs`, `guarantee`...).

use std::time::Duration;

use serde::Deserialize;

use crate::row::RetryPolicy;

/// Environment variable that overrides `database_url` (so credentials stay out of
/// `topology.toml`; a Kubernetes Secret sets it).
pub const DATABASE_URL_ENV: &str = "ORDERFLOW_DATABASE_URL";

/// An `outbox-relay` worker's settings (README "Outbox relay"). Durations are humantime
/// strings (`"200ms"`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `postgres://…`, `mysql://…` / `mariadb://…` or `sqlite:…`; [`DATABASE_URL_ENV`] wins.
    /// Default ([`DEFAULT_DATABASE_URL`]): the embedded SQLite database of the demo, as
    /// `outbox.db` in the topology's `state_dir` ([`Config::url_in`]).
    #[serde(default = "default_url")]
    pub database_url: String,
    /// Rows claimed and published per round (default 500).
    #[serde(default = "default_batch")]
    pub batch_size: i64,
    /// How often an idle relay looks for rows (default 200 ms); on PostgreSQL a `LISTEN` on
    /// `orderflow_outbox` wakes it as soon as a writer commits.
    #[serde(default = "default_poll", with = "humantime_serde")]
    pub poll_interval: Duration,
    /// How long a claim holds rows (default 30 s): rows of a relay that died are claimed by
    /// another after it. Renewed before each publish attempt.
    #[serde(default = "default_lease", with = "humantime_serde")]
    pub claim_lease: Duration,
    /// Failed attempts after which a row is `QUARANTINED` (seed 003: 6).
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    /// Wait after a row's first failure (default 1 s), doubled per further failure.
    #[serde(default = "default_backoff", with = "humantime_serde")]
    pub retry_backoff: Duration,
    /// Longest wait between two attempts of a row (default 1 min).
    #[serde(default = "default_backoff_max", with = "humantime_serde")]
    pub retry_backoff_max: Duration,
    /// `COMPLETED` rows are deleted this long after they were published (default 7 d; `0s`
    /// keeps them).
    #[serde(default = "default_retention", with = "humantime_serde")]
    pub completed_retention: Duration,
    /// Database connections of one relay instance (default 4).
    #[serde(default = "default_pool")]
    pub pool_size: u32,
}

/// The default `database_url`: SQLite, `outbox.db` in the state dir (`.state` unless
/// `ORDERFLOW_STATE_DIR` or the topology says otherwise; [`Config::url_in`]).
pub const DEFAULT_DATABASE_URL: &str = "sqlite://.state/outbox.db?mode=rwc";

fn default_url() -> String {
    DEFAULT_DATABASE_URL.into()
}
fn default_batch() -> i64 {
    500
}
fn default_poll() -> Duration {
    Duration::from_millis(200)
}
fn default_lease() -> Duration {
    Duration::from_secs(30)
}
fn default_attempts() -> u32 {
    6
}
fn default_backoff() -> Duration {
    Duration::from_secs(1)
}
fn default_backoff_max() -> Duration {
    Duration::from_secs(60)
}
fn default_retention() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}
fn default_pool() -> u32 {
    4
}

impl Default for Config {
    fn default() -> Self {
        toml::Value::Table(Default::default()).try_into().expect("defaults")
    }
}

impl Config {
    /// Checks the values.
    ///
    /// Errors: a message naming the key.
    pub fn validate(&self) -> Result<(), String> {
        crate::store::Dialect::of_url(&self.database_url).map_err(|e| format!("database_url: {e}"))?;
        if !(1..=10_000).contains(&self.batch_size) {
            return Err(format!("batch_size {} must be within 1..=10000", self.batch_size));
        }
        if self.max_attempts == 0 {
            return Err("max_attempts must be at least 1".into());
        }
        if self.claim_lease < Duration::from_secs(1) {
            return Err("claim_lease must be at least 1s".into());
        }
        if self.poll_interval.is_zero() {
            return Err("poll_interval must be above 0".into());
        }
        if self.retry_backoff > self.retry_backoff_max {
            return Err("retry_backoff must not exceed retry_backoff_max".into());
        }
        if self.pool_size == 0 {
            return Err("pool_size must be at least 1".into());
        }
        Ok(())
    }

    /// The database URL in force: [`DATABASE_URL_ENV`] when set, else `database_url`.
    pub fn url(&self) -> String {
        std::env::var(DATABASE_URL_ENV).ok().filter(|s| !s.is_empty()).unwrap_or_else(|| self.database_url.clone())
    }

    /// [`Config::url`], with the default SQLite file placed in `state_dir` (the topology's
    /// `[defaults] state_dir` after `ORDERFLOW_STATE_DIR`), so each test's or pod's state folder
    /// holds its own embedded outbox.
    pub fn url_in(&self, state_dir: &std::path::Path) -> String {
        let url = self.url();
        if url == DEFAULT_DATABASE_URL {
            format!("sqlite://{}?mode=rwc", state_dir.join("outbox.db").display())
        } else {
            url
        }
    }

    /// The row retry policy (seed 003).
    pub fn retry(&self) -> RetryPolicy {
        RetryPolicy {
            max_attempts: self.max_attempts,
            initial_backoff: self.retry_backoff,
            multiplier: 2.0,
            max_backoff: self.retry_backoff_max,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_seed() {
        let c = Config::default();
        assert_eq!(c.max_attempts, 6);
        c.validate().unwrap();
    }

    #[test]
    fn the_default_sqlite_file_lives_in_the_state_dir() {
        let c = Config::default();
        if std::env::var(DATABASE_URL_ENV).is_err() {
            assert_eq!(c.url_in(std::path::Path::new("/s/t")), "sqlite:///s/t/outbox.db?mode=rwc");
            let pg = Config { database_url: "postgres://u@h/db".into(), ..Config::default() };
            assert_eq!(pg.url_in(std::path::Path::new("/s/t")), "postgres://u@h/db");
        }
    }

    #[test]
    fn bad_values_are_named() {
        let parse = |s: &str| -> Result<Config, String> { toml::from_str::<Config>(s).map_err(|e| e.to_string()) };
        assert!(parse("database_urll = \"x\"").unwrap_err().contains("database_urll"));
        let c = parse("database_url = \"oracle://x\"").unwrap();
        assert!(c.validate().unwrap_err().contains("database_url"));
        let c = parse("max_attempts = 0").unwrap();
        assert!(c.validate().unwrap_err().contains("max_attempts"));
    }
}
