//! `--mode quant`: what the vectors a graph walk reads could be held in,
//! and what reading the exact rows back for the final scores costs.
//!
//! Builds usearch graphs (`--m`, `--ef-construction`, rows added by
//! `--concurrency` threads, usearch's own kernels) over the clustered
//! data of the engine mode with the vectors held as f32, f16 and i8 (one
//! scale for the whole data set: `x · 127 / max |x|`, the queries alike,
//! so that integer L2 and dot products rank as the scaled floats do;
//! usearch's own cast to i8 scales each vector by its norm, which only
//! suits cosine). Each `--ef-sweep` expansion is searched twice: scores
//! from the held vectors (the walk's top `k`), and the walk's top
//! `--rescore × k` scored again from the exact f32 rows, read with one
//! `pread` each from a row file of them (`edgevec_engine::rowfile`; the
//! page cache holds it, memory the kernel may reclaim, not the process's),
//! the best `k` of those kept. Reports recall@k against exact search, QPS at
//! `--concurrency` threads, and the bytes of the vectors each graph holds
//! (the graph itself is the same size in all three).

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use edgevec_engine::metric;
use edgevec_engine::rowfile::RowFile;
use edgevec_proto::Metric;
use rayon::prelude::*;
use usearch::{Index, IndexOptions, MetricKind, ScalarKind};

use crate::engine::{clustered, exact_truth, recall};
use crate::Args;

/// How a graph holds its vectors.
#[derive(Clone, Copy, PartialEq)]
enum Held {
    F32,
    F16,
    I8,
}

impl Held {
    fn name(self) -> &'static str {
        match self {
            Held::F32 => "f32",
            Held::F16 => "f16",
            Held::I8 => "i8",
        }
    }

    fn bytes(self) -> usize {
        match self {
            Held::F32 => 4,
            Held::F16 => 2,
            Held::I8 => 1,
        }
    }
}

/// `v · scale`, rounded into i8.
fn to_i8(v: &[f32], scale: f32) -> Vec<i8> {
    v.iter()
        .map(|x| (x * scale).round().clamp(-127.0, 127.0) as i8)
        .collect()
}

struct Point {
    qps: f64,
    recall: f64,
}

/// The walk's candidates for every query (best first, `count` of them).
fn walk(index: &Index, held: Held, queries: &[Vec<f32>], scale: f32, count: usize) -> Result<Vec<Vec<u64>>> {
    queries
        .par_iter()
        .map(|q| {
            let found = match held {
                Held::I8 => index.search(&to_i8(q, scale), count),
                _ => index.search(q, count),
            };
            Ok(found.map_err(|e| anyhow::anyhow!("search: {e}"))?.keys)
        })
        .collect()
}

/// The best `k` of `candidates` by exact score, each row read from `rows`.
fn rescore(metric: Metric, rows: &RowFile, dim: usize, q: &[f32], candidates: &[u64], k: usize) -> Result<Vec<u64>> {
    let mut v = vec![0f32; dim];
    let mut scored = Vec::with_capacity(candidates.len());
    for &row in candidates {
        rows.read_rows(row as u32, &mut v)?;
        scored.push((metric::score(metric, q, &v), row));
    }
    scored.sort_by(|a, b| metric::compare_scores(metric, a.0, b.0));
    Ok(scored.into_iter().take(k).map(|(_, row)| row).collect())
}

pub fn run(args: &Args, dir: &Path) -> Result<()> {
    let metric: Metric = args.metric.parse().map_err(anyhow::Error::msg)?;
    let (n, dim, k) = (args.n, args.dim, args.k as usize);
    let threads = args.concurrency.max(1);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build()?;
    let data = clustered(n, dim, args.clusters, 1, metric);
    let queries = clustered(args.queries, dim, args.clusters, 2, metric);
    let truth = exact_truth(metric, &data, &queries, k);
    let max_abs = data.iter().flatten().fold(0f32, |m, x| m.max(x.abs()));
    let scale = 127.0 / max_abs;

    std::fs::create_dir_all(dir)?;
    let rows_path = dir.join("rows.f32");
    let flat: Vec<f32> = data.iter().flatten().copied().collect();
    let rows = RowFile::create(&rows_path, dim, &flat)?;
    drop(flat);
    let rescore_count = k * args.rescore.max(1);

    println!(
        "### Vectors held for the walk: {n} × {dim} clustered ({} clusters), {metric}, M {}, ef_construction {}, k {k}, {} queries, {threads} threads; exact rows read back for the walk's top {rescore_count}\n",
        args.clusters, args.m, args.ef_construction, args.queries
    );
    crate::usage::print_machine(&crate::usage::load_average());
    let mut header = "| held | vectors MiB | build s |".to_string();
    let mut rule = "|---|---:|---:|".to_string();
    for ef in &args.ef_sweep {
        header += &format!(" ef {ef}: QPS / recall | read back: QPS / recall |");
        rule += "---:|---:|";
    }
    println!("{header}\n{rule}");
    for held in [Held::F32, Held::F16, Held::I8] {
        let options = IndexOptions {
            dimensions: dim,
            metric: match metric {
                Metric::L2 => MetricKind::L2sq,
                Metric::Cosine => MetricKind::Cos,
                Metric::InnerProduct => MetricKind::IP,
            },
            quantization: match held {
                Held::F32 => ScalarKind::F32,
                Held::F16 => ScalarKind::F16,
                Held::I8 => ScalarKind::I8,
            },
            connectivity: args.m,
            expansion_add: args.ef_construction,
            expansion_search: 64,
            multi: false,
        };
        let index = Index::new_without_key_lookups(&options).context("new index")?;
        index.reserve_capacity_and_threads(n, threads).context("reserve")?;
        let started = Instant::now();
        pool.install(|| {
            data.par_iter().enumerate().try_for_each(|(row, v)| match held {
                Held::I8 => index.add(row as u64, &to_i8(v, scale)),
                _ => index.add(row as u64, v),
            })
        })
        .context("add")?;
        let build = started.elapsed().as_secs_f64();
        let mut line = format!(
            "| {} | {:.1} | {build:.1} |",
            held.name(),
            (n * dim * held.bytes()) as f64 / 1048576.0
        );
        for &ef in &args.ef_sweep {
            index.change_expansion_search(ef);
            let mut points = Vec::new();
            for read_back in [false, true] {
                let started = Instant::now();
                let found: Vec<Vec<u64>> = pool.install(|| {
                    let count = if read_back { rescore_count } else { k };
                    let candidates = walk(&index, held, &queries, scale, count)?;
                    if !read_back {
                        return Ok::<_, anyhow::Error>(candidates);
                    }
                    candidates
                        .par_iter()
                        .zip(queries.par_iter())
                        .map(|(c, q)| rescore(metric, &rows, dim, q, c, k))
                        .collect()
                })?;
                points.push(Point {
                    qps: queries.len() as f64 / started.elapsed().as_secs_f64(),
                    recall: recall(&found, &truth, k),
                });
            }
            line += &format!(
                " {:.0} / {:.3} | {:.0} / {:.3} |",
                points[0].qps, points[0].recall, points[1].qps, points[1].recall
            );
        }
        println!("{line}");
    }
    std::fs::remove_file(&rows_path)?;
    Ok(())
}
