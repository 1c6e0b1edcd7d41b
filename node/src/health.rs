//! Failure detector: heartbeats to the metadata leader, and the leader's
//! verdicts (`up` → `suspect` → `dead`) committed through Raft.
//!
//! Every node sends a [`Heartbeat`] to the leader every `heartbeat_ms`.
//! The leader keeps the time it last heard from each node. A node silent for
//! `suspect_ms` is marked `suspect`, for `dead_after_ms` `dead`; a heartbeat
//! from a node not marked `up` marks it `up` again. Verdicts are Raft
//! commands, so every node sees the same health and it survives failover.
//!
//! Invariants:
//! - only the leader judges, and only from what it observed itself: a new
//!   leader starts every node's clock at its own election, so it never
//!   declares a node dead on a predecessor's stale data. The one clock it
//!   starts earlier is that of the leader it heartbeated to before: that
//!   node's silence since it last acknowledged one of this node's
//!   heartbeats is this node's own observation (the election it won says
//!   the same), so a node that dies as metadata leader is judged
//!   `suspect_ms` after it fell silent, not `suspect_ms` after the election.
//!   That silence counts for `suspect_ms` at most: an election may make
//!   the leader before `suspect` at once, never `dead`;
//! - the verdict is a pure function ([`verdict`]) of silence and settings.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edgevec_meta::{CommandV1, MetaState, NodeState};
use edgevec_proto::internal::{Heartbeat, NodeOpV1, NodeReplyV1, NodeRequest, NodeResponse};
use openraft::ServerState;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::config::{ClusterConfig, HealthSettings, NodeConfig};
use crate::meta::{now_ms, Meta};
use crate::net::peer::PeerPool;

/// Returns when this node's Raft state turns to leader (`leading` false)
/// or away from it (`leading` true); never if the Raft has stopped.
async fn leadership_flips(metrics: &mut tokio::sync::watch::Receiver<edgevec_meta::types::RaftMetrics>, leading: bool) {
    loop {
        if (metrics.borrow_and_update().state == ServerState::Leader) != leading {
            return;
        }
        if metrics.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// The state a node deserves after `silence` without a heartbeat.
pub fn verdict(silence: Duration, s: &HealthSettings) -> NodeState {
    if silence >= s.dead_after {
        NodeState::Dead
    } else if silence >= s.suspect_after {
        NodeState::Suspect
    } else {
        NodeState::Up
    }
}

fn severity(s: NodeState) -> u8 {
    match s {
        NodeState::Up => 0,
        NodeState::Suspect => 1,
        NodeState::Dead => 2,
    }
}

/// What the leader observed of one node.
#[derive(Debug, Clone, Copy)]
pub struct Seen {
    pub at: Instant,
    pub applied_index: Option<u64>,
}

/// The failure detector of one node (observations matter on the leader).
pub struct Health {
    meta: Meta,
    me: NodeConfig,
    cluster: ClusterConfig,
    settings: HealthSettings,
    peers: Arc<PeerPool>,
    seen: Mutex<HashMap<u64, Seen>>,
    /// When this node last became leader (the baseline for unseen nodes).
    leader_since: Mutex<Option<Instant>>,
    /// Commands proposed but not yet applied, to avoid proposing twice.
    pending: Mutex<HashSet<(u64, u8)>>,
    /// When the leader last acknowledged one of our heartbeats, and its
    /// applied metadata index then.
    last_ack: Mutex<Option<(Instant, Option<u64>)>>,
    /// The other node that last acknowledged one of our heartbeats, and
    /// when (the leader before, once this node leads).
    last_remote_ack: Mutex<Option<(u64, Instant)>>,
}

impl Health {
    pub fn new(meta: Meta, me: NodeConfig, cluster: ClusterConfig, peers: Arc<PeerPool>) -> Arc<Self> {
        Arc::new(Health {
            meta,
            me,
            settings: cluster.health,
            cluster,
            peers,
            seen: Mutex::new(HashMap::new()),
            leader_since: Mutex::new(None),
            pending: Mutex::new(HashSet::new()),
            last_ack: Mutex::new(None),
            last_remote_ack: Mutex::new(None),
        })
    }

    pub fn settings(&self) -> HealthSettings {
        self.settings
    }

    /// If the leader acknowledged a heartbeat within `d`: its applied
    /// metadata index at that moment.
    pub fn leader_applied_within(&self, d: Duration) -> Option<Option<u64>> {
        let ack = *self.last_ack.lock().expect("health lock");
        ack.filter(|(at, _)| at.elapsed() <= d).map(|(_, applied)| applied)
    }

    fn acked(&self, by: u64, leader_applied: Option<u64>) {
        let now = Instant::now();
        *self.last_ack.lock().expect("health lock") = Some((now, leader_applied));
        if by != self.me.id {
            *self.last_remote_ack.lock().expect("health lock") = Some((by, now));
        }
    }

    /// Last observation of each node (leader's view; empty elsewhere).
    pub fn seen(&self) -> HashMap<u64, Seen> {
        self.seen.lock().expect("health lock").clone()
    }

    fn heartbeat_msg(&self) -> Heartbeat {
        Heartbeat {
            from: self.me.id,
            addr: self.me.addr.to_string(),
            zone: self.me.zone.clone(),
            roles: self.me.role_names(),
            applied_index: self.meta.metrics().last_applied.map(|l| l.index),
        }
    }

    /// Runs the sender and, while leader, the judge, until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let judge = tokio::spawn(self.clone().run_judge(shutdown.clone()));
        let mut tick = tokio::time::interval(self.settings.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            self.send_heartbeat().await;
        }
        let _ = judge.await;
    }

    /// Judges every `heartbeat_ms` while this node leads the metadata
    /// Raft, and at once when it wins an election: not after a heartbeat
    /// to the leader before it, which waits out its timeout when that
    /// leader is dead.
    async fn run_judge(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(self.settings.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut metrics = self.meta.watch_metrics();
        loop {
            let leading = self.leader_since.lock().expect("health lock").is_some();
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
                _ = leadership_flips(&mut metrics, leading) => {}
            }
            self.track_leadership();
            if self.meta.is_leader() {
                self.judge().await;
            }
        }
    }

    fn track_leadership(&self) {
        let leader = self.meta.metrics().state == ServerState::Leader;
        let mut since = self.leader_since.lock().expect("health lock");
        match (leader, since.is_some()) {
            (true, false) => {
                info!("became metadata leader; starting failure detection");
                *since = Some(Instant::now());
                let mut seen = self.seen.lock().expect("health lock");
                seen.clear();
                // The leader before, if this node heard from it: silent
                // since its last acknowledgement, by this node's own clock,
                // but for `suspect_ms` at most, so that an election never
                // makes it dead at once (that verdict moves its replicas).
                if let Some((node, acked)) = *self.last_remote_ack.lock().expect("health lock") {
                    let floor = Instant::now().checked_sub(self.settings.suspect_after);
                    let at = floor.map_or(acked, |f| acked.max(f));
                    debug!(
                        node,
                        silent_ms = acked.elapsed().as_millis() as u64,
                        "the leader before was last heard from"
                    );
                    seen.insert(
                        node,
                        Seen {
                            at,
                            applied_index: None,
                        },
                    );
                }
            }
            (false, true) => *since = None,
            _ => {}
        }
    }

    async fn send_heartbeat(self: &Arc<Self>) {
        let hb = self.heartbeat_msg();
        match self.meta.leader() {
            Some((id, _)) if id == self.me.id => {
                let applied = hb.applied_index;
                self.clone().observe(hb);
                self.acked(self.me.id, applied);
            }
            Some((id, addr)) => {
                let req = NodeRequest::V1(NodeOpV1::Heartbeat(hb));
                let timeout = self.settings.heartbeat.max(Duration::from_millis(500));
                match self.peers.call(addr, &req, timeout).await {
                    Ok(NodeResponse::V1(Ok(NodeReplyV1::HeartbeatAck { leader_applied, .. }))) => {
                        self.acked(id, leader_applied);
                    }
                    Ok(other) => debug!(leader = id, reply = ?other, "heartbeat refused"),
                    Err(e) => debug!(leader = id, error = %e, "heartbeat not delivered"),
                }
            }
            // A node that is not a member yet (a configured learner on its
            // first start) learns of no leader until it is added: it asks
            // every configured meta node, and the leader among them admits it.
            None => {
                let timeout = self.settings.heartbeat.max(Duration::from_millis(500));
                let req = NodeRequest::V1(NodeOpV1::Heartbeat(hb));
                let mut calls = tokio::task::JoinSet::new();
                for n in self
                    .cluster
                    .nodes
                    .iter()
                    .filter(|n| n.id != self.me.id && n.has_role(crate::config::Role::Meta))
                {
                    let (peers, req, addr, to) = (self.peers.clone(), req.clone(), n.addr, n.id);
                    calls.spawn(async move { (to, peers.call(addr, &req, timeout).await) });
                }
                while let Some(reply) = calls.join_next().await {
                    if let Ok((
                        to,
                        Ok(NodeResponse::V1(Ok(NodeReplyV1::HeartbeatAck {
                            leader: Some(_),
                            leader_applied,
                            ..
                        }))),
                    )) = reply
                    {
                        self.acked(to, leader_applied);
                    }
                }
            }
        }
    }

    /// A heartbeat arrived (on the leader). Records it and, off the caller's
    /// path, registers the node, adds it as a learner, or marks it up.
    pub fn observe(self: Arc<Self>, hb: Heartbeat) -> NodeReplyV1 {
        let m = self.meta.metrics();
        if m.state == ServerState::Leader {
            self.seen.lock().expect("health lock").insert(
                hb.from,
                Seen {
                    at: Instant::now(),
                    applied_index: hb.applied_index,
                },
            );
            tokio::spawn(async move { self.admit(hb).await });
        }
        NodeReplyV1::HeartbeatAck {
            leader: m.current_leader,
            term: m.current_term,
            leader_applied: if m.state == ServerState::Leader {
                m.last_applied.map(|l| l.index)
            } else {
                None
            },
        }
    }

    async fn admit(&self, hb: Heartbeat) {
        let state = self.meta.state();
        // Nodes of the cluster file join as learners when they first appear.
        if let Some(configured) = self.cluster.node(hb.from) {
            if configured.addr.to_string() == hb.addr {
                self.meta.ensure_member(hb.from, &hb.addr, &hb.zone).await;
            }
        }
        let known = state.node(hb.from);
        let cmd = match known {
            Some(n) if n.addr == hb.addr && n.zone == hb.zone && n.roles == hb.roles => {
                if n.state == NodeState::Up {
                    return;
                }
                CommandV1::SetNodeState {
                    id: hb.from,
                    state: NodeState::Up,
                    at_ms: now_ms(),
                }
            }
            // Unknown nodes must be configured or added with `node add`.
            None if self.cluster.node(hb.from).is_none() && !self.is_member(hb.from) => return,
            _ => CommandV1::RegisterNode {
                id: hb.from,
                addr: hb.addr.clone(),
                zone: hb.zone.clone(),
                roles: hb.roles.clone(),
            },
        };
        self.propose(hb.from, 0, cmd).await;
    }

    fn is_member(&self, id: u64) -> bool {
        let m = self.meta.metrics();
        let membership = m.membership_config.membership();
        membership.get_node(&id).is_some()
    }

    /// The leader's periodic judgement of silent nodes.
    async fn judge(&self) {
        let Some(since) = *self.leader_since.lock().expect("health lock") else {
            return;
        };
        let state: Arc<MetaState> = self.meta.state();
        let seen = self.seen();
        let now = Instant::now();
        for node in state.nodes() {
            if node.id == self.me.id {
                continue;
            }
            let last = seen.get(&node.id).map(|s| s.at).unwrap_or(since);
            let want = verdict(now.duration_since(last), &self.settings);
            if severity(want) > severity(node.state) {
                info!(node = node.id, state = ?want, "failure detector verdict");
                self.propose(
                    node.id,
                    severity(want),
                    CommandV1::SetNodeState {
                        id: node.id,
                        state: want,
                        at_ms: now_ms(),
                    },
                )
                .await;
            }
        }
    }

    async fn propose(&self, id: u64, kind: u8, cmd: CommandV1) {
        if !self.pending.lock().expect("health lock").insert((id, kind)) {
            return;
        }
        let result = self.meta.commit_local(cmd.into(), Duration::from_secs(2)).await;
        self.pending.lock().expect("health lock").remove(&(id, kind));
        if let Err(e) = result {
            debug!(node = id, error = %e.message, "health update not committed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_follow_silence() {
        let s = HealthSettings {
            heartbeat: Duration::from_millis(200),
            suspect_after: Duration::from_millis(1000),
            dead_after: Duration::from_secs(60),
        };
        assert_eq!(verdict(Duration::from_millis(999), &s), NodeState::Up);
        assert_eq!(verdict(Duration::from_millis(1000), &s), NodeState::Suspect);
        assert_eq!(verdict(Duration::from_secs(59), &s), NodeState::Suspect);
        assert_eq!(verdict(Duration::from_secs(60), &s), NodeState::Dead);
        assert!(severity(NodeState::Dead) > severity(NodeState::Suspect));
    }
}
