//! The V3 shape of the whole metadata state and the V2 shape of a
//! collection record (before collections chose their index parameters),
//! kept only to read `SnapshotBody::V3` snapshots and `CollectionRow::V2`
//! rows stored or sent by older builds.

use std::collections::BTreeMap;

use edgevec_proto::{CollectionSpec, IndexSpec};
use serde::{Deserialize, Serialize};

use crate::plugins::DeployedPlugin;
use crate::shard::{Replication, ShardConfig};
use crate::state::{CollectionRecord, MetaState, NodeRecord, PluginRecord};

/// A collection as V2 rows and V2/V3 snapshots hold it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct CollectionRecordV2 {
    pub id: u64,
    pub spec: CollectionSpec,
    pub replication: Replication,
    pub created_at_ms: u64,
    pub shards: BTreeMap<u32, ShardConfig>,
}

impl CollectionRecordV2 {
    /// The same collection, with the default index parameters (what it
    /// is rebuilt with).
    pub(crate) fn upgrade(self) -> CollectionRecord {
        CollectionRecord {
            id: self.id,
            spec: self.spec,
            replication: self.replication,
            created_at_ms: self.created_at_ms,
            shards: self.shards,
            index: IndexSpec::default(),
            fields: Vec::new(),
        }
    }
}

/// The whole state as the V3 and V4 snapshots hold it, with the
/// collection record of their time (`C`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct MetaStateWith<C> {
    pub nodes: BTreeMap<u64, NodeRecord>,
    pub collections: BTreeMap<String, C>,
    pub plugins: BTreeMap<(String, String), PluginRecord>,
    pub settings: BTreeMap<String, String>,
    pub next_collection_id: u64,
    pub deployed: BTreeMap<String, DeployedPlugin>,
    pub balancers: BTreeMap<u64, String>,
}

/// The whole state as a V3 snapshot holds it.
pub(crate) type MetaStateV3 = MetaStateWith<CollectionRecordV2>;

impl<C: Into<CollectionRecord>> MetaStateWith<C> {
    pub(crate) fn upgrade(self) -> MetaState {
        MetaState {
            nodes: self.nodes,
            collections: self.collections.into_iter().map(|(n, c)| (n, c.into())).collect(),
            plugins: self.plugins,
            settings: self.settings,
            next_collection_id: self.next_collection_id,
            deployed: self.deployed,
            balancers: self.balancers,
        }
    }
}

impl From<CollectionRecordV2> for CollectionRecord {
    fn from(c: CollectionRecordV2) -> CollectionRecord {
        c.upgrade()
    }
}
