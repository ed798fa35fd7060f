//! The HTTPS server: accepts TCP connections, completes TLS handshakes in their own tasks (a slow
//! client never holds up the accept loop), and serves HTTP/1.1 with hyper over the axum router,
//! until the shutdown token; then connections get a grace period to finish.
//!
//! The original had no timeouts and no limits (reference §10.3 item 6); here every phase of a
//! connection has a bound, named below with its reason. HTTP/2 is not offered: its clients
//! (none of ours needs it: the client app's fetch and the scaling service's forwarder speak
//! HTTP/1.1) could hold a connection open and idle with no timeout hyper enforces, while an
//! idle HTTP/1.1 connection is closed after [`HEADER_READ_TIMEOUT`].

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use edge::limit::ConnectionGate;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Connections open at once. A host runs a handful of mandelboxes, each with one client; 1024
/// leaves room for retries and the scaling service, and bounds memory (~100 KiB per connection).
pub const MAX_CONNECTIONS: usize = 1024;
/// Connections open at once from one client address (IPv6: one /64), unless
/// `WHIST_JSON_TRANSPORT_MAX_CONNECTIONS_PER_ADDRESS` says otherwise: one stranger cannot take
/// the [`MAX_CONNECTIONS`] places, while the scaling service's forwarder (one address, one
/// connection per request in flight, a few per mandelbox) stays far below it.
pub const DEFAULT_MAX_CONNECTIONS_PER_ADDRESS: usize = 64;
/// A TLS handshake takes a few round trips; one that is not done in 10 s is a stalled or
/// hostile client.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Waiting for a request's head: the first one after the handshake, each one on a keep-alive
/// connection, and its bytes once they start. A client that sends nothing for this long is
/// idle or a slow-loris; it must reconnect.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head (request line and headers) a client may send.
const MAX_HEADER_BYTES: usize = 64 * 1024;
/// After the shutdown token, open connections get this long to finish their requests; the host
/// joins its tasks with a 30 s deadline, so this stays well under it.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// After an accept error (e.g. out of file descriptors), wait before accepting again instead of
/// spinning.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Serves `app` over TLS on `listener` until `shutdown`, then lets connections finish for up to
/// [`SHUTDOWN_GRACE`] and drops the rest.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    app: Router,
    max_connections_per_address: usize,
    shutdown: CancellationToken,
) {
    let acceptor = TlsAcceptor::from(tls);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES);
    let builder = Arc::new(builder);
    let gate = ConnectionGate::new(MAX_CONNECTIONS, max_connections_per_address);
    let graceful = GracefulShutdown::new();
    let connections = TaskTracker::new();
    // Cancelled when the grace period is over: connections still open are dropped.
    let hard_stop = CancellationToken::new();

    loop {
        let (tcp, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "json_transport accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
        };
        let permit = match gate.admit(peer.ip()) {
            Ok(permit) => permit,
            Err(refusal) => {
                tracing::warn!(%peer, %refusal, "json_transport connection refused");
                drop(tcp);
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let builder = builder.clone();
        let app = app.clone();
        let watcher = graceful.watcher();
        let hard_stop = hard_stop.clone();
        connections.spawn(async move {
            let _permit = permit;
            let connection = async move {
                let tls =
                    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(error)) => {
                            tracing::debug!(%peer, %error, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake timed out");
                            return;
                        }
                    };
                let service = TowerToHyperService::new(app);
                let connection = builder.serve_connection(TokioIo::new(tls), service);
                if let Err(error) = watcher.watch(connection).await {
                    tracing::debug!(%peer, %error, "connection ended with an error");
                }
            };
            tokio::select! {
                () = connection => {}
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
        tracing::warn!("json_transport connections still open after the grace period: dropped");
    }
    hard_stop.cancel();
    connections.wait().await;
}
