//! Async client library for edgevec.
//!
//! A [`Client`] holds one QUIC connection to one node of the cluster and
//! opens a stream per request. It knows several endpoints: when the node it
//! talks to is lost, or sends nothing for [`SILENT_AFTER`] while a request
//! waits (a live node acks the client's keep-alives even while it works),
//! it moves to the next one. Requests that are safe to repeat (everything
//! but collection create/drop) are retried there transparently; others
//! report [`ClientError::Unavailable`].
//!
//! ```no_run
//! use edgevec_client::{Client, ClientConfig, CollectionSpec, Metric, Point};
//!
//! # async fn demo() -> Result<(), edgevec_client::ClientError> {
//! let config = ClientConfig::from_ca_file(
//!     vec!["127.0.0.1:7101".parse().unwrap()],
//!     "certs/ca.pem".as_ref(),
//!     "dev-admin-token-change-me",
//! )?;
//! let client = Client::connect(config).await?;
//! client.create_collection(CollectionSpec::new("docs", 3, Metric::Cosine)).await?;
//! client
//!     .upsert("docs", vec![Point { id: 1, vector: vec![0.1, 0.2, 0.3], payload: Some(r#"{"title":"hello"}"#.into()) }])
//!     .await?;
//! let hits = client.search("docs", &[0.1, 0.2, 0.3], 10).await?;
//! println!("best: {} ({})", hits[0].id, hits[0].score);
//! # Ok(()) }
//! ```

pub mod error;
pub mod rpc;
pub mod tls;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use edgevec_proto::client::{ClientRequest, ClientResponse, OpV1, ReplyV1, RequestV1};
pub use edgevec_proto::{
    ClusterNode, ClusterStatus, CollectionDetails, CollectionInfo, CollectionShards, CollectionSpec, ErrorCode,
    FieldKind, FieldSpec, Filter, Hit, IndexBuild, IndexSpec, Metric, NodeSpec, NodeStatus, OpId, Point, PointRecord,
    ReadOptions, ReplicaStatus, ReplicationSpec, SearchParams, SessionToken, ShardStatus, WireError, WriteAck,
};
use tokio::sync::Mutex;

pub use error::ClientError;
use rpc::CallError;

/// How to reach and authenticate to a cluster.
#[derive(Clone)]
pub struct ClientConfig {
    /// Nodes to try, in order.
    pub endpoints: Vec<SocketAddr>,
    /// PEM of the cluster CA that signed the node certificates.
    pub ca_pem: Vec<u8>,
    /// API token from the cluster's configuration.
    pub token: String,
    /// Deadline of one request on one node.
    pub request_timeout: Duration,
    /// Deadline of the QUIC handshake with one node.
    pub connect_timeout: Duration,
    /// How long a request that is safe to repeat keeps being retried after
    /// retryable refusals (a shard failing over, a write whose outcome is
    /// unknown), with backoff. Zero: never retried. Reads are not retried
    /// after a refusal: the node already tried every replica until the
    /// read's deadline.
    pub retry_budget: Duration,
    /// Consistency level of reads that name none: `strong`,
    /// `bounded[:ms]`, `session`, `eventually` or a consistency plugin's
    /// name; `None`: the cluster's default (`bounded:5000`).
    pub consistency: Option<String>,
    /// The client's zone (one of cluster.toml's), for zone-aware load
    /// balancing; `None`: the zone of the node it reaches.
    pub zone: Option<String>,
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field("endpoints", &self.endpoints)
            .field("token", &"<redacted>")
            .field("request_timeout", &self.request_timeout)
            .finish()
    }
}

impl ClientConfig {
    pub fn new(endpoints: Vec<SocketAddr>, ca_pem: Vec<u8>, token: impl Into<String>) -> Self {
        Self {
            endpoints,
            ca_pem,
            token: token.into(),
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            retry_budget: Duration::from_secs(10),
            consistency: None,
            zone: None,
        }
    }

    /// Like [`ClientConfig::new`], reading the CA from a PEM file; a file
    /// without a usable certificate is refused here, naming it.
    pub fn from_ca_file(endpoints: Vec<SocketAddr>, ca: &Path, token: impl Into<String>) -> Result<Self, ClientError> {
        let pem = tls::read(ca)?;
        tls::certs_from_pem(&pem, &format!("CA file {}", ca.display()))?;
        Ok(Self::new(endpoints, pem, token))
    }
}

struct Live {
    index: usize,
    conn: quinn::Connection,
}

struct Inner {
    endpoint: quinn::Endpoint,
    config: ClientConfig,
    live: Mutex<Option<Live>>,
    /// Session tokens by collection name: the latest op of each shard
    /// this client wrote or read.
    session: std::sync::Mutex<std::collections::HashMap<String, Vec<SessionToken>>>,
    retries: RetryTokens,
}

/// The client's retry budget: each request adds a fifth of a retry, and
/// 10 more come each second, up to 50 in store; a retry spends one.
struct RetryTokens(std::sync::Mutex<(f64, std::time::Instant)>);

impl RetryTokens {
    const PER_REQUEST: f64 = 0.2;
    const PER_SEC: f64 = 10.0;
    const MOST: f64 = 50.0;

    fn new() -> Self {
        RetryTokens(std::sync::Mutex::new((Self::MOST, std::time::Instant::now())))
    }

    fn refilled(&self) -> std::sync::MutexGuard<'_, (f64, std::time::Instant)> {
        let mut st = self.0.lock().expect("retry tokens lock");
        let now = std::time::Instant::now();
        st.0 = (st.0 + now.duration_since(st.1).as_secs_f64() * Self::PER_SEC).min(Self::MOST);
        st.1 = now;
        st
    }

    fn deposit(&self) {
        let mut st = self.refilled();
        st.0 = (st.0 + Self::PER_REQUEST).min(Self::MOST);
    }

    fn withdraw(&self) -> bool {
        let mut st = self.refilled();
        let ok = st.0 >= 1.0;
        if ok {
            st.0 -= 1.0;
        }
        ok
    }
}

/// How one read is served (see [`Client::search_with`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReadOpts {
    /// Consistency level; `None`: [`ClientConfig::consistency`].
    pub consistency: Option<String>,
    /// How long the cluster may work on the read; `None`: a little less
    /// than [`ClientConfig::request_timeout`].
    pub timeout: Option<Duration>,
    /// Searches only: the HNSW search expansion (candidates kept while
    /// walking each segment's graph; larger finds more of the true
    /// neighbours, slower). `None`: the default (64).
    pub ef: Option<u32>,
    /// Searches only: compare with every point (brute force) instead of
    /// walking the index.
    pub exact: bool,
    /// Searches only: consider only the points whose payload passes this
    /// filter, JSON such as
    /// `{"must":[{"key":"lang","match":"en"},{"key":"year","range":{"gte":2020}}]}`
    /// (`must`/`should`/`must_not` over `match`, `in`, `range`, on fields
    /// the collection declared as payload indexes). `None`: every point.
    pub filter: Option<String>,
}

/// A handle to an edgevec cluster. Cheap to clone; clones share the
/// connection.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl Client {
    /// Connects to the first reachable endpoint.
    pub async fn connect(config: ClientConfig) -> Result<Client, ClientError> {
        if config.endpoints.is_empty() {
            return Err(ClientError::Config("no endpoints given".into()));
        }
        let mut quic = tls::client_config(&config.ca_pem, None, edgevec_proto::ALPN_CLIENT)?;
        quic.transport_config(Arc::new(tls::client_transport()));
        let bind: SocketAddr = if config.endpoints[0].is_ipv6() {
            "[::]:0".parse().expect("literal")
        } else {
            "0.0.0.0:0".parse().expect("literal")
        };
        let mut endpoint =
            tls::endpoint(bind, None).map_err(|e| ClientError::Config(format!("cannot open a UDP socket: {e}")))?;
        endpoint.set_default_client_config(quic);
        let client = Client {
            inner: Arc::new(Inner {
                endpoint,
                config,
                live: Mutex::new(None),
                session: std::sync::Mutex::new(std::collections::HashMap::new()),
                retries: RetryTokens::new(),
            }),
        };
        client.connection(None).await?;
        Ok(client)
    }

    /// The endpoint currently in use.
    pub async fn current_endpoint(&self) -> Option<SocketAddr> {
        let live = self.inner.live.lock().await;
        live.as_ref().map(|l| self.inner.config.endpoints[l.index])
    }

    /// Closes the connection politely; in-flight requests fail. Returns
    /// once the close has been sent to the node (at most [`CLOSE_WAIT`]),
    /// not after the connection's draining period: the node learns of the
    /// close from that packet, and a process that exits right after
    /// (the CLI) does not wait out three probe timeouts for nothing.
    /// Returns whether the close was seen sent.
    pub async fn close(&self) -> bool {
        let Some(live) = self.inner.live.lock().await.take() else {
            return true;
        };
        // Once closed, a connection sends nothing but its close: the next
        // datagram it transmits carries it.
        let before = live.conn.stats().udp_tx.datagrams;
        live.conn.close(0u32.into(), b"client closed");
        let deadline = tokio::time::Instant::now() + CLOSE_WAIT;
        loop {
            if live.conn.stats().udp_tx.datagrams > before {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// The live connection, or a new one: starting after `failed` (the
    /// endpoint that just failed) and trying each endpoint once.
    async fn connection(&self, failed: Option<usize>) -> Result<(usize, quinn::Connection), ClientError> {
        let mut live = self.inner.live.lock().await;
        if let Some(l) = live.as_ref() {
            if l.conn.close_reason().is_none() && Some(l.index) != failed {
                return Ok((l.index, l.conn.clone()));
            }
        }
        let endpoints = self.inner.config.endpoints.clone();
        let start = failed.map(|i| i + 1).unwrap_or(0);
        // Endpoints are dialled in order, each DIAL_STAGGER after the one
        // before (at once when one fails); the first handshake wins. A dead
        // first endpoint then costs DIAL_STAGGER, not connect_timeout.
        let mut dials = tokio::task::JoinSet::new();
        let mut next = (0..endpoints.len()).map(|step| (start + step) % endpoints.len());
        let mut errors = Vec::new();
        loop {
            let stagger = next.next().map(|index| {
                let (endpoint, addr, timeout) = (
                    self.inner.endpoint.clone(),
                    endpoints[index],
                    self.inner.config.connect_timeout,
                );
                dials.spawn(async move { (index, dial(&endpoint, addr, timeout).await) });
                tokio::time::sleep(DIAL_STAGGER)
            });
            let done = match stagger {
                Some(stagger) => tokio::select! {
                    done = dials.join_next() => done,
                    _ = stagger => continue,
                },
                None => dials.join_next().await,
            };
            match done {
                Some(Ok((index, Ok(conn)))) => {
                    tracing::debug!(addr = %endpoints[index], "connected");
                    *live = Some(Live {
                        index,
                        conn: conn.clone(),
                    });
                    return Ok((index, conn));
                }
                Some(Ok((index, Err(e)))) => errors.push(format!("{}: {e}", endpoints[index])),
                Some(Err(e)) => errors.push(format!("dial task failed: {e}")),
                None => break,
            }
        }
        *live = None;
        Err(ClientError::Unavailable(format!(
            "no node reachable ({})",
            errors.join("; ")
        )))
    }

    /// Sends one operation. Requests that are safe to repeat are retried,
    /// with backoff and within [`ClientConfig::retry_budget`], while the
    /// cluster answers with a retryable refusal (a shard between primaries,
    /// a write whose outcome is unknown): ids make writes idempotent.
    /// Retries also spend the client's [`RetryTokens`]: a fifth of its
    /// requests plus 10 per second, so a client never multiplies its load
    /// on a sick cluster.
    async fn request(&self, op: OpV1) -> Result<ReplyV1, ClientError> {
        // A read the node refused has been tried on every replica until its
        // deadline: repeating it would only multiply the load.
        let retry_safe = is_retry_safe(&op)
            && !matches!(
                op,
                OpV1::SearchV2 { .. }
                    | OpV1::SearchV3 { .. }
                    | OpV1::SearchV4 { .. }
                    | OpV1::GetV2 { .. }
                    | OpV1::Count { .. }
            );
        let deadline = tokio::time::Instant::now() + self.inner.config.retry_budget;
        let mut backoff = Duration::from_millis(20);
        self.inner.retries.deposit();
        loop {
            match self.request_once(&op).await {
                Err(e)
                    if retry_safe
                        && e.is_retryable()
                        && tokio::time::Instant::now() + backoff < deadline
                        && self.inner.retries.withdraw() =>
                {
                    tracing::debug!(error = %e, ?backoff, "retryable refusal; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(200));
                }
                other => return other,
            }
        }
    }

    /// One attempt, moving to the next endpoint when the node is lost (and,
    /// for requests that are safe to repeat, repeating it there).
    async fn request_once(&self, op: &OpV1) -> Result<ReplyV1, ClientError> {
        let retry_safe = is_retry_safe(op);
        let op = op.clone();
        let req = ClientRequest::V1(RequestV1 {
            token: self.inner.config.token.clone(),
            op,
        });
        let attempts = self.inner.config.endpoints.len();
        let mut failed = None;
        let mut last = String::new();
        for attempt in 0..attempts {
            let (index, conn) = self.connection(failed).await?;
            let call = rpc::call::<_, ClientResponse>(&conn, &req, self.inner.config.request_timeout);
            let answer = if retry_safe {
                unless_silent(&conn, call).await
            } else {
                call.await
            };
            match answer {
                Ok(ClientResponse::V1(Ok(reply))) => return self.keep_tokens(&req, reply),
                Ok(ClientResponse::V1(Err(e))) => return Err(e.into()),
                Err(CallError::Connection(e)) => {
                    last = format!("{}: {e}", self.inner.config.endpoints[index]);
                    tracing::debug!(attempt, error = %last, "node lost");
                    failed = Some(index);
                    if !retry_safe {
                        return Err(ClientError::Unavailable(format!(
                            "connection lost during a request that is not safe to repeat ({last}); check its effect before retrying"
                        )));
                    }
                }
                Err(CallError::Timeout(d)) => return Err(ClientError::Timeout(format!("no answer within {d:?}"))),
                Err(CallError::Protocol(e)) => return Err(ClientError::Protocol(e)),
                Err(CallError::Request(e)) => {
                    return Err(ClientError::InvalidArgument {
                        field: None,
                        message: e,
                    })
                }
            }
        }
        Err(ClientError::Unavailable(format!("every endpoint failed; last: {last}")))
    }

    /// The answering node's view of itself.
    pub async fn status(&self) -> Result<NodeStatus, ClientError> {
        match self.request(OpV1::Status).await? {
            ReplyV1::Status(s) => Ok(s),
            other => Err(unexpected(other)),
        }
    }

    pub async fn create_collection(&self, spec: CollectionSpec) -> Result<(), ClientError> {
        match self.request(OpV1::CreateCollection(spec)).await? {
            ReplyV1::Created => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Creates a collection whose shards each have `replication.replicas`
    /// copies on distinct data nodes.
    pub async fn create_replicated(
        &self,
        spec: CollectionSpec,
        replication: ReplicationSpec,
    ) -> Result<(), ClientError> {
        match self.request(OpV1::CreateReplicated { spec, replication }).await? {
            ReplyV1::Created => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// [`Client::create_replicated`] with the collection's HNSW build
    /// parameters (graph degree `m`, `ef_construction`), fixed for its
    /// life. The defaults ([`IndexSpec::default`]) go as the plain create,
    /// which nodes of earlier builds serve too.
    pub async fn create_indexed(
        &self,
        spec: CollectionSpec,
        replication: ReplicationSpec,
        index: IndexSpec,
    ) -> Result<(), ClientError> {
        if index == IndexSpec::default() {
            return self.create_replicated(spec, replication).await;
        }
        let op = OpV1::CreateReplicatedV2 {
            spec,
            replication,
            index,
        };
        match self.request(op).await? {
            ReplyV1::Created => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// [`Client::create_indexed`] with payload indexes: the top-level
    /// payload fields filters may use, each with its type (`lang:keyword`,
    /// `year:int`: [`FieldSpec::parse`]). Without any, the same as
    /// `create_indexed`.
    pub async fn create_with_fields(
        &self,
        spec: CollectionSpec,
        replication: ReplicationSpec,
        index: IndexSpec,
        fields: Vec<FieldSpec>,
    ) -> Result<(), ClientError> {
        if fields.is_empty() {
            return self.create_indexed(spec, replication, index).await;
        }
        let op = OpV1::CreateCollectionV3 {
            spec,
            replication,
            index,
            fields,
        };
        match self.request(op).await? {
            ReplyV1::Created => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Changes the replica count of a collection while it serves reads and
    /// writes; returns once the new count is committed (new replicas then
    /// catch up by themselves: watch [`Client::shards`]).
    pub async fn load(&self, name: &str, replication: ReplicationSpec) -> Result<(), ClientError> {
        let op = OpV1::Load {
            name: name.into(),
            replication,
        };
        match self.request(op).await? {
            ReplyV1::Loaded => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Shard configurations and replica states of `collection` (or of
    /// every collection).
    pub async fn shards(&self, collection: Option<&str>) -> Result<Vec<CollectionShards>, ClientError> {
        let op = OpV1::Shards {
            collection: collection.map(str::to_owned),
        };
        match self.request(op).await? {
            ReplyV1::Shards(s) => Ok(s),
            other => Err(unexpected(other)),
        }
    }

    /// Makes `plugin` (a shipped or deployed load balancer) decide which
    /// replica serves each read of `collection`.
    pub async fn set_load_balancer(&self, collection: &str, plugin: &str) -> Result<(), ClientError> {
        let op = OpV1::SetLoadBalancer {
            collection: collection.into(),
            plugin: plugin.into(),
        };
        match self.request(op).await? {
            ReplyV1::LoadBalancerSet => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Deploys `bytes` (a WebAssembly module or component of the
    /// `edgevec:policy` contract) as the next version of plugin `name`;
    /// returns the version and the hex SHA-256 of the bytes.
    pub async fn deploy_plugin(
        &self,
        name: &str,
        bytes: Vec<u8>,
        params: Vec<(String, String)>,
    ) -> Result<(u64, String), ClientError> {
        let op = OpV1::DeployPlugin {
            name: name.into(),
            bytes,
            params,
        };
        match self.request(op).await? {
            ReplyV1::PluginDeployed { version, sha256 } => Ok((version, sha256)),
            other => Err(unexpected(other)),
        }
    }

    /// Makes the shipped load balancers decide with their native build
    /// (`true`) or their WebAssembly one, on every node.
    pub async fn set_native_policies(&self, native: bool) -> Result<(), ClientError> {
        match self.request(OpV1::SetNativePolicies { native }).await? {
            ReplyV1::NativePoliciesSet => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Removes every deployed version of plugin `name`.
    pub async fn remove_plugin(&self, name: &str) -> Result<(), ClientError> {
        match self.request(OpV1::RemovePlugin { name: name.into() }).await? {
            ReplyV1::PluginRemoved => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// The policy plugins and their state on every node.
    pub async fn list_plugins(&self) -> Result<Vec<edgevec_proto::PluginInfo>, ClientError> {
        match self.request(OpV1::ListPlugins).await? {
            ReplyV1::Plugins(p) => Ok(p),
            other => Err(unexpected(other)),
        }
    }

    pub async fn list_collections(&self) -> Result<Vec<CollectionInfo>, ClientError> {
        match self.request(OpV1::ListCollections).await? {
            ReplyV1::Collections(c) => Ok(c),
            other => Err(unexpected(other)),
        }
    }

    pub async fn describe_collection(&self, name: &str) -> Result<CollectionInfo, ClientError> {
        match self.request(OpV1::DescribeCollection { name: name.into() }).await? {
            ReplyV1::Collection(c) => Ok(c),
            other => Err(unexpected(other)),
        }
    }

    /// [`Client::describe_collection`] with the collection's index
    /// parameters, its payload indexes and the index builds under way
    /// (rows in the graph so far), as the replica answering for each shard
    /// reports them.
    pub async fn collection_details(&self, name: &str) -> Result<CollectionDetails, ClientError> {
        match self.request(OpV1::DescribeCollectionV3 { name: name.into() }).await? {
            ReplyV1::DetailsV2(d) => Ok(d),
            other => Err(unexpected(other)),
        }
    }

    pub async fn drop_collection(&self, name: &str) -> Result<(), ClientError> {
        match self.request(OpV1::DropCollection { name: name.into() }).await? {
            ReplyV1::Dropped => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Turns hedged reads of `collection` on or off (admin; off by
    /// default): a read also goes to the next replica when the first has
    /// not answered within the p95 of recent reads, within the node's
    /// retry budget.
    pub async fn set_hedging(&self, collection: &str, on: bool) -> Result<(), ClientError> {
        let op = OpV1::SetHedging {
            collection: collection.into(),
            on,
        };
        match self.request(op).await? {
            ReplyV1::HedgingSet => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Keeps the session tokens a reply carries (also those of a write
    /// that failed on some shards, which then becomes its error).
    fn keep_tokens(&self, req: &ClientRequest, reply: ReplyV1) -> Result<ReplyV1, ClientError> {
        let ClientRequest::V1(RequestV1 { op, .. }) = req;
        let collection = match op {
            OpV1::UpsertV2 { collection, .. }
            | OpV1::DeleteV2 { collection, .. }
            | OpV1::SearchV2 { collection, .. }
            | OpV1::SearchV3 { collection, .. }
            | OpV1::SearchV4 { collection, .. }
            | OpV1::Count { collection, .. }
            | OpV1::DeleteByFilter { collection, .. }
            | OpV1::GetV2 { collection, .. } => collection,
            _ => return Ok(reply),
        };
        let tokens = match &reply {
            ReplyV1::WrittenV2(o) => &o.tokens,
            ReplyV1::HitsAt { tokens, .. } | ReplyV1::PointsAt { tokens, .. } | ReplyV1::Count { tokens, .. } => tokens,
            _ => return Ok(reply),
        };
        self.merge_session(collection, tokens);
        match reply {
            ReplyV1::WrittenV2(o) if o.error.is_some() => Err(o.error.expect("checked").into()),
            other => Ok(other),
        }
    }

    /// The session tokens this client holds for `collection` (to hand a
    /// session to another client or process).
    pub fn session_tokens(&self, collection: &str) -> Vec<SessionToken> {
        let session = self.inner.session.lock().expect("session lock");
        session.get(collection).cloned().unwrap_or_default()
    }

    /// Adds tokens (from another client's [`Client::session_tokens`]) to
    /// this client's session for `collection`.
    pub fn merge_session(&self, collection: &str, tokens: &[SessionToken]) {
        let mut session = self.inner.session.lock().expect("session lock");
        let mine = session.entry(collection.to_string()).or_default();
        for t in tokens {
            SessionToken::merge_into(mine, *t);
        }
    }

    fn read_options(&self, collection: &str, opts: &ReadOpts) -> ReadOptions {
        // The node gives up a little before this client would, so its
        // answer (not a timeout) reaches the caller.
        let default = self
            .inner
            .config
            .request_timeout
            .saturating_sub(Duration::from_millis(500));
        let timeout = opts.timeout.unwrap_or(default).max(Duration::from_millis(1));
        ReadOptions {
            consistency: opts
                .consistency
                .clone()
                .or_else(|| self.inner.config.consistency.clone()),
            session: self.session_tokens(collection),
            zone: self.inner.config.zone.clone(),
            timeout_ms: Some(timeout.as_millis().min(u128::from(u32::MAX)) as u32),
        }
    }

    /// Inserts or replaces points. Returns once they are durable; the
    /// client keeps the session token of every shard written.
    pub async fn upsert(&self, collection: &str, points: Vec<Point>) -> Result<WriteAck, ClientError> {
        let op = OpV1::UpsertV2 {
            collection: collection.into(),
            points,
        };
        match self.request(op).await? {
            ReplyV1::WrittenV2(o) => Ok(o.ack),
            other => Err(unexpected(other)),
        }
    }

    /// Deletes points by id; ids that do not exist are ignored.
    pub async fn delete(&self, collection: &str, ids: &[u64]) -> Result<WriteAck, ClientError> {
        let op = OpV1::DeleteV2 {
            collection: collection.into(),
            ids: ids.to_vec(),
        };
        match self.request(op).await? {
            ReplyV1::WrittenV2(o) => Ok(o.ack),
            other => Err(unexpected(other)),
        }
    }

    /// Deletes the points whose payload passes `filter` (JSON, see
    /// [`ReadOpts::filter`]); returns how many were deleted. Each shard's
    /// matching points are those its primary holds when it serves the
    /// request: points written meanwhile may or may not be deleted.
    pub async fn delete_by_filter(&self, collection: &str, filter: &str) -> Result<WriteAck, ClientError> {
        let op = OpV1::DeleteByFilter {
            collection: collection.into(),
            filter: filter.into(),
        };
        match self.request(op).await? {
            ReplyV1::WrittenV2(o) => Ok(o.ack),
            other => Err(unexpected(other)),
        }
    }

    /// Live points of a collection, or (with `filter`, JSON) of those that
    /// pass it, read as `opts` says (its `filter` is not used).
    pub async fn count(&self, collection: &str, filter: Option<&str>, opts: &ReadOpts) -> Result<u64, ClientError> {
        let op = OpV1::Count {
            collection: collection.into(),
            filter: filter.map(str::to_owned),
            read: self.read_options(collection, opts),
        };
        match self.request(op).await? {
            ReplyV1::Count { count, .. } => Ok(count),
            other => Err(unexpected(other)),
        }
    }

    /// Reads points by id; missing ids are absent from the result.
    pub async fn get(&self, collection: &str, ids: &[u64]) -> Result<Vec<PointRecord>, ClientError> {
        self.get_with(collection, ids, &ReadOpts::default()).await
    }

    /// [`Client::get`] at a consistency level.
    pub async fn get_with(
        &self,
        collection: &str,
        ids: &[u64],
        opts: &ReadOpts,
    ) -> Result<Vec<PointRecord>, ClientError> {
        let op = OpV1::GetV2 {
            collection: collection.into(),
            ids: ids.to_vec(),
            read: self.read_options(collection, opts),
        };
        match self.request(op).await? {
            ReplyV1::PointsAt { points, .. } => Ok(points),
            other => Err(unexpected(other)),
        }
    }

    /// The `k` nearest points to `query`, best first, with payloads.
    pub async fn search(&self, collection: &str, query: &[f32], k: u32) -> Result<Vec<Hit>, ClientError> {
        let mut all = self.search_batch(collection, vec![query.to_vec()], k, true).await?;
        Ok(all.pop().unwrap_or_default())
    }

    /// Several queries in one request; one result list per query.
    pub async fn search_batch(
        &self,
        collection: &str,
        queries: Vec<Vec<f32>>,
        k: u32,
        with_payload: bool,
    ) -> Result<Vec<Vec<Hit>>, ClientError> {
        self.search_with(collection, queries, k, with_payload, &ReadOpts::default())
            .await
    }

    /// [`Client::search_batch`] at a consistency level: `strong` (per
    /// shard linearizable: every write acknowledged before it began),
    /// `bounded:<ms>`, `session` (this client's own writes and reads, from
    /// any endpoint, never going back), `eventually`, or a deployed
    /// consistency plugin.
    pub async fn search_with(
        &self,
        collection: &str,
        queries: Vec<Vec<f32>>,
        k: u32,
        with_payload: bool,
        opts: &ReadOpts,
    ) -> Result<Vec<Vec<Hit>>, ClientError> {
        let params = SearchParams {
            ef: opts.ef.unwrap_or(0),
            exact: opts.exact,
        };
        let read = self.read_options(collection, opts);
        // Default parameters go as `SearchV2`, which nodes of earlier
        // builds serve too.
        let op = if let Some(filter) = &opts.filter {
            OpV1::SearchV4 {
                collection: collection.into(),
                queries,
                k,
                with_payload,
                read,
                params,
                filter: filter.clone(),
            }
        } else if params == SearchParams::default() {
            OpV1::SearchV2 {
                collection: collection.into(),
                queries,
                k,
                with_payload,
                read,
            }
        } else {
            OpV1::SearchV3 {
                collection: collection.into(),
                queries,
                k,
                with_payload,
                read,
                params,
            }
        };
        match self.request(op).await? {
            ReplyV1::HitsAt { hits, .. } => Ok(hits),
            other => Err(unexpected(other)),
        }
    }
}

impl Client {
    /// Leader, term, and every member with its health, as the metadata
    /// leader sees it (or the answering node, if the leader is unreachable).
    pub async fn cluster_status(&self) -> Result<ClusterStatus, ClientError> {
        match self.request(OpV1::ClusterStatus).await? {
            ReplyV1::ClusterStatus(s) => Ok(s),
            other => Err(unexpected(other)),
        }
    }

    /// Adds a running node to the cluster; returns (voters, learners).
    pub async fn add_node(&self, spec: NodeSpec) -> Result<(Vec<u64>, Vec<u64>), ClientError> {
        match self.request(OpV1::AddNode(spec)).await? {
            ReplyV1::Membership { voters, learners } => Ok((voters, learners)),
            other => Err(unexpected(other)),
        }
    }

    /// Removes a node from the cluster; returns (voters, learners).
    pub async fn remove_node(&self, id: u64) -> Result<(Vec<u64>, Vec<u64>), ClientError> {
        match self.request(OpV1::RemoveNode { id }).await? {
            ReplyV1::Membership { voters, learners } => Ok((voters, learners)),
            other => Err(unexpected(other)),
        }
    }
}

/// Whether repeating `op` cannot do anything but what one success does.
fn is_retry_safe(op: &OpV1) -> bool {
    !matches!(
        op,
        OpV1::CreateCollection(_)
            | OpV1::CreateReplicated { .. }
            | OpV1::CreateReplicatedV2 { .. }
            | OpV1::CreateCollectionV3 { .. }
            | OpV1::DropCollection { .. }
            | OpV1::AddNode(_)
            | OpV1::RemoveNode { .. }
    )
}

/// Longest [`Client::close`] waits for its close to be sent.
pub const CLOSE_WAIT: Duration = Duration::from_millis(100);

/// How long a node may send nothing at all (no answer, no ack of the
/// client's keep-alives, every [`tls::CLIENT_KEEP_ALIVE`]) while a request
/// waits on it before the client takes it for dead or paused.
pub const SILENT_AFTER: Duration = Duration::from_millis(600);
const SILENCE_CHECK: Duration = Duration::from_millis(50);

/// Runs `call` on `conn`, unless the node goes silent first: then the
/// connection is closed (every request on it moves to the next endpoint)
/// and the call fails as a lost connection. A node that is alive acks the
/// keep-alives even while it works on a long request, so only a dead,
/// paused or cut-off node is silent; this notices it within
/// [`SILENT_AFTER`] instead of QUIC's idle timeout.
async fn unless_silent<T>(
    conn: &quinn::Connection,
    call: impl std::future::Future<Output = Result<T, CallError>>,
) -> Result<T, CallError> {
    tokio::pin!(call);
    let mut seen = conn.stats().udp_rx.datagrams;
    let mut since = tokio::time::Instant::now();
    loop {
        tokio::select! {
            r = &mut call => return r,
            () = tokio::time::sleep(SILENCE_CHECK) => {}
        }
        let now = conn.stats().udp_rx.datagrams;
        if now != seen {
            seen = now;
            since = tokio::time::Instant::now();
        } else if since.elapsed() >= SILENT_AFTER {
            conn.close(0u32.into(), b"node silent");
            return Err(CallError::Connection(format!(
                "the node sent nothing for {:?}",
                since.elapsed()
            )));
        }
    }
}

fn unexpected(reply: ReplyV1) -> ClientError {
    ClientError::Protocol(format!("unexpected reply {reply:?}"))
}

/// How long the client waits for one endpoint's handshake before it also
/// dials the next one.
pub const DIAL_STAGGER: Duration = Duration::from_millis(150);

/// One QUIC handshake with `addr`, within `timeout`.
async fn dial(endpoint: &quinn::Endpoint, addr: SocketAddr, timeout: Duration) -> Result<quinn::Connection, String> {
    let connecting = endpoint
        .connect(addr, &tls::server_name(&addr))
        .map_err(|e| e.to_string())?;
    match tokio::time::timeout(timeout, connecting).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no handshake within {timeout:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::RetryTokens;

    #[test]
    fn retries_are_a_share_of_requests_plus_a_rate() {
        let t = RetryTokens::new();
        let mut granted = 0;
        while t.withdraw() {
            granted += 1;
            assert!(granted <= 51, "the store holds 50");
        }
        assert!(granted >= 50);
        // Five requests earn one retry.
        for _ in 0..5 {
            t.deposit();
        }
        assert!(t.withdraw());
        let emptied = std::time::Instant::now();
        std::thread::sleep(std::time::Duration::from_millis(250));
        // 10 per second.
        let mut later = 0;
        while t.withdraw() {
            later += 1;
        }
        let earned = emptied.elapsed().as_secs_f64() * 10.0;
        assert!(
            later >= 2 && f64::from(later) <= earned + 1.0,
            "{later} retries after {earned:.1} were earned"
        );
    }
}
