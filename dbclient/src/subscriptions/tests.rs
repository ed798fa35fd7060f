//! The supervisor against an in-memory graphql-transport-ws server, on a paused clock: reconnects,
//! backoff, resubscription, error delivery, conflation and shutdown, without sockets or sleeps in
//! real time.

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{Sink, Stream, StreamExt};
use graphql_client::{GraphQLQuery, QueryBody};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_util::sync::CancellationToken;

use super::backoff::RECONNECT;
use super::socket::Dial;
use super::supervisor::{Pending, Settings};
use super::{ConnectionState, SnapshotStream, SubscriptionClient};
use crate::error::{DbError, NetworkErrorKind};

/// Long enough for anything that should happen; the clock is paused, so waiting costs nothing.
const PATIENCE: Duration = Duration::from_secs(120);

/// A hand-written operation standing in for a generated one.
struct Rows;

#[derive(Debug, Deserialize, PartialEq)]
struct RowsData {
    rows: Vec<u32>,
}

impl GraphQLQuery for Rows {
    type Variables = Value;
    type ResponseData = RowsData;

    fn build_query(variables: Value) -> QueryBody<Value> {
        QueryBody {
            variables,
            query: "subscription Rows($n: Int!) { rows(n: $n) }",
            operation_name: "Rows",
        }
    }
}

fn rows(data: RowsData) -> Vec<u32> {
    data.rows
}

/// The client's end of an in-memory WebSocket.
struct FakeSocket {
    incoming: mpsc::UnboundedReceiver<Result<Message, tungstenite::Error>>,
    outgoing: mpsc::UnboundedSender<Message>,
}

impl Stream for FakeSocket {
    type Item = Result<Message, tungstenite::Error>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.incoming.poll_recv(cx)
    }
}

impl Sink<Message> for FakeSocket {
    type Error = tungstenite::Error;
    fn poll_ready(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }
    fn start_send(self: Pin<&mut Self>, item: Message) -> Result<(), Self::Error> {
        self.outgoing
            .send(item)
            .map_err(|_| tungstenite::Error::ConnectionClosed)
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }
    fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }
}

/// The server's end of one accepted connection.
struct ServerConn {
    to_client: mpsc::UnboundedSender<Result<Message, tungstenite::Error>>,
    from_client: mpsc::UnboundedReceiver<Message>,
}

impl ServerConn {
    /// The next text frame from the client, as JSON; `None` once the client has gone.
    async fn recv(&mut self) -> Option<Value> {
        loop {
            match self.from_client.recv().await? {
                Message::Text(text) => return Some(serde_json::from_str(&text).unwrap()),
                Message::Close(_) => return None,
                _ => {}
            }
        }
    }

    async fn recv_type(&mut self, kind: &str) -> Value {
        let message = tokio::time::timeout(PATIENCE, self.recv())
            .await
            .unwrap_or_else(|_| panic!("no {kind} from the client"))
            .unwrap_or_else(|| panic!("client left while waiting for {kind}"));
        assert_eq!(message["type"], kind, "{message}");
        message
    }

    fn send(&self, message: Value) {
        let _ = self.to_client.send(Ok(Message::text(message.to_string())));
    }

    /// Waits for `connection_init`, acks it, returns its payload.
    async fn accept(&mut self) -> Value {
        let init = self.recv_type("connection_init").await;
        self.send(json!({"type": "connection_ack"}));
        init["payload"].clone()
    }

    /// Waits for a `subscribe`; returns `(id, payload)`.
    async fn subscribed(&mut self) -> (String, Value) {
        let message = self.recv_type("subscribe").await;
        (
            message["id"].as_str().unwrap().to_owned(),
            message["payload"].clone(),
        )
    }

    fn next(&self, id: &str, payload: Value) {
        self.send(json!({"type": "next", "id": id, "payload": payload}));
    }

    fn close(&self, code: u16, reason: &str) {
        let _ = self.to_client.send(Ok(Message::Close(Some(CloseFrame {
            code: CloseCode::from(code),
            reason: reason.into(),
        }))));
    }
}

/// A dialer that refuses or accepts according to a plan (accepting once the plan is used up),
/// and records when each attempt was made.
#[derive(Clone)]
struct FakeDialer {
    refusals: Arc<AtomicUsize>,
    attempts: Arc<Mutex<Vec<Instant>>>,
    accepted: mpsc::UnboundedSender<ServerConn>,
}

impl Dial for FakeDialer {
    type Socket = FakeSocket;

    fn url(&self) -> &str {
        "ws://fake/v1/graphql"
    }

    async fn dial(&self) -> Result<FakeSocket, DbError> {
        self.attempts.lock().unwrap().push(Instant::now());
        let refused = self
            .refusals
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if refused {
            return Err(DbError::Network {
                operation: "subscription connection",
                url: self.url().to_owned(),
                kind: NetworkErrorKind::Connect,
                source: None,
            });
        }
        let (to_client, incoming) = mpsc::unbounded_channel();
        let (outgoing, from_client) = mpsc::unbounded_channel();
        let _ = self.accepted.send(ServerConn {
            to_client,
            from_client,
        });
        Ok(FakeSocket { incoming, outgoing })
    }
}

struct Harness {
    client: SubscriptionClient,
    dialer: FakeDialer,
    connections: mpsc::UnboundedReceiver<ServerConn>,
    token: CancellationToken,
}

impl Harness {
    fn start(refusals: usize, admin_secret: Option<&str>) -> Self {
        let (accepted, connections) = mpsc::unbounded_channel();
        let dialer = FakeDialer {
            refusals: Arc::new(AtomicUsize::new(refusals)),
            attempts: Arc::new(Mutex::new(Vec::new())),
            accepted,
        };
        let settings = Settings {
            admin_secret: admin_secret.map(|s| logger::Secret::new(s.to_owned())),
            handshake_timeout: Duration::from_secs(5),
            // graphql-ws-client's keep-alive runs on a real-time timer; covered by the
            // integration tests instead.
            keep_alive_interval: None,
            backoff: RECONNECT,
        };
        let token = CancellationToken::new();
        let client = SubscriptionClient::start_on(
            &tokio::runtime::Handle::current(),
            dialer.clone(),
            settings,
            token.clone(),
        );
        Self {
            client,
            dialer,
            connections,
            token,
        }
    }

    async fn connection(&mut self) -> ServerConn {
        tokio::time::timeout(PATIENCE, self.connections.recv())
            .await
            .expect("no connection attempt")
            .expect("dialer gone")
    }

    fn subscribe(&self, n: u32) -> SnapshotStream<Vec<u32>> {
        self.client.subscribe::<Rows, _>(json!({"n": n}), rows)
    }
}

async fn next_item<T>(stream: &mut SnapshotStream<T>) -> Result<T, DbError> {
    tokio::time::timeout(PATIENCE, stream.next())
        .await
        .expect("no item within the patience window")
        .expect("stream ended")
}

fn data(rows: &[u32]) -> Value {
    json!({"data": {"rows": rows}})
}

#[tokio::test(start_paused = true)]
async fn snapshots_arrive_typed_and_a_bad_payload_is_one_error_not_the_end() {
    let mut harness = Harness::start(0, None);
    let mut stream = harness.subscribe(7);
    let mut server = harness.connection().await;
    server.accept().await;
    let (id, payload) = server.subscribed().await;
    assert_eq!(
        payload["query"],
        "subscription Rows($n: Int!) { rows(n: $n) }"
    );
    assert_eq!(payload["variables"], json!({"n": 7}));
    assert_eq!(payload["operationName"], "Rows");

    server.next(&id, data(&[1, 2]));
    assert_eq!(next_item(&mut stream).await.unwrap(), vec![1, 2]);

    server.next(&id, json!({"data": {"rows": ["not a number"]}}));
    let error = next_item(&mut stream).await.unwrap_err();
    assert!(
        matches!(
            error,
            DbError::Decode {
                operation: "Rows",
                ..
            }
        ),
        "{error:?}"
    );

    server.next(&id, json!({"data": null, "errors": [{"message": "database query error", "extensions": {"code": "unexpected", "path": "$"}}]}));
    let error = next_item(&mut stream).await.unwrap_err();
    assert!(
        matches!(error, DbError::GraphQl { ref code, .. } if code == "unexpected"),
        "{error:?}"
    );

    server.next(&id, data(&[3]));
    assert_eq!(next_item(&mut stream).await.unwrap(), vec![3]);
    harness.client.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn admin_secret_is_sent_in_connection_init_headers() {
    let mut harness = Harness::start(0, Some("s3cret"));
    let _stream = harness.subscribe(1);
    let mut server = harness.connection().await;
    let payload = server.accept().await;
    assert_eq!(
        payload,
        json!({"headers": {"x-hasura-admin-secret": "s3cret"}})
    );
    harness.client.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn every_subscription_is_resubscribed_after_the_server_drops_the_connection() {
    let mut harness = Harness::start(0, None);
    let mut first = harness.subscribe(1);
    let mut second = harness.subscribe(2);
    let mut server = harness.connection().await;
    server.accept().await;
    let mut ids = Vec::new();
    for _ in 0..2 {
        let (id, payload) = server.subscribed().await;
        ids.push((payload["variables"]["n"].as_u64().unwrap(), id));
    }
    ids.sort();
    server.next(&ids[0].1, data(&[10]));
    server.next(&ids[1].1, data(&[20]));
    assert_eq!(next_item(&mut first).await.unwrap(), vec![10]);
    assert_eq!(next_item(&mut second).await.unwrap(), vec![20]);

    // Hasura restarting: close 1012.
    server.close(1012, "server restarting");
    for stream in [&mut first, &mut second] {
        let error = next_item(stream).await.unwrap_err();
        assert!(
            matches!(
                &error,
                DbError::Network {
                    kind: NetworkErrorKind::Closed {
                        code: Some(1012),
                        ..
                    },
                    ..
                }
            ),
            "{error:?}"
        );
    }

    let mut server = harness.connection().await;
    server.accept().await;
    let mut variables = Vec::new();
    for _ in 0..2 {
        let (id, payload) = server.subscribed().await;
        let n = payload["variables"]["n"].as_u64().unwrap();
        server.next(&id, data(&[n as u32 * 100]));
        variables.push(n);
    }
    variables.sort();
    assert_eq!(variables, vec![1, 2]);
    assert_eq!(next_item(&mut first).await.unwrap(), vec![100]);
    assert_eq!(next_item(&mut second).await.unwrap(), vec![200]);
    harness.client.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn failed_connects_are_retried_with_bounded_growing_delays_until_one_succeeds() {
    const REFUSALS: usize = 15;
    let mut harness = Harness::start(REFUSALS, None);
    let mut stream = harness.subscribe(1);
    // The first refusal reaches the subscriber once (not once per attempt).
    let error = next_item(&mut stream).await.unwrap_err();
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

    let mut server = harness.connection().await;
    server.accept().await;
    let (id, _) = server.subscribed().await;
    server.next(&id, data(&[5]));
    assert_eq!(next_item(&mut stream).await.unwrap(), vec![5]);

    let attempts = harness.dialer.attempts.lock().unwrap().clone();
    assert_eq!(attempts.len(), REFUSALS + 1);
    let backoff = RECONNECT;
    for (attempt, pair) in attempts.windows(2).enumerate() {
        let gap = pair[1] - pair[0];
        let ceiling = backoff.ceiling(attempt as u32);
        // A millisecond of slack for the clock's resolution.
        assert!(
            gap <= ceiling + Duration::from_millis(1),
            "attempt {attempt}: {gap:?} > {ceiling:?}"
        );
    }
    // Past the point where the ceiling hits the cap, it keeps trying (no give-up).
    assert_eq!(
        backoff.ceiling(REFUSALS as u32 - 1),
        super::backoff::RECONNECT_CAP
    );
    assert!(matches!(
        *harness.client.connection_state().borrow(),
        ConnectionState::Connected
    ));
    harness.client.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_rejected_admin_secret_is_reported_once_as_access_denied_and_retried() {
    let mut harness = Harness::start(0, Some("hunter2"));
    let mut stream = harness.subscribe(1);
    // A server that rejects every connection_init like Hasura: close 4403.
    let mut connections = std::mem::replace(&mut harness.connections, mpsc::unbounded_channel().1);
    let (rejected_tx, mut rejected) = tokio::sync::watch::channel(0usize);
    let rejecting = tokio::spawn(async move {
        while let Some(mut server) = connections.recv().await {
            server.recv_type("connection_init").await;
            server.close(4403, "4403: Forbidden");
            rejected_tx.send_modify(|n| *n += 1);
        }
    });
    let error = next_item(&mut stream).await.unwrap_err();
    match &error {
        DbError::AccessDenied { message, .. } => assert!(message.contains("4403"), "{message}"),
        other => panic!("{other:?}"),
    }
    assert!(
        !error.to_string().contains("hunter2"),
        "the secret leaked: {error}"
    );
    // It keeps trying, and tells the subscriber once per outage, not once per attempt.
    tokio::time::timeout(PATIENCE, rejected.wait_for(|n| *n >= 5))
        .await
        .expect("no retries")
        .unwrap();
    assert!(futures::FutureExt::now_or_never(stream.next()).is_none());
    assert!(matches!(
        *harness.client.connection_state().borrow(),
        ConnectionState::Reconnecting {
            error: DbError::AccessDenied { .. },
            ..
        } | ConnectionState::Connecting
    ));
    harness.client.shutdown().await;
    rejecting.abort();
}

#[tokio::test(start_paused = true)]
async fn dropping_a_stream_completes_its_subscription_on_the_server() {
    let mut harness = Harness::start(0, None);
    let stream = harness.subscribe(1);
    let mut server = harness.connection().await;
    server.accept().await;
    let (id, _) = server.subscribed().await;
    drop(stream);
    let complete = server.recv_type("complete").await;
    assert_eq!(complete["id"], id);
    harness.client.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_subscription_the_server_completes_after_an_error_is_subscribed_again() {
    let mut harness = Harness::start(0, None);
    let mut stream = harness.subscribe(1);
    let mut server = harness.connection().await;
    server.accept().await;
    let (id, _) = server.subscribed().await;
    // Hasura: `error` (an array) and then `complete` for a failed subscribe.
    server.send(json!({"type": "error", "id": id, "payload": [{"message": "field 'rows' not found in type: 'subscription_root'", "extensions": {"path": "$.selectionSet.rows", "code": "validation-failed"}}]}));
    server.send(json!({"type": "complete", "id": id}));
    let error = next_item(&mut stream).await.unwrap_err();
    assert!(
        matches!(&error, DbError::GraphQl { code, path: Some(path), .. } if code == "validation-failed" && path == "$.selectionSet.rows"),
        "{error:?}"
    );
    // Same connection, new subscribe.
    let (again, _) = server.subscribed().await;
    assert_ne!(again, id);
    server.next(&again, data(&[9]));
    assert_eq!(next_item(&mut stream).await.unwrap(), vec![9]);
    harness.client.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_slow_consumer_gets_the_newest_snapshot_without_stalling_others() {
    let mut harness = Harness::start(0, None);
    let mut slow = harness.subscribe(1);
    let mut fast = harness.subscribe(2);
    let mut server = harness.connection().await;
    server.accept().await;
    let mut ids = Vec::new();
    for _ in 0..2 {
        let (id, payload) = server.subscribed().await;
        ids.push((payload["variables"]["n"].as_u64().unwrap(), id));
    }
    ids.sort();
    for i in 0..200u32 {
        server.next(&ids[0].1, data(&[i]));
    }
    // The fast consumer is served although the slow one reads nothing.
    server.next(&ids[1].1, data(&[42]));
    assert_eq!(next_item(&mut fast).await.unwrap(), vec![42]);
    // Let every task run until idle (virtual time: nothing real waits).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut seen = Vec::new();
    while let Ok(Some(item)) = tokio::time::timeout(Duration::from_millis(10), slow.next()).await {
        seen.push(item.unwrap());
    }
    assert_eq!(seen.last(), Some(&vec![199]));
    assert!(
        seen.len() <= super::SNAPSHOT_CHANNEL_CAPACITY + 1,
        "{} snapshots queued",
        seen.len()
    );
    harness.client.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn shutdown_closes_the_socket_ends_every_stream_and_joins_every_task() {
    let mut harness = Harness::start(0, None);
    let mut stream = harness.subscribe(1);
    let mut server = harness.connection().await;
    server.accept().await;
    server.subscribed().await;
    harness.token.cancel();
    tokio::time::timeout(PATIENCE, harness.client.stopped())
        .await
        .expect("tasks did not stop");
    assert!(stream.next().await.is_none());
    // The server saw the close (or the socket go away).
    assert!(server.recv().await.is_none());
    assert!(matches!(
        *harness.client.connection_state().borrow(),
        ConnectionState::Stopped
    ));
    // Subscribing after shutdown gives a stream that has already ended.
    assert!(harness.subscribe(3).next().await.is_none());
}

#[test]
fn starting_outside_a_runtime_is_an_error_not_a_panic() {
    let config = crate::DbConfig::new("http://127.0.0.1:1/v1/graphql", None).unwrap();
    let error = SubscriptionClient::start(&config, CancellationToken::new()).unwrap_err();
    assert_eq!(error, crate::ConfigError::NoRuntime);
}

#[tokio::test(start_paused = true)]
async fn shutdown_during_an_outage_is_prompt() {
    let harness = Harness::start(usize::MAX, None);
    let _stream = harness.subscribe(1);
    tokio::time::sleep(Duration::from_secs(60)).await;
    tokio::time::timeout(Duration::from_millis(1), harness.client.shutdown())
        .await
        .expect("shutdown waited for a backoff delay");
}

fn ok(n: u32) -> super::supervisor::RawItem {
    Ok(json!(n))
}

fn err() -> super::supervisor::RawItem {
    Err(DbError::Decode {
        operation: "Rows",
        message: "bad".into(),
    })
}

#[test]
fn pending_keeps_only_the_newest_snapshot_and_every_error_in_order() {
    let mut pending = Pending::default();
    pending.push(ok(1));
    pending.push(err());
    pending.push(ok(2));
    pending.push(ok(3));
    assert_eq!(pending.len(), 2);
    assert!(pending.pop().unwrap().is_err());
    assert_eq!(pending.pop().unwrap().unwrap(), json!(3));
    assert!(pending.is_empty());
}

#[test]
fn pending_errors_are_capped() {
    let mut pending = Pending::default();
    for _ in 0..100 {
        pending.push(err());
    }
    pending.push(ok(1));
    assert_eq!(pending.len(), 17);
}
