//! One region's controller: it owns the region's [`ScalingAlgorithm`], handles the region's
//! events one at a time (so a repeated delivery can never launch twice), reads the region's
//! state from the database on every event (level-triggered), asks the algorithm for a plan and
//! carries it out through the [`HostHandler`] and `dbclient`.
//!
//! Launches and terminations take minutes (waiting for EC2), so they run as tracked tasks and
//! report back; until then the launch counts as pending capacity and the instance as busy, so
//! the next plan neither repeats nor contradicts them. On shutdown the controller stops taking
//! events and lets in-flight launches finish (each is bounded by its own wait timeout).
//!
//! A launch is recorded in the database (`whist.scaling_launches`) before anything is launched
//! and the record is deleted once the instances' rows are in. A controller that starts, or
//! becomes the leader, resumes every record of its region: the launch is idempotent per launch
//! id, so a process killed between RunInstances and the row insert leaves instances that the
//! next one adopts instead of terminating them as orphans.
//!
//! Under a leader lease ([`crate::lease`]) every write is fenced by the lease's generation
//! ([`FencedWrites`]) and every cloud call is preceded by a fence check; a launch or
//! termination task is cancelled as soon as the lease is seen lost, and one that runs on (its
//! process paused) has its writes refused. A launch cut short that way keeps its record, for
//! the new leader to resume.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use dbclient::DbClient;
use dbclient::fenced::Fence;
use dbclient::launches::{LaunchRecord, NewLaunchRecord};
use dbclient::types::{Image, ImageId, InstanceId, InstanceStatus, NewInstance, Region};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::algorithm::{PendingLaunch, ScalingAlgorithm, Snapshot, TerminationReason};
use crate::controller::demand::RefusalLog;
use crate::controller::fence::FencedWrites;
use crate::controller::snapshot::{ControllerState, SnapshotBuilder, report};
use crate::controller::{PlanExecutor, execute_plan};
use crate::hosts::{HostHandler, HostInstance, HostState, LaunchRequest};
use crate::metrics::{Metered, Metrics};

/// The provider written into instance and image rows.
pub const PROVIDER: &str = "AWS";
/// Events a region may have queued; more are dropped (each event only says "look again").
pub const EVENT_QUEUE: usize = 64;
/// After a failed step (database unreachable), try again after this.
const RETRY_AFTER_ERROR: Duration = Duration::from_secs(5);
/// A follower looks again this often, so it acts soon after it takes the lease over.
const NOT_LEADER_RECHECK: Duration = Duration::from_secs(1);

/// How one region is run.
#[derive(Debug, Clone)]
pub struct RegionSettings {
    pub region: Region,
    pub instance_type: String,
    /// Mandelboxes per instance of `instance_type`.
    pub capacity_per_instance: u32,
    /// This service's commit: the `client_sha` of the rows and image rows it writes.
    pub commit: String,
    /// The image the deploy wants (an upgrade when it differs from the image row).
    pub target_image: Option<ImageId>,
    /// EC2 `running` wait for a launch (the original's 5 minutes).
    pub wait_running: Duration,
    /// EC2 `terminated` wait when verifying a termination.
    pub wait_terminated: Duration,
    /// A managed instance with no row, or a row with no instance, is left alone this long
    /// (a launch inserts its rows only once the instances run).
    pub orphan_grace: Duration,
    /// How long shutdown waits for in-flight launches.
    pub shutdown_grace: Duration,
    /// A resumed launch record older than this whose launch finds no instance is deleted
    /// instead of launching: the decision it recorded is stale.
    pub launch_record_limit: Duration,
}

impl RegionSettings {
    pub fn new(region: Region, commit: impl Into<String>) -> Self {
        Self {
            region,
            instance_type: "g4dn.2xlarge".to_owned(),
            capacity_per_instance: 2,
            commit: commit.into(),
            target_image: None,
            wait_running: Duration::from_secs(5 * 60),
            wait_terminated: Duration::from_secs(5 * 60),
            orphan_grace: Duration::from_secs(10 * 60),
            shutdown_grace: Duration::from_secs(6 * 60),
            launch_record_limit: Duration::from_secs(30 * 60),
        }
    }
}

/// Something for a region to look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The fleet or the images changed (a subscription delivered).
    Changed,
    /// The scheduler: also reconciles the cloud with the rows.
    Tick,
    /// An assignment took capacity here.
    CapacityTaken,
    /// The assign path gave `client` (user and session) a mandelbox here.
    Assigned { client: String },
    /// The assign path refused `client` for want of capacity here: demand not met.
    Refused { client: String },
}

/// What finished in the background.
#[derive(Debug)]
enum Done {
    Launch {
        launch_id: String,
        result: Result<usize, ExecError>,
    },
    Termination {
        instance: InstanceId,
        result: Result<(), ExecError>,
    },
}

pub use crate::controller::ExecError;

#[derive(Debug)]
struct Shared {
    settings: RegionSettings,
    db: DbClient,
    hosts: Arc<dyn HostHandler>,
}

/// The region's controller.
#[derive(Debug)]
pub struct RegionController {
    shared: Arc<Shared>,
    algorithm: Box<dyn ScalingAlgorithm>,
    pending: HashMap<String, PendingLaunch>,
    busy: HashSet<InstanceId>,
    abandoned: Vec<ImageId>,
    snapshots: SnapshotBuilder,
    refusals: RefusalLog,
    tasks: TaskTracker,
    done_tx: mpsc::Sender<Done>,
    done_rx: mpsc::Receiver<Done>,
    leader: Option<watch::Receiver<Option<Fence>>>,
    metrics: Option<Arc<Metrics>>,
    /// The region's launch records must be loaded (and resumed) before the next plan: at start
    /// and whenever this replica has not been the leader.
    needs_resume: bool,
}

impl RegionController {
    pub fn new(
        settings: RegionSettings,
        db: DbClient,
        hosts: Arc<dyn HostHandler>,
        algorithm: Box<dyn ScalingAlgorithm>,
    ) -> Self {
        let (done_tx, done_rx) = mpsc::channel(EVENT_QUEUE);
        Self {
            shared: Arc::new(Shared {
                settings,
                db,
                hosts,
            }),
            algorithm,
            pending: HashMap::new(),
            busy: HashSet::new(),
            abandoned: Vec::new(),
            snapshots: SnapshotBuilder::default(),
            refusals: RefusalLog::default(),
            tasks: TaskTracker::new(),
            done_tx,
            done_rx,
            leader: None,
            metrics: None,
            needs_resume: true,
        }
    }

    /// Reports the region's fleet, launches and terminations.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Acts only while `leader` holds a fence, and fences every write with it (high
    /// availability: see [`crate::lease`]).
    pub fn with_leader(mut self, leader: watch::Receiver<Option<Fence>>) -> Self {
        self.leader = Some(leader);
        self
    }

    /// Whether this replica may act.
    pub fn is_leader(&self) -> bool {
        self.leader.as_ref().is_none_or(|l| l.borrow().is_some())
    }

    /// The lease this replica acts under now (`None` without a lease).
    fn fence(&self) -> Option<Fence> {
        self.leader.as_ref().and_then(|l| l.borrow().clone())
    }

    /// The database writes of this step, fenced by the current lease.
    fn writes(&self) -> FencedWrites {
        FencedWrites {
            db: self.shared.db.clone(),
            fence: self.fence(),
        }
    }

    /// Runs `work` as a tracked task that is cancelled (answering [`ExecError::LeaseLost`]) as
    /// soon as the lease it was started under is seen lost.
    fn spawn_fenced<T: Send + 'static>(
        &self,
        work: impl std::future::Future<Output = Result<T, ExecError>> + Send + 'static,
        report: impl FnOnce(Result<T, ExecError>) -> Done + Send + 'static,
    ) {
        let lost = crate::lease::lost(self.leader.clone(), self.fence());
        let done = self.done_tx.clone();
        self.tasks.spawn(async move {
            let result = tokio::select! {
                result = work => result,
                () = lost => Err(ExecError::LeaseLost),
            };
            let _ = done.send(report(result)).await;
        });
    }

    pub fn region(&self) -> &Region {
        &self.shared.settings.region
    }

    /// Launches not yet inserted.
    pub fn pending_launches(&self) -> usize {
        self.pending.len()
    }

    /// Handles events until `shutdown`, deciding at start, on every event and when the last
    /// plan asked to look again; then waits (bounded) for in-flight launches.
    pub async fn run(mut self, mut events: mpsc::Receiver<Event>, shutdown: CancellationToken) {
        let mut tick = true;
        loop {
            let wait = if tick {
                let reconcile = self.reconcile_cloud().await;
                if let Err(error) = reconcile {
                    tracing::warn!(region = %self.region(), %error, "reconciliation failed");
                }
                self.step().await
            } else {
                self.step().await
            };
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                done = self.done_rx.recv() => {
                    if let Some(done) = done { self.absorb(done); }
                    tick = false;
                }
                event = events.recv() => match event {
                    Some(event) => {
                        tick = self.note(event);
                        // Whatever else is queued is seen by the same step.
                        while let Ok(event) = events.try_recv() {
                            tick |= self.note(event);
                        }
                    }
                    None => break,
                },
                () = tokio::time::sleep(wait) => tick = false,
            }
        }
        self.drain_in_flight().await;
    }

    /// Takes in what an event says beside "look again"; true for the scheduler's tick.
    pub fn note(&mut self, event: Event) -> bool {
        match event {
            Event::Tick => return true,
            Event::Assigned { client } => self.refusals.served(&client),
            Event::Refused { client } => self.refusals.refused(&client, Utc::now()),
            Event::Changed | Event::CapacityTaken => {}
        }
        false
    }

    /// Waits for in-flight launches and terminations, at most `shutdown_grace`.
    pub async fn drain_in_flight(&mut self) {
        self.tasks.close();
        let grace = self.shared.settings.shutdown_grace;
        if tokio::time::timeout(grace, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(region = %self.region(), in_flight = self.tasks.len(), "in-flight actions outlived the shutdown grace");
        }
        while let Ok(done) = self.done_rx.try_recv() {
            self.absorb(done);
        }
    }

    /// Waits until every background action has reported (tests).
    pub async fn settle(&mut self) {
        while !self.pending.is_empty() || !self.busy.is_empty() {
            match self.done_rx.recv().await {
                Some(done) => self.absorb(done),
                None => break,
            }
        }
    }

    fn absorb(&mut self, done: Done) {
        let region = self.shared.settings.region.clone();
        match done {
            Done::Launch { launch_id, result } => {
                self.pending.remove(&launch_id);
                if let Some(m) = &self.metrics {
                    let outcome = if result.is_ok() { "ok" } else { "error" };
                    m.launches
                        .with_label_values(&[region.as_str(), outcome])
                        .inc();
                }
                match result {
                    Ok(count) => tracing::info!(%region, %launch_id, count, "launch done"),
                    Err(error) => tracing::error!(%region, %launch_id, %error, "launch failed"),
                }
            }
            Done::Termination { instance, result } => {
                self.busy.remove(&instance);
                if let Err(error) = result {
                    tracing::error!(%region, instance.id = %instance, %error, "termination not verified");
                }
            }
        }
    }

    /// Reads the region, plans, carries the plan out. Returns when to look again.
    pub async fn step(&mut self) -> Duration {
        if !self.is_leader() {
            // Another replica may have left launch records behind by the time this one leads.
            self.needs_resume = true;
            return NOT_LEADER_RECHECK;
        }
        if self.needs_resume
            && let Err(error) = self.resume_launches().await
        {
            // Planning without the recorded launches could launch their capacity twice.
            tracing::warn!(region = %self.region(), %error, "cannot load the launch records");
            return RETRY_AFTER_ERROR;
        }
        match self.try_step().await {
            Ok(wait) => wait,
            Err(error) => {
                tracing::warn!(region = %self.region(), %error, "scaling step failed");
                RETRY_AFTER_ERROR
            }
        }
    }

    async fn snapshot(&mut self) -> Result<Snapshot, ExecError> {
        let settings = &self.shared.settings;
        let rows = self.shared.db.instances_in_region(&settings.region).await?;
        let image = self
            .shared
            .db
            .latest_image(PROVIDER, &settings.region)
            .await?;
        let now = Utc::now();
        let state = ControllerState {
            target_image: settings.target_image.clone(),
            abandoned_images: self.abandoned.clone(),
            pending_launches: self.pending.values().cloned().collect(),
            busy: self.busy.iter().cloned().collect(),
            waiting_clients: self.refusals.waiting(now),
            arrivals: self.refusals.arrivals(),
        };
        let snapshot = self.snapshots.build(
            &rows,
            image.map(|i| i.image_id),
            settings.capacity_per_instance,
            state,
            now,
        );
        if let Some(m) = &self.metrics {
            report(
                m,
                &settings.region,
                &snapshot.instances,
                snapshot.current_image.as_ref(),
            );
        }
        Ok(snapshot)
    }

    async fn try_step(&mut self) -> Result<Duration, ExecError> {
        let snapshot = self.snapshot().await?;
        let plan = self.algorithm.plan(&snapshot, Utc::now()).await;
        let Some(metrics) = self.metrics.clone() else {
            return execute_plan(plan, self).await;
        };
        let region = self.shared.settings.region.clone();
        metrics.count_decisions(region.as_str(), &plan);
        let mut metered = Metered {
            inner: self,
            metrics: &metrics,
            region: region.as_str(),
        };
        execute_plan(plan, &mut metered).await
    }

    /// Runs a recorded launch as a tracked task, counted as pending until it reports.
    fn start_launch(&mut self, record: LaunchRecord, resumed: bool) {
        self.pending.insert(
            record.launch_id.clone(),
            PendingLaunch {
                launch_id: record.launch_id.clone(),
                image_id: record.image_id.clone(),
                count: record.count,
                started_at: record.created_at,
            },
        );
        let shared = self.shared.clone();
        let writes = self.writes();
        let launch_id = record.launch_id.clone();
        self.spawn_fenced(
            async move { run_recorded_launch(&shared, &writes, &record, resumed).await },
            move |result| Done::Launch { launch_id, result },
        );
    }

    /// Loads the region's launch records and resumes, as pending launches, those this
    /// controller is not running: the launches of a process that was killed (or of a replica
    /// that lost the lease) half-way, and records a failed launch could not delete. Returns
    /// how many it resumed.
    pub async fn resume_launches(&mut self) -> Result<usize, ExecError> {
        if !self.is_leader() {
            self.needs_resume = true;
            return Ok(0);
        }
        let region = self.shared.settings.region.clone();
        let records = self.shared.db.launch_records_in_region(&region).await?;
        let mut resumed = 0;
        for record in records {
            if self.pending.contains_key(&record.launch_id) {
                continue;
            }
            tracing::warn!(%region, launch.id = %record.launch_id, count = record.count, image = %record.image_id, recorded_at = %record.created_at, "resuming a recorded launch");
            self.start_launch(record, true);
            resumed += 1;
        }
        self.needs_resume = false;
        Ok(resumed)
    }

    /// Compares the cloud with the rows: managed instances with no row for longer than the
    /// grace period, and not part of a launch in flight or recorded, are terminated; rows whose
    /// instance is gone are removed. Recorded launches this controller does not run are resumed
    /// first (see [`Self::resume_launches`]).
    pub async fn reconcile_cloud(&mut self) -> Result<(usize, usize), ExecError> {
        if !self.is_leader() {
            return Ok((0, 0));
        }
        // Every recorded launch is pending from here on: its instances are adopted, never
        // terminated as orphans. Without the records nothing can be told apart, so an error
        // stops the reconciliation.
        self.resume_launches().await?;
        let settings = &self.shared.settings;
        let now = Utc::now();
        let grace = chrono::Duration::from_std(settings.orphan_grace).unwrap_or_default();
        let managed = self.shared.hosts.list_managed().await?;
        let rows = self.shared.db.instances_in_region(&settings.region).await?;
        let row_ids: HashSet<&InstanceId> = rows.iter().map(|r| &r.instance.id).collect();
        let pending: HashSet<&str> = self.pending.keys().map(String::as_str).collect();
        let orphans: Vec<InstanceId> = managed
            .iter()
            .filter(|m| !m.state.is_ending() && !row_ids.contains(&m.id))
            .filter(|m| !m.launch_id.as_deref().is_some_and(|l| pending.contains(l)))
            .filter(|m| m.launched_at.is_none_or(|t| now - t > grace))
            .map(|m| m.id.clone())
            .collect();
        if !orphans.is_empty() {
            if let Some(m) = &self.metrics {
                m.terminations
                    .with_label_values(&[settings.region.as_str(), "orphan"])
                    .inc_by(orphans.len() as u64);
            }
            tracing::warn!(region = %settings.region, count = orphans.len(), "terminating orphan instances");
            self.writes().check().await?;
            self.shared.hosts.terminate(&orphans).await?;
        }
        let alive: HashSet<&InstanceId> = managed
            .iter()
            .filter(|m| m.state != HostState::Terminated)
            .map(|m| &m.id)
            .collect();
        let mut removed = 0;
        for row in &rows {
            let i = &row.instance;
            if !alive.contains(&i.id) && !self.busy.contains(&i.id) && now - i.created_at > grace {
                tracing::warn!(region = %settings.region, instance.id = %i.id, "row without an instance: removed");
                if self.writes().delete_instance(&i.id).await? {
                    removed += 1;
                }
            }
        }
        Ok((orphans.len(), removed))
    }
}

/// The live executor: the database and the cloud.
#[async_trait::async_trait]
impl PlanExecutor for RegionController {
    async fn launch(&mut self, count: u32, image_id: ImageId) -> Result<(), ExecError> {
        let region = self.shared.settings.region.clone();
        // The launch is recorded in the database before anything is launched: a retry of the
        // same launch id, in this process or the next after a crash, finds what it launched
        // instead of launching again. No record, no launch.
        let settings = &self.shared.settings;
        let record = self
            .writes()
            .insert_launch_record(&NewLaunchRecord {
                launch_id: format!("{}-{}", region, uuid_like()),
                region: region.clone(),
                image_id,
                instance_type: settings.instance_type.clone(),
                count,
                client_sha: settings.commit.clone(),
            })
            .await?;
        tracing::info!(%region, launch.id = %record.launch_id, count, image = %record.image_id, "launching");
        self.start_launch(record, false);
        Ok(())
    }

    async fn drain(&mut self, instance: InstanceId) -> Result<(), ExecError> {
        let drained = self
            .writes()
            .transition_instance_status(&instance, InstanceStatus::Active, InstanceStatus::Draining)
            .await?;
        tracing::info!(region = %self.region(), instance.id = %instance, drained, "drain");
        Ok(())
    }

    async fn terminate(
        &mut self,
        instance: InstanceId,
        reason: TerminationReason,
    ) -> Result<(), ExecError> {
        let region = self.shared.settings.region.clone();
        if let Some(m) = &self.metrics {
            m.terminations
                .with_label_values(&[region.as_str(), reason.as_str()])
                .inc();
        }
        tracing::info!(%region, instance.id = %instance, reason = reason.as_str(), "terminating");
        self.busy.insert(instance.clone());
        let shared = self.shared.clone();
        let writes = self.writes();
        let id = instance.clone();
        self.spawn_fenced(
            async move { run_termination(&shared, &writes, &id).await },
            move |result| Done::Termination { instance, result },
        );
        Ok(())
    }

    async fn delete_row(&mut self, instance: InstanceId) -> Result<(), ExecError> {
        self.writes().delete_instance(&instance).await?;
        Ok(())
    }

    async fn swap_image(&mut self, image_id: ImageId) -> Result<(), ExecError> {
        let region = self.shared.settings.region.clone();
        tracing::info!(%region, image = %image_id, "image row swapped");
        self.writes()
            .upsert_image(&Image {
                provider: PROVIDER.to_owned(),
                region,
                image_id,
                client_sha: self.shared.settings.commit.clone(),
                updated_at: Utc::now(),
            })
            .await?;
        Ok(())
    }

    fn abandon_upgrade(&mut self, image_id: ImageId) {
        tracing::error!(region = %self.region(), image = %image_id, "image upgrade timed out: rolled back");
        if !self.abandoned.contains(&image_id) {
            self.abandoned.push(image_id);
        }
    }
}

fn uuid_like() -> String {
    dbclient::types::MandelboxId::random().to_string()
}

/// Carries out a recorded launch, then deletes its record: once the rows are in, or once a
/// failed launch has been cleaned up (what it left running is then terminated, or left to
/// reconciliation as orphans). A record that cannot be deleted stays and is resumed again.
async fn run_recorded_launch(
    shared: &Shared,
    writes: &FencedWrites,
    record: &LaunchRecord,
    resumed: bool,
) -> Result<usize, ExecError> {
    let result = run_launch(shared, writes, record, resumed).await;
    if matches!(result, Err(ExecError::LeaseLost)) {
        // The record is the new leader's to resume: it adopts what this launch started.
        return result;
    }
    if let Err(error) = writes.delete_launch_record(&record.launch_id).await {
        // Harmless: resuming it later finds its instances with rows (or gone) and deletes it.
        tracing::warn!(region = %record.region, launch.id = %record.launch_id, %error, "could not delete the launch record; it will be resumed");
    }
    result
}

/// Launch, wait for `running`, insert the PRE_CONNECTION rows. Whatever ran but could not be
/// inserted is terminated again, so a failed launch leaves no orphan behind.
///
/// A `resumed` launch (a record a previous process or leader left) first looks for its
/// instances by launch id: if they are all gone, or there are none and the record is older
/// than `launch_record_limit`, there is nothing to do. Otherwise the repeated launch returns
/// the instances already launched (or launches them, if the process died before RunInstances),
/// and only those without a row get one; rows that exist are left as they are.
async fn run_launch(
    shared: &Shared,
    writes: &FencedWrites,
    record: &LaunchRecord,
    resumed: bool,
) -> Result<usize, ExecError> {
    let settings = &shared.settings;
    let request = LaunchRequest {
        launch_id: record.launch_id.clone(),
        count: record.count,
        image_id: record.image_id.clone(),
        instance_type: record.instance_type.clone(),
        client_sha: record.client_sha.clone(),
    };
    if resumed && !resume_needs_launch(shared, record).await? {
        return Ok(0);
    }
    writes.check().await?;
    let launched = shared.hosts.launch(&request).await?;
    let with_rows: HashSet<InstanceId> = if resumed {
        shared
            .db
            .instances_in_region(&settings.region)
            .await?
            .into_iter()
            .map(|r| r.instance.id)
            .collect()
    } else {
        HashSet::new()
    };
    let adopt: Vec<&HostInstance> = launched
        .iter()
        .filter(|i| !i.state.is_ending() && !with_rows.contains(&i.id))
        .collect();
    let ids: Vec<InstanceId> = adopt.iter().map(|i| i.id.clone()).collect();
    let result = async {
        if ids.is_empty() {
            return Ok(());
        }
        shared
            .hosts
            .wait_running(&ids, settings.wait_running)
            .await?;
        let rows: Vec<NewInstance> = adopt
            .iter()
            .map(|i| NewInstance {
                id: i.id.clone(),
                provider: PROVIDER.to_owned(),
                region: settings.region.clone(),
                image_id: i.image_id.clone(),
                client_sha: record.client_sha.clone(),
                ip_addr: None,
                instance_type: i.instance_type.clone(),
                remaining_capacity: settings.capacity_per_instance,
                status: InstanceStatus::PreConnection,
            })
            .collect();
        if resumed {
            // Rows inserted meanwhile (another replica resuming the same record) are kept.
            writes.insert_launched_instances(&rows).await?;
        } else {
            // All or nothing: a fresh launch's ids cannot have rows yet.
            writes.insert_instances(&rows).await?;
        }
        Ok::<_, ExecError>(())
    }
    .await;
    if let Err(error) = result {
        if matches!(error, ExecError::LeaseLost) {
            // Not ours to clean up any more: the new leader resumes the record and adopts them.
            return Err(error);
        }
        // Only instances without a row: one with a row may already serve users.
        if !ids.is_empty()
            && let Err(cleanup) = shared.hosts.terminate(&ids).await
        {
            tracing::error!(%cleanup, count = ids.len(), "could not terminate a failed launch's instances; reconciliation will");
        }
        return Err(error);
    }
    if resumed {
        tracing::info!(region = %settings.region, launch.id = %record.launch_id, adopted = ids.len(), found = launched.len(), "recorded launch resumed");
    }
    if launched.len() < record.count as usize {
        return Err(ExecError::PartialLaunch {
            launch_id: record.launch_id.clone(),
            wanted: record.count,
            got: launched.len(),
        });
    }
    Ok(ids.len())
}

/// Whether a resumed launch should go on to `launch` (which returns the instances already
/// launched under its id, or launches them): not when every instance it launched is gone, nor
/// when it launched none and the record is older than `launch_record_limit`.
async fn resume_needs_launch(shared: &Shared, record: &LaunchRecord) -> Result<bool, ExecError> {
    let found: Vec<HostInstance> = shared
        .hosts
        .list_managed()
        .await?
        .into_iter()
        .filter(|i| i.launch_id.as_deref() == Some(record.launch_id.as_str()))
        .collect();
    let region = &record.region;
    if !found.is_empty() && found.iter().all(|i| i.state.is_ending()) {
        tracing::info!(%region, launch.id = %record.launch_id, "a recorded launch's instances are all gone: record deleted");
        return Ok(false);
    }
    let limit = chrono::Duration::from_std(shared.settings.launch_record_limit)
        .unwrap_or(chrono::Duration::MAX);
    if found.is_empty() && Utc::now() - record.created_at > limit {
        tracing::warn!(%region, launch.id = %record.launch_id, recorded_at = %record.created_at, "a stale launch record launched nothing: record deleted");
        return Ok(false);
    }
    Ok(true)
}

/// Terminate, verify `terminated`, remove the row.
async fn run_termination(
    shared: &Shared,
    writes: &FencedWrites,
    instance: &InstanceId,
) -> Result<(), ExecError> {
    let ids = std::slice::from_ref(instance);
    writes.check().await?;
    shared.hosts.terminate(ids).await?;
    shared
        .hosts
        .wait_terminated(ids, shared.settings.wait_terminated)
        .await?;
    writes.delete_instance(instance).await?;
    Ok(())
}
