//! The client-facing HTTPS endpoint (`PUT /json_transport`) against the running service: real
//! TLS (clients pin the published fingerprint), the real Docker Engine with the mandelbox stub
//! image, the local stack (PostgreSQL behind the Hasura stand-in), and devstack's fake Auth0
//! (`devstack::jwks`) issuing the tokens.
//!
//! Each test is its own "EC2 instance" (instance id, row, root directory, host port range,
//! endpoint port); a guard removes its containers when it ends. Waits are on real state with a
//! bound; nothing sleeps in place of synchronisation.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use dbclient::types::{
    ImageId, InstanceId, MandelboxId, MandelboxStatus, NewMandelbox, Region, UserId,
};
use dbclient::{DbClient, DbConfig};
use devstack::jwks::{FakeJwks, SigningKey};
use devstack::testing::{TEST_ADMIN_SECRET, TestStack};
use edge::pin::PinnedVerifier;
use host_service::docker::{ContainerRuntime, DEFAULT_SOCKET, DockerRuntime};
use host_service::host::Host;
use host_service::json_transport::Fingerprint;
use host_service::mandelbox::LABEL_INSTANCE_ID;
use host_service::mappings;
use host_service::metadata::InstanceIdentity;
use host_service::{Config, Signals, Stopped};
use logger::Secret;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);
const AMI: &str = "ami-0123456789abcdef0";
const INSTANCE_TYPE: &str = "g4dn.12xlarge";
const SETTINGS: &str =
    "{\"client_dpi\": 192, \"dark_mode\": true,\n \"desired_timezone\": \"Europe/Paris\"}";
/// The example `mandelbox_id` in docs/openapi.yaml.
const OPENAPI_EXAMPLE_ID: &str = "5ccdb471-8ab2-4441-a3d1-f7f7146dda0c";

// ---------------------------------------------------------------------------------------------
// Clients that pin the certificate

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn client_with(config: rustls::ClientConfig) -> reqwest::Client {
    reqwest::Client::builder()
        .tls_backend_preconfigured(config)
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

fn pinned_client(fingerprint: &str) -> reqwest::Client {
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(
            PinnedVerifier::new(fingerprint, provider()).unwrap(),
        ))
        .with_no_client_auth();
    client_with(config)
}

/// A client that trusts the certificate as a root, with the usual name checks.
fn trusting_client(cert: CertificateDer<'static>) -> reqwest::Client {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    client_with(config)
}

// ---------------------------------------------------------------------------------------------
// One test's instance

struct TestHost {
    stack: TestStack,
    db: DbClient,
    jwks: FakeJwks,
    identity: InstanceIdentity,
    root: tempfile::TempDir,
    port_range: std::ops::Range<u16>,
}

struct Running<R: ContainerRuntime + Clone + 'static> {
    task: tokio::task::JoinHandle<Result<Stopped, host_service::HostError>>,
    host: Arc<Host<R>>,
    signals: Signals,
    base: String,
    client: reqwest::Client,
    fingerprint: String,
}

fn identity() -> InstanceIdentity {
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    InstanceIdentity {
        instance_id: InstanceId::new(format!("i-jt{}", &suffix[..12])).unwrap(),
        ami_id: ImageId::new(AMI).unwrap(),
        region: Region::new("us-east-1").unwrap(),
        instance_type: INSTANCE_TYPE.to_owned(),
        public_ipv4: Some(Ipv4Addr::new(203, 0, 113, 9)),
        private_ipv4: Some(Ipv4Addr::LOCALHOST),
        name: Some("test".to_owned()),
    }
}

/// A host port range of its own: nextest runs each test in its own process (consecutive pids),
/// cargo test in threads of one (the counter). Above the lifecycle tests' 20000-40000.
fn port_range() -> std::ops::Range<u16> {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let slot = (std::process::id() + n * 37) % 80;
    let start = 40000 + u16::try_from(slot).unwrap() * 100;
    start..start + 100
}

impl TestHost {
    async fn new() -> Self {
        ensure_stub_image();
        let stack = TestStack::start().await.unwrap();
        let db = DbClient::new(
            &DbConfig::new(
                &stack.graphql_url(),
                Some(Secret::new(TEST_ADMIN_SECRET.to_owned())),
            )
            .unwrap(),
        )
        .unwrap();
        let host = Self {
            stack,
            db,
            jwks: FakeJwks::start().await.unwrap(),
            identity: identity(),
            root: tempfile::tempdir().unwrap(),
            port_range: port_range(),
        };
        host.insert_row().await;
        host
    }

    async fn insert_row(&self) {
        self.stack
            .sql()
            .await
            .unwrap()
            .execute(
                "INSERT INTO whist.instances (id, provider, region, image_id, client_sha, \
                 instance_type, remaining_capacity, status) \
                 VALUES ($1, 'AWS', 'us-east-1', $2, $3, $4, 0, 'PRE_CONNECTION')",
                &[
                    &self.identity.instance_id.as_str(),
                    &AMI,
                    &host_service::config::BUILD_COMMIT,
                    &INSTANCE_TYPE,
                ],
            )
            .await
            .unwrap();
    }

    fn config(&self) -> Config {
        use clap::Parser as _;
        let mut config = host_service::config::Args::try_parse_from([
            "whist-host-service",
            "--app-env",
            "localdevwithdb",
            "--graphql-url",
            &self.stack.graphql_url(),
            "--admin-secret",
            TEST_ADMIN_SECRET,
            "--auth-issuer",
            &self.jwks.issuer(),
            // The cold path: these tests count containers and pairings of their own.
            "--warm-mandelboxes",
            "0",
        ])
        .unwrap()
        .validate()
        .unwrap();
        base_config(&mut config, self.root.path(), self.port_range.clone());
        config
    }

    async fn start(&self, config: Config) -> Running<DockerRuntime> {
        let runtime = DockerRuntime::connect(DEFAULT_SOCKET).await.unwrap();
        self.start_with(config, runtime).await
    }

    async fn start_with<R: ContainerRuntime + Clone + 'static>(
        &self,
        config: Config,
        runtime: R,
    ) -> Running<R> {
        let addr = config.json_transport_addr;
        let (task, host, signals) = launch(config, self.identity.clone(), runtime).await;
        // The host publishes its certificate's fingerprint on its row.
        let started = Instant::now();
        let fingerprint = loop {
            let row = self.db.instance(&self.identity.instance_id).await.unwrap();
            if let Some(fingerprint) = row.and_then(|r| r.instance.tls_fingerprint) {
                break fingerprint;
            }
            assert!(started.elapsed() < WAIT, "the fingerprint is published");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        Running {
            task,
            host,
            signals,
            base: format!("https://{addr}"),
            client: pinned_client(&fingerprint),
            fingerprint,
        }
    }

    /// Assigns a new mandelbox of `user` to this instance, as the scaling service does.
    async fn allocate(&self, user: &str) -> MandelboxId {
        let id = MandelboxId::random();
        let row = self
            .db
            .allocate_mandelbox(&NewMandelbox {
                id,
                app: "CHROME".to_owned(),
                instance_id: self.identity.instance_id.clone(),
                user_id: Some(UserId::new(user).unwrap()),
                session_id: Some("1700000000000".to_owned()),
                status: MandelboxStatus::Allocated,
            })
            .await
            .unwrap();
        assert!(row.is_some(), "the instance has capacity");
        id
    }

    fn mappings(&self, id: MandelboxId) -> PathBuf {
        mappings_of(self.root.path(), id)
    }

    async fn containers(&self) -> usize {
        containers_of(&self.identity.instance_id).await
    }

    async fn status(&self, id: MandelboxId) -> Option<MandelboxStatus> {
        self.db.mandelbox(&id).await.unwrap().map(|m| m.status)
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        remove_containers(&self.identity.instance_id);
    }
}

fn base_config(config: &mut Config, root: &Path, port_range: std::ops::Range<u16>) {
    config.root_dir = root.to_owned();
    config.port_range = port_range;
    config.gpu_override = Some(6);
    config.ops_addr = "127.0.0.1:0".parse().unwrap();
    let port = devstack::postgres::free_port().unwrap();
    config.json_transport_addr = format!("127.0.0.1:{port}").parse().unwrap();
    config.json_transport_timeout = Duration::from_secs(30);
    config.ready_timeout = Duration::from_secs(30);
    config.stop_grace = Duration::from_secs(2);
    config.drain_deadline = Duration::from_millis(100);
}

async fn launch<R: ContainerRuntime + Clone + 'static>(
    config: Config,
    identity: InstanceIdentity,
    runtime: R,
) -> (
    tokio::task::JoinHandle<Result<Stopped, host_service::HostError>>,
    Arc<Host<R>>,
    Signals,
) {
    let signals = Signals::new();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(host_service::run_with(
        config,
        identity,
        runtime,
        signals.clone(),
        move |host| {
            let _ = tx.send(host);
        },
    ));
    let host = tokio::time::timeout(WAIT, rx)
        .await
        .expect("the host starts in time")
        .expect("the host starts");
    (task, host, signals)
}

fn mappings_of(root: &Path, id: MandelboxId) -> PathBuf {
    root.join(id.to_string()).join("mandelboxResourceMappings")
}

async fn containers_of(instance: &InstanceId) -> usize {
    let runtime = DockerRuntime::connect(DEFAULT_SOCKET).await.unwrap();
    let own = instance.to_string();
    runtime
        .list_mandelboxes()
        .await
        .unwrap()
        .into_iter()
        .filter(|c| c.labels.get(LABEL_INSTANCE_ID) == Some(&own))
        .count()
}

fn remove_containers(instance: &InstanceId) {
    let filter = format!("label={LABEL_INSTANCE_ID}={instance}");
    if let Ok(out) = std::process::Command::new("docker")
        .args(["ps", "-aq", "--filter", &filter])
        .output()
    {
        for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let _ = std::process::Command::new("docker")
                .args(["rm", "-f", id])
                .output();
        }
    }
}

fn ensure_stub_image() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let present = std::process::Command::new("docker")
            .args(["image", "inspect", "whist/browsers/chrome:current-build"])
            .output()
            .is_ok_and(|o| o.status.success());
        if !present {
            let script = concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../devstack/mandelbox/build-image.sh"
            );
            let status = std::process::Command::new(script).status().unwrap();
            assert!(status.success(), "cannot build the mandelbox test image");
        }
    });
}

/// Waits until `check` holds, looking again every 50 ms, for at most [`WAIT`].
async fn until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < WAIT, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What came back: status, JSON body (`Null` when there is none) and headers.
struct Answer {
    status: u16,
    body: Value,
    headers: reqwest::header::HeaderMap,
}

impl Answer {
    fn code(&self) -> &str {
        self.body["code"].as_str().unwrap_or("")
    }

    /// A refusal: the expected status, a JSON error naming `code`.
    fn assert_refused(&self, status: u16, code: &str, context: &str) {
        assert_eq!(self.status, status, "{context}: {}", self.body);
        assert_eq!(self.code(), code, "{context}: {}", self.body);
        assert!(self.body["error"].is_string(), "{context}: {}", self.body);
        assert_eq!(
            self.headers["content-type"], "application/json",
            "{context}"
        );
        assert_eq!(self.headers["access-control-allow-origin"], "*");
    }
}

impl<R: ContainerRuntime + Clone + 'static> Running<R> {
    async fn send(&self, request: reqwest::RequestBuilder) -> Answer {
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let bytes = response.bytes().await.unwrap();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&bytes)))
        };
        Answer {
            status,
            body,
            headers,
        }
    }

    /// `PUT /json_transport` with `token` (if any) as a bearer token.
    async fn put(&self, token: Option<&str>, body: &Value) -> Answer {
        let mut request = self
            .client
            .put(format!("{}/json_transport", self.base))
            .json(body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        self.send(request).await
    }

    async fn put_raw(&self, token: &str, body: impl Into<reqwest::Body>) -> Answer {
        self.send(
            self.client
                .put(format!("{}/json_transport", self.base))
                .bearer_auth(token)
                .header("content-type", "application/json")
                .body(body),
        )
        .await
    }

    /// `PUT /json_transport` over a raw TLS connection, the body in 64 KiB chunks without a
    /// content length; returns the status line.
    async fn put_chunked(&self, token: &str, body: &[u8]) -> String {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(
                PinnedVerifier::new(&self.fingerprint, provider()).unwrap(),
            ))
            .with_no_client_auth();
        let addr = self.base.trim_start_matches("https://").to_owned();
        let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        let head = format!(
            "PUT /json_transport HTTP/1.1\r\nhost: localhost\r\nauthorization: Bearer {token}\r\n\
             content-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        tls.write_all(head.as_bytes()).await.unwrap();
        for chunk in body.chunks(64 * 1024) {
            let framed = [format!("{:x}\r\n", chunk.len()).as_bytes(), chunk, b"\r\n"].concat();
            // The server may answer 413 and close before the whole body is sent.
            if tls.write_all(&framed).await.is_err() {
                break;
            }
        }
        let _ = tls.write_all(b"0\r\n\r\n").await;
        let mut response = Vec::new();
        let mut buffer = [0u8; 4096];
        while !response.windows(2).any(|w| w == b"\r\n") {
            match tokio::time::timeout(WAIT, tls.read(&mut buffer)).await {
                Ok(Ok(n)) if n > 0 => response.extend_from_slice(&buffer[..n]),
                _ => break,
            }
        }
        let text = String::from_utf8_lossy(&response);
        text.lines().next().unwrap_or_default().to_owned()
    }

    async fn stop(self) {
        self.signals.drain.cancel();
        assert_eq!(self.task.await.unwrap().unwrap(), Stopped::Drained);
    }
}

fn request(id: MandelboxId, settings: &str) -> Value {
    json!({"mandelbox_id": id.to_string(), "json_data": settings})
}

fn compressed(text: &str) -> String {
    use std::io::Write as _;
    let mut encoder = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(text.as_bytes()).unwrap();
    base64::engine::general_purpose::STANDARD.encode(encoder.finish().unwrap())
}

/// The answer of a 200: four distinct host ports in the range and the key twice.
fn assert_ports_and_key(answer: &Answer, range: &std::ops::Range<u16>) {
    assert_eq!(answer.status, 200, "{}", answer.body);
    let result = &answer.body["result"];
    let mut ports = Vec::new();
    for port in [32261, 32262, 32263, 32273] {
        let host_port = result[format!("port_{port}")].as_u64().unwrap();
        assert!(
            range.contains(&u16::try_from(host_port).unwrap()),
            "{result}"
        );
        ports.push(host_port);
    }
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), 4, "{result}");
    let key = result["private_key"].as_str().unwrap();
    assert_eq!(key.len(), 32);
    assert!(
        key.chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
    );
    assert_eq!(result["aes_key"], result["private_key"]);
    assert_eq!(answer.headers["cache-control"], "no-store");
    assert_eq!(answer.headers["access-control-allow-origin"], "*");
}

// ---------------------------------------------------------------------------------------------
// The tests

/// The client's request may reach the host while the mandelbox is still being created (sent
/// right after the allocation) or once the mandelbox waits for it; both get the ports and key.
/// A repeat gets the same answer (token in the body this time, as the original's clients sent
/// it); other data for the same mandelbox gets 409; `config.json` holds exactly what was sent.
#[tokio::test]
async fn valid_token_gets_ports_and_key_before_and_after_the_mandelbox_waits() {
    let t = TestHost::new().await;
    let r = t.start(t.config()).await;
    let alice = t.jwks.token("alice").unwrap();

    let early = t.allocate("alice").await;
    let sent_before_it_waited = !t.mappings(early).join(mappings::PARAMS_READY).exists();
    let answer = r.put(Some(&alice), &request(early, SETTINGS)).await;
    assert_ports_and_key(&answer, &t.port_range);
    assert!(
        sent_before_it_waited,
        "the request came before .paramsReady"
    );
    assert_eq!(
        std::fs::read_to_string(t.mappings(early).join(mappings::CONFIG_JSON)).unwrap(),
        SETTINGS,
        "verbatim"
    );
    assert_eq!(t.status(early).await, Some(MandelboxStatus::Running));

    let mut repeat = request(early, SETTINGS);
    repeat["jwt_access_token"] = alice.clone().into();
    let again = r.put(None, &repeat).await;
    assert_eq!(again.status, 200);
    assert_eq!(again.body, answer.body, "the same answer");

    let conflict = r
        .put(Some(&alice), &request(early, "{\"client_dpi\": 96}"))
        .await;
    conflict.assert_refused(409, "conflict", "other data");
    assert_eq!(
        std::fs::read_to_string(t.mappings(early).join(mappings::CONFIG_JSON)).unwrap(),
        SETTINGS,
        "a refused request changes nothing"
    );

    // Bob's mandelbox is already waiting for its request; his settings come compressed.
    let bob = t.jwks.token("bob").unwrap();
    let late = t.allocate("bob").await;
    until(".paramsReady of the second mandelbox", || async {
        t.mappings(late).join(mappings::PARAMS_READY).exists()
    })
    .await;
    let answer = r
        .put(Some(&bob), &request(late, &compressed(SETTINGS)))
        .await;
    assert_ports_and_key(&answer, &t.port_range);
    assert_eq!(
        std::fs::read_to_string(t.mappings(late).join(mappings::CONFIG_JSON)).unwrap(),
        SETTINGS,
        "inflated"
    );
    assert_eq!(t.containers().await, 2);
    r.stop().await;
}

/// Tokens that are not good enough get 401, another user's token 403, a mandelbox that is not
/// this host's 404, each with a JSON error; none of them reaches the mandelbox, which still
/// takes its owner's request afterwards (with a token expired a few seconds ago, within the
/// leeway).
#[tokio::test]
async fn bad_tokens_other_users_and_unknown_mandelboxes_are_refused_and_change_nothing() {
    let t = TestHost::new().await;
    let r = t.start(t.config()).await;
    let id = t.allocate("alice").await;
    until("the mandelbox to wait for its request", || async {
        t.mappings(id).join(mappings::PARAMS_READY).exists()
    })
    .await;
    let slots = r.host.pairing.len();

    let key = t.jwks.key();
    let claims = t.jwks.claims("alice");
    let with = |changes: Value| {
        let mut c = claims.clone();
        for (k, v) in changes.as_object().unwrap() {
            if v.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        key.sign(&c).unwrap()
    };
    let now = chrono::Utc::now().timestamp();
    // Another key under the same kid: a forged signature.
    let impostor = SigningKey::generate(key.kid()).unwrap();
    let hs256 = {
        let b64 =
            |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
        format!(
            "{}.{}.c2lnbmF0dXJl",
            b64(&json!({"alg": "HS256", "kid": key.kid()})),
            b64(&claims)
        )
    };
    let body = request(id, SETTINGS);
    let cases: Vec<(&str, Option<String>, u16, &str)> = vec![
        ("no token", None, 401, "unauthorized"),
        (
            "forged signature",
            Some(impostor.sign(&claims).unwrap()),
            401,
            "unauthorized",
        ),
        (
            "wrong audience",
            Some(with(json!({"aud": "https://elsewhere"}))),
            401,
            "unauthorized",
        ),
        (
            "wrong issuer",
            Some(with(json!({"iss": "https://evil.example/"}))),
            401,
            "unauthorized",
        ),
        (
            "expired",
            Some(with(json!({"exp": now - 3600}))),
            401,
            "unauthorized",
        ),
        (
            "not yet valid",
            Some(with(json!({"nbf": now + 3600}))),
            401,
            "unauthorized",
        ),
        (
            "no exp",
            Some(with(json!({"exp": null}))),
            401,
            "unauthorized",
        ),
        (
            "no sub",
            Some(with(json!({"sub": null}))),
            401,
            "unauthorized",
        ),
        (
            "unknown kid",
            Some(
                key.sign_with_header(&json!({"alg": "RS256", "kid": "nope"}), &claims)
                    .unwrap(),
            ),
            401,
            "unauthorized",
        ),
        ("HS256", Some(hs256), 401, "unauthorized"),
        ("garbage", Some("not.a.jwt".to_owned()), 401, "unauthorized"),
        (
            "another user",
            Some(t.jwks.token("mallory").unwrap()),
            403,
            "forbidden",
        ),
    ];
    for (what, token, status, code) in &cases {
        let answer = r.put(token.as_deref(), &body).await;
        answer.assert_refused(*status, code, what);
    }
    // The same tokens in the body are refused the same way.
    let mut in_body = body.clone();
    in_body["jwt_access_token"] = with(json!({"aud": "https://elsewhere"})).into();
    r.put(None, &in_body)
        .await
        .assert_refused(401, "unauthorized", "wrong audience in the body");
    let answer = r
        .send(
            r.client
                .put(format!("{}/json_transport", r.base))
                .header("authorization", "Basic YWxpY2U6c2VjcmV0")
                .json(&body),
        )
        .await;
    answer.assert_refused(401, "unauthorized", "not a bearer token");

    let alice = t.jwks.token("alice").unwrap();
    r.put(Some(&alice), &request(MandelboxId::random(), SETTINGS))
        .await
        .assert_refused(404, "unknown_mandelbox", "unknown mandelbox");
    // A mandelbox of alice on another instance.
    let sql = t.stack.sql().await.unwrap();
    sql.execute(
        "INSERT INTO whist.instances (id, provider, region, image_id, client_sha, \
         instance_type, remaining_capacity, status) \
         VALUES ('i-elsewhere', 'AWS', 'us-east-1', $1, 'x', $2, 1, 'ACTIVE')",
        &[&AMI, &INSTANCE_TYPE],
    )
    .await
    .unwrap();
    let elsewhere = uuid::Uuid::new_v4();
    sql.execute(
        "INSERT INTO whist.mandelboxes (id, app, instance_id, user_id, status) \
         VALUES ($1, 'CHROME', 'i-elsewhere', 'alice', 'ALLOCATED')",
        &[&elsewhere],
    )
    .await
    .unwrap();
    r.put(
        Some(&alice),
        &json!({"mandelbox_id": elsewhere, "json_data": "{}"}),
    )
    .await
    .assert_refused(404, "unknown_mandelbox", "another host's mandelbox");

    assert_eq!(
        r.host.pairing.len(),
        slots,
        "no request reached the pairing"
    );
    assert!(!t.mappings(id).join(mappings::CONFIG_JSON).exists());
    assert_eq!(t.status(id).await, Some(MandelboxStatus::Connecting));
    assert_eq!(t.containers().await, 1);

    // Expired 10 s ago: within the 30 s leeway.
    let answer = r.put(Some(&with(json!({"exp": now - 10}))), &body).await;
    assert_ports_and_key(&answer, &t.port_range);
    r.stop().await;
}

/// Oversize and malformed bodies, other methods and paths: JSON 4xx errors naming the field,
/// never a 5xx, and nothing reaches the pairing.
#[tokio::test]
async fn oversize_and_malformed_bodies_get_json_errors_naming_the_field() {
    let t = TestHost::new().await;
    let r = t.start(t.config()).await;
    let alice = t.jwks.token("alice").unwrap();
    let id = MandelboxId::random().to_string();
    let max = host_service::json_transport::MAX_BODY_BYTES;

    let oversize = vec![b' '; max + 1];
    r.put_raw(&alice, oversize.clone()).await.assert_refused(
        413,
        "body_too_large",
        "with a content length",
    );
    let status = r.put_chunked(&alice, &oversize).await;
    assert!(
        status.starts_with("HTTP/1.1 413"),
        "chunked, no content length: {status}"
    );

    let bomb = compressed(&format!("{{\"x\":\"{}\"}}", "a".repeat(4 << 20)));
    let big = format!("{{\"x\":\"{}\"}}", "a".repeat(300 * 1024));
    for (what, body, field) in [
        ("empty", String::new(), "body"),
        ("truncated", "{".to_owned(), "body"),
        ("an array", "[]".to_owned(), "body"),
        (
            "no id",
            json!({"json_data": "{}"}).to_string(),
            "mandelbox_id",
        ),
        (
            "bad id",
            json!({"mandelbox_id": "nope", "json_data": "{}"}).to_string(),
            "mandelbox_id",
        ),
        (
            "numeric id",
            json!({"mandelbox_id": 7, "json_data": "{}"}).to_string(),
            "mandelbox_id",
        ),
        (
            "no settings",
            json!({"mandelbox_id": id}).to_string(),
            "json_data",
        ),
        (
            "settings not text",
            json!({"mandelbox_id": id, "json_data": {"a": 1}}).to_string(),
            "json_data",
        ),
        (
            "settings not an object",
            json!({"mandelbox_id": id, "json_data": "[1]"}).to_string(),
            "json_data",
        ),
        (
            "settings not JSON",
            json!({"mandelbox_id": id, "json_data": "dpi=96"}).to_string(),
            "json_data",
        ),
        (
            "zip bomb",
            json!({"mandelbox_id": id, "json_data": bomb}).to_string(),
            "json_data",
        ),
        (
            "settings too big",
            json!({"mandelbox_id": id, "json_data": big}).to_string(),
            "json_data",
        ),
        (
            "token not text",
            json!({"mandelbox_id": id, "json_data": "{}", "jwt_access_token": 1}).to_string(),
            "jwt_access_token",
        ),
    ] {
        let answer = r.put_raw(&alice, body).await;
        answer.assert_refused(400, "invalid_request", what);
        assert_eq!(answer.body["field"], field, "{what}");
    }
    // Random bytes: always a 4xx.
    use rand::{Rng as _, SeedableRng as _};
    let mut rng = rand::rngs::StdRng::seed_from_u64(4678);
    for _ in 0..64 {
        let len = rng.random_range(0..2048);
        let bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        let answer = r.put_raw(&alice, bytes).await;
        assert!((400..500).contains(&answer.status), "{}", answer.body);
    }

    let get = r
        .send(r.client.get(format!("{}/json_transport", r.base)))
        .await;
    get.assert_refused(405, "method_not_allowed", "GET /json_transport");
    let allow = get.headers["allow"].to_str().unwrap();
    assert!(allow.contains("PUT"), "{allow}");
    r.send(r.client.post(format!("{}/nope", r.base)))
        .await
        .assert_refused(404, "not_found", "POST /nope");

    let preflight = r
        .send(
            r.client
                .request(
                    reqwest::Method::OPTIONS,
                    format!("{}/json_transport", r.base),
                )
                .header("origin", "app://whist")
                .header("access-control-request-method", "PUT")
                .header(
                    "access-control-request-headers",
                    "authorization,content-type",
                ),
        )
        .await;
    assert_eq!(preflight.status, 204);
    assert_eq!(preflight.headers["access-control-allow-origin"], "*");
    assert!(
        preflight.headers["access-control-allow-methods"]
            .to_str()
            .unwrap()
            .contains("PUT")
    );
    assert!(
        preflight.headers["access-control-allow-headers"]
            .to_str()
            .unwrap()
            .contains("authorization")
    );

    assert_eq!(r.host.pairing.len(), 0, "nothing reached the pairing");
    assert_eq!(t.containers().await, 0);
    r.stop().await;
}

/// The fingerprint on the row, on `/healthz` and of `cert.pem` agree; a client pinning it
/// connects, one pinning another does not; the certificate names localhost and the host's
/// addresses; the key file is private.
#[tokio::test]
async fn the_published_fingerprint_pins_the_certificate() {
    use rustls::pki_types::pem::PemObject as _;
    let t = TestHost::new().await;
    let r = t.start(t.config()).await;

    let health = r.send(r.client.get(format!("{}/healthz", r.base))).await;
    assert_eq!(health.status, 200);
    assert_eq!(health.body["status"], "ok");
    assert_eq!(health.body["tls_fingerprint"], r.fingerprint.as_str());
    let cert = CertificateDer::from_pem_file(t.root.path().join("cert.pem")).unwrap();
    assert_eq!(Fingerprint::of(&cert).as_str(), r.fingerprint);
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(t.root.path().join("key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let other_pin = Fingerprint::of(b"another certificate").to_string();
    let refused = pinned_client(&other_pin)
        .get(format!("{}/healthz", r.base))
        .send()
        .await;
    assert!(refused.is_err(), "a wrong pin fails the handshake");

    // Verified the usual way, with the certificate as the only root: the names must match.
    let port = r.base.rsplit(':').next().unwrap().to_owned();
    let trusting = trusting_client(cert.clone());
    for name in ["localhost", "127.0.0.1"] {
        let response = trusting
            .get(format!("https://{name}:{port}/healthz"))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{name}: {e:?}"));
        assert_eq!(response.status(), 200);
    }
    // The public address is named too (connect to loopback, verify as 203.0.113.9).
    let resolving = reqwest::Client::builder()
        .tls_backend_preconfigured({
            let mut roots = rustls::RootCertStore::empty();
            roots.add(cert).unwrap();
            rustls::ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth()
        })
        .resolve(
            "wrong-name.example",
            format!("127.0.0.1:{port}").parse().unwrap(),
        )
        .build()
        .unwrap();
    assert!(
        resolving
            .get(format!("https://wrong-name.example:{port}/healthz"))
            .send()
            .await
            .is_err(),
        "a name the certificate does not carry is refused"
    );
    r.stop().await;
}

/// A spin-up that fails answers the waiting client at once with 503 (the original never
/// answered), instead of leaving it to time out.
#[tokio::test]
async fn a_failed_spin_up_answers_503() {
    use host_service::docker::{FakeRuntime, Op, RuntimeError};
    let t = TestHost::new().await;
    let fake = FakeRuntime::with_images(["whist/browsers/chrome:current-build"]);
    fake.fail_next(
        Op::Create,
        RuntimeError::Engine {
            op: Op::Create,
            target: "mandelbox".into(),
            status: 500,
            message: "no space left on device".into(),
        },
    );
    let r = t.start_with(t.config(), fake).await;
    let alice = t.jwks.token("alice").unwrap();
    let id = t.allocate("alice").await;
    let started = Instant::now();
    let answer = r.put(Some(&alice), &request(id, SETTINGS)).await;
    answer.assert_refused(503, "spin_up_failed", "failed spin-up");
    assert!(answer.headers.contains_key("retry-after"));
    assert!(
        !answer.body["error"]
            .as_str()
            .unwrap()
            .contains("no space left"),
        "Docker's words stay in the log"
    );
    assert!(started.elapsed() < Duration::from_secs(20), "at once");
    r.stop().await;
}

/// The issuer is down when the host starts: the host starts anyway and answers 503 until the
/// keys arrive, then 200. A rotated key (unknown `kid`) is fetched on first use; made-up `kid`s
/// do not turn into a JWKS fetch each.
#[tokio::test]
async fn the_host_starts_without_its_jwks_and_picks_up_rotated_keys() {
    let t = TestHost::new().await;
    t.jwks.set_available(false);
    let mut config = t.config();
    config.auth.as_mut().unwrap().min_refresh_interval = Duration::from_secs(2);
    let r = t.start(config).await;
    let alice = t.jwks.token("alice").unwrap();
    let id = t.allocate("alice").await;
    let body = request(id, SETTINGS);
    r.put(Some(&alice), &body)
        .await
        .assert_refused(503, "auth_unavailable", "no keys yet");

    t.jwks.set_available(true);
    // The host's own retries (1 s, 2 s, ...) fetch the keys.
    let answer = loop {
        let answer = r.put(Some(&alice), &body).await;
        if answer.status != 503 {
            break answer;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_ports_and_key(&answer, &t.port_range);

    // Rotation: a token signed with a key the host has never seen.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let fetches = t.jwks.fetches();
    let rotated = t.jwks.rotate("test-key-2").unwrap();
    let token = rotated.sign(&t.jwks.claims("alice")).unwrap();
    let again = r.put(Some(&token), &body).await;
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(again.body, answer.body);
    assert_eq!(t.jwks.fetches(), fetches + 1, "one fetch for the new kid");

    // Made-up kids within the refresh interval: refused without a fetch each.
    let claims = t.jwks.claims("alice");
    for n in 0..20 {
        let forged = rotated
            .sign_with_header(
                &json!({"alg": "RS256", "kid": format!("made-up-{n}")}),
                &claims,
            )
            .unwrap();
        r.put(Some(&forged), &body)
            .await
            .assert_refused(401, "unauthorized", "made-up kid");
    }
    assert!(
        t.jwks.fetches() <= fetches + 2,
        "{} fetches",
        t.jwks.fetches()
    );
    r.stop().await;
}

/// Local development without a database: no token needed, and the request itself starts the
/// mandelbox, as in the original.
#[tokio::test]
async fn localdev_needs_no_token_and_the_request_starts_its_mandelbox() {
    use clap::Parser as _;
    ensure_stub_image();
    let root = tempfile::tempdir().unwrap();
    let mut config =
        host_service::config::Args::try_parse_from(["whist-host-service", "--app-env", "localdev"])
            .unwrap()
            .validate()
            .unwrap();
    base_config(&mut config, root.path(), port_range());
    assert!(config.auth.is_none());
    let range = config.port_range.clone();
    let addr = config.json_transport_addr;
    let identity = identity();
    let instance = identity.instance_id.clone();
    let runtime = DockerRuntime::connect(DEFAULT_SOCKET).await.unwrap();
    let (task, host, signals) = launch(config, identity, runtime).await;
    // No row to read the fingerprint from: /healthz tells it, and the pin holds.
    let health: Value = client_with(
        rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates({
                use rustls::pki_types::pem::PemObject as _;
                let mut roots = rustls::RootCertStore::empty();
                roots
                    .add(CertificateDer::from_pem_file(root.path().join("cert.pem")).unwrap())
                    .unwrap();
                roots
            })
            .with_no_client_auth(),
    )
    .get(format!("https://127.0.0.1:{}/healthz", addr.port()))
    .send()
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let r = Running {
        task,
        host,
        signals,
        base: format!("https://{addr}"),
        client: pinned_client(health["tls_fingerprint"].as_str().unwrap()),
        fingerprint: health["tls_fingerprint"].as_str().unwrap().to_owned(),
    };
    let id = MandelboxId::random();
    // A header that is not even a bearer token is ignored without authentication.
    let answer = r
        .send(
            r.client
                .put(format!("{}/json_transport", r.base))
                .header("authorization", "whatever")
                .json(&request(id, SETTINGS)),
        )
        .await;
    assert_ports_and_key(&answer, &range);
    assert_eq!(
        std::fs::read_to_string(mappings_of(root.path(), id).join(mappings::CONFIG_JSON)).unwrap(),
        SETTINGS
    );
    assert_eq!(containers_of(&instance).await, 1);
    r.stop().await;
    remove_containers(&instance);
}

/// Connections that say nothing are closed: no TLS handshake within its timeout, no request
/// after the handshake, nothing more on a keep-alive connection after a request.
#[tokio::test]
async fn silent_connections_are_closed_within_the_timeouts() {
    use host_service::json_transport::server::{HEADER_READ_TIMEOUT, TLS_HANDSHAKE_TIMEOUT};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let t = TestHost::new().await;
    let r = t
        .start_with(
            t.config(),
            host_service::docker::FakeRuntime::with_images(["whist/browsers/chrome:current-build"]),
        )
        .await;
    let addr = r.base.trim_start_matches("https://").to_owned();
    let margin = Duration::from_secs(5);

    // How long until the server closes `stream` (EOF or a reset), reading whatever comes.
    async fn closed_after<S: tokio::io::AsyncRead + Unpin>(
        stream: &mut S,
        limit: Duration,
    ) -> Duration {
        let started = Instant::now();
        let mut buffer = [0u8; 4096];
        loop {
            match tokio::time::timeout(limit, stream.read(&mut buffer)).await {
                Ok(Ok(0) | Err(_)) => return started.elapsed(),
                Ok(Ok(_)) => continue,
                Err(_) => panic!("still open after {limit:?}"),
            }
        }
    }

    let tls_config = Arc::new(
        rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(
                PinnedVerifier::new(&r.fingerprint, provider()).unwrap(),
            ))
            .with_no_client_auth(),
    );
    let connect_tls = || async {
        let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
        tokio_rustls::TlsConnector::from(tls_config.clone())
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap()
    };
    let (mut silent_tcp, mut silent_tls, mut idle) = (
        tokio::net::TcpStream::connect(&addr).await.unwrap(),
        connect_tls().await,
        connect_tls().await,
    );
    idle.write_all(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 12];
    idle.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    let (no_handshake, no_request, no_second_request) = tokio::join!(
        closed_after(&mut silent_tcp, TLS_HANDSHAKE_TIMEOUT + margin),
        closed_after(&mut silent_tls, HEADER_READ_TIMEOUT + margin),
        closed_after(&mut idle, HEADER_READ_TIMEOUT + margin),
    );
    for (what, elapsed) in [
        ("no handshake", no_handshake),
        ("no request", no_request),
        ("idle keep-alive", no_second_request),
    ] {
        assert!(
            elapsed > Duration::from_secs(5),
            "{what}: closed by the timeout, not at once ({elapsed:?})"
        );
    }
    // The endpoint still serves.
    let health = r.send(r.client.get(format!("{}/healthz", r.base))).await;
    assert_eq!(health.status, 200);
    r.stop().await;
}

/// A TLS connection to `addr` from `local` (any 127/8 address is this machine's), pinning
/// `fingerprint`; `None` when the server refused it (closed before the handshake completed).
async fn tls_from(
    local: Ipv4Addr,
    addr: &str,
    fingerprint: &str,
) -> Option<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(
            PinnedVerifier::new(fingerprint, provider()).unwrap(),
        ))
        .with_no_client_auth();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(std::net::SocketAddr::new(local.into(), 0))
        .unwrap();
    let tcp = socket.connect(addr.parse().unwrap()).await.ok()?;
    let handshake = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp);
    tokio::time::timeout(WAIT, handshake).await.ok()?.ok()
}

/// Sends `head` (and nothing more) and reads the status line, waiting at most `limit`.
async fn status_after_head<S>(stream: &mut S, head: &str, limit: Duration) -> String
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    let mut buffer = [0u8; 4096];
    while !response.windows(2).any(|w| w == b"\r\n") {
        match tokio::time::timeout(limit, stream.read(&mut buffer)).await {
            Ok(Ok(n)) if n > 0 => response.extend_from_slice(&buffer[..n]),
            Ok(_) => break,
            Err(_) => panic!("no answer within {limit:?} to {head:?}"),
        }
    }
    let text = String::from_utf8_lossy(&response);
    text.lines().next().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn one_address_cannot_take_every_connection() {
    let t = TestHost::new().await;
    let mut config = t.config();
    config.json_transport_max_connections_per_address = 4;
    let r = t
        .start_with(
            config,
            host_service::docker::FakeRuntime::with_images(["whist/browsers/chrome:current-build"]),
        )
        .await;
    let addr = r.base.trim_start_matches("https://").to_owned();
    let stranger = Ipv4Addr::new(127, 0, 0, 66);
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..10 {
        match tls_from(stranger, &addr, &r.fingerprint).await {
            Some(tls) => held.push(tls),
            None => refused += 1,
        }
    }
    assert_eq!((held.len(), refused), (4, 6));
    // Everyone else is still served while the stranger holds its four.
    let health = r.send(r.client.get(format!("{}/healthz", r.base))).await;
    assert_eq!(health.status, 200);
    let mut other = tls_from(Ipv4Addr::new(127, 0, 0, 67), &addr, &r.fingerprint)
        .await
        .expect("another address is admitted");
    let status = status_after_head(
        &mut other,
        "GET /healthz HTTP/1.1\r\nhost: localhost\r\n\r\n",
        WAIT,
    )
    .await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    // A closed connection gives its place back.
    drop(held.pop());
    let (addr, fingerprint) = (addr.clone(), r.fingerprint.clone());
    until("the closed connection's place is free", move || {
        let (addr, fingerprint) = (addr.clone(), fingerprint.clone());
        async move { tls_from(stranger, &addr, &fingerprint).await.is_some() }
    })
    .await;
    r.stop().await;
}

#[tokio::test]
async fn strangers_get_their_answer_before_any_body_is_read_or_inflated() {
    let t = TestHost::new().await;
    let r = t
        .start_with(
            t.config(),
            host_service::docker::FakeRuntime::with_images(["whist/browsers/chrome:current-build"]),
        )
        .await;
    let addr = r.base.trim_start_matches("https://").to_owned();
    let local = Ipv4Addr::LOCALHOST;
    // A bad header token with a declared 4 MiB body, none of it sent: refused at once (the
    // host used to drain the 4 MiB first, waiting for bytes that never come).
    let mut tls = tls_from(local, &addr, &r.fingerprint).await.unwrap();
    let status = status_after_head(
        &mut tls,
        "PUT /json_transport HTTP/1.1\r\nhost: localhost\r\nauthorization: Bearer forged\r\n\
         content-type: application/json\r\ncontent-length: 4000000\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(status.starts_with("HTTP/1.1 401"), "{status}");
    // No header token and an oversize declared body: 413 at once, nothing drained.
    let mut tls = tls_from(local, &addr, &r.fingerprint).await.unwrap();
    let status = status_after_head(
        &mut tls,
        "PUT /json_transport HTTP/1.1\r\nhost: localhost\r\n\
         content-type: application/json\r\ncontent-length: 4000000\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(status.starts_with("HTTP/1.1 413"), "{status}");
    // A token in the body is checked before json_data is decoded: a compression bomb with a
    // forged token is a 401, not a 400 about json_data.
    let bomb = compressed(&format!("{{\"x\":\"{}\"}}", "a".repeat(4 << 20)));
    let body = json!({
        "mandelbox_id": MandelboxId::random(),
        "json_data": bomb,
        "jwt_access_token": "forged",
    });
    r.put(None, &body)
        .await
        .assert_refused(401, "unauthorized", "forged body token");
    // The same bomb from the real caller is judged on its json_data.
    let alice = t.jwks.token("alice").unwrap();
    let mut body = body;
    body["jwt_access_token"] = alice.into();
    r.put(None, &body)
        .await
        .assert_refused(400, "invalid_request", "bomb from a caller");
    r.stop().await;
}

// ---------------------------------------------------------------------------------------------
// The OpenAPI description and schemathesis

const METHODS: [&str; 7] = ["get", "put", "post", "delete", "patch", "options", "head"];

fn openapi() -> serde_yaml_ng::Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.yaml");
    serde_yaml_ng::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Every documented path and method answers with one of its documented status codes; every
/// other method on a documented path is 405 and other paths are 404.
#[tokio::test]
async fn the_openapi_description_matches_the_router() {
    let t = TestHost::new().await;
    let r = t.start(t.config()).await;
    let alice = t.jwks.token("alice").unwrap();
    let document = openapi();
    let paths = document["paths"].as_mapping().unwrap();
    assert!(!paths.is_empty());
    for (path, operations) in paths {
        let path = path.as_str().unwrap();
        for method in METHODS {
            let url = format!("{}{path}", r.base);
            let response = r
                .client
                .request(method.to_uppercase().parse().unwrap(), &url)
                .bearer_auth(&alice)
                .json(&request(MandelboxId::random(), "{}"))
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            // HEAD is GET without a body (HTTP semantics): documented with GET.
            let documented = operations
                .get(method)
                .or_else(|| (method == "head").then(|| operations.get("get")).flatten());
            match documented {
                Some(operation) => {
                    let codes: Vec<u16> = operation["responses"]
                        .as_mapping()
                        .unwrap()
                        .keys()
                        .map(|k| k.as_str().unwrap().parse().unwrap())
                        .collect();
                    assert!(
                        codes.contains(&status),
                        "{method} {path}: {status} is not among {codes:?}"
                    );
                }
                None => assert_eq!(status, 405, "{method} {path} is not documented"),
            }
        }
    }
    for path in [
        "/",
        "/json_transport/x",
        "/metrics",
        "/JSON_TRANSPORT",
        "/healthz/",
    ] {
        for method in METHODS {
            let status = r
                .client
                .request(
                    method.to_uppercase().parse().unwrap(),
                    format!("{}{path}", r.base),
                )
                .send()
                .await
                .unwrap()
                .status();
            assert_eq!(status, 404, "{method} {path}");
        }
    }
    r.stop().await;
}

fn schemathesis() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../.venv/bin/schemathesis"
    ))
}

/// How long schemathesis may fuzz; the test kills it a minute later.
const SCHEMATHESIS_MAX_SECONDS: u64 = 45;

/// schemathesis (the documented operations, every check but one, positive and negative data) against
/// the running endpoint: no 5xx, responses as documented, and a mandelbox whose request was
/// answered before the run answers the same afterwards, untouched by the run's requests for it.
#[tokio::test]
async fn schemathesis_finds_no_server_error_and_rejected_requests_change_nothing() {
    let binary = schemathesis();
    assert!(
        binary.exists(),
        "{} is missing: run `make setup` (devstack/python/requirements.txt)",
        binary.display()
    );
    let t = TestHost::new().await;
    let r = t.start(t.config()).await;
    let alice = t.jwks.token("alice").unwrap();
    let id = t.allocate("alice").await;
    let first = r.put(Some(&alice), &request(id, SETTINGS)).await;
    assert_ports_and_key(&first, &t.port_range);
    let slots = r.host.pairing.len();

    // The documented example names this mandelbox, so the fuzzer hits it too.
    let work = tempfile::tempdir().unwrap();
    let spec = work.path().join("openapi.yaml");
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.yaml"))
            .unwrap()
            .replace(OPENAPI_EXAMPLE_ID, &id.to_string());
    std::fs::write(&spec, text).unwrap();
    // 413 is how an oversize body is refused (schemathesis's list lacks it); a 5xx is never a
    // proper refusal (its list has them).
    std::fs::write(
        work.path().join("schemathesis.toml"),
        "[checks.negative_data_rejection]\n\
         expected-statuses = [\"400\", \"401\", \"403\", \"404\", \"405\", \"409\", \"413\", \"415\", \"422\"]\n",
    )
    .unwrap();
    let output = tokio::time::timeout(
        Duration::from_secs(SCHEMATHESIS_MAX_SECONDS + 60),
        tokio::process::Command::new(&binary)
            .current_dir(work.path())
            .env("SCHEMATHESIS_HOOKS", "")
            .args(["run", spec.to_str().unwrap()])
            .args(["--url", &r.base])
            .args(["--header", &format!("Authorization: Bearer {alice}")])
            // The certificate itself as the CA bundle: verified, names included.
            .args([
                "--tls-verify",
                t.root.path().join("cert.pem").to_str().unwrap(),
            ])
            .args(["--checks", "all"])
            // `json_data` must be the text of a JSON object (or its zlib+base64): JSON Schema
            // cannot say so, so schema-valid strings like "" are rightly refused with 400, which
            // this check would report. Every other check runs.
            .args(["--exclude-checks", "positive_data_acceptance"])
            .args(["--max-time", &SCHEMATHESIS_MAX_SECONDS.to_string()])
            .args(["--max-examples", "100"])
            .args(["--seed", "4678"])
            .args(["--request-timeout", "30"])
            .args(["--workers", "2"])
            .args(["--phases", "examples,coverage,fuzzing"])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("schemathesis finishes in time")
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "schemathesis failed ({}):\n{stdout}\n{stderr}",
        output.status
    );

    let again = r.put(Some(&alice), &request(id, SETTINGS)).await;
    assert_eq!(again.status, 200);
    assert_eq!(again.body, first.body, "the same answer after the run");
    assert_eq!(
        std::fs::read_to_string(t.mappings(id).join(mappings::CONFIG_JSON)).unwrap(),
        SETTINGS
    );
    assert_eq!(r.host.pairing.len(), slots, "no new pairing slot");
    assert_eq!(t.containers().await, 1);
    assert_eq!(
        t.db.mandelboxes_on_instance(&t.identity.instance_id)
            .await
            .unwrap()
            .len(),
        1
    );
    r.stop().await;
}
