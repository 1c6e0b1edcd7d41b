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
use edgevec_proto::client::{ClientRequest, ClientResponse, OpV1, ReplyV1};
use edgevec_proto::internal::{NodeOpV1, NodeReplyV1, NodeRequest, NodeResponse};
use edgevec_proto::{ErrorCode, NodeStatus, WireError};
use tracing::debug;

use crate::config::{ClusterConfig, NodeConfig, Token, TokenRole};
use crate::net::server::Dispatch;

/// The role an operation needs.
pub fn required_role(op: &OpV1) -> TokenRole {
    match op {
        OpV1::Status
        | OpV1::ListCollections
        | OpV1::DescribeCollection { .. }
        | OpV1::Get { .. }
        | OpV1::Search { .. } => TokenRole::Read,
        OpV1::Upsert { .. } | OpV1::Delete { .. } => TokenRole::Write,
        OpV1::CreateCollection(_) | OpV1::DropCollection { .. } => TokenRole::Admin,
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
    started: Instant,
}

impl Service {
    pub fn new(engine: Arc<Engine>, cluster: &ClusterConfig, node: NodeConfig) -> Self {
        let tokens = cluster.tokens.iter().map(|t| (t.token.clone(), t.clone())).collect();
        Self {
            engine,
            tokens,
            node,
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

    async fn op(&self, op: OpV1) -> Result<ReplyV1, WireError> {
        Ok(match op {
            OpV1::Status => {
                let collections = self.engine(|e| Ok(e.list_collections().len() as u32)).await?;
                ReplyV1::Status(NodeStatus {
                    node_id: self.node.id,
                    version: env!("CARGO_PKG_VERSION").into(),
                    addr: self.node.addr.to_string(),
                    zone: self.node.zone.clone(),
                    roles: self.node.roles.iter().map(|r| r.to_string()).collect(),
                    uptime_ms: self.started.elapsed().as_millis() as u64,
                    collections,
                })
            }
            OpV1::CreateCollection(spec) => {
                self.engine(move |e| e.create_collection(spec)).await?;
                ReplyV1::Created
            }
            OpV1::ListCollections => ReplyV1::Collections(self.engine(|e| Ok(e.list_collections())).await?),
            OpV1::DescribeCollection { name } => {
                ReplyV1::Collection(self.engine(move |e| e.describe_collection(&name)).await?)
            }
            OpV1::DropCollection { name } => {
                self.engine(move |e| e.drop_collection(&name)).await?;
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
        })
    }
}

impl Dispatch for Service {
    async fn client(&self, req: ClientRequest) -> ClientResponse {
        let ClientRequest::V1(req) = req;
        let result = match authorize(&self.tokens, &req.token, &req.op) {
            Ok(token) => {
                let name = req.op.name();
                debug!(op = name, token = %token.name, "request");
                self.op(req.op).await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = &result {
            debug!(code = ?e.code, message = %e.message, "request refused");
        }
        ClientResponse::V1(result)
    }

    async fn node(&self, _peer: u64, req: NodeRequest) -> NodeResponse {
        let NodeRequest::V1(op) = req;
        NodeResponse::V1(match op {
            NodeOpV1::Ping { .. } => Ok(NodeReplyV1::Pong { node_id: self.node.id }),
        })
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
