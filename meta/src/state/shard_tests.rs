//! Unit tests of [`MetaState::apply`] for the V2 commands: collection ids,
//! replication and shard configurations by compare-and-set. One rule per
//! test; the rules themselves are `crate::shard`'s.

use super::*;
use crate::command::ReplicaState;
use crate::shard::ReplicaRecord;

use super::tests::{register, spec};

fn create_v2(name: &str, replicas: u32, placement: Vec<ShardConfig>) -> MetaCommand {
    CommandV2::CreateCollection {
        spec: spec(name),
        replication: Replication::with_default_min(replicas),
        at_ms: 1,
        placement,
    }
    .into()
}

fn cas(collection: u64, shard: u32, expected_version: u64, config: ShardConfig) -> MetaCommand {
    CommandV2::ShardCas {
        collection,
        shard,
        expected_version,
        config,
    }
    .into()
}

fn rec(node: u64, state: ReplicaState, eligible: bool) -> ReplicaRecord {
    ReplicaRecord { node, state, eligible }
}

fn in_sync(node: u64) -> ReplicaRecord {
    rec(node, ReplicaState::InSync, true)
}

/// Version 1, term 1, primary 1, replicas 1..=n in sync.
fn first(n: u64) -> ShardConfig {
    ShardConfig {
        version: 1,
        term: 1,
        primary: Some(1),
        replicas: (1..=n).map(in_sync).collect(),
    }
}

/// Nodes 1..=5 registered and a 3-replica collection "docs" (id 1), shards
/// not placed.
fn cluster() -> MetaState {
    let mut s = MetaState::default();
    for id in 1..=5 {
        assert!(s.apply(&register(id)).is_ok());
    }
    assert!(s.apply(&create_v2("docs", 3, vec![])).is_ok());
    s
}

fn refused(s: &mut MetaState, cmd: &MetaCommand) -> (RejectCode, String) {
    let before = s.clone();
    let r = s.apply(cmd);
    assert_eq!(*s, before, "a refused command changes nothing");
    let (code, msg) = r.rejection().expect("refused");
    (code, msg.to_owned())
}

#[test]
fn ids_come_from_a_counter_and_are_never_reused() {
    let mut s = MetaState::default();
    assert_eq!(s.next_collection_id, 1);
    assert!(!s.collection_dropped(1), "not allocated yet");
    assert!(s.apply(&create_v2("a", 1, vec![])).is_ok());
    assert!(s
        .apply(
            &CommandV1::CreateCollection {
                spec: spec("b"),
                at_ms: 1
            }
            .into()
        )
        .is_ok());
    assert_eq!((s.collection("a").unwrap().id, s.collection("b").unwrap().id), (1, 2));
    assert!(s.apply(&CommandV1::DropCollection { name: "a".into() }.into()).is_ok());
    assert!(s.collection_dropped(1));
    assert!(!s.collection_dropped(2) && !s.collection_dropped(3) && !s.collection_dropped(0));
    assert!(s.apply(&create_v2("a", 1, vec![])).is_ok());
    assert_eq!(
        s.collection("a").unwrap().id,
        3,
        "a re-created collection is a new collection"
    );
    assert!(s.collection_by_id(1).is_none());
    assert_eq!(s.collection_by_id(3).unwrap().spec.name, "a");
    assert!(s.collection_dropped(1));
    assert_eq!(s.next_collection_id, 4);
    // A refused create allocates nothing.
    refused(&mut s, &create_v2("a", 1, vec![]));
    assert_eq!(s.next_collection_id, 4);
}

#[test]
fn v1_create_is_one_replica_without_placement() {
    let mut s = MetaState::default();
    assert!(s
        .apply(
            &CommandV1::CreateCollection {
                spec: spec("docs"),
                at_ms: 7
            }
            .into()
        )
        .is_ok());
    let c = s.collection("docs").unwrap();
    assert_eq!(
        c.replication,
        Replication {
            replicas: 1,
            min_insync: 1
        }
    );
    assert_eq!((c.id, c.created_at_ms), (1, 7));
    assert!(c.shards.is_empty());
}

#[test]
fn create_checks_replication_and_placement() {
    let mut s = cluster();
    let bad_replication = [(0, 0), (1, 0), (2, 3)];
    for (replicas, min_insync) in bad_replication {
        let cmd = CommandV2::CreateCollection {
            spec: spec("x"),
            replication: Replication { replicas, min_insync },
            at_ms: 1,
            placement: vec![],
        };
        assert_eq!(refused(&mut s, &cmd.into()).0, RejectCode::Invalid);
    }
    let (code, msg) = refused(&mut s, &create_v2("docs", 3, vec![]));
    assert_eq!(code, RejectCode::AlreadyExists);
    assert!(msg.contains("already exists"), "{msg}");
    // spec("x") has 2 shards.
    for placement in [
        vec![first(3)],
        vec![first(3), ShardConfig { version: 2, ..first(3) }],
        vec![first(3), ShardConfig { term: 0, ..first(3) }],
        vec![
            first(3),
            ShardConfig {
                primary: Some(9),
                ..first(3)
            },
        ],
        vec![first(3), first(6)], // node 6 is not registered
        vec![first(3), first(5)], // more than replicas + 1
        vec![
            first(3),
            ShardConfig {
                replicas: vec![in_sync(1), in_sync(1)],
                ..first(3)
            },
        ],
    ] {
        assert_eq!(refused(&mut s, &create_v2("x", 3, placement)).0, RejectCode::Invalid);
    }
    assert!(s.apply(&create_v2("x", 3, vec![first(3), first(4)])).is_ok());
    let x = s.collection("x").unwrap();
    assert_eq!((x.id, x.replication.min_insync), (2, 2));
    assert_eq!(s.shard_config(2, 1), Some(&first(4)));
}

#[test]
fn cas_accepts_the_next_version_and_refuses_a_moved_one() {
    let mut s = cluster();
    // Placed later, from version 0.
    assert!(s.apply(&cas(1, 0, 0, first(3))).is_ok());
    assert_eq!(s.shard_config(1, 0), Some(&first(3)));
    // A second proposer that also read version 0.
    let (code, msg) = refused(&mut s, &cas(1, 0, 0, first(3)));
    assert_eq!(code, RejectCode::Conflict);
    assert!(
        msg.contains("shard 0 of collection 1") && msg.contains("at version 1, not 0"),
        "{msg}"
    );
    assert_eq!(code.to_string(), "conflict");

    let mut next = first(3);
    next.version = 2;
    next.replicas[2] = rec(3, ReplicaState::Offline, false);
    assert!(s.apply(&cas(1, 0, 1, next.clone())).is_ok());
    // The version must be exactly the next one.
    let skip = ShardConfig {
        version: 4,
        ..next.clone()
    };
    assert_eq!(refused(&mut s, &cas(1, 0, 2, skip)).0, RejectCode::Invalid);
    // Unknown collection, shard beyond the count.
    let (code, msg) = refused(&mut s, &cas(9, 0, 0, first(3)));
    assert_eq!(code, RejectCode::NotFound);
    assert!(msg.contains("collection 9"), "{msg}");
    assert_eq!(refused(&mut s, &cas(1, 2, 0, first(3))).0, RejectCode::Invalid);
}

#[test]
fn cas_term_rules() {
    let mut s = cluster();
    s.apply(&cas(1, 0, 0, ShardConfig { term: 4, ..first(3) }));
    // A stale term.
    let stale = ShardConfig {
        version: 2,
        term: 3,
        ..first(3)
    };
    let msg = refused(&mut s, &cas(1, 0, 1, stale)).1;
    assert!(msg.contains("older than the current term 4"), "{msg}");
    // A primary change without a term bump.
    let mut moved = ShardConfig {
        version: 2,
        term: 4,
        primary: Some(2),
        ..first(3)
    };
    let msg = refused(&mut s, &cas(1, 0, 1, moved.clone())).1;
    assert!(msg.contains("needs a new term"), "{msg}");
    moved.term = 5;
    assert!(s.apply(&cas(1, 0, 1, moved)).is_ok());
    // Same primary, next term (a restarted primary).
    let again = ShardConfig {
        version: 3,
        term: 6,
        primary: Some(2),
        ..first(3)
    };
    assert!(s.apply(&cas(1, 0, 2, again)).is_ok());
}

#[test]
fn cas_structural_rules() {
    let mut s = cluster();
    s.apply(&cas(1, 0, 0, first(3)));
    let v2 = |f: &dyn Fn(&mut ShardConfig)| {
        let mut c = ShardConfig { version: 2, ..first(3) };
        f(&mut c);
        cas(1, 0, 1, c)
    };
    let cases: Vec<(&str, MetaCommand)> = vec![
        ("holds two replicas", v2(&|c| c.replicas[1].node = 1)),
        (
            "not registered",
            v2(&|c| c.replicas.push(rec(9, ReplicaState::Initializing, false))),
        ),
        (
            "not one of the replicas",
            v2(&|c| {
                c.primary = Some(4);
                c.term = 2;
            }),
        ),
        ("not InSync", v2(&|c| c.replicas[0].state = ReplicaState::CatchingUp)),
        ("must be eligible", v2(&|c| c.replicas[1].eligible = false)),
        ("cannot start in sync", v2(&|c| c.replicas.push(in_sync(4)))),
        (
            "was not eligible",
            v2(&|c| {
                c.replicas.push(rec(4, ReplicaState::Offline, true));
            }),
        ),
        (
            "reaches min_insync",
            v2(&|c| c.replicas[2] = rec(3, ReplicaState::Offline, true)),
        ),
        (
            "one more is allowed",
            v2(&|c| {
                c.replicas.push(rec(4, ReplicaState::Initializing, false));
                c.replicas.push(rec(5, ReplicaState::Initializing, false));
            }),
        ),
    ];
    for (why, cmd) in cases {
        let (code, msg) = refused(&mut s, &cmd);
        assert_eq!(code, RejectCode::Invalid, "{why}");
        assert!(msg.contains(why), "{why}: {msg}");
    }
    // One surplus replica while moving is fine.
    let mut moving = ShardConfig { version: 2, ..first(3) };
    moving.replicas.push(rec(4, ReplicaState::Initializing, false));
    assert!(s.apply(&cas(1, 0, 1, moving)).is_ok());
}

#[test]
fn cas_refuses_promoting_a_replica_that_was_not_eligible() {
    let mut s = cluster();
    let mut c = first(3);
    c.replicas[2] = rec(3, ReplicaState::CatchingUp, false);
    s.apply(&cas(1, 0, 0, c.clone()));
    let mut promoted = c.clone();
    promoted.version = 2;
    promoted.term = 2;
    promoted.primary = Some(3);
    promoted.replicas[0] = rec(1, ReplicaState::Offline, false);
    promoted.replicas[2] = in_sync(3);
    let msg = refused(&mut s, &cas(1, 0, 1, promoted.clone())).1;
    assert!(msg.contains("cannot become primary"), "{msg}");
    // Node 2 was eligible: fine.
    promoted.primary = Some(2);
    promoted.replicas[2] = rec(3, ReplicaState::CatchingUp, false);
    assert!(s.apply(&cas(1, 0, 1, promoted)).is_ok());
}

#[test]
fn a_node_removed_from_the_cluster_stays_removable() {
    let mut s = cluster();
    s.apply(&cas(1, 0, 0, first(3)));
    assert!(s.apply(&CommandV1::RemoveNode { id: 3 }.into()).is_ok());
    let mut c = ShardConfig { version: 2, ..first(3) };
    c.replicas[2] = rec(3, ReplicaState::Offline, false);
    assert!(s.apply(&cas(1, 0, 1, c.clone())).is_ok(), "still named, not new");
    c.version = 3;
    c.replicas.pop();
    assert!(s.apply(&cas(1, 0, 2, c)).is_ok());
}

#[test]
fn set_replication_bounds_and_eligibility() {
    let mut s = cluster();
    let set = |replicas, min_insync| {
        MetaCommand::from(CommandV2::SetReplication {
            collection: 1,
            replication: Replication { replicas, min_insync },
        })
    };
    assert_eq!(refused(&mut s, &set(2, 3)).0, RejectCode::Invalid);
    assert_eq!(refused(&mut s, &set(0, 0)).0, RejectCode::Invalid);
    let missing = CommandV2::SetReplication {
        collection: 7,
        replication: Replication::with_default_min(1),
    };
    assert_eq!(refused(&mut s, &missing.into()).0, RejectCode::NotFound);

    // min_insync 3: node 3 left the set at 3 and stays eligible.
    assert!(s.apply(&set(3, 3)).is_ok());
    assert!(s.apply(&cas(1, 0, 0, first(3))).is_ok());
    let mut c = ShardConfig { version: 2, ..first(3) };
    c.replicas[2] = rec(3, ReplicaState::Offline, true);
    assert!(s.apply(&cas(1, 0, 1, c)).is_ok());
    assert!(s.apply(&cas(1, 1, 0, first(3))).is_ok());
    // Lowering to 2 lets the primary acknowledge without node 3: it stops
    // being eligible in the same command.
    assert!(s.apply(&set(3, 2)).is_ok());
    let after = s.shard_config(1, 0).unwrap();
    assert_eq!(after.version, 3);
    assert_eq!(after.eligible(), vec![1, 2]);
    assert_eq!(s.shard_config(1, 1), Some(&first(3)), "untouched");
    assert_eq!(
        s.collection_by_id(1).unwrap().replication,
        Replication {
            replicas: 3,
            min_insync: 2
        }
    );
}

#[test]
fn v2_log_same_state() {
    let log = [
        register(1),
        register(2),
        create_v2("a", 2, vec![first(2), first(2)]),
        cas(
            1,
            0,
            1,
            ShardConfig {
                version: 2,
                term: 2,
                primary: Some(2),
                ..first(2)
            },
        ),
        CommandV1::DropCollection { name: "a".into() }.into(),
        create_v2("a", 1, vec![]),
    ];
    let run = || {
        let mut s = MetaState::default();
        let replies: Vec<_> = log.iter().map(|c| s.apply(c)).collect();
        (s, replies)
    };
    let (s, replies) = run();
    assert!(replies.iter().all(MetaResponse::is_ok), "{replies:?}");
    assert_eq!((s, replies), run());
}
