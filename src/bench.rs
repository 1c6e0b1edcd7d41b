//! `bench`: search and insert throughput of one node, in process and over QUIC.
//!
//! Builds one index (N × DIM random vectors, inserted through the client in
//! batches) in a node process, measures search through the client over QUIC
//! on loopback at 1 and C concurrent clients, stops the node, opens the same
//! data directory in process and measures the same queries through the
//! library call. Prints a Markdown report; the QUIC/in-process ratio is the
//! number that matters (both sides run on the same machine in one run).
//!
//! With `--mode meta` it measures the metadata Raft instead: collection
//! create latency on a 3-node loopback cluster, and the time from kill -9 of
//! the leader to the first committed metadata write, over `--trials` runs.
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

#[derive(Parser, Debug)]
struct Args {
    /// `search` (engine and QUIC search/insert), `meta` (metadata Raft) or
    /// `replication` (shard replication on 3 nodes).
    #[arg(long, default_value = "search")]
    mode: String,
    /// Metadata writes measured (meta mode).
    #[arg(long, default_value_t = 200)]
    writes: usize,
    /// Leader kills (meta mode) or shard-primary kills (replication mode).
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
    /// the `--concurrency` writers, in two rounds per collection).
    #[arg(long, default_value_t = 400)]
    load_batches: usize,
    /// Replication mode: points written while a backup is down.
    #[arg(long, default_value_t = 100_000)]
    catch_up_points: usize,
    /// Replication mode: batch sizes of the catch-up runs (one run each).
    #[arg(long, value_delimiter = ',', default_value = "1000,100")]
    catch_up_batch: Vec<usize>,
    /// Replication mode: points per write of the failover writers.
    #[arg(long, default_value_t = 10)]
    failover_batch: usize,
    /// Keep the data directory (and node logs) here instead of a temp dir.
    #[arg(long)]
    dir: Option<PathBuf>,
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
}

impl Cluster {
    /// Writes the cluster file of `n` nodes with every role and starts them.
    fn start(dir: &Path, n: u64, cluster_extra: &str) -> Result<Cluster> {
        let (config, addrs) = write_config(dir, n, cluster_extra)?;
        let ca = std::fs::read(dir.join("certs/ca.pem"))?;
        let mut cluster = Cluster {
            dir: dir.to_path_buf(),
            config,
            addrs,
            ca,
            procs: (0..n).map(|_| None).collect(),
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
        let all = engine.replicas();
        let replicas: Vec<Arc<ShardReplica>> = all
            .iter()
            .filter(|(spec, _)| spec.name == "bench")
            .map(|(_, r)| r.clone())
            .collect();
        let metric = all
            .iter()
            .find(|(spec, _)| spec.name == "bench")
            .map(|(spec, _)| spec.metric)
            .context("the node holds no replica of the bench collection")?;
        Ok(Local { replicas, metric })
    }

    fn search(&self, query: &[f32], k: u32) -> Result<Vec<edgevec_proto::Hit>> {
        let mut hits = search_replicas(&self.replicas, self.metric, &[query.to_vec()], k, false)?;
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
        other => bail!("unknown --mode {other:?}: use search, meta or replication"),
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
    let deadline = Instant::now() + Duration::from_secs(60);
    while leader_of(&client).await.is_none() {
        if Instant::now() > deadline {
            bail!("no leader within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Metadata write latency: collection creates, one at a time.
    let spec = |i: usize| CollectionSpec::new(format!("c{i}"), 4, Metric::L2);
    client.create_collection(spec(0)).await?;
    let started = Instant::now();
    let mut lat = Vec::new();
    for i in 1..=args.writes {
        let t = Instant::now();
        client.create_collection(spec(i)).await?;
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
            match probe.create_collection(CollectionSpec::new(&name, 4, Metric::L2)).await {
                Ok(()) => break,
                Err(e) if e.is_retryable() => {}
                Err(edgevec_client::ClientError::AlreadyExists(_)) => break,
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
        while !back.list_collections().await?.iter().any(|c| c.spec.name == name) {
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
        "Collection create (a metadata write, committed and applied on the answering node), {} sequential writes: p50 {:.2} ms, p99 {:.2} ms, {:.0} writes/s\n",
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

/// CPU and disk counters of the node processes, of this process and of the
/// whole machine, read from /proc at one instant. Two of them say what a
/// measurement used, and so what limited it.
mod usage {
    use super::*;

    pub struct Usage {
        at: Instant,
        /// Per node: (pid, CPU seconds, bytes written to disk); `None`
        /// while the node is down.
        nodes: Vec<Option<(u32, f64, u64)>>,
        own_cpu: f64,
        /// Machine jiffies since boot: (busy, iowait, total).
        machine: (u64, u64, u64),
    }

    fn ticks_per_sec() -> f64 {
        // SAFETY: sysconf reads a constant of the running system.
        let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        if t > 0 {
            t as f64
        } else {
            100.0
        }
    }

    /// User + system CPU seconds of process `pid` ("self" for this one).
    fn cpu_secs(pid: &str) -> Option<f64> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the command name (which may hold spaces): state is
        // field 3, utime and stime are fields 14 and 15.
        let fields: Vec<&str> = text[text.rfind(')')? + 1..].split_whitespace().collect();
        let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
        Some(ticks as f64 / ticks_per_sec())
    }

    /// Bytes process `pid` caused to be written to storage.
    fn write_bytes(pid: u32) -> Option<u64> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix("write_bytes:"))
            .and_then(|v| v.trim().parse().ok())
    }

    fn machine() -> (u64, u64, u64) {
        let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let Some(line) = text.lines().find(|l| l.starts_with("cpu ")) else {
            return (0, 0, 0);
        };
        // user nice system idle iowait irq softirq steal
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .take(8)
            .filter_map(|x| x.parse().ok())
            .collect();
        if v.len() < 8 {
            return (0, 0, 0);
        }
        let total: u64 = v.iter().sum();
        (total - v[3] - v[4], v[4], total)
    }

    impl Usage {
        pub fn now(cluster: &Cluster) -> Usage {
            let nodes = cluster
                .ids()
                .map(|id| {
                    let pid = cluster.pid(id)?;
                    Some((
                        pid,
                        cpu_secs(&pid.to_string()).unwrap_or(0.0),
                        write_bytes(pid).unwrap_or(0),
                    ))
                })
                .collect();
            Usage {
                at: Instant::now(),
                nodes,
                own_cpu: cpu_secs("self").unwrap_or(0.0),
                machine: machine(),
            }
        }

        /// What was used from `self` to `later`, as one line of Markdown.
        pub fn until(&self, later: &Usage) -> String {
            let wall = (later.at - self.at).as_secs_f64().max(1e-9);
            let mut cpu = Vec::new();
            let mut disk = Vec::new();
            for (before, after) in self.nodes.iter().zip(&later.nodes) {
                let Some((pid, c1, w1)) = after else {
                    cpu.push("down".to_string());
                    disk.push("down".to_string());
                    continue;
                };
                // A node restarted in between counts from its start.
                let (c0, w0) = match before {
                    Some((p, c, w)) if p == pid => (*c, *w),
                    _ => (0.0, 0),
                };
                cpu.push(format!("{:.0}", (c1 - c0) / wall * 100.0));
                disk.push(format!("{:.0}", (w1.saturating_sub(w0)) as f64 / 1e6));
            }
            let (b0, i0, t0) = self.machine;
            let (b1, i1, t1) = later.machine;
            let dt = (t1.saturating_sub(t0)).max(1) as f64;
            let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
            format!(
                "node CPU (nodes {}): {} % of one core; bench process {:.0} %; machine busy {:.0} % and iowait {:.0} % of its {cpus} CPUs; node disk writes {} MB",
                (1..=cpu.len()).map(|i| i.to_string()).collect::<Vec<_>>().join("/"),
                cpu.join("/"),
                (later.own_cpu - self.own_cpu) / wall * 100.0,
                (b1.saturating_sub(b0)) as f64 / dt * 100.0,
                (i1.saturating_sub(i0)) as f64 / dt * 100.0,
                disk.join("/"),
            )
        }
    }

    /// CPU count and model, memory and kernel of this machine.
    pub fn machine_line() -> String {
        let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .map(str::trim)
            .unwrap_or("unknown CPU");
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_kib: f64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        format!(
            "{cpus} CPUs ({model}), {:.1} GiB RAM, Linux {}",
            mem_kib / (1024.0 * 1024.0),
            kernel.trim()
        )
    }

    /// The 1, 5 and 15 minute load averages.
    pub fn load_average() -> String {
        let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        text.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    }
}

/// `--mode replication`: what shard replication costs and how fast it
/// repairs itself, on 3 node processes sharing this machine.
///
/// Two collections of one shard each: `r1` (1 replica) and `r3` (3
/// replicas on the 3 nodes). Writes go to a client of the shard's primary
/// node, so both collections pay the same hops but for the backups. Ids
/// only grow (every write inserts new points); vectors come from a fixed
/// random pool, as their values do not change what a write costs.
mod replication {
    use super::usage::{load_average, machine_line, Usage};
    use super::*;

    /// Failure-detector and metadata Raft timings written into the
    /// cluster file (printed with the results).
    const TIMINGS: &str = "heartbeat_ms = 100\nsuspect_ms = 500\ndead_after_ms = 60000\nraft_heartbeat_ms = 60\nelection_timeout_ms = [250, 500]\n";
    const R1: &str = "r1";
    const R3: &str = "r3";
    /// Longest wait for the cluster to reach a state (all up, in-sync).
    const SETTLE: Duration = Duration::from_secs(120);
    /// Vectors in the pool batches are made from.
    const POOL: usize = 10_000;

    /// A collection under test and the next id to write into it.
    struct Target {
        name: &'static str,
        next_id: AtomicU64,
    }

    /// What every measurement shares.
    struct Bench<'a> {
        args: &'a Args,
        cluster: Cluster,
        /// Admin client of every node (status and shard polls).
        admin: Client,
        pool: Arc<Vec<Vec<f32>>>,
        r1: Arc<Target>,
        r3: Arc<Target>,
    }

    /// `n` new points for `target`, vectors from `pool`.
    fn points(target: &Target, pool: &[Vec<f32>], n: usize) -> Vec<Point> {
        let first = target.next_id.fetch_add(n as u64, Ordering::Relaxed);
        (first..first + n as u64)
            .map(|id| Point {
                id,
                vector: pool[id as usize % pool.len()].clone(),
                payload: None,
            })
            .collect()
    }

    /// The primary's last op id in `s`.
    fn primary_last(s: &ShardStatus) -> Option<OpId> {
        let p = s.primary?;
        s.replicas.iter().find(|r| r.node == p)?.last
    }

    /// `n` replicas, all in-sync and holding the primary's last op.
    fn converged(s: &ShardStatus, n: usize) -> bool {
        let Some(last) = primary_last(s) else {
            return false;
        };
        s.replicas.len() == n && s.replicas.iter().all(|r| r.state == "in-sync" && r.last == Some(last))
    }

    /// The shard and its replicas on one line, for progress and failure
    /// messages.
    fn show(s: &ShardStatus) -> String {
        let replicas: Vec<String> = s
            .replicas
            .iter()
            .map(|r| {
                format!(
                    "node {} {}{} last {} points {:?}{}",
                    r.node,
                    r.state,
                    if r.primary { " primary" } else { "" },
                    r.last.map(|l| l.to_string()).unwrap_or_else(|| "?".into()),
                    r.points,
                    r.catch_up.as_ref().map(|c| format!(" ({c})")).unwrap_or_default()
                )
            })
            .collect();
        format!(
            "term {} primary {:?}: {}; problems {:?}",
            s.term,
            s.primary,
            replicas.join("; "),
            s.problems
        )
    }

    /// The only shard of `name` as `client` reports it now (5 s at most).
    async fn shard(client: &Client, name: &str) -> Result<ShardStatus> {
        let list = tokio::time::timeout(Duration::from_secs(5), client.shards(Some(name)))
            .await
            .context("shards() gave no answer within 5 s")??;
        list.into_iter()
            .find(|c| c.collection == name)
            .and_then(|c| c.shards.into_iter().next())
            .with_context(|| format!("shards() does not list {name}"))
    }

    /// Polls `shard(name)` every 20 ms until `pred` holds (`within` at most).
    async fn wait_shard(
        client: &Client,
        name: &str,
        within: Duration,
        what: &str,
        pred: impl Fn(&ShardStatus) -> bool,
    ) -> Result<ShardStatus> {
        let deadline = Instant::now() + within;
        let mut last;
        loop {
            match shard(client, name).await {
                Ok(s) if pred(&s) => return Ok(s),
                Ok(s) => last = show(&s),
                Err(e) => last = format!("{e:#}"),
            }
            if Instant::now() > deadline {
                bail!("{name}: {what} not reached within {within:?}; last seen: {last}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the metadata has a leader and sees all `n` nodes up.
    async fn wait_all_up(client: &Client, n: usize) -> Result<u64> {
        let deadline = Instant::now() + SETTLE;
        loop {
            if let Ok(s) = client.cluster_status().await {
                if let Some(leader) = s.leader {
                    if s.nodes.len() == n && s.nodes.iter().all(|x| x.state == "up") {
                        return Ok(leader);
                    }
                }
            }
            if Instant::now() > deadline {
                bail!("the cluster did not show {n} nodes up under one leader within {SETTLE:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A client of node `first` that knows every node, `first` tried first.
    async fn client_from(cluster: &Cluster, first: u64, request_timeout: Duration) -> Result<Client> {
        let n = cluster.addrs.len();
        let addrs: Vec<SocketAddr> = (0..n).map(|i| cluster.addrs[(first as usize - 1 + i) % n]).collect();
        connect_with(&addrs, &cluster.ca, request_timeout).await
    }

    pub async fn run(args: &Args, dir: &Path) -> Result<()> {
        let started = Instant::now();
        let load_before = load_average();
        let mut cluster = Cluster::start(dir, 3, TIMINGS)?;
        let admin = match connect_any(&cluster.addrs, &cluster.ca).await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("{}", cluster.failure_report(40));
                return Err(e);
            }
        };
        let mut bench = Bench {
            args,
            cluster,
            admin,
            pool: Arc::new(vectors(POOL, args.dim, 7)),
            r1: Arc::new(Target {
                name: R1,
                next_id: AtomicU64::new(0),
            }),
            r3: Arc::new(Target {
                name: R3,
                next_id: AtomicU64::new(0),
            }),
        };
        let result = bench.measure(started, &load_before).await;
        if let Err(e) = &result {
            eprintln!("replication bench failed: {e:#}\n{}", bench.cluster.failure_report(40));
            if args.dir.is_none() {
                eprintln!("(run with --dir DIR to keep the data and the full node logs)");
            }
        }
        bench.admin.close().await;
        result
    }

    impl Bench<'_> {
        async fn measure(&mut self, started: Instant, load_before: &str) -> Result<()> {
            let args = self.args;
            if args.latency_batches == 0 || args.load_batches == 0 || args.batch == 0 || args.failover_batch == 0 {
                bail!("--latency-batches, --load-batches, --batch and --failover-batch must be at least 1");
            }
            let seal_rows = args.seal_rows(1_000_000);
            let leader = wait_all_up(&self.admin, 3).await?;
            for (name, replicas) in [(R1, 1), (R3, 3)] {
                let spec = CollectionSpec::new(name, args.dim as u32, Metric::L2).with_seal_rows(seal_rows);
                self.admin
                    .create_replicated(spec, ReplicationSpec::new(replicas))
                    .await
                    .with_context(|| format!("creating {name}"))?;
            }
            let p1 = wait_shard(&self.admin, R1, SETTLE, "a primary", |s| converged(s, 1)).await?;
            let p3 = wait_shard(&self.admin, R3, SETTLE, "3 in-sync replicas", |s| converged(s, 3)).await?;
            let (p1, p3) = (p1.primary.context("no primary")?, p3.primary.context("no primary")?);
            eprintln!("cluster up: metadata leader {leader}, {R1} primary {p1}, {R3} primary {p3}");

            let latency = self.write_latency(p1, p3).await?;
            let load = self.full_load(p1, p3).await?;
            let mut catch_ups = Vec::new();
            for &batch in &args.catch_up_batch {
                catch_ups.push(self.catch_up(batch).await?);
            }
            let mut trials = Vec::new();
            for trial in 0..args.trials {
                let t = self.failover().await?;
                eprintln!(
                    "failover trial {trial}: killed node {}{}; first ack of a write sent after the kill (ms): {}; {} writes failed; all in-sync again {:.1} s after the restart",
                    t.killed,
                    if t.was_leader { " (also the metadata leader)" } else { "" },
                    t.took_ms(),
                    t.errors,
                    t.rejoin.as_secs_f64()
                );
                trials.push(t);
            }

            let report = Report {
                args,
                seal_rows,
                leader,
                p1,
                p3,
                load_before,
                latency,
                load,
                catch_ups,
                trials,
                took: started.elapsed(),
            };
            report.print();
            for id in 1..=3 {
                self.cluster.stop(id)?;
            }
            Ok(())
        }

        /// One batch in flight at a time, `r1` and `r3` interleaved (the
        /// order alternating) so that drift on the machine hits both alike.
        async fn write_latency(&self, p1: u64, p3: u64) -> Result<[Vec<Duration>; 2]> {
            let args = self.args;
            let clients = [
                connect(self.cluster.addr(p1), &self.cluster.ca).await?,
                connect(self.cluster.addr(p3), &self.cluster.ca).await?,
            ];
            let targets = [&self.r1, &self.r3];
            let mut lat = [Vec::new(), Vec::new()];
            for i in 0..args.warmup + args.latency_batches {
                let order = if i % 2 == 0 { [0, 1] } else { [1, 0] };
                for w in order {
                    let batch = points(targets[w], &self.pool, args.batch);
                    let t = Instant::now();
                    clients[w]
                        .upsert(targets[w].name, batch)
                        .await
                        .with_context(|| format!("upsert into {}", targets[w].name))?;
                    if i >= args.warmup {
                        lat[w].push(t.elapsed());
                    }
                }
            }
            for c in &clients {
                c.close().await;
            }
            for l in &mut lat {
                l.sort();
            }
            eprintln!(
                "write latency: p50 {:.1} ms ({R1}) vs {:.1} ms ({R3})",
                ms(quantile(&lat[0], 0.5)),
                ms(quantile(&lat[1], 0.5))
            );
            Ok(lat)
        }

        /// `--concurrency` writers, each with its own client of the
        /// primary, `--load-batches` per collection in two rounds each
        /// (r1, r3, r3, r1) so drift hits both alike.
        async fn full_load(&self, p1: u64, p3: u64) -> Result<[Load; 2]> {
            let args = self.args;
            let writers = args.concurrency.max(1);
            let per_writer = (args.load_batches / writers / 2).max(1);
            let mut out = [Load::default(), Load::default()];
            for w in [0, 1, 1, 0] {
                let (target, primary) = if w == 0 { (&self.r1, p1) } else { (&self.r3, p3) };
                let mut clients = Vec::new();
                for _ in 0..writers {
                    clients.push(connect(self.cluster.addr(primary), &self.cluster.ca).await?);
                }
                let before = Usage::now(&self.cluster);
                let t = Instant::now();
                let mut tasks = Vec::new();
                for client in &clients {
                    let (client, target, pool) = (client.clone(), target.clone(), self.pool.clone());
                    let batch = args.batch;
                    tasks.push(tokio::spawn(async move {
                        let mut lat = Vec::new();
                        for _ in 0..per_writer {
                            let points = points(&target, &pool, batch);
                            let t = Instant::now();
                            client.upsert(target.name, points).await?;
                            lat.push(t.elapsed());
                        }
                        Ok::<_, anyhow::Error>(lat)
                    }));
                }
                for task in tasks {
                    let lat = tokio::time::timeout(Duration::from_secs(600), task)
                        .await
                        .context("a writer did not finish within 600 s")???;
                    out[w].lat.extend(lat);
                }
                let wall = t.elapsed();
                let after = Usage::now(&self.cluster);
                out[w].rows += (writers * per_writer * args.batch) as u64;
                out[w].wall += wall;
                out[w].usage.push(before.until(&after));
                eprintln!(
                    "full load on {}: {:.0} rows/s; {}",
                    target.name,
                    (writers * per_writer * args.batch) as f64 / wall.as_secs_f64(),
                    before.until(&after)
                );
                for c in &clients {
                    c.close().await;
                }
            }
            for l in &mut out {
                l.lat.sort();
            }
            Ok(out)
        }

        /// kill -9 of a backup of `r3`, `--catch-up-points` written in
        /// batches of `batch`, restart; times the restart until the backup
        /// is in-sync again with the primary's last op.
        async fn catch_up(&mut self, batch: usize) -> Result<CatchUp> {
            let args = self.args;
            let s = wait_shard(&self.admin, R3, SETTLE, "3 in-sync replicas", |s| converged(s, 3)).await?;
            let primary = s.primary.context("no primary")?;
            let lsn0 = primary_last(&s).context("no primary position")?;
            // A backup that is not the metadata leader, when there is one:
            // what is measured is catch-up, not a metadata election.
            let leader = self.admin.cluster_status().await?.leader;
            let mut backups: Vec<u64> = s.replicas.iter().map(|r| r.node).filter(|n| *n != primary).collect();
            backups.sort_by_key(|n| Some(*n) == leader);
            let backup = *backups.first().context("no backup")?;
            let writer = connect(self.cluster.addr(primary), &self.cluster.ca).await?;
            let poller = client_from(&self.cluster, primary, Duration::from_secs(5)).await?;

            self.cluster.kill9(backup)?;
            let t = Instant::now();
            let mut written = 0;
            while written < args.catch_up_points {
                let n = batch.min(args.catch_up_points - written);
                writer
                    .upsert(R3, points(&self.r3, &self.pool, n))
                    .await
                    .with_context(|| format!("upsert into {R3} while node {backup} is down"))?;
                written += n;
            }
            let write_time = t.elapsed();
            writer.close().await;
            let s = shard(&poller, R3).await?;
            let lsn1 = primary_last(&s).context("no primary position")?;
            eprintln!(
                "catch-up (batches of {batch}): node {backup} down, {written} points written in {:.1} s; {}",
                write_time.as_secs_f64(),
                show(&s)
            );

            let before = Usage::now(&self.cluster);
            self.cluster.spawn(backup)?;
            let restarted = Instant::now();
            let (addr, ca) = (self.cluster.addr(backup), self.cluster.ca.clone());
            let answering = tokio::spawn(async move {
                let c = connect(addr, &ca).await?;
                let at = restarted.elapsed();
                c.close().await;
                Ok::<_, anyhow::Error>(at)
            });
            let done = wait_shard(&poller, R3, SETTLE, "the restarted backup in-sync", |s| {
                let last = primary_last(s);
                last >= Some(lsn1)
                    && s.replicas
                        .iter()
                        .any(|r| r.node == backup && r.state == "in-sync" && r.last == last)
            })
            .await?;
            let in_sync = restarted.elapsed();
            let after = Usage::now(&self.cluster);
            let answered = tokio::time::timeout(Duration::from_secs(60), answering)
                .await
                .context("the restarted node did not answer within 60 s")???;
            poller.close().await;
            eprintln!(
                "catch-up (batches of {batch}): node {backup} answering {:.2} s and in-sync {:.2} s after its restart; {}",
                answered.as_secs_f64(),
                in_sync.as_secs_f64(),
                show(&done)
            );
            Ok(CatchUp {
                batch,
                node: backup,
                ops: lsn1.lsn.saturating_sub(lsn0.lsn),
                points: written as u64,
                write_time,
                answered,
                in_sync,
                usage: before.until(&after),
            })
        }

        /// One failover trial on `r3`: the [`PROBES`] writers (all three
        /// clients know every node), kill -9 of the primary, the first ack
        /// of a write each sent after the kill; then the restart and the
        /// wait for 3 in-sync replicas.
        async fn failover(&mut self) -> Result<Trial> {
            let s = wait_shard(&self.admin, R3, SETTLE, "3 in-sync replicas", |s| converged(s, 3)).await?;
            let primary = s.primary.context("no primary")?;
            let leader = self.admin.cluster_status().await?.leader;
            let survivor = self.cluster.ids().find(|id| *id != primary).context("one node")?;
            let stop = Arc::new(AtomicBool::new(false));
            let mut clients = Vec::new();
            let mut writers = Vec::new();
            for (_, via_primary, pace) in PROBES {
                let first = if via_primary { primary } else { survivor };
                let client = client_from(&self.cluster, first, Duration::from_secs(10)).await?;
                writers.push(Writer::spawn(
                    client.clone(),
                    self.r3.clone(),
                    self.pool.clone(),
                    self.args.failover_batch,
                    pace,
                    stop.clone(),
                ));
                clients.push(client);
            }
            // Every writer in its stride before the kill.
            let spawned = Instant::now();
            let deadline = spawned + Duration::from_secs(30);
            while writers.iter().any(|w| w.first_ack_after(spawned).is_none()) {
                if Instant::now() > deadline {
                    stop.store(true, Ordering::SeqCst);
                    bail!("the failover writers got no acks within 30 s");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;

            self.cluster.kill9(primary)?;
            // The process is reaped: nothing sent from now on can reach it.
            let killed = Instant::now();
            let deadline = killed + Duration::from_secs(60);
            let mut took = [None; PROBES.len()];
            while took.iter().any(Option::is_none) {
                for (w, writer) in writers.iter().enumerate() {
                    if took[w].is_none() {
                        took[w] = writer.first_ack_after(killed).map(|at| at - killed);
                    }
                }
                if Instant::now() > deadline {
                    stop.store(true, Ordering::SeqCst);
                    bail!(
                        "not every writer had a write sent after kill -9 of primary {primary} acknowledged within 60 s: {took:?}"
                    );
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            stop.store(true, Ordering::SeqCst);
            let mut errors = 0;
            for w in writers {
                errors += w.join().await;
            }
            for c in &clients {
                c.close().await;
            }

            self.cluster.spawn(primary)?;
            let restarted = Instant::now();
            wait_shard(&self.admin, R3, SETTLE, "3 in-sync replicas after the restart", |s| {
                converged(s, 3)
            })
            .await?;
            Ok(Trial {
                killed: primary,
                was_leader: leader == Some(primary),
                took: took.map(Option::unwrap_or_default),
                errors,
                rejoin: restarted.elapsed(),
            })
        }
    }

    /// The failover writers: how the report names each, whether its
    /// client starts at the primary's node (else at a node that survives),
    /// and its pace.
    const PROBES: [(&str, bool, Pace); 3] = [
        ("write loop, client connected to a surviving node", false, Pace::Closed),
        ("write loop, client connected to the killed primary", true, Pace::Closed),
        (
            "a write every 20 ms, client connected to a surviving node",
            false,
            Pace::Every(Duration::from_millis(20)),
        ),
    ];

    /// One write of a failover writer: when it was sent and, if it was
    /// acknowledged, when.
    struct Sent {
        at: Instant,
        acked: Option<Instant>,
    }

    /// How a failover writer sends.
    #[derive(Clone, Copy)]
    enum Pace {
        /// One write in flight: the next is sent when the last returns (an
        /// application's write loop).
        Closed,
        /// A new write every period whatever happened to the earlier ones
        /// (at most [`OPEN_IN_FLIGHT`] in flight): the first write sent
        /// after the kill leaves at once, so it times the cluster alone.
        Every(Duration),
    }

    /// Cap on the writes of an open-loop writer still waiting for an answer.
    const OPEN_IN_FLIGHT: usize = 64;

    /// Upserts small batches of new points into `r3` at its [`Pace`],
    /// recording each. Bounded: 60 s and 100,000 writes, whatever happens.
    struct Writer {
        log: Arc<Mutex<Vec<Sent>>>,
        task: tokio::task::JoinHandle<()>,
    }

    /// What one failover writer sends with.
    #[derive(Clone)]
    struct Sender {
        client: Client,
        target: Arc<Target>,
        pool: Arc<Vec<Vec<f32>>>,
        batch: usize,
        log: Arc<Mutex<Vec<Sent>>>,
    }

    impl Sender {
        /// Sends one write of new points and records it.
        async fn send(&self) {
            let points = points(&self.target, &self.pool, self.batch);
            let at = Instant::now();
            let ok = self.client.upsert(self.target.name, points).await.is_ok();
            let acked = ok.then(Instant::now);
            self.log.lock().expect("writer log").push(Sent { at, acked });
        }
    }

    impl Writer {
        fn spawn(
            client: Client,
            target: Arc<Target>,
            pool: Arc<Vec<Vec<f32>>>,
            batch: usize,
            pace: Pace,
            stop: Arc<AtomicBool>,
        ) -> Writer {
            let log = Arc::new(Mutex::new(Vec::new()));
            let sender = Sender {
                client,
                target,
                pool,
                batch,
                log: log.clone(),
            };
            let task = tokio::spawn(async move {
                let until = Instant::now() + Duration::from_secs(60);
                let in_flight = Arc::new(AtomicU64::new(0));
                for _ in 0..100_000 {
                    if stop.load(Ordering::SeqCst) || Instant::now() > until {
                        break;
                    }
                    match pace {
                        Pace::Closed => sender.send().await,
                        Pace::Every(period) => {
                            if in_flight.load(Ordering::SeqCst) < OPEN_IN_FLIGHT as u64 {
                                in_flight.fetch_add(1, Ordering::SeqCst);
                                let (sender, in_flight) = (sender.clone(), in_flight.clone());
                                // Ends within the client's request timeout
                                // and retry budget.
                                tokio::spawn(async move {
                                    sender.send().await;
                                    in_flight.fetch_sub(1, Ordering::SeqCst);
                                });
                            }
                            tokio::time::sleep(period).await;
                        }
                    }
                }
            });
            Writer { log, task }
        }

        /// When the first write sent after `t` was acknowledged.
        fn first_ack_after(&self, t: Instant) -> Option<Instant> {
            let log = self.log.lock().expect("writer log");
            log.iter().filter(|s| s.at > t).filter_map(|s| s.acked).min()
        }

        /// Waits (15 s at most, then abandons it) for the writer's last
        /// write; returns how many writes failed.
        async fn join(self) -> usize {
            let abort = self.task.abort_handle();
            if tokio::time::timeout(Duration::from_secs(15), self.task).await.is_err() {
                abort.abort();
            }
            let log = self.log.lock().expect("writer log");
            log.iter().filter(|s| s.acked.is_none()).count()
        }
    }

    /// Insert throughput of one collection at full load.
    #[derive(Default)]
    struct Load {
        rows: u64,
        wall: Duration,
        /// Per batch, sorted.
        lat: Vec<Duration>,
        /// What each round used.
        usage: Vec<String>,
    }

    impl Load {
        fn rate(&self) -> f64 {
            self.rows as f64 / self.wall.as_secs_f64()
        }
    }

    struct CatchUp {
        batch: usize,
        node: u64,
        /// Ops the backup missed (the primary's LSN advance while it was down).
        ops: u64,
        points: u64,
        write_time: Duration,
        /// From the restart until the node answered a status request.
        answered: Duration,
        /// From the restart until shards() showed it in-sync at the
        /// primary's last op.
        in_sync: Duration,
        usage: String,
    }

    struct Trial {
        killed: u64,
        was_leader: bool,
        /// Per [`PROBES`] writer: from the kill to the first ack of a
        /// write sent after it.
        took: [Duration; PROBES.len()],
        /// Writes of the writers that returned an error.
        errors: usize,
        rejoin: Duration,
    }

    impl Trial {
        /// Each writer's time, in ms, in [`PROBES`] order.
        fn took_ms(&self) -> String {
            self.took
                .iter()
                .map(|d| format!("{:.0}", ms(*d)))
                .collect::<Vec<_>>()
                .join(" / ")
        }
    }

    struct Report<'a> {
        args: &'a Args,
        seal_rows: u32,
        leader: u64,
        p1: u64,
        p3: u64,
        load_before: &'a str,
        latency: [Vec<Duration>; 2],
        load: [Load; 2],
        catch_ups: Vec<CatchUp>,
        trials: Vec<Trial>,
        took: Duration,
    }

    impl Report<'_> {
        fn print(&self) {
            let args = self.args;
            println!("### Shard replication, 3 nodes on loopback\n");
            println!("Command: `{}`\n", std::env::args().collect::<Vec<_>>().join(" "));
            println!(
                "Machine: {}; load average {} at the start and {} at the end (shared machine: other jobs ran too). The whole run took {:.0} s.\n",
                machine_line(),
                self.load_before,
                load_average(),
                self.took.as_secs_f64()
            );
            println!(
                "Cluster: 3 `edgevec node` processes on 127.0.0.1, each with roles meta, data and proxy; `{}`. \
                 Collections `{R1}` (replicas 1) and `{R3}` (replicas 3, min_insync 2): 1 shard, {}-d, L2, seal_rows {} (no seal during the run), points without payload. \
                 At the start the metadata leader was node {}, the primary of `{R1}` node {} and of `{R3}` node {}; \
                 writes go through a client of the primary's node.\n",
                TIMINGS.trim_end().replace('\n', "`, `"),
                args.dim,
                self.seal_rows,
                self.leader,
                self.p1,
                self.p3
            );

            println!("#### Write latency, one batch of {} in flight\n", args.batch);
            println!(
                "{} batches per collection after {} warm-up batches, the two collections interleaved.\n",
                args.latency_batches, args.warmup
            );
            println!("| collection | replicas | p50 ms | p99 ms | rows/s at one batch in flight |");
            println!("|---|---:|---:|---:|---:|");
            for (w, (name, replicas)) in [(R1, 1), (R3, 3)].into_iter().enumerate() {
                let lat = &self.latency[w];
                let total: Duration = lat.iter().sum();
                println!(
                    "| {name} | {replicas} | {:.2} | {:.2} | {:.0} |",
                    ms(quantile(lat, 0.5)),
                    ms(quantile(lat, 0.99)),
                    (lat.len() * args.batch) as f64 / total.as_secs_f64()
                );
            }
            let ratio = |p: f64| ms(quantile(&self.latency[1], p)) / ms(quantile(&self.latency[0], p));
            println!(
                "\nRatio replicas 3 / replicas 1: **p50 {:.2}** (target ≤ 1.3), p99 {:.2}.\n",
                ratio(0.5),
                ratio(0.99)
            );

            let writers = args.concurrency.max(1);
            println!("#### Insert throughput, {writers} concurrent writers\n");
            println!(
                "Each writer has its own client and sends batches of {}, one in flight; two rounds per collection, in the order {R1}, {R3}, {R3}, {R1}.\n",
                args.batch
            );
            println!("| collection | replicas | rows | seconds | rows/s | batch p50 ms | batch p99 ms |");
            println!("|---|---:|---:|---:|---:|---:|---:|");
            for (w, (name, replicas)) in [(R1, 1), (R3, 3)].into_iter().enumerate() {
                let l = &self.load[w];
                println!(
                    "| {name} | {replicas} | {} | {:.1} | {:.0} | {:.1} | {:.1} |",
                    l.rows,
                    l.wall.as_secs_f64(),
                    l.rate(),
                    ms(quantile(&l.lat, 0.5)),
                    ms(quantile(&l.lat, 0.99))
                );
            }
            println!(
                "\nRatio replicas 3 / replicas 1: **{:.2}** (target ≥ 0.5).\n",
                self.load[1].rate() / self.load[0].rate()
            );
            for (w, name) in [R1, R3].into_iter().enumerate() {
                for (round, u) in self.load[w].usage.iter().enumerate() {
                    println!("- {name}, round {}: {u}", round + 1);
                }
            }
            println!();

            println!("#### Catch-up of a backup after kill -9\n");
            println!(
                "A backup of `{R3}` (not the metadata leader when avoidable) is killed, {} points are written in batches, the backup is restarted; \
                 timed from the restart until `shards()` shows it in-sync at the primary's last op id (polled every 20 ms). \
                 Rates are over that whole time, process start included; MB = points × {} × 4 bytes of vectors.\n",
                args.catch_up_points, args.dim
            );
            println!("| batch | node | ops missed | points | MB | written while down (s) | answering after restart (s) | in-sync after restart (s) | ops/s | points/s | MB/s |");
            println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
            for c in &self.catch_ups {
                let secs = c.in_sync.as_secs_f64();
                let mb = (c.points * args.dim as u64 * 4) as f64 / 1e6;
                println!(
                    "| {} | {} | {} | {} | {:.1} | {:.1} | {:.2} | **{:.2}** | {:.0} | {:.0} | {:.1} |",
                    c.batch,
                    c.node,
                    c.ops,
                    c.points,
                    mb,
                    c.write_time.as_secs_f64(),
                    c.answered.as_secs_f64(),
                    secs,
                    c.ops as f64 / secs,
                    c.points as f64 / secs,
                    mb / secs
                );
            }
            println!("\nTarget: in-sync < 10 s. From the restart to in-sync:\n");
            for c in &self.catch_ups {
                println!("- batches of {}: {}", c.batch, c.usage);
            }
            println!();

            println!("#### Failover: kill -9 of the primary\n");
            println!(
                "{} trials on `{R3}`. Three writers send batches of {} new points; all three clients know all three nodes. \
                 Two are write loops (one write in flight, the next sent when the last returns, as fast as acks come back): one connected to a node that survives \
                 (its proxy forwards to the primary), one to the primary's own node (its client must also notice that the node is gone and move). \
                 The third sends a new write every 20 ms whatever happened to the earlier ones, through a surviving node: its first write after the kill leaves at once, \
                 so it times the cluster without the write that was in flight at the kill. \
                 Timed from the moment the killed process is reaped to the ack of the first write sent after it. \
                 After each trial the node is restarted and the next trial waits for 3 in-sync replicas.\n",
                self.trials.len(),
                args.failover_batch
            );
            println!("| writer | median ms | p90 ms | max ms |");
            println!("|---|---:|---:|---:|");
            for (w, (label, _, _)) in PROBES.iter().enumerate() {
                let mut v: Vec<Duration> = self.trials.iter().map(|t| t.took[w]).collect();
                if v.is_empty() {
                    continue;
                }
                v.sort();
                println!(
                    "| {label} | **{:.0}** | {:.0} | {:.0} |",
                    ms(quantile(&v, 0.5)),
                    ms(quantile(&v, 0.9)),
                    ms(v[v.len() - 1])
                );
            }
            println!(
                "\nTarget: median < 2 s. Per trial: the killed node; ms for each writer in the order of the table; writes that returned an error; s from the restart until 3 in-sync replicas again.\n"
            );
            for (i, t) in self.trials.iter().enumerate() {
                println!(
                    "- trial {}: node {}{}: {} ms; {} errors; {:.1} s",
                    i + 1,
                    t.killed,
                    if t.was_leader {
                        " (also the metadata leader)"
                    } else {
                        ""
                    },
                    t.took_ms(),
                    t.errors,
                    t.rejoin.as_secs_f64()
                );
            }
        }
    }
}
