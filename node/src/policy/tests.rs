//! The host with real components: the shipped plugins against the SDK
//! harness, and hostile modules refused at load or contained at call time.

use std::sync::Arc;

use edgevec_policy::harness::Harness;
use edgevec_policy::{
    decode_order, decode_requirements, replica_words, Configuration, ConsistencyPolicy, ConsistencyRequestInfo,
    LoadBalancer, ReplicaInfo, ReplicaState, RequestInfo,
};

use super::builtin::builtin;
use super::*;

/// Seeded, varied candidates: zones, loads, latencies, flags and states.
fn random_replicas(rng: &mut SplitMix64, n: usize) -> Vec<ReplicaInfo> {
    (0..n)
        .map(|i| {
            let mut r = ReplicaInfo::new(i as u64 + 1);
            let bits = rng.next_u64();
            r.zone = (bits & 1 == 0).then_some(((bits >> 1) % 3) as u32);
            r.primary = i == (bits >> 8) as usize % n;
            r.ejected = bits >> 16 & 7 == 0;
            r.serviceable = bits >> 20 & 7 != 0;
            r.state = match bits >> 24 & 7 {
                0 => ReplicaState::CatchingUp,
                1 => ReplicaState::Offline,
                2 => ReplicaState::Damaged,
                _ => ReplicaState::InSync,
            };
            r.in_flight = bits >> 28 & 63;
            r.latency_us = (bits >> 34 & 3 != 0).then_some(100 + (bits >> 36) % 10_000);
            r.since_sample_ms = r.latency_us.map(|_| (bits >> 50) % 20_000);
            r.errors = bits >> 62;
            r
        })
        .collect()
}

/// The compiled component of `name` and `P` natively give the same packed
/// answers for the same seeded inputs, from 1 to 16 candidates.
fn same_balancer<P: LoadBalancer>(name: &str) {
    let config = Configuration::with_zones(&["a", "b", "c"]);
    let loaded = engine()
        .load_blocking(name.into(), builtin(name).unwrap(), config.clone())
        .unwrap();
    assert_eq!(loaded.kind, Kind::LoadBalancer, "{name}");
    let mut h = Harness::<P>::load_balancer(&config, 7).unwrap();
    let mut rng = SplitMix64::new(11);
    for n in 1..=16 {
        for seq in 0..25u64 {
            let rs = random_replicas(&mut rng, n);
            let bits = rng.next_u64();
            let req = RequestInfo {
                collection: 3,
                shard: (bits % 4) as u32,
                client_zone: (bits & 8 == 0).then_some((bits >> 4) as u32 % 3),
                level: (bits >> 8) as u32 % 4,
                deadline_ms: 1000,
                tried: (bits >> 12) & ((1 << n) - 1) & (bits >> 30),
                sequence: seq,
            };
            let host = loaded.call_order(&req.words(), &replica_words(&rs)).unwrap();
            assert_eq!(host, h.order_packed(&req, &rs), "{name}: {n} candidates, read {seq}");
            decode_order(host, n).unwrap_or_else(|e| panic!("{name}: invalid answer {e}"));
        }
    }
    assert_eq!(loaded.stats.failures.load(Ordering::Relaxed), 0, "{name}");
}

fn same_consistency<P: ConsistencyPolicy>(name: &str) {
    let config = Configuration::with_zones(&["a", "b", "c"]);
    let loaded = engine()
        .load_blocking(name.into(), builtin(name).unwrap(), config.clone())
        .unwrap();
    assert_eq!(loaded.kind, Kind::Consistency, "{name}");
    let mut h = Harness::<P>::consistency(&config, 7).unwrap();
    let mut rng = SplitMix64::new(13);
    for n in 1..=16 {
        for _ in 0..25 {
            let rs = random_replicas(&mut rng, n);
            let bits = rng.next_u64();
            let req = ConsistencyRequestInfo {
                collection: 3,
                shard: 0,
                client_zone: None,
                level: (bits % 4) as u32,
                bound_ms: if bits & 16 == 0 { 0 } else { (bits >> 5) % 10_000 },
                session: (bits & 32 == 0).then_some((bits >> 40 & 7, bits >> 43 & 1023)),
                deadline_ms: 1000,
            };
            let host = loaded.call_requirements(&req.words(), &replica_words(&rs)).unwrap();
            assert_eq!(host, h.requirements_packed(&req, &rs), "{name}: {n} candidates");
            decode_requirements(host, n).unwrap_or_else(|e| panic!("{name}: invalid answer {e}"));
        }
    }
    assert_eq!(loaded.stats.failures.load(Ordering::Relaxed), 0, "{name}");
}

#[test]
fn every_shipped_plugin_answers_as_its_native_code_does() {
    same_balancer::<edgevec_plugin_round_robin::RoundRobin>("round-robin");
    same_balancer::<edgevec_plugin_least_connections::LeastConnections>("least-connections");
    same_balancer::<edgevec_plugin_random::Random>("random");
    same_balancer::<edgevec_plugin_p2c_ewma::P2cEwma>("p2c-ewma");
    same_balancer::<edgevec_plugin_zone_aware::ZoneAware>("zone-aware");
    same_consistency::<edgevec_plugin_strong::Strong>("strong");
    same_consistency::<edgevec_plugin_bounded::Bounded>("bounded");
    same_consistency::<edgevec_plugin_session::Session>("session");
    same_consistency::<edgevec_plugin_eventually::Eventually>("eventually");
}

fn engine() -> PolicyEngine {
    PolicyEngine::new(HostInputs::Seeded { now_ns: 0, seed: 7 }).unwrap()
}

fn config() -> Configuration {
    Configuration::with_zones(&["a", "b"])
}

fn load(bytes: &[u8]) -> Result<Arc<Loaded>, PluginError> {
    engine().load_blocking("test".into(), bytes, config())
}

/// A core module shaped like a load balancer built by hand: a bump
/// allocator, a `configure` that accepts anything, and `order` = `body`
/// (locals: none; must leave an i64). `extra` adds module fields.
fn balancer_wat(body: &str, extra: &str) -> Vec<u8> {
    let text = format!(
        r#"(module
  {extra}
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 1024))
  (func (export "cabi_realloc") (param i32 i32 i32 i32) (result i32)
    (local $p i32)
    (local.set $p (i32.and (i32.add (global.get $heap) (i32.sub (local.get 2) (i32.const 1)))
                           (i32.sub (i32.const 0) (local.get 2))))
    (global.set $heap (i32.add (local.get $p) (local.get 3)))
    (block $ok
      (br_if $ok (i32.le_u (global.get $heap) (i32.mul (memory.size) (i32.const 65536))))
      (drop (memory.grow (i32.add (i32.const 1)
        (i32.div_u (i32.sub (global.get $heap) (i32.mul (memory.size) (i32.const 65536))) (i32.const 65536))))))
    (local.get $p))
  (func (export "edgevec:policy/balancer@1.0.0#configure")
    (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)
    (i32.store8 (i32.const 0) (i32.const 0))
    (i32.const 0))
  (func $order (export "edgevec:policy/balancer@1.0.0#order") (param i32 i32 i32 i32) (result i64)
    {body})
)"#
    );
    wat::parse_str(text).unwrap()
}

fn three() -> (Vec<u64>, Vec<u64>) {
    let rs: Vec<ReplicaInfo> = (1..=3).map(ReplicaInfo::new).collect();
    (RequestInfo::default().words().to_vec(), replica_words(&rs))
}

#[test]
fn a_hand_written_core_module_is_given_the_contract() {
    // No component-type section: the node embeds its own contract.
    let loaded = load(&balancer_wat("(i64.const 0x21)", "")).unwrap();
    let (req, rs) = three();
    assert_eq!(loaded.call_order(&req, &rs).unwrap(), 0x21);
    assert_eq!(decode_order(0x21, 3).unwrap(), vec![2, 0, 1]);
}

#[test]
fn an_endless_loop_runs_out_of_fuel_and_the_next_call_gets_a_fresh_instance() {
    let loaded = load(&balancer_wat("(loop $l (br $l)) (i64.const 0)", "")).unwrap();
    let (req, rs) = three();
    for _ in 0..3 {
        assert_eq!(loaded.call_order(&req, &rs), Err(CallError::Fuel(CALL_FUEL)));
    }
    assert_eq!(loaded.stats.failures.load(Ordering::Relaxed), 3);
    // One instance at load, then one per call after each poisoned Store.
    assert!(loaded.stats.instances.load(Ordering::Relaxed) >= 3);
}

#[test]
fn a_memory_grower_is_stopped_at_the_limit_and_the_reason_is_kept() {
    let body = "(loop $l (br_if $l (i32.ne (memory.grow (i32.const 16)) (i32.const -1)))) unreachable";
    let loaded = load(&balancer_wat(body, "")).unwrap();
    let (req, rs) = three();
    match loaded.call_order(&req, &rs) {
        Err(CallError::Memory(why)) => assert!(why.contains("limit"), "{why}"),
        other => panic!("expected a memory-limit failure, got {other:?}"),
    }
    assert!(loaded
        .stats
        .last_failure
        .lock()
        .unwrap()
        .as_deref()
        .is_some_and(|f| f.contains("memory limit")));
}

#[test]
fn deep_recursion_overflows_the_wasm_stack_not_the_node() {
    let extra = "(func $down (param i64) (result i64) (call $down (i64.add (local.get 0) (i64.const 1))))";
    let loaded = load(&balancer_wat("(call $down (i64.const 0))", extra)).unwrap();
    let (req, rs) = three();
    match loaded.call_order(&req, &rs) {
        // Fuel or the stack limit, whichever comes first: both contain it.
        Err(CallError::Trap(m)) => assert!(m.contains("stack"), "{m}"),
        Err(CallError::Fuel(_)) => {}
        other => panic!("expected a contained failure, got {other:?}"),
    }
}

#[test]
fn a_trap_on_every_call_is_counted_each_time() {
    let loaded = load(&balancer_wat("unreachable", "")).unwrap();
    let (req, rs) = three();
    for _ in 0..5 {
        assert!(matches!(loaded.call_order(&req, &rs), Err(CallError::Trap(_))));
    }
    assert_eq!(loaded.stats.failures.load(Ordering::Relaxed), 5);
    assert_eq!(loaded.stats.calls.load(Ordering::Relaxed), 5);
}

#[test]
fn hostile_or_foreign_bytes_are_refused_with_the_reason() {
    let wasi = balancer_wat(
        "(i64.const 0)",
        r#"(import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))"#,
    );
    match load(&wasi) {
        Err(PluginError::Import(m)) => assert!(m.contains("WASI") && m.contains("fd_write"), "{m}"),
        other => panic!("{other:?}"),
    }
    let foreign = balancer_wat("(i64.const 0)", r#"(import "env" "abort" (func))"#);
    match load(&foreign) {
        Err(PluginError::Import(m)) => assert!(m.contains("env.abort"), "{m}"),
        other => panic!("{other:?}"),
    }
    let v2 = wat::parse_str(
        r#"(module (memory (export "memory") 1)
            (func (export "edgevec:policy/balancer@2.0.0#order") (param i32 i32 i32 i32) (result i64) (i64.const 0)))"#,
    )
    .unwrap();
    match load(&v2) {
        Err(PluginError::Version(m)) => assert!(m.contains("@2.0.0") && m.contains("@1.x"), "{m}"),
        other => panic!("{other:?}"),
    }
    let nothing = wat::parse_str(r#"(module (func (export "run")))"#).unwrap();
    assert!(matches!(load(&nothing), Err(PluginError::WrongWorld(_))));
    // Right names, wrong shape: `order` without its parameters.
    let bad_shape = wat::parse_str(
        r#"(module (memory (export "memory") 1)
            (func (export "cabi_realloc") (param i32 i32 i32 i32) (result i32) (i32.const 0))
            (func (export "edgevec:policy/balancer@1.0.0#configure") (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32) (i32.const 0))
            (func (export "edgevec:policy/balancer@1.0.0#order") (result i64) (i64.const 0)))"#,
    )
    .unwrap();
    assert!(matches!(load(&bad_shape), Err(PluginError::WrongWorld(_))));
    let mut noise = vec![0u8; 4096];
    let mut rng = SplitMix64::new(3);
    for b in noise.iter_mut() {
        *b = rng.next_u64() as u8;
    }
    assert!(matches!(load(&noise), Err(PluginError::NotWasm(_))));
    let mut big = balancer_wat("(i64.const 0)", "");
    big.resize(10 * 1024 * 1024, 0);
    assert!(matches!(load(&big), Err(PluginError::TooLarge { .. })));
    let many: String = (0..MAX_FUNCTIONS + 1).map(|i| format!("(func $f{i})")).collect();
    match load(&balancer_wat("(i64.const 0)", &many)) {
        Err(PluginError::TooManyFunctions { functions, limit }) => {
            assert!(functions > limit)
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_configure_error_refuses_the_load_with_the_plugins_words() {
    // configure returns err("no zones given") from a static string.
    let text = r#"(module
      (memory (export "memory") 1)
      (data (i32.const 64) "no zones given")
      (func (export "cabi_realloc") (param i32 i32 i32 i32) (result i32) (i32.const 1024))
      (func (export "edgevec:policy/balancer@1.0.0#configure")
        (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)
        (i32.store8 (i32.const 0) (i32.const 1))
        (i32.store (i32.const 4) (i32.const 64))
        (i32.store (i32.const 8) (i32.const 14))
        (i32.const 0))
      (func (export "edgevec:policy/balancer@1.0.0#order") (param i32 i32 i32 i32) (result i64) (i64.const 0)))"#;
    match load(&wat::parse_str(text).unwrap()) {
        Err(PluginError::Configure(m)) => assert_eq!(m, "no zones given"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_registry_falls_back_swaps_versions_and_opens_the_breaker() {
    use super::registry::{Fallback, Policies, BREAKER_FAILURES};
    let policies = Policies::new(engine());
    let (req, rs) = three();
    // Nothing loaded under that name: the given order.
    assert_eq!(
        policies.order("lb", &req, &rs, 3),
        (vec![0, 1, 2], Some(Fallback::NotLoaded))
    );
    // Version 1 puts candidate 2 first; version 2 candidate 1.
    let v1 = engine()
        .load_blocking("lb".into(), &balancer_wat("(i64.const 0x21)", ""), config())
        .unwrap();
    policies.install(v1, 1, "test");
    assert_eq!(policies.order("lb", &req, &rs, 3), (vec![2, 0, 1], None));
    let v2 = engine()
        .load_blocking("lb".into(), &balancer_wat("(i64.const 0x11)", ""), config())
        .unwrap();
    policies.install(v2, 2, "test");
    assert_eq!(policies.order("lb", &req, &rs, 3), (vec![1, 0, 2], None));
    // An answer naming a candidate that does not exist: given order.
    let bad = engine()
        .load_blocking("lb".into(), &balancer_wat("(i64.const 0x91)", ""), config())
        .unwrap();
    policies.install(bad, 3, "test");
    assert_eq!(
        policies.order("lb", &req, &rs, 3),
        (vec![0, 1, 2], Some(Fallback::Failed))
    );
    // A plugin that always traps is disabled after BREAKER_FAILURES calls.
    let trap = engine()
        .load_blocking("lb".into(), &balancer_wat("unreachable", ""), config())
        .unwrap();
    policies.install(trap, 4, "test");
    for _ in 0..BREAKER_FAILURES {
        assert_eq!(policies.order("lb", &req, &rs, 3).1, Some(Fallback::Failed));
    }
    assert_eq!(policies.order("lb", &req, &rs, 3).1, Some(Fallback::Disabled));
    let report = policies.report();
    let lb = report.iter().find(|r| r.name == "lb").unwrap();
    assert_eq!(lb.version, 4);
    assert_eq!(lb.failures, BREAKER_FAILURES);
    assert!(
        lb.disabled.as_deref().is_some_and(|d| d.contains("circuit breaker")),
        "{lb:?}"
    );
    assert!(lb.fallbacks.contains(&(Fallback::Disabled, 1)), "{lb:?}");
}

#[test]
fn a_compiled_plugin_is_cached_and_a_tampered_artifact_is_recompiled() {
    let dir = tempfile::tempdir().unwrap();
    let engine = || engine().with_cache(dir.path()).unwrap();
    let bytes = builtin("round-robin").unwrap();
    let (req, rs) = three();
    let first = engine().load_blocking("rr".into(), bytes, config()).unwrap();
    assert_eq!(first.source, Source::Compiled);
    let answer = first.call_order(&req, &rs).unwrap();
    let second = engine().load_blocking("rr".into(), bytes, config()).unwrap();
    assert_eq!(second.source, Source::Cache);
    assert_eq!(second.call_order(&req, &rs).unwrap(), answer);
    // Flip a byte in the middle of the artifact: detected, recompiled.
    let artifact = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "cwasm"))
        .unwrap();
    let mut damaged = std::fs::read(&artifact).unwrap();
    let mid = damaged.len() / 2;
    damaged[mid] ^= 0xFF;
    std::fs::write(&artifact, damaged).unwrap();
    let third = engine().load_blocking("rr".into(), bytes, config()).unwrap();
    assert_eq!(third.source, Source::Compiled);
    assert_eq!(third.call_order(&req, &rs).unwrap(), answer);
    // And the recompiled artifact replaced the damaged one.
    let fourth = engine().load_blocking("rr".into(), bytes, config()).unwrap();
    assert_eq!(fourth.source, Source::Cache);
}

#[test]
fn unused_bytes_and_artifacts_go_and_used_ones_stay() {
    use std::collections::HashSet;
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let store = super::store::BlobStore::open(&dir.path().join("blobs")).unwrap();
    let a = builtin("random").unwrap();
    let b = builtin("strong").unwrap();
    let sha = |bytes: &[u8]| -> [u8; 32] {
        use sha2::Digest;
        sha2::Sha256::digest(bytes).into()
    };
    store.put(&sha(a), a).unwrap();
    store.put(&sha(b), b).unwrap();
    // A wrong hash is refused and nothing is written.
    assert!(store.put(&sha(a), b).is_err());
    let keep: HashSet<String> = [super::cache::sha256_hex(a)].into();
    // Too young: nothing goes.
    assert!(store.remove_unused(&keep, Duration::from_secs(600)).is_empty());
    let removed = store.remove_unused(&keep, Duration::ZERO);
    assert_eq!(removed.len(), 1, "{removed:?}");
    assert!(store.get(&sha(a)).is_some());
    assert!(store.get(&sha(b)).is_none());

    let cache_dir = dir.path().join("compiled");
    let engine = engine().with_cache(&cache_dir).unwrap();
    engine.load_blocking("a".into(), a, config()).unwrap();
    engine.load_blocking("b".into(), b, config()).unwrap();
    let removed = engine.remove_unused_artifacts(&keep, Duration::ZERO);
    assert_eq!(removed.len(), 2, "the artifact of b and its checksum: {removed:?}");
    assert_eq!(
        engine.load_blocking("a".into(), a, config()).unwrap().source,
        Source::Cache
    );
    assert_eq!(
        engine.load_blocking("b".into(), b, config()).unwrap().source,
        Source::Compiled
    );

    // Damaged stored bytes are set aside, not served.
    let path = dir
        .path()
        .join("blobs")
        .join(format!("{}.wasm", super::cache::sha256_hex(a)));
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[100] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    assert!(store.get(&sha(a)).is_none());
    assert!(path.with_extension("damaged").exists());
}
