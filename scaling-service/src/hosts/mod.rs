//! Hosts: the cloud side of the fleet. [`HostHandler`] is the narrow surface the scaling
//! service needs from a cloud (launch, terminate, look up, wait, instance-type facts);
//! `ec2` implements it over aws-sdk-ec2 (tested against moto), [`fake::FakeHostHandler`] in
//! memory (for the algorithm's and executor's tests), and `faulty` wraps any of them to inject
//! throttling, server errors and slow answers.
//!
//! Launches are idempotent per [`LaunchRequest::launch_id`]: the id is a tag on every instance
//! of the launch, and a retry (after a timeout or a crash) finds the instances already launched
//! with it instead of launching again. Real EC2 also honours the `ClientToken`; moto does not,
//! so the tag lookup is what the tests exercise.

use std::time::Duration;

use chrono::{DateTime, Utc};
use dbclient::types::{ImageId, InstanceId, Region};

pub mod ec2;
pub mod fake;
pub mod faulty;

/// What to launch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchRequest {
    /// Unique per intended launch; recorded before launching so a crash can be recovered.
    pub launch_id: String,
    pub count: u32,
    pub image_id: ImageId,
    pub instance_type: String,
    /// The commit of the host service on the image (goes into the name tag).
    pub client_sha: String,
}

/// The cloud's view of an instance's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HostState {
    Pending,
    Running,
    ShuttingDown,
    Terminated,
    Stopping,
    Stopped,
    Unknown,
}

impl HostState {
    /// Gone or going: the instance will never serve again.
    pub fn is_ending(self) -> bool {
        matches!(self, Self::ShuttingDown | Self::Terminated)
    }
}

/// An instance as the cloud reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostInstance {
    pub id: InstanceId,
    pub image_id: ImageId,
    pub instance_type: String,
    pub state: HostState,
    /// The launch it came from (its launch-id tag), when it has one.
    pub launch_id: Option<String>,
    pub launched_at: Option<DateTime<Utc>>,
}

/// What an instance type offers; capacity is `min(gpus × per-GPU limit, vcpus / 4)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InstanceTypeInfo {
    pub gpus: u32,
    pub vcpus: u32,
}

/// Why a cloud call failed. Each variant names the operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    #[error("{operation}: throttled: {message}")]
    Throttled {
        operation: &'static str,
        message: String,
    },
    #[error("{operation}: no capacity: {message}")]
    Capacity {
        operation: &'static str,
        message: String,
    },
    #[error("{operation}: server error: {message}")]
    Server {
        operation: &'static str,
        message: String,
    },
    #[error("{operation}: invalid request: {message}")]
    Invalid {
        operation: &'static str,
        message: String,
    },
    #[error("{operation}: not found: {message}")]
    NotFound {
        operation: &'static str,
        message: String,
    },
    #[error("{operation}: timed out: {message}")]
    Timeout {
        operation: &'static str,
        message: String,
    },
    #[error("{operation}: network: {message}")]
    Network {
        operation: &'static str,
        message: String,
    },
}

impl HostError {
    /// Worth retrying after a backoff: throttling, capacity, server-side and transport trouble.
    /// Invalid requests and missing resources are not.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::Throttled { .. }
                | Self::Capacity { .. }
                | Self::Server { .. }
                | Self::Timeout { .. }
                | Self::Network { .. }
        )
    }
}

/// One region of one cloud.
#[async_trait::async_trait]
pub trait HostHandler: Send + Sync + std::fmt::Debug {
    fn region(&self) -> &Region;
    /// Launches `count` instances tagged with `launch_id`; idempotent per `launch_id`.
    async fn launch(&self, request: &LaunchRequest) -> Result<Vec<HostInstance>, HostError>;
    /// Terminates instances; ones already gone are fine.
    async fn terminate(&self, ids: &[InstanceId]) -> Result<(), HostError>;
    /// Instances tagged as managed by this deployment, in any state.
    async fn list_managed(&self) -> Result<Vec<HostInstance>, HostError>;
    async fn describe(&self, ids: &[InstanceId]) -> Result<Vec<HostInstance>, HostError>;
    async fn wait_running(&self, ids: &[InstanceId], timeout: Duration) -> Result<(), HostError>;
    async fn wait_terminated(&self, ids: &[InstanceId], timeout: Duration)
    -> Result<(), HostError>;
    async fn instance_type(&self, instance_type: &str) -> Result<InstanceTypeInfo, HostError>;
}
