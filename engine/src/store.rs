//! The redb file of one shard replica (`shard.redb`): schema and I/O.
//!
//! Tables (named by the `V4` envelope of the meta record):
//!
//! | table        | key              | value                                   |
//! |--------------|------------------|-----------------------------------------|
//! | `meta`       | `"shard"`        | [`ShardMeta`]: shard, dim, applied LSN, growing segment, term, last op id, log bytes |
//! | `oplog_parts`| (LSN, part)      | [`crate::op::OpRecord`]: term and op, in parts that fill redb's pages of 256, 128 or 64 KiB (module `log_parts`) |
//! | `oplog`      | LSN              | the whole record, in files of meta record `V2`; moved into parts at open |
//! | `oplog_sizes`| LSN              | encoded bytes of that op's record       |
//! | `terms`      | term             | first LSN of that term (term history)   |
//! | `segments`   | segment id       | [`SegmentRecord`]: state, rows once sealed, seal LSN |
//! | `row_chunks` | (segment, chunk) | point ids and vectors of consecutive rows (module `rows`) |
//! | `rows`       | (segment, row)   | [`RowRecord`]: one row, in files written before chunks; moved into chunks at open |
//! | `payloads`   | (segment, row)   | JSON text of the row, if any (immutable) |
//! | `points`     | point id         | (segment, row) of its live row          |
//! | `tombstones` | (segment, row)   | point id the dead row held              |
//! | `merges`     | segment id       | [`MergeRecordV1`]: a merged segment: sources, rows (where stored, point id), installed |
//! | `reclaims`   | merge id         | (): an installed merge whose dropped rows may still be in the file |
//! | `reclaimed`  | segment id       | rows of that sealed segment reclaimed so far |
//!
//! Invariants:
//! - every change is one write transaction: appended ops with the term
//!   and history they raise, and a truncation with its history cut, are
//!   committed with `Durability::Immediate` (fsync) before the caller goes
//!   on; a batch of applied ops with their rows, location and tombstone
//!   changes, the applied LSN and the retention trim is committed without
//!   fsync unless it seals a segment (it becomes durable with the next
//!   fsynced commit, and a crash before that takes it back whole, leaving
//!   its ops in the log above the applied LSN);
//! - each transaction updates the meta record read inside it, so the
//!   record is right whatever the caller holds in memory;
//! - `log bytes` is the sum of the encoded sizes of the records in the log;
//! - `oplog_sizes` has exactly the LSNs of the log, so retention, the
//!   oldest LSN and truncation sizes are decided without reading a record
//!   (a record can be larger than the page cache). A file written before
//!   the table existed gets it rebuilt at open;
//! - the log is contiguous, every entry above the applied LSN is in it, and
//!   only a truncation removes entries above the applied LSN;
//! - rows and payloads are keyed by location and never rewritten, so a
//!   reader that found a row in memory can read its payload, even if the
//!   point was replaced since, until the row is reclaimed (below; the
//!   replica makes a reclaim wait for the searches before it). A merge does
//!   not move rows: a merged segment is an index over rows that stay where
//!   they were written;
//! - a `merges` record is written by the apply of its merge op, marked
//!   installed (durably) once its index file is saved, and removed only
//!   when a later merge that covers it is installed;
//! - **reclaiming**: the transaction that installs a merge queues it in
//!   `reclaims`; [`ShardStore::reclaim`] then removes the rows of the
//!   segments it covers that are not among its rows (deleted or replaced
//!   before its op), with their payloads and tombstones, a transaction per
//!   segment, and takes it off the queue in a last, durable one. Nothing
//!   serves those rows any more, and every later merge takes its rows from
//!   this one's, so nothing ever reads them again; a segment that serves
//!   its own rows is never touched. redb reuses the pages they free, and
//!   [`ShardStore::compact_if_sparse`] gives them back. `reclaimed`
//!   counts, per segment, what is gone: a reclaim done again skips it, and
//!   an export knows it has gaps to declare.
//!
//! Whole-state reads and writes for exports and imports are in `bulk`.

use std::path::{Path, PathBuf};

use edgevec_proto::{OpId, SegmentState};
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, Table, TableDefinition,
    WriteTransaction,
};
use serde::{Deserialize, Serialize};

use crate::error::EngineError;
use crate::idmap::IdMap;
use crate::op::ShardOp;
use crate::oplog::{self, Appended};
use crate::plan::{Location, Plan};

mod bulk;
mod log_parts;
mod rows;

use log_parts::OPLOG_PARTS;

use rows::{RowReader, ROW_CHUNKS};

pub use bulk::{SegmentDigest, StateItem, StoreImport};

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const OPLOG: TableDefinition<u64, &[u8]> = TableDefinition::new("oplog");
const OPLOG_SIZES: TableDefinition<u64, u64> = TableDefinition::new("oplog_sizes");
const TERMS: TableDefinition<u64, u64> = TableDefinition::new("terms");
const SEGMENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("segments");
const ROWS: TableDefinition<(u64, u32), &[u8]> = TableDefinition::new("rows");
const PAYLOADS: TableDefinition<(u64, u32), &str> = TableDefinition::new("payloads");
const POINTS: TableDefinition<u64, (u64, u32)> = TableDefinition::new("points");
const TOMBSTONES: TableDefinition<(u64, u32), u64> = TableDefinition::new("tombstones");
const MERGES: TableDefinition<u64, &[u8]> = TableDefinition::new("merges");
/// Installed merges whose sources may still hold rows the merge dropped
/// (see [`ShardStore::reclaim`]).
const RECLAIMS: TableDefinition<u64, ()> = TableDefinition::new("reclaims");
/// Sealed segment → rows of it reclaimed so far. Empty while every sealed
/// segment holds all of its rows.
const RECLAIMED: TableDefinition<u64, u64> = TableDefinition::new("reclaimed");

const META_KEY: &str = "shard";
/// redb's page cache per shard file. Vectors are served from memory, so it
/// mostly holds the B-tree's upper pages for payload reads and the op
/// log's tail (the OS page cache keeps the file's hot pages too); at
/// 32 MiB it was a tenth of a node's memory in `bench --mode footprint`,
/// and a settled node filled 8 MiB (heaptrack), so each shard replica a
/// node holds costs what this says. 2 MiB changed no insert time there.
const SHARD_CACHE_BYTES: usize = 2 * 1024 * 1024;
/// Free bytes below which a shard file is never compacted while it takes
/// writes (see [`ShardStore::compact_if_sparse`]).
const COMPACT_MIN_BYTES: u64 = 64 * 1024 * 1024;
/// Free bytes below which a shard file is never compacted when it is
/// quiet or opening.
const COMPACT_QUIET_MIN_BYTES: u64 = 4 * 1024 * 1024;
/// How long a compaction waits for a moment without transactions.
const COMPACT_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum ShardMeta {
    /// Layout 1 (single node); recognised only to refuse it.
    V1(ShardMetaV1),
    /// The op log's records whole, in table `oplog`: moved into parts at
    /// open.
    V2(ShardMetaV2),
    /// The op log's records in parts, in table `oplog_parts`. Versions
    /// that know only `V2` refuse such a file instead of misreading its log.
    V3(ShardMetaV2),
    /// As `V3`, and rows a merge dropped may have been reclaimed: chunks of
    /// tag 2 in `row_chunks`, tables `reclaims` and `reclaimed`. Versions
    /// that know only `V3` refuse such a file instead of misreading a
    /// chunk. A `V3` file becomes `V4` at its first open, with every
    /// installed merge queued for reclaiming.
    V4(ShardMetaV2),
}

/// Index of the newest [`ShardMeta`] variant; a record of a higher one is
/// refused as written by a newer version.
const SHARD_META_LATEST: u8 = 3;

/// How a file's shard record says it is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Layout {
    /// `V2`: whole op log records, moved into parts at open.
    WholeLog,
    /// `V3`: nothing reclaimed, nor queued for it.
    Parts,
    /// `V4`.
    Reclaiming,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
struct ShardMetaV1 {
    shard: u32,
    dim: u32,
    applied_lsn: u64,
    growing: u64,
}

/// The shard's own record. The last op id is stored as two numbers, not as
/// the wire's `OpId`, so a change of that type cannot change the file.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ShardMetaV2 {
    pub shard: u32,
    pub dim: u32,
    pub applied_lsn: u64,
    /// Id of the growing segment (always the highest segment id).
    pub growing: u64,
    /// Highest term accepted.
    pub term: u64,
    pub last_term: u64,
    pub last_lsn: u64,
    /// Encoded bytes of every record in the op log.
    pub log_bytes: u64,
}

impl ShardMetaV2 {
    pub fn last(&self) -> OpId {
        OpId::new(self.last_term, self.last_lsn)
    }
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
enum MergeRecord {
    V1(MergeRecordV1),
}

/// A merged segment's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MergeRecordV1 {
    /// The segments the merge op named.
    pub sources: Vec<u64>,
    /// The segments holding rows of their own that it takes over.
    pub covers: Vec<u64>,
    /// LSN of the merge op.
    pub lsn: u64,
    /// Its rows in order: where stored, and the point id.
    pub rows: Vec<(Location, u64)>,
    /// Its index file was saved and it replaced its sources (on this
    /// replica; the rest of the record is the same on every replica).
    pub installed: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum RowRecord {
    V1 { id: u64, vector: Vec<f32> },
}

/// Everything needed to rebuild a shard's memory, minus segment rows (read
/// per segment, because indexed segments take them from their index file).
pub struct Loaded {
    pub meta: ShardMetaV2,
    pub history: Vec<(u64, u64)>,
    pub first_logged: Option<u64>,
    pub segments: Vec<(u64, SegmentRecordV1)>,
    pub points: IdMap,
    pub tombstones: Vec<Location>,
    pub merges: Vec<(u64, MergeRecordV1)>,
}

/// One op of an apply batch with its plan.
pub struct Applied<'a> {
    pub lsn: u64,
    pub op: &'a ShardOp,
    pub plan: &'a Plan,
}

/// What retention may do after an apply: see [`oplog::retention_cut`].
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    pub budget: u64,
    pub keep_above: u64,
    pub held: oplog::Held,
}

pub struct ShardStore {
    /// Read-locked by every transaction for as long as it lives;
    /// write-locked by a compaction, which needs the file to itself
    /// ([`ShardStore::compact_if_sparse`]).
    db: std::sync::RwLock<Database>,
    /// [`COMPACT_MIN_BYTES`]; tests lower it.
    compact_min: std::sync::atomic::AtomicU64,
    path: PathBuf,
    shard: u32,
    /// Digests of sealed segments computed so far (segment ids are never
    /// reused, and a sealed segment's rows and payloads change only when
    /// [`ShardStore::reclaim`] removes some).
    digests: std::sync::Mutex<Digests>,
}

/// Rows a merge holds of one segment it covers: the segment, and runs
/// `(first row, rows)` ascending.
pub type KeptRows = (u64, Vec<(u32, u32)>);

/// Kept digests of sealed segments.
#[derive(Default)]
struct Digests {
    by_segment: std::collections::HashMap<u64, SegmentDigest>,
    /// Reclaims committed so far: a digest read before one of them is not
    /// kept (it may describe rows since removed).
    reclaims: u64,
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_stdvec(v).expect("records are plain data")
}

impl ShardStore {
    /// Opens (creating if needed) the shard file at `path`. Before anything
    /// else reads it: rows of the one-record-per-row layout are moved into
    /// chunks, the op log is trimmed to `retain(live points)` bytes (a
    /// budget lowered since the last open takes effect at once), and if
    /// either freed pages, a file that is mostly free pages is compacted
    /// (see [`ShardStore::compact_if_sparse`]).
    pub fn open(
        path: &Path,
        shard: u32,
        dim: u32,
        retain: impl Fn(u64) -> u64,
    ) -> Result<(ShardStore, Loaded), EngineError> {
        // Vectors live in memory already; the page cache mostly serves
        // payload reads. redb's 1 GiB default per file would let hundreds of
        // shard files claim far more than the node has.
        let db = Database::builder().set_cache_size(SHARD_CACHE_BYTES).create(path)?;
        let store = ShardStore {
            db: std::sync::RwLock::new(db),
            compact_min: std::sync::atomic::AtomicU64::new(COMPACT_MIN_BYTES),
            path: path.to_owned(),
            shard,
            digests: Default::default(),
        };
        // A record this build cannot read stops the open before any write.
        let layout = store.check_meta()?;
        let whole_log = layout == Some(Layout::WholeLog);
        store.init(dim)?;
        if layout.is_some_and(|l| l < Layout::Reclaiming) {
            // Rows dropped by merges before this build never left the file.
            let queued = store.write(|txn, _| {
                let mut reclaims = txn.open_table(RECLAIMS)?;
                let mut n = 0;
                for entry in txn.open_table(MERGES)?.iter()? {
                    let (k, v) = entry?;
                    if decode_merge_at(path, v.value())?.installed {
                        reclaims.insert(k.value(), ())?;
                        n += 1;
                    }
                }
                Ok(n)
            })?;
            tracing::info!(path = %path.display(), merges = queued, "shard file moved to layout 4");
        }
        let moved = rows::migrate(&store.db(), path, dim as usize)?;
        if moved > 0 {
            tracing::info!(path = %path.display(), rows = moved, "rows moved into chunks");
        }
        // One durable transaction; it writes the record back as `V3`.
        let parted = if whole_log {
            store.write(|txn, _| log_parts::migrate(txn))?
        } else {
            0
        };
        if parted > 0 {
            tracing::info!(path = %path.display(), ops = parted, "op log records moved into parts");
        }
        // Not fsynced: a crash takes the trim back and the next open redoes it.
        let trimmed = store.write_as(Durability::None, |txn, meta| {
            let points = txn.open_table(POINTS)?.len()?;
            let retention = Retention {
                budget: retain(points),
                keep_above: meta.applied_lsn,
                held: oplog::Held::NONE,
            };
            let mut log = LogTables::open(txn, path)?;
            log.ensure_sizes()?;
            log.trim(meta, retention)
        })?;
        // Measuring the free pages walks the whole file: only when this
        // open freed some.
        if moved > 0 || parted > 0 || trimmed > 0 {
            store.compact_if_sparse(true)?;
        }
        let loaded = store.load()?;
        if loaded.meta.shard != shard || loaded.meta.dim != dim {
            return Err(store.corrupt(format!(
                "file is for shard {} dim {}, expected shard {shard} dim {dim}",
                loaded.meta.shard, loaded.meta.dim
            )));
        }
        Ok((store, loaded))
    }

    /// Lowers the free bytes a compaction waits for (tests).
    #[cfg(test)]
    pub(crate) fn set_compact_min(&self, bytes: u64) {
        self.compact_min.store(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    /// The database, to begin a transaction in (a compaction holds it for
    /// itself meanwhile).
    fn db(&self) -> std::sync::RwLockReadGuard<'_, Database> {
        self.db.read().expect("shard file lock")
    }

    /// Compacts the file when enough of it is free pages (left by a
    /// trimmed op log, by rows moved into chunks, or by rows reclaimed):
    /// redb reuses free pages but never gives them back. While the shard
    /// takes writes, at least [`COMPACT_MIN_BYTES`] and more than half of
    /// the file; when it is `quiet` (or opening), at least
    /// [`COMPACT_QUIET_MIN_BYTES`] and a ninth of it (so a quiet shard's
    /// file ends within 1.125 times what it holds). Every transaction waits
    /// while it
    /// runs (0.03-0.4 s for a few hundred MB), and it waits for a moment
    /// without any (at most [`COMPACT_WAIT`]; an export holds one for its
    /// whole read), or leaves it for the next time. Returns whether it
    /// compacted.
    pub fn compact_if_sparse(&self, quiet: bool) -> Result<bool, EngineError> {
        let len = std::fs::metadata(&self.path)
            .map_err(|e| EngineError::io(&self.path, e))?
            .len();
        let used = {
            let db = self.db();
            let txn = db.begin_write()?;
            let stats = txn.stats()?;
            txn.abort()?;
            stats.allocated_pages() * stats.page_size() as u64
        };
        let free = len.saturating_sub(used);
        let (min, share) = if quiet {
            (COMPACT_QUIET_MIN_BYTES, used / 8)
        } else {
            (COMPACT_MIN_BYTES, used)
        };
        let min = min.min(self.compact_min.load(std::sync::atomic::Ordering::Relaxed));
        if free < min || free < share {
            return Ok(false);
        }
        let started = std::time::Instant::now();
        {
            // Every transaction holds the lock for reading while it lives:
            // the compaction waits for a moment with none, without making
            // new ones wait behind it until then.
            let mut db = loop {
                match self.db.try_write() {
                    Ok(db) => break db,
                    Err(std::sync::TryLockError::WouldBlock) if started.elapsed() < COMPACT_WAIT => {
                        std::thread::sleep(std::time::Duration::from_millis(2));
                    }
                    Err(std::sync::TryLockError::WouldBlock) => {
                        tracing::info!(path = %self.path.display(), "shard file not compacted: transactions kept it busy");
                        return Ok(false);
                    }
                    Err(std::sync::TryLockError::Poisoned(e)) => panic!("shard file lock: {e}"),
                }
            };
            let waited = started.elapsed();
            while db.compact().map_err(|e| EngineError::Storage(e.into()))? {}
            tracing::debug!(waited = waited.as_secs_f64(), "shard file lock taken for compacting");
        }
        let after = std::fs::metadata(&self.path)
            .map_err(|e| EngineError::io(&self.path, e))?
            .len();
        tracing::info!(
            path = %self.path.display(),
            before = len,
            after,
            secs = started.elapsed().as_secs_f64(),
            "shard file compacted"
        );
        Ok(true)
    }

    fn corrupt(&self, message: impl ToString) -> EngineError {
        EngineError::corrupt(self.path.display().to_string(), message)
    }

    /// Decodes the shard record, if the file has one yet, and refuses a
    /// file this build cannot read. Returns its layout (`None`: a new file).
    fn check_meta(&self) -> Result<Option<Layout>, EngineError> {
        let db = self.db();
        let txn = db.begin_read()?;
        let meta = match txn.open_table(META) {
            Ok(meta) => meta,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        match meta.get(META_KEY)? {
            Some(raw) => Ok(Some(self.decode_meta_layout(raw.value())?.1)),
            None => Ok(None),
        }
    }

    /// Creates every table and, on a new file, the first growing segment.
    fn init(&self, dim: u32) -> Result<(), EngineError> {
        let db = self.db();
        let txn = db.begin_write()?;
        {
            let mut meta = txn.open_table(META)?;
            let fresh = meta.get(META_KEY)?.is_none();
            let mut segments = txn.open_table(SEGMENTS)?;
            txn.open_table(OPLOG)?;
            txn.open_table(OPLOG_PARTS)?;
            txn.open_table(OPLOG_SIZES)?;
            txn.open_table(TERMS)?;
            txn.open_table(ROWS)?;
            txn.open_table(ROW_CHUNKS)?;
            txn.open_table(PAYLOADS)?;
            txn.open_table(POINTS)?;
            txn.open_table(TOMBSTONES)?;
            txn.open_table(MERGES)?;
            txn.open_table(RECLAIMS)?;
            txn.open_table(RECLAIMED)?;
            if fresh {
                let m = ShardMetaV2 {
                    shard: self.shard,
                    dim,
                    applied_lsn: 0,
                    growing: 1,
                    term: 0,
                    last_term: 0,
                    last_lsn: 0,
                    log_bytes: 0,
                };
                meta.insert(META_KEY, encode(&ShardMeta::V4(m)).as_slice())?;
                segments.insert(1, encode(&SegmentRecord::V1(growing_record())).as_slice())?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    fn decode_meta(&self, bytes: &[u8]) -> Result<ShardMetaV2, EngineError> {
        Ok(self.decode_meta_layout(bytes)?.0)
    }

    /// The shard record and the layout it names.
    fn decode_meta_layout(&self, bytes: &[u8]) -> Result<(ShardMetaV2, Layout), EngineError> {
        // postcard writes the variant's index first, as a varint: one byte
        // for any index under 128.
        if let Some(&variant) = bytes.first().filter(|&&v| v > SHARD_META_LATEST && v < 128) {
            return Err(EngineError::Layout {
                path: self.path.clone(),
                message: format!(
                    "this shard file was written by a newer edgevec (shard record variant {variant}, this \
                     build reads up to {SHARD_META_LATEST}); nothing was changed. Run that version or a newer one"
                ),
            });
        }
        match postcard::from_bytes(bytes).map_err(|e| self.corrupt(e))? {
            ShardMeta::V2(m) => Ok((m, Layout::WholeLog)),
            ShardMeta::V3(m) => Ok((m, Layout::Parts)),
            ShardMeta::V4(m) => Ok((m, Layout::Reclaiming)),
            ShardMeta::V1(_) => Err(EngineError::Layout {
                path: self.path.clone(),
                message: "this shard file was written by the single-node format (layout 1), which is not \
                          migrated automatically; nothing was changed. Move the shard's directory away and \
                          let the replica be copied again from another node"
                    .into(),
            }),
        }
    }

    /// The shard record as `txn` sees it.
    fn read_meta(&self, txn: &redb::ReadTransaction) -> Result<ShardMetaV2, EngineError> {
        let raw = txn
            .open_table(META)?
            .get(META_KEY)?
            .ok_or_else(|| self.corrupt("missing shard record"))?;
        self.decode_meta(raw.value())
    }

    fn load(&self) -> Result<Loaded, EngineError> {
        let db = self.db();
        let txn = db.begin_read()?;
        let meta = self.read_meta(&txn)?;

        let mut history = Vec::new();
        for entry in txn.open_table(TERMS)?.iter()? {
            let (term, first) = entry?;
            history.push((term.value(), first.value()));
        }
        if !history.windows(2).all(|w| w[0].1 < w[1].1) {
            return Err(self.corrupt(format!("term history is not ascending: {history:?}")));
        }
        let first_logged = txn.open_table(OPLOG_SIZES)?.first()?.map(|(k, _)| k.value());
        let mut segments = Vec::new();
        for entry in txn.open_table(SEGMENTS)?.iter()? {
            let (k, v) = entry?;
            let rec = self.decode_segment(v.value())?;
            segments.push((k.value(), rec));
        }
        let mut points = IdMap::default();
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
        let mut merges = Vec::new();
        for entry in txn.open_table(MERGES)?.iter()? {
            let (k, v) = entry?;
            merges.push((k.value(), self.decode_merge(v.value())?));
        }
        Ok(Loaded {
            meta,
            history,
            first_logged,
            segments,
            points,
            tombstones,
            merges,
        })
    }

    fn decode_segment(&self, bytes: &[u8]) -> Result<SegmentRecordV1, EngineError> {
        let SegmentRecord::V1(rec) = postcard::from_bytes(bytes).map_err(|e| self.corrupt(e))?;
        Ok(rec)
    }

    fn decode_merge(&self, bytes: &[u8]) -> Result<MergeRecordV1, EngineError> {
        decode_merge_at(&self.path, bytes)
    }

    /// The vectors stored at `rows`, in order, row-major.
    pub fn vectors_at(&self, rows: &[Location], dim: usize) -> Result<Vec<f32>, EngineError> {
        let db = self.db();
        let txn = db.begin_read()?;
        let mut reader = RowReader::new(txn.open_table(ROW_CHUNKS)?, &self.path, dim);
        let mut out = Vec::with_capacity(rows.len() * dim);
        for at in rows {
            out.extend_from_slice(reader.row(*at)?.1);
        }
        Ok(out)
    }

    /// Marks merge `id` installed and removes the records of the merges it
    /// replaces (`replaced`), durably.
    pub fn install_merge(&self, id: u64, replaced: &[u64]) -> Result<(), EngineError> {
        self.write(|txn, _| {
            let mut merges = txn.open_table(MERGES)?;
            let mut rec = {
                let raw = merges
                    .get(id)?
                    .ok_or_else(|| self.corrupt(format!("merge {id} has no record")))?;
                self.decode_merge(raw.value())?
            };
            rec.installed = true;
            merges.insert(id, encode(&MergeRecord::V1(rec)).as_slice())?;
            for old in replaced {
                merges.remove(*old)?;
            }
            txn.open_table(RECLAIMS)?.insert(id, ())?;
            Ok(())
        })
    }

    /// The rows of `segment`, which must hold every row from 0 on (a
    /// segment that serves its own rows), in row order: ids and row-major
    /// vectors.
    pub fn segment_rows(&self, segment: u64, dim: usize) -> Result<(Vec<u64>, Vec<f32>), EngineError> {
        let db = self.db();
        let txn = db.begin_read()?;
        let reader = RowReader::new(txn.open_table(ROW_CHUNKS)?, &self.path, dim);
        let (mut ids, mut vectors) = (Vec::new(), Vec::new());
        reader.segment(segment, |row, id, vector| {
            if row as usize != ids.len() {
                return Err(self.corrupt(format!(
                    "segment {segment} holds row {row} after {} rows: rows are missing",
                    ids.len()
                )));
            }
            ids.push(id);
            vectors.extend_from_slice(vector);
            Ok(())
        })?;
        Ok((ids, vectors))
    }

    /// Installed merges whose sources may still hold rows they dropped.
    pub fn pending_reclaims(&self) -> Result<Vec<u64>, EngineError> {
        let db = self.db();
        let txn = db.begin_read()?;
        let table = txn.open_table(RECLAIMS)?;
        let ids = table
            .iter()?
            .map(|e| e.map(|(k, _)| k.value()))
            .collect::<Result<_, _>>()?;
        Ok(ids)
    }

    /// Removes from the file what installed merge `merge` dropped: the rows
    /// of the segments it covers that are not among its rows (deleted or
    /// replaced before its op), with their payloads and tombstones.
    /// `kept` names, for each segment it covers, the rows it holds there
    /// (runs, from its segment in memory); `None` when a later merge
    /// replaced it (which reclaims in its place). Nothing serves the other
    /// rows since its install, and every later merge takes its rows from
    /// the merge's, so they are provably unused; the caller makes sure no
    /// search that found one before the install still reads its payload.
    /// One transaction per segment that lost rows (a segment's rows are
    /// read only if it did, a chunk's only if it lost some), not fsynced,
    /// then a durable one that takes `merge` off the queue: a crash before
    /// it leaves the merge queued, and the next open reclaims again (what
    /// is gone already is skipped). Returns the rows removed.
    pub fn reclaim(&self, merge: u64, kept: Option<&[KeptRows]>) -> Result<u64, EngineError> {
        let mut removed = 0;
        for (segment, runs) in kept.unwrap_or_default() {
            removed += self.reclaim_segment(*segment, runs)?;
        }
        // Durable: redb frees the pages of non-durable commits only with
        // the next durable one.
        self.write(|txn, _| {
            txn.open_table(RECLAIMS)?.remove(merge)?;
            Ok(())
        })?;
        Ok(removed)
    }

    /// Removes the rows of sealed `segment` outside the runs `kept`, with
    /// their payloads and tombstones; see [`ShardStore::reclaim`].
    fn reclaim_segment(&self, segment: u64, kept: &rows::Runs) -> Result<u64, EngineError> {
        // Most merges drop nothing of most segments: a read tells, without
        // a write transaction.
        {
            let db = self.db();
            let txn = db.begin_read()?;
            let lost = self.lost_rows(&txn.open_table(SEGMENTS)?, &txn.open_table(RECLAIMED)?, segment, kept)?;
            if lost.is_none() {
                return Ok(0);
            }
        }
        let removed = self.write_as(Durability::None, |txn, meta| {
            let mut reclaimed = txn.open_table(RECLAIMED)?;
            let Some((stored, gone)) = self.lost_rows(&txn.open_table(SEGMENTS)?, &reclaimed, segment, kept)? else {
                return Ok(0);
            };
            let mut chunks = txn.open_table(ROW_CHUNKS)?;
            let n = rows::retain(&mut chunks, &self.path, meta.dim as usize, segment, stored, kept)?;
            let range = (segment, 0)..=(segment, u32::MAX);
            txn.open_table(PAYLOADS)?
                .retain_in(range.clone(), |(_, row), _| rows::keeps(kept, row))?;
            txn.open_table(TOMBSTONES)?
                .retain_in(range, |(_, row), _| rows::keeps(kept, row))?;
            reclaimed.insert(segment, gone + n)?;
            Ok(n)
        })?;
        let mut digests = self.digests.lock().expect("digests lock");
        digests.reclaims += 1;
        digests.by_segment.remove(&segment);
        Ok(removed)
    }

    /// For sealed `segment`, whether it still holds rows outside the runs
    /// `kept`, by the counts: `Some((its rows, rows gone already))` if so.
    /// A segment a merge covers that has no record, or is not sealed, is
    /// corrupt.
    fn lost_rows(
        &self,
        segments: &impl ReadableTable<u64, &'static [u8]>,
        reclaimed: &impl ReadableTable<u64, u64>,
        segment: u64,
        kept: &rows::Runs,
    ) -> Result<Option<(u32, u64)>, EngineError> {
        let record = match segments.get(segment)? {
            Some(raw) => self.decode_segment(raw.value())?,
            None => return Err(self.corrupt(format!("a merge covers segment {segment}, which has no record"))),
        };
        if record.state != SegmentState::Sealed {
            return Err(self.corrupt(format!("a merge covers segment {segment}, which is not sealed")));
        }
        let gone = reclaimed.get(segment)?.map_or(0, |v| v.value());
        let held = u64::from(rows::kept_within(kept, 0, record.rows));
        Ok((held + gone < u64::from(record.rows)).then_some((record.rows, gone)))
    }

    /// Runs `f` in one durable write transaction, handing it the meta
    /// record to update; the record is written back before the commit.
    fn write<T>(
        &self,
        f: impl FnOnce(&WriteTransaction, &mut ShardMetaV2) -> Result<T, EngineError>,
    ) -> Result<T, EngineError> {
        // Callers acknowledge what they wrote once this returns: fsync first.
        self.write_as(Durability::Immediate, f)
    }

    /// [`Store::write`] with the given durability. A `Durability::None`
    /// commit is visible at once and becomes durable with the next durable
    /// commit; a crash before that takes it back whole.
    fn write_as<T>(
        &self,
        durability: Durability,
        f: impl FnOnce(&WriteTransaction, &mut ShardMetaV2) -> Result<T, EngineError>,
    ) -> Result<T, EngineError> {
        let db = self.db();
        let mut txn = db.begin_write()?;
        txn.set_durability(durability)
            .map_err(|e| EngineError::Storage(e.into()))?;
        let out = {
            let mut meta_table = txn.open_table(META)?;
            let mut meta = {
                let raw = meta_table
                    .get(META_KEY)?
                    .ok_or_else(|| self.corrupt("missing shard record"))?;
                self.decode_meta(raw.value())?
            };
            let out = f(&txn, &mut meta)?;
            meta_table.insert(META_KEY, encode(&ShardMeta::V4(meta)).as_slice())?;
            out
        };
        txn.commit()?;
        Ok(out)
    }

    /// Makes every commit so far durable (an empty fsynced transaction).
    pub fn flush(&self) -> Result<(), EngineError> {
        self.write(|_, _| Ok(()))
    }

    /// Raises the durable term.
    pub fn set_term(&self, term: u64) -> Result<(), EngineError> {
        self.write(|_, meta| {
            meta.term = term;
            Ok(())
        })
    }

    /// Appends encoded entries (consecutive, right after the last op) with
    /// what [`oplog::LogState::check_append`] decided they change: the
    /// history entries they open, the term and the last op. Returns the
    /// oldest LSN in the log afterwards.
    pub fn append(&self, entries: &[(u64, impl AsRef<[u8]>)], appended: &Appended) -> Result<Option<u64>, EngineError> {
        self.write(|txn, meta| {
            let mut log = LogTables::open(txn, &self.path)?;
            for (lsn, bytes) in entries {
                let bytes = bytes.as_ref();
                log_parts::insert(&mut log.parts, *lsn, bytes)?;
                log.sizes.insert(*lsn, bytes.len() as u64)?;
                meta.log_bytes += bytes.len() as u64;
            }
            let mut terms = txn.open_table(TERMS)?;
            for &(term, first) in &appended.new_terms {
                terms.insert(term, first)?;
            }
            meta.term = appended.term;
            meta.last_term = appended.last.term;
            meta.last_lsn = appended.last.lsn;
            log.first()
        })
    }

    /// Removes every entry above `lsn` and the history entries of terms
    /// that start above it; `last` is the op id at `lsn`. Returns the
    /// oldest LSN in the log afterwards.
    pub fn truncate_after(&self, lsn: u64, last: OpId) -> Result<Option<u64>, EngineError> {
        self.write(|txn, meta| {
            let mut log = LogTables::open(txn, &self.path)?;
            let mut removed = 0u64;
            for entry in log.sizes.extract_from_if((lsn + 1).., |_, _| true)? {
                removed += entry?.1.value();
            }
            log_parts::remove(&mut log.parts, (lsn + 1)..)?;
            meta.log_bytes = meta
                .log_bytes
                .checked_sub(removed)
                .ok_or_else(|| self.corrupt("op log byte count below its contents"))?;
            txn.open_table(TERMS)?.retain(|_, first| first <= lsn)?;
            meta.last_term = last.term;
            meta.last_lsn = last.lsn;
            log.first()
        })
    }

    /// The logged ops `from ..= through`, which must all be in the log.
    pub fn logged(&self, from: u64, through: u64) -> Result<Vec<(OpId, ShardOp)>, EngineError> {
        let db = self.db();
        let txn = db.begin_read()?;
        let parts = txn.open_table(OPLOG_PARTS)?;
        let mut out = Vec::with_capacity(through.saturating_sub(from) as usize + 1);
        log_parts::visit(&parts, &self.path, from, |lsn, record| {
            if lsn > through || lsn != from + out.len() as u64 {
                return Ok(false);
            }
            let (term, op) = ShardOp::decode_with_term(record)?;
            out.push((OpId::new(term, lsn), op));
            Ok(lsn < through)
        })?;
        if out.len() as u64 != through - from + 1 {
            return Err(self.corrupt(format!(
                "op log misses ops between {from} and {through} that are not applied yet"
            )));
        }
        Ok(out)
    }

    /// Entries above `after`, in order: at most `max_ops`, and no more once
    /// `max_bytes` of encoded ops are collected (at least one entry when
    /// there is any). Read from one snapshot.
    pub fn entries_after(
        &self,
        after: u64,
        max_ops: usize,
        max_bytes: usize,
    ) -> Result<Vec<(OpId, ShardOp)>, EngineError> {
        let db = self.db();
        let txn = db.begin_read()?;
        let last = self.read_meta(&txn)?.last_lsn;
        if after >= last {
            return Ok(Vec::new());
        }
        let parts = txn.open_table(OPLOG_PARTS)?;
        let first = txn.open_table(OPLOG_SIZES)?.first()?.map(|(k, _)| k.value());
        if first.is_none_or(|first| after + 1 < first) {
            return Err(EngineError::LogTrimmed {
                shard: self.shard,
                wanted: after + 1,
                first: first.unwrap_or(last + 1),
            });
        }
        let (mut out, mut bytes) = (Vec::new(), 0usize);
        log_parts::visit(&parts, &self.path, after + 1, |lsn, record| {
            bytes += record.len();
            let (term, op) = ShardOp::decode_with_term(record)?;
            out.push((OpId::new(term, lsn), op));
            Ok(out.len() < max_ops.max(1) && bytes < max_bytes)
        })?;
        Ok(out)
    }

    /// Writes the effect of a batch of logged ops, in LSN order, and the new
    /// applied LSN (the batch's last) in one transaction; then lets
    /// retention trim the log. `growing` is the growing segment after the
    /// batch. Returns the oldest LSN in the log afterwards.
    ///
    /// The transaction is not fsynced unless the batch seals a segment or
    /// merges (an index file may be written for the new segment, so it
    /// must not be taken back): the ops are durable in the log already, the
    /// next durable commit (an append) makes the apply durable with it,
    /// and a crash before that only lowers the applied LSN, whose ops the
    /// replica applies again once it learns they are committed.
    pub fn apply(&self, batch: &[Applied<'_>], growing: u64, retention: Retention) -> Result<Option<u64>, EngineError> {
        let seals = batch
            .iter()
            .any(|a| !a.plan.sealed.is_empty() || a.plan.merge.is_some());
        let durability = if seals { Durability::Immediate } else { Durability::None };
        self.write_as(durability, |txn, meta| {
            for a in batch {
                write_effect(txn, &self.path, meta.dim as usize, a)?;
            }
            let applied = batch.last().map_or(meta.applied_lsn, |a| a.lsn);
            meta.applied_lsn = applied;
            meta.growing = growing;

            let mut log = LogTables::open(txn, &self.path)?;
            log.trim(meta, retention)?;
            log.first()
        })
    }

    /// Lets retention trim the log (not fsynced). Returns the oldest LSN
    /// in the log afterwards.
    pub fn trim(&self, retention: Retention) -> Result<Option<u64>, EngineError> {
        self.write_as(Durability::None, |txn, meta| {
            let mut log = LogTables::open(txn, &self.path)?;
            log.trim(meta, retention)?;
            log.first()
        })
    }

    /// Payloads of the rows at `locations`, in order, from one snapshot.
    pub fn payloads(&self, locations: &[Location]) -> Result<Vec<Option<String>>, EngineError> {
        let db = self.db();
        let txn = db.begin_read()?;
        let table = txn.open_table(PAYLOADS)?;
        locations
            .iter()
            .map(|at| Ok(table.get((at.segment, at.row))?.map(|v| v.value().to_owned())))
            .collect()
    }
}

/// Writes what one op changes: its rows, payloads, tombstones, locations
/// and seals.
fn write_effect(txn: &WriteTransaction, path: &Path, dim: usize, a: &Applied<'_>) -> Result<(), EngineError> {
    let plan = a.plan;
    if let ShardOp::Upsert(points) = a.op {
        let mut chunks = txn.open_table(ROW_CHUNKS)?;
        let appended = plan.appends.iter().map(|app| {
            let p = &points[app.point];
            (app.at, p.id, p.vector.as_slice())
        });
        rows::append(&mut chunks, path, dim, appended)?;
        let mut payloads = txn.open_table(PAYLOADS)?;
        for app in &plan.appends {
            if let Some(payload) = &points[app.point].payload {
                payloads.insert((app.at.segment, app.at.row), payload.as_str())?;
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
            sealed_lsn: a.lsn,
        };
        segments.insert(sealed.segment, encode(&SegmentRecord::V1(rec)).as_slice())?;
    }
    if !plan.sealed.is_empty() {
        segments.insert(
            plan.growing.segment,
            encode(&SegmentRecord::V1(growing_record())).as_slice(),
        )?;
    }
    if let Some(m) = &plan.merge {
        let mut merges = txn.open_table(MERGES)?;
        let rec = MergeRecordV1 {
            sources: m.sources.clone(),
            covers: m.covers.clone(),
            lsn: a.lsn,
            rows: m.rows.clone(),
            // A merge of deleted rows only has no index to wait for.
            installed: m.rows.is_empty(),
        };
        if rec.installed {
            for old in &m.replaces {
                merges.remove(*old)?;
            }
            txn.open_table(RECLAIMS)?.insert(m.id, ())?;
        }
        merges.insert(m.id, encode(&MergeRecord::V1(rec)).as_slice())?;
    }
    Ok(())
}

/// The first and last key of a table keyed by LSN.
fn key_range<V: redb::Value + 'static>(
    table: &impl ReadableTable<u64, V>,
) -> Result<(Option<u64>, Option<u64>), EngineError> {
    let key = |e: Option<(redb::AccessGuard<'_, u64>, _)>| e.map(|(k, _)| k.value());
    Ok((key(table.first()?), key(table.last()?)))
}

/// The op log's two tables, open in one write transaction.
struct LogTables<'txn, 'p> {
    parts: Table<'txn, (u64, u32), &'static [u8]>,
    sizes: Table<'txn, u64, u64>,
    /// The shard file, for errors.
    path: &'p Path,
}

impl<'txn, 'p> LogTables<'txn, 'p> {
    fn open(txn: &'txn WriteTransaction, path: &'p Path) -> Result<Self, EngineError> {
        Ok(LogTables {
            parts: txn.open_table(OPLOG_PARTS)?,
            sizes: txn.open_table(OPLOG_SIZES)?,
            path,
        })
    }

    /// Rebuilds `oplog_sizes` from the records when its keys are not the
    /// log's (a file written before the table existed, or changed since
    /// by a version that did not keep it): reads every record once. Both
    /// are contiguous, so the same first and last LSN mean the same keys.
    fn ensure_sizes(&mut self) -> Result<(), EngineError> {
        let lsn = |e: Option<(redb::AccessGuard<'_, (u64, u32)>, _)>| e.map(|(k, _)| k.value().0);
        let logged = (lsn(self.parts.first()?), lsn(self.parts.last()?));
        let (first, last) = key_range(&self.sizes)?;
        let count = self.sizes.len()?;
        let contiguous = match (first, last) {
            (Some(f), Some(l)) => l.checked_sub(f).is_some_and(|d| d + 1 == count),
            _ => count == 0,
        };
        if contiguous && (first, last) == logged {
            return Ok(());
        }
        let sizes = &mut self.sizes;
        sizes.retain(|_, _| false)?;
        log_parts::visit(&self.parts, self.path, 0, |lsn, record| {
            sizes.insert(lsn, record.len() as u64)?;
            Ok(true)
        })
    }

    /// Drops the oldest applied ops while the log takes more than the
    /// budget, keeping every op above `retention.keep_above` and the
    /// applied LSN. Returns the encoded bytes dropped.
    fn trim(&mut self, meta: &mut ShardMetaV2, retention: Retention) -> Result<u64, EngineError> {
        let keep_above = retention.keep_above.min(meta.applied_lsn);
        let sizes = self.sizes.iter()?.map(|e| e.map(|(k, v)| (k.value(), v.value())));
        let cut = oplog::retention_cut(sizes, meta.log_bytes, retention.budget, keep_above, retention.held)?;
        let Some((through, dropped)) = cut else {
            return Ok(0);
        };
        log_parts::remove(&mut self.parts, ..=through)?;
        self.sizes.retain_in(..=through, |_, _| false)?;
        meta.log_bytes = meta.log_bytes.saturating_sub(dropped);
        Ok(dropped)
    }

    /// The oldest LSN in the log.
    fn first(&self) -> Result<Option<u64>, EngineError> {
        Ok(self.sizes.first()?.map(|(k, _)| k.value()))
    }
}

fn decode_merge_at(path: &Path, bytes: &[u8]) -> Result<MergeRecordV1, EngineError> {
    let MergeRecord::V1(rec) =
        postcard::from_bytes(bytes).map_err(|e| EngineError::corrupt(path.display().to_string(), e))?;
    Ok(rec)
}

fn growing_record() -> SegmentRecordV1 {
    SegmentRecordV1 {
        state: SegmentState::Growing,
        rows: 0,
        sealed_lsn: 0,
    }
}

/// Rewrites the op log of the shard file at `path` as files of meta
/// record `V2` kept it (whole records in table `oplog`), for tests of the
/// move into parts at open.
#[cfg(test)]
pub(crate) fn write_log_as_v2(path: &Path) {
    let db = Database::open(path).unwrap();
    let txn = db.begin_write().unwrap();
    {
        let mut records = Vec::new();
        let mut parts = txn.open_table(OPLOG_PARTS).unwrap();
        log_parts::visit(&parts, path, 0, |lsn, record| {
            records.push((lsn, record.to_vec()));
            Ok(true)
        })
        .unwrap();
        parts.retain(|_, _| false).unwrap();
        let mut whole = txn.open_table(OPLOG).unwrap();
        for (lsn, record) in &records {
            whole.insert(*lsn, record.as_slice()).unwrap();
        }
        let mut meta = txn.open_table(META).unwrap();
        let raw = meta.get(META_KEY).unwrap().unwrap().value().to_vec();
        let ShardMeta::V4(m) = postcard::from_bytes(&raw).unwrap() else {
            panic!("not a file of meta record V4");
        };
        meta.insert(META_KEY, encode(&ShardMeta::V2(m)).as_slice()).unwrap();
    }
    txn.commit().unwrap();
}
