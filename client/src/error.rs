//! Errors the client library returns.
//!
//! Remote refusals ("the node said no") are kept apart from transport
//! failures ("could not reach a node") and timeouts; [`ClientError::is_retryable`]
//! tells which ones may succeed if tried again unchanged.

use edgevec_proto::{ErrorCode, WireError};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// A value in the request was not acceptable; `field` names it.
    #[error("invalid argument{}: {message}", field.as_ref().map(|f| format!(" ({f})")).unwrap_or_default())]
    InvalidArgument { field: Option<String>, message: String },
    #[error("not found: {0}")]
    NotFound(String),
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// The token is missing or unknown to the cluster.
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    /// The token's role does not allow this operation.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// No node could serve the request (all endpoints unreachable, or the
    /// node answered that it cannot serve now).
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("timed out: {0}")]
    Timeout(String),
    /// The node and the client do not understand each other (version skew,
    /// frame limits, corrupt bytes).
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The node failed internally.
    #[error("node error: {0}")]
    Internal(String),
    /// The request was fenced by a newer configuration (stale term).
    #[error("conflict: {0}")]
    Conflict(String),
    /// A write may or may not have been applied; repeating it is safe
    /// (writes are id-keyed).
    #[error("outcome unknown: {0}")]
    OutcomeUnknown(String),
    /// Local configuration is wrong (files, certificates, addresses).
    #[error("client configuration: {0}")]
    Config(String),
}

impl ClientError {
    /// Whether the same request may succeed when sent again unchanged.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ClientError::Unavailable(_) | ClientError::Timeout(_) | ClientError::OutcomeUnknown(_)
        )
    }
}

impl From<WireError> for ClientError {
    fn from(e: WireError) -> Self {
        match e.code {
            ErrorCode::InvalidArgument => ClientError::InvalidArgument {
                field: e.field,
                message: e.message,
            },
            ErrorCode::NotFound => ClientError::NotFound(e.message),
            ErrorCode::AlreadyExists => ClientError::AlreadyExists(e.message),
            ErrorCode::Unauthorized => ClientError::Unauthorized(e.message),
            ErrorCode::PermissionDenied => ClientError::PermissionDenied(e.message),
            ErrorCode::Unavailable | ErrorCode::NotCaughtUp => ClientError::Unavailable(e.message),
            ErrorCode::Timeout => ClientError::Timeout(e.message),
            ErrorCode::FrameTooLarge | ErrorCode::Malformed | ErrorCode::UnsupportedVersion => {
                ClientError::Protocol(e.message)
            }
            ErrorCode::Internal => ClientError::Internal(e.message),
            ErrorCode::Conflict => ClientError::Conflict(e.message),
            ErrorCode::OutcomeUnknown => ClientError::OutcomeUnknown(e.message),
        }
    }
}

impl From<crate::tls::TlsError> for ClientError {
    fn from(e: crate::tls::TlsError) -> Self {
        ClientError::Config(e.to_string())
    }
}
