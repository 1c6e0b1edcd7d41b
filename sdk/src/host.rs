//! What the node gives a policy: its monotonic clock, the instance's
//! random generator and its log (wit/policy.wit, `interface host`).
//! Outside WebAssembly (tests) these are the harness's seeded clock and
//! generator, and the log is kept for the test to read.

/// Severity of a log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Debug,
    Info,
    Warn,
}

#[cfg(target_arch = "wasm32")]
mod imp {
    use super::LogLevel;

    #[link(wasm_import_module = "edgevec:policy/host@1.0.0")]
    extern "C" {
        #[link_name = "now-ns"]
        fn host_now_ns() -> i64;
        #[link_name = "random-u64"]
        fn host_random_u64() -> i64;
        #[link_name = "log"]
        fn host_log(level: i32, ptr: *const u8, len: usize);
    }

    pub fn now_ns() -> u64 {
        unsafe { host_now_ns() as u64 }
    }

    pub fn random_u64() -> u64 {
        unsafe { host_random_u64() as u64 }
    }

    pub fn log(level: LogLevel, message: &str) {
        let level = match level {
            LogLevel::Debug => 0,
            LogLevel::Info => 1,
            LogLevel::Warn => 2,
        };
        unsafe { host_log(level, message.as_ptr(), message.len()) }
    }
}

#[cfg(not(target_arch = "wasm32"))]
mod imp {
    use std::cell::RefCell;

    use super::LogLevel;
    use crate::SplitMix64;

    pub(crate) struct Native {
        pub now_ns: u64,
        pub rng: SplitMix64,
        pub log: Vec<(LogLevel, String)>,
    }

    thread_local! {
        pub(crate) static NATIVE: RefCell<Native> = RefCell::new(Native {
            now_ns: 0,
            rng: SplitMix64::new(0),
            log: Vec::new(),
        });
    }

    pub fn now_ns() -> u64 {
        NATIVE.with(|n| n.borrow().now_ns)
    }

    pub fn random_u64() -> u64 {
        NATIVE.with(|n| n.borrow_mut().rng.next_u64())
    }

    pub fn log(level: LogLevel, message: &str) {
        NATIVE.with(|n| n.borrow_mut().log.push((level, message.to_string())));
    }
}

#[cfg(not(target_arch = "wasm32"))]
pub(crate) use imp::NATIVE;

/// Nanoseconds on the node's monotonic clock (only differences mean
/// anything).
pub fn now_ns() -> u64 {
    imp::now_ns()
}

/// 64 random bits from this instance's generator.
pub fn random_u64() -> u64 {
    imp::random_u64()
}

/// A uniformly drawn index below `n` (`n` > 0).
pub fn random_below(n: usize) -> usize {
    // Lemire's multiply-shift: no modulo bias worth speaking of for n ≤ 16.
    ((u128::from(random_u64()) * n as u128) >> 64) as usize
}

/// Writes a line to the node's log.
pub fn log(level: LogLevel, message: &str) {
    imp::log(level, message)
}
