//! `PUT /json_transport` through the scaling service, over the real database and a stand-in
//! host: a local HTTPS server (rustls, an rcgen certificate) on 127.0.0.1 that records what it
//! receives and answers as told. The host's certificate is pinned to the row's fingerprint: a
//! host that presents another certificate, or the right certificate without its key, never sees
//! the request. The service refuses what the host would (unknown mandelbox, another user's,
//! host not ready) without forwarding anything, and relays the host's answers as they are.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::put;
use dbclient::types::{
    ImageId, InstanceId, InstanceStatus, MandelboxId, MandelboxStatus, NewInstance, NewMandelbox,
    Region, UserId,
};
use dbclient::{DbClient, DbConfig};
use devstack::testing::{TEST_ADMIN_SECRET, TestStack};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use scaling_service::admission::{Admission, AdmissionSettings};
use scaling_service::api::{ApiState, Assigner, serve_with};
use scaling_service::auth::StaticVerifier;
use scaling_service::forward::{ForwardSettings, Forwarder, fingerprint_of};
use scaling_service::metrics::Metrics;
use scaling_service::region::PROVIDER;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const ALICE: &str = "user:alice";

// ---------------------------------------------------------------------------------------------
// The stand-in host

struct Identity {
    cert: CertificateDer<'static>,
    key_der: Vec<u8>,
}

impl Identity {
    fn generate() -> Self {
        let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
        Self {
            cert: certified.cert.der().clone(),
            key_der: certified.signing_key.serialize_der(),
        }
    }

    fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }

    fn fingerprint(&self) -> String {
        fingerprint_of(&self.cert)
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn server_config(identity: &Identity) -> rustls::ServerConfig {
    rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![identity.cert.clone()], identity.key())
        .unwrap()
}

/// Presents `cert`'s certificate but signs the handshake with `key`'s key: only a client that
/// checks the handshake signature notices.
fn impostor_config(cert: &Identity, key: &Identity) -> rustls::ServerConfig {
    let provider = provider();
    let signing_key = provider.key_provider.load_private_key(key.key()).unwrap();
    let certified = rustls::sign::CertifiedKey::new(vec![cert.cert.clone()], signing_key);
    rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(certified)))
}

/// What the stand-in host received.
#[derive(Debug, Clone)]
struct Received {
    authorization: Option<String>,
    body: Vec<u8>,
}

/// A stand-in host: answers `PUT /json_transport` with its answer, recording each request.
#[derive(Clone)]
struct FakeHost {
    received: Arc<Mutex<Vec<Received>>>,
    answer: Arc<Mutex<(StatusCode, Value)>>,
    /// Never answer (a mandelbox that takes longer to start than the router waits).
    hang: Arc<std::sync::atomic::AtomicBool>,
}

impl FakeHost {
    fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    fn answer_with(&self, status: StatusCode, body: Value) {
        *self.answer.lock().unwrap() = (status, body);
    }
}

struct TlsListener {
    tcp: TcpListener,
    acceptor: TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((tcp, addr)) = self.tcp.accept().await else {
                continue;
            };
            // A refused handshake is the client's doing; keep accepting.
            if let Ok(tls) = self.acceptor.accept(tcp).await {
                return (tls, addr);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

async fn host_handler(
    State(host): State<FakeHost>,
    headers: HeaderMap,
    body: String,
) -> impl IntoResponse {
    host.received.lock().unwrap().push(Received {
        authorization: headers
            .get("authorization")
            .map(|v| v.to_str().unwrap().to_owned()),
        body: body.into_bytes(),
    });
    if host.hang.load(std::sync::atomic::Ordering::SeqCst) {
        std::future::pending::<()>().await;
    }
    let (status, body) = host.answer.lock().unwrap().clone();
    let mut response = (status, axum::Json(body)).into_response();
    if status == StatusCode::SERVICE_UNAVAILABLE {
        response
            .headers_mut()
            .insert("retry-after", "5".parse().unwrap());
    }
    response
}

/// Serves the stand-in host over TLS with `config` on 127.0.0.1 at a free port.
async fn start_host(config: rustls::ServerConfig, answer: (StatusCode, Value)) -> (FakeHost, u16) {
    let tcp = TcpListener::bind((LOCALHOST, 0)).await.unwrap();
    let port = tcp.local_addr().unwrap().port();
    let host = FakeHost {
        received: Arc::default(),
        answer: Arc::new(Mutex::new(answer)),
        hang: Arc::default(),
    };
    let app = axum::Router::new()
        .route("/json_transport", put(host_handler))
        .with_state(host.clone());
    let listener = TlsListener {
        tcp,
        acceptor: TlsAcceptor::from(Arc::new(config)),
    };
    tokio::spawn(async move { axum::serve(listener, app).await });
    (host, port)
}

fn ports_answer() -> (StatusCode, Value) {
    (
        StatusCode::OK,
        json!({"result": {"port_32261": 40001, "port_32262": 40002, "port_32263": 40003,
            "port_32273": 40004, "private_key": "00112233445566778899aabbccddeeff",
            "aes_key": "00112233445566778899aabbccddeeff"}}),
    )
}

// ---------------------------------------------------------------------------------------------
// The scaling service

struct Fixture {
    _stack: TestStack,
    db: DbClient,
    url: String,
    shutdown: CancellationToken,
    /// Alice's mandelbox on the instance at 127.0.0.1.
    mandelbox: MandelboxId,
    instance: InstanceId,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// One ACTIVE instance at 127.0.0.1 that published `fingerprint` (none: not yet), with an
/// ALLOCATED mandelbox of alice's; the scaling service's API forwarding to `host_port`.
async fn fixture(fingerprint: Option<&str>, host_port: u16) -> Fixture {
    fixture_with_timeout(fingerprint, host_port, Duration::from_secs(20)).await
}

/// [`fixture`], the forwarder waiting at most `timeout` for the host's answer.
async fn fixture_with_timeout(
    fingerprint: Option<&str>,
    host_port: u16,
    timeout: Duration,
) -> Fixture {
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
    let instance = InstanceId::new("i-00000000000000001").unwrap();
    db.insert_instances(&[NewInstance {
        id: instance.clone(),
        provider: PROVIDER.to_owned(),
        region: east.clone(),
        image_id: ImageId::new("ami-a").unwrap(),
        client_sha: "abc".to_owned(),
        ip_addr: Some(LOCALHOST),
        instance_type: "g4dn.2xlarge".to_owned(),
        remaining_capacity: 1,
        status: InstanceStatus::Active,
    }])
    .await
    .unwrap();
    if let Some(fingerprint) = fingerprint {
        assert!(
            db.set_instance_tls_fingerprint(&instance, fingerprint)
                .await
                .unwrap()
        );
    }
    let mandelbox = db
        .insert_mandelbox(&NewMandelbox {
            id: MandelboxId::random(),
            app: "chrome".to_owned(),
            instance_id: instance.clone(),
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
            db: db.clone(),
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
        port: host_port,
        connect_timeout: Duration::from_secs(5),
        timeout,
        ..ForwardSettings::default()
    });
    let listener = TcpListener::bind((LOCALHOST, 0)).await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    tokio::spawn(serve_with(
        listener,
        state,
        Arc::new(forwarder),
        shutdown.clone(),
    ));
    Fixture {
        _stack: stack,
        db,
        url,
        shutdown,
        mandelbox,
        instance,
    }
}

struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Value,
}

async fn put_json_transport(fx: &Fixture, token: Option<&str>, body: &Value) -> Answer {
    let mut request = reqwest::Client::new()
        .put(format!("{}/json_transport", fx.url))
        .json(body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    Answer {
        status: response.status().as_u16(),
        headers: response.headers().clone(),
        body: response.json().await.unwrap_or(Value::Null),
    }
}

fn settings_body(mandelbox: MandelboxId) -> Value {
    json!({"mandelbox_id": mandelbox, "json_data": "{\"dpi\":192}", "cookies": "ignored"})
}

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test]
async fn the_hosts_answer_is_relayed_and_the_host_saw_the_token_and_the_body() {
    let identity = Identity::generate();
    let (host, port) = start_host(server_config(&identity), ports_answer()).await;
    let fx = fixture(Some(&identity.fingerprint()), port).await;
    let body = settings_body(fx.mandelbox);

    let answer = put_json_transport(&fx, Some(ALICE), &body).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.body, ports_answer().1);
    assert_eq!(answer.headers["cache-control"], "no-store");
    assert_eq!(answer.headers["access-control-allow-origin"], "*");
    let received = host.received();
    assert_eq!(received.len(), 1);
    assert_eq!(
        received[0].authorization.as_deref(),
        Some("Bearer user:alice")
    );
    // The body as the client sent it, unknown fields included.
    assert_eq!(
        serde_json::from_slice::<Value>(&received[0].body).unwrap(),
        body
    );

    // A token in the body (the original's clients) reaches the host as a bearer token too.
    let mut with_token = body.clone();
    with_token["jwt_access_token"] = ALICE.into();
    let answer = put_json_transport(&fx, None, &with_token).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let received = host.received();
    assert_eq!(received.len(), 2);
    assert_eq!(
        received[1].authorization.as_deref(),
        Some("Bearer user:alice")
    );
}

#[tokio::test]
async fn a_host_with_another_certificate_gets_nothing_and_the_client_gets_502() {
    let published = Identity::generate();
    let other = Identity::generate();
    let (host, port) = start_host(server_config(&other), ports_answer()).await;
    let fx = fixture(Some(&published.fingerprint()), port).await;

    let answer = put_json_transport(&fx, Some(ALICE), &settings_body(fx.mandelbox)).await;
    assert_eq!(answer.status, 502, "{}", answer.body);
    assert_eq!(answer.body["code"], "host_certificate_mismatch");
    assert!(
        answer.body["error"]
            .as_str()
            .unwrap()
            .contains("certificate")
    );
    assert!(host.received().is_empty());
}

#[tokio::test]
async fn a_host_with_the_pinned_certificate_but_not_its_key_gets_nothing() {
    let published = Identity::generate();
    let thief = Identity::generate();
    let (host, port) = start_host(impostor_config(&published, &thief), ports_answer()).await;
    let fx = fixture(Some(&published.fingerprint()), port).await;

    let answer = put_json_transport(&fx, Some(ALICE), &settings_body(fx.mandelbox)).await;
    assert_eq!(answer.status, 502, "{}", answer.body);
    assert_eq!(answer.body["code"], "host_handshake_failed");
    assert!(host.received().is_empty());
}

#[tokio::test]
async fn another_users_mandelbox_is_refused_before_anything_is_forwarded() {
    let identity = Identity::generate();
    let (host, port) = start_host(server_config(&identity), ports_answer()).await;
    let fx = fixture(Some(&identity.fingerprint()), port).await;
    let body = settings_body(fx.mandelbox);

    let answer = put_json_transport(&fx, Some("user:mallory"), &body).await;
    assert_eq!(answer.status, 403, "{}", answer.body);
    assert_eq!(answer.body["code"], "forbidden");
    // No token, or an invalid one: 401.
    let answer = put_json_transport(&fx, None, &body).await;
    assert_eq!(
        (answer.status, answer.body["code"].as_str()),
        (401, Some("unauthorized"))
    );
    let answer = put_json_transport(&fx, Some("not-a-token"), &body).await;
    assert_eq!(
        (answer.status, answer.body["code"].as_str()),
        (401, Some("unauthorized"))
    );
    assert!(host.received().is_empty());
}

#[tokio::test]
async fn an_unknown_mandelbox_or_a_malformed_body_is_refused_here() {
    let identity = Identity::generate();
    let (host, port) = start_host(server_config(&identity), ports_answer()).await;
    let fx = fixture(Some(&identity.fingerprint()), port).await;

    let answer = put_json_transport(&fx, Some(ALICE), &settings_body(MandelboxId::random())).await;
    assert_eq!(answer.status, 404, "{}", answer.body);
    assert_eq!(answer.body["code"], "unknown_mandelbox");
    let answer = put_json_transport(
        &fx,
        Some(ALICE),
        &json!({"mandelbox_id": "not-a-uuid", "json_data": "{}"}),
    )
    .await;
    assert_eq!(answer.status, 400, "{}", answer.body);
    assert_eq!(
        (answer.body["code"].as_str(), answer.body["field"].as_str()),
        (Some("invalid_request"), Some("mandelbox_id"))
    );
    let answer = put_json_transport(&fx, Some(ALICE), &json!({"mandelbox_id": fx.mandelbox})).await;
    assert_eq!(answer.body["field"], "json_data");
    assert!(host.received().is_empty());
}

#[tokio::test]
async fn a_host_without_a_published_fingerprint_is_not_ready() {
    let identity = Identity::generate();
    let (host, port) = start_host(server_config(&identity), ports_answer()).await;
    let fx = fixture(None, port).await;

    let answer = put_json_transport(&fx, Some(ALICE), &settings_body(fx.mandelbox)).await;
    assert_eq!(answer.status, 503, "{}", answer.body);
    assert_eq!(answer.body["code"], "host_not_ready");
    assert_eq!(answer.headers["retry-after"], "5");
    assert!(host.received().is_empty());

    // Once published, the same request goes through.
    assert!(
        fx.db
            .set_instance_tls_fingerprint(&fx.instance, &identity.fingerprint())
            .await
            .unwrap()
    );
    let answer = put_json_transport(&fx, Some(ALICE), &settings_body(fx.mandelbox)).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(host.received().len(), 1);
}

#[tokio::test]
async fn the_hosts_error_status_and_body_are_relayed_as_they_are() {
    let identity = Identity::generate();
    let (host, port) = start_host(server_config(&identity), ports_answer()).await;
    let fx = fixture(Some(&identity.fingerprint()), port).await;
    for (n, (status, body)) in [
        (
            StatusCode::CONFLICT,
            json!({"error": "another request with different data was already made", "code": "conflict"}),
        ),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"error": "this host is draining", "code": "draining"}),
        ),
        (
            StatusCode::GATEWAY_TIMEOUT,
            json!({"error": "not ready in time", "code": "spin_up_timeout"}),
        ),
    ]
    .into_iter()
    .enumerate()
    {
        host.answer_with(status, body.clone());
        let answer = put_json_transport(&fx, Some(ALICE), &settings_body(fx.mandelbox)).await;
        assert_eq!(answer.status, status.as_u16());
        assert_eq!(answer.body, body);
        if status == StatusCode::SERVICE_UNAVAILABLE {
            assert_eq!(answer.headers["retry-after"], "5");
        }
        assert_eq!(host.received().len(), n + 1);
    }
}

#[tokio::test]
async fn a_host_that_cannot_be_reached_gets_502() {
    // A port nobody listens on.
    let port = {
        let probe = TcpListener::bind((LOCALHOST, 0)).await.unwrap();
        probe.local_addr().unwrap().port()
    };
    let identity = Identity::generate();
    let fx = fixture(Some(&identity.fingerprint()), port).await;
    let answer = put_json_transport(&fx, Some(ALICE), &settings_body(fx.mandelbox)).await;
    assert_eq!(answer.status, 502, "{}", answer.body);
    assert_eq!(answer.body["code"], "host_unreachable");
}

#[tokio::test]
async fn a_host_slower_than_the_router_gets_a_504_the_client_can_retry_within_it() {
    let identity = Identity::generate();
    let (host, port) = start_host(server_config(&identity), ports_answer()).await;
    host.hang.store(true, std::sync::atomic::Ordering::SeqCst);
    let fx = fixture_with_timeout(
        Some(&identity.fingerprint()),
        port,
        Duration::from_millis(500),
    )
    .await;
    let answer = put_json_transport(&fx, Some(ALICE), &settings_body(fx.mandelbox)).await;
    assert_eq!(answer.status, 504, "{}", answer.body);
    assert_eq!(answer.body["code"], "host_timeout");
    assert_eq!(answer.headers["retry-after"], "1");
    assert_eq!(host.received().len(), 1);
    // The retry reaches the host (which now answers) and gets the ports.
    host.hang.store(false, std::sync::atomic::Ordering::SeqCst);
    let answer = put_json_transport(&fx, Some(ALICE), &settings_body(fx.mandelbox)).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    // The default fits inside Heroku's 30 s router timeout.
    assert!(ForwardSettings::default().timeout < Duration::from_secs(30));
}
