//! `--mode reads`: search through the read router on a 3-node cluster
//! (replicas = 3): QPS and latency per consistency level, then failed
//! searches and p99 while a replica's node is killed (kill -9) and while
//! one is paused (SIGSTOP), against the steady state just before; each
//! fault without and with hedged reads.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use edgevec_client::{Client, ClientConfig};

use super::{quantile, Args, Cluster};

/// Searches of one continuous load: when each ended, how long it took,
/// and whether it failed.
type Samples = Arc<Mutex<Vec<(Instant, Duration, bool)>>>;

async fn client_at(cluster: &Cluster, first: u64, level: Option<&str>) -> Result<Client> {
    let mut order: Vec<_> = vec![cluster.addr(first)];
    order.extend(cluster.ids().filter(|id| *id != first).map(|id| cluster.addr(id)));
    let mut config = ClientConfig::new(order, cluster.ca.clone(), "bench-admin-token");
    config.connect_timeout = Duration::from_millis(500);
    config.consistency = level.map(str::to_string);
    Client::connect(config).await.context("connecting a client")
}

/// `clients` search continuously (one query after another each) until
/// `stop`; every search is recorded.
fn keep_searching(clients: &[Client], queries: &Arc<Vec<Vec<f32>>>, k: u32, stop: &Arc<AtomicBool>) -> Samples {
    let samples: Samples = Arc::default();
    for (w, client) in clients.iter().enumerate() {
        let (client, queries, stop, samples) = (client.clone(), queries.clone(), stop.clone(), samples.clone());
        tokio::spawn(async move {
            let mut i = w;
            while !stop.load(Ordering::Relaxed) {
                let q = queries[i % queries.len()].clone();
                i += 1;
                let t = Instant::now();
                let failed = client.search_batch("bench", vec![q], k, false).await.is_err();
                samples
                    .lock()
                    .expect("samples")
                    .push((Instant::now(), t.elapsed(), failed));
            }
        });
    }
    samples
}

/// (searches, failed, p99 ms, slowest ms) of the searches that ended in
/// `[from, to)`.
fn window(samples: &Samples, from: Instant, to: Instant) -> (usize, usize, f64, f64) {
    let all = samples.lock().expect("samples");
    let mut lat: Vec<Duration> = Vec::new();
    let mut failed = 0;
    for (_, took, f) in all.iter().filter(|(at, _, _)| *at >= from && *at < to) {
        if *f {
            failed += 1;
        } else {
            lat.push(*took);
        }
    }
    lat.sort();
    if lat.is_empty() {
        return (failed, failed, f64::NAN, f64::NAN);
    }
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    (
        lat.len() + failed,
        failed,
        ms(quantile(&lat, 0.99)),
        ms(lat[lat.len() - 1]),
    )
}

pub async fn run(args: &Args, dir: &std::path::Path) -> Result<()> {
    let started = Instant::now();
    let load_before = super::usage::load_average();
    let (mut cluster, admin) = super::replicated_bench_cluster(args, dir).await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let queries = Arc::new(super::vectors(args.queries, args.dim, 2));
    println!("### Reads per consistency level, and while a replica dies\n");
    println!(
        "Command: `bench --mode reads --n {} --dim {} --shards {} --concurrency {} --queries {}`\n",
        args.n, args.dim, args.shards, args.concurrency, args.queries
    );
    super::usage::print_machine(&load_before);
    println!("| level | QPS | p50 ms | p99 ms |");
    println!("|---|---:|---:|---:|");
    for level in ["eventually", "session", "bounded:5000", "bounded:100", "strong"] {
        let mut clients = Vec::new();
        for i in 0..args.concurrency {
            clients.push(client_at(&cluster, 1 + (i as u64 % 3), Some(level)).await?);
        }
        let s = super::quic_search(&clients, &queries, args.k).await?;
        println!("| `{level}` | {:.0} | {:.2} | {:.2} |", s.qps, s.p50_ms, s.p99_ms);
        for c in clients {
            c.close().await;
        }
    }

    // Faults under continuous load at the default level; the clients reach
    // node 1 first, the victim is node 3 (a replica of every shard).
    println!("\n| fault on node 3 | searches in 5 s before | p99 ms before | searches in 5 s after | failed | p99 ms after | p99 after / before | slowest ms after |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for (fault, hedged) in [
        ("kill -9", false),
        ("SIGSTOP", false),
        ("kill -9", true),
        ("SIGSTOP", true),
    ] {
        admin.set_hedging("bench", hedged).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut clients = Vec::new();
        for _ in 0..args.concurrency {
            clients.push(client_at(&cluster, 1, None).await?);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let samples = keep_searching(&clients, &queries, args.k, &stop);
        tokio::time::sleep(Duration::from_secs(6)).await;
        let at = Instant::now();
        match fault {
            "kill -9" => cluster.kill9(3)?,
            _ => cluster.pause(3, true)?,
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
        stop.store(true, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (n0, f0, p99_0, _) = window(&samples, at - Duration::from_secs(5), at);
        let (n1, f1, p99_1, slowest) = window(&samples, at, at + Duration::from_secs(5));
        println!(
            "| {fault}{} | {n0} ({f0} failed) | {p99_0:.2} | {n1} | {f1} | {p99_1:.2} | {:.1} | {slowest:.0} |",
            if hedged { ", hedged reads" } else { "" },
            p99_1 / p99_0
        );
        for c in clients {
            c.close().await;
        }
        // Back to three live replicas before the next fault.
        match fault {
            "kill -9" => cluster.spawn(3)?,
            _ => cluster.pause(3, false)?,
        }
        wait_in_sync(&admin).await?;
    }
    println!(
        "\n{} s in all; load average {} at the end.",
        started.elapsed().as_secs(),
        super::usage::load_average()
    );
    Ok(())
}

/// Waits (120 s at most) until every shard of the bench collection has
/// three in-sync replicas again.
async fn wait_in_sync(admin: &Client) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(all) = admin.shards(Some("bench")).await {
            let ok = all.iter().all(|c| {
                c.shards
                    .iter()
                    .all(|s| s.replicas.iter().filter(|r| r.state == "in-sync").count() == 3)
            });
            if ok {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            anyhow::bail!("the bench collection did not get three in-sync replicas back within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `--mode scaling`: search QPS with 1 and then 2 replicas of a one-shard
/// collection on a 2-node cluster whose nodes are pinned to a core each
/// (`taskset`); the load generator runs unpinned on the same two cores.
pub async fn scaling(args: &Args, dir: &std::path::Path) -> Result<()> {
    let load_before = super::usage::load_average();
    let cluster = Cluster::start(dir, 2, super::replication::TIMINGS)?;
    for id in 1..=2u64 {
        let pid = cluster.pid(id).context("node not running")?;
        let status = std::process::Command::new("taskset")
            .args(["-a", "-cp", &(id - 1).to_string(), &pid.to_string()])
            .stdout(std::process::Stdio::null())
            .status()
            .context("running taskset")?;
        anyhow::ensure!(status.success(), "taskset could not pin node {id}");
    }
    let admin = super::connect_any(&cluster.addrs, &cluster.ca).await?;
    super::replication::wait_all_up(&admin, 2).await?;
    let spec = edgevec_client::CollectionSpec::new("bench", args.dim as u32, edgevec_client::Metric::L2)
        .with_shards(1)
        .with_seal_rows(args.seal_rows(20_000));
    admin
        .create_replicated(spec, edgevec_client::ReplicationSpec::new(1))
        .await
        .context("creating the bench collection")?;
    super::insert(&admin, args.n, args.dim).await?;
    let queries = Arc::new(super::vectors(args.queries, args.dim, 2));
    println!("### Search QPS with 1 and 2 replicas, each node pinned to its own core\n");
    println!(
        "Command: `bench --mode scaling --n {} --dim {} --concurrency {} --queries {}` (one shard; node 1 on core 0, \
         node 2 on core 1, the load generator on both)\n",
        args.n, args.dim, args.concurrency, args.queries
    );
    super::usage::print_machine(&load_before);
    println!("| replicas | serving nodes | QPS | p50 ms | p99 ms |");
    println!("|---:|---|---:|---:|---:|");
    let mut qps = Vec::new();
    for replicas in [1u32, 2] {
        if replicas > 1 {
            admin
                .load("bench", edgevec_client::ReplicationSpec::new(replicas))
                .await
                .context("adding a replica")?;
        }
        let serving = settled(&admin, replicas as usize).await?;
        let mut clients = Vec::new();
        for i in 0..args.concurrency {
            clients.push(client_at(&cluster, 1 + (i as u64 % 2), None).await?);
        }
        // A warm-up pass, then the measured one.
        super::quic_search(&clients, &queries, args.k).await?;
        let s = super::quic_search(&clients, &queries, args.k).await?;
        println!(
            "| {replicas} | {serving:?} | {:.0} | {:.2} | {:.2} |",
            s.qps, s.p50_ms, s.p99_ms
        );
        qps.push(s.qps);
        for c in clients {
            c.close().await;
        }
    }
    println!(
        "\nQPS with 2 replicas / with 1: **{:.2}**; load average {} at the end.",
        qps[1] / qps[0],
        super::usage::load_average()
    );
    Ok(())
}

/// Waits (300 s at most) until the bench collection's shard has `n`
/// in-sync replicas and every sealed segment is indexed; returns the
/// replicas' nodes.
async fn settled(admin: &Client, n: usize) -> Result<Vec<u64>> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let shards = admin.shards(Some("bench")).await.ok();
        let nodes: Vec<u64> = shards
            .iter()
            .flatten()
            .flat_map(|c| c.shards.iter())
            .flat_map(|s| s.replicas.iter().filter(|r| r.state == "in-sync").map(|r| r.node))
            .collect();
        let indexed = admin.describe_collection("bench").await.is_ok_and(|info| {
            info.segments
                .iter()
                .all(|s| s.state != edgevec_proto::SegmentState::Sealed || s.index == edgevec_proto::IndexState::Ready)
        });
        if nodes.len() == n && indexed {
            // A new replica receives sealed segments with their indexes;
            // a moment for its node to settle after the transfer.
            tokio::time::sleep(Duration::from_secs(5)).await;
            return Ok(nodes);
        }
        if Instant::now() > deadline {
            anyhow::bail!("the bench collection did not settle at {n} in-sync replicas within 300 s");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
