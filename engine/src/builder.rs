//! The background index builder: one dedicated thread fed by a channel.
//!
//! Sealing a segment must not make the write that sealed it wait for an
//! HNSW build (seconds for large segments), so shards hand builds to this
//! thread and return. instant-distance parallelises each build internally
//! (rayon); builds run inside the builder's *own* rayon pool, never the
//! global one, because a build keeps every worker of its pool busy for
//! seconds and searches (which use the global pool) must not queue behind
//! it.
//!
//! A job is an opaque closure (the shard decides what building means:
//! build, save the file, install in memory). The builder owns only the
//! queue, a count of jobs not finished yet — so [`IndexBuilder::wait_idle`]
//! can tell tests and benchmarks when every queued index is in place — and
//! shutdown: jobs still queued at shutdown are dropped (a restart finds
//! their segments without an index file and queues them again), the running
//! one is finished and joined so nothing writes into the data directory
//! after the engine is gone.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

type Job = Box<dyn FnOnce() + Send + 'static>;

struct Shared {
    pending: Mutex<usize>,
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
            idle: Condvar::new(),
            stopping: AtomicBool::new(false),
        });
        let worker = shared.clone();
        let pool = rayon::ThreadPoolBuilder::new()
            .thread_name(|i| format!("edgevec-index-{i}"))
            .build()
            .expect("index build thread pool starts");
        let thread = std::thread::Builder::new()
            .name("edgevec-index-builder".into())
            .spawn(move || {
                for job in rx {
                    if !worker.stopping.load(Ordering::Acquire) {
                        // A panicking build must not take the builder down
                        // with it; the segment stays searchable by brute
                        // force and is rebuilt at the next open.
                        let run = std::panic::AssertUnwindSafe(|| pool.install(job));
                        if std::panic::catch_unwind(run).is_err() {
                            tracing::error!("index build panicked; segment stays on brute force");
                        }
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

    /// Drops queued jobs, finishes the running one and joins the thread.
    pub fn shutdown(&self) {
        self.shared.stopping.store(true, Ordering::Release);
        self.tx.lock().expect("builder lock").take();
        if let Some(t) = self.thread.lock().expect("builder lock").take() {
            let _ = t.join();
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
}
