//! Slow and idle clients against the scaling service's HTTP API (issue #15), over TCP on
//! loopback with the real database: a slow-loris that sends its request head a byte at a time
//! is cut off by the head timeout, one address cannot hold more than its share of
//! connections, and anonymous clients that trickle a json_transport body hold no forwarding
//! permit, while real users at other addresses are served throughout.
//!
//! Addresses: every 127/8 address is this machine's, so each "client" binds its own.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use dbclient::types::{
    Image, ImageId, InstanceId, InstanceStatus, MandelboxId, MandelboxStatus, NewInstance,
    NewMandelbox, Region, UserId,
};
use dbclient::{DbClient, DbConfig};
use devstack::testing::{TEST_ADMIN_SECRET, TestStack};
use scaling_service::admission::{Admission, AdmissionSettings};
use scaling_service::api::{ApiState, Assigner, serve_limited};
use scaling_service::auth::StaticVerifier;
use scaling_service::forward::{ForwardSettings, Forwarder};
use scaling_service::listener::ListenerLimits;
use scaling_service::metrics::Metrics;
use scaling_service::region::PROVIDER;
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// How long any wait here may take before the test fails.
const WAIT: Duration = Duration::from_secs(30);
const PER_ADDRESS: usize = 8;
const IN_FLIGHT: usize = 4;
const HEAD_TIMEOUT: Duration = Duration::from_secs(1);
const BODY: &str = r#"{"regions":["us-east-1"],"client_commit_hash":"abc","version":"3.1.0"}"#;

struct Fixture {
    _stack: TestStack,
    addr: SocketAddr,
    shutdown: CancellationToken,
    /// Alice's mandelbox, on a host that has not published its certificate yet: a forward for
    /// it that gets past the permit ends in `503 host_not_ready`.
    alices: MandelboxId,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn fixture() -> Fixture {
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
    let row = |n: u8, capacity| NewInstance {
        id: InstanceId::new(format!("i-slow{n:013}")).unwrap(),
        provider: PROVIDER.to_owned(),
        region: east.clone(),
        image_id: ami.clone(),
        client_sha: "abc".to_owned(),
        ip_addr: Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, n))),
        instance_type: "g4dn.2xlarge".to_owned(),
        remaining_capacity: capacity,
        status: InstanceStatus::Active,
    };
    let (ready_host, unready_host) = (row(1, 100), row(2, 1));
    db.insert_instances(&[ready_host.clone(), unready_host.clone()])
        .await
        .unwrap();
    assert!(
        db.set_instance_tls_fingerprint(&ready_host.id, &"ab".repeat(32))
            .await
            .unwrap()
    );
    let alices = db
        .insert_mandelbox(&NewMandelbox {
            id: MandelboxId::random(),
            app: "chrome".to_owned(),
            instance_id: unready_host.id.clone(),
            user_id: Some(UserId::new("alice").unwrap()),
            session_id: None,
            status: MandelboxStatus::Allocated,
        })
        .await
        .unwrap()
        .id;
    let (_ready_tx, ready) = tokio::sync::watch::channel(true);
    let state = ApiState {
        assigner: Arc::new(Assigner {
            db,
            enabled_regions: vec![east],
            mandelboxes_per_user: 3,
            allow_local_commit: true,
            allowed_apps: vec![scaling_service::api::APP.to_owned()],
            regions: HashMap::new(),
        }),
        verifier: Arc::new(StaticVerifier),
        admission: Arc::new(Admission::new(AdmissionSettings::unlimited())),
        metrics: Arc::new(Metrics::new().unwrap()),
        ready,
    };
    let forwarder = Forwarder::new(ForwardSettings {
        max_in_flight: IN_FLIGHT,
        ..ForwardSettings::default()
    });
    let limits = ListenerLimits {
        max_connections: 256,
        max_connections_per_address: PER_ADDRESS,
        header_read_timeout: HEAD_TIMEOUT,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    tokio::spawn(serve_limited(
        listener,
        state,
        Arc::new(forwarder),
        limits,
        shutdown.clone(),
    ));
    Fixture {
        _stack: stack,
        addr,
        shutdown,
        alices,
    }
}

async fn connect_from(local: [u8; 4], to: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(local)), 0))
        .unwrap();
    socket.connect(to).await.unwrap()
}

/// Reads until the head of an answer is in, or the server closes; the status line ("" when
/// closed first).
async fn status_line(stream: &mut TcpStream) -> String {
    let mut response = Vec::new();
    let mut buffer = [0u8; 4096];
    while !response.windows(2).any(|w| w == b"\r\n") {
        match tokio::time::timeout(WAIT, stream.read(&mut buffer)).await {
            Ok(Ok(n)) if n > 0 => response.extend_from_slice(&buffer[..n]),
            Ok(_) => break,
            Err(_) => panic!("no answer within {WAIT:?}"),
        }
    }
    let text = String::from_utf8_lossy(&response);
    text.lines().next().unwrap_or_default().to_owned()
}

/// Whether the server has closed `stream`, waiting at most [`WAIT`].
async fn closed_by_server(stream: &mut TcpStream) -> bool {
    let mut buffer = [0u8; 4096];
    let started = Instant::now();
    while started.elapsed() < WAIT {
        match tokio::time::timeout(WAIT, stream.read(&mut buffer)).await {
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
    false
}

async fn assign_as(user: &str, from: [u8; 4], fx: &Fixture) -> u16 {
    let client = reqwest::Client::builder()
        .local_address(IpAddr::V4(Ipv4Addr::from(from)))
        .build()
        .unwrap();
    client
        .post(format!("http://{}/mandelbox/assign", fx.addr))
        .bearer_auth(user)
        .header("content-type", "application/json")
        .body(BODY)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn a_slowloris_is_held_to_its_share_and_cut_off_while_users_are_served() {
    let fx = fixture().await;
    let attacker = [127, 0, 0, 66];
    // Twice its share of connections: only PER_ADDRESS are served (the rest are closed
    // unread), whatever order the server accepts them in.
    let mut connections = Vec::new();
    for _ in 0..2 * PER_ADDRESS {
        connections.push(connect_from(attacker, fx.addr).await);
    }
    let mut admitted = Vec::new();
    for mut stream in connections {
        let head = b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n";
        let sent = stream.write_all(head).await.is_ok();
        let status = if sent {
            status_line(&mut stream).await
        } else {
            String::new()
        };
        if status.starts_with("HTTP/1.1 200") {
            admitted.push(stream);
        }
    }
    assert_eq!(admitted.len(), PER_ADDRESS);
    // On its admitted connections the attacker starts a request head and sends it a byte at
    // a time, never finishing it.
    let head = b"POST /mandelbox/assign HTTP/1.1\r\nhost: x\r\nx-padding: ";
    let trickles: Vec<_> = admitted
        .into_iter()
        .map(|mut stream| {
            tokio::spawn(async move {
                for byte in head.iter().chain(std::iter::repeat(&b'a')) {
                    if stream.write_all(&[*byte]).await.is_err() {
                        break;
                    }
                    // The attack's pace, not a synchronisation: one byte per 100 ms.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    if let Ok(Ok(0)) =
                        tokio::time::timeout(Duration::ZERO, stream.read(&mut [0u8; 64])).await
                    {
                        break;
                    }
                }
                closed_by_server(&mut stream).await
            })
        })
        .collect();
    // Ten real users at other addresses are served meanwhile.
    for n in 0..10u8 {
        let status = assign_as(&format!("user:u{n}"), [127, 0, 1, n + 1], &fx).await;
        assert_eq!(status, 200, "user {n}");
    }
    // Each trickling connection is closed by the head timeout (bounded wait).
    for trickle in trickles {
        assert!(tokio::time::timeout(WAIT, trickle).await.unwrap().unwrap());
    }
    // Its places are free again.
    let mut stream = connect_from(attacker, fx.addr).await;
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(status_line(&mut stream).await.starts_with("HTTP/1.1 200"));
}

#[tokio::test]
async fn anonymous_bodies_trickling_in_hold_no_forwarding_permit() {
    let fx = fixture().await;
    // More anonymous json_transport requests than there are permits, each from its own
    // address, each stuck in its body: the server asks for the body (100 Continue) only once
    // the handler reads it, so each of these is inside the forwarder when the user comes.
    let mut stuck = Vec::new();
    for n in 0..2 * IN_FLIGHT as u8 {
        let mut stream = connect_from([127, 0, 4, n + 1], fx.addr).await;
        stream
            .write_all(
                b"PUT /json_transport HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
                  content-length: 1000\r\nexpect: 100-continue\r\n\r\n",
            )
            .await
            .unwrap();
        assert!(status_line(&mut stream).await.starts_with("HTTP/1.1 100"));
        stream.write_all(b"{").await.unwrap();
        stuck.push(stream);
    }
    // The real user's forward is not "busy": it reaches the mandelbox's (unready) host.
    let response = reqwest::Client::new()
        .put(format!("http://{}/json_transport", fx.addr))
        .bearer_auth("user:alice")
        .json(&json!({"mandelbox_id": fx.alices, "json_data": "{}"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["code"], "host_not_ready", "{body}");
    drop(stuck);
}
