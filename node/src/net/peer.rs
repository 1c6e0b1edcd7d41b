//! Calls to other nodes over the node ALPN.
//!
//! One pooled connection per peer address, opened on first use and replaced
//! when it dies; each call is a fresh stream on it. The pool never holds its
//! lock across a handshake with a slow peer for longer than the connect
//! deadline.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use edgevec_client::rpc::{self, CallError};
use edgevec_proto::internal::{NodeRequest, NodeResponse};
use tokio::sync::Mutex;

pub struct PeerPool {
    endpoint: quinn::Endpoint,
    conns: Mutex<HashMap<SocketAddr, quinn::Connection>>,
    connect_timeout: Duration,
}

impl PeerPool {
    /// `endpoint` must have the peer client config as its default.
    pub fn new(endpoint: quinn::Endpoint) -> Self {
        Self {
            endpoint,
            conns: Mutex::new(HashMap::new()),
            connect_timeout: Duration::from_secs(2),
        }
    }

    async fn connection(&self, addr: SocketAddr) -> Result<quinn::Connection, CallError> {
        let mut conns = self.conns.lock().await;
        if let Some(conn) = conns.get(&addr) {
            if conn.close_reason().is_none() {
                return Ok(conn.clone());
            }
        }
        let connecting = self
            .endpoint
            .connect(addr, &edgevec_client::tls::server_name(&addr))
            .map_err(|e| CallError::Connection(e.to_string()))?;
        let conn = tokio::time::timeout(self.connect_timeout, connecting)
            .await
            .map_err(|_| CallError::Timeout(self.connect_timeout))?
            .map_err(|e| CallError::Connection(e.to_string()))?;
        conns.insert(addr, conn.clone());
        Ok(conn)
    }

    /// Sends one request to the node at `addr`.
    pub async fn call(
        &self,
        addr: SocketAddr,
        req: &NodeRequest,
        timeout: Duration,
    ) -> Result<NodeResponse, CallError> {
        let conn = self.connection(addr).await?;
        let result = rpc::call(&conn, req, timeout).await;
        if matches!(result, Err(CallError::Connection(_))) {
            self.conns.lock().await.remove(&addr);
        }
        result
    }
}
