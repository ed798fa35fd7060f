//! The holdover algorithm, the service's default: the default algorithm's launches,
//! terminations and upgrades, with two changes that stop the fleet from thrashing.
//!
//! - **Refused clients are demand.** The region keeps `desired_free_mandelboxes` free *plus*
//!   one slot per client refused within the recent window ([`Snapshot::waiting_clients`]): a
//!   refused client retries and takes the first slot that appears, so a buffer that ignores
//!   it is still short once the new host is up.
//! - **Scale-down holds over.** A free host on the current image is drained only when the
//!   region's free capacity beyond the target has stayed at least that host's size for the
//!   whole hold-down time (`hold_down`), never within `min_lifetime` of the host becoming
//!   ACTIVE, never while clients are being refused, and never while hosts launch or boot.
//!   Which host: old image first (always drained once free and past its minimum lifetime),
//!   then the emptiest, then the oldest. Only hosts without users are drained, so no user is
//!   ever moved.
//!
//! Its state is the recent history of the region's surplus (free slots beyond the target),
//! sampled at every plan; after a restart the history is empty and nothing on the current
//! image is drained for one hold-down time, which errs on the side of capacity.

use std::collections::{HashSet, VecDeque};
use std::time::Duration;

use chrono::{DateTime, Utc};
use dbclient::types::{ImageId, InstanceId, InstanceStatus};

use super::{Action, AlgorithmConfig, InstanceView, ScalingAlgorithm, Snapshot, decide};

/// The holdover algorithm.
#[derive(Debug, Clone)]
pub struct HoldoverAlgorithm {
    config: AlgorithmConfig,
    /// `(when, surplus)`: samples within the hold-down window, plus the last one before it.
    surplus: VecDeque<(DateTime<Utc>, u32)>,
}

impl HoldoverAlgorithm {
    pub fn new(config: AlgorithmConfig) -> Self {
        Self {
            config,
            surplus: VecDeque::new(),
        }
    }

    /// Records `surplus` at `now` and returns the surplus that has held for the whole
    /// hold-down window (0 until the history covers it).
    fn held_surplus(&mut self, now: DateTime<Utc>, surplus: u32) -> u32 {
        let hold =
            chrono::Duration::from_std(self.config.hold_down).unwrap_or(chrono::Duration::MAX);
        let window_start = now
            .checked_sub_signed(hold)
            .unwrap_or(DateTime::<Utc>::MIN_UTC);
        // Drop samples out of a clock that went back.
        while self.surplus.back().is_some_and(|(t, _)| *t > now) {
            self.surplus.pop_back();
        }
        self.surplus.push_back((now, surplus));
        // Keep one sample at or before the window start: it says what held at its beginning.
        while self.surplus.len() > 1 && self.surplus[1].0 <= window_start {
            self.surplus.pop_front();
        }
        match self.surplus.front() {
            Some((first, _)) if *first <= window_start => {
                self.surplus.iter().map(|(_, s)| *s).min().unwrap_or(0)
            }
            _ => 0,
        }
    }
}

#[async_trait::async_trait]
impl ScalingAlgorithm for HoldoverAlgorithm {
    fn name(&self) -> &str {
        "holdover"
    }

    async fn plan(&mut self, snapshot: &Snapshot, now: DateTime<Utc>) -> Vec<Action> {
        let target = self
            .config
            .desired_free_mandelboxes
            .saturating_add(snapshot.waiting_clients);
        let current_free = free_on_current(snapshot);
        let held = self.held_surplus(now, current_free.saturating_sub(target));
        decide_holdover(snapshot, &self.config, held, now)
    }
}

/// Free slots on ACTIVE, non-busy hosts of the region's current image.
pub fn free_on_current(snapshot: &Snapshot) -> u32 {
    let Some(current) = snapshot
        .current_image
        .as_ref()
        .or(snapshot.target_image.as_ref())
    else {
        return 0;
    };
    snapshot
        .instances
        .iter()
        .filter(|i| {
            i.status == InstanceStatus::Active
                && &i.image_id == current
                && !snapshot.busy.contains(&i.id)
        })
        .map(|i| i.remaining_capacity)
        .sum()
}

fn active_for(i: &InstanceView, now: DateTime<Utc>) -> Duration {
    (now - i.status_since).to_std().unwrap_or(Duration::ZERO)
}

/// The holdover plan, given the surplus that has `held` over the hold-down window. Pure.
pub fn decide_holdover(
    snapshot: &Snapshot,
    config: &AlgorithmConfig,
    held: u32,
    now: DateTime<Utc>,
) -> Vec<Action> {
    let demand = AlgorithmConfig {
        desired_free_mandelboxes: config
            .desired_free_mandelboxes
            .saturating_add(snapshot.waiting_clients),
        ..config.clone()
    };
    // The default's plan, less its scale-down: holdover chooses what to drain itself.
    let mut actions: Vec<Action> = decide(snapshot, &demand, now)
        .into_iter()
        .filter(|a| !matches!(a, Action::Drain { .. }))
        .collect();
    let current: Option<ImageId> = actions
        .iter()
        .find_map(|a| match a {
            Action::SwapImage { image_id } => Some(image_id.clone()),
            _ => None,
        })
        .or_else(|| snapshot.current_image.clone());
    let Some(current) = current else {
        return actions;
    };
    let upgrading = snapshot
        .target_image
        .as_ref()
        .filter(|t| **t != current && !snapshot.abandoned_images.contains(t));
    let acted: HashSet<&InstanceId> = actions
        .iter()
        .filter_map(Action::instance)
        .chain(snapshot.busy.iter())
        .collect();
    let mut free: Vec<&InstanceView> = snapshot
        .instances
        .iter()
        .filter(|i| {
            i.status == InstanceStatus::Active
                && !i.has_users()
                && !acted.contains(&i.id)
                && active_for(i, now) >= config.min_lifetime
                && Some(&i.image_id) != upgrading
        })
        .collect();
    // Emptiest first, then the oldest.
    free.sort_by(|a, b| {
        (b.remaining_capacity, a.created_at, &a.id).cmp(&(
            a.remaining_capacity,
            b.created_at,
            &b.id,
        ))
    });
    let mut drains = Vec::new();
    for i in free.iter().filter(|i| i.image_id != current) {
        drains.push(i.id.clone());
    }
    let launching = actions.iter().any(|a| matches!(a, Action::Launch { .. }))
        || !snapshot.pending_launches.is_empty()
        || snapshot
            .instances
            .iter()
            .any(|i| i.status == InstanceStatus::PreConnection);
    if !launching && snapshot.waiting_clients == 0 {
        let mut allowed = held;
        for i in free.iter().filter(|i| i.image_id == current) {
            if i.remaining_capacity == 0 || i.remaining_capacity > allowed {
                continue;
            }
            allowed -= i.remaining_capacity;
            drains.push(i.id.clone());
        }
    }
    let requeue = actions
        .iter()
        .position(|a| matches!(a, Action::RequeueAfter(_)));
    let at = requeue.unwrap_or(actions.len());
    for (n, instance) in drains.into_iter().enumerate() {
        actions.insert(at + n, Action::Drain { instance });
    }
    actions
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    fn t0() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2024-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    fn host(n: u32, image: &str, users: u32, active_at: DateTime<Utc>) -> InstanceView {
        InstanceView {
            id: InstanceId::new(format!("i-{n:08}")).unwrap(),
            image_id: ImageId::new(image).unwrap(),
            status: InstanceStatus::Active,
            remaining_capacity: 2 - users,
            capacity: 2,
            mandelboxes: users,
            created_at: active_at,
            status_since: active_at,
        }
    }

    fn snapshot(instances: Vec<InstanceView>) -> Snapshot {
        Snapshot {
            instances,
            current_image: Some(ImageId::new("ami-a").unwrap()),
            target_image: Some(ImageId::new("ami-a").unwrap()),
            ..Snapshot::default()
        }
    }

    fn drained(plan: &[Action]) -> Vec<String> {
        plan.iter()
            .filter_map(|a| match a {
                Action::Drain { instance } => Some(instance.as_str().to_owned()),
                _ => None,
            })
            .collect()
    }

    fn min(m: i64) -> chrono::Duration {
        chrono::Duration::minutes(m)
    }

    #[tokio::test]
    async fn surplus_is_drained_only_after_the_hold_down() {
        let config = AlgorithmConfig::default();
        let mut a = HoldoverAlgorithm::new(config.clone());
        let s = snapshot(vec![
            host(1, "ami-a", 0, t0()),
            host(2, "ami-a", 0, t0()),
            host(3, "ami-a", 1, t0()),
        ]);
        let start = t0() + min(30);
        assert!(drained(&a.plan(&s, start).await).is_empty());
        let hold = chrono::Duration::from_std(config.hold_down).unwrap();
        let later = a.plan(&s, start + hold).await;
        // 5 free, 2 wanted: one host of 2 drains, the next would leave too few.
        assert_eq!(drained(&later), vec!["i-00000001"]);
    }

    #[tokio::test]
    async fn a_dip_in_surplus_restarts_the_hold_down() {
        let config = AlgorithmConfig::default();
        let mut a = HoldoverAlgorithm::new(config.clone());
        let spare = snapshot(vec![host(1, "ami-a", 0, t0()), host(2, "ami-a", 0, t0())]);
        let busy = snapshot(vec![host(1, "ami-a", 2, t0()), host(2, "ami-a", 0, t0())]);
        let start = t0() + min(30);
        let hold = chrono::Duration::from_std(config.hold_down).unwrap();
        a.plan(&spare, start).await;
        a.plan(&busy, start + hold / 2).await;
        assert!(drained(&a.plan(&spare, start + hold).await).is_empty());
        // The dip lasted until `start + hold`: a whole hold-down after it, the host drains.
        assert!(drained(&a.plan(&spare, start + hold / 2 + hold).await).is_empty());
        let after = a.plan(&spare, start + hold + hold).await;
        assert_eq!(drained(&after).len(), 1);
    }

    #[test]
    fn a_young_host_is_never_drained() {
        let config = AlgorithmConfig::default();
        let now = t0() + min(60);
        let young = now - chrono::Duration::from_std(config.min_lifetime).unwrap()
            + min(0)
            + chrono::Duration::seconds(1);
        let s = snapshot(vec![
            host(1, "ami-a", 0, young),
            host(2, "ami-a", 0, young),
            host(3, "ami-old", 0, young),
        ]);
        assert!(drained(&decide_holdover(&s, &config, 100, now)).is_empty());
    }

    #[test]
    fn refused_clients_count_as_demand_and_stop_scale_down() {
        let config = AlgorithmConfig::default();
        let mut s = snapshot(vec![host(1, "ami-a", 0, t0()), host(2, "ami-a", 0, t0())]);
        s.waiting_clients = 5;
        let plan = decide_holdover(&s, &config, 100, t0() + min(60));
        assert!(drained(&plan).is_empty());
        // 2 wanted + 5 waiting = 7, 4 free: two more hosts.
        assert!(plan.contains(&Action::Launch {
            count: 2,
            image_id: ImageId::new("ami-a").unwrap()
        }));
    }

    #[test]
    fn old_image_first_then_the_emptiest() {
        let config = AlgorithmConfig {
            desired_free_mandelboxes: 1,
            ..AlgorithmConfig::default()
        };
        let mut partly = host(1, "ami-a", 0, t0());
        partly.capacity = 3;
        partly.remaining_capacity = 2;
        let mut empty = host(2, "ami-a", 0, t0());
        empty.capacity = 3;
        empty.remaining_capacity = 3;
        let s = snapshot(vec![partly, empty, host(3, "ami-old", 0, t0())]);
        let plan = decide_holdover(&s, &config, 3, t0() + min(60));
        assert_eq!(drained(&plan), vec!["i-00000003", "i-00000002"]);
    }
}
