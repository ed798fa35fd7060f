//! Scaling algorithms: a decision is a value. An algorithm looks at a [`Snapshot`] of one
//! region (its instance rows with their use, the current and wanted images, launches still in
//! flight) and returns a plan, a `Vec<`[`Action`]`>`, that the executor carries out. The default
//! algorithm's decision is the pure function [`default::decide`], property-tested for its
//! invariants (never touches a host with users, never exceeds the region's cap, converges on
//! the buffer, never acts twice on one instance).
//!
//! Three algorithms implement [`ScalingAlgorithm`], chosen per region by [`AlgorithmKind`]:
//! [`original`] (Whist's instance buffer, the baseline), [`default`] (a free-capacity buffer
//! that drains surplus at once) and [`holdover`] (the service's default: a buffer sized from the
//! demand it has seen ([`forecast`]), refused clients counted as demand, drains only capacity
//! that has been surplus for a hold-down time and hosts past a minimum lifetime).

use std::time::Duration;

use chrono::{DateTime, Utc};
use dbclient::types::{ImageId, InstanceId, InstanceStatus};

use crate::hosts::InstanceTypeInfo;

pub mod default;
pub mod forecast;
pub mod holdover;
pub mod original;

pub use default::{DefaultAlgorithm, decide};
pub use holdover::HoldoverAlgorithm;
pub use original::OriginalAlgorithm;

/// Mandelboxes per GPU (shared with the host service's limit).
pub const MANDELBOXES_PER_GPU: u32 = 3;
/// vCPUs one mandelbox needs.
pub const VCPUS_PER_MANDELBOX: u32 = 4;

/// How many mandelboxes an instance type holds: `min(GPUs × 3, vCPUs / 4)`.
pub fn mandelbox_capacity(info: InstanceTypeInfo) -> u32 {
    (info.gpus.saturating_mul(MANDELBOXES_PER_GPU)).min(info.vcpus / VCPUS_PER_MANDELBOX)
}

/// One instance row as the algorithm sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceView {
    pub id: InstanceId,
    pub image_id: ImageId,
    pub status: InstanceStatus,
    /// Free mandelbox slots (the row's `remaining_capacity`).
    pub remaining_capacity: u32,
    /// The slots its type holds when empty.
    pub capacity: u32,
    /// Mandelbox rows on it that hold (or are about to hold) a user: every status but WAITING.
    pub mandelboxes: u32,
    pub created_at: DateTime<Utc>,
    /// Since when it has been in `status`, as well as the service knows (the row's
    /// `updated_at`, or when this process first saw the status, whichever is earlier).
    pub status_since: DateTime<Utc>,
}

impl InstanceView {
    /// Users on it, or capacity taken: such a host is never drained or terminated.
    pub fn has_users(&self) -> bool {
        self.mandelboxes > 0 || self.remaining_capacity < self.capacity
    }
}

/// A launch under way whose instances have no rows yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingLaunch {
    pub launch_id: String,
    pub image_id: ImageId,
    pub count: u32,
    pub started_at: DateTime<Utc>,
}

/// What one region looks like now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub instances: Vec<InstanceView>,
    /// The region's image row: what assignment serves and the buffer is kept on.
    pub current_image: Option<ImageId>,
    /// The image the operator wants (from the deploy); differing from `current_image` means an
    /// upgrade is under way.
    pub target_image: Option<ImageId>,
    /// Upgrades that timed out and were rolled back by this process.
    pub abandoned_images: Vec<ImageId>,
    pub pending_launches: Vec<PendingLaunch>,
    /// Instances with an action (a termination) still in flight: left alone.
    pub busy: Vec<InstanceId>,
    /// Clients refused (`NO_INSTANCE_AVAILABLE`) in this region within the recent window and
    /// presumably still retrying: demand the fleet has not met.
    pub waiting_clients: u32,
    /// Clients that have asked for a mandelbox in this region since the controller started
    /// (each client once: its first refusal or its assignment), a counter that only grows while
    /// the process lives. Algorithms derive arrival rates from its increments.
    pub arrivals: u64,
}

/// The default algorithm's settings for one region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlgorithmConfig {
    /// Free mandelboxes to keep ready on the current image.
    pub desired_free_mandelboxes: u32,
    /// Most instances (rows of any status plus pending launches) the region may have.
    pub max_instances: u32,
    /// Mandelboxes per instance of the type launched.
    pub capacity_per_instance: u32,
    /// A free DRAINING host still there after this is terminated and its row removed.
    pub lingering_limit: Duration,
    /// A free PRE_CONNECTION host that has not registered after this is terminated.
    pub boot_timeout: Duration,
    /// An image upgrade whose new hosts are not ACTIVE after this is rolled back.
    pub upgrade_timeout: Duration,
    /// Decide again at the latest after this, even with no event.
    pub requeue_interval: Duration,
    /// `holdover`: the longest hold-down, and the one it uses until it has a demand forecast
    /// (after a restart): only capacity that has been surplus this long is drained. Default:
    /// 15 min, tuned with `make compare` on the trace corpus (longer holds keep hosts through
    /// lulls nobody comes back from; shorter ones relaunch after ordinary ones).
    pub hold_down: Duration,
    /// `holdover`: a host is never drained within this time of becoming ACTIVE. Default: one
    /// boot time (replacing it would cost another), at least EC2's 60 s billing minimum.
    pub min_lifetime: Duration,
    /// `holdover`: the shortest hold-down, when sessions are short or nobody comes. Default:
    /// one typical boot (draining sooner is a bet that the host will not be needed again
    /// before a relaunch could be up).
    pub min_hold_down: Duration,
    /// `holdover`: the arrival rate is measured over this window (and nothing is forecast for
    /// a fifteenth of it after a restart).
    pub forecast_window: Duration,
    /// `holdover`: the buffer it launches for covers the arrivals expected within this time.
    pub forecast_horizon: Duration,
    /// `holdover`: it drains only what is beyond the arrivals expected within this time (a
    /// band above the buffer that grows with the arrival rate, so a busy region's ordinary
    /// fluctuations do not drain a host that the next minutes relaunch).
    pub drain_horizon: Duration,
    /// `holdover`: the chance, in percent, that more clients arrive within the horizon than
    /// the buffer holds.
    pub buffer_risk_percent: u32,
}

/// EC2 bills an instance for at least this long.
pub const BILLING_MINIMUM: Duration = Duration::from_secs(60);
/// A GPU host's typical time from launch to ACTIVE (EC2 g4dn: instance running, boot, host
/// service registered).
pub const TYPICAL_BOOT: Duration = Duration::from_secs(4 * 60);

impl Default for AlgorithmConfig {
    fn default() -> Self {
        Self {
            desired_free_mandelboxes: 2,
            max_instances: 20,
            capacity_per_instance: 2,
            lingering_limit: Duration::from_secs(10 * 60),
            boot_timeout: Duration::from_secs(15 * 60),
            upgrade_timeout: Duration::from_secs(150 * 60),
            requeue_interval: Duration::from_secs(60),
            hold_down: Duration::from_secs(15 * 60),
            min_lifetime: TYPICAL_BOOT.max(BILLING_MINIMUM),
            min_hold_down: TYPICAL_BOOT.max(BILLING_MINIMUM),
            forecast_window: Duration::from_secs(30 * 60),
            forecast_horizon: Duration::from_secs(60),
            drain_horizon: Duration::from_secs(120),
            buffer_risk_percent: 10,
        }
    }
}

/// Terminations of hosts without users that have outstayed their state: DRAINING past
/// `lingering_limit`, and with `boot_timeouts` also PRE_CONNECTION past `boot_timeout` since
/// its launch. Hosts in `skip` (busy, or already acted on) are left alone. Returns the actions
/// and how long until the next such host is due (at most `requeue_interval`).
pub(crate) fn overdue_terminations(
    snapshot: &Snapshot,
    config: &AlgorithmConfig,
    boot_timeouts: bool,
    now: DateTime<Utc>,
) -> (Vec<Action>, Duration) {
    let mut actions = Vec::new();
    let mut next_check = config.requeue_interval;
    for i in snapshot
        .instances
        .iter()
        .filter(|i| !i.has_users() && !snapshot.busy.contains(&i.id))
    {
        let (limit, reason, since) = match i.status {
            InstanceStatus::Draining => (
                config.lingering_limit,
                TerminationReason::Lingering,
                i.status_since,
            ),
            InstanceStatus::PreConnection if boot_timeouts => (
                config.boot_timeout,
                TerminationReason::BootTimeout,
                i.created_at,
            ),
            _ => continue,
        };
        let elapsed = (now - since).to_std().unwrap_or(Duration::ZERO);
        let left = limit.saturating_sub(elapsed);
        if left.is_zero() {
            actions.push(Action::Terminate {
                instance: i.id.clone(),
                reason,
            });
        } else {
            next_check = next_check.min(left);
        }
    }
    (actions, next_check)
}

/// Why a host is terminated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TerminationReason {
    /// DRAINING without users past the lingering limit.
    Lingering,
    /// PRE_CONNECTION past the boot timeout (its host service never registered).
    BootTimeout,
    /// A new-image host of an upgrade that timed out.
    UpgradeRollback,
    /// Running in the cloud with no row (reconciliation).
    Orphan,
}

impl TerminationReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Lingering => "lingering",
            Self::BootTimeout => "boot_timeout",
            Self::UpgradeRollback => "upgrade_rollback",
            Self::Orphan => "orphan",
        }
    }
}

/// One step of a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Launch `count` instances of `image_id` and insert their PRE_CONNECTION rows.
    Launch { count: u32, image_id: ImageId },
    /// Mark a free ACTIVE host DRAINING; its host service shuts it down.
    Drain { instance: InstanceId },
    /// Terminate the host, verify it, and remove its row.
    Terminate {
        instance: InstanceId,
        reason: TerminationReason,
    },
    /// Remove a row whose instance no longer exists.
    DeleteRow { instance: InstanceId },
    /// Point the region's image row at `image_id` (the upgrade's second phase).
    SwapImage { image_id: ImageId },
    /// Give up the upgrade to `image_id` (its hosts are terminated by `Terminate` actions).
    AbandonUpgrade { image_id: ImageId },
    /// Decide again after this long at the latest.
    RequeueAfter(Duration),
}

impl Action {
    /// The instance this action is about, if any.
    pub fn instance(&self) -> Option<&InstanceId> {
        match self {
            Self::Drain { instance }
            | Self::Terminate { instance, .. }
            | Self::DeleteRow { instance } => Some(instance),
            _ => None,
        }
    }
}

/// A region's decision maker. Object-safe: the event handler owns a `Box<dyn ScalingAlgorithm>`
/// per region and calls it one event at a time.
#[async_trait::async_trait]
pub trait ScalingAlgorithm: Send + Sync + std::fmt::Debug {
    fn name(&self) -> &str;
    /// The plan for `snapshot` at `now`.
    async fn plan(&mut self, snapshot: &Snapshot, now: DateTime<Utc>) -> Vec<Action>;
}

/// Which algorithm runs a region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, clap::ValueEnum)]
pub enum AlgorithmKind {
    /// Whist's instance buffer: keep N hosts, drain empty ones every 10 minutes.
    Original,
    /// A free-capacity buffer that drains surplus at once.
    Default,
    /// Counts refused clients as demand, drains only long-surplus capacity of old-enough hosts.
    Holdover,
}

impl AlgorithmKind {
    pub const ALL: &'static [AlgorithmKind] = &[Self::Original, Self::Default, Self::Holdover];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Original => "original",
            Self::Default => "default",
            Self::Holdover => "holdover",
        }
    }

    /// A fresh algorithm of this kind.
    pub fn build(self, config: AlgorithmConfig) -> Box<dyn ScalingAlgorithm> {
        match self {
            Self::Original => Box::new(OriginalAlgorithm::new(config)),
            Self::Default => Box::new(DefaultAlgorithm::new(config)),
            Self::Holdover => Box::new(HoldoverAlgorithm::new(config)),
        }
    }
}

impl std::fmt::Display for AlgorithmKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for AlgorithmKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .iter()
            .copied()
            .find(|k| k.as_str() == s.trim())
            .ok_or_else(|| format!("unknown algorithm {s:?} (original, default or holdover)"))
    }
}

/// Builders the algorithms' unit tests share.
#[cfg(test)]
pub(crate) mod testing {
    #![allow(clippy::unwrap_used)]

    use super::*;

    pub fn t0() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2024-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    pub fn img(s: &str) -> ImageId {
        ImageId::new(s).unwrap()
    }

    /// Host `n` on `image` with `users` of its 2 slots taken, created and in `status` since
    /// `t0()`.
    pub fn host(n: u32, image: &str, status: InstanceStatus, users: u32) -> InstanceView {
        host_since(n, image, status, users, t0())
    }

    /// [`host`], created and in `status` since `at`.
    pub fn host_since(
        n: u32,
        image: &str,
        status: InstanceStatus,
        users: u32,
        at: DateTime<Utc>,
    ) -> InstanceView {
        InstanceView {
            id: InstanceId::new(format!("i-{n:08}")).unwrap(),
            image_id: img(image),
            status,
            remaining_capacity: 2 - users,
            capacity: 2,
            mandelboxes: users,
            created_at: at,
            status_since: at,
        }
    }

    /// A region on `ami-a` (current and wanted) with `instances`.
    pub fn snapshot(instances: Vec<InstanceView>) -> Snapshot {
        Snapshot {
            instances,
            current_image: Some(img("ami-a")),
            target_image: Some(img("ami-a")),
            ..Snapshot::default()
        }
    }

    /// The instances `plan` drains, in order.
    pub fn drained(plan: &[Action]) -> Vec<String> {
        plan.iter()
            .filter_map(|a| match a {
                Action::Drain { instance } => Some(instance.as_str().to_owned()),
                _ => None,
            })
            .collect()
    }
}
