//! Read routing when a node dies or hangs: 8 clients search continuously
//! at the default level on a 3-node cluster (replicas = 3) while one node
//! is killed (kill -9) or paused (SIGSTOP). No search may fail, and every
//! answer equals the brute-force one.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use edgevec_client::{CollectionSpec, Metric, Point, ReplicationSpec};

const DIM: usize = 8;
const ROWS: u64 = 300;
const K: usize = 10;

/// The tests of this file run beside each other (each takes this lock
/// shared), except the overload test, which measures what its own load
/// does to the latencies the router sees: it runs alone. Beside another
/// test's cluster on two cores, a healthy node's read could take past the
/// 300 ms attempt deadline and be ejected for it.
static TURNS: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

#[derive(Clone, Copy, Debug)]
enum Fault {
    Kill,
    Pause,
}

/// The ids of the `K` nearest rows to `q` by L2, ties by id.
fn brute_force(rows: &[(u64, Vec<f32>)], q: &[f32]) -> Vec<u64> {
    let mut scored: Vec<(f32, u64)> = rows.iter().map(|(id, v)| (l2(v, q), *id)).collect();
    scored.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    scored.into_iter().take(K).map(|(_, id)| id).collect()
}

/// Runs 8 searching clients (endpoints in `order`) for 2 s, applies
/// `fault` to node `victim`, searches on (at least 6 s and 200 answers);
/// asserts no failed and no wrong search, and that the victim served
/// reads before the fault.
async fn searches_survive(fault: Fault, victim_is: impl Fn(&TestCluster, u64) -> u64, name: &str) {
    let _turn = TURNS.read().await;
    let mut cluster = TestCluster::running(Layout::voters(3)).await;
    let rows: Vec<(u64, Vec<f32>)> = loaded(&cluster, name)
        .await
        .into_iter()
        .enumerate()
        .map(|(i, v)| (i as u64, v))
        .collect();
    let admin = cluster.client(1, ADMIN).await;
    let leader = admin.cluster_status().await.expect("status").leader.expect("a leader");
    let victim = victim_is(&cluster, leader);
    // Clients reach the victim first when it is the leader (it is then
    // the node they are connected to), else node 1.
    let first = if victim == leader { victim } else { 1 };
    let order: Vec<u64> = std::iter::once(first).chain((1..=3).filter(|n| *n != first)).collect();
    let queries = Arc::new(random_vectors(16, DIM, 77));
    let expected: Arc<Vec<Vec<u64>>> = Arc::new(queries.iter().map(|q| brute_force(&rows, q)).collect());

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    // When each answer came, and how long it took.
    let answered = Arc::new(std::sync::Mutex::new(Vec::<(Instant, Duration)>::new()));
    let mut searchers = Vec::new();
    for c in 0..8usize {
        let client = cluster.client_of(&order, READER).await;
        let (stop, ok, queries, expected) = (stop.clone(), ok.clone(), queries.clone(), expected.clone());
        let answered = answered.clone();
        let name = name.to_string();
        searchers.push(tokio::spawn(async move {
            let mut problems = Vec::new();
            let mut i = c;
            while !stop.load(Ordering::Relaxed) {
                let q = i % queries.len();
                i += 1;
                let started = Instant::now();
                match client
                    .search_batch(&name, vec![queries[q].clone()], K as u32, false)
                    .await
                {
                    Ok(mut hits) => {
                        let ids: Vec<u64> = hits.pop().unwrap_or_default().iter().map(|h| h.id).collect();
                        if ids != expected[q] {
                            problems.push(format!("query {q}: got {ids:?}, brute force {:?}", expected[q]));
                        } else {
                            ok.fetch_add(1, Ordering::Relaxed);
                            answered.lock().unwrap().push((Instant::now(), started.elapsed()));
                        }
                    }
                    Err(e) => problems.push(format!("search failed after {:?}: {e}", started.elapsed())),
                }
            }
            client.close().await;
            problems
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let served_before: f64 = (1..=3)
        .map(|n| {
            let (_, m) = cluster.http_get(n, "/metrics");
            metric_sum(&m, "edgevec_replica_reads", &[&format!("node=\"{victim}\"")])
        })
        .sum();
    let before = ok.load(Ordering::Relaxed);
    match fault {
        Fault::Kill => cluster.kill9(victim),
        Fault::Pause => cluster.pause(victim),
    }
    let faulted = Instant::now();
    // Search on for 6 s, and until 200 searches were answered after the
    // fault (30 s at most: failing over a killed leader and primary takes
    // a few seconds, during which reads wait rather than fail).
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let answered = ok.load(Ordering::Relaxed) - before;
        let waited = faulted.elapsed();
        if (waited >= Duration::from_secs(6) && answered >= 200) || waited >= Duration::from_secs(30) {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut problems = Vec::new();
    for s in searchers {
        problems.extend(s.await.expect("searcher"));
    }
    let after = ok.load(Ordering::Relaxed) - before;
    // Answers per half second from the fault on, and the slowest one.
    let answered = answered.lock().unwrap().clone();
    let mut per_half = [0u32; 21];
    let mut slowest = Duration::ZERO;
    for (at, took) in &answered {
        if *at >= faulted {
            per_half[((*at - faulted).as_millis() / 500).min(20) as usize] += 1;
            slowest = slowest.max(*took);
        }
    }
    println!("{fault:?} of node {victim}: answers per 500 ms after it {per_half:?}; slowest {slowest:?}");
    // When the clients' node lives, it rescued the reads in flight on the
    // silent one (asked the next replica before their attempts timed out).
    if first != victim {
        let (_, m) = cluster.http_get(first, "/metrics");
        let rescues = metric(&m, "edgevec_read_rescues", &[]).unwrap_or(0.0);
        assert!(
            rescues > 0.0,
            "node {first} rescued no read from the silent node {victim}"
        );
    }
    if let Fault::Pause = fault {
        cluster.resume(victim);
    }
    if !problems.is_empty() {
        let shown: Vec<&String> = problems.iter().take(10).collect();
        cluster.fail(format!(
            "{fault:?} of node {victim} ({:?} ago): {} failed or wrong searches, e.g. {shown:#?}",
            faulted.elapsed(),
            problems.len()
        ));
    }
    assert!(served_before > 0.0, "node {victim} served no read before the {fault:?}");
    assert!(
        after >= 200,
        "only {after} searches answered in the 30 s after the {fault:?}"
    );
}

/// kill -9 of a node that holds a replica of every shard (not the one the
/// clients are connected to).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replica_fails_no_search() {
    searches_survive(Fault::Kill, |_, leader| if leader == 3 { 2 } else { 3 }, "killed").await;
}

/// kill -9 of the metadata leader, which is also the node the clients are
/// connected to and holds a replica (often the primary) of every shard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_clients_node_and_metadata_leader_fails_no_search() {
    searches_survive(Fault::Kill, |_, leader| leader, "leader").await;
}

/// SIGSTOP of a replica's node: silent, its connections open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_replica_fails_no_search() {
    searches_survive(Fault::Pause, |_, leader| if leader == 3 { 2 } else { 3 }, "paused").await;
}

/// SIGSTOP of the node the clients are connected to (also the metadata
/// leader): the client library notices the silent endpoint and moves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pausing_the_clients_node_fails_no_search() {
    searches_survive(Fault::Pause, |_, leader| leader, "paused-leader").await;
}

/// Creates a 2-shard collection of `ROWS` random rows, replicas = 3.
async fn loaded(cluster: &TestCluster, name: &str) -> Vec<Vec<f32>> {
    let admin = cluster.client(1, ADMIN).await;
    admin
        .create_replicated(
            CollectionSpec::new(name, DIM as u32, Metric::L2).with_shards(2),
            ReplicationSpec::new(3),
        )
        .await
        .expect("create");
    let rows = random_vectors(ROWS as usize, DIM, 5);
    let points = rows
        .iter()
        .enumerate()
        .map(|(i, v)| Point {
            id: i as u64,
            vector: v.clone(),
            payload: None,
        })
        .collect();
    admin.upsert(name, points).await.expect("write");
    rows
}

/// Every node's ejections of other nodes, summed.
fn ejections(cluster: &TestCluster) -> f64 {
    cluster
        .ids()
        .into_iter()
        .map(|id| metric_sum(&cluster.http_get(id, "/metrics").1, "edgevec_read_ejections", &[]))
        .sum()
}

/// Overload is not failure: 24 clients search as fast as they can on two
/// shared cores (every node slows down), and node 3 answers every read
/// 100 ms late besides. No node is ejected, no search fails, and the slow
/// node keeps serving its share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_ejects_no_healthy_replica() {
    let _alone = TURNS.write().await;
    let mut cluster = TestCluster::with_layout(Layout::voters(3));
    cluster.set_env(3, "EDGEVEC_FAULT_READ_DELAY_MS", "100");
    cluster.start_all().await;
    let rows = loaded(&cluster, "busy").await;
    let admin = cluster.client(1, ADMIN).await;
    admin.set_load_balancer("busy", "round-robin").await.expect("lb");
    let stop = Arc::new(AtomicBool::new(false));
    let mut searchers = Vec::new();
    for c in 0..24u64 {
        let client = cluster.client_of(&[1 + c % 3], READER).await;
        let (stop, rows) = (stop.clone(), rows.clone());
        searchers.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0u64, Vec::new());
            let mut i = c as usize;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                match client.search("busy", &rows[i % rows.len()], K as u32).await {
                    Ok(_) => ok += 1,
                    Err(e) => failed.push(e.to_string()),
                }
            }
            (ok, failed)
        }));
    }
    tokio::time::sleep(Duration::from_secs(8)).await;
    stop.store(true, Ordering::Relaxed);
    let (mut ok, mut failed) = (0, Vec::new());
    for s in searchers {
        let (o, f) = s.await.expect("searcher");
        ok += o;
        failed.extend(f);
    }
    assert!(
        failed.is_empty(),
        "{} searches failed, e.g. {:?}",
        failed.len(),
        &failed[..1]
    );
    assert!(ok > 200, "only {ok} searches in 8 s");
    let served_by_3: f64 = cluster
        .ids()
        .into_iter()
        .map(|id| {
            metric_sum(
                &cluster.http_get(id, "/metrics").1,
                "edgevec_replica_reads",
                &["node=\"3\""],
            )
        })
        .sum();
    assert!(served_by_3 > 50.0, "the slow node served only {served_by_3} reads");
    let ejected = ejections(&cluster);
    if ejected > 0.0 {
        cluster.fail(format!("{ejected} ejections under overload ({ok} searches)"));
    }
}

/// Retry budgets cap amplification: every replica refuses every read at
/// once (alive, never caught up). 4 clients send 300 ms reads for 4 s;
/// without a budget each read would try every replica every 100 ms
/// (about 9 attempts). The routing node makes one attempt per read, plus
/// the budget's 20 % share, its refill (10/s) and its burst (50).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_budgets_cap_amplification() {
    let _turn = TURNS.read().await;
    let mut cluster = TestCluster::with_layout(Layout::voters(3));
    for id in 1..=3 {
        cluster.set_env(id, "EDGEVEC_FAULT_REFUSE_READS", "1");
    }
    cluster.start_all().await;
    let rows = loaded(&cluster, "refused").await;
    let applied = || {
        let (_, m) = cluster.http_get(1, "/metrics");
        metric(&m, "edgevec_raft_applied_index", &[]).expect("an applied index")
    };
    let applied_before = applied();
    let stop = Arc::new(AtomicBool::new(false));
    let mut readers = Vec::new();
    let started = Instant::now();
    for c in 0..4usize {
        let client = cluster.client_of(&[1], READER).await;
        let (stop, rows) = (stop.clone(), rows.clone());
        readers.push(tokio::spawn(async move {
            let opts = edgevec_client::ReadOpts {
                consistency: Some("eventually".into()),
                timeout: Some(Duration::from_millis(300)),
                ..Default::default()
            };
            let (mut reads, mut served) = (0u64, 0u64);
            let mut i = c;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                reads += 1;
                if client
                    .search_with("refused", vec![rows[i % rows.len()].clone()], K as u32, false, &opts)
                    .await
                    .is_ok()
                {
                    served += 1;
                }
            }
            (reads, served)
        }));
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, Ordering::Relaxed);
    let (mut reads, mut served) = (0u64, 0u64);
    for r in readers {
        let (n, s) = r.await.expect("reader");
        reads += n;
        served += s;
    }
    let elapsed = started.elapsed().as_secs_f64();
    assert_eq!(served, 0, "a replica that refuses every read served one");
    assert!(reads >= 20, "only {reads} reads");
    let (_, m) = cluster.http_get(1, "/metrics");
    let attempts = metric(&m, "edgevec_read_attempts", &[]).expect("an attempts metric");
    // Each client read is a read of each of the 2 shards.
    let shard_reads = 2.0 * reads as f64;
    // Plus the free first attempt of a plan made after a metadata change,
    // for each of the (at most 4 × 2) shard reads waiting at that moment.
    let changes = applied() - applied_before;
    let cap = shard_reads * 1.2 + 10.0 * elapsed + 50.0 + 8.0 * changes + 5.0;
    println!(
        "{reads} reads ({shard_reads} shard reads) in {elapsed:.1} s: {attempts} attempts, {:.2} per shard read \
         (cap {cap:.0} with {changes} metadata changes, unbudgeted about {}); retries {:?}, refused {:?}",
        attempts / shard_reads,
        shard_reads * 9.0,
        metric(&m, "edgevec_read_retries", &[]),
        metric(&m, "edgevec_read_retries_refused", &[]),
    );
    assert!(
        attempts <= cap,
        "{attempts} attempts for {shard_reads} shard reads: more than the budget allows ({cap:.0})"
    );
    assert!(
        attempts >= shard_reads,
        "{attempts} attempts for {shard_reads} shard reads"
    );
    assert!(
        metric(&m, "edgevec_read_retries_refused", &[]).is_some_and(|n| n > 0.0),
        "the budget never refused"
    );
}

/// Panic mode: a proxy that holds no replica is cut off from both
/// replicas of a shard until it has ejected both; once the link is back,
/// reads answer at once although both are still ejected (ejected replicas
/// are tried last, never excluded).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_answer_when_every_replica_is_ejected() {
    let _turn = TURNS.read().await;
    let cluster = TestCluster::running(Layout {
        voters: 3,
        learners: 0,
        cluster_extra: "fault_injection = true\n".into(),
    })
    .await;
    let admin = cluster.client(1, ADMIN).await;
    admin
        .create_replicated(
            CollectionSpec::new("panic", DIM as u32, Metric::L2).with_shards(1),
            ReplicationSpec::new(2),
        )
        .await
        .expect("create");
    let rows = random_vectors(20, DIM, 3);
    let points = (0..20u64)
        .map(|id| Point {
            id,
            vector: rows[id as usize].clone(),
            payload: None,
        })
        .collect();
    admin.upsert("panic", points).await.expect("write");
    let shards = admin.shards(Some("panic")).await.expect("shards");
    let holders: Vec<u64> = shards[0].shards[0].replicas.iter().map(|r| r.node).collect();
    let proxy = (1..=3)
        .find(|n| !holders.contains(n))
        .expect("a node without a replica");
    let client = cluster.client_of(&[proxy], READER).await;
    let opts = |ms| edgevec_client::ReadOpts {
        consistency: Some("eventually".into()),
        timeout: Some(Duration::from_millis(ms)),
        ..Default::default()
    };
    for _ in 0..10 {
        client.get_with("panic", &[1], &opts(5_000)).await.expect("read");
    }
    cluster.cut(proxy, &holders);
    let ejected = |node: u64| {
        let (_, m) = cluster.http_get(proxy, "/metrics");
        metric(&m, "edgevec_read_ejections", &[&format!("node=\"{node}\"")]).unwrap_or(0.0)
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while holders.iter().any(|n| ejected(*n) < 2.0) {
        assert!(
            Instant::now() < deadline,
            "the cut-off replicas were not ejected twice each"
        );
        let _ = client.get_with("panic", &[1], &opts(1_500)).await;
    }
    cluster.cut(proxy, &[]);
    // Both are ejected for seconds (doubling from 1 s after each failure
    // in a row); the read goes to them anyway.
    let got = client
        .get_with("panic", &[1, 2], &opts(5_000))
        .await
        .expect("a read with every replica ejected");
    assert_eq!(got.len(), 2);
    let (_, m) = cluster.http_get(proxy, "/metrics");
    assert!(
        metric(&m, "edgevec_read_attempts", &[]).is_some_and(|n| n > 10.0),
        "no attempts counted:\n{m}"
    );
}
