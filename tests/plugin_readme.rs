//! A new policy written only from plugins/README.md: the crate and code
//! its example gives are built as it says (native test through the SDK
//! harness, then WebAssembly), deployed to a real cluster through the CLI,
//! and used by a collection.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use edgevec_client::{CollectionSpec, Metric, ReplicationSpec};

/// The text between `<<'TAG'` and the line `TAG` in `readme`.
fn heredoc(readme: &str, tag: &str) -> String {
    let open = format!("<<'{tag}'\n");
    let start = readme
        .find(&open)
        .unwrap_or_else(|| panic!("no <<'{tag}' in plugins/README.md"))
        + open.len();
    let end = readme[start..]
        .find(&format!("\n{tag}\n"))
        .unwrap_or_else(|| panic!("no closing {tag} in plugins/README.md"));
    readme[start..start + end + 1].to_string()
}

/// Runs `cargo args` in `dir`; fails with its output.
fn cargo(dir: &Path, target: &Path, args: &[&str]) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(args)
        .current_dir(dir)
        .env("CARGO_TARGET_DIR", target)
        .output()
        .expect("cargo runs");
    assert!(
        out.status.success(),
        "cargo {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_written_from_the_plugin_readme_builds_deploys_and_serves() {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(repo.join("plugins/README.md")).unwrap();
    // The README's steps 1 and 2, in a workspace of its own shaped like
    // this one (plugins/ members, the SDK, the `plugin` profile).
    let work = tempfile::tempdir().unwrap();
    let krate = work.path().join("plugins/even-first");
    std::fs::create_dir_all(krate.join("src")).unwrap();
    std::fs::write(krate.join("Cargo.toml"), heredoc(&readme, "TOML")).unwrap();
    std::fs::write(krate.join("src/lib.rs"), heredoc(&readme, "RUST")).unwrap();
    std::fs::write(
        work.path().join("Cargo.toml"),
        format!(
            r#"[workspace]
members = ["plugins/*"]
resolver = "2"

[workspace.package]
version = "0.1.0"
edition = "2021"
license = "Apache-2.0"

[workspace.dependencies]
edgevec-policy = {{ path = "{}" }}

[profile.plugin]
inherits = "release"
opt-level = "s"
lto = true
codegen-units = 1
panic = "abort"
strip = true
"#,
            repo.join("sdk").display()
        ),
    )
    .unwrap();
    // Steps 3 and 4, with a build directory that outlives the test.
    let target = std::env::temp_dir().join("edgevec-plugin-readme-target");
    cargo(work.path(), &target, &["test", "-p", "edgevec-plugin-even-first"]);
    cargo(
        work.path(),
        &target,
        &[
            "build",
            "--profile",
            "plugin",
            "--target",
            "wasm32-unknown-unknown",
            "-p",
            "edgevec-plugin-even-first",
        ],
    );
    let module = target.join("wasm32-unknown-unknown/plugin/edgevec_plugin_even_first.wasm");
    assert!(module.exists(), "{} was not built", module.display());

    // Step 5 against a real cluster: deploy, and a collection uses it.
    let cluster = TestCluster::running(Layout::voters(3)).await;
    let admin = cluster.client(1, ADMIN).await;
    admin
        .create_replicated(
            CollectionSpec::new("docs", 8, Metric::L2).with_shards(1),
            ReplicationSpec::new(3),
        )
        .await
        .expect("create");
    upsert_random(&cluster.client(1, WRITER).await, "docs", 50, 8, 1).await;
    let (ok, out, err) = cluster.cli(&["plugin", "deploy", "even-first", &module.display().to_string()]);
    assert!(ok, "deploy: {out} {err}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let list = admin.list_plugins().await.unwrap();
        if list
            .iter()
            .find(|p| p.name == "even-first")
            .is_some_and(|p| p.nodes.iter().all(|n| n.state == "loaded" && n.version == 1))
        {
            break;
        }
        assert!(Instant::now() < deadline, "even-first not loaded everywhere: {list:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (ok, _, err) = cluster.cli(&["load", "docs", "--lb", "even-first"]);
    assert!(ok, "{err}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Through node 1 and node 3 alike, reads go to node 2: the only even one.
    for via in [1, 3] {
        let reader = cluster.client(via, READER).await;
        let count =
            |m: &str, node: u64| metric(m, "edgevec_replica_reads", &[&format!("node=\"{node}\"")]).unwrap_or(0.0);
        let (_, before) = cluster.http_get(via, "/metrics");
        let q = random_vectors(1, 8, via);
        for _ in 0..10 {
            reader.search("docs", &q[0], 3).await.expect("search");
        }
        let (_, after) = cluster.http_get(via, "/metrics");
        let served: Vec<f64> = (1..=3).map(|n| count(&after, n) - count(&before, n)).collect();
        assert_eq!(served, vec![0.0, 10.0, 0.0], "reads through node {via}:\n{after}");
    }
}
