//! The HNSW index of a sealed segment (usearch): build, search, save, load.
//!
//! The graph's keys are the segment's row numbers; the segment keeps the
//! row → id map. Distances are usearch's own metrics:
//! - `l2`: squared Euclidean distance;
//! - `ip` and `cosine`: inner product (`1 - dot`); cosine vectors are unit
//!   length already (normalised on insert), so the inner-product order is
//!   the cosine order and no second normalisation is paid per distance.
//!
//! Vectors are held once in memory, in [`Block`]s: row-major buffers that
//! indexes point into instead of copying (usearch keeps a pointer per row;
//! a small patch of the binding, like the per-search `ef`). A sealed
//! segment's buffer becomes the block of its index; a merged index points
//! into the blocks of the indexes it replaces and keeps them alive, so a
//! merge adds a graph to memory but no second copy of its vectors. Rows of
//! a block that a merge would leave mostly unused (deleted rows dropped)
//! are copied into a block of their own instead ([`RowVectors::gather`]),
//! so deleted rows do not pin memory for ever.
//! On disk the vectors are stored once too, in the shard file: an index
//! file holds the graph alone, and [`HnswIndex::load`] reads the vectors
//! it is handed into one block.
//!
//! The graph is kept small too (a fifth patch): usearch's key → member
//! table is off (nothing asks usearch for a key; the keys are row numbers,
//! and a loaded graph gets its vectors by member slot), and graph nodes
//! are 8-byte aligned instead of 64 (a base-layer node of 142 bytes at
//! `m` 16 took 192). An index readied for [`search_slots`] searches is
//! not sized for as many concurrent adds (their node locks took about
//! 1 MiB an index).
//!
//! Every row of a graph is reachable, wherever a walk starts: threads
//! adding at once (and the neighbour heuristic) can leave a row that no
//! other row links to, or a few rows whose links lead only among
//! themselves, which no unfiltered walk (or few) would return. After each
//! build and load, a row the entry point does not reach gets a link in
//! from its nearest neighbour that it does, and a row that does not reach
//! the entry point a link out to the nearest row that does
//! (`link_unreached`, a sixth patch of usearch).
//!
//! A merge builds its graph a run of rows at a time ([`GraphBuild`]): when
//! its first rows are one source's rows, in order, it extends that
//! source's graph with the others instead of building a graph of all of
//! them ([`GraphBuild::extend`]); and the rows added so far can serve
//! searches ([`GraphBuild::prefix`]) while the rest go in, so the sources
//! whose rows are all in can be dropped before the merge ends. Indexes of
//! one graph share it: each serves the first `rows` members, and its
//! searches walk the members past them but return only its own. Searches
//! and adds of one graph take turns (a lock per graph): usearch's walk
//! reads links without locks, and an add empties and refills the links of
//! the members it links to.
//!
//! Invariants: a graph's usearch index is declared before the blocks it
//! keeps, so it is dropped first, and a block is never written once an
//! index points into it; an index serves the first `rows` members of its
//! graph, and a graph only ever grows.
//!
//! Distances in the walk are edgevec's own f32 kernels
//! ([`crate::metric::walk_kernels`], installed as usearch's metric after
//! every build start and load), not usearch's numkong ones, which sum in
//! f64 at half the lanes; the walk only orders candidates, and the scores
//! returned are computed again exactly by the segment. The walk prefetches
//! the vectors and graph nodes of the neighbours it is about to measure (a
//! third patch of `vendor/usearch`).
//!
//! Search takes its expansion (`ef`) per call: the binding's index-wide
//! setting is never changed after a build, so concurrent searches with
//! different `ef` do not race (the per-call entry point is a small patch of
//! the usearch binding, `vendor/usearch`). Searches need a usearch *thread
//! slot*; an index reserves [`search_slots`] of them, and a search that
//! finds none free waits for one.
//!
//! Indexes are loaded by copying the file into usearch's own memory
//! (`load_from_buffer`), never by viewing a buffer (`view_from_buffer`):
//! filtered search on viewed indexes has a reported memory-corruption bug
//! (usearch issue #624). A loaded graph's links are checked before any
//! walk (a seventh patch): an index file can come from a peer's export,
//! and a link out of bounds would have a walk read past the graph.
//!
//! File format (`seg-<id>.hnsw`), header version 4: a 32-byte header —
//! magic `EVHNSW\0\0`, header version u32, reserved u32, body length u64,
//! FNV-1a checksum of the body u64, all little endian — then the body, one
//! zstd frame of: a u32 length, the postcard [`IndexMeta`] (itself a
//! versioned enum: the segment, schema, build parameters and row ids),
//! then usearch's own serialisation of the graph without its vectors. The
//! graph's links are row numbers in four bytes each, mostly small, and
//! compress to about 40 % (15.1 MB to 5.9 MB for 100,000 rows at `m` 16).
//! Header version 3 is the same body uncompressed, still read. Version 1
//! (the instant-distance graph of earlier builds), 2 (usearch with the
//! vectors inside) and anything this build cannot read is an error, and
//! the caller rebuilds the index from the segment's rows: an old or
//! foreign file is never misread.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use edgevec_proto::{limits, IndexSpec, Metric};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use usearch::{Index, IndexOptions, MetricKind, ScalarKind};

use crate::error::EngineError;
use crate::fsutil;

const MAGIC: &[u8; 8] = b"EVHNSW\0\0";
/// 1: instant-distance graph; 2: usearch with its vectors (neither read
/// any more); 3: usearch graph, vectors kept by the shard file (still
/// read); 4: the same, compressed.
const HEADER_VERSION: u32 = 4;
/// The uncompressed body of version 3.
const PLAIN_VERSION: u32 = 3;
/// zstd level of the body: the graph compresses as well at 1 as at 3, in
/// about half the time.
const ZSTD_LEVEL: i32 = 1;
/// Rows a build adds at a time, with the graph to itself, while indexes of
/// the graph serve searches ([`GraphBuild::add_through`]): a few
/// milliseconds of adds that a search of the graph may wait for.
const ADD_BATCH: usize = 64;

/// Rows a build adds between two checks that its index is still wanted
/// ([`HnswIndex::build_while`]): a few tens of milliseconds of work.
pub const BUILD_CHECK_ROWS: usize = 2048;
/// Rows whose vectors [`HnswIndex::load`] asks for at a time.
const ATTACH_CHUNK: usize = 4096;
const HEADER_LEN: usize = 32;
/// Bound on a decompressed body, per row of the segment (a graph node and
/// its id take a few hundred bytes at the largest `m`).
const MAX_BYTES_PER_ROW: u64 = 4096;

/// Search expansion used when a search does not choose one.
pub const DEFAULT_EF: usize = limits::DEFAULT_SEARCH_EF as usize;

/// How one segment search is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SearchOptions {
    /// Expansion: candidates kept while walking the graph (at least `k`
    /// is used).
    pub ef: usize,
    /// Compare every live row instead of walking the graph.
    pub exact: bool,
}

impl Default for SearchOptions {
    fn default() -> Self {
        SearchOptions {
            ef: DEFAULT_EF,
            exact: false,
        }
    }
}

/// What the caller knows about the segment, checked against a loaded file.
#[derive(Debug, Clone, Copy)]
pub struct Expect {
    pub segment: u64,
    pub metric: Metric,
    pub dim: usize,
    pub rows: usize,
}

/// Writes an index file into `f`: the header, then one zstd frame of the
/// body (`meta`'s length and bytes, then the graph file's bytes),
/// streamed; the header's length and checksum are written last.
fn write_compressed(f: &mut File, meta: &[u8], graph: &Path) -> std::io::Result<()> {
    let mut source = File::open(graph)?;
    let plain_len = 4 + meta.len() as u64 + source.metadata()?.len();
    f.write_all(&[0u8; HEADER_LEN])?;
    let mut out = Summing {
        inner: BufWriter::new(&mut *f),
        sum: fsutil::Checksum::new(),
        len: 0,
    };
    let mut z = zstd::stream::Encoder::new(&mut out, ZSTD_LEVEL)?;
    // The frame states its size: the reader bounds it before allocating.
    z.set_pledged_src_size(Some(plain_len))?;
    z.include_contentsize(true)?;
    z.write_all(&(meta.len() as u32).to_le_bytes())?;
    z.write_all(meta)?;
    std::io::copy(&mut source, &mut z)?;
    z.finish()?;
    out.inner.flush()?;
    let (sum, len) = (out.sum.finish(), out.len);
    drop(out);
    let mut header = [0u8; HEADER_LEN];
    header[..8].copy_from_slice(MAGIC);
    header[8..12].copy_from_slice(&HEADER_VERSION.to_le_bytes());
    header[16..24].copy_from_slice(&len.to_le_bytes());
    header[24..32].copy_from_slice(&sum.to_le_bytes());
    f.seek(SeekFrom::Start(0))?;
    f.write_all(&header)
}

/// A writer that checksums and counts what passes through it.
struct Summing<W> {
    inner: W,
    sum: fsutil::Checksum,
    len: u64,
}

impl<W: Write> Write for Summing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.sum.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// The metadata part of an index file's body.
#[derive(Serialize, Deserialize)]
enum IndexMeta {
    V1 {
        segment: u64,
        metric: Metric,
        dim: u32,
        m: u32,
        ef_construction: u32,
        ids: Vec<u64>,
    },
}

/// Row-major vectors (`dim` floats a row) that indexes point into. Never
/// written once shared.
pub type Block = Arc<AlignedRows>;

/// One cache line of floats.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([f32; 16]);

/// Floats in memory aligned to a cache line, so that rows whose length is
/// a multiple of 16 floats (128, 384, 768, ...) each start a cache line:
/// the walk loads and prefetches a row without touching one line more.
/// (A `Vec<f32>` from the allocator starts 16 bytes into a line.)
#[derive(Default)]
pub struct AlignedRows {
    lines: Vec<Line>,
    len: usize,
}

impl AlignedRows {
    /// Appends `v` (a growing segment's new row).
    pub fn extend_from_slice(&mut self, v: &[f32]) {
        let start = self.len;
        self.len += v.len();
        self.lines.resize(self.len.div_ceil(16), Line([0.0; 16]));
        self.as_mut_slice()[start..].copy_from_slice(v);
    }

    /// Gives back the room a growing buffer kept for more rows (for a
    /// buffer of many pages, glibc moves the pages instead of copying
    /// them).
    pub fn shrink_to_fit(&mut self) {
        self.lines.shrink_to_fit();
    }

    /// `len` zeros.
    pub fn zeroed(len: usize) -> AlignedRows {
        AlignedRows {
            lines: vec![Line([0.0; 16]); len.div_ceil(16)],
            len,
        }
    }

    pub fn from_slice(v: &[f32]) -> AlignedRows {
        let mut out = AlignedRows::zeroed(v.len());
        out.as_mut_slice().copy_from_slice(v);
        out
    }

    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        // SAFETY: `lines` holds at least `len` floats (plain data, no
        // padding: a line is 16 f32 at their own alignment).
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast::<f32>(), self.len) }
    }
}

impl std::ops::Deref for AlignedRows {
    type Target = [f32];

    fn deref(&self) -> &[f32] {
        // SAFETY: as in `as_mut_slice`.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast::<f32>(), self.len) }
    }
}

/// Where the vectors of an index's rows are.
pub enum RowVectors {
    /// Row `r` is row `r` of the block.
    One(Block),
    /// Row `r` is row `at[r].1` of `blocks[at[r].0]`.
    Gathered { blocks: Vec<Block>, at: Vec<(u32, u32)> },
}

impl RowVectors {
    fn rows(&self, dim: usize) -> usize {
        match self {
            RowVectors::One(b) => b.len() / dim.max(1),
            RowVectors::Gathered { at, .. } => at.len(),
        }
    }

    fn source(&self, row: u32) -> (&Block, u32) {
        match self {
            RowVectors::One(b) => (b, row),
            RowVectors::Gathered { blocks, at } => {
                let (b, r) = at[row as usize];
                (&blocks[b as usize], r)
            }
        }
    }

    fn get(&self, row: u32, dim: usize) -> &[f32] {
        let (block, r) = self.source(row);
        &block[r as usize * dim..][..dim]
    }

    /// Every block the rows are in.
    fn blocks(&self) -> Vec<Block> {
        match self {
            RowVectors::One(b) => vec![b.clone()],
            RowVectors::Gathered { blocks, .. } => blocks.clone(),
        }
    }

    /// The vectors of rows stored at `sources` (a block and a row of it,
    /// one per row, in row order). Blocks of which fewer than half the rows
    /// are used here are not kept: those rows are copied into a block of
    /// their own, so that a merge that drops deleted rows frees their
    /// memory once the segments it replaces are gone.
    pub fn gather(sources: Vec<(Block, u32)>, dim: usize) -> RowVectors {
        let mut used: HashMap<*const AlignedRows, usize> = HashMap::new();
        for (block, _) in &sources {
            *used.entry(Arc::as_ptr(block)).or_default() += 1;
        }
        let mut blocks: Vec<Block> = Vec::new();
        let mut slot: HashMap<*const AlignedRows, u32> = HashMap::new();
        let mut own = AlignedRows::default();
        let mut at: Vec<(u32, u32)> = Vec::with_capacity(sources.len());
        for (block, row) in sources {
            let key = Arc::as_ptr(&block);
            if used[&key] * 2 < block.len() / dim.max(1) {
                // Sparse: copied into `own`, the last block (numbered below).
                at.push((u32::MAX, (own.len() / dim.max(1)) as u32));
                own.extend_from_slice(&block[row as usize * dim..][..dim]);
            } else {
                let b = *slot.entry(key).or_insert_with(|| {
                    blocks.push(block.clone());
                    blocks.len() as u32 - 1
                });
                at.push((b, row));
            }
        }
        if !own.is_empty() {
            own.shrink_to_fit();
            let own_slot = blocks.len() as u32;
            blocks.push(Arc::new(own));
            at.iter_mut()
                .filter(|(b, _)| *b == u32::MAX)
                .for_each(|(b, _)| *b = own_slot);
        }
        let identity = blocks.len() == 1
            && at.len() * dim == blocks[0].len()
            && at.iter().enumerate().all(|(i, (_, r))| *r as usize == i);
        if identity {
            RowVectors::One(blocks.pop().expect("one block"))
        } else {
            RowVectors::Gathered { blocks, at }
        }
    }
}

/// A usearch graph and every block its members point into. Shared by the
/// indexes that serve a prefix of its members: a segment's, the rows a
/// merge has added so far, and the merge's whole index.
struct Graph {
    /// Points into `keep`: declared first, dropped first.
    index: Index,
    /// Searches, and relinking (which only adds or swaps links), hold it
    /// shared; adds while indexes of the graph serve searches, and what
    /// moves usearch's member and context arrays (growing the capacity) or
    /// frees their buffers, hold it alone. A search never runs beside an
    /// add: usearch's walk reads links without locks, and an add empties
    /// and refills other members' links.
    grow: RwLock<()>,
    /// The blocks of every row ever added (only ever grows).
    keep: Mutex<Vec<Block>>,
}

impl Graph {
    fn new(index: Index, vectors: &RowVectors) -> Graph {
        Graph {
            index,
            grow: RwLock::new(()),
            keep: Mutex::new(vectors.blocks()),
        }
    }

    fn shared(&self) -> RwLockReadGuard<'_, ()> {
        // The lock guards no data: a panic while it was held changes nothing.
        self.grow.read().unwrap_or_else(|e| e.into_inner())
    }

    fn alone(&self) -> RwLockWriteGuard<'_, ()> {
        self.grow.write().unwrap_or_else(|e| e.into_inner())
    }
}

/// A built (or loaded) index over one sealed segment's rows: the first
/// `rows` members of its graph (all of them, unless a merge has extended
/// the graph since).
pub struct HnswIndex {
    metric: Metric,
    dim: usize,
    rows: usize,
    params: IndexSpec,
    graph: Arc<Graph>,
    /// Shared with the other indexes of the graph (of more or fewer rows).
    vectors: Arc<RowVectors>,
}

/// A graph being built a run of rows at a time, for the rows of one
/// [`RowVectors`] in order: from nothing ([`GraphBuild::new`]) or from the
/// graph of an index whose rows are the first ones
/// ([`GraphBuild::extend`]). The rows added so far can serve searches
/// ([`GraphBuild::prefix`]) while the rest are added: a merge replaces its
/// sources with that prefix as their rows go in, so it never holds its
/// whole graph beside all of theirs.
pub struct GraphBuild {
    metric: Metric,
    dim: usize,
    params: IndexSpec,
    graph: Arc<Graph>,
    vectors: Arc<RowVectors>,
    /// Rows `0..added` are in the graph.
    added: usize,
    rows: usize,
}

impl GraphBuild {
    /// A new graph for the rows of `vectors`, with room for all of them.
    pub fn new(metric: Metric, dim: usize, vectors: RowVectors, params: IndexSpec) -> Result<GraphBuild, EngineError> {
        let rows = vectors.rows(dim);
        if let RowVectors::One(b) = &vectors {
            if b.len() != rows * dim {
                return Err(native(
                    "build",
                    format!("{} floats for {rows} rows of dim {dim}", b.len()),
                ));
            }
        }
        let mut index =
            Index::new_without_key_lookups(&options(metric, dim, params)).map_err(|e| native("new index", e))?;
        install_walk_metric(&mut index, metric, dim);
        // Room for its rows, its adds and the searches of its prefixes.
        let threads = rayon::current_num_threads().max(1);
        index
            .reserve_capacity_and_threads(rows.max(1), threads)
            .and_then(|()| index.reserve_search_threads(search_slots()))
            .map_err(|e| native("reserve", e))?;
        Ok(GraphBuild {
            metric,
            dim,
            params,
            graph: Arc::new(Graph::new(index, &vectors)),
            vectors: Arc::new(vectors),
            added: 0,
            rows,
        })
    }

    /// A build that adds the rows of `vectors` past `first.rows()` to
    /// `first`'s graph, when `vectors` begins with `first`'s rows in
    /// order: the merge then builds only its other rows. Searches of
    /// `first` go on meanwhile and return only its own rows (the rows
    /// added are walked through, not returned).
    ///
    /// `Ok(Err(vectors))`, with nothing changed, when the graph cannot be
    /// extended: it has grown before (a merge that extended it did not
    /// install), the build parameters differ, there is nothing to add, or
    /// `vectors` does not give `first`'s rows the very vectors its graph
    /// points to.
    pub fn extend(
        first: &HnswIndex,
        vectors: RowVectors,
        params: IndexSpec,
    ) -> Result<Result<GraphBuild, RowVectors>, EngineError> {
        let (dim, own) = (first.dim, first.rows);
        let rows = vectors.rows(dim);
        let same_rows = rows > own && (0..own as u32).all(|r| std::ptr::eq(vectors.get(r, dim), first.vector(r)));
        if params != first.params || !same_rows {
            return Ok(Err(vectors));
        }
        let graph = &first.graph;
        let _alone = graph.alone();
        if graph.index.size() != own || graph.index.capacity() != own {
            return Ok(Err(vectors));
        }
        // Before any row points into them.
        graph.keep.lock().expect("graph blocks lock").extend(vectors.blocks());
        let threads = rayon::current_num_threads().max(1);
        graph
            .index
            .reserve_capacity_and_threads(rows, threads)
            .map_err(|e| native("reserve", e))?;
        Ok(Ok(GraphBuild {
            metric: first.metric,
            dim,
            params,
            graph: graph.clone(),
            vectors: Arc::new(vectors),
            added: own,
            rows,
        }))
    }

    /// Rows in the graph so far (`0..added`).
    pub fn added(&self) -> usize {
        self.added
    }

    /// All rows the build is for.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Adds rows `added()..end` in parallel on the current rayon pool,
    /// counting them in `progress`. When indexes of the graph serve
    /// searches, the rows go in [`ADD_BATCH`] at a time with the graph to
    /// themselves, and searches run between the batches: an add rewrites
    /// other members' links (emptied, then refilled), which a walk beside
    /// it could read half done and so miss rows.
    pub fn add_through(&mut self, end: usize, progress: &AtomicU64) -> Result<(), EngineError> {
        let (graph, vectors, dim) = (&self.graph, &self.vectors, self.dim);
        let end = end.min(self.rows);
        progress.store(self.added as u64, Ordering::Relaxed);
        // Only this build holds the graph: nothing searches it, and nothing
        // can start to before `prefix`.
        let alone = Arc::strong_count(graph) == 1;
        let batch = if alone { end.max(1) } else { ADD_BATCH };
        let mut from = self.added;
        while from < end {
            let to = (from + batch).min(end);
            let _alone = graph.alone();
            (from as u32..to as u32).into_par_iter().try_for_each(|row| {
                // SAFETY: the vector is in a block the graph keeps (`keep`,
                // dropped after the index) and nothing writes.
                unsafe { graph.index.add_view(u64::from(row), vectors.get(row, dim)) }.map_err(|e| native("add", e))?;
                progress.fetch_add(1, Ordering::Relaxed);
                Ok::<(), EngineError>(())
            })?;
            self.added = to;
            from = to;
        }
        Ok(())
    }

    /// An index of the rows added so far, every one of them reachable by a
    /// walk; it shares the graph, and searches of it take turns with the
    /// adds of more rows ([`GraphBuild::add_through`]).
    pub fn prefix(&self) -> Result<HnswIndex, EngineError> {
        let index = HnswIndex {
            metric: self.metric,
            dim: self.dim,
            rows: self.added,
            params: self.params,
            graph: self.graph.clone(),
            vectors: self.vectors.clone(),
        };
        // Beside searches of the graph (no add runs: this build is the
        // only one adding, and it is here).
        let _shared = self.graph.shared();
        link_unreached(&self.graph.index, "build")?;
        Ok(index)
    }

    /// The index of every row, once all are added.
    pub fn finish(self) -> Result<HnswIndex, EngineError> {
        if self.added != self.rows {
            return Err(native(
                "build",
                format!("finished with {} of {} rows added", self.added, self.rows),
            ));
        }
        let index = self.prefix()?;
        // The adds took the graph's search slots in turn (it is readied for
        // searches from the start) and grew each one's buffers to an add's
        // needs (1.3-1.9 MiB of heap after a merge of 100,000 rows);
        // searches grow what they use again.
        let _alone = self.graph.alone();
        self.graph.index.release_thread_buffers();
        Ok(index)
    }
}

/// Thread slots an index reserves for concurrent searches (each holds a
/// visited set and two heaps: a few kilobytes plus one bit per row). More
/// searches at once than slots wait for one ([`HnswIndex::search`]).
pub fn search_slots() -> usize {
    let cores = std::thread::available_parallelism().map_or(4, |n| n.get());
    (rayon::current_num_threads().max(cores) * 4).max(64)
}

fn options(metric: Metric, dim: usize, params: IndexSpec) -> IndexOptions {
    IndexOptions {
        dimensions: dim,
        metric: match metric {
            Metric::L2 => MetricKind::L2sq,
            Metric::InnerProduct | Metric::Cosine => MetricKind::IP,
        },
        quantization: ScalarKind::F32,
        connectivity: params.m as usize,
        expansion_add: params.ef_construction as usize,
        expansion_search: DEFAULT_EF,
        multi: false,
    }
}

/// The SIMD kernels used on this CPU for `metric` at `dim`: the graph
/// walk's build ([`crate::metric::walk_kernels`]) and the one numkong
/// picks for exact scores (its own name, e.g. "skylake", "neon").
pub fn kernels(metric: Metric, dim: usize) -> String {
    let exact = Index::new(&options(metric, dim, IndexSpec::default()))
        .map_or_else(|e| format!("unknown ({e})"), |ix| ix.hardware_acceleration());
    format!(
        "graph walk {} (f32), exact scores numkong {exact} (f64 sums)",
        crate::metric::walk_kernels().name
    )
}

/// Gives `index` the graph-walk kernels of [`crate::metric`] in place of
/// usearch's own: those accumulate f32 products in f64, eight lanes per
/// AVX-512 instruction, where a walk (which only orders candidates) does
/// as well with sixteen f32 lanes. A loaded index gets usearch's metric
/// back from the file, so this runs after every build start and load.
fn install_walk_metric(index: &mut Index, metric: Metric, dim: usize) {
    // SAFETY (both closures): usearch calls the metric with two pointers
    // to vectors of the index's `dim` f32 components (stored rows or the
    // query it was handed, whose length the binding checked).
    let kernels = crate::metric::walk_kernels();
    let (dot, l2) = (kernels.dot, kernels.l2_squared);
    let walk: Box<dyn Fn(*const f32, *const f32) -> f32 + Send + Sync> = match metric {
        Metric::L2 => Box::new(move |a, b| {
            let (a, b) = unsafe { (std::slice::from_raw_parts(a, dim), std::slice::from_raw_parts(b, dim)) };
            l2(a, b)
        }),
        Metric::InnerProduct | Metric::Cosine => Box::new(move |a, b| {
            let (a, b) = unsafe { (std::slice::from_raw_parts(a, dim), std::slice::from_raw_parts(b, dim)) };
            1.0 - dot(a, b)
        }),
    };
    index.change_metric(walk);
}

/// Makes every row of the graph reachable from every walk start (usearch's
/// `link_unreached`, a patch of `vendor/usearch`): graphs built by threads
/// at once had rows that no walk, or few, reached (one row of 300 in about
/// one build in a hundred, L2 and inner product alike; 5 to 143 links per
/// 100,000 rows in `bench --mode reach`), so no unfiltered search returned
/// them.
/// Searches may run meanwhile (it changes links as an add does, in a
/// thread slot of its own); adds may not.
fn link_unreached(index: &Index, what: &str) -> Result<(), EngineError> {
    let linked = in_a_thread_slot(|| index.link_unreached()).map_err(|e| native(what, e))?;
    if linked > 0 {
        tracing::debug!(linked, rows = index.size(), "graph rows a walk missed are linked in");
    }
    Ok(())
}

/// Calls `call` until it gets one of the index's thread slots: a call that
/// finds every slot taken (more concurrent searches than reserved;
/// usearch's "Reserve capacity" error) waits for one, for at most about a
/// second (searches take micro- to milliseconds). Any other result is
/// returned as it is.
fn in_a_thread_slot<T, E: std::fmt::Display>(mut call: impl FnMut() -> Result<T, E>) -> Result<T, E> {
    let mut tries = 0u32;
    loop {
        match call() {
            Err(e) if tries < 10_100 && e.to_string().contains("Reserve capacity") => {
                tries += 1;
                if tries <= 100 {
                    std::thread::yield_now();
                } else {
                    std::thread::sleep(std::time::Duration::from_micros(100));
                }
            }
            other => return other,
        }
    }
}

fn native(what: &str, e: impl std::fmt::Display) -> EngineError {
    EngineError::corrupt(what.to_string(), format!("usearch: {e}"))
}

impl HnswIndex {
    /// Builds the index over the rows of `vectors`, adding them in
    /// parallel on the current rayon pool and counting them in `progress`.
    /// The index points into the blocks of `vectors` (no copy). Blocks for
    /// a while: call it from the builder thread only.
    #[cfg(test)]
    pub fn build(
        metric: Metric,
        dim: usize,
        vectors: RowVectors,
        params: IndexSpec,
        progress: &AtomicU64,
    ) -> Result<HnswIndex, EngineError> {
        let built = HnswIndex::build_while(metric, dim, vectors, params, progress, || true)?;
        Ok(built.expect("a build that is never called off finishes"))
    }

    /// [`HnswIndex::build`], asking `keep_going` every
    /// [`BUILD_CHECK_ROWS`] rows whether the index is still wanted: `None`
    /// once it says no (the graph so far is dropped). A segment merged
    /// away while its build runs thus frees its vectors and the cores
    /// within a fraction of a second, not at the end of the build.
    pub fn build_while(
        metric: Metric,
        dim: usize,
        vectors: RowVectors,
        params: IndexSpec,
        progress: &AtomicU64,
        mut keep_going: impl FnMut() -> bool,
    ) -> Result<Option<HnswIndex>, EngineError> {
        let mut build = GraphBuild::new(metric, dim, vectors, params)?;
        let mut end = 0;
        while end < build.rows {
            if !keep_going() {
                return Ok(None);
            }
            end = (end + BUILD_CHECK_ROWS).min(build.rows);
            build.add_through(end, progress)?;
        }
        build.finish().map(Some)
    }

    fn ready_for_searches(&self) -> Result<(), EngineError> {
        let index = &self.graph.index;
        index
            .reserve_capacity_and_threads(self.rows.max(1), 1)
            .and_then(|()| index.reserve_search_threads(search_slots()))
            .map_err(|e| native("reserve", e))
    }

    /// Whether `self` and `other` serve members of the same graph (one
    /// extended the other's).
    #[cfg(test)]
    pub(crate) fn shares_graph(&self, other: &HnswIndex) -> bool {
        Arc::ptr_eq(&self.graph, &other.graph)
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn params(&self) -> IndexSpec {
        self.params
    }

    /// The stored vector of `row`.
    pub fn vector(&self, row: u32) -> &[f32] {
        self.vectors.get(row, self.dim)
    }

    /// The block holding the vector of `row`, and its row there: what a
    /// merged index points into.
    pub fn vector_source(&self, row: u32) -> (Block, u32) {
        let (block, r) = self.vectors.source(row);
        (block.clone(), r)
    }

    /// The nearest rows to `query` that `live` accepts, nearest first, at
    /// most `k`. A filtered graph walk can come back short when few rows
    /// pass; the caller decides what to do then.
    pub fn search(
        &self,
        query: &[f32],
        k: usize,
        opts: SearchOptions,
        live: Option<&(dyn Fn(u32) -> bool + Sync)>,
    ) -> Result<Vec<u32>, EngineError> {
        let graph = &self.graph;
        let _shared = graph.shared();
        // Room for more members than this index serves: a merge is adding
        // rows to the graph (or has): walk through them, return only this
        // index's (with the expansion widened by the share of members
        // that are not, as for deleted rows). Members are added, and the
        // capacity grows, only while no search runs.
        let own = self.rows;
        let grown = graph.index.capacity() > own;
        let mine = |key: u64| key < own as u64;
        let mut ef = opts.ef.max(k);
        if grown {
            let members = graph.index.size().max(own);
            ef = ef.saturating_mul(members).div_ceil(own.max(1));
        }
        let found = in_a_thread_slot(|| match (live, grown) {
            (None, false) => graph.index.search_expanded(query, k, ef, opts.exact),
            (None, true) => graph.index.filtered_search_expanded(query, k, ef, opts.exact, mine),
            (Some(f), _) => graph
                .index
                .filtered_search_expanded(query, k, ef, opts.exact, |key| mine(key) && f(key as u32)),
        })
        .map_err(|e| native("search", e))?;
        Ok(found.keys.iter().map(|&key| key as u32).collect())
    }

    /// Writes the index (and the segment's row ids) to `path` atomically.
    pub fn save(&self, path: &Path, segment: u64, ids: &[u64]) -> Result<(), EngineError> {
        let what = path.display().to_string();
        let members = self.graph.index.size();
        if members != self.rows || ids.len() != self.rows {
            return Err(native(
                &what,
                format!(
                    "saving {} rows ({} ids) of a graph of {members} members",
                    self.rows,
                    ids.len()
                ),
            ));
        }
        let meta = postcard::to_stdvec(&IndexMeta::V1 {
            segment,
            metric: self.metric,
            dim: self.dim as u32,
            m: self.params.m,
            ef_construction: self.params.ef_construction,
            ids: ids.to_vec(),
        })
        .map_err(|e| EngineError::corrupt(what.clone(), e))?;
        // usearch writes the graph to a file of its own as it serialises
        // it; the compressor reads it from there into the index file. The
        // graph is never in memory twice (a build's peak).
        let mut graph_name = path.as_os_str().to_owned();
        graph_name.push(".graph");
        graph_name.push(fsutil::TMP_SUFFIX);
        let graph = PathBuf::from(graph_name);
        let saved = match graph.to_str() {
            Some(graph_str) => self
                .graph
                .index
                .save_graph_to_path(graph_str)
                .map_err(|e| native(&what, e))
                .and_then(|()| fsutil::write_atomic_with(path, |f| write_compressed(f, &meta, &graph))),
            None => Err(EngineError::io(
                &graph,
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "path is not UTF-8"),
            )),
        };
        let _ = std::fs::remove_file(&graph);
        saved
    }

    /// Loads an index file written by [`HnswIndex::save`] and returns it with
    /// the segment's row ids. `vectors` gives the stored vectors of a range
    /// of rows (row-major), asked for a few thousand rows at a time. Any
    /// mismatch with `expect` (or damage, or a format this build does not
    /// read) is an error: the caller rebuilds. An error of `vectors` is
    /// returned as it is.
    pub fn load(
        path: &Path,
        expect: Expect,
        vectors: &mut dyn FnMut(std::ops::Range<u32>) -> Result<Vec<f32>, EngineError>,
    ) -> Result<(HnswIndex, Vec<u64>), EngineError> {
        let bytes = std::fs::read(path).map_err(|e| EngineError::io(path, e))?;
        let what = path.display().to_string();
        let bad = |m: String| EngineError::corrupt(what.clone(), m);
        if bytes.len() < HEADER_LEN || &bytes[..8] != MAGIC {
            return Err(bad("not an edgevec index file".into()));
        }
        let word = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
        if version != HEADER_VERSION && version != PLAIN_VERSION {
            return Err(bad(format!(
                "index file header version {version}, this build reads versions {PLAIN_VERSION} and {HEADER_VERSION}"
            )));
        }
        let stored = &bytes[HEADER_LEN..];
        if word(16) != stored.len() as u64 || word(24) != fsutil::checksum(stored) {
            return Err(bad("length or checksum mismatch".into()));
        }
        let body: Cow<'_, [u8]> = if version == PLAIN_VERSION {
            Cow::Borrowed(stored)
        } else {
            // The frame states its size; bound it before allocating: a
            // graph is a few hundred bytes a row, and its ids are 8.
            let bound = (expect.rows as u64)
                .saturating_mul(MAX_BYTES_PER_ROW)
                .saturating_add(1 << 20);
            let size = zstd::zstd_safe::get_frame_content_size(stored)
                .ok()
                .flatten()
                .filter(|&n| n <= bound)
                .ok_or_else(|| bad(format!("compressed body of unknown size, or over {bound} bytes")))?;
            Cow::Owned(zstd::bulk::decompress(stored, size as usize).map_err(|e| bad(format!("decompressing: {e}")))?)
        };
        let meta_len = u32::from_le_bytes(
            body[..4.min(body.len())]
                .try_into()
                .map_err(|_| bad("short body".into()))?,
        );
        let meta_end = 4usize
            .checked_add(meta_len as usize)
            .filter(|&end| end <= body.len())
            .ok_or_else(|| bad("metadata length past the end".into()))?;
        let IndexMeta::V1 {
            segment,
            metric,
            dim,
            m,
            ef_construction,
            ids,
        } = postcard::from_bytes(&body[4..meta_end]).map_err(|e| bad(e.to_string()))?;
        let native_bytes = &body[meta_end..];
        let fits = segment == expect.segment
            && metric == expect.metric
            && dim as usize == expect.dim
            && ids.len() == expect.rows;
        if !fits {
            return Err(bad(format!(
                "file is for segment {segment} ({metric}, dim {dim}, {} rows), expected segment {} ({}, dim {}, {} rows)",
                ids.len(),
                expect.segment,
                expect.metric,
                expect.dim,
                expect.rows
            )));
        }
        let head = Index::metadata_from_buffer(native_bytes).map_err(|e| native(&what, e))?;
        let want = options(metric, dim as usize, IndexSpec::default());
        if head.dimensions != dim as u64 || head.metric != want.metric || head.quantization != ScalarKind::F32 {
            return Err(bad("usearch header does not match the segment's schema".into()));
        }
        let params = IndexSpec { m, ef_construction };
        let mut index =
            Index::new_without_key_lookups(&options(metric, dim as usize, params)).map_err(|e| native(&what, e))?;
        index
            .load_graph_from_buffer(native_bytes)
            .map_err(|e| native(&what, e))?;
        install_walk_metric(&mut index, metric, dim as usize);
        drop(body);
        drop(bytes);
        if index.size() != ids.len() {
            return Err(bad(format!(
                "usearch index holds {} rows, the segment {}",
                index.size(),
                ids.len()
            )));
        }
        // The key of every slot: each row of the segment exactly once.
        let mut keys = Vec::with_capacity(ids.len());
        let mut seen = vec![false; ids.len()];
        for slot in 0..ids.len() {
            let key = index.slot_key(slot).map_err(|e| native(&what, e))?;
            match seen.get_mut(key as usize) {
                Some(seen) if !*seen => *seen = true,
                _ => {
                    return Err(bad(format!(
                        "graph member {slot} names row {key}, twice or past the segment"
                    )))
                }
            }
            keys.push(key as u32);
        }
        drop(seen);
        let dim = dim as usize;
        let mut block = AlignedRows::zeroed(ids.len() * dim);
        for from in (0..ids.len()).step_by(ATTACH_CHUNK) {
            let to = (from + ATTACH_CHUNK).min(ids.len());
            let chunk = vectors(from as u32..to as u32)?;
            if chunk.len() != (to - from) * dim {
                return Err(bad(format!(
                    "{} floats handed for rows {from}..{to} of dim {dim}",
                    chunk.len()
                )));
            }
            block.as_mut_slice()[from * dim..to * dim].copy_from_slice(&chunk);
        }
        let vectors = RowVectors::One(Arc::new(block));
        for (slot, &row) in keys.iter().enumerate() {
            // SAFETY: as in `build`: the block is kept by the index.
            if !unsafe { index.attach_vector_view_at(slot, vectors.get(row, dim)) } {
                return Err(bad(format!("row {row} of the graph could not take its vector")));
            }
        }
        if !index.all_vectors_attached() {
            return Err(bad("a member of the graph has no row of the segment".into()));
        }
        let loaded = HnswIndex {
            metric,
            dim,
            rows: ids.len(),
            params,
            graph: Arc::new(Graph::new(index, &vectors)),
            vectors: Arc::new(vectors),
        };
        loaded.ready_for_searches()?;
        // Graphs saved before every build was linked through (it takes a
        // thread slot: after the reserve).
        link_unreached(&loaded.graph.index, &what)?;
        Ok((loaded, ids))
    }
}

#[cfg(test)]
mod tests;
