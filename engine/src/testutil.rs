//! Test helpers: a collection driven the way a node drives one, with this
//! node as the only replica of every shard (validate, split by shard,
//! append at the next op id, apply at once, search with
//! [`search_replicas`]).

use std::path::Path;
use std::sync::Arc;

use edgevec_proto::{CollectionSpec, Hit, Metric, OpId, Point, PointRecord, SegmentInfo};

use crate::engine::{Engine, EngineOptions, ReplicaKey, ReplicaSpec};
use crate::error::EngineError;
use crate::op::ShardOp;
use crate::search::search_replicas;
use crate::shard::ShardReplica;
use crate::split::{by_shard, last_wins};
use crate::validate;

pub fn open(dir: &Path) -> Engine {
    Engine::open(dir, EngineOptions::default()).unwrap()
}

pub fn spec(name: &str, dim: u32, metric: Metric, shards: u32, seal_rows: u32) -> CollectionSpec {
    CollectionSpec {
        name: name.into(),
        dim,
        metric,
        shards,
        seal_rows,
    }
}

pub fn point(id: u64, vector: Vec<f32>) -> Point {
    Point {
        id,
        vector,
        payload: Some(format!("{{\"id\":{id}}}")),
    }
}

/// Points on a line: id i at (i, 0), so the nearest ids are known.
pub fn line(range: std::ops::Range<u64>) -> Vec<Point> {
    range.map(|i| point(i, vec![i as f32, 0.0])).collect()
}

pub fn ids(hits: &[Hit]) -> Vec<u64> {
    hits.iter().map(|h| h.id).collect()
}

/// Logs `op` at the replica's next op id (term at least 1) and applies it.
pub fn write(replica: &ShardReplica, op: ShardOp) -> Result<OpId, EngineError> {
    let prev = replica.last_op();
    let id = OpId::new(replica.term().max(1), prev.lsn + 1);
    replica.append(prev, [(id, op)])?;
    replica.apply_through(id.lsn)?;
    Ok(id)
}

pub struct Collection {
    pub spec: CollectionSpec,
    pub replicas: Vec<Arc<ShardReplica>>,
}

impl Collection {
    /// Creates (or, after a restart, finds again) every shard replica of
    /// collection `id`. As the only replica of each shard, it applies
    /// whatever its log holds (what a primary's epoch start does): an
    /// apply a crash took back is applied again.
    pub fn create(engine: &Engine, id: u64, spec: CollectionSpec) -> Collection {
        let replicas = (0..spec.shards)
            .map(|shard| {
                let rs = ReplicaSpec {
                    key: ReplicaKey { collection: id, shard },
                    name: spec.name.clone(),
                    dim: spec.dim,
                    metric: spec.metric,
                    seal_rows: spec.seal_rows,
                    index: Default::default(),
                    fields: Vec::new(),
                };
                let r = engine.create_replica(rs).unwrap();
                r.apply_through(r.last_op().lsn).unwrap();
                r
            })
            .collect();
        Collection { spec, replicas }
    }

    pub fn upsert(&self, mut points: Vec<Point>) -> Result<(), EngineError> {
        validate::points(&self.spec, &mut points)?;
        for (shard, points) in by_shard(last_wins(points), |p| p.id, self.spec.shards) {
            write(&self.replicas[shard as usize], ShardOp::Upsert(points))?;
        }
        Ok(())
    }

    pub fn delete(&self, ids: &[u64]) -> Result<(), EngineError> {
        validate::ids(ids)?;
        for (shard, ids) in by_shard(ids.to_vec(), |id| *id, self.spec.shards) {
            write(&self.replicas[shard as usize], ShardOp::Delete(ids))?;
        }
        Ok(())
    }

    /// The points found among `ids`, in request order.
    pub fn get(&self, ids: &[u64]) -> Vec<PointRecord> {
        let mut found = Vec::new();
        for &id in ids {
            let shard = edgevec_proto::shard_of(id, self.spec.shards) as usize;
            found.extend(self.replicas[shard].get(&[id]).unwrap().into_iter().flatten());
        }
        found
    }

    pub fn search(&self, queries: &[Vec<f32>], k: u32, with_payload: bool) -> Result<Vec<Vec<Hit>>, EngineError> {
        let queries = validate::search(&self.spec, queries, k)?;
        search_replicas(
            &self.replicas,
            self.spec.metric,
            &queries,
            k,
            with_payload,
            Default::default(),
            None,
        )
    }

    pub fn points(&self) -> u64 {
        self.replicas.iter().map(|r| r.info().0.points).sum()
    }

    pub fn segments(&self) -> Vec<SegmentInfo> {
        self.replicas.iter().flat_map(|r| r.info().1).collect()
    }
}
