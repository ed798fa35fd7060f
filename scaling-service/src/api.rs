//! The HTTP API: `POST /mandelbox/assign`, `PUT /json_transport` (forwarded to the mandelbox's
//! host with its certificate pinned, see [`crate::forward`]), `GET /metrics`, `/healthz`,
//! `/readyz`.
//!
//! The handler checks the client address's rate limit, authenticates (bearer JWT, `sub` =
//! user), checks the user's rate limit ([`crate::admission`]), reads the body (16 KiB within
//! 10 s) and parses it into an
//! [`AssignRequest`] and calls [`Assigner::assign`], which tests can drive without HTTP.
//! Assignment is one database request, `DbClient::assign_mandelbox` (the tracked function
//! `whist.assign_mandelbox`, one transaction): it checks the user's limit under a per-user lock,
//! walks the client's regions in its order and, on ACTIVE hosts of the region's current image
//! with the client's commit that have published their json_transport certificate fingerprint,
//! claims the oldest warm (`WAITING`) mandelbox, or else a new slot on the fullest host
//! (bin-packing). Two requests never get the same mandelbox or slot, and a user's concurrent
//! requests cannot pass the limit together.
//! The answer carries that fingerprint, so the client can pin the host's certificate. The
//! region that served (or failed) is asked to re-check its buffer.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use dbclient::DbClient;
use dbclient::assign::{AssignOutcome, AssignParams};
use dbclient::types::{MandelboxId, Region, UserId};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use edge::body::{self, BodyError, BodyLimits};

use crate::admission::{Admission, Refused};
use crate::auth::{AuthError, TokenVerifier, bearer_token};
use crate::forward::Forwarder;
use crate::listener::ListenerLimits;
use crate::metrics::Metrics;
use crate::region::{Event, PROVIDER};

pub use edge::assign::AssignRequest;

/// `200` body.
pub type Assignment = edge::assign::Assignment<MandelboxId>;

/// The original's `503` error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AssignError {
    #[error("NO_INSTANCE_AVAILABLE")]
    NoInstanceAvailable,
    #[error("COMMIT_HASH_MISMATCH")]
    CommitHashMismatch,
    #[error("REGION_NOT_ENABLED")]
    RegionNotEnabled,
    #[error("USER_ALREADY_ACTIVE")]
    UserAlreadyActive,
    #[error("SERVICE_UNAVAILABLE")]
    ServiceUnavailable,
    /// The request names an app the deployment does not run (a 400 over HTTP, checked before
    /// anything is assigned).
    #[error("BAD_REQUEST")]
    AppNotAllowed,
}

/// The commit hash a local client sends to mean "whatever the hosts run".
pub const LOCAL_DEV_COMMIT: &str = "local_dev";
/// The original's `MANDELBOX_LIMIT_PER_USER` default.
pub const DEFAULT_MANDELBOXES_PER_USER: usize = 3;
/// The app an assign request gets when it names none (and the only one warm boxes run).
pub const APP: &str = "chrome";
/// Longest app name a request may give.
const MAX_APP_LEN: usize = 64;
/// Longest assign body. Enforced while reading, so a larger body is never buffered, and
/// answered like any bad input: `413 {error: BAD_REQUEST, message}`.
const MAX_BODY_BYTES: usize = 16 * 1024;
/// The body (a few hundred bytes) must arrive within this long once the head has.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);
const BODY_LIMITS: BodyLimits = BodyLimits {
    max_bytes: MAX_BODY_BYTES,
    read_timeout: BODY_READ_TIMEOUT,
    drain_bytes: 0,
};
const MAX_REGIONS: usize = 32;

/// Assignment without HTTP.
#[derive(Debug, Clone)]
pub struct Assigner {
    pub db: DbClient,
    pub enabled_regions: Vec<Region>,
    pub mandelboxes_per_user: usize,
    /// Accept [`LOCAL_DEV_COMMIT`] (local environments only).
    pub allow_local_commit: bool,
    /// The region controllers, told when capacity was taken (or was missing).
    pub regions: HashMap<Region, mpsc::Sender<Event>>,
    /// The apps a request may ask for (`WHIST_ALLOWED_APPS`; by default [`APP`] alone).
    pub allowed_apps: Vec<String>,
}

impl Assigner {
    /// The app `request` asks for ([`APP`] when it names none), if the deployment runs it; else
    /// why not.
    pub fn app_of<'a>(&'a self, request: &'a AssignRequest) -> Result<&'a str, String> {
        let app = request.app.as_deref().unwrap_or(APP);
        if self.allowed_apps.iter().any(|a| a == app) {
            return Ok(app);
        }
        let shown: String = app.chars().take(MAX_APP_LEN).collect();
        Err(format!(
            "app {shown:?}: this deployment runs {}",
            self.allowed_apps.join(", ")
        ))
    }

    pub async fn assign(
        &self,
        user: &UserId,
        request: &AssignRequest,
    ) -> Result<(Region, Assignment), AssignError> {
        let regions: Vec<Region> = request
            .regions
            .iter()
            .filter_map(|r| Region::new(r.trim()).ok())
            .filter(|r| self.enabled_regions.contains(r))
            .collect();
        if regions.is_empty() {
            return Err(AssignError::RegionNotEnabled);
        }
        let app = self
            .app_of(request)
            .map_err(|_| AssignError::AppNotAllowed)?;
        let client = format!("{user}/{}", request.session_id.as_deref().unwrap_or(""));
        let params = AssignParams {
            provider: PROVIDER,
            user_id: user,
            session_id: request.session_id.as_deref(),
            regions: &regions,
            client_commit: &request.client_commit_hash,
            any_commit: self.allow_local_commit && request.client_commit_hash == LOCAL_DEV_COMMIT,
            mandelbox_limit: u32::try_from(self.mandelboxes_per_user).unwrap_or(u32::MAX),
            app,
            new_mandelbox_id: MandelboxId::random(),
        };
        let outcome = self.db.assign_mandelbox(&params).await.map_err(|error| {
            tracing::error!(%error, "assign: database");
            AssignError::ServiceUnavailable
        })?;
        let refused = match outcome {
            AssignOutcome::Assigned(assigned) => {
                if assigned.region != regions[0] {
                    tracing::warn!(region = %assigned.region, "assigned outside the closest region");
                }
                tracing::info!(
                    region = %assigned.region,
                    mandelbox.id = %assigned.mandelbox_id,
                    instance.id = %assigned.instance_id,
                    warm = assigned.warm,
                    "assigned"
                );
                self.tell(&assigned.region, Event::Assigned { client });
                return Ok((
                    assigned.region,
                    Assignment {
                        ip: assigned.ip_addr,
                        mandelbox_id: assigned.mandelbox_id,
                        tls_fingerprint: Some(assigned.tls_fingerprint),
                    },
                ));
            }
            AssignOutcome::UserAlreadyActive => return Err(AssignError::UserAlreadyActive),
            AssignOutcome::CommitHashMismatch => AssignError::CommitHashMismatch,
            AssignOutcome::NoInstanceAvailable => AssignError::NoInstanceAvailable,
        };
        for (rank, region) in regions.iter().enumerate() {
            // A refused client is demand for its closest region: that is where it should be
            // served, and where the controller counts it as waiting.
            if rank == 0 && refused == AssignError::NoInstanceAvailable {
                self.tell(
                    region,
                    Event::Refused {
                        client: client.clone(),
                    },
                );
            } else {
                self.tell(region, Event::CapacityTaken);
            }
        }
        Err(refused)
    }

    fn tell(&self, region: &Region, event: Event) {
        if let Some(tx) = self.regions.get(region) {
            let _ = tx.try_send(event);
        }
    }
}

/// What the handlers share.
#[derive(Debug, Clone)]
pub struct ApiState {
    pub assigner: Arc<Assigner>,
    pub verifier: Arc<dyn TokenVerifier>,
    /// Assign's per-address and per-user rate limits.
    pub admission: Arc<Admission>,
    pub metrics: Arc<Metrics>,
    /// Ready once the subscriptions deliver (and the database answers).
    pub ready: watch::Receiver<bool>,
}

fn error(status: StatusCode, code: &str, message: Option<String>) -> Response {
    let mut body = serde_json::json!({ "error": code });
    if let Some(message) = message {
        body["message"] = serde_json::Value::String(message);
    }
    (status, axum::Json(body)).into_response()
}

/// Rate limits before and after authentication, then the body (bounded in size and time) is
/// read and parsed: a refused request has read nothing but its head.
async fn assign(State(state): State<ApiState>, request: Request) -> Response {
    let timer = state.metrics.assign_seconds.start_timer();
    let (parts, body) = request.into_parts();
    let peer = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(peer)| peer.ip());
    let (result, mut response) = assign_inner(&state, peer, &parts.headers, body).await;
    edge::cors::allow_origin(response.headers_mut());
    state
        .metrics
        .assign_requests
        .with_label_values(&[result])
        .inc();
    timer.observe_duration();
    response
}

fn rate_limited(refused: Refused) -> (&'static str, Response) {
    let limited = refused.limited();
    let which = match refused {
        Refused::Address(_) => "too many assign requests from this address",
        Refused::User(_) => "too many assign requests from this user",
    };
    let mut response = error(
        StatusCode::TOO_MANY_REQUESTS,
        "RATE_LIMITED",
        Some(format!(
            "{which}; retry in {} s",
            limited.retry_after_secs()
        )),
    );
    response.headers_mut().insert(
        header::RETRY_AFTER,
        HeaderValue::from(limited.retry_after_secs()),
    );
    ("RATE_LIMITED", response)
}

async fn assign_inner(
    state: &ApiState,
    peer: Option<IpAddr>,
    headers: &HeaderMap,
    body: Body,
) -> (&'static str, Response) {
    let client = state.admission.client(peer, headers);
    if let Err(refused) = state.admission.check_address(client) {
        return rate_limited(refused);
    }
    let user = match headers.get(header::AUTHORIZATION) {
        None => Err(AuthError::Missing),
        Some(value) => match bearer_token(value.as_bytes()) {
            Ok(token) => state.verifier.verify(token).await,
            Err(error) => Err(error),
        },
    };
    let user = match user {
        Ok(user) => user,
        Err(AuthError::KeysUnavailable(reason)) => {
            tracing::error!(%reason, "assign: cannot verify tokens");
            return (
                "SERVICE_UNAVAILABLE",
                error(StatusCode::SERVICE_UNAVAILABLE, "SERVICE_UNAVAILABLE", None),
            );
        }
        Err(e) => {
            return (
                "UNAUTHORIZED",
                error(
                    StatusCode::UNAUTHORIZED,
                    "UNAUTHORIZED",
                    Some(e.to_string()),
                ),
            );
        }
    };
    if let Err(refused) = state.admission.check_user(&user) {
        return rate_limited(refused);
    }
    let read = match body::check_declared_length(headers, body, &BODY_LIMITS).await {
        Ok(body) => body::read_body(body, &BODY_LIMITS).await,
        Err(error) => Err(error),
    };
    let body = match read {
        Ok(body) => body,
        Err(BodyError::TooLarge(_)) => {
            return (
                "BAD_REQUEST",
                error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "BAD_REQUEST",
                    Some(format!("body too large: at most {MAX_BODY_BYTES} bytes")),
                ),
            );
        }
        Err(slow @ BodyError::Slow(_)) => {
            return (
                "BAD_REQUEST",
                error(
                    StatusCode::REQUEST_TIMEOUT,
                    "BAD_REQUEST",
                    Some(slow.to_string()),
                ),
            );
        }
        Err(unreadable) => {
            return (
                "BAD_REQUEST",
                error(
                    StatusCode::BAD_REQUEST,
                    "BAD_REQUEST",
                    Some(unreadable.to_string()),
                ),
            );
        }
    };
    let request: AssignRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return (
                "BAD_REQUEST",
                error(StatusCode::BAD_REQUEST, "BAD_REQUEST", Some(e.to_string())),
            );
        }
    };
    if let Err(reason) = validate(&request).and_then(|()| state.assigner.app_of(&request).map(drop))
    {
        return (
            "BAD_REQUEST",
            error(StatusCode::BAD_REQUEST, "BAD_REQUEST", Some(reason)),
        );
    }
    match state.assigner.assign(&user, &request).await {
        Ok((region, assignment)) => {
            tracing::info!(user.id = %user, %region, mandelbox.id = %assignment.mandelbox_id, "assigned");
            (
                "OK",
                (StatusCode::OK, axum::Json(assignment)).into_response(),
            )
        }
        Err(e) => {
            let code: &'static str = match e {
                AssignError::NoInstanceAvailable => "NO_INSTANCE_AVAILABLE",
                AssignError::CommitHashMismatch => "COMMIT_HASH_MISMATCH",
                AssignError::RegionNotEnabled => "REGION_NOT_ENABLED",
                AssignError::UserAlreadyActive => "USER_ALREADY_ACTIVE",
                AssignError::ServiceUnavailable => "SERVICE_UNAVAILABLE",
                // Checked above; kept for callers without HTTP.
                AssignError::AppNotAllowed => {
                    return (
                        "BAD_REQUEST",
                        error(StatusCode::BAD_REQUEST, "BAD_REQUEST", None),
                    );
                }
            };
            (code, error(StatusCode::SERVICE_UNAVAILABLE, code, None))
        }
    }
}

/// Checks what serde cannot: sizes, and the version's shape (`X.Y.Z` with an optional suffix).
fn validate(request: &AssignRequest) -> Result<(), String> {
    if request.regions.is_empty() || request.regions.len() > MAX_REGIONS {
        return Err(format!("regions: 1 to {MAX_REGIONS} expected"));
    }
    if request.client_commit_hash.is_empty() || request.client_commit_hash.len() > 64 {
        return Err("client_commit_hash: 1 to 64 characters expected".into());
    }
    if request.session_id.as_ref().is_some_and(|s| s.len() > 128) {
        return Err("session_id: too long".into());
    }
    if let Some(version) = &request.version {
        let core = version.split('-').next().unwrap_or("");
        let parts: Vec<&str> = core.split('.').collect();
        if parts.len() != 3
            || parts
                .iter()
                .any(|p| p.is_empty() || p.parse::<u32>().is_err())
        {
            return Err(format!("version {version:?}: X.Y.Z expected"));
        }
    }
    Ok(())
}

/// `OPTIONS /mandelbox/assign`: the CORS preflight, the policy of json_transport's.
async fn assign_preflight() -> Response {
    edge::cors::preflight_for(edge::cors::ASSIGN_ALLOW_METHODS)
}

async fn metrics(State(state): State<ApiState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

async fn readyz(State(state): State<ApiState>) -> Response {
    if *state.ready.borrow() {
        (StatusCode::OK, "ready").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready").into_response()
    }
}

/// The router, forwarding json_transport with the default settings (port 4678).
pub fn router(state: ApiState) -> Router {
    router_with(state, Arc::new(Forwarder::default()))
}

/// The router, forwarding json_transport with `forwarder`.
pub fn router_with(state: ApiState, forwarder: Arc<Forwarder>) -> Router {
    let json_transport = move |State(state): State<ApiState>, headers: HeaderMap, body: Body| {
        let forwarder = forwarder.clone();
        async move { forwarder.handle(&state, &headers, body).await }
    };
    Router::new()
        .route("/mandelbox/assign", post(assign).options(assign_preflight))
        .route(
            "/json_transport",
            put(json_transport).options(crate::forward::preflight),
        )
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

/// Serves on `listener` until `shutdown`, then lets requests in flight finish (bounded).
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: ApiState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    serve_with(listener, state, Arc::new(Forwarder::default()), shutdown).await
}

/// [`serve`] with json_transport forwarded by `forwarder`.
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    state: ApiState,
    forwarder: Arc<Forwarder>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    serve_limited(
        listener,
        state,
        forwarder,
        ListenerLimits::default(),
        shutdown,
    )
    .await
}

/// [`serve_with`] with the listener's connection caps and head timeout.
pub async fn serve_limited(
    listener: tokio::net::TcpListener,
    state: ApiState,
    forwarder: Arc<Forwarder>,
    limits: ListenerLimits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    crate::listener::serve(listener, router_with(state, forwarder), limits, shutdown).await;
    Ok(())
}
