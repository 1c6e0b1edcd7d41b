//! The node's QUIC endpoint: TLS, the accept loop and request dispatch
//! ([`server`]), and calls to other nodes over pooled connections ([`peer`]).
//!
//! One UDP socket serves both ALPNs. Client connections are authenticated
//! per request by API token (in the service layer); node connections are
//! authenticated here, by a node certificate of the cluster CA, before any
//! request is read.

pub mod peer;
pub mod server;
pub mod tls;

/// Application close codes sent with CONNECTION_CLOSE.
pub mod close {
    /// Orderly shutdown of the node.
    pub const SHUTDOWN: u32 = 0;
    /// The peer asked for the node ALPN without a node certificate.
    pub const NOT_A_NODE: u32 = 1;
    /// The node is at its connection limit.
    pub const BUSY: u32 = 2;
    /// Unknown ALPN (cannot happen with rustls' ALPN enforcement; kept for safety).
    pub const BAD_ALPN: u32 = 3;
}

/// Refuses a node request that speaks for node `claimed` when the caller's
/// certificate names node `peer`.
pub fn check_claim(peer: u64, claimed: Option<u64>) -> Result<(), edgevec_proto::WireError> {
    match claimed {
        Some(id) if id != peer => Err(edgevec_proto::WireError::new(
            edgevec_proto::ErrorCode::PermissionDenied,
            format!("the message claims to come from node {id}, but the caller's certificate is node {peer}'s"),
        )),
        _ => Ok(()),
    }
}
