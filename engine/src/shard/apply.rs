//! The applied side of a replica: turning logged ops into searchable
//! state, a batch at a time.
//!
//! A batch is planned op by op against the state as the previous ops of
//! the batch left it (so the result is the one applying them one at a time
//! would give), committed in one transaction with the new applied LSN and
//! the retention trim (fsynced only when it seals a segment: see
//! `Store::apply`), and only then mirrored in memory. A merge op is
//! applied alone, after the ops before it are in memory: its decision
//! reads the segments (module `merge`).

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use super::{ShardReplica, ShardState};
use edgevec_proto::OpId;

use crate::error::EngineError;
use crate::op::ShardOp;
use crate::payload::Columns;
use crate::plan::{self, Location, Plan};
use crate::segment::Segment;
use crate::store::{Applied, Retention};

impl ShardReplica {
    /// Applies the logged ops `applied_lsn() + 1 ..= min(lsn, last_op().lsn)`
    /// in order and returns the new applied LSN; `lsn` at or below the
    /// applied LSN is a no-op. The caller passes only committed LSNs, and
    /// bounds the batch: its ops are in memory at once (as the append left
    /// them, or read back from the log).
    ///
    /// After the apply, retention drops the oldest applied ops while the
    /// log exceeds `retain_bytes`, keeping everything above the retain
    /// floor ([`ShardReplica::set_retain_floor`]).
    pub fn apply_through(&self, lsn: u64) -> Result<u64, EngineError> {
        self.apply_through_counting(lsn).map(|(applied, _)| applied)
    }

    /// [`ShardReplica::apply_through`], also returning, for every delete
    /// op this call applied, its LSN and how many points it deleted (ids
    /// that did not exist count for nothing).
    pub fn apply_through_counting(&self, lsn: u64) -> Result<(u64, Vec<(u64, u64)>), EngineError> {
        let _writer = self.writer.lock().expect("shard writer lock");
        let (applied, target) = {
            let st = self.read();
            (st.applied_lsn, lsn.min(st.log.last.lsn))
        };
        if target <= applied {
            return Ok((applied, Vec::new()));
        }
        let cached = self.unapplied.lock().expect("unapplied lock").take(applied + 1, target);
        let ops = match cached {
            Some(ops) => ops,
            None => self.store.logged(applied + 1, target)?,
        };
        let mut deleted = Vec::new();
        let mut rest = &ops[..];
        while !rest.is_empty() {
            // A merge op alone; other ops up to the next merge op together.
            let n = match rest.iter().position(|(_, op)| matches!(op, ShardOp::Merge { .. })) {
                Some(0) => 1,
                Some(i) => i,
                None => rest.len(),
            };
            let (chunk, tail) = rest.split_at(n);
            deleted.extend(self.apply_chunk(chunk)?);
            rest = tail;
        }
        Ok((target, deleted))
    }

    /// Applies consecutive logged ops (a merge op only alone); returns the
    /// LSN and count of each delete.
    fn apply_chunk(&self, ops: &[(OpId, ShardOp)]) -> Result<Vec<(u64, u64)>, EngineError> {
        let (plans, growing, live_points) = {
            let st = self.read();
            // Ids touched by earlier ops of the batch shadow the shard's map.
            let mut touched: HashMap<u64, Option<Location>> = HashMap::new();
            let (mut growing, mut next) = (st.growing, st.next_segment);
            let mut plans = Vec::with_capacity(ops.len());
            for (_, op) in ops {
                let current = |id| match touched.get(&id) {
                    Some(at) => *at,
                    None => st.locations.get(id),
                };
                let mut p = plan::plan(op, current, growing, next, self.config.seal_rows);
                if let ShardOp::Merge { sources } = op {
                    debug_assert_eq!(ops.len(), 1, "a merge op is applied alone");
                    p.merge = Self::plan_merge(&st, sources, next);
                    if p.merge.is_some() {
                        p.next += 1;
                    }
                }
                touched.extend(p.points.iter().copied());
                growing = p.growing;
                next = p.next;
                plans.push(p);
            }
            (plans, growing, st.locations.len())
        };
        let batch: Vec<Applied<'_>> = ops
            .iter()
            .zip(&plans)
            .map(|((id, op), plan)| Applied { lsn: id.lsn, op, plan })
            .collect();
        let first_logged = self.store.apply(&batch, growing.segment, self.retention(live_points))?;
        let (sealed, merges, unused, installed) = {
            let mut st = self.state.write().expect("shard state lock");
            let (mut sealed, mut merges, mut unused) = (Vec::new(), Vec::new(), Vec::new());
            let mut installed = false;
            for a in &batch {
                sealed.extend(self.apply_to_memory(&mut st, a.op, a.plan));
                if let Some(m) = &a.plan.merge {
                    let (build, replaced) = Self::apply_merge(&mut st, m);
                    if build {
                        merges.push(m.id);
                    } else {
                        // Deleted rows only: installed by its apply.
                        installed = true;
                    }
                    unused.extend(replaced);
                }
            }
            st.applied_lsn = batch.last().map_or(st.applied_lsn, |a| a.lsn);
            st.log.first_logged = first_logged;
            (sealed, merges, unused, installed)
        };
        self.remove_index_files(&unused);
        if installed {
            self.queue_reclaim();
        }
        for segment in sealed {
            self.queue_build(segment);
        }
        for merge in merges {
            self.queue_merge(merge);
        }
        Ok(batch
            .iter()
            .filter(|a| matches!(a.op, ShardOp::Delete(_)))
            .map(|a| (a.lsn, a.plan.tombstones.len() as u64))
            .collect())
    }

    /// What retention may drop now, for a shard of `live_points` points:
    /// see [`crate::oplog::retention_cut`] and [`super::retain_budget`].
    pub(super) fn retention(&self, live_points: usize) -> Retention {
        Retention {
            budget: super::retain_budget(&self.config, self.config.vector_bytes(live_points as u64)),
            keep_above: self.retain_floor.load(Ordering::Acquire),
            held: crate::oplog::Held {
                above: self.held_floor.load(Ordering::Acquire),
                budget: self.config.hold_bytes,
            },
        }
    }

    /// Mirrors a committed plan in memory; returns the segments it sealed.
    fn apply_to_memory(&self, st: &mut ShardState, op: &ShardOp, plan: &Plan) -> Vec<u64> {
        let dim = self.config.dim as usize;
        if let ShardOp::Upsert(points) = op {
            for a in &plan.appends {
                let p = &points[a.point];
                let cells = st.schema.cells(p.payload.as_deref());
                let schema = &st.schema;
                let seg = st
                    .segments
                    .entry(a.at.segment)
                    .or_insert_with(|| Segment::growing(a.at.segment, dim).with_columns(Columns::new(schema)));
                let row = seg.push(p.id, &p.vector, &cells);
                debug_assert_eq!(row, a.at.row);
            }
        }
        let mut emptied = Vec::new();
        for (at, _) in &plan.tombstones {
            let unit = st.owner.get(&at.segment).copied().unwrap_or(at.segment);
            if let Some(seg) = st.segments.get_mut(&unit) {
                if let Some(row) = seg.row_of(*at) {
                    let live = seg.live_rows();
                    seg.tombstone(row);
                    if live == 1 && seg.live_rows() == 0 {
                        emptied.push(unit);
                    }
                }
            }
            // The merge that took the row over has one live row fewer.
            if let Some(m) = st.covered.get(&at.segment).copied() {
                if let Some(m) = st.merges.get_mut(&m) {
                    m.live = m.live.saturating_sub(1);
                }
            }
        }
        // Points written again faster than merges drop their old
        // segments: the vectors of a sealed segment whose rows are all
        // deleted go now.
        for unit in emptied {
            st.release_if_dead(unit);
        }
        for (id, at) in &plan.points {
            match at {
                Some(at) => st.locations.insert(*id, *at),
                None => st.locations.remove(*id),
            };
        }
        for c in &plan.sealed {
            if let Some(seg) = st.segments.get_mut(&c.segment) {
                seg.seal();
            }
        }
        let schema = &st.schema;
        st.segments
            .entry(plan.growing.segment)
            .or_insert_with(|| Segment::growing(plan.growing.segment, dim).with_columns(Columns::new(schema)));
        st.growing = plan.growing;
        st.next_segment = plan.next;
        plan.sealed.iter().map(|c| c.segment).collect()
    }
}
