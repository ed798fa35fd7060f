//! Authentication of json_transport requests: an Auth0 access token (RS256 JWT), verified
//! against the issuer's JWKS by the workspace's one verifier ([`edge::auth::JwksVerifier`]).
//!
//! - The token comes from `Authorization: Bearer` (the later original) or the body's
//!   `jwt_access_token` (the original at the reference commit).
//! - Only RS256 is accepted (the original pinned no algorithm); the key is chosen by the token's
//!   `kid`; `exp`, `sub`, `aud` and `iss` are required (the original accepted a token without
//!   `exp`), `exp` and `nbf` are checked with [`AuthConfig::leeway`]; the audience and issuer are
//!   the environment's; the `sub` must be a well-formed user id.
//! - The JWKS is fetched with timeouts and a size limit, cached, refreshed every hour and when a
//!   token names an unknown `kid` (at most once per [`AuthConfig::min_refresh_interval`], so
//!   tokens with made-up `kid`s cannot turn the host into a JWKS flood). The original exited when
//!   the first fetch failed; here the service starts anyway, answers 503 until the keys arrive,
//!   and keeps trying.
//! - The token's `sub` is returned; the endpoint compares it with the mandelbox's user.

use std::sync::Arc;
use std::time::Duration;

use dbclient::types::UserId;
use edge::auth::{JwksConfig, JwksVerifier};
use tokio_util::sync::CancellationToken;

pub use edge::auth::{
    AuthError, DEFAULT_MIN_REFRESH_INTERVAL, FetchError, JWKS_REFRESH_PERIOD, bearer_token,
};

/// Tokens longer than this are refused before any parsing (Auth0 access tokens are ~1 KiB).
const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// Who issues the tokens the endpoint accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthConfig {
    /// The `iss` claim, e.g. `https://auth.whist.com/`.
    pub issuer: String,
    /// A value the `aud` claim must contain, e.g. `https://api.fractal.co`.
    pub audience: String,
    /// Where the signing keys are, by default `<issuer>.well-known/jwks.json`.
    pub jwks_url: url::Url,
    /// Clock skew allowed on `exp` and `nbf`.
    pub leeway: Duration,
    /// Least time between two JWKS fetches caused by unknown `kid`s.
    pub min_refresh_interval: Duration,
}

/// Verifies tokens; shared by every request.
#[derive(Debug)]
pub struct Verifier {
    config: AuthConfig,
    jwks: Arc<JwksVerifier>,
}

impl Verifier {
    pub fn new(config: AuthConfig) -> Result<Self, FetchError> {
        let jwks = JwksVerifier::new(JwksConfig {
            issuer: config.issuer.clone(),
            audience: config.audience.clone(),
            jwks_url: config.jwks_url.clone(),
            leeway: config.leeway,
            min_refresh_interval: config.min_refresh_interval,
            refresh_period: JWKS_REFRESH_PERIOD,
            max_token_bytes: MAX_TOKEN_BYTES,
            user_agent: concat!("whist-host-service/", env!("CARGO_PKG_VERSION")).to_owned(),
        })?;
        Ok(Self {
            config,
            jwks: Arc::new(jwks),
        })
    }

    pub fn config(&self) -> &AuthConfig {
        &self.config
    }

    /// How many signing keys are cached.
    pub fn key_count(&self) -> usize {
        self.jwks.key_count()
    }

    /// Verifies `token` and returns its subject (the user).
    pub async fn verify(&self, token: &str) -> Result<UserId, AuthError> {
        let sub = self.jwks.verify(token).await?;
        UserId::new(&sub).map_err(|e| AuthError::Invalid(format!("sub: {e}")))
    }

    /// Fetches the JWKS now and replaces the cached keys; returns how many were usable.
    pub async fn fetch(&self) -> Result<usize, FetchError> {
        self.jwks.fetch().await
    }

    /// Keeps the keys fresh until `shutdown`: fetches now (retrying with backoff until it
    /// works), then every [`JWKS_REFRESH_PERIOD`]; a failed refresh keeps the old keys.
    pub async fn keep_fresh(self: Arc<Self>, shutdown: CancellationToken) {
        self.jwks.clone().keep_fresh(shutdown).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verifier() -> Verifier {
        Verifier::new(AuthConfig {
            issuer: "https://issuer.example/".into(),
            audience: "https://api.fractal.co".into(),
            // Nothing listens on port 9 (discard): fetches fail at once.
            jwks_url: url::Url::parse("http://127.0.0.1:9/.well-known/jwks.json").unwrap(),
            leeway: Duration::from_secs(30),
            min_refresh_interval: Duration::from_secs(30),
        })
        .unwrap()
    }

    #[tokio::test]
    async fn without_keys_tokens_are_refused_with_keys_unavailable() {
        let v = verifier();
        // header {"alg":"RS256","kid":"k"}, claims {"sub":"u"}, fake signature
        let token = "eyJhbGciOiJSUzI1NiIsImtpZCI6ImsifQ.eyJzdWIiOiJ1In0.c2ln";
        assert_eq!(v.verify(token).await, Err(AuthError::KeysUnavailable));
        assert!(v.fetch().await.is_err());
    }

    #[tokio::test]
    async fn tokens_over_the_hosts_limit_are_invalid() {
        let v = verifier();
        let long = "a".repeat(MAX_TOKEN_BYTES + 1);
        assert!(matches!(v.verify(&long).await, Err(AuthError::Invalid(_))));
    }
}
