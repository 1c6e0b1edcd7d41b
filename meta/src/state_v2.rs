//! The V2 shape of the whole metadata state (stable collection ids, before
//! policy plugins were deployed through the metadata), kept only to read
//! `SnapshotBody::V2` snapshots stored or sent by older builds.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::state::{MetaState, NodeRecord, PluginRecord};
use crate::state_v3::CollectionRecordV2;

/// The whole state as a V2 snapshot holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct MetaStateV2 {
    pub nodes: BTreeMap<u64, NodeRecord>,
    pub collections: BTreeMap<String, CollectionRecordV2>,
    pub plugins: BTreeMap<(String, String), PluginRecord>,
    pub settings: BTreeMap<String, String>,
    pub next_collection_id: u64,
}

impl MetaStateV2 {
    /// The same state, with no deployed plugin and every collection on
    /// the default load balancer (V2 had neither).
    pub(crate) fn upgrade(self) -> MetaState {
        MetaState {
            nodes: self.nodes,
            collections: self.collections.into_iter().map(|(n, c)| (n, c.upgrade())).collect(),
            plugins: self.plugins,
            settings: self.settings,
            next_collection_id: self.next_collection_id,
            ..MetaState::default()
        }
    }
}
