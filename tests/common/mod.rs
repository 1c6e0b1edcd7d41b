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
    pub config_path: PathBuf,
    pub config: ClusterConfig,
    procs: HashMap<u64, Child>,
}

/// A UDP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl TestCluster {
    /// Writes the config and certificates of an `n`-node cluster; starts nothing.
    pub fn new(n: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut text = format!(
            "[cluster]\nname = \"test\"\ncerts_dir = \"certs\"\n\n\
             [[tokens]]\ntoken = \"{ADMIN}\"\nrole = \"admin\"\n\n\
             [[tokens]]\ntoken = \"{WRITER}\"\nrole = \"write\"\n\n\
             [[tokens]]\ntoken = \"{READER}\"\nrole = \"read\"\n"
        );
        for id in 1..=n {
            text.push_str(&format!(
                "\n[[nodes]]\nid = {id}\naddr = \"127.0.0.1:{}\"\ndata_dir = \"data/node{id}\"\nzone = \"zone-{id}\"\n",
                free_port()
            ));
        }
        let config_path = dir.path().join("cluster.toml");
        fs::write(&config_path, text).unwrap();
        let config = ClusterConfig::load(&config_path).unwrap();
        edgevec_node::certs::ensure(&config.cert_paths(), &config.name, &config.cert_names()).unwrap();
        TestCluster {
            dir,
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
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(id))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_edgevec"))
            .args(["node", "--config"])
            .arg(&self.config_path)
            .args(["--id", &id.to_string()])
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
        let out = Command::new(env!("CARGO_BIN_EXE_edgevec"))
            .arg("--config")
            .arg(&self.config_path)
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

pub fn exists(p: &Path) -> bool {
    p.exists()
}
