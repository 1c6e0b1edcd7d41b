//! The engine: every collection of this node, under one data directory.
//!
//! Owns the catalog, the open collections and the index builder thread.
//! `Engine` is `Send + Sync`; every method blocks (fsync, HNSW builds are
//! elsewhere) and is meant to be called from a blocking context such as
//! `tokio::task::spawn_blocking`.
//!
//! Collection lifecycle and crash safety:
//! - create: the shard files are made under a fresh numeric id first, the
//!   catalog entry is committed last; a crash in between leaves files with
//!   no entry, which the next open deletes;
//! - drop: the catalog entry is removed (durably) first, then the files; a
//!   crash in between again leaves files with no entry;
//! - catalog changes are serialised by the catalog mutex; the name → collection
//!   map is only read by requests.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use edgevec_proto::{CollectionInfo, CollectionSpec, Hit, Point, PointRecord, WriteAck};

use crate::builder::IndexBuilder;
use crate::catalog::Catalog;
use crate::collection::Collection;
use crate::error::EngineError;
use crate::fsutil;
use crate::hnsw::IndexParams;
use crate::validate;

const CATALOG_FILE: &str = "catalog.redb";
const COLLECTIONS_DIR: &str = "collections";

/// Tuning of the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineOptions {
    /// HNSW `efConstruction`: candidates considered while linking a point.
    pub hnsw_ef_construction: usize,
    /// HNSW `ef` at search time, fixed when an index is built: the most
    /// candidates one index search returns.
    pub hnsw_ef_search: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            hnsw_ef_construction: 200,
            hnsw_ef_search: 128,
        }
    }
}

/// Storage and search for every collection of one node.
pub struct Engine {
    root: PathBuf,
    index: IndexParams,
    catalog: Mutex<Catalog>,
    collections: RwLock<BTreeMap<String, Arc<Collection>>>,
    builder: Arc<IndexBuilder>,
}

impl Engine {
    /// Opens the data directory `dir` (creating it if needed), restores
    /// every collection and removes files of collections that no longer
    /// exist.
    pub fn open(dir: &Path, opts: EngineOptions) -> Result<Engine, EngineError> {
        let collections_dir = dir.join(COLLECTIONS_DIR);
        fsutil::create_dir_durable(&collections_dir)?;
        let (catalog, entries) = Catalog::open(&dir.join(CATALOG_FILE))?;
        fsutil::sync_dir(dir)?;
        remove_orphans(&collections_dir, &entries.iter().map(|(id, _)| *id).collect())?;

        let index = IndexParams {
            ef_construction: opts.hnsw_ef_construction.max(1),
            ef_search: opts.hnsw_ef_search.max(1),
        };
        let builder = Arc::new(IndexBuilder::start());
        let mut collections = BTreeMap::new();
        for (id, spec) in entries {
            let c = Collection::open(&collection_dir(dir, id), spec, index, &builder)?;
            collections.insert(c.spec.name.clone(), Arc::new(c));
        }
        Ok(Engine {
            root: dir.to_owned(),
            index,
            catalog: Mutex::new(catalog),
            collections: RwLock::new(collections),
            builder,
        })
    }

    pub fn create_collection(&self, spec: CollectionSpec) -> Result<(), EngineError> {
        validate::collection_spec(&spec)?;
        let mut catalog = self.catalog.lock().expect("catalog lock");
        if self.read_map().contains_key(&spec.name) {
            return Err(EngineError::CollectionExists(spec.name));
        }
        let id = catalog.next_id();
        let dir = collection_dir(&self.root, id);
        // The id is not in the catalog, so anything there is a leftover of
        // an earlier failed create.
        let _ = std::fs::remove_dir_all(&dir);
        let created = Collection::open(&dir, spec.clone(), self.index, &self.builder)
            .and_then(|c| catalog.insert(id, &spec).map(|()| c));
        match created {
            Ok(c) => {
                self.write_map().insert(spec.name, Arc::new(c));
                Ok(())
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                Err(e)
            }
        }
    }

    pub fn drop_collection(&self, name: &str) -> Result<(), EngineError> {
        let mut catalog = self.catalog.lock().expect("catalog lock");
        if !self.read_map().contains_key(name) {
            return Err(EngineError::CollectionNotFound(name.to_owned()));
        }
        catalog.remove(name)?;
        let Some(c) = self.write_map().remove(name) else {
            return Ok(());
        };
        c.retire();
        // The drop is durable already; a failure here only leaves files
        // that the next open removes.
        if let Err(e) = std::fs::remove_dir_all(&c.dir) {
            tracing::warn!(error = %e, dir = %c.dir.display(), "could not remove dropped collection files");
        }
        Ok(())
    }

    /// Every collection, by name.
    pub fn list_collections(&self) -> Vec<CollectionInfo> {
        let all: Vec<Arc<Collection>> = self.read_map().values().cloned().collect();
        all.iter().map(|c| c.info()).collect()
    }

    pub fn describe_collection(&self, name: &str) -> Result<CollectionInfo, EngineError> {
        Ok(self.collection(name)?.info())
    }

    /// Inserts or replaces points; durable on every touched shard when it
    /// returns.
    pub fn upsert(&self, collection: &str, points: Vec<Point>) -> Result<WriteAck, EngineError> {
        self.collection(collection)?.upsert(points)
    }

    /// Deletes points by id (absent ids are fine); durable when it returns.
    pub fn delete(&self, collection: &str, ids: &[u64]) -> Result<WriteAck, EngineError> {
        self.collection(collection)?.delete(ids)
    }

    /// The points found among `ids`, in request order.
    pub fn get(&self, collection: &str, ids: &[u64]) -> Result<Vec<PointRecord>, EngineError> {
        self.collection(collection)?.get(ids)
    }

    /// Up to `k` hits per query, best first, over every shard and segment.
    pub fn search(
        &self,
        collection: &str,
        queries: &[Vec<f32>],
        k: u32,
        with_payload: bool,
    ) -> Result<Vec<Vec<Hit>>, EngineError> {
        self.collection(collection)?.search(queries, k, with_payload)
    }

    /// Blocks until every sealed segment has its index (tests, benchmarks);
    /// false on timeout.
    pub fn wait_for_indexes(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let all: Vec<Arc<Collection>> = self.read_map().values().cloned().collect();
            if all.iter().all(|c| c.indexes_ready()) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            // Short slices: a segment sealed after this check queues its
            // build only once the write has updated memory.
            self.builder.wait_idle((deadline - now).min(Duration::from_millis(50)));
            if self.builder.pending() == 0 {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }

    fn collection(&self, name: &str) -> Result<Arc<Collection>, EngineError> {
        self.read_map()
            .get(name)
            .cloned()
            .ok_or_else(|| EngineError::CollectionNotFound(name.to_owned()))
    }

    fn read_map(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<Collection>>> {
        self.collections.read().expect("collections lock")
    }

    fn write_map(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Arc<Collection>>> {
        self.collections.write().expect("collections lock")
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // Finish the running build and join the thread before the shard
        // files close, so nothing writes into the directory afterwards.
        self.builder.shutdown();
    }
}

fn collection_dir(root: &Path, id: u64) -> PathBuf {
    root.join(COLLECTIONS_DIR).join(id.to_string())
}

/// Deletes `collections/<id>` directories whose id the catalog does not
/// know (a crash between a catalog commit and the file work).
fn remove_orphans(dir: &Path, known: &HashSet<u64>) -> Result<(), EngineError> {
    let entries = std::fs::read_dir(dir).map_err(|e| EngineError::io(dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| EngineError::io(dir, e))?;
        let name = entry.file_name();
        let Some(id) = name.to_str().and_then(|n| n.parse::<u64>().ok()) else {
            continue; // not ours: leave it alone
        };
        if !known.contains(&id) {
            tracing::info!(id, "removing files of a dropped collection");
            std::fs::remove_dir_all(entry.path()).map_err(|e| EngineError::io(entry.path(), e))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
