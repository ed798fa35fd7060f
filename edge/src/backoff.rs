//! The one retry-delay policy: capped exponential growth from a base, a kind of jitter, and an
//! optional overall deadline. Each use site names its policy in a constant with the reason for
//! its numbers (see the constants beside each loop), so a reader never has to reverse-engineer
//! a `(delay * 2).min(cap)`.

use std::time::Duration;

use rand::Rng;

/// How much of each delay is random.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Jitter {
    /// Exactly the capped exponential step: for a single client retrying its own server, where
    /// there is no herd to spread.
    None,
    /// Uniform in `0 ..= step` (the AWS architecture blog's "Full Jitter"): spreads a herd of
    /// clients that lost the same server at the same instant.
    Full,
    /// Half the step fixed, half random: spreads a herd but never collapses to zero.
    Equal,
}

/// A retry-delay policy. `Copy` and `const`-constructible, so each use names one in a constant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The step before the first retry.
    pub base: Duration,
    /// The largest step.
    pub cap: Duration,
    pub jitter: Jitter,
    /// All attempts and waits of one operation together; `None`: retry until shut down.
    pub deadline: Option<Duration>,
}

impl Backoff {
    /// `base` doubling to `cap`, no jitter, no deadline.
    pub const fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap,
            jitter: Jitter::None,
            deadline: None,
        }
    }

    pub const fn with_jitter(mut self, jitter: Jitter) -> Self {
        self.jitter = jitter;
        self
    }

    pub const fn with_deadline(mut self, deadline: Duration) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// The step for retry `attempt` (0 first): `min(cap, base * 2^attempt)`, never below 1 ms
    /// (a zero base would retry in a busy loop) nor `cap` below `base`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let base = self.base.max(Duration::from_millis(1));
        let cap = self.cap.max(base);
        // 2^31 ms is already past any sensible cap; stop doubling before it overflows.
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        base.saturating_mul(factor).min(cap)
    }

    /// The delay before retry `attempt` (0 first), with the given source of randomness.
    pub fn delay_with(&self, attempt: u32, rng: &mut impl Rng) -> Duration {
        let step = self.ceiling(attempt);
        match self.jitter {
            Jitter::None => step,
            Jitter::Full => random_up_to(step, rng),
            Jitter::Equal => {
                let half = step / 2;
                half + random_up_to(step - half, rng)
            }
        }
    }

    /// The delay before retry `attempt` (0 first), from the thread-local generator.
    pub fn delay(&self, attempt: u32) -> Duration {
        self.delay_with(attempt, &mut rand::rng())
    }

    /// The state of one retry loop under this policy, started now.
    pub fn start(&self) -> Retries {
        Retries {
            policy: *self,
            attempt: 0,
            started: tokio::time::Instant::now(),
        }
    }
}

fn random_up_to(max: Duration, rng: &mut impl Rng) -> Duration {
    let nanos = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(rng.random_range(0..=nanos))
}

/// One retry loop: hands out the delays of its [`Backoff`] and says when the deadline is spent.
/// Uses tokio's clock, so tests with a paused clock see the deadline pass.
#[derive(Debug, Clone)]
pub struct Retries {
    policy: Backoff,
    attempt: u32,
    started: tokio::time::Instant,
}

impl Retries {
    pub fn policy(&self) -> &Backoff {
        &self.policy
    }

    /// How many delays have been handed out since the start or the last reset.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The next delay, or `None` once waiting it would end past the deadline.
    pub fn next_delay(&mut self) -> Option<Duration> {
        self.next_delay_with(&mut rand::rng())
    }

    /// [`Retries::next_delay`] with the given source of randomness.
    pub fn next_delay_with(&mut self, rng: &mut impl Rng) -> Option<Duration> {
        let delay = self.policy.delay_with(self.attempt, rng);
        self.attempt = self.attempt.saturating_add(1);
        match self.policy.deadline {
            Some(deadline) if self.started.elapsed() + delay > deadline => None,
            _ => Some(delay),
        }
    }

    /// The time left before the deadline (`None`: no deadline).
    pub fn remaining(&self) -> Option<Duration> {
        self.policy
            .deadline
            .map(|deadline| deadline.saturating_sub(self.started.elapsed()))
    }

    /// Back to the first step after a success; the deadline starts over too.
    pub fn reset(&mut self) {
        self.attempt = 0;
        self.started = tokio::time::Instant::now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn ceilings_double_from_base_to_cap() {
        let backoff = Backoff::new(100 * MS, Duration::from_secs(10));
        assert_eq!(backoff.ceiling(0), 100 * MS);
        assert_eq!(backoff.ceiling(1), 200 * MS);
        assert_eq!(backoff.ceiling(6), 6400 * MS);
        assert_eq!(backoff.ceiling(7), Duration::from_secs(10));
        assert_eq!(backoff.ceiling(u32::MAX), Duration::from_secs(10));
        assert_eq!(backoff.delay(3), 800 * MS);
    }

    #[tokio::test(start_paused = true)]
    async fn retries_stop_at_the_deadline_and_start_over_on_reset() {
        let policy = Backoff::new(Duration::from_secs(1), Duration::from_secs(4))
            .with_deadline(Duration::from_secs(10));
        let mut retries = policy.start();
        let mut waited = Duration::ZERO;
        while let Some(delay) = retries.next_delay() {
            tokio::time::advance(delay).await;
            waited += delay;
        }
        // 1 + 2 + 4 = 7 s; the next 4 s would end at 11 s, past the deadline.
        assert_eq!(waited, Duration::from_secs(7));
        assert_eq!(retries.remaining(), Some(Duration::from_secs(3)));
        retries.reset();
        assert_eq!(retries.attempt(), 0);
        assert_eq!(retries.next_delay(), Some(Duration::from_secs(1)));
        let mut forever = Backoff::new(MS, MS).start();
        tokio::time::advance(Duration::from_secs(86_400)).await;
        assert_eq!(forever.next_delay(), Some(MS));
    }

    proptest! {
        #[test]
        fn a_delay_never_exceeds_its_step_and_equal_jitter_keeps_half(
            base_ms in 0u64..5_000,
            cap_ms in 0u64..120_000,
            attempt in 0u32..80,
            seed in any::<u64>(),
        ) {
            let mut rng = StdRng::seed_from_u64(seed);
            let (base, cap) = (Duration::from_millis(base_ms), Duration::from_millis(cap_ms));
            let policy = Backoff::new(base, cap);
            let step = policy.ceiling(attempt);
            prop_assert!(step >= MS);
            prop_assert!(step <= cap.max(base.max(MS)));
            prop_assert!(policy.with_jitter(Jitter::Full).delay_with(attempt, &mut rng) <= step);
            let equal = policy.with_jitter(Jitter::Equal).delay_with(attempt, &mut rng);
            prop_assert!(equal >= step / 2 && equal <= step, "{equal:?} of {step:?}");
        }

        #[test]
        fn full_jitter_covers_the_whole_range(seed in any::<u64>()) {
            let mut rng = StdRng::seed_from_u64(seed);
            let policy = Backoff::new(100 * MS, 100 * MS).with_jitter(Jitter::Full);
            let delays: Vec<Duration> = (0..400).map(|_| policy.delay_with(5, &mut rng)).collect();
            prop_assert!(delays.iter().any(|d| *d < 10 * MS));
            prop_assert!(delays.iter().any(|d| *d > 90 * MS));
        }
    }
}
