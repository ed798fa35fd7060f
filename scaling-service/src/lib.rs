//! whist scaling service (foundation cut): it parses and validates its configuration, connects
//! to Hasura over HTTP and WebSocket and follows the fleet — images, and instances by status —
//! logging what it sees. The event handler, scaling algorithms, EC2 host handler and the assign
//! endpoint come with the scaling-service issue.
//!
//! Reads: `APP_ENV`, `HASURA_GRAPHQL_URL`, `HASURA_ADMIN_SECRET`, `WHIST_REGIONS`, logging
//! settings (see `--help`). Exit codes: 0 after SIGTERM/SIGINT, 1 on a fatal error, 2 on bad
//! configuration.

pub mod config;
pub mod hosts;

use dbclient::types::InstanceStatus;
use dbclient::{DbClient, SubscriptionClient};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

pub use config::Config;

/// Runs until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let db = DbClient::new(&config.db)?;
    let images = db.images().await?;
    tracing::info!(
        images = images.len(),
        url = %config.db.graphql_url(),
        "connected to Hasura"
    );
    let subscriptions = SubscriptionClient::start(&config.db, shutdown.child_token())?;
    let mut instances = subscriptions.instances();
    let mut image_updates = subscriptions.images();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            Some(snapshot) = instances.next() => match snapshot {
                Ok(instances) => {
                    for region in &config.regions {
                        let in_region = instances.iter().filter(|i| &i.instance.region == region);
                        let count = |s: InstanceStatus| {
                            in_region.clone().filter(|i| i.instance.status == s).count()
                        };
                        tracing::info!(
                            region = %region,
                            pre_connection = count(InstanceStatus::PreConnection),
                            active = count(InstanceStatus::Active),
                            draining = count(InstanceStatus::Draining),
                            "fleet"
                        );
                    }
                }
                Err(error) => tracing::warn!(%error, "instances subscription"),
            },
            Some(snapshot) = image_updates.next() => match snapshot {
                Ok(images) => tracing::info!(images = images.len(), "images"),
                Err(error) => tracing::warn!(%error, "images subscription"),
            },
        }
    }
    subscriptions.shutdown().await;
    Ok(())
}
