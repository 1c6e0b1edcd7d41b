//! `--mode replication`: what shard replication costs and how fast it
//! repairs itself, on 3 node processes sharing this machine.
//!
//! Two collections of one shard each: `r1` (1 replica) and `r3` (3
//! replicas on the 3 nodes). Writes go to a client of the shard's primary
//! node, so both collections pay the same hops but for the backups. Ids
//! only grow (every write inserts new points); vectors come from a fixed
//! random pool, as their values do not change what a write costs.

use std::collections::BTreeMap;

use super::usage::{load_average, machine_line, Usage};
use super::*;

/// Failure-detector and metadata Raft timings written into the
/// cluster file (printed with the results).
pub(super) const TIMINGS: &str = "heartbeat_ms = 100\nsuspect_ms = 500\ndead_after_ms = 60000\nraft_heartbeat_ms = 60\nelection_timeout_ms = [250, 500]\n";
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
pub(super) async fn wait_all_up(client: &Client, n: usize) -> Result<u64> {
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
    let mut env = Vec::new();
    if args.backup_delay_ms > 0 {
        env.push((
            "EDGEVEC_FAULT_REPLICATE_DELAY_MS".to_string(),
            args.backup_delay_ms.to_string(),
        ));
    }
    if let Some(mbit) = args.export_mbit {
        env.push(("EDGEVEC_FAULT_EXPORT_MBIT".to_string(), mbit.to_string()));
    }
    if args.whole_exports {
        env.push(("EDGEVEC_FAULT_NO_SEGMENT_DIGESTS".to_string(), "1".to_string()));
    }
    let settings = match args.oplog_hold_kb {
        Some(kb) => format!("{TIMINGS}oplog_hold_kb = {kb}\n"),
        None => TIMINGS.to_string(),
    };
    let mut cluster = Cluster::start_with_env(dir, 3, &settings, env)?;
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
    let result = bench.measure(started, &load_before, &settings).await;
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
    async fn measure(&mut self, started: Instant, load_before: &str, settings: &str) -> Result<()> {
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
        let paced = if args.paced_ms > 0 {
            Some(self.paced_latency(p1, p3).await?)
        } else {
            None
        };
        let load = self.full_load(p1, p3).await?;
        let mut catch_ups = Vec::new();
        for &batch in &args.catch_up_batch {
            catch_ups.push(self.catch_up(batch).await?);
        }
        let mut trials = Vec::new();
        for trial in 0..args.trials {
            let t = self.failover().await?;
            eprintln!(
                "failover trial {trial}: killed node {}{} at {} UTC; first ack of a write sent after the kill (ms): {}; {} writes failed{}; all in-sync again {:.1} s after the restart",
                t.killed,
                if t.was_leader { " (also the metadata leader)" } else { "" },
                t.killed_at,
                t.took_ms(),
                t.errors,
                t.why.iter().map(|(e, n)| format!(" ({n}: {e})")).collect::<String>(),
                t.rejoin.as_secs_f64()
            );
            trials.push(t);
        }

        let report = Report {
            args,
            settings,
            seal_rows,
            leader,
            p1,
            p3,
            load_before,
            latency,
            paced,
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

    /// Writes of `--paced-points` sent every `--paced-ms` whatever became
    /// of the ones before (open loop), `--paced-writes` per collection,
    /// first to `r1`, then to `r3`: what a write that arrives while
    /// others are being replicated waits.
    async fn paced_latency(&self, p1: u64, p3: u64) -> Result<[Vec<Duration>; 2]> {
        let args = self.args;
        let mut out = [Vec::new(), Vec::new()];
        for (w, (target, primary)) in [(&self.r1, p1), (&self.r3, p3)].into_iter().enumerate() {
            let client = connect(self.cluster.addr(primary), &self.cluster.ca).await?;
            let mut tick = tokio::time::interval(Duration::from_millis(args.paced_ms));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut writes = Vec::new();
            for _ in 0..args.paced_writes.max(1) {
                tick.tick().await;
                let (client, target, pool) = (client.clone(), target.clone(), self.pool.clone());
                let n = args.paced_points.max(1);
                writes.push(tokio::spawn(async move {
                    let batch = points(&target, &pool, n);
                    let t = Instant::now();
                    client.upsert(target.name, batch).await.map(|_| t.elapsed())
                }));
            }
            for write in writes {
                let took = write
                    .await?
                    .with_context(|| format!("a paced write into {}", target.name))?;
                out[w].push(took);
            }
            out[w].sort();
            client.close().await;
        }
        eprintln!(
            "paced writes: p50 {:.1} ms ({R1}) vs {:.1} ms ({R3})",
            ms(quantile(&out[0], 0.5)),
            ms(quantile(&out[1], 0.5))
        );
        Ok(out)
    }

    /// `--concurrency` writers, each with its own client of the
    /// primary, `--load-batches` per collection in blocks of four rounds
    /// (r1, r3, r3, r1) so drift hits both alike.
    async fn full_load(&self, p1: u64, p3: u64) -> Result<[Load; 2]> {
        let args = self.args;
        let writers = args.concurrency.max(1);
        let blocks = args.load_blocks.max(1);
        let per_writer = (args.load_batches / writers / 2 / blocks).max(1);
        let mut out = [Load::default(), Load::default()];
        let order = [0, 1, 1, 0].repeat(blocks);
        for w in order {
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
            out[w].rounds.push(wall);
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
        let log_mark = std::fs::metadata(self.cluster.log_path(primary)).map_or(0, |m| m.len());
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
            export: self.export_sent(primary, log_mark)?,
        })
    }

    /// The size in MB and the reused rows of the last export `primary`
    /// logged as imported after byte `from` of its log.
    fn export_sent(&self, primary: u64, from: u64) -> Result<Option<(f64, u64)>> {
        let path = self.cluster.log_path(primary);
        let log = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let field = |line: &str, name: &str| -> Option<String> {
            Some(
                line.split(&format!(" {name}="))
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .to_string(),
            )
        };
        Ok(String::from_utf8_lossy(log.get(from as usize..).unwrap_or_default())
            .lines()
            .filter(|l| l.contains("export imported"))
            .filter_map(|l| {
                let reused = field(l, "reused_rows").and_then(|r| r.parse().ok()).unwrap_or(0);
                Some((field(l, "mb")?.parse().ok()?, reused))
            })
            .next_back())
    }

    /// Pauses the metadata leader's node until another node is elected,
    /// then lets it go on.
    async fn move_leadership(&self, leader: Option<u64>) -> Result<()> {
        let Some(old) = leader else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            return Ok(());
        };
        let other = self.cluster.ids().find(|id| *id != old).context("one node")?;
        let watcher = client_from(&self.cluster, other, Duration::from_secs(1)).await?;
        self.cluster.pause(old, true)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let moved = loop {
            match watcher.cluster_status().await {
                Ok(st) if st.leader.is_some_and(|l| l != old) => break true,
                _ if Instant::now() > deadline => break false,
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        self.cluster.pause(old, false)?;
        watcher.close().await;
        if !moved {
            bail!("no new metadata leader within 10 s of pausing node {old}");
        }
        Ok(())
    }

    /// One failover trial on `r3`: the [`PROBES`] writers (all three
    /// clients know every node), kill -9 of the primary, the first ack
    /// of a write each sent after the kill; then the restart and the
    /// wait for 3 in-sync replicas.
    async fn failover(&mut self) -> Result<Trial> {
        let s = wait_shard(&self.admin, R3, SETTLE, "3 in-sync replicas", |s| converged(s, 3)).await?;
        let mut primary = s.primary.context("no primary")?;
        let mut leader = self.admin.cluster_status().await?.leader;
        let mut moves = 0;
        while self.args.leader_on_primary && leader != Some(primary) {
            moves += 1;
            if moves > 50 {
                bail!("the metadata leadership did not land on the primary's node in 50 elections");
            }
            self.move_leadership(leader).await?;
            let s = wait_shard(&self.admin, R3, SETTLE, "3 in-sync replicas", |s| converged(s, 3)).await?;
            primary = s.primary.context("no primary")?;
            leader = self.admin.cluster_status().await?.leader;
        }
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
        let killed_at = clock_utc();
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
        let mut why = BTreeMap::new();
        for w in writers {
            for e in w.join().await {
                errors += 1;
                *why.entry(e).or_insert(0) += 1;
            }
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
            killed_at,
            took: took.map(Option::unwrap_or_default),
            errors,
            why,
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
    error: Option<String>,
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
        let result = self.client.upsert(self.target.name, points).await;
        let acked = result.is_ok().then(Instant::now);
        let error = result.err().map(|e| e.to_string());
        self.log.lock().expect("writer log").push(Sent { at, acked, error });
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
    /// write; returns the error of each write that failed.
    async fn join(self) -> Vec<String> {
        let abort = self.task.abort_handle();
        if tokio::time::timeout(Duration::from_secs(15), self.task).await.is_err() {
            abort.abort();
        }
        let log = self.log.lock().expect("writer log");
        log.iter()
            .filter(|s| s.acked.is_none())
            // One kind of error whichever ids it names.
            .map(|s| match &s.error {
                Some(e) => e.split("; ids not written").next().unwrap_or(e).to_string(),
                None => "no answer".into(),
            })
            .collect()
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
    /// Each round's wall time (rounds are of equal rows).
    rounds: Vec<Duration>,
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
    /// When the backup was sent an export: its size in MB and the rows
    /// it left out (the backup's own sealed segments).
    export: Option<(f64, u64)>,
}

struct Trial {
    killed: u64,
    was_leader: bool,
    /// When, on the UTC clock of the node logs.
    killed_at: String,
    /// Per [`PROBES`] writer: from the kill to the first ack of a
    /// write sent after it.
    took: [Duration; PROBES.len()],
    /// Writes of the writers that returned an error.
    errors: usize,
    /// How many writes failed with each error.
    why: BTreeMap<String, usize>,
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
    /// The cluster section's settings.
    settings: &'a str,
    seal_rows: u32,
    leader: u64,
    p1: u64,
    p3: u64,
    load_before: &'a str,
    latency: [Vec<Duration>; 2],
    paced: Option<[Vec<Duration>; 2]>,
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
             Collections `{R1}` (replicas 1) and `{R3}` (replicas 3, min_insync 2): 1 shard, {}-d, L2, seal_rows {}{}, points without payload. \
             At the start the metadata leader was node {}, the primary of `{R1}` node {} and of `{R3}` node {}; \
             writes go through a client of the primary's node.\n",
            self.settings.trim_end().replace('\n', "`, `"),
            args.dim,
            self.seal_rows,
            if args.seal_rows.is_none() { " (no seal during the run)" } else { "" },
            self.leader,
            self.p1,
            self.p3
        );
        if let Some(mbit) = args.export_mbit {
            println!(
                "Every node takes each chunk of an export it receives as late as a link of {mbit} Mbit/s would deliver it (`EDGEVEC_FAULT_EXPORT_MBIT`).\n"
            );
        }
        if args.whole_exports {
            println!(
                "No node offers its sealed segments to an export (`EDGEVEC_FAULT_NO_SEGMENT_DIGESTS`): every export carries the whole shard.\n"
            );
        }
        if args.backup_delay_ms > 0 {
            println!(
                "Every backup takes each message of ops {} ms after it arrives (`EDGEVEC_FAULT_REPLICATE_DELAY_MS`), as across a slow link.\n",
                args.backup_delay_ms
            );
        }

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

        if let Some(paced) = &self.paced {
            println!(
                "#### Write latency at a steady rate: {} points every {} ms\n",
                args.paced_points.max(1),
                args.paced_ms
            );
            println!(
                "{} writes per collection, each sent on time whatever became of the ones before.\n",
                args.paced_writes.max(1)
            );
            println!("| collection | replicas | p50 ms | p90 ms | p99 ms |");
            println!("|---|---:|---:|---:|---:|");
            for (w, (name, replicas)) in [(R1, 1), (R3, 3)].into_iter().enumerate() {
                let lat = &paced[w];
                println!(
                    "| {name} | {replicas} | {:.2} | {:.2} | {:.2} |",
                    ms(quantile(lat, 0.5)),
                    ms(quantile(lat, 0.9)),
                    ms(quantile(lat, 0.99))
                );
            }
            println!();
        }

        let writers = args.concurrency.max(1);
        println!("#### Insert throughput, {writers} concurrent writers\n");
        println!(
            "Each writer has its own client and sends batches of {}, one in flight; {} block(s) of four rounds of equal rows, each in the order {R1}, {R3}, {R3}, {R1}.\n",
            args.batch,
            args.load_blocks.max(1)
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
        // Per block: r1's two rounds against r3's two (equal rows, so the
        // ratio of rates is the inverse ratio of wall times).
        let mut per_block: Vec<f64> = self.load[0]
            .rounds
            .chunks(2)
            .zip(self.load[1].rounds.chunks(2))
            .map(|(r1, r3)| r1.iter().sum::<Duration>().as_secs_f64() / r3.iter().sum::<Duration>().as_secs_f64())
            .collect();
        if per_block.len() > 1 {
            let shown: Vec<String> = per_block.iter().map(|r| format!("{r:.2}")).collect();
            per_block.sort_by(f64::total_cmp);
            let n = per_block.len();
            let median = if n % 2 == 1 {
                per_block[n / 2]
            } else {
                (per_block[n / 2 - 1] + per_block[n / 2]) / 2.0
            };
            println!("Per block, in order: {}; median **{median:.2}**.\n", shown.join(", "));
        }
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
            if let Some((mb, reused)) = c.export {
                println!("  - caught up through an export of {mb:.1} MB, which left out {reused} rows the backup held");
            }
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

/// The time of day, UTC, as the node logs print it (`HH:MM:SS.mmm`).
fn clock_utc() -> String {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let (secs, ms) = (since.as_secs() % 86_400, since.subsec_millis());
    format!("{:02}:{:02}:{:02}.{ms:03}", secs / 3600, secs / 60 % 60, secs % 60)
}
