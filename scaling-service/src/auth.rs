//! Who is asking: `POST /mandelbox/assign` carries an Auth0 access token (RS256 JWT) whose
//! `sub` is the user. [`TokenVerifier`] is the seam; [`JwksVerifier`] checks signature, expiry,
//! audience and issuer against the issuer's JWKS (fetched on a cache miss, at most every
//! `JWKS_MIN_REFRESH`); [`StaticVerifier`] is for tests and local development.
//!
//! Self-contained on purpose: the host service has its own verifier for `json_transport`, and
//! the two are to be unified later.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use dbclient::types::UserId;
use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

/// Longest token accepted (Auth0's are ~1 KB).
const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// A JWKS fetch is bounded: the assign request waits on it.
const JWKS_TIMEOUT: Duration = Duration::from_secs(5);
/// Unknown `kid`s do not make us hammer the issuer: one fetch attempt per this interval at most,
/// failed ones included (during an outage, tokens are refused with `KeysUnavailable` meanwhile).
const JWKS_MIN_REFRESH: Duration = Duration::from_secs(30);

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

#[derive(Debug, serde::Deserialize)]
struct Claims {
    sub: String,
}

#[derive(Default)]
struct Keys {
    by_kid: HashMap<String, Arc<DecodingKey>>,
    fetched_at: Option<tokio::time::Instant>,
}

/// RS256 tokens checked against a JWKS document.
pub struct JwksVerifier {
    jwks_url: url::Url,
    validation: Validation,
    http: reqwest::Client,
    keys: RwLock<Keys>,
    /// The last fetch attempt; held during a fetch so concurrent requests wait for one fetch.
    last_attempt: tokio::sync::Mutex<Option<tokio::time::Instant>>,
}

impl std::fmt::Debug for JwksVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwksVerifier")
            .field("jwks_url", &self.jwks_url.as_str())
            .finish_non_exhaustive()
    }
}

impl JwksVerifier {
    pub fn new(jwks_url: url::Url, audience: &str, issuer: &str) -> Result<Self, AuthError> {
        let _ = jsonwebtoken::crypto::aws_lc::DEFAULT_PROVIDER.install_default();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| AuthError::KeysUnavailable(e.to_string()))?
            .with_root_certificates(rustls::RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            })
            .with_no_client_auth();
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .timeout(JWKS_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| AuthError::KeysUnavailable(e.to_string()))?;
        let mut validation = Validation::new(Algorithm::RS256);
        validation.set_audience(&[audience]);
        validation.set_issuer(&[issuer]);
        validation.set_required_spec_claims(&["exp", "sub", "aud", "iss"]);
        // Off by default in jsonwebtoken: a token whose `nbf` is ahead is not valid yet.
        validation.validate_nbf = true;
        Ok(Self {
            jwks_url,
            validation,
            http,
            keys: RwLock::new(Keys::default()),
            last_attempt: tokio::sync::Mutex::new(None),
        })
    }

    fn key(&self, kid: &str) -> Option<Arc<DecodingKey>> {
        let keys = match self.keys.read() {
            Ok(k) => k,
            Err(poisoned) => poisoned.into_inner(),
        };
        keys.by_kid.get(kid).cloned()
    }

    async fn refresh(&self) -> Result<(), AuthError> {
        let mut last_attempt = self.last_attempt.lock().await;
        // Rate-limit attempts, not successes: while the issuer is down, a flood of tokens must
        // not become a flood of fetches.
        if last_attempt.is_some_and(|t| t.elapsed() < JWKS_MIN_REFRESH) {
            let keys = match self.keys.read() {
                Ok(k) => k,
                Err(poisoned) => poisoned.into_inner(),
            };
            return match keys.fetched_at {
                Some(_) => Ok(()),
                None => Err(AuthError::KeysUnavailable(
                    "the last JWKS fetch failed; the next is due within 30 s".into(),
                )),
            };
        }
        *last_attempt = Some(tokio::time::Instant::now());
        let unavailable = |e: reqwest::Error| AuthError::KeysUnavailable(e.to_string());
        let set: JwkSet = self
            .http
            .get(self.jwks_url.clone())
            .send()
            .await
            .map_err(unavailable)?
            .error_for_status()
            .map_err(unavailable)?
            .json()
            .await
            .map_err(unavailable)?;
        let by_kid = set
            .keys
            .iter()
            .filter(|k| matches!(k.algorithm, AlgorithmParameters::RSA(_)))
            .filter_map(|k| {
                let kid = k.common.key_id.clone()?;
                let key = DecodingKey::from_jwk(k).ok()?;
                Some((kid, Arc::new(key)))
            })
            .collect();
        let mut keys = match self.keys.write() {
            Ok(k) => k,
            Err(poisoned) => poisoned.into_inner(),
        };
        *keys = Keys {
            by_kid,
            fetched_at: Some(tokio::time::Instant::now()),
        };
        Ok(())
    }
}

#[async_trait::async_trait]
impl TokenVerifier for JwksVerifier {
    async fn verify(&self, token: &str) -> Result<UserId, AuthError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::Invalid("too long".into()));
        }
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| AuthError::Invalid(format!("malformed: {e}")))?;
        if header.alg != Algorithm::RS256 {
            return Err(AuthError::Invalid("only RS256 is accepted".into()));
        }
        let kid = header
            .kid
            .ok_or_else(|| AuthError::Invalid("no kid".into()))?;
        let key = match self.key(&kid) {
            Some(key) => key,
            None => {
                self.refresh().await?;
                self.key(&kid)
                    .ok_or_else(|| AuthError::Invalid("unknown signing key".into()))?
            }
        };
        let claims = jsonwebtoken::decode::<Claims>(token, &key, &self.validation)
            .map_err(|e| AuthError::Invalid(format!("{:?}", e.kind())))?
            .claims;
        UserId::new(claims.sub).map_err(|e| AuthError::Invalid(format!("sub: {e}")))
    }
}
