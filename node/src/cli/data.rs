//! Data commands: search, get, delete, and the printing of collections and
//! points (inserts from files live in `insert`).

use anyhow::Result;
use edgevec_client::{CollectionInfo, CollectionShards, Hit};
use serde_json::{json, Value};

use super::{connect, parse_vector, Global};

pub async fn search(
    g: &Global,
    collection: &str,
    vector: &str,
    k: u32,
    with_payload: bool,
    opts: &edgevec_client::ReadOpts,
) -> Result<()> {
    let query = parse_vector(vector)?;
    let client = connect(g).await?;
    let mut hits = client
        .search_with(collection, vec![query], k, with_payload, opts)
        .await?;
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
        println!(
            "deleted {} points from {collection} ({} ids given)",
            ack.count,
            ids.len()
        );
    }
    client.close().await;
    Ok(())
}

pub async fn delete_by_filter(g: &Global, collection: &str, filter: &str) -> Result<()> {
    let client = connect(g).await?;
    let ack = client.delete_by_filter(collection, filter).await?;
    if g.json {
        println!("{}", json!({"deleted": ack.count, "lsns": ack.lsns}));
    } else {
        println!("deleted {} points from {collection} (by filter)", ack.count);
    }
    client.close().await;
    Ok(())
}

pub async fn count(g: &Global, collection: &str, filter: Option<&str>) -> Result<()> {
    let client = connect(g).await?;
    let n = client.count(collection, filter, &Default::default()).await?;
    if g.json {
        println!("{}", json!({"count": n}));
    } else {
        println!("{n}");
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
