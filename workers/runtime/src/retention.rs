//! Bounded state (issue 13): closed business records and remembered `eventId`s are forgotten
//! after the worker's `state_retention` (topology; default 7 days,
//! [`orderflow_api::DEFAULT_STATE_RETENTION`]), locally and in the changelog.
//!
//! Two mechanisms, both broker-free (the [`step`](crate::step) runs them, so live processing and
//! `replay --through` forget alike):
//! - **closed records**: a processor calls [`orderflow_api::forget_later`] when it closes a record
//!   (a settled reservation, a completed saga); a durable timer deletes the key at the deadline,
//!   a `d` tombstone in the changelog.
//! - **remembered `eventId`s** ride in the changelog's commit markers, never as records of their
//!   own (module docs of [`changelog`](crate::changelog)), so they are forgotten a marker at a
//!   time: a local, time-ordered *marker index* lists every marker that carries ids, and the
//!   runtime's sweep punctuation ([`SWEEP_TIMER`], every [`sweep_interval_ms`]) deletes the ids
//!   of each marker whose newest id is older than the retention and tombstones the marker. No
//!   record per id, on the way in or out.
//!
//! Index keys, in the shard's state but never written to the changelog as data:
//! - `\x00mk/<marker key>` → `[time i64 BE][u32 BE n][n × (u16 BE length, eventId)]`;
//! - `\x00mt/<time u64 BE><marker key>` → empty: the same markers ordered by time, for the sweep.
//!
//! `time` is the newest remembered time (the values of the marker's `eventId`s, the processing
//! time they were seen at). A unit indexes its marker when it commits ([`index`], from the
//! marker record itself); a restore indexes each marker it applies, so a shard rebuilt from the
//! changelog sweeps what the lost one would have. The deletion of `\x00mk/<K>` is written to the
//! changelog as the tombstone of marker `K` (`changelog::records`); a restore that reads such a
//! tombstone after the marker deletes the ids the marker brought ([`forget_marker`]), and once
//! compaction has removed both, nothing brings them back.

use orderflow_api::{Changes, StateTxn, SEEN_PREFIX};

/// Prefix of the marker index: `\x00mk/<marker key>` → time and `eventId`s (module docs).
pub const MARKER_INDEX: &[u8] = b"\x00mk/";
/// Prefix of the time-ordered marker index: `\x00mt/<time u64 BE><marker key>` → empty.
pub const MARKER_TIMES: &[u8] = b"\x00mt/";
/// Timer key of the sweep punctuation (armed by a partition's first processed record).
pub const SWEEP_TIMER: &[u8] = b"\x00sweep";
/// Most markers one sweep forgets; with more due, the next sweep follows a second later, so a
/// backlog (after a long stop) is worked off without one huge unit.
pub const SWEEP_BATCH: usize = 1_000;

/// Time between sweeps for `retention_ms`: a tenth of it, between 1 s and 1 hour. State then
/// holds at most ~1.1 × the retention's worth of ids.
pub fn sweep_interval_ms(retention_ms: i64) -> i64 {
    (retention_ms / 10).clamp(1_000, 3_600_000)
}

/// Whether `key` is a local index key (never written to the changelog as data).
pub fn is_local(key: &[u8]) -> bool {
    key.starts_with(MARKER_INDEX) || key.starts_with(MARKER_TIMES)
}

/// The marker key whose index entry `key` is (`\x00mk/<K>` → K).
pub fn indexed_marker(key: &[u8]) -> Option<&[u8]> {
    key.strip_prefix(MARKER_INDEX)
}

fn index_key(marker: &[u8]) -> Vec<u8> {
    [MARKER_INDEX, marker].concat()
}

fn time_key(time: i64, marker: &[u8]) -> Vec<u8> {
    [MARKER_TIMES, &(time.max(0) as u64).to_be_bytes(), marker].concat()
}

/// Stages the index entries of marker `marker` carrying `seen` (full state keys under
/// [`SEEN_PREFIX`] → values, as `changelog` decodes them). Nothing for a marker without ids.
pub fn index(marker: &[u8], seen: &[(Vec<u8>, Vec<u8>)], changes: &mut Changes) {
    if seen.is_empty() {
        return;
    }
    let time = seen.iter().filter_map(|(_, v)| Some(i64::from_be_bytes(v.as_slice().try_into().ok()?))).max().unwrap_or(0);
    let mut value = time.to_be_bytes().to_vec();
    value.extend_from_slice(&(seen.len() as u32).to_be_bytes());
    for (k, _) in seen {
        let id = k.strip_prefix(SEEN_PREFIX).unwrap_or(k);
        value.extend_from_slice(&(id.len().min(u16::MAX as usize) as u16).to_be_bytes());
        value.extend_from_slice(&id[..id.len().min(u16::MAX as usize)]);
    }
    changes.writes.insert(index_key(marker), Some(value));
    changes.writes.insert(time_key(time, marker), Some(Vec::new()));
}

/// Decodes an index value into its time and `eventId`s (`None`: not an index value).
fn decode(value: &[u8]) -> Option<(i64, Vec<&[u8]>)> {
    let time = i64::from_be_bytes(value.get(..8)?.try_into().ok()?);
    let n = u32::from_be_bytes(value.get(8..12)?.try_into().ok()?) as usize;
    let mut rest = &value[12..];
    let mut ids = Vec::with_capacity(n.min(1 << 16));
    for _ in 0..n {
        let len = u16::from_be_bytes(rest.get(..2)?.try_into().ok()?) as usize;
        ids.push(rest.get(2..2 + len)?);
        rest = &rest[2 + len..];
    }
    Some((time, ids))
}

/// Stages the forgetting of marker `marker`: its remembered `eventId`s and both index entries
/// (the deletion of `\x00mk/<marker>` becomes the marker's tombstone in the changelog). Nothing
/// when the marker is not indexed (already forgotten, or compacted away before this shard saw
/// it). Returns the number of ids forgotten.
pub fn forget_marker(state: &mut StateTxn, marker: &[u8]) -> usize {
    let key = index_key(marker);
    let Some(value) = state.get(&key) else { return 0 };
    let Some((time, ids)) = decode(&value) else {
        tracing::warn!(marker = ?marker, "undecodable marker index entry; dropping it");
        state.delete(key);
        return 0;
    };
    let n = ids.len();
    for id in ids {
        state.delete([SEEN_PREFIX, id].concat());
    }
    state.delete(key);
    state.delete(time_key(time, marker));
    n
}

/// What one sweep did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    /// Markers tombstoned.
    pub markers: usize,
    /// Remembered `eventId`s forgotten.
    pub ids: usize,
}

/// The sweep punctuation at `now_ms`: forgets (up to [`SWEEP_BATCH`]) markers whose newest
/// `eventId` was seen more than `retention_ms` ago and schedules the next sweep.
pub fn sweep(state: &mut StateTxn, now_ms: i64, retention_ms: i64) -> Swept {
    let cutoff = now_ms.saturating_sub(retention_ms);
    let due = state.scan_range(MARKER_TIMES, &time_key(cutoff.saturating_add(1), &[]), SWEEP_BATCH);
    let mut swept = Swept::default();
    for (k, _) in &due {
        let marker = &k[MARKER_TIMES.len() + 8..];
        swept.ids += forget_marker(state, marker);
        state.delete(k.clone());
        swept.markers += 1;
    }
    let next = if due.len() == SWEEP_BATCH { 1_000 } else { sweep_interval_ms(retention_ms) };
    state.schedule_timer(SWEEP_TIMER, now_ms.saturating_add(next));
    swept
}

/// Arms the sweep of a partition that has none scheduled (its first unit with records).
pub fn arm(state: &mut StateTxn, now_ms: i64, retention_ms: i64) {
    if state.timer(SWEEP_TIMER).is_none() {
        state.schedule_timer(SWEEP_TIMER, now_ms.saturating_add(sweep_interval_ms(retention_ms)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use orderflow_api::{seen_key, MemoryStore, StateRead};

    fn seen(ids: &[(&str, i64)]) -> Vec<(Vec<u8>, Vec<u8>)> {
        ids.iter().map(|(id, at)| (seen_key(id), at.to_be_bytes().to_vec())).collect()
    }

    /// A store holding two markers' ids and their index entries, as a restore leaves it.
    fn store() -> MemoryStore {
        let mut c = Changes::default();
        for (marker, ids) in [(&b"m-old"[..], seen(&[("a", 100), ("b", 200)])), (&b"m-new"[..], seen(&[("c", 5_000)]))] {
            c.writes.extend(ids.iter().map(|(k, v)| (k.clone(), Some(v.clone()))));
            index(marker, &ids, &mut c);
        }
        let mut s = MemoryStore::default();
        s.apply(c);
        s
    }

    #[test]
    fn a_sweep_forgets_the_ids_of_markers_older_than_the_retention_and_tombstones_them() {
        let s = store();
        let mut txn = StateTxn::new(&s);
        let swept = sweep(&mut txn, 1_200, 1_000);
        assert_eq!(swept, Swept { markers: 1, ids: 2 });
        assert_eq!(txn.get(&seen_key("a")), None);
        assert_eq!(txn.get(&seen_key("b")), None);
        assert!(txn.get(&seen_key("c")).is_some(), "a marker within the retention stays");
        assert_eq!(txn.get(&index_key(b"m-old")), None, "the index deletion the changelog turns into the marker's tombstone");
        assert_eq!(txn.timer(SWEEP_TIMER), Some(1_200 + sweep_interval_ms(1_000)));
        assert_eq!(sweep(&mut txn, 1_200, 1_000), Swept::default(), "nothing twice");
        assert_eq!(sweep(&mut txn, 6_001, 1_000), Swept { markers: 1, ids: 1 });
        let mut after = s.clone();
        after.apply(txn.into_changes());
        assert!(after.data.is_empty(), "nothing left: {:?}", after.data.keys().collect::<Vec<_>>());
    }

    #[test]
    fn a_marker_is_due_when_its_newest_id_is() {
        let s = store();
        let mut txn = StateTxn::new(&s);
        assert_eq!(sweep(&mut txn, 1_199, 1_000), Swept::default(), "b (200) is within the retention at 1199");
    }

    #[test]
    fn forgetting_an_unindexed_marker_does_nothing() {
        let s = store();
        let mut txn = StateTxn::new(&s);
        assert_eq!(forget_marker(&mut txn, b"m-unknown"), 0);
        assert!(txn.changes().is_empty());
    }

    #[test]
    fn a_backlog_is_swept_in_batches() {
        let mut c = Changes::default();
        for i in 0..SWEEP_BATCH + 5 {
            index(format!("m{i:05}").as_bytes(), &seen(&[(&format!("id{i}"), 1)]), &mut c);
        }
        let mut s = MemoryStore::default();
        s.apply(c);
        let mut txn = StateTxn::new(&s);
        assert_eq!(sweep(&mut txn, 10_000_000, 1_000).markers, SWEEP_BATCH);
        assert_eq!(txn.timer(SWEEP_TIMER), Some(10_001_000), "the rest follows a second later");
        assert_eq!(sweep(&mut txn, 10_001_000, 1_000).markers, 5);
        assert!(StateRead::scan_prefix(&txn, MARKER_TIMES).is_empty());
    }
}
