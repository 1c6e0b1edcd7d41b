//! Host-side bindings of the two worlds of wit/policy.wit.

pub mod lb {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "edgevec:policy/load-balancer",
    });
}

pub mod cp {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "edgevec:policy/consistency-policy",
        with: {
            "edgevec:policy/host": super::lb::edgevec::policy::host,
            "edgevec:policy/types": super::lb::edgevec::policy::types,
        },
    });
}
