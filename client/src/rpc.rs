//! One request/response exchange on a QUIC connection.
//!
//! Each request gets its own bidirectional stream: the request frame is
//! written and the send side finished, then exactly one response frame is
//! read (bounded by [`limits::MAX_FRAME_BYTES`]). Used by the client library
//! and by nodes calling each other.

use std::time::Duration;

use edgevec_proto::frame::{self, FrameError};
use edgevec_proto::{codec, limits, WireError};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Why an exchange failed, split by what the caller can do about it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    /// The connection is gone or could not open a stream: try another node.
    #[error("connection lost: {0}")]
    Connection(String),
    /// No answer within the deadline. The request may or may not have run.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The peer answered with bytes that are not a valid response.
    #[error("bad response: {0}")]
    Protocol(String),
    /// The request could not be sent as it is (too large).
    #[error("request not sent: {0}")]
    Request(String),
}

impl From<WireError> for CallError {
    fn from(e: WireError) -> Self {
        CallError::Protocol(e.message)
    }
}

/// Sends `req` on a new stream of `conn` and decodes the response.
pub async fn call<Req: Serialize, Resp: DeserializeOwned>(
    conn: &quinn::Connection,
    req: &Req,
    timeout: Duration,
) -> Result<Resp, CallError> {
    let body = codec::encode(req);
    if body.len() > limits::MAX_FRAME_BYTES {
        return Err(CallError::Request(format!(
            "request is {} bytes, above the {} byte frame limit; send smaller batches",
            body.len(),
            limits::MAX_FRAME_BYTES
        )));
    }
    let exchange = async {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| CallError::Connection(e.to_string()))?;
        frame::write_frame(&mut send, &body).await.map_err(stream_error)?;
        // The peer may already have answered and stopped reading; a closed
        // send side is not a failure as long as the response arrives.
        let _ = send.finish();
        let resp = frame::read_frame(&mut recv, limits::MAX_FRAME_BYTES)
            .await
            .map_err(stream_error)?;
        Ok::<_, CallError>(codec::decode::<Resp>(&resp)?)
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(result) => result,
        Err(_) => Err(CallError::Timeout(timeout)),
    }
}

fn stream_error(e: FrameError) -> CallError {
    match e {
        FrameError::Io(io) => CallError::Connection(io.to_string()),
        FrameError::Empty | FrameError::Truncated { .. } => CallError::Connection(format!("stream ended early ({e})")),
        FrameError::TooLarge { .. } => CallError::Protocol(e.to_string()),
    }
}
