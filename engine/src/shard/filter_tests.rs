//! Filtered search, count and id listing of a replica with payload
//! indexes, against brute force over the points that pass.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use edgevec_proto::{FieldKind, FieldSpec, Filter, IndexSpec, Metric, Point};
use rand::{Rng, SeedableRng};

use super::{ShardConfig, ShardReplica, OPLOG_RETAIN_BYTES};
use crate::builder::IndexBuilder;
use crate::hnsw::SearchOptions;
use crate::op::ShardOp;
use crate::testutil::write;
use crate::EngineError;

const DIM: usize = 32;

fn config(seal_rows: u32) -> ShardConfig {
    let field = |name: &str, kind| FieldSpec {
        name: name.into(),
        kind,
    };
    ShardConfig {
        shard: 0,
        dim: DIM as u32,
        metric: Metric::L2,
        seal_rows,
        index: IndexSpec::default(),
        retain_bytes: OPLOG_RETAIN_BYTES,
        retain_percent: None,
        hold_bytes: 0,
        fields: vec![field("bucket", FieldKind::Int), field("tag", FieldKind::Keyword)],
    }
}

/// Clustered vectors, as real embeddings are (a mixture of 100 Gaussians,
/// centres uniform in [-1, 1]^DIM, σ 0.8: wide enough that an unfiltered
/// walk at the default ef recalls only about 0.95);
/// point `i` has bucket `i % 100` and tag `t<i % 7>`.
fn points(n: usize, seed: u64) -> Vec<Point> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let centres: Vec<Vec<f32>> = (0..100)
        .map(|_| (0..DIM).map(|_| rng.gen_range(-1.0f32..1.0)).collect())
        .collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut normal = move || {
        let u: f32 = rng.gen_range(f32::EPSILON..1.0);
        let v: f32 = rng.gen_range(0.0..1.0);
        (
            (-2.0 * u.ln()).sqrt() * (2.0 * std::f32::consts::PI * v).cos(),
            rng.gen_range(0..100usize),
        )
    };
    (0..n)
        .map(|i| {
            let c = &centres[normal().1];
            Point {
                id: i as u64,
                vector: c.iter().map(|x| x + 0.8 * normal().0).collect(),
                payload: Some(format!("{{\"bucket\":{},\"tag\":\"t{}\"}}", i % 100, i % 7)),
            }
        })
        .collect()
}

fn l2(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

/// The exact top `k` ids among `pass`ing points.
fn truth(points: &[Point], q: &[f32], k: usize, pass: &dyn Fn(&Point) -> bool) -> Vec<u64> {
    let mut scored: Vec<(f32, u64)> = points
        .iter()
        .filter(|p| pass(p))
        .map(|p| (l2(&p.vector, q), p.id))
        .collect();
    scored.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    scored.into_iter().take(k).map(|(_, id)| id).collect()
}

fn bucket(p: &Point) -> u64 {
    p.id % 100
}

#[test]
fn filtered_search_recalls_at_every_selectivity() {
    let dir = tempfile::tempdir().unwrap();
    let builder = Arc::new(IndexBuilder::start());
    // One indexed segment of 40,000 rows: with 1 % and 10 % passing the
    // planner scans the passing rows; with 25 % and 50 % it walks the
    // graph, skipping the rest.
    let n = 40_000;
    let s = ShardReplica::open(dir.path(), config(n as u32), builder.clone()).unwrap();
    let data = points(n, 1);
    for chunk in data.chunks(5_000) {
        write(&s, ShardOp::Upsert(chunk.to_vec())).unwrap();
    }
    assert!(builder.wait_idle(Duration::from_secs(300)));
    assert_eq!(s.info().1[0].index, edgevec_proto::IndexState::Ready);

    let queries = points(200, 2);
    let k = 10;
    for (pct, json) in [
        (1, r#"{"must":[{"key":"bucket","range":{"lt":1}}]}"#),
        (10, r#"{"must":[{"key":"bucket","range":{"lt":10}}]}"#),
        (25, r#"{"must":[{"key":"bucket","range":{"lt":25}}]}"#),
        (50, r#"{"must":[{"key":"bucket","range":{"gte":50}}]}"#),
        (100, r#"{"must":[{"key":"bucket","range":{"gte":0}}]}"#),
        (10, r#"{"must":[{"key":"bucket","in":[3,13,23,33,43,53,63,73,83,93]}]}"#),
    ] {
        let filter = Filter::parse(json).unwrap();
        let pass = |p: &Point| match pct {
            1 => bucket(p) < 1,
            25 => bucket(p) < 25,
            50 => bucket(p) >= 50,
            100 => true,
            _ if json.contains("range") => bucket(p) < 10,
            _ => bucket(p) % 10 == 3,
        };
        let (mut hit, mut total) = (0usize, 0usize);
        for q in &queries {
            let want = truth(&data, &q.vector, k, &pass);
            let got = s.search(&q.vector, k, SearchOptions::default(), Some(&filter)).unwrap();
            assert_eq!(got.len(), k);
            for c in &got {
                assert!(pass(&data[c.id as usize]), "{json}: {} does not pass", c.id);
            }
            let got: HashSet<u64> = got.iter().map(|c| c.id).collect();
            hit += want.iter().filter(|id| got.contains(id)).count();
            total += want.len();
        }
        let recall = hit as f64 / total as f64;
        eprintln!("{pct} % pass ({json}): recall@{k} {recall:.3}");
        // Every point passing is the unfiltered walk (ef 64 on data made
        // hard enough that it recalls about 0.95): printed, for scale.
        assert!(
            pct == 100 || recall >= 0.95,
            "{json}: recall@{k} {recall:.3} below 0.95"
        );

        // Exact search with a filter is exact.
        let q = &queries[0].vector;
        let exact = SearchOptions {
            exact: true,
            ..Default::default()
        };
        let got: Vec<u64> = s
            .search(q, k, exact, Some(&filter))
            .unwrap()
            .iter()
            .map(|c| c.id)
            .collect();
        assert_eq!(got, truth(&data, q, k, &pass), "{json}");

        let want_ids: Vec<u64> = data.iter().filter(|p| pass(p)).map(|p| p.id).collect();
        assert_eq!(s.count(&filter).unwrap(), want_ids.len() as u64);
        assert_eq!(s.ids_matching(&filter).unwrap(), want_ids);
    }
}

#[test]
fn filters_follow_deletes_replacements_merges_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let builder = Arc::new(IndexBuilder::start());
    let s = ShardReplica::open(dir.path(), config(256), builder.clone()).unwrap();
    let data = points(1_000, 3);
    write(&s, ShardOp::Upsert(data.clone())).unwrap();
    // Point 5 (tag t5) becomes t6; 12 (t5) is deleted.
    let mut moved = data[5].clone();
    moved.payload = Some(r#"{"bucket":5,"tag":"t6"}"#.into());
    write(&s, ShardOp::Upsert(vec![moved])).unwrap();
    write(&s, ShardOp::Delete(vec![12])).unwrap();
    let t5 = Filter::parse(r#"{"must":[{"key":"tag","match":"t5"}]}"#).unwrap();
    let want: Vec<u64> = (0..1_000).filter(|i| i % 7 == 5 && *i != 5 && *i != 12).collect();
    let check = |s: &ShardReplica| {
        assert_eq!(s.ids_matching(&t5).unwrap(), want);
        let q = &data[40].vector;
        let got = s.search(q, 10, SearchOptions::default(), Some(&t5)).unwrap();
        let pass = |p: &Point| p.id % 7 == 5 && p.id != 5 && p.id != 12;
        let got: Vec<u64> = got.iter().map(|c| c.id).collect();
        assert_eq!(got, truth(&data, q, 10, &pass));
    };
    check(&s);
    write(&s, ShardOp::Merge { sources: vec![1, 2] }).unwrap();
    assert!(builder.wait_idle(Duration::from_secs(60)));
    assert!(s.merge_state().0.contains(&5), "{:?}", s.merge_state());
    check(&s);
    drop(s);
    let s = ShardReplica::open(dir.path(), config(256), builder.clone()).unwrap();
    check(&s);
    // A string no row holds matches nothing; a field without an index is
    // refused with the fix.
    let none = Filter::parse(r#"{"must":[{"key":"tag","match":"zz"}]}"#).unwrap();
    assert_eq!(s.count(&none).unwrap(), 0);
    let bad = Filter::parse(r#"{"must":[{"key":"colour","match":"red"}]}"#).unwrap();
    match s.search(&data[0].vector, 3, SearchOptions::default(), Some(&bad)) {
        Err(EngineError::Invalid { field, message }) => {
            assert_eq!(field, "filter");
            assert!(message.contains("--index-field colour:keyword"), "{message}");
        }
        other => panic!("expected Invalid, got {other:?}"),
    }
}

/// Sealed segments keep the rows that pass a filter for the next search;
/// deletes, replacements and new rows after that are still seen.
#[test]
fn repeated_filters_see_later_writes() {
    let dir = tempfile::tempdir().unwrap();
    let builder = Arc::new(IndexBuilder::start());
    let s = ShardReplica::open(dir.path(), config(256), builder.clone()).unwrap();
    let mut data = points(1_000, 5);
    write(&s, ShardOp::Upsert(data.clone())).unwrap();
    assert!(builder.wait_idle(Duration::from_secs(60)));
    let t5 = Filter::parse(r#"{"must":[{"key":"tag","match":"t5"}]}"#).unwrap();
    let q = data[40].vector.clone();
    let search = |s: &ShardReplica| -> Vec<u64> {
        let got = s.search(&q, 10, SearchOptions::default(), Some(&t5)).unwrap();
        got.iter().map(|c| c.id).collect()
    };
    let tagged = |p: &Point| p.payload.as_deref().is_some_and(|j| j.contains("\"t5\""));
    let first = search(&s);
    assert_eq!(first, truth(&data, &q, 10, &tagged));
    assert_eq!(search(&s), first, "the same answer from the kept rows");

    // The best hit is deleted, the second loses its tag, and a new point
    // at the query itself gets it.
    write(&s, ShardOp::Delete(vec![first[0]])).unwrap();
    let mut untagged = data[first[1] as usize].clone();
    untagged.payload = Some(r#"{"bucket":0,"tag":"t1"}"#.into());
    let fresh = Point {
        id: 5_000,
        vector: q.clone(),
        payload: Some(r#"{"bucket":0,"tag":"t5"}"#.into()),
    };
    write(&s, ShardOp::Upsert(vec![untagged.clone(), fresh.clone()])).unwrap();
    data.retain(|p| p.id != first[0] && p.id != first[1]);
    data.push(untagged);
    data.push(fresh);
    let after = search(&s);
    assert_eq!(after[0], 5_000, "{after:?}");
    assert!(!after.contains(&first[0]) && !after.contains(&first[1]), "{after:?}");
    assert_eq!(after, truth(&data, &q, 10, &tagged));
}
