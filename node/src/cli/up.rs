//! Operator commands: run one node, run a whole cluster file, show status.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use edgevec_client::{Client, ClientConfig};
use serde_json::{json, Value};
use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, Command};

use super::Global;
use crate::config::ClusterConfig;

/// `edgevec node`: runs one node until SIGINT or SIGTERM.
pub async fn run_node(config: &Path, id: u64) -> Result<()> {
    let cfg = ClusterConfig::load(config)?;
    let node = crate::node::start(&cfg, id).await?;
    println!("edgevec node {id} listening on {}", node.addr);
    shutdown_signal().await;
    tracing::info!("stopping");
    node.stop().await;
    Ok(())
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
        let mut cmd = Command::new(&exe);
        cmd.arg("node")
            .arg("--config")
            .arg(&config_path)
            .arg("--id")
            .arg(node.id.to_string());
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
        let mut child = cmd.spawn().with_context(|| format!("starting node {}", node.id))?;
        // Prefix each node's log lines with its id: several nodes share a terminal.
        if let Some(stderr) = child.stderr.take() {
            let id = node.id;
            tokio::spawn(async move {
                let mut lines = tokio::io::BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    eprintln!("[node {id}] {line}");
                }
            });
        }
        children.push((node.id, child));
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
        println!(
            "node {} ready on {} (zone {}, data {})",
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

    let exited = async {
        loop {
            for (id, child) in children.iter_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    return (*id, status);
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    tokio::select! {
        _ = shutdown_signal() => println!("stopping {} nodes", children.len()),
        (id, status) = exited => eprintln!("node {id} exited ({status}); stopping the others"),
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

/// `edgevec status`: asks every node of the file about itself.
pub async fn status(g: &Global) -> Result<()> {
    let cfg = ClusterConfig::load(&g.config)?;
    let base = super::client_config(g)?;
    let mut rows = Vec::new();
    for node in &cfg.nodes {
        let config = ClientConfig {
            endpoints: vec![node.addr],
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(5),
            ..base.clone()
        };
        let answer = match Client::connect(config).await {
            Ok(c) => {
                let s = c.status().await;
                c.close().await;
                s.map_err(|e| e.to_string())
            }
            Err(e) => Err(e.to_string()),
        };
        rows.push((node, answer));
    }
    if g.json {
        let out: Vec<Value> = rows
            .iter()
            .map(|(n, a)| match a {
                Ok(s) => json!({"id": n.id, "addr": n.addr, "zone": n.zone, "roles": s.roles, "state": "up",
                                "uptime_ms": s.uptime_ms, "collections": s.collections, "version": s.version}),
                Err(e) => json!({"id": n.id, "addr": n.addr, "zone": n.zone,
                                 "roles": n.roles.iter().map(|r| r.to_string()).collect::<Vec<_>>(),
                                 "state": "unreachable", "error": e}),
            })
            .collect();
        println!("{}", json!({"cluster": cfg.name, "nodes": out}));
    } else {
        println!("cluster {}", cfg.name);
        println!(
            "{:>4} {:<22} {:<8} {:<16} {:<12} {:>10} {:>11}",
            "ID", "ADDR", "ZONE", "ROLES", "STATE", "UPTIME", "COLLECTIONS"
        );
        for (n, a) in &rows {
            let roles = n.roles.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(",");
            match a {
                Ok(s) => println!(
                    "{:>4} {:<22} {:<8} {:<16} {:<12} {:>9}s {:>11}",
                    n.id,
                    n.addr,
                    n.zone,
                    roles,
                    "up",
                    s.uptime_ms / 1000,
                    s.collections
                ),
                Err(e) => println!(
                    "{:>4} {:<22} {:<8} {:<16} {:<12} ({e})",
                    n.id, n.addr, n.zone, roles, "unreachable"
                ),
            }
        }
    }
    Ok(())
}
