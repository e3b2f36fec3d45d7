//! The shadow state: one partition's worker state rebuilt in memory from its changelog up to the
//! range start ([`ShadowBuilder`]).

use std::collections::BTreeMap;

use orderflow_api::MemoryStore;
use orderflow_runtime::changelog::{decode_offsets, decode_record, Entry, TAG_DATA, TAG_MARKER, TAG_TIMER};
use orderflow_runtime::topology::Guarantee;
use serde::Serialize;

// ------------------------------------------------------------------------------------------
// Shadow state from the changelog.

/// What the rebuild of one partition's shadow did (part of the summary).
#[derive(Debug, Clone, Default, Serialize)]
pub struct ShadowReport {
    /// Input (and changelog) partition.
    pub partition: i32,
    /// First replayed offset of the input topic.
    pub range_from: i64,
    /// Changelog offsets read, `[low, high)`.
    pub changelog_low: i64,
    pub changelog_high: i64,
    /// Changelog records used: up to the marker of the first unit past the range start (the
    /// rest of the partition is read and ignored).
    pub records: u64,
    /// Units (commit markers) applied.
    pub units: u64,
    /// Next input offset of the replayed topic after the last applied unit (0 when none): the
    /// shadow is the live state just before this offset; `[position, range_from)` is warmed up.
    pub position: i64,
    /// Records of the replayed topic processed silently between `position` and `range_from`.
    pub warmed_up: u64,
    /// Records read after the last applied unit and not applied (that unit's, or later ones).
    pub not_applied: u64,
    /// True when the shadow may differ from the live state before the range (see `notes`).
    pub approximate: bool,
    /// Why the shadow is approximate, or what else the rebuild noticed.
    pub notes: Vec<String>,
}

/// A gathered changelog record: key (with its tag byte), value (`None`: tombstone) and the
/// replayed topic's input position it carries (`None` for a tombstone).
type Pending = (Vec<u8>, Option<Vec<u8>>, Option<i64>);

/// Rebuilds one partition's shadow from its changelog records, fed in offset order with
/// [`ShadowBuilder::push`].
///
/// Rules: records are gathered per unit; at a commit marker, the unit is applied when the
/// marker's next offset of the replayed topic (the previous position when the marker does not
/// name the topic: a timer-only unit, or a unit of another input) is ≤ the range start. At the
/// first marker past the range start the rebuild stops. Records after the last marker belong to a
/// unit that never committed and are dropped (the live restore does the same).
///
/// Limits, reported as `approximate` with a note:
/// - the changelog's low watermark is above 0, or offsets are missing between records (log
///   compaction keeps only the newest record of each key, including the marker `m`; retention
///   may delete the oldest): a key whose last pre-range record was superseded by a later one is
///   missing from the shadow, and several units' records arrive without their markers. Records
///   gathered when the rebuild stops are then applied when they carry a position ≤ the range
///   start (every non-tombstone record carries its unit's input offsets), tombstones are not.
///   Under `exactly_once`, transaction markers also leave offset gaps, so gaps are not reported
///   for that guarantee;
/// - a worker with several inputs: the warm-up replays only the replayed topic, so a unit that
///   mixed inputs and ended past the range start is missing the other topics' records.
pub struct ShadowBuilder {
    inputs: Vec<String>,
    topic: String,
    from: i64,
    exactly_once: bool,
    store: MemoryStore,
    pending: Vec<Pending>,
    next_expected: Option<i64>,
    done: bool,
    gaps: u64,
    report: ShadowReport,
}

impl ShadowBuilder {
    /// A builder for partition `partition` of input `topic` (one of the worker's `inputs`), whose
    /// range starts at offset `from`; `low`/`high` are the changelog partition's watermarks.
    pub fn new(inputs: &[String], topic: &str, partition: i32, from: i64, (low, high): (i64, i64), guarantee: Guarantee) -> ShadowBuilder {
        let mut report = ShadowReport { partition, range_from: from, changelog_low: low, changelog_high: high, ..Default::default() };
        if low > 0 {
            report.approximate = true;
            report.notes.push(format!(
                "the changelog starts at offset {low}: its first records were removed (retention or compaction); keys last written there are missing"
            ));
        }
        ShadowBuilder {
            inputs: inputs.to_vec(),
            topic: topic.to_string(),
            from,
            exactly_once: guarantee == Guarantee::ExactlyOnce,
            store: MemoryStore::default(),
            pending: Vec::new(),
            next_expected: Some(low),
            done: false,
            gaps: 0,
            report,
        }
    }

    /// Feeds the changelog record at `offset` (`value == None`: a tombstone). Records after the
    /// rebuild stopped are ignored.
    ///
    /// Errors: a record that does not decode (unknown key tag, bad version, bad offsets).
    pub fn push(&mut self, offset: i64, key: &[u8], value: Option<&[u8]>) -> std::result::Result<(), String> {
        if self.done {
            return Ok(());
        }
        self.report.records += 1;
        if let Some(expected) = self.next_expected {
            if offset > expected && !self.exactly_once {
                self.gaps += (offset - expected) as u64;
            }
        }
        self.next_expected = Some(offset + 1);
        let at = |e: String| format!("changelog offset {offset}: {e}");
        let position_of = |offsets: &BTreeMap<String, i64>, current: i64| offsets.get(&self.topic).copied().unwrap_or(current);
        match key.first() {
            Some(&TAG_DATA) | Some(&TAG_TIMER) => {
                let pos = match value {
                    Some(v) => Some(position_of(&decode_offsets(&self.inputs, v).map_err(at)?.0, self.report.position)),
                    None => None,
                };
                self.pending.push((key.to_vec(), value.map(<[u8]>::to_vec), pos));
            }
            Some(&TAG_MARKER) => match decode_record(&self.inputs, key, value).map_err(at)? {
                Entry::MarkerGone { .. } => self.pending.push((key.to_vec(), None, None)),
                Entry::Marker { offsets, seen } => {
                    let pos = position_of(&offsets, self.report.position);
                    if pos <= self.from {
                        let pending = std::mem::take(&mut self.pending);
                        self.apply(pending.into_iter().map(|(k, v, _)| (k, v)), Some((key, seen)))?;
                        self.report.units += 1;
                        self.report.position = pos;
                    } else {
                        self.stop()?;
                    }
                }
                _ => return Err(at("an m… key that is not a commit marker".into())),
            },
            _ => return Err(at(format!("unknown changelog key {key:?}"))),
        }
        Ok(())
    }

    /// Stops at the first unit past the range start; with gaps seen (compaction), applies the
    /// gathered records that carry a position ≤ the range start.
    fn stop(&mut self) -> std::result::Result<(), String> {
        self.done = true;
        let pending = std::mem::take(&mut self.pending);
        if self.gaps > 0 || self.report.changelog_low > 0 {
            let from = self.from;
            let (early, late): (Vec<_>, Vec<_>) = pending.into_iter().partition(|(_, _, pos)| pos.is_some_and(|p| p <= from));
            self.report.not_applied += late.len() as u64;
            if !early.is_empty() {
                self.report.notes.push(format!(
                    "{} record(s) of units whose markers were compacted away applied by their own input offsets",
                    early.len()
                ));
                self.apply(early.into_iter().map(|(k, v, _)| (k, v)), None)?;
            }
        } else {
            self.report.not_applied += pending.len() as u64;
        }
        Ok(())
    }

    /// Applies a unit's records, completed at its marker (`marker`: its key and remembered
    /// `eventId`s) as the live restore completes it (`changelog::apply_marker`).
    fn apply(
        &mut self,
        records: impl Iterator<Item = (Vec<u8>, Option<Vec<u8>>)>,
        marker: Option<(&[u8], orderflow_runtime::changelog::Seen)>,
    ) -> std::result::Result<(), String> {
        let mut changes = orderflow_api::Changes::default();
        let mut gone = Vec::new();
        for (key, value) in records {
            match decode_record(&self.inputs, &key, value.as_deref())? {
                Entry::Data { key, value, .. } => {
                    changes.writes.insert(key, value);
                }
                Entry::Timer { key, deadline, .. } => {
                    changes.timers.insert(key, deadline);
                }
                Entry::MarkerGone { key } => gone.push(key),
                Entry::Marker { .. } => return Err("a commit marker among a unit's records".into()),
            }
        }
        let (key, seen) = marker.unwrap_or((b"m", Vec::new()));
        orderflow_runtime::changelog::apply_marker(&self.store, key, seen, &gone, &mut changes);
        self.store.apply(changes);
        Ok(())
    }

    /// The shadow store and the report. Records after the last marker (a unit that never
    /// committed, or the stopping unit) are not applied.
    pub fn finish(mut self) -> (MemoryStore, ShadowReport) {
        if !self.done {
            self.report.not_applied += self.pending.len() as u64;
        }
        if self.gaps > 0 {
            self.report.approximate = true;
            self.report.notes.push(format!(
                "{} changelog offset(s) missing between records (log compaction): markers and superseded records are gone, so the shadow is approximate",
                self.gaps
            ));
        }
        (self.store, self.report)
    }
}
