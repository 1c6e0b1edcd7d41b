//! Test harness: a cluster of real `edgevec node` processes.
//!
//! Writes a cluster.toml with free loopback ports into a temp dir, makes its
//! certificates, starts node processes from the built binary, and kills them
//! when dropped. Every wait is bounded.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edgevec_client::{Client, ClientConfig, ClientError, CollectionShards, Point, PointRecord};
use edgevec_node::config::ClusterConfig;

pub const ADMIN: &str = "test-admin-token";
pub const WRITER: &str = "test-write-token";
pub const READER: &str = "test-read-token";

pub struct TestCluster {
    pub dir: tempfile::TempDir,
    /// The loopback address every node of this cluster listens on.
    pub ip: String,
    pub config_path: PathBuf,
    pub config: ClusterConfig,
    procs: HashMap<u64, Child>,
    /// Extra environment of each node's process (fault hooks).
    envs: HashMap<u64, Vec<(String, String)>>,
}

/// A loopback address of its own for each test cluster of this process.
///
/// Tests run in parallel; picking "a port that was free a moment ago" races
/// (two clusters can be handed the same port before either binds). All of
/// 127.0.0.0/8 is loopback, so each cluster gets its own address and fixed
/// ports on it ([`quic_addr`], [`admin_addr`]).
pub fn cluster_ip() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id();
    format!("127.{}.{}.{}", 10 + pid % 200, 1 + (pid / 200) % 250, 1 + n % 250)
}

/// QUIC address of node `id` of the cluster on `ip`.
pub fn quic_addr(ip: &str, id: u64) -> String {
    format!("{ip}:{}", 7100 + id)
}

/// Admin HTTP address of node `id` of the cluster on `ip`.
pub fn admin_addr(ip: &str, id: u64) -> String {
    format!("{ip}:{}", 7300 + id)
}

/// Shape of a generated cluster.
pub struct Layout {
    /// Nodes 1..=voters have every role.
    pub voters: u64,
    /// The next nodes are data/proxy learners.
    pub learners: u64,
    /// Extra `[cluster]` lines (timings).
    pub cluster_extra: String,
}

impl Layout {
    pub fn voters(n: u64) -> Self {
        Layout {
            voters: n,
            learners: 0,
            cluster_extra: String::new(),
        }
    }
}

impl TestCluster {
    /// Writes the config and certificates of an `n`-node cluster; starts nothing.
    pub fn new(n: u64) -> Self {
        Self::with_layout(Layout::voters(n))
    }

    /// Writes the config and certificates of a cluster of this layout.
    pub fn with_layout(layout: Layout) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut text = format!(
            "[cluster]\nname = \"test\"\ncerts_dir = \"certs\"\n{}\n\
             [[tokens]]\ntoken = \"{ADMIN}\"\nrole = \"admin\"\n\n\
             [[tokens]]\ntoken = \"{WRITER}\"\nrole = \"write\"\n\n\
             [[tokens]]\ntoken = \"{READER}\"\nrole = \"read\"\n",
            layout.cluster_extra
        );
        let ip = cluster_ip();
        for id in 1..=layout.voters + layout.learners {
            let roles = if id <= layout.voters {
                "[\"meta\", \"data\", \"proxy\"]"
            } else {
                "[\"data\", \"proxy\"]"
            };
            text.push_str(&format!(
                "\n[[nodes]]\nid = {id}\naddr = \"{}\"\nadmin_addr = \"{}\"\n\
                 data_dir = \"data/node{id}\"\nzone = \"zone-{id}\"\nroles = {roles}\n",
                quic_addr(&ip, id),
                admin_addr(&ip, id)
            ));
        }
        let config_path = dir.path().join("cluster.toml");
        fs::write(&config_path, text).unwrap();
        let config = ClusterConfig::load(&config_path).unwrap();
        edgevec_node::certs::ensure(&config.cert_paths(), &config.name, &config.cert_names()).unwrap();
        TestCluster {
            dir,
            ip,
            config_path,
            config,
            procs: HashMap::new(),
            envs: HashMap::new(),
        }
    }

    pub fn addr(&self, id: u64) -> SocketAddr {
        self.config.node(id).unwrap().addr
    }

    pub fn log_path(&self, id: u64) -> PathBuf {
        self.dir.path().join(format!("node{id}.log"))
    }

    /// Starts node `id` as a child process (logs to node<id>.log, appended).
    pub fn start(&mut self, id: u64) {
        let config = self.config_path.clone();
        self.start_with(id, &config, &[]);
    }

    /// Sets an environment variable of node `id`'s process from its next
    /// start on (the fault hooks of `edgevec_node::faults`).
    pub fn set_env(&mut self, id: u64, key: &str, value: &str) {
        let env = self.envs.entry(id).or_default();
        env.retain(|(k, _)| k != key);
        env.push((key.to_string(), value.to_string()));
    }

    /// Starts node `id` with another config file and extra arguments.
    pub fn start_with(&mut self, id: u64, config: &Path, extra: &[&str]) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(id))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_edgevec"))
            .args(["node", "--config"])
            .arg(config)
            .args(["--id", &id.to_string()])
            .args(extra)
            .env("RUST_LOG", "info")
            .envs(self.envs.get(&id).cloned().unwrap_or_default())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("edgevec binary runs");
        self.procs.insert(id, child);
    }

    /// Runs node `id` as a separate process that is expected to exit by
    /// itself (a refused start); returns its exit status and stderr, or
    /// `None` (after killing it) if it still runs after `within`.
    pub fn run_until_exit(&self, id: u64, within: Duration) -> Option<(std::process::ExitStatus, String)> {
        let err = self.dir.path().join(format!("node{id}.refused.log"));
        let mut child = Command::new(env!("CARGO_BIN_EXE_edgevec"))
            .args(["node", "--config"])
            .arg(&self.config_path)
            .args(["--id", &id.to_string()])
            .env("RUST_LOG", "info")
            .env_remove("RUST_BACKTRACE")
            .stdout(Stdio::null())
            .stderr(fs::File::create(&err).unwrap())
            .spawn()
            .expect("edgevec binary runs");
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait().unwrap() {
                return Some((status, fs::read_to_string(&err).unwrap_or_default()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    /// SIGKILL: the node gets no chance to flush anything.
    pub fn kill9(&mut self, id: u64) {
        if let Some(mut c) = self.procs.remove(&id) {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// The exit status of node `id` if its process has exited by itself
    /// (then it is no longer tracked); `None` while it runs.
    pub fn exited(&mut self, id: u64) -> Option<std::process::ExitStatus> {
        let status = self.procs.get_mut(&id)?.try_wait().unwrap()?;
        self.procs.remove(&id);
        Some(status)
    }

    /// SIGTERM and wait (bounded) for a clean exit; returns the exit status.
    pub fn stop(&mut self, id: u64) -> Option<std::process::ExitStatus> {
        let mut c = self.procs.remove(&id)?;
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(status) = c.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        c.kill().unwrap();
        c.wait().ok()
    }

    pub fn ca_pem(&self) -> Vec<u8> {
        fs::read(self.config.cert_paths().ca_cert()).unwrap()
    }

    pub fn client_config(&self, id: u64, token: &str) -> ClientConfig {
        ClientConfig::new(vec![self.addr(id)], self.ca_pem(), token)
    }

    /// A client that knows every configured node and moves between them.
    pub async fn client_any(&self, token: &str) -> Client {
        let mut config = ClientConfig::new(self.config.nodes.iter().map(|n| n.addr).collect(), self.ca_pem(), token);
        config.connect_timeout = Duration::from_secs(1);
        config.request_timeout = Duration::from_secs(15);
        Client::connect(config).await.expect("some node answers")
    }

    /// Waits (up to `within`) until node `via` reports a cluster view that
    /// satisfies `pred`; returns it.
    pub async fn wait_view(
        &self,
        via: u64,
        within: Duration,
        what: &str,
        pred: impl Fn(&edgevec_client::ClusterStatus) -> bool,
    ) -> edgevec_client::ClusterStatus {
        let deadline = Instant::now() + within;
        let mut last = None;
        loop {
            let mut config = self.client_config(via, READER);
            config.connect_timeout = Duration::from_secs(1);
            config.request_timeout = Duration::from_secs(3);
            if let Ok(c) = Client::connect(config).await {
                if let Ok(view) = c.cluster_status().await {
                    if pred(&view) {
                        return view;
                    }
                    last = Some(view);
                }
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not reached within {within:?}; last view: {last:#?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until node `via` sees a node with the data role registered:
    /// before that, a collection create is refused as retryable ("no node
    /// with the data role has joined the cluster yet"), and a node answers
    /// clients a moment before its roles are committed.
    pub async fn wait_data_node(&self, via: u64) {
        self.wait_view(via, Duration::from_secs(30), "a data node registered", |v| {
            v.nodes.iter().any(|n| n.roles.iter().any(|r| r == "data"))
        })
        .await;
    }

    /// Admin HTTP GET on node `id`: (status code, body).
    pub fn http_get(&self, id: u64, path: &str) -> (u16, String) {
        self.http(id, "GET", path, "")
    }

    /// One admin HTTP request to node `id`: (status code, body).
    pub fn http(&self, id: u64, method: &str, path: &str, body: &str) -> (u16, String) {
        self.try_http(id, method, path, body).unwrap()
    }

    /// [`TestCluster::http`], with an error when the node does not answer.
    pub fn try_http(&self, id: u64, method: &str, path: &str, body: &str) -> std::io::Result<(u16, String)> {
        use std::io::{Read, Write};
        let addr = self.config.node(id).unwrap().admin_addr.unwrap();
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        let code = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
        Ok((code, body))
    }

    /// Cuts node `id`'s calls to `others` (needs `fault_injection = true`);
    /// an empty list heals.
    pub fn cut(&self, id: u64, others: &[u64]) {
        let list: Vec<String> = others.iter().map(u64::to_string).collect();
        let (code, body) = self.http(id, "PUT", "/fault/partition", &list.join(","));
        if code != 200 {
            self.fail(format!("partitioning node {id} failed: {code} {body}"));
        }
    }

    /// Cuts every link between `side` and the other nodes, both ways.
    pub fn partition(&self, side: &[u64]) {
        let all: Vec<u64> = self.config.nodes.iter().map(|n| n.id).collect();
        let rest: Vec<u64> = all.iter().copied().filter(|n| !side.contains(n)).collect();
        for &id in &all {
            self.cut(id, if side.contains(&id) { &rest } else { side });
        }
    }

    /// Heals every partition.
    pub fn heal(&self) {
        for n in &self.config.nodes {
            self.cut(n.id, &[]);
        }
    }

    /// A client of node `id`, once the node answers (waits up to 60 s).
    pub async fn client(&self, id: u64, token: &str) -> Client {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(c) = Client::connect(self.client_config(id, token)).await {
                if c.status().await.is_ok() {
                    return c;
                }
            }
            assert!(
                Instant::now() < deadline,
                "node {id} did not answer within 60 s; log:\n{}",
                fs::read_to_string(self.log_path(id)).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Runs the CLI against this cluster and returns (success, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (bool, String, String) {
        self.cli_with(&self.config_path, args)
    }

    /// Runs the CLI with another cluster file: (success, stdout, stderr).
    pub fn cli_with(&self, config: &Path, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_edgevec"))
            .arg("--config")
            .arg(config)
            .args(args)
            .env_remove("EDGEVEC_TOKEN")
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Writes `name` beside the cluster file: a copy of it with `edit`
    /// applied. Returns its path.
    pub fn config_variant(&self, name: &str, edit: impl FnOnce(String) -> String) -> PathBuf {
        let path = self.path(name);
        fs::write(&path, edit(fs::read_to_string(&self.config_path).unwrap())).unwrap();
        path
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Drop for TestCluster {
    /// Kills the nodes; then a panic of edgevec's own code in any node's
    /// log fails the test, even one a client's retry made invisible.
    /// (Panics inside dependencies, such as redb's on a damaged file, are
    /// caught and handled by the node, and tests provoke them.)
    fn drop(&mut self) {
        for (_, mut c) in self.procs.drain() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            return;
        }
        let mut found = Vec::new();
        for id in self.ids() {
            let text = fs::read_to_string(self.log_path(id)).unwrap_or_default();
            found.extend(
                own_panics(&text)
                    .into_iter()
                    .map(|l| format!("node {id} ({}): {l}", self.log_path(id).display())),
            );
        }
        if !found.is_empty() {
            panic!("edgevec code panicked in a node:\n{}", found.join("\n"));
        }
    }
}

/// Lines of a node log that report a panic located in this workspace's
/// sources (relative paths; dependencies' sources are absolute paths).
pub fn own_panics(log: &str) -> Vec<String> {
    log.lines()
        .filter_map(|l| {
            let at = l.find("panicked at ")? + "panicked at ".len();
            (!l[at..].starts_with('/')).then(|| l.to_string())
        })
        .collect()
}

/// Seeded random vectors (xorshift; no dependency on rand's value stream).
/// `n` vectors from a mixture of 50 Gaussian clusters (centres from
/// `random_vectors(50, dim, 1)`, about 0.25 of spread per component), the
/// way real embeddings bunch up; different seeds draw different points of
/// the same mixture.
pub fn clustered_vectors(n: usize, dim: usize, seed: u64) -> Vec<Vec<f32>> {
    let centres = random_vectors(50, dim, 1);
    let noise = random_vectors(n * 5, dim, seed);
    (0..n)
        .map(|i| {
            let c = &centres[(noise[i * 5][0].abs() * 50.0) as usize % 50];
            // The mean of four uniforms in [-1, 1] is close to normal
            // (σ ≈ 0.29).
            (0..dim)
                .map(|d| c[d] + (1..5).map(|k| noise[i * 5 + k][d]).sum::<f32>() / 4.0)
                .collect()
        })
        .collect()
}

pub fn random_vectors(n: usize, dim: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    };
    (0..n).map(|_| (0..dim).map(|_| next()).collect()).collect()
}

/// Waits until every sealed segment of `collection` has its index.
/// Upserts `rows` random vectors of `dim` (ids from 0, seeded by `seed`)
/// into `collection`, 2,000 a request.
pub async fn upsert_random(client: &Client, collection: &str, rows: u64, dim: usize, seed: u64) {
    let vectors = random_vectors(rows as usize, dim, seed);
    for (b, chunk) in vectors.chunks(2_000).enumerate() {
        let points: Vec<Point> = chunk
            .iter()
            .enumerate()
            .map(|(i, v)| Point {
                id: (b * 2_000 + i) as u64,
                vector: v.clone(),
                payload: None,
            })
            .collect();
        client.upsert(collection, points).await.unwrap();
    }
}

pub async fn wait_for_indexes(client: &Client, collection: &str) {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let info = client.describe_collection(collection).await.unwrap();
        if info
            .segments
            .iter()
            .all(|s| s.state != edgevec_proto::SegmentState::Sealed || s.index == edgevec_proto::IndexState::Ready)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "indexes of {collection} not ready in 300 s: {info:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------
// Replication helpers: process control beyond kill/stop, clients pinned to
// some nodes, waits on shard configurations, and a write ledger that records
// what was sent and what was acknowledged so a checker can compare.
// ---------------------------------------------------------------------------

/// Whether `view` shows a leader and exactly `n` members, all up.
pub fn all_nodes_up(view: &edgevec_client::ClusterStatus, n: usize) -> bool {
    view.leader.is_some() && view.nodes.len() == n && view.nodes.iter().all(|x| x.state == "up")
}

impl TestCluster {
    /// Writes the config of `layout`, starts every node and waits (30 s)
    /// until node 1 sees all of them up under one leader.
    pub async fn running(layout: Layout) -> TestCluster {
        let mut cluster = TestCluster::with_layout(layout);
        cluster.start_all().await;
        cluster
    }

    /// Starts every configured node (with the environment set so far)
    /// and waits (30 s) until node 1 sees all of them up under one leader.
    pub async fn start_all(&mut self) {
        let ids = self.ids();
        for id in &ids {
            self.start(*id);
        }
        let n = ids.len();
        self.wait_view(1, Duration::from_secs(30), "all nodes up", |v| all_nodes_up(v, n))
            .await;
    }

    /// Ids of every configured node.
    pub fn ids(&self) -> Vec<u64> {
        self.config.nodes.iter().map(|n| n.id).collect()
    }

    /// OS process id of node `id`, if this harness runs it.
    pub fn pid(&self, id: u64) -> Option<u32> {
        self.procs.get(&id).map(|c| c.id())
    }

    /// SIGSTOP: the process stays, silent, holding its sockets and files.
    pub fn pause(&self, id: u64) {
        self.signal(id, libc::SIGSTOP);
    }

    /// SIGCONT after [`TestCluster::pause`].
    pub fn resume(&self, id: u64) {
        self.signal(id, libc::SIGCONT);
    }

    fn signal(&self, id: u64, sig: i32) {
        let pid = self.pid(id).unwrap_or_else(|| panic!("node {id} is not running"));
        let rc = unsafe { libc::kill(pid as i32, sig) };
        assert_eq!(rc, 0, "signal {sig} to node {id} (pid {pid}) failed");
    }

    /// The last `lines` lines of node `id`'s log, without colour codes
    /// and without openraft's routine INFO lines (they drown the rest).
    pub fn log_tail(&self, id: u64, lines: usize) -> String {
        let text = fs::read_to_string(self.log_path(id)).unwrap_or_default();
        let all: Vec<&str> = text.lines().filter(|l| !l.contains(" INFO openraft")).collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// The tails of every node's log (see [`TestCluster::log_tail`]),
    /// labelled, for failure messages.
    pub fn logs_tail(&self, lines: usize) -> String {
        let mut out = String::new();
        for id in self.ids() {
            out.push_str(&format!(
                "\n----- node {id} log (last {lines} lines, {}) -----\n{}\n",
                self.log_path(id).display(),
                self.log_tail(id, lines)
            ));
        }
        out
    }

    /// Panics with `msg` followed by the tail of every node's log.
    pub fn fail(&self, msg: impl std::fmt::Display) -> ! {
        panic!("{msg}\n{}", self.logs_tail(60))
    }

    /// A client of exactly these nodes (short connect timeout); waits up
    /// to 20 s for one of them to accept a connection.
    pub async fn client_of(&self, ids: &[u64], token: &str) -> Client {
        let mut config = ClientConfig::new(ids.iter().map(|id| self.addr(*id)).collect(), self.ca_pem(), token);
        config.connect_timeout = Duration::from_secs(1);
        config.request_timeout = Duration::from_secs(15);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match Client::connect(config.clone()).await {
                Ok(c) => return c,
                Err(e) if Instant::now() >= deadline => self.fail(format!("no node of {ids:?} accepts a client: {e}")),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// A client of every configured node except `except`.
    pub async fn client_excluding(&self, except: &[u64], token: &str) -> Client {
        let ids: Vec<u64> = self.ids().into_iter().filter(|id| !except.contains(id)).collect();
        self.client_of(&ids, token).await
    }

    /// Waits (up to `within`) until `client.shards(name)` satisfies `pred`;
    /// returns what satisfied it. Each probe is bounded (5 s). On timeout,
    /// fails with the last shards seen, the last error and the node logs.
    pub async fn wait_shards(
        &self,
        client: &Client,
        name: &str,
        within: Duration,
        what: &str,
        pred: impl Fn(&CollectionShards) -> bool,
    ) -> CollectionShards {
        let started = Instant::now();
        let deadline = started + within;
        let mut last: Option<CollectionShards> = None;
        let mut last_error: Option<String> = None;
        loop {
            match tokio::time::timeout(Duration::from_secs(5), client.shards(Some(name))).await {
                Ok(Ok(list)) => match list.into_iter().find(|c| c.collection == name) {
                    Some(c) if pred(&c) => return c,
                    Some(c) => last = Some(c),
                    None => last_error = Some(format!("shards() does not list {name:?}")),
                },
                Ok(Err(e)) => last_error = Some(format!("shards() failed: {e}")),
                Err(_) => last_error = Some("shards() gave no answer within 5 s".into()),
            }
            if Instant::now() >= deadline {
                self.fail(format!(
                    "{what}: not reached within {within:?}\nlast shards seen:\n{}\nlast error: {}",
                    last.as_ref().map(show_shards).unwrap_or_else(|| "(none)".into()),
                    last_error.as_deref().unwrap_or("(none)")
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// One line per shard and replica: what a failure message needs to show.
pub fn show_shards(c: &CollectionShards) -> String {
    let mut out = format!(
        "collection {} (id {}) replicas {} min_insync {}\n",
        c.collection, c.id, c.replicas, c.min_insync
    );
    for s in &c.shards {
        out.push_str(&format!(
            "  shard {} version {} term {} primary {:?} problems {:?}\n",
            s.shard, s.version, s.term, s.primary, s.problems
        ));
        for r in &s.replicas {
            out.push_str(&format!(
                "    node {} {}{}{} applied_lsn {:?} last {} points {:?} catch_up {:?}\n",
                r.node,
                r.state,
                if r.primary { " primary" } else { "" },
                if r.eligible { " eligible" } else { "" },
                r.applied_lsn,
                r.last.map(|l| l.to_string()).unwrap_or_else(|| "None".into()),
                r.points,
                r.catch_up
            ));
        }
    }
    out
}

/// The vector written for point `id`: the same for every test and run
/// (splitmix64 of the id), so a checker recomputes it from the id.
pub fn vector_of(id: u64, dim: usize) -> Vec<f32> {
    let mut s = id.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    (0..dim)
        .map(|_| {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        })
        .collect()
}

/// The point a ledger writes for `id` in batch `batch`.
pub fn ledger_point(id: u64, dim: usize, batch: u64) -> Point {
    Point {
        id,
        vector: vector_of(id, dim),
        payload: Some(format!("{{\"b\":{batch}}}")),
    }
}

/// One upsert request as a ledger saw it.
#[derive(Debug, Clone)]
pub struct BatchRecord {
    pub batch: u64,
    pub ids: Range<u64>,
    pub started: Instant,
    pub took: Duration,
    /// `None`: acknowledged.
    pub error: Option<String>,
}

/// What a writer sent and what the cluster acknowledged.
#[derive(Debug, Clone, Default)]
pub struct Ledger {
    /// Every point sent, acknowledged or not, by id.
    pub sent: BTreeMap<u64, Point>,
    /// Acknowledged ids and when their ack arrived.
    pub acked: BTreeMap<u64, Instant>,
    pub batches: Vec<BatchRecord>,
    /// Batches begun and not finished yet.
    open: u64,
}

impl Ledger {
    /// The id the next batch starts at (ids only grow).
    pub fn next_id(&self) -> u64 {
        self.sent.keys().next_back().map(|id| id + 1).unwrap_or(0)
    }

    pub fn failed(&self) -> Vec<&BatchRecord> {
        self.batches.iter().filter(|b| b.error.is_some()).collect()
    }

    /// Records the points of a new batch of `ids` as sent; returns the
    /// batch number and the points to send.
    pub fn begin(&mut self, dim: usize, ids: Range<u64>) -> (u64, Vec<Point>) {
        let batch = self.batches.len() as u64 + self.open;
        self.open += 1;
        let points: Vec<Point> = ids.map(|id| ledger_point(id, dim, batch)).collect();
        for p in &points {
            self.sent.insert(p.id, p.clone());
        }
        (batch, points)
    }

    /// Records the outcome of a batch from [`Ledger::begin`].
    pub fn finish(&mut self, batch: u64, ids: Range<u64>, started: Instant, result: &Result<(), ClientError>) {
        self.open -= 1;
        let now = Instant::now();
        if result.is_ok() {
            for id in ids.clone() {
                self.acked.insert(id, now);
            }
        }
        self.batches.push(BatchRecord {
            batch,
            ids,
            started,
            took: now - started,
            error: result.as_ref().err().map(|e| e.to_string()),
        });
    }

    /// Sends one batch of `ids` and records its outcome.
    pub async fn upsert(
        &mut self,
        client: &Client,
        name: &str,
        dim: usize,
        ids: Range<u64>,
    ) -> Result<(), ClientError> {
        let (batch, points) = self.begin(dim, ids.clone());
        let started = Instant::now();
        let result = client.upsert(name, points).await.map(|_| ());
        self.finish(batch, ids, started, &result);
        result
    }

    /// Writes `count` new points in batches of `batch`; every batch must be
    /// acknowledged (else the test fails with the error and the logs).
    pub async fn write_all(
        &mut self,
        cluster: &TestCluster,
        client: &Client,
        name: &str,
        dim: usize,
        count: u64,
        batch: u64,
    ) {
        let end = self.next_id() + count;
        while self.next_id() < end {
            let start = self.next_id();
            let ids = start..(start + batch).min(end);
            if let Err(e) = self.upsert(client, name, dim, ids.clone()).await {
                cluster.fail(format!("upsert of ids {ids:?} into {name} failed: {e}"));
            }
        }
    }

    /// Merges another ledger's records (disjoint ids) into this one.
    pub fn absorb(&mut self, other: Ledger) {
        self.sent.extend(other.sent);
        self.acked.extend(other.acked);
        self.batches.extend(other.batches);
    }
}

/// A task that upserts batches of new ids until stopped, recording each
/// outcome in a shared [`Ledger`]. Failed batches are recorded and it goes
/// on. Bounded by `max_batches` and `max_time` whatever happens.
pub struct Writer {
    stop: Arc<AtomicBool>,
    pub ledger: Arc<Mutex<Ledger>>,
    task: tokio::task::JoinHandle<()>,
}

impl Writer {
    #[allow(clippy::too_many_arguments)]
    pub fn spawn(
        client: Client,
        name: &str,
        dim: usize,
        start: Ledger,
        batch: u64,
        pace: Duration,
        max_batches: usize,
        max_time: Duration,
    ) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let ledger = Arc::new(Mutex::new(start));
        let (stop2, ledger2, name) = (stop.clone(), ledger.clone(), name.to_string());
        let task = tokio::spawn(async move {
            let until = Instant::now() + max_time;
            for _ in 0..max_batches {
                if stop2.load(Ordering::SeqCst) || Instant::now() >= until {
                    break;
                }
                // The shared ledger is never locked across an await.
                let (n, ids, points) = {
                    let mut l = ledger2.lock().unwrap();
                    let first = l.next_id();
                    let (n, points) = l.begin(dim, first..first + batch);
                    (n, first..first + batch, points)
                };
                let started = Instant::now();
                let result = client.upsert(&name, points).await.map(|_| ());
                ledger2.lock().unwrap().finish(n, ids, started, &result);
                tokio::time::sleep(pace).await;
            }
        });
        Writer { stop, ledger, task }
    }

    /// A copy of the ledger as it is now.
    pub fn snapshot(&self) -> Ledger {
        self.ledger.lock().unwrap().clone()
    }

    /// Stops the writer and waits (up to `within`) for its last batch.
    pub async fn stop(self, within: Duration) -> Ledger {
        self.stop.store(true, Ordering::SeqCst);
        match tokio::time::timeout(within, self.task).await {
            Ok(joined) => joined.expect("writer task panicked"),
            Err(_) => panic!("the writer did not finish its last batch within {within:?}"),
        }
        Arc::try_unwrap(self.ledger)
            .map(|m| m.into_inner().unwrap())
            .unwrap_or_else(|arc| arc.lock().unwrap().clone())
    }
}

/// Reads `ids` through `client` (in chunks); returns the records by id.
pub async fn get_many(client: &Client, name: &str, ids: &[u64]) -> Result<BTreeMap<u64, PointRecord>, ClientError> {
    let mut out = BTreeMap::new();
    for chunk in ids.chunks(5_000) {
        for r in client.get(name, chunk).await? {
            out.insert(r.id, r);
        }
    }
    Ok(out)
}

/// Reads every id `ledger` sent through `client` and checks: every
/// acknowledged id is present, and every id present holds exactly the
/// vector and payload that were sent. Returns the ids present, or what is
/// wrong.
pub async fn check_ledger(client: &Client, name: &str, ledger: &Ledger) -> Result<BTreeSet<u64>, String> {
    let ids: Vec<u64> = ledger.sent.keys().copied().collect();
    let got = get_many(client, name, &ids)
        .await
        .map_err(|e| format!("get of {} ids failed: {e}", ids.len()))?;
    let missing: Vec<u64> = ledger
        .acked
        .keys()
        .filter(|id| !got.contains_key(id))
        .copied()
        .collect();
    let wrong: Vec<String> = got
        .values()
        .filter_map(|r| match ledger.sent.get(&r.id) {
            None => Some(format!("id {} was never sent", r.id)),
            Some(p) if p.vector != r.vector || p.payload != r.payload => Some(format!(
                "id {}: read {:?} {:?}, sent {:?} {:?}",
                r.id, r.vector, r.payload, p.vector, p.payload
            )),
            Some(_) => None,
        })
        .collect();
    if missing.is_empty() && wrong.is_empty() {
        return Ok(got.keys().copied().collect());
    }
    Err(format!(
        "{} of {} acknowledged ids missing (first {:?}); {} ids read differ from what was sent (first {:?})",
        missing.len(),
        ledger.acked.len(),
        &missing[..missing.len().min(20)],
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    ))
}

/// Squared L2 distance.
pub fn l2(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

/// Exact L2 top-`k` of `q` over `points`: (id, squared distance), best first.
pub fn brute_top_k<'a>(points: impl IntoIterator<Item = (u64, &'a [f32])>, q: &[f32], k: usize) -> Vec<(u64, f32)> {
    let mut all: Vec<(u64, f32)> = points.into_iter().map(|(id, v)| (id, l2(v, q))).collect();
    all.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
    all.truncate(k);
    all
}

/// Sum of a metric's lines that carry every label in `labels`.
pub fn metric_sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The value of metric `name` on the first line of `text` (Prometheus
/// text format) that carries every one of `labels`.
pub fn metric(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .find(|l| labels.iter().all(|x| l.contains(x)))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// The plugins every node ships.
pub const SHIPPED: [&str; 9] = [
    "round-robin",
    "least-connections",
    "random",
    "p2c-ewma",
    "zone-aware",
    "strong",
    "bounded",
    "session",
    "eventually",
];

/// Waits until node `id` reports every shipped plugin loaded; returns its
/// /metrics then.
pub async fn wait_plugins_loaded(cluster: &TestCluster, id: u64) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, m) = cluster.http_get(id, "/metrics");
        let loaded = SHIPPED
            .iter()
            .filter(|p| metric(&m, "edgevec_plugin_version", &[&format!("plugin=\"{p}\"")]) == Some(1.0))
            .count();
        if loaded == SHIPPED.len() {
            return m;
        }
        if Instant::now() > deadline {
            cluster.fail(format!("node {id} loaded {loaded} of the 9 shipped plugins:\n{m}"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
