//! The background index builder: one dedicated thread fed by a channel.
//!
//! Sealing a segment must not make the write that sealed it wait for an
//! HNSW build (seconds for large segments), so shards hand builds to this
//! thread and return. A build adds rows to the usearch graph in parallel
//! (rayon); builds run inside the builder's *own* rayon pool, never the
//! global one, because a build keeps every worker of its pool busy for
//! seconds and searches (which use the global pool) must not queue behind
//! it.
//!
//! Build threads run at a lower OS priority ([`BUILD_NICE`]): with as many
//! build threads as cores, a build would otherwise take the CPU from the
//! metadata Raft's heartbeats and the replication RPCs, which have deadlines
//! of tens of milliseconds. At nice 10 the scheduler gives the node's other
//! threads about nine parts in ten of a contended core; builds use what is
//! left.
//!
//! A job is an opaque closure (the shard decides what building means:
//! build, save the file, install in memory). The builder owns only the
//! queue, a count of jobs not finished yet — so [`IndexBuilder::wait_idle`]
//! can tell tests and benchmarks when every queued index is in place — and
//! shutdown: jobs still queued at shutdown are dropped (a restart finds
//! their segments without an index file and queues them again), and the
//! running one gets [`SHUTDOWN_WAIT`] to finish; a build still running then
//! is abandoned (its thread detached, the build lost: it is queued again
//! at the next open), so a node stops within seconds even in the middle of
//! a build of minutes. Jobs check their shard's `retired` flag before
//! writing, and the engine retires every replica before it shuts the
//! builder down, so an abandoned build never writes into the data
//! directory.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

type Job = Box<dyn FnOnce() + Send + 'static>;

/// The nice value of build threads (Linux: per thread).
pub const BUILD_NICE: i32 = 10;

/// Lowers the calling thread's scheduling priority to [`BUILD_NICE`]. On
/// Linux `setpriority(PRIO_PROCESS, tid)` affects that thread only; a
/// failure (not permitted, another OS) leaves it as it was. Also used for
/// other background compile work of the node (policy plugins).
pub fn lower_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: plain syscalls on the calling thread; no memory is shared.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        if libc::setpriority(libc::PRIO_PROCESS, tid, BUILD_NICE) != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "index build threads keep their priority");
        }
    }
}

/// The nice value of the calling thread (tests).
#[cfg(all(test, target_os = "linux"))]
fn current_nice() -> i32 {
    // SAFETY: as in `lower_priority`.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::getpriority(libc::PRIO_PROCESS, tid)
    }
}

/// How long shutdown waits for a running build before abandoning it.
pub const SHUTDOWN_WAIT: Duration = Duration::from_secs(2);

struct Shared {
    pending: Mutex<usize>,
    /// Jobs run to their end, and the seconds they took in all.
    done: Mutex<(u64, f64)>,
    idle: Condvar,
    stopping: AtomicBool,
}

pub struct IndexBuilder {
    tx: Mutex<Option<Sender<Job>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    shared: Arc<Shared>,
}

impl IndexBuilder {
    pub fn start() -> IndexBuilder {
        let (tx, rx) = mpsc::channel::<Job>();
        let shared = Arc::new(Shared {
            pending: Mutex::new(0),
            done: Mutex::new((0, 0.0)),
            idle: Condvar::new(),
            stopping: AtomicBool::new(false),
        });
        let worker = shared.clone();
        let pool = rayon::ThreadPoolBuilder::new()
            .thread_name(|i| format!("edgevec-index-{i}"))
            .start_handler(|_| lower_priority())
            .build()
            .expect("index build thread pool starts");
        let thread = std::thread::Builder::new()
            .name("edgevec-index-builder".into())
            .spawn(move || {
                lower_priority();
                for job in rx {
                    if !worker.stopping.load(Ordering::Acquire) {
                        // A panicking build must not take the builder down
                        // with it; the segment stays searchable by brute
                        // force and is rebuilt at the next open.
                        let started = Instant::now();
                        let run = std::panic::AssertUnwindSafe(|| pool.install(job));
                        if std::panic::catch_unwind(run).is_err() {
                            tracing::error!("index build panicked; segment stays on brute force");
                        }
                        // A build frees its working memory in a burst.
                        crate::memory::return_free_memory();
                        let mut done = worker.done.lock().expect("builder lock");
                        done.0 += 1;
                        done.1 += started.elapsed().as_secs_f64();
                    }
                    let mut pending = worker.pending.lock().expect("builder lock");
                    *pending -= 1;
                    worker.idle.notify_all();
                }
            })
            .expect("spawn index builder thread");
        IndexBuilder {
            tx: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
            shared,
        }
    }

    /// Queues a job; never blocks on the build.
    pub fn submit(&self, job: impl FnOnce() + Send + 'static) {
        let tx = self.tx.lock().expect("builder lock");
        let Some(tx) = tx.as_ref() else {
            return; // shutting down: the next open rebuilds
        };
        *self.shared.pending.lock().expect("builder lock") += 1;
        if tx.send(Box::new(job)).is_err() {
            *self.shared.pending.lock().expect("builder lock") -= 1;
        }
    }

    /// Jobs run to their end since start, and the seconds they took in
    /// all.
    pub fn done(&self) -> (u64, f64) {
        *self.shared.done.lock().expect("builder lock")
    }

    /// Jobs queued or running.
    pub fn pending(&self) -> usize {
        *self.shared.pending.lock().expect("builder lock")
    }

    /// Waits until no job is queued or running; false on timeout.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut pending = self.shared.pending.lock().expect("builder lock");
        while *pending > 0 {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            pending = self
                .shared
                .idle
                .wait_timeout(pending, deadline - now)
                .expect("builder lock")
                .0;
        }
        true
    }

    /// Drops queued jobs and joins the thread once the running job is
    /// done, waiting at most [`SHUTDOWN_WAIT`]: a build still running then
    /// is abandoned (its thread detached).
    pub fn shutdown(&self) {
        self.shared.stopping.store(true, Ordering::Release);
        self.tx.lock().expect("builder lock").take();
        let Some(t) = self.thread.lock().expect("builder lock").take() else {
            return;
        };
        let deadline = Instant::now() + SHUTDOWN_WAIT;
        while !t.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if t.is_finished() {
            let _ = t.join();
        } else {
            tracing::warn!("an index build is still running at shutdown: abandoned, it runs again at the next start");
        }
    }
}

impl Drop for IndexBuilder {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn runs_jobs_and_reports_idle() {
        let b = IndexBuilder::start();
        let done = Arc::new(AtomicUsize::new(0));
        for _ in 0..3 {
            let d = done.clone();
            b.submit(move || {
                std::thread::sleep(Duration::from_millis(20));
                d.fetch_add(1, Ordering::SeqCst);
            });
        }
        b.submit(|| panic!("a failing build"));
        assert!(b.wait_idle(Duration::from_secs(5)));
        assert_eq!(done.load(Ordering::SeqCst), 3);
        assert_eq!(b.pending(), 0);
        b.submit(|| std::thread::sleep(Duration::from_millis(300)));
        assert!(!b.wait_idle(Duration::from_millis(10)));
        b.shutdown();
        b.submit(|| unreachable!("no jobs after shutdown"));
        assert_eq!(b.pending(), 0);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn builds_run_at_a_lower_priority() {
        let b = IndexBuilder::start();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        b.submit(move || {
            // The job runs on a pool thread; ask the pool's threads too.
            let on_pool: Vec<i32> = rayon::broadcast(|_| current_nice());
            s.lock().unwrap().extend(on_pool);
            s.lock().unwrap().push(current_nice());
        });
        assert!(b.wait_idle(Duration::from_secs(10)));
        let seen = seen.lock().unwrap().clone();
        assert!(!seen.is_empty() && seen.iter().all(|n| *n >= BUILD_NICE), "{seen:?}");
    }

    #[test]
    fn shutdown_abandons_a_long_build() {
        let b = IndexBuilder::start();
        let (started, ran) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
        let (s, r) = (started.clone(), ran.clone());
        b.submit(move || {
            s.store(true, Ordering::SeqCst);
            std::thread::sleep(Duration::from_secs(60));
            r.store(true, Ordering::SeqCst);
        });
        b.submit(|| unreachable!("queued jobs are dropped at shutdown"));
        while !started.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(5));
        }
        let at = Instant::now();
        b.shutdown();
        // Bounded by the wait, not by the build (generous for a busy machine).
        assert!(
            at.elapsed() < SHUTDOWN_WAIT + Duration::from_secs(20),
            "{:?}",
            at.elapsed()
        );
        assert!(!ran.load(Ordering::SeqCst));
    }
}
