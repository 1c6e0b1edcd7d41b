//! Policy plugins: the WebAssembly host (ARCHITECTURE.md, "Plugins").
//!
//! Owns the wasmtime engine every plugin is compiled with, the deploy-time
//! checks ([`validate`]), loaded plugin versions ([`Loaded`]) and their
//! per-thread instances, and the calls with their limits.
//!
//! Invariants:
//! - a plugin is compiled once per version per node, never on a request
//!   path nor inside Raft apply;
//! - each worker thread has its own instance (and Store) of each loaded
//!   version, reused across calls; a trap poisons that Store, so it is
//!   dropped and the next call instantiates and configures afresh;
//! - every call runs with a fuel budget, a memory limit and a bounded
//!   wasm stack; a call that fails in any way returns a [`CallError`] and
//!   the caller uses its built-in decision;
//! - the only host functions are those of wit/policy.wit (time,
//!   randomness, log): no WASI.

mod bindings;
pub mod builtin;
pub mod cache;
pub mod compile;
pub mod registry;
pub mod store;
pub mod validate;

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edgevec_policy::{Configuration, SplitMix64};
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine, ResourceLimiter, Store, StoreLimits, StoreLimitsBuilder};

use bindings::lb::edgevec::policy::host::LogLevel;

/// Largest plugin file accepted.
/// Largest plugin file accepted (see [`edgevec_proto::limits::MAX_PLUGIN_BYTES`]).
pub const MAX_PLUGIN_BYTES: usize = edgevec_proto::limits::MAX_PLUGIN_BYTES;
/// Most functions a plugin may define.
pub const MAX_FUNCTIONS: usize = 10_000;
/// Fuel of one call (one 3-replica decision of the shipped plugins uses
/// a few thousand units).
pub const CALL_FUEL: u64 = 200_000;
/// Fuel of `configure`.
pub const CONFIGURE_FUEL: u64 = 5_000_000;
/// Linear memory one instance may grow to.
pub const MEMORY_LIMIT_BYTES: usize = 16 * 1024 * 1024;
/// WebAssembly stack of a call.
pub const MAX_WASM_STACK: usize = 256 * 1024;
/// Longest a compile may take before the plugin is refused.
pub const COMPILE_TIMEOUT: Duration = Duration::from_secs(60);
/// The contract's major version this node speaks.
pub const CONTRACT_MAJOR: u32 = 1;
/// Longest log line kept from a plugin.
const LOG_LINE_BYTES: usize = 512;

/// What a plugin implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Kind {
    LoadBalancer,
    Consistency,
}

impl Kind {
    /// The contract world of this kind.
    pub fn world(self) -> &'static str {
        match self {
            Kind::LoadBalancer => "load-balancer",
            Kind::Consistency => "consistency-policy",
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kind::LoadBalancer => "load balancer",
            Kind::Consistency => "consistency policy",
        })
    }
}

/// Why a plugin was refused or could not be loaded.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum PluginError {
    #[error("plugin is {bytes} bytes, above the {limit} byte limit")]
    TooLarge { bytes: usize, limit: usize },
    #[error("plugin is not WebAssembly: {0}")]
    NotWasm(String),
    #[error("plugin defines {functions} functions, above the limit of {limit}")]
    TooManyFunctions { functions: usize, limit: usize },
    #[error("plugin refused: {0}")]
    Import(String),
    #[error("plugin refused: {0}")]
    Version(String),
    #[error("plugin does not implement the contract: {0}")]
    WrongWorld(String),
    #[error("plugin did not compile: {0}")]
    Compile(String),
    #[error("plugin could not be instantiated: {0}")]
    Instantiate(String),
    #[error("plugin refused its configuration: {0}")]
    Configure(String),
    #[error("plugin is a {found}, expected a {expected}")]
    KindMismatch { expected: Kind, found: Kind },
    #[error("plugin host error: {0}")]
    Internal(String),
}

/// Why one call of a plugin gave no usable answer.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum CallError {
    #[error("ran out of fuel ({0} units per call)")]
    Fuel(u64),
    #[error("memory limit: {0}")]
    Memory(String),
    #[error("trapped: {0}")]
    Trap(String),
    #[error("invalid answer: {0}")]
    BadAnswer(String),
    #[error("configure failed: {0}")]
    Configure(String),
    #[error("could not instantiate: {0}")]
    Instantiate(String),
}

/// Where `now-ns` and `random-u64` come from.
#[derive(Debug, Clone, Copy)]
pub enum HostInputs {
    /// The node's monotonic clock, and a generator seeded from the OS.
    Live,
    /// A fixed time and a generator seeded with this value per instance,
    /// as the SDK harness does (tests).
    Seeded { now_ns: u64, seed: u64 },
}

/// What a plugin instance's Store holds.
pub struct HostState {
    rng: SplitMix64,
    fixed_now: Option<u64>,
    limits: StoreLimits,
    /// Why the last memory grow was refused, if one was.
    refused: Option<String>,
    plugin: Arc<str>,
    logged: u32,
}

impl bindings::lb::edgevec::policy::host::Host for HostState {
    fn now_ns(&mut self) -> u64 {
        self.fixed_now.unwrap_or_else(|| started().elapsed().as_nanos() as u64)
    }

    fn random_u64(&mut self) -> u64 {
        self.rng.next_u64()
    }

    fn log(&mut self, level: LogLevel, message: String) {
        // At most 100 lines per instance: a chatty plugin cannot flood the log.
        self.logged += 1;
        if self.logged > 100 {
            return;
        }
        let mut end = message.len().min(LOG_LINE_BYTES);
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        let text = &message[..end];
        match level {
            LogLevel::Debug => tracing::debug!(plugin = %self.plugin, "{text}"),
            LogLevel::Info => tracing::info!(plugin = %self.plugin, "{text}"),
            LogLevel::Warn => tracing::warn!(plugin = %self.plugin, "{text}"),
        }
    }
}

impl bindings::lb::edgevec::policy::types::Host for HostState {}

impl ResourceLimiter for HostState {
    fn memory_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        let ok = self.limits.memory_growing(current, desired, maximum)?;
        if !ok {
            self.refused = Some(format!(
                "linear memory of {desired} bytes asked for, the limit is {MEMORY_LIMIT_BYTES}"
            ));
        }
        Ok(ok)
    }

    fn table_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        let ok = self.limits.table_growing(current, desired, maximum)?;
        if !ok {
            self.refused = Some(format!("table of {desired} elements asked for"));
        }
        Ok(ok)
    }
}

fn started() -> Instant {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *START.get_or_init(Instant::now)
}

/// The wasmtime engine plugins run on, with the linker of the contract's
/// host functions.
#[derive(Clone)]
pub struct PolicyEngine {
    engine: Engine,
    linker: Arc<Linker<HostState>>,
    inputs: HostInputs,
    cache: Option<cache::ArtifactCache>,
    /// Compiles in a child process ([`compile`]) when set.
    compiler: Option<Arc<std::path::Path>>,
}

/// Whether a loaded version was compiled here or read from the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Compiled,
    Cache,
}

impl PolicyEngine {
    pub fn new(inputs: HostInputs) -> Result<Self, PluginError> {
        let mut config = Config::new();
        // Measured: component calls cost ~360 ns more with it on.
        config.concurrency_support(false);
        config.consume_fuel(true);
        config.max_wasm_stack(MAX_WASM_STACK);
        // Threads, async components and parallel compilation are not even
        // built in (wasmtime features); the rest is switched off here.
        config.wasm_relaxed_simd(false);
        config.wasm_gc(false);
        config.wasm_memory64(false);
        config.wasm_stack_switching(false);
        config.cranelift_nan_canonicalization(true);
        let engine = Engine::new(&config).map_err(|e| PluginError::Internal(format!("{e:#}")))?;
        let mut linker = Linker::new(&engine);
        bindings::lb::edgevec::policy::host::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)
            .map_err(|e| PluginError::Internal(format!("{e:#}")))?;
        bindings::lb::edgevec::policy::types::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)
            .map_err(|e| PluginError::Internal(format!("{e:#}")))?;
        Ok(PolicyEngine {
            engine,
            linker: Arc::new(linker),
            inputs,
            cache: None,
            compiler: None,
        })
    }

    /// Compiles plugins by running `exe plugin-compile` with a memory
    /// limit (see [`compile`]) instead of in this process.
    pub fn with_compiler(mut self, exe: Option<&std::path::Path>) -> Self {
        self.compiler = exe.map(Arc::from);
        self
    }

    /// Keeps compiled plugins in `dir` and loads them from there.
    pub fn with_cache(mut self, dir: &std::path::Path) -> Result<Self, PluginError> {
        self.cache = Some(
            cache::ArtifactCache::open(dir)
                .map_err(|e| PluginError::Internal(format!("plugin cache {}: {e}", dir.display())))?,
        );
        Ok(self)
    }

    /// Deletes cached compilations of plugins `keep` does not name.
    pub fn remove_unused_artifacts(
        &self,
        keep: &std::collections::HashSet<String>,
        min_age: Duration,
    ) -> Vec<std::path::PathBuf> {
        self.cache
            .as_ref()
            .map_or_else(Vec::new, |c| c.remove_unused(keep, min_age))
    }

    /// The engine's compatibility hash, part of a compiled artifact's key.
    pub fn compatibility_hash(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.engine.precompile_compatibility_hash().hash(&mut h);
        h.finish()
    }

    /// Checks and compiles `bytes` on a blocking thread (bounded by
    /// [`COMPILE_TIMEOUT`]), then instantiates it once and configures it
    /// with `config`, as the deploying node must before proposing it.
    pub async fn load(&self, name: &str, bytes: Vec<u8>, config: Configuration) -> Result<Arc<Loaded>, PluginError> {
        let this = self.clone();
        let name: Arc<str> = name.into();
        let task = tokio::task::spawn_blocking(move || this.load_blocking(name, &bytes, config));
        match tokio::time::timeout(COMPILE_TIMEOUT, task).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => Err(PluginError::Internal(format!("compile task failed: {e}"))),
            Err(_) => Err(PluginError::Compile(format!(
                "compiling took longer than {COMPILE_TIMEOUT:?}"
            ))),
        }
    }

    /// [`PolicyEngine::load`] on the calling thread.
    pub fn load_blocking(
        &self,
        name: Arc<str>,
        bytes: &[u8],
        config: Configuration,
    ) -> Result<Arc<Loaded>, PluginError> {
        let checked = validate::check(bytes)?;
        let sha = cache::sha256_hex(bytes);
        let compat = self.compatibility_hash();
        if let Some(component) = self.cache.as_ref().and_then(|c| c.load(&self.engine, &sha, compat)) {
            return self.prepare(name, checked.kind, component, config, (Source::Cache, sha, bytes.len()));
        }
        let artifact = match &self.compiler {
            Some(exe) => compile::in_child(exe, bytes, compile::COMPILE_MEMORY_BYTES, COMPILE_TIMEOUT)?,
            None => self
                .engine
                .precompile_component(&checked.component)
                .map_err(|e| PluginError::Compile(format!("{e:#}")))?,
        };
        // SAFETY: the artifact was just produced by this engine's
        // configuration (in this process or by its own executable in a
        // child); wasmtime checks its header and compatibility hash.
        let component = unsafe { Component::deserialize(&self.engine, &artifact) }
            .map_err(|e| PluginError::Compile(format!("compiled artifact refused: {e:#}")))?;
        if let Some(cache) = &self.cache {
            if let Err(e) = cache.store(&artifact, &sha, compat) {
                tracing::warn!(plugin = %name, error = %e, "compiled plugin not cached");
            }
        }
        self.prepare(
            name,
            checked.kind,
            component,
            config,
            (Source::Compiled, sha, bytes.len()),
        )
    }

    fn prepare(
        &self,
        name: Arc<str>,
        kind: Kind,
        component: Component,
        config: Configuration,
        (source, sha256, size): (Source, String, usize),
    ) -> Result<Arc<Loaded>, PluginError> {
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| PluginError::Instantiate(format!("{e:#}")))?;
        let pre = match kind {
            Kind::LoadBalancer => {
                Pre::Lb(bindings::lb::LoadBalancerPre::new(pre).map_err(|e| PluginError::WrongWorld(format!("{e:#}")))?)
            }
            Kind::Consistency => Pre::Cp(
                bindings::cp::ConsistencyPolicyPre::new(pre).map_err(|e| PluginError::WrongWorld(format!("{e:#}")))?,
            ),
        };
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let loaded = Arc::new(Loaded {
            id: NEXT.fetch_add(1, Ordering::Relaxed),
            name,
            kind,
            engine: self.clone(),
            pre,
            config,
            stats: Stats::default(),
            retired: Arc::default(),
            source,
            sha256,
            size,
        });
        // Instantiate and configure once now: a plugin that cannot is
        // refused here, not on the first request.
        let mut instance = loaded.instantiate().map_err(|e| match e {
            CallError::Configure(m) => PluginError::Configure(m),
            other => PluginError::Instantiate(other.to_string()),
        })?;
        loaded.stats.instances.fetch_add(1, Ordering::Relaxed);
        SLOTS.with(|s| s.borrow_mut().insert(loaded.id, std::mem::take(&mut instance)));
        Ok(loaded)
    }

    fn store(&self, plugin: &Arc<str>) -> Store<HostState> {
        let (fixed_now, seed) = match self.inputs {
            HostInputs::Live => (None, rand::random()),
            HostInputs::Seeded { now_ns, seed } => (Some(now_ns), seed),
        };
        let state = HostState {
            rng: SplitMix64::new(seed),
            fixed_now,
            limits: StoreLimitsBuilder::new()
                .memory_size(MEMORY_LIMIT_BYTES)
                .table_elements(100_000)
                .instances(16)
                .memories(4)
                .tables(16)
                .build(),
            refused: None,
            plugin: plugin.clone(),
            logged: 0,
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| s);
        store
    }
}

enum Pre {
    Lb(bindings::lb::LoadBalancerPre<HostState>),
    Cp(bindings::cp::ConsistencyPolicyPre<HostState>),
}

/// Counters of one loaded version.
#[derive(Debug, Default)]
pub struct Stats {
    pub calls: AtomicU64,
    pub failures: AtomicU64,
    /// Instances created (the first one per thread, and one after each
    /// trap).
    pub instances: AtomicU64,
    pub last_failure: Mutex<Option<String>>,
}

/// One compiled, checked version of a plugin, ready to call from any
/// thread.
pub struct Loaded {
    id: u64,
    pub name: Arc<str>,
    pub kind: Kind,
    engine: PolicyEngine,
    pre: Pre,
    config: Configuration,
    pub stats: Stats,
    retired: Arc<std::sync::atomic::AtomicBool>,
    /// Compiled here, or read from the artifact cache.
    pub source: Source,
    /// Hex SHA-256 of the plugin's bytes, and their size.
    pub sha256: String,
    pub size: usize,
}

impl std::fmt::Debug for Loaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loaded")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("kind", &self.kind)
            .finish()
    }
}

/// A thread's instance of one loaded version.
#[derive(Default)]
struct Instance {
    live: Option<(Store<HostState>, Bound)>,
    /// Set when the version is dropped: the instance can go.
    retired: Arc<std::sync::atomic::AtomicBool>,
}

enum Bound {
    Lb(bindings::lb::LoadBalancer),
    Cp(bindings::cp::ConsistencyPolicy),
}

thread_local! {
    /// This thread's instances, by loaded version id.
    static SLOTS: RefCell<HashMap<u64, Instance>> = RefCell::new(HashMap::new());
}

impl Drop for Loaded {
    fn drop(&mut self) {
        // Instances on other threads go when those threads next create
        // an instance (see `Loaded::with_instance`); this thread's now.
        self.retired.store(true, Ordering::Relaxed);
        let _ = SLOTS.try_with(|s| s.borrow_mut().remove(&self.id));
    }
}

fn wire_config(c: &Configuration) -> bindings::lb::edgevec::policy::types::Configuration {
    bindings::lb::edgevec::policy::types::Configuration {
        params: c.params.clone(),
        zones: c.zones.clone(),
        levels: c.levels.clone(),
        collections: c.collections.clone(),
    }
}

impl Loaded {
    /// A fresh instance, configured.
    fn instantiate(&self) -> Result<Instance, CallError> {
        let mut store = self.engine.store(&self.name);
        store.set_fuel(CONFIGURE_FUEL).expect("fuel is enabled");
        let config = wire_config(&self.config);
        let bound = match &self.pre {
            Pre::Lb(pre) => {
                let b = pre
                    .instantiate(&mut store)
                    .map_err(|e| classify(&mut store, e, CONFIGURE_FUEL, CallError::Instantiate))?;
                b.edgevec_policy_balancer()
                    .call_configure(&mut store, &config)
                    .map_err(|e| classify(&mut store, e, CONFIGURE_FUEL, CallError::Configure))?
                    .map_err(CallError::Configure)?;
                Bound::Lb(b)
            }
            Pre::Cp(pre) => {
                let b = pre
                    .instantiate(&mut store)
                    .map_err(|e| classify(&mut store, e, CONFIGURE_FUEL, CallError::Instantiate))?;
                b.edgevec_policy_consistency()
                    .call_configure(&mut store, &config)
                    .map_err(|e| classify(&mut store, e, CONFIGURE_FUEL, CallError::Configure))?
                    .map_err(CallError::Configure)?;
                Bound::Cp(b)
            }
        };
        Ok(Instance {
            live: Some((store, bound)),
            retired: self.retired.clone(),
        })
    }

    /// Runs `f` on this thread's instance (created if needed); a failed
    /// call drops the instance, since a trap poisons its Store.
    fn with_instance<T>(
        &self,
        f: impl FnOnce(&mut Store<HostState>, &Bound) -> Result<T, CallError>,
    ) -> Result<T, CallError> {
        self.stats.calls.fetch_add(1, Ordering::Relaxed);
        let result = SLOTS.with(|slots| {
            let mut slots = slots.borrow_mut();
            if slots.get(&self.id).is_none_or(|s| s.live.is_none()) {
                // A new instance here: drop those of versions gone since.
                slots.retain(|_, i| !i.retired.load(Ordering::Relaxed));
                let fresh = self.instantiate()?;
                self.stats.instances.fetch_add(1, Ordering::Relaxed);
                slots.insert(self.id, fresh);
            }
            let slot = slots.get_mut(&self.id).expect("set above");
            let (store, bound) = slot.live.as_mut().expect("set above");
            let r = f(store, bound);
            if r.is_err() {
                slot.live = None;
            }
            r
        });
        if let Err(e) = &result {
            self.stats.failures.fetch_add(1, Ordering::Relaxed);
            *self.stats.last_failure.lock().expect("stats lock") = Some(e.to_string());
        }
        result
    }

    /// The load balancer's packed answer for one read.
    pub fn call_order(&self, request: &[u64], replicas: &[u64]) -> Result<u64, CallError> {
        self.with_instance(|store, bound| {
            let Bound::Lb(b) = bound else {
                return Err(CallError::BadAnswer(format!("{} is not a load balancer", self.name)));
            };
            store.set_fuel(CALL_FUEL).expect("fuel is enabled");
            b.edgevec_policy_balancer()
                .call_order(&mut *store, request, replicas)
                .map_err(|e| classify(store, e, CALL_FUEL, CallError::Trap))
        })
    }

    /// The consistency policy's packed answer for one read.
    pub fn call_requirements(&self, request: &[u64], replicas: &[u64]) -> Result<(u64, u64), CallError> {
        self.with_instance(|store, bound| {
            let Bound::Cp(b) = bound else {
                return Err(CallError::BadAnswer(format!(
                    "{} is not a consistency policy",
                    self.name
                )));
            };
            store.set_fuel(CALL_FUEL).expect("fuel is enabled");
            b.edgevec_policy_consistency()
                .call_requirements(&mut *store, request, replicas)
                .map_err(|e| classify(store, e, CALL_FUEL, CallError::Trap))
        })
    }
}

/// Names why a call failed: fuel, a refused memory grow, or a trap.
fn classify(
    store: &mut Store<HostState>,
    e: wasmtime::Error,
    fuel: u64,
    other: impl FnOnce(String) -> CallError,
) -> CallError {
    if let Some(why) = store.data_mut().refused.take() {
        return CallError::Memory(why);
    }
    match e.downcast_ref::<wasmtime::Trap>() {
        Some(wasmtime::Trap::OutOfFuel) => CallError::Fuel(fuel),
        Some(wasmtime::Trap::StackOverflow) => CallError::Trap("wasm stack overflow".into()),
        _ => other(format!("{e:#}")),
    }
}

#[cfg(test)]
mod tests;
