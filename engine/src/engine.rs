//! The engine: every shard replica this node holds, under one data
//! directory.
//!
//! Owns the registry (`replicas.redb`, module `registry`), the open
//! replicas keyed by [`ReplicaKey`] and the index builder thread. It
//! decides nothing about replication: which replicas to hold, what to log
//! and what to apply is the node's call, made through [`ShardReplica`].
//! `Engine` is `Send + Sync`; every method blocks (fsync) and is meant to
//! be called from a blocking context such as
//! `tokio::task::spawn_blocking`.
//!
//! Replica lifecycle and crash safety:
//! - create: the registry entry is committed (fsync) first, then the
//!   directory and files are made; a crash in between leaves an entry
//!   without files, and the next open creates them empty;
//! - drop: the entry is removed (fsync) first, then the files; a crash in
//!   between leaves a directory without an entry, which the next open
//!   moves to `trash/` (it never deletes what it did not just drop);
//! - import ([`Engine::import_replica`], module `import`): the export is
//!   written into `replicas/<key>.import.tmp`, fsynced, renamed to
//!   `<key>.import` (complete), then the entry is (re)written, the old
//!   directory moved to trash and the import renamed into its place. At
//!   open, a `.import.tmp` (incomplete) goes to trash; a `.import` is swapped
//!   in if the registry names its key, else it goes to trash. So a crash
//!   leaves the old replica or the new one, never a mix;
//! - create, drop and the swap of an import are serialised by the registry
//!   mutex; the key → replica map is only read by everything else.
//!
//! A caller stops using a replica before dropping it: a handle kept past
//! the drop writes into files that are gone.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use edgevec_proto::Metric;
use serde::{Deserialize, Serialize};

use crate::builder::IndexBuilder;
use crate::error::EngineError;
use crate::fsutil;
use crate::hnsw::IndexParams;
use crate::layout::{self, ImportStage};
use crate::registry::Registry;
use crate::shard::{ShardConfig, ShardReplica, OPLOG_RETAIN_BYTES};
use crate::validate;

/// Names one shard replica on this node: the collection's stable
/// cluster-wide id (from the metadata, never reused) and the shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ReplicaKey {
    pub collection: u64,
    pub shard: u32,
}

impl fmt::Display for ReplicaKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "shard {} of collection id {}", self.shard, self.collection)
    }
}

/// What a replica is: its collection (id, and name for humans), shard and
/// schema.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicaSpec {
    pub key: ReplicaKey,
    pub name: String,
    pub dim: u32,
    pub metric: Metric,
    pub seal_rows: u32,
}

/// Tuning of the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineOptions {
    /// HNSW `efConstruction`: candidates considered while linking a point.
    pub hnsw_ef_construction: usize,
    /// HNSW `ef` at search time, fixed when an index is built: the most
    /// candidates one index search returns.
    pub hnsw_ef_search: usize,
    /// Bytes of applied ops each replica's op log keeps
    /// ([`OPLOG_RETAIN_BYTES`] by default): a replica further behind than
    /// this is caught up from an export.
    pub oplog_retain_bytes: u64,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            hnsw_ef_construction: 200,
            hnsw_ef_search: 128,
            oplog_retain_bytes: OPLOG_RETAIN_BYTES,
        }
    }
}

type Replicas = BTreeMap<ReplicaKey, (ReplicaSpec, Arc<ShardReplica>)>;

/// Storage and search for every shard replica of one node.
pub struct Engine {
    root: PathBuf,
    index: IndexParams,
    retain_bytes: u64,
    registry: Mutex<Registry>,
    replicas: RwLock<Replicas>,
    builder: Arc<IndexBuilder>,
    /// Keys with an import running; a second import of one waits on
    /// `import_done` (they share the import directories).
    importing: Mutex<BTreeSet<ReplicaKey>>,
    import_done: Condvar,
}

impl Engine {
    /// Opens the data directory `dir` (creating it if needed), restores
    /// every replica the registry names and moves replica directories it
    /// does not name to `trash/`. Finishes an interrupted import: a
    /// complete one (`.import`) whose key the registry names replaces the
    /// replica's directory (the old one goes to trash); an incomplete one
    /// (`.import.tmp`), or one of a key the registry does not name, goes to
    /// trash. Refuses, changing nothing, a directory of another layout or
    /// replica directories without their registry.
    pub fn open(dir: &Path, opts: EngineOptions) -> Result<Engine, EngineError> {
        layout::prepare(dir)?;
        layout::check_registry(dir)?;
        fsutil::create_dir_durable(&dir.join(layout::REPLICAS_DIR))?;
        let (registry, specs) = Registry::open(&dir.join(layout::REGISTRY_FILE))?;
        fsutil::sync_dir(dir)?;

        let known: BTreeSet<ReplicaKey> = specs.iter().map(|s| s.key).collect();
        for layout::ImportDir { key, stage, path } in layout::import_dirs(dir)? {
            if stage == ImportStage::Ready && known.contains(&key) {
                let old = layout::install_import(dir, key)?;
                tracing::warn!(
                    replica = %key,
                    old = ?old,
                    "completed an import interrupted after it was written: the imported replica replaces the old one"
                );
            } else {
                let to = layout::move_to_trash(dir, &path)?;
                tracing::warn!(
                    replica = %key,
                    to = %to.display(),
                    "leftover of an interrupted import moved to trash"
                );
            }
        }
        for (key, path) in layout::replica_dirs(dir)? {
            if !known.contains(&key) {
                let to = layout::move_to_trash(dir, &path)?;
                tracing::warn!(
                    replica = %key,
                    to = %to.display(),
                    "replica directory without a registry entry (an interrupted drop) moved to trash"
                );
            }
        }

        let index = IndexParams {
            ef_construction: opts.hnsw_ef_construction.max(1),
            ef_search: opts.hnsw_ef_search.max(1),
        };
        let builder = Arc::new(IndexBuilder::start());
        let mut replicas = BTreeMap::new();
        for spec in specs {
            let path = layout::replica_dir(dir, spec.key);
            if !path.exists() {
                tracing::info!(replica = %spec.key, "creating the files of a replica whose create was interrupted");
            }
            let config = shard_config(&spec, index, opts.oplog_retain_bytes);
            let replica = ShardReplica::open(&path, config, builder.clone())?;
            replicas.insert(spec.key, (spec, replica));
        }
        Ok(Engine {
            root: dir.to_owned(),
            index,
            retain_bytes: opts.oplog_retain_bytes,
            registry: Mutex::new(registry),
            replicas: RwLock::new(replicas),
            builder,
            importing: Mutex::new(BTreeSet::new()),
            import_done: Condvar::new(),
        })
    }

    /// Creates the replica described by `spec` and returns it. Idempotent:
    /// the same spec under an existing key returns the existing replica; a
    /// different one is [`EngineError::ReplicaExists`].
    pub fn create_replica(&self, spec: ReplicaSpec) -> Result<Arc<ShardReplica>, EngineError> {
        validate::replica_spec(&spec)?;
        let registry = self.registry.lock().expect("registry lock");
        if let Some((existing, replica)) = self.read_map().get(&spec.key) {
            return if *existing == spec {
                Ok(replica.clone())
            } else {
                Err(EngineError::ReplicaExists(spec.key))
            };
        }
        registry.insert(&spec)?;
        let dir = layout::replica_dir(&self.root, spec.key);
        let opened = self
            .clear_leftover(&dir)
            .and_then(|()| ShardReplica::open(&dir, self.shard_config(&spec), self.builder.clone()));
        match opened {
            Ok(replica) => {
                self.write_map().insert(spec.key, (spec, replica.clone()));
                Ok(replica)
            }
            Err(e) => {
                // Without its entry, whatever was made is a leftover that the
                // next create or open moves away.
                if let Err(undo) = registry.remove(spec.key) {
                    tracing::error!(replica = %spec.key, error = %undo, "could not undo a failed create");
                }
                Err(e)
            }
        }
    }

    fn shard_config(&self, spec: &ReplicaSpec) -> ShardConfig {
        shard_config(spec, self.index, self.retain_bytes)
    }

    /// A directory of a replica that has no entry yet is a leftover of an
    /// earlier drop whose file removal failed (or of an earlier import).
    fn clear_leftover(&self, dir: &Path) -> Result<(), EngineError> {
        if dir.exists() {
            let to = layout::move_to_trash(&self.root, dir)?;
            tracing::warn!(to = %to.display(), "leftover replica directory moved to trash");
        }
        Ok(())
    }

    /// Drops the replica: its registry entry is removed durably first, then
    /// its pending index builds are retired and its files deleted. `false`
    /// if it did not exist.
    pub fn drop_replica(&self, key: ReplicaKey) -> Result<bool, EngineError> {
        let registry = self.registry.lock().expect("registry lock");
        if !self.read_map().contains_key(&key) {
            return Ok(false);
        }
        registry.remove(key)?;
        let Some((_, replica)) = self.write_map().remove(&key) else {
            return Ok(true);
        };
        replica.retire();
        // The drop is durable already; a failure here only leaves a
        // directory that the next open moves to trash.
        let dir = layout::replica_dir(&self.root, key);
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            tracing::warn!(error = %e, dir = %dir.display(), "could not remove dropped replica files");
        }
        Ok(true)
    }

    /// The replica under `key`, if this node holds it.
    pub fn replica(&self, key: ReplicaKey) -> Option<Arc<ShardReplica>> {
        self.read_map().get(&key).map(|(_, r)| r.clone())
    }

    /// Every open replica with its spec, ordered by key.
    pub fn replicas(&self) -> Vec<(ReplicaSpec, Arc<ShardReplica>)> {
        self.read_map().values().cloned().collect()
    }

    /// Blocks until every sealed segment of every replica has its index
    /// (tests, benchmarks); false on timeout.
    pub fn wait_for_indexes(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let all: Vec<Arc<ShardReplica>> = self.read_map().values().map(|(_, r)| r.clone()).collect();
            if all.iter().all(|r| r.indexes_ready()) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            // Short slices: a segment sealed after this check queues its
            // build only once the apply has updated memory.
            self.builder.wait_idle((deadline - now).min(Duration::from_millis(50)));
            if self.builder.pending() == 0 {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }

    fn read_map(&self) -> std::sync::RwLockReadGuard<'_, Replicas> {
        self.replicas.read().expect("replicas lock")
    }

    fn write_map(&self) -> std::sync::RwLockWriteGuard<'_, Replicas> {
        self.replicas.write().expect("replicas lock")
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // Finish the running build and join the thread before the shard
        // files close, so nothing writes into the directory afterwards.
        self.builder.shutdown();
        // Applies are committed without fsync: make them durable, so a
        // clean restart does not apply those ops again.
        for (spec, replica) in self.read_map().values() {
            if let Err(e) = replica.flush() {
                tracing::warn!(replica = ?spec.key, error = %e, "could not flush applied ops at close");
            }
        }
    }
}

fn shard_config(spec: &ReplicaSpec, index: IndexParams, retain_bytes: u64) -> ShardConfig {
    ShardConfig {
        shard: spec.key.shard,
        dim: spec.dim,
        metric: spec.metric,
        seal_rows: spec.seal_rows,
        index,
        retain_bytes,
    }
}

mod import;

#[cfg(test)]
mod tests;
