//! Assignment in one request (`whist.assign_mandelbox`): warm boxes first, then the fullest
//! host; the per-user limit under concurrency; regions, commits, images and host states.

use std::collections::HashSet;

use dbclient::assign::{AssignOutcome, AssignParams, Assigned};
use dbclient::{Image, InstanceStatus, MandelboxId, MandelboxStatus, Region, UserId};
use futures::future::join_all;

use crate::support::*;

const COMMIT: &str = "0123abcd";
const APP: &str = "CHROME";

/// Hosts (ACTIVE or not, with an address and a fingerprint) and the region's image.
async fn fleet(fx: &Fixture, hosts: &[(&str, InstanceStatus, u32)]) {
    let instances: Vec<_> = hosts
        .iter()
        .map(|(id, status, capacity)| new_instance(id, *status, *capacity))
        .collect();
    seed(&fx.db, &instances).await;
    fx.sql()
        .await
        .batch_execute(
            "UPDATE whist.instances SET ip_addr = '10.0.0.1', \
             tls_fingerprint = encode(sha256(id::bytea), 'hex')",
        )
        .await
        .unwrap();
    fx.db
        .upsert_image(&Image {
            provider: "AWS".into(),
            region: region(REGION),
            image_id: image(IMAGE),
            client_sha: COMMIT.into(),
            updated_at: chrono::Utc::now(),
        })
        .await
        .unwrap();
}

async fn warm_box(fx: &Fixture, instance: &str) -> MandelboxId {
    fx.db
        .insert_waiting_mandelbox(&new_mandelbox(instance, MandelboxStatus::Waiting, None))
        .await
        .unwrap()
        .expect("a warm row")
        .id
}

async fn capacity(fx: &Fixture, id: &str) -> u32 {
    fx.db
        .instance(&instance_id(id))
        .await
        .unwrap()
        .unwrap()
        .instance
        .remaining_capacity
}

struct Ask {
    user: UserId,
    regions: Vec<Region>,
    commit: String,
    any_commit: bool,
    limit: u32,
}

impl Ask {
    fn new(user: &str) -> Self {
        Self {
            user: UserId::new(user).unwrap(),
            regions: vec![region(REGION)],
            commit: COMMIT.into(),
            any_commit: false,
            limit: 3,
        }
    }

    async fn send(&self, fx: &Fixture) -> AssignOutcome {
        fx.db
            .assign_mandelbox(&AssignParams {
                provider: "AWS",
                user_id: &self.user,
                session_id: Some("1700000000"),
                regions: &self.regions,
                client_commit: &self.commit,
                any_commit: self.any_commit,
                mandelbox_limit: self.limit,
                app: APP,
                new_mandelbox_id: MandelboxId::random(),
            })
            .await
            .unwrap()
    }
}

fn assigned(outcome: AssignOutcome) -> Assigned {
    match outcome {
        AssignOutcome::Assigned(a) => a,
        other => panic!("expected an assignment, got {other:?}"),
    }
}

#[tokio::test]
async fn a_warm_box_goes_first_then_a_slot_on_the_fullest_host() {
    let fx = Fixture::start().await;
    fleet(
        &fx,
        &[
            ("i-1", InstanceStatus::Active, 3),
            ("i-2", InstanceStatus::Active, 1),
        ],
    )
    .await;
    let warm = warm_box(&fx, "i-1").await;
    assert_eq!(capacity(&fx, "i-1").await, 2);

    let first = assigned(Ask::new("alice").send(&fx).await);
    assert!(first.warm);
    assert_eq!(first.mandelbox_id, warm);
    assert_eq!(first.instance_id, instance_id("i-1"));
    assert_eq!(first.region, region(REGION));
    assert_eq!(first.ip_addr.to_string(), "10.0.0.1");
    assert_eq!(first.tls_fingerprint.len(), 64);
    let row = fx.db.mandelbox(&warm).await.unwrap().unwrap();
    assert_eq!(row.status, MandelboxStatus::Allocated);
    assert_eq!(row.user_id.as_ref().map(UserId::as_str), Some("alice"));
    assert_eq!(row.session_id.as_deref(), Some("1700000000"));
    // The warm row held its unit already.
    assert_eq!(capacity(&fx, "i-1").await, 2);

    // Cold: the fullest host (one slot left) before the emptier one.
    let second = assigned(Ask::new("bob").send(&fx).await);
    assert!(!second.warm);
    assert_eq!(second.instance_id, instance_id("i-2"));
    assert_eq!(capacity(&fx, "i-2").await, 0);
    let row = fx
        .db
        .mandelbox(&second.mandelbox_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.status, MandelboxStatus::Allocated);
    assert_eq!(row.app, APP);
    assert_eq!(row.instance_id, instance_id("i-2"));

    let third = assigned(Ask::new("carol").send(&fx).await);
    assert_eq!(third.instance_id, instance_id("i-1"));
    assert_eq!(capacity(&fx, "i-1").await, 1);
}

#[tokio::test]
async fn a_users_concurrent_assigns_never_pass_the_limit() {
    let fx = Fixture::start().await;
    fleet(&fx, &[("i-1", InstanceStatus::Active, 100)]).await;
    let mut ask = Ask::new("alice");
    ask.limit = 1;
    let outcomes = join_all((0..50).map(|_| ask.send(&fx))).await;
    let granted = outcomes
        .iter()
        .filter(|o| matches!(o, AssignOutcome::Assigned(_)))
        .count();
    let refused = outcomes
        .iter()
        .filter(|o| **o == AssignOutcome::UserAlreadyActive)
        .count();
    assert_eq!((granted, refused), (1, 49), "{outcomes:?}");
    assert_eq!(capacity(&fx, "i-1").await, 99);
    let user = UserId::new("alice").unwrap();
    assert_eq!(fx.db.mandelboxes_of_user(&user).await.unwrap().len(), 1);
}

#[tokio::test]
async fn concurrent_assigns_take_each_warm_box_and_slot_once_then_refuse() {
    let fx = Fixture::start().await;
    fleet(
        &fx,
        &[
            ("i-1", InstanceStatus::Active, 3),
            ("i-2", InstanceStatus::Active, 2),
        ],
    )
    .await;
    let mut warm = HashSet::new();
    for instance in ["i-1", "i-1", "i-2"] {
        warm.insert(warm_box(&fx, instance).await);
    }
    // Left: one slot on i-1, one on i-2, and three warm boxes: five users of eight get one.
    let asks: Vec<Ask> = (0..8).map(|i| Ask::new(&format!("user-{i}"))).collect();
    let outcomes = join_all(asks.iter().map(|a| a.send(&fx))).await;
    let granted: Vec<&Assigned> = outcomes
        .iter()
        .filter_map(|o| match o {
            AssignOutcome::Assigned(a) => Some(a),
            _ => None,
        })
        .collect();
    assert_eq!(granted.len(), 5, "{outcomes:?}");
    let ids: HashSet<MandelboxId> = granted.iter().map(|a| a.mandelbox_id).collect();
    assert_eq!(ids.len(), 5, "no mandelbox twice");
    let warm_granted: HashSet<MandelboxId> = granted
        .iter()
        .filter(|a| a.warm)
        .map(|a| a.mandelbox_id)
        .collect();
    assert_eq!(warm_granted, warm);
    assert_eq!(
        outcomes
            .iter()
            .filter(|o| **o == AssignOutcome::NoInstanceAvailable)
            .count(),
        3
    );
    assert_eq!(capacity(&fx, "i-1").await, 0);
    assert_eq!(capacity(&fx, "i-2").await, 0);
}

#[tokio::test]
async fn regions_commits_images_and_host_states_decide_who_can_serve() {
    let fx = Fixture::start().await;
    fleet(
        &fx,
        &[
            ("i-draining", InstanceStatus::Draining, 5),
            ("i-booting", InstanceStatus::PreConnection, 5),
            ("i-bare", InstanceStatus::Active, 5),
        ],
    )
    .await;
    // i-bare has not published its certificate: its clients could not pin it.
    fx.sql()
        .await
        .batch_execute("UPDATE whist.instances SET tls_fingerprint = NULL WHERE id = 'i-bare'")
        .await
        .unwrap();
    fx.sql()
        .await
        .batch_execute(
            "INSERT INTO whist.mandelboxes (id, app, instance_id, status) \
             VALUES (gen_random_uuid(), 'CHROME', 'i-draining', 'WAITING')",
        )
        .await
        .unwrap();
    assert_eq!(
        Ask::new("alice").send(&fx).await,
        AssignOutcome::NoInstanceAvailable
    );

    seed(
        &fx.db,
        &[new_instance("i-other", InstanceStatus::Active, 5)],
    )
    .await;
    fx.sql()
        .await
        .batch_execute(
            "UPDATE whist.instances SET ip_addr = '10.0.0.2', tls_fingerprint = repeat('ab', 32), \
             client_sha = 'ffff0000' WHERE id = 'i-other'",
        )
        .await
        .unwrap();
    // Only a host of another commit could serve.
    assert_eq!(
        Ask::new("alice").send(&fx).await,
        AssignOutcome::CommitHashMismatch
    );
    // Local development's client takes whatever the image's commit is; still none of ours.
    let mut local = Ask::new("alice");
    local.commit = "local_dev".into();
    local.any_commit = true;
    assert_eq!(local.send(&fx).await, AssignOutcome::CommitHashMismatch);
    let mut other = Ask::new("alice");
    other.commit = "ffff0000".into();
    let served = assigned(other.send(&fx).await);
    assert_eq!(served.instance_id, instance_id("i-other"));

    // A region without an image is passed over for the next one, in the client's order.
    let mut regions = Ask::new("bob");
    regions.commit = "ffff0000".into();
    regions.regions = vec![region("eu-central-1"), region(REGION)];
    assert_eq!(assigned(regions.send(&fx).await).region, region(REGION));
    // A host on an old image is not used.
    fx.sql()
        .await
        .batch_execute("UPDATE whist.images SET image_id = 'ami-new'")
        .await
        .unwrap();
    assert_eq!(regions.send(&fx).await, AssignOutcome::NoInstanceAvailable);
    // Nothing was claimed on the hosts that cannot serve.
    assert_eq!(capacity(&fx, "i-draining").await, 5);
    assert_eq!(capacity(&fx, "i-booting").await, 5);
    assert_eq!(capacity(&fx, "i-bare").await, 5);
}
