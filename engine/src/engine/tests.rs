use super::*;
use crate::testutil::{ids, line, open, point, spec, write, Collection};
use crate::ShardOp;
use edgevec_proto::{IndexState, OpId, SegmentState};

const WAIT: Duration = Duration::from_secs(60);

fn rspec(collection: u64, shard: u32, dim: u32) -> ReplicaSpec {
    ReplicaSpec {
        key: ReplicaKey { collection, shard },
        name: format!("c{collection}"),
        dim,
        metric: Metric::L2,
        seal_rows: 64,
        index: Default::default(),
        fields: Vec::new(),
    }
}

fn keys(e: &Engine) -> Vec<(u64, u32)> {
    e.replicas()
        .iter()
        .map(|(s, _)| (s.key.collection, s.key.shard))
        .collect()
}

fn layout_error<T>(r: Result<T, EngineError>) -> (PathBuf, String) {
    match r {
        Err(EngineError::Layout { path, message }) => (path, message),
        Err(e) => panic!("expected a layout error, got {e:?}"),
        Ok(_) => panic!("expected a layout error, got Ok"),
    }
}

#[test]
fn engine_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Engine>();
}

#[test]
fn replicas_are_created_dropped_and_reopened_one_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    {
        let e = open(dir.path());
        assert_eq!(
            std::fs::read_to_string(dir.path().join("LAYOUT")).unwrap(),
            "edgevec-engine layout 2\n"
        );
        let r = e.create_replica(rspec(2, 0, 2)).unwrap();
        e.create_replica(rspec(1, 1, 2)).unwrap();
        e.create_replica(rspec(1, 0, 2)).unwrap();
        assert_eq!(keys(&e), vec![(1, 0), (1, 1), (2, 0)]);
        assert!(
            Arc::ptr_eq(&r, &e.create_replica(rspec(2, 0, 2)).unwrap()),
            "same spec: same replica"
        );
        assert!(matches!(
            e.create_replica(rspec(2, 0, 3)),
            Err(EngineError::ReplicaExists(k)) if k == rspec(2, 0, 2).key
        ));
        assert!(matches!(
            e.create_replica(rspec(3, 0, 0)),
            Err(EngineError::Invalid { field, .. }) if field == "dim"
        ));
        assert!(e.replica(rspec(3, 0, 2).key).is_none());
        write(&r, ShardOp::Upsert(line(0..10))).unwrap();
        write(&e.replica(rspec(1, 1, 2).key).unwrap(), ShardOp::Upsert(line(0..3))).unwrap();

        assert!(e.drop_replica(rspec(1, 1, 2).key).unwrap());
        assert!(!e.drop_replica(rspec(1, 1, 2).key).unwrap());
        assert!(!dir.path().join("replicas/1-1").exists());
        assert!(e.replica(rspec(1, 1, 2).key).is_none());
        assert_eq!(keys(&e), vec![(1, 0), (2, 0)]);
    }
    let e = open(dir.path());
    assert_eq!(keys(&e), vec![(1, 0), (2, 0)]);
    let (spec, r) = &e.replicas()[1];
    assert_eq!(*spec, rspec(2, 0, 2));
    assert_eq!((r.info().0.points, r.last_op()), (10, OpId::new(1, 1)));
    // Created again, a dropped replica starts empty.
    let again = e.create_replica(rspec(1, 1, 2)).unwrap();
    assert_eq!(
        (again.info().0.points, again.last_op(), again.term()),
        (0, OpId::ZERO, 0)
    );
    assert!(!dir.path().join("trash").exists(), "nothing was left over");
}

#[test]
fn old_layout_is_refused_and_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let shard_file = dir.path().join("collections/1/shard-0/shard.redb");
    std::fs::create_dir_all(shard_file.parent().unwrap()).unwrap();
    std::fs::write(&shard_file, b"old shard").unwrap();
    std::fs::write(dir.path().join("catalog.redb"), b"old catalog").unwrap();
    let listing = || {
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    let before = listing();
    let (path, message) = layout_error(Engine::open(dir.path(), EngineOptions::default()));
    assert_eq!(path, dir.path());
    assert!(message.contains("single-node format"), "{message}");
    assert!(message.contains("nothing was deleted"), "{message}");
    assert!(message.contains("Move the directory away"), "{message}");
    assert_eq!(listing(), before, "no LAYOUT, no registry, nothing new");
    assert_eq!(std::fs::read(&shard_file).unwrap(), b"old shard");
    assert_eq!(std::fs::read(dir.path().join("catalog.redb")).unwrap(), b"old catalog");

    // A LAYOUT of another version is refused too.
    let other = tempfile::tempdir().unwrap();
    std::fs::write(other.path().join("LAYOUT"), "edgevec-engine layout 3\n").unwrap();
    let (_, message) = layout_error(Engine::open(other.path(), EngineOptions::default()));
    assert!(message.contains("layout 3"), "{message}");
}

#[test]
fn replica_dirs_without_their_registry_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let e = open(dir.path());
        let r = e.create_replica(rspec(1, 0, 2)).unwrap();
        write(&r, ShardOp::Upsert(line(0..5))).unwrap();
    }
    let registry = dir.path().join("replicas.redb");
    let saved = std::fs::read(&registry).unwrap();
    // Missing, empty, or cut in half: refused, naming the file.
    for damaged in [None, Some(Vec::new()), Some(saved[..saved.len() / 2].to_vec())] {
        match &damaged {
            None => std::fs::remove_file(&registry).unwrap(),
            Some(bytes) => std::fs::write(&registry, bytes).unwrap(),
        }
        let (path, message) = layout_error(Engine::open(dir.path(), EngineOptions::default()));
        assert_eq!(path, registry);
        let expected = match damaged.as_ref().map(Vec::len) {
            Some(n) if n > 0 => ["cannot be read", "Nothing was changed"],
            _ => ["missing or empty", "Nothing was deleted"],
        };
        assert!(expected.iter().all(|e| message.contains(e)), "{message}");
        assert!(dir.path().join("replicas/1-0/shard.redb").exists());
        let len = std::fs::metadata(&registry).map(|m| m.len() as usize).ok();
        assert_eq!(len, damaged.map(|d| d.len()));
    }
    std::fs::write(&registry, saved).unwrap();
    let e = open(dir.path());
    assert_eq!(e.replica(rspec(1, 0, 2).key).unwrap().info().0.points, 5);
}

#[test]
fn replica_dirs_without_an_entry_go_to_trash() {
    let dir = tempfile::tempdir().unwrap();
    {
        let e = open(dir.path());
        write(&e.create_replica(rspec(1, 0, 2)).unwrap(), ShardOp::Upsert(line(0..5))).unwrap();
    }
    // A drop interrupted between the registry commit and the file removal
    // leaves a directory without an entry; names not ours are left alone.
    let orphan = dir.path().join("replicas/7-0");
    std::fs::create_dir_all(&orphan).unwrap();
    std::fs::write(orphan.join("shard.redb"), b"orphan").unwrap();
    let foreign = dir.path().join("replicas/notes");
    std::fs::create_dir_all(&foreign).unwrap();
    let e = open(dir.path());
    assert!(!orphan.exists());
    assert!(foreign.exists());
    let trashed: Vec<PathBuf> = std::fs::read_dir(dir.path().join("trash"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(trashed.len(), 1);
    let name = trashed[0].file_name().unwrap().to_string_lossy().into_owned();
    assert!(name.starts_with("7-0-"), "{name}");
    assert_eq!(std::fs::read(trashed[0].join("shard.redb")).unwrap(), b"orphan");
    assert_eq!(keys(&e), vec![(1, 0)]);
    assert_eq!(e.replica(rspec(1, 0, 2).key).unwrap().info().0.points, 5);

    // The same holds for a leftover met at create: it is moved aside, the
    // new replica starts empty.
    let leftover = dir.path().join("replicas/3-0");
    std::fs::create_dir_all(&leftover).unwrap();
    std::fs::write(leftover.join("shard.redb"), b"leftover").unwrap();
    let r = e.create_replica(rspec(3, 0, 2)).unwrap();
    assert_eq!(r.info().0.points, 0);
    assert_eq!(std::fs::read_dir(dir.path().join("trash")).unwrap().count(), 2);
}

#[test]
fn restart_restores_replicas_and_indexes() {
    let dir = tempfile::tempdir().unwrap();
    let (before, index_file, mtime);
    let specs = || (spec("a", 2, Metric::L2, 2, 64), spec("b", 2, Metric::Cosine, 1, 64));
    let snapshot = |a: &Collection, e: &Engine| {
        (
            e.replicas()
                .iter()
                .map(|(_, r)| (r.info(), r.log_status()))
                .collect::<Vec<_>>(),
            a.search(&[vec![8.0, 0.0], vec![-5.0, 0.0]], 5, true).unwrap(),
            a.get(&(0..300).collect::<Vec<_>>()),
        )
    };
    {
        let e = open(dir.path());
        let (a, b) = (
            Collection::create(&e, 1, specs().0),
            Collection::create(&e, 2, specs().1),
        );
        a.upsert(line(0..300)).unwrap();
        a.delete(&[7, 8]).unwrap();
        a.upsert(vec![point(9, vec![-5.0, 0.0])]).unwrap();
        b.upsert(vec![point(1, vec![1.0, 1.0])]).unwrap();
        assert!(e.wait_for_indexes(WAIT));
        before = snapshot(&a, &e);
        assert!(a.segments().iter().any(|s| s.index == IndexState::Ready));
        index_file = dir.path().join("replicas/1-0/seg-1.hnsw");
        mtime = std::fs::metadata(&index_file).unwrap().modified().unwrap();
    }
    let e = open(dir.path());
    let (a, b) = (
        Collection::create(&e, 1, specs().0),
        Collection::create(&e, 2, specs().1),
    );
    // Indexes are Ready at once: loaded from their files, not rebuilt.
    assert_eq!(before, snapshot(&a, &e));
    assert_eq!(std::fs::metadata(&index_file).unwrap().modified().unwrap(), mtime);
    assert_eq!(before.2.len(), 298);
    assert_eq!(ids(&before.1[1][..1]), vec![9]);
    // Writes continue from the restored op ids.
    assert_eq!(
        write(&b.replicas[0], ShardOp::Delete(vec![1])).unwrap(),
        OpId::new(1, 2)
    );
}

#[test]
fn missing_index_file_is_rebuilt_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let s = || spec("a", 2, Metric::L2, 1, 64);
    {
        let e = open(dir.path());
        Collection::create(&e, 1, s()).upsert(line(0..70)).unwrap();
        assert!(e.wait_for_indexes(WAIT));
    }
    let index_file = dir.path().join("replicas/1-0/seg-1.hnsw");
    std::fs::write(&index_file, b"garbage").unwrap();
    let e = open(dir.path());
    let a = Collection::create(&e, 1, s());
    // Searchable (by brute force) whether or not the rebuild is done.
    assert_eq!(ids(&a.search(&[vec![3.0, 0.0]], 1, false).unwrap()[0]), vec![3]);
    assert!(e.wait_for_indexes(WAIT));
    assert_eq!(a.segments()[0].index, IndexState::Ready);
    assert!(std::fs::read(&index_file).unwrap().starts_with(b"EVHNSW"));
}

const CRASH_DIR_ENV: &str = "EDGEVEC_ENGINE_CRASH_DIR";

fn crash_spec() -> edgevec_proto::CollectionSpec {
    spec("k", 8, Metric::L2, 2, 64)
}

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
    let c = Collection::create(&e, 1, crash_spec());
    for batch in 0u64.. {
        let pts = (0..50)
            .map(|i| point(batch * 50 + i, vec![(batch * 50 + i) as f32; 8]))
            .collect();
        c.upsert(pts).unwrap();
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
    let c = Collection::create(&e, 1, crash_spec());
    let want: Vec<u64> = (0..(acked + 1) * 50).collect();
    let got = c.get(&want);
    assert_eq!(got.len(), want.len(), "every acknowledged point survives kill -9");
    assert!(got.iter().all(|p| p.vector[0] == p.id as f32));
    assert!(e.wait_for_indexes(WAIT));
    assert!(c.points() >= want.len() as u64);
    for r in &c.replicas {
        let st = r.log_status();
        assert_eq!(st.last.lsn, st.applied, "{st:?}");
    }
    assert!(c.segments().iter().filter(|s| s.state == SegmentState::Sealed).count() >= 2);
}

#[test]
fn a_replica_that_fails_to_open_is_set_aside_until_an_import_replaces_it() {
    let dir = tempfile::tempdir().unwrap();
    let (bad, good) = (rspec(1, 0, 2), rspec(2, 0, 2));
    let exported = dir.path().join("good.export");
    {
        let e = open(dir.path());
        for s in [&bad, &good] {
            write(&e.create_replica(s.clone()).unwrap(), ShardOp::Upsert(line(0..5))).unwrap();
        }
        e.replica(bad.key).unwrap().export_to(&exported, &[]).unwrap();
    }
    let file = dir.path().join("replicas/1-0/shard.redb");
    let mut bytes = std::fs::read(&file).unwrap();
    let len = bytes.len();
    bytes.truncate(len / 2);
    std::fs::write(&file, &bytes).unwrap();

    for _ in 0..2 {
        let e = open(dir.path());
        let damage = e.damage(bad.key).expect("reported damaged");
        assert_eq!(damage.file, file);
        assert!(damage.kept_at.starts_with(dir.path().join("damaged")), "{damage}");
        assert_eq!(std::fs::read(damage.kept_at.join("shard.redb")).unwrap(), bytes);
        assert_eq!(e.damaged().len(), 1);
        // The other replica serves; the damaged one is empty, in place.
        assert_eq!(e.replica(good.key).unwrap().info().0.points, 5);
        assert_eq!(e.replica(bad.key).unwrap().info().0.points, 0);
    }
    let e = open(dir.path());
    e.import_replica(bad.clone(), &exported).unwrap();
    assert!(e.damage(bad.key).is_none());
    drop(e);
    let e = open(dir.path());
    assert!(e.damaged().is_empty());
    assert_eq!(e.replica(bad.key).unwrap().info().0.points, 5);
    // What was set aside is still there.
    assert_eq!(std::fs::read_dir(dir.path().join("damaged")).unwrap().count(), 1);
}

#[test]
fn an_import_opens_with_the_exporters_indexes_and_rebuilds_an_unusable_one() {
    let dir = tempfile::tempdir().unwrap();
    let s = || spec("a", 2, Metric::L2, 1, 64);
    let queries = [vec![8.0, 0.0], vec![150.0, 0.0], vec![299.0, 0.0]];
    let (exported, damaged) = (dir.path().join("a.export"), dir.path().join("b.export"));
    let (before, files);
    {
        let e = open(&dir.path().join("exporter"));
        let a = Collection::create(&e, 1, s());
        a.upsert(line(0..300)).unwrap();
        assert!(e.wait_for_indexes(WAIT));
        before = a.search(&queries, 5, true).unwrap();
        a.replicas[0].export_to(&exported, &[]).unwrap();
        let replica_dir = dir.path().join("exporter/replicas/1-0");
        files = std::fs::read_dir(&replica_dir)
            .unwrap()
            .filter(|f| f.as_ref().unwrap().file_name().to_string_lossy().ends_with(".hnsw"))
            .count();
        std::fs::write(replica_dir.join("seg-1.hnsw"), b"garbage").unwrap();
        a.replicas[0].export_to(&damaged, &[]).unwrap();
    }
    // 300 rows at 64 a segment: four sealed segments, each with its index.
    assert_eq!(files, 4);
    let imported = |name: &str, file: &Path| {
        let e = open(&dir.path().join(name));
        let r = e.import_replica(rspec(1, 0, 2), file).unwrap();
        let ready_at_once = r.indexes_ready() && e.index_builds().0 == 0;
        let c = Collection {
            spec: s(),
            replicas: vec![r],
        };
        assert!(e.wait_for_indexes(WAIT));
        assert_eq!(c.search(&queries, 5, true).unwrap(), before);
        assert_eq!(c.points(), 300);
        (ready_at_once, e.index_builds().1)
    };
    // The indexes came with the export: nothing is built.
    assert_eq!(imported("whole", &exported), (true, 0));
    // An index file that does not load is built again, the others not.
    assert_eq!(imported("rebuilt", &damaged), (false, 1));
}

#[test]
fn reopen_waits_for_the_last_handle_and_reloads_from_the_files() {
    let dir = tempfile::tempdir().unwrap();
    let e = open(dir.path());
    let spec = rspec(1, 0, 2);
    let r = e.create_replica(spec.clone()).unwrap();
    write(&r, ShardOp::Upsert(line(0..5))).unwrap();
    // A handle still held: nothing changes.
    assert!(matches!(
        e.reopen_replica(spec.key, Duration::from_millis(50)),
        Err(EngineError::ReplicaBusy(k)) if k == spec.key
    ));
    assert!(Arc::ptr_eq(&r, &e.replica(spec.key).unwrap()));
    drop(r);
    let again = e.reopen_replica(spec.key, Duration::from_secs(5)).unwrap();
    assert_eq!(again.info().0.points, 5);
    write(&again, ShardOp::Upsert(line(5..7))).unwrap();
    assert_eq!(e.replica(spec.key).unwrap().info().0.points, 7);
    assert!(e.damaged().is_empty());
    // The probe leaves nothing behind.
    let names: Vec<String> = std::fs::read_dir(dir.path().join("replicas/1-0"))
        .unwrap()
        .map(|f| f.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.contains("probe")), "{names:?}");
}
