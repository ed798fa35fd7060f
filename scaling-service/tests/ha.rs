//! Two replicas against one database and one cloud: exactly one acts; when it is killed the
//! other takes the lease over and acts.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use dbclient::fenced::Fence;
use dbclient::types::{ImageId, InstanceId, InstanceStatus, NewInstance, Region};
use dbclient::{DbClient, DbConfig};
use devstack::testing::{TEST_ADMIN_SECRET, TestStack};
use scaling_service::algorithm::{AlgorithmConfig, DefaultAlgorithm};
use scaling_service::controller::{ExecError, PlanExecutor};
use scaling_service::hosts::HostHandler;
use scaling_service::hosts::fake::{FakeHostHandler, Op};
use scaling_service::lease::{LEASE_NAME, LeaseSettings};
use scaling_service::region::{PROVIDER, RegionController, RegionSettings};
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
    let db = db(&stack);
    let ttl = Duration::from_millis(500);
    let first = db.acquire_lease("l", "a", ttl).await.unwrap().unwrap();
    assert_eq!(
        db.acquire_lease("l", "a", ttl).await.unwrap(),
        Some(first),
        "a renewal keeps the generation"
    );
    assert_eq!(
        db.acquire_lease("l", "b", ttl).await.unwrap(),
        None,
        "held by a"
    );
    // No replica sends a time: the lease lapses on the database's clock, and the takeover
    // gets a new generation.
    let mut taken = None;
    wait_for("the takeover", async || {
        taken = db.acquire_lease("l", "b", ttl).await.unwrap();
        taken.is_some()
    })
    .await;
    let second = taken.unwrap();
    assert!(second > first);
    let row = db.lease("l").await.unwrap().unwrap();
    assert_eq!((row.holder.as_str(), row.generation), ("b", second));
    assert!(!db.release_lease("l", "a").await.unwrap());
    assert!(db.release_lease("l", "b").await.unwrap());
    let third = db.acquire_lease("l", "a", ttl).await.unwrap().unwrap();
    assert!(third > second, "a fresh lease is newer still");
}

fn db(stack: &TestStack) -> DbClient {
    DbClient::new(
        &DbConfig::new(
            &stack.graphql_url(),
            Some(logger::Secret::new(TEST_ADMIN_SECRET.to_owned())),
        )
        .unwrap(),
    )
    .unwrap()
}

fn ami(id: &str) -> ImageId {
    ImageId::new(id).unwrap()
}

/// A controller of one host's buffer, acting under `leader`.
fn controller_under(
    db: &DbClient,
    fake: &Arc<FakeHostHandler>,
    leader: tokio::sync::watch::Receiver<Option<Fence>>,
) -> RegionController {
    let mut settings = RegionSettings::new(fake.region().clone(), "abc1234");
    settings.target_image = Some(ami("ami-east"));
    let hosts: Arc<dyn HostHandler> = fake.clone();
    RegionController::new(
        settings,
        db.clone(),
        hosts,
        Box::new(DefaultAlgorithm::new(AlgorithmConfig {
            desired_free_mandelboxes: 2,
            capacity_per_instance: 2,
            ..AlgorithmConfig::default()
        })),
    )
    .with_leader(leader)
}

async fn take_lease(db: &DbClient, holder: &str, ttl: Duration) -> Fence {
    let mut generation = None;
    wait_for("the lease", async || {
        generation = db.acquire_lease(LEASE_NAME, holder, ttl).await.unwrap();
        generation.is_some()
    })
    .await;
    Fence {
        name: LEASE_NAME.to_owned(),
        generation: generation.unwrap(),
    }
}

#[tokio::test]
async fn a_leader_paused_past_its_lease_lands_nothing_after_the_takeover() {
    let stack = TestStack::start().await.unwrap();
    let db = db(&stack);
    let east = Region::new("us-east-1").unwrap();
    let fake = Arc::new(FakeHostHandler::new(east.clone()));
    let a = take_lease(&db, "replica-a", Duration::from_millis(800)).await;
    let (_a_tells, a_leads) = tokio::sync::watch::channel(Some(a.clone()));
    let mut leader_a = controller_under(&db, &fake, a_leads);
    // A launches its buffer's host; EC2 is slow, so the launch waits after RunInstances.
    fake.hold_running(true);
    wait_for("A's launch", async || {
        leader_a.step().await;
        fake.calls(Op::Launch) == 1
    })
    .await;
    // A is paused: nothing renews its lease, which lapses on the database's clock, and B
    // takes it over. A is never told (its keeper does not run either).
    let b = take_lease(&db, "replica-b", Duration::from_secs(60)).await;
    assert!(b.generation > a.generation);
    let image_before = db.latest_image(PROVIDER, &east).await.unwrap();
    // A resumes: its launch goes on, and every write it tries is refused.
    fake.hold_running(false);
    leader_a.settle().await;
    assert!(db.instances_in_region(&east).await.unwrap().is_empty());
    assert_eq!(
        db.launch_records_in_region(&east).await.unwrap().len(),
        1,
        "the record is left for the new leader"
    );
    assert_eq!(
        fake.calls(Op::Terminate),
        0,
        "A does not clean up instances the new leader adopts"
    );
    // Whatever A's next steps decide lands nowhere.
    let row = NewInstance {
        id: InstanceId::new("i-0000000000000000b").unwrap(),
        provider: PROVIDER.to_owned(),
        region: east.clone(),
        image_id: ami("ami-east"),
        client_sha: "abc1234".to_owned(),
        ip_addr: None,
        instance_type: "g4dn.2xlarge".to_owned(),
        remaining_capacity: 2,
        status: InstanceStatus::Active,
    };
    db.insert_instances(std::slice::from_ref(&row))
        .await
        .unwrap();
    for _ in 0..3 {
        leader_a.step().await;
    }
    assert!(matches!(
        leader_a.drain(row.id.clone()).await,
        Err(ExecError::LeaseLost)
    ));
    assert!(matches!(
        leader_a.delete_row(row.id.clone()).await,
        Err(ExecError::LeaseLost)
    ));
    assert!(matches!(
        leader_a.swap_image(ami("ami-stale")).await,
        Err(ExecError::LeaseLost)
    ));
    assert!(matches!(
        leader_a.launch(1, ami("ami-east")).await,
        Err(ExecError::LeaseLost)
    ));
    let rows = db.instances_in_region(&east).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].instance.status, InstanceStatus::Active);
    assert_eq!(
        db.latest_image(PROVIDER, &east).await.unwrap(),
        image_before
    );
    assert_eq!(fake.calls(Op::Launch), 1);
    assert_eq!(db.launch_records_in_region(&east).await.unwrap().len(), 1);
    // B resumes A's recorded launch and adopts its instance: nothing is launched twice.
    let (b_tells, b_leads) = tokio::sync::watch::channel(Some(b.clone()));
    let mut leader_b = controller_under(&db, &fake, b_leads);
    assert_eq!(leader_b.resume_launches().await.unwrap(), 1);
    leader_b.settle().await;
    assert_eq!(db.instances_in_region(&east).await.unwrap().len(), 2);
    assert!(db.launch_records_in_region(&east).await.unwrap().is_empty());
    assert_eq!(fake.live().len(), 1);
    // A task of a lease seen lost is cancelled: B's next launch, held after RunInstances, is
    // dropped when B learns it no longer leads, and inserts nothing.
    fake.hold_running(true);
    leader_b.launch(1, ami("ami-east")).await.unwrap();
    wait_for("B's launch", async || fake.calls(Op::Launch) == 3).await;
    b_tells.send_replace(None);
    leader_b.settle().await;
    fake.hold_running(false);
    assert_eq!(db.instances_in_region(&east).await.unwrap().len(), 2);
    assert_eq!(db.launch_records_in_region(&east).await.unwrap().len(), 1);
}
