//! The size check of the CLI's producers (issue 20): every record a command would produce is
//! checked against its target topic's limit ([`orderflow_runtime::limits`]) before the first one
//! is produced, and the command refuses the whole batch, naming each record over the limit, the
//! topic and the limit. One helper for every command that produces (`dlq redrive`, `replay
//! --into`, `demo`).

use anyhow::{bail, Result};
use orderflow_runtime::limits::{self, Limits, Oversized};
use orderflow_runtime::topology::BrokerConfig;

/// Records over their limit listed in the error (all are counted).
const LISTED: usize = 10;

/// The size limits of the topics a command produces to: the producer's `message.max.bytes` and
/// each topic's `max.message.bytes` ([`limits::lookup`]). A broker that cannot describe the
/// topics (it does not implement DescribeConfigs, or a topic is missing) leaves the producer's
/// limit alone, with a warning on stderr.
///
/// Errors: the producer configuration's `message.max.bytes` is not a byte count.
pub async fn topic_limits(broker: &BrokerConfig, topics: &[String]) -> Result<Limits> {
    match limits::lookup(broker, topics).await {
        Ok(l) => Ok(l),
        Err(e @ limits::LimitError::Producer { .. }) => Err(e.into()),
        Err(e) => {
            eprintln!("warning: {e}; checking record sizes against the producer's message.max.bytes only");
            Ok(Limits::producer_only(broker)?)
        }
    }
}

/// A batch of records checked before any is produced: feed every record to [`SizeCheck::record`],
/// then [`SizeCheck::finish`] refuses the batch if any was over its topic's limit.
#[derive(Debug)]
pub struct SizeCheck {
    limits: Limits,
    checked: u64,
    oversized: u64,
    listed: Vec<(String, Oversized)>,
}

impl SizeCheck {
    /// A check against `limits` ([`topic_limits`]).
    pub fn new(limits: Limits) -> SizeCheck {
        SizeCheck { limits, checked: 0, oversized: 0, listed: Vec::new() }
    }

    /// The limits checked against.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Checks one record for `topic`: `key`, `value` (`None`: a tombstone) and `headers` (name,
    /// value) as they would be produced; `what` names the record in the error (called only for
    /// a record over the limit, e.g. its source coordinates). Returns whether it fits.
    pub fn record<'a>(
        &mut self,
        what: impl FnOnce() -> String,
        topic: &str,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: impl IntoIterator<Item = (&'a str, Option<&'a [u8]>)>,
    ) -> bool {
        self.checked += 1;
        match self.limits.check(topic, key, value, headers) {
            Ok(()) => true,
            Err(e) => {
                self.oversized += 1;
                if self.listed.len() < LISTED {
                    self.listed.push((what(), e));
                }
                false
            }
        }
    }

    /// Records over their limit so far.
    pub fn oversized(&self) -> u64 {
        self.oversized
    }

    /// Ends the check.
    ///
    /// Errors: when any record was over its topic's limit: how many of how many, and for the
    /// first [`LISTED`] of them which record, the topic, its size and the limit with where it
    /// comes from; nothing was produced.
    pub fn finish(self) -> Result<()> {
        if self.oversized == 0 {
            return Ok(());
        }
        let mut lines: Vec<String> = self.listed.iter().map(|(what, e)| format!("  {what}: {e}")).collect();
        if self.oversized > self.listed.len() as u64 {
            lines.push(format!("  … and {} more", self.oversized - self.listed.len() as u64));
        }
        bail!(
            "refusing to produce: {} of {} record(s) exceed their topic's size limit, which the broker or the producer would refuse \
             (README \"Record size limits\"); nothing was produced:\n{}",
            self.oversized,
            self.checked,
            lines.join("\n")
        )
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn a_batch_with_one_record_over_the_limit_is_refused_whole() {
        let limits = Limits { producer_message_max_bytes: 1_000_000, topics: BTreeMap::from([("small".to_string(), 4096)]) };
        let mut check = SizeCheck::new(limits);
        assert!(check.record(|| "a".into(), "small", Some(b"k"), Some(&[0; 100]), []));
        assert!(!check.record(|| "b/0/7".into(), "small", Some(b"k"), Some(&[0; 10_000]), []));
        assert!(check.record(|| "c".into(), "other", None, Some(&[0; 10_000]), []));
        assert_eq!(check.oversized(), 1);
        let e = check.finish().unwrap_err().to_string();
        assert!(e.contains("1 of 3 record(s)"), "{e}");
        assert!(e.contains("b/0/7: value of 10000 bytes for small exceeds its limit of"), "{e}");
        assert!(e.contains("topic max.message.bytes 4096"), "{e}");
        assert!(e.contains("nothing was produced"), "{e}");
    }

    #[test]
    fn many_records_over_the_limit_are_counted_and_some_listed() {
        let limits = Limits { producer_message_max_bytes: 1000, topics: BTreeMap::new() };
        let mut check = SizeCheck::new(limits);
        for i in 0..25 {
            check.record(|| format!("r{i}"), "t", None, Some(&[0; 2000]), []);
        }
        let e = check.finish().unwrap_err().to_string();
        assert!(e.contains("25 of 25"), "{e}");
        assert!(e.contains("… and 15 more"), "{e}");
        assert_eq!(SizeCheck::new(Limits { producer_message_max_bytes: 1000, topics: BTreeMap::new() }).finish().ok(), Some(()));
    }
}
