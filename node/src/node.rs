//! A running node: wires config, storage, TLS and the QUIC server together.
//!
//! This is the one place that knows every layer. [`start`] returns once the
//! node listens (so callers and tests can connect at once); [`NodeHandle`]
//! stops it: the shutdown token ends every accept loop, in-flight requests
//! finish, Raft shuts down, the endpoint closes with an application code
//! and waits idle.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use edgevec_client::tls::TlsError;
use edgevec_engine::{Engine, EngineError, EngineOptions};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

use crate::admin;
use crate::config::{ClusterConfig, NodeConfig};
use crate::health::Health;
use crate::meta::{Meta, MetaError};
use crate::metrics::Metrics;
use crate::net::{peer::PeerPool, server, tls::Identity};
use crate::policy::registry::Policies;
use crate::policy::{HostInputs, PolicyEngine};
use crate::replication::{DataPlane, PlaneParts};
use crate::service::{Parts, Service};

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
    #[error("metadata: {0}")]
    Meta(#[from] MetaError),
    #[error("policy plugins: {0}")]
    Plugins(#[from] crate::policy::PluginError),
}

/// What every plugin is told at `configure`: the zones of the cluster
/// file, sorted (a zone id is an index into that list), and the standard
/// consistency levels.
pub fn plugin_configuration(cluster: &ClusterConfig) -> edgevec_policy::Configuration {
    let mut zones: Vec<&str> = cluster.nodes.iter().map(|n| n.zone.as_str()).collect();
    zones.sort_unstable();
    zones.dedup();
    edgevec_policy::Configuration::with_zones(&zones)
}

/// A started node.
pub struct NodeHandle {
    /// Where the node listens (the real port when the config said 0).
    pub addr: SocketAddr,
    /// Where the admin HTTP listens, if configured.
    pub admin_addr: Option<SocketAddr>,
    pub meta: Meta,
    pub peers: Arc<PeerPool>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl NodeHandle {
    /// Stops the node and waits (bounded) until it has drained.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.meta.raft.shutdown()).await;
        self.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.tasks.wait()).await;
    }

    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Resolves, with the reason, once the metadata Raft has stopped on an
    /// error (openraft stops for good when its storage fails, a full disk
    /// under the Raft log for instance): the node cannot take part in the
    /// cluster any more and should exit, to be started again.
    pub async fn fatal(&self) -> String {
        let mut rx = self.meta.raft.metrics();
        loop {
            if let Err(e) = &rx.borrow_and_update().running_state {
                return e.to_string();
            }
            if rx.changed().await.is_err() {
                return "the metadata Raft stopped".into();
            }
        }
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
    start_node(cluster, node).await
}

/// Starts a node described by `node`, which may be absent from the cluster
/// file (a node added at runtime: it never initialises the cluster, it waits
/// for `edgevec node add`).
pub async fn start_node(cluster: &ClusterConfig, node: NodeConfig) -> Result<NodeHandle, NodeError> {
    let id = node.id;
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
    let options = EngineOptions {
        oplog_retain_bytes: cluster.oplog_retain_bytes,
        oplog_retain_percent: cluster.oplog_retain_percent,
        oplog_hold_bytes: cluster.oplog_hold_bytes,
    };
    let engine = tokio::task::spawn_blocking(move || Engine::open(&dir, options))
        .await
        .expect("engine open task does not panic")?;
    let engine = Arc::new(engine);

    let mut endpoint =
        edgevec_client::tls::endpoint_with_reset_secret(node.addr, Some(server_config), &identity.reset_secret())
            .map_err(|source| NodeError::Bind {
                addr: node.addr,
                source,
            })?;
    endpoint.set_default_client_config(identity.peer_client_config()?);
    let addr = endpoint.local_addr().map_err(|source| NodeError::Bind {
        addr: node.addr,
        source,
    })?;
    let peers = Arc::new(PeerPool::new(endpoint.clone()));

    let meta = Meta::start(cluster, &node, peers.clone()).await?;
    let health = Health::new(meta.clone(), node.clone(), cluster.clone(), peers.clone());
    let shutdown = CancellationToken::new();
    let tasks = TaskTracker::new();
    // Shard exports in flight are temporary: what a crash left is useless.
    let transfers = node.data_dir.join("transfers");
    let _ = std::fs::remove_dir_all(&transfers);
    std::fs::create_dir_all(&transfers).map_err(|source| NodeError::DataDir {
        path: transfers.clone(),
        source,
    })?;
    crate::faults::announce();
    let policies = Policies::new(
        PolicyEngine::new(HostInputs::Live)?
            .with_cache(&node.data_dir.join("plugins").join("compiled"))?
            .with_compiler(crate::policy::compile::compiler()),
    );
    policies.set_configuration(plugin_configuration(cluster));
    // Collections balance with round-robin unless they say otherwise,
    // and reads are `bounded` unless they ask for another level: those two
    // load first.
    policies.load_builtins(&["round-robin", "bounded"]);
    let plane = DataPlane::new(PlaneParts {
        me: id,
        engine,
        meta: meta.clone(),
        peers: peers.clone(),
        transfers,
        shutdown: shutdown.clone(),
        tasks: tasks.clone(),
        policies,
    });
    let budget = server::Budget::new(cluster.request_budget_bytes);
    let metrics = Arc::new(Metrics::new(budget.clone()));
    let router = Arc::new(crate::router::Router::new(plane.clone()));
    let blobs = node.data_dir.join("plugins").join("blobs");
    let store = crate::policy::store::BlobStore::open(&blobs).map_err(|e| match e {
        crate::policy::store::StoreError::Io { path, source } => NodeError::DataDir { path, source },
        other => NodeError::Plugins(crate::policy::PluginError::Internal(other.to_string())),
    })?;
    let deployer = crate::deploy::Deployer::new(plane.clone(), store);
    let parts = Parts {
        meta: meta.clone(),
        health: health.clone(),
        plane: plane.clone(),
        router: router.clone(),
        deployer: deployer.clone(),
        metrics: metrics.clone(),
    };
    let admin_parts = parts.clone();
    let service = Arc::new(Service::new(cluster, node.clone(), parts));

    {
        let endpoint = endpoint.clone();
        let serve = server::serve(endpoint.clone(), service, budget, shutdown.clone());
        tasks.spawn(async move {
            serve.await;
            endpoint.wait_idle().await;
        });
    }
    tasks.spawn(health.clone().run(shutdown.clone()));
    tasks.spawn(plane.clone().run());
    tasks.spawn(plane.clone().run_manager());
    tasks.spawn(deployer.run());
    let admin_addr = match node.admin_addr {
        Some(a) => {
            let faults = cluster.fault_injection.then(|| admin::Faults {
                peers: peers.clone(),
                addrs: cluster.nodes.iter().map(|n| (n.id, n.addr)).collect(),
            });
            let (local, serve) = admin::bind(a, admin_parts, faults, shutdown.clone())
                .await
                .map_err(|source| NodeError::Bind { addr: a, source })?;
            tasks.spawn(serve);
            Some(local)
        }
        None => None,
    };
    info!(node = id, %addr, admin = ?admin_addr, zone = %node.zone, "listening");
    Ok(NodeHandle {
        addr,
        admin_addr,
        meta,
        peers,
        shutdown,
        tasks,
    })
}
