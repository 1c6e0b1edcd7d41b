//! edgevec-engine: the storage and vector index of one node.
//!
//! An [`Engine`] holds every collection of the node under one data
//! directory. A collection is split into shards (`shard_of(id)`), and each
//! shard replica ([`ShardReplica`]) is the unit of storage and, later, of
//! replication: it applies [`ShardOp`]s in LSN order (1, 2, 3, ...), each
//! committed with fsync to the shard's own redb file before the call
//! returns.
//!
//! Inside a replica, rows go to a **growing** segment (brute-force search)
//! until it reaches the collection's `seal_rows`; it is then **sealed**
//! (immutable but for tombstones) and a background thread builds its HNSW
//! index (instant-distance), saves it atomically next to the shard file and
//! swaps it in. Searches merge the best `k` of every segment and shard.
//!
//! On disk (`dir` passed to [`Engine::open`]):
//!
//! ```text
//! catalog.redb                       collections: name → (id, spec), next id
//! collections/<id>/shard-<n>/
//!     shard.redb                     op log, rows, payloads, locations,
//!                                    tombstones, segments, applied LSN
//!     seg-<segment>.hnsw             index of a sealed segment
//! ```
//!
//! Everything persisted is versioned (`V1` envelopes, a versioned header on
//! index files). A restart after a crash at any instant restores every
//! acknowledged write (redb commits are atomic and durable; index files are
//! replaced by rename) and reloads saved indexes instead of rebuilding them.
//!
//! Modules: [`validate`] and [`plan`] hold the pure decisions; [`metric`]
//! the arithmetic and ordering; `store`, `catalog` and `hnsw` the I/O;
//! [`shard`], `collection` and [`engine`] the wiring.

mod builder;
mod catalog;
mod collection;
pub mod engine;
mod error;
pub mod fsutil;
mod hnsw;
pub mod metric;
mod op;
pub mod plan;
mod segment;
pub mod shard;
mod store;
pub mod validate;

pub use builder::IndexBuilder;
pub use engine::{Engine, EngineOptions};
pub use error::EngineError;
pub use hnsw::IndexParams;
pub use metric::Candidate;
pub use op::{OpRecord, ShardOp};
pub use plan::Location;
pub use shard::{ShardConfig, ShardReplica, OPLOG_RETAIN_OPS};
