//! The region controller's database writes, fenced by the leader lease it acts under: each is
//! one request that the database refuses whole once the lease has changed hands
//! ([`dbclient::fenced`]), so a leader that was paused past its lease lands nothing after the
//! takeover. A controller that runs without a lease (tests, a single replica) writes unfenced.

use dbclient::DbClient;
use dbclient::fenced::Fence;
use dbclient::launches::{LaunchRecord, NewLaunchRecord};
use dbclient::types::{Image, InstanceId, InstanceStatus, NewInstance};

use super::ExecError;

/// Writes under `fence` (none: unfenced).
#[derive(Debug, Clone)]
pub struct FencedWrites {
    pub db: DbClient,
    pub fence: Option<Fence>,
}

impl FencedWrites {
    /// Before an action outside the database (a cloud call): fails with
    /// [`ExecError::LeaseLost`] once the lease has changed hands.
    pub async fn check(&self) -> Result<(), ExecError> {
        match &self.fence {
            Some(fence) => Ok(self.db.check_fence(fence).await?),
            None => Ok(()),
        }
    }

    pub async fn insert_launch_record(
        &self,
        record: &NewLaunchRecord,
    ) -> Result<LaunchRecord, ExecError> {
        Ok(match &self.fence {
            Some(fence) => self.db.fenced_insert_launch_record(fence, record).await?,
            None => self.db.insert_launch_record(record).await?,
        })
    }

    pub async fn delete_launch_record(&self, launch_id: &str) -> Result<bool, ExecError> {
        Ok(match &self.fence {
            Some(fence) => {
                self.db
                    .fenced_delete_launch_record(fence, launch_id)
                    .await?
            }
            None => self.db.delete_launch_record(launch_id).await?,
        })
    }

    pub async fn insert_instances(&self, rows: &[NewInstance]) -> Result<usize, ExecError> {
        if rows.is_empty() {
            return Ok(0);
        }
        Ok(match &self.fence {
            Some(fence) => self.db.fenced_insert_instances(fence, rows).await?,
            None => self.db.insert_instances(rows).await?,
        })
    }

    pub async fn insert_launched_instances(
        &self,
        rows: &[NewInstance],
    ) -> Result<usize, ExecError> {
        if rows.is_empty() {
            return Ok(0);
        }
        Ok(match &self.fence {
            Some(fence) => {
                self.db
                    .fenced_insert_launched_instances(fence, rows)
                    .await?
            }
            None => self.db.insert_launched_instances(rows).await?,
        })
    }

    pub async fn transition_instance_status(
        &self,
        id: &InstanceId,
        from: InstanceStatus,
        to: InstanceStatus,
    ) -> Result<bool, ExecError> {
        Ok(match &self.fence {
            Some(fence) => {
                self.db
                    .fenced_transition_instance_status(fence, id, from, to)
                    .await?
            }
            None => self.db.transition_instance_status(id, from, to).await?,
        })
    }

    pub async fn delete_instance(&self, id: &InstanceId) -> Result<bool, ExecError> {
        Ok(match &self.fence {
            Some(fence) => self.db.fenced_delete_instance(fence, id).await?,
            None => self.db.delete_instance(id).await?,
        })
    }

    pub async fn upsert_image(&self, image: &Image) -> Result<(), ExecError> {
        match &self.fence {
            Some(fence) => self.db.fenced_upsert_image(fence, image).await?,
            None => {
                self.db.upsert_image(image).await?;
            }
        }
        Ok(())
    }
}
