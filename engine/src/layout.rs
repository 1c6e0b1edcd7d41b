//! The engine's data directory: which layout it holds, where each replica
//! lives, and where leftovers go.
//!
//! ```text
//! LAYOUT                       "edgevec-engine layout 2\n"
//! replicas.redb                the registry (crate::registry)
//! replicas/<collection>-<shard>/
//! replicas/<collection>-<shard>.import.tmp/   an import being written
//! replicas/<collection>-<shard>.import/       a complete import, to swap in
//! trash/<name>-<unix seconds>  leftovers moved aside, for a person to delete
//! damaged/<name>-<unix seconds>  replicas that failed to open, kept as found
//! ```
//!
//! Rules:
//! - `LAYOUT` is written (durably) before anything else in a new directory,
//!   so a directory with our files and no `LAYOUT` was not made by this
//!   version: the single-node layout 1 (`catalog.redb`, `collections/`) or
//!   something damaged. Such a directory is refused, never changed;
//! - replica directories without the registry that says which of them are
//!   live are refused too: the engine cannot tell live data from leftovers;
//! - nothing here deletes: a replica directory the registry does not name
//!   is moved to `trash/`, one whose files cannot be opened to `damaged/`;
//! - an import is written to `.import.tmp`, fsynced, then renamed to
//!   `.import`: only a complete import ever carries that name, so it can be
//!   swapped in ([`install_import`]) after a crash; a `.import.tmp` is never
//!   trusted.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::engine::ReplicaKey;
use crate::error::EngineError;
use crate::fsutil;

pub const LAYOUT_FILE: &str = "LAYOUT";
pub const LAYOUT_TEXT: &str = "edgevec-engine layout 2\n";
pub const REGISTRY_FILE: &str = "replicas.redb";
pub const REPLICAS_DIR: &str = "replicas";
pub const TRASH_DIR: &str = "trash";
pub const DAMAGED_DIR: &str = "damaged";

/// Names that only the single-node layout 1 used.
const LAYOUT_1_NAMES: [&str; 2] = ["catalog.redb", "collections"];

fn refuse(path: &Path, message: impl Into<String>) -> EngineError {
    EngineError::Layout {
        path: path.to_owned(),
        message: message.into(),
    }
}

/// Makes sure `dir` holds layout 2: creates it (with its `LAYOUT`) when it
/// is new, and refuses any other layout without changing anything.
pub fn prepare(dir: &Path) -> Result<(), EngineError> {
    fsutil::create_dir_durable(dir)?;
    let marker = dir.join(LAYOUT_FILE);
    match std::fs::read(&marker) {
        Ok(text) if text == LAYOUT_TEXT.as_bytes() => return Ok(()),
        Ok(text) => {
            return Err(refuse(
                dir,
                format!(
                    "{} says {:?}, but this edgevec reads only {:?}; open it with the edgevec version that \
                     wrote it. Nothing was changed",
                    marker.display(),
                    String::from_utf8_lossy(&text),
                    LAYOUT_TEXT
                ),
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(EngineError::io(marker, e)),
    }
    if LAYOUT_1_NAMES.iter().any(|n| dir.join(n).exists()) {
        return Err(refuse(
            dir,
            "it holds data of the single-node format (layout 1: catalog.redb, collections/), which is not \
             migrated automatically; nothing was deleted. Move the directory away to start this node fresh \
             (its replicas are then copied from the other nodes), or keep running the version that wrote it",
        ));
    }
    if dir.join(REGISTRY_FILE).exists() || dir.join(REPLICAS_DIR).exists() {
        return Err(refuse(
            dir,
            format!(
                "it holds replica files but no {LAYOUT_FILE} file, so its layout is unknown; nothing was \
                 changed. Restore {LAYOUT_FILE} (content {LAYOUT_TEXT:?}) if this directory is known to be \
                 layout 2, or move the directory away"
            ),
        ));
    }
    fsutil::write_atomic(&marker, LAYOUT_TEXT.as_bytes())
}

/// Refuses to go on when `replicas/` holds replica directories but the
/// registry file is missing or empty: opening would create an empty
/// registry and treat every replica as a leftover.
pub fn check_registry(dir: &Path) -> Result<(), EngineError> {
    let registry = dir.join(REGISTRY_FILE);
    let present = match std::fs::metadata(&registry) {
        Ok(m) => m.len() > 0,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(EngineError::io(registry, e)),
    };
    let replicas = replica_dirs(dir)?;
    if present || replicas.is_empty() {
        return Ok(());
    }
    Err(refuse(
        &registry,
        format!(
            "the file is missing or empty, but {} holds {} replica directories; without the registry they \
             cannot be told from leftovers. Nothing was deleted: restore the file, or move the data \
             directory away to start fresh",
            dir.join(REPLICAS_DIR).display(),
            replicas.len()
        ),
    ))
}

/// The directory of replica `key`.
pub fn replica_dir(dir: &Path, key: ReplicaKey) -> PathBuf {
    dir.join(REPLICAS_DIR).join(dir_name(key))
}

/// How far an import directory got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ImportStage {
    /// Being written: never trusted.
    Staging,
    /// Complete and fsynced: ready to replace the replica's directory.
    Ready,
}

impl ImportStage {
    fn suffix(self) -> &'static str {
        match self {
            ImportStage::Staging => ".import.tmp",
            ImportStage::Ready => ".import",
        }
    }
}

/// The directory of an import of replica `key` at `stage`, beside the
/// replicas (same file system, so renames are atomic).
pub fn import_dir(dir: &Path, key: ReplicaKey, stage: ImportStage) -> PathBuf {
    dir.join(REPLICAS_DIR)
        .join(format!("{}{}", dir_name(key), stage.suffix()))
}

fn dir_name(key: ReplicaKey) -> String {
    format!("{}-{}", key.collection, key.shard)
}

/// The replica a directory name stands for; `None` for names not ours.
fn parse_dir_name(name: &str) -> Option<ReplicaKey> {
    let (collection, shard) = name.split_once('-')?;
    let key = ReplicaKey {
        collection: collection.parse().ok()?,
        shard: shard.parse().ok()?,
    };
    // Only the canonical spelling ("07-1" is not ours).
    (dir_name(key) == name).then_some(key)
}

/// Every replica directory under `replicas/` (none if it does not exist).
pub fn replica_dirs(dir: &Path) -> Result<Vec<(ReplicaKey, PathBuf)>, EngineError> {
    subdirs(dir, parse_dir_name)
}

/// An import directory found under `replicas/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportDir {
    pub key: ReplicaKey,
    pub stage: ImportStage,
    pub path: PathBuf,
}

/// Every import directory under `replicas/`, complete or not, by key.
pub fn import_dirs(dir: &Path) -> Result<Vec<ImportDir>, EngineError> {
    let found = subdirs(dir, |name| {
        [ImportStage::Staging, ImportStage::Ready]
            .into_iter()
            .find_map(|stage| {
                let key = parse_dir_name(name.strip_suffix(stage.suffix())?)?;
                Some((key, stage))
            })
    })?;
    Ok(found
        .into_iter()
        .map(|((key, stage), path)| ImportDir { key, stage, path })
        .collect())
}

/// The directories under `replicas/` whose names `parse` recognises,
/// sorted.
fn subdirs<K: Ord>(dir: &Path, parse: impl Fn(&str) -> Option<K>) -> Result<Vec<(K, PathBuf)>, EngineError> {
    let replicas = dir.join(REPLICAS_DIR);
    let entries = match std::fs::read_dir(&replicas) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(EngineError::io(replicas, e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| EngineError::io(&replicas, e))?;
        if let Some(key) = entry.file_name().to_str().and_then(&parse) {
            if entry.path().is_dir() {
                out.push((key, entry.path()));
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Swaps the complete import of `key` in: the replica's directory, if any,
/// goes to trash (never deleted), then the import is renamed into its
/// place and `replicas/` fsynced. A crash in between leaves no replica
/// directory and the import still `Ready`, which the next open swaps in.
/// Returns where the old directory went.
pub fn install_import(dir: &Path, key: ReplicaKey) -> Result<Option<PathBuf>, EngineError> {
    let ready = import_dir(dir, key, ImportStage::Ready);
    let target = replica_dir(dir, key);
    let trashed = match target.exists() {
        true => Some(move_to_trash(dir, &target)?),
        false => None,
    };
    std::fs::rename(&ready, &target).map_err(|e| EngineError::io(&ready, e))?;
    fsutil::sync_dir(&dir.join(REPLICAS_DIR))?;
    Ok(trashed)
}

/// Moves `path` (a directory under `dir`) to `trash/<name>-<unix seconds>`
/// durably and returns where it went.
pub fn move_to_trash(dir: &Path, path: &Path) -> Result<PathBuf, EngineError> {
    move_aside(dir, path, TRASH_DIR)
}

/// Moves the directory of a replica that failed to open to
/// `damaged/<name>-<unix seconds>` durably and returns where it went.
pub fn move_to_damaged(dir: &Path, path: &Path) -> Result<PathBuf, EngineError> {
    move_aside(dir, path, DAMAGED_DIR)
}

fn move_aside(dir: &Path, path: &Path, under: &str) -> Result<PathBuf, EngineError> {
    let trash = dir.join(under);
    fsutil::create_dir_durable(&trash)?;
    let name = path
        .file_name()
        .map_or_else(|| "replica".into(), |n| n.to_string_lossy());
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let mut to = trash.join(format!("{name}-{secs}"));
    let mut n = 1;
    while to.exists() {
        to = trash.join(format!("{name}-{secs}.{n}"));
        n += 1;
    }
    std::fs::rename(path, &to).map_err(|e| EngineError::io(path, e))?;
    fsutil::sync_dir(&trash)?;
    if let Some(parent) = path.parent() {
        fsutil::sync_dir(parent)?;
    }
    Ok(to)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn import_dirs_are_told_apart_from_replicas() {
        let dir = tempfile::tempdir().unwrap();
        let key = |shard| ReplicaKey { collection: 5, shard };
        for path in [
            replica_dir(dir.path(), key(0)),
            import_dir(dir.path(), key(0), ImportStage::Ready),
            import_dir(dir.path(), key(1), ImportStage::Staging),
            dir.path().join("replicas/5-2.import.old"),
        ] {
            std::fs::create_dir_all(path).unwrap();
        }
        let replicas: Vec<ReplicaKey> = replica_dirs(dir.path()).unwrap().into_iter().map(|(k, _)| k).collect();
        assert_eq!(replicas, vec![key(0)]);
        let imports: Vec<_> = import_dirs(dir.path())
            .unwrap()
            .into_iter()
            .map(|d| (d.key, d.stage))
            .collect();
        assert_eq!(
            imports,
            vec![(key(0), ImportStage::Ready), (key(1), ImportStage::Staging)]
        );
    }

    #[test]
    fn replica_dir_names_round_trip() {
        let key = ReplicaKey {
            collection: 12,
            shard: 3,
        };
        assert_eq!(dir_name(key), "12-3");
        assert_eq!(parse_dir_name("12-3"), Some(key));
        for not_ours in [
            "12",
            "12-",
            "-3",
            "a-3",
            "12-3-4",
            "012-3",
            "12-03",
            "12-99999999999",
            "12-3.import",
        ] {
            assert_eq!(parse_dir_name(not_ours), None, "{not_ours}");
        }
    }
}
