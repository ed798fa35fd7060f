//! Who is asking: Auth0 access tokens (RS256 JWTs) verified against the issuer's JWKS, and the
//! bearer-token parser. Both services use this one verifier (the host on `json_transport`, the
//! scaling service on `/mandelbox/assign` and its json_transport forwarder); each sets its own
//! [`JwksConfig`] and keeps its own claim checks on the returned subject.
//!
//! - Only RS256 is accepted; the key is chosen by the token's `kid`; `exp`, `sub`, `aud` and
//!   `iss` are required, `exp` and `nbf` are checked with [`JwksConfig::leeway`].
//! - The JWKS is fetched with timeouts and a size limit and cached. Only RSA keys with a `kid`
//!   whose `use` (if any) is `sig` and whose `alg` (if any) is `RS256` are kept. A fetch that
//!   yields no usable key keeps the old keys (an issuer's bad answer must not log everyone out).
//! - [`JwksVerifier::keep_fresh`] refetches every [`JwksConfig::refresh_period`], so a key the
//!   issuer revoked stops being accepted within that period; a token naming an unknown `kid`
//!   also triggers a fetch, at most once per [`JwksConfig::min_refresh_interval`] (failed ones
//!   included), so tokens with made-up `kid`s cannot turn a service into a JWKS flood.
//! - Until the first fetch succeeds, tokens are refused with [`AuthError::KeysUnavailable`]
//!   (the service's fault: 503), and the service keeps trying.

use std::collections::HashMap;
use std::sync::{Arc, RwLock, RwLockReadGuard};
use std::time::Duration;

use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;

/// Connecting to the issuer: Auth0 answers in well under a second; a service that cannot reach
/// it in 2 s will retry rather than hold requests.
pub const JWKS_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// The whole JWKS request (a request waiting on a refetch waits this long at most).
pub const JWKS_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// A JWKS holds a handful of keys (a few KiB); anything much larger is not one.
pub const MAX_JWKS_BYTES: usize = 256 * 1024;
/// The cached keys are fetched again this often, as in the original (keyfunc's hourly refresh):
/// the longest a key the issuer revoked is still accepted.
pub const JWKS_REFRESH_PERIOD: Duration = Duration::from_secs(3600);
/// Default least time between two fetches caused by unknown `kid`s: Auth0 rotates keys rarely,
/// and a new key is picked up within this delay.
pub const DEFAULT_MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(30);
/// Retries of a failed scheduled fetch: 1 s doubling to 60 s, for as long as the service runs
/// (without keys every request is refused, so giving up helps no one). No jitter, as before the
/// two verifiers were one: the scheduled fetches of a fleet are already spread by start times.
pub const FETCH_RETRY: Backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));

/// Who issues the tokens a service accepts, and how it keeps their keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwksConfig {
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
    /// How often [`JwksVerifier::keep_fresh`] fetches the keys again.
    pub refresh_period: Duration,
    /// Tokens longer than this are refused before any parsing (Auth0's are ~1 KiB).
    pub max_token_bytes: usize,
    /// The `User-Agent` of JWKS fetches, naming the service.
    pub user_agent: String,
}

/// Why a token was refused, or could not be checked. Never carries the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no access token: send Authorization: Bearer <token>")]
    Missing,
    #[error("the Authorization header is not `Bearer <token>`")]
    MalformedHeader,
    #[error("invalid access token: {0}")]
    Invalid(String),
    #[error("the access token's signing key is unknown")]
    UnknownKey,
    /// The keys have never been fetched (the issuer is unreachable): the service's fault, 503.
    #[error("the token signing keys are not available yet")]
    KeysUnavailable,
}

/// A JWKS fetch that failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot fetch the JWKS from {url}: {reason}")]
pub struct FetchError {
    pub url: String,
    pub reason: String,
}

/// The token of an `Authorization` header value: `<scheme> <token>` with the scheme `Bearer`
/// in any case (RFC 7235 §2.1: auth schemes are case-insensitive) and spaces around the token
/// ignored.
pub fn bearer_token(header: &[u8]) -> Result<&str, AuthError> {
    let text = std::str::from_utf8(header).map_err(|_| AuthError::MalformedHeader)?;
    let (scheme, token) = text
        .trim()
        .split_once(' ')
        .ok_or(AuthError::MalformedHeader)?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(AuthError::MalformedHeader);
    }
    Ok(token)
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
}

#[derive(Deserialize)]
struct KeySetDocument {
    keys: Vec<serde_json::Value>,
}

#[derive(Default)]
struct Keys {
    by_kid: HashMap<String, Arc<DecodingKey>>,
    fetched_at: Option<Instant>,
}

/// Verifies tokens; shared by every request.
pub struct JwksVerifier {
    config: JwksConfig,
    validation: Validation,
    http: reqwest::Client,
    keys: RwLock<Keys>,
    /// The last fetch attempt; held during a fetch so concurrent requests wait for one fetch.
    last_fetch: tokio::sync::Mutex<Option<Instant>>,
}

impl std::fmt::Debug for JwksVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwksVerifier")
            .field("config", &self.config)
            .field("keys", &self.key_count())
            .finish()
    }
}

impl JwksVerifier {
    pub fn new(config: JwksConfig) -> Result<Self, FetchError> {
        // Only aws-lc-rs is compiled in, so this is what jsonwebtoken would pick anyway; naming
        // it keeps another crate's features from changing that choice behind our back.
        let _ = jsonwebtoken::crypto::aws_lc::DEFAULT_PROVIDER.install_default();
        let fetch_error = |reason: String| FetchError {
            url: config.jwks_url.to_string(),
            reason,
        };
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| fetch_error(e.to_string()))?
            .with_root_certificates(rustls::RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            })
            .with_no_client_auth();
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .connect_timeout(JWKS_CONNECT_TIMEOUT)
            .timeout(JWKS_REQUEST_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(config.user_agent.clone())
            .build()
            .map_err(|e| fetch_error(e.to_string()))?;
        let mut validation = Validation::new(Algorithm::RS256);
        validation.set_audience(&[&config.audience]);
        validation.set_issuer(&[&config.issuer]);
        validation.set_required_spec_claims(&["exp", "sub", "aud", "iss"]);
        validation.validate_exp = true;
        // Off by default in jsonwebtoken: a token whose `nbf` is ahead is not valid yet.
        validation.validate_nbf = true;
        validation.leeway = config.leeway.as_secs();
        Ok(Self {
            config,
            validation,
            http,
            keys: RwLock::new(Keys::default()),
            last_fetch: tokio::sync::Mutex::new(None),
        })
    }

    pub fn config(&self) -> &JwksConfig {
        &self.config
    }

    /// How many signing keys are cached.
    pub fn key_count(&self) -> usize {
        self.read_keys().by_kid.len()
    }

    fn read_keys(&self) -> RwLockReadGuard<'_, Keys> {
        match self.keys.read() {
            Ok(keys) => keys,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn key(&self, kid: &str) -> Option<Arc<DecodingKey>> {
        self.read_keys().by_kid.get(kid).cloned()
    }

    /// Verifies `token` and returns its subject (`sub`), for the caller's own checks.
    pub async fn verify(&self, token: &str) -> Result<String, AuthError> {
        if token.len() > self.config.max_token_bytes {
            return Err(AuthError::Invalid("too long".into()));
        }
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| AuthError::Invalid(format!("malformed: {e}")))?;
        if header.alg != Algorithm::RS256 {
            return Err(AuthError::Invalid(format!(
                "algorithm {:?} is not accepted, only RS256",
                header.alg
            )));
        }
        let kid = header
            .kid
            .ok_or_else(|| AuthError::Invalid("the header has no kid".into()))?;
        let key = match self.key(&kid) {
            Some(key) => key,
            None => {
                self.refresh_if_due().await;
                match self.key(&kid) {
                    Some(key) => key,
                    None if self.read_keys().fetched_at.is_none() => {
                        return Err(AuthError::KeysUnavailable);
                    }
                    None => return Err(AuthError::UnknownKey),
                }
            }
        };
        let claims = jsonwebtoken::decode::<Claims>(token, &key, &self.validation)
            .map_err(|e| AuthError::Invalid(describe(e.kind())))?
            .claims;
        Ok(claims.sub)
    }

    /// Fetches the keys unless a fetch was attempted less than `min_refresh_interval` ago
    /// (attempts, not successes: while the issuer is down, a flood of tokens must not become a
    /// flood of fetches); concurrent callers wait for the one fetch.
    async fn refresh_if_due(&self) {
        let mut last = self.last_fetch.lock().await;
        if last.is_some_and(|at| at.elapsed() < self.config.min_refresh_interval) {
            return;
        }
        *last = Some(Instant::now());
        if let Err(error) = self.fetch().await {
            tracing::warn!(%error, "JWKS refresh for an unknown kid failed");
        }
    }

    /// Fetches the JWKS now and replaces the cached keys; returns how many were usable. A
    /// document without a usable key is an error and keeps the old keys.
    pub async fn fetch(&self) -> Result<usize, FetchError> {
        let url = self.config.jwks_url.clone();
        let error = |reason: String| FetchError {
            url: url.to_string(),
            reason,
        };
        let mut response = self
            .http
            .get(url.clone())
            .send()
            .await
            .map_err(|e| error(crate::error_chain(&e)))?;
        if !response.status().is_success() {
            return Err(error(format!("status {}", response.status())));
        }
        if response
            .content_length()
            .is_some_and(|n| n > MAX_JWKS_BYTES as u64)
        {
            return Err(error(format!("larger than {MAX_JWKS_BYTES} bytes")));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| error(crate::error_chain(&e)))?
        {
            if body.len() + chunk.len() > MAX_JWKS_BYTES {
                return Err(error(format!("larger than {MAX_JWKS_BYTES} bytes")));
            }
            body.extend_from_slice(&chunk);
        }
        let (by_kid, skipped) = signing_keys(&body).map_err(error)?;
        if by_kid.is_empty() {
            return Err(error(format!(
                "no usable RS256 signing key ({skipped} skipped)"
            )));
        }
        let usable = by_kid.len();
        let mut keys = match self.keys.write() {
            Ok(keys) => keys,
            Err(poisoned) => poisoned.into_inner(),
        };
        *keys = Keys {
            by_kid,
            fetched_at: Some(Instant::now()),
        };
        drop(keys);
        tracing::info!(keys = usable, skipped, url = %url, "JWKS fetched");
        Ok(usable)
    }

    /// Keeps the keys fresh until `shutdown`: fetches now (retrying with [`FETCH_RETRY`] until
    /// it works), then every [`JwksConfig::refresh_period`]; a failed refresh keeps the old
    /// keys and is retried with the same backoff.
    pub async fn keep_fresh(self: Arc<Self>, shutdown: CancellationToken) {
        let mut retries = FETCH_RETRY.start();
        loop {
            let result = {
                let mut last = self.last_fetch.lock().await;
                *last = Some(Instant::now());
                self.fetch().await
            };
            let wait = match result {
                Ok(_) => {
                    retries.reset();
                    self.config.refresh_period
                }
                Err(error) => {
                    // FETCH_RETRY has no deadline: a delay is always handed out.
                    let delay = retries.next_delay().unwrap_or(FETCH_RETRY.cap);
                    tracing::warn!(%error, retry_in_ms = delay.as_millis() as u64, "JWKS fetch failed");
                    delay
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }
}

/// The RS256 signing keys of a JWKS document by `kid`, and how many entries were skipped
/// (other key types or uses, no `kid`, malformed). One bad entry does not spoil the others.
fn signing_keys(body: &[u8]) -> Result<(HashMap<String, Arc<DecodingKey>>, usize), String> {
    let document: KeySetDocument =
        serde_json::from_slice(body).map_err(|e| format!("not a JWKS: {e}"))?;
    let mut by_kid = HashMap::new();
    let mut skipped = 0;
    for entry in document.keys {
        let Ok(jwk) = serde_json::from_value::<Jwk>(entry) else {
            skipped += 1;
            continue;
        };
        let usable = matches!(jwk.algorithm, AlgorithmParameters::RSA(_))
            && matches!(
                jwk.common.public_key_use,
                None | Some(PublicKeyUse::Signature)
            )
            && matches!(jwk.common.key_algorithm, None | Some(KeyAlgorithm::RS256));
        let (true, Some(kid)) = (usable, jwk.common.key_id.clone()) else {
            skipped += 1;
            continue;
        };
        match DecodingKey::from_jwk(&jwk) {
            Ok(key) => {
                by_kid.insert(kid, Arc::new(key));
            }
            Err(_) => skipped += 1,
        }
    }
    Ok((by_kid, skipped))
}

/// A short reason for a refused token (never the token itself).
fn describe(kind: &jsonwebtoken::errors::ErrorKind) -> String {
    use jsonwebtoken::errors::ErrorKind;
    match kind {
        ErrorKind::InvalidSignature => "bad signature".into(),
        ErrorKind::ExpiredSignature => "expired".into(),
        ErrorKind::ImmatureSignature => "not valid yet (nbf)".into(),
        ErrorKind::InvalidAudience => "wrong audience".into(),
        ErrorKind::InvalidIssuer => "wrong issuer".into(),
        ErrorKind::InvalidAlgorithm => "wrong algorithm".into(),
        ErrorKind::MissingRequiredClaim(claim) => format!("missing claim {claim}"),
        ErrorKind::InvalidClaimFormat(claim) => format!("malformed claim {claim}"),
        ErrorKind::InvalidToken => "malformed".into(),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_taken_from_the_header() {
        assert_eq!(bearer_token(b"Bearer abc.def.ghi"), Ok("abc.def.ghi"));
        assert_eq!(bearer_token(b"bearer   t "), Ok("t"));
        assert_eq!(bearer_token(b"BEARER t"), Ok("t"));
        for bad in [
            &b"Basic dXNlcg=="[..],
            b"Bearer",
            b"Bearer ",
            b"",
            b"t",
            b"\xff\xfe",
            b"\xff t",
        ] {
            assert_eq!(bearer_token(bad), Err(AuthError::MalformedHeader));
        }
    }

    #[test]
    fn only_rs256_signing_keys_with_a_kid_are_kept() {
        let n = "sXchDaQebHnPiGvyDOAT4saGEUetSyo9MKLOoWFsueri23bOdgWp4Dy1WlUzewbgBHod5pcM9H95GQRV3JDXboIRROSBigeC5yjU1hGzHHyXss8UDprecbAYxknTcQkhslANGRUZmdTOQ5qTRsLAt6BTYuyvVRdhS8exSZEy_c4gs_7svlJJQ4H9_NxsiIoLwAEk7-Q3UXERGYw_75IDrGA84-lA_-Ct4eTlXHBIY2EaV7t7LjJaynVJCpkv4LKjTTAumiGUIuQhrNhZLuF_RJLqHpM2kgWFLU7-VTdL1VbC2tejvcI2BlMkEpk1BzBZI0KQB0GaDWFLN-aEAw3vRw";
        let document = serde_json::json!({"keys": [
            {"kty": "RSA", "kid": "good", "use": "sig", "alg": "RS256", "n": n, "e": "AQAB"},
            {"kty": "RSA", "kid": "enc", "use": "enc", "n": n, "e": "AQAB"},
            {"kty": "RSA", "use": "sig", "n": n, "e": "AQAB"},
            {"kty": "EC", "kid": "ec", "crv": "P-256", "x": "AA", "y": "AA"},
            {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
            {"kty": "RSA", "kid": "weird-alg", "alg": "RS-NOPE", "n": n, "e": "AQAB"},
            "not an object",
        ]});
        let (keys, skipped) = signing_keys(document.to_string().as_bytes()).unwrap();
        assert_eq!(keys.keys().collect::<Vec<_>>(), ["good"]);
        assert_eq!(skipped, 6);
        assert!(signing_keys(b"[]").is_err());
        assert!(signing_keys(b"{\"keys\": 5}").is_err());
    }

    fn verifier() -> JwksVerifier {
        JwksVerifier::new(JwksConfig {
            issuer: "https://issuer.example/".into(),
            audience: "https://api.fractal.co".into(),
            // Nothing listens on port 9 (discard): fetches fail at once.
            jwks_url: url::Url::parse("http://127.0.0.1:9/.well-known/jwks.json").unwrap(),
            leeway: Duration::from_secs(30),
            min_refresh_interval: DEFAULT_MIN_REFRESH_INTERVAL,
            refresh_period: JWKS_REFRESH_PERIOD,
            max_token_bytes: 16 * 1024,
            user_agent: "edge-tests".into(),
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
    async fn malformed_tokens_and_other_algorithms_are_invalid() {
        let v = verifier();
        for token in [
            "",
            "a.b",
            "a.b.c",
            "....",
            // {"alg":"none"}
            "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ1In0.",
            // {"alg":"HS256","kid":"k"}: the key-confusion attack needs a symmetric algorithm
            "eyJhbGciOiJIUzI1NiIsImtpZCI6ImsifQ.eyJzdWIiOiJ1In0.c2ln",
            // {"alg":"RS256"} without a kid
            "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ1In0.c2ln",
        ] {
            assert!(
                matches!(v.verify(token).await, Err(AuthError::Invalid(_))),
                "{token:?}"
            );
        }
        let long = "a".repeat(v.config().max_token_bytes + 1);
        assert!(matches!(v.verify(&long).await, Err(AuthError::Invalid(_))));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_tokens_never_panic(token in "\\PC{0,200}") {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let v = verifier();
            let result = runtime.block_on(v.verify(&token));
            proptest::prop_assert!(result.is_err());
        }
    }
}
