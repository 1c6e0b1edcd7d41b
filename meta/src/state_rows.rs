//! The state machine's redb file (`meta-state.redb`): one row per entity,
//! the applied marker and the current snapshot.
//!
//! Tables (layout version [`STATE_FORMAT`]):
//!
//! | table               | key                   | value                                   |
//! |---------------------|-----------------------|-----------------------------------------|
//! | `applied`           | `"applied"`           | [`AppliedRow`]: last applied id, last membership |
//! | `nodes`             | node id               | [`NodeRow`]                             |
//! | `collections_by_id` | collection id         | [`CollectionRow`] (record + shard configurations) |
//! | `counters`          | `"next_collection_id"`| [`CounterRow`]                          |
//! | `plugins`           | (name, version)       | [`PluginRow`] (hash + bytes)            |
//! | `settings`          | key                   | value (UTF-8)                           |
//! | `deployed_plugins`  | plugin name           | [`DeployedRow`] (its deployed versions) |
//! | `load_balancers`    | collection id         | [`BalancerRow`] (plugin name)           |
//! | `snapshot`          | `"current"`           | `snapshot::StoredSnapshot`              |
//!
//! Per-entity rows rather than one blob because plugin modules can be
//! megabytes: applying `SetSetting` must not rewrite them. A collection's
//! shard configurations live in its row; they are small and change with it.
//! The id counter is a row of its own because it outlives every collection
//! (a dropped collection's id is never handed out again).
//!
//! The last two tables came after format 2 was first written: a file
//! without them reads as having no deployed plugin and no collection with
//! its own load balancer, and they are created by the first write.
//!
//! Format 1 (before stable collection ids) kept collections by name in a
//! `collections` table as `CollectionRow::V1` and had no counter; opening
//! such a file upgrades it to format 2 in one transaction (`state_v1`).
//!
//! Invariant: the rows always equal the [`MetaState`] obtained by applying
//! the log up to the stored last applied id, because each apply batch
//! writes the rows it touched and the marker in one transaction.

use std::collections::BTreeSet;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

use crate::command::{CommandV1, CommandV2, MetaCommand};
use crate::disk::{decode, encode};
use crate::error::MetaStoreError;
use crate::state::{CollectionRecord, MetaState, NodeRecord, PluginRecord};
use crate::state_v1::CollectionRecordV1;
use crate::state_v3::CollectionRecordV2;
use crate::state_v4::CollectionRecordV3;
use crate::types::{LogId, StoredMembership};

/// Layout version of `meta-state.redb`.
pub const STATE_FORMAT: u32 = 2;
/// The oldest layout this build reads (and upgrades on open).
pub const OLDEST_STATE_FORMAT: u32 = 1;

const APPLIED: TableDefinition<&str, &[u8]> = TableDefinition::new("applied");
const NODES: TableDefinition<u64, &[u8]> = TableDefinition::new("nodes");
const COLLECTIONS: TableDefinition<u64, &[u8]> = TableDefinition::new("collections_by_id");
const COUNTERS: TableDefinition<&str, &[u8]> = TableDefinition::new("counters");
const PLUGINS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("plugins");
const SETTINGS: TableDefinition<&str, &[u8]> = TableDefinition::new("settings");
const DEPLOYED: TableDefinition<&str, &[u8]> = TableDefinition::new("deployed_plugins");
const BALANCERS: TableDefinition<u64, &[u8]> = TableDefinition::new("load_balancers");
pub(crate) const SNAPSHOT: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshot");

const APPLIED_KEY: &str = "applied";
const NEXT_COLLECTION_ID: &str = "next_collection_id";

#[derive(Serialize, Deserialize)]
enum AppliedRow {
    V1 {
        last_applied: Option<LogId>,
        last_membership: StoredMembership,
    },
}

#[derive(Serialize, Deserialize)]
enum NodeRow {
    V1(NodeRecord),
}

/// V1 rows exist only in format-1 files (table `collections`, by name).
#[derive(Serialize, Deserialize)]
pub(crate) enum CollectionRow {
    V1(CollectionRecordV1),
    V2(CollectionRecordV2),
    V3(CollectionRecordV3),
    V4(CollectionRecord),
}

#[derive(Serialize, Deserialize)]
enum CounterRow {
    V1(u64),
}

#[derive(Serialize, Deserialize)]
enum PluginRow {
    V1(PluginRecord),
}

#[derive(Serialize, Deserialize)]
enum DeployedRow {
    V1(crate::plugins::DeployedPlugin),
}

#[derive(Serialize, Deserialize)]
enum BalancerRow {
    V1(String),
}

/// An entity row (see `MetaState`'s invariants).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Row {
    Node(u64),
    /// By collection id.
    Collection(u64),
    NextCollectionId,
    Plugin(String, String),
    Setting(String),
    /// A deployed plugin, by name.
    Deployed(String),
    /// A collection's load balancer, by collection id.
    Balancer(u64),
}

impl Row {
    /// The rows `cmd` changes if it applies to `before` (the state just
    /// before it). From the state because commands name a collection by
    /// name (V1 drop) or by id (V2) while rows are keyed by id.
    pub(crate) fn touched_by(cmd: &MetaCommand, before: &MetaState) -> Vec<Row> {
        let created = || vec![Row::Collection(before.next_collection_id), Row::NextCollectionId];
        match cmd {
            MetaCommand::V1(c) => match c {
                CommandV1::RegisterNode { id, .. }
                | CommandV1::SetNodeState { id, .. }
                | CommandV1::RemoveNode { id } => vec![Row::Node(*id)],
                CommandV1::CreateCollection { .. } => created(),
                CommandV1::DropCollection { name } => before
                    .collection(name)
                    .map(|c| [Row::Collection(c.id), Row::Balancer(c.id)])
                    .into_iter()
                    .flatten()
                    .collect(),
                // Always refused.
                CommandV1::PutShardMap { .. } => vec![],
                CommandV1::PutPlugin { name, version, .. } | CommandV1::RemovePlugin { name, version } => {
                    vec![Row::Plugin(name.clone(), version.clone())]
                }
                CommandV1::SetSetting { key, .. } => vec![Row::Setting(key.clone())],
            },
            MetaCommand::V2(c) => match c {
                CommandV2::CreateCollection { .. }
                | CommandV2::CreateCollectionV2 { .. }
                | CommandV2::CreateCollectionV3 { .. } => created(),
                CommandV2::ShardCas { collection, .. } | CommandV2::SetReplication { collection, .. } => {
                    vec![Row::Collection(*collection)]
                }
                CommandV2::DeployPlugin { name, .. } | CommandV2::RemovePluginVersions { name } => {
                    vec![Row::Deployed(name.clone())]
                }
                CommandV2::SetLoadBalancer { collection, .. } => vec![Row::Balancer(*collection)],
            },
        }
    }
}

/// A row's new content, encoded: `None` deletes it.
pub(crate) struct RowWrite {
    row: Row,
    value: Option<Vec<u8>>,
}

/// Encode the current content of `rows` in `state`.
pub(crate) fn encode_rows(state: &MetaState, rows: BTreeSet<Row>) -> Result<Vec<RowWrite>, MetaStoreError> {
    rows.into_iter()
        .map(|row| {
            let value = match &row {
                Row::Node(id) => state.nodes.get(id).map(|n| encode("node", &NodeRow::V1(n.clone()))),
                Row::Collection(id) => state
                    .collection_by_id(*id)
                    .map(|c| encode("collection", &CollectionRow::V4(c.clone()))),
                Row::NextCollectionId => Some(encode(NEXT_COLLECTION_ID, &CounterRow::V1(state.next_collection_id))),
                Row::Plugin(name, version) => state
                    .plugin(name, version)
                    .map(|p| encode("plugin", &PluginRow::V1(p.clone()))),
                Row::Setting(key) => state.settings.get(key).map(|v| Ok(v.clone().into_bytes())),
                Row::Deployed(name) => state
                    .deployed
                    .get(name)
                    .map(|d| encode("deployed plugin", &DeployedRow::V1(d.clone()))),
                Row::Balancer(id) => state
                    .balancers
                    .get(id)
                    .map(|b| encode("load balancer", &BalancerRow::V1(b.clone()))),
            }
            .transpose()?;
            Ok(RowWrite { row, value })
        })
        .collect()
}

/// Write encoded rows in `txn`.
pub(crate) fn write_rows(txn: &WriteTransaction, writes: &[RowWrite]) -> Result<(), MetaStoreError> {
    let mut nodes = txn.open_table(NODES)?;
    let mut collections = txn.open_table(COLLECTIONS)?;
    let mut counters = txn.open_table(COUNTERS)?;
    let mut plugins = txn.open_table(PLUGINS)?;
    let mut settings = txn.open_table(SETTINGS)?;
    let mut deployed = txn.open_table(DEPLOYED)?;
    let mut balancers = txn.open_table(BALANCERS)?;
    for w in writes {
        let value = w.value.as_deref();
        match &w.row {
            Row::Node(id) => match value {
                Some(v) => drop(nodes.insert(*id, v)?),
                None => drop(nodes.remove(*id)?),
            },
            Row::Collection(id) => match value {
                Some(v) => drop(collections.insert(*id, v)?),
                None => drop(collections.remove(*id)?),
            },
            Row::NextCollectionId => match value {
                Some(v) => drop(counters.insert(NEXT_COLLECTION_ID, v)?),
                None => drop(counters.remove(NEXT_COLLECTION_ID)?),
            },
            Row::Plugin(name, version) => match value {
                Some(v) => drop(plugins.insert((name.as_str(), version.as_str()), v)?),
                None => drop(plugins.remove((name.as_str(), version.as_str()))?),
            },
            Row::Setting(key) => match value {
                Some(v) => drop(settings.insert(key.as_str(), v)?),
                None => drop(settings.remove(key.as_str())?),
            },
            Row::Deployed(name) => match value {
                Some(v) => drop(deployed.insert(name.as_str(), v)?),
                None => drop(deployed.remove(name.as_str())?),
            },
            Row::Balancer(id) => match value {
                Some(v) => drop(balancers.insert(*id, v)?),
                None => drop(balancers.remove(*id)?),
            },
        }
    }
    Ok(())
}

/// Replace every entity row with `state` (snapshot install).
pub(crate) fn replace_all(txn: &WriteTransaction, state: &MetaState) -> Result<(), MetaStoreError> {
    txn.open_table(NODES)?.retain(|_, _| false)?;
    txn.open_table(COLLECTIONS)?.retain(|_, _| false)?;
    txn.open_table(COUNTERS)?.retain(|_, _| false)?;
    txn.open_table(PLUGINS)?.retain(|_, _| false)?;
    txn.open_table(SETTINGS)?.retain(|_, _| false)?;
    txn.open_table(DEPLOYED)?.retain(|_, _| false)?;
    txn.open_table(BALANCERS)?.retain(|_, _| false)?;
    let rows: BTreeSet<Row> = state
        .nodes
        .keys()
        .map(|id| Row::Node(*id))
        .chain(state.collections.values().map(|c| Row::Collection(c.id)))
        .chain([Row::NextCollectionId])
        .chain(state.plugins.keys().map(|(n, v)| Row::Plugin(n.clone(), v.clone())))
        .chain(state.settings.keys().map(|k| Row::Setting(k.clone())))
        .chain(state.deployed.keys().map(|n| Row::Deployed(n.clone())))
        .chain(state.balancers.keys().map(|id| Row::Balancer(*id)))
        .collect();
    write_rows(txn, &encode_rows(state, rows)?)
}

/// Record what has been applied, in the same transaction as the rows.
pub(crate) fn write_applied(
    txn: &WriteTransaction,
    last_applied: Option<LogId>,
    last_membership: &StoredMembership,
) -> Result<(), MetaStoreError> {
    let bytes = encode(
        APPLIED_KEY,
        &AppliedRow::V1 {
            last_applied,
            last_membership: last_membership.clone(),
        },
    )?;
    txn.open_table(APPLIED)?.insert(APPLIED_KEY, bytes.as_slice())?;
    Ok(())
}

/// Create the tables of a new (or upgraded) file.
pub(crate) fn create_tables(txn: &WriteTransaction) -> Result<(), MetaStoreError> {
    txn.open_table(APPLIED)?;
    txn.open_table(NODES)?;
    txn.open_table(COLLECTIONS)?;
    txn.open_table(COUNTERS)?;
    txn.open_table(PLUGINS)?;
    txn.open_table(SETTINGS)?;
    txn.open_table(DEPLOYED)?;
    txn.open_table(BALANCERS)?;
    txn.open_table(SNAPSHOT)?;
    Ok(())
}

/// What `load` finds on disk.
pub(crate) struct Loaded {
    pub state: MetaState,
    pub last_applied: Option<LogId>,
    pub last_membership: StoredMembership,
}

/// Read the whole state machine (one read transaction: a consistent view)
/// from a file of the current format.
pub(crate) fn load(db: &Database) -> Result<Loaded, MetaStoreError> {
    let txn = db.begin_read()?;
    let mut loaded = read_common(&txn)?;
    for row in txn.open_table(COLLECTIONS)?.iter()? {
        let (id, v) = row?;
        let what = format!("collection {}", id.value());
        let c = match decode(&what, v.value())? {
            CollectionRow::V4(c) => c,
            CollectionRow::V3(c) => c.upgrade(),
            CollectionRow::V2(c) => c.upgrade(),
            CollectionRow::V1(_) => return Err(MetaStoreError::corrupt(what, "a format-1 row in a format-2 table")),
        };
        if c.id != id.value() {
            return Err(MetaStoreError::corrupt(
                what,
                format!("the row holds collection {}", c.id),
            ));
        }
        loaded.state.collections.insert(c.spec.name.clone(), c);
    }
    if let Some(v) = txn.open_table(COUNTERS)?.get(NEXT_COLLECTION_ID)? {
        let CounterRow::V1(next) = decode(NEXT_COLLECTION_ID, v.value())?;
        loaded.state.next_collection_id = next;
    }
    match txn.open_table(DEPLOYED) {
        Ok(table) => {
            for row in table.iter()? {
                let (name, v) = row?;
                let DeployedRow::V1(d) = decode(&format!("deployed plugin {}", name.value()), v.value())?;
                loaded.state.deployed.insert(name.value().to_owned(), d);
            }
        }
        Err(redb::TableError::TableDoesNotExist(_)) => {}
        Err(e) => return Err(e.into()),
    }
    match txn.open_table(BALANCERS) {
        Ok(table) => {
            for row in table.iter()? {
                let (id, v) = row?;
                let BalancerRow::V1(name) = decode(&format!("load balancer of collection {}", id.value()), v.value())?;
                loaded.state.balancers.insert(id.value(), name);
            }
        }
        Err(redb::TableError::TableDoesNotExist(_)) => {}
        Err(e) => return Err(e.into()),
    }
    Ok(loaded)
}

/// What every format shares: the applied marker, nodes, plugins and
/// settings. Collections and the counter are left to the caller (their
/// layout is what changed between formats).
pub(crate) fn read_common(txn: &redb::ReadTransaction) -> Result<Loaded, MetaStoreError> {
    let (last_applied, last_membership) = match txn.open_table(APPLIED)?.get(APPLIED_KEY)? {
        Some(v) => {
            let AppliedRow::V1 {
                last_applied,
                last_membership,
            } = decode(APPLIED_KEY, v.value())?;
            (last_applied, last_membership)
        }
        None => (None, StoredMembership::default()),
    };
    let mut state = MetaState::default();
    for row in txn.open_table(NODES)?.iter()? {
        let (id, v) = row?;
        let NodeRow::V1(n) = decode(&format!("node {}", id.value()), v.value())?;
        state.nodes.insert(id.value(), n);
    }
    for row in txn.open_table(PLUGINS)?.iter()? {
        let (key, v) = row?;
        let (name, version) = key.value();
        let PluginRow::V1(p) = decode(&format!("plugin {name} {version}"), v.value())?;
        state.plugins.insert((name.to_owned(), version.to_owned()), p);
    }
    for row in txn.open_table(SETTINGS)?.iter()? {
        let (k, v) = row?;
        let value = String::from_utf8(v.value().to_vec())
            .map_err(|e| MetaStoreError::corrupt(format!("setting {:?}", k.value()), e))?;
        state.settings.insert(k.value().to_owned(), value);
    }
    Ok(Loaded {
        state,
        last_applied,
        last_membership,
    })
}
