//! Unit tests of [`MetaState::apply`] for policy plugins: deployed
//! versions (numbering, retries, kinds, retention) and each collection's
//! load balancer.

use super::*;
use crate::command::CommandV1;

use super::tests::spec;

fn deploy(name: &str, kind: PluginKind, sha: u8, params: &[(&str, &str)]) -> MetaCommand {
    CommandV2::DeployPlugin {
        name: name.into(),
        kind,
        sha256: [sha; 32],
        size: 1000,
        params: params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        holders: vec![1, 2],
        at_ms: 5,
    }
    .into()
}

fn set_lb(collection: u64, name: &str) -> MetaCommand {
    CommandV2::SetLoadBalancer {
        collection,
        name: name.into(),
    }
    .into()
}

fn remove(name: &str) -> MetaCommand {
    CommandV2::RemovePluginVersions { name: name.into() }.into()
}

fn code(r: MetaResponse) -> Option<RejectCode> {
    r.rejection().map(|(c, _)| c)
}

fn versions(s: &MetaState, name: &str) -> Vec<u64> {
    s.deployed
        .get(name)
        .map(|d| d.versions.keys().copied().collect())
        .unwrap_or_default()
}

#[test]
fn versions_are_numbered_and_a_retry_adds_nothing() {
    let mut s = MetaState::default();
    let lb = PluginKind::LoadBalancer;
    assert!(s.apply(&deploy("even-first", lb, 1, &[])).is_ok());
    assert_eq!(versions(&s, "even-first"), vec![1]);
    // The same bytes and params again (a retried deploy): no new version.
    assert!(s.apply(&deploy("even-first", lb, 1, &[])).is_ok());
    assert_eq!(versions(&s, "even-first"), vec![1]);
    // Same bytes, other params: a new version.
    assert!(s.apply(&deploy("even-first", lb, 1, &[("k", "v")])).is_ok());
    assert!(s.apply(&deploy("even-first", lb, 2, &[])).is_ok());
    assert!(s.apply(&deploy("even-first", lb, 3, &[])).is_ok());
    // Only the newest KEPT_VERSIONS stay.
    assert_eq!(versions(&s, "even-first"), vec![2, 3, 4]);
    assert_eq!(s.deployed["even-first"].active().unwrap().1.sha256, [3; 32]);
    // A shipped name starts at 2: version 1 is built in.
    assert!(s.apply(&deploy("round-robin", lb, 9, &[])).is_ok());
    assert_eq!(versions(&s, "round-robin"), vec![2]);
}

#[test]
fn a_name_keeps_its_kind_and_bad_deploys_are_refused() {
    let mut s = MetaState::default();
    let (lb, cp) = (PluginKind::LoadBalancer, PluginKind::Consistency);
    assert_eq!(code(s.apply(&deploy("strong", lb, 1, &[]))), Some(RejectCode::Invalid));
    assert!(s.apply(&deploy("mine", cp, 1, &[])).is_ok());
    assert_eq!(code(s.apply(&deploy("mine", lb, 2, &[]))), Some(RejectCode::Invalid));
    assert_eq!(
        code(s.apply(&deploy("Bad Name", lb, 1, &[]))),
        Some(RejectCode::Invalid)
    );
    let mut no_holders = deploy("x", lb, 1, &[]);
    if let MetaCommand::V2(CommandV2::DeployPlugin { holders, .. }) = &mut no_holders {
        holders.clear();
    }
    assert_eq!(code(s.apply(&no_holders)), Some(RejectCode::Invalid));
    assert_eq!(versions(&s, "x"), Vec::<u64>::new());
}

#[test]
fn collections_choose_load_balancers_and_a_used_plugin_stays() {
    let mut s = MetaState::default();
    assert!(s
        .apply(&MetaCommand::V1(CommandV1::CreateCollection {
            spec: spec("docs"),
            at_ms: 1
        }))
        .is_ok());
    let id = s.collection("docs").unwrap().id;
    assert_eq!(s.load_balancer_of(id), "round-robin");
    assert!(s.apply(&set_lb(id, "p2c-ewma")).is_ok());
    assert_eq!(s.load_balancer_of(id), "p2c-ewma");
    assert_eq!(code(s.apply(&set_lb(id, "strong"))), Some(RejectCode::Invalid));
    assert_eq!(code(s.apply(&set_lb(id, "nothing"))), Some(RejectCode::NotFound));
    assert_eq!(code(s.apply(&set_lb(999, "random"))), Some(RejectCode::NotFound));
    assert!(s.apply(&deploy("even-first", PluginKind::LoadBalancer, 1, &[])).is_ok());
    assert!(s.apply(&set_lb(id, "even-first")).is_ok());
    // In use: refused; once the collection moves on, removed.
    assert_eq!(code(s.apply(&remove("even-first"))), Some(RejectCode::Invalid));
    assert!(s.apply(&set_lb(id, "round-robin")).is_ok());
    assert!(s.balancers.is_empty(), "the default is not stored");
    assert!(s.apply(&remove("even-first")).is_ok());
    assert_eq!(code(s.apply(&remove("even-first"))), Some(RejectCode::NotFound));
    // A shipped plugin's deployed versions can go even while used.
    assert!(s.apply(&deploy("random", PluginKind::LoadBalancer, 4, &[])).is_ok());
    assert!(s.apply(&set_lb(id, "random")).is_ok());
    assert!(s.apply(&remove("random")).is_ok());
    assert_eq!(s.load_balancer_of(id), "random");
    // Dropping the collection drops its choice.
    assert!(s
        .apply(&MetaCommand::V1(CommandV1::DropCollection { name: "docs".into() }))
        .is_ok());
    assert!(s.balancers.is_empty());
}
