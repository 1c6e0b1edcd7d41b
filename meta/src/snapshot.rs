//! Metadata snapshots: their format, how they are built, and where the
//! current one is kept.
//!
//! A snapshot's data is postcard of [`SnapshotBody`], a versioned envelope
//! around the whole [`MetaState`] (`V5`; a `V1` to `V4` body, from an older
//! build, is converted as `state_v1` to `state_v4` describe); its
//! [`SnapshotMeta`] (last log id, last membership, id) travels beside it,
//! as openraft wants.
//!
//! Invariants:
//! - a snapshot is a point-in-time view: the builder captures the state
//!   `Arc`, last applied id and membership together, at the moment openraft
//!   asks for the builder, so the data always matches `meta.last_log_id`;
//! - the current snapshot is persisted (table `snapshot` of
//!   `meta-state.redb`) so a restarted node can still send it to a lagging
//!   follower whose entries it has purged; a build never replaces a newer
//!   stored snapshot (an install may have landed meanwhile).

use std::io::Cursor;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use openraft::RaftSnapshotBuilder;
use redb::{Database, Durability, ReadTransaction, ReadableDatabase, ReadableTable, WriteTransaction};
use serde::{Deserialize, Serialize, Serializer};

use crate::disk::{blocking, decode, encode};
use crate::error::{MetaStoreError, Subject};
use crate::state::MetaState;
use crate::state_rows::SNAPSHOT;
use crate::state_v1::MetaStateV1;
use crate::state_v2::MetaStateV2;
use crate::state_v3::MetaStateV3;
use crate::state_v4::MetaStateV4;
use crate::types::{LogId, Snapshot, SnapshotMeta, StorageError, StoredMembership, TypeConfig};

const CURRENT_KEY: &str = "current";

/// What a snapshot's data decodes to.
#[derive(Serialize, Deserialize)]
enum SnapshotBody {
    V1(MetaStateV1),
    V2(MetaStateV2),
    V3(MetaStateV3),
    V4(MetaStateV4),
    V5(MetaState),
}

/// `SnapshotBody::V5` for encoding, borrowing the state (it can hold
/// megabytes of plugins): the same bytes as the owned value.
struct SnapshotBodyRef<'a>(&'a MetaState);

impl Serialize for SnapshotBodyRef<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // Variant index 4 is `SnapshotBody::V5`.
        s.serialize_newtype_variant("SnapshotBody", 4, "V5", self.0)
    }
}

/// The current snapshot as stored.
#[derive(Serialize, Deserialize)]
enum StoredSnapshot {
    V1 { meta: SnapshotMeta, data: Vec<u8> },
}

/// Encode a state as snapshot data.
pub(crate) fn encode_body(state: &MetaState) -> Result<Vec<u8>, MetaStoreError> {
    encode("snapshot", &SnapshotBodyRef(state))
}

/// Decode snapshot data received from a leader or read from disk.
pub(crate) fn decode_body(data: &[u8]) -> Result<MetaState, MetaStoreError> {
    Ok(match decode("snapshot", data)? {
        SnapshotBody::V1(old) => old.upgrade(),
        SnapshotBody::V2(old) => old.upgrade(),
        SnapshotBody::V3(old) => old.upgrade(),
        SnapshotBody::V4(old) => old.upgrade(),
        SnapshotBody::V5(state) => state,
    })
}

/// Store `meta` + `data` as the current snapshot, unless a snapshot of a
/// later log id is already stored (when `only_if_newer`).
pub(crate) fn save_current(
    txn: &WriteTransaction,
    meta: &SnapshotMeta,
    data: &[u8],
    only_if_newer: bool,
) -> Result<bool, MetaStoreError> {
    let mut table = txn.open_table(SNAPSHOT)?;
    if only_if_newer {
        if let Some(old) = table.get(CURRENT_KEY)? {
            let StoredSnapshot::V1 { meta: old_meta, .. } = decode("stored snapshot", old.value())?;
            if old_meta.last_log_id > meta.last_log_id {
                return Ok(false);
            }
        }
    }
    let bytes = encode(
        "stored snapshot",
        &StoredSnapshot::V1 {
            meta: meta.clone(),
            data: data.to_vec(),
        },
    )?;
    table.insert(CURRENT_KEY, bytes.as_slice())?;
    Ok(true)
}

/// The stored current snapshot, if any.
pub(crate) fn read_current(db: &Database) -> Result<Option<(SnapshotMeta, Vec<u8>)>, MetaStoreError> {
    read_current_in(&db.begin_read()?)
}

/// [`read_current`] within a read transaction.
pub(crate) fn read_current_in(txn: &ReadTransaction) -> Result<Option<(SnapshotMeta, Vec<u8>)>, MetaStoreError> {
    let table = txn.open_table(SNAPSHOT)?;
    let Some(v) = table.get(CURRENT_KEY)? else {
        return Ok(None);
    };
    let StoredSnapshot::V1 { meta, data } = decode("stored snapshot", v.value())?;
    Ok(Some((meta, data)))
}

/// Builds a snapshot of the state as it was when the builder was made.
pub struct StateMachineSnapshotBuilder {
    pub(crate) db: Arc<Database>,
    pub(crate) state: Arc<MetaState>,
    pub(crate) last_applied: Option<LogId>,
    pub(crate) last_membership: StoredMembership,
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineSnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        let meta = SnapshotMeta {
            last_log_id: self.last_applied,
            last_membership: self.last_membership.clone(),
            snapshot_id: snapshot_id(self.last_applied),
        };
        let db = self.db.clone();
        let state = self.state.clone();
        let stored_meta = meta.clone();
        let data = blocking(move || {
            let data = encode_body(&state)?;
            let mut txn = db.begin_write()?;
            txn.set_durability(Durability::Immediate)?;
            if save_current(&txn, &stored_meta, &data, true)? {
                txn.commit()?;
            } else {
                txn.abort()?;
            }
            Ok(data)
        })
        .await
        .map_err(|e| e.into_raft(Subject::WriteSnapshot))?;
        tracing::info!(snapshot = %meta, bytes = data.len(), "built metadata snapshot");
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

/// Unique enough: the log position plus the wall clock (two builds at the
/// same position hold the same state anyway).
pub(crate) fn snapshot_id(last: Option<LogId>) -> String {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    match last {
        Some(l) => format!("{}-{}-{now_ms}", l.leader_id, l.index),
        None => format!("empty-{now_ms}"),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use edgevec_proto::{CollectionSpec, Metric};

    use super::*;
    use crate::state_v1::CollectionRecordV1;

    fn spec(name: &str) -> CollectionSpec {
        CollectionSpec {
            name: name.into(),
            dim: 4,
            metric: Metric::L2,
            shards: 1,
            seal_rows: 10,
        }
    }

    #[test]
    fn borrowed_body_encodes_like_the_owned_v5() {
        let mut state = MetaState::default();
        state.settings.insert("k".into(), "v".into());
        state.next_collection_id = 7;
        state.balancers.insert(3, "random".into());
        let owned = postcard::to_allocvec(&SnapshotBody::V5(state.clone())).unwrap();
        assert_eq!(encode_body(&state).unwrap(), owned);
        assert_eq!(decode_body(&owned).unwrap(), state);
    }

    #[test]
    fn v3_body_is_converted_with_default_index_parameters() {
        let record = crate::state_v3::CollectionRecordV2 {
            id: 4,
            spec: spec("old"),
            replication: crate::Replication {
                replicas: 1,
                min_insync: 1,
            },
            created_at_ms: 11,
            shards: BTreeMap::new(),
        };
        let v3 = MetaStateV3 {
            nodes: BTreeMap::new(),
            collections: [("old".to_owned(), record)].into(),
            plugins: BTreeMap::new(),
            settings: BTreeMap::new(),
            next_collection_id: 5,
            deployed: BTreeMap::new(),
            balancers: [(4, "random".to_owned())].into(),
        };
        let data = postcard::to_allocvec(&SnapshotBody::V3(v3)).unwrap();
        let state = decode_body(&data).unwrap();
        let c = state.collection("old").unwrap();
        assert_eq!((c.id, c.created_at_ms), (4, 11));
        assert_eq!(c.index, edgevec_proto::IndexSpec::default());
        assert_eq!(state.load_balancer_of(4), "random");
    }

    #[test]
    fn v4_body_is_converted_without_payload_indexes() {
        let record = crate::state_v4::CollectionRecordV3 {
            id: 6,
            spec: spec("tuned"),
            replication: crate::Replication {
                replicas: 1,
                min_insync: 1,
            },
            created_at_ms: 12,
            shards: BTreeMap::new(),
            index: edgevec_proto::IndexSpec {
                m: 8,
                ef_construction: 64,
            },
        };
        let v4 = MetaStateV4 {
            nodes: BTreeMap::new(),
            collections: [("tuned".to_owned(), record)].into(),
            plugins: BTreeMap::new(),
            settings: BTreeMap::new(),
            next_collection_id: 7,
            deployed: BTreeMap::new(),
            balancers: BTreeMap::new(),
        };
        let data = postcard::to_allocvec(&SnapshotBody::V4(v4)).unwrap();
        let state = decode_body(&data).unwrap();
        let c = state.collection("tuned").unwrap();
        assert_eq!((c.id, c.index.m, c.index.ef_construction), (6, 8, 64));
        assert!(c.fields.is_empty());
    }

    #[test]
    fn v2_body_is_converted() {
        let v2 = MetaStateV2 {
            nodes: BTreeMap::new(),
            collections: BTreeMap::new(),
            plugins: BTreeMap::new(),
            settings: [("k".to_owned(), "v".to_owned())].into(),
            next_collection_id: 9,
        };
        let data = postcard::to_allocvec(&SnapshotBody::V2(v2)).unwrap();
        let state = decode_body(&data).unwrap();
        assert_eq!(state.next_collection_id, 9);
        assert_eq!(state.setting("k"), Some("v"));
        assert!(state.deployed.is_empty() && state.balancers.is_empty());
    }

    #[test]
    fn v1_body_is_converted() {
        let v1 = MetaStateV1 {
            collections: [("b", 5), ("a", 5), ("c", 1)]
                .into_iter()
                .map(|(name, at)| {
                    (
                        name.to_owned(),
                        CollectionRecordV1 {
                            spec: spec(name),
                            created_at_ms: at,
                            shards: BTreeMap::from([(0, crate::ShardMap::default())]),
                        },
                    )
                })
                .collect(),
            settings: [("k".to_owned(), "v".to_owned())].into(),
            ..MetaStateV1::default()
        };
        let data = postcard::to_allocvec(&SnapshotBody::V1(v1)).unwrap();
        let state = decode_body(&data).unwrap();
        // Ids in (created_at_ms, name) order; shard maps dropped.
        let ids: Vec<(&str, u64)> = state.collections().map(|c| (c.spec.name.as_str(), c.id)).collect();
        assert_eq!(ids, vec![("a", 2), ("b", 3), ("c", 1)]);
        assert_eq!(state.next_collection_id, 4);
        assert!(state.collections().all(|c| c.shards.is_empty()
            && c.replication
                == crate::Replication {
                    replicas: 1,
                    min_insync: 1
                }));
        assert_eq!(state.setting("k"), Some("v"));
        assert_eq!(decode_body(&data).unwrap(), state, "deterministic");
    }
}
