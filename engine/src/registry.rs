//! The registry: which shard replicas this node holds (`replicas.redb`).
//!
//! The entry is the authority on whether a replica exists: it is committed
//! before the replica's directory is made and removed before the directory
//! is, so a directory without an entry is always a leftover (of a drop, or
//! of a create that failed), never a live replica.
//!
//! One table, `replicas`: `(collection id, shard)` → [`ReplicaEntry`], a
//! versioned envelope of the replica's spec (its own shape, so a change of
//! [`ReplicaSpec`] cannot silently change the file). Every change commits
//! with fsync.

use std::path::Path;

use edgevec_proto::Metric;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::engine::{ReplicaKey, ReplicaSpec};
use crate::error::EngineError;

const REPLICAS: TableDefinition<(u64, u32), &[u8]> = TableDefinition::new("replicas");

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum ReplicaEntry {
    V1(EntryV1),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct EntryV1 {
    name: String,
    dim: u32,
    metric: Metric,
    seal_rows: u32,
}

pub struct Registry {
    db: Database,
}

impl Registry {
    /// Opens (creating if needed) the registry and returns it with every
    /// replica's spec, ordered by key.
    pub fn open(path: &Path) -> Result<(Registry, Vec<ReplicaSpec>), EngineError> {
        let db = Database::builder().set_cache_size(4 * 1024 * 1024).create(path)?;
        let txn = db.begin_write()?;
        txn.open_table(REPLICAS)?;
        txn.commit()?;

        let txn = db.begin_read()?;
        let mut specs = Vec::new();
        for entry in txn.open_table(REPLICAS)?.iter()? {
            let (k, v) = entry?;
            let (collection, shard) = k.value();
            let ReplicaEntry::V1(e) =
                postcard::from_bytes(v.value()).map_err(|e| EngineError::corrupt(path.display().to_string(), e))?;
            specs.push(ReplicaSpec {
                key: ReplicaKey { collection, shard },
                name: e.name,
                dim: e.dim,
                metric: e.metric,
                seal_rows: e.seal_rows,
            });
        }
        drop(txn);
        Ok((Registry { db }, specs))
    }

    /// Records `spec` durably (replacing an entry under the same key).
    pub fn insert(&self, spec: &ReplicaSpec) -> Result<(), EngineError> {
        let entry = ReplicaEntry::V1(EntryV1 {
            name: spec.name.clone(),
            dim: spec.dim,
            metric: spec.metric,
            seal_rows: spec.seal_rows,
        });
        let bytes = postcard::to_stdvec(&entry).expect("entries are plain data");
        let txn = self.begin()?;
        txn.open_table(REPLICAS)?
            .insert((spec.key.collection, spec.key.shard), bytes.as_slice())?;
        txn.commit()?;
        Ok(())
    }

    /// Removes the entry of `key` durably; false if there was none.
    pub fn remove(&self, key: ReplicaKey) -> Result<bool, EngineError> {
        let txn = self.begin()?;
        let removed = txn.open_table(REPLICAS)?.remove((key.collection, key.shard))?.is_some();
        txn.commit()?;
        Ok(removed)
    }

    fn begin(&self) -> Result<redb::WriteTransaction, EngineError> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::Immediate)
            .map_err(|e| EngineError::Storage(e.into()))?;
        Ok(txn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(collection: u64, shard: u32) -> ReplicaSpec {
        ReplicaSpec {
            key: ReplicaKey { collection, shard },
            name: format!("c{collection}"),
            dim: 4,
            metric: Metric::Cosine,
            seal_rows: 100,
        }
    }

    #[test]
    fn persists_entries_in_key_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("replicas.redb");
        {
            let (r, specs) = Registry::open(&path).unwrap();
            assert!(specs.is_empty());
            r.insert(&spec(9, 0)).unwrap();
            r.insert(&spec(2, 1)).unwrap();
            r.insert(&spec(2, 0)).unwrap();
            assert!(r.remove(spec(9, 0).key).unwrap());
            assert!(!r.remove(spec(9, 0).key).unwrap());
        }
        let (_, specs) = Registry::open(&path).unwrap();
        assert_eq!(specs, vec![spec(2, 0), spec(2, 1)]);
    }
}
