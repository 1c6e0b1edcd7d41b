//! Write edgevec load-balancing and consistency policies.
//!
//! A policy is a Rust type implementing [`LoadBalancer`] or
//! [`ConsistencyPolicy`], exported with [`load_balancer!`] or
//! [`consistency_policy!`] and built with
//! `cargo build --target wasm32-unknown-unknown`; the node turns the module
//! into a component of the `edgevec:policy@1.0.0` contract (wit/).
//!
//! The same type runs natively in [`harness`], with the node's clock and
//! random generator replaced by seeded ones, so a policy's logic is tested
//! with `cargo test` before it is deployed.
//!
//! This crate owns the contract's data layouts ([`layout`]): the node fills
//! the lists with [`ReplicaInfo`] and [`RequestInfo`] and reads answers
//! with [`decode_order`] and [`decode_requirements`], so both sides agree
//! by construction.

extern crate self as edgevec_policy;

#[cfg(not(target_arch = "wasm32"))]
pub mod harness;
pub mod host;
pub mod layout;
mod rng;
mod view;

pub use rng::SplitMix64;
pub use view::*;

#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
pub mod __glue;
#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
pub use wit_bindgen as __wit_bindgen;

/// What a policy is told once, before it decides anything (see
/// `configure` in wit/policy.wit).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Configuration {
    /// Deploy-time `key = value` pairs, then the collection's own.
    pub params: Vec<(String, String)>,
    /// Zone names: a zone id is an index into this list.
    pub zones: Vec<String>,
    /// Level names: `strong`, `bounded`, `session`, `eventually`, then
    /// plugin-defined ones.
    pub levels: Vec<String>,
    /// (collection id, name).
    pub collections: Vec<(u64, String)>,
}

impl Configuration {
    /// The last value given for `key`.
    pub fn param(&self, key: &str) -> Option<&str> {
        self.params
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// `key` parsed as a number; `default` when absent, an error naming
    /// the key when it does not parse.
    pub fn param_u64(&self, key: &str, default: u64) -> Result<u64, String> {
        match self.param(key) {
            None => Ok(default),
            Some(v) => v
                .trim()
                .parse()
                .map_err(|_| format!("parameter {key} = {v:?} is not a whole number")),
        }
    }

    /// The id of zone `name`.
    pub fn zone_id(&self, name: &str) -> Option<u32> {
        self.zones.iter().position(|z| z == name).map(|i| i as u32)
    }

    /// The id of level `name`.
    pub fn level_id(&self, name: &str) -> Option<u32> {
        self.levels.iter().position(|l| l == name).map(|i| i as u32)
    }

    /// A configuration with the four standard levels and these zones.
    pub fn with_zones(zones: &[&str]) -> Self {
        Configuration {
            params: Vec::new(),
            zones: zones.iter().map(|z| z.to_string()).collect(),
            levels: layout::LEVELS.iter().map(|l| l.to_string()).collect(),
            collections: Vec::new(),
        }
    }
}

/// A load-balancing policy: orders the candidate replicas of a shard for
/// one read. The node tries them in that order until one answers.
pub trait LoadBalancer: Sized + 'static {
    /// Takes the configuration; an error refuses the deploy with its text.
    fn configure(config: &Configuration) -> Result<Self, String>;

    /// Pushes candidate indices onto `order`, best first. Candidates left
    /// out are tried after the pushed ones, in the given order.
    fn order(&mut self, request: &Request<'_>, replicas: &Replicas<'_>, order: &mut Order);
}

/// A consistency policy: says, per candidate replica, whether it may serve
/// the read and what it must then satisfy.
pub trait ConsistencyPolicy: Sized + 'static {
    /// Takes the configuration; an error refuses the deploy with its text.
    fn configure(config: &Configuration) -> Result<Self, String>;

    /// Sets a [`Requirement`] per candidate on `out` (all start as
    /// [`Requirement::Skip`]).
    fn requirements(&mut self, request: &ConsistencyRequest<'_>, replicas: &Replicas<'_>, out: &mut Requirements);
}

/// Exports `$t` (a [`LoadBalancer`]) as the plugin's load balancer. Does
/// nothing outside WebAssembly, so the crate also builds for tests.
#[macro_export]
macro_rules! load_balancer {
    ($t:ty) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            ::std::thread_local! {
                static STATE: ::core::cell::RefCell<Option<$t>> = const { ::core::cell::RefCell::new(None) };
            }
            struct Glue;
            impl $crate::__glue::lb::exports::edgevec::policy::balancer::Guest for Glue {
                fn configure(config: $crate::__glue::lb::edgevec::policy::types::Configuration) -> Result<(), String> {
                    STATE.with(|s| $crate::__glue::lb_configure::<$t>(s, config))
                }
                fn order(request: Vec<u64>, replicas: Vec<u64>) -> u64 {
                    STATE.with(|s| $crate::__glue::lb_order::<$t>(s, &request, &replicas))
                }
            }
    $crate::__glue::lb::__export_load_balancer!(Glue with_types_in $crate::__glue::lb);
        };
    };
}

/// Exports `$t` (a [`ConsistencyPolicy`]) as the plugin's consistency
/// policy. Does nothing outside WebAssembly.
#[macro_export]
macro_rules! consistency_policy {
    ($t:ty) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            ::std::thread_local! {
                static STATE: ::core::cell::RefCell<Option<$t>> = const { ::core::cell::RefCell::new(None) };
            }
            struct Glue;
            impl $crate::__glue::cp::exports::edgevec::policy::consistency::Guest for Glue {
                fn configure(config: $crate::__glue::lb::edgevec::policy::types::Configuration) -> Result<(), String> {
                    STATE.with(|s| $crate::__glue::cp_configure::<$t>(s, config))
                }
                fn requirements(request: Vec<u64>, replicas: Vec<u64>) -> (u64, u64) {
                    STATE.with(|s| $crate::__glue::cp_requirements::<$t>(s, &request, &replicas))
                }
            }
    $crate::__glue::cp::__export_consistency_policy!(Glue with_types_in $crate::__glue::cp);
        };
    };
}
