//! Assign latency under 50 concurrent clients against devstack (real PostgreSQL behind the
//! Hasura stand-in): p50 and p99 of `POST /mandelbox/assign` end to end over HTTP.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use dbclient::types::{Image, ImageId, InstanceId, InstanceStatus, NewInstance, Region};
use dbclient::{DbClient, DbConfig};
use devstack::testing::{TEST_ADMIN_SECRET, TestStack};
use scaling_service::admission::{Admission, AdmissionSettings};
use scaling_service::api::{ApiState, Assigner, serve};
use scaling_service::auth::StaticVerifier;
use scaling_service::metrics::Metrics;
use scaling_service::region::PROVIDER;
use tokio_util::sync::CancellationToken;

const CLIENTS: usize = 50;
const REQUESTS_PER_CLIENT: usize = 20;

#[tokio::main]
async fn main() {
    let stack = TestStack::start().await.unwrap();
    let db = DbClient::new(
        &DbConfig::new(
            &stack.graphql_url(),
            Some(logger::Secret::new(TEST_ADMIN_SECRET.to_owned())),
        )
        .unwrap(),
    )
    .unwrap();
    let east = Region::new("us-east-1").unwrap();
    let ami = ImageId::new("ami-a").unwrap();
    db.upsert_image(&Image {
        provider: PROVIDER.to_owned(),
        region: east.clone(),
        image_id: ami.clone(),
        client_sha: "abc".to_owned(),
        updated_at: Utc::now(),
    })
    .await
    .unwrap();
    let rows: Vec<NewInstance> = (0..20u8)
        .map(|n| NewInstance {
            id: InstanceId::new(format!("i-{n:017}")).unwrap(),
            provider: PROVIDER.to_owned(),
            region: east.clone(),
            image_id: ami.clone(),
            client_sha: "abc".to_owned(),
            ip_addr: Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, n + 1))),
            instance_type: "g4dn.12xlarge".to_owned(),
            remaining_capacity: 100,
            status: InstanceStatus::Active,
        })
        .collect();
    db.insert_instances(&rows).await.unwrap();
    // Only hosts that published their json_transport fingerprint are assigned.
    for (n, row) in rows.iter().enumerate() {
        db.set_instance_tls_fingerprint(&row.id, &format!("{:02x}", n + 1).repeat(32))
            .await
            .unwrap();
    }
    let (_ready_tx, ready) = tokio::sync::watch::channel(true);
    let state = ApiState {
        assigner: Arc::new(Assigner {
            db: db.clone(),
            enabled_regions: vec![east],
            mandelboxes_per_user: 3,
            allow_local_commit: false,
            allowed_apps: vec![scaling_service::api::APP.to_owned()],
            regions: HashMap::new(),
        }),
        verifier: Arc::new(StaticVerifier),
        admission: Arc::new(Admission::new(AdmissionSettings::unlimited())),
        metrics: Arc::new(Metrics::new().unwrap()),
        ready,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/mandelbox/assign", listener.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    tokio::spawn(serve(listener, state, shutdown.clone()));
    let client = reqwest::Client::new();
    let body = r#"{"regions":["us-east-1"],"client_commit_hash":"abc"}"#;
    let started = Instant::now();
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let client = client.clone();
            let url = url.clone();
            tokio::spawn(async move {
                let mut times = Vec::with_capacity(REQUESTS_PER_CLIENT);
                for r in 0..REQUESTS_PER_CLIENT {
                    let t = Instant::now();
                    let response = client
                        .post(&url)
                        .bearer_auth(format!("user:bench-{c}-{r}"))
                        .body(body)
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(response.status(), 200);
                    times.push(t.elapsed());
                }
                times
            })
        })
        .collect();
    let mut times: Vec<Duration> = Vec::new();
    for task in tasks {
        times.extend(task.await.unwrap());
    }
    let total = started.elapsed();
    times.sort();
    let pct = |p: usize| times[(times.len() * p / 100).min(times.len() - 1)];
    println!(
        "assign: {CLIENTS} concurrent clients, {} requests in {:.2} s: p50 {:.1} ms, p99 {:.1} ms",
        times.len(),
        total.as_secs_f64(),
        pct(50).as_secs_f64() * 1e3,
        pct(99).as_secs_f64() * 1e3
    );
    shutdown.cancel();
}
