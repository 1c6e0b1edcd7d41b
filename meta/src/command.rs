//! Metadata commands (what the Raft log carries) and their responses.
//!
//! Both are persisted (log entries, snapshots) and sent between nodes, so
//! both are versioned envelopes from day one: [`MetaCommand::V1`] wraps
//! [`CommandV1`], [`MetaCommand::V2`] wraps [`CommandV2`]. postcard encodes
//! enum variants by position, hence the one rule for this file: **never
//! reorder or remove a variant or field of a V1 type** (nor of a V2 type once
//! released); a changed shape is a new version next to the old one, and the
//! state machine keeps applying `V1` entries already in logs.
//!
//! What V2 changed: collections get a stable id (assigned by the state
//! machine), a [`Replication`] and shard configurations
//! ([`crate::ShardConfig`]) that change only by compare-and-set
//! ([`CommandV2::ShardCas`]). Of the V1 commands, `CreateCollection` still
//! applies (one replica, `min_insync` 1, no placement) and `PutShardMap` is
//! refused: see its docs.
//!
//! A command the state machine refuses (the collection already exists, the
//! node is unknown) is answered with [`ResponseV1::Rejected`]; that decision
//! depends only on the command and the state, so every replica makes the
//! same one. Storage failures are a different thing entirely (see
//! [`crate::MetaStoreError`]).

use std::fmt;

use edgevec_proto::{CollectionSpec, FieldSpec, IndexSpec};
use serde::{Deserialize, Serialize};

use crate::shard::{Replication, ShardConfig};

/// A metadata change, as proposed through Raft.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum MetaCommand {
    V1(CommandV1),
    V2(CommandV2),
}

impl From<CommandV1> for MetaCommand {
    fn from(c: CommandV1) -> Self {
        MetaCommand::V1(c)
    }
}

impl From<CommandV2> for MetaCommand {
    fn from(c: CommandV2) -> Self {
        MetaCommand::V2(c)
    }
}

/// Version 1 of the metadata commands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CommandV1 {
    /// Add a node or update its address, zone and roles. The node is `Up`
    /// afterwards: registering is what a node does when it (re)starts.
    RegisterNode {
        id: u64,
        /// QUIC socket address.
        addr: String,
        zone: String,
        /// Roles from cluster.toml (`meta`, `data`, ...).
        roles: Vec<String>,
    },
    /// The failure detector's verdict on a node, observed at `at_ms`
    /// (leader's wall clock, ms since the Unix epoch).
    SetNodeState {
        id: u64,
        state: NodeState,
        at_ms: u64,
    },
    RemoveNode {
        id: u64,
    },
    /// `at_ms` is the proposer's clock: the state machine must not read one.
    /// Applied as [`CommandV2::CreateCollection`] with one replica,
    /// `min_insync` 1 and no placement.
    CreateCollection {
        spec: CollectionSpec,
        at_ms: u64,
    },
    DropCollection {
        name: String,
    },
    /// Replace the map of one shard of a collection.
    ///
    /// **Refused since V2** (`Invalid`): a blind replace could undo a
    /// concurrent failover, so shard configurations change only by
    /// [`CommandV2::ShardCas`]. No shard map was ever acted upon (the data
    /// plane did not read them), and converted V1 state drops them, so
    /// refusing entries still in logs leaves every replica with the same
    /// state whether it applied them before the upgrade or after.
    PutShardMap {
        collection: String,
        shard: u32,
        map: ShardMap,
    },
    /// Register a plugin version. A version is immutable: putting it again
    /// with the same hash is a no-op, with another hash it is refused.
    PutPlugin {
        name: String,
        version: String,
        /// SHA-256 of `bytes`, checked by the proposer before proposing.
        sha256: [u8; 32],
        /// The wasm module or component.
        bytes: Vec<u8>,
    },
    RemovePlugin {
        name: String,
        version: String,
    },
    SetSetting {
        key: String,
        value: String,
    },
}

/// Version 2 of the metadata commands: stable collection ids, replication
/// and shard configurations changed by compare-and-set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CommandV2 {
    /// Create a collection. The state machine assigns its stable id from a
    /// counter (never reused, not the name, not a clock). `placement` holds
    /// the initial configuration of every shard (len == `spec.shards`, each
    /// with version 1, term >= 1; see [`crate::place`]) or is empty (shards
    /// placed later by `ShardCas` from version 0).
    CreateCollection {
        spec: CollectionSpec,
        replication: Replication,
        /// The proposer's clock (ms since the Unix epoch), for display.
        at_ms: u64,
        placement: Vec<ShardConfig>,
    },
    /// Compare-and-set of one shard's configuration: applies only if the
    /// shard is at `expected_version` (0 for a shard never configured) and
    /// `config` is a valid successor (version + 1, the rules in
    /// [`crate::shard`]). The only way a shard configuration is chosen.
    ShardCas {
        /// Collection id ([`crate::CollectionRecord::id`]).
        collection: u64,
        shard: u32,
        expected_version: u64,
        config: ShardConfig,
    },
    /// Change a collection's replica count / `min_insync` (`edgevec load`);
    /// the shards follow via `ShardCas` (see [`crate::resize`]). Lowering
    /// `min_insync` also takes eligibility from out-of-sync replicas of
    /// shards whose in-sync set already reaches the new value, in the same
    /// command (version + 1 for those shards): from then on their primaries
    /// may acknowledge writes those replicas miss.
    SetReplication { collection: u64, replication: Replication },
    /// Deploy a version of a policy plugin ([`crate::plugins`]): its bytes
    /// are not in the log, the proposer stored them on `holders` first.
    /// The state machine numbers the version one past the newest of that
    /// name (2 for a first deploy of a shipped name, whose version 1 is
    /// built in); a deploy equal to the newest version (same hash and
    /// params) changes nothing, so a retried deploy is harmless. A name
    /// keeps its kind. The newest [`crate::plugins::KEPT_VERSIONS`] are
    /// kept.
    DeployPlugin {
        name: String,
        kind: crate::plugins::PluginKind,
        sha256: [u8; 32],
        size: u64,
        params: Vec<(String, String)>,
        holders: Vec<u64>,
        at_ms: u64,
    },
    /// Remove every deployed version of a plugin. A shipped plugin goes
    /// back to its built-in version; any other is refused while a
    /// collection uses it.
    RemovePluginVersions { name: String },
    /// Choose the load balancer of a collection (by id): a shipped one or
    /// a deployed load balancer.
    SetLoadBalancer { collection: u64, name: String },
    /// `CreateCollection` with the collection's index parameters (the
    /// first form creates it with the defaults).
    CreateCollectionV2 {
        spec: CollectionSpec,
        replication: Replication,
        at_ms: u64,
        placement: Vec<ShardConfig>,
        index: IndexSpec,
    },
    /// `CreateCollectionV2` with the collection's payload indexes.
    CreateCollectionV3 {
        spec: CollectionSpec,
        replication: Replication,
        at_ms: u64,
        placement: Vec<ShardConfig>,
        index: IndexSpec,
        fields: Vec<FieldSpec>,
    },
}

/// What the state machine answers to a command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaResponse {
    V1(ResponseV1),
}

impl MetaResponse {
    pub fn ok() -> Self {
        MetaResponse::V1(ResponseV1::Ok)
    }

    pub fn rejected(code: RejectCode, message: impl Into<String>) -> Self {
        MetaResponse::V1(ResponseV1::Rejected {
            code,
            message: message.into(),
        })
    }

    pub fn is_ok(&self) -> bool {
        matches!(self, MetaResponse::V1(ResponseV1::Ok))
    }

    /// The refusal, if the command was refused.
    pub fn rejection(&self) -> Option<(RejectCode, &str)> {
        match self {
            MetaResponse::V1(ResponseV1::Rejected { code, message }) => Some((*code, message)),
            MetaResponse::V1(ResponseV1::Ok) => None,
        }
    }
}

/// Version 1 of the responses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ResponseV1 {
    Ok,
    /// The command broke a business rule and changed nothing.
    Rejected {
        code: RejectCode,
        message: String,
    },
}

/// Why a command was refused; maps onto the wire's error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RejectCode {
    NotFound,
    AlreadyExists,
    Invalid,
    /// A compare-and-set failed: the version moved since the proposer read
    /// it. Re-read the configuration and decide again.
    Conflict,
}

impl fmt::Display for RejectCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RejectCode::NotFound => "not found",
            RejectCode::AlreadyExists => "already exists",
            RejectCode::Invalid => "invalid",
            RejectCode::Conflict => "conflict",
        })
    }
}

/// Liveness of a node as judged by the metadata leader.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum NodeState {
    Up,
    /// Missed heartbeats; its primaries may be failed over.
    Suspect,
    /// Down past `dead_after`; its replicas are re-created elsewhere.
    Dead,
}

/// Who serves one shard, at which configuration epoch: the V1 shape, kept
/// only so V1 log entries still decode. Superseded by
/// [`crate::ShardConfig`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardMap {
    /// Bumped by every configuration change; replicas reject older epochs.
    pub epoch: u64,
    /// Node id of the primary, if one is assigned.
    pub primary: Option<u64>,
    /// Every replica (the primary included) and its state.
    pub replicas: Vec<ReplicaInfo>,
}

/// One replica of a shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaInfo {
    pub node: u64,
    pub state: ReplicaState,
}

/// Where a replica is in its life. Shared by V1 and V2 shapes: only add
/// variants at the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ReplicaState {
    /// Created, has not started catching up.
    Initializing,
    /// Streaming missing ops from the primary.
    CatchingUp,
    /// Holds every acknowledged op; the primary waits for it.
    InSync,
    /// Failed or unreachable; not in the write quorum.
    Offline,
}
