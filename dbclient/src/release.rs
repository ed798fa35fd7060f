//! Releasing a mandelbox (documents in `graphql/release.graphql`): its row removed and its unit
//! of capacity given back to the instance in one request, one transaction, exactly once however
//! many releases of the row race (the mandelbox's task, the sweeper, a restart's reconcile).

use chrono::{DateTime, Utc};
use graphql_client::GraphQLQuery;

use crate::client::DbClient;
use crate::error::DbError;
use crate::instances::required;
use crate::types::{InstanceId, MandelboxId, MandelboxStatus};

// rustfmt re-indents attributes inside macro_rules on every run.
#[rustfmt::skip]
macro_rules! release_operation {
    ($name:ident) => {
        #[derive(GraphQLQuery, Debug)]
        #[graphql(
            schema_path = "../schema.graphql",
            query_path = "graphql/release.graphql",
            custom_scalars_module = "crate::graphql",
            response_derives = "Debug",
            variables_derives = "Debug"
        )]
        pub struct $name;
    };
}

release_operation!(ReleaseMandelbox);
release_operation!(ReleaseStrandedMandelbox);

impl DbClient {
    /// Removes the mandelbox's row on `instance_id` and gives its unit of capacity back, both or
    /// neither. Whether this call removed it (`false`: it was gone already; nothing changed).
    pub async fn release_mandelbox(
        &self,
        instance_id: &InstanceId,
        id: &MandelboxId,
    ) -> Result<bool, DbError> {
        let variables = release_mandelbox::Variables {
            id: *id,
            instance_id: instance_id.to_string(),
        };
        let response = self.execute::<ReleaseMandelbox>(variables).await?;
        let removed = required("ReleaseMandelbox", response.remove)?.affected_rows;
        Ok(removed > 0)
    }

    /// [`DbClient::release_mandelbox`] for a row found stranded in `seen_status` at
    /// `seen_updated_at`: nothing changes if it has changed since (a task took it up), unless
    /// it is being torn down anyway (DYING). Whether this call removed it.
    pub async fn release_stranded_mandelbox(
        &self,
        instance_id: &InstanceId,
        id: &MandelboxId,
        seen_status: MandelboxStatus,
        seen_updated_at: DateTime<Utc>,
    ) -> Result<bool, DbError> {
        let variables = release_stranded_mandelbox::Variables {
            id: *id,
            instance_id: instance_id.to_string(),
            seen_status: seen_status.as_str().to_owned(),
            seen_updated_at,
        };
        let response = self.execute::<ReleaseStrandedMandelbox>(variables).await?;
        let removed = required("ReleaseStrandedMandelbox", response.remove)?.affected_rows;
        Ok(removed > 0)
    }
}
