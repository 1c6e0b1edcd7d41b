//! Domain types carried by requests and replies.
//!
//! These are plain data. Validation against a collection's schema happens in
//! the node (one place, so every entry point agrees); the limits it applies
//! are in [`crate::limits`].

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// How vectors are compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Metric {
    /// Euclidean distance; smaller is closer. Scores are the distance.
    L2,
    /// Inner product; larger is closer. Scores are the product.
    InnerProduct,
    /// Cosine similarity; larger is closer. Vectors are normalised on insert,
    /// scores are the similarity in [-1, 1].
    Cosine,
}

impl Metric {
    /// The name used in the CLI, config files and JSON output.
    pub fn as_str(self) -> &'static str {
        match self {
            Metric::L2 => "l2",
            Metric::InnerProduct => "ip",
            Metric::Cosine => "cosine",
        }
    }

    /// Whether a larger score means a closer point.
    pub fn higher_is_better(self) -> bool {
        !matches!(self, Metric::L2)
    }
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Metric {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "l2" | "euclid" | "euclidean" => Ok(Metric::L2),
            "ip" | "dot" | "inner_product" => Ok(Metric::InnerProduct),
            "cosine" | "cos" => Ok(Metric::Cosine),
            other => Err(format!("unknown metric {other:?}: use l2, ip or cosine")),
        }
    }
}

/// What a create-collection request asks for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CollectionSpec {
    pub name: String,
    pub dim: u32,
    pub metric: Metric,
    /// Hash partitions; at least 1.
    pub shards: u32,
    /// Rows of a growing segment before it is sealed and indexed.
    pub seal_rows: u32,
}

/// How a collection's segments are indexed (HNSW build parameters);
/// fixed at creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexSpec {
    /// Graph degree (hnswlib `M`): links per row. Larger recalls better at
    /// a given `ef` and costs memory (about 8·M bytes per row) and build
    /// time.
    pub m: u32,
    /// Candidates considered while linking a row: larger builds a better
    /// graph, more slowly.
    pub ef_construction: u32,
}

impl IndexSpec {
    /// Checks the bounds of [`crate::limits`]; the error names the field.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        use crate::limits::*;
        if !(MIN_HNSW_M..=MAX_HNSW_M).contains(&self.m) {
            return Err((
                "hnsw_m",
                format!("hnsw m must be between {MIN_HNSW_M} and {MAX_HNSW_M}, got {}", self.m),
            ));
        }
        if !(MIN_EF_CONSTRUCTION..=MAX_EF_CONSTRUCTION).contains(&self.ef_construction) {
            return Err((
                "ef_construction",
                format!(
                    "ef_construction must be between {MIN_EF_CONSTRUCTION} and {MAX_EF_CONSTRUCTION}, got {}",
                    self.ef_construction
                ),
            ));
        }
        Ok(())
    }
}

impl Default for IndexSpec {
    fn default() -> Self {
        IndexSpec {
            m: crate::limits::DEFAULT_HNSW_M,
            ef_construction: crate::limits::DEFAULT_EF_CONSTRUCTION,
        }
    }
}

/// A point as written by a client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Point {
    pub id: u64,
    pub vector: Vec<f32>,
    /// JSON text, if any. Carried as text because the wire format is not
    /// self-describing; the node checks it parses and respects the size cap.
    pub payload: Option<String>,
}

/// A point as read back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PointRecord {
    pub id: u64,
    /// The stored vector (normalised for cosine collections).
    pub vector: Vec<f32>,
    pub payload: Option<String>,
}

/// One search result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hit {
    pub id: u64,
    /// Distance for `l2` (smaller is better), product for `ip`, similarity
    /// for `cosine` (larger is better). Results come best first.
    pub score: f32,
    pub payload: Option<String>,
}

/// Whether a segment still takes rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SegmentState {
    Growing,
    Sealed,
}

/// State of a sealed segment's HNSW index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum IndexState {
    /// Growing segment: searched by brute force.
    None,
    /// Sealed, index being built: searched by brute force meanwhile.
    Building,
    /// Sealed and indexed.
    Ready,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SegmentInfo {
    pub shard: u32,
    pub id: u64,
    pub state: SegmentState,
    /// Rows written to the segment (including those deleted since).
    pub rows: u64,
    /// Rows of the segment that are deleted or replaced (tombstones).
    pub deleted: u64,
    pub index: IndexState,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardInfo {
    pub shard: u32,
    /// Live points.
    pub points: u64,
    /// Last applied log sequence number.
    pub lsn: u64,
}

/// What describe returns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CollectionInfo {
    pub spec: CollectionSpec,
    /// Live points in all shards.
    pub points: u64,
    pub shards: Vec<ShardInfo>,
    pub segments: Vec<SegmentInfo>,
}

/// An index build of a sealed segment that has started and not finished.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexBuild {
    pub shard: u32,
    pub segment: u64,
    /// Rows in the graph so far, of `rows`.
    pub rows_indexed: u64,
    pub rows: u64,
}

/// What `DescribeCollectionV2` returns: [`CollectionInfo`], the index
/// parameters, and the index builds under way (of the replica that
/// answered for each shard).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CollectionDetailsV1 {
    pub info: CollectionInfo,
    pub index: IndexSpec,
    pub builds: Vec<IndexBuild>,
}

/// What `DescribeCollectionV3` returns: [`CollectionDetailsV1`] and the
/// collection's payload indexes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CollectionDetails {
    pub info: CollectionInfo,
    pub index: IndexSpec,
    pub builds: Vec<IndexBuild>,
    pub fields: Vec<crate::filter::FieldSpec>,
}

/// What a write returns: per shard touched, the LSN that now covers it.
/// It is the client's session token for read-your-writes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WriteAck {
    /// Rows the upsert carried; for a delete, the points that existed and
    /// were deleted (ids that did not exist count for nothing).
    pub count: u64,
    /// `(shard, lsn)` for every shard the write touched.
    pub lsns: Vec<(u32, u64)>,
}

/// A session token: the op of one shard a client has seen (written, or
/// read). A `session` read of that shard is served only by a replica
/// that has applied it. Tokens of a dropped collection never match its
/// re-creation: the collection id differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SessionToken {
    pub collection: u64,
    pub shard: u32,
    pub term: u64,
    pub lsn: u64,
}

impl SessionToken {
    /// Keeps the later of two tokens of the same shard (a re-created
    /// collection's token replaces the old one's).
    pub fn merge_into(tokens: &mut Vec<SessionToken>, new: SessionToken) {
        match tokens.iter_mut().find(|t| t.shard == new.shard) {
            Some(t) if t.collection != new.collection || (new.term, new.lsn) > (t.term, t.lsn) => *t = new,
            Some(_) => {}
            None => tokens.push(new),
        }
    }
}

/// How a search looks for neighbours; the default walks each segment's
/// HNSW graph with the default expansion.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SearchParams {
    /// HNSW search expansion: candidates kept while walking a segment's
    /// graph. Larger finds more of the true neighbours and costs more; at
    /// least `k` is used. 0: [`crate::limits::DEFAULT_SEARCH_EF`]; at most
    /// [`crate::limits::MAX_SEARCH_EF`].
    pub ef: u32,
    /// Compare the query with every live point (brute force) instead of
    /// walking the index: exact results, at a cost linear in the points.
    pub exact: bool,
}

/// How a read is served: its consistency level, the session tokens it
/// must see, the client's zone and its time budget.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadOptions {
    /// `strong`, `bounded` (the collection's bound), `bounded:<ms>`,
    /// `session`, `eventually`, or a deployed consistency plugin as
    /// `<name>` or `<name>:<number>`; `None`: the default, `bounded:5000`.
    pub consistency: Option<String>,
    /// The client's tokens for the collection's shards (used by
    /// `session`, and given to custom plugins).
    pub session: Vec<SessionToken>,
    /// The client's zone (a zone of cluster.toml); `None`: the zone of the
    /// node it reached.
    pub zone: Option<String>,
    /// How long the node may work on the read; `None`: the node's default.
    pub timeout_ms: Option<u32>,
}

/// What a write returns, with session tokens: also when some shards
/// failed (`error`), the tokens of those that were written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WriteOutcome {
    pub ack: WriteAck,
    pub tokens: Vec<SessionToken>,
    /// Set when not every shard was written; `ack.count` then counts only
    /// what the written shards took.
    pub error: Option<crate::error::WireError>,
}

impl WriteOutcome {
    /// The ack, or the error when not every shard was written.
    pub fn into_result(self) -> Result<WriteAck, crate::error::WireError> {
        match self.error {
            None => Ok(self.ack),
            Some(e) => Err(e),
        }
    }
}

/// A node's view of itself, for `edgevec status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub node_id: u64,
    pub version: String,
    pub addr: String,
    pub zone: String,
    pub roles: Vec<String>,
    pub uptime_ms: u64,
    pub collections: u32,
}

impl CollectionSpec {
    /// A spec with one shard and the default seal size.
    pub fn new(name: impl Into<String>, dim: u32, metric: Metric) -> Self {
        Self {
            name: name.into(),
            dim,
            metric,
            shards: 1,
            seal_rows: crate::limits::DEFAULT_SEAL_ROWS,
        }
    }

    pub fn with_shards(mut self, shards: u32) -> Self {
        self.shards = shards;
        self
    }

    pub fn with_seal_rows(mut self, seal_rows: u32) -> Self {
        self.seal_rows = seal_rows;
        self
    }
}

/// A node to add to the cluster at runtime.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeSpec {
    pub id: u64,
    /// QUIC address.
    pub addr: String,
    pub zone: String,
    /// Any of `meta`, `data`, `proxy`.
    pub roles: Vec<String>,
}

/// One member as the metadata leader sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterNode {
    pub id: u64,
    pub addr: String,
    pub zone: String,
    pub roles: Vec<String>,
    /// `up`, `suspect` or `dead` (committed through Raft).
    pub state: String,
    /// Whether the node votes in the metadata Raft (else a learner).
    pub voter: bool,
    /// Milliseconds since the leader last heard from the node.
    pub last_heartbeat_ms: Option<u64>,
    /// The node's applied metadata log index, from its last heartbeat.
    pub applied_index: Option<u64>,
}

/// The cluster as the answering node (or the leader it asked) sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub leader: Option<u64>,
    pub term: u64,
    pub committed_index: Option<u64>,
    pub applied_index: Option<u64>,
    /// The node whose view this is.
    pub answered_by: u64,
    pub nodes: Vec<ClusterNode>,
}

/// Identifies one op of a shard's log: the primary term that wrote it and
/// its LSN. Two replicas hold the same op at an LSN only if the terms match
/// too. Ordered by term, then LSN (the order used to pick the most complete
/// log). `OpId::default()` (0, 0) is the position before the first op.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct OpId {
    pub term: u64,
    pub lsn: u64,
}

impl OpId {
    pub const ZERO: OpId = OpId { term: 0, lsn: 0 };

    pub fn new(term: u64, lsn: u64) -> Self {
        OpId { term, lsn }
    }
}

/// Term of the op at `lsn` in a log that ends at `last` and whose term
/// history is `history` ((term, first LSN) pairs, ascending): the term of
/// the last run starting at or before `lsn`. `Some(0)` for LSN 0 (the empty
/// prefix), `None` past the end of the log.
pub fn term_at(history: &[(u64, u64)], last: OpId, lsn: u64) -> Option<u64> {
    if lsn == 0 {
        return Some(0);
    }
    if lsn > last.lsn {
        return None;
    }
    history
        .iter()
        .rev()
        .find(|(_, first)| *first <= lsn)
        .map(|(term, _)| *term)
}

impl fmt::Display for OpId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.term, self.lsn)
    }
}

/// How many copies of each shard a collection keeps, and how many must
/// hold a write before it is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicationSpec {
    /// Copies of every shard, on distinct data nodes (≥ 1).
    pub replicas: u32,
    /// Replicas that must hold a write before it is acknowledged; `None`
    /// takes the default: 2 when `replicas` ≥ 3, else 1.
    pub min_insync: Option<u32>,
}

impl ReplicationSpec {
    pub fn new(replicas: u32) -> Self {
        ReplicationSpec {
            replicas,
            min_insync: None,
        }
    }

    /// `min_insync` with the default applied.
    pub fn effective_min_insync(&self) -> u32 {
        self.min_insync.unwrap_or(if self.replicas >= 3 { 2 } else { 1 })
    }
}

/// One replica of a shard as `describe` and `status` show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicaStatus {
    pub node: u64,
    /// `in-sync`, `catching-up`, `initializing` or `offline` (metadata).
    pub state: String,
    pub primary: bool,
    /// Holds every acknowledged write (may become primary).
    pub eligible: bool,
    /// From the replica itself; `None` when it did not answer.
    pub applied_lsn: Option<u64>,
    pub last: Option<OpId>,
    pub points: Option<u64>,
    /// Catch-up progress as the primary reports it.
    pub catch_up: Option<String>,
}

/// One shard's configuration and replicas.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardStatus {
    pub shard: u32,
    /// Configuration version (bumped by every change).
    pub version: u64,
    /// Primary term (bumped when the primary changes).
    pub term: u64,
    pub primary: Option<u64>,
    pub replicas: Vec<ReplicaStatus>,
    /// What is wrong, if anything: under-replicated, no live in-sync
    /// replica, no primary.
    pub problems: Vec<String>,
}

/// A collection's replication as the metadata and its replicas report it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CollectionShards {
    pub collection: String,
    /// Stable id (never reused, not the name).
    pub id: u64,
    pub replicas: u32,
    pub min_insync: u32,
    pub shards: Vec<ShardStatus>,
}

/// One policy plugin as one node runs it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PluginNodeState {
    pub node: u64,
    pub name: String,
    /// `load-balancer` or `consistency`; empty when not loaded.
    pub kind: String,
    /// Active version (0: none loaded).
    pub version: u64,
    /// `built-in`, or where a deployed version came from.
    pub origin: String,
    /// Hex SHA-256 of the plugin's bytes.
    pub sha256: String,
    pub size: u64,
    /// `loaded`, `loading`, `failed` (could not load), `disabled` (circuit
    /// breaker open) or `unreachable` (the node did not answer).
    pub state: String,
    /// Read from the node's compiled-artifact cache.
    pub from_cache: bool,
    pub calls: u64,
    pub failures: u64,
    /// Decisions the built-in rule made instead of the plugin.
    pub fallbacks: u64,
    /// Why it is failed or disabled, or its last failure.
    pub reason: Option<String>,
}

/// A policy plugin across the cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PluginInfo {
    pub name: String,
    pub kind: String,
    pub version: u64,
    pub origin: String,
    pub sha256: String,
    pub size: u64,
    /// Collections whose reads it decides.
    pub collections: Vec<String>,
    /// Its state on each node, by node id.
    pub nodes: Vec<PluginNodeState>,
}
