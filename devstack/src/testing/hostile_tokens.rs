//! Hostile bearer tokens (issue #7), shared by both services' JWT verifier property tests: the
//! scaling service's `JwksVerifier` (`scaling-service/tests/hostile_input.rs`) and the host
//! service's json_transport `Verifier` (`host-service/tests/hostile_tokens.rs`). Both are the one
//! `edge::auth::JwksVerifier` since #20; each service's own limits and claim checks differ, so
//! both are still tested.
//!
//! A [`Recipe`] is plain data (so proptest can shrink it); [`Forge::build`] turns it into a token
//! with devstack's fake Auth0 and says whether a correct verifier must accept it. Only one family
//! is genuinely valid: the issuer's current key, its `kid`, `RS256`, this issuer and audience,
//! unexpired, a well-formed `sub`, and the signature untouched (extra claims and header fields a
//! verifier ignores are allowed). Everything else must be refused.

// Test support: a forged token that cannot be built is a broken test, said at once.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use crate::jwks::{AUDIENCE, FakeJwks, SigningKey};
use proptest::prelude::*;
use serde_json::{Value, json};

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// Base64url without padding (the JWT encoding), so the test needs no base64 crate.
pub fn b64(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
        }
    }
    out
}

/// What is done to the header.
#[derive(Debug, Clone)]
pub enum HeaderMut {
    Good,
    /// Fields a verifier must ignore: `jku`/`x5u` pointing elsewhere, another `typ`, an unknown
    /// field. Still valid (the key comes from our JWKS, never from the token).
    Ignored(String),
    NoKid,
    UnknownKid(String),
    KidNotString(Value),
    NoAlg,
    /// `alg: none` and no signature.
    AlgNone,
    /// The key-confusion attack: HS256 with the issuer's public key material as the secret
    /// (0: the JWK's `n`, 1: the JWK as JSON, 2: the JWKS document).
    Hs256WithPublicKey(u8),
    /// Another `alg` name (signed RS256 all the same).
    OtherAlg(String),
    /// Signed by another RSA key that claims the issuer's `kid`.
    OtherKeySameKid,
    /// As above, and the other key embedded in the header (`jwk`).
    OtherKeyEmbedded,
    /// Not JSON at all.
    NotJson(Vec<u8>),
    /// Random JSON as the header.
    RandomJson(Value),
}

/// What is done to the claims.
#[derive(Debug, Clone)]
pub enum ClaimsMut {
    Good,
    /// An extra claim (named `x_...`): still valid.
    Extra(String, Value),
    /// `exp` this many seconds beyond an hour in the past (past any leeway).
    Expired(u32),
    /// `nbf` this many seconds beyond an hour in the future.
    NotYetValid(u32),
    Drop(&'static str),
    /// A claim set to a value of the wrong type.
    WrongType(&'static str, Value),
    WrongAud(String),
    AudArrayWithout(Vec<String>),
    WrongIss(String),
    BadSub(String),
    /// Claims that are not an object.
    NotObject(Value),
    /// Random claims, genuinely signed.
    Random(Value),
}

/// What is done to the signed token.
#[derive(Debug, Clone)]
pub enum SigMut {
    Good,
    /// One base64url character of the signature replaced (never the last one, whose low bits
    /// are padding).
    Flip(usize, u8),
    Truncate(usize),
    Empty,
    Random(Vec<u8>),
    /// The claims swapped for another user's after signing.
    SwapClaims,
    ExtraSegment(Vec<u8>),
    /// A space inside the signature.
    Space(usize),
}

#[derive(Debug, Clone)]
pub enum Recipe {
    /// Random bytes, lossily UTF-8.
    Bytes(Vec<u8>),
    /// Random printable text.
    Text(String),
    /// Random bytes as 1 to 5 base64url segments.
    Segments(Vec<Vec<u8>>),
    /// Random JSON header and claims, random signature.
    Json(Value, Value, Vec<u8>),
    /// The issuer's real parts, each possibly mutated.
    Signed {
        sub: String,
        header: HeaderMut,
        claims: ClaimsMut,
        sig: SigMut,
    },
    /// A valid token with this many bytes appended.
    HugeValid(usize),
    /// This many copies of one token character.
    HugeFill(usize, char),
}

impl Recipe {
    /// A genuinely valid token (for strategies that want more of them).
    pub fn valid(sub: String) -> Self {
        Recipe::Signed {
            sub,
            header: HeaderMut::Good,
            claims: ClaimsMut::Good,
            sig: SigMut::Good,
        }
    }
}

/// A built token and the user a correct verifier returns for it (`None`: must be refused).
#[derive(Debug, Clone)]
pub struct Forged {
    pub token: String,
    pub accept: Option<String>,
}

fn json_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f)
            .map(Value::Number)),
        "\\PC{0,24}".prop_map(Value::String),
    ]
}

/// Random JSON, keys biased towards the names that matter (`keys`).
pub fn json_value(keys: &'static [&'static str]) -> impl Strategy<Value = Value> {
    json_leaf().prop_recursive(4, 32, 6, move |inner| {
        let key = prop_oneof![
            prop::sample::select(keys).prop_map(str::to_owned),
            "\\PC{0,12}",
        ];
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(key, inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

const CLAIM_NAMES: &[&str] = &["iss", "sub", "aud", "exp", "nbf", "iat", "scope", "azp"];
const HEADER_NAMES: &[&str] = &[
    "alg", "kid", "typ", "jku", "jwk", "x5u", "x5c", "crit", "cty",
];

/// A well-formed user id, as Auth0 makes them.
pub fn sub() -> impl Strategy<Value = String> {
    "(auth0|google-oauth2)\\|[a-z0-9]{1,24}"
}

fn header_mut() -> impl Strategy<Value = HeaderMut> {
    let wrong_type = prop_oneof![
        Just(Value::Null),
        Just(json!(5)),
        Just(json!(true)),
        Just(json!(["test-key-1"])),
        Just(json!({"kid": "test-key-1"})),
    ];
    let alg = prop_oneof![
        Just("RS384".to_owned()),
        Just("RS512".to_owned()),
        Just("PS256".to_owned()),
        Just("ES256".to_owned()),
        Just("EdDSA".to_owned()),
        Just("HS256".to_owned()),
        Just("rs256".to_owned()),
        Just("RS256 ".to_owned()),
        Just(String::new()),
        "\\PC{0,12}",
    ];
    prop_oneof![
        6 => Just(HeaderMut::Good),
        2 => "[a-z]{1,10}".prop_map(HeaderMut::Ignored),
        1 => Just(HeaderMut::NoKid),
        2 => "\\PC{0,40}".prop_map(HeaderMut::UnknownKid),
        1 => wrong_type.prop_map(HeaderMut::KidNotString),
        1 => Just(HeaderMut::NoAlg),
        1 => Just(HeaderMut::AlgNone),
        2 => (0u8..3).prop_map(HeaderMut::Hs256WithPublicKey),
        1 => alg.prop_map(HeaderMut::OtherAlg),
        1 => Just(HeaderMut::OtherKeySameKid),
        1 => Just(HeaderMut::OtherKeyEmbedded),
        1 => prop::collection::vec(any::<u8>(), 0..64).prop_map(HeaderMut::NotJson),
        1 => json_value(HEADER_NAMES).prop_map(HeaderMut::RandomJson),
    ]
}

fn claims_mut() -> impl Strategy<Value = ClaimsMut> {
    let wrong_type = (
        prop::sample::select(&["sub", "exp", "aud", "iss", "nbf"][..]),
        prop_oneof![
            Just(Value::Null),
            Just(json!(true)),
            Just(json!({})),
            Just(json!([[]])),
            Just(json!("soon")),
            Just(json!(7)),
        ],
    )
        // Not wrong: a string `sub`, `nbf: 7` (long past), `nbf: null` (as good as absent).
        .prop_filter("a wrong type", |(claim, value)| {
            !matches!(
                (*claim, value),
                ("sub", Value::String(_)) | ("nbf", Value::Null | Value::Number(_))
            )
        })
        .prop_map(|(claim, value)| ClaimsMut::WrongType(claim, value));
    let bad_sub = prop_oneof![
        Just(String::new()),
        Just("   ".to_owned()),
        " [a-z]{1,8}",
        "[a-z]{1,8} ",
        "[a-z]{1,4}[\\x00-\\x1f\\x7f][a-z]{1,4}",
        "[a-z]{257,300}",
    ];
    prop_oneof![
        6 => Just(ClaimsMut::Good),
        2 => ("x_[a-z]{1,8}", json_value(CLAIM_NAMES))
            .prop_map(|(name, value)| ClaimsMut::Extra(name, value)),
        2 => (0u32..10_000_000).prop_map(ClaimsMut::Expired),
        1 => (0u32..10_000_000).prop_map(ClaimsMut::NotYetValid),
        2 => prop::sample::select(&["exp", "sub", "aud", "iss"][..]).prop_map(ClaimsMut::Drop),
        2 => wrong_type,
        1 => prop_oneof![
            Just(format!("{AUDIENCE}/")),
            Just(AUDIENCE.to_uppercase()),
            Just(String::new()),
            "\\PC{0,30}",
        ]
        .prop_map(ClaimsMut::WrongAud),
        1 => prop::collection::vec("\\PC{0,30}", 0..4).prop_map(ClaimsMut::AudArrayWithout),
        1 => "\\PC{0,30}".prop_map(ClaimsMut::WrongIss),
        2 => bad_sub.prop_map(ClaimsMut::BadSub),
        1 => json_leaf().prop_map(ClaimsMut::NotObject),
        1 => json_value(CLAIM_NAMES).prop_map(ClaimsMut::Random),
    ]
}

fn sig_mut() -> impl Strategy<Value = SigMut> {
    prop_oneof![
        6 => Just(SigMut::Good),
        2 => (any::<usize>(), any::<u8>()).prop_map(|(i, c)| SigMut::Flip(i, c)),
        1 => (1usize..400).prop_map(SigMut::Truncate),
        1 => Just(SigMut::Empty),
        1 => prop::collection::vec(any::<u8>(), 0..300).prop_map(SigMut::Random),
        1 => Just(SigMut::SwapClaims),
        1 => prop::collection::vec(any::<u8>(), 0..16).prop_map(SigMut::ExtraSegment),
        1 => any::<usize>().prop_map(SigMut::Space),
    ]
}

/// Every kind of token, valid ones included (about one in six).
pub fn recipe() -> impl Strategy<Value = Recipe> {
    prop_oneof![
        1 => prop::collection::vec(any::<u8>(), 0..400).prop_map(Recipe::Bytes),
        1 => "\\PC{0,300}".prop_map(Recipe::Text),
        1 => prop::collection::vec(prop::collection::vec(any::<u8>(), 0..200), 1..6)
            .prop_map(Recipe::Segments),
        1 => (
            json_value(HEADER_NAMES),
            json_value(CLAIM_NAMES),
            prop::collection::vec(any::<u8>(), 0..300),
        )
            .prop_map(|(h, c, s)| Recipe::Json(h, c, s)),
        2 => sub().prop_map(Recipe::valid),
        8 => (sub(), header_mut(), claims_mut(), sig_mut()).prop_map(
            |(sub, header, claims, sig)| Recipe::Signed {
                sub,
                header,
                claims,
                sig,
            }
        ),
        1 => (1usize..200_000).prop_map(Recipe::HugeValid),
        1 => (
            8_000usize..200_000,
            prop::sample::select(&['A', '.', '-', '_', '='][..])
        )
            .prop_map(|(n, c)| Recipe::HugeFill(n, c)),
    ]
}

/// Builds tokens with the fake issuer's key (and another key that pretends to be it).
#[derive(Debug)]
pub struct Forge {
    pub issuer: String,
    pub key: Arc<SigningKey>,
    pub impostor: SigningKey,
}

impl Forge {
    /// Keys of `jwks` as they are now; the impostor is generated here (RSA-2048, ~0.1 s).
    pub fn new(jwks: &FakeJwks) -> Self {
        let _ = jsonwebtoken::crypto::aws_lc::DEFAULT_PROVIDER.install_default();
        let key = jwks.key();
        let impostor = SigningKey::generate(key.kid()).expect("an RSA key");
        Self {
            issuer: jwks.issuer(),
            key,
            impostor,
        }
    }

    /// What [`FakeJwks::claims`] gives, without the `FakeJwks`.
    fn claims(&self, sub: &str) -> Value {
        let now = chrono::Utc::now().timestamp();
        json!({
            "iss": self.issuer,
            "sub": sub,
            "aud": [AUDIENCE, format!("{}userinfo", self.issuer)],
            "iat": now,
            "exp": now + crate::jwks::TOKEN_LIFETIME_SECONDS,
            "scope": "openid profile email",
        })
    }

    /// A valid token for `sub`.
    pub fn valid(&self, sub: &str) -> String {
        self.key.sign(&self.claims(sub)).expect("signed")
    }

    /// A token signed with the issuer's key and a `kid` the JWKS does not list.
    pub fn unknown_kid(&self, sub: &str, kid: &str) -> String {
        self.key
            .sign_with_header(&json!({"alg": "RS256", "kid": kid}), &self.claims(sub))
            .expect("signed")
    }

    pub fn build(&self, recipe: &Recipe) -> Forged {
        let refused = |token: String| Forged {
            token,
            accept: None,
        };
        match recipe {
            Recipe::Bytes(bytes) => refused(String::from_utf8_lossy(bytes).into_owned()),
            Recipe::Text(text) => refused(text.clone()),
            Recipe::Segments(parts) => {
                refused(parts.iter().map(|p| b64(p)).collect::<Vec<_>>().join("."))
            }
            Recipe::Json(header, claims, sig) => refused(format!(
                "{}.{}.{}",
                b64(header.to_string().as_bytes()),
                b64(claims.to_string().as_bytes()),
                b64(sig)
            )),
            Recipe::HugeValid(extra) => {
                let mut token = self.valid("auth0|huge");
                token.push_str(&"A".repeat(*extra));
                refused(token)
            }
            Recipe::HugeFill(n, c) => refused(c.to_string().repeat(*n)),
            Recipe::Signed {
                sub,
                header,
                claims,
                sig,
            } => self.signed(sub, header, claims, sig),
        }
    }

    fn signed(&self, sub: &str, header: &HeaderMut, claims: &ClaimsMut, sig: &SigMut) -> Forged {
        let kid = self.key.kid().to_owned();
        let now = chrono::Utc::now().timestamp();
        let mut c = self.claims(sub);
        match claims {
            ClaimsMut::Good => {}
            ClaimsMut::Extra(name, value) => c[name] = value.clone(),
            ClaimsMut::Expired(by) => c["exp"] = json!(now - 3600 - i64::from(*by)),
            ClaimsMut::NotYetValid(by) => c["nbf"] = json!(now + 3600 + i64::from(*by)),
            ClaimsMut::Drop(claim) => {
                if let Some(map) = c.as_object_mut() {
                    map.remove(*claim);
                }
            }
            ClaimsMut::WrongType(claim, value) => c[*claim] = value.clone(),
            ClaimsMut::WrongAud(aud) => c["aud"] = json!(aud),
            ClaimsMut::AudArrayWithout(auds) => c["aud"] = json!(auds),
            ClaimsMut::WrongIss(iss) => c["iss"] = json!(iss),
            ClaimsMut::BadSub(bad) => c["sub"] = json!(bad),
            ClaimsMut::NotObject(value) | ClaimsMut::Random(value) => c = value.clone(),
        }
        let mut h = json!({"alg": "RS256", "typ": "JWT", "kid": kid});
        let sign = |key: &SigningKey, h: &Value| key.sign_with_header(h, &c).expect("signed");
        let mut token = match header {
            HeaderMut::Good => sign(&self.key, &h),
            HeaderMut::Ignored(name) => {
                h["jku"] = json!("http://127.0.0.1:9/evil/jwks.json");
                h["x5u"] = json!("http://127.0.0.1:9/evil.pem");
                h["typ"] = json!("at+jwt");
                h[format!("x-{name}")] = json!(name);
                sign(&self.key, &h)
            }
            HeaderMut::NoKid => {
                if let Some(map) = h.as_object_mut() {
                    map.remove("kid");
                }
                sign(&self.key, &h)
            }
            HeaderMut::UnknownKid(other) => {
                h["kid"] = json!(other);
                sign(&self.key, &h)
            }
            HeaderMut::KidNotString(value) => {
                h["kid"] = value.clone();
                sign(&self.key, &h)
            }
            HeaderMut::NoAlg => {
                if let Some(map) = h.as_object_mut() {
                    map.remove("alg");
                }
                sign(&self.key, &h)
            }
            HeaderMut::AlgNone => {
                h["alg"] = json!("none");
                format!(
                    "{}.{}.",
                    b64(h.to_string().as_bytes()),
                    b64(c.to_string().as_bytes())
                )
            }
            HeaderMut::Hs256WithPublicKey(which) => {
                let jwk = self.key.jwk();
                let secret = match which {
                    0 => jwk["n"].as_str().unwrap_or_default().to_owned(),
                    1 => jwk.to_string(),
                    _ => json!({"keys": [jwk]}).to_string(),
                };
                let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
                header.kid = Some(kid.clone());
                jsonwebtoken::encode(
                    &header,
                    &c,
                    &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
                )
                .expect("HS256")
            }
            HeaderMut::OtherAlg(alg) => {
                h["alg"] = json!(alg);
                sign(&self.key, &h)
            }
            HeaderMut::OtherKeySameKid => sign(&self.impostor, &h),
            HeaderMut::OtherKeyEmbedded => {
                h["jwk"] = self.impostor.jwk();
                sign(&self.impostor, &h)
            }
            HeaderMut::NotJson(bytes) => format!(
                "{}.{}.{}",
                b64(bytes),
                b64(c.to_string().as_bytes()),
                b64(bytes)
            ),
            HeaderMut::RandomJson(value) => sign(&self.key, value),
        };
        let (signed_part, signature) = token
            .rsplit_once('.')
            .map(|(a, b)| (a.to_owned(), b.to_owned()))
            .unwrap_or_default();
        match sig {
            SigMut::Good => {}
            SigMut::Flip(i, c) => {
                let mut bytes = signature.into_bytes();
                if bytes.len() > 1 {
                    let at = i % (bytes.len() - 1);
                    let mut new = ALPHABET[usize::from(*c) % 64];
                    if new == bytes[at] {
                        new = ALPHABET[(usize::from(*c) + 1) % 64];
                    }
                    bytes[at] = new;
                } else {
                    bytes = b"AA".to_vec();
                }
                token = format!("{signed_part}.{}", String::from_utf8_lossy(&bytes));
            }
            SigMut::Truncate(n) => {
                let keep = signature.len().saturating_sub(*n);
                token = format!("{signed_part}.{}", &signature[..keep]);
            }
            SigMut::Empty => token = format!("{signed_part}."),
            SigMut::Random(bytes) => token = format!("{signed_part}.{}", b64(bytes)),
            SigMut::SwapClaims => {
                let header_part = signed_part.split('.').next().unwrap_or_default();
                let mut other = c.clone();
                match other.as_object_mut() {
                    Some(claims) => {
                        claims.insert("sub".into(), json!(format!("{sub}-not")));
                    }
                    None => other = json!({"sub": "auth0|someone-else"}),
                }
                token = format!(
                    "{header_part}.{}.{signature}",
                    b64(other.to_string().as_bytes())
                );
            }
            SigMut::ExtraSegment(bytes) => token = format!("{token}.{}", b64(bytes)),
            SigMut::Space(i) => {
                let at = 1 + i % signature.len().saturating_sub(1).max(1);
                let at = at.min(signature.len());
                token = format!("{signed_part}.{} {}", &signature[..at], &signature[at..]);
                if token.ends_with(' ') {
                    token.push('A');
                }
            }
        }
        let valid = matches!(header, HeaderMut::Good | HeaderMut::Ignored(_))
            && matches!(claims, ClaimsMut::Good | ClaimsMut::Extra(..))
            && matches!(sig, SigMut::Good);
        Forged {
            token,
            accept: valid.then(|| sub.to_owned()),
        }
    }
}
