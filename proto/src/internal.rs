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
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum NodeReplyV1 {
    Pong { node_id: u64 },
}
