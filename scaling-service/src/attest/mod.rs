//! Host attestation (`whist-attest`, issue #14): a host proves it is an EC2 instance of this
//! deployment and gets a short-lived credential for Hasura that reaches only its own rows (the
//! `host` role of `database/hasura/metadata.json`). Modelled on SPIRE's `aws_iid` node attestor
//! and Vault's AWS auth method.
//!
//! `POST /host/attest` with `{"document": <IMDSv2 dynamic/instance-identity/document, as
//! served>, "signature": <dynamic/instance-identity/signature>}`:
//!
//! 1. the signature must verify with the configured key of the region the document names
//!    (AWS's published RSA certificate for that region; devstack's own key locally);
//! 2. EC2 must report the instance `running` with this deployment's tags
//!    (`whist-managed-by=whist-scaling-service`, `whist-env=<environment>`);
//! 3. trust on first use: if the instance already holds a live credential (its row in
//!    `whist.host_attestations`), the request must carry that credential as `Authorization:
//!    Bearer` (a renewal); a replayed document alone gets nothing until that credential has
//!    expired. A host renews before expiry with its current credential, and a restarted host
//!    renews with the credential it kept on disk (or waits out the old one's lifetime);
//! 4. the answer is `{"token", "expires_at", "expires_in"}`: an RS256 JWT with Hasura's claims
//!    (`x-hasura-allowed-roles: ["host"]`, `x-hasura-default-role: host`,
//!    `x-hasura-instance-id`) and a fresh `jti`, recorded as the instance's credential.
//!
//! `GET /host/jwks.json` serves the signing key's public half (and the previous key's during a
//! rotation): Hasura's `HASURA_GRAPHQL_JWT_SECRET={"type":"RS256","jwk_url":".../host/jwks.json"}`.
//!
//! Refusals are `403 {"error": "ATTESTATION_REFUSED", "message"}` (signature, instance, tags),
//! `409 {"error": "ALREADY_ATTESTED"}`, bad input `400 {"error": "BAD_REQUEST"}`, and an EC2 or
//! database outage `503 {"error": "UNAVAILABLE"}` (the host retries, as for a database
//! outage). Each refusal is logged with the instance id and the reason.

pub mod document;
pub mod token;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_sdk_ec2::config::{BehaviorVersion, Credentials, Region as SdkRegion};
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use dbclient::DbClient;
use dbclient::types::InstanceId;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::Mutex;

use crate::hosts::ec2::{MANAGED_BY, TAG_ENVIRONMENT, TAG_MANAGED_BY};
use document::{DocumentError, RegionKeys};
use token::{SigningKey, host_claims};

/// Default credential lifetime: hosts renew at half of it.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(15 * 60);
/// The largest request body (a document is about 500 bytes, its signature 350).
const MAX_BODY_BYTES: usize = 16 * 1024;

/// What the endpoint is built from.
#[derive(Debug)]
pub struct AttestConfig {
    pub region_keys: RegionKeys,
    pub signing_key: SigningKey,
    /// Served in the JWKS and accepted for renewals until retired (key rotation).
    pub previous_keys: Vec<SigningKey>,
    pub token_ttl: Duration,
    /// The `whist-env` tag an instance must carry.
    pub environment: String,
    /// `Some` for moto.
    pub ec2_endpoint: Option<String>,
    /// `(access key id, secret)`; `None`: the default credential chain.
    pub ec2_credentials: Option<(String, String)>,
}

/// The attestation endpoint's state.
pub struct Attestor {
    config: AttestConfig,
    db: DbClient,
    ec2: Mutex<HashMap<String, aws_sdk_ec2::Client>>,
}

impl std::fmt::Debug for Attestor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attestor")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Deserialize)]
struct AttestRequest {
    document: String,
    signature: String,
}

/// Why an attestation got no credential.
#[derive(Debug, thiserror::Error)]
pub enum AttestError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Refused(String),
    #[error("instance {0} already holds a live credential; renew with it")]
    AlreadyAttested(String),
    #[error("{0}")]
    Unavailable(String),
}

impl IntoResponse for AttestError {
    fn into_response(self) -> Response {
        let (status, code) = match &self {
            AttestError::BadRequest(_) => (StatusCode::BAD_REQUEST, "BAD_REQUEST"),
            AttestError::Refused(_) => (StatusCode::FORBIDDEN, "ATTESTATION_REFUSED"),
            AttestError::AlreadyAttested(_) => (StatusCode::CONFLICT, "ALREADY_ATTESTED"),
            AttestError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE"),
        };
        let body = json!({"error": code, "message": self.to_string()});
        (status, axum::Json(body)).into_response()
    }
}

/// A credential handed out.
#[derive(Debug, Clone)]
pub struct Credential {
    pub token: String,
    pub expires_at: chrono::DateTime<chrono::Utc>,
}

impl Attestor {
    pub fn new(config: AttestConfig, db: DbClient) -> Self {
        Self {
            config,
            db,
            ec2: Mutex::new(HashMap::new()),
        }
    }

    /// The JWKS Hasura verifies credentials with.
    pub fn jwks(&self) -> serde_json::Value {
        let keys: Vec<_> = std::iter::once(&self.config.signing_key)
            .chain(&self.config.previous_keys)
            .map(SigningKey::jwk)
            .collect();
        json!({ "keys": keys })
    }

    async fn ec2(&self, region: &str) -> aws_sdk_ec2::Client {
        let mut clients = self.ec2.lock().await;
        if let Some(client) = clients.get(region) {
            return client.clone();
        }
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(SdkRegion::new(region.to_owned()));
        if let Some(url) = &self.config.ec2_endpoint {
            loader = loader.endpoint_url(url);
        }
        if let Some((id, secret)) = &self.config.ec2_credentials {
            loader = loader.credentials_provider(Credentials::new(
                id.clone(),
                secret.clone(),
                None,
                None,
                "whist-static",
            ));
        }
        let client = aws_sdk_ec2::Client::new(&loader.load().await);
        clients.insert(region.to_owned(), client.clone());
        client
    }

    /// EC2 must know the instance as running and ours.
    async fn check_instance(&self, region: &str, instance_id: &str) -> Result<(), AttestError> {
        let answer = self
            .ec2(region)
            .await
            .describe_instances()
            .instance_ids(instance_id)
            .send()
            .await;
        let answer = match answer {
            Ok(answer) => answer,
            Err(error) => {
                let text = aws_sdk_ec2::error::DisplayErrorContext(&error).to_string();
                if text.contains("InvalidInstanceID") {
                    return Err(AttestError::Refused(format!(
                        "EC2 does not know instance {instance_id}"
                    )));
                }
                return Err(AttestError::Unavailable(format!(
                    "cannot ask EC2 about the instance: {text}"
                )));
            }
        };
        let instance = answer
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .find(|i| i.instance_id() == Some(instance_id))
            .ok_or_else(|| {
                AttestError::Refused(format!("EC2 does not know instance {instance_id}"))
            })?;
        let state = instance
            .state()
            .and_then(|s| s.name())
            .map(|n| n.as_str().to_owned())
            .unwrap_or_default();
        if state != "running" {
            return Err(AttestError::Refused(format!(
                "instance {instance_id} is {state}, not running"
            )));
        }
        let tag = |key: &str| {
            instance
                .tags()
                .iter()
                .find(|t| t.key() == Some(key))
                .and_then(|t| t.value())
        };
        if tag(TAG_MANAGED_BY) != Some(MANAGED_BY)
            || tag(TAG_ENVIRONMENT) != Some(self.config.environment.as_str())
        {
            return Err(AttestError::Refused(format!(
                "instance {instance_id} does not carry this deployment's tags \
                 ({TAG_MANAGED_BY}={MANAGED_BY}, {TAG_ENVIRONMENT}={})",
                self.config.environment
            )));
        }
        Ok(())
    }

    /// The `jti` of a credential this endpoint issued to `instance_id` (any of its keys).
    fn renewal(&self, bearer: &str, instance_id: &str) -> Result<uuid::Uuid, AttestError> {
        let claims = std::iter::once(&self.config.signing_key)
            .chain(&self.config.previous_keys)
            .find_map(|key| key.verify(bearer))
            .ok_or_else(|| AttestError::Refused("the presented credential is not ours".into()))?;
        if claims["sub"] != instance_id {
            return Err(AttestError::Refused(
                "the presented credential belongs to another instance".into(),
            ));
        }
        claims["jti"]
            .as_str()
            .and_then(|j| uuid::Uuid::parse_str(j).ok())
            .ok_or_else(|| AttestError::Refused("the presented credential has no id".into()))
    }

    /// Checks a document (and, for a renewal, the credential it is presented with) and hands
    /// out a credential.
    pub async fn attest(
        &self,
        document: &str,
        signature: &str,
        bearer: Option<&str>,
    ) -> Result<Credential, AttestError> {
        let parsed = self
            .config
            .region_keys
            .verify(document, signature)
            .map_err(|error| match error {
                DocumentError::Malformed(_) | DocumentError::SignatureEncoding => {
                    AttestError::BadRequest(error.to_string())
                }
                DocumentError::UnknownRegion(_) | DocumentError::BadSignature => {
                    AttestError::Refused(error.to_string())
                }
            })?;
        let instance = InstanceId::new(parsed.instance_id.clone())
            .map_err(|e| AttestError::BadRequest(format!("instance id: {e}")))?;
        let renewing = bearer
            .map(|b| self.renewal(b, &parsed.instance_id))
            .transpose()?;
        self.check_instance(&parsed.region, &parsed.instance_id)
            .await?;

        let jti = uuid::Uuid::new_v4();
        let now = SystemTime::now();
        let claims = host_claims(&parsed.instance_id, jti, now, self.config.token_ttl);
        let expires_at = chrono::DateTime::<chrono::Utc>::from(now + self.config.token_ttl);
        let claimed = self
            .db
            .claim_attestation(&instance, jti, expires_at, renewing)
            .await
            .map_err(|e| AttestError::Unavailable(format!("cannot record the credential: {e}")))?;
        if !claimed {
            return Err(AttestError::AlreadyAttested(parsed.instance_id));
        }
        let token = self
            .config
            .signing_key
            .sign(&claims)
            .map_err(AttestError::Unavailable)?;
        Ok(Credential { token, expires_at })
    }
}

async fn attest(
    State(attestor): State<Arc<Attestor>>,
    headers: HeaderMap,
    body: String,
) -> Response {
    if body.len() > MAX_BODY_BYTES {
        return AttestError::BadRequest(format!("the body is over {MAX_BODY_BYTES} bytes"))
            .into_response();
    }
    let request: AttestRequest = match serde_json::from_str(&body) {
        Ok(request) => request,
        Err(error) => {
            return AttestError::BadRequest(format!(
                "expected {{\"document\", \"signature\"}}: {error}"
            ))
            .into_response();
        }
    };
    let bearer = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match attestor
        .attest(&request.document, &request.signature, bearer)
        .await
    {
        Ok(credential) => {
            let expires_in = (credential.expires_at - chrono::Utc::now())
                .num_seconds()
                .max(0);
            tracing::info!(expires_in, renewal = bearer.is_some(), "host attested");
            axum::Json(json!({
                "token": credential.token,
                "expires_at": credential.expires_at.to_rfc3339(),
                "expires_in": expires_in,
            }))
            .into_response()
        }
        Err(error) => {
            let instance = serde_json::from_str::<serde_json::Value>(&request.document)
                .ok()
                .and_then(|d| d["instanceId"].as_str().map(str::to_owned))
                .unwrap_or_default();
            tracing::warn!(instance.id = %instance, reason = %error, "host attestation refused");
            error.into_response()
        }
    }
}

async fn jwks(State(attestor): State<Arc<Attestor>>) -> Response {
    let mut response = axum::Json(attestor.jwks()).into_response();
    // Hasura re-reads the JWKS when this passes (a rotation is seen within a minute).
    response.headers_mut().insert(
        axum::http::header::CACHE_CONTROL,
        axum::http::HeaderValue::from_static("max-age=60"),
    );
    response
}

/// `POST /host/attest`, `GET /host/jwks.json`, `GET /healthz`.
pub fn router(attestor: Arc<Attestor>) -> Router {
    Router::new()
        .route("/host/attest", post(attest))
        .route("/host/jwks.json", get(jwks))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(attestor)
}
