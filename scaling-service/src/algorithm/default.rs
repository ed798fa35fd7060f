//! The default algorithm: keep `desired_free_mandelboxes` free on the region's current image,
//! retire free hosts beyond that and every free host on an old image, terminate hosts that
//! linger, and upgrade images in two phases with zero downtime.
//!
//! Everything it knows comes from the snapshot, which comes from the database: an upgrade's
//! progress is "the image row says A, the deploy wants B, these rows run B", so a restart in
//! the middle picks up where it was instead of launching a second buffer.

use std::collections::HashSet;
use std::time::Duration;

use chrono::{DateTime, Utc};
use dbclient::types::{ImageId, InstanceId, InstanceStatus};

use super::{
    Action, AlgorithmConfig, InstanceView, ScalingAlgorithm, Snapshot, TerminationReason,
    overdue_terminations,
};

/// The default algorithm over [`decide`].
#[derive(Debug, Clone)]
pub struct DefaultAlgorithm {
    config: AlgorithmConfig,
}

impl DefaultAlgorithm {
    pub fn new(config: AlgorithmConfig) -> Self {
        Self { config }
    }

    pub fn config(&self) -> &AlgorithmConfig {
        &self.config
    }
}

#[async_trait::async_trait]
impl ScalingAlgorithm for DefaultAlgorithm {
    fn name(&self) -> &str {
        "default"
    }

    async fn plan(&mut self, snapshot: &Snapshot, now: DateTime<Utc>) -> Vec<Action> {
        decide(snapshot, &self.config, now)
    }
}

fn elapsed(since: DateTime<Utc>, now: DateTime<Utc>) -> Duration {
    (now - since).to_std().unwrap_or(Duration::ZERO)
}

/// Time left until `since + limit`, zero when past.
fn until(since: DateTime<Utc>, limit: Duration, now: DateTime<Utc>) -> Duration {
    limit.saturating_sub(elapsed(since, now))
}

fn ceil_div(a: u32, b: u32) -> u32 {
    if b == 0 { 0 } else { a.div_ceil(b) }
}

/// Free and expected capacity of the live (non-busy) hosts on one image.
#[derive(Debug, Default, Clone, Copy)]
struct Capacity {
    /// Free slots on ACTIVE hosts: what assignment can hand out now.
    active_free: u32,
    /// `active_free` plus booting hosts and pending launches: what there will be.
    expected: u32,
}

fn capacity_on(
    image: &ImageId,
    live: &[&InstanceView],
    snapshot: &Snapshot,
    config: &AlgorithmConfig,
) -> Capacity {
    let mut c = Capacity::default();
    for i in live.iter().filter(|i| &i.image_id == image) {
        match i.status {
            InstanceStatus::Active => {
                c.active_free += i.remaining_capacity;
                c.expected += i.remaining_capacity;
            }
            InstanceStatus::PreConnection => c.expected += i.remaining_capacity,
            InstanceStatus::Draining => {}
        }
    }
    for p in snapshot
        .pending_launches
        .iter()
        .filter(|p| &p.image_id == image)
    {
        c.expected += p.count.saturating_mul(config.capacity_per_instance);
    }
    c
}

/// The plan for one region. Pure: the same snapshot, config and time give the same plan.
///
/// Rules, in order:
/// 1. A DRAINING host without users past `lingering_limit`, or a PRE_CONNECTION one past
///    `boot_timeout`, is terminated (and its row removed).
/// 2. No image row yet but a wanted image: the row is set to it (first deploy).
/// 3. An upgrade (wanted ≠ current, not abandoned): once the new image's ACTIVE free capacity
///    reaches the buffer, swap the row; past `upgrade_timeout` since it began, abandon it and
///    terminate its hosts; otherwise launch the missing part of a full buffer on the new image.
///    New-image hosts are protected from scale-down meanwhile.
/// 4. Scale-up on the current image: `ceil((desired − expected) / per_instance)`.
/// 5. Scale-down, only while nothing is launching or booting: every free ACTIVE host on an
///    old image, then free ACTIVE hosts on the current image while the rest still covers the
///    buffer.
///
/// Launches never take the region past `max_instances`; no instance gets two actions; a host
/// with users is never drained or terminated.
pub fn decide(snapshot: &Snapshot, config: &AlgorithmConfig, now: DateTime<Utc>) -> Vec<Action> {
    let busy: HashSet<&InstanceId> = snapshot.busy.iter().collect();
    let per_instance = config.capacity_per_instance.max(1);

    // 1. Lingering and never-registered hosts.
    let (mut actions, mut next_check) = overdue_terminations(snapshot, config, true, now);
    let terminated: HashSet<InstanceId> = actions
        .iter()
        .filter_map(Action::instance)
        .cloned()
        .collect();
    // Hosts the plan may still count and act on.
    let live: Vec<&InstanceView> = snapshot
        .instances
        .iter()
        .filter(|i| !busy.contains(&i.id) && !terminated.contains(&i.id))
        .collect();
    // Everything that exists or is coming, for the cap.
    let mut total: u64 = snapshot.instances.len() as u64
        + snapshot
            .pending_launches
            .iter()
            .map(|p| u64::from(p.count))
            .sum::<u64>();
    let mut launch = |count: u32, image_id: &ImageId, actions: &mut Vec<Action>| -> u32 {
        let headroom = u64::from(config.max_instances).saturating_sub(total);
        let count = u32::try_from(u64::from(count).min(headroom)).unwrap_or(0);
        if count > 0 {
            total += u64::from(count);
            actions.push(Action::Launch {
                count,
                image_id: image_id.clone(),
            });
        }
        count
    };

    // 2. First deploy.
    let mut current = snapshot.current_image.clone();
    if current.is_none()
        && let Some(target) = &snapshot.target_image
    {
        actions.push(Action::SwapImage {
            image_id: target.clone(),
        });
        current = Some(target.clone());
    }
    let Some(current) = current else {
        // Nothing to launch: no image. Lingering hosts were still handled.
        actions.push(Action::RequeueAfter(next_check));
        return actions;
    };

    // 3. Upgrade.
    let mut current = current;
    let mut protected: Option<ImageId> = None;
    let mut launched_any = false;
    let mut rolled_back: HashSet<&InstanceId> = HashSet::new();
    if let Some(target) = snapshot
        .target_image
        .as_ref()
        .filter(|t| **t != current && !snapshot.abandoned_images.contains(t))
    {
        let on_target = capacity_on(target, &live, snapshot, config);
        let started = live
            .iter()
            .filter(|i| &i.image_id == target)
            .map(|i| i.created_at)
            .chain(
                snapshot
                    .pending_launches
                    .iter()
                    .filter(|p| &p.image_id == target)
                    .map(|p| p.started_at),
            )
            .min();
        if on_target.active_free >= config.desired_free_mandelboxes {
            actions.push(Action::SwapImage {
                image_id: target.clone(),
            });
            current = target.clone();
        } else if let Some(started) = started
            && until(started, config.upgrade_timeout, now).is_zero()
        {
            actions.push(Action::AbandonUpgrade {
                image_id: target.clone(),
            });
            for i in live
                .iter()
                .filter(|i| &i.image_id == target && !i.has_users())
            {
                actions.push(Action::Terminate {
                    instance: i.id.clone(),
                    reason: TerminationReason::UpgradeRollback,
                });
                rolled_back.insert(&i.id);
            }
        } else {
            if let Some(started) = started {
                next_check = next_check.min(until(started, config.upgrade_timeout, now));
            }
            protected = Some(target.clone());
            let deficit = config
                .desired_free_mandelboxes
                .saturating_sub(on_target.expected);
            if launch(ceil_div(deficit, per_instance), target, &mut actions) > 0 {
                launched_any = true;
            }
        }
    }
    let live: Vec<&InstanceView> = live
        .into_iter()
        .filter(|i| !rolled_back.contains(&i.id))
        .collect();

    // 4. Scale-up on the current image.
    let on_current = capacity_on(&current, &live, snapshot, config);
    let deficit = config
        .desired_free_mandelboxes
        .saturating_sub(on_current.expected);
    if launch(ceil_div(deficit, per_instance), &current, &mut actions) > 0 {
        launched_any = true;
    }

    // 5. Scale-down, never while hosts are launching or booting: their capacity is not real yet.
    let booting = live
        .iter()
        .any(|i| i.status == InstanceStatus::PreConnection);
    if !launched_any && !booting && snapshot.pending_launches.is_empty() {
        let free_active = |i: &&&InstanceView| i.status == InstanceStatus::Active && !i.has_users();
        for i in live.iter().filter(free_active) {
            if i.image_id != current && Some(&i.image_id) != protected.as_ref() {
                actions.push(Action::Drain {
                    instance: i.id.clone(),
                });
            }
        }
        let mut spare: Vec<&&InstanceView> = live
            .iter()
            .filter(free_active)
            .filter(|i| i.image_id == current)
            .collect();
        // Retire the oldest first: the newest hosts have the freshest state.
        spare.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        let mut free = on_current.active_free;
        for i in spare {
            if free.saturating_sub(i.remaining_capacity) < config.desired_free_mandelboxes {
                break;
            }
            free -= i.remaining_capacity;
            actions.push(Action::Drain {
                instance: i.id.clone(),
            });
        }
    }
    actions.push(Action::RequeueAfter(next_check.max(Duration::from_secs(1))));
    actions
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use crate::algorithm::PendingLaunch;
    use crate::algorithm::testing::{drained, host, img, snapshot, t0};

    fn launches(plan: &[Action]) -> Vec<(u32, ImageId)> {
        plan.iter()
            .filter_map(|a| match a {
                Action::Launch { count, image_id } => Some((*count, image_id.clone())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn empty_region_launches_ceil_of_the_deficit() {
        let config = AlgorithmConfig {
            desired_free_mandelboxes: 5,
            ..AlgorithmConfig::default()
        };
        let plan = decide(&snapshot(vec![]), &config, t0());
        assert_eq!(launches(&plan), vec![(3, img("ami-a"))]);
    }

    #[test]
    fn pending_launches_count_as_expected_capacity() {
        let mut s = snapshot(vec![]);
        s.pending_launches.push(PendingLaunch {
            launch_id: "l".into(),
            image_id: img("ami-a"),
            count: 1,
            started_at: t0(),
        });
        let plan = decide(&s, &AlgorithmConfig::default(), t0());
        assert!(launches(&plan).is_empty(), "{plan:?}");
    }

    #[test]
    fn free_hosts_above_the_buffer_drain_but_busy_ones_stay() {
        let s = snapshot(vec![
            host(1, "ami-a", InstanceStatus::Active, 0),
            host(2, "ami-a", InstanceStatus::Active, 0),
            host(3, "ami-a", InstanceStatus::Active, 2),
            host(4, "ami-b", InstanceStatus::Active, 0),
        ]);
        let plan = decide(&s, &AlgorithmConfig::default(), t0());
        assert_eq!(drained(&plan), vec!["i-00000004", "i-00000001"]);
    }

    #[test]
    fn no_scale_down_while_a_host_boots() {
        let s = snapshot(vec![
            host(1, "ami-a", InstanceStatus::Active, 0),
            host(2, "ami-a", InstanceStatus::Active, 0),
            host(3, "ami-a", InstanceStatus::PreConnection, 0),
        ]);
        let plan = decide(&s, &AlgorithmConfig::default(), t0());
        assert!(
            plan.iter().all(|a| !matches!(a, Action::Drain { .. })),
            "{plan:?}"
        );
    }

    #[test]
    fn lingering_draining_host_is_terminated_only_without_users() {
        let s = snapshot(vec![
            host(1, "ami-a", InstanceStatus::Draining, 0),
            host(2, "ami-a", InstanceStatus::Draining, 1),
            host(3, "ami-a", InstanceStatus::Active, 0),
        ]);
        let config = AlgorithmConfig::default();
        let early = decide(&s, &config, t0() + chrono::Duration::minutes(9));
        assert!(early.iter().all(|a| !matches!(a, Action::Terminate { .. })));
        assert!(early.contains(&Action::RequeueAfter(Duration::from_secs(60))));
        let late = decide(&s, &config, t0() + chrono::Duration::minutes(11));
        let terminated: Vec<_> = late.iter().filter_map(Action::instance).collect();
        assert_eq!(terminated.len(), 1);
        assert_eq!(terminated[0].as_str(), "i-00000001");
    }

    #[test]
    fn upgrade_launches_a_protected_buffer_then_swaps_then_drains_old_hosts() {
        let config = AlgorithmConfig::default();
        let mut s = snapshot(vec![host(1, "ami-a", InstanceStatus::Active, 0)]);
        s.target_image = Some(img("ami-b"));
        // Phase 1: a buffer on the new image; the old buffer stays.
        let plan = decide(&s, &config, t0());
        assert_eq!(launches(&plan), vec![(1, img("ami-b"))]);
        assert!(!plan.iter().any(|a| matches!(a, Action::SwapImage { .. })));
        // The new host boots: nothing drains, nothing swaps.
        s.instances
            .push(host(2, "ami-b", InstanceStatus::PreConnection, 0));
        let plan = decide(&s, &config, t0());
        assert!(
            plan.iter().all(|a| matches!(a, Action::RequeueAfter(_))),
            "{plan:?}"
        );
        // It registers: swap, then the old host drains.
        s.instances[1].status = InstanceStatus::Active;
        let plan = decide(&s, &config, t0());
        assert_eq!(
            plan[0],
            Action::SwapImage {
                image_id: img("ami-b")
            }
        );
        assert!(plan.contains(&Action::Drain {
            instance: s.instances[0].id.clone()
        }));
        // A restart after the swap (row = ami-b) does not launch another buffer.
        s.current_image = Some(img("ami-b"));
        let plan = decide(&s, &config, t0());
        assert!(launches(&plan).is_empty());
    }

    #[test]
    fn an_upgrade_that_times_out_is_rolled_back() {
        let config = AlgorithmConfig::default();
        let mut s = snapshot(vec![
            host(1, "ami-a", InstanceStatus::Active, 0),
            host(2, "ami-b", InstanceStatus::PreConnection, 0),
        ]);
        s.target_image = Some(img("ami-b"));
        let config = AlgorithmConfig {
            boot_timeout: Duration::from_secs(1_000_000),
            ..config
        };
        let plan = decide(&s, &config, t0() + chrono::Duration::minutes(151));
        assert!(plan.contains(&Action::AbandonUpgrade {
            image_id: img("ami-b")
        }));
        assert!(plan.contains(&Action::Terminate {
            instance: s.instances[1].id.clone(),
            reason: TerminationReason::UpgradeRollback
        }));
        s.abandoned_images.push(img("ami-b"));
        s.instances.pop();
        let plan = decide(&s, &config, t0() + chrono::Duration::minutes(152));
        assert!(launches(&plan).is_empty(), "{plan:?}");
    }

    #[test]
    fn the_cap_limits_launches() {
        let config = AlgorithmConfig {
            desired_free_mandelboxes: 100,
            max_instances: 3,
            ..AlgorithmConfig::default()
        };
        let s = snapshot(vec![host(1, "ami-a", InstanceStatus::Active, 2)]);
        assert_eq!(
            launches(&decide(&s, &config, t0())),
            vec![(2, img("ami-a"))]
        );
    }
}
