//! Compaction inside a replica: deciding a merge when its op applies,
//! building the merged index in the background, installing it.
//!
//! - **Decide** ([`ShardReplica::plan_merge`], at the merge op's apply,
//!   with memory exactly as of the op before): the op's sources must be
//!   current sealed segments (sealed segments no merge took over, and
//!   merges no later merge took over), distinct, and their live rows at
//!   most [`limits::MAX_MERGED_ROWS`]; otherwise the op is a no-op. The
//!   merged segment takes the shard's next segment id and the rows of its
//!   sources that are live at this op, in source order. All of that
//!   depends on the applied state only, so every replica decides alike.
//! - **Build** (builder thread): the merged index points into the vector
//!   blocks of whichever segments serve the rows now (copying only rows of
//!   blocks it would leave mostly unused, [`RowVectors::gather`]); the
//!   sources keep serving meanwhile. When the merge's first rows are all
//!   the rows of its first source, in order (the policy names a source
//!   with no deleted row, the largest, first), the build adds the other
//!   rows to that source's graph ([`GraphBuild::extend`]) instead of
//!   building a graph of every row. It adds the rows one serving segment
//!   after the other, and once all the rows a segment serves are in, the
//!   rows added so far serve searches in its place (memory only: the
//!   merge stays pending, and the segment's index file stays until the
//!   install), so the merge never holds its whole graph beside all of its
//!   sources'. A merge that a later merge has taken over before its build
//!   starts is skipped (the later one builds its rows).
//! - **Install** (under the writer lock): the index file is saved, the
//!   record marked installed (fsynced), then in memory the merged segment
//!   replaces every segment serving its rows, with the rows deleted since
//!   the op tombstoned. The files of the replaced segments' indexes go.
//! - **Reclaim** (builder thread, after the install): the rows the merge
//!   dropped (deleted or replaced before its op) leave the shard file with
//!   their payloads and tombstones
//!   ([`ShardStore::reclaim`](crate::store::ShardStore::reclaim)), once
//!   every search that began before it has read its payloads (each search
//!   holds a [`Pin`](super::Pin) from before it looks at the segments
//!   until then): such a search may have found a dropped row while it was
//!   still live. A crash before the reclaim leaves the merge queued, and
//!   the next open reclaims.
//!
//! Invariant: logically, a merge replaces its sources at its op (the next
//! merge op sees the merged segment); physically, at its install (in
//! memory, the rows its build has added already serve in place of the
//! segments that served them; on disk, nothing changes before the
//! install). Only physical state differs between replicas, and only for a
//! while.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use edgevec_proto::{limits, SegmentState};

use super::{index_path, ShardReplica, ShardState};
use crate::compaction::{self, MergePolicy, SegmentSize};
use crate::hnsw::{Block, Expect, GraphBuild, HnswIndex, RowVectors};
use crate::idmap::IdMap;
use crate::op::ShardOp;
use crate::payload::Columns;
use crate::plan::{Location, MergePlan};
use crate::segment::{MergedData, Segment};
use crate::store::MergeRecordV1;

/// A shard with no write for this long compacts its file at a lower bar
/// ([`ShardStore::compact_if_sparse`](crate::store::ShardStore::compact_if_sparse)).
const COMPACT_QUIET_AFTER: std::time::Duration = std::time::Duration::from_secs(5);

/// Rows whose vector sources a merge looks up per hold of the state lock.
const SOURCE_CHUNK: usize = 4096;

/// Runs of a merge's rows served by one segment each: (segment, end of
/// the run in the merge's rows).
type Runs = Vec<(u64, usize)>;

/// A merge with a record, in memory.
pub(super) struct MergeUnit {
    pub sources: Vec<u64>,
    pub covers: Vec<u64>,
    /// Its rows (where stored, and the point id) until it is installed
    /// (then empty, and its segment holds them) or superseded (then empty:
    /// the later merge holds them, and nothing reads a superseded merge's
    /// rows).
    pub rows: Arc<Vec<(Location, u64)>>,
    /// How many rows it has.
    pub len: u64,
    pub installed: bool,
    /// The later merge that took it over (logically), if any.
    pub superseded_by: Option<u64>,
    /// Its rows still live (kept for the policy).
    pub live: u64,
    /// The merges whose records its install removes.
    pub replaces: Vec<u64>,
    /// Rows its running build has added.
    pub progress: Arc<AtomicU64>,
}

impl MergeUnit {
    /// Waiting for its build and install (a superseded one never will).
    pub fn is_pending(&self) -> bool {
        !self.installed && self.superseded_by.is_none()
    }
}

/// The merges of a shard as its file holds them.
pub(super) fn restore(records: Vec<(u64, MergeRecordV1)>, points: &IdMap) -> BTreeMap<u64, MergeUnit> {
    let mut out: BTreeMap<u64, MergeUnit> = records
        .into_iter()
        .map(|(id, r)| {
            let live = r.rows.iter().filter(|(at, pid)| points.get(*pid) == Some(*at)).count() as u64;
            let unit = MergeUnit {
                sources: r.sources,
                covers: r.covers,
                len: r.rows.len() as u64,
                rows: Arc::new(r.rows),
                installed: r.installed,
                superseded_by: None,
                live,
                replaces: Vec::new(),
                progress: Arc::new(AtomicU64::new(0)),
            };
            (id, unit)
        })
        .collect();
    let ids: Vec<u64> = out.keys().copied().collect();
    for id in ids {
        let sources = out[&id].sources.clone();
        for s in sources {
            if let Some(m) = out.get_mut(&s) {
                m.superseded_by = Some(id);
                // An installed one's rows rebuild its segment at open.
                if !m.installed {
                    m.rows = Arc::default();
                }
            }
        }
        out.get_mut(&id).expect("listed").replaces = replaced_by(&out, id);
    }
    out
}

/// Every merge whose rows merge `id` takes over: those covering only
/// segments it covers.
fn replaced_by(merges: &BTreeMap<u64, MergeUnit>, id: u64) -> Vec<u64> {
    let covers: HashSet<u64> = merges[&id].covers.iter().copied().collect();
    merges
        .iter()
        .filter(|(other, m)| **other != id && m.covers.iter().all(|c| covers.contains(c)))
        .map(|(other, _)| *other)
        .collect()
}

/// Stored segment → the newest merge covering it.
pub(super) fn covered(merges: &BTreeMap<u64, MergeUnit>) -> HashMap<u64, u64> {
    let mut out = HashMap::new();
    // Ascending ids: a newer merge overwrites an older one.
    for (id, m) in merges {
        for c in &m.covers {
            out.insert(*c, *id);
        }
    }
    out
}

impl ShardReplica {
    /// The sealed segments a merge op may name now, with their sizes:
    /// sealed segments no merge took over, and merges no later merge took
    /// over (installed or not).
    fn mergeable(st: &ShardState) -> Vec<SegmentSize> {
        let sealed = st
            .segments
            .values()
            .filter(|s| !s.is_merged() && s.state() == SegmentState::Sealed && !st.covered.contains_key(&s.id()))
            .map(|s| SegmentSize {
                id: s.id(),
                rows: s.rows() as u64,
                live: s.live_rows() as u64,
            });
        let merged = st
            .merges
            .iter()
            .filter(|(_, m)| m.superseded_by.is_none())
            .map(|(id, m)| SegmentSize {
                id: *id,
                rows: m.len,
                live: m.live,
            });
        sealed.chain(merged).collect()
    }

    /// The merge op the compaction policy wants next, if any: for the
    /// primary to log. The shard is quiet when nothing was written to it
    /// for `policy.quiet_after` (since it opened, at the least).
    pub fn merge_proposal(&self, policy: &MergePolicy) -> Option<ShardOp> {
        let units = Self::mergeable(&self.read());
        let quiet = self.last_write.lock().expect("last write lock").elapsed() >= policy.quiet_after;
        compaction::next_merge(&units, self.config.seal_rows, policy, quiet).map(|sources| ShardOp::Merge { sources })
    }

    /// Whether segment `id` serves searches with its vectors dropped.
    #[cfg(test)]
    pub(crate) fn vectors_released(&self, id: u64) -> bool {
        self.read().segments.get(&id).is_some_and(Segment::is_released)
    }

    /// The segments (ids) searches use now, merged ones included, and
    /// the merges still waiting for their index.
    #[cfg(test)]
    pub(crate) fn merge_state(&self) -> (Vec<u64>, Vec<u64>) {
        let st = self.read();
        let pending = st
            .merges
            .iter()
            .filter(|(_, m)| m.is_pending())
            .map(|(id, _)| *id)
            .collect();
        (st.segments.keys().copied().collect(), pending)
    }

    /// Decides what `Merge { sources }` does on the state `st` (exactly the
    /// state before the op): `None` when it is a no-op.
    pub(super) fn plan_merge(st: &ShardState, sources: &[u64], next: u64) -> Option<MergePlan> {
        let mergeable: HashSet<u64> = Self::mergeable(st).iter().map(|s| s.id).collect();
        let distinct: HashSet<u64> = sources.iter().copied().collect();
        if sources.is_empty() || distinct.len() != sources.len() || !sources.iter().all(|s| mergeable.contains(s)) {
            tracing::debug!(?sources, "merge op names segments that cannot merge now; nothing to do");
            return None;
        }
        let mut covers = BTreeSet::new();
        let mut rows = Vec::new();
        for s in sources {
            match st.merges.get(s) {
                // Its segment holds the rows, in the same order (a merge
                // of deleted rows only has neither).
                Some(m) if m.installed => {
                    debug_assert!(
                        m.len == 0 || st.segments.contains_key(s),
                        "installed merge {s} has no segment"
                    );
                    covers.extend(m.covers.iter().copied());
                    if let Some(seg) = st.segments.get(s) {
                        rows.extend(
                            (0..seg.rows() as u32)
                                .map(|r| (seg.location(r), seg.ids()[r as usize]))
                                .filter(|(at, id)| st.is_live(*at, *id)),
                        );
                    }
                }
                Some(m) => {
                    covers.extend(m.covers.iter().copied());
                    rows.extend(m.rows.iter().filter(|(at, id)| st.is_live(*at, *id)));
                }
                None => {
                    let seg = &st.segments[s];
                    covers.insert(*s);
                    rows.extend(
                        (0..seg.rows() as u32)
                            .filter(|r| seg.is_live(*r))
                            .map(|r| (Location { segment: *s, row: r }, seg.ids()[r as usize])),
                    );
                }
            }
        }
        if rows.len() as u64 > limits::MAX_MERGED_ROWS {
            tracing::warn!(
                ?sources,
                rows = rows.len(),
                "merge op would make a segment too large; nothing to do"
            );
            return None;
        }
        let covers: Vec<u64> = covers.into_iter().collect();
        let covered: HashSet<u64> = covers.iter().copied().collect();
        let replaces = st
            .merges
            .iter()
            .filter(|(_, m)| m.covers.iter().all(|c| covered.contains(c)))
            .map(|(id, _)| *id)
            .collect();
        Some(MergePlan {
            id: next,
            sources: sources.to_vec(),
            covers,
            rows,
            replaces,
        })
    }

    /// Mirrors a committed merge decision in memory. Returns whether its
    /// build is to be queued, and the segments whose index files are to go
    /// (a merge of deleted rows only is installed at once: it has no index
    /// to build). The caller removes the files once it has released the
    /// state lock (a build saving a file holds the files lock and waits for
    /// the state lock).
    pub(super) fn apply_merge(st: &mut ShardState, m: &MergePlan) -> (bool, Vec<u64>) {
        let live = m.rows.len() as u64;
        for s in &m.sources {
            if let Some(src) = st.merges.get_mut(s) {
                src.superseded_by = Some(m.id);
                src.rows = Arc::default();
            }
        }
        for c in &m.covers {
            st.covered.insert(*c, m.id);
        }
        st.merges.insert(
            m.id,
            MergeUnit {
                sources: m.sources.clone(),
                covers: m.covers.clone(),
                rows: Arc::new(m.rows.clone()),
                len: live,
                installed: false,
                superseded_by: None,
                live,
                replaces: m.replaces.clone(),
                progress: Arc::new(AtomicU64::new(0)),
            },
        );
        if m.rows.is_empty() {
            (false, Self::install_in_memory(st, m.id, None))
        } else {
            (true, Vec::new())
        }
    }

    /// Makes merge `id` serve its rows: removes every segment serving them
    /// (the rows its build already serves among them) and the merges it
    /// replaces, inserts `seg`. Returns the ids of the segments whose index
    /// files are to go: every segment and merge it replaces, whether
    /// searches still used it or a build had taken it out of them already.
    fn install_in_memory(st: &mut ShardState, id: u64, seg: Option<Segment>) -> Vec<u64> {
        let (covers, replaces) = {
            let m = &st.merges[&id];
            (m.covers.clone(), m.replaces.clone())
        };
        let mut removed = BTreeSet::new();
        for c in &covers {
            let unit = st.owner.insert(*c, id).unwrap_or(*c);
            st.segments.remove(&unit);
            removed.insert(unit);
            removed.insert(*c);
        }
        for r in &replaces {
            st.merges.remove(r);
            removed.insert(*r);
        }
        removed.remove(&id);
        if let Some(seg) = seg {
            st.segments.insert(id, seg);
        }
        let m = st.merges.get_mut(&id).expect("installing a known merge");
        m.installed = true;
        m.rows = Arc::default();
        removed.into_iter().collect()
    }

    /// Removes the index files of segments no search uses any more. Never
    /// called with the state lock held.
    pub(super) fn remove_index_files(&self, segments: &[u64]) {
        let _files = self.files.lock().expect("shard files lock");
        if self.retired.load(Ordering::Acquire) {
            return;
        }
        for s in segments {
            let _ = std::fs::remove_file(index_path(&self.dir, *s));
        }
    }

    /// Hands the reclaiming of what installed merges dropped to the
    /// builder thread ([`ShardStore::reclaim`](crate::store::ShardStore::reclaim)).
    pub(super) fn queue_reclaim(&self) {
        let this = self.this.clone();
        self.builder.submit(move || {
            let Some(shard) = this.upgrade() else { return };
            if let Err(e) = shard.reclaim_dropped() {
                tracing::error!(error = %e, shard = shard.config.shard, "reclaiming rows merges dropped failed; the next open tries again");
            }
        });
    }

    /// Removes from the shard file the rows that installed merges dropped,
    /// once every search that began before now is done: a search that
    /// found such a row before the merge's install (it was live then) may
    /// still be about to read its payload. Then compacts the file if enough
    /// of it is free pages (less is enough once the shard is quiet).
    fn reclaim_dropped(&self) -> Result<(), crate::EngineError> {
        let pending = self.store.pending_reclaims()?;
        if pending.is_empty() {
            return Ok(());
        }
        let before = std::mem::replace(&mut *self.readers.lock().expect("shard readers lock"), Arc::new(()));
        let searches = Arc::downgrade(&before);
        drop(before);
        while searches.strong_count() > 0 {
            if self.retired.load(Ordering::Acquire) {
                return Ok(());
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let _files = self.files.lock().expect("shard files lock");
        let mut removed = 0;
        for merge in pending {
            if self.retired.load(Ordering::Acquire) {
                return Ok(());
            }
            // What it holds of each segment it covers, if it still serves.
            let kept: Option<Vec<crate::store::KeptRows>> = {
                let st = self.read();
                st.merges.get(&merge).filter(|m| m.installed).map(|m| {
                    let seg = st.segments.get(&merge);
                    m.covers
                        .iter()
                        .map(|c| (*c, seg.map_or_else(Vec::new, |s| s.stored_runs(*c))))
                        .collect()
                })
            };
            let rows = self.store.reclaim(merge, kept.as_deref())?;
            if rows > 0 {
                tracing::info!(
                    shard = self.config.shard,
                    merge,
                    rows,
                    "reclaimed rows the merge dropped"
                );
            }
            removed += rows;
        }
        // Rows written faster than merges drop them grow the file, and
        // redb never gives pages back by itself. (With no row removed the
        // file has little free: a compaction would cost memory, in redb's
        // cache, for a few MiB of disk.)
        let quiet = self.is_quiet();
        if removed > 0 && !self.retired.load(Ordering::Acquire) {
            self.store.compact_if_sparse(quiet)?;
            if !quiet {
                self.compact_when_quiet();
            }
        }
        Ok(())
    }

    /// Whether the shard has had no write for [`COMPACT_QUIET_AFTER`].
    fn is_quiet(&self) -> bool {
        self.last_write.lock().expect("last write lock").elapsed() >= COMPACT_QUIET_AFTER
    }

    /// Once the shard is quiet, has the builder thread compact its file at
    /// the quiet bar: rows reclaimed while it took writes may have left
    /// less free than the bar for a busy shard. One waiting thread per
    /// replica at most; it gives up when the replica goes.
    fn compact_when_quiet(&self) {
        if self.compact_scheduled.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = self.this.clone();
        let spawned = std::thread::Builder::new()
            .name("shard-compact".into())
            .spawn(move || loop {
                std::thread::sleep(COMPACT_QUIET_AFTER);
                let Some(shard) = this.upgrade() else { return };
                if shard.retired.load(Ordering::Acquire) {
                    return;
                }
                if !shard.is_quiet() {
                    continue;
                }
                shard.compact_scheduled.store(false, Ordering::Release);
                let this = shard.this.clone();
                shard.builder.submit(move || {
                    let Some(shard) = this.upgrade() else { return };
                    let _files = shard.files.lock().expect("shard files lock");
                    if shard.retired.load(Ordering::Acquire) {
                        return;
                    }
                    if let Err(e) = shard.store.compact_if_sparse(true) {
                        tracing::error!(error = %e, shard = shard.config.shard, "compacting the shard file failed");
                    }
                });
                return;
            });
        if spawned.is_err() {
            self.compact_scheduled.store(false, Ordering::Release);
        }
    }

    /// Hands the build and install of merge `id` to the builder thread.
    pub(super) fn queue_merge(&self, id: u64) {
        let this = self.this.clone();
        self.builder.submit(move || {
            let Some(shard) = this.upgrade() else { return };
            if shard.retired.load(Ordering::Acquire) {
                return;
            }
            if let Err(e) = shard.build_merge(id) {
                tracing::error!(error = %e, merge = id, "merge failed; its sources keep serving until the next open");
            }
        });
    }

    fn build_merge(&self, id: u64) -> Result<(), crate::EngineError> {
        let (metric, dim) = (self.config.metric, self.config.dim as usize);
        let (rows, progress) = {
            let st = self.read();
            match st.merges.get(&id) {
                Some(m) if m.is_pending() => (m.rows.clone(), m.progress.clone()),
                // Installed already, or taken over by a later merge.
                _ => return Ok(()),
            }
        };
        let ids: Vec<u64> = rows.iter().map(|(_, pid)| *pid).collect();
        let path = index_path(&self.dir, id);
        let expect = Expect {
            segment: id,
            metric,
            dim,
            rows: rows.len(),
        };
        // A crash after the save and before the install leaves the file.
        let at = |r: std::ops::Range<u32>| {
            rows[r.start as usize..r.end as usize]
                .iter()
                .map(|(at, _)| *at)
                .collect()
        };
        let saved = super::load_index(&self.dir, &self.store, expect, &at)?.filter(|(_, file_ids)| *file_ids == ids);
        let index = match saved {
            Some((index, _)) => Arc::new(index),
            None => {
                let index = Arc::new(self.build_merged_index(id, &rows, &progress)?);
                let _files = self.files.lock().expect("shard files lock");
                if self.retired.load(Ordering::Acquire) {
                    return Ok(());
                }
                index.save(&path, id, &ids)?;
                index
            }
        };

        let writer = self.writer.lock().expect("shard writer lock");
        let replaces = match self.read().merges.get(&id) {
            Some(m) if !m.installed => m.replaces.clone(),
            _ => return Ok(()),
        };
        if self.retired.load(Ordering::Acquire) {
            return Ok(());
        }
        self.store.install_merge(id, &replaces)?;
        let replaced = {
            let mut st = self.state.write().expect("shard state lock");
            let seg = Self::merged_segment(&st, id, dim, &rows, index);
            Self::install_in_memory(&mut st, id, Some(seg))
        };
        self.remove_index_files(&replaced);
        tracing::info!(shard = self.config.shard, merge = id, rows = rows.len(), replaced = ?replaced, "merged segment installed");
        drop(writer);
        self.queue_reclaim();
        Ok(())
    }

    /// Builds the index of pending merge `id` over `rows`. The index
    /// points into the vectors the serving segments hold (no second copy
    /// of the merged rows). It extends the graph of the segment serving
    /// the first rows when it can ([`GraphBuild::extend`]), and adds the
    /// rows one serving segment after the other: once every row a segment
    /// serves is in the graph, the rows added so far replace it in
    /// searches ([`Self::serve_prefix`]) and its graph is freed, so the
    /// merge never holds its whole graph beside all of its sources'. (Their
    /// index files stay until the install.)
    fn build_merged_index(
        &self,
        id: u64,
        rows: &[(Location, u64)],
        progress: &AtomicU64,
    ) -> Result<HnswIndex, crate::EngineError> {
        let (metric, dim, params) = (self.config.metric, self.config.dim as usize, self.config.index);
        let (sources, runs) = self.vector_sources(rows)?;
        let vectors = RowVectors::gather(sources, dim);
        let extended = match self.extendable(rows) {
            Some(first) => GraphBuild::extend(&first, vectors, params)?,
            None => Err(vectors),
        };
        let mut build = match extended {
            Ok(build) => build,
            Err(vectors) => GraphBuild::new(metric, dim, vectors, params)?,
        };
        // Where each serving segment's rows end in the merge.
        let mut retired: Vec<u64> = Vec::new();
        let mut last_end: HashMap<u64, usize> = HashMap::new();
        for &(unit, end) in &runs {
            last_end.insert(unit, end);
        }
        for &(_, end) in &runs {
            build.add_through(end, progress)?;
            if build.added() == build.rows() {
                break;
            }
            let done: Vec<u64> = last_end
                .iter()
                .filter(|(unit, end)| **end <= build.added() && !retired.contains(unit))
                .map(|(unit, _)| *unit)
                .collect();
            if !done.is_empty() && self.serve_prefix(id, build.prefix()?, rows, &done) {
                retired.extend(done);
                #[cfg(test)]
                if let Some(hook) = self.on_prefix.lock().expect("prefix hook lock").as_mut() {
                    hook(self);
                }
            }
        }
        build.finish()
    }

    /// The merged segment `id` of `rows` (its first `index.rows()` of them)
    /// with `index`, the rows deleted since the merge's op tombstoned.
    fn merged_segment(
        st: &ShardState,
        id: u64,
        dim: usize,
        rows: &[(Location, u64)],
        index: Arc<HnswIndex>,
    ) -> Segment {
        let rows = &rows[..index.rows()];
        // Built from the merge's row list as it goes: a copy of its
        // locations would be held at the merge's peak.
        let columns = Columns::gather(
            &st.schema,
            rows.iter().map(|(at, _)| {
                let (seg, row) = st.find(*at).expect("every row of a pending merge is served");
                (seg.columns(), row)
            }),
        );
        let ids = rows.iter().map(|(_, pid)| *pid).collect();
        let locations = rows.iter().map(|(at, _)| *at);
        let mut seg = Segment::merged(id, dim, ids, locations, MergedData::Index(index)).with_columns(columns);
        for (row, (at, pid)) in rows.iter().enumerate() {
            if !st.is_live(*at, *pid) {
                seg.tombstone(row as u32);
            }
        }
        seg
    }

    /// While merge `id` builds: serves the rows in its graph so far
    /// (`prefix`, the first rows of `rows`) from its graph instead of from
    /// the segments `units` (which serve only rows of the prefix) and the
    /// prefix served before. Only memory changes: the merge is still
    /// pending, and a node that restarts serves the rows from the
    /// segments again. `false`, with nothing changed, when the merge is
    /// no longer pending (taken over by a later one) or the replica is
    /// dropped.
    fn serve_prefix(&self, id: u64, prefix: HnswIndex, rows: &[(Location, u64)], units: &[u64]) -> bool {
        let mut st = self.state.write().expect("shard state lock");
        if self.retired.load(Ordering::Acquire) {
            return false;
        }
        let covers = match st.merges.get(&id) {
            Some(m) if m.is_pending() => m.covers.clone(),
            _ => return false,
        };
        let seg = Self::merged_segment(&st, id, self.config.dim as usize, rows, Arc::new(prefix));
        for c in covers {
            let unit = st.owner.get(&c).copied().unwrap_or(c);
            if units.contains(&unit) {
                st.owner.insert(c, id);
            }
        }
        for unit in units {
            st.segments.remove(unit);
        }
        st.segments.insert(id, seg);
        true
    }

    /// The index a merge of `rows` can extend ([`GraphBuild::extend`]):
    /// that of the segment serving the first row, when the merge's first
    /// rows are all of that segment's rows, in order (no row of it deleted
    /// before the merge).
    fn extendable(&self, rows: &[(Location, u64)]) -> Option<Arc<HnswIndex>> {
        let st = self.read();
        let (seg, 0) = st.find(rows.first()?.0)? else {
            return None;
        };
        let index = seg.index()?;
        let own = seg.rows();
        let prefix = own == index.rows()
            && own < rows.len()
            && rows[..own]
                .iter()
                .enumerate()
                .all(|(r, (at, _))| *at == seg.location(r as u32));
        prefix.then(|| index.clone())
    }

    /// Where the vectors of `rows` are held: the block and row of the
    /// segment serving each (rows never move, so whichever segment serves a
    /// row has its vector); and the runs of rows each segment serves, as
    /// (segment, end of the run). The state lock is taken a chunk of rows
    /// at a time, so writes are not held up.
    fn vector_sources(&self, rows: &[(Location, u64)]) -> Result<(Vec<(Block, u32)>, Runs), crate::EngineError> {
        let mut out = Vec::with_capacity(rows.len());
        let mut runs: Vec<(u64, usize)> = Vec::new();
        for chunk in rows.chunks(SOURCE_CHUNK) {
            let st = self.read();
            for (at, _) in chunk {
                let found = st
                    .find(*at)
                    .and_then(|(seg, row)| seg.vector_source(row).map(|source| (seg.id(), source)));
                let (unit, source) = found.ok_or_else(|| {
                    crate::EngineError::corrupt(
                        self.dir.display().to_string(),
                        format!("no sealed segment serves row {} of segment {}", at.row, at.segment),
                    )
                })?;
                out.push(source);
                match runs.last_mut() {
                    Some((u, end)) if *u == unit => *end += 1,
                    _ => runs.push((unit, out.len())),
                }
            }
        }
        Ok((out, runs))
    }
}

#[cfg(test)]
mod tests;
