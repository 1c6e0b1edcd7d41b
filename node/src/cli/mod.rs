//! The `edgevec` command line.
//!
//! One binary for operators (`up`, `node`, `certs`, `status`) and for
//! people working with data (`collection`, `insert`, `search`, `get`,
//! `delete`). Every command that prints takes `--json` for machine-readable
//! output. Connection settings come from flags, the environment
//! (`EDGEVEC_TOKEN`), or the cluster file (`--config`, default
//! `./cluster.toml`): its proxy nodes are the endpoints, its CA is trusted
//! and, for a development cluster, its strongest token is used.

mod bench;
mod data;
mod insert;
mod plugin;
mod up;

pub use bench::read_matrix;

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use edgevec_client::{Client, ClientConfig, CollectionSpec, Metric, ReplicationSpec};
use serde_json::{json, Value};

use crate::config::{ClusterConfig, Role};

#[derive(Parser, Debug)]
#[command(name = "edgevec", version, about = "Replicated vector search for edge sites")]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct Global {
    /// Cluster file.
    #[arg(long, global = true, default_value = "cluster.toml", env = "EDGEVEC_CONFIG")]
    pub config: PathBuf,
    /// Node to talk to (repeatable); default: the proxy nodes of the cluster file.
    #[arg(long = "endpoint", global = true)]
    pub endpoints: Vec<SocketAddr>,
    /// CA certificate (PEM); default: ca.pem in the cluster file's certs_dir.
    #[arg(long, global = true)]
    pub ca: Option<PathBuf>,
    /// API token; default: the strongest token of the cluster file.
    #[arg(long, global = true, env = "EDGEVEC_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print machine-readable JSON.
    #[arg(long, global = true)]
    pub json: bool,
    /// Consistency level of searches and gets: strong, bounded[:ms],
    /// session, eventually, or a deployed consistency plugin's name
    /// (default: the cluster's, bounded:5000).
    #[arg(long, global = true)]
    pub consistency: Option<String>,
    /// The client's zone (for zone-aware load balancing; default: the
    /// zone of the node reached).
    #[arg(long, global = true)]
    pub zone: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a node (`--id N`), or change membership (`node add`, `node remove`).
    Node(up::NodeCmd),
    /// Run every node of a cluster file on this host; Ctrl-C stops them.
    Up {
        /// Cluster file (default: --config).
        file: Option<PathBuf>,
    },
    /// Create the dev CA and node/client certificates the cluster file needs.
    Certs {
        /// Also make a certificate for a node that is not in the file.
        #[arg(long = "node")]
        extra_node: Option<u64>,
        /// Host (IP or DNS name) the extra node is reached at.
        #[arg(long, requires = "extra_node", default_value = "127.0.0.1")]
        host: String,
    },
    /// Show the cluster: leader, term, and every node with its health.
    Status,
    /// Compiles a plugin component read from stdin to stdout within a
    /// memory limit (what a node runs as its child; not for people).
    #[command(name = "plugin-compile", hide = true)]
    PluginCompile {
        #[arg(long)]
        memory_bytes: u64,
    },
    /// Manage collections.
    #[command(subcommand)]
    Collection(CollectionCmd),
    /// Insert (upsert) points from a JSON-lines or .npy file.
    Insert(insert::InsertArgs),
    /// Nearest neighbours of a vector.
    Search {
        collection: String,
        /// Query vector as a JSON array.
        #[arg(long)]
        vector: String,
        #[arg(long, default_value_t = 10)]
        k: u32,
        /// Leave payloads out of the result.
        #[arg(long)]
        no_payload: bool,
        /// HNSW search expansion: candidates kept while walking each
        /// segment's graph (more finds more of the true neighbours, slower;
        /// at least k is used) [default: 64].
        #[arg(long)]
        ef: Option<u32>,
        /// Compare with every point (brute force) instead of walking the
        /// index: exact, at a cost linear in the collection's size.
        #[arg(long)]
        exact: bool,
        /// Only points whose payload passes this filter (JSON), e.g.
        /// '{"must":[{"key":"lang","match":"en"},{"key":"year","range":{"gte":2020}}]}':
        /// must/should/must_not over match, in, range, on fields the
        /// collection declared with --index-field.
        #[arg(long)]
        filter: Option<String>,
    },
    /// Load a running cluster and measure it: `bench search` (QPS,
    /// latency, recall) and `bench insert` (rows per second).
    #[command(subcommand)]
    Bench(bench::BenchCmd),
    /// Read points by id.
    Get {
        collection: String,
        /// Comma-separated ids.
        #[arg(long, value_delimiter = ',', required = true)]
        ids: Vec<u64>,
    },
    /// Delete points by id.
    Delete {
        collection: String,
        /// Comma-separated ids.
        #[arg(
            long,
            value_delimiter = ',',
            required_unless_present = "filter",
            conflicts_with = "filter"
        )]
        ids: Vec<u64>,
        /// Delete the points whose payload passes this filter (JSON, see
        /// `search --filter`) instead of listed ids.
        #[arg(long)]
        filter: Option<String>,
    },
    /// Count the live points of a collection, or those whose payload
    /// passes a filter.
    Count {
        collection: String,
        /// Count only points whose payload passes this filter (JSON, see
        /// `search --filter`).
        #[arg(long)]
        filter: Option<String>,
    },
    /// Policy plugins: `plugin list` shows each one's version and its state
    /// on every node.
    #[command(subcommand)]
    Plugin(PluginCmd),
    /// Change a collection's replica count while it serves (new replicas
    /// catch up, then join; surplus ones are dropped).
    Load {
        collection: String,
        #[arg(long, required_unless_present_any = ["lb", "hedge"])]
        replicas: Option<u32>,
        /// Replicas that must hold a write before it is acknowledged
        /// (default: 2 when replicas >= 3, else 1).
        #[arg(long, requires = "replicas")]
        min_insync: Option<u32>,
        /// Load-balancing plugin that picks the replica of each read.
        #[arg(long)]
        lb: Option<String>,
        /// `on`: a read also goes to the next replica when the first has
        /// not answered within its usual (p95) time; `off` (the default).
        #[arg(long, value_parser = ["on", "off"])]
        hedge: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum PluginCmd {
    /// Every plugin: kind, version, origin, size, hash, collections using
    /// it, and its state on every node.
    List,
    /// Deploy a WebAssembly module or component as the next version of
    /// plugin NAME; every node loads it and swaps it in.
    Deploy {
        name: String,
        file: PathBuf,
        /// `key=value` given to the plugin's `configure` (repeatable).
        #[arg(long = "param", value_parser = parse_param)]
        params: Vec<(String, String)>,
    },
    /// Remove every deployed version of a plugin (a shipped plugin goes
    /// back to its built-in version).
    Remove { name: String },
    /// `on`: the shipped load balancers decide with their native build on
    /// every node; `off` (the default): with their WebAssembly build.
    Native {
        #[arg(value_parser = ["on", "off"])]
        mode: String,
    },
}

fn parse_param(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_string(), v.to_string()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("{s:?} is not key=value"))
}

#[derive(Subcommand, Debug)]
pub enum CollectionCmd {
    /// Create a collection.
    Create {
        name: String,
        #[arg(long)]
        dim: u32,
        /// l2, ip or cosine.
        #[arg(long, default_value = "l2")]
        metric: Metric,
        #[arg(long, default_value_t = 1)]
        shards: u32,
        /// Rows of a growing segment before it is sealed and indexed.
        #[arg(long, default_value_t = edgevec_proto::limits::DEFAULT_SEAL_ROWS)]
        seal_rows: u32,
        /// Copies of every shard, each on its own data node.
        #[arg(long, default_value_t = 1)]
        replicas: u32,
        /// Replicas that must hold a write before it is acknowledged
        /// (default: 2 when replicas >= 3, else 1).
        #[arg(long)]
        min_insync: Option<u32>,
        /// Load-balancing plugin that picks the replica of each read
        /// (default: round-robin; `edgevec plugin list` shows them).
        #[arg(long)]
        lb: Option<String>,
        /// HNSW graph degree (links per row): higher recalls better at a
        /// given ef, costs memory and build time.
        #[arg(long, default_value_t = edgevec_proto::limits::DEFAULT_HNSW_M)]
        hnsw_m: u32,
        /// HNSW candidates considered while linking a row: higher builds a
        /// better graph, more slowly.
        #[arg(long, default_value_t = edgevec_proto::limits::DEFAULT_EF_CONSTRUCTION)]
        ef_construction: u32,
        /// A payload index, `name:type` (keyword, int, float, bool): the
        /// top-level payload fields that search filters may use. Repeat
        /// for several.
        #[arg(long = "index-field", value_parser = edgevec_proto::FieldSpec::parse)]
        index_fields: Vec<edgevec_proto::FieldSpec>,
    },
    /// List collections.
    List,
    /// Show a collection's schema, counts, segments and index state.
    Describe { name: String },
    /// Drop a collection and its data.
    Drop { name: String },
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> Result<()> {
    let g = cli.global;
    match cli.command {
        Command::Node(cmd) => up::node(&g, cmd).await,
        Command::Up { file } => up::up(file.as_ref().unwrap_or(&g.config)).await,
        Command::Certs { extra_node, host } => certs(&g, extra_node, host),
        Command::Status => up::status(&g).await,
        Command::PluginCompile { memory_bytes } => std::process::exit(crate::policy::compile::child_main(memory_bytes)),
        Command::Collection(c) => collection(&g, c).await,
        Command::Insert(args) => insert::insert(&g, args).await,
        Command::Search {
            collection,
            vector,
            k,
            no_payload,
            ef,
            exact,
            filter,
        } => {
            let opts = edgevec_client::ReadOpts {
                ef,
                exact,
                filter,
                ..Default::default()
            };
            data::search(&g, &collection, &vector, k, !no_payload, &opts).await
        }
        Command::Get { collection, ids } => data::get(&g, &collection, &ids).await,
        Command::Bench(cmd) => bench::run(&g, cmd).await,
        Command::Delete {
            collection,
            ids,
            filter: None,
        } => data::delete(&g, &collection, &ids).await,
        Command::Delete {
            collection,
            filter: Some(filter),
            ..
        } => data::delete_by_filter(&g, &collection, &filter).await,
        Command::Count { collection, filter } => data::count(&g, &collection, filter.as_deref()).await,
        Command::Plugin(PluginCmd::List) => plugin::list(&g).await,
        Command::Plugin(PluginCmd::Deploy { name, file, params }) => plugin::deploy(&g, &name, &file, params).await,
        Command::Plugin(PluginCmd::Remove { name }) => plugin::remove(&g, &name).await,
        Command::Plugin(PluginCmd::Native { mode }) => {
            let client = connect(&g).await?;
            client.set_native_policies(mode == "on").await?;
            client.close().await;
            if g.json {
                println!("{}", json!({"native": mode == "on"}));
            } else if mode == "on" {
                println!("the shipped load balancers now decide with their native build");
            } else {
                println!("the shipped load balancers now decide with their WebAssembly build");
            }
            Ok(())
        }
        Command::Load {
            collection,
            replicas,
            min_insync,
            lb,
            hedge,
        } => {
            let client = connect(&g).await?;
            if let Some(replicas) = replicas {
                client
                    .load(&collection, ReplicationSpec { replicas, min_insync })
                    .await?;
            }
            if let Some(lb) = &lb {
                client.set_load_balancer(&collection, lb).await?;
            }
            if let Some(hedge) = &hedge {
                client.set_hedging(&collection, hedge == "on").await?;
            }
            client.close().await;
            if g.json {
                println!(
                    "{}",
                    json!({"loaded": collection, "replicas": replicas, "load_balancer": lb, "hedge": hedge})
                );
            } else {
                if let Some(replicas) = replicas {
                    println!("{collection}: replica count set to {replicas}; new replicas catch up in the background (see `edgevec collection describe {collection}`)");
                }
                if let Some(lb) = lb {
                    println!("{collection}: reads now pick their replica with {lb}");
                }
                if let Some(hedge) = hedge {
                    println!("{collection}: hedged reads {hedge}");
                }
            }
            Ok(())
        }
    }
}

fn load_config(g: &Global) -> Result<ClusterConfig> {
    ClusterConfig::load(&g.config).with_context(|| format!("loading {}", g.config.display()))
}

/// Client settings from flags, falling back to the cluster file.
pub fn client_config(g: &Global) -> Result<ClientConfig> {
    let file = if g.endpoints.is_empty() || g.ca.is_none() || g.token.is_none() {
        Some(load_config(g)?)
    } else {
        None
    };
    let endpoints = if g.endpoints.is_empty() {
        let file = file.as_ref().expect("loaded above");
        file.nodes
            .iter()
            .filter(|n| n.has_role(Role::Proxy))
            .map(|n| n.addr)
            .collect()
    } else {
        g.endpoints.clone()
    };
    let ca = match &g.ca {
        Some(ca) => ca.clone(),
        None => {
            let ca = file.as_ref().expect("loaded above").cert_paths().ca_cert();
            if !ca.exists() {
                bail!(
                    "the cluster CA {} does not exist yet: start the cluster with `edgevec up` (or make certificates with `edgevec certs`), or pass --ca",
                    ca.display()
                );
            }
            ca
        }
    };
    let token = match &g.token {
        Some(t) => t.clone(),
        None => file
            .as_ref()
            .expect("loaded above")
            .strongest_token()
            .map(|t| t.token.clone())
            .context("no --token, no EDGEVEC_TOKEN and no [[tokens]] in the cluster file")?,
    };
    let mut config = ClientConfig::from_ca_file(endpoints, &ca, token)?;
    config.consistency = g.consistency.clone();
    config.zone = g.zone.clone();
    Ok(config)
}

pub async fn connect(g: &Global) -> Result<Client> {
    Ok(Client::connect(client_config(g)?).await?)
}

fn certs(g: &Global, extra_node: Option<u64>, host: String) -> Result<()> {
    let cfg = load_config(g)?;
    let mut names = cfg.cert_names();
    if let Some(id) = extra_node {
        names.push(crate::certs::NodeName { id, hosts: vec![host] });
    }
    let done = crate::certs::ensure(&cfg.cert_paths(), &cfg.name, &names)?;
    if g.json {
        println!(
            "{}",
            json!({"dir": cfg.certs_dir, "written": done.written, "kept": done.kept})
        );
    } else {
        for p in &done.written {
            println!("wrote {}", p.display());
        }
        println!(
            "{} files written, {} kept in {}",
            done.written.len(),
            done.kept.len(),
            cfg.certs_dir.display()
        );
    }
    Ok(())
}

async fn collection(g: &Global, cmd: CollectionCmd) -> Result<()> {
    let client = connect(g).await?;
    match cmd {
        CollectionCmd::Create {
            name,
            dim,
            metric,
            shards,
            seal_rows,
            replicas,
            min_insync,
            lb,
            hnsw_m,
            ef_construction,
            index_fields,
        } => {
            let spec = CollectionSpec::new(&name, dim, metric)
                .with_shards(shards)
                .with_seal_rows(seal_rows);
            let index = edgevec_proto::IndexSpec {
                m: hnsw_m,
                ef_construction,
            };
            client
                .create_with_fields(spec, ReplicationSpec { replicas, min_insync }, index, index_fields)
                .await?;
            if let Some(lb) = &lb {
                client.set_load_balancer(&name, lb).await.with_context(|| {
                    format!("collection {name} was created, but its load balancer is still round-robin")
                })?;
            }
            let lb = lb.as_deref().unwrap_or(edgevec_meta::plugins::DEFAULT_LOAD_BALANCER);
            if g.json {
                println!("{}", json!({"created": name, "load_balancer": lb}));
            } else {
                println!(
                    "created collection {name} (dim {dim}, {metric}, {shards} shards, {replicas} replicas, load balancer {lb})"
                );
            }
        }
        CollectionCmd::List => {
            let all = client.list_collections().await?;
            if g.json {
                println!(
                    "{}",
                    serde_json::Value::Array(all.iter().map(data::collection_json).collect())
                );
            } else if all.is_empty() {
                println!("no collections");
            } else {
                println!(
                    "{:<24} {:>6} {:<7} {:>6} {:>12}",
                    "NAME", "DIM", "METRIC", "SHARDS", "POINTS"
                );
                for c in all {
                    println!(
                        "{:<24} {:>6} {:<7} {:>6} {:>12}",
                        c.spec.name, c.spec.dim, c.spec.metric, c.spec.shards, c.points
                    );
                }
            }
        }
        CollectionCmd::Describe { name } => {
            let details = client.collection_details(&name).await?;
            let c = &details.info;
            let shards = client.shards(Some(&name)).await?;
            // The plugin whose list of collections names this one.
            let balancer = client
                .list_plugins()
                .await?
                .into_iter()
                .find(|p| p.kind == "load-balancer" && p.collections.contains(&name))
                .map(|p| (p.name, p.version));
            if g.json {
                let mut v = data::collection_json(c);
                v["index"] = json!({"hnsw_m": details.index.m, "ef_construction": details.index.ef_construction});
                v["payload_indexes"] = details
                    .fields
                    .iter()
                    .map(|f| json!({"field": f.name, "type": f.kind.name()}))
                    .collect();
                v["builds"] = details
                    .builds
                    .iter()
                    .map(|b| json!({"shard": b.shard, "segment": b.segment, "rows_indexed": b.rows_indexed, "rows": b.rows}))
                    .collect();
                v["replication"] = data::shards_json(&shards);
                v["load_balancer"] =
                    balancer.map_or(Value::Null, |(n, version)| json!({"name": n, "version": version}));
                println!("{v}");
            } else {
                data::print_collection(c);
                println!(
                    "  index: hnsw m {}, ef_construction {}",
                    details.index.m, details.index.ef_construction
                );
                if !details.fields.is_empty() {
                    let fields: Vec<String> = details
                        .fields
                        .iter()
                        .map(|f| format!("{}:{}", f.name, f.kind.name()))
                        .collect();
                    println!("  payload indexes: {}", fields.join(", "));
                }
                for b in &details.builds {
                    println!(
                        "  shard {} segment {}: index build at {} of {} rows ({:.0}%)",
                        b.shard,
                        b.segment,
                        b.rows_indexed,
                        b.rows,
                        100.0 * b.rows_indexed as f64 / b.rows.max(1) as f64
                    );
                }
                if let Some((n, version)) = balancer {
                    println!("  load balancer {n} (version {version})");
                }
                data::print_shards(&shards);
            }
        }
        CollectionCmd::Drop { name } => {
            client.drop_collection(&name).await?;
            if g.json {
                println!("{}", json!({"dropped": name}));
            } else {
                println!("dropped collection {name}");
            }
        }
    }
    client.close().await;
    Ok(())
}

/// Parses a JSON array of numbers as a vector.
pub fn parse_vector(text: &str) -> Result<Vec<f32>> {
    let v: Vec<f64> = serde_json::from_str(text)
        .with_context(|| format!("--vector must be a JSON array of numbers, got {text:?}"))?;
    if v.is_empty() {
        bail!("--vector is empty");
    }
    Ok(v.into_iter().map(|x| x as f32).collect())
}
