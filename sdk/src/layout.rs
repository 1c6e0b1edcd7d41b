//! Where each value sits in the flat lists of the `edgevec:policy@1.0.0`
//! contract (wit/policy.wit documents each one). Shared by the node, which
//! fills the lists, and by plugins, which read them through
//! [`crate::Request`], [`crate::Replica`] and [`crate::ConsistencyRequest`].

/// The major version of the contract these layouts belong to.
pub const CONTRACT: &str = "edgevec:policy@1.0.0";

/// Most candidate replicas in one call.
pub const MAX_REPLICAS: usize = 16;

/// "Unknown" for zone ids and "never" for times.
pub const NONE: u64 = u64::MAX;

/// Load-balancer request.
pub mod request {
    pub const COLLECTION: usize = 0;
    pub const SHARD: usize = 1;
    pub const CLIENT_ZONE: usize = 2;
    pub const LEVEL: usize = 3;
    pub const DEADLINE_MS: usize = 4;
    pub const TRIED: usize = 5;
    pub const SEQUENCE: usize = 6;
    pub const WORDS: usize = 7;
}

/// Consistency-policy request.
pub mod consistency_request {
    pub const COLLECTION: usize = 0;
    pub const SHARD: usize = 1;
    pub const CLIENT_ZONE: usize = 2;
    pub const LEVEL: usize = 3;
    pub const BOUND_MS: usize = 4;
    pub const SESSION_TERM: usize = 5;
    pub const SESSION_LSN: usize = 6;
    pub const DEADLINE_MS: usize = 7;
    pub const WORDS: usize = 8;
}

/// One candidate replica.
pub mod replica {
    pub const NODE: usize = 0;
    pub const ZONE: usize = 1;
    pub const FLAGS: usize = 2;
    pub const STATE: usize = 3;
    pub const TERM: usize = 4;
    pub const APPLIED_TERM: usize = 5;
    pub const APPLIED_LSN: usize = 6;
    pub const REPORT_AGE_MS: usize = 7;
    pub const IN_FLIGHT: usize = 8;
    pub const LATENCY_US: usize = 9;
    pub const SINCE_SAMPLE_MS: usize = 10;
    pub const ERRORS: usize = 11;
    pub const WORDS: usize = 12;

    /// Bits of [`FLAGS`].
    pub const PRIMARY: u64 = 1;
    pub const EJECTED: u64 = 2;
    pub const SERVICEABLE: u64 = 4;
}

/// Level ids every configuration starts with, in this order.
pub const LEVELS: [&str; 4] = ["strong", "bounded", "session", "eventually"];
pub const STRONG: u32 = 0;
pub const BOUNDED: u32 = 1;
pub const SESSION: u32 = 2;
pub const EVENTUALLY: u32 = 3;
/// The level id of a read that named a deployed consistency plugin as its
/// level (`--consistency NAME[:N]`); the request's bound word carries `N`.
pub const CUSTOM: u32 = 4;
