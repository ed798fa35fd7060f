//! Leader leases (documents in `graphql/leases.graphql`): replicas of a service share a named
//! lease row; only its live holder acts. Expiry is the database's clock (migration 0006), and
//! every change of holder gives the lease a new generation, the [`crate::fenced::Fence`] its
//! holder's writes carry.

use std::time::Duration;

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
    /// Grows every time the lease changes hands.
    pub generation: i64,
}

impl DbClient {
    /// Takes the lease `name` for `holder` for `ttl` from the database's now(), if it is free,
    /// already `holder`'s, or expired by the database's clock. The lease's generation if
    /// `holder` holds it afterwards (the same while `holder` keeps renewing it). Atomic: of
    /// two replicas racing for a free or expired lease, exactly one gets it.
    pub async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Option<i64>, DbError> {
        let variables = acquire_lease::Variables {
            name: name.to_owned(),
            holder: holder.to_owned(),
            ttl_ms: i64::try_from(ttl.as_millis())
                .unwrap_or(i64::from(i32::MAX))
                .clamp(1, i64::from(i32::MAX)),
        };
        let response = self.execute::<AcquireLease>(variables).await?;
        Ok(response
            .insert_whist_scaling_leases_one
            .filter(|row| row.holder == holder)
            .map(|row| row.generation))
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
            generation: row.generation,
        }))
    }
}
