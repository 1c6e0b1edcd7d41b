//! Splitting a client write by shard: pure functions over the request.
//!
//! A write to a collection becomes one op per shard it touches
//! (`shard_of(id)`); within one batch the last occurrence of an id wins, so
//! the op a shard logs already holds each id once.

use std::collections::{BTreeMap, HashMap};

use edgevec_proto::{shard_of, Point};

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
