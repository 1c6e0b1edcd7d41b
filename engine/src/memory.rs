//! The process allocator's hold on freed memory (glibc on Linux).
//!
//! Index builds and merges allocate and free hundreds of megabytes in a
//! burst (the vectors of a sealed segment, a merge's chunks, the graphs
//! they replace). glibc's malloc keeps freed memory in its arenas for
//! reuse, one arena per thread that contended for a lock (up to 8 per
//! core), so after a few builds a node's resident memory stays well above
//! what it uses. Two measures, both no-ops elsewhere:
//! - [`limit_arenas`] at process start keeps one arena. With two, the
//!   large blocks (a sealed segment's vectors, 15 MB at 384 dimensions)
//!   landed in either, among the smaller allocations of writes and
//!   replication, and one node in each footprint run settled 10-35 MiB
//!   higher than the others, in free memory that `malloc_trim` could not
//!   return (pages shared with live allocations). With one, every node
//!   settles alike, and inserts took as long (BENCHMARKS.md, "Memory and
//!   disk per node"). Small allocations come from each thread's cache
//!   without taking the arena's lock;
//! - [`return_free_memory`] hands the free pages of every arena back to
//!   the OS (`malloc_trim`): after each background build or merge, and
//!   when the engine has opened its replicas (index loads read whole
//!   files and chunks of rows).
//!
//! Both were measured with `bench --mode footprint` (BENCHMARKS.md).

/// Arenas glibc's malloc may create ([`limit_arenas`]).
pub const MALLOC_ARENAS: i32 = 1;

/// Caps glibc's malloc at [`MALLOC_ARENAS`] arenas. Call it first thing in
/// `main`, before threads start. An `MALLOC_ARENA_MAX` set in the
/// environment wins.
pub fn limit_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt changes a setting of the allocator; called before
        // other threads exist, and any value is valid for it.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS);
        }
    }
}

/// Returns the free memory of the allocator's arenas to the OS.
pub fn return_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free pages; it takes the arena
    // locks like any allocation.
    unsafe {
        libc::malloc_trim(0);
    }
}
