//! Load balancers in a running cluster, told apart by a slow node (the
//! read-delay fault hook on node 3), and hot swaps of the policies that
//! decide reads while searches run.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use edgevec_client::{ClientConfig, CollectionSpec, Metric, ReplicationSpec};

/// Reads node `via` routed to each node, by node (1..=3).
fn routed(cluster: &TestCluster, via: u64) -> [f64; 3] {
    let (_, m) = cluster.http_get(via, "/metrics");
    [1, 2, 3].map(|n| metric_sum(&m, "edgevec_replica_reads", &[&format!("node=\"{n}\"")]))
}

/// Times node `via`'s router has so far sent a read where its policy's
/// first choice was not: hedges, rescues from a stalled node, ejections.
/// Under load a shared machine can stall any node past the router's stall
/// limit, and the reads that follow go where the policy would not send
/// them.
fn detours(cluster: &TestCluster, via: u64) -> f64 {
    let (_, m) = cluster.http_get(via, "/metrics");
    ["edgevec_read_hedges", "edgevec_read_rescues", "edgevec_read_ejections"]
        .iter()
        .map(|name| metric(&m, name, &[]).unwrap_or_else(|| panic!("no {name} in node {via}'s metrics")))
        .sum()
}

/// [`spread`] repeated until node 1's router takes no detour in a round,
/// `tries` rounds at most: the reads per node of that round, or of every
/// round with the detours it took (the machine may stall a node now and
/// then).
async fn spread_without_detours(
    cluster: &TestCluster,
    config: &ClientConfig,
    clients: usize,
    each: usize,
    tries: usize,
) -> Result<[f64; 3], Vec<([f64; 3], f64)>> {
    let mut detoured_rounds = Vec::new();
    while detoured_rounds.len() < tries {
        let before = detours(cluster, 1);
        let s = spread(cluster, config, clients, each).await;
        let detoured = detours(cluster, 1) - before;
        if detoured == 0.0 {
            return Ok(s);
        }
        detoured_rounds.push((s, detoured));
    }
    Err(detoured_rounds)
}

/// `clients` × `each` searches through node 1, concurrently; returns the
/// reads node 1 routed to each node meanwhile.
async fn spread(cluster: &TestCluster, config: &ClientConfig, clients: usize, each: usize) -> [f64; 3] {
    let before = routed(cluster, 1);
    let q = random_vectors(1, 8, 9).remove(0);
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let client = edgevec_client::Client::connect(config.clone()).await.expect("connect");
        let q = q.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..each {
                client.search("lb", &q, 5).await.expect("search");
            }
            client.close().await;
        }));
    }
    for t in tasks {
        t.await.expect("searcher");
    }
    let after = routed(cluster, 1);
    [0, 1, 2].map(|i| after[i] - before[i])
}

/// With node 3 answering reads 40 ms late: round-robin still gives each
/// replica exactly a third; random gives the slow one its share too;
/// least-connections and p2c-ewma send it clearly less; zone-aware keeps
/// a zone-2 client on node 2 and spills to the others when node 2 is
/// paused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_load_balancer_spreads_reads_as_its_name_says() {
    let mut cluster = TestCluster::with_layout(Layout::voters(3));
    cluster.set_env(3, "EDGEVEC_FAULT_READ_DELAY_MS", "40");
    cluster.start_all().await;
    let admin = cluster.client(1, ADMIN).await;
    admin
        .create_replicated(
            CollectionSpec::new("lb", 8, Metric::L2).with_shards(1),
            ReplicationSpec::new(3),
        )
        .await
        .expect("create");
    upsert_random(&cluster.client(1, WRITER).await, "lb", 200, 8, 3).await;
    for id in 1..=3 {
        wait_plugins_loaded(&cluster, id).await;
    }
    let mut config = ClientConfig::new(vec![cluster.addr(1)], cluster.ca_pem(), READER);
    config.consistency = Some("eventually".into());
    let share = |s: [f64; 3]| {
        let total: f64 = s.iter().sum();
        s.map(|x| x / total)
    };
    for lb in ["round-robin", "random", "least-connections", "p2c-ewma"] {
        admin.set_load_balancer("lb", lb).await.expect("set lb");
        // Node 1 applies the change with the metadata: a short pause, then
        // a few reads that warm the latency estimates.
        tokio::time::sleep(Duration::from_millis(300)).await;
        spread(&cluster, &config, 2, 10).await;
        // Round robin is exact in a round the router took no detour in.
        let tries = if lb == "round-robin" { 5 } else { 1 };
        let s = match spread_without_detours(&cluster, &config, 8, 30, tries).await {
            Ok(s) => s,
            Err(rounds) => rounds.last().expect("at least one round").0,
        };
        let f = share(s);
        println!("{lb}: reads per node {s:?}, shares {f:.2?}");
        match lb {
            "round-robin" => assert_eq!(s, [80.0, 80.0, 80.0], "round-robin is exact"),
            "random" => assert!(f.iter().all(|x| *x > 0.15), "random avoided a node: {f:?}"),
            "least-connections" => assert!(f[2] < 0.25, "least-connections kept sending to the slow node: {f:?}"),
            "p2c-ewma" => assert!(f[2] < 0.2, "p2c-ewma kept sending to the slow node: {f:?}"),
            _ => unreachable!(),
        }
    }

    admin.set_load_balancer("lb", "zone-aware").await.expect("set lb");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut zoned = config.clone();
    zoned.zone = Some("zone-2".into());
    // Every read on node 2, in a round the router took no detour in. A
    // read also spills, by design, while node 1's router holds node 2 as
    // stalled (another read to it unanswered past the stall limit, on a
    // loaded machine), which no detour counter counts: up to 5 rounds.
    let mut rounds = Vec::new();
    while rounds.len() < 5 {
        match spread_without_detours(&cluster, &zoned, 4, 20, 1).await {
            Ok([0.0, 80.0, 0.0]) => break,
            other => rounds.push(other),
        }
    }
    assert!(
        rounds.len() < 5,
        "zone-aware did not keep a zone-2 client on node 2 in any round (reads per node, or the rounds with detours): {rounds:?}"
    );
    // Node 2 silent: the zone's only replica is ejected and reads spill.
    cluster.pause(2);
    let s = spread(&cluster, &zoned, 4, 20).await;
    cluster.resume(2);
    assert_eq!(
        s[0] + s[2],
        80.0,
        "with node 2 paused every read spilled to nodes 1 and 3: {s:?}"
    );
}

/// A running 3-node cluster with collection `lb` (8-d, `shards` shards,
/// 3 replicas, 200 points); returns it with an admin client.
async fn cluster_with_lb(shards: u32) -> (TestCluster, edgevec_client::Client) {
    let cluster = TestCluster::running(Layout::voters(3)).await;
    let admin = cluster.client(1, ADMIN).await;
    admin
        .create_replicated(
            CollectionSpec::new("lb", 8, Metric::L2).with_shards(shards),
            ReplicationSpec::new(3),
        )
        .await
        .expect("create");
    upsert_random(&cluster.client(1, WRITER).await, "lb", 200, 8, 3).await;
    (cluster, admin)
}

/// New versions of the collection's load balancer and of the default
/// level's consistency plugin, deployed while 8 clients search through
/// every node: no search fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_swaps_of_the_read_policies_fail_no_search() {
    let (cluster, admin) = cluster_with_lb(2).await;
    for id in 1..=3 {
        wait_plugins_loaded(&cluster, id).await;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let mut searchers = Vec::new();
    for c in 0..8u64 {
        let client = cluster.client(1 + c % 3, READER).await;
        let (stop, ok) = (stop.clone(), ok.clone());
        searchers.push(tokio::spawn(async move {
            let q = random_vectors(1, 8, c).remove(0);
            let mut failed = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match client.search("lb", &q, 5).await {
                    Ok(_) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => failed.push(e.to_string()),
                }
            }
            failed
        }));
    }
    let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("node/builtin-plugins");
    for (name, param) in [("round-robin", "swap=1"), ("bounded", "bound_ms=4000")] {
        let file = shipped.join(format!("{name}.wasm")).display().to_string();
        let (done, out, err) = cluster.cli(&["plugin", "deploy", name, &file, "--param", param]);
        assert!(done, "{out} {err}");
        // Every node runs version 2 within 30 s.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let list = admin.list_plugins().await.expect("list");
            let p = list.iter().find(|p| p.name == name).expect("listed");
            if p.nodes.iter().all(|n| n.state == "loaded" && n.version == 2) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{name} version 2 not loaded everywhere: {p:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut failed = Vec::new();
    for s in searchers {
        failed.extend(s.await.expect("searcher"));
    }
    assert!(failed.is_empty(), "searches failed during the swaps: {failed:?}");
    assert!(ok.load(Ordering::Relaxed) > 100, "too few searches ran");
}

/// With hedging on (`load NAME --hedge on`), a read whose first replica
/// does not answer within its usual time also goes to the next one: with
/// one replica's node paused, searches keep answering and node 1 reports
/// hedged reads. Off by default: no hedge before it is turned on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hedged_reads_go_around_a_paused_replica() {
    let (cluster, _) = cluster_with_lb(1).await;
    let mut config = ClientConfig::new(vec![cluster.addr(1)], cluster.ca_pem(), READER);
    config.consistency = Some("eventually".into());
    let hedges = || {
        let (_, m) = cluster.http_get(1, "/metrics");
        metric(&m, "edgevec_read_hedges", &[]).unwrap_or(0.0)
    };
    spread(&cluster, &config, 4, 30).await;
    assert_eq!(hedges(), 0.0, "reads were hedged before hedging was turned on");
    let (ok, out, err) = cluster.cli(&["load", "lb", "--hedge", "on"]);
    assert!(ok, "{out} {err}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Latency samples of every node first.
    spread(&cluster, &config, 4, 30).await;
    let stop = Arc::new(AtomicBool::new(false));
    let mut searchers = Vec::new();
    for c in 0..4u64 {
        let client = edgevec_client::Client::connect(config.clone()).await.expect("connect");
        let stop = stop.clone();
        searchers.push(tokio::spawn(async move {
            let q = random_vectors(1, 8, c).remove(0);
            let mut failed = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                if let Err(e) = client.search("lb", &q, 5).await {
                    failed.push(e.to_string());
                }
            }
            failed
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.pause(3);
    tokio::time::sleep(Duration::from_secs(3)).await;
    cluster.resume(3);
    stop.store(true, Ordering::Relaxed);
    let mut failed = Vec::new();
    for s in searchers {
        failed.extend(s.await.expect("searcher"));
    }
    assert!(failed.is_empty(), "searches failed: {failed:?}");
    assert!(hedges() > 0.0, "no read was hedged while node 3 was paused");
}
