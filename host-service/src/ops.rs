//! Operations endpoint: Prometheus `/metrics`, `/healthz` (the process answers) and `/readyz`
//! (registered, subscribed, following Docker events and not draining).
//!
//! **Loopback and named networks only, whatever address it binds.** A mandelbox reaches the
//! host's addresses through its bridge gateway (`172.17.0.1`) from its own address, so a bind to
//! `0.0.0.0` would serve it the host's metrics. Every accepted connection whose peer is neither
//! a loopback address nor inside a network of `--ops-allow` is closed before a byte is read: the
//! check is on the peer address the kernel reports, so it holds for every interface, bridge and
//! published port, without a firewall rule to keep in step. Allow no network that holds
//! containers (Docker's address pools, `172.17.0.0/16` and up).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use tokio_util::sync::CancellationToken;

use crate::vitals::{SharedVitals, Vitals};

/// json_transport answers by `outcome`: `ok` (ports and key), `refused` (a 4xx: the caller's
/// request), `failed` (a 5xx: the host or its mandelbox). The JSON body's `code` is the
/// `code` label (`ok` for an answer).
pub const JSON_TRANSPORT_OUTCOMES: [&str; 3] = ["ok", "refused", "failed"];

/// The host service's metrics.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// Mandelboxes on this host by lifecycle phase (`starting`, `running`, `stopping`).
    pub mandelboxes: IntGaugeVec,
    /// Seconds from the allocation event to RUNNING.
    pub spinup_seconds: Histogram,
    /// Seconds from the allocation event to `.paramsReady` (the host's own overhead).
    pub params_ready_seconds: Histogram,
    /// Spin-ups that failed, by cause.
    pub spinup_failures: IntCounterVec,
    /// Mandelboxes torn down, by reason (`exited`, `failed`, `drained`, `reconciled`, `stopped`, `replaced`).
    pub teardowns: IntCounterVec,
    /// Stale mandelbox rows the sweeper removed.
    pub stale_rows_removed: IntCounter,
    /// Heartbeats that failed.
    pub heartbeat_failures: IntCounter,
    /// Resources held by mandelboxes (`ports`, `ttys`, `gpu_slots`).
    pub resources_held: IntGaugeVec,
    /// 1 while the database subscription is connected.
    pub subscription_up: IntGauge,
    /// 1 while the Docker event stream is open.
    pub docker_events_up: IntGauge,
    /// Warm boxes being prepared or waiting for a user.
    pub warm_mandelboxes: IntGauge,
    /// Seconds from a warm box's start to its waiting state (the pool's refill time).
    pub warm_prepare_seconds: Histogram,
    /// Warm boxes claimed by a user.
    pub warm_claims: IntCounter,
    /// Profile loads and saves that failed (`operation`: `load`, `save`).
    pub profile_failures: IntCounterVec,
    /// json_transport requests answered, by `outcome` ([`JSON_TRANSPORT_OUTCOMES`]) and `code`.
    pub json_transport_requests: IntCounterVec,
    /// Seconds from a json_transport request's head to its answer, by `outcome`.
    pub json_transport_seconds: HistogramVec,
    /// Seconds each phase of a spin-up took ([`PhaseClock`], phases in `docs/host-service.md`).
    pub spinup_phase_seconds: HistogramVec,
    /// Seconds each phase of a teardown took.
    pub teardown_phase_seconds: HistogramVec,
    /// 1 while the Docker Engine answers its probe ([`crate::vitals::follow_docker_engine`]).
    pub docker_engine_up: IntGauge,
    /// Times the Docker event stream was reopened after it broke.
    pub docker_events_reconnects: IntCounter,
    /// Memory, CPU, disks and GPUs, read on every scrape.
    pub vitals: Arc<Vitals>,
}

/// Times consecutive phases of one piece of work: each [`lap`](Self::lap) observes the time
/// since the previous lap (or the clock's start) under its phase's name. Phases a failed
/// spin-up never reached are not observed.
#[derive(Debug)]
pub struct PhaseClock<'a> {
    histogram: &'a HistogramVec,
    last: std::time::Instant,
    /// The phases ended so far, for a log line (`client=3.1ms profile=0.4ms …`).
    laps: Vec<(&'static str, std::time::Duration)>,
}

impl PhaseClock<'_> {
    /// Ends the phase `phase` now and starts the next one.
    pub fn lap(&mut self, phase: &'static str) {
        let now = std::time::Instant::now();
        let took = now.duration_since(self.last);
        self.histogram
            .with_label_values(&[phase])
            .observe(took.as_secs_f64());
        self.laps.push((phase, took));
        self.last = now;
    }
}

impl std::fmt::Display for PhaseClock<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (phase, took)) in self.laps.iter().enumerate() {
            let sep = if i == 0 { "" } else { " " };
            write!(f, "{sep}{phase}={:.1}ms", took.as_secs_f64() * 1e3)?;
        }
        Ok(())
    }
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new_custom(Some("whist_host".into()), None)?;
        let mandelboxes = IntGaugeVec::new(
            Opts::new("mandelboxes", "Mandelboxes on this host by phase"),
            &["phase"],
        )?;
        let buckets = vec![0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 40.0, 80.0];
        let spinup_seconds = Histogram::with_opts(
            HistogramOpts::new("spinup_seconds", "Allocation event to RUNNING")
                .buckets(buckets.clone()),
        )?;
        let params_ready_seconds = Histogram::with_opts(
            HistogramOpts::new("params_ready_seconds", "Allocation event to .paramsReady")
                .buckets(buckets.clone()),
        )?;
        let warm_prepare_seconds = Histogram::with_opts(
            HistogramOpts::new("warm_prepare_seconds", "Warm box start to waiting")
                .buckets(buckets),
        )?;
        let warm_mandelboxes =
            IntGauge::new("warm_mandelboxes", "Warm boxes preparing or waiting")?;
        let warm_claims = IntCounter::new("warm_claims_total", "Warm boxes claimed by a user")?;
        let spinup_failures = IntCounterVec::new(
            Opts::new("spinup_failures_total", "Failed spin-ups by cause"),
            &["cause"],
        )?;
        let teardowns = IntCounterVec::new(
            Opts::new("teardowns_total", "Mandelboxes torn down by reason"),
            &["reason"],
        )?;
        let stale_rows_removed =
            IntCounter::new("stale_rows_removed_total", "Stale mandelbox rows removed")?;
        let heartbeat_failures =
            IntCounter::new("heartbeat_failures_total", "Heartbeats that failed")?;
        let resources_held = IntGaugeVec::new(
            Opts::new("resources_held", "Resources held by mandelboxes"),
            &["resource"],
        )?;
        let subscription_up = IntGauge::new("subscription_up", "Database subscription connected")?;
        let docker_events_up = IntGauge::new("docker_events_up", "Docker event stream open")?;
        let profile_failures = IntCounterVec::new(
            Opts::new(
                "profile_failures_total",
                "Profile loads and saves that failed, by operation",
            ),
            &["operation"],
        )?;
        let json_transport_requests = IntCounterVec::new(
            Opts::new(
                "json_transport_requests_total",
                "json_transport requests answered, by outcome and code",
            ),
            &["outcome", "code"],
        )?;
        let json_transport_seconds = HistogramVec::new(
            HistogramOpts::new(
                "json_transport_request_duration_seconds",
                "json_transport request to answer, by outcome",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0,
            ]),
            &["outcome"],
        )?;
        let phase_buckets = vec![
            0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
        ];
        let spinup_phase_seconds = HistogramVec::new(
            HistogramOpts::new("spinup_phase_duration_seconds", "Spin-up phases")
                .buckets(phase_buckets.clone()),
            &["phase"],
        )?;
        let teardown_phase_seconds = HistogramVec::new(
            HistogramOpts::new("teardown_phase_duration_seconds", "Teardown phases")
                .buckets(phase_buckets),
            &["phase"],
        )?;
        let docker_engine_up = IntGauge::new("docker_engine_up", "Docker Engine answers")?;
        let docker_events_reconnects = IntCounter::new(
            "docker_events_reconnects_total",
            "Docker event stream reopened after it broke",
        )?;
        let vitals = Arc::new(Vitals::new()?);
        for c in [
            Box::new(SharedVitals(vitals.clone())) as Box<dyn prometheus::core::Collector>,
            Box::new(json_transport_requests.clone()),
            Box::new(json_transport_seconds.clone()),
            Box::new(spinup_phase_seconds.clone()),
            Box::new(teardown_phase_seconds.clone()),
            Box::new(docker_engine_up.clone()),
            Box::new(docker_events_reconnects.clone()),
            Box::new(mandelboxes.clone()),
            Box::new(spinup_seconds.clone()),
            Box::new(params_ready_seconds.clone()),
            Box::new(spinup_failures.clone()),
            Box::new(teardowns.clone()),
            Box::new(stale_rows_removed.clone()),
            Box::new(heartbeat_failures.clone()),
            Box::new(resources_held.clone()),
            Box::new(subscription_up.clone()),
            Box::new(docker_events_up.clone()),
            Box::new(warm_mandelboxes.clone()),
            Box::new(warm_prepare_seconds.clone()),
            Box::new(warm_claims.clone()),
            Box::new(profile_failures.clone()),
        ] {
            registry.register(c)?;
        }
        Ok(Self {
            registry,
            mandelboxes,
            spinup_seconds,
            params_ready_seconds,
            spinup_failures,
            teardowns,
            stale_rows_removed,
            heartbeat_failures,
            resources_held,
            subscription_up,
            warm_mandelboxes,
            warm_prepare_seconds,
            warm_claims,
            docker_events_up,
            profile_failures,
            json_transport_requests,
            json_transport_seconds,
            spinup_phase_seconds,
            teardown_phase_seconds,
            docker_engine_up,
            docker_events_reconnects,
            vitals,
        })
    }

    /// A clock for the phases of one spin-up, started now.
    pub fn spinup_phases(&self) -> PhaseClock<'_> {
        PhaseClock {
            histogram: &self.spinup_phase_seconds,
            last: std::time::Instant::now(),
            laps: Vec::new(),
        }
    }

    /// A clock for the phases of one teardown, started now.
    pub fn teardown_phases(&self) -> PhaseClock<'_> {
        PhaseClock {
            histogram: &self.teardown_phase_seconds,
            last: std::time::Instant::now(),
            laps: Vec::new(),
        }
    }

    /// Counts one json_transport answer of `status` with the body's `code` (`ok` for an
    /// answer), taken `elapsed` from the request's head.
    pub fn observe_json_transport(
        &self,
        status: axum::http::StatusCode,
        code: &str,
        elapsed: std::time::Duration,
    ) {
        let outcome = if status.is_success() {
            "ok"
        } else if status.is_client_error() {
            "refused"
        } else {
            "failed"
        };
        self.json_transport_requests
            .with_label_values(&[outcome, code])
            .inc();
        self.json_transport_seconds
            .with_label_values(&[outcome])
            .observe(elapsed.as_secs_f64());
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        if let Err(error) = TextEncoder::new().encode(&self.registry.gather(), &mut buffer) {
            tracing::warn!(%error, "cannot encode metrics");
        }
        String::from_utf8_lossy(&buffer).into_owned()
    }
}

/// What `/readyz` checks.
#[derive(Debug, Default)]
pub struct Readiness {
    pub registered: AtomicBool,
    pub draining: AtomicBool,
}

#[derive(Debug, Clone)]
struct OpsState {
    metrics: Metrics,
    readiness: Arc<Readiness>,
}

/// A network whose addresses may reach the operations endpoint, `ADDRESS/PREFIX` (a bare
/// address is a /32 or /128).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllowedNet {
    addr: IpAddr,
    prefix: u8,
}

#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not a network (ADDRESS/PREFIX, e.g. 10.0.0.0/16)")]
pub struct InvalidNet(String);

impl std::str::FromStr for AllowedNet {
    type Err = InvalidNet;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || InvalidNet(s.to_owned());
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.trim().parse().map_err(|_| invalid())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.trim().parse::<u8>().map_err(|_| invalid())?,
            None => max,
        };
        if prefix > max {
            return Err(invalid());
        }
        Ok(Self { addr, prefix })
    }
}

impl AllowedNet {
    fn contains(&self, ip: IpAddr) -> bool {
        let bits = |ip: IpAddr| match ip {
            IpAddr::V4(v4) => (u128::from(u32::from(v4)), 32u32),
            IpAddr::V6(v6) => (u128::from(v6), 128),
        };
        let ((net, width), (ip, ip_width)) = (bits(self.addr), bits(ip));
        if width != ip_width {
            return false;
        }
        let shift = width - u32::from(self.prefix);
        shift >= width || (net >> shift) == (ip >> shift)
    }
}

/// Whether a connection from `peer` may reach the operations endpoint.
pub fn peer_allowed(peer: IpAddr, allowed: &[AllowedNet]) -> bool {
    let peer = match peer {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(peer, IpAddr::V4),
        v4 => v4,
    };
    peer.is_loopback() || allowed.iter().any(|net| net.contains(peer))
}

/// A listener that closes every connection from a peer [`peer_allowed`] refuses.
struct PeerFiltered {
    inner: tokio::net::TcpListener,
    allowed: Vec<AllowedNet>,
}

impl axum::serve::Listener for PeerFiltered {
    type Io = tokio::net::TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (stream, peer) = axum::serve::Listener::accept(&mut self.inner).await;
            if peer_allowed(peer.ip(), &self.allowed) {
                return (stream, peer);
            }
            tracing::debug!(%peer, "operations endpoint: connection refused");
            drop(stream);
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// Serves the operations endpoint until `shutdown`, to loopback peers and those in `allowed`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    allowed: Vec<AllowedNet>,
    metrics: Metrics,
    readiness: Arc<Readiness>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(OpsState { metrics, readiness });
    let listener = PeerFiltered {
        inner: listener,
        allowed,
    };
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

async fn metrics_handler(
    axum::extract::State(state): axum::extract::State<OpsState>,
) -> impl IntoResponse {
    // Collecting reads /proc, statvfs and NVML: blocking calls, off the runtime's threads.
    let metrics = state.metrics.clone();
    match tokio::task::spawn_blocking(move || metrics.render()).await {
        Ok(text) => (
            StatusCode::OK,
            [(
                axum::http::header::CONTENT_TYPE,
                "text/plain; version=0.0.4",
            )],
            text,
        ),
        Err(error) => {
            tracing::warn!(%error, "metrics collection failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                [(axum::http::header::CONTENT_TYPE, "text/plain")],
                "metrics collection failed\n".to_owned(),
            )
        }
    }
}

async fn readyz(axum::extract::State(state): axum::extract::State<OpsState>) -> impl IntoResponse {
    let mut not_ready = Vec::new();
    if !state.readiness.registered.load(Ordering::SeqCst) {
        not_ready.push("not registered");
    }
    if state.readiness.draining.load(Ordering::SeqCst) {
        not_ready.push("draining");
    }
    if state.metrics.subscription_up.get() == 0 {
        not_ready.push("database subscription down");
    }
    if state.metrics.docker_events_up.get() == 0 {
        not_ready.push("docker event stream down");
    }
    let status = if not_ready.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        axum::Json(serde_json::json!({ "ready": not_ready.is_empty(), "reasons": not_ready })),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<AllowedNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    #[test]
    fn only_loopback_reaches_the_endpoint_unless_a_network_is_allowed() {
        let none = nets(&[]);
        for ip in ["127.0.0.1", "127.1.2.3", "::1", "::ffff:127.0.0.1"] {
            assert!(peer_allowed(ip.parse().unwrap(), &none), "{ip}");
        }
        for ip in [
            "172.17.0.2",
            "172.18.0.5",
            "10.0.1.5",
            "192.168.1.1",
            "::ffff:172.17.0.2",
            "fe80::1",
        ] {
            assert!(!peer_allowed(ip.parse().unwrap(), &none), "{ip}");
        }
        let vpc = nets(&["10.0.0.0/16", "fd00::/8", "192.168.7.7"]);
        assert!(peer_allowed("10.0.255.1".parse().unwrap(), &vpc));
        assert!(!peer_allowed("10.1.0.1".parse().unwrap(), &vpc));
        assert!(peer_allowed("fd12::1".parse().unwrap(), &vpc));
        assert!(peer_allowed("192.168.7.7".parse().unwrap(), &vpc));
        assert!(!peer_allowed("192.168.7.8".parse().unwrap(), &vpc));
        assert!(!peer_allowed("172.17.0.2".parse().unwrap(), &vpc));
        assert!(peer_allowed(
            "1.2.3.4".parse().unwrap(),
            &nets(&["0.0.0.0/0"])
        ));
    }

    #[test]
    fn allowed_networks_are_parsed_strictly() {
        for bad in [
            "",
            "10.0.0.0/33",
            "::/129",
            "10.0.0/8",
            "x/8",
            "10.0.0.0/-1",
        ] {
            assert!(bad.parse::<AllowedNet>().is_err(), "{bad:?}");
        }
    }

    /// Refusal of a non-loopback peer on the real listener is shown by tests/confinement.rs
    /// (a container, and the host through the Docker bridge's address).
    #[tokio::test]
    async fn loopback_is_served_on_a_wildcard_bind() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve(
            listener,
            Vec::new(),
            Metrics::new().unwrap(),
            Arc::new(Readiness::default()),
            shutdown.clone(),
        ));
        let mut client = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        client
            .write_all(b"GET /healthz HTTP/1.0\r\n\r\n")
            .await
            .unwrap();
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).await.unwrap();
        assert!(
            reply.starts_with(b"HTTP/1.0 200"),
            "{}",
            String::from_utf8_lossy(&reply)
        );
        shutdown.cancel();
        server.await.unwrap().unwrap();
    }
}
