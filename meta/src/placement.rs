//! Shard-configuration decisions as pure functions: where replicas go, who
//! becomes primary after a failure, and how the in-sync set and
//! eligibility move (REPLICATION.md).
//!
//! No I/O and no clock: the metadata leader (node crate) gathers the inputs
//! (data nodes and zones, liveness, reported op ids, load), calls these, and
//! proposes the result with [`crate::CommandV2::ShardCas`] at the version it
//! read. Every function returns the next configuration with `version + 1`
//! (or `None` from [`resize`] when nothing would change), and every output
//! passes the state machine's checks ([`crate::shard`]) for the same
//! collection — the tests drive random sequences of them through
//! [`crate::MetaState::apply`] to show it.
//!
//! Eligibility (who may become primary without losing an acknowledged
//! write) follows one rule throughout: a replica leaving the in-sync set
//! stays eligible only if no write can be acknowledged without it (the set
//! was at or below `min_insync`), and every out-of-sync replica loses
//! eligibility as soon as the set reaches `min_insync` again. Where a
//! function does not know `min_insync` ([`set_replica_state`],
//! [`promote`]), it takes the safe side: eligibility is dropped, never kept.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};

use edgevec_proto::OpId;

use crate::command::ReplicaState;
use crate::shard::{ReplicaRecord, ShardConfig};

/// A node that can hold replicas (role `data`), and its failure zone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataNode {
    pub id: u64,
    /// Rack or site; replicas of a shard are spread over distinct zones
    /// where possible. Compared as-is (an empty zone is a zone).
    pub zone: String,
}

/// Why shards cannot be placed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlacementError {
    #[error(
        "cannot place {wanted} replicas of a shard on {data_nodes} data node(s): each replica needs a node of \
         its own; add data nodes or ask for at most {data_nodes} replicas"
    )]
    NotEnoughNodes { wanted: u32, data_nodes: usize },
    #[error("a collection needs at least 1 replica per shard")]
    NoReplicas,
    #[error("data node {0} is listed twice")]
    DuplicateNode(u64),
}

/// Initial configurations of `shards` shards with `replicas` replicas each
/// on distinct data nodes: primaries rotated (shard 0 → A,B,C; shard 1 →
/// B,C,A; ... over nodes sorted by id), and where zones differ, each shard's
/// replicas spread over as many distinct zones as possible (following the
/// rotation, each next replica goes to the first node of a least-used
/// zone). Version 1, term 1, every replica InSync and eligible: a new shard
/// is empty, so all are in sync.
pub fn place(shards: u32, replicas: u32, nodes: &[DataNode]) -> Result<Vec<ShardConfig>, PlacementError> {
    if replicas == 0 {
        return Err(PlacementError::NoReplicas);
    }
    let mut sorted: Vec<&DataNode> = nodes.iter().collect();
    sorted.sort_by_key(|n| n.id);
    if let Some(w) = sorted.windows(2).find(|w| w[0].id == w[1].id) {
        return Err(PlacementError::DuplicateNode(w[0].id));
    }
    if replicas as usize > sorted.len() {
        return Err(PlacementError::NotEnoughNodes {
            wanted: replicas,
            data_nodes: sorted.len(),
        });
    }
    let n = sorted.len();
    Ok((0..shards as usize)
        .map(|shard| {
            let rotation: Vec<&DataNode> = (0..n).map(|i| sorted[(shard + i) % n]).collect();
            let chosen = pick_spread(&rotation, replicas as usize, BTreeMap::new());
            ShardConfig {
                version: 1,
                term: 1,
                primary: Some(chosen[0]),
                replicas: chosen
                    .into_iter()
                    .map(|node| ReplicaRecord {
                        node,
                        state: ReplicaState::InSync,
                        eligible: true,
                    })
                    .collect(),
            }
        })
        .collect())
}

/// Config after removing `node` from the in-sync set: state Offline;
/// eligible stays true only if the in-sync count before removal was <=
/// `min_insync` (no write can be acknowledged afterwards). A replica that
/// was not InSync only becomes Offline. Removing the primary also leaves
/// the shard without one, in a new term (its old term must not go on).
/// Version + 1.
pub fn remove_from_in_sync(cfg: &ShardConfig, node: u64, min_insync: u32) -> ShardConfig {
    leave(cfg, node, ReplicaState::Offline, min_insync)
}

/// Config after `node` (a member of `cfg.replicas`) caught up: InSync and
/// eligible; if the in-sync count reaches `min_insync`, every replica that
/// is not InSync loses `eligible` (writes can be acknowledged again without
/// them). Version + 1.
pub fn add_to_in_sync(cfg: &ShardConfig, node: u64, min_insync: u32) -> ShardConfig {
    let mut next = bumped(cfg);
    if let Some(r) = next.replica_mut(node) {
        r.state = ReplicaState::InSync;
        r.eligible = true;
    }
    next.drop_stale_eligibility(min_insync);
    next
}

/// Sets a replica's state (Initializing, CatchingUp, Offline) without
/// touching in-sync rules. Version + 1.
///
/// Meant for replicas outside the in-sync set, whose eligibility it keeps.
/// `min_insync` is unknown here, so the in-sync cases take the safe side:
/// an InSync replica moved to another state loses eligibility (use
/// [`remove_from_in_sync`] to keep it when the set is at `min_insync`), and
/// `state == InSync` is [`add_to_in_sync`] with every other out-of-sync
/// replica losing eligibility.
pub fn set_replica_state(cfg: &ShardConfig, node: u64, state: ReplicaState) -> ShardConfig {
    match state {
        ReplicaState::InSync => add_to_in_sync(cfg, node, 0),
        _ => leave(cfg, node, state, 0),
    }
}

/// `node` leaves the in-sync set (if in it) for `state`; see
/// [`remove_from_in_sync`]. `min_insync` 0 means "never stays eligible".
fn leave(cfg: &ShardConfig, node: u64, state: ReplicaState, min_insync: u32) -> ShardConfig {
    let mut next = bumped(cfg);
    let in_sync_before = cfg.in_sync_count();
    if let Some(r) = next.replica_mut(node) {
        if r.state == ReplicaState::InSync {
            r.eligible = in_sync_before <= min_insync as usize;
        }
        r.state = state;
    }
    if cfg.primary == Some(node) {
        next.primary = None;
        next.term += 1;
    }
    next
}

/// The new primary after the current one failed: among eligible replicas
/// that are `live`, the one whose reported last op id (`reports`) is
/// highest (ties → lowest node id); `None` if no eligible live replica
/// reported. Never returns the failed primary `failed` and never a
/// non-eligible replica.
pub fn choose_primary(
    cfg: &ShardConfig,
    failed: u64,
    live: &BTreeSet<u64>,
    reports: &BTreeMap<u64, OpId>,
) -> Option<u64> {
    cfg.replicas
        .iter()
        .filter(|r| r.eligible && r.node != failed && live.contains(&r.node))
        .filter_map(|r| reports.get(&r.node).map(|op| (*op, Reverse(r.node))))
        .max()
        .map(|(_, Reverse(node))| node)
}

/// Config with `primary` (a replica, normally [`choose_primary`]'s answer)
/// as primary in term + 1, version + 1. The new primary is InSync and
/// eligible. The old primary leaves the in-sync set as Offline and not
/// eligible: it may hold a suffix nobody acknowledged and must catch up
/// (reconcile) before it rejoins.
///
/// If the promotion grows the in-sync set (the shard had no in-sync
/// primary and the new one was out of sync), the set may now reach
/// `min_insync`, unknown here: the other out-of-sync replicas lose
/// eligibility (the safe side). Promoting the current primary is
/// [`next_term`].
pub fn promote(cfg: &ShardConfig, primary: u64) -> ShardConfig {
    if cfg.primary == Some(primary) {
        return next_term(cfg);
    }
    let mut next = bumped(cfg);
    next.term += 1;
    if let Some(old) = cfg.primary.and_then(|p| next.replica_mut(p)) {
        old.state = ReplicaState::Offline;
        old.eligible = false;
    }
    if let Some(r) = next.replica_mut(primary) {
        r.state = ReplicaState::InSync;
        r.eligible = true;
    }
    next.primary = Some(primary);
    if next.in_sync_count() > cfg.in_sync_count() {
        next.drop_stale_eligibility(0);
    }
    next
}

/// Same primary, next term (a restarted primary never resumes its term).
/// Version + 1, term + 1.
pub fn next_term(cfg: &ShardConfig) -> ShardConfig {
    let mut next = bumped(cfg);
    next.term += 1;
    next
}

/// Towards `replicas` replicas, in one step. Returns `None` when nothing
/// changes, else the new configuration with version + 1.
///
/// - `dead`: nodes whose replicas are replaced. Their replicas are removed
///   (never the primary's: a failed primary is replaced by [`promote`]
///   first) — but only while a live InSync replica remains to copy from;
///   with none alive nothing is removed or added, and the dead copies are
///   kept (REPLICATION.md, "Catch-up").
/// - Surplus replicas are removed, never the primary: first Offline, then
///   Initializing, then CatchingUp, then InSync backups — an InSync one only
///   while the in-sync count stays at or above `min_insync` (so a shard
///   that could acknowledge writes still can; the surplus then stays until
///   another replica catches up). Within a kind: non-eligible first, then
///   the most loaded node, then the highest id.
/// - Missing replicas are added as Initializing, not eligible, on `nodes`
///   (the data nodes that may take one; leave out nodes that are down) not
///   yet used by the shard and not `dead`: preferring zones the shard does
///   not use yet, then the fewest replicas already on the node (`load`,
///   absent = 0), then the lowest id. Only while a live InSync replica
///   exists to copy from; an unplaced shard (no replicas) is placed with
///   [`place`] instead.
pub fn resize(
    cfg: &ShardConfig,
    replicas: u32,
    min_insync: u32,
    nodes: &[DataNode],
    dead: &BTreeSet<u64>,
    load: &BTreeMap<u64, usize>,
) -> Option<ShardConfig> {
    let target = replicas as usize;
    let load_of = |node: u64| load.get(&node).copied().unwrap_or(0);
    let has_source = cfg
        .replicas
        .iter()
        .any(|r| r.state == ReplicaState::InSync && !dead.contains(&r.node));
    let mut next = bumped(cfg);
    if has_source {
        next.replicas
            .retain(|r| cfg.primary == Some(r.node) || !dead.contains(&r.node));
    }
    while next.replicas.len() > target {
        let in_sync = next.in_sync_count();
        let victim = next
            .replicas
            .iter()
            .enumerate()
            .filter(|(_, r)| next.primary != Some(r.node))
            .filter(|(_, r)| r.state != ReplicaState::InSync || in_sync > min_insync as usize)
            .min_by_key(|(_, r)| {
                (
                    removal_rank(r.state),
                    r.eligible,
                    Reverse(load_of(r.node)),
                    Reverse(r.node),
                )
            })
            .map(|(i, _)| i);
        match victim {
            Some(i) => drop(next.replicas.remove(i)),
            None => break,
        }
    }
    if has_source && next.replicas.len() < target {
        let zone_of = |id: u64| nodes.iter().find(|n| n.id == id).map(|n| n.zone.as_str());
        let mut used_zones = BTreeMap::new();
        for zone in next.replicas.iter().filter_map(|r| zone_of(r.node)) {
            *used_zones.entry(zone).or_insert(0) += 1;
        }
        let mut candidates: Vec<&DataNode> = nodes
            .iter()
            .filter(|n| next.replica(n.id).is_none() && !dead.contains(&n.id))
            .collect();
        candidates.sort_by_key(|n| (load_of(n.id), n.id));
        candidates.dedup_by_key(|n| n.id);
        let wanted = target - next.replicas.len();
        for node in pick_spread(&candidates, wanted, used_zones) {
            next.replicas.push(ReplicaRecord {
                node,
                state: ReplicaState::Initializing,
                eligible: false,
            });
        }
    }
    (next.replicas != cfg.replicas).then_some(next)
}

/// Order in which surplus replicas go: the least useful first.
fn removal_rank(state: ReplicaState) -> u8 {
    match state {
        ReplicaState::Offline => 0,
        ReplicaState::Initializing => 1,
        ReplicaState::CatchingUp => 2,
        ReplicaState::InSync => 3,
    }
}

/// Up to `count` of `candidates` (in preference order): each time the first
/// candidate whose zone is the least used so far (`used`: replicas per zone
/// already in the shard). Spreads over as many zones as there are before a
/// zone gets a second replica.
fn pick_spread<'a>(candidates: &[&'a DataNode], count: usize, mut used: BTreeMap<&'a str, usize>) -> Vec<u64> {
    let mut left: Vec<&DataNode> = candidates.to_vec();
    let mut chosen = Vec::with_capacity(count);
    while chosen.len() < count && !left.is_empty() {
        let usage = |n: &DataNode| used.get(n.zone.as_str()).copied().unwrap_or(0);
        let Some((i, _)) = left.iter().enumerate().min_by_key(|(i, n)| (usage(n), *i)) else {
            break;
        };
        let node = left.remove(i);
        *used.entry(node.zone.as_str()).or_insert(0) += 1;
        chosen.push(node.id);
    }
    chosen
}

/// `cfg` with version + 1, the start of every transition.
fn bumped(cfg: &ShardConfig) -> ShardConfig {
    let mut next = cfg.clone();
    next.version += 1;
    next
}

#[cfg(test)]
mod tests;
