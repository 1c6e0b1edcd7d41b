//! The redb file of one shard replica (`shard.redb`): schema and I/O.
//!
//! Tables (layout version 1, named by the `V1` envelope of the meta record):
//!
//! | table        | key              | value                                   |
//! |--------------|------------------|-----------------------------------------|
//! | `meta`       | `"shard"`        | [`ShardMeta`]: shard, dim, applied LSN, growing segment |
//! | `oplog`      | LSN              | [`crate::op::OpRecord`], the last `retain_ops` ops |
//! | `segments`   | segment id       | [`SegmentRecord`]: state, rows once sealed, seal LSN |
//! | `rows`       | (segment, row)   | [`RowRecord`]: point id and vector (immutable) |
//! | `payloads`   | (segment, row)   | JSON text of the row, if any (immutable) |
//! | `points`     | point id         | (segment, row) of its live row          |
//! | `tombstones` | (segment, row)   | point id the dead row held              |
//!
//! Invariants:
//! - one op = one write transaction committed with `Durability::Immediate`
//!   (fsync) before the caller is told it is applied: the op, its rows, the
//!   location and tombstone changes, any seal and the applied LSN move
//!   together or not at all;
//! - rows and payloads are keyed by location and never rewritten, so a
//!   reader that found a row in memory can always read its payload, even if
//!   the point was replaced since.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use edgevec_proto::SegmentState;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::error::EngineError;
use crate::op::ShardOp;
use crate::plan::{Location, Plan};

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const OPLOG: TableDefinition<u64, &[u8]> = TableDefinition::new("oplog");
const SEGMENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("segments");
const ROWS: TableDefinition<(u64, u32), &[u8]> = TableDefinition::new("rows");
const PAYLOADS: TableDefinition<(u64, u32), &str> = TableDefinition::new("payloads");
const POINTS: TableDefinition<u64, (u64, u32)> = TableDefinition::new("points");
const TOMBSTONES: TableDefinition<(u64, u32), u64> = TableDefinition::new("tombstones");

const META_KEY: &str = "shard";
const SHARD_CACHE_BYTES: usize = 32 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum ShardMeta {
    V1(ShardMetaV1),
}

/// The shard's own record.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ShardMetaV1 {
    pub shard: u32,
    pub dim: u32,
    pub applied_lsn: u64,
    /// Id of the growing segment (always the highest segment id).
    pub growing: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum SegmentRecord {
    V1(SegmentRecordV1),
}

/// A segment's record.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SegmentRecordV1 {
    pub state: SegmentState,
    /// Final row count once sealed; 0 while growing (count the rows).
    pub rows: u32,
    /// LSN of the op that sealed it; 0 while growing.
    pub sealed_lsn: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum RowRecord {
    V1 { id: u64, vector: Vec<f32> },
}

/// Everything needed to rebuild a shard's memory, minus segment rows (read
/// per segment, because indexed segments take them from their index file).
pub struct Loaded {
    pub meta: ShardMetaV1,
    pub segments: Vec<(u64, SegmentRecordV1)>,
    pub points: HashMap<u64, Location>,
    pub tombstones: Vec<Location>,
}

pub struct ShardStore {
    db: Database,
    path: PathBuf,
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_stdvec(v).expect("records are plain data")
}

impl ShardStore {
    /// Opens (creating if needed) the shard file at `path`.
    pub fn open(path: &Path, shard: u32, dim: u32) -> Result<(ShardStore, Loaded), EngineError> {
        // Vectors live in memory already; the page cache mostly serves
        // payload reads. redb's 1 GiB default per file would let hundreds of
        // shard files claim far more than the node has.
        let db = Database::builder().set_cache_size(SHARD_CACHE_BYTES).create(path)?;
        let store = ShardStore {
            db,
            path: path.to_owned(),
        };
        store.init(shard, dim)?;
        let loaded = store.load()?;
        if loaded.meta.shard != shard || loaded.meta.dim != dim {
            return Err(store.corrupt(format!(
                "file is for shard {} dim {}, expected shard {shard} dim {dim}",
                loaded.meta.shard, loaded.meta.dim
            )));
        }
        Ok((store, loaded))
    }

    fn corrupt(&self, message: impl ToString) -> EngineError {
        EngineError::corrupt(self.path.display().to_string(), message)
    }

    /// Creates every table and, on a new file, the first growing segment.
    fn init(&self, shard: u32, dim: u32) -> Result<(), EngineError> {
        let txn = self.db.begin_write()?;
        {
            let mut meta = txn.open_table(META)?;
            let fresh = meta.get(META_KEY)?.is_none();
            let mut segments = txn.open_table(SEGMENTS)?;
            txn.open_table(OPLOG)?;
            txn.open_table(ROWS)?;
            txn.open_table(PAYLOADS)?;
            txn.open_table(POINTS)?;
            txn.open_table(TOMBSTONES)?;
            if fresh {
                let m = ShardMetaV1 {
                    shard,
                    dim,
                    applied_lsn: 0,
                    growing: 1,
                };
                meta.insert(META_KEY, encode(&ShardMeta::V1(m)).as_slice())?;
                segments.insert(1, encode(&SegmentRecord::V1(growing_record())).as_slice())?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    fn load(&self) -> Result<Loaded, EngineError> {
        let txn = self.db.begin_read()?;
        let meta_t = txn.open_table(META)?;
        let raw = meta_t
            .get(META_KEY)?
            .ok_or_else(|| self.corrupt("missing shard record"))?;
        let ShardMeta::V1(meta) = postcard::from_bytes(raw.value()).map_err(|e| self.corrupt(e))?;

        let mut segments = Vec::new();
        for entry in txn.open_table(SEGMENTS)?.iter()? {
            let (k, v) = entry?;
            let SegmentRecord::V1(rec) = postcard::from_bytes(v.value()).map_err(|e| self.corrupt(e))?;
            segments.push((k.value(), rec));
        }
        let mut points = HashMap::new();
        for entry in txn.open_table(POINTS)?.iter()? {
            let (k, v) = entry?;
            let (segment, row) = v.value();
            points.insert(k.value(), Location { segment, row });
        }
        let mut tombstones = Vec::new();
        for entry in txn.open_table(TOMBSTONES)?.iter()? {
            let (segment, row) = entry?.0.value();
            tombstones.push(Location { segment, row });
        }
        Ok(Loaded {
            meta,
            segments,
            points,
            tombstones,
        })
    }

    /// The rows of `segment` in row order: ids and row-major vectors.
    pub fn segment_rows(&self, segment: u64, dim: usize) -> Result<(Vec<u64>, Vec<f32>), EngineError> {
        let txn = self.db.begin_read()?;
        let rows = txn.open_table(ROWS)?;
        let (mut ids, mut vectors) = (Vec::new(), Vec::new());
        for entry in rows.range((segment, 0)..=(segment, u32::MAX))? {
            let (k, v) = entry?;
            let RowRecord::V1 { id, vector } = postcard::from_bytes(v.value()).map_err(|e| self.corrupt(e))?;
            if k.value().1 as usize != ids.len() || vector.len() != dim {
                return Err(self.corrupt(format!("segment {segment} row {} is malformed", k.value().1)));
            }
            ids.push(id);
            vectors.extend_from_slice(&vector);
        }
        Ok((ids, vectors))
    }

    /// Writes op `lsn` and its effect in one durable transaction, trimming
    /// the op log to the last `retain_ops` ops.
    pub fn commit(
        &self,
        lsn: u64,
        op: &ShardOp,
        plan: &Plan,
        meta: ShardMetaV1,
        retain_ops: u64,
    ) -> Result<(), EngineError> {
        let mut txn = self.db.begin_write()?;
        // The caller acknowledges the write when this returns: fsync first.
        txn.set_durability(Durability::Immediate)
            .map_err(|e| EngineError::Storage(e.into()))?;
        {
            let mut oplog = txn.open_table(OPLOG)?;
            oplog.insert(lsn, op.encode().as_slice())?;
            if lsn > retain_ops {
                oplog.retain_in(..=(lsn - retain_ops), |_, _| false)?;
            }

            if let ShardOp::Upsert(points) = op {
                let mut rows = txn.open_table(ROWS)?;
                let mut payloads = txn.open_table(PAYLOADS)?;
                for a in &plan.appends {
                    let p = &points[a.point];
                    let key = (a.at.segment, a.at.row);
                    let rec = RowRecord::V1 {
                        id: p.id,
                        vector: p.vector.clone(),
                    };
                    rows.insert(key, encode(&rec).as_slice())?;
                    if let Some(payload) = &p.payload {
                        payloads.insert(key, payload.as_str())?;
                    }
                }
            }

            let mut tombstones = txn.open_table(TOMBSTONES)?;
            for (at, id) in &plan.tombstones {
                tombstones.insert((at.segment, at.row), *id)?;
            }
            let mut locations = txn.open_table(POINTS)?;
            for (id, at) in &plan.points {
                match at {
                    Some(at) => locations.insert(*id, (at.segment, at.row))?,
                    None => locations.remove(*id)?,
                };
            }

            let mut segments = txn.open_table(SEGMENTS)?;
            for sealed in &plan.sealed {
                let rec = SegmentRecordV1 {
                    state: SegmentState::Sealed,
                    rows: sealed.rows,
                    sealed_lsn: lsn,
                };
                segments.insert(sealed.segment, encode(&SegmentRecord::V1(rec)).as_slice())?;
            }
            if !plan.sealed.is_empty() {
                segments.insert(
                    plan.growing.segment,
                    encode(&SegmentRecord::V1(growing_record())).as_slice(),
                )?;
            }

            let meta = ShardMetaV1 {
                applied_lsn: lsn,
                growing: plan.growing.segment,
                ..meta
            };
            txn.open_table(META)?
                .insert(META_KEY, encode(&ShardMeta::V1(meta)).as_slice())?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Payloads of the rows at `locations`, in order, from one snapshot.
    pub fn payloads(&self, locations: &[Location]) -> Result<Vec<Option<String>>, EngineError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(PAYLOADS)?;
        locations
            .iter()
            .map(|at| Ok(table.get((at.segment, at.row))?.map(|v| v.value().to_owned())))
            .collect()
    }

    /// Up to `max` logged ops with LSN greater than `after`, in order.
    pub fn ops_after(&self, after: u64, max: usize) -> Result<Vec<(u64, ShardOp)>, EngineError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(OPLOG)?;
        let mut out = Vec::new();
        for entry in table.range((after.saturating_add(1))..)?.take(max) {
            let (k, v) = entry?;
            out.push((k.value(), ShardOp::decode(v.value())?));
        }
        Ok(out)
    }

    /// The oldest LSN still in the op log, if any.
    pub fn first_logged_lsn(&self) -> Result<Option<u64>, EngineError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(OPLOG)?;
        let first = table.first()?.map(|(k, _)| k.value());
        Ok(first)
    }
}

fn growing_record() -> SegmentRecordV1 {
    SegmentRecordV1 {
        state: SegmentState::Growing,
        rows: 0,
        sealed_lsn: 0,
    }
}
