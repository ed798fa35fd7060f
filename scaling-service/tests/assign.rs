//! `POST /mandelbox/assign` over HTTP against the real database: the atomic claim under
//! concurrency, the error codes, bad input, authentication and the rate limit, and the pinned
//! certificate fingerprint in the answer (hosts that have not published one are not ready).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

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

struct Fixture {
    _stack: TestStack,
    db: DbClient,
    url: String,
    shutdown: CancellationToken,
    metrics: Arc<Metrics>,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The fixture's fingerprint of host `n` (64 lowercase hex digits, as the column requires).
fn fingerprint(n: u32) -> String {
    format!("{:02x}", n + 1).repeat(32)
}

/// `hosts` ACTIVE hosts with 2 slots each on the current image of us-east-1 (commit `abc`),
/// each with its json_transport fingerprint published ([`fingerprint`]).
async fn fixture(hosts: u32, admission: AdmissionSettings) -> Fixture {
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
    let rows: Vec<NewInstance> = (0..hosts)
        .map(|n| NewInstance {
            id: InstanceId::new(format!("i-{n:017}")).unwrap(),
            provider: PROVIDER.to_owned(),
            region: east.clone(),
            image_id: ami.clone(),
            client_sha: "abc".to_owned(),
            ip_addr: Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, n as u8 + 1))),
            instance_type: "g4dn.2xlarge".to_owned(),
            remaining_capacity: 2,
            status: InstanceStatus::Active,
        })
        .collect();
    if !rows.is_empty() {
        db.insert_instances(&rows).await.unwrap();
    }
    for (n, row) in rows.iter().enumerate() {
        let published = db
            .set_instance_tls_fingerprint(&row.id, &fingerprint(n as u32))
            .await
            .unwrap();
        assert!(published);
    }
    let metrics = Arc::new(Metrics::new().unwrap());
    let (_ready_tx, ready) = tokio::sync::watch::channel(true);
    let state = ApiState {
        assigner: Arc::new(Assigner {
            db: db.clone(),
            enabled_regions: vec![east, Region::new("us-west-2").unwrap()],
            mandelboxes_per_user: 3,
            allow_local_commit: true,
            allowed_apps: vec!["chrome".to_owned(), "brave".to_owned()],
            regions: HashMap::new(),
        }),
        verifier: Arc::new(StaticVerifier),
        admission: Arc::new(Admission::new(admission)),
        metrics: metrics.clone(),
        ready,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    tokio::spawn(serve(listener, state, shutdown.clone()));
    Fixture {
        _stack: stack,
        db,
        url,
        shutdown,
        metrics,
    }
}

async fn post(
    client: &reqwest::Client,
    fx: &Fixture,
    token: Option<&str>,
    body: &str,
) -> (u16, serde_json::Value) {
    let mut request = client
        .post(format!("{}/mandelbox/assign", fx.url))
        .header("content-type", "application/json")
        .body(body.to_owned());
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (
        status,
        response.json().await.unwrap_or(serde_json::Value::Null),
    )
}

const BODY: &str = r#"{"regions":["us-east-1"],"client_commit_hash":"abc","version":"3.1.0"}"#;

#[tokio::test]
async fn fifty_concurrent_assigns_against_twenty_slots_get_twenty_mandelboxes_and_thirty_503s() {
    let fx = fixture(10, AdmissionSettings::unlimited()).await;
    let client = reqwest::Client::new();
    let answers = futures::future::join_all((0..50).map(|n| {
        let client = client.clone();
        let fx = &fx;
        async move { post(&client, fx, Some(&format!("user:user-{n}")), BODY).await }
    }))
    .await;
    let mut ids = HashSet::new();
    let mut refused = 0;
    for (status, body) in &answers {
        match status {
            200 => assert!(ids.insert(body["mandelbox_id"].as_str().unwrap().to_owned())),
            503 => {
                assert_eq!(body["error"], "NO_INSTANCE_AVAILABLE", "{body}");
                refused += 1;
            }
            other => panic!("{other}: {body}"),
        }
    }
    assert_eq!((ids.len(), refused), (20, 30));
    let east = Region::new("us-east-1").unwrap();
    for row in fx.db.instances_in_region(&east).await.unwrap() {
        assert_eq!(row.instance.remaining_capacity, 0);
        assert_eq!(row.mandelboxes.len(), 2);
    }
    assert!(
        fx.metrics
            .render()
            .contains("whist_scaling_assign_requests_total{result=\"OK\"} 20")
    );
}

#[tokio::test]
async fn errors_are_clean_json() {
    let fx = fixture(1, AdmissionSettings::unlimited()).await;
    let c = reqwest::Client::new();
    let (s, b) = post(&c, &fx, None, BODY).await;
    assert_eq!((s, b["error"].as_str()), (401, Some("UNAUTHORIZED")));
    let (s, b) = post(&c, &fx, Some("user:u"), "{not json").await;
    assert_eq!((s, b["error"].as_str()), (400, Some("BAD_REQUEST")));
    let bad_version = r#"{"regions":["us-east-1"],"client_commit_hash":"abc","version":"x"}"#;
    assert_eq!(post(&c, &fx, Some("user:u"), bad_version).await.0, 400);
    let elsewhere = r#"{"regions":["eu-west-1"],"client_commit_hash":"abc"}"#;
    let (s, b) = post(&c, &fx, Some("user:u"), elsewhere).await;
    assert_eq!((s, b["error"].as_str()), (503, Some("REGION_NOT_ENABLED")));
    let other_commit = r#"{"regions":["us-east-1"],"client_commit_hash":"def"}"#;
    let (s, b) = post(&c, &fx, Some("user:u"), other_commit).await;
    assert_eq!(
        (s, b["error"].as_str()),
        (503, Some("COMMIT_HASH_MISMATCH"))
    );
    // The local override takes the hosts' commit; a user's limit is 3 mandelboxes.
    let local = r#"{"regions":["us-west-2","us-east-1"],"client_commit_hash":"local_dev"}"#;
    let (s, b) = post(&c, &fx, Some("user:u"), local).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["ip"], "10.0.0.1");
    assert_eq!(b["tls_fingerprint"], fingerprint(0).as_str());
    let (_, b) = post(&c, &fx, Some("user:u"), local).await;
    assert!(b["mandelbox_id"].is_string());
    let east = Region::new("us-east-1").unwrap();
    fx.db
        .insert_instances(&[NewInstance {
            id: InstanceId::new("i-0more00000000000").unwrap(),
            provider: PROVIDER.to_owned(),
            region: east.clone(),
            image_id: ImageId::new("ami-a").unwrap(),
            client_sha: "abc".to_owned(),
            ip_addr: Some(IpAddr::V4(Ipv4Addr::new(10, 0, 1, 1))),
            instance_type: "g4dn.2xlarge".to_owned(),
            remaining_capacity: 2,
            status: InstanceStatus::Active,
        }])
        .await
        .unwrap();
    fx.db
        .set_instance_tls_fingerprint(
            &InstanceId::new("i-0more00000000000").unwrap(),
            &fingerprint(7),
        )
        .await
        .unwrap();
    assert_eq!(post(&c, &fx, Some("user:u"), local).await.0, 200);
    let (s, b) = post(&c, &fx, Some("user:u"), local).await;
    assert_eq!((s, b["error"].as_str()), (503, Some("USER_ALREADY_ACTIVE")));
}

#[tokio::test]
async fn the_answer_pins_the_hosts_certificate_and_hosts_without_a_fingerprint_are_not_ready() {
    let fx = fixture(0, AdmissionSettings::unlimited()).await;
    let c = reqwest::Client::new();
    let east = Region::new("us-east-1").unwrap();
    let id = InstanceId::new("i-0booting00000000").unwrap();
    fx.db
        .insert_instances(&[NewInstance {
            id: id.clone(),
            provider: PROVIDER.to_owned(),
            region: east.clone(),
            image_id: ImageId::new("ami-a").unwrap(),
            client_sha: "abc".to_owned(),
            ip_addr: Some(IpAddr::V4(Ipv4Addr::new(10, 0, 2, 1))),
            instance_type: "g4dn.2xlarge".to_owned(),
            remaining_capacity: 2,
            status: InstanceStatus::Active,
        }])
        .await
        .unwrap();
    // ACTIVE with room, but its json_transport certificate is not published yet.
    let (s, b) = post(&c, &fx, Some("user:early"), BODY).await;
    assert_eq!(
        (s, b["error"].as_str()),
        (503, Some("NO_INSTANCE_AVAILABLE")),
        "{b}"
    );
    let rows = fx.db.instances_in_region(&east).await.unwrap();
    assert_eq!(rows[0].instance.remaining_capacity, 2);
    assert!(rows[0].mandelboxes.is_empty());
    // Published: assigned, with the fingerprint to pin.
    let published = "0123456789abcdef".repeat(4);
    assert!(
        fx.db
            .set_instance_tls_fingerprint(&id, &published)
            .await
            .unwrap()
    );
    let (s, b) = post(&c, &fx, Some("user:early"), BODY).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["ip"], "10.0.2.1");
    assert_eq!(b["tls_fingerprint"], published.as_str());
    let answer: scaling_service::api::Assignment = serde_json::from_value(b).unwrap();
    assert_eq!(answer.tls_fingerprint.as_deref(), Some(published.as_str()));
    // The answer as the original clients read it (only `ip` and `mandelbox_id`): an unknown
    // field changes nothing for them.
    #[derive(serde::Deserialize)]
    struct OriginalClientView {
        ip: IpAddr,
        mandelbox_id: String,
    }
    let (_, b) = post(&c, &fx, Some("user:later"), BODY).await;
    let old: OriginalClientView = serde_json::from_value(b).unwrap();
    assert_eq!(old.ip, IpAddr::V4(Ipv4Addr::new(10, 0, 2, 1)));
    assert!(!old.mandelbox_id.is_empty());
}

/// A client whose connections come from `ip` (any 127/8 address is this machine's).
fn client_from(ip: [u8; 4]) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(IpAddr::V4(Ipv4Addr::from(ip)))
        .build()
        .unwrap()
}

fn limit(per_second: f64, burst: u32) -> edge::limit::RateSettings {
    edge::limit::RateSettings {
        per_second,
        burst,
        capacity: 1024,
    }
}

async fn post_raw(
    client: &reqwest::Client,
    fx: &Fixture,
    token: Option<&str>,
    forwarded_for: Option<&str>,
) -> reqwest::Response {
    let mut request = client
        .post(format!("{}/mandelbox/assign", fx.url))
        .header("content-type", "application/json")
        .body(BODY);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(hops) = forwarded_for {
        request = request.header("x-forwarded-for", hops);
    }
    request.send().await.unwrap()
}

#[tokio::test]
async fn anonymous_junk_from_one_address_never_rate_limits_users_at_other_addresses() {
    let fx = fixture(
        2,
        AdmissionSettings {
            per_address: limit(0.001, 3),
            ..AdmissionSettings::unlimited()
        },
    )
    .await;
    let stranger = client_from([127, 0, 0, 66]);
    for _ in 0..3 {
        let r = post_raw(&stranger, &fx, None, None).await;
        assert_eq!(r.status(), 401);
    }
    // Past its burst the stranger gets 429 with a JSON body and Retry-After, before its
    // (missing) token is even looked at.
    for _ in 0..20 {
        let r = post_raw(&stranger, &fx, None, None).await;
        assert_eq!(r.status(), 429);
        let retry_after: u64 = r.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(retry_after >= 1);
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["error"], "RATE_LIMITED");
    }
    // Real users elsewhere are served as if nothing happened (on a global bucket they got 429).
    for (n, user) in ["user:a", "user:b", "user:c"].iter().enumerate() {
        let client = client_from([127, 0, 1, n as u8 + 1]);
        let (s, b) = {
            let r = post_raw(&client, &fx, Some(user), None).await;
            (
                r.status().as_u16(),
                r.json::<serde_json::Value>().await.unwrap(),
            )
        };
        assert_eq!(s, 200, "{user}: {b}");
    }
    // Refused means untouched: exactly the three users' mandelboxes.
    let east = Region::new("us-east-1").unwrap();
    let rows = fx.db.instances_in_region(&east).await.unwrap();
    let boxes: usize = rows.iter().map(|r| r.mandelboxes.len()).sum();
    assert_eq!(boxes, 3);
    let metrics = reqwest::get(format!("{}/metrics", fx.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("whist_scaling_assign_seconds"));
}

#[tokio::test]
async fn one_user_from_many_addresses_is_limited_after_authentication() {
    let fx = fixture(
        3,
        AdmissionSettings {
            per_user: limit(0.001, 2),
            ..AdmissionSettings::unlimited()
        },
    )
    .await;
    for n in 0..2u8 {
        let r = post_raw(
            &client_from([127, 0, 2, n + 1]),
            &fx,
            Some("user:greedy"),
            None,
        )
        .await;
        assert_eq!(r.status(), 200);
    }
    let r = post_raw(&client_from([127, 0, 2, 9]), &fx, Some("user:greedy"), None).await;
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "RATE_LIMITED");
    assert!(body["message"].as_str().unwrap().contains("user"), "{body}");
    // Another user on the same address is not affected.
    let r = post_raw(&client_from([127, 0, 2, 9]), &fx, Some("user:other"), None).await;
    assert_eq!(r.status(), 200);
    let east = Region::new("us-east-1").unwrap();
    let rows = fx.db.instances_in_region(&east).await.unwrap();
    let boxes: usize = rows.iter().map(|r| r.mandelboxes.len()).sum();
    assert_eq!(boxes, 3);
}

#[tokio::test]
async fn behind_a_trusted_proxy_clients_are_told_apart_by_the_hop_it_appended() {
    let fx = fixture(
        2,
        AdmissionSettings {
            per_address: limit(0.001, 1),
            trusted_proxies: 1,
            ..AdmissionSettings::unlimited()
        },
    )
    .await;
    // Every request comes from one peer (the "router"); the stranger forges a left-most hop
    // each time, but the right-most one is what the router saw.
    let router = client_from([127, 0, 3, 1]);
    let first = post_raw(&router, &fx, None, Some("1.1.1.1, 6.6.6.6")).await;
    assert_eq!(first.status(), 401);
    for forged in ["2.2.2.2", "3.3.3.3", "4.4.4.4"] {
        let hops = format!("{forged}, 6.6.6.6");
        let r = post_raw(&router, &fx, None, Some(&hops)).await;
        assert_eq!(r.status(), 429, "forged {forged}");
    }
    let user = post_raw(&router, &fx, Some("user:behind"), Some("5.5.5.5")).await;
    assert_eq!(user.status(), 200);
}

fn host(n: u32) -> InstanceId {
    InstanceId::new(format!("i-{n:017}")).unwrap()
}

async fn insert_warm(fx: &Fixture, on: &InstanceId) -> dbclient::types::MandelboxId {
    let row = dbclient::types::NewMandelbox {
        id: dbclient::types::MandelboxId::random(),
        app: "chrome".to_owned(),
        instance_id: on.clone(),
        user_id: None,
        session_id: None,
        status: dbclient::types::MandelboxStatus::Waiting,
    };
    fx.db
        .insert_waiting_mandelbox(&row)
        .await
        .unwrap()
        .unwrap()
        .id
}

#[tokio::test]
async fn assign_claims_a_warm_mandelbox_before_taking_a_cold_slot() {
    let fx = fixture(2, AdmissionSettings::unlimited()).await;
    let warm = insert_warm(&fx, &host(1)).await;
    let client = reqwest::Client::new();
    let (status, body) = post(&client, &fx, Some("user:alice"), BODY).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["mandelbox_id"], warm.to_string());
    assert_eq!(body["ip"], "10.0.0.2");
    assert_eq!(body["tls_fingerprint"], fingerprint(1));
    let row = fx.db.mandelbox(&warm).await.unwrap().unwrap();
    assert_eq!(row.status, dbclient::types::MandelboxStatus::Allocated);
    assert_eq!(row.user_id.map(|u| u.to_string()).as_deref(), Some("alice"));
    // The claim took no capacity (the WAITING row held its unit); the next user goes cold.
    let instance = fx.db.instance(&host(1)).await.unwrap().unwrap();
    assert_eq!(instance.instance.remaining_capacity, 1);
    let (status, body) = post(&client, &fx, Some("user:bob"), BODY).await;
    assert_eq!(status, 200, "{body}");
    assert_ne!(body["mandelbox_id"], warm.to_string());
}

#[tokio::test]
async fn concurrent_assigns_claim_each_warm_mandelbox_once_and_then_fall_back_to_cold_slots() {
    let fx = fixture(3, AdmissionSettings::unlimited()).await;
    let warm: HashSet<String> = [
        insert_warm(&fx, &host(1)).await,
        insert_warm(&fx, &host(1)).await,
    ]
    .iter()
    .map(ToString::to_string)
    .collect();
    let client = reqwest::Client::new();
    let answers = futures::future::join_all((0..10).map(|n| {
        let client = client.clone();
        let fx = &fx;
        async move { post(&client, fx, Some(&format!("user:user-{n}")), BODY).await }
    }))
    .await;
    let mut ids = HashSet::new();
    let mut refused = 0;
    for (status, body) in &answers {
        match status {
            200 => assert!(ids.insert(body["mandelbox_id"].as_str().unwrap().to_owned())),
            503 => {
                assert_eq!(body["error"], "NO_INSTANCE_AVAILABLE", "{body}");
                refused += 1;
            }
            other => panic!("{other}: {body}"),
        }
    }
    // Two warm boxes and four cold slots: six users served, each warm box exactly once.
    assert_eq!((ids.len(), refused), (6, 4));
    assert!(warm.is_subset(&ids), "{warm:?} {ids:?}");
    let east = Region::new("us-east-1").unwrap();
    for row in fx.db.instances_in_region(&east).await.unwrap() {
        assert_eq!(row.instance.remaining_capacity, 0);
        assert_eq!(row.mandelboxes.len(), 2);
        assert!(row.mandelboxes.iter().all(|m| m.user_id.is_some()));
    }
}

/// A browser may call assign: the preflight names POST and the headers a client sends, and
/// every answer carries the origin header, the policy of json_transport's (`edge::cors`).
#[tokio::test]
async fn browsers_get_the_cors_preflight_and_origin_header_on_every_answer() {
    let fx = fixture(1, AdmissionSettings::unlimited()).await;
    let c = reqwest::Client::new();
    let preflight = c
        .request(
            reqwest::Method::OPTIONS,
            format!("{}/mandelbox/assign", fx.url),
        )
        .header("origin", "https://app.example")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization, content-type",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(preflight.status(), 204);
    let h = preflight.headers();
    assert_eq!(h["access-control-allow-origin"], "*");
    assert_eq!(h["access-control-allow-methods"], "POST, OPTIONS");
    assert_eq!(
        h["access-control-allow-headers"],
        "authorization, content-type"
    );
    assert!(h.contains_key("access-control-max-age"));
    // The answer of an assignment, a refusal and a failure alike.
    for (token, body, status) in [
        (Some("user:u"), BODY, 200),
        (None, BODY, 401),
        (Some("user:v"), "{not json", 400),
        (
            Some("user:w"),
            r#"{"regions":["eu-west-1"],"client_commit_hash":"abc"}"#,
            503,
        ),
    ] {
        let mut request = c
            .post(format!("{}/mandelbox/assign", fx.url))
            .header("origin", "https://app.example")
            .header("content-type", "application/json")
            .body(body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status().as_u16(), status, "{body}");
        assert_eq!(response.headers()["access-control-allow-origin"], "*");
    }
}

/// The app comes from the request where the deployment runs it (here chrome and brave),
/// chrome when the request names none; another app is a 400 naming it, and nothing is taken.
#[tokio::test]
async fn the_app_is_the_requests_when_allowed_and_chrome_by_default() {
    let fx = fixture(2, AdmissionSettings::unlimited()).await;
    let c = reqwest::Client::new();
    let east = Region::new("us-east-1").unwrap();
    let free = |rows: Vec<dbclient::types::InstanceWithMandelboxes>| {
        rows.iter()
            .map(|r| r.instance.remaining_capacity)
            .sum::<u32>()
    };
    let before = free(fx.db.instances_in_region(&east).await.unwrap());
    let firefox = r#"{"regions":["us-east-1"],"client_commit_hash":"abc","app":"firefox"}"#;
    let (s, b) = post(&c, &fx, Some("user:a"), firefox).await;
    assert_eq!((s, b["error"].as_str()), (400, Some("BAD_REQUEST")), "{b}");
    let message = b["message"].as_str().unwrap();
    assert!(
        message.contains("firefox") && message.contains("chrome, brave"),
        "{message}"
    );
    assert_eq!(
        free(fx.db.instances_in_region(&east).await.unwrap()),
        before
    );

    let brave = r#"{"regions":["us-east-1"],"client_commit_hash":"abc","app":"brave"}"#;
    let (s, b) = post(&c, &fx, Some("user:a"), brave).await;
    assert_eq!(s, 200, "{b}");
    let id: dbclient::types::MandelboxId = b["mandelbox_id"].as_str().unwrap().parse().unwrap();
    assert_eq!(fx.db.mandelbox(&id).await.unwrap().unwrap().app, "brave");

    let (s, b) = post(&c, &fx, Some("user:b"), BODY).await;
    assert_eq!(s, 200, "{b}");
    let id: dbclient::types::MandelboxId = b["mandelbox_id"].as_str().unwrap().parse().unwrap();
    assert_eq!(fx.db.mandelbox(&id).await.unwrap().unwrap().app, "chrome");
    assert_eq!(
        free(fx.db.instances_in_region(&east).await.unwrap()),
        before - 2
    );
}
