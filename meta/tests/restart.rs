//! Durability across reopen, and snapshot transfer between stores.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use edgevec_meta::types::{Entry, EntryPayload, LogId, Membership, MetaNode, StoredMembership};
use edgevec_meta::{
    CommandV1, CommandV2, MetaCommand, MetaState, NodeState, RejectCode, ReplicaRecord, ReplicaState, ShardConfig,
    StateMachineStore,
};
use edgevec_proto::{CollectionSpec, Metric};
use openraft::storage::RaftStateMachine;
use openraft::testing::log_id;
use openraft::RaftSnapshotBuilder;

fn id(index: u64) -> LogId {
    log_id(1, 1, index)
}

fn cmd(index: u64, c: CommandV1) -> Entry {
    Entry {
        log_id: id(index),
        payload: EntryPayload::Normal(MetaCommand::V1(c)),
    }
}

fn membership(index: u64) -> Entry {
    let nodes = [1, 2, 3].map(|n| {
        (
            n,
            MetaNode {
                addr: format!("10.0.0.{n}:7000"),
                zone: "a".into(),
            },
        )
    });
    let voters = BTreeSet::from([1, 2, 3]);
    Entry {
        log_id: id(index),
        payload: EntryPayload::Membership(Membership::new(vec![voters], std::collections::BTreeMap::from(nodes))),
    }
}

fn spec(name: &str) -> CollectionSpec {
    CollectionSpec {
        name: name.into(),
        dim: 8,
        metric: Metric::L2,
        shards: 3,
        seal_rows: 100,
    }
}

/// A log touching every kind of entity, with one refused command.
fn history() -> Vec<Entry> {
    vec![
        membership(1),
        cmd(
            2,
            CommandV1::RegisterNode {
                id: 1,
                addr: "10.0.0.1:7000".into(),
                zone: "a".into(),
                roles: vec!["meta".into(), "data".into()],
            },
        ),
        cmd(
            3,
            CommandV1::CreateCollection {
                spec: spec("docs"),
                at_ms: 10,
            },
        ),
        cmd(
            4,
            CommandV1::CreateCollection {
                spec: spec("tmp"),
                at_ms: 11,
            },
        ),
        Entry {
            log_id: id(5),
            payload: EntryPayload::Normal(MetaCommand::V2(CommandV2::ShardCas {
                collection: 1,
                shard: 2,
                expected_version: 0,
                config: ShardConfig {
                    version: 1,
                    term: 1,
                    primary: Some(1),
                    replicas: vec![ReplicaRecord {
                        node: 1,
                        state: ReplicaState::InSync,
                        eligible: true,
                    }],
                },
            })),
        },
        cmd(
            6,
            CommandV1::PutPlugin {
                name: "rerank".into(),
                version: "1".into(),
                sha256: [9; 32],
                bytes: vec![0xab; 100_000],
            },
        ),
        cmd(
            7,
            CommandV1::SetSetting {
                key: "dead_after".into(),
                value: "30s".into(),
            },
        ),
        cmd(8, CommandV1::DropCollection { name: "tmp".into() }),
        cmd(
            9,
            CommandV1::CreateCollection {
                spec: spec("docs"),
                at_ms: 12,
            },
        ),
        cmd(
            10,
            CommandV1::SetNodeState {
                id: 1,
                state: NodeState::Suspect,
                at_ms: 20,
            },
        ),
        Entry {
            log_id: id(11),
            payload: EntryPayload::Blank,
        },
    ]
}

fn open_sm(dir: &Path) -> StateMachineStore {
    edgevec_meta::open(dir).expect("open").1
}

#[tokio::test]
async fn applied_state_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (state, applied) = {
        let mut sm = open_sm(dir.path());
        let mut watch = sm.subscribe();
        let replies = sm.apply(history()).await.unwrap();
        assert_eq!(replies.len(), 11, "one reply per entry");
        let refused: Vec<_> = replies.iter().filter_map(|r| r.rejection()).map(|(c, _)| c).collect();
        assert_eq!(refused, vec![RejectCode::AlreadyExists]);
        // The watch saw the batch.
        assert!(watch.has_changed().unwrap());
        let seen = watch.borrow_and_update().clone();
        assert_eq!(seen, sm.state());
        (sm.state(), sm.applied_state().await.unwrap())
    };
    assert!(state.collection("tmp").is_none());
    assert_eq!(state.collection("docs").unwrap().created_at_ms, 10);
    let docs = state.collection("docs").unwrap();
    assert_eq!(docs.id, 1);
    assert_eq!(state.shard_config(1, 2).unwrap().version, 1);
    assert!(state.collection_dropped(2), "tmp was dropped");
    assert_eq!(state.next_collection_id, 3);
    assert_eq!(state.plugin("rerank", "1").unwrap().bytes.len(), 100_000);
    assert_eq!(state.node(1).unwrap().state, NodeState::Suspect);
    assert_eq!(applied.0, Some(id(11)));
    assert_eq!(applied.1.log_id(), &Some(id(1)));

    let mut sm = open_sm(dir.path());
    assert_eq!(sm.state(), state);
    assert_eq!(*sm.subscribe().borrow(), state);
    assert_eq!(sm.applied_state().await.unwrap(), applied);

    // Apply more after the restart, in small batches; still consistent.
    sm.apply([cmd(12, CommandV1::RemoveNode { id: 1 })]).await.unwrap();
    // Create, drop and create again in one batch: the rows follow ids.
    sm.apply([
        cmd(
            13,
            CommandV1::CreateCollection {
                spec: spec("x"),
                at_ms: 30,
            },
        ),
        cmd(14, CommandV1::DropCollection { name: "x".into() }),
        cmd(
            15,
            CommandV1::CreateCollection {
                spec: spec("x"),
                at_ms: 31,
            },
        ),
    ])
    .await
    .unwrap();
    let expected = sm.state();
    drop(sm);
    let mut sm = open_sm(dir.path());
    assert!(sm.state().nodes.is_empty());
    assert_eq!(sm.state(), expected);
    assert_eq!(sm.state().collection("x").unwrap().id, 4);
    assert!(sm.state().collection_dropped(3));
    assert_eq!(sm.applied_state().await.unwrap().0, Some(id(15)));

    // Deployed plugin versions and load-balancer choices are rows too.
    let v2 = |index: u64, c: CommandV2| Entry {
        log_id: id(index),
        payload: EntryPayload::Normal(MetaCommand::V2(c)),
    };
    let replies = sm
        .apply([
            v2(
                16,
                CommandV2::DeployPlugin {
                    name: "even-first".into(),
                    kind: edgevec_meta::plugins::PluginKind::LoadBalancer,
                    sha256: [7; 32],
                    size: 30_000,
                    params: vec![("k".into(), "v".into())],
                    holders: vec![1, 2],
                    at_ms: 40,
                },
            ),
            v2(
                17,
                CommandV2::SetLoadBalancer {
                    collection: 1,
                    name: "even-first".into(),
                },
            ),
            v2(
                18,
                CommandV2::SetLoadBalancer {
                    collection: 4,
                    name: "random".into(),
                },
            ),
            cmd(19, CommandV1::DropCollection { name: "x".into() }),
        ])
        .await
        .unwrap();
    assert!(replies.iter().all(|r| r.is_ok()), "{replies:?}");
    let expected = sm.state();
    assert_eq!(expected.load_balancer_of(1), "even-first");
    assert_eq!(
        expected.load_balancer_of(4),
        "round-robin",
        "dropped with its collection"
    );
    drop(sm);
    let sm = open_sm(dir.path());
    assert_eq!(sm.state(), expected);
    assert_eq!(sm.state().deployed["even-first"].active().unwrap().0, 1);
}

#[tokio::test]
async fn snapshot_installs_into_a_fresh_store_and_survives_restart() {
    let leader_dir = tempfile::tempdir().unwrap();
    let follower_dir = tempfile::tempdir().unwrap();
    let mut leader = open_sm(leader_dir.path());
    leader.apply(history()).await.unwrap();

    let snap = leader.get_snapshot_builder().await.build_snapshot().await.unwrap();
    assert_eq!(snap.meta.last_log_id, Some(id(11)));
    assert_eq!(snap.meta.last_membership.log_id(), &Some(id(1)));

    let mut follower = open_sm(follower_dir.path());
    let mut watch = follower.subscribe();
    follower
        .apply([cmd(
            1,
            CommandV1::SetSetting {
                key: "only-on-follower".into(),
                value: "x".into(),
            },
        )])
        .await
        .unwrap();
    let mut incoming = follower.begin_receiving_snapshot().await.unwrap();
    *incoming = *snap.snapshot.clone();
    follower.install_snapshot(&snap.meta, incoming).await.unwrap();

    assert_eq!(follower.state(), leader.state(), "install replaces the whole state");
    assert_eq!(
        follower.applied_state().await.unwrap(),
        leader.applied_state().await.unwrap()
    );
    assert_eq!(*watch.borrow_and_update(), leader.state());
    let current = follower.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(current.meta, snap.meta);

    // Both sides still have state and snapshot after a restart.
    let expected: Arc<MetaState> = leader.state();
    drop(follower);
    drop(leader);
    for dir in [follower_dir.path(), leader_dir.path()] {
        let mut sm = open_sm(dir);
        assert_eq!(sm.state(), expected);
        assert_eq!(sm.applied_state().await.unwrap().0, Some(id(11)));
        let current = sm.get_current_snapshot().await.unwrap().expect("persisted snapshot");
        assert_eq!(current.meta, snap.meta);
        assert_eq!(current.snapshot.get_ref(), snap.snapshot.get_ref());
    }
}

#[tokio::test]
async fn snapshot_is_the_state_when_the_builder_was_taken() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = open_sm(dir.path());
    sm.apply(history()).await.unwrap();
    let before = sm.state();
    let mut builder = sm.get_snapshot_builder().await;
    sm.apply([cmd(12, CommandV1::DropCollection { name: "docs".into() })])
        .await
        .unwrap();
    let snap = builder.build_snapshot().await.unwrap();
    assert_eq!(snap.meta.last_log_id, Some(id(11)));

    let other = tempfile::tempdir().unwrap();
    let mut fresh = open_sm(other.path());
    fresh.install_snapshot(&snap.meta, snap.snapshot).await.unwrap();
    assert_eq!(fresh.state(), before);
    assert!(fresh.state().collection("docs").is_some());

    // A later snapshot is not replaced by building an older one.
    let newer = sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
    assert_eq!(newer.meta.last_log_id, Some(id(12)));
    let _ = builder.build_snapshot().await.unwrap();
    let current = sm.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(current.meta.last_log_id, Some(id(12)));
}

#[tokio::test]
async fn empty_store_has_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = open_sm(dir.path());
    assert_eq!(sm.applied_state().await.unwrap(), (None, StoredMembership::default()));
    assert!(sm.get_current_snapshot().await.unwrap().is_none());
    assert_eq!(*sm.state(), MetaState::default());
}
