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

/// `plugin list` shows the nine shipped plugins loaded on every node, and
/// the collections round-robin serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_list_shows_every_shipped_plugin_on_every_node() {
    let cluster = TestCluster::running(Layout::voters(3)).await;
    let admin = cluster.client(1, ADMIN).await;
    admin
        .create_replicated(CollectionSpec::new("listed", 4, Metric::L2), ReplicationSpec::new(3))
        .await
        .expect("create");
    for id in 1..=3 {
        wait_loaded(&cluster, id).await;
    }
    let (ok, out, err) = cluster.cli(&["plugin", "list", "--json"]);
    assert!(ok, "plugin list failed: {err}");
    let list: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    let list = list.as_array().expect("an array");
    let names: Vec<&str> = list.iter().map(|p| p["name"].as_str().unwrap()).collect();
    let mut want = SHIPPED.to_vec();
    want.sort_unstable();
    assert_eq!(names, want);
    for p in list {
        assert_eq!(p["version"], 1, "{p}");
        assert_eq!(p["origin"], "built-in", "{p}");
        assert_eq!(p["sha256"].as_str().unwrap().len(), 64, "{p}");
        let nodes = p["nodes"].as_array().unwrap();
        assert_eq!(nodes.len(), 3, "{p}");
        assert!(nodes.iter().all(|n| n["state"] == "loaded"), "{p}");
        let kind = p["kind"].as_str().unwrap();
        let lb = ["round-robin", "least-connections", "random", "p2c-ewma", "zone-aware"];
        let want_kind = if lb.contains(&p["name"].as_str().unwrap()) {
            "load-balancer"
        } else {
            "consistency"
        };
        assert_eq!(kind, want_kind, "{p}");
    }
    let rr = list.iter().find(|p| p["name"] == "round-robin").unwrap();
    assert_eq!(rr["collections"], serde_json::json!(["listed"]));
    let (ok, out, _) = cluster.cli(&["plugin", "list"]);
    assert!(ok && out.contains("round-robin") && out.contains("3/3 nodes"), "{out}");
}

/// `load --lb` switches a collection's load balancer while it serves:
/// with `zone-aware`, reads through node 2 (zone-2) stay on node 2's
/// replica. Wrong names are refused with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collection_switches_its_load_balancer() {
    let cluster = TestCluster::running(Layout::voters(3)).await;
    let admin = cluster.client(1, ADMIN).await;
    admin
        .create_replicated(
            CollectionSpec::new("zoned", 8, Metric::L2).with_shards(1),
            ReplicationSpec::new(3),
        )
        .await
        .expect("create");
    let writer = cluster.client(1, WRITER).await;
    upsert_random(&writer, "zoned", 100, 8, 3).await;
    for id in 1..=3 {
        wait_loaded(&cluster, id).await;
    }
    let (ok, out, err) = cluster.cli(&["load", "zoned", "--lb", "zone-aware"]);
    assert!(ok, "load --lb failed: {out} {err}");
    let (ok, _, err) = cluster.cli(&["load", "zoned", "--lb", "strong"]);
    assert!(!ok && err.contains("consistency policy"), "{err}");
    let (ok, _, err) = cluster.cli(&["load", "zoned", "--lb", "nope"]);
    assert!(!ok && err.contains("neither shipped nor deployed"), "{err}");

    let reader = cluster.client(2, READER).await;
    let count = |m: &str, node: u64| metric(m, "edgevec_replica_reads", &[&format!("node=\"{node}\"")]).unwrap_or(0.0);
    // Node 2 learns of the change when it applies the metadata: wait for
    // the first read that stays local, then count.
    let queries = random_vectors(1, 8, 4);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, before) = cluster.http_get(2, "/metrics");
        reader.search("zoned", &queries[0], 3).await.expect("search");
        let (_, after) = cluster.http_get(2, "/metrics");
        if count(&after, 2) > count(&before, 2) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "reads through node 2 never went to node 2:\n{after}"
        );
    }
    let (_, before) = cluster.http_get(2, "/metrics");
    for _ in 0..20 {
        reader.search("zoned", &queries[0], 3).await.expect("search");
    }
    let (_, after) = cluster.http_get(2, "/metrics");
    let served: Vec<f64> = (1..=3).map(|n| count(&after, n) - count(&before, n)).collect();
    assert_eq!(
        served,
        vec![0.0, 20.0, 0.0],
        "zone-aware keeps node 2's reads local:\n{after}"
    );
    let list = admin.list_plugins().await.expect("list");
    let za = list.iter().find(|p| p.name == "zone-aware").unwrap();
    assert_eq!(za.collections, vec!["zoned".to_string()]);
    let rr = list.iter().find(|p| p.name == "round-robin").unwrap();
    assert!(rr.collections.is_empty(), "{rr:?}");
}
