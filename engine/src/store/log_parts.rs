//! The op log's records stored in parts that fit redb's pages.
//!
//! Table `oplog_parts`, key `(lsn, part)`: the encoded record of op `lsn`
//! ([`crate::op::OpRecord`]) cut into consecutive parts numbered from 0.
//! redb keeps a value larger than a page in a page of its own, rounded up
//! to a power of two: a write batch of 1,000 vectors of 384 dimensions
//! (1.5 MB encoded) took a 2 MiB page, so the op log's retention took a
//! third more disk than it counted. Each part but the last takes the
//! largest of [`FILLS`] that the rest of the record covers, so it fills a
//! page of 256, 128 or 64 KiB; the last, at most 63 KiB, wastes at most
//! that. A record of up to 63 KiB is one part.
//!
//! Invariants:
//! - a record's parts are written and removed in one transaction, so the
//!   table holds every part of a record or none;
//! - [`visit`] hands each record whole, in LSN order, and refuses, as
//!   corrupt, parts that do not follow each other from 0 (a record cut
//!   after a part fails to decode, and is refused as corrupt there);
//! - shard files of meta record `V2` keep whole records in table `oplog`;
//!   [`migrate`] moves them into parts when the file is opened (and the
//!   file's meta record becomes `V3`), before anything else reads the log.

use std::ops::RangeBounds;
use std::path::Path;

use redb::{ReadableTable, Table, TableDefinition, WriteTransaction};

use super::OPLOG;
use crate::error::EngineError;

pub(super) const OPLOG_PARTS: TableDefinition<(u64, u32), &[u8]> = TableDefinition::new("oplog_parts");

/// Sizes of the parts that fill a redb page of 256, 128 and 64 KiB, with
/// room for the page's own header and key (as a row chunk fills 64 KiB).
/// Fewer, larger parts cost fewer B-tree entries per record.
const FILLS: [usize; 3] = [255 * 1024, 127 * 1024, super::rows::CHUNK_BYTES];

/// Writes the record of op `lsn` in parts.
pub(super) fn insert(
    table: &mut Table<'_, (u64, u32), &'static [u8]>,
    lsn: u64,
    record: &[u8],
) -> Result<(), EngineError> {
    let (mut rest, mut part) = (record, 0u32);
    loop {
        let take = FILLS.into_iter().find(|&f| f <= rest.len()).unwrap_or(rest.len());
        let (this, tail) = rest.split_at(take);
        table.insert((lsn, part), this)?;
        if tail.is_empty() {
            return Ok(());
        }
        (rest, part) = (tail, part + 1);
    }
}

/// Removes the records of the ops in `lsns`.
pub(super) fn remove(
    table: &mut Table<'_, (u64, u32), &'static [u8]>,
    lsns: impl RangeBounds<u64>,
) -> Result<(), EngineError> {
    use std::ops::Bound;
    let start = match lsns.start_bound() {
        Bound::Included(&l) => Bound::Included((l, 0)),
        Bound::Excluded(&l) => Bound::Excluded((l, u32::MAX)),
        Bound::Unbounded => Bound::Unbounded,
    };
    let end = match lsns.end_bound() {
        Bound::Included(&l) => Bound::Included((l, u32::MAX)),
        Bound::Excluded(&l) => Bound::Excluded((l, 0)),
        Bound::Unbounded => Bound::Unbounded,
    };
    table.retain_in((start, end), |_, _| false)?;
    Ok(())
}

/// Hands `f` each record from op `from` on, whole and in LSN order, until
/// `f` returns false.
pub(super) fn visit(
    table: &impl ReadableTable<(u64, u32), &'static [u8]>,
    path: &Path,
    from: u64,
    mut f: impl FnMut(u64, &[u8]) -> Result<bool, EngineError>,
) -> Result<(), EngineError> {
    let mut record: Option<(u64, u32, Vec<u8>)> = None;
    for entry in table.range((from, 0)..)? {
        let (k, v) = entry?;
        let (lsn, part) = k.value();
        match &mut record {
            Some((at, last, bytes)) if *at == lsn => {
                if part != *last + 1 {
                    return Err(missing_part(path, lsn, *last + 1));
                }
                *last = part;
                bytes.extend_from_slice(v.value());
                continue;
            }
            _ => {}
        }
        if let Some((at, _, bytes)) = record.take() {
            if !f(at, &bytes)? {
                return Ok(());
            }
        }
        if part != 0 {
            return Err(missing_part(path, lsn, 0));
        }
        record = Some((lsn, 0, v.value().to_vec()));
    }
    if let Some((at, _, bytes)) = record {
        f(at, &bytes)?;
    }
    Ok(())
}

fn missing_part(path: &Path, lsn: u64, part: u32) -> EngineError {
    EngineError::corrupt(
        path.display().to_string(),
        format!("op log record {lsn} misses its part {part}"),
    )
}

/// Moves the whole records of table `oplog` (a file of meta record `V2`)
/// into parts. Returns how many were moved; the caller writes the meta
/// record as `V3` in the same transaction.
pub(super) fn migrate(txn: &WriteTransaction) -> Result<u64, EngineError> {
    let mut whole = txn.open_table(OPLOG)?;
    let mut parts = txn.open_table(OPLOG_PARTS)?;
    let mut moved = 0;
    for entry in whole.iter()? {
        let (k, v) = entry?;
        insert(&mut parts, k.value(), v.value())?;
        moved += 1;
    }
    whole.retain(|_, _| false)?;
    Ok(moved)
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::{Database, ReadableDatabase, ReadableTableMetadata};

    fn records() -> Vec<(u64, Vec<u8>)> {
        // Empty, small, exactly a part, a part and a byte, one part of
        // each size and a byte.
        let [big, mid, small] = FILLS;
        [0, 17, small, small + 1, big + mid + small + 5]
            .iter()
            .enumerate()
            .map(|(i, &n)| (i as u64 + 5, (0..n).map(|b| (b % 251) as u8 ^ i as u8).collect()))
            .collect()
    }

    /// A new file at `path` whose table `table` holds `all`, written by
    /// `put` in one transaction.
    fn file_with<K: redb::Key + 'static>(
        path: &Path,
        table: TableDefinition<K, &'static [u8]>,
        all: &[(u64, Vec<u8>)],
        mut put: impl FnMut(&mut Table<'_, K, &'static [u8]>, u64, &[u8]),
    ) -> Database {
        let db = Database::create(path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut t = txn.open_table(table).unwrap();
            for (lsn, r) in all {
                put(&mut t, *lsn, r);
            }
        }
        txn.commit().unwrap();
        db
    }

    fn read_all(db: &Database, path: &Path, from: u64) -> Result<Vec<(u64, Vec<u8>)>, EngineError> {
        let txn = db.begin_read()?;
        let table = txn.open_table(OPLOG_PARTS)?;
        let mut out = Vec::new();
        visit(&table, path, from, |lsn, bytes| {
            out.push((lsn, bytes.to_vec()));
            Ok(true)
        })?;
        Ok(out)
    }

    #[test]
    fn records_of_every_size_read_back_whole_and_are_removed_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.redb");
        let all = records();
        let db = file_with(&path, OPLOG_PARTS, &all, |t, lsn, r| insert(t, lsn, r).unwrap());
        let txn = db.begin_read().unwrap();
        assert_eq!(txn.open_table(OPLOG_PARTS).unwrap().len().unwrap(), 1 + 1 + 1 + 2 + 4);
        drop(txn);
        assert_eq!(read_all(&db, &path, 0).unwrap(), all);
        assert_eq!(read_all(&db, &path, 8).unwrap(), all[3..]);

        // A visit that stops early hands nothing more.
        let txn = db.begin_read().unwrap();
        let mut seen = Vec::new();
        visit(&txn.open_table(OPLOG_PARTS).unwrap(), &path, 0, |lsn, _| {
            seen.push(lsn);
            Ok(lsn < 6)
        })
        .unwrap();
        assert_eq!(seen, [5, 6]);
        drop(txn);

        let txn = db.begin_write().unwrap();
        {
            let mut t = txn.open_table(OPLOG_PARTS).unwrap();
            remove(&mut t, ..=5).unwrap();
            remove(&mut t, 9..).unwrap();
        }
        txn.commit().unwrap();
        assert_eq!(read_all(&db, &path, 0).unwrap(), all[1..4]);

        // A record missing a part is refused, naming the file and the op.
        let txn = db.begin_write().unwrap();
        txn.open_table(OPLOG_PARTS).unwrap().remove((8, 0)).unwrap();
        txn.commit().unwrap();
        let Err(err) = read_all(&db, &path, 0) else {
            panic!("a record without its first part was read");
        };
        let err = err.to_string();
        assert!(
            err.contains("t.redb") && err.contains("record 8 misses its part 0"),
            "{err}"
        );
    }

    #[test]
    fn whole_records_of_an_older_file_move_into_parts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.redb");
        let all = records();
        let db = file_with(&path, OPLOG, &all, |t, lsn, r| {
            t.insert(lsn, r).unwrap();
        });
        let txn = db.begin_write().unwrap();
        assert_eq!(migrate(&txn).unwrap(), all.len() as u64);
        txn.commit().unwrap();
        assert_eq!(read_all(&db, &path, 0).unwrap(), all);
        let txn = db.begin_read().unwrap();
        assert_eq!(txn.open_table(OPLOG).unwrap().len().unwrap(), 0);
    }
}
