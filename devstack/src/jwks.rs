//! A stand-in for Auth0, the issuer of the users' access tokens: RSA signing keys it generates,
//! their public halves served as a JWKS at `/.well-known/jwks.json`, and RS256 tokens signed
//! with whatever claims a test chooses (expired, wrong audience, another user, another key...).
//!
//! Like Auth0: the JWKS lists every current key with `kty`, `use: sig`, `alg: RS256`, `kid`, `n`
//! and `e`; tokens carry `kid` in their header; the issuer is the base URL with a trailing slash.
//! For tests of the verifier's caching it also counts fetches, can add a key (rotation), and can
//! answer 503 (an outage). Never linked into a service.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::{KeyPair, KeySize, PublicKeyComponents};
use aws_lc_rs::signature::{KeyPair as _, RSA_PKCS1_SHA256};
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// The audience of Whist's access tokens, which the host service requires by default.
pub const AUDIENCE: &str = "https://api.fractal.co";
/// Lifetime of the tokens [`FakeJwks::claims`] describes (Auth0's default is a day; an hour is
/// plenty for a test).
pub const TOKEN_LIFETIME_SECONDS: i64 = 3600;

#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("cannot generate an RSA key")]
    KeyGeneration,
    #[error("cannot sign")]
    Signing,
    #[error("cannot serve the JWKS: {0}")]
    Io(#[from] std::io::Error),
}

/// One RSA-2048 signing key and its `kid`.
pub struct SigningKey {
    kid: String,
    pair: KeyPair,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .finish()
    }
}

impl SigningKey {
    pub fn generate(kid: &str) -> Result<Self, JwksError> {
        let pair = KeyPair::generate(KeySize::Rsa2048).map_err(|_| JwksError::KeyGeneration)?;
        Ok(Self {
            kid: kid.to_owned(),
            pair,
        })
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public key as a JWK, as Auth0 lists it.
    pub fn jwk(&self) -> Value {
        let public = PublicKeyComponents::<Vec<u8>>::from(self.pair.public_key());
        json!({
            "kty": "RSA",
            "use": "sig",
            "alg": "RS256",
            "kid": self.kid,
            "n": URL_SAFE_NO_PAD.encode(&public.n),
            "e": URL_SAFE_NO_PAD.encode(&public.e),
        })
    }

    /// An RS256 token with `claims`, its header naming this key.
    pub fn sign(&self, claims: &Value) -> Result<String, JwksError> {
        self.sign_with_header(
            &json!({"alg": "RS256", "typ": "JWT", "kid": self.kid}),
            claims,
        )
    }

    /// A token with any header (another `kid`, another `alg`), signed RS256 with this key.
    pub fn sign_with_header(&self, header: &Value, claims: &Value) -> Result<String, JwksError> {
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let mut signature = vec![0; self.pair.public_modulus_len()];
        self.pair
            .sign(
                &RSA_PKCS1_SHA256,
                &SystemRandom::new(),
                signing_input.as_bytes(),
                &mut signature,
            )
            .map_err(|_| JwksError::Signing)?;
        Ok(format!(
            "{signing_input}.{}",
            URL_SAFE_NO_PAD.encode(signature)
        ))
    }
}

#[derive(Debug)]
struct Keys {
    newest: Arc<SigningKey>,
    older: Vec<Arc<SigningKey>>,
}

#[derive(Debug)]
struct JwksState {
    keys: RwLock<Keys>,
    available: AtomicBool,
    fetches: AtomicUsize,
}

/// A running fake issuer on a loopback port. Stops when dropped.
#[derive(Debug)]
pub struct FakeJwks {
    addr: SocketAddr,
    state: Arc<JwksState>,
    shutdown: CancellationToken,
}

impl FakeJwks {
    /// Serves one fresh key (`kid` `test-key-1`) on a free loopback port.
    pub async fn start() -> Result<Self, JwksError> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        Self::serve(listener).await
    }

    /// Serves one fresh key on `listener`.
    pub async fn serve(listener: tokio::net::TcpListener) -> Result<Self, JwksError> {
        let addr = listener.local_addr()?;
        let key = tokio::task::spawn_blocking(|| SigningKey::generate("test-key-1"))
            .await
            .map_err(|_| JwksError::KeyGeneration)??;
        let state = Arc::new(JwksState {
            keys: RwLock::new(Keys {
                newest: Arc::new(key),
                older: Vec::new(),
            }),
            available: AtomicBool::new(true),
            fetches: AtomicUsize::new(0),
        });
        let app = Router::new()
            .route("/.well-known/jwks.json", get(jwks))
            .with_state(state.clone());
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(token.cancelled_owned())
                .await;
        });
        Ok(Self {
            addr,
            state,
            shutdown,
        })
    }

    /// `http://127.0.0.1:PORT/`: the `iss` of its tokens.
    pub fn issuer(&self) -> String {
        format!("http://{}/", self.addr)
    }

    /// `http://127.0.0.1:PORT/.well-known/jwks.json`
    pub fn jwks_url(&self) -> String {
        format!("{}.well-known/jwks.json", self.issuer())
    }

    /// The newest key.
    pub fn key(&self) -> Arc<SigningKey> {
        match self.state.keys.read() {
            Ok(keys) => keys.newest.clone(),
            Err(poisoned) => poisoned.into_inner().newest.clone(),
        }
    }

    /// Adds a new key (served from now on, alongside the old ones) and returns it.
    pub fn rotate(&self, kid: &str) -> Result<Arc<SigningKey>, JwksError> {
        let key = Arc::new(SigningKey::generate(kid)?);
        let mut keys = match self.state.keys.write() {
            Ok(keys) => keys,
            Err(poisoned) => poisoned.into_inner(),
        };
        let previous = std::mem::replace(&mut keys.newest, key.clone());
        keys.older.push(previous);
        Ok(key)
    }

    /// Stops serving the older key `kid`, as an issuer does when a key is revoked (the newest
    /// key cannot be revoked: rotate first). Returns whether such a key was served. Tokens it
    /// signed stay well-formed; a verifier must stop accepting them once it refetches.
    pub fn revoke(&self, kid: &str) -> bool {
        let mut keys = match self.state.keys.write() {
            Ok(keys) => keys,
            Err(poisoned) => poisoned.into_inner(),
        };
        let before = keys.older.len();
        keys.older.retain(|key| key.kid() != kid);
        keys.older.len() != before
    }

    /// While `false`, the JWKS answers 503, as during an outage.
    pub fn set_available(&self, available: bool) {
        self.state.available.store(available, Ordering::SeqCst);
    }

    /// How many times the JWKS was requested.
    pub fn fetches(&self) -> usize {
        self.state.fetches.load(Ordering::SeqCst)
    }

    /// Valid claims for `user`: this issuer, [`AUDIENCE`], issued now, expiring in an hour.
    pub fn claims(&self, user: &str) -> Value {
        let now = chrono::Utc::now().timestamp();
        json!({
            "iss": self.issuer(),
            "sub": user,
            "aud": [AUDIENCE, format!("{}userinfo", self.issuer())],
            "iat": now,
            "exp": now + TOKEN_LIFETIME_SECONDS,
            "scope": "openid profile email",
        })
    }

    /// A valid token for `user`, signed with the newest key.
    pub fn token(&self, user: &str) -> Result<String, JwksError> {
        self.key().sign(&self.claims(user))
    }

    pub fn stop(&self) {
        self.shutdown.cancel();
    }
}

impl Drop for FakeJwks {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn jwks(State(state): State<Arc<JwksState>>) -> Response {
    state.fetches.fetch_add(1, Ordering::SeqCst);
    if !state.available.load(Ordering::SeqCst) {
        return (StatusCode::SERVICE_UNAVAILABLE, "unavailable").into_response();
    }
    let keys: Vec<Value> = {
        let keys = match state.keys.read() {
            Ok(keys) => keys,
            Err(poisoned) => poisoned.into_inner(),
        };
        keys.older
            .iter()
            .chain(std::iter::once(&keys.newest))
            .map(|k| k.jwk())
            .collect()
    };
    axum::Json(json!({ "keys": keys })).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn serves_its_keys_and_signs_tokens_they_verify() {
        let jwks = FakeJwks::start().await.unwrap();
        let body: Value = reqwest::get(jwks.jwks_url())
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(body["keys"][0]["kid"], "test-key-1");
        assert_eq!(jwks.fetches(), 1);

        let token = jwks.token("auth0|alice").unwrap();
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(parts.len(), 3);
        let header: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
        assert_eq!(header["kid"], "test-key-1");
        let claims: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        assert_eq!(claims["sub"], "auth0|alice");
        assert_eq!(claims["iss"], jwks.issuer());

        // The signature verifies with the published key.
        let public = PublicKeyComponents::<Vec<u8>>::from(jwks.key().pair.public_key());
        let signature = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
        public
            .verify(
                &aws_lc_rs::signature::RSA_PKCS1_2048_8192_SHA256,
                format!("{}.{}", parts[0], parts[1]).as_bytes(),
                &signature,
            )
            .unwrap();

        let second = jwks.rotate("test-key-2").unwrap();
        assert_eq!(jwks.key().kid(), second.kid());
        jwks.set_available(false);
        let status = reqwest::get(jwks.jwks_url()).await.unwrap().status();
        assert_eq!(status, 503);
        jwks.set_available(true);
        let body: Value = reqwest::get(jwks.jwks_url())
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(body["keys"].as_array().unwrap().len(), 2);

        assert!(
            !jwks.revoke("test-key-2"),
            "the newest key cannot be revoked"
        );
        assert!(jwks.revoke("test-key-1"));
        let body: Value = reqwest::get(jwks.jwks_url())
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(body["keys"].as_array().unwrap().len(), 1);
        assert_eq!(body["keys"][0]["kid"], "test-key-2");
    }
}
