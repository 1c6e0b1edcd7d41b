//! The metadata state machine: openraft's `RaftStateMachine` over
//! [`MetaState`], persisted in `meta-state.redb`.
//!
//! Invariants:
//! - when `apply` returns, the batch's effects, the last applied id and the
//!   last membership are on disk in one fsynced transaction; the in-memory
//!   state changes only after that commit, so memory never runs ahead of
//!   disk;
//! - `install_snapshot` replaces rows, applied marker and current snapshot
//!   in one transaction: a crash leaves either the old state or the new;
//! - watchers (see [`StateMachineStore::subscribe`]) see every applied
//!   batch, before openraft reports it applied (so once `RaftMetrics`
//!   shows index N applied, the watched state includes N).
//!
//! Why a file of its own rather than sharing the log's: openraft drives the
//! log and the state machine from different tasks, and redb runs one write
//! transaction at a time per file; two files keep a large apply (a plugin
//! upload) or snapshot install from stalling log appends and votes, and
//! let each file be reasoned about alone. Nothing needs them to commit
//! together: openraft re-applies committed entries after a restart.

use std::collections::BTreeSet;
use std::io::Cursor;
use std::path::Path;
use std::sync::Arc;

use openraft::storage::RaftStateMachine;
use openraft::{EntryPayload, OptionalSend};
use redb::{Database, Durability};
use tokio::sync::watch;

use crate::command::MetaResponse;
use crate::disk::{blocking, open_db};
use crate::error::{MetaStoreError, Subject};
use crate::snapshot::{self, StateMachineSnapshotBuilder};
use crate::state::MetaState;
use crate::state_rows::{self, Row, OLDEST_STATE_FORMAT, STATE_FORMAT};
use crate::state_v1;
use crate::types::{Entry, LogId, Snapshot, SnapshotMeta, StorageError, StoredMembership, TypeConfig};

/// The state machine store. Give it to `openraft::Raft::new`; keep a
/// [`watch::Receiver`] from [`Self::subscribe`] to read the state.
pub struct StateMachineStore {
    db: Arc<Database>,
    /// The state as of `last_applied`. An `Arc` so snapshot builders and
    /// watchers share it without copying.
    state: Arc<MetaState>,
    last_applied: Option<LogId>,
    last_membership: StoredMembership,
    watch: watch::Sender<Arc<MetaState>>,
}

impl StateMachineStore {
    /// Open or create the state file at `path` and load it; a file of an
    /// older format is upgraded first (`state_v1`). Blocking.
    pub fn open(path: &Path) -> Result<Self, MetaStoreError> {
        let (db, format) = open_db(path, OLDEST_STATE_FORMAT..=STATE_FORMAT, state_rows::create_tables)?;
        if format < STATE_FORMAT {
            state_v1::upgrade_file(&db)?;
        }
        let loaded = state_rows::load(&db)?;
        let state = Arc::new(loaded.state);
        let (watch, _) = watch::channel(state.clone());
        Ok(StateMachineStore {
            db: Arc::new(db),
            state,
            last_applied: loaded.last_applied,
            last_membership: loaded.last_membership,
            watch,
        })
    }

    /// A receiver of the state after every applied batch or installed
    /// snapshot. Take it before handing the store to openraft; it reports
    /// closed once the Raft node (and with it the store) is gone.
    pub fn subscribe(&self) -> watch::Receiver<Arc<MetaState>> {
        self.watch.subscribe()
    }

    /// The current state.
    pub fn state(&self) -> Arc<MetaState> {
        self.state.clone()
    }

    /// The last applied log id and membership.
    pub fn applied(&self) -> (Option<LogId>, &StoredMembership) {
        (self.last_applied, &self.last_membership)
    }

    fn publish(&mut self, state: MetaState, last_applied: Option<LogId>, last_membership: StoredMembership) {
        self.state = Arc::new(state);
        self.last_applied = last_applied;
        self.last_membership = last_membership;
        self.watch.send_replace(self.state.clone());
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = StateMachineSnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        Ok((self.last_applied, self.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<MetaResponse>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        // Apply to a copy, commit, then swap: memory follows disk.
        let mut next = (*self.state).clone();
        let mut last_applied = self.last_applied;
        let mut last_membership = self.last_membership.clone();
        let mut touched = BTreeSet::new();
        let mut replies = Vec::new();
        let mut batch_last = None;
        for entry in entries {
            batch_last = Some(entry.log_id);
            last_applied = Some(entry.log_id);
            let reply = match entry.payload {
                EntryPayload::Blank => MetaResponse::ok(),
                EntryPayload::Normal(cmd) => {
                    let rows = Row::touched_by(&cmd, &next);
                    let reply = next.apply(&cmd);
                    if reply.is_ok() {
                        touched.extend(rows);
                    }
                    reply
                }
                EntryPayload::Membership(m) => {
                    last_membership = StoredMembership::new(Some(entry.log_id), m);
                    MetaResponse::ok()
                }
            };
            replies.push(reply);
        }
        let Some(last) = batch_last else {
            return Ok(replies);
        };
        let subject = Subject::Apply(last);
        let writes = state_rows::encode_rows(&next, touched).map_err(|e| e.into_raft(subject.clone()))?;
        let db = self.db.clone();
        let membership = last_membership.clone();
        blocking(move || {
            let mut txn = db.begin_write()?;
            txn.set_durability(Durability::Immediate)?;
            state_rows::write_rows(&txn, &writes)?;
            state_rows::write_applied(&txn, last_applied, &membership)?;
            txn.commit()?;
            Ok(())
        })
        .await
        .map_err(|e| e.into_raft(subject))?;
        self.publish(next, last_applied, last_membership);
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        StateMachineSnapshotBuilder {
            db: self.db.clone(),
            state: self.state.clone(),
            last_applied: self.last_applied,
            last_membership: self.last_membership.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        let db = self.db.clone();
        let stored_meta = meta.clone();
        let state = blocking(move || {
            let state = snapshot::decode_body(&data)?;
            let mut txn = db.begin_write()?;
            txn.set_durability(Durability::Immediate)?;
            state_rows::replace_all(&txn, &state)?;
            state_rows::write_applied(&txn, stored_meta.last_log_id, &stored_meta.last_membership)?;
            snapshot::save_current(&txn, &stored_meta, &data, false)?;
            txn.commit()?;
            Ok(state)
        })
        .await
        .map_err(|e| e.into_raft(Subject::WriteSnapshot))?;
        tracing::info!(snapshot = %meta, "installed metadata snapshot");
        self.publish(state, meta.last_log_id, meta.last_membership.clone());
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        let db = self.db.clone();
        let current = blocking(move || snapshot::read_current(&db))
            .await
            .map_err(|e| e.into_raft(Subject::ReadSnapshot))?;
        Ok(current.map(|(meta, data)| Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        }))
    }
}
