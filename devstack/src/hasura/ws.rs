//! GraphQL over WebSocket on `GET /v1/graphql`, both subprotocols, as Hasura v2 speaks them
//! (contract §4): the legacy Apollo `graphql-ws` and `graphql-transport-ws`, including the
//! places where Hasura departs from those specifications (errors on start, `complete` after
//! `error`, close codes).
//!
//! One task per socket owns the socket and the protocol state; each operation runs in its own
//! task and hands its frames back through a bounded channel, so any number of live queries
//! share a socket and a slow client slows only its own operations.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_graphql::parser::types::OperationType;
use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::http::header::SEC_WEBSOCKET_PROTOCOL;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::Response;
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::auth::Identity;
use super::error::{GqlError, code};
use super::exec::{self, Outcome, Prepared, RawRequest};
use super::live::{LiveQuery, live_body};
use super::permissions::SessionVariables;
use super::{App, Engine};

/// Frames queued from operations to the socket before operations wait for the client.
const OUTBOUND_CAPACITY: usize = 64;
/// The largest client message accepted (a query with its variables).
const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
/// After sending a close frame, how long to wait for the client's answering close frame before
/// dropping the connection. Waiting lets the close frame reach the client intact; the bound
/// keeps server shutdown prompt when a client does not answer.
const CLOSE_REPLY_TIMEOUT: Duration = Duration::from_millis(500);
/// A close frame's reason must fit in 123 bytes (RFC 6455 §5.5: 125 minus the code).
const MAX_CLOSE_REASON_BYTES: usize = 123;

pub(crate) const LEGACY_PROTOCOL: &str = "graphql-ws";
pub(crate) const TRANSPORT_WS_PROTOCOL: &str = "graphql-transport-ws";

const CLOSE_NORMAL: u16 = 1000;
const CLOSE_SERVICE_RESTART: u16 = 1012;
const CLOSE_BAD_REQUEST: u16 = 4400;
const CLOSE_FORBIDDEN: u16 = 4403;
const CLOSE_INIT_TIMEOUT: u16 = 4408;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Protocol {
    /// Apollo `subscriptions-transport-ws`, subprotocol name `graphql-ws`.
    Legacy,
    TransportWs,
}

impl Protocol {
    fn name(self) -> &'static str {
        match self {
            Protocol::Legacy => LEGACY_PROTOCOL,
            Protocol::TransportWs => TRANSPORT_WS_PROTOCOL,
        }
    }

    /// Hasura's rule (contract §4.1): exactly one `Sec-WebSocket-Protocol` header whose whole
    /// value is `graphql-transport-ws` picks that protocol; anything else, including no header
    /// or a list naming both, picks the legacy one.
    pub(crate) fn choose(headers: &HeaderMap) -> Self {
        let mut values = headers.get_all(SEC_WEBSOCKET_PROTOCOL).iter();
        match (values.next(), values.next()) {
            (Some(value), None)
                if value.to_str().ok().map(str::trim) == Some(TRANSPORT_WS_PROTOCOL) =>
            {
                Protocol::TransportWs
            }
            _ => Protocol::Legacy,
        }
    }
}

/// The upgrade: answers with the chosen subprotocol even when the client offered none, as
/// Hasura does.
pub(crate) async fn upgrade(
    State(app): State<App>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let protocol = Protocol::choose(&headers);
    let upgrade_headers: HashMap<String, String> = headers
        .iter()
        .filter_map(|(name, value)| {
            value
                .to_str()
                .ok()
                .map(|v| (name.as_str().to_ascii_lowercase(), v.to_owned()))
        })
        .collect();
    let tracker = app.sockets.tracker.clone();
    let mut response = ws
        .max_message_size(MAX_MESSAGE_BYTES)
        .on_upgrade(move |socket| {
            tracker.track_future(async move {
                Connection::new(app, protocol, upgrade_headers)
                    .run(socket)
                    .await;
            })
        });
    response.headers_mut().insert(
        SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static(protocol.name()),
    );
    response
}

/// What operations send back to the socket task.
#[derive(Debug)]
enum Outbound {
    Frame {
        id: String,
        generation: u64,
        text: String,
    },
    /// The operation ended by itself; its id may be reused.
    Done { id: String, generation: u64 },
}

#[derive(Debug)]
struct Operation {
    generation: u64,
    cancel: CancellationToken,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InitState {
    Pending,
    Accepted,
}

/// What the socket task does after handling a client message.
#[derive(Debug, Default)]
struct Reply {
    frames: Vec<String>,
    close: Option<(u16, String)>,
    /// Start keep-alives now (first successful `connection_init`).
    start_keepalive: bool,
}

impl Reply {
    fn frame(text: String) -> Self {
        Self {
            frames: vec![text],
            ..Self::default()
        }
    }

    fn close(code: u16, reason: impl Into<String>) -> Self {
        Self {
            close: Some((code, reason.into())),
            ..Self::default()
        }
    }
}

/// A server frame: `{"type":..., "id":..., "payload":...}` with `payload` given as JSON text.
fn frame(kind: &str, id: Option<&str>, payload: Option<&str>) -> String {
    let mut text = format!(r#"{{"type":"{kind}""#);
    if let Some(id) = id {
        text.push_str(r#","id":"#);
        text.push_str(&serde_json::Value::String(id.to_owned()).to_string());
    }
    if let Some(payload) = payload {
        text.push_str(r#","payload":"#);
        text.push_str(payload);
    }
    text.push('}');
    text
}

fn json_string(text: &str) -> String {
    serde_json::Value::String(text.to_owned()).to_string()
}

/// Hasura wraps some close reasons in a one-field JSON object (contract §4.2).
fn wrapped_reason(text: &str) -> String {
    // Leave room for the wrapper and escaping.
    let inner = truncate(text, MAX_CLOSE_REASON_BYTES - 40);
    format!(r#"{{"server_error_msg":{}}}"#, json_string(inner))
}

fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// A client message, loosely parsed: what is required depends on `type`.
struct ClientMessage {
    kind: String,
    id: Option<String>,
    payload: Option<serde_json::Value>,
}

fn parse_client_message(text: &str) -> Result<ClientMessage, String> {
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let object = value
        .as_object()
        .ok_or_else(|| "expected an object".to_owned())?;
    let kind = object
        .get("type")
        .and_then(|t| t.as_str())
        .ok_or_else(|| "the key 'type' was not present or is not a string".to_owned())?
        .to_owned();
    let id = match object.get("id") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(id)) => Some(id.clone()),
        Some(_) => return Err("the key 'id' is not a string".to_owned()),
    };
    Ok(ClientMessage {
        kind,
        id,
        payload: object.get("payload").cloned(),
    })
}

struct Connection {
    app: App,
    protocol: Protocol,
    upgrade_headers: HashMap<String, String>,
    init: InitState,
    /// Who the socket's `connection_init` says it is; its operations run as that.
    identity: Option<Identity>,
    operations: HashMap<String, Operation>,
    next_generation: u64,
    outbound: mpsc::Sender<Outbound>,
    inbound_ops: Option<mpsc::Receiver<Outbound>>,
    /// Cancelled when the socket ends or the server shuts down: stops every operation.
    token: CancellationToken,
}

impl Connection {
    fn new(app: App, protocol: Protocol, upgrade_headers: HashMap<String, String>) -> Self {
        let (outbound, inbound_ops) = mpsc::channel(OUTBOUND_CAPACITY);
        let token = app.sockets.shutdown.child_token();
        Self {
            app,
            protocol,
            upgrade_headers,
            init: InitState::Pending,
            identity: None,
            operations: HashMap::new(),
            next_generation: 0,
            outbound,
            inbound_ops: Some(inbound_ops),
            token,
        }
    }

    async fn run(mut self, socket: WebSocket) {
        tracing::debug!(protocol = self.protocol.name(), "GraphQL WebSocket opened");
        let (mut sink, mut stream) = socket.split();
        let Some(mut from_operations) = self.inbound_ops.take() else {
            return;
        };
        let options = self.app.engine.options.clone();
        let init_deadline = tokio::time::sleep(options.connection_init_timeout);
        tokio::pin!(init_deadline);
        let mut keepalive: Option<tokio::time::Interval> = None;
        let shutdown = self.app.sockets.shutdown.clone();
        // When the token of `connection_init` expires, Hasura ends the connection (its
        // `onJwtExpiry` thread finishes and the connection is torn down).
        let expiry = tokio::time::sleep(Duration::from_secs(365 * 24 * 3600));
        tokio::pin!(expiry);
        let mut expiry_armed = false;

        let close = loop {
            let awaiting_init =
                self.protocol == Protocol::TransportWs && self.init == InitState::Pending;
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    break Some((CLOSE_SERVICE_RESTART, "server restarting".to_owned()));
                }
                _ = &mut init_deadline, if awaiting_init => {
                    break Some((CLOSE_INIT_TIMEOUT, "Connection initialisation timed out".to_owned()));
                }
                _ = &mut expiry, if expiry_armed => {
                    tracing::debug!("GraphQL WebSocket token expired; dropping the connection");
                    self.token.cancel();
                    return;
                }
                Some(message) = from_operations.recv() => {
                    if let Some(text) = self.accept_outbound(message)
                        && send_text(&mut sink, text).await.is_err()
                    {
                        break None;
                    }
                }
                _ = tick(&mut keepalive) => {
                    let text = match self.protocol {
                        Protocol::Legacy => frame("ka", None, None),
                        Protocol::TransportWs => frame("ping", None, Some(r#"{"message":"keepalive"}"#)),
                    };
                    if send_text(&mut sink, text).await.is_err() {
                        break None;
                    }
                }
                message = stream.next() => {
                    let text = match message {
                        None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break None,
                        Some(Ok(Message::Text(text))) => text.as_str().to_owned(),
                        Some(Ok(Message::Binary(bytes))) => String::from_utf8_lossy(&bytes).into_owned(),
                        // Protocol-level pings are answered by the WebSocket layer.
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    };
                    let reply = self.handle(&text).await;
                    if let Some(expires) = self.identity.as_ref().and_then(|i| i.expires) {
                        let left = expires
                            .duration_since(std::time::SystemTime::now())
                            .unwrap_or(Duration::ZERO);
                        expiry.as_mut().reset(tokio::time::Instant::now() + left);
                        expiry_armed = true;
                    }
                    let mut failed = false;
                    for text in reply.frames {
                        if send_text(&mut sink, text).await.is_err() {
                            failed = true;
                            break;
                        }
                    }
                    if failed {
                        break None;
                    }
                    if reply.start_keepalive && keepalive.is_none() {
                        // The first keep-alive goes out at once, right after the ack.
                        let mut interval = tokio::time::interval(
                            options.keepalive_interval.max(super::MIN_TIMER_PERIOD),
                        );
                        // A client too slow to read gets one keep-alive, not a burst.
                        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                        keepalive = Some(interval);
                    }
                    if reply.close.is_some() {
                        break reply.close;
                    }
                }
            }
        };
        self.token.cancel();
        tracing::debug!(
            protocol = self.protocol.name(),
            close_code = close.as_ref().map(|(code, _)| *code),
            "GraphQL WebSocket closing"
        );
        match close {
            // The client closed or the connection failed: flush the answering close frame
            // the WebSocket layer queued, if it can still be sent.
            None => {
                let _ = tokio::time::timeout(CLOSE_REPLY_TIMEOUT, sink.close()).await;
            }
            Some((code, reason)) => {
                let frame = CloseFrame {
                    code,
                    reason: Utf8Bytes::from(truncate(&reason, MAX_CLOSE_REASON_BYTES).to_owned()),
                };
                if sink.send(Message::Close(Some(frame))).await.is_ok() {
                    wait_for_close_reply(&mut stream).await;
                }
            }
        }
    }

    /// A frame from an operation goes out only while that operation is still the one under
    /// its id: after a `stop`/`complete` from the client nothing more is sent for it.
    fn accept_outbound(&mut self, message: Outbound) -> Option<String> {
        match message {
            Outbound::Frame {
                id,
                generation,
                text,
            } => self
                .operations
                .get(&id)
                .filter(|op| op.generation == generation)
                .map(|_| text),
            Outbound::Done { id, generation } => {
                if self
                    .operations
                    .get(&id)
                    .is_some_and(|op| op.generation == generation)
                {
                    self.operations.remove(&id);
                }
                None
            }
        }
    }

    async fn handle(&mut self, text: &str) -> Reply {
        let message = match parse_client_message(text) {
            Ok(message) => message,
            Err(detail) => return self.malformed(&detail),
        };
        match (self.protocol, message.kind.as_str()) {
            (_, "connection_init") => self.connection_init(message.payload).await,
            (Protocol::Legacy, "start") | (Protocol::TransportWs, "subscribe") => {
                // Hasura parses the payload as part of the message: a payload that is not a
                // request with a `query` string makes the message malformed.
                let has_query = message
                    .payload
                    .as_ref()
                    .and_then(|p| p.get("query"))
                    .is_some_and(serde_json::Value::is_string);
                match (message.id, message.payload) {
                    (Some(id), Some(payload)) if has_query => self.start(id, payload),
                    _ => self.malformed(&format!(
                        "{} needs an id and a payload with a query",
                        message.kind
                    )),
                }
            }
            (Protocol::Legacy, "stop") | (Protocol::TransportWs, "complete") => match message.id {
                Some(id) => {
                    if let Some(op) = self.operations.remove(&id) {
                        op.cancel.cancel();
                    }
                    Reply::default()
                }
                None => self.malformed(&format!("{} needs an id", message.kind)),
            },
            (Protocol::Legacy, "connection_terminate") => {
                Reply::close(CLOSE_NORMAL, "GQL_CONNECTION_TERMINATE received")
            }
            (Protocol::TransportWs, "ping") => {
                let payload = message.payload.map(|p| p.to_string());
                Reply::frame(frame("pong", None, payload.as_deref()))
            }
            (Protocol::TransportWs, "pong") => Reply::default(),
            (_, other) => self.malformed(&format!("unknown message type {other:?}")),
        }
    }

    fn malformed(&self, detail: &str) -> Reply {
        match self.protocol {
            // The legacy protocol reports the problem and keeps the socket open.
            Protocol::Legacy => Reply::frame(frame(
                "connection_error",
                None,
                Some(&json_string(&format!(
                    "parsing ClientMessage failed: {detail}"
                ))),
            )),
            Protocol::TransportWs => Reply::close(
                CLOSE_BAD_REQUEST,
                format!("4400: Parsing client message failed: {detail}"),
            ),
        }
    }

    async fn connection_init(&mut self, payload: Option<serde_json::Value>) -> Reply {
        // Upgrade-request headers count too; the init payload's `headers` win.
        let mut headers = self.upgrade_headers.clone();
        if let Some(serde_json::Value::Object(payload_headers)) =
            payload.as_ref().and_then(|p| p.get("headers"))
        {
            for (name, value) in payload_headers {
                let value = match value {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                headers.insert(name.to_ascii_lowercase(), value);
            }
        }
        let names: Vec<String> = headers.keys().cloned().collect();
        let lookup = |name: &str| headers.get(name).cloned();
        match self.app.engine.authenticate(&lookup, &names).await {
            Ok(identity) => {
                self.init = InitState::Accepted;
                self.identity = Some(identity);
                Reply {
                    frames: vec![frame("connection_ack", None, None)],
                    start_keepalive: true,
                    close: None,
                }
            }
            Err(error) => {
                self.init = InitState::Pending;
                match self.protocol {
                    Protocol::Legacy => Reply {
                        frames: vec![frame(
                            "connection_error",
                            None,
                            Some(&json_string(&error.message)),
                        )],
                        close: Some((
                            CLOSE_BAD_REQUEST,
                            wrapped_reason(&format!(
                                "4400: Connection initialization failed: {}",
                                error.message
                            )),
                        )),
                        start_keepalive: false,
                    },
                    Protocol::TransportWs => {
                        Reply::close(CLOSE_FORBIDDEN, wrapped_reason("4403: Forbidden"))
                    }
                }
            }
        }
    }

    /// Hasura's answer to a `start`/`subscribe` it refuses before running anything.
    fn reject_start(&self, id: &str, message: &str) -> Reply {
        let error = GqlError::new(code::START_FAILED, "$", message);
        match self.protocol {
            Protocol::Legacy => Reply {
                frames: vec![
                    frame("error", Some(id), Some(&error.to_json())),
                    frame("complete", Some(id), None),
                ],
                ..Reply::default()
            },
            Protocol::TransportWs => Reply {
                frames: vec![
                    frame("error", Some(id), Some(&error.to_json())),
                    frame("error", Some(id), Some(&json_string(message))),
                ],
                close: Some((CLOSE_NORMAL, message.to_owned())),
                start_keepalive: false,
            },
        }
    }

    fn start(&mut self, id: String, payload: serde_json::Value) -> Reply {
        if self.init != InitState::Accepted {
            return self.reject_start(&id, "start received before the connection is initialised");
        }
        if self.operations.contains_key(&id) {
            return self.reject_start(
                &id,
                &format!("an operation already exists with this id: {id}"),
            );
        }
        let prepared = RawRequest::from_json(&payload).and_then(exec::prepare);
        let prepared = match prepared {
            Ok(prepared) => prepared,
            Err(error) => {
                return Reply {
                    frames: vec![
                        request_error_frame(self.protocol, &id, &error),
                        frame("complete", Some(&id), None),
                    ],
                    ..Reply::default()
                };
            }
        };
        let generation = self.next_generation;
        self.next_generation += 1;
        let cancel = self.token.child_token();
        self.operations.insert(
            id.clone(),
            Operation {
                generation,
                cancel: cancel.clone(),
            },
        );
        let task = OperationTask {
            engine: self.app.engine.clone(),
            vars: self
                .identity
                .as_ref()
                .map(|i| i.vars.clone())
                .unwrap_or_default(),
            protocol: self.protocol,
            id,
            generation,
            outbound: self.outbound.clone(),
            cancel,
        };
        self.app.sockets.tracker.spawn(task.run(prepared));
        Reply::default()
    }
}

/// An error found before execution: `error` with `{"errors":[...]}` (legacy) or an array
/// (graphql-transport-ws).
fn request_error_frame(protocol: Protocol, id: &str, error: &GqlError) -> String {
    let payload = match protocol {
        Protocol::Legacy => error.to_response_json(),
        Protocol::TransportWs => format!("[{}]", error.to_json()),
    };
    frame("error", Some(id), Some(&payload))
}

async fn tick(interval: &mut Option<tokio::time::Interval>) {
    match interval {
        Some(interval) => {
            interval.tick().await;
        }
        None => std::future::pending().await,
    }
}

async fn send_text(
    sink: &mut SplitSink<WebSocket, Message>,
    text: String,
) -> Result<(), axum::Error> {
    sink.send(Message::Text(Utf8Bytes::from(text))).await
}

/// Reads until the client answers the close frame (or the connection ends), within bounds.
async fn wait_for_close_reply(stream: &mut SplitStream<WebSocket>) {
    let _ = tokio::time::timeout(CLOSE_REPLY_TIMEOUT, async {
        while let Some(Ok(message)) = stream.next().await {
            if matches!(message, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

struct OperationTask {
    engine: Arc<Engine>,
    vars: Arc<SessionVariables>,
    protocol: Protocol,
    id: String,
    generation: u64,
    outbound: mpsc::Sender<Outbound>,
    cancel: CancellationToken,
}

impl OperationTask {
    async fn run(self, prepared: Prepared) {
        if prepared.kind == OperationType::Subscription {
            self.run_live(prepared).await;
        } else {
            self.run_once(prepared).await;
        }
        let _ = self
            .outbound
            .send(Outbound::Done {
                id: self.id.clone(),
                generation: self.generation,
            })
            .await;
    }

    async fn send(&self, text: String) -> bool {
        self.outbound
            .send(Outbound::Frame {
                id: self.id.clone(),
                generation: self.generation,
                text,
            })
            .await
            .is_ok()
    }

    fn data_frame(&self, body: &str) -> String {
        let kind = match self.protocol {
            Protocol::Legacy => "data",
            Protocol::TransportWs => "next",
        };
        frame(kind, Some(&self.id), Some(body))
    }

    fn complete_frame(&self) -> String {
        frame("complete", Some(&self.id), None)
    }

    /// A query or mutation: one result, then `complete`. Runs to the end even if the client
    /// stops it, so a mutation never stops half-way; its frames are then dropped.
    async fn run_once(&self, prepared: Prepared) {
        let schema = self.engine.schema_for(&self.vars.role);
        let outcome = exec::execute(schema, &self.engine.pool, &prepared, &self.vars).await;
        let text = match (&outcome, self.protocol) {
            (Outcome::Data(body), _) => self.data_frame(body),
            (Outcome::Error(error), Protocol::Legacy) if error.during_execution => {
                self.data_frame(&live_body(&outcome))
            }
            (Outcome::Error(error), protocol) => request_error_frame(protocol, &self.id, error),
        };
        if self.send(text).await {
            self.send(self.complete_frame()).await;
        }
    }

    async fn run_live(&self, prepared: Prepared) {
        let mut live = LiveQuery::new(
            self.engine.clone(),
            prepared,
            self.vars.clone(),
            self.cancel.clone(),
        );
        let mut first = true;
        while let Some(outcome) = live.next().await {
            if let Outcome::Error(error) = &outcome
                && first
                && !error.during_execution
            {
                if self
                    .send(request_error_frame(self.protocol, &self.id, error))
                    .await
                {
                    self.send(self.complete_frame()).await;
                }
                return;
            }
            first = false;
            if !self.send(self.data_frame(&live_body(&outcome))).await {
                return;
            }
        }
    }
}
