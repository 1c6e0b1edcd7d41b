//! Policy plugins in a running cluster: the shipped load balancer routes
//! every read (checked through each node's /metrics).

mod common;

use std::time::{Duration, Instant};

use common::*;
use edgevec_client::{CollectionSpec, Metric, ReplicationSpec};

const SHIPPED: [&str; 9] = [
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
async fn wait_loaded(cluster: &TestCluster, id: u64) -> String {
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

/// Every node loads the shipped plugins at start, and round-robin spreads
/// a shard's reads over its three replicas exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_spreads_reads_over_every_replica() {
    let cluster = TestCluster::running(Layout::voters(3)).await;
    let admin = cluster.client(1, ADMIN).await;
    let spec = CollectionSpec::new("spread", 8, Metric::L2).with_shards(1);
    admin
        .create_replicated(spec, ReplicationSpec::new(3))
        .await
        .expect("create");
    let writer = cluster.client(1, WRITER).await;
    upsert_random(&writer, "spread", 200, 8, 5).await;
    // The nine shipped plugins load in the background on every node.
    for id in 1..=3 {
        wait_loaded(&cluster, id).await;
    }
    let reader = cluster.client(2, READER).await;
    let (_, before) = cluster.http_get(2, "/metrics");
    let count = |m: &str, node: u64| metric(m, "edgevec_replica_reads", &[&format!("node=\"{node}\"")]).unwrap_or(0.0);
    let before: Vec<f64> = (1..=3).map(|n| count(&before, n)).collect();
    let queries = random_vectors(1, 8, 9);
    for _ in 0..30 {
        reader.search("spread", &queries[0], 5).await.expect("search");
    }
    let (_, after) = cluster.http_get(2, "/metrics");
    let served: Vec<f64> = (1..=3).map(|n| count(&after, n) - before[n as usize - 1]).collect();
    assert_eq!(
        served,
        vec![10.0, 10.0, 10.0],
        "reads per replica through node 2:\n{after}"
    );
    assert_eq!(
        metric(&after, "edgevec_plugin_failures", &["plugin=\"round-robin\""]),
        Some(0.0)
    );
    assert!(
        !after.contains("edgevec_plugin_fallbacks{plugin=\"round-robin\",reason=\"failed\"}"),
        "{after}"
    );
}

/// A restarted node loads its plugins from its compiled-artifact cache; a
/// damaged artifact is noticed and compiled again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_loads_plugins_from_its_cache() {
    let mut cluster = TestCluster::running(Layout::voters(3)).await;
    let compiled = |m: &str, p: &str| metric(m, "edgevec_plugin_from_cache", &[&format!("plugin=\"{p}\"")]);
    let m = wait_loaded(&cluster, 1).await;
    for p in SHIPPED {
        assert_eq!(compiled(&m, p), Some(0.0), "{p} was compiled at first start:\n{m}");
    }
    cluster.stop(1);
    // Damage the cached artifact of one plugin (the first .cwasm found).
    let dir = cluster
        .dir
        .path()
        .join("data")
        .join("node1")
        .join("plugins")
        .join("compiled");
    let artifacts: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "cwasm"))
        .collect();
    assert_eq!(
        artifacts.len(),
        9,
        "one artifact per shipped plugin in {}",
        dir.display()
    );
    let mut bytes = std::fs::read(&artifacts[0]).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x5A;
    std::fs::write(&artifacts[0], bytes).unwrap();
    cluster.start(1);
    // Answering clients first (the admin listener is up by then).
    cluster.client(1, READER).await;
    let m = wait_loaded(&cluster, 1).await;
    let from_cache = SHIPPED.iter().filter(|p| compiled(&m, p) == Some(1.0)).count();
    assert_eq!(
        from_cache, 8,
        "eight from the cache, the damaged one compiled again:\n{m}"
    );
    let log = std::fs::read_to_string(cluster.log_path(1)).unwrap();
    assert!(
        log.contains("does not match its checksum"),
        "the damaged artifact is reported:\n{}",
        cluster.log_tail(1, 80)
    );
}
