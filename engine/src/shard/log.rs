//! The op-log side of a replica: term, append, truncation, reads for
//! catch-up and the retention floor. The rules are in [`crate::oplog`];
//! this file persists their outcome (one fsynced redb transaction each)
//! and then mirrors it in memory, under the `writer` lock.

use std::sync::atomic::Ordering;

use edgevec_proto::OpId;

use super::ShardReplica;
use crate::error::EngineError;
use crate::op::ShardOp;
use crate::oplog::LogState;

impl ShardReplica {
    /// Raises the durable term to `term`, fsynced before returning. The
    /// same term is a no-op; a lower one is refused with
    /// [`EngineError::StaleTerm`].
    pub fn raise_term(&self, term: u64) -> Result<(), EngineError> {
        let _writer = self.writer.lock().expect("shard writer lock");
        let current = self.read().log.term;
        if term == current {
            return Ok(());
        }
        if term < current {
            return Err(EngineError::StaleTerm {
                shard: self.config.shard,
                term,
                current,
            });
        }
        self.store.set_term(term)?;
        self.state.write().expect("shard state lock").log.term = term;
        Ok(())
    }

    /// Appends `entries` right after `prev`, which must be exactly
    /// [`ShardReplica::last_op`] ([`EngineError::LogMismatch`] otherwise).
    /// Their LSNs must follow on from `prev.lsn` one by one
    /// ([`EngineError::LsnOutOfOrder`]) and no entry may be of a term below
    /// the durable term ([`EngineError::StaleTerm`]); a higher term raises
    /// the durable term and opens a term-history entry. Entries, term and
    /// history are written in one fsynced transaction before this returns.
    /// Returns the new last op; no entries: returns the last op unchanged.
    ///
    /// The ops are not applied: see [`ShardReplica::apply_through`].
    /// Takes the entries by value (a slice is copied): they are kept for
    /// their apply.
    pub fn append(&self, prev: OpId, entries: impl Into<Vec<(OpId, ShardOp)>>) -> Result<OpId, EngineError> {
        let entries = entries.into();
        let records = entries.iter().map(|(id, op)| op.encode(id.term)).collect();
        self.append_encoded(prev, entries, records)
    }

    /// [`ShardReplica::append`] with each entry's log record already
    /// encoded (`records[i]` is `entries[i].1.encode(entries[i].0.term)`,
    /// as replication messages carry it), so it is not encoded again. The
    /// ops are kept, as given, for their apply.
    pub fn append_encoded(
        &self,
        prev: OpId,
        entries: Vec<(OpId, ShardOp)>,
        records: Vec<impl AsRef<[u8]>>,
    ) -> Result<OpId, EngineError> {
        assert_eq!(entries.len(), records.len(), "one record per entry");
        let _writer = self.writer.lock().expect("shard writer lock");
        let appended = self
            .read()
            .log
            .check_append(self.config.shard, prev, entries.iter().map(|(id, _)| *id))?;
        if entries.is_empty() {
            return Ok(appended.last);
        }
        for (_, op) in &entries {
            self.check_op(op)?;
        }
        let encoded: Vec<(u64, _)> = entries.iter().map(|(id, _)| id.lsn).zip(records).collect();
        let first_logged = self.store.append(&encoded, &appended)?;
        if entries
            .iter()
            .any(|(_, op)| matches!(op, ShardOp::Upsert(_) | ShardOp::Delete(_)))
        {
            *self.last_write.lock().expect("last write lock") = std::time::Instant::now();
        }
        let mut unapplied = self.unapplied.lock().expect("unapplied lock");
        for ((id, op), (_, record)) in entries.into_iter().zip(&encoded) {
            unapplied.add(id, op, record.as_ref().len());
        }
        drop(unapplied);
        let mut st = self.state.write().expect("shard state lock");
        st.log.term = appended.term;
        st.log.last = appended.last;
        st.log.history.extend(appended.new_terms);
        st.log.first_logged = first_logged;
        Ok(appended.last)
    }

    /// Removes every log entry above `lsn` and the history entries of the
    /// terms that start above it, fsynced. The durable term stays. Refused
    /// with [`EngineError::TruncateBelowApplied`] below the applied LSN:
    /// applied ops are never taken back, such a replica is rebuilt. No-op
    /// at or above the last op.
    pub fn truncate_after(&self, lsn: u64) -> Result<(), EngineError> {
        let _writer = self.writer.lock().expect("shard writer lock");
        let truncated = {
            let st = self.read();
            if lsn < st.applied_lsn {
                return Err(EngineError::TruncateBelowApplied {
                    shard: self.config.shard,
                    lsn,
                    applied: st.applied_lsn,
                });
            }
            if lsn >= st.log.last.lsn {
                return Ok(());
            }
            st.log.truncated(lsn)
        };
        let first_logged = self.store.truncate_after(lsn, truncated.last)?;
        self.unapplied.lock().expect("unapplied lock").cut_after(lsn);
        tracing::info!(
            shard = self.config.shard,
            last = %truncated.last,
            "op log truncated"
        );
        self.state.write().expect("shard state lock").log = LogState {
            first_logged,
            ..truncated
        };
        Ok(())
    }

    /// Log entries above `after`, in order: at most `max_ops`, and no more
    /// once `max_bytes` of encoded ops are collected (always at least one
    /// when there is any). [`EngineError::LogTrimmed`] when retention has
    /// dropped op `after + 1` already: the caller needs an export instead.
    pub fn entries_after(
        &self,
        after: u64,
        max_ops: usize,
        max_bytes: usize,
    ) -> Result<Vec<(OpId, ShardOp)>, EngineError> {
        self.store.entries_after(after, max_ops, max_bytes)
    }

    /// Keeps every log entry above `lsn` from retention, on top of the
    /// unapplied ones it always keeps. The primary passes the lowest last
    /// LSN among the replicas it catches up from this log (they still need
    /// `lsn + 1` onwards); `u64::MAX`, the value at open, sets no extra
    /// floor. Held in memory only: after a restart the primary sets it
    /// again before it streams. Takes effect at the next apply.
    pub fn set_retain_floor(&self, lsn: u64) {
        self.retain_floor.store(lsn, Ordering::Release);
    }

    /// Keeps the log entries above `lsn` from retention while the log
    /// takes at most `hold_bytes` of its configuration: the primary passes
    /// the lowest last LSN among the replicas that left the in-sync set
    /// and may come back, so that they catch up from the log rather than
    /// from an export. Unlike [`ShardReplica::set_retain_floor`] this is
    /// bounded: past `hold_bytes`, held entries go as any applied ones.
    /// `u64::MAX`, the value at open, holds nothing. Held in memory only.
    pub fn set_held_floor(&self, lsn: u64) {
        self.held_floor.store(lsn, Ordering::Release);
    }

    /// Lets retention drop what it may now, without waiting for the next
    /// apply (after a hold ends, say). Committed without fsync: a crash
    /// before the next durable commit only leaves the log longer, and the
    /// next open trims it again.
    pub fn trim_log(&self) -> Result<(), EngineError> {
        let _writer = self.writer.lock().expect("shard writer lock");
        let live_points = self.read().locations.len();
        let first_logged = self.store.trim(self.retention(live_points))?;
        self.state.write().expect("shard state lock").log.first_logged = first_logged;
        Ok(())
    }

    /// Ops come validated from the primary; this guards the invariants the
    /// in-memory segments rely on (a wrong length would corrupt rows), so
    /// that a bad op never enters the log.
    fn check_op(&self, op: &ShardOp) -> Result<(), EngineError> {
        if let ShardOp::Upsert(points) = op {
            for (i, p) in points.iter().enumerate() {
                if p.vector.len() != self.config.dim as usize || p.vector.iter().any(|x| !x.is_finite()) {
                    return Err(EngineError::invalid(
                        format!("points[{i}].vector"),
                        format!("vector must have {} finite components", self.config.dim),
                    ));
                }
            }
        }
        Ok(())
    }
}
