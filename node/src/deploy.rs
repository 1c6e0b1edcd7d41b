//! Deployment of policy plugins through the cluster (ARCHITECTURE.md,
//! "Plugins").
//!
//! A deploy is checked, compiled and configured on the node that receives
//! it, then its bytes go into that node's content-addressed store and are
//! pushed to the other metadata nodes; only once a majority of them hold
//! the bytes is the version proposed through the metadata Raft (name,
//! kind, SHA-256, size, params, holders — never the bytes). Every node
//! follows the metadata: it fetches the bytes of a new active version from
//! a holder (or any node that has them), checks their hash, compiles them
//! in the background (or loads its cached compilation) and swaps the
//! version in; calls in flight finish on the old one.
//!
//! Invariants:
//! - nothing is proposed before a majority of metadata nodes hold the
//!   bytes, so a committed version can always be fetched while a majority
//!   is up;
//! - bytes are trusted only after their hash matches the metadata's;
//! - compiling happens on blocking threads, never in Raft apply nor on a
//!   request path; until a version is loaded the previous one (or the
//!   built-in decision) serves.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use edgevec_meta::plugins::{check_name, shipped_kind, PluginKind, PluginVersion};
use edgevec_meta::{CommandV2, MetaCommand};
use edgevec_proto::internal::{NodeOpV1, NodeReplyV1};
use edgevec_proto::limits::{MAX_PLUGIN_BYTES, MAX_PLUGIN_PARAMS, MAX_PLUGIN_PARAM_BYTES};
use edgevec_proto::{ErrorCode, WireError};
use sha2::{Digest, Sha256};

use crate::policy::store::{hex, BlobStore};
use crate::policy::Kind;
use crate::replication::{unavailable, DataPlane};

/// The cluster setting that makes shipped load balancers decide with their
/// native build (`"true"`).
pub const NATIVE_SETTING: &str = "plugins.native";

/// Deadline of one push or fetch of plugin bytes.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a node retries versions it could not load.
const RETRY_EVERY: Duration = Duration::from_secs(2);
/// Stored bytes and compilations that no kept version uses are deleted
/// once this old (a deploy pushes bytes before its version commits).
const UNUSED_AFTER: Duration = Duration::from_secs(600);
/// How often unused bytes and compilations are looked for.
const COLLECT_EVERY: Duration = Duration::from_secs(60);

fn invalid(msg: impl Into<String>) -> WireError {
    WireError::new(ErrorCode::InvalidArgument, msg)
}

/// Deploys plugins and keeps this node's loaded versions in line with the
/// metadata.
pub struct Deployer {
    plane: Arc<DataPlane>,
    store: BlobStore,
    /// Versions being loaded here, by name.
    loading: Mutex<HashMap<String, u64>>,
}

impl Deployer {
    pub fn new(plane: Arc<DataPlane>, store: BlobStore) -> Arc<Self> {
        Arc::new(Deployer {
            plane,
            store,
            loading: Mutex::new(HashMap::new()),
        })
    }

    /// Checks, stores, spreads and proposes a new version of `name`;
    /// returns its number and hex SHA-256 once committed.
    pub async fn deploy(
        self: &Arc<Self>,
        name: &str,
        bytes: Vec<u8>,
        params: Vec<(String, String)>,
    ) -> Result<(u64, String), WireError> {
        check_name(name).map_err(invalid)?;
        if bytes.len() > MAX_PLUGIN_BYTES {
            return Err(WireError::new(
                ErrorCode::InvalidArgument,
                format!(
                    "plugin is {} bytes, above the {MAX_PLUGIN_BYTES} byte limit",
                    bytes.len()
                ),
            ));
        }
        if params.len() > MAX_PLUGIN_PARAMS
            || params
                .iter()
                .any(|(k, v)| k.is_empty() || k.len() > MAX_PLUGIN_PARAM_BYTES || v.len() > MAX_PLUGIN_PARAM_BYTES)
        {
            return Err(invalid(format!(
                "at most {MAX_PLUGIN_PARAMS} params, each key non-empty and key and value at most {MAX_PLUGIN_PARAM_BYTES} bytes"
            )));
        }
        // Check, compile and configure here first: a plugin that cannot
        // load is refused before anything is stored or proposed.
        let config = self.plane.policies.configuration_with(&params);
        let loaded = self
            .plane
            .policies
            .engine()
            .load(name, bytes.clone(), config)
            .await
            .map_err(|e| invalid(e.to_string()))?;
        let kind = match loaded.kind {
            Kind::LoadBalancer => PluginKind::LoadBalancer,
            Kind::Consistency => PluginKind::Consistency,
        };
        drop(loaded);
        let sha: [u8; 32] = Sha256::digest(&bytes).into();
        self.store
            .put(&sha, &bytes)
            .map_err(|e| WireError::new(ErrorCode::Internal, e.to_string()))?;
        let holders = self.spread(&sha, &bytes).await?;
        let at_ms = crate::faults::wall_ms();
        let cmd = MetaCommand::V2(CommandV2::DeployPlugin {
            name: name.to_owned(),
            kind,
            sha256: sha,
            size: bytes.len() as u64,
            params: params.clone(),
            holders,
            at_ms,
        });
        let resp = self.plane.meta.write(cmd).await?;
        if let Some(e) = crate::service::rejected(&resp) {
            return Err(e);
        }
        let state = self.plane.meta.state();
        let version = state
            .deployed
            .get(name)
            .and_then(|d| d.active())
            .filter(|(_, v)| v.sha256 == sha && v.params == params)
            .map(|(n, _)| n)
            .ok_or_else(|| {
                WireError::new(
                    ErrorCode::OutcomeUnknown,
                    format!("plugin {name}: another deploy committed right after this one; see `edgevec plugin list`"),
                )
            })?;
        self.sync();
        Ok((version, hex(&sha)))
    }

    /// Pushes the bytes to every other metadata node; returns the nodes
    /// holding them once a majority of metadata nodes do.
    async fn spread(&self, sha: &[u8; 32], bytes: &[u8]) -> Result<Vec<u64>, WireError> {
        let state = self.plane.meta.state();
        let me = self.plane.me;
        let meta_nodes: Vec<u64> = state.nodes().filter(|n| n.has_role("meta")).map(|n| n.id).collect();
        let pushes = state.nodes().map(|n| n.id).filter(|id| *id != me).map(|node| {
            let op = NodeOpV1::PluginPut {
                sha256: *sha,
                bytes: bytes.to_vec(),
            };
            async move { (node, self.plane.call(node, op, TRANSFER_TIMEOUT).await) }
        });
        let mut holders = vec![me];
        let mut failed = Vec::new();
        for (node, r) in futures::future::join_all(pushes).await {
            match r {
                Ok(NodeReplyV1::PluginStored) => holders.push(node),
                Ok(other) => failed.push(format!("node {node}: unexpected reply {other:?}")),
                Err(e) => failed.push(format!("node {node}: {}", e.message)),
            }
        }
        holders.sort_unstable();
        let held = meta_nodes.iter().filter(|n| holders.contains(n)).count();
        let majority = meta_nodes.len() / 2 + 1;
        if held < majority {
            return Err(unavailable(format!(
                "the plugin reached {held} of {} metadata nodes, fewer than a majority ({}); nothing was deployed, retry",
                meta_nodes.len(),
                failed.join("; ")
            )));
        }
        Ok(holders)
    }

    /// Removes every deployed version of `name`.
    pub async fn remove(self: &Arc<Self>, name: &str) -> Result<(), WireError> {
        let cmd = MetaCommand::V2(CommandV2::RemovePluginVersions { name: name.to_owned() });
        let resp = self.plane.meta.write(cmd).await?;
        if let Some(e) = crate::service::rejected(&resp) {
            return Err(e);
        }
        self.sync();
        Ok(())
    }

    /// A peer's push: keep the bytes.
    pub fn on_put(&self, sha: &[u8; 32], bytes: &[u8]) -> Result<(), WireError> {
        self.store.put(sha, bytes).map_err(|e| match e {
            crate::policy::store::StoreError::Io { .. } => WireError::new(ErrorCode::Internal, e.to_string()),
            other => invalid(other.to_string()),
        })
    }

    /// A peer's fetch.
    pub fn on_get(&self, sha: &[u8; 32]) -> Result<Vec<u8>, WireError> {
        self.store
            .get(sha)
            .ok_or_else(|| WireError::new(ErrorCode::NotFound, format!("no plugin bytes {} here", hex(sha))))
    }

    /// Deletes stored bytes and compiled artifacts of plugins that no
    /// version the metadata keeps uses (and that are not shipped): the
    /// metadata proves they were dropped.
    pub fn collect_unused(&self, min_age: Duration) -> Vec<std::path::PathBuf> {
        let state = self.plane.meta.state();
        let mut keep: std::collections::HashSet<String> = state
            .deployed
            .values()
            .flat_map(|d| d.versions.values().map(|v| hex(&v.sha256)))
            .collect();
        keep.extend(
            crate::policy::builtin::BUILTIN
                .iter()
                .map(|(_, b)| crate::policy::cache::sha256_hex(b)),
        );
        let mut removed = self.store.remove_unused(&keep, min_age);
        removed.extend(self.plane.policies.engine().remove_unused_artifacts(&keep, min_age));
        for path in &removed {
            tracing::info!(path = %path.display(), "removed plugin bytes no kept version uses");
        }
        removed
    }

    /// Follows the metadata until the node stops.
    pub async fn run(self: Arc<Self>) {
        let mut changes = self.plane.meta.subscribe();
        let mut collected = std::time::Instant::now();
        loop {
            self.sync();
            if collected.elapsed() > COLLECT_EVERY {
                collected = std::time::Instant::now();
                let this = self.clone();
                let _ = tokio::task::spawn_blocking(move || this.collect_unused(UNUSED_AFTER)).await;
            }
            tokio::select! {
                _ = self.plane.shutdown.cancelled() => return,
                changed = changes.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(RETRY_EVERY) => {}
            }
        }
    }

    /// Starts loading every active version this node does not run yet, and
    /// goes back to the built-in version of a shipped plugin whose
    /// deployed versions were removed.
    pub fn sync(self: &Arc<Self>) {
        let state = self.plane.meta.state();
        let policies = &self.plane.policies;
        policies.set_native(state.setting(NATIVE_SETTING) == Some("true"));
        for (name, deployed) in &state.deployed {
            let Some((version, v)) = deployed.active() else {
                continue;
            };
            if policies.active_version(name) == Some(version) {
                continue;
            }
            {
                let mut loading = self.loading.lock().expect("loading lock");
                if loading.get(name) == Some(&version) {
                    continue;
                }
                loading.insert(name.clone(), version);
            }
            let this = self.clone();
            let (name, v) = (name.clone(), v.clone());
            self.plane.tasks.spawn(async move {
                if let Err(e) = this.load_version(&name, version, &v).await {
                    this.plane
                        .policies
                        .load_failed(&name, format!("version {version}: {e}"));
                }
                this.loading.lock().expect("loading lock").remove(&name);
            });
        }
        for (name, version) in policies.installed() {
            if state.deployed.contains_key(&name) {
                continue;
            }
            match shipped_kind(&name) {
                None => policies.uninstall(&name),
                Some(_) if version > 1 => {
                    {
                        let mut loading = self.loading.lock().expect("loading lock");
                        if loading.get(&name) == Some(&1) {
                            continue;
                        }
                        loading.insert(name.clone(), 1);
                    }
                    let this = self.clone();
                    self.plane.tasks.spawn(async move {
                        let again = this.clone();
                        let n = name.clone();
                        let r = tokio::task::spawn_blocking(move || again.plane.policies.reload_builtin(&n)).await;
                        if let Ok(Err(e)) = r {
                            this.plane.policies.load_failed(&name, e.to_string());
                        }
                        this.loading.lock().expect("loading lock").remove(&name);
                    });
                }
                Some(_) => {}
            }
        }
    }

    async fn load_version(&self, name: &str, version: u64, v: &PluginVersion) -> Result<(), String> {
        let bytes = match self.store.get(&v.sha256) {
            Some(b) => b,
            None => self.fetch(v).await?,
        };
        let config = self.plane.policies.configuration_with(&v.params);
        let loaded = self
            .plane
            .policies
            .engine()
            .load(name, bytes, config)
            .await
            .map_err(|e| e.to_string())?;
        self.plane.policies.install(loaded, version, "deployed");
        Ok(())
    }

    /// The bytes of `v` from a holder, else from any other node.
    async fn fetch(&self, v: &PluginVersion) -> Result<Vec<u8>, String> {
        let state = self.plane.meta.state();
        let mut sources: Vec<u64> = v.holders.iter().copied().filter(|n| *n != self.plane.me).collect();
        sources.extend(
            state
                .nodes()
                .map(|n| n.id)
                .filter(|n| *n != self.plane.me && !v.holders.contains(n)),
        );
        let mut errors = Vec::new();
        for node in sources {
            match self
                .plane
                .call(node, NodeOpV1::PluginGet { sha256: v.sha256 }, TRANSFER_TIMEOUT)
                .await
            {
                Ok(NodeReplyV1::PluginBytes(bytes)) => match self.store.put(&v.sha256, &bytes) {
                    Ok(()) => return Ok(bytes),
                    Err(e) => errors.push(format!("node {node}: {e}")),
                },
                Ok(other) => errors.push(format!("node {node}: unexpected reply {other:?}")),
                Err(e) => errors.push(format!("node {node}: {}", e.message)),
            }
        }
        Err(format!(
            "bytes {} not fetched from any node ({})",
            hex(&v.sha256),
            errors.join("; ")
        ))
    }
}
