//! Consistency levels on a real 3-node cluster (replicas = 3) whose
//! backups apply committed ops late (the apply-lag fault hook): a history
//! of writes and exact `get` reads, with one clock for invocations and
//! acks, checked against what each level promises.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use edgevec_client::{Client, CollectionSpec, Metric, Point, ReadOpts, ReplicationSpec};

const DIM: usize = 4;
/// How late the backups make committed ops searchable.
const LAG: Duration = Duration::from_millis(1500);

fn opts(level: &str) -> ReadOpts {
    ReadOpts {
        consistency: Some(level.to_string()),
        timeout: Some(Duration::from_secs(10)),
        ..Default::default()
    }
}

async fn found(client: &Client, level: &str, id: u64) -> bool {
    match client.get_with("h", &[id], &opts(level)).await {
        Ok(points) => points.iter().any(|p| p.id == id),
        Err(e) => panic!("{level} get of {id} failed: {e}"),
    }
}

/// One write after another through node 1; after each ack, reads through
/// other endpoints at every level:
/// - `strong` (a client with no session, through node 2) sees the write;
/// - `session` (a client through node 3 holding the writer's tokens) sees
///   it, and a session never reads an older state than it read before;
/// - `bounded:300` sees every write acked more than 300 ms before the
///   read began;
/// - `eventually` (round-robin over three replicas, two of them lagging)
///   serves the stale state at least once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_level_keeps_its_promise_under_replica_lag() {
    let mut cluster = TestCluster::with_layout(Layout::voters(3));
    for id in 1..=3 {
        cluster.set_env(id, "EDGEVEC_FAULT_APPLY_DELAY_MS", &LAG.as_millis().to_string());
    }
    cluster.start_all().await;
    let admin = cluster.client(1, ADMIN).await;
    admin
        .create_replicated(
            CollectionSpec::new("h", DIM as u32, Metric::L2).with_shards(2),
            ReplicationSpec::new(3),
        )
        .await
        .expect("create");
    let writer = cluster.client(1, WRITER).await;
    let strong = cluster.client(2, READER).await;
    let session = cluster.client(3, READER).await;
    let loose = cluster.client(3, READER).await;
    // The backups serve nothing until their primary first reached them.
    writer
        .upsert(
            "h",
            vec![Point {
                id: 0,
                vector: vector_of(0, DIM),
                payload: None,
            }],
        )
        .await
        .expect("first write");

    // (id, invoked, acked) on one clock.
    let mut history: Vec<(u64, Instant, Instant)> = Vec::new();
    let mut stale_eventually = 0;
    let mut session_seen: BTreeMap<u64, bool> = BTreeMap::new();
    for id in 1..=24u64 {
        let invoked = Instant::now();
        writer
            .upsert(
                "h",
                vec![Point {
                    id,
                    vector: vector_of(id, DIM),
                    payload: None,
                }],
            )
            .await
            .expect("write");
        let acked = Instant::now();
        history.push((id, invoked, acked));
        // First, while the backups still lag behind this write.
        if !found(&loose, "eventually", id).await {
            stale_eventually += 1;
        }

        assert!(
            found(&strong, "strong", id).await,
            "strong read missed write {id} acked before it began"
        );

        session.merge_session("h", &writer.session_tokens("h"));
        assert!(
            found(&session, "session", id).await,
            "session read missed its own write {id}"
        );
        // Monotonic: what the session saw stays visible.
        session_seen.insert(id, true);
        let seen: Vec<u64> = session_seen.keys().copied().collect();
        let again = session
            .get_with("h", &seen, &opts("session"))
            .await
            .expect("session read");
        assert_eq!(again.len(), seen.len(), "the session went back: it saw {seen:?} before");

        let began = Instant::now();
        let ids: Vec<u64> = history.iter().map(|(id, _, _)| *id).collect();
        let got = loose
            .get_with("h", &ids, &opts("bounded:300"))
            .await
            .expect("bounded read");
        let got: std::collections::BTreeSet<u64> = got.iter().map(|p| p.id).collect();
        for (old, _, acked) in &history {
            if *acked + Duration::from_millis(300) < began {
                assert!(
                    got.contains(old),
                    "bounded:300 missed write {old} acked {:?} before the read",
                    began - *acked
                );
            }
        }
    }
    assert!(
        stale_eventually > 0,
        "eventually never served a lagging replica's stale state in 24 tries"
    );
    // Every level answered through the plugin of its name on some node.
    let mut calls = 0.0;
    for id in 1..=3 {
        let (_, m) = cluster.http_get(id, "/metrics");
        for level in ["strong", "bounded", "session", "eventually"] {
            calls += metric(&m, "edgevec_plugin_calls", &[&format!("plugin=\"{level}\"")]).unwrap_or(0.0);
        }
    }
    assert!(calls > 0.0, "no consistency plugin was called");
}

/// Levels given through the CLI: a bad one is refused with the reason; a
/// named plugin that is not a consistency policy is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_levels_are_refused_with_the_reason() {
    let cluster = TestCluster::running(Layout::voters(3)).await;
    let admin = cluster.client(1, ADMIN).await;
    admin
        .create_replicated(CollectionSpec::new("c", 2, Metric::L2), ReplicationSpec::new(3))
        .await
        .expect("create");
    let writer = cluster.client(1, WRITER).await;
    writer
        .upsert(
            "c",
            vec![Point {
                id: 7,
                vector: vec![1.0, 2.0],
                payload: None,
            }],
        )
        .await
        .expect("write");
    for (level, why) in [
        ("bounded:x", "not a whole number"),
        ("bounded:0", "between 1 and"),
        ("strong:5", "takes no parameter"),
        ("no-such-plugin", "no consistency plugin named"),
        ("round-robin", "no consistency plugin named"),
    ] {
        let (ok, out, err) = cluster.cli(&["search", "c", "--vector", "[1,2]", "--consistency", level]);
        assert!(!ok && err.contains(why), "{level}: expected {why:?}, got {out} {err}");
    }
    for level in ["strong", "bounded:250", "session", "eventually"] {
        let (ok, out, err) = cluster.cli(&["search", "c", "--vector", "[1,2]", "--consistency", level]);
        assert!(ok, "{level}: {out} {err}");
    }
}

/// `strong` and `session` across a failover: the primary's node is paused
/// (SIGSTOP) while a writer writes continuously and readers read at
/// `strong` and at `session` (with the writer's tokens) through the other
/// nodes; it is resumed after a new primary took over. Every strong read
/// sees every write acknowledged before it began, and every session read
/// sees the session's writes, before, during and after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strong_and_session_hold_across_a_paused_primary_failover() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    let cluster = TestCluster::running(Layout::voters(3)).await;
    let admin = cluster.client(1, ADMIN).await;
    admin
        .create_replicated(
            CollectionSpec::new("f", DIM as u32, Metric::L2).with_shards(1),
            ReplicationSpec::new(3),
        )
        .await
        .expect("create");
    let shards = admin.shards(Some("f")).await.expect("shards");
    let primary = shards[0].shards[0].primary.expect("a primary");
    let others: Vec<u64> = (1..=3).filter(|n| *n != primary).collect();
    let writer = cluster.client_of(&others, WRITER).await;
    let strong = cluster.client_of(&[others[1], others[0]], READER).await;
    let session = cluster.client_of(&[others[1], others[0]], READER).await;
    let observer = cluster.client_of(&others, READER).await;

    // (id, acked) of every acknowledged write; one clock for all.
    let acked: Arc<Mutex<Vec<(u64, Instant)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let writing = {
        let (writer, acked, stop) = (writer.clone(), acked.clone(), stop.clone());
        tokio::spawn(async move {
            let mut id = 1u64;
            while !stop.load(Ordering::Relaxed) {
                let point = Point {
                    id,
                    vector: vector_of(id, DIM),
                    payload: None,
                };
                // A write that fails during the failover is not acked; the
                // next one uses a new id.
                if writer.upsert("f", vec![point]).await.is_ok() {
                    acked.lock().unwrap().push((id, Instant::now()));
                }
                id += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let reading = {
        let (strong, session, writer, acked, stop) = (
            strong.clone(),
            session.clone(),
            writer.clone(),
            acked.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            let mut problems = Vec::new();
            let mut reads = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let began = Instant::now();
                // The last 20 writes acknowledged before the read began.
                let want: Vec<u64> = {
                    let a = acked.lock().unwrap();
                    a.iter()
                        .rev()
                        .filter(|(_, t)| *t < began)
                        .take(20)
                        .map(|(id, _)| *id)
                        .collect()
                };
                if want.is_empty() {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
                match strong.get_with("f", &want, &opts("strong")).await {
                    Ok(got) if got.len() == want.len() => reads += 1,
                    Ok(got) => problems.push(format!(
                        "strong read missed {:?}",
                        want.iter()
                            .filter(|id| !got.iter().any(|p| p.id == **id))
                            .collect::<Vec<_>>()
                    )),
                    Err(e) => problems.push(format!("strong read failed: {e}")),
                }
                session.merge_session("f", &writer.session_tokens("f"));
                match session.get_with("f", &want, &opts("session")).await {
                    Ok(got) if got.len() == want.len() => reads += 1,
                    Ok(got) => problems.push(format!(
                        "session read missed {:?}",
                        want.iter()
                            .filter(|id| !got.iter().any(|p| p.id == **id))
                            .collect::<Vec<_>>()
                    )),
                    Err(e) => problems.push(format!("session read failed: {e}")),
                }
            }
            (reads, problems)
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.pause(primary);
    // Until another node is the shard's primary, then a little longer.
    cluster
        .wait_shards(&observer, "f", Duration::from_secs(30), "a new primary", |c| {
            c.shards[0].primary.is_some_and(|p| p != primary)
        })
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    cluster.resume(primary);
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    writing.await.expect("writer");
    let (reads, problems) = reading.await.expect("reader");
    if !problems.is_empty() {
        cluster.fail(format!("{} bad reads of {reads}: {problems:#?}", problems.len()));
    }
    assert!(reads > 20, "only {reads} reads were checked");
    let written = acked.lock().unwrap().len();
    assert!(written > 50, "only {written} writes were acknowledged");
}
