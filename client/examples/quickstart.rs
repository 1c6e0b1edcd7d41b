//! Runs against the cluster of the README quick start:
//!
//! ```sh
//! cargo run --release -- up                                   # terminal 1
//! cargo run --release -p edgevec-client --example quickstart  # terminal 2
//! ```
//!
//! Settings come from the environment when set: `EDGEVEC_ENDPOINTS`
//! (comma-separated), `EDGEVEC_CA` and `EDGEVEC_TOKEN`.

use edgevec_client::{Client, ClientConfig, ClientError, CollectionSpec, Metric, Point, ReplicationSpec};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let endpoints = std::env::var("EDGEVEC_ENDPOINTS")
        .unwrap_or_else(|_| "127.0.0.1:7101,127.0.0.1:7102,127.0.0.1:7103".into())
        .split(',')
        .map(|e| e.trim().parse())
        .collect::<Result<Vec<_>, _>>()?;
    let ca = std::env::var("EDGEVEC_CA").unwrap_or_else(|_| "certs/ca.pem".into());
    let token = std::env::var("EDGEVEC_TOKEN").unwrap_or_else(|_| "dev-admin-token-change-me".into());

    let client = Client::connect(ClientConfig::from_ca_file(endpoints, ca.as_ref(), token)?).await?;
    println!("connected to {:?}", client.current_endpoint().await);

    // Two shards, each with a copy on all three nodes of the quick start.
    let spec = CollectionSpec::new("quickstart", 3, Metric::Cosine).with_shards(2);
    match client.create_replicated(spec, ReplicationSpec::new(3)).await {
        Ok(()) | Err(ClientError::AlreadyExists(_)) => {}
        Err(e) => return Err(e.into()),
    }
    let points = vec![
        Point {
            id: 1,
            vector: vec![1.0, 0.0, 0.0],
            payload: Some(r#"{"title":"east"}"#.into()),
        },
        Point {
            id: 2,
            vector: vec![0.0, 1.0, 0.0],
            payload: Some(r#"{"title":"north"}"#.into()),
        },
        Point {
            id: 3,
            vector: vec![0.7, 0.7, 0.0],
            payload: Some(r#"{"title":"north-east"}"#.into()),
        },
    ];
    let ack = client.upsert("quickstart", points).await?;
    println!("upserted {} points (session token: {:?})", ack.count, ack.lsns);

    for hit in client.search("quickstart", &[0.9, 0.2, 0.0], 2).await? {
        println!("{:>4}  {:.4}  {}", hit.id, hit.score, hit.payload.unwrap_or_default());
    }

    // Errors say what was wrong.
    if let Err(e) = client.search("quickstart", &[1.0, 0.0], 2).await {
        println!("a 2-d query is refused: {e}");
    }
    let view = client.cluster_status().await?;
    println!("metadata leader: {:?}, {} nodes", view.leader, view.nodes.len());
    for c in client.shards(Some("quickstart")).await? {
        for s in c.shards {
            let states: Vec<String> = s
                .replicas
                .iter()
                .map(|r| format!("node {} {}", r.node, r.state))
                .collect();
            println!(
                "shard {}: term {}, primary {:?}, {}",
                s.shard,
                s.term,
                s.primary,
                states.join(", ")
            );
        }
    }
    client.close().await;
    Ok(())
}
