use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use edgevec_proto::{Metric, OpId, Point, SegmentInfo, ShardInfo};

use super::*;
use crate::export::ExportInfo;
use crate::shard::LogStatus;
use crate::testutil::{line, open};
use crate::{search_replicas, ShardOp};

const WAIT: Duration = Duration::from_secs(60);

fn rspec(collection: u64, dim: u32) -> ReplicaSpec {
    ReplicaSpec {
        key: ReplicaKey { collection, shard: 0 },
        name: format!("c{collection}"),
        dim,
        metric: Metric::L2,
        seal_rows: 64,
        index: Default::default(),
        fields: Vec::new(),
    }
}

/// The op at `lsn` of a deterministic stream: upserts that replace earlier
/// ids (tombstones in sealed segments), deletes, and an epoch start.
fn op(lsn: u64) -> ShardOp {
    match lsn % 7 {
        3 => ShardOp::Delete(vec![lsn * 5 % 200, lsn * 11 % 200, 9999]),
        5 => ShardOp::EpochStart,
        _ => ShardOp::Upsert(
            (0..6)
                .map(|i| Point {
                    id: (lsn * 13 + i * 31) % 200,
                    vector: vec![lsn as f32, i as f32],
                    payload: (i % 2 == 0).then(|| format!("{{\"lsn\":{lsn}}}")),
                })
                .collect(),
        ),
    }
}

/// Appends and applies ops `from..=to` of the stream in `term`.
fn feed(r: &ShardReplica, term: u64, lsns: std::ops::RangeInclusive<u64>) {
    for lsn in lsns {
        let prev = r.last_op();
        r.append(prev, &[(OpId::new(term, lsn), op(lsn))]).unwrap();
        r.apply_through(lsn).unwrap();
    }
}

type State = (
    ShardInfo,
    Vec<SegmentInfo>,
    LogStatus,
    Vec<Option<edgevec_proto::PointRecord>>,
    Vec<Vec<edgevec_proto::Hit>>,
);

/// Everything a reader of the replica sees; the log's first LSN aside
/// (an import starts with an empty log). k above ef_search: every segment
/// is searched exactly, whatever each HNSW graph came out as.
fn assert_same(a: &Arc<ShardReplica>, b: &Arc<ShardReplica>) {
    let (sa, sb) = (state(a), state(b));
    assert_eq!(sa.0, sb.0);
    assert_eq!(sa.1, sb.1);
    assert_eq!(sa.2, sb.2);
    for (x, y) in sa.3.iter().zip(&sb.3) {
        assert_eq!(x, y);
    }
    assert_eq!(sa.4, sb.4);
}

fn state(r: &Arc<ShardReplica>) -> State {
    let (shard, segments) = r.info();
    let mut log = r.log_status();
    log.first_logged = None;
    let all: Vec<u64> = (0..220).collect();
    let queries = vec![vec![3.0, 1.0], vec![150.0, 4.0]];
    let hits = search_replicas(
        std::slice::from_ref(r),
        Metric::L2,
        &queries,
        200,
        true,
        Default::default(),
        None,
    )
    .unwrap();
    (shard, segments, log, r.get(&all).unwrap(), hits)
}

fn import_dirs(root: &Path) -> Vec<PathBuf> {
    layout::import_dirs(root).unwrap().into_iter().map(|d| d.path).collect()
}

fn trash(root: &Path) -> Vec<String> {
    match std::fs::read_dir(root.join("trash")) {
        Ok(entries) => entries
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    }
}

#[test]
fn export_then_import_reproduces_the_replica() {
    let (da, db, files) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let (ea, eb) = (open(da.path()), open(db.path()));
    let a = ea.create_replica(rspec(1, 2)).unwrap();
    feed(&a, 1, 1..=40);
    a.raise_term(4).unwrap();
    feed(&a, 4, 41..=90);
    assert!(ea.wait_for_indexes(WAIT));

    let path = files.path().join("a.export");
    let info = a.export_to(&path, &[]).unwrap();
    assert_eq!(
        info,
        ExportInfo {
            last: OpId::new(4, 90),
            points: a.info().0.points,
            bytes: std::fs::metadata(&path).unwrap().len(),
            reused_rows: 0,
        }
    );
    let b = eb.import_replica(rspec(1, 2), &path).unwrap();
    assert!(Arc::ptr_eq(&b, &eb.replica(rspec(1, 2).key).unwrap()));
    assert!(eb.wait_for_indexes(WAIT), "sealed segments get their indexes built");
    assert_same(&a, &b);
    assert!(a.info().1.len() > 3, "several sealed segments: {:?}", a.info().1);
    assert_eq!((b.last_op(), b.applied_lsn(), b.term()), (OpId::new(4, 90), 90, 4));
    assert_eq!(b.term_history(), vec![(1, 1), (4, 41)]);
    assert_eq!(b.first_logged_lsn(), None);
    assert_eq!(b.op_id_at(40), Some(OpId::new(1, 40)));
    assert!(b.entries_after(90, 10, usize::MAX).unwrap().is_empty());
    assert!(matches!(
        b.entries_after(89, 10, usize::MAX),
        Err(EngineError::LogTrimmed { wanted: 90, .. })
    ));

    // Both go on with the same ops, sealing more segments, and stay alike.
    feed(&a, 5, 91..=160);
    feed(&b, 5, 91..=160);
    assert!(ea.wait_for_indexes(WAIT) && eb.wait_for_indexes(WAIT));
    assert_same(&a, &b);
    assert!(b.info().1.len() > a.info().1.len() - 1 && b.info().1.len() > 6);
    assert_eq!(
        b.entries_after(90, 100, usize::MAX).unwrap(),
        a.entries_after(90, 100, usize::MAX).unwrap()
    );
}

fn temp_dirs<const N: usize>() -> [tempfile::TempDir; N] {
    std::array::from_fn(|_| tempfile::tempdir().unwrap())
}

/// Inode numbers of a replica directory's index files, by name.
fn index_files(dir: &Path) -> std::collections::BTreeMap<String, u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".hnsw"))
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                e.metadata().unwrap().ino(),
            )
        })
        .collect()
}

/// A replica that went away holding the older sealed segments gets an
/// export without their rows: the import takes them, and their index
/// files, from its own copy, and ends as the exporter's replica. A copy
/// that differs, or no copy at all, is refused, and the replica stays as
/// it was.
#[test]
fn an_export_leaves_out_the_sealed_segments_the_importer_holds() {
    let [da, db, dc, files] = temp_dirs();
    let (ea, eb, ec) = (open(da.path()), open(db.path()), open(dc.path()));
    let spec = rspec(1, 2);
    let (a, b) = (
        ea.create_replica(spec.clone()).unwrap(),
        eb.create_replica(spec.clone()).unwrap(),
    );
    feed(&a, 1, 1..=60);
    feed(&b, 1, 1..=60);
    assert!(ea.wait_for_indexes(WAIT) && eb.wait_for_indexes(WAIT));
    // `b` is away while `a` goes on in a new term (deletes reach rows of
    // the segments `b` holds).
    a.raise_term(3).unwrap();
    feed(&a, 3, 61..=150);
    assert!(ea.wait_for_indexes(WAIT));

    let held = b.sealed_digests().unwrap();
    assert!(held.len() >= 3, "sealed segments to reuse: {held:?}");
    let held_rows: u64 = held.iter().map(|d| u64::from(d.rows)).sum();
    let (whole, part) = (files.path().join("whole.export"), files.path().join("part.export"));
    let whole_info = a.export_to(&whole, &[]).unwrap();
    let info = a.export_to(&part, &held).unwrap();
    assert_eq!((whole_info.reused_rows, info.reused_rows), (0, held_rows));
    assert_eq!((info.last, info.points), (whole_info.last, whole_info.points));
    assert!(
        info.bytes < whole_info.bytes,
        "{} bytes reusing {held_rows} rows, {} whole",
        info.bytes,
        whole_info.bytes
    );

    // A replica whose copies differ (other ops, same segments) refuses it
    // and is left as it was; so is a node without the replica.
    let c = ec.create_replica(spec.clone()).unwrap();
    for lsn in 1..=60 {
        let prev = c.last_op();
        c.append(prev, &[(OpId::new(1, lsn), op(lsn + 7))]).unwrap();
        c.apply_through(lsn).unwrap();
    }
    assert!(ec.wait_for_indexes(WAIT));
    let before = state(&c);
    match ec.import_replica(spec.clone(), &part) {
        Err(EngineError::ReusedSegmentDiffers { segment, .. }) => {
            assert!(held.iter().any(|d| d.segment == segment))
        }
        other => panic!("an import over other copies: {:?}", other.map(|_| "imported")),
    }
    let c = ec.replica(spec.key).unwrap();
    assert_same_state(&before, &state(&c));
    assert!(import_dirs(dc.path()).is_empty());
    let ed = tempfile::tempdir().unwrap();
    assert!(matches!(
        open(ed.path()).import_replica(spec.clone(), &part),
        Err(EngineError::ReusedSegmentDiffers { .. })
    ));

    // The replica that holds them: the reused segments keep their files.
    let dir = layout::replica_dir(db.path(), spec.key);
    let old_files = index_files(&dir);
    let b = eb.import_replica(spec.clone(), &part).unwrap();
    let new_files = index_files(&dir);
    for d in &held {
        let name = format!("seg-{}.hnsw", d.segment);
        assert_eq!(
            new_files.get(&name),
            old_files.get(&name),
            "{name} of the replaced replica"
        );
    }
    assert!(eb.wait_for_indexes(WAIT));
    assert_same(&a, &b);
}

fn assert_same_state(x: &State, y: &State) {
    assert_eq!((&x.0, &x.1, &x.2), (&y.0, &y.1, &y.2));
    assert_eq!(x.3, y.3);
    assert_eq!(x.4, y.4);
}

#[test]
fn export_leaves_out_ops_logged_but_not_applied() {
    let (da, db, files) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let (ea, eb) = (open(da.path()), open(db.path()));
    let a = ea.create_replica(rspec(1, 2)).unwrap();
    feed(&a, 2, 1..=20);
    let unapplied: Vec<(OpId, ShardOp)> = (21..=25).map(|lsn| (OpId::new(7, lsn), op(lsn))).collect();
    a.append(OpId::new(2, 20), unapplied.as_slice()).unwrap();
    assert_eq!((a.term_history(), a.applied_lsn()), (vec![(2, 1), (7, 21)], 20));

    let path = files.path().join("a.export");
    assert_eq!(a.export_to(&path, &[]).unwrap().last, OpId::new(2, 20));
    let b = eb.import_replica(rspec(1, 2), &path).unwrap();
    assert_eq!(
        (b.last_op(), b.term(), b.term_history()),
        (OpId::new(2, 20), 7, vec![(2, 1)])
    );
    assert!(ea.wait_for_indexes(WAIT) && eb.wait_for_indexes(WAIT));
    assert_eq!(
        (b.info(), b.get(&[0, 13, 50]).unwrap()),
        (a.info(), a.get(&[0, 13, 50]).unwrap())
    );
    // The log continues right after the export: the unapplied suffix
    // follows as log catch-up would send it.
    b.append(b.last_op(), unapplied.as_slice()).unwrap();
    a.apply_through(25).unwrap();
    b.apply_through(25).unwrap();
    assert!(ea.wait_for_indexes(WAIT) && eb.wait_for_indexes(WAIT));
    assert_same(&a, &b);
}

#[test]
fn export_while_applies_continue_is_consistent_at_its_lsn() {
    let [da, db, dc, files] = temp_dirs();
    let (ea, eb, ec) = (open(da.path()), open(db.path()), open(dc.path()));
    // Op 1 holds enough rows that the export takes a while (ids apart from
    // the stream's); the stream goes on from op 2.
    let bulk = ShardOp::Upsert(
        (0..20_000)
            .map(|i| Point {
                id: 1000 + i,
                vector: vec![i as f32, -1.0],
                payload: Some(format!("{{\"i\":{i}}}")),
            })
            .collect(),
    );
    let first = |r: &ShardReplica| {
        r.append(OpId::ZERO, &[(OpId::new(1, 1), bulk.clone())]).unwrap();
        r.apply_through(1).unwrap();
    };
    let a = ea.create_replica(rspec(1, 2)).unwrap();
    first(&a);
    let path = files.path().join("a.export");
    let stop = AtomicBool::new(false);
    let (before, info, after, written) = std::thread::scope(|s| {
        let writer = s.spawn(|| {
            let mut lsn = 1;
            while !stop.load(Ordering::Acquire) || lsn < 100 {
                lsn += 1;
                feed(&a, 1, lsn..=lsn);
            }
            lsn
        });
        while a.applied_lsn() < 30 {
            std::thread::yield_now();
        }
        let before = a.applied_lsn();
        let info = a.export_to(&path, &[]).unwrap();
        let after = a.applied_lsn();
        stop.store(true, Ordering::Release);
        (before, info, after, writer.join().unwrap())
    });
    assert!(
        before <= info.last.lsn && info.last.lsn <= after && after <= written,
        "{info:?} between {before} and {after}, of {written}"
    );

    let b = eb.import_replica(rspec(1, 2), &path).unwrap();
    let c = ec.create_replica(rspec(1, 2)).unwrap();
    first(&c);
    feed(&c, 1, 2..=info.last.lsn);
    assert!(eb.wait_for_indexes(WAIT) && ec.wait_for_indexes(WAIT));
    assert_same(&b, &c);
    assert_eq!(b.info().0.points, info.points);
    let bulk_ids: Vec<u64> = (1000..21_000).collect();
    assert_eq!(b.get(&bulk_ids).unwrap(), c.get(&bulk_ids).unwrap());
}

/// An engine holding replica 1 with some state, and a file exported from
/// a replica of `spec` in another engine.
fn target_and_export(spec: ReplicaSpec) -> (tempfile::TempDir, Engine, Arc<ShardReplica>, PathBuf) {
    let (dir, src) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let e = open(dir.path());
    let r = e.create_replica(rspec(1, 2)).unwrap();
    crate::testutil::write(&r, ShardOp::Upsert(line(0..50))).unwrap();
    let source = open(src.path());
    let s = source.create_replica(spec.clone()).unwrap();
    let dim = spec.dim as usize;
    let points = (0..40)
        .map(|id| Point {
            id: 1000 + id,
            vector: vec![id as f32; dim],
            payload: None,
        })
        .collect();
    crate::testutil::write(&s, ShardOp::Upsert(points)).unwrap();
    let path = dir.path().join("source.export");
    s.export_to(&path, &[]).unwrap();
    (dir, e, r, path)
}

fn refused(e: &Engine, r: &Arc<ShardReplica>, spec: ReplicaSpec, path: &Path) -> EngineError {
    let before = state(r);
    let err = match e.import_replica(spec, path) {
        Err(err) => err,
        Ok(_) => panic!("import of {} was accepted", path.display()),
    };
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "names the file: {err}"
    );
    assert!(Arc::ptr_eq(r, &e.replica(r_key()).unwrap()), "the same replica stays");
    assert_eq!(state(r), before);
    let root = e.root.clone();
    assert!(import_dirs(&root).is_empty(), "{:?}", import_dirs(&root));
    assert!(trash(&root).is_empty());
    crate::testutil::write(r, ShardOp::Delete(vec![49])).unwrap();
    err
}

fn r_key() -> ReplicaKey {
    rspec(1, 2).key
}

#[test]
fn damaged_or_mismatched_exports_are_refused_and_change_nothing() {
    let (_dir, e, r, path) = target_and_export(rspec(1, 2));
    let good = std::fs::read(&path).unwrap();
    let corrupt = |err: EngineError| match err {
        EngineError::Corrupt { message, .. } => message,
        other => panic!("expected Corrupt, got {other:?}"),
    };

    let mut flipped = good.clone();
    flipped[good.len() / 2] ^= 0x10;
    std::fs::write(&path, &flipped).unwrap();
    corrupt(refused(&e, &r, rspec(1, 2), &path));

    std::fs::write(&path, &good[..good.len() - 5]).unwrap();
    assert!(corrupt(refused(&e, &r, rspec(1, 2), &path)).contains("truncated"));

    let mut version = good.clone();
    let unknown = crate::export::EXPORT_FORMAT + 1;
    version[8..12].copy_from_slice(&unknown.to_le_bytes());
    std::fs::write(&path, &version).unwrap();
    assert!(corrupt(refused(&e, &r, rspec(1, 2), &path)).contains(&format!("version {unknown}")));

    let mut magic = good.clone();
    magic[0] = b'X';
    std::fs::write(&path, &magic).unwrap();
    assert!(corrupt(refused(&e, &r, rspec(1, 2), &path)).contains("magic"));

    // A good file of another schema.
    for (spec, field) in [
        (rspec(1, 3), "dim"),
        (
            ReplicaSpec {
                metric: Metric::Cosine,
                ..rspec(1, 2)
            },
            "metric",
        ),
        (
            ReplicaSpec {
                seal_rows: 65,
                ..rspec(1, 2)
            },
            "seal_rows",
        ),
        (
            ReplicaSpec {
                key: ReplicaKey {
                    collection: 1,
                    shard: 1,
                },
                ..rspec(1, 2)
            },
            "shard",
        ),
    ] {
        let (_src, _, _, other) = target_and_export(spec);
        std::fs::copy(&other, &path).unwrap();
        match refused(&e, &r, rspec(1, 2), &path) {
            EngineError::Invalid { field: f, .. } => assert_eq!(f, field),
            err => panic!("expected Invalid {field}, got {err:?}"),
        }
    }
    // A missing file.
    assert!(matches!(
        refused(&e, &r, rspec(1, 2), &_dir.path().join("missing")),
        EngineError::Io { .. }
    ));
    // The good file still imports.
    std::fs::write(&path, &good).unwrap();
    let imported = e.import_replica(rspec(1, 2), &path).unwrap();
    assert_eq!(imported.info().0.points, 40);
}

#[test]
fn schema_changes_under_a_key_are_refused() {
    let (_dir, e, _r, path) = target_and_export(rspec(1, 2));
    assert!(matches!(
        e.import_replica(rspec(1, 3), &path),
        Err(EngineError::ReplicaExists(k)) if k == r_key()
    ));
}

#[test]
fn import_replaces_a_replica_and_survives_reopen() {
    let (dir, e, old, path) = target_and_export(rspec(1, 2));
    let root = dir.path().to_owned();
    let before = state(&old);
    drop(old);
    let new = e.import_replica(rspec(1, 2), &path).unwrap();
    let imported = state(&new);
    assert_ne!(before, imported);
    assert_eq!(new.get(&[1000]).unwrap()[0].as_ref().unwrap().vector, vec![0.0, 0.0]);
    assert!(new.get(&[3]).unwrap()[0].is_none(), "old points are gone");
    let trashed = trash(&root);
    assert_eq!(trashed.len(), 1);
    assert!(trashed[0].starts_with("1-0-"), "{trashed:?}");
    assert!(root.join("trash").join(&trashed[0]).join("shard.redb").exists());
    assert!(import_dirs(&root).is_empty());
    // A new key is imported too (a registry entry is made).
    let other = ReplicaSpec {
        key: ReplicaKey {
            collection: 8,
            shard: 0,
        },
        ..rspec(1, 2)
    };
    e.import_replica(other.clone(), &path).unwrap();
    let other_state = state(&e.replica(other.key).unwrap());
    assert!(e.wait_for_indexes(WAIT));
    drop((new, e));

    let e = open(&root);
    assert_eq!(state(&e.replica(r_key()).unwrap()), imported);
    assert_eq!(state(&e.replica(other.key).unwrap()), other_state);
    let r = e.replica(r_key()).unwrap();
    crate::testutil::write(&r, ShardOp::Delete(vec![1000])).unwrap();
    assert_eq!(r.last_op(), OpId::new(1, 2));
}

#[test]
fn open_finishes_or_discards_interrupted_imports() {
    let (dir, e, _old, path) = target_and_export(rspec(1, 2));
    let root = dir.path().to_owned();
    let imported = state(&e.import_replica(rspec(1, 2), &path).unwrap());
    assert_eq!(trash(&root).len(), 1);
    drop((_old, e));

    // A crash between moving the old directory away and renaming the
    // import into place leaves a complete `.import` and no replica dir.
    let ready = layout::import_dir(&root, r_key(), ImportStage::Ready);
    std::fs::rename(layout::replica_dir(&root, r_key()), &ready).unwrap();
    // An incomplete import, and a complete one of a key the registry does
    // not name (a crash before its entry was written).
    let stray = ReplicaKey {
        collection: 5,
        shard: 0,
    };
    let staging = layout::import_dir(&root, r_key(), ImportStage::Staging);
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::write(staging.join("shard.redb"), b"half").unwrap();
    let unnamed = layout::import_dir(&root, stray, ImportStage::Ready);
    std::fs::create_dir_all(&unnamed).unwrap();

    let e = open(&root);
    assert_eq!(
        state(&e.replica(r_key()).unwrap()),
        imported,
        "the import was completed"
    );
    assert!(e.replica(stray).is_none());
    assert!(import_dirs(&root).is_empty());
    let mut trashed = trash(&root);
    trashed.sort();
    assert_eq!(trashed.len(), 3, "{trashed:?}");
    assert!(trashed[0].starts_with("1-0-") && trashed[1].starts_with("1-0.import.tmp-"));
    assert!(trashed[2].starts_with("5-0.import-"), "{trashed:?}");
    drop(e);

    // A complete import beside an intact replica (a crash before the old
    // directory moved) replaces it: either outcome is whole.
    let e = open(&root);
    let live = state(&e.replica(r_key()).unwrap());
    drop(e);
    let copy = layout::import_dir(&root, r_key(), ImportStage::Ready);
    copy_dir(&layout::replica_dir(&root, r_key()), &copy);
    let e = open(&root);
    assert_eq!(state(&e.replica(r_key()).unwrap()), live);
    assert_eq!(trash(&root).len(), 4);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}
