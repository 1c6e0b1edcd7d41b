//! The cluster metadata as plain data, and the pure function that applies a
//! command to it.
//!
//! [`MetaState::apply`] is the whole business logic of the metadata state
//! machine, kept free of I/O so it is tested directly. Invariants:
//! - **deterministic**: the result depends only on the state and the
//!   command (no clock, no randomness, no iteration over hash maps), because
//!   every replica applies the same log and must reach the same state;
//! - **all or nothing**: a rejected command changes nothing;
//! - every command touches exactly one entity (one node, one collection,
//!   one plugin version or one setting), which is what lets the store write
//!   one row per applied command (see `state_rows`).

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

use edgevec_proto::CollectionSpec;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::command::{CommandV1, MetaCommand, MetaResponse, NodeState, RejectCode, ShardMap};

/// Everything the metadata Raft replicates.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MetaState {
    pub nodes: BTreeMap<u64, NodeRecord>,
    pub collections: BTreeMap<String, CollectionRecord>,
    /// Keyed by (name, version).
    pub plugins: BTreeMap<(String, String), PluginRecord>,
    pub settings: BTreeMap<String, String>,
}

/// A registered node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: u64,
    pub addr: String,
    pub zone: String,
    pub roles: Vec<String>,
    pub state: NodeState,
    /// When the node entered `state` (proposer's clock, ms since the Unix
    /// epoch). 0 when it came `Up` by registering: that command carries no
    /// clock, and a state machine must not read one.
    pub state_since_ms: u64,
}

impl NodeRecord {
    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }
}

/// A collection and the maps of its shards.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CollectionRecord {
    pub spec: CollectionSpec,
    pub created_at_ms: u64,
    /// Shard number → map. A shard without an entry has not been placed yet.
    pub shards: BTreeMap<u32, ShardMap>,
}

/// One registered plugin version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginRecord {
    pub sha256: [u8; 32],
    pub bytes: PluginBytes,
}

/// Plugin bytes, shared rather than copied: the state is cloned after every
/// apply (to publish it to watchers), and a module can be megabytes.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct PluginBytes(Arc<[u8]>);

impl Deref for PluginBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl From<Vec<u8>> for PluginBytes {
    fn from(v: Vec<u8>) -> Self {
        PluginBytes(v.into())
    }
}

impl From<&[u8]> for PluginBytes {
    fn from(v: &[u8]) -> Self {
        PluginBytes(v.into())
    }
}

impl fmt::Debug for PluginBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<{} bytes>", self.0.len())
    }
}

// Encoded exactly like a `Vec<u8>`, so the format does not depend on the
// sharing.
impl Serialize for PluginBytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.as_ref().serialize(s)
    }
}

impl<'de> Deserialize<'de> for PluginBytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Vec::<u8>::deserialize(d).map(PluginBytes::from)
    }
}

impl MetaState {
    /// Apply one command. Pure: see the module docs.
    pub fn apply(&mut self, cmd: &MetaCommand) -> MetaResponse {
        match cmd {
            MetaCommand::V1(c) => self.apply_v1(c),
        }
    }

    fn apply_v1(&mut self, cmd: &CommandV1) -> MetaResponse {
        match cmd {
            CommandV1::RegisterNode { id, addr, zone, roles } => {
                if addr.is_empty() {
                    return invalid(format!("node {id}: address is empty"));
                }
                let since = match self.nodes.get(id) {
                    Some(old) if old.state == NodeState::Up => old.state_since_ms,
                    _ => 0,
                };
                self.nodes.insert(
                    *id,
                    NodeRecord {
                        id: *id,
                        addr: addr.clone(),
                        zone: zone.clone(),
                        roles: roles.clone(),
                        state: NodeState::Up,
                        state_since_ms: since,
                    },
                );
                MetaResponse::ok()
            }
            CommandV1::SetNodeState { id, state, at_ms } => {
                let Some(node) = self.nodes.get_mut(id) else {
                    return not_found(format!("node {id} is not registered"));
                };
                // Re-asserting the current state keeps the original time, so
                // "suspect since" measures from the first verdict.
                if node.state != *state {
                    node.state = *state;
                    node.state_since_ms = *at_ms;
                }
                MetaResponse::ok()
            }
            CommandV1::RemoveNode { id } => match self.nodes.remove(id) {
                Some(_) => MetaResponse::ok(),
                None => not_found(format!("node {id} is not registered")),
            },
            CommandV1::CreateCollection { spec, at_ms } => {
                if let Err(msg) = check_spec(spec) {
                    return invalid(msg);
                }
                if self.collections.contains_key(&spec.name) {
                    return MetaResponse::rejected(
                        RejectCode::AlreadyExists,
                        format!(
                            "collection {:?} already exists; drop it first or pick another name",
                            spec.name
                        ),
                    );
                }
                self.collections.insert(
                    spec.name.clone(),
                    CollectionRecord {
                        spec: spec.clone(),
                        created_at_ms: *at_ms,
                        shards: BTreeMap::new(),
                    },
                );
                MetaResponse::ok()
            }
            CommandV1::DropCollection { name } => match self.collections.remove(name) {
                Some(_) => MetaResponse::ok(),
                None => not_found(format!("collection {name:?} does not exist")),
            },
            CommandV1::PutShardMap { collection, shard, map } => {
                let Some(record) = self.collections.get_mut(collection) else {
                    return not_found(format!("collection {collection:?} does not exist"));
                };
                if *shard >= record.spec.shards {
                    return invalid(format!(
                        "collection {collection:?} has {} shards, there is no shard {shard}",
                        record.spec.shards
                    ));
                }
                // An older epoch is a decision overtaken by a newer one (two
                // leaders in a row deciding from different views): drop it.
                if let Some(old) = record.shards.get(shard) {
                    if map.epoch < old.epoch {
                        return invalid(format!(
                            "collection {collection:?} shard {shard}: epoch {} is older than the current {}",
                            map.epoch, old.epoch
                        ));
                    }
                }
                record.shards.insert(*shard, map.clone());
                MetaResponse::ok()
            }
            CommandV1::PutPlugin {
                name,
                version,
                sha256,
                bytes,
            } => {
                if name.is_empty() || version.is_empty() {
                    return invalid("plugin name and version must not be empty");
                }
                if bytes.is_empty() {
                    return invalid(format!("plugin {name} {version}: no bytes"));
                }
                let key = (name.clone(), version.clone());
                if let Some(old) = self.plugins.get(&key) {
                    if old.sha256 == *sha256 {
                        return MetaResponse::ok();
                    }
                    return MetaResponse::rejected(
                        RejectCode::AlreadyExists,
                        format!(
                            "plugin {name} {version} is already registered with other contents; publish a new version"
                        ),
                    );
                }
                self.plugins.insert(
                    key,
                    PluginRecord {
                        sha256: *sha256,
                        bytes: PluginBytes::from(bytes.as_slice()),
                    },
                );
                MetaResponse::ok()
            }
            CommandV1::RemovePlugin { name, version } => match self.plugins.remove(&(name.clone(), version.clone())) {
                Some(_) => MetaResponse::ok(),
                None => not_found(format!("plugin {name} {version} is not registered")),
            },
            CommandV1::SetSetting { key, value } => {
                if key.is_empty() {
                    return invalid("setting key must not be empty");
                }
                self.settings.insert(key.clone(), value.clone());
                MetaResponse::ok()
            }
        }
    }

    /// Every collection, by name.
    pub fn collections(&self) -> impl Iterator<Item = &CollectionRecord> {
        self.collections.values()
    }

    pub fn collection(&self, name: &str) -> Option<&CollectionRecord> {
        self.collections.get(name)
    }

    pub fn shard_map(&self, collection: &str, shard: u32) -> Option<&ShardMap> {
        self.collections.get(collection)?.shards.get(&shard)
    }

    /// Every registered node, by id.
    pub fn nodes(&self) -> impl Iterator<Item = &NodeRecord> {
        self.nodes.values()
    }

    pub fn node(&self, id: u64) -> Option<&NodeRecord> {
        self.nodes.get(&id)
    }

    pub fn plugin(&self, name: &str, version: &str) -> Option<&PluginRecord> {
        self.plugins.get(&(name.to_owned(), version.to_owned()))
    }

    pub fn setting(&self, key: &str) -> Option<&str> {
        self.settings.get(key).map(String::as_str)
    }
}

/// The schema checks the state machine can make on its own. The node
/// applies the full limits before proposing; these only keep an impossible
/// collection out of the metadata if a caller skipped them.
fn check_spec(spec: &CollectionSpec) -> Result<(), String> {
    if spec.name.is_empty() {
        return Err("collection name must not be empty".into());
    }
    if spec.dim == 0 {
        return Err(format!("collection {:?}: dim must be at least 1", spec.name));
    }
    if spec.shards == 0 {
        return Err(format!("collection {:?}: shards must be at least 1", spec.name));
    }
    Ok(())
}

fn invalid(message: impl Into<String>) -> MetaResponse {
    MetaResponse::rejected(RejectCode::Invalid, message)
}

fn not_found(message: impl Into<String>) -> MetaResponse {
    MetaResponse::rejected(RejectCode::NotFound, message)
}

#[cfg(test)]
mod tests;
