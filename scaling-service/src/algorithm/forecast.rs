//! What `holdover` knows of a region's demand, learnt from what every snapshot says: the
//! arrivals counter ([`Snapshot::arrivals`], fed by the assign path's refusal and assignment
//! events) and the users on the hosts.
//!
//! - **Recent rate**: arrivals per second within the last `window` (or since the first look,
//!   while the history is shorter than the window but at least [`WARM_UP_DIVISOR`]th of it;
//!   before that, after a restart, nothing is known).
//! - **Session length**, by Little's law: the mean number of users over the window divided by
//!   the arrival rate. How long the region's demand takes to change, so how long a surplus is
//!   worth holding.
//! - **Daily profile**: arrivals per hour of day over the time observed in that hour. An hour
//!   of day is trusted once it has been watched for a whole hour (so, from the second day), and
//!   the forecast for the next minutes is the larger of the recent rate and the profile's rate
//!   for the hour ahead: the morning ramp is met before it starts, and a quiet day never lowers
//!   what the last minutes showed.
//!
//! [`Snapshot::arrivals`]: super::Snapshot::arrivals

use std::collections::VecDeque;
use std::time::Duration;

use chrono::{DateTime, Timelike, Utc};

/// The recent rate is known once the history covers this fraction of the window (2 min of
/// the default 30): an estimate from a few minutes is noisy, but waiting clients still count
/// as demand, and the configured buffer it replaces is only a guess.
pub const WARM_UP_DIVISOR: i32 = 15;

/// An hour of day is trusted after this much of it has been observed.
const PROFILE_TRUSTED_S: f64 = 3600.0;

/// A region's demand history.
#[derive(Debug, Clone)]
pub struct DemandForecast {
    window: chrono::Duration,
    /// The counter at the last observation.
    last_total: Option<u64>,
    first_at: Option<DateTime<Utc>>,
    last_at: Option<DateTime<Utc>>,
    /// Arrivals (increments of the counter) within the window.
    arrivals: VecDeque<(DateTime<Utc>, u64)>,
    /// `(since, users)`: users on the region's hosts from `since` to the next sample; within
    /// the window plus the last sample before it.
    users: VecDeque<(DateTime<Utc>, u32)>,
    hour_arrivals: [u64; 24],
    hour_observed_s: [f64; 24],
}

impl DemandForecast {
    pub fn new(window: Duration) -> Self {
        Self {
            window: chrono::Duration::from_std(window).unwrap_or(chrono::Duration::MAX),
            last_total: None,
            first_at: None,
            last_at: None,
            arrivals: VecDeque::new(),
            users: VecDeque::new(),
            hour_arrivals: [0; 24],
            hour_observed_s: [0.0; 24],
        }
    }

    /// Takes in a snapshot's arrivals counter and its users at `now`.
    pub fn observe(&mut self, now: DateTime<Utc>, arrivals_total: u64, users: u32) {
        if self.last_at.is_some_and(|t| now < t) {
            // The clock went back: what was learnt is on another time line.
            *self = Self::new(self.window.to_std().unwrap_or(Duration::MAX));
        }
        let arrived = match self.last_total {
            Some(last) if arrivals_total >= last => arrivals_total - last,
            // A counter that went back was restarted: all it holds is new.
            Some(_) => arrivals_total,
            // The first look: when those arrivals came is unknown.
            None => 0,
        };
        if let Some(last_at) = self.last_at {
            self.add_observed(last_at, now);
        }
        self.last_total = Some(arrivals_total);
        self.first_at.get_or_insert(now);
        self.last_at = Some(now);
        if arrived > 0 {
            self.arrivals.push_back((now, arrived));
            self.hour_arrivals[hour_of(now)] += arrived;
        }
        if self.users.back().is_none_or(|(_, u)| *u != users) {
            self.users.push_back((now, users));
        }
        let start = now
            .checked_sub_signed(self.window)
            .unwrap_or(DateTime::<Utc>::MIN_UTC);
        while self.arrivals.front().is_some_and(|(t, _)| *t <= start) {
            self.arrivals.pop_front();
        }
        while self.users.len() > 1 && self.users[1].0 <= start {
            self.users.pop_front();
        }
    }

    /// Spreads `(from, to]` over the hours of day it covers.
    fn add_observed(&mut self, from: DateTime<Utc>, to: DateTime<Utc>) {
        let mut t = from;
        while t < to {
            let next_hour = t
                .with_minute(0)
                .and_then(|h| h.with_second(0))
                .and_then(|h| h.with_nanosecond(0))
                .map_or(to, |h| h + chrono::Duration::hours(1));
            let end = next_hour.min(to);
            self.hour_observed_s[hour_of(t)] += seconds(end - t);
            t = end;
        }
    }

    /// Arrivals per second over the last `span`, if the history covers it.
    fn rate_over(&self, now: DateTime<Utc>, span: chrono::Duration) -> Option<f64> {
        let covered = self.first_at.is_some_and(|f| now - f >= span);
        let secs = seconds(span);
        if !covered || secs <= 0.0 {
            return None;
        }
        let start = now
            .checked_sub_signed(span)
            .unwrap_or(DateTime::<Utc>::MIN_UTC);
        let n: u64 = self
            .arrivals
            .iter()
            .rev()
            .skip_while(|(t, _)| *t > now)
            .take_while(|(t, _)| *t > start)
            .map(|(_, n)| n)
            .sum();
        Some(n as f64 / secs)
    }

    /// Arrivals per second over the last window, or over the history while it is shorter;
    /// `None` until the history covers [`WARM_UP_DIVISOR`]th of the window.
    pub fn recent_rate(&self, now: DateTime<Utc>) -> Option<f64> {
        let history = now - self.first_at?;
        if history < self.window / WARM_UP_DIVISOR {
            return None;
        }
        self.rate_over(now, history.min(self.window))
    }

    /// Arrivals per second the profile expects at `at`'s hour of day; `None` while that hour
    /// has not been watched for a whole hour.
    pub fn profile_rate(&self, at: DateTime<Utc>) -> Option<f64> {
        let h = hour_of(at);
        let observed = self.hour_observed_s[h];
        (observed >= PROFILE_TRUSTED_S).then(|| self.hour_arrivals[h] as f64 / observed)
    }

    /// The arrival rate to plan for over the next `lookahead`: the larger of the recent rate
    /// and the profile's for the hour at the end of it. `None` while nothing is known.
    pub fn rate(&self, now: DateTime<Utc>, lookahead: Duration) -> Option<f64> {
        let ahead = chrono::Duration::from_std(lookahead)
            .ok()
            .and_then(|d| now.checked_add_signed(d))
            .unwrap_or(now);
        match (self.recent_rate(now), self.profile_rate(ahead)) {
            (Some(r), Some(p)) => Some(r.max(p)),
            (r, p) => r.or(p),
        }
    }

    /// Mean users over the last window (time-weighted).
    pub fn mean_users(&self, now: DateTime<Utc>) -> f64 {
        let start = now
            .checked_sub_signed(self.window)
            .unwrap_or(DateTime::<Utc>::MIN_UTC);
        let mut area = 0.0;
        for (n, (since, users)) in self.users.iter().enumerate() {
            let from = (*since).max(start);
            let to = self.users.get(n + 1).map_or(now, |(t, _)| *t);
            if to > from {
                area += f64::from(*users) * seconds(to - from);
            }
        }
        let span = self.first_at.map_or(0.0, |f| seconds(now - f.max(start)));
        if span > 0.0 { area / span } else { 0.0 }
    }

    /// The mean session length by Little's law (mean users / arrival rate); `None` without a
    /// recent rate or with no arrival in the window.
    pub fn session_length(&self, now: DateTime<Utc>) -> Option<Duration> {
        let rate = self.recent_rate(now).filter(|r| *r > 0.0)?;
        Duration::try_from_secs_f64(self.mean_users(now) / rate).ok()
    }
}

fn hour_of(t: DateTime<Utc>) -> usize {
    usize::try_from(t.hour()).unwrap_or(0).min(23)
}

fn seconds(d: chrono::Duration) -> f64 {
    d.to_std().map_or(0.0, |d| d.as_secs_f64())
}

/// The smallest `k` with `P(Poisson(mean) > k) <= risk`: free slots that cover a Poisson
/// number of arrivals with that risk of falling short.
pub fn poisson_quantile(mean: f64, risk: f64) -> u32 {
    if mean.is_nan() || mean <= 0.0 {
        return 0;
    }
    let risk = risk.clamp(1e-9, 1.0);
    let mut p = (-mean).exp();
    let mut cumulative = p;
    let mut k = 0u32;
    // The quantile is within a few standard deviations of the mean; the cap guards a mean so
    // large that e^-mean underflows.
    let cap = (mean + 10.0 * mean.sqrt() + 10.0).min(f64::from(u32::MAX)) as u32;
    while 1.0 - cumulative > risk && k < cap {
        k += 1;
        p *= mean / f64::from(k);
        cumulative += p;
    }
    k
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::algorithm::testing::t0;

    fn secs(s: i64) -> chrono::Duration {
        chrono::Duration::seconds(s)
    }

    #[test]
    fn the_quantile_grows_with_the_mean_and_shrinks_with_the_risk() {
        assert_eq!(poisson_quantile(0.0, 0.1), 0);
        let mut last = 0;
        for mean in [0.05, 0.5, 1.0, 2.0, 5.0, 20.0] {
            let k = poisson_quantile(mean, 0.1);
            assert!(k >= last, "mean {mean}: {k} < {last}");
            // Its tail really is within the risk, and one less is not.
            let tail = |k: u32| {
                let mut p = (-mean).exp();
                let mut c = p;
                for i in 1..=k {
                    p *= mean / f64::from(i);
                    c += p;
                }
                1.0 - c
            };
            assert!(tail(k) <= 0.1);
            if k > 0 {
                assert!(tail(k - 1) > 0.1);
            }
            assert!(poisson_quantile(mean, 0.01) >= k);
            last = k;
        }
    }

    #[test]
    fn the_recent_rate_is_unknown_until_the_warm_up_is_covered() {
        let mut f = DemandForecast::new(Duration::from_secs(600));
        f.observe(t0(), 100, 0);
        // 30 arrivals over the next 10 minutes; the counter's earlier 100 are not counted.
        for n in 1..=30 {
            f.observe(t0() + secs(20 * n), 100 + n as u64, 1);
        }
        // The warm-up of a 10-minute window is 40 s.
        assert!(f.recent_rate(t0() + secs(39)).is_none());
        // Over the history while it is shorter than the window, then over the window.
        for at in [300, 600] {
            let rate = f.recent_rate(t0() + secs(at)).unwrap();
            assert!((rate - 1.0 / 20.0).abs() < 1e-9, "{at}: {rate}");
        }
        // Ten quiet minutes later the window has emptied.
        f.observe(t0() + secs(1300), 130, 0);
        assert_eq!(f.recent_rate(t0() + secs(1300)), Some(0.0));
    }

    #[test]
    fn littles_law_gives_the_session_length() {
        let mut f = DemandForecast::new(Duration::from_secs(600));
        f.observe(t0(), 0, 4);
        // One arrival a minute with 4 users on average: sessions of 4 minutes.
        for n in 1..=10 {
            f.observe(t0() + secs(60 * n), n as u64, 4);
        }
        let length = f.session_length(t0() + secs(600)).unwrap();
        assert!((length.as_secs_f64() - 240.0).abs() < 1.0, "{length:?}");
    }

    #[test]
    fn a_watched_day_raises_the_forecast_ahead_of_its_busy_hour() {
        let mut f = DemandForecast::new(Duration::from_secs(600));
        let day = chrono::Duration::days(1);
        let mut total = 0;
        // Day one: quiet until 08:00, then 120 arrivals an hour from 08:00 to 09:00.
        let mut t = t0();
        while t < t0() + day {
            if hour_of(t) == 8 {
                total += 1;
            }
            f.observe(t, total, 0);
            t += secs(30);
        }
        // Day two, 07:55, quiet: the recent rate is zero, the forecast five minutes ahead is
        // the profile's 08:00 rate.
        let before = t0() + day + chrono::Duration::hours(7) + chrono::Duration::minutes(55);
        while t <= before {
            f.observe(t, total, 0);
            t += secs(30);
        }
        assert_eq!(f.recent_rate(before), Some(0.0));
        let ahead = f.rate(before, Duration::from_secs(300)).unwrap();
        assert!((ahead - 120.0 / 3600.0).abs() < 1e-6, "{ahead}");
        // Looking only one minute ahead is still 07:00's quiet.
        assert_eq!(f.rate(before, Duration::from_secs(60)), Some(0.0));
    }

    #[test]
    fn a_clock_that_goes_back_forgets_the_history() {
        let mut f = DemandForecast::new(Duration::from_secs(60));
        f.observe(t0(), 0, 0);
        f.observe(t0() + secs(120), 50, 0);
        assert!(f.recent_rate(t0() + secs(120)).is_some());
        f.observe(t0() + secs(30), 60, 0);
        // A 60 s window warms up in 4 s.
        assert!(f.recent_rate(t0() + secs(33)).is_none());
    }
}
