//! What the live region controller ([`crate::region`]) and the simulator
//! ([`crate::simulation`]) share, so both run the same snapshot → plan → execute path:
//! [`snapshot::SnapshotBuilder`] turns the region's rows into the algorithm's [`Snapshot`],
//! [`demand::RefusalLog`] remembers the clients the assign path refused, and
//! [`execute_plan`] carries a plan out through a [`PlanExecutor`]: the database and the cloud
//! in the service, the simulated fleet in the simulator.

pub mod demand;
pub mod fence;
pub mod snapshot;

use std::time::Duration;

use dbclient::types::{ImageId, InstanceId};

use crate::algorithm::{Action, TerminationReason};
use crate::hosts::HostError;

#[cfg(doc)]
use crate::algorithm::Snapshot;

/// Why carrying out an action failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ExecError {
    #[error("cloud: {0}")]
    Host(#[from] HostError),
    #[error("database: {0}")]
    Db(String),
    #[error("launch {launch_id}: asked for {wanted} instances, got {got}")]
    PartialLaunch {
        launch_id: String,
        wanted: u32,
        got: usize,
    },
    /// Another replica holds the leader lease now: the write was refused (fenced), or the
    /// task was cancelled. What it left (a launch record) is the new leader's to resume.
    #[error("the leader lease was lost")]
    LeaseLost,
}

impl From<dbclient::DbError> for ExecError {
    fn from(error: dbclient::DbError) -> Self {
        if dbclient::fenced::is_fenced(&error) {
            Self::LeaseLost
        } else {
            Self::Db(error.to_string())
        }
    }
}

/// What carries a plan's actions out.
#[async_trait::async_trait]
pub trait PlanExecutor: Send {
    /// Record and start a launch of `count` instances of `image_id` (it finishes later).
    async fn launch(&mut self, count: u32, image_id: ImageId) -> Result<(), ExecError>;
    /// Mark a free ACTIVE host DRAINING.
    async fn drain(&mut self, instance: InstanceId) -> Result<(), ExecError>;
    /// Start terminating a host (it finishes later; the host is busy meanwhile).
    async fn terminate(
        &mut self,
        instance: InstanceId,
        reason: TerminationReason,
    ) -> Result<(), ExecError>;
    /// Remove a row whose instance no longer exists.
    async fn delete_row(&mut self, instance: InstanceId) -> Result<(), ExecError>;
    /// Point the region's image row at `image_id`.
    async fn swap_image(&mut self, image_id: ImageId) -> Result<(), ExecError>;
    /// Remember that the upgrade to `image_id` was given up.
    fn abandon_upgrade(&mut self, image_id: ImageId);
}

/// Carries `plan` out in order and returns when to decide again (the plan's last
/// `RequeueAfter`, else a minute). Stops at the first failed action.
pub async fn execute_plan<E: PlanExecutor + ?Sized>(
    plan: Vec<Action>,
    executor: &mut E,
) -> Result<Duration, ExecError> {
    let mut wait = Duration::from_secs(60);
    for action in plan {
        match action {
            Action::RequeueAfter(d) => wait = d,
            Action::Launch { count, image_id } => executor.launch(count, image_id).await?,
            Action::Drain { instance } => executor.drain(instance).await?,
            Action::Terminate { instance, reason } => executor.terminate(instance, reason).await?,
            Action::DeleteRow { instance } => executor.delete_row(instance).await?,
            Action::SwapImage { image_id } => executor.swap_image(image_id).await?,
            Action::AbandonUpgrade { image_id } => executor.abandon_upgrade(image_id),
        }
    }
    Ok(wait)
}
