//! The process allocator's hold on freed memory (glibc on Linux).
//!
//! Index builds and merges allocate and free hundreds of megabytes in a
//! burst (the vectors of a sealed segment, a merge's chunks, the graphs
//! they replace). glibc's malloc keeps freed memory in its arenas for
//! reuse, one arena per thread that contended for a lock (up to 8 per
//! core), so after a few builds a node's resident memory stays well above
//! what it uses. Two measures, both no-ops elsewhere:
//! - [`limit_arenas`] at process start caps the arenas at two: the node's
//!   allocation-heavy work (builds, batches of writes) is not limited by
//!   allocator lock contention on the 2-8 cores of an edge board;
//! - [`return_free_memory`] hands the free pages of every arena back to
//!   the OS (`malloc_trim`): after each background build or merge, and
//!   when the engine has opened its replicas (index loads read whole
//!   files and chunks of rows).
//!
//! Both were measured with `bench --mode footprint` (BENCHMARKS.md).

/// Arenas glibc's malloc may create ([`limit_arenas`]).
pub const MALLOC_ARENAS: i32 = 2;

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
