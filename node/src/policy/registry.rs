//! The plugins a node runs, by name, and decisions with their fallback.
//!
//! Each name has a slot holding its active version behind an `ArcSwap`:
//! installing a version swaps the slot, calls in flight finish on the old
//! version, and each thread's instance notices the new version id and
//! instantiates it on its next call. A name whose plugin is not loaded
//! yet, fails a call, or is held open by its circuit breaker gets the
//! built-in decision for that call (load balancing: the given order),
//! and the reason is counted.
//!
//! The shipped plugins are loaded in the background when the node starts:
//! reads never wait for a compile.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use edgevec_policy::{decode_order, decode_requirements, Configuration, Requirement};

use super::builtin::BUILTIN;
use super::{CallError, Kind, Loaded, PolicyEngine};

/// Consecutive failed calls that open a plugin's circuit breaker.
pub const BREAKER_FAILURES: u64 = 20;
/// How long an open breaker keeps a plugin out before one call tries it.
pub const BREAKER_OPEN: Duration = Duration::from_secs(30);

/// One active version of a named plugin.
pub struct Active {
    pub loaded: Arc<Loaded>,
    pub version: u64,
    /// Where it came from ("built-in", or the deploy).
    pub origin: String,
    consecutive_failures: AtomicU64,
    open_until: Mutex<Option<Instant>>,
}

/// Why a decision used the built-in answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Fallback {
    /// No plugin of that name is loaded (yet).
    NotLoaded,
    /// The call failed (trap, fuel, memory) or its answer was invalid.
    Failed,
    /// The circuit breaker is open after repeated failures.
    Disabled,
    /// A consistency answer weaker than its level's floor.
    Refused,
}

impl Fallback {
    pub fn as_str(self) -> &'static str {
        match self {
            Fallback::NotLoaded => "not_loaded",
            Fallback::Failed => "failed",
            Fallback::Disabled => "disabled",
            Fallback::Refused => "refused",
        }
    }
}

/// What a plugin's slot shows in status and metrics.
#[derive(Debug, Clone)]
pub struct SlotReport {
    pub name: String,
    pub kind: Option<Kind>,
    pub version: u64,
    pub origin: String,
    pub sha256: String,
    pub size: u64,
    pub calls: u64,
    pub failures: u64,
    pub instances: u64,
    /// Read from the compiled-artifact cache rather than compiled.
    pub from_cache: bool,
    pub fallbacks: Vec<(Fallback, u64)>,
    pub last_failure: Option<String>,
    pub disabled: Option<String>,
    pub load_error: Option<String>,
}

#[derive(Default)]
struct Slot {
    active: ArcSwapOption<Active>,
    fallbacks: Mutex<HashMap<Fallback, u64>>,
    load_error: Mutex<Option<String>>,
    /// When the last failure was logged (at most one line per interval).
    logged: Mutex<Option<Instant>>,
}

/// A shipped load balancer's logic linked into the node.
type NativeLb = Box<dyn FnMut(&[u64], &[u64]) -> u64 + Send>;

fn native_lb<P: edgevec_policy::LoadBalancer + Send>(config: &Configuration) -> Option<NativeLb> {
    let mut p = P::configure(config).ok()?;
    Some(Box::new(move |q: &[u64], r: &[u64]| {
        let rs = edgevec_policy::Replicas(r);
        let mut o = edgevec_policy::Order::new(rs.len());
        p.order(&edgevec_policy::Request(q), &rs, &mut o);
        o.packed()
    }))
}

/// The native build of shipped load balancer `name`.
fn native_for(name: &str, config: &Configuration) -> Option<NativeLb> {
    match name {
        "round-robin" => native_lb::<edgevec_plugin_round_robin::RoundRobin>(config),
        "least-connections" => native_lb::<edgevec_plugin_least_connections::LeastConnections>(config),
        "random" => native_lb::<edgevec_plugin_random::Random>(config),
        "p2c-ewma" => native_lb::<edgevec_plugin_p2c_ewma::P2cEwma>(config),
        "zone-aware" => native_lb::<edgevec_plugin_zone_aware::ZoneAware>(config),
        _ => None,
    }
}

/// The node's plugins.
pub struct Policies {
    engine: PolicyEngine,
    slots: RwLock<HashMap<String, Arc<Slot>>>,
    config: RwLock<Arc<Configuration>>,
    /// Shipped load balancers decide with their native build instead of
    /// their WebAssembly one (the cluster setting `plugins.native`): a
    /// switch for operators, and the baseline of the end-to-end benchmark.
    native: std::sync::atomic::AtomicBool,
    natives: Mutex<HashMap<String, NativeLb>>,
}

impl Policies {
    pub fn new(engine: PolicyEngine) -> Arc<Self> {
        Arc::new(Policies {
            engine,
            slots: RwLock::new(HashMap::new()),
            config: RwLock::new(Arc::new(Configuration::with_zones(&[]))),
            native: std::sync::atomic::AtomicBool::new(false),
            natives: Mutex::new(HashMap::new()),
        })
    }

    pub fn engine(&self) -> &PolicyEngine {
        &self.engine
    }

    fn slot(&self, name: &str) -> Arc<Slot> {
        if let Some(s) = self.slots.read().expect("slots lock").get(name) {
            return s.clone();
        }
        self.slots
            .write()
            .expect("slots lock")
            .entry(name.to_string())
            .or_default()
            .clone()
    }

    /// The configuration plugins are given (zones of the cluster, ...).
    pub fn set_configuration(&self, config: Configuration) {
        *self.config.write().expect("config lock") = Arc::new(config);
    }

    /// Makes shipped load balancers decide natively (`true`) or through
    /// their WebAssembly build.
    pub fn set_native(&self, native: bool) {
        let was = self.native.swap(native, Ordering::Relaxed);
        if was != native {
            tracing::info!(
                native,
                "shipped load balancers now decide {}",
                if native { "natively" } else { "through WebAssembly" }
            );
        }
    }

    pub fn is_native(&self) -> bool {
        self.native.load(Ordering::Relaxed)
    }

    pub fn configuration(&self) -> Arc<Configuration> {
        self.config.read().expect("config lock").clone()
    }

    /// Makes `loaded` the active version of its name.
    pub fn install(&self, loaded: Arc<Loaded>, version: u64, origin: impl Into<String>) {
        let slot = self.slot(&loaded.name);
        *slot.load_error.lock().expect("slot lock") = None;
        tracing::info!(
            plugin = %loaded.name, version, kind = %loaded.kind, source = ?loaded.source,
            "plugin version active"
        );
        slot.active.store(Some(Arc::new(Active {
            loaded,
            version,
            origin: origin.into(),
            consecutive_failures: AtomicU64::new(0),
            open_until: Mutex::new(None),
        })));
    }

    /// Installs `loaded` unless its name already runs a newer version
    /// (the shipped plugins load at start while a deployed version of the
    /// same name may already be in).
    fn install_unless_newer(&self, loaded: Arc<Loaded>, version: u64, origin: &str) {
        let newer = self.active_version(&loaded.name).is_some_and(|v| v > version);
        if !newer {
            self.install(loaded, version, origin);
        }
    }

    /// The active version of `name`, if one is loaded.
    pub fn active_version(&self, name: &str) -> Option<u64> {
        let slots = self.slots.read().expect("slots lock");
        slots.get(name)?.active.load().as_ref().map(|a| a.version)
    }

    /// (name, active version) of every loaded plugin.
    pub fn installed(&self) -> Vec<(String, u64)> {
        let slots = self.slots.read().expect("slots lock");
        slots
            .iter()
            .filter_map(|(n, s)| s.active.load().as_ref().map(|a| (n.clone(), a.version)))
            .collect()
    }

    /// Unloads `name` (its deployed versions were removed); calls in
    /// flight finish on it.
    pub fn uninstall(&self, name: &str) {
        if let Some(slot) = self.slots.write().expect("slots lock").remove(name) {
            tracing::info!(plugin = %name, "plugin removed");
            slot.active.store(None);
        }
    }

    /// What plugins are given at `configure`, with `params` as theirs.
    pub fn configuration_with(&self, params: &[(String, String)]) -> Configuration {
        let mut config = Configuration::clone(&self.configuration());
        config.params = params.to_vec();
        config
    }

    /// Loads the shipped version of `name`. Blocking: compiles or reads
    /// the cache.
    fn load_builtin(&self, name: &str) -> Result<Arc<Loaded>, super::PluginError> {
        let bytes = super::builtin::builtin(name)
            .ok_or_else(|| super::PluginError::Internal(format!("{name} is not a shipped plugin")))?;
        self.engine
            .load_blocking(name.into(), bytes, self.configuration_with(&[]))
    }

    /// Loads the shipped version of `name` again and makes it active
    /// (its deployed versions were removed).
    pub fn reload_builtin(&self, name: &str) -> Result<(), super::PluginError> {
        self.install(self.load_builtin(name)?, 1, "built-in");
        Ok(())
    }

    /// Records that `name` could not be loaded.
    pub fn load_failed(&self, name: &str, error: String) {
        tracing::warn!(plugin = %name, %error, "plugin not loaded");
        *self.slot(name).load_error.lock().expect("slot lock") = Some(error);
    }

    /// Loads the shipped plugins on a thread of their own at a low
    /// scheduling priority (compiling must not starve the node's Raft and
    /// network work while it starts), one at a time (`first` before the
    /// others), and installs each as version 1.
    pub fn load_builtins(self: &Arc<Self>, first: &[&str]) {
        let this = self.clone();
        let mut names: Vec<&'static str> = BUILTIN.iter().map(|(n, _)| *n).collect();
        names.sort_by_key(|n| !first.contains(n));
        let spawned = std::thread::Builder::new().name("plugin-load".into()).spawn(move || {
            edgevec_engine::lower_priority();
            for name in names {
                match this.load_builtin(name) {
                    Ok(loaded) => this.install_unless_newer(loaded, 1, "built-in"),
                    Err(e) => this.load_failed(name, e.to_string()),
                }
            }
        });
        if let Err(e) = spawned {
            for (name, _) in BUILTIN {
                self.load_failed(name, format!("no thread to load it on: {e}"));
            }
        }
    }

    /// The order to try `n` candidates in, from load balancer `name`
    /// (`request` and `replicas` in the contract's layout); the given
    /// order when the plugin cannot answer, with the reason.
    pub fn order(&self, name: &str, request: &[u64], replicas: &[u64], n: usize) -> (Vec<usize>, Option<Fallback>) {
        let given = || (0..n).collect::<Vec<_>>();
        if self.is_native() && super::builtin::builtin(name).is_some() {
            let mut natives = self.natives.lock().expect("natives lock");
            if !natives.contains_key(name) {
                if let Some(f) = native_for(name, &self.configuration()) {
                    natives.insert(name.to_string(), f);
                }
            }
            if let Some(f) = natives.get_mut(name) {
                if let Ok(order) = decode_order(f(request, replicas), n) {
                    return (order, None);
                }
            }
        }
        let slot = self.slot(name);
        let Some(active) = slot.active.load_full() else {
            return (given(), Some(self.fell_back(&slot, name, Fallback::NotLoaded, None)));
        };
        if active.is_open() {
            return (given(), Some(self.fell_back(&slot, name, Fallback::Disabled, None)));
        }
        let answer = active
            .loaded
            .call_order(request, replicas)
            .and_then(|packed| decode_order(packed, n).map_err(|e| CallError::BadAnswer(e.to_string())));
        match answer {
            Ok(order) => {
                active.consecutive_failures.store(0, Ordering::Relaxed);
                (order, None)
            }
            Err(e) => {
                active.failed(name);
                (given(), Some(self.fell_back(&slot, name, Fallback::Failed, Some(&e))))
            }
        }
    }

    /// The requirement per candidate (`n` of them) and the bound from
    /// consistency policy `name`; the reason when it cannot answer (the
    /// caller then uses the level's strict answer).
    pub fn requirements(
        &self,
        name: &str,
        request: &[u64],
        replicas: &[u64],
        n: usize,
    ) -> Result<(Vec<Requirement>, u64), Fallback> {
        let slot = self.slot(name);
        let Some(active) = slot.active.load_full() else {
            return Err(self.fell_back(&slot, name, Fallback::NotLoaded, None));
        };
        if active.is_open() {
            return Err(self.fell_back(&slot, name, Fallback::Disabled, None));
        }
        let answer = active
            .loaded
            .call_requirements(request, replicas)
            .and_then(|packed| decode_requirements(packed, n).map_err(|e| CallError::BadAnswer(e.to_string())));
        match answer {
            Ok(a) => {
                active.consecutive_failures.store(0, Ordering::Relaxed);
                Ok(a)
            }
            Err(e) => {
                active.failed(name);
                Err(self.fell_back(&slot, name, Fallback::Failed, Some(&e)))
            }
        }
    }

    /// Counts an answer of consistency policy `name` that the host refused
    /// as weaker than its level's floor (a failure, for its breaker).
    pub fn refused(&self, name: &str, why: &str) {
        let slot = self.slot(name);
        if let Some(active) = slot.active.load_full() {
            active.failed(name);
        }
        self.fell_back(
            &slot,
            name,
            Fallback::Refused,
            Some(&CallError::BadAnswer(why.to_string())),
        );
    }

    /// What the active version of `name` implements, if one is loaded.
    pub fn kind(&self, name: &str) -> Option<Kind> {
        let slots = self.slots.read().expect("slots lock");
        slots.get(name)?.active.load().as_ref().map(|a| a.loaded.kind)
    }

    fn fell_back(&self, slot: &Slot, name: &str, why: Fallback, error: Option<&CallError>) -> Fallback {
        *slot.fallbacks.lock().expect("slot lock").entry(why).or_insert(0) += 1;
        let mut logged = slot.logged.lock().expect("slot lock");
        if logged.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
            *logged = Some(Instant::now());
            match error {
                Some(e) => tracing::warn!(plugin = %name, error = %e, "plugin call failed; built-in decision used"),
                // Expected while a starting node loads its plugins.
                None if why == Fallback::NotLoaded => {
                    tracing::debug!(plugin = %name, "plugin not loaded yet; built-in decision used")
                }
                None => {
                    tracing::warn!(plugin = %name, reason = why.as_str(), "plugin not used; built-in decision used")
                }
            }
        }
        why
    }

    /// Status of every named plugin, by name.
    pub fn report(&self) -> Vec<SlotReport> {
        let slots = self.slots.read().expect("slots lock");
        let mut out: Vec<SlotReport> = slots
            .iter()
            .map(|(name, slot)| {
                let active = slot.active.load_full();
                let mut fallbacks: Vec<(Fallback, u64)> = slot
                    .fallbacks
                    .lock()
                    .expect("slot lock")
                    .iter()
                    .map(|(k, v)| (*k, *v))
                    .collect();
                fallbacks.sort();
                SlotReport {
                    name: name.clone(),
                    kind: active.as_ref().map(|a| a.loaded.kind),
                    version: active.as_ref().map_or(0, |a| a.version),
                    origin: active.as_ref().map_or_else(String::new, |a| a.origin.clone()),
                    sha256: active.as_ref().map_or_else(String::new, |a| a.loaded.sha256.clone()),
                    size: active.as_ref().map_or(0, |a| a.loaded.size as u64),
                    calls: active
                        .as_ref()
                        .map_or(0, |a| a.loaded.stats.calls.load(Ordering::Relaxed)),
                    failures: active
                        .as_ref()
                        .map_or(0, |a| a.loaded.stats.failures.load(Ordering::Relaxed)),
                    instances: active
                        .as_ref()
                        .map_or(0, |a| a.loaded.stats.instances.load(Ordering::Relaxed)),
                    from_cache: active.as_ref().is_some_and(|a| a.loaded.source == super::Source::Cache),
                    fallbacks,
                    last_failure: active
                        .as_ref()
                        .and_then(|a| a.loaded.stats.last_failure.lock().expect("stats lock").clone()),
                    disabled: active.as_ref().and_then(|a| a.disabled_reason()),
                    load_error: slot.load_error.lock().expect("slot lock").clone(),
                }
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }
}

impl Active {
    fn is_open(&self) -> bool {
        let mut open = self.open_until.lock().expect("breaker lock");
        match *open {
            Some(until) if Instant::now() < until => true,
            Some(_) => {
                // Half open: let one call through; a failure re-opens.
                *open = None;
                self.consecutive_failures.store(BREAKER_FAILURES - 1, Ordering::Relaxed);
                false
            }
            None => false,
        }
    }

    fn failed(&self, name: &str) {
        let n = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= BREAKER_FAILURES {
            let mut open = self.open_until.lock().expect("breaker lock");
            if open.is_none() {
                tracing::warn!(plugin = %name, failures = n, "plugin disabled by its circuit breaker for {BREAKER_OPEN:?}");
            }
            *open = Some(Instant::now() + BREAKER_OPEN);
        }
    }

    fn disabled_reason(&self) -> Option<String> {
        let open = self.open_until.lock().expect("breaker lock");
        open.filter(|u| Instant::now() < *u).map(|u| {
            format!(
                "circuit breaker open for {:.0?} more after {BREAKER_FAILURES} failed calls in a row; last: {}",
                u.saturating_duration_since(Instant::now()),
                self.loaded
                    .stats
                    .last_failure
                    .lock()
                    .expect("stats lock")
                    .clone()
                    .unwrap_or_default()
            )
        })
    }
}
