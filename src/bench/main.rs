//! `bench`: search and insert throughput of one node, in process and over QUIC.
//!
//! Builds one index (N × DIM random vectors, inserted through the client in
//! batches) in a node process, measures search through the client over QUIC
//! on loopback at 1 and C concurrent clients, stops the node, opens the same
//! data directory in process and measures the same queries through the
//! library call. Prints a Markdown report; the QUIC/in-process ratio is the
//! number that matters (both sides run on the same machine in one run).
//!
//! With `--mode meta` it measures the metadata Raft instead: the latency of
//! a metadata write (a collection drop) on a 3-node loopback cluster, and
//! the time from kill -9 of the leader to the first committed metadata
//! write, over `--trials` runs.
//!
//! With `--mode replication` it measures shard replication on a 3-node
//! loopback cluster, in one run so that the ratios compare like with like on
//! a noisy machine: write latency of a 3-replica collection against a
//! 1-replica one (batches interleaved), insert throughput of both at full
//! load, catch-up speed of a backup restarted after kill -9, and the time
//! from kill -9 of a shard's primary to the first acknowledged write sent
//! after it.
//!
//! Every node is a real `edgevec node` process, logging to `node<id>.log` in
//! the bench's directory (keep it with `--dir`) and killed when the bench
//! ends, whichever way it ends. Every wait is bounded.
//!
//! With `--mode plugins` it measures policy decisions through the
//! WebAssembly host against the same code called natively, and with
//! `--mode plugins-e2e` search QPS on a 3-node cluster with the shipped
//! load balancer deciding through WebAssembly against its native build,
//! alternated `--trials` times in one run.
//!
//! With `--mode reads` it measures the read router on a 3-node cluster:
//! QPS and latency per consistency level, and failed searches and p99
//! while a replica's node is killed and while one is paused. With
//! `--mode scaling` it measures search QPS with 1 and 2 replicas of one
//! shard on two nodes pinned to a core each.
//!
//! With `--mode engine` it measures the search engine in process against
//! hnswlib (the pip package) on the same clustered data: QPS and recall per
//! `ef`, and index build time (`scripts/bench-engine.sh` runs it).
//! With `--mode footprint` it measures a node's memory (settled and peak
//! RSS) and disk against the raw bytes of the vectors it holds.
//! With `--mode local` it searches a stopped node's data in process, with
//! the query and truth files of `edgevec bench search`.
//! With `--mode import` it times rebuilding a replica from an export with
//! and without the index files an export carries.
//! With `--mode reach` it counts the rows of an HNSW graph that a search
//! for their own vector misses, before and after the graph is linked
//! through.
//! With `--mode quant` it compares graphs whose vectors are held as f32,
//! f16 and i8, with and without the exact rows read back for the final
//! scores.
//!
//! `cargo run --release --bin bench -- --help`

use std::fs::OpenOptions;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use edgevec_client::{Client, ClientConfig, CollectionSpec, Metric, OpId, Point, ReplicationSpec, ShardStatus};
use edgevec_engine::{search_replicas, Engine, EngineOptions, ShardReplica};
use rand::{Rng, SeedableRng};

mod engine;
mod footprint;
mod import;
mod local;
mod plugins;
mod quant;
mod reach;
mod reads;
mod replication;
mod usage;

#[derive(Parser, Debug)]
struct Args {
    /// `search` (engine and QUIC search/insert), `meta` (metadata Raft),
    /// `replication` (shard replication on 3 nodes) or `plugins` (policy
    /// decisions, WebAssembly against native).
    #[arg(long, default_value = "search")]
    mode: String,
    /// Metadata writes measured (meta mode).
    #[arg(long, default_value_t = 200)]
    writes: usize,
    /// Leader kills (meta mode), shard-primary kills (replication mode), or
    /// imports of each kind (import mode).
    #[arg(long, default_value_t = 10)]
    trials: usize,
    #[arg(long, default_value_t = 100_000)]
    n: usize,
    #[arg(long, default_value_t = 128)]
    dim: usize,
    #[arg(long, default_value_t = 2)]
    shards: u32,
    /// Rows of a growing segment before it seals [default: 20000; 1000000
    /// in replication mode, so that no seal or index build runs during it].
    #[arg(long)]
    seal_rows: Option<u32>,
    /// Footprint mode: after the inserts, write every point again this
    /// many times (same ids and vectors, new rows), before settling.
    #[arg(long, default_value_t = 0)]
    rewrites: usize,
    /// Footprint mode: every this many ms until settled, print (stderr)
    /// each node's RSS and the segments and index builds `describe`
    /// shows; 0: no trace.
    #[arg(long, default_value_t = 0)]
    trace_ms: u64,
    #[arg(long, default_value_t = 10)]
    k: u32,
    /// Queries per measurement.
    #[arg(long, default_value_t = 2_000)]
    queries: usize,
    /// Concurrency of the parallel measurement (search clients; writers in
    /// replication mode, each with its own client).
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Points per upsert batch.
    #[arg(long, default_value_t = 1_000)]
    batch: usize,
    /// Replication mode: batches measured one at a time per collection
    /// (after `--warmup` more).
    #[arg(long, default_value_t = 200)]
    latency_batches: usize,
    /// Replication mode: unmeasured batches per collection before the
    /// latency measurement.
    #[arg(long, default_value_t = 20)]
    warmup: usize,
    /// Replication mode: batches per collection at full load (split among
    /// the `--concurrency` writers, and among the rounds of `--load-blocks`).
    #[arg(long, default_value_t = 400)]
    load_batches: usize,
    /// Replication mode: blocks of four full-load rounds (r1, r3, r3, r1),
    /// each block giving a throughput ratio of its own.
    #[arg(long, default_value_t = 1)]
    load_blocks: usize,
    /// Replication mode: every backup takes each message of ops this many
    /// ms after it arrives (the `EDGEVEC_FAULT_REPLICATE_DELAY_MS` hook),
    /// as across a slow link; 0 for none.
    #[arg(long, default_value_t = 0)]
    backup_delay_ms: u64,
    /// Replication mode: send a write every this many ms (open loop) and
    /// report its latency; 0 skips that phase.
    #[arg(long, default_value_t = 0)]
    paced_ms: u64,
    /// Replication mode: writes of the paced phase per collection.
    #[arg(long, default_value_t = 300)]
    paced_writes: usize,
    /// Replication mode: points per write of the paced phase.
    #[arg(long, default_value_t = 100)]
    paced_points: usize,
    /// Replication mode: points written while a backup is down.
    #[arg(long, default_value_t = 100_000)]
    catch_up_points: usize,
    /// Replication mode: batch sizes of the catch-up runs (one run each).
    #[arg(long, value_delimiter = ',', default_value = "1000,100")]
    catch_up_batch: Vec<usize>,
    /// Replication mode: exports reach every node as over a link of this
    /// many Mbit/s (the `EDGEVEC_FAULT_EXPORT_MBIT` hook).
    #[arg(long)]
    export_mbit: Option<u64>,
    /// Replication mode: nodes offer no sealed segments to the exports
    /// they receive (the `EDGEVEC_FAULT_NO_SEGMENT_DIGESTS` hook), so
    /// every export carries the whole shard.
    #[arg(long)]
    whole_exports: bool,
    /// Replication mode: the nodes' `oplog_hold_kb` (0: a backup that was
    /// away past the op log's retention catches up through an export).
    #[arg(long)]
    oplog_hold_kb: Option<u64>,
    /// Replication mode: points per write of the failover writers.
    #[arg(long, default_value_t = 10)]
    failover_batch: usize,
    /// Replication mode: before each failover trial, move the metadata
    /// leadership to the primary's node (pausing the leader's node until
    /// an election lands there), so that every trial kills a primary that
    /// is also the metadata leader.
    #[arg(long)]
    leader_on_primary: bool,
    /// Engine mode: `l2`, `ip` or `cosine`.
    #[arg(long, default_value = "l2")]
    metric: String,
    /// Engine mode: Gaussian clusters of the generated data.
    #[arg(long, default_value_t = 100)]
    clusters: usize,
    /// Engine mode: HNSW graph degree, for the engine and hnswlib alike.
    #[arg(long, default_value_t = edgevec_proto::limits::DEFAULT_HNSW_M as usize)]
    m: usize,
    /// Engine mode: HNSW ef_construction, for both.
    #[arg(long, default_value_t = edgevec_proto::limits::DEFAULT_EF_CONSTRUCTION as usize)]
    ef_construction: usize,
    /// Engine mode: search expansions measured.
    #[arg(long, value_delimiter = ',', default_value = "16,32,64,128,256")]
    ef_sweep: Vec<usize>,
    /// Quant mode: the walk's top `rescore × k` are scored again from the
    /// exact rows.
    #[arg(long, default_value_t = 3)]
    rescore: usize,
    /// Engine mode: the Python with hnswlib and numpy installed
    /// (scripts/bench-engine.sh makes a venv with them).
    #[arg(long, default_value = "python3")]
    python: String,
    /// Keep the data directory (and node logs) here instead of a temp dir.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Local mode: a stopped node's engine directory.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Local mode: the collection searched.
    #[arg(long, default_value = "bench")]
    collection: String,
    /// Local mode: queries (a float32 `.npy` matrix).
    #[arg(long)]
    queries_file: Option<PathBuf>,
    /// Local mode: true ids per query (an int64 `.npy` matrix).
    #[arg(long)]
    truth_file: Option<PathBuf>,
    /// Local mode: search expansion (default: the engine's).
    #[arg(long)]
    ef: Option<usize>,
    /// Local mode: seconds of measurement.
    #[arg(long, default_value_t = 15)]
    duration_secs: u64,
}

impl Args {
    fn seal_rows(&self, default: u32) -> u32 {
        self.seal_rows.unwrap_or(default)
    }
}

struct Stats {
    qps: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// The `p` quantile of ascending `sorted` (the element at ⌊len·p⌋).
fn quantile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn stats(mut lat: Vec<Duration>, wall: Duration) -> Stats {
    lat.sort();
    Stats {
        qps: lat.len() as f64 / wall.as_secs_f64(),
        p50_ms: ms(quantile(&lat, 0.50)),
        p99_ms: ms(quantile(&lat, 0.99)),
    }
}

fn vectors(n: usize, dim: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| (0..dim).map(|_| rng.gen_range(-1.0f32..1.0)).collect())
        .collect()
}

fn edgevec_exe() -> Result<PathBuf> {
    let me = std::env::current_exe()?;
    let exe = me.with_file_name("edgevec");
    if !exe.exists() {
        bail!("{} not found; build it with `cargo build --release`", exe.display());
    }
    Ok(exe)
}

/// Writes a cluster file of `n` voters with free loopback ports (and
/// `cluster_extra` lines in `[cluster]`) and makes its certificates;
/// returns the file and the node addresses.
fn write_config(dir: &Path, n: u64, cluster_extra: &str) -> Result<(PathBuf, Vec<SocketAddr>)> {
    let mut text = format!(
        "[cluster]\nname = \"bench\"\n{cluster_extra}\n[[tokens]]\ntoken = \"bench-admin-token\"\nrole = \"admin\"\n"
    );
    for id in 1..=n {
        let port = std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port();
        text.push_str(&format!(
            "\n[[nodes]]\nid = {id}\naddr = \"127.0.0.1:{port}\"\ndata_dir = \"node{id}\"\nroles = [\"meta\", \"data\", \"proxy\"]\n"
        ));
    }
    let path = dir.join("cluster.toml");
    std::fs::write(&path, text)?;
    let cfg = edgevec_node::config::ClusterConfig::load(&path)?;
    edgevec_node::certs::ensure(&cfg.cert_paths(), &cfg.name, &cfg.cert_names())?;
    Ok((path, cfg.nodes.iter().map(|n| n.addr).collect()))
}

/// The node processes of a loopback cluster. Dropping it kills every node
/// still running, so no exit path of the bench (error or panic included)
/// leaves one behind.
struct Cluster {
    dir: PathBuf,
    config: PathBuf,
    addrs: Vec<SocketAddr>,
    ca: Vec<u8>,
    /// Node `id` at index `id - 1`; `None` while it is down.
    procs: Vec<Option<Child>>,
    /// Environment of every node process (fault hooks).
    env: Vec<(String, String)>,
}

impl Cluster {
    /// Writes the cluster file of `n` nodes with every role and starts them.
    fn start(dir: &Path, n: u64, cluster_extra: &str) -> Result<Cluster> {
        Cluster::start_with_env(dir, n, cluster_extra, Vec::new())
    }

    /// As [`Cluster::start`], with `env` set in every node process.
    fn start_with_env(dir: &Path, n: u64, cluster_extra: &str, env: Vec<(String, String)>) -> Result<Cluster> {
        let (config, addrs) = write_config(dir, n, cluster_extra)?;
        let ca = std::fs::read(dir.join("certs/ca.pem"))?;
        let mut cluster = Cluster {
            dir: dir.to_path_buf(),
            config,
            addrs,
            ca,
            procs: (0..n).map(|_| None).collect(),
            env,
        };
        for id in 1..=n {
            cluster.spawn(id)?;
        }
        Ok(cluster)
    }

    fn ids(&self) -> impl Iterator<Item = u64> {
        1..=self.procs.len() as u64
    }

    fn addr(&self, id: u64) -> SocketAddr {
        self.addrs[id as usize - 1]
    }

    fn log_path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("node{id}.log"))
    }

    fn pid(&self, id: u64) -> Option<u32> {
        self.procs[id as usize - 1].as_ref().map(Child::id)
    }

    /// Starts node `id`; its log is appended to `node<id>.log`.
    fn spawn(&mut self, id: u64) -> Result<()> {
        let log = OpenOptions::new().create(true).append(true).open(self.log_path(id))?;
        let child = Command::new(edgevec_exe()?)
            .args(["node", "--config"])
            .arg(&self.config)
            .args(["--id", &id.to_string()])
            .envs(self.env.iter().cloned())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        self.procs[id as usize - 1] = Some(child);
        Ok(())
    }

    /// SIGKILL, and reaps the process: once this returns it is gone.
    fn kill9(&mut self, id: u64) -> Result<()> {
        let mut child = self.procs[id as usize - 1]
            .take()
            .with_context(|| format!("node {id} is not running"))?;
        child.kill()?;
        child.wait()?;
        Ok(())
    }

    /// SIGSTOP (`pause` true) or SIGCONT to node `id`.
    fn pause(&self, id: u64, pause: bool) -> Result<()> {
        let pid = self.pid(id).with_context(|| format!("node {id} is not running"))?;
        let signal = if pause { libc::SIGSTOP } else { libc::SIGCONT };
        // SAFETY: kill(2) on a child this process started and has not reaped.
        if unsafe { libc::kill(pid as i32, signal) } != 0 {
            bail!("signal to node {id}: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// SIGTERM, and waits (30 s at most, then SIGKILL) for the exit.
    fn stop(&mut self, id: u64) -> Result<()> {
        match self.procs[id as usize - 1].take() {
            Some(mut child) => terminate(&mut child),
            None => Ok(()),
        }
    }

    /// What became of every node process (exited, or running and in which
    /// scheduler state: a node that stopped answering while its process
    /// runs is stuck, not dead), then the last `lines` lines of its log.
    fn failure_report(&mut self, lines: usize) -> String {
        let mut out = String::new();
        for id in self.ids() {
            let process = match self.procs[id as usize - 1].as_mut() {
                None => "not running (killed by the bench)".to_string(),
                Some(child) => match child.try_wait() {
                    Ok(Some(status)) => format!("exited: {status}"),
                    Ok(None) => {
                        let pid = child.id();
                        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                        let state = stat
                            .rfind(')')
                            .and_then(|i| stat[i + 1..].split_whitespace().next())
                            .unwrap_or("?")
                            .to_string();
                        let wchan = std::fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default();
                        format!("running as pid {pid}, state {state}, wchan {wchan:?}")
                    }
                    Err(e) => format!("unknown ({e})"),
                },
            };
            let text = std::fs::read_to_string(self.log_path(id)).unwrap_or_default();
            let all: Vec<&str> = text.lines().collect();
            out.push_str(&format!(
                "----- node {id}: {process}; {}, last {lines} lines -----\n{}\n",
                self.log_path(id).display(),
                all[all.len().saturating_sub(lines)..].join("\n")
            ));
        }
        out
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for child in self.procs.iter_mut().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A 3-node cluster with collection `bench` (3 replicas, `--shards`,
/// `--dim`, seal at `--seal-rows` or 20000) holding `--n` random vectors
/// with ids from 0; returns it with an admin client.
async fn replicated_bench_cluster(args: &Args, dir: &Path) -> Result<(Cluster, Client)> {
    let cluster = Cluster::start(dir, 3, replication::TIMINGS)?;
    let admin = connect_any(&cluster.addrs, &cluster.ca).await?;
    replication::wait_all_up(&admin, 3).await?;
    let spec = CollectionSpec::new("bench", args.dim as u32, Metric::L2)
        .with_shards(args.shards)
        .with_seal_rows(args.seal_rows(20_000));
    admin
        .create_replicated(spec, ReplicationSpec::new(3))
        .await
        .context("creating the bench collection")?;
    insert(&admin, args.n, args.dim).await?;
    Ok((cluster, admin))
}

/// Writes `n` vectors of `dim` (seed 1) to the bench collection, ids 0..n.
async fn insert(admin: &Client, n: usize, dim: usize) -> Result<()> {
    let vectors = vectors(n, dim, 1);
    for (b, chunk) in vectors.chunks(1000).enumerate() {
        let points = chunk
            .iter()
            .enumerate()
            .map(|(i, v)| Point {
                id: (b * 1000 + i) as u64,
                vector: v.clone(),
                payload: None,
            })
            .collect();
        admin.upsert("bench", points).await?;
    }
    Ok(())
}

async fn connect(addr: SocketAddr, ca: &[u8]) -> Result<Client> {
    connect_any(&[addr], ca).await
}

async fn connect_any(addrs: &[SocketAddr], ca: &[u8]) -> Result<Client> {
    connect_with(addrs, ca, Duration::from_secs(30)).await
}

/// A client of `addrs` (tried in order) once one of them answers a status
/// request; waits 60 s at most.
async fn connect_with(addrs: &[SocketAddr], ca: &[u8], request_timeout: Duration) -> Result<Client> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut config = ClientConfig::new(addrs.to_vec(), ca.to_vec(), "bench-admin-token");
        config.connect_timeout = Duration::from_millis(500);
        config.request_timeout = request_timeout;
        if let Ok(c) = Client::connect(config).await {
            if c.status().await.is_ok() {
                return Ok(c);
            }
        }
        if Instant::now() > deadline {
            bail!("no node of {addrs:?} answered within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn quic_search(clients: &[Client], queries: &Arc<Vec<Vec<f32>>>, k: u32) -> Result<Stats> {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (w, client) in clients.iter().enumerate() {
        let client = client.clone();
        let queries = queries.clone();
        let workers = clients.len();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            for q in queries.iter().skip(w).step_by(workers) {
                let t = Instant::now();
                client.search_batch("bench", vec![q.clone()], k, false).await?;
                lat.push(t.elapsed());
            }
            Ok::<_, anyhow::Error>(lat)
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await??);
    }
    Ok(stats(lat, started.elapsed()))
}

/// The bench collection's replicas in a node's engine, searched in process
/// the way the node searches its local replicas.
struct Local {
    replicas: Vec<Arc<ShardReplica>>,
    metric: edgevec_proto::Metric,
}

impl Local {
    fn open(engine: &Engine) -> Result<Local> {
        Self::open_named(engine, "bench")
    }

    fn open_named(engine: &Engine, name: &str) -> Result<Local> {
        let all = engine.replicas();
        let replicas: Vec<Arc<ShardReplica>> = all
            .iter()
            .filter(|(spec, _)| spec.name == name)
            .map(|(_, r)| r.clone())
            .collect();
        let metric = all
            .iter()
            .find(|(spec, _)| spec.name == name)
            .map(|(spec, _)| spec.metric)
            .with_context(|| format!("the node holds no replica of collection {name}"))?;
        Ok(Local { replicas, metric })
    }

    fn search(&self, query: &[f32], k: u32) -> Result<Vec<edgevec_proto::Hit>> {
        self.search_with(query, k, Default::default())
    }

    fn search_with(
        &self,
        query: &[f32],
        k: u32,
        opts: edgevec_engine::SearchOptions,
    ) -> Result<Vec<edgevec_proto::Hit>> {
        let mut hits = search_replicas(&self.replicas, self.metric, &[query.to_vec()], k, false, opts, None)?;
        Ok(hits.pop().unwrap_or_default())
    }
}

fn local_search(engine: &Arc<Local>, queries: &Arc<Vec<Vec<f32>>>, k: u32, workers: usize) -> Result<Stats> {
    let started = Instant::now();
    let handles: Vec<_> = (0..workers)
        .map(|w| {
            let engine = engine.clone();
            let queries = queries.clone();
            std::thread::spawn(move || {
                let mut lat = Vec::new();
                for q in queries.iter().skip(w).step_by(workers) {
                    let t = Instant::now();
                    engine.search(q, k)?;
                    lat.push(t.elapsed());
                }
                Ok::<_, anyhow::Error>(lat)
            })
        })
        .collect();
    let mut lat = Vec::new();
    for h in handles {
        lat.extend(h.join().expect("bench thread")?);
    }
    Ok(stats(lat, started.elapsed()))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let tmp = tempfile::tempdir()?;
    let dir = args.dir.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&dir)?;
    match args.mode.as_str() {
        "search" => search_bench(&args, &dir).await,
        "meta" => meta_bench(&args, &dir).await,
        "replication" => replication::run(&args, &dir).await,
        "plugins" => plugins::run(&args),
        "plugins-e2e" => {
            let r = plugins::run_cluster(&args, &dir).await;
            if let Err(e) = &r {
                eprintln!("plugins-e2e bench failed: {e:#}");
            }
            r
        }
        "reads" => reads::run(&args, &dir).await,
        "scaling" => reads::scaling(&args, &dir).await,
        "engine" => engine::run(&args, &dir),
        "footprint" => footprint::run(&args, &dir).await,
        "local" => local::run(&args),
        "import" => import::run(&args, &dir),
        "reach" => reach::run(&args),
        "quant" => quant::run(&args, &dir),
        other => {
            bail!("unknown --mode {other:?}: use search, engine, footprint, local, import, reach, quant, meta, replication, plugins, plugins-e2e, reads or scaling")
        }
    }
}

/// The leader as node `via` sees it.
async fn leader_of(client: &Client) -> Option<u64> {
    client.cluster_status().await.ok().and_then(|s| s.leader)
}

async fn meta_bench(args: &Args, dir: &Path) -> Result<()> {
    let mut cluster = Cluster::start(dir, 3, "")?;
    let ca = cluster.ca.clone();
    let client = connect_any(&cluster.addrs, &ca).await?;
    // Every node up (as a data node too) before the first create.
    replication::wait_all_up(&client, 3).await?;

    // A collection create also places shards and waits for their
    // primaries, so the measured write is a drop: one metadata command,
    // committed and applied on the answering node. The collections are
    // made first, unmeasured.
    for i in 0..args.writes {
        client
            .create_collection(CollectionSpec::new(format!("c{i}"), 4, Metric::L2))
            .await?;
    }
    for trial in 0..args.trials {
        client
            .create_collection(CollectionSpec::new(format!("failover{trial}"), 4, Metric::L2))
            .await?;
    }
    let started = Instant::now();
    let mut lat = Vec::new();
    for i in 0..args.writes {
        let t = Instant::now();
        client.drop_collection(&format!("c{i}")).await?;
        lat.push(t.elapsed());
    }
    let writes = stats(lat, started.elapsed());

    // Failover: kill -9 the leader, time the first committed write.
    let mut failovers = Vec::new();
    for trial in 0..args.trials {
        let deadline = Instant::now() + Duration::from_secs(60);
        let leader = loop {
            if let Some(l) = leader_of(&client).await {
                break l;
            }
            if Instant::now() > deadline {
                bail!("no leader within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let survivors: Vec<_> = cluster
            .ids()
            .filter(|i| *i != leader)
            .map(|i| cluster.addr(i))
            .collect();
        let probe = connect_any(&survivors, &ca).await?;
        cluster.kill9(leader)?;
        let killed = Instant::now();
        let name = format!("failover{trial}");
        loop {
            match probe.drop_collection(&name).await {
                Ok(_) => break,
                Err(e) if e.is_retryable() => {}
                // An attempt that timed out committed after all.
                Err(edgevec_client::ClientError::NotFound(_)) => break,
                Err(e) => return Err(e.into()),
            }
            if killed.elapsed() > Duration::from_secs(30) {
                bail!("no write committed within 30 s of killing leader {leader}");
            }
        }
        let took = killed.elapsed();
        eprintln!("trial {trial}: leader {leader} killed, write committed after {took:?}");
        failovers.push(took);
        probe.close().await;
        cluster.spawn(leader)?;
        // Let it rejoin before the next trial.
        let back = connect(cluster.addr(leader), &ca).await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while back.list_collections().await?.iter().any(|c| c.spec.name == name) {
            if Instant::now() > deadline {
                bail!("node {leader} did not catch up");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        back.close().await;
    }
    client.close().await;
    for id in 1..=3 {
        cluster.stop(id)?;
    }
    failovers.sort();
    println!("### Metadata Raft, 3 voters on loopback\n");
    println!(
        "Collection drop (a metadata write, committed and applied on the answering node), {} sequential writes: p50 {:.2} ms, p99 {:.2} ms, {:.0} writes/s\n",
        args.writes, writes.p50_ms, writes.p99_ms, writes.qps
    );
    println!(
        "kill -9 of the leader → first committed write, {} trials: median {:.0} ms, min {:.0} ms, max {:.0} ms",
        failovers.len(),
        ms(quantile(&failovers, 0.5)),
        ms(failovers[0]),
        ms(failovers[failovers.len() - 1])
    );
    println!(
        "(each trial, ms: {})",
        failovers
            .iter()
            .map(|d| format!("{:.0}", ms(*d)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

async fn search_bench(args: &Args, dir: &Path) -> Result<()> {
    let mut cluster = Cluster::start(dir, 1, "")?;
    let addr = cluster.addr(1);
    let ca = cluster.ca.clone();
    let seal_rows = args.seal_rows(20_000);
    let data = vectors(args.n, args.dim, 1);
    let queries = Arc::new(vectors(args.queries, args.dim, 2));

    let client = connect(addr, &ca).await?;
    // The node registers its data role through the metadata once it is up.
    replication::wait_all_up(&client, 1).await?;
    let spec = CollectionSpec::new("bench", args.dim as u32, Metric::L2)
        .with_shards(args.shards)
        .with_seal_rows(seal_rows);
    client.create_collection(spec).await?;

    // Insert: one batch in flight at a time, through the client.
    let started = Instant::now();
    for (b, chunk) in data.chunks(args.batch).enumerate() {
        let points = chunk
            .iter()
            .enumerate()
            .map(|(i, v)| Point {
                id: (b * args.batch + i) as u64,
                vector: v.clone(),
                payload: None,
            })
            .collect();
        client.upsert("bench", points).await?;
    }
    let insert_secs = started.elapsed().as_secs_f64();
    let insert_rate = args.n as f64 / insert_secs;
    eprintln!("inserted {} rows in {insert_secs:.1} s", args.n);

    let started = Instant::now();
    loop {
        let info = client.describe_collection("bench").await?;
        if info
            .segments
            .iter()
            .all(|s| s.index != edgevec_proto::IndexState::Building)
        {
            break;
        }
        if started.elapsed() > Duration::from_secs(1800) {
            bail!("indexes not built within 30 min");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let index_secs = started.elapsed().as_secs_f64();
    eprintln!("indexes ready after {index_secs:.1} s more");

    let mut clients = Vec::new();
    for _ in 0..args.concurrency {
        clients.push(connect(addr, &ca).await?);
    }
    // Warm-up, then the measurements.
    quic_search(
        &clients[..1],
        &Arc::new(queries[..100.min(queries.len())].to_vec()),
        args.k,
    )
    .await?;
    let quic1 = quic_search(&clients[..1], &queries, args.k).await?;
    let quicn = quic_search(&clients, &queries, args.k).await?;
    for c in &clients {
        c.close().await;
    }
    client.close().await;
    cluster.stop(1)?;

    let engine_dir = dir.join("node1/engine");
    let engine =
        Arc::new(Engine::open(&engine_dir, EngineOptions::default()).context("opening the node's data in process")?);
    if !engine.wait_for_indexes(Duration::from_secs(600)) {
        bail!("in-process indexes not ready");
    }
    // One node holds every shard of the bench collection.
    let engine = Arc::new(Local::open(&engine)?);
    local_search(
        &engine,
        &Arc::new(queries[..100.min(queries.len())].to_vec()),
        args.k,
        1,
    )?;
    let recall = recall_at_k(&engine, &data, &queries[..200.min(queries.len())], args.k as usize)?;
    let local1 = local_search(&engine, &queries, args.k, 1)?;
    let localn = local_search(&engine, &queries, args.k, args.concurrency)?;

    println!(
        "### {} × {} (L2, {} shards, seal_rows {}), k = {}, {} queries per run\n",
        args.n, args.dim, args.shards, seal_rows, args.k, args.queries
    );
    println!("| path | concurrency | QPS | p50 ms | p99 ms |");
    println!("|---|---:|---:|---:|---:|");
    for (path, c, s) in [
        ("in process", 1, &local1),
        ("QUIC client", 1, &quic1),
        ("in process", args.concurrency, &localn),
        ("QUIC client", args.concurrency, &quicn),
    ] {
        println!("| {path} | {c} | {:.0} | {:.3} | {:.3} |", s.qps, s.p50_ms, s.p99_ms);
    }
    println!();
    println!(
        "QUIC / in-process QPS ratio: {:.2} at 1 client, {:.2} at {} clients",
        quic1.qps / local1.qps,
        quicn.qps / localn.qps,
        args.concurrency
    );
    println!();
    println!(
        "recall@{} of the indexed search against brute force (first {} queries): {recall:.4}",
        args.k,
        200.min(queries.len())
    );
    println!();
    println!("Insert through the client, batches of {}: {:.0} rows/s ({} rows in {:.1} s; index build after the last insert: {:.1} s)", args.batch, insert_rate, args.n, insert_secs, index_secs);
    Ok(())
}

/// Share of the exact top-k (brute force over `data`, ids = row numbers)
/// that the engine returns.
fn recall_at_k(engine: &Local, data: &[Vec<f32>], queries: &[Vec<f32>], k: usize) -> Result<f64> {
    let mut found = 0usize;
    for q in queries {
        let mut exact: Vec<(f32, u64)> = data
            .iter()
            .enumerate()
            .map(|(i, v)| (v.iter().zip(q).map(|(a, b)| (a - b) * (a - b)).sum::<f32>(), i as u64))
            .collect();
        exact.select_nth_unstable_by(k - 1, |a, b| a.0.total_cmp(&b.0));
        let truth: std::collections::HashSet<u64> = exact[..k].iter().map(|e| e.1).collect();
        let hits = engine.search(q, k as u32)?;
        found += hits.iter().filter(|h| truth.contains(&h.id)).count();
    }
    Ok(found as f64 / (queries.len() * k) as f64)
}

/// SIGTERM, and waits (30 s at most, then SIGKILL) for `node` to exit.
fn terminate(node: &mut Child) -> Result<()> {
    // SAFETY: plain syscall on our own child.
    unsafe {
        libc::kill(node.id() as i32, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if node.try_wait()?.is_some() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    node.kill()?;
    node.wait()?;
    Ok(())
}
