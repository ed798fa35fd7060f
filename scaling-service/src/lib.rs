//! whist scaling service: keeps each region's fleet of hosts the right size.
//!
//! An event handler turns the database's live queries (instances, images) and a scheduler
//! into events, routed over bounded channels to one [`region::RegionController`] per region.
//! Each owns its region's [`algorithm::ScalingAlgorithm`] and handles its events one at a time:
//! it reads the region from the database, asks the algorithm for a plan, and carries it out
//! through a [`hosts::HostHandler`] and `dbclient`. `simulate` and `compare` (see
//! [`simulation`]) run the algorithms offline against session traces in simulated time.
//!
//! Reads: `APP_ENV`, `HASURA_GRAPHQL_URL`, `HASURA_ADMIN_SECRET`, `WHIST_REGIONS`, the cloud
//! (`WHIST_CLOUD`, `AWS_ENDPOINT_URL`, `WHIST_HOST_*`, `WHIST_HOST_JSON_TRANSPORT_*` for the
//! json_transport forwarding), logging settings (see `--help`). Exit
//! codes: 0 after SIGTERM/SIGINT, 1 on a fatal error, 2 on bad configuration.

pub mod admission;
pub mod algorithm;
pub mod api;
pub mod attest;
pub mod auth;
pub mod config;
pub mod controller;
pub mod forward;
pub mod hosts;
pub mod lease;
pub mod listener;
pub mod metrics;
pub mod region;
pub mod simulation;

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Context as _;
use dbclient::types::Region;
use dbclient::{DbClient, SubscriptionClient};
use futures::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admission::Admission;
use crate::algorithm::{AlgorithmConfig, mandelbox_capacity};
use crate::api::{ApiState, Assigner};
use crate::auth::{JwksVerifier, StaticVerifier, TokenVerifier};
use crate::config::{AuthConfig, CloudConfig};
use crate::hosts::HostHandler;
use crate::hosts::ec2::{AdminSecret, Ec2Config, Ec2HostHandler, HostServiceSettings};
use crate::hosts::fake::FakeHostHandler;
use crate::lease::{LeaseKeeper, LeaseSettings};
use crate::metrics::Metrics;
use crate::region::{EVENT_QUEUE, Event, RegionController, RegionSettings};

pub use config::Config;

/// Runs until `shutdown` is cancelled, launching hosts where [`Config::cloud`] says: EC2 (or
/// devstack's moto in local development), or an in-memory cloud per region (local development
/// only, like the original's localdev fakes).
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let hosts = host_handlers(&config).await?;
    run_with_hosts(config, hosts, shutdown).await
}

/// One host handler per configured region. An EC2 handler resolves its subnet and security
/// group at once, so a misconfigured account fails the start rather than the first launch.
pub async fn host_handlers(
    config: &Config,
) -> anyhow::Result<HashMap<Region, Arc<dyn HostHandler>>> {
    let mut hosts: HashMap<Region, Arc<dyn HostHandler>> = HashMap::new();
    for region in &config.regions {
        let handler: Arc<dyn HostHandler> = match &config.cloud {
            CloudConfig::Memory => Arc::new(FakeHostHandler::new(region.clone())),
            CloudConfig::Ec2(settings) => {
                let mut ec2 = Ec2Config::new(
                    region.clone(),
                    config.app_env.as_str(),
                    settings.instance_profile.clone(),
                    HostServiceSettings {
                        hasura_graphql_url: settings.host_graphql_url.clone(),
                        admin_secret: AdminSecret::SsmParameter(
                            settings.admin_secret_parameter.clone(),
                        ),
                        sentry_dsn: settings
                            .host_sentry_dsn
                            .as_ref()
                            .map(|dsn| dsn.expose().clone()),
                        image_registry: None,
                        log_filter: None,
                        ops_addr: settings.host_ops_addr.clone(),
                        ops_allow: settings.host_ops_allow.clone(),
                        extra: Default::default(),
                    },
                );
                ec2.endpoint_url = settings.endpoint_url.clone();
                let handler = Ec2HostHandler::new(ec2)
                    .await
                    .with_context(|| format!("EC2 settings for {region}"))?;
                handler
                    .check()
                    .await
                    .with_context(|| format!("EC2 in {region}: subnet and security group"))?;
                tracing::info!(%region, endpoint = ?settings.endpoint_url, "EC2 host handler ready");
                Arc::new(handler)
            }
        };
        hosts.insert(region.clone(), handler);
    }
    Ok(hosts)
}

/// Runs one controller per configured region over the given host handlers until `shutdown`;
/// then waits for in-flight launches. Competes for the leader lease under a fresh replica name.
pub async fn run_with_hosts(
    config: Config,
    hosts: HashMap<Region, Arc<dyn HostHandler>>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let holder = format!(
        "{}-{}",
        std::process::id(),
        dbclient::types::MandelboxId::random()
    );
    run_replica(config, hosts, LeaseSettings::new(holder), shutdown).await
}

/// [`run_with_hosts`] with explicit lease settings: only while this replica holds the lease do
/// its controllers act.
pub async fn run_replica(
    config: Config,
    hosts: HashMap<Region, Arc<dyn HostHandler>>,
    lease: LeaseSettings,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let db = DbClient::new(&config.db)?;
    let images = db.images().await?;
    tracing::info!(
        images = images.len(),
        url = %config.db.graphql_url(),
        "connected to Hasura"
    );
    let metrics = Arc::new(Metrics::new()?);
    let (verifier, jwks): (Arc<dyn TokenVerifier>, _) = match &config.auth {
        AuthConfig::Jwks {
            jwks_url,
            audience,
            issuer,
        } => {
            let jwks = JwksVerifier::new(jwks_url.clone(), audience, issuer)?;
            (Arc::new(jwks.clone()), Some(jwks))
        }
        AuthConfig::LocalTestTokens => (Arc::new(StaticVerifier), None),
    };
    let listener = tokio::net::TcpListener::bind(("0.0.0.0", config.port)).await?;
    tracing::info!(addr = %listener.local_addr()?, "HTTP API listening");
    let regions_stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    let (keeper, leader) = LeaseKeeper::new(db.clone(), lease);
    // The lease outlives the controllers: their in-flight launches finish (bounded) under it
    // at shutdown, and only then is it released.
    let lease_stop = CancellationToken::new();
    let controllers = TaskTracker::new();
    tracker.spawn(keeper.run(lease_stop.clone()));
    {
        let mut leader = leader.clone();
        let gauge = metrics.leader.clone();
        let stop = regions_stop.clone();
        tracker.spawn(async move {
            loop {
                gauge.set(i64::from(leader.borrow_and_update().is_some()));
                tokio::select! {
                    () = stop.cancelled() => break,
                    changed = leader.changed() => if changed.is_err() { break },
                }
            }
        });
    }
    let mut region_events: HashMap<Region, mpsc::Sender<Event>> = HashMap::new();
    let mut senders: Vec<mpsc::Sender<Event>> = Vec::new();
    for region in &config.regions {
        let Some(handler) = hosts.get(region).cloned() else {
            anyhow::bail!("no host handler for region {region}");
        };
        let info = handler.instance_type(&config.instance_type).await?;
        let capacity = mandelbox_capacity(info);
        if capacity == 0 {
            anyhow::bail!("instance type {} holds no mandelbox", config.instance_type);
        }
        let mut settings = RegionSettings::new(region.clone(), config.commit.clone());
        settings.instance_type = config.instance_type.clone();
        settings.capacity_per_instance = capacity;
        settings.target_image = config.images.get(region).cloned();
        let desired = config.desired_free_mandelboxes.get(region);
        let kind = config.algorithm.get(region);
        let algorithm = kind.build(AlgorithmConfig {
            desired_free_mandelboxes: desired,
            max_instances: config.max_instances_per_region,
            capacity_per_instance: capacity,
            hold_down: config.hold_down,
            min_lifetime: config.min_lifetime,
            ..AlgorithmConfig::default()
        });
        tracing::info!(%region, algorithm = kind.as_str(), desired_free = desired, "region controller");
        let controller = RegionController::new(settings, db.clone(), handler, algorithm)
            .with_leader(leader.clone())
            .with_metrics(metrics.clone());
        metrics
            .desired_free_capacity
            .with_label_values(&[region.as_str()])
            .set(i64::from(desired));
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        region_events.insert(region.clone(), tx.clone());
        senders.push(tx);
        controllers.spawn(controller.run(rx, regions_stop.clone()));
    }
    let (ready_tx, ready) = watch::channel(false);
    let api_state = ApiState {
        assigner: Arc::new(Assigner {
            db: db.clone(),
            enabled_regions: config.regions.clone(),
            mandelboxes_per_user: config.mandelboxes_per_user,
            allow_local_commit: config.app_env.is_local(),
            allowed_apps: config.allowed_apps.clone(),
            regions: region_events,
        }),
        verifier,
        admission: Arc::new(Admission::new(config.admission)),
        metrics: metrics.clone(),
        ready,
    };
    let api_stop = CancellationToken::new();
    if let Some(jwks) = jwks {
        // Fetched now and every JWKS_REFRESH_PERIOD, so a key the issuer revoked stops being
        // accepted within it; it serves the API, so it stops with the API.
        tracker.spawn(jwks.keep_fresh(api_stop.clone()));
    }
    let forwarder = Arc::new(forward::Forwarder::new(
        config.json_transport_forward.clone(),
    ));
    let listener_limits = config.listener;
    tracker.spawn({
        let stop = api_stop.clone();
        async move {
            if let Err(error) =
                api::serve_limited(listener, api_state, forwarder, listener_limits, stop).await
            {
                tracing::error!(%error, "HTTP API stopped");
            }
        }
    });
    tracker.close();
    // Every event only says "look again": a full queue already holds one, so drop the rest.
    let fan_out = |event: Event| {
        for tx in &senders {
            let _ = tx.try_send(event.clone());
        }
    };
    let subscriptions = SubscriptionClient::start(&config.db, shutdown.child_token())?;
    let mut instances = subscriptions.instances();
    let mut image_updates = subscriptions.images();
    let start = tokio::time::Instant::now() + config.scheduler_interval;
    let mut scheduler = tokio::time::interval_at(start, config.scheduler_interval);
    scheduler.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = scheduler.tick() => fan_out(Event::Tick),
            Some(snapshot) = instances.next() => match snapshot {
                Ok(_) => {
                    metrics.subscription_up.set(1);
                    ready_tx.send_replace(true);
                    fan_out(Event::Changed);
                }
                Err(error) => {
                    metrics.subscription_up.set(0);
                    tracing::warn!(%error, "instances subscription");
                }
            },
            Some(snapshot) = image_updates.next() => match snapshot {
                Ok(_) => fan_out(Event::Changed),
                Err(error) => tracing::warn!(%error, "images subscription"),
            },
        }
    }
    api_stop.cancel();
    regions_stop.cancel();
    controllers.close();
    controllers.wait().await;
    lease_stop.cancel();
    tracker.wait().await;
    subscriptions.shutdown().await;
    Ok(())
}
