//! The openraft type configuration of the metadata Raft, and every alias the
//! rest of edgevec uses to name its types.
//!
//! One place on purpose: the node (network, wiring) and this crate (storage)
//! must agree on `D`, `R`, `NodeId`, `Node` and the snapshot type, and
//! spelling `openraft::X<u64, MetaNode>` by hand everywhere invites drift.
//!
//! [`MetaNode`] travels inside membership log entries and snapshots, so it is
//! persisted: add fields only at the end and only with `#[serde(default)]`
//! semantics in mind (postcard is not self-describing; a new field means a
//! new command version).

use std::io::Cursor;

use serde::{Deserialize, Serialize};

use crate::command::{MetaCommand, MetaResponse};

openraft::declare_raft_types!(
    /// The metadata Raft's type configuration.
    pub TypeConfig:
        D            = MetaCommand,
        R            = MetaResponse,
        NodeId       = u64,
        Node         = MetaNode,
        Entry        = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// What Raft membership knows about a node: where to reach it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaNode {
    /// QUIC socket address (`host:port`) of the node's endpoint.
    pub addr: String,
    /// Failure zone (rack, site); used to spread replicas.
    pub zone: String,
}

impl std::fmt::Display for MetaNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.addr, self.zone)
    }
}

/// Node ids are cluster-wide `u64`s, the same as in cluster.toml.
pub type NodeId = u64;

pub type Raft = openraft::Raft<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type Vote = openraft::Vote<NodeId>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type EntryPayload = openraft::EntryPayload<TypeConfig>;
pub type Membership = openraft::Membership<NodeId, MetaNode>;
pub type StoredMembership = openraft::StoredMembership<NodeId, MetaNode>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, MetaNode>;
pub type Snapshot = openraft::Snapshot<TypeConfig>;
pub type LogState = openraft::LogState<TypeConfig>;
pub type RaftMetrics = openraft::RaftMetrics<NodeId, MetaNode>;
pub type StorageError = openraft::StorageError<NodeId>;
pub type StorageIOError = openraft::StorageIOError<NodeId>;

/// RPC messages, for the node's network layer.
pub type AppendEntriesRequest = openraft::raft::AppendEntriesRequest<TypeConfig>;
pub type AppendEntriesResponse = openraft::raft::AppendEntriesResponse<NodeId>;
pub type VoteRequest = openraft::raft::VoteRequest<NodeId>;
pub type VoteResponse = openraft::raft::VoteResponse<NodeId>;
pub type InstallSnapshotRequest = openraft::raft::InstallSnapshotRequest<TypeConfig>;
pub type InstallSnapshotResponse = openraft::raft::InstallSnapshotResponse<NodeId>;
pub type ClientWriteResponse = openraft::raft::ClientWriteResponse<TypeConfig>;

/// Errors the Raft API returns, for the node.
pub type RaftError<E = openraft::error::Infallible> = openraft::error::RaftError<NodeId, E>;
pub type ClientWriteError = openraft::error::ClientWriteError<NodeId, MetaNode>;
pub type CheckIsLeaderError = openraft::error::CheckIsLeaderError<NodeId, MetaNode>;
pub type InitializeError = openraft::error::InitializeError<NodeId, MetaNode>;
pub type ForwardToLeader = openraft::error::ForwardToLeader<NodeId, MetaNode>;
pub type InstallSnapshotError = openraft::error::InstallSnapshotError;
pub type RPCError<E = openraft::error::Infallible> = openraft::error::RPCError<NodeId, MetaNode, E>;
