//! `edgevec plugin`: the policy plugins of the cluster.

use anyhow::{bail, Context, Result};
use edgevec_proto::{PluginInfo, PluginNodeState};
use serde_json::{json, Value};

use super::{connect, Global};

fn node_json(n: &PluginNodeState) -> Value {
    json!({
        "node": n.node,
        "state": n.state,
        "version": n.version,
        "from_cache": n.from_cache,
        "calls": n.calls,
        "failures": n.failures,
        "fallbacks": n.fallbacks,
        "reason": n.reason,
    })
}

fn plugin_json(p: &PluginInfo) -> Value {
    json!({
        "name": p.name,
        "kind": p.kind,
        "version": p.version,
        "origin": p.origin,
        "sha256": p.sha256,
        "size": p.size,
        "collections": p.collections,
        "nodes": p.nodes.iter().map(node_json).collect::<Vec<_>>(),
    })
}

/// `plugin list`: every plugin, its version and where it came from, the
/// collections it serves, and its state on every node; problems follow
/// the table.
pub async fn list(g: &Global) -> Result<()> {
    let client = connect(g).await?;
    let plugins = client.list_plugins().await?;
    client.close().await;
    if g.json {
        println!("{}", Value::Array(plugins.iter().map(plugin_json).collect()));
        return Ok(());
    }
    println!(
        "{:<20} {:<14} {:>7} {:<9} {:>8} {:<14} {:<10} {:>9}  COLLECTIONS",
        "NAME", "KIND", "VERSION", "ORIGIN", "BYTES", "SHA256", "LOADED", "FAILURES"
    );
    let mut problems = Vec::new();
    for p in &plugins {
        let loaded = p.nodes.iter().filter(|n| n.state == "loaded").count();
        let failures: u64 = p.nodes.iter().map(|n| n.failures).sum();
        println!(
            "{:<20} {:<14} {:>7} {:<9} {:>8} {:<14} {:<10} {:>9}  {}",
            p.name,
            p.kind,
            p.version,
            p.origin,
            p.size,
            &p.sha256[..p.sha256.len().min(12)],
            format!("{loaded}/{} nodes", p.nodes.len()),
            failures,
            if p.collections.is_empty() {
                "-".to_string()
            } else {
                p.collections.join(",")
            }
        );
        for n in &p.nodes {
            if n.state != "loaded" || n.reason.is_some() {
                problems.push(format!(
                    "{} on node {}: {}{}",
                    p.name,
                    n.node,
                    n.state,
                    n.reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default()
                ));
            }
        }
    }
    for p in problems {
        println!("  {p}");
    }
    Ok(())
}

/// `plugin deploy`: reads FILE (refused above the size limit before
/// anything is sent) and deploys it.
pub async fn deploy(g: &Global, name: &str, file: &std::path::Path, params: Vec<(String, String)>) -> Result<()> {
    let limit = edgevec_proto::limits::MAX_PLUGIN_BYTES;
    let size = std::fs::metadata(file)
        .with_context(|| format!("reading {}", file.display()))?
        .len();
    if size > limit as u64 {
        bail!(
            "{} is {size} bytes; a plugin may be at most {limit} bytes",
            file.display()
        );
    }
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let client = connect(g).await?;
    let (version, sha256) = client.deploy_plugin(name, bytes, params).await?;
    client.close().await;
    if g.json {
        println!("{}", json!({"deployed": name, "version": version, "sha256": sha256}));
    } else {
        println!("deployed {name} version {version} (sha256 {sha256}); every node loads it in the background (see `edgevec plugin list`)");
    }
    Ok(())
}

/// `plugin remove`.
pub async fn remove(g: &Global, name: &str) -> Result<()> {
    let client = connect(g).await?;
    client.remove_plugin(name).await?;
    client.close().await;
    if g.json {
        println!("{}", json!({"removed": name}));
    } else {
        println!("removed the deployed versions of {name}");
    }
    Ok(())
}
