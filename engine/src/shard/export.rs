//! Exports of a replica's applied state and imports into a new replica's
//! directory; the file format and its checks are in [`crate::export`].

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::Write;
use std::path::Path;

use super::{ShardReplica, STORE_FILE};
use crate::error::EngineError;
use crate::export::{self, ExportInfo, Exporter, Importer};
use crate::shard::ShardConfig;
use crate::store::{SegmentDigest, StateItem, StoreImport};

impl ShardReplica {
    /// Digests of this replica's sealed segments, which a primary compares
    /// with its own to leave out of an export what this replica holds.
    pub fn sealed_digests(&self) -> Result<Vec<SegmentDigest>, EngineError> {
        self.store.sealed_digests(|_| true)
    }

    /// Writes a consistent export of the applied state (at applied_lsn(),
    /// read from ONE redb read transaction so concurrent applies do not
    /// tear it) to `path` (created; fsynced), and returns what it holds.
    /// Applies may continue while it runs. The rows, payloads and index
    /// files of sealed segments in `held` (the importer's digests) whose
    /// digest here is the same are left out, for the importer to take from
    /// its own file.
    ///
    /// The op log is not exported. A caller that streams the log tail
    /// after the export keeps it from retention first:
    /// `set_retain_floor(applied_lsn())` before this call (the export's
    /// LSN is at least that). On failure the partial file is removed.
    pub fn export_to(&self, path: &Path, held: &[SegmentDigest]) -> Result<ExportInfo, EngineError> {
        let reuse: BTreeMap<u64, SegmentDigest> = if held.is_empty() {
            BTreeMap::new()
        } else {
            // Digests read before the export's own transaction: a sealed
            // segment changes only when a reclaim removes rows a merge
            // dropped. If one does meanwhile, the importer finds that its
            // copy differs (and the catch-up tries again), or takes rows
            // nothing serves any more, which it reclaims in turn.
            let held: HashSet<SegmentDigest> = held.iter().copied().collect();
            let ids: HashSet<u64> = held.iter().map(|d| d.segment).collect();
            self.store
                .sealed_digests(|id| ids.contains(&id))?
                .into_iter()
                .filter(|d| held.contains(d))
                .map(|d| (d.segment, d))
                .collect()
        };
        let mut out = Exporter::create(path, &self.config, reuse)?;
        let read = self
            .store
            .read_applied(|item| out.item(item))
            .and_then(|()| out.indexes(|segment| super::index_path(&self.dir, segment)));
        let info = out.finish(read)?;
        tracing::info!(
            shard = self.config.shard,
            last = %info.last,
            points = info.points,
            bytes = info.bytes,
            reused_rows = info.reused_rows,
            path = %path.display(),
            "replica exported"
        );
        Ok(info)
    }
}

/// Writes the shard file of a replica with `config` into the empty
/// directory `dir` from the export `file`, and the index files it carries
/// where the replica's open looks for them, fsynced, and returns what the
/// export held. The segments the export reuses come from `held`, the
/// replica being replaced, with their index files. On error `dir` holds
/// partial files to discard; it never holds a file that opens as a shard
/// (the meta record goes in last).
pub(crate) fn import_files(
    dir: &Path,
    config: &ShardConfig,
    file: &Path,
    held: Option<&ShardReplica>,
) -> Result<ExportInfo, EngineError> {
    let mut to = Import {
        shard: config.shard,
        dir,
        file,
        held,
        store: StoreImport::create(&dir.join(STORE_FILE))?,
        index: None,
    };
    let info = export::read(file, config, &mut to)?;
    to.close_index()?;
    to.store.finish()?;
    crate::fsutil::sync_dir(dir)?;
    Ok(info)
}

/// An import under way (see [`import_files`]).
struct Import<'a> {
    shard: u32,
    dir: &'a Path,
    file: &'a Path,
    held: Option<&'a ShardReplica>,
    store: StoreImport,
    /// The index file being written.
    index: Option<(u64, File)>,
}

impl Import<'_> {
    fn close_index(&mut self) -> Result<(), EngineError> {
        if let Some((segment, done)) = self.index.take() {
            done.sync_all()
                .map_err(|e| EngineError::io(super::index_path(self.dir, segment), e))?;
        }
        Ok(())
    }
}

impl Importer for Import<'_> {
    fn item(&mut self, item: StateItem<'_>) -> Result<(), EngineError> {
        self.store.push(item)
    }

    fn index(&mut self, segment: u64, offset: u64, bytes: &[u8]) -> Result<(), EngineError> {
        let path = super::index_path(self.dir, segment);
        if offset == 0 {
            self.close_index()?;
            let file = File::create_new(&path).map_err(|e| EngineError::io(&path, e))?;
            self.index = Some((segment, file));
        }
        match self.index.as_mut() {
            Some((s, file)) if *s == segment => file.write_all(bytes).map_err(|e| EngineError::io(&path, e)),
            _ => Err(EngineError::corrupt(
                format!("export {}", self.file.display()),
                format!("index chunk of segment {segment} at offset {offset} starts no file"),
            )),
        }
    }

    fn reuse(&mut self, segment: u64, rows: u32, sha256: [u8; 32]) -> Result<(), EngineError> {
        let shard = self.shard;
        let differs = move |why: String| EngineError::ReusedSegmentDiffers { shard, segment, why };
        let Some(held) = self.held else {
            return Err(differs("this node holds no replica of the shard".into()));
        };
        let store = &mut self.store;
        let got = held.store.sealed_segment(segment, |item| store.push(item))?;
        match got {
            Some(d) if d.rows == rows && d.sha256 == sha256 => {}
            Some(d) => {
                let short = |h: &[u8; 32]| h[..8].iter().map(|b| format!("{b:02x}")).collect::<String>();
                return Err(differs(format!(
                    "its copy has {} rows and digest {}…, the exporter's {rows} rows and {}…",
                    d.rows,
                    short(&d.sha256),
                    short(&sha256)
                )));
            }
            None => return Err(differs("it holds no such sealed segment".into())),
        }
        // Its index file fits the same rows; without one, the open builds it.
        let (from, to) = (
            super::index_path(&held.dir, segment),
            super::index_path(self.dir, segment),
        );
        match std::fs::hard_link(&from, &to) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            // Another file system: a copy, made durable like the files
            // the export carries.
            Err(_) => match std::fs::copy(&from, &to) {
                Ok(_) => File::open(&to)
                    .and_then(|f| f.sync_all())
                    .map_err(|e| EngineError::io(&to, e)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(EngineError::io(&to, e)),
            },
        }
    }
}
