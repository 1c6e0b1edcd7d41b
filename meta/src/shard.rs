//! The configuration of one shard (PacificA, see REPLICATION.md): its
//! replicas, which of them are in sync and eligible, its primary, and the
//! rules every change of configuration must pass.
//!
//! The metadata Raft is the configuration manager of every shard. A
//! configuration changes by compare-and-set on `version`
//! ([`crate::CommandV2::ShardCas`]); `term` grows only when the primary
//! changes (or a restarted primary asks for a new term). The decisions that
//! produce configurations live in [`crate::placement`]; this module holds
//! the data and [`check_change`], which the state machine runs on every
//! proposed configuration so that no proposer (a bug, a stale leader) can
//! commit one that loses acknowledged writes. The rules, for a change from
//! `old` (the default, version 0, for a shard never configured) to `new`:
//!
//! 1. `new.version == old.version + 1`; `new.term >= old.term`, and
//!    `new.term > old.term` when the primary changes;
//! 2. replica nodes are distinct; a node new to the configuration is a
//!    registered node (one already named may have been removed since, and
//!    must stay removable);
//! 3. the primary, if any, is an `InSync` replica; every `InSync` replica
//!    is eligible;
//! 4. eligibility is granted only by joining the in-sync set: an eligible
//!    replica outside it was eligible in `old`; and it stays eligible only
//!    while the in-sync set is below `min_insync` (once writes can be
//!    acknowledged without it, it may miss some);
//! 5. a node new to the configuration starts outside the in-sync set, except
//!    in the shard's first configuration (a new shard is empty);
//! 6. a new primary was eligible in `old` (REPLICATION.md invariant 6: a
//!    replica outside the eligible set is never promoted automatically);
//! 7. at most `replicas + 1` replicas (one surplus while a replica moves:
//!    the new one is added before the old one leaves), or no more than
//!    `old` had (a shard above the bound after `SetReplication` lowered the
//!    count can still change while it shrinks).
//!
//! These types are persisted (log entries, state rows, snapshots):
//! postcard's rule from `command.rs` applies — never reorder or remove a
//! field or variant; a new shape is a new command/row version.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::command::ReplicaState;

/// How many replicas each shard of a collection has, and how many must
/// persist a write before it is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replication {
    pub replicas: u32,
    pub min_insync: u32,
}

impl Replication {
    /// `replicas` with the default `min_insync`: 2 when replicas >= 3, else
    /// 1 (two copies of every acknowledged write as soon as a third replica
    /// can take over from a failed one).
    pub const fn with_default_min(replicas: u32) -> Self {
        let min_insync = if replicas >= 3 { 2 } else { 1 };
        Replication { replicas, min_insync }
    }

    /// The bounds the state machine enforces: at least one replica, and
    /// `1 <= min_insync <= replicas`.
    pub(crate) fn check(&self) -> Result<(), String> {
        if self.replicas == 0 {
            return Err("replicas must be at least 1".into());
        }
        if self.min_insync == 0 || self.min_insync > self.replicas {
            return Err(format!(
                "min_insync must be between 1 and replicas ({}), not {}",
                self.replicas, self.min_insync
            ));
        }
        Ok(())
    }
}

/// One shard's configuration (PacificA). `version` is bumped by every
/// change (the CAS key); `term` only when the primary changes (or a
/// restarted primary asks for a new term naming itself).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardConfig {
    pub version: u64,
    pub term: u64,
    /// Node id of the primary; `None` while the shard has none.
    pub primary: Option<u64>,
    /// Every replica, the primary included, in a stable order.
    pub replicas: Vec<ReplicaRecord>,
}

/// One replica of a shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaRecord {
    pub node: u64,
    pub state: ReplicaState,
    /// Holds every acknowledged op: true for InSync; stays true for a
    /// replica removed from the in-sync set only while writes could no
    /// longer be acknowledged (REPLICATION.md, "Eligible").
    pub eligible: bool,
}

impl ShardConfig {
    /// Nodes whose replica is `InSync`, in replica order.
    pub fn in_sync(&self) -> Vec<u64> {
        self.replicas
            .iter()
            .filter(|r| r.state == ReplicaState::InSync)
            .map(|r| r.node)
            .collect()
    }

    /// The replica on `node`, if the shard has one there.
    pub fn replica(&self, node: u64) -> Option<&ReplicaRecord> {
        self.replicas.iter().find(|r| r.node == node)
    }

    /// Nodes whose replica is eligible to become primary, in replica order.
    pub fn eligible(&self) -> Vec<u64> {
        self.replicas.iter().filter(|r| r.eligible).map(|r| r.node).collect()
    }

    pub(crate) fn replica_mut(&mut self, node: u64) -> Option<&mut ReplicaRecord> {
        self.replicas.iter_mut().find(|r| r.node == node)
    }

    pub(crate) fn in_sync_count(&self) -> usize {
        self.replicas.iter().filter(|r| r.state == ReplicaState::InSync).count()
    }

    /// Once the in-sync set reaches `min_insync`, writes can be acknowledged
    /// without the replicas outside it, so they stop being eligible (rule 4).
    /// Returns whether anything changed. Does not touch `version`.
    pub(crate) fn drop_stale_eligibility(&mut self, min_insync: u32) -> bool {
        if self.in_sync_count() < min_insync as usize {
            return false;
        }
        let mut changed = false;
        for r in &mut self.replicas {
            if r.state != ReplicaState::InSync && r.eligible {
                r.eligible = false;
                changed = true;
            }
        }
        changed
    }
}

/// Whether `new` may follow `old` (rules 1–7 of the module docs). The
/// version check against the proposer's expectation (a conflict, not an
/// invalid command) is the caller's. `registered` says whether a node id is
/// a registered node. The error says what is wrong, without naming the
/// shard (the caller does).
pub(crate) fn check_change(
    old: &ShardConfig,
    new: &ShardConfig,
    replication: Replication,
    registered: impl Fn(u64) -> bool,
) -> Result<(), String> {
    if new.version != old.version + 1 {
        return Err(format!(
            "version {} does not follow version {} (every change adds 1)",
            new.version, old.version
        ));
    }
    if new.term < old.term {
        return Err(format!("term {} is older than the current term {}", new.term, old.term));
    }
    if new.primary != old.primary && new.term == old.term {
        return Err(format!(
            "the primary changes from {} to {} but the term stays {}; a new primary needs a new term",
            show(old.primary),
            show(new.primary),
            new.term
        ));
    }
    check_replicas(old, new, replication, registered)?;
    check_eligibility(old, new, replication)
}

/// Rules 2, 3, 5 and 7: who may be a replica, and the primary's place.
fn check_replicas(
    old: &ShardConfig,
    new: &ShardConfig,
    replication: Replication,
    registered: impl Fn(u64) -> bool,
) -> Result<(), String> {
    let mut seen = BTreeSet::new();
    for r in &new.replicas {
        if !seen.insert(r.node) {
            return Err(format!("node {} holds two replicas", r.node));
        }
        let is_new = old.replica(r.node).is_none();
        if is_new && !registered(r.node) {
            return Err(format!("node {} is not registered", r.node));
        }
        if r.state == ReplicaState::InSync && !r.eligible {
            return Err(format!("in-sync replica on node {} must be eligible", r.node));
        }
        if is_new && old.version > 0 && r.state == ReplicaState::InSync {
            return Err(format!(
                "node {} is new to the shard and cannot start in sync; add it as Initializing and let it catch up",
                r.node
            ));
        }
    }
    if let Some(p) = new.primary {
        match new.replica(p) {
            None => return Err(format!("primary {p} is not one of the replicas")),
            Some(r) if r.state != ReplicaState::InSync => {
                return Err(format!("primary {p} is {:?}, not InSync", r.state));
            }
            Some(_) => {}
        }
    }
    let bound = replication.replicas as usize + 1;
    if new.replicas.len() > bound && new.replicas.len() > old.replicas.len() {
        return Err(format!(
            "{} replicas for a collection of {} (one more is allowed while a replica moves)",
            new.replicas.len(),
            replication.replicas
        ));
    }
    Ok(())
}

/// Rules 4 and 6: eligibility is inherited or earned, never granted.
fn check_eligibility(old: &ShardConfig, new: &ShardConfig, replication: Replication) -> Result<(), String> {
    let in_sync = new.in_sync_count();
    for r in new
        .replicas
        .iter()
        .filter(|r| r.eligible && r.state != ReplicaState::InSync)
    {
        if !old.replica(r.node).is_some_and(|o| o.eligible) {
            return Err(format!(
                "replica on node {} is {:?} and was not eligible; only joining the in-sync set makes a replica eligible",
                r.node, r.state
            ));
        }
        if in_sync >= replication.min_insync as usize {
            return Err(format!(
                "replica on node {} is {:?} but stays eligible while the in-sync set ({in_sync}) reaches min_insync ({}); \
                 it may miss acknowledged writes",
                r.node, r.state, replication.min_insync
            ));
        }
    }
    if let Some(p) = new.primary {
        let was_eligible = old.replica(p).is_some_and(|o| o.eligible);
        if new.primary != old.primary && old.version > 0 && !was_eligible {
            return Err(format!(
                "node {p} was not eligible and may lack acknowledged writes; it cannot become primary"
            ));
        }
    }
    Ok(())
}

fn show(node: Option<u64>) -> String {
    node.map_or_else(|| "none".to_owned(), |n| n.to_string())
}
