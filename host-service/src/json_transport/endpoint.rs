//! The HTTP edge of json_transport: authenticate, read and parse the body into a typed request,
//! check that the mandelbox is this host's and the caller's, then hand the request to
//! [`Host::json_transport`] and turn its answer into a response.
//!
//! Every refusal is a [`Refusal`]: one status code and one machine-readable `code` each, a JSON
//! body `{"error": "<message>", "code": "<code>", "field": "<field>"}` (`field` only for a
//! malformed body). A refused request changes nothing: checks run before the request reaches
//! the pairing, and the pairing itself refuses a conflicting or foreign request without
//! touching the accepted one.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use dbclient::types::{MandelboxId, MandelboxStatus, UserId};
use edge::body::{self, BodyError, BodyLimits};
use serde_json::{Value, json};
use tracing::Instrument as _;

use super::auth::{self, AuthError, Verifier};
use super::request::{self, MAX_BODY_BYTES, RequestError};
use super::tls::Fingerprint;
use crate::docker::ContainerRuntime;
use crate::host::Host;
use crate::pairing::{ClientAnswer, ClientRequest, PairingError};

/// The body must arrive within this long once the headers have: a 1 MiB body takes well under
/// a second on any link a client uses; slower is a slow-loris.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(20);
/// An oversize body is still read (and thrown away) up to this many bytes before the 413 goes
/// out (see [`BodyLimits::drain_bytes`]). Larger bodies get the 413 at once and the connection
/// is closed.
const MAX_DRAINED_BYTES: u64 = 4 * 1024 * 1024;
/// How request bodies are read once the header's token is verified.
const BODY_LIMITS: BodyLimits = BodyLimits {
    max_bytes: MAX_BODY_BYTES,
    read_timeout: BODY_READ_TIMEOUT,
    drain_bytes: MAX_DRAINED_BYTES,
};
/// The body of a request not yet authenticated (its token, if any, is in the body): read within
/// [`PRE_AUTH_BODY_READ_TIMEOUT`], and an oversize one refused at once, never drained: a
/// stranger gets at most [`MAX_BODY_BYTES`] read, for at most that long, per connection.
pub const PRE_AUTH_BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);
const PRE_AUTH_BODY_LIMITS: BodyLimits = BodyLimits {
    max_bytes: MAX_BODY_BYTES,
    read_timeout: PRE_AUTH_BODY_READ_TIMEOUT,
    drain_bytes: 0,
};
/// Mandelbox owners remembered, so repeated requests for a running mandelbox cost no database
/// round trip. A host runs a few dozen mandelboxes at most; entries of mandelboxes that are
/// gone are dropped when the map is full.
const OWNER_CACHE_CAPACITY: usize = 1024;
/// Seconds a client should wait before retrying a 503.
const RETRY_AFTER_SECONDS: &str = "5";

/// Why a request was not answered with ports and a key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{0}")]
    Malformed(RequestError),
    #[error("cannot read the body: {0}")]
    UnreadableBody(String),
    #[error("the body was not received within {0:?}")]
    SlowBody(Duration),
    #[error("the body is larger than {MAX_BODY_BYTES} bytes")]
    TooLarge,
    #[error("{0}")]
    Auth(AuthError),
    #[error("mandelbox {0} is not on this host")]
    UnknownMandelbox(MandelboxId),
    #[error("mandelbox {0} belongs to another user")]
    Forbidden(MandelboxId),
    #[error("another request with different data was already made for mandelbox {0}")]
    Conflict(MandelboxId),
    #[error("mandelbox {0} is gone")]
    Gone(MandelboxId),
    #[error("mandelbox {0} failed to start")]
    SpinUpFailed(MandelboxId),
    #[error("mandelbox {mandelbox_id} was not ready within {waited:?}")]
    Timeout {
        mandelbox_id: MandelboxId,
        waited: Duration,
    },
    #[error("this host is draining: it starts no new mandelbox")]
    Draining,
    #[error("the database cannot be reached; retry")]
    DatabaseUnavailable,
    #[error("no such endpoint")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
}

impl Refusal {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Malformed(_) | Self::UnreadableBody(_) => StatusCode::BAD_REQUEST,
            Self::SlowBody(_) => StatusCode::REQUEST_TIMEOUT,
            Self::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Auth(AuthError::KeysUnavailable) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Auth(_) => StatusCode::UNAUTHORIZED,
            Self::UnknownMandelbox(_) | Self::Gone(_) | Self::NotFound => StatusCode::NOT_FOUND,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::SpinUpFailed(_) | Self::Draining | Self::DatabaseUnavailable => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        }
    }

    /// The machine-readable code in the JSON body.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "invalid_request",
            Self::UnreadableBody(_) => "unreadable_body",
            Self::SlowBody(_) => "body_timeout",
            Self::TooLarge => "body_too_large",
            Self::Auth(AuthError::KeysUnavailable) => "auth_unavailable",
            Self::Auth(_) => "unauthorized",
            Self::UnknownMandelbox(_) => "unknown_mandelbox",
            Self::Forbidden(_) => "forbidden",
            Self::Conflict(_) => "conflict",
            Self::Gone(_) => "mandelbox_gone",
            Self::SpinUpFailed(_) => "spin_up_failed",
            Self::Timeout { .. } => "spin_up_timeout",
            Self::Draining => "draining",
            Self::DatabaseUnavailable => "database_unavailable",
            Self::NotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
        }
    }

    fn field(&self) -> Option<&'static str> {
        match self {
            Self::Malformed(error) => Some(error.field),
            _ => None,
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

impl From<PairingError> for Refusal {
    fn from(error: PairingError) -> Self {
        match error {
            PairingError::Conflict(id) => Self::Conflict(id),
            PairingError::Forbidden(id) => Self::Forbidden(id),
            PairingError::Timeout {
                mandelbox_id,
                waited,
            } => Self::Timeout {
                mandelbox_id,
                waited,
            },
            // The reason (Docker's words, paths) stays in the host's log.
            PairingError::SpinUpFailed { mandelbox_id, .. } => Self::SpinUpFailed(mandelbox_id),
            PairingError::Gone(id) => Self::Gone(id),
        }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let mut body = json!({"error": self.to_string(), "code": self.code()});
        if let Some(field) = self.field() {
            body["field"] = field.into();
        }
        let mut response = (self.status(), axum::Json(body)).into_response();
        if self.status() == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from_static(RETRY_AFTER_SECONDS),
            );
        }
        response
    }
}

/// The success body: `{"result": {"port_32261": …, "port_32262": …, "port_32263": …,
/// "port_32273": …, "private_key": "<hex>", "aes_key": "<hex>"}}`. `aes_key` is the same key
/// under the name the original's clients read (renamed `private_key` in 2022-06).
pub fn success_body(answer: &ClientAnswer) -> Value {
    edge::json_transport::JsonTransportAnswer {
        ports: answer.host_ports.clone(),
        private_key: Some(answer.private_key.clone()),
    }
    .to_json()
}

/// What the handlers share.
pub struct Endpoint<R> {
    host: Arc<Host<R>>,
    /// `None` in local development: no authentication, as in the original.
    auth: Option<Arc<Verifier>>,
    fingerprint: Fingerprint,
    /// Owner of each mandelbox this endpoint looked up (`None`: the row names no user).
    owners: Mutex<HashMap<MandelboxId, Option<UserId>>>,
}

impl<R> std::fmt::Debug for Endpoint<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("auth", &self.auth)
            .field("fingerprint", &self.fingerprint)
            .finish()
    }
}

impl<R: ContainerRuntime + Clone + 'static> Endpoint<R> {
    pub fn new(host: Arc<Host<R>>, auth: Option<Arc<Verifier>>, fingerprint: Fingerprint) -> Self {
        Self {
            host,
            auth,
            fingerprint,
            owners: Mutex::new(HashMap::new()),
        }
    }

    /// The whole request: headers and body in, ports and key (or a refusal) out.
    pub async fn handle(&self, headers: &HeaderMap, body: Body) -> Result<Value, Refusal> {
        // A token in the header is checked before anything of the body is read (not even a
        // declared oversize body is drained): unauthenticated floods cost a signature check,
        // not megabytes each. Without authentication (local development) the header is ignored.
        let mut user = None;
        if let Some(verifier) = &self.auth
            && let Some(value) = headers.get(header::AUTHORIZATION)
        {
            let token = auth::bearer_token(value.as_bytes()).map_err(Refusal::Auth)?;
            user = Some(verifier.verify(token).await.map_err(Refusal::Auth)?);
        }
        let limits = if self.auth.is_some() && user.is_none() {
            &PRE_AUTH_BODY_LIMITS
        } else {
            &BODY_LIMITS
        };
        let body = body::check_declared_length(headers, body, limits)
            .await
            .map_err(Refusal::from)?;
        let bytes = body::read_body(body, limits).await.map_err(Refusal::from)?;
        if let Some(verifier) = &self.auth
            && user.is_none()
        {
            // The token alone first: json_data is decoded and inflated only for a caller.
            let token = request::body_token(&bytes)
                .map_err(Refusal::Malformed)?
                .ok_or(Refusal::Auth(AuthError::Missing))?;
            user = Some(verifier.verify(&token).await.map_err(Refusal::Auth)?);
        }
        let parsed = request::parse(&bytes).map_err(Refusal::Malformed)?;
        let id = parsed.mandelbox_id;
        tracing::Span::current().record("mandelbox.id", tracing::field::display(id));
        self.check_owner(id, user.as_ref()).await?;
        let answer = self
            .host
            .json_transport(ClientRequest {
                mandelbox_id: id,
                json_data: parsed.json_data,
                user_id: user,
                profile: parsed.profile,
            })
            .await?;
        Ok(success_body(&answer))
    }

    /// The mandelbox must be this host's, allocated, and (with authentication) the caller's.
    /// In local development without a database any id is accepted: the request starts it.
    async fn check_owner(&self, id: MandelboxId, user: Option<&UserId>) -> Result<(), Refusal> {
        let Some(db) = &self.host.db else {
            return Ok(());
        };
        let tracked = self.host.is_tracked(&id);
        // A box whose task already took its row (a claimed warm box, an allocated cold one)
        // knows its user: no database round trip on the session's critical path.
        let cached = tracked
            .then(|| {
                self.cached_owner(id)
                    .or_else(|| self.host.pairing.owning_user(id).map(Some))
            })
            .flatten();
        let owner = match cached {
            Some(owner) => owner,
            None => {
                if !tracked && self.host.readiness.draining.load(Ordering::SeqCst) {
                    return Err(Refusal::Draining);
                }
                let row = match db.mandelbox(&id).await {
                    Ok(row) => row,
                    Err(error) => {
                        tracing::warn!(%error, mandelbox.id = %id, "cannot look the mandelbox up");
                        return Err(Refusal::DatabaseUnavailable);
                    }
                };
                let row = match row {
                    Some(row) if row.instance_id == *self.host.instance_id() => row,
                    _ => return Err(Refusal::UnknownMandelbox(id)),
                };
                match row.status {
                    MandelboxStatus::Waiting => return Err(Refusal::UnknownMandelbox(id)),
                    MandelboxStatus::Dying => return Err(Refusal::Gone(id)),
                    MandelboxStatus::Allocated
                    | MandelboxStatus::Connecting
                    | MandelboxStatus::Running => {}
                }
                self.remember_owner(id, row.user_id.clone());
                row.user_id
            }
        };
        match (&self.auth, user) {
            (None, _) => Ok(()),
            (Some(_), Some(user)) if owner.as_ref() == Some(user) => Ok(()),
            (Some(_), _) => Err(Refusal::Forbidden(id)),
        }
    }

    fn lock_owners(&self) -> std::sync::MutexGuard<'_, HashMap<MandelboxId, Option<UserId>>> {
        match self.owners.lock() {
            Ok(owners) => owners,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn cached_owner(&self, id: MandelboxId) -> Option<Option<UserId>> {
        self.lock_owners().get(&id).cloned()
    }

    fn remember_owner(&self, id: MandelboxId, owner: Option<UserId>) {
        let mut owners = self.lock_owners();
        if owners.len() >= OWNER_CACHE_CAPACITY {
            owners.retain(|id, _| self.host.is_tracked(id));
            if owners.len() >= OWNER_CACHE_CAPACITY {
                owners.clear();
            }
        }
        owners.insert(id, owner);
    }
}

/// The router: `PUT /json_transport` (and its CORS preflight), `GET /healthz`; JSON 404 and 405
/// for everything else. Every response carries the CORS origin header.
pub fn router<R: ContainerRuntime + Clone + 'static>(endpoint: Arc<Endpoint<R>>) -> Router {
    Router::new()
        .route(
            "/json_transport",
            put(json_transport::<R>)
                .options(preflight)
                .fallback(method_not_allowed),
        )
        .route("/healthz", get(healthz::<R>).fallback(method_not_allowed))
        .fallback(not_found)
        .layer(axum::middleware::map_response(cors))
        .with_state(endpoint)
}

async fn json_transport<R: ContainerRuntime + Clone + 'static>(
    State(endpoint): State<Arc<Endpoint<R>>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let span = tracing::info_span!("json_transport", mandelbox.id = tracing::field::Empty);
    let result = endpoint
        .handle(&headers, body)
        .instrument(span.clone())
        .await;
    let elapsed_ms = started.elapsed().as_millis() as u64;
    let _in_span = span.enter();
    let (code, mut response) = match result {
        Ok(answer) => {
            tracing::info!(elapsed_ms, "json_transport answered");
            ("ok", (StatusCode::OK, axum::Json(answer)).into_response())
        }
        Err(refusal) => {
            if refusal.status().is_server_error() {
                tracing::warn!(%refusal, code = refusal.code(), elapsed_ms, "json_transport failed");
            } else {
                tracing::info!(%refusal, code = refusal.code(), elapsed_ms, "json_transport refused");
            }
            (refusal.code(), refusal.into_response())
        }
    };
    endpoint
        .host
        .metrics
        .observe_json_transport(response.status(), code, started.elapsed());
    // The answer carries the mandelbox's key: no cache may keep it.
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

async fn preflight() -> Response {
    edge::cors::preflight()
}

async fn healthz<R: ContainerRuntime + Clone + 'static>(
    State(endpoint): State<Arc<Endpoint<R>>>,
) -> Response {
    axum::Json(json!({
        "status": "ok",
        "tls_fingerprint": endpoint.fingerprint.as_str(),
    }))
    .into_response()
}

async fn not_found() -> Response {
    Refusal::NotFound.into_response()
}

async fn method_not_allowed() -> Response {
    Refusal::MethodNotAllowed.into_response()
}

async fn cors(mut response: Response) -> Response {
    edge::cors::allow_origin(response.headers_mut());
    response
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn every_refusal_is_a_client_or_service_error_with_a_json_body() {
        let id = MandelboxId::random();
        for refusal in [
            Refusal::Malformed(RequestError {
                field: "json_data",
                reason: "x".into(),
            }),
            Refusal::UnreadableBody("x".into()),
            Refusal::SlowBody(BODY_READ_TIMEOUT),
            Refusal::TooLarge,
            Refusal::Auth(AuthError::Missing),
            Refusal::Auth(AuthError::KeysUnavailable),
            Refusal::UnknownMandelbox(id),
            Refusal::Forbidden(id),
            Refusal::Conflict(id),
            Refusal::Gone(id),
            Refusal::SpinUpFailed(id),
            Refusal::Timeout {
                mandelbox_id: id,
                waited: Duration::from_secs(1),
            },
            Refusal::Draining,
            Refusal::DatabaseUnavailable,
            Refusal::NotFound,
            Refusal::MethodNotAllowed,
        ] {
            let status = refusal.status();
            assert!(status.is_client_error() || status.is_server_error());
            assert_ne!(status, StatusCode::INTERNAL_SERVER_ERROR);
            let response = refusal.clone().into_response();
            assert_eq!(
                response.headers()[header::CONTENT_TYPE],
                "application/json",
                "{refusal:?}"
            );
        }
        let field = Refusal::Malformed(RequestError {
            field: "mandelbox_id",
            reason: "not a UUID".into(),
        });
        assert_eq!(field.field(), Some("mandelbox_id"));
    }

    #[test]
    fn spin_up_failures_do_not_leak_their_reason() {
        let id = MandelboxId::random();
        let refusal = Refusal::from(PairingError::SpinUpFailed {
            mandelbox_id: id,
            reason: "/whist/secret/path: permission denied".into(),
        });
        assert_eq!(refusal.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(!refusal.to_string().contains("/whist"));
    }

    #[test]
    fn the_success_body_names_every_port_and_the_key_twice() {
        let answer = ClientAnswer {
            host_ports: BTreeMap::from([
                (32261, 40000),
                (32262, 40001),
                (32263, 40002),
                (32273, 40003),
            ]),
            private_key: "00112233445566778899aabbccddeeff".into(),
        };
        assert_eq!(
            success_body(&answer),
            json!({"result": {
                "port_32261": 40000, "port_32262": 40001, "port_32263": 40002,
                "port_32273": 40003, "private_key": "00112233445566778899aabbccddeeff",
                "aes_key": "00112233445566778899aabbccddeeff",
            }})
        );
    }
}
