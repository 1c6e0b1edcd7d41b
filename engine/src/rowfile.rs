//! A file of the f32 rows of one sealed segment, addressable by row.
//!
//! The shard file keeps rows in chunks of about 63 KiB, which fill redb's
//! pages but cost a whole chunk to read one row. A search whose walk reads
//! vectors held in fewer bytes (8-bit integers) must read its candidates'
//! exact rows back for the scores it returns, a few tens a query
//! (BENCHMARKS.md, "Experiment: the walk over 8-bit vectors"): one `pread`
//! each here, served by the OS page cache, which the kernel may reclaim.
//!
//! Layout, little endian:
//! - header (one 4 KiB page): magic `EVROWS\0\0`, format version (u32,
//!   [`FORMAT`]), dim (u32), rows (u32), rows per checksum block (u32),
//!   then the CRC-32 of those 24 bytes (u32); the rest zero;
//! - body, from byte 4096: the rows, `dim` f32 each, row `r` at
//!   `4096 + r · dim · 4`;
//! - footer, right after the body: the CRC-32 of each block of the body
//!   ([`BLOCK_BYTES`] of rows at most, whole rows), then the CRC-32 of
//!   that list.
//!
//! Invariants:
//! - a row file is written whole to a temporary name, fsynced and renamed
//!   ([`fsutil::write_atomic_with`]): it exists complete or not at all;
//! - its rows never change; rows nothing holds any more may be released
//!   ([`RowFile::release`]): the blocks holding none of the rows still
//!   held lose their disk blocks (a hole reads as zeros), and are never
//!   checked or read again. Nothing else writes the file;
//! - [`RowFile::open`] refuses a file whose header is damaged, of another
//!   version, shape or length; [`RowFile::verify`] checks the blocks that
//!   hold a row still held, and a mismatch is reported with the file's
//!   path and the block, never repaired.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::EngineError;
use crate::fsutil;

/// Format version written and read.
pub const FORMAT: u32 = 1;
const MAGIC: &[u8; 8] = b"EVROWS\0\0";
/// Bytes before the body.
const HEADER_BYTES: u64 = 4096;
/// Bytes of rows a checksum covers, at most (one row at least).
pub const BLOCK_BYTES: usize = 64 * 1024;

fn row_bytes(dim: usize) -> u64 {
    dim as u64 * 4
}

/// Rows per checksum block for vectors of `dim`.
fn block_rows(dim: usize) -> u32 {
    (BLOCK_BYTES / (dim * 4)).max(1) as u32
}

/// The header's 28 significant bytes.
fn header(dim: u32, rows: u32, per_block: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_BYTES as usize);
    out.extend_from_slice(MAGIC);
    for v in [FORMAT, dim, rows, per_block] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out.resize(HEADER_BYTES as usize, 0);
    out
}

fn le_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("four bytes"))
}

/// The rows of one sealed segment on disk.
#[derive(Debug)]
pub struct RowFile {
    file: File,
    path: PathBuf,
    dim: usize,
    rows: u32,
    per_block: u32,
}

impl RowFile {
    /// Writes the rows of `vectors` (row-major, `dim` floats each) to
    /// `path`, atomically and durably, and opens the file.
    pub fn create(path: &Path, dim: usize, vectors: &[f32]) -> Result<RowFile, EngineError> {
        if dim == 0 || !vectors.len().is_multiple_of(dim) {
            return Err(EngineError::corrupt(
                path.display().to_string(),
                format!("{} floats are not rows of {dim}", vectors.len()),
            ));
        }
        let rows = u32::try_from(vectors.len() / dim)
            .map_err(|_| EngineError::corrupt(path.display().to_string(), "more rows than a row file holds"))?;
        let per_block = block_rows(dim);
        fsutil::write_atomic_with(path, |f| {
            let mut out = BufWriter::with_capacity(BLOCK_BYTES, f);
            out.write_all(&header(dim as u32, rows, per_block))?;
            let mut crcs = Vec::new();
            let mut bytes = Vec::with_capacity(per_block as usize * dim * 4);
            for block in vectors.chunks(per_block as usize * dim) {
                bytes.clear();
                bytes.extend(block.iter().flat_map(|x| x.to_le_bytes()));
                crcs.extend_from_slice(&crc32fast::hash(&bytes).to_le_bytes());
                out.write_all(&bytes)?;
            }
            let crc = crc32fast::hash(&crcs);
            out.write_all(&crcs)?;
            out.write_all(&crc.to_le_bytes())?;
            out.flush()
        })?;
        RowFile::open(path, dim, rows)
    }

    /// Opens the row file at `path`, which must hold `rows` rows of `dim`.
    /// Checks its header and length; the rows are checked by
    /// [`RowFile::verify`].
    pub fn open(path: &Path, dim: usize, rows: u32) -> Result<RowFile, EngineError> {
        let corrupt = |m: String| EngineError::corrupt(path.display().to_string(), m);
        let file = File::open(path).map_err(|e| EngineError::io(path, e))?;
        let mut head = [0u8; 28];
        file.read_exact_at(&mut head, 0)
            .map_err(|e| corrupt(format!("row file header unreadable: {e}")))?;
        if &head[..8] != MAGIC {
            return Err(corrupt("not a row file (bad magic)".into()));
        }
        if crc32fast::hash(&head[..24]) != le_u32(&head, 24) {
            return Err(corrupt("row file header checksum mismatch".into()));
        }
        let version = le_u32(&head, 8);
        if version != FORMAT {
            return Err(corrupt(format!("row file format {version}, this build reads {FORMAT}")));
        }
        let (file_dim, file_rows, per_block) = (le_u32(&head, 12), le_u32(&head, 16), le_u32(&head, 20));
        if file_dim as usize != dim || file_rows != rows {
            return Err(corrupt(format!(
                "row file holds {file_rows} rows of {file_dim}, expected {rows} of {dim}"
            )));
        }
        if per_block != block_rows(dim) {
            return Err(corrupt(format!(
                "row file blocks of {per_block} rows, expected {}",
                block_rows(dim)
            )));
        }
        let this = RowFile {
            file,
            path: path.to_path_buf(),
            dim,
            rows,
            per_block,
        };
        let len = this.file.metadata().map_err(|e| EngineError::io(path, e))?.len();
        let expected = this.footer_at() + this.blocks() as u64 * 4 + 4;
        if len != expected {
            return Err(corrupt(format!("row file is {len} bytes, expected {expected}")));
        }
        Ok(this)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn rows(&self) -> u32 {
        self.rows
    }

    fn blocks(&self) -> u32 {
        self.rows.div_ceil(self.per_block)
    }

    fn footer_at(&self) -> u64 {
        HEADER_BYTES + self.rows as u64 * row_bytes(self.dim)
    }

    /// Rows `first..end` of checksum block `block`.
    fn block_range(&self, block: u32) -> (u32, u32) {
        let first = block * self.per_block;
        (first, (first + self.per_block).min(self.rows))
    }

    fn corrupt(&self, message: String) -> EngineError {
        EngineError::corrupt(self.path.display().to_string(), message)
    }

    /// Checks the footer, and the checksum of every block that holds a
    /// row `held` accepts (released blocks are holes).
    pub fn verify(&self, held: impl Fn(u32) -> bool) -> Result<(), EngineError> {
        let mut footer = vec![0u8; self.blocks() as usize * 4 + 4];
        self.file
            .read_exact_at(&mut footer, self.footer_at())
            .map_err(|e| EngineError::io(&self.path, e))?;
        let (crcs, own) = footer.split_at(self.blocks() as usize * 4);
        if crc32fast::hash(crcs) != le_u32(own, 0) {
            return Err(self.corrupt("row file footer checksum mismatch".into()));
        }
        let mut bytes = Vec::new();
        for block in 0..self.blocks() {
            let (first, end) = self.block_range(block);
            if !(first..end).any(&held) {
                continue;
            }
            bytes.resize(((end - first) as u64 * row_bytes(self.dim)) as usize, 0);
            self.file
                .read_exact_at(&mut bytes, HEADER_BYTES + first as u64 * row_bytes(self.dim))
                .map_err(|e| EngineError::io(&self.path, e))?;
            if crc32fast::hash(&bytes) != le_u32(crcs, block as usize * 4) {
                return Err(self.corrupt(format!(
                    "row file block {block} (rows {first}..{end}) checksum mismatch"
                )));
            }
        }
        Ok(())
    }

    /// Reads rows `first..first + out.len() / dim` into `out`.
    pub fn read_rows(&self, first: u32, out: &mut [f32]) -> Result<(), EngineError> {
        let count = out.len() / self.dim;
        if !out.len().is_multiple_of(self.dim) || first as u64 + count as u64 > self.rows as u64 {
            return Err(self.corrupt(format!(
                "rows {first}..{} asked of a row file of {} rows",
                first as u64 + count as u64,
                self.rows
            )));
        }
        // SAFETY: any byte pattern is a valid f32, the slice covers exactly
        // the floats of `out`, and nothing else refers to them meanwhile.
        let bytes = unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr().cast::<u8>(), out.len() * 4) };
        self.file
            .read_exact_at(bytes, HEADER_BYTES + first as u64 * row_bytes(self.dim))
            .map_err(|e| EngineError::io(&self.path, e))?;
        if cfg!(target_endian = "big") {
            for x in out.iter_mut() {
                *x = f32::from_bits(u32::from_le(x.to_bits()));
            }
        }
        Ok(())
    }

    /// Gives back the disk blocks of the checksum blocks that hold no row
    /// `held` accepts (rows a merge dropped); returns the bytes of rows
    /// released. Where the file system cannot make holes, the file keeps
    /// its blocks and this returns 0.
    pub fn release(&self, held: impl Fn(u32) -> bool) -> Result<u64, EngineError> {
        // Reads go through a handle opened for reading only; holes need one
        // that may write.
        let mut writer = None;
        let mut released = 0;
        for block in 0..self.blocks() {
            let (first, end) = self.block_range(block);
            if (first..end).any(&held) {
                continue;
            }
            let (at, len) = (
                HEADER_BYTES + first as u64 * row_bytes(self.dim),
                (end - first) as u64 * row_bytes(self.dim),
            );
            let file = match &mut writer {
                Some(f) => f,
                None => writer.insert(
                    std::fs::OpenOptions::new()
                        .write(true)
                        .open(&self.path)
                        .map_err(|e| EngineError::io(&self.path, e))?,
                ),
            };
            if !punch_hole(file, at, len).map_err(|e| EngineError::io(&self.path, e))? {
                return Ok(0);
            }
            released += len;
        }
        if let Some(file) = writer {
            file.sync_all().map_err(|e| EngineError::io(&self.path, e))?;
        }
        Ok(released)
    }
}

/// Deallocates bytes `at..at + len` of `file`, which then read as zeros.
/// `Ok(false)` where holes are not supported.
fn punch_hole(file: &File, at: u64, len: u64) -> std::io::Result<bool> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: a plain syscall on a file descriptor this function
        // borrows; it touches no memory of the process.
        let r = unsafe {
            libc::fallocate(
                file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                at as libc::off_t,
                len as libc::off_t,
            )
        };
        if r == 0 {
            return Ok(true);
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
            return Ok(false);
        }
        Err(e)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (file, at, len);
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn rows(n: usize, dim: usize) -> Vec<f32> {
        (0..n * dim).map(|i| i as f32 * 0.5 - 7.0).collect()
    }

    fn corrupt_message(e: EngineError) -> String {
        match e {
            EngineError::Corrupt { what, message } => format!("{what}: {message}"),
            other => panic!("expected a corrupt-file error, got {other:?}"),
        }
    }

    #[test]
    fn rows_read_back_one_or_several_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rows-7.f32");
        for dim in [1, 3, 128, 384] {
            let n = 2 * block_rows(dim) as usize + 5;
            let v = rows(n, dim);
            let file = RowFile::create(&path, dim, &v).unwrap();
            assert_eq!(file.rows() as usize, n);
            file.verify(|_| true).unwrap();
            let mut one = vec![0f32; dim];
            for r in [0, 1, n / 2, n - 1] {
                file.read_rows(r as u32, &mut one).unwrap();
                assert_eq!(one, &v[r * dim..(r + 1) * dim], "row {r} of dim {dim}");
            }
            let mut all = vec![0f32; n * dim];
            RowFile::open(&path, dim, n as u32)
                .unwrap()
                .read_rows(0, &mut all)
                .unwrap();
            assert_eq!(all, v);
            assert!(file.read_rows(n as u32, &mut one).is_err(), "past the last row");
        }
    }

    #[test]
    fn a_damaged_or_foreign_file_is_refused_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rows-1.f32");
        let dim = 16;
        let n = 3 * block_rows(dim) as usize;
        RowFile::create(&path, dim, &rows(n, dim)).unwrap();
        let clean = std::fs::read(&path).unwrap();

        // Another shape than the shard's record says.
        let e = corrupt_message(RowFile::open(&path, dim, n as u32 + 1).unwrap_err());
        assert!(e.contains("rows-1.f32") && e.contains("expected"), "{e}");
        let e = corrupt_message(RowFile::open(&path, dim * 2, n as u32).unwrap_err());
        assert!(e.contains("expected"), "{e}");

        // A flipped bit in the middle block: found by verify, which names
        // the block; opening alone reads only the header.
        let mut bad = clean.clone();
        let at = HEADER_BYTES as usize + (block_rows(dim) as usize + 3) * dim * 4;
        bad[at] ^= 0x10;
        std::fs::write(&path, &bad).unwrap();
        let file = RowFile::open(&path, dim, n as u32).unwrap();
        let e = corrupt_message(file.verify(|_| true).unwrap_err());
        assert!(e.contains("rows-1.f32") && e.contains("block 1"), "{e}");
        // A block no row of which is held is not checked.
        let per = block_rows(dim);
        file.verify(|r| r / per != 1).unwrap();

        // Header: damaged, another version, cut short.
        let mut bad = clean.clone();
        bad[13] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        let e = corrupt_message(RowFile::open(&path, dim, n as u32).unwrap_err());
        assert!(e.contains("header checksum"), "{e}");
        let mut bad = clean.clone();
        bad[..28].copy_from_slice(&header(dim as u32, n as u32, per)[..28]);
        bad[8..12].copy_from_slice(&2u32.to_le_bytes());
        let crc = crc32fast::hash(&bad[..24]);
        bad[24..28].copy_from_slice(&crc.to_le_bytes());
        std::fs::write(&path, &bad).unwrap();
        let e = corrupt_message(RowFile::open(&path, dim, n as u32).unwrap_err());
        assert!(e.contains("format 2"), "{e}");
        std::fs::write(&path, &clean[..clean.len() - 1]).unwrap();
        let e = corrupt_message(RowFile::open(&path, dim, n as u32).unwrap_err());
        assert!(e.contains("bytes, expected"), "{e}");
        std::fs::write(&path, b"EVROWX").unwrap();
        assert!(RowFile::open(&path, dim, n as u32).is_err());

        // Missing: an I/O error with the path.
        std::fs::remove_file(&path).unwrap();
        let e = RowFile::open(&path, dim, n as u32).unwrap_err();
        assert!(e.to_string().contains("rows-1.f32"), "{e}");
    }

    #[test]
    fn released_blocks_give_their_disk_back_and_held_rows_stay() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rows-2.f32");
        let dim = 128;
        let per = block_rows(dim);
        let n = 8 * per as usize;
        let v = rows(n, dim);
        let file = RowFile::create(&path, dim, &v).unwrap();
        let before = std::fs::metadata(&path).unwrap().blocks();
        // Rows of blocks 2..6 dropped, and one row of block 6: that block
        // keeps its other rows.
        let held = |r: u32| !(2 * per..6 * per).contains(&r) && r != 6 * per;
        let released = file.release(held).unwrap();
        if released == 0 {
            // This file system makes no holes: nothing else to check.
            return;
        }
        assert_eq!(released, 4 * per as u64 * 512);
        let after = std::fs::metadata(&path).unwrap().blocks();
        assert!(
            (before - after) * 512 >= released,
            "{before} blocks of 512 bytes before, {after} after"
        );
        file.verify(held).unwrap();
        let mut row = vec![0f32; dim];
        for r in (0..n as u32).filter(|r| held(*r)) {
            file.read_rows(r, &mut row).unwrap();
            assert_eq!(row, &v[r as usize * dim..(r as usize + 1) * dim]);
        }
        // A released row reads as zeros, and its block no longer checks.
        file.read_rows(3 * per, &mut row).unwrap();
        assert!(row.iter().all(|x| *x == 0.0));
        assert!(file.verify(|_| true).is_err());
    }
}
