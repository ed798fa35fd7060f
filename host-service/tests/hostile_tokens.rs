//! Hostile bearer tokens (issue #7) for the host service's json_transport verifier
//! (`json_transport::auth`), against devstack's fake Auth0: only a genuinely valid token is
//! accepted (every other gets an error, never a panic), a flood of unknown `kid`s fetches the
//! JWKS at most once per `min_refresh_interval` whether the issuer is up or down, and the
//! `Authorization` header parser takes only `Bearer <token>`.
//!
//! The tokens come from `devstack::testing::hostile_tokens`, shared with the scaling service's
//! verifier tests. Case counts are
//! explicit (`docs/reliability.md`, "Hostile input"): the file runs in a few seconds.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use devstack::jwks::{AUDIENCE, FakeJwks};
use devstack::testing::hostile_tokens::{Forge, recipe};
use host_service::json_transport::auth::{
    AuthConfig, AuthError, DEFAULT_MIN_REFRESH_INTERVAL, Verifier, bearer_token,
};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{TestCaseError, TestRunner};

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
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

/// As configured in production, with the largest leeway `--auth-leeway` allows (300 s): the
/// expired and not-yet-valid tokens are an hour or more beyond it.
fn host_verifier(jwks: &FakeJwks) -> Verifier {
    Verifier::new(AuthConfig {
        issuer: jwks.issuer(),
        audience: AUDIENCE.to_owned(),
        jwks_url: jwks.jwks_url().parse().unwrap(),
        leeway: Duration::from_secs(300),
        min_refresh_interval: DEFAULT_MIN_REFRESH_INTERVAL,
    })
    .unwrap()
}

fn clip(text: &str) -> String {
    text.chars().take(200).collect()
}

#[test]
fn the_verifier_accepts_only_genuinely_valid_tokens() {
    let rt = runtime();
    let jwks = rt.block_on(FakeJwks::start()).unwrap();
    let verifier = host_verifier(&jwks);
    let forge = Forge::new(&jwks);
    let started = Instant::now();
    let accepted = AtomicUsize::new(0);
    let mut runner = TestRunner::new(config(512));
    let result = runner.run(&recipe(), |recipe| {
        let forged = forge.build(&recipe);
        let result = rt.block_on(verifier.verify(&forged.token));
        match (&forged.accept, &result) {
            (Some(sub), Ok(user)) => {
                accepted.fetch_add(1, Ordering::Relaxed);
                prop_assert_eq!(user.as_str(), sub.as_str());
            }
            (None, Err(AuthError::Invalid(reason))) => prop_assert!(!reason.is_empty()),
            (None, Err(AuthError::UnknownKey)) => {}
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
    let accepted = accepted.into_inner();
    assert!((1..512).contains(&accepted), "{accepted} accepted");
    // One fetch for the first token with a kid; unknown kids within the interval fetch nothing.
    let intervals = 1 + started.elapsed().as_secs() / DEFAULT_MIN_REFRESH_INTERVAL.as_secs();
    assert!(
        jwks.fetches() as u64 <= intervals,
        "{} fetches",
        jwks.fetches()
    );
}

#[test]
fn a_flood_of_unknown_kids_fetches_the_jwks_at_most_once_per_interval() {
    runtime().block_on(async {
        let mut runner = TestRunner::deterministic();
        let kids: Vec<String> = prop::collection::vec("\\PC{1,40}", 400)
            .new_tree(&mut runner)
            .unwrap()
            .current()
            .into_iter()
            .filter(|kid| kid != "test-key-1")
            .collect();

        // Issuer up: the first token fetches the keys; made-up kids then fetch nothing.
        let jwks = FakeJwks::start().await.unwrap();
        let forge = Forge::new(&jwks);
        let verifier = Arc::new(host_verifier(&jwks));
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
            assert_eq!(answer, &Err(AuthError::UnknownKey));
        }
        assert_eq!(jwks.fetches(), 1, "made-up kids refetched the JWKS");

        // Issuer down and nothing cached: one attempt, then 503s without fetching again.
        let down = FakeJwks::start().await.unwrap();
        down.set_available(false);
        let forge = Forge::new(&down);
        let verifier = Arc::new(host_verifier(&down));
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
            assert_eq!(answer, &Err(AuthError::KeysUnavailable));
        }
        assert_eq!(down.fetches(), 1, "an outage turned a flood into fetches");
    });
}

proptest! {
    #![proptest_config(config(2048))]

    /// Any header value: `Bearer <token>` (scheme in any case) gives the trimmed token, anything
    /// else `MalformedHeader`.
    #[test]
    fn the_authorization_header_parser_takes_only_bearer_tokens(
        header in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..300),
            ("[bB][eE][aA][rR][eE][rR]|Basic|Token|", "[ \t]{0,3}", "\\PC{0,100}")
                .prop_map(|(s, w, t)| format!("{s}{w}{t}").into_bytes()),
        ],
    ) {
        match bearer_token(&header) {
            Ok(token) => {
                let text = std::str::from_utf8(&header).unwrap().trim();
                let (scheme, rest) = text.split_once(' ').unwrap();
                prop_assert!(scheme.eq_ignore_ascii_case("bearer"), "{:?}", text);
                prop_assert!(!token.is_empty());
                prop_assert_eq!(token, rest.trim());
            }
            Err(e) => prop_assert_eq!(e, AuthError::MalformedHeader),
        }
    }
}
