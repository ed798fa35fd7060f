//! A Unix-socket proxy in front of the Docker Engine, one per emulated host (chaos): the host
//! service talks to it through `DOCKER_SOCKET`, and it forwards every request to the engine
//! untouched but for `Connection: close` (one request per connection, so each connection is
//! known to carry one request). Its long-lived `GET /events` connections can be cut on demand
//! ([`DockerProxy::cut_events`]), as a restart of the engine would cut them, and new ones refused
//! for a while, without restarting the engine this shared machine runs everything on.
//!
//! A cut closes the connection in the middle of the event stream's chunked body, what the host
//! sees of an engine that went away: an incomplete message, then its reopen attempts.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

/// The Docker Engine's socket on a Linux machine.
pub const ENGINE_SOCKET: &str = "/var/run/docker.sock";
/// The longest request head accepted (the engine's own limit is 1 MiB; ours are small).
const MAX_HEAD: usize = 1024 * 1024;

/// What the proxy has done so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DockerProxyStats {
    /// Requests forwarded, `/events` ones included.
    pub requests: u64,
    /// `GET /events` requests forwarded.
    pub events_opened: u64,
    /// `/events` connections open now.
    pub events_open: usize,
    /// `/events` connections closed by a cut.
    pub events_cut: u64,
    /// `/events` requests refused (closed unanswered) during a cut's window.
    pub events_refused: u64,
}

#[derive(Debug)]
struct State {
    /// Cancelled by a cut; replaced by a fresh one for the connections that follow.
    cut: CancellationToken,
    refuse_until: Option<Instant>,
    stats: DockerProxyStats,
}

#[derive(Debug)]
struct Shared {
    upstream: PathBuf,
    state: Mutex<State>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

/// A running proxy; [`DockerProxy::close`] (or dropping it) closes it and its connections.
#[derive(Debug)]
pub struct DockerProxy {
    path: PathBuf,
    shared: Arc<Shared>,
    stop: CancellationToken,
}

impl Drop for DockerProxy {
    fn drop(&mut self) {
        self.stop.cancel();
        let _ = std::fs::remove_file(&self.path);
    }
}

impl DockerProxy {
    /// Listens on the Unix socket `path` (replacing a stale one) and forwards to the engine's
    /// socket `upstream`.
    pub fn start(path: &Path, upstream: &Path) -> anyhow::Result<Self> {
        let _ = std::fs::remove_file(path);
        let listener =
            UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
        let shared = Arc::new(Shared {
            upstream: upstream.to_owned(),
            state: Mutex::new(State {
                cut: CancellationToken::new(),
                refuse_until: None,
                stats: DockerProxyStats::default(),
            }),
        });
        let stop = CancellationToken::new();
        tokio::spawn({
            let shared = shared.clone();
            let stop = stop.clone();
            async move {
                loop {
                    let accepted = tokio::select! {
                        () = stop.cancelled() => return,
                        accepted = listener.accept() => accepted,
                    };
                    match accepted {
                        Ok((stream, _)) => {
                            let shared = shared.clone();
                            let stop = stop.clone();
                            tokio::spawn(async move {
                                tokio::select! {
                                    () = stop.cancelled() => {}
                                    () = serve(stream, &shared) => {}
                                }
                            });
                        }
                        Err(error) => {
                            tracing::warn!(%error, "docker proxy: accept");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            }
        });
        Ok(Self {
            path: path.to_owned(),
            shared,
            stop,
        })
    }

    /// The socket to give the host service as `DOCKER_SOCKET`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Closes every open `/events` connection now, and closes new `/events` requests unanswered
    /// for `down_for` (zero: the host may reopen at once). Other requests are not touched.
    /// Returns how many event streams were cut.
    pub fn cut_events(&self, down_for: Duration) -> usize {
        let mut state = self.shared.lock();
        let cut = std::mem::take(&mut state.cut);
        cut.cancel();
        state.refuse_until = (!down_for.is_zero()).then(|| Instant::now() + down_for);
        let open = state.stats.events_open;
        state.stats.events_cut += open as u64;
        open
    }

    pub fn stats(&self) -> DockerProxyStats {
        self.shared.lock().stats
    }

    /// Stops listening, closes every connection and removes the socket; its figures stay.
    pub fn close(&self) {
        self.stop.cancel();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// One connection: one request, forwarded with `Connection: close`, and its answer streamed back
/// until the engine closes (or, for `/events`, until a cut).
async fn serve(mut client: UnixStream, shared: &Shared) {
    let mut buffer = Vec::with_capacity(4096);
    let head_end = loop {
        let mut chunk = [0u8; 4096];
        let n = match client.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        buffer.extend_from_slice(&chunk[..n]);
        if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        if buffer.len() > MAX_HEAD {
            return;
        }
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
    let events = head.split_whitespace().nth(1).is_some_and(is_events);
    let cut = {
        let mut state = shared.lock();
        if events && state.refuse_until.is_some_and(|t| Instant::now() < t) {
            state.stats.events_refused += 1;
            return;
        }
        state.stats.requests += 1;
        if events {
            state.stats.events_opened += 1;
            state.stats.events_open += 1;
        }
        state.cut.clone()
    };
    let _open = events.then(|| OpenEvents(shared));
    let Ok(mut engine) = UnixStream::connect(&shared.upstream).await else {
        return;
    };
    let mut request = close_connection(&head).into_bytes();
    request.extend_from_slice(&buffer[head_end..]);
    if engine.write_all(&request).await.is_err() {
        return;
    }
    let (mut engine_read, mut engine_write) = engine.split();
    let (mut client_read, mut client_write) = client.split();
    // The rest of the request body goes on as it comes; the client's end of the connection is
    // never passed on as a half-close (the engine would take it for a client that left).
    let to_engine = async {
        let mut chunk = [0u8; 8192];
        loop {
            match client_read.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if engine_write.write_all(&chunk[..n]).await.is_err() {
                        return;
                    }
                }
            }
        }
    };
    let to_client = async {
        let _ = tokio::io::copy(&mut engine_read, &mut client_write).await;
        let _ = client_write.shutdown().await;
    };
    tokio::select! {
        biased;
        // Only event streams are cut.
        () = cut.cancelled(), if events => {}
        () = to_client => {}
        // The client left before the answer was complete.
        () = to_engine => {}
    }
}

/// Counts an `/events` connection as open while it lives.
struct OpenEvents<'a>(&'a Shared);

impl Drop for OpenEvents<'_> {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.stats.events_open = state.stats.events_open.saturating_sub(1);
    }
}

/// `/events` or `/v1.41/events`, with or without a query.
fn is_events(target: &str) -> bool {
    let path = target.split('?').next().unwrap_or_default();
    let path = match path.strip_prefix("/v") {
        Some(rest) => rest
            .split_once('/')
            .filter(|(version, _)| version.chars().all(|c| c.is_ascii_digit() || c == '.'))
            .map_or(path, |(_, rest)| &path[path.len() - rest.len() - 1..]),
        None => path,
    };
    path == "/events"
}

/// The request head with its `Connection` (and `Keep-Alive`) headers replaced by
/// `Connection: close`.
fn close_connection(head: &str) -> String {
    let mut lines = head.trim_end_matches("\r\n").split("\r\n");
    let mut out = String::with_capacity(head.len() + 20);
    if let Some(request_line) = lines.next() {
        out.push_str(request_line);
        out.push_str("\r\n");
    }
    for line in lines {
        let name = line.split(':').next().unwrap_or_default().trim();
        if name.eq_ignore_ascii_case("connection") || name.eq_ignore_ascii_case("keep-alive") {
            continue;
        }
        out.push_str(line);
        out.push_str("\r\n");
    }
    out.push_str("Connection: close\r\n\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::{close_connection, is_events};

    #[test]
    fn events_requests_are_recognised_with_or_without_a_version() {
        assert!(is_events("/events"));
        assert!(is_events("/v1.41/events?since=1.5&filters=%7B%7D"));
        assert!(!is_events("/v1.41/containers/json"));
        assert!(!is_events("/v1.41/events/x"));
        assert!(!is_events("/version"));
        assert!(!is_events("/vx/events"));
    }

    #[test]
    fn the_head_asks_for_one_request_per_connection() {
        let head = "GET /_ping HTTP/1.1\r\nHost: docker\r\nconnection: keep-alive\r\nKeep-Alive: 5\r\n\r\n";
        assert_eq!(
            close_connection(head),
            "GET /_ping HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\r\n"
        );
    }
}
