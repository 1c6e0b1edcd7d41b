//! What both redb files share: opening with a format-version check, postcard
//! encoding with corruption reported as such, and running redb work off the
//! async runtime.
//!
//! Invariants:
//! - every file carries a `format` table with its layout version; a file
//!   with a version outside what this build reads is refused, never guessed
//!   at, and an older readable one is left to its owner to upgrade;
//! - redb calls that may block (every commit fsyncs) run on tokio's blocking
//!   pool via [`blocking`], so a Raft worker thread never waits on a disk.

use std::ops::RangeInclusive;
use std::path::Path;

use redb::{Database, ReadableDatabase, TableDefinition};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::MetaStoreError;

const FORMAT: TableDefinition<&str, u32> = TableDefinition::new("format");

/// Page cache of each metadata file. The metadata is small (its Raft log
/// is purged behind snapshots), and redb's default cache (1 GiB) would keep
/// every page a long-lived node ever touched.
const CACHE_BYTES: usize = 2 * 1024 * 1024;
const FORMAT_KEY: &str = "version";

/// Open (or create) the redb file at `path` and check its layout version
/// against `formats` (oldest readable ..= current). Returns the database and
/// the file's version.
///
/// A new file or one of the current version gets `init` run in the same
/// transaction as the version stamp: it is where a file sets up its tables.
/// A file of an older readable version is returned untouched (not stamped,
/// not initialised): the caller upgrades it, then calls [`stamp_format`] in
/// the upgrade's transaction.
pub(crate) fn open_db(
    path: &Path,
    formats: RangeInclusive<u32>,
    init: impl FnOnce(&redb::WriteTransaction) -> Result<(), MetaStoreError>,
) -> Result<(Database, u32), MetaStoreError> {
    let current = *formats.end();
    let db = Database::builder().set_cache_size(CACHE_BYTES).create(path)?;
    let found = {
        let txn = db.begin_read()?;
        match txn.open_table(FORMAT) {
            Ok(t) => t.get(FORMAT_KEY)?.map(|v| v.value()),
            Err(redb::TableError::TableDoesNotExist(_)) => None,
            Err(e) => return Err(e.into()),
        }
    };
    match found {
        Some(v) if !formats.contains(&v) => Err(MetaStoreError::UnsupportedFormat {
            path: path.to_owned(),
            found: v,
            oldest: *formats.start(),
            supported: current,
        }),
        Some(v) if v != current => Ok((db, v)),
        _ => {
            let txn = db.begin_write()?;
            stamp_format(&txn, current)?;
            init(&txn)?;
            txn.commit()?;
            Ok((db, current))
        }
    }
}

/// Record the file's layout version (in the caller's transaction).
pub(crate) fn stamp_format(txn: &redb::WriteTransaction, version: u32) -> Result<(), MetaStoreError> {
    txn.open_table(FORMAT)?.insert(FORMAT_KEY, version)?;
    Ok(())
}

/// Encode a persisted value (always a versioned envelope).
pub(crate) fn encode<T: Serialize>(what: &str, value: &T) -> Result<Vec<u8>, MetaStoreError> {
    postcard::to_allocvec(value).map_err(|e| MetaStoreError::Encode {
        what: what.to_owned(),
        message: e.to_string(),
    })
}

/// Decode a persisted value; failure means the bytes are corrupt (or from a
/// version this build does not know).
pub(crate) fn decode<T: DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T, MetaStoreError> {
    postcard::from_bytes(bytes).map_err(|e| MetaStoreError::corrupt(what, e))
}

/// Run blocking redb work on tokio's blocking pool.
pub(crate) async fn blocking<T, F>(f: F) -> Result<T, MetaStoreError>
where
    F: FnOnce() -> Result<T, MetaStoreError> + Send + 'static,
    T: Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => Err(MetaStoreError::Task(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn other_format_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.redb");
        assert_eq!(open_db(&path, 1..=1, |_| Ok(())).unwrap().1, 1);
        assert_eq!(open_db(&path, 1..=1, |_| Ok(())).unwrap().1, 1);
        let err = open_db(&path, 2..=2, |_| Ok(())).unwrap_err();
        assert!(
            matches!(
                err,
                MetaStoreError::UnsupportedFormat {
                    found: 1,
                    oldest: 2,
                    supported: 2,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn older_readable_version_is_left_to_upgrade() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.redb");
        drop(open_db(&path, 1..=1, |_| Ok(())).unwrap());
        let (db, found) = open_db(&path, 1..=2, |_| panic!("not initialised before the upgrade")).unwrap();
        assert_eq!(found, 1);
        let txn = db.begin_write().unwrap();
        stamp_format(&txn, 2).unwrap();
        txn.commit().unwrap();
        drop(db);
        assert_eq!(open_db(&path, 1..=2, |_| Ok(())).unwrap().1, 2);
        // A newer build's file is refused.
        let err = open_db(&path, 1..=1, |_| Ok(())).unwrap_err();
        assert!(
            matches!(err, MetaStoreError::UnsupportedFormat { found: 2, .. }),
            "{err}"
        );
    }
}
