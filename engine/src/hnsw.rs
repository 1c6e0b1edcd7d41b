//! The HNSW index of a sealed segment: build, search, save, load.
//!
//! Built with instant-distance over *squared Euclidean distance* for every
//! metric, which keeps one graph type and one distance:
//! - `l2`: the vectors themselves;
//! - `cosine`: the (already unit) vectors; on the unit sphere
//!   `|q - x|² = 2 - 2·cos`, so the order is the cosine order;
//! - `ip`: plain HNSW on `-dot` is not a metric space and recalls poorly, so
//!   we use the standard MIPS → L2 reduction: each vector `x` gains one extra
//!   component `sqrt(M² - |x|²)` where `M` is the largest norm in the
//!   segment, and a query gains a `0`. Then `|q' - x'|² = |q|² + M² - 2·q·x`,
//!   so nearest in L2 is largest in inner product.
//!
//! The index owns the segment's vectors (the extra component sits after the
//! original ones, so `vector(row)` is a slice), which is how a sealed
//! segment keeps its vectors in memory exactly once.
//!
//! The candidates returned are ordered by index distance; callers rescore
//! them exactly with [`crate::metric::score`]. A search returns at most
//! `ef_search` rows (fixed when the index is built).
//!
//! File format (`seg-<id>.hnsw`): a 32-byte header — magic `EVHNSW\0\0`,
//! header version u32, reserved u32, body length u64, FNV-1a checksum u64,
//! all little endian — then the postcard body [`IndexFile`], itself a
//! versioned enum. It also carries the segment's row ids, so a sealed
//! segment can be loaded (or shipped to another replica) from this file.

use std::cell::RefCell;
use std::path::Path;

use edgevec_proto::Metric;
use instant_distance::{Builder, Hnsw, PointId, Search};
use serde::{Deserialize, Serialize};

use crate::error::EngineError;
use crate::fsutil;
use crate::metric;

/// Fixed so the same segment gives the same layer assignment everywhere.
const SEED: u64 = 0x5eed_ed9e_7ec0_0001;
const MAGIC: &[u8; 8] = b"EVHNSW\0\0";
const HEADER_VERSION: u32 = 1;
const HEADER_LEN: usize = 32;

/// Build-time parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexParams {
    pub ef_construction: usize,
    pub ef_search: usize,
}

/// A vector as the graph sees it (augmented for inner product).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IndexPoint(Vec<f32>);

impl instant_distance::Point for IndexPoint {
    fn distance(&self, other: &Self) -> f32 {
        metric::l2_squared(&self.0, &other.0)
    }
}

/// A built (or loaded) index over one sealed segment's rows.
pub struct HnswIndex {
    metric: Metric,
    dim: usize,
    ef_search: usize,
    hnsw: Hnsw<IndexPoint>,
    /// Row number → graph point; the graph stores points in its own order.
    pid_of_row: Vec<PointId>,
    /// Graph point → row number.
    row_of_pid: Vec<u32>,
}

#[derive(Serialize)]
enum IndexFileRef<'a> {
    V1(IndexBodyRef<'a>),
}

#[derive(Serialize)]
struct IndexBodyRef<'a> {
    segment: u64,
    metric: Metric,
    dim: u32,
    ef_search: u32,
    ids: &'a [u64],
    pid_of_row: &'a [PointId],
    hnsw: &'a Hnsw<IndexPoint>,
}

/// The body of an index file. Must stay field-for-field identical to
/// [`IndexBodyRef`] (the round-trip test checks it).
#[derive(Deserialize)]
enum IndexFile {
    V1(IndexBody),
}

#[derive(Deserialize)]
struct IndexBody {
    segment: u64,
    metric: Metric,
    dim: u32,
    ef_search: u32,
    ids: Vec<u64>,
    pid_of_row: Vec<PointId>,
    hnsw: Hnsw<IndexPoint>,
}

/// What the caller knows about the segment, checked against a loaded file.
#[derive(Debug, Clone, Copy)]
pub struct Expect {
    pub segment: u64,
    pub metric: Metric,
    pub dim: usize,
    pub rows: usize,
}

thread_local! {
    // A `Search` holds the visited set and heaps; reusing one per thread
    // avoids reallocating them for every segment of every query.
    static SEARCH: RefCell<Search> = RefCell::new(Search::default());
}

impl HnswIndex {
    /// Builds the index over `vectors` (`rows × dim`, row-major). Blocks for
    /// a while: call it from the builder thread only.
    pub fn build(metric: Metric, dim: usize, vectors: &[f32], params: IndexParams) -> HnswIndex {
        let points: Vec<IndexPoint> = match metric {
            Metric::L2 | Metric::Cosine => vectors.chunks_exact(dim).map(|v| IndexPoint(v.to_vec())).collect(),
            Metric::InnerProduct => {
                let max = vectors.chunks_exact(dim).map(metric::norm).fold(0.0f64, f64::max);
                vectors
                    .chunks_exact(dim)
                    .map(|v| {
                        let n = metric::norm(v);
                        let extra = (max * max - n * n).max(0.0).sqrt() as f32;
                        let mut p = Vec::with_capacity(dim + 1);
                        p.extend_from_slice(v);
                        p.push(extra);
                        IndexPoint(p)
                    })
                    .collect()
            }
        };
        let (hnsw, pid_of_row) = Builder::default()
            .ef_construction(params.ef_construction)
            .ef_search(params.ef_search)
            .seed(SEED)
            .build_hnsw(points);
        let row_of_pid = invert(&pid_of_row);
        HnswIndex {
            metric,
            dim,
            ef_search: params.ef_search,
            hnsw,
            pid_of_row,
            row_of_pid,
        }
    }

    pub fn rows(&self) -> usize {
        self.pid_of_row.len()
    }

    /// Most candidates one search returns.
    pub fn ef_search(&self) -> usize {
        self.ef_search
    }

    /// The stored vector of `row` (without the inner-product extra).
    pub fn vector(&self, row: u32) -> &[f32] {
        &self.hnsw[self.pid_of_row[row as usize]].0[..self.dim]
    }

    /// Approximate nearest rows to `query`, nearest first, at most
    /// `ef_search` of them.
    pub fn search(&self, query: &[f32]) -> Vec<u32> {
        let mut q = Vec::with_capacity(self.dim + 1);
        q.extend_from_slice(query);
        if self.metric == Metric::InnerProduct {
            q.push(0.0);
        }
        let q = IndexPoint(q);
        SEARCH.with(|s| {
            let mut s = s.borrow_mut();
            self.hnsw
                .search(&q, &mut s)
                .map(|item| self.row_of_pid[item.pid.into_inner() as usize])
                .collect()
        })
    }

    /// Writes the index (and the segment's row ids) to `path` atomically.
    pub fn save(&self, path: &Path, segment: u64, ids: &[u64]) -> Result<(), EngineError> {
        let body = postcard::to_stdvec(&IndexFileRef::V1(IndexBodyRef {
            segment,
            metric: self.metric,
            dim: self.dim as u32,
            ef_search: self.ef_search as u32,
            ids,
            pid_of_row: &self.pid_of_row,
            hnsw: &self.hnsw,
        }))
        .map_err(|e| EngineError::corrupt(path.display().to_string(), e))?;
        let mut bytes = Vec::with_capacity(HEADER_LEN + body.len());
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&HEADER_VERSION.to_le_bytes());
        bytes.extend_from_slice(&0u32.to_le_bytes());
        bytes.extend_from_slice(&(body.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&fsutil::checksum(&body).to_le_bytes());
        bytes.extend_from_slice(&body);
        fsutil::write_atomic(path, &bytes)
    }

    /// Loads an index file written by [`HnswIndex::save`] and returns it with
    /// the segment's row ids. Any mismatch with `expect` (or damage) is an
    /// error: the caller rebuilds.
    pub fn load(path: &Path, expect: Expect) -> Result<(HnswIndex, Vec<u64>), EngineError> {
        let bytes = std::fs::read(path).map_err(|e| EngineError::io(path, e))?;
        let what = path.display().to_string();
        let bad = |m: String| EngineError::corrupt(what.clone(), m);
        if bytes.len() < HEADER_LEN || &bytes[..8] != MAGIC {
            return Err(bad("not an edgevec index file".into()));
        }
        let word = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
        if version != HEADER_VERSION {
            return Err(bad(format!("unknown header version {version}")));
        }
        let body = &bytes[HEADER_LEN..];
        if word(16) != body.len() as u64 || word(24) != fsutil::checksum(body) {
            return Err(bad("length or checksum mismatch".into()));
        }
        let IndexFile::V1(b) = postcard::from_bytes(body).map_err(|e| bad(e.to_string()))?;
        let fits = b.segment == expect.segment
            && b.metric == expect.metric
            && b.dim as usize == expect.dim
            && b.ids.len() == expect.rows
            && b.pid_of_row.len() == expect.rows
            && b.hnsw.iter().count() == expect.rows
            && b.pid_of_row.iter().all(|p| (p.into_inner() as usize) < expect.rows);
        if !fits {
            return Err(bad(format!(
                "file is for segment {} ({}, dim {}, {} rows), expected segment {} ({}, dim {}, {} rows)",
                b.segment,
                b.metric,
                b.dim,
                b.ids.len(),
                expect.segment,
                expect.metric,
                expect.dim,
                expect.rows
            )));
        }
        let row_of_pid = invert(&b.pid_of_row);
        let index = HnswIndex {
            metric: b.metric,
            dim: b.dim as usize,
            ef_search: b.ef_search as usize,
            hnsw: b.hnsw,
            pid_of_row: b.pid_of_row,
            row_of_pid,
        };
        Ok((index, b.ids))
    }
}

fn invert(pid_of_row: &[PointId]) -> Vec<u32> {
    let mut row_of_pid = vec![0u32; pid_of_row.len()];
    for (row, pid) in pid_of_row.iter().enumerate() {
        row_of_pid[pid.into_inner() as usize] = row as u32;
    }
    row_of_pid
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random(rows: usize, dim: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..rows * dim).map(|_| rng.gen_range(-1.0..1.0)).collect()
    }

    const PARAMS: IndexParams = IndexParams {
        ef_construction: 64,
        ef_search: 32,
    };

    #[test]
    fn finds_itself_and_keeps_vectors() {
        for metric in [Metric::L2, Metric::InnerProduct] {
            let dim = 8;
            let v = random(300, dim, 1);
            let ix = HnswIndex::build(metric, dim, &v, PARAMS);
            assert_eq!(ix.rows(), 300);
            for row in [0u32, 17, 299] {
                assert_eq!(ix.vector(row), &v[row as usize * dim..][..dim]);
            }
            let got = ix.search(&v[17 * dim..][..dim]);
            assert!(got.len() <= 32 && !got.is_empty());
            if metric == Metric::L2 {
                assert_eq!(got[0], 17);
            } else {
                // The best inner product of q = x17 is the row maximising x·x17.
                let q = &v[17 * dim..][..dim];
                let best = (0..300u32)
                    .max_by(|&a, &b| metric::dot(q, ix.vector(a)).total_cmp(&metric::dot(q, ix.vector(b))))
                    .unwrap();
                assert_eq!(got[0], best);
            }
        }
    }

    #[test]
    fn save_load_roundtrip_and_rejects_damage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seg-3.hnsw");
        let dim = 4;
        let v = random(100, dim, 2);
        let ids: Vec<u64> = (1000..1100).collect();
        let ix = HnswIndex::build(Metric::InnerProduct, dim, &v, PARAMS);
        ix.save(&path, 3, &ids).unwrap();
        let expect = Expect {
            segment: 3,
            metric: Metric::InnerProduct,
            dim,
            rows: 100,
        };
        let (loaded, loaded_ids) = HnswIndex::load(&path, expect).unwrap();
        assert_eq!(loaded_ids, ids);
        assert_eq!(loaded.ef_search(), 32);
        assert_eq!(loaded.vector(42), ix.vector(42));
        assert_eq!(loaded.search(&v[..dim]), ix.search(&v[..dim]));

        assert!(HnswIndex::load(&path, Expect { segment: 4, ..expect }).is_err());
        assert!(HnswIndex::load(&path, Expect { rows: 99, ..expect }).is_err());
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        assert!(HnswIndex::load(&path, expect).is_err());
        std::fs::write(&path, b"short").unwrap();
        assert!(HnswIndex::load(&path, expect).is_err());
    }
}
