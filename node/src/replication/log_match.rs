//! Log matching between a primary and a backup, as pure functions over
//! term histories and op ids (REPLICATION.md, write rule 3 and "Change of
//! primary" step 3).
//!
//! A shard's log is described by its last op id and its term history:
//! `(term, first lsn)` pairs in ascending order. The term of the op at an
//! LSN is the term of the last history entry starting at or before it.
//! Two logs that hold the same op id at an LSN hold the same ops up to it
//! (one primary per term, and a restarted primary never resumes its term),
//! so agreement is prefix-closed and the point where two logs diverge is
//! the highest LSN at which their terms agree.

use edgevec_proto::OpId;

/// A log as seen from outside: its last op id and its term history.
#[derive(Debug, Clone, Copy)]
pub struct LogShape<'a> {
    pub last: OpId,
    pub history: &'a [(u64, u64)],
}

impl LogShape<'_> {
    /// Term of the op at `lsn`: `Some(0)` for LSN 0 (the empty prefix),
    /// `None` beyond the end of the log.
    pub fn term_at(&self, lsn: u64) -> Option<u64> {
        edgevec_proto::term_at(self.history, self.last, lsn)
    }

    /// First LSN of the run of ops of one term that contains `lsn`.
    fn run_start(&self, lsn: u64) -> u64 {
        self.history
            .iter()
            .rev()
            .find(|(_, first)| *first <= lsn)
            .map_or(1, |(_, first)| *first)
    }

    /// Whether this log holds exactly `id`.
    pub fn holds(&self, id: OpId) -> bool {
        self.term_at(id.lsn) == Some(id.term)
    }
}

/// The highest LSN at which both logs hold the same op (0 if none).
///
/// Walks down from the shorter end a run at a time: where the terms
/// differ at an LSN, they differ over the whole stretch in which neither
/// log changes term, so the search jumps below the later of the two run
/// starts. Runs are few (one per primary term), so this is cheap.
pub fn divergence(a: LogShape<'_>, b: LogShape<'_>) -> u64 {
    let mut lsn = a.last.lsn.min(b.last.lsn);
    while lsn > 0 {
        if a.term_at(lsn) == b.term_at(lsn) {
            return lsn;
        }
        lsn = a.run_start(lsn).max(b.run_start(lsn)) - 1;
    }
    0
}

/// What a backup does with entries that follow `prev`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Accept {
    /// `prev` is not in the log: answer with the log's shape so the primary
    /// can find the divergence point.
    Mismatch,
    /// Truncate the log after `truncate_after` (if set), then append the
    /// entries from index `from` of the received list.
    Append { truncate_after: Option<u64>, from: usize },
}

/// Decides how a backup whose log is `mine` takes entries `incoming`
/// (consecutive LSNs after `prev`): entries it already holds are skipped
/// (a resend), the first conflicting one and everything after it in the
/// log are truncated (an old primary's suffix nobody committed).
pub fn accept(mine: LogShape<'_>, prev: OpId, incoming: &[OpId]) -> Accept {
    if !mine.holds(prev) {
        return Accept::Mismatch;
    }
    for (i, id) in incoming.iter().enumerate() {
        match mine.term_at(id.lsn) {
            Some(t) if t == id.term => continue,
            Some(_) => {
                return Accept::Append {
                    truncate_after: Some(id.lsn - 1),
                    from: i,
                }
            }
            None => {
                return Accept::Append {
                    truncate_after: None,
                    from: i,
                }
            }
        }
    }
    Accept::Append {
        truncate_after: None,
        from: incoming.len(),
    }
}

/// The LSN through which a backup may make ops searchable: committed by
/// the primary, and verified against the current primary in this term
/// (REPLICATION.md, write rule 6).
pub fn applicable(commit_lsn: u64, verified_lsn: u64) -> u64 {
    commit_lsn.min(verified_lsn)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A log given as the term of each op, LSN 1 first.
    fn log(terms: &[u64]) -> (OpId, Vec<(u64, u64)>) {
        let mut history: Vec<(u64, u64)> = Vec::new();
        for (i, &t) in terms.iter().enumerate() {
            if history.last().is_none_or(|(last, _)| *last != t) {
                history.push((t, i as u64 + 1));
            }
        }
        let last = terms.last().map_or(OpId::ZERO, |&t| OpId::new(t, terms.len() as u64));
        (last, history)
    }

    fn shape(l: &(OpId, Vec<(u64, u64)>)) -> LogShape<'_> {
        LogShape {
            last: l.0,
            history: &l.1,
        }
    }

    /// Reference: compare op by op.
    fn naive(a: &[u64], b: &[u64]) -> u64 {
        a.iter().zip(b).take_while(|(x, y)| x == y).count() as u64
    }

    #[test]
    fn term_at_reads_the_history() {
        let l = log(&[1, 1, 2, 2, 2, 5]);
        let s = shape(&l);
        assert_eq!(s.term_at(0), Some(0));
        assert_eq!(s.term_at(2), Some(1));
        assert_eq!(s.term_at(3), Some(2));
        assert_eq!(s.term_at(6), Some(5));
        assert_eq!(s.term_at(7), None);
        assert!(s.holds(OpId::new(2, 5)));
        assert!(!s.holds(OpId::new(1, 5)));
        assert!(s.holds(OpId::ZERO));
    }

    /// Every pair of logs that can arise agrees with the op-by-op
    /// reference: a shared prefix, then each log goes on in terms the
    /// other never holds (one primary per term), either one possibly
    /// continuing the prefix's last term.
    #[test]
    fn divergence_matches_the_reference_exhaustively() {
        // Non-decreasing term sequences of length ≤ len over min..=5.
        fn seqs(len: usize, min: u64) -> Vec<Vec<u64>> {
            let mut out = vec![vec![]];
            if len == 0 {
                return out;
            }
            for t in min..=5 {
                for rest in seqs(len - 1, t) {
                    let mut s = vec![t];
                    s.extend(rest);
                    out.push(s);
                }
            }
            out
        }
        let mut checked = 0;
        for prefix in seqs(3, 1) {
            let floor = prefix.last().copied().unwrap_or(1);
            let suffixes = seqs(3, floor);
            for sa in &suffixes {
                for sb in &suffixes {
                    if sa.iter().any(|t| sb.contains(t)) {
                        continue;
                    }
                    let a: Vec<u64> = prefix.iter().chain(sa).copied().collect();
                    let b: Vec<u64> = prefix.iter().chain(sb).copied().collect();
                    let (la, lb) = (log(&a), log(&b));
                    assert_eq!(divergence(shape(&la), shape(&lb)), naive(&a, &b), "a={a:?} b={b:?}");
                    assert_eq!(divergence(shape(&lb), shape(&la)), naive(&a, &b), "b={b:?} a={a:?}");
                    checked += 1;
                }
            }
        }
        assert!(checked > 1000, "only {checked} pairs checked");
    }

    #[test]
    fn accept_skips_resends_truncates_conflicts_and_reports_gaps() {
        let mine = log(&[1, 1, 1, 1]);
        let s = shape(&mine);
        // Next entries: append all.
        assert_eq!(
            accept(s, OpId::new(1, 4), &[OpId::new(1, 5)]),
            Accept::Append {
                truncate_after: None,
                from: 0
            }
        );
        // A resend of what is held, plus one new entry.
        assert_eq!(
            accept(s, OpId::new(1, 2), &[OpId::new(1, 3), OpId::new(1, 4), OpId::new(1, 5)]),
            Accept::Append {
                truncate_after: None,
                from: 2
            }
        );
        // A new primary's epoch start over an old suffix: truncate after 2.
        assert_eq!(
            accept(s, OpId::new(1, 2), &[OpId::new(2, 3)]),
            Accept::Append {
                truncate_after: Some(2),
                from: 0
            }
        );
        // A gap, or a prev of another term: mismatch.
        assert_eq!(accept(s, OpId::new(1, 6), &[OpId::new(1, 7)]), Accept::Mismatch);
        assert_eq!(accept(s, OpId::new(2, 3), &[OpId::new(2, 4)]), Accept::Mismatch);
        // Everything already held: nothing to do.
        assert_eq!(
            accept(s, OpId::new(1, 3), &[OpId::new(1, 4)]),
            Accept::Append {
                truncate_after: None,
                from: 1
            }
        );
    }

    #[test]
    fn a_backup_applies_only_what_is_committed_and_verified() {
        assert_eq!(applicable(10, 7), 7);
        assert_eq!(applicable(5, 7), 5);
        assert_eq!(applicable(0, 7), 0);
    }
}
