//! Assignment in one round trip (`graphql/assign.graphql`): the tracked function
//! `whist.assign_mandelbox` checks the user's limit, chooses the host and claims a warm box or a
//! new slot in one transaction. Concurrent requests never get one mandelbox or slot twice, and a
//! user's concurrent requests are serialised, so the per-user limit is exact.

use std::net::IpAddr;

use graphql_client::GraphQLQuery;
use serde::Deserialize;

use crate::client::DbClient;
use crate::error::DbError;
use crate::types::{InstanceId, MandelboxId, Region, UserId};

#[derive(GraphQLQuery, Debug)]
#[graphql(
    schema_path = "../schema.graphql",
    query_path = "graphql/assign.graphql",
    custom_scalars_module = "crate::graphql",
    response_type = "crate::assign::AssignRow",
    response_derives = "Debug",
    variables_derives = "Debug"
)]
pub struct AssignMandelbox;

/// What an assignment asks for.
#[derive(Debug, Clone)]
pub struct AssignParams<'a> {
    /// The images' and instances' provider (`AWS`).
    pub provider: &'a str,
    pub user_id: &'a UserId,
    pub session_id: Option<&'a str>,
    /// In the client's order: the first region with a free slot serves.
    pub regions: &'a [Region],
    pub client_commit: &'a str,
    /// Take each region's image commit as the wanted one (local development's `local_dev`).
    pub any_commit: bool,
    /// The most mandelboxes (not `DYING`) a user may hold.
    pub mandelbox_limit: u32,
    pub app: &'a str,
    /// The id of the row a cold assignment inserts.
    pub new_mandelbox_id: MandelboxId,
}

/// A granted assignment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assigned {
    pub region: Region,
    pub mandelbox_id: MandelboxId,
    pub instance_id: InstanceId,
    pub ip_addr: IpAddr,
    pub tls_fingerprint: String,
    /// A warm (`WAITING`) box was claimed, rather than a new slot taken.
    pub warm: bool,
}

/// What an assignment ended in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AssignOutcome {
    Assigned(Assigned),
    /// The user already holds `mandelbox_limit` mandelboxes.
    UserAlreadyActive,
    /// Only hosts of another client commit could have served.
    CommitHashMismatch,
    NoInstanceAvailable,
}

/// `whist_assign_results` as the function answers it.
#[derive(Debug, Clone, Deserialize)]
pub struct AssignRow {
    outcome: String,
    region: Option<String>,
    mandelbox_id: Option<MandelboxId>,
    instance_id: Option<String>,
    #[serde(with = "crate::types::inet_serde", default)]
    ip_addr: Option<IpAddr>,
    tls_fingerprint: Option<String>,
    warm: Option<bool>,
}

impl AssignRow {
    fn outcome(self) -> Result<AssignOutcome, String> {
        Ok(match self.outcome.as_str() {
            "USER_ALREADY_ACTIVE" => AssignOutcome::UserAlreadyActive,
            "COMMIT_HASH_MISMATCH" => AssignOutcome::CommitHashMismatch,
            "NO_INSTANCE_AVAILABLE" => AssignOutcome::NoInstanceAvailable,
            "OK" => {
                let missing = |what: &str| format!("an OK row without {what}");
                AssignOutcome::Assigned(Assigned {
                    region: Region::new(self.region.ok_or_else(|| missing("region"))?)
                        .map_err(|e| e.to_string())?,
                    mandelbox_id: self.mandelbox_id.ok_or_else(|| missing("mandelbox_id"))?,
                    instance_id: InstanceId::new(
                        self.instance_id.ok_or_else(|| missing("instance_id"))?,
                    )
                    .map_err(|e| e.to_string())?,
                    ip_addr: self.ip_addr.ok_or_else(|| missing("ip_addr"))?,
                    tls_fingerprint: self
                        .tls_fingerprint
                        .ok_or_else(|| missing("tls_fingerprint"))?,
                    warm: self.warm.unwrap_or(false),
                })
            }
            other => return Err(format!("unknown outcome {other:?}")),
        })
    }
}

impl DbClient {
    /// Assigns a mandelbox in one request (see the module doc).
    pub async fn assign_mandelbox(
        &self,
        params: &AssignParams<'_>,
    ) -> Result<AssignOutcome, DbError> {
        let regions: Vec<&str> = params.regions.iter().map(Region::as_str).collect();
        let variables = assign_mandelbox::Variables {
            provider: params.provider.to_owned(),
            user_id: params.user_id.to_string(),
            session_id: params.session_id.map(str::to_owned),
            regions: regions.join(","),
            client_commit: params.client_commit.to_owned(),
            any_commit: params.any_commit,
            mandelbox_limit: i64::from(params.mandelbox_limit),
            app: params.app.to_owned(),
            new_mandelbox_id: params.new_mandelbox_id,
        };
        let response = self.execute::<AssignMandelbox>(variables).await?;
        let decode = |message: String| DbError::Decode {
            operation: "AssignMandelbox",
            message,
        };
        let mut rows = response.whist_assign_mandelbox.into_iter();
        match (rows.next(), rows.next()) {
            (Some(row), None) => row.outcome().map_err(decode),
            (None, _) => Err(decode("no row".into())),
            (Some(_), Some(_)) => Err(decode("more than one row".into())),
        }
    }
}
