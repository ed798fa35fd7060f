//! The holdover algorithm, the service's default: the default algorithm's launches,
//! terminations and upgrades, with a buffer and a scale-down sized from the demand the region
//! has seen, so that the fleet neither thrashes nor keeps hosts nobody will use.
//!
//! - **The buffer follows demand.** With a forecast ([`DemandForecast`]: the recent arrival
//!   rate, and from the second day the daily profile for the minutes ahead), the region keeps
//!   free the slots that cover the arrivals expected within `forecast_horizon` (or within one
//!   session length, if sessions are shorter: those leave before more pile up) with a risk of
//!   `buffer_risk_percent` of falling short: the Poisson quantile, at least one slot (unless
//!   `desired_free_mandelboxes` is 0). Until it has
//!   a forecast (a fresh process), the buffer is `desired_free_mandelboxes`. What it drains is
//!   measured against a wider band: the arrivals expected within `drain_horizon`, with the same
//!   risk, so a busy region's ordinary ups and downs do not drain a host the next minutes
//!   relaunch, while a quiet one falls back to a single free slot.
//! - **Refused clients are demand.** One slot more per client refused within the recent window
//!   ([`Snapshot::waiting_clients`]): a refused client retries and takes the first slot that
//!   appears, so a buffer that ignores it is still short once the new host is up.
//! - **Scale-down holds over for as long as demand takes to change.** A free host on the
//!   current image is drained only when the region's free capacity beyond the target has stayed
//!   at least that host's size for the whole hold-down: half the mean session length the
//!   forecast measures (Little's law; the region's demand is mostly a new draw after about one
//!   session length, so a lull of half of one is likely to last), within
//!   `[min_hold_down, hold_down]`; `hold_down` before there is a forecast, `min_hold_down`
//!   when nobody has come within the forecast window. Never within `min_lifetime` of the host
//!   becoming ACTIVE, never while clients are being refused, never while hosts launch or boot.
//!   Which host: old image first (always drained once free and past its minimum lifetime), then
//!   the emptiest, then the oldest. Only hosts without users are drained, so no user is moved.
//!
//! Its state is the recent history of the region's surplus (free slots beyond the target) and
//! its demand forecast, both fed at every plan; after a restart both are empty and the region
//! keeps the configured buffer and the longest hold-down for the forecast's warm-up (a few
//! minutes), which errs on the side of capacity.

use std::collections::{HashSet, VecDeque};
use std::time::Duration;

use chrono::{DateTime, Utc};
use dbclient::types::{ImageId, InstanceId, InstanceStatus};

use super::forecast::{DemandForecast, poisson_quantile};
use super::{Action, AlgorithmConfig, InstanceView, ScalingAlgorithm, Snapshot, decide};

/// The holdover algorithm.
#[derive(Debug, Clone)]
pub struct HoldoverAlgorithm {
    config: AlgorithmConfig,
    /// `(when, surplus)`: samples within the longest hold-down, plus the last one before it.
    surplus: VecDeque<(DateTime<Utc>, u32)>,
    forecast: DemandForecast,
}

/// What holdover plans with at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sizing {
    /// Free slots to keep on the current image, before waiting clients: fewer launch.
    pub buffer: u32,
    /// Free slots never drained, before waiting clients (at least `buffer`).
    pub keep: u32,
    /// How long a surplus must hold before it is drained.
    pub hold_down: Duration,
}

/// The buffer and hold-down `forecast` calls for at `now`. Pure.
pub fn sizing(forecast: &DemandForecast, config: &AlgorithmConfig, now: DateTime<Utc>) -> Sizing {
    let Some(rate) = forecast.rate(now, config.forecast_horizon) else {
        return Sizing {
            buffer: config.desired_free_mandelboxes,
            keep: config.desired_free_mandelboxes,
            hold_down: config.hold_down,
        };
    };
    let risk = f64::from(config.buffer_risk_percent.min(100)) / 100.0;
    let length = forecast.session_length(now);
    // Arrivals within the horizon that need a slot at once: sessions shorter than the horizon
    // leave before the next ones pile up, so only a session length's worth overlap.
    let covering = |horizon: Duration| {
        let overlap = length.map_or(horizon, |l| l.min(horizon));
        poisson_quantile(rate * overlap.as_secs_f64(), risk)
    };
    let floor = config.desired_free_mandelboxes.min(1);
    let longest = config.hold_down.max(config.min_hold_down);
    let hold_down = length.map_or(config.min_hold_down, |l| {
        (l / 2).clamp(config.min_hold_down, longest)
    });
    let buffer = covering(config.forecast_horizon).max(floor);
    Sizing {
        buffer,
        keep: covering(config.drain_horizon).max(buffer),
        hold_down,
    }
}

impl HoldoverAlgorithm {
    pub fn new(config: AlgorithmConfig) -> Self {
        Self {
            forecast: DemandForecast::new(config.forecast_window),
            config,
            surplus: VecDeque::new(),
        }
    }

    /// Records `surplus` at `now` and returns the surplus that has held for the whole of
    /// `hold` (0 until the history covers it).
    fn held_surplus(&mut self, now: DateTime<Utc>, surplus: u32, hold: Duration) -> u32 {
        let start_of = |d: Duration| {
            chrono::Duration::from_std(d)
                .ok()
                .and_then(|d| now.checked_sub_signed(d))
                .unwrap_or(DateTime::<Utc>::MIN_UTC)
        };
        let kept_from = start_of(
            self.config
                .hold_down
                .max(self.config.min_hold_down)
                .max(hold),
        );
        // Drop samples out of a clock that went back.
        while self.surplus.back().is_some_and(|(t, _)| *t > now) {
            self.surplus.pop_back();
        }
        self.surplus.push_back((now, surplus));
        // Keep one sample at or before the kept window: it says what held at its beginning.
        while self.surplus.len() > 1 && self.surplus[1].0 <= kept_from {
            self.surplus.pop_front();
        }
        let window_start = start_of(hold);
        match self.surplus.iter().rposition(|(t, _)| *t <= window_start) {
            Some(first) => self
                .surplus
                .iter()
                .skip(first)
                .map(|(_, s)| *s)
                .min()
                .unwrap_or(0),
            None => 0,
        }
    }
}

#[async_trait::async_trait]
impl ScalingAlgorithm for HoldoverAlgorithm {
    fn name(&self) -> &str {
        "holdover"
    }

    async fn plan(&mut self, snapshot: &Snapshot, now: DateTime<Utc>) -> Vec<Action> {
        let users = snapshot.instances.iter().map(|i| i.mandelboxes).sum();
        self.forecast.observe(now, snapshot.arrivals, users);
        let sizing = sizing(&self.forecast, &self.config, now);
        let keep = sizing.keep.saturating_add(snapshot.waiting_clients);
        let current_free = free_on_current(snapshot);
        let held = self.held_surplus(now, current_free.saturating_sub(keep), sizing.hold_down);
        decide_holdover(snapshot, &self.config, sizing.buffer, held, now)
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

/// The holdover plan for a `buffer` of free slots, given the surplus that has `held` over the
/// hold-down window. Pure.
pub fn decide_holdover(
    snapshot: &Snapshot,
    config: &AlgorithmConfig,
    buffer: u32,
    held: u32,
    now: DateTime<Utc>,
) -> Vec<Action> {
    let demand = AlgorithmConfig {
        desired_free_mandelboxes: buffer.saturating_add(snapshot.waiting_clients),
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
    use crate::algorithm::testing::{drained, host_since, snapshot, t0};

    fn host(n: u32, image: &str, users: u32, active_at: DateTime<Utc>) -> InstanceView {
        host_since(n, image, InstanceStatus::Active, users, active_at)
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
        // No forecast within the test: the hold-down is the configured one throughout.
        let config = AlgorithmConfig {
            forecast_window: Duration::from_secs(86_400),
            ..AlgorithmConfig::default()
        };
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
        assert!(
            drained(&decide_holdover(
                &s,
                &config,
                config.desired_free_mandelboxes,
                100,
                now
            ))
            .is_empty()
        );
    }

    #[test]
    fn refused_clients_count_as_demand_and_stop_scale_down() {
        let config = AlgorithmConfig::default();
        let mut s = snapshot(vec![host(1, "ami-a", 0, t0()), host(2, "ami-a", 0, t0())]);
        s.waiting_clients = 5;
        let plan = decide_holdover(
            &s,
            &config,
            config.desired_free_mandelboxes,
            100,
            t0() + min(60),
        );
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
        let plan = decide_holdover(
            &s,
            &config,
            config.desired_free_mandelboxes,
            3,
            t0() + min(60),
        );
        assert_eq!(drained(&plan), vec!["i-00000003", "i-00000002"]);
    }

    /// A forecast over a 10-minute window that saw `per_minute` arrivals a minute with
    /// `users` on the hosts throughout, as of `t0() + 10 min`.
    fn forecast_of(per_minute: u64, users: u32) -> (DemandForecast, DateTime<Utc>) {
        let mut f = DemandForecast::new(Duration::from_secs(600));
        for m in 0..=10 {
            f.observe(t0() + min(m as i64), m * per_minute, users);
        }
        (f, t0() + min(10))
    }

    #[test]
    fn without_a_forecast_the_configured_buffer_and_hold_down_apply() {
        let config = AlgorithmConfig::default();
        let f = DemandForecast::new(config.forecast_window);
        let s = sizing(&f, &config, t0());
        assert_eq!(s.buffer, config.desired_free_mandelboxes);
        assert_eq!(s.hold_down, config.hold_down);
    }

    #[test]
    fn the_buffer_grows_with_the_arrival_rate_and_keeps_one_slot_when_quiet() {
        let config = AlgorithmConfig {
            desired_free_mandelboxes: 2,
            ..AlgorithmConfig::default()
        };
        let (quiet, now) = forecast_of(0, 0);
        assert_eq!(sizing(&quiet, &config, now).buffer, 1);
        let mut last = 1;
        for per_minute in [1, 2, 5, 10] {
            // 30-minute sessions: every arrival within the horizon needs its own slot.
            let (f, now) = forecast_of(per_minute, 30 * per_minute as u32);
            let buffer = sizing(&f, &config, now).buffer;
            let expected = per_minute as f64 * config.forecast_horizon.as_secs_f64() / 60.0;
            assert!(f64::from(buffer) >= expected, "{per_minute}/min: {buffer}");
            assert!(buffer >= last, "{per_minute}/min: {buffer} < {last}");
            last = buffer;
        }
        // At the same rate, sessions shorter than the horizon leave before more pile up.
        let (long, now) = forecast_of(10, 300);
        let (short, _) = forecast_of(10, 1);
        assert!(sizing(&short, &config, now).buffer < sizing(&long, &config, now).buffer);
        // An operator who wants no buffer gets none while nobody comes.
        let none = AlgorithmConfig {
            desired_free_mandelboxes: 0,
            ..config
        };
        assert_eq!(sizing(&quiet, &none, now).buffer, 0);
    }

    #[test]
    fn the_hold_down_is_half_the_session_length_within_its_bounds() {
        let config = AlgorithmConfig::default();
        // One a minute, 20 users: 20-minute sessions, a 10-minute hold-down.
        let (f, now) = forecast_of(1, 20);
        let hold = sizing(&f, &config, now).hold_down;
        assert!((hold.as_secs_f64() - 600.0).abs() < 2.0, "{hold:?}");
        assert!(config.min_hold_down < hold && hold < config.hold_down);
        // Very short sessions: the shortest hold-down; very long ones: the longest.
        let (f, now) = forecast_of(10, 1);
        assert_eq!(sizing(&f, &config, now).hold_down, config.min_hold_down);
        let (f, now) = forecast_of(1, 500);
        assert_eq!(sizing(&f, &config, now).hold_down, config.hold_down);
        // The band it drains against is at least the buffer, and wider when busy.
        let (busy, now) = forecast_of(10, 40);
        let s = sizing(&busy, &config, now);
        assert!(s.keep > s.buffer, "{s:?}");
        // Nobody came: nothing to hold for.
        let (f, now) = forecast_of(0, 0);
        assert_eq!(sizing(&f, &config, now).hold_down, config.min_hold_down);
    }

    #[tokio::test]
    async fn a_region_nobody_uses_is_drained_to_one_slot_after_the_shortest_hold_down() {
        let config = AlgorithmConfig {
            forecast_window: Duration::from_secs(600),
            ..AlgorithmConfig::default()
        };
        let mut a = HoldoverAlgorithm::new(config.clone());
        let s = snapshot(vec![host(1, "ami-a", 0, t0()), host(2, "ami-a", 0, t0())]);
        let start = t0() + min(30);
        let at = |s: i64| start + chrono::Duration::seconds(s);
        // Until the warm-up (40 s of a 10-minute window) is covered: the configured buffer of
        // 2 and the longest hold-down, nothing drains.
        for sec in (0..40).step_by(10) {
            assert!(drained(&a.plan(&s, at(sec)).await).is_empty());
        }
        // Then quiet: a buffer of one slot, and a surplus held for the shortest hold-down
        // drains one host (and only one: the other keeps the slot).
        let mut drains = Vec::new();
        let mut s = s;
        for sec in (40..=40 + 2 * config.min_hold_down.as_secs() as i64).step_by(10) {
            let now = drained(&a.plan(&s, at(sec)).await);
            s.instances
                .retain(|i| !now.contains(&i.id.as_str().to_owned()));
            drains.extend(now);
        }
        assert_eq!(drains.len(), 1, "{drains:?}");
    }

    #[tokio::test]
    async fn a_busy_region_keeps_more_than_the_configured_buffer() {
        let config = AlgorithmConfig {
            forecast_window: Duration::from_secs(600),
            ..AlgorithmConfig::default()
        };
        let mut a = HoldoverAlgorithm::new(config.clone());
        // Ten full hosts and an empty one: 20 users, sessions of over three minutes.
        let mut hosts: Vec<InstanceView> = (1..=10).map(|n| host(n, "ami-a", 2, t0())).collect();
        hosts.push(host(11, "ami-a", 0, t0()));
        let mut s = snapshot(hosts);
        let mut plan = Vec::new();
        // Six arrivals a minute for ten minutes.
        for m in 0..=10 {
            s.arrivals = 6 * m;
            plan = a.plan(&s, t0() + min(m as i64)).await;
        }
        let launched: u32 = plan
            .iter()
            .map(|a| match a {
                Action::Launch { count, .. } => *count,
                _ => 0,
            })
            .sum();
        // 2 free now; 6 arrivals expected within the minute's horizon need more hosts.
        assert!(launched >= 2, "{plan:?}");
    }
}
