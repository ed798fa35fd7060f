//! `PUT /json_transport` through the scaling service: the later original's proxy to the host's
//! endpoint (`https://<ip>:4678/json_transport`), with the host's certificate pinned instead of
//! TLS verification turned off.
//!
//! The request is the host's (`mandelbox_id`, `json_data`, optional `jwt_access_token`;
//! unknown fields ignored; token in `Authorization: Bearer` or in the body). The service
//! authenticates it with its [`TokenVerifier`], looks the mandelbox and its instance up, and
//! refuses what the host would refuse anyway before anything leaves: a mandelbox that does not
//! exist (404), is not the caller's (403), or whose host has no address or no published
//! certificate fingerprint yet (503, `Retry-After`). Then it sends the body as received, with
//! the caller's token as `Authorization: Bearer`, to the host over TLS that accepts exactly
//! the certificate whose SHA-256 is the instance's `tls_fingerprint` ([`PinnedVerifier`]; the
//! handshake signatures are still verified, so the server must hold that certificate's key),
//! and relays the host's status and body unchanged. A host that cannot be reached, presents
//! another certificate or does not answer in time gets `502`/`504` with a JSON error naming
//! why; the log line names the instance, never the token.
//!
//! Refusals have the host's shape, `{"error": "<message>", "code": "<code>"}` (plus `field`
//! for a malformed body), so a client reads both the same way.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use dbclient::types::{InstanceId, MandelboxId, MandelboxStatus, UserId};
use edge::auth::bearer_token;
use edge::body::{self, BodyError, BodyLimits};
use edge::error_chain;
use edge::pin::{PinnedVerifier, normalize_fingerprint};
use rustls::crypto::CryptoProvider;
use serde_json::{Value, json};
use tokio::sync::Semaphore;

pub use edge::pin::fingerprint_of;

use crate::api::ApiState;
use crate::auth::AuthError;

/// The hosts' json_transport port (`WHIST_JSON_TRANSPORT_ADDR`'s default on the host).
pub const DEFAULT_HOST_PORT: u16 = 4678;
/// Connecting to a host (TCP and TLS): hosts are in the same cloud, so 5 s means down.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A whole forwarded request. Heroku's router drops a request that has had no response for
/// 30 s (its H12), so the forwarder answers first: after 25 s without the host's answer it
/// answers `504 {code: host_timeout}` with `Retry-After: 1`, and the client sends the same
/// request again. The host pairs a repeated request with the one already made (same data:
/// the same answer), so a mandelbox that takes longer to start (the host bounds it by
/// `WHIST_JSON_TRANSPORT_TIMEOUT + WHIST_READY_TIMEOUT + 10 s`, 90 s by default) is reached
/// by a later try.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(25);
/// The most `WHIST_HOST_JSON_TRANSPORT_TIMEOUT_SECS` may be: under the router's 30 s.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(28);
/// Seconds a client should wait before retrying a forward that timed out.
const TIMEOUT_RETRY_AFTER_SECONDS: &str = "1";
/// The longest request body, as the host.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// The longest answer relayed from a host (its answers are a few hundred bytes).
const MAX_RESPONSE_BYTES: usize = 1024 * 1024;
/// The body must arrive within this long once the headers have (as the host).
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(20);
/// Forwards at once; each may wait up to [`DEFAULT_TIMEOUT`] for its mandelbox. More get 503.
/// Taken only once the caller is authenticated, so strangers cannot hold them.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 1024;
/// Seconds a client should wait before retrying a 503.
const RETRY_AFTER_SECONDS: &str = "5";
/// How request bodies are read: as the host, but an oversize body is refused at once (the
/// forwarder has never drained one).
const BODY_LIMITS: BodyLimits = BodyLimits {
    max_bytes: MAX_BODY_BYTES,
    read_timeout: BODY_READ_TIMEOUT,
    drain_bytes: 0,
};

/// Where and how long requests are forwarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardSettings {
    /// The hosts' json_transport port (`WHIST_HOST_JSON_TRANSPORT_PORT`).
    pub port: u16,
    /// TCP connect to the host.
    pub connect_timeout: Duration,
    /// The whole exchange with the host, answer included
    /// (`WHIST_HOST_JSON_TRANSPORT_TIMEOUT_SECS`, at most [`MAX_TIMEOUT`]).
    pub timeout: Duration,
    /// Authenticated forwards at once; more get `503 busy`.
    pub max_in_flight: usize,
}

impl Default for ForwardSettings {
    fn default() -> Self {
        Self {
            port: DEFAULT_HOST_PORT,
            connect_timeout: CONNECT_TIMEOUT,
            timeout: DEFAULT_TIMEOUT,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
        }
    }
}

/// Why a request was not relayed to the host, or the host's answer could not be relayed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{message}")]
    Malformed {
        field: &'static str,
        message: String,
    },
    #[error("cannot read the body: {0}")]
    UnreadableBody(String),
    #[error("the body was not received within {0:?}")]
    SlowBody(Duration),
    #[error("the body is larger than {MAX_BODY_BYTES} bytes")]
    TooLarge,
    #[error("{0}")]
    Unauthorized(String),
    #[error("tokens cannot be verified now; retry")]
    AuthUnavailable,
    #[error("mandelbox {0} does not exist")]
    UnknownMandelbox(MandelboxId),
    #[error("mandelbox {0} is gone")]
    Gone(MandelboxId),
    #[error("mandelbox {0} belongs to another user")]
    Forbidden(MandelboxId),
    #[error("the host of mandelbox {0} is not ready yet; retry")]
    HostNotReady(MandelboxId),
    #[error("the database cannot be reached; retry")]
    DatabaseUnavailable,
    #[error("too many json_transport requests in flight; retry")]
    Busy,
    #[error("the mandelbox's host cannot be reached: {0}")]
    HostUnreachable(String),
    #[error("the mandelbox's host presented a certificate other than the one it published")]
    CertificateMismatch,
    #[error("the TLS handshake with the mandelbox's host failed: {0}")]
    HandshakeFailed(String),
    #[error("the mandelbox's host did not answer within {0:?}")]
    HostTimeout(Duration),
    #[error("the mandelbox's host sent an unusable answer: {0}")]
    BadHostResponse(String),
}

impl Refusal {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Malformed { .. } | Self::UnreadableBody(_) => StatusCode::BAD_REQUEST,
            Self::SlowBody(_) => StatusCode::REQUEST_TIMEOUT,
            Self::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::UnknownMandelbox(_) | Self::Gone(_) => StatusCode::NOT_FOUND,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::AuthUnavailable
            | Self::HostNotReady(_)
            | Self::DatabaseUnavailable
            | Self::Busy => StatusCode::SERVICE_UNAVAILABLE,
            Self::HostUnreachable(_)
            | Self::CertificateMismatch
            | Self::HandshakeFailed(_)
            | Self::BadHostResponse(_) => StatusCode::BAD_GATEWAY,
            Self::HostTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The machine-readable code in the JSON body (the host's codes where they mean the same).
    pub fn code(&self) -> &'static str {
        match self {
            Self::Malformed { .. } => "invalid_request",
            Self::UnreadableBody(_) => "unreadable_body",
            Self::SlowBody(_) => "body_timeout",
            Self::TooLarge => "body_too_large",
            Self::Unauthorized(_) => "unauthorized",
            Self::AuthUnavailable => "auth_unavailable",
            Self::UnknownMandelbox(_) => "unknown_mandelbox",
            Self::Gone(_) => "mandelbox_gone",
            Self::Forbidden(_) => "forbidden",
            Self::HostNotReady(_) => "host_not_ready",
            Self::DatabaseUnavailable => "database_unavailable",
            Self::Busy => "busy",
            Self::HostUnreachable(_) => "host_unreachable",
            Self::CertificateMismatch => "host_certificate_mismatch",
            Self::HandshakeFailed(_) => "host_handshake_failed",
            Self::HostTimeout(_) => "host_timeout",
            Self::BadHostResponse(_) => "bad_host_response",
        }
    }
}

impl From<BodyError> for Refusal {
    fn from(error: BodyError) -> Self {
        match error {
            BodyError::Unreadable(reason) => Self::UnreadableBody(reason),
            BodyError::Slow(waited) => Self::SlowBody(waited),
            BodyError::TooLarge(_) => Self::TooLarge,
        }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let mut body = json!({"error": self.to_string(), "code": self.code()});
        if let Self::Malformed { field, .. } = &self {
            body["field"] = (*field).into();
        }
        let status = self.status();
        let mut response = (status, axum::Json(body)).into_response();
        let retry_after = match status {
            StatusCode::SERVICE_UNAVAILABLE => Some(RETRY_AFTER_SECONDS),
            StatusCode::GATEWAY_TIMEOUT => Some(TIMEOUT_RETRY_AFTER_SECONDS),
            _ => None,
        };
        if let Some(seconds) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static(seconds));
        }
        with_cors(response)
    }
}

/// Forwards json_transport requests to their mandelbox's host.
#[derive(Debug)]
pub struct Forwarder {
    settings: ForwardSettings,
    provider: Arc<CryptoProvider>,
    in_flight: Semaphore,
}

impl Default for Forwarder {
    fn default() -> Self {
        Self::new(ForwardSettings::default())
    }
}

impl Forwarder {
    pub fn new(settings: ForwardSettings) -> Self {
        Self {
            in_flight: Semaphore::new(settings.max_in_flight.max(1)),
            settings,
            provider: Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
        }
    }

    pub fn settings(&self) -> &ForwardSettings {
        &self.settings
    }

    /// The whole request: the host's answer, or this service's refusal.
    pub async fn handle(&self, state: &ApiState, headers: &HeaderMap, body: Body) -> Response {
        let started = Instant::now();
        match self.forward(state, headers, body).await {
            Ok(response) => response,
            Err(refusal) => {
                tracing::info!(
                    code = refusal.code(),
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "json_transport forward refused"
                );
                refusal.into_response()
            }
        }
    }

    async fn forward(
        &self,
        state: &ApiState,
        headers: &HeaderMap,
        body: Body,
    ) -> Result<Response, Refusal> {
        // Before authentication nothing is held but the connection (capped per address and in
        // total by the listener): a declared oversize body is refused unread, and a token in
        // the header is checked before the body is read (as the host does), so a stranger's
        // request costs a signature check, not a megabyte or a forwarding permit.
        let body = body::check_declared_length(headers, body, &BODY_LIMITS).await?;
        let mut caller = None;
        if let Some(value) = headers.get(header::AUTHORIZATION) {
            let token = bearer_token(value.as_bytes())
                .map_err(|error| Refusal::Unauthorized(error.to_string()))?;
            caller = Some((verify(state, token).await?, token.to_owned()));
        }
        let bytes = body::read_body(body, &BODY_LIMITS).await?;
        let request = parse(&bytes)?;
        let (user, token) = match caller {
            Some(caller) => caller,
            None => {
                let token = request.body_token.ok_or_else(|| {
                    Refusal::Unauthorized(
                        "no access token: send Authorization: Bearer <token>".into(),
                    )
                })?;
                (verify(state, &token).await?, token)
            }
        };
        let _permit = self.in_flight.try_acquire().map_err(|_| Refusal::Busy)?;
        let id = request.mandelbox_id;
        let target = self.target(state, id, &user).await?;
        let started = Instant::now();
        let response = self
            .send(&target, &token, bytes)
            .await
            .inspect_err(|refusal| {
                tracing::warn!(
                    instance.id = %target.instance_id,
                    mandelbox.id = %id,
                    user.id = %user,
                    host = %target.addr,
                    code = refusal.code(),
                    reason = %refusal,
                    "json_transport forward failed"
                );
            })?;
        tracing::info!(
            instance.id = %target.instance_id,
            mandelbox.id = %id,
            user.id = %user,
            status = response.status().as_u16(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "json_transport forwarded"
        );
        Ok(response)
    }

    /// The mandelbox's host, if the caller may reach it through us and it is ready.
    async fn target(
        &self,
        state: &ApiState,
        id: MandelboxId,
        user: &UserId,
    ) -> Result<Target, Refusal> {
        let db = &state.assigner.db;
        let unavailable = |error: dbclient::DbError| {
            tracing::warn!(%error, mandelbox.id = %id, "json_transport forward: database");
            Refusal::DatabaseUnavailable
        };
        let mandelbox = db
            .mandelbox(&id)
            .await
            .map_err(unavailable)?
            .ok_or(Refusal::UnknownMandelbox(id))?;
        match mandelbox.status {
            // Not assigned to anyone yet: as the host, unknown to clients.
            MandelboxStatus::Waiting => return Err(Refusal::UnknownMandelbox(id)),
            MandelboxStatus::Dying => return Err(Refusal::Gone(id)),
            MandelboxStatus::Allocated | MandelboxStatus::Connecting | MandelboxStatus::Running => {
            }
        }
        if mandelbox.user_id.as_ref() != Some(user) {
            return Err(Refusal::Forbidden(id));
        }
        let instance = db
            .instance(&mandelbox.instance_id)
            .await
            .map_err(unavailable)?
            .ok_or(Refusal::Gone(id))?
            .instance;
        let (Some(ip), Some(fingerprint)) = (instance.ip_addr, instance.tls_fingerprint) else {
            return Err(Refusal::HostNotReady(id));
        };
        let Ok(pin) = normalize_fingerprint(&fingerprint) else {
            // The column's CHECK makes this unreachable; refuse rather than forward unpinned.
            tracing::error!(instance.id = %instance.id, "malformed tls_fingerprint on the row");
            return Err(Refusal::HostNotReady(id));
        };
        Ok(Target {
            instance_id: instance.id,
            addr: SocketAddr::new(ip, self.settings.port),
            pin,
        })
    }

    /// Sends the body to the host over pinned TLS and turns its answer into ours.
    async fn send(
        &self,
        target: &Target,
        token: &str,
        body: axum::body::Bytes,
    ) -> Result<Response, Refusal> {
        let verifier = Arc::new(
            PinnedVerifier::new(&target.pin, self.provider.clone())
                .map_err(|e| Refusal::HandshakeFailed(e.to_string()))?,
        );
        let tls = verifier
            .client_config()
            .map_err(|e| Refusal::HandshakeFailed(e.to_string()))?;
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .http1_only()
            .no_proxy()
            .connect_timeout(self.settings.connect_timeout)
            .timeout(self.settings.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("whist-scaling-service/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Refusal::HandshakeFailed(error_chain(&e)))?;
        let url = format!("https://{}/json_transport", target.addr);
        let classify = |error: reqwest::Error| {
            if let Some(presented) = verifier.mismatch() {
                tracing::warn!(
                    instance.id = %target.instance_id,
                    %presented,
                    pinned = %target.pin,
                    "json_transport forward: the host's certificate is not the published one"
                );
                Refusal::CertificateMismatch
            } else if error.is_timeout() && !verifier.reached() {
                Refusal::HostUnreachable(format!(
                    "no connection within {:?}",
                    self.settings.connect_timeout
                ))
            } else if error.is_timeout() {
                Refusal::HostTimeout(self.settings.timeout)
            } else if error.is_connect() && verifier.reached() {
                Refusal::HandshakeFailed(error_chain(&error))
            } else if error.is_connect() {
                Refusal::HostUnreachable(error_chain(&error))
            } else {
                Refusal::BadHostResponse(error_chain(&error))
            }
        };
        let mut response = http
            .put(&url)
            .bearer_auth(token)
            .header(header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await
            .map_err(classify)?;
        if let Some(presented) = verifier.mismatch() {
            // Unreachable: a mismatch aborts the handshake before the request is sent.
            tracing::error!(%presented, "pin mismatch after a completed handshake");
            return Err(Refusal::CertificateMismatch);
        }
        let status = response.status();
        let relayed = [header::CONTENT_TYPE, header::RETRY_AFTER]
            .into_iter()
            .filter_map(|name| Some((name.clone(), response.headers().get(&name)?.clone())))
            .collect::<Vec<_>>();
        let mut answer = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(classify)? {
            if answer.len() + chunk.len() > MAX_RESPONSE_BYTES {
                return Err(Refusal::BadHostResponse(format!(
                    "more than {MAX_RESPONSE_BYTES} bytes"
                )));
            }
            answer.extend_from_slice(&chunk);
        }
        let mut relayed_response = Response::new(Body::from(answer));
        *relayed_response.status_mut() = status;
        let headers = relayed_response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        for (name, value) in relayed {
            headers.insert(name, value);
        }
        // The answer holds the mandelbox's key.
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        Ok(with_cors(relayed_response))
    }
}

/// Where a request goes.
#[derive(Debug)]
struct Target {
    instance_id: InstanceId,
    addr: SocketAddr,
    /// 64 lowercase hex digits.
    pin: String,
}

/// What this service reads of the host's request body (the body itself is forwarded as is).
#[derive(Debug)]
struct ForwardRequest {
    mandelbox_id: MandelboxId,
    body_token: Option<String>,
}

/// The fields the forwarder needs, checked as the host checks them; `json_data` must be a
/// string, its content is the host's to judge. Unknown fields are ignored.
fn parse(body: &[u8]) -> Result<ForwardRequest, Refusal> {
    let malformed = |field: &'static str, reason: &str| Refusal::Malformed {
        field,
        message: format!("{field}: {reason}"),
    };
    let value: Value =
        serde_json::from_slice(body).map_err(|e| malformed("body", &format!("not JSON: {e}")))?;
    let Value::Object(fields) = value else {
        return Err(malformed("body", "not a JSON object"));
    };
    let mandelbox_id = match fields.get("mandelbox_id") {
        Some(Value::String(text)) => text
            .parse::<MandelboxId>()
            .map_err(|_| malformed("mandelbox_id", "not a UUID"))?,
        Some(_) => return Err(malformed("mandelbox_id", "not a string")),
        None => return Err(malformed("mandelbox_id", "missing")),
    };
    match fields.get("json_data") {
        Some(Value::String(_)) => {}
        Some(_) => return Err(malformed("json_data", "not a string of JSON")),
        None => return Err(malformed("json_data", "missing")),
    }
    let body_token = match fields.get("jwt_access_token") {
        None | Some(Value::Null) => None,
        Some(Value::String(token)) => Some(token.clone()),
        Some(_) => return Err(malformed("jwt_access_token", "not a string")),
    };
    Ok(ForwardRequest {
        mandelbox_id,
        body_token,
    })
}

fn with_cors(mut response: Response) -> Response {
    edge::cors::allow_origin(response.headers_mut());
    response
}

/// `OPTIONS /json_transport`: the CORS preflight, as on the host.
pub async fn preflight() -> Response {
    edge::cors::preflight()
}

async fn verify(state: &ApiState, token: &str) -> Result<UserId, Refusal> {
    match state.verifier.verify(token).await {
        Ok(user) => Ok(user),
        Err(AuthError::KeysUnavailable(reason)) => {
            tracing::error!(%reason, "json_transport forward: cannot verify tokens");
            Err(Refusal::AuthUnavailable)
        }
        Err(error) => Err(Refusal::Unauthorized(error.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "6f1c2b0e-8a43-4c4e-9d2f-1f0a7c1e9b11";

    fn field(body: &str) -> Option<&'static str> {
        match parse(body.as_bytes()) {
            Err(Refusal::Malformed { field, .. }) => Some(field),
            _ => None,
        }
    }

    #[test]
    fn bodies_are_read_as_the_host_reads_them() {
        let ok = parse(
            format!(r#"{{"mandelbox_id": "{ID}", "json_data": "{{}}", "cookies": [1]}}"#)
                .as_bytes(),
        )
        .unwrap();
        assert_eq!(ok.mandelbox_id.to_string(), ID);
        assert_eq!(ok.body_token, None);
        let with_token = parse(
            format!(r#"{{"mandelbox_id": "{ID}", "json_data": "x", "jwt_access_token": "t"}}"#)
                .as_bytes(),
        )
        .unwrap();
        assert_eq!(with_token.body_token.as_deref(), Some("t"));
        assert_eq!(field("[]"), Some("body"));
        assert_eq!(field("{"), Some("body"));
        assert_eq!(field(r#"{"json_data": "{}"}"#), Some("mandelbox_id"));
        assert_eq!(
            field(r#"{"mandelbox_id": "nope", "json_data": "{}"}"#),
            Some("mandelbox_id")
        );
        assert_eq!(
            field(&format!(r#"{{"mandelbox_id": "{ID}"}}"#)),
            Some("json_data")
        );
        assert_eq!(
            field(&format!(r#"{{"mandelbox_id": "{ID}", "json_data": {{}}}}"#)),
            Some("json_data")
        );
        assert_eq!(
            field(&format!(
                r#"{{"mandelbox_id": "{ID}", "json_data": "{{}}", "jwt_access_token": 5}}"#
            )),
            Some("jwt_access_token")
        );
    }

    #[test]
    fn bearer_tokens_come_from_the_header() {
        assert_eq!(bearer_token(b"Bearer a.b.c").unwrap(), "a.b.c");
        assert_eq!(bearer_token(b"BEARER a.b.c").unwrap(), "a.b.c");
        assert_eq!(bearer_token(b"bearer  t ").unwrap(), "t");
        for bad in [
            &b"Bearer"[..],
            b"Bearer ",
            b"Basic dXNlcg==",
            b"t",
            b"\xff t",
        ] {
            assert!(bearer_token(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn fingerprints_are_normalized() {
        let fp = "ab".repeat(32);
        assert_eq!(normalize_fingerprint(&fp).as_deref(), Ok(fp.as_str()));
        let openssl = vec!["AB"; 32].join(":");
        assert_eq!(normalize_fingerprint(&openssl).as_deref(), Ok(fp.as_str()));
        assert!(normalize_fingerprint("abc").is_err());
        assert!(normalize_fingerprint(&"zz".repeat(32)).is_err());
        assert_eq!(fingerprint_of(b"").len(), 64);
    }

    #[test]
    fn refusals_have_the_hosts_shape() {
        let id: MandelboxId = ID.parse().unwrap();
        for (refusal, status, code) in [
            (Refusal::UnknownMandelbox(id), 404, "unknown_mandelbox"),
            (Refusal::Forbidden(id), 403, "forbidden"),
            (Refusal::HostNotReady(id), 503, "host_not_ready"),
            (
                Refusal::CertificateMismatch,
                502,
                "host_certificate_mismatch",
            ),
            (
                Refusal::HostUnreachable("x".into()),
                502,
                "host_unreachable",
            ),
            (Refusal::HostTimeout(DEFAULT_TIMEOUT), 504, "host_timeout"),
        ] {
            assert_eq!((refusal.status().as_u16(), refusal.code()), (status, code));
            let response = refusal.into_response();
            assert_eq!(
                response.headers().contains_key(header::RETRY_AFTER),
                status == 503 || status == 504
            );
            assert_eq!(
                response.headers()[header::ACCESS_CONTROL_ALLOW_ORIGIN],
                edge::cors::ALLOW_ORIGIN
            );
        }
    }
}
