//! The row table of a shard file: the point id and vector of every row,
//! packed into chunks of consecutive rows of one segment.
//!
//! Table `row_chunks`, key `(segment, chunk)`: rows of the chunk's range,
//! `chunk × chunk_rows(dim)` up to the next chunk's first row, at most
//! [`chunk_rows`] of them. Value, little endian, one of:
//! - tag `1` (u8), row count n (u32), the ids (u64 each), then the
//!   vectors (f32 each, row-major): the range's first n rows;
//! - tag `2`, row count n (u32), n places in the range (u16 each,
//!   ascending), the ids, the vectors: those rows only. Written once rows
//!   of the range were reclaimed ([`retain`]: a merge dropped them), or
//!   by an import of such a chunk.
//!
//! A chunk fills about 63 KiB, so redb stores it in a 64 KiB page with
//! little left over; one record per row left half of every 4 KiB leaf page
//! unused at 384 dimensions (measured: 1.34× the raw bytes, against 1.04×
//! for chunks). A chunk rewritten with fewer rows takes a smaller page.
//!
//! Invariants:
//! - the rows of the growing segment are appended in row order and never
//!   rewritten, so its chunks hold every row from 0 on ([`append`]
//!   refuses anything else);
//! - a sealed segment's rows never change; rows that no segment serves
//!   any more (a merge dropped them) may be removed, never added back, so
//!   a chunk of tag 2 only ever loses rows, and a chunk with no row left
//!   is deleted;
//! - shard files written before this layout hold one record per row in
//!   the `rows` table; [`migrate`] moves them into chunks when the file is
//!   opened, lowest rows first, so every reader sees chunks only.
//!   Versions that read only tag 1 refuse a file that may hold tag 2 by
//!   its shard record (`V4`), before reading any chunk.

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
const TAG_SPARSE: u8 = 2;
const HEAD: usize = 5;

/// Rows per chunk for vectors of `dim` (at most 5,375, so a place in the
/// chunk fits a u16).
pub fn chunk_rows(dim: usize) -> u32 {
    ((CHUNK_BYTES - HEAD) / (8 + 4 * dim)).max(1) as u32
}

/// The rows of one chunk.
#[derive(Debug, Default, Clone, PartialEq)]
pub(super) struct Chunk {
    pub ids: Vec<u64>,
    /// `ids.len() × dim` floats.
    pub vectors: Vec<f32>,
    /// Where in the chunk's range each row is, ascending; empty when the
    /// rows are the range's first `ids.len()` (tag 1).
    pub places: Vec<u16>,
}

impl Chunk {
    /// The place in the range of the `i`-th row held.
    fn place(&self, i: usize) -> u32 {
        if self.places.is_empty() {
            i as u32
        } else {
            self.places[i] as u32
        }
    }

    /// Which row held is at `place`, if any.
    fn find(&self, place: u32) -> Option<usize> {
        if self.places.is_empty() {
            return ((place as usize) < self.ids.len()).then_some(place as usize);
        }
        let p = u16::try_from(place).ok()?;
        self.places.binary_search(&p).ok()
    }

    /// The place after the last row held.
    fn end(&self) -> u32 {
        match self.ids.len() {
            0 => 0,
            n => self.place(n - 1) + 1,
        }
    }

    /// Adds a row at `place`, past every row held.
    fn push(&mut self, place: u32, id: u64, vector: &[f32]) {
        debug_assert!(place >= self.end());
        if !self.places.is_empty() || place != self.ids.len() as u32 {
            if self.places.is_empty() {
                self.places = (0..self.ids.len() as u16).collect();
            }
            self.places.push(place as u16);
        }
        self.ids.push(id);
        self.vectors.extend_from_slice(vector);
    }

    fn encode(&self) -> Vec<u8> {
        let n = self.ids.len();
        // Places that are just 0..n say nothing: tag 1.
        let sparse = self.places.iter().enumerate().any(|(i, &p)| p as usize != i);
        let mut out = Vec::with_capacity(HEAD + n * (2 + 8) + self.vectors.len() * 4);
        out.push(if sparse { TAG_SPARSE } else { TAG_V1 });
        out.extend_from_slice(&(n as u32).to_le_bytes());
        if sparse {
            for p in &self.places {
                out.extend_from_slice(&p.to_le_bytes());
            }
        }
        for id in &self.ids {
            out.extend_from_slice(&id.to_le_bytes());
        }
        for x in &self.vectors {
            out.extend_from_slice(&x.to_le_bytes());
        }
        out
    }

    fn decode(bytes: &[u8], dim: usize) -> Result<Chunk, String> {
        let tag = bytes.first().copied();
        if bytes.len() < HEAD || !matches!(tag, Some(TAG_V1 | TAG_SPARSE)) {
            return Err(format!(
                "row chunk of {} bytes with tag {tag:?} (this build reads tags {TAG_V1} and {TAG_SPARSE})",
                bytes.len(),
            ));
        }
        let n = u32::from_le_bytes(bytes[1..5].try_into().expect("4 bytes")) as usize;
        let per = chunk_rows(dim) as usize;
        let place_bytes = if tag == Some(TAG_SPARSE) { 2 * n } else { 0 };
        if n > per || bytes.len() != HEAD + place_bytes + n * (8 + 4 * dim) {
            return Err(format!("row chunk of {} bytes for {n} rows of dim {dim}", bytes.len()));
        }
        let (places, rest) = bytes[HEAD..].split_at(place_bytes);
        let places: Vec<u16> = places
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes(b.try_into().expect("2 bytes")))
            .collect();
        if tag == Some(TAG_SPARSE)
            && (n == 0 || !places.windows(2).all(|w| w[0] < w[1]) || places.last().is_some_and(|&p| p as usize >= per))
        {
            return Err(format!(
                "row chunk of {n} rows with places out of order or range: {places:?}"
            ));
        }
        let (ids, vectors) = rest.split_at(n * 8);
        Ok(Chunk {
            ids: ids
                .chunks_exact(8)
                .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
                .collect(),
            vectors: vectors
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
                .collect(),
            places,
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
    write_rows(table, path, dim, rows, false)
}

/// Writes `rows` (each segment's rows ascending, past the rows stored
/// already) into their chunks, leaving out the rows between them: an
/// import of chunks whose rows were reclaimed.
pub(super) fn put<'v>(
    table: &mut Table<(u64, u32), &[u8]>,
    path: &Path,
    dim: usize,
    rows: impl IntoIterator<Item = (Location, u64, &'v [f32])>,
) -> Result<(), EngineError> {
    write_rows(table, path, dim, rows, true)
}

fn write_rows<'v>(
    table: &mut Table<(u64, u32), &[u8]>,
    path: &Path,
    dim: usize,
    rows: impl IntoIterator<Item = (Location, u64, &'v [f32])>,
    gaps: bool,
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
        let place = at.row % per;
        let fits = if gaps {
            place >= chunk.end()
        } else {
            place == chunk.end()
        };
        if !fits {
            return Err(corrupt(
                path,
                format!(
                    "row {} of segment {} written after {} rows of its chunk (the last at place {})",
                    at.row,
                    at.segment,
                    chunk.ids.len(),
                    chunk.end() as i64 - 1,
                ),
            ));
        }
        chunk.push(place, id, vector);
    }
    if let Some((k, chunk)) = open {
        table.insert(k, chunk.encode().as_slice())?;
    }
    Ok(())
}

/// Rows kept of a segment: runs `(first row, rows)`, ascending and apart.
pub(super) type Runs = [(u32, u32)];

/// How many rows of `lo..hi` the runs `kept` hold.
pub(super) fn kept_within(kept: &Runs, lo: u32, hi: u32) -> u32 {
    let start = kept.partition_point(|&(first, len)| first + len <= lo);
    kept[start..]
        .iter()
        .take_while(|&&(first, _)| first < hi)
        .map(|&(first, len)| (first + len).min(hi) - first.max(lo))
        .sum()
}

/// Whether the runs `kept` hold `row`.
pub(super) fn keeps(kept: &Runs, row: u32) -> bool {
    kept_within(kept, row, row + 1) == 1
}

/// Removes the rows of `segment` (`rows` rows when sealed) outside the
/// runs `kept`: chunks that lose rows are rewritten with the rest (tag
/// 2), chunks left with none are deleted. A chunk whose rows are all kept
/// is not read. Returns the rows removed.
pub(super) fn retain(
    table: &mut Table<(u64, u32), &[u8]>,
    path: &Path,
    dim: usize,
    segment: u64,
    rows: u32,
    kept: &Runs,
) -> Result<u64, EngineError> {
    let per = chunk_rows(dim);
    let mut removed = 0;
    for chunk_no in 0..rows.div_ceil(per) {
        let first = chunk_no * per;
        let end = (first + per).min(rows);
        if kept_within(kept, first, end) == end - first {
            continue;
        }
        let key = (segment, chunk_no);
        let chunk = match table.get(key)? {
            Some(raw) => Chunk::decode(raw.value(), dim).map_err(|e| corrupt(path, e))?,
            None => continue,
        };
        let mut left = Chunk::default();
        for i in 0..chunk.ids.len() {
            let place = chunk.place(i);
            if keeps(kept, first + place) {
                left.push(place, chunk.ids[i], &chunk.vectors[i * dim..(i + 1) * dim]);
            }
        }
        removed += (chunk.ids.len() - left.ids.len()) as u64;
        if left.ids.is_empty() {
            table.remove(key)?;
        } else if left.ids.len() < chunk.ids.len() {
            table.insert(key, left.encode().as_slice())?;
        }
    }
    Ok(removed)
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
        match chunk.find(at.row % self.per) {
            Some(i) => Ok((chunk.ids[i], &chunk.vectors[i * self.dim..(i + 1) * self.dim])),
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
        for entry in entries {
            let (k, v) = entry?;
            let (segment, chunk_no) = k.value();
            let chunk = Chunk::decode(v.value(), self.dim).map_err(|e| corrupt(self.path, e))?;
            let first = chunk_no * self.per;
            // A chunk left with no row is deleted. (Whether a segment has
            // all its rows is checked against its record by the caller:
            // chunks of dropped rows may be gone.)
            if chunk.ids.is_empty() {
                return Err(corrupt(
                    self.path,
                    format!("segment {segment}: empty chunk of rows from {first}"),
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
                        row: first + chunk.place(i),
                    },
                    *id,
                    vector,
                )?;
            }
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
            places: Vec::new(),
        };
        assert_eq!(c.encode()[0], TAG_V1);
        assert_eq!(Chunk::decode(&c.encode(), 2).unwrap(), c);
        assert!(Chunk::decode(&c.encode(), 3).is_err());
        let mut bad = c.encode();
        bad[0] = 3;
        assert!(Chunk::decode(&bad, 2).unwrap_err().contains("tag"));
        // Rows at places 1 and 7: tag 2, read back as written.
        let sparse = Chunk {
            places: vec![1, 7],
            ..c.clone()
        };
        let bytes = sparse.encode();
        assert_eq!((bytes[0], bytes.len()), (TAG_SPARSE, HEAD + 2 * 2 + 2 * 8 + 4 * 4));
        assert_eq!(Chunk::decode(&bytes, 2).unwrap(), sparse);
        assert_eq!(
            (sparse.find(7), sparse.find(0), sparse.find(2), sparse.end()),
            (Some(1), None, None, 8)
        );
        // Places out of order, past the chunk, or none at all are refused.
        for places in [vec![7u16, 1], vec![1, chunk_rows(2) as u16]] {
            let bad = Chunk {
                places: places.clone(),
                ..c.clone()
            }
            .encode();
            assert!(Chunk::decode(&bad, 2).unwrap_err().contains("places"), "{places:?}");
        }
        let empty = Chunk {
            ids: vec![],
            vectors: vec![],
            places: vec![],
        };
        let mut bad = empty.encode();
        bad[0] = TAG_SPARSE;
        assert!(Chunk::decode(&bad, 2).is_err());
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

    #[test]
    fn retained_rows_read_back_and_import_with_their_gaps() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.redb");
        let db = Database::create(&path).unwrap();
        let dim = 384;
        let per = chunk_rows(dim);
        let a = rows_of(1, 3 * per + 5, dim);
        let b = rows_of(2, 9, dim);
        type Chunks<'t> = Table<'t, (u64, u32), &'static [u8]>;
        let write = |f: &mut dyn FnMut(&mut Chunks<'_>)| {
            let txn = db.begin_write().unwrap();
            f(&mut txn.open_table(ROW_CHUNKS).unwrap());
            txn.commit().unwrap();
        };
        let as_rows = |rows: &[(Location, u64, Vec<f32>)]| {
            rows.iter().map(|(at, id, v)| (*at, *id, v.clone())).collect::<Vec<_>>()
        };
        write(&mut |t| {
            let all = a.iter().chain(&b).map(|(at, id, v)| (*at, *id, v.as_slice()));
            append(t, &path, dim, all).unwrap();
        });
        // Keep the odd rows of the first chunk, none of the second, all of
        // the third, and the first row of the last.
        let keep = |row: u32| match row / per {
            0 => row % 2 == 1,
            1 => false,
            2 => true,
            _ => row == 3 * per,
        };
        let n = a.len() as u32;
        let mut keep_rows: Vec<(u32, u32)> = Vec::new();
        for r in (0..n).filter(|&r| keep(r)) {
            match keep_rows.last_mut() {
                Some((first, len)) if *first + *len == r => *len += 1,
                _ => keep_rows.push((r, 1)),
            }
        }
        assert_eq!(
            kept_within(&keep_rows, 0, n),
            (0..n).filter(|&r| keep(r)).count() as u32
        );
        assert_eq!(kept_within(&keep_rows, 2 * per, 3 * per), per);
        assert_eq!(kept_within(&keep_rows, per, 2 * per), 0);
        let mut removed = 0;
        write(&mut |t| removed = retain(t, &path, dim, 1, n, &keep_rows).unwrap());
        let kept: Vec<_> = as_rows(&a).into_iter().filter(|(at, _, _)| keep(at.row)).collect();
        assert_eq!(removed, (a.len() - kept.len()) as u64);
        // Again: nothing more to remove, nothing rewritten.
        write(&mut |t| assert_eq!(retain(t, &path, dim, 1, n, &keep_rows).unwrap(), 0));

        let read_all = |db: &Database| {
            let txn = db.begin_read().unwrap();
            let r = RowReader::new(txn.open_table(ROW_CHUNKS).unwrap(), &path, dim);
            let mut all = Vec::new();
            r.all(|at, id, v| {
                all.push((at, id, v.to_vec()));
                Ok(())
            })
            .unwrap();
            let chunks = txn.open_table(ROW_CHUNKS).unwrap().len().unwrap();
            (all, chunks)
        };
        let (all, chunks) = read_all(&db);
        assert_eq!(all, [kept.clone(), as_rows(&b)].concat());
        assert_eq!(chunks, 4, "the chunk left with no row is deleted");
        {
            let txn = db.begin_read().unwrap();
            let mut r = RowReader::new(txn.open_table(ROW_CHUNKS).unwrap(), &path, dim);
            for (at, id, v) in &a {
                match r.row(*at) {
                    Ok((got_id, got_v)) => {
                        assert!(keep(at.row));
                        assert_eq!((got_id, got_v), (*id, v.as_slice()));
                    }
                    Err(e) => {
                        assert!(!keep(at.row), "{e}");
                        assert!(e.to_string().contains("is missing"), "{e}");
                    }
                }
            }
        }
        // A segment that serves its own rows may not take a row past a gap.
        write(&mut |t| {
            let v = vec![0.0; dim];
            let e = append(t, &path, dim, [(Location { segment: 2, row: 11 }, 1, v.as_slice())]).unwrap_err();
            assert!(e.to_string().contains("written after 9 rows"), "{e}");
        });

        // An import writes the rows with their gaps, in batches that split
        // a chunk; a row below one already written is refused.
        let copy_path = dir.path().join("copy.redb");
        let copy = Database::create(&copy_path).unwrap();
        let rows = [kept.clone(), as_rows(&b)].concat();
        for part in [&rows[..7], &rows[7..]] {
            let txn = copy.begin_write().unwrap();
            {
                let mut t = txn.open_table(ROW_CHUNKS).unwrap();
                put(
                    &mut t,
                    &copy_path,
                    dim,
                    part.iter().map(|(at, id, v)| (*at, *id, v.as_slice())),
                )
                .unwrap();
            }
            txn.commit().unwrap();
        }
        let txn = copy.begin_write().unwrap();
        {
            let mut t = txn.open_table(ROW_CHUNKS).unwrap();
            let (at, id, v) = &kept[3];
            assert!(put(&mut t, &copy_path, dim, [(*at, *id, v.as_slice())]).is_err());
        }
        txn.abort().unwrap();
        let txn = copy.begin_read().unwrap();
        let r = RowReader::new(txn.open_table(ROW_CHUNKS).unwrap(), &copy_path, dim);
        let mut back = Vec::new();
        r.all(|at, id, v| {
            back.push((at, id, v.to_vec()));
            Ok(())
        })
        .unwrap();
        assert_eq!(back, rows);
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
