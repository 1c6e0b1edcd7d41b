//! The row table of a shard file: the point id and vector of every row,
//! packed into chunks of consecutive rows of one segment.
//!
//! Table `row_chunks`, key `(segment, chunk)`: the rows from `chunk ×
//! chunk_rows(dim)` on, at most [`chunk_rows`] of them. Value, version 1,
//! little endian: tag `1` (u8), row count (u32), the ids (u64 each), then
//! the vectors (f32 each, row-major). A chunk fills about 63 KiB, so redb
//! stores it in a 64 KiB page with little left over; one record per row
//! left half of every 4 KiB leaf page unused at 384 dimensions (measured:
//! 1.34× the raw bytes, against 1.04× for chunks).
//!
//! Invariants:
//! - a segment's rows are appended in row order and never rewritten, so
//!   every chunk but the last of a segment is full, and a chunk's rows are
//!   contiguous from its first row ([`append`] refuses anything else);
//! - shard files written before this layout hold one record per row in
//!   the `rows` table; [`migrate`] moves them into chunks when the file is
//!   opened, lowest rows first, so every reader sees chunks only.

use std::path::Path;

use redb::{Database, Durability, ReadableTable, Table, TableDefinition};

use super::{RowRecord, ROWS};
use crate::error::EngineError;
use crate::plan::Location;

pub(super) const ROW_CHUNKS: TableDefinition<(u64, u32), &[u8]> = TableDefinition::new("row_chunks");

/// Bytes a chunk's value may take: under redb's 64 KiB page with room for
/// the page's own header and key.
pub(super) const CHUNK_BYTES: usize = 63 * 1024;
const TAG_V1: u8 = 1;
const HEAD: usize = 5;

/// Rows per chunk for vectors of `dim`.
pub fn chunk_rows(dim: usize) -> u32 {
    ((CHUNK_BYTES - HEAD) / (8 + 4 * dim)).max(1) as u32
}

/// The rows of one chunk.
#[derive(Debug, Default, Clone, PartialEq)]
pub(super) struct Chunk {
    pub ids: Vec<u64>,
    /// `ids.len() × dim` floats.
    pub vectors: Vec<f32>,
}

impl Chunk {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEAD + self.ids.len() * 8 + self.vectors.len() * 4);
        out.push(TAG_V1);
        out.extend_from_slice(&(self.ids.len() as u32).to_le_bytes());
        for id in &self.ids {
            out.extend_from_slice(&id.to_le_bytes());
        }
        for x in &self.vectors {
            out.extend_from_slice(&x.to_le_bytes());
        }
        out
    }

    fn decode(bytes: &[u8], dim: usize) -> Result<Chunk, String> {
        if bytes.len() < HEAD || bytes[0] != TAG_V1 {
            return Err(format!(
                "row chunk of {} bytes with tag {:?} (this build reads tag {TAG_V1})",
                bytes.len(),
                bytes.first()
            ));
        }
        let n = u32::from_le_bytes(bytes[1..5].try_into().expect("4 bytes")) as usize;
        if bytes.len() != HEAD + n * (8 + 4 * dim) {
            return Err(format!("row chunk of {} bytes for {n} rows of dim {dim}", bytes.len()));
        }
        let (ids, vectors) = bytes[HEAD..].split_at(n * 8);
        Ok(Chunk {
            ids: ids
                .chunks_exact(8)
                .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
                .collect(),
            vectors: vectors
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
                .collect(),
        })
    }
}

fn corrupt(path: &Path, message: impl ToString) -> EngineError {
    EngineError::corrupt(path.display().to_string(), message)
}

/// Appends `rows` (in order: each segment's rows ascending and continuing
/// where the segment's stored rows end) to their chunks.
pub(super) fn append<'v>(
    table: &mut Table<(u64, u32), &[u8]>,
    path: &Path,
    dim: usize,
    rows: impl IntoIterator<Item = (Location, u64, &'v [f32])>,
) -> Result<(), EngineError> {
    let per = chunk_rows(dim);
    let mut open: Option<((u64, u32), Chunk)> = None;
    for (at, id, vector) in rows {
        if vector.len() != dim {
            return Err(corrupt(
                path,
                format!(
                    "row {} of segment {} has {} floats, dim is {dim}",
                    at.row,
                    at.segment,
                    vector.len()
                ),
            ));
        }
        let key = (at.segment, at.row / per);
        if open.as_ref().is_none_or(|(k, _)| *k != key) {
            if let Some((k, chunk)) = open.take() {
                table.insert(k, chunk.encode().as_slice())?;
            }
            let chunk = match table.get(key)? {
                Some(raw) => Chunk::decode(raw.value(), dim).map_err(|e| corrupt(path, e))?,
                None => Chunk::default(),
            };
            open = Some((key, chunk));
        }
        let (_, chunk) = open.as_mut().expect("opened above");
        if (at.row % per) as usize != chunk.ids.len() {
            return Err(corrupt(
                path,
                format!(
                    "row {} of segment {} appended after {} rows of its chunk",
                    at.row,
                    at.segment,
                    chunk.ids.len()
                ),
            ));
        }
        chunk.ids.push(id);
        chunk.vectors.extend_from_slice(vector);
    }
    if let Some((k, chunk)) = open {
        table.insert(k, chunk.encode().as_slice())?;
    }
    Ok(())
}

/// What [`RowReader`] hands each row to: its location, point id, vector.
type RowVisitor<'v> = dyn FnMut(Location, u64, &[f32]) -> Result<(), EngineError> + 'v;

/// Reads rows from a row table, keeping the last chunk read decoded (reads
/// in row order decode each chunk once).
pub(super) struct RowReader<'p, T> {
    table: T,
    path: &'p Path,
    dim: usize,
    per: u32,
    cached: Option<((u64, u32), Chunk)>,
}

impl<'p, T: ReadableTable<(u64, u32), &'static [u8]>> RowReader<'p, T> {
    pub fn new(table: T, path: &'p Path, dim: usize) -> Self {
        RowReader {
            table,
            path,
            dim,
            per: chunk_rows(dim),
            cached: None,
        }
    }

    fn missing(&self, at: Location) -> EngineError {
        corrupt(
            self.path,
            format!("row {} of segment {} is missing", at.row, at.segment),
        )
    }

    /// The point id and vector of the row at `at`.
    pub fn row(&mut self, at: Location) -> Result<(u64, &[f32]), EngineError> {
        let key = (at.segment, at.row / self.per);
        if self.cached.as_ref().is_none_or(|(k, _)| *k != key) {
            let raw = self.table.get(key)?.ok_or_else(|| self.missing(at))?;
            let chunk = Chunk::decode(raw.value(), self.dim).map_err(|e| corrupt(self.path, e))?;
            self.cached = Some((key, chunk));
        }
        let (_, chunk) = self.cached.as_ref().expect("cached above");
        let i = (at.row % self.per) as usize;
        match chunk.ids.get(i) {
            Some(&id) => Ok((id, &chunk.vectors[i * self.dim..(i + 1) * self.dim])),
            None => Err(self.missing(at)),
        }
    }

    /// Visits every row of `segment` in row order.
    pub fn segment(
        &self,
        segment: u64,
        mut visit: impl FnMut(u32, u64, &[f32]) -> Result<(), EngineError>,
    ) -> Result<(), EngineError> {
        let range = self.table.range((segment, 0)..=(segment, u32::MAX))?;
        self.visit_chunks(range, &mut |at, id, v| visit(at.row, id, v))
    }

    /// Visits every row of every segment, in (segment, row) order.
    pub fn all(
        &self,
        mut visit: impl FnMut(Location, u64, &[f32]) -> Result<(), EngineError>,
    ) -> Result<(), EngineError> {
        self.visit_chunks(self.table.iter()?, &mut visit)
    }

    /// Rows stored for `segment`.
    pub fn count(&self, segment: u64) -> Result<u32, EngineError> {
        let mut n = 0;
        self.segment(segment, |_, _, _| {
            n += 1;
            Ok(())
        })?;
        Ok(n)
    }

    fn visit_chunks<'a>(
        &self,
        entries: impl Iterator<
            Item = Result<
                (redb::AccessGuard<'a, (u64, u32)>, redb::AccessGuard<'a, &'static [u8]>),
                redb::StorageError,
            >,
        >,
        visit: &mut RowVisitor<'_>,
    ) -> Result<(), EngineError> {
        // (segment, first row of the next chunk, whether the last was full)
        let mut prev: Option<(u64, u32, bool)> = None;
        for entry in entries {
            let (k, v) = entry?;
            let (segment, chunk_no) = k.value();
            let chunk = Chunk::decode(v.value(), self.dim).map_err(|e| corrupt(self.path, e))?;
            let first = chunk_no * self.per;
            // A segment's chunks are contiguous and all but its last full.
            let fits = match prev {
                Some((s, next, full)) if s == segment => full && first == next,
                _ => first == 0,
            };
            if !fits || chunk.ids.is_empty() {
                return Err(corrupt(
                    self.path,
                    format!("segment {segment}: chunk of rows from {first} does not follow the rows stored before it"),
                ));
            }
            for (i, (id, vector)) in chunk
                .ids
                .iter()
                .zip(chunk.vectors.chunks_exact(self.dim.max(1)))
                .enumerate()
            {
                visit(
                    Location {
                        segment,
                        row: first + i as u32,
                    },
                    *id,
                    vector,
                )?;
            }
            let n = chunk.ids.len() as u32;
            prev = Some((segment, first + n, n == self.per));
        }
        Ok(())
    }
}

/// Rows [`migrate`] moves per transaction.
const MIGRATE_ROWS: usize = 65_536;

/// Moves the rows of a file written before chunks (one record per row in
/// `rows`) into chunks, `step` rows per durable transaction, lowest rows
/// first; a crash midway leaves rows of both kinds, and the next open goes
/// on from there. Returns the rows moved.
pub(super) fn migrate(db: &Database, path: &Path, dim: usize) -> Result<u64, EngineError> {
    migrate_in_steps(db, path, dim, MIGRATE_ROWS)
}

fn migrate_in_steps(db: &Database, path: &Path, dim: usize, step: usize) -> Result<u64, EngineError> {
    let mut moved = 0u64;
    loop {
        let mut txn = db.begin_write()?;
        txn.set_durability(Durability::Immediate)
            .map_err(|e| EngineError::Storage(e.into()))?;
        let done = {
            let mut legacy = txn.open_table(ROWS)?;
            let mut rows: Vec<(Location, u64, Vec<f32>)> = Vec::new();
            for entry in legacy.iter()?.take(step) {
                let (k, v) = entry?;
                let (segment, row) = k.value();
                let RowRecord::V1 { id, vector } = postcard::from_bytes(v.value()).map_err(|e| corrupt(path, e))?;
                rows.push((Location { segment, row }, id, vector));
            }
            if rows.is_empty() {
                true
            } else {
                let mut chunks = txn.open_table(ROW_CHUNKS)?;
                append(
                    &mut chunks,
                    path,
                    dim,
                    rows.iter().map(|(at, id, v)| (*at, *id, v.as_slice())),
                )?;
                let (first, last) = (rows[0].0, rows[rows.len() - 1].0);
                legacy.retain_in((first.segment, first.row)..=(last.segment, last.row), |_, _| false)?;
                moved += rows.len() as u64;
                false
            }
        };
        if done {
            txn.abort()?;
            return Ok(moved);
        }
        txn.commit()?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::{ReadableDatabase, ReadableTableMetadata};

    fn rows_of(segment: u64, n: u32, dim: usize) -> Vec<(Location, u64, Vec<f32>)> {
        (0..n)
            .map(|row| {
                let id = segment * 1000 + row as u64;
                (
                    Location { segment, row },
                    id,
                    (0..dim).map(|i| (id as f32) + i as f32 / 10.0).collect(),
                )
            })
            .collect()
    }

    #[test]
    fn chunk_sizes_fill_a_64_kib_page() {
        assert_eq!(chunk_rows(384), 41);
        assert_eq!(chunk_rows(128), 124);
        assert_eq!(chunk_rows(100_000), 1);
        for dim in [1, 3, 128, 384, 1536, 4096] {
            let bytes = HEAD + chunk_rows(dim) as usize * (8 + 4 * dim);
            assert!(bytes <= CHUNK_BYTES || chunk_rows(dim) == 1, "dim {dim}: {bytes}");
        }
        let c = Chunk {
            ids: vec![1, u64::MAX],
            vectors: vec![0.5, -1.0, f32::MAX, 3.25],
        };
        assert_eq!(Chunk::decode(&c.encode(), 2).unwrap(), c);
        assert!(Chunk::decode(&c.encode(), 3).is_err());
        let mut bad = c.encode();
        bad[0] = 2;
        assert!(Chunk::decode(&bad, 2).unwrap_err().contains("tag"));
    }

    #[test]
    fn appends_across_chunks_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.redb");
        let db = Database::create(&path).unwrap();
        let dim = 384;
        let a = rows_of(1, 100, dim);
        let b = rows_of(2, 7, dim);
        // Appended in three transactions: the second continues a chunk.
        for part in [&a[..30], &a[30..], &b[..]] {
            let txn = db.begin_write().unwrap();
            {
                let mut t = txn.open_table(ROW_CHUNKS).unwrap();
                append(
                    &mut t,
                    &path,
                    dim,
                    part.iter().map(|(at, id, v)| (*at, *id, v.as_slice())),
                )
                .unwrap();
            }
            txn.commit().unwrap();
        }
        let txn = db.begin_read().unwrap();
        let mut r = RowReader::new(txn.open_table(ROW_CHUNKS).unwrap(), &path, dim);
        for (at, id, v) in a.iter().chain(&b) {
            let (got_id, got_v) = r.row(*at).unwrap();
            assert_eq!((got_id, got_v), (*id, v.as_slice()));
        }
        assert!(r.row(Location { segment: 2, row: 7 }).is_err());
        assert!(r.row(Location { segment: 3, row: 0 }).is_err());
        assert_eq!(r.count(1).unwrap(), 100);
        assert_eq!(r.count(2).unwrap(), 7);
        let mut all = Vec::new();
        r.all(|at, id, v| {
            all.push((at, id, v.to_vec()));
            Ok(())
        })
        .unwrap();
        assert_eq!(all, [a.clone(), b.clone()].concat());
        drop(r);
        drop(txn);

        // A gap or a repeat is refused.
        let txn = db.begin_write().unwrap();
        let mut t = txn.open_table(ROW_CHUNKS).unwrap();
        for (row, msg) in [(9u32, "after 7 rows"), (3, "after 7 rows")] {
            let v = vec![0.0; dim];
            let e = append(&mut t, &path, dim, [(Location { segment: 2, row }, 1, v.as_slice())])
                .unwrap_err()
                .to_string();
            assert!(e.contains(msg), "{e}");
        }
        let e = append(
            &mut t,
            &path,
            dim,
            [(Location { segment: 2, row: 7 }, 1, [0.0; 3].as_slice())],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("3 floats"), "{e}");
    }

    /// Bytes on disk of 100,000 rows of 384 dimensions, one record per row
    /// against chunks (BENCHMARKS.md): `cargo test --release -p
    /// edgevec-engine row_table_bytes -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn row_table_bytes_on_disk() {
        use std::os::unix::fs::MetadataExt;
        let (n, dim) = (100_000u32, 384usize);
        let raw = n as f64 * (8 + 4 * dim) as f64;
        let dir = tempfile::tempdir().unwrap();
        for chunked in [false, true] {
            let path = dir.path().join(format!("{chunked}.redb"));
            let db = Database::create(&path).unwrap();
            let v = vec![0.5f32; dim];
            for batch in 0..n / 1000 {
                let mut txn = db.begin_write().unwrap();
                txn.set_durability(Durability::None).unwrap();
                {
                    let rows = (batch * 1000..(batch + 1) * 1000).map(|row| (Location { segment: 1, row }, row as u64));
                    if chunked {
                        let mut t = txn.open_table(ROW_CHUNKS).unwrap();
                        append(&mut t, &path, dim, rows.map(|(at, id)| (at, id, v.as_slice()))).unwrap();
                    } else {
                        let mut t = txn.open_table(ROWS).unwrap();
                        for (at, id) in rows {
                            let rec = postcard::to_stdvec(&RowRecord::V1 { id, vector: v.clone() }).unwrap();
                            t.insert((at.segment, at.row), rec.as_slice()).unwrap();
                        }
                    }
                }
                txn.commit().unwrap();
            }
            db.begin_write().unwrap().commit().unwrap();
            drop(db);
            let blocks = std::fs::metadata(&path).unwrap().blocks() as f64 * 512.0;
            println!(
                "{}: {:.1} MiB on disk for {:.1} MiB of ids and vectors: {:.2}×",
                if chunked { "chunks" } else { "one record per row" },
                blocks / 1048576.0,
                raw / 1048576.0,
                blocks / raw
            );
        }
    }

    #[test]
    fn rows_of_an_older_file_move_into_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.redb");
        let db = Database::create(&path).unwrap();
        let dim = 3;
        let all = [rows_of(1, 300, dim), rows_of(4, 5, dim)].concat();
        let txn = db.begin_write().unwrap();
        {
            let mut legacy = txn.open_table(ROWS).unwrap();
            for (at, id, v) in &all {
                let rec = postcard::to_stdvec(&RowRecord::V1 {
                    id: *id,
                    vector: v.clone(),
                })
                .unwrap();
                legacy.insert((at.segment, at.row), rec.as_slice()).unwrap();
            }
            txn.open_table(ROW_CHUNKS).unwrap();
        }
        txn.commit().unwrap();
        // In steps that end inside a chunk and inside a segment.
        assert_eq!(migrate_in_steps(&db, &path, dim, 77).unwrap(), 305);
        assert_eq!(migrate_in_steps(&db, &path, dim, 77).unwrap(), 0);
        let txn = db.begin_read().unwrap();
        assert_eq!(txn.open_table(ROWS).unwrap().len().unwrap(), 0);
        let r = RowReader::new(txn.open_table(ROW_CHUNKS).unwrap(), &path, dim);
        let mut back = Vec::new();
        r.all(|at, id, v| {
            back.push((at, id, v.to_vec()));
            Ok(())
        })
        .unwrap();
        assert_eq!(back, all);
    }
}
