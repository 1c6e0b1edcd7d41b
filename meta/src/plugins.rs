//! Policy plugins in the metadata: the deployed versions of each plugin
//! and the load balancer each collection uses.
//!
//! A plugin's bytes are never in the log: the deploying node stores them,
//! content-addressed by SHA-256, on a majority of the metadata nodes
//! (`holders`) before it proposes the version, and every node fetches them
//! from a holder. The nine shipped plugins exist without any entry: each
//! one's version 1 is built into the node, so a deployed version of a
//! shipped name starts at 2.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What a plugin implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum PluginKind {
    LoadBalancer,
    Consistency,
}

impl std::fmt::Display for PluginKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PluginKind::LoadBalancer => "load balancer",
            PluginKind::Consistency => "consistency policy",
        })
    }
}

/// The plugins every node ships with, and their kinds.
pub const SHIPPED: [(&str, PluginKind); 9] = [
    ("round-robin", PluginKind::LoadBalancer),
    ("least-connections", PluginKind::LoadBalancer),
    ("random", PluginKind::LoadBalancer),
    ("p2c-ewma", PluginKind::LoadBalancer),
    ("zone-aware", PluginKind::LoadBalancer),
    ("strong", PluginKind::Consistency),
    ("bounded", PluginKind::Consistency),
    ("session", PluginKind::Consistency),
    ("eventually", PluginKind::Consistency),
];

/// The load balancer of a collection that names none.
pub const DEFAULT_LOAD_BALANCER: &str = "round-robin";

/// Deployed versions kept per plugin (older ones are dropped by the
/// deploy that makes them surplus).
pub const KEPT_VERSIONS: usize = 3;

/// The kind of a shipped plugin.
pub fn shipped_kind(name: &str) -> Option<PluginKind> {
    SHIPPED.iter().find(|(n, _)| *n == name).map(|(_, k)| *k)
}

/// One deployed version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginVersion {
    pub sha256: [u8; 32],
    pub size: u64,
    /// `key = value` pairs given at deploy time (`configure` receives them).
    pub params: Vec<(String, String)>,
    /// Nodes that held the bytes when the version was proposed.
    pub holders: Vec<u64>,
    /// The proposer's clock (ms since the Unix epoch), for display.
    pub at_ms: u64,
}

/// Every deployed version of one plugin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployedPlugin {
    pub kind: PluginKind,
    /// By version number; the newest is the active one.
    pub versions: BTreeMap<u64, PluginVersion>,
}

impl DeployedPlugin {
    /// The active (newest) version and its number.
    pub fn active(&self) -> Option<(u64, &PluginVersion)> {
        self.versions.iter().next_back().map(|(v, p)| (*v, p))
    }
}

/// Checks a plugin name: 1 to 64 characters of `a-z`, `0-9` and `-`.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 64 {
        return Err(format!("plugin name {name:?} must be 1 to 64 characters"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(format!(
            "plugin name {name:?} may only use lowercase letters, digits and '-'"
        ));
    }
    Ok(())
}
