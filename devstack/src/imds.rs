//! A fake EC2 instance metadata service (IMDSv2 only), one listener per identity, so each local
//! host-service process can be a different "EC2 instance".
//!
//! Faithful to the parts of the real service the host uses:
//! - `PUT /latest/api/token` needs `x-aws-ec2-metadata-token-ttl-seconds` (1..=21600) and answers
//!   the token with that same header (the AWS SDK's IMDS client refuses a token without it);
//!   a request carrying `X-Forwarded-For` is refused (403), as AWS does to stop proxied
//!   token theft;
//! - every `GET` needs a valid, unexpired `x-aws-ec2-metadata-token`, else 401;
//! - `meta-data/{instance-id, ami-id, instance-type, placement/region,
//!   placement/availability-zone, public-ipv4, local-ipv4, hostname}` and, with instance tags in
//!   metadata enabled, `meta-data/tags/instance` (keys, one per line) and
//!   `meta-data/tags/instance/<key>`; unknown paths are 404;
//! - with a [`DocumentSigner`] ([`FakeImds::with_signer`]), `dynamic/instance-identity/document`
//!   and `dynamic/instance-identity/signature`, signed with devstack's stand-in for AWS's key.

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::aws_identity::DocumentSigner;

pub const TOKEN_TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";
pub const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
/// The longest token lifetime IMDS grants (6 hours).
pub const MAX_TOKEN_TTL_SECONDS: u64 = 21_600;

/// Who the fake instance is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub instance_id: String,
    pub ami_id: String,
    pub instance_type: String,
    pub region: String,
    #[serde(default)]
    pub availability_zone: Option<String>,
    /// `None` serves 404 for `public-ipv4`, as for an instance without a public address.
    #[serde(default)]
    pub public_ipv4: Option<Ipv4Addr>,
    #[serde(default = "default_local_ipv4")]
    pub local_ipv4: Ipv4Addr,
    /// Instance tags (instance metadata tags enabled), e.g. `Name`.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
}

fn default_local_ipv4() -> Ipv4Addr {
    Ipv4Addr::LOCALHOST
}

impl Identity {
    /// A plausible local-development identity.
    pub fn local(instance_id: &str, region: &str) -> Self {
        Self {
            instance_id: instance_id.to_owned(),
            ami_id: "ami-0123456789abcdef0".to_owned(),
            instance_type: "g4dn.xlarge".to_owned(),
            region: region.to_owned(),
            availability_zone: None,
            public_ipv4: Some(Ipv4Addr::LOCALHOST),
            local_ipv4: Ipv4Addr::LOCALHOST,
            tags: BTreeMap::from([("Name".to_owned(), format!("local-{instance_id}"))]),
        }
    }

    fn lookup(&self, path: &str) -> Option<String> {
        let path = path.trim_end_matches('/');
        let value = match path {
            "instance-id" => self.instance_id.clone(),
            "ami-id" => self.ami_id.clone(),
            "instance-type" => self.instance_type.clone(),
            "placement/region" => self.region.clone(),
            "placement/availability-zone" => self
                .availability_zone
                .clone()
                .unwrap_or_else(|| format!("{}a", self.region)),
            "public-ipv4" => self.public_ipv4?.to_string(),
            "local-ipv4" => self.local_ipv4.to_string(),
            "hostname" => format!(
                "ip-{}.ec2.internal",
                self.local_ipv4.to_string().replace('.', "-")
            ),
            "tags/instance" => self.tags.keys().cloned().collect::<Vec<_>>().join("\n"),
            "" => [
                "ami-id",
                "hostname",
                "instance-id",
                "instance-type",
                "local-ipv4",
                "placement/",
                "public-ipv4",
                "tags/",
            ]
            .join("\n"),
            other => self
                .tags
                .get(other.strip_prefix("tags/instance/")?)?
                .clone(),
        };
        Some(value)
    }
}

#[derive(Debug, Default)]
struct Tokens {
    expiry_by_token: HashMap<String, Instant>,
}

#[derive(Debug, Clone)]
struct ImdsState {
    identity: Arc<RwLock<Identity>>,
    tokens: Arc<RwLock<Tokens>>,
    signer: Arc<RwLock<Option<Arc<DocumentSigner>>>>,
}

/// A running fake IMDS. Stops when [`FakeImds::stop`] is called or its token is cancelled.
#[derive(Debug)]
pub struct FakeImds {
    addr: SocketAddr,
    state: ImdsState,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl FakeImds {
    /// Serves `identity` on a free loopback port.
    pub async fn spawn(identity: Identity) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        Self::serve(listener, identity)
    }

    /// Serves `identity` on `listener`.
    pub fn serve(listener: tokio::net::TcpListener, identity: Identity) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let state = ImdsState {
            identity: Arc::new(RwLock::new(identity)),
            tokens: Arc::default(),
            signer: Arc::default(),
        };
        let shutdown = CancellationToken::new();
        let app = router(state.clone());
        let token = shutdown.clone();
        let task = tokio::spawn(async move {
            if let Err(error) = axum::serve(listener, app)
                .with_graceful_shutdown(token.cancelled_owned())
                .await
            {
                tracing::warn!(%error, "fake IMDS stopped with an error");
            }
        });
        Ok(Self {
            addr,
            state,
            shutdown,
            task,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The value for `AWS_EC2_METADATA_SERVICE_ENDPOINT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn identity(&self) -> Identity {
        match self.state.identity.read() {
            Ok(i) => i.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Changes what the instance reports from now on (e.g. a new public IP).
    pub fn set_identity(&self, identity: Identity) {
        match self.state.identity.write() {
            Ok(mut i) => *i = identity,
            Err(poisoned) => *poisoned.into_inner() = identity,
        }
    }

    /// Serves the signed identity document from now on (`dynamic/instance-identity/*`).
    pub fn with_signer(self, signer: Arc<DocumentSigner>) -> Self {
        match self.state.signer.write() {
            Ok(mut s) => *s = Some(signer),
            Err(poisoned) => *poisoned.into_inner() = Some(signer),
        }
        self
    }

    /// Stops serving and waits for the listener to close.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }
}

fn router(state: ImdsState) -> Router {
    Router::new()
        .route("/latest/api/token", put(issue_token))
        .route("/latest/meta-data/", get(metadata_index))
        .route("/latest/meta-data/{*path}", get(metadata))
        .route(
            "/latest/dynamic/instance-identity/{which}",
            get(identity_document),
        )
        .with_state(state)
}

async fn issue_token(State(state): State<ImdsState>, headers: HeaderMap) -> Response {
    if headers.contains_key("x-forwarded-for") {
        return (StatusCode::FORBIDDEN, "Forbidden").into_response();
    }
    let ttl = headers
        .get(TOKEN_TTL_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|ttl| (1..=MAX_TOKEN_TTL_SECONDS).contains(ttl));
    let Some(ttl) = ttl else {
        return (StatusCode::BAD_REQUEST, "Bad Request").into_response();
    };
    let token = format!("AQAE{}", uuid::Uuid::new_v4().simple());
    {
        let mut tokens = match state.tokens.write() {
            Ok(t) => t,
            Err(poisoned) => poisoned.into_inner(),
        };
        let now = Instant::now();
        tokens.expiry_by_token.retain(|_, expiry| *expiry > now);
        tokens
            .expiry_by_token
            .insert(token.clone(), now + Duration::from_secs(ttl));
    }
    let mut response = token.into_response();
    if let Ok(value) = HeaderValue::from_str(&ttl.to_string()) {
        response.headers_mut().insert(TOKEN_TTL_HEADER, value);
    }
    response
}

fn authorized(state: &ImdsState, headers: &HeaderMap) -> bool {
    let Some(token) = headers.get(TOKEN_HEADER).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let tokens = match state.tokens.read() {
        Ok(t) => t,
        Err(poisoned) => poisoned.into_inner(),
    };
    tokens
        .expiry_by_token
        .get(token)
        .is_some_and(|expiry| *expiry > Instant::now())
}

async fn metadata_index(state: State<ImdsState>, headers: HeaderMap) -> Response {
    metadata(state, headers, Path(String::new())).await
}

async fn metadata(
    State(state): State<ImdsState>,
    headers: HeaderMap,
    Path(path): Path<String>,
) -> Response {
    if !authorized(&state, &headers) {
        return (StatusCode::UNAUTHORIZED, "Unauthorized").into_response();
    }
    let identity = match state.identity.read() {
        Ok(i) => i.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    };
    match identity.lookup(&path) {
        Some(value) => value.into_response(),
        None => (StatusCode::NOT_FOUND, "Not Found").into_response(),
    }
}

/// `dynamic/instance-identity/document` and `.../signature` (404 without a signer).
async fn identity_document(
    State(state): State<ImdsState>,
    headers: HeaderMap,
    Path(which): Path<String>,
) -> Response {
    if !authorized(&state, &headers) {
        return (StatusCode::UNAUTHORIZED, "Unauthorized").into_response();
    }
    let signer = match state.signer.read() {
        Ok(s) => s.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    };
    let identity = match state.identity.read() {
        Ok(i) => i.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    };
    let Some(signer) = signer else {
        return (StatusCode::NOT_FOUND, "Not Found").into_response();
    };
    let document = DocumentSigner::document(&identity);
    match which.as_str() {
        "document" => document.into_response(),
        "signature" => match signer.sign(&document) {
            Ok(signature) => signature.into_response(),
            Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "cannot sign").into_response(),
        },
        _ => (StatusCode::NOT_FOUND, "Not Found").into_response(),
    }
}
