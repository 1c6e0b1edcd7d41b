use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use edgevec_proto::{IndexSpec, Metric, PointRecord};

use super::super::tests::upsert;
use super::super::{index_path, ShardConfig, ShardReplica, OPLOG_RETAIN_BYTES};
use crate::builder::IndexBuilder;
use crate::compaction::MergePolicy;
use crate::metric::Candidate;
use crate::op::ShardOp;
use crate::testutil::write;
use edgevec_proto::OpId;
use std::sync::Arc;

const SEAL: u32 = 64;

fn config() -> ShardConfig {
    ShardConfig {
        shard: 0,
        dim: 2,
        metric: Metric::L2,
        seal_rows: SEAL,
        index: IndexSpec {
            m: 8,
            ef_construction: 32,
        },
        retain_bytes: OPLOG_RETAIN_BYTES,
        retain_percent: None,
        hold_bytes: 0,
        fields: Vec::new(),
    }
}

fn open(dir: &Path, builder: &Arc<IndexBuilder>) -> Arc<ShardReplica> {
    ShardReplica::open(dir, config(), builder.clone()).unwrap()
}

fn merge(sources: &[u64]) -> ShardOp {
    ShardOp::Merge {
        sources: sources.to_vec(),
    }
}

/// Holds the builder thread until the returned sender is used or
/// dropped, so a merge stays decided but not installed.
fn stall(builder: &IndexBuilder) -> mpsc::Sender<()> {
    let (tx, rx) = mpsc::channel::<()>();
    builder.submit(move || {
        let _ = rx.recv();
    });
    tx
}

fn idle(builder: &IndexBuilder) {
    assert!(builder.wait_idle(Duration::from_secs(60)));
}

/// Points present; per exact search, `(id, segment, row)` of each hit.
type Seen = (Vec<u64>, Vec<Vec<(u64, u64, u32)>>);

/// What a user sees of the replica, short: the points present (checked
/// whole: ids, vectors, payloads) and exact searches (ids and where their
/// rows are stored). Searches through the indexes are checked for
/// well-formed answers only: each build makes its own graph (parallel
/// inserts), and on points along a line a walk may miss a neighbour.
fn seen(s: &ShardReplica) -> Seen {
    let all: Vec<u64> = (0..1000).collect();
    let present: Vec<PointRecord> = s.get(&all).unwrap().into_iter().flatten().collect();
    for p in &present {
        assert_eq!(p.vector, vec![p.id as f32, 1.0]);
        assert_eq!(p.payload.as_deref(), Some(format!("{{\"id\":{}}}", p.id).as_str()));
    }
    let ids: Vec<u64> = present.iter().map(|p| p.id).collect();
    let mut searches = Vec::new();
    // Off the grid, so no two points tie.
    for x in [0.3, 10.3, 70.3, 150.3, 199.3, 320.3] {
        let walk = s
            .search(&[x, 1.0], 6, crate::SearchOptions { ef: 64, exact: false }, None)
            .unwrap();
        assert_eq!(walk.len(), 6.min(ids.len()));
        for c in &walk {
            assert!(ids.binary_search(&c.id).is_ok(), "{} is not a live point", c.id);
            assert!(
                (c.score - (c.id as f32 - x).abs()).abs() < 1e-3,
                "{c:?} scored on its vector"
            );
        }
        let exact: Vec<Candidate> = s
            .search(&[x, 1.0], 6, crate::SearchOptions { ef: 64, exact: true }, None)
            .unwrap();
        searches.push(exact.iter().map(|c| (c.id, c.segment, c.row)).collect());
    }
    (ids, searches)
}

#[track_caller]
fn same(a: Seen, b: Seen) {
    assert_eq!(a.0, b.0, "points present");
    for (i, (x, y)) in a.1.iter().zip(&b.1).enumerate() {
        assert_eq!(x, y, "search {i}");
    }
}

fn segments(s: &ShardReplica) -> Vec<(u64, u64, u64)> {
    s.info().1.iter().map(|i| (i.id, i.rows, i.deleted)).collect()
}

#[test]
fn a_merge_keeps_live_points_drops_deleted_ones_and_takes_later_deletes_over() {
    let dir = tempfile::tempdir().unwrap();
    let builder = Arc::new(IndexBuilder::start());
    let s = open(dir.path(), &builder);
    write(&s, upsert(0..200)).unwrap();
    write(&s, ShardOp::Delete(vec![5, 70])).unwrap();
    idle(&builder);
    assert_eq!(s.merge_state(), (vec![1, 2, 3, 4], vec![]));
    let before = seen(&s);

    // Decided at its op; built while later writes change its rows.
    let release = stall(&builder);
    write(&s, merge(&[1, 2])).unwrap();
    assert_eq!(s.merge_state(), (vec![1, 2, 3, 4], vec![5]));
    write(&s, ShardOp::Delete(vec![6])).unwrap();
    write(&s, upsert([71])).unwrap();
    assert_eq!(s.get(&[6, 71]).unwrap()[1].as_ref().unwrap().id, 71);
    let during = seen(&s);
    drop(release);
    idle(&builder);

    assert_eq!(s.merge_state(), (vec![3, 4, 5], vec![]));
    // 128 rows less the two deleted before the op; two deleted since.
    assert_eq!(segments(&s), vec![(3, 64, 0), (4, 9, 0), (5, 126, 2)]);
    same(seen(&s), during.clone());
    assert_ne!(during, before);
    assert!(!index_path(dir.path(), 1).exists() && !index_path(dir.path(), 2).exists());
    assert!(index_path(dir.path(), 5).exists());
    let got = s.get(&[4, 5, 6, 7, 70, 71]).unwrap();
    let ids: Vec<Option<u64>> = got.iter().map(|p| p.as_ref().map(|p| p.id)).collect();
    assert_eq!(ids, vec![Some(4), None, None, Some(7), None, Some(71)]);
    assert_eq!(got[0].as_ref().unwrap().payload.as_deref(), Some("{\"id\":4}"));
    let hits: Vec<u64> = s
        .search(&[6.0, 1.0], 3, Default::default(), None)
        .unwrap()
        .iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(hits, vec![7, 4, 8]);

    // The merged segment merges again; the policy proposes it.
    let policy = MergePolicy {
        factor: 2,
        max_rows: 1_000_000,
        vacuum: 0.5,
        ..MergePolicy::default()
    };
    assert_eq!(s.merge_proposal(&policy), Some(merge(&[3, 5])));
    write(&s, merge(&[3, 5])).unwrap();
    idle(&builder);
    assert_eq!(s.merge_state(), (vec![4, 6], vec![]));
    assert_eq!(segments(&s), vec![(4, 9, 0), (6, 188, 0)]);
    same(seen(&s), during.clone());
    assert_eq!(s.read().merges.keys().copied().collect::<Vec<_>>(), vec![6]);

    // Sealing after merges takes the next unused id.
    write(&s, upsert(200..260)).unwrap();
    idle(&builder);
    assert_eq!(s.merge_state().0, vec![4, 6, 7]);
    let after = seen(&s);
    drop(s);
    let s = open(dir.path(), &builder);
    idle(&builder);
    assert_eq!(s.merge_state().0, vec![4, 6, 7]);
    same(seen(&s), after.clone());
    assert_eq!(
        s.info().1[1].index,
        edgevec_proto::IndexState::Ready,
        "merged index loaded"
    );
}

#[test]
fn replicas_merge_alike_whatever_their_batching_and_build_timing() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (ba, bb) = (Arc::new(IndexBuilder::start()), Arc::new(IndexBuilder::start()));
    let (a, b) = (open(da.path(), &ba), open(db.path(), &bb));
    let ops = [
        upsert(0..300),
        ShardOp::Delete(vec![1, 2, 100, 250]),
        merge(&[1, 2]),
        upsert([3, 64, 299]),
        merge(&[3, 4]),
        ShardOp::Delete(vec![130, 131]),
        merge(&[6, 7]),
        upsert(300..330),
        ShardOp::Delete(vec![0]),
    ];
    let entries: Vec<(OpId, ShardOp)> = ops
        .iter()
        .enumerate()
        .map(|(i, op)| (OpId::new(1, i as u64 + 1), op.clone()))
        .collect();
    // `a`: one batch, builder free. `b`: one op at a time, builder held
    // until the end, so its merges install only after every later op.
    a.append(OpId::ZERO, entries.as_slice()).unwrap();
    a.apply_through(entries.len() as u64).unwrap();
    let release = stall(&bb);
    for (i, e) in entries.iter().enumerate() {
        let prev = if i == 0 { OpId::ZERO } else { entries[i - 1].0 };
        b.append(prev, std::slice::from_ref(e)).unwrap();
        b.apply_through(e.0.lsn).unwrap();
    }
    assert_eq!(b.merge_state().1, vec![8], "pending on b; 6 and 7 were taken over by 8");
    drop(release);
    idle(&ba);
    idle(&bb);
    assert_eq!(a.merge_state(), (vec![5, 8, 9], vec![]));
    assert_eq!(a.merge_state(), b.merge_state());
    assert_eq!(segments(&a), segments(&b));
    same(seen(&a), seen(&b));
    // The same state on disk: exports hold the same records, index files
    // aside (graphs built at different times by different threads may
    // link differently).
    let state = |r: &ShardReplica, path: &Path| {
        r.export_to(path, &[]).unwrap();
        let mut seen = crate::export::Seen::default();
        crate::export::read(path, &r.config, &mut seen).unwrap();
        seen.0.retain(|line| !line.starts_with("index "));
        seen.0
    };
    let (ea, eb) = (da.path().join("a.export"), db.path().join("b.export"));
    assert_eq!(state(&a, &ea), state(&b, &eb));
}

#[test]
fn merge_ops_naming_what_cannot_merge_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let builder = Arc::new(IndexBuilder::start());
    let s = open(dir.path(), &builder);
    write(&s, upsert(0..140)).unwrap();
    idle(&builder);
    let before = (s.merge_state(), seen(&s));
    // 3 is the growing segment; 9 does not exist.
    for bad in [merge(&[]), merge(&[1, 1]), merge(&[1, 3]), merge(&[9]), merge(&[1, 9])] {
        write(&s, bad).unwrap();
    }
    idle(&builder);
    assert_eq!((s.merge_state(), seen(&s)), before);
    assert_eq!(s.applied_lsn(), 6);
    assert_eq!(s.read().next_segment, 4, "no id was taken");
    // A merged-away segment cannot be named again.
    write(&s, merge(&[1, 2])).unwrap();
    write(&s, merge(&[1])).unwrap();
    idle(&builder);
    assert_eq!(s.merge_state(), (vec![3, 4], vec![]));
}

#[test]
fn a_merge_of_deleted_rows_only_is_installed_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let builder = Arc::new(IndexBuilder::start());
    let s = open(dir.path(), &builder);
    write(&s, upsert(0..130)).unwrap();
    write(&s, ShardOp::Delete((0..64).collect())).unwrap();
    idle(&builder);
    let policy = MergePolicy::default();
    assert_eq!(s.merge_proposal(&policy), Some(merge(&[1])), "emptied: vacuumed");
    let release = stall(&builder);
    write(&s, merge(&[1])).unwrap();
    assert_eq!(s.merge_state(), (vec![2, 3], vec![]), "nothing to build");
    drop(release);
    idle(&builder);
    drop(s);
    let s = open(dir.path(), &builder);
    assert_eq!(s.merge_state(), (vec![2, 3], vec![]));
    assert_eq!(s.info().0.points, 66);
}

#[test]
fn merges_taken_over_before_their_build_are_never_built() {
    let dir = tempfile::tempdir().unwrap();
    let builder = Arc::new(IndexBuilder::start());
    let s = open(dir.path(), &builder);
    write(&s, upsert(0..300)).unwrap();
    idle(&builder);
    let before = seen(&s);
    let release = stall(&builder);
    write(&s, merge(&[1, 2])).unwrap(); // 6
    write(&s, merge(&[3, 4])).unwrap(); // 7
    write(&s, merge(&[6, 7])).unwrap(); // 8
    assert_eq!(s.merge_state(), (vec![1, 2, 3, 4, 5], vec![8]));
    drop(release);
    idle(&builder);
    assert_eq!(s.merge_state(), (vec![5, 8], vec![]));
    assert!(!index_path(dir.path(), 6).exists() && !index_path(dir.path(), 7).exists());
    assert_eq!(s.read().merges.keys().copied().collect::<Vec<_>>(), vec![8]);
    same(seen(&s), before.clone());
}

#[test]
fn a_merge_pending_at_shutdown_or_without_its_file_is_rebuilt_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let builder = Arc::new(IndexBuilder::start());
    let s = open(dir.path(), &builder);
    write(&s, upsert(0..200)).unwrap();
    write(&s, ShardOp::Delete(vec![10])).unwrap();
    idle(&builder);
    let release = stall(&builder);
    write(&s, merge(&[1, 2])).unwrap();
    write(&s, ShardOp::Delete(vec![11])).unwrap();
    let want = seen(&s);
    drop(s);
    drop(release);
    idle(&builder);

    // Pending at close: built and installed after the open.
    let s = open(dir.path(), &builder);
    assert_eq!(s.merge_state().1, vec![5]);
    same(seen(&s), want.clone());
    idle(&builder);
    assert_eq!(s.merge_state(), (vec![3, 4, 5], vec![]));
    same(seen(&s), want.clone());
    drop(s);

    // Installed, its file gone: served from its stored rows, re-indexed.
    std::fs::remove_file(index_path(dir.path(), 5)).unwrap();
    let release = stall(&builder);
    let s = open(dir.path(), &builder);
    assert_eq!(s.merge_state().0, vec![3, 4, 5]);
    assert_eq!(s.info().1[2].index, edgevec_proto::IndexState::Building);
    same(seen(&s), want.clone());
    drop(release);
    idle(&builder);
    assert_eq!(s.info().1[2].index, edgevec_proto::IndexState::Ready);
    assert_eq!(segments(&s)[2], (5, 127, 1));
    same(seen(&s), want.clone());
}

#[test]
fn exports_carry_merges_pending_or_installed() {
    let dir = tempfile::tempdir().unwrap();
    let builder = Arc::new(IndexBuilder::start());
    let s = open(&dir.path().join("src"), &builder);
    write(&s, upsert(0..300)).unwrap();
    write(&s, merge(&[1, 2])).unwrap();
    idle(&builder);
    let release = stall(&builder);
    write(&s, merge(&[3, 4])).unwrap();
    write(&s, ShardOp::Delete(vec![200])).unwrap();
    let file = dir.path().join("x.export");
    s.export_to(&file, &[]).unwrap();
    let want = seen(&s);
    drop(release);
    idle(&builder);

    let to = dir.path().join("dst");
    std::fs::create_dir(&to).unwrap();
    crate::shard::import_files(&to, &config(), &file, None).unwrap();
    let t = open(&to, &builder);
    assert_eq!(t.merge_state().1, vec![7], "pending on the exporter: pending here");
    idle(&builder);
    assert_eq!(t.merge_state(), s.merge_state());
    assert_eq!(segments(&t), segments(&s));
    same(seen(&t), want.clone());
}

/// Once nothing has been written for `quiet_after`, the policy merges the
/// sealed segments into one (when the smaller ones hold a quarter of the
/// largest's rows); before that, only the tiers apply.
#[test]
fn a_quiet_shard_proposes_one_segment() {
    let dir = tempfile::tempdir().unwrap();
    let builder = Arc::new(IndexBuilder::start());
    let s = open(dir.path(), &builder);
    // Three seals of 64 rows: the tier policy merges two, leaving 128 + 64.
    write(&s, upsert(0..3 * SEAL as u64)).unwrap();
    let busy = MergePolicy {
        quiet_after: Duration::from_secs(3600),
        ..MergePolicy::default()
    };
    while let Some(op) = s.merge_proposal(&busy) {
        write(&s, op).unwrap();
    }
    idle(&builder);
    let sealed = |s: &ShardReplica| -> Vec<u64> {
        s.info()
            .1
            .iter()
            .filter(|i| i.state == edgevec_proto::SegmentState::Sealed)
            .map(|i| i.rows)
            .collect()
    };
    assert_eq!(sealed(&s), vec![64, 128]);
    assert_eq!(s.merge_proposal(&busy), None, "written a moment ago: not quiet");
    let quiet = MergePolicy {
        quiet_after: Duration::ZERO,
        ..MergePolicy::default()
    };
    let op = s.merge_proposal(&quiet).expect("a quiet shard merges");
    let before = seen(&s);
    write(&s, op).unwrap();
    idle(&builder);
    assert_eq!(sealed(&s), vec![192]);
    same(seen(&s), before);
    assert_eq!(s.merge_proposal(&quiet), None, "one segment: nothing more");
}

/// A merge whose first source has every row of it live grows that
/// source's graph with the other rows; otherwise it builds a graph of its
/// own. Either way it serves the same points, and reopens from its file.
#[test]
fn a_merge_extends_the_graph_of_a_first_source_it_takes_whole() {
    let dir = tempfile::tempdir().unwrap();
    let builder = Arc::new(IndexBuilder::start());
    let s = open(dir.path(), &builder);
    write(&s, upsert(0..200)).unwrap();
    idle(&builder);
    let index_of = |s: &ShardReplica, seg: u64| s.read().segments[&seg].index().unwrap().clone();
    let first = index_of(&s, 1);
    let before = seen(&s);

    write(&s, merge(&[1, 2])).unwrap();
    idle(&builder);
    assert_eq!(s.merge_state(), (vec![3, 4, 5], vec![]));
    let merged = index_of(&s, 5);
    assert!(merged.shares_graph(&first), "segment 1's graph grew into the merge's");
    assert_eq!((first.rows(), merged.rows()), (64, 128));
    drop(first);
    same(seen(&s), before.clone());

    // First source with a deleted row: rows renumbered, a graph of its own.
    write(&s, ShardOp::Delete(vec![130])).unwrap();
    let (third, fifth) = (index_of(&s, 3), index_of(&s, 5));
    write(&s, merge(&[3, 5])).unwrap();
    idle(&builder);
    assert_eq!(s.merge_state(), (vec![4, 6], vec![]));
    let all = index_of(&s, 6);
    assert_eq!(all.rows(), 191);
    assert!(!all.shares_graph(&third) && !all.shares_graph(&fifth));
    let want = seen(&s);
    assert_eq!(want.0.len(), 199);
    drop(s);
    let s = open(dir.path(), &builder);
    idle(&builder);
    same(seen(&s), want);
}

/// A merge adds its rows to its graph one source after the other, and
/// once a source's rows are all in, the rows added so far serve from the
/// merge's graph in its place: a merge never holds its whole graph beside
/// all of its sources'. Searches, gets and deletes meanwhile see every
/// point once.
#[test]
fn a_merge_serves_the_rows_it_has_added_while_it_builds() {
    let dir = tempfile::tempdir().unwrap();
    let builder = Arc::new(IndexBuilder::start());
    let s = open(dir.path(), &builder);
    write(&s, upsert(0..260)).unwrap();
    // A deleted row in the first source: the merge builds a graph of its own.
    write(&s, ShardOp::Delete(vec![10])).unwrap();
    idle(&builder);
    assert_eq!(s.merge_state(), (vec![1, 2, 3, 4, 5], vec![]));
    let before = seen(&s);

    type Step = (Vec<(u64, u64, u64)>, Seen);
    let steps: Arc<std::sync::Mutex<Vec<Step>>> = Arc::default();
    let record = steps.clone();
    *s.on_prefix.lock().unwrap() = Some(Box::new(move |r: &ShardReplica| {
        let mut steps = record.lock().unwrap();
        if steps.is_empty() {
            // One row already in the merge's graph, one not yet.
            write(r, ShardOp::Delete(vec![20, 230])).unwrap();
        }
        steps.push((segments(r), seen(r)));
    }));
    write(&s, merge(&[1, 2, 3, 4])).unwrap();
    idle(&builder);
    let after = seen(&s);
    assert_eq!(after.0.len(), before.0.len() - 2);
    let steps = std::mem::take(&mut *steps.lock().unwrap());
    let shapes: Vec<_> = steps.iter().map(|(segments, _)| segments.clone()).collect();
    assert_eq!(
        shapes,
        vec![
            vec![(2, 64, 0), (3, 64, 0), (4, 64, 1), (5, 4, 0), (6, 63, 1)],
            vec![(3, 64, 0), (4, 64, 1), (5, 4, 0), (6, 127, 1)],
            vec![(4, 64, 1), (5, 4, 0), (6, 191, 1)],
        ]
    );
    for (_, seen) in steps {
        same(seen, after.clone());
    }
    assert_eq!(segments(&s), vec![(5, 4, 0), (6, 255, 2)]);
    for gone in 1..=4 {
        assert!(!index_path(dir.path(), gone).exists(), "index file of segment {gone}");
    }
    assert!(index_path(dir.path(), 6).exists());
    drop(s);
    let s = open(dir.path(), &builder);
    idle(&builder);
    same(seen(&s), after);
}

/// Rows, payloads and tombstones in the replica's shard file.
fn stored(s: &ShardReplica) -> (u64, u64, u64) {
    let (mut rows, mut payloads, mut tombstones) = (0, 0, 0);
    s.store
        .read_applied(|item| {
            match item {
                crate::store::StateItem::Row { .. } => rows += 1,
                crate::store::StateItem::Payload { .. } => payloads += 1,
                crate::store::StateItem::Tombstone { .. } => tombstones += 1,
                _ => {}
            }
            Ok(())
        })
        .unwrap();
    (rows, payloads, tombstones)
}

/// Rows and deleted rows of the segments that serve searches: what the
/// file must hold once merges' dropped rows are reclaimed.
fn served(s: &ShardReplica) -> (u64, u64) {
    let info = s.info().1;
    (info.iter().map(|i| i.rows).sum(), info.iter().map(|i| i.deleted).sum())
}

/// [`seen`] without where the rows are (rewriting a point moves it).
fn points_seen(s: &ShardReplica) -> (Vec<u64>, Vec<Vec<u64>>) {
    let (ids, searches) = seen(s);
    (
        ids,
        searches.iter().map(|hits| hits.iter().map(|h| h.0).collect()).collect(),
    )
}

/// Merges every sealed segment into one.
fn merge_all(s: &ShardReplica) {
    let sealed: Vec<u64> = s
        .info()
        .1
        .iter()
        .filter(|i| i.state == edgevec_proto::SegmentState::Sealed)
        .map(|i| i.id)
        .collect();
    write(s, merge(&sealed)).unwrap();
}

/// Rows a merge dropped (deleted or replaced before its op) leave the
/// shard file once it is installed, with their payloads and tombstones,
/// so rewriting the same points over and over keeps what the file holds
/// bounded; every point stays as it was, through a restart and through an
/// export, which then lacks those rows (format 5).
#[test]
fn rows_merges_dropped_leave_the_file_and_rewrites_keep_it_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let builder = Arc::new(IndexBuilder::start());
    let s = open(&dir.path().join("a"), &builder);
    write(&s, upsert(0..200)).unwrap();
    idle(&builder);
    let want = points_seen(&s);
    for round in 0..8 {
        write(&s, upsert(0..200)).unwrap();
        write(&s, ShardOp::Delete(vec![1000 + round])).unwrap();
        merge_all(&s);
        idle(&builder);
        let (rows, deleted) = served(&s);
        assert_eq!(stored(&s), (rows, rows, deleted), "round {round}");
        assert_eq!(points_seen(&s), want);
    }
    // Nine rounds wrote 1,800 rows; the file holds those of the last
    // (the growing segment's, and the merged segment's with its deletes).
    assert!(stored(&s).0 < 400, "{:?}", s.info().1);

    // A restart finds the same; an export carries the rows that are left.
    drop(s);
    let s = open(&dir.path().join("a"), &builder);
    idle(&builder);
    assert_eq!(points_seen(&s), want);
    let export = dir.path().join("x.export");
    s.export_to(&export, &[]).unwrap();
    assert_eq!(std::fs::read(&export).unwrap()[8..12], 5u32.to_le_bytes());
    let to = dir.path().join("b");
    std::fs::create_dir(&to).unwrap();
    crate::shard::import_files(&to, &config(), &export, None).unwrap();
    let t = open(&to, &builder);
    idle(&builder);
    assert_eq!(points_seen(&t), want);
    assert_eq!(stored(&t), stored(&s));
    assert_eq!(segments(&t), segments(&s));
}

/// A search that found a row before the merge that drops it was
/// installed can still read its payload: the reclaim waits for every
/// search pinned before it.
#[test]
fn a_reclaim_waits_for_the_searches_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let builder = Arc::new(IndexBuilder::start());
    let s = open(dir.path(), &builder);
    write(&s, upsert(0..130)).unwrap();
    idle(&builder);
    let pin = s.pin();
    let hit = s.search(&[0.2, 1.0], 1, Default::default(), None).unwrap()[0];
    assert_eq!((hit.id, hit.segment, hit.row), (0, 1, 0));
    let at = [crate::plan::Location {
        segment: hit.segment,
        row: hit.row,
    }];
    // Segment 1's rows all deleted, then merged away: installed at once.
    write(&s, ShardOp::Delete((0..64).collect())).unwrap();
    write(&s, merge(&[1])).unwrap();
    assert_eq!(s.merge_state(), (vec![2, 3], vec![]));
    assert!(!builder.wait_idle(Duration::from_millis(300)), "the reclaim waits");
    assert_eq!(s.payloads(&at).unwrap(), [Some("{\"id\":0}".to_string())]);
    drop(pin);
    idle(&builder);
    assert_eq!(s.payloads(&at).unwrap(), [None]);
    assert_eq!(stored(&s), (66, 66, 0));
}

/// A file written before rows were reclaimed (shard record `V3`) has the
/// rows its installed merges dropped reclaimed at its first open.
#[test]
fn a_file_of_the_layout_before_is_reclaimed_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let builder = Arc::new(IndexBuilder::start());
    let s = open(dir.path(), &builder);
    write(&s, upsert(0..200)).unwrap();
    idle(&builder);
    // Points 0..100 written again: merge 5 drops 100 rows of 1 and 2.
    write(&s, upsert(0..100)).unwrap();
    write(&s, merge(&[1, 2])).unwrap();
    // Queued behind the merge's build, before its reclaim.
    let release = stall(&builder);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !s.merge_state().1.is_empty() {
        assert!(std::time::Instant::now() < deadline, "merge 5 is not installed");
        std::thread::sleep(Duration::from_millis(5));
    }
    let want = seen(&s);
    assert_eq!(stored(&s).0, served(&s).0 + 100);
    drop(s);
    drop(release);
    idle(&builder);
    // As the layout before left it: nothing queued for reclaiming.
    super::super::tests::edit_file(dir.path(), |txn| {
        use redb::ReadableTable;
        const META: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("meta");
        const RECLAIMS: redb::TableDefinition<u64, ()> = redb::TableDefinition::new("reclaims");
        let mut meta = txn.open_table(META).unwrap();
        let mut raw = meta.get("shard").unwrap().unwrap().value().to_vec();
        assert_eq!(raw[0], 3);
        raw[0] = 2;
        meta.insert("shard", raw.as_slice()).unwrap();
        drop(meta);
        txn.delete_table(RECLAIMS).unwrap();
    });
    let release = stall(&builder);
    let s = open(dir.path(), &builder);
    same(seen(&s), want.clone());
    assert_eq!(stored(&s).0, served(&s).0 + 100, "queued at open");
    drop(release);
    idle(&builder);
    let (rows, deleted) = served(&s);
    assert_eq!(stored(&s), (rows, rows, deleted));
    same(seen(&s), want);
}

/// A replica that has not reclaimed yet catches up from one that has: the
/// covered segments' digests differ, so their rows travel (with the gaps,
/// format 5), while a segment both hold alike is taken from the
/// importer's own file; the import reclaims what is left to reclaim.
#[test]
fn an_export_between_replicas_that_reclaimed_and_not() {
    let dir = tempfile::tempdir().unwrap();
    let (ba, bb) = (Arc::new(IndexBuilder::start()), Arc::new(IndexBuilder::start()));
    let (a, b) = (open(&dir.path().join("a"), &ba), open(&dir.path().join("b"), &bb));
    let release = stall(&bb);
    for s in [&a, &b] {
        write(s, upsert(0..200)).unwrap();
        write(s, upsert(0..50)).unwrap();
        write(s, merge(&[1, 2])).unwrap();
    }
    idle(&ba);
    assert_eq!(a.merge_state(), (vec![3, 4, 5], vec![]));
    assert_eq!(b.merge_state().1, vec![5], "b has not built its merge");
    let want = points_seen(&a);
    assert_eq!(points_seen(&b), want);

    let file = dir.path().join("x.export");
    let info = a.export_to(&file, &b.sealed_digests().unwrap()).unwrap();
    assert_eq!(std::fs::read(&file).unwrap()[8..12], 5u32.to_le_bytes());
    assert_eq!(info.reused_rows, 128, "segments 2 and 3: only 1 lost rows");
    let to = dir.path().join("c");
    std::fs::create_dir(&to).unwrap();
    crate::shard::import_files(&to, &config(), &file, Some(&b)).unwrap();
    drop(release);
    idle(&bb);
    let c = open(&to, &bb);
    idle(&bb);
    assert_eq!(points_seen(&c), want);
    assert_eq!(stored(&c), stored(&a));
    assert_eq!(segments(&c), segments(&a));
}

/// Rows written faster than merges drop them grow the shard file; once
/// reclaiming leaves it mostly free pages, it is compacted while the
/// replica serves, back to about what it holds.
#[test]
fn a_file_grown_by_rewrites_is_compacted_once_reclaimed() {
    let dir = tempfile::tempdir().unwrap();
    let builder = Arc::new(IndexBuilder::start());
    // A small op log, so that the rows are most of what the file holds.
    let config = ShardConfig {
        dim: 256,
        retain_bytes: 1024 * 1024,
        ..config()
    };
    let s = ShardReplica::open(dir.path(), config.clone(), builder.clone()).unwrap();
    s.store.set_compact_min(1024 * 1024);
    let file = dir.path().join(super::super::STORE_FILE);
    let points = |round: u32| {
        ShardOp::Upsert(
            (0..2000u64)
                .map(|id| edgevec_proto::Point {
                    id,
                    vector: (0..256).map(|i| (id * 7 + i + u64::from(round)) as f32).collect(),
                    payload: None,
                })
                .collect(),
        )
    };
    // Five rounds before any merge: the file holds all of them.
    let release = stall(&builder);
    for round in 0..5 {
        write(&s, points(round)).unwrap();
    }
    let grown = std::fs::metadata(&file).unwrap().len();
    assert!(grown > 5 * 2000 * 1024, "{grown} bytes");
    drop(release);
    idle(&builder);
    merge_all(&s);
    idle(&builder);
    let (rows, deleted) = served(&s);
    assert_eq!(stored(&s), (rows, 0, deleted));
    let compacted = std::fs::metadata(&file).unwrap().len();
    assert!(compacted < grown / 2, "{compacted} bytes, {grown} before");
    let got = s.get(&[0, 1999]).unwrap();
    assert_eq!(got[1].as_ref().unwrap().vector[0], (1999 * 7 + 4) as f32);
    drop(s);
    let s = ShardReplica::open(dir.path(), config, builder.clone()).unwrap();
    assert_eq!(
        s.get(&[5]).unwrap()[0].as_ref().unwrap().vector[1],
        (5 * 7 + 1 + 4) as f32
    );
}

/// A segment that a merge took out of searches before its own index was
/// built gets none: no build, no index file left behind.
#[test]
fn a_segment_merged_away_before_its_build_gets_no_index() {
    let dir = tempfile::tempdir().unwrap();
    let builder = Arc::new(IndexBuilder::start());
    let s = open(dir.path(), &builder);
    let release = stall(&builder);
    write(&s, upsert(0..70)).unwrap();
    write(&s, ShardOp::Delete((0..64).collect())).unwrap();
    write(&s, merge(&[1])).unwrap();
    assert_eq!(s.merge_state(), (vec![2], vec![]));
    drop(release);
    idle(&builder);
    assert!(!index_path(dir.path(), 1).exists());
    assert_eq!(s.info().0.points, 6);
}

/// Points written again faster than merges drop their old segments: a
/// sealed segment whose rows are all deleted drops its vectors and index
/// at once, unless a pending merge still has to read them; searches, gets
/// and the merges after it are as before.
#[test]
fn a_sealed_segment_whose_rows_are_all_deleted_drops_its_vectors() {
    let dir = tempfile::tempdir().unwrap();
    let builder = Arc::new(IndexBuilder::start());
    let s = open(dir.path(), &builder);
    write(&s, upsert(0..70)).unwrap();
    idle(&builder);
    assert!(index_path(dir.path(), 1).exists());
    write(&s, ShardOp::Delete((0..63).collect())).unwrap();
    assert!(!s.vectors_released(1), "one row of segment 1 is live");
    write(&s, upsert([63])).unwrap();
    assert!(s.vectors_released(1), "its last row was replaced");
    let (present, _) = seen(&s);
    assert_eq!(present, (63..70).collect::<Vec<_>>());
    let hits = s
        .search(&[0.3, 1.0], 3, crate::SearchOptions { ef: 64, exact: false }, None)
        .unwrap();
    let ids: Vec<u64> = hits.iter().map(|c| c.id).collect();
    assert_eq!(ids, vec![63, 64, 65]);
    let info = s.info().1;
    assert!(
        info.iter().all(|seg| seg.index != edgevec_proto::IndexState::Building),
        "{info:?}"
    );
    // So does a restart.
    drop(s);
    let s = open(dir.path(), &builder);
    assert!(s.vectors_released(1), "dead before the restart");
    assert_eq!(seen(&s).0, (63..70).collect::<Vec<_>>());
    // The merge of emptied segments drops it, and its index file.
    write(&s, merge(&[1])).unwrap();
    assert_eq!(s.merge_state().1, Vec::<u64>::new());
    assert!(!index_path(dir.path(), 1).exists());

    // A segment a pending merge covers keeps its vectors until the merge
    // is built, though its rows die meanwhile.
    let release = stall(&builder);
    write(&s, upsert(100..228)).unwrap();
    let sealed: Vec<u64> = s.merge_state().0;
    write(&s, merge(&[sealed[0], sealed[1]])).unwrap();
    let first = sealed[0];
    // Every row of the first (63..70, 100..157) dies.
    write(&s, ShardOp::Delete((60..170).collect())).unwrap();
    let info = s.info().1;
    let dead = info.iter().find(|seg| seg.id == first).unwrap();
    assert_eq!(dead.deleted, dead.rows, "{info:?}");
    let before = seen(&s);
    assert!(!s.vectors_released(first), "the pending merge reads its rows");
    drop(release);
    idle(&builder);
    assert_eq!(s.merge_state().1, Vec::<u64>::new(), "the merge installed");
    assert_eq!(seen(&s), before);
    drop(s);
    let s = open(dir.path(), &builder);
    idle(&builder);
    assert_eq!(seen(&s), before, "after a restart");
}
