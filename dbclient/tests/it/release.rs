//! Releasing a mandelbox: the row removed and its unit of capacity given back in one atomic
//! request (issue #15). Before, the host deleted the row and then restored the capacity in a
//! second request, so a failure between the two lost the unit for good, and the sweeper's
//! "not tracked, so remove it" could remove a row a task had just taken up.

use std::sync::Arc;

use dbclient::{DbClient, InstanceStatus, MandelboxStatus};

use crate::support::*;

async fn capacity(db: &DbClient, id: &str) -> u32 {
    db.instance(&instance_id(id))
        .await
        .unwrap()
        .unwrap()
        .instance
        .remaining_capacity
}

#[tokio::test]
async fn a_release_that_cannot_give_the_unit_back_removes_nothing() {
    let fx = Fixture::start().await;
    seed(&fx.db, &[new_instance("i-1", InstanceStatus::Active, 1)]).await;
    let mandelbox = fx
        .db
        .allocate_mandelbox(&new_mandelbox("i-1", MandelboxStatus::Allocated, Some("u")))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(capacity(&fx.db, "i-1").await, 0);
    // The capacity update fails (the database refuses it): the row must stay, so a retry can
    // still give the unit back. (Delete-then-add lost the unit here.)
    let sql = fx.sql().await;
    sql.batch_execute(
        "CREATE FUNCTION whist.refuse() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN RAISE EXCEPTION 'refused by the test'; END; $$; \
         CREATE TRIGGER refuse_capacity BEFORE UPDATE OF remaining_capacity ON whist.instances \
         FOR EACH ROW EXECUTE FUNCTION whist.refuse();",
    )
    .await
    .unwrap();
    let refused = fx
        .db
        .release_mandelbox(&instance_id("i-1"), &mandelbox.id)
        .await;
    assert!(refused.is_err(), "{refused:?}");
    let row = fx.db.mandelbox(&mandelbox.id).await.unwrap().unwrap();
    assert_eq!(row.status, MandelboxStatus::Allocated, "not even marked");
    sql.batch_execute("DROP TRIGGER refuse_capacity ON whist.instances")
        .await
        .unwrap();
    assert!(
        fx.db
            .release_mandelbox(&instance_id("i-1"), &mandelbox.id)
            .await
            .unwrap()
    );
    assert_eq!(fx.db.mandelbox(&mandelbox.id).await.unwrap(), None);
    assert_eq!(capacity(&fx.db, "i-1").await, 1);
    // A repeated release changes nothing.
    assert!(
        !fx.db
            .release_mandelbox(&instance_id("i-1"), &mandelbox.id)
            .await
            .unwrap()
    );
    assert_eq!(capacity(&fx.db, "i-1").await, 1);
}

#[tokio::test]
async fn racing_releases_give_each_unit_back_exactly_once() {
    let fx = Fixture::start().await;
    seed(&fx.db, &[new_instance("i-1", InstanceStatus::Active, 3)]).await;
    let mut ids = Vec::new();
    for n in 0..3 {
        let user = format!("u{n}");
        let row = fx
            .db
            .allocate_mandelbox(&new_mandelbox(
                "i-1",
                MandelboxStatus::Allocated,
                Some(&user),
            ))
            .await
            .unwrap()
            .unwrap();
        ids.push(row.id);
    }
    assert_eq!(capacity(&fx.db, "i-1").await, 0);
    // Ten releases of each row at once (its task, the sweeper, a restart's reconcile...).
    let db = Arc::new(fx.db.clone());
    let releases: Vec<_> = ids
        .iter()
        .flat_map(|id| std::iter::repeat_n(*id, 10))
        .map(|id| {
            let db = db.clone();
            tokio::spawn(async move {
                (
                    id,
                    db.release_mandelbox(&instance_id("i-1"), &id)
                        .await
                        .unwrap(),
                )
            })
        })
        .collect();
    let mut removed = std::collections::HashMap::new();
    for release in releases {
        let (id, did) = release.await.unwrap();
        *removed.entry(id).or_insert(0) += usize::from(did);
    }
    for id in &ids {
        assert_eq!(removed[id], 1, "{id} removed by exactly one release");
    }
    assert_eq!(capacity(&fx.db, "i-1").await, 3);
}

#[tokio::test]
async fn the_sweeper_releases_a_stranded_row_only_as_it_saw_it() {
    let fx = Fixture::start().await;
    seed(&fx.db, &[new_instance("i-1", InstanceStatus::Active, 2)]).await;
    let taken_up = fx
        .db
        .allocate_mandelbox(&new_mandelbox("i-1", MandelboxStatus::Allocated, Some("a")))
        .await
        .unwrap()
        .unwrap();
    // The sweeper lists the row (ALLOCATED, not tracked)...
    let seen = fx.db.mandelbox(&taken_up.id).await.unwrap().unwrap();
    // ...and a task takes it up before the sweeper acts.
    fx.db
        .transition_mandelbox_status(
            &taken_up.id,
            MandelboxStatus::Allocated,
            MandelboxStatus::Connecting,
        )
        .await
        .unwrap()
        .unwrap();
    let release = fx
        .db
        .release_stranded_mandelbox(&instance_id("i-1"), &seen.id, seen.status, seen.updated_at)
        .await
        .unwrap();
    assert!(!release, "a row taken up since is left alone");
    let row = fx.db.mandelbox(&taken_up.id).await.unwrap().unwrap();
    assert_eq!(row.status, MandelboxStatus::Connecting);
    assert_eq!(capacity(&fx.db, "i-1").await, 1);
    // A row still as it was seen is released, its unit given back.
    let now = fx.db.mandelbox(&taken_up.id).await.unwrap().unwrap();
    assert!(
        fx.db
            .release_stranded_mandelbox(&instance_id("i-1"), &now.id, now.status, now.updated_at)
            .await
            .unwrap()
    );
    assert_eq!(capacity(&fx.db, "i-1").await, 2);
    // A row whose task is tearing it down (DYING since it was seen) is released once, by
    // whichever of the two gets there first.
    let dying = fx
        .db
        .allocate_mandelbox(&new_mandelbox("i-1", MandelboxStatus::Allocated, Some("b")))
        .await
        .unwrap()
        .unwrap();
    let seen = fx.db.mandelbox(&dying.id).await.unwrap().unwrap();
    fx.db
        .transition_mandelbox_status(
            &dying.id,
            MandelboxStatus::Allocated,
            MandelboxStatus::Dying,
        )
        .await
        .unwrap()
        .unwrap();
    assert!(
        fx.db
            .release_stranded_mandelbox(&instance_id("i-1"), &seen.id, seen.status, seen.updated_at)
            .await
            .unwrap()
    );
    assert!(
        !fx.db
            .release_mandelbox(&instance_id("i-1"), &dying.id)
            .await
            .unwrap()
    );
    assert_eq!(capacity(&fx.db, "i-1").await, 2);
}
