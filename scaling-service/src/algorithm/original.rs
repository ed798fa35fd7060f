//! The original algorithm: Whist's instance buffer (`../shared/reference/scaling-service.md`
//! §2.4, with the fixes of 2022-02: booting hosts count, lingering hosts are terminated), kept
//! as the baseline the others are measured against.
//!
//! - `VerifyCapacity`, on every event: while the region has fewer than `buffer` ACTIVE,
//!   PRE_CONNECTION or launching instances, launch the difference. The buffer counts
//!   *instances*, not free capacity: a full host counts as much as an empty one.
//! - `ScaleDownIfNecessary`, every 10 minutes: walk the ACTIVE instances in row order and mark
//!   each one without users DRAINING while more than `buffer` remain.
//! - DRAINING hosts without users for longer than the lingering limit are terminated.
//!
//! `buffer` is `ceil(desired_free_mandelboxes / capacity_per_instance)` instances (at least
//! one), so with the service's settings it is the original's `DEFAULT_INSTANCE_BUFFER = 1`.

use std::collections::HashSet;
use std::time::Duration;

use chrono::{DateTime, Utc};
use dbclient::types::{InstanceId, InstanceStatus};

use super::{Action, AlgorithmConfig, ScalingAlgorithm, Snapshot, overdue_terminations};

/// The original's scheduled scale-down interval.
pub const SCALE_DOWN_INTERVAL: Duration = Duration::from_secs(10 * 60);

/// The instance-buffer algorithm. Its one piece of state is when it last scaled down (the
/// original's 10-minute scheduler).
#[derive(Debug, Clone)]
pub struct OriginalAlgorithm {
    config: AlgorithmConfig,
    last_scale_down: Option<DateTime<Utc>>,
}

impl OriginalAlgorithm {
    pub fn new(config: AlgorithmConfig) -> Self {
        Self {
            config,
            last_scale_down: None,
        }
    }

    /// The buffer, in instances.
    pub fn buffer(&self) -> u32 {
        self.config
            .desired_free_mandelboxes
            .div_ceil(self.config.capacity_per_instance.max(1))
            .max(1)
    }
}

#[async_trait::async_trait]
impl ScalingAlgorithm for OriginalAlgorithm {
    fn name(&self) -> &str {
        "original"
    }

    async fn plan(&mut self, snapshot: &Snapshot, now: DateTime<Utc>) -> Vec<Action> {
        let scale_down = self
            .last_scale_down
            .is_none_or(|t| (now - t).to_std().unwrap_or(Duration::ZERO) >= SCALE_DOWN_INTERVAL);
        if scale_down {
            self.last_scale_down = Some(now);
        }
        decide_original(snapshot, &self.config, self.buffer(), scale_down, now)
    }
}

/// The original's plan for `snapshot`; `scale_down` says whether the 10-minute scale-down is
/// due. Pure.
pub fn decide_original(
    snapshot: &Snapshot,
    config: &AlgorithmConfig,
    buffer: u32,
    scale_down: bool,
    now: DateTime<Utc>,
) -> Vec<Action> {
    let mut actions = Vec::new();
    let busy: HashSet<&InstanceId> = snapshot.busy.iter().collect();
    let live = || snapshot.instances.iter().filter(|i| !busy.contains(&i.id));
    if snapshot.current_image.is_none()
        && let Some(target) = &snapshot.target_image
    {
        actions.push(Action::SwapImage {
            image_id: target.clone(),
        });
    }
    let Some(image) = snapshot
        .current_image
        .clone()
        .or_else(|| snapshot.target_image.clone())
    else {
        actions.push(Action::RequeueAfter(config.requeue_interval));
        return actions;
    };
    let (overdue, _) = overdue_terminations(snapshot, config, false, now);
    actions.extend(overdue);
    // VerifyCapacity: ACTIVE + PRE_CONNECTION (+ launches in flight, which the original
    // awaited before handling the next event).
    let counted = live()
        .filter(|i| i.status != InstanceStatus::Draining)
        .count() as u64
        + snapshot
            .pending_launches
            .iter()
            .map(|p| u64::from(p.count))
            .sum::<u64>();
    let total = snapshot.instances.len() as u64
        + snapshot
            .pending_launches
            .iter()
            .map(|p| u64::from(p.count))
            .sum::<u64>();
    let wanted = u64::from(buffer).saturating_sub(counted);
    let headroom = u64::from(config.max_instances).saturating_sub(total);
    let count = u32::try_from(wanted.min(headroom)).unwrap_or(0);
    if count > 0 {
        actions.push(Action::Launch {
            count,
            image_id: image.clone(),
        });
    }
    if scale_down {
        let mut n = live()
            .filter(|i| i.status == InstanceStatus::Active)
            .count() as u64;
        let mut rows: Vec<_> = live()
            .filter(|i| i.status == InstanceStatus::Active)
            .collect();
        rows.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        for i in rows {
            if !i.has_users() && n > u64::from(buffer) {
                actions.push(Action::Drain {
                    instance: i.id.clone(),
                });
                n -= 1;
            }
        }
    }
    actions.push(Action::RequeueAfter(config.requeue_interval));
    actions
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use crate::algorithm::InstanceView;
    use crate::algorithm::testing::{self, snapshot, t0};

    fn host(n: u32, status: InstanceStatus, users: u32) -> InstanceView {
        testing::host(n, "ami-a", status, users)
    }

    #[test]
    fn a_full_host_counts_toward_the_instance_buffer() {
        let config = AlgorithmConfig::default();
        let plan = decide_original(
            &snapshot(vec![host(1, InstanceStatus::Active, 2)]),
            &config,
            1,
            false,
            t0(),
        );
        assert!(!plan.iter().any(|a| matches!(a, Action::Launch { .. })));
        let plan = decide_original(&snapshot(vec![]), &config, 1, false, t0());
        assert!(
            plan.iter()
                .any(|a| matches!(a, Action::Launch { count: 1, .. }))
        );
    }

    #[test]
    fn scale_down_keeps_the_buffer_and_only_runs_when_due() {
        let config = AlgorithmConfig::default();
        let s = snapshot(vec![
            host(1, InstanceStatus::Active, 0),
            host(2, InstanceStatus::Active, 0),
            host(3, InstanceStatus::Active, 1),
        ]);
        let drains = |plan: &[Action]| {
            plan.iter()
                .filter(|a| matches!(a, Action::Drain { .. }))
                .count()
        };
        assert_eq!(drains(&decide_original(&s, &config, 1, false, t0())), 0);
        assert_eq!(drains(&decide_original(&s, &config, 1, true, t0())), 2);
    }

    #[tokio::test]
    async fn the_scheduler_scales_down_at_most_every_ten_minutes() {
        let mut a = OriginalAlgorithm::new(AlgorithmConfig::default());
        let s = snapshot(vec![
            host(1, InstanceStatus::Active, 0),
            host(2, InstanceStatus::Active, 0),
        ]);
        let drained = |plan: Vec<Action>| plan.iter().any(|a| matches!(a, Action::Drain { .. }));
        assert!(drained(a.plan(&s, t0()).await));
        assert!(!drained(
            a.plan(&s, t0() + chrono::Duration::minutes(9)).await
        ));
        assert!(drained(
            a.plan(&s, t0() + chrono::Duration::minutes(10)).await
        ));
    }
}
