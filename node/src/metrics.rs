//! The node's metrics registry (Prometheus): RPC counters and latency
//! histograms recorded by the service, and gauges read at scrape time: the
//! metadata Raft and node health, every local shard replica (points,
//! segments by state, bytes on disk, applied LSN, damage), the index
//! builder (queued, finished, seconds spent), and the process (resident
//! memory, bytes of requests in flight). `/metrics` in [`crate::admin`]
//! renders it.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::meta::Meta;
use crate::net::server::Budget;
use crate::replication::DataPlane;

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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReplicaLabels {
    collection: String,
    collection_id: String,
    shard: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SegmentLabels {
    collection: String,
    collection_id: String,
    shard: String,
    /// `growing`, `building` (sealed, index not ready) or `indexed`.
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PluginLabels {
    plugin: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FallbackLabels {
    plugin: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReadLabels {
    collection_id: String,
    shard: String,
    node: String,
}

/// Policy plugins and the reads they routed, read at scrape time.
#[derive(Default)]
struct PluginGauges {
    version: Family<PluginLabels, Gauge>,
    calls: Family<PluginLabels, Gauge>,
    failures: Family<PluginLabels, Gauge>,
    instances: Family<PluginLabels, Gauge>,
    from_cache: Family<PluginLabels, Gauge>,
    disabled: Family<PluginLabels, Gauge>,
    fallbacks: Family<FallbackLabels, Gauge>,
    reads: Family<ReadLabels, Gauge>,
    retries: Gauge,
    retries_refused: Gauge,
    hedges: Gauge,
    attempts: Gauge,
    rescues: Gauge,
    ejections: Family<NodeIdLabels, Gauge>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeIdLabels {
    node: String,
}

impl PluginGauges {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "plugin_version",
            "Active version of each policy plugin (0: not loaded)",
            self.version.clone(),
        );
        registry.register("plugin_calls", "Calls of the active version", self.calls.clone());
        registry.register(
            "plugin_failures",
            "Calls of the active version that failed (trap, fuel, memory, bad answer)",
            self.failures.clone(),
        );
        registry.register(
            "plugin_instances",
            "Instances created of the active version (one per thread, and one after each trap)",
            self.instances.clone(),
        );
        registry.register(
            "plugin_from_cache",
            "1 when the active version was read from the compiled-artifact cache, 0 when compiled at load",
            self.from_cache.clone(),
        );
        registry.register(
            "plugin_disabled",
            "1 while a plugin's circuit breaker keeps it out",
            self.disabled.clone(),
        );
        registry.register(
            "plugin_fallbacks",
            "Decisions made by the built-in rule instead of the plugin, by reason",
            self.fallbacks.clone(),
        );
        registry.register(
            "replica_reads",
            "Reads this node routed to each replica, by collection id, shard and node",
            self.reads.clone(),
        );
        registry.register(
            "read_retries",
            "Attempts of reads beyond their first (and beyond the first after a metadata change) that the \
             retry budget allowed",
            self.retries.clone(),
        );
        registry.register(
            "read_retries_refused",
            "Attempts the retry budget refused (the read waited for a metadata change or the refill)",
            self.retries_refused.clone(),
        );
        registry.register(
            "read_attempts",
            "Attempts this node's reads made on replicas, hedges and retries included",
            self.attempts.clone(),
        );
        registry.register(
            "read_rescues",
            "Reads this node also sent to the next replica because the first one's node had gone silent (stalled)",
            self.rescues.clone(),
        );
        registry.register(
            "read_ejections",
            "Times this node ejected a node from first choice for reads (a transport failure or timeout)",
            self.ejections.clone(),
        );
        registry.register(
            "read_hedges",
            "Reads this node also sent to a second replica because the first was slow",
            self.hedges.clone(),
        );
    }

    fn refresh(&self, plane: &DataPlane, router: &crate::router::Router) {
        for f in [
            &self.version,
            &self.calls,
            &self.failures,
            &self.instances,
            &self.from_cache,
            &self.disabled,
        ] {
            f.clear();
        }
        self.fallbacks.clear();
        for r in plane.policies.report() {
            let l = PluginLabels { plugin: r.name.clone() };
            self.version.get_or_create(&l).set(r.version as i64);
            self.calls.get_or_create(&l).set(r.calls as i64);
            self.failures.get_or_create(&l).set(r.failures as i64);
            self.instances.get_or_create(&l).set(r.instances as i64);
            self.from_cache.get_or_create(&l).set(i64::from(r.from_cache));
            self.disabled.get_or_create(&l).set(i64::from(r.disabled.is_some()));
            for (why, n) in r.fallbacks {
                self.fallbacks
                    .get_or_create(&FallbackLabels {
                        plugin: r.name.clone(),
                        reason: why.as_str(),
                    })
                    .set(n as i64);
            }
        }
        let (retries, refused) = router.retries();
        self.retries.set(retries as i64);
        self.retries_refused.set(refused as i64);
        self.hedges.set(router.hedges() as i64);
        self.attempts.set(router.attempts() as i64);
        self.rescues.set(router.rescues() as i64);
        for (node, n) in router.ejections() {
            self.ejections
                .get_or_create(&NodeIdLabels { node: node.to_string() })
                .set(n as i64);
        }
        for ((key, node), n) in router.served() {
            self.reads
                .get_or_create(&ReadLabels {
                    collection_id: key.collection.to_string(),
                    shard: key.shard.to_string(),
                    node: node.to_string(),
                })
                .set(n as i64);
        }
    }
}

/// The gauges read from the data plane at scrape time.
#[derive(Default)]
struct DataGauges {
    points: Family<ReplicaLabels, Gauge>,
    segments: Family<SegmentLabels, Gauge>,
    disk_bytes: Family<ReplicaLabels, Gauge>,
    applied_lsn: Family<ReplicaLabels, Gauge>,
    damaged: Family<ReplicaLabels, Gauge>,
    batches_in_flight: Family<ReplicaLabels, Gauge>,
    batches_pipelined: Family<ReplicaLabels, Gauge>,
    builds_queued: Gauge,
    builds_done: Gauge,
    build_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    resident_bytes: Gauge,
    in_flight_bytes: Gauge,
}

impl DataGauges {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "replica_points",
            "Live points of a local shard replica",
            self.points.clone(),
        );
        registry.register(
            "replica_segments",
            "Segments of a local shard replica by state (growing, building, indexed)",
            self.segments.clone(),
        );
        registry.register(
            "replica_disk_bytes",
            "Bytes of a local shard replica's files on disk",
            self.disk_bytes.clone(),
        );
        registry.register(
            "replica_applied_lsn",
            "Last op applied by a local shard replica",
            self.applied_lsn.clone(),
        );
        registry.register(
            "replica_damaged",
            "1 while a local shard replica is damaged (see /readyz for why)",
            self.damaged.clone(),
        );
        registry.register(
            "replica_write_batches_in_flight",
            "Batches of writes a primary replica has between taking their LSNs and their commit",
            self.batches_in_flight.clone(),
        );
        registry.register(
            "replica_write_batches_pipelined",
            "Batches of writes a primary replica started while another was still replicating, since it opened",
            self.batches_pipelined.clone(),
        );
        registry.register(
            "index_builds_queued",
            "Index builds queued or running",
            self.builds_queued.clone(),
        );
        registry.register(
            "index_builds_finished",
            "Index builds finished since the node started",
            self.builds_done.clone(),
        );
        registry.register(
            "index_build_seconds",
            "Seconds spent in finished index builds since the node started",
            self.build_seconds.clone(),
        );
        registry.register(
            "process_resident_bytes",
            "Resident memory of the node process",
            self.resident_bytes.clone(),
        );
        registry.register(
            "requests_in_flight_bytes",
            "Bytes of request bodies the node holds now",
            self.in_flight_bytes.clone(),
        );
    }

    fn refresh(&self, plane: &DataPlane, budget: &Budget) {
        for f in [
            &self.points,
            &self.disk_bytes,
            &self.applied_lsn,
            &self.damaged,
            &self.batches_in_flight,
            &self.batches_pipelined,
        ] {
            f.clear();
        }
        self.segments.clear();
        for local in plane.locals() {
            let labels = ReplicaLabels {
                collection: local.spec.name.clone(),
                collection_id: local.key.collection.to_string(),
                shard: local.key.shard.to_string(),
            };
            let (info, segments) = local.replica.info();
            self.points.get_or_create(&labels).set(info.points as i64);
            self.applied_lsn.get_or_create(&labels).set(info.lsn as i64);
            self.disk_bytes
                .get_or_create(&labels)
                .set(local.replica.disk_bytes() as i64);
            let damaged = local.damaged.lock().expect("damaged lock").is_some();
            self.damaged.get_or_create(&labels).set(i64::from(damaged));
            let count = |n: &std::sync::atomic::AtomicU64| n.load(std::sync::atomic::Ordering::Relaxed) as i64;
            self.batches_in_flight
                .get_or_create(&labels)
                .set(count(&local.batches_in_flight));
            self.batches_pipelined
                .get_or_create(&labels)
                .set(count(&local.pipelined));
            for state in ["growing", "building", "indexed"] {
                let n = segments.iter().filter(|s| segment_state(s) == state).count();
                let labels = SegmentLabels {
                    collection: labels.collection.clone(),
                    collection_id: labels.collection_id.clone(),
                    shard: labels.shard.clone(),
                    state,
                };
                self.segments.get_or_create(&labels).set(n as i64);
            }
        }
        let (queued, done, secs) = plane.engine.index_builds();
        self.builds_queued.set(queued as i64);
        self.builds_done.set(done as i64);
        self.build_seconds.set(secs);
        self.resident_bytes.set(resident_bytes().unwrap_or(0) as i64);
        self.in_flight_bytes.set(budget.in_flight() as i64);
    }
}

fn segment_state(s: &edgevec_proto::SegmentInfo) -> &'static str {
    use edgevec_proto::{IndexState, SegmentState};
    match (s.state, s.index) {
        (SegmentState::Growing, _) => "growing",
        (_, IndexState::Ready) => "indexed",
        _ => "building",
    }
}

/// Resident memory of this process, from `/proc/self/status` (Linux).
pub fn resident_bytes() -> Option<u64> {
    process_resident_bytes("self")
}

/// Resident memory of process `pid` ("self": this one), from
/// `/proc/<pid>/status` (Linux).
pub fn process_resident_bytes(pid: &str) -> Option<u64> {
    process_status_bytes(pid, &["VmRSS"])?.first().copied()
}

/// Fields of `/proc/<pid>/status` given in kB (`VmRSS`, `RssAnon`, ...),
/// in bytes, in the order asked; `None` unless every one is there.
pub fn process_status_bytes(pid: &str, fields: &[&str]) -> Option<Vec<u64>> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    fields
        .iter()
        .map(|name| {
            let kb: u64 = status
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))?
                .split_whitespace()
                .next()?
                .parse()
                .ok()?;
            Some(kb * 1024)
        })
        .collect()
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
    data: DataGauges,
    plugins: PluginGauges,
    budget: Budget,
}

impl Metrics {
    /// A registry whose in-flight gauge reads `budget`.
    pub fn new(budget: Budget) -> Self {
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
        let data = DataGauges::default();
        data.register(&mut registry);
        let plugins = PluginGauges::default();
        plugins.register(&mut registry);
        Metrics {
            data,
            plugins,
            budget,
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

    /// Prometheus text exposition of everything, refreshed from `meta`,
    /// `plane` and `router`.
    pub fn render(&self, meta: &Meta, plane: &DataPlane, router: &crate::router::Router) -> String {
        self.refresh(meta);
        self.data.refresh(plane, &self.budget);
        self.plugins.refresh(plane, router);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn status_fields_are_read_in_bytes_and_a_missing_one_is_none() {
        let [rss, anon, file] = process_status_bytes("self", &["VmRSS", "RssAnon", "RssFile"])
            .unwrap()
            .try_into()
            .unwrap();
        assert!(anon > 0 && file > 0 && rss >= anon, "{rss} {anon} {file}");
        assert!(process_resident_bytes("self").is_some_and(|b| b > 0));
        assert_eq!(process_status_bytes("self", &["VmRSS", "NoSuchField"]), None);
        // A name is matched whole, not as the prefix of a longer one.
        assert_eq!(process_status_bytes("self", &["Vm"]), None);
    }
}
