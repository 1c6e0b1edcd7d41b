//! The metadata Raft with real node processes: bootstrap in any order,
//! learners, leader failover, majority loss, full restarts, runtime
//! membership, the failure detector, admin HTTP, and refused certificates.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use edgevec_client::{ClientError, ClusterStatus, CollectionSpec, Metric, Point, ReplicationSpec};

fn names(list: &[edgevec_client::CollectionInfo]) -> Vec<String> {
    let mut v: Vec<String> = list.iter().map(|c| c.spec.name.clone()).collect();
    v.sort();
    v
}

fn all_up(view: &ClusterStatus, n: usize) -> bool {
    view.leader.is_some() && view.nodes.len() == n && view.nodes.iter().all(|x| x.state == "up")
}

/// Starts `n` voters and waits until they form one cluster, all up.
async fn running_cluster(n: u64) -> TestCluster {
    running(Layout::voters(n)).await
}

/// Starts every node of `layout` and waits until all are up.
async fn running(layout: Layout) -> TestCluster {
    let n = layout.voters + layout.learners;
    let mut cluster = TestCluster::with_layout(layout);
    for id in 1..=n {
        cluster.start(id);
    }
    cluster
        .wait_view(1, Duration::from_secs(30), "all nodes up", |v| all_up(v, n as usize))
        .await;
    cluster
}

/// The current metadata leader, as node 1 sees it.
async fn current_leader(cluster: &TestCluster) -> u64 {
    cluster
        .wait_view(1, Duration::from_secs(5), "leader", |v| v.leader.is_some())
        .await
        .leader
        .unwrap()
}

/// Waits until node `id` lists exactly `want` collections.
async fn wait_collections(cluster: &TestCluster, id: u64, want: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let client = cluster.client(id, READER).await;
    loop {
        let have = names(&client.list_collections().await.unwrap());
        if have == want {
            return;
        }
        assert!(Instant::now() < deadline, "node {id} lists {have:?}, want {want:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_in_shuffled_order_form_one_cluster() {
    let mut cluster = TestCluster::new(3);
    for id in [3, 1, 2] {
        cluster.start(id);
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    let view = cluster
        .wait_view(1, Duration::from_secs(30), "3 nodes up", |v| all_up(v, 3))
        .await;
    assert!(view.nodes.iter().all(|n| n.voter));
    for id in [2, 3] {
        let other = cluster
            .wait_view(id, Duration::from_secs(10), "same leader", |v| v.leader == view.leader)
            .await;
        assert_eq!(other.leader, view.leader);
    }

    // A collection created on one node exists on every node.
    let c2 = cluster.client(2, ADMIN).await;
    c2.create_collection(CollectionSpec::new("shared", 4, Metric::L2))
        .await
        .unwrap();
    c2.upsert(
        "shared",
        vec![Point {
            id: 1,
            vector: vec![1.0; 4],
            payload: None,
        }],
    )
    .await
    .unwrap();
    for id in 1..=3 {
        wait_collections(&cluster, id, &["shared"]).await;
    }
    assert!(matches!(
        cluster
            .client(3, ADMIN)
            .await
            .create_collection(CollectionSpec::new("shared", 4, Metric::L2))
            .await,
        Err(ClientError::AlreadyExists(_))
    ));

    // Admin HTTP on every node.
    for id in 1..=3 {
        assert_eq!(cluster.http_get(id, "/healthz").0, 200);
        let deadline = Instant::now() + Duration::from_secs(10);
        while cluster.http_get(id, "/readyz").0 != 200 {
            assert!(
                Instant::now() < deadline,
                "node {id} not ready: {:?}",
                cluster.http_get(id, "/readyz")
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (code, metrics) = cluster.http_get(id, "/metrics");
        assert_eq!(code, 200);
        for name in [
            "edgevec_raft_term",
            "edgevec_raft_leader_id",
            "edgevec_raft_applied_index",
            "edgevec_node_state",
        ] {
            assert!(metrics.contains(name), "node {id} metrics lack {name}:\n{metrics}");
        }
        assert!(
            metrics.contains("edgevec_rpc_requests_total{protocol=\"node\""),
            "{metrics}"
        );
    }

    // The metadata can be dropped from any node too.
    cluster.client(1, ADMIN).await.drop_collection("shared").await.unwrap();
    for id in 1..=3 {
        wait_collections(&cluster, id, &[]).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nodes_three_voters_two_learners() {
    let mut cluster = TestCluster::with_layout(Layout {
        voters: 3,
        learners: 2,
        cluster_extra: String::new(),
    });
    for id in [5, 2, 4, 1, 3] {
        cluster.start(id);
    }
    let view = cluster
        .wait_view(4, Duration::from_secs(30), "5 nodes up", |v| all_up(v, 5))
        .await;
    let voters: Vec<u64> = view.nodes.iter().filter(|n| n.voter).map(|n| n.id).collect();
    assert_eq!(voters, vec![1, 2, 3]);
    assert!(view
        .nodes
        .iter()
        .filter(|n| !n.voter)
        .all(|n| n.roles == ["data", "proxy"]));

    // A learner forwards metadata writes to the leader.
    cluster
        .client(5, ADMIN)
        .await
        .create_collection(CollectionSpec::new("docs", 8, Metric::Cosine))
        .await
        .unwrap();
    for id in 1..=5 {
        wait_collections(&cluster, id, &["docs"]).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_elects_another_and_writes_go_on() {
    let mut cluster = running_cluster(3).await;
    let view = cluster
        .wait_view(1, Duration::from_secs(5), "3 nodes up", |v| all_up(v, 3))
        .await;
    let old = view.leader.unwrap();
    let client = cluster.client_any(ADMIN).await;
    client
        .create_collection(CollectionSpec::new("before", 4, Metric::L2))
        .await
        .unwrap();

    cluster.kill9(old);
    let killed = Instant::now();
    let survivor = (1..=3).find(|id| *id != old).unwrap();
    let view = cluster
        .wait_view(survivor, Duration::from_secs(15), "new leader", |v| {
            v.leader.is_some_and(|l| l != old)
        })
        .await;
    let client = cluster.client(survivor, ADMIN).await;
    client
        .create_collection(CollectionSpec::new("after", 4, Metric::L2))
        .await
        .unwrap();
    println!(
        "leader {old} killed; leader {:?} committed a write after {:?}",
        view.leader,
        killed.elapsed()
    );
    for id in (1..=3).filter(|id| *id != old) {
        wait_collections(&cluster, id, &["after", "before"]).await;
    }
    // The killed node comes back, catches up, and is a follower.
    cluster.start(old);
    wait_collections(&cluster, old, &["after", "before"]).await;
    cluster
        .wait_view(survivor, Duration::from_secs(20), "all up again", |v| all_up(v, 3))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_majority_writes_are_unavailable_then_recover() {
    let mut cluster = running_cluster(3).await;
    let c1 = cluster.client(1, ADMIN).await;
    c1.create_collection(CollectionSpec::new("a", 4, Metric::L2))
        .await
        .unwrap();

    cluster.kill9(2);
    cluster.kill9(3);
    let started = Instant::now();
    match c1.create_collection(CollectionSpec::new("b", 4, Metric::L2)).await {
        Err(ClientError::Unavailable(msg)) => assert!(msg.contains("majority"), "{msg}"),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    let took = started.elapsed();
    assert!(took < Duration::from_secs(15), "Unavailable took {took:?}");
    // Reads of local metadata still work.
    assert_eq!(names(&c1.list_collections().await.unwrap()), ["a"]);

    cluster.start(2);
    cluster.start(3);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match c1.create_collection(CollectionSpec::new("b", 4, Metric::L2)).await {
            Ok(()) => break,
            Err(ClientError::Unavailable(_)) if Instant::now() < deadline => {}
            // An earlier attempt reported Unavailable but stayed in the
            // leader's log and committed once the majority was back.
            Err(ClientError::AlreadyExists(_))
                if c1
                    .describe_collection("b")
                    .await
                    .is_ok_and(|c| c.spec == CollectionSpec::new("b", 4, Metric::L2)) =>
            {
                break
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    for id in 1..=3 {
        wait_collections(&cluster, id, &["a", "b"]).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_every_node_at_once_keeps_the_metadata() {
    let mut cluster = running_cluster(3).await;
    let client = cluster.client_any(ADMIN).await;
    for name in ["x", "y", "z"] {
        client
            .create_collection(CollectionSpec::new(name, 4, Metric::InnerProduct))
            .await
            .unwrap();
    }
    client.drop_collection("y").await.unwrap();
    for id in 1..=3 {
        wait_collections(&cluster, id, &["x", "z"]).await;
    }
    let c1 = cluster.client(1, WRITER).await;
    c1.upsert(
        "x",
        vec![Point {
            id: 9,
            vector: vec![0.5; 4],
            payload: Some("{\"k\":1}".into()),
        }],
    )
    .await
    .unwrap();
    client.close().await;

    for id in 1..=3 {
        cluster.kill9(id);
    }
    for id in [2, 3, 1] {
        cluster.start(id);
    }
    let view = cluster
        .wait_view(2, Duration::from_secs(30), "3 nodes up again", |v| all_up(v, 3))
        .await;
    assert_eq!(view.nodes.len(), 3);
    for id in 1..=3 {
        wait_collections(&cluster, id, &["x", "z"]).await;
    }
    let got = cluster.client(1, READER).await.get("x", &[9]).await.unwrap();
    assert_eq!(got[0].payload.as_deref(), Some("{\"k\":1}"));
    // Still one cluster: a new write commits and reaches everyone.
    cluster
        .client(3, ADMIN)
        .await
        .create_collection(CollectionSpec::new("w", 4, Metric::L2))
        .await
        .unwrap();
    for id in 1..=3 {
        wait_collections(&cluster, id, &["w", "x", "z"]).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_added_and_removed_at_runtime() {
    let mut cluster = running_cluster(3).await;
    let client = cluster.client_any(ADMIN).await;
    for name in ["m1", "m2"] {
        client
            .create_collection(CollectionSpec::new(name, 4, Metric::L2))
            .await
            .unwrap();
    }

    // Node 4 is not in the cluster file: its certificate, then the process.
    let (ok, _, err) = cluster.cli(&["certs", "--node", "4", "--host", &cluster.ip]);
    assert!(ok, "{err}");
    let addr4 = quic_addr(&cluster.ip, 4);
    let data4 = cluster.path("data/node4");
    let config = cluster.config_path.clone();
    cluster.start_with(
        4,
        &config,
        &[
            "--addr",
            &addr4,
            "--data-dir",
            data4.to_str().unwrap(),
            "--roles",
            "meta,data,proxy",
            "--zone",
            "zone-4",
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let added = loop {
        let out = cluster.cli(&[
            "node",
            "add",
            "--id",
            "4",
            "--addr",
            &addr4,
            "--zone",
            "zone-4",
            "--roles",
            "meta,data,proxy",
            "--json",
        ]);
        if out.0 || Instant::now() > deadline {
            break out;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(added.0, "node add failed: {}", added.2);
    let membership: serde_json::Value = serde_json::from_str(added.1.trim()).unwrap();
    assert_eq!(membership["voters"], serde_json::json!([1, 2, 3, 4]), "{membership}");

    // It received all metadata, and later writes too.
    let c4 = {
        let mut cfg = cluster.client_config(1, READER);
        cfg.endpoints = vec![addr4.parse().unwrap()];
        edgevec_client::Client::connect(cfg).await.unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while names(&c4.list_collections().await.unwrap()) != ["m1", "m2"] {
        assert!(Instant::now() < deadline, "node 4 did not receive the metadata");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cluster
        .wait_view(1, Duration::from_secs(20), "4 nodes up", |v| all_up(v, 4))
        .await;

    // Adding again with another id at the same address is refused clearly.
    let out = cluster.cli(&["node", "add", "--id", "7", "--addr", &addr4]);
    assert!(!out.0 && out.2.contains("node 4"), "{out:?}");

    // Remove it again: back to three voters.
    let out = cluster.cli(&["node", "remove", "--id", "4", "--json"]);
    assert!(out.0, "{}", out.2);
    let membership: serde_json::Value = serde_json::from_str(out.1.trim()).unwrap();
    assert_eq!(membership["voters"], serde_json::json!([1, 2, 3]), "{membership}");
    cluster.kill9(4);

    // Removing a voter when that would leave no majority up is refused.
    cluster.kill9(3);
    cluster
        .wait_view(1, Duration::from_secs(20), "node 3 suspect", |v| {
            v.nodes.iter().any(|n| n.id == 3 && n.state != "up")
        })
        .await;
    let leader = current_leader(&cluster).await;
    let victim = if leader == 1 { 2 } else { 1 };
    let out = cluster.cli(&["node", "remove", "--id", &victim.to_string()]);
    assert!(!out.0 && out.2.contains("no majority"), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_node_is_suspect_then_dead_then_up_again() {
    let mut cluster = running(Layout {
        voters: 3,
        learners: 0,
        cluster_extra: "heartbeat_ms = 100\nsuspect_ms = 600\ndead_after_ms = 2500\n".into(),
    })
    .await;
    // Kill a node that is not the leader, so the detector keeps running.
    let leader = current_leader(&cluster).await;
    let victim = (1..=3).find(|id| *id != leader).unwrap();
    cluster.kill9(victim);
    let state_of = |v: &ClusterStatus| v.nodes.iter().find(|n| n.id == victim).map(|n| n.state.clone());
    cluster
        .wait_view(leader, Duration::from_secs(10), "suspect", |v| {
            state_of(v).as_deref() == Some("suspect")
        })
        .await;
    let view = cluster
        .wait_view(leader, Duration::from_secs(15), "dead", |v| {
            state_of(v).as_deref() == Some("dead")
        })
        .await;
    assert!(
        view.nodes
            .iter()
            .find(|n| n.id == victim)
            .unwrap()
            .last_heartbeat_ms
            .unwrap_or(u64::MAX)
            >= 2500
    );
    // The verdict is metadata: every node sees it.
    let other = (1..=3).find(|id| *id != leader && *id != victim).unwrap();
    cluster
        .wait_view(other, Duration::from_secs(5), "dead everywhere", |v| {
            state_of(v).as_deref() == Some("dead")
        })
        .await;
    cluster.start(victim);
    cluster
        .wait_view(leader, Duration::from_secs(20), "up again", |v| all_up(v, 3))
        .await;
}

/// Seconds since midnight (UTC) of a node log line's timestamp
/// (`2026-01-02T03:04:05.678901Z  INFO ...`).
fn log_time(line: &str) -> f64 {
    let stamp = line.split_whitespace().next().unwrap_or_default();
    let clock = stamp.split('T').nth(1).and_then(|c| c.strip_suffix('Z'));
    let parts: Vec<f64> = clock
        .map(|c| c.split(':').filter_map(|p| p.parse().ok()).collect())
        .unwrap_or_default();
    assert_eq!(parts.len(), 3, "no timestamp in {line:?}");
    parts[0] * 3600.0 + parts[1] * 60.0 + parts[2]
}

/// A node that dies as metadata leader is judged by the leader elected
/// after it from when it last heard from it, not from its own election:
/// the failover of the dead node's primaries waits `suspect_ms` after the
/// death, not after the election.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_leader_is_judged_from_when_it_fell_silent() {
    const SUSPECT_S: f64 = 3.0;
    let mut cluster = running(Layout {
        voters: 3,
        learners: 0,
        // Elections take at least a second, so a verdict counted from
        // the election comes at least 4 s after the death.
        cluster_extra: "heartbeat_ms = 100\nsuspect_ms = 3000\nelection_timeout_ms = [1000, 1500]\n".into(),
    })
    .await;
    let old = current_leader(&cluster).await;
    let watcher = (1..=3).find(|id| *id != old).unwrap();
    // Every node has had its heartbeats acknowledged by the leader.
    cluster
        .wait_view(watcher, Duration::from_secs(10), "heartbeats acknowledged", |v| {
            v.nodes.iter().all(|n| n.last_heartbeat_ms.is_some_and(|ms| ms < 1000))
        })
        .await;
    cluster.kill9(old);
    let view = cluster
        .wait_view(watcher, Duration::from_secs(30), "the old leader suspect", |v| {
            v.leader.is_some_and(|l| l != old) && v.nodes.iter().any(|n| n.id == old && n.state == "suspect")
        })
        .await;
    let new = view.leader.unwrap();
    let log = std::fs::read_to_string(cluster.log_path(new)).unwrap();
    let elected = log
        .lines()
        .rfind(|l| l.contains("became metadata leader"))
        .map(log_time)
        .unwrap_or_else(|| cluster.fail(format!("node {new} never logged its election")));
    let verdict = format!("failure detector verdict node={old} state=Suspect");
    let judged = log
        .lines()
        .rfind(|l| l.contains(&verdict))
        .map(log_time)
        .unwrap_or_else(|| cluster.fail(format!("node {new} never logged its verdict on node {old}")));
    let after = (judged - elected).rem_euclid(86_400.0);
    assert!(
        after < SUSPECT_S,
        "node {new} judged node {old} {after:.3} s after its election: it counted the silence from the election, not from its last contact"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_a_foreign_certificate_cannot_join() {
    let mut cluster = TestCluster::new(3);
    // Node 3 runs from a copy of the file whose certificates come from another CA.
    let foreign_cfg = cluster.config_variant("foreign.toml", |t| {
        t.replace("certs_dir = \"certs\"", "certs_dir = \"foreign-certs\"")
    });
    edgevec_node::certs::foreign_node_cert(&cluster.path("foreign-certs"), 3).unwrap();
    cluster.start(1);
    cluster.start(2);
    cluster.start_with(3, &foreign_cfg, &[]);

    let view = cluster
        .wait_view(1, Duration::from_secs(30), "nodes 1 and 2 up", |v| {
            v.leader.is_some() && v.nodes.iter().filter(|n| n.state == "up").count() == 2
        })
        .await;
    assert!(matches!(view.leader, Some(1 | 2)), "{view:?}");
    // Node 3 is running and trying: it serves its admin port, and the
    // others have refused its handshakes (nodes 1 and 2 trust each other,
    // so a failed handshake there is node 3's).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let refused = [1, 2]
            .iter()
            .any(|id| std::fs::read_to_string(cluster.log_path(*id)).is_ok_and(|l| l.contains("handshake failed")));
        let alive = std::net::TcpStream::connect_timeout(
            &cluster.config.node(3).unwrap().admin_addr.unwrap(),
            Duration::from_secs(1),
        )
        .is_ok();
        if refused && alive {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node 3 never tried to reach the others (refused: {refused}, alive: {alive})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Having tried, it must not count as up or lead.
    let view = cluster
        .wait_view(2, Duration::from_secs(5), "view", |v| v.leader.is_some())
        .await;
    let n3 = view.nodes.iter().find(|n| n.id == 3).unwrap();
    assert_ne!(n3.state, "up", "{view:?}");
    assert!(matches!(view.leader, Some(1 | 2)));
    assert_ne!(cluster.http_get(3, "/readyz").0, 200);
    // The healthy pair still commits metadata.
    cluster
        .client(1, ADMIN)
        .await
        .create_collection(CollectionSpec::new("ok", 4, Metric::L2))
        .await
        .unwrap();
}

#[test]
fn malformed_cluster_file_fails_fast_naming_the_line() {
    let cluster = TestCluster::new(1);
    let bad = cluster.config_variant("bad.toml", |t| {
        t.replace(
            "roles = [\"meta\", \"data\", \"proxy\"]",
            "roles = [\"meta\", \"chief\"]",
        )
    });
    let started = Instant::now();
    let (ok, _, err) = cluster.cli_with(&bad, &["node", "--id", "1"]);
    assert!(!ok);
    assert!(err.contains("line ") && err.contains("chief"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));

    let dup = cluster.config_variant("dup.toml", |t| {
        format!("{t}\n[[nodes]]\nid = 1\naddr = \"127.0.0.1:1\"\ndata_dir = \"x\"\n")
    });
    let (ok, _, err) = cluster.cli_with(&dup, &["node", "--id", "1"]);
    assert!(
        !ok && err.contains("dup.toml:") && err.contains("appears twice"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_behind_the_purged_log_receives_a_snapshot() {
    // Snapshot every 10 entries and purge behind it, so a node away for a
    // few dozen writes can only catch up by snapshot over the network.
    let mut cluster = running(Layout {
        voters: 3,
        learners: 0,
        cluster_extra: "raft_snapshot_logs = 10\n".into(),
    })
    .await;
    let leader = current_leader(&cluster).await;
    let away = (1..=3).find(|id| *id != leader).unwrap();
    cluster.kill9(away);
    let client = cluster.client(leader, ADMIN).await;
    let mut want: Vec<String> = (0..40).map(|i| format!("s{i:02}")).collect();
    for name in &want {
        client
            .create_collection(CollectionSpec::new(name, 4, Metric::L2))
            .await
            .unwrap();
    }
    for name in want.drain(..10) {
        client.drop_collection(&name).await.unwrap();
    }
    cluster.start(away);
    let want: Vec<&str> = want.iter().map(String::as_str).collect();
    wait_collections(&cluster, away, &want).await;
    let log = std::fs::read_to_string(cluster.log_path(away)).unwrap();
    assert!(
        log.contains("installed metadata snapshot"),
        "node {away} caught up without a snapshot; log:\n{log}"
    );
    cluster
        .wait_view(leader, Duration::from_secs(20), "all up", |v| all_up(v, 3))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collection_recreated_while_a_node_was_away_starts_empty_there() {
    let mut cluster = running_cluster(3).await;
    let spec = CollectionSpec::new("again", 4, Metric::L2);
    cluster
        .client(1, ADMIN)
        .await
        .create_collection(spec.clone())
        .await
        .unwrap();
    wait_collections(&cluster, 3, &["again"]).await;
    let c3 = cluster.client(3, WRITER).await;
    c3.upsert(
        "again",
        vec![Point {
            id: 7,
            vector: vec![1.0; 4],
            payload: None,
        }],
    )
    .await
    .unwrap();
    cluster.kill9(3);

    // Same name, same schema: a new collection all the same.
    let c1 = cluster.client(1, ADMIN).await;
    c1.drop_collection("again").await.unwrap();
    c1.create_collection(spec).await.unwrap();

    cluster.start(3);
    wait_collections(&cluster, 3, &["again"]).await;
    let c3 = cluster.client(3, READER).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        // Node 3 replays its own log before it hears of the drop: until
        // then the name may still lead it to the old collection, and a read
        // of that one ends as "dropped while the read was under way".
        let info = match (c3.describe_collection("again").await, c3.get("again", &[7]).await) {
            (Ok(info), Ok(points)) if info.points == 0 && points.is_empty() => break,
            (Ok(info), Ok(_)) => format!("{info:?}"),
            (Err(ClientError::NotFound(m)), _) | (_, Err(ClientError::NotFound(m))) => m,
            (Err(e), _) | (_, Err(e)) => panic!("reading the re-created collection on node 3: {e}"),
        };
        assert!(Instant::now() < deadline, "old points survived the re-create: {info}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_moves_to_the_next_endpoint_when_its_node_dies() {
    let mut cluster = running_cluster(3).await;
    let client = cluster.client_any(ADMIN).await;
    // Every node holds a replica, so any two can answer for the collection.
    client
        .create_replicated(CollectionSpec::new("fo", 4, Metric::L2), ReplicationSpec::new(3))
        .await
        .unwrap();
    for id in 1..=3 {
        wait_collections(&cluster, id, &["fo"]).await;
    }
    let first = client.current_endpoint().await.unwrap();
    let id = cluster.config.nodes.iter().find(|n| n.addr == first).unwrap().id;
    cluster.kill9(id);
    // Requests that are safe to repeat go on through another node, unseen.
    assert_eq!(names(&client.list_collections().await.unwrap()), ["fo"]);
    let hits = client.search("fo", &[1.0; 4], 1).await.unwrap();
    assert!(hits.is_empty());
    let now = client.current_endpoint().await.unwrap();
    assert_ne!(now, first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_metadata_or_registry_files_refuse_start_naming_the_file() {
    let mut cluster = running_cluster(3).await;
    let admin = cluster.client(1, ADMIN).await;
    admin
        .create_replicated(CollectionSpec::new("kept", 4, Metric::L2), ReplicationSpec::new(3))
        .await
        .unwrap();
    let replicas = cluster.path("data/node3/engine/replicas");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::read_dir(&replicas).map_or(0, |d| d.count()) == 0 {
        assert!(Instant::now() < deadline, "node 3 never opened its replica");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A second node process on the same data directory is refused.
    let (status, err) = cluster
        .run_until_exit(3, Duration::from_secs(20))
        .expect("a second process on node 3's data directory exits");
    assert!(!status.success());
    assert!(err.contains("in use by another process"), "{err}");
    println!("--- a second process on node 3's data directory:\n{err}");

    assert!(cluster.stop(3).unwrap().success());
    for file in ["meta/raft-log.redb", "meta/meta-state.redb", "engine/replicas.redb"] {
        let path = cluster.path(&format!("data/node3/{file}"));
        let saved = std::fs::read(&path).unwrap();
        std::fs::write(&path, &saved[..saved.len() / 2]).unwrap();
        let (status, err) = cluster
            .run_until_exit(3, Duration::from_secs(30))
            .unwrap_or_else(|| panic!("node 3 with a truncated {file} kept running"));
        assert!(!status.success(), "{file}: {err}");
        println!("--- node 3 with {file} cut in half:\n{err}");
        let shown = path.display().to_string();
        assert!(
            err.contains(&shown) && err.contains("Nothing was changed"),
            "{file}: the error does not name the file or say nothing changed:\n{err}"
        );
        assert_eq!(
            err.matches("Nothing was changed").count(),
            1,
            "{file}: the error is printed more than once:\n{err}"
        );
        assert_eq!(
            std::fs::read(&path).unwrap().len(),
            saved.len() / 2,
            "{file} was changed"
        );
        std::fs::write(&path, saved).unwrap();
    }
    // With the files restored the node starts and serves its replica.
    cluster.start(3);
    let c3 = cluster.client(3, ADMIN).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match c3.describe_collection("kept").await {
            Ok(_) => break,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("{e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_builds_on_every_node_do_not_cost_the_metadata_leader() {
    // Default Raft timings: what an operator runs.
    let cluster = running_cluster(3).await;
    // A leader, and every node has applied what it committed (its
    // replication to each of them is running).
    let before = cluster
        .wait_view(1, Duration::from_secs(30), "every node caught up with a leader", |v| {
            v.leader.is_some()
                && v.nodes
                    .iter()
                    .all(|n| n.applied_index.is_some() && n.applied_index >= v.committed_index)
        })
        .await;
    // What the nodes logged while they started (a node that is not
    // listening yet when the others elect: a_clean_start_… covers that)
    // is not this test's business.
    let marks = log_marks(&cluster);
    let admin = cluster.client(1, ADMIN).await;
    let (dim, rows) = (128u32, 16_000usize);
    admin
        .create_replicated(
            CollectionSpec::new("heavy", dim, Metric::L2).with_seal_rows(rows as u32),
            ReplicationSpec::new(3),
        )
        .await
        .unwrap();
    upsert_random(&admin, "heavy", rows as u64, dim as usize, 5).await;
    // Three builds at once on two shared cores; the leader and its term
    // must hold throughout.
    let started = Instant::now();
    let mut views = 0;
    loop {
        let view = cluster
            .wait_view(1, Duration::from_secs(10), "a view", |v| v.leader.is_some())
            .await;
        views += 1;
        assert_eq!(
            (view.leader, view.term),
            (before.leader, before.term),
            "the metadata leader changed during index builds ({views} views, {:?} in)",
            started.elapsed()
        );
        let info = admin.describe_collection("heavy").await.unwrap();
        let built = info
            .segments
            .iter()
            .all(|s| s.state != edgevec_proto::SegmentState::Sealed || s.index == edgevec_proto::IndexState::Ready);
        if built && started.elapsed() > Duration::from_secs(2) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "builds not done in 300 s: {info:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "builds done in {:?}; leader {:?} term {} held",
        started.elapsed(),
        before.leader,
        before.term
    );
    let warnings = warnings_since(&cluster, &marks);
    assert!(
        warnings.is_empty(),
        "warnings during index builds:\n{}",
        warnings.join("\n")
    );

    // /metrics of node 1 shows its replica, segments and builds (its own
    // build may end after the replica that answered describe, and the
    // builder counts a build once it has also returned its memory, just
    // after the index is in use).
    let heavy = "collection=\"heavy\"";
    let indexed = "state=\"indexed\"";
    let deadline = Instant::now() + Duration::from_secs(120);
    let metrics = loop {
        let (code, metrics) = cluster.http_get(1, "/metrics");
        assert_eq!(code, 200);
        if metric(&metrics, "edgevec_replica_segments", &[heavy, indexed]) == Some(1.0)
            && metric(&metrics, "edgevec_index_builds_finished", &[]).is_some_and(|n| n >= 1.0)
        {
            break metrics;
        }
        assert!(
            Instant::now() < deadline,
            "node 1 never showed its indexed segment:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let value = |name: &str, labels: &[&str]| -> f64 {
        metric(&metrics, name, labels).unwrap_or_else(|| panic!("no {name} {labels:?} in:\n{metrics}"))
    };
    assert_eq!(value("edgevec_replica_points", &[heavy]), rows as f64);
    assert_eq!(value("edgevec_replica_segments", &[heavy, "state=\"indexed\""]), 1.0);
    assert_eq!(value("edgevec_replica_segments", &[heavy, "state=\"building\""]), 0.0);
    assert!(value("edgevec_replica_disk_bytes", &[heavy]) > (rows * dim as usize * 4) as f64);
    assert_eq!(value("edgevec_replica_damaged", &[heavy]), 0.0);
    assert!(value("edgevec_index_builds_finished", &[]) >= 1.0);
    assert!(value("edgevec_index_build_seconds", &[]) > 0.0);
    assert_eq!(value("edgevec_index_builds_queued", &[]), 0.0);
    assert!(value("edgevec_process_resident_bytes", &[]) > 1e6);
    value("edgevec_requests_in_flight_bytes", &[]);
}

/// Every WARN or ERROR line of every node's log, labelled.
fn warnings(cluster: &TestCluster) -> Vec<String> {
    warnings_since(cluster, &BTreeMap::new())
}

/// Whether `line` reports a Raft RPC that a peer answered after its
/// deadline (one heartbeat interval, 60 ms), or openraft's back-off after
/// one. With every test of this file running clusters on two cores, a
/// node that has just started can answer its first heartbeats late; the
/// cluster forms all the same (what these tests check), so this is load,
/// not a fault of the start.
fn late_answer(line: &str) -> bool {
    line.contains("did not answer within") || line.contains("backoff_drain_events")
}

/// How far each node's log goes now (bytes).
fn log_marks(cluster: &TestCluster) -> BTreeMap<u64, usize> {
    cluster
        .ids()
        .into_iter()
        .map(|id| (id, std::fs::read(cluster.log_path(id)).map_or(0, |b| b.len())))
        .collect()
}

/// The WARN or ERROR lines logged after `marks` (from the start of a log
/// without a mark), labelled.
fn warnings_since(cluster: &TestCluster, marks: &BTreeMap<u64, usize>) -> Vec<String> {
    let mut out = Vec::new();
    for id in cluster.ids() {
        let log = std::fs::read(cluster.log_path(id)).unwrap_or_default();
        let from = marks.get(&id).copied().unwrap_or(0).min(log.len());
        let log = String::from_utf8_lossy(&log[from..]);
        out.extend(
            log.lines()
                .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
                .map(|l| format!("node {id}: {l}")),
        );
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_start_and_first_writes_log_no_warning() {
    let cluster = running_cluster(3).await;
    // Every node is up and a leader is elected: from here on, nothing.
    let formed = log_marks(&cluster);
    let admin = cluster.client(1, ADMIN).await;
    admin
        .create_replicated(CollectionSpec::new("quiet", 4, Metric::L2), ReplicationSpec::new(3))
        .await
        .unwrap();
    let points: Vec<Point> = (0..100)
        .map(|id| Point {
            id,
            vector: vec![id as f32, 1.0, 2.0, 3.0],
            payload: None,
        })
        .collect();
    admin.upsert("quiet", points).await.unwrap();
    assert_eq!(admin.get("quiet", &[7]).await.unwrap().len(), 1);
    // The nodes start at once, but on a loaded machine one may listen a
    // few hundred milliseconds after another has been elected, and Raft
    // rightly says it cannot reach it; what must be quiet is the cluster
    // from the moment every node listens.
    let all_listening = cluster
        .ids()
        .into_iter()
        .filter_map(|id| {
            let log = std::fs::read_to_string(cluster.log_path(id)).ok()?;
            let line = log.lines().find(|l| l.contains("edgevec_node::node: listening"))?;
            Some(line.split_whitespace().next()?.to_owned())
        })
        .max()
        .expect("every node logs where it listens");
    // Before the cluster formed, only the first election may complain: on
    // a loaded machine a vote request to a node that listens but is slow
    // to answer times out, and Raft says so.
    let warnings: Vec<String> = warnings(&cluster)
        .into_iter()
        .filter(|l| {
            // "node N: <timestamp> LEVEL ..."
            let stamp = l.split_whitespace().nth(2).unwrap_or("");
            stamp >= all_listening.as_str() && !l.contains("while requesting vote") && !late_answer(l)
        })
        .collect();
    assert!(warnings.is_empty(), "a clean start logged:\n{}", warnings.join("\n"));
    let after: Vec<String> = warnings_since(&cluster, &formed)
        .into_iter()
        .filter(|l| !late_answer(l))
        .collect();
    assert!(after.is_empty(), "a formed cluster logged:\n{}", after.join("\n"));
}
