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

use edgevec_proto::client::{token_prefix, ClientRequest, ClientResponse, TOKEN_PREFIX_BYTES};
use edgevec_proto::frame::{self, FrameError};
use edgevec_proto::internal::{NodeRequest, NodeResponse};
use edgevec_proto::{codec, limits, ErrorCode, WireError};
use rustls_pki_types::CertificateDer;
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info_span, warn, Instrument};

use super::close;

/// Most connections a node accepts at once.
pub const MAX_CONNECTIONS: usize = 4096;
/// How long a peer may take to send one request.
pub const READ_DEADLINE: Duration = Duration::from_secs(30);
/// Bytes of request bodies the node holds at once, over every connection,
/// unless cluster.toml says otherwise (`request_budget_mb`). A body is
/// read a chunk at a time, each chunk reserved from this budget as its
/// bytes arrive (a length prefix alone reserves nothing); a request that
/// cannot get its next chunk within [`BUDGET_WAIT`] is refused.
pub const MAX_INFLIGHT_REQUEST_BYTES: usize = 512 * 1024 * 1024;
/// Bytes of a body read (and reserved) in one step.
const CHUNK_BYTES: usize = 64 * 1024;
/// How long a request waits for room in the budget before it is refused.
const BUDGET_WAIT: Duration = Duration::from_secs(2);
/// Bytes that the requests of one client connection that has not shown a
/// known token yet may hold at once: only the start of each body (up to
/// [`TOKEN_PREFIX_BYTES`]) is read before its token is checked.
pub const UNAUTHENTICATED_CONNECTION_BYTES: usize = 16 * 1024;

/// The node-wide budget of request bytes in flight, and its size.
#[derive(Clone)]
pub struct Budget {
    bytes: Arc<tokio::sync::Semaphore>,
    size: usize,
}

impl Budget {
    /// A budget of `size` bytes.
    pub fn new(size: usize) -> Self {
        Budget {
            bytes: Arc::new(tokio::sync::Semaphore::new(size)),
            size,
        }
    }

    /// Bytes of request bodies held now.
    pub fn in_flight(&self) -> usize {
        self.size.saturating_sub(self.bytes.available_permits())
    }
}

/// What a connection's streams share.
struct Conn {
    peer: Peer,
    /// Set once a request on it carried a known token.
    authenticated: std::sync::atomic::AtomicBool,
    /// Bytes its requests may hold before it is authenticated.
    unauthenticated: tokio::sync::Semaphore,
}

/// What the server hands decoded requests to.
pub trait Dispatch: Send + Sync + 'static {
    /// Whether `token` is one of the cluster's API tokens (checked on the
    /// start of a body, before the rest of it is read).
    fn knows_token(&self, token: &str) -> bool;
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
pub async fn serve<D: Dispatch>(
    endpoint: quinn::Endpoint,
    dispatch: Arc<D>,
    budget: Budget,
    shutdown: CancellationToken,
) {
    let tracker = TaskTracker::new();
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
    let conn_state = Arc::new(Conn {
        peer,
        authenticated: std::sync::atomic::AtomicBool::new(false),
        unauthenticated: tokio::sync::Semaphore::new(UNAUTHENTICATED_CONNECTION_BYTES),
    });
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
        let conn_state = conn_state.clone();
        tracker.spawn(
            async move {
                stream(&conn_state, send, recv, &*dispatch, &budget).await;
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

/// Why a request body was not read to its end.
enum ReadError {
    Frame(FrameError),
    /// Refused before the body was read: unknown token, budget exhausted.
    Refused(WireError),
}

impl From<FrameError> for ReadError {
    fn from(e: FrameError) -> Self {
        ReadError::Frame(e)
    }
}

/// Reads one request body of `len` bytes. On a client connection the
/// start of the body is read first, up to the end of its token, and an
/// unknown token ends the request there; until a request on the
/// connection has shown a known token, those starts come from the
/// connection's small allowance. The rest is read a chunk at a time, each
/// chunk reserved from the node-wide `budget` once its bytes have arrived;
/// the permit returned holds the reservation until the reply is sent.
async fn read_body<D: Dispatch>(
    conn: &Conn,
    recv: &mut quinn::RecvStream,
    len: usize,
    dispatch: &D,
    budget: &Budget,
) -> Result<(Vec<u8>, Option<tokio::sync::OwnedSemaphorePermit>), ReadError> {
    let mut body = Vec::new();
    if matches!(conn.peer, Peer::Client) {
        let head = len.min(TOKEN_PREFIX_BYTES);
        let _allowance = if conn.authenticated.load(std::sync::atomic::Ordering::Acquire) {
            None
        } else {
            Some(conn.unauthenticated.try_acquire_many(head as u32).map_err(|_| {
                ReadError::Refused(WireError::new(
                    ErrorCode::Unavailable,
                    format!(
                        "this connection has {UNAUTHENTICATED_CONNECTION_BYTES} bytes of requests in flight without \
                         a known token; wait for their replies"
                    ),
                ))
            })?)
        };
        body.resize(head, 0);
        // Read until the token is complete (or the start is all there).
        let mut got = 0;
        let known = loop {
            if let Some(t) = token_prefix(&body[..got]) {
                break Some(dispatch.knows_token(t));
            }
            if got == head {
                break None;
            }
            let n = AsyncReadExt::read(recv, &mut body[got..])
                .await
                .map_err(FrameError::Io)?;
            if n == 0 {
                return Err(FrameError::Truncated { got, expected: len }.into());
            }
            got += n;
        };
        match known {
            Some(true) => conn.authenticated.store(true, std::sync::atomic::Ordering::Release),
            // Complete already: the request's own checks answer it.
            None if head == len => {}
            _ => {
                return Err(ReadError::Refused(WireError::new(
                    ErrorCode::Unauthorized,
                    "unknown API token (checked before the rest of the request was read)",
                )))
            }
        }
        fill(recv, &mut body, got, len).await?;
    }
    let mut held: Option<tokio::sync::OwnedSemaphorePermit> = None;
    while body.len() < len {
        // Bytes QUIC has received already (its flow control bounds what it
        // buffers): reserved only now that they exist.
        let chunk = recv
            .read_chunk((len - body.len()).min(CHUNK_BYTES), true)
            .await
            .map_err(|e| FrameError::Io(e.into()))?
            .ok_or(FrameError::Truncated {
                got: body.len(),
                expected: len,
            })?;
        let n = chunk.bytes.len();
        let permit = tokio::time::timeout(BUDGET_WAIT, budget.bytes.clone().acquire_many_owned(n as u32))
            .await
            .map_err(|_| {
                ReadError::Refused(WireError::new(
                    ErrorCode::Unavailable,
                    format!(
                        "node busy: its {} bytes for requests in flight stayed taken for {BUDGET_WAIT:?}; retry, \
                         or send smaller batches",
                        budget.size
                    ),
                ))
            })?
            .expect("the budget semaphore is never closed");
        match held.as_mut() {
            Some(h) => h.merge(permit),
            None => held = Some(permit),
        }
        // Doubling, never past the announced length: the buffer stays
        // within twice the bytes received.
        let need = body.len() + n;
        if body.capacity() < need {
            let target = (body.capacity() * 2).clamp(need, len);
            body.reserve_exact(target - body.len());
        }
        body.extend_from_slice(&chunk.bytes);
    }
    Ok((body, held))
}

/// Fills `body[from..]` from `recv`; `expected` is the whole body's
/// length, for the error when the stream ends early.
async fn fill(recv: &mut quinn::RecvStream, body: &mut [u8], from: usize, expected: usize) -> Result<(), FrameError> {
    let mut got = from;
    while got < body.len() {
        let n = AsyncReadExt::read(recv, &mut body[got..])
            .await
            .map_err(FrameError::Io)?;
        if n == 0 {
            return Err(FrameError::Truncated { got, expected });
        }
        got += n;
    }
    Ok(())
}

async fn stream<D: Dispatch>(
    conn: &Conn,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    dispatch: &D,
    budget: &Budget,
) {
    let peer = conn.peer;
    let read = async {
        let len = frame::read_header(&mut recv, limits::MAX_FRAME_BYTES).await?;
        read_body(conn, &mut recv, len, dispatch, budget).await
    };
    let (body, _permit) = match tokio::time::timeout(READ_DEADLINE, read).await {
        Ok(Ok((body, permit))) => (Ok(body), permit),
        Ok(Err(ReadError::Frame(e))) => (Err(frame_error(e, &mut recv)), None),
        Ok(Err(ReadError::Refused(e))) => {
            // Stop the sender instead of draining bytes we will not use.
            let _ = recv.stop(0u32.into());
            (Err(e), None)
        }
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
