//! The rules of a replica's op log, decided without touching storage.
//!
//! A replica's log is a contiguous run of ops `first ..= last` (a prefix
//! may have been dropped by retention), each named by its op id
//! `(term, lsn)`. Next to it the replica keeps, durably:
//!
//! - its **term**: the highest primary term it has accepted. It only grows
//!   (a truncation does not lower it), and it is never below the term of
//!   any logged op, so "refuse ops of an older term" (REPLICATION.md,
//!   invariant 4) is one comparison;
//! - its **term history**: `(term, first lsn of that term)` for every term
//!   that has ops in the log, ascending in both. Never shortened by
//!   retention, only by a truncation (entries whose first LSN is cut off),
//!   so the op id at any LSN up to `last` can be named even after the op
//!   itself was dropped, and two replicas can find where their logs part.
//!
//! [`LogState`] holds these in memory; [`LogState::check_append`] is the
//! log-matching rule (an append must continue exactly from our last op id),
//! [`LogState::truncated`] what a truncation leaves, and [`retention_cut`]
//! how much of the log's applied prefix retention may drop. The shard
//! writes their results to redb and only then updates its `LogState`.

use edgevec_proto::OpId;

use crate::error::EngineError;

/// Where a replica's log stands; the in-memory mirror of its durable
/// records.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LogState {
    /// Highest term accepted.
    pub term: u64,
    /// Last op in the log (`OpId::ZERO`: nothing was ever logged, or all of
    /// it was truncated).
    pub last: OpId,
    /// `(term, first lsn)` pairs, ascending.
    pub history: Vec<(u64, u64)>,
    /// Oldest LSN still in the log (`None`: the log holds no entry).
    pub first_logged: Option<u64>,
}

/// What an accepted append changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    /// The durable term afterwards.
    pub term: u64,
    /// The new last op.
    pub last: OpId,
    /// Term history entries to add, ascending.
    pub new_terms: Vec<(u64, u64)>,
}

impl LogState {
    /// The op id at `lsn` according to the term history: `OpId::ZERO` for
    /// 0, `None` above the last op.
    pub fn op_id_at(&self, lsn: u64) -> Option<OpId> {
        edgevec_proto::term_at(&self.history, self.last, lsn).map(|term| OpId::new(term, lsn))
    }

    /// Checks that ops with ids `ids` may be appended after `prev`:
    /// `prev` is exactly our last op, LSNs follow one another, and terms
    /// never decrease along the log. The durable term is raised to the
    /// highest op term; ops of older terms are accepted (a primary resends
    /// its own log); fencing senders by term is the caller's check.
    pub fn check_append(
        &self,
        shard: u32,
        prev: OpId,
        ids: impl IntoIterator<Item = OpId>,
    ) -> Result<Appended, EngineError> {
        if prev != self.last {
            return Err(EngineError::LogMismatch {
                shard,
                expected_prev: self.last,
                got_prev: prev,
            });
        }
        let mut out = Appended {
            term: self.term,
            last: prev,
            new_terms: Vec::new(),
        };
        let mut history_term = self.history.last().map(|(term, _)| *term);
        for id in ids {
            if id.lsn != out.last.lsn + 1 {
                return Err(EngineError::LsnOutOfOrder {
                    shard,
                    expected: out.last.lsn + 1,
                    got: id.lsn,
                });
            }
            // Terms never decrease along a log. An op of a term older than
            // the durable term is fine: the current primary resends its own
            // log, older terms included (the durable term fences senders,
            // which the node checks per message, not ops).
            if id.term < out.last.term {
                return Err(EngineError::StaleTerm {
                    shard,
                    term: id.term,
                    current: out.last.term,
                });
            }
            out.term = out.term.max(id.term);
            if history_term != Some(id.term) {
                out.new_terms.push((id.term, id.lsn));
                history_term = Some(id.term);
            }
            out.last = id;
        }
        Ok(out)
    }

    /// The state after removing every op above `lsn` (`lsn < last.lsn`).
    /// The term stays; `first_logged` is left to the caller, who knows
    /// what the store still holds.
    pub fn truncated(&self, lsn: u64) -> LogState {
        let history: Vec<(u64, u64)> = self
            .history
            .iter()
            .copied()
            .filter(|(_, first)| *first <= lsn)
            .collect();
        let last = OpId::new(history.last().map_or(0, |(term, _)| *term), lsn);
        LogState {
            term: self.term,
            last,
            history,
            first_logged: self.first_logged,
        }
    }
}

/// Entries retention keeps, within a budget, for replicas away from the
/// in-sync set: everything above `above` while the log takes at most
/// `budget` bytes (a replica that returns then catches up from the log
/// instead of an export of the whole shard).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    pub above: u64,
    pub budget: u64,
}

impl Held {
    /// Nothing held.
    pub const NONE: Held = Held {
        above: u64::MAX,
        budget: 0,
    };
}

/// How much of the log retention drops: `entries` is the log oldest first
/// as `(lsn, encoded bytes)`, `total` the bytes of the whole log. Drops
/// oldest entries while the log exceeds `budget`, but never one above
/// `keep_above` (the applied LSN, or a lower floor), and one above
/// `held.above` only while the log also exceeds `held.budget`. Returns
/// the last LSN to drop and the bytes dropped, or `None` when nothing goes.
///
/// Reads `entries` only as far as it drops, so the caller can pass a lazy
/// iterator over the stored log.
pub fn retention_cut<E>(
    entries: impl IntoIterator<Item = Result<(u64, u64), E>>,
    total: u64,
    budget: u64,
    keep_above: u64,
    held: Held,
) -> Result<Option<(u64, u64)>, E> {
    let mut cut = None;
    let mut dropped = 0u64;
    for entry in entries {
        let left = total.saturating_sub(dropped);
        if left <= budget {
            break;
        }
        let (lsn, bytes) = entry?;
        if lsn > keep_above || (lsn > held.above && left <= held.budget) {
            break;
        }
        dropped += bytes;
        cut = Some((lsn, dropped));
    }
    Ok(cut)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(term: u64, lsn: u64) -> OpId {
        OpId::new(term, lsn)
    }

    fn state(term: u64, last: OpId, history: &[(u64, u64)]) -> LogState {
        LogState {
            term,
            last,
            history: history.to_vec(),
            first_logged: Some(1),
        }
    }

    #[test]
    fn op_ids_come_from_the_history() {
        let s = state(7, id(5, 9), &[(1, 1), (2, 4), (5, 8)]);
        let got: Vec<Option<OpId>> = (0..=10).map(|lsn| s.op_id_at(lsn)).collect();
        let want = [
            Some(OpId::ZERO),
            Some(id(1, 1)),
            Some(id(1, 2)),
            Some(id(1, 3)),
            Some(id(2, 4)),
            Some(id(2, 5)),
            Some(id(2, 6)),
            Some(id(2, 7)),
            Some(id(5, 8)),
            Some(id(5, 9)),
            None,
        ];
        assert_eq!(got, want);
        assert_eq!(LogState::default().op_id_at(1), None);
    }

    #[test]
    fn append_follows_log_matching() {
        let s = state(3, id(2, 4), &[(1, 1), (2, 3)]);
        match s.check_append(0, id(1, 4), [id(3, 5)]) {
            Err(EngineError::LogMismatch {
                expected_prev,
                got_prev,
                ..
            }) => assert_eq!((expected_prev, got_prev), (id(2, 4), id(1, 4))),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            s.check_append(0, id(2, 4), [id(3, 5), id(3, 7)]),
            Err(EngineError::LsnOutOfOrder {
                expected: 6,
                got: 7,
                ..
            })
        ));
        // An op of a term below the durable term is the current primary
        // resending its log: accepted, the durable term stays.
        let resent = s.check_append(0, id(2, 4), [id(2, 5)]).unwrap();
        assert_eq!((resent.term, resent.last), (3, id(2, 5)));
        assert!(resent.new_terms.is_empty());
        // Terms never decrease along the log, inside a batch either.
        assert!(matches!(
            s.check_append(0, id(2, 4), [id(4, 5), id(3, 6)]),
            Err(EngineError::StaleTerm {
                term: 3,
                current: 4,
                ..
            })
        ));
        let a = s.check_append(0, id(2, 4), [id(3, 5), id(3, 6), id(6, 7)]).unwrap();
        assert_eq!(
            a,
            Appended {
                term: 6,
                last: id(6, 7),
                new_terms: vec![(3, 5), (6, 7)]
            }
        );
        // Continuing the last term adds no history entry.
        let s = state(2, id(2, 4), &[(1, 1), (2, 3)]);
        assert_eq!(s.check_append(0, id(2, 4), [id(2, 5)]).unwrap().new_terms, vec![]);
        let none = s.check_append(0, id(2, 4), []).unwrap();
        assert_eq!((none.term, none.last), (2, id(2, 4)));
        // The very first op opens the history, even in term 0.
        let fresh = LogState::default().check_append(0, OpId::ZERO, [id(0, 1)]).unwrap();
        assert_eq!(fresh.new_terms, vec![(0, 1)]);
    }

    #[test]
    fn truncation_keeps_the_term_and_cuts_the_history() {
        let s = state(9, id(5, 9), &[(1, 1), (2, 4), (5, 8)]);
        let t = s.truncated(5);
        assert_eq!((t.term, t.last, t.history.clone()), (9, id(2, 5), vec![(1, 1), (2, 4)]));
        let t = s.truncated(3);
        assert_eq!((t.last, t.history.clone()), (id(1, 3), vec![(1, 1)]));
        let t = s.truncated(0);
        assert_eq!((t.term, t.last, t.history), (9, OpId::ZERO, vec![]));
    }

    #[test]
    fn retention_drops_applied_prefix_down_to_budget() {
        let log = |sizes: &[(u64, u64)]| sizes.iter().map(|e| Ok::<_, ()>(*e)).collect::<Vec<_>>();
        let entries = log(&[(3, 10), (4, 10), (5, 10), (6, 10)]);
        // 40 bytes, budget 25: drop 3 and 4.
        let none = Held::NONE;
        assert_eq!(retention_cut(entries.clone(), 40, 25, 6, none), Ok(Some((4, 20))));
        // Never above keep_above, even over budget.
        assert_eq!(retention_cut(entries.clone(), 40, 0, 4, none), Ok(Some((4, 20))));
        assert_eq!(retention_cut(entries.clone(), 40, 0, 2, none), Ok(None));
        // Within budget: nothing.
        assert_eq!(retention_cut(entries.clone(), 40, 40, 6, none), Ok(None));
        // A budget of 0 empties everything that may go.
        assert_eq!(retention_cut(entries.clone(), 40, 0, u64::MAX, none), Ok(Some((6, 40))));

        // Held above 3 within 30 bytes: 3 goes (40 > 25), then 30 bytes
        // are left, within the held budget.
        let held = Held { above: 3, budget: 30 };
        assert_eq!(retention_cut(entries.clone(), 40, 25, 6, held), Ok(Some((3, 10))));
        // Over the held budget, held entries go too, down to it.
        let held = Held { above: 3, budget: 20 };
        assert_eq!(retention_cut(entries.clone(), 40, 0, 6, held), Ok(Some((4, 20))));
        // Held entries are never a reason to keep more than keep_above
        // allows dropping, nor to drop above it.
        assert_eq!(retention_cut(entries.clone(), 40, 0, 3, held), Ok(Some((3, 10))));
        // A held budget below the retention budget holds nothing more.
        let held = Held { above: 2, budget: 10 };
        assert_eq!(retention_cut(entries, 40, 25, 6, held), Ok(Some((4, 20))));
    }
}
