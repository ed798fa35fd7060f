//! [`HostHandler`] over EC2 (aws-sdk-ec2).
//!
//! What a launch sends: the AMI and type of the request, `MinCount = MaxCount = count` (all or
//! nothing: no silent partial launches), the rendered `host-setup/ec2_userdata.sh` (it writes the
//! host service's environment file and starts its unit), the IAM instance profile, the subnet and
//! security group found by tags (looked up once per handler), IMDSv2 only with a hop limit of 1
//! and instance tags in IMDS, EBS-optimised, shutdown behaviour `terminate`, and tags applied by
//! RunInstances itself (`Name`, `whist-env`, `whist-managed-by`, `whist-launch-id`, `whist-commit`),
//! so an instance is never untagged, even for a moment.
//!
//! Idempotency: a launch is identified by its `launch_id`. Before every attempt the handler looks
//! for instances tagged with that id and returns them if there are any; the `ClientToken`
//! derived from the id covers EC2's eventually consistent tag index (moto ignores the token,
//! real EC2 honours it), so a retried launch never launches twice.
//!
//! Retries: only errors that [`HostError::is_retryable`](super::HostError::is_retryable) accepts (throttling, 5xx, capacity,
//! network, timeouts) are retried, with capped exponential backoff and jitter, within an
//! overall deadline ([`RetryPolicy`]). The SDK's own retries are switched off, so this is the
//! one place that decides.
//!
//! The module by job: `handler.rs` ( [`Ec2HostHandler`] and its EC2 calls),
//! `config.rs` (what a handler is built from), `user_data.rs` (templating and encoding the
//! user data), `errors.rs` (SDK errors to [`HostError`](super::HostError)s), `instances.rs`
//! (tags, names, client tokens and EC2's instances as ours); the retry policy is here.

use edge::backoff::{Backoff, Jitter};
use std::time::Duration;

mod config;
mod errors;
mod handler;
mod instances;
mod user_data;

pub use config::{
    AdminSecret, Ec2Config, Ec2ConfigError, HostServiceSettings, StaticCredentials, TagFilter,
};
pub use handler::Ec2HostHandler;
pub use instances::{
    MANAGED_BY, TAG_COMMIT, TAG_ENVIRONMENT, TAG_LAUNCH_ID, TAG_MANAGED_BY, TAG_NAME, instance_name,
};

/// Backoff before the first retry of an EC2 call: EC2's throttling guidance starts at a fraction
/// of a second.
pub const API_RETRY_BASE: Duration = Duration::from_millis(250);
/// Longest wait between two attempts: the request-token bucket of EC2 refills within seconds.
pub const API_RETRY_CAP: Duration = Duration::from_secs(10);
/// Give up on one operation after this long: a scaling pass runs every few minutes, so a launch
/// that cannot get through in two is better reported and retried by the next pass.
pub const API_RETRY_DEADLINE: Duration = Duration::from_secs(120);
/// One HTTP attempt: RunInstances answers in about a second; 30 s means the call is lost.
pub const API_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);
/// TCP/TLS connect to the EC2 endpoint.
pub const API_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// First poll interval of `wait_running`/`wait_terminated`: EC2 instances take 10-60 s to run.
pub const POLL_BASE: Duration = Duration::from_secs(2);
/// Longest poll interval: keeps DescribeInstances well under the API rate limit.
pub const POLL_CAP: Duration = Duration::from_secs(15);

/// How [`Ec2HostHandler`] retries and polls. [`RetryPolicy::default`] is production;
/// tests shrink it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub base: Duration,
    pub cap: Duration,
    /// Overall time for one operation, all attempts and waits included.
    pub deadline: Duration,
    pub attempt_timeout: Duration,
    pub connect_timeout: Duration,
    pub poll_base: Duration,
    pub poll_cap: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            base: API_RETRY_BASE,
            cap: API_RETRY_CAP,
            deadline: API_RETRY_DEADLINE,
            attempt_timeout: API_ATTEMPT_TIMEOUT,
            connect_timeout: API_CONNECT_TIMEOUT,
            poll_base: POLL_BASE,
            poll_cap: POLL_CAP,
        }
    }
}

impl RetryPolicy {
    /// EC2 calls' retries as the workspace's one backoff type: "equal jitter", half of the
    /// capped exponential step fixed and half random, so retries from many regions spread out
    /// but never collapse to zero (AWS Architecture Blog, "Exponential Backoff And Jitter"),
    /// within [`RetryPolicy::deadline`].
    pub fn api_backoff(&self) -> Backoff {
        Backoff::new(self.base, self.cap)
            .with_jitter(Jitter::Equal)
            .with_deadline(self.deadline)
    }

    /// `wait_running`/`wait_terminated` polls: no jitter (one instance's poll is no herd).
    pub fn poll_backoff(&self) -> Backoff {
        Backoff::new(self.poll_base, self.poll_cap)
    }

    /// Delay before attempt `attempt + 1` (attempt counts from 1).
    pub fn backoff(&self, attempt: u32) -> Duration {
        self.api_backoff().delay(attempt.saturating_sub(1))
    }
}

/// `base * 2^(attempt-1)`, capped (attempt counts from 1).
fn exponential(base: Duration, cap: Duration, attempt: u32) -> Duration {
    Backoff::new(base, cap).ceiling(attempt.saturating_sub(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_caps_and_stays_within_jitter_bounds() {
        let policy = RetryPolicy::default();
        for attempt in 1..40 {
            let step = exponential(policy.base, policy.cap, attempt);
            let delay = policy.backoff(attempt);
            assert!(
                delay >= step / 2 && delay <= step,
                "attempt {attempt}: {delay:?}"
            );
            assert!(step <= policy.cap);
        }
        assert_eq!(exponential(policy.base, policy.cap, 1), policy.base);
        assert_eq!(exponential(policy.base, policy.cap, 2), policy.base * 2);
        assert_eq!(exponential(policy.base, policy.cap, 100), policy.cap);
    }
}
