//! EC2's instances as ours: the tags a launch applies, instance names, client tokens, the
//! filters DescribeInstances takes, and [`HostInstance`]s from EC2's answers.

use aws_sdk_ec2::types::{Filter, Instance, InstanceStateName, Tag};
use chrono::{DateTime, Utc};
use dbclient::types::{ImageId, InstanceId};

use super::config::TagFilter;
use crate::hosts::{HostInstance, HostState};

/// Tag keys. `whist-managed-by` is what
/// [`HostHandler::list_managed`](crate::hosts::HostHandler::list_managed) and reconciliation trust:
/// an instance without it was not launched by us and is never touched.
pub const TAG_NAME: &str = "Name";
pub const TAG_ENVIRONMENT: &str = "whist-env";
pub const TAG_MANAGED_BY: &str = "whist-managed-by";
pub const TAG_LAUNCH_ID: &str = "whist-launch-id";
pub const TAG_COMMIT: &str = "whist-commit";
pub const MANAGED_BY: &str = "whist-scaling-service";

/// States in which an instance exists for our purposes (everything but `terminated`).
pub(super) const LIVE_STATES: [&str; 5] =
    ["pending", "running", "shutting-down", "stopping", "stopped"];

pub(super) fn filter<'a>(name: &str, values: impl IntoIterator<Item = &'a str>) -> Filter {
    values
        .into_iter()
        .fold(Filter::builder().name(name), |b, v| b.values(v))
        .build()
}

pub(super) fn tag_filters(tags: &TagFilter) -> Vec<Filter> {
    tags.iter()
        .map(|(key, value)| filter(&format!("tag:{key}"), [value.as_str()]))
        .collect()
}

pub(super) fn describe_filter(tags: &TagFilter) -> String {
    tags.iter()
        .map(|(key, value)| format!("{key}={value}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// EC2's `ClientToken`: at most 64 ASCII characters. A launch id that fits is used as is (easy
/// to find in CloudTrail); anything else is hashed.
pub(super) fn client_token(launch_id: &str) -> String {
    const MAX: usize = 64;
    if !launch_id.is_empty()
        && launch_id.len() <= MAX
        && launch_id.bytes().all(|b| b.is_ascii_graphic())
    {
        launch_id.to_owned()
    } else {
        format!("whist-{:016x}", fnv1a(launch_id.as_bytes()))
    }
}

/// FNV-1a: stable across Rust versions (unlike `DefaultHasher`), so a restarted scaler derives
/// the same token.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, b| {
        (hash ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// `ec2-<region>-<env>-<commit[..7]>-<launch id[..8]>`. Slicing by characters, so a short or
/// empty commit (which panicked the original) gives a short name, not a crash.
pub fn instance_name(region: &str, environment: &str, commit: &str, launch_id: &str) -> String {
    let commit: String = commit
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(7)
        .collect();
    let short_id: String = launch_id
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(8)
        .collect();
    let commit = if commit.is_empty() {
        "unknown".to_owned()
    } else {
        commit
    };
    format!(
        "ec2-{region}-{}-{commit}-{short_id}",
        environment.to_ascii_lowercase()
    )
}

fn tag_value<'a>(instance: &'a Instance, key: &str) -> Option<&'a str> {
    instance
        .tags()
        .iter()
        .find(|t| t.key() == Some(key))
        .and_then(Tag::value)
}

/// The handler's view of an EC2 instance; `None` (logged) when EC2 answers without an id or an
/// image, which it should never do.
pub(super) fn to_host_instance(instance: &Instance) -> Option<HostInstance> {
    let id = instance
        .instance_id()
        .and_then(|id| InstanceId::new(id).ok());
    let image_id = instance.image_id().and_then(|id| ImageId::new(id).ok());
    let (Some(id), Some(image_id)) = (id, image_id) else {
        tracing::warn!(
            instance.id = instance.instance_id().unwrap_or("<none>"),
            "skipping an instance without a valid id or image id"
        );
        return None;
    };
    let state = match instance.state().and_then(|s| s.name()) {
        Some(InstanceStateName::Pending) => HostState::Pending,
        Some(InstanceStateName::Running) => HostState::Running,
        Some(InstanceStateName::ShuttingDown) => HostState::ShuttingDown,
        Some(InstanceStateName::Terminated) => HostState::Terminated,
        Some(InstanceStateName::Stopping) => HostState::Stopping,
        Some(InstanceStateName::Stopped) => HostState::Stopped,
        _ => HostState::Unknown,
    };
    let launched_at = instance
        .launch_time()
        .and_then(|t| DateTime::<Utc>::from_timestamp(t.secs(), t.subsec_nanos()));
    Some(HostInstance {
        id,
        image_id,
        instance_type: instance
            .instance_type()
            .map(|t| t.as_str().to_owned())
            .unwrap_or_default(),
        state,
        launch_id: tag_value(instance, TAG_LAUNCH_ID).map(str::to_owned),
        launched_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_name_survives_short_and_empty_commits() {
        assert_eq!(
            instance_name("us-east-1", "DEV", "0123456789abcdef", "5f0c9a2e-1111-2222"),
            "ec2-us-east-1-dev-0123456-5f0c9a2e"
        );
        assert_eq!(
            instance_name("us-east-1", "dev", "ab", "x"),
            "ec2-us-east-1-dev-ab-x"
        );
        assert_eq!(
            instance_name("us-east-1", "dev", "", "x"),
            "ec2-us-east-1-dev-unknown-x"
        );
        assert_eq!(
            instance_name("us-east-1", "dev", "é€x", "x"),
            "ec2-us-east-1-dev-x-x"
        );
    }

    #[test]
    fn client_token_is_stable_and_within_ec2_limits() {
        assert_eq!(client_token("launch-1"), "launch-1");
        let long = "x".repeat(100);
        assert_eq!(client_token(&long), client_token(&long));
        assert!(client_token(&long).len() <= 64);
        assert_ne!(client_token(&long), client_token(&"y".repeat(100)));
        assert!(client_token("has space").is_ascii());
    }
}
