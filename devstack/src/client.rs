//! A client simulator: what Whist's client app does to start a session, against the local
//! system (`make run`), step by step and timed. The binary `whist-client` drives it; tests and
//! benchmarks can call each step on their own.
//!
//! 1. [`Client::token`]: an access token from devstack's fake Auth0
//!    (`POST {control}/token {"user_id"}` → `201 {"access_token"}`).
//! 2. [`Client::assign`] / [`Client::assign_waiting`]: `POST {scaling}/mandelbox/assign` with the
//!    bearer token → `{ip, mandelbox_id, tls_fingerprint}`; `assign_waiting` retries
//!    `503 NO_INSTANCE_AVAILABLE` with backoff until a deadline (hosts may still be booting).
//! 3. [`Client::json_transport`]: `PUT https://{ip}:4678/json_transport` with the token and the
//!    settings, over TLS pinned to the assignment's fingerprint ([`PinnedVerifier`]) →
//!    the mandelbox's host ports.
//! 4. [`Client::connect`]: TCP to the host port of 32273 (the protocol's base port); the
//!    mandelbox answers with one line; [`Connection::hold`] keeps the session open and
//!    [`Connection::close`] ends it (the mandelbox exits when that client leaves).
//!
//! [`Client::run_session`] does all four and reports each step's duration. Every network step
//! is bounded by a timeout. The access token is never printed: [`AccessToken`]'s `Debug` hides
//! it, and errors carry status codes and the servers' error codes, never request headers.

use edge::error_chain;
use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// The scaling service's address in local development.
pub const DEFAULT_SCALING_URL: &str = "http://127.0.0.1:7730";
/// The commit hash that means "whatever the hosts run" (accepted in local development only).
pub const LOCAL_DEV_COMMIT: &str = "local_dev";
/// The host's json_transport port.
pub const JSON_TRANSPORT_PORT: u16 = 4678;
/// The mandelbox's base TCP port: its client leaving ends the session.
pub const SESSION_PORT: u16 = 32273;

/// Connecting to any of the services: they are local, so a few seconds means down.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A whole token or assign request (the assign is a few database round trips).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// A whole json_transport request: the host answers once the mandelbox is up, which it bounds
/// by 90 s by default (docs/json-transport.md, "What happens"); 30 s of margin.
pub const JSON_TRANSPORT_TIMEOUT: Duration = Duration::from_secs(120);
/// From the TCP connection to the mandelbox's first line.
pub const FIRST_LINE_TIMEOUT: Duration = Duration::from_secs(10);
/// The mandelbox's first line is a short JSON object (plus the settings it echoes).
pub const MAX_FIRST_LINE_BYTES: u64 = 1024 * 1024;
/// Assign retries while no host has room: a booting host registers within seconds to minutes,
/// so start fast and settle at a poll every 5 s; ±20 % jitter keeps simulated clients apart.
pub const ASSIGN_RETRY_BASE: Duration = Duration::from_millis(250);
pub const ASSIGN_RETRY_CAP: Duration = Duration::from_secs(5);
pub const ASSIGN_RETRY_JITTER: f64 = 0.2;
/// The longest error body quoted in an error message.
const MAX_QUOTED_BODY: usize = 300;
/// The longest access token accepted (Auth0's are about 1 KiB; the host refuses over 16 KiB).
const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// A step of a session, as reports and errors name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    Token,
    Assign,
    JsonTransport,
    Connect,
    Hold,
}

impl Step {
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Token => "token",
            Step::Assign => "assign",
            Step::JsonTransport => "json_transport",
            Step::Connect => "connect",
            Step::Hold => "hold",
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a step failed. Never carries the access token.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid {what}: {reason}")]
    Invalid { what: &'static str, reason: String },
    #[error(
        "token: no devstack control URL to get a token from: set WHIST_DEVSTACK_CONTROL_URL \
         (source .devstack/env) or pass --control-url, or pass --token"
    )]
    NoControlUrl,
    /// The request did not get an answer: refused connection, timeout, TLS failure (a
    /// certificate that does not match the pin is one).
    #[error("{step}: {url}: {detail}")]
    Request {
        step: Step,
        url: String,
        detail: String,
    },
    /// The server answered with an error status.
    #[error("{step}: {url} answered {status}{}{}", code.as_deref().map(|c| format!(" {c}")).unwrap_or_default(), message.as_deref().map(|m| format!(": {m}")).unwrap_or_default())]
    Refused {
        step: Step,
        url: String,
        status: u16,
        /// The server's error code (`NO_INSTANCE_AVAILABLE`, `unauthorized`, ...).
        code: Option<String>,
        message: Option<String>,
    },
    /// A success status with a body that is not what the contract says.
    #[error("{step}: {url}: unexpected answer: {detail}")]
    BadAnswer {
        step: Step,
        url: String,
        detail: String,
    },
    #[error(
        "assign: still NO_INSTANCE_AVAILABLE after waiting {} ({attempts} attempts)",
        format_duration(*waited)
    )]
    NoCapacity { waited: Duration, attempts: u32 },
    #[error(
        "json_transport: the assignment of mandelbox {mandelbox_id} has no tls_fingerprint to \
         pin (a scaling service older than this client?)"
    )]
    NoFingerprint { mandelbox_id: uuid::Uuid },
    #[error("{step}: {addr}: {detail}")]
    Io {
        step: Step,
        addr: SocketAddr,
        detail: String,
    },
    #[error("{step}: {addr}: no answer within {}", format_duration(*after))]
    Timeout {
        step: Step,
        addr: SocketAddr,
        after: Duration,
    },
    #[error("{step}: {addr}: the mandelbox closed the connection after {}", format_duration(*after))]
    ClosedByPeer {
        step: Step,
        addr: SocketAddr,
        after: Duration,
    },
    #[error("TLS setup: {0}")]
    Tls(String),
}

impl ClientError {
    /// The step that failed, where the error names one.
    pub fn step(&self) -> Option<Step> {
        match self {
            ClientError::Request { step, .. }
            | ClientError::Refused { step, .. }
            | ClientError::BadAnswer { step, .. }
            | ClientError::Io { step, .. }
            | ClientError::Timeout { step, .. }
            | ClientError::ClosedByPeer { step, .. } => Some(*step),
            ClientError::NoControlUrl => Some(Step::Token),
            ClientError::NoCapacity { .. } => Some(Step::Assign),
            ClientError::NoFingerprint { .. } => Some(Step::JsonTransport),
            ClientError::Invalid { .. } | ClientError::Tls(_) => None,
        }
    }

    /// The server's error code of a refusal (`NO_INSTANCE_AVAILABLE`, `unauthorized`, ...).
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Refused { code, .. } => code.as_deref(),
            ClientError::NoCapacity { .. } => Some("NO_INSTANCE_AVAILABLE"),
            _ => None,
        }
    }
}

/// A bearer token. `Debug` never shows it and it has no `Display`: only
/// [`AccessToken::expose`] gives the text, for the `Authorization` header.
#[derive(Clone, PartialEq, Eq)]
pub struct AccessToken(String);

impl AccessToken {
    /// Checks what a header value needs: 1 to 16 KiB of visible ASCII.
    pub fn new(token: impl Into<String>) -> Result<Self, ClientError> {
        let token = token.into().trim().to_owned();
        if token.is_empty() || token.len() > MAX_TOKEN_BYTES {
            return Err(ClientError::Invalid {
                what: "access token",
                reason: format!("1 to {MAX_TOKEN_BYTES} bytes expected"),
            });
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ClientError::Invalid {
                what: "access token",
                reason: "visible ASCII characters only".to_owned(),
            });
        }
        Ok(Self(token))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AccessToken(<redacted>)")
    }
}

/// `POST /mandelbox/assign`'s body and `200` answer: the scaling service's own types.
pub use edge::assign::{AssignRequest, Assignment, new_session_id};

/// `PUT /json_transport`'s `200` body: the host's own type.
pub use edge::json_transport::JsonTransportAnswer;

pub use edge::pin::{PinnedVerifier, crypto_provider, fingerprint_of};

/// A fingerprint as 64 lowercase hex digits; also accepts openssl's form
/// (`AB:CD:...`, upper case with colons).
pub fn normalize_fingerprint(fingerprint: &str) -> Result<String, ClientError> {
    edge::pin::normalize_fingerprint(fingerprint).map_err(invalid_fingerprint)
}

fn invalid_fingerprint(error: edge::pin::InvalidFingerprint) -> ClientError {
    ClientError::Invalid {
        what: "TLS fingerprint",
        reason: error.to_string(),
    }
}

/// A client configuration that trusts only the certificate with `fingerprint` (TLS 1.2 and
/// 1.3, ALPN `http/1.1`: the host's endpoint speaks HTTP/1.1 only).
pub fn pinned_tls_config(fingerprint: &str) -> Result<rustls::ClientConfig, ClientError> {
    edge::pin::pinned_client_config(fingerprint).map_err(|error| match error {
        edge::pin::PinError::Fingerprint(error) => invalid_fingerprint(error),
        edge::pin::PinError::Tls(reason) => ClientError::Tls(reason),
    })
}

/// What the client talks to, and how long it waits.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// The scaling service, e.g. [`DEFAULT_SCALING_URL`].
    pub scaling_url: String,
    /// devstack's control API (`WHIST_DEVSTACK_CONTROL_URL`); needed for [`Client::token`].
    pub control_url: Option<String>,
    /// Regions by proximity, closest first.
    pub regions: Vec<String>,
    /// The client's commit hash ([`LOCAL_DEV_COMMIT`] locally).
    pub commit: String,
    /// The hosts' json_transport port ([`JSON_TRANSPORT_PORT`]; tests change it).
    pub json_transport_port: u16,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub json_transport_timeout: Duration,
    pub first_line_timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            scaling_url: DEFAULT_SCALING_URL.to_owned(),
            control_url: None,
            regions: vec!["us-east-1".to_owned()],
            commit: LOCAL_DEV_COMMIT.to_owned(),
            json_transport_port: JSON_TRANSPORT_PORT,
            connect_timeout: CONNECT_TIMEOUT,
            request_timeout: REQUEST_TIMEOUT,
            json_transport_timeout: JSON_TRANSPORT_TIMEOUT,
            first_line_timeout: FIRST_LINE_TIMEOUT,
        }
    }
}

/// One session's parameters for [`Client::run_session`].
#[derive(Debug, Clone)]
pub struct SessionOptions {
    pub user_id: String,
    /// Use this token instead of asking devstack for one.
    pub token: Option<AccessToken>,
    pub user_email: Option<String>,
    /// The settings sent as `json_data` (the text of a JSON object).
    pub json_data: String,
    /// Keep the connection to the mandelbox open this long before leaving.
    pub hold: Option<Duration>,
    /// Retry `NO_INSTANCE_AVAILABLE` until this much time has passed.
    pub wait_for_capacity: Option<Duration>,
}

impl SessionOptions {
    pub fn new(user_id: impl Into<String>) -> Self {
        Self {
            user_id: user_id.into(),
            token: None,
            user_email: None,
            json_data: default_json_data(),
            hold: None,
            wait_for_capacity: None,
        }
    }
}

/// A random user id, `local-user-` and 12 hex digits.
pub fn random_user_id() -> String {
    let n: u64 = rand::random();
    format!("local-user-{:012x}", n & 0xffff_ffff_ffff)
}

/// Settings like those the client app sends (the keys the mandelbox's scripts read,
/// `reference/host-service.md` §2.3).
pub fn default_json_data() -> String {
    json!({
        "dark_mode": false,
        "desired_timezone": "Etc/UTC",
        "client_dpi": 192,
        "restore_last_session": false,
        "initial_key_repeat": 300,
        "key_repeat": 30,
        "initial_url": "https://www.whist.com",
        "user_agent": concat!("whist-client/", env!("CARGO_PKG_VERSION")),
        "local_client": true,
    })
    .to_string()
}

/// An open connection to the mandelbox's session port.
#[derive(Debug)]
pub struct Connection {
    pub addr: SocketAddr,
    /// The mandelbox's first line, without the line end.
    pub first_line: String,
    /// The TCP handshake.
    pub connect_time: Duration,
    /// From the start of the connection to the first byte of the mandelbox's answer.
    pub time_to_first_byte: Duration,
    /// From the start of the connection to the end of the first line.
    pub first_line_time: Duration,
    stream: BufReader<TcpStream>,
}

impl Connection {
    /// The first line as JSON, when it is.
    pub fn first_line_json(&self) -> Option<Value> {
        serde_json::from_str(&self.first_line).ok()
    }

    /// Keeps the connection open for `duration`, discarding what the mandelbox sends; fails if
    /// the mandelbox closes it first.
    pub async fn hold(&mut self, duration: Duration) -> Result<(), ClientError> {
        let started = Instant::now();
        let addr = self.addr;
        let drain = async {
            let mut buf = [0u8; 4096];
            loop {
                match self.stream.read(&mut buf).await {
                    Ok(0) => {
                        return ClientError::ClosedByPeer {
                            step: Step::Hold,
                            addr,
                            after: started.elapsed(),
                        };
                    }
                    Ok(_) => {}
                    Err(e) => {
                        return ClientError::Io {
                            step: Step::Hold,
                            addr,
                            detail: e.to_string(),
                        };
                    }
                }
            }
        };
        match tokio::time::timeout(duration, drain).await {
            Ok(error) => Err(error),
            Err(_) => Ok(()),
        }
    }

    /// Leaves: shuts the connection down (the mandelbox ends the session).
    pub async fn close(mut self) {
        // The mandelbox may be gone already; leaving is all that is asked.
        let _ = self.stream.get_mut().shutdown().await;
    }
}

/// Durations of a session's steps (`None`: not reached, or skipped).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Timings {
    pub token: Option<Duration>,
    /// All attempts, backoff included.
    pub assign: Option<Duration>,
    pub json_transport: Option<Duration>,
    /// The TCP handshake with the mandelbox.
    pub connect: Option<Duration>,
    /// From the start of the connection to the mandelbox's first byte.
    pub first_byte: Option<Duration>,
    pub hold: Option<Duration>,
    pub total: Duration,
}

impl Timings {
    fn to_json(&self) -> Value {
        let ms = |d: Option<Duration>| d.map(|d| json!(millis(d)));
        json!({
            "token": ms(self.token),
            "assign": ms(self.assign),
            "json_transport": ms(self.json_transport),
            "connect": ms(self.connect),
            "first_byte": ms(self.first_byte),
            "hold": ms(self.hold),
            "total": millis(self.total),
        })
    }
}

fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// A completed session.
#[derive(Debug, Clone)]
pub struct SessionReport {
    pub user_id: String,
    pub session_id: String,
    pub assignment: Assignment,
    pub assign_attempts: u32,
    /// Host port by mandelbox port.
    pub ports: BTreeMap<u16, u16>,
    pub first_line: String,
    pub timings: Timings,
}

impl SessionReport {
    /// One JSON object (durations in milliseconds), for scripts and benchmarks.
    pub fn to_json(&self) -> Value {
        json!({
            "ok": true,
            "user_id": self.user_id,
            "session_id": self.session_id,
            "ip": self.assignment.ip,
            "mandelbox_id": self.assignment.mandelbox_id,
            "tls_fingerprint": self.assignment.tls_fingerprint,
            "assign_attempts": self.assign_attempts,
            "ports": self.ports.iter().map(|(k, v)| (format!("port_{k}"), json!(v))).collect::<serde_json::Map<_, _>>(),
            "first_line": self.first_line_value(),
            "timings_ms": self.timings.to_json(),
        })
    }

    fn first_line_value(&self) -> Value {
        serde_json::from_str(&self.first_line).unwrap_or_else(|_| json!(self.first_line))
    }

    /// Human-readable lines: one per step with its duration.
    pub fn render(&self) -> String {
        let t = &self.timings;
        let mut out = String::new();
        let mut line = |step: &str, d: Option<Duration>, what: String| {
            let d = d.map(format_duration).unwrap_or_else(|| "-".to_owned());
            out.push_str(format!("  {step:<15}{d:>10}  {what}").trim_end());
            out.push('\n');
        };
        line(
            "token",
            t.token,
            if t.token.is_some() {
                "from devstack's fake Auth0".to_owned()
            } else {
                "given".to_owned()
            },
        );
        line(
            "assign",
            t.assign,
            format!(
                "mandelbox {} on {} ({} attempt{})",
                self.assignment.mandelbox_id,
                self.assignment.ip,
                self.assign_attempts,
                if self.assign_attempts == 1 { "" } else { "s" }
            ),
        );
        let ports: Vec<String> = self.ports.iter().map(|(k, v)| format!("{k}→{v}")).collect();
        let pin = self
            .assignment
            .tls_fingerprint
            .as_deref()
            .map(|f| f.get(..16).unwrap_or(f))
            .unwrap_or("?");
        line(
            "json_transport",
            t.json_transport,
            format!("ports {} (TLS pinned to {pin}…)", ports.join(" ")),
        );
        line(
            "connect",
            t.connect,
            format!(
                "first byte after {}: {}",
                t.first_byte.map(format_duration).unwrap_or_default(),
                quote(&self.first_line, 160)
            ),
        );
        if let Some(hold) = t.hold {
            line("hold", Some(hold), "then left".to_owned());
        }
        line("total", Some(t.total), String::new());
        out
    }
}

/// A session that did not complete: the step, the error and what was timed until then.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct SessionFailure {
    pub step: Step,
    #[source]
    pub error: ClientError,
    pub user_id: String,
    pub session_id: Option<String>,
    pub assignment: Option<Assignment>,
    pub timings: Timings,
}

impl SessionFailure {
    pub fn to_json(&self) -> Value {
        json!({
            "ok": false,
            "step": self.step,
            "error": self.error.to_string(),
            "code": self.error.code(),
            "user_id": self.user_id,
            "session_id": self.session_id,
            "ip": self.assignment.as_ref().map(|a| a.ip),
            "mandelbox_id": self.assignment.as_ref().map(|a| a.mandelbox_id),
            "timings_ms": self.timings.to_json(),
        })
    }
}

/// The client. Cheap to clone; one per process is enough.
#[derive(Debug, Clone)]
pub struct Client {
    options: ClientOptions,
    http: reqwest::Client,
}

impl Client {
    pub fn new(mut options: ClientOptions) -> Result<Self, ClientError> {
        options.scaling_url = checked_base_url("scaling service URL", &options.scaling_url)?;
        options.control_url = options
            .control_url
            .as_deref()
            .map(|u| checked_base_url("devstack control URL", u))
            .transpose()?;
        options.regions.retain(|r| !r.trim().is_empty());
        if options.regions.is_empty() {
            return Err(ClientError::Invalid {
                what: "regions",
                reason: "at least one expected".to_owned(),
            });
        }
        let http = reqwest::Client::builder()
            .connect_timeout(options.connect_timeout)
            .timeout(options.request_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("whist-client/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ClientError::Tls(error_chain(&e)))?;
        Ok(Self { options, http })
    }

    pub fn options(&self) -> &ClientOptions {
        &self.options
    }

    /// Step 1: a token for `user_id` from devstack's fake Auth0.
    pub async fn token(&self, user_id: &str) -> Result<AccessToken, ClientError> {
        let control = self
            .options
            .control_url
            .as_deref()
            .ok_or(ClientError::NoControlUrl)?;
        let url = format!("{control}/token");
        let response = self
            .http
            .post(&url)
            .json(&json!({ "user_id": user_id }))
            .send()
            .await
            .map_err(|e| request_error(Step::Token, &url, e))?;
        let (status, body) = read_body(Step::Token, &url, response).await?;
        if !status.is_success() {
            return Err(refusal(Step::Token, &url, status, &body));
        }
        #[derive(Deserialize)]
        struct Answer {
            access_token: String,
        }
        let answer: Answer = serde_json::from_slice(&body).map_err(|e| ClientError::BadAnswer {
            step: Step::Token,
            url: url.clone(),
            detail: format!("no access_token: {e}"),
        })?;
        AccessToken::new(answer.access_token).map_err(|e| ClientError::BadAnswer {
            step: Step::Token,
            url,
            detail: e.to_string(),
        })
    }

    /// A request for a new session with the client's regions and commit.
    pub fn assign_request(&self, user_email: Option<String>) -> AssignRequest {
        AssignRequest::new(
            self.options.regions.clone(),
            self.options.commit.clone(),
            user_email,
        )
    }

    /// Step 2, one attempt: `POST /mandelbox/assign`.
    pub async fn assign(
        &self,
        token: &AccessToken,
        request: &AssignRequest,
    ) -> Result<Assignment, ClientError> {
        let url = format!("{}/mandelbox/assign", self.options.scaling_url);
        let response = self
            .http
            .post(&url)
            .bearer_auth(token.expose())
            .json(request)
            .send()
            .await
            .map_err(|e| request_error(Step::Assign, &url, e))?;
        let (status, body) = read_body(Step::Assign, &url, response).await?;
        if status != reqwest::StatusCode::OK {
            return Err(refusal(Step::Assign, &url, status, &body));
        }
        serde_json::from_slice(&body).map_err(|e| ClientError::BadAnswer {
            step: Step::Assign,
            url,
            detail: format!(
                "{e}: {}",
                quote(&String::from_utf8_lossy(&body), MAX_QUOTED_BODY)
            ),
        })
    }

    /// Step 2: `POST /mandelbox/assign`, retrying `503 NO_INSTANCE_AVAILABLE` (with backoff,
    /// [`assign_backoff`]) until `wait_for_capacity` has passed; without it, one attempt. Other
    /// errors are returned at once. Returns the assignment and the number of attempts.
    pub async fn assign_waiting(
        &self,
        token: &AccessToken,
        request: &AssignRequest,
        wait_for_capacity: Option<Duration>,
    ) -> Result<(Assignment, u32), ClientError> {
        let started = tokio::time::Instant::now();
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            match self.assign(token, request).await {
                Ok(assignment) => return Ok((assignment, attempts)),
                Err(error) if error.code() == Some("NO_INSTANCE_AVAILABLE") => {
                    let Some(wait) = wait_for_capacity else {
                        return Err(error);
                    };
                    let waited = started.elapsed();
                    let left = wait.saturating_sub(waited);
                    if left.is_zero() {
                        return Err(ClientError::NoCapacity { waited, attempts });
                    }
                    let jitter = 1.0 + ASSIGN_RETRY_JITTER * (rand::random::<f64>() * 2.0 - 1.0);
                    let pause = assign_backoff(attempts).mul_f64(jitter).min(left);
                    tokio::time::sleep(pause).await;
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// Step 3: `PUT https://{ip}:4678/json_transport` with `json_data` (the text of a JSON
    /// object), over TLS pinned to the assignment's fingerprint.
    pub async fn json_transport(
        &self,
        assignment: &Assignment,
        token: &AccessToken,
        json_data: &str,
    ) -> Result<JsonTransportAnswer, ClientError> {
        let fingerprint =
            assignment
                .tls_fingerprint
                .as_deref()
                .ok_or(ClientError::NoFingerprint {
                    mandelbox_id: assignment.mandelbox_id,
                })?;
        let addr = SocketAddr::new(assignment.ip, self.options.json_transport_port);
        let url = format!("https://{addr}/json_transport");
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(pinned_tls_config(fingerprint)?)
            .http1_only()
            .no_proxy()
            .connect_timeout(self.options.connect_timeout)
            .timeout(self.options.json_transport_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("whist-client/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ClientError::Tls(error_chain(&e)))?;
        let response = http
            .put(&url)
            .bearer_auth(token.expose())
            .json(&json!({
                "mandelbox_id": assignment.mandelbox_id,
                "json_data": json_data,
            }))
            .send()
            .await
            .map_err(|e| request_error(Step::JsonTransport, &url, e))?;
        let (status, body) = read_body(Step::JsonTransport, &url, response).await?;
        if status != reqwest::StatusCode::OK {
            return Err(refusal(Step::JsonTransport, &url, status, &body));
        }
        JsonTransportAnswer::parse(&body).map_err(|detail| ClientError::BadAnswer {
            step: Step::JsonTransport,
            url,
            detail,
        })
    }

    /// Step 4: connects to the mandelbox and reads its first line.
    pub async fn connect(&self, ip: IpAddr, port: u16) -> Result<Connection, ClientError> {
        let addr = SocketAddr::new(ip, port);
        let started = Instant::now();
        let stream = tokio::time::timeout(self.options.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| ClientError::Timeout {
                step: Step::Connect,
                addr,
                after: self.options.connect_timeout,
            })?
            .map_err(|e| ClientError::Io {
                step: Step::Connect,
                addr,
                detail: e.to_string(),
            })?;
        let connect_time = started.elapsed();
        let _ = stream.set_nodelay(true);
        let mut stream = BufReader::new(stream);
        let read_first_line = async {
            let io = |e: std::io::Error| ClientError::Io {
                step: Step::Connect,
                addr,
                detail: e.to_string(),
            };
            if stream.fill_buf().await.map_err(io)?.is_empty() {
                return Err(ClientError::ClosedByPeer {
                    step: Step::Connect,
                    addr,
                    after: started.elapsed(),
                });
            }
            let time_to_first_byte = started.elapsed();
            let mut line = Vec::new();
            (&mut stream)
                .take(MAX_FIRST_LINE_BYTES)
                .read_until(b'\n', &mut line)
                .await
                .map_err(io)?;
            if line.last() != Some(&b'\n') {
                return Err(ClientError::Io {
                    step: Step::Connect,
                    addr,
                    detail: format!("the first line is unterminated after {} bytes", line.len()),
                });
            }
            let text = String::from_utf8_lossy(&line).trim_end().to_owned();
            Ok((text, time_to_first_byte))
        };
        let (first_line, time_to_first_byte) =
            tokio::time::timeout(self.options.first_line_timeout, read_first_line)
                .await
                .map_err(|_| ClientError::Timeout {
                    step: Step::Connect,
                    addr,
                    after: self.options.first_line_timeout,
                })??;
        Ok(Connection {
            addr,
            first_line,
            connect_time,
            time_to_first_byte,
            first_line_time: started.elapsed(),
            stream,
        })
    }

    /// All four steps, timed: token (unless given), assign (waiting for capacity if asked),
    /// json_transport, connect, hold (if asked), leave.
    pub async fn run_session(
        &self,
        session: &SessionOptions,
    ) -> Result<SessionReport, Box<SessionFailure>> {
        let started = Instant::now();
        let mut timings = Timings::default();
        let failed = |step: Step,
                      error: ClientError,
                      timings: &Timings,
                      session_id: Option<&str>,
                      assignment: Option<&Assignment>| {
            Box::new(SessionFailure {
                step,
                error,
                user_id: session.user_id.clone(),
                session_id: session_id.map(str::to_owned),
                assignment: assignment.cloned(),
                timings: Timings {
                    total: started.elapsed(),
                    ..timings.clone()
                },
            })
        };

        let token = match &session.token {
            Some(token) => token.clone(),
            None => {
                let t = Instant::now();
                let token = self
                    .token(&session.user_id)
                    .await
                    .map_err(|e| failed(Step::Token, e, &timings, None, None))?;
                timings.token = Some(t.elapsed());
                token
            }
        };

        let request = self.assign_request(session.user_email.clone());
        let session_id = request.session_id.as_deref().unwrap_or_default();
        let t = Instant::now();
        let assigned = self
            .assign_waiting(&token, &request, session.wait_for_capacity)
            .await;
        timings.assign = Some(t.elapsed());
        let (assignment, assign_attempts) =
            assigned.map_err(|e| failed(Step::Assign, e, &timings, Some(session_id), None))?;
        let assigned = Some(&assignment);

        let t = Instant::now();
        let answer = self
            .json_transport(&assignment, &token, &session.json_data)
            .await
            .map_err(|e| failed(Step::JsonTransport, e, &timings, Some(session_id), assigned))?;
        timings.json_transport = Some(t.elapsed());
        let Some(port) = answer.port(SESSION_PORT) else {
            let error = ClientError::BadAnswer {
                step: Step::JsonTransport,
                url: format!(
                    "https://{}/json_transport",
                    SocketAddr::new(assignment.ip, self.options.json_transport_port)
                ),
                detail: format!("no port_{SESSION_PORT}"),
            };
            return Err(failed(
                Step::JsonTransport,
                error,
                &timings,
                Some(session_id),
                assigned,
            ));
        };

        let mut connection = self
            .connect(assignment.ip, port)
            .await
            .map_err(|e| failed(Step::Connect, e, &timings, Some(session_id), assigned))?;
        timings.connect = Some(connection.connect_time);
        timings.first_byte = Some(connection.time_to_first_byte);
        if let Some(hold) = session.hold {
            let t = Instant::now();
            let held = connection.hold(hold).await;
            timings.hold = Some(t.elapsed());
            held.map_err(|e| failed(Step::Hold, e, &timings, Some(session_id), assigned))?;
        }
        let first_line = std::mem::take(&mut connection.first_line);
        connection.close().await;
        timings.total = started.elapsed();
        Ok(SessionReport {
            user_id: session.user_id.clone(),
            session_id: request.session_id.clone().unwrap_or_default(),
            assignment,
            assign_attempts,
            ports: answer.ports,
            first_line,
            timings,
        })
    }
}

/// The pause after failed assign attempt `attempt` (1, 2, ...): [`ASSIGN_RETRY_BASE`] doubling
/// to [`ASSIGN_RETRY_CAP`], before jitter.
pub fn assign_backoff(attempt: u32) -> Duration {
    let doublings = attempt.saturating_sub(1).min(16);
    ASSIGN_RETRY_BASE
        .saturating_mul(1 << doublings)
        .min(ASSIGN_RETRY_CAP)
}

/// Parses `500ms`, `30s`, `2m`, `1h`, `1.5s` or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{text:?}: a duration like 500ms, 30s, 2m or 1h expected"))?;
    let seconds = match unit.trim() {
        "ms" => number / 1000.0,
        "" | "s" | "sec" | "secs" => number,
        "m" | "min" | "mins" => number * 60.0,
        "h" => number * 3600.0,
        other => return Err(format!("{text:?}: unknown unit {other:?} (ms, s, m, h)")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("{text:?}: {e}"))
}

/// A duration for people: `0.42 ms`, `12.3 ms`, `2.31 s`, `2 min 05 s`.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    if ms < 10.0 {
        format!("{ms:.2} ms")
    } else if ms < 100.0 {
        format!("{ms:.1} ms")
    } else if ms < 1000.0 {
        format!("{ms:.0} ms")
    } else if ms < 60_000.0 {
        format!("{:.2} s", ms / 1000.0)
    } else {
        let s = d.as_secs();
        if s < 3600 {
            format!("{} min {:02} s", s / 60, s % 60)
        } else {
            format!("{} h {:02} min", s / 3600, (s % 3600) / 60)
        }
    }
}

fn quote(text: &str, max: usize) -> String {
    let mut out: String = text.chars().take(max).collect();
    if text.chars().count() > max {
        out.push('…');
    }
    out
}

fn checked_base_url(what: &'static str, url: &str) -> Result<String, ClientError> {
    let parsed = url::Url::parse(url.trim()).map_err(|e| ClientError::Invalid {
        what,
        reason: format!("{url:?}: {e}"),
    })?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host().is_none() {
        return Err(ClientError::Invalid {
            what,
            reason: format!("{url:?}: an http(s) URL expected"),
        });
    }
    Ok(url.trim().trim_end_matches('/').to_owned())
}

fn request_error(step: Step, url: &str, error: reqwest::Error) -> ClientError {
    // The URL is in our message already.
    let error = error.without_url();
    ClientError::Request {
        step,
        url: url.to_owned(),
        detail: error_chain(&error),
    }
}

async fn read_body(
    step: Step,
    url: &str,
    response: reqwest::Response,
) -> Result<(reqwest::StatusCode, axum::body::Bytes), ClientError> {
    let status = response.status();
    let body = response
        .bytes()
        .await
        .map_err(|e| request_error(step, url, e))?;
    Ok((status, body))
}

/// Both error shapes: the scaling service's `{"error": CODE, "message"}` and the host's
/// `{"error": MESSAGE, "code": CODE}`; anything else is quoted.
fn refusal(step: Step, url: &str, status: reqwest::StatusCode, body: &[u8]) -> ClientError {
    let value: Option<Value> = serde_json::from_slice(body).ok();
    let field = |name: &str| {
        value
            .as_ref()
            .and_then(|v| v.get(name))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let (code, message) = match (field("code"), field("error"), field("message")) {
        (Some(code), error, _) => (Some(code), error),
        (None, Some(error), message) if step != Step::Token => (Some(error), message),
        (None, Some(error), _) => (None, Some(error)),
        (None, None, _) => {
            let text = String::from_utf8_lossy(body);
            let text = text.trim();
            (
                None,
                (!text.is_empty()).then(|| quote(text, MAX_QUOTED_BODY)),
            )
        }
    };
    ClientError::Refused {
        step,
        url: url.to_owned(),
        status: status.as_u16(),
        code,
        message,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units_and_print_for_people() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("-1s").is_err());
        assert_eq!(format_duration(Duration::from_micros(420)), "0.42 ms");
        assert_eq!(format_duration(Duration::from_micros(12_340)), "12.3 ms");
        assert_eq!(format_duration(Duration::from_millis(480)), "480 ms");
        assert_eq!(format_duration(Duration::from_millis(2310)), "2.31 s");
        assert_eq!(format_duration(Duration::from_secs(125)), "2 min 05 s");
        assert_eq!(format_duration(Duration::from_secs(3720)), "1 h 02 min");
    }

    #[test]
    fn assign_backoff_doubles_from_the_base_to_the_cap() {
        assert_eq!(assign_backoff(1), ASSIGN_RETRY_BASE);
        assert_eq!(assign_backoff(2), ASSIGN_RETRY_BASE * 2);
        assert_eq!(assign_backoff(3), ASSIGN_RETRY_BASE * 4);
        assert_eq!(assign_backoff(6), ASSIGN_RETRY_CAP);
        assert_eq!(assign_backoff(u32::MAX), ASSIGN_RETRY_CAP);
    }

    #[test]
    fn json_transport_answers_parse_into_ports_and_a_hidden_key() {
        let body = br#"{"result": {"port_32261": 40001, "port_32262": 40002, "port_32263": 40003,
            "port_32273": 40004, "private_key": "00112233", "aes_key": "00112233"}}"#;
        let answer = JsonTransportAnswer::parse(body).unwrap();
        assert_eq!(answer.port(SESSION_PORT), Some(40004));
        assert_eq!(answer.ports.len(), 4);
        assert_eq!(answer.private_key.as_deref(), Some("00112233"));
        assert!(!format!("{answer:?}").contains("00112233"));
        // Older hosts: `aes_key` only.
        let old = br#"{"result": {"port_32273": 5, "aes_key": "ff"}}"#;
        let answer = JsonTransportAnswer::parse(old).unwrap();
        assert_eq!(answer.private_key.as_deref(), Some("ff"));
        for bad in [
            &b"not json"[..],
            br#"{"ports": {}}"#,
            br#"{"result": {}}"#,
            br#"{"result": {"port_x": 1}}"#,
            br#"{"result": {"port_32273": 70000}}"#,
            br#"{"result": {"port_32273": "40004"}}"#,
            br#"{"result": {"port_32273": 0}}"#,
        ] {
            assert!(JsonTransportAnswer::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn assignments_parse_with_and_without_a_fingerprint() {
        let fp = "ab".repeat(32);
        let body = format!(
            r#"{{"ip": "127.0.0.2", "mandelbox_id": "6f1c2b0e-8a43-4c4e-9d2f-1f0a7c1e9b11", "tls_fingerprint": "{fp}"}}"#
        );
        let a: Assignment = serde_json::from_str(&body).unwrap();
        assert_eq!(a.ip, IpAddr::from([127, 0, 0, 2]));
        assert_eq!(a.tls_fingerprint.as_deref(), Some(fp.as_str()));
        let old: Assignment = serde_json::from_str(
            r#"{"ip": "10.0.0.1", "mandelbox_id": "6f1c2b0e-8a43-4c4e-9d2f-1f0a7c1e9b11"}"#,
        )
        .unwrap();
        assert_eq!(old.tls_fingerprint, None);
        assert!(serde_json::from_str::<Assignment>(r#"{"ip": "x", "mandelbox_id": "y"}"#).is_err());
    }

    #[test]
    fn assign_requests_have_the_scaling_services_shape() {
        let r = AssignRequest::new(
            vec!["us-east-1".into()],
            LOCAL_DEV_COMMIT.into(),
            Some("u@example.com".into()),
        );
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["regions"], json!(["us-east-1"]));
        assert_eq!(v["client_commit_hash"], "local_dev");
        assert_eq!(v["user_email"], "u@example.com");
        assert!(v["session_id"].as_str().unwrap().parse::<u64>().unwrap() > 1_600_000_000_000);
        let r = AssignRequest::new(vec!["us-east-1".into()], "abc".into(), None);
        assert!(
            serde_json::to_value(&r)
                .unwrap()
                .get("user_email")
                .is_none()
        );
    }

    #[test]
    fn refusals_name_the_servers_code_in_either_shape() {
        let url = "http://x/mandelbox/assign";
        let e = refusal(
            Step::Assign,
            url,
            reqwest::StatusCode::SERVICE_UNAVAILABLE,
            br#"{"error": "NO_INSTANCE_AVAILABLE"}"#,
        );
        assert_eq!(e.code(), Some("NO_INSTANCE_AVAILABLE"));
        assert_eq!(
            e.to_string(),
            "assign: http://x/mandelbox/assign answered 503 NO_INSTANCE_AVAILABLE"
        );
        let e = refusal(
            Step::JsonTransport,
            "https://h/json_transport",
            reqwest::StatusCode::UNAUTHORIZED,
            br#"{"error": "token expired", "code": "unauthorized"}"#,
        );
        assert_eq!(e.code(), Some("unauthorized"));
        assert!(
            e.to_string().ends_with("401 unauthorized: token expired"),
            "{e}"
        );
        let e = refusal(
            Step::Token,
            "http://c/token",
            reqwest::StatusCode::BAD_REQUEST,
            br#"{"error": "user_id must be 1 to 256 printable characters"}"#,
        );
        assert_eq!(e.code(), None);
        assert!(
            e.to_string()
                .ends_with("400: user_id must be 1 to 256 printable characters")
        );
        let e = refusal(
            Step::Assign,
            url,
            reqwest::StatusCode::BAD_GATEWAY,
            b"<html>bad</html>",
        );
        assert!(e.to_string().ends_with("502: <html>bad</html>"), "{e}");
    }

    #[test]
    fn tokens_never_show_and_must_be_header_safe() {
        let t = AccessToken::new("eyJhbGciOi.secret.sig").unwrap();
        assert_eq!(t.expose(), "eyJhbGciOi.secret.sig");
        assert!(!format!("{t:?}").contains("secret"));
        assert!(AccessToken::new("").is_err());
        assert!(AccessToken::new("a b").is_err());
        assert!(AccessToken::new("a\nb").is_err());
    }

    #[test]
    fn fingerprints_normalize_from_openssls_form() {
        let hex = "3f0c".repeat(16);
        let openssl = hex
            .to_uppercase()
            .as_bytes()
            .chunks(2)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect::<Vec<_>>()
            .join(":");
        assert_eq!(normalize_fingerprint(&openssl).unwrap(), hex);
        assert!(normalize_fingerprint("abc").is_err());
        assert!(normalize_fingerprint(&"g".repeat(64)).is_err());
        assert_eq!(fingerprint_of(b"").len(), 64);
    }

    #[test]
    fn random_user_ids_are_local_and_distinct() {
        let a = random_user_id();
        assert!(a.starts_with("local-user-") && a.len() == "local-user-".len() + 12);
        assert_ne!(a, random_user_id());
    }
}
