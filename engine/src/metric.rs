//! Vector arithmetic, scores and best-first ordering.
//!
//! A score is what the client sees: the Euclidean distance for `l2` (smaller
//! is better), the dot product for `ip` and the cosine similarity for
//! `cosine` (larger is better). Cosine vectors are normalised once on insert
//! (and queries once per search), so their score is a plain dot product.
//!
//! Ordering is total and deterministic: scores compare with `total_cmp`
//! (an overflow to infinity still sorts) and ties go to the smaller id, so
//! every replica and every merge returns the same list for the same data.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use edgevec_proto::Metric;

/// Dot product, with the SIMD kernel numkong picks for this CPU at run
/// time (AVX2/FMA/AVX-512 on x86-64, NEON/SVE on aarch64), accumulated in
/// f64.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    <f32 as numkong::Dot>::dot(a, b).unwrap_or(f64::NAN) as f32
}

/// Squared Euclidean distance (monotone in the distance, no square root),
/// with numkong's run-time SIMD kernel, accumulated in f64.
pub fn l2_squared(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    <f32 as numkong::Euclidean>::sqeuclidean(a, b).unwrap_or(f64::NAN) as f32
}

/// Euclidean norm, accumulated in f64 so large finite components do not
/// overflow to infinity on the way.
pub fn norm(v: &[f32]) -> f64 {
    v.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>().sqrt()
}

/// Scales `v` to unit length in place; `false` (and `v` untouched) if it has
/// no direction (zero, or so small that the result would not be finite).
pub fn normalize(v: &mut [f32]) -> bool {
    let n = norm(v);
    if n == 0.0 || !n.is_finite() {
        return false;
    }
    let scaled: Vec<f32> = v.iter().map(|&x| (f64::from(x) / n) as f32).collect();
    if scaled.iter().any(|x| !x.is_finite()) {
        return false;
    }
    v.copy_from_slice(&scaled);
    true
}

/// The client-visible score of `vector` for `query` (both already
/// normalised for cosine).
pub fn score(metric: Metric, query: &[f32], vector: &[f32]) -> f32 {
    match metric {
        Metric::L2 => l2_squared(query, vector).sqrt(),
        Metric::InnerProduct | Metric::Cosine => dot(query, vector),
    }
}

/// Compares two scores: `Less` means `a` is the better one.
pub fn compare_scores(metric: Metric, a: f32, b: f32) -> Ordering {
    if metric.higher_is_better() {
        b.total_cmp(&a)
    } else {
        a.total_cmp(&b)
    }
}

/// A scored row found by a search, before payloads are attached.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    pub id: u64,
    pub score: f32,
    /// Where the row lives, so its payload can be read back.
    pub segment: u64,
    pub row: u32,
}

impl AsRef<Candidate> for Candidate {
    fn as_ref(&self) -> &Candidate {
        self
    }
}

/// Best-first order of candidates: score, then id.
pub fn compare_candidates(metric: Metric, a: &Candidate, b: &Candidate) -> Ordering {
    compare_scores(metric, a.score, b.score).then(a.id.cmp(&b.id))
}

/// Keeps the `k` best candidates seen so far. `T` is a candidate or a
/// candidate with something attached (such as where it was found).
pub struct TopK<T = Candidate> {
    metric: Metric,
    k: usize,
    /// Max-heap on "worse", so the root is the candidate to evict.
    heap: BinaryHeap<Ranked<T>>,
}

struct Ranked<T>(Metric, T);

impl<T: AsRef<Candidate>> PartialEq for Ranked<T> {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl<T: AsRef<Candidate>> Eq for Ranked<T> {}
impl<T: AsRef<Candidate>> PartialOrd for Ranked<T> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl<T: AsRef<Candidate>> Ord for Ranked<T> {
    fn cmp(&self, other: &Self) -> Ordering {
        compare_candidates(self.0, self.1.as_ref(), other.1.as_ref())
    }
}

impl<T: AsRef<Candidate>> TopK<T> {
    pub fn new(metric: Metric, k: usize) -> Self {
        TopK {
            metric,
            k,
            heap: BinaryHeap::with_capacity(k.min(4096) + 1),
        }
    }

    pub fn push(&mut self, c: T) {
        if self.k == 0 {
            return;
        }
        if self.heap.len() < self.k {
            self.heap.push(Ranked(self.metric, c));
        } else if let Some(worst) = self.heap.peek() {
            if compare_candidates(self.metric, c.as_ref(), worst.1.as_ref()) == Ordering::Less {
                self.heap.pop();
                self.heap.push(Ranked(self.metric, c));
            }
        }
    }

    /// The kept candidates, best first.
    pub fn into_sorted(self) -> Vec<T> {
        // `into_sorted_vec` is ascending in `Ord`, i.e. best first.
        self.heap.into_sorted_vec().into_iter().map(|r| r.1).collect()
    }
}

/// Merges best-first lists (one per shard or segment) into the best `k`.
pub fn merge<T: AsRef<Candidate>>(metric: Metric, k: usize, lists: impl IntoIterator<Item = Vec<T>>) -> Vec<T> {
    let mut top = TopK::new(metric, k);
    for list in lists {
        for c in list {
            top.push(c);
        }
    }
    top.into_sorted()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(id: u64, score: f32) -> Candidate {
        Candidate {
            id,
            score,
            segment: 0,
            row: 0,
        }
    }

    #[test]
    fn values() {
        let a: Vec<f32> = (0..19).map(|i| i as f32).collect();
        let b: Vec<f32> = (0..19).map(|i| (i * 2) as f32).collect();
        let want_dot: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert_eq!(dot(&a, &b), want_dot);
        let want_l2: f32 = a.iter().zip(&b).map(|(x, y)| (x - y) * (x - y)).sum();
        assert_eq!(l2_squared(&a, &b), want_l2);
        assert_eq!(score(Metric::L2, &[0.0, 0.0], &[3.0, 4.0]), 5.0);
        assert_eq!(score(Metric::InnerProduct, &[1.0, 2.0], &[3.0, 4.0]), 11.0);
    }

    #[test]
    fn cosine_normalisation() {
        let mut v = vec![3.0, 4.0];
        assert!(normalize(&mut v));
        assert!((v[0] - 0.6).abs() < 1e-6 && (v[1] - 0.8).abs() < 1e-6);
        let mut q = vec![6.0, 8.0];
        assert!(normalize(&mut q));
        assert!((score(Metric::Cosine, &q, &v) - 1.0).abs() < 1e-6);
        let mut orth = vec![-4.0, 3.0];
        assert!(normalize(&mut orth));
        assert!(score(Metric::Cosine, &q, &orth).abs() < 1e-6);
        let mut zero = vec![0.0, 0.0];
        assert!(!normalize(&mut zero));
        // Large but finite components must not overflow the norm.
        let mut big = vec![3e38, 3e38];
        assert!(normalize(&mut big));
        assert!((big[0] - std::f32::consts::FRAC_1_SQRT_2).abs() < 1e-6);
    }

    #[test]
    fn ordering_by_metric() {
        assert_eq!(compare_scores(Metric::L2, 1.0, 2.0), Ordering::Less);
        assert_eq!(compare_scores(Metric::InnerProduct, 1.0, 2.0), Ordering::Greater);
        assert_eq!(compare_scores(Metric::Cosine, 0.9, -0.5), Ordering::Less);
        // Ties break on id so replicas agree.
        let lists = vec![vec![cand(7, 1.0), cand(3, 2.0)], vec![cand(2, 1.0), cand(9, 0.5)]];
        let l2: Vec<u64> = merge(Metric::L2, 3, lists.clone()).iter().map(|c| c.id).collect();
        assert_eq!(l2, vec![9, 2, 7]);
        let ip: Vec<u64> = merge(Metric::InnerProduct, 3, lists).iter().map(|c| c.id).collect();
        assert_eq!(ip, vec![3, 2, 7]);
    }

    #[test]
    fn topk_keeps_best() {
        let mut top = TopK::new(Metric::L2, 3);
        for (i, s) in [5.0, 1.0, 4.0, 0.5, 3.0, f32::INFINITY].into_iter().enumerate() {
            top.push(cand(i as u64, s));
        }
        let got: Vec<f32> = top.into_sorted().iter().map(|c| c.score).collect();
        assert_eq!(got, vec![0.5, 1.0, 3.0]);
    }
}
