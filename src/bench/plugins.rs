//! `--mode plugins`: the cost of a policy decision through the WebAssembly
//! host next to the same Rust code called natively, for each shipped
//! plugin at 3 and 16 candidates; and load (check, compile, instantiate,
//! configure) time and memory per plugin.
//!
//! Calls are timed in batches of [`BATCH`] (a clock read costs about as
//! much as a native decision); p50 and p99 are over the batches' per-call
//! means. Inputs are seeded and vary from call to call.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use edgevec_node::policy::builtin::BUILTIN;
use edgevec_node::policy::{HostInputs, Loaded, PolicyEngine};
use edgevec_policy::{
    replica_words, Configuration, ConsistencyPolicy, ConsistencyRequest, ConsistencyRequestInfo, LoadBalancer, Order,
    ReplicaInfo, ReplicaState, Replicas, Request, RequestInfo, Requirements, SplitMix64,
};

use super::Args;

const BATCH: usize = 64;

/// Seeded inputs: `count` (request words, replica words) pairs.
fn inputs(n: usize, consistency: bool, count: usize) -> Vec<(Vec<u64>, Vec<u64>)> {
    let mut rng = SplitMix64::new(n as u64);
    (0..count)
        .map(|seq| {
            let rs: Vec<ReplicaInfo> = (0..n)
                .map(|i| {
                    let bits = rng.next_u64();
                    let mut r = ReplicaInfo::new(i as u64 + 1);
                    r.zone = Some((bits % 3) as u32);
                    r.primary = i == 0;
                    r.ejected = bits >> 8 & 15 == 0;
                    r.state = if bits >> 12 & 15 == 0 {
                        ReplicaState::CatchingUp
                    } else {
                        ReplicaState::InSync
                    };
                    r.in_flight = bits >> 16 & 15;
                    r.latency_us = Some(200 + (bits >> 20) % 5000);
                    r.since_sample_ms = Some((bits >> 40) % 1000);
                    r
                })
                .collect();
            let req = if consistency {
                ConsistencyRequestInfo {
                    collection: 1,
                    level: 1,
                    bound_ms: 500,
                    session: Some((1, seq as u64)),
                    deadline_ms: 1000,
                    ..ConsistencyRequestInfo::default()
                }
                .words()
                .to_vec()
            } else {
                RequestInfo {
                    collection: 1,
                    client_zone: Some((seq % 3) as u32),
                    deadline_ms: 1000,
                    sequence: seq as u64,
                    ..RequestInfo::default()
                }
                .words()
                .to_vec()
            };
            (req, replica_words(&rs))
        })
        .collect()
}

/// Per-call ns (p50, p99) of `call` over the inputs, in batches.
fn time_calls(
    inputs: &[(Vec<u64>, Vec<u64>)],
    batches: usize,
    mut call: impl FnMut(&[u64], &[u64]) -> u64,
) -> (f64, f64) {
    let mut sink = 0u64;
    // Warm-up: one pass.
    for (q, r) in inputs {
        sink = sink.wrapping_add(call(q, r));
    }
    let mut per_call = Vec::with_capacity(batches);
    let mut k = 0;
    for _ in 0..batches {
        let t = Instant::now();
        for _ in 0..BATCH {
            let (q, r) = &inputs[k % inputs.len()];
            sink = sink.wrapping_add(call(q, r));
            k += 1;
        }
        per_call.push(t.elapsed().as_nanos() as f64 / BATCH as f64);
    }
    std::hint::black_box(sink);
    per_call.sort_by(f64::total_cmp);
    (per_call[per_call.len() / 2], per_call[per_call.len() * 99 / 100])
}

fn native_lb<P: LoadBalancer>(config: &Configuration) -> impl FnMut(&[u64], &[u64]) -> u64 {
    let mut p = P::configure(config).expect("configure");
    move |q, r| {
        let rs = Replicas(r);
        let mut o = Order::new(rs.len());
        p.order(&Request(q), &rs, &mut o);
        o.packed()
    }
}

fn native_cp<P: ConsistencyPolicy>(config: &Configuration) -> impl FnMut(&[u64], &[u64]) -> u64 {
    let mut p = P::configure(config).expect("configure");
    move |q, r| {
        let rs = Replicas(r);
        let mut o = Requirements::new(rs.len());
        p.requirements(&ConsistencyRequest(q), &rs, &mut o);
        o.packed().0
    }
}

/// A decision: (request words, replica words) → packed answer.
type Decide = Box<dyn FnMut(&[u64], &[u64]) -> u64>;

fn native(name: &str, config: &Configuration) -> Decide {
    match name {
        "round-robin" => Box::new(native_lb::<edgevec_plugin_round_robin::RoundRobin>(config)),
        "least-connections" => Box::new(native_lb::<edgevec_plugin_least_connections::LeastConnections>(config)),
        "random" => Box::new(native_lb::<edgevec_plugin_random::Random>(config)),
        "p2c-ewma" => Box::new(native_lb::<edgevec_plugin_p2c_ewma::P2cEwma>(config)),
        "zone-aware" => Box::new(native_lb::<edgevec_plugin_zone_aware::ZoneAware>(config)),
        "strong" => Box::new(native_cp::<edgevec_plugin_strong::Strong>(config)),
        "bounded" => Box::new(native_cp::<edgevec_plugin_bounded::Bounded>(config)),
        "session" => Box::new(native_cp::<edgevec_plugin_session::Session>(config)),
        "eventually" => Box::new(native_cp::<edgevec_plugin_eventually::Eventually>(config)),
        other => panic!("no native build of {other}"),
    }
}

fn host_call(loaded: &Loaded) -> impl FnMut(&[u64], &[u64]) -> u64 + '_ {
    move |q, r| match loaded.kind {
        edgevec_node::policy::Kind::LoadBalancer => loaded.call_order(q, r).expect("plugin call"),
        edgevec_node::policy::Kind::Consistency => loaded.call_requirements(q, r).expect("plugin call").0,
    }
}

pub fn run(args: &Args) -> Result<()> {
    // A compiled-artifact cache of its own: the first load of each plugin
    // compiles and stores, a second engine then loads from the cache.
    let cache = tempfile::tempdir()?;
    let engine = PolicyEngine::new(HostInputs::Live)?.with_cache(cache.path())?;
    let config = Configuration::with_zones(&["a", "b", "c"]);
    let batches = args.queries.max(100);
    println!("### Policy decisions: WebAssembly host against native code\n");
    println!("Command: `bench --mode plugins --queries {}` (per-call means of batches of {BATCH} calls; {} batches per row)\n", args.queries, batches);
    println!("Machine: {}\n", super::usage::machine_line());
    println!(
        "| plugin | candidates | wasm p50 ns | wasm p99 ns | native p50 ns | native p99 ns | wasm / native (p50) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let mut loads = Vec::new();
    let rss_before = edgevec_node::metrics::resident_bytes().unwrap_or(0);
    let mut kept = Vec::new();
    for (name, bytes) in BUILTIN {
        let t = Instant::now();
        let loaded = engine.load_blocking(name.into(), bytes, config.clone())?;
        loads.push((name, bytes.len(), t.elapsed()));
        let consistency = loaded.kind == edgevec_node::policy::Kind::Consistency;
        for n in [3, 16] {
            let ins = inputs(n, consistency, 256);
            let (wp50, wp99) = time_calls(&ins, batches, host_call(&loaded));
            let (np50, np99) = time_calls(&ins, batches, native(name, &config));
            println!(
                "| {name} | {n} | {wp50:.0} | {wp99:.0} | {np50:.0} | {np99:.0} | {:.1}× |",
                wp50 / np50.max(0.01)
            );
        }
        kept.push(loaded);
    }
    let rss_after = edgevec_node::metrics::resident_bytes().unwrap_or(0);
    let cached = PolicyEngine::new(HostInputs::Live)?.with_cache(cache.path())?;
    println!("\n| plugin | bytes | load ms, compiling | load ms, from the cache |");
    println!("|---|---:|---:|---:|");
    for (name, size, took) in &loads {
        let t = Instant::now();
        let again = cached.load_blocking(
            (*name).into(),
            edgevec_node::policy::builtin::builtin(name).expect("shipped"),
            config.clone(),
        )?;
        let from_cache = t.elapsed();
        anyhow::ensure!(
            again.source == edgevec_node::policy::Source::Cache,
            "{name} was compiled again"
        );
        println!(
            "| {name} | {size} | {:.1} | {:.1} |",
            took.as_secs_f64() * 1000.0,
            from_cache.as_secs_f64() * 1000.0
        );
    }
    println!("\nBoth include the checks of the bytes (and turning a core module into a component), instantiating and `configure`.");
    println!(
        "\nResident memory grew by {:.1} MiB for the {} loaded plugins (each compiled, one instance on this thread): {:.2} MiB per plugin.",
        (rss_after.saturating_sub(rss_before)) as f64 / (1 << 20) as f64,
        kept.len(),
        (rss_after.saturating_sub(rss_before)) as f64 / (1 << 20) as f64 / kept.len() as f64
    );
    Ok(())
}

/// `--mode plugins-e2e`: search QPS on a 3-node cluster with the shipped
/// round-robin deciding through WebAssembly against its native build,
/// alternating the two (`plugin native on|off`) several times in one run.
pub async fn run_cluster(args: &super::Args, dir: &std::path::Path) -> Result<()> {
    let started = Instant::now();
    let load_before = super::usage::load_average();
    let (cluster, admin) = super::replicated_bench_cluster(args, dir).await?;
    // Every node's plugins loaded, indexes built: wait for quiet.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let queries = Arc::new(super::vectors(args.queries, args.dim, 2));
    let mut clients = Vec::new();
    for i in 0..args.concurrency {
        clients.push(super::connect(cluster.addrs[i % cluster.addrs.len()], &cluster.ca).await?);
    }
    println!("### Search through the WebAssembly load balancer against its native build\n");
    println!(
        "Command: `bench --mode plugins-e2e --n {} --dim {} --shards {} --concurrency {} --queries {} --trials {}`\n",
        args.n, args.dim, args.shards, args.concurrency, args.queries, args.trials
    );
    super::usage::print_machine(&load_before);
    println!("| round | decisions | QPS | p50 ms | p99 ms |");
    println!("|---:|---|---:|---:|---:|");
    let mut ratios = Vec::new();
    for round in 1..=args.trials.max(1) {
        let mut qps = [0.0f64; 2];
        // Alternate which goes first, so a drift in the machine's load
        // does not favour one side.
        let order: [bool; 2] = if round % 2 == 1 { [false, true] } else { [true, false] };
        for native in order {
            admin.set_native_policies(native).await?;
            tokio::time::sleep(Duration::from_millis(500)).await;
            let s = super::quic_search(&clients, &queries, 10).await?;
            qps[usize::from(native)] = s.qps;
            println!(
                "| {round} | {} | {:.0} | {:.2} | {:.2} |",
                if native { "native" } else { "WebAssembly" },
                s.qps,
                s.p50_ms,
                s.p99_ms
            );
        }
        ratios.push(qps[0] / qps[1]);
    }
    admin.set_native_policies(false).await?;
    // Hot swap: new versions of the active load balancer (the shipped
    // bytes with a changed parameter, so each is a new version), timed
    // from the deploy call to the moment every node reports it loaded,
    // while the clients keep searching.
    let searching = {
        let clients = clients.clone();
        let queries = queries.clone();
        tokio::spawn(async move { super::quic_search(&clients, &queries, 10).await })
    };
    let mut swaps = Vec::new();
    for i in 0..args.trials.max(1) {
        let bytes = edgevec_node::policy::builtin::builtin("round-robin").expect("shipped");
        let t = Instant::now();
        let (version, _) = admin
            .deploy_plugin("round-robin", bytes.to_vec(), vec![("swap".into(), i.to_string())])
            .await?;
        let deployed = t.elapsed();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let list = admin.list_plugins().await?;
            let everywhere = list
                .iter()
                .find(|p| p.name == "round-robin")
                .is_some_and(|p| p.nodes.iter().all(|n| n.state == "loaded" && n.version == version));
            if everywhere {
                break;
            }
            if Instant::now() > deadline {
                anyhow::bail!("version {version} of round-robin not loaded everywhere within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        swaps.push((deployed, t.elapsed()));
    }
    let during = searching.await??;
    ratios.sort_by(f64::total_cmp);
    let median = ratios[ratios.len() / 2];
    println!(
        "\nQPS WebAssembly / native per round: {} — median **{median:.3}** (spread {:.3}-{:.3}; target ≥ 0.97). {} s in all; load average {} at the end.",
        ratios.iter().map(|r| format!("{r:.3}")).collect::<Vec<_>>().join(", "),
        ratios[0],
        ratios[ratios.len() - 1],
        started.elapsed().as_secs(),
        super::usage::load_average()
    );
    println!(
        "\nHot swap of the active load balancer on 3 nodes while {} clients search ({:.0} QPS meanwhile, {:.2} ms p99): deploy call returned / every node runs the new version, ms: {}.",
        args.concurrency,
        during.qps,
        during.p99_ms,
        swaps
            .iter()
            .map(|(d, all)| format!("{:.0} / {:.0}", d.as_secs_f64() * 1e3, all.as_secs_f64() * 1e3))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for c in clients {
        c.close().await;
    }
    admin.close().await;
    Ok(())
}
