//! Writes fenced by a leader lease (documents in `graphql/fenced.graphql`, migration 0006):
//! each goes in one request with an upsert of the writer's [`Fence`] into
//! `whist.scaling_fences`, whose foreign key names the lease's current generation. Hasura runs a
//! request's mutation root fields in one transaction, so a writer whose lease has changed hands
//! gets [`is_fenced`] errors and nothing of its request lands.

use chrono::{DateTime, Utc};
use graphql_client::GraphQLQuery;

use crate::client::DbClient;
use crate::error::{ConstraintKind, DbError};
use crate::instances::required;
use crate::launches::{LaunchRecord, NewLaunchRecord};
use crate::types::{Image, InstanceId, InstanceStatus, NewInstance};

/// The foreign key a stale generation violates.
pub const FENCE_CONSTRAINT: &str = "scaling_fences_lease_fkey";

/// A lease holder's token: the lease's name and the generation it was taken with.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Fence {
    pub name: String,
    pub generation: i64,
}

/// Whether `error` says the writer's lease has changed hands (its write was refused whole).
pub fn is_fenced(error: &DbError) -> bool {
    matches!(
        error,
        DbError::ConstraintViolation {
            kind: ConstraintKind::ForeignKey,
            constraint,
            message,
            ..
        } if constraint.as_deref() == Some(FENCE_CONSTRAINT) || message.contains(FENCE_CONSTRAINT)
    )
}

// rustfmt re-indents attributes inside macro_rules on every run.
#[rustfmt::skip]
macro_rules! fenced_operation {
    ($name:ident) => {
        #[derive(GraphQLQuery, Debug)]
        #[graphql(
            schema_path = "../schema.graphql",
            query_path = "graphql/fenced.graphql",
            custom_scalars_module = "crate::graphql",
            response_derives = "Debug",
            variables_derives = "Debug, Default",
            skip_serializing_none
        )]
        pub struct $name;
    };
}

fenced_operation!(CheckFence);
fenced_operation!(FencedInsertLaunchRecord);
fenced_operation!(FencedDeleteLaunchRecord);
fenced_operation!(FencedInsertInstances);
fenced_operation!(FencedInsertLaunchedInstances);
fenced_operation!(FencedTransitionInstanceStatus);
fenced_operation!(FencedDeleteInstance);
fenced_operation!(FencedUpsertImage);

/// `whist_instances_insert_input` of one of the two fenced inserts (the same fields).
macro_rules! instance_inputs {
    ($module:ident, $instances:expr) => {
        $instances
            .iter()
            .map(|instance| $module::whist_instances_insert_input {
                id: Some(instance.id.to_string()),
                provider: Some(instance.provider.clone()),
                region: Some(instance.region.to_string()),
                image_id: Some(instance.image_id.to_string()),
                client_sha: Some(instance.client_sha.clone()),
                ip_addr: instance.ip_addr,
                instance_type: Some(instance.instance_type.clone()),
                remaining_capacity: Some(i64::from(instance.remaining_capacity)),
                status: Some(instance.status.as_str().to_owned()),
                ..Default::default()
            })
            .collect()
    };
}

impl DbClient {
    /// Fails ([`is_fenced`]) unless `fence` is the lease's current generation: checked before
    /// an action outside the database (a cloud call), which no transaction can fence.
    pub async fn check_fence(&self, fence: &Fence) -> Result<(), DbError> {
        let variables = check_fence::Variables {
            fence_name: fence.name.clone(),
            fence_generation: fence.generation,
        };
        self.execute::<CheckFence>(variables).await?;
        Ok(())
    }

    /// [`DbClient::insert_launch_record`], fenced.
    pub async fn fenced_insert_launch_record(
        &self,
        fence: &Fence,
        record: &NewLaunchRecord,
    ) -> Result<LaunchRecord, DbError> {
        let variables = fenced_insert_launch_record::Variables {
            fence_name: fence.name.clone(),
            fence_generation: fence.generation,
            launch_id: record.launch_id.clone(),
            region: record.region.to_string(),
            image_id: record.image_id.to_string(),
            instance_type: record.instance_type.clone(),
            count: i64::from(record.count),
            client_sha: record.client_sha.clone(),
        };
        let response = self.execute::<FencedInsertLaunchRecord>(variables).await?;
        let row = required(
            "FencedInsertLaunchRecord",
            response.insert_whist_scaling_launches_one,
        )?;
        let created_at: DateTime<Utc> = row.created_at;
        Ok(LaunchRecord {
            launch_id: row.launch_id,
            region: record.region.clone(),
            image_id: record.image_id.clone(),
            instance_type: record.instance_type.clone(),
            count: record.count,
            client_sha: record.client_sha.clone(),
            created_at,
        })
    }

    /// [`DbClient::delete_launch_record`], fenced.
    pub async fn fenced_delete_launch_record(
        &self,
        fence: &Fence,
        launch_id: &str,
    ) -> Result<bool, DbError> {
        let variables = fenced_delete_launch_record::Variables {
            fence_name: fence.name.clone(),
            fence_generation: fence.generation,
            launch_id: launch_id.to_owned(),
        };
        let response = self.execute::<FencedDeleteLaunchRecord>(variables).await?;
        Ok(response.delete_whist_scaling_launches_by_pk.is_some())
    }

    /// [`DbClient::insert_instances`], fenced.
    pub async fn fenced_insert_instances(
        &self,
        fence: &Fence,
        instances: &[NewInstance],
    ) -> Result<usize, DbError> {
        let variables = fenced_insert_instances::Variables {
            fence_name: fence.name.clone(),
            fence_generation: fence.generation,
            objects: instance_inputs!(fenced_insert_instances, instances),
        };
        let response = self.execute::<FencedInsertInstances>(variables).await?;
        let inserted =
            required("FencedInsertInstances", response.insert_whist_instances)?.affected_rows;
        Ok(usize::try_from(inserted).unwrap_or(0))
    }

    /// [`DbClient::insert_launched_instances`], fenced.
    pub async fn fenced_insert_launched_instances(
        &self,
        fence: &Fence,
        instances: &[NewInstance],
    ) -> Result<usize, DbError> {
        let variables = fenced_insert_launched_instances::Variables {
            fence_name: fence.name.clone(),
            fence_generation: fence.generation,
            objects: instance_inputs!(fenced_insert_launched_instances, instances),
        };
        let response = self
            .execute::<FencedInsertLaunchedInstances>(variables)
            .await?;
        let inserted = required(
            "FencedInsertLaunchedInstances",
            response.insert_whist_instances,
        )?
        .affected_rows;
        Ok(usize::try_from(inserted).unwrap_or(0))
    }

    /// [`DbClient::transition_instance_status`], fenced.
    pub async fn fenced_transition_instance_status(
        &self,
        fence: &Fence,
        id: &InstanceId,
        from: InstanceStatus,
        to: InstanceStatus,
    ) -> Result<bool, DbError> {
        let variables = fenced_transition_instance_status::Variables {
            fence_name: fence.name.clone(),
            fence_generation: fence.generation,
            id: id.to_string(),
            from: from.as_str().to_owned(),
            to: to.as_str().to_owned(),
        };
        let response = self
            .execute::<FencedTransitionInstanceStatus>(variables)
            .await?;
        Ok(required(
            "FencedTransitionInstanceStatus",
            response.update_whist_instances,
        )?
        .affected_rows
            > 0)
    }

    /// [`DbClient::delete_instance`], fenced.
    pub async fn fenced_delete_instance(
        &self,
        fence: &Fence,
        id: &InstanceId,
    ) -> Result<bool, DbError> {
        let variables = fenced_delete_instance::Variables {
            fence_name: fence.name.clone(),
            fence_generation: fence.generation,
            id: id.to_string(),
        };
        let response = self.execute::<FencedDeleteInstance>(variables).await?;
        Ok(response.delete_whist_instances_by_pk.is_some())
    }

    /// [`DbClient::upsert_image`], fenced.
    pub async fn fenced_upsert_image(&self, fence: &Fence, image: &Image) -> Result<(), DbError> {
        let variables = fenced_upsert_image::Variables {
            fence_name: fence.name.clone(),
            fence_generation: fence.generation,
            provider: image.provider.clone(),
            region: image.region.to_string(),
            image_id: image.image_id.to_string(),
            client_sha: image.client_sha.clone(),
            updated_at: image.updated_at,
        };
        let response = self.execute::<FencedUpsertImage>(variables).await?;
        required("FencedUpsertImage", response.insert_whist_images_one)?;
        Ok(())
    }
}
