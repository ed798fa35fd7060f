//! Launch records (`whist.scaling_launches`) and the tolerant insert of a launch's rows.

use dbclient::launches::NewLaunchRecord;
use dbclient::{ConstraintKind, DbError, InstanceStatus};

use crate::support::*;

fn record(launch_id: &str, region_name: &str, count: u32) -> NewLaunchRecord {
    NewLaunchRecord {
        launch_id: launch_id.to_owned(),
        region: region(region_name),
        image_id: image(IMAGE),
        instance_type: INSTANCE_TYPE.to_owned(),
        count,
        client_sha: "0123abcd".to_owned(),
    }
}

#[tokio::test]
async fn launch_records_are_inserted_listed_by_region_and_deleted() {
    let fx = Fixture::start().await;
    let east = region(REGION);
    assert!(
        fx.db
            .launch_records_in_region(&east)
            .await
            .unwrap()
            .is_empty()
    );

    let first = fx
        .db
        .insert_launch_record(&record("l-1", REGION, 2))
        .await
        .unwrap();
    assert_eq!(first.launch_id, "l-1");
    assert_eq!(first.region, east);
    assert_eq!(first.image_id, image(IMAGE));
    assert_eq!(first.instance_type, INSTANCE_TYPE);
    assert_eq!(first.count, 2);
    assert_eq!(first.client_sha, "0123abcd");
    // The database's clock.
    assert!((chrono::Utc::now() - first.created_at).num_seconds().abs() < 60);
    let second = fx
        .db
        .insert_launch_record(&record("l-2", REGION, 1))
        .await
        .unwrap();
    fx.db
        .insert_launch_record(&record("l-3", "us-west-2", 1))
        .await
        .unwrap();

    // Oldest first, own region only.
    assert_eq!(
        fx.db.launch_records_in_region(&east).await.unwrap(),
        vec![first, second.clone()]
    );
    assert!(fx.db.delete_launch_record("l-1").await.unwrap());
    assert!(!fx.db.delete_launch_record("l-1").await.unwrap());
    assert_eq!(
        fx.db.launch_records_in_region(&east).await.unwrap(),
        vec![second]
    );
}

#[tokio::test]
async fn a_repeated_launch_id_or_an_invalid_record_is_refused() {
    let fx = Fixture::start().await;
    fx.db
        .insert_launch_record(&record("l-1", REGION, 1))
        .await
        .unwrap();
    match fx
        .db
        .insert_launch_record(&record("l-1", REGION, 3))
        .await
        .unwrap_err()
    {
        DbError::ConstraintViolation {
            kind: ConstraintKind::Uniqueness,
            ..
        } => {}
        other => panic!("{other:?}"),
    }
    for bad in [
        record("l-2", REGION, 0),
        record("", REGION, 1),
        NewLaunchRecord {
            instance_type: String::new(),
            ..record("l-3", REGION, 1)
        },
    ] {
        match fx.db.insert_launch_record(&bad).await.unwrap_err() {
            DbError::CheckViolation { .. } => {}
            other => panic!("{bad:?}: {other:?}"),
        }
    }
    assert_eq!(
        fx.db
            .launch_records_in_region(&region(REGION))
            .await
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test]
async fn inserting_a_launchs_rows_leaves_existing_rows_alone() {
    let fx = Fixture::start().await;
    // Inserted before a crash, and registered by its host since.
    seed(
        &fx.db,
        &[new_instance("i-1", InstanceStatus::PreConnection, 2)],
    )
    .await;
    fx.db
        .set_instance_status(&instance_id("i-1"), InstanceStatus::Active)
        .await
        .unwrap();
    let rows = [
        new_instance("i-1", InstanceStatus::PreConnection, 2),
        new_instance("i-2", InstanceStatus::PreConnection, 2),
    ];
    assert_eq!(fx.db.insert_launched_instances(&rows).await.unwrap(), 1);
    assert_eq!(fx.db.insert_launched_instances(&rows).await.unwrap(), 0);
    assert_eq!(fx.db.insert_launched_instances(&[]).await.unwrap(), 0);
    let stored = |id: &'static str| {
        let db = fx.db.clone();
        async move {
            db.instance(&instance_id(id))
                .await
                .unwrap()
                .unwrap()
                .instance
                .status
        }
    };
    assert_eq!(stored("i-1").await, InstanceStatus::Active);
    assert_eq!(stored("i-2").await, InstanceStatus::PreConnection);
}
