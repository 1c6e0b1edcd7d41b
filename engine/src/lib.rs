//! edgevec-engine: the storage layer of a node's shard replicas.
//!
//! An [`Engine`] is the registry of the shard replicas one node holds,
//! each named by a [`ReplicaKey`] (the collection's stable cluster-wide id
//! and the shard) and opened, created and dropped one at a time. What to
//! hold, log and apply is decided by the node's replication layer
//! (primary-backup, PacificA; see REPLICATION.md); the engine gives each
//! [`ShardReplica`] the two halves that protocol needs:
//!
//! - an **op log**: [`ShardOp`]s with op ids `(term, lsn)`, appended only
//!   right after the exact previous op id and fsynced before the call
//!   returns, with a durable term and term history; an unapplied suffix
//!   can be truncated; old applied ops are dropped by byte budget;
//! - the **applied state**: ops are made searchable only by
//!   [`ShardReplica::apply_through`], up to an LSN the caller knows is
//!   committed. Searches, gets and infos see applied ops only.
//!
//! Inside a replica, rows go to a **growing** segment (brute-force search)
//! until it reaches the collection's `seal_rows`; it is then **sealed**
//! (immutable but for tombstones) and a background thread builds its HNSW
//! index (usearch), saves it atomically next to the shard file and
//! swaps it in. [`search_replicas`] merges the best `k` of several
//! replicas.
//!
//! On disk (`dir` passed to [`Engine::open`]), layout 2:
//!
//! ```text
//! LAYOUT                             "edgevec-engine layout 2\n", written first
//! replicas.redb                      registry: ReplicaKey → spec (versioned)
//! replicas/<collection>-<shard>/
//!     shard.redb                     op log (term, op), term, term history,
//!                                    applied LSN, rows, payloads, locations,
//!                                    tombstones, segments
//!     seg-<segment>.hnsw             index of a sealed segment
//! replicas/<collection>-<shard>.import.tmp/, .import/
//!                                    an import being written / complete
//! trash/<name>-<unix seconds>        leftover replica directories, moved
//!                                    aside for a person to delete
//! damaged/<name>-<unix seconds>      replicas whose files failed to open,
//!                                    kept as found
//! ```
//!
//! A replica too far behind for the op log is rebuilt from an **export**
//! ([`ShardReplica::export_to`], [`Engine::import_replica`], module
//! `export`): the applied state at one LSN in a versioned, checksummed
//! file, installed by swapping directories.
//!
//! The single-node layout 1 (`catalog.redb`, `collections/`) is refused,
//! untouched. Everything persisted is versioned (envelopes, a versioned
//! header on index files). A restart after a crash at any instant restores
//! every fsynced log entry, term and applied op (redb commits are atomic
//! and durable; index files are replaced by rename) and reloads saved
//! indexes instead of rebuilding them.
//!
//! Modules: [`validate`], [`plan`], `oplog` and [`split`] hold the pure
//! decisions; [`metric`] the arithmetic and ordering; `store`, `registry`,
//! `layout`, `export` and `hnsw` the I/O; [`shard`], `search` and [`engine`] the
//! wiring. [`rowfile`] is the row-addressable file of a sealed segment's
//! rows that the store is to keep those rows in (not used by it yet).

mod builder;
pub mod compaction;
pub mod engine;
mod error;
mod export;
pub mod fsutil;
mod hnsw;
mod idmap;
mod layout;
pub mod memory;
pub mod metric;
mod op;
mod oplog;
pub mod payload;
pub mod plan;
mod registry;
pub mod rowfile;
mod search;
mod segment;
pub mod shard;
pub mod split;
mod store;
#[cfg(test)]
mod testutil;
pub mod validate;

pub use builder::{lower_priority, IndexBuilder};
pub use engine::{Damage, Engine, EngineOptions, ReplicaKey, ReplicaSpec};
pub use error::EngineError;
pub use export::{ExportInfo, EXPORT_FORMAT};
pub use hnsw::{kernels, SearchOptions};
pub use metric::Candidate;
pub use op::{OpRecord, ShardOp};
pub use plan::Location;
pub use search::search_replicas;
pub use shard::{
    retain_budget, LogStatus, ShardConfig, ShardReplica, OPLOG_HOLD_BYTES, OPLOG_RETAIN_BYTES, OPLOG_RETAIN_MIN_BYTES,
    OPLOG_RETAIN_PERCENT,
};
pub use split::{by_shard, last_wins};
pub use store::SegmentDigest;
