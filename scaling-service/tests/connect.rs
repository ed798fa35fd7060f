//! The scaling service connects to the local stack and follows it; a wrong secret stops it with
//! a clear error instead of running blind.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use clap::Parser;
use devstack::testing::{TEST_ADMIN_SECRET, TestStack};
use scaling_service::config::Args;
use tokio_util::sync::CancellationToken;

fn config(url: &str, secret: &str) -> scaling_service::Config {
    Args::try_parse_from([
        "whist-scaling-service",
        "--app-env",
        "localdevwithdb",
        "--port",
        "0",
        "--graphql-url",
        url,
        "--admin-secret",
        secret,
    ])
    .unwrap()
    .validate()
    .unwrap()
}

#[tokio::test]
async fn runs_against_the_local_stack_until_told_to_stop() {
    let stack = TestStack::start().await.unwrap();
    let shutdown = CancellationToken::new();
    let service = tokio::spawn(scaling_service::run(
        config(&stack.graphql_url(), TEST_ADMIN_SECRET),
        shutdown.clone(),
    ));
    // The service must still be running (connected and following) when asked to stop.
    let still_running = tokio::time::timeout(Duration::from_millis(500), async {
        while !service.is_finished() {
            tokio::task::yield_now().await;
        }
    })
    .await
    .is_err();
    assert!(
        still_running,
        "the service stopped on its own: {:?}",
        service.await
    );
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), service)
        .await
        .expect("stops promptly")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn wrong_admin_secret_is_a_clear_startup_error() {
    let stack = TestStack::start().await.unwrap();
    let error = scaling_service::run(
        config(&stack.graphql_url(), "not-the-secret"),
        CancellationToken::new(),
    )
    .await
    .unwrap_err();
    assert!(format!("{error:#}").contains("access denied"), "{error:#}");
}
