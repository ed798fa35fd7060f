//! The supervisor: one task that owns the WebSocket, (re)connects with backoff, subscribes every
//! registered operation on each new connection, and hands each subscription's messages to a
//! forwarder task that feeds the consumer's bounded channel.
//!
//! ```text
//!  SubscriptionClient::subscribe ──register──► Registry ◄──────── supervisor (one per client)
//!                                                │                   │ dial, connection_init, ack
//!  SnapshotStream ◄── bounded mpsc ◄── forwarder ◄── ws Subscription ◄── ConnectionActor (socket)
//! ```
//!
//! Live queries make recovery simple: after a reconnect every operation is subscribed again and
//! its first message is the whole current result, so nothing that changed during the outage is
//! lost.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::future::IntoFuture;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures::StreamExt;
use graphql_ws_client::graphql::GraphqlOperation;
use logger::Secret;
use serde::Serialize;
use serde::ser::SerializeMap;
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::ConnectionState;
use super::backoff::{Backoff, HEALTHY_CONNECTION, RECONNECT, Retries};
use super::socket::{self, CONNECTION_OPERATION, Dial, ObservedSocket, SocketEnd};
use crate::error::{self, DbError, NetworkErrorKind};

/// One message for a consumer: a live query's `data`, or an error.
pub(crate) type RawItem = Result<serde_json::Value, DbError>;

/// A subscription document with its variables, resent after every reconnect.
#[derive(Debug, Clone)]
pub(crate) struct RawOperation {
    pub operation_name: &'static str,
    pub query: &'static str,
    pub variables: Arc<serde_json::Value>,
}

impl Serialize for RawOperation {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(3))?;
        map.serialize_entry("query", self.query)?;
        map.serialize_entry("variables", &*self.variables)?;
        map.serialize_entry("operationName", self.operation_name)?;
        map.end()
    }
}

impl GraphqlOperation for RawOperation {
    type Response = serde_json::Value;
    type Error = std::convert::Infallible;

    fn decode(&self, data: serde_json::Value) -> Result<Self::Response, Self::Error> {
        Ok(data)
    }
}

/// Tunables of the supervisor; [`Settings::new`] gives the production values.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    /// Sent in `connection_init` as `{"headers": {"x-hasura-admin-secret": ...}}`.
    pub admin_secret: Option<Secret<String>>,
    /// From the socket being open to `connection_ack`.
    pub handshake_timeout: Duration,
    pub keep_alive_interval: Option<Duration>,
    pub backoff: Backoff,
}

/// How often the client pings when the server has been silent. Hasura sends its own keep-alive
/// every 5 s (`HASURA_GRAPHQL_WEBSOCKET_KEEPALIVE`), so on a healthy socket something arrives at
/// least this often and our pings are rare.
pub(crate) const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// Unanswered keep-alive periods tolerated. With graphql-ws-client's counting, a socket silent
/// for (retries + 3) intervals, here 20 s, is closed and reconnected: a half-open TCP
/// connection (a host's NAT dropped it) is found in seconds instead of never.
pub(crate) const KEEP_ALIVE_RETRIES: usize = 1;
/// Per-subscription buffer inside graphql-ws-client. Forwarders drain it at once, so it only
/// smooths bursts; a full buffer would stall the whole socket.
const WS_SUBSCRIPTION_BUFFER: usize = 16;
/// How long shutdown waits for the close frame to go out and the connection task to end before
/// aborting it.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// Errors a forwarder keeps for a consumer that is not reading; snapshots are conflated (only the
/// newest is kept), errors are not, up to this many.
const MAX_PENDING_ERRORS: usize = 16;

impl Settings {
    pub(crate) fn new(admin_secret: Option<Secret<String>>, handshake_timeout: Duration) -> Self {
        Self {
            admin_secret,
            handshake_timeout,
            keep_alive_interval: Some(KEEP_ALIVE_INTERVAL),
            backoff: RECONNECT,
        }
    }
}

struct Entry {
    operation: RawOperation,
    sender: mpsc::Sender<RawItem>,
}

#[derive(Default)]
struct Registry {
    next_key: u64,
    entries: BTreeMap<u64, Entry>,
    /// Set when the supervisor has stopped: no more registrations.
    closed: bool,
}

/// What the client handles, the streams and the supervisor share.
pub(crate) struct Shared {
    registry: Mutex<Registry>,
    /// Wakes the supervisor when a subscription is registered.
    registered: Notify,
    state: watch::Sender<ConnectionState>,
}

impl Shared {
    pub(crate) fn new() -> Self {
        Self {
            registry: Mutex::new(Registry::default()),
            registered: Notify::new(),
            state: watch::Sender::new(ConnectionState::Connecting),
        }
    }

    fn registry(&self) -> MutexGuard<'_, Registry> {
        // Nothing panics while holding the lock; if something did, the map is still consistent.
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds an operation; `None` once the supervisor has stopped.
    pub(crate) fn register(
        &self,
        operation: RawOperation,
        sender: mpsc::Sender<RawItem>,
    ) -> Option<u64> {
        let key = {
            let mut registry = self.registry();
            if registry.closed {
                return None;
            }
            let key = registry.next_key;
            registry.next_key += 1;
            registry.entries.insert(key, Entry { operation, sender });
            key
        };
        self.registered.notify_one();
        Some(key)
    }

    pub(crate) fn unregister(&self, key: u64) {
        self.registry().entries.remove(&key);
    }

    pub(crate) fn subscribe_state(&self) -> watch::Receiver<ConnectionState> {
        self.state.subscribe()
    }

    pub(crate) fn state(&self) -> ConnectionState {
        self.state.borrow().clone()
    }

    fn set_state(&self, state: ConnectionState) {
        self.state.send_replace(state);
    }

    /// Tells every subscriber about an outage. Best effort: a consumer whose buffer is full is
    /// behind anyway and will see the next snapshot.
    fn broadcast(&self, error: &DbError) {
        for entry in self.registry().entries.values() {
            let _ = entry.sender.try_send(Err(error.clone()));
        }
    }

    /// Registered operations not in `skip`.
    fn entries_except(
        &self,
        skip: impl Fn(u64) -> bool,
    ) -> Vec<(u64, RawOperation, mpsc::Sender<RawItem>)> {
        self.registry()
            .entries
            .iter()
            .filter(|(key, _)| !skip(**key))
            .map(|(key, entry)| (*key, entry.operation.clone(), entry.sender.clone()))
            .collect()
    }

    fn contains(&self, key: u64) -> bool {
        self.registry().entries.contains_key(&key)
    }

    /// Drops every sender, so every stream ends.
    fn close(&self) {
        let mut registry = self.registry();
        registry.closed = true;
        registry.entries.clear();
    }
}

struct Connection {
    client: graphql_ws_client::Client,
    actor: graphql_ws_client::ConnectionActor,
    end: Arc<Mutex<Option<SocketEnd>>>,
}

fn observed_end(end: &Mutex<Option<SocketEnd>>) -> Option<SocketEnd> {
    end.lock().unwrap_or_else(PoisonError::into_inner).clone()
}

/// Dials and runs the graphql-transport-ws handshake up to `connection_ack`.
async fn connect<D: Dial>(dialer: &D, settings: &Settings) -> Result<Connection, DbError> {
    let url = dialer.url();
    let handshake = async {
        let socket = dialer.dial().await?;
        let (socket, end) = ObservedSocket::new(socket);
        let mut builder = graphql_ws_client::Client::build(socket)
            .subscription_buffer_size(WS_SUBSCRIPTION_BUFFER);
        if let Some(secret) = &settings.admin_secret {
            let payload = serde_json::json!({
                "headers": { crate::client::ADMIN_SECRET_HEADER: secret.expose() }
            });
            builder = builder.payload(payload).map_err(|error| DbError::Decode {
                operation: CONNECTION_OPERATION,
                message: error.to_string(),
            })?;
        }
        if let Some(interval) = settings.keep_alive_interval {
            builder = builder
                .keep_alive_interval(interval)
                .keep_alive_retries(KEEP_ALIVE_RETRIES);
        }
        match builder.build().await {
            Ok((client, actor)) => Ok(Connection { client, actor, end }),
            Err(error) => Err(handshake_error(url, error, observed_end(&end))),
        }
    };
    match tokio::time::timeout(settings.handshake_timeout, handshake).await {
        Ok(result) => result,
        Err(_elapsed) => Err(DbError::Network {
            operation: CONNECTION_OPERATION,
            url: url.to_owned(),
            kind: NetworkErrorKind::Timeout,
            source: Some(Arc::new(socket::StringError(
                "no connection_ack within the connect timeout".to_owned(),
            ))),
        }),
    }
}

fn handshake_error(url: &str, error: graphql_ws_client::Error, end: Option<SocketEnd>) -> DbError {
    use graphql_ws_client::Error as WsError;
    match error {
        WsError::Close(code, reason) => SocketEnd::ClosedByServer { code, reason }.into_error(url),
        WsError::Decode(message) => DbError::Decode {
            operation: CONNECTION_OPERATION,
            message: format!("during the graphql-transport-ws handshake: {message}"),
        },
        other => match end {
            Some(end) => end.into_error(url),
            None => DbError::Network {
                operation: CONNECTION_OPERATION,
                url: url.to_owned(),
                kind: NetworkErrorKind::Io,
                source: Some(Arc::new(other)),
            },
        },
    }
}

/// Runs until `cancel`: connect, serve a session, back off, again.
pub(crate) async fn supervise<D: Dial>(
    dialer: D,
    settings: Settings,
    shared: Arc<Shared>,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    let url = dialer.url().to_owned();
    let mut backoff = settings.backoff.start();
    // The outage subscribers were last told about, so a long outage is reported once, not at
    // every attempt.
    let mut reported: Option<String> = None;
    loop {
        let connected = tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            connected = connect(&dialer, &settings) => connected,
        };
        let error = match connected {
            Ok(connection) => {
                shared.set_state(ConnectionState::Connected);
                if reported.take().is_some() || backoff.attempt() > 0 {
                    tracing::info!(url = %url, attempt = backoff.attempt(), "subscription connection restored");
                }
                let started = Instant::now();
                match run_session(connection, &shared, &cancel, &tracker, &url).await {
                    SessionEnd::Cancelled => break,
                    SessionEnd::Lost(error) => {
                        if started.elapsed() >= HEALTHY_CONNECTION {
                            backoff.reset();
                        }
                        error
                    }
                }
            }
            Err(error) => error,
        };
        // The policy may carry a deadline; a reconnect loop has none to honour, so past it
        // the cap is the delay.
        let delay = backoff.next_delay().unwrap_or(settings.backoff.cap);
        tracing::warn!(
            url = %url,
            attempt = backoff.attempt(),
            delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            cause = %error,
            "subscription connection down, reconnecting"
        );
        let summary = error.to_string();
        if reported.as_deref() != Some(summary.as_str()) {
            shared.broadcast(&error);
            reported = Some(summary);
        }
        shared.set_state(ConnectionState::Reconnecting {
            attempt: backoff.attempt(),
            retry_in: delay,
            error,
        });
        tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            () = tokio::time::sleep(delay) => {}
        }
        shared.set_state(ConnectionState::Connecting);
    }
    shared.close();
    shared.set_state(ConnectionState::Stopped);
    tracing::debug!(url = %url, "subscription client stopped");
}

enum SessionEnd {
    Cancelled,
    Lost(DbError),
}

/// Why a forwarder returned.
enum ForwardEnd {
    /// The consumer dropped its stream: forget the subscription.
    ConsumerGone,
    /// The server completed the subscription (after an `error`) or the socket went away.
    Completed,
}

/// One connection's life: subscribe everything, forward messages, pick up new registrations,
/// resubscribe operations the server completed, until the socket ends or `cancel`.
async fn run_session(
    connection: Connection,
    shared: &Shared,
    cancel: &CancellationToken,
    tracker: &TaskTracker,
    url: &str,
) -> SessionEnd {
    let Connection { client, actor, end } = connection;
    let mut actor_task = tracker.spawn(actor.into_future());
    let mut actor_done = false;
    let mut forwarders: JoinSet<ForwardEnd> = JoinSet::new();
    let mut forwarder_keys: HashMap<tokio::task::Id, u64> = HashMap::new();
    let mut active: HashSet<u64> = HashSet::new();
    // Operations the server completed, with when to subscribe them again.
    let mut retry_at: HashMap<u64, Instant> = HashMap::new();
    let mut retry_backoff: HashMap<u64, Retries> = HashMap::new();

    let outcome = loop {
        let due = shared.entries_except(|key| active.contains(&key) || retry_at.contains_key(&key));
        if !due.is_empty() {
            // Subscribing only queues a message for the actor, but stay responsive to shutdown
            // even if the socket's write side were stuck.
            let subscribing = async {
                let mut started = Vec::with_capacity(due.len());
                for (key, operation, sender) in due {
                    let operation_name = operation.operation_name;
                    match client.subscribe(operation).await {
                        Ok(stream) => started.push((key, operation_name, stream, sender)),
                        // The actor is gone: the socket ended under us.
                        Err(_) => return Err(()),
                    }
                }
                Ok(started)
            };
            let started = tokio::select! {
                biased;
                () = cancel.cancelled() => break SessionEnd::Cancelled,
                started = subscribing => started,
            };
            let Ok(started) = started else {
                break SessionEnd::Lost(lost_error(&end, url));
            };
            for (key, operation_name, stream, sender) in started {
                let handle =
                    forwarders.spawn(tracker.track_future(forward(operation_name, stream, sender)));
                forwarder_keys.insert(handle.id(), key);
                active.insert(key);
            }
        }
        let next_retry = retry_at.values().min().copied();
        tokio::select! {
            biased;
            () = cancel.cancelled() => break SessionEnd::Cancelled,
            _ = &mut actor_task => {
                actor_done = true;
                break SessionEnd::Lost(lost_error(&end, url));
            }
            Some(joined) = forwarders.join_next_with_id() => {
                let (id, ended) = match joined {
                    Ok((id, ended)) => (id, ended),
                    // A forwarder that panicked: subscribe it again like a completed one.
                    Err(error) => (error.id(), ForwardEnd::Completed),
                };
                let Some(key) = forwarder_keys.remove(&id) else { continue };
                active.remove(&key);
                match ended {
                    ForwardEnd::ConsumerGone => {
                        shared.unregister(key);
                        retry_backoff.remove(&key);
                    }
                    ForwardEnd::Completed if shared.contains(key) => {
                        let delay = retry_backoff
                            .entry(key)
                            .or_insert_with(|| RECONNECT.start())
                            .next_delay()
                            .unwrap_or(RECONNECT.cap);
                        tracing::debug!(key, delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX), "server completed a subscription, subscribing again");
                        retry_at.insert(key, Instant::now() + delay);
                    }
                    ForwardEnd::Completed => {}
                }
            }
            () = shared.registered.notified() => {}
            () = sleep_until_opt(next_retry), if next_retry.is_some() => {
                let now = Instant::now();
                retry_at.retain(|_, at| *at > now);
            }
        }
    };

    if matches!(outcome, SessionEnd::Cancelled) {
        // Best effort: tell the server, then let the actor send the close frame and stop.
        let _ = tokio::time::timeout(
            SHUTDOWN_GRACE,
            client.clone().close(1000, "client shutting down"),
        )
        .await;
    }
    drop(client);
    // Forwarders end on their own once the actor is gone (their streams end); the grace period
    // lets them hand over what they still hold.
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while forwarders.join_next().await.is_some() {}
    });
    if drained.await.is_err() {
        forwarders.shutdown().await;
    }
    if !actor_done
        && tokio::time::timeout(SHUTDOWN_GRACE, &mut actor_task)
            .await
            .is_err()
    {
        actor_task.abort();
        let _ = actor_task.await;
    }
    outcome
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

fn lost_error(end: &Mutex<Option<SocketEnd>>, url: &str) -> DbError {
    observed_end(end).unwrap_or(SocketEnd::Eof).into_error(url)
}

/// Turns one graphql-transport-ws payload (`{data?, errors?}`) into a consumer item.
fn raw_item(
    operation: &'static str,
    payload: Result<serde_json::Value, graphql_ws_client::Error>,
) -> RawItem {
    let payload = payload.map_err(|error| DbError::Decode {
        operation,
        message: error.to_string(),
    })?;
    let envelope: error::Envelope =
        serde_json::from_value(payload).map_err(|error| DbError::Decode {
            operation,
            message: format!("not a GraphQL response: {error}"),
        })?;
    if let Some(errors) = envelope.errors
        && !errors.is_empty()
    {
        return Err(error::from_wire_errors(operation, errors));
    }
    envelope.data.ok_or_else(|| DbError::Decode {
        operation,
        message: "a message with neither `data` nor `errors`".to_owned(),
    })
}

/// Items a consumer has not taken yet. Live-query snapshots supersede each other, so only the
/// newest is kept; errors are kept in order (up to [`MAX_PENDING_ERRORS`]).
#[derive(Default)]
pub(crate) struct Pending {
    items: VecDeque<RawItem>,
}

impl Pending {
    pub(crate) fn push(&mut self, item: RawItem) {
        if item.is_ok() {
            self.items.retain(Result::is_err);
        }
        self.items.push_back(item);
        if self.items.iter().filter(|item| item.is_err()).count() > MAX_PENDING_ERRORS
            && let Some(oldest_error) = self.items.iter().position(Result::is_err)
        {
            self.items.remove(oldest_error);
        }
    }

    pub(crate) fn pop(&mut self) -> Option<RawItem> {
        self.items.pop_front()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.items.len()
    }
}

/// Moves one subscription's messages to its consumer, never blocking the socket: while the
/// consumer is behind, snapshots are conflated in [`Pending`].
async fn forward(
    operation: &'static str,
    mut stream: graphql_ws_client::Subscription<RawOperation>,
    sender: mpsc::Sender<RawItem>,
) -> ForwardEnd {
    let mut pending = Pending::default();
    loop {
        tokio::select! {
            biased;
            () = sender.closed() => return ForwardEnd::ConsumerGone,
            permit = sender.reserve(), if !pending.is_empty() => match permit {
                Ok(permit) => {
                    if let Some(item) = pending.pop() {
                        permit.send(item);
                    }
                }
                Err(_) => return ForwardEnd::ConsumerGone,
            },
            item = stream.next() => match item {
                Some(item) => pending.push(raw_item(operation, item)),
                None => {
                    // Hand over what fits; the next connection sends a fresh snapshot anyway.
                    while let Some(item) = pending.pop() {
                        if sender.try_send(item).is_err() {
                            break;
                        }
                    }
                    return ForwardEnd::Completed;
                }
            },
        }
    }
}
