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

/// Lanes the graph-walk kernels sum side by side: two AVX-512 registers,
/// four AVX2 or eight NEON ones, so consecutive fused multiply-adds do not
/// wait on each other's result.
const LANES: usize = 32;

/// A distance kernel of the graph walk.
pub type WalkKernel = fn(&[f32], &[f32]) -> f32;

/// The graph-walk kernels of one build.
#[derive(Clone, Copy)]
pub struct WalkKernels {
    /// The build: "avx512", "avx2", "neon" or "portable".
    pub name: &'static str,
    pub dot: WalkKernel,
    pub l2_squared: WalkKernel,
}

/// The graph-walk kernels for this CPU, chosen at run time: dot product
/// and squared Euclidean distance with f32 accumulation in [`LANES`]
/// lanes, compiled for AVX-512 and for AVX2+FMA on x86-64 (NEON is part of
/// every aarch64 build). Twice the lanes per instruction of the
/// f64-accumulating [`dot`] and [`l2_squared`], whose precision a walk
/// does not need: it only orders candidates, and the scores a client sees
/// come from [`score`].
pub fn walk_kernels() -> WalkKernels {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma") {
            return x86::AVX512;
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return x86::AVX2;
        }
    }
    // aarch64 has fused multiply-add in its base instruction set.
    if cfg!(target_arch = "aarch64") {
        WalkKernels {
            name: "neon",
            dot: dot_lanes::<true>,
            l2_squared: l2_lanes::<true>,
        }
    } else {
        WalkKernels {
            name: "portable",
            dot: dot_lanes::<false>,
            l2_squared: l2_lanes::<false>,
        }
    }
}

/// Per-CPU builds of the walk kernels: the same Rust, compiled with the
/// instruction sets enabled, entered only after the CPU reported them.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{dot_lanes, l2_lanes, WalkKernels};

    /// A safe entry `$name` to `$body` compiled with `$features`.
    macro_rules! built_for {
        ($name:ident, $features:literal, $body:expr) => {
            fn $name(a: &[f32], b: &[f32]) -> f32 {
                #[target_feature(enable = $features)]
                unsafe fn inner(a: &[f32], b: &[f32]) -> f32 {
                    $body(a, b)
                }
                // SAFETY: reached only through `walk_kernels`, which hands
                // out this build where the CPU reported these features.
                unsafe { inner(a, b) }
            }
        };
    }

    built_for!(dot_avx512, "avx512f,avx2,fma", dot_lanes::<true>);
    built_for!(l2_avx512, "avx512f,avx2,fma", l2_lanes::<true>);
    built_for!(dot_avx2, "avx2,fma", dot_lanes::<true>);
    built_for!(l2_avx2, "avx2,fma", l2_lanes::<true>);

    pub const AVX512: WalkKernels = WalkKernels {
        name: "avx512",
        dot: dot_avx512,
        l2_squared: l2_avx512,
    };
    pub const AVX2: WalkKernels = WalkKernels {
        name: "avx2",
        dot: dot_avx2,
        l2_squared: l2_avx2,
    };
}

/// `a·b + c`, fused when `FUSED` (without the instruction a fused
/// multiply-add is a slow library call, so the plain form is used).
#[inline(always)]
fn madd<const FUSED: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FUSED {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

#[inline(always)]
fn dot_lanes<const FUSED: bool>(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let ((xs, xt), (ys, yt)) = (a[..n].as_chunks::<LANES>(), b[..n].as_chunks::<LANES>());
    let mut acc = [0.0f32; LANES];
    for (x, y) in xs.iter().zip(ys) {
        for i in 0..LANES {
            acc[i] = madd::<FUSED>(x[i], y[i], acc[i]);
        }
    }
    let tail = xt.iter().zip(yt).fold(0.0, |t, (x, y)| madd::<FUSED>(*x, *y, t));
    lane_sum(&acc) + tail
}

#[inline(always)]
fn l2_lanes<const FUSED: bool>(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let ((xs, xt), (ys, yt)) = (a[..n].as_chunks::<LANES>(), b[..n].as_chunks::<LANES>());
    let mut acc = [0.0f32; LANES];
    for (x, y) in xs.iter().zip(ys) {
        for i in 0..LANES {
            let d = x[i] - y[i];
            acc[i] = madd::<FUSED>(d, d, acc[i]);
        }
    }
    let tail = xt.iter().zip(yt).fold(0.0, |t, (x, y)| madd::<FUSED>(x - y, x - y, t));
    lane_sum(&acc) + tail
}

/// Pairwise sum of the lanes. Kept out of line: inlined, its narrowing
/// adds lead the compiler to split the accumulators into 2-lane vectors.
#[inline(never)]
fn lane_sum(acc: &[f32; LANES]) -> f32 {
    let mut v = *acc;
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for i in 0..width {
            v[i] += v[i + width];
        }
    }
    v[0]
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
    fn walk_kernels_match_the_exact_ones() {
        // Every build this CPU can run, not only the one it gets.
        let mut builds = vec![
            walk_kernels(),
            WalkKernels {
                name: "portable",
                dot: dot_lanes::<false>,
                l2_squared: l2_lanes::<false>,
            },
            WalkKernels {
                name: "fused",
                dot: dot_lanes::<true>,
                l2_squared: l2_lanes::<true>,
            },
        ];
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            builds.push(x86::AVX2);
        }
        for build in builds {
            check_walk_kernels(build.dot, build.l2_squared);
        }
    }

    fn check_walk_kernels(walk_dot: WalkKernel, walk_l2_squared: WalkKernel) {
        // Every length around the lane count (tails of every size) and a
        // few dimensions users pick.
        for n in (0..=70).chain([128, 384, 768, 1000]) {
            let a: Vec<f32> = (0..n).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
            let b: Vec<f32> = (0..n).map(|i| ((i * 53 % 89) as f32 - 44.0) / 30.0).collect();
            let (d, wd) = (dot(&a, &b), walk_dot(&a, &b));
            assert!((d - wd).abs() <= 1e-4 * (1.0 + d.abs()), "dot at {n}: {d} vs {wd}");
            let (l, wl) = (l2_squared(&a, &b), walk_l2_squared(&a, &b));
            assert!((l - wl).abs() <= 1e-4 * (1.0 + l), "l2 at {n}: {l} vs {wl}");
        }
        assert_eq!(walk_dot(&[1.0, 2.0], &[3.0, 4.0]), 11.0);
        assert_eq!(walk_l2_squared(&[0.0, 0.0], &[3.0, 4.0]), 25.0);
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
