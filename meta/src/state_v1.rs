//! The V1 shapes of the metadata (before stable collection ids and shard
//! configurations), kept only to read what older builds persisted, and
//! their one conversion to the current shapes.
//!
//! Three things can hold V1 data: a format-1 `meta-state.redb` (upgraded
//! in place on open by [`upgrade_file`]), a `SnapshotBody::V1` (stored, or
//! received from a leader running an older build), and V1 log entries
//! (those still apply, see `command.rs`).
//!
//! The conversion ([`upgrade_collections`]): collections get ids 1..=n in
//! (created_at_ms, name) order and the counter n + 1; each gets one replica
//! and `min_insync` 1 (what V1 served); V1 shard maps are dropped (nothing
//! ever acted on them). It depends only on the converted state, so replicas
//! converting the state of the same applied index reach the same ids.
//! Replicas converting at *different* indexes can disagree (a collection
//! dropped between the two indexes shifts the numbering), so upgrade a
//! cluster with the metadata quiet (no collection created or dropped while
//! its nodes restart). A node converts its rows and replaces its stored
//! snapshot at the same index, so what it later sends a lagging follower
//! matches its own state.

use std::collections::BTreeMap;

use edgevec_proto::CollectionSpec;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::command::ShardMap;
use crate::disk::{decode, stamp_format};
use crate::error::MetaStoreError;
use crate::shard::Replication;
use crate::snapshot;
use crate::state::{CollectionRecord, MetaState, NodeRecord, PluginRecord};
use crate::state_rows::{self, CollectionRow, STATE_FORMAT};
use crate::types::SnapshotMeta;

/// Format 1's collections table, by name. Deleted by the upgrade.
const COLLECTIONS_V1: TableDefinition<&str, &[u8]> = TableDefinition::new("collections");

/// A collection as V1 stored it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct CollectionRecordV1 {
    pub spec: CollectionSpec,
    pub created_at_ms: u64,
    pub shards: BTreeMap<u32, ShardMap>,
}

/// The whole state as a V1 snapshot holds it (`SnapshotBody::V1`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct MetaStateV1 {
    pub nodes: BTreeMap<u64, NodeRecord>,
    pub collections: BTreeMap<String, CollectionRecordV1>,
    pub plugins: BTreeMap<(String, String), PluginRecord>,
    pub settings: BTreeMap<String, String>,
}

impl MetaStateV1 {
    pub(crate) fn upgrade(self) -> MetaState {
        let (collections, next_collection_id) = upgrade_collections(self.collections.into_values());
        MetaState {
            nodes: self.nodes,
            collections,
            plugins: self.plugins,
            settings: self.settings,
            next_collection_id,
            ..MetaState::default()
        }
    }
}

/// V1 collections as current records, by name, and the next collection id
/// (see the module docs for the rule and its limits).
pub(crate) fn upgrade_collections(
    v1: impl IntoIterator<Item = CollectionRecordV1>,
) -> (BTreeMap<String, CollectionRecord>, u64) {
    let mut all: Vec<CollectionRecordV1> = v1.into_iter().collect();
    all.sort_by(|a, b| (a.created_at_ms, &a.spec.name).cmp(&(b.created_at_ms, &b.spec.name)));
    let next = all.len() as u64 + 1;
    let collections = (1..)
        .zip(all)
        .map(|(id, c)| {
            let record = CollectionRecord {
                id,
                spec: c.spec,
                replication: Replication::with_default_min(1),
                created_at_ms: c.created_at_ms,
                shards: BTreeMap::new(),
                index: edgevec_proto::IndexSpec::default(),
                fields: Vec::new(),
            };
            (record.spec.name.clone(), record)
        })
        .collect();
    (collections, next)
}

/// Upgrade a format-1 state file to the current format, in one
/// transaction: collection rows re-keyed by id as `CollectionRow::V3`, the
/// counter row written, the stored snapshot (if any) replaced by one of the
/// converted state at the applied index, and the format stamped. A crash
/// leaves the format-1 file, upgraded again at the next open.
pub(crate) fn upgrade_file(db: &Database) -> Result<(), MetaStoreError> {
    let (mut loaded, had_snapshot) = {
        let txn = db.begin_read()?;
        let mut loaded = state_rows::read_common(&txn)?;
        let mut v1 = Vec::new();
        for row in txn.open_table(COLLECTIONS_V1)?.iter()? {
            let (name, v) = row?;
            let what = format!("collection {:?}", name.value());
            match decode(&what, v.value())? {
                CollectionRow::V1(c) => v1.push(c),
                CollectionRow::V2(_) | CollectionRow::V3(_) | CollectionRow::V4(_) => {
                    return Err(MetaStoreError::corrupt(what, "a format-2 row in a format-1 table"));
                }
            }
        }
        let (collections, next) = upgrade_collections(v1);
        loaded.state.collections = collections;
        loaded.state.next_collection_id = next;
        let had_snapshot = snapshot::read_current_in(&txn)?.is_some();
        (loaded, had_snapshot)
    };
    let mut txn = db.begin_write()?;
    txn.set_durability(Durability::Immediate)?;
    txn.delete_table(COLLECTIONS_V1)?;
    state_rows::create_tables(&txn)?;
    state_rows::replace_all(&txn, &loaded.state)?;
    if had_snapshot {
        let meta = SnapshotMeta {
            last_log_id: loaded.last_applied,
            last_membership: std::mem::take(&mut loaded.last_membership),
            snapshot_id: snapshot::snapshot_id(loaded.last_applied),
        };
        let data = snapshot::encode_body(&loaded.state)?;
        snapshot::save_current(&txn, &meta, &data, false)?;
    }
    stamp_format(&txn, STATE_FORMAT)?;
    txn.commit()?;
    tracing::info!(
        collections = loaded.state.collections.len(),
        "upgraded the metadata state file to format {STATE_FORMAT}"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use edgevec_proto::Metric;
    use openraft::testing::log_id;
    use serde::Serialize;

    use super::*;
    use crate::command::{NodeState, ReplicaInfo, ReplicaState};
    use crate::state_rows::OLDEST_STATE_FORMAT;
    use crate::types::StoredMembership;
    use crate::StateMachineStore;

    /// Encodes exactly like any of our `V1` envelopes (postcard writes the
    /// variant index, not the name).
    #[derive(Serialize)]
    enum Envelope<T> {
        V1(T),
    }
    use Envelope::V1;

    fn spec(name: &str) -> CollectionSpec {
        CollectionSpec {
            name: name.into(),
            dim: 3,
            metric: Metric::Cosine,
            shards: 2,
            seal_rows: 10,
        }
    }

    fn v1_collection(name: &str, at: u64) -> CollectionRecordV1 {
        let map = ShardMap {
            epoch: 3,
            primary: Some(1),
            replicas: vec![ReplicaInfo {
                node: 1,
                state: ReplicaState::InSync,
            }],
        };
        CollectionRecordV1 {
            spec: spec(name),
            created_at_ms: at,
            shards: BTreeMap::from([(0, map)]),
        }
    }

    /// A `meta-state.redb` as format 1 wrote it.
    fn write_format1(path: &std::path::Path, collections: &[CollectionRecordV1], snapshot: &MetaStateV1) {
        let db = Database::create(path).unwrap();
        let txn = db.begin_write().unwrap();
        stamp_format(&txn, OLDEST_STATE_FORMAT).unwrap();
        let node = NodeRecord {
            id: 1,
            addr: "10.0.0.1:7000".into(),
            zone: "a".into(),
            roles: vec!["data".into()],
            state: NodeState::Up,
            state_since_ms: 0,
        };
        let bytes = postcard::to_allocvec(&V1(node)).unwrap();
        txn.open_table(TableDefinition::<u64, &[u8]>::new("nodes"))
            .unwrap()
            .insert(1, bytes.as_slice())
            .unwrap();
        {
            let mut table = txn.open_table(COLLECTIONS_V1).unwrap();
            for c in collections {
                let bytes = postcard::to_allocvec(&V1(c)).unwrap();
                table.insert(c.spec.name.as_str(), bytes.as_slice()).unwrap();
            }
        }
        txn.open_table(TableDefinition::<&str, &[u8]>::new("settings"))
            .unwrap()
            .insert("k", b"v".as_slice())
            .unwrap();
        txn.open_table(TableDefinition::<(&str, &str), &[u8]>::new("plugins"))
            .unwrap();
        state_rows::write_applied(&txn, Some(log_id(2, 1, 9)), &StoredMembership::default()).unwrap();
        let meta = SnapshotMeta {
            last_log_id: Some(log_id(1, 1, 4)),
            last_membership: StoredMembership::default(),
            snapshot_id: "old".into(),
        };
        let body = postcard::to_allocvec(&V1(snapshot)).unwrap();
        snapshot::save_current(&txn, &meta, &body, false).unwrap();
        txn.commit().unwrap();
    }

    #[test]
    fn format1_file_is_upgraded_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta-state.redb");
        let rows = [v1_collection("b", 5), v1_collection("a", 5), v1_collection("c", 1)];
        // The stored snapshot is older (index 4) and still had "z".
        let old = MetaStateV1 {
            collections: [v1_collection("z", 0)]
                .into_iter()
                .map(|c| (c.spec.name.clone(), c))
                .collect(),
            ..MetaStateV1::default()
        };
        write_format1(&path, &rows, &old);

        let sm = StateMachineStore::open(&path).unwrap();
        let state = sm.state();
        let ids: Vec<(&str, u64)> = state.collections().map(|c| (c.spec.name.as_str(), c.id)).collect();
        assert_eq!(ids, vec![("a", 2), ("b", 3), ("c", 1)]);
        assert_eq!(state.next_collection_id, 4);
        assert!(state.collections().all(|c| c.shards.is_empty()));
        assert_eq!(state.node(1).unwrap().zone, "a");
        assert_eq!(state.setting("k"), Some("v"));
        assert_eq!(sm.applied().0, Some(log_id(2, 1, 9)));
        drop(sm);

        // Stamped format 2, the old table gone, the snapshot replaced by one
        // of the converted state at the applied index.
        let db = Database::create(&path).unwrap();
        let (meta, data) = snapshot::read_current(&db).unwrap().unwrap();
        assert_eq!(meta.last_log_id, Some(log_id(2, 1, 9)));
        assert_eq!(snapshot::decode_body(&data).unwrap(), *state);
        let txn = db.begin_read().unwrap();
        assert!(matches!(
            txn.open_table(COLLECTIONS_V1),
            Err(redb::TableError::TableDoesNotExist(_))
        ));
        drop(txn);
        drop(db);
        let (_, format) = crate::disk::open_db(&path, STATE_FORMAT..=STATE_FORMAT, |_| Ok(())).unwrap();
        assert_eq!(format, STATE_FORMAT);

        // Reopening reads the same state, and ids go on from the counter.
        let sm = StateMachineStore::open(&path).unwrap();
        assert_eq!(sm.state(), state);
        let mut next = (*sm.state()).clone();
        let create = crate::CommandV1::CreateCollection {
            spec: spec("d"),
            at_ms: 0,
        };
        assert!(next.apply(&create.into()).is_ok());
        assert_eq!(next.collection("d").unwrap().id, 4);
    }

    #[test]
    fn conversion_orders_by_creation_then_name() {
        let (c, next) = upgrade_collections([v1_collection("y", 2), v1_collection("x", 2), v1_collection("w", 3)]);
        let ids: Vec<(&str, u64)> = c.values().map(|c| (c.spec.name.as_str(), c.id)).collect();
        assert_eq!(ids, vec![("w", 3), ("x", 1), ("y", 2)]);
        assert_eq!(next, 4);
        assert_eq!(upgrade_collections([]).1, 1);
    }
}
