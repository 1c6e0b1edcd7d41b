//! A collection on this node: its spec and one replica per shard.
//!
//! Turns client requests into per-shard work: a write is validated as a
//! whole, split by `shard_of(id)` and becomes one op per touched shard at
//! that shard's next LSN; a search asks every shard for its best `k` and
//! merges. Shards commit independently, so a write that spans shards is
//! durable shard by shard; if one shard fails the others may have applied
//! their part. Upserts and deletes are idempotent, so the client retries
//! the whole request.
//!
//! Parallelism uses rayon across shards (writes) and across
//! (shard, query) pairs (searches); every task takes a shard lock itself,
//! never while another is held.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use edgevec_proto::{shard_of, CollectionInfo, CollectionSpec, Hit, Point, PointRecord, WriteAck};
use rayon::prelude::*;

use crate::builder::IndexBuilder;
use crate::error::EngineError;
use crate::hnsw::IndexParams;
use crate::metric::{self, Candidate};
use crate::op::ShardOp;
use crate::plan::Location;
use crate::shard::{ShardConfig, ShardReplica, OPLOG_RETAIN_OPS};
use crate::validate;

/// Payloads of hits keyed by (segment, row, id): segment ids are per shard,
/// the id pins the shard.
type PayloadMap = HashMap<(u64, u32, u64), Option<String>>;

pub struct Collection {
    pub spec: CollectionSpec,
    pub dir: PathBuf,
    shards: Vec<Arc<ShardReplica>>,
}

impl Collection {
    /// Opens (or creates) every shard replica under `dir`.
    pub fn open(
        dir: &Path,
        spec: CollectionSpec,
        index: IndexParams,
        builder: &Arc<IndexBuilder>,
    ) -> Result<Collection, EngineError> {
        let shards = (0..spec.shards)
            .map(|shard| {
                let config = ShardConfig {
                    shard,
                    dim: spec.dim,
                    metric: spec.metric,
                    seal_rows: spec.seal_rows,
                    index,
                    retain_ops: OPLOG_RETAIN_OPS,
                };
                ShardReplica::open(&dir.join(format!("shard-{shard}")), config, builder.clone())
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Collection {
            spec,
            dir: dir.to_owned(),
            shards,
        })
    }

    /// Stops pending index builds from writing into this collection.
    pub fn retire(&self) {
        self.shards.iter().for_each(|s| s.retire());
    }

    pub fn upsert(&self, mut points: Vec<Point>) -> Result<WriteAck, EngineError> {
        validate::points(&self.spec, &mut points)?;
        let count = points.len() as u64;
        let groups = by_shard(last_wins(points), |p| p.id, self.spec.shards);
        self.write(
            count,
            groups.into_iter().map(|(s, p)| (s, ShardOp::Upsert(p))).collect(),
        )
    }

    pub fn delete(&self, ids: &[u64]) -> Result<WriteAck, EngineError> {
        validate::ids(ids)?;
        let groups = by_shard(ids.to_vec(), |id| *id, self.spec.shards);
        self.write(
            ids.len() as u64,
            groups.into_iter().map(|(s, ids)| (s, ShardOp::Delete(ids))).collect(),
        )
    }

    /// Appends each shard's op, shards in parallel. Each append blocks on
    /// an fsync, so this uses scoped OS threads, not rayon: a rayon worker
    /// parked on the disk would stall searches queued on the same pool.
    fn write(&self, count: u64, ops: Vec<(u32, ShardOp)>) -> Result<WriteAck, EngineError> {
        let append = |(shard, op): &(u32, ShardOp)| Ok((*shard, self.shards[*shard as usize].append(op)?));
        let lsns = if ops.len() == 1 {
            vec![append(&ops[0])?]
        } else {
            std::thread::scope(|scope| {
                let handles: Vec<_> = ops.iter().map(|op| scope.spawn(move || append(op))).collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("shard append does not panic"))
                    .collect::<Result<Vec<_>, EngineError>>()
            })?
        };
        Ok(WriteAck { count, lsns })
    }

    pub fn get(&self, ids: &[u64]) -> Result<Vec<PointRecord>, EngineError> {
        validate::ids(ids)?;
        let positions = by_shard((0..ids.len()).collect(), |&i| ids[i], self.spec.shards);
        let mut found: Vec<Option<PointRecord>> = vec![None; ids.len()];
        for (shard, pos) in positions {
            let shard_ids: Vec<u64> = pos.iter().map(|&i| ids[i]).collect();
            for (i, rec) in pos.into_iter().zip(self.shards[shard as usize].get(&shard_ids)?) {
                found[i] = rec;
            }
        }
        Ok(found.into_iter().flatten().collect())
    }

    pub fn search(&self, queries: &[Vec<f32>], k: u32, with_payload: bool) -> Result<Vec<Vec<Hit>>, EngineError> {
        let queries = validate::search(&self.spec, queries, k)?;
        let (k, ns, metric) = (k as usize, self.shards.len(), self.spec.metric);
        let per_shard: Vec<Vec<Candidate>> = (0..queries.len() * ns)
            .into_par_iter()
            .map(|t| self.shards[t % ns].search(&queries[t / ns], k))
            .collect();
        let merged: Vec<Vec<Candidate>> = per_shard
            .chunks(ns)
            .map(|lists| metric::merge(metric, k, lists.iter().cloned()))
            .collect();
        let payloads = if with_payload {
            self.payloads(&merged)?
        } else {
            HashMap::new()
        };
        Ok(merged
            .into_iter()
            .map(|hits| {
                hits.into_iter()
                    .map(|c| Hit {
                        id: c.id,
                        score: c.score,
                        payload: payloads.get(&(c.segment, c.row, c.id)).cloned().flatten(),
                    })
                    .collect()
            })
            .collect())
    }

    /// Payloads of the final hits, read from the shard each hit came from.
    fn payloads(&self, hits: &[Vec<Candidate>]) -> Result<PayloadMap, EngineError> {
        let all: Vec<Candidate> = hits.iter().flatten().copied().collect();
        let mut out = HashMap::new();
        for (shard, cands) in by_shard(all, |c| c.id, self.spec.shards) {
            let rows: Vec<Location> = cands
                .iter()
                .map(|c| Location {
                    segment: c.segment,
                    row: c.row,
                })
                .collect();
            let found = self.shards[shard as usize].payloads(&rows)?;
            for (c, p) in cands.into_iter().zip(found) {
                out.insert((c.segment, c.row, c.id), p);
            }
        }
        Ok(out)
    }

    pub fn info(&self) -> CollectionInfo {
        let mut shards = Vec::new();
        let mut segments = Vec::new();
        for s in &self.shards {
            let (info, segs) = s.info();
            shards.push(info);
            segments.extend(segs);
        }
        CollectionInfo {
            spec: self.spec.clone(),
            points: shards.iter().map(|s| s.points).sum(),
            shards,
            segments,
        }
    }

    pub fn indexes_ready(&self) -> bool {
        self.shards.iter().all(|s| s.indexes_ready())
    }
}

/// Keeps the last occurrence of each id, in the order those occurrences
/// had in the batch.
pub fn last_wins(points: Vec<Point>) -> Vec<Point> {
    let mut last: HashMap<u64, usize> = HashMap::with_capacity(points.len());
    for (i, p) in points.iter().enumerate() {
        last.insert(p.id, i);
    }
    points
        .into_iter()
        .enumerate()
        .filter(|(i, p)| last[&p.id] == *i)
        .map(|(_, p)| p)
        .collect()
}

/// Splits `items` by the shard of their id, keeping their order.
pub fn by_shard<T>(items: Vec<T>, id: impl Fn(&T) -> u64, shards: u32) -> BTreeMap<u32, Vec<T>> {
    let mut out: BTreeMap<u32, Vec<T>> = BTreeMap::new();
    for item in items {
        out.entry(shard_of(id(&item), shards)).or_default().push(item);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(id: u64, x: f32) -> Point {
        Point {
            id,
            vector: vec![x],
            payload: None,
        }
    }

    #[test]
    fn last_occurrence_wins() {
        let got = last_wins(vec![p(1, 1.0), p(2, 2.0), p(1, 3.0), p(3, 4.0), p(2, 5.0)]);
        let got: Vec<(u64, f32)> = got.iter().map(|p| (p.id, p.vector[0])).collect();
        assert_eq!(got, vec![(1, 3.0), (3, 4.0), (2, 5.0)]);
    }

    #[test]
    fn groups_by_shard_in_order() {
        let ids: Vec<u64> = (0..100).collect();
        let groups = by_shard(ids, |id| *id, 3);
        assert_eq!(groups.values().map(Vec::len).sum::<usize>(), 100);
        for (shard, ids) in groups {
            assert!(ids.windows(2).all(|w| w[0] < w[1]));
            assert!(ids.iter().all(|&id| shard_of(id, 3) == shard));
        }
    }
}
