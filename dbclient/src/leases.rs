//! Leader leases (documents in `graphql/leases.graphql`): replicas of a service share a named
//! lease row; only its live holder acts.

use chrono::{DateTime, Utc};
use graphql_client::GraphQLQuery;

use crate::client::DbClient;
use crate::error::DbError;
use crate::instances::required;

// rustfmt re-indents attributes inside macro_rules on every run.
#[rustfmt::skip]
macro_rules! lease_operation {
    ($name:ident) => {
        #[derive(GraphQLQuery, Debug)]
        #[graphql(
            schema_path = "../schema.graphql",
            query_path = "graphql/leases.graphql",
            custom_scalars_module = "crate::graphql",
            response_derives = "Debug",
            variables_derives = "Debug"
        )]
        pub struct $name;
    };
}

lease_operation!(AcquireLease);
lease_operation!(ReleaseLease);
lease_operation!(LeaseByName);

/// A lease row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub name: String,
    pub holder: String,
    pub expires_at: DateTime<Utc>,
}

impl DbClient {
    /// Takes the lease `name` for `holder` until `expires_at`, if it is free, already
    /// `holder`'s, or expired at `now`. Whether `holder` holds it afterwards. Atomic: of two
    /// replicas racing for a free or expired lease, exactly one gets `true`.
    pub async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        now: DateTime<Utc>,
        expires_at: DateTime<Utc>,
    ) -> Result<bool, DbError> {
        let variables = acquire_lease::Variables {
            name: name.to_owned(),
            holder: holder.to_owned(),
            now,
            expires_at,
        };
        let response = self.execute::<AcquireLease>(variables).await?;
        Ok(response
            .insert_whist_scaling_leases_one
            .is_some_and(|row| row.holder == holder))
    }

    /// Gives the lease up if `holder` holds it. Whether it did.
    pub async fn release_lease(&self, name: &str, holder: &str) -> Result<bool, DbError> {
        let variables = release_lease::Variables {
            name: name.to_owned(),
            holder: holder.to_owned(),
        };
        let response = self.execute::<ReleaseLease>(variables).await?;
        Ok(required("ReleaseLease", response.delete_whist_scaling_leases)?.affected_rows > 0)
    }

    /// The lease row, `None` if nobody ever took it.
    pub async fn lease(&self, name: &str) -> Result<Option<Lease>, DbError> {
        let variables = lease_by_name::Variables {
            name: name.to_owned(),
        };
        let response = self.execute::<LeaseByName>(variables).await?;
        Ok(response.whist_scaling_leases_by_pk.map(|row| Lease {
            name: row.name,
            holder: row.holder,
            expires_at: row.expires_at,
        }))
    }
}
