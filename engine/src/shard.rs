//! One replica of one shard: the unit that is logged, applied, searched and
//! replicated primary → backups (REPLICATION.md).
//!
//! A replica has two parts that move separately:
//!
//! - its **op log**: ops with their op ids `(term, lsn)`, appended after an
//!   exact previous op id (the log-matching rule, see `oplog`) and
//!   fsynced before [`ShardReplica::append`] returns, with the durable term
//!   and term history. A suffix that is not applied yet can be truncated
//!   (reconciliation after a change of primary);
//! - its **applied state**: the segments, rows and payloads that searches,
//!   gets and infos see. [`ShardReplica::apply_through`] applies logged ops
//!   in LSN order up to an LSN the caller deems committed: plan the effect
//!   ([`crate::plan`]), commit the batch's effects and the new applied LSN
//!   to redb with one fsync, then update memory. Because sealing is part of
//!   the plan, replicas that apply the same ops seal the same segments at
//!   the same rows.
//!
//! Invariants: `applied_lsn <= last.lsn`; every logged op above the applied
//! LSN stays in the log until it is applied or truncated (retention only
//! drops applied ops, [`ShardReplica::set_retain_floor`] keeps more); an op
//! is applied only after it is durable in the log; nothing at or below the
//! applied LSN is ever truncated (such a replica is rebuilt instead).
//!
//! Concurrency:
//! - `writer` serialises everything that writes (append, truncate, apply,
//!   term raise), so a decision made under the read lock is still valid
//!   when its commit lands;
//! - the state `RwLock` is held for writing only to update memory after a
//!   commit (or to install a built index), never during an fsync, so
//!   searches keep running while a write is being persisted;
//! - locks are taken in the order writer → files → state (a build saving
//!   its index holds `files` and then takes the state lock), never the
//!   state lock before `files`;
//! - no rayon work is ever started while the state lock is held: a rayon
//!   thread waiting in a join may steal a task that takes the same lock
//!   again, which deadlocks a writer-preferring `RwLock`. Callers
//!   parallelise across (replica, query) tasks instead.
//!
//! Index builds of sealed segments go to the [`IndexBuilder`] thread; the
//! segment is searched by brute force until the built index is saved to
//! `seg-<id>.hnsw` and installed.
//!
//! **Compaction** (module `merge`): a logged [`ShardOp::Merge`] names
//! sealed segments; applying it decides, from the applied state at that
//! LSN only, a new segment id and the rows live then, in source order, and
//! records them. So every replica decides the same merged segment,
//! whatever its timing. The builder then builds the merged index over the
//! sources' vectors (pointing into their blocks, not copying them) while
//! the sources keep serving; once it is saved, the
//! merge is *installed*: the merged segment replaces its sources in
//! searches, taking over the tombstones its rows got since the merge op.
//! Rows stay where they were written (a merged segment maps its rows to
//! their stored locations), so installing changes no point's location and
//! no logical state: only which index serves which rows. *Logically* (for
//! the next merge op) a merge replaces its sources at its op; physically,
//! at its install.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};

use edgevec_proto::{
    FieldSpec, Filter, IndexSpec, IndexState, Metric, OpId, PointRecord, SegmentInfo, SegmentState, ShardInfo,
};

use crate::builder::IndexBuilder;
use crate::error::EngineError;
use crate::fsutil;
use crate::hnsw::{Expect, HnswIndex, RowVectors, SearchOptions};
use crate::idmap::IdMap;
use crate::metric::{self, Candidate};
use crate::op::ShardOp;
use crate::oplog::LogState;
use crate::payload::{Columns, Schema};
use crate::plan::{Cursor, Location};
use crate::segment::{MergedData, Segment};
use crate::store::ShardStore;

mod apply;
mod export;
mod log;
mod merge;

use merge::MergeUnit;

pub(crate) use export::import_files;

/// Default op-log budget: retention drops the oldest applied ops while the
/// log's encoded ops take more than this. The log is a second copy of
/// what it holds (the rows keep the vectors), so it is kept small, like
/// Qdrant's 32 MiB write-ahead log: a replica further behind is sent an
/// export of the shard instead of the ops.
pub const OPLOG_RETAIN_BYTES: u64 = 32 * 1024 * 1024;

/// Default share of a shard's vector bytes (live points × dim × 4, in
/// percent) its op log keeps, within [`OPLOG_RETAIN_BYTES`]: a replica
/// that missed more than that is about as quick to catch up from an
/// export of the shard as from the ops, so a larger log only takes disk.
pub const OPLOG_RETAIN_PERCENT: u32 = 10;

/// The share never keeps the log below this (a small shard's log still
/// covers a short absence), nor above the byte budget.
pub const OPLOG_RETAIN_MIN_BYTES: u64 = 1024 * 1024;

/// Default bytes a replica's op log may grow to while it holds ops for a
/// replica away from the in-sync set (a node restarted, or down for a
/// while): a returning replica that missed up to about this much catches
/// up from the log, in time proportional to what it missed, instead of
/// receiving an export of the whole shard. Only while a replica is away;
/// the log is trimmed back to [`OPLOG_RETAIN_BYTES`] as soon as it is
/// back or gone ([`ShardReplica::trim_log`]).
pub const OPLOG_HOLD_BYTES: u64 = 256 * 1024 * 1024;

pub(crate) const STORE_FILE: &str = "shard.redb";

/// Fixed properties of a shard replica.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardConfig {
    pub shard: u32,
    pub dim: u32,
    pub metric: Metric,
    pub seal_rows: u32,
    pub index: IndexSpec,
    /// Bytes of encoded ops the op log may keep once they are applied
    /// ([`OPLOG_RETAIN_BYTES`] by default); unapplied ops are always kept.
    pub retain_bytes: u64,
    /// With `Some(p)`, the log keeps at most `p` percent of the shard's
    /// vector bytes, within `retain_bytes` and not below
    /// [`OPLOG_RETAIN_MIN_BYTES`] ([`OPLOG_RETAIN_PERCENT`] by default;
    /// see [`retain_budget`]). `None`: `retain_bytes` alone.
    pub retain_percent: Option<u32>,
    /// Bytes the op log may grow to while it holds ops for a replica
    /// away from the in-sync set ([`ShardReplica::set_held_floor`];
    /// [`OPLOG_HOLD_BYTES`] by default); below `retain_bytes` it holds
    /// nothing more.
    pub hold_bytes: u64,
    /// Payload indexes: the fields filters may use (module `payload`).
    pub fields: Vec<FieldSpec>,
}

impl ShardConfig {
    /// Bytes of the vectors of `points` points: what the op log's share
    /// is taken of ([`retain_budget`]).
    pub fn vector_bytes(&self, points: u64) -> u64 {
        points.saturating_mul(u64::from(self.dim) * 4)
    }
}

/// Bytes of applied ops the op log keeps (`retain_bytes` of `config`, or
/// less: `retain_percent` of `vector_bytes`, the shard's live vectors,
/// but not below [`OPLOG_RETAIN_MIN_BYTES`]).
pub fn retain_budget(config: &ShardConfig, vector_bytes: u64) -> u64 {
    match config.retain_percent {
        None => config.retain_bytes,
        Some(p) => {
            let share = u128::from(vector_bytes) * u128::from(p) / 100;
            let share = u64::try_from(share).unwrap_or(u64::MAX);
            config.retain_bytes.min(share.max(OPLOG_RETAIN_MIN_BYTES))
        }
    }
}

/// A consistent snapshot of a replica's log position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogStatus {
    /// Highest term accepted (durable).
    pub term: u64,
    /// Last op in the log (fsynced).
    pub last: OpId,
    /// LSN through which ops are applied.
    pub applied: u64,
    /// Oldest LSN the log still holds.
    pub first_logged: Option<u64>,
    /// `(term, first lsn)` pairs, ascending.
    pub history: Vec<(u64, u64)>,
}

struct ShardState {
    log: LogState,
    applied_lsn: u64,
    growing: Cursor,
    /// Next unused segment id (growing segments and merges).
    next_segment: u64,
    locations: IdMap,
    /// The segments searches use: sealed and growing segments not replaced
    /// by an installed merge, and installed merges.
    segments: BTreeMap<u64, Segment>,
    /// Every merge with a record: pending or installed.
    merges: BTreeMap<u64, MergeUnit>,
    /// Stored segment → the segment in `segments` that holds its rows,
    /// where that is a merge (absent: the segment itself).
    owner: HashMap<u64, u64>,
    /// Stored segment → the newest merge (pending or installed) that took
    /// its rows over.
    covered: HashMap<u64, u64>,
    /// The payload index fields and their keyword dictionaries.
    schema: Schema,
}

impl ShardState {
    /// Drops the vectors of segment `unit` (in `segments`) if its rows are
    /// all deleted ([`Segment::release_if_dead`]) and no pending merge
    /// takes over rows it serves (the merge reads the rows live at its op).
    fn release_if_dead(&mut self, unit: u64) {
        let read_by_merge = match self.merges.get(&unit) {
            Some(m) => m
                .covers
                .iter()
                .any(|c| self.covered.get(c).is_some_and(|by| *by != unit)),
            None => self.covered.contains_key(&unit),
        };
        if !read_by_merge {
            if let Some(seg) = self.segments.get_mut(&unit) {
                seg.release_if_dead();
            }
        }
    }

    /// The segment in `segments` holding the row stored at `at`, and the
    /// row's position there.
    fn find(&self, at: Location) -> Option<(&Segment, u32)> {
        let unit = self.owner.get(&at.segment).copied().unwrap_or(at.segment);
        let seg = self.segments.get(&unit)?;
        Some((seg, seg.row_of(at)?))
    }

    /// Whether the row stored at `at`, holding point `id`, is its live row.
    fn is_live(&self, at: Location, id: u64) -> bool {
        self.locations.get(id) == Some(at)
    }
}

/// One shard replica: its redb file, its segments and their indexes.
pub struct ShardReplica {
    config: ShardConfig,
    dir: PathBuf,
    store: ShardStore,
    writer: Mutex<()>,
    state: RwLock<ShardState>,
    /// See [`ShardReplica::set_retain_floor`]; not persisted.
    retain_floor: AtomicU64,
    /// See [`ShardReplica::set_held_floor`]; not persisted.
    held_floor: AtomicU64,
    builder: Arc<IndexBuilder>,
    this: Weak<ShardReplica>,
    /// Set when the replica is dropped: pending builds skip saving.
    retired: AtomicBool,
    /// Held by a build while it checks `retired` and writes its index file,
    /// and by [`ShardReplica::retire`]: once that returns, nothing of this
    /// replica writes into its directory, which an import may have handed
    /// to a new replica already.
    files: Mutex<()>,
    /// When the last upsert or delete was appended (or the replica
    /// opened): what makes a shard quiet for the compaction policy.
    last_write: Mutex<std::time::Instant>,
    /// Held (cloned) by every search from before it looks at the segments
    /// until it has read its hits' payloads; replaced by a reclaim, which
    /// waits for the clones of the one it replaced to go ([`Pin`]).
    readers: Mutex<Arc<()>>,
    /// A thread waits for the shard to be quiet to compact its file.
    compact_scheduled: AtomicBool,
    /// Ops appended by this process and not applied yet, as decoded.
    unapplied: Mutex<Unapplied>,
    /// Called on the builder thread each time a merge's build has made the
    /// rows added so far serve searches (tests look at the replica then).
    #[cfg(test)]
    on_prefix: Mutex<Option<PrefixHook>>,
}

#[cfg(test)]
type PrefixHook = Box<dyn FnMut(&ShardReplica) + Send>;

/// Most encoded bytes of ops [`Unapplied`] holds per replica; ops beyond it
/// are read back from the log when applied.
const UNAPPLIED_BYTES: usize = 32 * 1024 * 1024;

/// Decoded ops appended and not applied yet, by LSN, so that the apply does
/// not read back and decode the records the append has just written (a
/// record can be larger than the shard file's page cache). Always a subset
/// of the log above the applied LSN, with the op at each LSN the log holds:
/// filled by the append, emptied by the apply, cut by a truncation; an
/// apply that does not find all its ops here reads them from the log.
#[derive(Default)]
struct Unapplied {
    ops: BTreeMap<u64, (OpId, ShardOp, usize)>,
    bytes: usize,
}

impl Unapplied {
    fn add(&mut self, id: OpId, op: ShardOp, bytes: usize) {
        if self.bytes + bytes <= UNAPPLIED_BYTES {
            self.bytes += bytes;
            if let Some((_, _, old)) = self.ops.insert(id.lsn, (id, op, bytes)) {
                self.bytes -= old;
            }
        }
    }

    /// Removes and returns the ops at or below `through`; `Some` only when
    /// they include every LSN of `from ..= through`.
    fn take(&mut self, from: u64, through: u64) -> Option<Vec<(OpId, ShardOp)>> {
        let rest = self.ops.split_off(&(through + 1));
        let taken = std::mem::replace(&mut self.ops, rest);
        self.bytes -= taken.values().map(|(_, _, b)| b).sum::<usize>();
        let ops: Vec<(OpId, ShardOp)> = taken
            .into_values()
            .filter(|(id, _, _)| id.lsn >= from)
            .map(|(id, op, _)| (id, op))
            .collect();
        (ops.len() as u64 == through + 1 - from).then_some(ops)
    }

    /// Forgets the ops above `lsn` (truncated from the log).
    fn cut_after(&mut self, lsn: u64) {
        let dropped = self.ops.split_off(&(lsn + 1));
        self.bytes -= dropped.values().map(|(_, _, b)| b).sum::<usize>();
    }
}

impl ShardReplica {
    /// Opens (or creates) the replica stored in `dir`, restoring its log
    /// position and applied state from redb and loading saved indexes;
    /// sealed segments without a valid index file are queued for a
    /// rebuild. Logged ops above the applied LSN stay unapplied.
    pub fn open(dir: &Path, config: ShardConfig, builder: Arc<IndexBuilder>) -> Result<Arc<ShardReplica>, EngineError> {
        fsutil::create_dir_durable(dir)?;
        remove_tmp_files(dir)?;
        let (store, loaded) = ShardStore::open(&dir.join(STORE_FILE), config.shard, config.dim, |points| {
            retain_budget(&config, config.vector_bytes(points))
        })?;
        // redb fsyncs the file's contents; the entry of a new file lives in
        // the directory.
        fsutil::sync_dir(dir)?;
        let dim = config.dim as usize;
        let corrupt = |m: String| EngineError::corrupt(dir.display().to_string(), m);

        let mut merges = merge::restore(loaded.merges, &loaded.points);
        let mut owner = HashMap::new();
        for (id, m) in merges.iter().filter(|(_, m)| m.installed) {
            for c in &m.covers {
                owner.insert(*c, *id);
            }
        }
        let covered = merge::covered(&merges);

        let stored_max = loaded.segments.iter().map(|(id, _)| *id).max().unwrap_or(0);
        let mut schema = Schema::new(&config.fields);
        let mut columns = |locations: &mut dyn Iterator<Item = Location>| -> Result<Columns, EngineError> {
            let mut cols = Columns::new(&schema);
            if schema.fields().is_empty() {
                return Ok(cols);
            }
            let locations: Vec<Location> = locations.collect();
            for chunk in locations.chunks(4096) {
                for payload in store.payloads(chunk)? {
                    cols.push(&schema.cells(payload.as_deref()));
                }
            }
            cols.shrink();
            Ok(cols)
        };
        let mut segments = BTreeMap::new();
        let mut to_build = Vec::new();
        for (id, rec) in loaded.segments {
            if owner.contains_key(&id) {
                // Served by an installed merge.
                continue;
            }
            let seg = match rec.state {
                SegmentState::Growing => {
                    let (ids, vectors) = store.segment_rows(id, dim)?;
                    Segment::growing_with(id, dim, ids, vectors)
                }
                SegmentState::Sealed => {
                    let expect = Expect {
                        segment: id,
                        metric: config.metric,
                        dim,
                        rows: rec.rows as usize,
                    };
                    match load_index(dir, &store, expect, &own_rows(id))? {
                        Some((index, ids)) => Segment::indexed(id, dim, ids, Arc::new(index)),
                        None => {
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
            let mut rows = (0..seg.rows() as u32).map(|row| Location { segment: id, row });
            let cols = columns(&mut rows)?;
            segments.insert(id, seg.with_columns(cols));
        }
        for (&id, m) in merges.iter_mut().filter(|(_, m)| m.installed && !m.rows.is_empty()) {
            // The segment holds its rows from now on.
            let rows = std::mem::take(&mut m.rows);
            let (locations, ids): (Vec<Location>, Vec<u64>) = rows.iter().copied().unzip();
            let expect = Expect {
                segment: id,
                metric: config.metric,
                dim,
                rows: locations.len(),
            };
            let at = |rows: std::ops::Range<u32>| locations[rows.start as usize..rows.end as usize].to_vec();
            let data = match load_index(dir, &store, expect, &at)?.filter(|(_, file_ids)| *file_ids == ids) {
                Some((index, _)) => MergedData::Index(Arc::new(index)),
                None => {
                    to_build.push(id);
                    MergedData::Vectors(store.vectors_at(&locations, dim)?)
                }
            };
            let cols = columns(&mut locations.iter().copied())?;
            segments.insert(
                id,
                Segment::merged(id, dim, ids, locations.iter().copied(), data).with_columns(cols),
            );
        }
        for at in loaded.tombstones {
            let unit = owner.get(&at.segment).copied();
            let found = segments.get_mut(&unit.unwrap_or(at.segment)).and_then(|seg| {
                let row = seg.row_of(at)?;
                seg.tombstone(row);
                Some(())
            });
            // A row dead before its segment was merged is in no segment.
            if found.is_none() && unit.is_none() {
                return Err(corrupt(format!("tombstone for missing row {at:?}")));
            }
        }
        // Ids are never reused: the newest segment or merge always keeps
        // its record (a merge record goes only when a newer one replaces it).
        let next_segment = merges.keys().copied().max().unwrap_or(0).max(stored_max) + 1;
        let pending: Vec<u64> = merges
            .iter()
            .filter(|(_, m)| !m.installed && m.superseded_by.is_none())
            .map(|(id, _)| *id)
            .collect();
        remove_stale_index_files(dir, |id| segments.contains_key(&id) || pending.contains(&id))?;
        let meta = loaded.meta;
        let growing_rows = segments
            .get(&meta.growing)
            .filter(|s| s.state() == SegmentState::Growing)
            .ok_or_else(|| corrupt(format!("growing segment {} is missing", meta.growing)))?
            .rows();
        if meta.applied_lsn > meta.last_lsn {
            return Err(corrupt(format!(
                "applied LSN {} is past the last logged op {}",
                meta.applied_lsn,
                meta.last()
            )));
        }
        let mut state = ShardState {
            log: LogState {
                term: meta.term,
                last: meta.last(),
                history: loaded.history,
                first_logged: loaded.first_logged,
            },
            applied_lsn: meta.applied_lsn,
            growing: Cursor {
                segment: meta.growing,
                rows: growing_rows as u32,
            },
            next_segment: next_segment.max(meta.growing + 1),
            locations: loaded.points,
            segments,
            merges,
            owner,
            covered,
            schema,
        };
        // Segments whose rows all died before the restart, as at the apply
        // that killed their last row (`apply`).
        let ids: Vec<u64> = state.segments.keys().copied().collect();
        for id in ids {
            state.release_if_dead(id);
        }
        let replica = Arc::new_cyclic(|this| ShardReplica {
            config,
            dir: dir.to_owned(),
            store,
            writer: Mutex::new(()),
            state: RwLock::new(state),
            retain_floor: AtomicU64::new(u64::MAX),
            held_floor: AtomicU64::new(u64::MAX),
            builder,
            this: this.clone(),
            retired: AtomicBool::new(false),
            files: Mutex::new(()),
            last_write: Mutex::new(std::time::Instant::now()),
            readers: Mutex::new(Arc::new(())),
            compact_scheduled: AtomicBool::new(false),
            #[cfg(test)]
            on_prefix: Mutex::new(None),
            unapplied: Mutex::new(Unapplied::default()),
        });
        for id in to_build {
            replica.queue_build(id);
        }
        for id in pending {
            replica.queue_merge(id);
        }
        if !replica.store.pending_reclaims()?.is_empty() {
            replica.queue_reclaim();
        }
        Ok(replica)
    }

    pub fn shard(&self) -> u32 {
        self.config.shard
    }

    pub fn config(&self) -> &ShardConfig {
        &self.config
    }

    /// Highest term this replica has accepted (durable); 0 for a new one.
    pub fn term(&self) -> u64 {
        self.read().log.term
    }

    /// Last op in the log (fsynced); `OpId::ZERO` when nothing was ever
    /// logged. Retention does not move it; a truncation does.
    pub fn last_op(&self) -> OpId {
        self.read().log.last
    }

    /// LSN through which ops are applied (searchable); 0: none.
    pub fn applied_lsn(&self) -> u64 {
        self.read().applied_lsn
    }

    /// `(term, first lsn)` pairs, ascending; durable; never shortened by
    /// retention.
    pub fn term_history(&self) -> Vec<(u64, u64)> {
        self.read().log.history.clone()
    }

    /// The op id at `lsn` as the term history names it, for
    /// `1 <= lsn <= last_op().lsn` (`None` outside); `OpId::ZERO` for 0.
    /// Works for ops retention has dropped.
    pub fn op_id_at(&self, lsn: u64) -> Option<OpId> {
        self.read().log.op_id_at(lsn)
    }

    /// Oldest LSN the op log still holds (`None`: empty log).
    pub fn first_logged_lsn(&self) -> Option<u64> {
        self.read().log.first_logged
    }

    /// Term, last op, applied LSN, first logged LSN and history, read
    /// together.
    pub fn log_status(&self) -> LogStatus {
        let st = self.read();
        LogStatus {
            term: st.log.term,
            last: st.log.last,
            applied: st.applied_lsn,
            first_logged: st.log.first_logged,
            history: st.log.history.clone(),
        }
    }

    /// Hands the build of `segment`'s index to the builder thread.
    fn queue_build(&self, segment: u64) {
        let this = self.this.clone();
        let (metric, dim, params) = (self.config.metric, self.config.dim as usize, self.config.index);
        let path = index_path(&self.dir, segment);
        // A segment a merge took out of searches (rows written faster than
        // builds keep up), or whose rows are all deleted, needs no index,
        // and must not leave a file.
        let serves = move |s: &ShardReplica| {
            s.read()
                .segments
                .get(&segment)
                .is_some_and(|seg| seg.index_state() == IndexState::Building)
        };
        self.builder.submit(move || {
            // The vectors are taken when the build starts, not when it is
            // queued: a queued job must not keep the vectors of a segment
            // merged away meanwhile in memory (a burst of rewrites queues
            // dozens of builds behind the running one).
            let taken = this.upgrade().and_then(|s| {
                if s.retired.load(Ordering::Acquire) {
                    return None;
                }
                let st = s.read();
                let seg = st.segments.get(&segment)?;
                seg.pending_build().map(|v| (v, seg.ids().to_vec()))
            });
            let Some(((vectors, progress), ids)) = taken else {
                return;
            };
            // Called off once the segment no longer waits for it (merged
            // away, its rows all deleted, or the replica dropped).
            let wanted = || {
                this.upgrade()
                    .is_some_and(|s| !s.retired.load(Ordering::Acquire) && serves(&s))
            };
            let index = match HnswIndex::build_while(metric, dim, RowVectors::One(vectors), params, &progress, wanted) {
                Ok(Some(index)) => Arc::new(index),
                Ok(None) => {
                    tracing::debug!(segment, "index build called off: the segment no longer needs it");
                    return;
                }
                Err(e) => {
                    tracing::error!(error = %e, segment, "index build failed; the segment stays on brute force until the next open");
                    return;
                }
            };
            let Some(shard) = this.upgrade() else { return };
            let _files = shard.files.lock().expect("shard files lock");
            if shard.retired.load(Ordering::Acquire) || !serves(&shard) {
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

    /// Makes every applied op durable (applies are not fsynced each).
    pub fn flush(&self) -> Result<(), EngineError> {
        let _writer = self.writer.lock().expect("shard writer lock");
        self.store.flush()
    }

    /// Marks the replica as dropped: queued builds will not write files.
    /// Waits for an index file being saved right now, so that nothing of
    /// this replica writes into its directory after this returns.
    pub fn retire(&self) {
        let _files = self.files.lock().expect("shard files lock");
        self.retired.store(true, Ordering::Release);
    }

    /// Keeps the rows a search may find from being reclaimed until the
    /// pin is dropped: taken before a search looks at the segments, held
    /// until its hits' payloads are read.
    pub fn pin(&self) -> Pin {
        Pin(self.readers.lock().expect("shard readers lock").clone())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, ShardState> {
        self.state.read().expect("shard state lock")
    }

    /// Live points with the given ids, aligned with `ids` (`None`: absent).
    pub fn get(&self, ids: &[u64]) -> Result<Vec<Option<PointRecord>>, EngineError> {
        // A point replaced meanwhile: its row stays until the payload is read.
        let _pin = self.pin();
        let found: Vec<Option<(Location, Vec<f32>)>> = {
            let st = self.read();
            ids.iter()
                .map(|id| {
                    let at = st.locations.get(*id)?;
                    let (seg, row) = st.find(at)?;
                    Some((at, seg.vector(row).to_vec()))
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

    /// The best `k` live points for one validated (normalised) query that
    /// pass `filter` (if any), best first, over every segment. A filter on
    /// a field without a payload index is refused.
    pub fn search(
        &self,
        query: &[f32],
        k: usize,
        opts: SearchOptions,
        filter: Option<&Filter>,
    ) -> Result<Vec<Candidate>, EngineError> {
        let metric = self.config.metric;
        let st = self.read();
        let compiled = filter.map(|f| st.schema.compile(f)).transpose()?;
        Ok(metric::merge(
            metric,
            k,
            st.segments
                .values()
                .map(|s| s.search(metric, query, k, opts, compiled.as_ref())),
        ))
    }

    /// Live points that pass `filter`.
    pub fn count(&self, filter: &Filter) -> Result<u64, EngineError> {
        let st = self.read();
        let compiled = st.schema.compile(filter)?;
        Ok(st
            .segments
            .values()
            .map(|s| s.passing_ids(&compiled).count() as u64)
            .sum())
    }

    /// Ids of the live points that pass `filter`, ascending.
    pub fn ids_matching(&self, filter: &Filter) -> Result<Vec<u64>, EngineError> {
        let st = self.read();
        let compiled = st.schema.compile(filter)?;
        let mut ids: Vec<u64> = st.segments.values().flat_map(|s| s.passing_ids(&compiled)).collect();
        ids.sort_unstable();
        Ok(ids)
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

    /// Bytes of this replica's files on disk (store, index files).
    pub fn disk_bytes(&self) -> u64 {
        std::fs::read_dir(&self.dir)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok()?.metadata().ok())
                    .filter(|m| m.is_file())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    }

    /// The index builds of this replica under way, merges included:
    /// segment, rows in its graph so far, rows.
    pub fn index_builds(&self) -> Vec<(u64, u64, u64)> {
        let st = self.read();
        let sealed = st
            .segments
            .values()
            .filter_map(|s| s.build_progress().map(|done| (s.id(), done, s.rows() as u64)));
        let merges = st
            .merges
            .iter()
            .filter(|(_, m)| m.is_pending())
            .map(|(id, m)| (*id, m.progress.load(Ordering::Relaxed), m.rows.len() as u64));
        sealed.chain(merges).collect()
    }

    /// Whether every sealed segment has its index installed and every
    /// merge is installed.
    pub fn indexes_ready(&self) -> bool {
        let st = self.read();
        st.segments.values().all(|s| s.index_state() != IndexState::Building)
            && !st.merges.values().any(|m| m.is_pending())
    }
}

/// See [`ShardReplica::pin`].
pub struct Pin(#[allow(dead_code)] Arc<()>);

/// Where the index of `segment` is saved.
pub fn index_path(dir: &Path, segment: u64) -> PathBuf {
    dir.join(format!("seg-{segment}.hnsw"))
}

/// The saved index of a segment whose rows are stored at `locations`, if
/// there is a usable one (an unusable file is reported and left for the
/// rebuild to replace). The vectors come from the shard file; failing to
/// read them is an error, not a reason to rebuild.
fn load_index(
    dir: &Path,
    store: &ShardStore,
    expect: Expect,
    locations: &dyn Fn(std::ops::Range<u32>) -> Vec<Location>,
) -> Result<Option<(HnswIndex, Vec<u64>)>, EngineError> {
    let path = index_path(dir, expect.segment);
    if !path.exists() {
        return Ok(None);
    }
    let mut store_failed = None;
    let mut vectors = |rows: std::ops::Range<u32>| {
        store.vectors_at(&locations(rows), expect.dim).inspect_err(|e| {
            store_failed = Some(e.to_string());
        })
    };
    match HnswIndex::load(&path, expect, &mut vectors) {
        Ok(found) => Ok(Some(found)),
        Err(e) if store_failed.is_some() => Err(e),
        Err(e) => {
            tracing::warn!(error = %e, "index file unusable, rebuilding");
            Ok(None)
        }
    }
}

/// The locations of rows `rows` of a segment that stores its own rows.
fn own_rows(segment: u64) -> impl Fn(std::ops::Range<u32>) -> Vec<Location> {
    move |rows| rows.map(|row| Location { segment, row }).collect()
}

/// Removes the index files of segments nothing serves any more (their
/// rows are served by an installed merge): an index is derived data, and
/// these are provably unused.
fn remove_stale_index_files(dir: &Path, keep: impl Fn(u64) -> bool) -> Result<(), EngineError> {
    let entries = std::fs::read_dir(dir).map_err(|e| EngineError::io(dir, e))?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let segment = name
            .to_str()
            .and_then(|n| n.strip_prefix("seg-")?.strip_suffix(".hnsw")?.parse::<u64>().ok());
        if let Some(id) = segment.filter(|id| !keep(*id)) {
            tracing::info!(segment = id, "removing the index of a merged-away segment");
            let _ = std::fs::remove_file(entry.path());
        }
    }
    Ok(())
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
mod filter_tests;
#[cfg(test)]
mod tests;
