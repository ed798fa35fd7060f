//! Host attestation's trust-on-first-use record (documents in `graphql/attestations.graphql`,
//! migration 0007): which credential each instance holds, so that a replayed identity document
//! gets none while the instance's credential is live.

use chrono::{DateTime, Utc};
use graphql_client::GraphQLQuery;

use crate::client::DbClient;
use crate::error::DbError;
use crate::types::{InstanceId, MandelboxId};

#[derive(GraphQLQuery, Debug)]
#[graphql(
    schema_path = "../schema.graphql",
    query_path = "graphql/attestations.graphql",
    custom_scalars_module = "crate::graphql",
    response_derives = "Debug",
    variables_derives = "Debug"
)]
pub struct ClaimAttestation;

impl DbClient {
    /// Records `token_id` (expiring at `expires_at`) as `instance`'s credential, if the
    /// instance has none, its credential has expired by the database's clock, or `renewing` is
    /// the id of its current one. `false`: it holds another live credential; nothing changed.
    pub async fn claim_attestation(
        &self,
        instance: &InstanceId,
        token_id: uuid::Uuid,
        expires_at: DateTime<Utc>,
        renewing: Option<uuid::Uuid>,
    ) -> Result<bool, DbError> {
        let variables = claim_attestation::Variables {
            instance_id: instance.to_string(),
            token_id: MandelboxId::from(token_id),
            expires_at,
            // A fresh id matches no row: without a credential to renew, only the expiry counts.
            renewing: MandelboxId::from(renewing.unwrap_or_else(uuid::Uuid::new_v4)),
        };
        let response = self.execute::<ClaimAttestation>(variables).await?;
        Ok(response.insert_whist_host_attestations_one.is_some())
    }
}
