//! Test harness: a cluster of real `edgevec node` processes.
//!
//! Writes a cluster.toml with free loopback ports into a temp dir, makes its
//! certificates, starts node processes from the built binary, and kills them
//! when dropped. Every wait is bounded.

#![allow(dead_code)]

use std::collections::HashMap;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use edgevec_client::{Client, ClientConfig};
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
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("edgevec binary runs");
        self.procs.insert(id, child);
    }

    /// SIGKILL: the node gets no chance to flush anything.
    pub fn kill9(&mut self, id: u64) {
        if let Some(mut c) = self.procs.remove(&id) {
            c.kill().unwrap();
            c.wait().unwrap();
        }
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

    /// Admin HTTP GET on node `id`: (status code, body).
    pub fn http_get(&self, id: u64, path: &str) -> (u16, String) {
        use std::io::{Read, Write};
        let addr = self.config.node(id).unwrap().admin_addr.unwrap();
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let code = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
        (code, body)
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
    fn drop(&mut self) {
        for (_, mut c) in self.procs.drain() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Seeded random vectors (xorshift; no dependency on rand's value stream).
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
