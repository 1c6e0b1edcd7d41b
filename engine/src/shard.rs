//! One replica of one shard: the unit that is written, searched and (later)
//! replicated primary → backups.
//!
//! A replica applies [`ShardOp`]s in strict LSN order (1, 2, 3, ...). Each
//! apply is: plan the effect ([`crate::plan`]), commit op + effect + new
//! applied LSN to the shard's own redb file with fsync, then update memory.
//! Because sealing is part of the plan, replicas that apply the same ops
//! seal the same segments at the same LSN.
//!
//! Concurrency:
//! - `writer` serialises applies, so a plan made under the read lock is
//!   still valid when its commit lands;
//! - the state `RwLock` is held for writing only to update memory after a
//!   commit (or to install a built index), never during the fsync, so
//!   searches keep running while a write is being persisted;
//! - no rayon work is ever started while the state lock is held: a rayon
//!   thread waiting in a join may steal a task that takes the same lock
//!   again, which deadlocks a writer-preferring `RwLock`. Callers
//!   parallelise across (shard, query) tasks instead.
//!
//! Index builds of sealed segments go to the [`IndexBuilder`] thread; the
//! segment is searched by brute force until the built index is saved to
//! `seg-<id>.hnsw` and installed.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};

use edgevec_proto::{IndexState, Metric, PointRecord, SegmentInfo, SegmentState, ShardInfo};

use crate::builder::IndexBuilder;
use crate::error::EngineError;
use crate::fsutil;
use crate::hnsw::{Expect, HnswIndex, IndexParams};
use crate::metric::{self, Candidate};
use crate::op::ShardOp;
use crate::plan::{self, Cursor, Location, Plan};
use crate::segment::Segment;
use crate::store::{ShardMetaV1, ShardStore};

/// Ops kept in the op log for catch-up of lagging replicas.
pub const OPLOG_RETAIN_OPS: u64 = 100_000;

const STORE_FILE: &str = "shard.redb";

/// Fixed properties of a shard replica.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ShardConfig {
    pub shard: u32,
    pub dim: u32,
    pub metric: Metric,
    pub seal_rows: u32,
    pub index: IndexParams,
    /// How many of the newest ops the op log keeps.
    pub retain_ops: u64,
}

struct ShardState {
    applied_lsn: u64,
    growing: Cursor,
    locations: HashMap<u64, Location>,
    segments: BTreeMap<u64, Segment>,
}

/// One shard replica: its redb file, its segments and their indexes.
pub struct ShardReplica {
    config: ShardConfig,
    dir: PathBuf,
    store: ShardStore,
    writer: Mutex<()>,
    state: RwLock<ShardState>,
    builder: Arc<IndexBuilder>,
    this: Weak<ShardReplica>,
    /// Set when the collection is dropped: pending builds skip saving.
    retired: AtomicBool,
}

impl ShardReplica {
    /// Opens (or creates) the replica stored in `dir`, restoring memory from
    /// redb and loading saved indexes; sealed segments without a valid index
    /// file are queued for a rebuild.
    pub fn open(dir: &Path, config: ShardConfig, builder: Arc<IndexBuilder>) -> Result<Arc<ShardReplica>, EngineError> {
        fsutil::create_dir_durable(dir)?;
        remove_tmp_files(dir)?;
        let (store, loaded) = ShardStore::open(&dir.join(STORE_FILE), config.shard, config.dim)?;
        // redb fsyncs the file's contents; the entry of a new file lives in
        // the directory.
        fsutil::sync_dir(dir)?;
        let dim = config.dim as usize;
        let corrupt = |m: String| EngineError::corrupt(dir.display().to_string(), m);

        let mut segments = BTreeMap::new();
        let mut to_build = Vec::new();
        for (id, rec) in loaded.segments {
            let seg = match rec.state {
                SegmentState::Growing => {
                    let (ids, vectors) = store.segment_rows(id, dim)?;
                    Segment::growing_with(id, dim, ids, vectors)
                }
                SegmentState::Sealed => {
                    let path = index_path(dir, id);
                    let expect = Expect {
                        segment: id,
                        metric: config.metric,
                        dim,
                        rows: rec.rows as usize,
                    };
                    match path.exists().then(|| HnswIndex::load(&path, expect)) {
                        Some(Ok((index, ids))) => Segment::indexed(id, dim, ids, Arc::new(index)),
                        other => {
                            if let Some(Err(e)) = other {
                                tracing::warn!(error = %e, "index file unusable, rebuilding");
                            }
                            let (ids, vectors) = store.segment_rows(id, dim)?;
                            if ids.len() != rec.rows as usize {
                                return Err(corrupt(format!(
                                    "sealed segment {id} has {} rows, its record says {}",
                                    ids.len(),
                                    rec.rows
                                )));
                            }
                            to_build.push(id);
                            Segment::sealed(id, dim, ids, vectors)
                        }
                    }
                }
            };
            segments.insert(id, seg);
        }
        for at in loaded.tombstones {
            match segments.get_mut(&at.segment) {
                Some(seg) if (at.row as usize) < seg.rows() => seg.tombstone(at.row),
                _ => return Err(corrupt(format!("tombstone for missing row {at:?}"))),
            }
        }
        let growing_rows = segments
            .get(&loaded.meta.growing)
            .filter(|s| s.state() == SegmentState::Growing)
            .ok_or_else(|| corrupt(format!("growing segment {} is missing", loaded.meta.growing)))?
            .rows();
        let state = ShardState {
            applied_lsn: loaded.meta.applied_lsn,
            growing: Cursor {
                segment: loaded.meta.growing,
                rows: growing_rows as u32,
            },
            locations: loaded.points,
            segments,
        };
        let replica = Arc::new_cyclic(|this| ShardReplica {
            config,
            dir: dir.to_owned(),
            store,
            writer: Mutex::new(()),
            state: RwLock::new(state),
            builder,
            this: this.clone(),
            retired: AtomicBool::new(false),
        });
        for id in to_build {
            replica.queue_build(id);
        }
        Ok(replica)
    }

    pub fn shard(&self) -> u32 {
        self.config.shard
    }

    pub fn config(&self) -> &ShardConfig {
        &self.config
    }

    /// LSN of the last op applied (0: none).
    pub fn applied_lsn(&self) -> u64 {
        self.read().applied_lsn
    }

    /// Applies op `lsn`, which must be exactly `applied_lsn() + 1`. Returns
    /// once the op is durable on disk.
    pub fn apply(&self, lsn: u64, op: &ShardOp) -> Result<(), EngineError> {
        let _writer = self.writer.lock().expect("shard writer lock");
        self.apply_locked(lsn, op)
    }

    /// Primary path: applies `op` at the next LSN and returns that LSN.
    pub fn append(&self, op: &ShardOp) -> Result<u64, EngineError> {
        let _writer = self.writer.lock().expect("shard writer lock");
        let lsn = self.read().applied_lsn + 1;
        self.apply_locked(lsn, op)?;
        Ok(lsn)
    }

    fn apply_locked(&self, lsn: u64, op: &ShardOp) -> Result<(), EngineError> {
        self.check_op(op)?;
        let (plan, meta) = {
            let st = self.read();
            if lsn != st.applied_lsn + 1 {
                return Err(EngineError::LsnOutOfOrder {
                    shard: self.config.shard,
                    expected: st.applied_lsn + 1,
                    got: lsn,
                });
            }
            let plan = plan::plan(
                op,
                |id| st.locations.get(&id).copied(),
                st.growing,
                self.config.seal_rows,
            );
            let meta = ShardMetaV1 {
                shard: self.config.shard,
                dim: self.config.dim,
                applied_lsn: st.applied_lsn,
                growing: st.growing.segment,
            };
            (plan, meta)
        };
        self.store.commit(lsn, op, &plan, meta, self.config.retain_ops)?;
        let sealed = {
            let mut st = self.state.write().expect("shard state lock");
            self.apply_to_memory(&mut st, lsn, op, &plan)
        };
        for segment in sealed {
            self.queue_build(segment);
        }
        Ok(())
    }

    /// Ops come validated from the primary; this guards the invariants the
    /// in-memory segments rely on (a wrong length would corrupt rows).
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

    /// Mirrors a committed plan in memory; returns the segments it sealed.
    fn apply_to_memory(&self, st: &mut ShardState, lsn: u64, op: &ShardOp, plan: &Plan) -> Vec<u64> {
        let dim = self.config.dim as usize;
        if let ShardOp::Upsert(points) = op {
            for a in &plan.appends {
                let p = &points[a.point];
                let seg = st
                    .segments
                    .entry(a.at.segment)
                    .or_insert_with(|| Segment::growing(a.at.segment, dim));
                let row = seg.push(p.id, &p.vector);
                debug_assert_eq!(row, a.at.row);
            }
        }
        for (at, _) in &plan.tombstones {
            if let Some(seg) = st.segments.get_mut(&at.segment) {
                seg.tombstone(at.row);
            }
        }
        for (id, at) in &plan.points {
            match at {
                Some(at) => st.locations.insert(*id, *at),
                None => st.locations.remove(id),
            };
        }
        for c in &plan.sealed {
            if let Some(seg) = st.segments.get_mut(&c.segment) {
                seg.seal();
            }
        }
        st.segments
            .entry(plan.growing.segment)
            .or_insert_with(|| Segment::growing(plan.growing.segment, dim));
        st.growing = plan.growing;
        st.applied_lsn = lsn;
        plan.sealed.iter().map(|c| c.segment).collect()
    }

    /// Hands the build of `segment`'s index to the builder thread.
    fn queue_build(&self, segment: u64) {
        let Some((vectors, ids)) = self
            .read()
            .segments
            .get(&segment)
            .and_then(|s| s.pending_build().map(|v| (v, s.ids().to_vec())))
        else {
            return;
        };
        let this = self.this.clone();
        let (metric, dim, params) = (self.config.metric, self.config.dim as usize, self.config.index);
        let path = index_path(&self.dir, segment);
        self.builder.submit(move || {
            if this.upgrade().is_none_or(|s| s.retired.load(Ordering::Acquire)) {
                return;
            }
            let index = Arc::new(HnswIndex::build(metric, dim, &vectors, params));
            drop(vectors);
            let Some(shard) = this.upgrade() else { return };
            if shard.retired.load(Ordering::Acquire) {
                return;
            }
            // Save before installing: an index that is Ready in memory is
            // also on disk (unless saving failed, then the next open
            // rebuilds it).
            if let Err(e) = index.save(&path, segment, &ids) {
                tracing::warn!(error = %e, segment, "could not save index; it will be rebuilt at next open");
            }
            let mut st = shard.state.write().expect("shard state lock");
            if let Some(seg) = st.segments.get_mut(&segment) {
                seg.install_index(index);
            }
        });
    }

    /// Marks the replica as dropped: queued builds will not write files.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Release);
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, ShardState> {
        self.state.read().expect("shard state lock")
    }

    /// Live points with the given ids, aligned with `ids` (`None`: absent).
    pub fn get(&self, ids: &[u64]) -> Result<Vec<Option<PointRecord>>, EngineError> {
        let found: Vec<Option<(Location, Vec<f32>)>> = {
            let st = self.read();
            ids.iter()
                .map(|id| {
                    let at = *st.locations.get(id)?;
                    let v = st.segments.get(&at.segment)?.vector(at.row).to_vec();
                    Some((at, v))
                })
                .collect()
        };
        let locations: Vec<Location> = found.iter().flatten().map(|(at, _)| *at).collect();
        let mut payloads = self.store.payloads(&locations)?.into_iter();
        Ok(ids
            .iter()
            .zip(found)
            .map(|(&id, f)| {
                f.map(|(_, vector)| PointRecord {
                    id,
                    vector,
                    payload: payloads.next().flatten(),
                })
            })
            .collect())
    }

    /// The best `k` live points for one validated (normalised) query, best
    /// first, over every segment.
    pub fn search(&self, query: &[f32], k: usize) -> Vec<Candidate> {
        let metric = self.config.metric;
        let st = self.read();
        metric::merge(metric, k, st.segments.values().map(|s| s.search(metric, query, k)))
    }

    /// Payloads of rows found by [`ShardReplica::search`], in order.
    pub fn payloads(&self, rows: &[Location]) -> Result<Vec<Option<String>>, EngineError> {
        self.store.payloads(rows)
    }

    /// Live points and applied LSN, plus one entry per segment.
    pub fn info(&self) -> (ShardInfo, Vec<SegmentInfo>) {
        let st = self.read();
        let shard = ShardInfo {
            shard: self.config.shard,
            points: st.locations.len() as u64,
            lsn: st.applied_lsn,
        };
        let segments = st.segments.values().map(|s| s.info(self.config.shard)).collect();
        (shard, segments)
    }

    /// Whether every sealed segment has its index installed.
    pub fn indexes_ready(&self) -> bool {
        self.read()
            .segments
            .values()
            .all(|s| s.index_state() != IndexState::Building)
    }

    /// Up to `max` logged ops after `lsn`, for catch-up of another replica.
    pub fn ops_after(&self, lsn: u64, max: usize) -> Result<Vec<(u64, ShardOp)>, EngineError> {
        self.store.ops_after(lsn, max)
    }

    /// Oldest LSN the op log still holds (`None`: empty log).
    pub fn first_logged_lsn(&self) -> Result<Option<u64>, EngineError> {
        self.store.first_logged_lsn()
    }
}

/// Where the index of `segment` is saved.
pub fn index_path(dir: &Path, segment: u64) -> PathBuf {
    dir.join(format!("seg-{segment}.hnsw"))
}

/// Half-written files from a crash are never valid; remove them.
fn remove_tmp_files(dir: &Path) -> Result<(), EngineError> {
    let entries = std::fs::read_dir(dir).map_err(|e| EngineError::io(dir, e))?;
    for entry in entries.flatten() {
        let path = entry.path();
        if path.to_string_lossy().ends_with(fsutil::TMP_SUFFIX) {
            let _ = std::fs::remove_file(&path);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
