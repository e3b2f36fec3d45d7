//! Staged state: reads go through an overlay of uncommitted writes to the durable base.

use std::collections::BTreeMap;

use serde::{de::DeserializeOwned, Serialize};

use crate::ProcessError;

/// Read access to the durable state of one shard (a task: one input partition number). `Sync`,
/// so a unit's staged transactions can be held across the runtime's waits (retry backoffs).
pub trait StateRead: Sync {
    /// The stored value of `key`.
    fn get(&self, key: &[u8]) -> Option<Vec<u8>>;
    /// The deadline (ms since the epoch) of timer `key`, if scheduled.
    fn timer(&self, key: &[u8]) -> Option<i64>;
    /// Timers with a deadline ≤ `now_ms`, as `(key, deadline)`, earliest first.
    fn due_timers(&self, now_ms: i64) -> Vec<(Vec<u8>, i64)>;
    /// Stored `(key, value)` pairs with `from ≤ key < to`, in key order, at most `limit` of them.
    /// For punctuations over a shard (the stock reserver's reconciliation, the runtime's
    /// retention sweep), not for per-record processing.
    fn scan_range(&self, from: &[u8], to: &[u8], limit: usize) -> Vec<(Vec<u8>, Vec<u8>)>;

    /// Every stored `(key, value)` whose key starts with `prefix`, in key order. Reads the whole
    /// range ([`StateRead::scan_range`] without a limit). `prefix` must hold a byte below `0xff`
    /// (every state key prefix here does; panics otherwise).
    fn scan_prefix(&self, prefix: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
        let end = prefix_end(prefix).expect("a scan prefix with a byte below 0xff");
        self.scan_range(prefix, &end, usize::MAX)
    }
}

/// The smallest key greater than every key starting with `prefix` (`None` when `prefix` is all
/// `0xff` bytes or empty).
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

impl<T: StateRead + ?Sized> StateRead for &T {
    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        (**self).get(key)
    }
    fn timer(&self, key: &[u8]) -> Option<i64> {
        (**self).timer(key)
    }
    fn due_timers(&self, now_ms: i64) -> Vec<(Vec<u8>, i64)> {
        (**self).due_timers(now_ms)
    }
    fn scan_range(&self, from: &[u8], to: &[u8], limit: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
        (**self).scan_range(from, to, limit)
    }
}

/// Staged changes of one unit of work: `None` deletes.
#[derive(Debug, Default, Clone)]
pub struct Changes {
    /// Key → new value (or deletion).
    pub writes: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    /// Timer key → new deadline ms (or cancellation).
    pub timers: BTreeMap<Vec<u8>, Option<i64>>,
}

impl Changes {
    /// True when nothing is staged.
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty() && self.timers.is_empty()
    }
}

/// A transaction over one state shard: writes and timer changes are staged in memory and become
/// durable only when the runtime commits the unit of work.
pub struct StateTxn<'a> {
    base: &'a dyn StateRead,
    changes: Changes,
    journal: Vec<Undo>,
}

enum Undo {
    Write(Vec<u8>, Option<Option<Vec<u8>>>),
    Timer(Vec<u8>, Option<Option<i64>>),
}

impl StateRead for StateTxn<'_> {
    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        StateTxn::get(self, key)
    }
    fn timer(&self, key: &[u8]) -> Option<i64> {
        StateTxn::timer(self, key)
    }
    fn due_timers(&self, now_ms: i64) -> Vec<(Vec<u8>, i64)> {
        StateTxn::due_timers(self, now_ms)
    }
    /// The durable entries in range with the staged writes and deletions laid over them.
    fn scan_range(&self, from: &[u8], to: &[u8], limit: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
        let staged: Vec<_> = self.changes.writes.range(from.to_vec()..to.to_vec()).collect();
        let deleted = staged.iter().filter(|(_, v)| v.is_none()).count();
        // Staged deletions may hide up to `deleted` durable entries: read that many more.
        let mut merged: BTreeMap<Vec<u8>, Vec<u8>> = self.base.scan_range(from, to, limit.saturating_add(deleted)).into_iter().collect();
        for (k, v) in staged {
            match v {
                Some(v) => merged.insert(k.clone(), v.clone()),
                None => merged.remove(k),
            };
        }
        merged.into_iter().take(limit).collect()
    }
}

/// A point to roll back to (see [`StateTxn::rollback_to`]).
#[derive(Debug, Clone, Copy)]
pub struct Savepoint(usize);

impl<'a> StateTxn<'a> {
    /// A transaction with nothing staged over `base`.
    pub fn new(base: &'a dyn StateRead) -> Self {
        StateTxn { base, changes: Changes::default(), journal: Vec::new() }
    }

    /// The value of `key`, staged writes first.
    pub fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        match self.changes.writes.get(key) {
            Some(staged) => staged.clone(),
            None => self.base.get(key),
        }
    }

    /// Stages `key = value`.
    pub fn put(&mut self, key: impl Into<Vec<u8>>, value: Vec<u8>) {
        let key = key.into();
        let prev = self.changes.writes.insert(key.clone(), Some(value));
        self.journal.push(Undo::Write(key, prev));
    }

    /// Stages the deletion of `key`.
    pub fn delete(&mut self, key: impl Into<Vec<u8>>) {
        let key = key.into();
        let prev = self.changes.writes.insert(key.clone(), None);
        self.journal.push(Undo::Write(key, prev));
    }

    /// Every `(key, value)` whose key starts with `prefix` as this transaction sees it: the
    /// durable entries with the staged writes and deletions laid over them, in key order.
    pub fn scan_prefix(&self, prefix: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
        StateRead::scan_prefix(self, prefix)
    }

    /// `(key, value)` pairs with `from ≤ key < to` as this transaction sees them, in key order,
    /// at most `limit` ([`StateRead::scan_range`]).
    pub fn scan_range(&self, from: &[u8], to: &[u8], limit: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
        StateRead::scan_range(self, from, to, limit)
    }

    /// Reads `key` as JSON.
    ///
    /// Errors: [`ProcessError::CorruptState`] when the stored bytes are not a `T`.
    pub fn get_json<T: DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, ProcessError> {
        match self.get(key) {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| ProcessError::CorruptState { key: String::from_utf8_lossy(key).into_owned(), message: e.to_string() }),
        }
    }

    /// Stages `key = value` serialised as JSON.
    pub fn put_json<T: Serialize>(&mut self, key: impl Into<Vec<u8>>, value: &T) {
        self.put(key, serde_json::to_vec(value).expect("state values serialise"));
    }

    /// Schedules (or moves) timer `key` to fire at `at_ms` (ms since the epoch). Durable with the
    /// unit of work, so a restart does not forget it.
    pub fn schedule_timer(&mut self, key: impl Into<Vec<u8>>, at_ms: i64) {
        let key = key.into();
        let prev = self.changes.timers.insert(key.clone(), Some(at_ms));
        self.journal.push(Undo::Timer(key, prev));
    }

    /// Cancels timer `key` (no-op if none).
    pub fn cancel_timer(&mut self, key: &[u8]) {
        let prev = self.changes.timers.insert(key.to_vec(), None);
        self.journal.push(Undo::Timer(key.to_vec(), prev));
    }

    /// The deadline of timer `key`, staged changes first.
    pub fn timer(&self, key: &[u8]) -> Option<i64> {
        match self.changes.timers.get(key) {
            Some(staged) => *staged,
            None => self.base.timer(key),
        }
    }

    /// Timers due at `now_ms` (staged changes applied), earliest first.
    pub fn due_timers(&self, now_ms: i64) -> Vec<(Vec<u8>, i64)> {
        let mut due: Vec<(Vec<u8>, i64)> =
            self.base.due_timers(now_ms).into_iter().filter(|(k, _)| !self.changes.timers.contains_key(k)).collect();
        due.extend(self.changes.timers.iter().filter_map(|(k, at)| at.filter(|at| *at <= now_ms).map(|at| (k.clone(), at))));
        due.sort_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(&b.0)));
        due
    }

    /// Marks the current point so later changes can be undone.
    pub fn savepoint(&self) -> Savepoint {
        Savepoint(self.journal.len())
    }

    /// Undoes every change staged after `mark`.
    pub fn rollback_to(&mut self, mark: Savepoint) {
        while self.journal.len() > mark.0 {
            match self.journal.pop().expect("journal longer than mark") {
                Undo::Write(k, None) => {
                    self.changes.writes.remove(&k);
                }
                Undo::Write(k, Some(prev)) => {
                    self.changes.writes.insert(k, prev);
                }
                Undo::Timer(k, None) => {
                    self.changes.timers.remove(&k);
                }
                Undo::Timer(k, Some(prev)) => {
                    self.changes.timers.insert(k, prev);
                }
            }
        }
    }

    /// The staged changes, for the runtime to make durable.
    pub fn into_changes(self) -> Changes {
        self.changes
    }

    /// The staged changes so far, without consuming the transaction.
    pub fn changes(&self) -> &Changes {
        &self.changes
    }
}
