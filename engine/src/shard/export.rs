//! Exports of a replica's applied state and imports into a new replica's
//! directory; the file format and its checks are in [`crate::export`].

use std::fs::File;
use std::io::Write;
use std::path::Path;

use super::{ShardReplica, STORE_FILE};
use crate::error::EngineError;
use crate::export::{self, ExportInfo, Exporter};
use crate::shard::ShardConfig;
use crate::store::StoreImport;

impl ShardReplica {
    /// Writes a consistent export of the applied state (at applied_lsn(),
    /// read from ONE redb read transaction so concurrent applies do not
    /// tear it) to `path` (created; fsynced), and returns what it holds.
    /// Applies may continue while it runs.
    ///
    /// The op log is not exported. A caller that streams the log tail
    /// after the export keeps it from retention first:
    /// `set_retain_floor(applied_lsn())` before this call (the export's
    /// LSN is at least that). On failure the partial file is removed.
    pub fn export_to(&self, path: &Path) -> Result<ExportInfo, EngineError> {
        let mut out = Exporter::create(path, &self.config)?;
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
            path = %path.display(),
            "replica exported"
        );
        Ok(info)
    }
}

/// Writes the shard file of a replica with `config` into the empty
/// directory `dir` from the export `file`, and the index files it carries
/// where the replica's open looks for them, fsynced, and returns what the
/// export held. On error `dir` holds partial files to discard; it never
/// holds a file that opens as a shard (the meta record goes in last).
pub(crate) fn import_files(dir: &Path, config: &ShardConfig, file: &Path) -> Result<ExportInfo, EngineError> {
    let mut store = StoreImport::create(&dir.join(STORE_FILE))?;
    let mut index: Option<(u64, File)> = None;
    let mut write_index = |segment: u64, offset: u64, bytes: &[u8]| -> Result<(), EngineError> {
        let path = super::index_path(dir, segment);
        if offset == 0 {
            if let Some((_, done)) = index.take() {
                done.sync_all().map_err(|e| EngineError::io(&path, e))?;
            }
            let file = File::create_new(&path).map_err(|e| EngineError::io(&path, e))?;
            index = Some((segment, file));
        }
        match index.as_mut() {
            Some((s, file)) if *s == segment => file.write_all(bytes).map_err(|e| EngineError::io(&path, e)),
            _ => Err(EngineError::corrupt(
                format!("export {}", file.display()),
                format!("index chunk of segment {segment} at offset {offset} starts no file"),
            )),
        }
    };
    let info = export::read(file, config, |item| store.push(item), &mut write_index)?;
    if let Some((segment, done)) = index {
        done.sync_all()
            .map_err(|e| EngineError::io(super::index_path(dir, segment), e))?;
    }
    store.finish()?;
    crate::fsutil::sync_dir(dir)?;
    Ok(info)
}
