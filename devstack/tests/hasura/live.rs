//! Live queries and the WebSocket protocols: `graphql-ws` (legacy Apollo) and
//! `graphql-transport-ws`, as Hasura speaks them.

use std::time::{Duration, Instant};

use devstack::hasura::HasuraOptions;
use devstack::testing::{TEST_ADMIN_SECRET, TestStack};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{MESSAGE_TIMEOUT, Ws, insert_instance, insert_mandelbox};

const ALLOCATED_ON_INSTANCE: &str = "subscription($id: String!) { whist_mandelboxes(\
    where: {instance_id: {_eq: $id}, status: {_eq: \"ALLOCATED\"}}, order_by: {user_id: asc}) \
    { user_id status } }";

fn users(message: &Value) -> Vec<String> {
    message["payload"]["data"]["whist_mandelboxes"]
        .as_array()
        .unwrap_or_else(|| panic!("a live-query result: {message}"))
        .iter()
        .map(|m| m["user_id"].as_str().unwrap_or_default().to_owned())
        .collect()
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

#[tokio::test]
async fn live_query_over_legacy_graphql_ws() {
    let stack = TestStack::start().await.unwrap();
    let sql = stack.sql().await.unwrap();
    insert_instance(&sql, "l-1", "ACTIVE", 2).await;
    insert_instance(&sql, "l-2", "ACTIVE", 2).await;

    let mut ws = Ws::connect_init(&stack, "graphql-ws").await;
    assert_eq!(ws.protocol.as_deref(), Some("graphql-ws"));
    ws.send(json!({"id": "1", "type": "start",
                   "payload": {"query": ALLOCATED_ON_INSTANCE, "variables": {"id": "l-1"}}}))
        .await;
    // The full current result at once.
    assert_eq!(
        ws.recv().await,
        json!({"type": "data", "id": "1", "payload": {"data": {"whist_mandelboxes": []}}})
    );

    // A committed change arrives as the whole new result.
    let committed = Instant::now();
    insert_mandelbox(&sql, "l-1", "ALLOCATED", Some("u1")).await;
    let message = ws.recv().await;
    eprintln!(
        "legacy live query: change to message {:?}",
        committed.elapsed()
    );
    assert_eq!(message["type"], "data");
    assert_eq!(message["id"], "1");
    assert_eq!(users(&message), ["u1"]);

    // Unrelated changes (another instance's row, a row the filter excludes, another table)
    // send nothing: the next message is the one caused by the related change after them.
    insert_mandelbox(&sql, "l-2", "ALLOCATED", Some("u8")).await;
    insert_mandelbox(&sql, "l-1", "RUNNING", Some("u9")).await;
    sql.execute(
        "UPDATE whist.instances SET remaining_capacity = 1 WHERE id = 'l-1'",
        &[],
    )
    .await
    .unwrap();
    insert_mandelbox(&sql, "l-1", "ALLOCATED", Some("u2")).await;
    assert_eq!(users(&ws.recv().await), ["u1", "u2"]);

    // A query over the socket: one data message, then complete.
    ws.send(json!({"id": "2", "type": "start",
                   "payload": {"query": "{ whist_instances_by_pk(id: \"l-1\") { remaining_capacity } }"}}))
        .await;
    assert_eq!(
        ws.recv().await,
        json!({"type": "data", "id": "2",
               "payload": {"data": {"whist_instances_by_pk": {"remaining_capacity": 1}}}})
    );
    assert_eq!(ws.recv().await, json!({"type": "complete", "id": "2"}));

    // Reusing an active id: a start-failed error (one object, not a list), then complete.
    ws.send(json!({"id": "1", "type": "start",
                   "payload": {"query": ALLOCATED_ON_INSTANCE, "variables": {"id": "l-1"}}}))
        .await;
    assert_eq!(
        ws.recv().await,
        json!({"type": "error", "id": "1", "payload": {
            "message": "an operation already exists with this id: 1",
            "extensions": {"path": "$", "code": "start-failed"}}})
    );
    assert_eq!(ws.recv().await, json!({"type": "complete", "id": "1"}));

    // Validation errors: error with {"errors": [...]}, then complete.
    ws.send(json!({"id": "3", "type": "start",
                   "payload": {"query": "subscription { whist_instances { id } whist_images { region } }"}}))
        .await;
    assert_eq!(
        ws.recv().await,
        json!({"type": "error", "id": "3", "payload": {"errors": [{
            "message": "subscriptions must select one top level field",
            "extensions": {"path": "$", "code": "validation-failed"}}]}})
    );
    assert_eq!(ws.recv().await, json!({"type": "complete", "id": "3"}));

    // stop ends the subscription silently: after a related change, the next message is the
    // first result of a new subscription, not data for id 1.
    ws.send(json!({"id": "1", "type": "stop"})).await;
    insert_mandelbox(&sql, "l-1", "ALLOCATED", Some("u3")).await;
    ws.send(json!({"id": "4", "type": "start",
                   "payload": {"query": ALLOCATED_ON_INSTANCE, "variables": {"id": "l-1"}}}))
        .await;
    let message = ws.recv().await;
    assert_eq!(message["id"], "4");
    assert_eq!(users(&message), ["u1", "u2", "u3"]);
    insert_mandelbox(&sql, "l-1", "ALLOCATED", Some("u4")).await;
    let message = ws.recv().await;
    assert_eq!(message["id"], "4", "nothing more for the stopped id 1");
    assert_eq!(users(&message), ["u1", "u2", "u3", "u4"]);

    // A malformed message is reported and the socket stays open.
    ws.send_text("{not json".into()).await;
    let message = ws.recv().await;
    assert_eq!(message["type"], "connection_error");
    assert!(
        message["payload"]
            .as_str()
            .unwrap()
            .starts_with("parsing ClientMessage failed"),
        "{message}"
    );

    ws.send(json!({"type": "connection_terminate"})).await;
    assert_eq!(ws.expect_close().await.0, 1000);
}

#[tokio::test]
async fn live_query_over_graphql_transport_ws() {
    let stack = TestStack::start().await.unwrap();
    let sql = stack.sql().await.unwrap();
    insert_instance(&sql, "t-1", "ACTIVE", 2).await;
    insert_instance(&sql, "t-2", "ACTIVE", 2).await;

    let mut ws = Ws::connect_init(&stack, "graphql-transport-ws").await;
    assert_eq!(ws.protocol.as_deref(), Some("graphql-transport-ws"));
    ws.send(json!({"id": "a", "type": "subscribe",
                   "payload": {"query": ALLOCATED_ON_INSTANCE, "variables": {"id": "t-1"}}}))
        .await;
    assert_eq!(
        ws.recv().await,
        json!({"type": "next", "id": "a", "payload": {"data": {"whist_mandelboxes": []}}})
    );

    // Committed changes arrive; measure how long each takes on loopback.
    let mut latencies = Vec::new();
    for i in 0..5 {
        let committed = Instant::now();
        insert_mandelbox(&sql, "t-1", "ALLOCATED", Some(&format!("u{i}"))).await;
        let message = ws.recv().await;
        latencies.push(committed.elapsed());
        assert_eq!(message["type"], "next");
        assert_eq!(users(&message).len(), i + 1);
    }
    eprintln!(
        "graphql-transport-ws live query: change to message min {:?} median {:?} max {:?}",
        latencies.iter().min().unwrap(),
        median(latencies.clone()),
        latencies.iter().max().unwrap()
    );

    // A change through GraphQL itself, and unrelated changes before it that send nothing.
    insert_mandelbox(&sql, "t-2", "ALLOCATED", Some("x")).await;
    sql.execute(
        "UPDATE whist.mandelboxes SET status = 'RUNNING' WHERE user_id = 'x'",
        &[],
    )
    .await
    .unwrap();
    let mut http = Ws::connect_init(&stack, "graphql-transport-ws").await;
    http.send(json!({"id": "m", "type": "subscribe", "payload": {"query":
        "mutation { update_whist_mandelboxes(where: {user_id: {_eq: \"u0\"}}, _set: {status: \"RUNNING\"}) { affected_rows } }"}}))
        .await;
    assert_eq!(
        http.recv().await,
        json!({"type": "next", "id": "m",
               "payload": {"data": {"update_whist_mandelboxes": {"affected_rows": 1}}}})
    );
    assert_eq!(http.recv().await, json!({"type": "complete", "id": "m"}));
    assert_eq!(users(&ws.recv().await), ["u1", "u2", "u3", "u4"]);

    // A client ping is answered with a pong carrying its payload.
    ws.send(json!({"type": "ping", "payload": {"n": 1}})).await;
    assert_eq!(
        ws.recv().await,
        json!({"type": "pong", "payload": {"n": 1}})
    );

    // Errors before execution: an error whose payload is a list, then complete.
    ws.send(json!({"id": "b", "type": "subscribe",
                   "payload": {"query": "subscription { nope }"}}))
        .await;
    assert_eq!(
        ws.recv().await,
        json!({"type": "error", "id": "b", "payload": [{
            "message": "field 'nope' not found in type: 'subscription_root'",
            "extensions": {"path": "$.selectionSet.nope", "code": "validation-failed"}}]})
    );
    assert_eq!(ws.recv().await, json!({"type": "complete", "id": "b"}));

    // An error while running the live query arrives as data, and the subscription goes on.
    ws.send(json!({"id": "c", "type": "subscribe", "payload": {"query":
        "subscription { whist_mandelboxes(where: {id: {_eq: \"not-a-uuid\"}}) { id } }"}}))
        .await;
    assert_eq!(
        ws.recv().await,
        json!({"type": "next", "id": "c", "payload": {"data": null, "errors": [{
            "message": "invalid input syntax for type uuid: \"not-a-uuid\"",
            "extensions": {"path": "$", "code": "data-exception"}}]}})
    );
    ws.send(json!({"id": "c", "type": "complete"})).await;

    // complete from the client ends the subscription silently.
    ws.send(json!({"id": "a", "type": "complete"})).await;
    ws.send(json!({"id": "d", "type": "subscribe",
                   "payload": {"query": ALLOCATED_ON_INSTANCE, "variables": {"id": "t-1"}}}))
        .await;
    let message = ws.recv().await;
    assert_eq!(message["id"], "d");
    insert_mandelbox(&sql, "t-1", "ALLOCATED", Some("u5")).await;
    let message = ws.recv().await;
    assert_eq!(message["id"], "d", "nothing more for the completed id a");
    assert_eq!(users(&message), ["u1", "u2", "u3", "u4", "u5"]);

    // Reusing an active id: two errors, then the socket is closed with 1000.
    ws.send(json!({"id": "d", "type": "subscribe",
                   "payload": {"query": ALLOCATED_ON_INSTANCE, "variables": {"id": "t-1"}}}))
        .await;
    let message = ws.recv().await;
    assert_eq!(
        message,
        json!({"type": "error", "id": "d", "payload": {
            "message": "an operation already exists with this id: d",
            "extensions": {"path": "$", "code": "start-failed"}}})
    );
    assert_eq!(
        ws.recv().await,
        json!({"type": "error", "id": "d", "payload": "an operation already exists with this id: d"})
    );
    assert_eq!(ws.expect_close().await.0, 1000);
}

/// Handshakes: subprotocol choice, authentication, keep-alive, init timeout, malformed
/// messages.
#[tokio::test]
async fn websocket_handshake_auth_and_protocol_errors() {
    let stack = TestStack::start_with(HasuraOptions {
        admin_secret: Some(TEST_ADMIN_SECRET.to_owned()),
        keepalive_interval: Duration::from_millis(200),
        connection_init_timeout: Duration::from_millis(300),
        ..HasuraOptions::default()
    })
    .await
    .unwrap();

    // Subprotocol choice; the answer names the protocol even when the client offered none.
    assert_eq!(
        Ws::connect(&stack, Some("graphql-ws, graphql-transport-ws"))
            .await
            .protocol
            .as_deref(),
        Some("graphql-ws")
    );
    let mut tcp = tokio::net::TcpStream::connect(stack.addr).await.unwrap();
    tcp.write_all(
        format!(
            "GET /v1/graphql HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            stack.addr
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(MESSAGE_TIMEOUT, tcp.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "the server closed before answering the upgrade");
        head.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(
        head.contains("sec-websocket-protocol: graphql-ws\r\n"),
        "{head}"
    );

    // Keep-alive right after the ack, then periodically: `ka` (legacy).
    let mut ws = Ws::connect(&stack, Some("graphql-ws")).await;
    ws.send(json!({"type": "connection_init",
                   "payload": {"headers": {"x-hasura-admin-secret": TEST_ADMIN_SECRET}}}))
        .await;
    assert_eq!(
        ws.recv_including_keepalive().await,
        json!({"type": "connection_ack"})
    );
    assert_eq!(ws.recv_including_keepalive().await, json!({"type": "ka"}));
    assert_eq!(ws.recv_including_keepalive().await, json!({"type": "ka"}));
    // ... and `ping` with the keep-alive payload (graphql-transport-ws).
    let mut ws = Ws::connect(&stack, Some("graphql-transport-ws")).await;
    ws.send(json!({"type": "connection_init",
                   "payload": {"headers": {"x-hasura-admin-secret": TEST_ADMIN_SECRET}}}))
        .await;
    assert_eq!(
        ws.recv_including_keepalive().await,
        json!({"type": "connection_ack"})
    );
    let keepalive = json!({"type": "ping", "payload": {"message": "keepalive"}});
    assert_eq!(ws.recv_including_keepalive().await, keepalive);
    assert_eq!(ws.recv_including_keepalive().await, keepalive);

    // A wrong secret on the legacy protocol: connection_error with a string, then 4400.
    let mut ws = Ws::connect(&stack, Some("graphql-ws")).await;
    ws.send(json!({"type": "connection_init",
                   "payload": {"headers": {"x-hasura-admin-secret": "wrong"}}}))
        .await;
    assert_eq!(
        ws.recv().await,
        json!({"type": "connection_error",
               "payload": "invalid x-hasura-admin-secret/x-hasura-access-key"})
    );
    assert_eq!(ws.expect_close().await.0, 4400);
    // ... and a missing one.
    let mut ws = Ws::connect(&stack, Some("graphql-ws")).await;
    ws.send(json!({"type": "connection_init", "payload": {}}))
        .await;
    assert_eq!(
        ws.recv().await["payload"],
        "x-hasura-admin-secret/x-hasura-access-key required, but not found"
    );
    assert_eq!(ws.expect_close().await.0, 4400);

    // A wrong secret on graphql-transport-ws: closed with 4403, no message.
    let mut ws = Ws::connect(&stack, Some("graphql-transport-ws")).await;
    ws.send(json!({"type": "connection_init",
                   "payload": {"headers": {"x-hasura-admin-secret": "wrong"}}}))
        .await;
    assert_eq!(ws.expect_close().await.0, 4403);

    // No connection_init within the timeout: 4408 (graphql-transport-ws only).
    let mut ws = Ws::connect(&stack, Some("graphql-transport-ws")).await;
    let (code, reason) = ws.expect_close().await;
    assert_eq!(
        (code, reason.as_str()),
        (4408, "Connection initialisation timed out")
    );

    // A malformed message on graphql-transport-ws: 4400.
    let mut ws = Ws::connect(&stack, Some("graphql-transport-ws")).await;
    ws.send(json!({"type": "subscribe", "id": "1"})).await;
    assert_eq!(ws.expect_close().await.0, 4400);

    // subscribe before connection_init: start-failed error, its message, then 1000.
    let mut ws = Ws::connect(&stack, Some("graphql-transport-ws")).await;
    ws.send(json!({"id": "1", "type": "subscribe", "payload": {"query": "{ __typename }"}}))
        .await;
    assert_eq!(
        ws.recv().await["payload"]["extensions"]["code"],
        "start-failed"
    );
    assert_eq!(
        ws.recv().await["payload"],
        "start received before the connection is initialised"
    );
    assert_eq!(ws.expect_close().await.0, 1000);
    // ... on the legacy protocol the socket stays usable.
    let mut ws = Ws::connect(&stack, Some("graphql-ws")).await;
    ws.send(json!({"id": "1", "type": "start", "payload": {"query": "{ __typename }"}}))
        .await;
    assert_eq!(ws.recv().await["type"], "error");
    assert_eq!(ws.recv().await, json!({"type": "complete", "id": "1"}));
    ws.send(json!({"type": "connection_init",
                   "payload": {"headers": {"X-HASURA-ADMIN-SECRET": TEST_ADMIN_SECRET}}}))
        .await;
    assert_eq!(ws.recv().await, json!({"type": "connection_ack"}));
    ws.send(json!({"id": "1", "type": "start", "payload": {"query": "{ __typename }"}}))
        .await;
    assert_eq!(
        ws.recv().await,
        json!({"type": "data", "id": "1", "payload": {"data": {"__typename": "query_root"}}})
    );
}

/// Stopping the endpoint closes every socket with 1012; served again on the same port, clients
/// reconnect and subscribe again.
#[tokio::test]
async fn shutdown_closes_sockets_with_1012_and_the_port_serves_again() {
    let mut stack = TestStack::start().await.unwrap();
    let sql = stack.sql().await.unwrap();
    insert_instance(&sql, "s-1", "ACTIVE", 2).await;
    insert_mandelbox(&sql, "s-1", "ALLOCATED", Some("u1")).await;

    let subscribe = |kind: &str| {
        json!({"id": "1", "type": kind,
               "payload": {"query": ALLOCATED_ON_INSTANCE, "variables": {"id": "s-1"}}})
    };
    let mut legacy = Ws::connect_init(&stack, "graphql-ws").await;
    legacy.send(subscribe("start")).await;
    assert_eq!(users(&legacy.recv().await), ["u1"]);
    let mut transport = Ws::connect_init(&stack, "graphql-transport-ws").await;
    transport.send(subscribe("subscribe")).await;
    assert_eq!(users(&transport.recv().await), ["u1"]);

    let stopping = Instant::now();
    let (stopped, legacy_close, transport_close) = tokio::join!(
        async {
            let result = stack.stop_graphql().await;
            (result, stopping.elapsed())
        },
        legacy.expect_close(),
        transport.expect_close()
    );
    let (result, stop_time) = stopped;
    result.unwrap();
    assert_eq!(legacy_close.0, 1012);
    assert_eq!(transport_close.0, 1012);
    assert!(
        stop_time < Duration::from_secs(2),
        "the endpoint stops promptly ({stop_time:?})"
    );

    stack.start_graphql().await.unwrap();
    insert_mandelbox(&sql, "s-1", "ALLOCATED", Some("u2")).await;
    let mut again = Ws::connect_init(&stack, "graphql-transport-ws").await;
    again.send(subscribe("subscribe")).await;
    assert_eq!(users(&again.recv().await), ["u1", "u2"]);
}

/// A request abandoned mid-transaction (its client went away while the query waited on a lock)
/// must not hand its pooled connection back inside the open read-only transaction: a later
/// mutation on that connection would fail with `cannot execute ... in a read-only transaction`
/// (seen once as a host's row deletion failing with `unexpected`, when the cancellation hit
/// while BEGIN was in flight).
#[tokio::test]
async fn abandoned_requests_do_not_poison_pooled_connections() {
    let stack = TestStack::start().await.unwrap();
    let sql = stack.sql().await.unwrap();
    insert_instance(&sql, "t-1", "ACTIVE", 2).await;
    // Block readers of the table, send queries whose clients give up, then unblock.
    sql.batch_execute("BEGIN; LOCK TABLE whist.instances IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    for _ in 0..4 {
        let abandoned = client
            .post(stack.graphql_url())
            .header("x-hasura-admin-secret", TEST_ADMIN_SECRET)
            .json(&json!({"query": "{ whist_instances { id } }"}))
            .send()
            .await;
        assert!(abandoned.is_err(), "the query must have been blocked");
    }
    sql.batch_execute("COMMIT").await.unwrap();
    // Every pooled connection must still take writes.
    for n in 0..40 {
        let response = super::support::data(
            &stack,
            "mutation ($n: Int!) { update_whist_instances(where: {id: {_eq: \"t-1\"}}, \
             _set: {remaining_capacity: $n}) { affected_rows } }",
            json!({ "n": n }),
        )
        .await;
        assert_eq!(
            response["update_whist_instances"]["affected_rows"], 1,
            "mutation {n}: {response}"
        );
    }
}
