//! The error mapping end to end: authentication, constraint and data errors from the real
//! database, and transport failures.

#![allow(non_camel_case_types)]

use std::time::Duration;

use dbclient::{ConstraintKind, DbClient, DbConfig, DbError, NetworkErrorKind};
use graphql_client::GraphQLQuery;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::support::*;

// Scalars of the test-only operations, as plain text so malformed values reach the server.
type uuid = String;

#[derive(GraphQLQuery)]
#[graphql(
    schema_path = "../schema.graphql",
    query_path = "tests/it/operations.graphql",
    response_derives = "Debug"
)]
struct InsertInstanceWithoutProvider;

#[derive(GraphQLQuery)]
#[graphql(
    schema_path = "../schema.graphql",
    query_path = "tests/it/operations.graphql",
    response_derives = "Debug"
)]
struct MandelboxByText;

#[tokio::test]
async fn a_wrong_or_missing_admin_secret_is_access_denied() {
    let fx = Fixture::start().await;
    for secret in [Some("not-the-secret"), None] {
        let db = DbClient::new(&config_for(&fx.stack, secret)).unwrap();
        let error = db.images().await.unwrap_err();
        match &error {
            DbError::AccessDenied { operation, message } => {
                assert_eq!(*operation, "Images");
                assert!(message.contains("x-hasura-admin-secret"), "{message}");
            }
            other => panic!("{secret:?}: {other:?}"),
        }
        assert!(!error.to_string().contains("not-the-secret"));
        assert!(!error.is_transient());
    }
}

#[tokio::test]
async fn a_not_null_violation_is_a_typed_constraint_violation() {
    let fx = Fixture::start().await;
    let error = fx
        .db
        .execute::<InsertInstanceWithoutProvider>(insert_instance_without_provider::Variables {
            id: "i-1".to_owned(),
        })
        .await
        .unwrap_err();
    match error {
        DbError::ConstraintViolation {
            kind: ConstraintKind::NotNull,
            message,
            path,
            ..
        } => {
            assert!(message.contains("provider"), "{message}");
            assert_eq!(
                path,
                "$.selectionSet.insert_whist_instances_one.args.object"
            );
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_malformed_value_is_a_data_exception() {
    let fx = Fixture::start().await;
    let error = fx
        .db
        .execute::<MandelboxByText>(mandelbox_by_text::Variables {
            id: "not-a-uuid".to_owned(),
        })
        .await
        .unwrap_err();
    match error {
        DbError::DataException { message, .. } => assert!(message.contains("uuid"), "{message}"),
        other => panic!("{other:?}"),
    }
}

fn short_timeouts(url: &str) -> DbClient {
    let config = DbConfig::new(url, None)
        .unwrap()
        .with_timeouts(Duration::from_millis(500), Duration::from_millis(500))
        .unwrap();
    DbClient::new(&config).unwrap()
}

#[tokio::test]
async fn a_refused_connection_is_a_network_error_naming_the_url() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1/graphql", listener.local_addr().unwrap());
    drop(listener);
    let error = short_timeouts(&url).images().await.unwrap_err();
    match &error {
        DbError::Network {
            kind: NetworkErrorKind::Connect,
            url: in_error,
            ..
        } => assert_eq!(in_error, &url),
        other => panic!("{other:?}"),
    }
    assert!(error.is_transient());
    assert!(error.to_string().contains(&url), "{error}");
}

#[tokio::test]
async fn a_server_that_never_answers_times_out() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1/graphql", listener.local_addr().unwrap());
    // Accepts and then says nothing.
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let started = tokio::time::Instant::now();
    let error = short_timeouts(&url).images().await.unwrap_err();
    assert!(
        matches!(
            error,
            DbError::Network {
                kind: NetworkErrorKind::Timeout,
                ..
            }
        ),
        "{error:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    silent.abort();
}

#[tokio::test]
async fn a_non_graphql_error_status_is_an_http_error() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1/graphql", listener.local_addr().unwrap());
    let proxy = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut buffer = vec![0u8; 64 * 1024];
        let _ = socket.read(&mut buffer).await.unwrap();
        socket
            .write_all(
                b"HTTP/1.1 502 Bad Gateway\r\ncontent-type: text/html\r\ncontent-length: 11\r\nconnection: close\r\n\r\nbad gateway",
            )
            .await
            .unwrap();
    });
    let error = short_timeouts(&url).images().await.unwrap_err();
    match &error {
        DbError::Http { status, body, .. } => {
            assert_eq!(*status, 502);
            assert_eq!(body, "bad gateway");
        }
        other => panic!("{other:?}"),
    }
    assert!(error.is_transient());
    proxy.await.unwrap();
}

#[tokio::test]
async fn https_and_wss_are_never_downgraded_to_plaintext() {
    // The stand-in speaks plain HTTP; over https the TLS handshake must fail, not fall back.
    let fx = Fixture::start().await;
    let url = fx.stack.graphql_url().replacen("http://", "https://", 1);
    let config = DbConfig::new(&url, Some(logger::Secret::new("s".to_owned())))
        .unwrap()
        .with_timeouts(Duration::from_secs(2), Duration::from_secs(2))
        .unwrap();
    assert!(config.websocket_url().as_str().starts_with("wss://"));
    let error = DbClient::new(&config).unwrap().images().await.unwrap_err();
    assert!(
        matches!(
            error,
            DbError::Network {
                kind: NetworkErrorKind::Connect,
                ..
            }
        ),
        "{error:?}"
    );

    let token = tokio_util::sync::CancellationToken::new();
    let subscriptions = dbclient::SubscriptionClient::start(&config, token.clone()).unwrap();
    let mut images = subscriptions.images();
    let error = wait_for_error(&mut images, "a TLS failure").await;
    assert!(
        matches!(
            error,
            DbError::Network {
                kind: NetworkErrorKind::Connect,
                ..
            }
        ),
        "{error:?}"
    );
    subscriptions.shutdown().await;
}
