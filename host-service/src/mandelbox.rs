//! One mandelbox's whole life, owned by one task: claim the allocation, take resources, create
//! and start the container, hand it its parameters, pair with the client's json_transport
//! request, wait for the mandelbox to be ready, run until the container exits (or the host
//! stops it), then tear everything down. Any failure tears down completely — container,
//! resources, files and row — and the waiting client gets an error, never silence.

use std::sync::Arc;

use std::time::{Duration, Instant};
use tracing::Instrument as _;

use dbclient::DbError;
use dbclient::types::{Mandelbox, MandelboxId, MandelboxStatus};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::docker::{ContainerId, ContainerRuntime, Device, RuntimeError};
use crate::host::Host;
use crate::mappings::{self, MandelboxDirs, MappingError, Params};
use crate::pairing::{ClientAnswer, Owner, PairingError};
use crate::ports::MANDELBOX_PORTS;
use crate::resources::{Allocation, ResourceError};

mod spec;

pub use spec::{Machine, build_spec, container_name, sanitize_session_id};

/// Label naming the instance whose host service started the container: several local host
/// services can share one Docker Engine, and each reconciles only its own.
pub const LABEL_INSTANCE_ID: &str = "whist.instance.id";
/// Label holding the mandelbox's TTY, so a restarted host can adopt it.
pub const LABEL_TTY: &str = "whist.tty";
/// Label holding the mandelbox's GPU index (absent on hosts without GPUs).
pub const LABEL_GPU: &str = "whist.gpu";

/// Why a spin-up failed, reported to the client and counted by cause.
#[derive(Debug, thiserror::Error)]
pub enum SpinUpError {
    #[error("no resources: {0}")]
    Resources(#[from] ResourceError),
    #[error("files: {0}")]
    Files(#[from] MappingError),
    #[error("docker: {0}")]
    Docker(#[from] RuntimeError),
    #[error("no local image for {0}")]
    NoImage(String),
    #[error("database: {0}")]
    Database(#[from] DbError),
    #[error("the row left CONNECTING before the mandelbox was ready")]
    RowGone,
    #[error("the client's json_transport request: {0}")]
    Pairing(#[from] PairingError),
    #[error("the container exited with {0:?} before it was ready")]
    ExitedEarly(Option<i64>),
    #[error("stopped by the host")]
    Stopped,
    #[error("input devices: {0}")]
    Input(#[from] crate::uinput::UinputError),
    #[error("refused to start less confined than documented: {0}")]
    Confinement(#[from] crate::confinement::ConfinementError),
}

impl SpinUpError {
    /// The `cause` label of the failure counter.
    pub fn cause(&self) -> &'static str {
        match self {
            Self::Resources(_) => "resources",
            Self::Files(_) => "files",
            Self::Docker(_) => "docker",
            Self::NoImage(_) => "image",
            Self::Database(_) => "database",
            Self::RowGone => "row_gone",
            Self::Pairing(PairingError::Timeout { .. }) => "json_transport_timeout",
            Self::Pairing(_) => "json_transport",
            Self::ExitedEarly(_) => "exited_early",
            Self::Stopped => "stopped",
            Self::Input(_) => "input_devices",
            Self::Confinement(_) => "confinement",
        }
    }
}

/// What the host keeps about a live mandelbox: how to tell its task the container died, and how
/// to stop it.
#[derive(Debug)]
pub struct Handle {
    pub exit: watch::Sender<Option<Option<i64>>>,
    pub stop: CancellationToken,
    pub container: std::sync::Mutex<Option<ContainerId>>,
    /// A warm box's row as delivered once a user claimed it (`ALLOCATED`); unused otherwise.
    pub claimed: watch::Sender<Option<Mandelbox>>,
}

impl Handle {
    pub fn new(stop: CancellationToken) -> Self {
        Self {
            exit: watch::channel(None).0,
            stop,
            container: std::sync::Mutex::new(None),
            claimed: watch::channel(None).0,
        }
    }

    pub fn container(&self) -> Option<ContainerId> {
        match self.container.lock() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub(crate) fn set_container(&self, id: ContainerId) {
        match self.container.lock() {
            Ok(mut c) => *c = Some(id),
            Err(poisoned) => *poisoned.into_inner() = Some(id),
        }
    }
}

/// Where a mandelbox starts from.
#[derive(Debug)]
pub enum Start {
    /// A fresh allocation: claim it, then spin up.
    Allocated(Mandelbox),
    /// A warm box for the pool ([`crate::warm`]); `prepared` hears whether it came up.
    Warm {
        id: MandelboxId,
        prepared: crate::warm::PreparedSender,
    },
    /// A mandelbox found running at start-up: adopt it and wait for its exit.
    Adopted {
        row: Option<Mandelbox>,
        id: MandelboxId,
        container: ContainerId,
        allocation: Allocation,
    },
}

/// The task of one mandelbox. Returns when everything of it is gone.
pub async fn run<R: ContainerRuntime + Clone + 'static>(
    host: Arc<Host<R>>,
    start: Start,
    handle: Arc<Handle>,
    event_at: Instant,
) {
    // Each task runs in its mandelbox's span, entered on every poll only (a span entered with a
    // guard across an await leaks into whatever else that thread runs meanwhile).
    match start {
        Start::Allocated(row) => {
            let span =
                tracing::info_span!("mandelbox", mandelbox.id = %row.id, user.id = ?row.user_id);
            run_allocated(host, row, handle, event_at)
                .instrument(span)
                .await;
        }
        Start::Warm { id, prepared } => {
            let span = tracing::info_span!("mandelbox", mandelbox.id = %id, warm = true);
            crate::warm::run(host, id, handle, prepared)
                .instrument(span)
                .await;
        }
        Start::Adopted {
            row,
            id,
            container,
            allocation,
        } => {
            let span = tracing::info_span!("mandelbox", mandelbox.id = %id);
            run_adopted(host, row, id, container, allocation, handle)
                .instrument(span)
                .await;
        }
    }
}

async fn run_adopted<R: ContainerRuntime + Clone + 'static>(
    host: Arc<Host<R>>,
    row: Option<Mandelbox>,
    id: MandelboxId,
    container: ContainerId,
    allocation: Allocation,
    handle: Arc<Handle>,
) {
    handle.set_container(container.clone());
    host.metrics
        .mandelboxes
        .with_label_values(&["running"])
        .inc();
    let reason = wait_for_exit(&host, &handle, &container).await;
    host.metrics
        .mandelboxes
        .with_label_values(&["running"])
        .dec();
    let status = row.map_or(MandelboxStatus::Running, |r| r.status);
    teardown(
        &host,
        id,
        Some(&allocation),
        Some(&container),
        status,
        reason,
    )
    .await;
}

async fn run_allocated<R: ContainerRuntime + Clone + 'static>(
    host: Arc<Host<R>>,
    row: Mandelbox,
    handle: Arc<Handle>,
    event_at: Instant,
) {
    let id = row.id;

    // The guarded claim makes a repeated delivery, or a second host, a no-op. Resolving the
    // image reads nothing the claim protects, so it runs meanwhile.
    let mut phases = host.metrics.spinup_phases();
    let claim = async {
        match &host.db {
            Some(db) => db
                .transition_mandelbox_status(
                    &id,
                    MandelboxStatus::Allocated,
                    MandelboxStatus::Connecting,
                )
                .await
                .map(|claimed| claimed.is_some()),
            None => Ok(true),
        }
    };
    let (claimed, image) = tokio::join!(claim, host.resolve_image(&row.app));
    match claimed {
        Ok(true) => {}
        Ok(false) => {
            tracing::debug!("allocation already claimed or gone; nothing to do");
            return;
        }
        Err(error) => {
            // The row stays ALLOCATED: the next delivery (or the sweeper) handles it.
            tracing::warn!(%error, "cannot claim the allocation");
            return;
        }
    }
    phases.lap("claim");
    let owner = Owner::of(row.user_id.as_ref(), host.config.app_env.is_local());
    host.pairing.set_owner(id, owner);
    tracing::info!("spinning up");
    host.metrics
        .mandelboxes
        .with_label_values(&["starting"])
        .inc();

    let mut allocation = host.allocate(id);
    let mut container = None;
    // Cancelled at teardown: ends the input-device hand-over and frees the devices.
    let ended = CancellationToken::new();
    let result = match &mut allocation {
        Ok(allocation) => {
            let job = Job {
                row: &row,
                handle: &handle,
                event_at,
                ended: &ended,
            };
            spin_up(&host, &job, allocation, image, &mut container).await
        }
        Err(error) => Err(SpinUpError::Resources(error.clone())),
    };
    host.metrics
        .mandelboxes
        .with_label_values(&["starting"])
        .dec();
    run_to_end(
        &host,
        id,
        &handle,
        result,
        allocation.as_ref().ok(),
        container.as_ref(),
        &ended,
        event_at,
    )
    .await;
}

/// After a spin-up: answer the client, run until the container exits or is stopped, tear down.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run_to_end<R: ContainerRuntime + Clone + 'static>(
    host: &Host<R>,
    id: MandelboxId,
    handle: &Handle,
    result: Result<ClientAnswer, SpinUpError>,
    allocation: Option<&Allocation>,
    container: Option<&ContainerId>,
    ended: &CancellationToken,
    event_at: Instant,
) {
    let (status, reason) = match result {
        Ok(answer) => {
            host.metrics
                .spinup_seconds
                .observe(event_at.elapsed().as_secs_f64());
            tracing::info!(
                elapsed_ms = event_at.elapsed().as_millis() as u64,
                "mandelbox is running"
            );
            host.pairing.answer(id, Ok(answer));
            host.metrics
                .mandelboxes
                .with_label_values(&["running"])
                .inc();
            let reason = match container {
                Some(c) => wait_for_exit(host, handle, c).await,
                None => "exited",
            };
            host.metrics
                .mandelboxes
                .with_label_values(&["running"])
                .dec();
            (MandelboxStatus::Running, reason)
        }
        Err(error) => {
            tracing::warn!(%error, cause = error.cause(), "spin-up failed");
            host.metrics
                .spinup_failures
                .with_label_values(&[error.cause()])
                .inc();
            host.pairing.answer(
                id,
                Err(PairingError::SpinUpFailed {
                    mandelbox_id: id,
                    reason: error.to_string(),
                }),
            );
            (MandelboxStatus::Connecting, "failed")
        }
    };
    ended.cancel();
    teardown(host, id, allocation, container, status, reason).await;
}

/// What one spin-up works on.
pub(crate) struct Job<'a> {
    pub row: &'a Mandelbox,
    pub handle: &'a Handle,
    /// When the allocation reached the host.
    pub event_at: Instant,
    /// Cancelled at teardown.
    pub ended: &'a CancellationToken,
}

async fn spin_up<R: ContainerRuntime + Clone + 'static>(
    host: &Host<R>,
    job: &Job<'_>,
    allocation: &mut Allocation,
    image: Result<String, SpinUpError>,
    container: &mut Option<ContainerId>,
) -> Result<ClientAnswer, SpinUpError> {
    let private_key = prepare(host, job, allocation, image, container).await?;
    finish(host, job.row, job.handle, allocation, private_key).await
}

/// The spin-up up to the point where only the user is missing: files, input devices, the
/// container created and started, its parameters and `.paramsReady` written. Returns the
/// stream's private key.
pub(crate) async fn prepare<R: ContainerRuntime + Clone + 'static>(
    host: &Host<R>,
    job: &Job<'_>,
    allocation: &mut Allocation,
    image: Result<String, SpinUpError>,
    container: &mut Option<ContainerId>,
) -> Result<String, SpinUpError> {
    let Job {
        row,
        handle,
        event_at,
        ended,
    } = *job;
    let id = row.id;
    let mut phases = host.metrics.spinup_phases();
    // Checked at every spin-up: a profile unloaded since the start must not go unnoticed.
    let apparmor = crate::confinement::apparmor_for_mandelbox(
        host.config.app_env,
        &host.config.apparmor_profile,
    )?;
    let dirs = dirs_of(host, id);
    let session_id = sanitize_session_id(row.session_id.as_deref());
    let (created_dirs, input) = tokio::join!(dirs.create(&session_id), create_input_devices(host));
    created_dirs?;
    let image = image?;
    let input = input?;
    phases.lap("files");
    let private_key = spec::new_private_key();
    let machine = Machine::probe(host.gpu_count);
    let mut attempt = 1;
    loop {
        let mut spec = build_spec(
            &host.config,
            &machine,
            row,
            allocation,
            &dirs,
            &session_id,
            &image,
            &private_key,
        );
        spec.apparmor_profile.clone_from(&apparmor);
        if let Some(devices) = &input {
            for device in &devices.devices {
                spec.devices.push(Device {
                    host_path: device.node.clone(),
                    container_path: device.node.clone(),
                    permissions: "rwm".to_owned(),
                });
            }
        }
        let params = Params {
            host_port_32262: spec::host_port(&allocation.ports, 32262),
            tty: allocation.tty,
            gpu_index: allocation.gpu.unwrap_or(0),
            session_id: session_id.clone(),
            protocol_timeout_seconds: host.config.protocol_timeout,
        };

        // Creating the container and writing its parameters do not depend on each other.
        let (created, written) = tokio::join!(
            host.runtime.create(&spec),
            mappings::write_params(&dirs, &params)
        );
        let container_id = created?;
        *container = Some(container_id.clone());
        handle.set_container(container_id.clone());
        written?;
        match host.runtime.start(&container_id).await {
            Ok(()) => break,
            // Something bound a port between the allocator's check and Docker's bind: take
            // fresh ports and create the container again.
            Err(error) if is_port_conflict(&error) && attempt < PORT_CONFLICT_ATTEMPTS => {
                tracing::warn!(%error, attempt, "a host port was taken meanwhile; new ports");
                attempt += 1;
                host.runtime.remove(&container_id, true).await?;
                *container = None;
                host.reallocate_ports(allocation)?;
            }
            Err(error) => return Err(error.into()),
        }
    }
    phases.lap("container");
    if let Some(devices) = input {
        // The protocol's input driver connects once it starts; the devices live until then and
        // until the mandelbox ends.
        let socket = dirs.sockets().join(crate::uinput::SOCKET_NAME);
        let ended = ended.clone();
        host.spawn_tracked(async move {
            if let Err(error) = crate::uinput::hand_over(&devices, &socket, ended.clone()).await {
                tracing::warn!(%error, "input device hand-over failed");
            }
            ended.cancelled().await;
            drop(devices);
        });
    }
    mappings::mark_params_ready(&dirs).await?;
    phases.lap("params");
    host.metrics
        .params_ready_seconds
        .observe(event_at.elapsed().as_secs_f64());
    tracing::debug!(
        elapsed_ms = event_at.elapsed().as_millis() as u64,
        "parameters ready"
    );
    Ok(private_key)
}

/// The rest of the spin-up, once the user is known: pair with the client's json_transport
/// request, put the user's profile and browser data in place, hand over `config.json`, wait
/// until the mandelbox is ready, mark the row RUNNING.
pub(crate) async fn finish<R: ContainerRuntime + Clone + 'static>(
    host: &Host<R>,
    row: &Mandelbox,
    handle: &Handle,
    allocation: &Allocation,
    private_key: String,
) -> Result<ClientAnswer, SpinUpError> {
    let id = row.id;
    let dirs = dirs_of(host, id);
    // The profile's download starts before the token arrives (§3.10 "speculative").
    let pending = crate::profile::lifecycle::start(host.profiles.as_deref(), &dirs, row);
    let mut phases = host.metrics.spinup_phases();
    let request = unless_exited(
        handle,
        host.pairing
            .wait_for_request(id, host.config.json_transport_timeout),
    )
    .await??;
    phases.lap("client");
    // Bounded like the readiness wait: a slow S3 costs the user their profile, not the session.
    let profile = crate::profile::lifecycle::put_in_place(
        host.profiles.as_deref(),
        pending,
        &dirs,
        &request.profile,
        host.config.ready_timeout,
    );
    unless_exited(handle, profile).await?;
    phases.lap("profile");
    mappings::write_config(&dirs, &request.json_data).await?;
    unless_exited(
        handle,
        mappings::wait_for_file(&dirs, mappings::READY_MARKER, host.config.ready_timeout),
    )
    .await??;
    phases.lap("ready");

    if let Some(db) = &host.db {
        db.transition_mandelbox_status(&id, MandelboxStatus::Connecting, MandelboxStatus::Running)
            .await?
            .ok_or(SpinUpError::RowGone)?;
    }
    phases.lap("running");
    tracing::info!(%phases, "spin-up finished");
    Ok(ClientAnswer {
        host_ports: allocation.ports.iter().map(|(c, h)| (c.port, *h)).collect(),
        private_key,
    })
}

/// Attempts at creating and starting a container when its host ports turn out to be taken.
const PORT_CONFLICT_ATTEMPTS: u32 = 3;

/// Docker's answer when a published port cannot be bound.
fn is_port_conflict(error: &RuntimeError) -> bool {
    let text = error.to_string();
    text.contains("port is already allocated") || text.contains("address already in use")
}

/// The mandelbox's virtual input devices where the host has uinput; `None` where it has not.
async fn create_input_devices<R: ContainerRuntime + Clone + 'static>(
    host: &Host<R>,
) -> Result<Option<crate::uinput::InputDevices>, SpinUpError> {
    if !host.uinput_available {
        return Ok(None);
    }
    let path = std::path::PathBuf::from(crate::uinput::UINPUT_PATH);
    match tokio::task::spawn_blocking(move || crate::uinput::create(&path)).await {
        Ok(Ok(devices)) => Ok(Some(devices)),
        Ok(Err(crate::uinput::UinputError::Unavailable(reason))) => {
            tracing::debug!(
                reason,
                "no uinput: the mandelbox runs without input devices"
            );
            Ok(None)
        }
        Ok(Err(error)) => Err(error.into()),
        Err(join) => Err(SpinUpError::Input(crate::uinput::UinputError::Unavailable(
            join.to_string(),
        ))),
    }
}

/// Runs `future` unless the container exits or the host stops the mandelbox first.
async fn unless_exited<T>(
    handle: &Handle,
    future: impl std::future::Future<Output = T>,
) -> Result<T, SpinUpError> {
    tokio::select! {
        value = future => Ok(value),
        code = exit_code(handle) => Err(SpinUpError::ExitedEarly(code)),
        () = handle.stop.cancelled() => Err(SpinUpError::Stopped),
    }
}

/// Resolves with the exit code once the container's exit has been reported.
pub(crate) async fn exit_code(handle: &Handle) -> Option<i64> {
    let mut exit = handle.exit.subscribe();
    let code = exit.wait_for(Option::is_some).await;
    code.ok().and_then(|c| *c).flatten()
}

/// Waits until the container exits by itself (a `die` event) or the host stops it.
async fn wait_for_exit<R: ContainerRuntime + Clone + 'static>(
    host: &Host<R>,
    handle: &Handle,
    container: &ContainerId,
) -> &'static str {
    tokio::select! {
        code = exit_code(handle) => {
            tracing::info!(exit_code = ?code, "container exited");
            "exited"
        }
        () = handle.stop.cancelled() => {
            tracing::info!("stopping the mandelbox");
            if let Err(error) = host.runtime.stop(container, host.config.stop_grace).await {
                tracing::warn!(%error, "stop failed; the container is removed by force");
            }
            "stopped"
        }
    }
}

/// Everything of a mandelbox goes: row DYING, container, resources, files, row, capacity back.
/// Each step is idempotent and failures are logged, never fatal: what a failed step leaves is
/// found by the sweeper or the next start's reconcile pass.
pub async fn teardown<R: ContainerRuntime + Clone + 'static>(
    host: &Host<R>,
    id: MandelboxId,
    allocation: Option<&Allocation>,
    container: Option<&ContainerId>,
    status: MandelboxStatus,
    reason: &'static str,
) {
    host.metrics
        .mandelboxes
        .with_label_values(&["stopping"])
        .inc();
    let mut phases = host.metrics.teardown_phases();
    if let Some(db) = &host.db
        && status != MandelboxStatus::Dying
        && let Err(error) = db
            .transition_mandelbox_status(&id, status, MandelboxStatus::Dying)
            .await
    {
        tracing::warn!(%error, "cannot mark the mandelbox DYING");
    }
    phases.lap("mark_dying");
    if let Some(container) = container
        && let Err(error) = host.runtime.remove(container, true).await
    {
        tracing::warn!(%error, "cannot remove the container");
    }
    phases.lap("remove_container");
    if let Some(allocation) = allocation {
        host.free(id, allocation);
    }
    let dirs = dirs_of(host, id);
    // The container is gone, so nothing writes to the profile any more; its files go next.
    crate::profile::lifecycle::save(host.profiles.as_deref(), &dirs).await;
    phases.lap("save_profile");
    if let Err(error) = dirs.remove().await {
        tracing::warn!(%error, "cannot remove the mandelbox's files");
    }
    phases.lap("remove_files");
    host.delete_row(id).await;
    phases.lap("delete_row");
    host.pairing.remove(id);
    host.metrics
        .mandelboxes
        .with_label_values(&["stopping"])
        .dec();
    host.metrics.teardowns.with_label_values(&[reason]).inc();
    tracing::info!(reason, "mandelbox torn down");
}

/// A mandelbox's paths, what it may write owned by the image's user.
pub(crate) fn dirs_of<R: ContainerRuntime + Clone + 'static>(
    host: &Host<R>,
    id: MandelboxId,
) -> MandelboxDirs {
    MandelboxDirs::new(&host.config.root_dir, id).owned_by(host.config.mandelbox_user)
}

/// The ports a mandelbox publishes.
pub fn wanted_ports() -> &'static [crate::ports::ContainerPort] {
    &MANDELBOX_PORTS
}

/// How long the task waits, at most, to see its own container's exit after asking for a stop.
pub const STOP_WAIT: Duration = Duration::from_secs(30);
