//! Operations on `whist.mandelboxes` (documents in `graphql/mandelboxes.graphql`).

use chrono::{DateTime, Utc};
use graphql_client::GraphQLQuery;

use crate::client::DbClient;
use crate::error::{ConstraintKind, DbError};
use crate::instances::required;
use crate::types::{InstanceId, Mandelbox, MandelboxId, MandelboxStatus, NewMandelbox, UserId};

// rustfmt re-indents attributes inside macro_rules on every run.
#[rustfmt::skip]
macro_rules! mandelbox_operation {
    ($name:ident, $response:tt) => {
        #[derive(GraphQLQuery, Debug)]
        #[graphql(
            schema_path = "../schema.graphql",
            query_path = "graphql/mandelboxes.graphql",
            custom_scalars_module = "crate::graphql",
            response_type = $response,
            response_derives = "Debug",
            variables_derives = "Debug"
        )]
        pub struct $name;
    };
}

mandelbox_operation!(MandelboxById, "crate::graphql::MandelboxRow");
mandelbox_operation!(MandelboxesOnInstance, "crate::graphql::MandelboxRow");
mandelbox_operation!(
    MandelboxesOnInstanceWithStatus,
    "crate::graphql::MandelboxRow"
);
mandelbox_operation!(MandelboxesOfUser, "crate::graphql::MandelboxRow");
mandelbox_operation!(InsertMandelbox, "crate::graphql::MandelboxRow");
mandelbox_operation!(
    TransitionMandelboxStatus,
    "crate::graphql::ReturningMandelboxes"
);
mandelbox_operation!(
    ClaimWaitingMandelbox,
    "crate::graphql::ReturningMandelboxes"
);
mandelbox_operation!(DeleteAllocatedMandelbox, "crate::graphql::Affected");
mandelbox_operation!(DeleteMandelbox, "crate::graphql::MandelboxKey");
mandelbox_operation!(
    DeleteStaleMandelboxes,
    "crate::graphql::ReturningMandelboxKeys"
);

/// Three root fields, so the response is generated (`response_type` needs exactly one).
#[derive(GraphQLQuery, Debug)]
#[graphql(
    schema_path = "../schema.graphql",
    query_path = "graphql/mandelboxes.graphql",
    custom_scalars_module = "crate::graphql",
    response_derives = "Debug",
    variables_derives = "Debug"
)]
pub struct AllocateMandelbox;

/// The CHECK that `AllocateMandelbox` relies on to abort when the instance cannot take one more.
const CAPACITY_CHECK: &str = "instances_remaining_capacity_check";

impl DbClient {
    /// The mandelbox, `None` if there is no such row.
    pub async fn mandelbox(&self, id: &MandelboxId) -> Result<Option<Mandelbox>, DbError> {
        let variables = mandelbox_by_id::Variables { id: *id };
        Ok(self
            .execute::<MandelboxById>(variables)
            .await?
            .whist_mandelboxes_by_pk)
    }

    /// Every mandelbox on the instance, oldest first.
    pub async fn mandelboxes_on_instance(
        &self,
        instance_id: &InstanceId,
    ) -> Result<Vec<Mandelbox>, DbError> {
        let variables = mandelboxes_on_instance::Variables {
            instance_id: instance_id.to_string(),
        };
        Ok(self
            .execute::<MandelboxesOnInstance>(variables)
            .await?
            .whist_mandelboxes)
    }

    /// The mandelboxes on the instance in `status`, oldest first.
    pub async fn mandelboxes_on_instance_with_status(
        &self,
        instance_id: &InstanceId,
        status: MandelboxStatus,
    ) -> Result<Vec<Mandelbox>, DbError> {
        let variables = mandelboxes_on_instance_with_status::Variables {
            instance_id: instance_id.to_string(),
            status: status.as_str().to_owned(),
        };
        Ok(self
            .execute::<MandelboxesOnInstanceWithStatus>(variables)
            .await?
            .whist_mandelboxes)
    }

    /// Every mandelbox assigned to the user (any instance), oldest first.
    pub async fn mandelboxes_of_user(&self, user_id: &UserId) -> Result<Vec<Mandelbox>, DbError> {
        let variables = mandelboxes_of_user::Variables {
            user_id: user_id.to_string(),
        };
        Ok(self
            .execute::<MandelboxesOfUser>(variables)
            .await?
            .whist_mandelboxes)
    }

    /// Inserts the row as given (no capacity bookkeeping; see
    /// [`DbClient::allocate_mandelbox`]) and returns it with its timestamps.
    pub async fn insert_mandelbox(&self, mandelbox: &NewMandelbox) -> Result<Mandelbox, DbError> {
        let variables = insert_mandelbox::Variables {
            id: mandelbox.id,
            app: mandelbox.app.clone(),
            instance_id: mandelbox.instance_id.to_string(),
            user_id: mandelbox.user_id.as_ref().map(ToString::to_string),
            session_id: mandelbox.session_id.clone(),
            status: mandelbox.status.as_str().to_owned(),
        };
        let response = self.execute::<InsertMandelbox>(variables).await?;
        required("InsertMandelbox", response.insert_whist_mandelboxes_one)
    }

    /// Assigns a mandelbox to an instance atomically: inserts it as `ALLOCATED` (whatever
    /// `mandelbox.status` says) and takes one unit of the instance's `remaining_capacity`, in one
    /// request and therefore one transaction.
    ///
    /// `Ok(None)` — and nothing changed — when the instance is not `ACTIVE`, has no capacity left
    /// or does not exist. Two callers racing for the last unit: exactly one gets the mandelbox.
    pub async fn allocate_mandelbox(
        &self,
        mandelbox: &NewMandelbox,
    ) -> Result<Option<Mandelbox>, DbError> {
        self.insert_with_capacity(mandelbox, MandelboxStatus::Allocated)
            .await
    }

    /// A host's warm box: inserts the row as `WAITING` (whatever `mandelbox.status` says) and
    /// takes its unit of `remaining_capacity`, atomically like
    /// [`DbClient::allocate_mandelbox`]. The unit stays with the row when it is claimed
    /// ([`DbClient::claim_waiting_mandelbox`]) and comes back when the row is torn down.
    /// `Ok(None)` — nothing changed — when the instance is not `ACTIVE` or full.
    pub async fn insert_waiting_mandelbox(
        &self,
        mandelbox: &NewMandelbox,
    ) -> Result<Option<Mandelbox>, DbError> {
        self.insert_with_capacity(mandelbox, MandelboxStatus::Waiting)
            .await
    }

    async fn insert_with_capacity(
        &self,
        mandelbox: &NewMandelbox,
        status: MandelboxStatus,
    ) -> Result<Option<Mandelbox>, DbError> {
        const OPERATION: &str = "AllocateMandelbox";
        let variables = allocate_mandelbox::Variables {
            id: mandelbox.id,
            app: mandelbox.app.clone(),
            instance_id: mandelbox.instance_id.to_string(),
            user_id: mandelbox.user_id.as_ref().map(ToString::to_string),
            session_id: mandelbox.session_id.clone(),
            status: status.as_str().to_owned(),
        };
        let response = match self.execute::<AllocateMandelbox>(variables).await {
            Ok(response) => response,
            // No capacity, or not ACTIVE: the CHECK aborted the whole request.
            Err(DbError::CheckViolation { constraint, .. })
                if constraint
                    .as_deref()
                    .is_none_or(|name| name == CAPACITY_CHECK) =>
            {
                return Ok(None);
            }
            // No such instance.
            Err(DbError::ConstraintViolation {
                kind: ConstraintKind::ForeignKey,
                ..
            }) => return Ok(None),
            Err(error) => return Err(error),
        };
        let row = required(OPERATION, response.insert_whist_mandelboxes_one)?;
        let taken = required(OPERATION, response.take_capacity)?.affected_rows;
        if taken != 1 {
            // Unreachable while `reject_inactive_instance` guards the request; if a server ever
            // let it through, undo the insert rather than leave an ALLOCATED row behind.
            tracing::warn!(
                mandelbox.id = %mandelbox.id,
                instance.id = %mandelbox.instance_id,
                "allocation took no capacity; removing the row again"
            );
            let undo = delete_allocated_mandelbox::Variables { id: mandelbox.id };
            self.execute::<DeleteAllocatedMandelbox>(undo).await?;
            return Ok(None);
        }
        Ok(Some(Mandelbox {
            id: row.id,
            app: row.app,
            instance_id: decode(OPERATION, InstanceId::new(row.instance_id))?,
            user_id: row
                .user_id
                .map(UserId::new)
                .transpose()
                .map_err(|error| decode_error(OPERATION, error))?,
            session_id: row.session_id,
            status: decode(OPERATION, row.status.parse())?,
            created_at: row.created_at,
            updated_at: row.updated_at,
        }))
    }

    /// Turns the instance's `WAITING` row `id` into the user's `ALLOCATED` row (user, session;
    /// `updated_at` is the claim's time) with one guarded update, only while the instance is
    /// `ACTIVE`. Of racing claimers of one row exactly one gets `Some`; the others `None`, and
    /// nothing changed for them. Capacity is untouched: the WAITING row already held its unit.
    pub async fn claim_waiting_mandelbox(
        &self,
        instance_id: &InstanceId,
        id: &MandelboxId,
        user_id: &UserId,
        session_id: Option<&str>,
    ) -> Result<Option<Mandelbox>, DbError> {
        let variables = claim_waiting_mandelbox::Variables {
            id: *id,
            instance_id: instance_id.to_string(),
            user_id: user_id.to_string(),
            session_id: session_id.map(str::to_owned),
        };
        let response = self.execute::<ClaimWaitingMandelbox>(variables).await?;
        let updated = required("ClaimWaitingMandelbox", response.update_whist_mandelboxes)?;
        Ok(updated.returning.into_iter().next())
    }

    /// Claims one of the instance's `WAITING` rows for the user (oldest first; a row another
    /// claimer took in between is skipped). `None` when none is left.
    pub async fn claim_any_waiting_mandelbox(
        &self,
        instance_id: &InstanceId,
        user_id: &UserId,
        session_id: Option<&str>,
    ) -> Result<Option<Mandelbox>, DbError> {
        let waiting = self
            .mandelboxes_on_instance_with_status(instance_id, MandelboxStatus::Waiting)
            .await?;
        for candidate in &waiting {
            if let Some(claimed) = self
                .claim_waiting_mandelbox(instance_id, &candidate.id, user_id, session_id)
                .await?
            {
                return Ok(Some(claimed));
            }
        }
        Ok(None)
    }

    /// `from` → `to`, only if the mandelbox is in `from` (e.g. the host's `ALLOCATED` →
    /// `CONNECTING` claim: of several racing claimers exactly one gets `Some`). The updated row,
    /// or `None` when the guard did not hold.
    pub async fn transition_mandelbox_status(
        &self,
        id: &MandelboxId,
        from: MandelboxStatus,
        to: MandelboxStatus,
    ) -> Result<Option<Mandelbox>, DbError> {
        let variables = transition_mandelbox_status::Variables {
            id: *id,
            from: from.as_str().to_owned(),
            to: to.as_str().to_owned(),
        };
        let response = self.execute::<TransitionMandelboxStatus>(variables).await?;
        let updated = required(
            "TransitionMandelboxStatus",
            response.update_whist_mandelboxes,
        )?;
        Ok(updated.returning.into_iter().next())
    }

    /// Deletes the mandelbox. Whether it existed.
    pub async fn delete_mandelbox(&self, id: &MandelboxId) -> Result<bool, DbError> {
        let variables = delete_mandelbox::Variables { id: *id };
        let response = self.execute::<DeleteMandelbox>(variables).await?;
        Ok(response.delete_whist_mandelboxes_by_pk.is_some())
    }

    /// Deletes the instance's mandelboxes that have been in `status` since before
    /// `updated_before` (e.g. ALLOCATED rows no client ever connected to); returns their ids.
    pub async fn delete_stale_mandelboxes(
        &self,
        instance_id: &InstanceId,
        status: MandelboxStatus,
        updated_before: DateTime<Utc>,
    ) -> Result<Vec<MandelboxId>, DbError> {
        let variables = delete_stale_mandelboxes::Variables {
            instance_id: instance_id.to_string(),
            status: status.as_str().to_owned(),
            updated_before,
        };
        let response = self.execute::<DeleteStaleMandelboxes>(variables).await?;
        let deleted = required("DeleteStaleMandelboxes", response.delete_whist_mandelboxes)?;
        Ok(deleted.returning.into_iter().map(|row| row.id).collect())
    }
}

fn decode_error(operation: &'static str, error: crate::types::ParseError) -> DbError {
    DbError::Decode {
        operation,
        message: error.to_string(),
    }
}

fn decode<T>(
    operation: &'static str,
    value: Result<T, crate::types::ParseError>,
) -> Result<T, DbError> {
    value.map_err(|error| decode_error(operation, error))
}
