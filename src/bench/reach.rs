//! `--mode reach`: rows of an HNSW graph that a search for their own
//! vector does not return, before and after the graph is linked through
//! (`Index::link_unreached`, which the engine runs after every build).
//!
//! Builds usearch graphs as the engine does (`--m`, `--ef-construction`,
//! rows added by `--concurrency` threads at once, no key lookups) over the
//! clustered data of the engine mode and over uniform random data, then
//! searches every row's own vector (k 10, at each `--ef-sweep` expansion)
//! and counts the rows missing from their own answer; links the graph and
//! counts again. Under L2 and cosine a row is its own nearest, so a
//! missing row is one the walk did not reach. Searches here use usearch's
//! own distance kernels (the engine installs its own for the walk; the
//! graph's shape is the same).

use std::time::Instant;

use anyhow::{Context, Result};
use edgevec_engine::metric;
use edgevec_proto::Metric;
use rayon::prelude::*;
use usearch::{Index, IndexOptions, MetricKind, ScalarKind};

use crate::engine::clustered;
use crate::Args;

/// Rows whose own vector's top 10 at `ef` leaves them out.
fn self_misses(index: &Index, data: &[Vec<f32>], ef: usize) -> Result<usize> {
    let missed: Result<Vec<bool>> = data
        .par_iter()
        .enumerate()
        .map(|(row, v)| {
            let found = index
                .search_expanded(v, 10, ef, false)
                .map_err(|e| anyhow::anyhow!("search: {e}"))?;
            Ok(!found.keys.contains(&(row as u64)))
        })
        .collect();
    Ok(missed?.into_iter().filter(|&m| m).count())
}

pub fn run(args: &Args) -> Result<()> {
    let threads = args.concurrency.max(1);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build()?;
    println!(
        "### Rows a search for their own vector misses: {} × {}, M {}, ef_construction {}, {threads} threads adding\n",
        args.n, args.dim, args.m, args.ef_construction
    );
    let mut header = "| data | metric | links added | linking ms |".to_string();
    let mut rule = "|---|---|---:|---:|".to_string();
    for ef in &args.ef_sweep {
        header += &format!(" missed at ef {ef}, before | after |");
        rule += "---:|---:|";
    }
    println!("{header}\n{rule}");
    for (data_name, metric) in [
        ("clustered", Metric::L2),
        ("clustered", Metric::Cosine),
        ("uniform", Metric::L2),
        ("uniform", Metric::Cosine),
    ] {
        let data = if data_name == "clustered" {
            clustered(args.n, args.dim, args.clusters, 7, metric)
        } else {
            let mut data = crate::vectors(args.n, args.dim, 11);
            if metric == Metric::Cosine {
                for v in &mut data {
                    metric::normalize(v);
                }
            }
            data
        };
        let options = IndexOptions {
            dimensions: args.dim,
            metric: if metric == Metric::L2 {
                MetricKind::L2sq
            } else {
                MetricKind::IP
            },
            quantization: ScalarKind::F32,
            connectivity: args.m,
            expansion_add: args.ef_construction,
            expansion_search: 64,
            multi: false,
        };
        let index = Index::new_without_key_lookups(&options).context("new index")?;
        index.reserve_capacity_and_threads(args.n, threads).context("reserve")?;
        pool.install(|| {
            data.par_iter()
                .enumerate()
                .try_for_each(|(row, v)| index.add(row as u64, v))
        })
        .context("add")?;
        let before: Vec<usize> = args
            .ef_sweep
            .iter()
            .map(|&ef| pool.install(|| self_misses(&index, &data, ef)))
            .collect::<Result<_>>()?;
        let started = Instant::now();
        let links = index.link_unreached().context("link")?;
        let linking = started.elapsed();
        let mut line = format!(
            "| {data_name} | {metric} | {links} | {:.1} |",
            linking.as_secs_f64() * 1000.0
        );
        for (i, &ef) in args.ef_sweep.iter().enumerate() {
            let after = pool.install(|| self_misses(&index, &data, ef))?;
            line += &format!(" {} | {after} |", before[i]);
        }
        println!("{line}");
    }
    Ok(())
}
