//! The data plane of one node: the shard replicas it holds and the
//! primary-backup protocol between them (REPLICATION.md).
//!
//! [`DataPlane`] owns the runtime of every local replica ([`Local`]):
//! - it makes the engine's replicas follow the metadata: a replica is
//!   created when a shard configuration names this node, and its files are
//!   deleted only when the metadata proves it gone (a committed
//!   configuration of a live collection leaves this node out, or the
//!   collection id was dropped) — never because something is unknown;
//! - as **primary** of a shard it runs the write path, the epoch start of
//!   a new term and the catch-up of lagging replicas (`primary`);
//! - as **backup** it takes ops from the primary of the current term only,
//!   checking term and log matching, persisting before it acks (`backup`);
//! - it serves reads of its replicas to proxies;
//! - on the metadata leader, `manager` places shards, fails primaries over
//!   and restores replica counts.
//!
//! Decisions are pure functions: `log_match` (divergence point, what a
//! backup takes and applies), and the shard-configuration transitions of
//! the metadata crate (placement, new-primary choice, in-sync changes).
//! Engine calls block (fsync) and run on the blocking pool.

pub mod backup;
pub mod catch_up;
pub mod log_match;
pub mod manager;
pub mod primary;
pub mod reads;
pub mod transfer;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use edgevec_engine::{Engine, EngineError, ReplicaKey, ReplicaSpec, ShardReplica};
use edgevec_meta::{MetaState, ShardConfig};
use edgevec_proto::internal::{NodeOpV1, NodeReplyV1, NodeRequest, NodeResponse};
use edgevec_proto::replication::{ReplicaReport, ShardRead, ShardReadReply, ShardRef};
use edgevec_proto::{ErrorCode, WireError};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::meta::Meta;
use crate::net::peer::PeerPool;

/// Deadline of one replication exchange with a backup.
pub const REPLICATE_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest batch of log entries sent in one catch-up message.
pub const CATCH_UP_BATCH_BYTES: usize = 4 * 1024 * 1024;
/// Most entries in one catch-up message.
pub const CATCH_UP_BATCH_OPS: usize = 256;
/// How long a reopen waits for the old handles of a replica to go.
pub const REOPEN_WAIT: Duration = Duration::from_secs(3);
/// How long a read waits for its replica to apply ops it already knows
/// are committed before it answers "not caught up".
pub const APPLY_WAIT: Duration = Duration::from_secs(1);

/// How far a replica may be read: what it knows to be committed, and what
/// it has applied.
///
/// A replica opened after a restart has `target: None` until the primary
/// of its term reaches it (its op log may hold committed ops it has not
/// applied, and it cannot know which): it serves no reads until then.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApplyGate {
    /// Committed LSN this replica verified against its primary's log, or
    /// (on the primary) its epoch start.
    pub target: Option<u64>,
    pub applied: u64,
}

/// The runtime of one local shard replica.
pub struct Local {
    pub key: ShardRef,
    pub spec: ReplicaSpec,
    pub replica: Arc<ShardReplica>,
    /// The primary role of this replica, and its writer lock: a batch of
    /// writes holds it while it takes its LSNs and sends its messages,
    /// and again to commit (see `primary`).
    pub primary: tokio::sync::Mutex<Option<primary::Primary>>,
    /// Batches of writes a primary may have between taking their LSNs and
    /// their commit ([`primary::MAX_IN_FLIGHT`]).
    pub in_flight: Arc<tokio::sync::Semaphore>,
    /// Batches between taking their LSNs and their commit now, and how
    /// many batches started while another was still replicating (the
    /// `/metrics` pipeline gauges).
    pub batches_in_flight: std::sync::atomic::AtomicU64,
    pub pipelined: std::sync::atomic::AtomicU64,
    /// The last LSN of this replica's log, as the backup role last wrote
    /// it: a message that overtook the one before it waits on this.
    pub appended: tokio::sync::watch::Sender<u64>,
    /// The backup role: serialises ops received from primaries.
    pub backup: tokio::sync::Mutex<backup::BackupView>,
    /// Epoch starts begun and finished here, by term.
    pub epoch: Mutex<primary::EpochMark>,
    /// Catch-ups this primary runs: node → progress text.
    pub catch_ups: Mutex<BTreeMap<u64, String>>,
    /// Where each replica this primary feeds stands (node → last LSN it
    /// holds): the op log keeps everything above the lowest.
    pub floors: Mutex<BTreeMap<u64, u64>>,
    /// Replicas this primary removed from the in-sync set, while the
    /// configuration still names them outside it (node → last LSN it
    /// acknowledged, and the configuration version it was removed from):
    /// the op log holds what they miss, within its hold budget, for their
    /// catch-up.
    pub away: Mutex<BTreeMap<u64, (u64, u64)>>,
    /// Set when persisting failed (a failed fsync is never retried and
    /// then acknowledged), or when the replica's files failed to open and
    /// were set aside (the engine's damage: the replica is then empty). A
    /// damaged replica takes no ops, serves no reads, is never chosen
    /// primary and is reported until an import from its primary replaces
    /// it.
    pub damaged: Mutex<Option<String>>,
    /// An export being received from the primary.
    pub incoming: tokio::sync::Mutex<Option<transfer::Incoming>>,
    /// Writes waiting for the primary's next group commit.
    pub queued: Mutex<Vec<primary::Queued>>,
    /// Taken by a committed batch before it releases the primary lock and
    /// held while it applies: the next batch replicates meanwhile, and
    /// batches still apply (and count what they deleted) in commit order.
    pub applying: Arc<tokio::sync::Mutex<()>>,
    /// What a read of this replica waits for (see [`ApplyGate`]).
    pub gate: tokio::sync::watch::Sender<ApplyGate>,
    /// Confirmed commit points, for strong and bounded reads
    /// ([`reads::Rounds`]).
    pub rounds: reads::Rounds,
    /// A merge op this primary proposed is being written.
    pub merging: std::sync::atomic::AtomicBool,
    /// Whether this replica offers its sealed segments to the next export
    /// it receives; cleared when an import found a copy that differs, so
    /// the export after it carries everything.
    pub offer_digests: std::sync::atomic::AtomicBool,
}

impl Local {
    pub fn new(key: ShardRef, spec: ReplicaSpec, replica: Arc<ShardReplica>, damaged: Option<String>) -> Arc<Self> {
        let appended = tokio::sync::watch::Sender::new(replica.last_op().lsn);
        let gate = tokio::sync::watch::Sender::new(ApplyGate {
            target: None,
            applied: replica.applied_lsn(),
        });
        Arc::new(Local {
            key,
            spec,
            replica,
            primary: tokio::sync::Mutex::new(None),
            in_flight: Arc::new(tokio::sync::Semaphore::new(primary::MAX_IN_FLIGHT)),
            batches_in_flight: std::sync::atomic::AtomicU64::new(0),
            pipelined: std::sync::atomic::AtomicU64::new(0),
            appended,
            backup: tokio::sync::Mutex::new(backup::BackupView::default()),
            epoch: Mutex::new(primary::EpochMark::default()),
            catch_ups: Mutex::new(BTreeMap::new()),
            floors: Mutex::new(BTreeMap::new()),
            away: Mutex::new(BTreeMap::new()),
            damaged: Mutex::new(damaged),
            incoming: tokio::sync::Mutex::new(None),
            queued: Mutex::new(Vec::new()),
            applying: Arc::new(tokio::sync::Mutex::new(())),
            gate,
            rounds: reads::Rounds::default(),
            merging: std::sync::atomic::AtomicBool::new(false),
            offer_digests: std::sync::atomic::AtomicBool::new(true),
        })
    }

    /// Records that everything through `lsn` is committed and verified
    /// here (never lowers what was recorded).
    pub fn raise_apply_target(&self, lsn: u64) {
        self.gate.send_if_modified(|g| {
            let raised = Some(g.target.map_or(lsn, |t| t.max(lsn)));
            let changed = raised != g.target;
            g.target = raised;
            changed
        });
    }

    /// Publishes the replica's applied LSN to waiting reads.
    pub fn publish_applied(&self) {
        let applied = self.replica.applied_lsn();
        self.gate.send_if_modified(|g| {
            let changed = g.applied != applied;
            g.applied = applied;
            changed
        });
    }

    /// Waits (at most `timeout`) until this replica has applied everything
    /// it knew to be committed when the call began (or, after a restart,
    /// when its primary first reached it); an error says how far behind
    /// it is, so a reader can try another replica.
    pub async fn wait_applied(&self, node: u64, timeout: Duration) -> Result<(), WireError> {
        let mut wanted: Option<u64> = None;
        let mut ready = |g: &ApplyGate| {
            if wanted.is_none() {
                wanted = g.target;
            }
            wanted.is_some_and(|t| g.applied >= t)
        };
        let mut rx = self.gate.subscribe();
        if ready(&rx.borrow_and_update()) {
            return Ok(());
        }
        if let Ok(Ok(_)) = tokio::time::timeout(timeout, rx.wait_for(&mut ready)).await {
            return Ok(());
        }
        let g = *self.gate.borrow();
        Err(unavailable(match g.target {
            None => format!(
                "replica of {} on node {node} has not heard from its primary since it opened; not caught up",
                self.key
            ),
            Some(t) => format!(
                "replica of {} on node {node} has applied through LSN {} of {t} committed; not caught up",
                self.key, g.applied
            ),
        }))
    }

    /// Runs a write to this replica's files (append, apply, truncate,
    /// term) on the blocking pool. A storage failure marks the replica
    /// damaged: what failed to persist is never retried and acknowledged.
    pub async fn persist<T: Send + 'static>(
        &self,
        f: impl FnOnce(&ShardReplica) -> Result<T, EngineError> + Send + 'static,
    ) -> Result<T, WireError> {
        if let Some(why) = self.damaged.lock().expect("damaged lock").clone() {
            return Err(WireError::new(
                ErrorCode::Internal,
                format!(
                    "replica of {} is damaged ({why}); it takes no writes until rebuilt",
                    self.key
                ),
            ));
        }
        let replica = self.replica.clone();
        let result = tokio::task::spawn_blocking(move || f(&replica)).await;
        match result {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                if matches!(
                    e,
                    EngineError::Storage(_) | EngineError::Io { .. } | EngineError::Corrupt { .. }
                ) {
                    tracing::error!(shard = %self.key, error = %e, "persisting failed: replica marked damaged");
                    *self.damaged.lock().expect("damaged lock") = Some(e.to_string());
                }
                Err(e.to_wire())
            }
            Err(e) => Err(WireError::new(ErrorCode::Internal, format!("storage task failed: {e}"))),
        }
    }

    /// Records that `node` holds this log through `lsn` and keeps the op
    /// log from dropping what the furthest-behind replica still needs.
    pub fn hold_log_for(&self, node: u64, lsn: Option<u64>) {
        let mut floors = self.floors.lock().expect("floors lock");
        match lsn {
            Some(l) => floors.insert(node, l),
            None => floors.remove(&node),
        };
        self.replica
            .set_retain_floor(floors.values().copied().min().unwrap_or(u64::MAX));
    }

    /// Records that `node` is being removed from the in-sync set of
    /// configuration `version`, holding everything through `lsn`: the op
    /// log holds the ops above it, within its hold budget
    /// ([`ShardReplica::set_held_floor`]).
    pub fn hold_log_while_away(&self, node: u64, lsn: u64, version: u64) {
        let mut away = self.away.lock().expect("away lock");
        away.insert(node, (lsn, version));
        Self::set_held(&self.replica, &away);
    }

    /// Stops holding the op log for replicas that a configuration newer
    /// than the one they were removed from has in sync again, or no
    /// longer names (for every replica with `all`). A configuration from
    /// before the removal still shows them in sync: it changes nothing.
    pub fn forget_returned(&self, cfg: &edgevec_meta::ShardConfig, all: bool) {
        let mut away = self.away.lock().expect("away lock");
        let before = away.len();
        away.retain(|node, (_, removed_from)| !all && still_away(*node, *removed_from, cfg));
        if away.len() != before {
            Self::set_held(&self.replica, &away);
            // Give back what the hold kept now, not at the next write.
            let replica = self.replica.clone();
            let key = self.key;
            tokio::task::spawn_blocking(move || {
                if let Err(e) = replica.trim_log() {
                    tracing::warn!(shard = %key, error = %e, "trimming the op log after a hold failed");
                }
            });
        }
    }

    fn set_held(replica: &ShardReplica, away: &BTreeMap<u64, (u64, u64)>) {
        replica.set_held_floor(away.values().map(|(lsn, _)| *lsn).min().unwrap_or(u64::MAX));
    }

    /// This replica's report of itself (log position, counts, and on a
    /// primary its catch-ups).
    pub fn report(&self, node: u64) -> ReplicaReport {
        let status = self.replica.log_status();
        let (info, segments) = self.replica.info();
        let ready = self.epoch.lock().expect("epoch lock").ready;
        ReplicaReport {
            shard: self.key,
            node,
            serving: ready != 0 && ready == status.term,
            term: status.term,
            last: status.last,
            applied_lsn: status.applied,
            points: info.points,
            history: status.history,
            damaged: self.damaged.lock().expect("damaged lock").clone(),
            catch_ups: self
                .catch_ups
                .lock()
                .expect("catch-up lock")
                .iter()
                .map(|(n, p)| (*n, p.clone()))
                .collect(),
            segments,
        }
    }
}

/// The node's shard replicas and their protocol roles.
pub struct DataPlane {
    pub me: u64,
    pub engine: Arc<Engine>,
    pub meta: Meta,
    pub peers: Arc<PeerPool>,
    /// Where shard exports are written and received (temporary files).
    pub transfers: std::path::PathBuf,
    locals: Mutex<BTreeMap<ShardRef, Arc<Local>>>,
    /// Replicas the metadata names here that could not be created or
    /// opened yet (retried at every sync), with the error.
    unopened: Mutex<BTreeMap<ShardRef, String>>,
    this: std::sync::Weak<DataPlane>,
    /// One metadata sync at a time.
    syncing: tokio::sync::Mutex<()>,
    pub shutdown: CancellationToken,
    pub tasks: TaskTracker,
    /// The policy plugins this node runs.
    pub policies: Arc<crate::policy::registry::Policies>,
    /// How late reads from each proxy arrive (expired reads are dropped).
    pub arrivals: reads::Arrivals,
}

/// Whether `node`, removed from the in-sync set of configuration version
/// `removed_from`, is still away under `cfg`: a newer configuration has it
/// neither in sync again nor dropped.
fn still_away(node: u64, removed_from: u64, cfg: &edgevec_meta::ShardConfig) -> bool {
    let back = cfg.in_sync().contains(&node);
    let gone = !cfg.replicas.iter().any(|r| r.node == node);
    cfg.version <= removed_from || !(back || gone)
}

/// Runs blocking engine work on the blocking pool.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, EngineError> + Send + 'static,
) -> Result<T, WireError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(|e| e.to_wire()),
        Err(e) => Err(WireError::new(ErrorCode::Internal, format!("storage task failed: {e}"))),
    }
}

pub fn key_of(shard: ShardRef) -> ReplicaKey {
    ReplicaKey {
        collection: shard.collection,
        shard: shard.shard,
    }
}

pub fn unavailable(msg: impl Into<String>) -> WireError {
    WireError::new(ErrorCode::Unavailable, msg)
}

/// What a [`DataPlane`] is made of.
pub struct PlaneParts {
    pub me: u64,
    pub engine: Arc<Engine>,
    pub meta: Meta,
    pub peers: Arc<PeerPool>,
    pub transfers: std::path::PathBuf,
    pub shutdown: CancellationToken,
    pub tasks: TaskTracker,
    pub policies: Arc<crate::policy::registry::Policies>,
}

impl DataPlane {
    pub fn new(parts: PlaneParts) -> Arc<Self> {
        let PlaneParts {
            me,
            engine,
            meta,
            peers,
            transfers,
            shutdown,
            tasks,
            policies,
        } = parts;
        Arc::new_cyclic(|this| DataPlane {
            me,
            engine,
            meta,
            peers,
            transfers,
            locals: Mutex::new(BTreeMap::new()),
            unopened: Mutex::new(BTreeMap::new()),
            this: this.clone(),
            syncing: tokio::sync::Mutex::new(()),
            shutdown,
            tasks,
            policies,
            arrivals: reads::Arrivals::default(),
        })
    }

    /// Every local replica's runtime, by shard.
    pub fn locals(&self) -> Vec<Arc<Local>> {
        self.locals.lock().expect("locals lock").values().cloned().collect()
    }

    /// The local replica of `shard`, if this node holds one.
    pub fn local(&self, shard: ShardRef) -> Option<Arc<Local>> {
        self.locals.lock().expect("locals lock").get(&shard).cloned()
    }

    /// The QUIC address of node `id` from the metadata.
    pub fn addr_of(&self, state: &MetaState, id: u64) -> Option<SocketAddr> {
        state.node(id)?.addr.parse().ok()
    }

    /// Sends one node request to node `id`.
    /// Sends `op` to node `id`: the outer error is a transport failure or
    /// timeout (nothing came back), the inner one the node's refusal.
    pub async fn call_peer(
        &self,
        id: u64,
        op: NodeOpV1,
        timeout: Duration,
    ) -> Result<Result<NodeReplyV1, WireError>, WireError> {
        let state = self.meta.state();
        let addr = self
            .addr_of(&state, id)
            .ok_or_else(|| unavailable(format!("node {id} has no known address")))?;
        match self.peers.call(addr, &NodeRequest::V1(op), timeout).await {
            Ok(NodeResponse::V1(r)) => Ok(r),
            Err(edgevec_client::rpc::CallError::Timeout(d)) => Err(WireError::new(
                ErrorCode::Timeout,
                format!("node {id} did not answer within {d:?}"),
            )),
            Err(e) => Err(unavailable(format!("node {id} at {addr}: {e}"))),
        }
    }

    /// [`DataPlane::call_peer`] with both kinds of failure as one.
    pub async fn call(&self, id: u64, op: NodeOpV1, timeout: Duration) -> Result<NodeReplyV1, WireError> {
        self.call_peer(id, op, timeout).await?
    }

    /// Makes the local replicas follow the metadata, then starts what the
    /// roles in it ask for (epoch starts, catch-ups).
    pub async fn sync(self: &Arc<Self>) {
        let _one = self.syncing.lock().await;
        if self.meta.metrics().last_applied.is_none() {
            return;
        }
        let state = self.meta.state();
        let mut wanted: BTreeMap<ShardRef, (ReplicaSpec, ShardConfig)> = BTreeMap::new();
        for c in state.collections() {
            for (shard, cfg) in &c.shards {
                if cfg.replica(self.me).is_none() {
                    continue;
                }
                let key = ShardRef {
                    collection: c.id,
                    shard: *shard,
                };
                let spec = ReplicaSpec {
                    key: key_of(key),
                    name: c.spec.name.clone(),
                    dim: c.spec.dim,
                    metric: c.spec.metric,
                    seal_rows: c.spec.seal_rows,
                    index: c.index,
                    fields: c.fields.clone(),
                };
                wanted.insert(key, (spec, cfg.clone()));
            }
        }
        // Replicas whose removal the metadata proves: the collection id
        // was dropped, or a committed configuration of the live
        // collection leaves this node out.
        let engine = self.engine.clone();
        let have: Vec<ReplicaSpec> = match blocking(move || Ok(engine.replicas())).await {
            Ok(list) => list.into_iter().map(|(spec, _)| spec).collect(),
            Err(e) => {
                warn!(error = %e.message, "cannot list local replicas");
                return;
            }
        };
        for spec in have {
            let key = ShardRef {
                collection: spec.key.collection,
                shard: spec.key.shard,
            };
            if wanted.contains_key(&key) {
                continue;
            }
            let proven_gone = state.collection_dropped(key.collection)
                || state
                    .shard_config(key.collection, key.shard)
                    .is_some_and(|cfg| cfg.replica(self.me).is_none());
            if !proven_gone {
                continue;
            }
            info!(shard = %key, name = %spec.name, "dropping local replica: the metadata no longer names this node");
            if let Some(local) = self.locals.lock().expect("locals lock").remove(&key) {
                local.replica.retire();
            }
            let engine = self.engine.clone();
            if let Err(e) = blocking(move || engine.drop_replica(spec.key)).await {
                warn!(shard = %key, error = %e.message, "could not drop replica; retried at the next sync");
            }
        }
        self.unopened
            .lock()
            .expect("unopened lock")
            .retain(|key, _| wanted.contains_key(key));
        for (key, (spec, cfg)) in wanted {
            if let Some(l) = self.local(key) {
                if self.storage_failed(&l) {
                    self.reopen(l).await;
                }
            }
            let local = match self.local(key) {
                Some(l) => l,
                None => {
                    let engine = self.engine.clone();
                    let s = spec.clone();
                    match blocking(move || engine.create_replica(s)).await {
                        Ok(replica) => {
                            self.unopened.lock().expect("unopened lock").remove(&key);
                            let damage = self.engine.damage(spec.key).map(|d| d.to_string());
                            let l = Local::new(key, spec, replica, damage);
                            self.locals.lock().expect("locals lock").insert(key, l.clone());
                            l
                        }
                        Err(e) => {
                            let first = self
                                .unopened
                                .lock()
                                .expect("unopened lock")
                                .insert(key, e.message.clone())
                                .is_none();
                            if first {
                                warn!(shard = %key, error = %e.message, "cannot open replica; retried at every sync");
                            }
                            continue;
                        }
                    }
                }
            };
            if cfg.primary != Some(self.me) {
                // Only a primary holds its log for replicas that are away.
                local.forget_returned(&cfg, true);
            }
            if local.damaged.lock().expect("damaged lock").is_some() {
                self.clone().leave_if_damaged(local, cfg);
            } else if cfg.primary == Some(self.me) {
                self.clone().on_primary_config(local, cfg);
            }
        }
    }

    /// Whether `local` was marked damaged by a failed write (a full disk),
    /// not by files that failed to open, and its directory takes writes
    /// again: then a reopen can bring it back.
    fn storage_failed(&self, local: &Local) -> bool {
        local.damaged.lock().expect("damaged lock").is_some()
            && self.engine.damage(local.spec.key).is_none()
            && self.engine.probe_replica(local.spec.key).is_ok()
    }

    /// Reopens the replica of `local` from its files (redb refuses every
    /// write after an I/O error until its database is reopened). The
    /// runtime leaves the map first so that its handle goes away; requests
    /// meanwhile find no replica here and go elsewhere or wait for this
    /// sync. The reopened replica is undamaged, serves reads only once its
    /// primary reaches it, and rejoins like a restarted one.
    async fn reopen(&self, local: Arc<Local>) {
        let key = local.key;
        let spec = local.spec.clone();
        let why = local.damaged.lock().expect("damaged lock").clone();
        self.locals.lock().expect("locals lock").remove(&key);
        drop(local);
        let engine = self.engine.clone();
        let rkey = spec.key;
        let reopened = blocking(move || engine.reopen_replica(rkey, REOPEN_WAIT)).await;
        let (replica, damage) = match reopened {
            Ok(replica) => {
                let damage = self.engine.damage(rkey).map(|d| d.to_string());
                info!(shard = %key, damaged = ?damage, "replica reopened after its storage failed");
                (replica, damage)
            }
            Err(e) => {
                debug!(shard = %key, error = %e.message, "replica not reopened yet");
                match self.engine.replica(rkey) {
                    Some(replica) => (replica, why),
                    None => return,
                }
            }
        };
        let fresh = Local::new(key, spec, replica, damage);
        self.locals.lock().expect("locals lock").insert(key, fresh);
    }

    /// What keeps this node's replicas from serving: the damaged ones, with
    /// the reason (`/readyz`).
    pub fn problems(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .locals()
            .iter()
            .filter_map(|l| {
                let why = l.damaged.lock().expect("damaged lock").clone()?;
                Some(format!("replica of {} ({}) is damaged: {why}", l.key, l.spec.name))
            })
            .collect();
        let unopened = self.unopened.lock().expect("unopened lock");
        out.extend(
            unopened
                .iter()
                .map(|(key, why)| format!("replica of {key} cannot be created or opened yet: {why}")),
        );
        out
    }

    /// The local replica of `key`, opening it first when the metadata names
    /// this node but the sync that opens it has not run yet.
    pub async fn local_or_sync(&self, key: ShardRef) -> Result<Arc<Local>, WireError> {
        if let Some(l) = self.local(key) {
            return Ok(l);
        }
        Box::pin(self.sync_now()).await;
        self.local(key)
            .ok_or_else(|| unavailable(format!("node {} has not opened its replica of {key} yet", self.me)))
    }

    /// Puts a new runtime for `key` (after an import replaced the replica).
    pub fn replace_local(&self, local: Arc<Local>) {
        if let Some(old) = self.locals.lock().expect("locals lock").insert(local.key, local) {
            old.replica.retire();
        }
    }

    /// A sync from a request handler (one that found a replica missing).
    pub async fn sync_now(&self) {
        if let Some(this) = self.this.upgrade() {
            this.sync().await;
        }
    }

    /// Syncs on every metadata change (and every second, so a failed step
    /// is retried) until shutdown.
    pub async fn run(self: Arc<Self>) {
        let mut rx = self.meta.subscribe();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            self.sync().await;
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                changed = rx.changed() => if changed.is_err() { return },
                _ = tick.tick() => {}
            }
        }
    }

    /// A read of node `id`'s replica: served here when `id` is this node.
    pub async fn read_on(&self, id: u64, req: ShardRead, timeout: Duration) -> Result<ShardReadReply, WireError> {
        if id == self.me {
            return self.read(req).await;
        }
        match self.call(id, NodeOpV1::ShardRead(req), timeout).await? {
            NodeReplyV1::ShardRead(reply) => Ok(reply),
            other => Err(WireError::new(
                ErrorCode::Internal,
                format!("node {id} answered a read with {other:?}"),
            )),
        }
    }

    /// A read of one of this node's replicas.
    pub async fn read(&self, req: ShardRead) -> Result<ShardReadReply, WireError> {
        let shard = req.shard();
        let local = self
            .local(shard)
            .ok_or_else(|| unavailable(format!("node {} holds no replica of {shard}", self.me)))?;
        if !matches!(req, ShardRead::Status { .. } | ShardRead::StatusV2 { .. }) {
            if let Some(why) = local.damaged.lock().expect("damaged lock").clone() {
                return Err(unavailable(format!(
                    "replica of {shard} on node {} is damaged: {why}",
                    self.me
                )));
            }
            local.wait_applied(self.me, APPLY_WAIT).await?;
        }
        self.serve(&local, req).await
    }
}

#[cfg(test)]
mod away_tests {
    use super::still_away;
    use edgevec_meta::{ReplicaRecord, ReplicaState, ShardConfig};

    fn cfg(version: u64, replicas: &[(u64, ReplicaState)]) -> ShardConfig {
        ShardConfig {
            version,
            term: 1,
            primary: Some(1),
            replicas: replicas
                .iter()
                .map(|&(node, state)| ReplicaRecord {
                    node,
                    state,
                    eligible: state == ReplicaState::InSync,
                })
                .collect(),
        }
    }

    #[test]
    fn a_removed_replica_stays_away_until_a_newer_configuration_has_it_back_or_drops_it() {
        use ReplicaState::{InSync, Offline};
        // Removed from version 4: that configuration still shows it in
        // sync (a sync that read it before the removal committed).
        assert!(still_away(3, 4, &cfg(4, &[(1, InSync), (2, InSync), (3, InSync)])));
        // Version 5, the removal: away.
        assert!(still_away(3, 4, &cfg(5, &[(1, InSync), (2, InSync), (3, Offline)])));
        // In sync again later: back.
        assert!(!still_away(3, 4, &cfg(7, &[(1, InSync), (2, InSync), (3, InSync)])));
        // Dropped from the shard (re-replicated elsewhere): gone.
        assert!(!still_away(3, 4, &cfg(8, &[(1, InSync), (2, InSync), (4, InSync)])));
    }
}
