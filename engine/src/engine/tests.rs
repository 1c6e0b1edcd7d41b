use super::*;
use edgevec_proto::{IndexState, Metric, SegmentState};
use rand::{Rng, SeedableRng};

fn spec(name: &str, dim: u32, metric: Metric, shards: u32, seal_rows: u32) -> CollectionSpec {
    CollectionSpec {
        name: name.into(),
        dim,
        metric,
        shards,
        seal_rows,
    }
}

fn point(id: u64, vector: Vec<f32>) -> Point {
    Point {
        id,
        vector,
        payload: Some(format!("{{\"id\":{id}}}")),
    }
}

fn open(dir: &Path) -> Engine {
    Engine::open(dir, EngineOptions::default()).unwrap()
}

fn ids(hits: &[Hit]) -> Vec<u64> {
    hits.iter().map(|h| h.id).collect()
}

fn invalid_field<T: std::fmt::Debug>(r: Result<T, EngineError>) -> String {
    match r {
        Err(EngineError::Invalid { field, .. }) => field,
        other => panic!("expected Invalid, got {other:?}"),
    }
}

const WAIT: Duration = Duration::from_secs(60);

#[test]
fn engine_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Engine>();
}

#[test]
fn collection_lifecycle_errors() {
    let dir = tempfile::tempdir().unwrap();
    let e = open(dir.path());
    e.create_collection(spec("docs", 4, Metric::L2, 2, 64)).unwrap();
    assert!(matches!(
        e.create_collection(spec("docs", 8, Metric::Cosine, 1, 64)),
        Err(EngineError::CollectionExists(n)) if n == "docs"
    ));
    assert_eq!(
        invalid_field(e.create_collection(spec("bad name", 4, Metric::L2, 1, 64))),
        "name"
    );
    assert_eq!(
        invalid_field(e.create_collection(spec("x", 0, Metric::L2, 1, 64))),
        "dim"
    );
    assert_eq!(
        invalid_field(e.create_collection(spec("x", 4, Metric::L2, 0, 64))),
        "shards"
    );
    assert_eq!(
        invalid_field(e.create_collection(spec("x", 4, Metric::L2, 1, 1))),
        "seal_rows"
    );
    for r in [
        e.describe_collection("nope").map(|_| ()),
        e.drop_collection("nope"),
        e.upsert("nope", vec![point(1, vec![0.0; 4])]).map(|_| ()),
        e.delete("nope", &[1]).map(|_| ()),
        e.get("nope", &[1]).map(|_| ()),
        e.search("nope", &[vec![0.0; 4]], 1, false).map(|_| ()),
    ] {
        assert!(
            matches!(r, Err(EngineError::CollectionNotFound(ref n)) if n == "nope"),
            "{r:?}"
        );
    }
    let info = e.describe_collection("docs").unwrap();
    assert_eq!(info.points, 0);
    assert_eq!(info.shards.len(), 2);
    assert_eq!(info.segments.len(), 2, "one growing segment per shard");
    e.create_collection(spec("alpha", 4, Metric::L2, 1, 64)).unwrap();
    let names: Vec<String> = e.list_collections().into_iter().map(|c| c.spec.name).collect();
    assert_eq!(names, vec!["alpha", "docs"]);
}

#[test]
fn upsert_get_search_delete() {
    let dir = tempfile::tempdir().unwrap();
    let e = open(dir.path());
    e.create_collection(spec("c", 2, Metric::L2, 3, 64)).unwrap();
    let pts: Vec<Point> = (0..20).map(|i| point(i, vec![i as f32, 0.0])).collect();
    let ack = e.upsert("c", pts).unwrap();
    assert_eq!(ack.count, 20);
    assert!(ack.lsns.iter().all(|&(_, lsn)| lsn == 1));
    assert_eq!(ack.lsns.len(), 3);

    let got = e.get("c", &[5, 999, 3]).unwrap();
    assert_eq!(got.iter().map(|p| p.id).collect::<Vec<_>>(), vec![5, 3]);
    assert_eq!(got[0].vector, vec![5.0, 0.0]);
    assert_eq!(got[0].payload.as_deref(), Some("{\"id\":5}"));

    let hits = e.search("c", &[vec![10.2, 0.0], vec![0.0, 0.0]], 3, true).unwrap();
    assert_eq!(ids(&hits[0]), vec![10, 11, 9]);
    assert!((hits[0][0].score - 0.2).abs() < 1e-5, "l2 score is the distance");
    assert_eq!(hits[0][0].payload.as_deref(), Some("{\"id\":10}"));
    assert_eq!(ids(&hits[1]), vec![0, 1, 2]);
    let bare = e.search("c", &[vec![0.0, 0.0]], 30, false).unwrap();
    assert_eq!(bare[0].len(), 20, "k larger than the collection returns everything");
    assert!(bare[0].iter().all(|h| h.payload.is_none()));

    let ack = e.delete("c", &[10, 11, 12345]).unwrap();
    assert_eq!(ack.count, 3);
    let hits = e.search("c", &[vec![10.2, 0.0]], 3, false).unwrap();
    assert_eq!(ids(&hits[0]), vec![9, 12, 8]);
    assert!(e.get("c", &[10, 11]).unwrap().is_empty());
    assert_eq!(e.describe_collection("c").unwrap().points, 18);

    // Within a batch the last occurrence of an id wins.
    e.upsert("c", vec![point(1, vec![100.0, 0.0]), point(1, vec![50.0, 0.0])])
        .unwrap();
    assert_eq!(e.get("c", &[1]).unwrap()[0].vector, vec![50.0, 0.0]);
}

#[test]
fn bad_batches_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let e = open(dir.path());
    e.create_collection(spec("docs", 3, Metric::L2, 1, 64)).unwrap();
    let mut batch = vec![point(1, vec![1.0; 3]), point(2, vec![1.0; 3])];
    batch[1].vector[2] = f32::NAN;
    assert_eq!(invalid_field(e.upsert("docs", batch)), "points[1].vector[2]");
    match e.upsert("docs", vec![point(1, vec![1.0; 4])]) {
        Err(EngineError::Invalid { field, message }) => {
            assert_eq!(field, "points[0].vector");
            assert_eq!(message, "vector has 4 components but collection \"docs\" has dim 3");
        }
        other => panic!("{other:?}"),
    }
    let mut bad_payload = point(1, vec![1.0; 3]);
    bad_payload.payload = Some("nope".into());
    assert_eq!(invalid_field(e.upsert("docs", vec![bad_payload])), "points[0].payload");
    assert_eq!(invalid_field(e.upsert("docs", vec![])), "points");
    assert_eq!(invalid_field(e.delete("docs", &[])), "ids");
    assert_eq!(invalid_field(e.search("docs", &[vec![1.0; 3]], 0, false)), "k");
    assert_eq!(invalid_field(e.search("docs", &[vec![1.0; 2]], 1, false)), "queries[0]");
    let info = e.describe_collection("docs").unwrap();
    assert_eq!((info.points, info.shards[0].lsn), (0, 0), "nothing was written");
}

#[test]
fn cosine_stores_normalised_vectors_and_scores_similarity() {
    let dir = tempfile::tempdir().unwrap();
    let e = open(dir.path());
    e.create_collection(spec("cos", 2, Metric::Cosine, 1, 64)).unwrap();
    assert_eq!(
        invalid_field(e.upsert("cos", vec![point(1, vec![0.0, 0.0])])),
        "points[0].vector"
    );
    e.upsert(
        "cos",
        vec![
            point(1, vec![3.0, 4.0]),
            point(2, vec![-4.0, 3.0]),
            point(3, vec![10.0, 0.0]),
        ],
    )
    .unwrap();
    assert_eq!(e.get("cos", &[1]).unwrap()[0].vector, vec![0.6, 0.8]);
    let hits = e.search("cos", &[vec![30.0, 40.0]], 3, false).unwrap();
    assert_eq!(ids(&hits[0]), vec![1, 3, 2]);
    assert!((hits[0][0].score - 1.0).abs() < 1e-6);
    assert!((hits[0][1].score - 0.6).abs() < 1e-6);
    assert!(hits[0][2].score.abs() < 1e-6);
    assert_eq!(
        invalid_field(e.search("cos", &[vec![0.0, 0.0]], 1, false)),
        "queries[0]"
    );
}

#[test]
fn inner_product_ranks_by_dot() {
    let dir = tempfile::tempdir().unwrap();
    let e = open(dir.path());
    e.create_collection(spec("ip", 2, Metric::InnerProduct, 2, 64)).unwrap();
    e.upsert(
        "ip",
        vec![
            point(1, vec![1.0, 0.0]),
            point(2, vec![5.0, 5.0]),
            point(3, vec![-9.0, 0.0]),
        ],
    )
    .unwrap();
    let hits = e.search("ip", &[vec![1.0, 1.0]], 3, false).unwrap();
    assert_eq!(ids(&hits[0]), vec![2, 1, 3]);
    assert_eq!(
        hits[0].iter().map(|h| h.score).collect::<Vec<_>>(),
        vec![10.0, 1.0, -9.0]
    );
}

/// Points on a line: id i at (i, 0), so the nearest ids are known.
fn line(range: std::ops::Range<u64>) -> Vec<Point> {
    range.map(|i| point(i, vec![i as f32, 0.0])).collect()
}

#[test]
fn tombstones_in_sealed_segments_are_honoured() {
    let dir = tempfile::tempdir().unwrap();
    let e = open(dir.path());
    e.create_collection(spec("t", 2, Metric::L2, 1, 64)).unwrap();
    e.upsert("t", line(0..100)).unwrap();
    assert!(e.wait_for_indexes(WAIT));
    let info = e.describe_collection("t").unwrap();
    assert_eq!(info.segments[0].state, SegmentState::Sealed);
    assert_eq!(info.segments[0].rows, 64, "sealed at exactly seal_rows");
    assert_eq!(info.segments[0].index, IndexState::Ready);
    assert_eq!(
        (info.segments[1].state, info.segments[1].rows),
        (SegmentState::Growing, 36)
    );

    // Delete 30 and move 31 far away: both lived in the sealed segment.
    e.delete("t", &[30]).unwrap();
    e.upsert("t", vec![point(31, vec![1000.0, 0.0])]).unwrap();
    let hits = e.search("t", &[vec![30.0, 0.0]], 4, false).unwrap();
    assert_eq!(ids(&hits[0]), vec![29, 28, 32, 27], "ties go to the smaller id");
    let far = e.search("t", &[vec![1000.0, 0.0]], 1, false).unwrap();
    assert_eq!(ids(&far[0]), vec![31]);
    let got = e.get("t", &[30, 31]).unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].vector, vec![1000.0, 0.0]);
    let info = e.describe_collection("t").unwrap();
    assert_eq!(info.segments[0].deleted, 2);
    assert_eq!(info.points, 99);

    // Many tombstones: the index alone could not return k live rows, the
    // exact fallback must, for every k.
    e.delete("t", &(0..60).collect::<Vec<_>>()).unwrap();
    for k in [1u32, 10, 50] {
        let hits = e.search("t", &[vec![0.0, 0.0]], k, false).unwrap();
        let want: Vec<u64> = (60..(60 + u64::from(k)).min(100)).collect();
        assert_eq!(ids(&hits[0]), want, "k={k}");
    }
}

#[test]
fn restart_restores_points_collections_and_indexes() {
    let dir = tempfile::tempdir().unwrap();
    let (before, index_file, mtime);
    {
        let e = open(dir.path());
        e.create_collection(spec("a", 2, Metric::L2, 2, 64)).unwrap();
        e.create_collection(spec("b", 2, Metric::Cosine, 1, 64)).unwrap();
        e.upsert("a", line(0..300)).unwrap();
        e.delete("a", &[7, 8]).unwrap();
        e.upsert("a", vec![point(9, vec![-5.0, 0.0])]).unwrap();
        e.upsert("b", vec![point(1, vec![1.0, 1.0])]).unwrap();
        assert!(e.wait_for_indexes(WAIT));
        before = (
            e.list_collections(),
            e.search("a", &[vec![8.0, 0.0], vec![-5.0, 0.0]], 5, true).unwrap(),
            e.get("a", &(0..300).collect::<Vec<_>>()).unwrap(),
        );
        assert!(before.0[0].segments.iter().any(|s| s.index == IndexState::Ready));
        index_file = dir.path().join("collections/1/shard-0/seg-1.hnsw");
        mtime = std::fs::metadata(&index_file).unwrap().modified().unwrap();
    }
    let e = open(dir.path());
    // Indexes are Ready at once: loaded from their files, not rebuilt.
    let after_list = e.list_collections();
    assert_eq!(before.0, after_list);
    assert_eq!(std::fs::metadata(&index_file).unwrap().modified().unwrap(), mtime);
    assert_eq!(
        before.1,
        e.search("a", &[vec![8.0, 0.0], vec![-5.0, 0.0]], 5, true).unwrap()
    );
    assert_eq!(before.2, e.get("a", &(0..300).collect::<Vec<_>>()).unwrap());
    assert_eq!(before.2.len(), 298);
    // Writes continue from the restored LSNs.
    let ack = e.upsert("b", vec![point(2, vec![0.0, 1.0])]).unwrap();
    assert_eq!(ack.lsns, vec![(0, 2)]);
}

#[test]
fn missing_index_file_is_rebuilt_at_open() {
    let dir = tempfile::tempdir().unwrap();
    {
        let e = open(dir.path());
        e.create_collection(spec("a", 2, Metric::L2, 1, 64)).unwrap();
        e.upsert("a", line(0..70)).unwrap();
        assert!(e.wait_for_indexes(WAIT));
    }
    let index_file = dir.path().join("collections/1/shard-0/seg-1.hnsw");
    std::fs::write(&index_file, b"garbage").unwrap();
    let e = open(dir.path());
    // Searchable (by brute force) whether or not the rebuild is done.
    assert_eq!(ids(&e.search("a", &[vec![3.0, 0.0]], 1, false).unwrap()[0]), vec![3]);
    assert!(e.wait_for_indexes(WAIT));
    assert_eq!(e.describe_collection("a").unwrap().segments[0].index, IndexState::Ready);
    assert!(std::fs::read(&index_file).unwrap().starts_with(b"EVHNSW"));
}

#[test]
fn drop_then_recreate_starts_empty_and_orphans_are_removed() {
    let dir = tempfile::tempdir().unwrap();
    {
        let e = open(dir.path());
        e.create_collection(spec("docs", 2, Metric::L2, 2, 64)).unwrap();
        e.upsert("docs", line(0..100)).unwrap();
        e.drop_collection("docs").unwrap();
        assert!(matches!(
            e.describe_collection("docs"),
            Err(EngineError::CollectionNotFound(_))
        ));
        assert!(!dir.path().join("collections/1").exists());
        e.create_collection(spec("docs", 3, Metric::Cosine, 1, 64)).unwrap();
        let info = e.describe_collection("docs").unwrap();
        assert_eq!((info.points, info.spec.dim), (0, 3));
        assert!(e.get("docs", &[1, 2, 3]).unwrap().is_empty());
        e.upsert("docs", vec![point(1, vec![1.0, 0.0, 0.0])]).unwrap();
    }
    // A crash between the catalog commit and the file removal leaves files
    // of an unknown id behind: the next open deletes them.
    let orphan = dir.path().join("collections/77/shard-0");
    std::fs::create_dir_all(&orphan).unwrap();
    std::fs::write(orphan.join("shard.redb"), b"x").unwrap();
    let e = open(dir.path());
    assert!(!dir.path().join("collections/77").exists());
    let all = e.list_collections();
    assert_eq!(all.len(), 1);
    assert_eq!((all[0].spec.dim, all[0].points), (3, 1));
    // Ids are never reused, even after a restart.
    e.create_collection(spec("other", 2, Metric::L2, 1, 64)).unwrap();
    assert!(dir.path().join("collections/3").exists());
}

fn random_vectors(n: usize, dim: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| (0..dim).map(|_| rng.gen_range(-1.0f32..1.0)).collect())
        .collect()
}

/// recall@10 of the engine against exact brute force.
fn recall(metric: Metric) -> f64 {
    const N: usize = 10_000;
    const DIM: usize = 128;
    const K: usize = 10;
    let dir = tempfile::tempdir().unwrap();
    let e = open(dir.path());
    e.create_collection(spec("r", DIM as u32, metric, 2, 2048)).unwrap();
    let data = random_vectors(N, DIM, 42);
    for (chunk_no, chunk) in data.chunks(2500).enumerate() {
        let pts = chunk
            .iter()
            .enumerate()
            .map(|(i, v)| Point {
                id: (chunk_no * 2500 + i) as u64,
                vector: v.clone(),
                payload: None,
            })
            .collect();
        e.upsert("r", pts).unwrap();
    }
    assert!(e.wait_for_indexes(Duration::from_secs(120)));
    let info = e.describe_collection("r").unwrap();
    let ready = info.segments.iter().filter(|s| s.index == IndexState::Ready).count();
    assert!(ready >= 4, "sealed segments must be indexed: {:?}", info.segments);

    let queries = random_vectors(100, DIM, 7);
    let hits = e.search("r", &queries, K as u32, false).unwrap();
    // The engine's stored vectors (normalised for cosine) are the ground truth.
    let stored = e.get("r", &(0..N as u64).collect::<Vec<_>>()).unwrap();
    let mut found = 0;
    for (q, got) in queries.iter().zip(&hits) {
        let mut q = q.clone();
        if metric == Metric::Cosine {
            crate::metric::normalize(&mut q);
        }
        let exact = crate::metric::merge(
            metric,
            K,
            [stored
                .iter()
                .map(|p| Candidate {
                    id: p.id,
                    score: crate::metric::score(metric, &q, &p.vector),
                    segment: 0,
                    row: 0,
                })
                .collect()],
        );
        let got: HashSet<u64> = ids(got).into_iter().collect();
        found += exact.iter().filter(|c| got.contains(&c.id)).count();
    }
    let r = found as f64 / (queries.len() * K) as f64;
    eprintln!("{metric}: recall@{K} = {r}");
    r
}

use crate::metric::Candidate;

#[test]
fn recall_l2() {
    let r = recall(Metric::L2);
    assert!(r >= 0.95, "recall@10 = {r}");
}

#[test]
fn recall_inner_product() {
    let r = recall(Metric::InnerProduct);
    assert!(r >= 0.95, "recall@10 = {r}");
}

#[test]
fn recall_cosine() {
    let r = recall(Metric::Cosine);
    assert!(r >= 0.95, "recall@10 = {r}");
}

const CRASH_DIR_ENV: &str = "EDGEVEC_ENGINE_CRASH_DIR";

/// Helper process of `kill_9_keeps_acknowledged_writes`: writes batches
/// forever and prints each acknowledged one.
#[test]
#[ignore = "helper process, started by kill_9_keeps_acknowledged_writes"]
fn crash_child() {
    use std::io::Write;
    let Ok(dir) = std::env::var(CRASH_DIR_ENV) else {
        return;
    };
    let e = open(Path::new(&dir));
    e.create_collection(spec("k", 8, Metric::L2, 2, 64)).unwrap();
    for batch in 0u64.. {
        let pts = (0..50)
            .map(|i| point(batch * 50 + i, vec![(batch * 50 + i) as f32; 8]))
            .collect();
        e.upsert("k", pts).unwrap();
        println!("acked {batch}");
        std::io::stdout().flush().unwrap();
    }
}

#[cfg(unix)]
#[test]
fn kill_9_keeps_acknowledged_writes() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "engine::tests::crash_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CRASH_DIR_ENV, dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut acked = None;
    while let Some(Ok(line)) = lines.next() {
        if let Some(n) = line.strip_prefix("acked ") {
            acked = Some(n.parse::<u64>().unwrap());
            if acked >= Some(40) {
                break;
            }
        }
    }
    child.kill().unwrap(); // SIGKILL: no destructors, no flushes
                           // Acks printed before the kill landed count too.
    for line in lines.map_while(Result::ok) {
        if let Some(n) = line.strip_prefix("acked ") {
            acked = Some(n.parse::<u64>().unwrap());
        }
    }
    child.wait().unwrap();
    let acked = acked.expect("the child acknowledged writes");

    let e = open(dir.path());
    let want: Vec<u64> = (0..(acked + 1) * 50).collect();
    let got = e.get("k", &want).unwrap();
    assert_eq!(got.len(), want.len(), "every acknowledged point survives kill -9");
    assert!(got.iter().all(|p| p.vector[0] == p.id as f32));
    assert!(e.wait_for_indexes(WAIT));
    let info = e.describe_collection("k").unwrap();
    assert!(info.points >= want.len() as u64);
    assert!(info.segments.iter().filter(|s| s.state == SegmentState::Sealed).count() >= 2);
}
