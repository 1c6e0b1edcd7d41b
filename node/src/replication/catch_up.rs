//! Catch-up of replicas outside the in-sync set, run by their primary
//! (REPLICATION.md, "Catch-up").
//!
//! For every replica of its configuration that is not in sync and whose
//! node is up, the primary runs one catch-up task: it streams its op log
//! in bounded batches from where the logs diverge, or sends an export of
//! the shard when the log no longer reaches back (`transfer`), then closes
//! the last gap under the primary lock and adds the replica to the in-sync
//! set by CAS — so no write can slip between "it holds everything" and "it
//! is in the ack set". A replica is a joiner of the ack set from the moment
//! that CAS is proposed until a newer committed configuration says whether
//! it is in.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgevec_meta::ShardConfig;
use tracing::{debug, info, warn};

use super::primary::SendError;
use super::{DataPlane, Local};

impl DataPlane {
    /// Starts a catch-up for every replica of `cfg` that is not in sync
    /// and has none running.
    pub(super) fn start_catch_ups(self: &Arc<Self>, local: &Arc<Local>, cfg: &ShardConfig) {
        let state = self.meta.state();
        let in_sync: BTreeSet<u64> = cfg.in_sync().into_iter().collect();
        for r in &cfg.replicas {
            if in_sync.contains(&r.node) || r.node == self.me {
                continue;
            }
            let up = state
                .node(r.node)
                .is_some_and(|n| n.state == edgevec_meta::NodeState::Up);
            if !up {
                continue;
            }
            {
                let mut running = local.catch_ups.lock().expect("catch-up lock");
                if running.contains_key(&r.node) {
                    continue;
                }
                running.insert(r.node, "starting".into());
            }
            let (this, local, node, term) = (self.clone(), local.clone(), r.node, cfg.term);
            self.tasks.spawn(async move {
                this.catch_up(&local, node, term).await;
                local.catch_ups.lock().expect("catch-up lock").remove(&node);
                if !this
                    .config_of(local.key)
                    .is_some_and(|(c, _)| c.in_sync().contains(&node))
                {
                    local.hold_log_for(node, None);
                }
            });
        }
    }

    /// Brings `node` up to this log, then adds it to the in-sync set: the
    /// last stretch and the CAS happen under the primary lock, so no write
    /// can slip between "it holds everything" and "it is in the ack set".
    async fn catch_up(&self, local: &Arc<Local>, node: u64, term: u64) {
        let key = local.key;
        let mut next = local.replica.last_op().lsn + 1;
        let started = Instant::now();
        let from = local.replica.last_op().lsn;
        // Failed exports back off (a full disk on the other side would
        // otherwise cost an export a second).
        let mut export_backoff = Duration::from_secs(1);
        for round in 0..1000u32 {
            if self.shutdown.is_cancelled() {
                return;
            }
            let Some((cfg, replication)) = self.config_of(key) else {
                return;
            };
            if cfg.term != term || cfg.primary != Some(self.me) || cfg.replica(node).is_none() {
                return;
            }
            if cfg.in_sync().contains(&node) {
                return;
            }
            self.set_progress(
                local,
                node,
                format!("catching up: sent through LSN {}", next.saturating_sub(1)),
            );
            match self.bring_up_to(local, term, node, &mut next, &[], (None, false)).await {
                Ok(_) => {}
                Err(SendError::NeedsExport(why)) => {
                    info!(shard = %key, node, reason = %why, "catching up through an export");
                    self.set_progress(local, node, "exporting the shard".into());
                    match self.send_export(local, term, node).await {
                        Ok(last) => next = last.lsn + 1,
                        Err(e) => {
                            warn!(shard = %key, node, error = %e, retry_in = ?export_backoff, "export transfer failed");
                            self.set_progress(
                                local,
                                node,
                                format!("export failed, retrying in {export_backoff:?}: {e}"),
                            );
                            tokio::select! {
                                _ = self.shutdown.cancelled() => return,
                                _ = tokio::time::sleep(export_backoff) => {}
                            }
                            export_backoff = (export_backoff * 2).min(Duration::from_secs(60));
                        }
                    }
                    continue;
                }
                Err(e) => {
                    let e = e.message();
                    debug!(shard = %key, node, round, error = %e, "catch-up round failed");
                    self.set_progress(local, node, format!("waiting to retry: {e}"));
                    tokio::select! {
                        _ = self.shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                    continue;
                }
            }
            // Close the gap under the lock and join.
            let mut guard = local.primary.lock().await;
            let Some(p) = guard.as_mut().filter(|p| p.term == term) else {
                return;
            };
            let Some((cfg, _)) = self.config_of(key) else { return };
            // Batches in flight took their LSNs before this replica joins
            // their ack set: it must hold them too, so the last stretch
            // runs to the last LSN given out, once it is in the log here.
            if !p.appended.clone().wait().await {
                return;
            }
            let acked = Some(next.saturating_sub(1));
            if let Err(e) = self.bring_up_to(local, term, node, &mut next, &[], (acked, true)).await {
                debug!(shard = %key, node, error = %e.message(), "catch-up final step failed");
                continue;
            }
            p.joiners.insert(node, cfg.version);
            p.next.insert(node, next);
            let joined = edgevec_meta::add_to_in_sync(&cfg, node, replication.min_insync);
            match self.cas(key, cfg.version, joined).await {
                Ok(true) => {
                    let done = local.replica.last_op().lsn;
                    info!(
                        shard = %key, node, ops = done.saturating_sub(from), secs = started.elapsed().as_secs_f64(),
                        "replica caught up and joined the in-sync set"
                    );
                    return;
                }
                Ok(false) => debug!(shard = %key, node, "in-sync CAS lost to another change; retrying"),
                Err(e) => debug!(shard = %key, node, error = %e.message, "in-sync CAS not confirmed; retrying"),
            }
        }
    }

    pub(super) fn set_progress(&self, local: &Local, node: u64, text: String) {
        local.catch_ups.lock().expect("catch-up lock").insert(node, text);
    }
}
