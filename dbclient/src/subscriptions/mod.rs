//! Live-query subscriptions over one WebSocket (`graphql-transport-ws`), with reconnects.
//!
//! [`SubscriptionClient::start`] spawns a supervisor task that keeps one connection to Hasura
//! open: it dials (`Sec-WebSocket-Protocol: graphql-transport-ws`, admin secret as an upgrade
//! header and in `connection_init`), keeps it alive with pings, and when the connection drops,
//! the server goes away or a connect fails, it retries forever with capped exponential backoff
//! and full jitter ([`backoff`]) and subscribes every live stream again, until the client's
//! [`CancellationToken`] is cancelled.
//!
//! Each typed method returns a [`SnapshotStream`]: every item is the **whole** current result
//! (Hasura live queries), so a consumer only ever needs the latest one. The stream does not end
//! while the client runs; it yields `Err` items for problems and goes on:
//!
//! - a payload that does not decode (an unknown status, a malformed id) → one
//!   [`DbError::Decode`];
//! - a GraphQL error for that subscription → the mapped [`DbError`]; if the server then
//!   completes the subscription, it is subscribed again after a backoff;
//! - the connection going down → one error per outage (e.g. [`DbError::Network`], or
//!   [`DbError::AccessDenied`] for a rejected admin secret), then, after the reconnect, a fresh
//!   snapshot.
//!
//! A consumer that falls behind loses nothing that matters: the forwarder keeps only the newest
//! snapshot (plus any errors) until the consumer catches up, so a slow consumer never stalls the
//! socket or the other subscriptions, and memory stays bounded.

pub mod backoff;
pub mod operations;
mod socket;
mod supervisor;
#[cfg(test)]
mod tests;

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use graphql_client::GraphQLQuery;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{ConfigError, DbConfig};
use crate::error::DbError;
use supervisor::{RawItem, RawOperation, Settings, Shared};

/// Buffer between a subscription's forwarder and its consumer. Small on purpose: snapshots are
/// conflated in front of it, so a consumer that falls behind reads at most this many older
/// snapshots before the newest.
pub const SNAPSHOT_CHANNEL_CAPACITY: usize = 4;

/// Where the subscription connection stands; see [`SubscriptionClient::connection_state`].
#[derive(Debug, Clone)]
pub enum ConnectionState {
    /// Dialing or waiting for `connection_ack`.
    Connecting,
    /// Connected; every registered subscription is (being) subscribed.
    Connected,
    /// The last attempt or connection failed with `error`; the next attempt is in `retry_in`.
    Reconnecting {
        attempt: u32,
        retry_in: Duration,
        error: DbError,
    },
    /// The client was shut down; every stream has ended.
    Stopped,
}

/// Live-query subscriptions multiplexed over one self-healing WebSocket. Cheap to clone; all
/// clones share the connection. Runs until the token passed to [`SubscriptionClient::start`] is
/// cancelled or [`SubscriptionClient::shutdown`] is called.
#[derive(Clone)]
pub struct SubscriptionClient {
    shared: Arc<Shared>,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl fmt::Debug for SubscriptionClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SubscriptionClient")
            .field("state", &self.shared.state())
            .field("cancelled", &self.cancel.is_cancelled())
            .finish_non_exhaustive()
    }
}

impl SubscriptionClient {
    /// Spawns the supervisor (on the current tokio runtime) and returns at once; the first
    /// connection is made in the background. Stops when `shutdown` is cancelled.
    pub fn start(config: &DbConfig, shutdown: CancellationToken) -> Result<Self, ConfigError> {
        let admin_secret_header = config
            .admin_secret()
            .map(|secret| {
                let mut value = http::HeaderValue::from_str(secret.expose())
                    .map_err(|_| ConfigError::InvalidAdminSecret)?;
                value.set_sensitive(true);
                Ok::<_, ConfigError>(value)
            })
            .transpose()?;
        let dialer = socket::TungsteniteDialer {
            url: config.websocket_url().clone(),
            admin_secret: admin_secret_header,
            tls: crate::tls::websocket_client_config()?,
            connect_timeout: config.connect_timeout(),
        };
        let settings = Settings::new(config.admin_secret().cloned(), config.connect_timeout());
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| ConfigError::NoRuntime)?;
        Ok(Self::start_on(&runtime, dialer, settings, shutdown))
    }

    fn start_on<D: socket::Dial>(
        runtime: &tokio::runtime::Handle,
        dialer: D,
        settings: Settings,
        shutdown: CancellationToken,
    ) -> Self {
        let shared = Arc::new(Shared::new());
        let cancel = shutdown.child_token();
        let tracker = TaskTracker::new();
        tracker.spawn_on(
            supervisor::supervise(
                dialer,
                settings,
                shared.clone(),
                cancel.clone(),
                tracker.clone(),
            ),
            runtime,
        );
        // Only the supervisor spawns from here on, and it is tracked itself.
        tracker.close();
        Self {
            shared,
            cancel,
            tracker,
        }
    }

    /// The connection's state, for readiness checks and tests.
    pub fn connection_state(&self) -> watch::Receiver<ConnectionState> {
        self.shared.subscribe_state()
    }

    /// Stops the client: closes the socket, ends every stream, and waits for every task.
    pub async fn shutdown(&self) {
        self.cancel.cancel();
        self.tracker.wait().await;
    }

    /// Waits until the client has stopped (after its token was cancelled).
    pub async fn stopped(&self) {
        self.tracker.wait().await;
    }

    /// Subscribes to a live query generated by `graphql_client` and maps each `ResponseData`
    /// to a snapshot with `into_snapshot`.
    pub fn subscribe<Q, T>(
        &self,
        variables: Q::Variables,
        into_snapshot: fn(Q::ResponseData) -> T,
    ) -> SnapshotStream<T>
    where
        Q: GraphQLQuery,
        Q::ResponseData: 'static,
        T: 'static,
    {
        let body = Q::build_query(variables);
        let operation_name = body.operation_name;
        let decode: Decoder<T> = Arc::new(move |data| {
            serde_json::from_value::<Q::ResponseData>(data)
                .map(into_snapshot)
                .map_err(|error| DbError::Decode {
                    operation: operation_name,
                    message: error.to_string(),
                })
        });
        let (sender, receiver) = mpsc::channel(SNAPSHOT_CHANNEL_CAPACITY);
        let variables = match serde_json::to_value(&body.variables) {
            Ok(variables) => variables,
            Err(error) => {
                // Cannot happen for the generated variable types; reported, not panicked on.
                let _ = sender.try_send(Err(DbError::Decode {
                    operation: operation_name,
                    message: format!("cannot serialize the variables: {error}"),
                }));
                return SnapshotStream::new(receiver, decode, None);
            }
        };
        let operation = RawOperation {
            operation_name,
            query: body.query,
            variables: Arc::new(variables),
        };
        // A consumer arriving during an outage learns about it at once.
        if let ConnectionState::Reconnecting { error, .. } = self.shared.state() {
            let _ = sender.try_send(Err(error));
        }
        let registration = self
            .shared
            .register(operation, sender)
            .map(|key| Registration {
                shared: self.shared.clone(),
                key,
            });
        SnapshotStream::new(receiver, decode, registration)
    }
}

type Decoder<T> = Arc<dyn Fn(serde_json::Value) -> Result<T, DbError> + Send + Sync>;

/// Removes a subscription from the registry when its stream is dropped.
struct Registration {
    shared: Arc<Shared>,
    key: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.shared.unregister(self.key);
    }
}

/// A live query's snapshots: each `Ok` item is the whole current result. Ends only when the
/// client stops. Dropping it ends the subscription on the server.
pub struct SnapshotStream<T> {
    receiver: mpsc::Receiver<RawItem>,
    decode: Decoder<T>,
    _registration: Option<Registration>,
}

impl<T> SnapshotStream<T> {
    fn new(
        receiver: mpsc::Receiver<RawItem>,
        decode: Decoder<T>,
        registration: Option<Registration>,
    ) -> Self {
        Self {
            receiver,
            decode,
            _registration: registration,
        }
    }
}

impl<T> fmt::Debug for SnapshotStream<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SnapshotStream")
            .field("key", &self._registration.as_ref().map(|r| r.key))
            .finish_non_exhaustive()
    }
}

impl<T> Stream for SnapshotStream<T> {
    type Item = Result<T, DbError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.receiver.poll_recv(cx) {
            Poll::Ready(Some(Ok(data))) => Poll::Ready(Some((self.decode)(data))),
            Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Err(error))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}
