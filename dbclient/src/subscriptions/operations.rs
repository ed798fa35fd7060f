//! The typed live queries (documents in `graphql/subscriptions.graphql`).

use graphql_client::GraphQLQuery;

use super::{SnapshotStream, SubscriptionClient};
use crate::types::{
    Image, InstanceId, InstanceStatus, InstanceWithMandelboxes, Mandelbox, MandelboxStatus,
};

// rustfmt re-indents attributes inside macro_rules on every run.
#[rustfmt::skip]
macro_rules! live_query {
    ($name:ident, $response:tt) => {
        #[derive(GraphQLQuery, Debug)]
        #[graphql(
            schema_path = "../schema.graphql",
            query_path = "graphql/subscriptions.graphql",
            custom_scalars_module = "crate::graphql",
            response_type = $response,
            response_derives = "Debug",
            variables_derives = "Debug"
        )]
        pub struct $name;
    };
}

live_query!(
    SubscribeInstance,
    "crate::graphql::InstanceWithMandelboxesRow"
);
live_query!(
    SubscribeInstancesByStatus,
    "crate::graphql::InstanceWithMandelboxesRow"
);
live_query!(
    SubscribeInstances,
    "crate::graphql::InstanceWithMandelboxesRow"
);
live_query!(
    SubscribeMandelboxesOnInstanceWithStatus,
    "crate::graphql::MandelboxRow"
);
live_query!(SubscribeImages, "crate::graphql::ImageRow");

impl SubscriptionClient {
    /// The instance with its mandelboxes; `None` while the row does not exist (e.g. a host
    /// watching for its own DRAINING status).
    pub fn instance(&self, id: &InstanceId) -> SnapshotStream<Option<InstanceWithMandelboxes>> {
        let variables = subscribe_instance::Variables { id: id.to_string() };
        self.subscribe::<SubscribeInstance, _>(variables, |data| data.whist_instances_by_pk)
    }

    /// Every instance in `status`, ordered by id (e.g. the scaling service's DRAINING set).
    pub fn instances_by_status(
        &self,
        status: InstanceStatus,
    ) -> SnapshotStream<Vec<InstanceWithMandelboxes>> {
        let variables = subscribe_instances_by_status::Variables {
            status: status.as_str().to_owned(),
        };
        self.subscribe::<SubscribeInstancesByStatus, _>(variables, |data| data.whist_instances)
    }

    /// Every instance, ordered by id.
    pub fn instances(&self) -> SnapshotStream<Vec<InstanceWithMandelboxes>> {
        self.subscribe::<SubscribeInstances, _>(subscribe_instances::Variables, |data| {
            data.whist_instances
        })
    }

    /// The instance's mandelboxes in `status`, oldest first (e.g. a host's ALLOCATED ones).
    pub fn mandelboxes_on_instance_with_status(
        &self,
        instance_id: &InstanceId,
        status: MandelboxStatus,
    ) -> SnapshotStream<Vec<Mandelbox>> {
        let variables = subscribe_mandelboxes_on_instance_with_status::Variables {
            instance_id: instance_id.to_string(),
            status: status.as_str().to_owned(),
        };
        self.subscribe::<SubscribeMandelboxesOnInstanceWithStatus, _>(variables, |data| {
            data.whist_mandelboxes
        })
    }

    /// Every image row, by provider and region.
    pub fn images(&self) -> SnapshotStream<Vec<Image>> {
        self.subscribe::<SubscribeImages, _>(subscribe_images::Variables, |data| data.whist_images)
    }
}
