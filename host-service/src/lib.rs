//! whist host service: the per-host agent that runs mandelboxes.
//!
//! At start it checks it runs as root, reads its identity from EC2 IMDSv2, connects to Docker
//! and (outside localdev) to Hasura, verifies its PRE_CONNECTION row and makes it ACTIVE with
//! its address and capacity (a DRAINING row ends start-up gracefully), reconciles what Docker,
//! its root directory and the database say (adopting or cleaning every mandelbox), then follows
//! the ALLOCATED mandelboxes on this instance and spins each up once, tears each down when its
//! container exits, heartbeats, sweeps stranded rows, and serves `/metrics`, `/healthz` and
//! `/readyz`. On DRAINING or SIGTERM it drains: no new mandelboxes, running ones get a deadline
//! and are then stopped, the row is deleted, and the machine powers off only when configured to.
//!
//! Reads: flags or environment (`--help`): `APP_ENV`, `HASURA_GRAPHQL_URL`,
//! `HASURA_ADMIN_SECRET`, `AWS_EC2_METADATA_SERVICE_ENDPOINT`, `WHIST_ROOT`, …
//! Writes: its instance's and mandelboxes' rows, containers labelled `whist.managed=true`, files
//! under `WHIST_ROOT`, and (with `WHIST_PROFILE_BUCKET`) users' encrypted profiles in S3, read at
//! spin-up and written at teardown. Exit codes: 0 after a drain (or a DRAINING row at start), 1 on a fatal
//! error, 2 on bad configuration.
//!
//! Modules, one per noun: [`config`], [`metadata`] (IMDS), [`docker`] (the engine), [`ports`],
//! [`ttys`], [`gpus`], [`resources`] (the allocators), [`uinput`] (input devices), [`mappings`]
//! (files shared with a mandelbox), [`pairing`] (json_transport), [`mandelbox`] (one mandelbox's
//! life), [`host`] (what they share and the loops), [`registration`], [`reconcile`], [`ops`]
//! (metrics, health), [`vitals`] (memory, CPU, disks, GPUs and the Docker Engine's probe, for
//! the metrics), [`json_transport`] (the client-facing HTTPS endpoint), [`profile`] (users'
//! browser profiles in S3 and their initial browser data).

pub mod config;
pub mod confinement;
pub mod docker;
pub mod gpus;
pub mod host;
pub mod json_transport;
pub mod mandelbox;
pub mod mappings;
pub mod metadata;
pub mod ops;
pub mod ownership;
pub mod pairing;
pub mod ports;
pub mod profile;
pub mod reconcile;
pub mod registration;
pub mod resources;
pub mod ttys;
pub mod uinput;
pub mod vitals;
pub mod warm;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use dbclient::{DbClient, SubscriptionClient};
use tokio_util::sync::CancellationToken;

pub use config::Config;
use docker::{ContainerRuntime, DockerRuntime};
use host::Host;
use metadata::{ImdsMetadata, InstanceMetadata};
use registration::Registered;

/// How long background tasks get to finish after the drain before the process exits anyway.
const TASKS_JOIN_DEADLINE: Duration = Duration::from_secs(30);
/// Host port of the host service's own HTTPS endpoint, never handed to a mandelbox.
pub const JSON_TRANSPORT_PORT: u16 = 4678;

/// What ends the service.
#[derive(Debug, Clone)]
pub struct Signals {
    /// Start a drain (first SIGTERM/SIGINT).
    pub drain: CancellationToken,
    /// Stop every mandelbox now instead of waiting for the drain deadline (second signal).
    pub now: CancellationToken,
}

impl Signals {
    pub fn new() -> Self {
        Self {
            drain: CancellationToken::new(),
            now: CancellationToken::new(),
        }
    }
}

impl Default for Signals {
    fn default() -> Self {
        Self::new()
    }
}

/// Why the service stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// Drained after a signal or a DRAINING row.
    Drained,
    /// The row was DRAINING at start: nothing was started.
    DrainingAtStart,
}

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error(
        "the host service must run as root (it manages containers, devices and /whist); it runs as uid {0}"
    )]
    NotRoot(u32),
    #[error("instance metadata: {0}")]
    Metadata(#[from] metadata::MetadataError),
    #[error("docker: {0}")]
    Docker(#[from] docker::RuntimeError),
    #[error("database: {0}")]
    DbConfig(#[from] dbclient::ConfigError),
    #[error("registration: {0}")]
    Registration(#[from] registration::RegistrationError),
    #[error("reconcile: {0}")]
    Reconcile(#[from] reconcile::ReconcileError),
    #[error("cannot create {path}: {source}")]
    Root {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("json_transport endpoint: {0}")]
    JsonTransport(#[from] json_transport::JsonTransportError),
    #[error("confinement: {0}")]
    Confinement(#[from] confinement::ConfinementError),
    #[error("cannot serve the operations endpoint on {addr}: {source}")]
    Ops {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Runs the host service with the real IMDS and Docker Engine.
pub async fn run(config: Config, signals: Signals) -> Result<Stopped, HostError> {
    let uid = nix::unistd::geteuid();
    if !uid.is_root() {
        return Err(HostError::NotRoot(uid.as_raw()));
    }
    let identity = ImdsMetadata::new(config.imds_endpoint.as_deref())?
        .identity()
        .await?;
    tracing::info!(
        instance.id = %identity.instance_id,
        region = %identity.region,
        instance_type = %identity.instance_type,
        name = ?identity.name,
        "identity read from IMDS"
    );
    let tags = identity.report_tags(&config.commit);
    logger::tag_scope(tags.iter().map(|(key, value)| (*key, value.as_str())));
    let runtime = DockerRuntime::connect(&config.docker_socket).await?;
    confinement::check_seccomp(config.app_env, &runtime.security_options().await?)?;
    run_with(config, identity, runtime, signals, |_| {}).await
}

/// Runs the host service with a given identity and container runtime. `started` is called
/// with the host once it follows allocations (tests use it to reach the internal interfaces).
pub async fn run_with<R: ContainerRuntime + Clone + 'static>(
    config: Config,
    identity: metadata::InstanceIdentity,
    runtime: R,
    signals: Signals,
    started: impl FnOnce(Arc<Host<R>>),
) -> Result<Stopped, HostError> {
    std::fs::create_dir_all(&config.root_dir).map_err(|source| HostError::Root {
        path: config.root_dir.display().to_string(),
        source,
    })?;
    let gpu_count = match config.gpu_override {
        Some(n) => n,
        None => gpus::discover_gpus().count(),
    };
    let capacity = host::capacity(&config, gpu_count);
    let mut ports =
        ports::PortAllocator::new(config.port_range.clone()).map_err(|e| HostError::Root {
            path: "port range".into(),
            source: std::io::Error::other(e.to_string()),
        })?;
    ports.reserve(ports::Protocol::Tcp, JSON_TRANSPORT_PORT);
    ports.reserve(ports::Protocol::Tcp, config.ops_addr.port());
    ports.reserve(ports::Protocol::Tcp, config.json_transport_addr.port());
    let resources = resources::Resources::new(
        ports,
        ttys::TtyAllocator::new(ttys::DEFAULT_RANGE),
        (gpu_count > 0).then(|| gpus::GpuAllocator::new(gpu_count, config.mandelboxes_per_gpu)),
    );

    let background = CancellationToken::new();
    // Whatever way this function returns, the background loops (the ops server first) stop.
    let _stop_background = background.clone().drop_guard();
    // The operations endpoint answers from the start: /healthz while the row is awaited (up to
    // five minutes), /readyz saying why the host is not ready yet.
    let metrics = ops::Metrics::new()?;
    metrics
        .vitals
        .watch_volume(vitals::VOLUME_ROOT, &config.root_dir);
    let readiness = Arc::new(ops::Readiness::default());
    let ops_listener = tokio::net::TcpListener::bind(config.ops_addr)
        .await
        .map_err(|source| HostError::Ops {
            addr: config.ops_addr,
            source,
        })?;
    let ops_server = tokio::spawn(ops::serve(
        ops_listener,
        config.ops_allow.clone(),
        metrics.clone(),
        readiness.clone(),
        background.clone(),
    ));
    // The HTTPS endpoint is bound (and its certificate made) before registration, so a taken
    // port stops the service before it claims its row; it serves once the host exists.
    let json_transport = json_transport::Listening::bind(&config, &identity).await?;
    let db = config.db.as_ref().map(DbClient::new).transpose()?;
    let mut draining_at_start = false;
    if let Some(db) = &db {
        let registered = registration::register(
            db,
            &identity,
            &config.commit,
            u32::try_from(capacity).unwrap_or(u32::MAX),
            registration::ROW_WAIT,
        )
        .await?;
        match registered {
            Registered::Draining => {
                // A drain was under way when this process died (or the scaling service
                // drained the host before it started): finish it by cleaning up, start nothing.
                tracing::info!("this instance is DRAINING: cleaning up, starting nothing");
                draining_at_start = true;
            }
            Registered::Active {
                instance,
                restarted,
            } => tracing::info!(
                restarted,
                capacity = instance.remaining_capacity,
                ip = ?instance.ip_addr,
                "registered ACTIVE"
            ),
        }
    }

    confinement::load_apparmor_profile(config.app_env, &config.apparmor_profile).await;
    let profiles = match config.profiles.clone() {
        Some(profile_config) => {
            tracing::info!(bucket = %profile_config.store.bucket, "profiles: saved to and loaded from S3");
            let failures = metrics.profile_failures.clone();
            Some(Arc::new(
                profile::Profiles::connect(profile_config, config.app_env.as_str(), failures).await,
            ))
        }
        None => {
            tracing::info!("profiles off (no WHIST_PROFILE_BUCKET): every session starts empty");
            None
        }
    };
    let mut host = Host::new(
        config,
        identity,
        db,
        runtime,
        resources,
        metrics.clone(),
        readiness.clone(),
    );
    host.profiles = profiles;
    let host = Arc::new(host);
    let tasks = host.tasks.clone();
    if draining_at_start {
        let report = reconcile::remove_everything(&host).await?;
        tracing::info!(?report, "cleaned up after an interrupted drain");
        if let Some(db) = &host.db
            && let Err(error) = db.delete_instance(host.instance_id()).await
        {
            tracing::warn!(%error, "cannot delete the instance row");
        }
        if host.config.poweroff {
            power_off().await;
        }
        return Ok(Stopped::DrainingAtStart);
    }
    json_transport.start(&host, background.clone());
    tasks.spawn(vitals::follow_docker_engine(
        host.runtime.clone(),
        metrics.docker_engine_up.clone(),
        metrics.vitals.clone(),
        background.clone(),
    ));
    tasks.spawn(host.clone().follow_docker_events(background.clone()));

    reconcile::reconcile(&host).await?;
    readiness.registered.store(true, Ordering::SeqCst);

    let subscriptions = match &host.config.db {
        Some(db_config) => Some(SubscriptionClient::start(
            db_config,
            background.child_token(),
        )?),
        None => {
            host.metrics.subscription_up.set(1);
            None
        }
    };
    if let Some(subs) = &subscriptions {
        tasks.spawn(
            host.clone()
                .follow_allocations(subs.clone(), background.clone()),
        );
        tasks.spawn(warm::keep_warm(host.clone(), background.clone()));
        tasks.spawn(host.clone().watch_own_status(
            subs.clone(),
            signals.drain.clone(),
            background.clone(),
        ));
        tasks.spawn(
            host.clone()
                .watch_subscription_state(subs.clone(), background.clone()),
        );
    }
    tasks.spawn(host.clone().heartbeat(background.clone()));
    tasks.spawn(host.clone().sweep(background.clone()));
    started(host.clone());
    tracing::info!("following allocations");

    signals.drain.cancelled().await;
    host.drain(host.config.drain_deadline, &signals.now).await;
    if let Some(db) = &host.db {
        match db.delete_instance(host.instance_id()).await {
            Ok(_) => tracing::info!("instance row deleted"),
            Err(error) => tracing::warn!(%error, "cannot delete the instance row"),
        }
    }
    background.cancel();
    if let Some(subs) = &subscriptions {
        subs.shutdown().await;
    }
    tasks.close();
    if tokio::time::timeout(TASKS_JOIN_DEADLINE, tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("background tasks did not finish in time");
    }
    let _ = tokio::time::timeout(TASKS_JOIN_DEADLINE, ops_server).await;
    if host.config.poweroff {
        power_off().await;
    }
    Ok(Stopped::Drained)
}

async fn power_off() {
    tracing::info!("powering off");
    match tokio::process::Command::new("shutdown")
        .args(["-h", "now"])
        .status()
        .await
    {
        Ok(status) if status.success() => {}
        Ok(status) => tracing::error!(%status, "shutdown failed"),
        Err(error) => tracing::error!(%error, "cannot run shutdown"),
    }
}
