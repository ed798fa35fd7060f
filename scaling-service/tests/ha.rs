//! Two replicas against one database and one cloud: exactly one acts; when it is killed the
//! other takes the lease over and acts.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use dbclient::types::Region;
use dbclient::{DbClient, DbConfig};
use devstack::testing::{TEST_ADMIN_SECRET, TestStack};
use scaling_service::hosts::HostHandler;
use scaling_service::hosts::fake::{FakeHostHandler, Op};
use scaling_service::lease::{LEASE_NAME, LeaseSettings};
use tokio_util::sync::CancellationToken;

fn lease(holder: &str) -> LeaseSettings {
    LeaseSettings {
        ttl: Duration::from_secs(2),
        renew_every: Duration::from_millis(400),
        ..LeaseSettings::new(holder)
    }
}

async fn wait_for(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn exactly_one_replica_acts_and_the_other_takes_over_when_it_dies() {
    let stack = TestStack::start().await.unwrap();
    let config = scaling_service::config::Args::try_parse_from([
        "whist-scaling-service",
        "--app-env",
        "localdevwithdb",
        "--port",
        "0",
        "--graphql-url",
        &stack.graphql_url(),
        "--admin-secret",
        TEST_ADMIN_SECRET,
        "--images",
        "us-east-1=ami-east",
        "--desired-free-mandelboxes",
        "4",
    ])
    .unwrap()
    .validate()
    .unwrap();
    let region = Region::new("us-east-1").unwrap();
    let fake = Arc::new(FakeHostHandler::new(region.clone()));
    let hosts = || {
        let h: Arc<dyn HostHandler> = fake.clone();
        HashMap::from([(region.clone(), h)])
    };
    let db = DbClient::new(
        &DbConfig::new(
            &stack.graphql_url(),
            Some(logger::Secret::new(TEST_ADMIN_SECRET.to_owned())),
        )
        .unwrap(),
    )
    .unwrap();
    let shutdown = CancellationToken::new();
    // Each replica on its own runtime, as in its own process: dropping the runtime kills every
    // task it spawned, with no graceful release of the lease.
    let replica = |name: &'static str| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let handle = runtime.spawn(scaling_service::run_replica(
            config.clone(),
            hosts(),
            lease(name),
            shutdown.clone(),
        ));
        (runtime, handle)
    };
    let a = replica("replica-a");
    let b = replica("replica-b");
    wait_for("the buffer", async || {
        db.instances_in_region(&region).await.unwrap().len() == 2
    })
    .await;
    // Let both replicas see the fleet several times: the follower must not act.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(fake.live().len(), 2);
    assert_eq!(fake.calls(Op::Launch), 1, "one launch, by one replica");
    let leader = db.lease(LEASE_NAME).await.unwrap().unwrap().holder;
    let (dead, survivor) = if leader == "replica-a" {
        (a, b)
    } else {
        (b, a)
    };
    // Kill the leader (no graceful release), then take a host away: only a new leader replaces it.
    dead.0.shutdown_background();
    let gone = db.instances_in_region(&region).await.unwrap()[0]
        .instance
        .id
        .clone();
    db.delete_instance(&gone).await.unwrap();
    fake.terminate(&[gone]).await.unwrap();
    wait_for("the takeover", async || {
        db.lease(LEASE_NAME)
            .await
            .unwrap()
            .is_some_and(|l| l.holder != leader)
    })
    .await;
    wait_for("the replacement", async || {
        fake.live().len() == 2 && db.instances_in_region(&region).await.unwrap().len() == 2
    })
    .await;
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), survivor.1)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    survivor.0.shutdown_background();
    assert!(
        db.lease(LEASE_NAME).await.unwrap().is_none(),
        "released at shutdown"
    );
}

#[tokio::test]
async fn a_lease_is_renewed_by_its_holder_refused_to_others_and_taken_over_when_expired() {
    let stack = TestStack::start().await.unwrap();
    let db = DbClient::new(
        &DbConfig::new(
            &stack.graphql_url(),
            Some(logger::Secret::new(TEST_ADMIN_SECRET.to_owned())),
        )
        .unwrap(),
    )
    .unwrap();
    let now = chrono::Utc::now();
    let later = now + chrono::Duration::seconds(10);
    assert!(db.acquire_lease("l", "a", now, later).await.unwrap());
    assert!(
        db.acquire_lease("l", "a", now, later).await.unwrap(),
        "renewal"
    );
    assert!(
        !db.acquire_lease("l", "b", now, later).await.unwrap(),
        "held by a"
    );
    let after = later + chrono::Duration::seconds(1);
    assert!(
        db.acquire_lease("l", "b", after, after + chrono::Duration::seconds(10))
            .await
            .unwrap(),
        "expired: taken over"
    );
    assert_eq!(db.lease("l").await.unwrap().unwrap().holder, "b");
    assert!(!db.release_lease("l", "a").await.unwrap());
    assert!(db.release_lease("l", "b").await.unwrap());
}
