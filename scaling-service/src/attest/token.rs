//! The credentials attestation hands out: RS256 JWTs with Hasura's claims, signed with the
//! attestation key, whose public half (and the previous key's, during a rotation) is served as
//! a JWKS that Hasura is configured with (`HASURA_GRAPHQL_JWT_SECRET={"jwk_url": ...}`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::encoding::{AsDer, PublicKeyX509Der};
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::{KeyPair, PublicKeyComponents};
use aws_lc_rs::signature::{KeyPair as _, RSA_PKCS1_2048_8192_SHA256, RSA_PKCS1_SHA256};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::document::pem_block;

/// Hasura's default claims namespace.
pub const CLAIMS_NAMESPACE: &str = "https://hasura.io/jwt/claims";
/// The role every credential carries.
pub const HOST_ROLE: &str = "host";
/// The `iss` of every credential.
pub const ISSUER: &str = "whist-attest";

/// An RSA signing key, named by the SHA-256 of its public key (its `kid`).
pub struct SigningKey {
    kid: String,
    pair: KeyPair,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// A key from PKCS #8 (`-----BEGIN PRIVATE KEY-----`, as `openssl genpkey -algorithm RSA`
    /// writes it).
    pub fn from_pem(pem: &str) -> Result<Self, String> {
        let (label, der) = pem_block(pem)?;
        if label != "PRIVATE KEY" {
            return Err(format!("expected a PKCS #8 PRIVATE KEY, not {label}"));
        }
        let pair = KeyPair::from_pkcs8(&der).map_err(|e| format!("not an RSA key: {e}"))?;
        Ok(Self::from_pair(pair))
    }

    /// A fresh 2048-bit key (devstack and tests).
    pub fn generate() -> Result<Self, String> {
        let pair = KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048)
            .map_err(|_| "cannot generate an RSA key".to_owned())?;
        Ok(Self::from_pair(pair))
    }

    fn from_pair(pair: KeyPair) -> Self {
        let spki = pair
            .public_key()
            .as_der()
            .map(|der: PublicKeyX509Der<'_>| der.as_ref().to_vec())
            .unwrap_or_default();
        let digest = Sha256::digest(&spki);
        let kid = URL_SAFE_NO_PAD.encode(&digest[..16]);
        Self { kid, pair }
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The key in PKCS #8 PEM, for writing a generated key to a file.
    pub fn to_pem(&self) -> Result<String, String> {
        let der = self
            .pair
            .as_der()
            .map_err(|_| "cannot encode the key".to_owned())?;
        Ok(pem("PRIVATE KEY", der.as_ref()))
    }

    /// The public key's JWK (RS256, `use: sig`).
    pub fn jwk(&self) -> Value {
        let components: PublicKeyComponents<Vec<u8>> = self.pair.public_key().into();
        json!({
            "kty": "RSA",
            "use": "sig",
            "alg": "RS256",
            "kid": self.kid,
            "n": URL_SAFE_NO_PAD.encode(&components.n),
            "e": URL_SAFE_NO_PAD.encode(&components.e),
        })
    }

    /// A signed compact JWT of `claims`.
    pub fn sign(&self, claims: &Value) -> Result<String, String> {
        let header = json!({"alg": "RS256", "typ": "JWT", "kid": self.kid});
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let mut signature = vec![0; self.pair.public_modulus_len()];
        self.pair
            .sign(
                &RSA_PKCS1_SHA256,
                &SystemRandom::new(),
                input.as_bytes(),
                &mut signature,
            )
            .map_err(|_| "cannot sign".to_owned())?;
        Ok(format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature)))
    }

    /// The claims of `token` if this key signed it (expiry is the caller's business).
    pub fn verify(&self, token: &str) -> Option<Value> {
        let (input, signature) = token.rsplit_once('.')?;
        let (header, payload) = input.split_once('.')?;
        let header: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).ok()?).ok()?;
        if header["alg"] != "RS256" || header["kid"] != self.kid.as_str() {
            return None;
        }
        let signature = URL_SAFE_NO_PAD.decode(signature).ok()?;
        let spki = self.pair.public_key().as_der().ok()?;
        aws_lc_rs::signature::UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, spki.as_ref())
            .verify(input.as_bytes(), &signature)
            .ok()?;
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).ok()?).ok()
    }
}

fn pem(label: &str, der: &[u8]) -> String {
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let mut text = format!("-----BEGIN {label}-----\n");
    for chunk in body.as_bytes().chunks(64) {
        text.push_str(&String::from_utf8_lossy(chunk));
        text.push('\n');
    }
    text.push_str(&format!("-----END {label}-----\n"));
    text
}

/// A credential's claims: Hasura's under its namespace, the instance as `sub`, a fresh `jti`.
pub fn host_claims(instance_id: &str, jti: uuid::Uuid, now: SystemTime, ttl: Duration) -> Value {
    let iat = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    json!({
        "iss": ISSUER,
        "sub": instance_id,
        "jti": jti.to_string(),
        "iat": iat,
        "exp": iat + ttl.as_secs(),
        CLAIMS_NAMESPACE: {
            "x-hasura-allowed-roles": [HOST_ROLE],
            "x-hasura-default-role": HOST_ROLE,
            "x-hasura-instance-id": instance_id,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_verify_with_their_key_only_and_keys_survive_pem() {
        let key = SigningKey::generate().unwrap();
        let again = SigningKey::from_pem(&key.to_pem().unwrap()).unwrap();
        assert_eq!(again.kid(), key.kid());
        let claims = host_claims(
            "i-1",
            uuid::Uuid::new_v4(),
            SystemTime::now(),
            Duration::from_secs(60),
        );
        let token = key.sign(&claims).unwrap();
        assert_eq!(again.verify(&token), Some(claims.clone()));
        let other = SigningKey::generate().unwrap();
        assert_eq!(other.verify(&token), None);
        let tampered = token.replacen('.', ".e", 1);
        assert_eq!(key.verify(&tampered), None);
        assert_eq!(claims[CLAIMS_NAMESPACE]["x-hasura-instance-id"], "i-1");
        assert_eq!(key.jwk()["kid"], key.kid());
    }
}
