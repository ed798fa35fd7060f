//! Opening the WebSocket, and watching how it ends.

use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{Sink, Stream};
use http::HeaderValue;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};
use url::Url;

use crate::error::{DbError, NetworkErrorKind};

/// `operation` of errors about the subscription connection itself.
pub(crate) const CONNECTION_OPERATION: &str = "subscription connection";

/// The only subprotocol graphql-ws-client speaks. Hasura picks it only when it is the whole
/// header value (anything else gets the legacy `graphql-ws`).
const SUBPROTOCOL: &str = "graphql-transport-ws";

/// Close code Hasura sends on graphql-transport-ws when `connection_init` is rejected.
pub(crate) const CLOSE_FORBIDDEN: u16 = 4403;
/// Close code graphql-ws-client sends itself when keep-alive pings go unanswered.
pub(crate) const CLOSE_KEEP_ALIVE_FAILED: u16 = 4503;

/// Opens a WebSocket to Hasura. A trait so the supervisor can be driven by an in-memory server in
/// tests.
pub(crate) trait Dial: Send + Sync + 'static {
    type Socket: Stream<Item = Result<Message, tungstenite::Error>>
        + Sink<Message, Error = tungstenite::Error>
        + Send
        + Sync
        + Unpin
        + 'static;

    /// The URL, for errors and logs.
    fn url(&self) -> &str;

    fn dial(&self) -> impl Future<Output = Result<Self::Socket, DbError>> + Send;
}

/// The real dialer: tokio-tungstenite over TCP, with rustls for `wss://`.
pub(crate) struct TungsteniteDialer {
    pub url: Url,
    pub admin_secret: Option<HeaderValue>,
    pub tls: Arc<rustls::ClientConfig>,
    pub connect_timeout: Duration,
}

impl Dial for TungsteniteDialer {
    type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

    fn url(&self) -> &str {
        self.url.as_str()
    }

    async fn dial(&self) -> Result<Self::Socket, DbError> {
        let url = self.url.as_str();
        let mut request = url
            .into_client_request()
            .map_err(|error| dial_error(url, error))?;
        let headers = request.headers_mut();
        headers.insert(
            http::header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(SUBPROTOCOL),
        );
        if let Some(secret) = &self.admin_secret {
            // Hasura also authenticates with the upgrade request's headers.
            headers.insert(crate::client::ADMIN_SECRET_HEADER, secret.clone());
        }
        let connector = if self.url.scheme() == "wss" {
            Connector::Rustls(self.tls.clone())
        } else {
            Connector::Plain
        };
        let connecting = tokio_tungstenite::connect_async_tls_with_config(
            request,
            None,
            // Snapshots are small and latency matters more than packet count.
            true,
            Some(connector),
        );
        match tokio::time::timeout(self.connect_timeout, connecting).await {
            Ok(Ok((socket, _response))) => Ok(socket),
            Ok(Err(error)) => Err(dial_error(url, error)),
            Err(_elapsed) => Err(DbError::Network {
                operation: CONNECTION_OPERATION,
                url: url.to_owned(),
                kind: NetworkErrorKind::Timeout,
                source: None,
            }),
        }
    }
}

fn dial_error(url: &str, error: tungstenite::Error) -> DbError {
    match error {
        tungstenite::Error::Http(response) => DbError::Http {
            operation: CONNECTION_OPERATION,
            url: url.to_owned(),
            status: response.status().as_u16(),
            body: crate::error::body_excerpt(response.body().as_deref().unwrap_or_default()),
        },
        tungstenite::Error::Protocol(error) => DbError::Decode {
            operation: CONNECTION_OPERATION,
            message: format!("WebSocket handshake with {url} failed: {error}"),
        },
        tungstenite::Error::Io(_) | tungstenite::Error::Tls(_) | tungstenite::Error::Url(_) => {
            DbError::Network {
                operation: CONNECTION_OPERATION,
                url: url.to_owned(),
                kind: NetworkErrorKind::Connect,
                source: Some(Arc::new(error)),
            }
        }
        other => DbError::Network {
            operation: CONNECTION_OPERATION,
            url: url.to_owned(),
            kind: NetworkErrorKind::Io,
            source: Some(Arc::new(other)),
        },
    }
}

/// How a socket ended, as first observed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SocketEnd {
    ClosedByServer { code: u16, reason: String },
    ClosedByClient { code: u16, reason: String },
    Failed(String),
    Eof,
}

impl SocketEnd {
    /// The error subscribers and logs see for a connection that ended this way.
    pub(crate) fn into_error(self, url: &str) -> DbError {
        let network = |kind, source: Option<String>| DbError::Network {
            operation: CONNECTION_OPERATION,
            url: url.to_owned(),
            kind,
            source: source.map(|text| Arc::new(StringError(text)) as crate::error::ErrorSource),
        };
        match self {
            Self::ClosedByServer { code, reason } if code == CLOSE_FORBIDDEN => {
                DbError::AccessDenied {
                    operation: CONNECTION_OPERATION,
                    message: forbidden_message(&reason),
                }
            }
            Self::ClosedByServer { code, reason } => network(
                NetworkErrorKind::Closed {
                    code: Some(code),
                    reason,
                },
                None,
            ),
            Self::ClosedByClient { code, .. } if code == CLOSE_KEEP_ALIVE_FAILED => network(
                NetworkErrorKind::Timeout,
                Some("no message from the server within the keep-alive period".to_owned()),
            ),
            Self::ClosedByClient { code, reason } => network(
                NetworkErrorKind::Io,
                Some(format!("closed by this client with code {code}: {reason}")),
            ),
            Self::Failed(message) => network(NetworkErrorKind::Io, Some(message)),
            Self::Eof => network(
                NetworkErrorKind::Closed {
                    code: None,
                    reason: String::new(),
                },
                None,
            ),
        }
    }
}

pub(crate) fn forbidden_message(reason: &str) -> String {
    if reason.is_empty() {
        "the server rejected connection_init (4403 Forbidden): wrong or missing admin secret"
            .to_owned()
    } else {
        format!("the server rejected connection_init ({reason}): wrong or missing admin secret")
    }
}

/// A plain message as an error source.
#[derive(Debug)]
pub(crate) struct StringError(pub String);

impl std::fmt::Display for StringError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StringError {}

/// Records the first close frame or error that passes through a socket, so the supervisor can
/// say why a connection ended (graphql-ws-client's actor just returns).
pub(crate) struct ObservedSocket<S> {
    inner: S,
    end: Arc<Mutex<Option<SocketEnd>>>,
}

impl<S> ObservedSocket<S> {
    pub(crate) fn new(inner: S) -> (Self, Arc<Mutex<Option<SocketEnd>>>) {
        let end = Arc::new(Mutex::new(None));
        (
            Self {
                inner,
                end: end.clone(),
            },
            end,
        )
    }

    fn record(&self, end: impl FnOnce() -> SocketEnd) {
        let mut slot = self.end.lock().unwrap_or_else(PoisonError::into_inner);
        if slot.is_none() {
            *slot = Some(end());
        }
    }
}

fn close_parts(frame: Option<&tungstenite::protocol::CloseFrame>) -> (u16, String) {
    match frame {
        Some(frame) => (u16::from(frame.code), frame.reason.to_string()),
        None => (u16::from(CloseCode::Status), String::new()),
    }
}

impl<S> Stream for ObservedSocket<S>
where
    S: Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
{
    type Item = Result<Message, tungstenite::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let item = std::task::ready!(Pin::new(&mut self.inner).poll_next(cx));
        match &item {
            Some(Ok(Message::Close(frame))) => self.record(|| {
                let (code, reason) = close_parts(frame.as_ref());
                SocketEnd::ClosedByServer { code, reason }
            }),
            Some(Err(error)) => self.record(|| SocketEnd::Failed(error.to_string())),
            None => self.record(|| SocketEnd::Eof),
            Some(Ok(_)) => {}
        }
        Poll::Ready(item)
    }
}

impl<S> Sink<Message> for ObservedSocket<S>
where
    S: Sink<Message, Error = tungstenite::Error> + Unpin,
{
    type Error = tungstenite::Error;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Pin::new(&mut self.inner).poll_ready(cx)
    }

    fn start_send(mut self: Pin<&mut Self>, item: Message) -> Result<(), Self::Error> {
        if let Message::Close(frame) = &item {
            self.record(|| {
                let (code, reason) = close_parts(frame.as_ref());
                SocketEnd::ClosedByClient { code, reason }
            });
        }
        Pin::new(&mut self.inner).start_send(item)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }
}
