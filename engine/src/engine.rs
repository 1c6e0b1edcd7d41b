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
//! - damage: a replica whose files fail to open (an error, or a panic of the
//!   storage library) does not stop the engine. Its directory is moved to
//!   `damaged/` untouched, the [`Damage`] is recorded in its registry entry
//!   (fsync), and an empty replica is opened in its place so that an import
//!   from a healthy replica can replace it. Until an import does, the
//!   replica is reported by [`Engine::damage`] (across restarts): its
//!   emptiness is never taken for the data.
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
use crate::layout::{self, ImportStage};
use crate::registry::Registry;
use crate::shard::{ShardConfig, ShardReplica, OPLOG_HOLD_BYTES, OPLOG_RETAIN_BYTES, OPLOG_RETAIN_PERCENT};
use crate::validate;
use edgevec_proto::{FieldSpec, IndexSpec};

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
    /// HNSW build parameters of its segments' indexes.
    pub index: IndexSpec,
    /// Payload indexes: the fields its filters may use.
    pub fields: Vec<FieldSpec>,
}

/// Why a replica's files could not be opened, and where they were kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// The file (or directory) that failed.
    pub file: PathBuf,
    /// What failed, as the storage layer said it.
    pub reason: String,
    /// Where the replica's directory was moved, as it was found.
    pub kept_at: PathBuf,
}

impl fmt::Display for Damage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} cannot be opened ({}); the damaged files are kept at {}",
            self.file.display(),
            self.reason,
            self.kept_at.display()
        )
    }
}

/// Tuning of the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineOptions {
    /// Bytes of applied ops each replica's op log keeps
    /// ([`OPLOG_RETAIN_BYTES`] by default): a replica further behind than
    /// this is caught up from an export.
    pub oplog_retain_bytes: u64,
    /// Share of a shard's vector bytes its op log keeps, in percent,
    /// within `oplog_retain_bytes` ([`OPLOG_RETAIN_PERCENT`] by default;
    /// `None`: `oplog_retain_bytes` alone; see [`crate::retain_budget`]).
    pub oplog_retain_percent: Option<u32>,
    /// Bytes each replica's op log may grow to while it holds ops for a
    /// replica away from the in-sync set ([`OPLOG_HOLD_BYTES`] by
    /// default; see [`ShardReplica::set_held_floor`]).
    pub oplog_hold_bytes: u64,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            oplog_retain_bytes: OPLOG_RETAIN_BYTES,
            oplog_retain_percent: Some(OPLOG_RETAIN_PERCENT),
            oplog_hold_bytes: OPLOG_HOLD_BYTES,
        }
    }
}

type Replicas = BTreeMap<ReplicaKey, (ReplicaSpec, Arc<ShardReplica>)>;

/// Storage and search for every shard replica of one node.
pub struct Engine {
    root: PathBuf,
    options: EngineOptions,
    registry: Mutex<Registry>,
    replicas: RwLock<Replicas>,
    builder: Arc<IndexBuilder>,
    /// Replicas set aside at open and not replaced by an import since.
    damaged: Mutex<BTreeMap<ReplicaKey, Damage>>,
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
    /// trash. A replica whose files fail to open is set aside (see the
    /// module's "damage"). Refuses, changing nothing, a directory of another
    /// layout, replica directories without their registry, or a registry
    /// that cannot be read.
    pub fn open(dir: &Path, opts: EngineOptions) -> Result<Engine, EngineError> {
        layout::prepare(dir)?;
        layout::check_registry(dir)?;
        fsutil::create_dir_durable(&dir.join(layout::REPLICAS_DIR))?;
        let registry_file = dir.join(layout::REGISTRY_FILE);
        let (mut registry, specs) = catching(&registry_file, || Registry::open(&registry_file)).map_err(|e| {
            let message = if matches!(e, EngineError::Storage(redb::Error::DatabaseAlreadyOpen)) {
                "the file is in use by another process: is another edgevec node running with this data \
                 directory?"
                    .to_string()
            } else {
                format!(
                    "the registry of this node's replicas cannot be read: {e}. Nothing was changed. To recover, \
                     stop the node, move the data directory {} aside and start the node again: its replicas are \
                     copied again from the other nodes (the moved directory keeps the old files)",
                    dir.display()
                )
            };
            EngineError::Layout {
                path: registry_file.clone(),
                message,
            }
        })?;
        fsutil::sync_dir(dir)?;

        let known: BTreeSet<ReplicaKey> = specs.iter().map(|(s, _)| s.key).collect();
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

        let builder = Arc::new(IndexBuilder::start());
        let mut replicas = BTreeMap::new();
        let mut damaged = BTreeMap::new();
        for (spec, damage) in specs {
            let path = layout::replica_dir(dir, spec.key);
            if !path.exists() && damage.is_none() {
                tracing::info!(replica = %spec.key, "creating the files of a replica whose create was interrupted");
            }
            let config = shard_config(&spec, opts);
            let (replica, set_aside_now) = open_or_set_aside(dir, &mut registry, &builder, &spec, config)?;
            match (set_aside_now, damage) {
                (Some(d), _) => {
                    damaged.insert(spec.key, d);
                }
                (None, Some(d)) => {
                    tracing::error!(replica = %spec.key, damage = %d, "replica still damaged: waiting for a rebuild from a healthy replica");
                    damaged.insert(spec.key, d);
                }
                (None, None) => {}
            }
            replicas.insert(spec.key, (spec, replica));
        }
        // Loading indexes read whole files and chunks of rows into memory
        // that is free now.
        crate::memory::return_free_memory();
        Ok(Engine {
            root: dir.to_owned(),
            options: opts,
            registry: Mutex::new(registry),
            replicas: RwLock::new(replicas),
            builder,
            damaged: Mutex::new(damaged),
            importing: Mutex::new(BTreeSet::new()),
            import_done: Condvar::new(),
        })
    }

    /// Creates the replica described by `spec` and returns it. Idempotent:
    /// the same spec under an existing key returns the existing replica; a
    /// different one is [`EngineError::ReplicaExists`].
    pub fn create_replica(&self, spec: ReplicaSpec) -> Result<Arc<ShardReplica>, EngineError> {
        validate::replica_spec(&spec)?;
        let mut registry = self.registry.lock().expect("registry lock");
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
        shard_config(spec, self.options)
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
        let mut registry = self.registry.lock().expect("registry lock");
        if !self.read_map().contains_key(&key) {
            return Ok(false);
        }
        registry.remove(key)?;
        self.damaged.lock().expect("damaged lock").remove(&key);
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

    /// Closes the replica under `key` and opens it again from its files.
    /// After a storage failure (a full disk) redb refuses every write until
    /// its database is reopened; a reopen also reloads the replica from
    /// what is durable, so memory never runs ahead of the files.
    ///
    /// First a probe file is written and fsynced in the replica's
    /// directory: while that fails (the disk is still full) nothing is
    /// changed and the error says why. Then the replica leaves the map and
    /// the call waits (at most `wait`) until the caller's handle is the
    /// last one; the caller drops every handle it keeps before calling
    /// ([`EngineError::ReplicaBusy`] otherwise, and nothing changed). Files
    /// that then fail to open are set aside as damaged, as at open.
    pub fn reopen_replica(&self, key: ReplicaKey, wait: Duration) -> Result<Arc<ShardReplica>, EngineError> {
        let mut registry = self.registry.lock().expect("registry lock");
        self.probe_replica(key)?;
        let Some((spec, old)) = self.write_map().remove(&key) else {
            return Err(EngineError::ReplicaNotFound(key));
        };
        let deadline = Instant::now() + wait;
        while Arc::strong_count(&old) > 1 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if Arc::strong_count(&old) > 1 {
            self.write_map().insert(key, (spec, old));
            return Err(EngineError::ReplicaBusy(key));
        }
        old.retire();
        drop(old);
        let config = self.shard_config(&spec);
        let (replica, set_aside) = open_or_set_aside(&self.root, &mut registry, &self.builder, &spec, config)?;
        if let Some(d) = set_aside {
            self.damaged.lock().expect("damaged lock").insert(key, d);
        }
        self.write_map().insert(key, (spec, replica.clone()));
        Ok(replica)
    }

    /// Whether the directory of the replica under `key` takes writes
    /// (see [`fsutil::probe_write`]); the error names the file.
    pub fn probe_replica(&self, key: ReplicaKey) -> Result<(), EngineError> {
        fsutil::probe_write(&layout::replica_dir(&self.root, key))
    }

    /// The replica under `key`, if this node holds it.
    pub fn replica(&self, key: ReplicaKey) -> Option<Arc<ShardReplica>> {
        self.read_map().get(&key).map(|(_, r)| r.clone())
    }

    /// Why the replica under `key` was set aside at open, if it was and no
    /// import has replaced it since: it is then empty, and not the data.
    pub fn damage(&self, key: ReplicaKey) -> Option<Damage> {
        self.damaged.lock().expect("damaged lock").get(&key).cloned()
    }

    /// Every replica set aside and not replaced yet, by key.
    #[cfg(test)]
    pub(crate) fn damaged(&self) -> Vec<(ReplicaKey, Damage)> {
        let damaged = self.damaged.lock().expect("damaged lock");
        damaged.iter().map(|(k, d)| (*k, d.clone())).collect()
    }

    /// Every open replica with its spec, ordered by key.
    pub fn replicas(&self) -> Vec<(ReplicaSpec, Arc<ShardReplica>)> {
        self.read_map().values().cloned().collect()
    }

    /// Index builds queued or running, builds finished since start, and
    /// the seconds those took in all.
    pub fn index_builds(&self) -> (usize, u64, f64) {
        let (done, secs) = self.builder.done();
        (self.builder.pending(), done, secs)
    }

    /// Blocks until every sealed segment of every replica has its index
    /// and the builder has finished its jobs (so [`Engine::index_builds`]
    /// counts them: a job installs its index before it returns its memory
    /// and is counted); for tests and benchmarks; false on timeout.
    pub fn wait_for_indexes(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let all: Vec<Arc<ShardReplica>> = self.read_map().values().map(|(_, r)| r.clone()).collect();
            if all.iter().all(|r| r.indexes_ready()) {
                return self
                    .builder
                    .wait_idle(deadline.saturating_duration_since(Instant::now()));
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
        // Retired replicas take no index file any more, so a build that
        // shutdown abandons cannot write into the directory afterwards.
        for (_, replica) in self.read_map().values() {
            replica.retire();
        }
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

/// Runs `f`, turning a panic inside it (the storage library panics on some
/// damaged files) into an error about `path`.
fn catching<T>(path: &Path, f: impl FnOnce() -> Result<T, EngineError>) -> Result<T, EngineError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(panic) => {
            let what = edgevec_proto::error::panic_text(panic.as_ref());
            Err(EngineError::corrupt(
                path.display().to_string(),
                format!("the storage library failed reading it: {what}"),
            ))
        }
    }
}

/// Opens the replica of `spec` (in its directory under `root`). Files that
/// fail to open (an error, or a panic of the storage library) are set
/// aside as damaged and an empty replica is opened in their place; the
/// damage is returned with it.
fn open_or_set_aside(
    root: &Path,
    registry: &mut Registry,
    builder: &Arc<IndexBuilder>,
    spec: &ReplicaSpec,
    config: ShardConfig,
) -> Result<(Arc<ShardReplica>, Option<Damage>), EngineError> {
    let dir = layout::replica_dir(root, spec.key);
    // A panic comes from the storage library, reading the shard file.
    let store = dir.join(crate::shard::STORE_FILE);
    let e = match catching(&store, || ShardReplica::open(&dir, config.clone(), builder.clone())) {
        Ok(replica) => return Ok((replica, None)),
        Err(e) => e,
    };
    let d = set_aside(root, registry, spec, &dir, &e)?;
    tracing::error!(
        replica = %spec.key,
        file = %d.file.display(),
        kept_at = %d.kept_at.display(),
        error = %d.reason,
        "replica files cannot be opened: set aside, the node serves everything else; the replica is rebuilt \
         from a healthy replica if there is one"
    );
    Ok((ShardReplica::open(&dir, config, builder.clone())?, Some(d)))
}

/// Moves the directory of a replica that failed to open (`error`) to
/// `damaged/`, records that in the registry and returns the record.
fn set_aside(
    root: &Path,
    registry: &mut Registry,
    spec: &ReplicaSpec,
    dir: &Path,
    error: &EngineError,
) -> Result<Damage, EngineError> {
    let file = match error {
        EngineError::Io { path, .. } => path.clone(),
        EngineError::Corrupt { what, .. } if Path::new(what).starts_with(dir) => PathBuf::from(what),
        EngineError::Storage(_) => dir.join(crate::shard::STORE_FILE),
        _ => dir.to_owned(),
    };
    let reason = match error {
        EngineError::Corrupt { message, .. } => message.clone(),
        EngineError::Io { source, .. } => source.to_string(),
        other => other.to_string(),
    };
    let kept_at = layout::move_to_damaged(root, dir)?;
    // Names the file where it was found: the path an operator looks for.
    let damage = Damage { file, reason, kept_at };
    registry.mark_damaged(spec, &damage)?;
    Ok(damage)
}

fn shard_config(spec: &ReplicaSpec, options: EngineOptions) -> ShardConfig {
    ShardConfig {
        shard: spec.key.shard,
        dim: spec.dim,
        metric: spec.metric,
        seal_rows: spec.seal_rows,
        index: spec.index,
        retain_bytes: options.oplog_retain_bytes,
        retain_percent: options.oplog_retain_percent,
        hold_bytes: options.oplog_hold_bytes,
        fields: spec.fields.clone(),
    }
}

mod import;

#[cfg(test)]
mod tests;
