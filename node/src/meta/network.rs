//! The metadata Raft's network: openraft RPCs over the node ALPN.
//!
//! Each RPC is one request on the pooled mutual-TLS connection to the
//! target ([`crate::net::peer::PeerPool`]). The openraft request travels
//! postcard-encoded inside [`NodeOpV1::Raft`]; the reply carries the encoded
//! `Result<response, RaftError>`. Transport failures map to openraft's
//! `Unreachable` (back off) and timeouts to its `Timeout`, so openraft's own
//! retry logic does the right thing.

use std::net::SocketAddr;
use std::sync::Arc;

use edgevec_client::rpc::CallError;
use edgevec_meta::types::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, RPCError, RaftError,
    VoteRequest, VoteResponse,
};
use edgevec_meta::{MetaNode, NodeId, TypeConfig};
use edgevec_proto::internal::{NodeOpV1, NodeReplyV1, NodeRequest, NodeResponse, RaftRpc};
use openraft::error::{InstallSnapshotError, NetworkError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::net::peer::PeerPool;

/// Makes one [`PeerLink`] per target; shares the node's connection pool.
#[derive(Clone)]
pub struct Network {
    pub peers: Arc<PeerPool>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerLink;

    async fn new_client(&mut self, target: NodeId, node: &MetaNode) -> PeerLink {
        PeerLink {
            target,
            addr: node.addr.parse().ok(),
            raw_addr: node.addr.clone(),
            peers: self.peers.clone(),
        }
    }
}

pub struct PeerLink {
    target: NodeId,
    addr: Option<SocketAddr>,
    raw_addr: String,
    peers: Arc<PeerPool>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct LinkError(String);

impl PeerLink {
    async fn send<Req, Resp, E>(
        &self,
        wrap: fn(Vec<u8>) -> RaftRpc,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<RaftError<E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let Some(addr) = self.addr else {
            return Err(RPCError::Unreachable(Unreachable::new(&LinkError(format!(
                "node {} has an unusable address {:?}",
                self.target, self.raw_addr
            )))));
        };
        let body = postcard::to_stdvec(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let request = NodeRequest::V1(NodeOpV1::Raft(wrap(body)));
        let reply = match self.peers.call(addr, &request, option.hard_ttl()).await {
            Ok(r) => r,
            Err(CallError::Timeout(_)) => {
                return Err(RPCError::Unreachable(Unreachable::new(&LinkError(format!(
                    "node {} did not answer within {:?}",
                    self.target,
                    option.hard_ttl()
                )))))
            }
            Err(e) => return Err(RPCError::Unreachable(Unreachable::new(&e))),
        };
        let bytes = match reply {
            NodeResponse::V1(Ok(NodeReplyV1::Raft(bytes))) => bytes,
            NodeResponse::V1(Ok(other)) => {
                return Err(RPCError::Network(NetworkError::new(&LinkError(format!(
                    "unexpected reply {other:?}"
                )))))
            }
            NodeResponse::V1(Err(e)) => return Err(RPCError::Network(NetworkError::new(&e))),
        };
        let result: Result<Resp, RaftError<E>> =
            postcard::from_bytes(&bytes).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for PeerLink {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse, RPCError<RaftError>> {
        self.send(RaftRpc::Append, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse, RPCError<RaftError<InstallSnapshotError>>> {
        self.send(RaftRpc::Snapshot, &rpc, &option).await
    }

    async fn vote(&mut self, rpc: VoteRequest, option: RPCOption) -> Result<VoteResponse, RPCError<RaftError>> {
        self.send(RaftRpc::Vote, &rpc, &option).await
    }
}

/// Serves an incoming Raft RPC from node `peer` (named by its certificate)
/// and encodes the result. The message is decoded once; one that speaks
/// for another node (the vote it carries names its sender) is refused.
pub async fn serve(raft: &edgevec_meta::Raft, peer: u64, rpc: RaftRpc) -> Result<Vec<u8>, edgevec_proto::WireError> {
    fn decode<T: DeserializeOwned>(b: &[u8]) -> Result<T, edgevec_proto::WireError> {
        postcard::from_bytes(b).map_err(|e| {
            edgevec_proto::WireError::new(edgevec_proto::ErrorCode::Malformed, format!("bad raft message: {e}"))
        })
    }
    let encoded = match rpc {
        RaftRpc::Append(b) => {
            let req: AppendEntriesRequest = decode(&b)?;
            crate::net::check_claim(peer, req.vote.leader_id().voted_for())?;
            postcard::to_stdvec(&raft.append_entries(req).await)
        }
        RaftRpc::Vote(b) => {
            let req: VoteRequest = decode(&b)?;
            crate::net::check_claim(peer, req.vote.leader_id().voted_for())?;
            postcard::to_stdvec(&raft.vote(req).await)
        }
        RaftRpc::Snapshot(b) => {
            let req: InstallSnapshotRequest = decode(&b)?;
            crate::net::check_claim(peer, req.vote.leader_id().voted_for())?;
            postcard::to_stdvec(&raft.install_snapshot(req).await)
        }
    };
    encoded.map_err(|e| edgevec_proto::WireError::new(edgevec_proto::ErrorCode::Internal, e.to_string()))
}
