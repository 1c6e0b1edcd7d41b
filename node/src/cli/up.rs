//! Operator commands: run one node, run a whole cluster file, show status.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use edgevec_client::{Client, ClientConfig};
use serde_json::{json, Value};
use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, Command};

use std::net::SocketAddr;
use std::path::PathBuf;

use super::Global;
use crate::config::{ClusterConfig, NodeConfig, Role};

#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct NodeCmd {
    #[command(subcommand)]
    action: Option<NodeAction>,
    /// Node id: one of the cluster file, or a new node (then give --addr and --data-dir).
    #[arg(long)]
    id: Option<u64>,
    /// QUIC address of a node that is not in the cluster file.
    #[arg(long)]
    addr: Option<SocketAddr>,
    /// Data directory of a node that is not in the cluster file.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Admin HTTP address of a node that is not in the cluster file.
    #[arg(long)]
    admin_addr: Option<SocketAddr>,
    #[arg(long, default_value = "default")]
    zone: String,
    /// Roles of a node that is not in the cluster file.
    #[arg(long, value_delimiter = ',', default_value = "data,proxy")]
    roles: Vec<String>,
}

#[derive(clap::Subcommand, Debug)]
enum NodeAction {
    /// Add a running node to the cluster (learner, then voter if it has the meta role).
    Add {
        #[arg(long)]
        id: u64,
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value = "default")]
        zone: String,
        #[arg(long, value_delimiter = ',', default_value = "data,proxy")]
        roles: Vec<String>,
    },
    /// Remove a node from the cluster.
    Remove {
        #[arg(long)]
        id: u64,
    },
}

/// `edgevec node ...`
pub async fn node(g: &Global, cmd: NodeCmd) -> Result<()> {
    match cmd.action {
        None => {
            let Some(id) = cmd.id else {
                bail!("give --id N to run a node, or use `node add` / `node remove`");
            };
            run_node(g, id, cmd).await
        }
        Some(NodeAction::Add { id, addr, zone, roles }) => {
            let client = super::connect(g).await?;
            let spec = edgevec_proto::NodeSpec {
                id,
                addr: addr.to_string(),
                zone,
                roles,
            };
            let (voters, learners) = client.add_node(spec).await?;
            print_membership(g, &voters, &learners);
            client.close().await;
            Ok(())
        }
        Some(NodeAction::Remove { id }) => {
            let client = super::connect(g).await?;
            let (voters, learners) = client.remove_node(id).await?;
            print_membership(g, &voters, &learners);
            client.close().await;
            Ok(())
        }
    }
}

fn print_membership(g: &Global, voters: &[u64], learners: &[u64]) {
    if g.json {
        println!("{}", json!({"voters": voters, "learners": learners}));
    } else {
        println!("voters: {voters:?}\nlearners: {learners:?}");
    }
}

/// Runs one node until SIGINT or SIGTERM.
async fn run_node(g: &Global, id: u64, cmd: NodeCmd) -> Result<()> {
    let cfg = ClusterConfig::load(&g.config)?;
    let node = match cfg.node(id) {
        Some(_) => crate::node::start(&cfg, id).await?,
        None => {
            let (Some(addr), Some(data_dir)) = (cmd.addr, cmd.data_dir) else {
                bail!(
                    "node {id} is not in {}; to run a new node give --addr and --data-dir, then add it with `edgevec node add`",
                    g.config.display()
                );
            };
            let roles = cmd
                .roles
                .iter()
                .map(|r| r.parse::<Role>().map_err(anyhow::Error::msg))
                .collect::<Result<Vec<_>>>()?;
            let node = NodeConfig {
                id,
                addr,
                admin_addr: cmd.admin_addr,
                data_dir,
                zone: cmd.zone,
                roles,
            };
            crate::node::start_node(&cfg, node).await?
        }
    };
    println!("edgevec node {id} listening on {}", node.addr);
    let fatal = tokio::select! {
        () = shutdown_signal() => None,
        why = node.fatal() => Some(why),
    };
    tracing::info!("stopping");
    node.stop().await;
    match fatal {
        None => Ok(()),
        Some(why) => bail!(
            "the metadata Raft of node {id} stopped ({why}); the node exits so that it can be started again \
             (`edgevec up` restarts it) once the cause is fixed"
        ),
    }
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler installs");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// `edgevec up`: starts every node of the file as a child process.
pub async fn up(path: &Path) -> Result<()> {
    let cfg = ClusterConfig::load(path)?;
    for w in &cfg.warnings {
        eprintln!("warning: {w}");
    }
    let certs = crate::certs::ensure(&cfg.cert_paths(), &cfg.name, &cfg.cert_names())?;
    if !certs.written.is_empty() {
        println!(
            "created {} certificate files in {}",
            certs.written.len(),
            cfg.certs_dir.display()
        );
    }
    let exe = std::env::current_exe().context("cannot find the edgevec executable")?;
    let config_path = path.canonicalize().with_context(|| format!("{}", path.display()))?;
    let mut children: Vec<(u64, Child)> = Vec::new();
    for node in &cfg.nodes {
        children.push((node.id, spawn_node(&exe, &config_path, node.id)?));
    }

    let token = cfg.strongest_token().map(|t| t.token.clone()).unwrap_or_default();
    let ca = edgevec_client::tls::read(&cfg.cert_paths().ca_cert())?;
    for node in &cfg.nodes {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let config = ClientConfig::new(vec![node.addr], ca.clone(), token.clone());
            if let Ok(client) = Client::connect(config).await {
                if client.status().await.is_ok() {
                    client.close().await;
                    break;
                }
            }
            if let Some((id, child)) = children.iter_mut().find(|(id, _)| *id == node.id) {
                if let Some(status) = child.try_wait()? {
                    bail!("node {id} exited during start-up ({status}); see its log above");
                }
            }
            if Instant::now() > deadline {
                bail!("node {} did not answer on {} within 60 s", node.id, node.addr);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let admin = node
            .admin_addr
            .map(|a| format!(", admin http://{a}"))
            .unwrap_or_default();
        println!(
            "node {} ready on {} (zone {}, data {}{admin})",
            node.id,
            node.addr,
            node.zone,
            node.data_dir.display()
        );
    }
    println!(
        "cluster {:?} is up: {} nodes. Try `edgevec --config {} status`. Ctrl-C stops it.",
        cfg.name,
        cfg.nodes.len(),
        path.display()
    );

    // Supervise: a node that exits is restarted with backoff while the
    // others keep serving; Ctrl-C (or SIGTERM) stops them all.
    let mut backoff: std::collections::HashMap<u64, (Duration, Instant)> = std::collections::HashMap::new();
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => {
                println!("stopping {} nodes", children.len());
                break;
            }
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
        for (id, child) in children.iter_mut() {
            let Ok(Some(status)) = child.try_wait() else { continue };
            let (delay, since) = backoff
                .get(id)
                .copied()
                .unwrap_or((RESTART_BACKOFF_MIN, Instant::now()));
            // A node that ran a good while before exiting starts over at the
            // shortest delay.
            let delay = if since.elapsed() > Duration::from_secs(60) {
                RESTART_BACKOFF_MIN
            } else {
                delay
            };
            eprintln!("node {id} exited ({status}); restarting it in {delay:?} (the others keep serving)");
            tokio::select! {
                _ = &mut shutdown => break,
                _ = tokio::time::sleep(delay) => {}
            }
            match spawn_node(&exe, &config_path, *id) {
                Ok(c) => *child = c,
                Err(e) => eprintln!("node {id} could not be restarted: {e:#}"),
            }
            backoff.insert(*id, ((delay * 2).min(RESTART_BACKOFF_MAX), Instant::now()));
        }
    }
    for (_, child) in &children {
        if let Some(pid) = child.id() {
            // SAFETY: plain syscall on a pid we spawned and have not reaped.
            unsafe {
                libc::kill(pid as i32, libc::SIGTERM);
            }
        }
    }
    for (id, child) in children.iter_mut() {
        match tokio::time::timeout(Duration::from_secs(15), child.wait()).await {
            Ok(_) => {}
            Err(_) => {
                eprintln!("node {id} did not stop in 15 s; killing it");
                let _ = child.kill().await;
            }
        }
    }
    Ok(())
}

/// First and longest wait before `up` restarts a node that exited.
const RESTART_BACKOFF_MIN: Duration = Duration::from_secs(1);
const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Starts one node of the cluster file as a child of `up`, its log lines
/// prefixed with its id (several nodes share a terminal).
fn spawn_node(exe: &Path, config_path: &Path, id: u64) -> Result<Child> {
    let mut cmd = Command::new(exe);
    cmd.arg("node")
        .arg("--config")
        .arg(config_path)
        .arg("--id")
        .arg(id.to_string());
    cmd.kill_on_drop(true);
    // If `up` itself dies (even by SIGKILL), its nodes must not live on
    // unsupervised: the kernel sends them SIGTERM.
    // SAFETY: prctl is async-signal-safe and touches no memory of ours.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("starting node {id}"))?;
    if let Some(stderr) = child.stderr.take() {
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                eprintln!("[node {id}] {line}");
            }
        });
    }
    Ok(child)
}

/// `edgevec status`: the cluster as the metadata leader sees it.
pub async fn status(g: &Global) -> Result<()> {
    let config = ClientConfig {
        connect_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_secs(5),
        ..super::client_config(g)?
    };
    let (status, shards, plugins) = match Client::connect(config).await {
        Ok(c) => {
            let s = c.cluster_status().await;
            let shards = c.shards(None).await;
            let plugins = c.list_plugins().await;
            c.close().await;
            (s?, shards.unwrap_or_default(), plugins.unwrap_or_default())
        }
        Err(e) => {
            if g.json {
                println!("{}", json!({"reachable": false, "error": e.to_string()}));
            }
            bail!("no node of the cluster answers: {e}");
        }
    };
    // Node states are the leader's verdicts: without a leader, what the
    // answering node last applied may be long out of date.
    let state_of = |n: &edgevec_proto::ClusterNode| {
        if status.leader.is_some() {
            n.state.to_string()
        } else {
            "unknown".to_string()
        }
    };
    // Plugins a node could not load or has disabled, with the reason.
    let plugin_problems: Vec<(String, u64, String, String)> = plugins
        .iter()
        .flat_map(|p| {
            p.nodes
                .iter()
                .filter(|n| n.state == "failed" || n.state == "disabled")
                .map(|n| {
                    (
                        p.name.clone(),
                        n.node,
                        n.state.clone(),
                        n.reason.clone().unwrap_or_default(),
                    )
                })
        })
        .collect();
    if g.json {
        let problems: Vec<Value> = plugin_problems
            .iter()
            .map(|(name, node, state, reason)| json!({"plugin": name, "node": node, "state": state, "reason": reason}))
            .collect();
        let nodes: Vec<Value> = status
            .nodes
            .iter()
            .map(|n| {
                json!({"id": n.id, "addr": n.addr, "zone": n.zone, "roles": n.roles, "state": state_of(n),
                       "voter": n.voter, "last_heartbeat_ms": n.last_heartbeat_ms, "applied_index": n.applied_index})
            })
            .collect();
        println!(
            "{}",
            json!({"reachable": true, "leader": status.leader, "term": status.term, "committed_index": status.committed_index,
                   "answered_by": status.answered_by, "nodes": nodes, "collections": super::data::shards_json(&shards),
                   "plugin_problems": problems})
        );
        return Ok(());
    }
    match status.leader {
        Some(l) => println!(
            "leader {l}, term {}, answered by node {}",
            status.term, status.answered_by
        ),
        None => println!(
            "no leader (term {}), answered by node {}",
            status.term, status.answered_by
        ),
    }
    println!(
        "{:>4} {:<22} {:<8} {:<16} {:<8} {:<7} {:>10} {:>8}",
        "ID", "ADDR", "ZONE", "ROLES", "STATE", "VOTER", "HEARTBEAT", "APPLIED"
    );
    for n in &status.nodes {
        println!(
            "{:>4} {:<22} {:<8} {:<16} {:<8} {:<7} {:>10} {:>8}",
            n.id,
            n.addr,
            n.zone,
            n.roles.join(","),
            state_of(n),
            if n.voter { "yes" } else { "learner" },
            n.last_heartbeat_ms
                .map(|ms| format!("{ms}ms ago"))
                .unwrap_or_else(|| "-".into()),
            n.applied_index.map(|i| i.to_string()).unwrap_or_else(|| "-".into()),
        );
    }
    let troubled: Vec<String> = shards
        .iter()
        .flat_map(|c| {
            c.shards.iter().flat_map(move |s| {
                s.problems
                    .iter()
                    .map(move |p| format!("{} shard {}: {p}", c.collection, s.shard))
            })
        })
        .collect();
    if troubled.is_empty() {
        println!("shards: {} collections, every shard fully replicated", shards.len());
    } else {
        println!("shards needing attention:");
        for t in troubled {
            println!("  {t}");
        }
    }
    for (name, node, state, reason) in &plugin_problems {
        println!("plugin {name} {state} on node {node}: {reason}");
    }
    Ok(())
}
