//! The cluster metadata as plain data, and the pure function that applies a
//! command to it.
//!
//! [`MetaState::apply`] is the whole business logic of the metadata state
//! machine, kept free of I/O so it is tested directly. Invariants:
//! - **deterministic**: the result depends only on the state and the
//!   command (no clock, no randomness, no iteration over hash maps), because
//!   every replica applies the same log and must reach the same state;
//! - **all or nothing**: a rejected command changes nothing;
//! - every command touches exactly one entity (one node, one collection
//!   with its shard configurations, one plugin, one collection's load
//!   balancer or one setting), except that creating a collection also
//!   advances the collection-id counter and dropping one also drops its
//!   load-balancer choice; that is what lets the store write only the rows
//!   a command touched (see `state_rows`, `Row::touched_by`);
//! - collection ids come from `next_collection_id` and are never reused: a
//!   dropped collection's id stays dropped ([`MetaState::collection_dropped`]),
//!   which is what lets a node delete a replica's files only when the
//!   metadata proves the collection is gone;
//! - a shard configuration changes only through [`crate::CommandV2::ShardCas`]
//!   checked by [`crate::shard`]'s rules (and, for eligibility only, when
//!   `SetReplication` lowers `min_insync`).

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

use edgevec_proto::{CollectionSpec, FieldSpec, IndexSpec};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::command::{CommandV1, CommandV2, MetaCommand, MetaResponse, NodeState, RejectCode};
use crate::plugins::{
    check_name, shipped_kind, DeployedPlugin, PluginKind, PluginVersion, DEFAULT_LOAD_BALANCER, KEPT_VERSIONS,
};
use crate::shard::{check_change, Replication, ShardConfig};

/// Everything the metadata Raft replicates.
///
/// Persisted whole in snapshots (`SnapshotBody::V5`): change its shape only
/// with a new snapshot body version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetaState {
    pub nodes: BTreeMap<u64, NodeRecord>,
    /// By name (unique among live collections); each has a stable id.
    pub collections: BTreeMap<String, CollectionRecord>,
    /// Keyed by (name, version).
    pub plugins: BTreeMap<(String, String), PluginRecord>,
    pub settings: BTreeMap<String, String>,
    /// The id the next created collection gets; ids below it were allocated
    /// (first id 1, so 0 never names a collection).
    pub next_collection_id: u64,
    /// Deployed policy plugins by name (see [`crate::plugins`]).
    pub deployed: BTreeMap<String, DeployedPlugin>,
    /// Collection id → its load balancer, for collections that chose one
    /// other than [`DEFAULT_LOAD_BALANCER`].
    pub balancers: BTreeMap<u64, String>,
}

impl Default for MetaState {
    fn default() -> Self {
        MetaState {
            nodes: BTreeMap::new(),
            collections: BTreeMap::new(),
            plugins: BTreeMap::new(),
            settings: BTreeMap::new(),
            next_collection_id: 1,
            deployed: BTreeMap::new(),
            balancers: BTreeMap::new(),
        }
    }
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

/// A collection and the configurations of its shards. Persisted as
/// `CollectionRow::V4` (the V1 shape is in `state_v1`, the V2 one in
/// `state_v3`, the V3 one in `state_v4`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CollectionRecord {
    /// Stable id, assigned at creation, never reused.
    pub id: u64,
    pub spec: CollectionSpec,
    pub replication: Replication,
    pub created_at_ms: u64,
    /// Shard number → configuration. A shard without an entry has not been
    /// placed yet (version 0).
    pub shards: BTreeMap<u32, ShardConfig>,
    /// HNSW build parameters of its indexes (the defaults for collections
    /// created before collections chose them).
    pub index: IndexSpec,
    /// Its payload indexes: the fields filters may use.
    pub fields: Vec<FieldSpec>,
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
            MetaCommand::V2(c) => self.apply_v2(c),
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
            CommandV1::CreateCollection { spec, at_ms } => self.create_collection(
                spec,
                Replication::with_default_min(1),
                *at_ms,
                &[],
                IndexSpec::default(),
                &[],
            ),
            CommandV1::DropCollection { name } => match self.collections.remove(name) {
                Some(c) => {
                    self.balancers.remove(&c.id);
                    MetaResponse::ok()
                }
                None => not_found(format!("collection {name:?} does not exist")),
            },
            // See the variant's docs: shard configurations change only by
            // compare-and-set now.
            CommandV1::PutShardMap { collection, shard, .. } => invalid(format!(
                "collection {collection:?} shard {shard}: PutShardMap is no longer applied; \
                 shard configurations are changed by compare-and-set (ShardCas)"
            )),
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

    fn apply_v2(&mut self, cmd: &CommandV2) -> MetaResponse {
        match cmd {
            CommandV2::CreateCollection {
                spec,
                replication,
                at_ms,
                placement,
            } => self.create_collection(spec, *replication, *at_ms, placement, IndexSpec::default(), &[]),
            CommandV2::CreateCollectionV2 {
                spec,
                replication,
                at_ms,
                placement,
                index,
            } => self.create_collection(spec, *replication, *at_ms, placement, *index, &[]),
            CommandV2::CreateCollectionV3 {
                spec,
                replication,
                at_ms,
                placement,
                index,
                fields,
            } => self.create_collection(spec, *replication, *at_ms, placement, *index, fields),
            CommandV2::ShardCas {
                collection,
                shard,
                expected_version,
                config,
            } => self.shard_cas(*collection, *shard, *expected_version, config),
            CommandV2::SetReplication {
                collection,
                replication,
            } => self.set_replication(*collection, *replication),
            CommandV2::DeployPlugin {
                name,
                kind,
                sha256,
                size,
                params,
                holders,
                at_ms,
            } => self.deploy_plugin(
                name,
                *kind,
                PluginVersion {
                    sha256: *sha256,
                    size: *size,
                    params: params.clone(),
                    holders: holders.clone(),
                    at_ms: *at_ms,
                },
            ),
            CommandV2::RemovePluginVersions { name } => self.remove_plugin(name),
            CommandV2::SetLoadBalancer { collection, name } => self.set_load_balancer(*collection, name),
        }
    }

    fn deploy_plugin(&mut self, name: &str, kind: PluginKind, version: PluginVersion) -> MetaResponse {
        if let Err(msg) = check_name(name) {
            return invalid(msg);
        }
        if version.size == 0 {
            return invalid(format!("plugin {name}: no bytes"));
        }
        if version.holders.is_empty() {
            return invalid(format!("plugin {name}: no node holds its bytes"));
        }
        let known = self.deployed.get(name).map(|d| d.kind).or(shipped_kind(name));
        if let Some(k) = known.filter(|k| *k != kind) {
            return invalid(format!(
                "plugin {name} is a {k}; this upload is a {kind} (deploy it under another name)"
            ));
        }
        let entry = self.deployed.entry(name.to_owned()).or_insert_with(|| DeployedPlugin {
            kind,
            versions: BTreeMap::new(),
        });
        if let Some((_, newest)) = entry.active() {
            if newest.sha256 == version.sha256 && newest.params == version.params {
                return MetaResponse::ok();
            }
        }
        let number = match entry.active() {
            Some((v, _)) => v + 1,
            None if shipped_kind(name).is_some() => 2,
            None => 1,
        };
        entry.versions.insert(number, version);
        while entry.versions.len() > KEPT_VERSIONS {
            entry.versions.pop_first();
        }
        MetaResponse::ok()
    }

    fn remove_plugin(&mut self, name: &str) -> MetaResponse {
        if !self.deployed.contains_key(name) {
            return not_found(match shipped_kind(name) {
                Some(_) => format!("plugin {name} has no deployed version (its built-in one cannot be removed)"),
                None => format!("plugin {name} is not deployed"),
            });
        }
        if shipped_kind(name).is_none() {
            let users: Vec<&str> = self
                .collections
                .values()
                .filter(|c| self.balancers.get(&c.id).map(String::as_str) == Some(name))
                .map(|c| c.spec.name.as_str())
                .collect();
            if !users.is_empty() {
                return invalid(format!(
                    "plugin {name} is the load balancer of {}; give them another one first",
                    users.join(", ")
                ));
            }
        }
        self.deployed.remove(name);
        MetaResponse::ok()
    }

    fn set_load_balancer(&mut self, collection: u64, name: &str) -> MetaResponse {
        let Some(c) = self.collection_by_id(collection) else {
            return not_found(format!("collection {collection} does not exist"));
        };
        let kind = self.deployed.get(name).map(|d| d.kind).or(shipped_kind(name));
        match kind {
            None => not_found(format!("plugin {name} is neither shipped nor deployed")),
            Some(PluginKind::Consistency) => {
                invalid(format!("plugin {name} is a consistency policy, not a load balancer"))
            }
            Some(PluginKind::LoadBalancer) => {
                let id = c.id;
                if name == DEFAULT_LOAD_BALANCER {
                    self.balancers.remove(&id);
                } else {
                    self.balancers.insert(id, name.to_owned());
                }
                MetaResponse::ok()
            }
        }
    }

    /// The load balancer of collection `id`.
    pub fn load_balancer_of(&self, id: u64) -> &str {
        self.balancers.get(&id).map_or(DEFAULT_LOAD_BALANCER, String::as_str)
    }

    fn create_collection(
        &mut self,
        spec: &CollectionSpec,
        replication: Replication,
        at_ms: u64,
        placement: &[ShardConfig],
        index: IndexSpec,
        fields: &[FieldSpec],
    ) -> MetaResponse {
        if let Err(msg) = check_spec(spec) {
            return invalid(msg);
        }
        if let Err(msg) = FieldSpec::check(fields) {
            return invalid(format!("collection {:?}: {msg}", spec.name));
        }
        // Checked by the proposer too; again here, as every node applies
        // the entry whoever proposed it.
        if let Err((_, msg)) = index.check() {
            return invalid(format!("collection {:?}: {msg}", spec.name));
        }
        if let Err(msg) = replication.check() {
            return invalid(format!("collection {:?}: {msg}", spec.name));
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
        if !placement.is_empty() && placement.len() != spec.shards as usize {
            return invalid(format!(
                "collection {:?}: placement has {} shard configurations for {} shards",
                spec.name,
                placement.len(),
                spec.shards
            ));
        }
        for (shard, config) in placement.iter().enumerate() {
            // A first configuration is a change from "never configured".
            let checked = match config.term {
                0 => Err("term must be at least 1".to_owned()),
                _ => check_change(&ShardConfig::default(), config, replication, |n| {
                    self.nodes.contains_key(&n)
                }),
            };
            if let Err(msg) = checked {
                return invalid(format!("collection {:?} shard {shard}: {msg}", spec.name));
            }
        }
        let id = self.next_collection_id;
        self.next_collection_id += 1;
        self.collections.insert(
            spec.name.clone(),
            CollectionRecord {
                id,
                spec: spec.clone(),
                replication,
                created_at_ms: at_ms,
                shards: (0..).zip(placement.iter().cloned()).collect(),
                index,
                fields: fields.to_vec(),
            },
        );
        MetaResponse::ok()
    }

    fn shard_cas(&mut self, collection: u64, shard: u32, expected_version: u64, config: &ShardConfig) -> MetaResponse {
        let Some(record) = self.collection_by_id(collection) else {
            return unknown_collection(collection);
        };
        let name = &record.spec.name;
        if shard >= record.spec.shards {
            return invalid(format!(
                "collection {collection} ({name:?}) has {} shards, there is no shard {shard}",
                record.spec.shards
            ));
        }
        let current = record.shards.get(&shard).cloned().unwrap_or_default();
        if current.version != expected_version {
            return MetaResponse::rejected(
                RejectCode::Conflict,
                format!(
                    "shard {shard} of collection {collection} ({name:?}) is at version {}, not {expected_version}; \
                     re-read its configuration",
                    current.version
                ),
            );
        }
        if let Err(msg) = check_change(&current, config, record.replication, |n| self.nodes.contains_key(&n)) {
            return invalid(format!("shard {shard} of collection {collection} ({name:?}): {msg}"));
        }
        let name = name.clone();
        if let Some(record) = self.collections.get_mut(&name) {
            record.shards.insert(shard, config.clone());
        }
        MetaResponse::ok()
    }

    fn set_replication(&mut self, collection: u64, replication: Replication) -> MetaResponse {
        let Some(record) = self.collection_by_id(collection) else {
            return unknown_collection(collection);
        };
        if let Err(msg) = replication.check() {
            return invalid(format!("collection {collection} ({:?}): {msg}", record.spec.name));
        }
        let name = record.spec.name.clone();
        let Some(record) = self.collections.get_mut(&name) else {
            return unknown_collection(collection);
        };
        record.replication = replication;
        // A lower min_insync lets primaries acknowledge writes without the
        // out-of-sync replicas: they stop being eligible in this same
        // command, before any primary acts on the new value.
        for config in record.shards.values_mut() {
            if config.drop_stale_eligibility(replication.min_insync) {
                config.version += 1;
            }
        }
        MetaResponse::ok()
    }

    /// Every collection, by name.
    pub fn collections(&self) -> impl Iterator<Item = &CollectionRecord> {
        self.collections.values()
    }

    pub fn collection(&self, name: &str) -> Option<&CollectionRecord> {
        self.collections.get(name)
    }

    /// The live collection with this id.
    pub fn collection_by_id(&self, id: u64) -> Option<&CollectionRecord> {
        self.collections.values().find(|c| c.id == id)
    }

    /// The configuration of one shard; `None` for an unknown collection or
    /// a shard not placed yet.
    pub fn shard_config(&self, collection_id: u64, shard: u32) -> Option<&ShardConfig> {
        self.collection_by_id(collection_id)?.shards.get(&shard)
    }

    /// True iff `id` was allocated by this state and no collection has it
    /// now: the collection was dropped, and since ids are never reused it
    /// never comes back. False for an id this state has not allocated yet
    /// (this replica may be behind), so a node deletes a replica's files
    /// only on proof.
    pub fn collection_dropped(&self, id: u64) -> bool {
        id != 0 && id < self.next_collection_id && self.collection_by_id(id).is_none()
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

fn unknown_collection(id: u64) -> MetaResponse {
    not_found(format!("collection {id} does not exist (dropped, or not created yet)"))
}

#[cfg(test)]
mod plugin_tests;
#[cfg(test)]
mod shard_tests;
#[cfg(test)]
mod tests;
