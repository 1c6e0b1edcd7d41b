//! Policy plugins in a running cluster: the shipped load balancer routes
//! every read (checked through each node's /metrics).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use edgevec_client::{CollectionSpec, Metric, ReplicationSpec};

/// A 3-node cluster with every shipped plugin loaded on every node, and a
/// one-shard collection `name` with 3 replicas and 100 points of 8-d;
/// returns the cluster and an admin client.
async fn cluster_with(name: &str) -> (TestCluster, edgevec_client::Client) {
    let cluster = TestCluster::running(Layout::voters(3)).await;
    let admin = cluster.client(1, ADMIN).await;
    admin
        .create_replicated(
            CollectionSpec::new(name, 8, Metric::L2).with_shards(1),
            ReplicationSpec::new(3),
        )
        .await
        .expect("create");
    let writer = cluster.client(1, WRITER).await;
    upsert_random(&writer, name, 100, 8, 3).await;
    for id in 1..=3 {
        wait_plugins_loaded(&cluster, id).await;
    }
    (cluster, admin)
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
        wait_plugins_loaded(&cluster, id).await;
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

    // `plugin native on`: the same rotation, decided by the native build
    // (the WebAssembly plugin is no longer called).
    let (ok, _, err) = cluster.cli(&["plugin", "native", "on"]);
    assert!(ok, "{err}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let calls = |m: &str| metric(m, "edgevec_plugin_calls", &["plugin=\"round-robin\""]).unwrap_or(0.0);
    let (_, before) = cluster.http_get(2, "/metrics");
    for _ in 0..30 {
        reader.search("spread", &queries[0], 5).await.expect("search");
    }
    let (_, native) = cluster.http_get(2, "/metrics");
    let served: Vec<f64> = (1..=3).map(|n| count(&native, n) - count(&before, n)).collect();
    assert_eq!(served, vec![10.0, 10.0, 10.0], "native rotation:\n{native}");
    assert_eq!(calls(&native), calls(&before), "no WebAssembly call while native");
    let (ok, _, err) = cluster.cli(&["plugin", "native", "off"]);
    assert!(ok, "{err}");
}

/// A restarted node loads its plugins from its compiled-artifact cache; a
/// damaged artifact is noticed and compiled again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_loads_plugins_from_its_cache() {
    let mut cluster = TestCluster::running(Layout::voters(3)).await;
    let compiled = |m: &str, p: &str| metric(m, "edgevec_plugin_from_cache", &[&format!("plugin=\"{p}\"")]);
    let m = wait_plugins_loaded(&cluster, 1).await;
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
    let m = wait_plugins_loaded(&cluster, 1).await;
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
        wait_plugins_loaded(&cluster, id).await;
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
    let (cluster, admin) = cluster_with("zoned").await;
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
    let (ok, out, err) = cluster.cli(&["collection", "describe", "zoned", "--json"]);
    assert!(ok, "{err}");
    let described: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(described["load_balancer"]["name"], "zone-aware", "{described}");
    let (ok, out, err) = cluster.cli(&["collection", "describe", "zoned"]);
    assert!(ok && out.contains("load balancer zone-aware"), "{out} {err}");
}

/// `plugin list --json` through the CLI, parsed.
fn plugin_list(cluster: &TestCluster) -> Vec<serde_json::Value> {
    let (ok, out, err) = cluster.cli(&["plugin", "list", "--json"]);
    assert!(ok, "plugin list failed: {err}");
    serde_json::from_str::<serde_json::Value>(&out)
        .expect("JSON")
        .as_array()
        .expect("an array")
        .clone()
}

/// Waits until every configured node runs `version` of `name` (0: until
/// no node lists it).
async fn wait_version(cluster: &TestCluster, name: &str, version: u64) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let list = plugin_list(cluster);
        let p = list.iter().find(|p| p["name"] == name);
        let done = match (p, version) {
            (None, 0) => true,
            (Some(p), v) if v > 0 => {
                // Every configured node, not only those that answered.
                let nodes = p["nodes"].as_array().unwrap();
                nodes.len() == cluster.ids().len() && nodes.iter().all(|n| n["state"] == "loaded" && n["version"] == v)
            }
            _ => false,
        };
        if done {
            return list;
        }
        if Instant::now() > deadline {
            cluster.fail(format!("{name} never reached version {version} on every node: {p:?}"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Resident memory of a process (VmRSS in /proc).
fn resident_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kb * 1024
}

/// CPU time of a process so far, in clock ticks (utime + stime).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) in ")".
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// A hand-written load balancer module: `configure` accepts anything,
/// `order` runs `body` (which must leave an i64); `extra` adds fields.
fn wat_balancer(body: &str, extra: &str) -> Vec<u8> {
    wat::parse_str(format!(
        r#"(module {extra}
  (memory (export "memory") 1)
  (func (export "cabi_realloc") (param i32 i32 i32 i32) (result i32) (i32.const 4096))
  (func (export "edgevec:policy/balancer@1.0.0#configure")
    (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)
    (i32.store8 (i32.const 0) (i32.const 0)) (i32.const 0))
  (func (export "edgevec:policy/balancer@1.0.0#order") (param i32 i32 i32 i32) (result i64) {body}))"#
    ))
    .unwrap()
}

/// A plugin deployed through the CLI reaches every node, serves the
/// collection that chooses it, cannot be removed while used, and goes
/// when removed. Hostile uploads are refused with the reason, and one
/// that fails at every call leaves searches answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployed_plugins_reach_every_node_and_hostile_ones_are_contained() {
    let (cluster, _) = cluster_with("deployed").await;
    let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("node/builtin-plugins");
    let file = |n: &str| shipped.join(format!("{n}.wasm")).display().to_string();
    let zone_aware = file("zone-aware");
    let deploy_mine = [
        "plugin",
        "deploy",
        "my-lb",
        zone_aware.as_str(),
        "--param",
        "spill_in_flight=5",
    ];
    let (ok, out, err) = cluster.cli(&deploy_mine);
    assert!(ok && out.contains("version 1"), "{out} {err}");
    let list = wait_version(&cluster, "my-lb", 1).await;
    let mine = list.iter().find(|p| p["name"] == "my-lb").unwrap();
    assert_eq!(mine["kind"], "load-balancer");
    assert_eq!(mine["origin"], "deployed");
    // Deploying the same bytes and params again is no new version.
    let (ok, out, _) = cluster.cli(&deploy_mine);
    assert!(ok && out.contains("version 1"), "{out}");

    let (ok, _, err) = cluster.cli(&["load", "deployed", "--lb", "my-lb"]);
    assert!(ok, "{err}");
    let (ok, _, err) = cluster.cli(&["plugin", "remove", "my-lb"]);
    assert!(!ok && err.contains("load balancer of deployed"), "{err}");
    let reader = cluster.client(3, READER).await;
    let q = random_vectors(1, 8, 2);
    for _ in 0..10 {
        reader.search("deployed", &q[0], 3).await.expect("search through my-lb");
    }

    // Hostile uploads: refused before anything is stored or proposed.
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, bytes: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p.display().to_string()
    };
    let noise: Vec<u8> = random_vectors(1, 4096, 1)[0]
        .iter()
        .map(|f| f.to_bits() as u8)
        .collect();
    let cases = [
        ("noise", write("noise.wasm", &noise), "not WebAssembly"),
        (
            "wasi",
            write(
                "wasi.wasm",
                &wat_balancer(
                    "(i64.const 0)",
                    r#"(import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))"#,
                ),
            ),
            "WASI",
        ),
        (
            "other-world",
            write(
                "world.wasm",
                &wat::parse_str(r#"(module (func (export "run")))"#).unwrap(),
            ),
            "does not implement the contract",
        ),
        (
            "many-functions",
            write(
                "many.wasm",
                &wat_balancer(
                    "(i64.const 0)",
                    &(0..10_001).map(|i| format!("(func $f{i})")).collect::<String>(),
                ),
            ),
            "functions",
        ),
        ("huge", write("huge.wasm", &vec![0u8; 10 * 1024 * 1024]), "at most"),
        // Under 4 MiB and valid, but compiling it takes more than 1 GiB
        // (measured: 1.1 GiB resident when compiled without a limit).
        (
            "compile-bomb",
            write(
                "bomb.wasm",
                &wat_balancer(
                    &format!(
                        "{}{}(i64.const 0)",
                        "block\n".repeat(1_300_000),
                        "end\n".repeat(1_300_000)
                    ),
                    "",
                ),
            ),
            "memory limit",
        ),
    ];
    for (name, path, why) in &cases {
        let (ok, out, err) = cluster.cli(&["plugin", "deploy", name, path]);
        assert!(
            !ok && err.contains(why),
            "{name}: expected a refusal naming {why:?}, got {out} {err}"
        );
    }
    let list = plugin_list(&cluster);
    for (name, _, _) in &cases {
        assert!(
            list.iter().all(|p| p["name"] != *name),
            "{name} is listed after a refusal"
        );
    }
    // The compile ran in a child with its own limit: the node that was
    // asked stayed small.
    for id in cluster.ids() {
        let rss = resident_bytes(cluster.pid(id).expect("running"));
        assert!(
            rss < 512 << 20,
            "node {id} is {rss} bytes resident after the hostile deploys"
        );
    }
    // An endless loop loads (its configure is fine) but runs out of fuel
    // at every call: reads use the given order and keep answering.
    let looping = write("loop.wasm", &wat_balancer("(loop $l (br $l)) (i64.const 0)", ""));
    let (ok, _, err) = cluster.cli(&["plugin", "deploy", "spinner", &looping]);
    assert!(ok, "{err}");
    wait_version(&cluster, "spinner", 1).await;
    let (ok, _, err) = cluster.cli(&["load", "deployed", "--lb", "spinner"]);
    assert!(ok, "{err}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    for _ in 0..30 {
        reader
            .search("deployed", &q[0], 3)
            .await
            .expect("search through a failing plugin");
    }
    let (_, m) = cluster.http_get(3, "/metrics");
    assert!(
        metric(&m, "edgevec_plugin_failures", &["plugin=\"spinner\""]).unwrap_or(0.0) >= 20.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "edgevec_plugin_disabled", &["plugin=\"spinner\""]),
        Some(1.0),
        "{m}"
    );
    let list = plugin_list(&cluster);
    let spinner = list.iter().find(|p| p["name"] == "spinner").unwrap();
    let n3 = spinner["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node"] == 3)
        .unwrap();
    assert_eq!(n3["state"], "disabled", "{spinner}");
    assert!(n3["reason"].as_str().unwrap().contains("fuel"), "{spinner}");
    let (ok, out, err) = cluster.cli(&["status"]);
    assert!(
        ok && out.contains("plugin spinner disabled on node 3: ") && out.contains("fuel"),
        "{out} {err}"
    );
    // Nothing keeps spinning once the calls are over: the node that ran
    // them uses well under half a core over the next two seconds.
    let pid = cluster.pid(3).expect("running");
    let before = cpu_ticks(pid);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = cpu_ticks(pid) - before;
    assert!(
        used < 100,
        "node 3 used {used} CPU ticks in 2 s after the looping plugin's calls"
    );

    // Back to the default, then both deployed plugins can go.
    let (ok, _, err) = cluster.cli(&["load", "deployed", "--lb", "round-robin"]);
    assert!(ok, "{err}");
    for name in ["my-lb", "spinner"] {
        let (ok, _, err) = cluster.cli(&["plugin", "remove", name]);
        assert!(ok, "{name}: {err}");
        wait_version(&cluster, name, 0).await;
    }
}

/// A new version of the active load balancer, deployed while searches run
/// through every node: no search fails, every node runs it within
/// seconds, and the replica choice follows it (zone-aware keeps a node's
/// reads local where round-robin spread them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_swap_of_the_active_load_balancer_loses_no_search() {
    let (cluster, _) = cluster_with("swapped").await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut searchers = Vec::new();
    for id in 1..=3u64 {
        let reader = cluster.client(id, READER).await;
        let stop = stop.clone();
        searchers.push(tokio::spawn(async move {
            let q = random_vectors(1, 8, id);
            let (mut ok, mut failed) = (0u64, Vec::new());
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline {
                match reader.search("swapped", &q[0], 3).await {
                    Ok(_) => ok += 1,
                    Err(e) => failed.push(e.to_string()),
                }
            }
            (ok, failed)
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let zone_aware = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("node/builtin-plugins/zone-aware.wasm");
    let started = Instant::now();
    let (ok, out, err) = cluster.cli(&["plugin", "deploy", "round-robin", &zone_aware.display().to_string()]);
    assert!(ok && out.contains("version 2"), "{out} {err}");
    wait_version(&cluster, "round-robin", 2).await;
    let swapped_in = started.elapsed();
    // After the swap, node 2's reads stay on node 2.
    let (_, before) = cluster.http_get(2, "/metrics");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, after) = cluster.http_get(2, "/metrics");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for s in searchers {
        let (ok, failed) = s.await.unwrap();
        assert!(failed.is_empty(), "searches failed during the swap: {failed:?}");
        total += ok;
    }
    assert!(total > 30, "searches ran throughout ({total})");
    let count = |m: &str, node: u64| metric(m, "edgevec_replica_reads", &[&format!("node=\"{node}\"")]).unwrap_or(0.0);
    let served: Vec<f64> = (1..=3).map(|n| count(&after, n) - count(&before, n)).collect();
    assert!(
        served[1] > 0.0 && served[0] == 0.0 && served[2] == 0.0,
        "node 2's reads after the swap: {served:?}"
    );
    assert!(swapped_in < Duration::from_secs(30), "{swapped_in:?}");
    // Removing the deployed versions brings the shipped one back.
    let (ok, _, err) = cluster.cli(&["plugin", "remove", "round-robin"]);
    assert!(ok, "{err}");
    wait_version(&cluster, "round-robin", 1).await;
}

/// A node that was down during a deploy fetches the bytes from another
/// node when it returns, and loads the version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_down_during_a_deploy_fetches_it_when_back() {
    let mut cluster = TestCluster::running(Layout::voters(3)).await;
    for id in 1..=3 {
        wait_plugins_loaded(&cluster, id).await;
    }
    cluster.stop(3);
    let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("node/builtin-plugins/random.wasm");
    let (ok, out, err) = cluster.cli(&["plugin", "deploy", "late", &file.display().to_string()]);
    assert!(ok && out.contains("version 1"), "{out} {err}");
    cluster.start(3);
    cluster.client(3, READER).await;
    let list = wait_version(&cluster, "late", 1).await;
    let late = list.iter().find(|p| p["name"] == "late").unwrap();
    assert_eq!(late["nodes"].as_array().unwrap().len(), 3, "{late}");
    let blob = cluster
        .dir
        .path()
        .join("data/node3/plugins/blobs")
        .join(format!("{}.wasm", late["sha256"].as_str().unwrap()));
    assert!(blob.exists(), "node 3 keeps the fetched bytes at {}", blob.display());
}

/// Plugins that grow memory without end, recurse without end, or trap at
/// every call, deployed through the CLI and chosen by a collection: every
/// search answers, each failure is named in `plugin list`, and the node's
/// memory stays bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_plugins_in_use_are_contained() {
    let (cluster, _) = cluster_with("guarded").await;
    let dir = tempfile::tempdir().unwrap();
    let reader = cluster.client(3, READER).await;
    let q = random_vectors(1, 8, 5);
    let rss = || {
        let (_, m) = cluster.http_get(3, "/metrics");
        metric(&m, "edgevec_process_resident_bytes", &[]).expect("resident bytes")
    };
    let before = rss();
    let cases = [
        (
            "grower",
            wat_balancer(
                "(loop $l (br_if $l (i32.ne (memory.grow (i32.const 16)) (i32.const -1)))) unreachable",
                "",
            ),
            &["memory limit"][..],
        ),
        (
            "diver",
            wat_balancer(
                "(call $down (i64.const 0))",
                "(func $down (param i64) (result i64) (call $down (i64.add (local.get 0) (i64.const 1))))",
            ),
            // Whichever limit it meets first.
            &["stack overflow", "fuel"][..],
        ),
        ("trapper", wat_balancer("unreachable", ""), &["trapped"][..]),
    ];
    for (name, bytes, why) in &cases {
        let path = dir.path().join(format!("{name}.wasm"));
        std::fs::write(&path, bytes).unwrap();
        let (ok, _, err) = cluster.cli(&["plugin", "deploy", name, &path.display().to_string()]);
        assert!(ok, "{name}: {err}");
        wait_version(&cluster, name, 1).await;
        let (ok, _, err) = cluster.cli(&["load", "guarded", "--lb", name]);
        assert!(ok, "{name}: {err}");
        tokio::time::sleep(Duration::from_millis(500)).await;
        for _ in 0..25 {
            reader
                .search("guarded", &q[0], 3)
                .await
                .unwrap_or_else(|e| panic!("{name}: search failed: {e}"));
        }
        let list = plugin_list(&cluster);
        let p = list.iter().find(|p| p["name"] == *name).unwrap();
        let n3 = p["nodes"].as_array().unwrap().iter().find(|n| n["node"] == 3).unwrap();
        assert!(n3["failures"].as_u64().unwrap() >= 20, "{name}: {p}");
        let reason = n3["reason"].as_str().unwrap_or_default();
        assert!(
            why.iter().any(|w| reason.contains(w)),
            "{name}: reason {reason:?} should name one of {why:?}"
        );
    }
    let after = rss();
    assert!(
        after < before + 256.0 * 1024.0 * 1024.0,
        "node 3 grew from {before} to {after} bytes"
    );
}
