//! The backup side of replication: ops from the primary of the current
//! term, checked, persisted, then acknowledged (REPLICATION.md, write rules
//! 3 and 6).
//!
//! Invariants:
//! - ops are taken only from the node the metadata names primary of the
//!   message's term (the sender is identified by its certificate), and
//!   never of a term older than this replica's durable term (fencing);
//! - an op is appended only right after an op both logs hold (log
//!   matching); a conflicting suffix is truncated first, and never below
//!   what this replica already made searchable; a message that ends the
//!   primary's log truncates only ops of older terms after it, never ops
//!   of the primary's own term (later messages it pipelined);
//! - a message that overtook the one before it (the primary keeps
//!   several batches in flight) waits a bounded time for it;
//! - the ack is sent after the fsync and names the end of the log;
//! - ops become searchable up to min(commit LSN, the last LSN verified
//!   against the current primary in this term).

use std::time::Duration;

use edgevec_engine::ShardOp;
use edgevec_proto::replication::{Replicate, ReplicateReply, ShardRef};
use edgevec_proto::{ErrorCode, OpId, WireError};

use super::log_match::{accept, applicable, Accept, LogShape};
use super::{unavailable, DataPlane};

/// What a backup knows of the primary it follows.
#[derive(Debug, Default)]
pub struct BackupView {
    /// Term of the primary whose ops were last taken.
    pub term: u64,
    /// Highest LSN verified against that primary's log in that term.
    pub verified: u64,
    /// Highest commit LSN heard of.
    pub commit: u64,
}

/// What taking a message's entries came to.
enum Taken {
    /// Appended (or already held) through this op.
    Through(OpId),
    Mismatch,
    /// Would truncate applied ops.
    NeedsRebuild,
}

/// How long a backup holds a message that arrived before the one it
/// follows (the primary pipelines its batches) before it answers a
/// mismatch.
const REORDER_WAIT: Duration = Duration::from_millis(500);

/// Whether `beyond`, the op after the end of what a message that ends the
/// primary's log sent, belongs to a suffix the primary of `term` does not
/// hold. Ops of `term` itself came from that primary, which never drops
/// its own ops: they are messages still in flight when this one was
/// sent, and acknowledged ones among them, so they stay. Ops of earlier
/// terms beyond its log's end are a deposed primary's uncommitted tail.
fn stale_suffix(beyond: OpId, term: u64) -> bool {
    beyond.term < term
}

/// How long a backup waits for its metadata to learn of a newer term a
/// primary already claims (metadata is applied asynchronously).
const TERM_WAIT: Duration = Duration::from_secs(2);

impl DataPlane {
    /// Checks that `peer` is the primary of `term` for the message's shard,
    /// waiting briefly for this node's metadata to catch up.
    pub(super) async fn check_sender(&self, peer: u64, key: ShardRef, term: u64) -> Result<(), WireError> {
        let deadline = tokio::time::Instant::now() + TERM_WAIT;
        let mut rx = self.meta.subscribe();
        loop {
            if let Some((cfg, _)) = self.config_of(key) {
                if term < cfg.term {
                    return Err(WireError::new(
                        ErrorCode::Conflict,
                        format!("{key}: term {term} is over, the current term is {}", cfg.term),
                    ));
                }
                if term == cfg.term {
                    return if cfg.primary == Some(peer) {
                        Ok(())
                    } else {
                        Err(WireError::new(
                            ErrorCode::Conflict,
                            format!("{key}: node {peer} is not the primary of term {term}"),
                        ))
                    };
                }
            }
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(unavailable(format!(
                        "{key}: this node's metadata does not know term {term} yet; retry"
                    )))
                }
                changed = rx.changed() => if changed.is_err() {
                    return Err(unavailable("node is shutting down"));
                },
            }
        }
    }

    /// Takes a [`Replicate`] message from node `peer`.
    pub async fn on_replicate(&self, peer: u64, msg: Replicate) -> Result<ReplicateReply, WireError> {
        let key = msg.shard;
        self.check_sender(peer, key, msg.term).await?;
        let local = self.local_or_sync(key).await?;
        if !msg.entries.is_empty() {
            let faults = crate::faults::get();
            if let Some(every) = faults.replicate_refuse_every {
                static SEEN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
                if (SEEN.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1).is_multiple_of(every) {
                    return Err(unavailable(format!("{key}: message refused (fault hook)")));
                }
            }
            if let Some(delay) = faults.replicate_delay {
                tokio::time::sleep(delay).await;
            }
        }
        if !msg.entries.is_empty() && msg.prev.term == msg.term && msg.prev.lsn > local.replica.last_op().lsn {
            // The primary has several messages in flight: this one
            // overtook the one before it. Give that one a moment to land
            // rather than answer a mismatch the primary would resend from.
            let mut appended = local.appended.subscribe();
            let _ = tokio::time::timeout(REORDER_WAIT, appended.wait_for(|last| *last >= msg.prev.lsn)).await;
        }
        let mut view = local.backup.lock().await;
        // A damaged replica takes no more ops: the primary rebuilds it
        // from an export of its own (the import replaces it whole).
        if local.damaged.lock().expect("damaged lock").is_some() {
            return Ok(ReplicateReply::NeedsRebuild {
                last: local.replica.last_op(),
            });
        }
        if msg.term < local.replica.term() {
            return Err(WireError::new(
                ErrorCode::Conflict,
                format!(
                    "{key}: term {} is older than this replica's term {}",
                    msg.term,
                    local.replica.term()
                ),
            ));
        }
        if view.term != msg.term {
            view.term = msg.term;
            view.verified = 0;
        }
        let mut entries = Vec::with_capacity(msg.entries.len());
        let mut records = Vec::with_capacity(msg.entries.len());
        for (i, e) in msg.entries.into_iter().enumerate() {
            if e.id.lsn != msg.prev.lsn + 1 + i as u64 || e.id.term > msg.term || e.id.term < msg.prev.term {
                return Err(WireError::new(
                    ErrorCode::Malformed,
                    format!("{key}: entry {i} has op id {} after {}", e.id, msg.prev),
                ));
            }
            // The record is stored as received: it must be the one this
            // node would encode for that op id.
            let (term, op) = ShardOp::decode_with_term(&e.op)
                .map_err(|err| WireError::new(ErrorCode::Malformed, err.to_string()))?;
            if term != e.id.term {
                return Err(WireError::new(
                    ErrorCode::Malformed,
                    format!("{key}: entry {i} ({}) carries a record of term {term}", e.id),
                ));
            }
            entries.push((e.id, op));
            records.push(e.op);
        }
        let (prev, term, ends_log) = (msg.prev, msg.term, msg.ends_log);
        let outcome = local
            .persist(move |replica| {
                if replica.term() < term {
                    replica.raise_term(term)?;
                }
                let status = replica.log_status();
                let mine = LogShape {
                    last: status.last,
                    history: &status.history,
                };
                let ids: Vec<OpId> = entries.iter().map(|(id, _)| *id).collect();
                match accept(mine, prev, &ids) {
                    Accept::Mismatch => Ok(Taken::Mismatch),
                    Accept::Append { truncate_after, from } => {
                        if let Some(lsn) = truncate_after {
                            if lsn < replica.applied_lsn() {
                                return Ok(Taken::NeedsRebuild);
                            }
                            replica.truncate_after(lsn)?;
                        }
                        if from < entries.len() {
                            let after = if from == 0 { prev } else { ids[from - 1] };
                            let (mut entries, mut records) = (entries, records);
                            replica.append_encoded(after, entries.split_off(from), records.split_off(from))?;
                        }
                        let sent_end = ids.last().copied().unwrap_or(prev);
                        let beyond = replica.op_id_at(sent_end.lsn + 1);
                        if ends_log && beyond.is_some_and(|b| stale_suffix(b, term)) {
                            if sent_end.lsn < replica.applied_lsn() {
                                return Ok(Taken::NeedsRebuild);
                            }
                            replica.truncate_after(sent_end.lsn)?;
                        }
                        Ok(Taken::Through(sent_end))
                    }
                }
            })
            .await;
        local.appended.send_replace(local.replica.last_op().lsn);
        let verified = match outcome? {
            Taken::Through(id) => id,
            Taken::Mismatch => {
                let status = local.replica.log_status();
                return Ok(ReplicateReply::Mismatch {
                    last: status.last,
                    history: status.history,
                });
            }
            Taken::NeedsRebuild => {
                tracing::warn!(shard = %key, "the primary's log diverges below what this replica applied: it needs an export");
                return Ok(ReplicateReply::NeedsRebuild {
                    last: local.replica.last_op(),
                });
            }
        };
        view.verified = view.verified.max(verified.lsn);
        view.commit = view.commit.max(msg.commit_lsn);
        let through = applicable(view.commit, view.verified);
        let last = local.replica.last_op();
        local.raise_apply_target(through);
        drop(view);
        if through > local.replica.applied_lsn() {
            // Making committed ops searchable is off the ack's path: the
            // ack only promises the ops are persisted. Applies of one
            // replica are serialised by the engine, and idempotent.
            let local = local.clone();
            self.tasks.spawn(async move {
                if let Some(lag) = crate::faults::get().apply_delay {
                    tokio::time::sleep(lag).await;
                }
                if let Err(e) = local.persist(move |replica| replica.apply_through(through)).await {
                    tracing::warn!(shard = %local.key, error = %e.message, "applying committed ops failed");
                }
                local.publish_applied();
            });
        }
        Ok(ReplicateReply::Ack { last })
    }
}
