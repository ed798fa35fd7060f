//! Every mandelbox operation, with the allocation and claim races.

use std::collections::HashSet;

use dbclient::{ConstraintKind, DbError, InstanceStatus, MandelboxId, MandelboxStatus, UserId};
use futures::future::join_all;

use crate::support::*;

#[tokio::test]
async fn mandelbox_queries_filter_by_id_instance_status_and_user() {
    let fx = Fixture::start().await;
    seed(
        &fx.db,
        &[
            new_instance("i-1", InstanceStatus::Active, 5),
            new_instance("i-2", InstanceStatus::Active, 5),
        ],
    )
    .await;
    let a = fx
        .db
        .insert_mandelbox(&new_mandelbox(
            "i-1",
            MandelboxStatus::Allocated,
            Some("alice"),
        ))
        .await
        .unwrap();
    let b = fx
        .db
        .insert_mandelbox(&new_mandelbox("i-1", MandelboxStatus::Running, Some("bob")))
        .await
        .unwrap();
    let c = fx
        .db
        .insert_mandelbox(&new_mandelbox(
            "i-2",
            MandelboxStatus::Allocated,
            Some("alice"),
        ))
        .await
        .unwrap();
    assert_eq!(a.status, MandelboxStatus::Allocated);
    assert_eq!(a.app, "CHROME");
    assert_eq!(a.session_id.as_deref(), Some("1700000000"));
    assert_eq!(a.user_id.as_ref().map(UserId::as_str), Some("alice"));

    assert_eq!(fx.db.mandelbox(&b.id).await.unwrap(), Some(b.clone()));
    assert_eq!(fx.db.mandelbox(&MandelboxId::random()).await.unwrap(), None);
    assert_eq!(
        fx.db
            .mandelboxes_on_instance(&instance_id("i-1"))
            .await
            .unwrap(),
        vec![a.clone(), b.clone()]
    );
    assert_eq!(
        fx.db
            .mandelboxes_on_instance_with_status(&instance_id("i-1"), MandelboxStatus::Allocated)
            .await
            .unwrap(),
        vec![a.clone()]
    );
    assert_eq!(
        fx.db
            .mandelboxes_of_user(&UserId::new("alice").unwrap())
            .await
            .unwrap(),
        vec![a, c]
    );
    assert!(
        fx.db
            .mandelboxes_of_user(&UserId::new("nobody").unwrap())
            .await
            .unwrap()
            .is_empty()
    );
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

#[tokio::test]
async fn allocate_mandelbox_inserts_an_allocated_row_and_takes_one_unit_of_capacity() {
    let fx = Fixture::start().await;
    seed(&fx.db, &[new_instance("i-1", InstanceStatus::Active, 2)]).await;
    // Whatever status the caller put in, the row is ALLOCATED.
    let request = new_mandelbox("i-1", MandelboxStatus::Running, Some("alice"));
    let allocated = fx
        .db
        .allocate_mandelbox(&request)
        .await
        .unwrap()
        .expect("allocated");
    assert_eq!(allocated.id, request.id);
    assert_eq!(allocated.status, MandelboxStatus::Allocated);
    assert_eq!(allocated.user_id, request.user_id);
    assert_eq!(capacity(&fx, "i-1").await, 1);
    assert_eq!(fx.db.mandelbox(&request.id).await.unwrap(), Some(allocated));
}

#[tokio::test]
async fn allocate_mandelbox_without_capacity_changes_nothing() {
    let fx = Fixture::start().await;
    seed(&fx.db, &[new_instance("i-1", InstanceStatus::Active, 0)]).await;
    let request = new_mandelbox("i-1", MandelboxStatus::Allocated, Some("alice"));
    assert_eq!(fx.db.allocate_mandelbox(&request).await.unwrap(), None);
    assert_eq!(capacity(&fx, "i-1").await, 0);
    assert!(
        fx.db
            .mandelboxes_on_instance(&instance_id("i-1"))
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn allocate_mandelbox_on_an_inactive_or_missing_instance_changes_nothing() {
    let fx = Fixture::start().await;
    seed(
        &fx.db,
        &[
            new_instance("i-draining", InstanceStatus::Draining, 3),
            new_instance("i-booting", InstanceStatus::PreConnection, 3),
        ],
    )
    .await;
    for id in ["i-draining", "i-booting", "i-missing"] {
        let request = new_mandelbox(id, MandelboxStatus::Allocated, Some("alice"));
        assert_eq!(
            fx.db.allocate_mandelbox(&request).await.unwrap(),
            None,
            "{id}"
        );
        assert_eq!(fx.db.mandelbox(&request.id).await.unwrap(), None, "{id}");
    }
    assert_eq!(capacity(&fx, "i-draining").await, 3);
    assert_eq!(capacity(&fx, "i-booting").await, 3);
}

#[tokio::test]
async fn concurrent_allocations_never_overbook_an_instance() {
    const CAPACITY: u32 = 3;
    const CALLERS: usize = 12;
    let fx = Fixture::start().await;
    seed(
        &fx.db,
        &[new_instance("i-1", InstanceStatus::Active, CAPACITY)],
    )
    .await;
    let attempts = (0..CALLERS).map(|n| {
        let db = fx.db.clone();
        tokio::spawn(async move {
            let request = new_mandelbox(
                "i-1",
                MandelboxStatus::Allocated,
                Some(&format!("user-{n}")),
            );
            db.allocate_mandelbox(&request).await
        })
    });
    let results: Vec<_> = join_all(attempts)
        .await
        .into_iter()
        .map(|joined| joined.unwrap())
        .collect();
    let won = results
        .iter()
        .filter(|result| matches!(result, Ok(Some(_))))
        .count();
    let errors: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(won, CAPACITY as usize);
    assert_eq!(capacity(&fx, "i-1").await, 0);
    assert_eq!(
        fx.db
            .mandelboxes_on_instance(&instance_id("i-1"))
            .await
            .unwrap()
            .len(),
        CAPACITY as usize
    );
}

#[tokio::test]
async fn of_racing_claimers_of_one_allocated_mandelbox_exactly_one_wins() {
    const CLAIMERS: usize = 8;
    let fx = Fixture::start().await;
    seed(&fx.db, &[new_instance("i-1", InstanceStatus::Active, 1)]).await;
    let mandelbox = fx
        .db
        .allocate_mandelbox(&new_mandelbox(
            "i-1",
            MandelboxStatus::Allocated,
            Some("alice"),
        ))
        .await
        .unwrap()
        .unwrap();
    let claims = (0..CLAIMERS).map(|_| {
        let db = fx.db.clone();
        let id = mandelbox.id;
        tokio::spawn(async move {
            db.transition_mandelbox_status(
                &id,
                MandelboxStatus::Allocated,
                MandelboxStatus::Connecting,
            )
            .await
        })
    });
    let results: Vec<_> = join_all(claims)
        .await
        .into_iter()
        .map(|joined| joined.unwrap().unwrap())
        .collect();
    let winners: Vec<_> = results.into_iter().flatten().collect();
    assert_eq!(winners.len(), 1, "{winners:?}");
    assert_eq!(winners[0].status, MandelboxStatus::Connecting);
    assert!(winners[0].updated_at >= mandelbox.updated_at);
    assert_eq!(
        fx.db
            .mandelbox(&mandelbox.id)
            .await
            .unwrap()
            .unwrap()
            .status,
        MandelboxStatus::Connecting
    );
}

#[tokio::test]
async fn deleting_a_mandelbox_reports_whether_it_existed() {
    let fx = Fixture::start().await;
    seed(&fx.db, &[new_instance("i-1", InstanceStatus::Active, 1)]).await;
    let mandelbox = fx
        .db
        .insert_mandelbox(&new_mandelbox("i-1", MandelboxStatus::Dying, None))
        .await
        .unwrap();
    assert!(fx.db.delete_mandelbox(&mandelbox.id).await.unwrap());
    assert_eq!(fx.db.mandelbox(&mandelbox.id).await.unwrap(), None);
    assert!(!fx.db.delete_mandelbox(&mandelbox.id).await.unwrap());
}

#[tokio::test]
async fn stale_cleanup_deletes_only_rows_of_that_instance_and_status_older_than_the_cutoff() {
    let fx = Fixture::start().await;
    seed(
        &fx.db,
        &[
            new_instance("i-1", InstanceStatus::Active, 5),
            new_instance("i-2", InstanceStatus::Active, 5),
        ],
    )
    .await;
    let before_inserts = chrono::Utc::now() - chrono::Duration::seconds(60);
    let mut stale = HashSet::new();
    for _ in 0..2 {
        let row = fx
            .db
            .insert_mandelbox(&new_mandelbox("i-1", MandelboxStatus::Allocated, None))
            .await
            .unwrap();
        stale.insert(row.id);
    }
    let connecting = fx
        .db
        .insert_mandelbox(&new_mandelbox("i-1", MandelboxStatus::Connecting, None))
        .await
        .unwrap();
    let elsewhere = fx
        .db
        .insert_mandelbox(&new_mandelbox("i-2", MandelboxStatus::Allocated, None))
        .await
        .unwrap();
    let instance = instance_id("i-1");

    // Nothing was updated before the cutoff.
    let none = fx
        .db
        .delete_stale_mandelboxes(&instance, MandelboxStatus::Allocated, before_inserts)
        .await
        .unwrap();
    assert!(none.is_empty());

    let cutoff = chrono::Utc::now() + chrono::Duration::seconds(60);
    let deleted: HashSet<_> = fx
        .db
        .delete_stale_mandelboxes(&instance, MandelboxStatus::Allocated, cutoff)
        .await
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(deleted, stale);
    assert!(fx.db.mandelbox(&connecting.id).await.unwrap().is_some());
    assert!(fx.db.mandelbox(&elsewhere.id).await.unwrap().is_some());
}

#[tokio::test]
async fn inserting_a_duplicate_or_orphan_mandelbox_is_a_typed_constraint_violation() {
    let fx = Fixture::start().await;
    seed(&fx.db, &[new_instance("i-1", InstanceStatus::Active, 1)]).await;
    let row = new_mandelbox("i-1", MandelboxStatus::Allocated, None);
    fx.db.insert_mandelbox(&row).await.unwrap();
    match fx.db.insert_mandelbox(&row).await.unwrap_err() {
        DbError::ConstraintViolation {
            kind: ConstraintKind::Uniqueness,
            constraint,
            operation,
            path,
            ..
        } => {
            assert_eq!(constraint.as_deref(), Some("mandelboxes_pkey"));
            assert_eq!(operation, "InsertMandelbox");
            assert_eq!(
                path,
                "$.selectionSet.insert_whist_mandelboxes_one.args.object"
            );
        }
        other => panic!("{other:?}"),
    }
    let orphan = new_mandelbox("i-missing", MandelboxStatus::Allocated, None);
    match fx.db.insert_mandelbox(&orphan).await.unwrap_err() {
        DbError::ConstraintViolation {
            kind: ConstraintKind::ForeignKey,
            constraint,
            ..
        } => assert_eq!(constraint.as_deref(), Some("mandelboxes_instance_id_fkey")),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_waiting_row_holds_its_capacity_and_a_claim_takes_none() {
    let fx = Fixture::start().await;
    seed(
        &fx.db,
        &[
            new_instance("i-1", InstanceStatus::Active, 2),
            new_instance("i-draining", InstanceStatus::Draining, 2),
        ],
    )
    .await;
    let warm = fx
        .db
        .insert_waiting_mandelbox(&new_mandelbox("i-1", MandelboxStatus::Allocated, None))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(warm.status, MandelboxStatus::Waiting);
    assert_eq!(warm.user_id, None);
    assert_eq!(capacity(&fx, "i-1").await, 1);
    assert_eq!(
        fx.db
            .insert_waiting_mandelbox(&new_mandelbox("i-draining", MandelboxStatus::Waiting, None))
            .await
            .unwrap(),
        None
    );
    assert_eq!(capacity(&fx, "i-draining").await, 2);

    let listed = fx
        .db
        .instances_with_waiting_mandelboxes(&region(REGION), &image(IMAGE))
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].instance.id, instance_id("i-1"));
    assert_eq!(listed[0].mandelboxes, vec![warm.clone()]);

    let alice = UserId::new("alice").unwrap();
    // Not on another instance, and not for a second claimer.
    assert_eq!(
        fx.db
            .claim_waiting_mandelbox(&instance_id("i-draining"), &warm.id, &alice, None)
            .await
            .unwrap(),
        None
    );
    let claimed = fx
        .db
        .claim_waiting_mandelbox(&instance_id("i-1"), &warm.id, &alice, Some("42"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(claimed.id, warm.id);
    assert_eq!(claimed.status, MandelboxStatus::Allocated);
    assert_eq!(claimed.user_id, Some(alice.clone()));
    assert_eq!(claimed.session_id.as_deref(), Some("42"));
    assert!(claimed.updated_at >= warm.updated_at);
    assert_eq!(capacity(&fx, "i-1").await, 1);
    assert_eq!(
        fx.db
            .claim_waiting_mandelbox(&instance_id("i-1"), &warm.id, &alice, None)
            .await
            .unwrap(),
        None
    );
    assert!(
        fx.db
            .instances_with_waiting_mandelboxes(&region(REGION), &image(IMAGE))
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn a_draining_instances_waiting_rows_are_not_claimed() {
    let fx = Fixture::start().await;
    seed(&fx.db, &[new_instance("i-1", InstanceStatus::Active, 1)]).await;
    let warm = fx
        .db
        .insert_waiting_mandelbox(&new_mandelbox("i-1", MandelboxStatus::Waiting, None))
        .await
        .unwrap()
        .unwrap();
    assert!(
        fx.db
            .set_instance_status(&instance_id("i-1"), InstanceStatus::Draining)
            .await
            .unwrap()
    );
    let alice = UserId::new("alice").unwrap();
    assert_eq!(
        fx.db
            .claim_waiting_mandelbox(&instance_id("i-1"), &warm.id, &alice, None)
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        fx.db.mandelbox(&warm.id).await.unwrap().unwrap().status,
        MandelboxStatus::Waiting
    );
}

#[tokio::test]
async fn n_concurrent_claims_of_m_waiting_rows_give_exactly_m_distinct_claims() {
    const WAITING: usize = 4;
    const CLAIMERS: usize = 12;
    let fx = Fixture::start().await;
    seed(
        &fx.db,
        &[new_instance(
            "i-1",
            InstanceStatus::Active,
            WAITING as u32 + 2,
        )],
    )
    .await;
    for _ in 0..WAITING {
        fx.db
            .insert_waiting_mandelbox(&new_mandelbox("i-1", MandelboxStatus::Waiting, None))
            .await
            .unwrap()
            .unwrap();
    }
    let claims = (0..CLAIMERS).map(|n| {
        let db = fx.db.clone();
        tokio::spawn(async move {
            let user = UserId::new(format!("user-{n}")).unwrap();
            db.claim_any_waiting_mandelbox(&instance_id("i-1"), &user, None)
                .await
                .map(|claimed| claimed.map(|m| (m.id, user)))
        })
    });
    let results: Vec<_> = join_all(claims)
        .await
        .into_iter()
        .map(|joined| joined.unwrap())
        .collect();
    let errors: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(errors.is_empty(), "{errors:?}");
    let won: Vec<_> = results.into_iter().filter_map(|r| r.unwrap()).collect();
    assert_eq!(won.len(), WAITING, "{won:?}");
    let distinct: HashSet<_> = won.iter().map(|(id, _)| *id).collect();
    assert_eq!(distinct.len(), WAITING);
    for (id, user) in &won {
        let row = fx.db.mandelbox(id).await.unwrap().unwrap();
        assert_eq!(row.status, MandelboxStatus::Allocated);
        assert_eq!(row.user_id.as_ref(), Some(user));
    }
    // The claims took no capacity: the rows had it from their insert.
    assert_eq!(capacity(&fx, "i-1").await, 2);
}
