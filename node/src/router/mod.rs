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
//!   same request, at the request's consistency level (`levels.rs`).
//!   Per-shard top-k lists are merged by score.
//! - What the plugin sees of each replica's node (requests in flight,
//!   latency EWMA, recent errors, a short ejection after a failure, a
//!   stall: no answer for a few latencies while attempts are out) is this
//!   node's own experience of it ([`NodeStats`]). A read waiting on a
//!   stalled node asks the next replica too; the first answer wins.
//!
//! Invariant: nothing here decides replication; it reads the shard
//! configurations from this node's copy of the metadata and leaves every
//! check (term, primary, in-sync) to the replicas themselves.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edgevec_policy::{replica_words, ReplicaInfo, ReplicaState as PolicyState, RequestInfo};

use edgevec_engine::{by_shard, last_wins, validate, ShardOp};
use edgevec_meta::{CollectionRecord, ReplicaState};
use edgevec_proto::internal::{NodeOpV1, NodeReplyV1};
use edgevec_proto::replication::{
    ReadRequirement, ReplicaReport, ShardRead, ShardReadAt, ShardReadReply, ShardRef, WriteOp,
};
use edgevec_proto::{
    CollectionDetails, CollectionInfo, CollectionShards, ErrorCode, Hit, IndexBuild, Metric, OpId, Point, PointRecord,
    ReadOptions, ReplicaStatus, SearchParams, SessionToken, ShardInfo, ShardStatus, WireError, WriteAck, WriteOutcome,
};

pub mod levels;
use levels::{Candidate, Level, DEFAULT_LEVEL};

use crate::replication::primary::Written;
use crate::replication::{unavailable, DataPlane};

/// Deadline of a write forwarded to a primary.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest a request naming an unknown collection waits for this node to
/// catch up with the metadata leader before it answers "not found".
const NAME_BARRIER: Duration = Duration::from_secs(2);
/// Deadline of a status probe of one replica.
const STATUS_TIMEOUT: Duration = Duration::from_secs(1);

pub use edgevec_meta::plugins::DEFAULT_LOAD_BALANCER;
/// How long a node that failed a read stays ejected from first choice
/// (doubled for each failure in a row, up to [`EJECT_MAX`]).
const EJECT_FOR: Duration = Duration::from_secs(1);
const EJECT_MAX: Duration = Duration::from_secs(5);
/// A read's deadline when the request names none (below the client
/// library's default request timeout).
pub const DEFAULT_READ_DEADLINE: Duration = Duration::from_secs(20);
/// Longest deadline a read may ask for.
const MAX_READ_DEADLINE: Duration = Duration::from_secs(300);
/// Longest one replica waits for a read's requirement in one attempt.
const REQUIREMENT_WAIT: Duration = Duration::from_millis(750);
/// An attempt may take this many latency EWMAs, within
/// [`ATTEMPT_MIN`]..[`ATTEMPT_MAX`], beyond its requirement wait.
const ATTEMPT_LATENCIES: f64 = 8.0;
const ATTEMPT_MIN: Duration = Duration::from_millis(300);
const ATTEMPT_MAX: Duration = Duration::from_secs(3);
/// Pause before a shard's replicas are tried again when none could serve
/// (a failover in progress), unless the metadata changes first.
const RETRY_PAUSE: Duration = Duration::from_millis(100);
/// Most session tokens a read may carry.
const MAX_TOKENS: usize = 4096;
/// Retry budget: each shard read adds this much to it...
const RETRY_RATIO: f64 = 0.2;
/// ...it refills at this many retries per second besides...
const RETRY_MIN_PER_SEC: f64 = 10.0;
/// ...and holds at most this many.
const RETRY_BURST: f64 = 50.0;
/// Speculative hedges never take the budget below this: it stays for
/// retries after failures (a node that dies while hedges drain the budget).
const RETRY_RESERVE: f64 = 25.0;

/// How many attempts beyond the first this node's reads may make: a share
/// of the reads plus a few per second (Finagle's retry budget). A read's
/// first attempt is free, and so is the first after a metadata change (a
/// new plan, not a repeat); every other attempt, the next replica after a
/// failure or another round while a shard has none that serves, spends
/// one. Without budget the read waits for a metadata change or the
/// budget's refill, until its deadline: a sick cluster sees at most
/// (1 + the share) attempts per read plus the refill rate, not a storm.
#[derive(Debug)]
struct RetryBudget {
    state: Mutex<(f64, Instant)>,
    per_sec: f64,
    retries: std::sync::atomic::AtomicU64,
    refused: std::sync::atomic::AtomicU64,
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self::with_rate(RETRY_MIN_PER_SEC)
    }
}

impl RetryBudget {
    fn with_rate(per_sec: f64) -> Self {
        RetryBudget {
            state: Mutex::new((RETRY_BURST, Instant::now())),
            per_sec,
            retries: Default::default(),
            refused: Default::default(),
        }
    }

    fn refill(&self, state: &mut (f64, Instant)) {
        let now = Instant::now();
        state.0 = (state.0 + now.duration_since(state.1).as_secs_f64() * self.per_sec).min(RETRY_BURST);
        state.1 = now;
    }

    fn deposit(&self) {
        let mut st = self.state.lock().expect("budget lock");
        self.refill(&mut st);
        st.0 = (st.0 + RETRY_RATIO).min(RETRY_BURST);
    }

    /// One attempt for a retry: spends the budget down to empty.
    fn withdraw(&self) -> bool {
        self.take(1.0)
    }

    /// One speculative attempt (a hedge): only from what is above the
    /// reserve, which stays for retries after failures.
    fn withdraw_speculative(&self) -> bool {
        self.take(1.0 + RETRY_RESERVE)
    }

    /// Spends one if the budget holds at least `need`.
    fn take(&self, need: f64) -> bool {
        let mut st = self.state.lock().expect("budget lock");
        self.refill(&mut st);
        let ok = st.0 >= need;
        if ok {
            st.0 -= 1.0;
            self.retries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        } else {
            self.refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        ok
    }
}
/// The window of [`NodeStats`]' error count.
const ERROR_WINDOW: Duration = Duration::from_secs(10);

/// This node's experience of one peer as a read target.
#[derive(Debug, Default)]
struct NodeStat {
    /// Attempts in flight on the node, by attempt number, with their start.
    outstanding: BTreeMap<u64, Instant>,
    /// When the node last answered anything (a refusal too).
    answered: Option<Instant>,
    /// Latency EWMA (α = 0.3) in µs, and when it was last sampled.
    ewma_us: f64,
    sampled: Option<Instant>,
    errors: VecDeque<Instant>,
    /// Transport failures and timeouts in a row (reset by an answer).
    consecutive: u32,
    /// Ejections so far.
    ejections: u64,
    ejected_until: Option<Instant>,
    /// A readmission probe of this node is in flight.
    probing: bool,
}

/// Latencies kept for the hedging delay's p95.
const RECENT_LATENCIES: usize = 256;
/// Hedging delay bounds: no earlier than this...
const HEDGE_MIN: Duration = Duration::from_millis(2);
/// ...and this when a node has no latency yet.
const HEDGE_UNKNOWN: Duration = Duration::from_millis(50);

/// A node that has not answered anything for this long (and a few
/// latency EWMAs) while attempts were outstanding on it counts as
/// *stalled*: tried after the others, like an ejected one, though nothing
/// is held against it (kill -9 and SIGSTOP are silent; the first
/// attempt's timeout would otherwise be the first sign).
const STALL_MIN: Duration = Duration::from_millis(50);
const STALL_LATENCIES: f64 = 4.0;
/// How often a read waiting on an attempt checks whether its node stalled.
const STALL_CHECK: Duration = Duration::from_millis(20);

/// One attempt in flight on a node: counted in its in-flight requests
/// until it ends, also when it is cancelled (a hedge's loser).
struct InFlight<'a> {
    nodes: &'a NodeStats,
    node: u64,
    seq: u64,
    ended: bool,
}

impl<'a> InFlight<'a> {
    fn begin(nodes: &'a NodeStats, node: u64) -> Self {
        let seq = nodes.begin(node);
        InFlight {
            nodes,
            node,
            seq,
            ended: false,
        }
    }

    fn end(mut self, took: Duration, outcome: Outcome) {
        self.ended = true;
        self.nodes.end(self.node, self.seq, took, outcome);
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if !self.ended {
            let mut all = self.nodes.0.lock().expect("stats lock");
            if let Some(s) = all.get_mut(&self.node) {
                s.outstanding.remove(&self.seq);
            }
        }
    }
}

impl NodeStat {
    /// A transport failure or timeout: counted, and the node ejected for
    /// longer after each one in a row.
    fn eject(&mut self, now: Instant) {
        self.errors.push_back(now);
        self.consecutive = self.consecutive.saturating_add(1);
        self.ejections += 1;
        let backoff = EJECT_FOR
            .saturating_mul(1 << (self.consecutive - 1).min(5))
            .min(EJECT_MAX);
        self.ejected_until = Some(now + backoff);
    }

    /// An attempt has been outstanding for longer than a few latencies
    /// (at least [`STALL_MIN`]), and the node has answered nothing since
    /// it began.
    fn stalled(&self, now: Instant) -> bool {
        // The oldest attempt begun after the node's last answer (attempts
        // are numbered in the order they began).
        let Some(oldest) = self
            .outstanding
            .values()
            .find(|began| self.answered.is_none_or(|a| a < **began))
        else {
            return false;
        };
        // A node with no latency sample yet gets the attempt floor: a slow
        // node must be able to give its first answers.
        let limit = match self.sampled {
            Some(_) => Duration::from_micros((self.ewma_us * STALL_LATENCIES) as u64).max(STALL_MIN),
            None => ATTEMPT_MIN,
        };
        now.duration_since(*oldest) > limit
    }
}

/// Why a read also asks the next replica while its first attempt is out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Second {
    /// The first attempt's node stalled.
    Rescue,
    /// Speculative: the first has not answered within the hedging delay.
    Hedge,
}

/// How one attempt on a replica ended, for [`NodeStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// It answered.
    Served,
    /// It answered with a refusal (not caught up, no replica, damaged):
    /// the node is alive; nothing is held against it.
    Refused,
    /// Nothing came back (transport failure or timeout): the whole node
    /// is ejected for every shard, longer after each failure in a row.
    Failed,
}

/// Per-node read statistics, for the load balancer's inputs and the
/// attempt timeouts, and the latest latencies of reads served by any node
/// (for the hedging delay).
#[derive(Debug, Default)]
pub struct NodeStats(
    Mutex<HashMap<u64, NodeStat>>,
    Mutex<VecDeque<u32>>,
    std::sync::atomic::AtomicU64,
);

impl NodeStats {
    /// Counts an attempt on `node` as outstanding; returns its number.
    fn begin(&self, node: u64) -> u64 {
        let seq = self.2.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut all = self.0.lock().expect("stats lock");
        all.entry(node).or_default().outstanding.insert(seq, Instant::now());
        seq
    }

    fn end(&self, node: u64, seq: u64, took: Duration, outcome: Outcome) {
        let mut all = self.0.lock().expect("stats lock");
        let s = all.entry(node).or_default();
        s.outstanding.remove(&seq);
        let now = Instant::now();
        if outcome != Outcome::Failed {
            s.answered = Some(now);
        }
        match outcome {
            Outcome::Served => {
                let us = took.as_secs_f64() * 1e6;
                s.ewma_us = if s.sampled.is_some() {
                    0.7 * s.ewma_us + 0.3 * us
                } else {
                    us
                };
                s.sampled = Some(now);
                s.consecutive = 0;
                s.ejected_until = None;
                let mut recent = self.1.lock().expect("stats lock");
                if recent.len() == RECENT_LATENCIES {
                    recent.pop_front();
                }
                recent.push_back(us.min(f64::from(u32::MAX)) as u32);
            }
            Outcome::Refused => s.consecutive = 0,
            Outcome::Failed => s.eject(now),
        }
        while s.errors.front().is_some_and(|t| now.duration_since(*t) > ERROR_WINDOW) {
            s.errors.pop_front();
        }
    }

    /// How long to wait before hedging: the p95 of the latest reads served
    /// by any replica (one node that was slow a while ago, say while it
    /// caught up after a restart, must not hold hedges back), within
    /// [`HEDGE_MIN`]..[`ATTEMPT_MIN`].
    fn hedge_delay(&self) -> Duration {
        let recent = self.1.lock().expect("stats lock");
        if recent.len() < 20 {
            return HEDGE_UNKNOWN;
        }
        let mut v: Vec<u32> = recent.iter().copied().collect();
        drop(recent);
        v.sort_unstable();
        let p95 = v[(v.len() * 95 / 100).min(v.len() - 1)];
        Duration::from_micros(u64::from(p95)).clamp(HEDGE_MIN, ATTEMPT_MIN)
    }

    /// How long an attempt on `node` may take beyond its requirement wait:
    /// a few times its latency, within bounds (a silent node must count
    /// as failed long before QUIC's idle timeout).
    fn attempt_timeout(&self, node: u64) -> Duration {
        let all = self.0.lock().expect("stats lock");
        match all.get(&node).filter(|s| s.sampled.is_some()) {
            Some(s) => Duration::from_micros((s.ewma_us * ATTEMPT_LATENCIES) as u64).clamp(ATTEMPT_MIN, ATTEMPT_MAX),
            None => ATTEMPT_MAX,
        }
    }

    /// Whether `node` is out of its ejection but not yet readmitted, and
    /// no probe of it runs: the caller then starts one.
    fn claim_probe(&self, node: u64) -> bool {
        let mut all = self.0.lock().expect("stats lock");
        let Some(s) = all.get_mut(&node) else { return false };
        let due = s.consecutive > 0 && s.ejected_until.is_some_and(|u| Instant::now() >= u) && !s.probing;
        if due {
            s.probing = true;
        }
        due
    }

    /// A probe's result: readmits the node, or ejects it for longer.
    fn probed(&self, node: u64, ok: bool) {
        let mut all = self.0.lock().expect("stats lock");
        let s = all.entry(node).or_default();
        s.probing = false;
        if ok {
            s.consecutive = 0;
            s.ejected_until = None;
        } else {
            s.eject(Instant::now());
        }
    }

    /// A stalled node's attempt lost to another replica's answer: the
    /// node is ejected, as after a timeout.
    fn stalled_out(&self, node: u64) {
        let mut all = self.0.lock().expect("stats lock");
        let s = all.entry(node).or_default();
        if s.stalled(Instant::now()) {
            s.eject(Instant::now());
        }
    }

    /// Whether `node` has stalled (see [`STALL_MIN`]).
    fn is_stalled(&self, node: u64) -> bool {
        let all = self.0.lock().expect("stats lock");
        all.get(&node).is_some_and(|s| s.stalled(Instant::now()))
    }

    /// Fills the node-side fields of `info`. A node stays ejected after
    /// its ejection ends until a probe readmits it: client reads are not
    /// the probes.
    fn describe(&self, info: &mut ReplicaInfo) {
        let all = self.0.lock().expect("stats lock");
        let Some(s) = all.get(&info.node) else { return };
        let now = Instant::now();
        info.in_flight = s.outstanding.len() as u64;
        // Decayed towards zero with time since the last sample, so a
        // node that stopped being chosen gets tried again (Finagle's p2c).
        info.latency_us = s.sampled.map(|_| s.ewma_us.max(1.0) as u64);
        info.since_sample_ms = s.sampled.map(|t| now.duration_since(t).as_millis() as u64);
        info.errors = s
            .errors
            .iter()
            .filter(|t| now.duration_since(**t) <= ERROR_WINDOW)
            .count() as u64;
        info.ejected = (s.consecutive > 0 && s.ejected_until.is_some()) || s.stalled(now);
    }
}

pub struct Router {
    plane: Arc<DataPlane>,
    /// Reads per shard so far: the load balancer's sequence number.
    sequences: Mutex<HashMap<ShardRef, u64>>,
    nodes: Arc<NodeStats>,
    /// Reads served, by (shard, node).
    served: Mutex<BTreeMap<(ShardRef, u64), u64>>,
    /// The op each replica last served a read at, and when: the plugins'
    /// "applied op id" and "age of that report".
    applied: Mutex<HashMap<(ShardRef, u64), (OpId, Instant)>>,
    retry_budget: RetryBudget,
    /// Hedged reads sent so far.
    hedges: std::sync::atomic::AtomicU64,
    /// Attempts made on replicas so far.
    attempts: std::sync::atomic::AtomicU64,
    /// Reads also sent to the next replica because the first had stalled.
    rescues: std::sync::atomic::AtomicU64,
}

/// How one read is to be served: its level, the client's token for each
/// shard, the client's zone and the deadline.
#[derive(Debug, Clone)]
pub struct ReadSpec {
    pub level: Level,
    pub tokens: HashMap<u32, SessionToken>,
    pub zone: Option<u32>,
    pub deadline: Instant,
}

fn not_found(name: &str) -> WireError {
    WireError::new(ErrorCode::NotFound, format!("collection {name:?} does not exist"))
}

/// The cluster setting that turns hedging on for collection `id`.
pub fn hedge_setting(id: u64) -> String {
    format!("reads.hedge.{id}")
}

/// The session token of a read or write of `key` at `op`.
fn token_of(key: ShardRef, op: OpId) -> SessionToken {
    SessionToken {
        collection: key.collection,
        shard: key.shard,
        term: op.term,
        lsn: op.lsn,
    }
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
            nodes: Arc::default(),
            served: Mutex::new(BTreeMap::new()),
            applied: Mutex::new(HashMap::new()),
            retry_budget: RetryBudget::default(),
            hedges: Default::default(),
            attempts: Default::default(),
            rescues: Default::default(),
        }
    }

    /// The collection named `name`. A name this node does not know may have
    /// been created through another node a moment ago: before answering
    /// "not found", this node catches up with the metadata leader (a read
    /// barrier, bounded by [`NAME_BARRIER`]), so a collection is usable
    /// through every node as soon as its creation is acknowledged.
    async fn collection(&self, name: &str) -> Result<CollectionRecord, WireError> {
        let known = || self.plane.meta.state().collection(name).cloned();
        if let Some(rec) = known() {
            return Ok(rec);
        }
        let _ = tokio::time::timeout(NAME_BARRIER, self.plane.meta.read_index()).await;
        known().ok_or_else(|| not_found(name))
    }

    /// Inserts or replaces points of `name`.
    pub async fn upsert(&self, name: &str, points: Vec<Point>) -> Result<WriteAck, WireError> {
        self.upsert_v2(name, points).await?.into_result()
    }

    /// Deletes points of `name` by id.
    pub async fn delete(&self, name: &str, ids: Vec<u64>) -> Result<WriteAck, WireError> {
        self.delete_v2(name, ids).await?.into_result()
    }

    /// Inserts or replaces points of `name`; the outcome has a session
    /// token for every shard written, also when others failed.
    pub async fn upsert_v2(&self, name: &str, mut points: Vec<Point>) -> Result<WriteOutcome, WireError> {
        let rec = self.collection(name).await?;
        validate::points(&rec.spec, &mut points).map_err(|e| e.to_wire())?;
        let count = points.len() as u64;
        let groups = by_shard(last_wins(points), |p| p.id, rec.spec.shards);
        let ops = groups.into_iter().map(|(s, p)| (s, WriteOp::Upsert(p))).collect();
        Ok(self.write(&rec, Some(count), ops).await)
    }

    /// Deletes points of `name` by id, with session tokens as
    /// [`Router::upsert_v2`].
    pub async fn delete_v2(&self, name: &str, ids: Vec<u64>) -> Result<WriteOutcome, WireError> {
        let rec = self.collection(name).await?;
        validate::ids(&ids).map_err(|e| e.to_wire())?;
        let groups = by_shard(ids, |id| *id, rec.spec.shards);
        let ops = groups.into_iter().map(|(s, ids)| (s, WriteOp::Delete(ids))).collect();
        // The ack counts the points the shards' primaries actually deleted.
        Ok(self.write(&rec, None, ops).await)
    }

    /// Writes each shard's op through its primary; the ack carries `count`,
    /// or (`None`, deletes) the sum of the points the primaries deleted.
    async fn write(&self, rec: &CollectionRecord, count: Option<u64>, ops: Vec<(u32, WriteOp)>) -> WriteOutcome {
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
        let mut tokens = Vec::new();
        let mut deleted = 0;
        let mut upserted = 0;
        let mut failed = Vec::new();
        let mut unwritten = Vec::new();
        for (shard, ids, r) in results {
            match r {
                Ok(w) => {
                    lsns.push((shard, w.op.lsn));
                    tokens.push(token_of(
                        ShardRef {
                            collection: rec.id,
                            shard,
                        },
                        w.op,
                    ));
                    deleted += w.deleted;
                    upserted += ids.len() as u64;
                }
                Err(e) => {
                    unwritten.extend(ids);
                    failed.push((shard, e));
                }
            }
        }
        if failed.is_empty() {
            return WriteOutcome {
                ack: WriteAck {
                    count: count.unwrap_or(deleted),
                    lsns,
                },
                tokens,
                error: None,
            };
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
        let error = WireError::new(
            code,
            format!(
                "{} of {total} shards failed ({}){written}; ids not written ({}): [{}{more}]",
                failed.len(),
                reasons.join("; "),
                unwritten.len(),
                shown.join(", ")
            ),
        );
        WriteOutcome {
            ack: WriteAck {
                count: if count.is_some() { upserted } else { deleted },
                lsns,
            },
            tokens,
            error: Some(error),
        }
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

    /// The [`ReadSpec`] of a request's options, checked against
    /// collection `rec`.
    pub fn read_spec(&self, rec: &CollectionRecord, opts: ReadOptions) -> Result<ReadSpec, WireError> {
        let invalid = |field: &str, m: String| WireError::new(ErrorCode::InvalidArgument, m).with_field(field);
        let level = match &opts.consistency {
            None => DEFAULT_LEVEL,
            Some(text) => Level::parse(text).map_err(|m| invalid("consistency", m))?,
        };
        if let Level::Custom { plugin, .. } = &level {
            if self.plane.policies.kind(plugin) != Some(crate::policy::Kind::Consistency) {
                return Err(invalid(
                    "consistency",
                    format!(
                        "no consistency plugin named {plugin:?} is loaded on node {} (see `edgevec plugin list`)",
                        self.plane.me
                    ),
                ));
            }
        }
        if opts.session.len() > MAX_TOKENS {
            return Err(invalid(
                "session",
                format!("{} session tokens, more than {MAX_TOKENS}", opts.session.len()),
            ));
        }
        let mut tokens: HashMap<u32, SessionToken> = HashMap::new();
        for t in opts
            .session
            .iter()
            .filter(|t| t.collection == rec.id && t.shard < rec.spec.shards)
        {
            let e = tokens.entry(t.shard).or_insert(*t);
            if (t.term, t.lsn) > (e.term, e.lsn) {
                *e = *t;
            }
        }
        let config = self.plane.policies.configuration();
        let zone = match &opts.zone {
            None => None,
            Some(z) => Some(config.zone_id(z).ok_or_else(|| {
                invalid(
                    "zone",
                    format!("zone {z:?} is not a zone of the cluster ({})", config.zones.join(", ")),
                )
            })?),
        };
        let within = match opts.timeout_ms {
            None => DEFAULT_READ_DEADLINE,
            Some(0) => return Err(invalid("timeout_ms", "a read timeout of 0 ms".into())),
            Some(ms) => Duration::from_millis(u64::from(ms)).min(MAX_READ_DEADLINE),
        };
        Ok(ReadSpec {
            level,
            tokens,
            zone,
            deadline: Instant::now() + within,
        })
    }

    /// Reads one shard: the replicas the metadata names, the level's
    /// requirements from its consistency plugin, the order from the
    /// collection's load balancer (ejected nodes last), then each in turn
    /// until one serves. When none can (a failover), waits for a newer
    /// configuration and tries again until the deadline. Returns the
    /// reply and the op the replica served at.
    async fn read_shard_at(
        &self,
        key: ShardRef,
        read: ShardRead,
        spec: &ReadSpec,
    ) -> Result<(ShardReadReply, OpId), WireError> {
        let mut errors: Vec<String> = Vec::new();
        let mut tried = 0u64;
        let mut rx = self.plane.meta.subscribe();
        self.retry_budget.deposit();
        // The first attempt of a round is free while the round follows a
        // new configuration (or is the first).
        let mut new_plan = true;

        loop {
            if let Some((cfg, _)) = self.plane.config_of(key) {
                let live = cfg
                    .replicas
                    .iter()
                    .any(|r| matches!(r.state, ReplicaState::InSync | ReplicaState::CatchingUp));
                if !live {
                    // No failover can bring a serviceable replica: say why
                    // at once (a replica that returns will be in sync again).
                    let rec = self.plane.meta.state().collection_by_id(key.collection).cloned();
                    let why = match rec {
                        Some(rec) => self.shard_status(&rec, key).await.problems.join("; "),
                        None => "the collection was dropped".into(),
                    };
                    return Err(unavailable(format!("{key} has no replica that can serve: {why}")));
                }
                let plan = self.plan(key, &cfg, spec, tried);
                if plan.is_empty() {
                    errors.push(format!("no replica of {key} may serve at {}", spec.level));
                }
                let hedge = self.hedging(key.collection);
                let mut i = 0;
                while i < plan.len() {
                    if Instant::now() >= spec.deadline {
                        break;
                    }
                    let free = i == 0 && new_plan;
                    if !free && !self.retry_budget.withdraw() {
                        errors.push("retry budget spent; waiting for the next round".into());
                        break;
                    }
                    tried += 1;
                    let (node, requirement, min_lsn) = plan[i];
                    let first = self.attempt(key, node, &read, requirement, min_lsn, spec.deadline);
                    let Some(&(next, next_requirement, next_min)) = plan.get(i + 1) else {
                        match first.await {
                            Ok(r) => return Ok(r),
                            Err(e) => errors.push(format!("node {node}: {}", e.message)),
                        }
                        i += 1;
                        continue;
                    };
                    // While the first is out, the next replica is asked too
                    // (the first answer wins, the other attempt is
                    // cancelled) when the first's node has stalled (answered
                    // nothing for a few latencies while attempts were out:
                    // a dead or paused node), or, with hedging on, when it
                    // has not answered within the p95 of recent reads. A
                    // stall spends the retry budget; a speculative hedge
                    // only what is above its reserve.
                    tokio::pin!(first);
                    let rescue = match self.first_or_second(first.as_mut(), node, hedge).await {
                        Ok(r) => {
                            match r {
                                Ok(r) => return Ok(r),
                                Err(e) => errors.push(format!("node {node}: {}", e.message)),
                            }
                            i += 1;
                            continue;
                        }
                        Err(second) => second == Second::Rescue,
                    };
                    tried += 1;
                    let second = self.attempt(key, next, &read, next_requirement, next_min, spec.deadline);
                    tokio::pin!(second);
                    let (done, other, other_node) = tokio::select! {
                        r = &mut first => ((node, r), true, next),
                        r = &mut second => ((next, r), false, node),
                    };
                    match done.1 {
                        Ok(r) => {
                            if rescue && !other {
                                // The stalled node stayed silent while another
                                // answered: it is ejected as if the attempt had
                                // timed out (else reads would keep going to it).
                                self.nodes.stalled_out(node);
                            }
                            return Ok(r);
                        }
                        Err(e) => errors.push(format!("node {}: {}", done.0, e.message)),
                    }
                    let rest = if other { second.await } else { first.await };
                    match rest {
                        Ok(r) => return Ok(r),
                        Err(e) => errors.push(format!("node {other_node}: {}", e.message)),
                    }
                    i += 2;
                }
            } else if self.plane.meta.state().collection_by_id(key.collection).is_none() {
                // Dropped while the read was under way (a collection of the
                // same name created since has another id): no wait helps.
                return Err(WireError::new(
                    ErrorCode::NotFound,
                    format!("collection {} was dropped while the read was under way", key.collection),
                ));
            } else {
                errors.push(format!("{key} has no configuration on node {}", self.plane.me));
            }
            let left = spec.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            // A failover in progress: wait for the next configuration (or a
            // moment), then try again within the same request.
            new_plan = matches!(
                tokio::time::timeout(left.min(RETRY_PAUSE), rx.changed()).await,
                Ok(Ok(()))
            );
        }
        errors.dedup();
        let shown = errors.len().saturating_sub(6);
        Err(unavailable(format!(
            "no replica of {key} served the read at {} in time ({})",
            spec.level,
            errors[shown..].join("; ")
        )))
    }

    /// The replicas to try for one read of `key`, in order, each with
    /// its requirement and the session LSN it must have applied.
    fn plan(
        &self,
        key: ShardRef,
        cfg: &edgevec_meta::ShardConfig,
        spec: &ReadSpec,
        tried: u64,
    ) -> Vec<(u64, ReadRequirement, u64)> {
        let state = self.plane.meta.state();
        let config = self.plane.policies.configuration();
        let zone_of = |node: u64| {
            state
                .nodes()
                .find(|n| n.id == node)
                .and_then(|n| config.zone_id(&n.zone))
        };
        let live: Vec<&edgevec_meta::ReplicaRecord> = cfg
            .replicas
            .iter()
            .filter(|r| matches!(r.state, ReplicaState::InSync | ReplicaState::CatchingUp))
            .take(edgevec_policy::layout::MAX_REPLICAS)
            .collect();
        let infos: Vec<ReplicaInfo> = live
            .iter()
            .map(|r| {
                let mut info = ReplicaInfo::new(r.node);
                info.zone = zone_of(r.node);
                info.primary = cfg.primary == Some(r.node);
                info.state = match r.state {
                    ReplicaState::InSync => PolicyState::InSync,
                    _ => PolicyState::CatchingUp,
                };
                info.term = cfg.term;
                match self.applied.lock().expect("applied lock").get(&(key, r.node)) {
                    Some((op, at)) => {
                        info.applied = (op.term, op.lsn);
                        info.report_age_ms = at.elapsed().as_millis() as u64;
                    }
                    None => {
                        info.applied = (0, 0);
                        info.report_age_ms = edgevec_policy::layout::NONE;
                    }
                }
                self.nodes.describe(&mut info);
                info
            })
            .collect();
        for info in infos.iter().filter(|i| i.ejected) {
            if self.nodes.claim_probe(info.node) {
                self.probe(key, info.node);
            }
        }
        let candidates: Vec<Candidate> = live
            .iter()
            .map(|r| Candidate {
                primary: cfg.primary == Some(r.node),
                in_sync: r.state == ReplicaState::InSync,
                live: true,
            })
            .collect();
        let token = spec.tokens.get(&key.shard).copied();
        let client_zone = spec.zone.or_else(|| zone_of(self.plane.me));
        let deadline_ms = spec.deadline.saturating_duration_since(Instant::now()).as_millis() as u64;
        let request = edgevec_policy::ConsistencyRequestInfo {
            collection: key.collection,
            shard: key.shard,
            client_zone,
            level: spec.level.id(),
            bound_ms: spec.level.bound_ms(),
            session: token.map(|t| (t.term, t.lsn)),
            deadline_ms,
        }
        .words();
        let replica_words = replica_words(&infos);
        let plugin = spec.level.plugin();
        let admitted = match self
            .plane
            .policies
            .requirements(plugin, &request, &replica_words, infos.len())
        {
            Ok((answer, bound)) => match levels::admit(&spec.level, &answer, bound, &candidates) {
                Ok(a) => a,
                Err(why) => {
                    self.plane.policies.refused(plugin, &why);
                    levels::strict(&spec.level, &candidates)
                }
            },
            Err(_) => levels::strict(&spec.level, &candidates),
        };
        let chosen: Vec<usize> = (0..infos.len()).filter(|i| admitted[*i].is_some()).collect();
        if chosen.is_empty() {
            return Vec::new();
        }
        let sub: Vec<ReplicaInfo> = chosen.iter().map(|i| infos[*i].clone()).collect();
        let order = self.balance(key, &sub, spec, client_zone, tried, deadline_ms);
        let plan: Vec<(u64, ReadRequirement, u64, bool)> = order
            .into_iter()
            .map(|i| {
                let (requirement, asked_session) = admitted[chosen[i]].expect("admitted");
                let session = spec.level.enforces_session() || asked_session;
                let min_lsn = if session { token.map_or(0, |t| t.lsn) } else { 0 };
                (sub[i].node, requirement, min_lsn, sub[i].ejected)
            })
            .collect();
        // In the plugin's order, except: replicas known (from the reads
        // they served) not to have applied the session's op yet go after
        // the others, and ejected nodes go last (panic mode: when every one
        // is ejected they are still tried).
        let behind = |node: u64, min_lsn: u64| {
            min_lsn > 0
                && self
                    .applied
                    .lock()
                    .expect("applied lock")
                    .get(&(key, node))
                    .is_some_and(|(op, _)| op.lsn < min_lsn)
        };
        let tier = |(node, _, min_lsn, ejected): &(u64, ReadRequirement, u64, bool)| {
            if *ejected {
                2
            } else if behind(*node, *min_lsn) {
                1
            } else {
                0
            }
        };
        let mut plan = plan;
        plan.sort_by_key(tier);
        plan.into_iter().map(|(n, r, l, _)| (n, r, l)).collect()
    }

    /// Waits for `first` (an attempt on `node`) alone until it answers, or
    /// until the next replica should be asked too: `node` has stalled and
    /// the retry budget allows a rescue, or (with `hedge`) the hedging
    /// delay passed and the budget above its reserve allows a hedge.
    async fn first_or_second<F>(&self, mut first: Pin<&mut F>, node: u64, hedge: bool) -> Result<F::Output, Second>
    where
        F: std::future::Future,
    {
        let hedge_at = hedge.then(|| Instant::now() + self.nodes.hedge_delay());
        let mut speculated = false;
        loop {
            let now = Instant::now();
            let tick = hedge_at
                .filter(|_| !speculated)
                .map_or(STALL_CHECK, |at| at.saturating_duration_since(now).min(STALL_CHECK));
            tokio::select! {
                r = &mut first => return Ok(r),
                () = tokio::time::sleep(tick) => {}
            }
            if self.nodes.is_stalled(node) && self.retry_budget.withdraw() {
                self.rescues.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return Err(Second::Rescue);
            }
            if !speculated && hedge_at.is_some_and(|at| Instant::now() >= at) {
                speculated = true;
                if self.retry_budget.withdraw_speculative() {
                    self.hedges.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    return Err(Second::Hedge);
                }
            }
        }
    }

    /// Probes an ejected node's replica of `key` in the background (its
    /// serviceable state, as a read would find it) and readmits the node
    /// when it answers.
    fn probe(&self, key: ShardRef, node: u64) {
        let (plane, nodes) = (self.plane.clone(), self.nodes.clone());
        self.plane.tasks.spawn(async move {
            let msg = ShardReadAt {
                read: ShardRead::Status { shard: key },
                requirement: ReadRequirement::None,
                min_lsn: 0,
                budget_ms: 0,
                sent_unix_ms: crate::faults::wall_ms(),
                ttl_ms: ATTEMPT_MAX.as_millis() as u32,
            };
            let ok = matches!(
                plane.call_peer(node, NodeOpV1::ShardReadAt(msg), ATTEMPT_MAX).await,
                Ok(Ok(NodeReplyV1::ShardReadAt(_)))
            );
            tracing::debug!(node, shard = %key, ok, "readmission probe");
            nodes.probed(node, ok);
        });
    }

    /// One attempt of a read on one replica, with its own timeout.
    async fn attempt(
        &self,
        key: ShardRef,
        node: u64,
        read: &ShardRead,
        requirement: ReadRequirement,
        min_lsn: u64,
        deadline: Instant,
    ) -> Result<(ShardReadReply, OpId), WireError> {
        let left = deadline.saturating_duration_since(Instant::now());
        let waits = requirement != ReadRequirement::None || min_lsn > 0;
        let wait = if waits {
            REQUIREMENT_WAIT.min(left)
        } else {
            Duration::ZERO
        };
        let timeout = (wait + self.nodes.attempt_timeout(node)).min(left);
        let msg = ShardReadAt {
            read: read.clone(),
            requirement,
            min_lsn,
            budget_ms: wait.as_millis() as u32,
            sent_unix_ms: crate::faults::wall_ms(),
            ttl_ms: timeout.as_millis() as u32,
        };
        self.attempts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let flight = InFlight::begin(&self.nodes, node);
        let started = Instant::now();
        let result = if node == self.plane.me {
            match tokio::time::timeout(timeout, self.plane.read_at(self.plane.me, msg)).await {
                Ok(r) => Ok(r),
                Err(_) => Err(WireError::new(
                    ErrorCode::Timeout,
                    format!("this node's replica did not answer within {timeout:?}"),
                )),
            }
        } else {
            self.plane
                .call_peer(node, NodeOpV1::ShardReadAt(msg), timeout)
                .await
                .map(|r| match r {
                    Ok(NodeReplyV1::ShardReadAt(reply)) => Ok(reply),
                    Ok(other) => Err(WireError::new(
                        ErrorCode::Internal,
                        format!("node {node} answered a read with {other:?}"),
                    )),
                    Err(e) => Err(e),
                })
        };
        let (outcome, answer) = match result {
            Ok(Ok(reply)) => (Outcome::Served, Ok(reply)),
            Ok(Err(refused)) => (Outcome::Refused, Err(refused)),
            Err(failed) => (Outcome::Failed, Err(failed)),
        };
        flight.end(started.elapsed(), outcome);
        let reply = answer?;
        *self.served.lock().expect("served lock").entry((key, node)).or_insert(0) += 1;
        self.applied
            .lock()
            .expect("applied lock")
            .insert((key, node), (reply.served, Instant::now()));
        Ok((reply.reply, reply.served))
    }

    /// The order to try `infos` (admitted replicas of `key`) in, from the
    /// collection's load balancer.
    fn balance(
        &self,
        key: ShardRef,
        infos: &[ReplicaInfo],
        spec: &ReadSpec,
        client_zone: Option<u32>,
        tried: u64,
        deadline_ms: u64,
    ) -> Vec<usize> {
        let state = self.plane.meta.state();
        let sequence = {
            let mut seqs = self.sequences.lock().expect("sequence lock");
            let s = seqs.entry(key).or_insert(0);
            *s += 1;
            *s - 1
        };
        let request = RequestInfo {
            collection: key.collection,
            shard: key.shard,
            client_zone,
            level: spec.level.id(),
            deadline_ms,
            tried,
            sequence,
        };
        let lb = state.load_balancer_of(key.collection);
        let (order, _) = self
            .plane
            .policies
            .order(lb, &request.words(), &replica_words(infos), infos.len());
        order
    }

    /// One replica's status report, from the first in-sync replica that
    /// answers (for counts in `describe` and `list`).
    /// The report of the first in-sync replica that answers, with its
    /// index builds under way (none from a node of an earlier build, which
    /// answers only the first form of the request).
    async fn shard_report(&self, key: ShardRef) -> Option<(ReplicaReport, Vec<IndexBuild>)> {
        let (cfg, _) = self.plane.config_of(key)?;
        for node in cfg.in_sync() {
            match self
                .plane
                .read_on(node, ShardRead::StatusV2 { shard: key }, STATUS_TIMEOUT)
                .await
            {
                Ok(ShardReadReply::StatusV2 { report, builds }) => return Some((report, builds)),
                Ok(_) => {}
                // A node of an earlier build cannot decode the request.
                Err(e) if e.code == ErrorCode::Malformed => {
                    if let Ok(ShardReadReply::Status(r)) = self
                        .plane
                        .read_on(node, ShardRead::Status { shard: key }, STATUS_TIMEOUT)
                        .await
                    {
                        return Some((r, Vec::new()));
                    }
                }
                Err(_) => {}
            }
        }
        None
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

    /// Whether reads of collection `id` are hedged (the collection's
    /// `hedge` setting; off by default).
    fn hedging(&self, id: u64) -> bool {
        self.plane.meta.state().setting(&hedge_setting(id)) == Some("on")
    }

    /// Hedged reads sent so far.
    pub fn hedges(&self) -> u64 {
        self.hedges.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Reads also sent to the next replica because the first had stalled.
    pub fn rescues(&self) -> u64 {
        self.rescues.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Attempts made on replicas.
    pub fn attempts(&self) -> u64 {
        self.attempts.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Ejections so far, by node.
    pub fn ejections(&self) -> Vec<(u64, u64)> {
        let all = self.nodes.0.lock().expect("stats lock");
        all.iter().map(|(node, s)| (*node, s.ejections)).collect()
    }

    /// Attempts beyond the free ones made, and refused for want of budget.
    pub fn retries(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.retry_budget.retries.load(Relaxed),
            self.retry_budget.refused.load(Relaxed),
        )
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

    /// Up to `k` hits per query over every shard of `name`, at the
    /// default level.
    pub async fn search(
        &self,
        name: &str,
        queries: Vec<Vec<f32>>,
        k: u32,
        with_payload: bool,
    ) -> Result<Vec<Vec<Hit>>, WireError> {
        Ok(self
            .search_at(
                name,
                queries,
                k,
                with_payload,
                ReadOptions::default(),
                SearchParams::default(),
                None,
            )
            .await?
            .0)
    }

    /// Up to `k` hits per query over every shard of `name`, each shard read
    /// as `opts` asks and searched as `params` says, only points that pass
    /// `filter` (JSON) if one is given; with the op each shard was read at.
    #[allow(clippy::too_many_arguments)]
    pub async fn search_at(
        &self,
        name: &str,
        queries: Vec<Vec<f32>>,
        k: u32,
        with_payload: bool,
        opts: ReadOptions,
        params: SearchParams,
        filter: Option<String>,
    ) -> Result<(Vec<Vec<Hit>>, Vec<SessionToken>), WireError> {
        let rec = self.collection(name).await?;
        let queries = validate::search(&rec.spec, &queries, k).map_err(|e| e.to_wire())?;
        validate::search_params(&params).map_err(|e| e.to_wire())?;
        if let Some(json) = &filter {
            // Refused here, once, rather than by every replica.
            Self::check_filter(&rec, json)?;
        }
        let spec = self.read_spec(&rec, opts)?;
        let reads = (0..rec.spec.shards).map(|shard| {
            let key = ShardRef {
                collection: rec.id,
                shard,
            };
            let req = if let Some(filter) = &filter {
                ShardRead::SearchV3 {
                    shard: key,
                    queries: queries.clone(),
                    k,
                    with_payload,
                    params,
                    filter: filter.clone(),
                }
            } else if params == SearchParams::default() {
                ShardRead::Search {
                    shard: key,
                    queries: queries.clone(),
                    k,
                    with_payload,
                }
            } else {
                ShardRead::SearchV2 {
                    shard: key,
                    queries: queries.clone(),
                    k,
                    with_payload,
                    params,
                }
            };
            let spec = &spec;
            async move { (key, self.read_shard_at(key, req, spec).await) }
        });
        let mut per_query: Vec<Vec<Vec<Hit>>> = vec![Vec::new(); queries.len()];
        let mut tokens = Vec::new();
        for (key, reply) in futures::future::join_all(reads).await {
            let (reply, served) = reply?;
            tokens.push(token_of(key, served));
            match reply {
                ShardReadReply::Hits(lists) => {
                    for (q, hits) in lists.into_iter().enumerate().take(per_query.len()) {
                        per_query[q].push(hits);
                    }
                }
                other => return Err(unexpected(other)),
            }
        }
        let hits = per_query
            .into_iter()
            .map(|lists| merge_hits(rec.spec.metric, k as usize, lists))
            .collect();
        Ok((hits, tokens))
    }

    /// The points found among `ids`, in request order, at the default
    /// level.
    pub async fn get(&self, name: &str, ids: Vec<u64>) -> Result<Vec<PointRecord>, WireError> {
        Ok(self.get_at(name, ids, ReadOptions::default()).await?.0)
    }

    /// The points found among `ids`, in request order, each shard read as
    /// `opts` asks; with the op each shard was read at.
    pub async fn get_at(
        &self,
        name: &str,
        ids: Vec<u64>,
        opts: ReadOptions,
    ) -> Result<(Vec<PointRecord>, Vec<SessionToken>), WireError> {
        let rec = self.collection(name).await?;
        validate::ids(&ids).map_err(|e| e.to_wire())?;
        let spec = self.read_spec(&rec, opts)?;
        let groups = by_shard(ids.clone(), |id| *id, rec.spec.shards);
        let reads = groups.into_iter().map(|(shard, ids)| {
            let key = ShardRef {
                collection: rec.id,
                shard,
            };
            let spec = &spec;
            async move {
                (
                    key,
                    self.read_shard_at(key, ShardRead::Get { shard: key, ids }, spec).await,
                )
            }
        });
        let mut found: BTreeMap<u64, PointRecord> = BTreeMap::new();
        let mut tokens = Vec::new();
        for (key, reply) in futures::future::join_all(reads).await {
            let (reply, served) = reply?;
            tokens.push(token_of(key, served));
            match reply {
                ShardReadReply::Points(points) => found.extend(points.into_iter().map(|p| (p.id, p))),
                other => return Err(unexpected(other)),
            }
        }
        Ok((ids.iter().filter_map(|id| found.remove(id)).collect(), tokens))
    }

    /// Checks a filter (JSON) against the collection's payload indexes.
    fn check_filter(rec: &CollectionRecord, json: &str) -> Result<(), WireError> {
        let parsed = crate::replication::reads::parse_filter(json)?;
        edgevec_engine::payload::Schema::new(&rec.fields)
            .compile(&parsed)
            .map(|_| ())
            .map_err(|e| e.to_wire())
    }

    /// Live points of `name`, or those that pass `filter` (JSON), each
    /// shard read as `opts` asks; with the op each shard was read at.
    pub async fn count_at(
        &self,
        name: &str,
        filter: Option<String>,
        opts: ReadOptions,
    ) -> Result<(u64, Vec<SessionToken>), WireError> {
        let rec = self.collection(name).await?;
        if let Some(json) = &filter {
            Self::check_filter(&rec, json)?;
        }
        let spec = self.read_spec(&rec, opts)?;
        let reads = (0..rec.spec.shards).map(|shard| {
            let key = ShardRef {
                collection: rec.id,
                shard,
            };
            let req = ShardRead::Count {
                shard: key,
                filter: filter.clone(),
            };
            let spec = &spec;
            async move { (key, self.read_shard_at(key, req, spec).await) }
        });
        let (mut count, mut tokens) = (0, Vec::new());
        for (key, reply) in futures::future::join_all(reads).await {
            let (reply, served) = reply?;
            tokens.push(token_of(key, served));
            match reply {
                ShardReadReply::Count(n) => count += n,
                other => return Err(unexpected(other)),
            }
        }
        Ok((count, tokens))
    }

    /// Deletes the points of `name` that pass `filter` (JSON): page by
    /// page, each shard's matching ids are read from its primary (a
    /// `strong` read, so every acknowledged write is seen) and deleted
    /// through the write path. Points written meanwhile that pass may or
    /// may not be deleted. The outcome counts the points deleted.
    pub async fn delete_by_filter(&self, name: &str, filter: String) -> Result<WriteOutcome, WireError> {
        const PAGE: u32 = 10_000;
        let rec = self.collection(name).await?;
        Self::check_filter(&rec, &filter)?;
        let strong = ReadOptions {
            consistency: Some("strong".into()),
            ..ReadOptions::default()
        };
        let spec = self.read_spec(&rec, strong)?;
        let mut total = WriteOutcome {
            ack: Default::default(),
            tokens: Vec::new(),
            error: None,
        };
        'shards: for shard in 0..rec.spec.shards {
            let key = ShardRef {
                collection: rec.id,
                shard,
            };
            let mut after = None;
            loop {
                let req = ShardRead::Ids {
                    shard: key,
                    filter: filter.clone(),
                    after,
                    limit: PAGE,
                };
                let ids = match self.read_shard_at(key, req, &spec).await?.0 {
                    ShardReadReply::Ids(ids) => ids,
                    other => return Err(unexpected(other)),
                };
                let Some(&last) = ids.last() else { break };
                let full = ids.len() as u32 == PAGE;
                let outcome = self.write(&rec, None, vec![(shard, WriteOp::Delete(ids))]).await;
                total.ack.count += outcome.ack.count;
                total.ack.lsns.extend(outcome.ack.lsns);
                total.tokens.extend(outcome.tokens);
                if let Some(e) = outcome.error {
                    // What was deleted so far is counted; the rest is not.
                    total.error = Some(e);
                    break 'shards;
                }
                if !full {
                    break;
                }
                after = Some(last);
            }
        }
        Ok(total)
    }

    /// Counts of `name` from one in-sync replica of every shard.
    pub async fn describe(&self, name: &str) -> Result<CollectionInfo, WireError> {
        let rec = self.collection(name).await?;
        Ok(self.info(&rec).await.0)
    }

    /// [`Router::describe`] with the index parameters and the builds under
    /// way.
    pub async fn details(&self, name: &str) -> Result<CollectionDetails, WireError> {
        let rec = self.collection(name).await?;
        let (info, builds) = self.info(&rec).await;
        Ok(CollectionDetails {
            info,
            index: rec.index,
            builds,
            fields: rec.fields.clone(),
        })
    }

    /// Every collection with its counts.
    pub async fn list(&self) -> Vec<CollectionInfo> {
        let all: Vec<CollectionRecord> = self.plane.meta.state().collections().cloned().collect();
        futures::future::join_all(all.iter().map(|rec| async { self.info(rec).await.0 })).await
    }

    /// A collection's counts, and its index builds under way; a shard no
    /// replica answers for counts 0.
    async fn info(&self, rec: &CollectionRecord) -> (CollectionInfo, Vec<IndexBuild>) {
        let reads = (0..rec.spec.shards).map(|shard| {
            self.shard_report(ShardRef {
                collection: rec.id,
                shard,
            })
        });
        let mut shards = Vec::new();
        let mut segments = Vec::new();
        let mut builds = Vec::new();
        for (shard, report) in futures::future::join_all(reads).await.into_iter().enumerate() {
            shards.push(ShardInfo {
                shard: shard as u32,
                points: report.as_ref().map_or(0, |r| r.0.points),
                lsn: report.as_ref().map_or(0, |r| r.0.applied_lsn),
            });
            if let Some((r, b)) = report {
                segments.extend(r.segments);
                builds.extend(b);
            }
        }
        let info = CollectionInfo {
            spec: rec.spec.clone(),
            points: shards.iter().map(|s| s.points).sum(),
            shards,
            segments,
        };
        (info, builds)
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
            let rec = self.collection(name).await?;
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

/// A shard read answered with a reply of another kind: a bug, reported.
fn unexpected(reply: ShardReadReply) -> WireError {
    WireError::new(ErrorCode::Internal, format!("unexpected reply {reply:?}"))
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
    fn the_retry_budget_is_a_share_of_the_reads() {
        let b = RetryBudget::with_rate(0.0);
        for _ in 0..RETRY_BURST as usize {
            assert!(b.withdraw());
        }
        assert!(!b.withdraw(), "the burst is spent");
        // Five reads earn one retry.
        for _ in 0..5 {
            b.deposit();
        }
        assert!(b.withdraw());
        assert!(!b.withdraw());
        assert_eq!(b.retries.load(std::sync::atomic::Ordering::Relaxed), 51);
        assert_eq!(b.refused.load(std::sync::atomic::Ordering::Relaxed), 2);
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
