//! Clients for the tests: GraphQL over HTTP and over both WebSocket subprotocols, waiting on
//! actual messages with bounded timeouts.

use std::time::Duration;

use devstack::testing::{TEST_ADMIN_SECRET, TestStack};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// The longest any single expected message may take; generous for a loaded 2-core machine.
pub const MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);

/// Posts a raw body with the admin secret and returns the parsed response (always HTTP 200).
pub async fn post_raw(stack: &TestStack, secret: Option<&str>, body: String) -> Value {
    let text = post_text(stack, secret, body).await;
    serde_json::from_str(&text).expect("a JSON response")
}

/// As [`post_raw`], returning the body's text as sent.
pub async fn post_text(stack: &TestStack, secret: Option<&str>, body: String) -> String {
    let mut request = reqwest::Client::new()
        .post(stack.graphql_url())
        .header("content-type", "application/json")
        .body(body);
    if let Some(secret) = secret {
        request = request.header("x-hasura-admin-secret", secret);
    }
    let response = request.send().await.expect("POST /v1/graphql");
    assert_eq!(
        response.status(),
        200,
        "Hasura answers every GraphQL error with 200"
    );
    response.text().await.expect("a response body")
}

/// Runs `query` with `variables` and returns the whole response.
pub async fn gql(stack: &TestStack, query: &str, variables: Value) -> Value {
    post_raw(
        stack,
        Some(TEST_ADMIN_SECRET),
        json!({"query": query, "variables": variables}).to_string(),
    )
    .await
}

/// Runs `query` and returns its `data`, failing on any error.
pub async fn data(stack: &TestStack, query: &str, variables: Value) -> Value {
    let response = gql(stack, query, variables).await;
    assert!(
        response.get("errors").is_none(),
        "unexpected errors: {response}"
    );
    response["data"].clone()
}

/// Asserts a response is exactly one Hasura error with `code` and `path`, and no `data` key;
/// returns its message.
pub fn expect_error(response: &Value, code: &str, path: &str) -> String {
    assert!(
        response.get("data").is_none(),
        "an error response has no data: {response}"
    );
    let errors = response["errors"].as_array().expect("errors");
    assert_eq!(errors.len(), 1, "exactly one error: {response}");
    let error = &errors[0];
    assert_eq!(error["extensions"]["code"], code, "{response}");
    assert_eq!(error["extensions"]["path"], path, "{response}");
    assert!(
        error.get("locations").is_none(),
        "no top-level locations: {response}"
    );
    assert!(error.get("path").is_none(), "no top-level path: {response}");
    error["message"].as_str().expect("message").to_owned()
}

/// Seeds one instance directly in SQL.
pub async fn insert_instance(sql: &tokio_postgres::Client, id: &str, status: &str, capacity: i32) {
    sql.execute(
        "INSERT INTO whist.instances (id, provider, region, image_id, client_sha, ip_addr, \
         instance_type, remaining_capacity, status) \
         VALUES ($1, 'AWS', 'us-east-1', 'ami-1', 'sha-1', '10.0.0.1', 'g4dn.xlarge', $2, $3)",
        &[&id, &capacity, &status],
    )
    .await
    .expect("insert instance");
}

/// Seeds one mandelbox directly in SQL; returns its id.
pub async fn insert_mandelbox(
    sql: &tokio_postgres::Client,
    instance_id: &str,
    status: &str,
    user_id: Option<&str>,
) -> String {
    let id = uuid::Uuid::new_v4();
    sql.execute(
        "INSERT INTO whist.mandelboxes (id, app, instance_id, user_id, status) \
         VALUES ($1, 'CHROME', $2, $3, $4)",
        &[&id, &instance_id, &user_id, &status],
    )
    .await
    .expect("insert mandelbox");
    id.to_string()
}

pub struct Ws {
    stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// The subprotocol the server answered with.
    pub protocol: Option<String>,
}

impl Ws {
    /// Opens a socket offering `protocol` (the whole `Sec-WebSocket-Protocol` value).
    pub async fn connect(stack: &TestStack, protocol: Option<&str>) -> Self {
        let mut request = stack
            .graphql_ws_url()
            .into_client_request()
            .expect("request");
        if let Some(protocol) = protocol {
            request.headers_mut().insert(
                "sec-websocket-protocol",
                HeaderValue::from_str(protocol).expect("header"),
            );
        }
        let (stream, response) =
            tokio::time::timeout(MESSAGE_TIMEOUT, tokio_tungstenite::connect_async(request))
                .await
                .expect("connect in time")
                .expect("WebSocket upgrade");
        let protocol = response
            .headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        Self { stream, protocol }
    }

    /// Connects and completes `connection_init` with the admin secret.
    pub async fn connect_init(stack: &TestStack, protocol: &str) -> Self {
        let mut ws = Self::connect(stack, Some(protocol)).await;
        ws.send(json!({"type": "connection_init",
                       "payload": {"headers": {"X-Hasura-Admin-Secret": TEST_ADMIN_SECRET}}}))
            .await;
        let ack = ws.recv().await;
        assert_eq!(ack, json!({"type": "connection_ack"}));
        ws
    }

    /// The raw stream, for waiting on the connection's end.
    pub fn stream_mut(&mut self) -> &mut WebSocketStream<MaybeTlsStream<TcpStream>> {
        &mut self.stream
    }

    pub async fn send(&mut self, message: Value) {
        self.send_text(message.to_string()).await;
    }

    pub async fn send_text(&mut self, text: String) {
        self.stream
            .send(Message::text(text))
            .await
            .expect("send to the socket");
    }

    /// The next raw frame.
    pub async fn next_frame(&mut self) -> Message {
        tokio::time::timeout(MESSAGE_TIMEOUT, self.stream.next())
            .await
            .expect("a frame in time")
            .expect("the socket is open")
            .expect("a valid frame")
    }

    /// The next protocol message, skipping keep-alives (`ka`, and `ping` with the keep-alive
    /// payload).
    pub async fn recv(&mut self) -> Value {
        loop {
            match self.next_frame().await {
                Message::Text(text) => {
                    let value: Value = serde_json::from_str(text.as_str()).expect("JSON frame");
                    let keepalive = value["type"] == "ka"
                        || (value["type"] == "ping"
                            && value["payload"] == json!({"message": "keepalive"}));
                    if !keepalive {
                        return value;
                    }
                }
                Message::Close(frame) => panic!("socket closed unexpectedly: {frame:?}"),
                _ => {}
            }
        }
    }

    /// The next message, including keep-alives.
    pub async fn recv_including_keepalive(&mut self) -> Value {
        loop {
            if let Message::Text(text) = self.next_frame().await {
                return serde_json::from_str(text.as_str()).expect("JSON frame");
            }
        }
    }

    /// Waits for the server's close frame (skipping other messages) and returns its code and
    /// reason.
    pub async fn expect_close(&mut self) -> (u16, String) {
        loop {
            if let Message::Close(frame) = self.next_frame().await {
                // Reading on sends the answering close frame and sees the end.
                let _ = tokio::time::timeout(MESSAGE_TIMEOUT, self.stream.next()).await;
                return match frame {
                    Some(frame) => (frame.code.into(), frame.reason.as_str().to_owned()),
                    None => (1005, String::new()),
                };
            }
        }
    }
}
