//! Unit tests of [`MetaState::apply`]: one rule per test.

use edgevec_proto::Metric;

use super::*;
use crate::command::{ReplicaInfo, ReplicaState, ShardMap};

pub(super) fn spec(name: &str) -> CollectionSpec {
    CollectionSpec {
        name: name.into(),
        dim: 4,
        metric: Metric::Cosine,
        shards: 2,
        seal_rows: 1000,
    }
}

pub(super) fn register(id: u64) -> MetaCommand {
    CommandV1::RegisterNode {
        id,
        addr: format!("10.0.0.{id}:7000"),
        zone: "a".into(),
        roles: vec!["meta".into(), "data".into()],
    }
    .into()
}

fn code(r: &MetaResponse) -> Option<RejectCode> {
    r.rejection().map(|(c, _)| c)
}

#[test]
fn create_twice_is_already_exists_and_changes_nothing() {
    let mut s = MetaState::default();
    let create = MetaCommand::from(CommandV1::CreateCollection {
        spec: spec("docs"),
        at_ms: 5,
    });
    assert!(s.apply(&create).is_ok());
    let before = s.clone();
    let again = CommandV1::CreateCollection {
        spec: spec("docs"),
        at_ms: 9,
    }
    .into();
    assert_eq!(code(&s.apply(&again)), Some(RejectCode::AlreadyExists));
    assert_eq!(s, before);
    assert_eq!(s.collection("docs").unwrap().created_at_ms, 5);
}

#[test]
fn drop_unknown_is_not_found() {
    let mut s = MetaState::default();
    let r = s.apply(&CommandV1::DropCollection { name: "nope".into() }.into());
    assert_eq!(code(&r), Some(RejectCode::NotFound));
    s.apply(
        &CommandV1::CreateCollection {
            spec: spec("docs"),
            at_ms: 1,
        }
        .into(),
    );
    assert!(s
        .apply(&CommandV1::DropCollection { name: "docs".into() }.into())
        .is_ok());
    assert!(s.collection("docs").is_none());
}

#[test]
fn invalid_specs_are_rejected() {
    let mut s = MetaState::default();
    for bad in [
        CollectionSpec { dim: 0, ..spec("a") },
        CollectionSpec { shards: 0, ..spec("a") },
        spec(""),
    ] {
        let r = s.apply(&CommandV1::CreateCollection { spec: bad, at_ms: 1 }.into());
        assert_eq!(code(&r), Some(RejectCode::Invalid));
    }
    assert!(s.collections.is_empty());
}

#[test]
fn a_collection_keeps_the_payload_indexes_it_was_created_with() {
    let mut s = MetaState::default();
    let create = |name: &str, fields: Vec<FieldSpec>| -> MetaCommand {
        MetaCommand::V2(CommandV2::CreateCollectionV3 {
            spec: spec(name),
            replication: Replication::with_default_min(1),
            at_ms: 3,
            placement: Vec::new(),
            index: IndexSpec::default(),
            fields,
        })
    };
    let fields = vec![
        FieldSpec::parse("lang:keyword").unwrap(),
        FieldSpec::parse("year:int").unwrap(),
    ];
    assert!(s.apply(&create("docs", fields.clone())).is_ok());
    assert_eq!(s.collection("docs").unwrap().fields, fields);
    // Encoded as a row and read back (what a restart does).
    let row = crate::disk::encode(
        "c",
        &crate::state_rows::CollectionRow::V4(s.collection("docs").unwrap().clone()),
    )
    .unwrap();
    match crate::disk::decode::<crate::state_rows::CollectionRow>("c", &row).unwrap() {
        crate::state_rows::CollectionRow::V4(c) => assert_eq!(c.fields, fields),
        _ => panic!("written as V4"),
    }
    let before = s.clone();
    let twice = vec![fields[0].clone(), fields[0].clone()];
    assert_eq!(code(&s.apply(&create("bad", twice))), Some(RejectCode::Invalid));
    assert_eq!(s, before);
}

#[test]
fn a_collection_keeps_the_index_parameters_it_was_created_with() {
    let mut s = MetaState::default();
    let create = |name: &str, index: IndexSpec| -> MetaCommand {
        MetaCommand::V2(CommandV2::CreateCollectionV2 {
            spec: spec(name),
            replication: Replication::with_default_min(1),
            at_ms: 3,
            placement: Vec::new(),
            index,
        })
    };
    let tuned = IndexSpec {
        m: 8,
        ef_construction: 40,
    };
    assert!(s.apply(&create("tuned", tuned)).is_ok());
    assert_eq!(s.collection("tuned").unwrap().index, tuned);
    // The first form creates with the defaults.
    let plain = MetaCommand::V2(CommandV2::CreateCollection {
        spec: spec("plain"),
        replication: Replication::with_default_min(1),
        at_ms: 4,
        placement: Vec::new(),
    });
    assert!(s.apply(&plain).is_ok());
    assert_eq!(s.collection("plain").unwrap().index, IndexSpec::default());
    // Out of bounds: refused, nothing changes.
    let before = s.clone();
    for bad in [
        IndexSpec { m: 1, ..tuned },
        IndexSpec { m: 1000, ..tuned },
        IndexSpec {
            ef_construction: 0,
            ..tuned
        },
    ] {
        assert_eq!(
            code(&s.apply(&create("bad", bad))),
            Some(RejectCode::Invalid),
            "{bad:?}"
        );
    }
    assert_eq!(s, before);
}

#[test]
fn register_update_and_state_transitions() {
    let mut s = MetaState::default();
    assert!(s.apply(&register(1)).is_ok());
    assert_eq!(s.node(1).unwrap().state, NodeState::Up);
    assert!(s.node(1).unwrap().has_role("meta"));

    let set = |state, at_ms| MetaCommand::from(CommandV1::SetNodeState { id: 1, state, at_ms });
    assert!(s.apply(&set(NodeState::Suspect, 100)).is_ok());
    assert_eq!(s.node(1).unwrap().state, NodeState::Suspect);
    assert_eq!(s.node(1).unwrap().state_since_ms, 100);
    // Re-asserting keeps the first time.
    assert!(s.apply(&set(NodeState::Suspect, 200)).is_ok());
    assert_eq!(s.node(1).unwrap().state_since_ms, 100);
    assert!(s.apply(&set(NodeState::Dead, 300)).is_ok());
    assert_eq!(s.node(1).unwrap().state, NodeState::Dead);

    // Registering again (a restart) updates the address and brings it up.
    let update = CommandV1::RegisterNode {
        id: 1,
        addr: "10.0.0.9:7000".into(),
        zone: "b".into(),
        roles: vec!["data".into()],
    };
    assert!(s.apply(&update.into()).is_ok());
    let n = s.node(1).unwrap();
    assert_eq!(
        (n.addr.as_str(), n.zone.as_str(), n.state),
        ("10.0.0.9:7000", "b", NodeState::Up)
    );
    assert_eq!(n.state_since_ms, 0);
    assert!(!n.has_role("meta"));
    assert_eq!(s.nodes().count(), 1);
}

#[test]
fn unknown_nodes_are_not_found() {
    let mut s = MetaState::default();
    let r = s.apply(
        &CommandV1::SetNodeState {
            id: 7,
            state: NodeState::Dead,
            at_ms: 1,
        }
        .into(),
    );
    assert_eq!(code(&r), Some(RejectCode::NotFound));
    let r = s.apply(&CommandV1::RemoveNode { id: 7 }.into());
    assert_eq!(code(&r), Some(RejectCode::NotFound));
    s.apply(&register(7));
    assert!(s.apply(&CommandV1::RemoveNode { id: 7 }.into()).is_ok());
    assert!(s.node(7).is_none());
    let r = s.apply(
        &CommandV1::RegisterNode {
            id: 8,
            addr: String::new(),
            zone: String::new(),
            roles: vec![],
        }
        .into(),
    );
    assert_eq!(code(&r), Some(RejectCode::Invalid));
}

fn shard_map(epoch: u64) -> ShardMap {
    ShardMap {
        epoch,
        primary: Some(1),
        replicas: vec![
            ReplicaInfo {
                node: 1,
                state: ReplicaState::InSync,
            },
            ReplicaInfo {
                node: 2,
                state: ReplicaState::CatchingUp,
            },
        ],
    }
}

fn put_map(collection: &str, shard: u32, epoch: u64) -> MetaCommand {
    CommandV1::PutShardMap {
        collection: collection.into(),
        shard,
        map: shard_map(epoch),
    }
    .into()
}

#[test]
fn put_shard_map_is_refused_since_v2() {
    let mut s = MetaState::default();
    s.apply(
        &CommandV1::CreateCollection {
            spec: spec("docs"),
            at_ms: 1,
        }
        .into(),
    );
    let before = s.clone();
    let r = s.apply(&put_map("docs", 0, 1));
    assert_eq!(code(&r), Some(RejectCode::Invalid));
    assert!(r.rejection().unwrap().1.contains("ShardCas"), "{r:?}");
    assert_eq!(s, before);
}

#[test]
fn plugins_are_immutable_per_version() {
    let mut s = MetaState::default();
    let put = |sha: u8, bytes: &[u8]| {
        MetaCommand::from(CommandV1::PutPlugin {
            name: "rerank".into(),
            version: "1.0.0".into(),
            sha256: [sha; 32],
            bytes: bytes.to_vec(),
        })
    };
    assert!(s.apply(&put(1, b"wasm")).is_ok());
    assert!(s.apply(&put(1, b"wasm")).is_ok(), "same hash again is a no-op");
    assert_eq!(code(&s.apply(&put(2, b"other"))), Some(RejectCode::AlreadyExists));
    assert_eq!(code(&s.apply(&put(3, b""))), Some(RejectCode::Invalid));
    assert_eq!(&*s.plugin("rerank", "1.0.0").unwrap().bytes, b"wasm");

    let remove = |v: &str| {
        MetaCommand::from(CommandV1::RemovePlugin {
            name: "rerank".into(),
            version: v.into(),
        })
    };
    assert_eq!(code(&s.apply(&remove("2.0.0"))), Some(RejectCode::NotFound));
    assert!(s.apply(&remove("1.0.0")).is_ok());
    assert!(s.plugins.is_empty());
}

#[test]
fn settings() {
    let mut s = MetaState::default();
    let set = |k: &str, v: &str| {
        MetaCommand::from(CommandV1::SetSetting {
            key: k.into(),
            value: v.into(),
        })
    };
    assert!(s.apply(&set("dead_after", "30s")).is_ok());
    assert!(s.apply(&set("dead_after", "60s")).is_ok());
    assert_eq!(s.setting("dead_after"), Some("60s"));
    assert_eq!(code(&s.apply(&set("", "x"))), Some(RejectCode::Invalid));
}

#[test]
fn same_log_same_state() {
    let log: Vec<MetaCommand> = vec![
        register(1),
        register(2),
        CommandV1::CreateCollection {
            spec: spec("docs"),
            at_ms: 1,
        }
        .into(),
        put_map("docs", 0, 1),
        CommandV1::CreateCollection {
            spec: spec("docs"),
            at_ms: 2,
        }
        .into(),
        CommandV1::SetNodeState {
            id: 2,
            state: NodeState::Suspect,
            at_ms: 9,
        }
        .into(),
    ];
    let run = || {
        let mut s = MetaState::default();
        let replies: Vec<_> = log.iter().map(|c| s.apply(c)).collect();
        (s, replies)
    };
    assert_eq!(run(), run());
}

#[test]
fn state_round_trips_through_postcard() {
    let mut s = MetaState::default();
    s.apply(&register(1));
    s.apply(
        &CommandV1::CreateCollection {
            spec: spec("docs"),
            at_ms: 1,
        }
        .into(),
    );
    s.apply(&put_map("docs", 0, 1));
    s.apply(
        &CommandV1::PutPlugin {
            name: "p".into(),
            version: "1".into(),
            sha256: [7; 32],
            bytes: vec![1, 2, 3],
        }
        .into(),
    );
    let bytes = postcard::to_allocvec(&s).unwrap();
    let back: MetaState = postcard::from_bytes(&bytes).unwrap();
    assert_eq!(back, s);
}
