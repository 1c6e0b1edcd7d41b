//! The plugins shipped with the node: built from plugins/ by
//! `plugins/build` and embedded, so a node has them without any
//! WebAssembly toolchain (CI checks the files are what plugins/ builds).

/// (name, component bytes) of every shipped plugin.
pub const BUILTIN: [(&str, &[u8]); 9] = [
    ("round-robin", include_bytes!("../../builtin-plugins/round-robin.wasm")),
    (
        "least-connections",
        include_bytes!("../../builtin-plugins/least-connections.wasm"),
    ),
    ("random", include_bytes!("../../builtin-plugins/random.wasm")),
    ("p2c-ewma", include_bytes!("../../builtin-plugins/p2c-ewma.wasm")),
    ("zone-aware", include_bytes!("../../builtin-plugins/zone-aware.wasm")),
    ("strong", include_bytes!("../../builtin-plugins/strong.wasm")),
    ("bounded", include_bytes!("../../builtin-plugins/bounded.wasm")),
    ("session", include_bytes!("../../builtin-plugins/session.wasm")),
    ("eventually", include_bytes!("../../builtin-plugins/eventually.wasm")),
];

/// The shipped plugin called `name`.
pub fn builtin(name: &str) -> Option<&'static [u8]> {
    BUILTIN.iter().find(|(n, _)| *n == name).map(|(_, b)| *b)
}
