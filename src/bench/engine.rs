//! `--mode engine`: the search engine in process against hnswlib.
//!
//! Generates clustered data (a mixture of Gaussians: closer to real
//! embeddings than uniform noise), computes the exact top-k of every query
//! by brute force, and writes `data.npy`, `queries.npy` and `truth.npy`
//! (int64 ids) to the bench directory. Then, in one run on the same files:
//!
//! - the engine in process (`search_replicas`, the node's own call), one
//!   shard replica with one sealed segment of all rows (seal size above
//!   N), with the default seal size and no merges, and with the default
//!   seal size merged as a primary merges them (after every insert batch,
//!   the merge the compaction policy proposes is logged and applied; once
//!   the inserts are done, the merges it proposes for a quiet shard),
//!   `--concurrency` searching threads, at every `--ef` of the sweep;
//! - hnswlib (the pip package) at the same M and ef_construction with as
//!   many threads, run by `scripts/hnswlib_ref.py` under `--python`.
//!
//! Reports QPS and recall@k per `ef`, the index build seconds of each, and
//! the best QPS at recall ≥ 0.95 with its ratio to hnswlib's.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use edgevec_engine::compaction::MergePolicy;
use edgevec_engine::{metric, search_replicas, Engine, EngineOptions, ReplicaKey, ReplicaSpec, SearchOptions, ShardOp};
use edgevec_proto::{limits::DEFAULT_SEAL_ROWS, IndexSpec, Metric, OpId, Point};
use npyz::WriterBuilder;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

use crate::Args;

/// Gaussian clusters: `clusters` centres uniform in [-1, 1]^dim, each point
/// a centre plus N(0, sigma²) per component. Normalised for cosine.
pub fn clustered(n: usize, dim: usize, clusters: usize, seed: u64, metric: Metric) -> Vec<Vec<f32>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xc1u64 << 32 | clusters as u64);
    let centres: Vec<Vec<f32>> = (0..clusters)
        .map(|_| (0..dim).map(|_| rng.gen_range(-1.0f32..1.0)).collect())
        .collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let sigma = 0.25f32;
    (0..n)
        .map(|_| {
            let c = &centres[rng.gen_range(0..clusters)];
            let mut v: Vec<f32> = c.iter().map(|x| x + sigma * normal(&mut rng)).collect();
            if metric == Metric::Cosine {
                metric::normalize(&mut v);
            }
            v
        })
        .collect()
}

/// A standard normal sample (Box–Muller).
fn normal(rng: &mut impl Rng) -> f32 {
    let u: f32 = rng.gen_range(f32::EPSILON..1.0);
    let v: f32 = rng.gen_range(0.0..1.0);
    (-2.0 * u.ln()).sqrt() * (2.0 * std::f32::consts::PI * v).cos()
}

/// The exact top `k` row numbers of every query, best first.
pub fn exact_truth(metric: Metric, data: &[Vec<f32>], queries: &[Vec<f32>], k: usize) -> Vec<Vec<u64>> {
    queries
        .par_iter()
        .map(|q| {
            let mut scored: Vec<(f32, u64)> = data
                .iter()
                .enumerate()
                .map(|(i, x)| (metric::score(metric, q, x), i as u64))
                .collect();
            let better = |a: &(f32, u64), b: &(f32, u64)| metric::compare_scores(metric, a.0, b.0).then(a.1.cmp(&b.1));
            let nth = k.min(scored.len() - 1);
            scored.select_nth_unstable_by(nth, better);
            scored.truncate(k);
            scored.sort_by(better);
            scored.into_iter().map(|(_, i)| i).collect()
        })
        .collect()
}

/// Writes `rows` (all of one length) as a 2-d `.npy` matrix.
fn write_npy<T: npyz::AutoSerialize + Copy>(path: &Path, rows: &[Vec<T>]) -> Result<()> {
    let width = rows.first().map_or(0, |r| r.len());
    let file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut w = npyz::WriteOptions::<T>::new()
        .default_dtype()
        .shape(&[rows.len() as u64, width as u64])
        .writer(file)
        .begin_nd()?;
    for r in rows {
        w.extend(r.iter().copied())?;
    }
    w.finish()?;
    Ok(())
}

/// One point of a recall/QPS curve.
#[derive(Debug, Clone, Copy, serde::Deserialize)]
pub struct Point2 {
    pub ef: usize,
    pub qps: f64,
    pub recall: f64,
}

struct Side {
    name: String,
    build_s: f64,
    curve: Vec<Point2>,
}

pub fn recall(found: &[Vec<u64>], truth: &[Vec<u64>], k: usize) -> f64 {
    let hit: usize = found
        .iter()
        .zip(truth)
        .map(|(f, t)| f.iter().take(k).filter(|id| t[..k.min(t.len())].contains(id)).count())
        .sum();
    hit as f64 / (truth.len() * k) as f64
}

/// Query number and the ids found, for each query a thread ran.
type Answered = Vec<(usize, Vec<u64>)>;

/// Runs every query (in `threads` threads, each taking every
/// `threads`-th query) repeatedly for at least `min_time`; QPS and the
/// ids found in the last pass.
pub fn timed_queries(
    threads: usize,
    queries: &[Vec<f32>],
    min_time: Duration,
    one: &(dyn Fn(&[f32]) -> Result<Vec<u64>> + Sync),
) -> Result<(f64, Vec<Vec<u64>>)> {
    let started = Instant::now();
    let mut done = 0usize;
    loop {
        let results: Vec<Result<Answered>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    s.spawn(move || {
                        let mut out = Vec::new();
                        for (i, q) in queries.iter().enumerate().skip(t).step_by(threads) {
                            out.push((i, one(q)?));
                        }
                        Ok(out)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("query thread")).collect()
        });
        let mut found = vec![Vec::new(); queries.len()];
        for r in results {
            for (i, ids) in r? {
                found[i] = ids;
            }
        }
        done += queries.len();
        if started.elapsed() >= min_time {
            return Ok((done as f64 / started.elapsed().as_secs_f64(), found));
        }
    }
}

/// `data` as batches of `batch` points (at least 1), ids from 0 in order.
pub fn batches(data: &[Vec<f32>], batch: usize) -> impl Iterator<Item = Vec<Point>> + '_ {
    let batch = batch.max(1);
    data.chunks(batch).enumerate().map(move |(b, chunk)| {
        chunk
            .iter()
            .enumerate()
            .map(|(i, v)| Point {
                id: (b * batch + i) as u64,
                vector: v.clone(),
                payload: None,
            })
            .collect()
    })
}

/// Rows, queries and the exact top k of each query.
struct DataSet<'a> {
    data: &'a [Vec<f32>],
    queries: &'a [Vec<f32>],
    truth: &'a [Vec<u64>],
}

fn engine_side(
    args: &Args,
    dir: &Path,
    metric: Metric,
    set: &DataSet<'_>,
    seal_rows: u32,
    compact: bool,
) -> Result<Side> {
    let (data, queries, truth) = (set.data, set.queries, set.truth);
    let root = dir.join(format!("engine-seal-{seal_rows}-{compact}"));
    let _ = std::fs::remove_dir_all(&root);
    let engine = Engine::open(&root, EngineOptions::default())?;
    let replica = engine.create_replica(ReplicaSpec {
        key: ReplicaKey {
            collection: 1,
            shard: 0,
        },
        name: "bench".into(),
        dim: args.dim as u32,
        metric,
        seal_rows,
        index: IndexSpec {
            m: args.m as u32,
            ef_construction: args.ef_construction as u32,
        },
        fields: Vec::new(),
    })?;
    let inserted = Instant::now();
    let mut prev = OpId::ZERO;
    // Logs and applies `op` as the next op, as a primary does.
    let mut log = |op: ShardOp| -> Result<()> {
        let id = OpId::new(1, prev.lsn + 1);
        replica.append(prev, [(id, op)])?;
        replica.apply_through(id.lsn)?;
        prev = id;
        Ok(())
    };
    for points in batches(data, args.batch) {
        log(ShardOp::Upsert(points))?;
        while let Some(op) = compact
            .then(|| replica.merge_proposal(&MergePolicy::default()))
            .flatten()
        {
            log(op)?;
        }
    }
    if compact {
        // Writes have stopped: what a primary logs once the shard has been
        // quiet for `quiet_after` (without waiting that long here).
        let quiet = MergePolicy {
            quiet_after: Duration::ZERO,
            ..MergePolicy::default()
        };
        while let Some(op) = replica.merge_proposal(&quiet) {
            log(op)?;
        }
    }
    replica.flush()?;
    let insert_s = inserted.elapsed().as_secs_f64();
    if !engine.wait_for_indexes(Duration::from_secs(3600)) {
        bail!("indexes not built within an hour");
    }
    let (_, builds, build_s) = engine.index_builds();
    eprintln!(
        "engine (seal_rows {seal_rows}, merged {compact}): inserted {} rows in {insert_s:.1} s, {builds} index builds took {build_s:.1} s",
        data.len()
    );
    let replicas = [replica];
    let mut curve = Vec::new();
    for &ef in &args.ef_sweep {
        let opts = SearchOptions { ef, exact: false };
        let one = |q: &[f32]| -> Result<Vec<u64>> {
            let hits = search_replicas(&replicas, metric, &[q.to_vec()], args.k, false, opts, None)?;
            Ok(hits.into_iter().flatten().map(|h| h.id).collect())
        };
        let (qps, found) = timed_queries(args.concurrency, queries, Duration::from_secs(2), &one)?;
        let r = recall(&found, truth, args.k as usize);
        eprintln!("  ef {ef}: {qps:.0} QPS, recall@{} {r:.3}", args.k);
        curve.push(Point2 { ef, qps, recall: r });
    }
    let segments = replicas[0].info().1.len();
    drop(replicas);
    drop(engine);
    let merged = if compact { ", merged" } else { "" };
    Ok(Side {
        name: format!("edgevec engine, seal_rows {seal_rows}{merged} ({segments} segment(s))"),
        build_s,
        curve,
    })
}

#[derive(serde::Deserialize)]
struct Reference {
    build_s: f64,
    curve: Vec<Point2>,
    version: String,
}

fn hnswlib_side(args: &Args, dir: &Path, metric: Metric) -> Result<Side> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/hnswlib_ref.py");
    let efs: Vec<String> = args.ef_sweep.iter().map(|e| e.to_string()).collect();
    let out = Command::new(&args.python)
        .arg(&script)
        .arg("--dir")
        .arg(dir)
        .args(["--space", if metric == Metric::L2 { "l2" } else { "ip" }])
        .args(["--m", &args.m.to_string()])
        .args(["--ef-construction", &args.ef_construction.to_string()])
        .args(["--threads", &args.concurrency.to_string()])
        .args(["--k", &args.k.to_string()])
        .args(["--ef", &efs.join(",")])
        .output()
        .with_context(|| format!("running {} {}", args.python, script.display()))?;
    if !out.status.success() {
        bail!("hnswlib reference failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let r: Reference = serde_json::from_slice(&out.stdout).context("hnswlib reference output")?;
    eprintln!("hnswlib {}: build {:.1} s", r.version, r.build_s);
    Ok(Side {
        name: format!("hnswlib {} (pip)", r.version),
        build_s: r.build_s,
        curve: r.curve,
    })
}

/// Best QPS among points with recall ≥ `floor`.
fn best_at(curve: &[Point2], floor: f64) -> Option<Point2> {
    curve
        .iter()
        .filter(|p| p.recall >= floor)
        .copied()
        .max_by(|a, b| a.qps.total_cmp(&b.qps))
}

pub fn run(args: &Args, dir: &Path) -> Result<()> {
    let metric: Metric = args.metric.parse().map_err(anyhow::Error::msg)?;
    let (n, dim, k) = (args.n, args.dim, args.k as usize);
    let load = crate::usage::load_average();
    let t = Instant::now();
    let data = clustered(n, dim, args.clusters, 1, metric);
    let queries = clustered(args.queries, dim, args.clusters, 2, metric);
    let truth = exact_truth(metric, &data, &queries, k.max(1));
    write_npy(&dir.join("data.npy"), &data)?;
    write_npy(&dir.join("queries.npy"), &queries)?;
    let truth_i64: Vec<Vec<i64>> = truth.iter().map(|r| r.iter().map(|&i| i as i64).collect()).collect();
    write_npy(&dir.join("truth.npy"), &truth_i64)?;
    eprintln!("data, queries and exact truth in {:.1} s", t.elapsed().as_secs_f64());

    let reference = hnswlib_side(args, dir, metric)?;
    let set = DataSet {
        data: &data,
        queries: &queries,
        truth: &truth,
    };
    let mut sides = vec![engine_side(args, dir, metric, &set, n as u32, false)?];
    if (n as u32) > DEFAULT_SEAL_ROWS {
        for compact in [false, true] {
            sides.push(engine_side(args, dir, metric, &set, DEFAULT_SEAL_ROWS, compact)?);
        }
    }
    sides.push(reference);

    println!(
        "### {n} × {dim} clustered ({} clusters), {metric}, M {}, ef_construction {}, k {k}, {} queries, {} threads\n",
        args.clusters, args.m, args.ef_construction, args.queries, args.concurrency
    );
    crate::usage::print_machine(&load);
    println!(
        "kernels on this CPU: {}; hnswlib built by pip with -march=native\n",
        edgevec_engine::kernels(metric, dim)
    );
    print!("| ef |");
    for s in &sides {
        print!(" {} QPS | recall@{k} |", s.name);
    }
    println!();
    print!("|---:|");
    for _ in &sides {
        print!("---:|---:|");
    }
    println!();
    for (i, ef) in args.ef_sweep.iter().enumerate() {
        print!("| {ef} |");
        for s in &sides {
            let p = s.curve[i];
            print!(" {:.0} | {:.3} |", p.qps, p.recall);
        }
        println!();
    }
    let hnswlib = sides.last().expect("reference side");
    let reference_best = best_at(&hnswlib.curve, 0.95);
    println!("\n| | index build (s) | build ÷ hnswlib | best QPS at recall ≥ 0.95 | ÷ hnswlib |");
    println!("|---|---:|---:|---:|---:|");
    for s in &sides {
        let best = best_at(&s.curve, 0.95);
        let ratio = match (best, reference_best) {
            (Some(b), Some(r)) => format!("{:.2}×", b.qps / r.qps),
            _ => "–".into(),
        };
        println!(
            "| {} | {:.1} | {:.2}× | {} | {ratio} |",
            s.name,
            s.build_s,
            s.build_s / hnswlib.build_s,
            best.map_or("none".into(), |b| format!(
                "{:.0} (ef {}, recall {:.3})",
                b.qps, b.ef, b.recall
            )),
        );
    }
    Ok(())
}
