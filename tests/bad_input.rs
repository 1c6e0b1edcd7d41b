//! Every kind of bad input, over the real wire, gets a typed error naming the
//! problem; the node keeps serving and loses nothing acknowledged.

mod common;

use std::time::Duration;

use common::*;
use edgevec_client::{rpc, tls, Client, ClientError, CollectionSpec, Metric, Point};
use edgevec_proto::client::{ClientRequest, ClientResponse, OpV1, RequestV1};
use edgevec_proto::internal::{NodeOpV1, NodeReplyV1, NodeRequest, NodeResponse};
use edgevec_proto::{codec, frame, limits, ErrorCode};

fn point(id: u64, vector: Vec<f32>) -> Point {
    Point {
        id,
        vector,
        payload: None,
    }
}

fn invalid_field(e: ClientError) -> (Option<String>, String) {
    match e {
        ClientError::InvalidArgument { field, message } => (field, message),
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
}

/// A raw QUIC connection on the client ALPN, for sending what the client
/// library never would.
async fn raw_connection(cluster: &TestCluster) -> (quinn::Endpoint, quinn::Connection) {
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(tls::client_config(&cluster.ca_pem(), None, edgevec_proto::ALPN_CLIENT).unwrap());
    let conn = ep.connect(cluster.addr(1), &cluster.ip).unwrap().await.unwrap();
    (ep, conn)
}

async fn reply_error(recv: &mut quinn::RecvStream) -> edgevec_proto::WireError {
    let body = tokio::time::timeout(
        Duration::from_secs(10),
        frame::read_frame(recv, limits::MAX_FRAME_BYTES),
    )
    .await
    .expect("node answers in time")
    .expect("node answers with a frame");
    match codec::decode::<ClientResponse>(&body).unwrap() {
        ClientResponse::V1(Err(e)) => e,
        ClientResponse::V1(Ok(r)) => panic!("expected an error reply, got {r:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_typed_errors_and_the_node_keeps_serving() {
    let mut cluster = TestCluster::new(1);
    cluster.start(1);
    let admin = cluster.client(1, ADMIN).await;
    cluster.wait_data_node(1).await;
    admin
        .create_collection(CollectionSpec::new("c", 4, Metric::Cosine).with_shards(2))
        .await
        .unwrap();
    let ack = admin
        .upsert(
            "c",
            vec![Point {
                id: 1,
                vector: vec![1.0, 0.0, 0.0, 0.0],
                payload: Some("{\"keep\":true}".into()),
            }],
        )
        .await
        .unwrap();
    assert_eq!(ack.count, 1);

    // Wrong dimension, on write and on search.
    let (field, msg) = invalid_field(
        admin
            .upsert("c", vec![point(2, vec![1.0, 2.0, 3.0])])
            .await
            .unwrap_err(),
    );
    assert!(
        field.unwrap().contains("vector") && msg.contains('3') && msg.contains('4'),
        "{msg}"
    );
    let (_, msg) = invalid_field(admin.search("c", &[1.0, 2.0], 5).await.unwrap_err());
    assert!(msg.contains('2') && msg.contains('4'), "{msg}");

    // NaN and infinite components.
    let (_, msg) = invalid_field(
        admin
            .upsert("c", vec![point(3, vec![1.0, f32::NAN, 0.0, 0.0])])
            .await
            .unwrap_err(),
    );
    assert!(msg.to_lowercase().contains("nan"), "{msg}");
    let (_, msg) = invalid_field(admin.search("c", &[f32::INFINITY, 0.0, 0.0, 0.0], 5).await.unwrap_err());
    assert!(msg.to_lowercase().contains("inf") || msg.contains("finite"), "{msg}");

    // k out of range.
    let (field, _) = invalid_field(admin.search("c", &[1.0, 0.0, 0.0, 0.0], 0).await.unwrap_err());
    assert_eq!(field.as_deref(), Some("k"));
    let (field, msg) = invalid_field(
        admin
            .search("c", &[1.0, 0.0, 0.0, 0.0], limits::MAX_K + 1)
            .await
            .unwrap_err(),
    );
    assert_eq!(field.as_deref(), Some("k"));
    assert!(msg.contains("1024"), "{msg}");

    // Unknown and duplicate collections.
    match admin.search("nope", &[1.0; 4], 5).await.unwrap_err() {
        ClientError::NotFound(m) => assert!(m.contains("nope"), "{m}"),
        e => panic!("{e:?}"),
    }
    match admin
        .create_collection(CollectionSpec::new("c", 4, Metric::L2))
        .await
        .unwrap_err()
    {
        ClientError::AlreadyExists(m) => assert!(m.contains('c'), "{m}"),
        e => panic!("{e:?}"),
    }
    invalid_field(
        admin
            .create_collection(CollectionSpec::new("d", 0, Metric::L2))
            .await
            .unwrap_err(),
    );
    invalid_field(
        admin
            .create_collection(CollectionSpec::new("d", 5000, Metric::L2))
            .await
            .unwrap_err(),
    );
    invalid_field(
        admin
            .create_collection(CollectionSpec::new("bad name!", 4, Metric::L2))
            .await
            .unwrap_err(),
    );

    // Empty batches and bad payloads.
    invalid_field(admin.upsert("c", vec![]).await.unwrap_err());
    invalid_field(admin.delete("c", &[]).await.unwrap_err());
    let bad_payload = Point {
        id: 9,
        vector: vec![1.0; 4],
        payload: Some("{not json".into()),
    };
    let (field, _) = invalid_field(admin.upsert("c", vec![bad_payload]).await.unwrap_err());
    assert!(field.unwrap().contains("payload"));
    let big = Point {
        id: 9,
        vector: vec![1.0; 4],
        payload: Some(format!("\"{}\"", "x".repeat(limits::MAX_PAYLOAD_BYTES))),
    };
    invalid_field(admin.upsert("c", vec![big]).await.unwrap_err());

    // Missing, unknown and read-only tokens.
    let anon = Client::connect(cluster.client_config(1, "")).await.unwrap();
    assert!(matches!(
        anon.list_collections().await.unwrap_err(),
        ClientError::Unauthorized(_)
    ));
    let stranger = Client::connect(cluster.client_config(1, "not-a-real-token"))
        .await
        .unwrap();
    assert!(matches!(
        stranger.search("c", &[1.0; 4], 1).await.unwrap_err(),
        ClientError::Unauthorized(_)
    ));
    let reader = Client::connect(cluster.client_config(1, READER)).await.unwrap();
    match reader.upsert("c", vec![point(5, vec![1.0; 4])]).await.unwrap_err() {
        ClientError::PermissionDenied(m) => assert!(m.contains("read") && m.contains("write"), "{m}"),
        e => panic!("{e:?}"),
    }
    assert_eq!(reader.search("c", &[1.0, 1.0, 0.0, 0.0], 1).await.unwrap()[0].id, 1);
    let writer = Client::connect(cluster.client_config(1, WRITER)).await.unwrap();
    assert!(matches!(
        writer.drop_collection("c").await.unwrap_err(),
        ClientError::PermissionDenied(_)
    ));

    // Raw wire abuse on one connection; other streams and clients go on.
    let (_ep, conn) = raw_connection(&cluster).await;

    // A frame that claims more than the limit: refused before it is read.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&frame::header(limits::MAX_FRAME_BYTES + 1))
        .await
        .unwrap();
    // The node may stop the stream as soon as it has read the header: a
    // refused write of the rest is that refusal, not a failure.
    let _ = send.write_all(&[0u8; 1024]).await;
    let err = reply_error(&mut recv).await;
    assert_eq!(err.code, ErrorCode::FrameTooLarge, "{err:?}");

    // Garbage bytes in a well-formed frame.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    frame::write_frame(&mut send, &[0x00, 0xde, 0xad, 0xbe, 0xef, 0xff, 0xff])
        .await
        .unwrap();
    send.finish().unwrap();
    let err = reply_error(&mut recv).await;
    assert_eq!(err.code, ErrorCode::Malformed, "{err:?}");

    // A newer protocol version is named as such.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    frame::write_frame(&mut send, &[0x05, 0x00]).await.unwrap();
    send.finish().unwrap();
    assert_eq!(reply_error(&mut recv).await.code, ErrorCode::UnsupportedVersion);

    // A stream closed mid-request (after a known token).
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&claim(1000, READER)).await.unwrap();
    send.finish().unwrap();
    let err = reply_error(&mut recv).await;
    assert_eq!(err.code, ErrorCode::Malformed);
    assert!(err.message.contains("mid-request"), "{err:?}");

    // Without a known token, the rest of a request is never read.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&frame::header(1000)).await.unwrap();
    send.write_all(&[0u8; 10]).await.unwrap();
    let err = reply_error(&mut recv).await;
    assert_eq!(err.code, ErrorCode::Unauthorized, "{err:?}");

    // A stream reset mid-request, with no answer expected.
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.write_all(&frame::header(1000)).await.unwrap();
    send.reset(7u32.into()).unwrap();

    // The same connection still serves a proper request.
    let req = ClientRequest::V1(RequestV1 {
        token: READER.into(),
        op: OpV1::ListCollections,
    });
    match rpc::call::<_, ClientResponse>(&conn, &req, Duration::from_secs(10))
        .await
        .unwrap()
    {
        ClientResponse::V1(Ok(_)) => {}
        other => panic!("{other:?}"),
    }

    // Nothing acknowledged was lost, and the node serves everyone.
    let got = admin.get("c", &[1]).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].payload.as_deref(), Some("{\"keep\":true}"));
    assert_eq!(admin.describe_collection("c").await.unwrap().points, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_protocol_requires_a_node_certificate_of_the_cluster() {
    let mut cluster = TestCluster::new(1);
    cluster.start(1);
    let _ = cluster.client(1, READER).await;
    let paths = cluster.config.cert_paths();
    let read = |p: std::path::PathBuf| std::fs::read(p).unwrap();
    let ping = NodeRequest::V1(NodeOpV1::Ping { from: 1 });

    let dial = |identity: Option<(Vec<u8>, Vec<u8>)>, ca: Vec<u8>| {
        let addr = cluster.addr(1);
        let ip = cluster.ip.clone();
        async move {
            let identity = identity.map(|(c, k)| {
                (
                    tls::certs_from_pem(&c, "cert").unwrap(),
                    tls::key_from_pem(&k, "key").unwrap(),
                )
            });
            let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
            ep.set_default_client_config(tls::client_config(&ca, identity, edgevec_proto::ALPN_NODE).unwrap());
            let conn = ep.connect(addr, &ip).unwrap().await;
            (ep, conn)
        }
    };

    // A node certificate of the cluster: ping answers.
    let (_ep, conn) = dial(
        Some((read(paths.node_cert(1)), read(paths.node_key(1)))),
        cluster.ca_pem(),
    )
    .await;
    let conn = conn.unwrap();
    match rpc::call::<_, NodeResponse>(&conn, &ping, Duration::from_secs(10))
        .await
        .unwrap()
    {
        NodeResponse::V1(Ok(NodeReplyV1::Pong { node_id })) => assert_eq!(node_id, 1),
        other => panic!("{other:?}"),
    }
    // The same certificate speaking for another node is refused, and the
    // connection goes on.
    let impostor = NodeRequest::V1(NodeOpV1::Ping { from: 2 });
    match rpc::call::<_, NodeResponse>(&conn, &impostor, Duration::from_secs(10))
        .await
        .unwrap()
    {
        NodeResponse::V1(Err(e)) => {
            assert_eq!(e.code, edgevec_proto::ErrorCode::PermissionDenied, "{e:?}");
            assert!(e.message.contains("node 1"), "{e:?}");
        }
        other => panic!("a ping claiming node 2 from node 1's certificate was answered: {other:?}"),
    }
    let again = rpc::call::<_, NodeResponse>(&conn, &ping, Duration::from_secs(10))
        .await
        .unwrap();
    assert!(
        matches!(again, NodeResponse::V1(Ok(NodeReplyV1::Pong { .. }))),
        "{again:?}"
    );

    // No certificate, or a client (not node) certificate: the node closes the connection.
    for identity in [None, Some((read(paths.client_cert()), read(paths.client_key())))] {
        let (_ep, conn) = dial(identity, cluster.ca_pem()).await;
        let conn = conn.unwrap();
        let err = rpc::call::<_, NodeResponse>(&conn, &ping, Duration::from_secs(10))
            .await
            .unwrap_err();
        assert!(matches!(err, rpc::CallError::Connection(_)), "{err:?}");
        match conn.close_reason() {
            Some(quinn::ConnectionError::ApplicationClosed(c)) => assert_eq!(c.error_code, 1u32.into()),
            other => panic!("expected NOT_A_NODE close, got {other:?}"),
        }
    }

    // A node certificate of another CA: the handshake itself fails.
    let foreign = tempfile::tempdir().unwrap();
    let fpaths = edgevec_node::certs::foreign_node_cert(foreign.path(), 2).unwrap();
    let (_ep, conn) = dial(
        Some((read(fpaths.node_cert(2)), read(fpaths.node_key(2)))),
        cluster.ca_pem(),
    )
    .await;
    match conn {
        Err(_) => {}
        Ok(conn) => {
            // TLS 1.3 may finish the client side before the server rejects the certificate.
            let err = rpc::call::<_, NodeResponse>(&conn, &ping, Duration::from_secs(10))
                .await
                .unwrap_err();
            assert!(matches!(err, rpc::CallError::Connection(_)), "{err:?}");
        }
    }

    // The node is still fine.
    let c = cluster.client(1, READER).await;
    c.status().await.unwrap();
}

/// One node of `layout` running, with collection `c` (4-d, L2) holding
/// points 0..n, point i at [i, 1, 0, 0].
async fn one_node_with_points(layout: Layout, n: u64) -> TestCluster {
    let mut cluster = TestCluster::with_layout(layout);
    cluster.start(1);
    let admin = cluster.client(1, ADMIN).await;
    cluster.wait_data_node(1).await;
    admin
        .create_collection(CollectionSpec::new("c", 4, Metric::L2))
        .await
        .unwrap();
    admin
        .upsert("c", (0..n).map(|i| point(i, vec![i as f32, 1.0, 0.0, 0.0])).collect())
        .await
        .unwrap();
    cluster
}

/// (VmRSS, VmSize) of process `pid` in MiB.
fn memory_mib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map_or(0, |kb| kb / 1024)
    };
    (field("VmRSS:"), field("VmSize:"))
}

/// The first bytes of a request body that claims `len` bytes, carrying
/// `token` (then nothing more is sent).
fn claim(len: u32, token: &str) -> Vec<u8> {
    let mut out = len.to_be_bytes().to_vec();
    if !token.is_empty() {
        out.push(0); // ClientRequest::V1
        out.push(token.len() as u8);
        out.extend(token.as_bytes());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_length_prefixes_leave_memory_bounded_and_searches_answering() {
    let cluster = one_node_with_points(Layout::voters(1), 100).await;
    let pid = cluster.pid(1).unwrap();
    let before = memory_mib(pid);

    // 20 connections × 250 streams, each announcing a 64 MiB body and
    // sending only its start: no token, an unknown token, a known one.
    let max = limits::MAX_FRAME_BYTES as u32;
    let kinds = [claim(max, ""), claim(max, "not-a-token"), claim(max, READER)];
    let mut conns = Vec::new();
    let mut streams = Vec::new();
    for c in 0..20 {
        let (ep, conn) = raw_connection(&cluster).await;
        for s in 0..250 {
            let Ok((mut send, recv)) = conn.open_bi().await else {
                break;
            };
            let kind = (c + s) % kinds.len();
            let _ = send.write_all(&kinds[kind]).await;
            streams.push((kind, send, recv));
        }
        conns.push((ep, conn));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let during = memory_mib(pid);

    // Searches answer meanwhile, each within seconds.
    let reader = cluster.client(1, READER).await;
    for i in 0..20 {
        let hits = tokio::time::timeout(
            Duration::from_secs(5),
            reader.search("c", &[i as f32, 1.0, 0.0, 0.0], 1),
        )
        .await
        .expect("a search answers while hostile streams are open")
        .unwrap();
        assert_eq!(hits[0].id, i);
    }
    // Requests with an unknown token were answered at once, unread.
    let refused = streams.iter_mut().filter(|(kind, _, _)| *kind == 1).take(20);
    for (_, _, recv) in refused {
        assert_eq!(reply_error(recv).await.code, ErrorCode::Unauthorized);
    }
    let after = memory_mib(pid);
    println!(
        "node memory (RSS, virtual) in MiB: before {before:?}, with {} hostile streams {during:?}, after searches {after:?}",
        streams.len()
    );
    assert!(streams.len() >= 4_000, "only {} streams opened", streams.len());
    // The claims alone would be 5,000 × 64 MiB; nothing of it is reserved.
    assert!(
        during.0 < before.0 + 256,
        "RSS grew from {} to {} MiB",
        before.0,
        during.0
    );
    assert!(
        during.1 < before.1 + 4_096,
        "virtual memory grew from {} to {} MiB",
        before.1,
        during.1
    );
    drop(streams);
    drop(conns);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_above_the_frame_limit_is_a_typed_error_and_the_connection_goes_on() {
    let mut cluster = TestCluster::new(1);
    cluster.start(1);
    let admin = cluster.client(1, ADMIN).await;
    cluster.wait_data_node(1).await;
    let dim = 4096usize;
    admin
        .create_collection(CollectionSpec::new("wide", dim as u32, Metric::L2))
        .await
        .unwrap();
    // 4,200 points × 16 KiB: a get of all of them is above 64 MiB.
    let n = 4_200u64;
    for start in (0..n).step_by(300) {
        let points = (start..(start + 300).min(n))
            .map(|i| point(i, vec![i as f32; dim]))
            .collect();
        admin.upsert("wide", points).await.unwrap();
    }
    let ids: Vec<u64> = (0..n).collect();
    match admin.get("wide", &ids).await {
        Err(ClientError::Protocol(m)) => {
            assert!(m.contains("frame limit") && m.contains("ask for less"), "{m}")
        }
        other => panic!(
            "expected a typed error naming the limit, got {:?}",
            other.map(|p| p.len())
        ),
    }
    // The same client and connection go on.
    assert_eq!(admin.get("wide", &ids[..100]).await.unwrap().len(), 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_request_budget_refuses_with_a_typed_error_and_small_requests_go_on() {
    // The smallest budget a node takes: one request of the frame limit.
    let layout = Layout {
        voters: 1,
        learners: 0,
        cluster_extra: "request_budget_mb = 64\n".into(),
    };
    let cluster = one_node_with_points(layout, 10).await;
    let in_flight = || {
        let (_, m) = cluster.http_get(1, "/metrics");
        m.lines()
            .find(|l| l.starts_with("edgevec_requests_in_flight_bytes "))
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no in-flight gauge in:\n{m}"))
    };

    // A known token announces the largest request and sends all of it
    // but its last MiB: the node holds 63 MiB of it.
    let (_ep, conn) = raw_connection(&cluster).await;
    let (mut big, _big_recv) = conn.open_bi().await.unwrap();
    big.write_all(&claim(limits::MAX_FRAME_BYTES as u32, READER))
        .await
        .unwrap();
    let chunk = vec![0u8; 1 << 20];
    for _ in 0..63 {
        big.write_all(&chunk).await.unwrap();
    }
    // Wait until more than 62 MiB of it are held (63 MiB but the start
    // read before its token): with 60 MiB, a run once admitted all of the
    // next 2 MiB request while the big one's last chunks were on their way.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while in_flight() < (62 << 20) + (512 << 10) {
        assert!(
            std::time::Instant::now() < deadline,
            "the node never held the big request"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Another 2 MiB request cannot get room: refused, typed, within
    // seconds, and nothing of it kept.
    let (_ep2, conn2) = raw_connection(&cluster).await;
    let (mut send, mut recv) = conn2.open_bi().await.unwrap();
    send.write_all(&claim(2 << 20, READER)).await.unwrap();
    let _ = send.write_all(&vec![0u8; 2 << 20]).await;
    let err = reply_error(&mut recv).await;
    assert_eq!(err.code, ErrorCode::Unavailable, "{err:?}");
    assert!(err.message.contains("node busy"), "{err:?}");

    // Small requests are read whole with their token: they go on.
    let reader = cluster.client(1, READER).await;
    assert_eq!(reader.search("c", &[1.0, 1.0, 0.0, 0.0], 1).await.unwrap()[0].id, 1);

    // The big request given up: its bytes are released.
    big.reset(0u32.into()).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while in_flight() > 1 << 20 {
        assert!(std::time::Instant::now() < deadline, "the budget was not released");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
