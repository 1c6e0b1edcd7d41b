//! Calls to other nodes over the node ALPN.
//!
//! One pooled connection per peer address, opened on first use and replaced
//! when it dies or stops answering; each call is a fresh stream on it.
//! Each address has its own slot lock, so a handshake with a dead peer never
//! delays calls to live ones.
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

type Slot = Arc<tokio::sync::Mutex<Option<quinn::Connection>>>;

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
            if let Ok(mut held) = slot.try_lock() {
                if let Some(c) = held.take() {
                    c.close(0u32.into(), b"partitioned");
                }
            }
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

    async fn connection(&self, addr: SocketAddr) -> Result<quinn::Connection, CallError> {
        let slot = self.slot(addr);
        let mut conn = slot.lock().await;
        if let Some(c) = conn.as_ref() {
            if c.close_reason().is_none() {
                return Ok(c.clone());
            }
        }
        let connecting = self
            .endpoint
            .connect(addr, &edgevec_client::tls::server_name(&addr))
            .map_err(|e| CallError::Connection(e.to_string()))?;
        let c = tokio::time::timeout(self.connect_timeout, connecting)
            .await
            .map_err(|_| CallError::Timeout(self.connect_timeout))?
            .map_err(|e| CallError::Connection(e.to_string()))?;
        *conn = Some(c.clone());
        Ok(c)
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
            // timeout having noticed yet: dial afresh next time. A slot held
            // by another call is being redialled already: never wait for it
            // (a handshake with a dead peer holds it for the dial timeout).
            let slot = self.slot(addr);
            let held = slot.try_lock();
            if let Ok(mut held) = held {
                if held.as_ref().is_some_and(|c| c.stable_id() == conn.stable_id()) {
                    *held = None;
                }
            }
        }
        result
    }
}
