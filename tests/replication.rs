//! Shard replication with real node processes (REPLICATION.md): reads and
//! writes through any node, failover after kill -9 and SIGSTOP of a
//! primary, catch-up of a restarted backup, replica-count changes while
//! serving, and re-creation of the replicas of a dead node.
//!
//! Every test keeps a ledger of what it sent and what was acknowledged, and
//! checks the cluster against it: every acknowledged write is readable, and
//! whatever is readable is exactly what was sent. Failure messages carry the
//! last shard configuration seen and the tail of every node's log.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use edgevec_client::{
    ClientError, CollectionShards, CollectionSpec, Metric, ReplicaStatus, ReplicationSpec, ShardStatus,
};

const DIM: usize = 8;

/// Failure-detector timings short enough for failover within a test.
const FAST: &str = "heartbeat_ms = 100\nsuspect_ms = 600\n";

fn fast(voters: u64, learners: u64, extra: &str) -> Layout {
    Layout {
        voters,
        learners,
        cluster_extra: format!("{FAST}{extra}"),
    }
}

/// Whether every value of `it` is `Some` and they are all equal.
fn all_same<T: PartialEq>(mut it: impl Iterator<Item = Option<T>>) -> bool {
    let Some(Some(first)) = it.next() else {
        return false;
    };
    it.all(|x| x.as_ref() == Some(&first))
}

/// Whether these replicas agree: all answered with the same applied LSN,
/// last op id and point count.
fn replicas_agree<'a>(rs: impl Iterator<Item = &'a ReplicaStatus> + Clone) -> bool {
    all_same(rs.clone().map(|r| r.applied_lsn))
        && all_same(rs.clone().map(|r| r.last))
        && all_same(rs.map(|r| r.points))
}

/// Every shard has a primary and exactly `n` replicas, all in-sync.
fn all_in_sync(c: &CollectionShards, n: usize) -> bool {
    !c.shards.is_empty()
        && c.shards
            .iter()
            .all(|s| s.primary.is_some() && s.replicas.len() == n && s.replicas.iter().all(|r| r.state == "in-sync"))
}

/// [`all_in_sync`], and the replicas of every shard hold the same log and
/// data (nothing in flight).
fn converged(c: &CollectionShards, n: usize) -> bool {
    all_in_sync(c, n) && c.shards.iter().all(|s| replicas_agree(s.replicas.iter()))
}

fn only_shard(c: &CollectionShards) -> &ShardStatus {
    assert_eq!(c.shards.len(), 1, "expected one shard:\n{}", show_shards(c));
    &c.shards[0]
}

/// The node of a backup of the collection's only shard.
fn a_backup(shards: &CollectionShards) -> u64 {
    only_shard(shards)
        .replicas
        .iter()
        .find(|r| !r.primary)
        .expect("a backup")
        .node
}

/// Waits until `client.shards()` shows `n` in-sync replicas per shard that
/// agree on applied LSN, last op id and points.
async fn wait_converged(
    cluster: &TestCluster,
    client: &edgevec_client::Client,
    name: &str,
    n: usize,
    within: Duration,
) -> CollectionShards {
    let what = format!("{name}: every shard with {n} in-sync replicas that agree on applied_lsn, last and points");
    cluster
        .wait_shards(client, name, within, &what, |c| converged(c, n))
        .await
}

/// Checks `ledger` through `client` (see [`check_ledger`]); fails with the
/// logs when something is wrong.
async fn check_through(
    cluster: &TestCluster,
    client: &edgevec_client::Client,
    via: &str,
    name: &str,
    ledger: &Ledger,
) -> BTreeSet<u64> {
    match check_ledger(client, name, ledger).await {
        Ok(present) => present,
        Err(e) => cluster.fail(format!("through {via}: {e}")),
    }
}

/// Describe's point count through `client` must equal `want`.
async fn check_count(cluster: &TestCluster, client: &edgevec_client::Client, via: &str, name: &str, want: usize) {
    match client.describe_collection(name).await {
        Ok(info) if info.points == want as u64 => {}
        Ok(info) => cluster.fail(format!(
            "through {via}: describe counts {} points, but {want} distinct ids are present: {info:?}",
            info.points
        )),
        Err(e) => cluster.fail(format!("through {via}: describe failed: {e}")),
    }
}

/// No id outside what was sent exists: gets of never-sent ids find nothing.
async fn check_never_sent(cluster: &TestCluster, client: &edgevec_client::Client, via: &str, name: &str, l: &Ledger) {
    let next = l.next_id();
    let mut ids: Vec<u64> = (next..next + 1_000).collect();
    ids.extend((1u64 << 40)..(1u64 << 40) + 100);
    match client.get(name, &ids).await {
        Ok(found) if found.is_empty() => {}
        Ok(found) => cluster.fail(format!(
            "through {via}: ids never sent exist: {:?}",
            found.iter().map(|r| r.id).collect::<Vec<_>>()
        )),
        Err(e) => cluster.fail(format!("through {via}: get of never-sent ids failed: {e}")),
    }
}

/// A one-shard collection with 3 replicas and 300 acknowledged points,
/// every replica in sync: the admin client, the ledger and the shard.
async fn one_shard_with_data(cluster: &TestCluster, name: &str) -> (edgevec_client::Client, Ledger, ShardStatus) {
    let admin = create(cluster, name, 1, 3).await;
    let c = cluster.client_any(WRITER).await;
    let mut ledger = Ledger::default();
    ledger.write_all(cluster, &c, name, DIM, 300, 100).await;
    let shards = wait_converged(cluster, &admin, name, 3, Duration::from_secs(20)).await;
    (admin, ledger, only_shard(&shards).clone())
}

/// Waits (20 s at most) until the only shard of `name` has a primary other
/// than `old`'s, in a later term; prints how long that took since `since`.
async fn wait_primary_replaced(
    cluster: &TestCluster,
    observer: &edgevec_client::Client,
    name: &str,
    old: &ShardStatus,
    since: Instant,
) -> CollectionShards {
    let lost = old.primary.expect("the old shard had a primary");
    let after = cluster
        .wait_shards(
            observer,
            name,
            Duration::from_secs(20),
            "a new primary without the old one",
            |c| {
                c.shards
                    .iter()
                    .all(|s| s.primary.is_some_and(|p| p != lost) && s.term > old.term)
            },
        )
        .await;
    println!(
        "node {lost} lost; new primary after {:?}:\n{}",
        since.elapsed(),
        show_shards(&after)
    );
    after
}

/// Creates `name` with `shards` shards and `replicas` replicas through an
/// admin client of node 1.
async fn create(cluster: &TestCluster, name: &str, shards: u32, replicas: u32) -> edgevec_client::Client {
    let admin = cluster.client(1, ADMIN).await;
    let spec = CollectionSpec::new(name, DIM as u32, Metric::L2).with_shards(shards);
    if let Err(e) = admin.create_replicated(spec, ReplicationSpec::new(replicas)).await {
        cluster.fail(format!(
            "create_replicated({name}, {shards} shards, {replicas} replicas) failed: {e}"
        ));
    }
    admin
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_through_one_node_are_read_through_every_node() {
    let cluster = TestCluster::running(fast(3, 0, "")).await;
    let name = "everywhere";
    let admin = create(&cluster, name, 2, 3).await;
    let c1 = cluster.client(1, WRITER).await;
    let mut ledger = Ledger::default();
    ledger.write_all(&cluster, &c1, name, DIM, 600, 100).await;

    // Commit notices reach backups asynchronously: wait until they agree.
    let shards = wait_converged(&cluster, &admin, name, 3, Duration::from_secs(20)).await;
    assert_eq!(shards.shards.len(), 2, "{}", show_shards(&shards));
    assert_eq!((shards.replicas, shards.min_insync), (3, 2), "{}", show_shards(&shards));
    for s in &shards.shards {
        let nodes: BTreeSet<u64> = s.replicas.iter().map(|r| r.node).collect();
        assert_eq!(
            nodes.len(),
            3,
            "replicas of a shard on distinct nodes:\n{}",
            show_shards(&shards)
        );
        assert!(
            s.problems.is_empty(),
            "no problems once converged:\n{}",
            show_shards(&shards)
        );
        let primaries: Vec<u64> = s.replicas.iter().filter(|r| r.primary).map(|r| r.node).collect();
        assert_eq!(
            primaries,
            s.primary.into_iter().collect::<Vec<_>>(),
            "{}",
            show_shards(&shards)
        );
    }
    let total: u64 = shards.shards.iter().map(|s| s.replicas[0].points.unwrap_or(0)).sum();
    assert_eq!(total, 600, "points per shard add up:\n{}", show_shards(&shards));

    let queries = random_vectors(20, DIM, 99);
    let truth: Vec<Vec<(u64, f32)>> = queries
        .iter()
        .map(|q| brute_top_k(ledger.sent.values().map(|p| (p.id, p.vector.as_slice())), q, 10))
        .collect();
    let mut first_answer: Option<Vec<Vec<u64>>> = None;
    for id in 1..=3 {
        let via = format!("node {id}");
        let c = cluster.client(id, READER).await;
        // Reads rotate among in-sync replicas: three rounds reach each one.
        for _ in 0..3 {
            let present = check_through(&cluster, &c, &via, name, &ledger).await;
            assert_eq!(present.len(), 600, "through {via}");
        }
        let hits = match c.search_batch(name, queries.clone(), 10, false).await {
            Ok(h) => h,
            Err(e) => cluster.fail(format!("search through {via} failed: {e}")),
        };
        let ids: Vec<Vec<u64>> = hits.iter().map(|h| h.iter().map(|x| x.id).collect()).collect();
        for (qi, (got, want)) in ids.iter().zip(&truth).enumerate() {
            assert_eq!(got.len(), 10, "query {qi} through {via}: {got:?}");
            let want_ids: BTreeSet<u64> = want.iter().map(|(id, _)| *id).collect();
            let kth = want.last().unwrap().1;
            // Only a near tie at the 10th place may differ from brute force.
            for id in got
                .iter()
                .copied()
                .collect::<BTreeSet<_>>()
                .symmetric_difference(&want_ids)
            {
                let d = l2(&ledger.sent[id].vector, &queries[qi]);
                assert!(
                    (d - kth).abs() <= 1e-5 * kth.max(1.0),
                    "query {qi} through {via}: top-10 {got:?} differs from brute force {want:?} at id {id} \
                     (distance {d}, 10th {kth})"
                );
            }
        }
        match &first_answer {
            None => first_answer = Some(ids),
            Some(first) => assert_eq!(&ids, first, "search through {via} differs from node 1"),
        }
    }
    let c2 = cluster.client(2, READER).await;
    check_count(&cluster, &c2, "node 2", name, 600).await;
}

/// Writes that queue on one shard while earlier ones replicate and apply
/// go out in shared batches; each must be answered once, with its own
/// outcome. No retries are allowed: a healthy cluster refuses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_to_one_shard_are_each_answered() {
    let cluster = TestCluster::running(fast(3, 0, "")).await;
    let name = "together";
    let admin = create(&cluster, name, 1, 3).await;
    let writers = Writers {
        writers: 8,
        batches: 25,
        points: 20,
        stagger: Duration::ZERO,
    };
    let ledger = writers.run(&cluster, name).await;
    writers.check(&cluster, &admin, name, &ledger).await;
}

/// Backups behind a slow link (each takes a message of ops 150 ms after
/// it arrives) that loses messages (every 7th is refused untaken): the
/// primary keeps several batches in flight rather than one round at a
/// time, sends a lost batch again while later ones are out, and every
/// write is still answered, and held alike by every replica, with none
/// of them dropped from the in-sync set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_to_backups_behind_a_slow_link_are_pipelined() {
    let mut cluster = TestCluster::with_layout(fast(3, 0, ""));
    for id in 1..=3 {
        cluster.set_env(id, "EDGEVEC_FAULT_REPLICATE_DELAY_MS", "150");
        cluster.set_env(id, "EDGEVEC_FAULT_REPLICATE_REFUSE_EVERY", "7");
    }
    cluster.start_all().await;
    let name = "slowlink";
    let admin = create(&cluster, name, 1, 3).await;
    let shards = wait_converged(&cluster, &admin, name, 3, Duration::from_secs(20)).await;
    let primary = only_shard(&shards).primary.expect("a primary");
    // Staggered, so that batches start while others replicate.
    let writers = Writers {
        writers: 6,
        batches: 5,
        points: 10,
        stagger: Duration::from_millis(25),
    };
    let ledger = writers.run(&cluster, name).await;
    let (_, m) = cluster.http_get(primary, "/metrics");
    let pipelined = metric_sum(
        &m,
        "edgevec_replica_write_batches_pipelined",
        &[&format!("collection=\"{name}\"")],
    );
    assert!(
        pipelined > 0.0,
        "no batch started while another replicated on primary {primary}:\n{}",
        m.lines()
            .filter(|l| l.contains("write_batches"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    writers.check(&cluster, &admin, name, &ledger).await;
    let log = std::fs::read_to_string(cluster.log_path(primary)).unwrap();
    assert!(
        !log.contains("removing backup from the in-sync set"),
        "a lost message cost a backup its place:\n{}",
        cluster.log_tail(primary, 40)
    );
}

/// Writers with a client each (through nodes 1, 2, 3 in turn, no
/// retries: a healthy cluster refuses nothing), each sending `batches`
/// batches of `points` new points one after another, writer `w` starting
/// after `w × stagger`.
struct Writers {
    writers: u64,
    batches: u64,
    points: u64,
    stagger: Duration,
}

impl Writers {
    /// Runs the writers; fails the test if any write failed.
    async fn run(&self, cluster: &TestCluster, name: &'static str) -> Ledger {
        let ledger = Arc::new(Mutex::new(Ledger::default()));
        let mut tasks = Vec::new();
        for w in 0..self.writers {
            let mut config = cluster.client_config(1 + w % 3, WRITER);
            config.retry_budget = Duration::ZERO;
            let client = edgevec_client::Client::connect(config).await.expect("connect");
            let (ledger, batches, points, stagger) = (ledger.clone(), self.batches, self.points, self.stagger);
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep(stagger * w as u32).await;
                let mut errors = Vec::new();
                for b in 0..batches {
                    let first = (w * batches + b) * points;
                    let ids = first..first + points;
                    let (batch, sent) = ledger.lock().unwrap().begin(DIM, ids.clone());
                    let started = Instant::now();
                    let result = client.upsert(name, sent).await.map(|_| ());
                    if let Err(e) = &result {
                        errors.push(format!("writer {w} batch {b}: {e}"));
                    }
                    ledger.lock().unwrap().finish(batch, ids, started, &result);
                }
                errors
            }));
        }
        let mut errors = Vec::new();
        for t in tasks {
            errors.extend(t.await.expect("writer task"));
        }
        if !errors.is_empty() {
            cluster.fail(format!("{} writes failed: {errors:#?}", errors.len()));
        }
        Arc::try_unwrap(ledger).expect("writers are done").into_inner().unwrap()
    }

    /// Every replica converges and every node reads back exactly what was
    /// written.
    async fn check(&self, cluster: &TestCluster, admin: &edgevec_client::Client, name: &str, ledger: &Ledger) {
        let total = (self.writers * self.batches * self.points) as usize;
        wait_converged(cluster, admin, name, 3, Duration::from_secs(20)).await;
        for id in 1..=3 {
            let c = cluster.client(id, READER).await;
            let present = check_through(cluster, &c, &format!("node {id}"), name, ledger).await;
            assert_eq!(present.len(), total);
            check_count(cluster, &c, &format!("node {id}"), name, total).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_replicas_than_data_nodes_is_refused() {
    let cluster = TestCluster::running(Layout::voters(3)).await;
    let admin = cluster.client(1, ADMIN).await;
    let spec = CollectionSpec::new("toomany", DIM as u32, Metric::L2);
    match admin.create_replicated(spec.clone(), ReplicationSpec::new(4)).await {
        Err(ClientError::InvalidArgument { message, .. }) => {
            assert!(
                message.contains("3 data node"),
                "should say how many data nodes exist: {message}"
            )
        }
        other => cluster.fail(format!(
            "4 replicas on 3 data nodes: expected InvalidArgument, got {other:?}"
        )),
    }
    match admin.create_replicated(spec.clone(), ReplicationSpec::new(0)).await {
        Err(ClientError::InvalidArgument { .. }) => {}
        other => cluster.fail(format!("0 replicas: expected InvalidArgument, got {other:?}")),
    }
    // Nothing was created by the refusals.
    let listed = admin.list_collections().await.unwrap();
    assert!(listed.iter().all(|c| c.spec.name != "toomany"), "{listed:?}");

    match admin.load("nosuch", ReplicationSpec::new(2)).await {
        Err(ClientError::NotFound(_)) => {}
        other => cluster.fail(format!(
            "load of an unknown collection: expected NotFound, got {other:?}"
        )),
    }

    // The same spec with 3 replicas works, and loading it to 4 is refused too.
    admin.create_replicated(spec, ReplicationSpec::new(3)).await.unwrap();
    match admin.load("toomany", ReplicationSpec::new(4)).await {
        Err(ClientError::InvalidArgument { message, .. }) => {
            assert!(
                message.contains("3 data node"),
                "should say how many data nodes exist: {message}"
            )
        }
        other => cluster.fail(format!(
            "load to 4 replicas on 3 data nodes: expected InvalidArgument, got {other:?}"
        )),
    }
    let shards = wait_converged(&cluster, &admin, "toomany", 3, Duration::from_secs(20)).await;
    assert_eq!(shards.replicas, 3, "{}", show_shards(&shards));
}

/// A cluster without any node of the data role (one that is forming, or
/// configured without one) answers a create with a retryable error that
/// says so, not with an invalid argument about the replica count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_before_any_data_node_joined_is_retryable() {
    let mut cluster = TestCluster::new(1);
    let no_data = cluster.config_variant("no-data.toml", |t| {
        t.replace(
            "roles = [\"meta\", \"data\", \"proxy\"]",
            "roles = [\"meta\", \"proxy\"]",
        )
    });
    cluster.start_with(1, &no_data, &[]);
    cluster
        .wait_view(1, Duration::from_secs(30), "node 1 up", |v| all_nodes_up(v, 1))
        .await;
    let admin = cluster.client(1, ADMIN).await;
    let spec = CollectionSpec::new("early", DIM as u32, Metric::L2);
    match admin.create_replicated(spec, ReplicationSpec::new(1)).await {
        Err(ClientError::Unavailable(message)) => {
            assert!(message.contains("no node with the data role"), "{message}")
        }
        other => cluster.fail(format!(
            "a create with no data node: expected Unavailable, got {other:?}"
        )),
    }
    let listed = admin.list_collections().await.unwrap();
    assert!(listed.is_empty(), "{listed:?}");
}

/// A create sent while a configured data node is still starting waits for
/// it to register (up to the forming wait) instead of being refused for
/// want of replicas: what a user meets who creates right after `up`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_while_the_cluster_forms_waits_for_its_data_nodes() {
    let mut cluster = TestCluster::with_layout(fast(3, 0, ""));
    cluster.start(1);
    cluster.start(2);
    cluster
        .wait_view(1, Duration::from_secs(30), "nodes 1 and 2 up", |v| {
            v.leader.is_some() && v.nodes.iter().filter(|n| n.state == "up").count() == 2
        })
        .await;
    let admin = cluster.client(1, ADMIN).await;
    let spec = CollectionSpec::new("forming", DIM as u32, Metric::L2);
    let create = tokio::spawn(async move { admin.create_replicated(spec, ReplicationSpec::new(3)).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!create.is_finished(), "the create did not wait for node 3");
    cluster.start(3);
    match create.await.unwrap() {
        Ok(()) => {}
        Err(e) => cluster.fail(format!("a create while node 3 starts: {e:?}")),
    }
    let admin = cluster.client(1, ADMIN).await;
    let listed = admin.list_collections().await.unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_primary_mid_stream_loses_no_acknowledged_write() {
    let mut cluster = TestCluster::running(fast(3, 0, "")).await;
    let name = "killprimary";
    let admin = create(&cluster, name, 1, 3).await;
    let before = wait_converged(&cluster, &admin, name, 3, Duration::from_secs(20)).await;
    assert_eq!(before.min_insync, 2, "{}", show_shards(&before));

    let writer = Writer::spawn(
        cluster.client_any(WRITER).await,
        name,
        DIM,
        Ledger::default(),
        50,
        Duration::from_millis(5),
        5_000,
        Duration::from_secs(40),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while writer.snapshot().acked.len() < 200 || writer.snapshot().batches.len() < 10 {
        assert!(
            Instant::now() < deadline,
            "the writer got nothing acknowledged: {:?}",
            writer.snapshot().batches
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await; // ~1 s of writes before the kill

    let now = match admin.shards(Some(name)).await {
        Ok(list) => list.into_iter().next().unwrap(),
        Err(e) => cluster.fail(format!("shards() failed: {e}")),
    };
    let old = only_shard(&now).clone();
    let victim = old.primary.expect("a primary");
    cluster.kill9(victim);
    let killed = Instant::now();
    println!(
        "killed primary node {victim} (term {}) at {} acks",
        old.term,
        writer.snapshot().acked.len()
    );

    let observer = cluster.client_excluding(&[victim], ADMIN).await;
    let after = cluster
        .wait_shards(
            &observer,
            name,
            Duration::from_secs(15),
            "a new primary in a higher term",
            |c| {
                c.shards
                    .iter()
                    .all(|s| s.primary.is_some_and(|p| p != victim) && s.term > old.term)
            },
        )
        .await;
    println!("new primary after {:?}:\n{}", killed.elapsed(), show_shards(&after));
    let left = Duration::from_secs(4).saturating_sub(killed.elapsed());
    tokio::time::sleep(left).await; // the writer goes on ~4 s after the kill
    let ledger = writer.stop(Duration::from_secs(40)).await;
    let failed = ledger.failed();
    println!(
        "{} batches, {} acknowledged ids, {} failed batches: {:?}",
        ledger.batches.len(),
        ledger.acked.len(),
        failed.len(),
        failed
            .iter()
            .map(|b| (b.batch, b.took, b.error.clone()))
            .collect::<Vec<_>>()
    );
    let resumed = ledger.batches.iter().any(|b| b.started > killed && b.error.is_none());
    if !resumed {
        cluster.fail(format!(
            "no batch started after the kill was acknowledged; batches after the kill: {:?}",
            ledger.batches.iter().filter(|b| b.started > killed).collect::<Vec<_>>()
        ));
    }

    // The two survivors agree; then every acknowledged write is on both.
    let live: Vec<u64> = (1..=3).filter(|id| *id != victim).collect();
    let settled = cluster
        .wait_shards(
            &observer,
            name,
            Duration::from_secs(20),
            "survivors in-sync and agreeing",
            |c| {
                c.shards.iter().all(|s| {
                    let rs: Vec<&ReplicaStatus> = s
                        .replicas
                        .iter()
                        .filter(|r| live.contains(&r.node) && r.state == "in-sync")
                        .collect();
                    s.primary.is_some_and(|p| p != victim) && rs.len() == 2 && replicas_agree(rs.into_iter())
                })
            },
        )
        .await;
    let new = only_shard(&settled);
    assert!(
        new.term > old.term,
        "term must grow: {} then\n{}",
        old.term,
        show_shards(&settled)
    );
    let mut present = None;
    for id in &live {
        let via = format!("node {id}");
        let c = cluster.client(*id, READER).await;
        for _ in 0..2 {
            let p = check_through(&cluster, &c, &via, name, &ledger).await;
            if present.as_ref().is_some_and(|q| *q != p) {
                cluster.fail(format!("{via} shows other ids than node {}", live[0]));
            }
            present = Some(p);
        }
        check_count(&cluster, &c, &via, name, present.as_ref().unwrap().len()).await;
        check_never_sent(&cluster, &c, &via, name, &ledger).await;
    }

    // The killed node comes back as a backup and catches up by itself.
    cluster.start(victim);
    wait_converged(&cluster, &observer, name, 3, Duration::from_secs(30)).await;
    let c = cluster.client(victim, READER).await;
    for _ in 0..3 {
        let p = check_through(&cluster, &c, &format!("restarted node {victim}"), name, &ledger).await;
        assert_eq!(Some(&p), present.as_ref(), "restarted node {victim} reads other ids");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_backup_catches_up_and_holds_exactly_the_primarys_data() {
    caught_up_through_export("", false).await;
}

/// With an op log that keeps only a few KiB and holds nothing more for
/// replicas that are away, a backup that was away is behind the trimmed
/// log: the primary exports the shard, streams it, the backup imports it
/// and goes on from the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_behind_the_trimmed_log_is_rebuilt_from_an_export() {
    caught_up_through_export("oplog_retain_kb = 16\noplog_hold_kb = 0\n", true).await;
}

/// The same small op log, with the default hold: the primary keeps the
/// ops the backup misses while it is away, and it catches up from them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_held_for_an_away_backup_spares_it_an_export() {
    caught_up_through_export("oplog_retain_kb = 16\n", false).await;
}

/// Runs [`restarted_backup_catches_up`] with `extra` in the cluster
/// section and checks whether the backup needed an export.
async fn caught_up_through_export(extra: &str, export: bool) {
    let (cluster, backup) = restarted_backup_catches_up(extra).await;
    let log = std::fs::read_to_string(cluster.log_path(backup)).unwrap();
    assert_eq!(
        log.contains("rebuilt from the primary's export"),
        export,
        "node {backup} with {extra:?}: export expected {export}; its log ends:\n{}",
        cluster.log_tail(backup, 40)
    );
}

/// With the same small log and no hold, a backup that held sealed
/// segments when it was killed: the primary's export leaves their rows
/// out, the backup takes them from its own file, and it ends holding
/// exactly the acknowledged points.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_to_a_returning_backup_leaves_out_the_segments_it_holds() {
    export_to_returning_backup(true).await;
}

/// The same with a backup that offers none of its segments (as a node of
/// the version before, which does not know the request): it gets, and
/// imports, the whole shard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_that_offers_no_segments_gets_a_whole_export() {
    export_to_returning_backup(false).await;
}

/// Kills a backup that holds five sealed segments, writes 1,000 points
/// past the op log's retention, restarts it with its segments offered to
/// the export or not (`offer`), and checks it ends in sync holding the
/// acknowledged points, through one export that reused its 1,000 rows or
/// none.
async fn export_to_returning_backup(offer: bool) {
    let mut cluster = TestCluster::running(fast(3, 0, "oplog_retain_kb = 16\noplog_hold_kb = 0\n")).await;
    let name = "reuse";
    let admin = cluster.client(1, ADMIN).await;
    let spec = CollectionSpec::new(name, DIM as u32, Metric::L2).with_seal_rows(200);
    if let Err(e) = admin.create_replicated(spec, ReplicationSpec::new(3)).await {
        cluster.fail(format!("create_replicated({name}) failed: {e}"));
    }
    let mut ledger = Ledger::default();
    // Five sealed segments of 200 rows on every replica.
    let (backup, others, observer) = kill_a_backup_after(&mut cluster, &admin, name, &mut ledger, 1_000).await;
    ledger.write_all(&cluster, &others, name, DIM, 1_000, 100).await;
    if !offer {
        cluster.set_env(backup, "EDGEVEC_FAULT_NO_SEGMENT_DIGESTS", "1");
    }
    cluster.start(backup);
    wait_back_in_sync(&cluster, &observer, name, backup).await;
    let settled = wait_converged(&cluster, &observer, name, 3, Duration::from_secs(20)).await;
    assert_eq!(
        only_shard(&settled).replicas[0].points,
        Some(2_000),
        "every replica holds the acknowledged points:\n{}",
        show_shards(&settled)
    );
    let c = cluster.client(backup, READER).await;
    let via = format!("restarted node {backup}");
    let present = check_through(&cluster, &c, &via, name, &ledger).await;
    assert_eq!(present.len(), 2_000);
    check_count(&cluster, &c, &via, name, 2_000).await;

    let log = std::fs::read_to_string(cluster.log_path(backup)).unwrap();
    let reused: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("replica imported from an export"))
        .filter_map(|l| l.split("reused_rows=").nth(1)?.split_whitespace().next())
        .collect();
    let want = if offer { "1000" } else { "0" };
    assert_eq!(
        reused,
        [want],
        "node {backup} imports one export reusing {want} rows; its log ends:\n{}",
        cluster.log_tail(backup, 40)
    );
}

/// Waits (30 s at most) until `backup` is one of the 3 in-sync replicas
/// of the collection's one shard.
async fn wait_back_in_sync(cluster: &TestCluster, observer: &edgevec_client::Client, name: &str, backup: u64) {
    cluster
        .wait_shards(
            observer,
            name,
            Duration::from_secs(30),
            "the restarted backup in-sync",
            |c| all_in_sync(c, 3) && c.shards[0].replicas.iter().any(|r| r.node == backup),
        )
        .await;
}

/// Writes `count` points in batches of 100, waits until every replica of
/// the collection's one shard holds them, then kills -9 a backup; returns
/// it, and a writer and an admin client of the other nodes.
async fn kill_a_backup_after(
    cluster: &mut TestCluster,
    admin: &edgevec_client::Client,
    name: &str,
    ledger: &mut Ledger,
    count: u64,
) -> (u64, edgevec_client::Client, edgevec_client::Client) {
    let c = cluster.client_any(WRITER).await;
    ledger.write_all(cluster, &c, name, DIM, count, 100).await;
    let shards = wait_converged(cluster, admin, name, 3, Duration::from_secs(20)).await;
    let backup = a_backup(&shards);
    cluster.kill9(backup);
    let writer = cluster.client_excluding(&[backup], WRITER).await;
    let observer = cluster.client_excluding(&[backup], ADMIN).await;
    (backup, writer, observer)
}

/// Kills a backup, writes 2,000 points without it, restarts it under a
/// running writer, and checks it reaches in-sync holding exactly the
/// acknowledged points. Returns the cluster and the backup's id.
async fn restarted_backup_catches_up(extra: &str) -> (TestCluster, u64) {
    let mut cluster = TestCluster::running(fast(3, 0, extra)).await;
    let name = "backup";
    let admin = create(&cluster, name, 1, 3).await;
    let mut ledger = Ledger::default();
    let (backup, others, observer) = kill_a_backup_after(&mut cluster, &admin, name, &mut ledger, 500).await;
    let started = Instant::now();
    ledger.write_all(&cluster, &others, name, DIM, 2_000, 100).await;
    println!("2,000 points with backup {backup} dead in {:?}", started.elapsed());

    // Back, while writes go on; it must reach in-sync under load.
    cluster.start(backup);
    let writer = Writer::spawn(
        others.clone(),
        name,
        DIM,
        ledger,
        50,
        Duration::from_millis(10),
        3_000,
        Duration::from_secs(45),
    );
    wait_back_in_sync(&cluster, &observer, name, backup).await;
    let ledger = writer.stop(Duration::from_secs(30)).await;
    let failed = ledger.failed();
    if !failed.is_empty() {
        cluster.fail(format!("writes failed while the backup caught up: {failed:?}"));
    }
    let settled = wait_converged(&cluster, &observer, name, 3, Duration::from_secs(20)).await;
    let s = only_shard(&settled);
    let points = s.replicas[0].points.unwrap();
    assert_eq!(
        points,
        ledger.acked.len() as u64,
        "every replica holds exactly the acknowledged points:\n{}",
        show_shards(&settled)
    );

    let c = cluster.client(backup, READER).await;
    for round in 0..4 {
        let p = check_through(
            &cluster,
            &c,
            &format!("restarted node {backup} round {round}"),
            name,
            &ledger,
        )
        .await;
        assert_eq!(p.len(), ledger.acked.len());
        check_count(&cluster, &c, &format!("restarted node {backup}"), name, p.len()).await;
    }
    (cluster, backup)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_one_to_three_to_two_while_serving() {
    let cluster = TestCluster::running(fast(3, 0, "")).await;
    let name = "load";
    let admin = create(&cluster, name, 2, 1).await;
    wait_converged(&cluster, &admin, name, 1, Duration::from_secs(20)).await;

    let writer = Writer::spawn(
        cluster.client_any(WRITER).await,
        name,
        DIM,
        Ledger::default(),
        50,
        Duration::from_millis(20),
        5_000,
        Duration::from_secs(50),
    );

    // The reader: gets and searches of ids acknowledged at least `SETTLE`
    // ago (a backup learns the commit point with the next op or
    // heartbeat). Any error is a failed read; a missing or wrong point is
    // a stale read.
    const SETTLE: Duration = Duration::from_secs(2);
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let failures: Arc<Mutex<Vec<String>>> = Arc::default();
    let reader = {
        let (stop, reads, failures) = (stop.clone(), reads.clone(), failures.clone());
        let ledger = writer.ledger.clone();
        let client = cluster.client_any(READER).await;
        tokio::spawn(async move {
            let until = Instant::now() + Duration::from_secs(50);
            for i in 0u64..20_000 {
                if stop.load(Ordering::SeqCst) || Instant::now() >= until {
                    break;
                }
                let old: Vec<u64> = {
                    let l = ledger.lock().unwrap();
                    let now = Instant::now();
                    l.acked
                        .iter()
                        .filter(|(_, at)| now.duration_since(**at) >= SETTLE)
                        .map(|(id, _)| *id)
                        .collect()
                };
                if old.is_empty() {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                // The newest 10 settled ids and 10 spread over the rest.
                let mut ids: Vec<u64> = old.iter().rev().take(10).copied().collect();
                let step = (old.len() / 10).max(1);
                ids.extend(old.iter().step_by(step).take(10));
                ids.sort_unstable();
                ids.dedup();
                match client.get(name, &ids).await {
                    Err(e) => failures.lock().unwrap().push(format!("read {i}: get failed: {e}")),
                    Ok(got) => {
                        let found: BTreeSet<u64> = got
                            .iter()
                            .filter(|r| r.vector == vector_of(r.id, DIM))
                            .map(|r| r.id)
                            .collect();
                        let missing: Vec<u64> = ids.iter().filter(|id| !found.contains(id)).copied().collect();
                        if !missing.is_empty() {
                            failures
                                .lock()
                                .unwrap()
                                .push(format!("read {i}: get missed settled ids {missing:?}"));
                        }
                    }
                }
                let probe = ids[(i as usize) % ids.len()];
                match client.search(name, &vector_of(probe, DIM), 3).await {
                    Err(e) => failures.lock().unwrap().push(format!("read {i}: search failed: {e}")),
                    Ok(hits) if hits.first().map(|h| h.id) != Some(probe) => failures
                        .lock()
                        .unwrap()
                        .push(format!("read {i}: search for point {probe}'s vector found {hits:?}")),
                    Ok(_) => {}
                }
                reads.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    let wait_reads = |at_least: u64, what: &'static str| {
        let reads = reads.clone();
        let cluster = &cluster;
        async move {
            let deadline = Instant::now() + Duration::from_secs(20);
            while reads.load(Ordering::SeqCst) < at_least {
                if Instant::now() >= deadline {
                    cluster.fail(format!("{what}: only {} reads done", reads.load(Ordering::SeqCst)));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    wait_reads(10, "reads before load to 3").await;

    if let Err(e) = admin.load(name, ReplicationSpec::new(3)).await {
        cluster.fail(format!("load to 3 failed: {e}"));
    }
    let three = cluster
        .wait_shards(
            &admin,
            name,
            Duration::from_secs(30),
            "3 in-sync replicas per shard",
            |c| c.replicas == 3 && all_in_sync(c, 3),
        )
        .await;
    println!("3 replicas:\n{}", show_shards(&three));
    let n = reads.load(Ordering::SeqCst);
    wait_reads(n + 10, "reads with 3 replicas").await;

    if let Err(e) = admin.load(name, ReplicationSpec::new(2)).await {
        cluster.fail(format!("load to 2 failed: {e}"));
    }
    let two = cluster
        .wait_shards(
            &admin,
            name,
            Duration::from_secs(30),
            "exactly 2 in-sync replicas per shard",
            |c| c.replicas == 2 && all_in_sync(c, 2),
        )
        .await;
    println!("2 replicas:\n{}", show_shards(&two));
    let n = reads.load(Ordering::SeqCst);
    wait_reads(n + 10, "reads with 2 replicas").await;
    let acked_before_stop = writer.snapshot().acked.len();

    stop.store(true, Ordering::SeqCst);
    if tokio::time::timeout(Duration::from_secs(30), reader).await.is_err() {
        cluster.fail("the reader did not stop within 30 s");
    }
    let ledger = writer.stop(Duration::from_secs(30)).await;
    let failures = failures.lock().unwrap().clone();
    println!(
        "{} reads, {} write batches ({} failed), {} acknowledged ids",
        reads.load(Ordering::SeqCst),
        ledger.batches.len(),
        ledger.failed().len(),
        ledger.acked.len()
    );
    if !failures.is_empty() {
        cluster.fail(format!(
            "{} failed reads while loading (first 20): {:#?}",
            failures.len(),
            &failures[..failures.len().min(20)]
        ));
    }
    if !ledger.failed().is_empty() {
        cluster.fail(format!("write batches failed while loading: {:?}", ledger.failed()));
    }
    assert!(acked_before_stop > 0);

    let settled = wait_converged(&cluster, &admin, name, 2, Duration::from_secs(20)).await;
    for id in 1..=3 {
        let via = format!("node {id}");
        let c = cluster.client(id, READER).await;
        for _ in 0..2 {
            let p = check_through(&cluster, &c, &via, name, &ledger).await;
            assert_eq!(p.len(), ledger.acked.len(), "through {via}:\n{}", show_shards(&settled));
        }
        check_count(&cluster, &c, &via, name, ledger.acked.len()).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_node_has_its_replicas_recreated() {
    let mut cluster = TestCluster::running(fast(3, 1, "dead_after_ms = 3000\n")).await;
    let name = "recreate";
    let admin = create(&cluster, name, 1, 3).await;
    let c = cluster.client_any(WRITER).await;
    let mut ledger = Ledger::default();
    ledger.write_all(&cluster, &c, name, DIM, 500, 100).await;
    let shards = wait_converged(&cluster, &admin, name, 3, Duration::from_secs(20)).await;
    let s = only_shard(&shards);
    let primary = s.primary.unwrap();
    let holders: Vec<u64> = s.replicas.iter().map(|r| r.node).collect();
    // A voter that holds a backup; we keep talking through the others.
    let victim = holders
        .iter()
        .copied()
        .find(|n| *n != primary && *n <= 3)
        .unwrap_or_else(|| cluster.fail(format!("no voter holds a backup:\n{}", show_shards(&shards))));
    let spare = (1..=4).find(|n| !holders.contains(n)).unwrap();
    println!("replicas on {holders:?}, primary {primary}; killing {victim}, spare {spare}");

    cluster.kill9(victim);
    let killed = Instant::now();
    let others = cluster.client_excluding(&[victim], ADMIN).await;
    ledger.write_all(&cluster, &others, name, DIM, 200, 50).await;

    let after = cluster
        .wait_shards(
            &others,
            name,
            Duration::from_secs(30),
            "3 in-sync agreeing replicas again, none on the dead node",
            |c| converged(c, 3) && c.shards[0].replicas.iter().all(|r| r.node != victim),
        )
        .await;
    println!("re-created after {:?}:\n{}", killed.elapsed(), show_shards(&after));
    let s = only_shard(&after);
    assert!(
        s.replicas.iter().any(|r| r.node == spare),
        "the spare node {spare} holds a replica:\n{}",
        show_shards(&after)
    );
    assert_eq!(s.replicas[0].points, Some(700), "{}", show_shards(&after));

    let c = cluster.client(spare, READER).await;
    for round in 0..3 {
        let p = check_through(&cluster, &c, &format!("node {spare} round {round}"), name, &ledger).await;
        assert_eq!(p.len(), 700);
    }
    check_count(&cluster, &c, &format!("node {spare}"), name, 700).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_primary_cannot_get_a_write_acknowledged() {
    let cluster = TestCluster::running(fast(3, 0, "")).await;
    let name = "paused";
    let (_admin, mut ledger, old) = one_shard_with_data(&cluster, name).await;
    let paused = old.primary.unwrap();
    let others = cluster.client_excluding(&[paused], WRITER).await;
    let observer = cluster.client_excluding(&[paused], ADMIN).await;

    cluster.pause(paused);
    let after = wait_primary_replaced(&cluster, &observer, name, &old, Instant::now()).await;
    ledger.write_all(&cluster, &others, name, DIM, 300, 100).await;

    // The old primary wakes up believing it leads; a client that knows
    // only that node writes through it at once.
    cluster.resume(paused);
    let mut config = cluster.client_config(paused, WRITER);
    config.connect_timeout = Duration::from_secs(1);
    config.request_timeout = Duration::from_secs(5);
    config.retry_budget = Duration::from_secs(3);
    let mut through_old = Ledger::default();
    let first = ledger.next_id();
    for b in 0..10u64 {
        let start = first + b * 20;
        let ids = start..start + 20;
        match tokio::time::timeout(Duration::from_secs(10), edgevec_client::Client::connect(config.clone())).await {
            Ok(Ok(old_client)) => {
                let r = tokio::time::timeout(
                    Duration::from_secs(15),
                    through_old.upsert(&old_client, name, DIM, ids.clone()),
                )
                .await;
                if r.is_err() {
                    cluster.fail(format!("a write through the woken node {paused} hung for 15 s"));
                }
            }
            Ok(Err(e)) => println!("batch {b}: cannot connect to node {paused}: {e}"),
            Err(_) => println!("batch {b}: connecting to node {paused} hung 10 s"),
        }
    }
    println!(
        "through the woken node {paused}: {} of {} batches acknowledged; errors: {:?}",
        through_old.batches.iter().filter(|b| b.error.is_none()).count(),
        through_old.batches.len(),
        through_old.failed().iter().map(|b| b.error.clone()).collect::<Vec<_>>()
    );
    ledger.absorb(through_old);

    // It rejoins as a backup; then nothing acknowledged is missing anywhere.
    let settled = wait_converged(&cluster, &observer, name, 3, Duration::from_secs(30)).await;
    let s = only_shard(&settled);
    assert!(
        s.primary != Some(paused) || s.term > after.shards[0].term,
        "the woken node cannot simply resume its old term:\n{}",
        show_shards(&settled)
    );
    let mut present: Option<BTreeSet<u64>> = None;
    for id in 1..=3 {
        let via = format!("node {id}");
        let c = cluster.client(id, READER).await;
        for _ in 0..3 {
            let p = check_through(&cluster, &c, &via, name, &ledger).await;
            if present.as_ref().is_some_and(|q| *q != p) {
                cluster.fail(format!("{via} reads other ids than another node"));
            }
            present = Some(p);
        }
        check_count(&cluster, &c, &via, name, present.as_ref().unwrap().len()).await;
        check_never_sent(&cluster, &c, &via, name, &ledger).await;
    }
}

/// A primary cut off from the other nodes by a network partition, while a
/// client can still reach it, cannot get a write acknowledged once the
/// others chose a new primary; when the partition heals it rejoins as a
/// backup and what it took alone is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_primary_cannot_get_a_write_acknowledged() {
    let cluster = TestCluster::running(fast(3, 0, "fault_injection = true\n")).await;
    let name = "partitioned";
    let (_admin, mut ledger, old) = one_shard_with_data(&cluster, name).await;
    let cut = old.primary.unwrap();
    let others = cluster.client_excluding(&[cut], WRITER).await;
    let observer = cluster.client_excluding(&[cut], ADMIN).await;
    let mut config = cluster.client_config(cut, WRITER);
    config.request_timeout = Duration::from_secs(5);
    config.retry_budget = Duration::from_secs(3);
    let through_cut = edgevec_client::Client::connect(config).await.unwrap();

    cluster.partition(&[cut]);
    wait_primary_replaced(&cluster, &observer, name, &old, Instant::now()).await;

    // The majority side takes writes; the cut-off node, which still
    // believes it leads, acknowledges none.
    ledger.write_all(&cluster, &others, name, DIM, 300, 100).await;
    let mut alone = Ledger::default();
    let first = ledger.next_id() + 10_000;
    for b in 0..3u64 {
        let start = first + b * 20;
        let r = tokio::time::timeout(
            Duration::from_secs(20),
            alone.upsert(&through_cut, name, DIM, start..start + 20),
        )
        .await;
        match r {
            Err(_) => cluster.fail(format!("a write through the cut-off node {cut} hung for 20 s")),
            Ok(Ok(())) => cluster.fail(format!(
                "node {cut}, cut off from every other node, acknowledged ids {}..{}",
                start,
                start + 20
            )),
            Ok(Err(e)) => println!("batch {b} through node {cut}: {e}"),
        }
    }
    ledger.write_all(&cluster, &others, name, DIM, 200, 100).await;

    cluster.heal();
    let settled = wait_converged(&cluster, &observer, name, 3, Duration::from_secs(30)).await;
    println!("healed:\n{}", show_shards(&settled));
    let refused: Vec<u64> = alone.batches.iter().flat_map(|b| b.ids.clone()).collect();
    for id in 1..=3 {
        let via = format!("node {id}");
        let c = cluster.client(id, READER).await;
        let p = check_through(&cluster, &c, &via, name, &ledger).await;
        assert_eq!(p.len(), ledger.acked.len(), "through {via}");
        check_count(&cluster, &c, &via, name, ledger.acked.len()).await;
        check_never_sent(&cluster, &c, &via, name, &ledger).await;
        match c.get(name, &refused).await {
            Ok(found) if found.is_empty() => {}
            Ok(found) => cluster.fail(format!(
                "{via} reads ids the cut-off primary took alone: {:?}",
                found.iter().map(|p| p.id).collect::<Vec<_>>()
            )),
            Err(e) => cluster.fail(format!("get through {via} failed: {e}")),
        }
    }
}

/// An export transfer cut in the middle (the receiving node killed while
/// chunks arrive) restarts when the node is back: the replica is never
/// left half-imported, and joins the in-sync set only holding exactly the
/// primary's data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_cut_in_the_middle_starts_over_and_never_leaves_half_a_replica() {
    const WIDE: usize = 256;
    let mut cluster = TestCluster::running(fast(3, 0, "oplog_retain_kb = 64\noplog_hold_kb = 0\n")).await;
    let name = "cut";
    let admin = cluster.client(1, ADMIN).await;
    let spec = CollectionSpec::new(name, WIDE as u32, Metric::L2);
    if let Err(e) = admin.create_replicated(spec, ReplicationSpec::new(3)).await {
        cluster.fail(format!("create failed: {e}"));
    }
    let shards = wait_converged(&cluster, &admin, name, 3, Duration::from_secs(20)).await;
    let backup = a_backup(&shards);
    cluster.kill9(backup);
    // About 24 MB of vectors: an export of several 4 MiB chunks.
    let writer = cluster.client_excluding(&[backup], WRITER).await;
    let observer = cluster.client_excluding(&[backup], ADMIN).await;
    let mut ledger = Ledger::default();
    ledger.write_all(&cluster, &writer, name, WIDE, 24_000, 500).await;

    // Back; cut it off as soon as the export is on its way.
    cluster.start(backup);
    let cut = cluster
        .wait_shards(&observer, name, Duration::from_secs(60), "an export on its way", |c| {
            c.shards[0]
                .replicas
                .iter()
                .any(|r| r.node == backup && r.catch_up.as_deref().is_some_and(|p| p.contains("export")))
        })
        .await;
    cluster.kill9(backup);
    let r = cut.shards[0].replicas.iter().find(|r| r.node == backup).unwrap();
    assert_ne!(
        r.state,
        "in-sync",
        "a replica receiving an export is not in sync:\n{}",
        show_shards(&cut)
    );

    // Back again: the transfer starts over and completes.
    cluster.start(backup);
    let settled = wait_converged(&cluster, &observer, name, 3, Duration::from_secs(90)).await;
    let points = only_shard(&settled).replicas[0].points.unwrap();
    assert_eq!(points, ledger.acked.len() as u64, "{}", show_shards(&settled));
    let log = std::fs::read_to_string(cluster.log_path(backup)).unwrap();
    assert!(
        log.contains("rebuilt from the primary's export"),
        "node {backup} caught up without an export:\n{}",
        cluster.log_tail(backup, 40)
    );
    let c = cluster.client(backup, READER).await;
    for round in 0..3 {
        let p = check_through(&cluster, &c, &format!("node {backup} round {round}"), name, &ledger).await;
        assert_eq!(p.len(), ledger.acked.len());
    }
}

/// A small filesystem of its own (tmpfs, mounted by the test; the tests
/// run as root), unmounted when dropped.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn new(mb: u64) -> SmallDisk {
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mb}m"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("mount runs");
        assert!(
            out.status.success(),
            "cannot mount a {mb} MB tmpfs (the test needs root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        SmallDisk { dir }
    }
}

impl SmallDisk {
    /// Gives the filesystem more room (tmpfs resizes in place).
    fn grow(&self, mb: u64) {
        let out = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={mb}m")])
            .arg(self.dir.path())
            .output()
            .expect("mount runs");
        assert!(
            out.status.success(),
            "remount failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(self.dir.path()).status();
    }
}

/// A running 3-node cluster whose node 3 keeps its whole data directory
/// (metadata and replicas) on a disk of `mb` MB. Destructure the disk
/// first, so it is dropped after the cluster's processes.
async fn node_3_on_a_small_disk(mb: u64) -> (SmallDisk, TestCluster) {
    let disk = SmallDisk::new(mb);
    let mut cluster = TestCluster::with_layout(fast(3, 0, ""));
    std::fs::create_dir_all(cluster.path("data")).unwrap();
    std::os::unix::fs::symlink(disk.dir.path(), cluster.path("data/node3")).unwrap();
    for id in 1..=3 {
        cluster.start(id);
    }
    cluster
        .wait_view(1, Duration::from_secs(30), "all nodes up", |v| all_nodes_up(v, 3))
        .await;
    (disk, cluster)
}

/// A backup whose disk fills up leaves the in-sync set; writes go on
/// through the other replicas and nothing acknowledged is lost. Once there
/// is room again, its damaged replica is rebuilt from the primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_with_a_full_disk_leaves_the_in_sync_set_and_nothing_is_lost() {
    const WIDE: usize = 256;
    // Declared first, dropped last: after the cluster's processes.
    let (disk, mut cluster) = node_3_on_a_small_disk(40).await;
    let name = "full";
    let admin = cluster.client(1, ADMIN).await;
    let spec = CollectionSpec::new(name, WIDE as u32, Metric::L2);
    if let Err(e) = admin.create_replicated(spec, ReplicationSpec::new(3)).await {
        cluster.fail(format!("create failed: {e}"));
    }
    wait_converged(&cluster, &admin, name, 3, Duration::from_secs(20)).await;

    // About 60 MB of vectors: more than node 3's disk holds.
    let writer = cluster.client_excluding(&[3], WRITER).await;
    let mut ledger = Ledger::default();
    for _ in 0..120 {
        let start = ledger.next_id();
        if let Err(e) = ledger.upsert(&writer, name, WIDE, start..start + 500).await {
            // A write may be refused while the shard sheds the full
            // replica; it must say so and be retryable.
            assert!(e.is_retryable(), "a write failed for good: {e}");
        }
    }
    let failed = ledger.failed().len();
    assert!(
        ledger.acked.len() >= 50_000,
        "too few writes went through ({failed} batches failed)"
    );

    // Node 3 is out of the in-sync set (its replica damaged, or the node
    // itself out of service); the others hold every acknowledged write.
    let observer = cluster.client_excluding(&[3], ADMIN).await;
    let settled = cluster
        .wait_shards(
            &observer,
            name,
            Duration::from_secs(30),
            "node 3 out of the in-sync set",
            |c| {
                let s = &c.shards[0];
                s.replicas.iter().any(|r| r.node == 3 && r.state != "in-sync")
                    && s.replicas.iter().filter(|r| r.state == "in-sync").count() == 2
            },
        )
        .await;
    println!("{}", show_shards(&settled));
    for id in [1, 2] {
        let c = cluster.client_of(&[id], READER).await;
        let p = check_through(&cluster, &c, &format!("node {id}"), name, &ledger).await;
        assert!(p.len() >= ledger.acked.len());
    }

    // Space comes back: the damaged replica is rebuilt from the primary's
    // export without anyone acting, and rejoins holding exactly its data.
    // Node 3's metadata log shares the disk: if its Raft stopped on the
    // full disk, the node exited, and is started again as `up` would.
    // A node whose Raft stopped may still be shutting down (it gives a
    // running index build a moment): wait until it has exited or serves.
    disk.grow(400);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = cluster.exited(3) {
            println!("node 3 exited while its disk was full ({status}); starting it again");
            cluster.start(3);
            break;
        }
        let ready = cluster
            .try_http(3, "GET", "/readyz", "")
            .is_ok_and(|(code, _)| code == 200);
        if ready || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let healed = wait_converged(&cluster, &observer, name, 3, Duration::from_secs(120)).await;
    println!("{}", show_shards(&healed));
    let c = cluster.client(3, READER).await;
    for round in 0..3 {
        let p = check_through(&cluster, &c, &format!("node 3 round {round}"), name, &ledger).await;
        assert!(p.len() >= ledger.acked.len());
    }
}

/// Damages `path`: with `truncate`, cuts it in half; else overwrites one
/// 4 KiB page in four, past the first, with pseudo-random bytes.
fn damage(path: &std::path::Path, truncate: bool) {
    use std::io::{Seek, SeekFrom, Write};
    let len = std::fs::metadata(path).unwrap().len();
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    if truncate {
        f.set_len(len / 2).unwrap();
    } else {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for page in (4096..len).step_by(16_384) {
            let noise: Vec<u8> = (0..4096)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            f.seek(SeekFrom::Start(page)).unwrap();
            f.write_all(&noise).unwrap();
        }
    }
    f.sync_all().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_shard_file_is_set_aside_and_the_replica_rebuilt_while_the_node_serves() {
    let mut cluster = TestCluster::running(fast(3, 0, "")).await;
    // "trio" has a copy on every node; "solo" has one copy, on node `n`.
    let admin = create(&cluster, "trio", 1, 3).await;
    let c = cluster.client_any(WRITER).await;
    let mut trio = Ledger::default();
    trio.write_all(&cluster, &c, "trio", DIM, 3_000, 500).await;
    create(&cluster, "solo", 1, 1).await;
    Ledger::default().write_all(&cluster, &c, "solo", DIM, 500, 500).await;
    let trio_shards = wait_converged(&cluster, &admin, "trio", 3, Duration::from_secs(20)).await;
    let solo_shards = wait_converged(&cluster, &admin, "solo", 1, Duration::from_secs(20)).await;
    let n = only_shard(&solo_shards).primary.unwrap();

    // Node n stops; both its shard files get garbage in the middle.
    assert!(cluster.stop(n).unwrap().success());
    let engine = cluster.path(&format!("data/node{n}/engine"));
    let mut scrambled = Vec::new();
    for (id, truncate) in [(trio_shards.id, true), (solo_shards.id, false)] {
        let file = engine.join(format!("replicas/{id}-0/shard.redb"));
        damage(&file, truncate);
        scrambled.push(std::fs::read(&file).unwrap());
    }
    // Paired with what damaged/ keeps by size (one file is truncated): the
    // contents may differ in header bytes, which would reorder a sort by
    // contents.
    scrambled.sort_by_key(Vec::len);
    cluster.start(n);

    // The node serves: "trio" is rebuilt from a healthy replica without
    // anyone acting, and reads through node n find every acknowledged point.
    let observer = cluster.client(n, ADMIN).await;
    let healed = wait_converged(&cluster, &observer, "trio", 3, Duration::from_secs(60)).await;
    println!("{}", show_shards(&healed));
    let via_n = cluster.client_of(&[n], READER).await;
    for round in 0..3 {
        let p = check_through(&cluster, &via_n, &format!("node {n} round {round}"), "trio", &trio).await;
        assert_eq!(p.len(), trio.acked.len());
    }

    // "solo" has no healthy copy: it is reported, never served empty, and
    // its files are kept aside as they were.
    let solo_file = format!("replicas/{}-0/shard.redb", solo_shards.id);
    for _ in 0..2 {
        let shards = cluster
            .wait_shards(
                &observer,
                "solo",
                Duration::from_secs(20),
                "solo reported damaged",
                |c| {
                    c.shards[0]
                        .problems
                        .iter()
                        .any(|p| p.contains("damaged") && p.contains(&solo_file))
                },
            )
            .await;
        println!("{}", show_shards(&shards));
        match via_n.get("solo", &[0, 1, 2]).await {
            Err(e) => assert!(e.to_string().contains("damaged"), "{e}"),
            Ok(found) => cluster.fail(format!("a damaged replica answered a get: {found:?}")),
        }
        let (code, body) = cluster.http_get(n, "/readyz");
        assert_eq!(code, 503, "{body}");
        assert!(
            body.contains(&solo_file) && !body.contains(&format!("{}-0", trio_shards.id)),
            "{body}"
        );
        // The other collection still answers through node n.
        check_through(&cluster, &via_n, &format!("node {n}"), "trio", &trio).await;
        // What was damaged is kept, byte for byte, under damaged/.
        let mut kept: Vec<Vec<u8>> = std::fs::read_dir(engine.join("damaged"))
            .unwrap()
            .map(|e| std::fs::read(e.unwrap().path().join("shard.redb")).unwrap())
            .collect();
        kept.sort_by_key(Vec::len);
        // As found, but for what the storage library's failed recovery
        // attempt may have written into its header pages.
        let sizes = |v: &[Vec<u8>]| v.iter().map(Vec::len).collect::<Vec<_>>();
        let changed: Vec<usize> = kept
            .iter()
            .zip(&scrambled)
            .map(|(k, d)| k.iter().zip(d).filter(|(a, b)| a != b).count())
            .collect();
        assert!(
            sizes(&kept) == sizes(&scrambled) && changed.iter().all(|c| *c <= 16_384),
            "damaged/ does not hold the two damaged files: sizes {:?}, damaged {:?}, bytes changed {changed:?}",
            sizes(&kept),
            sizes(&scrambled)
        );
        // The damage survives a restart: the empty replica put in its
        // place is not taken for the data.
        assert!(cluster.stop(n).unwrap().success());
        cluster.start(n);
        cluster.client(n, READER).await;
    }
    // Other nodes know the solo collection's state too.
    let other = cluster.client_excluding(&[n], READER).await;
    assert!(other.get("solo", &[0]).await.is_err());
}

/// A node whose disk fills up refuses writes with a retryable error and
/// reports itself not ready; once there is room again its replica (the
/// only one of the shard) reopens by itself, writes go on without a
/// restart, and nothing acknowledged is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_survived_without_a_restart_once_there_is_room() {
    const WIDE: usize = 256;
    let disk = SmallDisk::new(24);
    let mut cluster = TestCluster::with_layout(fast(1, 0, ""));
    // The shard files live on the small disk; the metadata does not.
    std::fs::create_dir_all(cluster.path("data/node1")).unwrap();
    std::os::unix::fs::symlink(disk.dir.path(), cluster.path("data/node1/engine")).unwrap();
    cluster.start(1);
    // Listening comes before the node has registered as a data node.
    cluster
        .wait_view(1, Duration::from_secs(30), "node 1 up", |v| all_nodes_up(v, 1))
        .await;
    let admin = cluster.client(1, ADMIN).await;
    admin
        .create_collection(CollectionSpec::new("full", WIDE as u32, Metric::L2))
        .await
        .unwrap();
    let c = cluster.client(1, WRITER).await;
    let mut ledger = Ledger::default();
    let mut refused = None;
    for _ in 0..200 {
        let start = ledger.next_id();
        if let Err(e) = ledger.upsert(&c, "full", WIDE, start..start + 500).await {
            refused = Some(e);
            break;
        }
    }
    let refused = refused.unwrap_or_else(|| cluster.fail("the disk never filled up"));
    assert!(
        refused.is_retryable(),
        "a write on a full disk failed for good: {refused}"
    );
    println!(
        "{} points acknowledged before the disk filled: {refused}",
        ledger.acked.len()
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, body) = cluster.http_get(1, "/readyz");
        if code == 503 && body.contains("damaged") {
            println!("readyz while full: {body}");
            break;
        }
        if Instant::now() > deadline {
            cluster.fail(format!("readyz did not report the full disk: {code} {body}"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A collection created meanwhile is in the metadata; its replica
    // cannot be made on the full disk yet.
    admin
        .create_collection(CollectionSpec::new("later", WIDE as u32, Metric::L2))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, body) = cluster.http_get(1, "/readyz");
        if code == 503 && body.contains("cannot be created or opened yet") {
            break;
        }
        if Instant::now() > deadline {
            cluster.fail(format!(
                "readyz does not name the replica it cannot create: {code} {body}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    disk.grow(400);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut later = Ledger::default();
    loop {
        let start = ledger.next_id();
        let resumed = match ledger.upsert(&c, "full", WIDE, start..start + 100).await {
            Ok(()) => later.upsert(&c, "later", WIDE, 0..100).await,
            Err(e) => Err(e),
        };
        match resumed {
            Ok(()) => break,
            Err(e) if e.is_retryable() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(e) => cluster.fail(format!("writes did not resume once there was room: {e}")),
        }
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while cluster.http_get(1, "/readyz").0 != 200 {
        if Instant::now() > deadline {
            cluster.fail(format!("still not ready: {:?}", cluster.http_get(1, "/readyz")));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let p = check_through(&cluster, &c, "node 1", "full", &ledger).await;
    assert!(p.len() >= ledger.acked.len());
    check_count(&cluster, &c, "node 1", "full", p.len()).await;
    check_through(&cluster, &c, "node 1", "later", &later).await;
    // No restart happened.
    assert!(cluster.pid(1).is_some());
}

/// A full disk under a node's metadata Raft log stops its Raft for good
/// (openraft stops on a storage error): the node exits with the reason
/// instead of lingering outside the cluster, and once there is room it
/// starts again and catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_under_the_metadata_log_makes_the_node_exit_and_it_comes_back() {
    let (disk, mut cluster) = node_3_on_a_small_disk(16).await;
    // Take every byte the disk has left.
    let filler = disk.dir.path().join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 1 << 20];
        while f.write_all(&block).is_ok() {}
        let _ = f.sync_all();
    }
    let admin = cluster.client(1, ADMIN).await;
    let mut created = Vec::new();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = cluster.exited(3) {
            break status;
        }
        if started.elapsed() > Duration::from_secs(60) {
            cluster.fail("node 3 kept running with its metadata log on a full disk");
        }
        let name = format!("m{}", created.len());
        if admin
            .create_collection(CollectionSpec::new(&name, 4, Metric::L2))
            .await
            .is_ok()
        {
            created.push(name);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(!status.success());
    let log = std::fs::read_to_string(cluster.log_path(3)).unwrap();
    assert!(
        log.contains("the metadata Raft of node 3 stopped"),
        "{}",
        cluster.log_tail(3, 30)
    );
    println!("node 3 exited after {} metadata writes: {status}", created.len());

    std::fs::remove_file(&filler).unwrap();
    cluster.start(3);
    let c3 = cluster.client(3, READER).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let names: Vec<String> = c3
            .list_collections()
            .await
            .map(|l| l.into_iter().map(|c| c.spec.name).collect())
            .unwrap_or_default();
        if created.iter().all(|n| names.contains(n)) {
            break;
        }
        if Instant::now() > deadline {
            cluster.fail(format!(
                "node 3 did not catch up: it lists {names:?}, {created:?} were created"
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
