use super::*;
use crate::metric;
use rand::{Rng, SeedableRng};
use std::sync::atomic::AtomicU64;

fn random(rows: usize, dim: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..rows * dim).map(|_| rng.gen_range(-1.0..1.0)).collect()
}

const PARAMS: IndexSpec = IndexSpec {
    m: 8,
    ef_construction: 64,
};

fn vector(ix: &HnswIndex, row: u32) -> Vec<f32> {
    ix.vector(row).to_vec()
}

fn one(v: &[f32]) -> RowVectors {
    RowVectors::One(Arc::new(AlignedRows::from_slice(v)))
}

#[test]
fn finds_itself_and_keeps_vectors() {
    for metric in [Metric::L2, Metric::InnerProduct] {
        let dim = 8;
        let v = random(300, dim, 1);
        let progress = AtomicU64::new(0);
        let ix = HnswIndex::build(metric, dim, one(&v), PARAMS, &progress).unwrap();
        assert_eq!(ix.rows(), 300);
        assert_eq!(progress.load(Ordering::Relaxed), 300, "every row counted");
        for row in [0u32, 17, 299] {
            assert_eq!(vector(&ix, row), &v[row as usize * dim..][..dim]);
        }
        let q = &v[17 * dim..][..dim];
        // A walk whose expansion covers every row: what the graph holds
        // is checked, not the luck of a short walk on a graph built by
        // threads in any order (at the default expansion it missed row 17
        // once in many runs; before every row was linked in, a walk as
        // wide as the index missed it in about one build in a hundred).
        let walk = SearchOptions { ef: 300, exact: false };
        let got = ix.search(q, 5, walk, None).unwrap();
        assert_eq!(got.len(), 5);
        if metric == Metric::L2 {
            assert_eq!(got[0], 17);
        } else {
            // The best inner product of q = x17 is the row maximising x·x17.
            let best = (0..300u32)
                .max_by(|&a, &b| metric::dot(q, &vector(&ix, a)).total_cmp(&metric::dot(q, &vector(&ix, b))))
                .unwrap();
            assert_eq!(got[0], best);
        }
    }
}

#[test]
fn a_build_called_off_stops_between_checks() {
    let dim = 4;
    let rows = BUILD_CHECK_ROWS * 2 + 100;
    let v = random(rows, dim, 9);
    let (progress, mut asked) = (AtomicU64::new(0), 0);
    let built = HnswIndex::build_while(Metric::L2, dim, one(&v), PARAMS, &progress, || {
        asked += 1;
        asked < 2
    })
    .unwrap();
    assert!(built.is_none(), "called off at the second check");
    assert_eq!(
        progress.load(Ordering::Relaxed),
        BUILD_CHECK_ROWS as u64,
        "one step was added"
    );

    let (progress, mut asked) = (AtomicU64::new(0), 0);
    let ix = HnswIndex::build_while(Metric::L2, dim, one(&v), PARAMS, &progress, || {
        asked += 1;
        true
    })
    .unwrap()
    .expect("never called off");
    assert_eq!((ix.rows(), asked), (rows, 3), "asked before each of the three steps");
    assert_eq!(progress.load(Ordering::Relaxed), rows as u64);
}

#[test]
fn exact_and_filtered_searches_keep_their_promises() {
    let dim = 16;
    let v = random(2000, dim, 3);
    let ix = HnswIndex::build(Metric::L2, dim, one(&v), PARAMS, &AtomicU64::new(0)).unwrap();
    let q = random(1, dim, 4);
    let mut truth: Vec<(u32, f32)> = (0..2000u32)
        .map(|r| (r, metric::l2_squared(&q, &v[r as usize * dim..][..dim])))
        .collect();
    truth.sort_by(|a, b| a.1.total_cmp(&b.1));
    let exact = SearchOptions { ef: 1, exact: true };
    assert_eq!(
        ix.search(&q, 10, exact, None).unwrap(),
        truth[..10].iter().map(|t| t.0).collect::<Vec<_>>(),
        "exact search is brute force whatever ef says"
    );
    // Only even rows: every answer passes the filter, and exact + filter is
    // the brute force over the filtered set.
    let even = |r: u32| r.is_multiple_of(2);
    let got = ix.search(&q, 10, exact, Some(&even)).unwrap();
    let want: Vec<u32> = truth
        .iter()
        .map(|t| t.0)
        .filter(|r| r.is_multiple_of(2))
        .take(10)
        .collect();
    assert_eq!(got, want);
    let walked = ix.search(&q, 10, SearchOptions::default(), Some(&even)).unwrap();
    assert!(walked.iter().all(|r| r.is_multiple_of(2)) && !walked.is_empty());
}

#[test]
fn recall_grows_with_ef() {
    let (dim, n, k) = (24, 4000, 10);
    let v = random(n, dim, 5);
    let params = IndexSpec {
        m: 4,
        ef_construction: 16,
    };
    let ix = HnswIndex::build(Metric::L2, dim, one(&v), params, &AtomicU64::new(0)).unwrap();
    let queries = random(100, dim, 6);
    let truth: Vec<Vec<u32>> = queries
        .chunks_exact(dim)
        .map(|q| ix.search(q, k, SearchOptions { ef: 1, exact: true }, None).unwrap())
        .collect();
    let recall = |ef: usize| {
        let mut hit = 0;
        for (q, want) in queries.chunks_exact(dim).zip(&truth) {
            let got = ix.search(q, k, SearchOptions { ef, exact: false }, None).unwrap();
            hit += got.iter().filter(|r| want.contains(r)).count();
        }
        hit as f64 / (truth.len() * k) as f64
    };
    let curve: Vec<f64> = [10, 40, 160, 640].into_iter().map(recall).collect();
    assert!(curve.windows(2).all(|w| w[1] >= w[0]), "{curve:?}");
    assert!(curve[3] > curve[0], "a larger ef must find more: {curve:?}");
}

#[test]
fn save_load_roundtrip_and_rejects_damage() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("seg-3.hnsw");
    let dim = 64;
    let n = 5000;
    let v = random(n, dim, 2);
    let ids: Vec<u64> = (1000..1000 + n as u64).collect();
    let ix = HnswIndex::build(Metric::InnerProduct, dim, one(&v), PARAMS, &AtomicU64::new(0)).unwrap();
    ix.save(&path, 3, &ids).unwrap();
    // The graph went through a file of its own, removed after the save.
    let files: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(files, vec!["seg-3.hnsw".to_string()]);
    // The file holds the graph and the ids, not the vectors (the shard
    // file keeps those).
    let size = std::fs::metadata(&path).unwrap().len() as usize;
    assert!(
        size < v.len() * 4 / 2,
        "{size} bytes for {} bytes of vectors",
        v.len() * 4
    );
    let expect = Expect {
        segment: 3,
        metric: Metric::InnerProduct,
        dim,
        rows: n,
    };
    let mut asked = Vec::new();
    let mut rows = |r: std::ops::Range<u32>| -> Result<Vec<f32>, EngineError> {
        asked.push(r.clone());
        Ok(v[r.start as usize * dim..r.end as usize * dim].to_vec())
    };
    let (loaded, loaded_ids) = HnswIndex::load(&path, expect, &mut rows).unwrap();
    assert_eq!(asked, vec![0..4096, 4096..5000], "vectors asked for in chunks");
    assert_eq!(loaded_ids, ids);
    assert_eq!(loaded.graph.index.capacity(), ids.len());
    assert_eq!(loaded.params(), PARAMS);
    for row in [0, 42, 4095, 4096, 4999] {
        assert_eq!(vector(&loaded, row), vector(&ix, row));
    }
    // Vectors of the wrong length, or a failing read, are errors.
    let mut short = |r: std::ops::Range<u32>| -> Result<Vec<f32>, EngineError> {
        Ok(vec![0.0; (r.end - r.start) as usize * dim - 1])
    };
    assert!(HnswIndex::load(&path, expect, &mut short).is_err());
    let mut failing = |_: std::ops::Range<u32>| -> Result<Vec<f32>, EngineError> {
        Err(EngineError::corrupt("shard.redb", "row missing"))
    };
    let e = HnswIndex::load(&path, expect, &mut failing).err().unwrap().to_string();
    assert!(e.contains("row missing"), "{e}");
    let mut rows = |r: std::ops::Range<u32>| -> Result<Vec<f32>, EngineError> {
        Ok(v[r.start as usize * dim..r.end as usize * dim].to_vec())
    };
    let opts = SearchOptions::default();
    assert_eq!(
        loaded.search(&v[..dim], 5, opts, None).unwrap(),
        ix.search(&v[..dim], 5, opts, None).unwrap()
    );
    // Filtered search on a loaded index (the only load path: a copy).
    let odd = |r: u32| r % 2 == 1;
    let got = loaded.search(&v[..dim], 5, opts, Some(&odd)).unwrap();
    assert!(!got.is_empty() && got.iter().all(|r| r % 2 == 1));

    assert!(HnswIndex::load(&path, Expect { segment: 4, ..expect }, &mut rows).is_err());
    assert!(HnswIndex::load(&path, Expect { rows: 99, ..expect }, &mut rows).is_err());
    assert!(HnswIndex::load(
        &path,
        Expect {
            metric: Metric::L2,
            ..expect
        },
        &mut rows
    )
    .is_err());
    let good = std::fs::read(&path).unwrap();
    let mut bytes = good.clone();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    assert!(HnswIndex::load(&path, expect, &mut rows).is_err());
    std::fs::write(&path, b"short").unwrap();
    assert!(HnswIndex::load(&path, expect, &mut rows).is_err());
    // A file of another header version (1: the instant-distance graph, 2:
    // usearch with its vectors inside) is refused with its version named,
    // not misread: the caller rebuilds it.
    for version in [1u32, 2] {
        let mut old = good.clone();
        old[8..12].copy_from_slice(&version.to_le_bytes());
        std::fs::write(&path, &old).unwrap();
        let e = HnswIndex::load(&path, expect, &mut rows).err().unwrap().to_string();
        assert!(e.contains(&format!("header version {version}")), "{e}");
    }

    // Version 3, the same body uncompressed, still loads: an upgrade does
    // not rebuild every index.
    let plain = zstd::bulk::decompress(&good[32..], 64 << 20).unwrap();
    assert!(
        plain.len() > 2 * (good.len() - 32),
        "{} bytes from {}",
        plain.len(),
        good.len() - 32
    );
    let with_header = |version: u32, body: &[u8]| {
        let mut f = good[..32].to_vec();
        f[8..12].copy_from_slice(&version.to_le_bytes());
        f[16..24].copy_from_slice(&(body.len() as u64).to_le_bytes());
        f[24..32].copy_from_slice(&fsutil::checksum(body).to_le_bytes());
        f.extend_from_slice(body);
        f
    };
    std::fs::write(&path, with_header(3, &plain)).unwrap();
    let (v3, v3_ids) = HnswIndex::load(&path, expect, &mut rows).unwrap();
    assert_eq!(v3_ids, ids);
    assert_eq!(
        v3.search(&v[..dim], 5, opts, None).unwrap(),
        ix.search(&v[..dim], 5, opts, None).unwrap()
    );
    // A frame that claims more than a graph of its rows can take is
    // refused before anything that large is allocated; so is a version 4
    // body that is no zstd frame.
    let huge = zstd::bulk::compress(&vec![0u8; 64 << 20], 1).unwrap();
    std::fs::write(&path, with_header(4, &huge)).unwrap();
    let e = HnswIndex::load(&path, expect, &mut rows).err().unwrap().to_string();
    assert!(e.contains("over"), "{e}");
    std::fs::write(&path, with_header(4, &plain)).unwrap();
    assert!(HnswIndex::load(&path, expect, &mut rows).is_err());

    // Links a walk would follow out of bounds (the checksum holds: a file
    // sent by a peer, or written so) are refused at load, never walked.
    // usearch's graph: a header of five u64 (members, connectivity, base
    // connectivity, max level, entry slot), an i16 level per member, then
    // each member: key u64, level i16, base neighbours as a u32 count and
    // u32 slots.
    let head: Vec<u8> = [n as u64, PARAMS.m as u64, 2 * PARAMS.m as u64]
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .collect();
    let graph = plain.windows(head.len()).position(|w| w == head).expect("graph header");
    let first = graph + 40 + 2 * n;
    let count_at = first + 10;
    let count = u32::from_le_bytes(plain[count_at..count_at + 4].try_into().unwrap());
    assert!(count > 0 && count <= 2 * PARAMS.m, "member 0 has {count} neighbours");
    let mut damaged = |at: usize, value: &[u8], says: &str| {
        let mut body = plain.clone();
        body[at..at + value.len()].copy_from_slice(value);
        std::fs::write(&path, with_header(3, &body)).unwrap();
        let e = HnswIndex::load(&path, expect, &mut rows).err().unwrap().to_string();
        assert!(e.contains(says), "{says}: {e}");
    };
    damaged(count_at + 4, &(n as u32).to_le_bytes(), "past the last member");
    damaged(count_at, &(2 * PARAMS.m + 1).to_le_bytes(), "more neighbours");
    damaged(first + 8, &7i16.to_le_bytes(), "level differs");
    std::fs::write(&path, with_header(3, &plain)).unwrap();
    assert!(HnswIndex::load(&path, expect, &mut rows).is_ok());
}

#[test]
fn indexes_point_into_blocks_and_merges_copy_only_sparse_ones() {
    let dim = 8;
    let rows = |seed| Arc::new(AlignedRows::from_slice(&random(400, dim, seed)));
    let (a, b) = (rows(5), rows(6));
    let ix = HnswIndex::build(Metric::L2, dim, RowVectors::One(a.clone()), PARAMS, &AtomicU64::new(0)).unwrap();
    // The index holds no copy: its rows are the block's memory.
    assert!(std::ptr::eq(ix.vector(7).as_ptr(), a[7 * dim..].as_ptr()));
    // A merge of every row of `a` (through the index) and a quarter of `b`
    // keeps `a` and copies the rows of `b`, which it would leave mostly
    // unused.
    let mut sources: Vec<(Block, u32)> = (0..400).map(|r| ix.vector_source(r)).collect();
    sources.extend((0..100).map(|r| (b.clone(), r * 4)));
    let merged = HnswIndex::build(
        Metric::L2,
        dim,
        RowVectors::gather(sources, dim),
        PARAMS,
        &AtomicU64::new(0),
    )
    .unwrap();
    assert_eq!(merged.rows(), 500);
    assert!(std::ptr::eq(merged.vector(399).as_ptr(), a[399 * dim..].as_ptr()));
    for r in 0..100u32 {
        assert_eq!(merged.vector(400 + r), &b[(r as usize * 4) * dim..][..dim]);
        assert!(!std::ptr::eq(
            merged.vector(400 + r).as_ptr(),
            b[(r as usize * 4) * dim..].as_ptr()
        ));
    }
    // The merged index keeps `a` alive, not `b`; searches still work once
    // every other holder is gone.
    drop(ix);
    let (a_weak, b_weak) = (Arc::downgrade(&a), Arc::downgrade(&b));
    let q = a[123 * dim..][..dim].to_vec();
    drop((a, b));
    assert!(a_weak.upgrade().is_some() && b_weak.upgrade().is_none());
    // A walk as wide as the index: what is checked is that the rows are
    // still there, not the luck of a short walk (at the default expansion
    // a CI run's walk stopped at row 229).
    let wide = SearchOptions { ef: 500, exact: false };
    assert_eq!(merged.search(&q, 1, wide, None).unwrap(), vec![123]);
    // Rows of one block in order need no table.
    let c = Arc::new(AlignedRows::from_slice(&random(10, dim, 7)));
    assert_eq!(c.as_ptr() as usize % 64, 0, "rows start a cache line");
    let all = (0..10).map(|r| (c.clone(), r)).collect();
    assert!(matches!(RowVectors::gather(all, dim), RowVectors::One(_)));
}

#[test]
fn every_row_is_reachable_by_a_walk() {
    // Built by threads in any order, a graph of 300 rows left one row with
    // no link in (so no walk returned it) in about one build in a hundred,
    // under both metrics. A walk as wide as the index reaches every row.
    let dim = 8;
    let v = random(300, dim, 1);
    let walk = SearchOptions { ef: 300, exact: false };
    for metric in [Metric::L2, Metric::InnerProduct] {
        for build in 0..100 {
            let ix = HnswIndex::build(metric, dim, one(&v), PARAMS, &AtomicU64::new(0)).unwrap();
            let q = &v[(build * 7 % 300) * dim..][..dim];
            let mut got = ix.search(q, 300, walk, None).unwrap();
            got.sort_unstable();
            got.dedup();
            assert_eq!(got.len(), 300, "{metric} build {build}: rows a walk never reaches");
        }
    }
}

/// Brute force: the `k` rows of `rows` nearest to `q` under L2.
fn nearest(ix: &HnswIndex, rows: u32, q: &[f32], k: usize) -> Vec<u32> {
    let mut all: Vec<(u32, f32)> = (0..rows).map(|r| (r, metric::l2_squared(q, ix.vector(r)))).collect();
    all.sort_by(|a, b| a.1.total_cmp(&b.1));
    all.into_iter().take(k).map(|(r, _)| r).collect()
}

#[test]
fn a_merge_extends_its_first_sources_graph_while_it_and_the_rows_added_serve() {
    use std::sync::atomic::AtomicBool;
    let (dim, own, more, k) = (16, 3000u32, 9000u32, 10);
    let a = Arc::new(AlignedRows::from_slice(&random(own as usize, dim, 11)));
    let b = Arc::new(AlignedRows::from_slice(&random(more as usize, dim, 12)));
    let source = HnswIndex::build(Metric::L2, dim, RowVectors::One(a.clone()), PARAMS, &AtomicU64::new(0)).unwrap();
    let merged_rows = || -> RowVectors {
        let mut rows: Vec<(Block, u32)> = (0..own).map(|r| source.vector_source(r)).collect();
        rows.extend((0..more).map(|r| (b.clone(), r)));
        RowVectors::gather(rows, dim)
    };
    let queries = random(200, dim, 13);
    let exact = SearchOptions { ef: 1, exact: true };
    let walk = SearchOptions { ef: 64, exact: false };

    // Other build parameters, or rows that are copies of the source's
    // (not the vectors its graph points to): not extended, nothing changed.
    let other = IndexSpec { m: 16, ..PARAMS };
    assert!(GraphBuild::extend(&source, merged_rows(), other).unwrap().is_err());
    let mut copies = random(own as usize, dim, 11);
    copies.extend_from_slice(&b);
    assert!(GraphBuild::extend(&source, one(&copies), PARAMS).unwrap().is_err());
    assert_eq!(source.graph.index.size(), own as usize);
    // Room for no more rows than it serves: its searches take no filter.
    assert_eq!(source.graph.index.capacity(), own as usize);
    // Searches of the source, and of the rows added so far, go on while
    // the graph grows, and return their own rows only.
    let progress = AtomicU64::new(0);
    let mut build = match GraphBuild::extend(&source, merged_rows(), PARAMS).unwrap() {
        Ok(build) => build,
        Err(_) => panic!("the graph was not extended"),
    };
    let half = own + more / 2;
    build.add_through(half as usize, &progress).unwrap();
    let prefix = build.prefix().unwrap();
    assert_eq!((build.added(), prefix.rows()), (half as usize, half as usize));
    let stop = AtomicBool::new(false);
    let merged = std::thread::scope(|s| {
        let searchers: Vec<_> = [(&source, own), (&prefix, half)]
            .into_iter()
            .enumerate()
            .map(|(t, (index, rows))| {
                let (queries, stop) = (&queries, &stop);
                s.spawn(move || {
                    let mut n = 0usize;
                    while !stop.load(Ordering::Relaxed) || n < 50 {
                        let q = &queries[(n + t) % 200 * dim..][..dim];
                        let opts = if n.is_multiple_of(7) { exact } else { walk };
                        let got = index.search(q, k, opts, None).unwrap();
                        assert_eq!(got.len(), k);
                        assert!(got.iter().all(|&r| r < rows), "{got:?}");
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        build.add_through((own + more) as usize, &progress).unwrap();
        let merged = build.finish();
        stop.store(true, Ordering::Relaxed);
        for h in searchers {
            assert!(h.join().unwrap() >= 50);
        }
        merged.unwrap()
    });
    assert!(merged.shares_graph(&source) && prefix.shares_graph(&merged));
    assert_eq!(
        prefix.search(&queries[..dim], k, exact, None).unwrap(),
        nearest(&prefix, half, &queries[..dim], k)
    );
    let all = (own + more) as usize;
    assert_eq!((merged.rows(), progress.load(Ordering::Relaxed) as usize), (all, all));
    assert!(std::ptr::eq(merged.vector(5).as_ptr(), a[5 * dim..].as_ptr()));
    assert_eq!(merged.vector(own + 7), &b[7 * dim..][..dim]);

    // Both answer exactly what brute force does over their rows, and the
    // merged graph's walk finds its rows, old and new.
    let mut hit = 0;
    for q in queries.chunks_exact(dim) {
        assert_eq!(source.search(q, k, exact, None).unwrap(), nearest(&source, own, q, k));
        let want = nearest(&merged, own + more, q, k);
        assert_eq!(merged.search(q, k, exact, None).unwrap(), want);
        let got = merged.search(q, k, walk, None).unwrap();
        hit += got.iter().filter(|r| want.contains(r)).count();
    }
    let recall = hit as f64 / (200 * k) as f64;
    assert!(recall > 0.9, "recall@10 of the extended graph {recall}");

    // A graph that grew is extended no more, and the source's index is
    // not saved as if the graph were its own.
    assert!(GraphBuild::extend(&source, merged_rows(), PARAMS).unwrap().is_err());
    let dir = tempfile::tempdir().unwrap();
    let ids: Vec<u64> = (0..(own + more) as u64).collect();
    assert!(source
        .save(&dir.path().join("seg-1.hnsw"), 1, &ids[..own as usize])
        .is_err());

    // The merged index saves and loads as any other; the source's blocks
    // are kept while the merged index lives.
    let path = dir.path().join("seg-2.hnsw");
    merged.save(&path, 2, &ids).unwrap();
    let expect = Expect {
        segment: 2,
        metric: Metric::L2,
        dim,
        rows: ids.len(),
    };
    let (loaded, loaded_ids) = HnswIndex::load(&path, expect, &mut |r| {
        Ok(r.flat_map(|row| merged.vector(row).to_vec()).collect())
    })
    .unwrap();
    assert_eq!(loaded_ids, ids);
    assert_eq!(loaded.graph.index.capacity(), ids.len());
    let q = &queries[..dim];
    assert_eq!(
        loaded.search(q, k, exact, None).unwrap(),
        merged.search(q, k, exact, None).unwrap()
    );
    let a_weak = Arc::downgrade(&a);
    drop((source, a));
    assert!(a_weak.upgrade().is_some());
    assert_eq!(
        merged.search(q, k, exact, None).unwrap(),
        nearest(&merged, own + more, q, k)
    );
}
