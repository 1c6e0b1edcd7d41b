//! `edgevec insert`: points from a JSON-lines or .npy file, in batches.
//!
//! Invariants:
//! - every row is checked against the collection's schema (the checks the
//!   server runs) before its batch is sent; the first bad row stops the
//!   import: the rows before it are sent, nothing from it on is;
//! - after any stop (a bad row, a failed batch, an unreadable file) every
//!   batch already sent is waited for, so the command never exits while its
//!   writes are still on their way, and the report is exact: the rows
//!   acknowledged, the rows of failed batches (outcome unknown: upserts are
//!   idempotent, so running the same file again is safe), and where the
//!   file is wrong (line, or row of a .npy, and field);
//! - `.npy` ids are `start_id + row` and must fit in a u64; Fortran-order
//!   matrices are read row by row like C-order ones.

use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use edgevec_client::{ClientError, CollectionSpec, Point};
use edgevec_engine::EngineError;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use tokio::task::JoinSet;

use super::{connect, Global};

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

/// Where a row is in the file, as a person finds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum At {
    /// Line of a JSON-lines file, from 1.
    Line(usize),
    /// Row of a .npy matrix, from 0 (as numpy counts).
    Row(u64),
}

impl fmt::Display for At {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            At::Line(l) => write!(f, "line {l}"),
            At::Row(r) => write!(f, "row {r}"),
        }
    }
}

impl At {
    fn json(self) -> Value {
        match self {
            At::Line(l) => json!({"line": l}),
            At::Row(r) => json!({"row": r}),
        }
    }
}

/// The first row that cannot be sent, and why.
#[derive(Debug, Clone, PartialEq)]
struct Bad {
    at: At,
    /// The field that is wrong (`vector`, `vector[17]`, `payload`, `id`).
    field: Option<String>,
    message: String,
}

impl fmt::Display for Bad {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.field {
            Some(field) => write!(f, "{}, {field}: {}", self.at, self.message),
            None => write!(f, "{}: {}", self.at, self.message),
        }
    }
}

/// Rows read for one request: the points, where each came from, and the
/// bad row that ended the batch early, if one did.
#[derive(Debug, Default)]
struct Batch {
    points: Vec<Point>,
    at: Vec<At>,
    bad: Option<Bad>,
}

/// Reads points from a JSON-lines or .npy file, batch by batch.
enum Source {
    Lines {
        lines: std::io::Lines<BufReader<File>>,
        line: usize,
    },
    Npy {
        rows: Box<dyn Iterator<Item = std::io::Result<f32>>>,
        dim: usize,
        left: u64,
        row: u64,
        start_id: u64,
    },
}

impl Source {
    fn open(path: &Path, start_id: u64) -> Result<(Source, Option<u64>)> {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        if path.extension().and_then(|e| e.to_str()) != Some("npy") {
            let lines = BufReader::new(file).lines();
            return Ok((Source::Lines { lines, line: 0 }, None));
        }
        let npy = npyz::NpyFile::new(BufReader::new(file))
            .with_context(|| format!("{} is not a .npy file", path.display()))?;
        let shape = npy.shape().to_vec();
        let [n, dim] = shape[..] else {
            bail!(
                "{}: expected a 2-d matrix (rows × dim), found shape {shape:?}",
                path.display()
            );
        };
        if n > 0 && start_id.checked_add(n - 1).is_none() {
            bail!(
                "--start-id {start_id} with {n} rows gives ids past {} (the largest id); choose a start id of at \
                 most {}",
                u64::MAX,
                u64::MAX - (n - 1)
            );
        }
        let fortran = npy.order() == npyz::Order::Fortran;
        let dtype = dtype_name(&npy.dtype());
        let data = npy.data::<f32>().map_err(|_| {
            anyhow::anyhow!(
                "{}: the data is {dtype}, expected float32 (dtype '<f4')",
                path.display()
            )
        })?;
        let rows: Box<dyn Iterator<Item = std::io::Result<f32>>> = if fortran {
            // Column after column on disk: read it all, then hand it out
            // row after row.
            let columns = data
                .collect::<std::io::Result<Vec<f32>>>()
                .with_context(|| format!("reading {}", path.display()))?;
            Box::new(transpose(columns, n as usize, dim as usize).into_iter().map(Ok))
        } else {
            Box::new(data)
        };
        let source = Source::Npy {
            rows,
            dim: dim as usize,
            left: n,
            row: 0,
            start_id,
        };
        Ok((source, Some(n)))
    }

    /// Up to `n` rows; stops early at the end of the file or at a row that
    /// cannot be read, which the batch then names.
    fn next_batch(&mut self, n: usize) -> Batch {
        let mut batch = Batch::default();
        while batch.points.len() < n && batch.bad.is_none() {
            match self.next_row() {
                None => break,
                Some((at, Ok(point))) => {
                    batch.points.push(point);
                    batch.at.push(at);
                }
                Some((at, Err((field, message)))) => batch.bad = Some(Bad { at, field, message }),
            }
        }
        batch
    }

    #[allow(clippy::type_complexity)]
    fn next_row(&mut self) -> Option<(At, Result<Point, (Option<String>, String)>)> {
        match self {
            Source::Lines { lines, line } => loop {
                let text = lines.next()?;
                *line += 1;
                let at = At::Line(*line);
                match text {
                    Err(e) => return Some((at, Err((None, format!("cannot be read: {e}"))))),
                    Ok(t) if t.trim().is_empty() => continue,
                    Ok(t) => return Some((at, parse_line(&t))),
                }
            },
            Source::Npy {
                rows,
                dim,
                left,
                row,
                start_id,
            } => {
                if *left == 0 {
                    return None;
                }
                let at = At::Row(*row);
                let vector = match rows.by_ref().take(*dim).collect::<std::io::Result<Vec<f32>>>() {
                    Ok(v) if v.len() == *dim => v,
                    Ok(_) => return Some((at, Err((None, "the file ends inside this row".into())))),
                    Err(e) => return Some((at, Err((None, format!("cannot be read: {e}"))))),
                };
                let point = Point {
                    id: *start_id + *row,
                    vector,
                    payload: None,
                };
                *row += 1;
                *left -= 1;
                Some((at, Ok(point)))
            }
        }
    }
}

/// A column-major `rows × dim` matrix in row-major order.
pub(super) fn transpose<T: Copy>(columns: Vec<T>, rows: usize, dim: usize) -> Vec<T> {
    let mut out = columns.clone();
    for (c, column) in columns.chunks(rows.max(1)).enumerate().take(dim) {
        for (r, v) in column.iter().enumerate() {
            out[r * dim + c] = *v;
        }
    }
    out
}

fn parse_line(text: &str) -> Result<Point, (Option<String>, String)> {
    let field = |f: &str, m: &str| (Some(f.to_string()), m.to_string());
    let v: Value = serde_json::from_str(text).map_err(|e| (None, format!("not valid JSON: {e}")))?;
    let id = v
        .get("id")
        .and_then(Value::as_u64)
        .ok_or_else(|| field("id", "must be a non-negative integer"))?;
    let vector = v
        .get("vector")
        .and_then(Value::as_array)
        .ok_or_else(|| field("vector", "must be an array of numbers"))?
        .iter()
        .map(|x| x.as_f64().map(|f| f as f32))
        .collect::<Option<Vec<f32>>>()
        .ok_or_else(|| field("vector", "must contain only numbers"))?;
    let payload = match v.get("payload") {
        None | Some(Value::Null) => None,
        Some(p) => Some(p.to_string()),
    };
    Ok(Point { id, vector, payload })
}

/// Checks every point of `batch` as the server will, and cuts the batch
/// at the first one that fails.
fn check(spec: &CollectionSpec, batch: &mut Batch) {
    for i in 0..batch.points.len() {
        let result = edgevec_engine::validate::points(spec, std::slice::from_mut(&mut batch.points[i]));
        let Err(e) = result else { continue };
        let (field, message) = match e {
            EngineError::Invalid { field, message } => {
                let field = field.strip_prefix("points[0].").unwrap_or(&field).to_string();
                (Some(field), message)
            }
            other => (None, other.to_string()),
        };
        batch.bad = Some(Bad {
            at: batch.at[i],
            field,
            message,
        });
        batch.points.truncate(i);
        batch.at.truncate(i);
        return;
    }
}

/// A batch that the server refused or did not answer.
struct Failed {
    from: At,
    to: At,
    rows: u64,
    error: String,
}

/// What a sent batch came to.
type Sent = (At, At, u64, Result<(), ClientError>);

#[derive(Default)]
struct Outcome {
    /// Rows of acknowledged batches.
    committed: u64,
    failed: Vec<Failed>,
}

impl Outcome {
    fn settle(&mut self, joined: Option<Result<Sent, tokio::task::JoinError>>, bar: &ProgressBar) {
        match joined {
            Some(Ok((_, _, rows, Ok(())))) => {
                self.committed += rows;
                bar.inc(rows);
            }
            Some(Ok((from, to, rows, Err(e)))) => self.failed.push(Failed {
                from,
                to,
                rows,
                error: e.to_string(),
            }),
            Some(Err(e)) => self.failed.push(Failed {
                from: At::Line(0),
                to: At::Line(0),
                rows: 0,
                error: format!("request task failed: {e}"),
            }),
            None => {}
        }
    }
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
    let spec = client.describe_collection(&args.collection).await?.spec;
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
    let mut inflight: JoinSet<Sent> = JoinSet::new();
    let mut outcome = Outcome::default();
    let mut bad = None;
    // Stops at the first bad row or failed batch.
    while outcome.failed.is_empty() {
        let mut batch = source.next_batch(args.batch);
        check(&spec, &mut batch);
        if let (Some(from), Some(to)) = (batch.at.first().copied(), batch.at.last().copied()) {
            while inflight.len() >= args.parallel.max(1) {
                outcome.settle(inflight.join_next().await, &bar);
            }
            let (client, collection) = (client.clone(), args.collection.clone());
            let points = batch.points;
            inflight.spawn(async move {
                let rows = points.len() as u64;
                (from, to, rows, client.upsert(&collection, points).await.map(|_| ()))
            });
        } else if batch.bad.is_none() {
            break;
        }
        if batch.bad.is_some() {
            bad = batch.bad;
            break;
        }
    }
    // Every batch sent is waited for, whatever stopped the import.
    while !inflight.is_empty() {
        outcome.settle(inflight.join_next().await, &bar);
    }
    bar.finish_and_clear();
    client.close().await;
    let secs = started.elapsed().as_secs_f64();
    let rate = outcome.committed as f64 / secs.max(1e-9);
    let file = args.file.display();
    if bad.is_none() && outcome.failed.is_empty() {
        if g.json {
            println!(
                "{}",
                json!({"inserted": outcome.committed, "complete": true, "seconds": secs, "rows_per_sec": rate})
            );
        } else {
            println!(
                "inserted {} rows into {} in {secs:.2} s ({rate:.0} rows/s)",
                outcome.committed, args.collection
            );
        }
        return Ok(());
    }
    let unknown: u64 = outcome.failed.iter().map(|f| f.rows).sum();
    if g.json {
        let bad_json = bad.as_ref().map(|b| {
            let mut v = b.at.json();
            v["field"] = json!(b.field);
            v["message"] = json!(b.message);
            v
        });
        let failed: Vec<Value> = outcome
            .failed
            .iter()
            .map(|f| json!({"from": f.from.json(), "to": f.to.json(), "rows": f.rows, "error": f.error}))
            .collect();
        println!(
            "{}",
            json!({"inserted": outcome.committed, "complete": false, "bad_row": bad_json,
                   "failed_batches": failed, "rows_outcome_unknown": unknown})
        );
    } else {
        println!(
            "inserted {} rows into {} (acknowledged); the import stopped",
            outcome.committed, args.collection
        );
    }
    let mut why = Vec::new();
    if let Some(b) = &bad {
        why.push(format!("{file} {b}; nothing from {} on was sent", b.at));
    }
    for f in &outcome.failed {
        why.push(format!(
            "the batch of {} rows from {} to {} failed, its outcome is unknown (running the same file again is \
             safe): {}",
            f.rows, f.from, f.to, f.error
        ));
    }
    bail!("{}", why.join("\n"))
}

/// A .npy dtype as a person names it: `float64`, `int32`, ... (the
/// descriptor itself for anything else).
pub(super) fn dtype_name(dtype: &npyz::DType) -> String {
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
mod tests {
    use super::*;
    use edgevec_client::Metric;

    #[test]
    fn dtypes_are_named_as_numpy_names_them() {
        let name = |d: &str| dtype_name(&npyz::DType::Plain(d.parse().unwrap()));
        assert_eq!(name("<f8"), "float64");
        assert_eq!(name("<f4"), "float32");
        assert_eq!(name("<i4"), "int32");
        assert_eq!(name("|u1"), "uint8");
        assert_eq!(name("|b1"), "bool");
    }

    #[test]
    fn transpose_reads_column_major_row_by_row() {
        // 2 rows × 3 columns [[1,2,3],[4,5,6]] stored column after column.
        assert_eq!(
            transpose(vec![1., 4., 2., 5., 3., 6.], 2, 3),
            vec![1., 2., 3., 4., 5., 6.]
        );
    }

    #[test]
    fn a_batch_is_cut_at_its_first_bad_row() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rows.jsonl");
        let mut text = String::new();
        for i in 0..5 {
            text.push_str(&format!("{{\"id\": {i}, \"vector\": [1, 2]}}\n"));
        }
        text.push('\n');
        text.push_str("{\"id\": 5, \"vector\": [1, 2, 3]}\n{\"id\": 6, \"vector\": [1, 2]}\n");
        std::fs::write(&path, text).unwrap();
        let (mut source, _) = Source::open(&path, 0).unwrap();
        let spec = CollectionSpec::new("c", 2, Metric::L2);
        let mut first = source.next_batch(4);
        check(&spec, &mut first);
        assert_eq!((first.points.len(), first.bad), (4, None));
        let mut second = source.next_batch(4);
        check(&spec, &mut second);
        assert_eq!(second.at, vec![At::Line(5)]);
        let bad = second.bad.unwrap();
        assert_eq!((bad.at, bad.field.as_deref()), (At::Line(7), Some("vector")));
        assert!(bad.message.contains("dim 2"), "{}", bad.message);

        std::fs::write(&path, "{\"id\": 1, \"vector\": [1, \"x\"]}\n").unwrap();
        let (mut source, _) = Source::open(&path, 0).unwrap();
        let bad = source.next_batch(4).bad.unwrap();
        assert_eq!((bad.at, bad.field.as_deref()), (At::Line(1), Some("vector")));
    }
}
