//! Calls to other nodes over the node ALPN.
//!
//! One pooled connection per peer address, opened on first use and replaced
//! when it dies or falls silent; each call is a fresh stream on it.
//!
//! A call that times out drops the pooled connection only when the peer
//! sent nothing on it while the call waited: a slow answer from a live
//! peer (its QUIC stack acknowledged the request) is not a dead
//! connection, and dialing again would only add a handshake to a busy
//! machine. A peer that restarted answers nothing on the old connection
//! (its keys are gone), so the next call dials it afresh.
//!
//! A dial runs in its own task and is shared by every call that needs the
//! same peer meanwhile: a caller waits for it only as long as its own
//! deadline allows, but the handshake goes on without it (bounded by the
//! dial timeout), so a handshake slower than a heartbeat's deadline on a
//! busy machine still ends in a connection the next call uses. At most one
//! dial per peer is in flight; a handshake with a dead peer never delays
//! calls to live ones.
//!
//! Fault injection (tests, `fault_injection` in cluster.toml): calls to a
//! blocked address go unanswered until their deadline, like calls across
//! a network partition; the pooled connection is dropped.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use edgevec_client::rpc::{self, CallError};
use edgevec_proto::internal::{NodeRequest, NodeResponse};
use futures::future::{BoxFuture, FutureExt, Shared};

type Dial = Shared<BoxFuture<'static, Result<quinn::Connection, CallError>>>;

/// One peer's connection, or the dial that will make it.
#[derive(Default)]
struct SlotState {
    conn: Option<quinn::Connection>,
    dialing: Option<Dial>,
}

type Slot = Arc<Mutex<SlotState>>;

pub struct PeerPool {
    endpoint: quinn::Endpoint,
    slots: Mutex<HashMap<SocketAddr, Slot>>,
    connect_timeout: Duration,
    blocked: Mutex<HashSet<SocketAddr>>,
}

impl PeerPool {
    /// `endpoint` must have the peer client config as its default.
    pub fn new(endpoint: quinn::Endpoint) -> Self {
        Self {
            endpoint,
            slots: Mutex::new(HashMap::new()),
            connect_timeout: Duration::from_secs(1),
            blocked: Mutex::new(HashSet::new()),
        }
    }

    /// Replaces the set of addresses this node cannot reach (fault
    /// injection); connections to them are closed.
    pub fn set_blocked(&self, addrs: HashSet<SocketAddr>) {
        let slots: Vec<Slot> = {
            let slots = self.slots.lock().expect("peer pool lock");
            addrs.iter().filter_map(|a| slots.get(a).cloned()).collect()
        };
        *self.blocked.lock().expect("peer pool lock") = addrs;
        for slot in slots {
            let mut state = slot.lock().expect("peer slot lock");
            if let Some(c) = state.conn.take() {
                c.close(0u32.into(), b"partitioned");
            }
            state.dialing = None;
        }
    }

    fn is_blocked(&self, addr: SocketAddr) -> bool {
        self.blocked.lock().expect("peer pool lock").contains(&addr)
    }

    fn slot(&self, addr: SocketAddr) -> Slot {
        self.slots
            .lock()
            .expect("peer pool lock")
            .entry(addr)
            .or_default()
            .clone()
    }

    /// The live connection to `addr`, or the dial in flight to it (started
    /// here if there is none).
    fn connection(&self, addr: SocketAddr) -> Dial {
        let slot = self.slot(addr);
        let mut state = slot.lock().expect("peer slot lock");
        if let Some(c) = state.conn.as_ref() {
            if c.close_reason().is_none() {
                return futures::future::ready(Ok(c.clone())).boxed().shared();
            }
            state.conn = None;
        }
        if let Some(dial) = state.dialing.as_ref() {
            return dial.clone();
        }
        let connecting = self.endpoint.connect(addr, &edgevec_client::tls::server_name(&addr));
        let (limit, owner) = (self.connect_timeout, slot.clone());
        let task = tokio::spawn(async move {
            let result = match connecting {
                Err(e) => Err(CallError::Connection(e.to_string())),
                Ok(connecting) => match tokio::time::timeout(limit, connecting).await {
                    Err(_) => Err(CallError::Timeout(limit)),
                    Ok(r) => r.map_err(|e| CallError::Connection(e.to_string())),
                },
            };
            let mut state = owner.lock().expect("peer slot lock");
            state.dialing = None;
            if let Ok(c) = &result {
                state.conn = Some(c.clone());
            }
            result
        });
        let dial = async move {
            task.await
                .unwrap_or_else(|e| Err(CallError::Connection(format!("dial task failed: {e}"))))
        }
        .boxed()
        .shared();
        state.dialing = Some(dial.clone());
        dial
    }

    /// Sends one request to the node at `addr`.
    pub async fn call(
        &self,
        addr: SocketAddr,
        req: &NodeRequest,
        timeout: Duration,
    ) -> Result<NodeResponse, CallError> {
        if self.is_blocked(addr) {
            tokio::time::sleep(timeout).await;
            return Err(CallError::Timeout(timeout));
        }
        // The whole call, dial included, within `timeout`: a caller never
        // waits behind another's handshake with a dead peer for longer.
        let started = tokio::time::Instant::now();
        let conn = match tokio::time::timeout(timeout, self.connection(addr)).await {
            Ok(c) => c?,
            Err(_) => return Err(CallError::Timeout(timeout)),
        };
        let left = timeout.saturating_sub(started.elapsed());
        if left.is_zero() {
            return Err(CallError::Timeout(timeout));
        }
        let heard = conn.stats().udp_rx.datagrams;
        let result = rpc::call(&conn, req, left).await;
        let dead = match &result {
            Err(CallError::Connection(_)) => true,
            // Silent while the call waited: gone without the QUIC idle
            // timeout having noticed yet (restarted, or partitioned).
            Err(CallError::Timeout(_)) => conn.stats().udp_rx.datagrams == heard,
            _ => false,
        };
        if dead {
            // Dial afresh next time (unless another call has replaced the
            // connection already).
            let slot = self.slot(addr);
            let mut state = slot.lock().expect("peer slot lock");
            if state.conn.as_ref().is_some_and(|c| c.stable_id() == conn.stable_id()) {
                state.conn = None;
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    use edgevec_proto::internal::{NodeOpV1, NodeReplyV1};
    use edgevec_proto::{codec, frame, limits};

    use super::*;
    use crate::certs::{self, CertPaths, NodeName};
    use crate::net::tls::Identity;

    /// A peer that answers every ping after `delay` ms, while its QUIC
    /// stack acknowledges the request at once (a live but slow node).
    async fn slow_peer(paths: &CertPaths, delay: Arc<AtomicU64>) -> quinn::Endpoint {
        let identity = Identity::load(paths, 2).unwrap();
        let server =
            edgevec_client::tls::endpoint("127.0.0.1:0".parse().unwrap(), Some(identity.server_config().unwrap()))
                .unwrap();
        serve_pings(server.clone(), delay);
        server
    }

    /// Answers every ping on `server` after `delay` ms.
    fn serve_pings(accept: quinn::Endpoint, delay: Arc<AtomicU64>) {
        tokio::spawn(async move {
            while let Some(incoming) = accept.accept().await {
                let delay = delay.clone();
                tokio::spawn(async move {
                    let Ok(conn) = incoming.await else { return };
                    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                        let delay = delay.clone();
                        tokio::spawn(async move {
                            let _ = frame::read_frame(&mut recv, limits::MAX_FRAME_BYTES).await;
                            tokio::time::sleep(Duration::from_millis(delay.load(Ordering::SeqCst))).await;
                            let reply = NodeResponse::V1(Ok(NodeReplyV1::Pong { node_id: 2 }));
                            let _ = frame::write_frame(&mut send, &codec::encode(&reply)).await;
                            let _ = send.finish();
                            let _ = send.stopped().await;
                        });
                    }
                });
            }
        });
    }

    /// Node 2's endpoint answering pings at `addr`, with its stateless-reset
    /// secret (`same_secret`) or a random one, on a runtime of its own:
    /// shutting that runtime down stops it without a word, as kill -9
    /// would. Binding retries while the address is still taken.
    fn crashable_peer(paths: &CertPaths, addr: SocketAddr, same_secret: bool) -> (tokio::runtime::Runtime, SocketAddr) {
        let paths = paths.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            let addr = rt.block_on(async move {
                let identity = Identity::load(&paths, 2).unwrap();
                let config = identity.server_config().unwrap();
                let deadline = std::time::Instant::now() + Duration::from_secs(10);
                let server = loop {
                    let bound = if same_secret {
                        edgevec_client::tls::endpoint_with_reset_secret(
                            addr,
                            Some(config.clone()),
                            &identity.reset_secret(),
                        )
                    } else {
                        edgevec_client::tls::endpoint(addr, Some(config.clone()))
                    };
                    match bound {
                        Ok(e) => break e,
                        Err(_) if std::time::Instant::now() < deadline => {
                            tokio::time::sleep(Duration::from_millis(50)).await
                        }
                        Err(e) => panic!("binding {addr}: {e}"),
                    }
                };
                let at = server.local_addr().unwrap();
                serve_pings(server, Arc::new(AtomicU64::new(0)));
                at
            });
            (rt, addr)
        })
        .join()
        .unwrap()
    }

    /// A node that restarts on its address with its key answers a packet
    /// of the old connection with a stateless reset its peer recognises:
    /// the pooled connection ends as reset, not at the idle timeout, and
    /// the next call reaches the new process. With a reset key drawn at
    /// random (what a node had before), the old connection only times out.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_restarted_peer_resets_the_old_connection() {
        let dir = tempfile::tempdir().unwrap();
        let paths = two_nodes(dir.path());
        let pool = node_1_pool(&paths);
        let ping = NodeRequest::V1(NodeOpV1::Ping { from: 1 });

        for same_secret in [true, false] {
            let (old, addr) = crashable_peer(&paths, "127.0.0.1:0".parse().unwrap(), same_secret);
            pool.call(addr, &ping, Duration::from_secs(5)).await.unwrap();
            let conn = pool
                .slot(addr)
                .lock()
                .unwrap()
                .conn
                .clone()
                .expect("a pooled connection");
            old.shutdown_background();
            let (new, _) = crashable_peer(&paths, addr, same_secret);

            // A packet of the old connection reaches the new process.
            let _ = pool.call(addr, &ping, Duration::from_millis(500)).await;
            let reason = tokio::time::timeout(Duration::from_secs(10), conn.closed())
                .await
                .expect("the old connection ends within the idle timeout");
            if same_secret {
                assert!(matches!(reason, quinn::ConnectionError::Reset), "{reason:?}");
            } else {
                assert!(matches!(reason, quinn::ConnectionError::TimedOut), "{reason:?}");
            }
            let reply = pool.call(addr, &ping, Duration::from_secs(5)).await.unwrap();
            assert_eq!(reply, NodeResponse::V1(Ok(NodeReplyV1::Pong { node_id: 2 })));
            new.shutdown_background();
        }
    }

    /// A UDP relay in front of `server` that drops every datagram both
    /// ways once `cut` is set (a network partition).
    async fn relay(server: SocketAddr, cut: Arc<AtomicBool>) -> SocketAddr {
        let front = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let back = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        back.connect(server).await.unwrap();
        let addr = front.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut a, mut b) = (vec![0u8; 65536], vec![0u8; 65536]);
            let mut client = None;
            loop {
                tokio::select! {
                    Ok((n, from)) = front.recv_from(&mut a) => {
                        client = Some(from);
                        if !cut.load(Ordering::SeqCst) {
                            let _ = back.send(&a[..n]).await;
                        }
                    }
                    Ok(n) = back.recv(&mut b) => {
                        if let (Some(to), false) = (client, cut.load(Ordering::SeqCst)) {
                            let _ = front.send_to(&b[..n], to).await;
                        }
                    }
                }
            }
        });
        addr
    }

    /// Certificates of a cluster of nodes 1 and 2 in `dir`.
    fn two_nodes(dir: &std::path::Path) -> CertPaths {
        let paths = CertPaths::new(dir);
        let nodes: Vec<NodeName> = (1..=2)
            .map(|id| NodeName {
                id,
                hosts: vec!["127.0.0.1".into()],
            })
            .collect();
        certs::ensure(&paths, "t", &nodes).unwrap();
        paths
    }

    /// Node 1's pool of connections to its peers.
    fn node_1_pool(paths: &CertPaths) -> PeerPool {
        let me = Identity::load(paths, 1).unwrap();
        let mut endpoint = edgevec_client::tls::endpoint("127.0.0.1:0".parse().unwrap(), None).unwrap();
        endpoint.set_default_client_config(me.peer_client_config().unwrap());
        PeerPool::new(endpoint)
    }

    fn pooled_id(pool: &PeerPool, addr: SocketAddr) -> Option<usize> {
        pool.slot(addr).lock().unwrap().conn.as_ref().map(|c| c.stable_id())
    }

    #[tokio::test]
    async fn a_slow_answer_keeps_the_connection_and_a_silent_peer_loses_it() {
        let dir = tempfile::tempdir().unwrap();
        let paths = two_nodes(dir.path());
        let delay = Arc::new(AtomicU64::new(0));
        let server = slow_peer(&paths, delay.clone()).await;
        let cut = Arc::new(AtomicBool::new(false));
        let addr = relay(server.local_addr().unwrap(), cut.clone()).await;

        let pool = node_1_pool(&paths);
        let ping = NodeRequest::V1(NodeOpV1::Ping { from: 1 });

        let reply = pool.call(addr, &ping, Duration::from_secs(5)).await.unwrap();
        assert_eq!(reply, NodeResponse::V1(Ok(NodeReplyV1::Pong { node_id: 2 })));
        let first = pooled_id(&pool, addr).expect("a pooled connection after a call");

        // Live but slow: the call times out, the connection stays.
        delay.store(1_000, Ordering::SeqCst);
        let slow = pool.call(addr, &ping, Duration::from_millis(300)).await;
        assert!(matches!(slow, Err(CallError::Timeout(_))), "{slow:?}");
        assert_eq!(pooled_id(&pool, addr), Some(first), "a slow answer cost the connection");

        // Silent (partitioned): the timed-out call drops the connection.
        cut.store(true, Ordering::SeqCst);
        let silent = pool.call(addr, &ping, Duration::from_millis(300)).await;
        assert!(matches!(silent, Err(CallError::Timeout(_))), "{silent:?}");
        assert_eq!(pooled_id(&pool, addr), None, "a silent peer kept its connection");

        // Healed: the next call dials a new connection and is answered.
        cut.store(false, Ordering::SeqCst);
        delay.store(0, Ordering::SeqCst);
        pool.call(addr, &ping, Duration::from_secs(5)).await.unwrap();
        let second = pooled_id(&pool, addr).expect("a pooled connection after the partition");
        assert_ne!(second, first);
    }
}
