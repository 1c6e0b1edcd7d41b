//! The node's side of the metadata Raft: start-up and bootstrap, writes
//! forwarded to the leader, membership changes, and the Raft network.
//!
//! The log store and state machine live in the `edgevec-meta` crate; this
//! module wires them to the node's QUIC endpoint.
//!
//! Invariants:
//! - a node initialises the cluster only when its log is empty *and* it is a
//!   `meta` node of the cluster file: every such node proposes the same
//!   voter set, so initialisation is idempotent whatever the start order;
//!   nodes added at runtime never initialise (they wait for the leader);
//! - a metadata write returns within [`WRITE_DEADLINE`]: committed, refused
//!   by the state machine, or `Unavailable` (no leader reachable, or the
//!   leader cannot reach a majority) — it never hangs;
//! - a write returns only once *this* node has applied it, so a client that
//!   creates a collection on a node can use it on that node at once.

pub mod network;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgevec_meta::types::{ClientWriteError, RaftError};
use edgevec_meta::{MetaCommand, MetaNode, MetaResponse, MetaState, NodeState, Raft};
use edgevec_proto::internal::{MembershipChange, NodeOpV1, NodeReplyV1, NodeRequest, NodeResponse};
use edgevec_proto::{ErrorCode, WireError};
use openraft::ServerState;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::{ClusterConfig, NodeConfig, Role};
use crate::net::peer::PeerPool;

/// Longest a metadata write may take before it is reported `Unavailable`.
pub const WRITE_DEADLINE: Duration = Duration::from_secs(5);
/// Longest one attempt to hand a write to the leader may take. Short, so a
/// leader that died a moment ago costs one attempt, not the whole deadline;
/// the next attempt goes to whichever leader is known by then.
const FORWARD_ATTEMPT: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("metadata store: {0}")]
    Store(#[from] edgevec_meta::MetaStoreError),
    #[error("raft: {0}")]
    Raft(String),
}

/// A running metadata Raft member.
#[derive(Clone)]
pub struct Meta {
    pub raft: Raft,
    pub node_id: u64,
    state: watch::Receiver<Arc<MetaState>>,
    peers: Arc<PeerPool>,
}

fn unavailable(msg: impl Into<String>) -> WireError {
    WireError::new(ErrorCode::Unavailable, msg)
}

/// Milliseconds since the Unix epoch (for human-facing "since" fields).
pub fn now_ms() -> u64 {
    crate::faults::wall_ms()
}

/// How much later each voter (in id order) than the previous one
/// initialises a new metadata cluster, if it has still heard of none.
const INIT_STAGGER: std::time::Duration = std::time::Duration::from_secs(2);

impl Meta {
    /// Opens the store under `node.data_dir/meta`, starts Raft and, when
    /// this node is a configured voter with an empty log, initialises the
    /// cluster with the configured voters.
    pub async fn start(cluster: &ClusterConfig, node: &NodeConfig, peers: Arc<PeerPool>) -> Result<Self, MetaError> {
        let dir = node.data_dir.join("meta");
        let (log, sm) = tokio::task::spawn_blocking(move || edgevec_meta::open(&dir))
            .await
            .map_err(|e| MetaError::Raft(e.to_string()))??;
        let state = sm.subscribe();
        let config = openraft::Config {
            cluster_name: cluster.name.clone(),
            heartbeat_interval: cluster.raft_heartbeat_ms,
            election_timeout_min: cluster.election_timeout_ms.0,
            election_timeout_max: cluster.election_timeout_ms.1,
            install_snapshot_timeout: 2_000,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(cluster.raft_snapshot_logs),
            // Keep half an interval of log behind each snapshot, so a node
            // that is only a little behind catches up from the log.
            max_in_snapshot_log_to_keep: cluster.raft_snapshot_logs / 2,
            purge_batch_size: 1,
            ..Default::default()
        }
        .validate()
        .map_err(|e| MetaError::Raft(e.to_string()))?;
        let network = network::Network { peers: peers.clone() };
        let raft = Raft::new(node.id, Arc::new(config), network, log, sm)
            .await
            .map_err(|e| MetaError::Raft(e.to_string()))?;

        let configured_voter = cluster.node(node.id).is_some_and(|n| n.has_role(Role::Meta));
        let initialized = raft
            .is_initialized()
            .await
            .map_err(|e| MetaError::Raft(e.to_string()))?;
        if configured_voter && !initialized {
            let voters: BTreeMap<u64, MetaNode> = cluster
                .nodes
                .iter()
                .filter(|n| n.has_role(Role::Meta))
                .map(|n| (n.id, meta_node(n)))
                .collect();
            // The first voter initialises at once; each next one only if,
            // INIT_STAGGER later per rank, it has still heard of no
            // cluster (its predecessors are down). One candidate at a
            // clean start: no split votes, no contested election.
            let rank = voters.keys().position(|id| *id == node.id).unwrap_or(0) as u32;
            let raft = raft.clone();
            tokio::spawn(async move {
                tokio::time::sleep(INIT_STAGGER * rank).await;
                if raft.is_initialized().await.unwrap_or(true) {
                    return;
                }
                match raft.initialize(voters.clone()).await {
                    Ok(()) => info!(voters = ?voters.keys().collect::<Vec<_>>(), "initialised the metadata cluster"),
                    // Another voter got there first, or our log is no
                    // longer empty: both mean the cluster exists. Never
                    // re-initialise.
                    Err(e) => info!(error = %e, "not initialising"),
                }
            });
        }
        Ok(Meta {
            raft,
            node_id: node.id,
            state,
            peers,
        })
    }

    /// The node's pool of connections to other nodes.
    pub fn peers(&self) -> &PeerPool {
        &self.peers
    }

    /// The latest applied metadata.
    pub fn state(&self) -> Arc<MetaState> {
        self.state.borrow().clone()
    }

    /// Changes of the metadata from now on: the receiver's first
    /// `changed()` is the first change after this call (read the current
    /// state after subscribing, then wait).
    pub fn subscribe(&self) -> watch::Receiver<Arc<MetaState>> {
        let mut rx = self.state.clone();
        rx.mark_unchanged();
        rx
    }

    pub fn metrics(&self) -> edgevec_meta::types::RaftMetrics {
        self.raft.metrics().borrow().clone()
    }

    /// The Raft's metrics as they change (every append and apply too).
    pub fn watch_metrics(&self) -> watch::Receiver<edgevec_meta::types::RaftMetrics> {
        self.raft.metrics()
    }

    pub fn is_leader(&self) -> bool {
        self.metrics().state == ServerState::Leader
    }

    /// The current leader's id and QUIC address, if known.
    pub fn leader(&self) -> Option<(u64, std::net::SocketAddr)> {
        let m = self.metrics();
        let id = m.current_leader?;
        let addr = m.membership_config.membership().get_node(&id)?.addr.parse().ok()?;
        Some((id, addr))
    }

    /// Commits `cmd` (forwarding to the leader when needed) and waits until
    /// this node has applied it.
    pub async fn write(&self, cmd: MetaCommand) -> Result<MetaResponse, WireError> {
        let deadline = Instant::now() + WRITE_DEADLINE;
        let (resp, index) = self.commit(cmd, deadline).await?;
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(500));
        self.raft
            .wait(Some(left))
            .applied_index_at_least(Some(index), "local apply of a metadata write")
            .await
            .map_err(|_| unavailable("the write committed but this node has not applied it yet; retry"))?;
        Ok(resp)
    }

    async fn commit(&self, cmd: MetaCommand, deadline: Instant) -> Result<(MetaResponse, u64), WireError> {
        let mut last = String::from("no metadata leader is known");
        while Instant::now() < deadline {
            let left = deadline - Instant::now();
            match self.leader() {
                Some((id, _)) if id == self.node_id => match self.commit_local(cmd.clone(), left).await {
                    Ok(r) => return Ok(r),
                    Err(e) if e.code == ErrorCode::Unavailable => last = e.message,
                    Err(e) => return Err(e),
                },
                Some((id, addr)) => {
                    let req = NodeRequest::V1(NodeOpV1::MetaWrite(postcard::to_stdvec(&cmd).expect("commands encode")));
                    // Abandon the attempt as soon as another leader is
                    // known: the one we are calling may have just died.
                    let mut metrics = self.raft.metrics();
                    let leader_changed = async move {
                        while metrics.changed().await.is_ok() {
                            if metrics.borrow().current_leader != Some(id) {
                                return;
                            }
                        }
                        std::future::pending::<()>().await
                    };
                    let call = self.peers.call(addr, &req, left.min(FORWARD_ATTEMPT));
                    let result = tokio::select! {
                        r = call => r,
                        _ = leader_changed => {
                            last = format!("leader {id} was replaced during the attempt");
                            continue;
                        }
                    };
                    match result {
                        Ok(NodeResponse::V1(Ok(NodeReplyV1::MetaWritten(bytes)))) => {
                            return postcard::from_bytes(&bytes).map_err(|e| {
                                WireError::new(ErrorCode::Internal, format!("bad reply from leader: {e}"))
                            })
                        }
                        Ok(NodeResponse::V1(Err(e))) if e.code == ErrorCode::Unavailable => last = e.message,
                        Ok(NodeResponse::V1(Err(e))) => return Err(e),
                        Ok(other) => {
                            return Err(WireError::new(
                                ErrorCode::Internal,
                                format!("unexpected reply {other:?}"),
                            ))
                        }
                        Err(e) => last = format!("leader {id} at {addr}: {e}"),
                    }
                }
                None => {}
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(unavailable(format!(
            "metadata write not committed within {WRITE_DEADLINE:?} ({last}); a majority of the meta nodes must be up"
        )))
    }

    /// Proposes on this node, which must be the leader. Used for local
    /// writes and for writes forwarded by other nodes (never re-forwarded).
    pub async fn commit_local(&self, cmd: MetaCommand, within: Duration) -> Result<(MetaResponse, u64), WireError> {
        match tokio::time::timeout(within, self.raft.client_write(cmd)).await {
            Ok(Ok(r)) => Ok((r.data, r.log_id.index)),
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => Err(unavailable(format!(
                "not the metadata leader (leader: {:?})",
                f.leader_id
            ))),
            Ok(Err(e)) => Err(unavailable(format!("metadata write failed: {e}"))),
            Err(_) => Err(unavailable(format!(
                "metadata write not committed within {within:?}: the leader cannot reach a majority of the meta nodes"
            ))),
        }
    }

    /// The leader's side of a linearizable read: confirms leadership with
    /// a heartbeat round and returns the index a reader must have applied.
    pub async fn read_index_local(&self) -> Result<u64, WireError> {
        match tokio::time::timeout(FORWARD_ATTEMPT, self.raft.ensure_linearizable()).await {
            Ok(Ok(read)) => Ok(read.map_or(0, |l| l.index)),
            Ok(Err(e)) => Err(unavailable(format!(
                "not a confirmed metadata leader ({e}); a majority of the meta nodes must be up"
            ))),
            Err(_) => Err(unavailable(
                "the metadata leader could not confirm its leadership in time: it cannot reach a majority of the meta nodes",
            )),
        }
    }

    /// A linearizable read barrier: returns once this node has applied
    /// every metadata write committed before the call (read index from the
    /// leader, then a local wait), so `state()` is current.
    pub async fn read_index(&self) -> Result<(), WireError> {
        let deadline = Instant::now() + WRITE_DEADLINE;
        let index = loop {
            let attempt = match self.leader() {
                Some((id, _)) if id == self.node_id => self.read_index_local().await,
                Some((id, addr)) => {
                    let req = NodeRequest::V1(NodeOpV1::MetaReadIndex);
                    match self.peers.call(addr, &req, FORWARD_ATTEMPT).await {
                        Ok(NodeResponse::V1(Ok(NodeReplyV1::MetaReadIndex { index }))) => Ok(index),
                        Ok(NodeResponse::V1(Err(e))) => Err(e),
                        Ok(other) => Err(unavailable(format!("leader {id} answered {other:?}"))),
                        Err(e) => Err(unavailable(format!("leader {id} at {addr}: {e}"))),
                    }
                }
                None => Err(unavailable(
                    "no metadata leader is known: a majority of the meta nodes must be up",
                )),
            };
            match attempt {
                Ok(index) => break index,
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(500));
        self.raft
            .wait(Some(left))
            .applied_index_at_least(Some(index), "linearizable metadata read")
            .await
            .map_err(|_| unavailable("this node has not applied the metadata leader's commits in time"))?;
        Ok(())
    }

    /// Runs a membership change here if leader, else on the leader.
    pub async fn change_membership(&self, change: MembershipChange) -> Result<(Vec<u64>, Vec<u64>), WireError> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match self.leader() {
                Some((id, _)) if id == self.node_id => return self.change_membership_local(change).await,
                Some((_, addr)) => {
                    let req = NodeRequest::V1(NodeOpV1::ChangeMembership(change.clone()));
                    match self.peers.call(addr, &req, Duration::from_secs(60)).await {
                        Ok(NodeResponse::V1(Ok(NodeReplyV1::Membership { voters, learners }))) => {
                            return Ok((voters, learners))
                        }
                        Ok(NodeResponse::V1(Err(e))) if e.code != ErrorCode::Unavailable => return Err(e),
                        _ => {}
                    }
                }
                None => {}
            }
            if Instant::now() > deadline {
                return Err(unavailable("no metadata leader reachable to change membership"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn membership(&self) -> (BTreeSet<u64>, BTreeSet<u64>) {
        let m = self.metrics();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        let learners: BTreeSet<u64> = membership.learner_ids().collect();
        (voters, learners)
    }

    /// Membership change on the leader.
    pub async fn change_membership_local(&self, change: MembershipChange) -> Result<(Vec<u64>, Vec<u64>), WireError> {
        if !self.is_leader() {
            return Err(unavailable("not the metadata leader"));
        }
        let raft_err = |e: RaftError<ClientWriteError>| match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => unavailable("leadership changed; retry"),
            RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
                WireError::new(ErrorCode::InvalidArgument, format!("membership change refused: {e}"))
            }
            e => unavailable(format!("membership change failed: {e}")),
        };
        match change {
            MembershipChange::Add(spec) => {
                let addr: std::net::SocketAddr = spec
                    .addr
                    .parse()
                    .map_err(|_| WireError::invalid("addr", format!("{:?} is not a socket address", spec.addr)))?;
                for r in &spec.roles {
                    r.parse::<Role>().map_err(|e| WireError::invalid("roles", e))?;
                }
                if spec.id == 0 {
                    return Err(WireError::invalid("id", "node id 0 is reserved"));
                }
                let state = self.state();
                if let Some(other) = state.nodes().find(|n| n.addr == spec.addr && n.id != spec.id) {
                    return Err(WireError::new(
                        ErrorCode::AlreadyExists,
                        format!("address {} belongs to node {}", spec.addr, other.id),
                    ));
                }
                // Reachable, and really that node (its certificate names it)?
                let ping = NodeRequest::V1(NodeOpV1::Ping { from: self.node_id });
                match self.peers.call(addr, &ping, Duration::from_secs(3)).await {
                    Ok(NodeResponse::V1(Ok(NodeReplyV1::Pong { node_id }))) if node_id == spec.id => {}
                    Ok(NodeResponse::V1(Ok(NodeReplyV1::Pong { node_id }))) => {
                        return Err(WireError::invalid(
                            "id",
                            format!("the node at {addr} is node {node_id}, not {}", spec.id),
                        ))
                    }
                    Ok(other) => return Err(unavailable(format!("node {} at {addr} answered {other:?}", spec.id))),
                    Err(e) => {
                        return Err(unavailable(format!(
                            "node {} at {addr} does not answer ({e}); start it first with `edgevec node`",
                            spec.id
                        )))
                    }
                }
                let node = MetaNode {
                    addr: spec.addr.clone(),
                    zone: spec.zone.clone(),
                };
                info!(id = spec.id, %addr, "adding node as learner");
                self.raft.add_learner(spec.id, node, true).await.map_err(raft_err)?;
                let register = edgevec_meta::CommandV1::RegisterNode {
                    id: spec.id,
                    addr: spec.addr.clone(),
                    zone: spec.zone.clone(),
                    roles: spec.roles.clone(),
                };
                self.commit_local(register.into(), WRITE_DEADLINE).await?;
                if spec.roles.iter().any(|r| r == "meta") {
                    info!(id = spec.id, "promoting to voter");
                    self.raft
                        .change_membership(openraft::ChangeMembers::AddVoterIds([spec.id].into()), false)
                        .await
                        .map_err(raft_err)?;
                }
            }
            MembershipChange::Remove { id } => {
                let (voters, learners) = self.membership();
                if voters.contains(&id) {
                    let remaining: BTreeSet<u64> = voters.iter().copied().filter(|v| *v != id).collect();
                    if remaining.is_empty() {
                        return Err(WireError::invalid(
                            "id",
                            format!("node {id} is the last voter; it cannot be removed"),
                        ));
                    }
                    let state = self.state();
                    let up = remaining
                        .iter()
                        .filter(|v| **v == self.node_id || state.node(**v).is_some_and(|n| n.state == NodeState::Up))
                        .count();
                    if up * 2 <= remaining.len() {
                        return Err(WireError::invalid(
                            "id",
                            format!(
                                "removing voter {id} would leave {up} of {} remaining voters up: no majority; bring voters back first",
                                remaining.len()
                            ),
                        ));
                    }
                    info!(id, "removing voter");
                    self.raft
                        .change_membership(openraft::ChangeMembers::RemoveVoters([id].into()), false)
                        .await
                        .map_err(raft_err)?;
                } else if learners.contains(&id) {
                    info!(id, "removing learner");
                    self.raft
                        .change_membership(openraft::ChangeMembers::RemoveNodes([id].into()), false)
                        .await
                        .map_err(raft_err)?;
                } else if self.state().node(id).is_none() {
                    return Err(WireError::new(
                        ErrorCode::NotFound,
                        format!("node {id} is not a member"),
                    ));
                }
                self.commit_local(edgevec_meta::CommandV1::RemoveNode { id }.into(), WRITE_DEADLINE)
                    .await?;
            }
        }
        let (voters, learners) = self.membership();
        Ok((voters.into_iter().collect(), learners.into_iter().collect()))
    }

    /// Adds a configured node as a learner when it first shows up (leader
    /// only; a no-op for members).
    pub async fn ensure_member(&self, id: u64, addr: &str, zone: &str) {
        let (voters, learners) = self.membership();
        if voters.contains(&id) || learners.contains(&id) {
            return;
        }
        let node = MetaNode {
            addr: addr.to_string(),
            zone: zone.to_string(),
        };
        info!(id, addr, "adding configured node as learner");
        if let Err(e) = self.raft.add_learner(id, node, false).await {
            warn!(id, error = %e, "could not add learner");
        }
    }
}

/// The Raft node record of a configured node.
pub fn meta_node(n: &NodeConfig) -> MetaNode {
    MetaNode {
        addr: n.addr.to_string(),
        zone: n.zone.clone(),
    }
}
