//! Which sealed segments of a replica to merge next: the compaction
//! policy, a pure function of segment sizes.
//!
//! Small sealed segments make searches slow (every segment is one more
//! graph walk) and keep deleted rows in their graphs. The primary of a
//! shard asks [`choose`] after its writes; when it names sources, the
//! primary logs a [`crate::ShardOp::Merge`] of them, which every replica
//! applies alike (the merge itself is deterministic, see
//! `crate::shard`). The policy needs no determinism: it only decides what
//! to log, so replicas running different versions of it cannot disagree.
//!
//! The policy is size-tiered, like a binary counter: a segment's *tier*
//! is `floor(log_factor(live / seal_rows))`; the lowest tier holding
//! `factor` segments merges its oldest `factor` (so a shard of `n` rows
//! keeps about `log_factor(n / seal_rows)` segments per tier and each row
//! is rebuilt about that many times). Separately, a segment whose deleted
//! rows reach `vacuum` of its rows is rewritten alone, which drops them,
//! and before anything else, every segment whose rows are all deleted
//! goes in one merge (nothing to build: it frees them at its apply).
//! No merge makes a segment above `max_rows` live rows.
//!
//! A merge names its sources in the order that lets its build do least
//! ([`build_order`]): a segment with no deleted row first, the largest of
//! those, so that the merge can extend that segment's graph with the
//! others' rows instead of building a graph of them all (the merged rows
//! follow the order of the sources).
//!
//! Tiers leave a few segments (100,000 rows at seals of 10,000: 80,000 and
//! 20,000), and a search walks every one of them: at the same `ef` two
//! graphs cost almost twice one. So once the shard has had no writes for
//! `quiet_after`, [`choose_quiet`] merges every sealed segment into one,
//! when the segments besides the largest hold at least `quiet_tail` of its
//! rows (each such merge grows the largest by that fraction at least, so a
//! row is rebuilt a bounded number of times however the writes come).

use edgevec_proto::limits;

/// What the policy sees of one sealed segment (growing segments are never
/// merged).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentSize {
    pub id: u64,
    /// Rows in the segment, deleted ones included.
    pub rows: u64,
    /// Rows not deleted.
    pub live: u64,
}

/// The knobs of [`choose`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MergePolicy {
    /// Segments of one tier that are merged together (≥ 2).
    pub factor: u32,
    /// No merge makes a segment with more live rows than this.
    pub max_rows: u64,
    /// Fraction of deleted rows (0..=1) at which a segment is rewritten.
    pub vacuum: f64,
    /// No writes for this long make a shard quiet ([`choose_quiet`]).
    pub quiet_after: std::time::Duration,
    /// See [`choose_quiet`]; above 1 never merges.
    pub quiet_tail: f64,
}

impl Default for MergePolicy {
    fn default() -> MergePolicy {
        MergePolicy {
            factor: limits::MERGE_FACTOR,
            max_rows: limits::MAX_MERGE_ROWS,
            vacuum: limits::MERGE_VACUUM_FRACTION,
            quiet_after: std::time::Duration::from_millis(limits::QUIET_MERGE_AFTER_MS),
            quiet_tail: limits::QUIET_MERGE_TAIL,
        }
    }
}

fn tier(live: u64, seal_rows: u64, factor: u64) -> u32 {
    let (mut t, mut size) = (0, seal_rows.max(1) * factor);
    while live >= size {
        t += 1;
        match size.checked_mul(factor) {
            Some(next) => size = next,
            None => break,
        }
    }
    t
}

/// The merge the policy wants next: [`choose`], or, for a shard that is
/// `quiet` (no writes for `quiet_after`), [`choose_quiet`].
pub fn next_merge(segments: &[SegmentSize], seal_rows: u32, policy: &MergePolicy, quiet: bool) -> Option<Vec<u64>> {
    choose(segments, seal_rows, policy).or_else(|| quiet.then(|| choose_quiet(segments, policy)).flatten())
}

/// The segments that may merge, oldest first. An empty segment (a merge
/// of deleted rows only) costs searches nothing; merging it would only
/// rewrite its partner.
fn oldest_first(segments: &[SegmentSize]) -> Vec<SegmentSize> {
    let mut sorted: Vec<SegmentSize> = segments.iter().filter(|s| s.rows > 0).copied().collect();
    sorted.sort_unstable_by_key(|s| s.id);
    sorted
}

/// `picked` in the order a merge of them should name them: segments with
/// no deleted row before the others, larger before smaller, older before
/// newer.
fn build_order(mut picked: Vec<SegmentSize>) -> Vec<u64> {
    picked.sort_unstable_by_key(|s| (s.rows != s.live, std::cmp::Reverse(s.live), s.id));
    picked.iter().map(|s| s.id).collect()
}

/// The segments to merge next ([`build_order`]), or `None`. `segments` are
/// the shard's sealed segments in any order.
pub fn choose(segments: &[SegmentSize], seal_rows: u32, policy: &MergePolicy) -> Option<Vec<u64>> {
    let sorted = oldest_first(segments);
    // Segments whose rows are all deleted, together: a merge of deleted
    // rows only has nothing to build, and frees their memory at its apply
    // (points written again faster than builds keep up leave many).
    let emptied: Vec<u64> = sorted.iter().filter(|s| s.live == 0).map(|s| s.id).collect();
    if !emptied.is_empty() {
        return Some(emptied);
    }
    // Deleted rows first: a rewrite of one segment is cheap and frees them.
    let vacuum = sorted
        .iter()
        .find(|s| s.rows > 0 && (s.rows - s.live) as f64 >= policy.vacuum * s.rows as f64);
    if let Some(s) = vacuum {
        return Some(vec![s.id]);
    }
    let factor = u64::from(policy.factor.max(2));
    let mut tiers: std::collections::BTreeMap<u32, Vec<SegmentSize>> = Default::default();
    for s in sorted {
        tiers
            .entry(tier(s.live, u64::from(seal_rows), factor))
            .or_default()
            .push(s);
    }
    tiers.into_values().find_map(|members| {
        let pick: Vec<SegmentSize> = members.into_iter().take(factor as usize).collect();
        let live: u64 = pick.iter().map(|s| s.live).sum();
        (pick.len() as u64 == factor && live <= policy.max_rows).then(|| build_order(pick))
    })
}

/// For a quiet shard: every sealed segment with rows ([`build_order`]), when
/// there are two or more, the segments besides the largest hold at least
/// `quiet_tail` of its live rows, and all of them fit in `max_rows`.
pub fn choose_quiet(segments: &[SegmentSize], policy: &MergePolicy) -> Option<Vec<u64>> {
    let sorted = oldest_first(segments);
    let largest = sorted.iter().map(|s| s.live).max()?;
    let total: u64 = sorted.iter().map(|s| s.live).sum();
    let tail = (total - largest) as f64;
    (sorted.len() >= 2 && total <= policy.max_rows && tail >= policy.quiet_tail * largest as f64)
        .then(|| build_order(sorted))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(id: u64, rows: u64, live: u64) -> SegmentSize {
        SegmentSize { id, rows, live }
    }

    fn policy(factor: u32) -> MergePolicy {
        MergePolicy {
            factor,
            max_rows: 1_000,
            vacuum: 0.5,
            ..MergePolicy::default()
        }
    }

    #[test]
    fn a_quiet_shard_merges_into_one_when_the_tail_is_large_enough() {
        let p = policy(2);
        // 80 + 20: the tail is a quarter of the largest.
        assert_eq!(choose_quiet(&[seg(9, 20, 20), seg(4, 80, 80)], &p), Some(vec![4, 9]));
        // 90 + 10: not yet; it waits for more rows.
        assert_eq!(choose_quiet(&[seg(4, 90, 90), seg(9, 10, 10)], &p), None);
        // Live rows count, empty segments are left alone, one is enough.
        assert_eq!(choose_quiet(&[seg(4, 80, 80), seg(9, 40, 10)], &p), None);
        assert_eq!(choose_quiet(&[seg(4, 80, 80), seg(5, 0, 0)], &p), None);
        assert_eq!(choose_quiet(&[seg(4, 80, 80)], &p), None);
        assert_eq!(choose_quiet(&[], &p), None);
        // Never above max_rows.
        assert_eq!(choose_quiet(&[seg(1, 800, 800), seg(2, 300, 300)], &p), None);
        // Three segments: all of them, the largest first.
        let s = [seg(3, 40, 40), seg(1, 50, 50), seg(2, 10, 10)];
        assert_eq!(choose_quiet(&s, &p), Some(vec![1, 3, 2]));
        assert_eq!(choose_quiet(&[seg(4, 20, 20), seg(9, 80, 80)], &p), Some(vec![9, 4]));
        // One with deleted rows goes after those without (a merge extends
        // the graph of its first source only when it has all its rows).
        let s = [seg(3, 60, 50), seg(5, 30, 30)];
        assert_eq!(choose_quiet(&s, &p), Some(vec![5, 3]));
        let never = MergePolicy { quiet_tail: 2.0, ..p };
        assert_eq!(choose_quiet(&s, &never), None);
    }

    #[test]
    fn tiers_grow_by_the_factor() {
        assert_eq!(tier(0, 10, 2), 0);
        assert_eq!(tier(19, 10, 2), 0);
        assert_eq!(tier(20, 10, 2), 1);
        assert_eq!(tier(40, 10, 2), 2);
        assert_eq!(tier(39, 10, 4), 0);
        assert_eq!(tier(40, 10, 4), 1);
        assert!((25..=32).contains(&tier(u64::MAX, 10, 4)), "no overflow");
    }

    #[test]
    fn merges_the_oldest_of_the_lowest_full_tier() {
        let p = policy(2);
        assert_eq!(choose(&[seg(3, 10, 10)], 10, &p), None);
        assert_eq!(choose(&[seg(5, 10, 10), seg(3, 10, 10)], 10, &p), Some(vec![3, 5]));
        // Tier 1 (20 rows) has two, tier 0 one: tier 1 merges.
        let s = [seg(1, 20, 20), seg(4, 20, 20), seg(6, 10, 10)];
        assert_eq!(choose(&s, 10, &p), Some(vec![1, 4]));
        // Three in the lowest full tier: the two oldest.
        let s = [seg(9, 10, 10), seg(2, 10, 10), seg(7, 10, 10)];
        assert_eq!(choose(&s, 10, &p), Some(vec![2, 7]));
        // Factor 4 waits for four.
        assert_eq!(choose(&s, 10, &policy(4)), None);
        let s = [seg(9, 10, 10), seg(2, 10, 10), seg(7, 10, 10), seg(8, 12, 12)];
        // The largest first, then the oldest.
        assert_eq!(choose(&s, 10, &policy(4)), Some(vec![8, 2, 7, 9]));
    }

    #[test]
    fn never_above_max_rows() {
        let s = [seg(1, 600, 600), seg(2, 600, 600)];
        assert_eq!(choose(&s, 10, &policy(2)), None);
    }

    #[test]
    fn a_segment_mostly_deleted_is_rewritten_alone() {
        let p = policy(2);
        let s = [seg(1, 100, 100), seg(2, 100, 50)];
        assert_eq!(choose(&s, 10, &p), Some(vec![2]));
        // Emptied segments go too, all at once and before the others; an
        // empty merge result is left alone.
        assert_eq!(choose(&[seg(4, 10, 0)], 10, &p), Some(vec![4]));
        let s = [seg(1, 100, 50), seg(7, 10, 0), seg(3, 10, 0), seg(5, 0, 0)];
        assert_eq!(choose(&s, 10, &p), Some(vec![3, 7]));
        assert_eq!(choose(&[seg(5, 0, 0), seg(6, 10, 10)], 10, &p), None);
        // Deletes below the threshold only shrink the tier; the segment
        // without deleted rows goes first.
        let s = [seg(1, 100, 60), seg(2, 40, 40)];
        assert_eq!(choose(&s, 10, &p), Some(vec![2, 1]));
    }
}
