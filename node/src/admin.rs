//! Admin HTTP: `/healthz`, `/readyz`, `/metrics` (Prometheus text format).
//!
//! `/healthz` answers while the process runs. `/readyz` answers 200 only
//! when the node is a member of the metadata cluster, knows a leader, is
//! caught up with it ([`readiness`]) and none of its replicas is damaged;
//! otherwise 503 with every reason, one per line. `/metrics`
//! reads Raft and membership state at scrape time and adds the RPC counters
//! and latency histograms the service records.
//!
//! With `fault_injection` on in cluster.toml (tests only), `PUT
//! /fault/partition` with a body of comma-separated node ids cuts this
//! node's calls to those nodes (an empty body heals); otherwise the route
//! answers 404.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, put};
use axum::Router;
use tokio_util::sync::CancellationToken;

use crate::health::Health;
use crate::meta::Meta;
use crate::metrics::Metrics;
use crate::net::peer::PeerPool;
use crate::replication::DataPlane;

#[derive(Clone)]
struct AdminState {
    meta: Meta,
    plane: Arc<DataPlane>,
    router: Arc<crate::router::Router>,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    faults: Option<Faults>,
}

/// What fault injection needs: the peer pool and every node's address.
#[derive(Clone)]
pub struct Faults {
    pub peers: Arc<PeerPool>,
    pub addrs: BTreeMap<u64, SocketAddr>,
}

/// Parses a partition request: node ids separated by commas or spaces.
fn parse_partition(body: &str, addrs: &BTreeMap<u64, SocketAddr>) -> Result<HashSet<SocketAddr>, String> {
    body.split(|c: char| c == ',' || c.is_whitespace())
        .filter(|t| !t.is_empty())
        .map(|t| {
            let id: u64 = t.parse().map_err(|_| format!("{t:?} is not a node id"))?;
            addrs
                .get(&id)
                .copied()
                .ok_or_else(|| format!("node {id} is not in cluster.toml"))
        })
        .collect()
}

async fn partition(State(s): State<AdminState>, body: String) -> impl IntoResponse {
    let Some(faults) = s.faults else {
        return (StatusCode::NOT_FOUND, "fault injection is off\n".to_string());
    };
    match parse_partition(&body, &faults.addrs) {
        Ok(blocked) => {
            tracing::warn!(blocked = ?blocked, "fault injection: calls to these nodes are cut");
            let n = blocked.len();
            faults.peers.set_blocked(blocked);
            (StatusCode::OK, format!("cut off from {n} nodes\n"))
        }
        Err(why) => (StatusCode::BAD_REQUEST, format!("{why}\n")),
    }
}

/// Whether the node is ready to serve, or why not: a member of the
/// metadata cluster that knows a leader, has applied what it received, and
/// has applied at least what the leader had applied when it last
/// acknowledged this node's heartbeat (recently).
pub fn readiness(meta: &Meta, health: &Health) -> Result<(), String> {
    let m = meta.metrics();
    if m.membership_config.membership().get_node(&meta.node_id).is_none() {
        return Err("not a member of the metadata cluster yet".into());
    }
    let Some(leader) = m.current_leader else {
        return Err("no metadata leader known".into());
    };
    let applied = m.last_applied.map(|l| l.index);
    if applied < m.last_log_index {
        return Err(format!(
            "applying metadata: applied {applied:?} of {:?}",
            m.last_log_index
        ));
    }
    if leader != meta.node_id {
        let Some(leader_applied) = health.leader_applied_within(health.settings().suspect_after) else {
            return Err(format!("no heartbeat acknowledged by leader {leader} recently"));
        };
        if applied < leader_applied {
            return Err(format!(
                "catching up with leader {leader}: applied {applied:?}, leader had {leader_applied:?}"
            ));
        }
    }
    Ok(())
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(s): State<AdminState>) -> impl IntoResponse {
    let mut problems: Vec<String> = readiness(&s.meta, &s.health).err().into_iter().collect();
    problems.extend(s.plane.problems());
    if problems.is_empty() {
        (StatusCode::OK, "ready\n".to_string())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", problems.join("\n")),
        )
    }
}

async fn metrics_page(State(s): State<AdminState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.render(&s.meta, &s.plane, &s.router),
    )
}

/// Binds the admin listener; serve it with the returned future.
pub async fn bind(
    addr: SocketAddr,
    parts: crate::service::Parts,
    faults: Option<Faults>,
    shutdown: CancellationToken,
) -> std::io::Result<(SocketAddr, impl std::future::Future<Output = ()>)> {
    let crate::service::Parts {
        meta,
        health,
        plane,
        router,
        metrics,
        ..
    } = parts;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_page))
        .route("/fault/partition", put(partition))
        .with_state(AdminState {
            meta,
            plane,
            router,
            health,
            metrics,
            faults,
        });
    let serve = async move {
        let result = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, "admin server stopped");
        }
    };
    Ok((local, serve))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_requests_name_known_nodes() {
        let addrs: BTreeMap<u64, SocketAddr> =
            [(1, "127.0.0.1:1".parse().unwrap()), (2, "127.0.0.1:2".parse().unwrap())]
                .into_iter()
                .collect();
        assert_eq!(parse_partition("", &addrs).unwrap().len(), 0);
        assert_eq!(parse_partition("1, 2\n", &addrs).unwrap().len(), 2);
        assert!(parse_partition("3", &addrs).unwrap_err().contains("node 3"));
        assert!(parse_partition("x", &addrs).unwrap_err().contains("\"x\""));
    }
}
