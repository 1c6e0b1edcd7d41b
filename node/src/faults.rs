//! Fault-injection hooks, for tests of behaviour under lag and slowness
//! that cannot be produced on demand otherwise. Each is read once from
//! the node process's environment; none is set in normal operation, and a
//! node with any of them set says so in its log at start.
//!
//! - `EDGEVEC_FAULT_APPLY_DELAY_MS`: a backup makes committed ops
//!   searchable this much later than it learns they are committed (it
//!   still persists and acknowledges at once): a lagging replica.
//! - `EDGEVEC_FAULT_REPLICATE_DELAY_MS`: a backup takes each message of
//!   ops from its primary this much later than it arrives (messages in
//!   parallel each wait their own delay): a distant backup, as a primary
//!   sees one across a slow link.
//! - `EDGEVEC_FAULT_REPLICATE_REFUSE_EVERY=N`: a backup answers every N-th
//!   message of ops "unavailable" without taking it: a message lost on
//!   the way, which the primary must send again.
//! - `EDGEVEC_FAULT_READ_DELAY_MS`: this node's replicas answer every
//!   read this much later: a slow node.
//! - `EDGEVEC_FAULT_REFUSE_READS=1`: this node's replicas answer every
//!   read "not caught up" at once: replicas that are alive but cannot serve.
//! - `EDGEVEC_FAULT_CLOCK_OFFSET_MS` (signed): this node's wall clock
//!   ([`wall_ms`]) is off by this much: a node whose time is not in sync.
//! - `EDGEVEC_FAULT_EXPORT_MBIT`: this node takes each chunk of an export
//!   it receives as late as a link of this many megabits per second would
//!   deliver it: an edge site behind a slow link.
//! - `EDGEVEC_FAULT_NO_SEGMENT_DIGESTS=1`: this node offers no sealed
//!   segments to the exports it receives, as a node of the version before
//!   does not: every export it gets carries every row.

use std::sync::OnceLock;
use std::time::Duration;

/// The hooks in force in this process.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Faults {
    pub apply_delay: Option<Duration>,
    pub replicate_delay: Option<Duration>,
    pub replicate_refuse_every: Option<u64>,
    pub read_delay: Option<Duration>,
    pub refuse_reads: bool,
    /// Added to this node's wall clock (ms).
    pub clock_offset_ms: i64,
    /// Megabits per second of the link exports arrive over.
    pub export_mbit: Option<u64>,
    pub no_segment_digests: bool,
}

fn ms(var: &str) -> Option<Duration> {
    let v = std::env::var(var).ok()?;
    match v.trim().parse::<u64>() {
        Ok(0) => None,
        Ok(ms) => Some(Duration::from_millis(ms)),
        Err(_) => {
            tracing::warn!(variable = var, value = %v, "fault hook ignored: not a whole number of ms");
            None
        }
    }
}

/// The hooks of this process (read on first use).
pub fn get() -> Faults {
    static FAULTS: OnceLock<Faults> = OnceLock::new();
    *FAULTS.get_or_init(|| Faults {
        apply_delay: ms("EDGEVEC_FAULT_APPLY_DELAY_MS"),
        replicate_delay: ms("EDGEVEC_FAULT_REPLICATE_DELAY_MS"),
        replicate_refuse_every: std::env::var("EDGEVEC_FAULT_REPLICATE_REFUSE_EVERY")
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|n| *n > 0),
        read_delay: ms("EDGEVEC_FAULT_READ_DELAY_MS"),
        refuse_reads: std::env::var("EDGEVEC_FAULT_REFUSE_READS").is_ok_and(|v| v == "1"),
        clock_offset_ms: signed_ms("EDGEVEC_FAULT_CLOCK_OFFSET_MS"),
        export_mbit: std::env::var("EDGEVEC_FAULT_EXPORT_MBIT")
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|n| *n > 0),
        no_segment_digests: std::env::var("EDGEVEC_FAULT_NO_SEGMENT_DIGESTS").is_ok_and(|v| v == "1"),
    })
}

fn signed_ms(var: &str) -> i64 {
    let Ok(v) = std::env::var(var) else { return 0 };
    v.trim().parse::<i64>().unwrap_or_else(|_| {
        tracing::warn!(variable = var, value = %v, "fault hook ignored: not a whole number of ms");
        0
    })
}

/// This node's wall clock in Unix ms (with the clock-offset hook, if set).
/// Every wall-clock reading of the node goes through here; nothing
/// compares it with another node's clock.
pub fn wall_ms() -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    now.saturating_add(get().clock_offset_ms).max(0) as u64
}

/// Logs the hooks in force, if any (at node start).
pub fn announce() {
    let f = get();
    if f != Faults::default() {
        tracing::warn!(?f, "fault injection is active on this node (test hooks)");
    }
}
