//! Exports: a shard replica's applied state in one file, from which another
//! replica is rebuilt (REPLICATION.md, "Catch-up"). A primary whose op log
//! no longer reaches back far enough for a replica exports instead of
//! streaming ops; so does one whose replica would have to take back applied
//! ops (such a replica is rebuilt, never patched).
//!
//! An export holds the state at one applied LSN, read from a single redb
//! read transaction (applies go on meanwhile), and no op log: the importer
//! starts with an empty log right after the export's last op id, and log
//! catch-up continues from there. Since format 3 it also carries the index
//! files the exporter had for its sealed segments and merges (a segment's
//! rows never change once sealed, so its graph fits the importer's rows):
//! the imported replica opens with them as a restarted one would, instead
//! of building every index again. An index file the open finds unusable
//! is rebuilt, as after a restart; one the exporter did not have yet is
//! built by the importer.
//!
//! Since format 4 an export made for a replica that already holds some of
//! the sealed segments (it said which, with a [`SegmentDigest`] each) leaves
//! their rows, payloads and index files out: a `Reused` record stands for
//! them, with the exporter's own digest of the segment. The importer takes
//! those rows from the shard file of the replica it replaces, and only if
//! their digest is the same; its index file for the segment comes along. So
//! what crosses the network is what the replica lacks (newer segments, the
//! growing one, deletes and the point table), not the whole shard. An
//! export without such records is written as format 3, which nodes of the
//! version before read.
//!
//! Since format 5 a sealed segment that a merge covers may lack rows: the
//! rows the merge dropped, once the exporter reclaimed them (the importer
//! has no use for them either). An export is written as format 5 only when
//! the exporter's state has such gaps, so older nodes still read the rest.
//!
//! File format [`EXPORT_FORMAT`] 5, little-endian (versions 1, which had
//! no merged segments, 2, which had no index files, 3, which had no
//! `Reused` records, and 4, whose sealed segments had all their rows, are
//! still read):
//!
//! ```text
//! "EVEXPORT"   8 bytes of magic
//! version      u32, EXPORT_FORMAT
//! records      each: length u32 (1 ..= 64 MiB), then postcard(ExportRecord)
//! end          u32 0
//! count        u64, number of records
//! checksum     u64, FNV-1a 64 (fsutil::Checksum) of every byte before it
//! ```
//!
//! Records come in this order, each kind in its key order: one `Shard`
//! (shard, dim, metric, seal_rows, last applied op id, durable term, term
//! history up to the applied LSN, growing segment and its rows), then every
//! `Segment`, `Row`, `Payload`, `Tombstone`, `Point` (live location) and
//! `Merge` (a merged segment: its sources, the segments whose rows it
//! takes over, its rows, whether the exporter had installed it; a
//! `Reused` record takes the place of a segment's rows), then the
//! `IndexChunk`s of each index file (segment or merge id ascending, each
//! file's bytes in order, at most [`INDEX_CHUNK_BYTES`] a record).
//! Each record is an [`ExportRecord`] envelope: new shapes become `V2`,
//! `V1` variants are never reordered (postcard encodes variant indexes).
//!
//! Reading is bounded and refuses, with an error naming the file, a wrong
//! magic, an unknown version, a record longer than the bound (before
//! allocating), a truncated file, bytes after the trailer, a checksum or
//! count mismatch, and records that do not describe a consistent shard
//! (module `check`; such a record is blamed only once the checksum has
//! shown the file undamaged, so damage always reads as damage). Records
//! are handed on while the file is read, so the
//! caller builds into a staging area it discards unless the whole read
//! succeeds.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use edgevec_proto::{Metric, OpId, SegmentState};
use serde::{Deserialize, Serialize};

use crate::error::EngineError;
use crate::fsutil::{self, Checksum};
use crate::plan::Location;
use crate::shard::ShardConfig;
use crate::store::{MergeRecordV1, SegmentDigest, SegmentRecordV1, ShardMetaV2, StateItem};

mod check;

use check::Checker;

/// Newest export file format, which this build writes when rows of sealed
/// segments were reclaimed, and reads.
pub const EXPORT_FORMAT: u32 = 5;

/// Format of an export that leaves out segments the importer holds, when
/// no rows were reclaimed.
const REUSE_FORMAT: u32 = 4;

/// Format of an export that leaves nothing out and has no reclaimed rows.
const WHOLE_FORMAT: u32 = 3;

/// Bytes of an index file in one record.
const INDEX_CHUNK_BYTES: usize = 4 * 1024 * 1024;

/// Oldest export format this build reads.
const OLDEST_FORMAT: u32 = 1;

const MAGIC: [u8; 8] = *b"EVEXPORT";

/// Largest record a reader accepts; far above any real record (a row is at
/// most 16 KiB of vector plus its id, a payload at most 64 KiB), small
/// enough that a damaged length cannot make the reader allocate gigabytes.
const MAX_RECORD_BYTES: u32 = 64 * 1024 * 1024;

/// Length that marks the end of the records (a record is never empty).
const END: u32 = 0;

/// What an export holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportInfo {
    /// Op id of the last applied op (term from the term history) — the
    /// import's last_op().
    pub last: OpId,
    /// Live points.
    pub points: u64,
    /// Size of the file in bytes.
    pub bytes: u64,
    /// Rows left out of the file because the importer holds their sealed
    /// segments (taken from its own shard file).
    pub reused_rows: u64,
}

/// The envelope of every record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum ExportRecord {
    V1(RecordV1),
}

/// The file's own shapes, apart from the shard file's, so a change of the
/// store cannot silently change the format.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum RecordV1 {
    Shard(ShardV1),
    Segment(SegmentV1),
    Row {
        segment: u64,
        row: u32,
        id: u64,
        vector: Vec<f32>,
    },
    Payload {
        segment: u64,
        row: u32,
        json: String,
    },
    Tombstone {
        segment: u64,
        row: u32,
        id: u64,
    },
    Point {
        id: u64,
        segment: u64,
        row: u32,
    },
    /// Format 2.
    Merge(MergeV1),
    /// Format 3: bytes `offset..` of the index file of a sealed segment or
    /// a merge.
    IndexChunk {
        segment: u64,
        offset: u64,
        bytes: Vec<u8>,
    },
    /// Format 4, in place of the rows and payloads of a sealed segment:
    /// the importer holds the segment with this digest and takes them
    /// from its own file.
    Reused {
        segment: u64,
        rows: u32,
        sha256: [u8; 32],
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct MergeV1 {
    id: u64,
    sources: Vec<u64>,
    covers: Vec<u64>,
    lsn: u64,
    /// `(segment, row, point id)` of each row, in order.
    rows: Vec<(u64, u32, u64)>,
    installed: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct ShardV1 {
    shard: u32,
    dim: u32,
    metric: Metric,
    seal_rows: u32,
    /// The last applied op: its LSN is the export's LSN.
    last_term: u64,
    last_lsn: u64,
    /// The exporter's durable term (at least `last_term`).
    term: u64,
    /// `(term, first lsn)`, ascending, none starting above `last_lsn`.
    history: Vec<(u64, u64)>,
    /// The growing segment (the highest id) and its rows.
    growing: u64,
    growing_rows: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct SegmentV1 {
    id: u64,
    state: SegmentState,
    /// Final row count once sealed; 0 while growing.
    rows: u32,
    sealed_lsn: u64,
}

impl RecordV1 {
    /// Position of the record's kind in the file.
    fn stage(&self) -> u8 {
        match self {
            RecordV1::Shard(_) => 0,
            RecordV1::Segment(_) => 1,
            RecordV1::Row { .. } | RecordV1::Reused { .. } => 2,
            RecordV1::Payload { .. } => 3,
            RecordV1::Tombstone { .. } => 4,
            RecordV1::Point { .. } => 5,
            RecordV1::Merge(_) => 6,
            RecordV1::IndexChunk { .. } => 7,
        }
    }

    /// The record for an item of the exporter's state.
    fn of_item(item: StateItem<'_>, config: &ShardConfig) -> RecordV1 {
        match item {
            StateItem::Meta {
                meta,
                history,
                growing_rows,
                ..
            } => {
                let applied = meta.applied_lsn;
                // Terms opened by logged but unapplied ops are not part of
                // the exported state.
                let history: Vec<(u64, u64)> = history.into_iter().filter(|&(_, first)| first <= applied).collect();
                let last_term = edgevec_proto::term_at(&history, OpId::new(0, applied), applied).unwrap_or(0);
                RecordV1::Shard(ShardV1 {
                    shard: config.shard,
                    dim: config.dim,
                    metric: config.metric,
                    seal_rows: config.seal_rows,
                    last_term,
                    last_lsn: applied,
                    term: meta.term.max(last_term),
                    history,
                    growing: meta.growing,
                    growing_rows,
                })
            }
            StateItem::Segment { id, record } => RecordV1::Segment(SegmentV1 {
                id,
                state: record.state,
                rows: record.rows,
                sealed_lsn: record.sealed_lsn,
            }),
            StateItem::Row { at, id, vector } => RecordV1::Row {
                segment: at.segment,
                row: at.row,
                id,
                vector,
            },
            StateItem::Payload { at, json } => RecordV1::Payload {
                segment: at.segment,
                row: at.row,
                json: json.to_owned(),
            },
            StateItem::Tombstone { at, id } => RecordV1::Tombstone {
                segment: at.segment,
                row: at.row,
                id,
            },
            StateItem::Point { id, at } => RecordV1::Point {
                id,
                segment: at.segment,
                row: at.row,
            },
            StateItem::Merge { id, record } => RecordV1::Merge(MergeV1 {
                id,
                sources: record.sources,
                covers: record.covers,
                lsn: record.lsn,
                rows: record.rows.iter().map(|(at, id)| (at.segment, at.row, *id)).collect(),
                installed: record.installed,
            }),
        }
    }

    /// Hands the record to the importer: as an item of its state (an
    /// empty log right after the last applied op), as bytes of an index
    /// file, or as a segment to take from its own file.
    fn deliver(self, to: &mut impl Importer) -> Result<(), EngineError> {
        let at = |segment, row| Location { segment, row };
        match self {
            RecordV1::IndexChunk { segment, offset, bytes } => to.index(segment, offset, &bytes),
            RecordV1::Reused { segment, rows, sha256 } => to.reuse(segment, rows, sha256),
            RecordV1::Shard(s) => to.item(StateItem::Meta {
                meta: ShardMetaV2 {
                    shard: s.shard,
                    dim: s.dim,
                    applied_lsn: s.last_lsn,
                    growing: s.growing,
                    term: s.term.max(s.last_term),
                    last_term: s.last_term,
                    last_lsn: s.last_lsn,
                    log_bytes: 0,
                },
                history: s.history,
                growing_rows: s.growing_rows,
                // The importer sees the rows themselves.
                sparse: false,
            }),
            RecordV1::Segment(s) => to.item(StateItem::Segment {
                id: s.id,
                record: SegmentRecordV1 {
                    state: s.state,
                    rows: s.rows,
                    sealed_lsn: s.sealed_lsn,
                },
            }),
            RecordV1::Row {
                segment,
                row,
                id,
                vector,
            } => to.item(StateItem::Row {
                at: at(segment, row),
                id,
                vector,
            }),
            RecordV1::Payload { segment, row, json } => to.item(StateItem::Payload {
                at: at(segment, row),
                json: &json,
            }),
            RecordV1::Tombstone { segment, row, id } => to.item(StateItem::Tombstone {
                at: at(segment, row),
                id,
            }),
            RecordV1::Point { id, segment, row } => to.item(StateItem::Point {
                id,
                at: at(segment, row),
            }),
            RecordV1::Merge(m) => to.item(StateItem::Merge {
                id: m.id,
                record: MergeRecordV1 {
                    sources: m.sources,
                    covers: m.covers,
                    lsn: m.lsn,
                    rows: m.rows.into_iter().map(|(s, r, id)| (at(s, r), id)).collect(),
                    installed: m.installed,
                },
            }),
        }
    }
}

fn corrupt(path: &Path, message: impl ToString) -> EngineError {
    EngineError::corrupt(format!("export {}", path.display()), message)
}

/// Reads into all of `buf` unless the file ends first; the bytes read.
fn read_full(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Writes an export file from the items of a replica's state, in the order
/// `ShardStore::read_applied` visits them.
pub(crate) struct Exporter {
    out: BufWriter<File>,
    path: PathBuf,
    config: ShardConfig,
    sum: Checksum,
    records: u64,
    bytes: u64,
    last: OpId,
    points: u64,
    buf: Vec<u8>,
    /// Sealed segments and merges of the exported state: the ones whose
    /// index files go with it.
    indexed: Vec<u64>,
    /// Sealed segments the importer holds as they are here: their rows,
    /// payloads and index files are left out.
    reuse: BTreeMap<u64, SegmentDigest>,
    /// Reused segments whose `Reused` record is written.
    reused: std::collections::BTreeSet<u64>,
    reused_rows: u64,
    /// Whether the header is written (with the first item, whose state
    /// decides the format).
    started: bool,
}

impl Exporter {
    /// Creates (truncating) `path`; the header goes in with the first item.
    /// The rows of the sealed segments in `reuse` (digests of this
    /// replica's own copies, equal to the importer's) are left out.
    pub fn create(
        path: &Path,
        config: &ShardConfig,
        reuse: BTreeMap<u64, SegmentDigest>,
    ) -> Result<Exporter, EngineError> {
        let file = File::create(path).map_err(|e| EngineError::io(path, e))?;
        let out = Exporter {
            out: BufWriter::with_capacity(1 << 20, file),
            path: path.to_owned(),
            config: config.clone(),
            sum: Checksum::new(),
            records: 0,
            bytes: 0,
            last: OpId::ZERO,
            points: 0,
            buf: Vec::new(),
            indexed: Vec::new(),
            reuse,
            reused: Default::default(),
            reused_rows: 0,
            started: false,
        };
        Ok(out)
    }

    /// Writes the record of one item (the first is the shard's meta).
    pub fn item(&mut self, item: StateItem<'_>) -> Result<(), EngineError> {
        if !self.started {
            let StateItem::Meta { sparse, .. } = &item else {
                return Err(corrupt(&self.path, "an export's first item is not the shard record"));
            };
            self.start(*sparse)?;
        }
        let reused = match &item {
            StateItem::Row { at, .. } | StateItem::Payload { at, .. } => self.reuse.get(&at.segment).copied(),
            _ => None,
        };
        if let Some(d) = reused {
            // The segment's first row held stands for all of its rows; its
            // payloads go with them.
            return match item {
                StateItem::Row { at, .. } if self.reused.insert(at.segment) => {
                    self.reused_rows += u64::from(d.rows);
                    self.record(RecordV1::Reused {
                        segment: d.segment,
                        rows: d.rows,
                        sha256: d.sha256,
                    })
                }
                _ => Ok(()),
            };
        }
        let rec = RecordV1::of_item(item, &self.config);
        match &rec {
            RecordV1::Shard(s) => self.last = OpId::new(s.last_term, s.last_lsn),
            RecordV1::Point { .. } => self.points += 1,
            RecordV1::Segment(s) if s.state == SegmentState::Sealed => self.indexed.push(s.id),
            RecordV1::Merge(m) => self.indexed.push(m.id),
            _ => {}
        }
        self.record(rec)
    }

    /// Writes the header: format 5 if rows of the state were reclaimed
    /// (`sparse`), else 4 if segments are left out, else 3.
    fn start(&mut self, sparse: bool) -> Result<(), EngineError> {
        let version = match (sparse, self.reuse.is_empty()) {
            (true, _) => EXPORT_FORMAT,
            (false, false) => REUSE_FORMAT,
            (false, true) => WHOLE_FORMAT,
        };
        self.put(&MAGIC)?;
        self.put(&version.to_le_bytes())?;
        self.started = true;
        Ok(())
    }

    /// Writes the index files `path_of` gives for the exported sealed
    /// segments and merges, after every item: those that exist (an index
    /// still being built, or one a merge just made unused, is left to the
    /// importer). Each is read through one open handle, a chunk at a
    /// time, so a file replaced meanwhile (indexes are saved by renaming)
    /// goes in as the version that was opened.
    pub fn indexes(&mut self, path_of: impl Fn(u64) -> PathBuf) -> Result<(), EngineError> {
        let mut ids = std::mem::take(&mut self.indexed);
        ids.sort_unstable();
        ids.retain(|id| !self.reuse.contains_key(id));
        for segment in ids {
            let path = path_of(segment);
            let mut file = match File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(EngineError::io(&path, e)),
            };
            let mut offset = 0u64;
            loop {
                let mut bytes = vec![0u8; INDEX_CHUNK_BYTES];
                let n = read_full(&mut file, &mut bytes).map_err(|e| EngineError::io(&path, e))?;
                if n == 0 {
                    break;
                }
                bytes.truncate(n);
                self.record(RecordV1::IndexChunk { segment, offset, bytes })?;
                offset += n as u64;
            }
        }
        Ok(())
    }

    fn record(&mut self, rec: RecordV1) -> Result<(), EngineError> {
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        let buf = postcard::to_extend(&ExportRecord::V1(rec), buf).expect("records are plain data");
        let len = u32::try_from(buf.len())
            .ok()
            .filter(|&len| len <= MAX_RECORD_BYTES)
            .ok_or_else(|| {
                corrupt(
                    &self.path,
                    format!("a record of {} bytes is above the bound", buf.len()),
                )
            })?;
        self.put(&len.to_le_bytes())?;
        self.put(&buf)?;
        self.buf = buf;
        self.records += 1;
        Ok(())
    }

    fn put(&mut self, bytes: &[u8]) -> Result<(), EngineError> {
        self.sum.update(bytes);
        self.bytes += bytes.len() as u64;
        self.out.write_all(bytes).map_err(|e| EngineError::io(&self.path, e))
    }

    /// Ends the file when `read` (the outcome of reading the state)
    /// succeeded: writes the trailer and fsyncs the file and its
    /// directory. On any failure the partial file is removed.
    pub fn finish(mut self, read: Result<(), EngineError>) -> Result<ExportInfo, EngineError> {
        let path = self.path.clone();
        let done = read.and_then(|()| {
            self.put(&END.to_le_bytes())?;
            self.put(&self.records.to_le_bytes())?;
            let sum = self.sum.finish().to_le_bytes();
            self.out.write_all(&sum).map_err(|e| EngineError::io(&path, e))?;
            self.bytes += sum.len() as u64;
            let file = self
                .out
                .into_inner()
                .map_err(|e| EngineError::io(&path, e.into_error()))?;
            file.sync_all().map_err(|e| EngineError::io(&path, e))?;
            drop(file);
            match path.parent() {
                Some(dir) if !dir.as_os_str().is_empty() => fsutil::sync_dir(dir)?,
                _ => {}
            }
            Ok(ExportInfo {
                last: self.last,
                points: self.points,
                bytes: self.bytes,
                reused_rows: self.reused_rows,
            })
        });
        if done.is_err() {
            let _ = std::fs::remove_file(&path);
        }
        done
    }
}

/// Where [`read`] hands what an export holds.
pub(crate) trait Importer {
    /// An item of the importer's state (an empty op log after the
    /// export's last op).
    fn item(&mut self, item: StateItem<'_>) -> Result<(), EngineError>;
    /// Bytes `offset..` of the index file of a sealed segment or a merge.
    fn index(&mut self, segment: u64, offset: u64, bytes: &[u8]) -> Result<(), EngineError>;
    /// The rows and payloads of the sealed `segment`: the importer's own,
    /// which must have this digest (`rows` rows).
    fn reuse(&mut self, segment: u64, rows: u32, sha256: [u8; 32]) -> Result<(), EngineError>;
}

/// Reads the export `file`, checks it against `config` (the replica it is
/// to become: shard, dim, metric, seal_rows) and hands its state to `to`
/// record by record. Returns what it held once the whole file is read and
/// checked; what was handed over before an error must be discarded.
pub(crate) fn read(file: &Path, config: &ShardConfig, to: &mut impl Importer) -> Result<ExportInfo, EngineError> {
    let mut reader = Reader::open(file)?;
    let mut checker = Checker::new(config, file, reader.version);
    while let Some(rec) = reader.next()? {
        if let Err(e) = checker.check(&rec) {
            // Damage explains a bad record better than the record does (a
            // flipped bit in the dim is not a wrong file): verify the
            // checksum before blaming the contents.
            reader.verify_rest()?;
            return Err(e);
        }
        rec.deliver(to)?;
    }
    let (last, points, reused_rows) = checker.finish()?;
    Ok(ExportInfo {
        last,
        points,
        bytes: reader.bytes,
        reused_rows,
    })
}

/// Reads records one at a time, keeping the checksum and count.
struct Reader {
    input: BufReader<File>,
    path: PathBuf,
    sum: Checksum,
    records: u64,
    bytes: u64,
    buf: Vec<u8>,
    /// The file's format version.
    version: u32,
}

impl Reader {
    fn open(path: &Path) -> Result<Reader, EngineError> {
        let file = File::open(path).map_err(|e| EngineError::io(path, e))?;
        let mut r = Reader {
            input: BufReader::with_capacity(1 << 20, file),
            path: path.to_owned(),
            sum: Checksum::new(),
            records: 0,
            bytes: 0,
            buf: Vec::new(),
            version: 0,
        };
        if r.take(MAGIC.len())? != MAGIC {
            return Err(corrupt(path, "not an edgevec export (wrong magic bytes)"));
        }
        let version = r.u32()?;
        if !(OLDEST_FORMAT..=EXPORT_FORMAT).contains(&version) {
            return Err(corrupt(
                path,
                format!(
                    "export format version {version}, but this edgevec reads only versions \
                     {OLDEST_FORMAT} to {EXPORT_FORMAT}; export again with a matching version"
                ),
            ));
        }
        r.version = version;
        Ok(r)
    }

    /// The next `n` bytes, hashed.
    fn take(&mut self, n: usize) -> Result<&[u8], EngineError> {
        self.buf.resize(n, 0);
        self.fill()?;
        self.sum.update(&self.buf);
        Ok(&self.buf)
    }

    /// Fills `buf` from the file, counting the bytes.
    fn fill(&mut self) -> Result<(), EngineError> {
        match self.input.read_exact(&mut self.buf) {
            Ok(()) => {
                self.bytes += self.buf.len() as u64;
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(corrupt(
                &self.path,
                format!("the file ends early, after {} bytes (truncated)", self.bytes),
            )),
            Err(e) => Err(EngineError::io(&self.path, e)),
        }
    }

    fn u32(&mut self) -> Result<u32, EngineError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }

    fn u64(&mut self) -> Result<u64, EngineError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }

    /// The next record; `None` once the trailer is read and verified.
    fn next(&mut self) -> Result<Option<RecordV1>, EngineError> {
        let Some(len) = self.next_len()? else {
            return Ok(None);
        };
        let at = self.records;
        let bytes = self.take(len)?;
        let rec = match postcard::take_from_bytes::<ExportRecord>(bytes) {
            Ok((ExportRecord::V1(rec), [])) => rec,
            Ok(_) => return Err(corrupt(&self.path, format!("record {at} has bytes after its end"))),
            Err(e) => return Err(corrupt(&self.path, format!("record {at} does not decode: {e}"))),
        };
        self.records += 1;
        Ok(Some(rec))
    }

    /// The length of the next record; `None` once the trailer is read and
    /// verified.
    fn next_len(&mut self) -> Result<Option<usize>, EngineError> {
        let len = self.u32()?;
        if len == END {
            self.trailer()?;
            return Ok(None);
        }
        if len > MAX_RECORD_BYTES {
            return Err(corrupt(
                &self.path,
                format!(
                    "record {} claims {len} bytes, above the bound of {MAX_RECORD_BYTES}",
                    self.records
                ),
            ));
        }
        Ok(Some(len as usize))
    }

    /// Reads the rest of the file without decoding it, to verify the
    /// trailer.
    fn verify_rest(&mut self) -> Result<(), EngineError> {
        while let Some(len) = self.next_len()? {
            self.take(len)?;
            self.records += 1;
        }
        Ok(())
    }

    fn trailer(&mut self) -> Result<(), EngineError> {
        let count = self.u64()?;
        let want = self.sum.finish();
        self.buf.resize(8, 0);
        self.fill()?;
        let stored = u64::from_le_bytes(self.buf[..8].try_into().expect("8 bytes"));
        if stored != want {
            return Err(corrupt(
                &self.path,
                format!("checksum mismatch (stored {stored:#018x}, computed {want:#018x}): the file is damaged"),
            ));
        }
        if count != self.records {
            return Err(corrupt(
                &self.path,
                format!("the trailer counts {count} records, the file holds {}", self.records),
            ));
        }
        let mut extra = [0u8; 1];
        match self.input.read(&mut extra) {
            Ok(0) => Ok(()),
            Ok(_) => Err(corrupt(&self.path, "bytes follow the trailer")),
            Err(e) => Err(EngineError::io(&self.path, e)),
        }
    }
}

/// Owned copies of what `read` hands over, one line each.
#[cfg(test)]
#[derive(Default)]
pub(crate) struct Seen(pub Vec<String>);

#[cfg(test)]
impl Importer for Seen {
    fn item(&mut self, item: StateItem<'_>) -> Result<(), EngineError> {
        self.0.push(format!("{item:?}"));
        Ok(())
    }

    fn index(&mut self, segment: u64, offset: u64, bytes: &[u8]) -> Result<(), EngineError> {
        self.0
            .push(format!("index {segment} at {offset}: {} bytes", bytes.len()));
        Ok(())
    }

    fn reuse(&mut self, segment: u64, rows: u32, sha256: [u8; 32]) -> Result<(), EngineError> {
        self.0
            .push(format!("reuse {rows} rows of {segment} ({:02x})", sha256[0]));
        Ok(())
    }
}

#[cfg(test)]
mod tests;
