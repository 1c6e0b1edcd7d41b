//! The engine's error type and its mapping onto the wire.
//!
//! Four kinds of failure are kept apart because callers treat them
//! differently: the request named something that is not there (or already
//! is); the request carried a bad value (`Invalid`, always with the field
//! that was wrong and a message written for the person who sent it); a
//! replication step does not fit this replica's log (stale term, log
//! mismatch, LSN gap, trimmed log, truncation below the applied LSN: the
//! replication layer reacts to each, and a client that meets one retries
//! or is told the shard is busy); and the node itself failed (storage, I/O,
//! corrupt files, a data directory it will not open). Only the first two
//! are the client's fault.

use std::path::PathBuf;

use edgevec_proto::{ErrorCode, OpId, WireError};

use crate::engine::ReplicaKey;

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

    /// This node holds no replica under that key.
    #[error("no replica of {0} on this node; ask a node that holds one, or create it first")]
    ReplicaNotFound(ReplicaKey),

    /// The replica is in use and cannot be closed now (a reopen waits for
    /// every holder to let go).
    #[error("the replica of {0} is in use; retry")]
    ReplicaBusy(ReplicaKey),

    /// A replica exists under the key with another spec.
    #[error(
        "a replica of {0} already exists on this node with a different spec; drop it first, or give the new \
         collection a new id"
    )]
    ReplicaExists(ReplicaKey),

    /// An op to append does not continue the log: its LSN is not the one
    /// after the previous op (a gap or a replay). The sender resends from
    /// `expected`.
    #[error("shard {shard}: op with LSN {got} cannot be appended, the next LSN is {expected}; resend from {expected}")]
    LsnOutOfOrder { shard: u32, expected: u64, got: u64 },

    /// An op or request of a primary term older than this replica's
    /// durable term: it comes from a deposed primary and is refused.
    #[error(
        "shard {shard}: term {term} is older than this replica's term {current}; the sender is no longer \
         primary and must re-read the shard's configuration"
    )]
    StaleTerm { shard: u32, term: u64, current: u64 },

    /// An append named a previous op that is not this replica's last op:
    /// the logs diverge or one side is behind. The primary finds the last
    /// shared op id (term history) and resends after it.
    #[error(
        "shard {shard}: append after op {got_prev} does not match this replica's last op {expected_prev}; \
         reconcile from the term history and resend"
    )]
    LogMismatch {
        shard: u32,
        expected_prev: OpId,
        got_prev: OpId,
    },

    /// A truncation would take back applied ops. Applied ops are never
    /// patched: the replica must be rebuilt from an export.
    #[error(
        "shard {shard}: cannot truncate the op log after LSN {lsn}, ops through {applied} are applied; \
         rebuild this replica from an export of the primary"
    )]
    TruncateBelowApplied { shard: u32, lsn: u64, applied: u64 },

    /// The op log no longer holds the ops asked for (retention dropped
    /// them); the replica that needs them must be rebuilt from an export.
    #[error(
        "shard {shard}: op {wanted} is no longer in the op log, which starts at {first}; \
         catch the replica up from an export instead"
    )]
    LogTrimmed { shard: u32, wanted: u64, first: u64 },

    /// An export leaves out a sealed segment for the importer to take from
    /// its own copy, and that copy is not the exporter's: the import is
    /// refused and the exporter must send the segment's rows.
    #[error(
        "shard {shard}: the export reuses this replica's copy of segment {segment}, but {why}; \
         export again without reusing it"
    )]
    ReusedSegmentDiffers { shard: u32, segment: u64, why: String },

    /// The data directory is of a layout this build does not open; nothing
    /// in it was changed.
    #[error("{path}: {message}")]
    Layout { path: PathBuf, message: String },

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
            // Fenced: the request carried an older term than this replica knows.
            EngineError::StaleTerm { .. } => WireError::new(ErrorCode::Conflict, self.to_string()),
            // The shard is moving (replica elsewhere, logs being reconciled or
            // caught up): the same request may succeed later or elsewhere.
            EngineError::ReplicaNotFound(_)
            | EngineError::ReplicaBusy(_)
            | EngineError::LsnOutOfOrder { .. }
            | EngineError::LogMismatch { .. }
            | EngineError::LogTrimmed { .. } => WireError::new(ErrorCode::Unavailable, self.to_string()),
            // The sender can do better: an export without the segment.
            EngineError::ReusedSegmentDiffers { .. } => WireError::new(ErrorCode::Conflict, self.to_string()),
            EngineError::ReplicaExists(_)
            | EngineError::TruncateBelowApplied { .. }
            | EngineError::Layout { .. }
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
        let e = EngineError::StaleTerm {
            shard: 2,
            term: 3,
            current: 5,
        };
        assert_eq!(e.to_wire().code, ErrorCode::Conflict);
        assert!(e.to_string().contains("term 3 is older than this replica's term 5"));
        let e = EngineError::LogMismatch {
            shard: 0,
            expected_prev: OpId::new(2, 7),
            got_prev: OpId::new(3, 7),
        };
        assert_eq!(e.to_wire().code, ErrorCode::Unavailable);
        assert!(e.to_string().contains("after op 3.7") && e.to_string().contains("last op 2.7"));
        let key = ReplicaKey {
            collection: 4,
            shard: 1,
        };
        assert_eq!(EngineError::ReplicaNotFound(key).to_wire().code, ErrorCode::Unavailable);
        let e = EngineError::TruncateBelowApplied {
            shard: 1,
            lsn: 3,
            applied: 5,
        };
        assert_eq!(e.to_wire().code, ErrorCode::Internal);
        assert!(e.to_string().contains("rebuild"));
    }
}
