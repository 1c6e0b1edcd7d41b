//! Installing an export as a replica of this node (REPLICATION.md,
//! "Catch-up": installing an export replaces R's whole log and state).
//!
//! The steps, each durable before the next, and what a crash after each
//! leaves (the next [`Engine::open`] decides from the names alone):
//!
//! 1. the export is read, checked and written into
//!    `replicas/<key>.import.tmp`, fsynced — crash: the old replica, the
//!    staging directory goes to trash;
//! 2. renamed to `<key>.import` — crash: complete, swapped in at open if
//!    the registry names the key (it does for a replaced replica), else
//!    trashed (a new key: the old state is "no replica");
//! 3. the registry entry is (re)written — crash: swapped in at open;
//! 4. the old directory is moved to trash (never deleted here), then the
//!    import renamed into its place — crash between the two: no replica
//!    directory, the import still `.import`, swapped in at open;
//! 5. the new replica is opened (its sealed segments queued for index
//!    builds) and replaces the old one in the map.
//!
//! Only the human name of a spec may differ between the replaced replica
//! and the import (schema changes under a key are refused), so a crash
//! between steps 2 and 3 that pairs the new files with the old entry is
//! harmless.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};

use super::{Engine, ReplicaKey, ReplicaSpec};
use crate::error::EngineError;
use crate::fsutil;
use crate::layout::{self, ImportStage};
use crate::shard::{self, ShardReplica};
use crate::validate;

impl Engine {
    /// Replaces replica `spec.key` (existing or not) by the export in
    /// `file`: checks format version, checksum, shard/dim/metric/seal_rows
    /// match `spec` (else [`EngineError::Corrupt`] / [`EngineError::Invalid`]
    /// naming the file; nothing is changed then), builds the new replica in
    /// a temporary directory beside the replicas, fsyncs it, then swaps it
    /// in atomically (old directory moved to trash, then the new one
    /// renamed into place, directory fsynced; the registry entry is
    /// (re)written for the key). Returns the new open replica, whose op
    /// log is empty and continues after the export's last op.
    ///
    /// A crash at any point leaves either the old replica or the new one
    /// (see the module doc for how [`Engine::open`] treats leftover import
    /// directories). The caller drops its handles to the old replica first;
    /// the old replica is retired here. A spec whose dim, metric or
    /// seal_rows differ from the existing replica's is
    /// [`EngineError::ReplicaExists`]. Should the swap itself fail (I/O),
    /// the key has no open replica until the engine is reopened, which
    /// completes the swap. Imports of one key run one after the other.
    pub fn import_replica(&self, spec: ReplicaSpec, file: &Path) -> Result<Arc<ShardReplica>, EngineError> {
        validate::replica_spec(&spec)?;
        let key = spec.key;
        let _claim = ImportClaim::take(&self.importing, &self.import_done, key);
        // The replica being replaced: segments the export reuses come from it.
        let held = self.read_map().get(&key).cloned();
        if let Some((existing, _)) = &held {
            let schema = |s: &ReplicaSpec| (s.dim, s.metric, s.seal_rows);
            if schema(existing) != schema(&spec) {
                return Err(EngineError::ReplicaExists(key));
            }
        }
        let config = self.shard_config(&spec);
        let staging = layout::import_dir(&self.root, key, ImportStage::Staging);
        let ready = layout::import_dir(&self.root, key, ImportStage::Ready);
        for leftover in [&staging, &ready] {
            self.clear_leftover(leftover)?;
        }

        fsutil::create_dir_durable(&staging)?;
        let imported = shard::import_files(&staging, &config, file, held.as_ref().map(|(_, r)| &**r));
        drop(held);
        let info = match imported {
            Ok(info) => info,
            Err(e) => {
                discard(&staging);
                return Err(e);
            }
        };
        std::fs::rename(&staging, &ready).map_err(|e| EngineError::io(&staging, e))?;
        fsutil::sync_dir(&self.root.join(layout::REPLICAS_DIR))?;

        let mut registry = self.registry.lock().expect("registry lock");
        // Rewriting the entry also clears a recorded damage: the import
        // is the replica now.
        if let Err(e) = registry.insert(&spec) {
            discard(&ready);
            return Err(e);
        }
        let healed = self.damaged.lock().expect("damaged lock").remove(&key);
        // Out of the map first (its lock is not held while retiring, which
        // may wait for an index file being saved).
        let old = self.write_map().remove(&key);
        if let Some((_, old)) = old {
            old.retire();
        }
        let trashed = layout::install_import(&self.root, key)?;
        let dir = layout::replica_dir(&self.root, key);
        let replica = ShardReplica::open(&dir, config, self.builder.clone())?;
        self.write_map().insert(key, (spec, replica.clone()));
        tracing::info!(
            replica = %key,
            last = %info.last,
            points = info.points,
            bytes = info.bytes,
            reused_rows = info.reused_rows,
            old = ?trashed,
            replaced_damaged = healed.is_some(),
            "replica imported from an export"
        );
        Ok(replica)
    }
}

/// Removes an import directory this call made and will not use. Best
/// effort: a leftover is moved to trash by the next import or open.
fn discard(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir) {
        tracing::warn!(error = %e, dir = %dir.display(), "could not remove an abandoned import");
    }
}

/// Marks `key` as being imported for as long as it lives.
struct ImportClaim<'a> {
    importing: &'a Mutex<BTreeSet<ReplicaKey>>,
    done: &'a Condvar,
    key: ReplicaKey,
}

impl<'a> ImportClaim<'a> {
    /// Waits until no other import of `key` runs, then claims it.
    fn take(importing: &'a Mutex<BTreeSet<ReplicaKey>>, done: &'a Condvar, key: ReplicaKey) -> ImportClaim<'a> {
        let mut set = importing.lock().expect("import lock");
        while set.contains(&key) {
            set = done.wait(set).expect("import lock");
        }
        set.insert(key);
        ImportClaim { importing, done, key }
    }
}

impl Drop for ImportClaim<'_> {
    fn drop(&mut self) {
        self.importing.lock().expect("import lock").remove(&self.key);
        self.done.notify_all();
    }
}

#[cfg(test)]
mod tests;
