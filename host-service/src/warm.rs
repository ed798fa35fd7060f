//! The warm pool: up to `--warm-mandelboxes` mandelboxes created, started and waiting at the last
//! point where only the user is missing, so a claimed one answers json_transport without a
//! container start.
//!
//! A warm box's life: its task takes resources, inserts its row as `WAITING` (which takes one
//! unit of the instance's `remaining_capacity`, atomically with the insert), creates and starts
//! the container, writes the resource-mapping files and `.paramsReady`, and waits. The scaling
//! service claims it with one guarded update (`WAITING` → `ALLOCATED`, user and session set);
//! the ALLOCATED live query delivers the row to the waiting task, which claims it for itself
//! (`ALLOCATED` → `CONNECTING`) and finishes the spin-up like a cold one (json_transport pairing,
//! `config.json`, `RUNNING`). From then on it is an ordinary mandelbox: used by that one user and
//! destroyed after. The pool refills as soon as a box leaves the waiting state.
//!
//! Failures: a warm box that fails to come up, or whose container exits while it waits, is torn
//! down (row deleted, capacity returned) and replaced after a backoff. A drain stops every
//! waiting box at once (never waits for them). After a SIGKILL, start-up reconcile removes warm
//! containers and `WAITING` rows (nothing of a warm box is adopted).

use std::sync::Arc;
use std::time::{Duration, Instant};

use dbclient::types::{Mandelbox, MandelboxId, MandelboxStatus, NewMandelbox};
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::docker::ContainerRuntime;
use crate::host::Host;
use crate::mandelbox::{self, Handle, Job, SpinUpError};
use crate::pairing::Owner;

/// The app of every warm box (what assignment hands out).
pub const WARM_APP: &str = "chrome";
/// After a warm box failed to come up, the next try waits 1 s doubling to 60 s: a full host or
/// a missing image does not fix itself at once, and each try costs a container start.
const RETRY_BASE: Duration = Duration::from_secs(1);
const RETRY_CAP: Duration = Duration::from_secs(60);

/// Tells the pool whether a warm box reached the waiting state.
pub type PreparedSender = oneshot::Sender<bool>;

/// What the host keeps about its pool.
#[derive(Debug)]
pub struct WarmPool {
    /// Warm boxes being prepared or waiting for a user.
    waiting: watch::Sender<usize>,
    /// The id of the image the warm app's tag names, as last looked up: a waiting box made from
    /// another one is replaced.
    image: watch::Sender<Option<String>>,
    /// Cancelled when the waiting boxes must go (drain, shutdown).
    stop: CancellationToken,
}

impl Default for WarmPool {
    fn default() -> Self {
        Self::new()
    }
}

impl WarmPool {
    pub fn new() -> Self {
        Self {
            waiting: watch::channel(0).0,
            image: watch::channel(None).0,
            stop: CancellationToken::new(),
        }
    }

    /// Warm boxes being prepared or waiting right now.
    pub fn waiting(&self) -> usize {
        *self.waiting.borrow()
    }

    /// Stops every waiting box and the refill loop.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    fn enter<'a>(&'a self, gauge: &'a prometheus::IntGauge) -> Slot<'a> {
        self.waiting.send_modify(|n| *n += 1);
        gauge.inc();
        Slot(&self.waiting, gauge)
    }
}

/// One box's place among the waiting ones; released when it is claimed or gone.
struct Slot<'a>(&'a watch::Sender<usize>, &'a prometheus::IntGauge);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
        self.1.dec();
    }
}

/// Keeps `config.warm_mandelboxes` boxes waiting (by default every unit of capacity no user
/// holds) while the host accepts mandelboxes, one spin-up at a time: a new box starts whenever
/// fewer than the target are waiting and a unit is free (a user's mandelbox left, or a warm box
/// was claimed). Returns on shutdown or drain; does nothing when the pool is off or there is no
/// database (localdev has no assignment).
pub async fn keep_warm<R: ContainerRuntime + Clone + 'static>(
    host: Arc<Host<R>>,
    shutdown: CancellationToken,
) {
    let capacity = host.capacity();
    let target = host.config.warm_mandelboxes.of(capacity);
    if target == 0 || host.db.is_none() {
        return;
    }
    tokio::join!(
        refill(&host, &shutdown, target, capacity),
        follow_image(&host, &shutdown)
    );
}

/// Starts warm boxes, one at a time, while fewer than `target` wait and a unit is free.
async fn refill<R: ContainerRuntime + Clone + 'static>(
    host: &Arc<Host<R>>,
    shutdown: &CancellationToken,
    target: usize,
    capacity: usize,
) {
    let mut failures: u32 = 0;
    let mut waiting = host.warm.waiting.subscribe();
    let mut live = host.watch_live_mandelboxes();
    loop {
        // Room for one more: fewer than the target waiting, and a unit nobody holds.
        while *waiting.borrow_and_update() >= target || *live.borrow_and_update() >= capacity {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = host.warm.stop.cancelled() => return,
                changed = waiting.changed() => if changed.is_err() { return },
                changed = live.changed() => if changed.is_err() { return },
            }
        }
        let (tx, rx) = oneshot::channel();
        let id = MandelboxId::random();
        if !host.spawn_mandelbox(mandelbox::Start::Warm { id, prepared: tx }) {
            return;
        }
        let prepared = tokio::select! {
            () = shutdown.cancelled() => return,
            prepared = rx => prepared.unwrap_or(false),
        };
        if prepared {
            failures = 0;
            continue;
        }
        failures = failures.saturating_add(1);
        let delay = RETRY_BASE
            .saturating_mul(2u32.saturating_pow(failures - 1))
            .min(RETRY_CAP);
        tracing::debug!(
            failures,
            delay_ms = delay.as_millis() as u64,
            "warm box failed; retrying later"
        );
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = host.warm.stop.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// Looks every `--warm-image-check` at the image the warm app's tag names, so that waiting boxes
/// made from an older image are replaced (a new mandelbox image under the same name reaches the
/// next user, not only the boxes made after the next claim).
async fn follow_image<R: ContainerRuntime + Clone + 'static>(
    host: &Host<R>,
    shutdown: &CancellationToken,
) {
    let mut every = tokio::time::interval(host.config.warm_image_check);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = host.warm.stop.cancelled() => return,
            _ = every.tick() => {}
        }
        // A failed look changes nothing: boxes are replaced only for an image seen to be newer.
        let Some(id) = image_id_of(host, WARM_APP).await else {
            continue;
        };
        host.warm.image.send_if_modified(|current| {
            if current.as_deref() == Some(id.as_str()) {
                return false;
            }
            if current.is_some() {
                tracing::info!(image.id = %id, "the warm app's tag names a new image: waiting boxes are replaced");
            }
            *current = Some(id);
            true
        });
    }
}

/// The id of the image `app` resolves to now; `None` when it cannot be looked up.
async fn image_id_of<R: ContainerRuntime + Clone + 'static>(
    host: &Host<R>,
    app: &str,
) -> Option<String> {
    let reference = host.resolve_image(app).await.ok()?;
    host.runtime.image_id(&reference).await.ok().flatten()
}

/// Resolves once the pool has seen the warm app's tag name an image other than `mine`; never
/// when `mine` is unknown.
async fn image_replaced(pool: &WarmPool, mine: Option<&str>) {
    let Some(mine) = mine else {
        return std::future::pending().await;
    };
    let mut image = pool.image.subscribe();
    if image
        .wait_for(|now| now.as_deref().is_some_and(|now| now != mine))
        .await
        .is_err()
    {
        std::future::pending::<()>().await;
    }
}

/// The task of one warm box (see the module doc).
pub(crate) async fn run<R: ContainerRuntime + Clone + 'static>(
    host: Arc<Host<R>>,
    id: MandelboxId,
    handle: Arc<Handle>,
    prepared: PreparedSender,
) {
    let Some(db) = host.db.clone() else {
        let _ = prepared.send(false);
        return;
    };
    let slot = host.warm.enter(&host.metrics.warm_mandelboxes);
    let mut allocation = match host.allocate(id) {
        Ok(allocation) => allocation,
        Err(error) => {
            tracing::debug!(%error, "no resources for a warm box");
            let _ = prepared.send(false);
            return;
        }
    };
    let new = NewMandelbox {
        id,
        app: WARM_APP.to_owned(),
        instance_id: host.instance_id().clone(),
        user_id: None,
        session_id: None,
        status: MandelboxStatus::Waiting,
    };
    let row = match db.insert_waiting_mandelbox(&new).await {
        Ok(Some(row)) => row,
        Ok(None) => {
            tracing::debug!("no capacity for a warm box (or the instance is not ACTIVE)");
            host.free(id, &allocation);
            let _ = prepared.send(false);
            return;
        }
        Err(error) => {
            tracing::warn!(%error, "cannot insert a warm box's row");
            host.free(id, &allocation);
            let _ = prepared.send(false);
            return;
        }
    };
    let event_at = Instant::now();
    let ended = CancellationToken::new();
    let mut container = None;
    let image = host.resolve_image(&row.app).await;
    // Looked up before the container is made from the tag: should the tag move in between, the
    // box is replaced once more than needed, never kept on an old image.
    let image_id = match &image {
        Ok(reference) => host.runtime.image_id(reference).await.ok().flatten(),
        Err(_) => None,
    };
    let job = Job {
        row: &row,
        handle: &handle,
        event_at,
        ended: &ended,
    };
    let private_key =
        match mandelbox::prepare(&host, &job, &mut allocation, image, &mut container).await {
            Ok(key) => key,
            Err(error) => {
                tracing::warn!(%error, cause = error.cause(), "warm box failed to come up");
                host.metrics
                    .spinup_failures
                    .with_label_values(&[error.cause()])
                    .inc();
                let _ = prepared.send(false);
                ended.cancel();
                mandelbox::teardown(
                    &host,
                    id,
                    Some(&allocation),
                    container.as_ref(),
                    MandelboxStatus::Waiting,
                    "failed",
                )
                .await;
                return;
            }
        };
    host.metrics
        .warm_prepare_seconds
        .observe(event_at.elapsed().as_secs_f64());
    tracing::info!(
        elapsed_ms = event_at.elapsed().as_millis() as u64,
        "warm box waiting"
    );
    let _ = prepared.send(true);

    let (claimed, reason) = tokio::select! {
        row = wait_for_claim(&handle) => (row, "stopped"),
        code = mandelbox::exit_code(&handle) => {
            tracing::warn!(exit_code = ?code, "warm box exited while waiting");
            (None, "stopped")
        }
        () = handle.stop.cancelled() => (None, "stopped"),
        () = host.warm.stop.cancelled() => (None, "stopped"),
        () = image_replaced(&host.warm, image_id.as_deref()) => {
            tracing::info!("warm box made from an older image: replaced");
            (None, "replaced")
        }
    };
    let Some(claimed) = claimed else {
        ended.cancel();
        mandelbox::teardown(
            &host,
            id,
            Some(&allocation),
            container.as_ref(),
            MandelboxStatus::Waiting,
            reason,
        )
        .await;
        // Counted as warm until its teardown is over: a drain tells warm boxes being removed
        // from users' mandelboxes by this count.
        drop(slot);
        return;
    };
    drop(slot);
    let claimed_at = Instant::now();
    host.metrics.warm_claims.inc();
    tracing::info!(user.id = ?claimed.user_id, "warm box claimed");
    let result = claim_and_finish(&host, &claimed, &handle, &allocation, private_key).await;
    mandelbox::run_to_end(
        &host,
        id,
        &handle,
        result,
        Some(&allocation),
        container.as_ref(),
        &ended,
        claimed_at,
    )
    .await;
}

/// The claimed row: ours to finish once the host's guarded `ALLOCATED` → `CONNECTING` holds.
async fn claim_and_finish<R: ContainerRuntime + Clone + 'static>(
    host: &Host<R>,
    row: &Mandelbox,
    handle: &Handle,
    allocation: &crate::resources::Allocation,
    private_key: String,
) -> Result<crate::pairing::ClientAnswer, SpinUpError> {
    if let Some(db) = &host.db {
        db.transition_mandelbox_status(
            &row.id,
            MandelboxStatus::Allocated,
            MandelboxStatus::Connecting,
        )
        .await?
        .ok_or(SpinUpError::RowGone)?;
    }
    let owner = Owner::of(row.user_id.as_ref(), host.config.app_env.is_local());
    host.pairing.set_owner(row.id, owner);
    // The session the client asked for, in place before `.configReady` (the box was prepared
    // with a host-made id; its container labels and log directory keep that one).
    let dirs = mandelbox::dirs_of(host, row.id);
    let session_id = mandelbox::sanitize_session_id(row.session_id.as_deref());
    crate::mappings::write_session_id(&dirs, &session_id).await?;
    mandelbox::finish(host, row, handle, allocation, private_key).await
}

/// Resolves with the row once the ALLOCATED live query delivered it (see
/// [`Host::spawn_mandelbox`]).
async fn wait_for_claim(handle: &Handle) -> Option<Mandelbox> {
    let mut claimed = handle.claimed.subscribe();
    let row = claimed.wait_for(Option::is_some).await;
    row.ok().and_then(|r| r.clone())
}
