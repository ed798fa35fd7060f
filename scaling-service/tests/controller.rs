//! Region controllers against the real database (devstack) and the in-memory cloud: scale-up
//! from zero, scale-down, lingering termination, a zero-downtime image upgrade, orphan
//! reconciliation, and the whole service scaling two regions from zero.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use dbclient::types::{ImageId, InstanceId, InstanceStatus, NewInstance, Region};
use dbclient::{DbClient, DbConfig};
use devstack::testing::{TEST_ADMIN_SECRET, TestStack};
use scaling_service::algorithm::{AlgorithmConfig, DefaultAlgorithm};
use scaling_service::hosts::fake::FakeHostHandler;
use scaling_service::hosts::{HostHandler, HostState};
use scaling_service::region::{PROVIDER, RegionController, RegionSettings};

fn region(name: &str) -> Region {
    Region::new(name).unwrap()
}

fn ami(name: &str) -> ImageId {
    ImageId::new(name).unwrap()
}

fn db(stack: &TestStack) -> DbClient {
    let config = DbConfig::new(
        &stack.graphql_url(),
        Some(logger::Secret::new(TEST_ADMIN_SECRET.to_owned())),
    )
    .unwrap();
    DbClient::new(&config).unwrap()
}

fn controller(
    db: &DbClient,
    fake: &Arc<FakeHostHandler>,
    target: &str,
    algorithm: AlgorithmConfig,
) -> RegionController {
    let mut settings = RegionSettings::new(fake.region().clone(), "abc1234");
    settings.target_image = Some(ami(target));
    settings.orphan_grace = Duration::ZERO;
    let hosts: Arc<dyn HostHandler> = fake.clone();
    RegionController::new(
        settings,
        db.clone(),
        hosts,
        Box::new(DefaultAlgorithm::new(algorithm)),
    )
}

fn buffer(desired: u32) -> AlgorithmConfig {
    AlgorithmConfig {
        desired_free_mandelboxes: desired,
        capacity_per_instance: 2,
        ..AlgorithmConfig::default()
    }
}

async fn rows(db: &DbClient, r: &Region) -> Vec<dbclient::types::Instance> {
    db.instances_in_region(r)
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.instance)
        .collect()
}

/// What the host service does at boot: PRE_CONNECTION → ACTIVE.
async fn register_all(db: &DbClient, r: &Region) {
    for row in rows(db, r).await {
        if row.status == InstanceStatus::PreConnection {
            db.set_instance_status(&row.id, InstanceStatus::Active)
                .await
                .unwrap();
        }
    }
}

/// What a drained host service does: deletes its row and powers off.
async fn finish_drains(db: &DbClient, fake: &FakeHostHandler, r: &Region) {
    for row in rows(db, r).await {
        if row.status == InstanceStatus::Draining {
            db.delete_instance(&row.id).await.unwrap();
            fake.terminate(&[row.id]).await.unwrap();
        }
    }
}

#[tokio::test]
async fn scale_up_from_zero_reaches_the_buffer_and_cloud_and_rows_agree() {
    let stack = TestStack::start().await.unwrap();
    let db = db(&stack);
    let east = region("us-east-1");
    let fake = Arc::new(FakeHostHandler::new(east.clone()));
    let mut c = controller(&db, &fake, "ami-a", buffer(5));
    c.step().await;
    c.settle().await;
    // A second look while everything boots launches nothing more.
    c.step().await;
    c.settle().await;
    let live = fake.live();
    assert_eq!(live.len(), 3, "ceil(5 / 2) hosts");
    let rows = rows(&db, &east).await;
    let mut row_ids: Vec<_> = rows.iter().map(|r| r.id.clone()).collect();
    let mut cloud_ids: Vec<_> = live.iter().map(|i| i.id.clone()).collect();
    row_ids.sort();
    cloud_ids.sort();
    assert_eq!(row_ids, cloud_ids);
    for row in &rows {
        assert_eq!(row.status, InstanceStatus::PreConnection);
        assert_eq!(row.remaining_capacity, 2);
        assert_eq!(row.image_id, ami("ami-a"));
        assert_eq!(row.client_sha, "abc1234");
    }
    let image = db.latest_image(PROVIDER, &east).await.unwrap().unwrap();
    assert_eq!(image.image_id, ami("ami-a"));
    assert!(live.iter().all(|i| i.state == HostState::Running));
}

#[tokio::test]
async fn free_hosts_above_the_buffer_are_drained() {
    let stack = TestStack::start().await.unwrap();
    let db = db(&stack);
    let east = region("us-east-1");
    let fake = Arc::new(FakeHostHandler::new(east.clone()));
    let mut big = controller(&db, &fake, "ami-a", buffer(8));
    big.step().await;
    big.settle().await;
    register_all(&db, &east).await;
    let mut small = controller(&db, &fake, "ami-a", buffer(2));
    small.step().await;
    let rows = rows(&db, &east).await;
    let draining = rows
        .iter()
        .filter(|r| r.status == InstanceStatus::Draining)
        .count();
    let active = rows
        .iter()
        .filter(|r| r.status == InstanceStatus::Active)
        .count();
    assert_eq!((active, draining), (1, 3), "{rows:?}");
}

#[tokio::test]
async fn a_lingering_draining_host_is_terminated_and_its_row_removed() {
    let stack = TestStack::start().await.unwrap();
    let db = db(&stack);
    let east = region("us-east-1");
    let fake = Arc::new(FakeHostHandler::new(east.clone()));
    let mut c = controller(&db, &fake, "ami-a", buffer(2));
    c.step().await;
    c.settle().await;
    register_all(&db, &east).await;
    let host = rows(&db, &east).await[0].id.clone();
    db.set_instance_status(&host, InstanceStatus::Draining)
        .await
        .unwrap();
    let mut impatient = controller(
        &db,
        &fake,
        "ami-a",
        AlgorithmConfig {
            lingering_limit: Duration::ZERO,
            ..buffer(2)
        },
    );
    impatient.step().await;
    impatient.settle().await;
    let gone = fake.instances().into_iter().find(|i| i.id == host).unwrap();
    assert_eq!(gone.state, HostState::Terminated);
    assert!(db.instance(&host).await.unwrap().is_none());
}

#[tokio::test]
async fn image_upgrade_never_drops_below_the_buffer() {
    let stack = TestStack::start().await.unwrap();
    let db = db(&stack);
    let east = region("us-east-1");
    let fake = Arc::new(FakeHostHandler::new(east.clone()));
    let mut old = controller(&db, &fake, "ami-a", buffer(4));
    old.step().await;
    old.settle().await;
    register_all(&db, &east).await;
    let mut c = controller(&db, &fake, "ami-b", buffer(4));
    let mut swapped = false;
    for round in 0..10 {
        c.step().await;
        c.settle().await;
        // At every moment, assignment (ACTIVE hosts on the image row) has the buffer free.
        let image = db.latest_image(PROVIDER, &east).await.unwrap().unwrap();
        let free: u32 = rows(&db, &east)
            .await
            .iter()
            .filter(|r| r.status == InstanceStatus::Active && r.image_id == image.image_id)
            .map(|r| r.remaining_capacity)
            .sum();
        assert!(
            free >= 4,
            "round {round}: only {free} free on {}",
            image.image_id
        );
        swapped |= image.image_id == ami("ami-b");
        register_all(&db, &east).await;
        finish_drains(&db, &fake, &east).await;
        let all = rows(&db, &east).await;
        if swapped && all.iter().all(|r| r.image_id == ami("ami-b")) {
            assert_eq!(all.len(), 2);
            return;
        }
    }
    panic!("the upgrade did not finish: {:?}", rows(&db, &east).await);
}

#[tokio::test]
async fn orphans_are_terminated_and_rows_without_instances_removed() {
    let stack = TestStack::start().await.unwrap();
    let db = db(&stack);
    let east = region("us-east-1");
    let fake = Arc::new(FakeHostHandler::new(east.clone()));
    let orphan = fake.add_orphan(ami("ami-a"), "g4dn.2xlarge").unwrap();
    let ghost = InstanceId::new("i-0ghost0000000000").unwrap();
    db.insert_instances(&[NewInstance {
        id: ghost.clone(),
        provider: PROVIDER.to_owned(),
        region: east.clone(),
        image_id: ami("ami-a"),
        client_sha: "abc1234".to_owned(),
        ip_addr: None,
        instance_type: "g4dn.2xlarge".to_owned(),
        remaining_capacity: 2,
        status: InstanceStatus::Active,
    }])
    .await
    .unwrap();
    let mut c = controller(&db, &fake, "ami-a", buffer(0));
    let (terminated, removed) = c.reconcile_cloud().await.unwrap();
    assert_eq!((terminated, removed), (1, 1));
    let state = fake
        .instances()
        .into_iter()
        .find(|i| i.id == orphan)
        .unwrap()
        .state;
    assert_eq!(state, HostState::Terminated);
    assert!(db.instance(&ghost).await.unwrap().is_none());
}

#[tokio::test]
async fn the_service_scales_every_region_from_zero() {
    use clap::Parser;
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
        "--regions",
        "us-east-1,us-west-2",
        "--images",
        "us-east-1=ami-east,us-west-2=ami-west",
        "--desired-free-mandelboxes",
        "3",
    ])
    .unwrap()
    .validate()
    .unwrap();
    let fakes: Vec<Arc<FakeHostHandler>> = ["us-east-1", "us-west-2"]
        .iter()
        .map(|r| Arc::new(FakeHostHandler::new(region(r))))
        .collect();
    let hosts: HashMap<Region, Arc<dyn HostHandler>> = fakes
        .iter()
        .map(|f| (f.region().clone(), f.clone() as Arc<dyn HostHandler>))
        .collect();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let service = tokio::spawn(scaling_service::run_with_hosts(
        config,
        hosts,
        shutdown.clone(),
    ));
    let db = db(&stack);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let mut done = true;
        for f in &fakes {
            let rows = rows(&db, f.region()).await;
            done &= rows.len() == 2 && f.live().len() == 2;
        }
        if done {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not scaled up in time"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Repeated deliveries (the subscriptions keep firing) launch nothing more.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for f in &fakes {
        assert_eq!(f.live().len(), 2);
    }
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), service)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
