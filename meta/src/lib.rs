//! edgevec's cluster metadata: the Raft storage and state machine of the
//! metadata Raft (the control plane in ARCHITECTURE.md).
//!
//! This crate owns:
//! - the openraft type configuration and every alias of it ([`types`]);
//! - the versioned metadata commands and replies ([`command`]);
//! - the metadata itself and the pure rules that change it ([`state`]):
//!   nodes, collections (stable ids, replication, shard configurations),
//!   plugins, settings;
//! - the configuration of a shard and the rules every change of it must
//!   pass ([`shard`]): the metadata Raft is the configuration manager of
//!   every shard (REPLICATION.md);
//! - the pure decisions that produce shard configurations ([`placement`]):
//!   initial placement, in-sync and eligibility changes, choice and
//!   promotion of a new primary, resizing;
//! - durable storage for both halves of openraft's storage API, each in its
//!   own redb file under the metadata directory:
//!   [`LogStore`] (`raft-log.redb`: log, vote, committed id, last purged)
//!   and [`StateMachineStore`] (`meta-state.redb`: one row per entity, the
//!   applied marker, the current snapshot), with the V1 shapes kept to read
//!   older files and snapshots (`state_v1`).
//!
//! It does not own the Raft network or the node wiring (the node crate
//! does): it gives the node a log store and a state machine to pass to
//! `openraft::Raft::new`, and a watch channel of the applied state.
//!
//! Invariants:
//! - nothing openraft considers persisted is only in memory: votes, log
//!   appends, truncations, purges, applies and snapshot installs are
//!   fsynced before the call returns (or, for appends, before the flush
//!   callback fires);
//! - applying is deterministic, and a refused command is a
//!   [`ResponseV1::Rejected`] reply, never a storage error (a storage error
//!   stops the Raft node);
//! - everything persisted is a versioned envelope, and each file carries a
//!   layout version that is checked on open (an older readable one is
//!   upgraded in one transaction);
//! - redb work runs on tokio's blocking pool, never on a runtime worker.

pub mod command;
mod disk;
mod error;
pub mod log_store;
pub mod placement;
pub mod plugins;
pub mod shard;
mod snapshot;
pub mod state;
pub mod state_machine;
mod state_rows;
mod state_v1;
mod state_v2;
mod state_v3;
mod state_v4;
pub mod types;

use std::path::Path;

pub use command::{
    CommandV1, CommandV2, MetaCommand, MetaResponse, NodeState, RejectCode, ReplicaInfo, ReplicaState, ResponseV1,
    ShardMap,
};
pub use error::MetaStoreError;
pub use log_store::LogStore;
pub use placement::{
    add_to_in_sync, choose_primary, next_term, place, promote, remove_from_in_sync, resize, set_replica_state,
    DataNode, PlacementError,
};
pub use shard::{ReplicaRecord, Replication, ShardConfig};
pub use snapshot::StateMachineSnapshotBuilder;
pub use state::{CollectionRecord, MetaState, NodeRecord, PluginBytes, PluginRecord};
pub use state_machine::StateMachineStore;
pub use types::{MetaNode, NodeId, Raft, TypeConfig};

/// File name of the Raft log inside the metadata directory.
pub const LOG_FILE: &str = "raft-log.redb";
/// File name of the state machine inside the metadata directory.
pub const STATE_FILE: &str = "meta-state.redb";

/// Open (creating if needed) the metadata store in `dir`.
///
/// Blocking (creates the directory and opens two redb files): call it at
/// startup, or from `spawn_blocking`.
pub fn open(dir: &Path) -> Result<(LogStore, StateMachineStore), MetaStoreError> {
    std::fs::create_dir_all(dir).map_err(|e| MetaStoreError::io(dir, e))?;
    let log = opening(dir, &dir.join(LOG_FILE), LogStore::open)?;
    let sm = opening(dir, &dir.join(STATE_FILE), StateMachineStore::open)?;
    Ok((log, sm))
}

/// Opens the file at `path` with `open`, naming the file in any failure
/// and catching a panic of the storage library (it panics on some damaged
/// files).
fn opening<T>(
    dir: &Path,
    path: &Path,
    open: impl FnOnce(&Path) -> Result<T, MetaStoreError>,
) -> Result<T, MetaStoreError> {
    let unreadable = |message: String| MetaStoreError::Unreadable {
        path: path.to_owned(),
        dir: dir.to_owned(),
        message,
    };
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| open(path))) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(MetaStoreError::Storage(redb::Error::DatabaseAlreadyOpen))) => {
            Err(MetaStoreError::InUse { path: path.to_owned() })
        }
        Ok(Err(e @ (MetaStoreError::UnsupportedFormat { .. } | MetaStoreError::Io { .. }))) => Err(e),
        Ok(Err(e)) => Err(unreadable(e.to_string())),
        Err(panic) => {
            let what = edgevec_proto::error::panic_text(panic.as_ref());
            Err(unreadable(format!("the storage library failed reading it: {what}")))
        }
    }
}
