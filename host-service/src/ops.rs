//! Operations endpoint: Prometheus `/metrics`, `/healthz` (the process answers) and `/readyz`
//! (registered, subscribed, following Docker events and not draining).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use tokio_util::sync::CancellationToken;

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
    /// Mandelboxes torn down, by reason (`exited`, `failed`, `drained`, `reconciled`).
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
                .buckets(buckets),
        )?;
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
        for c in [
            Box::new(mandelboxes.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(spinup_seconds.clone()),
            Box::new(params_ready_seconds.clone()),
            Box::new(spinup_failures.clone()),
            Box::new(teardowns.clone()),
            Box::new(stale_rows_removed.clone()),
            Box::new(heartbeat_failures.clone()),
            Box::new(resources_held.clone()),
            Box::new(subscription_up.clone()),
            Box::new(docker_events_up.clone()),
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
            docker_events_up,
        })
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

/// Serves the operations endpoint until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Metrics,
    readiness: Arc<Readiness>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(OpsState { metrics, readiness });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

async fn metrics_handler(
    axum::extract::State(state): axum::extract::State<OpsState>,
) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        state.metrics.render(),
    )
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
