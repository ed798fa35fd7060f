//! Region controllers against the real database (devstack) and the in-memory cloud: scale-up
//! from zero, scale-down, lingering termination, a zero-downtime image upgrade, orphan
//! reconciliation, launches resumed from their database records after a crash, and the whole
//! service scaling two regions from zero.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use dbclient::launches::{LaunchRecord, NewLaunchRecord};
use dbclient::types::{ImageId, InstanceId, InstanceStatus, NewInstance, Region};
use dbclient::{DbClient, DbConfig};
use devstack::testing::{TEST_ADMIN_SECRET, TestStack};
use scaling_service::algorithm::{AlgorithmConfig, DefaultAlgorithm};
use scaling_service::hosts::fake::{FakeHostHandler, Op};
use scaling_service::hosts::{HostHandler, HostInstance, HostState, LaunchRequest};
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

/// What a controller killed between RunInstances and the row insert leaves behind: the launch's
/// record in the database and its instances in the cloud, tagged with its launch id, no rows.
async fn crashed_launch(
    db: &DbClient,
    fake: &FakeHostHandler,
    launch_id: &str,
    count: u32,
) -> (LaunchRecord, Vec<HostInstance>) {
    let record = db
        .insert_launch_record(&NewLaunchRecord {
            launch_id: launch_id.to_owned(),
            region: fake.region().clone(),
            image_id: ami("ami-a"),
            instance_type: "g4dn.2xlarge".to_owned(),
            count,
            client_sha: "abc1234".to_owned(),
        })
        .await
        .unwrap();
    let launched = fake
        .launch(&LaunchRequest {
            launch_id: launch_id.to_owned(),
            count,
            image_id: ami("ami-a"),
            instance_type: "g4dn.2xlarge".to_owned(),
            client_sha: "abc1234".to_owned(),
        })
        .await
        .unwrap();
    (record, launched)
}

fn sorted_ids<'a>(ids: impl IntoIterator<Item = &'a InstanceId>) -> Vec<InstanceId> {
    let mut ids: Vec<InstanceId> = ids.into_iter().cloned().collect();
    ids.sort();
    ids
}

#[tokio::test]
async fn a_launch_interrupted_by_a_crash_is_adopted_by_the_next_controller() {
    let stack = TestStack::start().await.unwrap();
    let db = db(&stack);
    let east = region("us-east-1");
    let fake = Arc::new(FakeHostHandler::new(east.clone()));
    let (_, launched) = crashed_launch(&db, &fake, "us-east-1-crashed", 2).await;
    assert!(rows(&db, &east).await.is_empty());

    // A fresh controller (no orphan grace at all) reconciles at start: the recorded launch's
    // instances are pending, not orphans.
    let mut c = controller(&db, &fake, "ami-a", buffer(4));
    assert_eq!(c.reconcile_cloud().await.unwrap(), (0, 0));
    assert_eq!(c.pending_launches(), 1);
    c.step().await;
    c.settle().await;
    c.step().await;
    c.settle().await;

    let rows = rows(&db, &east).await;
    assert_eq!(
        sorted_ids(rows.iter().map(|r| &r.id)),
        sorted_ids(launched.iter().map(|i| &i.id))
    );
    for row in &rows {
        assert_eq!(row.status, InstanceStatus::PreConnection);
        assert_eq!(row.remaining_capacity, 2);
        assert_eq!(row.image_id, ami("ami-a"));
        assert_eq!(row.client_sha, "abc1234");
        assert_eq!(row.instance_type, "g4dn.2xlarge");
    }
    // The two instances cover the buffer of 4: nothing launched twice, nothing terminated.
    assert_eq!(fake.instances().len(), 2);
    assert!(fake.live().iter().all(|i| i.state == HostState::Running));
    assert_eq!(fake.calls(Op::Terminate), 0);
    assert!(db.launch_records_in_region(&east).await.unwrap().is_empty());
    assert_eq!(c.pending_launches(), 0);
    // Reconciliation has nothing left to do either.
    assert_eq!(c.reconcile_cloud().await.unwrap(), (0, 0));
}

#[tokio::test]
async fn a_record_whose_rows_are_in_already_is_only_deleted() {
    let stack = TestStack::start().await.unwrap();
    let db = db(&stack);
    let east = region("us-east-1");
    let fake = Arc::new(FakeHostHandler::new(east.clone()));
    // Killed after the row insert, before the record was deleted; one host has registered since.
    let (_, launched) = crashed_launch(&db, &fake, "us-east-1-inserted", 2).await;
    let ids: Vec<InstanceId> = launched.iter().map(|i| i.id.clone()).collect();
    fake.wait_running(&ids, Duration::from_secs(1))
        .await
        .unwrap();
    let rows_in: Vec<NewInstance> = launched
        .iter()
        .map(|i| NewInstance {
            id: i.id.clone(),
            provider: PROVIDER.to_owned(),
            region: east.clone(),
            image_id: ami("ami-a"),
            client_sha: "abc1234".to_owned(),
            ip_addr: None,
            instance_type: "g4dn.2xlarge".to_owned(),
            remaining_capacity: 2,
            status: InstanceStatus::PreConnection,
        })
        .collect();
    db.insert_instances(&rows_in).await.unwrap();
    db.set_instance_status(&ids[0], InstanceStatus::Active)
        .await
        .unwrap();

    let mut c = controller(&db, &fake, "ami-a", buffer(4));
    assert_eq!(c.resume_launches().await.unwrap(), 1);
    c.settle().await;
    let after = rows(&db, &east).await;
    assert_eq!(after.len(), 2);
    let status = |id: &InstanceId| after.iter().find(|r| &r.id == id).unwrap().status;
    assert_eq!(status(&ids[0]), InstanceStatus::Active);
    assert_eq!(status(&ids[1]), InstanceStatus::PreConnection);
    assert_eq!(fake.instances().len(), 2);
    assert_eq!(fake.calls(Op::Terminate), 0);
    assert!(db.launch_records_in_region(&east).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_recorded_launch_that_never_reached_the_cloud_is_launched_unless_stale() {
    let stack = TestStack::start().await.unwrap();
    let db = db(&stack);
    let east = region("us-east-1");
    let record = |launch_id: &str| NewLaunchRecord {
        launch_id: launch_id.to_owned(),
        region: east.clone(),
        image_id: ami("ami-a"),
        instance_type: "g4dn.2xlarge".to_owned(),
        count: 1,
        client_sha: "abc1234".to_owned(),
    };
    // Killed between writing the record and RunInstances, a moment ago: the launch goes on.
    let fake = Arc::new(FakeHostHandler::new(east.clone()));
    db.insert_launch_record(&record("us-east-1-young"))
        .await
        .unwrap();
    let mut c = controller(&db, &fake, "ami-a", buffer(0));
    assert_eq!(c.resume_launches().await.unwrap(), 1);
    c.settle().await;
    assert_eq!(fake.live().len(), 1);
    assert_eq!(fake.live()[0].launch_id.as_deref(), Some("us-east-1-young"));
    assert_eq!(rows(&db, &east).await.len(), 1);
    assert!(db.launch_records_in_region(&east).await.unwrap().is_empty());

    // The same, an hour ago: the decision is stale, the record is dropped, nothing launched.
    db.insert_launch_record(&record("us-east-1-stale"))
        .await
        .unwrap();
    stack
        .sql()
        .await
        .unwrap()
        .execute(
            "UPDATE whist.scaling_launches SET created_at = now() - interval '1 hour'",
            &[],
        )
        .await
        .unwrap();
    let launches = fake.calls(Op::Launch);
    let mut c = controller(&db, &fake, "ami-a", buffer(0));
    assert_eq!(c.resume_launches().await.unwrap(), 1);
    c.settle().await;
    assert_eq!(fake.calls(Op::Launch), launches);
    assert_eq!(fake.live().len(), 1);
    assert!(db.launch_records_in_region(&east).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_launch_whose_record_cannot_be_written_launches_nothing() {
    let stack = TestStack::start().await.unwrap();
    let db = db(&stack);
    let east = region("us-east-1");
    let fake = Arc::new(FakeHostHandler::new(east.clone()));
    // Reads work, the record's insert fails (as when the database goes down in between).
    let sql = stack.sql().await.unwrap();
    sql.batch_execute(
        "CREATE FUNCTION public.refuse_launches() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN RAISE EXCEPTION 'the database is down'; END $$;
         CREATE TRIGGER refuse_launches BEFORE INSERT ON whist.scaling_launches
           FOR EACH ROW EXECUTE FUNCTION public.refuse_launches();",
    )
    .await
    .unwrap();
    let mut c = controller(&db, &fake, "ami-a", buffer(4));
    for _ in 0..3 {
        c.step().await;
        c.settle().await;
    }
    assert_eq!(fake.calls(Op::Launch), 0);
    assert!(fake.instances().is_empty());
    assert_eq!(c.pending_launches(), 0);
    assert!(rows(&db, &east).await.is_empty());

    // Once records can be written, the launch goes ahead.
    sql.batch_execute("DROP TRIGGER refuse_launches ON whist.scaling_launches")
        .await
        .unwrap();
    c.step().await;
    c.settle().await;
    assert_eq!(fake.live().len(), 2);
    assert_eq!(rows(&db, &east).await.len(), 2);
    assert!(db.launch_records_in_region(&east).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_controller_that_becomes_leader_resumes_the_launches_left_behind() {
    let stack = TestStack::start().await.unwrap();
    let db = db(&stack);
    let east = region("us-east-1");
    let fake = Arc::new(FakeHostHandler::new(east.clone()));
    let generation = db
        .acquire_lease("test", "c", Duration::from_secs(60))
        .await
        .unwrap()
        .unwrap();
    let fence = dbclient::fenced::Fence {
        name: "test".to_owned(),
        generation,
    };
    let (leader, is_leader) = tokio::sync::watch::channel(Some(fence.clone()));
    let mut c = controller(&db, &fake, "ami-a", buffer(0)).with_leader(is_leader);
    c.step().await;
    // It loses the lease; the new leader dies half-way through a launch; it takes the lease back.
    leader.send_replace(None);
    c.step().await;
    let (_, launched) = crashed_launch(&db, &fake, "us-east-1-other-replica", 1).await;
    leader.send_replace(Some(fence));
    c.step().await;
    assert_eq!(c.pending_launches(), 1);
    c.settle().await;
    assert_eq!(
        sorted_ids(rows(&db, &east).await.iter().map(|r| &r.id)),
        sorted_ids(launched.iter().map(|i| &i.id))
    );
    assert_eq!(fake.instances().len(), 1);
    assert!(db.launch_records_in_region(&east).await.unwrap().is_empty());
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
