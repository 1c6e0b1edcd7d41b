use super::*;
use crate::op::ShardOp;
use edgevec_proto::Point;
use std::time::Duration;

fn config(seal_rows: u32, retain_bytes: u64) -> ShardConfig {
    ShardConfig {
        shard: 0,
        dim: 2,
        metric: Metric::L2,
        seal_rows,
        index: IndexSpec {
            m: 8,
            ef_construction: 32,
        },
        retain_bytes,
        retain_percent: None,
        hold_bytes: 0,
        fields: Vec::new(),
    }
}

fn open(dir: &Path, seal_rows: u32, retain_bytes: u64) -> Arc<ShardReplica> {
    ShardReplica::open(dir, config(seal_rows, retain_bytes), Arc::new(IndexBuilder::start())).unwrap()
}

/// Points on a line (id at (id, 1)) with a payload naming the id.
pub(super) fn upsert(ids: impl IntoIterator<Item = u64>) -> ShardOp {
    ShardOp::Upsert(
        ids.into_iter()
            .map(|id| Point {
                id,
                vector: vec![id as f32, 1.0],
                payload: Some(format!("{{\"id\":{id}}}")),
            })
            .collect(),
    )
}

fn id(term: u64, lsn: u64) -> OpId {
    OpId::new(term, lsn)
}

/// Entries `upsert([lsn])` for `lsns` in `term`.
fn entries(term: u64, lsns: std::ops::RangeInclusive<u64>) -> Vec<(OpId, ShardOp)> {
    lsns.map(|lsn| (id(term, lsn), upsert([lsn]))).collect()
}

fn found(s: &ShardReplica, ids: &[u64]) -> Vec<u64> {
    s.get(ids).unwrap().into_iter().flatten().map(|p| p.id).collect()
}

#[test]
fn appended_ops_are_searchable_only_once_applied_and_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), 64, OPLOG_RETAIN_BYTES);
    assert_eq!((s.term(), s.last_op(), s.applied_lsn()), (0, OpId::ZERO, 0));
    assert_eq!(s.first_logged_lsn(), None);
    assert_eq!(s.append(OpId::ZERO, entries(1, 1..=3)).unwrap(), id(1, 3));
    assert_eq!((s.term(), s.applied_lsn()), (1, 0));
    assert!(found(&s, &[1, 2, 3]).is_empty(), "logged is not applied");
    assert!(s.search(&[1.0, 1.0], 3, Default::default(), None).unwrap().is_empty());
    assert_eq!(s.info().0.lsn, 0);

    assert_eq!(s.apply_through(2).unwrap(), 2);
    assert_eq!(found(&s, &[1, 2, 3]), vec![1, 2]);
    assert_eq!(s.apply_through(1).unwrap(), 2, "lower LSNs are a no-op");
    assert_eq!(s.apply_through(99).unwrap(), 3, "applies only what is logged");
    s.append(id(1, 3), &[(id(2, 4), ShardOp::EpochStart), (id(2, 5), upsert([5]))])
        .unwrap();
    s.apply_through(4).unwrap();
    let before = s.log_status();
    assert_eq!(
        before,
        LogStatus {
            term: 2,
            last: id(2, 5),
            applied: 4,
            first_logged: Some(1),
            history: vec![(1, 1), (2, 4)],
        }
    );
    assert_eq!(
        found(&s, &[1, 2, 3, 5]),
        vec![1, 2, 3],
        "the epoch start changes no rows"
    );
    s.flush().unwrap();
    drop(s);

    let s = open(dir.path(), 64, OPLOG_RETAIN_BYTES);
    assert_eq!(s.log_status(), before, "log, term, history and applied LSN are durable");
    assert_eq!(found(&s, &[5]), Vec::<u64>::new(), "the unapplied tail stays unapplied");
    assert_eq!(
        s.entries_after(4, 10, usize::MAX).unwrap(),
        vec![(id(2, 5), upsert([5]))]
    );
    assert_eq!(s.apply_through(5).unwrap(), 5);
    assert_eq!(found(&s, &[5]), vec![5]);
}

/// Applies are not fsynced each: until the next durable commit, a crash
/// may take one back. It then lowers only the applied LSN; the ops are
/// still in the log and apply again to the same state.
#[test]
fn an_apply_lost_in_a_crash_is_applied_again_from_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), 64, OPLOG_RETAIN_BYTES);
    s.append(OpId::ZERO, entries(1, 1..=3)).unwrap();
    s.apply_through(3).unwrap();
    s.append(id(1, 3), entries(1, 4..=6)).unwrap();
    s.apply_through(5).unwrap();
    assert_eq!(found(&s, &[1, 2, 3, 4, 5, 6]), vec![1, 2, 3, 4, 5]);
    // Dropped without a flush: what was applied after the last durable
    // commit (the append of 4..=6) is not on disk.
    drop(s);

    let s = open(dir.path(), 64, OPLOG_RETAIN_BYTES);
    let status = s.log_status();
    assert_eq!(status.last, id(1, 6), "appends are durable");
    assert!(
        (3..=5).contains(&status.applied),
        "the apply before the last append is durable with it: {status:?}"
    );
    assert_eq!(found(&s, &[1, 2, 3]), vec![1, 2, 3]);
    assert_eq!(s.apply_through(6).unwrap(), 6);
    assert_eq!(found(&s, &[1, 2, 3, 4, 5, 6]), vec![1, 2, 3, 4, 5, 6]);
    assert_eq!(s.info().0.points, 6);
}

#[test]
fn appends_follow_the_log_matching_rules() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), 64, OPLOG_RETAIN_BYTES);
    s.append(OpId::ZERO, entries(2, 1..=2)).unwrap();
    let refused = |r: Result<OpId, EngineError>| r.expect_err("must be refused");
    match refused(s.append(id(1, 2), entries(2, 3..=3))) {
        EngineError::LogMismatch {
            expected_prev,
            got_prev,
            ..
        } => assert_eq!((expected_prev, got_prev), (id(2, 2), id(1, 2))),
        e => panic!("{e:?}"),
    }
    assert!(matches!(
        refused(s.append(id(2, 1), entries(2, 2..=2))),
        EngineError::LogMismatch { .. }
    ));
    assert!(matches!(
        refused(s.append(id(2, 2), entries(2, 4..=4))),
        EngineError::LsnOutOfOrder {
            expected: 3,
            got: 4,
            ..
        }
    ));
    assert!(matches!(
        refused(s.append(id(2, 2), entries(1, 3..=3))),
        EngineError::StaleTerm {
            term: 1,
            current: 2,
            ..
        }
    ));
    // A wrong-length vector never enters the log.
    let bad = ShardOp::Upsert(vec![Point {
        id: 5,
        vector: vec![1.0],
        payload: None,
    }]);
    assert!(matches!(
        refused(s.append(id(2, 2), &[(id(2, 3), bad)])),
        EngineError::Invalid { .. }
    ));
    assert_eq!(s.last_op(), id(2, 2), "refused appends change nothing");
    assert_eq!(s.append(id(2, 2), &[]).unwrap(), id(2, 2));

    // Terms: raised explicitly (no history entry) or by an op (history).
    s.raise_term(4).unwrap();
    s.raise_term(4).unwrap();
    assert!(matches!(
        s.raise_term(3),
        Err(EngineError::StaleTerm {
            term: 3,
            current: 4,
            ..
        })
    ));
    assert_eq!((s.term(), s.term_history()), (4, vec![(2, 1)]));
    // An op of a term older than the durable one is a primary resending
    // its log: taken, the durable term stays.
    assert_eq!(s.append(id(2, 2), entries(3, 3..=3)).unwrap(), id(3, 3));
    assert_eq!((s.term(), s.term_history()), (4, vec![(2, 1), (3, 3)]));
    s.append(id(3, 3), entries(5, 4..=5)).unwrap();
    assert_eq!((s.term(), s.last_op()), (5, id(5, 5)));
    assert_eq!(s.term_history(), vec![(2, 1), (3, 3), (5, 4)]);
    drop(s);
    let s = open(dir.path(), 64, OPLOG_RETAIN_BYTES);
    assert_eq!((s.term(), s.term_history()), (5, vec![(2, 1), (3, 3), (5, 4)]));
}

#[test]
fn truncation_removes_the_unapplied_suffix_only() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), 64, OPLOG_RETAIN_BYTES);
    s.append(OpId::ZERO, entries(1, 1..=3)).unwrap();
    s.append(id(1, 3), entries(2, 4..=6)).unwrap();
    s.apply_through(2).unwrap();
    assert!(matches!(
        s.truncate_after(1),
        Err(EngineError::TruncateBelowApplied { lsn: 1, applied: 2, .. })
    ));
    s.truncate_after(9).unwrap();
    assert_eq!(s.last_op(), id(2, 6), "at or above the last op: no-op");

    // A new primary of term 3 shares only 1.1 ..= 1.3 with us.
    s.truncate_after(3).unwrap();
    assert_eq!((s.term(), s.last_op(), s.term_history()), (2, id(1, 3), vec![(1, 1)]));
    assert!(s.entries_after(3, 10, usize::MAX).unwrap().is_empty());
    assert!(matches!(
        s.append(id(2, 6), entries(3, 7..=7)),
        Err(EngineError::LogMismatch { .. })
    ));
    s.append(id(1, 3), &[(id(3, 4), ShardOp::EpochStart), (id(3, 5), upsert([50]))])
        .unwrap();
    assert_eq!(s.term_history(), vec![(1, 1), (3, 4)]);
    s.truncate_after(2).unwrap();
    s.apply_through(u64::MAX).unwrap();
    assert_eq!(
        found(&s, &[1, 2, 3, 4, 50]),
        vec![1, 2],
        "truncated ops are never applied"
    );
    s.append(id(1, 2), &[(id(3, 3), upsert([3]))]).unwrap();
    s.apply_through(3).unwrap();
    drop(s);

    let s = open(dir.path(), 64, OPLOG_RETAIN_BYTES);
    let status = s.log_status();
    assert_eq!((status.term, status.last, status.applied), (3, id(3, 3), 3));
    assert_eq!(status.history, vec![(1, 1), (3, 3)]);
    assert_eq!(found(&s, &[1, 2, 3, 4, 5, 50]), vec![1, 2, 3]);
    let logged: Vec<OpId> = s
        .entries_after(0, 10, usize::MAX)
        .unwrap()
        .iter()
        .map(|e| e.0)
        .collect();
    assert_eq!(logged, vec![id(1, 1), id(1, 2), id(3, 3)]);
}

#[test]
fn op_ids_and_log_reads_across_terms_and_retention() {
    let dir = tempfile::tempdir().unwrap();
    let entry_bytes = upsert([1]).encode(1).len() as u64;
    // Room for three entries.
    let s = open(dir.path(), 64, 3 * entry_bytes);
    s.append(OpId::ZERO, entries(1, 1..=2)).unwrap();
    s.append(id(1, 2), entries(4, 3..=5)).unwrap();
    s.append(id(4, 5), entries(7, 6..=8)).unwrap();
    let want: Vec<Option<OpId>> = (0..=9)
        .map(|lsn| match lsn {
            0 => Some(OpId::ZERO),
            1..=2 => Some(id(1, lsn)),
            3..=5 => Some(id(4, lsn)),
            6..=8 => Some(id(7, lsn)),
            _ => None,
        })
        .collect();
    assert_eq!((0..=9).map(|l| s.op_id_at(l)).collect::<Vec<_>>(), want);

    // Limits: by count, by bytes (at least one entry), both generous.
    let lsns = |v: Vec<(OpId, ShardOp)>| v.iter().map(|e| e.0.lsn).collect::<Vec<_>>();
    assert_eq!(lsns(s.entries_after(2, 2, usize::MAX).unwrap()), vec![3, 4]);
    assert_eq!(lsns(s.entries_after(2, 10, 1).unwrap()), vec![3]);
    assert_eq!(
        lsns(s.entries_after(2, 10, 2 * entry_bytes as usize).unwrap()),
        vec![3, 4]
    );
    assert_eq!(lsns(s.entries_after(5, 0, 0).unwrap()), vec![6]);
    assert_eq!(lsns(s.entries_after(7, 10, usize::MAX).unwrap()), vec![8]);
    assert!(s.entries_after(8, 10, usize::MAX).unwrap().is_empty());

    // Nothing applied: retention keeps everything, even over budget.
    assert_eq!(s.first_logged_lsn(), Some(1));
    s.set_retain_floor(2);
    s.apply_through(4).unwrap();
    assert_eq!(s.first_logged_lsn(), Some(3), "the floor keeps 3 and 4");
    s.set_retain_floor(u64::MAX);
    s.apply_through(5).unwrap();
    assert_eq!(s.first_logged_lsn(), Some(6), "applied ops go down to the budget");
    match s.entries_after(4, 10, usize::MAX) {
        Err(EngineError::LogTrimmed {
            wanted: 5, first: 6, ..
        }) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(lsns(s.entries_after(5, 10, usize::MAX).unwrap()), vec![6, 7, 8]);
    // Unapplied entries stay whatever the budget.
    let dir2 = tempfile::tempdir().unwrap();
    let s2 = open(dir2.path(), 64, 0);
    s2.append(OpId::ZERO, entries(1, 1..=3)).unwrap();
    s2.apply_through(1).unwrap();
    assert_eq!(s2.first_logged_lsn(), Some(2));
    s2.apply_through(3).unwrap();
    assert_eq!((s2.first_logged_lsn(), s2.last_op()), (None, id(1, 3)));
    assert!(matches!(
        s2.entries_after(0, 1, 1),
        Err(EngineError::LogTrimmed {
            wanted: 1,
            first: 4,
            ..
        })
    ));
    drop(s);

    // The history outlives the dropped ops, across a restart.
    let s = open(dir.path(), 64, 3 * entry_bytes);
    assert_eq!((0..=9).map(|l| s.op_id_at(l)).collect::<Vec<_>>(), want);
    assert_eq!(s.first_logged_lsn(), Some(6));
    assert_eq!(found(&s, &[1, 5, 6]), vec![1, 5]);
}

#[test]
fn the_log_keeps_a_share_of_the_shards_vectors_within_its_budget() {
    let config = |retain_bytes, retain_percent| ShardConfig {
        retain_bytes,
        retain_percent,
        ..config(1 << 20, 0)
    };
    let mb = 1024 * 1024;
    assert_eq!(retain_budget(&config(32 * mb, None), 100 * mb), 32 * mb);
    assert_eq!(retain_budget(&config(32 * mb, Some(10)), 100 * mb), 10 * mb);
    assert_eq!(
        retain_budget(&config(32 * mb, Some(10)), 1000 * mb),
        32 * mb,
        "within the bytes"
    );
    assert_eq!(
        retain_budget(&config(32 * mb, Some(10)), 0),
        OPLOG_RETAIN_MIN_BYTES,
        "not below the floor"
    );
    assert_eq!(
        retain_budget(&config(16 * 1024, Some(10)), 0),
        16 * 1024,
        "nor above the bytes"
    );
    assert_eq!(retain_budget(&config(u64::MAX, Some(u32::MAX)), u64::MAX), u64::MAX);

    // 24 batches of 500 points of 256 dimensions: 12 MB of vectors, about
    // 0.5 MB of log a batch. A tenth of the vectors keeps the last two
    // batches or so; without the share the 32 MiB budget keeps them all.
    let dim = 256;
    let batch = |b: u64| {
        ShardOp::Upsert(
            (b * 500..(b + 1) * 500)
                .map(|id| Point {
                    id,
                    vector: vec![id as f32; dim],
                    payload: None,
                })
                .collect(),
        )
    };
    let cfg = |percent| ShardConfig {
        dim: dim as u32,
        ..config(OPLOG_RETAIN_BYTES, percent)
    };
    let builder = Arc::new(IndexBuilder::start());
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    for (dir, (percent, first_logged)) in dirs.iter().zip([(Some(10), 20..=23), (None, 1..=1)]) {
        let s = ShardReplica::open(dir.path(), cfg(percent), builder.clone()).unwrap();
        for b in 0..24 {
            let last = s.append(s.last_op(), vec![(id(1, b + 1), batch(b))]).unwrap();
            s.apply_through(last.lsn).unwrap();
        }
        let first = s.first_logged_lsn().unwrap();
        assert!(first_logged.contains(&first), "{percent:?}: log from {first}");
        assert_eq!(found(&s, &[0, 11_999]), vec![0, 11_999]);
    }
    // The full log, opened with the share (a node upgraded, or the setting
    // lowered), is trimmed at the open, before any write.
    let s = ShardReplica::open(dirs[1].path(), cfg(Some(10)), builder).unwrap();
    let first = s.first_logged_lsn().unwrap();
    assert!((20..=23).contains(&first), "log from {first} after the open");
    assert_eq!(found(&s, &[0, 11_999]), vec![0, 11_999]);
}

#[test]
fn replicas_fed_the_same_entries_reach_the_same_state() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let builder = Arc::new(IndexBuilder::start());
    let open = |dir: &Path| ShardReplica::open(dir, config(64, OPLOG_RETAIN_BYTES), builder.clone()).unwrap();
    let (a, b) = (open(da.path()), open(db.path()));
    let ops = vec![
        (id(1, 1), upsert(0..50)),
        (id(1, 2), upsert(40..100)),
        (id(1, 3), ShardOp::Delete(vec![3, 60, 1000])),
        (id(2, 4), ShardOp::EpochStart),
        (id(2, 5), upsert((0..80).rev())),
        (id(2, 6), upsert([7, 7, 200])),
    ];
    a.append(OpId::ZERO, ops.as_slice()).unwrap();
    for (i, e) in ops.iter().enumerate() {
        b.append(if i == 0 { OpId::ZERO } else { ops[i - 1].0 }, std::slice::from_ref(e))
            .unwrap();
    }
    // One batch on `a`, one op at a time on `b`; both count what the
    // delete removed (1000 never existed).
    assert_eq!(a.apply_through_counting(6).unwrap(), (6, vec![(3, 2)]));
    let mut counted = Vec::new();
    for lsn in 1..=6 {
        counted.extend(b.apply_through_counting(lsn).unwrap().1);
    }
    assert_eq!(counted, vec![(3, 2)]);
    assert_eq!(b.apply_through_counting(6).unwrap(), (6, vec![]));
    assert!(builder.wait_idle(Duration::from_secs(30)));
    // An exact search, so the comparison does not depend on how each
    // HNSW graph came out (builds run in the background, at times that
    // differ between the two), from a query no two points are equally
    // far from, so the top 30 has no tie at its end.
    let exact = SearchOptions { ef: 64, exact: true };
    let state = |s: &ShardReplica| {
        let all: Vec<u64> = (0..300).collect();
        (
            s.log_status(),
            s.info(),
            s.get(&all).unwrap(),
            s.search(&[20.3, 1.0], 30, exact, None).unwrap(),
        )
    };
    let sa = state(&a);
    assert_eq!(sa, state(&b));
    let sealed: Vec<(u64, u64)> = sa.1 .1.iter().map(|s| (s.id, s.rows)).collect();
    assert_eq!(
        sealed,
        vec![(1, 64), (2, 64), (3, 64), (4, 1)],
        "sealed at the same rows"
    );
    assert_eq!(a.entries_after(0, 100, usize::MAX).unwrap(), ops);
}

#[test]
fn seals_at_seal_rows_and_reopens_identically() {
    let dir = tempfile::tempdir().unwrap();
    let b = Arc::new(IndexBuilder::start());
    let s = ShardReplica::open(dir.path(), config(64, OPLOG_RETAIN_BYTES), b.clone()).unwrap();
    let write = |s: &ShardReplica, op| crate::testutil::write(s, op).unwrap();
    write(&s, upsert(0..63));
    let (_, segs) = s.info();
    assert_eq!(segs.len(), 1);
    assert_eq!((segs[0].state, segs[0].rows), (SegmentState::Growing, 63));
    write(&s, upsert([63]));
    let (_, segs) = s.info();
    assert_eq!(segs.len(), 2);
    assert_eq!((segs[0].id, segs[0].state, segs[0].rows), (1, SegmentState::Sealed, 64));
    assert_eq!((segs[1].id, segs[1].state, segs[1].rows), (2, SegmentState::Growing, 0));
    // Replace one row of the sealed segment, delete another, add one more.
    write(&s, upsert([5, 100]));
    write(&s, ShardOp::Delete(vec![6, 999]));
    assert!(b.wait_idle(Duration::from_secs(30)));
    assert!(s.indexes_ready());
    assert!(index_path(dir.path(), 1).exists());

    let before = (
        s.info(),
        s.get(&[5, 6, 100, 7]).unwrap(),
        s.search(&[5.0, 1.0], 3, Default::default(), None).unwrap(),
    );
    assert_eq!(before.0 .0.points, 64 - 1 + 1);
    assert_eq!(before.0 .1[0].deleted, 2);
    assert_eq!(before.2[0].id, 5);
    assert_eq!(before.2[0].segment, 2, "the replaced row lives in the growing segment");
    drop(s);

    let s = ShardReplica::open(dir.path(), config(64, OPLOG_RETAIN_BYTES), b.clone()).unwrap();
    let after = (
        s.info(),
        s.get(&[5, 6, 100, 7]).unwrap(),
        s.search(&[5.0, 1.0], 3, Default::default(), None).unwrap(),
    );
    assert_eq!(before, after);
    assert_eq!(after.0 .1[0].index, IndexState::Ready, "index loaded, not rebuilt");
    assert_eq!(b.pending(), 0);
    assert_eq!(after.1[0].as_ref().unwrap().payload.as_deref(), Some("{\"id\":5}"));
    assert_eq!(s.applied_lsn(), 4);
    assert_eq!(write(&s, upsert([1])), id(1, 5));
}

/// The op log's sizes table, as the store names it.
const SIZES: redb::TableDefinition<u64, u64> = redb::TableDefinition::new("oplog_sizes");

/// Changes a closed replica's shard file directly, in one transaction.
pub(super) fn edit_file(dir: &Path, f: impl FnOnce(&redb::WriteTransaction)) {
    let db = redb::Database::open(dir.join(STORE_FILE)).unwrap();
    let txn = db.begin_write().unwrap();
    f(&txn);
    txn.commit().unwrap();
}

#[test]
fn a_log_without_its_sizes_table_gets_it_back_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let entry_bytes = upsert([1]).encode(1).len() as u64;
    let s = open(dir.path(), 64, 3 * entry_bytes);
    s.append(OpId::ZERO, entries(1, 1..=5)).unwrap();
    drop(s);
    // As in a file written before the table existed.
    edit_file(dir.path(), |txn| assert!(txn.delete_table(SIZES).unwrap()));
    let s = open(dir.path(), 64, 3 * entry_bytes);
    assert_eq!((s.first_logged_lsn(), s.last_op()), (Some(1), id(1, 5)));
    // Applied by a process that did not append them: read from the log.
    s.apply_through(4).unwrap();
    assert_eq!(s.first_logged_lsn(), Some(3), "retention counts the rebuilt sizes");
    assert_eq!(found(&s, &[1, 2, 3, 4, 5]), vec![1, 2, 3, 4]);
    s.truncate_after(4).unwrap();
    assert_eq!(s.last_op(), id(1, 4));
    drop(s);
    let s = open(dir.path(), 64, 3 * entry_bytes);
    let logged: Vec<u64> = s
        .entries_after(2, 10, usize::MAX)
        .unwrap()
        .iter()
        .map(|e| e.0.lsn)
        .collect();
    assert_eq!((s.first_logged_lsn(), logged), (Some(3), vec![3, 4]));
    drop(s);

    // Sizes of other keys than the log's, as many (a version that did
    // not keep the table appended and trimmed meanwhile): rebuilt too.
    edit_file(dir.path(), |txn| {
        let mut sizes = txn.open_table(SIZES).unwrap();
        sizes.retain(|_, _| false).unwrap();
        sizes.insert(1, 1).unwrap();
        sizes.insert(2, 1).unwrap();
    });
    let s = open(dir.path(), 64, 3 * entry_bytes);
    assert_eq!(s.first_logged_lsn(), Some(3));
}

/// A file whose op log holds whole records (meta record `V2`, before the
/// log was kept in parts) opens with every op, moved into parts.
#[test]
fn a_log_of_whole_records_moves_into_parts_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), 100_000, u64::MAX);
    // Records of several parts and of one.
    let ops = vec![
        (id(1, 1), upsert(1..=12_000)),
        (id(1, 2), upsert([12_001])),
        (id(1, 3), upsert(12_002..=20_000)),
    ];
    assert!(ops[0].1.encode(1).len() > 2 * 64 * 1024);
    s.append(OpId::ZERO, ops).unwrap();
    s.apply_through(1).unwrap();
    let logged = |s: &ShardReplica| -> Vec<(OpId, Vec<u8>)> {
        let all = s.entries_after(0, 10, usize::MAX).unwrap();
        all.iter().map(|(at, op)| (*at, op.encode(at.term))).collect()
    };
    let before = logged(&s);
    assert_eq!(before.len(), 3);
    drop(s);
    crate::store::write_log_as_v2(&dir.path().join(STORE_FILE));
    let s = open(dir.path(), 100_000, u64::MAX);
    assert_eq!(logged(&s), before);
    assert_eq!(s.last_op(), id(1, 3));
    s.apply_through(3).unwrap();
    assert_eq!(found(&s, &[1, 12_000, 12_001, 20_000]), vec![1, 12_000, 12_001, 20_000]);
    drop(s);
    let s = open(dir.path(), 100_000, u64::MAX);
    assert_eq!(logged(&s), before);
}

/// A shard file whose record is of a variant this build does not know
/// (written by a newer version) is refused as such, naming the file, and
/// left as it was.
#[test]
fn a_file_of_a_newer_version_is_refused_and_untouched() {
    use redb::ReadableTable;
    const META: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("meta");
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), 64, u64::MAX);
    s.append(OpId::ZERO, entries(1, 1..=2)).unwrap();
    drop(s);
    let mut record = Vec::new();
    edit_file(dir.path(), |txn| {
        let mut meta = txn.open_table(META).unwrap();
        let mut raw = meta.get("shard").unwrap().unwrap().value().to_vec();
        raw[0] += 1;
        meta.insert("shard", raw.as_slice()).unwrap();
        record = raw;
    });
    let file = dir.path().join(STORE_FILE);
    assert_eq!(record[0], 4);
    match ShardReplica::open(dir.path(), config(64, u64::MAX), Arc::new(IndexBuilder::start())) {
        Err(EngineError::Layout { path, message }) => {
            assert_eq!(path, file);
            assert!(
                message.contains("newer edgevec") && message.contains("nothing was changed"),
                "{message}"
            );
        }
        Err(other) => panic!("not a layout error: {other}"),
        Ok(_) => panic!("a file of a newer version was opened"),
    }
    // Nothing was written: with its record as this build wrote it, the
    // file opens with what it held.
    edit_file(dir.path(), |txn| {
        let mut meta = txn.open_table(META).unwrap();
        let raw = meta.get("shard").unwrap().unwrap().value().to_vec();
        assert_eq!(raw, record, "the record changed");
        record[0] -= 1;
        meta.insert("shard", record.as_slice()).unwrap();
    });
    let s = open(dir.path(), 64, u64::MAX);
    assert_eq!((s.first_logged_lsn(), s.last_op()), (Some(1), id(1, 2)));
}

#[test]
fn the_held_floor_keeps_ops_within_the_hold_budget_only() {
    let dir = tempfile::tempdir().unwrap();
    let entry_bytes = upsert([1]).encode(1).len() as u64;
    // Retain one entry; hold up to four for an away replica.
    let mut cfg = config(64, entry_bytes);
    cfg.hold_bytes = 4 * entry_bytes;
    let s = ShardReplica::open(dir.path(), cfg, Arc::new(IndexBuilder::start())).unwrap();
    s.append(OpId::ZERO, entries(1, 1..=3)).unwrap();
    // A replica that holds everything through 1 went away.
    s.set_held_floor(1);
    s.apply_through(3).unwrap();
    assert_eq!(s.first_logged_lsn(), Some(2), "2 and 3 are held");
    s.append(id(1, 3), entries(1, 4..=6)).unwrap();
    s.apply_through(6).unwrap();
    assert_eq!(
        s.first_logged_lsn(),
        Some(3),
        "past the hold budget held ops go, oldest first"
    );
    // It came back: back to the retention budget, without a write.
    s.set_held_floor(u64::MAX);
    s.trim_log().unwrap();
    assert_eq!(s.first_logged_lsn(), Some(6));
    drop(s);
    let s = open(dir.path(), 64, entry_bytes);
    assert_eq!((s.first_logged_lsn(), s.last_op()), (Some(6), id(1, 6)));
}
