//! The node's metrics registry (Prometheus): RPC counters and latency
//! histograms recorded by the service, and gauges of the metadata Raft and
//! node health read from the metadata at scrape time. `/metrics` in
//! [`crate::admin`] renders it.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::meta::Meta;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    protocol: &'static str,
    op: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    protocol: &'static str,
    op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeLabels {
    node: String,
    state: &'static str,
}

fn latency_histogram() -> Histogram {
    // 50 µs .. ~1.6 s
    Histogram::new(exponential_buckets(0.00005, 2.0, 16))
}

/// The node's metrics registry.
pub struct Metrics {
    registry: Registry,
    rpcs: Family<RpcLabels, Counter>,
    latency: Family<OpLabels, Histogram, fn() -> Histogram>,
    term: Gauge,
    leader: Gauge,
    is_leader: Gauge,
    applied: Gauge,
    last_log: Gauge,
    voters: Gauge,
    learners: Gauge,
    node_state: Family<NodeLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("edgevec");
        let rpcs = Family::<RpcLabels, Counter>::default();
        let latency = Family::<OpLabels, Histogram, fn() -> Histogram>::new_with_constructor(latency_histogram);
        let (term, leader, is_leader, applied, last_log, voters, learners) = Default::default();
        let node_state = Family::<NodeLabels, Gauge>::default();
        registry.register(
            "rpc_requests",
            "Requests served, by protocol, operation and outcome",
            rpcs.clone(),
        );
        registry.register("rpc_latency_seconds", "Time to serve a request", latency.clone());
        registry.register("raft_term", "Current metadata Raft term", Gauge::clone(&term));
        registry.register(
            "raft_leader_id",
            "Id of the metadata leader (0: none known)",
            Gauge::clone(&leader),
        );
        registry.register(
            "raft_is_leader",
            "1 if this node is the metadata leader",
            Gauge::clone(&is_leader),
        );
        registry.register(
            "raft_applied_index",
            "Last applied metadata log index",
            Gauge::clone(&applied),
        );
        registry.register(
            "raft_last_log_index",
            "Last metadata log index received",
            Gauge::clone(&last_log),
        );
        registry.register(
            "raft_voters",
            "Voters in the metadata membership",
            Gauge::clone(&voters),
        );
        registry.register(
            "raft_learners",
            "Learners in the metadata membership",
            Gauge::clone(&learners),
        );
        registry.register(
            "node_state",
            "1 for each node's current health state",
            node_state.clone(),
        );
        Metrics {
            registry,
            rpcs,
            latency,
            term,
            leader,
            is_leader,
            applied,
            last_log,
            voters,
            learners,
            node_state,
        }
    }
}

impl Metrics {
    /// Counts one served request and its latency.
    pub fn record_rpc(&self, protocol: &'static str, op: &'static str, ok: bool, took: Duration) {
        let outcome = if ok { "ok" } else { "error" };
        self.rpcs.get_or_create(&RpcLabels { protocol, op, outcome }).inc();
        self.latency
            .get_or_create(&OpLabels { protocol, op })
            .observe(took.as_secs_f64());
    }

    fn refresh(&self, meta: &Meta) {
        let m = meta.metrics();
        self.term.set(m.current_term as i64);
        self.leader.set(m.current_leader.unwrap_or(0) as i64);
        self.is_leader.set(i64::from(m.current_leader == Some(meta.node_id)));
        self.applied.set(m.last_applied.map(|l| l.index as i64).unwrap_or(-1));
        self.last_log.set(m.last_log_index.map(|i| i as i64).unwrap_or(-1));
        let membership = m.membership_config.membership();
        self.voters.set(membership.voter_ids().count() as i64);
        self.learners.set(membership.learner_ids().count() as i64);
        self.node_state.clear();
        for n in meta.state().nodes() {
            let state = crate::status::state_name(n.state);
            self.node_state
                .get_or_create(&NodeLabels {
                    node: n.id.to_string(),
                    state,
                })
                .set(1);
        }
    }

    /// Prometheus text exposition of everything, refreshed from `meta`.
    pub fn render(&self, meta: &Meta) -> String {
        self.refresh(meta);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}
