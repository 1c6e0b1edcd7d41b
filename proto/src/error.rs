//! The one error type that crosses the wire.
//!
//! A [`WireError`] carries a machine-readable [`ErrorCode`] and a message
//! written for the person who made the request: it says what was wrong and,
//! where it can, what to do. Libraries on either side map their own typed
//! errors to and from it.

use serde::{Deserialize, Serialize};

/// What kind of failure a request met. Stable: codes are only ever added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The request is well-formed but a value in it is not acceptable.
    InvalidArgument,
    /// The named collection (or other object) does not exist.
    NotFound,
    /// The object to create exists already.
    AlreadyExists,
    /// No token, or a token the cluster does not know.
    Unauthorized,
    /// The token is valid but its role does not allow the operation.
    PermissionDenied,
    /// The node cannot serve the request now; retrying elsewhere may work.
    Unavailable,
    /// The request did not finish in time.
    Timeout,
    /// The frame was larger than the limit.
    FrameTooLarge,
    /// The bytes could not be decoded as a request.
    Malformed,
    /// The peer speaks a protocol version this node does not.
    UnsupportedVersion,
    /// A bug or an I/O failure inside the node.
    Internal,
    /// The request was fenced: it carried an older term or configuration
    /// version than the receiver knows (a deposed primary, a stale proxy).
    Conflict,
    /// The write may or may not have been applied (a replica failed while
    /// it was in flight and the shard could not confirm). Writes are
    /// id-keyed upserts and deletes, so sending it again is safe.
    OutcomeUnknown,
    /// The replica has not applied what the read's consistency level
    /// requires within the read's budget; another replica may serve it.
    NotCaughtUp,
}

impl ErrorCode {
    /// Whether the same request may succeed if sent again (here or to
    /// another node) without being changed.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::Unavailable | ErrorCode::Timeout | ErrorCode::OutcomeUnknown | ErrorCode::NotCaughtUp
        )
    }
}

/// An error reply: code, human message, and the offending field if any.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct WireError {
    pub code: ErrorCode,
    pub message: String,
    /// Request field that was wrong (`"vector"`, `"k"`, `"points[3].payload"`).
    pub field: Option<String>,
}

impl WireError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            field: None,
        }
    }

    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            code: ErrorCode::InvalidArgument,
            message: message.into(),
            field: Some(field.into()),
        }
    }

    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }
}

/// The text of a caught panic's payload (what `panic!` was given), for
/// the error that reports it.
pub fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}
