//! Operations on `whist.instances` (documents in `graphql/instances.graphql`).

use graphql_client::GraphQLQuery;

use crate::client::DbClient;
use crate::error::DbError;
use crate::types::{
    ImageId, Instance, InstanceId, InstanceStatus, InstanceWithMandelboxes, NewInstance, Region,
    Registration,
};

// rustfmt re-indents attributes inside macro_rules on every run.
#[rustfmt::skip]
macro_rules! instance_operation {
    ($name:ident, $response:tt) => {
        #[derive(GraphQLQuery, Debug)]
        #[graphql(
            schema_path = "../schema.graphql",
            query_path = "graphql/instances.graphql",
            custom_scalars_module = "crate::graphql",
            response_type = $response,
            response_derives = "Debug",
            variables_derives = "Debug"
        )]
        pub struct $name;
    };
}

instance_operation!(InstanceById, "crate::graphql::InstanceWithMandelboxesRow");
instance_operation!(
    InstancesByStatus,
    "crate::graphql::InstanceWithMandelboxesRow"
);
instance_operation!(
    InstancesInRegion,
    "crate::graphql::InstanceWithMandelboxesRow"
);
instance_operation!(
    InstancesByStatusInRegion,
    "crate::graphql::InstanceWithMandelboxesRow"
);
instance_operation!(
    InstancesByImage,
    "crate::graphql::InstanceWithMandelboxesRow"
);
instance_operation!(InstancesWithCapacity, "crate::graphql::InstanceRow");
instance_operation!(
    InstancesWithWaitingMandelboxes,
    "crate::graphql::InstanceWithMandelboxesRow"
);
instance_operation!(RegisterInstance, "crate::graphql::ReturningInstances");
instance_operation!(TransitionInstanceStatus, "crate::graphql::Affected");
instance_operation!(SetInstanceStatus, "crate::graphql::Affected");
instance_operation!(Heartbeat, "crate::graphql::Affected");
instance_operation!(AddInstanceCapacity, "crate::graphql::Affected");
instance_operation!(DeleteInstance, "crate::graphql::InstanceKey");
instance_operation!(SetInstanceTlsFingerprint, "crate::graphql::Affected");

/// `skip_serializing_none`: a column left out of the insert input gets its database default
/// (an explicit `null` would fail `NOT NULL` on the timestamps).
#[derive(GraphQLQuery, Debug)]
#[graphql(
    schema_path = "../schema.graphql",
    query_path = "graphql/instances.graphql",
    custom_scalars_module = "crate::graphql",
    response_type = "crate::graphql::Affected",
    response_derives = "Debug",
    variables_derives = "Debug, Default",
    skip_serializing_none
)]
pub struct InsertInstances;

/// A mutation root field is nullable in Hasura's schema, but is never null for an admin.
pub(crate) fn required<T>(operation: &'static str, value: Option<T>) -> Result<T, DbError> {
    value.ok_or_else(|| DbError::Decode {
        operation,
        message: "the mutation returned null".to_owned(),
    })
}

fn affected(
    operation: &'static str,
    response: Option<crate::graphql::Affected>,
) -> Result<bool, DbError> {
    Ok(required(operation, response)?.affected_rows > 0)
}

impl DbClient {
    /// The instance with its mandelboxes, `None` if there is no such row.
    pub async fn instance(
        &self,
        id: &InstanceId,
    ) -> Result<Option<InstanceWithMandelboxes>, DbError> {
        let variables = instance_by_id::Variables { id: id.to_string() };
        Ok(self
            .execute::<InstanceById>(variables)
            .await?
            .whist_instances_by_pk)
    }

    /// Every instance in `status`, ordered by id.
    pub async fn instances_by_status(
        &self,
        status: InstanceStatus,
    ) -> Result<Vec<InstanceWithMandelboxes>, DbError> {
        let variables = instances_by_status::Variables {
            status: status.as_str().to_owned(),
        };
        Ok(self
            .execute::<InstancesByStatus>(variables)
            .await?
            .whist_instances)
    }

    /// Every instance in `region`, ordered by id.
    pub async fn instances_in_region(
        &self,
        region: &Region,
    ) -> Result<Vec<InstanceWithMandelboxes>, DbError> {
        let variables = instances_in_region::Variables {
            region: region.to_string(),
        };
        Ok(self
            .execute::<InstancesInRegion>(variables)
            .await?
            .whist_instances)
    }

    /// Every instance in `status` in `region`, ordered by id.
    pub async fn instances_by_status_in_region(
        &self,
        status: InstanceStatus,
        region: &Region,
    ) -> Result<Vec<InstanceWithMandelboxes>, DbError> {
        let variables = instances_by_status_in_region::Variables {
            status: status.as_str().to_owned(),
            region: region.to_string(),
        };
        Ok(self
            .execute::<InstancesByStatusInRegion>(variables)
            .await?
            .whist_instances)
    }

    /// Every instance running `image_id` (any region or status), ordered by id.
    pub async fn instances_by_image(
        &self,
        image_id: &ImageId,
    ) -> Result<Vec<InstanceWithMandelboxes>, DbError> {
        let variables = instances_by_image::Variables {
            image_id: image_id.to_string(),
        };
        Ok(self
            .execute::<InstancesByImage>(variables)
            .await?
            .whist_instances)
    }

    /// ACTIVE instances in `region` on `image_id` with room for a mandelbox, in bin-packing
    /// order: least remaining capacity first, then by id.
    pub async fn instances_with_capacity(
        &self,
        region: &Region,
        image_id: &ImageId,
    ) -> Result<Vec<Instance>, DbError> {
        let variables = instances_with_capacity::Variables {
            region: region.to_string(),
            image_id: image_id.to_string(),
        };
        Ok(self
            .execute::<InstancesWithCapacity>(variables)
            .await?
            .whist_instances)
    }

    /// The `ACTIVE` instances of the region on the image that have `WAITING` (warm) mandelboxes,
    /// each with exactly those rows, oldest first.
    pub async fn instances_with_waiting_mandelboxes(
        &self,
        region: &Region,
        image_id: &ImageId,
    ) -> Result<Vec<InstanceWithMandelboxes>, DbError> {
        let variables = instances_with_waiting_mandelboxes::Variables {
            region: region.to_string(),
            image_id: image_id.to_string(),
        };
        Ok(self
            .execute::<InstancesWithWaitingMandelboxes>(variables)
            .await?
            .whist_instances)
    }

    /// Inserts the rows in one statement (all or nothing); returns how many were inserted.
    pub async fn insert_instances(&self, instances: &[NewInstance]) -> Result<usize, DbError> {
        if instances.is_empty() {
            return Ok(0);
        }
        let objects = instances
            .iter()
            .map(|instance| insert_instances::whist_instances_insert_input {
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
            .collect();
        let response = self
            .execute::<InsertInstances>(insert_instances::Variables { objects })
            .await?;
        let inserted = required("InsertInstances", response.insert_whist_instances)?.affected_rows;
        Ok(usize::try_from(inserted).unwrap_or_default())
    }

    /// A host registers its own row: `PRE_CONNECTION` → `ACTIVE`, setting its address and
    /// capacity, only if the row exists, is still `PRE_CONNECTION` and matches the image,
    /// region and type. Returns the registered row, or `None` when the guard did not hold.
    pub async fn register_instance(
        &self,
        id: &InstanceId,
        registration: &Registration,
    ) -> Result<Option<Instance>, DbError> {
        let variables = register_instance::Variables {
            id: id.to_string(),
            image_id: registration.image_id.to_string(),
            region: registration.region.to_string(),
            instance_type: registration.instance_type.clone(),
            ip_addr: registration.ip_addr,
            remaining_capacity: i64::from(registration.remaining_capacity),
        };
        let response = self.execute::<RegisterInstance>(variables).await?;
        let updated = required("RegisterInstance", response.update_whist_instances)?;
        Ok(updated.returning.into_iter().next())
    }

    /// `from` → `to`, only if the instance is in `from`. Whether it was.
    pub async fn transition_instance_status(
        &self,
        id: &InstanceId,
        from: InstanceStatus,
        to: InstanceStatus,
    ) -> Result<bool, DbError> {
        let variables = transition_instance_status::Variables {
            id: id.to_string(),
            from: from.as_str().to_owned(),
            to: to.as_str().to_owned(),
        };
        let response = self.execute::<TransitionInstanceStatus>(variables).await?;
        affected("TransitionInstanceStatus", response.update_whist_instances)
    }

    /// Sets the status whatever it was. Whether the instance exists.
    pub async fn set_instance_status(
        &self,
        id: &InstanceId,
        to: InstanceStatus,
    ) -> Result<bool, DbError> {
        let variables = set_instance_status::Variables {
            id: id.to_string(),
            to: to.as_str().to_owned(),
        };
        let response = self.execute::<SetInstanceStatus>(variables).await?;
        affected("SetInstanceStatus", response.update_whist_instances)
    }

    /// Publishes the host's json_transport certificate fingerprint (64 lowercase hex digits;
    /// the column's CHECK refuses anything else). Whether the instance exists.
    pub async fn set_instance_tls_fingerprint(
        &self,
        id: &InstanceId,
        fingerprint: &str,
    ) -> Result<bool, DbError> {
        let variables = set_instance_tls_fingerprint::Variables {
            id: id.to_string(),
            fingerprint: fingerprint.to_owned(),
        };
        let response = self.execute::<SetInstanceTlsFingerprint>(variables).await?;
        affected("SetInstanceTlsFingerprint", response.update_whist_instances)
    }

    /// Touches `updated_at` (set to the database's clock by the row trigger). Whether the
    /// instance exists.
    pub async fn heartbeat(&self, id: &InstanceId) -> Result<bool, DbError> {
        let variables = heartbeat::Variables {
            id: id.to_string(),
            now: chrono::Utc::now(),
        };
        let response = self.execute::<Heartbeat>(variables).await?;
        affected("Heartbeat", response.update_whist_instances)
    }

    /// Adds `delta` (may be negative) to `remaining_capacity` atomically. Whether the instance
    /// exists; a result below zero fails with [`DbError::CheckViolation`] and changes nothing.
    pub async fn add_instance_capacity(
        &self,
        id: &InstanceId,
        delta: i32,
    ) -> Result<bool, DbError> {
        let variables = add_instance_capacity::Variables {
            id: id.to_string(),
            delta: i64::from(delta),
        };
        let response = self.execute::<AddInstanceCapacity>(variables).await?;
        affected("AddInstanceCapacity", response.update_whist_instances)
    }

    /// Deletes the instance and (by cascade) its mandelboxes. Whether it existed.
    pub async fn delete_instance(&self, id: &InstanceId) -> Result<bool, DbError> {
        let variables = delete_instance::Variables { id: id.to_string() };
        let response = self.execute::<DeleteInstance>(variables).await?;
        Ok(response.delete_whist_instances_by_pk.is_some())
    }
}
