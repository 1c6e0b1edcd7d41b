//! The registry: which shard replicas this node holds (`replicas.redb`).
//!
//! The entry is the authority on whether a replica exists: it is committed
//! before the replica's directory is made and removed before the directory
//! is, so a directory without an entry is always a leftover (of a drop, or
//! of a create that failed), never a live replica.
//!
//! A replica whose files could not be opened keeps its entry with the
//! [`Damage`] recorded (V2): the empty replica put in its directory is
//! never taken for the data until an import replaces it, across restarts.
//!
//! One table, `replicas`: `(collection id, shard)` → [`ReplicaEntry`], a
//! versioned envelope of the replica's spec (its own shape, so a change of
//! [`ReplicaSpec`] cannot silently change the file). V1 entries (no damage
//! field) are still read. Every change commits with fsync.

use std::path::{Path, PathBuf};

use edgevec_proto::{FieldSpec, IndexSpec, Metric};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::engine::{Damage, ReplicaKey, ReplicaSpec};
use crate::error::EngineError;

const REPLICAS: TableDefinition<(u64, u32), &[u8]> = TableDefinition::new("replicas");

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum ReplicaEntry {
    V1(EntryV1),
    V2(EntryV2),
    V3(EntryV3),
    V4(EntryV4),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct EntryV1 {
    name: String,
    dim: u32,
    metric: Metric,
    seal_rows: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct EntryV2 {
    name: String,
    dim: u32,
    metric: Metric,
    seal_rows: u32,
    damage: Option<DamageV1>,
}

/// V2 and the index parameters (V1 and V2 entries have the defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct EntryV3 {
    name: String,
    dim: u32,
    metric: Metric,
    seal_rows: u32,
    damage: Option<DamageV1>,
    hnsw_m: u32,
    ef_construction: u32,
}

/// V3 and the payload indexes (earlier entries have none).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct EntryV4 {
    name: String,
    dim: u32,
    metric: Metric,
    seal_rows: u32,
    damage: Option<DamageV1>,
    hnsw_m: u32,
    ef_construction: u32,
    fields: Vec<FieldSpec>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct DamageV1 {
    file: String,
    reason: String,
    kept_at: String,
}

impl EntryV2 {
    /// The same entry, with the default index parameters (V2 had none).
    fn upgrade(self) -> EntryV3 {
        let index = IndexSpec::default();
        EntryV3 {
            name: self.name,
            dim: self.dim,
            metric: self.metric,
            seal_rows: self.seal_rows,
            damage: self.damage,
            hnsw_m: index.m,
            ef_construction: index.ef_construction,
        }
    }
}

impl EntryV3 {
    /// The same entry, without payload indexes (V3 had none).
    fn upgrade(self) -> EntryV4 {
        EntryV4 {
            name: self.name,
            dim: self.dim,
            metric: self.metric,
            seal_rows: self.seal_rows,
            damage: self.damage,
            hnsw_m: self.hnsw_m,
            ef_construction: self.ef_construction,
            fields: Vec::new(),
        }
    }
}

impl EntryV4 {
    fn new(spec: &ReplicaSpec, damage: Option<&Damage>) -> Self {
        EntryV4 {
            name: spec.name.clone(),
            dim: spec.dim,
            metric: spec.metric,
            seal_rows: spec.seal_rows,
            damage: damage.map(|d| DamageV1 {
                file: d.file.display().to_string(),
                reason: d.reason.clone(),
                kept_at: d.kept_at.display().to_string(),
            }),
            hnsw_m: spec.index.m,
            ef_construction: spec.index.ef_construction,
            fields: spec.fields.clone(),
        }
    }
}

/// A replica the registry names: its spec, and why its files were set
/// aside if they were.
pub type Entry = (ReplicaSpec, Option<Damage>);

pub struct Registry {
    path: PathBuf,
    /// `None` after a write failed: redb refuses every later write until
    /// the database is reopened, which the next write does.
    db: Option<Database>,
}

fn open_db(path: &Path) -> Result<Database, EngineError> {
    Ok(Database::builder().set_cache_size(4 * 1024 * 1024).create(path)?)
}

impl Registry {
    /// Opens (creating if needed) the registry and returns it with every
    /// replica's entry, ordered by key.
    pub fn open(path: &Path) -> Result<(Registry, Vec<Entry>), EngineError> {
        let db = open_db(path)?;
        let txn = db.begin_write()?;
        txn.open_table(REPLICAS)?;
        txn.commit()?;

        let txn = db.begin_read()?;
        let mut specs = Vec::new();
        for entry in txn.open_table(REPLICAS)?.iter()? {
            let (k, v) = entry?;
            let (collection, shard) = k.value();
            let e = match postcard::from_bytes(v.value())
                .map_err(|e| EngineError::corrupt(path.display().to_string(), e))?
            {
                ReplicaEntry::V1(e) => EntryV2 {
                    name: e.name,
                    dim: e.dim,
                    metric: e.metric,
                    seal_rows: e.seal_rows,
                    damage: None,
                }
                .upgrade()
                .upgrade(),
                ReplicaEntry::V2(e) => e.upgrade().upgrade(),
                ReplicaEntry::V3(e) => e.upgrade(),
                ReplicaEntry::V4(e) => e,
            };
            let spec = ReplicaSpec {
                key: ReplicaKey { collection, shard },
                name: e.name,
                dim: e.dim,
                metric: e.metric,
                seal_rows: e.seal_rows,
                index: IndexSpec {
                    m: e.hnsw_m,
                    ef_construction: e.ef_construction,
                },
                fields: e.fields,
            };
            let damage = e.damage.map(|d| Damage {
                file: PathBuf::from(d.file),
                reason: d.reason,
                kept_at: PathBuf::from(d.kept_at),
            });
            specs.push((spec, damage));
        }
        drop(txn);
        let registry = Registry {
            path: path.to_owned(),
            db: Some(db),
        };
        Ok((registry, specs))
    }

    /// Records `spec` durably (replacing an entry under the same key, and
    /// any damage recorded for it).
    pub fn insert(&mut self, spec: &ReplicaSpec) -> Result<(), EngineError> {
        self.put(spec, None)
    }

    /// Records durably that the files of `spec`'s replica were set aside.
    pub fn mark_damaged(&mut self, spec: &ReplicaSpec, damage: &Damage) -> Result<(), EngineError> {
        self.put(spec, Some(damage))
    }

    fn put(&mut self, spec: &ReplicaSpec, damage: Option<&Damage>) -> Result<(), EngineError> {
        let entry = ReplicaEntry::V4(EntryV4::new(spec, damage));
        let bytes = postcard::to_stdvec(&entry).expect("entries are plain data");
        self.write(|txn| {
            txn.open_table(REPLICAS)?
                .insert((spec.key.collection, spec.key.shard), bytes.as_slice())?;
            Ok(())
        })
    }

    /// Removes the entry of `key` durably; false if there was none.
    pub fn remove(&mut self, key: ReplicaKey) -> Result<bool, EngineError> {
        self.write(|txn| Ok(txn.open_table(REPLICAS)?.remove((key.collection, key.shard))?.is_some()))
    }

    /// Runs `f` in a durable write transaction. A storage failure closes
    /// the database, so the next write starts from a reopened file.
    fn write<T>(
        &mut self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<T, EngineError>,
    ) -> Result<T, EngineError> {
        if self.db.is_none() {
            self.db = Some(open_db(&self.path)?);
        }
        let db = self.db.as_ref().expect("opened above");
        let result = (|| {
            let mut txn = db.begin_write()?;
            txn.set_durability(Durability::Immediate)
                .map_err(|e| EngineError::Storage(e.into()))?;
            let out = f(&txn)?;
            txn.commit()?;
            Ok(out)
        })();
        if matches!(result, Err(EngineError::Storage(_))) {
            self.db = None;
        }
        result
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
            index: Default::default(),
            fields: Vec::new(),
        }
    }

    /// A spec with index parameters and payload indexes of its own.
    fn tuned(mut s: ReplicaSpec) -> ReplicaSpec {
        s.index = IndexSpec {
            m: 8,
            ef_construction: 40,
        };
        s.fields = vec![
            FieldSpec::parse("lang:keyword").unwrap(),
            FieldSpec::parse("year:int").unwrap(),
        ];
        s
    }

    #[test]
    fn persists_entries_in_key_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("replicas.redb");
        {
            let (mut r, specs) = Registry::open(&path).unwrap();
            assert!(specs.is_empty());
            r.insert(&spec(9, 0)).unwrap();
            r.insert(&tuned(spec(2, 1))).unwrap();
            r.insert(&spec(2, 0)).unwrap();
            assert!(r.remove(spec(9, 0).key).unwrap());
            assert!(!r.remove(spec(9, 0).key).unwrap());
        }
        let (_, specs) = Registry::open(&path).unwrap();
        assert_eq!(specs, vec![(spec(2, 0), None), (tuned(spec(2, 1)), None)]);
    }

    #[test]
    fn damage_is_kept_until_the_entry_is_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("replicas.redb");
        let damage = Damage {
            file: "/d/replicas/2-0/shard.redb".into(),
            reason: "bad page".into(),
            kept_at: "/d/damaged/2-0-1".into(),
        };
        {
            let (mut r, _) = Registry::open(&path).unwrap();
            r.insert(&spec(2, 0)).unwrap();
            r.mark_damaged(&spec(2, 0), &damage).unwrap();
        }
        let (mut r, specs) = Registry::open(&path).unwrap();
        assert_eq!(specs, vec![(spec(2, 0), Some(damage))]);
        r.insert(&spec(2, 0)).unwrap();
        drop(r);
        assert_eq!(Registry::open(&path).unwrap().1, vec![(spec(2, 0), None)]);
    }

    #[test]
    fn v2_entries_are_read_with_the_default_index_parameters() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("replicas.redb");
        {
            let (r, _) = Registry::open(&path).unwrap();
            let s = spec(4, 0);
            let bytes = postcard::to_stdvec(&ReplicaEntry::V2(EntryV2 {
                name: s.name.clone(),
                dim: s.dim,
                metric: s.metric,
                seal_rows: s.seal_rows,
                damage: None,
            }))
            .unwrap();
            let txn = r.db.as_ref().unwrap().begin_write().unwrap();
            txn.open_table(REPLICAS)
                .unwrap()
                .insert((4, 0), bytes.as_slice())
                .unwrap();
            txn.commit().unwrap();
        }
        let specs = Registry::open(&path).unwrap().1;
        assert_eq!(specs, vec![(spec(4, 0), None)]);
        assert_eq!(specs[0].0.index, IndexSpec::default());
    }

    #[test]
    fn v1_entries_are_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("replicas.redb");
        {
            let (r, _) = Registry::open(&path).unwrap();
            let s = spec(3, 1);
            let bytes = postcard::to_stdvec(&ReplicaEntry::V1(EntryV1 {
                name: s.name.clone(),
                dim: s.dim,
                metric: s.metric,
                seal_rows: s.seal_rows,
            }))
            .unwrap();
            let txn = r.db.as_ref().unwrap().begin_write().unwrap();
            txn.open_table(REPLICAS)
                .unwrap()
                .insert((3, 1), bytes.as_slice())
                .unwrap();
            txn.commit().unwrap();
        }
        assert_eq!(Registry::open(&path).unwrap().1, vec![(spec(3, 1), None)]);
    }
}
