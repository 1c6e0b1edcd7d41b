//! What both redb files share: opening with a format-version check, postcard
//! encoding with corruption reported as such, and running redb work off the
//! async runtime.
//!
//! Invariants:
//! - every file carries a `format` table with its layout version; a file
//!   with another version is refused, never guessed at;
//! - redb calls that may block (every commit fsyncs) run on tokio's blocking
//!   pool via [`blocking`], so a Raft worker thread never waits on a disk.

use std::path::Path;

use redb::{Database, ReadableDatabase, TableDefinition};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::MetaStoreError;

const FORMAT: TableDefinition<&str, u32> = TableDefinition::new("format");
const FORMAT_KEY: &str = "version";

/// Open (or create) the redb file at `path`, check its layout version, and
/// create `tables` so later read transactions find them.
///
/// `init` runs in the same transaction as the table creation: it is where a
/// file sets up its tables.
pub(crate) fn open_db(
    path: &Path,
    version: u32,
    init: impl FnOnce(&redb::WriteTransaction) -> Result<(), MetaStoreError>,
) -> Result<Database, MetaStoreError> {
    let db = Database::create(path)?;
    let found = {
        let txn = db.begin_read()?;
        match txn.open_table(FORMAT) {
            Ok(t) => t.get(FORMAT_KEY)?.map(|v| v.value()),
            Err(redb::TableError::TableDoesNotExist(_)) => None,
            Err(e) => return Err(e.into()),
        }
    };
    match found {
        Some(v) if v != version => Err(MetaStoreError::UnsupportedFormat {
            path: path.to_owned(),
            found: v,
            supported: version,
        }),
        _ => {
            let txn = db.begin_write()?;
            txn.open_table(FORMAT)?.insert(FORMAT_KEY, version)?;
            init(&txn)?;
            txn.commit()?;
            Ok(db)
        }
    }
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
        drop(open_db(&path, 1, |_| Ok(())).unwrap());
        drop(open_db(&path, 1, |_| Ok(())).unwrap());
        let err = open_db(&path, 2, |_| Ok(())).unwrap_err();
        assert!(
            matches!(
                err,
                MetaStoreError::UnsupportedFormat {
                    found: 1,
                    supported: 2,
                    ..
                }
            ),
            "{err}"
        );
    }
}
