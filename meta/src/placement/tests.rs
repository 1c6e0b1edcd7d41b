//! Tests of the pure shard-configuration decisions: exhaustive over small
//! clusters, then random sequences of transitions checked twice — by the
//! state machine's `ShardCas` rules, and against a model of which replicas
//! hold every acknowledged write.

use std::collections::{BTreeMap, BTreeSet};

use edgevec_proto::{CollectionSpec, Metric, OpId};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::command::{CommandV1, CommandV2, MetaCommand, MetaResponse};
use crate::shard::Replication;
use crate::state::MetaState;
use ReplicaState::{CatchingUp, InSync, Initializing, Offline};

fn nodes(zones: &[&str]) -> Vec<DataNode> {
    (1..)
        .zip(zones)
        .map(|(id, z)| DataNode { id, zone: (*z).into() })
        .collect()
}

fn rec(node: u64, state: ReplicaState, eligible: bool) -> ReplicaRecord {
    ReplicaRecord { node, state, eligible }
}

fn cfg(primary: Option<u64>, replicas: Vec<ReplicaRecord>) -> ShardConfig {
    ShardConfig {
        version: 5,
        term: 3,
        primary,
        replicas,
    }
}

/// A state machine with `nodes` registered and collection 1 ("c", one
/// shard) at `replication`, its shard at `config` (via ShardCas from 0).
fn state_with(nodes: &[DataNode], replication: Replication, config: Option<&ShardConfig>) -> MetaState {
    let mut s = MetaState::default();
    for n in nodes {
        let reg = CommandV1::RegisterNode {
            id: n.id,
            addr: format!("10.0.0.{}:7000", n.id),
            zone: n.zone.clone(),
            roles: vec!["data".into()],
        };
        assert!(s.apply(&reg.into()).is_ok());
    }
    let spec = CollectionSpec {
        name: "c".into(),
        dim: 2,
        metric: Metric::L2,
        shards: 1,
        seal_rows: 10,
    };
    let placement = config.into_iter().cloned().collect();
    let create = CommandV2::CreateCollection {
        spec,
        replication,
        at_ms: 0,
        placement,
    };
    let r = s.apply(&create.into());
    assert!(r.is_ok(), "{r:?}");
    s
}

/// Propose `next` for the shard by ShardCas at its current version.
fn cas(s: &mut MetaState, next: &ShardConfig) -> MetaResponse {
    let expected_version = s.shard_config(1, 0).map_or(0, |c| c.version);
    s.apply(&MetaCommand::from(CommandV2::ShardCas {
        collection: 1,
        shard: 0,
        expected_version,
        config: next.clone(),
    }))
}

#[test]
fn place_rotates_primaries_and_spreads_zones() {
    let layouts: Vec<Vec<&str>> = vec![
        vec![""; 5],
        vec!["a", "b", "a", "b", "a"],
        vec!["a", "b", "c", "d", "e"],
        vec!["x", "x", "x", "y", "z"],
        vec!["b", "a", "a", "a", "c"],
    ];
    for layout in &layouts {
        for n in 1..=5usize {
            let dn = nodes(&layout[..n]);
            let zones: BTreeSet<&str> = dn.iter().map(|d| d.zone.as_str()).collect();
            for replicas in 1..=5u32 {
                for shards in [1u32, 2, 3, 5, 7, 12] {
                    let placed = place(shards, replicas, &dn);
                    if replicas as usize > n {
                        let err = placed.unwrap_err();
                        assert_eq!(
                            err,
                            PlacementError::NotEnoughNodes {
                                wanted: replicas,
                                data_nodes: n
                            }
                        );
                        continue;
                    }
                    let placed = placed.unwrap();
                    assert_eq!(placed.len(), shards as usize);
                    let mut primaries = BTreeMap::<u64, usize>::new();
                    for (s, c) in placed.iter().enumerate() {
                        let why = format!("{layout:?} n={n} r={replicas} shards={shards} shard {s}: {c:?}");
                        assert_eq!((c.version, c.term), (1, 1), "{why}");
                        assert_eq!(c.primary, Some((s % n) as u64 + 1), "rotated: {why}");
                        assert_eq!(c.replicas[0].node, c.primary.unwrap(), "{why}");
                        assert_eq!(c.replicas.len(), replicas as usize, "{why}");
                        assert!(c.replicas.iter().all(|r| r.state == InSync && r.eligible), "{why}");
                        let distinct: BTreeSet<u64> = c.replicas.iter().map(|r| r.node).collect();
                        assert_eq!(distinct.len(), c.replicas.len(), "{why}");
                        let used: BTreeSet<&str> = c
                            .replicas
                            .iter()
                            .map(|r| dn[r.node as usize - 1].zone.as_str())
                            .collect();
                        assert_eq!(used.len(), zones.len().min(replicas as usize), "zone spread: {why}");
                        if zones.len() == 1 {
                            let rotation: Vec<u64> = (0..replicas as usize).map(|i| ((s + i) % n) as u64 + 1).collect();
                            assert_eq!(c.replicas.iter().map(|r| r.node).collect::<Vec<_>>(), rotation, "{why}");
                        }
                        *primaries.entry(c.primary.unwrap()).or_default() += 1;
                        // The state machine takes it as a first configuration.
                        let repl = Replication::with_default_min(replicas);
                        state_with(&dn, repl, Some(c));
                    }
                    // Every node leads shards/n shards, rounded down or up.
                    for node in 1..=n as u64 {
                        let led = primaries.get(&node).copied().unwrap_or(0);
                        let even = shards as usize / n;
                        assert!(led == even || led == even + 1, "node {node} leads {led}: {primaries:?}");
                    }
                }
            }
        }
    }
}

#[test]
fn place_errors_say_what_to_do() {
    let err = place(4, 3, &nodes(&["a", "b"])).unwrap_err();
    assert_eq!(
        err,
        PlacementError::NotEnoughNodes {
            wanted: 3,
            data_nodes: 2
        }
    );
    let msg = err.to_string();
    assert!(
        msg.contains("3 replicas") && msg.contains("2 data node(s)") && msg.contains("add data nodes"),
        "{msg}"
    );
    assert_eq!(place(1, 0, &nodes(&["a"])).unwrap_err(), PlacementError::NoReplicas);
    let twice = vec![
        DataNode {
            id: 4,
            zone: "a".into(),
        },
        DataNode {
            id: 4,
            zone: "b".into(),
        },
    ];
    assert_eq!(place(1, 1, &twice).unwrap_err(), PlacementError::DuplicateNode(4));
    assert_eq!(place(0, 1, &nodes(&["a"])).unwrap(), vec![]);
    // Order of the input does not matter.
    let mut shuffled = nodes(&["a", "b", "c"]);
    shuffled.reverse();
    assert_eq!(
        place(3, 2, &shuffled).unwrap(),
        place(3, 2, &nodes(&["a", "b", "c"])).unwrap()
    );
}

#[test]
fn in_sync_removal_keeps_eligibility_only_at_min_insync() {
    let c = cfg(
        Some(1),
        vec![rec(1, InSync, true), rec(2, InSync, true), rec(3, InSync, true)],
    );
    // 3 in sync, min 2: node 3 leaves, writes go on without it.
    let c = remove_from_in_sync(&c, 3, 2);
    assert_eq!(c.replica(3), Some(&rec(3, Offline, false)));
    assert_eq!((c.version, c.term), (6, 3));
    // 2 in sync = min: node 2 leaves, no write can be acknowledged now.
    let c = remove_from_in_sync(&c, 2, 2);
    assert_eq!(c.replica(2), Some(&rec(2, Offline, true)));
    assert_eq!(c.eligible(), vec![1, 2]);
    assert_eq!(c.in_sync(), vec![1]);
    // Node 3 catches up: the set is back at min, node 2 misses what comes.
    let c = add_to_in_sync(&c, 3, 2);
    assert_eq!(c.in_sync(), vec![1, 3]);
    assert_eq!(c.eligible(), vec![1, 3]);
    assert_eq!(c.replica(2), Some(&rec(2, Offline, false)));
    assert_eq!(c.version, 8);
    // Below min, catching up does not take eligibility away.
    let c = cfg(
        Some(1),
        vec![rec(1, InSync, true), rec(2, Offline, true), rec(3, CatchingUp, false)],
    );
    let c = add_to_in_sync(&c, 3, 3);
    assert_eq!(c.eligible(), vec![1, 2, 3]);
}

#[test]
fn removing_the_primary_leaves_the_shard_without_one_in_a_new_term() {
    let c = cfg(Some(1), vec![rec(1, InSync, true), rec(2, InSync, true)]);
    let next = remove_from_in_sync(&c, 1, 1);
    assert_eq!((next.primary, next.term, next.version), (None, 4, 6));
    assert_eq!(next.replica(1), Some(&rec(1, Offline, false)));
    let next = remove_from_in_sync(&c, 1, 2);
    assert_eq!(next.replica(1), Some(&rec(1, Offline, true)), "the set was at min");
    // Then a promotion brings one back.
    let p = choose_primary(
        &next,
        1,
        &BTreeSet::from([1, 2]),
        &BTreeMap::from([(2, OpId::new(3, 9))]),
    );
    assert_eq!(p, Some(2));
    let promoted = promote(&next, 2);
    assert_eq!((promoted.primary, promoted.term), (Some(2), 5));
}

#[test]
fn set_replica_state_is_safe_for_in_sync_replicas() {
    let c = cfg(
        Some(1),
        vec![rec(1, InSync, true), rec(2, InSync, true), rec(3, Offline, true)],
    );
    let next = set_replica_state(&c, 3, CatchingUp);
    assert_eq!(
        next.replica(3),
        Some(&rec(3, CatchingUp, true)),
        "out of sync: eligibility kept"
    );
    let next = set_replica_state(&c, 2, Offline);
    assert_eq!(
        next.replica(2),
        Some(&rec(2, Offline, false)),
        "left the set: not eligible"
    );
    let next = set_replica_state(&c, 3, InSync);
    assert_eq!(next.replica(3), Some(&rec(3, InSync, true)));
    let next = set_replica_state(&c, 9, Offline);
    assert_eq!(
        (next.replicas.as_slice(), next.version),
        (c.replicas.as_slice(), 6),
        "unknown node"
    );
}

#[test]
fn choose_primary_picks_the_most_complete_eligible_live_replica() {
    let c = cfg(
        Some(1),
        vec![
            rec(1, InSync, true),
            rec(2, InSync, true),
            rec(3, Offline, true),
            rec(4, CatchingUp, false),
            rec(5, InSync, true),
        ],
    );
    let all = BTreeSet::from([1, 2, 3, 4, 5]);
    let op = OpId::new;
    let reports = BTreeMap::from([
        (1, op(9, 9)),
        (2, op(3, 5)),
        (3, op(3, 7)),
        (4, op(4, 1)),
        (5, op(3, 7)),
    ]);
    // 1 failed, 4 is not eligible although it reports the highest op id;
    // 3 and 5 tie at 3.7, the lowest id wins.
    assert_eq!(choose_primary(&c, 1, &all, &reports), Some(3));
    assert_eq!(choose_primary(&c, 1, &BTreeSet::from([2, 4, 5]), &reports), Some(5));
    assert_eq!(choose_primary(&c, 1, &BTreeSet::from([1, 4]), &reports), None);
    assert_eq!(choose_primary(&c, 1, &all, &BTreeMap::from([(4, op(9, 9))])), None);
    assert_eq!(choose_primary(&c, 1, &all, &BTreeMap::new()), None);
    // Term first, then LSN.
    let reports = BTreeMap::from([(2, op(4, 1)), (3, op(3, 100))]);
    assert_eq!(choose_primary(&c, 1, &all, &reports), Some(2));
}

#[test]
fn choose_primary_never_breaks_its_rules() {
    let mut rng = StdRng::seed_from_u64(7);
    let states = [Initializing, CatchingUp, InSync, Offline];
    for _ in 0..5000 {
        let replicas: Vec<ReplicaRecord> = (1..=rng.gen_range(1..=6u64))
            .map(|n| rec(n, states[rng.gen_range(0..4)], rng.gen_bool(0.5)))
            .collect();
        let c = cfg(Some(1), replicas);
        let failed = rng.gen_range(1..=6);
        let live: BTreeSet<u64> = (1..=6).filter(|_| rng.gen_bool(0.6)).collect();
        let mut reports = BTreeMap::new();
        for n in 1..=6u64 {
            if rng.gen_bool(0.7) {
                reports.insert(n, OpId::new(rng.gen_range(0..3), rng.gen_range(0..4)));
            }
        }
        let candidates: Vec<(OpId, u64)> = c
            .replicas
            .iter()
            .filter(|r| r.eligible && r.node != failed && live.contains(&r.node))
            .filter_map(|r| reports.get(&r.node).map(|op| (*op, r.node)))
            .collect();
        match choose_primary(&c, failed, &live, &reports) {
            None => assert!(candidates.is_empty(), "{c:?} {candidates:?}"),
            Some(p) => {
                let r = c.replica(p).unwrap();
                assert!(r.eligible && p != failed && live.contains(&p));
                let best = candidates.iter().map(|(op, _)| *op).max().unwrap();
                assert_eq!(reports[&p], best);
                assert!(candidates.iter().all(|(op, n)| *op < best || *n >= p));
            }
        }
    }
}

#[test]
fn quick_successive_failovers() {
    let dn = nodes(&["a", "b", "c", "d"]);
    let first = place(1, 4, &dn).unwrap().remove(0);
    let repl = Replication::with_default_min(4);
    let mut s = state_with(&dn, repl, Some(&first));
    let all: BTreeSet<u64> = (1..=4).collect();
    let reports: BTreeMap<u64, OpId> = (1..=4).map(|n| (n, OpId::new(1, 10 + n))).collect();
    let mut c = first.clone();
    let mut failed_so_far = vec![];
    for round in 1..=3u64 {
        let failed = c.primary.unwrap();
        failed_so_far.push(failed);
        let live: BTreeSet<u64> = all
            .difference(&failed_so_far.iter().copied().collect())
            .copied()
            .collect();
        let p = choose_primary(&c, failed, &live, &reports).expect("a live eligible replica");
        assert!(!failed_so_far.contains(&p));
        let next = promote(&c, p);
        assert_eq!(
            (next.term, next.version),
            (1 + round, 1 + round),
            "one term per failover"
        );
        assert_eq!(next.primary, Some(p));
        assert_eq!(next.replica(failed), Some(&rec(failed, Offline, false)));
        assert!(cas(&mut s, &next).is_ok());
        c = next;
    }
    // Every earlier primary is out; the last one standing failing leaves none.
    assert_eq!(c.eligible(), vec![c.primary.unwrap()]);
    let live = BTreeSet::new();
    assert_eq!(choose_primary(&c, c.primary.unwrap(), &live, &reports), None);
    // A stale proposal from before the second failover is a conflict.
    let stale = promote(&first, 2);
    let r = s.apply(&MetaCommand::from(CommandV2::ShardCas {
        collection: 1,
        shard: 0,
        expected_version: 1,
        config: stale,
    }));
    assert_eq!(r.rejection().map(|(c, _)| c), Some(crate::RejectCode::Conflict));
}

#[test]
fn promote_and_next_term() {
    let c = cfg(
        Some(1),
        vec![rec(1, InSync, true), rec(2, Offline, true), rec(3, CatchingUp, false)],
    );
    let t = next_term(&c);
    assert_eq!(
        (t.primary, t.term, t.version, &t.replicas),
        (Some(1), 4, 6, &c.replicas)
    );
    assert_eq!(promote(&c, 1), t, "promoting the primary is a new term for it");
    // An out-of-sync eligible replica promoted: the set does not grow.
    let p = promote(&c, 2);
    assert_eq!(p.in_sync(), vec![2]);
    assert_eq!(p.eligible(), vec![2]);
    // No in-sync primary before: the set grows, other out-of-sync replicas
    // lose eligibility (min_insync unknown).
    let c = cfg(
        None,
        vec![rec(1, Offline, true), rec(2, Offline, true), rec(3, InSync, true)],
    );
    let p = promote(&c, 1);
    assert_eq!(
        (p.primary, p.in_sync(), p.eligible()),
        (Some(1), vec![1, 3], vec![1, 3])
    );
}

#[test]
fn resize_grows_towards_unused_zones_then_least_loaded_nodes() {
    let dn = nodes(&["a", "a", "b", "b", "c"]);
    let c = cfg(Some(1), vec![rec(1, InSync, true)]);
    let load = BTreeMap::from([(3, 5), (4, 1), (5, 9)]);
    let none = BTreeSet::new();
    let next = resize(&c, 3, 2, &dn, &none, &load).unwrap();
    // Zone b (node 4 has less load than 3), then zone c; zone a is used.
    let added: Vec<&ReplicaRecord> = next.replicas[1..].iter().collect();
    assert_eq!(added, vec![&rec(4, Initializing, false), &rec(5, Initializing, false)]);
    assert_eq!((next.version, next.term, next.primary), (6, 3, Some(1)));
    // Already there: nothing to do.
    let done = ShardConfig {
        version: 6,
        ..next.clone()
    };
    assert_eq!(resize(&done, 3, 2, &dn, &none, &load), None);
    // Not enough free nodes: as many as there are.
    let next = resize(&c, 5, 2, &nodes(&["a", "b"]), &none, &load).unwrap();
    assert_eq!(next.replicas.len(), 2);
    // An unplaced shard is left to `place`.
    assert_eq!(resize(&ShardConfig::default(), 3, 2, &dn, &none, &load), None);
}

#[test]
fn resize_shrinks_the_least_useful_first() {
    let c = cfg(
        Some(2),
        vec![
            rec(1, InSync, true),
            rec(2, InSync, true),
            rec(3, CatchingUp, false),
            rec(4, Offline, true),
            rec(5, Initializing, false),
            rec(6, Offline, false),
        ],
    );
    let none = BTreeSet::new();
    let load = BTreeMap::new();
    let kept = |target| -> Vec<u64> {
        let next = resize(&c, target, 1, &[], &none, &load).unwrap();
        next.replicas.iter().map(|r| r.node).collect()
    };
    assert_eq!(kept(5), vec![1, 2, 3, 4, 5], "Offline and not eligible first");
    assert_eq!(kept(4), vec![1, 2, 3, 5]);
    assert_eq!(kept(3), vec![1, 2, 3]);
    assert_eq!(kept(2), vec![1, 2]);
    assert_eq!(kept(1), vec![2], "never the primary");
    // Never below min_insync: the in-sync backup stays.
    let next = resize(&c, 1, 2, &[], &none, &load).unwrap();
    assert_eq!(next.in_sync(), vec![1, 2]);
}

#[test]
fn resize_replaces_dead_replicas_only_with_a_live_source() {
    let dn = nodes(&["a", "b", "c", "d"]);
    let c = cfg(
        Some(1),
        vec![rec(1, InSync, true), rec(2, InSync, true), rec(3, Offline, false)],
    );
    let load = BTreeMap::new();
    let next = resize(&c, 3, 2, &dn, &BTreeSet::from([3]), &load).unwrap();
    assert_eq!(next.replicas[2], rec(4, Initializing, false));
    assert_eq!(next.replicas.len(), 3);
    // The dead primary stays (promote first); the dead backup goes.
    let next = resize(&c, 3, 2, &dn[..3], &BTreeSet::from([1, 2]), &load);
    assert_eq!(next, None, "no live in-sync replica to copy from: keep the dead copies");
    let next = resize(&c, 3, 2, &dn[..3], &BTreeSet::from([1, 3]), &load).unwrap();
    assert_eq!(next.replicas.iter().map(|r| r.node).collect::<Vec<_>>(), vec![1, 2]);
}

/// Which replicas hold every acknowledged write, driven by the same steps
/// as the configuration: the safety property behind eligibility.
struct Model {
    holds_all: BTreeMap<u64, bool>,
}

impl Model {
    /// A write is acknowledged when the primary has the in-sync set at
    /// min_insync: replicas outside the set miss it.
    fn write(&mut self, c: &ShardConfig, min_insync: u32) {
        if c.primary.is_some() && c.in_sync().len() >= min_insync as usize {
            for r in &c.replicas {
                if r.state != InSync {
                    self.holds_all.insert(r.node, false);
                }
            }
        }
    }

    fn check(&self, c: &ShardConfig) {
        for r in c.replicas.iter().filter(|r| r.eligible) {
            assert!(
                self.holds_all[&r.node],
                "eligible replica {} misses acknowledged writes: {c:?}",
                r.node
            );
        }
    }
}

/// A random replica of `c` among those `which` accepts.
fn pick(rng: &mut StdRng, c: &ShardConfig, which: impl Fn(&ReplicaRecord) -> bool) -> Option<u64> {
    let nodes: Vec<u64> = c.replicas.iter().filter(|r| which(r)).map(|r| r.node).collect();
    (!nodes.is_empty()).then(|| nodes[rng.gen_range(0..nodes.len())])
}

#[test]
fn random_transitions_pass_the_state_machine_and_keep_acknowledged_writes() {
    let states = [Initializing, CatchingUp, Offline];
    for seed in 0..100u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let zones = ["a", "b", "c"];
        let dn: Vec<DataNode> = (1..=6)
            .map(|id| DataNode {
                id,
                zone: zones[rng.gen_range(0..3)].into(),
            })
            .collect();
        let replicas = rng.gen_range(1..=5);
        let mut repl = Replication {
            replicas,
            min_insync: rng.gen_range(1..=replicas),
        };
        let mut c = place(1, replicas, &dn).unwrap().remove(0);
        let mut s = state_with(&dn, repl, Some(&c));
        let mut model = Model {
            holds_all: c.replicas.iter().map(|r| (r.node, true)).collect(),
        };
        for step in 0..400 {
            // Mostly in-sync churn (where eligibility moves), some failovers,
            // resizes and replication changes.
            let next = match rng.gen_range(0..20) {
                0..=5 => pick(&mut rng, &c, |r| r.state == InSync).map(|n| remove_from_in_sync(&c, n, repl.min_insync)),
                6..=11 => {
                    // Catching up copies from the primary: all acknowledged ops.
                    let source = c.primary.is_some_and(|p| model.holds_all[&p]);
                    let n = pick(&mut rng, &c, |r| r.state != InSync).filter(|_| source);
                    n.map(|n| {
                        model.holds_all.insert(n, true);
                        add_to_in_sync(&c, n, repl.min_insync)
                    })
                }
                12 => pick(&mut rng, &c, |_| true).map(|n| set_replica_state(&c, n, states[rng.gen_range(0..3)])),
                13..=15 => {
                    let failed = c.primary.unwrap_or(0);
                    let live: BTreeSet<u64> = (1..=6).filter(|_| rng.gen_bool(0.7)).collect();
                    let reports = (1..=6)
                        .map(|n| (n, OpId::new(rng.gen_range(0..3), rng.gen_range(0..9))))
                        .collect();
                    choose_primary(&c, failed, &live, &reports).map(|p| promote(&c, p))
                }
                16 => c.primary.map(|_| next_term(&c)),
                17 | 18 => {
                    let dead: BTreeSet<u64> = (1..=6).filter(|_| rng.gen_bool(0.15)).collect();
                    let load = (1..=6).map(|n| (n, rng.gen_range(0..4))).collect();
                    let next = resize(&c, repl.replicas, repl.min_insync, &dn, &dead, &load);
                    for r in next.iter().flat_map(|n| &n.replicas) {
                        model.holds_all.entry(r.node).or_insert(false);
                    }
                    next
                }
                _ => {
                    let replicas = rng.gen_range(1..=5);
                    repl = Replication {
                        replicas,
                        min_insync: rng.gen_range(1..=replicas),
                    };
                    let cmd = CommandV2::SetReplication {
                        collection: 1,
                        replication: repl,
                    };
                    assert!(s.apply(&cmd.into()).is_ok());
                    c = s.shard_config(1, 0).unwrap().clone();
                    None
                }
            };
            if let Some(next) = next {
                assert_eq!(next.version, c.version + 1);
                assert!(next.term >= c.term && (next.primary == c.primary || next.term > c.term));
                let r = cas(&mut s, &next);
                assert!(r.is_ok(), "seed {seed} step {step}: {r:?}\nfrom {c:?}\nto {next:?}");
                // A replica removed by resize and added again starts empty.
                for node in c.replicas.iter().map(|r| r.node) {
                    if next.replica(node).is_none() {
                        model.holds_all.insert(node, false);
                    }
                }
                c = next;
            }
            assert_eq!(s.shard_config(1, 0), Some(&c));
            model.write(&c, repl.min_insync);
            model.check(&c);
        }
    }
}
