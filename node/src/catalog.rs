//! Keeps the local engine's collections equal to the metadata's.
//!
//! Collections are created and dropped through the metadata Raft; every
//! node then makes its engine match: creates what the metadata has and the
//! engine lacks, drops what the engine has and the metadata no longer does,
//! and re-creates a collection that was dropped and created again under the
//! same name while this node was away — even with the same schema, because
//! each creation has its own *incarnation* (its creation time in the
//! metadata), which this node records in `catalog-sync.json` beside the
//! engine. The decision is the pure function [`plan`]; [`CatalogSync`]
//! applies it.
//!
//! Invariants:
//! - the engine never drops a collection because of metadata that is not
//!   yet known: nothing is dropped before this node has applied at least
//!   one metadata entry (a fresh node starts with an empty state);
//! - the incarnation is recorded before the engine creates the collection
//!   and forgotten after the engine dropped it, so a crash between the two
//!   steps never makes a live collection look like a stale one; a local
//!   collection with no recorded incarnation is adopted, not dropped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
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

/// A collection as the metadata wants it: schema and incarnation.
#[derive(Debug, Clone, PartialEq)]
pub struct Wanted {
    pub spec: CollectionSpec,
    pub incarnation: u64,
}

/// Compares the metadata's collections with the engine's (`have`) and the
/// incarnations this node recorded (`known`).
pub fn plan(
    wanted: &BTreeMap<String, Wanted>,
    have: &BTreeMap<String, CollectionSpec>,
    known: &BTreeMap<String, u64>,
) -> SyncPlan {
    let mut p = SyncPlan::default();
    let mut kept = Vec::new();
    for (name, spec) in have {
        let keep = wanted
            .get(name)
            .is_some_and(|w| w.spec == *spec && known.get(name).is_none_or(|k| *k == w.incarnation));
        if keep {
            kept.push(name);
        } else {
            p.drop.push(name.clone());
        }
    }
    for (name, w) in wanted {
        if !kept.contains(&name) {
            p.create.push(w.spec.clone());
        }
    }
    p
}

/// The incarnations of the local collections, persisted as versioned JSON
/// and replaced atomically (the engine's durable write: temp file, fsync,
/// rename, fsync directory).
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Incarnations {
    version: u32,
    collections: BTreeMap<String, u64>,
}

const INCARNATIONS_VERSION: u32 = 1;

impl Incarnations {
    fn load(path: &Path) -> std::io::Result<Self> {
        match std::fs::read(path) {
            Ok(bytes) => {
                let inc: Incarnations = serde_json::from_slice(&bytes).map_err(|e| {
                    std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: {e}", path.display()))
                })?;
                if inc.version != INCARNATIONS_VERSION {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("{}: unsupported version {}", path.display(), inc.version),
                    ));
                }
                Ok(inc)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Incarnations {
                version: INCARNATIONS_VERSION,
                collections: BTreeMap::new(),
            }),
            Err(e) => Err(e),
        }
    }

    fn save(&self, path: &Path) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(self).expect("plain data encodes");
        edgevec_engine::fsutil::write_atomic(path, &bytes).map_err(|e| std::io::Error::other(e.to_string()))
    }
}

pub struct CatalogSync {
    engine: Arc<Engine>,
    meta: Meta,
    /// Where the incarnations are recorded.
    path: PathBuf,
    /// One sync at a time (the watcher and request handlers both call it).
    running: Mutex<()>,
}

impl CatalogSync {
    /// `path` is the incarnation file (`catalog-sync.json` in the data dir).
    pub fn new(engine: Arc<Engine>, meta: Meta, path: PathBuf) -> Arc<Self> {
        Arc::new(Self {
            engine,
            meta,
            path,
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
        let wanted: BTreeMap<String, Wanted> = state
            .collections()
            .map(|c| {
                let w = Wanted {
                    spec: c.spec.clone(),
                    incarnation: c.created_at_ms,
                };
                (c.spec.name.clone(), w)
            })
            .collect();
        let engine = self.engine.clone();
        let path = self.path.clone();
        let result = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let mut known = Incarnations::load(&path)?;
            let have: BTreeMap<String, CollectionSpec> = engine
                .list_collections()
                .into_iter()
                .map(|c| (c.spec.name.clone(), c.spec))
                .collect();
            let p = plan(&wanted, &have, &known.collections);
            let mut failed = Vec::new();
            for name in &p.drop {
                info!(collection = %name, "dropping local collection (not in metadata, or an older incarnation)");
                match engine.drop_collection(name) {
                    Ok(()) | Err(edgevec_engine::EngineError::CollectionNotFound(_)) => {}
                    Err(e) => {
                        warn!(collection = %name, error = %e, "drop failed; retried at the next sync");
                        failed.push(name.clone());
                    }
                }
            }
            // Record what is kept (adopting local collections that have no
            // recorded incarnation) and forget what was dropped. A failed
            // drop keeps its old record, so it still looks stale next time.
            let before = known.collections.clone();
            let mut after: BTreeMap<String, u64> = wanted
                .iter()
                .filter(|(name, _)| have.contains_key(*name) && !p.drop.contains(*name))
                .map(|(name, w)| (name.clone(), w.incarnation))
                .collect();
            for name in &failed {
                if let Some(old) = before.get(name) {
                    after.insert(name.clone(), *old);
                }
            }
            known.collections = after;
            if known.collections != before {
                known.save(&path)?;
            }
            for spec in p.create.into_iter().filter(|s| !failed.contains(&s.name)) {
                info!(collection = %spec.name, "creating local collection from metadata");
                known
                    .collections
                    .insert(spec.name.clone(), wanted[&spec.name].incarnation);
                known.save(&path)?;
                match engine.create_collection(spec.clone()) {
                    Ok(()) | Err(edgevec_engine::EngineError::CollectionExists(_)) => {}
                    Err(e) => warn!(collection = %spec.name, error = %e, "create failed"),
                }
            }
            Ok(())
        })
        .await;
        let result = match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                warn!(error = %e, path = %self.path.display(), "catalog sync could not record incarnations");
                Ok(())
            }
            Err(e) => Err(e),
        };
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

    fn have(list: &[CollectionSpec]) -> BTreeMap<String, CollectionSpec> {
        list.iter().map(|s| (s.name.clone(), s.clone())).collect()
    }

    fn wanted(list: &[(CollectionSpec, u64)]) -> BTreeMap<String, Wanted> {
        list.iter()
            .map(|(s, i)| {
                let w = Wanted {
                    spec: s.clone(),
                    incarnation: *i,
                };
                (s.name.clone(), w)
            })
            .collect()
    }

    #[test]
    fn plan_creates_drops_and_recreates() {
        let a = CollectionSpec::new("a", 4, Metric::L2);
        let b = CollectionSpec::new("b", 4, Metric::L2);
        let b8 = CollectionSpec::new("b", 8, Metric::L2);
        let c = CollectionSpec::new("c", 4, Metric::Cosine);
        let none = BTreeMap::new();
        let p = plan(&wanted(&[(a.clone(), 1), (b8.clone(), 2)]), &have(&[b, c]), &none);
        assert_eq!(p.drop, vec!["b".to_string(), "c".to_string()]);
        assert_eq!(p.create, vec![a.clone(), b8]);
        let p = plan(&wanted(&[(a.clone(), 1)]), &have(std::slice::from_ref(&a)), &none);
        assert_eq!(p, SyncPlan::default());
    }

    #[test]
    fn same_schema_new_incarnation_is_recreated() {
        let a = CollectionSpec::new("a", 4, Metric::L2);
        let known: BTreeMap<String, u64> = [("a".to_string(), 1)].into();
        let p = plan(&wanted(&[(a.clone(), 2)]), &have(std::slice::from_ref(&a)), &known);
        assert_eq!(p.drop, vec!["a".to_string()]);
        assert_eq!(p.create, vec![a.clone()]);
        // Same incarnation, or none recorded: kept.
        let p = plan(&wanted(&[(a.clone(), 1)]), &have(std::slice::from_ref(&a)), &known);
        assert_eq!(p, SyncPlan::default());
        let p = plan(
            &wanted(&[(a.clone(), 9)]),
            &have(std::slice::from_ref(&a)),
            &BTreeMap::new(),
        );
        assert_eq!(p, SyncPlan::default());
    }

    #[test]
    fn incarnations_round_trip_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog-sync.json");
        let mut inc = Incarnations::load(&path).unwrap();
        assert!(inc.collections.is_empty());
        inc.collections.insert("a".into(), 5);
        inc.save(&path).unwrap();
        assert_eq!(Incarnations::load(&path).unwrap().collections["a"], 5);
        std::fs::write(&path, br#"{"version":9,"collections":{}}"#).unwrap();
        assert!(Incarnations::load(&path).is_err());
    }
}
