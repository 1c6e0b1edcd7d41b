//! Whole-state reads and writes of a shard file, for exports and imports.
//!
//! [`ShardStore::read_applied`] hands over the applied state as ONE redb
//! read transaction sees it, so applies that commit meanwhile (redb's
//! readers see a fixed snapshot and never block the writer) cannot tear
//! it: the meta record, its term history and every row belong to the same
//! applied LSN. The op log is not read: an export carries state, not ops.
//!
//! [`StoreImport`] writes such a state into a new shard file: records are
//! buffered and committed in bounded batches without fsync (a staging file
//! is trusted only once complete), and the meta record with the term
//! history goes in last, in the one durable commit. Until then the file has
//! no meta record, so it cannot be mistaken for a complete shard.
//!
//! [`ShardStore::sealed_digests`] and [`ShardStore::sealed_segment`] name
//! the content of sealed segments by a [`SegmentDigest`]: an export to a
//! replica that holds a sealed segment with the same digest leaves its
//! rows out, and the import takes them from that replica's own file.

use std::path::{Path, PathBuf};

use edgevec_proto::SegmentState;
use redb::{Database, Durability, ReadTransaction, ReadableDatabase, ReadableTable, ReadableTableMetadata};
use sha2::{Digest, Sha256};

use super::rows::{self, RowReader, ROW_CHUNKS};
use super::{
    encode, MergeRecord, MergeRecordV1, SegmentRecord, SegmentRecordV1, ShardMeta, ShardMetaV2, ShardStore, MERGES,
    META, META_KEY, OPLOG, OPLOG_PARTS, OPLOG_SIZES, PAYLOADS, POINTS, RECLAIMED, RECLAIMS, ROWS, SEGMENTS,
    SHARD_CACHE_BYTES, TERMS, TOMBSTONES,
};
use crate::error::EngineError;
use crate::plan::Location;

/// One piece of a shard's applied state, in the order
/// [`ShardStore::read_applied`] visits them: the meta first, then each
/// table in key order.
#[derive(Debug, Clone, PartialEq)]
pub enum StateItem<'a> {
    /// The shard record as stored, the full term history (entries above
    /// the applied LSN included: the reader trims), the rows of the
    /// growing segment, and whether rows of sealed segments were reclaimed
    /// (rows missing from segments merges cover; what an importer is told
    /// by the rows themselves).
    Meta {
        meta: ShardMetaV2,
        history: Vec<(u64, u64)>,
        growing_rows: u32,
        sparse: bool,
    },
    Segment {
        id: u64,
        record: SegmentRecordV1,
    },
    Row {
        at: Location,
        id: u64,
        vector: Vec<f32>,
    },
    Payload {
        at: Location,
        json: &'a str,
    },
    Tombstone {
        at: Location,
        id: u64,
    },
    Point {
        id: u64,
        at: Location,
    },
    Merge {
        id: u64,
        record: MergeRecordV1,
    },
}

impl ShardStore {
    /// Visits the applied state read from one transaction (see the module
    /// doc). Writers go on meanwhile; the snapshot stays as it was.
    pub fn read_applied(
        &self,
        mut visit: impl FnMut(StateItem<'_>) -> Result<(), EngineError>,
    ) -> Result<(), EngineError> {
        let db = self.db();
        let txn = db.begin_read()?;
        let meta = self.read_meta(&txn)?;
        let mut history = Vec::new();
        for entry in txn.open_table(TERMS)?.iter()? {
            let (term, first) = entry?;
            history.push((term.value(), first.value()));
        }
        let rows = RowReader::new(txn.open_table(ROW_CHUNKS)?, &self.path, meta.dim as usize);
        let growing_rows = rows.count(meta.growing)?;
        let sparse = !txn.open_table(RECLAIMED)?.is_empty()?;
        visit(StateItem::Meta {
            meta,
            history,
            growing_rows,
            sparse,
        })?;

        for entry in txn.open_table(SEGMENTS)?.iter()? {
            let (k, v) = entry?;
            let record = self.decode_segment(v.value())?;
            visit(StateItem::Segment { id: k.value(), record })?;
        }
        rows.all(|at, id, vector| {
            visit(StateItem::Row {
                at,
                id,
                vector: vector.to_vec(),
            })
        })?;
        for entry in txn.open_table(PAYLOADS)?.iter()? {
            let (k, v) = entry?;
            let (segment, row) = k.value();
            visit(StateItem::Payload {
                at: Location { segment, row },
                json: v.value(),
            })?;
        }
        for entry in txn.open_table(TOMBSTONES)?.iter()? {
            let (k, v) = entry?;
            let (segment, row) = k.value();
            visit(StateItem::Tombstone {
                at: Location { segment, row },
                id: v.value(),
            })?;
        }
        for entry in txn.open_table(POINTS)?.iter()? {
            let (k, v) = entry?;
            let (segment, row) = v.value();
            visit(StateItem::Point {
                id: k.value(),
                at: Location { segment, row },
            })?;
        }
        for entry in txn.open_table(MERGES)?.iter()? {
            let (k, v) = entry?;
            visit(StateItem::Merge {
                id: k.value(),
                record: self.decode_merge(v.value())?,
            })?;
        }
        Ok(())
    }
}

/// The content of one sealed segment as a replica stores it: two replicas
/// whose digests of a segment are equal hold the same rows and payloads
/// in it (sealed rows never change).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SegmentDigest {
    pub segment: u64,
    pub rows: u32,
    pub sealed_lsn: u64,
    /// SHA-256 of a version tag, the segment's id, rows and sealing LSN,
    /// then each stored row (index, point id, vector) and each payload
    /// (row, JSON), in row order, all little-endian.
    pub sha256: [u8; 32],
}

impl From<edgevec_proto::replication::SegmentDigestV1> for SegmentDigest {
    fn from(d: edgevec_proto::replication::SegmentDigestV1) -> Self {
        SegmentDigest {
            segment: d.segment,
            rows: d.rows,
            sealed_lsn: d.sealed_lsn,
            sha256: d.sha256,
        }
    }
}

impl From<SegmentDigest> for edgevec_proto::replication::SegmentDigestV1 {
    fn from(d: SegmentDigest) -> Self {
        edgevec_proto::replication::SegmentDigestV1 {
            segment: d.segment,
            rows: d.rows,
            sealed_lsn: d.sealed_lsn,
            sha256: d.sha256,
        }
    }
}

/// Tag hashed first into every [`SegmentDigest`]: a change of what is
/// hashed changes it, so digests of two builds never match by accident.
const DIGEST_TAG: &[u8] = b"edgevec sealed segment digest v1";

impl ShardStore {
    /// Digests of the sealed segments whose ids `wanted` accepts, read from
    /// one transaction (each segment's rows are read and hashed once; the
    /// digest is kept for later calls).
    pub fn sealed_digests(&self, wanted: impl Fn(u64) -> bool) -> Result<Vec<SegmentDigest>, EngineError> {
        let reclaims = self.digests.lock().expect("digests lock").reclaims;
        let db = self.db();
        let txn = db.begin_read()?;
        let mut sealed = Vec::new();
        for entry in txn.open_table(SEGMENTS)?.iter()? {
            let (k, v) = entry?;
            let record = self.decode_segment(v.value())?;
            if record.state == SegmentState::Sealed && wanted(k.value()) {
                sealed.push((k.value(), record));
            }
        }
        let dim = self.read_meta(&txn)?.dim as usize;
        let mut out = Vec::with_capacity(sealed.len());
        for (id, record) in sealed {
            let known = self.digests.lock().expect("digests lock").by_segment.get(&id).copied();
            let digest = match known {
                Some(d) if (d.rows, d.sealed_lsn) == (record.rows, record.sealed_lsn) => d,
                _ => {
                    let d = self.segment_content(&txn, dim, id, &record, &mut |_| Ok(()))?;
                    let mut digests = self.digests.lock().expect("digests lock");
                    // Not kept if a reclaim committed since the snapshot.
                    if digests.reclaims == reclaims {
                        digests.by_segment.insert(id, d);
                    }
                    d
                }
            };
            out.push(digest);
        }
        Ok(out)
    }

    /// Hands the stored rows of the sealed `segment`, then its payloads,
    /// to `visit` as state items, and returns the segment's digest of what
    /// it read (never one kept from before); `None` when the file holds no
    /// sealed segment of that id. One transaction.
    pub fn sealed_segment(
        &self,
        segment: u64,
        mut visit: impl FnMut(StateItem<'_>) -> Result<(), EngineError>,
    ) -> Result<Option<SegmentDigest>, EngineError> {
        let db = self.db();
        let txn = db.begin_read()?;
        let record = match txn.open_table(SEGMENTS)?.get(segment)? {
            Some(v) => self.decode_segment(v.value())?,
            None => return Ok(None),
        };
        if record.state != SegmentState::Sealed {
            return Ok(None);
        }
        let dim = self.read_meta(&txn)?.dim as usize;
        self.segment_content(&txn, dim, segment, &record, &mut visit).map(Some)
    }

    fn segment_content(
        &self,
        txn: &ReadTransaction,
        dim: usize,
        segment: u64,
        record: &SegmentRecordV1,
        visit: &mut dyn FnMut(StateItem<'_>) -> Result<(), EngineError>,
    ) -> Result<SegmentDigest, EngineError> {
        let mut h = Sha256::new();
        h.update(DIGEST_TAG);
        h.update(segment.to_le_bytes());
        h.update(record.rows.to_le_bytes());
        h.update(record.sealed_lsn.to_le_bytes());
        let mut bytes = Vec::with_capacity(dim * 4);
        let rows = RowReader::new(txn.open_table(ROW_CHUNKS)?, &self.path, dim);
        rows.segment(segment, |row, id, vector| {
            bytes.clear();
            bytes.extend(vector.iter().flat_map(|x| x.to_le_bytes()));
            h.update(row.to_le_bytes());
            h.update(id.to_le_bytes());
            h.update(&bytes);
            visit(StateItem::Row {
                at: Location { segment, row },
                id,
                vector: vector.to_vec(),
            })
        })?;
        for entry in txn.open_table(PAYLOADS)?.range((segment, 0)..=(segment, u32::MAX))? {
            let (k, v) = entry?;
            let (_, row) = k.value();
            let json = v.value();
            h.update(row.to_le_bytes());
            h.update((json.len() as u64).to_le_bytes());
            h.update(json.as_bytes());
            visit(StateItem::Payload {
                at: Location { segment, row },
                json,
            })?;
        }
        Ok(SegmentDigest {
            segment,
            rows: record.rows,
            sealed_lsn: record.sealed_lsn,
            sha256: h.finalize().into(),
        })
    }
}

/// Bytes of buffered records after which [`StoreImport`] commits a batch.
const BATCH_BYTES: usize = 32 * 1024 * 1024;

/// Records waiting for the next batch commit, one list per table.
#[derive(Default)]
struct Batch {
    segments: Vec<(u64, Vec<u8>)>,
    rows: Vec<(Location, u64, Vec<f32>)>,
    payloads: Vec<((u64, u32), String)>,
    tombstones: Vec<((u64, u32), u64)>,
    points: Vec<(u64, (u64, u32))>,
    merges: Vec<(u64, Vec<u8>)>,
    bytes: usize,
}

/// Writes a whole applied state into a new shard file (see the module
/// doc). Nothing is durable, and the file holds no meta record, until
/// [`StoreImport::finish`].
pub struct StoreImport {
    db: Database,
    path: PathBuf,
    batch: Batch,
    /// [`BATCH_BYTES`]; tests lower it to exercise many batches.
    batch_bytes: usize,
    meta: Option<(ShardMetaV2, Vec<(u64, u64)>)>,
    /// Sealed segments: rows their records say, rows imported.
    sealed: std::collections::BTreeMap<u64, (u32, u32)>,
    /// Installed merges: their dropped rows may still be in the file.
    installed: Vec<u64>,
}

impl StoreImport {
    /// Creates the file at `path`, which must not exist yet.
    pub fn create(path: &Path) -> Result<StoreImport, EngineError> {
        if path.exists() {
            return Err(EngineError::corrupt(
                path.display().to_string(),
                "an import found a file where it was to create a new one",
            ));
        }
        let db = Database::builder().set_cache_size(SHARD_CACHE_BYTES).create(path)?;
        Ok(StoreImport {
            db,
            path: path.to_owned(),
            batch: Batch::default(),
            batch_bytes: BATCH_BYTES,
            meta: None,
            sealed: Default::default(),
            installed: Vec::new(),
        })
    }

    /// Takes the next item. The meta record is kept for
    /// [`StoreImport::finish`]; everything else is buffered and written in
    /// batches.
    pub fn push(&mut self, item: StateItem<'_>) -> Result<(), EngineError> {
        let b = &mut self.batch;
        match item {
            StateItem::Meta { meta, history, .. } => self.meta = Some((meta, history)),
            StateItem::Segment { id, record } => {
                if record.state == SegmentState::Sealed {
                    self.sealed.insert(id, (record.rows, 0));
                }
                b.bytes += 32;
                b.segments.push((id, encode(&SegmentRecord::V1(record))));
            }
            StateItem::Row { at, id, vector } => {
                if let Some((_, n)) = self.sealed.get_mut(&at.segment) {
                    *n += 1;
                }
                b.bytes += vector.len() * 4 + 24;
                b.rows.push((at, id, vector));
            }
            StateItem::Payload { at, json } => {
                b.bytes += json.len() + 16;
                b.payloads.push(((at.segment, at.row), json.to_owned()));
            }
            StateItem::Tombstone { at, id } => {
                b.bytes += 24;
                b.tombstones.push(((at.segment, at.row), id));
            }
            StateItem::Point { id, at } => {
                b.bytes += 24;
                b.points.push((id, (at.segment, at.row)));
            }
            StateItem::Merge { id, record } => {
                if record.installed {
                    self.installed.push(id);
                }
                let bytes = encode(&MergeRecord::V1(record));
                b.bytes += bytes.len() + 8;
                b.merges.push((id, bytes));
            }
        }
        if self.batch.bytes >= self.batch_bytes {
            self.commit(false)?;
        }
        Ok(())
    }

    /// Writes what is buffered and the meta record with the term history
    /// in one fsynced commit, then closes the file.
    pub fn finish(mut self) -> Result<(), EngineError> {
        if self.meta.is_none() {
            return Err(EngineError::corrupt(
                self.path.display().to_string(),
                "an import ended without its shard record",
            ));
        }
        self.commit(true)
    }

    /// Commits the buffered records; `last` adds the meta record and term
    /// history and makes the commit durable.
    fn commit(&mut self, last: bool) -> Result<(), EngineError> {
        let b = std::mem::take(&mut self.batch);
        let mut txn = self.db.begin_write()?;
        let durability = if last { Durability::Immediate } else { Durability::None };
        txn.set_durability(durability)
            .map_err(|e| EngineError::Storage(e.into()))?;
        {
            // Every table exists even if empty, as a new shard file has them.
            let mut meta = txn.open_table(META)?;
            txn.open_table(OPLOG)?;
            txn.open_table(OPLOG_PARTS)?;
            txn.open_table(OPLOG_SIZES)?;
            let mut terms = txn.open_table(TERMS)?;
            let mut segments = txn.open_table(SEGMENTS)?;
            txn.open_table(ROWS)?;
            let mut chunks = txn.open_table(ROW_CHUNKS)?;
            let mut payloads = txn.open_table(PAYLOADS)?;
            let mut tombstones = txn.open_table(TOMBSTONES)?;
            let mut points = txn.open_table(POINTS)?;
            let mut merges = txn.open_table(MERGES)?;
            for (id, bytes) in &b.merges {
                merges.insert(*id, bytes.as_slice())?;
            }
            for (id, bytes) in &b.segments {
                segments.insert(*id, bytes.as_slice())?;
            }
            if let Some((_, _, first)) = b.rows.first() {
                // Rows of covered segments may have been reclaimed.
                let put = b.rows.iter().map(|(at, id, v)| (*at, *id, v.as_slice()));
                rows::put(&mut chunks, &self.path, first.len(), put)?;
            }
            for (key, json) in &b.payloads {
                payloads.insert(*key, json.as_str())?;
            }
            for (key, id) in &b.tombstones {
                tombstones.insert(*key, *id)?;
            }
            for (id, at) in &b.points {
                points.insert(*id, *at)?;
            }
            if let (true, Some((m, history))) = (last, &self.meta) {
                for &(term, first) in history {
                    terms.insert(term, first)?;
                }
                let mut reclaimed = txn.open_table(RECLAIMED)?;
                for (segment, &(rows, imported)) in &self.sealed {
                    if imported < rows {
                        reclaimed.insert(*segment, u64::from(rows - imported))?;
                    }
                }
                // What the exporter had not reclaimed yet.
                let mut reclaims = txn.open_table(RECLAIMS)?;
                for id in &self.installed {
                    reclaims.insert(*id, ())?;
                }
                meta.insert(META_KEY, encode(&ShardMeta::V4(*m)).as_slice())?;
            }
        }
        txn.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use edgevec_proto::{Metric, OpId, Point};

    use crate::builder::IndexBuilder;
    use crate::op::ShardOp;
    use crate::shard::{ShardConfig, ShardReplica};
    use crate::store::ShardStore;
    use edgevec_proto::IndexSpec;

    use super::*;

    fn items(store: &ShardStore) -> Vec<String> {
        let mut out = Vec::new();
        store
            .read_applied(|item| {
                out.push(format!("{item:?}"));
                Ok(())
            })
            .unwrap();
        out
    }

    #[test]
    fn a_state_written_in_many_batches_reads_back_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let config = ShardConfig {
            shard: 0,
            dim: 2,
            metric: Metric::L2,
            seal_rows: 64,
            index: IndexSpec {
                m: 4,
                ef_construction: 8,
            },
            retain_bytes: 0,
            retain_percent: None,
            hold_bytes: 0,
            fields: Vec::new(),
        };
        let builder = Arc::new(IndexBuilder::start());
        let source = ShardReplica::open(&dir.path().join("a"), config, builder.clone()).unwrap();
        for lsn in 1..=5u64 {
            let points = (0..40)
                .map(|i| Point {
                    id: (lsn * 17 + i) % 100,
                    vector: vec![lsn as f32, i as f32],
                    payload: (i % 3 == 0).then(|| format!("{{\"lsn\":{lsn}}}")),
                })
                .collect();
            crate::testutil::write(&source, ShardOp::Upsert(points)).unwrap();
        }
        crate::testutil::write(&source, ShardOp::Delete(vec![1, 2, 3])).unwrap();
        // Builds hold the replica while they run.
        assert!(builder.wait_idle(std::time::Duration::from_secs(30)));
        drop(source);
        let (store, _) = ShardStore::open(&dir.path().join("a/shard.redb"), 0, 2, |_| u64::MAX).unwrap();
        let want = items(&store);

        let path = dir.path().join("b.redb");
        let mut import = StoreImport::create(&path).unwrap();
        import.batch_bytes = 64;
        store.read_applied(|item| import.push(item)).unwrap();
        import.finish().unwrap();
        let (copy, loaded) = ShardStore::open(&path, 0, 2, |_| u64::MAX).unwrap();
        assert_eq!(items(&copy), want);
        assert_eq!((loaded.meta.last(), loaded.first_logged), (OpId::new(1, 6), None));
        assert!(StoreImport::create(&path).is_err(), "never over an existing file");
    }
}
