//! Requests and replies of the client ALPN ([`crate::ALPN_CLIENT`]).
//!
//! Every request carries the caller's API token; the node checks it and the
//! token's role before it looks at anything else.

use serde::{Deserialize, Serialize};

use crate::error::WireError;
use crate::filter::FieldSpec;
use crate::types::*;

/// A client request, versioned by variant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ClientRequest {
    V1(RequestV1),
}

/// A reply to a [`ClientRequest`], in the version of the request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ClientResponse {
    V1(Result<ReplyV1, WireError>),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestV1 {
    pub token: String,
    pub op: OpV1,
}

/// Operations of protocol version 1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum OpV1 {
    Status,
    CreateCollection(CollectionSpec),
    ListCollections,
    DescribeCollection {
        name: String,
    },
    DropCollection {
        name: String,
    },
    Upsert {
        collection: String,
        points: Vec<Point>,
    },
    Delete {
        collection: String,
        ids: Vec<u64>,
    },
    Get {
        collection: String,
        ids: Vec<u64>,
    },
    Search {
        collection: String,
        queries: Vec<Vec<f32>>,
        k: u32,
        with_payload: bool,
    },
    /// Leader, term and every member with its health.
    ClusterStatus,
    /// Adds a node at runtime: learner first, then voter if it has the
    /// `meta` role.
    AddNode(NodeSpec),
    /// Removes a node from the cluster (refused if it would leave the
    /// voters without a majority).
    RemoveNode {
        id: u64,
    },
    /// Creates a collection with replicated shards.
    CreateReplicated {
        spec: CollectionSpec,
        replication: ReplicationSpec,
    },
    /// Changes the replica count of a collection while it serves (the
    /// Milvus verb): new replicas catch up, then join the in-sync set;
    /// surplus ones are dropped once the shard map no longer names them.
    Load {
        name: String,
        replication: ReplicationSpec,
    },
    /// Shard configurations and replica states of one collection (or all).
    Shards {
        collection: Option<String>,
    },
    /// The policy plugins and their state on every node.
    ListPlugins,
    /// Choose the load-balancing plugin of a collection (admin).
    SetLoadBalancer {
        collection: String,
        plugin: String,
    },
    /// Deploy a version of a policy plugin (admin): a WebAssembly core
    /// module or component of the `edgevec:policy` contract, at most
    /// [`crate::limits::MAX_PLUGIN_BYTES`].
    DeployPlugin {
        name: String,
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
        params: Vec<(String, String)>,
    },
    /// Remove every deployed version of a plugin (admin).
    RemovePlugin {
        name: String,
    },
    /// Make the shipped load balancers decide with their native build
    /// (`true`) or their WebAssembly build (admin; a cluster setting).
    SetNativePolicies {
        native: bool,
    },
    /// `Upsert` that answers with session tokens ([`ReplyV1::WrittenV2`]).
    UpsertV2 {
        collection: String,
        points: Vec<Point>,
    },
    /// `Delete` that answers with session tokens ([`ReplyV1::WrittenV2`]).
    DeleteV2 {
        collection: String,
        ids: Vec<u64>,
    },
    /// `Search` at a consistency level; answers [`ReplyV1::HitsAt`].
    SearchV2 {
        collection: String,
        queries: Vec<Vec<f32>>,
        k: u32,
        with_payload: bool,
        read: ReadOptions,
    },
    /// `Get` at a consistency level; answers [`ReplyV1::PointsAt`].
    GetV2 {
        collection: String,
        ids: Vec<u64>,
        read: ReadOptions,
    },
    /// Hedge the reads of a collection (admin): a read also goes to the
    /// next replica when the first has not answered within its p95.
    SetHedging {
        collection: String,
        on: bool,
    },
    /// `CreateReplicated` with the collection's index parameters.
    CreateReplicatedV2 {
        spec: CollectionSpec,
        replication: ReplicationSpec,
        index: IndexSpec,
    },
    /// `SearchV2` with search parameters (`ef`, exact); answers
    /// [`ReplyV1::HitsAt`].
    SearchV3 {
        collection: String,
        queries: Vec<Vec<f32>>,
        k: u32,
        with_payload: bool,
        read: ReadOptions,
        params: SearchParams,
    },
    /// `DescribeCollection` with the index parameters and builds under way;
    /// answers [`ReplyV1::Details`].
    DescribeCollectionV2 {
        name: String,
    },
    /// `CreateReplicatedV2` with payload indexes: the fields filters may
    /// use ([`crate::filter`]).
    CreateCollectionV3 {
        spec: CollectionSpec,
        replication: ReplicationSpec,
        index: IndexSpec,
        fields: Vec<FieldSpec>,
    },
    /// `DescribeCollectionV2` with the payload indexes; answers
    /// [`ReplyV1::DetailsV2`].
    DescribeCollectionV3 {
        name: String,
    },
    /// `SearchV3` of the points that pass `filter`: JSON in the syntax of
    /// [`crate::filter`] (text, so the node reads it with its bounds);
    /// answers [`ReplyV1::HitsAt`].
    SearchV4 {
        collection: String,
        queries: Vec<Vec<f32>>,
        k: u32,
        with_payload: bool,
        read: ReadOptions,
        params: SearchParams,
        filter: String,
    },
    /// Live points of a collection, or of those that pass `filter` (JSON);
    /// answers [`ReplyV1::Count`].
    Count {
        collection: String,
        filter: Option<String>,
        read: ReadOptions,
    },
    /// Deletes the points that pass `filter` (JSON) when each shard's
    /// primary serves it; answers [`ReplyV1::WrittenV2`] with the points
    /// deleted.
    DeleteByFilter {
        collection: String,
        filter: String,
    },
}

impl OpV1 {
    /// Short name for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            OpV1::Status => "status",
            OpV1::CreateCollection(_) => "create_collection",
            OpV1::ListCollections => "list_collections",
            OpV1::DescribeCollection { .. } | OpV1::DescribeCollectionV2 { .. } | OpV1::DescribeCollectionV3 { .. } => {
                "describe_collection"
            }
            OpV1::DropCollection { .. } => "drop_collection",
            OpV1::Upsert { .. } => "upsert",
            OpV1::Delete { .. } => "delete",
            OpV1::Get { .. } => "get",
            OpV1::Search { .. } => "search",
            OpV1::ClusterStatus => "cluster_status",
            OpV1::AddNode(_) => "add_node",
            OpV1::RemoveNode { .. } => "remove_node",
            OpV1::CreateReplicated { .. } | OpV1::CreateReplicatedV2 { .. } | OpV1::CreateCollectionV3 { .. } => {
                "create_collection"
            }
            OpV1::Load { .. } => "load",
            OpV1::Shards { .. } => "shards",
            OpV1::ListPlugins => "list_plugins",
            OpV1::SetLoadBalancer { .. } => "set_load_balancer",
            OpV1::DeployPlugin { .. } => "deploy_plugin",
            OpV1::RemovePlugin { .. } => "remove_plugin",
            OpV1::SetNativePolicies { .. } => "set_native_policies",
            OpV1::UpsertV2 { .. } => "upsert",
            OpV1::DeleteV2 { .. } => "delete",
            OpV1::SearchV2 { .. } | OpV1::SearchV3 { .. } | OpV1::SearchV4 { .. } => "search",
            OpV1::Count { .. } => "count",
            OpV1::DeleteByFilter { .. } => "delete",
            OpV1::GetV2 { .. } => "get",
            OpV1::SetHedging { .. } => "set_hedging",
        }
    }
}

/// Replies of protocol version 1, one per operation kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ReplyV1 {
    Status(NodeStatus),
    Created,
    Collections(Vec<CollectionInfo>),
    Collection(CollectionInfo),
    Dropped,
    Written(WriteAck),
    Points(Vec<PointRecord>),
    /// One result list per query, in query order.
    Hits(Vec<Vec<Hit>>),
    ClusterStatus(ClusterStatus),
    /// Membership after the change: voter ids and learner ids.
    Membership {
        voters: Vec<u64>,
        learners: Vec<u64>,
    },
    Shards(Vec<CollectionShards>),
    /// `load` committed the new replica count.
    Loaded,
    Plugins(Vec<crate::types::PluginInfo>),
    /// The collection's load balancer is now the one asked for.
    LoadBalancerSet,
    /// The deployed version's number and the hex SHA-256 of its bytes.
    PluginDeployed {
        version: u64,
        sha256: String,
    },
    PluginRemoved,
    NativePoliciesSet,
    WrittenV2(WriteOutcome),
    /// One result list per query, and the op each shard was read at.
    HitsAt {
        hits: Vec<Vec<Hit>>,
        tokens: Vec<SessionToken>,
    },
    /// The points found, and the op each shard was read at.
    PointsAt {
        points: Vec<PointRecord>,
        tokens: Vec<SessionToken>,
    },
    HedgingSet,
    Details(CollectionDetailsV1),
    /// Answer to `DescribeCollectionV3`.
    DetailsV2(CollectionDetails),
    /// Answer to `Count`, with the op each shard was read at.
    Count {
        count: u64,
        tokens: Vec<SessionToken>,
    },
}

/// Most bytes a request's token occupies at the start of its body (the
/// envelope's variant, the token's length and the token): a server reads
/// this much, checks the token, and only then reads the rest.
pub const TOKEN_PREFIX_BYTES: usize = 1024;

// The variant (1 byte) and a length varint (at most 10) fit beside the
// longest token.
const _: () = assert!(crate::limits::MAX_TOKEN_BYTES + 11 <= TOKEN_PREFIX_BYTES);

/// The token of an encoded [`ClientRequest`] from the first bytes of its
/// body, without decoding the rest; `None` if those bytes do not start a
/// version-1 request with a UTF-8 token that fits in them.
pub fn token_prefix(body: &[u8]) -> Option<&str> {
    // postcard: the variant index (V1 = 0), then the token as a varint
    // length and its bytes.
    let (&variant, mut rest) = body.split_first()?;
    if variant != 0 {
        return None;
    }
    let mut len: u64 = 0;
    for shift in (0..64).step_by(7) {
        let (&b, tail) = rest.split_first()?;
        rest = tail;
        len |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            let len = usize::try_from(len).ok()?;
            return std::str::from_utf8(rest.get(..len)?).ok();
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_is_read_from_the_start_of_the_body() {
        for token in ["", "t", &"x".repeat(200), &"é".repeat(300)] {
            let req = ClientRequest::V1(RequestV1 {
                token: token.to_string(),
                op: OpV1::Get {
                    collection: "c".into(),
                    ids: (0..10_000).collect(),
                },
            });
            let body = crate::codec::encode(&req);
            let prefix = &body[..body.len().min(TOKEN_PREFIX_BYTES)];
            assert_eq!(token_prefix(prefix), Some(token));
        }
        assert_eq!(token_prefix(&[]), None);
        assert_eq!(token_prefix(&[1, 1, b'a']), None, "not version 1");
        assert_eq!(token_prefix(&[0, 5, b'a']), None, "cut short");
        assert_eq!(token_prefix(&[0, 0xff, 0xff, 0xff]), None, "length never ends");
        assert_eq!(token_prefix(&[0, 2, 0xff, 0xfe]), None, "not UTF-8");
    }
}
