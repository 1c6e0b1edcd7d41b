//! Search quality and durability through a real node process over QUIC.

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use edgevec_client::{ClientError, CollectionSpec, Metric, Point, ReadOpts};
use edgevec_engine::compaction::{self, MergePolicy, SegmentSize};
use edgevec_proto::{IndexState, SegmentState};

fn exact_top_k(data: &[Vec<f32>], q: &[f32], k: usize, metric: Metric) -> Vec<u64> {
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    let mut scored: Vec<(f32, u64)> = data
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let dot: f32 = v.iter().zip(q).map(|(a, b)| a * b).sum();
            let key = match metric {
                Metric::L2 => v.iter().zip(q).map(|(a, b)| (a - b) * (a - b)).sum::<f32>(),
                Metric::InnerProduct => -dot,
                Metric::Cosine => -dot / (norm(v) * norm(q)),
            };
            (key, i as u64)
        })
        .collect();
    scored.sort_by(|a, b| a.0.total_cmp(&b.0));
    scored.into_iter().take(k).map(|(_, id)| id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recall_at_10_for_each_metric() {
    let mut cluster = TestCluster::new(1);
    cluster.start(1);
    let client = cluster.client(1, ADMIN).await;
    cluster.wait_data_node(1).await;
    let (n, dim) = (10_000usize, 128usize);
    // Clustered, as real embeddings are (uniform noise in 128 dimensions
    // has no near neighbours to speak of, and recall on it depends on the
    // build's luck).
    let data = clustered_vectors(n, dim, 7);
    let queries = clustered_vectors(100, dim, 8);

    for metric in [Metric::L2, Metric::InnerProduct, Metric::Cosine] {
        let name = format!("recall_{metric}");
        let spec = CollectionSpec::new(&name, dim as u32, metric)
            .with_shards(2)
            .with_seal_rows(2048);
        client.create_collection(spec).await.unwrap();
        for (b, chunk) in data.chunks(1000).enumerate() {
            let points = chunk
                .iter()
                .enumerate()
                .map(|(i, v)| Point {
                    id: (b * 1000 + i) as u64,
                    vector: v.clone(),
                    payload: Some(format!("{{\"n\":{}}}", b * 1000 + i)),
                })
                .collect();
            client.upsert(&name, points).await.unwrap();
        }
        wait_for_indexes(&client, &name).await;
        let info = client.describe_collection(&name).await.unwrap();
        assert_eq!(info.points, n as u64);
        assert!(
            info.segments
                .iter()
                .filter(|s| s.state == edgevec_proto::SegmentState::Sealed)
                .count()
                >= 4,
            "expected sealed, indexed segments: {info:?}"
        );

        let results = client.search_batch(&name, queries.clone(), 10, true).await.unwrap();
        let mut found = 0;
        for (q, hits) in queries.iter().zip(&results) {
            assert_eq!(hits.len(), 10);
            let truth: HashSet<u64> = exact_top_k(&data, q, 10, metric).into_iter().collect();
            found += hits.iter().filter(|h| truth.contains(&h.id)).count();
            // Best first, in the metric's own direction.
            for w in hits.windows(2) {
                if metric.higher_is_better() {
                    assert!(w[0].score >= w[1].score, "{metric}: not sorted {hits:?}");
                } else {
                    assert!(w[0].score <= w[1].score, "{metric}: not sorted {hits:?}");
                }
            }
            assert_eq!(
                hits[0].payload.as_deref(),
                Some(format!("{{\"n\":{}}}", hits[0].id).as_str())
            );
        }
        let recall = found as f64 / (queries.len() * 10) as f64;
        println!("{metric}: recall@10 = {recall:.4}");
        assert!(recall >= 0.95, "{metric}: recall@10 {recall} < 0.95");

        // Per-search parameters: recall grows with ef, and exact is the
        // brute force. On uniform noise, where ef matters most.
        let uniform = random_vectors(n, dim, 9);
        let name = format!("curve_{metric}");
        let spec = CollectionSpec::new(&name, dim as u32, metric)
            .with_shards(2)
            .with_seal_rows(2048);
        client.create_collection(spec).await.unwrap();
        for (b, chunk) in uniform.chunks(1000).enumerate() {
            let points = (b * 1000..)
                .zip(chunk)
                .map(|(id, v)| Point {
                    id: id as u64,
                    vector: v.clone(),
                    payload: None,
                })
                .collect();
            client.upsert(&name, points).await.unwrap();
        }
        wait_for_indexes(&client, &name).await;
        let truths: Vec<HashSet<u64>> = queries
            .iter()
            .map(|q| exact_top_k(&uniform, q, 10, metric).into_iter().collect())
            .collect();
        let mut curve = Vec::new();
        for (ef, exact) in [(10, false), (40, false), (400, false), (0, true)] {
            let opts = ReadOpts {
                ef: (ef > 0).then_some(ef),
                exact,
                ..Default::default()
            };
            let results = client
                .search_with(&name, queries.clone(), 10, false, &opts)
                .await
                .unwrap();
            let found: usize = truths
                .iter()
                .zip(&results)
                .map(|(truth, hits)| hits.iter().filter(|h| truth.contains(&h.id)).count())
                .sum();
            curve.push(found as f64 / (queries.len() * 10) as f64);
        }
        println!("{metric}: recall@10 on uniform noise at ef 10, 40, 400 and exact: {curve:?}");
        assert!(curve.windows(2).all(|w| w[1] >= w[0]), "{metric}: {curve:?}");
        assert!(curve[2] > curve[0], "{metric}: a larger ef must find more: {curve:?}");
        assert!(curve[3] >= 0.99, "{metric}: exact search recall {}", curve[3]);
    }
    let too_wide = ReadOpts {
        ef: Some(edgevec_proto::limits::MAX_SEARCH_EF + 1),
        ..Default::default()
    };
    match client
        .search_with("recall_l2", queries.clone(), 10, false, &too_wide)
        .await
    {
        Err(ClientError::InvalidArgument { field, message }) => {
            assert_eq!(field.as_deref(), Some("ef"));
            assert!(message.contains("ef must be at most"), "{message}");
        }
        other => panic!("an ef above the limit must be refused: {other:?}"),
    }
    // The close is sent before `close` returns (the CLI exits right
    // after), without waiting out the connection's draining period.
    assert!(client.close().await, "the close was not seen sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_inserts_keeps_every_acknowledged_point() {
    let mut cluster = TestCluster::new(1);
    cluster.start(1);
    let client = cluster.client(1, ADMIN).await;
    cluster.wait_data_node(1).await;
    let dim = 16;
    client
        .create_collection(
            CollectionSpec::new("durable", dim, Metric::L2)
                .with_shards(3)
                .with_seal_rows(500),
        )
        .await
        .unwrap();

    let acked: Arc<Mutex<Vec<Point>>> = Arc::default();
    let writer = {
        let client = client.clone();
        let acked = acked.clone();
        tokio::spawn(async move {
            // Bounded: at most 2,000 batches or 60 s, whichever comes first.
            let started = Instant::now();
            for batch in 0..2_000u64 {
                if started.elapsed() > Duration::from_secs(60) {
                    break;
                }
                let points: Vec<Point> = random_vectors(50, dim as usize, batch)
                    .into_iter()
                    .enumerate()
                    .map(|(i, vector)| {
                        let id = batch * 50 + i as u64;
                        Point {
                            id,
                            vector,
                            payload: Some(format!("{{\"batch\":{batch},\"tag\":\"p{id}\"}}")),
                        }
                    })
                    .collect();
                match client.upsert("durable", points.clone()).await {
                    Ok(_) => acked.lock().unwrap().extend(points),
                    Err(ClientError::Unavailable(_) | ClientError::Timeout(_)) => break,
                    Err(e) => panic!("unexpected error: {e}"),
                }
            }
        })
    };
    // Let the stream run (through a few seals), then kill mid-stream.
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.lock().unwrap().len() < 3_000 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cluster.kill9(1);
    writer.await.unwrap();
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 3_000, "too few writes before the kill: {}", acked.len());

    cluster.start(1);
    let client = cluster.client(1, READER).await;
    let ids: Vec<u64> = acked.iter().map(|p| p.id).collect();
    let mut got = Vec::new();
    for chunk in ids.chunks(5_000) {
        got.extend(client.get("durable", chunk).await.unwrap());
    }
    assert_eq!(got.len(), acked.len(), "acknowledged points lost after kill -9");
    for (want, have) in acked.iter().zip(&got) {
        assert_eq!(want.id, have.id);
        assert_eq!(want.vector, have.vector);
        assert_eq!(want.payload, have.payload);
    }
    // And they are searchable: each of a sample finds itself first by
    // exact search, and among the first ten through the index (an
    // approximate walk promises no more).
    let exact = ReadOpts {
        exact: true,
        ..Default::default()
    };
    for p in acked.iter().step_by(997) {
        let hits = client
            .search_with("durable", vec![p.vector.clone()], 1, false, &exact)
            .await
            .unwrap();
        assert_eq!(hits[0][0].id, p.id);
        let hits = client.search("durable", &p.vector, 10).await.unwrap();
        assert!(hits.iter().any(|h| h.id == p.id), "{} not among {hits:?}", p.id);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_an_index_build_stops_the_node_within_seconds() {
    let mut cluster = TestCluster::new(1);
    cluster.start(1);
    let client = cluster.client(1, ADMIN).await;
    cluster.wait_data_node(1).await;
    let dim = 128;
    let rows = 100_000u64;
    client
        .create_collection(CollectionSpec::new("slow", dim, Metric::L2).with_seal_rows(rows as u32))
        .await
        .unwrap();
    upsert_random(&client, "slow", rows, dim as usize, 11).await;
    // The sealed segment's build (seconds here) is running, and describe
    // reports how far it got.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let details = client.collection_details("slow").await.unwrap();
        let building = details
            .info
            .segments
            .iter()
            .any(|s| s.state == SegmentState::Sealed && s.index == IndexState::Building);
        // (The segment list and the build list are read one after the
        // other: a build can end in between.)
        if let (true, Some(b)) = (building, details.builds.first()) {
            assert_eq!((b.shard, b.rows), (0, rows), "{details:?}");
            assert!(b.rows_indexed <= b.rows, "{details:?}");
            break;
        }
        assert!(Instant::now() < deadline, "no build started: {details:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    client.close().await;
    let at = Instant::now();
    let status = cluster.stop(1).expect("node 1 was running");
    let took = at.elapsed();
    println!("stopped {took:?} after SIGTERM during an index build");
    // `up` kills a node after 15 s; a clean stop must come well before.
    assert!(
        status.success() && took < Duration::from_secs(12),
        "{status:?} after {took:?}"
    );

    // The build runs again after a restart, and every point is there.
    cluster.start(1);
    let client = cluster.client(1, READER).await;
    wait_for_indexes(&client, "slow").await;
    assert_eq!(client.describe_collection("slow").await.unwrap().points, rows);
}

/// Compaction on a 3-replica shard: sealed segments are merged in the
/// background while writes go on (deleted rows dropped), once writes stop
/// they are merged into one, every point stays readable and findable, and
/// every replica holds the same segments, row for row (read from each
/// node's files after shutdown).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_merges_segments_alike_on_every_replica() {
    let mut cluster = TestCluster::new(3);
    cluster.start_all().await;
    let client = cluster.client(1, ADMIN).await;
    let (dim, seal) = (16usize, 200u64);
    client
        .create_replicated(
            CollectionSpec::new("compact", dim as u32, Metric::L2).with_seal_rows(seal as u32),
            edgevec_client::ReplicationSpec::new(3),
        )
        .await
        .unwrap();
    // 3,000 rows: fifteen seals, merged as they come.
    let vectors = random_vectors(3_000, dim, 7);
    let point = |id: u64, v: &[f32]| Point {
        id,
        vector: v.to_vec(),
        payload: Some(format!("{{\"id\":{id}}}")),
    };
    for (b, chunk) in vectors.chunks(250).enumerate() {
        let points = chunk
            .iter()
            .enumerate()
            .map(|(i, v)| point((b * 250 + i) as u64, v))
            .collect();
        client.upsert("compact", points).await.unwrap();
    }
    // Deletes and replacements while merges run.
    let deleted: Vec<u64> = (0..3_000).step_by(7).collect();
    client.delete("compact", &deleted).await.unwrap();
    let replaced: Vec<Point> = (1..3_000u64)
        .step_by(11)
        .map(|id| point(id, &vectors[id as usize]))
        .collect();
    client.upsert("compact", replaced).await.unwrap();

    // Quiet: merges settle. Fifteen sealed segments of 200 rows become a
    // few while the writes come; once the shard has been quiet for the
    // policy's few seconds, those are merged into one when the others hold
    // a quarter of the largest's rows. Settled: no build under way and
    // nothing left that the policy would merge.
    let deadline = Instant::now() + Duration::from_secs(120);
    let segments = loop {
        let d = client.collection_details("compact").await.unwrap();
        let sealed: Vec<_> = d
            .info
            .segments
            .iter()
            .filter(|s| s.state == SegmentState::Sealed)
            .cloned()
            .collect();
        let sizes: Vec<SegmentSize> = sealed
            .iter()
            .map(|s| SegmentSize {
                id: s.id,
                rows: s.rows,
                live: s.rows - s.deleted,
            })
            .collect();
        let more = compaction::next_merge(&sizes, seal as u32, &MergePolicy::default(), true);
        if d.builds.is_empty() && more.is_none() && sealed.iter().all(|s| s.index == IndexState::Ready) {
            break sealed;
        }
        assert!(Instant::now() < deadline, "no compaction in 120 s: {d:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(segments.iter().any(|s| s.rows > seal), "{segments:?}");

    let live: Vec<u64> = (0..3_000).filter(|id| id % 7 != 0 || id % 11 == 1).collect();
    let got = client.get("compact", &live).await.unwrap();
    assert_eq!(got.len(), live.len());
    for p in &got {
        assert_eq!(p.vector, vectors[p.id as usize]);
        assert_eq!(p.payload.as_deref(), Some(format!("{{\"id\":{}}}", p.id).as_str()));
    }
    assert!(client.get("compact", &[7, 14, 21]).await.unwrap().is_empty());
    let exact = ReadOpts {
        exact: true,
        ..Default::default()
    };
    // Exact search finds every probed point; the graph walk nearly every
    // one. An HNSW graph can leave a row with no incoming link (its
    // neighbours keep closer ones), which no walk then reaches; a CI run
    // once missed one probe of 26 on this uniform noise, so one miss is
    // allowed, not a pattern of them.
    let mut missed = Vec::new();
    let probes: Vec<u64> = live.iter().step_by(97).copied().collect();
    for id in &probes {
        let v = vectors[*id as usize].clone();
        let hits = client
            .search_with("compact", vec![v.clone()], 1, false, &exact)
            .await
            .unwrap();
        assert_eq!(hits[0][0].id, *id);
        let hits = client.search("compact", &v, 10).await.unwrap();
        if !hits.iter().any(|h| h.id == *id) {
            missed.push((*id, hits));
        }
    }
    assert!(
        missed.len() <= 1,
        "{} of {} probes not found by the walk: {missed:?}",
        missed.len(),
        probes.len()
    );
    client.close().await;

    // Every replica, read from its files: the same segments and points.
    let mut seen = Vec::new();
    for id in cluster.ids() {
        cluster.stop(id);
        let engine = edgevec_engine::Engine::open(
            &cluster.path(&format!("data/node{id}/engine")),
            edgevec_engine::EngineOptions::default(),
        )
        .unwrap();
        let replicas = engine.replicas();
        assert_eq!(replicas.len(), 1, "node {id} holds one replica");
        let replica = &replicas[0].1;
        let (info, segments) = replica.info();
        let rows: Vec<(u64, u64, u64)> = segments.iter().map(|s| (s.id, s.rows, s.deleted)).collect();
        let points = replica.get(&(0..3_000).collect::<Vec<_>>()).unwrap();
        seen.push((info, rows, points));
    }
    assert_eq!(seen[0].0.points, live.len() as u64);
    assert_eq!(seen[0], seen[1], "replicas on nodes 1 and 2 differ");
    assert_eq!(seen[0], seen[2], "replicas on nodes 1 and 3 differ");
}

/// Search filtered by payload through a node, over QUIC, as the client
/// library and the CLI send it: only passing points come back, the index
/// walk finds what an exact filtered search finds, and bad filters are
/// refused with what is wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filtered_search_through_the_client_and_the_cli() {
    let mut cluster = TestCluster::new(1);
    cluster.start(1);
    let client = cluster.client(1, ADMIN).await;
    cluster.wait_data_node(1).await;
    let dim = 16usize;
    let fields = vec![
        edgevec_client::FieldSpec::parse("lang:keyword").unwrap(),
        edgevec_client::FieldSpec::parse("year:int").unwrap(),
    ];
    client
        .create_with_fields(
            CollectionSpec::new("docs", dim as u32, Metric::L2)
                .with_shards(2)
                .with_seal_rows(1000),
            edgevec_client::ReplicationSpec::new(1),
            Default::default(),
            fields,
        )
        .await
        .unwrap();
    let n = 6_000usize;
    let vectors = clustered_vectors(n, dim, 5);
    let langs = ["en", "de", "fr"];
    let payload = |i: usize| format!("{{\"lang\":\"{}\",\"year\":{}}}", langs[i % 3], 2000 + i % 30);
    for (b, chunk) in vectors.chunks(1000).enumerate() {
        let points = chunk
            .iter()
            .enumerate()
            .map(|(j, v)| {
                let i = b * 1000 + j;
                Point {
                    id: i as u64,
                    vector: v.clone(),
                    payload: Some(payload(i)),
                }
            })
            .collect();
        client.upsert("docs", points).await.unwrap();
    }
    wait_for_indexes(&client, "docs").await;

    let filter = r#"{"must":[{"key":"lang","match":"de"},{"key":"year","range":{"gte":2020}}]}"#;
    let passes = |id: u64| id % 3 == 1 && 2000 + id % 30 >= 2020;
    let with = |exact: bool| ReadOpts {
        exact,
        filter: Some(filter.to_owned()),
        ..Default::default()
    };
    let (mut hit, mut total) = (0, 0);
    for q in vectors.iter().step_by(150) {
        let walk = client
            .search_with("docs", vec![q.clone()], 10, true, &with(false))
            .await
            .unwrap();
        let exact = client
            .search_with("docs", vec![q.clone()], 10, false, &with(true))
            .await
            .unwrap();
        assert_eq!(exact[0].len(), 10);
        for h in walk[0].iter().chain(&exact[0]) {
            assert!(passes(h.id), "{} does not pass {filter}", h.id);
        }
        assert_eq!(
            walk[0][0].payload.as_deref(),
            Some(payload(walk[0][0].id as usize).as_str())
        );
        let want: HashSet<u64> = exact[0].iter().map(|h| h.id).collect();
        hit += walk[0].iter().filter(|h| want.contains(&h.id)).count();
        total += want.len();
    }
    assert!(hit as f64 / total as f64 >= 0.95, "filtered recall {hit}/{total}");

    // Bad filters: not JSON, a field without an index, a type mismatch.
    for (bad, says) in [
        (r#"{"must":[{"key":"lang"}]}"#, "exactly one of"),
        (
            r#"{"must":[{"key":"colour","match":"red"}]}"#,
            "--index-field colour:keyword",
        ),
        (r#"{"must":[{"key":"year","match":"2020"}]}"#, "indexed as int"),
    ] {
        let opts = ReadOpts {
            filter: Some(bad.to_owned()),
            ..Default::default()
        };
        match client
            .search_with("docs", vec![vectors[0].clone()], 3, false, &opts)
            .await
        {
            Err(ClientError::InvalidArgument { field, message }) => {
                assert_eq!(field.as_deref(), Some("filter"));
                assert!(message.contains(says), "{bad}: {message}");
            }
            other => panic!("{bad} must be refused: {other:?}"),
        }
    }

    // Count and delete by filter, through the client.
    let opts = ReadOpts::default();
    assert_eq!(client.count("docs", None, &opts).await.unwrap(), n as u64);
    let want = (0..n as u64).filter(|id| passes(*id)).count() as u64;
    assert_eq!(client.count("docs", Some(filter), &opts).await.unwrap(), want);
    let fr = r#"{"must":[{"key":"lang","match":"fr"}]}"#;
    let deleted = client.delete_by_filter("docs", fr).await.unwrap();
    assert_eq!(deleted.count, (n / 3) as u64);
    assert_eq!(client.count("docs", Some(fr), &opts).await.unwrap(), 0);
    assert_eq!(client.count("docs", None, &opts).await.unwrap(), (n - n / 3) as u64);
    assert!(
        client.get("docs", &[2, 5, 8]).await.unwrap().is_empty(),
        "ids 2, 5, 8 were fr"
    );
    assert_eq!(client.get("docs", &[0, 1]).await.unwrap().len(), 2);
    match client
        .count("docs", Some(r#"{"must":[{"key":"colour","match":"red"}]}"#), &opts)
        .await
    {
        Err(ClientError::InvalidArgument { field, .. }) => assert_eq!(field.as_deref(), Some("filter")),
        other => panic!("a filter on a field without an index must be refused: {other:?}"),
    }

    // The CLI: count, delete by filter, search with --filter, create with
    // --index-field.
    let v = serde_json::to_string(&vectors[7]).unwrap();
    let (ok, out, err) = cluster.cli(&[
        "search", "docs", "--vector", &v, "--k", "5", "--filter", filter, "--json",
    ]);
    assert!(ok, "{err}");
    let hits: serde_json::Value = serde_json::from_str(&out).unwrap();
    let ids: Vec<u64> = hits
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids.len(), 5);
    assert!(ids.iter().all(|id| passes(*id)), "{ids:?}");
    let de_old = r#"{"must":[{"key":"lang","match":"de"},{"key":"year","range":{"lt":2002}}]}"#;
    let (ok, out, err) = cluster.cli(&["count", "docs", "--filter", de_old, "--json"]);
    assert!(ok, "{err}");
    let before: serde_json::Value = serde_json::from_str(&out).unwrap();
    let want = (0..n as u64).filter(|id| id % 3 == 1 && id % 30 < 2).count() as u64;
    assert_eq!(want, 200);
    assert_eq!(before["count"].as_u64(), Some(want));
    let (ok, out, err) = cluster.cli(&["delete", "docs", "--filter", de_old, "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["deleted"].as_u64(), Some(want));
    let (ok, out, _) = cluster.cli(&["count", "docs", "--filter", de_old]);
    assert!(ok && out.trim() == "0", "{out}");
    let (ok, _, err) = cluster.cli(&["delete", "docs"]);
    assert!(!ok && err.contains("--ids"), "{err}");
    let (ok, _, err) = cluster.cli(&[
        "collection",
        "create",
        "tagged",
        "--dim",
        "4",
        "--index-field",
        "year:date",
    ]);
    assert!(!ok && err.contains("keyword, int, float or bool"), "{err}");
    let (ok, _, err) = cluster.cli(&[
        "collection",
        "create",
        "tagged",
        "--dim",
        "4",
        "--index-field",
        "tag:keyword",
        "--index-field",
        "n:int",
    ]);
    assert!(ok, "{err}");
    let (ok, out, err) = cluster.cli(&["collection", "describe", "tagged", "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v["payload_indexes"],
        serde_json::json!([{"field": "tag", "type": "keyword"}, {"field": "n", "type": "int"}])
    );
}

/// The shard files on disk under a node, with their sizes.
fn shard_files(dir: &std::path::Path) -> Vec<(std::path::PathBuf, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.file_name().is_some_and(|n| n == "shard.redb") {
                out.push((path.clone(), std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0)));
            }
        }
    }
    out
}

/// Points written over and over: once merges have dropped the rows they
/// replaced, those rows leave every replica's shard file, which shrinks
/// back to about what the collection holds, and every point reads as it
/// was last written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewritten_points_leave_the_shard_file_of_every_replica() {
    let mut cluster = TestCluster::new(3);
    cluster.start_all().await;
    let client = cluster.client(1, ADMIN).await;
    let (n, dim, rounds) = (2_000u64, 256usize, 8u64);
    client
        .create_replicated(
            CollectionSpec::new("rewrite", dim as u32, Metric::L2).with_seal_rows(500),
            edgevec_client::ReplicationSpec::new(3),
        )
        .await
        .unwrap();
    let base = random_vectors(n as usize, dim, 11);
    let vector = |id: u64, round: u64| -> Vec<f32> { base[id as usize].iter().map(|x| x + round as f32).collect() };
    for round in 0..rounds {
        for ids in (0..n).collect::<Vec<_>>().chunks(250) {
            let points = ids
                .iter()
                .map(|&id| Point {
                    id,
                    vector: vector(id, round),
                    payload: Some(format!("{{\"id\":{id},\"round\":{round}}}")),
                })
                .collect();
            client.upsert("rewrite", points).await.unwrap();
        }
    }
    let deleted: Vec<u64> = (0..n).step_by(10).collect();
    client.delete("rewrite", &deleted).await.unwrap();
    // 16,000 rows of 1 KiB were written; 1,800 points are left. Once
    // quiet, every file comes down to a fraction of what was written.
    let written = n * rounds * (dim as u64 * 4);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let files: Vec<_> = cluster
            .ids()
            .iter()
            .flat_map(|id| shard_files(&cluster.path(&format!("data/node{id}/engine"))))
            .collect();
        if files.len() == 3 && files.iter().all(|(_, len)| *len < written / 3) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "shard files still large after 120 s ({written} bytes written): {files:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    let live: Vec<u64> = (0..n).filter(|id| id % 10 != 0).collect();
    let got = client.get("rewrite", &live).await.unwrap();
    assert_eq!(got.len(), live.len());
    let last = rounds - 1;
    for p in &got {
        assert_eq!(p.vector, vector(p.id, last));
        let want = format!("{{\"id\":{},\"round\":{last}}}", p.id);
        assert_eq!(p.payload.as_deref(), Some(want.as_str()));
    }
    assert!(client.get("rewrite", &deleted).await.unwrap().is_empty());
    let exact = ReadOpts {
        exact: true,
        ..Default::default()
    };
    for id in live.iter().step_by(101) {
        let hits = client
            .search_with("rewrite", vec![vector(*id, last)], 1, true, &exact)
            .await
            .unwrap();
        assert_eq!(hits[0][0].id, *id);
        assert!(hits[0][0]
            .payload
            .as_deref()
            .is_some_and(|p| p.contains(&format!("\"round\":{last}"))));
    }
    let d = client.collection_details("rewrite").await.unwrap();
    assert_eq!(d.info.points, live.len() as u64, "{d:?}");
    client.close().await;
}
