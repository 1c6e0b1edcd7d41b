use super::*;
use edgevec_proto::IndexSpec;

fn config() -> ShardConfig {
    ShardConfig {
        shard: 3,
        dim: 2,
        metric: Metric::L2,
        seal_rows: 2,
        index: IndexSpec {
            m: 4,
            ef_construction: 8,
        },
        retain_bytes: 0,
        retain_percent: None,
        hold_bytes: 0,
        fields: Vec::new(),
    }
}

fn at(segment: u64, row: u32) -> Location {
    Location { segment, row }
}

fn segment(state: SegmentState, rows: u32, sealed_lsn: u64) -> SegmentRecordV1 {
    SegmentRecordV1 {
        state,
        rows,
        sealed_lsn,
    }
}

/// A shard state as the store visits it: segment 1 sealed with 2 rows
/// (row 0 replaced), segment 2 growing with 1 row, a logged but unapplied
/// op of term 9 at LSN 6.
fn items() -> Vec<StateItem<'static>> {
    vec![
        StateItem::Meta {
            meta: ShardMetaV2 {
                shard: 3,
                dim: 2,
                applied_lsn: 5,
                growing: 2,
                term: 9,
                last_term: 9,
                last_lsn: 6,
                log_bytes: 123,
            },
            history: vec![(1, 1), (4, 3), (9, 6)],
            growing_rows: 1,
            sparse: false,
        },
        StateItem::Segment {
            id: 1,
            record: segment(SegmentState::Sealed, 2, 2),
        },
        StateItem::Segment {
            id: 2,
            record: segment(SegmentState::Growing, 0, 0),
        },
        StateItem::Row {
            at: at(1, 0),
            id: 10,
            vector: vec![1.0, 2.0],
        },
        StateItem::Row {
            at: at(1, 1),
            id: 11,
            vector: vec![3.0, 4.0],
        },
        StateItem::Row {
            at: at(2, 0),
            id: 10,
            vector: vec![5.0, 6.0],
        },
        StateItem::Payload {
            at: at(1, 1),
            json: "{\"a\":1}",
        },
        StateItem::Tombstone { at: at(1, 0), id: 10 },
        StateItem::Point { id: 10, at: at(2, 0) },
        StateItem::Point { id: 11, at: at(1, 1) },
    ]
}

fn export(path: &Path, items: Vec<StateItem<'_>>) -> ExportInfo {
    let mut out = Exporter::create(path, &config(), BTreeMap::new()).unwrap();
    let read = items.into_iter().try_for_each(|item| out.item(item));
    out.finish(read).unwrap()
}

fn read_all(path: &Path, config: &ShardConfig) -> Result<(ExportInfo, Vec<String>), EngineError> {
    let mut seen = Seen::default();
    let info = read(path, config, &mut seen)?;
    Ok((info, seen.0))
}

#[test]
fn items_round_trip_as_an_importer_state() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.export");
    let info = export(&path, items());
    assert_eq!(
        info,
        ExportInfo {
            last: OpId::new(4, 5),
            points: 2,
            bytes: std::fs::metadata(&path).unwrap().len(),
            reused_rows: 0,
        }
    );
    let (read_info, seen) = read_all(&path, &config()).unwrap();
    assert_eq!(read_info, info);
    // The importer's state: applied through the export's LSN, an empty
    // log ending there, the history cut at it, the durable term kept.
    let mut want = items();
    want[0] = StateItem::Meta {
        meta: ShardMetaV2 {
            shard: 3,
            dim: 2,
            applied_lsn: 5,
            growing: 2,
            term: 9,
            last_term: 4,
            last_lsn: 5,
            log_bytes: 0,
        },
        history: vec![(1, 1), (4, 3)],
        growing_rows: 1,
        sparse: false,
    };
    let want: Vec<String> = want.iter().map(|i| format!("{i:?}")).collect();
    assert_eq!(seen, want);
}

#[test]
fn every_damage_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.export");
    export(&path, items());
    let good = std::fs::read(&path).unwrap();
    let damaged = dir.path().join("damaged.export");
    let refuse = |bytes: &[u8], what: &str| {
        std::fs::write(&damaged, bytes).unwrap();
        match read_all(&damaged, &config()) {
            Err(EngineError::Corrupt { what: file, .. }) => {
                assert!(file.contains("damaged.export"), "{file}")
            }
            other => panic!("{what}: expected Corrupt, got {other:?}"),
        }
    };
    for i in 0..good.len() {
        let mut bytes = good.clone();
        bytes[i] ^= 0x01;
        refuse(&bytes, &format!("bit flipped at {i}"));
        refuse(&good[..i], &format!("truncated to {i}"));
    }
    refuse(&[good.as_slice(), b"x"].concat(), "trailing byte");

    // A huge length is refused before anything is allocated for it.
    let mut bytes = good.clone();
    bytes[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
    std::fs::write(&damaged, &bytes).unwrap();
    let err = read_all(&damaged, &config()).unwrap_err().to_string();
    assert!(err.contains("above the bound"), "{err}");
}

/// Writes `records` as they are, bypassing the conversion of items, as
/// an export that reuses nothing (format 3).
fn write_records(path: &Path, records: Vec<RecordV1>) {
    write_records_reusing(path, records, BTreeMap::new());
}

/// [`write_records`] by an exporter told to reuse `reuse` (format 4 when
/// there is any).
fn write_records_reusing(path: &Path, records: Vec<RecordV1>, reuse: BTreeMap<u64, SegmentDigest>) {
    write_records_as(path, records, reuse, false);
}

/// [`write_records_reusing`], as format 5 when `sparse`.
fn write_records_as(path: &Path, records: Vec<RecordV1>, reuse: BTreeMap<u64, SegmentDigest>, sparse: bool) {
    let mut out = Exporter::create(path, &config(), reuse).unwrap();
    out.start(sparse).unwrap();
    let read = records.into_iter().try_for_each(|r| out.record(r));
    out.finish(read).unwrap();
}

fn shard_record() -> ShardV1 {
    ShardV1 {
        shard: 3,
        dim: 2,
        metric: Metric::L2,
        seal_rows: 2,
        last_term: 4,
        last_lsn: 5,
        term: 9,
        history: vec![(1, 1), (4, 3)],
        growing: 2,
        growing_rows: 1,
    }
}

fn valid_records() -> Vec<RecordV1> {
    let seg = |id, state, rows| {
        RecordV1::Segment(SegmentV1 {
            id,
            state,
            rows,
            sealed_lsn: 0,
        })
    };
    let row = |segment, row, id| RecordV1::Row {
        segment,
        row,
        id,
        vector: vec![1.0, 2.0],
    };
    vec![
        RecordV1::Shard(shard_record()),
        seg(1, SegmentState::Sealed, 2),
        seg(2, SegmentState::Growing, 0),
        row(1, 0, 10),
        row(1, 1, 11),
        row(2, 0, 12),
        RecordV1::Tombstone {
            segment: 1,
            row: 0,
            id: 10,
        },
        RecordV1::Point {
            id: 11,
            segment: 1,
            row: 1,
        },
        RecordV1::Point {
            id: 12,
            segment: 2,
            row: 0,
        },
    ]
}

fn digest(segment: u64, rows: u32) -> SegmentDigest {
    SegmentDigest {
        segment,
        rows,
        sealed_lsn: 0,
        sha256: [0xab; 32],
    }
}

fn reused(segment: u64, rows: u32) -> RecordV1 {
    RecordV1::Reused {
        segment,
        rows,
        sha256: [0xab; 32],
    }
}

/// An exporter told that the importer holds sealed segment 1 writes a
/// `Reused` record instead of its rows and payloads, and leaves out its
/// index file; the reader hands the record to the importer and counts
/// its rows. Told nothing, the same state is written as format 3.
#[test]
fn rows_of_segments_the_importer_holds_are_left_out() {
    let dir = tempfile::tempdir().unwrap();
    let (whole, part) = (dir.path().join("whole.export"), dir.path().join("part.export"));
    export(&whole, items());
    let mut out = Exporter::create(&part, &config(), BTreeMap::from([(1, digest(1, 2))])).unwrap();
    let read = items().into_iter().try_for_each(|item| out.item(item));
    let index_dir = tempfile::tempdir().unwrap();
    std::fs::write(index_dir.path().join("1"), [7u8; 10]).unwrap();
    let read = read.and_then(|()| out.indexes(|segment| index_dir.path().join(segment.to_string())));
    let info = out.finish(read).unwrap();
    assert_eq!(info.reused_rows, 2);
    let version = |path: &Path| std::fs::read(path).unwrap()[8..12].to_vec();
    assert_eq!(version(&whole), 3u32.to_le_bytes());
    assert_eq!(version(&part), 4u32.to_le_bytes());

    let (read_info, seen) = read_all(&part, &config()).unwrap();
    assert_eq!(read_info, info);
    let (_, everything) = read_all(&whole, &config()).unwrap();
    let mut want: Vec<String> = everything
        .into_iter()
        .filter(|s| !(s.starts_with("Row") || s.starts_with("Payload")) || s.contains("segment: 2"))
        .collect();
    want.insert(3, "reuse 2 rows of 1 (ab)".into());
    assert_eq!(seen, want);
}

#[test]
fn inconsistent_records_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.export");
    write_records(&path, valid_records());
    assert_eq!(read_all(&path, &config()).unwrap().0.points, 2);

    let with = |edit: &dyn Fn(&mut Vec<RecordV1>)| {
        let mut records = valid_records();
        edit(&mut records);
        records
    };
    let shard = |edit: &dyn Fn(&mut ShardV1)| {
        with(&|r| {
            let mut s = shard_record();
            edit(&mut s);
            r[0] = RecordV1::Shard(s);
        })
    };
    let cases: Vec<(&str, Vec<RecordV1>)> = vec![
        ("the first record is not the shard", with(&|r| r.swap(0, 1))),
        ("second shard", with(&|r| r.push(RecordV1::Shard(shard_record())))),
        ("out of order", with(&|r| r.swap(5, 6))),
        ("do not ascend", with(&|r| r.swap(7, 8))),
        ("missing segment", with(&|r| r.insert(6, row_of(3, 0)))),
        ("after 2 rows", with(&|r| r.insert(5, row_of(1, 3)))),
        ("finite", with(&|r| r[3] = row_with(vec![f32::NAN, 1.0]))),
        ("finite", with(&|r| r[3] = row_with(vec![1.0]))),
        ("does not exist", with(&|r| r[8] = point(12, 2, 1))),
        (
            "expected Sealed with 3",
            with(&|r| {
                r[1] = RecordV1::Segment(SegmentV1 {
                    id: 1,
                    state: SegmentState::Sealed,
                    rows: 3,
                    sealed_lsn: 0,
                })
            }),
        ),
        ("not the highest", shard(&|s| s.growing = 1)),
        ("expected Growing with 2", shard(&|s| s.growing_rows = 2)),
        ("does not match term history", shard(&|s| s.last_term = 1)),
        ("is not ascending", shard(&|s| s.history = vec![(4, 3), (1, 1)])),
        ("is not ascending", shard(&|s| s.history.push((9, 6)))),
        ("below the last op", shard(&|s| s.term = 3)),
        ("no shard record", vec![]),
        (
            "has the id of a segment",
            with(&|r| r.push(merge(1, vec![1], vec![(1, 1, 11)]))),
        ),
        ("not a sealed segment", with(&|r| r.push(merge(3, vec![2], vec![])))),
        ("not a sealed segment", with(&|r| r.push(merge(3, vec![7], vec![])))),
        (
            "twice",
            with(&|r| r.push(merge(3, vec![1], vec![(1, 1, 11), (1, 1, 11)]))),
        ),
        (
            "outside what it covers",
            with(&|r| r.push(merge(3, vec![1], vec![(2, 0, 12)]))),
        ),
        ("missing", with(&|r| r.push(merge(3, vec![1], vec![(1, 2, 12)])))),
        ("out of order", with(&|r| r.insert(3, merge(3, vec![1], vec![])))),
        ("no sealed segment or merge", with(&|r| r.push(index_chunk(2, 0, 4)))),
        ("no sealed segment or merge", with(&|r| r.push(index_chunk(7, 0, 4)))),
        ("after 0 bytes", with(&|r| r.push(index_chunk(1, 4, 4)))),
        ("after 0 bytes", with(&|r| r.push(index_chunk(1, 0, 0)))),
        (
            "after 4 bytes",
            with(&|r| r.extend([index_chunk(1, 0, 4), index_chunk(1, 5, 4)])),
        ),
        (
            "do not ascend",
            with(&|r| {
                r.push(merge(3, vec![1], vec![]));
                r.extend([index_chunk(3, 0, 4), index_chunk(1, 0, 4)])
            }),
        ),
        ("out of order", with(&|r| r.insert(8, index_chunk(1, 0, 4)))),
    ];
    for (want, records) in cases {
        write_records(&path, records);
        match read_all(&path, &config()) {
            Err(EngineError::Corrupt { message, .. }) => assert!(message.contains(want), "{want}: {message}"),
            other => panic!("{want}: expected Corrupt, got {other:?}"),
        }
    }

    // `Reused` records, in files of format 4 (`valid_records` with the
    // rows of segment 1 reused is a valid one).
    let reusing = |edit: &dyn Fn(&mut Vec<RecordV1>)| {
        with(&|r| {
            r.splice(3..5, [reused(1, 2)]);
            edit(r)
        })
    };
    let v4 = || BTreeMap::from([(99, digest(99, 1))]);
    write_records_reusing(&path, reusing(&|_| {}), v4());
    assert_eq!(read_all(&path, &config()).unwrap().0.reused_rows, 2);
    let no_payload = |r: &mut Vec<RecordV1>| {
        r.insert(
            5,
            RecordV1::Payload {
                segment: 1,
                row: 1,
                json: "{}".into(),
            },
        )
    };
    let cases: Vec<(&str, Vec<RecordV1>)> = vec![
        ("sealed segment of that many rows", reusing(&|r| r[3] = reused(1, 3))),
        ("sealed segment of that many rows", reusing(&|r| r[3] = reused(2, 0))),
        ("sealed segment of that many rows", reusing(&|r| r[3] = reused(7, 2))),
        ("after 2 rows", reusing(&|r| r.insert(4, row_of(1, 1)))),
        ("do not ascend", with(&|r| r.insert(4, reused(1, 2)))),
        ("takes from its own copy", reusing(&no_payload)),
        ("takes from its own copy", reusing(&|r| r.push(index_chunk(1, 0, 4)))),
    ];
    for (want, records) in cases {
        write_records_reusing(&path, records, v4());
        match read_all(&path, &config()) {
            Err(EngineError::Corrupt { message, .. }) => assert!(message.contains(want), "{want}: {message}"),
            other => panic!("{want}: expected Corrupt, got {other:?}"),
        }
    }
    // Format 3 has no such records.
    write_records(&path, reusing(&|_| {}));
    match read_all(&path, &config()) {
        Err(EngineError::Corrupt { message, .. }) => assert!(message.contains("format 3"), "{message}"),
        other => panic!("a reused segment in format 3: {other:?}"),
    }
}

fn index_chunk(segment: u64, offset: u64, len: usize) -> RecordV1 {
    RecordV1::IndexChunk {
        segment,
        offset,
        bytes: vec![7; len],
    }
}

fn merge(id: u64, covers: Vec<u64>, rows: Vec<(u64, u32, u64)>) -> RecordV1 {
    RecordV1::Merge(MergeV1 {
        id,
        sources: covers.clone(),
        covers,
        lsn: 5,
        rows,
        installed: true,
    })
}

#[test]
fn merges_and_index_files_are_carried_and_version_1_files_still_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.export");
    let mut records = valid_records();
    records.push(merge(3, vec![1], vec![(1, 1, 11)]));
    write_records(&path, records);
    let (_, items) = read_all(&path, &config()).unwrap();
    assert!(items.iter().any(|i| i.contains("Merge { id: 3")), "{items:?}");

    // Index files of sealed segments and merges, in chunks (format 3).
    let mut records = valid_records();
    records.push(merge(3, vec![1], vec![(1, 1, 11)]));
    records.extend([index_chunk(1, 0, 4), index_chunk(1, 4, 2), index_chunk(3, 0, 3)]);
    write_records(&path, records);
    let (_, items) = read_all(&path, &config()).unwrap();
    let chunks: Vec<&String> = items.iter().filter(|i| i.starts_with("index")).collect();
    assert_eq!(
        chunks,
        [
            "index 1 at 0: 4 bytes",
            "index 1 at 4: 2 bytes",
            "index 3 at 0: 3 bytes"
        ]
    );

    // A version-1 file (no merges) is the same bytes but for the version
    // and the checksum.
    write_records(&path, valid_records());
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[8..12].copy_from_slice(&1u32.to_le_bytes());
    let n = bytes.len();
    let mut sum = crate::fsutil::Checksum::new();
    sum.update(&bytes[..n - 8]);
    bytes[n - 8..].copy_from_slice(&sum.finish().to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    assert_eq!(read_all(&path, &config()).unwrap().0.points, 2);
}

/// Format 5: a sealed segment covered by an installed merge may lack the
/// rows the merge dropped (reclaimed), and only such a segment, and only
/// from format 5; nothing may name a row that is not there.
#[test]
fn rows_a_merge_dropped_may_be_missing_from_format_5_on() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.export");
    // Row 0 of segment 1 (deleted, dropped by merge 3) is reclaimed, with
    // its tombstone.
    let reclaimed = |installed: bool| {
        let mut records = valid_records();
        records.retain(|r| {
            !matches!(
                r,
                RecordV1::Row { segment: 1, row: 0, .. } | RecordV1::Tombstone { segment: 1, row: 0, .. }
            )
        });
        let RecordV1::Merge(mut m) = merge(3, vec![1], vec![(1, 1, 11)]) else {
            unreachable!()
        };
        m.installed = installed;
        records.push(RecordV1::Merge(m));
        records
    };
    write_records_as(&path, reclaimed(true), BTreeMap::new(), true);
    assert_eq!(std::fs::read(&path).unwrap()[8..12], 5u32.to_le_bytes());
    let (info, items) = read_all(&path, &config()).unwrap();
    assert_eq!(info.points, 2);
    let rows: Vec<&String> = items.iter().filter(|i| i.starts_with("Row")).collect();
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert!(rows[0].contains("segment: 1, row: 1 }"), "{rows:?}");

    let refused = |records: Vec<RecordV1>, sparse: bool, why: &str| {
        write_records_as(&path, records, BTreeMap::new(), sparse);
        let e = read_all(&path, &config()).unwrap_err().to_string();
        assert!(e.contains(why), "{why}: {e}");
    };
    // Before format 5 every sealed segment has all its rows.
    refused(reclaimed(true), false, "has row 1 after 0 rows");
    // A merge not installed has dropped nothing yet.
    refused(
        reclaimed(false),
        true,
        "segment 1 is Sealed with 1 rows, expected Sealed with 2",
    );
    // No merge covers the segment.
    let mut records = reclaimed(true);
    records.pop();
    refused(records, true, "segment 1 is Sealed with 1 rows");
    // A tombstone of the reclaimed row.
    let mut records = reclaimed(true);
    records.insert(
        5,
        RecordV1::Tombstone {
            segment: 1,
            row: 0,
            id: 10,
        },
    );
    refused(records, true, "names a row that does not exist");
    // A merge naming the reclaimed row.
    let mut records = reclaimed(true);
    records.pop();
    records.push(merge(3, vec![1], vec![(1, 0, 10), (1, 1, 11)]));
    refused(records, true, "merge 3 names row 0 of segment 1");
    // A row past the segment's count.
    let mut records = reclaimed(true);
    records.insert(4, row_of(1, 2));
    refused(records, true, "has row 2 after 1 rows");
}

fn row_of(segment: u64, row: u32) -> RecordV1 {
    RecordV1::Row {
        segment,
        row,
        id: 99,
        vector: vec![0.0, 0.0],
    }
}

fn row_with(vector: Vec<f32>) -> RecordV1 {
    RecordV1::Row {
        segment: 1,
        row: 0,
        id: 10,
        vector,
    }
}

fn point(id: u64, segment: u64, row: u32) -> RecordV1 {
    RecordV1::Point { id, segment, row }
}
