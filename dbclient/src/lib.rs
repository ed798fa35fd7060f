//! `dbclient`: the typed Hasura client both whist services use to reach the `whist` database.
//!
//! Services never talk to PostgreSQL directly (DESIGN.md, decision 1). Everything goes through
//! Hasura's GraphQL API:
//!
//! - [`DbClient`]: queries and mutations over HTTP (`POST /v1/graphql`, reqwest over rustls,
//!   `x-hasura-admin-secret`, a timeout on every call). One method per operation; the operations
//!   are `.graphql` documents under `dbclient/graphql/`, checked by `graphql_client` at compile
//!   time against the workspace's `schema.graphql`.
//! - [`SubscriptionClient`]: live-query subscriptions over one WebSocket
//!   (`graphql-transport-ws`), reconnected with backoff and resubscribed forever, delivering
//!   typed full snapshots.
//! - [`types`]: validated identifiers, the status enums (unknown values are rejected) and the
//!   rows.
//! - [`DbError`]: what went wrong, told apart the way callers need it (network, HTTP, access
//!   denied, constraint and CHECK violations, not found, other GraphQL errors, undecodable
//!   payloads). Hasura reports errors with HTTP 200; see [`error`] for the mapping.
//!
//! The admin secret is a [`logger::Secret`]: it never appears in `Debug` output, errors or logs.
//!
//! ```no_run
//! use dbclient::{DbClient, DbConfig, InstanceId, MandelboxStatus, SubscriptionClient};
//! use futures::StreamExt;
//!
//! # async fn example(secret: logger::Secret<String>, shutdown: tokio_util::sync::CancellationToken) -> anyhow::Result<()> {
//! let config = DbConfig::new("https://hasura.example/v1/graphql", Some(secret))?;
//! let db = DbClient::new(&config)?;
//! let me: InstanceId = "i-0a1b2c3d4e5f67890".parse()?;
//! db.heartbeat(&me).await?;
//!
//! let subscriptions = SubscriptionClient::start(&config, shutdown)?;
//! let mut allocated =
//!     subscriptions.mandelboxes_on_instance_with_status(&me, MandelboxStatus::Allocated);
//! while let Some(snapshot) = allocated.next().await {
//!     match snapshot {
//!         // The whole current set, every time: act on what is there.
//!         Ok(mandelboxes) => {
//!             for mandelbox in mandelboxes {
//!                 let claimed = db
//!                     .transition_mandelbox_status(
//!                         &mandelbox.id,
//!                         MandelboxStatus::Allocated,
//!                         MandelboxStatus::Connecting,
//!                     )
//!                     .await?;
//!                 if let Some(mandelbox) = claimed { /* spin it up */ }
//!             }
//!         }
//!         // An undecodable row, an outage, a rejected secret: the stream goes on.
//!         Err(error) => tracing::warn!(%error, "allocated-mandelbox subscription"),
//!     }
//! }
//! # Ok(()) }
//! ```

pub mod assign;
pub mod attestations;
pub mod client;
pub mod config;
pub mod error;
pub mod fenced;
pub mod graphql;
pub mod images;
pub mod instances;
pub mod launches;
pub mod leases;
pub mod mandelboxes;
pub mod release;
pub mod subscriptions;
mod tls;
pub mod types;

pub use client::{BearerToken, DbClient};
pub use config::{ConfigError, DbConfig};
pub use error::{ConstraintKind, DbError, NetworkErrorKind};
pub use launches::{LaunchRecord, NewLaunchRecord};
pub use subscriptions::{ConnectionState, SnapshotStream, SubscriptionClient};
pub use types::{
    Image, ImageId, Instance, InstanceId, InstanceStatus, InstanceWithMandelboxes, Mandelbox,
    MandelboxId, MandelboxStatus, NewInstance, NewMandelbox, ParseError, Region, Registration,
    UserId,
};

#[cfg(test)]
mod tests {
    use super::*;

    fn shareable<T: Send + Sync + 'static>() {}

    #[test]
    fn handles_streams_and_errors_can_cross_tasks() {
        shareable::<DbClient>();
        shareable::<SubscriptionClient>();
        shareable::<SnapshotStream<Vec<InstanceWithMandelboxes>>>();
        shareable::<DbError>();
        shareable::<ConfigError>();
        shareable::<ConnectionState>();
    }
}
