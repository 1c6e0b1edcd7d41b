//! The process allocator's hold on freed memory (glibc on Linux).
//!
//! Index builds and merges allocate and free hundreds of megabytes in a
//! burst (the vectors of a sealed segment, a merge's chunks, the graphs
//! they replace). glibc's malloc keeps freed memory in its arenas for
//! reuse, one arena per thread that contended for a lock (up to 8 per
//! core), so after a few builds a node's resident memory stays well above
//! what it uses. Three measures, all no-ops elsewhere:
//! - [`configure_allocator`] at process start keeps one arena. With two,
//!   the large blocks (a sealed segment's vectors, 15 MB at 384 dimensions)
//!   landed in either, among the smaller allocations of writes and
//!   replication, and one node in each footprint run settled 10-35 MiB
//!   higher than the others, in free memory that `malloc_trim` could not
//!   return (pages shared with live allocations). With one, every node
//!   settles alike, and inserts took as long (BENCHMARKS.md, "Memory and
//!   disk per node"). Small allocations come from each thread's cache
//!   without taking the arena's lock;
//! - [`configure_allocator`] also fixes the size from which an
//!   allocation gets a mapping of its own ([`MMAP_THRESHOLD`]). glibc
//!   raises that size to the largest block freed so far (up to 32 MiB),
//!   so after the first sealed segment's vectors (5 MB at 10,000 × 128)
//!   are freed, later ones come from the heap, and a block freed in its
//!   middle stays resident until a `malloc_trim`. When points are written
//!   again faster than builds keep up, segments are sealed and dropped a
//!   few a second while the builder (and its trims) lag, and a node
//!   peaked at 3.3-4.1× the vectors it held, against 2.4-2.9× with the
//!   size fixed; at 384 dimensions inserts alone peaked at 1.45-1.50×
//!   instead of 1.80-1.89× (BENCHMARKS.md, "Disk and memory when every
//!   point is written again", "Memory and disk per node"). A batch of
//!   writes (1,000 × 128 dimensions: 0.5 MB) stays below it;
//! - [`return_free_memory`] hands the free pages of every arena back to
//!   the OS (`malloc_trim`): after each background build or merge, and
//!   when the engine has opened its replicas (index loads read whole
//!   files and chunks of rows).
//!
//! All were measured with `bench --mode footprint` (BENCHMARKS.md).

/// Arenas glibc's malloc may create ([`configure_allocator`]).
pub const MALLOC_ARENAS: i32 = 1;

/// Allocations of at least this many bytes get a mapping of their own,
/// returned to the OS when freed ([`configure_allocator`]).
pub const MMAP_THRESHOLD: i32 = 2 << 20;

/// Caps glibc's malloc at [`MALLOC_ARENAS`] arenas and fixes its
/// [`MMAP_THRESHOLD`]. Call it first thing in `main`, before threads
/// start. An `MALLOC_ARENA_MAX` or `MALLOC_MMAP_THRESHOLD_` set in the
/// environment wins.
pub fn configure_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt changes a setting of the allocator; called before
        // other threads exist, and any value is valid for it.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS);
        }
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
        // SAFETY: as above; a fixed threshold also stops glibc from
        // raising its trim threshold with it.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
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
