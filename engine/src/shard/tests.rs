use super::*;
use edgevec_proto::Point;
use std::time::Duration;

fn config(seal_rows: u32, retain_ops: u64) -> ShardConfig {
    ShardConfig {
        shard: 0,
        dim: 2,
        metric: Metric::L2,
        seal_rows,
        index: IndexParams {
            ef_construction: 32,
            ef_search: 16,
        },
        retain_ops,
    }
}

fn upsert(ids: impl IntoIterator<Item = u64>) -> ShardOp {
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

#[test]
fn lsns_must_be_contiguous() {
    let dir = tempfile::tempdir().unwrap();
    let b = Arc::new(IndexBuilder::start());
    let s = ShardReplica::open(dir.path(), config(64, 100), b).unwrap();
    assert_eq!(s.applied_lsn(), 0);
    match s.apply(2, &upsert([1])) {
        Err(EngineError::LsnOutOfOrder {
            expected: 1, got: 2, ..
        }) => {}
        other => panic!("expected LsnOutOfOrder, got {other:?}"),
    }
    assert_eq!(s.applied_lsn(), 0, "a rejected op changes nothing");
    s.apply(1, &upsert([1])).unwrap();
    assert!(s.apply(1, &upsert([2])).is_err(), "replayed LSN is rejected");
    assert_eq!(s.append(&ShardOp::Delete(vec![1])).unwrap(), 2);
    assert_eq!(s.get(&[1]).unwrap(), vec![None]);
    // A wrong-length vector cannot reach the segments.
    let bad = ShardOp::Upsert(vec![Point {
        id: 5,
        vector: vec![1.0],
        payload: None,
    }]);
    assert!(matches!(s.append(&bad), Err(EngineError::Invalid { .. })));
    assert_eq!(s.applied_lsn(), 2);
}

#[test]
fn op_log_is_trimmed_and_readable() {
    let dir = tempfile::tempdir().unwrap();
    let b = Arc::new(IndexBuilder::start());
    let s = ShardReplica::open(dir.path(), config(64, 3), b).unwrap();
    for id in 1..=5u64 {
        s.append(&upsert([id])).unwrap();
    }
    assert_eq!(s.first_logged_lsn().unwrap(), Some(3));
    let ops = s.ops_after(3, 10).unwrap();
    assert_eq!(ops, vec![(4, upsert([4])), (5, upsert([5]))]);
    assert_eq!(s.ops_after(0, 1).unwrap(), vec![(3, upsert([3]))]);
}

#[test]
fn seals_at_seal_rows_and_reopens_identically() {
    let dir = tempfile::tempdir().unwrap();
    let b = Arc::new(IndexBuilder::start());
    let s = ShardReplica::open(dir.path(), config(64, 100), b.clone()).unwrap();
    s.append(&upsert(0..63)).unwrap();
    let (_, segs) = s.info();
    assert_eq!(segs.len(), 1);
    assert_eq!((segs[0].state, segs[0].rows), (SegmentState::Growing, 63));
    s.append(&upsert([63])).unwrap();
    let (_, segs) = s.info();
    assert_eq!(segs.len(), 2);
    assert_eq!((segs[0].id, segs[0].state, segs[0].rows), (1, SegmentState::Sealed, 64));
    assert_eq!((segs[1].id, segs[1].state, segs[1].rows), (2, SegmentState::Growing, 0));
    // Replace one row of the sealed segment, delete another, add one more.
    s.append(&upsert([5, 100])).unwrap();
    s.append(&ShardOp::Delete(vec![6, 999])).unwrap();
    assert!(b.wait_idle(Duration::from_secs(30)));
    assert!(s.indexes_ready());
    assert!(index_path(dir.path(), 1).exists());

    let before = (s.info(), s.get(&[5, 6, 100, 7]).unwrap(), s.search(&[5.0, 1.0], 3));
    assert_eq!(before.0 .0.points, 64 - 1 + 1);
    assert_eq!(before.0 .1[0].deleted, 2);
    assert_eq!(before.2[0].id, 5);
    assert_eq!(before.2[0].segment, 2, "the replaced row lives in the growing segment");
    drop(s);

    let s = ShardReplica::open(dir.path(), config(64, 100), b.clone()).unwrap();
    let after = (s.info(), s.get(&[5, 6, 100, 7]).unwrap(), s.search(&[5.0, 1.0], 3));
    assert_eq!(before, after);
    assert_eq!(after.0 .1[0].index, IndexState::Ready, "index loaded, not rebuilt");
    assert_eq!(b.pending(), 0);
    assert_eq!(after.1[0].as_ref().unwrap().payload.as_deref(), Some("{\"id\":5}"));
    assert_eq!(s.applied_lsn(), 4);
    assert_eq!(s.append(&upsert([1])).unwrap(), 5);
}
