//! Metadata commands (what the Raft log carries) and their responses.
//!
//! Both are persisted (log entries, snapshots) and sent between nodes, so
//! both are versioned envelopes from day one: [`MetaCommand::V1`] wraps
//! [`CommandV1`]. postcard encodes enum variants by position, hence the one
//! rule for this file: **never reorder or remove a variant or field of a V1
//! type**; a changed shape is a new `V2` next to the old one, and the state
//! machine keeps applying `V1` entries already in logs.
//!
//! A command the state machine refuses (the collection already exists, the
//! node is unknown) is answered with [`ResponseV1::Rejected`]; that decision
//! depends only on the command and the state, so every replica makes the
//! same one. Storage failures are a different thing entirely (see
//! [`crate::MetaStoreError`]).

use std::fmt;

use edgevec_proto::CollectionSpec;
use serde::{Deserialize, Serialize};

/// A metadata change, as proposed through Raft.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum MetaCommand {
    V1(CommandV1),
}

impl From<CommandV1> for MetaCommand {
    fn from(c: CommandV1) -> Self {
        MetaCommand::V1(c)
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
    CreateCollection {
        spec: CollectionSpec,
        at_ms: u64,
    },
    DropCollection {
        name: String,
    },
    /// Replace the map of one shard of a collection. Refused for an unknown
    /// collection, a shard number beyond the collection's shard count, or an
    /// epoch older than the stored one.
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
}

impl fmt::Display for RejectCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RejectCode::NotFound => "not found",
            RejectCode::AlreadyExists => "already exists",
            RejectCode::Invalid => "invalid",
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

/// Who serves one shard, at which configuration epoch (PacificA).
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

/// Where a replica is in its life.
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
