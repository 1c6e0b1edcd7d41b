//! What applying one op changes, decided without touching storage.
//!
//! [`plan`] turns a [`ShardOp`] plus the shard's current id → location map
//! and growing-segment cursor into a [`Plan`]: rows to append, rows to
//! tombstone, the final location of every touched id, and the segments the
//! op seals. The shard then writes the plan to redb in one transaction and,
//! once committed, applies the same plan to memory; both follow this one
//! decision, so disk and memory cannot disagree.
//!
//! Invariants:
//! - the decision depends only on (state, op), so every replica applying the
//!   same LSNs seals the same segments at the same rows; a batch of ops is
//!   planned one op at a time, each against the state the previous left;
//! - a growing segment is sealed the moment its row count reaches
//!   `seal_rows` (rows count replaced ones too: the segment is append-only);
//!   the next growing segment takes the shard's next unused segment id
//!   (merges take ids from the same counter, so ids are never reused and
//!   the growing segment has the highest id of every segment that holds
//!   rows of its own);
//! - every id has at most one live row; replacing or deleting it tombstones
//!   the old row wherever it lives (growing or sealed).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::op::ShardOp;

/// Where a row lives: segment id and row number inside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Location {
    pub segment: u64,
    pub row: u32,
}

/// The growing segment and how many rows it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cursor {
    pub segment: u64,
    pub rows: u32,
}

/// A row appended by the op: `point` indexes the op's point list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Append {
    pub at: Location,
    pub point: usize,
}

/// A merge decided by a [`ShardOp::Merge`]: the new segment, what it
/// replaces and its rows.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MergePlan {
    /// Id of the merged segment (the shard's next unused id).
    pub id: u64,
    /// The segments it replaces, as the op named them.
    pub sources: Vec<u64>,
    /// Every segment that holds rows of its own (growing once, then
    /// sealed) whose rows the merged segment takes over, ascending.
    pub covers: Vec<u64>,
    /// Its rows in order: where each row is stored, and the point id.
    pub rows: Vec<(Location, u64)>,
    /// The merges whose records it removes once installed: every merge
    /// whose rows it takes over (not stored: derived from `covers`).
    pub replaces: Vec<u64>,
}

/// The effect of one op.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// New rows, in row order.
    pub appends: Vec<Append>,
    /// Rows that stop being live, with the id they held.
    pub tombstones: Vec<(Location, u64)>,
    /// Final location of each touched id (`None`: deleted), sorted by id.
    pub points: Vec<(u64, Option<Location>)>,
    /// Segments sealed by this op with their final row count, oldest first.
    pub sealed: Vec<Cursor>,
    /// The growing segment after the op.
    pub growing: Cursor,
    /// The shard's next unused segment id after the op.
    pub next: u64,
    /// The merge the op makes, decided by the shard.
    pub merge: Option<MergePlan>,
}

/// Decides the effect of `op` on a shard whose live rows are given by
/// `current`, whose growing segment is `growing` and whose next unused
/// segment id is `next`. A merge's rows are decided by the shard, which
/// sees its segments; here it changes nothing.
pub fn plan(
    op: &ShardOp,
    current: impl Fn(u64) -> Option<Location>,
    growing: Cursor,
    next: u64,
    seal_rows: u32,
) -> Plan {
    let mut out = Plan {
        growing,
        next,
        ..Plan::default()
    };
    // Ids touched earlier in this op shadow the shard's map.
    let mut touched: HashMap<u64, Option<Location>> = HashMap::new();
    let live = |id: u64, touched: &HashMap<u64, Option<Location>>| match touched.get(&id) {
        Some(loc) => *loc,
        None => current(id),
    };
    match op {
        ShardOp::Upsert(points) => {
            for (i, p) in points.iter().enumerate() {
                if let Some(old) = live(p.id, &touched) {
                    out.tombstones.push((old, p.id));
                }
                let at = Location {
                    segment: out.growing.segment,
                    row: out.growing.rows,
                };
                out.appends.push(Append { at, point: i });
                touched.insert(p.id, Some(at));
                out.growing.rows += 1;
                if out.growing.rows >= seal_rows {
                    out.sealed.push(out.growing);
                    out.growing = Cursor {
                        segment: out.next,
                        rows: 0,
                    };
                    out.next += 1;
                }
            }
        }
        ShardOp::Delete(ids) => {
            for &id in ids {
                if let Some(old) = live(id, &touched) {
                    out.tombstones.push((old, id));
                    touched.insert(id, None);
                }
            }
        }
        // Marks the start of a primary's term in the log; no rows change.
        ShardOp::EpochStart | ShardOp::Merge { .. } => {}
    }
    out.points = touched.into_iter().collect();
    out.points.sort_unstable_by_key(|(id, _)| *id);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgevec_proto::Point;

    fn up(ids: &[u64]) -> ShardOp {
        ShardOp::Upsert(
            ids.iter()
                .map(|&id| Point {
                    id,
                    vector: vec![id as f32],
                    payload: None,
                })
                .collect(),
        )
    }

    fn loc(segment: u64, row: u32) -> Location {
        Location { segment, row }
    }

    #[test]
    fn seals_at_exactly_seal_rows() {
        let start = Cursor { segment: 1, rows: 62 };
        let p = plan(&up(&[1, 2]), |_| None, start, 2, 64);
        assert_eq!(p.sealed, vec![Cursor { segment: 1, rows: 64 }]);
        assert_eq!(p.growing, Cursor { segment: 2, rows: 0 });
        assert_eq!(p.next, 3);
        assert_eq!(p.appends[1].at, loc(1, 63));

        // Ids a merge took are skipped.
        let p = plan(&up(&[1, 2]), |_| None, start, 7, 64);
        assert_eq!((p.growing, p.next), (Cursor { segment: 7, rows: 0 }, 8));

        let p = plan(&up(&[1]), |_| None, start, 2, 64);
        assert!(p.sealed.is_empty());
        assert_eq!(p.growing, Cursor { segment: 1, rows: 63 });

        // One large op can seal several segments.
        let ids: Vec<u64> = (0..200).collect();
        let p = plan(&up(&ids), |_| None, Cursor { segment: 5, rows: 0 }, 6, 64);
        let sealed: Vec<u64> = p.sealed.iter().map(|c| c.segment).collect();
        assert_eq!(sealed, vec![5, 6, 7]);
        assert!(p.sealed.iter().all(|c| c.rows == 64));
        assert_eq!(p.growing, Cursor { segment: 8, rows: 8 });
        assert_eq!(p.appends[64].at, loc(6, 0));
    }

    #[test]
    fn replace_tombstones_old_row_and_last_wins() {
        let existing = |id| (id == 9).then_some(loc(1, 0));
        let p = plan(&up(&[9, 4, 4]), existing, Cursor { segment: 2, rows: 0 }, 3, 64);
        assert_eq!(p.tombstones, vec![(loc(1, 0), 9), (loc(2, 1), 4)]);
        assert_eq!(p.points, vec![(4, Some(loc(2, 2))), (9, Some(loc(2, 0)))]);
        // Replaced rows still count toward sealing: the segment is append-only.
        assert_eq!(p.growing.rows, 3);
    }

    #[test]
    fn delete_tombstones_and_ignores_missing() {
        let existing = |id| (id == 3).then_some(loc(1, 7));
        let p = plan(
            &ShardOp::Delete(vec![3, 4, 3]),
            existing,
            Cursor { segment: 2, rows: 5 },
            3,
            64,
        );
        assert_eq!(p.tombstones, vec![(loc(1, 7), 3)]);
        assert_eq!(p.points, vec![(3, None)]);
        assert!(p.appends.is_empty());
        assert_eq!(p.growing, Cursor { segment: 2, rows: 5 });
    }

    #[test]
    fn epoch_start_and_merge_change_no_rows() {
        let start = Cursor { segment: 3, rows: 9 };
        for op in [ShardOp::EpochStart, ShardOp::Merge { sources: vec![1, 2] }] {
            let p = plan(&op, |_| Some(loc(1, 1)), start, 4, 64);
            assert_eq!(
                p,
                Plan {
                    growing: start,
                    next: 4,
                    ..Plan::default()
                }
            );
        }
    }
}
