//! Keeps the local engine's collections equal to the metadata's.
//!
//! Collections are created and dropped through the metadata Raft; every
//! node then makes its engine match: creates what the metadata has and the
//! engine lacks, drops what the engine has and the metadata no longer does,
//! and re-creates a collection whose schema changed (dropped and re-created
//! under the same name while this node was away). The decision is the pure
//! function [`plan`]; [`CatalogSync`] applies it.
//!
//! Invariant: the engine never drops a collection because of metadata that
//! is not yet known — nothing is dropped before this node has applied at
//! least one metadata entry (a fresh node starts with an empty state).

use std::collections::BTreeMap;
use std::sync::Arc;

use edgevec_engine::Engine;
use edgevec_meta::MetaState;
use edgevec_proto::CollectionSpec;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::meta::Meta;

/// What to do to make the engine match the metadata.
#[derive(Debug, Default, PartialEq)]
pub struct SyncPlan {
    pub create: Vec<CollectionSpec>,
    pub drop: Vec<String>,
}

/// Compares the metadata's collections with the engine's.
pub fn plan(wanted: &BTreeMap<String, CollectionSpec>, have: &BTreeMap<String, CollectionSpec>) -> SyncPlan {
    let mut p = SyncPlan::default();
    for (name, spec) in have {
        match wanted.get(name) {
            Some(w) if w == spec => {}
            _ => p.drop.push(name.clone()),
        }
    }
    for (name, spec) in wanted {
        if have.get(name) != Some(spec) {
            p.create.push(spec.clone());
        }
    }
    p
}

pub struct CatalogSync {
    engine: Arc<Engine>,
    meta: Meta,
    /// One sync at a time (the watcher and request handlers both call it).
    running: Mutex<()>,
}

impl CatalogSync {
    pub fn new(engine: Arc<Engine>, meta: Meta) -> Arc<Self> {
        Arc::new(Self {
            engine,
            meta,
            running: Mutex::new(()),
        })
    }

    /// Makes the engine match the current metadata.
    pub async fn sync(&self) {
        let _one = self.running.lock().await;
        if self.meta.metrics().last_applied.is_none() {
            return;
        }
        let state: Arc<MetaState> = self.meta.state();
        let wanted: BTreeMap<String, CollectionSpec> = state
            .collections()
            .map(|c| (c.spec.name.clone(), c.spec.clone()))
            .collect();
        let engine = self.engine.clone();
        let result = tokio::task::spawn_blocking(move || {
            let have: BTreeMap<String, CollectionSpec> = engine
                .list_collections()
                .into_iter()
                .map(|c| (c.spec.name.clone(), c.spec))
                .collect();
            let p = plan(&wanted, &have);
            for name in &p.drop {
                info!(collection = %name, "dropping local collection (not in metadata)");
                if let Err(e) = engine.drop_collection(name) {
                    warn!(collection = %name, error = %e, "drop failed");
                }
            }
            for spec in p.create {
                info!(collection = %spec.name, "creating local collection from metadata");
                match engine.create_collection(spec.clone()) {
                    Ok(()) | Err(edgevec_engine::EngineError::CollectionExists(_)) => {}
                    Err(e) => warn!(collection = %spec.name, error = %e, "create failed"),
                }
            }
        })
        .await;
        if let Err(e) = result {
            warn!(error = %e, "catalog sync task failed");
        }
    }

    /// Syncs on every metadata change until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut rx = self.meta.subscribe();
        self.sync().await;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                changed = rx.changed() => if changed.is_err() { return },
            }
            self.sync().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgevec_proto::Metric;

    fn specs(list: &[CollectionSpec]) -> BTreeMap<String, CollectionSpec> {
        list.iter().map(|s| (s.name.clone(), s.clone())).collect()
    }

    #[test]
    fn plan_creates_drops_and_recreates() {
        let a = CollectionSpec::new("a", 4, Metric::L2);
        let b = CollectionSpec::new("b", 4, Metric::L2);
        let b8 = CollectionSpec::new("b", 8, Metric::L2);
        let c = CollectionSpec::new("c", 4, Metric::Cosine);
        let p = plan(&specs(&[a.clone(), b8.clone()]), &specs(&[b, c]));
        assert_eq!(p.drop, vec!["b".to_string(), "c".to_string()]);
        assert_eq!(p.create, vec![a.clone(), b8]);
        assert_eq!(
            plan(&specs(std::slice::from_ref(&a)), &specs(&[a])),
            SyncPlan::default()
        );
    }
}
