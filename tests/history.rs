//! A history checker for the four consistency levels, run under nemeses on
//! real clusters (replicas = 3).
//!
//! Writers upsert one point at a time, each with a unique id and the
//! vector [`vector_of`] gives it; readers `get` the latest ids exactly (not
//! ANN) at one level each. Every invocation and acknowledgement is stamped
//! on one clock (this process's monotonic clock), and the history is
//! checked afterwards:
//! - every level: a read returns only ids some write attempted before the
//!   read completed, each with its own vector, and none of a dropped
//!   collection (acknowledged before the drop began) once its re-creation
//!   was acknowledged;
//! - `strong`: every queried id acknowledged before the read began;
//! - `bounded:B`: every queried id acknowledged before (read began − B);
//! - `session`: every queried id its writer acknowledged before the
//!   reader merged that writer's session tokens, and every queried id the
//!   same reader saw before (reads never go backwards);
//! - `eventually`: nothing more (its stale answers are counted).
//!
//! A read that fails is allowed by the checker (a minority side may not
//! answer); each test says which reads must succeed.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use edgevec_client::{Client, CollectionSpec, Metric, Point, ReadOpts, ReplicationSpec};
use tokio::task::JoinHandle;

const DIM: usize = 4;
const BOUND_MS: u64 = 1_000;
/// How many of the latest attempted ids each read asks for.
const QUERY: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Level {
    Strong,
    Bounded,
    Session,
    Eventually,
}

impl Level {
    const ALL: [Level; 4] = [Level::Strong, Level::Bounded, Level::Session, Level::Eventually];

    fn name(self) -> String {
        match self {
            Level::Strong => "strong".into(),
            Level::Bounded => format!("bounded:{BOUND_MS}"),
            Level::Session => "session".into(),
            Level::Eventually => "eventually".into(),
        }
    }
}

struct Write {
    invoked: Instant,
    acked: Option<Instant>,
}

struct Read {
    level: Level,
    /// Which reader (level and endpoint), for the monotonic check.
    reader: String,
    invoked: Instant,
    completed: Instant,
    queried: Vec<u64>,
    /// For `session`: the ids its writer had acknowledged when the reader
    /// merged that writer's tokens.
    session_must: Vec<u64>,
    outcome: Result<Vec<(u64, Vec<f32>)>, String>,
}

/// A drop and re-create of the collection under the same name.
struct Reset {
    drop_invoked: Instant,
    create_acked: Instant,
}

#[derive(Default)]
struct History {
    writes: BTreeMap<u64, Write>,
    /// Writer 0's acknowledged ids, in order (the session readers' writer).
    session_acked: Vec<u64>,
    /// Every id in the order its write was invoked.
    order: Vec<u64>,
    reads: Vec<Read>,
    resets: Vec<Reset>,
    failed_writes: usize,
}

/// Per reader: reads that succeeded and failed, and stale answers.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    ok: usize,
    failed: usize,
    stale: usize,
}

/// Checks `h`; returns every violation and a tally per reader.
fn check(h: &History) -> (Vec<String>, BTreeMap<String, Tally>) {
    let mut violations = Vec::new();
    let mut tally: BTreeMap<String, Tally> = BTreeMap::new();
    let mut seen: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();
    let mut reads: Vec<&Read> = h.reads.iter().collect();
    reads.sort_by_key(|r| r.invoked);
    for r in reads {
        let t = tally.entry(r.reader.clone()).or_default();
        let got = match &r.outcome {
            Ok(got) => {
                t.ok += 1;
                got
            }
            Err(_) => {
                t.failed += 1;
                continue;
            }
        };
        let what = format!("{} read invoked at {:?}", r.reader, r.invoked);
        // The resets before this read; a read during one is unconstrained.
        let during_reset = h
            .resets
            .iter()
            .any(|x| x.drop_invoked <= r.completed && r.invoked <= x.create_acked);
        let recreated = h
            .resets
            .iter()
            .rev()
            .filter(|x| x.create_acked < r.invoked)
            .map(|x| (x.drop_invoked, x.create_acked))
            .next();
        let returned: BTreeSet<u64> = got.iter().map(|(id, _)| *id).collect();
        for (id, vector) in got {
            match h.writes.get(id) {
                None => violations.push(format!("{what}: returned {id}, which no write attempted")),
                Some(w) if w.invoked > r.completed => {
                    violations.push(format!("{what}: returned {id}, written only after the read completed"))
                }
                Some(w) => {
                    if *vector != vector_of(*id, DIM) {
                        violations.push(format!("{what}: {id} has another write's vector"));
                    }
                    if let (Some((drop_invoked, _)), Some(acked)) = (recreated, w.acked) {
                        if acked < drop_invoked && !during_reset {
                            violations.push(format!(
                                "{what}: returned {id} of the dropped collection after its re-creation"
                            ));
                        }
                    }
                }
            }
        }
        if during_reset {
            continue;
        }
        // Only writes of the current incarnation are required.
        let current = |id: &u64| {
            recreated.is_none_or(|(_, create_acked)| h.writes.get(id).is_some_and(|w| w.invoked > create_acked))
        };
        let acked_before = |id: &u64, t: Instant| h.writes.get(id).and_then(|w| w.acked).is_some_and(|a| a < t);
        let bound = Duration::from_millis(BOUND_MS);
        let mut must: BTreeSet<u64> = match r.level {
            Level::Strong => r
                .queried
                .iter()
                .filter(|id| acked_before(id, r.invoked))
                .copied()
                .collect(),
            Level::Bounded => match r.invoked.checked_sub(bound) {
                Some(t) => r.queried.iter().filter(|id| acked_before(id, t)).copied().collect(),
                None => BTreeSet::new(),
            },
            Level::Session => r.session_must.iter().copied().collect(),
            Level::Eventually => BTreeSet::new(),
        };
        must.retain(current);
        let stale: Vec<u64> = r
            .queried
            .iter()
            .filter(|id| acked_before(id, r.invoked) && current(id) && !returned.contains(id))
            .copied()
            .collect();
        if !stale.is_empty() {
            t.stale += 1;
        }
        let missed: Vec<&u64> = must.iter().filter(|id| !returned.contains(id)).collect();
        if !missed.is_empty() {
            violations.push(format!("{what}: {:?} missed {missed:?}", r.level));
        }
        if r.level == Level::Session {
            let before = seen.entry(r.reader.clone()).or_default();
            let lost: Vec<&u64> = r
                .queried
                .iter()
                .filter(|id| before.contains(id) && current(id) && !returned.contains(id))
                .collect();
            if !lost.is_empty() {
                violations.push(format!("{what}: went back; it had seen {lost:?}"));
            }
            before.extend(returned.iter().copied());
        }
    }
    (violations, tally)
}

/// Writers and readers running against one collection until stopped.
struct Workload {
    name: String,
    history: Arc<Mutex<History>>,
    stop: Arc<AtomicBool>,
    /// Writer 0: the one whose session the session readers follow.
    session_writer: Client,
    tasks: Vec<JoinHandle<()>>,
    /// How long the cluster may work on each read.
    read_timeout: Duration,
}

impl Workload {
    /// Starts one task per writer (writer `w` writes ids `w`, `w + n`, …).
    fn start(name: &str, writers: Vec<Client>) -> Workload {
        let history: Arc<Mutex<History>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let n = writers.len() as u64;
        let session_writer = writers[0].clone();
        let mut tasks = Vec::new();
        for (w, client) in writers.into_iter().enumerate() {
            let (history, stop, name) = (history.clone(), stop.clone(), name.to_string());
            tasks.push(tokio::spawn(async move {
                let mut id = 1_000 + w as u64;
                while !stop.load(Ordering::Relaxed) {
                    let invoked = Instant::now();
                    {
                        let mut h = history.lock().unwrap();
                        h.writes.insert(id, Write { invoked, acked: None });
                        h.order.push(id);
                    }
                    let point = Point {
                        id,
                        vector: vector_of(id, DIM),
                        payload: None,
                    };
                    let result = tokio::time::timeout(Duration::from_secs(20), client.upsert(&name, vec![point])).await;
                    let acked = Instant::now();
                    {
                        let mut h = history.lock().unwrap();
                        if matches!(result, Ok(Ok(_))) {
                            h.writes.get_mut(&id).unwrap().acked = Some(acked);
                            if w == 0 {
                                h.session_acked.push(id);
                            }
                        } else {
                            h.failed_writes += 1;
                        }
                    }
                    id += n;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }));
        }
        Workload {
            name: name.to_string(),
            history,
            stop,
            session_writer,
            tasks,
            read_timeout: Duration::from_secs(5),
        }
    }

    /// Starts a reader at `level` through `client`, labelled `label`.
    fn read(&mut self, level: Level, label: &str, client: Client) {
        let (history, stop, name) = (self.history.clone(), self.stop.clone(), self.name.clone());
        let writer = self.session_writer.clone();
        let reader = format!("{} via {label}", level.name());
        let opts = ReadOpts {
            consistency: Some(level.name()),
            timeout: Some(self.read_timeout),
            ..Default::default()
        };
        self.tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let (queried, session_must) = {
                    let h = history.lock().unwrap();
                    let queried: Vec<u64> = h.order.iter().rev().take(QUERY).copied().collect();
                    let must = if level == Level::Session {
                        h.session_acked.iter().rev().take(QUERY).copied().collect()
                    } else {
                        Vec::new()
                    };
                    (queried, must)
                };
                // The tokens merged after the acks were read: they cover them.
                let mut queried = queried;
                if level == Level::Session {
                    client.merge_session(&name, &writer.session_tokens(&name));
                    queried.extend(session_must.iter().copied());
                    queried.sort_unstable();
                    queried.dedup();
                }
                if queried.is_empty() {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
                let invoked = Instant::now();
                let result =
                    tokio::time::timeout(Duration::from_secs(20), client.get_with(&name, &queried, &opts)).await;
                let completed = Instant::now();
                let outcome = match result {
                    Ok(Ok(points)) => Ok(points.into_iter().map(|p| (p.id, p.vector)).collect()),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err("no answer within 20 s".to_string()),
                };
                history.lock().unwrap().reads.push(Read {
                    level,
                    reader: reader.clone(),
                    invoked,
                    completed,
                    queried,
                    session_must,
                    outcome,
                });
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }));
    }

    /// Starts one reader per level through `client`.
    fn read_all_levels(&mut self, label: &str, client: &Client) {
        for level in Level::ALL {
            self.read(level, label, client.clone());
        }
    }

    fn history(&self) -> std::sync::MutexGuard<'_, History> {
        self.history.lock().unwrap()
    }

    /// Stops every task, checks the history; fails `cluster` with the
    /// violations. Returns the tally per reader.
    async fn finish(self, cluster: &TestCluster) -> (BTreeMap<String, Tally>, Arc<Mutex<History>>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.expect("workload task");
        }
        let (violations, tally) = check(&self.history.lock().unwrap());
        let h = self.history.lock().unwrap();
        let acked = h.writes.values().filter(|w| w.acked.is_some()).count();
        eprintln!(
            "history: {acked} writes acknowledged, {} failed, {} reads; {tally:#?}",
            h.failed_writes,
            h.reads.len()
        );
        if !violations.is_empty() {
            let shown: Vec<&String> = violations.iter().take(20).collect();
            cluster.fail(format!("{} violations: {shown:#?}", violations.len()));
        }
        assert!(acked > 50, "only {acked} writes were acknowledged");
        drop(h);
        (tally, self.history)
    }
}

/// A workload with a writer through each of `writers` and a reader at
/// every level through each of `readers` (labelled "node N").
async fn writing_and_reading(cluster: &TestCluster, name: &str, writers: [u64; 2], readers: &[u64]) -> Workload {
    let mut load = Workload::start(
        name,
        vec![
            cluster.client_of(&[writers[0]], WRITER).await,
            cluster.client_of(&[writers[1]], WRITER).await,
        ],
    );
    for &id in readers {
        let client = cluster.client_of(&[id], READER).await;
        load.read_all_levels(&format!("node {id}"), &client);
    }
    load
}

/// Reads by `reader` that succeeded and were invoked after `t`.
fn ok_after(history: &History, reader: &str, t: Instant) -> usize {
    history
        .reads
        .iter()
        .filter(|r| r.reader == reader && r.invoked > t && r.outcome.is_ok())
        .count()
}

/// Fast failure detection, as the nemesis tests use.
fn fast(voters: u64, extra: &str) -> Layout {
    Layout {
        voters,
        learners: 0,
        cluster_extra: format!("heartbeat_ms = 100\nsuspect_ms = 600\n{extra}"),
    }
}

async fn create(cluster: &TestCluster, name: &str, shards: u32) {
    let admin = cluster.client(1, ADMIN).await;
    admin
        .create_replicated(
            CollectionSpec::new(name, DIM as u32, Metric::L2).with_shards(shards),
            ReplicationSpec::new(3),
        )
        .await
        .expect("create");
}

/// The primary of shard 0 and its two backups.
async fn replicas_of(cluster: &TestCluster, name: &str) -> (u64, Vec<u64>) {
    let admin = cluster.client(1, ADMIN).await;
    let shards = admin.shards(Some(name)).await.expect("shards");
    let shard = &shards[0].shards[0];
    let primary = shard.primary.expect("a primary");
    let backups = shard
        .replicas
        .iter()
        .map(|r| r.node)
        .filter(|n| *n != primary)
        .collect();
    (primary, backups)
}

/// Five nodes; shard 0's primary and one backup are cut off from the other
/// three (the metadata majority), which make the third replica primary.
/// Clients of the old primary keep reading through it: it must not serve
/// `strong` (its read-index round cannot reach its ack set) nor let its
/// backup serve `bounded` beyond the bound; the majority side serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn levels_hold_when_the_old_primary_and_a_backup_are_cut_off() {
    let cluster = TestCluster::running(fast(5, "fault_injection = true\n")).await;
    create(&cluster, "p", 1).await;
    let (primary, backups) = replicas_of(&cluster, "p").await;
    let cut = [primary, backups[0]];
    let majority: Vec<u64> = cluster.ids().into_iter().filter(|n| !cut.contains(n)).collect();
    let mut load = Workload::start(
        "p",
        vec![
            cluster.client_of(&majority, WRITER).await,
            cluster.client_of(&majority[1..], WRITER).await,
        ],
    );
    // Short reads: many are invoked while the partition lasts.
    load.read_timeout = Duration::from_secs(2);
    let minority = cluster.client_of(&[primary], READER).await;
    let backup = cluster.client_of(&[backups[0]], READER).await;
    let outside = cluster.client_of(&majority, READER).await;
    load.read_all_levels("old primary", &minority);
    load.read(Level::Bounded, "cut-off backup", backup.clone());
    load.read(Level::Session, "cut-off backup", backup);
    load.read_all_levels("majority", &outside);
    tokio::time::sleep(Duration::from_secs(2)).await;

    cluster.partition(&cut);
    let partitioned = Instant::now();
    let observer = cluster.client_of(&majority, READER).await;
    cluster
        .wait_shards(
            &observer,
            "p",
            Duration::from_secs(30),
            "a primary on the majority side",
            |c| c.shards[0].primary.is_some_and(|p| majority.contains(&p)),
        )
        .await;
    let failed_over = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    cluster.heal();
    let healed = Instant::now();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (_, history) = load.finish(&cluster).await;
    let h = history.lock().unwrap();
    // The cut-off side was read while cut off (what the checker judged).
    let during = h
        .reads
        .iter()
        .filter(|r| r.reader.contains("old primary") || r.reader.contains("cut-off"))
        .filter(|r| r.invoked > partitioned && r.completed < healed)
        .count();
    assert!(
        during > 10,
        "only {during} reads of the cut-off side ended while it was cut off"
    );
    for level in Level::ALL {
        let reader = format!("{} via majority", level.name());
        assert!(
            ok_after(&h, &reader, failed_over) > 0,
            "{reader}: no read succeeded after the failover"
        );
    }
}

/// One node's wall clock 8 s behind, another's 8 s ahead: every level
/// holds and no read or write fails (no decision compares clocks).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn levels_hold_and_nothing_fails_with_clocks_seconds_apart() {
    let mut cluster = TestCluster::with_layout(Layout::voters(3));
    cluster.set_env(2, "EDGEVEC_FAULT_CLOCK_OFFSET_MS", "-8000");
    cluster.set_env(3, "EDGEVEC_FAULT_CLOCK_OFFSET_MS", "8000");
    cluster.start_all().await;
    create(&cluster, "c", 2).await;
    let load = writing_and_reading(&cluster, "c", [2, 3], &[2, 3]).await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    let (tally, history) = load.finish(&cluster).await;
    let h = history.lock().unwrap();
    assert_eq!(h.failed_writes, 0, "writes failed");
    for (reader, t) in &tally {
        assert_eq!(t.failed, 0, "{reader}: reads failed: {:?}", first_errors(&h, reader));
        assert!(t.ok > 20, "{reader}: only {} reads", t.ok);
    }
    // Nodes 2 and 3 served each other's reads (the clocks were exercised).
    for id in [2, 3] {
        let (_, m) = cluster.http_get(id, "/metrics");
        let served = metric_sum(
            &m,
            "edgevec_rpc_requests_total",
            &["op=\"shard_read_at\"", "outcome=\"ok\""],
        );
        assert!(served > 0.0, "node {id} served no routed read:\n{m}");
    }
}

fn first_errors(h: &History, reader: &str) -> Vec<String> {
    errors_after(
        h,
        reader,
        h.reads
            .first()
            .map_or_else(Instant::now, |r| r.invoked - Duration::from_secs(1)),
    )
}

/// The first errors of reads by `reader` invoked after `t`, with when.
fn errors_after(h: &History, reader: &str, t: Instant) -> Vec<String> {
    h.reads
        .iter()
        .filter(|r| r.reader == reader && r.invoked > t)
        .filter_map(|r| {
            let e = r.outcome.as_ref().err()?;
            Some(format!("{:?} after: {e}", r.invoked.saturating_duration_since(t)))
        })
        .take(5)
        .collect()
}

/// The primary is paused (SIGSTOP) until another replica is primary, then
/// resumed: clients of the paused node read through it again once it
/// answers, with its stale view of the shard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn levels_hold_across_a_paused_primary_failover() {
    let cluster = TestCluster::running(fast(3, "")).await;
    create(&cluster, "s", 1).await;
    let (primary, backups) = replicas_of(&cluster, "s").await;
    let mut load = Workload::start(
        "s",
        vec![
            cluster.client_of(&backups, WRITER).await,
            cluster.client_of(&[backups[1], backups[0]], WRITER).await,
        ],
    );
    let others = cluster.client_of(&[backups[1], backups[0]], READER).await;
    load.read_all_levels("backups", &others);
    let paused = cluster.client_of(&[primary], READER).await;
    load.read(Level::Strong, "old primary", paused.clone());
    load.read(Level::Bounded, "old primary", paused);
    tokio::time::sleep(Duration::from_secs(2)).await;

    cluster.pause(primary);
    let observer = cluster.client_of(&backups, READER).await;
    cluster
        .wait_shards(&observer, "s", Duration::from_secs(30), "a new primary", |c| {
            c.shards[0].primary.is_some_and(|p| p != primary)
        })
        .await;
    let failed_over = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    cluster.resume(primary);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (_, history) = load.finish(&cluster).await;
    let h = history.lock().unwrap();
    for level in Level::ALL {
        let reader = format!("{} via backups", level.name());
        assert!(
            ok_after(&h, &reader, failed_over) > 0,
            "{reader}: nothing after the failover"
        );
    }
    let reader = format!("{} via old primary", Level::Strong.name());
    assert!(
        ok_after(&h, &reader, failed_over) > 0,
        "{reader}: the resumed node never served again"
    );
}

/// The collection is dropped and created again under the same name while
/// every level reads it: no read after the re-creation returns a point of
/// the old collection, and sessions of the old one do not block the new.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn levels_hold_when_a_collection_is_dropped_and_recreated() {
    let cluster = TestCluster::running(Layout::voters(3)).await;
    create(&cluster, "d", 2).await;
    let load = writing_and_reading(&cluster, "d", [1, 2], &[2, 3]).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let admin = cluster.client(3, ADMIN).await;
    let drop_invoked = Instant::now();
    admin.drop_collection("d").await.expect("drop");
    create(&cluster, "d", 2).await;
    let create_acked = Instant::now();
    load.history().resets.push(Reset {
        drop_invoked,
        create_acked,
    });
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (_, history) = load.finish(&cluster).await;
    let h = history.lock().unwrap();
    let after = h
        .writes
        .values()
        .filter(|w| w.invoked > create_acked && w.acked.is_some())
        .count();
    assert!(after > 20, "only {after} writes acknowledged after the re-creation");
    for id in [2, 3] {
        for level in Level::ALL {
            let reader = format!("{} via node {id}", level.name());
            let since = create_acked + Duration::from_secs(2);
            assert!(
                ok_after(&h, &reader, since) > 0,
                "{reader}: nothing served after the re-creation: {:?}",
                errors_after(&h, &reader, since)
            );
        }
    }
}

/// A node is killed (kill -9) and restarted; it rejoins, catches up, and
/// serves every level again through its own endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn levels_hold_when_a_killed_node_rejoins() {
    let mut cluster = TestCluster::running(fast(3, "")).await;
    create(&cluster, "r", 2).await;
    let victim = 3;
    let mut load = Workload::start(
        "r",
        vec![
            cluster.client_of(&[1], WRITER).await,
            cluster.client_of(&[2], WRITER).await,
        ],
    );
    let survivors = cluster.client_of(&[2, 1], READER).await;
    load.read_all_levels("survivors", &survivors);
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.kill9(victim);
    tokio::time::sleep(Duration::from_secs(3)).await;
    cluster.start(victim);
    let observer = cluster.client_of(&[1], READER).await;
    cluster
        .wait_shards(&observer, "r", Duration::from_secs(60), "the node back in sync", |c| {
            c.shards
                .iter()
                .all(|s| s.replicas.iter().any(|r| r.node == victim && r.state == "in-sync"))
        })
        .await;
    let rejoined = Instant::now();
    let returning = cluster.client_of(&[victim], READER).await;
    load.read_all_levels("rejoined node", &returning);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (tally, history) = load.finish(&cluster).await;
    let h = history.lock().unwrap();
    for level in Level::ALL {
        let reader = format!("{} via rejoined node", level.name());
        let t = tally.get(&reader).copied().unwrap_or_default();
        assert!(
            ok_after(&h, &reader, rejoined) > 0 && t.failed == 0,
            "{reader}: {t:?}; {:?}",
            first_errors(&h, &reader)
        );
    }
}

/// The checker finds each kind of violation in a made-up history.
#[test]
fn the_checker_finds_what_each_level_forbids() {
    let t0 = Instant::now();
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    let mut h = History::default();
    for (id, invoked, acked) in [(1, 0, 10), (2, 20, 30), (3, 2_000, 2_010), (4, 2_020, 2_030)] {
        h.writes.insert(
            id,
            Write {
                invoked: at(invoked),
                acked: Some(at(acked)),
            },
        );
        h.order.push(id);
    }
    let read = |level, reader: &str, invoked: u64, session_must: Vec<u64>, got: &[u64]| Read {
        level,
        reader: reader.to_string(),
        invoked: at(invoked),
        completed: at(invoked + 5),
        queried: vec![1, 2, 3, 4],
        session_must,
        outcome: Ok(got.iter().map(|id| (*id, vector_of(*id, DIM))).collect()),
    };
    let violations = |h: &History| check(h).0;

    // Correct answers at every level.
    h.reads = vec![
        read(Level::Strong, "s", 2_040, vec![], &[1, 2, 3, 4]),
        read(Level::Bounded, "b", 2_040, vec![], &[1, 2]),
        read(Level::Session, "x", 2_040, vec![3], &[1, 3]),
        read(Level::Eventually, "e", 2_040, vec![], &[]),
    ];
    assert!(violations(&h).is_empty(), "{:?}", violations(&h));
    // Strong missing a write acked before it began.
    h.reads = vec![read(Level::Strong, "s", 2_040, vec![], &[1, 2, 3])];
    assert_eq!(violations(&h).len(), 1, "{:?}", violations(&h));
    // Bounded missing a write acked more than the bound before.
    h.reads = vec![read(Level::Bounded, "b", 2_040, vec![], &[2, 3, 4])];
    assert_eq!(violations(&h).len(), 1, "{:?}", violations(&h));
    // Session missing its writer's write, then going back.
    h.reads = vec![read(Level::Session, "x", 2_040, vec![3], &[4])];
    assert_eq!(violations(&h).len(), 1, "{:?}", violations(&h));
    h.reads = vec![
        read(Level::Session, "x", 2_040, vec![], &[1, 4]),
        read(Level::Session, "x", 2_100, vec![], &[1]),
    ];
    assert_eq!(violations(&h).len(), 1, "{:?}", violations(&h));
    // An id nobody wrote, and a wrong vector.
    let mut bad = read(Level::Eventually, "e", 2_040, vec![], &[9]);
    h.reads = vec![bad];
    assert_eq!(violations(&h).len(), 1, "{:?}", violations(&h));
    bad = read(Level::Eventually, "e", 2_040, vec![], &[]);
    bad.outcome = Ok(vec![(1, vector_of(2, DIM))]);
    h.reads = vec![bad];
    assert_eq!(violations(&h).len(), 1, "{:?}", violations(&h));
    // After a drop (at 1 000) and re-creation (acked at 1 500): an old
    // point returned is a violation; old points are not required.
    h.resets.push(Reset {
        drop_invoked: at(1_000),
        create_acked: at(1_500),
    });
    h.reads = vec![read(Level::Strong, "s", 2_040, vec![], &[3, 4])];
    assert!(violations(&h).is_empty(), "{:?}", violations(&h));
    h.reads = vec![read(Level::Eventually, "e", 2_040, vec![], &[1])];
    assert_eq!(violations(&h).len(), 1, "{:?}", violations(&h));
}
