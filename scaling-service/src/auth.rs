//! Who is asking: `POST /mandelbox/assign` carries an Auth0 access token (RS256 JWT) whose
//! `sub` is the user. [`TokenVerifier`] is the seam; [`JwksVerifier`] is the workspace's one
//! JWKS verifier ([`edge::auth::JwksVerifier`], shared with the host service): signature,
//! expiry, `nbf`, audience and issuer checked against the issuer's JWKS, which is refetched
//! every [`JWKS_REFRESH_PERIOD`] by [`JwksVerifier::keep_fresh`] (so a revoked key stops being
//! accepted within it) and on an unknown `kid` (at most every [`JWKS_MIN_REFRESH`]), with a
//! size limit, and never emptied by a key set without a usable key. [`StaticVerifier`] is for
//! tests and local development.

use std::sync::Arc;
use std::time::Duration;

use dbclient::types::UserId;
use edge::auth::JwksConfig;
use tokio_util::sync::CancellationToken;

pub use edge::auth::JWKS_REFRESH_PERIOD;

/// Longest token accepted (Auth0's are ~1 KB).
const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// Unknown `kid`s do not make us hammer the issuer: one fetch attempt per this interval at most,
/// failed ones included (during an outage, tokens are refused with `KeysUnavailable` meanwhile).
pub const JWKS_MIN_REFRESH: Duration = Duration::from_secs(30);
/// Clock skew allowed on `exp` and `nbf`: jsonwebtoken's default, which this service has
/// always used.
const LEEWAY: Duration = Duration::from_secs(60);

/// Why a token was refused (never the token itself).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no bearer token")]
    Missing,
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("signing keys unavailable: {0}")]
    KeysUnavailable(String),
}

/// Verifies a bearer token and returns its user.
#[async_trait::async_trait]
pub trait TokenVerifier: Send + Sync + std::fmt::Debug {
    async fn verify(&self, token: &str) -> Result<UserId, AuthError>;
}

/// Accepts `user:<id>` tokens (tests, local development). Never used outside local envs.
#[derive(Debug, Clone, Default)]
pub struct StaticVerifier;

#[async_trait::async_trait]
impl TokenVerifier for StaticVerifier {
    async fn verify(&self, token: &str) -> Result<UserId, AuthError> {
        let user = token
            .strip_prefix("user:")
            .ok_or_else(|| AuthError::Invalid("not a test token".into()))?;
        UserId::new(user).map_err(|e| AuthError::Invalid(e.to_string()))
    }
}

/// RS256 tokens checked against a JWKS document.
#[derive(Debug, Clone)]
pub struct JwksVerifier {
    jwks: Arc<edge::auth::JwksVerifier>,
}

impl JwksVerifier {
    /// Refreshed every [`JWKS_REFRESH_PERIOD`] once [`JwksVerifier::keep_fresh`] runs.
    pub fn new(jwks_url: url::Url, audience: &str, issuer: &str) -> Result<Self, AuthError> {
        Self::with_refresh_period(jwks_url, audience, issuer, JWKS_REFRESH_PERIOD)
    }

    /// As [`JwksVerifier::new`], refreshing every `refresh_period` (tests shorten it).
    pub fn with_refresh_period(
        jwks_url: url::Url,
        audience: &str,
        issuer: &str,
        refresh_period: Duration,
    ) -> Result<Self, AuthError> {
        let jwks = edge::auth::JwksVerifier::new(JwksConfig {
            issuer: issuer.to_owned(),
            audience: audience.to_owned(),
            jwks_url,
            leeway: LEEWAY,
            min_refresh_interval: JWKS_MIN_REFRESH,
            refresh_period,
            max_token_bytes: MAX_TOKEN_BYTES,
            user_agent: concat!("whist-scaling-service/", env!("CARGO_PKG_VERSION")).to_owned(),
        })
        .map_err(|e| AuthError::KeysUnavailable(e.to_string()))?;
        Ok(Self {
            jwks: Arc::new(jwks),
        })
    }

    /// Keeps the keys fresh until `shutdown`: fetches now (retrying with backoff until it
    /// works), then every refresh period; a failed refresh keeps the old keys.
    pub async fn keep_fresh(self, shutdown: CancellationToken) {
        self.jwks.keep_fresh(shutdown).await;
    }
}

#[async_trait::async_trait]
impl TokenVerifier for JwksVerifier {
    async fn verify(&self, token: &str) -> Result<UserId, AuthError> {
        let sub = self.jwks.verify(token).await.map_err(AuthError::from)?;
        UserId::new(sub).map_err(|e| AuthError::Invalid(format!("sub: {e}")))
    }
}

impl From<edge::auth::AuthError> for AuthError {
    fn from(error: edge::auth::AuthError) -> Self {
        use edge::auth::AuthError as Edge;
        match error {
            Edge::Missing => Self::Missing,
            Edge::MalformedHeader => Self::Invalid(error.to_string()),
            Edge::Invalid(reason) => Self::Invalid(reason),
            Edge::UnknownKey => Self::Invalid("unknown signing key".into()),
            Edge::KeysUnavailable => Self::KeysUnavailable(
                "the JWKS has not been fetched yet; the next attempt is due within 30 s".into(),
            ),
        }
    }
}

/// The token of an `Authorization` header value (`Bearer`, any case).
pub fn bearer_token(header: &[u8]) -> Result<&str, AuthError> {
    edge::auth::bearer_token(header).map_err(AuthError::from)
}
