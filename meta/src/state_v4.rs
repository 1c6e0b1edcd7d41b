//! The V4 shape of the whole metadata state and the V3 shape of a
//! collection record (before collections declared payload indexes), kept
//! only to read `SnapshotBody::V4` snapshots and `CollectionRow::V3` rows
//! stored or sent by older builds.

use std::collections::BTreeMap;

use edgevec_proto::{CollectionSpec, IndexSpec};
use serde::{Deserialize, Serialize};

use crate::shard::{Replication, ShardConfig};
use crate::state::CollectionRecord;

/// A collection as V3 rows and V4 snapshots hold it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct CollectionRecordV3 {
    pub id: u64,
    pub spec: CollectionSpec,
    pub replication: Replication,
    pub created_at_ms: u64,
    pub shards: BTreeMap<u32, ShardConfig>,
    pub index: IndexSpec,
}

impl CollectionRecordV3 {
    /// The same collection, without payload indexes.
    pub(crate) fn upgrade(self) -> CollectionRecord {
        CollectionRecord {
            id: self.id,
            spec: self.spec,
            replication: self.replication,
            created_at_ms: self.created_at_ms,
            shards: self.shards,
            index: self.index,
            fields: Vec::new(),
        }
    }
}

/// The whole state as a V4 snapshot holds it.
pub(crate) type MetaStateV4 = crate::state_v3::MetaStateWith<CollectionRecordV3>;

impl From<CollectionRecordV3> for CollectionRecord {
    fn from(c: CollectionRecordV3) -> CollectionRecord {
        c.upgrade()
    }
}
