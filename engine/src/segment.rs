//! One segment of a shard replica, in memory.
//!
//! A segment is an append-only list of rows `(id, vector)` plus a tombstone
//! bit per row. It is **growing** (takes rows, searched by brute force)
//! until the shard seals it; then it is **sealed**: immutable except for new
//! tombstones, searched by brute force while its index is built
//! ([`IndexState::Building`]) and through the HNSW index once installed
//! ([`IndexState::Ready`]).
//!
//! Invariants:
//! - the vectors are held once: in the growing buffer, in the shared sealed
//!   buffer (which the builder thread reads), or inside the index;
//! - a row is live iff it is not tombstoned; search and get never return a
//!   tombstoned row;
//! - an index search is used only when it can return `k` live rows: if
//!   `k` plus the segment's tombstones exceed what the index returned (at
//!   most `ef_search`), the segment is searched exactly instead, so deletes
//!   never make results go missing.

use std::sync::Arc;

use edgevec_proto::{IndexState, Metric, SegmentInfo, SegmentState};

use crate::hnsw::HnswIndex;
use crate::metric::{self, Candidate, TopK};

enum Vectors {
    Growing(Vec<f32>),
    /// Sealed, index not installed yet; shared with the builder thread.
    Sealed(Arc<Vec<f32>>),
    Indexed(Arc<HnswIndex>),
}

pub struct Segment {
    id: u64,
    dim: usize,
    ids: Vec<u64>,
    dead: Vec<bool>,
    deleted: u64,
    vectors: Vectors,
}

impl Segment {
    pub fn growing(id: u64, dim: usize) -> Segment {
        Segment::from_parts(id, dim, Vec::new(), Vectors::Growing(Vec::new()))
    }

    /// A growing segment restored from disk.
    pub fn growing_with(id: u64, dim: usize, ids: Vec<u64>, vectors: Vec<f32>) -> Segment {
        Segment::from_parts(id, dim, ids, Vectors::Growing(vectors))
    }

    /// A sealed segment whose index still has to be built.
    pub fn sealed(id: u64, dim: usize, ids: Vec<u64>, vectors: Vec<f32>) -> Segment {
        Segment::from_parts(id, dim, ids, Vectors::Sealed(Arc::new(vectors)))
    }

    /// A sealed segment with its index.
    pub fn indexed(id: u64, dim: usize, ids: Vec<u64>, index: Arc<HnswIndex>) -> Segment {
        Segment::from_parts(id, dim, ids, Vectors::Indexed(index))
    }

    fn from_parts(id: u64, dim: usize, ids: Vec<u64>, vectors: Vectors) -> Segment {
        Segment {
            id,
            dim,
            dead: vec![false; ids.len()],
            ids,
            deleted: 0,
            vectors,
        }
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
            Vectors::Indexed(_) => IndexState::Ready,
        }
    }

    /// Appends a row; returns its row number. Only growing segments take
    /// rows (the plan never appends elsewhere).
    pub fn push(&mut self, id: u64, vector: &[f32]) -> u32 {
        let Vectors::Growing(buf) = &mut self.vectors else {
            panic!("segment {} is sealed and takes no rows", self.id);
        };
        debug_assert_eq!(vector.len(), self.dim);
        buf.extend_from_slice(vector);
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
    pub fn seal(&mut self) -> Arc<Vec<f32>> {
        match &mut self.vectors {
            Vectors::Growing(buf) => {
                let mut buf = std::mem::take(buf);
                buf.shrink_to_fit();
                let shared = Arc::new(buf);
                self.vectors = Vectors::Sealed(shared.clone());
                shared
            }
            Vectors::Sealed(v) => v.clone(),
            Vectors::Indexed(_) => panic!("segment {} is already indexed", self.id),
        }
    }

    /// The vectors an index build needs, if the segment is waiting for one.
    pub fn pending_build(&self) -> Option<Arc<Vec<f32>>> {
        match &self.vectors {
            Vectors::Sealed(v) => Some(v.clone()),
            _ => None,
        }
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

    pub fn vector(&self, row: u32) -> &[f32] {
        match &self.vectors {
            Vectors::Growing(v) => &v[row as usize * self.dim..][..self.dim],
            Vectors::Sealed(v) => &v[row as usize * self.dim..][..self.dim],
            Vectors::Indexed(ix) => ix.vector(row),
        }
    }

    /// The best `k` live rows for `query`, best first.
    pub fn search(&self, metric: Metric, query: &[f32], k: usize) -> Vec<Candidate> {
        if let Vectors::Indexed(ix) = &self.vectors {
            let need = k + self.deleted as usize;
            if need <= ix.ef_search().min(self.rows()) {
                let rows = ix.search(query);
                if rows.len() >= need {
                    let mut top = TopK::new(metric, k);
                    for row in rows {
                        self.offer(metric, query, row, &mut top);
                    }
                    return top.into_sorted();
                }
            }
        }
        self.exact_search(metric, query, k)
    }

    /// Brute force over every live row.
    pub fn exact_search(&self, metric: Metric, query: &[f32], k: usize) -> Vec<Candidate> {
        let mut top = TopK::new(metric, k);
        for row in 0..self.rows() as u32 {
            self.offer(metric, query, row, &mut top);
        }
        top.into_sorted()
    }

    fn offer(&self, metric: Metric, query: &[f32], row: u32, top: &mut TopK) {
        if self.is_live(row) {
            top.push(Candidate {
                id: self.ids[row as usize],
                score: metric::score(metric, query, self.vector(row)),
                segment: self.id,
                row,
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
    use crate::hnsw::IndexParams;

    fn filled(n: u64) -> Segment {
        let mut s = Segment::growing(1, 2);
        for id in 0..n {
            s.push(id, &[id as f32, 0.0]);
        }
        s
    }

    #[test]
    fn growing_search_skips_tombstones() {
        let mut s = filled(10);
        let ids = |c: Vec<Candidate>| c.iter().map(|c| c.id).collect::<Vec<_>>();
        assert_eq!(ids(s.search(Metric::L2, &[0.0, 0.0], 3)), vec![0, 1, 2]);
        s.tombstone(1);
        s.tombstone(1);
        assert_eq!(s.info(0).deleted, 1);
        assert_eq!(ids(s.search(Metric::L2, &[0.0, 0.0], 3)), vec![0, 2, 3]);
        assert_eq!(ids(s.search(Metric::InnerProduct, &[1.0, 0.0], 2)), vec![9, 8]);
    }

    #[test]
    fn indexed_falls_back_when_tombstones_crowd_the_index() {
        let mut s = filled(100);
        let v = s.seal();
        assert_eq!(s.index_state(), IndexState::Building);
        let params = IndexParams {
            ef_construction: 32,
            ef_search: 8,
        };
        s.install_index(Arc::new(HnswIndex::build(Metric::L2, 2, &v, params)));
        drop(v);
        assert_eq!(s.index_state(), IndexState::Ready);
        assert_eq!(s.vector(42), &[42.0, 0.0]);
        // Delete the 6 nearest rows: k + tombstones (5 + 6) exceeds
        // ef_search (8), so the exact path must answer.
        for row in 0..6 {
            s.tombstone(row);
        }
        let got: Vec<u64> = s.search(Metric::L2, &[0.0, 0.0], 5).iter().map(|c| c.id).collect();
        assert_eq!(got, vec![6, 7, 8, 9, 10]);
        // k above ef_search also takes the exact path.
        assert_eq!(s.search(Metric::L2, &[0.0, 0.0], 50).len(), 50);
    }
}
