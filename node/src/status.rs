//! The cluster view behind `edgevec status`: metadata membership and node
//! health joined with the failure detector's observations.

use edgevec_meta::NodeState;
use edgevec_proto::{ClusterNode, ClusterStatus};

use crate::health::Health;
use crate::meta::Meta;

/// A node state's name in status output, JSON and metrics labels.
pub fn state_name(s: NodeState) -> &'static str {
    match s {
        NodeState::Up => "up",
        NodeState::Suspect => "suspect",
        NodeState::Dead => "dead",
    }
}

/// This node's view. Heartbeat ages are only known on the leader.
pub fn view(meta: &Meta, health: &Health) -> ClusterStatus {
    let m = meta.metrics();
    let state = meta.state();
    let seen = health.seen();
    let membership = m.membership_config.membership();
    let voters: Vec<u64> = membership.voter_ids().collect();
    let mut ids: Vec<u64> = membership.nodes().map(|(id, _)| *id).collect();
    ids.extend(state.nodes().map(|n| n.id));
    ids.sort_unstable();
    ids.dedup();
    let nodes = ids
        .into_iter()
        .map(|id| {
            let rec = state.node(id);
            let raft_node = membership.get_node(&id);
            let observed = seen.get(&id);
            ClusterNode {
                id,
                addr: rec
                    .map(|r| r.addr.clone())
                    .or_else(|| raft_node.map(|n| n.addr.clone()))
                    .unwrap_or_default(),
                zone: rec
                    .map(|r| r.zone.clone())
                    .or_else(|| raft_node.map(|n| n.zone.clone()))
                    .unwrap_or_default(),
                roles: rec.map(|r| r.roles.clone()).unwrap_or_default(),
                state: rec.map(|r| state_name(r.state)).unwrap_or("joining").to_string(),
                voter: voters.contains(&id),
                last_heartbeat_ms: observed.map(|s| s.at.elapsed().as_millis() as u64),
                applied_index: if id == meta.node_id {
                    m.last_applied.map(|l| l.index)
                } else {
                    observed.and_then(|s| s.applied_index)
                },
            }
        })
        .collect();
    ClusterStatus {
        leader: m.current_leader,
        term: m.current_term,
        committed_index: if m.current_leader == Some(meta.node_id) {
            m.last_applied.map(|l| l.index)
        } else {
            None
        },
        applied_index: m.last_applied.map(|l| l.index),
        answered_by: meta.node_id,
        nodes,
    }
}
