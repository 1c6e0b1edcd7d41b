//! A running node: wires config, storage, TLS and the QUIC server together.
//!
//! This is the one place that knows every layer. [`start`] returns once the
//! node listens (so callers and tests can connect at once); [`NodeHandle`]
//! stops it: the shutdown token ends every accept loop, in-flight requests
//! finish, the endpoint closes with an application code and waits idle.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use edgevec_client::tls::TlsError;
use edgevec_engine::{Engine, EngineError, EngineOptions};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::config::ClusterConfig;
use crate::net::{peer::PeerPool, server, tls::Identity};
use crate::service::Service;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("node {0} is not in the cluster file; ids there: {1}")]
    UnknownNode(u64, String),
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("TLS: {0} (run `edgevec certs` to create the cluster certificates)")]
    Tls(#[from] TlsError),
    #[error("storage: {0}")]
    Engine(#[from] EngineError),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
}

/// A started node.
pub struct NodeHandle {
    /// Where the node listens (the real port when the config said 0).
    pub addr: SocketAddr,
    pub peers: Arc<PeerPool>,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl NodeHandle {
    /// Stops the node and waits (bounded) until it has drained.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
    }

    /// Resolves when the node has stopped for any reason.
    pub async fn stopped(&mut self) {
        let _ = (&mut self.task).await;
    }

    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }
}

/// Starts node `id` of `cluster` and returns once it listens.
pub async fn start(cluster: &ClusterConfig, id: u64) -> Result<NodeHandle, NodeError> {
    let node = cluster.node(id).cloned().ok_or_else(|| {
        NodeError::UnknownNode(
            id,
            cluster
                .nodes
                .iter()
                .map(|n| n.id.to_string())
                .collect::<Vec<_>>()
                .join(", "),
        )
    })?;
    for w in &cluster.warnings {
        tracing::warn!("{}: {w}", cluster.path.display());
    }
    std::fs::create_dir_all(&node.data_dir).map_err(|source| NodeError::DataDir {
        path: node.data_dir.clone(),
        source,
    })?;
    let identity = Identity::load(&cluster.cert_paths(), id)?;
    let server_config = identity.server_config()?;

    let dir = node.data_dir.join("engine");
    let engine = tokio::task::spawn_blocking(move || Engine::open(&dir, EngineOptions::default()))
        .await
        .expect("engine open task does not panic")?;
    let engine = Arc::new(engine);

    let mut endpoint = quinn::Endpoint::server(server_config, node.addr).map_err(|source| NodeError::Bind {
        addr: node.addr,
        source,
    })?;
    endpoint.set_default_client_config(identity.peer_client_config()?);
    let addr = endpoint.local_addr().map_err(|source| NodeError::Bind {
        addr: node.addr,
        source,
    })?;
    let peers = Arc::new(PeerPool::new(endpoint.clone()));

    let service = Arc::new(Service::new(engine, cluster, node.clone()));
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(server::serve(endpoint.clone(), service, shutdown.clone()));
    let task = tokio::spawn(async move {
        let _ = task.await;
        endpoint.wait_idle().await;
    });
    info!(node = id, %addr, zone = %node.zone, "listening");
    Ok(NodeHandle {
        addr,
        peers,
        shutdown,
        task,
    })
}
