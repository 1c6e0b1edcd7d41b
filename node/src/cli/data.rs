//! Data commands: insert from files, search, get, delete, and the printing
//! of collections and points.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use edgevec_client::{CollectionInfo, CollectionShards, Hit, Point};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use tokio::task::JoinSet;

use super::{connect, parse_vector, Global};

#[derive(Args, Debug)]
pub struct InsertArgs {
    pub collection: String,
    /// JSON lines (`{"id":1,"vector":[...],"payload":{...}}`) or a .npy float32 matrix.
    #[arg(long)]
    pub file: PathBuf,
    /// Points per request.
    #[arg(long, default_value_t = 1000)]
    pub batch: usize,
    /// For .npy files: id of the first row (row i gets start_id + i).
    #[arg(long, default_value_t = 0)]
    pub start_id: u64,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 4)]
    pub parallel: usize,
}

/// Reads points from a JSON-lines or .npy file, batch by batch.
enum Source {
    Lines {
        lines: std::io::Lines<BufReader<File>>,
        line: usize,
        path: PathBuf,
    },
    Npy {
        rows: Box<dyn Iterator<Item = std::io::Result<f32>>>,
        dim: usize,
        left: u64,
        next_id: u64,
    },
}

impl Source {
    fn open(path: &Path, start_id: u64) -> Result<(Source, Option<u64>)> {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        if path.extension().and_then(|e| e.to_str()) == Some("npy") {
            let npy = npyz::NpyFile::new(BufReader::new(file))
                .with_context(|| format!("{} is not a .npy file", path.display()))?;
            let shape = npy.shape().to_vec();
            if shape.len() != 2 {
                bail!(
                    "{}: expected a 2-d matrix (rows × dim), found shape {shape:?}",
                    path.display()
                );
            }
            let dtype = dtype_name(&npy.dtype());
            let rows = npy.data::<f32>().map_err(|_| {
                anyhow::anyhow!(
                    "{}: the data is {dtype}, expected float32 (dtype '<f4')",
                    path.display()
                )
            })?;
            Ok((
                Source::Npy {
                    rows: Box::new(rows),
                    dim: shape[1] as usize,
                    left: shape[0],
                    next_id: start_id,
                },
                Some(shape[0]),
            ))
        } else {
            Ok((
                Source::Lines {
                    lines: BufReader::new(file).lines(),
                    line: 0,
                    path: path.to_path_buf(),
                },
                None,
            ))
        }
    }

    fn next_batch(&mut self, n: usize) -> Result<Vec<Point>> {
        let mut batch = Vec::with_capacity(n);
        match self {
            Source::Lines { lines, line, path } => {
                while batch.len() < n {
                    let Some(text) = lines.next() else { break };
                    *line += 1;
                    let text = text.with_context(|| format!("reading {}", path.display()))?;
                    if text.trim().is_empty() {
                        continue;
                    }
                    batch.push(parse_line(&text).with_context(|| format!("{}:{}", path.display(), line))?);
                }
            }
            Source::Npy {
                rows,
                dim,
                left,
                next_id,
            } => {
                while batch.len() < n && *left > 0 {
                    let vector = rows.by_ref().take(*dim).collect::<std::io::Result<Vec<f32>>>()?;
                    if vector.len() != *dim {
                        bail!("the .npy file ended early");
                    }
                    batch.push(Point {
                        id: *next_id,
                        vector,
                        payload: None,
                    });
                    *next_id += 1;
                    *left -= 1;
                }
            }
        }
        Ok(batch)
    }
}

fn parse_line(text: &str) -> Result<Point> {
    let v: Value = serde_json::from_str(text).context("not valid JSON")?;
    let id = v
        .get("id")
        .and_then(Value::as_u64)
        .context("\"id\" must be a non-negative integer")?;
    let vector = v
        .get("vector")
        .and_then(Value::as_array)
        .context("\"vector\" must be an array of numbers")?
        .iter()
        .map(|x| x.as_f64().map(|f| f as f32))
        .collect::<Option<Vec<f32>>>()
        .context("\"vector\" must contain only numbers")?;
    let payload = match v.get("payload") {
        None | Some(Value::Null) => None,
        Some(p) => Some(p.to_string()),
    };
    Ok(Point { id, vector, payload })
}

pub async fn insert(g: &Global, args: InsertArgs) -> Result<()> {
    if args.batch == 0 || args.batch > edgevec_proto::limits::MAX_BATCH_POINTS {
        bail!(
            "--batch must be between 1 and {}",
            edgevec_proto::limits::MAX_BATCH_POINTS
        );
    }
    let (mut source, total) = Source::open(&args.file, args.start_id)?;
    let client = connect(g).await?;
    let bar = match total {
        Some(t) => ProgressBar::new(t),
        None => ProgressBar::new_spinner(),
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:32} {pos}/{len} rows  {per_sec}  {msg}")
            .expect("static template"),
    );
    if g.json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let started = Instant::now();
    let mut inflight = JoinSet::new();
    let mut written = 0u64;
    loop {
        let batch = source.next_batch(args.batch)?;
        if batch.is_empty() {
            break;
        }
        while inflight.len() >= args.parallel.max(1) {
            written += settle(&mut inflight, &bar).await?;
        }
        let client = client.clone();
        let collection = args.collection.clone();
        inflight.spawn(async move {
            let n = batch.len() as u64;
            client.upsert(&collection, batch).await.map(|_| n)
        });
    }
    while !inflight.is_empty() {
        written += settle(&mut inflight, &bar).await?;
    }
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    let rate = written as f64 / secs.max(1e-9);
    if g.json {
        println!(
            "{}",
            json!({"inserted": written, "seconds": secs, "rows_per_sec": rate})
        );
    } else {
        println!(
            "inserted {written} rows into {} in {secs:.2} s ({rate:.0} rows/s)",
            args.collection
        );
    }
    client.close().await;
    Ok(())
}

async fn settle(inflight: &mut JoinSet<Result<u64, edgevec_client::ClientError>>, bar: &ProgressBar) -> Result<u64> {
    let n = inflight.join_next().await.expect("caller checks non-empty")??;
    bar.inc(n);
    Ok(n)
}

pub async fn search(g: &Global, collection: &str, vector: &str, k: u32, with_payload: bool) -> Result<()> {
    let query = parse_vector(vector)?;
    let client = connect(g).await?;
    let mut hits = client.search_batch(collection, vec![query], k, with_payload).await?;
    let hits = hits.pop().unwrap_or_default();
    if g.json {
        println!("{}", Value::Array(hits.iter().map(hit_json).collect()));
    } else if hits.is_empty() {
        println!("no results");
    } else {
        println!("{:>20} {:>12}  PAYLOAD", "ID", "SCORE");
        for h in &hits {
            println!("{:>20} {:>12.6}  {}", h.id, h.score, h.payload.as_deref().unwrap_or(""));
        }
    }
    client.close().await;
    Ok(())
}

pub async fn get(g: &Global, collection: &str, ids: &[u64]) -> Result<()> {
    let client = connect(g).await?;
    let points = client.get(collection, ids).await?;
    if g.json {
        let out: Vec<Value> = points
            .iter()
            .map(|p| json!({"id": p.id, "vector": p.vector, "payload": payload_json(p.payload.as_deref())}))
            .collect();
        println!("{}", Value::Array(out));
    } else {
        for p in &points {
            println!("{}\t{:?}\t{}", p.id, p.vector, p.payload.as_deref().unwrap_or(""));
        }
        let missing = ids.len() - points.len();
        if missing > 0 {
            println!("({missing} of {} ids not found)", ids.len());
        }
    }
    client.close().await;
    Ok(())
}

pub async fn delete(g: &Global, collection: &str, ids: &[u64]) -> Result<()> {
    let client = connect(g).await?;
    let ack = client.delete(collection, ids).await?;
    if g.json {
        println!("{}", json!({"deleted": ack.count, "lsns": ack.lsns}));
    } else {
        println!("deleted {} ids from {collection}", ack.count);
    }
    client.close().await;
    Ok(())
}

fn payload_json(p: Option<&str>) -> Value {
    p.and_then(|s| serde_json::from_str(s).ok()).unwrap_or(Value::Null)
}

fn hit_json(h: &Hit) -> Value {
    json!({"id": h.id, "score": h.score, "payload": payload_json(h.payload.as_deref())})
}

pub fn collection_json(c: &CollectionInfo) -> Value {
    json!({
        "name": c.spec.name,
        "dim": c.spec.dim,
        "metric": c.spec.metric.as_str(),
        "shards": c.spec.shards,
        "seal_rows": c.spec.seal_rows,
        "points": c.points,
        "shard_info": c.shards.iter().map(|s| json!({"shard": s.shard, "points": s.points, "lsn": s.lsn})).collect::<Vec<_>>(),
        "segments": c.segments.iter().map(|s| json!({
            "shard": s.shard, "id": s.id, "state": format!("{:?}", s.state).to_lowercase(),
            "rows": s.rows, "deleted": s.deleted, "index": format!("{:?}", s.index).to_lowercase(),
        })).collect::<Vec<_>>(),
    })
}

pub fn print_collection(c: &CollectionInfo) {
    println!("collection {}", c.spec.name);
    println!(
        "  dim {}, metric {}, {} shards, seal at {} rows",
        c.spec.dim, c.spec.metric, c.spec.shards, c.spec.seal_rows
    );
    println!("  {} points", c.points);
    for s in &c.shards {
        println!("  shard {}: {} points, lsn {}", s.shard, s.points, s.lsn);
    }
    if !c.segments.is_empty() {
        println!(
            "  {:>5} {:>8} {:<8} {:>10} {:>8} {:<8}",
            "SHARD", "SEGMENT", "STATE", "ROWS", "DELETED", "INDEX"
        );
        for s in &c.segments {
            println!(
                "  {:>5} {:>8} {:<8} {:>10} {:>8} {:<8}",
                s.shard,
                s.id,
                format!("{:?}", s.state).to_lowercase(),
                s.rows,
                s.deleted,
                format!("{:?}", s.index).to_lowercase()
            );
        }
    }
}

/// Replication of collections as JSON (`describe`, `status`).
pub fn shards_json(all: &[CollectionShards]) -> Value {
    Value::Array(
        all.iter()
            .map(|c| {
                json!({
                    "collection": c.collection, "id": c.id, "replicas": c.replicas, "min_insync": c.min_insync,
                    "shards": c.shards.iter().map(|s| json!({
                        "shard": s.shard, "version": s.version, "term": s.term, "primary": s.primary,
                        "problems": s.problems,
                        "replicas": s.replicas.iter().map(|r| json!({
                            "node": r.node, "state": r.state, "primary": r.primary, "eligible": r.eligible,
                            "applied_lsn": r.applied_lsn, "last_op": r.last.map(|o| o.to_string()),
                            "points": r.points, "catch_up": r.catch_up,
                        })).collect::<Vec<_>>(),
                    })).collect::<Vec<_>>(),
                })
            })
            .collect(),
    )
}

/// Per shard: version, term, primary and each replica's state.
pub fn print_shards(all: &[CollectionShards]) {
    for c in all {
        println!(
            "  replication: {} replicas, min_insync {} (collection id {})",
            c.replicas, c.min_insync, c.id
        );
        for s in &c.shards {
            let primary = s.primary.map_or("none".to_string(), |p| p.to_string());
            println!(
                "  shard {}: version {}, term {}, primary {primary}",
                s.shard, s.version, s.term
            );
            for r in &s.replicas {
                let unknown = || "?".to_string();
                println!(
                    "    node {:<4} {:<12} applied {:>8} points {:>10}{}{}",
                    r.node,
                    r.state,
                    r.applied_lsn.map_or_else(unknown, |l| l.to_string()),
                    r.points.map_or_else(unknown, |p| p.to_string()),
                    if r.primary { "  primary" } else { "" },
                    r.catch_up.as_ref().map(|c| format!("  ({c})")).unwrap_or_default()
                );
            }
            for p in &s.problems {
                println!("    ! {p}");
            }
        }
    }
}

/// A .npy dtype as a person names it: `float64`, `int32`, ... (the
/// descriptor itself for anything else).
fn dtype_name(dtype: &npyz::DType) -> String {
    let descr = match dtype {
        npyz::DType::Plain(t) => t.to_string(),
        other => return format!("a structured or array dtype ({})", other.descr()),
    };
    let code = descr.trim_start_matches(['<', '>', '|', '=']);
    let (kind, size) = code.split_at(code.len().min(1));
    let bits = size.parse::<u32>().ok().map(|b| b * 8);
    match (kind, bits) {
        ("f", Some(b)) => format!("float{b}"),
        ("i", Some(b)) => format!("int{b}"),
        ("u", Some(b)) => format!("uint{b}"),
        ("b", _) => "bool".into(),
        _ => format!("dtype '{descr}'"),
    }
}

#[cfg(test)]
mod dtype_tests {
    use super::dtype_name;

    #[test]
    fn dtypes_are_named_as_numpy_names_them() {
        let name = |d: &str| dtype_name(&npyz::DType::Plain(d.parse().unwrap()));
        assert_eq!(name("<f8"), "float64");
        assert_eq!(name("<f4"), "float32");
        assert_eq!(name("<i4"), "int32");
        assert_eq!(name("|u1"), "uint8");
        assert_eq!(name("|b1"), "bool");
    }
}
