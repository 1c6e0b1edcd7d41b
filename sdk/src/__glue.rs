//! Bindings of the two worlds and the calls the export macros make.
//! WebAssembly only.

use std::cell::RefCell;

use crate::{
    Configuration, ConsistencyPolicy, ConsistencyRequest, LoadBalancer, Order, Replicas, Request, Requirements,
};

pub mod lb {
    wit_bindgen::generate!({
        path: "../wit",
        world: "edgevec:policy/load-balancer",
        default_bindings_module: "edgevec_policy::__glue::lb",
        pub_export_macro: true,
        export_macro_name: "__export_load_balancer",
        runtime_path: "edgevec_policy::__wit_bindgen::rt",
    });
}

pub mod cp {
    wit_bindgen::generate!({
        path: "../wit",
        world: "edgevec:policy/consistency-policy",
        with: {
            "edgevec:policy/types@1.0.0": crate::__glue::lb::edgevec::policy::types,
        },
        default_bindings_module: "edgevec_policy::__glue::cp",
        pub_export_macro: true,
        export_macro_name: "__export_consistency_policy",
        runtime_path: "edgevec_policy::__wit_bindgen::rt",
    });
}

type WireConfiguration = lb::edgevec::policy::types::Configuration;

fn configure_with<T>(
    state: &RefCell<Option<T>>,
    c: WireConfiguration,
    configure: impl FnOnce(&Configuration) -> Result<T, String>,
) -> Result<(), String> {
    let config = Configuration {
        params: c.params,
        zones: c.zones,
        levels: c.levels,
        collections: c.collections,
    };
    *state.borrow_mut() = Some(configure(&config)?);
    Ok(())
}

pub fn lb_configure<T: LoadBalancer>(state: &RefCell<Option<T>>, c: WireConfiguration) -> Result<(), String> {
    configure_with(state, c, T::configure)
}

/// An unconfigured policy answers "no preference".
pub fn lb_order<T: LoadBalancer>(state: &RefCell<Option<T>>, request: &[u64], replicas: &[u64]) -> u64 {
    let mut state = state.borrow_mut();
    let Some(policy) = state.as_mut() else { return 0 };
    let rs = Replicas(replicas);
    let mut order = Order::new(rs.len());
    policy.order(&Request(request), &rs, &mut order);
    order.packed()
}

pub fn cp_configure<T: ConsistencyPolicy>(state: &RefCell<Option<T>>, c: WireConfiguration) -> Result<(), String> {
    configure_with(state, c, T::configure)
}

/// An unconfigured policy skips every replica (the node then uses the
/// level's strict answer).
pub fn cp_requirements<T: ConsistencyPolicy>(
    state: &RefCell<Option<T>>,
    request: &[u64],
    replicas: &[u64],
) -> (u64, u64) {
    let mut state = state.borrow_mut();
    let Some(policy) = state.as_mut() else { return (0, 0) };
    let rs = Replicas(replicas);
    let mut out = Requirements::new(rs.len());
    policy.requirements(&ConsistencyRequest(request), &rs, &mut out);
    out.packed()
}
