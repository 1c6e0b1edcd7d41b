//! Requests and replies of the node-to-node ALPN ([`crate::ALPN_NODE`]).
//!
//! Only peers holding a node certificate of the cluster CA reach this
//! protocol. Raft and replication messages join this enum as they are built;
//! each addition is a new variant of the version-1 op set, never an edit.

use serde::{Deserialize, Serialize};

use crate::error::WireError;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum NodeRequest {
    V1(NodeOpV1),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum NodeResponse {
    V1(Result<NodeReplyV1, WireError>),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum NodeOpV1 {
    /// Liveness probe between nodes; carries the sender's id.
    Ping { from: u64 },
    /// A metadata Raft RPC. The bytes are the postcard encoding of the
    /// openraft request of the metadata crate's type configuration.
    Raft(RaftRpc),
    /// A node's periodic report to the metadata leader (failure detector).
    Heartbeat(Heartbeat),
    /// A metadata command forwarded to the leader (postcard-encoded
    /// `MetaCommand` of the metadata crate).
    MetaWrite(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The leader's view of the cluster (with heartbeat ages).
    ClusterView,
    /// A membership change, forwarded to the leader.
    ChangeMembership(MembershipChange),
    /// Data plane, primary → backup: append ops and learn the commit LSN.
    Replicate(crate::replication::Replicate),
    /// A client write of one shard, forwarded by a proxy to the primary.
    ShardWrite {
        shard: crate::replication::ShardRef,
        op: crate::replication::WriteOp,
    },
    /// A read of one shard replica.
    ShardRead(crate::replication::ShardRead),
    /// Linearizable metadata read barrier, answered by the metadata
    /// leader once it has confirmed its leadership: the log index a reader
    /// must have applied to see every write committed before the call.
    MetaReadIndex,
    /// Data plane, primary → replica: a chunk of a shard export.
    ExportChunk(crate::replication::ExportChunk),
    /// The policy plugins this node runs and their state.
    PluginStatus,
    /// Keep these plugin bytes in the content-addressed store (they must
    /// hash to `sha256`; at most `limits::MAX_PLUGIN_BYTES`).
    PluginPut {
        sha256: [u8; 32],
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// The plugin bytes hashing to `sha256`, if this node holds them.
    PluginGet { sha256: [u8; 32] },
    /// A read of one shard replica with a consistency requirement
    /// (replaces `ShardRead` for searches and gets).
    ShardReadAt(crate::replication::ShardReadAt),
    /// Replica → the primary of `term`: its commit LSN, confirmed by a
    /// read-index round that started after this request arrived (the
    /// asking replica's safe point for bounded-staleness reads).
    CommitPoint {
        shard: crate::replication::ShardRef,
        term: u64,
    },
    /// The primary of `term` → a replica it is about to send an export:
    /// the digests of the replica's sealed segments, so that the export
    /// leaves out the ones it holds as they are.
    SealedDigests {
        shard: crate::replication::ShardRef,
        term: u64,
    },
}

/// Membership changes an admin can ask for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum MembershipChange {
    Add(crate::types::NodeSpec),
    Remove { id: u64 },
}

/// The three Raft RPCs, each carrying an encoded openraft request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RaftRpc {
    Append(#[serde(with = "serde_bytes")] Vec<u8>),
    Vote(#[serde(with = "serde_bytes")] Vec<u8>),
    Snapshot(#[serde(with = "serde_bytes")] Vec<u8>),
}

/// What a node tells the metadata leader every heartbeat interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub from: u64,
    pub addr: String,
    pub zone: String,
    pub roles: Vec<String>,
    /// The sender's last applied metadata log index.
    pub applied_index: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum NodeReplyV1 {
    Pong {
        node_id: u64,
    },
    /// The encoded `Result<openraft response, openraft RaftError>`.
    Raft(#[serde(with = "serde_bytes")] Vec<u8>),
    HeartbeatAck {
        leader: Option<u64>,
        term: u64,
        /// The leader's applied metadata index when it answered: a node
        /// that has applied this much is caught up with the leader.
        leader_applied: Option<u64>,
    },
    /// The encoded `MetaResponse` of a committed command.
    MetaWritten(#[serde(with = "serde_bytes")] Vec<u8>),
    ClusterView(crate::types::ClusterStatus),
    Membership {
        voters: Vec<u64>,
        learners: Vec<u64>,
    },
    Replicated(crate::replication::ReplicateReply),
    /// The forwarded write is committed: its op id in the shard's log.
    ShardWritten {
        op: crate::types::OpId,
    },
    /// The forwarded write is committed (replaces `ShardWritten`): its op
    /// id, and for a delete how many points it removed.
    ShardCommitted {
        op: crate::types::OpId,
        deleted: u64,
    },
    ShardRead(crate::replication::ShardReadReply),
    MetaReadIndex {
        index: u64,
    },
    ExportProgress(crate::replication::ExportProgress),
    PluginStatus(Vec<crate::types::PluginNodeState>),
    PluginStored,
    PluginBytes(#[serde(with = "serde_bytes")] Vec<u8>),
    ShardReadAt(crate::replication::ShardReadAtReply),
    /// The primary's commit LSN at a moment after the request arrived.
    CommitPoint {
        lsn: u64,
    },
    /// At most [`crate::replication::MAX_SEALED_DIGESTS`] digests.
    SealedDigests(Vec<crate::replication::SegmentDigestV1>),
}
