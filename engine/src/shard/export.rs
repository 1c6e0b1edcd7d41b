//! Exports of a replica's applied state and imports into a new replica's
//! directory; the file format and its checks are in [`crate::export`].

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
        let read = self.store.read_applied(|item| out.item(item));
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
/// directory `dir` from the export `file`, fsynced, and returns what the
/// export held. On error `dir` holds a partial file to discard; it never
/// holds a file that opens as a shard (the meta record goes in last).
pub(crate) fn import_files(dir: &Path, config: &ShardConfig, file: &Path) -> Result<ExportInfo, EngineError> {
    let mut store = StoreImport::create(&dir.join(STORE_FILE))?;
    let info = export::read(file, config, |item| store.push(item))?;
    store.finish()?;
    crate::fsutil::sync_dir(dir)?;
    Ok(info)
}
