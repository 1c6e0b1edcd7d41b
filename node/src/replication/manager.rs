//! The configuration manager of every shard, run by the metadata leader
//! (PacificA): places shards that have no configuration, replaces a
//! primary whose node is no longer up, and moves each shard towards its
//! collection's replica count (`load`, and re-creating the replicas of a
//! node dead past `dead_after`).
//!
//! Every change is a compare-and-set on the shard's version computed by
//! the pure functions of the metadata crate (`place`, `choose_primary`,
//! `promote`, `resize`); a change that loses the race is simply decided
//! again at the next tick from the newer configuration. At most one
//! change per shard is in flight.
//!
//! Invariants:
//! - a new primary is chosen only among eligible replicas that are up and
//!   answered with their log position; the one with the highest op id
//!   wins, so it holds every acknowledged write;
//! - replicas are re-created only while the shard's primary is up (the
//!   copy comes from it); with no live in-sync replica nothing is moved
//!   and the dead node's copy is kept.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use edgevec_meta::{DataNode, MetaState, NodeState, ShardConfig};
use edgevec_proto::replication::{ShardRead, ShardReadReply, ShardRef};
use edgevec_proto::OpId;
use tracing::{info, warn};

use super::DataPlane;

/// How often the leader reviews every shard.
const TICK: Duration = Duration::from_millis(200);
/// How long the leader waits for a replica's log position at failover.
const REPORT_TIMEOUT: Duration = Duration::from_millis(700);

/// How often the leader repeats that a shard waits for a replica.
const WAIT_WARN_EVERY: Duration = Duration::from_secs(30);

/// Shards with a change in flight.
#[derive(Default)]
pub struct Manager {
    busy: Mutex<BTreeSet<ShardRef>>,
    /// When the leader last said that a shard has no replica to promote.
    warned: Mutex<BTreeMap<ShardRef, std::time::Instant>>,
}

impl Manager {
    /// Whether to say again that `key` waits (at most every
    /// [`WAIT_WARN_EVERY`]).
    fn warn_due(&self, key: ShardRef) -> bool {
        let mut warned = self.warned.lock().expect("manager lock");
        let now = std::time::Instant::now();
        match warned.get(&key) {
            Some(at) if now.duration_since(*at) < WAIT_WARN_EVERY => false,
            _ => {
                warned.insert(key, now);
                true
            }
        }
    }
}

/// The nodes a placement may use, and which are up or dead.
struct Nodes {
    data: Vec<DataNode>,
    up: BTreeSet<u64>,
    dead: BTreeSet<u64>,
    load: BTreeMap<u64, usize>,
}

fn nodes(state: &MetaState) -> Nodes {
    let data: Vec<DataNode> = state
        .nodes()
        .filter(|n| n.has_role("data") && n.state == NodeState::Up)
        .map(|n| DataNode {
            id: n.id,
            zone: n.zone.clone(),
        })
        .collect();
    let up = state
        .nodes()
        .filter(|n| n.state == NodeState::Up)
        .map(|n| n.id)
        .collect();
    let mut dead: BTreeSet<u64> = state
        .nodes()
        .filter(|n| n.state == NodeState::Dead)
        .map(|n| n.id)
        .collect();
    let mut load = BTreeMap::new();
    for c in state.collections() {
        for cfg in c.shards.values() {
            for r in &cfg.replicas {
                *load.entry(r.node).or_insert(0) += 1;
                // A replica on a node that left the cluster is as good as
                // on a dead one.
                if state.node(r.node).is_none() {
                    dead.insert(r.node);
                }
            }
        }
    }
    Nodes { data, up, dead, load }
}

impl DataPlane {
    /// Reviews every shard while this node leads the metadata Raft: every
    /// [`TICK`], and at once when the metadata changes (a node's verdict,
    /// a shard's configuration), so that a primary whose node was judged
    /// suspect is replaced without waiting for the tick.
    pub async fn run_manager(self: Arc<Self>) {
        let manager = Arc::new(Manager::default());
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut changes = self.meta.subscribe();
        let mut watching = true;
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tick.tick() => {}
                // With the metadata stopped, only the tick is left.
                changed = changes.changed(), if watching => watching = changed.is_ok(),
            }
            if self.meta.is_leader() {
                self.review(&manager);
            }
        }
    }

    fn review(self: &Arc<Self>, manager: &Arc<Manager>) {
        let state = self.meta.state();
        let nodes = nodes(&state);
        for c in state.collections() {
            for shard in 0..c.spec.shards {
                let key = ShardRef {
                    collection: c.id,
                    shard,
                };
                let change = match c.shards.get(&shard) {
                    None => Change::Place,
                    Some(cfg) if !cfg.primary.is_some_and(|p| nodes.up.contains(&p)) => Change::Failover(cfg.clone()),
                    Some(cfg) => match edgevec_meta::resize(
                        cfg,
                        c.replication.replicas,
                        c.replication.min_insync,
                        &nodes.data,
                        &nodes.dead,
                        &nodes.load,
                    ) {
                        Some(next) => Change::Resize(cfg.version, next),
                        None => continue,
                    },
                };
                if !manager.busy.lock().expect("manager lock").insert(key) {
                    continue;
                }
                let (this, manager) = (self.clone(), manager.clone());
                let (shards, replicas) = (c.spec.shards, c.replication.replicas);
                let data = nodes.data.clone();
                let up = nodes.up.clone();
                self.tasks.spawn(async move {
                    match change {
                        Change::Place => match edgevec_meta::place(shards, replicas, &data) {
                            Ok(all) => {
                                let cfg = all[shard as usize].clone();
                                this.propose(key, 0, cfg, "placed").await;
                            }
                            Err(e) => warn!(shard = %key, error = %e, "cannot place shard"),
                        },
                        Change::Failover(cfg) => this.failover(key, cfg, &up, &manager).await,
                        Change::Resize(version, next) => this.propose(key, version, next, "replica set changed").await,
                    }
                    manager.busy.lock().expect("manager lock").remove(&key);
                });
            }
        }
    }

    async fn propose(&self, key: ShardRef, expected: u64, cfg: ShardConfig, what: &str) {
        let summary = format!(
            "{:?}",
            cfg.replicas.iter().map(|r| (r.node, r.state)).collect::<Vec<_>>()
        );
        match self.cas(key, expected, cfg).await {
            Ok(true) => info!(shard = %key, replicas = %summary, "{what}"),
            Ok(false) => {}
            Err(e) => warn!(shard = %key, error = %e.message, "shard change not committed"),
        }
    }

    /// Installs the next term with the live eligible replica holding the
    /// highest op id as primary.
    async fn failover(&self, key: ShardRef, cfg: ShardConfig, up: &BTreeSet<u64>, manager: &Manager) {
        let failed = cfg.primary.unwrap_or(0);
        let asks = cfg
            .eligible()
            .into_iter()
            .filter(|n| *n != failed && up.contains(n))
            .map(|node| async move {
                match self
                    .read_on(node, ShardRead::Status { shard: key }, REPORT_TIMEOUT)
                    .await
                {
                    // A damaged replica's log says nothing of the data.
                    Ok(ShardReadReply::Status(report)) => Some((node, report.damaged.is_none().then_some(report.last))),
                    _ => None,
                }
            });
        let answers: Vec<(u64, Option<OpId>)> = futures::future::join_all(asks).await.into_iter().flatten().collect();
        let reports: BTreeMap<u64, OpId> = answers.iter().filter_map(|(n, last)| Some((*n, (*last)?))).collect();
        let Some(next) = edgevec_meta::choose_primary(&cfg, failed, up, &reports) else {
            if manager.warn_due(key) {
                let damaged: Vec<u64> = answers.iter().filter(|(_, l)| l.is_none()).map(|(n, _)| *n).collect();
                warn!(
                    shard = %key, failed, ?damaged,
                    "no eligible replica is up and undamaged: the shard waits for one to return"
                );
            }
            return;
        };
        let promoted = edgevec_meta::promote(&cfg, next);
        info!(shard = %key, from = failed, to = next, term = promoted.term, "failing over primary");
        self.propose(key, cfg.version, promoted, "new primary installed").await;
    }
}

enum Change {
    Place,
    Failover(ShardConfig),
    Resize(u64, ShardConfig),
}
