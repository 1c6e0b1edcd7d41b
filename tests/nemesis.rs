//! Nemesis: writers run against a 3-node cluster while nodes are killed
//! (-9) and restarted or paused (SIGSTOP/SIGCONT), one fault at a time;
//! then the cluster is healed and a checker goes over the history of every
//! write: 0 acknowledged writes lost, 0 phantom points (never sent), every
//! point present holds exactly what was sent, and every shard's replicas
//! converge to the same log and content.
//!
//! The CI version runs a bounded number of rounds (about a minute); the
//! long one (`cargo test --release --test nemesis -- --ignored`) runs more
//! rounds and feeds BENCHMARKS.md.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::*;
use edgevec_client::{CollectionShards, CollectionSpec, Metric, ReplicationSpec};

const DIM: usize = 8;

/// One fault of the nemesis.
#[derive(Debug, Clone, Copy)]
enum Fault {
    Kill { node: u64, down: Duration },
    Pause { node: u64, down: Duration },
}

/// A seeded schedule of faults (xorshift: the same seed gives the same run).
fn schedule(rounds: usize, seed: u64) -> Vec<Fault> {
    let mut s = seed | 1;
    let mut next = move |n: u64| {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s % n
    };
    (0..rounds)
        .map(|round| {
            let node = 1 + next(3);
            let down = Duration::from_millis(500 + 250 * next(7));
            // Every third round at least is a pause: a node that stops
            // without dying, then wakes up believing what it believed.
            if next(3) == 0 || round % 3 == 2 {
                Fault::Pause { node, down }
            } else {
                Fault::Kill { node, down }
            }
        })
        .collect()
}

/// Every shard has all its replicas in sync, on equal logs and counts.
fn converged(c: &CollectionShards, replicas: usize) -> bool {
    c.shards.iter().all(|s| {
        let first = s.replicas.first();
        s.replicas.len() == replicas
            && s.problems.is_empty()
            && s.replicas.iter().all(|r| {
                r.state == "in-sync"
                    && r.last.is_some()
                    && r.last == first.and_then(|f| f.last)
                    && r.applied_lsn == first.and_then(|f| f.applied_lsn)
                    && r.points == first.and_then(|f| f.points)
            })
    })
}

async fn run(rounds: usize, seed: u64) {
    let mut cluster = TestCluster::running(Layout {
        voters: 3,
        learners: 0,
        cluster_extra: "heartbeat_ms = 100\nsuspect_ms = 600\n".into(),
    })
    .await;
    let admin = cluster.client_any(ADMIN).await;
    // min_insync 1 and 2, one and several shards.
    let collections = [("n1", 1, 1), ("n2", 2, 2), ("n3", 3, 2)];
    for (name, shards, min) in collections {
        let spec = CollectionSpec::new(name, DIM as u32, Metric::L2).with_shards(shards);
        let replication = ReplicationSpec {
            replicas: 3,
            min_insync: Some(min),
        };
        admin.create_replicated(spec, replication).await.unwrap();
    }
    let mut writers = Vec::new();
    for (name, _, _) in collections {
        let client = cluster.client_any(WRITER).await;
        writers.push((
            name,
            Writer::spawn(
                client,
                name,
                DIM,
                Ledger::default(),
                20,
                Duration::from_millis(5),
                100_000,
                Duration::from_secs(30 + 6 * rounds as u64),
            ),
        ));
    }

    let faults = schedule(rounds, seed);
    for (round, fault) in faults.iter().enumerate() {
        let progress: Vec<String> = writers
            .iter()
            .map(|(name, w)| {
                let l = w.snapshot();
                format!("{name}: {} acked, {} failed", l.acked.len(), l.failed().len())
            })
            .collect();
        eprintln!("nemesis round {round}: {fault:?} ({})", progress.join(", "));
        match *fault {
            Fault::Kill { node, down } => {
                cluster.kill9(node);
                tokio::time::sleep(down).await;
                cluster.start(node);
            }
            Fault::Pause { node, down } => {
                cluster.pause(node);
                tokio::time::sleep(down).await;
                cluster.resume(node);
            }
        }
        // One fault at a time (a metadata majority stays up): wait until
        // every shard has healed, with writes going on, before the next.
        let watcher = cluster.client_of(&[1 + fault_node(fault) % 3], READER).await;
        for (name, _, _) in collections {
            cluster
                .wait_shards(&watcher, name, Duration::from_secs(60), "healed between faults", |c| {
                    c.shards
                        .iter()
                        .all(|s| s.problems.is_empty() && s.replicas.iter().all(|r| r.state == "in-sync"))
                })
                .await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // Healed: let writes go on a moment, then stop and check.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut ledgers = Vec::new();
    for (name, w) in writers {
        ledgers.push((name, w.stop(Duration::from_secs(60)).await));
    }
    let reader = cluster.client_any(READER).await;
    for (name, ledger) in &ledgers {
        let acked_after_faults = ledger.acked.len();
        assert!(acked_after_faults > 0, "{name}: no write was acknowledged at all");
        let c = cluster
            .wait_shards(&reader, name, Duration::from_secs(60), "replicas converge", |c| {
                converged(c, 3)
            })
            .await;
        let total: u64 = c.shards.iter().map(|s| s.replicas[0].points.unwrap_or(0)).sum();
        // The checker, through every node: nothing acknowledged lost,
        // nothing present that was never sent, content exact.
        for id in 1..=3 {
            let client = cluster.client_of(&[id], READER).await;
            let present: BTreeSet<u64> = match check_ledger(&client, name, ledger).await {
                Ok(p) => p,
                Err(e) => cluster.fail(format!("{name} through node {id}: {e}")),
            };
            let lost: Vec<u64> = ledger.acked.keys().filter(|i| !present.contains(i)).copied().collect();
            assert!(lost.is_empty(), "{name}: acknowledged ids lost: {lost:?}");
            // No duplicates and no phantoms: the replicas count exactly the
            // distinct sent ids that are present.
            assert_eq!(
                total,
                present.len() as u64,
                "{name}: replicas count {total} points, {} distinct sent ids are present",
                present.len()
            );
            let describe = client.describe_collection(name).await.unwrap();
            assert_eq!(describe.points, total, "{name} through node {id}");
        }
        let failed = ledger.failed().len();
        eprintln!(
            "{name}: {} batches, {} acknowledged points, {failed} batches not acknowledged",
            ledger.batches.len(),
            ledger.acked.len()
        );
    }
}

fn fault_node(f: &Fault) -> u64 {
    match f {
        Fault::Kill { node, .. } | Fault::Pause { node, .. } => *node,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nemesis_kills_and_pauses_lose_nothing_acknowledged() {
    let started = Instant::now();
    run(9, 0x5eed).await;
    eprintln!("nemesis (9 rounds) took {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long nemesis run: cargo test --release --test nemesis -- --ignored"]
async fn nemesis_long() {
    let started = Instant::now();
    run(20, 0xfeed_beef).await;
    eprintln!("nemesis (20 rounds) took {:?}", started.elapsed());
}
