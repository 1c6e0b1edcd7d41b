//! Reads of a local replica with a consistency requirement
//! ([`ReadRequirement`]), enforced here by the serving replica
//! (ARCHITECTURE.md, "Reads"; REPLICATION.md, "Reads that need the
//! primary").
//!
//! - Every read needs a **serviceable** replica: not damaged, not
//!   receiving an export, and reached by its primary since it opened (so
//!   it knows how far it may be read).
//! - `min_lsn` (a session token, with any requirement): waits until the
//!   replica has applied that LSN. Only committed ops are ever applied,
//!   and committed ops form one history, so any replica that applied it
//!   holds the op the token names.
//! - `ReadIndex`: only the ready primary of the current term serves, after
//!   a **round** over its ack set that started after the read arrived
//!   (every member confirms the term is current, as a write's replication
//!   does; a lone primary confirms through the metadata Raft), at the
//!   commit LSN of that round.
//! - `MaxStaleness(ms)`: the replica needs a round that started at most
//!   `ms` ago **on its own clock**: at the primary its own rounds; at a
//!   backup, a [`NodeOpV1::CommitPoint`] exchange it starts with the
//!   primary of the term it knows (the primary answers after a round that
//!   started once the question arrived, so the answer holds for the moment
//!   the backup asked). It then waits to have applied that round's LSN.
//!   No clocks are compared across machines; a deposed primary cannot
//!   answer (its round fails), and an older term is refused.
//!
//! Invariant: a round record `(started, lsn)` is made only by a round that
//! confirmed, at a moment after `started`, that `lsn` was the commit point
//! of the current term: every op committed before `started` has an LSN
//! ≤ `lsn`. A replica that applied `lsn` is therefore at most
//! `started.elapsed()` stale, and for a read that arrived before
//! `started`, linearizable.

use std::sync::Arc;
use std::time::{Duration, Instant};

use edgevec_proto::internal::{NodeOpV1, NodeReplyV1};
use edgevec_proto::replication::{ReadRequirement, ShardRead, ShardReadAt, ShardReadAtReply, ShardRef};
use edgevec_proto::{ErrorCode, Hit, OpId, SearchParams, WireError};

use super::{unavailable, DataPlane, Local};

/// Longest a replica waits for one read's requirement.
pub const MAX_READ_BUDGET: Duration = Duration::from_secs(30);
/// Deadline of a background refresh of a replica's safe point.
const REFRESH_WITHIN: Duration = Duration::from_secs(5);

pub(crate) fn not_caught_up(msg: impl Into<String>) -> WireError {
    WireError::new(ErrorCode::NotCaughtUp, msg)
}

/// How much later than its proxy's usual delivery a read may arrive
/// beyond the time the proxy still waits for it (jitter, scheduling).
const EXPIRY_SLACK_MS: i64 = 500;
/// A proxy's usual delivery is the fastest seen over the last one to two
/// of these periods (a proxy's clock that steps back looks late for at
/// most two periods).
const DELIVERY_WINDOW: Duration = Duration::from_secs(30);

/// Per proxy node: the smallest `arrival − sent` seen lately, each side
/// on its own wall clock: the clocks' offset plus the fastest delivery.
/// A read whose `arrival − sent` exceeds that by more than the time its
/// proxy still waits was queued here (a paused or starved node) and is
/// dropped. No clock is compared with another; offsets of any size work.
#[derive(Default)]
pub struct Arrivals {
    by_proxy: std::sync::Mutex<std::collections::HashMap<u64, Fastest>>,
}

struct Fastest {
    current: i64,
    previous: i64,
    since: Instant,
}

impl Arrivals {
    /// Records a read from `proxy` sent at `sent` (its clock) that
    /// arrived at `arrived` (ours); how much later than the fastest
    /// delivery lately it arrived (ms).
    pub fn late_by(&self, proxy: u64, sent: u64, arrived: u64) -> i64 {
        let sample = arrived as i64 - sent as i64;
        let now = Instant::now();
        let mut by = self.by_proxy.lock().expect("arrivals lock");
        let f = by.entry(proxy).or_insert(Fastest {
            current: sample,
            previous: sample,
            since: now,
        });
        if now.duration_since(f.since) >= DELIVERY_WINDOW {
            f.previous = f.current;
            f.current = sample;
            f.since = now;
        }
        f.current = f.current.min(sample);
        sample - f.current.min(f.previous)
    }
}

/// The last confirmed round of a replica, and the turn that serialises
/// new ones (concurrent readers share one round).
#[derive(Default)]
pub struct Rounds {
    last: std::sync::Mutex<Option<(Instant, u64)>>,
    pub(super) turn: Arc<tokio::sync::Mutex<()>>,
}

impl Rounds {
    /// The LSN of the newest round that started at or after `not_before`.
    pub fn since(&self, not_before: Instant) -> Option<u64> {
        let last = *self.last.lock().expect("rounds lock");
        last.filter(|(started, _)| *started >= not_before).map(|(_, lsn)| lsn)
    }

    /// Records a round (keeps the one that started last).
    pub fn record(&self, started: Instant, lsn: u64) {
        let mut last = self.last.lock().expect("rounds lock");
        if last.is_none_or(|(s, l)| started > s || (started == s && lsn > l)) {
            *last = Some((started, lsn));
        }
    }

    /// How long ago the newest round started.
    pub fn age(&self) -> Option<Duration> {
        self.last.lock().expect("rounds lock").map(|(s, _)| s.elapsed())
    }
}

impl DataPlane {
    /// Serves `req`, sent by node `proxy`, from this node's replica once
    /// its requirement holds.
    pub async fn read_at(&self, proxy: u64, req: ShardReadAt) -> Result<ShardReadAtReply, WireError> {
        if proxy != self.me {
            let late = self.arrivals.late_by(proxy, req.sent_unix_ms, crate::faults::wall_ms());
            if late > i64::from(req.ttl_ms) + EXPIRY_SLACK_MS {
                return Err(WireError::new(
                    ErrorCode::Timeout,
                    format!(
                        "node {}: a read from node {proxy} was taken up {late} ms after it would usually \
                         arrive, past the {} ms its proxy waits; dropped",
                        self.me, req.ttl_ms
                    ),
                ));
            }
        }
        if crate::faults::get().refuse_reads {
            return Err(not_caught_up(format!(
                "node {}: refusing every read (fault hook)",
                self.me
            )));
        }
        let budget = Duration::from_millis(u64::from(req.budget_ms)).min(MAX_READ_BUDGET);
        let deadline = Instant::now() + budget;
        let key = req.read.shard();
        let local = self
            .local(key)
            .ok_or_else(|| unavailable(format!("node {} holds no replica of {key}", self.me)))?;
        self.check_serviceable(&local).await?;
        if req.min_lsn > 0 {
            self.wait_for_lsn(&local, req.min_lsn, deadline, "the session's op")
                .await?;
        }
        match req.requirement {
            ReadRequirement::None => {}
            ReadRequirement::ReadIndex => {
                let lsn = self.confirmed_commit(&local, Instant::now(), deadline).await?;
                self.wait_for_lsn(&local, lsn, deadline, "the commit point").await?;
            }
            ReadRequirement::MaxStaleness { ms } => {
                let now = Instant::now();
                let not_before = now.checked_sub(Duration::from_millis(ms)).unwrap_or(now);
                let lsn = self.safe_point(&local, not_before, deadline).await?;
                self.wait_for_lsn(&local, lsn, deadline, "its primary's recent commit point")
                    .await?;
                // Ask again ahead of time, so steady reads never wait and
                // the bound outlives a short failover of the primary.
                if local.rounds.age().is_some_and(|a| a.as_millis() as u64 > ms / 4) {
                    if let Some(this) = self.this.upgrade() {
                        let local = local.clone();
                        self.tasks.spawn(async move {
                            let now = Instant::now();
                            let soon = now + REFRESH_WITHIN;
                            let _ = this.safe_point(&local, now, soon).await;
                        });
                    }
                }
            }
        }
        let served = {
            let applied = local.gate.borrow().applied;
            local.replica.op_id_at(applied).unwrap_or(OpId::ZERO)
        };
        if let Some(slow) = crate::faults::get().read_delay {
            tokio::time::sleep(slow).await;
        }
        let reply = self.serve(&local, req.read).await?;
        Ok(ShardReadAtReply { reply, served })
    }

    /// Refuses a read of a replica that cannot serve any: damaged,
    /// receiving an export, or not reached by its primary since it opened.
    async fn check_serviceable(&self, local: &Local) -> Result<(), WireError> {
        if let Some(why) = local.damaged.lock().expect("damaged lock").clone() {
            return Err(unavailable(format!(
                "replica of {} on node {} is damaged: {why}",
                local.key, self.me
            )));
        }
        if local.incoming.try_lock().map(|i| i.is_some()).unwrap_or(true) {
            return Err(not_caught_up(format!(
                "replica of {} on node {} is receiving an export; not serviceable",
                local.key, self.me
            )));
        }
        if local.gate.borrow().target.is_none() {
            return Err(not_caught_up(format!(
                "replica of {} on node {} has not heard from its primary since it opened; not serviceable",
                local.key, self.me
            )));
        }
        Ok(())
    }

    /// Waits until `local` has applied `lsn`, at most until `deadline`.
    async fn wait_for_lsn(&self, local: &Local, lsn: u64, deadline: Instant, what: &str) -> Result<(), WireError> {
        let mut rx = local.gate.subscribe();
        let reached = |g: &super::ApplyGate| g.applied >= lsn;
        if reached(&rx.borrow_and_update()) {
            return Ok(());
        }
        let wait = tokio::time::timeout_at(deadline.into(), rx.wait_for(reached)).await;
        if let Ok(Ok(_)) = wait {
            return Ok(());
        }
        let applied = local.gate.borrow().applied;
        Err(not_caught_up(format!(
            "replica of {} on node {} has applied through LSN {applied}, not yet {what} (LSN {lsn})",
            local.key, self.me
        )))
    }

    /// The commit LSN of a round that started at or after `not_before`:
    /// this node's own round when it is the primary, else one asked of the
    /// primary of the term this node knows.
    async fn safe_point(&self, local: &Arc<Local>, not_before: Instant, deadline: Instant) -> Result<u64, WireError> {
        if let Some(lsn) = local.rounds.since(not_before) {
            return Ok(lsn);
        }
        let key = local.key;
        // One exchange at a time per replica; a reader whose deadline comes
        // first stops waiting for its turn.
        let Ok(turn) = tokio::time::timeout_at(deadline.into(), local.rounds.turn.clone().lock_owned()).await else {
            return Err(not_caught_up(format!(
                "replica of {key} on node {} is still confirming its staleness with its primary",
                self.me
            )));
        };
        if let Some(lsn) = local.rounds.since(not_before) {
            return Ok(lsn);
        }
        // The configuration as of now: the primary may have changed while
        // this reader waited.
        let (cfg, _) = self
            .config_of(key)
            .ok_or_else(|| unavailable(format!("{key} is not in the metadata of node {}", self.me)))?;
        let primary = cfg
            .primary
            .ok_or_else(|| not_caught_up(format!("{key} has no primary (failing over)")))?;
        if primary == self.me {
            // Its own round takes the turn.
            drop(turn);
            return self.confirmed_commit(local, not_before, deadline).await;
        }
        let started = Instant::now();
        let left = deadline.saturating_duration_since(started);
        let op = NodeOpV1::CommitPoint {
            shard: key,
            term: cfg.term,
        };
        match self.call(primary, op, left.max(Duration::from_millis(1))).await {
            Ok(NodeReplyV1::CommitPoint { lsn }) => {
                // The primary's round also told this replica (when it is in
                // the ack set) the commit point: it applies up to it.
                local.rounds.record(started, lsn);
                Ok(lsn)
            }
            Ok(other) => Err(WireError::new(
                ErrorCode::Internal,
                format!("node {primary} answered a commit-point request with {other:?}"),
            )),
            Err(e) => Err(not_caught_up(format!(
                "replica of {key} on node {} could not confirm its staleness with primary {primary}: {}",
                self.me, e.message
            ))),
        }
    }

    /// The primary's side of [`NodeOpV1::CommitPoint`]: refused unless
    /// this node is the ready primary of `term`.
    pub async fn commit_point(&self, key: ShardRef, term: u64) -> Result<u64, WireError> {
        let local = self
            .local(key)
            .ok_or_else(|| unavailable(format!("node {} holds no replica of {key}", self.me)))?;
        let (cfg, _) = self
            .config_of(key)
            .ok_or_else(|| unavailable(format!("{key} is not in the metadata of node {}", self.me)))?;
        if cfg.term != term || cfg.primary != Some(self.me) {
            return Err(WireError::new(
                ErrorCode::Conflict,
                format!(
                    "node {} is not the primary of {key} in term {term} (its metadata says term {})",
                    self.me, cfg.term
                ),
            ));
        }
        let now = Instant::now();
        self.confirmed_commit(&local, now, now + super::REPLICATE_TIMEOUT * 2)
            .await
    }

    /// Searches the local replica (the proxy validated the queries; the
    /// parameters are checked again, as everything read from the network).
    async fn search(
        &self,
        local: &Arc<Local>,
        queries: Vec<Vec<f32>>,
        k: u32,
        with_payload: bool,
        params: SearchParams,
        filter: Option<String>,
    ) -> Result<edgevec_proto::replication::ShardReadReply, WireError> {
        let opts = edgevec_engine::validate::search_params(&params).map_err(|e| e.to_wire())?;
        let filter = filter.as_deref().map(parse_filter).transpose()?;
        let metric = local.spec.metric;
        let replica = local.replica.clone();
        let hits: Vec<Vec<Hit>> = super::blocking(move || {
            edgevec_engine::search_replicas(&[replica], metric, &queries, k, with_payload, opts, filter.as_ref())
        })
        .await?;
        Ok(edgevec_proto::replication::ShardReadReply::Hits(hits))
    }

    /// Serves a read whose requirement holds.
    pub(super) async fn serve(
        &self,
        local: &Arc<Local>,
        read: ShardRead,
    ) -> Result<edgevec_proto::replication::ShardReadReply, WireError> {
        use edgevec_proto::replication::ShardReadReply;
        match read {
            ShardRead::Search {
                queries,
                k,
                with_payload,
                ..
            } => {
                self.search(local, queries, k, with_payload, SearchParams::default(), None)
                    .await
            }
            ShardRead::SearchV2 {
                queries,
                k,
                with_payload,
                params,
                ..
            } => self.search(local, queries, k, with_payload, params, None).await,
            ShardRead::SearchV3 {
                queries,
                k,
                with_payload,
                params,
                filter,
                ..
            } => self.search(local, queries, k, with_payload, params, Some(filter)).await,
            ShardRead::Get { ids, .. } => {
                let replica = local.replica.clone();
                let found = super::blocking(move || replica.get(&ids)).await?;
                Ok(ShardReadReply::Points(found.into_iter().flatten().collect()))
            }
            ShardRead::Status { .. } => Ok(ShardReadReply::Status(local.report(self.me))),
            ShardRead::StatusV2 { shard } => Ok(ShardReadReply::StatusV2 {
                report: local.report(self.me),
                builds: local
                    .replica
                    .index_builds()
                    .into_iter()
                    .map(|(segment, rows_indexed, rows)| edgevec_proto::IndexBuild {
                        shard: shard.shard,
                        segment,
                        rows_indexed,
                        rows,
                    })
                    .collect(),
            }),
            ShardRead::Count { filter, .. } => {
                let filter = filter.as_deref().map(parse_filter).transpose()?;
                let replica = local.replica.clone();
                let count = super::blocking(move || match &filter {
                    Some(f) => replica.count(f),
                    None => Ok(replica.info().0.points),
                })
                .await?;
                Ok(ShardReadReply::Count(count))
            }
            ShardRead::Ids {
                filter, after, limit, ..
            } => {
                let filter = parse_filter(&filter)?;
                let limit = limit.clamp(1, edgevec_proto::limits::MAX_BATCH_IDS as u32) as usize;
                let replica = local.replica.clone();
                let ids = super::blocking(move || replica.ids_matching(&filter)).await?;
                let from = after.map_or(0, |a| ids.partition_point(|id| *id <= a));
                Ok(ShardReadReply::Ids(ids[from..].iter().take(limit).copied().collect()))
            }
        }
    }
}

/// Reads a filter sent as JSON, with the filter language's bounds; a bad
/// one is the caller's error, naming where in the JSON it is wrong.
pub fn parse_filter(json: &str) -> Result<edgevec_proto::Filter, WireError> {
    edgevec_proto::Filter::parse(json).map_err(|e| WireError::invalid("filter", e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::Arrivals;

    #[test]
    fn lateness_is_measured_against_each_proxys_own_fastest_delivery() {
        let a = Arrivals::default();
        // Proxy 2's clock is 8 s behind ours, proxy 3's 8 s ahead: both
        // are on time when they arrive as fast as usual.
        assert_eq!(a.late_by(2, 1_000, 9_005), 0);
        assert_eq!(a.late_by(3, 20_000, 12_004), 0);
        assert_eq!(a.late_by(2, 2_000, 10_007), 2);
        assert_eq!(a.late_by(3, 21_000, 13_001), 0);
        // A faster delivery lowers the baseline.
        assert_eq!(a.late_by(2, 3_000, 11_003), 0);
        // A read queued behind a 4 s pause is 4 s late.
        assert_eq!(a.late_by(2, 4_000, 16_003), 4_000);
        // Which does not move the baseline of the other proxy.
        assert_eq!(a.late_by(3, 22_000, 14_001), 0);
    }
}
