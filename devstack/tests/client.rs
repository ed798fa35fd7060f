//! `devstack::client` against small local servers: the pinning verifier (the pinned certificate
//! passes, any other is refused, and the handshake signature is still checked), each step's
//! requests and answers, the assign retries, and a whole session.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use devstack::client::{
    AccessToken, Assignment, Client, ClientError, ClientOptions, SESSION_PORT, SessionOptions,
    Step, crypto_provider, fingerprint_of, pinned_tls_config,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

// ---------------------------------------------------------------------------------------------
// TLS servers

struct Identity {
    cert: CertificateDer<'static>,
    key_der: Vec<u8>,
}

impl Identity {
    fn generate() -> Self {
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
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

fn server_config(
    identity: &Identity,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> rustls::ServerConfig {
    rustls::ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(versions)
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![identity.cert.clone()], identity.key())
        .unwrap()
}

/// A server that presents `cert`'s certificate but signs the handshake with `key`'s key: only
/// a client that checks the signature notices.
fn impostor_config(cert: &Identity, key: &Identity) -> rustls::ServerConfig {
    let provider = crypto_provider();
    let signing_key = provider.key_provider.load_private_key(key.key()).unwrap();
    let certified = rustls::sign::CertifiedKey::new(vec![cert.cert.clone()], signing_key);
    rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(certified)))
}

/// Accepts TLS connections and answers each with "hello\n".
async fn hello_server(config: rustls::ServerConfig) -> SocketAddr {
    let listener = TcpListener::bind((LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(config));
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(tcp).await {
                    let _ = tls.write_all(b"hello\n").await;
                    let _ = tls.shutdown().await;
                }
            });
        }
    });
    addr
}

/// Handshakes with the pinned configuration and reads the server's line.
async fn pinned_hello(addr: SocketAddr, pin: &str) -> Result<String, std::io::Error> {
    let connector = TlsConnector::from(Arc::new(pinned_tls_config(pin).unwrap()));
    let tcp = TcpStream::connect(addr).await?;
    // The name is not what is checked: the pin is.
    let name = ServerName::try_from("not-the-certificates-name.example").unwrap();
    let mut tls = connector.connect(name, tcp).await?;
    let mut line = String::new();
    tls.read_to_string(&mut line).await?;
    Ok(line)
}

#[tokio::test]
async fn the_pinned_certificate_passes_over_tls_1_3_and_1_2() {
    let server = Identity::generate();
    for versions in [
        &[&rustls::version::TLS13][..],
        &[&rustls::version::TLS12][..],
    ] {
        let addr = hello_server(server_config(&server, versions)).await;
        assert_eq!(
            pinned_hello(addr, &server.fingerprint()).await.unwrap(),
            "hello\n"
        );
        // openssl's form of the same fingerprint pins the same certificate.
        let openssl = server
            .fingerprint()
            .to_uppercase()
            .as_bytes()
            .chunks(2)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect::<Vec<_>>()
            .join(":");
        assert_eq!(pinned_hello(addr, &openssl).await.unwrap(), "hello\n");
    }
}

#[tokio::test]
async fn another_certificate_is_refused() {
    let server = Identity::generate();
    let other = Identity::generate();
    for versions in [
        &[&rustls::version::TLS13][..],
        &[&rustls::version::TLS12][..],
    ] {
        let addr = hello_server(server_config(&server, versions)).await;
        let error = pinned_hello(addr, &other.fingerprint()).await.unwrap_err();
        let text = error.to_string();
        assert!(text.contains("is not the pinned"), "{text}");
        assert!(text.contains(&server.fingerprint()), "{text}");
    }
}

#[tokio::test]
async fn the_pinned_certificate_without_its_key_is_refused() {
    // The impostor presents the pinned certificate (its fingerprint matches) but cannot sign
    // with the certificate's key.
    let genuine = Identity::generate();
    let impostor_key = Identity::generate();
    let addr = hello_server(impostor_config(&genuine, &impostor_key)).await;
    let error = pinned_hello(addr, &genuine.fingerprint())
        .await
        .unwrap_err();
    let text = error.to_string();
    assert!(!text.contains("pinned"), "the pin matched: {text}");
    assert!(
        text.to_lowercase().contains("signature"),
        "refused for its signature: {text}"
    );
}

// ---------------------------------------------------------------------------------------------
// A json_transport stand-in: HTTP/1.1 over TLS, one request per connection

#[derive(Debug, Clone)]
struct Received {
    method: String,
    path: String,
    authorization: Option<String>,
    body: Value,
}

type Answer = Arc<dyn Fn(&Received) -> (u16, String) + Send + Sync>;

async fn json_transport_server(
    identity: &Identity,
    answer: Answer,
) -> (SocketAddr, Arc<Mutex<Vec<Received>>>) {
    let listener = TcpListener::bind((LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(server_config(
        identity,
        &[&rustls::version::TLS13, &rustls::version::TLS12],
    )));
    let received = Arc::new(Mutex::new(Vec::new()));
    let log = received.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, log, answer) = (acceptor.clone(), log.clone(), answer.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut tls = BufReader::new(tls);
                let mut head = Vec::new();
                loop {
                    let mut line = String::new();
                    if tls.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    if line == "\r\n" {
                        break;
                    }
                    head.push(line.trim_end().to_owned());
                }
                let header = |name: &str| {
                    head.iter().find_map(|h| {
                        let (n, v) = h.split_once(':')?;
                        n.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
                    })
                };
                let length: usize = header("content-length")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                let mut body = vec![0u8; length];
                tls.read_exact(&mut body).await.unwrap();
                let mut request_line = head[0].split(' ');
                let request = Received {
                    method: request_line.next().unwrap().to_owned(),
                    path: request_line.next().unwrap().to_owned(),
                    authorization: header("authorization"),
                    body: serde_json::from_slice(&body).unwrap_or(Value::Null),
                };
                let (status, text) = answer(&request);
                log.lock().unwrap().push(request);
                let response = format!(
                    "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{text}",
                    text.len()
                );
                let _ = tls.get_mut().write_all(response.as_bytes()).await;
                let _ = tls.get_mut().shutdown().await;
            });
        }
    });
    (addr, received)
}

fn options_for(json_transport_port: u16) -> ClientOptions {
    ClientOptions {
        json_transport_port,
        connect_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_secs(10),
        json_transport_timeout: Duration::from_secs(10),
        first_line_timeout: Duration::from_secs(5),
        ..ClientOptions::default()
    }
}

fn assignment(fingerprint: &str) -> Assignment {
    Assignment {
        ip: LOCALHOST,
        mandelbox_id: uuid::Uuid::new_v4(),
        tls_fingerprint: Some(fingerprint.to_owned()),
    }
}

const PORTS: &str = r#"{"result": {"port_32261": 40001, "port_32262": 40002, "port_32263": 40003, "port_32273": 40004, "private_key": "00112233445566778899aabbccddeeff", "aes_key": "00112233445566778899aabbccddeeff"}}"#;

#[tokio::test]
async fn json_transport_puts_the_settings_with_the_token_over_the_pinned_connection() {
    let host = Identity::generate();
    let (addr, received) =
        json_transport_server(&host, Arc::new(|_: &Received| (200, PORTS.to_owned()))).await;
    let client = Client::new(options_for(addr.port())).unwrap();
    let token = AccessToken::new("header.payload.signature").unwrap();
    let a = assignment(&host.fingerprint());
    let answer = client
        .json_transport(&a, &token, r#"{"dark_mode":true}"#)
        .await
        .unwrap();
    assert_eq!(answer.port(SESSION_PORT), Some(40004));
    assert_eq!(answer.ports.len(), 4);
    let requests = received.lock().unwrap().clone();
    assert_eq!(requests.len(), 1);
    let r = &requests[0];
    assert_eq!(
        (r.method.as_str(), r.path.as_str()),
        ("PUT", "/json_transport")
    );
    assert_eq!(
        r.authorization.as_deref(),
        Some("Bearer header.payload.signature")
    );
    assert_eq!(r.body["mandelbox_id"], a.mandelbox_id.to_string());
    assert_eq!(r.body["json_data"], r#"{"dark_mode":true}"#);
}

#[tokio::test]
async fn json_transport_refuses_a_host_whose_certificate_is_not_the_assigned_one() {
    let host = Identity::generate();
    let (addr, received) =
        json_transport_server(&host, Arc::new(|_: &Received| (200, PORTS.to_owned()))).await;
    let client = Client::new(options_for(addr.port())).unwrap();
    let token = AccessToken::new("secret-token").unwrap();
    let error = client
        .json_transport(
            &assignment(&Identity::generate().fingerprint()),
            &token,
            "{}",
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            ClientError::Request {
                step: Step::JsonTransport,
                ..
            }
        ),
        "{error}"
    );
    assert!(error.to_string().contains("is not the pinned"), "{error}");
    assert!(!error.to_string().contains("secret-token"));
    // Nothing was sent: the token never left.
    assert!(received.lock().unwrap().is_empty());
    // And without a fingerprint there is nothing to pin: no request either.
    let mut unpinned = assignment("");
    unpinned.tls_fingerprint = None;
    let error = client
        .json_transport(&unpinned, &token, "{}")
        .await
        .unwrap_err();
    assert!(
        matches!(error, ClientError::NoFingerprint { .. }),
        "{error}"
    );
}

#[tokio::test]
async fn json_transport_errors_carry_the_hosts_code() {
    let host = Identity::generate();
    let (addr, _) = json_transport_server(
        &host,
        Arc::new(|_: &Received| {
            (
                403,
                r#"{"error": "the token's user does not own the mandelbox", "code": "forbidden"}"#
                    .to_owned(),
            )
        }),
    )
    .await;
    let client = Client::new(options_for(addr.port())).unwrap();
    let error = client
        .json_transport(
            &assignment(&host.fingerprint()),
            &AccessToken::new("t").unwrap(),
            "{}",
        )
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some("forbidden"));
    assert_eq!(error.step(), Some(Step::JsonTransport));
    assert!(
        error
            .to_string()
            .contains("403 forbidden: the token's user"),
        "{error}"
    );
}

// ---------------------------------------------------------------------------------------------
// Control API and scaling service stand-ins

/// An assign request as the fake scaling service saw it: its `Authorization` and its body.
type AssignSeen = (Option<String>, Value);

#[derive(Clone)]
struct Fake {
    /// Assign answers, in order; the last repeats.
    assign_answers: Arc<Mutex<Vec<(u16, Value)>>>,
    assign_requests: Arc<Mutex<Vec<AssignSeen>>>,
    token_users: Arc<Mutex<Vec<String>>>,
}

async fn fake_services(assign_answers: Vec<(u16, Value)>) -> (String, Fake) {
    let fake = Fake {
        assign_answers: Arc::new(Mutex::new(assign_answers)),
        assign_requests: Arc::default(),
        token_users: Arc::default(),
    };
    async fn token(State(fake): State<Fake>, Json(body): Json<Value>) -> impl IntoResponse {
        let user = body["user_id"].as_str().unwrap_or_default().to_owned();
        fake.token_users.lock().unwrap().push(user.clone());
        (
            StatusCode::CREATED,
            Json(json!({"access_token": format!("jwt-for-{user}"), "token_type": "Bearer"})),
        )
    }
    async fn assign(
        State(fake): State<Fake>,
        headers: HeaderMap,
        Json(body): Json<Value>,
    ) -> impl IntoResponse {
        let auth = headers
            .get("authorization")
            .map(|v| v.to_str().unwrap().to_owned());
        fake.assign_requests.lock().unwrap().push((auth, body));
        let mut answers = fake.assign_answers.lock().unwrap();
        let (status, body) = if answers.len() > 1 {
            answers.remove(0)
        } else {
            answers[0].clone()
        };
        (StatusCode::from_u16(status).unwrap(), Json(body))
    }
    let app = axum::Router::new()
        .route("/token", post(token))
        .route("/mandelbox/assign", post(assign))
        .with_state(fake.clone());
    let listener = TcpListener::bind((LOCALHOST, 0)).await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, fake)
}

fn no_instance() -> (u16, Value) {
    (503, json!({"error": "NO_INSTANCE_AVAILABLE"}))
}

fn assigned(fingerprint: &str) -> (u16, Value) {
    (
        200,
        json!({"ip": "127.0.0.1", "mandelbox_id": "6f1c2b0e-8a43-4c4e-9d2f-1f0a7c1e9b11", "tls_fingerprint": fingerprint}),
    )
}

fn client_of(url: &str, json_transport_port: u16) -> Client {
    Client::new(ClientOptions {
        scaling_url: url.to_owned(),
        control_url: Some(format!("{url}/")),
        ..options_for(json_transport_port)
    })
    .unwrap()
}

#[tokio::test]
async fn token_then_assign_send_what_the_services_expect() {
    let fp = "ab".repeat(32);
    let (url, fake) = fake_services(vec![assigned(&fp)]).await;
    let client = client_of(&url, 1);
    let token = client.token("local-user-1").await.unwrap();
    assert_eq!(token.expose(), "jwt-for-local-user-1");
    assert_eq!(*fake.token_users.lock().unwrap(), ["local-user-1"]);
    let request = client.assign_request(Some("u@example.com".to_owned()));
    let a = client.assign(&token, &request).await.unwrap();
    assert_eq!(a.ip, LOCALHOST);
    assert_eq!(a.tls_fingerprint.as_deref(), Some(fp.as_str()));
    let (auth, body) = fake.assign_requests.lock().unwrap()[0].clone();
    assert_eq!(auth.as_deref(), Some("Bearer jwt-for-local-user-1"));
    assert_eq!(
        body,
        json!({"regions": ["us-east-1"], "client_commit_hash": "local_dev",
               "session_id": request.session_id, "user_email": "u@example.com"})
    );
}

#[tokio::test]
async fn no_instance_available_is_retried_until_capacity_appears() {
    let fp = "cd".repeat(32);
    let (url, fake) = fake_services(vec![no_instance(), no_instance(), assigned(&fp)]).await;
    let client = client_of(&url, 1);
    let token = AccessToken::new("user:u").unwrap();
    let request = client.assign_request(None);
    let (a, attempts) = client
        .assign_waiting(&token, &request, Some(Duration::from_secs(30)))
        .await
        .unwrap();
    assert_eq!(
        (a.tls_fingerprint.as_deref(), attempts),
        (Some(fp.as_str()), 3)
    );
    // Every attempt is the same session.
    let requests = fake.assign_requests.lock().unwrap().clone();
    assert!(
        requests
            .iter()
            .all(|(_, b)| b["session_id"].as_str() == request.session_id.as_deref())
    );
}

#[tokio::test]
async fn without_a_deadline_or_past_it_no_instance_available_ends_the_run() {
    let (url, fake) = fake_services(vec![no_instance()]).await;
    let client = client_of(&url, 1);
    let token = AccessToken::new("user:u").unwrap();
    let request = client.assign_request(None);
    let error = client
        .assign_waiting(&token, &request, None)
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some("NO_INSTANCE_AVAILABLE"));
    assert_eq!(fake.assign_requests.lock().unwrap().len(), 1);
    let error = client
        .assign_waiting(&token, &request, Some(Duration::from_millis(600)))
        .await
        .unwrap_err();
    assert!(
        matches!(error, ClientError::NoCapacity { attempts, .. } if attempts >= 2),
        "{error}"
    );
    assert!(
        error
            .to_string()
            .contains("NO_INSTANCE_AVAILABLE after waiting")
    );
}

#[tokio::test]
async fn other_assign_errors_are_not_retried() {
    let (url, fake) = fake_services(vec![(503, json!({"error": "USER_ALREADY_ACTIVE"}))]).await;
    let client = client_of(&url, 1);
    let error = client
        .assign_waiting(
            &AccessToken::new("user:u").unwrap(),
            &client.assign_request(None),
            Some(Duration::from_secs(30)),
        )
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some("USER_ALREADY_ACTIVE"));
    assert_eq!(fake.assign_requests.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn an_unreachable_service_is_a_clear_error_within_the_timeout() {
    // A port that was free a moment ago: connection refused.
    let port = TcpListener::bind((LOCALHOST, 0))
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let client = client_of(&url, 1);
    let error = client.token("u").await.unwrap_err();
    assert!(
        matches!(
            error,
            ClientError::Request {
                step: Step::Token,
                ..
            }
        ),
        "{error}"
    );
    assert!(error.to_string().contains(&url), "{error}");
    let client = Client::new(ClientOptions::default()).unwrap();
    assert!(matches!(
        client.token("u").await.unwrap_err(),
        ClientError::NoControlUrl
    ));
}

// ---------------------------------------------------------------------------------------------
// The mandelbox's port, and a whole session

/// Answers each connection with one line, then reports when the client left.
async fn mandelbox_stub(line: &'static str) -> (u16, tokio::sync::mpsc::Receiver<Duration>) {
    let listener = TcpListener::bind((LOCALHOST, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (left_tx, left_rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let left = left_tx.clone();
            tokio::spawn(async move {
                let since = tokio::time::Instant::now();
                tcp.write_all(line.as_bytes()).await.unwrap();
                let mut buf = [0u8; 64];
                while tcp.read(&mut buf).await.unwrap_or(0) > 0 {}
                let _ = left.send(since.elapsed()).await;
            });
        }
    });
    (port, left_rx)
}

#[tokio::test]
async fn connect_reads_the_first_line_holds_and_leaves() {
    let (port, mut left) = mandelbox_stub("{\"mandelbox\":\"stub\",\"port\":32273}\n").await;
    let client = Client::new(options_for(1)).unwrap();
    let mut connection = client.connect(LOCALHOST, port).await.unwrap();
    assert_eq!(
        connection.first_line,
        r#"{"mandelbox":"stub","port":32273}"#
    );
    assert_eq!(connection.first_line_json().unwrap()["mandelbox"], "stub");
    assert!(connection.time_to_first_byte >= connection.connect_time);
    connection.hold(Duration::from_millis(300)).await.unwrap();
    connection.close().await;
    let stayed = tokio::time::timeout(Duration::from_secs(5), left.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(stayed >= Duration::from_millis(300), "{stayed:?}");
}

#[tokio::test]
async fn a_mandelbox_that_hangs_up_during_the_hold_fails_the_hold() {
    let listener = TcpListener::bind((LOCALHOST, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        tcp.write_all(b"{}\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(tcp);
    });
    let client = Client::new(options_for(1)).unwrap();
    let mut connection = client.connect(LOCALHOST, port).await.unwrap();
    let error = connection.hold(Duration::from_secs(10)).await.unwrap_err();
    assert!(
        matches!(
            error,
            ClientError::ClosedByPeer {
                step: Step::Hold,
                ..
            }
        ),
        "{error}"
    );
}

#[tokio::test]
async fn a_silent_port_times_out() {
    let listener = TcpListener::bind((LOCALHOST, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let client = Client::new(ClientOptions {
        first_line_timeout: Duration::from_millis(200),
        ..options_for(1)
    })
    .unwrap();
    let error = client.connect(LOCALHOST, port).await.unwrap_err();
    assert!(
        matches!(
            error,
            ClientError::Timeout {
                step: Step::Connect,
                ..
            }
        ),
        "{error}"
    );
    drop(listener);
}

#[tokio::test]
async fn a_whole_session_is_timed_step_by_step() {
    let (stub_port, mut left) = mandelbox_stub("{\"mandelbox\":\"stub\",\"port\":32273}\n").await;
    let host = Identity::generate();
    let ports = format!(
        r#"{{"result": {{"port_32262": 40002, "port_32273": {stub_port}, "private_key": "00"}}}}"#
    );
    let (host_addr, received) =
        json_transport_server(&host, Arc::new(move |_: &Received| (200, ports.clone()))).await;
    let (url, fake) = fake_services(vec![no_instance(), assigned(&host.fingerprint())]).await;
    let client = client_of(&url, host_addr.port());
    let session = SessionOptions {
        hold: Some(Duration::from_millis(200)),
        wait_for_capacity: Some(Duration::from_secs(30)),
        ..SessionOptions::new("local-user-e2e")
    };
    let report = client.run_session(&session).await.unwrap();
    assert_eq!(report.assign_attempts, 2);
    assert_eq!(report.ports.get(&SESSION_PORT), Some(&stub_port));
    assert!(report.first_line.contains("stub"));
    let t = &report.timings;
    for step in [
        t.token,
        t.assign,
        t.json_transport,
        t.connect,
        t.first_byte,
        t.hold,
    ] {
        assert!(step.is_some(), "{t:?}");
    }
    assert!(t.total >= t.hold.unwrap() + t.assign.unwrap());
    // The json_transport request carried the token devstack issued and the session's settings.
    let r = received.lock().unwrap()[0].clone();
    assert_eq!(
        r.authorization.as_deref(),
        Some("Bearer jwt-for-local-user-e2e")
    );
    assert_eq!(r.body["json_data"], session.json_data.as_str());
    assert_eq!(*fake.token_users.lock().unwrap(), ["local-user-e2e"]);
    // It left.
    tokio::time::timeout(Duration::from_secs(5), left.recv())
        .await
        .unwrap()
        .unwrap();
    // Reports never show the token; the JSON form has every step.
    let json = report.to_json();
    assert!(!json.to_string().contains("jwt-for"));
    assert!(!report.render().contains("jwt-for"));
    assert!(!format!("{report:?}").contains("jwt-for"));
    assert_eq!(json["ok"], true);
    assert_eq!(json["ports"]["port_32273"], stub_port);
    assert_eq!(json["first_line"]["mandelbox"], "stub");
    assert!(json["timings_ms"]["json_transport"].as_f64().unwrap() > 0.0);
    for step in [
        "token",
        "assign",
        "json_transport",
        "connect",
        "hold",
        "total",
    ] {
        assert!(report.render().contains(step), "{}", report.render());
    }
}

#[tokio::test]
async fn a_failed_session_names_its_step_and_keeps_the_timings_so_far() {
    let (url, _) = fake_services(vec![(
        401,
        json!({"error": "UNAUTHORIZED", "message": "invalid token: bad signature"}),
    )])
    .await;
    let client = client_of(&url, 1);
    let session = SessionOptions {
        token: Some(AccessToken::new("given-secret").unwrap()),
        ..SessionOptions::new("u")
    };
    let failure = client.run_session(&session).await.unwrap_err();
    assert_eq!(failure.step, Step::Assign);
    assert_eq!(failure.error.code(), Some("UNAUTHORIZED"));
    assert!(failure.timings.token.is_none() && failure.timings.assign.is_some());
    assert!(failure.session_id.is_some());
    let json = failure.to_json();
    assert_eq!(
        (json["ok"].as_bool(), json["step"].as_str()),
        (Some(false), Some("assign"))
    );
    assert!(!json.to_string().contains("given-secret"));
    assert!(!format!("{failure:?}").contains("given-secret"));
}
