//! In-memory state and a driver, to run processors without a broker (unit tests, shadow replay).

use std::collections::BTreeMap;

use crate::{fire_timers, handle, Changes, Context, Event, Handled, Output, Outputs, ProcessError, Processor, StateRead, StateTxn};

/// Durable-state stand-in kept in memory: one shard.
#[derive(Debug, Default, Clone)]
pub struct MemoryStore {
    /// Key → value.
    pub data: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Timer key → deadline ms.
    pub timers: BTreeMap<Vec<u8>, i64>,
}

impl StateRead for MemoryStore {
    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.data.get(key).cloned()
    }
    fn timer(&self, key: &[u8]) -> Option<i64> {
        self.timers.get(key).copied()
    }
    fn due_timers(&self, now_ms: i64) -> Vec<(Vec<u8>, i64)> {
        let mut due: Vec<_> = self.timers.iter().filter(|(_, at)| **at <= now_ms).map(|(k, at)| (k.clone(), *at)).collect();
        due.sort_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(&b.0)));
        due
    }
    fn scan_range(&self, from: &[u8], to: &[u8], limit: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
        if from >= to {
            return Vec::new();
        }
        self.data.range(from.to_vec()..to.to_vec()).take(limit).map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

impl MemoryStore {
    /// Applies a committed unit's changes.
    pub fn apply(&mut self, changes: Changes) {
        for (k, v) in changes.writes {
            match v {
                Some(v) => self.data.insert(k, v),
                None => self.data.remove(&k),
            };
        }
        for (k, at) in changes.timers {
            match at {
                Some(at) => self.timers.insert(k, at),
                None => self.timers.remove(&k),
            };
        }
    }

    /// Reads `key` as JSON (test helper).
    pub fn get_json<T: serde::de::DeserializeOwned>(&self, key: &[u8]) -> Option<T> {
        self.data.get(key).map(|v| serde_json::from_slice(v).expect("state value is JSON"))
    }
}

/// Runs one processor over in-memory state, one event per unit of work, with the runtime's rules
/// (eventId dedupe, durable timers, changes discarded on error).
pub struct Harness<P: Processor> {
    /// The processor under test.
    pub processor: P,
    /// Its committed state.
    pub store: MemoryStore,
    wired: Vec<String>,
    offset: i64,
    /// Notes (business measures) reported so far.
    pub notes: Vec<crate::Note>,
    /// `Context::retention_ms` of every call; default [`crate::DEFAULT_STATE_RETENTION`].
    pub retention_ms: i64,
}

impl<P: Processor> Harness<P> {
    /// A harness with every port in `wired` connected.
    pub fn new(processor: P, wired: &[&str]) -> Self {
        Harness {
            processor,
            store: MemoryStore::default(),
            wired: wired.iter().map(|s| s.to_string()).collect(),
            offset: 0,
            notes: Vec::new(),
            retention_ms: crate::millis(crate::DEFAULT_STATE_RETENTION),
        }
    }

    /// Feeds `event` read from `topic` at time `now_ms`; returns what it emitted.
    ///
    /// Errors: whatever the processor returns; the state is then unchanged.
    pub fn feed(&mut self, topic: &str, event: impl Into<Event>, now_ms: i64) -> Result<Vec<Output>, ProcessError> {
        let event = event.into();
        self.offset += 1;
        let ctx = Context { topic: topic.to_string(), partition: 0, offset: self.offset, now_ms, retention_ms: self.retention_ms };
        let mut out = Outputs::new(self.wired.iter().cloned());
        let changes = {
            let mut txn = StateTxn::new(&self.store);
            let _: Handled = handle(&mut self.processor, &ctx, &event, &mut txn, &mut out)?;
            txn.into_changes()
        };
        self.store.apply(changes);
        self.notes.extend(out.take_notes());
        Ok(out.take_records())
    }

    /// Moves the clock to `now_ms` and fires due timers; returns what they emitted.
    pub fn advance(&mut self, now_ms: i64) -> Result<Vec<Output>, ProcessError> {
        let ctx = Context { topic: String::new(), partition: 0, offset: self.offset, now_ms, retention_ms: self.retention_ms };
        let mut out = Outputs::new(self.wired.iter().cloned());
        let changes = {
            let mut txn = StateTxn::new(&self.store);
            fire_timers(&mut self.processor, &ctx, &mut txn, &mut out)?;
            txn.into_changes()
        };
        self.store.apply(changes);
        self.notes.extend(out.take_notes());
        Ok(out.take_records())
    }
}
