//! The operator and data CLI, used the way a person would: `edgevec up` on a
//! cluster file, then collection, insert (JSON lines and .npy), search, get,
//! delete, describe and status, all with --json; then Ctrl-C-like shutdown.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::*;
use serde_json::Value;

fn npy_f32(rows: &[Vec<f32>]) -> Vec<u8> {
    npy(rows, false)
}

/// The header of a .npy matrix.
fn npy_header(descr: &str, fortran: bool, rows: usize, cols: usize) -> Vec<u8> {
    let order = if fortran { "True" } else { "False" };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': {order}, 'shape': ({rows}, {cols}), }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((header.len() as u16).to_le_bytes());
    out.extend(header.as_bytes());
    out
}

/// A .npy float32 matrix of `rows`, stored column after column when
/// `fortran`.
fn npy(rows: &[Vec<f32>], fortran: bool) -> Vec<u8> {
    let dim = rows[0].len();
    let mut out = npy_header("<f4", fortran, rows.len(), dim);
    if fortran {
        for c in 0..dim {
            for r in rows {
                out.extend(r[c].to_le_bytes());
            }
        }
    } else {
        for r in rows {
            for x in r {
                out.extend(x.to_le_bytes());
            }
        }
    }
    out
}

/// A .npy int64 matrix (C order).
fn npy_i64(rows: &[Vec<i64>]) -> Vec<u8> {
    let mut out = npy_header("<i8", false, rows.len(), rows[0].len());
    for x in rows.iter().flatten() {
        out.extend(x.to_le_bytes());
    }
    out
}

/// `edgevec up`, stopped like Ctrl-C (SIGTERM, then killed after 10 s)
/// when dropped: a failing test leaves no node running.
struct Up(std::process::Child);

impl Drop for Up {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_some() {
            return;
        }
        unsafe {
            libc::kill(self.0.id() as i32, libc::SIGTERM);
        }
        for _ in 0..200 {
            if self.0.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn json(out: &(bool, String, String)) -> Value {
    assert!(out.0, "command failed: {}", out.2);
    serde_json::from_str(out.1.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {}", out.1))
}

#[test]
fn up_then_cli_round_trip() {
    let cluster = TestCluster::new(3);
    let mut up = Up(Command::new(env!("CARGO_BIN_EXE_edgevec"))
        .arg("up")
        .arg(&cluster.config_path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap());
    let (tx, rx) = mpsc::channel();
    let stdout = up.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut ready = Vec::new();
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(90))
            .expect("`up` reports the cluster within 90 s");
        if line.contains("is up") {
            break;
        }
        ready.push(line);
    }
    assert_eq!(ready.iter().filter(|l| l.contains("ready on")).count(), 3, "{ready:?}");

    // One metadata cluster: a leader, three voters, all up.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        let status = json(&cluster.cli(&["status", "--json"]));
        let nodes = status["nodes"].as_array().unwrap();
        if nodes.len() == 3 && nodes.iter().all(|n| n["state"] == "up") && status["leader"].is_u64() {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "cluster not formed: {status}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        status["nodes"].as_array().unwrap().iter().all(|n| n["voter"] == true),
        "{status}"
    );

    let created = json(&cluster.cli(&[
        "collection",
        "create",
        "docs",
        "--dim",
        "3",
        "--metric",
        "cosine",
        "--shards",
        "2",
        "--json",
    ]));
    assert_eq!(created["created"], "docs");
    let dup = cluster.cli(&["collection", "create", "docs", "--dim", "3"]);
    assert!(!dup.0 && dup.2.contains("already exists"), "{dup:?}");

    let jsonl = cluster.path("points.jsonl");
    std::fs::write(
        &jsonl,
        "{\"id\":1,\"vector\":[1,0,0],\"payload\":{\"title\":\"east\"}}\n\
         {\"id\":2,\"vector\":[0,1,0],\"payload\":{\"title\":\"north\"}}\n\
         \n\
         {\"id\":3,\"vector\":[0.9,0.1,0]}\n",
    )
    .unwrap();
    let inserted = json(&cluster.cli(&["insert", "docs", "--file", jsonl.to_str().unwrap(), "--json"]));
    assert_eq!(inserted["inserted"], 3);

    let bad = cluster.path("bad.jsonl");
    std::fs::write(&bad, "{\"id\":4,\"vector\":[0,0,1]}\n{\"id\":\"x\",\"vector\":[1]}\n").unwrap();
    let out = cluster.cli(&["insert", "docs", "--file", bad.to_str().unwrap()]);
    assert!(!out.0 && out.2.contains("bad.jsonl line 2, id: must be"), "{out:?}");
    // The rows before the bad line were sent, and the report says so.
    assert!(out.1.contains("inserted 1 rows"), "{out:?}");

    let hits = json(&cluster.cli(&["search", "docs", "--vector", "[1, 0, 0]", "--k", "2", "--json"]));
    let hits = hits.as_array().unwrap();
    assert_eq!(hits.len(), 2);
    assert_eq!(hits[0]["id"], 1);
    assert_eq!(hits[0]["payload"]["title"], "east");
    assert_eq!(hits[1]["id"], 3);
    assert!((hits[0]["score"].as_f64().unwrap() - 1.0).abs() < 1e-5);

    let wrong = cluster.cli(&["search", "docs", "--vector", "[1, 0]", "--k", "2"]);
    assert!(!wrong.0 && wrong.2.contains("invalid argument"), "{wrong:?}");

    let got = json(&cluster.cli(&["get", "docs", "--ids", "2,3,99", "--json"]));
    assert_eq!(got.as_array().unwrap().len(), 2);
    assert_eq!(got[0]["payload"]["title"], "north");

    // A delete counts the points it removed, not the ids it was given.
    let deleted = json(&cluster.cli(&["delete", "docs", "--ids", "1,999", "--json"]));
    assert_eq!(deleted["deleted"], 1);
    let none = cluster.cli(&["delete", "docs", "--ids", "999"]);
    assert!(none.0 && none.1.contains("deleted 0 points"), "{none:?}");
    let hits = json(&cluster.cli(&["search", "docs", "--vector", "[1, 0, 0]", "--k", "1", "--json"]));
    assert_eq!(hits[0]["id"], 3);

    // .npy matrices: row i gets id start_id + i.
    let rows = random_vectors(2500, 8, 3);
    let npy = cluster.path("m.npy");
    std::fs::write(&npy, npy_f32(&rows)).unwrap();
    json(&cluster.cli(&[
        "collection",
        "create",
        "mat",
        "--dim",
        "8",
        "--seal-rows",
        "1000",
        "--hnsw-m",
        "8",
        "--ef-construction",
        "40",
        "--json",
    ]));
    let out = cluster.cli(&["collection", "create", "m1", "--dim", "8", "--hnsw-m", "1"]);
    assert!(
        !out.0 && out.2.contains("hnsw m must be between 2 and 128, got 1"),
        "{out:?}"
    );
    let inserted = json(&cluster.cli(&[
        "insert",
        "mat",
        "--file",
        npy.to_str().unwrap(),
        "--start-id",
        "100",
        "--json",
    ]));
    assert_eq!(inserted["inserted"], 2500);
    assert!(inserted["rows_per_sec"].as_f64().unwrap() > 0.0);
    let q = serde_json::to_string(&rows[42]).unwrap();
    let hits = json(&cluster.cli(&["search", "mat", "--vector", &q, "--k", "1", "--json"]));
    assert_eq!(hits[0]["id"], 142);
    for extra in [&["--ef", "200"][..], &["--exact"][..]] {
        let mut args = vec!["search", "mat", "--vector", &q, "--k", "1", "--json"];
        args.extend_from_slice(extra);
        let hits = json(&cluster.cli(&args));
        assert_eq!(hits[0]["id"], 142, "{extra:?}");
    }
    let out = cluster.cli(&["search", "mat", "--vector", &q, "--ef", "5000"]);
    assert!(!out.0 && out.2.contains("ef must be at most 4096"), "{out:?}");

    // `bench`: inserts from a .npy, then searches with the true neighbours
    // (the first 20 rows as queries, exact top 10 by brute force).
    let more = random_vectors(1000, 8, 4);
    let more_npy = cluster.path("more.npy");
    std::fs::write(&more_npy, npy_f32(&more)).unwrap();
    let loaded = json(&cluster.cli(&[
        "bench",
        "insert",
        "mat",
        "--file",
        more_npy.to_str().unwrap(),
        "--start-id",
        "10000",
        "--batch",
        "100",
        "--json",
    ]));
    assert_eq!(
        (loaded["rows"].as_u64(), loaded["errors"].as_u64()),
        (Some(1000), Some(0)),
        "{loaded}"
    );
    // Payloads from a JSON-lines file, one line per row (`null`: none); a
    // file whose line count is not the row count is refused.
    let few_npy = cluster.path("few.npy");
    std::fs::write(&few_npy, npy_f32(&more[..4])).unwrap();
    let payloads = cluster.path("few.jsonl");
    std::fs::write(&payloads, "{\"n\":0}\n{\"n\":1}\nnull\n{\"n\":3}\n").unwrap();
    let bench_insert = |payloads: &std::path::Path| {
        cluster.cli(&[
            "bench",
            "insert",
            "mat",
            "--file",
            few_npy.to_str().unwrap(),
            "--start-id",
            "20000",
            "--payloads",
            payloads.to_str().unwrap(),
            "--json",
        ])
    };
    let loaded = json(&bench_insert(&payloads));
    assert_eq!(loaded["errors"], 0, "{loaded}");
    let got = json(&cluster.cli(&["get", "mat", "--ids", "20001,20002", "--json"]));
    assert_eq!(got[0]["payload"]["n"], 1, "{got}");
    assert!(got[1]["payload"].is_null(), "{got}");
    std::fs::write(&payloads, "{\"n\":0}\n").unwrap();
    let out = bench_insert(&payloads);
    assert!(!out.0 && out.2.contains("1 lines for 4 rows"), "{out:?}");
    cluster.cli(&["delete", "mat", "--ids", "20000,20001,20002,20003"]);

    let all: Vec<(u64, &Vec<f32>)> = (100u64..).zip(&rows).chain((10_000u64..).zip(&more)).collect();
    let queries: Vec<Vec<f32>> = rows[..20].to_vec();
    let truth: Vec<Vec<i64>> = queries
        .iter()
        .map(|q| {
            let mut d: Vec<(f32, u64)> = all
                .iter()
                .map(|(id, v)| (v.iter().zip(q).map(|(a, b)| (a - b) * (a - b)).sum::<f32>(), *id))
                .collect();
            d.sort_by(|a, b| a.0.total_cmp(&b.0));
            d.iter().take(10).map(|(_, id)| *id as i64).collect()
        })
        .collect();
    let (q_npy, t_npy) = (cluster.path("q.npy"), cluster.path("t.npy"));
    std::fs::write(&q_npy, npy_f32(&queries)).unwrap();
    std::fs::write(&t_npy, npy_i64(&truth)).unwrap();
    let measured = json(&cluster.cli(&[
        "bench",
        "search",
        "mat",
        "--queries",
        q_npy.to_str().unwrap(),
        "--truth",
        t_npy.to_str().unwrap(),
        "--concurrency",
        "4",
        "--duration",
        "1s",
        "--exact",
        "--json",
    ]));
    assert_eq!(measured["errors"], 0, "{measured}");
    assert!(measured["searches"].as_u64().unwrap() >= 20, "{measured}");
    assert!(measured["qps"].as_f64().unwrap() > 0.0, "{measured}");
    assert_eq!(
        measured["recall"].as_f64(),
        Some(1.0),
        "exact search finds the truth: {measured}"
    );
    let short = cluster.cli(&[
        "bench",
        "search",
        "mat",
        "--queries",
        q_npy.to_str().unwrap(),
        "--truth",
        q_npy.to_str().unwrap(),
    ]);
    assert!(!short.0 && short.2.contains("expected int64"), "{short:?}");

    let info = json(&cluster.cli(&["collection", "describe", "mat", "--json"]));
    assert_eq!(info["points"], 3500);
    assert_eq!(info["index"]["hnsw_m"], 8, "{info}");
    assert_eq!(info["index"]["ef_construction"], 40, "{info}");
    // Builds under way report rows_indexed ≤ rows.
    for b in info["builds"].as_array().unwrap() {
        assert!(b["rows_indexed"].as_u64() <= b["rows"].as_u64(), "{info}");
    }
    assert_eq!(info["index"]["hnsw_m"], 8, "{info}");
    assert_eq!(info["index"]["ef_construction"], 40, "{info}");
    // Builds under way report rows_indexed ≤ rows.
    for b in info["builds"].as_array().unwrap() {
        assert!(b["rows_indexed"].as_u64() <= b["rows"].as_u64(), "{info}");
    }
    assert_eq!(info["metric"], "l2");
    assert!(
        info["segments"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["state"] == "sealed"),
        "{info}"
    );
    let list = json(&cluster.cli(&["collection", "list", "--json"]));
    assert_eq!(list.as_array().unwrap().len(), 2);

    // A read-only token cannot write, and says so.
    let out = cluster.cli(&["--token", READER, "delete", "mat", "--ids", "100"]);
    assert!(!out.0 && out.2.contains("permission denied"), "{out:?}");

    let dropped = json(&cluster.cli(&["collection", "drop", "docs", "--json"]));
    assert_eq!(dropped["dropped"], "docs");

    // SIGTERM to `up` stops every node.
    unsafe {
        libc::kill(up.0.id() as i32, libc::SIGTERM);
    }
    let mut stopped = false;
    for _ in 0..400 {
        if up.0.try_wait().unwrap().is_some() {
            stopped = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if !stopped {
        let _ = up.0.kill();
        panic!("`up` did not stop within 20 s of SIGTERM");
    }
    let out = cluster.cli(&["status", "--json"]);
    assert!(!out.0, "an unreachable cluster is a failure: {out:?}");
    let status: Value = serde_json::from_str(out.1.trim()).unwrap();
    assert_eq!(status["reachable"], false, "{status}");
}

#[test]
fn commands_without_certificates_say_how_to_make_them() {
    let cluster = TestCluster::new(1);
    let fresh = cluster.config_variant("fresh.toml", |t| {
        t.replace("certs_dir = \"certs\"", "certs_dir = \"not-made-yet\"")
    });
    let (ok, _, err) = cluster.cli_with(&fresh, &["status"]);
    assert!(!ok);
    assert!(err.contains("not-made-yet") && err.contains("edgevec up"), "{err}");

    // A --ca file that holds no certificate is named as such, not taken
    // for an unreachable cluster.
    let bad = cluster.path("bad-ca.pem");
    std::fs::write(&bad, "not a certificate\n").unwrap();
    for args in [&["status"][..], &["collection", "list"][..]] {
        let mut all = vec!["--ca", bad.to_str().unwrap()];
        all.extend_from_slice(args);
        let (ok, _, err) = cluster.cli(&all);
        assert!(!ok);
        assert!(
            err.contains("bad-ca.pem has no usable PEM certificate") && !err.contains("no node"),
            "{err}"
        );
    }
}

/// `status` never shows a stale verdict as fact: without a metadata leader
/// the node states are `unknown`; with no node answering, `--json` still
/// prints `reachable: false` but the exit code is a failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_says_what_it_does_not_know() {
    let mut cluster = TestCluster::running(Layout::voters(3)).await;

    // A first endpoint that never answers (a bound UDP socket) does not
    // hold the client for its whole handshake deadline: the next endpoint
    // is dialled shortly after.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut config = cluster.client_config(1, ADMIN);
    config.endpoints.insert(0, silent.local_addr().unwrap());
    config.connect_timeout = Duration::from_secs(120);
    let connected = tokio::time::timeout(Duration::from_secs(60), async {
        let c = edgevec_client::Client::connect(config).await?;
        c.cluster_status().await
    })
    .await;
    assert!(
        matches!(connected, Ok(Ok(_))),
        "with a silent first endpoint: {connected:?}"
    );

    // Keep a follower: it loses its leader at the next election timeout.
    // Every node must have applied the leader's log first, or the one
    // kept may know no member at all (a voter the leader has not reached
    // yet).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let leader = loop {
        let out = cluster.cli(&["status", "--json"]);
        if out.0 {
            let status = json(&out);
            let nodes = status["nodes"].as_array().cloned().unwrap_or_default();
            let caught_up = nodes.len() == 3
                && !status["committed_index"].is_null()
                && nodes
                    .iter()
                    .all(|n| n["state"] == "up" && n["applied_index"] == status["committed_index"]);
            if let Some(l) = status["leader"].as_u64().filter(|_| caught_up) {
                break l;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no leader with every node caught up: {out:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let kept = (1..=3).find(|id| *id != leader).unwrap();
    for id in (1..=3).filter(|id| *id != kept) {
        cluster.kill9(id);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        let out = cluster.cli(&["status", "--json"]);
        if out.0 {
            let status = json(&out);
            if status["leader"].is_null() {
                break status;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "node {kept} still names a leader: {out:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let nodes = status["nodes"].as_array().unwrap();
    assert!(
        !nodes.is_empty() && nodes.iter().all(|n| n["state"] == "unknown"),
        "{status}"
    );
    let text = cluster.cli(&["status"]);
    assert!(
        text.0 && text.1.contains("no leader") && text.1.contains("unknown"),
        "{text:?}"
    );

    cluster.kill9(kept);
    let out = cluster.cli(&["status", "--json"]);
    assert!(!out.0, "an unreachable cluster is a failure: {out:?}");
    let v: Value = serde_json::from_str(out.1.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {out:?}"));
    assert_eq!(v["reachable"], false, "{out:?}");
    assert!(out.2.contains("no node of the cluster answers"), "{out:?}");
    assert!(
        !out.2.contains('\u{1b}'),
        "no colour codes when stderr is not a terminal: {out:?}"
    );
}

/// The failed run of a command: its stdout as JSON, and its stderr.
fn failed_json(out: &(bool, String, String)) -> (Value, String) {
    assert!(!out.0, "the command should have failed: {out:?}");
    let v = serde_json::from_str(out.1.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {out:?}"));
    (v, out.2.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insert_stops_at_the_first_bad_line_and_reports_exactly_what_it_wrote() {
    let cluster = TestCluster::running(Layout::voters(1)).await;
    json(&cluster.cli(&["collection", "create", "imp", "--dim", "4", "--json"]));
    let count = |name: &str| json(&cluster.cli(&["collection", "describe", name, "--json"]))["points"].clone();

    // Line 9,001 of 10,000 has a vector of the wrong length.
    let mut text = String::new();
    for i in 1..=10_000u64 {
        let dim = if i == 9_001 { 3 } else { 4 };
        let v: Vec<String> = (0..dim).map(|d| format!("{}", (i + d) as f32 / 7.0)).collect();
        text.push_str(&format!("{{\"id\":{i},\"vector\":[{}]}}\n", v.join(",")));
    }
    let file = cluster.path("big.jsonl");
    std::fs::write(&file, text).unwrap();
    let f = file.to_str().unwrap();
    let (report, err) = failed_json(&cluster.cli(&[
        "insert",
        "imp",
        "--file",
        f,
        "--batch",
        "500",
        "--parallel",
        "4",
        "--json",
    ]));
    assert_eq!(report["inserted"], 9_000, "{report}");
    assert_eq!(report["complete"], false);
    assert_eq!(report["bad_row"]["line"], 9_001, "{report}");
    assert_eq!(report["bad_row"]["field"], "vector", "{report}");
    assert!(
        err.contains("big.jsonl line 9001, vector:") && err.contains("nothing from line 9001 on was sent"),
        "{err}"
    );
    // Exactly what it said, and it stays so after the command exited.
    assert_eq!(count("imp"), 9_000);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(count("imp"), 9_000);
    let out = cluster.cli(&["insert", "imp", "--file", f, "--batch", "500"]);
    assert!(!out.0 && out.1.contains("inserted 9000 rows"), "{out:?}");

    // A payload that is not a JSON object is refused, naming line and field.
    let p = cluster.path("payload.jsonl");
    std::fs::write(&p, "{\"id\":1,\"vector\":[1,2,3,4],\"payload\":\"just a string\"}\n").unwrap();
    let (report, err) = failed_json(&cluster.cli(&["insert", "imp", "--file", p.to_str().unwrap(), "--json"]));
    assert_eq!(
        (report["inserted"].clone(), report["bad_row"]["field"].clone()),
        (0.into(), "payload".into())
    );
    assert!(err.contains("must be a JSON object"), "{err}");

    // Ids that would pass u64::MAX are refused before anything is sent.
    let rows = random_vectors(5, 4, 1);
    let m = cluster.path("m.npy");
    std::fs::write(&m, npy(&rows, false)).unwrap();
    let out = cluster.cli(&[
        "insert",
        "imp",
        "--file",
        m.to_str().unwrap(),
        "--start-id",
        "18446744073709551614",
    ]);
    assert!(!out.0 && out.2.contains("--start-id"), "{out:?}");
    assert_eq!(count("imp"), 9_000);

    // A Fortran-order matrix is read row by row.
    let fm = cluster.path("f.npy");
    std::fs::write(&fm, npy(&rows, true)).unwrap();
    let done = json(&cluster.cli(&[
        "insert",
        "imp",
        "--file",
        fm.to_str().unwrap(),
        "--start-id",
        "50000",
        "--json",
    ]));
    assert_eq!(done["inserted"], 5);
    let got = json(&cluster.cli(&["get", "imp", "--ids", "50003", "--json"]));
    let v: Vec<f32> = serde_json::from_value(got[0]["vector"].clone()).unwrap();
    assert_eq!(v, rows[3]);
}
