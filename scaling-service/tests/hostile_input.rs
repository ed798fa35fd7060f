//! Hostile input (issue #7) for the scaling service's two parsers where input enters:
//!
//! - `POST /mandelbox/assign`: the real router served over TCP (`api::serve`), its real
//!   `JwksVerifier` against devstack's fake Auth0 and its database on a devstack `TestStack`,
//!   with arbitrary bodies (random bytes, random JSON, valid requests with one field mutated,
//!   deeply nested JSON, invalid UTF-8, bodies over the size limit) and arbitrary
//!   `Authorization` headers. Asserted: no 5xx but the documented 503s, no panic (every request
//!   gets an answer), every 4xx a JSON `{error, message}` naming the problem, and the database
//!   unchanged by every request that was not served (a served one adds exactly its mandelbox).
//! - The JWT verifier alone, with the hostile tokens of `devstack::testing::hostile_tokens`: only a
//!   genuinely valid token is accepted, and a flood of unknown `kid`s (with the issuer up or
//!   down) fetches the JWKS at most once per `JWKS_MIN_REFRESH` (30 s).
//!
//! Case counts are explicit (see `docs/reliability.md`, "Hostile input"): the file runs in a
//! few seconds.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use dbclient::types::{Image, ImageId, InstanceId, InstanceStatus, NewInstance, Region};
use dbclient::{DbClient, DbConfig};
use devstack::jwks::{AUDIENCE, FakeJwks};
use devstack::testing::hostile_tokens::{self, Forge, Recipe, b64, recipe, sub};
use devstack::testing::{TEST_ADMIN_SECRET, TestStack};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{TestCaseError, TestRunner};
use scaling_service::admission::{Admission, AdmissionSettings};
use scaling_service::api::{ApiState, AssignRequest, Assigner, Assignment, serve};
use scaling_service::auth::{AuthError, JwksVerifier, TokenVerifier};
use scaling_service::metrics::Metrics;
use scaling_service::region::PROVIDER;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// The handler's limits (`api.rs`), which the oracle below checks.
const MAX_BODY_BYTES: usize = 16 * 1024;
const MAX_REGIONS: usize = 32;
const MAX_COMMIT: usize = 64;
/// The 503 codes `docs/scaling-service.md` documents.
const DOCUMENTED_503: &[&str] = &[
    "NO_INSTANCE_AVAILABLE",
    "COMMIT_HASH_MISMATCH",
    "REGION_NOT_ENABLED",
    "USER_ALREADY_ACTIVE",
    "SERVICE_UNAVAILABLE",
];
/// `auth.rs`'s `JWKS_MIN_REFRESH`.
const JWKS_MIN_REFRESH: Duration = Duration::from_secs(30);

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        // Cases share a database and a server: a shrink re-runs requests, so keep it short.
        max_shrink_iters: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn jwks_verifier(jwks: &FakeJwks) -> JwksVerifier {
    JwksVerifier::new(jwks.jwks_url().parse().unwrap(), AUDIENCE, &jwks.issuer()).unwrap()
}

/// The first 200 characters, for failure messages about 200 KB tokens.
fn clip(text: &str) -> String {
    text.chars().take(200).collect()
}

// ---------------------------------------------------------------------------------------------
// The JWT verifier

#[test]
fn the_jwt_verifier_accepts_only_genuinely_valid_tokens() {
    let rt = runtime();
    let jwks = rt.block_on(FakeJwks::start()).unwrap();
    let verifier = jwks_verifier(&jwks);
    let forge = Forge::new(&jwks);
    let started = Instant::now();
    let accepted = AtomicUsize::new(0);
    let mut runner = TestRunner::new(config(512));
    let result = runner.run(&recipe(), |recipe| {
        let forged = forge.build(&recipe);
        let result = rt.block_on(verifier.verify(&forged.token));
        if result.is_ok() {
            accepted.fetch_add(1, Ordering::Relaxed);
        }
        match (&forged.accept, &result) {
            (Some(sub), Ok(user)) => prop_assert_eq!(user.as_str(), sub.as_str()),
            (None, Err(AuthError::Invalid(reason))) => prop_assert!(!reason.is_empty()),
            _ => {
                return Err(TestCaseError::fail(format!(
                    "token {:?} (expected {:?}) → {result:?}",
                    clip(&forged.token),
                    forged.accept
                )));
            }
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    // Not vacuous: about one token in five is valid.
    let accepted = accepted.into_inner();
    assert!((1..512).contains(&accepted), "{accepted} accepted");
    // One fetch for the first known kid; unknown kids within the interval fetch nothing.
    let intervals = 1 + started.elapsed().as_secs() / JWKS_MIN_REFRESH.as_secs();
    assert!(
        jwks.fetches() as u64 <= intervals,
        "{} fetches",
        jwks.fetches()
    );
}

/// `n` made-up kids (arbitrary text), from proptest's generator.
fn made_up_kids(n: usize) -> Vec<String> {
    let mut runner = TestRunner::deterministic();
    prop::collection::vec("\\PC{1,40}", n)
        .new_tree(&mut runner)
        .unwrap()
        .current()
        .into_iter()
        .filter(|kid| kid != "test-key-1")
        .collect()
}

#[test]
fn a_flood_of_unknown_kids_fetches_the_jwks_at_most_once_per_interval() {
    runtime().block_on(async {
        let kids = made_up_kids(400);

        // Issuer up: the first valid token fetches the keys; made-up kids then fetch nothing.
        let jwks = FakeJwks::start().await.unwrap();
        let forge = Forge::new(&jwks);
        let verifier = Arc::new(jwks_verifier(&jwks));
        let user = verifier.verify(&forge.valid("auth0|alice")).await.unwrap();
        assert_eq!(user.as_str(), "auth0|alice");
        assert_eq!(jwks.fetches(), 1);
        let answers = futures::future::join_all(kids.iter().map(|kid| {
            let verifier = verifier.clone();
            let token = forge.unknown_kid("auth0|alice", kid);
            async move { verifier.verify(&token).await }
        }))
        .await;
        for answer in &answers {
            assert!(matches!(answer, Err(AuthError::Invalid(_))), "{answer:?}");
        }
        assert_eq!(jwks.fetches(), 1, "made-up kids refetched the JWKS");

        // Issuer down and nothing cached: one attempt, then 503s without fetching again.
        let down = FakeJwks::start().await.unwrap();
        down.set_available(false);
        let forge = Forge::new(&down);
        let verifier = Arc::new(jwks_verifier(&down));
        let answers = futures::future::join_all(kids.iter().enumerate().map(|(n, kid)| {
            let verifier = verifier.clone();
            let token = if n % 2 == 0 {
                forge.valid("auth0|alice")
            } else {
                forge.unknown_kid("auth0|alice", kid)
            };
            async move { verifier.verify(&token).await }
        }))
        .await;
        for answer in &answers {
            assert!(
                matches!(answer, Err(AuthError::KeysUnavailable(_))),
                "{answer:?}"
            );
        }
        assert_eq!(down.fetches(), 1, "an outage turned a flood into fetches");
    });
}

/// The scheduled refresh (#20): before the verifiers were one, the scaling service fetched the
/// JWKS only on an unknown `kid`, so a key the issuer revoked was accepted until a restart.
#[test]
fn a_revoked_signing_key_stops_being_accepted_within_the_refresh_interval() {
    const REFRESH: Duration = Duration::from_millis(500);
    /// How long the test waits at most: the interval plus generous room for a loaded machine.
    const BOUND: Duration = Duration::from_secs(15);
    runtime().block_on(async {
        let jwks = FakeJwks::start().await.unwrap();
        let old = jwks.key();
        let new = jwks.rotate("test-key-2").unwrap();
        let verifier = JwksVerifier::with_refresh_period(
            jwks.jwks_url().parse().unwrap(),
            AUDIENCE,
            &jwks.issuer(),
            REFRESH,
        )
        .unwrap();
        let shutdown = CancellationToken::new();
        let refresher = tokio::spawn(verifier.clone().keep_fresh(shutdown.clone()));
        let old_token = old.sign(&jwks.claims("auth0|alice")).unwrap();
        let new_token = new.sign(&jwks.claims("auth0|alice")).unwrap();
        assert_eq!(
            verifier.verify(&old_token).await.unwrap().as_str(),
            "auth0|alice"
        );
        let fetches_before = jwks.fetches();

        assert!(jwks.revoke(old.kid()));
        let revoked_at = Instant::now();
        // Wait for the condition, bounded: the old key is refused once a refresh ran.
        let refusal = loop {
            match verifier.verify(&old_token).await {
                Err(refusal) => break refusal,
                Ok(_) if revoked_at.elapsed() > BOUND => {
                    panic!("the revoked key was still accepted after {BOUND:?}")
                }
                Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        let took = revoked_at.elapsed();
        assert!(
            matches!(&refusal, AuthError::Invalid(reason) if reason.contains("unknown signing key")),
            "{refusal:?}"
        );
        // Refused by the scheduled refresh (not by a refetch for an unknown kid: the old kid
        // was cached), within one interval plus the fetch itself.
        assert!(jwks.fetches() > fetches_before);
        assert!(
            took <= REFRESH + Duration::from_secs(5),
            "refused {took:?} after the revocation"
        );
        // The key still served is accepted all along.
        assert_eq!(
            verifier.verify(&new_token).await.unwrap().as_str(),
            "auth0|alice"
        );
        shutdown.cancel();
        refresher.await.unwrap();
    });
}

// ---------------------------------------------------------------------------------------------
// POST /mandelbox/assign

struct Api {
    stack: TestStack,
    url: String,
    forge: Forge,
    _jwks: FakeJwks,
    shutdown: CancellationToken,
}

impl Drop for Api {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Two ACTIVE hosts on us-east-1's current image (commit `abc`) with room to spare, so valid
/// requests keep being served; us-west-2 is enabled but has no image.
async fn api() -> Api {
    let stack = TestStack::start().await.unwrap();
    let db = DbClient::new(
        &DbConfig::new(
            &stack.graphql_url(),
            Some(logger::Secret::new(TEST_ADMIN_SECRET.to_owned())),
        )
        .unwrap(),
    )
    .unwrap();
    let east = Region::new("us-east-1").unwrap();
    let ami = ImageId::new("ami-a").unwrap();
    db.upsert_image(&Image {
        provider: PROVIDER.to_owned(),
        region: east.clone(),
        image_id: ami.clone(),
        client_sha: "abc".to_owned(),
        updated_at: Utc::now(),
    })
    .await
    .unwrap();
    let rows: Vec<NewInstance> = (0..2u8)
        .map(|n| NewInstance {
            id: InstanceId::new(format!("i-hostile{n:010}")).unwrap(),
            provider: PROVIDER.to_owned(),
            region: east.clone(),
            image_id: ami.clone(),
            client_sha: "abc".to_owned(),
            ip_addr: Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, n + 1))),
            instance_type: "g4dn.2xlarge".to_owned(),
            remaining_capacity: 10_000,
            status: InstanceStatus::Active,
        })
        .collect();
    db.insert_instances(&rows).await.unwrap();
    for (n, row) in rows.iter().enumerate() {
        let fingerprint = format!("{:02x}", n + 1).repeat(32);
        assert!(
            db.set_instance_tls_fingerprint(&row.id, &fingerprint)
                .await
                .unwrap()
        );
    }
    let jwks = FakeJwks::start().await.unwrap();
    let forge = Forge::new(&jwks);
    let (_ready_tx, ready) = tokio::sync::watch::channel(true);
    let state = ApiState {
        assigner: Arc::new(Assigner {
            db,
            enabled_regions: vec![east, Region::new("us-west-2").unwrap()],
            mandelboxes_per_user: 3,
            allow_local_commit: true,
            allowed_apps: vec![scaling_service::api::APP.to_owned()],
            regions: HashMap::new(),
        }),
        verifier: Arc::new(jwks_verifier(&jwks)),
        admission: Arc::new(Admission::new(AdmissionSettings::unlimited())),
        metrics: Arc::new(Metrics::new().unwrap()),
        ready,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/mandelbox/assign", listener.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    tokio::spawn(serve(listener, state, shutdown.clone()));
    Api {
        stack,
        url,
        forge,
        _jwks: jwks,
        shutdown,
    }
}

#[derive(Debug, Clone)]
enum Auth {
    Missing,
    /// Any header value bytes (those `http` refuses are sent as no header).
    Raw(Vec<u8>),
    /// A valid token after another scheme (`Basic `, `Bearer` without a space...).
    Scheme(String, String),
    Bearer(Recipe),
}

fn auth() -> impl Strategy<Value = Auth> {
    let scheme = prop_oneof![
        Just("Bearer".to_owned()),
        Just("Bearer\t".to_owned()),
        Just("Basic ".to_owned()),
        Just("Token ".to_owned()),
        Just("Bearer:".to_owned()),
        "[A-Za-z]{1,8} ".prop_filter("not the right scheme", |s| {
            !s.eq_ignore_ascii_case("bearer ")
        }),
    ];
    prop_oneof![
        1 => Just(Auth::Missing),
        1 => prop::collection::vec(any::<u8>(), 0..200).prop_map(Auth::Raw),
        1 => (scheme, sub()).prop_map(|(scheme, sub)| Auth::Scheme(scheme, sub)),
        4 => recipe().prop_map(Auth::Bearer),
        6 => sub().prop_map(|sub| Auth::Bearer(Recipe::valid(sub))),
    ]
}

/// A field of the request.
#[derive(Debug, Clone, Copy)]
enum Field {
    Regions,
    FirstRegion,
    Commit,
    Session,
    Email,
    Version,
}

impl Field {
    fn all() -> impl Strategy<Value = Field> {
        prop::sample::select(
            &[
                Field::Regions,
                Field::FirstRegion,
                Field::Commit,
                Field::Session,
                Field::Email,
                Field::Version,
            ][..],
        )
    }

    fn set(self, request: &mut Value, value: Value) {
        match self {
            Field::FirstRegion => request["regions"][0] = value,
            other => request[other.name()] = value,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Field::Regions | Field::FirstRegion => "regions",
            Field::Commit => "client_commit_hash",
            Field::Session => "session_id",
            Field::Email => "user_email",
            Field::Version => "version",
        }
    }
}

const FIELDS: &[&str] = &[
    "regions",
    "client_commit_hash",
    "session_id",
    "user_email",
    "version",
];

/// A well-formed request (which may still be refused: unknown regions, another commit...).
#[derive(Debug, Clone)]
struct Base {
    regions: Vec<String>,
    commit: String,
    session: Option<String>,
    email: Option<String>,
    version: Option<String>,
}

impl Base {
    fn json(&self) -> Value {
        let mut request = json!({"regions": self.regions, "client_commit_hash": self.commit});
        for (name, value) in [
            ("session_id", &self.session),
            ("user_email", &self.email),
            ("version", &self.version),
        ] {
            if let Some(value) = value {
                request[name] = json!(value);
            }
        }
        request
    }
}

fn base() -> impl Strategy<Value = Base> {
    let region = prop_oneof![
        4 => Just("us-east-1".to_owned()),
        1 => Just("us-west-2".to_owned()),
        1 => Just("eu-west-1".to_owned()),
        1 => Just(" us-east-1 ".to_owned()),
        1 => "[a-z0-9-]{1,40}",
        1 => "\\PC{0,20}",
    ];
    let commit = prop_oneof![
        4 => Just("abc".to_owned()),
        1 => Just("local_dev".to_owned()),
        1 => Just("def".to_owned()),
        1 => "\\PC{0,70}",
    ];
    let version = prop_oneof![
        3 => "[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}(-[a-z0-9]{1,8})?",
        1 => "\\PC{0,12}",
    ];
    (
        prop::collection::vec(region, 1..4),
        commit,
        prop::option::of("[a-z0-9-]{0,40}"),
        prop::option::of("[a-z]{1,10}@example\\.com"),
        prop::option::of(version),
    )
        .prop_map(|(regions, commit, session, email, version)| Base {
            regions,
            commit,
            session,
            email,
            version,
        })
}

/// What is done to a well-formed request.
#[derive(Debug, Clone)]
enum Mutation {
    None,
    Huge(Field, usize),
    WrongType(Field, Value),
    Unknown(String, Value),
    Missing(&'static str),
    Duplicate(&'static str),
    EmptyRegions,
    ManyRegions(usize),
    /// `[[[...]]]` this deep as the field's value.
    Nested(Field, usize),
    /// Bytes that are not UTF-8 inside the field's string.
    InvalidUtf8(Field),
    /// A number no float holds as the field's value.
    HugeNumber(Field),
    Trailing(String),
    /// The fields' values as an array instead of an object.
    NotObject,
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let wrong = prop_oneof![
        Just(Value::Null),
        Just(json!(5)),
        Just(json!(-1.5)),
        Just(json!(true)),
        Just(json!("us-east-1")),
        Just(json!([])),
        Just(json!([1, 2])),
        Just(json!({"regions": ["us-east-1"]})),
    ];
    prop_oneof![
        4 => Just(Mutation::None),
        2 => (Field::all(), 100usize..40_000).prop_map(|(f, n)| Mutation::Huge(f, n)),
        2 => (Field::all(), wrong).prop_map(|(f, v)| Mutation::WrongType(f, v)),
        1 => (
            "[a-z_]{1,12}".prop_filter("unknown", |k| !FIELDS.contains(&k.as_str())),
            hostile_tokens::json_value(FIELDS),
        )
            .prop_map(|(k, v)| Mutation::Unknown(k, v)),
        1 => prop::sample::select(&["regions", "client_commit_hash"][..]).prop_map(Mutation::Missing),
        1 => prop::sample::select(FIELDS).prop_map(Mutation::Duplicate),
        1 => Just(Mutation::EmptyRegions),
        1 => (MAX_REGIONS + 1..600).prop_map(Mutation::ManyRegions),
        1 => (Field::all(), 1usize..5_000).prop_map(|(f, d)| Mutation::Nested(f, d)),
        1 => Field::all().prop_map(Mutation::InvalidUtf8),
        1 => Field::all().prop_map(Mutation::HugeNumber),
        1 => "\\PC{1,10}".prop_filter("not blank", |s| !s.trim().is_empty()).prop_map(Mutation::Trailing),
        1 => Just(Mutation::NotObject),
    ]
}

#[derive(Debug, Clone)]
enum Body {
    Bytes(Vec<u8>),
    Json(Value),
    Request(Base, Mutation),
    /// This many bytes: a request with a huge `session_id`, or `a`s.
    Oversized(usize, bool),
}

fn body() -> impl Strategy<Value = Body> {
    prop_oneof![
        1 => prop::collection::vec(any::<u8>(), 0..600).prop_map(Body::Bytes),
        1 => hostile_tokens::json_value(FIELDS).prop_map(Body::Json),
        8 => (base(), mutation()).prop_map(|(b, m)| Body::Request(b, m)),
        1 => (MAX_BODY_BYTES + 1..3_000_000, any::<bool>()).prop_map(|(n, j)| Body::Oversized(n, j)),
    ]
}

const RAW: &str = "@@raw-value@@";

fn body_bytes(body: &Body) -> Vec<u8> {
    match body {
        Body::Bytes(bytes) => bytes.clone(),
        Body::Json(value) => value.to_string().into_bytes(),
        Body::Oversized(n, false) => vec![b'a'; *n],
        Body::Oversized(n, true) => {
            let mut request = json!({"regions": ["us-east-1"], "client_commit_hash": "abc"});
            request["session_id"] = json!("s".repeat(*n));
            request.to_string().into_bytes()
        }
        Body::Request(base, mutation) => {
            let mut request = base.json();
            // Text spliced in where the request holds RAW.
            let mut raw: Option<Vec<u8>> = None;
            match mutation {
                Mutation::None => {}
                Mutation::Huge(field, n) => field.set(&mut request, json!("a".repeat(*n))),
                Mutation::WrongType(field, value) => field.set(&mut request, value.clone()),
                Mutation::Unknown(name, value) => request[name] = value.clone(),
                Mutation::Missing(name) => {
                    request.as_object_mut().unwrap().remove(*name);
                }
                Mutation::Duplicate(name) => {
                    let value = request.get(*name).cloned().unwrap_or(json!("x"));
                    let text = request.to_string();
                    return format!("{{\"{name}\":{value},{}", &text[1..]).into_bytes();
                }
                Mutation::EmptyRegions => request["regions"] = json!([]),
                Mutation::ManyRegions(n) => {
                    request["regions"] = json!(vec!["us-west-2"; *n]);
                }
                Mutation::Nested(field, depth) => {
                    field.set(&mut request, json!(RAW));
                    raw = Some(format!("{}{}", "[".repeat(*depth), "]".repeat(*depth)).into());
                }
                Mutation::InvalidUtf8(field) => {
                    field.set(&mut request, json!(RAW));
                    raw = Some(b"\"us-\xff\xfe\xc3(\"".to_vec());
                }
                Mutation::HugeNumber(field) => {
                    field.set(&mut request, json!(RAW));
                    raw = Some(b"1e999999".to_vec());
                }
                Mutation::Trailing(text) => {
                    return format!("{request}{text}").into_bytes();
                }
                Mutation::NotObject => {
                    let values: Vec<Value> =
                        request.as_object().unwrap().values().cloned().collect();
                    request = Value::Array(values);
                }
            }
            let text = request.to_string();
            match raw {
                None => text.into_bytes(),
                Some(raw) => {
                    let quoted = format!("\"{RAW}\"");
                    let at = text.find(&quoted).unwrap();
                    let mut bytes = text.as_bytes()[..at].to_vec();
                    bytes.extend_from_slice(&raw);
                    bytes.extend_from_slice(&text.as_bytes()[at + quoted.len()..]);
                    bytes
                }
            }
        }
    }
}

/// The header to send, and the user a correct service authenticates.
fn header(api: &Api, auth: &Auth) -> (Option<reqwest::header::HeaderValue>, Option<String>) {
    let value = |bytes: &[u8]| reqwest::header::HeaderValue::from_bytes(bytes).ok();
    match auth {
        Auth::Missing => (None, None),
        Auth::Raw(bytes) => (value(bytes), None),
        Auth::Scheme(scheme, sub) => (
            value(format!("{scheme}{}", api.forge.valid(sub)).as_bytes()),
            None,
        ),
        Auth::Bearer(recipe) => {
            let forged = api.forge.build(recipe);
            match value(format!("Bearer {}", forged.token).as_bytes()) {
                Some(header) => (Some(header), forged.accept),
                None => (None, None),
            }
        }
    }
}

/// Every row of every `whist` table, as JSON text.
type Snapshot = BTreeMap<String, BTreeSet<String>>;

struct Answer {
    status: u16,
    content_type: String,
    body: Vec<u8>,
}

/// What the service must have answered, and done to the database.
fn judge(
    request: &[u8],
    body: &Body,
    user: Option<&str>,
    answer: &Answer,
    before: &Snapshot,
    after: &Snapshot,
) -> Result<(), TestCaseError> {
    let status = answer.status;
    let json: Option<Value> = serde_json::from_slice(&answer.body).ok();
    let code = json
        .as_ref()
        .and_then(|j| j["error"].as_str())
        .unwrap_or_default()
        .to_owned();
    let message = json
        .as_ref()
        .and_then(|j| j["message"].as_str())
        .unwrap_or_default()
        .to_owned();
    let what = format!("{status} {}", clip(&String::from_utf8_lossy(&answer.body)));
    prop_assert!(status < 500 || status == 503, "5xx: {what}");
    if status >= 400 {
        prop_assert!(
            answer.content_type.starts_with("application/json"),
            "not JSON: {} {what}",
            answer.content_type
        );
        prop_assert!(!code.is_empty(), "no error code: {what}");
    }
    if status == 503 {
        prop_assert!(DOCUMENTED_503.contains(&code.as_str()), "{what}");
    }
    if status != 200 {
        prop_assert!(before == after, "a refused request wrote: {what}");
    }

    let Some(user) = user else {
        prop_assert_eq!(status, 401, "{}", what);
        prop_assert_eq!(code.as_str(), "UNAUTHORIZED");
        prop_assert!(!message.is_empty(), "{}", what);
        return Ok(());
    };
    if request.len() > MAX_BODY_BYTES {
        prop_assert_eq!(status, 413, "{}", what);
        prop_assert_eq!(code.as_str(), "BAD_REQUEST");
        prop_assert!(message.contains("too large"), "{}", what);
        return Ok(());
    }
    let parsed = match serde_json::from_slice::<AssignRequest>(request) {
        Err(e) => {
            prop_assert_eq!(status, 400, "{}", what);
            prop_assert_eq!(code.as_str(), "BAD_REQUEST");
            // serde's own words: what is wrong and where (line, column).
            prop_assert_eq!(&message, &e.to_string());
            if let Body::Request(_, mutation) = body {
                let expected = match mutation {
                    Mutation::Unknown(name, _) => format!("unknown field `{name}`"),
                    Mutation::Missing(name) => format!("missing field `{name}`"),
                    Mutation::Duplicate(name) => format!("duplicate field `{name}`"),
                    _ => String::new(),
                };
                prop_assert!(message.contains(&expected), "{expected}: {what}");
            }
            return Ok(());
        }
        Ok(parsed) => parsed,
    };
    let regions_bad = parsed.regions.is_empty() || parsed.regions.len() > MAX_REGIONS;
    let commit_bad =
        parsed.client_commit_hash.is_empty() || parsed.client_commit_hash.len() > MAX_COMMIT;
    if regions_bad || commit_bad {
        prop_assert_eq!(status, 400, "{}", what);
        let field = if regions_bad {
            "regions"
        } else {
            "client_commit_hash"
        };
        prop_assert!(message.contains(field), "{field}: {what}");
        return Ok(());
    }
    match status {
        400 => prop_assert!(
            code == "BAD_REQUEST"
                && (message.contains("session_id") || message.contains("version")),
            "{what}"
        ),
        503 => {
            let servable = parsed.regions.iter().any(|r| r.trim() == "us-east-1")
                && ["abc", "local_dev"].contains(&parsed.client_commit_hash.as_str());
            prop_assert!(
                !servable || code == "USER_ALREADY_ACTIVE",
                "a servable request refused: {what}"
            );
        }
        200 => {
            let assignment: Assignment = serde_json::from_slice(&answer.body)
                .map_err(|e| TestCaseError::fail(format!("{e}: {what}")))?;
            let id = assignment.mandelbox_id.as_uuid().to_string();
            // Exactly one new mandelbox (this one, this user's), one host a slot fuller.
            for (table, rows) in after {
                let old = before.get(table).cloned().unwrap_or_default();
                let added: Vec<&String> = rows.difference(&old).collect();
                let removed: Vec<&String> = old.difference(rows).collect();
                match table.as_str() {
                    "mandelboxes" => {
                        prop_assert!(removed.is_empty() && added.len() == 1, "{table}");
                        let row: Value = serde_json::from_str(added[0]).unwrap();
                        prop_assert_eq!(row["id"].as_str(), Some(id.as_str()));
                        prop_assert_eq!(row["user_id"].as_str(), Some(user));
                        prop_assert_eq!(row["status"].as_str(), Some("ALLOCATED"));
                    }
                    "instances" => {
                        prop_assert!(removed.len() == 1 && added.len() == 1, "{table}");
                        let old: Value = serde_json::from_str(removed[0]).unwrap();
                        let new: Value = serde_json::from_str(added[0]).unwrap();
                        prop_assert_eq!(
                            new["remaining_capacity"].as_i64().unwrap() + 1,
                            old["remaining_capacity"].as_i64().unwrap()
                        );
                    }
                    _ => prop_assert!(added.is_empty() && removed.is_empty(), "{table}"),
                }
            }
        }
        other => prop_assert!(false, "unexpected {other}: {what}"),
    }
    Ok(())
}

#[test]
fn assign_answers_hostile_requests_with_clean_errors_and_writes_nothing() {
    let rt = runtime();
    let api = rt.block_on(api());
    let sql = rt.block_on(api.stack.sql()).unwrap();
    let snapshot = async || {
        let mut snapshot = Snapshot::new();
        let tables = sql
            .query(
                "SELECT table_name::text FROM information_schema.tables \
                 WHERE table_schema = 'whist' AND table_type = 'BASE TABLE'",
                &[],
            )
            .await
            .unwrap();
        for table in tables {
            let name: String = table.get(0);
            let rows = sql
                .query(
                    &format!("SELECT row_to_json(t)::text FROM whist.\"{name}\" t"),
                    &[],
                )
                .await
                .unwrap();
            snapshot.insert(name, rows.iter().map(|row| row.get(0)).collect());
        }
        snapshot
    };
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let statuses = Mutex::new(BTreeMap::<u16, usize>::new());
    let mut runner = TestRunner::new(config(192));
    let result = runner.run(&(auth(), body()), |(auth, body)| {
        let (header, user) = header(&api, &auth);
        let request = body_bytes(&body);
        rt.block_on(async {
            let before = snapshot().await;
            let mut post = client
                .post(&api.url)
                .header("content-type", "application/json")
                .body(request.clone());
            if let Some(header) = header {
                post = post.header(reqwest::header::AUTHORIZATION, header);
            }
            // An error here is a dropped connection: the handler panicked or hung. Except for
            // an oversized body: the server may answer it early (401 before the body, 413) and
            // close the connection before reading the rest, as HTTP allows, so the client's
            // write fails; then nothing may have changed.
            let response = match post.send().await {
                Ok(response) => response,
                Err(e) if request.len() > MAX_BODY_BYTES && e.is_request() => {
                    let after = snapshot().await;
                    prop_assert!(before == after, "an oversized request wrote");
                    return Ok(());
                }
                Err(e) => return Err(TestCaseError::fail(format!("no answer: {e:?}"))),
            };
            let answer = Answer {
                status: response.status().as_u16(),
                content_type: response
                    .headers()
                    .get(reqwest::header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned(),
                body: response
                    .bytes()
                    .await
                    .map_err(|e| TestCaseError::fail(format!("answer cut: {e:?}")))?
                    .to_vec(),
            };
            let after = snapshot().await;
            *statuses.lock().unwrap().entry(answer.status).or_default() += 1;
            judge(&request, &body, user.as_deref(), &answer, &before, &after)
        })
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    // Not vacuous: every kind of answer came up (each is likelier than 1 in 20 per case).
    let statuses = statuses.into_inner().unwrap();
    for status in [200, 400, 401, 413, 503] {
        assert!(statuses.contains_key(&status), "no {status}: {statuses:?}");
    }
}

#[test]
fn b64_is_base64url_without_padding() {
    assert_eq!(b64(b""), "");
    assert_eq!(b64(b"f"), "Zg");
    assert_eq!(b64(b"fo"), "Zm8");
    assert_eq!(b64(b"foo"), "Zm9v");
    assert_eq!(b64(&[0xfb, 0xff]), "-_8");
}
