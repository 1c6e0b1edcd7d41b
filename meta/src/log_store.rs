//! The metadata Raft's log and vote, in their own redb file (`raft-log.redb`).
//!
//! Tables (layout version [`LOG_FORMAT`]):
//!
//! | table       | key            | value                                   |
//! |-------------|----------------|-----------------------------------------|
//! | `log`       | log index      | `StoredEntry`                           |
//! | `log_state` | `"vote"`       | `StoredVote`                            |
//! | `log_state` | `"committed"`  | `StoredLogId`, the last committed id    |
//! | `log_state` | `"last_purged"`| `StoredLogId`                           |
//!
//! Invariants openraft relies on:
//! - a vote, appended entries, a truncation and a purge are on disk (a redb
//!   commit with `Durability::Immediate`, i.e. fsync) before the call
//!   returns, and for appends before the `LogFlushed` callback fires;
//! - `truncate(id)` removes indexes `>= id.index`, `purge(id)` removes
//!   indexes `<= id.index` and records `last_purged = id` in the same
//!   transaction, so a crash never leaves a gap that `get_log_state` would
//!   misreport;
//! - when every entry is purged, the last log id is `last_purged`.
//!
//! The committed log id is the exception to fsync: losing it only means
//! that, after a crash, the node re-applies less on startup and waits for
//! the leader to tell it the commit index again (Raft does not need it to
//! be durable), so it is committed without an fsync and reaches the disk
//! with the next durable commit.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::Arc;

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::disk::{blocking, decode, encode, open_db};
use crate::error::{MetaStoreError, Subject};
use crate::types::{Entry, LogId, LogState, StorageError, TypeConfig, Vote};

/// Layout version of `raft-log.redb`.
pub const LOG_FORMAT: u32 = 1;

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const LOG_STATE: TableDefinition<&str, &[u8]> = TableDefinition::new("log_state");

const VOTE_KEY: &str = "vote";
const COMMITTED_KEY: &str = "committed";
const LAST_PURGED_KEY: &str = "last_purged";

/// A log entry as stored.
#[derive(Serialize, Deserialize)]
enum StoredEntry {
    V1(Entry),
}

#[derive(Serialize, Deserialize)]
enum StoredVote {
    V1(Vote),
}

#[derive(Serialize, Deserialize)]
enum StoredLogId {
    V1(LogId),
}

/// The Raft log store. Cheap to clone: clones share the database, which is
/// how the log reader handed to replication tasks is made.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
}

impl LogStore {
    /// Open or create the log file at `path`. Blocking (file I/O).
    pub fn open(path: &Path) -> Result<Self, MetaStoreError> {
        let (db, _) = open_db(path, LOG_FORMAT..=LOG_FORMAT, |txn| {
            txn.open_table(LOG)?;
            txn.open_table(LOG_STATE)?;
            Ok(())
        })?;
        Ok(LogStore { db: Arc::new(db) })
    }

    /// Run `f` on the blocking pool with the database.
    async fn with_db<T, F>(&self, subject: Subject, f: F) -> Result<T, StorageError>
    where
        F: FnOnce(&Database) -> Result<T, MetaStoreError> + Send + 'static,
        T: Send + 'static,
    {
        let db = self.db.clone();
        blocking(move || f(&db)).await.map_err(|e| e.into_raft(subject))
    }
}

fn read_state_key<T: serde::de::DeserializeOwned>(db: &Database, key: &str) -> Result<Option<T>, MetaStoreError> {
    let txn = db.begin_read()?;
    let table = txn.open_table(LOG_STATE)?;
    let value = table.get(key)?;
    value.map(|v| decode(key, v.value())).transpose()
}

fn read_last_purged(table: &impl ReadableTable<&'static str, &'static [u8]>) -> Result<Option<LogId>, MetaStoreError> {
    match table.get(LAST_PURGED_KEY)? {
        Some(v) => {
            let StoredLogId::V1(id) = decode(LAST_PURGED_KEY, v.value())?;
            Ok(Some(id))
        }
        None => Ok(None),
    }
}

/// A write transaction that fsyncs on commit.
fn begin_durable(db: &Database) -> Result<redb::WriteTransaction, MetaStoreError> {
    let mut txn = db.begin_write()?;
    txn.set_durability(Durability::Immediate)?;
    Ok(txn)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let bounds: (Bound<u64>, Bound<u64>) = (range.start_bound().cloned(), range.end_bound().cloned());
        self.with_db(Subject::ReadLogs, move |db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(LOG)?;
            let mut entries = Vec::new();
            for row in table.range(bounds)? {
                let (index, bytes) = row?;
                let StoredEntry::V1(entry) = decode(&format!("log entry {}", index.value()), bytes.value())?;
                entries.push(entry);
            }
            Ok(entries)
        })
        .await
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState, StorageError> {
        self.with_db(Subject::ReadLogs, |db| {
            let txn = db.begin_read()?;
            let last_purged = read_last_purged(&txn.open_table(LOG_STATE)?)?;
            let last = match txn.open_table(LOG)?.last()? {
                Some((index, bytes)) => {
                    let StoredEntry::V1(entry) = decode(&format!("log entry {}", index.value()), bytes.value())?;
                    Some(entry.log_id)
                }
                None => last_purged,
            };
            Ok(LogState {
                last_purged_log_id: last_purged,
                last_log_id: last,
            })
        })
        .await
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        let bytes = encode(VOTE_KEY, &StoredVote::V1(*vote)).map_err(|e| e.into_raft(Subject::WriteVote))?;
        self.with_db(Subject::WriteVote, move |db| {
            let txn = begin_durable(db)?;
            txn.open_table(LOG_STATE)?.insert(VOTE_KEY, bytes.as_slice())?;
            txn.commit()?;
            Ok(())
        })
        .await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.with_db(Subject::ReadVote, |db| {
            Ok(read_state_key::<StoredVote>(db, VOTE_KEY)?.map(|StoredVote::V1(v)| v))
        })
        .await
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        let bytes = committed
            .map(|id| encode(COMMITTED_KEY, &StoredLogId::V1(id)))
            .transpose()
            .map_err(|e| e.into_raft(Subject::WriteLogs))?;
        self.with_db(Subject::WriteLogs, move |db| {
            let mut txn = db.begin_write()?;
            // See the module docs: the committed id need not be durable.
            txn.set_durability(Durability::None)?;
            {
                let mut table = txn.open_table(LOG_STATE)?;
                match &bytes {
                    Some(b) => table.insert(COMMITTED_KEY, b.as_slice())?,
                    None => table.remove(COMMITTED_KEY)?,
                };
            }
            txn.commit()?;
            Ok(())
        })
        .await
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        self.with_db(Subject::ReadLogs, |db| {
            Ok(read_state_key::<StoredLogId>(db, COMMITTED_KEY)?.map(|StoredLogId::V1(id)| id))
        })
        .await
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        // Encode here: `entries` need not be 'static, the blocking task must be.
        let rows = entries
            .into_iter()
            .map(|e| {
                let index = e.log_id.index;
                encode("log entry", &StoredEntry::V1(e)).map(|b| (index, b))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.into_raft(Subject::WriteLogs))?;
        let result = self
            .with_db(Subject::WriteLogs, move |db| {
                let txn = begin_durable(db)?;
                {
                    let mut table = txn.open_table(LOG)?;
                    for (index, bytes) in &rows {
                        table.insert(*index, bytes.as_slice())?;
                    }
                }
                txn.commit()?;
                Ok(())
            })
            .await;
        // The commit above fsynced: only now may openraft count the entries
        // as persisted (and a leader count itself towards the quorum).
        match &result {
            Ok(()) => callback.log_io_completed(Ok(())),
            Err(e) => callback.log_io_completed(Err(std::io::Error::other(e.to_string()))),
        }
        result
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        tracing::debug!(%log_id, "truncating metadata log from (inclusive)");
        self.with_db(Subject::WriteLogs, move |db| {
            let txn = begin_durable(db)?;
            txn.open_table(LOG)?.retain_in(log_id.index.., |_, _| false)?;
            txn.commit()?;
            Ok(())
        })
        .await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        tracing::debug!(%log_id, "purging metadata log up to (inclusive)");
        let bytes = encode(LAST_PURGED_KEY, &StoredLogId::V1(log_id)).map_err(|e| e.into_raft(Subject::WriteLogs))?;
        self.with_db(Subject::WriteLogs, move |db| {
            let txn = begin_durable(db)?;
            txn.open_table(LOG)?.retain_in(..=log_id.index, |_, _| false)?;
            txn.open_table(LOG_STATE)?.insert(LAST_PURGED_KEY, bytes.as_slice())?;
            txn.commit()?;
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use openraft::testing::{blank_ent, log_id};

    use super::*;

    async fn append(store: &mut LogStore, entries: Vec<Entry>) {
        // A `LogFlushed` can only be made inside openraft; go through the
        // same path the test suite uses.
        openraft::storage::RaftLogStorageExt::blocking_append(store, entries)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn log_and_vote_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raft-log.redb");
        {
            let mut store = LogStore::open(&path).unwrap();
            append(&mut store, (1..=5).map(|i| blank_ent::<TypeConfig>(1, 1, i)).collect()).await;
            store.save_vote(&Vote::new(3, 1)).await.unwrap();
            store.save_committed(Some(log_id(1, 1, 4))).await.unwrap();
            store.purge(log_id(1, 1, 2)).await.unwrap();
            store.truncate(log_id(1, 1, 5)).await.unwrap();
        }
        let mut store = LogStore::open(&path).unwrap();
        assert_eq!(store.read_vote().await.unwrap(), Some(Vote::new(3, 1)));
        assert_eq!(store.read_committed().await.unwrap(), Some(log_id(1, 1, 4)));
        let state = store.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(log_id(1, 1, 2)));
        assert_eq!(state.last_log_id, Some(log_id(1, 1, 4)));
        let entries = store.try_get_log_entries(0..).await.unwrap();
        let ids: Vec<_> = entries.iter().map(|e| e.log_id.index).collect();
        assert_eq!(ids, vec![3, 4]);
    }
}
