//! The HTTP API's accept loop: HTTP/1.1 with hyper over the axum router, each connection
//! admitted by a [`ConnectionGate`] (a total cap and a cap per client address), a deadline on
//! each request head, the peer's address handed to the handlers as
//! [`axum::extract::ConnectInfo`]. `axum::serve` has none of these bounds: a few thousand idle
//! or byte-by-byte connections would hold the service's memory and file descriptors.
//!
//! Bodies are bounded where they are read (assign: [`crate::api`], json_transport:
//! [`crate::forward`]), each with its own size limit and deadline.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use edge::limit::ConnectionGate;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_service::Service as _;

/// Connections open at once (`WHIST_API_MAX_CONNECTIONS`): each costs a task and a few KiB of
/// buffers; 4,096 is far above the service's real load (clients hold a connection for one
/// assign and one json_transport) and well under a dyno's file-descriptor limit.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
/// Connections open at once from one client address (`WHIST_API_MAX_CONNECTIONS_PER_ADDRESS`).
/// Not applied behind trusted proxies, where every peer is a proxy.
pub const DEFAULT_MAX_CONNECTIONS_PER_ADDRESS: usize = 64;
/// A request head (request line and headers) must arrive within this long, counted from its
/// first byte (or from the end of the previous request on a kept-alive connection): a
/// slow-loris that sends a byte at a time is cut off here.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head (hyper's own default, made explicit): a larger one gets hyper's bare
/// `431`. Large enough that an oversize token in `Authorization` still reaches the handler and
/// gets its JSON `401` (tokens up to ~200 KB are among the hostile inputs we test).
pub const MAX_HEADER_BYTES: usize = 400 * 1024;
/// After shutdown, requests in flight get this long to finish.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// After an accept error (e.g. out of file descriptors), wait before accepting again.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// The caps on one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerLimits {
    pub max_connections: usize,
    /// 0: no per-address cap.
    pub max_connections_per_address: usize,
    pub header_read_timeout: Duration,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        Self {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_address: DEFAULT_MAX_CONNECTIONS_PER_ADDRESS,
            header_read_timeout: HEADER_READ_TIMEOUT,
        }
    }
}

/// Serves `app` on `listener` until `shutdown`, then lets requests finish for up to
/// [`SHUTDOWN_GRACE`] and drops the rest.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ListenerLimits,
    shutdown: CancellationToken,
) {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(MAX_HEADER_BYTES);
    let builder = Arc::new(builder);
    let gate = ConnectionGate::new(limits.max_connections, limits.max_connections_per_address);
    let graceful = GracefulShutdown::new();
    let connections = TaskTracker::new();
    let hard_stop = CancellationToken::new();
    loop {
        let (tcp, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "HTTP API accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
        };
        let permit = match gate.admit(peer.ip()) {
            Ok(permit) => permit,
            Err(refusal) => {
                tracing::debug!(%peer, %refusal, "HTTP API connection refused");
                drop(tcp);
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let builder = builder.clone();
        let app = app.clone();
        let watcher = graceful.watcher();
        let hard_stop = hard_stop.clone();
        connections.spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |mut request: hyper::Request<_>| {
                request
                    .extensions_mut()
                    .insert(ConnectInfo::<SocketAddr>(peer));
                // A Router is always ready: no poll_ready needed before call.
                let mut app = app.clone();
                let answer = app.call(request.map(axum::body::Body::new));
                async move { Ok::<_, Infallible>(answer.await.unwrap_or_else(|e| match e {})) }
            });
            let connection = builder.serve_connection(TokioIo::new(tcp), service);
            tokio::select! {
                result = watcher.watch(connection) => if let Err(error) = result {
                    tracing::debug!(%peer, %error, "HTTP API connection ended with an error");
                },
                () = hard_stop.cancelled() => {}
            }
        });
    }
    drop(listener);
    connections.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("HTTP API connections still open after the grace period: dropped");
    }
    hard_stop.cancel();
    connections.wait().await;
}
