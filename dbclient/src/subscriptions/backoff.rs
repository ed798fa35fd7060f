//! The reconnect policy, an [`edge::backoff::Backoff`]: capped exponential backoff with full
//! jitter (the AWS architecture blog's "Full Jitter"): the `n`-th delay is uniform in
//! `0 ..= min(cap, base * 2^n)`. Full jitter spreads the reconnects of every host that lost the
//! same Hasura at the same instant.

use std::time::Duration;

pub use edge::backoff::{Backoff, Jitter, Retries};

/// First reconnect ceiling. A dropped socket to a healthy server (a load balancer idling it out,
/// Hasura's 1012 on a metadata reload) should be back almost at once: live queries resend the
/// whole result, so every millisecond offline is a millisecond of stale state.
pub const RECONNECT_BASE: Duration = Duration::from_millis(100);

/// Largest reconnect ceiling. A host must notice an ALLOCATED mandelbox within seconds once
/// Hasura is back, and one connection per service every ≤10 s is no load for it.
pub const RECONNECT_CAP: Duration = Duration::from_secs(10);

/// A connection that stayed up this long counts as healthy: the next failure starts the
/// backoff from [`RECONNECT_BASE`] again. Without it, a server that accepts and then drops every
/// connection at once would be hammered at the base delay forever.
pub const HEALTHY_CONNECTION: Duration = Duration::from_secs(30);

/// The reconnect policy: [`RECONNECT_BASE`] doubling to [`RECONNECT_CAP`], full jitter. There
/// is no overall deadline: the subscription client retries until it is shut down (a host
/// without its subscriptions is useless, so giving up would only trade a visible outage for a
/// silent one). The state of one loop is an [`edge::backoff::Retries`] from
/// [`Backoff::start`].
pub const RECONNECT: Backoff =
    Backoff::new(RECONNECT_BASE, RECONNECT_CAP).with_jitter(Jitter::Full);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn default_ceilings_double_from_base_to_cap() {
        let backoff = RECONNECT;
        assert_eq!(backoff.ceiling(0), Duration::from_millis(100));
        assert_eq!(backoff.ceiling(1), Duration::from_millis(200));
        assert_eq!(backoff.ceiling(6), Duration::from_millis(6400));
        assert_eq!(backoff.ceiling(7), RECONNECT_CAP);
        assert_eq!(backoff.ceiling(u32::MAX), RECONNECT_CAP);
    }

    #[tokio::test]
    async fn reset_starts_over_from_base() {
        let mut backoff = RECONNECT.start();
        for _ in 0..20 {
            assert!(
                backoff.next_delay().is_some(),
                "no deadline: never gives up"
            );
        }
        backoff.reset();
        assert_eq!(backoff.attempt(), 0);
        assert!(backoff.next_delay().is_some_and(|d| d <= RECONNECT_BASE));
    }

    proptest! {
        #[test]
        fn delay_is_never_above_the_cap_or_the_attempts_ceiling(
            base_ms in 1u64..5_000,
            cap_ms in 1u64..120_000,
            attempts in 1usize..80,
            seed in any::<u64>(),
        ) {
            let mut rng = StdRng::seed_from_u64(seed);
            let cap = Duration::from_millis(cap_ms);
            let policy = Backoff::new(Duration::from_millis(base_ms), cap).with_jitter(Jitter::Full);
            for attempt in 0..attempts {
                let ceiling = policy.ceiling(attempt as u32);
                let delay = policy.delay_with(attempt as u32, &mut rng);
                prop_assert!(delay <= ceiling, "attempt {attempt}: {delay:?} > {ceiling:?}");
                prop_assert!(delay <= cap.max(Duration::from_millis(base_ms)));
            }
        }

        #[test]
        fn ceiling_grows_monotonically_until_the_cap(
            base_ms in 1u64..5_000,
            cap_ms in 1u64..120_000,
        ) {
            let base = Duration::from_millis(base_ms);
            let cap = Duration::from_millis(cap_ms).max(base);
            let backoff = Backoff::new(base, cap);
            prop_assert_eq!(backoff.ceiling(0), base);
            for attempt in 0..64u32 {
                let (now, next) = (backoff.ceiling(attempt), backoff.ceiling(attempt + 1));
                prop_assert!(next >= now);
                prop_assert!(next == cap || next == now * 2, "{now:?} -> {next:?}");
            }
            prop_assert_eq!(backoff.ceiling(64), cap);
        }

        #[test]
        fn jitter_covers_the_whole_range(seed in any::<u64>()) {
            // Full jitter: over many draws at the cap, delays land both in the lowest and in
            // the highest tenth of the range.
            let mut rng = StdRng::seed_from_u64(seed);
            let policy = Backoff::new(Duration::from_millis(100), Duration::from_millis(100))
                .with_jitter(Jitter::Full);
            let delays: Vec<Duration> = (0..400).map(|n| policy.delay_with(n, &mut rng)).collect();
            prop_assert!(delays.iter().any(|d| *d < Duration::from_millis(10)));
            prop_assert!(delays.iter().any(|d| *d > Duration::from_millis(90)));
        }
    }
}
