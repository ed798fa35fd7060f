//! The simulated region: a database state (the region's rows, as `dbclient` types, and its
//! image row), a simulated cloud (launches that run after a delay, hosts that boot, drain
//! and shut down), clients that retry a refusal like `whist-client`, and a simulated clock.
//! The controller side is the service's own: [`SnapshotBuilder`] builds the snapshot from the
//! rows, the real [`ScalingAlgorithm`] plans, and [`execute_plan`] carries the plan out through
//! this fleet's [`PlanExecutor`].

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use dbclient::types::{
    ImageId, Instance, InstanceId, InstanceStatus, InstanceWithMandelboxes, Mandelbox, MandelboxId,
    MandelboxStatus, Region,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::trace::{Session, normal};
use crate::algorithm::{PendingLaunch, ScalingAlgorithm, TerminationReason};
use crate::controller::demand::RefusalLog;
use crate::controller::snapshot::{ControllerState, SnapshotBuilder};
use crate::controller::{ExecError, PlanExecutor, execute_plan};

/// How the simulated hosts and clients behave.
#[derive(Debug, Clone)]
pub struct FleetModel {
    pub capacity_per_instance: u32,
    /// From RunInstances to the instance running and its row inserted (PRE_CONNECTION).
    pub running_s: f64,
    /// From running to the host service registering ACTIVE: log-normal with this median and
    /// sigma (EC2 GPU hosts: minutes, with a tail).
    pub register_median_s: f64,
    pub register_sigma: f64,
    /// A DRAINING host without users shuts down and is gone after this.
    pub drain_s: f64,
    /// A terminated instance is verified gone (and its row removed) after this.
    pub terminate_s: f64,
    /// EC2's per-second billing minimum.
    pub billing_minimum_s: f64,
    /// A client retries a refusal with `whist-client`'s backoff (0.25 s doubling to 5 s,
    /// ±20 % jitter) and gives up after this.
    pub give_up_s: f64,
    /// A host terminated within this time of becoming ACTIVE is an early termination.
    pub min_lifetime_s: f64,
    /// The timeline's sampling interval.
    pub sample_s: f64,
    pub seed: u64,
}

impl Default for FleetModel {
    fn default() -> Self {
        Self {
            capacity_per_instance: 2,
            running_s: 40.0,
            register_median_s: 150.0,
            register_sigma: 0.3,
            drain_s: 15.0,
            terminate_s: 30.0,
            billing_minimum_s: 60.0,
            give_up_s: 180.0,
            min_lifetime_s: crate::algorithm::AlgorithmConfig::default()
                .min_lifetime
                .as_secs_f64(),
            sample_s: 60.0,
            seed: 1,
        }
    }
}

/// One sample of the timeline.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Sample {
    pub t_s: f64,
    /// Clients in a session or waiting for one.
    pub demand: u32,
    pub in_session: u32,
    pub waiting: u32,
    /// Free slots on ACTIVE hosts of the current image.
    pub free_capacity: u32,
    /// Launching (no row yet) or PRE_CONNECTION.
    pub booting: u32,
    pub active: u32,
    pub draining: u32,
    /// Clients that have given up so far.
    pub unmet_total: u64,
}

/// What a run measured.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Outcome {
    pub sessions: u64,
    pub served: u64,
    pub unmet_requests: u64,
    /// Waits of the served clients, seconds.
    #[serde(skip)]
    pub waits_s: Vec<f64>,
    pub refusals: u64,
    pub host_seconds_billed: f64,
    pub launches: u64,
    pub drains: u64,
    pub terminations: u64,
    pub early_terminations: u64,
    pub peak_hosts: u32,
    pub controller_steps: u64,
    pub simulated_s: f64,
    #[serde(skip)]
    pub timeline: Vec<Sample>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    Arrive(usize),
    Retry(usize),
    SessionEnd(usize, usize),
    LaunchRunning(usize),
    HostActive(usize),
    HostGone(usize),
    Wake,
    Sample,
}

/// A simulated machine (index into `hosts`).
#[derive(Debug, Clone)]
struct Host {
    id: InstanceId,
    launched_ms: i64,
    active_ms: Option<i64>,
    gone: bool,
}

#[derive(Debug, Clone)]
struct Launch {
    pending: PendingLaunch,
    hosts: Vec<usize>,
}

#[derive(Debug, Clone)]
struct Client {
    arrived_ms: i64,
    attempts: u32,
    key: String,
}

/// The simulated region and its clock.
#[derive(Debug)]
pub struct Fleet<'a> {
    model: FleetModel,
    region: Region,
    sessions: &'a [Session],
    clients: Vec<Client>,
    rng: StdRng,
    now_ms: i64,
    queue: BinaryHeap<Reverse<(i64, u64, Ev)>>,
    seq: u64,
    hosts: Vec<Host>,
    /// The database: the region's rows and its image row.
    rows: Vec<InstanceWithMandelboxes>,
    image: Option<ImageId>,
    target_image: ImageId,
    launches: BTreeMap<usize, Launch>,
    busy: HashSet<InstanceId>,
    abandoned: Vec<ImageId>,
    refusals: RefusalLog,
    waiting: HashSet<usize>,
    in_session: u32,
    next_wake_ms: i64,
    dirty: bool,
    out: Outcome,
}

fn epoch() -> DateTime<Utc> {
    DateTime::<Utc>::from_timestamp(1_704_067_200, 0).unwrap_or_default()
}

fn ms(s: f64) -> i64 {
    (s * 1000.0).round() as i64
}

impl<'a> Fleet<'a> {
    /// A region whose image row and deploy both say `image`, with no host yet.
    pub fn new(model: FleetModel, region: Region, image: ImageId, sessions: &'a [Session]) -> Self {
        let rng = StdRng::seed_from_u64(model.seed);
        Self {
            clients: (0..sessions.len())
                .map(|n| Client {
                    arrived_ms: ms(sessions[n].start_s),
                    attempts: 0,
                    key: format!("user-{n}/session-{n}"),
                })
                .collect(),
            model,
            region,
            sessions,
            rng,
            now_ms: 0,
            queue: BinaryHeap::new(),
            seq: 0,
            hosts: Vec::new(),
            rows: Vec::new(),
            image: Some(image.clone()),
            target_image: image,
            launches: BTreeMap::new(),
            busy: HashSet::new(),
            abandoned: Vec::new(),
            refusals: RefusalLog::default(),
            waiting: HashSet::new(),
            in_session: 0,
            next_wake_ms: 0,
            dirty: true,
            out: Outcome::default(),
        }
    }

    fn now(&self) -> DateTime<Utc> {
        epoch() + chrono::Duration::milliseconds(self.now_ms)
    }

    fn at(&mut self, t_ms: i64, ev: Ev) {
        self.seq += 1;
        self.queue
            .push(Reverse((t_ms.max(self.now_ms), self.seq, ev)));
    }

    /// Runs the trace to its end (every client served or gone, every session over) and the
    /// fleet until `tail_s` after, with `algorithm` deciding.
    pub async fn run(mut self, algorithm: &mut dyn ScalingAlgorithm, tail_s: f64) -> Outcome {
        for n in 0..self.sessions.len() {
            let t = self.clients[n].arrived_ms;
            self.at(t, Ev::Arrive(n));
        }
        self.at(0, Ev::Sample);
        self.at(0, Ev::Wake);
        let last_end = self
            .sessions
            .iter()
            .map(|s| s.start_s + self.model.give_up_s + s.duration_s)
            .fold(0.0, f64::max);
        let end_ms = ms(last_end + tail_s);
        let mut snapshots = SnapshotBuilder::default();
        while let Some(Reverse((t, _, ev))) = self.queue.pop() {
            if t > end_ms {
                break;
            }
            self.now_ms = t;
            self.handle(ev);
            // Everything at this instant is in before the controller looks, as a subscription
            // delivers the state after a burst of writes.
            let more_now = self
                .queue
                .peek()
                .is_some_and(|Reverse((t2, _, _))| *t2 == t);
            if !more_now && (self.dirty || self.next_wake_ms <= t) {
                self.step(algorithm, &mut snapshots).await;
            }
        }
        self.now_ms = end_ms;
        self.finish()
    }

    async fn step(
        &mut self,
        algorithm: &mut dyn ScalingAlgorithm,
        snapshots: &mut SnapshotBuilder,
    ) {
        self.dirty = false;
        self.out.controller_steps += 1;
        let now = self.now();
        let state = ControllerState {
            target_image: Some(self.target_image.clone()),
            abandoned_images: self.abandoned.clone(),
            pending_launches: self.launches.values().map(|l| l.pending.clone()).collect(),
            busy: self.busy.iter().cloned().collect(),
            waiting_clients: self.refusals.waiting(now),
            arrivals: self.refusals.arrivals(),
        };
        let snapshot = snapshots.build(
            &self.rows,
            self.image.clone(),
            self.model.capacity_per_instance,
            state,
            now,
        );
        let plan = algorithm.plan(&snapshot, now).await;
        let wait = match execute_plan(plan, self).await {
            Ok(wait) => wait,
            Err(_) => Duration::from_secs(5),
        };
        let wait = wait.clamp(Duration::from_secs(1), Duration::from_secs(60));
        self.next_wake_ms = self.now_ms + i64::try_from(wait.as_millis()).unwrap_or(60_000);
        let t = self.next_wake_ms;
        self.at(t, Ev::Wake);
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Arrive(n) | Ev::Retry(n) => self.assign(n),
            Ev::SessionEnd(host, n) => self.end_session(host, n),
            Ev::LaunchRunning(l) => self.launch_running(l),
            Ev::HostActive(h) => {
                if let Some(row) = self.row_mut(h) {
                    row.instance.status = InstanceStatus::Active;
                    self.hosts[h].active_ms = Some(self.now_ms);
                    self.set_updated(h);
                    self.dirty = true;
                }
            }
            Ev::HostGone(h) => self.host_gone(h),
            Ev::Wake => {}
            Ev::Sample => {
                self.sample();
                let next = self.now_ms + ms(self.model.sample_s);
                self.at(next, Ev::Sample);
            }
        }
    }

    fn row_index(&self, h: usize) -> Option<usize> {
        let id = &self.hosts[h].id;
        self.rows.iter().position(|r| &r.instance.id == id)
    }

    fn row_mut(&mut self, h: usize) -> Option<&mut InstanceWithMandelboxes> {
        let i = self.row_index(h)?;
        self.rows.get_mut(i)
    }

    fn host_of(&self, id: &InstanceId) -> Option<usize> {
        self.hosts.iter().position(|h| &h.id == id)
    }

    fn set_updated(&mut self, h: usize) {
        let now = self.now();
        if let Some(row) = self.row_mut(h) {
            row.instance.updated_at = now;
        }
    }

    /// `POST /mandelbox/assign`: the fullest ACTIVE host of the current image with a free slot
    /// (the service's bin-packing), or a refusal the client retries.
    fn assign(&mut self, n: usize) {
        let image = self.image.clone();
        let chosen = self
            .rows
            .iter()
            .enumerate()
            .filter(|(_, r)| {
                r.instance.status == InstanceStatus::Active
                    && Some(&r.instance.image_id) == image.as_ref()
                    && r.instance.remaining_capacity > 0
            })
            .min_by_key(|(_, r)| (r.instance.remaining_capacity, r.instance.id.clone()))
            .map(|(i, _)| i);
        let now = self.now();
        let client = self.clients[n].clone();
        match chosen {
            Some(i) => {
                let row = &mut self.rows[i];
                row.instance.remaining_capacity -= 1;
                row.mandelboxes.push(Mandelbox {
                    id: MandelboxId::random(),
                    app: "CHROME".to_owned(),
                    instance_id: row.instance.id.clone(),
                    user_id: None,
                    session_id: Some(client.key.clone()),
                    status: MandelboxStatus::Running,
                    created_at: now,
                    updated_at: now,
                });
                let id = row.instance.id.clone();
                let h = self.host_of(&id).unwrap_or(0);
                self.refusals.served(&client.key);
                self.waiting.remove(&n);
                self.in_session += 1;
                self.out.served += 1;
                self.out
                    .waits_s
                    .push((self.now_ms - client.arrived_ms) as f64 / 1000.0);
                let end = self.now_ms + ms(self.sessions[n].duration_s);
                self.at(end, Ev::SessionEnd(h, n));
            }
            None => {
                self.out.refusals += 1;
                self.refusals.refused(&client.key, now);
                let waited_s = (self.now_ms - client.arrived_ms) as f64 / 1000.0;
                if waited_s >= self.model.give_up_s {
                    self.waiting.remove(&n);
                    self.out.unmet_requests += 1;
                } else {
                    self.waiting.insert(n);
                    let attempts = client.attempts + 1;
                    self.clients[n].attempts = attempts;
                    let doublings = attempts.saturating_sub(1).min(16);
                    let backoff = (0.25 * f64::from(1u32 << doublings)).min(5.0);
                    let jitter = 0.8 + 0.4 * self.rng.random::<f64>();
                    let left = self.model.give_up_s - waited_s;
                    let pause = (backoff * jitter).min(left);
                    self.at(self.now_ms + ms(pause), Ev::Retry(n));
                }
            }
        }
        self.dirty = true;
    }

    fn end_session(&mut self, h: usize, n: usize) {
        let key = self.clients[n].key.clone();
        self.in_session = self.in_session.saturating_sub(1);
        let Some(row) = self.row_mut(h) else { return };
        row.mandelboxes
            .retain(|m| m.session_id.as_deref() != Some(key.as_str()));
        row.instance.remaining_capacity += 1;
        let draining_and_empty =
            row.instance.status == InstanceStatus::Draining && row.mandelboxes.is_empty();
        if draining_and_empty {
            let t = self.now_ms + ms(self.model.drain_s);
            self.at(t, Ev::HostGone(h));
        }
        self.dirty = true;
    }

    fn launch_running(&mut self, l: usize) {
        let now = self.now();
        let Some(launch) = self.launches.remove(&l) else {
            return;
        };
        for h in launch.hosts {
            self.rows.push(InstanceWithMandelboxes {
                instance: Instance {
                    id: self.hosts[h].id.clone(),
                    provider: crate::region::PROVIDER.to_owned(),
                    region: self.region.clone(),
                    image_id: launch.pending.image_id.clone(),
                    client_sha: "simulated".to_owned(),
                    ip_addr: None,
                    instance_type: "g4dn.2xlarge".to_owned(),
                    remaining_capacity: self.model.capacity_per_instance,
                    status: InstanceStatus::PreConnection,
                    created_at: now,
                    updated_at: now,
                    tls_fingerprint: None,
                },
                mandelboxes: Vec::new(),
            });
            let register = self.model.register_median_s
                * (self.model.register_sigma * normal(&mut self.rng)).exp();
            let t = self.now_ms + ms(register);
            self.at(t, Ev::HostActive(h));
        }
        self.dirty = true;
    }

    fn host_gone(&mut self, h: usize) {
        if self.hosts[h].gone {
            return;
        }
        if let Some(i) = self.row_index(h) {
            // A draining host shuts down only once its last user left.
            if !self.rows[i].mandelboxes.is_empty() {
                return;
            }
            self.rows.remove(i);
        }
        let host = &mut self.hosts[h];
        host.gone = true;
        let lived_ms = self.now_ms - host.launched_ms;
        self.out.host_seconds_billed +=
            (lived_ms as f64 / 1000.0).max(self.model.billing_minimum_s);
        self.out.terminations += 1;
        if host
            .active_ms
            .is_none_or(|a| ((self.now_ms - a) as f64 / 1000.0) < self.model.min_lifetime_s)
        {
            self.out.early_terminations += 1;
        }
        let id = host.id.clone();
        self.busy.remove(&id);
        self.dirty = true;
    }

    fn sample(&mut self) {
        let image = self.image.clone();
        let count = |s: InstanceStatus| {
            u32::try_from(self.rows.iter().filter(|r| r.instance.status == s).count())
                .unwrap_or(u32::MAX)
        };
        let launching: u32 = self.launches.values().map(|l| l.pending.count).sum();
        let free = self
            .rows
            .iter()
            .filter(|r| {
                r.instance.status == InstanceStatus::Active
                    && Some(&r.instance.image_id) == image.as_ref()
            })
            .map(|r| r.instance.remaining_capacity)
            .sum();
        let waiting = u32::try_from(self.waiting.len()).unwrap_or(u32::MAX);
        self.out.timeline.push(Sample {
            t_s: self.now_ms as f64 / 1000.0,
            demand: self.in_session + waiting,
            in_session: self.in_session,
            waiting,
            free_capacity: free,
            booting: launching + count(InstanceStatus::PreConnection),
            active: count(InstanceStatus::Active),
            draining: count(InstanceStatus::Draining),
            unmet_total: self.out.unmet_requests,
        });
    }

    fn alive(&self) -> u32 {
        u32::try_from(self.hosts.iter().filter(|h| !h.gone).count()).unwrap_or(u32::MAX)
    }

    fn finish(mut self) -> Outcome {
        // Hosts still up are billed until the end of the run.
        for h in self.hosts.iter().filter(|h| !h.gone) {
            let lived_s = (self.now_ms - h.launched_ms) as f64 / 1000.0;
            self.out.host_seconds_billed += lived_s.max(self.model.billing_minimum_s);
        }
        self.out.sessions = self.sessions.len() as u64;
        self.out.simulated_s = self.now_ms as f64 / 1000.0;
        self.out
    }
}

#[async_trait::async_trait]
impl PlanExecutor for Fleet<'_> {
    async fn launch(&mut self, count: u32, image_id: ImageId) -> Result<(), ExecError> {
        let launch_id = format!("launch-{}", self.out.launches);
        let mut hosts = Vec::new();
        for _ in 0..count {
            let n = self.hosts.len();
            let id = InstanceId::new(format!("i-sim{n:013}"))
                .map_err(|e| ExecError::Db(e.to_string()))?;
            self.hosts.push(Host {
                id,
                launched_ms: self.now_ms,
                active_ms: None,
                gone: false,
            });
            hosts.push(n);
            self.out.launches += 1;
        }
        self.out.peak_hosts = self.out.peak_hosts.max(self.alive());
        let now = self.now();
        let l = self.launches.last_key_value().map_or(0, |(k, _)| k + 1);
        self.launches.insert(
            l,
            Launch {
                pending: PendingLaunch {
                    launch_id,
                    image_id,
                    count,
                    started_at: now,
                },
                hosts,
            },
        );
        let t = self.now_ms + ms(self.model.running_s);
        self.at(t, Ev::LaunchRunning(l));
        Ok(())
    }

    async fn drain(&mut self, instance: InstanceId) -> Result<(), ExecError> {
        let Some(h) = self.host_of(&instance) else {
            return Ok(());
        };
        let Some(row) = self.row_mut(h) else {
            return Ok(());
        };
        if row.instance.status != InstanceStatus::Active {
            return Ok(());
        }
        row.instance.status = InstanceStatus::Draining;
        let empty = row.mandelboxes.is_empty();
        self.set_updated(h);
        self.out.drains += 1;
        if empty {
            let t = self.now_ms + ms(self.model.drain_s);
            self.at(t, Ev::HostGone(h));
        }
        self.dirty = true;
        Ok(())
    }

    async fn terminate(
        &mut self,
        instance: InstanceId,
        _reason: TerminationReason,
    ) -> Result<(), ExecError> {
        if let Some(h) = self.host_of(&instance) {
            self.busy.insert(instance);
            if let Some(row) = self.row_mut(h) {
                row.mandelboxes.clear();
            }
            let t = self.now_ms + ms(self.model.terminate_s);
            self.at(t, Ev::HostGone(h));
        }
        Ok(())
    }

    async fn delete_row(&mut self, instance: InstanceId) -> Result<(), ExecError> {
        self.rows.retain(|r| r.instance.id != instance);
        self.dirty = true;
        Ok(())
    }

    async fn swap_image(&mut self, image_id: ImageId) -> Result<(), ExecError> {
        self.image = Some(image_id);
        self.dirty = true;
        Ok(())
    }

    fn abandon_upgrade(&mut self, image_id: ImageId) {
        if !self.abandoned.contains(&image_id) {
            self.abandoned.push(image_id);
        }
    }
}

/// Percentile `p` (0–100) of `values` (nearest rank); 0 when empty.
pub fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// Sessions grouped by region, each group in start order.
pub fn by_region(sessions: &[Session]) -> HashMap<String, Vec<Session>> {
    let mut out: HashMap<String, Vec<Session>> = HashMap::new();
    for s in sessions {
        out.entry(s.region.clone()).or_default().push(s.clone());
    }
    out
}
