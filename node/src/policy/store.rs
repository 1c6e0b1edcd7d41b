//! The content-addressed store of plugin bytes (`<data_dir>/plugins/blobs`):
//! one file per SHA-256, written to a temporary file, fsynced and renamed.
//!
//! Invariants:
//! - a file's name is the hex SHA-256 of its contents: bytes are checked
//!   before they are written and again when they are read;
//! - a file whose contents do not match its name is reported with its
//!   path, moved aside (`.damaged`) and never served; the bytes are
//!   fetched again from a node that holds them.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::cache::sha256_hex;

/// Why the store refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("plugin bytes hash to {actual}, not {expected}")]
    HashMismatch { expected: String, actual: String },
    #[error("plugin bytes are {0} bytes, above the {limit} byte limit", limit = super::MAX_PLUGIN_BYTES)]
    TooLarge(usize),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

/// Plugin bytes by SHA-256.
#[derive(Debug, Clone)]
pub struct BlobStore {
    dir: PathBuf,
}

/// Hex form of a SHA-256.
pub fn hex(sha: &[u8; 32]) -> String {
    sha.iter().map(|b| format!("{b:02x}")).collect()
}

impl BlobStore {
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        Ok(BlobStore { dir: dir.to_path_buf() })
    }

    fn path(&self, sha: &[u8; 32]) -> PathBuf {
        self.dir.join(format!("{}.wasm", hex(sha)))
    }

    /// Keeps `bytes`, which must hash to `sha`.
    pub fn put(&self, sha: &[u8; 32], bytes: &[u8]) -> Result<(), StoreError> {
        if bytes.len() > super::MAX_PLUGIN_BYTES {
            return Err(StoreError::TooLarge(bytes.len()));
        }
        let actual = sha256_hex(bytes);
        if actual != hex(sha) {
            return Err(StoreError::HashMismatch {
                expected: hex(sha),
                actual,
            });
        }
        let path = self.path(sha);
        if self.get(sha).is_some() {
            return Ok(());
        }
        let io = |source| StoreError::Io {
            path: path.clone(),
            source,
        };
        let tmp = path.with_extension("tmp");
        {
            let mut f = std::fs::File::create(&tmp).map_err(io)?;
            f.write_all(bytes).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        std::fs::rename(&tmp, &path).map_err(io)?;
        std::fs::File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io)?;
        Ok(())
    }

    /// Deletes stored bytes whose hash `keep` does not name and that are
    /// older than `min_age` (bytes pushed for a deploy that has not
    /// committed yet are younger); returns the paths removed.
    pub fn remove_unused(
        &self,
        keep: &std::collections::HashSet<String>,
        min_age: std::time::Duration,
    ) -> Vec<PathBuf> {
        remove_unused(&self.dir, keep, min_age, |name| name.strip_suffix(".wasm"))
    }

    /// The bytes hashing to `sha`, if held and intact.
    pub fn get(&self, sha: &[u8; 32]) -> Option<Vec<u8>> {
        let path = self.path(sha);
        let bytes = std::fs::read(&path).ok()?;
        if sha256_hex(&bytes) == hex(sha) {
            return Some(bytes);
        }
        let aside = path.with_extension("damaged");
        tracing::error!(
            path = %path.display(),
            moved_to = %aside.display(),
            "stored plugin bytes do not match their hash; set aside, fetching them again"
        );
        let _ = std::fs::rename(&path, &aside);
        None
    }
}

/// Deletes the files of `dir` whose hash (from their name, by `hash_of`)
/// `keep` does not name and that were last written more than `min_age`
/// ago; returns the paths removed.
pub(crate) fn remove_unused(
    dir: &Path,
    keep: &std::collections::HashSet<String>,
    min_age: std::time::Duration,
    hash_of: impl Fn(&str) -> Option<&str>,
) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(hash) = hash_of(&name) else { continue };
        if keep.contains(hash) {
            continue;
        }
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > min_age);
        if old && std::fs::remove_file(entry.path()).is_ok() {
            removed.push(entry.path());
        }
    }
    removed
}
