//! The crate's error type and its bridge to openraft's `StorageError`.
//!
//! Two worlds meet here. Our own code (open, load, encode, the blocking
//! helpers) reports [`MetaStoreError`], which says what failed in words a
//! person can act on. openraft wants a `StorageError` tagged with *what* was
//! being read or written (logs, vote, state machine, snapshot) because it
//! treats every storage error as fatal and logs the subject; [`Subject`]
//! carries that tag from the call site to the conversion.
//!
//! Business-rule refusals (a collection that already exists, an unknown
//! node) are never errors here: they are deterministic
//! [`crate::ResponseV1::Rejected`] replies from the state machine.

use std::path::PathBuf;

use openraft::AnyError;

use crate::types::{LogId, StorageError, StorageIOError};

/// Everything that can go wrong in the metadata store.
#[derive(Debug, thiserror::Error)]
pub enum MetaStoreError {
    /// redb failed: I/O below it, a corrupt page, a full disk.
    #[error("metadata store (redb) failed: {0}")]
    Storage(#[from] redb::Error),

    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// Bytes on disk that do not decode as any known version.
    #[error("corrupt metadata in {what}: {message}")]
    Corrupt { what: String, message: String },

    /// The file was written by a newer (or unknown) edgevec: refuse rather
    /// than misread it.
    #[error(
        "{path} has on-disk format version {found}, this build reads versions {oldest} to {supported}; \
         run a matching edgevec version"
    )]
    UnsupportedFormat {
        path: PathBuf,
        found: u32,
        /// The oldest version this build reads (and upgrades).
        oldest: u32,
        /// The version this build writes.
        supported: u32,
    },

    /// A file of the store cannot be opened (damaged, truncated, or its
    /// reader failed on it); nothing in it was changed.
    #[error(
        "{path} cannot be read: {message}. Nothing was changed. This node's copy of the cluster metadata is \
         damaged; the other voters hold the metadata: remove this node from the cluster (`edgevec node remove`), \
         move {dir} aside, start the node and add it again (`edgevec node add`) to receive the metadata from them"
    )]
    Unreadable {
        path: PathBuf,
        dir: PathBuf,
        message: String,
    },

    /// Another process holds the file (a second node on the same data
    /// directory).
    #[error("{path} is in use by another process: is another edgevec node running with this data directory?")]
    InUse { path: PathBuf },

    /// A value could not be encoded (should not happen for our types).
    #[error("cannot encode {what}: {message}")]
    Encode { what: String, message: String },

    /// The blocking task that ran a redb transaction panicked or was
    /// cancelled at shutdown.
    #[error("metadata store task failed: {0}")]
    Task(String),
}

impl MetaStoreError {
    pub(crate) fn corrupt(what: impl Into<String>, message: impl ToString) -> Self {
        MetaStoreError::Corrupt {
            what: what.into(),
            message: message.to_string(),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        MetaStoreError::Io {
            path: path.into(),
            source,
        }
    }
}

/// redb reports each step (open, begin, table, commit) with its own error
/// type; they all mean "the store failed" to us.
macro_rules! storage_from {
    ($($t:ty),*) => {$(
        impl From<$t> for MetaStoreError {
            fn from(e: $t) -> Self {
                MetaStoreError::Storage(redb::Error::from(e))
            }
        }
    )*};
}
storage_from!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

/// What an operation was touching when it failed, for openraft's error.
#[derive(Debug, Clone)]
pub(crate) enum Subject {
    ReadLogs,
    WriteLogs,
    ReadVote,
    WriteVote,
    /// Applying the entry with this log id.
    Apply(LogId),
    ReadSnapshot,
    WriteSnapshot,
}

impl MetaStoreError {
    /// Convert into openraft's error, tagged with what was being done.
    pub(crate) fn into_raft(self, subject: Subject) -> StorageError {
        let source = AnyError::new(&self);
        let io = match subject {
            Subject::ReadLogs => StorageIOError::read_logs(source),
            Subject::WriteLogs => StorageIOError::write_logs(source),
            Subject::ReadVote => StorageIOError::read_vote(source),
            Subject::WriteVote => StorageIOError::write_vote(source),
            Subject::Apply(log_id) => StorageIOError::apply(log_id, source),
            Subject::ReadSnapshot => StorageIOError::read_snapshot(None, source),
            Subject::WriteSnapshot => StorageIOError::write_snapshot(None, source),
        };
        StorageError::IO { source: io }
    }
}
