//! `--mode local`: the engine in process on a stopped node's data, with
//! the same query and truth files as `edgevec bench search`.
//!
//! Opens `--data-dir` (a node's `engine` directory; the node must be
//! stopped), waits for its indexes, and searches collection
//! `--collection` the way the node does (`search_replicas` over its local
//! replicas) from `--concurrency` threads for `--duration-secs`, at `--ef`.
//! Prints QPS, latency percentiles and, with `--truth`, recall@k: the
//! in-process side of "the cluster against the engine on the same index".

use edgevec_engine::SearchOptions;
use edgevec_node::cli::read_matrix;
use edgevec_proto::Hit;

use super::*;

pub fn run(args: &Args) -> Result<()> {
    let dir = args.data_dir.as_deref().context("--mode local needs --data-dir")?;
    let queries_file = args
        .queries_file
        .as_deref()
        .context("--mode local needs --queries-file")?;
    let queries: Arc<Vec<Vec<f32>>> = Arc::new(read_matrix(queries_file, "float32 (dtype '<f4')")?);
    let truth: Option<Vec<Vec<i64>>> = args
        .truth_file
        .as_deref()
        .map(|path| read_matrix(path, "int64 (dtype '<i8')"))
        .transpose()?;
    let engine = Engine::open(dir, EngineOptions::default()).context("opening the data directory")?;
    if !engine.wait_for_indexes(Duration::from_secs(600)) {
        bail!("indexes not ready within 600 s");
    }
    let local = Arc::new(Local::open_named(&engine, &args.collection)?);
    let opts = SearchOptions {
        ef: args.ef.unwrap_or(edgevec_engine::SearchOptions::default().ef),
        exact: false,
    };
    let k = args.k;
    let duration = Duration::from_secs(args.duration_secs);
    // Warm-up: every query once, one thread.
    for q in queries.iter() {
        local.search_with(q, k, opts)?;
    }
    let started = Instant::now();
    let workers = args.concurrency;
    let handles: Vec<_> = (0..workers)
        .map(|w| {
            let (local, queries) = (local.clone(), queries.clone());
            std::thread::spawn(move || {
                let mut lat = Vec::new();
                let mut answers: Vec<(usize, Vec<Hit>)> = Vec::new();
                let mut i = w;
                while started.elapsed() < duration {
                    let q = i % queries.len();
                    let t = Instant::now();
                    let hits = local.search_with(&queries[q], k, opts)?;
                    lat.push(t.elapsed());
                    if answers.len() < queries.len() {
                        answers.push((q, hits));
                    }
                    i += workers;
                }
                Ok::<_, anyhow::Error>((lat, answers))
            })
        })
        .collect();
    let mut lat = Vec::new();
    let mut answers = Vec::new();
    for h in handles {
        let (l, a) = h.join().map_err(|_| anyhow::anyhow!("a search thread panicked"))??;
        lat.extend(l);
        answers.extend(a);
    }
    let wall = started.elapsed();
    lat.sort();
    let recall = truth.map(|truth| {
        let (mut found, mut wanted) = (0usize, 0usize);
        for (q, hits) in &answers {
            let want = &truth[*q][..(k as usize).min(truth[*q].len())];
            found += hits.iter().filter(|h| want.contains(&(h.id as i64))).count();
            wanted += want.len();
        }
        found as f64 / wanted.max(1) as f64
    });
    println!(
        "in process: {} threads, {:.1} s, {} searches ({:.1}/s); latency ms: p50 {:.2}  p95 {:.2}  p99 {:.2}{}",
        args.concurrency,
        wall.as_secs_f64(),
        lat.len(),
        lat.len() as f64 / wall.as_secs_f64(),
        ms(quantile(&lat, 0.50)),
        ms(quantile(&lat, 0.95)),
        ms(quantile(&lat, 0.99)),
        recall.map_or(String::new(), |r| format!("; recall@{k}: {r:.4}"))
    );
    Ok(())
}
