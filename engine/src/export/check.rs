//! Whether the records of an export describe a shard this replica can
//! become: the pure checks a reader makes while records stream by, so that
//! a buggy or foreign export is refused before anything is swapped in (the
//! checksum only catches damage after writing).
//!
//! Checked: the `Shard` record comes first and once, and matches the
//! replica's shard, dim, metric and seal_rows (else
//! [`EngineError::Invalid`]: the caller picked the wrong file); kinds come
//! in file order and keys ascend within a kind; the term history ascends,
//! starts no term above the last op and names the last op's term; rows are
//! contiguous from 0 in segments that exist, with `dim` finite components
//! (from format 5, a sealed segment that an installed merge covers may
//! lack rows: those the merge dropped, reclaimed; its rows still ascend
//! and stay below its record's count); payloads, tombstones and points
//! name existing rows; the growing segment is the highest, is growing and
//! has the rows the `Shard` record says; every other segment is sealed
//! with the rows its record says (or, reclaimed, fewer); a merge's
//! id is no segment's, it covers sealed segments only, and its rows are
//! distinct existing rows of those; the chunks of an index file belong to
//! a sealed segment or a merge, are not empty, and follow each other from
//! offset 0 (what the file holds is the importer's index load to check);
//! a `Reused` record (format 4 on) stands for all the rows of a sealed
//! segment that has no rows, payloads or index file in the file, with the
//! rows its record says.
//! Anything else is [`EngineError::Corrupt`].

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use edgevec_proto::{OpId, SegmentState};

use super::{corrupt, MergeV1, RecordV1, ShardV1};
use crate::error::EngineError;
use crate::shard::ShardConfig;

struct SegmentCheck {
    state: SegmentState,
    /// Rows the segment record says (sealed segments).
    rows: u32,
    /// Rows seen so far.
    seen: u32,
    /// One past the last row seen.
    next: u32,
    /// The rows seen, once they are not `0..seen` (rows were reclaimed).
    sparse: Option<Vec<u32>>,
}

impl SegmentCheck {
    fn has(&self, row: u32) -> bool {
        match &self.sparse {
            Some(rows) => rows.binary_search(&row).is_ok(),
            None => row < self.seen,
        }
    }
}

pub(super) struct Checker<'a> {
    config: &'a ShardConfig,
    file: &'a Path,
    stage: u8,
    /// Key of the previous record of the current kind.
    key: Option<(u64, u64)>,
    shard: Option<(OpId, u64, u32)>,
    segments: BTreeMap<u64, SegmentCheck>,
    merges: HashSet<u64>,
    /// Bytes of the index file being read: (segment or merge, bytes).
    index: Option<(u64, u64)>,
    points: u64,
    /// The file's format version.
    version: u32,
    /// Segments `Reused` records stand for, and their rows.
    reused: HashSet<u64>,
    reused_rows: u64,
    /// Segments covered by installed merges (which may lack rows).
    covered: HashSet<u64>,
}

impl<'a> Checker<'a> {
    pub fn new(config: &'a ShardConfig, file: &'a Path, version: u32) -> Checker<'a> {
        Checker {
            config,
            file,
            stage: 0,
            key: None,
            shard: None,
            segments: BTreeMap::new(),
            merges: HashSet::new(),
            index: None,
            points: 0,
            version,
            reused: HashSet::new(),
            reused_rows: 0,
            covered: HashSet::new(),
        }
    }

    fn corrupt(&self, message: impl ToString) -> EngineError {
        corrupt(self.file, message)
    }

    /// Checks the next record.
    pub fn check(&mut self, rec: &RecordV1) -> Result<(), EngineError> {
        let stage = rec.stage();
        match (self.shard.is_some(), stage) {
            (false, 0) => {}
            (false, _) => return Err(self.corrupt("the first record is not the shard record")),
            (true, 0) => return Err(self.corrupt("a second shard record")),
            (true, _) if stage < self.stage => {
                return Err(self.corrupt(format!("records out of order: {rec:?} after a later kind")))
            }
            (true, _) => {}
        }
        if stage != self.stage {
            self.stage = stage;
            self.key = None;
        }
        let key = match rec {
            RecordV1::Shard(s) => {
                self.shard = Some(self.check_shard(s)?);
                return Ok(());
            }
            RecordV1::Segment(s) => (s.id, 0),
            RecordV1::Row { segment, row, .. }
            | RecordV1::Payload { segment, row, .. }
            | RecordV1::Tombstone { segment, row, .. } => (*segment, u64::from(*row)),
            RecordV1::Reused { segment, .. } => (*segment, 0),
            RecordV1::Point { id, .. } => (*id, 0),
            RecordV1::Merge(m) => (m.id, 0),
            RecordV1::IndexChunk { segment, offset, .. } => (*segment, *offset),
        };
        if self.key.is_some_and(|prev| prev >= key) {
            return Err(self.corrupt(format!("keys do not ascend at {rec:?}")));
        }
        self.key = Some(key);
        match rec {
            RecordV1::Shard(_) => unreachable!("handled above"),
            RecordV1::Segment(s) => {
                self.segments.insert(
                    s.id,
                    SegmentCheck {
                        state: s.state,
                        rows: s.rows,
                        seen: 0,
                        next: 0,
                        sparse: None,
                    },
                );
            }
            RecordV1::Row {
                segment, row, vector, ..
            } => {
                let dim = self.config.dim as usize;
                if vector.len() != dim || vector.iter().any(|x| !x.is_finite()) {
                    return Err(self.corrupt(format!("row {row} of segment {segment} is not {dim} finite numbers")));
                }
                let sparse_ok = self.version >= 5;
                let Some(seg) = self.segments.get_mut(segment) else {
                    return Err(self.corrupt(format!("row {row} of missing segment {segment}")));
                };
                let sealed = seg.state == SegmentState::Sealed;
                let gap = sparse_ok && sealed && *row > seg.next;
                if (*row != seg.next && !gap) || (sealed && *row >= seg.rows) {
                    let seen = seg.seen;
                    return Err(self.corrupt(format!("segment {segment} has row {row} after {seen} rows")));
                }
                if gap && seg.sparse.is_none() {
                    seg.sparse = Some((0..seg.seen).collect());
                }
                if let Some(rows) = &mut seg.sparse {
                    rows.push(*row);
                }
                seg.seen += 1;
                seg.next = *row + 1;
            }
            RecordV1::Reused { segment, rows, .. } => self.check_reused(*segment, *rows)?,
            RecordV1::Payload { segment, .. } if self.reused.contains(segment) => {
                return Err(self.corrupt(format!(
                    "{rec:?} of segment {segment}, whose payloads the importer takes from its own copy"
                )));
            }
            RecordV1::Payload { segment, row, .. } | RecordV1::Tombstone { segment, row, .. } => {
                self.row_exists(*segment, *row, rec)?;
            }
            RecordV1::Point { segment, row, .. } => {
                self.row_exists(*segment, *row, rec)?;
                self.points += 1;
            }
            RecordV1::Merge(m) => {
                self.check_merge(m)?;
                self.merges.insert(m.id);
                if m.installed {
                    self.covered.extend(m.covers.iter().copied());
                }
            }
            RecordV1::IndexChunk { segment, offset, bytes } => self.check_index(*segment, *offset, bytes.len())?,
        }
        Ok(())
    }

    fn check_reused(&mut self, segment: u64, rows: u32) -> Result<(), EngineError> {
        if self.version < 4 {
            return Err(self.corrupt(format!(
                "a record reusing segment {segment} in a file of format {}, which has none",
                self.version
            )));
        }
        let growing = self.shard.map(|(_, growing, _)| growing);
        match self.segments.get_mut(&segment) {
            Some(seg)
                if Some(segment) != growing
                    && seg.state == SegmentState::Sealed
                    && seg.seen == 0
                    && seg.rows == rows =>
            {
                seg.seen = rows;
                seg.next = rows;
                self.reused.insert(segment);
                self.reused_rows += u64::from(rows);
                Ok(())
            }
            _ => Err(self.corrupt(format!(
                "a record reusing {rows} rows of segment {segment}, which is no sealed segment of that many \
                 rows without rows in the file"
            ))),
        }
    }

    fn check_index(&mut self, segment: u64, offset: u64, len: usize) -> Result<(), EngineError> {
        if self.reused.contains(&segment) {
            return Err(self.corrupt(format!(
                "an index file for segment {segment}, which the importer takes from its own copy"
            )));
        }
        let growing = self.shard.map(|(_, growing, _)| growing);
        let sealed = self.segments.contains_key(&segment) && Some(segment) != growing;
        if !sealed && !self.merges.contains(&segment) {
            return Err(self.corrupt(format!(
                "an index file for {segment}, which is no sealed segment or merge"
            )));
        }
        let held = match self.index {
            Some((s, bytes)) if s == segment => bytes,
            _ => 0,
        };
        if len == 0 || offset != held {
            return Err(self.corrupt(format!(
                "index chunk of {len} bytes at offset {offset} of segment {segment}, after {held} bytes"
            )));
        }
        self.index = Some((segment, held + len as u64));
        Ok(())
    }

    fn check_merge(&self, m: &MergeV1) -> Result<(), EngineError> {
        let growing = self.shard.map(|(_, growing, _)| growing);
        if self.segments.contains_key(&m.id) {
            return Err(self.corrupt(format!("merge {} has the id of a segment", m.id)));
        }
        for c in &m.covers {
            if Some(*c) == growing || !self.segments.contains_key(c) {
                return Err(self.corrupt(format!("merge {} covers {c}, which is not a sealed segment", m.id)));
            }
        }
        let mut seen = HashSet::with_capacity(m.rows.len());
        for &(segment, row, _) in &m.rows {
            let exists = self.segments.get(&segment).is_some_and(|s| s.has(row));
            if !exists || !m.covers.contains(&segment) || !seen.insert((segment, row)) {
                return Err(self.corrupt(format!(
                    "merge {} names row {row} of segment {segment}: missing, twice, or outside what it covers",
                    m.id
                )));
            }
        }
        Ok(())
    }

    fn row_exists(&self, segment: u64, row: u32, rec: &RecordV1) -> Result<(), EngineError> {
        match self.segments.get(&segment) {
            Some(seg) if seg.has(row) => Ok(()),
            _ => Err(self.corrupt(format!("{rec:?} names a row that does not exist"))),
        }
    }

    /// Checks the shard record; returns the last op, growing segment and
    /// its rows.
    fn check_shard(&self, s: &ShardV1) -> Result<(OpId, u64, u32), EngineError> {
        let c = self.config;
        let file = self.file.display();
        let mismatch = |field: &str, theirs: String, ours: String| {
            EngineError::invalid(
                field,
                format!("export {file} has {field} {theirs}, the replica to import it into has {ours}"),
            )
        };
        if s.shard != c.shard {
            return Err(mismatch("shard", s.shard.to_string(), c.shard.to_string()));
        }
        if s.dim != c.dim {
            return Err(mismatch("dim", s.dim.to_string(), c.dim.to_string()));
        }
        if s.metric != c.metric {
            return Err(mismatch("metric", s.metric.to_string(), c.metric.to_string()));
        }
        // Replicas that seal at different rows would part ways at the next
        // seal.
        if s.seal_rows != c.seal_rows {
            return Err(mismatch("seal_rows", s.seal_rows.to_string(), c.seal_rows.to_string()));
        }
        let h = &s.history;
        let ascending = h.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 < w[1].1);
        if !ascending || h.iter().any(|&(_, first)| first == 0 || first > s.last_lsn) {
            return Err(self.corrupt(format!(
                "term history {h:?} is not ascending within LSNs 1..={}",
                s.last_lsn
            )));
        }
        let last = OpId::new(s.last_term, s.last_lsn);
        if edgevec_proto::term_at(h, last, last.lsn) != Some(last.term) {
            return Err(self.corrupt(format!("last op {last} does not match term history {h:?}")));
        }
        if s.term < last.term {
            return Err(self.corrupt(format!("term {} is below the last op {last}", s.term)));
        }
        Ok((last, s.growing, s.growing_rows))
    }

    /// Checks what only the whole file shows; returns the last op id, the
    /// number of live points and the rows of reused segments.
    pub fn finish(&self) -> Result<(OpId, u64, u64), EngineError> {
        let Some((last, growing, growing_rows)) = self.shard else {
            return Err(self.corrupt("no shard record"));
        };
        if self.segments.last_key_value().map(|(id, _)| *id) != Some(growing) {
            return Err(self.corrupt(format!("growing segment {growing} is not the highest segment")));
        }
        for (id, seg) in &self.segments {
            let (state, rows) = if *id == growing {
                (SegmentState::Growing, growing_rows)
            } else {
                (SegmentState::Sealed, seg.rows)
            };
            // Rows reclaimed (checked as they came) leave fewer.
            let reclaimed = self.covered.contains(id) && state == SegmentState::Sealed;
            let complete = seg.seen == rows && seg.sparse.is_none();
            if seg.state != state || !(complete || reclaimed && seg.seen <= rows) {
                return Err(self.corrupt(format!(
                    "segment {id} is {:?} with {} rows, expected {state:?} with {rows}",
                    seg.state, seg.seen
                )));
            }
        }
        Ok((last, self.points, self.reused_rows))
    }
}
