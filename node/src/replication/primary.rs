//! The primary of a shard: epoch start, the write path with group commit,
//! and bringing one backup up to this log (REPLICATION.md, "Write",
//! "Change of primary"); the catch-up of replicas outside the in-sync set
//! is `catch_up`.
//!
//! Invariants:
//! - writes are committed in batches (group commit), and up to
//!   [`MAX_IN_FLIGHT`] batches replicate at once: a batch holds the
//!   replica's primary lock while it takes its LSNs (after the last one
//!   given out, not after the end of the local log) and sends its
//!   messages, so messages leave in LSN order; a backup that gets one
//!   before the one it follows waits for that one, bounded;
//! - the local appends of batches run in LSN order, each after the one
//!   before it succeeded; a failed append marks the replica damaged, so
//!   this node never gives out an LSN again in its term (a later op id
//!   could otherwise name an op some backup holds under another);
//! - batches are decided (committed, or failed with "outcome unknown")
//!   in LSN order, under the primary lock: members of the ack set that
//!   failed a batch are removed by CAS first; a batch commits when every
//!   remaining member holds it, which by log matching means it holds every
//!   batch before it too. A committed batch takes its turn to apply before
//!   the next batch is decided: batches apply in commit order;
//! - a write is acknowledged only when every member of the ack set (the
//!   committed in-sync set, plus joiners whose in-sync CAS may still
//!   commit) has persisted it, and at least `min_insync` replicas hold it;
//!   a member that fails is first removed by a compare-and-set on the
//!   shard's configuration version;
//! - a primary acts only as primary of the newest configuration it has
//!   applied, in the term that configuration names; a node that finds it
//!   already used that term (it restarted) asks for the next one instead,
//!   so an op id never names two ops;
//! - a new primary takes writes only once every in-sync replica holds its
//!   epoch-start op; everything before it is then committed.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgevec_engine::compaction::MergePolicy;
use edgevec_engine::{EngineError, ShardOp};
use edgevec_meta::{CommandV2, MetaCommand, Replication, ShardConfig};
use edgevec_proto::internal::{NodeOpV1, NodeReplyV1};
use edgevec_proto::replication::{LogEntry, Replicate, ReplicateReply, ShardRef};
use edgevec_proto::{ErrorCode, OpId, WireError};
use tracing::{debug, info, warn};

use super::log_match::{divergence, LogShape};
use super::{unavailable, DataPlane, Local, CATCH_UP_BATCH_BYTES, CATCH_UP_BATCH_OPS, REPLICATE_TIMEOUT};

/// Which epochs of a replica were begun and completed on this node.
#[derive(Debug, Default, Clone, Copy)]
pub struct EpochMark {
    /// Term of the epoch start running or done (0: none; retried).
    pub begun: u64,
    /// The epoch-start op this process appended (reused by a retry).
    pub start: Option<OpId>,
    /// Term whose epoch start committed: writes are taken.
    pub ready: u64,
}

/// Most batches of writes a primary has between taking their LSNs and
/// their commit. With one, a batch would wait for the whole round of the
/// batch before it: the backups' receive, fsync and answer, with the
/// cores idle in between.
pub const MAX_IN_FLIGHT: usize = 4;

/// The end of one step in a chain of steps taken in LSN order (a batch's
/// local append; a batch's decision): the next step waits for it. A step
/// dropped before it finished counts as failed.
#[derive(Debug, Clone)]
pub struct Done(tokio::sync::watch::Receiver<Option<bool>>);

impl Done {
    fn pending() -> (tokio::sync::watch::Sender<Option<bool>>, Done) {
        let (tx, rx) = tokio::sync::watch::channel(None);
        (tx, Done(rx))
    }

    fn finished() -> Done {
        let (tx, done) = Done::pending();
        tx.send_replace(Some(true));
        done
    }

    /// Waits for the step; whether it succeeded.
    pub async fn wait(mut self) -> bool {
        match self.0.wait_for(Option::is_some).await {
            Ok(v) => v.unwrap_or(false),
            Err(_) => false,
        }
    }
}

/// A batch of writes that took its LSNs and is replicating.
struct InFlight {
    term: u64,
    /// Its entries, in LSN order.
    fresh: Vec<LogEntry>,
    started: Instant,
    /// The local append (after the batch before it).
    append: tokio::task::JoinHandle<Result<(), WireError>>,
    appended: Done,
    /// Each member of the ack set: the op before this batch if the
    /// message follows the last one sent to it, and the LSN it
    /// acknowledged last (if known).
    sends: Vec<(u64, Option<OpId>, Option<u64>)>,
    /// The decision of the batch before this one, and where to tell this
    /// batch's.
    before: Done,
    decide: tokio::sync::watch::Sender<Option<bool>>,
    /// This batch's place among the [`MAX_IN_FLIGHT`], and in the count
    /// of batches in flight.
    permit: tokio::sync::OwnedSemaphorePermit,
    counted: Counted,
}

/// One batch in [`Local::batches_in_flight`], until dropped.
struct Counted(Arc<Local>);

impl Counted {
    fn new(local: &Arc<Local>) -> Counted {
        if local.batches_in_flight.fetch_add(1, Ordering::AcqRel) > 0 {
            local.pipelined.fetch_add(1, Ordering::Relaxed);
        }
        Counted(local.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.batches_in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A batch every member of the ack set holds, waiting for its turn to
/// apply.
pub struct Committed {
    ids: Vec<OpId>,
    /// The configuration it was committed under.
    cfg: ShardConfig,
    /// This batch's turn on the apply lock.
    turn: tokio::sync::OwnedMutexGuard<()>,
}

/// A committed write: its op id, and for a delete the points it removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    pub op: OpId,
    pub deleted: u64,
}

/// A write waiting for the group commit, and where to answer it.
pub type Queued = (ShardOp, tokio::sync::oneshot::Sender<Result<Written, WireError>>);

/// Most encoded op bytes one group commit takes (at least one op).
const BATCH_BYTES: usize = 16 * 1024 * 1024;

/// Takes the writes that go into the next batch, oldest first.
fn take_batch(queue: &mut Vec<Queued>) -> Vec<Queued> {
    let mut bytes = 0usize;
    let mut n = 0;
    for (op, _) in queue.iter() {
        let size = op_size(op);
        if n > 0 && bytes + size > BATCH_BYTES {
            break;
        }
        bytes += size;
        n += 1;
    }
    queue.drain(..n).collect()
}

/// Answers the writes of a batch, in order.
fn answer(
    replies: Vec<tokio::sync::oneshot::Sender<Result<Written, WireError>>>,
    written: Result<Vec<Written>, WireError>,
) {
    match written {
        Ok(ids) => {
            for (reply, id) in replies.into_iter().zip(ids) {
                let _ = reply.send(Ok(id));
            }
        }
        Err(e) => {
            for reply in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}

/// Rough encoded size of an op, to bound a batch.
fn op_size(op: &ShardOp) -> usize {
    match op {
        ShardOp::Upsert(points) => points
            .iter()
            .map(|p| 16 + p.vector.len() * 4 + p.payload.as_ref().map_or(0, String::len))
            .sum(),
        ShardOp::Delete(ids) => ids.len() * 8,
        ShardOp::EpochStart => 1,
        ShardOp::Merge { sources } => 1 + sources.len() * 8,
    }
}

/// The primary role of one replica, for one term.
#[derive(Debug)]
pub struct Primary {
    pub term: u64,
    /// Every in-sync replica holds the epoch-start op: writes are taken.
    pub ready: bool,
    pub commit_lsn: u64,
    /// Next LSN to send to each backup.
    pub next: BTreeMap<u64, u64>,
    /// Replicas added to the ack set before their in-sync CAS committed:
    /// node → the version that CAS expected. Kept until a committed
    /// configuration newer than that says whether they are in.
    pub joiners: BTreeMap<u64, u64>,
    /// The last op id given out: the next batch follows it, whether or
    /// not its local append finished.
    pub assigned: OpId,
    /// The local append of the newest batch.
    pub appended: Done,
    /// The decision of the newest batch.
    pub decided: Done,
}

/// How often an idle primary tells its backups the commit point.
pub const HEARTBEAT: Duration = Duration::from_millis(500);

fn outcome_unknown(msg: impl Into<String>) -> WireError {
    WireError::new(ErrorCode::OutcomeUnknown, msg)
}

/// Why a backup could not be brought up to date.
pub(super) enum SendError {
    /// It did not answer, refused, or failed: remove it from the ack set.
    Failed(String),
    /// This node is no longer the primary of the term (fenced).
    Fenced(String),
    /// Its log cannot be continued from this op log (trimmed, or it would
    /// lose applied ops): it needs an export.
    NeedsExport(String),
}

impl SendError {
    pub(super) fn message(self) -> String {
        match self {
            SendError::Failed(m) | SendError::Fenced(m) | SendError::NeedsExport(m) => m,
        }
    }
}

impl Primary {
    /// Members of the ack set other than the primary.
    fn backups(&mut self, cfg: &ShardConfig, me: u64) -> Vec<u64> {
        self.joiners.retain(|_, v| cfg.version <= *v);
        let mut out: Vec<u64> = cfg.in_sync().into_iter().filter(|n| *n != me).collect();
        for j in self.joiners.keys() {
            if !out.contains(j) && *j != me {
                out.push(*j);
            }
        }
        out
    }
}

impl DataPlane {
    /// The configuration and replication settings of `key`.
    pub fn config_of(&self, key: ShardRef) -> Option<(ShardConfig, Replication)> {
        let state = self.meta.state();
        let c = state.collection_by_id(key.collection)?;
        Some((c.shards.get(&key.shard)?.clone(), c.replication))
    }

    /// Proposes `config` for `key` if the shard is still at `expected`.
    /// `Ok(false)`: the version moved (someone else changed the shard).
    pub async fn cas(&self, key: ShardRef, expected: u64, config: ShardConfig) -> Result<bool, WireError> {
        let cmd = MetaCommand::V2(CommandV2::ShardCas {
            collection: key.collection,
            shard: key.shard,
            expected_version: expected,
            config,
        });
        let resp = self.meta.write(cmd).await?;
        match resp.rejection() {
            None => Ok(true),
            Some((edgevec_meta::RejectCode::Conflict, _)) => Ok(false),
            Some((code, msg)) => Err(WireError::new(
                ErrorCode::Internal,
                format!("shard configuration change of {key} refused ({code}): {msg}"),
            )),
        }
    }

    /// Called on every sync while the metadata names this node primary.
    pub fn on_primary_config(self: Arc<Self>, local: Arc<Local>, cfg: ShardConfig) {
        local.forget_returned(&cfg, false);
        let mark = *local.epoch.lock().expect("epoch lock");
        if mark.begun < cfg.term {
            local.epoch.lock().expect("epoch lock").begun = cfg.term;
            let this = self.clone();
            self.tasks.spawn(async move { this.start_epoch(local, cfg).await });
            return;
        }
        if mark.start.is_some_and(|id| id.term == cfg.term) {
            self.start_catch_ups(&local, &cfg);
        }
    }

    /// Becomes primary of `cfg.term`: persists the term, appends the
    /// epoch-start op and reconciles every in-sync backup to this log. A
    /// retry in the same process reuses the epoch-start op it appended.
    async fn start_epoch(self: Arc<Self>, local: Arc<Local>, cfg: ShardConfig) {
        let key = local.key;
        let term = cfg.term;
        let mut guard = local.primary.lock().await;
        if guard.as_ref().is_some_and(|p| p.term != term) {
            *guard = None;
        }
        let reuse = local
            .epoch
            .lock()
            .expect("epoch lock")
            .start
            .filter(|id| id.term == term);
        let epoch = match reuse {
            Some(id) => id,
            None if local.replica.term() >= term => {
                // This node already acted in this term before a restart:
                // an op id of it may exist that nobody else has. Ask for
                // the next term instead of resuming this one.
                info!(shard = %key, term, "term already used here; asking for the next term");
                let next = edgevec_meta::next_term(&cfg);
                if let Err(e) = self.cas(key, cfg.version, next).await {
                    warn!(shard = %key, error = %e.message, "could not ask for a new term");
                }
                local.epoch.lock().expect("epoch lock").begun = 0;
                return;
            }
            None => {
                let appended = local
                    .persist(move |replica| {
                        replica.raise_term(term)?;
                        let last = replica.last_op();
                        let id = OpId::new(term, last.lsn + 1);
                        replica.append(last, [(id, ShardOp::EpochStart)])?;
                        Ok(id)
                    })
                    .await;
                match appended {
                    Ok(id) => {
                        local.epoch.lock().expect("epoch lock").start = Some(id);
                        id
                    }
                    Err(e) => {
                        warn!(shard = %key, term, error = %e.message, "cannot start the epoch");
                        local.epoch.lock().expect("epoch lock").begun = 0;
                        return;
                    }
                }
            }
        };
        info!(shard = %key, term, epoch_start = %epoch, "primary: reconciling backups");
        let p = guard.get_or_insert_with(|| Primary {
            term,
            ready: false,
            commit_lsn: 0,
            next: BTreeMap::new(),
            joiners: BTreeMap::new(),
            assigned: epoch,
            appended: Done::finished(),
            decided: Done::finished(),
        });
        let fresh = LogEntry {
            id: epoch,
            op: ShardOp::EpochStart.encode(term).into(),
        };
        let committed = match self.replicate_to_ack_set(&local, p, std::slice::from_ref(&fresh)).await {
            Ok(()) => local.persist(move |replica| replica.apply_through(epoch.lsn)).await,
            Err(e) => Err(e),
        };
        local.publish_applied();
        match committed {
            Ok(_) => {
                p.commit_lsn = epoch.lsn;
                p.ready = true;
                info!(shard = %key, term, "primary ready");
                local.epoch.lock().expect("epoch lock").ready = term;
                local.raise_apply_target(epoch.lsn);
                drop(guard);
                self.notify_commit(&local, epoch);
                self.tasks.spawn(self.clone().heartbeat(local.clone(), term));
            }
            Err(e) => {
                // Retried at a later sync (after a removal, a catch-up
                // that brings the in-sync set back to min_insync, ...).
                warn!(shard = %key, term, error = %e.message, "epoch start not committed yet; retrying");
                local.epoch.lock().expect("epoch lock").begun = 0;
                drop(guard);
            }
        }
        if let Some((cfg, _)) = self.config_of(key) {
            self.start_catch_ups(&local, &cfg);
        }
    }

    /// Primary write: assigns the next op id, persists it, brings every
    /// member of the ack set up to it, commits and applies it.
    pub async fn primary_write(&self, local: &Arc<Local>, op: ShardOp) -> Result<Written, WireError> {
        // Group commit: writes queue up; whoever gets a place among the
        // batches in flight and the primary lock takes everything queued
        // as one batch (one fsync per replica, one message per backup),
        // and answers each write.
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        local.queued.lock().expect("queue lock").push((op, tx));
        let dropped = |_| {
            Err(WireError::new(
                ErrorCode::Internal,
                "write dropped before it was committed",
            ))
        };
        let permit = tokio::select! {
            biased;
            done = &mut rx => return done.unwrap_or_else(dropped),
            permit = local.in_flight.clone().acquire_owned() => {
                permit.expect("the in-flight semaphore is never closed")
            }
        };
        let mut guard = tokio::select! {
            biased;
            done = &mut rx => return done.unwrap_or_else(dropped),
            guard = local.primary.lock() => guard,
        };
        let batch = take_batch(&mut local.queued.lock().expect("queue lock"));
        if batch.is_empty() {
            // An earlier batch took this write; it answers.
            drop(guard);
        } else {
            let (ops, replies): (Vec<ShardOp>, Vec<_>) = batch.into_iter().unzip();
            let started = self.start_batch(local, &mut guard, ops, permit);
            drop(guard);
            match (started, self.this.upgrade()) {
                // The batch finishes in a task of its own: a caller that
                // goes away must not take the other writes, or the chain
                // of batches after it, with it.
                (Ok(batch), Some(this)) => {
                    let local = local.clone();
                    self.tasks.spawn(async move {
                        let written = this.finish_batch(&local, batch).await;
                        answer(replies, written);
                    });
                }
                (Ok(_), None) => answer(replies, Err(unavailable("the node is shutting down"))),
                (Err(e), _) => answer(replies, Err(e)),
            }
        }
        rx.await.unwrap_or_else(dropped)
    }

    /// Takes the LSNs of `ops` (after the last ones given out), starts
    /// their local append and plans their message to each member of the
    /// ack set. Called under the primary lock.
    fn start_batch(
        &self,
        local: &Arc<Local>,
        guard: &mut Option<Primary>,
        ops: Vec<ShardOp>,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> Result<InFlight, WireError> {
        let key = local.key;
        let Some(p) = guard.as_mut() else {
            return Err(unavailable(format!(
                "node {} is not the primary of {key} (it may be failing over); retry",
                self.me
            )));
        };
        if !p.ready {
            return Err(unavailable(format!(
                "the primary of {key} is still starting its term; retry"
            )));
        }
        let (cfg, replication) = self
            .config_of(key)
            .ok_or_else(|| unavailable(format!("{key} is not in the metadata")))?;
        if cfg.primary != Some(self.me) || cfg.term != p.term {
            *guard = None;
            return Err(unavailable(format!(
                "node {} is no longer the primary of {key}; retry",
                self.me
            )));
        }
        let holders = cfg.in_sync().len() as u32;
        if holders < replication.min_insync {
            return Err(unavailable(format!(
                "{key} has {holders} in-sync replicas, fewer than min_insync {}; writes resume when a replica catches up",
                replication.min_insync
            )));
        }
        let term = p.term;
        let last = p.assigned;
        let entries: Vec<(OpId, ShardOp)> = ops
            .into_iter()
            .enumerate()
            .map(|(i, op)| (OpId::new(term, last.lsn + 1 + i as u64), op))
            .collect();
        let end = entries.last().expect("a batch has at least one op").0;
        let fresh: Vec<LogEntry> = entries
            .iter()
            .map(|(id, op)| LogEntry {
                id: *id,
                op: op.encode(term).into(),
            })
            .collect();
        p.assigned = end;
        // The local fsync and the backups' run at the same time: no op is
        // acknowledged before all of them hold it, so the order does not
        // matter.
        let (appended_tx, appended) = Done::pending();
        let after = std::mem::replace(&mut p.appended, appended.clone());
        let records: Vec<bytes::Bytes> = fresh.iter().map(|e| e.op.clone()).collect();
        let owner = local.clone();
        let append = self.tasks.spawn(async move {
            let not_here = |why: &str| {
                Err(WireError::new(
                    ErrorCode::Unavailable,
                    format!("{key}: the write was not persisted here ({why}); retry"),
                ))
            };
            let result = if after.wait().await {
                let appended = owner
                    .persist(move |replica| {
                        // A newer term began here meanwhile (this node
                        // started another epoch, or follows another
                        // primary): the batch is an old primary's
                        // uncommitted suffix, and goes no further.
                        if replica.term() != term {
                            return Ok(false);
                        }
                        replica.append_encoded(last, entries, records).map(|_| true)
                    })
                    .await;
                match appended {
                    Ok(true) => Ok(()),
                    Ok(false) => not_here("the primary's term is over"),
                    Err(e) => {
                        // LSNs after `last` may be on backups already:
                        // this node must never give them out again in its
                        // term, so it stops taking writes.
                        owner.damaged.lock().expect("damaged lock").get_or_insert_with(|| {
                            format!("the op log did not take LSNs from {}: {}", last.lsn + 1, e.message)
                        });
                        Err(e)
                    }
                }
            } else {
                not_here("a batch before it was not persisted")
            };
            appended_tx.send_replace(Some(result.is_ok()));
            result
        });
        let mut sends = Vec::new();
        for node in p.backups(&cfg, self.me) {
            let follows = p.next.get(&node) == Some(&(last.lsn + 1));
            p.next.insert(node, end.lsn + 1);
            let acked = local.floors.lock().expect("floors lock").get(&node).copied();
            sends.push((node, follows.then_some(last), acked));
        }
        let (decide, decided) = Done::pending();
        let before = std::mem::replace(&mut p.decided, decided);
        Ok(InFlight {
            term,
            fresh,
            started: Instant::now(),
            append,
            appended,
            sends,
            before,
            decide,
            permit,
            counted: Counted::new(local),
        })
    }

    /// Waits for a batch's local append and messages, decides it after the
    /// batch before it, and applies it once committed.
    async fn finish_batch(&self, local: &Arc<Local>, batch: InFlight) -> Result<Vec<Written>, WireError> {
        let InFlight {
            term,
            fresh,
            started,
            append,
            appended,
            sends,
            before,
            decide,
            permit,
            counted,
        } = batch;
        let appending = async {
            append
                .await
                .unwrap_or_else(|e| Err(WireError::new(ErrorCode::Internal, format!("append task failed: {e}"))))
        };
        let sending = futures::future::join_all(sends.into_iter().map(|(node, after, acked)| {
            let (fresh, appended) = (&fresh, appended.clone());
            async move {
                let r = self.send_batch(local, term, node, after, fresh, acked, appended).await;
                (node, r)
            }
        }));
        let (appended, results) = tokio::join!(appending, sending);
        let ids: Vec<OpId> = fresh.iter().map(|e| e.id).collect();
        before.wait().await;
        let decided = self.decide(local, term, &ids, started, appended, results).await;
        drop(counted);
        // The turn to apply is taken before the next batch is decided, so
        // batches apply in commit order.
        let committed = match decided {
            Ok(cfg) => Ok(Committed {
                ids,
                cfg,
                turn: local.applying.clone().lock_owned().await,
            }),
            Err(e) => Err(e),
        };
        decide.send_replace(Some(committed.is_ok()));
        drop(permit);
        self.apply_committed(local, committed?).await
    }

    /// Sends a batch to `node`: the message that follows the last one
    /// sent to it when `after` is set; otherwise, or when its answer says
    /// it did not follow, once this node's log holds the batch, whatever
    /// brings it up to the batch (`bring_up_to`).
    #[allow(clippy::too_many_arguments)]
    async fn send_batch(
        &self,
        local: &Arc<Local>,
        term: u64,
        node: u64,
        after: Option<OpId>,
        fresh: &[LogEntry],
        acked: Option<u64>,
        appended: Done,
    ) -> Result<OpId, SendError> {
        let end = fresh.last().expect("a batch has at least one op").id;
        if let Some(prev) = after {
            let msg = Replicate {
                shard: local.key,
                term,
                prev,
                entries: fresh.to_vec(),
                commit_lsn: local.replica.applied_lsn(),
                ends_log: false,
            };
            match self.call(node, NodeOpV1::Replicate(msg), REPLICATE_TIMEOUT).await {
                Ok(NodeReplyV1::Replicated(ReplicateReply::Ack { last }))
                    if last.term == term && last.lsn >= end.lsn =>
                {
                    local.hold_log_for(node, Some(last.lsn));
                    return Ok(last);
                }
                // It did not follow (a message before this one was lost,
                // or its log is not what this primary thinks): find out
                // below.
                Ok(NodeReplyV1::Replicated(ReplicateReply::Ack { .. } | ReplicateReply::Mismatch { .. })) => {}
                Ok(NodeReplyV1::Replicated(ReplicateReply::NeedsRebuild { last })) => {
                    return Err(SendError::NeedsExport(format!(
                        "node {node} applied ops this log does not hold (its log ends at {last})"
                    )))
                }
                Ok(other) => return Err(SendError::Failed(format!("unexpected reply {other:?}"))),
                Err(e) if e.code == ErrorCode::Conflict => return Err(SendError::Fenced(e.message)),
                Err(e) if e.code == ErrorCode::Unavailable => {}
                Err(e) => return Err(SendError::Failed(e.message)),
            }
        }
        if !appended.wait().await {
            return Err(SendError::Failed(format!(
                "this node could not persist the batch ending at {end}"
            )));
        }
        let mut next = fresh[0].id.lsn;
        self.bring_up_to(local, term, node, &mut next, fresh, (acked, true))
            .await
    }

    /// Decides a batch, after the batches before it: it commits when every
    /// member of the ack set holds it and at least `min_insync` replicas
    /// do, once members that failed it are removed. Returns the
    /// configuration it committed under.
    async fn decide(
        &self,
        local: &Arc<Local>,
        term: u64,
        ids: &[OpId],
        started: Instant,
        appended: Result<(), WireError>,
        results: Vec<(u64, Result<OpId, SendError>)>,
    ) -> Result<ShardConfig, WireError> {
        let key = local.key;
        let end = *ids.last().expect("a batch has at least one op");
        if let Err(e) = appended {
            if let Some((cfg, _)) = self.config_of(key) {
                self.step_down_if_damaged(local, &cfg).await;
            }
            return Err(outcome_unknown(format!(
                "{key}: the primary could not persist the write ({}); retry",
                e.message
            )));
        }
        let mut guard = local.primary.lock().await;
        let Some(p) = guard.as_mut().filter(|p| p.term == term) else {
            return Err(outcome_unknown(format!(
                "{key}: this node was deposed as primary while writing; retry"
            )));
        };
        let results = results.into_iter().map(|(node, r)| (node, r.map(|_| ()))).collect();
        self.settle(local, p, results).await?;
        p.commit_lsn = p.commit_lsn.max(end.lsn);
        // The ack set confirmed this term after `started`: a round for
        // strong and bounded reads too.
        local.rounds.record(started, end.lsn);
        self.config_of(key)
            .map(|(cfg, _)| cfg)
            .ok_or_else(|| outcome_unknown(format!("{key} left the metadata during a write")))
    }

    /// This primary's commit LSN, confirmed current by a round over its
    /// ack set that started at or after `not_before` (concurrent callers
    /// share rounds; a write's replication is one). Refused unless this
    /// node is the ready primary of the current term (its epoch-start op
    /// committed). A member that fails the round is removed by CAS, as a
    /// write would. The round runs as a task of its own: a caller that
    /// stops waiting at its deadline does not cancel it (a removal by CAS
    /// half-done would otherwise start over with every read).
    pub async fn confirmed_commit(
        &self,
        local: &Arc<Local>,
        not_before: Instant,
        deadline: Instant,
    ) -> Result<u64, WireError> {
        let key = local.key;
        if let Some(lsn) = local.rounds.since(not_before) {
            return Ok(lsn);
        }
        let this = self
            .this
            .upgrade()
            .ok_or_else(|| unavailable("the node is shutting down"))?;
        let local = local.clone();
        let round = self.tasks.spawn(async move {
            let _turn = local.rounds.turn.clone().lock_owned().await;
            if let Some(lsn) = local.rounds.since(not_before) {
                return Ok(lsn);
            }
            this.read_index_round(&local).await
        });
        match tokio::time::timeout_at(deadline.into(), round).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => Err(WireError::new(
                ErrorCode::Internal,
                format!("read-index round failed: {e}"),
            )),
            Err(_) => Err(super::reads::not_caught_up(format!(
                "the primary of {key} could not confirm its term in time"
            ))),
        }
    }

    /// One read-index round: under the primary lock, every member of the
    /// ack set confirms this term (or is removed), then the commit LSN is
    /// recorded as of the round's start.
    async fn read_index_round(&self, local: &Arc<Local>) -> Result<u64, WireError> {
        let key = local.key;
        let not_primary = || {
            super::reads::not_caught_up(format!(
                "node {} is not the serving primary of {key}; a strong read needs the primary",
                self.me
            ))
        };
        let started = Instant::now();
        let mut guard = local.primary.lock().await;
        let p = guard.as_mut().ok_or_else(not_primary)?;
        if !p.ready {
            return Err(super::reads::not_caught_up(format!(
                "the primary of {key} is still starting its term (its epoch start is not committed)"
            )));
        }
        let (cfg, _) = self.config_of(key).ok_or_else(not_primary)?;
        if cfg.primary != Some(self.me) || cfg.term != p.term {
            return Err(not_primary());
        }
        self.confirm_ack_set(local, p).await?;
        let lsn = p.commit_lsn;
        drop(guard);
        local.rounds.record(started, lsn);
        Ok(lsn)
    }

    /// Every member of the ack set confirms that this node is still the
    /// primary of its term, with a message of no entries after the commit
    /// point (which every member holds, whatever batches are in flight);
    /// members that fail are removed. Called with the primary lock held.
    async fn confirm_ack_set(&self, local: &Arc<Local>, p: &mut Primary) -> Result<(), WireError> {
        let key = local.key;
        let (cfg, _) = self
            .config_of(key)
            .ok_or_else(|| unavailable(format!("{key} is not in the metadata")))?;
        let (term, commit) = (p.term, p.commit_lsn);
        let prev = local
            .replica
            .op_id_at(commit)
            .ok_or_else(|| outcome_unknown(format!("{key}: no op id at the commit point {commit}")))?;
        let confirms = p.backups(&cfg, self.me).into_iter().map(|node| async move {
            let started = Instant::now();
            loop {
                let msg = Replicate {
                    shard: key,
                    term,
                    prev,
                    entries: Vec::new(),
                    commit_lsn: commit,
                    ends_log: false,
                };
                let r = match self.call(node, NodeOpV1::Replicate(msg), REPLICATE_TIMEOUT).await {
                    Ok(NodeReplyV1::Replicated(ReplicateReply::Ack { .. })) => Ok(()),
                    Ok(other) => Err(SendError::Failed(format!(
                        "node {node} does not hold the commit point {prev}: {other:?}"
                    ))),
                    Err(e) if e.code == ErrorCode::Conflict => Err(SendError::Fenced(e.message)),
                    Err(e) if e.code == ErrorCode::Unavailable && started.elapsed() < REPLICATE_TIMEOUT => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                    Err(e) => Err(SendError::Failed(e.message)),
                };
                return (node, r);
            }
        });
        let results = futures::future::join_all(confirms).await;
        self.settle(local, p, results).await
    }

    /// Applies a committed batch (after the batches committed before it)
    /// and tells the backups its commit point.
    async fn apply_committed(&self, local: &Arc<Local>, committed: Committed) -> Result<Vec<Written>, WireError> {
        let Committed { ids, cfg, turn } = committed;
        let key = local.key;
        let end = *ids.last().expect("a batch has at least one op");
        let applied = local
            .persist(move |replica| replica.apply_through_counting(end.lsn))
            .await;
        drop(turn);
        local.publish_applied();
        let deleted: BTreeMap<u64, u64> = match applied {
            Ok((_, deleted)) => deleted.into_iter().collect(),
            Err(e) => {
                // Every in-sync replica holds the ops: they are committed, but
                // this node cannot serve them. Hand the shard to another replica.
                self.step_down_if_damaged(local, &cfg).await;
                return Err(outcome_unknown(format!(
                    "{key}: the write is replicated but the primary failed to apply it ({}); retry",
                    e.message
                )));
            }
        };
        self.notify_commit(local, end);
        Ok(ids
            .into_iter()
            .map(|op| Written {
                op,
                deleted: deleted.get(&op.lsn).copied().unwrap_or(0),
            })
            .collect())
    }

    /// Brings every member of the ack set up to `fresh` (just appended
    /// here; the epoch start, when no batch is in flight), reconciling
    /// each to this log. Members that fail are removed by CAS first; then
    /// the op counts as committed only if `min_insync` replicas still hold
    /// it. Called with the primary lock held.
    async fn replicate_to_ack_set(
        &self,
        local: &Arc<Local>,
        p: &mut Primary,
        fresh: &[LogEntry],
    ) -> Result<(), WireError> {
        let key = local.key;
        let (cfg, _) = self
            .config_of(key)
            .ok_or_else(|| unavailable(format!("{key} is not in the metadata")))?;
        let term = p.term;
        // (node, next LSN to send, what it acknowledged before if known).
        let starts: Vec<(u64, u64, Option<u64>)> = p
            .backups(&cfg, self.me)
            .into_iter()
            .map(|node| {
                let known = p.next.get(&node).copied();
                // A round without ops (a read-index round) starts a member
                // it has no position for after this log's end.
                let first = fresh
                    .first()
                    .map_or_else(|| local.replica.last_op().lsn + 1, |f| f.id.lsn);
                (node, known.unwrap_or(first), known.map(|n| n - 1))
            })
            .collect();
        let sends = starts.into_iter().map(|(node, next, acked)| async move {
            let mut next = next;
            let r = self
                .bring_up_to(local, term, node, &mut next, fresh, (acked, true))
                .await;
            (node, next, r)
        });
        let mut results = Vec::new();
        for (node, next, r) in futures::future::join_all(sends).await {
            // Batches still in flight may have been sent past it already.
            let at = p.next.entry(node).or_insert(next);
            *at = (*at).max(next);
            results.push((node, r.map(|_| ())));
        }
        self.settle(local, p, results).await
    }

    /// Settles a round from each member's result: a member that fenced
    /// this node ends it ("outcome unknown"); the members that failed are
    /// removed from the in-sync set (by CAS); then it checks that at least
    /// `min_insync` replicas still hold what the round sent, and that a
    /// lone primary is still the primary of its term. Called with the
    /// primary lock held.
    async fn settle(
        &self,
        local: &Arc<Local>,
        p: &mut Primary,
        results: Vec<(u64, Result<(), SendError>)>,
    ) -> Result<(), WireError> {
        let key = local.key;
        let mut failed = Vec::new();
        for (node, r) in results {
            match r {
                Ok(()) => {}
                Err(SendError::Fenced(m)) => {
                    return Err(outcome_unknown(format!(
                        "{key}: this node was deposed as primary ({m}); retry"
                    )))
                }
                Err(e) => {
                    let m = e.message();
                    debug!(shard = %key, node, error = %m, "backup failed");
                    failed.push((node, m));
                }
            }
        }
        for (node, why) in failed {
            warn!(shard = %key, node, reason = %why, "removing backup from the in-sync set");
            self.remove_member(local, p, node).await?;
        }
        let (cfg, replication) = self
            .config_of(key)
            .ok_or_else(|| outcome_unknown(format!("{key} left the metadata during a write")))?;
        let holders = p.backups(&cfg, self.me).len() as u32 + 1;
        if holders < replication.min_insync {
            return Err(outcome_unknown(format!(
                "{key}: only {holders} replicas hold the write, fewer than min_insync {}; it commits once a replica catches up, retry to be sure",
                replication.min_insync
            )));
        }
        if holders == 1 {
            // Nothing else fences a lone primary: confirm its term and
            // version are still current before acknowledging.
            self.meta.read_index().await?;
            let (now, _) = self
                .config_of(key)
                .ok_or_else(|| outcome_unknown(format!("{key} left the metadata during a write")))?;
            if now.term != p.term || now.primary != Some(self.me) {
                return Err(outcome_unknown(format!(
                    "{key}: this node was deposed as primary while writing; retry"
                )));
            }
        }
        Ok(())
    }

    /// Removes `node` from the in-sync set by CAS (or forgets it as a
    /// joiner). Fails when this node turns out not to be the primary of
    /// its term any more.
    async fn remove_member(&self, local: &Local, p: &mut Primary, node: u64) -> Result<(), WireError> {
        let key = local.key;
        // It holds everything through what it acknowledged last (what was
        // sent to it after that may never have arrived): if it comes
        // back, it catches up from there.
        p.next.remove(&node);
        let held = local.floors.lock().expect("floors lock").get(&node).copied();
        local.hold_log_for(node, None);
        for _ in 0..5 {
            let (cfg, replication) = self
                .config_of(key)
                .ok_or_else(|| outcome_unknown(format!("{key} left the metadata during a write")))?;
            if cfg.term != p.term || cfg.primary != Some(self.me) {
                return Err(outcome_unknown(format!(
                    "{key}: this node is no longer its primary; retry"
                )));
            }
            if let Some(lsn) = held {
                local.hold_log_while_away(node, lsn, cfg.version);
            }
            if !cfg.in_sync().contains(&node) {
                // A joiner whose CAS has not committed: a CAS at the
                // version it expected can still commit, so fence it by
                // moving the version on.
                if let Some(v) = p.joiners.get(&node).copied() {
                    if cfg.version <= v {
                        let bumped = edgevec_meta::set_replica_state(&cfg, node, edgevec_meta::ReplicaState::Offline);
                        if !self.cas(key, cfg.version, bumped).await? {
                            continue;
                        }
                    }
                    p.joiners.remove(&node);
                }
                return Ok(());
            }
            let next = edgevec_meta::remove_from_in_sync(&cfg, node, replication.min_insync);
            if self.cas(key, cfg.version, next).await? {
                return Ok(());
            }
            // The version moved: re-read linearizably and try again while
            // still the primary of this term.
            self.meta.read_index().await?;
        }
        Err(outcome_unknown(format!(
            "{key}: could not remove failed replica {node} from the in-sync set; retry"
        )))
    }

    /// Sends log entries to `node` from `*next` until it holds everything
    /// through `fresh` (or through this log's end), following its answers:
    /// a mismatch moves `next` back to where the logs diverge. `acked`: what
    /// it acknowledged before, if known; `locked`: writes wait on it (a
    /// member of the ack set, or a catch-up's last stretch under the
    /// primary lock), so it must answer within [`REPLICATE_TIMEOUT`].
    pub(super) async fn bring_up_to(
        &self,
        local: &Arc<Local>,
        term: u64,
        node: u64,
        next: &mut u64,
        fresh: &[LogEntry],
        (acked, locked): (Option<u64>, bool),
    ) -> Result<OpId, SendError> {
        let key = local.key;
        let started = Instant::now();
        // When writes wait on it (a member of the ack set, or a catch-up's
        // last stretch) an answer must come quickly; a catch-up outside
        // the primary lock may take its time.
        let budget = if locked {
            REPLICATE_TIMEOUT
        } else {
            Duration::from_secs(30)
        };
        loop {
            if started.elapsed() > budget {
                return Err(SendError::Failed(format!("not caught up within {budget:?}")));
            }
            let status = local.replica.log_status();
            // With `fresh`, its end is the target: it may still be on its
            // way to this node's disk (it is persisted in parallel), and
            // batches after it may be in this log already, in flight to
            // `node` on messages of their own.
            let target = fresh.last().map_or(status.last, |f| f.id);
            let prev_lsn = next.saturating_sub(1).min(target.lsn);
            let prev = local
                .replica
                .op_id_at(prev_lsn)
                .ok_or_else(|| SendError::Failed(format!("no op id at {prev_lsn}")))?;
            let entries: Vec<LogEntry> = match fresh.first() {
                Some(f) if f.id.lsn <= prev_lsn + 1 => fresh.iter().filter(|e| e.id.lsn > prev_lsn).cloned().collect(),
                _ if prev_lsn >= target.lsn => Vec::new(),
                _ => {
                    let replica = local.replica.clone();
                    let read = tokio::task::spawn_blocking(move || {
                        replica.entries_after(prev_lsn, CATCH_UP_BATCH_OPS, CATCH_UP_BATCH_BYTES)
                    })
                    .await
                    .map_err(|e| SendError::Failed(format!("storage task failed: {e}")))?;
                    let read = match read {
                        Ok(r) => r,
                        Err(e @ EngineError::LogTrimmed { .. }) => return Err(SendError::NeedsExport(e.to_string())),
                        Err(e) => return Err(SendError::Failed(e.to_string())),
                    };
                    read.into_iter()
                        .map(|(id, op)| LogEntry {
                            id,
                            op: op.encode(id.term).into(),
                        })
                        .collect()
                }
            };
            let sent_end = entries.last().map_or(prev, |e| e.id);
            let msg = Replicate {
                shard: key,
                term,
                prev,
                // The backup drops what follows only if it is of an
                // older term: batches of this term in flight stay.
                ends_log: sent_end == target,
                entries,
                commit_lsn: status.applied,
            };
            let reply = self.call(node, NodeOpV1::Replicate(msg), REPLICATE_TIMEOUT).await;
            match reply {
                Ok(NodeReplyV1::Replicated(ReplicateReply::Ack { last })) => {
                    let mine = LogShape {
                        last: target,
                        history: &status.history,
                    };
                    // An op of this term is this primary's own, though
                    // maybe of a batch still in flight here.
                    if last.term == term || fresh.iter().any(|f| f.id == last) || mine.holds(last) {
                        local.hold_log_for(node, Some(last.lsn));
                        *next = last.lsn + 1;
                        if last.lsn >= target.lsn {
                            return Ok(last);
                        }
                    } else {
                        // It holds a suffix this log does not: resend from
                        // a point both hold so it truncates.
                        *next = sent_end.lsn.min(last.lsn);
                    }
                }
                Ok(NodeReplyV1::Replicated(ReplicateReply::Mismatch { last, history })) => {
                    // Its disk went back in time: it lost ops it had
                    // acknowledged. That is a failure, never a resend.
                    if let Some(a) = acked.filter(|a| last.lsn < *a) {
                        return Err(SendError::Failed(format!(
                            "node {node}'s log ends at {last} but it had acknowledged LSN {a}: it lost acknowledged ops"
                        )));
                    }
                    let mine = LogShape {
                        last: target,
                        history: &status.history,
                    };
                    let theirs = LogShape {
                        last,
                        history: &history,
                    };
                    let at = divergence(mine, theirs);
                    if at < target.lsn && status.first_logged.is_none_or(|first| at + 1 < first) {
                        return Err(SendError::NeedsExport(format!(
                            "node {node} needs ops from LSN {} but this op log starts at {}",
                            at + 1,
                            status.first_logged.map_or("its end".to_string(), |f| f.to_string())
                        )));
                    }
                    *next = at + 1;
                }
                Ok(NodeReplyV1::Replicated(ReplicateReply::NeedsRebuild { last })) => {
                    return Err(SendError::NeedsExport(format!(
                        "node {node} applied ops this log does not hold (its log ends at {last})"
                    )));
                }
                Ok(other) => return Err(SendError::Failed(format!("unexpected reply {other:?}"))),
                Err(e) if e.code == ErrorCode::Conflict => return Err(SendError::Fenced(e.message)),
                // Not ready yet (its metadata or replica lags a moment):
                // try again within the budget.
                Err(e)
                    if e.code == ErrorCode::Unavailable && started.elapsed() + Duration::from_millis(50) < budget =>
                {
                    debug!(shard = %key, node, error = %e.message, "backup not ready; retrying");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => return Err(SendError::Failed(e.message)),
            }
        }
    }

    /// While this node is primary of `term` for `local`, tells the ack set
    /// the commit point every [`HEARTBEAT`] (a backup that restarted
    /// learns it without waiting for a write, and can serve reads again),
    /// and logs the merges the compaction policy asks for.
    async fn heartbeat(self: Arc<Self>, local: Arc<Local>, term: u64) {
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(HEARTBEAT) => {}
            }
            let current = self
                .config_of(local.key)
                .is_some_and(|(c, _)| c.term == term && c.primary == Some(self.me));
            if !current || !self.local(local.key).is_some_and(|l| Arc::ptr_eq(&l, &local)) {
                return;
            }
            self.propose_merge(&local);
            // A write in progress tells the commit point itself.
            let Ok(guard) = local.primary.try_lock() else { continue };
            let commit = match guard.as_ref() {
                Some(p) if p.term == term && p.ready => p.commit_lsn,
                Some(p) if p.term == term => continue,
                _ => return,
            };
            drop(guard);
            if let Some(id) = local.replica.op_id_at(commit) {
                self.notify_commit(&local, id);
            }
        }
    }

    /// Logs the merge the compaction policy wants next, if any and if no
    /// merge op of this replica is being written already. The op goes
    /// through the write path like any write, so every in-sync replica
    /// merges at the same LSN.
    fn propose_merge(self: &Arc<Self>, local: &Arc<Local>) {
        use std::sync::atomic::Ordering;
        if local.damaged.lock().expect("damaged lock").is_some() || local.merging.swap(true, Ordering::AcqRel) {
            return;
        }
        let Some(op) = local.replica.merge_proposal(&MergePolicy::default()) else {
            local.merging.store(false, Ordering::Release);
            return;
        };
        let (this, local) = (self.clone(), local.clone());
        self.tasks.spawn(async move {
            let what = format!("{op:?}");
            match this.primary_write(&local, op).await {
                Ok(w) => info!(shard = %local.key, op = %w.op, "{what} logged"),
                Err(e) => debug!(shard = %local.key, error = %e.message, "{what} not logged; proposed again later"),
            }
            local.merging.store(false, Ordering::Release);
        });
    }

    /// Tells the ack set that everything through `id` is committed, so
    /// backups make it searchable without waiting for the next write.
    fn notify_commit(&self, local: &Arc<Local>, id: OpId) {
        let Some((cfg, _)) = self.config_of(local.key) else {
            return;
        };
        for node in cfg.in_sync().into_iter().filter(|n| *n != self.me) {
            let msg = Replicate {
                shard: local.key,
                term: id.term,
                prev: id,
                entries: Vec::new(),
                commit_lsn: id.lsn,
                ends_log: false,
            };
            let peers = self.peers.clone();
            let addr = self.addr_of(&self.meta.state(), node);
            self.tasks.spawn(async move {
                if let Some(addr) = addr {
                    let req = edgevec_proto::internal::NodeRequest::V1(NodeOpV1::Replicate(msg));
                    let _ = peers.call(addr, &req, Duration::from_secs(1)).await;
                }
            });
        }
    }

    /// A primary whose disk failed hands the shard over: it leaves the
    /// in-sync set by CAS (which also clears it as primary and bumps the
    /// term), so the metadata leader promotes another replica.
    pub(super) async fn step_down_if_damaged(&self, local: &Local, cfg: &ShardConfig) {
        if local.damaged.lock().expect("damaged lock").is_none() {
            return;
        }
        self.leave_in_sync(local, cfg).await;
    }

    /// A damaged replica named in-sync (or primary) by `cfg` leaves the
    /// in-sync set by CAS; its primary then rebuilds it from an export.
    pub(super) fn leave_if_damaged(self: Arc<Self>, local: Arc<Local>, cfg: ShardConfig) {
        let named = cfg.primary == Some(self.me) || cfg.in_sync().contains(&self.me);
        if !named {
            return;
        }
        let this = self.clone();
        self.tasks.spawn(async move { this.leave_in_sync(&local, &cfg).await });
    }

    async fn leave_in_sync(&self, local: &Local, cfg: &ShardConfig) {
        let Some((_, replication)) = self.config_of(local.key) else {
            return;
        };
        let next = edgevec_meta::remove_from_in_sync(cfg, self.me, replication.min_insync);
        match self.cas(local.key, cfg.version, next).await {
            Ok(true) => warn!(shard = %local.key, "damaged replica left the in-sync set"),
            Ok(false) => {}
            Err(e) => warn!(shard = %local.key, error = %e.message, "damaged replica could not leave the in-sync set"),
        }
    }
}
