//! The request service: authentication, authorisation, and dispatch of
//! client operations to the storage engine.
//!
//! Invariants:
//! - the token is checked before anything else in the request is looked at;
//! - the role a request needs is a pure function of the operation
//!   ([`required_role`]), so the policy is in one place and tested;
//! - data requests go to the router (client side) or the data plane
//!   (node side); metadata changes go through the metadata Raft;
//! - node requests that claim a node id are refused unless it is the id in
//!   the caller's certificate.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use std::time::Duration;

use edgevec_meta::{CommandV1, CommandV2, MetaCommand, MetaResponse, RejectCode, Replication};
use edgevec_proto::client::{ClientRequest, ClientResponse, OpV1, ReplyV1};
use edgevec_proto::internal::{MembershipChange, NodeOpV1, NodeReplyV1, NodeRequest, NodeResponse, RaftRpc};
use edgevec_proto::{
    ClusterStatus, CollectionSpec, ErrorCode, FieldSpec, IndexSpec, NodeStatus, ReplicationSpec, SearchParams,
    WireError,
};
use tracing::debug;

use crate::config::{ClusterConfig, NodeConfig, Role, Token, TokenRole};
use crate::health::Health;
use crate::meta::{now_ms, Meta};
use crate::metrics::Metrics;
use crate::net::server::Dispatch;
use crate::replication::DataPlane;
use crate::router::Router;

/// How long a create waits for every shard's primary to take writes.
const CREATE_READY_WAIT: Duration = Duration::from_secs(5);
/// How long a create waits, in a cluster that is forming, for the data
/// nodes cluster.toml names to register: nodes answer clients a moment
/// before their roles are committed, so a create sent right after `up`
/// would otherwise be refused for want of data nodes that are starting.
const FORMING_WAIT: Duration = Duration::from_secs(10);

/// The role an operation needs.
pub fn required_role(op: &OpV1) -> TokenRole {
    match op {
        OpV1::Status
        | OpV1::ListCollections
        | OpV1::DescribeCollection { .. }
        | OpV1::DescribeCollectionV2 { .. }
        | OpV1::DescribeCollectionV3 { .. }
        | OpV1::Get { .. }
        | OpV1::Search { .. }
        | OpV1::GetV2 { .. }
        | OpV1::SearchV2 { .. }
        | OpV1::SearchV3 { .. }
        | OpV1::SearchV4 { .. }
        | OpV1::Count { .. }
        | OpV1::ClusterStatus
        | OpV1::Shards { .. }
        | OpV1::ListPlugins => TokenRole::Read,
        OpV1::Upsert { .. }
        | OpV1::Delete { .. }
        | OpV1::UpsertV2 { .. }
        | OpV1::DeleteV2 { .. }
        | OpV1::DeleteByFilter { .. } => TokenRole::Write,
        OpV1::CreateCollection(_)
        | OpV1::CreateReplicatedV2 { .. }
        | OpV1::CreateCollectionV3 { .. }
        | OpV1::CreateReplicated { .. }
        | OpV1::Load { .. }
        | OpV1::SetLoadBalancer { .. }
        | OpV1::SetHedging { .. }
        | OpV1::DeployPlugin { .. }
        | OpV1::RemovePlugin { .. }
        | OpV1::SetNativePolicies { .. }
        | OpV1::DropCollection { .. }
        | OpV1::AddNode(_)
        | OpV1::RemoveNode { .. } => TokenRole::Admin,
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
    tokens: HashMap<String, Token>,
    node: NodeConfig,
    /// Nodes with the data role in cluster.toml.
    configured_data_nodes: u32,
    meta: Meta,
    health: Arc<Health>,
    plane: Arc<DataPlane>,
    router: Arc<Router>,
    deployer: Arc<crate::deploy::Deployer>,
    metrics: Arc<Metrics>,
    started: Instant,
}

/// Everything the service needs from the rest of the node.
#[derive(Clone)]
pub struct Parts {
    pub meta: Meta,
    pub health: Arc<Health>,
    pub plane: Arc<DataPlane>,
    pub router: Arc<Router>,
    pub metrics: Arc<Metrics>,
    pub deployer: Arc<crate::deploy::Deployer>,
}

/// The wire error of a refused metadata command.
pub(crate) fn rejected(resp: &MetaResponse) -> Option<WireError> {
    let (code, message) = resp.rejection()?;
    let code = match code {
        RejectCode::NotFound => ErrorCode::NotFound,
        RejectCode::AlreadyExists => ErrorCode::AlreadyExists,
        RejectCode::Invalid => ErrorCode::InvalidArgument,
        RejectCode::Conflict => ErrorCode::Conflict,
    };
    Some(WireError::new(code, message.to_string()))
}

impl Service {
    pub fn new(cluster: &ClusterConfig, node: NodeConfig, parts: Parts) -> Self {
        let tokens = cluster.tokens.iter().map(|t| (t.token.clone(), t.clone())).collect();
        Self {
            tokens,
            node,
            configured_data_nodes: cluster.nodes.iter().filter(|n| n.has_role(Role::Data)).count() as u32,
            meta: parts.meta,
            health: parts.health,
            router: parts.router,
            plane: parts.plane,
            metrics: parts.metrics,
            deployer: parts.deployer,
            started: Instant::now(),
        }
    }

    /// Commits a metadata command, then makes the local replicas follow.
    async fn meta_write(&self, cmd: MetaCommand) -> Result<(), WireError> {
        let resp = self.meta.write(cmd.clone()).await?;
        if let Some(e) = rejected(&resp) {
            if !self.is_own_create(&cmd, &e) {
                return Err(e);
            }
        }
        self.plane.sync().await;
        Ok(())
    }

    /// A create that was retried after an attempt whose fate was unknown
    /// (the leader died or was slow) may find its own first attempt
    /// committed: same spec, same creation time. That is success.
    fn is_own_create(&self, cmd: &MetaCommand, e: &WireError) -> bool {
        let (MetaCommand::V2(CommandV2::CreateCollection { spec, at_ms, .. })
        | MetaCommand::V2(CommandV2::CreateCollectionV2 { spec, at_ms, .. })
        | MetaCommand::V2(CommandV2::CreateCollectionV3 { spec, at_ms, .. })) = cmd
        else {
            return false;
        };
        e.code == ErrorCode::AlreadyExists
            && self
                .meta
                .state()
                .collection(&spec.name)
                .is_some_and(|c| c.spec == *spec && c.created_at_ms == *at_ms)
    }

    /// Checks a replication request against the data nodes that exist.
    /// A read barrier first: a node that joined a moment ago (or a learner
    /// behind the leader) must not judge by a registry it has not caught
    /// up with.
    ///
    /// While the cluster is forming (fewer data nodes registered than the
    /// request needs, and cluster.toml names more than are registered), it
    /// waits for them, up to [`FORMING_WAIT`]; nothing is proposed before.
    async fn replication(&self, r: ReplicationSpec) -> Result<Replication, WireError> {
        let deadline = Instant::now() + FORMING_WAIT;
        let data_nodes = loop {
            self.meta.read_index().await?;
            let registered = self.meta.state().nodes().filter(|n| n.has_role("data")).count() as u32;
            let forming = registered < self.configured_data_nodes && (registered == 0 || r.replicas > registered);
            if !forming || Instant::now() >= deadline {
                break registered;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let min = r.effective_min_insync();
        if r.replicas == 0 {
            return Err(WireError::invalid("replicas", "replicas must be at least 1"));
        }
        if data_nodes == 0 {
            // A cluster that is forming: nodes register their roles
            // through the metadata once they are up.
            return Err(WireError::new(
                ErrorCode::Unavailable,
                "no node with the data role has joined the cluster yet (nodes register their roles once they are up); retry",
            ));
        }
        if r.replicas > data_nodes {
            return Err(WireError::invalid(
                "replicas",
                format!(
                    "{} replicas asked but the cluster has {data_nodes} data nodes; each replica needs its own data node",
                    r.replicas
                ),
            ));
        }
        if min == 0 || min > r.replicas {
            return Err(WireError::invalid(
                "min_insync",
                format!("min_insync must be between 1 and replicas ({}), not {min}", r.replicas),
            ));
        }
        Ok(Replication {
            replicas: r.replicas,
            min_insync: min,
        })
    }

    /// Creates a collection with its initial placement, then waits until
    /// every shard takes writes.
    async fn create(
        &self,
        spec: CollectionSpec,
        r: ReplicationSpec,
        index: IndexSpec,
        fields: Vec<FieldSpec>,
    ) -> Result<ReplyV1, WireError> {
        edgevec_engine::validate::collection_spec(&spec).map_err(|e| e.to_wire())?;
        edgevec_engine::validate::index_spec(&index).map_err(|e| e.to_wire())?;
        FieldSpec::check(&fields).map_err(|m| WireError::invalid("index_field", m))?;
        let replication = self.replication(r).await?;
        let state = self.meta.state();
        // Only nodes the metadata leader heard from lately: a node that
        // died a moment ago is still `up` until the failure detector says
        // otherwise, and a shard placed on it could not take writes.
        let view = self.cluster_status().await;
        let fresh = Duration::from_millis(self.health.settings().suspect_after.as_millis() as u64 / 2);
        let heard = |id: u64| {
            view.nodes
                .iter()
                .find(|n| n.id == id)
                .and_then(|n| n.last_heartbeat_ms)
                .is_none_or(|ms| Duration::from_millis(ms) <= fresh)
        };
        let nodes: Vec<edgevec_meta::DataNode> = state
            .nodes()
            .filter(|n| n.has_role("data") && n.state == edgevec_meta::NodeState::Up && heard(n.id))
            .map(|n| edgevec_meta::DataNode {
                id: n.id,
                zone: n.zone.clone(),
            })
            .collect();
        let placement = edgevec_meta::place(spec.shards, replication.replicas, &nodes).map_err(|e| {
            WireError::new(
                ErrorCode::Unavailable,
                format!("cannot place the shards now: {e} (nodes that are not up are not used)"),
            )
        })?;
        let name = spec.name.clone();
        let at_ms = now_ms();
        // The oldest form that says it all: nodes of earlier builds apply it.
        let cmd = if !fields.is_empty() {
            CommandV2::CreateCollectionV3 {
                spec,
                replication,
                at_ms,
                placement,
                index,
                fields,
            }
        } else if index == IndexSpec::default() {
            CommandV2::CreateCollection {
                spec,
                replication,
                at_ms,
                placement,
            }
        } else {
            CommandV2::CreateCollectionV2 {
                spec,
                replication,
                at_ms,
                placement,
                index,
            }
        };
        self.meta_write(MetaCommand::V2(cmd)).await?;
        // The create is committed either way; writes before the primaries
        // are ready get retryable refusals that the client retries.
        if let Err(e) = self.router.wait_writable(&name, CREATE_READY_WAIT).await {
            tracing::warn!(collection = %name, error = %e.message, "created, but not every shard takes writes yet");
        }
        Ok(ReplyV1::Created)
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
                self.create(spec, ReplicationSpec::new(1), IndexSpec::default(), Vec::new())
                    .await?
            }
            OpV1::CreateReplicated { spec, replication } => {
                self.create(spec, replication, IndexSpec::default(), Vec::new()).await?
            }
            OpV1::CreateReplicatedV2 {
                spec,
                replication,
                index,
            } => self.create(spec, replication, index, Vec::new()).await?,
            OpV1::CreateCollectionV3 {
                spec,
                replication,
                index,
                fields,
            } => self.create(spec, replication, index, fields).await?,
            OpV1::Load { name, replication } => {
                let replication = self.replication(replication).await?;
                let id = self.meta.state().collection(&name).map(|c| c.id).ok_or_else(|| {
                    WireError::new(ErrorCode::NotFound, format!("collection {name:?} does not exist"))
                })?;
                self.meta_write(MetaCommand::V2(CommandV2::SetReplication {
                    collection: id,
                    replication,
                }))
                .await?;
                ReplyV1::Loaded
            }
            OpV1::Shards { collection } => ReplyV1::Shards(self.router.shards(collection.as_deref()).await?),
            OpV1::ListPlugins => ReplyV1::Plugins(self.router.plugins().await),
            OpV1::SetLoadBalancer { collection, plugin } => {
                let id = self.meta.state().collection(&collection).map(|c| c.id).ok_or_else(|| {
                    WireError::new(ErrorCode::NotFound, format!("collection {collection:?} does not exist"))
                })?;
                self.meta_write(MetaCommand::V2(CommandV2::SetLoadBalancer {
                    collection: id,
                    name: plugin,
                }))
                .await?;
                ReplyV1::LoadBalancerSet
            }
            OpV1::SetHedging { collection, on } => {
                let id = self.meta.state().collection(&collection).map(|c| c.id).ok_or_else(|| {
                    WireError::new(ErrorCode::NotFound, format!("collection {collection:?} does not exist"))
                })?;
                self.meta_write(MetaCommand::V1(edgevec_meta::CommandV1::SetSetting {
                    key: crate::router::hedge_setting(id),
                    value: if on { "on" } else { "off" }.into(),
                }))
                .await?;
                ReplyV1::HedgingSet
            }
            OpV1::DeployPlugin { name, bytes, params } => {
                let (version, sha256) = self.deployer.deploy(&name, bytes, params).await?;
                ReplyV1::PluginDeployed { version, sha256 }
            }
            OpV1::RemovePlugin { name } => {
                self.deployer.remove(&name).await?;
                ReplyV1::PluginRemoved
            }
            OpV1::SetNativePolicies { native } => {
                self.meta_write(MetaCommand::V1(edgevec_meta::CommandV1::SetSetting {
                    key: crate::deploy::NATIVE_SETTING.into(),
                    value: native.to_string(),
                }))
                .await?;
                self.deployer.sync();
                ReplyV1::NativePoliciesSet
            }
            OpV1::ListCollections => ReplyV1::Collections(self.router.list().await),
            OpV1::DescribeCollection { name } => ReplyV1::Collection(self.router.describe(&name).await?),
            OpV1::DescribeCollectionV2 { name } => {
                let d = self.router.details(&name).await?;
                ReplyV1::Details(edgevec_proto::CollectionDetailsV1 {
                    info: d.info,
                    index: d.index,
                    builds: d.builds,
                })
            }
            OpV1::DescribeCollectionV3 { name } => ReplyV1::DetailsV2(self.router.details(&name).await?),
            OpV1::DropCollection { name } => {
                // A drop retried after an attempt of unknown fate (the
                // leader died mid-request) finds the collection gone. If it
                // existed when this request arrived, gone is what was asked.
                let existed = self.meta.state().collection(&name).is_some();
                match self.meta_write(CommandV1::DropCollection { name }.into()).await {
                    Err(e) if e.code == ErrorCode::NotFound && existed => {}
                    other => other?,
                }
                ReplyV1::Dropped
            }
            OpV1::Upsert { collection, points } => ReplyV1::Written(self.router.upsert(&collection, points).await?),
            OpV1::Delete { collection, ids } => ReplyV1::Written(self.router.delete(&collection, ids).await?),
            OpV1::Get { collection, ids } => ReplyV1::Points(self.router.get(&collection, ids).await?),
            OpV1::Search {
                collection,
                queries,
                k,
                with_payload,
            } => ReplyV1::Hits(self.router.search(&collection, queries, k, with_payload).await?),
            OpV1::UpsertV2 { collection, points } => {
                ReplyV1::WrittenV2(self.router.upsert_v2(&collection, points).await?)
            }
            OpV1::DeleteV2 { collection, ids } => ReplyV1::WrittenV2(self.router.delete_v2(&collection, ids).await?),
            OpV1::DeleteByFilter { collection, filter } => {
                ReplyV1::WrittenV2(self.router.delete_by_filter(&collection, filter).await?)
            }
            OpV1::Count {
                collection,
                filter,
                read,
            } => {
                let (count, tokens) = self.router.count_at(&collection, filter, read).await?;
                ReplyV1::Count { count, tokens }
            }
            OpV1::GetV2 { collection, ids, read } => {
                let (points, tokens) = self.router.get_at(&collection, ids, read).await?;
                ReplyV1::PointsAt { points, tokens }
            }
            OpV1::SearchV2 {
                collection,
                queries,
                k,
                with_payload,
                read,
            } => {
                let params = SearchParams::default();
                let (hits, tokens) = self
                    .router
                    .search_at(&collection, queries, k, with_payload, read, params, None)
                    .await?;
                ReplyV1::HitsAt { hits, tokens }
            }
            OpV1::SearchV3 {
                collection,
                queries,
                k,
                with_payload,
                read,
                params,
            } => {
                let (hits, tokens) = self
                    .router
                    .search_at(&collection, queries, k, with_payload, read, params, None)
                    .await?;
                ReplyV1::HitsAt { hits, tokens }
            }
            OpV1::SearchV4 {
                collection,
                queries,
                k,
                with_payload,
                read,
                params,
                filter,
            } => {
                let (hits, tokens) = self
                    .router
                    .search_at(&collection, queries, k, with_payload, read, params, Some(filter))
                    .await?;
                ReplyV1::HitsAt { hits, tokens }
            }
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
    fn knows_token(&self, token: &str) -> bool {
        self.tokens.contains_key(token)
    }

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

    async fn node(&self, peer: u64, req: NodeRequest) -> NodeResponse {
        let NodeRequest::V1(op) = req;
        if let Err(e) = check_claim(peer, &op) {
            debug!(peer, error = %e.message, "node request refused");
            return NodeResponse::V1(Err(e));
        }
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
            NodeOpV1::Replicate(_) => "replicate",
            NodeOpV1::ShardWrite { .. } => "shard_write",
            NodeOpV1::ShardRead(_) => "shard_read",
            NodeOpV1::MetaReadIndex => "meta_read_index",
            NodeOpV1::ExportChunk(_) => "export_chunk",
            NodeOpV1::PluginStatus => "plugin_status",
            NodeOpV1::PluginPut { .. } => "plugin_put",
            NodeOpV1::PluginGet { .. } => "plugin_get",
            NodeOpV1::ShardReadAt(_) => "shard_read_at",
            NodeOpV1::CommitPoint { .. } => "commit_point",
            NodeOpV1::SealedDigests { .. } => "sealed_digests",
        };
        let result = match op {
            NodeOpV1::Ping { .. } => Ok(NodeReplyV1::Pong { node_id: self.node.id }),
            NodeOpV1::Raft(rpc) => crate::meta::network::serve(&self.meta.raft, peer, rpc)
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
            NodeOpV1::Replicate(msg) => self.plane.on_replicate(peer, msg).await.map(NodeReplyV1::Replicated),
            NodeOpV1::ShardWrite { shard, op } => {
                self.router
                    .on_shard_write(shard, op)
                    .await
                    .map(|w| NodeReplyV1::ShardCommitted {
                        op: w.op,
                        deleted: w.deleted,
                    })
            }
            NodeOpV1::ShardRead(read) => self.plane.read(read).await.map(NodeReplyV1::ShardRead),
            NodeOpV1::MetaReadIndex => self
                .meta
                .read_index_local()
                .await
                .map(|index| NodeReplyV1::MetaReadIndex { index }),
            NodeOpV1::ExportChunk(chunk) => self
                .plane
                .on_export_chunk(peer, chunk)
                .await
                .map(NodeReplyV1::ExportProgress),
            NodeOpV1::PluginStatus => Ok(NodeReplyV1::PluginStatus(self.router.local_plugins())),
            NodeOpV1::PluginPut { sha256, bytes } => self
                .deployer
                .on_put(&sha256, &bytes)
                .map(|()| NodeReplyV1::PluginStored),
            NodeOpV1::PluginGet { sha256 } => self.deployer.on_get(&sha256).map(NodeReplyV1::PluginBytes),
            NodeOpV1::ShardReadAt(read) => self.plane.read_at(peer, read).await.map(NodeReplyV1::ShardReadAt),
            NodeOpV1::CommitPoint { shard, term } => self
                .plane
                .commit_point(shard, term)
                .await
                .map(|lsn| NodeReplyV1::CommitPoint { lsn }),
            NodeOpV1::SealedDigests { shard, term } => self
                .plane
                .on_sealed_digests(peer, shard, term)
                .await
                .map(NodeReplyV1::SealedDigests),
        };
        self.metrics.record_rpc("node", name, result.is_ok(), started.elapsed());
        NodeResponse::V1(result)
    }
}

/// Refuses a node request that speaks for another node than the one
/// its certificate names (Raft messages are checked where they are
/// decoded, in `meta::network::serve`).
pub fn check_claim(peer: u64, op: &NodeOpV1) -> Result<(), WireError> {
    let claimed = match op {
        NodeOpV1::Ping { from } => Some(*from),
        NodeOpV1::Heartbeat(hb) => Some(hb.from),
        _ => None,
    };
    crate::net::check_claim(peer, claimed)
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
