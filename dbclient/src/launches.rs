//! Launch records (documents in `graphql/launches.graphql`): the scaling service writes one
//! before it asks the cloud for instances and deletes it once the instances' rows are in, so a
//! launch interrupted by a crash can be resumed (the launch id is a tag on every instance, and a
//! launch is idempotent per id) instead of its instances being terminated as orphans.

use chrono::{DateTime, Utc};
use graphql_client::GraphQLQuery;
use serde::Deserialize;

use crate::client::DbClient;
use crate::error::DbError;
use crate::instances::required;
use crate::types::{ImageId, NewInstance, Region};

// rustfmt re-indents attributes inside macro_rules on every run.
#[rustfmt::skip]
macro_rules! launch_operation {
    ($name:ident, $response:tt) => {
        #[derive(GraphQLQuery, Debug)]
        #[graphql(
            schema_path = "../schema.graphql",
            query_path = "graphql/launches.graphql",
            custom_scalars_module = "crate::graphql",
            response_type = $response,
            response_derives = "Debug",
            variables_derives = "Debug"
        )]
        pub struct $name;
    };
}

launch_operation!(InsertLaunchRecord, "crate::launches::LaunchRecord");
launch_operation!(DeleteLaunchRecord, "crate::launches::LaunchKey");
launch_operation!(LaunchRecordsInRegion, "crate::launches::LaunchRecord");

/// `skip_serializing_none`: a column left out of the insert input gets its database default.
#[derive(GraphQLQuery, Debug)]
#[graphql(
    schema_path = "../schema.graphql",
    query_path = "graphql/launches.graphql",
    custom_scalars_module = "crate::graphql",
    response_type = "crate::graphql::Affected",
    response_derives = "Debug",
    variables_derives = "Debug, Default",
    skip_serializing_none
)]
pub struct InsertLaunchedInstances;

/// A launch to record (the database stamps `created_at`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewLaunchRecord {
    /// Unique per launch; the `whist-launch-id` tag of its instances.
    pub launch_id: String,
    pub region: Region,
    pub image_id: ImageId,
    pub instance_type: String,
    /// Instances asked for (at least 1).
    pub count: u32,
    /// The commit written into the instances' rows.
    pub client_sha: String,
}

/// A launch in flight, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct LaunchRecord {
    pub launch_id: String,
    pub region: Region,
    pub image_id: ImageId,
    pub instance_type: String,
    pub count: u32,
    pub client_sha: String,
    pub created_at: DateTime<Utc>,
}

/// `{ launch_id }` of a deleted record.
#[derive(Debug, Clone, Deserialize)]
pub struct LaunchKey {
    pub launch_id: String,
}

impl DbClient {
    /// Records a launch before anything is launched. A launch id already recorded fails with
    /// [`DbError::ConstraintViolation`] (`scaling_launches_pkey`); an empty id, region, image or
    /// type, or a zero count, with [`DbError::CheckViolation`].
    pub async fn insert_launch_record(
        &self,
        record: &NewLaunchRecord,
    ) -> Result<LaunchRecord, DbError> {
        let variables = insert_launch_record::Variables {
            launch_id: record.launch_id.clone(),
            region: record.region.to_string(),
            image_id: record.image_id.to_string(),
            instance_type: record.instance_type.clone(),
            count: i64::from(record.count),
            client_sha: record.client_sha.clone(),
        };
        let response = self.execute::<InsertLaunchRecord>(variables).await?;
        required(
            "InsertLaunchRecord",
            response.insert_whist_scaling_launches_one,
        )
    }

    /// Deletes the record of a launch that is done (rows inserted) or cleaned up. Whether it
    /// existed.
    pub async fn delete_launch_record(&self, launch_id: &str) -> Result<bool, DbError> {
        let variables = delete_launch_record::Variables {
            launch_id: launch_id.to_owned(),
        };
        let response = self.execute::<DeleteLaunchRecord>(variables).await?;
        Ok(response.delete_whist_scaling_launches_by_pk.is_some())
    }

    /// The launches recorded in `region`, oldest first.
    pub async fn launch_records_in_region(
        &self,
        region: &Region,
    ) -> Result<Vec<LaunchRecord>, DbError> {
        let variables = launch_records_in_region::Variables {
            region: region.to_string(),
        };
        Ok(self
            .execute::<LaunchRecordsInRegion>(variables)
            .await?
            .whist_scaling_launches)
    }

    /// Inserts the rows of a launch's instances in one statement, leaving alone the rows that
    /// exist already (a resumed launch may have inserted some before it was interrupted, and
    /// their hosts may have registered since). Returns how many rows were inserted.
    pub async fn insert_launched_instances(
        &self,
        instances: &[NewInstance],
    ) -> Result<usize, DbError> {
        if instances.is_empty() {
            return Ok(0);
        }
        let objects = instances
            .iter()
            .map(
                |instance| insert_launched_instances::whist_instances_insert_input {
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
                },
            )
            .collect();
        let response = self
            .execute::<InsertLaunchedInstances>(insert_launched_instances::Variables { objects })
            .await?;
        let inserted =
            required("InsertLaunchedInstances", response.insert_whist_instances)?.affected_rows;
        Ok(usize::try_from(inserted).unwrap_or_default())
    }
}
