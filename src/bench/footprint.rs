//! `--mode footprint`: a node's memory and disk for the vectors it holds.
//!
//! A 3-node loopback cluster, collection `bench` with 3 replicas (every
//! node holds every vector) at the default seal size unless `--seal-rows`
//! says otherwise; `--n` clustered vectors of `--dim` (`--metric`)
//! inserted through the client library in batches of `--batch`, 4 in
//! flight, then written again `--rewrites` times (same ids and vectors:
//! each round replaces every point with a new row). Every node's RSS is sampled every 100 ms from the first insert
//! (its peak, and when it was reached, are reported; so is the most its
//! data directory took) until the
//! collection has settled (every sealed segment indexed, no
//! build or merge under way, the segment list unchanged for 10 s); then
//! RSS and the bytes of every node's data directory (blocks allocated), by
//! kind of file, are read once more, with each node's anonymous memory by
//! mapping (malloc heap, large mappings, the rest). Everything is reported
//! against the raw bytes of the vectors (`n × dim × 4`). `--trace-ms N`
//! prints a line every N ms until then: seconds since the first insert,
//! each node's RSS in MiB, and the segments of the node `describe` asked
//! (`id:rows/live:state`, state `G` growing, `B` sealed and waiting for
//! its index, `R` indexed) with the index builds under way.

use std::collections::BTreeMap;

use edgevec_proto::{IndexState, SegmentState};

use super::*;

/// Resident set of process `pid`, in bytes.
fn rss(pid: u32) -> Option<u64> {
    edgevec_node::metrics::process_resident_bytes(&pid.to_string())
}

/// The parts of process `pid`'s resident set, in bytes: anonymous
/// memory (heap, mappings the process made), file pages (its binary and
/// libraries, mapped files) and shared memory.
fn rss_parts(pid: u32) -> Option<[u64; 3]> {
    let parts = edgevec_node::metrics::process_status_bytes(&pid.to_string(), &["RssAnon", "RssFile", "RssShmem"])?;
    parts.try_into().ok()
}

/// The kind of a file in a node's data directory, for the breakdown.
fn kind(path: &Path) -> &'static str {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let under_engine = path.components().any(|c| c.as_os_str() == "engine");
    if name == "shard.redb" {
        "shard files"
    } else if under_engine && name.ends_with(".hnsw") {
        "index files"
    } else if under_engine {
        "other engine files"
    } else {
        "metadata and the rest"
    }
}

/// Bytes (allocated on disk) of every file under `dir`, by [`kind`].
fn disk_usage(dir: &Path, out: &mut BTreeMap<&'static str, u64>) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        if meta.is_dir() {
            disk_usage(&entry.path(), out)?;
        } else {
            *out.entry(kind(&entry.path())).or_default() += meta.blocks() * 512;
        }
    }
    Ok(())
}

fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / (1024.0 * 1024.0))
}

/// One line of `--trace-ms`.
fn trace_line(at: Duration, pids: &[u32], details: &edgevec_client::CollectionDetails) -> String {
    let rss: Vec<String> = pids
        .iter()
        .map(|p| format!("{:.1}", rss(*p).unwrap_or(0) as f64 / 1048576.0))
        .collect();
    let segments: Vec<String> = details
        .info
        .segments
        .iter()
        .map(|s| {
            let state = match (s.state, s.index) {
                (SegmentState::Growing, _) => "G",
                (_, IndexState::Ready) => "R",
                _ => "B",
            };
            format!("{}:{}/{}:{state}", s.id, s.rows, s.rows - s.deleted)
        })
        .collect();
    let builds: Vec<String> = details
        .builds
        .iter()
        .map(|b| format!("{}:{}/{}", b.segment, b.rows_indexed, b.rows))
        .collect();
    format!(
        "trace {:.1} s; RSS MiB {}; segments {}; builds {}",
        at.as_secs_f64(),
        rss.join(" "),
        segments.join(" "),
        builds.join(" ")
    )
}

/// Waits until every sealed segment is indexed, no build or merge is under
/// way, and the segment list has not changed for 10 s (30 min at most).
async fn settle(client: &Client) -> Result<Duration> {
    let started = Instant::now();
    let mut last: Option<(Vec<(u64, u64)>, Instant)> = None;
    loop {
        let details = client.collection_details("bench").await?;
        let info = details.info;
        let indexed = details.builds.is_empty()
            && info
                .segments
                .iter()
                .all(|s| s.state != SegmentState::Sealed || s.index == IndexState::Ready);
        let shape: Vec<(u64, u64)> = info.segments.iter().map(|s| (s.id, s.rows)).collect();
        match &last {
            Some((prev, since)) if *prev == shape && indexed => {
                if since.elapsed() >= Duration::from_secs(10) {
                    return Ok(started.elapsed() - Duration::from_secs(10));
                }
            }
            _ => last = Some((shape, Instant::now())),
        }
        if started.elapsed() > Duration::from_secs(1800) {
            bail!("the collection did not settle within 30 min");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

pub async fn run(args: &Args, dir: &Path) -> Result<()> {
    let metric: Metric = args.metric.parse().map_err(anyhow::Error::msg)?;
    let (n, dim) = (args.n, args.dim);
    let raw = (n * dim * 4) as u64;
    let data = Arc::new(engine::clustered(n, dim, args.clusters, 1, metric));

    let mut cluster = Cluster::start(dir, 3, replication::TIMINGS)?;
    let client = connect_any(&cluster.addrs, &cluster.ca).await?;
    replication::wait_all_up(&client, 3).await?;
    let mut spec = CollectionSpec::new("bench", dim as u32, metric);
    if let Some(seal) = args.seal_rows {
        spec = spec.with_seal_rows(seal);
    }
    client
        .create_replicated(spec, ReplicationSpec::new(3))
        .await
        .context("creating the bench collection")?;

    // RSS and disk of every node, sampled until `stop`: each node's peak
    // RSS, when it was (since the first insert), and its peak disk.
    let pids: Vec<u32> = cluster.ids().filter_map(|id| cluster.pid(id)).collect();
    let dirs: Vec<PathBuf> = cluster.ids().map(|id| dir.join(format!("node{id}"))).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let sampler = {
        let (pids, stop) = (pids.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut peak = vec![(0u64, Duration::ZERO, 0u64); pids.len()];
            while !stop.load(Ordering::Relaxed) {
                for ((p, pid), dir) in peak.iter_mut().zip(&pids).zip(&dirs) {
                    let now = rss(*pid).unwrap_or(0);
                    if now > p.0 {
                        (p.0, p.1) = (now, started.elapsed());
                    }
                    let mut usage = BTreeMap::new();
                    // A file removed while listed fails the walk: skip it.
                    if disk_usage(dir, &mut usage).is_ok() {
                        p.2 = p.2.max(usage.values().sum());
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            peak
        })
    };

    let tracer = (args.trace_ms > 0).then(|| {
        let (client, pids, every) = (client.clone(), pids.clone(), Duration::from_millis(args.trace_ms));
        tokio::spawn(async move {
            loop {
                if let Ok(details) = client.collection_details("bench").await {
                    eprintln!("{}", trace_line(started.elapsed(), &pids, &details));
                }
                tokio::time::sleep(every).await;
            }
        })
    });
    let next = Arc::new(AtomicU64::new(0));
    let batches = n.div_ceil(args.batch) as u64;
    let rounds = 1 + args.rewrites as u64;
    let mut writers = Vec::new();
    for _ in 0..4 {
        let (client, data, next) = (client.clone(), data.clone(), next.clone());
        let batch = args.batch;
        writers.push(tokio::spawn(async move {
            loop {
                let b = next.fetch_add(1, Ordering::Relaxed);
                if b >= batches * rounds {
                    return Ok::<_, anyhow::Error>(());
                }
                let from = (b % batches) as usize * batch;
                let points = data[from..(from + batch).min(data.len())]
                    .iter()
                    .enumerate()
                    .map(|(i, v)| Point {
                        id: (from + i) as u64,
                        vector: v.clone(),
                        payload: None,
                    })
                    .collect();
                client.upsert("bench", points).await?;
            }
        }));
    }
    for w in writers {
        w.await??;
    }
    let insert_secs = started.elapsed().as_secs_f64();
    drop(data);
    eprintln!("inserted {n} rows {rounds} times in {insert_secs:.1} s");
    let settle_secs = settle(&client).await?.as_secs_f64();
    if let Some(tracer) = tracer {
        tracer.abort();
    }
    eprintln!("settled {settle_secs:.1} s later");
    stop.store(true, Ordering::Relaxed);
    let peaks = sampler
        .join()
        .map_err(|_| anyhow::anyhow!("the RSS sampler panicked"))?;
    let segments = client.describe_collection("bench").await?.segments;
    let primary = client
        .shards(Some("bench"))
        .await?
        .first()
        .and_then(|c| c.shards.first())
        .and_then(|s| s.primary);
    client.close().await;

    println!(
        "### {n} × {dim} {metric}, 3 replicas on 3 nodes, seal_rows {}, every point written {rounds} times\n",
        args.seal_rows.map_or_else(|| "default".to_string(), |s| s.to_string())
    );
    println!(
        "Raw vectors per node: {} MiB. Inserted in {insert_secs:.1} s; settled {settle_secs:.1} s later \
         (segments of {} rows on the node describe asked); the primary is on node {}.\n",
        mib(raw),
        segments
            .iter()
            .map(|s| s.rows.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        primary.map_or_else(|| "none".to_string(), |p| p.to_string())
    );
    let mut kinds = BTreeMap::new();
    for id in cluster.ids() {
        let mut usage = BTreeMap::new();
        disk_usage(&dir.join(format!("node{id}")), &mut usage)?;
        kinds.insert(id, usage);
    }
    let names: Vec<&str> = {
        let mut all: Vec<&str> = kinds.values().flat_map(|u| u.keys().copied()).collect();
        all.sort();
        all.dedup();
        all
    };
    print!("| node | RSS settled MiB | × raw | RSS peak MiB | × raw | disk MiB | × raw |");
    for name in &names {
        print!(" {name} MiB |");
    }
    println!();
    println!("|---|{}", "---:|".repeat(6 + names.len()));
    for (i, id) in cluster.ids().enumerate() {
        let now = cluster.pid(id).and_then(rss).unwrap_or(0);
        let peak = peaks[i].0.max(now);
        let usage = &kinds[&id];
        let disk: u64 = usage.values().sum();
        print!(
            "| {id} | {} | {:.2} | {} | {:.2} | {} | {:.2} |",
            mib(now),
            now as f64 / raw as f64,
            mib(peak),
            peak as f64 / raw as f64,
            mib(disk),
            disk as f64 / raw as f64
        );
        for name in &names {
            print!(" {} |", mib(usage.get(name).copied().unwrap_or(0)));
        }
        println!();
    }
    println!();
    for (id, (_, at, disk)) in cluster.ids().zip(&peaks) {
        println!(
            "node {id} peaked {:.1} s after the first insert (the inserts took {insert_secs:.1} s, the rest {settle_secs:.1} s); its data directory took at most {} MiB ({:.2}× raw).",
            at.as_secs_f64(),
            mib(*disk),
            *disk as f64 / raw as f64
        );
    }
    println!();
    for id in cluster.ids() {
        if let Some([anon, file, shmem]) = cluster.pid(id).and_then(rss_parts) {
            println!(
                "node {id}'s settled RSS: {} MiB anonymous ({:.2}× raw), {} MiB of files (the binary's pages among them, shared by the nodes of this host), {} MiB shared memory",
                mib(anon),
                anon as f64 / raw as f64,
                mib(file),
                mib(shmem)
            );
        }
    }
    for id in cluster.ids() {
        if let Some(pid) = cluster.pid(id) {
            println!(
                "node {id}'s anonymous memory: {}",
                anon_mappings(pid).unwrap_or_else(|e| format!("unreadable ({e})"))
            );
        }
    }
    for id in cluster.ids().collect::<Vec<_>>() {
        cluster.stop(id)?;
    }
    Ok(())
}

/// Process `pid`'s resident anonymous memory by mapping
/// (`/proc/PID/smaps`): the malloc heap, the mappings of 1 MiB or more
/// (large allocations and index tapes), and the rest.
fn anon_mappings(pid: u32) -> Result<String> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    let (mut heap, mut large, mut rest) = (0u64, Vec::new(), 0u64);
    let mut name = String::new();
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            name = words.nth(4).unwrap_or("").to_string();
        } else if first == "Anonymous:" {
            let kib: u64 = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
            if name == "[heap]" {
                heap += kib;
            } else if kib >= 1024 {
                large.push(kib);
            } else {
                rest += kib;
            }
        }
    }
    large.sort_unstable_by(|a, b| b.cmp(a));
    let sizes: Vec<String> = large.iter().map(|k| mib(k * 1024)).collect();
    Ok(format!(
        "[heap] {} MiB; {} mappings of 1 MiB or more, {} MiB ({}); {} MiB in smaller ones",
        mib(heap * 1024),
        large.len(),
        mib(large.iter().sum::<u64>() * 1024),
        sizes.join(", "),
        mib(rest * 1024)
    ))
}
