//! The request service: authentication, authorisation, and dispatch of
//! client operations to the storage engine.
//!
//! Invariants:
//! - the token is checked before anything else in the request is looked at;
//! - the role a request needs is a pure function of the operation
//!   ([`required_role`]), so the policy is in one place and tested;
//! - engine calls run on the blocking pool (redb commits fsync, index
//!   searches are CPU-bound): the async workers only move bytes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use edgevec_engine::{Engine, EngineError};
use std::time::Duration;

use edgevec_meta::{CommandV1, MetaCommand, MetaResponse, RejectCode};
use edgevec_proto::client::{ClientRequest, ClientResponse, OpV1, ReplyV1};
use edgevec_proto::internal::{MembershipChange, NodeOpV1, NodeReplyV1, NodeRequest, NodeResponse, RaftRpc};
use edgevec_proto::{ClusterStatus, CollectionInfo, CollectionSpec, ErrorCode, NodeStatus, WireError};
use tracing::debug;

use crate::admin::Metrics;
use crate::catalog::CatalogSync;
use crate::config::{ClusterConfig, NodeConfig, Token, TokenRole};
use crate::health::Health;
use crate::meta::{now_ms, Meta};
use crate::net::server::Dispatch;

/// The role an operation needs.
pub fn required_role(op: &OpV1) -> TokenRole {
    match op {
        OpV1::Status
        | OpV1::ListCollections
        | OpV1::DescribeCollection { .. }
        | OpV1::Get { .. }
        | OpV1::Search { .. }
        | OpV1::ClusterStatus => TokenRole::Read,
        OpV1::Upsert { .. } | OpV1::Delete { .. } => TokenRole::Write,
        OpV1::CreateCollection(_) | OpV1::DropCollection { .. } | OpV1::AddNode(_) | OpV1::RemoveNode { .. } => {
            TokenRole::Admin
        }
    }
}

/// Checks a token against the configured ones and the role `op` needs.
pub fn authorize<'a>(tokens: &'a HashMap<String, Token>, token: &str, op: &OpV1) -> Result<&'a Token, WireError> {
    if token.is_empty() {
        return Err(WireError::new(
            ErrorCode::Unauthorized,
            "no API token given; pass --token, set EDGEVEC_TOKEN, or configure the client with a token from cluster.toml",
        ));
    }
    let Some(t) = tokens.get(token) else {
        return Err(WireError::new(ErrorCode::Unauthorized, "unknown API token"));
    };
    let need = required_role(op);
    if t.role < need {
        return Err(WireError::new(
            ErrorCode::PermissionDenied,
            format!(
                "token {:?} has role {}; {} needs role {need} or higher",
                t.name,
                t.role,
                op.name()
            ),
        ));
    }
    Ok(t)
}

pub struct Service {
    engine: Arc<Engine>,
    tokens: HashMap<String, Token>,
    node: NodeConfig,
    meta: Meta,
    health: Arc<Health>,
    catalog: Arc<CatalogSync>,
    metrics: Arc<Metrics>,
    started: Instant,
}

/// Everything the service needs from the rest of the node.
pub struct Parts {
    pub engine: Arc<Engine>,
    pub meta: Meta,
    pub health: Arc<Health>,
    pub catalog: Arc<CatalogSync>,
    pub metrics: Arc<Metrics>,
}

fn rejected(resp: &MetaResponse) -> Option<WireError> {
    let (code, message) = resp.rejection()?;
    let code = match code {
        RejectCode::NotFound => ErrorCode::NotFound,
        RejectCode::AlreadyExists => ErrorCode::AlreadyExists,
        RejectCode::Invalid => ErrorCode::InvalidArgument,
    };
    Some(WireError::new(code, message.to_string()))
}

impl Service {
    pub fn new(cluster: &ClusterConfig, node: NodeConfig, parts: Parts) -> Self {
        let tokens = cluster.tokens.iter().map(|t| (t.token.clone(), t.clone())).collect();
        Self {
            engine: parts.engine,
            tokens,
            node,
            meta: parts.meta,
            health: parts.health,
            catalog: parts.catalog,
            metrics: parts.metrics,
            started: Instant::now(),
        }
    }

    /// Runs an engine call on the blocking pool.
    async fn engine<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Engine) -> Result<T, EngineError> + Send + 'static,
    ) -> Result<T, WireError> {
        let engine = self.engine.clone();
        match tokio::task::spawn_blocking(move || f(&engine)).await {
            Ok(result) => result.map_err(|e| e.to_wire()),
            Err(e) => Err(WireError::new(ErrorCode::Internal, format!("request task failed: {e}"))),
        }
    }

    /// Commits a metadata command and makes the local engine follow it.
    async fn meta_write(&self, cmd: CommandV1) -> Result<(), WireError> {
        let resp = self.meta.write(cmd.clone().into()).await?;
        if let Some(e) = rejected(&resp) {
            if !self.is_own_create(&cmd, &e) {
                return Err(e);
            }
        }
        self.catalog.sync().await;
        Ok(())
    }

    /// A create that was retried after an attempt whose fate was unknown
    /// (the leader died or was slow) may find its own first attempt
    /// committed: same spec, same creation time. That is success.
    fn is_own_create(&self, cmd: &CommandV1, e: &WireError) -> bool {
        let CommandV1::CreateCollection { spec, at_ms } = cmd else {
            return false;
        };
        e.code == ErrorCode::AlreadyExists
            && self
                .meta
                .state()
                .collection(&spec.name)
                .is_some_and(|c| c.spec == *spec && c.created_at_ms == *at_ms)
    }

    /// A collection's info: schema from the metadata, counts from the
    /// local engine's `local` view of it (zero while the engine has not
    /// created it yet, or still holds an older schema).
    fn collection_info(spec: CollectionSpec, local: Option<CollectionInfo>) -> CollectionInfo {
        match local {
            Some(info) if info.spec == spec => info,
            _ => CollectionInfo {
                spec,
                points: 0,
                shards: vec![],
                segments: vec![],
            },
        }
    }

    async fn op(&self, op: OpV1) -> Result<ReplyV1, WireError> {
        Ok(match op {
            OpV1::Status => ReplyV1::Status(NodeStatus {
                node_id: self.node.id,
                version: env!("CARGO_PKG_VERSION").into(),
                addr: self.node.addr.to_string(),
                zone: self.node.zone.clone(),
                roles: self.node.role_names(),
                uptime_ms: self.started.elapsed().as_millis() as u64,
                collections: self.meta.state().collections().count() as u32,
            }),
            OpV1::CreateCollection(spec) => {
                edgevec_engine::validate::collection_spec(&spec).map_err(|e| e.to_wire())?;
                self.meta_write(CommandV1::CreateCollection { spec, at_ms: now_ms() })
                    .await?;
                ReplyV1::Created
            }
            OpV1::ListCollections => {
                let mut local: HashMap<String, CollectionInfo> = self
                    .engine(|e| Ok(e.list_collections()))
                    .await?
                    .into_iter()
                    .map(|c| (c.spec.name.clone(), c))
                    .collect();
                let specs: Vec<CollectionSpec> = self.meta.state().collections().map(|c| c.spec.clone()).collect();
                ReplyV1::Collections(
                    specs
                        .into_iter()
                        .map(|spec| {
                            let found = local.remove(&spec.name);
                            Self::collection_info(spec, found)
                        })
                        .collect(),
                )
            }
            OpV1::DescribeCollection { name } => {
                let spec = self
                    .meta
                    .state()
                    .collection(&name)
                    .map(|c| c.spec.clone())
                    .ok_or_else(|| {
                        WireError::new(ErrorCode::NotFound, format!("collection {name:?} does not exist"))
                    })?;
                let local = match self.engine(move |e| e.describe_collection(&name)).await {
                    Ok(info) => Some(info),
                    Err(e) if e.code == ErrorCode::NotFound => None,
                    Err(e) => return Err(e),
                };
                ReplyV1::Collection(Self::collection_info(spec, local))
            }
            OpV1::DropCollection { name } => {
                // A drop retried after an attempt of unknown fate (the
                // leader died mid-request) finds the collection gone. If it
                // existed when this request arrived, gone is what was asked.
                let existed = self.meta.state().collection(&name).is_some();
                match self.meta_write(CommandV1::DropCollection { name }).await {
                    Err(e) if e.code == ErrorCode::NotFound && existed => {}
                    other => other?,
                }
                ReplyV1::Dropped
            }
            OpV1::Upsert { collection, points } => {
                ReplyV1::Written(self.engine(move |e| e.upsert(&collection, points)).await?)
            }
            OpV1::Delete { collection, ids } => {
                ReplyV1::Written(self.engine(move |e| e.delete(&collection, &ids)).await?)
            }
            OpV1::Get { collection, ids } => ReplyV1::Points(self.engine(move |e| e.get(&collection, &ids)).await?),
            OpV1::Search {
                collection,
                queries,
                k,
                with_payload,
            } => ReplyV1::Hits(
                self.engine(move |e| e.search(&collection, &queries, k, with_payload))
                    .await?,
            ),
            OpV1::ClusterStatus => ReplyV1::ClusterStatus(self.cluster_status().await),
            OpV1::AddNode(spec) => {
                let (voters, learners) = self.meta.change_membership(MembershipChange::Add(spec)).await?;
                ReplyV1::Membership { voters, learners }
            }
            OpV1::RemoveNode { id } => {
                let (voters, learners) = self.meta.change_membership(MembershipChange::Remove { id }).await?;
                ReplyV1::Membership { voters, learners }
            }
        })
    }

    /// The leader's view if it answers, else this node's own (without
    /// heartbeat ages).
    async fn cluster_status(&self) -> ClusterStatus {
        if let Some((leader, addr)) = self.meta.leader() {
            if leader != self.node.id {
                let req = NodeRequest::V1(NodeOpV1::ClusterView);
                if let Ok(NodeResponse::V1(Ok(NodeReplyV1::ClusterView(view)))) =
                    self.meta.peers().call(addr, &req, Duration::from_secs(2)).await
                {
                    return view;
                }
            }
        }
        crate::status::view(&self.meta, &self.health)
    }
}

impl Dispatch for Service {
    async fn client(&self, req: ClientRequest) -> ClientResponse {
        let ClientRequest::V1(req) = req;
        let name = req.op.name();
        let started = Instant::now();
        let result = match authorize(&self.tokens, &req.token, &req.op) {
            Ok(token) => {
                debug!(op = name, token = %token.name, "request");
                self.op(req.op).await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = &result {
            debug!(code = ?e.code, message = %e.message, "request refused");
        }
        self.metrics
            .record_rpc("client", name, result.is_ok(), started.elapsed());
        ClientResponse::V1(result)
    }

    async fn node(&self, _peer: u64, req: NodeRequest) -> NodeResponse {
        let NodeRequest::V1(op) = req;
        let started = Instant::now();
        let name = match &op {
            NodeOpV1::Ping { .. } => "ping",
            NodeOpV1::Raft(RaftRpc::Append(_)) => "raft_append",
            NodeOpV1::Raft(RaftRpc::Vote(_)) => "raft_vote",
            NodeOpV1::Raft(RaftRpc::Snapshot(_)) => "raft_snapshot",
            NodeOpV1::Heartbeat(_) => "heartbeat",
            NodeOpV1::MetaWrite(_) => "meta_write",
            NodeOpV1::ClusterView => "cluster_view",
            NodeOpV1::ChangeMembership(_) => "change_membership",
        };
        let result = match op {
            NodeOpV1::Ping { .. } => Ok(NodeReplyV1::Pong { node_id: self.node.id }),
            NodeOpV1::Raft(rpc) => crate::meta::network::serve(&self.meta.raft, rpc)
                .await
                .map(NodeReplyV1::Raft),
            NodeOpV1::Heartbeat(hb) => Ok(self.health.clone().observe(hb)),
            NodeOpV1::MetaWrite(bytes) => match postcard::from_bytes::<MetaCommand>(&bytes) {
                Ok(cmd) => self
                    .meta
                    .commit_local(cmd, crate::meta::WRITE_DEADLINE)
                    .await
                    .map(|r| NodeReplyV1::MetaWritten(postcard::to_stdvec(&r).expect("replies encode"))),
                Err(e) => Err(WireError::new(
                    ErrorCode::Malformed,
                    format!("bad metadata command: {e}"),
                )),
            },
            NodeOpV1::ClusterView => {
                if self.meta.is_leader() {
                    Ok(NodeReplyV1::ClusterView(crate::status::view(&self.meta, &self.health)))
                } else {
                    Err(WireError::new(ErrorCode::Unavailable, "not the metadata leader"))
                }
            }
            NodeOpV1::ChangeMembership(change) => self
                .meta
                .change_membership_local(change)
                .await
                .map(|(voters, learners)| NodeReplyV1::Membership { voters, learners }),
        };
        self.metrics.record_rpc("node", name, result.is_ok(), started.elapsed());
        NodeResponse::V1(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> HashMap<String, Token> {
        [
            ("reader-123", TokenRole::Read),
            ("writer-123", TokenRole::Write),
            ("admin-1234", TokenRole::Admin),
        ]
        .into_iter()
        .map(|(t, role)| {
            (
                t.to_string(),
                Token {
                    token: t.into(),
                    role,
                    name: t.into(),
                },
            )
        })
        .collect()
    }

    #[test]
    fn roles_are_ordered_by_operation() {
        let tokens = tokens();
        let upsert = OpV1::Upsert {
            collection: "c".into(),
            points: vec![],
        };
        let create = OpV1::DropCollection { name: "c".into() };
        assert!(authorize(&tokens, "reader-123", &OpV1::ListCollections).is_ok());
        assert_eq!(
            authorize(&tokens, "reader-123", &upsert).unwrap_err().code,
            ErrorCode::PermissionDenied
        );
        assert!(authorize(&tokens, "writer-123", &upsert).is_ok());
        assert_eq!(
            authorize(&tokens, "writer-123", &create).unwrap_err().code,
            ErrorCode::PermissionDenied
        );
        assert!(authorize(&tokens, "admin-1234", &create).is_ok());
        assert_eq!(
            authorize(&tokens, "", &upsert).unwrap_err().code,
            ErrorCode::Unauthorized
        );
        assert_eq!(
            authorize(&tokens, "nope-nope", &upsert).unwrap_err().code,
            ErrorCode::Unauthorized
        );
    }
}
