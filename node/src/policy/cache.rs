//! The compiled-artifact cache: a node compiles each plugin version once
//! and keeps the result on its own disk, so a restart loads its plugins
//! without compiling them again. Compiled artifacts never leave the node.
//!
//! Invariants:
//! - an artifact is named by the SHA-256 of the plugin's bytes and the
//!   engine's compatibility hash, so another wasmtime build or different
//!   settings never load it;
//! - it is written to a temporary file, fsynced and renamed, with the
//!   SHA-256 of its own bytes beside it; that hash is checked before the
//!   artifact is deserialized (which trusts its input), and any mismatch
//!   or error means a recompile, never a load.

use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wasmtime::component::Component;
use wasmtime::Engine;

/// Hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Where compiled plugins are kept.
#[derive(Debug, Clone)]
pub struct ArtifactCache {
    dir: PathBuf,
}

impl ArtifactCache {
    /// A cache in `dir` (created if missing).
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(ArtifactCache { dir: dir.to_path_buf() })
    }

    fn paths(&self, plugin_sha: &str, compat: u64) -> (PathBuf, PathBuf) {
        let stem = format!("{plugin_sha}-{compat:016x}");
        (
            self.dir.join(format!("{stem}.cwasm")),
            self.dir.join(format!("{stem}.sha256")),
        )
    }

    /// The cached compilation of the plugin whose bytes hash to
    /// `plugin_sha`, if one is there and intact.
    pub fn load(&self, engine: &Engine, plugin_sha: &str, compat: u64) -> Option<Component> {
        let (artifact, sum) = self.paths(plugin_sha, compat);
        let bytes = std::fs::read(&artifact).ok()?;
        let recorded = match std::fs::read_to_string(&sum) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(path = %sum.display(), error = %e, "compiled plugin has no checksum; recompiling");
                return None;
            }
        };
        if recorded.trim() != sha256_hex(&bytes) {
            tracing::warn!(
                path = %artifact.display(),
                "compiled plugin does not match its checksum (damaged or altered); recompiling"
            );
            return None;
        }
        // SAFETY: the bytes are the ones this node serialized with an engine
        // of the same compatibility hash: their checksum, written after
        // them, matches.
        match unsafe { Component::deserialize(engine, &bytes) } {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(path = %artifact.display(), error = %format!("{e:#}"), "compiled plugin not loadable; recompiling");
                None
            }
        }
    }

    /// Deletes artifacts of plugins whose hash `keep` does not name, older
    /// than `min_age`; returns the paths removed.
    pub fn remove_unused(
        &self,
        keep: &std::collections::HashSet<String>,
        min_age: std::time::Duration,
    ) -> Vec<PathBuf> {
        super::store::remove_unused(&self.dir, keep, min_age, |name| name.split_once('-').map(|(h, _)| h))
    }

    /// Keeps a serialized artifact (compiled from the bytes hashing to
    /// `plugin_sha`).
    pub fn store(&self, bytes: &[u8], plugin_sha: &str, compat: u64) -> std::io::Result<()> {
        let (artifact, sum) = self.paths(plugin_sha, compat);
        write_atomically(&artifact, bytes)?;
        write_atomically(&sum, sha256_hex(bytes).as_bytes())
    }
}

/// Writes `bytes` to a temporary file beside `path`, fsyncs it and
/// renames it over `path`, then fsyncs the directory.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}
