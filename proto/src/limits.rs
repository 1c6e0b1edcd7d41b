//! Hard limits enforced on both sides of the wire.
//!
//! They bound memory per request: a peer can never make a node allocate more
//! than [`MAX_FRAME_BYTES`] for one message, whatever it claims.

/// Largest frame body accepted on a request or response stream.
pub const MAX_FRAME_BYTES: usize = 64 * 1024 * 1024;
/// Largest vector dimension of a collection.
pub const MAX_DIM: u32 = 4096;
/// Largest `k` of a search.
pub const MAX_K: u32 = 1024;
/// Most points in one upsert batch.
pub const MAX_BATCH_POINTS: usize = 10_000;
/// Most ids in one get or delete batch.
pub const MAX_BATCH_IDS: usize = 100_000;
/// Most query vectors in one batched search.
pub const MAX_QUERIES: usize = 1024;
/// Largest JSON payload of one point, in bytes.
pub const MAX_PAYLOAD_BYTES: usize = 64 * 1024;
/// Longest API token: the server checks a token from the first
/// [`crate::client::TOKEN_PREFIX_BYTES`] bytes of a request.
pub const MAX_TOKEN_BYTES: usize = 512;
/// Longest collection name.
pub const MAX_NAME_LEN: usize = 128;
/// Most shards of one collection.
pub const MAX_SHARDS: u32 = 256;
/// Bounds of a collection's seal size (rows of a growing segment).
pub const MIN_SEAL_ROWS: u32 = 64;
/// Upper bound of a collection's seal size.
pub const MAX_SEAL_ROWS: u32 = 4_000_000;
/// Seal size used when a create request does not name one.
pub const DEFAULT_SEAL_ROWS: u32 = 10_000;
/// Compaction: sealed segments of one size tier merged together.
pub const MERGE_FACTOR: u32 = 2;
/// Compaction: no merge the primary proposes makes a segment with more
/// live rows than this.
pub const MAX_MERGE_ROWS: u64 = 1_000_000;
/// Compaction: a sealed segment with this fraction of its rows deleted is
/// rewritten without them.
pub const MERGE_VACUUM_FRACTION: f64 = 0.3;
/// Compaction: a shard with no writes for this long merges its sealed
/// segments into one (see [`QUIET_MERGE_TAIL`]).
pub const QUIET_MERGE_AFTER_MS: u64 = 5_000;
/// Compaction: the quiet merge happens when the segments other than the
/// largest hold at least this fraction of its live rows, so that each one
/// grows the largest segment by a quarter or more and rebuilding it stays
/// a bounded multiple of the rows written.
pub const QUIET_MERGE_TAIL: f64 = 0.25;
/// Most rows a merged segment may have: a merge op that would make a
/// larger one is a no-op on every replica. Replicas must agree on it, so
/// it is never lowered.
pub const MAX_MERGED_ROWS: u64 = 2_000_000;
/// HNSW search expansion (`ef`) of a search that does not choose one.
pub const DEFAULT_SEARCH_EF: u32 = 64;
/// Largest HNSW search expansion (`ef`) a search may ask for.
pub const MAX_SEARCH_EF: u32 = 4096;
/// HNSW graph degree (`M`) of a collection that does not choose one.
pub const DEFAULT_HNSW_M: u32 = 16;
/// Bounds of a collection's HNSW graph degree.
pub const MIN_HNSW_M: u32 = 2;
pub const MAX_HNSW_M: u32 = 128;
/// HNSW `ef_construction` of a collection that does not choose one.
pub const DEFAULT_EF_CONSTRUCTION: u32 = 128;
/// Bounds of a collection's `ef_construction`.
pub const MIN_EF_CONSTRUCTION: u32 = 8;
pub const MAX_EF_CONSTRUCTION: u32 = 4096;

/// Largest policy plugin (WebAssembly module or component) a node takes.
pub const MAX_PLUGIN_BYTES: usize = 4 * 1024 * 1024;

/// Most `--param` pairs of a plugin deploy, and the longest key or value.
pub const MAX_PLUGIN_PARAMS: usize = 64;
pub const MAX_PLUGIN_PARAM_BYTES: usize = 1024;
