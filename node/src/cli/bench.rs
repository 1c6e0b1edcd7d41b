//! `edgevec bench`: load against a running cluster, for sizing one (like
//! `redis-benchmark` or `pgbench`).
//!
//! - `bench search NAME --queries Q.npy [--truth T.npy]`: `--concurrency`
//!   tasks share one persistent client (one QUIC connection, a stream per
//!   request, as an application holds it) and search one query each at a
//!   time, cycling through the file, for `--duration`; reports QPS, latency
//!   percentiles and, with `--truth` (int64, one row of true ids per query,
//!   best first), recall@k.
//! - `bench insert NAME --file X.npy`: batches of `--batch` rows (ids from
//!   `--start-id`), `--concurrency` in flight; reports rows per second and
//!   batch latency percentiles.
//!
//! Every error is counted and the first one shown; the run fails if no
//! request succeeded. Nothing is measured before the connection is up.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use edgevec_client::{Client, Point, ReadOpts};
use serde_json::json;
use tokio::task::JoinSet;

use super::{connect, Global};

#[derive(Subcommand, Debug)]
pub enum BenchCmd {
    /// Search QPS, latency and recall against a running cluster.
    Search(SearchArgs),
    /// Insert throughput and batch latency against a running cluster.
    Insert(InsertArgs),
}

#[derive(Args, Debug)]
pub struct SearchArgs {
    pub collection: String,
    /// Query vectors: a .npy float32 matrix (queries × dim).
    #[arg(long)]
    pub queries: PathBuf,
    /// True neighbours: a .npy int64 matrix, one row of ids per query, best
    /// first (at least k columns); gives recall@k.
    #[arg(long)]
    pub truth: Option<PathBuf>,
    #[arg(long, default_value_t = 10)]
    pub k: u32,
    /// Searches in flight at once.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// How long to run: `20s`, `1500ms`, `2m`.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    pub duration: Duration,
    /// HNSW search expansion (see `search --ef`).
    #[arg(long)]
    pub ef: Option<u32>,
    /// Brute-force searches (see `search --exact`).
    #[arg(long)]
    pub exact: bool,
    /// Payload filter of every search (see `search --filter`); `--truth`
    /// must then be the true neighbours among the passing points.
    #[arg(long)]
    pub filter: Option<String>,
}

#[derive(Args, Debug)]
pub struct InsertArgs {
    pub collection: String,
    /// Points: a .npy float32 matrix (rows × dim); row i gets id
    /// start_id + i.
    #[arg(long)]
    pub file: PathBuf,
    #[arg(long, default_value_t = 1000)]
    pub batch: usize,
    /// Batches in flight at once.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    #[arg(long, default_value_t = 0)]
    pub start_id: u64,
    /// Payloads: a JSON-lines file, line i the payload of row i (`null`
    /// or an empty line: none); as many lines as rows.
    #[arg(long)]
    pub payloads: Option<PathBuf>,
}

/// The payload of every row from a JSON-lines file (see
/// [`InsertArgs::payloads`]): `rows` lines, each a JSON value or empty.
fn read_payloads(path: &Path, rows: usize) -> Result<Vec<Option<String>>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let lines: Vec<&str> = text.lines().collect();
    if lines.len() != rows {
        bail!(
            "{} has {} lines for {rows} rows: one payload line per row",
            path.display(),
            lines.len()
        );
    }
    lines
        .iter()
        .enumerate()
        .map(|(i, line)| {
            let line = line.trim();
            if line.is_empty() || line == "null" {
                return Ok(None);
            }
            serde_json::from_str::<serde_json::Value>(line)
                .with_context(|| format!("{} line {}: not JSON", path.display(), i + 1))?;
            Ok(Some(line.to_string()))
        })
        .collect()
}

/// `20s`, `1500ms`, `2m`, or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (number, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "s"), |at| s.split_at(at));
    let n: f64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 20s, 1500ms, 2m)"))?;
    let secs = match unit {
        "ms" => n / 1e3,
        "s" => n,
        "m" => n * 60.0,
        other => return Err(format!("unknown unit {other:?} in {s:?}: use ms, s or m")),
    };
    if !(secs > 0.0 && secs <= 86_400.0) {
        return Err(format!("{s:?}: a duration must be above 0 and at most a day"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// A 2-d `.npy` matrix as rows.
pub fn read_matrix<T: npyz::Deserialize + Copy>(path: &Path, expected: &str) -> Result<Vec<Vec<T>>> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let npy = npyz::NpyFile::new(std::io::BufReader::new(file))
        .with_context(|| format!("{} is not a .npy file", path.display()))?;
    let shape = npy.shape().to_vec();
    let [rows, cols] = shape[..] else {
        bail!("{}: expected a 2-d matrix, found shape {shape:?}", path.display());
    };
    let (rows, cols) = (rows as usize, cols as usize);
    let fortran = npy.order() == npyz::Order::Fortran;
    let dtype = super::insert::dtype_name(&npy.dtype());
    let data: Vec<T> = npy
        .data::<T>()
        .map_err(|_| anyhow::anyhow!("{}: the data is {dtype}, expected {expected}", path.display()))?
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("reading {}", path.display()))?;
    let data = if fortran {
        super::insert::transpose(data, rows, cols)
    } else {
        data
    };
    Ok(data.chunks(cols.max(1)).take(rows).map(<[T]>::to_vec).collect())
}

/// Latency percentiles (ms) of `lat`, sorted in place.
fn percentiles(lat: &mut [Duration]) -> [f64; 4] {
    lat.sort_unstable();
    let at = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    [at(0.50), at(0.95), at(0.99), at(1.0)]
}

/// What one task measured.
#[derive(Default)]
struct Tally {
    latencies: Vec<Duration>,
    /// Correct ids among the answers, and answers scored.
    found: usize,
    scored: usize,
    errors: usize,
    first_error: Option<String>,
}

impl Tally {
    fn failed(&mut self, e: impl std::fmt::Display) {
        self.errors += 1;
        self.first_error.get_or_insert_with(|| e.to_string());
    }

    fn merge(&mut self, other: Tally) {
        self.latencies.extend(other.latencies);
        self.found += other.found;
        self.scored += other.scored;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }
}

async fn joined(mut tasks: JoinSet<Tally>) -> Result<Tally> {
    let mut all = Tally::default();
    while let Some(t) = tasks.join_next().await {
        all.merge(t.context("bench task")?);
    }
    if all.latencies.is_empty() {
        bail!(
            "no request succeeded ({} failed): {}",
            all.errors,
            all.first_error.as_deref().unwrap_or("none was sent")
        );
    }
    Ok(all)
}

pub async fn run(g: &Global, cmd: BenchCmd) -> Result<()> {
    match cmd {
        BenchCmd::Search(a) => search(g, a).await,
        BenchCmd::Insert(a) => insert(g, a).await,
    }
}

async fn search(g: &Global, a: SearchArgs) -> Result<()> {
    let queries: Arc<Vec<Vec<f32>>> = Arc::new(read_matrix(&a.queries, "float32 (dtype '<f4')")?);
    if queries.is_empty() {
        bail!("{} holds no query", a.queries.display());
    }
    let truth: Option<Arc<Vec<Vec<i64>>>> = match &a.truth {
        None => None,
        Some(path) => {
            let t: Vec<Vec<i64>> = read_matrix(path, "int64 (dtype '<i8')")?;
            if t.len() < queries.len() || t.first().is_some_and(|r| r.len() < a.k as usize) {
                bail!(
                    "{}: {} rows of {} ids, but {} queries at k = {} need as many rows of at least k ids",
                    path.display(),
                    t.len(),
                    t.first().map_or(0, |r| r.len()),
                    queries.len(),
                    a.k
                );
            }
            Some(Arc::new(t))
        }
    };
    let client = connect(g).await?;
    let opts = ReadOpts {
        ef: a.ef,
        exact: a.exact,
        filter: a.filter.clone(),
        ..Default::default()
    };
    // One search before the clock starts: the connection is up, the
    // collection known.
    client
        .search_with(&a.collection, vec![queries[0].clone()], a.k, false, &opts)
        .await
        .with_context(|| format!("searching {}", a.collection))?;
    let concurrency = a.concurrency.max(1);
    let started = Instant::now();
    let deadline = started + a.duration;
    let mut tasks = JoinSet::new();
    for t in 0..concurrency {
        let (client, queries, truth, opts) = (client.clone(), queries.clone(), truth.clone(), opts.clone());
        let (name, k) = (a.collection.clone(), a.k as usize);
        tasks.spawn(async move {
            let mut tally = Tally::default();
            let mut i = t;
            while Instant::now() < deadline {
                let q = i % queries.len();
                i += concurrency;
                let sent = Instant::now();
                match client
                    .search_with(&name, vec![queries[q].clone()], k as u32, false, &opts)
                    .await
                {
                    Ok(hits) => {
                        tally.latencies.push(sent.elapsed());
                        if let Some(truth) = &truth {
                            let want = &truth[q][..k];
                            let got = hits.first().map_or(&[][..], Vec::as_slice);
                            tally.found += got.iter().filter(|h| want.contains(&(h.id as i64))).count();
                            tally.scored += k;
                        }
                    }
                    Err(e) => tally.failed(e),
                }
            }
            tally
        });
    }
    let mut all = joined(tasks).await?;
    let secs = started.elapsed().as_secs_f64();
    client.close().await;
    let [p50, p95, p99, max] = percentiles(&mut all.latencies);
    let searches = all.latencies.len();
    let qps = searches as f64 / secs;
    let recall = (all.scored > 0).then(|| all.found as f64 / all.scored as f64);
    if g.json {
        println!(
            "{}",
            json!({
                "searches": searches, "errors": all.errors, "first_error": all.first_error,
                "seconds": secs, "qps": qps, "concurrency": concurrency, "k": a.k,
                "p50_ms": p50, "p95_ms": p95, "p99_ms": p99, "max_ms": max, "recall": recall,
            })
        );
    } else {
        println!(
            "search {}: {concurrency} in flight, {secs:.1} s, {searches} searches ({qps:.1}/s), {} errors",
            a.collection, all.errors
        );
        println!("latency ms: p50 {p50:.2}  p95 {p95:.2}  p99 {p99:.2}  max {max:.2}");
        if let Some(r) = recall {
            println!("recall@{}: {r:.4}", a.k);
        }
        if let Some(e) = &all.first_error {
            println!("first error: {e}");
        }
    }
    Ok(())
}

async fn insert(g: &Global, a: InsertArgs) -> Result<()> {
    let rows: Vec<Vec<f32>> = read_matrix(&a.file, "float32 (dtype '<f4')")?;
    if rows.is_empty() {
        bail!("{} holds no row", a.file.display());
    }
    if a.start_id.checked_add(rows.len() as u64 - 1).is_none() {
        bail!(
            "--start-id {} with {} rows gives ids past {}",
            a.start_id,
            rows.len(),
            u64::MAX
        );
    }
    let payloads = match &a.payloads {
        Some(path) => read_payloads(path, rows.len())?,
        None => vec![None; rows.len()],
    };
    let batch = a.batch.clamp(1, edgevec_proto::limits::MAX_BATCH_POINTS);
    let batches = rows.len().div_ceil(batch);
    let rows = Arc::new(rows);
    let payloads = Arc::new(payloads);
    let client: Client = connect(g).await?;
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for _ in 0..a.concurrency.max(1) {
        let (client, rows, payloads, next, name, start_id) = (
            client.clone(),
            rows.clone(),
            payloads.clone(),
            next.clone(),
            a.collection.clone(),
            a.start_id,
        );
        tasks.spawn(async move {
            let mut tally = Tally::default();
            loop {
                let b = next.fetch_add(1, Ordering::Relaxed);
                if b >= batches {
                    break tally;
                }
                let points: Vec<Point> = (b * batch..((b + 1) * batch).min(rows.len()))
                    .map(|i| Point {
                        id: start_id + i as u64,
                        vector: rows[i].clone(),
                        payload: payloads[i].clone(),
                    })
                    .collect();
                let n = points.len();
                let sent = Instant::now();
                match client.upsert(&name, points).await {
                    Ok(_) => {
                        tally.latencies.push(sent.elapsed());
                        tally.found += n;
                    }
                    Err(e) => tally.failed(e),
                }
            }
        });
    }
    let mut all = joined(tasks).await?;
    let secs = started.elapsed().as_secs_f64();
    client.close().await;
    let [p50, p95, p99, max] = percentiles(&mut all.latencies);
    let rate = all.found as f64 / secs;
    if g.json {
        println!(
            "{}",
            json!({
                "rows": all.found, "batches": all.latencies.len(), "errors": all.errors,
                "first_error": all.first_error, "seconds": secs, "rows_per_sec": rate,
                "p50_ms": p50, "p95_ms": p95, "p99_ms": p99, "max_ms": max,
            })
        );
    } else {
        println!(
            "insert {}: {} rows in {} batches of {batch}, {secs:.1} s ({rate:.0} rows/s), {} failed batches",
            a.collection,
            all.found,
            all.latencies.len(),
            all.errors
        );
        println!("batch latency ms: p50 {p50:.2}  p95 {p95:.2}  p99 {p99:.2}  max {max:.2}");
        if let Some(e) = &all.first_error {
            println!("first error: {e}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units_and_refuse_nonsense() {
        assert_eq!(parse_duration("20s"), Ok(Duration::from_secs(20)));
        assert_eq!(parse_duration("1500ms"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        for bad in ["", "0s", "-1s", "5h", "fast", "2 days"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn percentiles_of_a_known_list() {
        let mut lat: Vec<Duration> = (1..=100).rev().map(Duration::from_millis).collect();
        assert_eq!(percentiles(&mut lat), [51.0, 96.0, 100.0, 100.0]);
        assert_eq!(percentiles(&mut []), [0.0; 4]);
    }
}
