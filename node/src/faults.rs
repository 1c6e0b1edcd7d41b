//! Fault-injection hooks, for tests of behaviour under lag and slowness
//! that cannot be produced on demand otherwise. Each is read once from
//! the node process's environment; none is set in normal operation, and a
//! node with any of them set says so in its log at start.
//!
//! - `EDGEVEC_FAULT_APPLY_DELAY_MS`: a backup makes committed ops
//!   searchable this much later than it learns they are committed (it
//!   still persists and acknowledges at once): a lagging replica.
//! - `EDGEVEC_FAULT_READ_DELAY_MS`: this node's replicas answer every
//!   read this much later: a slow node.

use std::sync::OnceLock;
use std::time::Duration;

/// The hooks in force in this process.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Faults {
    pub apply_delay: Option<Duration>,
    pub read_delay: Option<Duration>,
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
        read_delay: ms("EDGEVEC_FAULT_READ_DELAY_MS"),
    })
}

/// Logs the hooks in force, if any (at node start).
pub fn announce() {
    let f = get();
    if f != Faults::default() {
        tracing::warn!(?f, "fault injection is active on this node (test hooks)");
    }
}
