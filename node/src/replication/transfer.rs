//! Shard export transfer: catch-up of a replica the op log no longer
//! reaches (REPLICATION.md, "Catch-up").
//!
//! The primary exports its applied state at a committed LSN to a file
//! (the engine's versioned, checksummed export), keeps its op log from that
//! LSN on, and streams the file to the replica in bounded chunks on their
//! own streams. The replica writes the chunks to a file of its own in
//! order and answers how much it holds, so a transfer cut in the middle
//! resumes where it stopped; a new transfer id starts over. Only a
//! complete file whose checksum holds is imported, replacing the
//! replica's whole log and state at once; until then the replica is
//! untouched. Log catch-up then goes on from the export's LSN, and the
//! replica joins the in-sync set as after any catch-up — never before.
//!
//! Before exporting, the primary asks the replica for the digests of its
//! sealed segments ([`NodeOpV1::SealedDigests`]) and leaves out of the
//! export the rows of those it holds with the same digest: a replica that
//! was away receives what it lacks, not the whole shard. The import takes
//! those rows from the replica's own file and checks their digest again;
//! should a copy differ, the import is refused and the replica offers no
//! digests to the next export, which then carries everything. A node that
//! does not know the request (an older version) gets a whole export.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgevec_engine::{EngineError, SegmentDigest};
use edgevec_proto::internal::{NodeOpV1, NodeReplyV1};
use edgevec_proto::replication::{
    ExportChunk, ExportProgress, SegmentDigestV1, ShardRef, EXPORT_CHUNK_BYTES, MAX_SEALED_DIGESTS,
};
use edgevec_proto::{ErrorCode, OpId, WireError};
use std::sync::atomic::Ordering;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tracing::{debug, info};

use super::{blocking, DataPlane, Local};

/// Deadline of one chunk's exchange.
const CHUNK_TIMEOUT: Duration = Duration::from_secs(30);
/// Deadline of the digests a replica reports (it reads and hashes each of
/// its sealed segments the first time).
const DIGESTS_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest a whole transfer may take before the catch-up starts over.
const TRANSFER_BUDGET: Duration = Duration::from_secs(600);

/// An export being received.
pub struct Incoming {
    transfer: u64,
    path: PathBuf,
    file: tokio::fs::File,
    received: u64,
}

impl DataPlane {
    /// Exports `local` and streams it to `node`; returns the op id the
    /// replica's log ends at once it has imported it.
    pub(super) async fn send_export(&self, local: &Arc<Local>, term: u64, node: u64) -> Result<OpId, String> {
        let key = local.key;
        let transfer: u64 = rand::random();
        let path = self
            .transfers
            .join(format!("export-{}-{}-{transfer:016x}", key.collection, key.shard));
        // Keep every op after the export's LSN until the replica has them:
        // from before the export starts, so retention cannot drop them
        // while it runs (the export is taken at the applied LSN or later).
        local.hold_log_for(node, Some(local.replica.applied_lsn()));
        let started = Instant::now();
        let held = self.held_segments(key, term, node).await;
        let replica = local.replica.clone();
        let export_path = path.clone();
        let info = blocking(move || replica.export_to(&export_path, &held))
            .await
            .map_err(|e| format!("export failed: {}", e.message))?;
        local.hold_log_for(node, Some(info.last.lsn));
        info!(
            shard = %key, node, last = %info.last, bytes = info.bytes, points = info.points,
            reused_rows = info.reused_rows, "sending an export"
        );
        let result = self
            .stream_export(local, term, node, transfer, &path, info.bytes, info.last)
            .await;
        let _ = tokio::fs::remove_file(&path).await;
        let last = result?;
        info!(
            shard = %key, node, last = %last, mb = info.bytes as f64 / 1e6, reused_rows = info.reused_rows,
            secs = started.elapsed().as_secs_f64(), "export imported"
        );
        Ok(last)
    }

    /// The sealed segments `node` holds of `key`, as its digests say; none
    /// when it does not answer with a bounded list (an older node, or one
    /// whose copies failed an import).
    async fn held_segments(&self, key: ShardRef, term: u64, node: u64) -> Vec<SegmentDigest> {
        match self
            .call(node, NodeOpV1::SealedDigests { shard: key, term }, DIGESTS_TIMEOUT)
            .await
        {
            Ok(NodeReplyV1::SealedDigests(held)) if held.len() <= MAX_SEALED_DIGESTS => {
                held.into_iter().map(SegmentDigest::from).collect()
            }
            Ok(other) => {
                debug!(shard = %key, node, reply = ?std::mem::discriminant(&other), "no usable segment digests; a whole export");
                Vec::new()
            }
            Err(e) => {
                debug!(shard = %key, node, error = %e.message, "no segment digests; a whole export");
                Vec::new()
            }
        }
    }

    /// The replica's side of [`NodeOpV1::SealedDigests`]: the digests of
    /// its sealed segments (at most [`MAX_SEALED_DIGESTS`], the oldest
    /// first), none while it is damaged or after an import found one of
    /// its copies different.
    pub async fn on_sealed_digests(
        &self,
        peer: u64,
        key: ShardRef,
        term: u64,
    ) -> Result<Vec<SegmentDigestV1>, WireError> {
        self.check_sender(peer, key, term).await?;
        let Some(local) = self.local(key) else {
            return Ok(Vec::new());
        };
        if !local.offer_digests.load(Ordering::Acquire)
            || local.damaged.lock().expect("damaged lock").is_some()
            || crate::faults::get().no_segment_digests
        {
            return Ok(Vec::new());
        }
        let replica = local.replica.clone();
        let mut held = blocking(move || replica.sealed_digests()).await?;
        held.truncate(MAX_SEALED_DIGESTS);
        Ok(held.into_iter().map(SegmentDigestV1::from).collect())
    }

    #[allow(clippy::too_many_arguments)]
    async fn stream_export(
        &self,
        local: &Arc<Local>,
        term: u64,
        node: u64,
        transfer: u64,
        path: &std::path::Path,
        total: u64,
        last: OpId,
    ) -> Result<OpId, String> {
        let key = local.key;
        let mut file = tokio::fs::File::open(path)
            .await
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let deadline = Instant::now() + TRANSFER_BUDGET;
        let mut offset = 0u64;
        let mut buf = vec![0u8; EXPORT_CHUNK_BYTES];
        while Instant::now() < deadline {
            if self.shutdown.is_cancelled() {
                return Err("shutting down".into());
            }
            let n = ((total - offset) as usize).min(EXPORT_CHUNK_BYTES);
            file.seek(std::io::SeekFrom::Start(offset))
                .await
                .map_err(|e| format!("{}: {e}", path.display()))?;
            file.read_exact(&mut buf[..n])
                .await
                .map_err(|e| format!("{}: {e}", path.display()))?;
            let chunk = ExportChunk {
                shard: key,
                term,
                transfer,
                offset,
                total,
                bytes: buf[..n].to_vec(),
                last,
            };
            let progress = match self.call(node, NodeOpV1::ExportChunk(chunk), CHUNK_TIMEOUT).await {
                Ok(NodeReplyV1::ExportProgress(p)) => p,
                Ok(other) => return Err(format!("unexpected reply {other:?}")),
                Err(e) if e.code == ErrorCode::Conflict => return Err(e.message),
                Err(e) => {
                    // The stream was cut or the node is slow: ask again
                    // from where it says it is.
                    tracing::debug!(shard = %key, node, error = %e.message, "export chunk not delivered; resuming");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            if let Some(imported) = progress.imported {
                return Ok(imported);
            }
            local.catch_ups.lock().expect("catch-up lock").insert(
                node,
                format!(
                    "receiving an export: {} of {} MB",
                    progress.received / 1_000_000,
                    total / 1_000_000
                ),
            );
            offset = progress.received.min(total);
        }
        Err(format!("export not transferred within {TRANSFER_BUDGET:?}"))
    }

    /// Receives one chunk of an export from `peer` (the primary).
    pub async fn on_export_chunk(&self, peer: u64, chunk: ExportChunk) -> Result<ExportProgress, WireError> {
        let key = chunk.shard;
        self.check_sender(peer, key, chunk.term).await?;
        let local = self.local_or_sync(key).await?;
        if chunk.bytes.len() > EXPORT_CHUNK_BYTES || chunk.offset.saturating_add(chunk.bytes.len() as u64) > chunk.total
        {
            return Err(WireError::new(
                ErrorCode::Malformed,
                format!(
                    "{key}: export chunk of {} bytes at {} overruns {}",
                    chunk.bytes.len(),
                    chunk.offset,
                    chunk.total
                ),
            ));
        }
        if let Some(mbit) = crate::faults::get().export_mbit {
            let bits = chunk.bytes.len() as f64 * 8.0;
            tokio::time::sleep(Duration::from_secs_f64(bits / (mbit as f64 * 1e6))).await;
        }
        // Serialised with replication messages of this replica.
        let mut view = local.backup.lock().await;
        let mut incoming = local.incoming.lock().await;
        let io = |e: std::io::Error, path: &std::path::Path| {
            WireError::new(ErrorCode::Internal, format!("{}: {e}", path.display()))
        };
        if incoming.as_ref().is_none_or(|i| i.transfer != chunk.transfer) {
            if let Some(old) = incoming.take() {
                let _ = tokio::fs::remove_file(&old.path).await;
            }
            let path = self.transfers.join(format!(
                "import-{}-{}-{:016x}",
                key.collection, key.shard, chunk.transfer
            ));
            let file = tokio::fs::File::create(&path).await.map_err(|e| io(e, &path))?;
            *incoming = Some(Incoming {
                transfer: chunk.transfer,
                path,
                file,
                received: 0,
            });
        }
        let inc = incoming.as_mut().expect("set above");
        if chunk.offset != inc.received {
            // Out of order (a resend after a cut): say where to resume.
            return Ok(ExportProgress {
                received: inc.received,
                imported: None,
            });
        }
        inc.file.write_all(&chunk.bytes).await.map_err(|e| io(e, &inc.path))?;
        inc.received += chunk.bytes.len() as u64;
        if inc.received < chunk.total {
            return Ok(ExportProgress {
                received: inc.received,
                imported: None,
            });
        }
        inc.file.sync_all().await.map_err(|e| io(e, &inc.path))?;
        let path = inc.path.clone();
        *incoming = None;
        let (engine, here) = (self.engine.clone(), local.clone());
        let spec = local.spec.clone();
        let file = path.clone();
        let imported = blocking(move || {
            engine.import_replica(spec, &file).inspect_err(|e| {
                if matches!(e, EngineError::ReusedSegmentDiffers { .. }) {
                    // A copy the export reused differs here: the next
                    // export must carry every row.
                    here.offer_digests.store(false, Ordering::Release);
                }
            })
        })
        .await;
        let _ = tokio::fs::remove_file(&path).await;
        let replica = imported?;
        let last = replica.last_op();
        if last != chunk.last {
            return Err(WireError::new(
                ErrorCode::Internal,
                format!(
                    "{key}: the imported export ends at {last}, the primary announced {}",
                    chunk.last
                ),
            ));
        }
        info!(shard = %key, last = %last, bytes = chunk.total, "replica rebuilt from the primary's export");
        let fresh = Local::new(key, local.spec.clone(), replica, None);
        {
            // The imported state is the primary's committed state at `last`.
            let mut v = fresh.backup.lock().await;
            v.term = chunk.term;
            v.verified = last.lsn;
            v.commit = view.commit.max(last.lsn);
        }
        view.verified = 0;
        self.replace_local(fresh);
        Ok(ExportProgress {
            received: chunk.total,
            imported: Some(last),
        })
    }
}
