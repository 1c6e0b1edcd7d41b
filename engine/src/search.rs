//! Search over several shard replicas of one collection, merged.
//!
//! The node searches the replicas it serves locally (any subset of a
//! collection's shards), the benchmark all of them. Work is spread with
//! rayon over (replica, query) pairs (a single pair runs on the calling
//! thread), each task taking one replica's read
//! lock on its own (never while holding another, see [`crate::shard`]).
//! Each hit remembers which replica it came from, and its payload is read
//! from that replica: segment ids and rows are per replica, and the list
//! may hold any subset of shards, so the id's shard cannot tell.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use edgevec_proto::{Filter, Hit, Metric};
use rayon::prelude::*;

use crate::error::EngineError;
use crate::hnsw::SearchOptions;
use crate::metric::{self, Candidate};
use crate::plan::Location;
use crate::shard::ShardReplica;

/// A candidate and the index (in the replica list) of its replica.
#[derive(Debug, Clone, Copy)]
struct Found {
    replica: usize,
    candidate: Candidate,
}

impl AsRef<Candidate> for Found {
    fn as_ref(&self) -> &Candidate {
        &self.candidate
    }
}

/// Up to `k` hits per query, best first, over every replica in
/// `replicas` (all of collection `metric`), each indexed segment searched
/// as `opts` says, only points that pass `filter` (if any). The queries
/// must be validated and, for cosine, normalised already
/// ([`crate::validate::search`]).
pub fn search_replicas(
    replicas: &[Arc<ShardReplica>],
    metric: Metric,
    queries: &[Vec<f32>],
    k: u32,
    with_payload: bool,
    opts: SearchOptions,
    filter: Option<&Filter>,
) -> Result<Vec<Vec<Hit>>, EngineError> {
    let (k, n) = (k as usize, replicas.len());
    if n == 0 {
        return Ok(vec![Vec::new(); queries.len()]);
    }
    // A hit's row stays in its replica's file until its payload is read.
    let _pins: Vec<_> = if with_payload {
        replicas.iter().map(|r| r.pin()).collect()
    } else {
        Vec::new()
    };
    let pair = |t: usize| -> Result<Vec<Found>, EngineError> {
        let replica = t % n;
        Ok(replicas[replica]
            .search(&queries[t / n], k, opts, filter)?
            .into_iter()
            .map(|candidate| Found { replica, candidate })
            .collect())
    };
    // One (replica, query) pair, the common case of a node's shard read:
    // on the calling thread, without the hand-off to the pool and back.
    let per_pair: Vec<Vec<Found>> = if queries.len() * n == 1 {
        vec![pair(0)?]
    } else {
        (0..queries.len() * n)
            .into_par_iter()
            .map(pair)
            .collect::<Result<_, _>>()?
    };
    let merged: Vec<Vec<Found>> = per_pair
        .chunks(n)
        .map(|lists| metric::merge(metric, k, lists.iter().cloned()))
        .collect();
    let payloads = if with_payload {
        payloads(replicas, &merged)?
    } else {
        HashMap::new()
    };
    Ok(merged
        .into_iter()
        .map(|hits| {
            hits.into_iter()
                .map(|f| Hit {
                    id: f.candidate.id,
                    score: f.candidate.score,
                    payload: payloads.get(&key(&f)).cloned().flatten(),
                })
                .collect()
        })
        .collect())
}

/// Where a hit's payload is: replica index and row.
type PayloadKey = (usize, u64, u32);

fn key(f: &Found) -> PayloadKey {
    (f.replica, f.candidate.segment, f.candidate.row)
}

/// Payloads of the final hits, read from the replica each came from.
fn payloads(
    replicas: &[Arc<ShardReplica>],
    hits: &[Vec<Found>],
) -> Result<HashMap<PayloadKey, Option<String>>, EngineError> {
    let mut by_replica: BTreeMap<usize, Vec<Found>> = BTreeMap::new();
    for f in hits.iter().flatten() {
        by_replica.entry(f.replica).or_default().push(*f);
    }
    let mut out = HashMap::new();
    for (replica, found) in by_replica {
        let rows: Vec<Location> = found
            .iter()
            .map(|f| Location {
                segment: f.candidate.segment,
                row: f.candidate.row,
            })
            .collect();
        for (f, payload) in found.iter().zip(replicas[replica].payloads(&rows)?) {
            out.insert(key(f), payload);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
