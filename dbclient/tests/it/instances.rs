//! Every instance operation.

use std::net::IpAddr;

use dbclient::{ConstraintKind, DbError, InstanceStatus, MandelboxStatus, Registration};

use crate::support::*;

#[tokio::test]
async fn instance_by_id_returns_the_row_with_its_mandelboxes_or_none() {
    let fx = Fixture::start().await;
    assert!(fx.db.instance(&instance_id("i-1")).await.unwrap().is_none());
    seed(&fx.db, &[new_instance("i-1", InstanceStatus::Active, 3)]).await;
    let first = fx
        .db
        .insert_mandelbox(&new_mandelbox(
            "i-1",
            MandelboxStatus::Running,
            Some("alice"),
        ))
        .await
        .unwrap();
    let second = fx
        .db
        .insert_mandelbox(&new_mandelbox("i-1", MandelboxStatus::Allocated, None))
        .await
        .unwrap();

    let found = fx.db.instance(&instance_id("i-1")).await.unwrap().unwrap();
    let row = &found.instance;
    assert_eq!(row.id.as_str(), "i-1");
    assert_eq!(row.provider, "AWS");
    assert_eq!(row.region.as_str(), REGION);
    assert_eq!(row.image_id.as_str(), IMAGE);
    assert_eq!(row.client_sha, "0123abcd");
    assert_eq!(row.ip_addr, None);
    assert_eq!(row.instance_type, INSTANCE_TYPE);
    assert_eq!(row.remaining_capacity, 3);
    assert_eq!(row.status, InstanceStatus::Active);
    assert!(row.updated_at >= row.created_at);
    // Oldest first.
    assert_eq!(found.mandelboxes, vec![first, second]);
}

#[tokio::test]
async fn inet_values_with_a_prefix_decode_to_the_address() {
    let fx = Fixture::start().await;
    seed(&fx.db, &[new_instance("i-1", InstanceStatus::Active, 1)]).await;
    fx.sql()
        .await
        .execute(
            "UPDATE whist.instances SET ip_addr = '10.1.2.0/24' WHERE id = 'i-1'",
            &[],
        )
        .await
        .unwrap();
    let row = fx.db.instance(&instance_id("i-1")).await.unwrap().unwrap();
    assert_eq!(row.instance.ip_addr, Some("10.1.2.0".parse().unwrap()));
}

#[tokio::test]
async fn instance_lists_filter_by_status_region_and_image() {
    let fx = Fixture::start().await;
    let mut other_region = new_instance("i-west", InstanceStatus::Active, 1);
    other_region.region = region("us-west-2");
    let mut other_image = new_instance("i-old", InstanceStatus::Draining, 1);
    other_image.image_id = image("ami-old");
    seed(
        &fx.db,
        &[
            new_instance("i-b", InstanceStatus::Active, 1),
            new_instance("i-a", InstanceStatus::Active, 1),
            new_instance("i-pre", InstanceStatus::PreConnection, 1),
            other_region,
            other_image,
        ],
    )
    .await;
    let ids = |rows: Vec<dbclient::InstanceWithMandelboxes>| {
        rows.into_iter()
            .map(|row| row.instance.id.into_inner())
            .collect::<Vec<_>>()
    };

    let active = fx
        .db
        .instances_by_status(InstanceStatus::Active)
        .await
        .unwrap();
    assert_eq!(ids(active), ["i-a", "i-b", "i-west"]);
    let east = fx.db.instances_in_region(&region(REGION)).await.unwrap();
    assert_eq!(ids(east), ["i-a", "i-b", "i-old", "i-pre"]);
    let active_east = fx
        .db
        .instances_by_status_in_region(InstanceStatus::Active, &region(REGION))
        .await
        .unwrap();
    assert_eq!(ids(active_east), ["i-a", "i-b"]);
    let old = fx.db.instances_by_image(&image("ami-old")).await.unwrap();
    assert_eq!(ids(old), ["i-old"]);
    assert!(
        fx.db
            .instances_by_image(&image("ami-none"))
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn instances_with_capacity_are_active_nonfull_hosts_in_bin_packing_order() {
    let fx = Fixture::start().await;
    let mut elsewhere = new_instance("i-west", InstanceStatus::Active, 1);
    elsewhere.region = region("us-west-2");
    let mut old_image = new_instance("i-old", InstanceStatus::Active, 1);
    old_image.image_id = image("ami-old");
    seed(
        &fx.db,
        &[
            new_instance("i-roomy", InstanceStatus::Active, 3),
            new_instance("i-full", InstanceStatus::Active, 0),
            new_instance("i-b-tight", InstanceStatus::Active, 1),
            new_instance("i-a-tight", InstanceStatus::Active, 1),
            new_instance("i-draining", InstanceStatus::Draining, 3),
            new_instance("i-booting", InstanceStatus::PreConnection, 3),
            elsewhere,
            old_image,
        ],
    )
    .await;
    let candidates = fx
        .db
        .instances_with_capacity(&region(REGION), &image(IMAGE))
        .await
        .unwrap();
    let ids: Vec<_> = candidates.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(ids, ["i-a-tight", "i-b-tight", "i-roomy"]);
}

#[tokio::test]
async fn insert_instances_is_all_or_nothing() {
    let fx = Fixture::start().await;
    assert_eq!(fx.db.insert_instances(&[]).await.unwrap(), 0);
    seed(
        &fx.db,
        &[new_instance("i-1", InstanceStatus::PreConnection, 2)],
    )
    .await;
    let error = fx
        .db
        .insert_instances(&[
            new_instance("i-2", InstanceStatus::PreConnection, 2),
            new_instance("i-1", InstanceStatus::PreConnection, 2),
        ])
        .await
        .unwrap_err();
    match error {
        DbError::ConstraintViolation {
            kind: ConstraintKind::Uniqueness,
            constraint,
            ..
        } => assert_eq!(constraint.as_deref(), Some("instances_pkey")),
        other => panic!("{other:?}"),
    }
    assert!(fx.db.instance(&instance_id("i-2")).await.unwrap().is_none());
}

fn registration(ip: &str) -> Registration {
    Registration {
        ip_addr: ip.parse::<IpAddr>().unwrap(),
        image_id: image(IMAGE),
        region: region(REGION),
        instance_type: INSTANCE_TYPE.to_owned(),
        remaining_capacity: 4,
    }
}

#[tokio::test]
async fn register_instance_activates_only_a_matching_pre_connection_row() {
    let fx = Fixture::start().await;
    seed(
        &fx.db,
        &[new_instance("i-1", InstanceStatus::PreConnection, 0)],
    )
    .await;
    let id = instance_id("i-1");

    let mut wrong_image = registration("203.0.113.7");
    wrong_image.image_id = image("ami-other");
    assert!(
        fx.db
            .register_instance(&id, &wrong_image)
            .await
            .unwrap()
            .is_none()
    );
    let mut wrong_type = registration("203.0.113.7");
    wrong_type.instance_type = "g4dn.xlarge".to_owned();
    assert!(
        fx.db
            .register_instance(&id, &wrong_type)
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        fx.db
            .register_instance(&instance_id("i-missing"), &registration("203.0.113.7"))
            .await
            .unwrap()
            .is_none()
    );

    let registered = fx
        .db
        .register_instance(&id, &registration("203.0.113.7"))
        .await
        .unwrap()
        .expect("registered");
    assert_eq!(registered.status, InstanceStatus::Active);
    assert_eq!(registered.ip_addr, Some("203.0.113.7".parse().unwrap()));
    assert_eq!(registered.remaining_capacity, 4);
    // Only once: the row is no longer PRE_CONNECTION.
    assert!(
        fx.db
            .register_instance(&id, &registration("203.0.113.8"))
            .await
            .unwrap()
            .is_none()
    );
    let stored = fx.db.instance(&id).await.unwrap().unwrap().instance;
    assert_eq!(stored, registered);
}

#[tokio::test]
async fn instance_status_transitions_are_guarded() {
    let fx = Fixture::start().await;
    seed(&fx.db, &[new_instance("i-1", InstanceStatus::Active, 1)]).await;
    let id = instance_id("i-1");
    let status = |db: dbclient::DbClient| async move {
        db.instance(&instance_id("i-1"))
            .await
            .unwrap()
            .unwrap()
            .instance
            .status
    };

    assert!(
        !fx.db
            .transition_instance_status(
                &id,
                InstanceStatus::PreConnection,
                InstanceStatus::Draining
            )
            .await
            .unwrap()
    );
    assert_eq!(status(fx.db.clone()).await, InstanceStatus::Active);
    assert!(
        fx.db
            .transition_instance_status(&id, InstanceStatus::Active, InstanceStatus::Draining)
            .await
            .unwrap()
    );
    assert_eq!(status(fx.db.clone()).await, InstanceStatus::Draining);

    assert!(
        fx.db
            .set_instance_status(&id, InstanceStatus::Active)
            .await
            .unwrap()
    );
    assert_eq!(status(fx.db.clone()).await, InstanceStatus::Active);
    assert!(
        !fx.db
            .set_instance_status(&instance_id("i-missing"), InstanceStatus::Active)
            .await
            .unwrap()
    );
}

#[tokio::test]
async fn heartbeat_advances_updated_at_by_the_database_clock() {
    let fx = Fixture::start().await;
    seed(&fx.db, &[new_instance("i-1", InstanceStatus::Active, 1)]).await;
    let id = instance_id("i-1");
    let before = fx.db.instance(&id).await.unwrap().unwrap().instance;
    assert!(fx.db.heartbeat(&id).await.unwrap());
    let after = fx.db.instance(&id).await.unwrap().unwrap().instance;
    assert!(
        after.updated_at > before.updated_at,
        "{before:?} -> {after:?}"
    );
    assert_eq!(after.created_at, before.created_at);
    assert_eq!(after.status, before.status);
    assert!(!fx.db.heartbeat(&instance_id("i-missing")).await.unwrap());
}

#[tokio::test]
async fn capacity_changes_are_atomic_and_never_go_below_zero() {
    let fx = Fixture::start().await;
    seed(&fx.db, &[new_instance("i-1", InstanceStatus::Active, 1)]).await;
    let id = instance_id("i-1");
    assert!(fx.db.add_instance_capacity(&id, 2).await.unwrap());
    assert!(fx.db.add_instance_capacity(&id, -1).await.unwrap());
    let error = fx.db.add_instance_capacity(&id, -3).await.unwrap_err();
    match error {
        DbError::CheckViolation { constraint, .. } => {
            assert_eq!(
                constraint.as_deref(),
                Some("instances_remaining_capacity_check")
            );
        }
        other => panic!("{other:?}"),
    }
    let row = fx.db.instance(&id).await.unwrap().unwrap().instance;
    assert_eq!(row.remaining_capacity, 2);
    assert!(
        !fx.db
            .add_instance_capacity(&instance_id("i-missing"), 1)
            .await
            .unwrap()
    );
}

#[tokio::test]
async fn deleting_an_instance_deletes_its_mandelboxes() {
    let fx = Fixture::start().await;
    seed(&fx.db, &[new_instance("i-1", InstanceStatus::Draining, 1)]).await;
    let mandelbox = fx
        .db
        .insert_mandelbox(&new_mandelbox(
            "i-1",
            MandelboxStatus::Running,
            Some("alice"),
        ))
        .await
        .unwrap();
    let id = instance_id("i-1");
    assert!(fx.db.delete_instance(&id).await.unwrap());
    assert!(fx.db.instance(&id).await.unwrap().is_none());
    assert!(fx.db.mandelbox(&mandelbox.id).await.unwrap().is_none());
    assert!(!fx.db.delete_instance(&id).await.unwrap());
}
