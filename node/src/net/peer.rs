//! Calls to other nodes over the node ALPN.
//!
//! One pooled connection per peer address, opened on first use and replaced
//! when it dies or stops answering; each call is a fresh stream on it.
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
        let result = rpc::call(&conn, req, left).await;
        if matches!(result, Err(CallError::Connection(_) | CallError::Timeout(_))) {
            // A peer that does not answer may be gone without the QUIC idle
            // timeout having noticed yet: dial afresh next time (unless
            // another call has replaced the connection already).
            let slot = self.slot(addr);
            let mut state = slot.lock().expect("peer slot lock");
            if state.conn.as_ref().is_some_and(|c| c.stable_id() == conn.stable_id()) {
                state.conn = None;
            }
        }
        result
    }
}
