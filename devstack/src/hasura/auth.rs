//! Who a request is: Hasura's admin-secret and JWT modes (`HASURA_GRAPHQL_ADMIN_SECRET`,
//! `HASURA_GRAPHQL_JWT_SECRET`), with the error codes and messages Hasura's
//! `Hasura.Server.Auth` and `Hasura.Server.Auth.JWT` raise.
//!
//! - With an admin secret configured, a request carrying `x-hasura-admin-secret` must match
//!   it and is admin; it may act as another role with `x-hasura-role` and `x-hasura-*` headers.
//!   Without the header, JWT mode (when configured) decides; otherwise the request is refused.
//! - JWT mode: `Authorization: Bearer <jwt>`, RS256 signed by a key of the configured JWKS
//!   (`jwk_url`, fetched and re-fetched when a token names a `kid` it lacks) or the configured
//!   `key` (PEM). The Hasura claims sit in the object under `claims_namespace` (default
//!   `https://hasura.io/jwt/claims`): `x-hasura-allowed-roles`, `x-hasura-default-role` and the
//!   session variables. The role is `x-hasura-role` if the request names one, else the default;
//!   it must be an allowed role. `exp` is returned, so that a WebSocket ends when it passes.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use super::error::{GqlError, code};
use super::permissions::{SessionVariables, is_session_variable};

/// The role every admin-secret request without `x-hasura-role` has.
pub(crate) const ADMIN_ROLE: &str = "admin";
/// Hasura's default claims namespace.
pub const DEFAULT_CLAIMS_NAMESPACE: &str = "https://hasura.io/jwt/claims";
/// The shortest time between two JWKS fetches for unknown `kid`s.
const MIN_REFETCH_INTERVAL: Duration = Duration::from_secs(1);
const JWKS_FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// `HASURA_GRAPHQL_JWT_SECRET`, the part of it this stand-in supports.
#[derive(Debug, Clone, Deserialize)]
pub struct JwtSecret {
    /// `RS256` (the only type supported here).
    #[serde(rename = "type", default)]
    pub key_type: Option<String>,
    /// A PEM public key (`-----BEGIN PUBLIC KEY-----`).
    #[serde(default)]
    pub key: Option<String>,
    /// A JWKS URL.
    #[serde(default)]
    pub jwk_url: Option<String>,
    #[serde(default)]
    pub claims_namespace: Option<String>,
    #[serde(default)]
    pub audience: Option<String>,
    #[serde(default)]
    pub issuer: Option<String>,
    /// Seconds of clock skew tolerated on `exp` and `nbf` (Hasura's `allowed_skew`, default 0).
    #[serde(default)]
    pub allowed_skew: Option<u64>,
}

impl JwtSecret {
    /// Parses the JSON Hasura takes in `HASURA_GRAPHQL_JWT_SECRET`.
    pub fn parse(json: &str) -> Result<Self, String> {
        let secret: Self = serde_json::from_str(json).map_err(|e| e.to_string())?;
        if secret.key.is_none() == secret.jwk_url.is_none() {
            return Err("exactly one of 'key' and 'jwk_url' is expected".into());
        }
        if let Some(kind) = &secret.key_type
            && kind != "RS256"
        {
            return Err(format!("unsupported key type {kind}; RS256 is supported"));
        }
        Ok(secret)
    }
}

/// The request's identity: role and session variables, and when its token expires.
#[derive(Debug, Clone)]
pub(crate) struct Identity {
    pub vars: Arc<SessionVariables>,
    pub expires: Option<SystemTime>,
}

impl Identity {
    fn admin_with_headers(header: &dyn Fn(&str) -> Option<String>, names: &[String]) -> Self {
        let mut vars = BTreeMap::new();
        for name in names {
            if is_session_variable(name)
                && name != "x-hasura-admin-secret"
                && name != "x-hasura-access-key"
                && let Some(value) = header(name)
            {
                vars.insert(name.clone(), value);
            }
        }
        let role = header("x-hasura-role").unwrap_or_else(|| ADMIN_ROLE.to_owned());
        Self {
            vars: Arc::new(SessionVariables::new(role, vars)),
            expires: None,
        }
    }
}

/// Verifies JWTs against the configured key(s).
pub(crate) struct JwtVerifier {
    secret: JwtSecret,
    namespace: String,
    keys: RwLock<Keys>,
    http: reqwest::Client,
}

#[derive(Default)]
struct Keys {
    set: Vec<(Option<String>, DecodingKey)>,
    fetched: Option<Instant>,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("jwk_url", &self.secret.jwk_url)
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

fn invalid_jwt(detail: &str) -> GqlError {
    GqlError::new(
        code::INVALID_JWT,
        "$",
        format!("Could not verify JWT: {detail}"),
    )
}

impl JwtVerifier {
    pub fn new(secret: JwtSecret) -> Result<Self, String> {
        let mut keys = Keys::default();
        if let Some(pem) = &secret.key {
            keys.set
                .push((None, DecodingKey::from_rsa_der(&pem_der(pem)?)));
        }
        let http = reqwest::Client::builder()
            .timeout(JWKS_FETCH_TIMEOUT)
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self {
            namespace: secret
                .claims_namespace
                .clone()
                .unwrap_or_else(|| DEFAULT_CLAIMS_NAMESPACE.to_owned()),
            secret,
            keys: RwLock::new(keys),
            http,
        })
    }

    fn lookup(&self, kid: Option<&str>) -> Vec<DecodingKey> {
        let keys = match self.keys.read() {
            Ok(keys) => keys,
            Err(poisoned) => poisoned.into_inner(),
        };
        keys.set
            .iter()
            .filter(|(key_id, _)| kid.is_none() || key_id.is_none() || key_id.as_deref() == kid)
            .map(|(_, key)| key.clone())
            .collect()
    }

    /// Fetches the JWKS (`jwk_url` mode), at most once per [`MIN_REFETCH_INTERVAL`].
    async fn refresh(&self) {
        let Some(url) = &self.secret.jwk_url else {
            return;
        };
        {
            let keys = match self.keys.read() {
                Ok(keys) => keys,
                Err(poisoned) => poisoned.into_inner(),
            };
            if keys
                .fetched
                .is_some_and(|at| at.elapsed() < MIN_REFETCH_INTERVAL)
            {
                return;
            }
        }
        let fetched = async {
            let response = self.http.get(url).send().await.ok()?;
            if !response.status().is_success() {
                return None;
            }
            response.json::<JwkSet>().await.ok()
        }
        .await;
        let mut keys = match self.keys.write() {
            Ok(keys) => keys,
            Err(poisoned) => poisoned.into_inner(),
        };
        keys.fetched = Some(Instant::now());
        match fetched {
            Some(set) => {
                keys.set = set
                    .keys
                    .iter()
                    .filter_map(|jwk| {
                        DecodingKey::from_jwk(jwk)
                            .ok()
                            .map(|key| (jwk.common.key_id.clone(), key))
                    })
                    .collect();
            }
            None => tracing::warn!(url = %url, "could not fetch the JWKS"),
        }
    }

    /// The token's claims, verified (signature, `exp`, `nbf`, and `aud`/`iss` when configured).
    async fn verify(&self, token: &str) -> Result<serde_json::Value, GqlError> {
        if token.split('.').count() != 3 {
            return Err(invalid_jwt(&format!(
                "JWSError (CompactDecodeError Invalid number of parts: Expected 3 parts; got {})",
                token.split('.').count()
            )));
        }
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| invalid_jwt("JWSError (CompactDecodeError Invalid header)"))?;
        if header.alg != Algorithm::RS256 {
            return Err(invalid_jwt(
                "JWSError (AlgorithmMismatch \"no matching key\")",
            ));
        }
        let mut validation = Validation::new(Algorithm::RS256);
        validation.required_spec_claims.clear();
        validation.validate_nbf = true;
        validation.leeway = self.secret.allowed_skew.unwrap_or(0);
        match &self.secret.audience {
            Some(audience) => validation.set_audience(&[audience]),
            None => validation.validate_aud = false,
        }
        if let Some(issuer) = &self.secret.issuer {
            validation.set_issuer(&[issuer]);
        }
        let mut keys = self.lookup(header.kid.as_deref());
        if keys.is_empty() {
            self.refresh().await;
            keys = self.lookup(header.kid.as_deref());
        }
        let mut last = invalid_jwt("JWSError JWSInvalidSignature");
        for key in keys {
            match jsonwebtoken::decode::<serde_json::Value>(token, &key, &validation) {
                Ok(data) => return Ok(data.claims),
                Err(error) => {
                    use jsonwebtoken::errors::ErrorKind;
                    last = match error.kind() {
                        ErrorKind::ExpiredSignature => invalid_jwt("JWTExpired"),
                        ErrorKind::ImmatureSignature => invalid_jwt("JWTNotYetValid"),
                        ErrorKind::InvalidAudience => invalid_jwt("JWTNotInAudience"),
                        ErrorKind::InvalidIssuer => invalid_jwt("JWTNotInIssuer"),
                        ErrorKind::InvalidSignature => invalid_jwt("JWSError JWSInvalidSignature"),
                        _ => invalid_jwt("JWSError (CompactDecodeError Invalid token)"),
                    };
                    // A signature that fails with one key may verify with the next one.
                    if last.message != "Could not verify JWT: JWSError JWSInvalidSignature" {
                        return Err(last);
                    }
                }
            }
        }
        Err(last)
    }
}

/// The DER inside a PEM block (`-----BEGIN PUBLIC KEY-----`).
fn pem_der(pem: &str) -> Result<Vec<u8>, String> {
    use base64::Engine as _;
    let body: String = pem
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("-----"))
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .map_err(|e| format!("the key is not PEM: {e}"))
}

/// The session a request runs as. `header` looks headers up by lower-case name; `names` are
/// all header names present (lower-case), for collecting `x-hasura-*` session variables.
pub(crate) async fn authenticate(
    admin_secret: Option<&str>,
    jwt: Option<&JwtVerifier>,
    header: &(dyn Fn(&str) -> Option<String> + Sync),
    names: &[String],
) -> Result<Identity, GqlError> {
    let Some(expected) = admin_secret else {
        return Ok(Identity::admin_with_headers(header, names));
    };
    let given = header("x-hasura-admin-secret").or_else(|| header("x-hasura-access-key"));
    match (given, jwt) {
        (Some(given), _) => {
            if super::constant_time_eq(given.as_bytes(), expected.as_bytes()) {
                Ok(Identity::admin_with_headers(header, names))
            } else {
                Err(GqlError::new(
                    code::ACCESS_DENIED,
                    "$",
                    "invalid x-hasura-admin-secret/x-hasura-access-key",
                ))
            }
        }
        (None, Some(jwt)) => from_jwt(jwt, header).await,
        (None, None) => Err(GqlError::new(
            code::ACCESS_DENIED,
            "$",
            "x-hasura-admin-secret/x-hasura-access-key required, but not found",
        )),
    }
}

async fn from_jwt(
    jwt: &JwtVerifier,
    header: &(dyn Fn(&str) -> Option<String> + Sync),
) -> Result<Identity, GqlError> {
    let Some(authorization) = header("authorization") else {
        return Err(GqlError::new(
            code::INVALID_HEADERS,
            "$",
            "Missing 'Authorization' or 'Cookie' header in JWT authentication mode",
        ));
    };
    let token = match authorization
        .split_whitespace()
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["Bearer", token] => (*token).to_owned(),
        _ => {
            return Err(GqlError::new(
                code::INVALID_HEADERS,
                "$",
                "Malformed Authorization header",
            ));
        }
    };
    let claims = jwt.verify(&token).await?;
    let expires = claims
        .get("exp")
        .and_then(serde_json::Value::as_u64)
        .map(|secs| UNIX_EPOCH + Duration::from_secs(secs));
    let hasura = claims.get(&jwt.namespace).ok_or_else(|| {
        GqlError::new(
            code::JWT_INVALID_CLAIMS,
            "$",
            format!("claims key: '{}' not found", jwt.namespace),
        )
    })?;
    let hasura = hasura.as_object().ok_or_else(|| {
        GqlError::new(
            code::JWT_INVALID_CLAIMS,
            "$",
            "expecting a json object when claims_format is json",
        )
    })?;
    let mut claims_map: BTreeMap<String, serde_json::Value> = hasura
        .iter()
        .filter(|(k, _)| is_session_variable(k))
        .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
        .collect();
    let missing = |claim: &str| {
        GqlError::new(
            code::JWT_MISSING_ROLE_CLAIMS,
            "$",
            format!("JWT claim does not contain {claim}"),
        )
    };
    let allowed: Vec<String> = match claims_map.remove("x-hasura-allowed-roles") {
        None => return Err(missing("x-hasura-allowed-roles")),
        Some(serde_json::Value::Array(roles)) => roles
            .iter()
            .filter_map(|r| r.as_str().map(str::to_owned))
            .collect(),
        Some(_) => {
            return Err(GqlError::new(
                code::JWT_INVALID_CLAIMS,
                "$",
                "invalid x-hasura-allowed-roles; should be a list of roles",
            ));
        }
    };
    let default_role = match claims_map.remove("x-hasura-default-role") {
        None => return Err(missing("x-hasura-default-role")),
        Some(serde_json::Value::String(role)) => role,
        Some(_) => {
            return Err(GqlError::new(
                code::JWT_INVALID_CLAIMS,
                "$",
                "invalid x-hasura-default-role; should be a role",
            ));
        }
    };
    let role = header("x-hasura-role").unwrap_or(default_role);
    if !allowed.contains(&role) {
        return Err(GqlError::new(
            code::ACCESS_DENIED,
            "$",
            "Your requested role is not in allowed roles",
        ));
    }
    let vars = claims_map
        .into_iter()
        .map(|(k, v)| {
            let text = match v {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            };
            (k, text)
        })
        .collect();
    Ok(Identity {
        vars: Arc::new(SessionVariables::new(role, vars)),
        expires,
    })
}
