//! The catalog: which collections exist (`catalog.redb`).
//!
//! Each collection gets a numeric id at creation, never reused; its files
//! live under `collections/<id>/`, so a collection dropped and created again
//! under the same name never meets the old files. The catalog entry is the
//! authority: files whose id has no entry are leftovers of a crash between
//! committing a change here and touching the files, and are deleted at open.
//!
//! Tables: `collections` (name → [`CatalogEntry`], versioned envelope) and
//! `meta` (`"next_id"` → u64). Every change commits with fsync.

use std::path::Path;

use edgevec_proto::{CollectionSpec, Metric};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::error::EngineError;

const COLLECTIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("collections");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const NEXT_ID: &str = "next_id";

/// A stored collection. Its own shape (not the wire's `CollectionSpec`), so
/// a change of the wire type cannot silently change the file format.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum CatalogEntry {
    V1(EntryV1),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct EntryV1 {
    id: u64,
    name: String,
    dim: u32,
    metric: Metric,
    shards: u32,
    seal_rows: u32,
}

pub struct Catalog {
    db: Database,
    next_id: u64,
}

impl Catalog {
    /// Opens (creating if needed) the catalog and returns it with every
    /// collection as `(id, spec)`.
    pub fn open(path: &Path) -> Result<(Catalog, Vec<(u64, CollectionSpec)>), EngineError> {
        let db = Database::builder().set_cache_size(4 * 1024 * 1024).create(path)?;
        let txn = db.begin_write()?;
        txn.open_table(COLLECTIONS)?;
        txn.open_table(META)?;
        txn.commit()?;

        let txn = db.begin_read()?;
        let next_id = txn.open_table(META)?.get(NEXT_ID)?.map_or(1, |v| v.value());
        let mut entries = Vec::new();
        for entry in txn.open_table(COLLECTIONS)?.iter()? {
            let (_, v) = entry?;
            let CatalogEntry::V1(e) =
                postcard::from_bytes(v.value()).map_err(|e| EngineError::corrupt(path.display().to_string(), e))?;
            let spec = CollectionSpec {
                name: e.name,
                dim: e.dim,
                metric: e.metric,
                shards: e.shards,
                seal_rows: e.seal_rows,
            };
            entries.push((e.id, spec));
        }
        drop(txn);
        Ok((Catalog { db, next_id }, entries))
    }

    /// The id the next [`Catalog::insert`] will record.
    pub fn next_id(&self) -> u64 {
        self.next_id
    }

    /// Records a collection under `id` (from [`Catalog::next_id`]) durably.
    pub fn insert(&mut self, id: u64, spec: &CollectionSpec) -> Result<(), EngineError> {
        let entry = CatalogEntry::V1(EntryV1 {
            id,
            name: spec.name.clone(),
            dim: spec.dim,
            metric: spec.metric,
            shards: spec.shards,
            seal_rows: spec.seal_rows,
        });
        let bytes = postcard::to_stdvec(&entry).expect("entries are plain data");
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::Immediate)
            .map_err(|e| EngineError::Storage(e.into()))?;
        {
            txn.open_table(COLLECTIONS)?
                .insert(spec.name.as_str(), bytes.as_slice())?;
            txn.open_table(META)?.insert(NEXT_ID, id.max(self.next_id) + 1)?;
        }
        txn.commit()?;
        self.next_id = id.max(self.next_id) + 1;
        Ok(())
    }

    /// Removes a collection durably; false if it was not there.
    pub fn remove(&mut self, name: &str) -> Result<bool, EngineError> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::Immediate)
            .map_err(|e| EngineError::Storage(e.into()))?;
        let removed = txn.open_table(COLLECTIONS)?.remove(name)?.is_some();
        txn.commit()?;
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str) -> CollectionSpec {
        CollectionSpec {
            name: name.into(),
            dim: 4,
            metric: Metric::Cosine,
            shards: 3,
            seal_rows: 100,
        }
    }

    #[test]
    fn persists_entries_and_never_reuses_ids() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.redb");
        {
            let (mut c, entries) = Catalog::open(&path).unwrap();
            assert!(entries.is_empty());
            let id = c.next_id();
            c.insert(id, &spec("a")).unwrap();
            c.insert(c.next_id(), &spec("b")).unwrap();
            assert!(c.remove("a").unwrap());
            assert!(!c.remove("a").unwrap());
        }
        let (c, entries) = Catalog::open(&path).unwrap();
        assert_eq!(entries, vec![(2, spec("b"))]);
        assert_eq!(c.next_id(), 3);
    }
}
