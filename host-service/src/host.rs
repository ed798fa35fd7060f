//! The host: what every mandelbox task shares (database, Docker, resources, pairing, metrics)
//! and the loops that feed them (allocations, Docker events, heartbeat, sweeper, drain).

use edge::backoff::Backoff;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dbclient::types::{InstanceId, InstanceStatus, Mandelbox, MandelboxId, MandelboxStatus};
use dbclient::{DbClient, SubscriptionClient};
use futures::StreamExt;
use rand::Rng as _;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::docker::{ContainerEventKind, ContainerRuntime, LABEL_MANDELBOX_ID};
use crate::mandelbox::{self, Handle, SpinUpError, Start};
use crate::metadata::InstanceIdentity;
use crate::ops::{Metrics, Readiness};
use crate::pairing::{ClientAnswer, ClientRequest, Pairing, PairingError};
use crate::resources::{Allocation, ResourceError, Resources};
use crate::warm::WarmPool;

/// The heartbeat's period is 60 s minus up to 10 s of jitter, as in the original, so a fleet
/// started together does not write in waves.
const HEARTBEAT_BASE: Duration = Duration::from_secs(55);
const HEARTBEAT_JITTER: Duration = Duration::from_secs(10);
/// The sweeper looks for stranded rows every 10 s (± 0.5 s).
const SWEEP_PERIOD: Duration = Duration::from_millis(9_500);
const SWEEP_JITTER: Duration = Duration::from_millis(1_000);
/// An ALLOCATED row nobody claimed for this long is dropped (its user's client has given up:
/// it waits 60 s for json_transport). The original used 10 s, which lost allocations whenever
/// Hasura was slow.
const STALE_ALLOCATED: Duration = Duration::from_secs(90);
/// A row in a later status without a task is ours and stranded; the delay keeps the sweeper off
/// rows a task is claiming right now.
const STALE_ORPHAN: Duration = Duration::from_secs(30);
/// Docker event stream reconnects: 250 ms doubling to 10 s. The engine is local, so it is back
/// quickly or not at all; a reconcile pass covers what happened meanwhile.
const EVENTS_RETRY: Backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(10));
/// Removing a row (teardown) is retried through short database outages for up to this long;
/// after that the sweeper finds the row.
const ROW_DELETE_DEADLINE: Duration = Duration::from_secs(30);
/// The waits between those retries: 200 ms doubling to 5 s, so a blip costs a fraction of a
/// second and a longer outage a handful of attempts.
const ROW_DELETE_RETRY: Backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
/// How long a local image lookup is reused. A freshly built `current-build` is picked up within
/// this delay; spin-ups in between save a Docker round trip.
const IMAGE_CACHE_TTL: Duration = Duration::from_secs(30);
/// Pairing slots for mandelboxes that never arrived are dropped after this long.
const PAIRING_IDLE: Duration = Duration::from_secs(300);

/// Everything the mandelbox tasks share.
#[derive(Debug)]
pub struct Host<R> {
    pub config: Config,
    pub identity: InstanceIdentity,
    pub db: Option<DbClient>,
    pub runtime: R,
    pub pairing: Pairing,
    pub metrics: Metrics,
    pub readiness: Arc<Readiness>,
    pub gpu_count: usize,
    /// Whether `/dev/uinput` exists: mandelboxes get virtual input devices only then.
    pub uinput_available: bool,
    /// Local image lookups, kept for [`IMAGE_CACHE_TTL`]: listing images costs a Docker round
    /// trip on every spin-up otherwise.
    images: Mutex<HashMap<String, (String, Instant)>>,
    resources: Mutex<Resources>,
    registry: Mutex<HashMap<MandelboxId, Arc<Handle>>>,
    live: watch::Sender<usize>,
    accepting: AtomicBool,
    /// Cancelled when every mandelbox must stop now (drain deadline passed).
    stop_all: CancellationToken,
    /// The warm boxes waiting for a user (see [`crate::warm`]).
    pub warm: WarmPool,
    /// Users' profiles in S3; `None` when no bucket is configured.
    pub profiles: Option<Arc<crate::profile::Profiles>>,
    pub(crate) tasks: TaskTracker,
}

/// How many mandelboxes a host runs at once: `mandelboxes_per_gpu` on each GPU, or
/// `cpu_host_capacity` without GPUs. Registered as the row's `remaining_capacity`.
pub fn capacity(config: &Config, gpu_count: usize) -> usize {
    if gpu_count > 0 {
        gpu_count * config.mandelboxes_per_gpu
    } else {
        config.cpu_host_capacity
    }
}

impl<R: ContainerRuntime + Clone + 'static> Host<R> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: Config,
        identity: InstanceIdentity,
        db: Option<DbClient>,
        runtime: R,
        resources: Resources,
        metrics: Metrics,
        readiness: Arc<Readiness>,
    ) -> Self {
        let gpu_count = resources.gpu_count();
        Self {
            config,
            identity,
            db,
            runtime,
            pairing: Pairing::new(),
            metrics,
            readiness,
            gpu_count,
            uinput_available: std::path::Path::new(crate::uinput::UINPUT_PATH).exists(),
            images: Mutex::new(HashMap::new()),
            resources: Mutex::new(resources),
            registry: Mutex::new(HashMap::new()),
            live: watch::channel(0).0,
            accepting: AtomicBool::new(true),
            stop_all: CancellationToken::new(),
            warm: WarmPool::new(),
            profiles: None,
            tasks: TaskTracker::new(),
        }
    }

    pub fn instance_id(&self) -> &InstanceId {
        &self.identity.instance_id
    }

    fn lock_resources(&self) -> std::sync::MutexGuard<'_, Resources> {
        match self.resources.lock() {
            Ok(r) => r,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn lock_registry(&self) -> std::sync::MutexGuard<'_, HashMap<MandelboxId, Arc<Handle>>> {
        match self.registry.lock() {
            Ok(r) => r,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn update_resource_gauges(&self, held: (usize, usize, usize)) {
        let gauges = &self.metrics.resources_held;
        gauges.with_label_values(&["ports"]).set(held.0 as i64);
        gauges.with_label_values(&["ttys"]).set(held.1 as i64);
        gauges.with_label_values(&["gpu_slots"]).set(held.2 as i64);
    }

    pub fn allocate(&self, id: MandelboxId) -> Result<Allocation, ResourceError> {
        let mut resources = self.lock_resources();
        let allocation =
            resources.allocate(id, mandelbox::wanted_ports(), crate::ports::in_use_on_host);
        let held = resources.held();
        drop(resources);
        self.update_resource_gauges(held);
        allocation
    }

    /// New host ports for a mandelbox whose ports Docker could not bind.
    pub fn reallocate_ports(&self, allocation: &mut Allocation) -> Result<(), ResourceError> {
        let mut resources = self.lock_resources();
        let result = resources.reallocate_ports(
            allocation,
            mandelbox::wanted_ports(),
            crate::ports::in_use_on_host,
        );
        let held = resources.held();
        drop(resources);
        self.update_resource_gauges(held);
        result
    }

    pub fn adopt(&self, id: MandelboxId, allocation: &Allocation) -> Result<(), ResourceError> {
        let mut resources = self.lock_resources();
        let result = resources.adopt(id, allocation);
        let held = resources.held();
        drop(resources);
        self.update_resource_gauges(held);
        result
    }

    pub fn free(&self, id: MandelboxId, allocation: &Allocation) {
        let mut resources = self.lock_resources();
        if let Err(error) = resources.free(id, allocation) {
            tracing::error!(%error, mandelbox.id = %id, "resource accounting mismatch on free");
        }
        let held = resources.held();
        drop(resources);
        self.update_resource_gauges(held);
    }

    /// Ports, TTYs and GPU slots held right now.
    pub fn resources_held(&self) -> (usize, usize, usize) {
        self.lock_resources().held()
    }

    /// The image for `app`: the newest local `<app>:current-build` in local development, the
    /// registry's `<registry>/<env>/<app>:current-build` elsewhere (the AMI pre-pulls it).
    pub async fn resolve_image(&self, app: &str) -> Result<String, SpinUpError> {
        let app = app_image_name(app);
        if self.config.app_env.is_local() {
            let cached = match self.images.lock() {
                Ok(images) => images.get(&app).cloned(),
                Err(poisoned) => poisoned.into_inner().get(&app).cloned(),
            };
            if let Some((image, at)) = cached
                && at.elapsed() < IMAGE_CACHE_TTL
            {
                return Ok(image);
            }
            let image = self
                .runtime
                .find_image(&app)
                .await?
                .ok_or_else(|| SpinUpError::NoImage(app.clone()))?;
            match self.images.lock() {
                Ok(mut images) => images.insert(app, (image.clone(), Instant::now())),
                Err(poisoned) => poisoned
                    .into_inner()
                    .insert(app, (image.clone(), Instant::now())),
            };
            Ok(image)
        } else {
            Ok(format!(
                "{}/{}/{app}:current-build",
                self.config.image_registry,
                self.config.app_env.as_str()
            ))
        }
    }

    /// Starts a task for the mandelbox unless one runs already. Returns whether it started one.
    /// An ALLOCATED row of a running (warm) task is handed to that task: a user claimed it.
    pub fn spawn_mandelbox(self: &Arc<Self>, start: Start) -> bool {
        let id = match &start {
            Start::Allocated(row) => row.id,
            Start::Warm { id, .. } | Start::Adopted { id, .. } => *id,
        };
        let handle = {
            let mut registry = self.lock_registry();
            if let Some(running) = registry.get(&id) {
                if let Start::Allocated(row) = start {
                    running.claimed.send_if_modified(|claimed| {
                        let first = claimed.is_none();
                        if first {
                            *claimed = Some(row);
                        }
                        first
                    });
                }
                return false;
            }
            if matches!(start, Start::Allocated(_) | Start::Warm { .. })
                && !self.accepting.load(Ordering::SeqCst)
            {
                tracing::info!(mandelbox.id = %id, "draining: allocation ignored");
                return false;
            }
            let handle = Arc::new(Handle::new(self.stop_all.child_token()));
            registry.insert(id, handle.clone());
            self.live.send_replace(registry.len());
            handle
        };
        let host = self.clone();
        let event_at = Instant::now();
        self.tasks.spawn(async move {
            mandelbox::run(host.clone(), start, handle, event_at).await;
            let mut registry = host.lock_registry();
            registry.remove(&id);
            host.live.send_replace(registry.len());
        });
        true
    }

    /// Spawns a task the host joins at shutdown.
    pub fn spawn_tracked(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        self.tasks.spawn(task);
    }

    pub fn live_mandelboxes(&self) -> usize {
        *self.live.borrow()
    }

    /// Follows [`Host::live_mandelboxes`] (warm boxes included).
    pub(crate) fn watch_live_mandelboxes(&self) -> watch::Receiver<usize> {
        self.live.subscribe()
    }

    /// See [`capacity`].
    pub fn capacity(&self) -> usize {
        capacity(&self.config, self.gpu_count)
    }

    pub fn is_tracked(&self, id: &MandelboxId) -> bool {
        self.lock_registry().contains_key(id)
    }

    /// Tells the task of the container's mandelbox that it exited.
    fn on_exit(&self, id: MandelboxId, exit_code: Option<i64>) {
        if let Some(handle) = self.lock_registry().get(&id) {
            handle.exit.send_replace(Some(exit_code));
        }
    }

    /// The internal json_transport interface (the HTTPS endpoint calls it). In localdev there is
    /// no database, so the request starts its mandelbox itself, as in the original.
    pub async fn json_transport(
        self: &Arc<Self>,
        request: ClientRequest,
    ) -> Result<ClientAnswer, PairingError> {
        if self.db.is_none() {
            let now = chrono::Utc::now();
            self.spawn_mandelbox(Start::Allocated(Mandelbox {
                id: request.mandelbox_id,
                app: "browsers/chrome".to_owned(),
                instance_id: self.instance_id().clone(),
                user_id: request.user_id.clone(),
                session_id: None,
                status: MandelboxStatus::Allocated,
                created_at: now,
                updated_at: now,
            }));
        }
        let wait = self.config.json_transport_timeout
            + self.config.ready_timeout
            + Duration::from_secs(10);
        self.pairing.submit(request, wait).await
    }

    /// Deletes a mandelbox's row and gives its capacity back in one atomic write
    /// ([`DbClient::release_mandelbox`]: both or neither, and exactly once however many
    /// releases race), retrying through short database outages.
    pub async fn delete_row(&self, id: MandelboxId) {
        let Some(db) = &self.db else { return };
        let deadline = Instant::now() + ROW_DELETE_DEADLINE;
        let mut retries = ROW_DELETE_RETRY.start();
        loop {
            match db.release_mandelbox(self.instance_id(), &id).await {
                Ok(_) => return,
                Err(error) if error.is_transient() && Instant::now() < deadline => {
                    tracing::debug!(%error, mandelbox.id = %id, "database unavailable; retrying the delete");
                    // ROW_DELETE_RETRY has no deadline (ROW_DELETE_DEADLINE is checked above).
                    let delay = retries.next_delay().unwrap_or(ROW_DELETE_RETRY.cap);
                    tokio::time::sleep(delay).await;
                }
                Err(error) => {
                    tracing::warn!(%error, mandelbox.id = %id, "cannot delete the row; the sweeper will");
                    return;
                }
            }
        }
    }

    /// Follows the Docker event stream for the host's life, reopening it when it breaks; after
    /// each (re)open, every tracked container's state is checked so an exit that happened while
    /// the stream was down is not lost.
    pub async fn follow_docker_events(self: Arc<Self>, shutdown: CancellationToken) {
        let mut retries = EVENTS_RETRY.start();
        let mut reopened = false;
        while !shutdown.is_cancelled() {
            let mut events = Box::pin(self.runtime.events());
            if std::mem::replace(&mut reopened, true) {
                self.metrics.docker_events_reconnects.inc();
            }
            self.metrics.docker_events_up.set(1);
            self.check_tracked_containers().await;
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    item = events.next() => match item {
                        Some(Ok(event)) => {
                            retries.reset();
                            let Some(id) = event
                                .labels
                                .get(LABEL_MANDELBOX_ID)
                                .and_then(|v| v.parse::<MandelboxId>().ok())
                            else {
                                continue;
                            };
                            match event.kind {
                                ContainerEventKind::Die { exit_code } => self.on_exit(id, exit_code),
                                ContainerEventKind::Oom => {
                                    tracing::warn!(mandelbox.id = %id, "mandelbox ran out of memory");
                                }
                                ContainerEventKind::Start | ContainerEventKind::Destroy => {}
                            }
                        }
                        Some(Err(error)) => {
                            tracing::warn!(%error, "Docker event stream failed; reopening");
                            break;
                        }
                        None => {
                            tracing::warn!("Docker event stream ended; reopening");
                            break;
                        }
                    }
                }
            }
            self.metrics.docker_events_up.set(0);
            // EVENTS_RETRY has no deadline: a delay is always handed out.
            let delay = retries.next_delay().unwrap_or(EVENTS_RETRY.cap);
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = tokio::time::sleep(delay) => {}
            }
        }
    }

    async fn check_tracked_containers(&self) {
        let tracked: Vec<(MandelboxId, Arc<Handle>)> = self
            .lock_registry()
            .iter()
            .map(|(id, h)| (*id, h.clone()))
            .collect();
        for (id, handle) in tracked {
            let Some(container) = handle.container() else {
                continue;
            };
            match self.runtime.inspect_state(&container).await {
                Ok(Some(state)) if state.running => {}
                Ok(Some(state)) => self.on_exit(id, state.exit_code),
                Ok(None) => self.on_exit(id, None),
                Err(error) => tracing::warn!(%error, mandelbox.id = %id, "cannot inspect"),
            }
        }
    }

    /// Starts a task for every ALLOCATED row of this instance, as the live query delivers them
    /// (every row of every snapshot; a row seen again is ignored while its task runs).
    pub async fn follow_allocations(
        self: Arc<Self>,
        subscriptions: SubscriptionClient,
        shutdown: CancellationToken,
    ) {
        let mut allocations = subscriptions
            .mandelboxes_on_instance_with_status(self.instance_id(), MandelboxStatus::Allocated);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                item = allocations.next() => match item {
                    Some(Ok(rows)) => {
                        for row in rows {
                            if row.instance_id == *self.instance_id() {
                                self.spawn_mandelbox(Start::Allocated(row));
                            }
                        }
                    }
                    Some(Err(error)) => tracing::warn!(%error, "allocation subscription"),
                    None => return,
                }
            }
        }
    }

    /// Cancels `drain` when this instance's row turns DRAINING or disappears.
    pub async fn watch_own_status(
        self: Arc<Self>,
        subscriptions: SubscriptionClient,
        drain: CancellationToken,
        shutdown: CancellationToken,
    ) {
        let mut instance = subscriptions.instance(self.instance_id());
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                item = instance.next() => match item {
                    Some(Ok(Some(row))) if row.instance.status == InstanceStatus::Draining => {
                        tracing::info!("instance marked DRAINING: draining");
                        drain.cancel();
                        return;
                    }
                    Some(Ok(Some(_))) => {}
                    Some(Ok(None)) => {
                        tracing::warn!("instance row deleted: draining");
                        drain.cancel();
                        return;
                    }
                    Some(Err(error)) => tracing::warn!(%error, "instance subscription"),
                    None => return,
                }
            }
        }
    }

    /// Mirrors the subscription's connection state into the metrics.
    pub async fn watch_subscription_state(
        self: Arc<Self>,
        subscriptions: SubscriptionClient,
        shutdown: CancellationToken,
    ) {
        let mut state = subscriptions.connection_state();
        loop {
            let up = matches!(
                *state.borrow_and_update(),
                dbclient::ConnectionState::Connected
            );
            self.metrics.subscription_up.set(i64::from(up));
            tokio::select! {
                () = shutdown.cancelled() => return,
                changed = state.changed() => if changed.is_err() { return },
            }
        }
    }

    /// Touches the instance row's `updated_at` every 55–65 s.
    pub async fn heartbeat(self: Arc<Self>, shutdown: CancellationToken) {
        let Some(db) = self.db.clone() else { return };
        loop {
            match db.heartbeat(self.instance_id()).await {
                Ok(true) => {}
                Ok(false) => tracing::warn!("heartbeat found no instance row"),
                Err(error) => {
                    self.metrics.heartbeat_failures.inc();
                    tracing::warn!(%error, "heartbeat failed");
                }
            }
            let period = HEARTBEAT_BASE + HEARTBEAT_JITTER.mul_f64(rand::rng().random::<f64>());
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(period) => {}
            }
        }
    }

    /// Removes this instance's rows that no task owns and that are stranded: ALLOCATED rows
    /// nobody claimed for [`STALE_ALLOCATED`], and rows in a later status with no task.
    pub async fn sweep(self: Arc<Self>, shutdown: CancellationToken) {
        let Some(db) = self.db.clone() else { return };
        loop {
            let period = SWEEP_PERIOD + SWEEP_JITTER.mul_f64(rand::rng().random::<f64>());
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(period) => {}
            }
            let dropped = self.pairing.sweep(PAIRING_IDLE);
            if dropped > 0 {
                tracing::debug!(dropped, "dropped idle json_transport slots");
            }
            let rows = match db.mandelboxes_on_instance(self.instance_id()).await {
                Ok(rows) => rows,
                Err(error) => {
                    tracing::debug!(%error, "sweeper cannot list rows");
                    continue;
                }
            };
            let now = chrono::Utc::now();
            for row in rows {
                if self.is_tracked(&row.id) {
                    continue;
                }
                let age = (now - row.updated_at).to_std().unwrap_or_default();
                let stale = match row.status {
                    MandelboxStatus::Allocated => age > STALE_ALLOCATED,
                    // A warm box's row without its task (the task's failed teardown).
                    MandelboxStatus::Waiting => age > STALE_ORPHAN,
                    _ => age > STALE_ORPHAN,
                };
                if stale {
                    // Only the row as seen: a task that took it up since (a spin-up started
                    // between the listing and now) changed its status or `updated_at`, and
                    // then nothing is removed.
                    match db
                        .release_stranded_mandelbox(
                            self.instance_id(),
                            &row.id,
                            row.status,
                            row.updated_at,
                        )
                        .await
                    {
                        Ok(true) => {
                            tracing::warn!(mandelbox.id = %row.id, status = %row.status, "removed a stranded row");
                            self.metrics.stale_rows_removed.inc();
                        }
                        Ok(false) => {
                            tracing::debug!(mandelbox.id = %row.id, "a stranded row was taken up or removed meanwhile");
                        }
                        Err(error) => {
                            tracing::debug!(%error, mandelbox.id = %row.id, "sweeper cannot remove a row");
                        }
                    }
                }
            }
        }
    }

    /// Drains: no new mandelboxes, the row marked DRAINING, running mandelboxes get until
    /// `deadline` to finish and are then stopped; returns when none is left.
    /// Warm boxes are stopped at once: nobody is using them.
    pub async fn drain(&self, deadline: Duration, now: &CancellationToken) {
        self.accepting.store(false, Ordering::SeqCst);
        self.warm.stop();
        self.readiness.draining.store(true, Ordering::SeqCst);
        if let Some(db) = &self.db
            && let Err(error) = db
                .set_instance_status(self.instance_id(), InstanceStatus::Draining)
                .await
        {
            tracing::warn!(%error, "cannot mark the instance DRAINING");
        }
        let live = self.live_mandelboxes();
        tracing::info!(live, deadline_s = deadline.as_secs(), "draining");
        let mut count = self.live.subscribe();
        let finished = tokio::select! {
            result = tokio::time::timeout(deadline, count.wait_for(|n| *n == 0)) => result.is_ok(),
            () = now.cancelled() => false,
        };
        if !finished {
            // Warm boxes are already going (their removal is not a user's session cut short).
            let live = self.live_mandelboxes();
            let users = live.saturating_sub(self.warm.waiting());
            if users > 0 {
                tracing::warn!(
                    live,
                    users,
                    "drain deadline reached: stopping the remaining mandelboxes"
                );
            } else {
                tracing::info!(
                    live,
                    "drain deadline reached: only warm boxes are left, being removed"
                );
            }
            self.stop_all.cancel();
            let _ = tokio::time::timeout(
                self.config.stop_grace + mandelbox::STOP_WAIT,
                count.wait_for(|n| *n == 0),
            )
            .await;
        }
    }

    /// Stops every mandelbox now (used by tests and a second signal).
    pub fn stop_all_mandelboxes(&self) {
        self.stop_all.cancel();
    }
}

/// `CHROME` → `browsers/chrome`; a name with a `/` is used as it is.
pub fn app_image_name(app: &str) -> String {
    if app.contains('/') {
        app.to_owned()
    } else {
        format!("browsers/{}", app.to_ascii_lowercase())
    }
}

#[cfg(test)]
mod tests {
    use super::app_image_name;

    #[test]
    fn app_names_map_to_image_paths() {
        assert_eq!(app_image_name("CHROME"), "browsers/chrome");
        assert_eq!(app_image_name("browsers/brave"), "browsers/brave");
    }
}
