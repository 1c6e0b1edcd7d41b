//! The proxy: turns a client's collection-level request into per-shard
//! work on the right replicas, and merges the answers.
//!
//! - Writes are validated once here against the collection's schema,
//!   split by `shard_of(id)` and sent, shards in parallel, to each shard's
//!   primary (this node's or another's). A write that spans shards is
//!   acknowledged only when every shard has it; a partial failure says
//!   which shards and ids were not written.
//! - Reads go to one in-sync replica of every shard, in the order the
//!   collection's load-balancing plugin gives (round-robin unless the
//!   collection names another; the given order when the plugin cannot
//!   answer); a replica that fails is skipped for the next one within the
//!   same request (consistency levels come with the routing milestone).
//!   Per-shard top-k lists are merged by score.
//! - What the plugin sees of each replica's node (requests in flight,
//!   latency EWMA, recent errors, a short ejection after a failure) is this
//!   node's own experience of it ([`NodeStats`]).
//!
//! Invariant: nothing here decides replication; it reads the shard
//! configurations from this node's copy of the metadata and leaves every
//! check (term, primary, in-sync) to the replicas themselves.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edgevec_policy::{replica_words, ReplicaInfo, ReplicaState as PolicyState, RequestInfo};

use edgevec_engine::{by_shard, last_wins, validate, ShardOp};
use edgevec_meta::{CollectionRecord, ReplicaState};
use edgevec_proto::internal::{NodeOpV1, NodeReplyV1};
use edgevec_proto::replication::{ReplicaReport, ShardRead, ShardReadReply, ShardRef, WriteOp};
use edgevec_proto::{
    CollectionInfo, CollectionShards, ErrorCode, Hit, Metric, Point, PointRecord, ReplicaStatus, ShardInfo,
    ShardStatus, WireError, WriteAck,
};

use crate::replication::primary::Written;
use crate::replication::{unavailable, DataPlane};

/// Deadline of a write forwarded to a primary.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Deadline of one read of one replica.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline of a status probe of one replica.
const STATUS_TIMEOUT: Duration = Duration::from_secs(1);

pub use edgevec_meta::plugins::DEFAULT_LOAD_BALANCER;
/// How long a node that failed a read stays ejected from first choice.
const EJECT_FOR: Duration = Duration::from_secs(2);
/// The window of [`NodeStats`]' error count.
const ERROR_WINDOW: Duration = Duration::from_secs(10);

/// This node's experience of one peer as a read target.
#[derive(Debug, Default)]
struct NodeStat {
    in_flight: u64,
    /// Latency EWMA (α = 0.3) in µs, and when it was last sampled.
    ewma_us: f64,
    sampled: Option<Instant>,
    errors: VecDeque<Instant>,
    ejected_until: Option<Instant>,
}

/// Per-node read statistics, for the load balancer's inputs.
#[derive(Debug, Default)]
pub struct NodeStats(Mutex<HashMap<u64, NodeStat>>);

impl NodeStats {
    fn begin(&self, node: u64) {
        self.0.lock().expect("stats lock").entry(node).or_default().in_flight += 1;
    }

    fn end(&self, node: u64, took: Duration, ok: bool) {
        let mut all = self.0.lock().expect("stats lock");
        let s = all.entry(node).or_default();
        s.in_flight = s.in_flight.saturating_sub(1);
        let now = Instant::now();
        if ok {
            let us = took.as_secs_f64() * 1e6;
            s.ewma_us = if s.sampled.is_some() {
                0.7 * s.ewma_us + 0.3 * us
            } else {
                us
            };
            s.sampled = Some(now);
        } else {
            s.errors.push_back(now);
            s.ejected_until = Some(now + EJECT_FOR);
        }
        while s.errors.front().is_some_and(|t| now.duration_since(*t) > ERROR_WINDOW) {
            s.errors.pop_front();
        }
    }

    /// Fills the node-side fields of `info`.
    fn describe(&self, info: &mut ReplicaInfo) {
        let all = self.0.lock().expect("stats lock");
        let Some(s) = all.get(&info.node) else { return };
        let now = Instant::now();
        info.in_flight = s.in_flight;
        info.latency_us = s.sampled.map(|_| s.ewma_us.max(1.0) as u64);
        info.since_sample_ms = s.sampled.map(|t| now.duration_since(t).as_millis() as u64);
        info.errors = s
            .errors
            .iter()
            .filter(|t| now.duration_since(**t) <= ERROR_WINDOW)
            .count() as u64;
        info.ejected = s.ejected_until.is_some_and(|u| now < u);
    }
}

pub struct Router {
    plane: Arc<DataPlane>,
    /// Reads per shard so far: the load balancer's sequence number.
    sequences: Mutex<HashMap<ShardRef, u64>>,
    nodes: NodeStats,
    /// Reads served, by (shard, node).
    served: Mutex<BTreeMap<(ShardRef, u64), u64>>,
}

fn not_found(name: &str) -> WireError {
    WireError::new(ErrorCode::NotFound, format!("collection {name:?} does not exist"))
}

/// Merges per-shard hit lists (each best first) into the best `k`.
pub fn merge_hits(metric: Metric, k: usize, lists: impl IntoIterator<Item = Vec<Hit>>) -> Vec<Hit> {
    let mut all: Vec<Hit> = lists.into_iter().flatten().collect();
    let better = |a: &Hit, b: &Hit| {
        let by_score = if metric.higher_is_better() {
            b.score.total_cmp(&a.score)
        } else {
            a.score.total_cmp(&b.score)
        };
        by_score.then(a.id.cmp(&b.id))
    };
    all.sort_by(better);
    all.truncate(k);
    all
}

/// Which kind of failure of several shards the client should see: a
/// retryable one if any shard may succeed when repeated.
fn worst(errors: &[(u32, WireError)]) -> ErrorCode {
    let codes: Vec<ErrorCode> = errors.iter().map(|(_, e)| e.code).collect();
    for preferred in [ErrorCode::OutcomeUnknown, ErrorCode::Unavailable, ErrorCode::Timeout] {
        if codes.contains(&preferred) {
            return preferred;
        }
    }
    codes.first().copied().unwrap_or(ErrorCode::Internal)
}

impl Router {
    pub fn new(plane: Arc<DataPlane>) -> Self {
        Router {
            plane,
            sequences: Mutex::new(HashMap::new()),
            nodes: NodeStats::default(),
            served: Mutex::new(BTreeMap::new()),
        }
    }

    fn collection(&self, name: &str) -> Result<CollectionRecord, WireError> {
        self.plane
            .meta
            .state()
            .collection(name)
            .cloned()
            .ok_or_else(|| not_found(name))
    }

    /// Inserts or replaces points of `name`.
    pub async fn upsert(&self, name: &str, mut points: Vec<Point>) -> Result<WriteAck, WireError> {
        let rec = self.collection(name)?;
        validate::points(&rec.spec, &mut points).map_err(|e| e.to_wire())?;
        let count = points.len() as u64;
        let groups = by_shard(last_wins(points), |p| p.id, rec.spec.shards);
        let ops = groups.into_iter().map(|(s, p)| (s, WriteOp::Upsert(p))).collect();
        self.write(&rec, Some(count), ops).await
    }

    /// Deletes points of `name` by id.
    pub async fn delete(&self, name: &str, ids: Vec<u64>) -> Result<WriteAck, WireError> {
        let rec = self.collection(name)?;
        validate::ids(&ids).map_err(|e| e.to_wire())?;
        let groups = by_shard(ids, |id| *id, rec.spec.shards);
        let ops = groups.into_iter().map(|(s, ids)| (s, WriteOp::Delete(ids))).collect();
        // The ack counts the points the shards' primaries actually deleted.
        self.write(&rec, None, ops).await
    }

    /// Writes each shard's op through its primary; the ack carries `count`,
    /// or (`None`, deletes) the sum of the points the primaries deleted.
    async fn write(
        &self,
        rec: &CollectionRecord,
        count: Option<u64>,
        ops: Vec<(u32, WriteOp)>,
    ) -> Result<WriteAck, WireError> {
        let sends = ops.into_iter().map(|(shard, op)| {
            let key = ShardRef {
                collection: rec.id,
                shard,
            };
            let ids: Vec<u64> = match &op {
                WriteOp::Upsert(p) => p.iter().map(|p| p.id).collect(),
                WriteOp::Delete(ids) => ids.clone(),
            };
            async move { (shard, ids, self.shard_write(key, op).await) }
        });
        let results = futures::future::join_all(sends).await;
        let mut lsns = Vec::new();
        let mut deleted = 0;
        let mut failed = Vec::new();
        let mut unwritten = Vec::new();
        for (shard, ids, r) in results {
            match r {
                Ok(w) => {
                    lsns.push((shard, w.op.lsn));
                    deleted += w.deleted;
                }
                Err(e) => {
                    unwritten.extend(ids);
                    failed.push((shard, e));
                }
            }
        }
        if failed.is_empty() {
            return Ok(WriteAck {
                count: count.unwrap_or(deleted),
                lsns,
            });
        }
        let code = worst(&failed);
        let total = failed.len() + lsns.len();
        let reasons: Vec<String> = failed
            .iter()
            .map(|(s, e)| format!("shard {s}: {}", e.message))
            .collect();
        unwritten.sort_unstable();
        let shown: Vec<String> = unwritten.iter().take(20).map(u64::to_string).collect();
        let more = if unwritten.len() > 20 { ", ..." } else { "" };
        let written = if lsns.is_empty() {
            String::new()
        } else {
            format!(
                "; shards {} are written",
                lsns.iter().map(|(s, _)| s.to_string()).collect::<Vec<_>>().join(", ")
            )
        };
        Err(WireError::new(
            code,
            format!(
                "{} of {total} shards failed ({}){written}; ids not written ({}): [{}{more}]",
                failed.len(),
                reasons.join("; "),
                unwritten.len(),
                shown.join(", ")
            ),
        ))
    }

    /// Sends one shard's write to its primary.
    async fn shard_write(&self, key: ShardRef, op: WriteOp) -> Result<Written, WireError> {
        let (cfg, _) = self
            .plane
            .config_of(key)
            .ok_or_else(|| unavailable(format!("{key} has no configuration yet; retry")))?;
        let Some(primary) = cfg.primary else {
            return Err(unavailable(format!("{key} has no primary (failing over); retry")));
        };
        if primary == self.plane.me {
            return self.on_shard_write(key, op).await;
        }
        // What a primary of an older version, which does not count, is
        // taken to have deleted: every id sent.
        let sent = match &op {
            WriteOp::Delete(ids) => ids.len() as u64,
            WriteOp::Upsert(_) => 0,
        };
        let call = self
            .plane
            .call(primary, NodeOpV1::ShardWrite { shard: key, op }, WRITE_TIMEOUT);
        // A primary that died does not answer until QUIC gives up on it;
        // once the metadata names another primary, stop waiting for it.
        let reply = tokio::select! {
            r = call => r?,
            () = self.primary_replaced(key, cfg.term) => {
                return Err(WireError::new(
                    ErrorCode::OutcomeUnknown,
                    format!("{key}: the primary changed while the write was in flight; retry"),
                ))
            }
        };
        match reply {
            NodeReplyV1::ShardCommitted { op, deleted } => Ok(Written { op, deleted }),
            NodeReplyV1::ShardWritten { op } => Ok(Written { op, deleted: sent }),
            other => Err(WireError::new(
                ErrorCode::Internal,
                format!("unexpected reply {other:?}"),
            )),
        }
    }

    /// Resolves once the metadata gives `key` a term other than `term`.
    async fn primary_replaced(&self, key: ShardRef, term: u64) {
        let mut rx = self.plane.meta.subscribe();
        loop {
            if self.plane.config_of(key).is_none_or(|(c, _)| c.term != term) {
                return;
            }
            if rx.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    /// A shard write arriving at this node as the shard's primary.
    pub async fn on_shard_write(&self, key: ShardRef, op: WriteOp) -> Result<Written, WireError> {
        let local = self
            .plane
            .local(key)
            .ok_or_else(|| unavailable(format!("node {} has no replica of {key} yet; retry", self.plane.me)))?;
        let op = match op {
            WriteOp::Upsert(points) => ShardOp::Upsert(points),
            WriteOp::Delete(ids) => ShardOp::Delete(ids),
        };
        self.plane.primary_write(&local, op).await
    }

    /// Reads one shard from one in-sync replica, moving to the next one on
    /// failure.
    async fn read_shard(&self, key: ShardRef, req: ShardRead) -> Result<ShardReadReply, WireError> {
        let (cfg, _) = self
            .plane
            .config_of(key)
            .ok_or_else(|| unavailable(format!("{key} has no configuration yet; retry")))?;
        let mut candidates = cfg.in_sync();
        if candidates.is_empty() {
            // Rare, and the person who meets it wants to know why.
            let rec = self.plane.meta.state().collection_by_id(key.collection).cloned();
            let why = match rec {
                Some(rec) => self.shard_status(&rec, key).await.problems.join("; "),
                None => "the collection was dropped".into(),
            };
            return Err(unavailable(format!("{key} has no in-sync replica: {why}")));
        }
        candidates.truncate(edgevec_policy::layout::MAX_REPLICAS);
        let order = self.balance(key, &cfg, &candidates);
        let mut errors = Vec::new();
        for i in order {
            let node = candidates[i];
            self.nodes.begin(node);
            let started = Instant::now();
            let r = self.plane.read_on(node, req.clone(), READ_TIMEOUT).await;
            self.nodes.end(node, started.elapsed(), r.is_ok());
            match r {
                Ok(reply) => {
                    *self.served.lock().expect("served lock").entry((key, node)).or_insert(0) += 1;
                    return Ok(reply);
                }
                Err(e) => errors.push(format!("node {node}: {}", e.message)),
            }
        }
        Err(unavailable(format!(
            "no in-sync replica of {key} answered ({})",
            errors.join("; ")
        )))
    }

    /// The order to try `candidates` (nodes of in-sync replicas of `key`)
    /// in, from the collection's load balancer.
    fn balance(&self, key: ShardRef, cfg: &edgevec_meta::ShardConfig, candidates: &[u64]) -> Vec<usize> {
        let state = self.plane.meta.state();
        let sequence = {
            let mut seqs = self.sequences.lock().expect("sequence lock");
            let s = seqs.entry(key).or_insert(0);
            *s += 1;
            *s - 1
        };
        let config = self.plane.policies.configuration();
        let zone_of = |node: u64| {
            state
                .nodes()
                .find(|n| n.id == node)
                .and_then(|n| config.zone_id(&n.zone))
        };
        let infos: Vec<ReplicaInfo> = candidates
            .iter()
            .map(|&node| {
                let mut info = ReplicaInfo::new(node);
                info.zone = zone_of(node);
                info.primary = cfg.primary == Some(node);
                info.state = PolicyState::InSync;
                info.term = cfg.term;
                info.applied = (0, 0);
                info.report_age_ms = edgevec_policy::layout::NONE;
                self.nodes.describe(&mut info);
                info
            })
            .collect();
        let request = RequestInfo {
            collection: key.collection,
            shard: key.shard,
            // The client reached this node: its zone is the client's.
            client_zone: zone_of(self.plane.me),
            level: edgevec_policy::layout::EVENTUALLY,
            deadline_ms: READ_TIMEOUT.as_millis() as u64,
            tried: 0,
            sequence,
        };
        let lb = state.load_balancer_of(key.collection);
        let (order, _) = self
            .plane
            .policies
            .order(lb, &request.words(), &replica_words(&infos), infos.len());
        order
    }

    /// The policy plugins of this node and their state.
    pub fn local_plugins(&self) -> Vec<edgevec_proto::PluginNodeState> {
        self.plane
            .policies
            .report()
            .into_iter()
            .map(|r| {
                let state = if r.disabled.is_some() {
                    "disabled"
                } else if r.version > 0 {
                    "loaded"
                } else if r.load_error.is_some() {
                    "failed"
                } else {
                    "loading"
                };
                edgevec_proto::PluginNodeState {
                    node: self.plane.me,
                    name: r.name,
                    kind: match r.kind {
                        Some(crate::policy::Kind::LoadBalancer) => "load-balancer".into(),
                        Some(crate::policy::Kind::Consistency) => "consistency".into(),
                        None => String::new(),
                    },
                    version: r.version,
                    origin: r.origin,
                    sha256: r.sha256,
                    size: r.size,
                    state: state.into(),
                    from_cache: r.from_cache,
                    calls: r.calls,
                    failures: r.failures,
                    fallbacks: r.fallbacks.iter().map(|(_, n)| n).sum(),
                    reason: r.disabled.or(r.load_error).or(r.last_failure),
                }
            })
            .collect()
    }

    /// Every plugin with its state on every node (a node that does not
    /// answer within a second is shown `unreachable`), and the collections
    /// whose reads it decides.
    pub async fn plugins(&self) -> Vec<edgevec_proto::PluginInfo> {
        let state = self.plane.meta.state();
        let others: Vec<u64> = state.nodes().map(|n| n.id).filter(|id| *id != self.plane.me).collect();
        let calls = others.iter().map(|&node| async move {
            let r = self.plane.call(node, NodeOpV1::PluginStatus, STATUS_TIMEOUT).await;
            (node, r)
        });
        let mut per_node: Vec<(u64, Result<Vec<edgevec_proto::PluginNodeState>, String>)> =
            vec![(self.plane.me, Ok(self.local_plugins()))];
        for (node, r) in futures::future::join_all(calls).await {
            per_node.push((
                node,
                match r {
                    Ok(NodeReplyV1::PluginStatus(p)) => Ok(p),
                    Ok(other) => Err(format!("unexpected reply {other:?}")),
                    Err(e) => Err(e.message),
                },
            ));
        }
        per_node.sort_by_key(|(n, _)| *n);
        let mut out: BTreeMap<String, edgevec_proto::PluginInfo> = BTreeMap::new();
        for (_, r) in &per_node {
            for p in r.iter().flatten() {
                let info = out.entry(p.name.clone()).or_insert_with(|| edgevec_proto::PluginInfo {
                    name: p.name.clone(),
                    kind: String::new(),
                    version: 0,
                    origin: String::new(),
                    sha256: String::new(),
                    size: 0,
                    collections: Vec::new(),
                    nodes: Vec::new(),
                });
                // The newest version any node runs describes the plugin.
                if p.version > info.version || info.kind.is_empty() {
                    info.kind = p.kind.clone();
                    info.version = p.version;
                    info.origin = p.origin.clone();
                    info.sha256 = p.sha256.clone();
                    info.size = p.size;
                }
                info.nodes.push(p.clone());
            }
        }
        for info in out.values_mut() {
            for (node, r) in &per_node {
                if let Err(e) = r {
                    info.nodes.push(edgevec_proto::PluginNodeState {
                        node: *node,
                        name: info.name.clone(),
                        kind: String::new(),
                        version: 0,
                        origin: String::new(),
                        sha256: String::new(),
                        size: 0,
                        state: "unreachable".into(),
                        from_cache: false,
                        calls: 0,
                        failures: 0,
                        fallbacks: 0,
                        reason: Some(e.clone()),
                    });
                }
            }
            info.nodes.sort_by_key(|n| n.node);
            info.collections = state
                .collections()
                .filter(|c| state.load_balancer_of(c.id) == info.name)
                .map(|c| c.spec.name.clone())
                .collect();
        }
        out.into_values().collect()
    }

    /// Reads served so far through this node, by (shard, node).
    pub fn served(&self) -> Vec<((ShardRef, u64), u64)> {
        self.served
            .lock()
            .expect("served lock")
            .iter()
            .map(|(k, v)| (*k, *v))
            .collect()
    }

    /// Up to `k` hits per query over every shard of `name`.
    pub async fn search(
        &self,
        name: &str,
        queries: Vec<Vec<f32>>,
        k: u32,
        with_payload: bool,
    ) -> Result<Vec<Vec<Hit>>, WireError> {
        let rec = self.collection(name)?;
        let queries = validate::search(&rec.spec, &queries, k).map_err(|e| e.to_wire())?;
        let reads = (0..rec.spec.shards).map(|shard| {
            let key = ShardRef {
                collection: rec.id,
                shard,
            };
            let req = ShardRead::Search {
                shard: key,
                queries: queries.clone(),
                k,
                with_payload,
            };
            self.read_shard(key, req)
        });
        let mut per_query: Vec<Vec<Vec<Hit>>> = vec![Vec::new(); queries.len()];
        for reply in futures::future::join_all(reads).await {
            match reply? {
                ShardReadReply::Hits(lists) => {
                    for (q, hits) in lists.into_iter().enumerate().take(per_query.len()) {
                        per_query[q].push(hits);
                    }
                }
                other => {
                    return Err(WireError::new(
                        ErrorCode::Internal,
                        format!("unexpected reply {other:?}"),
                    ))
                }
            }
        }
        Ok(per_query
            .into_iter()
            .map(|lists| merge_hits(rec.spec.metric, k as usize, lists))
            .collect())
    }

    /// The points found among `ids`, in request order.
    pub async fn get(&self, name: &str, ids: Vec<u64>) -> Result<Vec<PointRecord>, WireError> {
        let rec = self.collection(name)?;
        validate::ids(&ids).map_err(|e| e.to_wire())?;
        let groups = by_shard(ids.clone(), |id| *id, rec.spec.shards);
        let reads = groups.into_iter().map(|(shard, ids)| {
            let key = ShardRef {
                collection: rec.id,
                shard,
            };
            self.read_shard(key, ShardRead::Get { shard: key, ids })
        });
        let mut found: BTreeMap<u64, PointRecord> = BTreeMap::new();
        for reply in futures::future::join_all(reads).await {
            match reply? {
                ShardReadReply::Points(points) => found.extend(points.into_iter().map(|p| (p.id, p))),
                other => {
                    return Err(WireError::new(
                        ErrorCode::Internal,
                        format!("unexpected reply {other:?}"),
                    ))
                }
            }
        }
        Ok(ids.iter().filter_map(|id| found.remove(id)).collect())
    }

    /// Counts of `name` from one in-sync replica of every shard.
    pub async fn describe(&self, name: &str) -> Result<CollectionInfo, WireError> {
        let rec = self.collection(name)?;
        Ok(self.info(&rec).await)
    }

    /// Every collection with its counts.
    pub async fn list(&self) -> Vec<CollectionInfo> {
        let all: Vec<CollectionRecord> = self.plane.meta.state().collections().cloned().collect();
        futures::future::join_all(all.iter().map(|rec| self.info(rec))).await
    }

    /// A collection's counts; a shard no replica answers for counts 0.
    async fn info(&self, rec: &CollectionRecord) -> CollectionInfo {
        let reads = (0..rec.spec.shards).map(|shard| {
            let key = ShardRef {
                collection: rec.id,
                shard,
            };
            self.read_shard(key, ShardRead::Status { shard: key })
        });
        let mut shards = Vec::new();
        let mut segments = Vec::new();
        for (shard, reply) in futures::future::join_all(reads).await.into_iter().enumerate() {
            let report = match reply {
                Ok(ShardReadReply::Status(r)) => Some(r),
                _ => None,
            };
            shards.push(ShardInfo {
                shard: shard as u32,
                points: report.as_ref().map_or(0, |r| r.points),
                lsn: report.as_ref().map_or(0, |r| r.applied_lsn),
            });
            if let Some(r) = report {
                segments.extend(r.segments);
            }
        }
        CollectionInfo {
            spec: rec.spec.clone(),
            points: shards.iter().map(|s| s.points).sum(),
            shards,
            segments,
        }
    }

    /// Asks every replica of every shard of the named collections for its
    /// state, in parallel.
    pub async fn shards(&self, name: Option<&str>) -> Result<Vec<CollectionShards>, WireError> {
        let state = self.plane.meta.state();
        let recs: Vec<CollectionRecord> = match name {
            Some(n) => vec![state.collection(n).cloned().ok_or_else(|| not_found(n))?],
            None => state.collections().cloned().collect(),
        };
        let mut out = Vec::new();
        for rec in recs {
            let mut shards = Vec::new();
            for shard in 0..rec.spec.shards {
                let key = ShardRef {
                    collection: rec.id,
                    shard,
                };
                shards.push(self.shard_status(&rec, key).await);
            }
            out.push(CollectionShards {
                collection: rec.spec.name.clone(),
                id: rec.id,
                replicas: rec.replication.replicas,
                min_insync: rec.replication.min_insync,
                shards,
            });
        }
        Ok(out)
    }

    async fn shard_status(&self, rec: &CollectionRecord, key: ShardRef) -> ShardStatus {
        let Some(cfg) = rec.shards.get(&key.shard) else {
            return ShardStatus {
                shard: key.shard,
                version: 0,
                term: 0,
                primary: None,
                replicas: Vec::new(),
                problems: vec!["not placed yet".into()],
            };
        };
        let probes = cfg.replicas.iter().map(|r| async move {
            let report = self
                .plane
                .read_on(r.node, ShardRead::Status { shard: key }, STATUS_TIMEOUT)
                .await;
            match report {
                Ok(ShardReadReply::Status(rep)) => Some(rep),
                _ => None,
            }
        });
        let reports: Vec<Option<ReplicaReport>> = futures::future::join_all(probes).await;
        let catch_ups: BTreeMap<u64, String> = reports
            .iter()
            .flatten()
            .filter(|r| Some(r.node) == cfg.primary)
            .flat_map(|r| r.catch_ups.clone())
            .collect();
        let state = self.plane.meta.state();
        let up = |n: u64| state.node(n).is_some_and(|n| n.state == edgevec_meta::NodeState::Up);
        let replicas: Vec<ReplicaStatus> = cfg
            .replicas
            .iter()
            .zip(&reports)
            .map(|(r, rep)| {
                let catching = catch_ups.get(&r.node).cloned();
                ReplicaStatus {
                    node: r.node,
                    state: match r.state {
                        ReplicaState::InSync => "in-sync",
                        _ if catching.is_some() => "catching-up",
                        ReplicaState::CatchingUp => "catching-up",
                        ReplicaState::Initializing => "initializing",
                        ReplicaState::Offline => "offline",
                    }
                    .to_string(),
                    primary: cfg.primary == Some(r.node),
                    eligible: r.eligible,
                    applied_lsn: rep.as_ref().map(|x| x.applied_lsn),
                    last: rep.as_ref().map(|x| x.last),
                    points: rep.as_ref().map(|x| x.points),
                    catch_up: catching,
                }
            })
            .collect();
        let mut problems = Vec::new();
        let in_sync = cfg.in_sync();
        if (cfg.replicas.len() as u32) < rec.replication.replicas || (in_sync.len() as u32) < rec.replication.replicas {
            problems.push(format!(
                "under-replicated: {} of {} replicas in sync",
                in_sync.len(),
                rec.replication.replicas
            ));
        }
        match cfg.primary {
            None => problems.push("no primary".into()),
            Some(p) if !up(p) => problems.push(format!("primary {p} is not up (failing over)")),
            _ => {}
        }
        for rep in reports.iter().flatten() {
            if let Some(why) = &rep.damaged {
                problems.push(format!("replica on node {} is damaged: {why}", rep.node));
            }
        }
        if !in_sync.iter().any(|n| up(*n)) {
            problems.push("no live in-sync replica: the shard waits for one to return".into());
        }
        ShardStatus {
            shard: key.shard,
            version: cfg.version,
            term: cfg.term,
            primary: cfg.primary,
            replicas,
            problems,
        }
    }

    /// Waits (bounded) until every shard of `name` has a primary that
    /// takes writes, so a client can write at once after a create.
    pub async fn wait_writable(&self, name: &str, within: Duration) -> Result<(), WireError> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let rec = self.collection(name)?;
            let mut ready = rec.shards.len() as u32 == rec.spec.shards;
            for (shard, cfg) in &rec.shards {
                if !ready {
                    break;
                }
                let key = ShardRef {
                    collection: rec.id,
                    shard: *shard,
                };
                let Some(primary) = cfg.primary else {
                    ready = false;
                    break;
                };
                let status = self
                    .plane
                    .read_on(primary, ShardRead::Status { shard: key }, STATUS_TIMEOUT)
                    .await;
                ready = matches!(status, Ok(ShardReadReply::Status(r)) if r.serving && r.term == cfg.term);
            }
            if ready {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(unavailable(format!(
                    "collection {name:?} is created but not every shard has a serving primary yet; writes are retried until they do"
                )));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hit(id: u64, score: f32) -> Hit {
        Hit {
            id,
            score,
            payload: None,
        }
    }

    #[test]
    fn merge_keeps_the_best_k_by_metric() {
        let a = vec![hit(1, 0.1), hit(2, 0.5)];
        let b = vec![hit(3, 0.2), hit(4, 0.3)];
        let ids = |v: Vec<Hit>| v.into_iter().map(|h| h.id).collect::<Vec<_>>();
        assert_eq!(ids(merge_hits(Metric::L2, 3, [a.clone(), b.clone()])), vec![1, 3, 4]);
        assert_eq!(ids(merge_hits(Metric::Cosine, 2, [a, b])), vec![2, 4]);
        // Equal scores: lower id first, so every proxy merges alike.
        assert_eq!(
            ids(merge_hits(Metric::L2, 2, [vec![hit(9, 1.0)], vec![hit(5, 1.0)]])),
            vec![5, 9]
        );
    }

    #[test]
    fn the_retryable_failure_wins() {
        let e = |c| WireError::new(c, "x");
        assert_eq!(
            worst(&[(0, e(ErrorCode::Internal)), (1, e(ErrorCode::Unavailable))]),
            ErrorCode::Unavailable
        );
        assert_eq!(worst(&[(0, e(ErrorCode::InvalidArgument))]), ErrorCode::InvalidArgument);
    }
}
