//! Crash-safe file helpers.
//!
//! A file that a restart must trust (an index) is written whole to a
//! temporary name, fsynced, renamed over the final name and the directory
//! fsynced: after a crash the final name holds either the old file or the
//! complete new one, never a torn write. Directories created for new shards
//! are fsynced up to their parent so the entries survive a crash too.

use std::fs::{self, File};
use std::io::Write;
use std::path::Path;

use crate::error::EngineError;

/// Suffix of files being written; leftovers are removed at open.
pub const TMP_SUFFIX: &str = ".tmp";

/// Writes `bytes` to `path` atomically and durably.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), EngineError> {
    write_atomic_with(path, |f| f.write_all(bytes))
}

/// [`write_atomic`] of what `write` writes into the new file (streamed,
/// not held in memory; it may seek). An error of `write` is reported with
/// the temporary file's path, and the file is removed.
pub fn write_atomic_with(path: &Path, write: impl FnOnce(&mut File) -> std::io::Result<()>) -> Result<(), EngineError> {
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(TMP_SUFFIX);
    let tmp = Path::new(&tmp_name);
    let write = || -> std::io::Result<()> {
        let mut f = File::create(tmp)?;
        write(&mut f)?;
        f.sync_all()
    };
    if let Err(e) = write() {
        let _ = fs::remove_file(tmp);
        return Err(EngineError::io(tmp, e));
    }
    fs::rename(tmp, path).map_err(|e| EngineError::io(path, e))?;
    if let Some(dir) = path.parent() {
        sync_dir(dir)?;
    }
    Ok(())
}

/// Bytes a write probe writes: room for a few commits of the store.
pub const PROBE_BYTES: usize = 1024 * 1024;

/// Whether `dir` takes writes again: writes [`PROBE_BYTES`] to a
/// temporary file in it, fsyncs and removes it. The error names the file.
pub fn probe_write(dir: &Path) -> Result<(), EngineError> {
    let path = dir.join(format!(".write-probe{TMP_SUFFIX}"));
    let write = || -> std::io::Result<()> {
        let mut f = File::create(&path)?;
        f.write_all(&vec![0u8; PROBE_BYTES])?;
        f.sync_all()
    };
    let result = write();
    let _ = fs::remove_file(&path);
    result.map_err(|e| EngineError::io(&path, e))
}

/// Makes the entries of `dir` (files created, renamed or removed in it)
/// durable.
pub fn sync_dir(dir: &Path) -> Result<(), EngineError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| EngineError::io(dir, e))
}

/// Creates `dir` (and parents) and fsyncs it and its parent, so a file made
/// inside it next is reachable after a crash.
pub fn create_dir_durable(dir: &Path) -> Result<(), EngineError> {
    fs::create_dir_all(dir).map_err(|e| EngineError::io(dir, e))?;
    sync_dir(dir)?;
    if let Some(parent) = dir.parent() {
        sync_dir(parent)?;
    }
    Ok(())
}

/// FNV-1a over the bytes: cheap, dependency-free detection of a file that
/// was damaged after it was written (the rename already rules out tears).
pub fn checksum(bytes: &[u8]) -> u64 {
    let mut h = Checksum::new();
    h.update(bytes);
    h.finish()
}

/// [`checksum`] computed piece by piece, for files streamed rather than
/// held in memory (exports).
#[derive(Debug, Clone, Copy)]
pub struct Checksum(u64);

impl Checksum {
    pub fn new() -> Checksum {
        Checksum(0xcbf2_9ce4_8422_2325)
    }

    pub fn update(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    pub fn finish(&self) -> u64 {
        self.0
    }
}

impl Default for Checksum {
    fn default() -> Self {
        Checksum::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_tmp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.bin");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1);
        assert_ne!(checksum(b"one"), checksum(b"two"));
        let mut pieces = Checksum::new();
        pieces.update(b"tw");
        pieces.update(b"o");
        assert_eq!(pieces.finish(), checksum(b"two"));
    }
}
