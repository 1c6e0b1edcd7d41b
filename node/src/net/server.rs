//! Accept loop: connection task → stream task → dispatch.
//!
//! Invariants:
//! - a request body is read with a hard size limit and a deadline; a stream
//!   that lies about its length, sends garbage or closes mid-request gets a
//!   typed error reply (when the peer still listens) and nothing else —
//!   the connection and every other stream go on;
//! - node-ALPN connections are accepted only from peers whose verified
//!   certificate is a node certificate of the cluster CA;
//! - every task is tracked and every loop watches the shutdown token, so
//!   shutdown drains in-flight requests and returns.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use edgevec_proto::client::{ClientRequest, ClientResponse};
use edgevec_proto::frame::{self, FrameError};
use edgevec_proto::internal::{NodeRequest, NodeResponse};
use edgevec_proto::{codec, limits, ErrorCode, WireError};
use rustls_pki_types::CertificateDer;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info_span, warn, Instrument};

use super::close;

/// Most connections a node accepts at once.
pub const MAX_CONNECTIONS: usize = 4096;
/// How long a peer may take to send one request.
pub const READ_DEADLINE: Duration = Duration::from_secs(30);
/// Bytes of request bodies the node holds at once, over every connection:
/// a request waits for its share before its body is read, so many peers
/// sending large frames together cannot exhaust memory.
pub const MAX_INFLIGHT_REQUEST_BYTES: usize = 512 * 1024 * 1024;

/// The node-wide budget of request bytes in flight.
type Budget = Arc<tokio::sync::Semaphore>;

/// What the server hands decoded requests to.
pub trait Dispatch: Send + Sync + 'static {
    fn client(&self, req: ClientRequest) -> impl Future<Output = ClientResponse> + Send;
    /// A request from the node whose certificate names `peer`.
    fn node(&self, peer: u64, req: NodeRequest) -> impl Future<Output = NodeResponse> + Send;
}

/// Which protocol a connection speaks, decided at the handshake.
#[derive(Debug, Clone, Copy)]
enum Peer {
    Client,
    Node(u64),
}

/// Serves `endpoint` until `shutdown` fires; returns after every connection
/// task has finished.
pub async fn serve<D: Dispatch>(endpoint: quinn::Endpoint, dispatch: Arc<D>, shutdown: CancellationToken) {
    let tracker = TaskTracker::new();
    let budget: Budget = Arc::new(tokio::sync::Semaphore::new(MAX_INFLIGHT_REQUEST_BYTES));
    loop {
        let incoming = tokio::select! {
            _ = shutdown.cancelled() => break,
            incoming = endpoint.accept() => match incoming {
                Some(i) => i,
                None => break,
            },
        };
        if endpoint.open_connections() >= MAX_CONNECTIONS {
            warn!(remote = %incoming.remote_address(), "connection limit reached; refusing");
            incoming.refuse();
            continue;
        }
        let dispatch = dispatch.clone();
        let shutdown = shutdown.clone();
        let tracker2 = tracker.clone();
        let budget = budget.clone();
        let span = info_span!("conn", remote = %incoming.remote_address());
        tracker.spawn(
            async move {
                if let Err(e) = connection(incoming, dispatch, shutdown, tracker2, budget).await {
                    debug!(error = %e, "connection ended");
                }
            }
            .instrument(span),
        );
    }
    endpoint.close(close::SHUTDOWN.into(), b"node shutting down");
    tracker.close();
    tracker.wait().await;
}

async fn connection<D: Dispatch>(
    incoming: quinn::Incoming,
    dispatch: Arc<D>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    budget: Budget,
) -> Result<(), quinn::ConnectionError> {
    let remote = incoming.remote_address();
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            // A peer whose certificate this cluster does not trust ends
            // here; say so once per attempt, it is what an operator looks
            // for when a node cannot join.
            tracing::info!(%remote, error = %e, "handshake failed");
            return Ok(());
        }
    };
    let peer = match classify(&conn) {
        Some(p) => p,
        None => return Ok(()),
    };
    debug!(?peer, "connected");
    loop {
        let (send, recv) = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            stream = conn.accept_bi() => match stream {
                Ok(s) => s,
                Err(quinn::ConnectionError::ApplicationClosed(_) | quinn::ConnectionError::LocallyClosed) => return Ok(()),
                Err(e) => return Err(e),
            },
        };
        let dispatch = dispatch.clone();
        let budget = budget.clone();
        tracker.spawn(
            async move {
                stream(peer, send, recv, &*dispatch, &budget).await;
            }
            .instrument(info_span!("req", id = %next_request_id())),
        );
    }
}

/// A short per-request id for log correlation.
fn next_request_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

fn classify(conn: &quinn::Connection) -> Option<Peer> {
    let alpn = conn
        .handshake_data()
        .and_then(|h| h.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|h| h.protocol);
    match alpn.as_deref() {
        Some(p) if p == edgevec_proto::ALPN_CLIENT => Some(Peer::Client),
        Some(p) if p == edgevec_proto::ALPN_NODE => {
            let node = conn
                .peer_identity()
                .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
                .and_then(|chain| chain.first().and_then(crate::certs::node_id_of_cert));
            match node {
                Some(id) => Some(Peer::Node(id)),
                None => {
                    warn!(remote = %conn.remote_address(), "node protocol without a node certificate; closing");
                    conn.close(
                        close::NOT_A_NODE.into(),
                        b"node protocol requires a node certificate of this cluster",
                    );
                    None
                }
            }
        }
        _ => {
            conn.close(close::BAD_ALPN.into(), b"unknown protocol");
            None
        }
    }
}

async fn stream<D: Dispatch>(
    peer: Peer,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    dispatch: &D,
    budget: &tokio::sync::Semaphore,
) {
    let read = async {
        let len = frame::read_header(&mut recv, limits::MAX_FRAME_BYTES).await?;
        // Reserve the body's bytes from the node-wide budget first; the
        // permit is held until the reply is written.
        let permit = budget
            .acquire_many(len.max(1) as u32)
            .await
            .expect("the budget semaphore is never closed");
        Ok::<_, FrameError>((frame::read_body(&mut recv, len).await?, permit))
    };
    let (body, _permit) = match tokio::time::timeout(READ_DEADLINE, read).await {
        Ok(Ok((body, permit))) => (Ok(body), Some(permit)),
        Ok(Err(e)) => (Err(frame_error(e, &mut recv)), None),
        Err(_) => (
            Err(WireError::new(
                ErrorCode::Timeout,
                format!("request not received within {READ_DEADLINE:?}"),
            )),
            None,
        ),
    };
    let reply = match (peer, body) {
        (Peer::Client, Ok(body)) => match codec::decode::<ClientRequest>(&body) {
            Ok(req) => codec::encode(&dispatch.client(req).await),
            Err(e) => codec::encode(&ClientResponse::V1(Err(e))),
        },
        (Peer::Client, Err(e)) => codec::encode(&ClientResponse::V1(Err(e))),
        (Peer::Node(id), Ok(body)) => match codec::decode::<NodeRequest>(&body) {
            Ok(req) => codec::encode(&dispatch.node(id, req).await),
            Err(e) => codec::encode(&NodeResponse::V1(Err(e))),
        },
        (Peer::Node(_), Err(e)) => codec::encode(&NodeResponse::V1(Err(e))),
    };
    // A reply above the frame limit would be refused by the peer and cost
    // the connection: answer with a typed error instead.
    let reply = if reply.len() > limits::MAX_FRAME_BYTES {
        let e = WireError::new(
            ErrorCode::FrameTooLarge,
            format!(
                "the reply is {} bytes, above the {} byte frame limit; ask for less at once (smaller k, fewer queries or ids)",
                reply.len(),
                limits::MAX_FRAME_BYTES
            ),
        );
        match peer {
            Peer::Client => codec::encode(&ClientResponse::V1(Err(e))),
            Peer::Node(_) => codec::encode(&NodeResponse::V1(Err(e))),
        }
    } else {
        reply
    };
    // The peer may be gone (that is how "closed mid-request" usually ends);
    // failing to answer it is not an error of the node.
    match frame::write_frame(&mut send, &reply).await {
        Ok(()) => {
            let _ = send.finish();
            // Wait until the peer has the reply (or went away), so the
            // connection is not torn down under an unread answer.
            let _ = tokio::time::timeout(Duration::from_secs(5), send.stopped()).await;
        }
        Err(e) => debug!(error = %e, "reply not delivered"),
    }
}

fn frame_error(e: FrameError, recv: &mut quinn::RecvStream) -> WireError {
    match e {
        FrameError::TooLarge { len, limit } => {
            // Stop the sender instead of draining megabytes we will not use.
            let _ = recv.stop(0u32.into());
            WireError::new(
                ErrorCode::FrameTooLarge,
                format!("request of {len} bytes exceeds the {limit} byte limit; send smaller batches"),
            )
        }
        FrameError::Truncated { got, expected } => WireError::new(
            ErrorCode::Malformed,
            format!("stream closed mid-request after {got} of {expected} bytes"),
        ),
        FrameError::Empty => WireError::new(ErrorCode::Malformed, "stream closed before a request was sent"),
        FrameError::Io(io) => WireError::new(ErrorCode::Malformed, format!("request stream failed: {io}")),
    }
}
