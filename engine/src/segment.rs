//! One segment of a shard replica, in memory.
//!
//! A segment is an append-only list of rows `(id, vector)` plus a tombstone
//! bit per row. It is **growing** (takes rows, searched by brute force)
//! until the shard seals it; then it is **sealed**: immutable except for new
//! tombstones, searched by brute force while its index is built
//! ([`IndexState::Building`]) and through the HNSW index once installed
//! ([`IndexState::Ready`]).
//!
//! A **merged** segment (compaction) is sealed from the start and holds
//! rows that stay stored where they were first written: it maps each of
//! its rows to that [`Location`], and candidates and tombstones speak in
//! locations, so a merge moves no row and changes no point's location.
//!
//! Invariants:
//! - the vectors are held once: in the growing buffer (contiguous), or,
//!   from the seal on, in the sealed buffer, which becomes the [`Block`]
//!   its index (and later a merged index) points into without copying;
//!   a sealed segment whose rows are all deleted may drop them (and its
//!   index) at once, before a merge drops the segment;
//! - a row is live iff it is not tombstoned; search and get never return a
//!   tombstoned row: the graph walk skips dead rows (a filtered walk, with
//!   its expansion widened by the share of dead rows, or an exact scan
//!   when few rows are live), and when it comes back with fewer than `k`
//!   live rows while the segment has more, the segment is searched exactly
//!   instead, so deletes never make results go missing;
//! - a sealed segment keeps the rows that pass its last few filters (its
//!   columns never change once sealed); liveness is checked when they are
//!   used, so a tombstone never makes a kept set wrong;
//! - every candidate's score is computed by [`metric::score`] on the stored
//!   vector, whatever path found it, so the same point scores the same in
//!   every segment state and on every replica.
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use edgevec_proto::{limits, IndexState, Metric, SegmentInfo, SegmentState};

use crate::hnsw::{AlignedRows, Block, HnswIndex, SearchOptions};
use crate::metric::{self, Candidate, TopK};
use crate::payload::{Cell, Columns, Compiled};
use crate::plan::Location;

/// A filtered search scans the passing rows of a segment exactly, instead
/// of walking its graph, when at most this many rows pass (or when the
/// walk would cost more, see [`Segment::search`]); so does a search of a
/// segment with deleted rows when at most this many are live.
pub const EXACT_FILTERED_ROWS: usize = 2048;

/// Where the rows of a merged segment are stored, as runs of rows stored
/// one after the other in one segment: a merge takes its sources' live
/// rows in order, so a run ends only where a source ends or a row had
/// been deleted (a few bytes per run instead of per row).
struct RowMap {
    /// Ascending by `first`, covering the segment's rows without gaps.
    runs: Vec<Run>,
    /// Stored segment → its runs (indexes into `runs`), ascending by row.
    by_source: HashMap<u64, Vec<u32>>,
}

/// Rows `first..first + len` of a merged segment, stored at rows
/// `row..row + len` of segment `segment`.
#[derive(Debug, Clone, Copy)]
struct Run {
    segment: u64,
    first: u32,
    row: u32,
    len: u32,
}

impl RowMap {
    fn new(locations: impl IntoIterator<Item = Location>) -> RowMap {
        let mut runs: Vec<Run> = Vec::new();
        for (i, at) in locations.into_iter().enumerate() {
            match runs.last_mut() {
                Some(run) if run.segment == at.segment && run.row.checked_add(run.len) == Some(at.row) => run.len += 1,
                _ => runs.push(Run {
                    segment: at.segment,
                    first: i as u32,
                    row: at.row,
                    len: 1,
                }),
            }
        }
        runs.shrink_to_fit();
        let mut by_source: HashMap<u64, Vec<u32>> = HashMap::new();
        for (i, run) in runs.iter().enumerate() {
            by_source.entry(run.segment).or_default().push(i as u32);
        }
        for list in by_source.values_mut() {
            list.sort_unstable_by_key(|&i| runs[i as usize].row);
            list.shrink_to_fit();
        }
        RowMap { runs, by_source }
    }

    fn row_of(&self, at: Location) -> Option<u32> {
        let list = self.by_source.get(&at.segment)?;
        let after = list.partition_point(|&i| self.runs[i as usize].row <= at.row);
        let run = self.runs[*list.get(after.checked_sub(1)?)? as usize];
        (at.row - run.row < run.len).then(|| run.first + (at.row - run.row))
    }

    /// The rows of stored segment `segment` among these, as runs `(first
    /// row, rows)` ascending.
    fn runs_of(&self, segment: u64) -> Vec<(u32, u32)> {
        self.by_source.get(&segment).map_or_else(Vec::new, |list| {
            list.iter()
                .map(|&i| {
                    let run = self.runs[i as usize];
                    (run.row, run.len)
                })
                .collect()
        })
    }

    fn location(&self, row: u32) -> Location {
        let run = self.runs[self.runs.partition_point(|r| r.first <= row) - 1];
        debug_assert!(row - run.first < run.len, "row {row} is past the merged segment's rows");
        Location {
            segment: run.segment,
            row: run.row + (row - run.first),
        }
    }
}

/// What a merged segment starts with.
pub enum MergedData {
    Index(Arc<HnswIndex>),
    /// Its vectors, row-major; the index is still to be built.
    Vectors(Vec<f32>),
}

enum Vectors {
    Growing(AlignedRows),
    /// Sealed, index not installed yet; shared with the builder thread.
    Sealed(Block),
    Indexed(Arc<HnswIndex>),
    /// Sealed, every row deleted, vectors and index dropped
    /// ([`Segment::release_if_dead`]): nothing can ever read them again.
    Released,
}

/// The rows of a segment that pass one filter, live or not.
struct Passing {
    rows: Vec<u32>,
    /// One bit per row of the segment.
    bits: Vec<u64>,
}

impl Passing {
    fn contains(&self, row: u32) -> bool {
        self.bits
            .get(row as usize / 64)
            .is_some_and(|w| w >> (row % 64) & 1 == 1)
    }
}

/// Filters whose passing rows a sealed segment keeps (last used first).
const PASSING_CACHE: usize = 4;

pub struct Segment {
    id: u64,
    dim: usize,
    ids: Vec<u64>,
    dead: Vec<bool>,
    deleted: u64,
    vectors: Vectors,
    /// Rows the running index build has added to its graph.
    progress: Arc<AtomicU64>,
    /// Set for merged segments.
    map: Option<Box<RowMap>>,
    /// The payload index columns (one per declared field).
    columns: Columns,
    /// The passing rows of the last filters searched with, by the compiled
    /// filter's text; kept once sealed, when the columns no longer change.
    passing: Mutex<Vec<(String, Arc<Passing>)>>,
}

impl Segment {
    pub fn growing(id: u64, dim: usize) -> Segment {
        Segment::from_parts(id, dim, Vec::new(), Vectors::Growing(AlignedRows::default()))
    }

    /// A growing segment restored from disk.
    pub fn growing_with(id: u64, dim: usize, ids: Vec<u64>, vectors: Vec<f32>) -> Segment {
        Segment::from_parts(id, dim, ids, Vectors::Growing(AlignedRows::from_slice(&vectors)))
    }

    /// A sealed segment whose index still has to be built.
    pub fn sealed(id: u64, dim: usize, ids: Vec<u64>, vectors: Vec<f32>) -> Segment {
        Segment::from_parts(
            id,
            dim,
            ids,
            Vectors::Sealed(Arc::new(AlignedRows::from_slice(&vectors))),
        )
    }

    /// A sealed segment with its index.
    pub fn indexed(id: u64, dim: usize, ids: Vec<u64>, index: Arc<HnswIndex>) -> Segment {
        Segment::from_parts(id, dim, ids, Vectors::Indexed(index))
    }

    /// A merged segment whose rows are stored at `locations`, with its
    /// index or (to be indexed) its vectors.
    pub fn merged(
        id: u64,
        dim: usize,
        ids: Vec<u64>,
        locations: impl ExactSizeIterator<Item = Location>,
        data: MergedData,
    ) -> Segment {
        debug_assert_eq!(ids.len(), locations.len());
        let vectors = match data {
            MergedData::Index(index) => Vectors::Indexed(index),
            MergedData::Vectors(v) => Vectors::Sealed(Arc::new(AlignedRows::from_slice(&v))),
        };
        let mut seg = Segment::from_parts(id, dim, ids, vectors);
        seg.map = Some(Box::new(RowMap::new(locations)));
        seg
    }

    fn from_parts(id: u64, dim: usize, ids: Vec<u64>, vectors: Vectors) -> Segment {
        Segment {
            id,
            dim,
            dead: vec![false; ids.len()],
            ids,
            deleted: 0,
            vectors,
            progress: Arc::new(AtomicU64::new(0)),
            map: None,
            columns: Columns::default(),
            passing: Mutex::new(Vec::new()),
        }
    }

    /// Sets the payload index columns (a cell per row of each).
    pub fn with_columns(mut self, columns: Columns) -> Segment {
        self.columns = columns;
        self
    }

    pub fn columns(&self) -> &Columns {
        &self.columns
    }

    /// Whether this is a merged segment.
    /// For a merged segment, the rows of stored segment `segment` it
    /// holds, as runs `(first row, rows)` ascending (none for another
    /// segment).
    pub fn stored_runs(&self, segment: u64) -> Vec<(u32, u32)> {
        self.map.as_ref().map_or_else(Vec::new, |m| m.runs_of(segment))
    }

    pub fn is_merged(&self) -> bool {
        self.map.is_some()
    }

    /// This segment's row stored at `at`, if it holds that row.
    pub fn row_of(&self, at: Location) -> Option<u32> {
        match &self.map {
            Some(map) => map.row_of(at),
            None => (at.segment == self.id && (at.row as usize) < self.rows()).then_some(at.row),
        }
    }

    /// Where `row` is stored.
    pub fn location(&self, row: u32) -> Location {
        match &self.map {
            Some(map) => map.location(row),
            None => Location { segment: self.id, row },
        }
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn rows(&self) -> usize {
        self.ids.len()
    }

    pub fn ids(&self) -> &[u64] {
        &self.ids
    }

    pub fn state(&self) -> SegmentState {
        match self.vectors {
            Vectors::Growing(_) => SegmentState::Growing,
            _ => SegmentState::Sealed,
        }
    }

    pub fn index_state(&self) -> IndexState {
        match self.vectors {
            Vectors::Growing(_) => IndexState::None,
            Vectors::Sealed(_) => IndexState::Building,
            // Nothing is left to index.
            Vectors::Indexed(_) | Vectors::Released => IndexState::Ready,
        }
    }

    /// Appends a row with its payload index cells; returns its row
    /// number. Only growing segments take rows (the plan never appends
    /// elsewhere).
    pub fn push(&mut self, id: u64, vector: &[f32], cells: &[Cell]) -> u32 {
        let Vectors::Growing(buf) = &mut self.vectors else {
            panic!("segment {} is sealed and takes no rows", self.id);
        };
        debug_assert_eq!(vector.len(), self.dim);
        buf.extend_from_slice(vector);
        self.columns.push(cells);
        self.ids.push(id);
        self.dead.push(false);
        (self.ids.len() - 1) as u32
    }

    /// Marks a row dead. Idempotent, so replaying a tombstone is harmless.
    pub fn tombstone(&mut self, row: u32) {
        if let Some(d) = self.dead.get_mut(row as usize) {
            if !*d {
                *d = true;
                self.deleted += 1;
            }
        }
    }

    /// Seals a growing segment and returns its vectors for the index build.
    pub fn seal(&mut self) -> Block {
        match &mut self.vectors {
            Vectors::Growing(buf) => {
                let mut buf = std::mem::take(buf);
                buf.shrink_to_fit();
                self.columns.shrink();
                let shared = Arc::new(buf);
                self.vectors = Vectors::Sealed(shared.clone());
                shared
            }
            Vectors::Sealed(v) => v.clone(),
            Vectors::Indexed(_) | Vectors::Released => panic!("segment {} is already indexed", self.id),
        }
    }

    /// Whether its vectors were dropped ([`Segment::release_if_dead`]).
    #[cfg(test)]
    pub fn is_released(&self) -> bool {
        matches!(self.vectors, Vectors::Released)
    }

    /// Drops the vectors (and index) of a sealed segment whose rows are
    /// all deleted; returns whether it did. Its rows are dead for good
    /// (a tombstone is never lifted), so no search or get reads them; the
    /// caller makes sure no pending merge still has to read them (a
    /// merge's rows are those live at its op). The segment itself stays
    /// until a merge drops it.
    pub fn release_if_dead(&mut self) -> bool {
        let sealed = matches!(self.vectors, Vectors::Sealed(_) | Vectors::Indexed(_));
        if !sealed || self.rows() == 0 || self.live_rows() > 0 {
            return false;
        }
        self.vectors = Vectors::Released;
        self.passing.lock().expect("passing cache lock").clear();
        true
    }

    /// The vectors an index build needs, if the segment is waiting for
    /// one, and the counter the build reports its progress in.
    pub fn pending_build(&self) -> Option<(Block, Arc<AtomicU64>)> {
        match &self.vectors {
            Vectors::Sealed(v) => {
                self.progress.store(0, Ordering::Relaxed);
                Some((v.clone(), self.progress.clone()))
            }
            _ => None,
        }
    }

    /// Its index, once built.
    pub fn index(&self) -> Option<&Arc<HnswIndex>> {
        match &self.vectors {
            Vectors::Indexed(index) => Some(index),
            _ => None,
        }
    }

    /// While the index is being built: rows in its graph so far.
    pub fn build_progress(&self) -> Option<u64> {
        matches!(self.vectors, Vectors::Sealed(_)).then(|| self.progress.load(Ordering::Relaxed))
    }

    /// Swaps the sealed buffer for the index (which holds the same vectors).
    pub fn install_index(&mut self, index: Arc<HnswIndex>) {
        if matches!(self.vectors, Vectors::Sealed(_)) && index.rows() == self.rows() {
            self.vectors = Vectors::Indexed(index);
        }
    }

    pub fn is_live(&self, row: u32) -> bool {
        self.dead.get(row as usize).is_some_and(|d| !d)
    }

    /// The stored vector of `row`.
    pub fn vector(&self, row: u32) -> &[f32] {
        match &self.vectors {
            Vectors::Growing(v) => &v[row as usize * self.dim..][..self.dim],
            Vectors::Sealed(v) => &v[row as usize * self.dim..][..self.dim],
            Vectors::Indexed(ix) => ix.vector(row),
            Vectors::Released => panic!(
                "row {row} of segment {} was read after its vectors were dropped",
                self.id
            ),
        }
    }

    /// The block holding the vector of `row` and its row there, for an
    /// index to point into; `None` while the segment grows (its buffer
    /// still changes) and once its vectors are dropped.
    pub fn vector_source(&self, row: u32) -> Option<(Block, u32)> {
        match &self.vectors {
            Vectors::Growing(_) => None,
            Vectors::Sealed(v) => Some((v.clone(), row)),
            Vectors::Indexed(ix) => Some(ix.vector_source(row)),
            Vectors::Released => None,
        }
    }

    /// Rows not tombstoned.
    pub fn live_rows(&self) -> usize {
        self.rows() - self.deleted as usize
    }

    /// The best `k` live rows for `query` that pass `filter` (if any), best
    /// first: through the index when the segment has one (exactly when
    /// `opts.exact`), by scanning the rows otherwise.
    ///
    /// With a filter, the plan is chosen per segment from the number of
    /// rows that pass, `p` of `n`: a walk that skips failing rows visits
    /// about `n / p` rows for each one it keeps, so it costs about
    /// `2·ef·m·n / p` distances against `p` for comparing the passing rows
    /// exactly. The segment is scanned (those rows only) when
    /// `p ≤` [`EXACT_FILTERED_ROWS`] or `p²/n ≤ 2·ef·m`; otherwise the walk
    /// keeps `ef·n/p` candidates (at most [`limits::MAX_SEARCH_EF`]), so
    /// about `ef` of them pass, as an unfiltered walk would keep.
    ///
    /// Deleted rows are planned alike, `p` being the live rows: a walk over
    /// a graph whose rows are mostly deleted reaches few live ones and
    /// would miss the nearest.
    pub fn search(
        &self,
        metric: Metric,
        query: &[f32],
        k: usize,
        opts: SearchOptions,
        filter: Option<&Compiled>,
    ) -> Vec<Candidate> {
        if self.live_rows() == 0 {
            return Vec::new();
        }
        let Some(filter) = filter else {
            if self.deleted == 0 {
                return self.search_rows(metric, query, k, opts, None);
            }
            return match self.walk_options(opts, k, self.live_rows()) {
                Some(walk) => self.search_rows(metric, query, k, walk, None),
                None => self.scan(metric, query, k),
            };
        };
        let passing = self.passing(filter);
        let live_passing = passing.rows.iter().filter(|r| self.is_live(**r)).count();
        let Some(walk) = self.walk_options(opts, k, live_passing) else {
            let mut top = TopK::new(metric, k);
            for &row in passing.rows.iter().filter(|r| self.is_live(**r)) {
                self.offer(metric, query, row, &mut top);
            }
            return top.into_sorted();
        };
        let allowed = |row: u32| passing.contains(row) && self.is_live(row);
        self.search_rows(metric, query, k, walk, Some((&allowed, live_passing)))
    }

    /// The plan for `p` rows of the segment that a search may return (see
    /// [`Segment::search`]): the options of a graph walk, its `ef` widened
    /// by `n / p`, or `None` to compare those rows exactly.
    fn walk_options(&self, opts: SearchOptions, k: usize, p: usize) -> Option<SearchOptions> {
        let Vectors::Indexed(ix) = &self.vectors else {
            return None;
        };
        let (p, n) = (p as f64, self.rows().max(1) as f64);
        let ef = opts.ef.max(k).max(1) as f64;
        let m = f64::from(ix.params().m);
        if opts.exact || p <= EXACT_FILTERED_ROWS as f64 || p * p / n <= 2.0 * ef * m {
            return None;
        }
        Some(SearchOptions {
            ef: (ef * n / p).ceil().min(f64::from(limits::MAX_SEARCH_EF)) as usize,
            ..opts
        })
    }

    /// The rows that pass `filter`, live or not: from the cache once the
    /// segment is sealed, evaluated on every row otherwise.
    fn passing(&self, filter: &Compiled) -> Arc<Passing> {
        let evaluate = || {
            let rows: Vec<u32> = (0..self.rows() as u32)
                .filter(|r| filter.passes(&self.columns, *r))
                .collect();
            let mut bits = vec![0u64; self.rows().div_ceil(64)];
            for r in &rows {
                bits[*r as usize / 64] |= 1 << (r % 64);
            }
            Arc::new(Passing { rows, bits })
        };
        if matches!(self.vectors, Vectors::Growing(_)) {
            return evaluate();
        }
        let key = filter.key();
        let mut cache = self.passing.lock().expect("passing cache lock");
        if let Some(at) = cache.iter().position(|(k, _)| k == key) {
            let hit = cache.remove(at);
            let set = hit.1.clone();
            cache.insert(0, hit);
            return set;
        }
        let set = evaluate();
        cache.insert(0, (key.to_string(), set.clone()));
        cache.truncate(PASSING_CACHE);
        set
    }

    /// [`Segment::search`] over the live rows, or over the rows `allowed`
    /// accepts (live ones only, `count` of them).
    fn search_rows(
        &self,
        metric: Metric,
        query: &[f32],
        k: usize,
        opts: SearchOptions,
        allowed: Option<(&(dyn Fn(u32) -> bool + Sync), usize)>,
    ) -> Vec<Candidate> {
        let Vectors::Indexed(ix) = &self.vectors else {
            return self.scan(metric, query, k);
        };
        let want = k.min(allowed.map_or(self.live_rows(), |(_, count)| count));
        if want == 0 {
            return Vec::new();
        }
        let live = |row: u32| self.is_live(row);
        let pass = |row: u32| allowed.is_some_and(|(a, _)| a(row));
        let filter: Option<&(dyn Fn(u32) -> bool + Sync)> = match allowed {
            Some(_) => Some(&pass),
            None => (self.deleted > 0).then_some(&live),
        };
        let mut found = ix.search(query, k, opts, filter);
        if !opts.exact && found.as_ref().is_ok_and(|rows| rows.len() < want) {
            // The walk ran out of rows before k: compare them all.
            found = ix.search(query, k, SearchOptions { exact: true, ..opts }, filter);
        }
        match found {
            Ok(rows) => {
                let mut top = TopK::new(metric, k);
                for row in rows {
                    self.offer(metric, query, row, &mut top);
                }
                top.into_sorted()
            }
            Err(e) => {
                tracing::error!(segment = self.id, error = %e, "index search failed; scanning the segment's rows");
                let mut top = TopK::new(metric, k);
                for row in (0..self.rows() as u32).filter(|r| self.is_live(*r) && allowed.is_none_or(|(a, _)| a(*r))) {
                    self.offer(metric, query, row, &mut top);
                }
                top.into_sorted()
            }
        }
    }

    /// Ids of the live rows that pass `filter`.
    pub fn passing_ids<'a>(&'a self, filter: &'a Compiled) -> impl Iterator<Item = u64> + 'a {
        (0..self.rows() as u32)
            .filter(move |r| self.is_live(*r) && filter.passes(&self.columns, *r))
            .map(|r| self.ids[r as usize])
    }

    /// Brute force over every live row, one copy at a time.
    fn scan(&self, metric: Metric, query: &[f32], k: usize) -> Vec<Candidate> {
        let mut top = TopK::new(metric, k);
        for row in 0..self.rows() as u32 {
            self.offer(metric, query, row, &mut top);
        }
        top.into_sorted()
    }

    fn offer(&self, metric: Metric, query: &[f32], row: u32, top: &mut TopK) {
        if self.is_live(row) {
            let at = self.location(row);
            top.push(Candidate {
                id: self.ids[row as usize],
                score: metric::score(metric, query, self.vector(row)),
                segment: at.segment,
                row: at.row,
            });
        }
    }

    pub fn info(&self, shard: u32) -> SegmentInfo {
        SegmentInfo {
            shard,
            id: self.id,
            state: self.state(),
            rows: self.rows() as u64,
            deleted: self.deleted,
            index: self.index_state(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hnsw::RowVectors;
    use edgevec_proto::IndexSpec;

    #[test]
    fn a_merged_segment_maps_its_rows_to_where_they_are_stored_and_back() {
        let at = |segment, row| Location { segment, row };
        // Runs broken by deleted rows (4, 7..9 of segment 3), by a new
        // source, and one row long; a source whose rows come in two runs.
        let mut locations: Vec<Location> = (0..4).map(|r| at(3, r)).collect();
        locations.extend([at(3, 5), at(3, 6), at(3, 10), at(9, 0), at(9, 1), at(5, 7)]);
        locations.extend((100..110).map(|r| at(9, r)));
        let map = RowMap::new(locations.iter().copied());
        assert_eq!(map.runs.len(), 6);
        for (i, stored) in locations.iter().enumerate() {
            assert_eq!(map.location(i as u32), *stored);
            assert_eq!(map.row_of(*stored), Some(i as u32), "{stored:?}");
        }
        for missing in [
            at(3, 4),
            at(3, 7),
            at(3, 11),
            at(9, 2),
            at(9, 99),
            at(9, 110),
            at(5, 6),
            at(4, 0),
        ] {
            assert_eq!(map.row_of(missing), None, "{missing:?}");
        }
        let empty = RowMap::new([]);
        assert_eq!(empty.row_of(at(1, 0)), None);
    }

    fn filled(n: u64) -> Segment {
        let mut s = Segment::growing(1, 2);
        for id in 0..n {
            s.push(id, &[id as f32, 0.0], &[]);
        }
        s
    }

    #[test]
    fn growing_search_skips_tombstones() {
        let mut s = filled(10);
        let ids = |c: Vec<Candidate>| c.iter().map(|c| c.id).collect::<Vec<_>>();
        let o = SearchOptions::default();
        assert_eq!(ids(s.search(Metric::L2, &[0.0, 0.0], 3, o, None)), vec![0, 1, 2]);
        s.tombstone(1);
        s.tombstone(1);
        assert_eq!(s.info(0).deleted, 1);
        assert_eq!(ids(s.search(Metric::L2, &[0.0, 0.0], 3, o, None)), vec![0, 2, 3]);
        assert_eq!(ids(s.search(Metric::InnerProduct, &[1.0, 0.0], 2, o, None)), vec![9, 8]);
    }

    #[test]
    fn indexed_search_skips_tombstones_and_never_comes_back_short() {
        let mut s = filled(100);
        let v = s.seal();
        assert_eq!(s.index_state(), IndexState::Building);
        let params = IndexSpec {
            m: 4,
            ef_construction: 16,
        };
        let (_, progress) = s.pending_build().unwrap();
        assert_eq!(s.build_progress(), Some(0));
        s.install_index(Arc::new(
            HnswIndex::build(Metric::L2, 2, RowVectors::One(v.clone()), params, &progress).unwrap(),
        ));
        assert_eq!(progress.load(Ordering::Relaxed), 100);
        assert_eq!(s.build_progress(), None, "built: no progress to report");
        drop(v);
        assert_eq!(s.index_state(), IndexState::Ready);
        assert_eq!(s.vector(42), &[42.0, 0.0]);
        let ids = |c: Vec<Candidate>| c.iter().map(|c| c.id).collect::<Vec<_>>();
        let small = SearchOptions { ef: 2, exact: false };
        // Delete the 6 nearest rows: they must not come back, and the 5
        // next must, whatever the expansion.
        for row in 0..6 {
            s.tombstone(row);
        }
        assert_eq!(
            ids(s.search(Metric::L2, &[0.0, 0.0], 5, small, None)),
            vec![6, 7, 8, 9, 10]
        );
        let exact = SearchOptions { ef: 1, exact: true };
        assert_eq!(
            ids(s.search(Metric::L2, &[0.0, 0.0], 5, exact, None)),
            vec![6, 7, 8, 9, 10]
        );
        // k above the live rows: every live row, once.
        assert_eq!(s.search(Metric::L2, &[0.0, 0.0], 500, small, None).len(), 94);
        // Everything deleted but one row: that row, found through the scan.
        for row in 6..99 {
            s.tombstone(row);
        }
        assert_eq!(ids(s.search(Metric::L2, &[0.0, 0.0], 3, small, None)), vec![99]);
        let c = &s.search(Metric::L2, &[0.0, 0.0], 3, small, None)[0];
        assert_eq!(c.score, 99.0, "scored on the stored vector");
    }
}
