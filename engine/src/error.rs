//! The engine's error type and its mapping onto the wire.
//!
//! Three kinds of failure are kept apart because callers treat them
//! differently: the request named something that is not there (or already
//! is), the request carried a bad value (`Invalid`, always with the field
//! that was wrong and a message written for the person who sent it), and the
//! node itself failed (storage, I/O, corrupt files, a replication LSN out of
//! order). Only the first two are the client's fault; the rest map to
//! `Internal` on the wire.

use std::path::PathBuf;

use edgevec_proto::{ErrorCode, WireError};

/// Everything that can go wrong inside the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("collection {0:?} does not exist")]
    CollectionNotFound(String),

    #[error("collection {0:?} already exists; drop it first or pick another name")]
    CollectionExists(String),

    /// A request value is not acceptable. `field` names it the way the
    /// request spells it (`points[4].vector[17]`, `k`, `name`).
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },

    /// A replicated op arrived out of order: replicas apply LSNs strictly
    /// one after another, so the sender must first send the missing ones.
    #[error("shard {shard}: op with LSN {got} cannot be applied, the next LSN is {expected}")]
    LsnOutOfOrder { shard: u32, expected: u64, got: u64 },

    /// The redb store failed (I/O below it, or a corrupt file).
    #[error("storage error: {0}")]
    Storage(#[from] redb::Error),

    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// Bytes on disk that do not decode as any known version.
    #[error("corrupt data in {what}: {message}")]
    Corrupt { what: String, message: String },
}

impl EngineError {
    /// A bad-argument error for `field`.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        EngineError::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        EngineError::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn corrupt(what: impl Into<String>, message: impl ToString) -> Self {
        EngineError::Corrupt {
            what: what.into(),
            message: message.to_string(),
        }
    }

    /// The error as a client sees it.
    pub fn to_wire(&self) -> WireError {
        match self {
            EngineError::CollectionNotFound(_) => WireError::new(ErrorCode::NotFound, self.to_string()),
            EngineError::CollectionExists(_) => WireError::new(ErrorCode::AlreadyExists, self.to_string()),
            EngineError::Invalid { field, message } => WireError::invalid(field, message),
            EngineError::LsnOutOfOrder { .. }
            | EngineError::Storage(_)
            | EngineError::Io { .. }
            | EngineError::Corrupt { .. } => WireError::new(ErrorCode::Internal, self.to_string()),
        }
    }
}

/// redb reports each step (open, begin, table, commit) with its own error
/// type; they all mean "the store failed" to us.
macro_rules! storage_from {
    ($($t:ty),*) => {$(
        impl From<$t> for EngineError {
            fn from(e: $t) -> Self {
                EngineError::Storage(redb::Error::from(e))
            }
        }
    )*};
}
storage_from!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_codes() {
        let e = EngineError::CollectionNotFound("docs".into()).to_wire();
        assert_eq!(e.code, ErrorCode::NotFound);
        assert!(e.message.contains("\"docs\""));
        let e = EngineError::CollectionExists("docs".into()).to_wire();
        assert_eq!(e.code, ErrorCode::AlreadyExists);
        let e = EngineError::invalid("k", "k must be between 1 and 1024, got 0").to_wire();
        assert_eq!(e.code, ErrorCode::InvalidArgument);
        assert_eq!(e.field.as_deref(), Some("k"));
        assert_eq!(e.message, "k must be between 1 and 1024, got 0");
        let e = EngineError::io("/x", std::io::Error::other("boom")).to_wire();
        assert_eq!(e.code, ErrorCode::Internal);
    }
}
