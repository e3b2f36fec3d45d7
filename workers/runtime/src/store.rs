//! The sled state store of one worker instance, sharded by input partition (a *task*).
//!
//! Each shard is one sled tree `p<N>` holding, under one-byte prefixes:
//! - `d/<key>`: processor state (including remembered `eventId`s, see `orderflow_api::seen_key`),
//! - `t/<deadline u64 BE><key>`: timers ordered by deadline (ms since the epoch),
//! - `i/<key>`: timer key → deadline (index, to move or cancel a timer),
//! - `o/<topic>`: the next input offset of `topic` in this partition.
//!
//! A unit of work is written with one `apply_batch` per shard (atomic in sled) and then flushed,
//! only after the unit's outputs were acknowledged by the broker; so the store is never ahead of
//! Kafka, and a crash before the flush replays inputs whose `eventId`s are not yet remembered.

use std::collections::BTreeMap;
use std::path::Path;

use orderflow_api::{Changes, StateRead};

/// Errors of the state store. All are fatal for the instance (the pod restarts).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state store {path}: {source}")]
    Open { path: String, source: sled::Error },
    #[error("state store I/O: {0}")]
    Io(#[from] sled::Error),
    /// The blocking flush task did not complete (it panicked, or the runtime shut down).
    #[error("state store flush task failed: {0}")]
    Flush(String),
}

/// A `(key, value)` pair of processor state.
pub type Entry = (Vec<u8>, Vec<u8>);

/// One worker instance's store.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
}

/// One partition's shard.
#[derive(Clone)]
pub struct Shard {
    tree: sled::Tree,
    /// Input partition number.
    pub partition: i32,
}

const DATA: u8 = b'd';
const TIMER: u8 = b't';
const INDEX: u8 = b'i';
const OFFSET: u8 = b'o';
/// Meta key: the changelog offset just after the last unit this shard holds.
const CHANGELOG_NEXT: &[u8] = b"m/changelog-next";

fn prefixed(prefix: u8, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 2);
    k.push(prefix);
    k.push(b'/');
    k.extend_from_slice(key);
    k
}

fn timer_key(at_ms: i64, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 10);
    k.push(TIMER);
    k.push(b'/');
    k.extend_from_slice(&(at_ms.max(0) as u64).to_be_bytes());
    k.extend_from_slice(key);
    k
}

fn decode_i64(bytes: &[u8]) -> Option<i64> {
    Some(i64::from_be_bytes(bytes.try_into().ok()?))
}

impl Store {
    /// Opens the store at `path`; when it cannot be opened (corrupt, half-written by a crash,
    /// from an incompatible version), moves it aside to `<path>.corrupt-<ms>` and starts empty,
    /// so every partition is rebuilt from its changelog. Returns the store and whether it was
    /// reset.
    ///
    /// Errors: the directory cannot be created or moved.
    pub fn open_or_reset(path: &Path) -> Result<(Store, bool), StoreError> {
        match Store::open(path) {
            Ok(s) => Ok((s, false)),
            Err(e) => {
                let aside = path.with_extension(format!("corrupt-{}", crate::worker::now_ms()));
                tracing::error!(path = %path.display(), error = %e, aside = %aside.display(), "state store unusable; rebuilding from the changelog");
                std::fs::rename(path, &aside)
                    .map_err(|io| StoreError::Open { path: path.display().to_string(), source: sled::Error::Io(io) })?;
                Ok((Store::open(path)?, true))
            }
        }
    }

    /// Opens (or creates) the store at `path`.
    ///
    /// Errors: [`StoreError::Open`] when the directory is unusable or the store is corrupt.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(64 * 1024 * 1024)
            .open()
            .map_err(|source| StoreError::Open { path: path.display().to_string(), source })?;
        Ok(Store { db })
    }

    /// The shard of input partition `partition`.
    pub fn shard(&self, partition: i32) -> Result<Shard, StoreError> {
        Ok(Shard { tree: self.db.open_tree(format!("p{partition}"))?, partition })
    }

    /// Partitions that have a shard on disk.
    pub fn partitions(&self) -> Vec<i32> {
        self.db.tree_names().iter().filter_map(|n| std::str::from_utf8(n).ok()?.strip_prefix('p')?.parse().ok()).collect()
    }

    /// Waits until every applied batch is on disk: sled's blocking `Db::flush` on tokio's
    /// blocking pool.
    ///
    /// Not `Db::flush_async`: in sled 0.34 its futures can stay pending forever when several are
    /// awaited at once (spacejam/sled#1241, #1308: the flushes occupy sled's own I/O threads while
    /// the writes they wait for queue behind them). Seen here: after a broker restart the workers
    /// of one process flushed together and one of them never returned from its unit, without a
    /// log line, its inputs never read again (issue 11).
    ///
    /// Errors: sled's I/O error, or [`StoreError::Flush`] when the flush task panicked.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || db.flush()).await.map_err(|e| StoreError::Flush(e.to_string()))??;
        Ok(())
    }
}

impl Shard {
    /// Applies a unit's staged changes, the next input offsets (`topic → offset`) and the
    /// changelog position after the unit's records, atomically (one sled batch).
    pub fn commit(&self, changes: &Changes, offsets: &BTreeMap<String, i64>, changelog_next: Option<i64>) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for (k, v) in &changes.writes {
            match v {
                Some(v) => batch.insert(prefixed(DATA, k), v.as_slice()),
                None => batch.remove(prefixed(DATA, k)),
            }
        }
        for (k, at) in &changes.timers {
            let index = prefixed(INDEX, k);
            if let Some(old) = self.tree.get(&index)?.and_then(|v| decode_i64(&v)) {
                batch.remove(timer_key(old, k));
            }
            match at {
                Some(at) => {
                    batch.insert(timer_key(*at, k), &[][..]);
                    batch.insert(index, &at.to_be_bytes()[..]);
                }
                None => batch.remove(index),
            }
        }
        for (topic, offset) in offsets {
            batch.insert(prefixed(OFFSET, topic.as_bytes()), &offset.to_be_bytes()[..]);
        }
        if let Some(next) = changelog_next {
            batch.insert(CHANGELOG_NEXT, &next.to_be_bytes()[..]);
        }
        self.tree.apply_batch(batch)?;
        Ok(())
    }

    /// The changelog offset just after the last unit this shard holds; `None` when the shard has
    /// never applied a unit through the changelog.
    pub fn changelog_next(&self) -> Result<Option<i64>, StoreError> {
        Ok(self.tree.get(CHANGELOG_NEXT)?.and_then(|v| decode_i64(&v)))
    }

    /// Every input offset recorded with the last committed unit, `topic → next offset`.
    pub fn offsets(&self) -> Result<BTreeMap<String, i64>, StoreError> {
        let mut out = BTreeMap::new();
        for r in self.tree.scan_prefix([OFFSET, b'/']) {
            let (k, v) = r?;
            if let Some(o) = decode_i64(&v) {
                out.insert(String::from_utf8_lossy(&k[2..]).into_owned(), o);
            }
        }
        Ok(out)
    }

    /// True when the shard holds nothing at all.
    pub fn is_empty(&self) -> bool {
        self.tree.is_empty()
    }

    /// Removes everything from the shard (before a rebuild from the changelog).
    pub fn clear(&self) -> Result<(), StoreError> {
        self.tree.clear()?;
        Ok(())
    }

    /// The next input offset of `topic` recorded with the last committed unit.
    pub fn offset(&self, topic: &str) -> Result<Option<i64>, StoreError> {
        Ok(self.tree.get(prefixed(OFFSET, topic.as_bytes()))?.and_then(|v| decode_i64(&v)))
    }

    /// Every processor state entry whose key starts with `prefix` (for tools and the demo).
    pub fn scan(&self, prefix: &[u8]) -> Result<Vec<Entry>, StoreError> {
        self.tree
            .scan_prefix(prefixed(DATA, prefix))
            .map(|r| r.map(|(k, v)| (k[2..].to_vec(), v.to_vec())).map_err(StoreError::from))
            .collect()
    }

    /// Number of pending timers.
    pub fn timer_count(&self) -> usize {
        self.tree.scan_prefix([INDEX, b'/']).count()
    }
}

impl StateRead for Shard {
    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        // A read error here means the store is failing; surface it as missing data would be
        // wrong, so panic and let the pod restart (fatal class).
        self.tree.get(prefixed(DATA, key)).expect("state store read failed").map(|v| v.to_vec())
    }

    fn timer(&self, key: &[u8]) -> Option<i64> {
        self.tree.get(prefixed(INDEX, key)).expect("state store read failed").and_then(|v| decode_i64(&v))
    }

    fn scan_range(&self, from: &[u8], to: &[u8], limit: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
        if from >= to {
            return Vec::new();
        }
        self.tree
            .range(prefixed(DATA, from)..prefixed(DATA, to))
            .take(limit)
            .map(|r| r.map(|(k, v)| (k[2..].to_vec(), v.to_vec())).expect("state store read failed"))
            .collect()
    }

    fn due_timers(&self, now_ms: i64) -> Vec<(Vec<u8>, i64)> {
        let start = vec![TIMER, b'/'];
        let end = timer_key(now_ms.saturating_add(1), &[]);
        self.tree
            .range(start..end)
            .map(|r| {
                let (k, _) = r.expect("state store read failed");
                let at = u64::from_be_bytes(k[2..10].try_into().expect("timer key has a deadline")) as i64;
                (k[10..].to_vec(), at)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use orderflow_api::StateTxn;

    #[test]
    fn committed_state_timers_and_offsets_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            let shard = store.shard(3).unwrap();
            let mut txn = StateTxn::new(&shard);
            txn.put(b"a".to_vec(), b"1".to_vec());
            txn.schedule_timer(b"t1".to_vec(), 1_000);
            txn.schedule_timer(b"t2".to_vec(), 5_000);
            let changes = txn.into_changes();
            shard.commit(&changes, &BTreeMap::from([("in".to_string(), 42)]), Some(7)).unwrap();
            // Move t2 earlier, cancel t1.
            let mut txn = StateTxn::new(&shard);
            txn.schedule_timer(b"t2".to_vec(), 500);
            txn.cancel_timer(b"t1");
            shard.commit(&txn.into_changes(), &BTreeMap::new(), None).unwrap();
            tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(store.flush()).unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.partitions(), vec![3]);
        let shard = store.shard(3).unwrap();
        assert_eq!(shard.get(b"a"), Some(b"1".to_vec()));
        assert_eq!(shard.offset("in").unwrap(), Some(42));
        assert_eq!(shard.changelog_next().unwrap(), Some(7));
        assert_eq!(shard.offsets().unwrap(), BTreeMap::from([("in".to_string(), 42)]));
        assert_eq!(shard.due_timers(10_000), vec![(b"t2".to_vec(), 500)]);
        assert_eq!(shard.due_timers(499), vec![]);
        assert_eq!(shard.timer(b"t1"), None);
        assert_eq!(shard.timer_count(), 1);
    }

    /// A unit as large as a restock of 160,000 products (issue 18's recovery run at 10^6 keys):
    /// every key of its one sled batch is there afterwards, the last ones too.
    #[test]
    fn a_very_large_unit_keeps_every_key() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let shard = store.shard(0).unwrap();
        let mut txn = StateTxn::new(&shard);
        for i in 0..200_000u32 {
            txn.put(format!("ledger/HQ:ST/P-{i:06}").into_bytes(), br#"{"adjusted":1000000,"sold":0}"#.to_vec());
            txn.put(format!("stock/HQ:ST/P-{i:06}").into_bytes(), br#"{"onHand":1000000,"reserved":0}"#.to_vec());
        }
        shard.commit(&txn.into_changes(), &BTreeMap::new(), Some(1)).unwrap();
        let missing: Vec<u32> = (0..200_000u32).filter(|i| shard.get(format!("stock/HQ:ST/P-{i:06}").as_bytes()).is_none()).collect();
        assert!(missing.is_empty(), "{} stock keys missing, first {:?}", missing.len(), missing.first());
    }

    /// Issue 11: the stores of one process flushed at the same moment (the workers resuming
    /// together after a broker outage) must all complete; sled's `flush_async` futures could stay
    /// pending forever then (spacejam/sled#1241).
    #[test]
    fn stores_flushed_at_once_all_complete() {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build().unwrap();
        let dirs: Vec<_> = (0..8).map(|_| tempfile::tempdir().unwrap()).collect();
        let stores: Vec<Store> = dirs.iter().map(|d| Store::open(d.path()).unwrap()).collect();
        rt.block_on(async {
            for round in 0..200u32 {
                let flushes = stores.iter().map(|store| {
                    let store = store.clone();
                    tokio::spawn(async move {
                        {
                            let shard = store.shard(0).unwrap();
                            let mut txn = StateTxn::new(&shard);
                            txn.put(round.to_be_bytes().to_vec(), vec![7; 4096]);
                            shard.commit(&txn.into_changes(), &BTreeMap::new(), None).unwrap();
                        }
                        store.flush().await.unwrap();
                    })
                });
                let all = futures::future::join_all(flushes);
                tokio::time::timeout(std::time::Duration::from_secs(30), all)
                    .await
                    .unwrap_or_else(|_| panic!("round {round}: a flush did not complete within 30 s"));
            }
        });
    }
}
