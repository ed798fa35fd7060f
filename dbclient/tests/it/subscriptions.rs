//! Live-query subscriptions against the stand-in: typed snapshots, changes from GraphQL and from
//! plain SQL, recovery from an endpoint restart, and a rejected admin secret.

use dbclient::{
    ConnectionState, DbError, Image, InstanceStatus, MandelboxStatus, SubscriptionClient,
};

use crate::support::*;

fn ids(rows: &[dbclient::InstanceWithMandelboxes]) -> Vec<&str> {
    rows.iter().map(|row| row.instance.id.as_str()).collect()
}

#[tokio::test]
async fn a_subscription_sees_changes_committed_through_graphql_and_through_sql() {
    let fx = Fixture::start().await;
    seed(&fx.db, &[new_instance("i-1", InstanceStatus::Active, 3)]).await;
    let (subscriptions, _token) = fx.subscriptions();
    let instance = instance_id("i-1");
    let mut allocated =
        subscriptions.mandelboxes_on_instance_with_status(&instance, MandelboxStatus::Allocated);
    let (initial, errors) = wait_for(&mut allocated, "the initial snapshot", |_| true).await;
    assert!(
        initial.is_empty() && errors.is_empty(),
        "{initial:?} {errors:?}"
    );

    // Through GraphQL.
    let request = new_mandelbox("i-1", MandelboxStatus::Allocated, Some("alice"));
    let row = fx.db.allocate_mandelbox(&request).await.unwrap().unwrap();
    let (snapshot, _) =
        wait_for(&mut allocated, "the allocated row", |rows| !rows.is_empty()).await;
    assert_eq!(snapshot, vec![row.clone()]);

    // Through plain SQL, behind Hasura's back.
    fx.sql()
        .await
        .execute(
            "UPDATE whist.mandelboxes SET status = 'CONNECTING' WHERE id = $1",
            &[row.id.as_uuid()],
        )
        .await
        .unwrap();
    wait_for(
        &mut allocated,
        "the row gone after the SQL update",
        |rows| rows.is_empty(),
    )
    .await;
    subscriptions.shutdown().await;
}

#[tokio::test]
async fn a_subscriber_recovers_by_itself_after_the_endpoint_restarts_and_sees_the_current_state() {
    let mut fx = Fixture::start().await;
    seed(&fx.db, &[new_instance("i-1", InstanceStatus::Active, 3)]).await;
    let (subscriptions, _token) = fx.subscriptions();
    let mut draining = subscriptions.instances_by_status(InstanceStatus::Draining);
    let mut state = subscriptions.connection_state();
    wait_for(&mut draining, "the initial, empty snapshot", |rows| {
        rows.is_empty()
    })
    .await;

    fx.stack.stop_graphql().await.unwrap();
    // While the endpoint is down, the data changes underneath (SQL: GraphQL is down).
    fx.sql()
        .await
        .execute(
            "UPDATE whist.instances SET status = 'DRAINING' WHERE id = 'i-1'",
            &[],
        )
        .await
        .unwrap();
    // The client noticed the outage (waiting on its state, not on a clock).
    tokio::time::timeout(
        PATIENCE,
        state.wait_for(|s| matches!(s, ConnectionState::Reconnecting { .. })),
    )
    .await
    .expect("the outage went unnoticed")
    .unwrap();
    fx.stack.start_graphql().await.unwrap();

    let (snapshot, errors) = wait_for(
        &mut draining,
        "the instance DRAINING after the restart",
        |rows| !rows.is_empty(),
    )
    .await;
    assert_eq!(ids(&snapshot), ["i-1"]);
    assert_eq!(snapshot[0].instance.status, InstanceStatus::Draining);
    // The outage was reported on the stream, once, as a network error.
    assert!(
        !errors.is_empty() && errors.iter().all(|e| matches!(e, DbError::Network { .. })),
        "{errors:?}"
    );
    assert!(matches!(*state.borrow(), ConnectionState::Connected));

    // And it is live again: a change made now shows up.
    assert!(
        fx.db
            .transition_instance_status(
                &instance_id("i-1"),
                InstanceStatus::Draining,
                InstanceStatus::Active
            )
            .await
            .unwrap()
    );
    wait_for(&mut draining, "the instance gone from DRAINING", |rows| {
        rows.is_empty()
    })
    .await;
    subscriptions.shutdown().await;
}

#[tokio::test]
async fn a_wrong_admin_secret_is_reported_on_the_stream_as_access_denied() {
    let fx = Fixture::start().await;
    let config = config_for(&fx.stack, Some("not-the-secret"));
    let token = tokio_util::sync::CancellationToken::new();
    let subscriptions = SubscriptionClient::start(&config, token.clone()).unwrap();
    let mut images = subscriptions.images();
    let error = wait_for_error(&mut images, "access denied").await;
    match &error {
        DbError::AccessDenied { message, .. } => assert!(message.contains("4403"), "{message}"),
        other => panic!("{other:?}"),
    }
    assert!(!error.to_string().contains("not-the-secret"));
    assert!(!format!("{subscriptions:?}").contains("not-the-secret"));
    token.cancel();
    subscriptions.stopped().await;
}

#[tokio::test]
async fn typed_instance_subscriptions_follow_their_rows() {
    let fx = Fixture::start().await;
    let (subscriptions, _token) = fx.subscriptions();
    let mut one = subscriptions.instance(&instance_id("i-2"));
    let mut all = subscriptions.instances();
    let mut active = subscriptions.instances_by_status(InstanceStatus::Active);
    wait_for(&mut one, "no row yet", Option::is_none).await;
    wait_for(&mut all, "no rows yet", Vec::is_empty).await;

    seed(
        &fx.db,
        &[
            new_instance("i-2", InstanceStatus::PreConnection, 2),
            new_instance("i-1", InstanceStatus::Active, 2),
        ],
    )
    .await;
    let (row, _) = wait_for(&mut one, "i-2", Option::is_some).await;
    let row = row.unwrap();
    assert_eq!(row.instance.status, InstanceStatus::PreConnection);
    assert!(row.mandelboxes.is_empty());
    let (rows, _) = wait_for(&mut all, "both rows", |rows| rows.len() == 2).await;
    assert_eq!(ids(&rows), ["i-1", "i-2"]);
    let (rows, _) = wait_for(&mut active, "i-1 active", |rows| rows.len() == 1).await;
    assert_eq!(ids(&rows), ["i-1"]);

    // Nested mandelboxes are part of the snapshot.
    let mandelbox = fx
        .db
        .insert_mandelbox(&new_mandelbox("i-2", MandelboxStatus::Allocated, None))
        .await
        .unwrap();
    let (row, _) = wait_for(&mut one, "i-2 with its mandelbox", |row| {
        row.as_ref().is_some_and(|row| !row.mandelboxes.is_empty())
    })
    .await;
    assert_eq!(row.unwrap().mandelboxes, vec![mandelbox]);

    assert!(fx.db.delete_instance(&instance_id("i-2")).await.unwrap());
    wait_for(&mut one, "i-2 deleted", Option::is_none).await;
    subscriptions.shutdown().await;
}

#[tokio::test]
async fn the_images_subscription_follows_upserts() {
    let fx = Fixture::start().await;
    let (subscriptions, _token) = fx.subscriptions();
    let mut images = subscriptions.images();
    wait_for(&mut images, "no images", Vec::is_empty).await;
    let stored = fx
        .db
        .upsert_image(&Image {
            provider: "AWS".to_owned(),
            region: region(REGION),
            image_id: image("ami-1"),
            client_sha: "sha".to_owned(),
            updated_at: chrono::Utc::now(),
        })
        .await
        .unwrap();
    let (rows, _) = wait_for(&mut images, "the image", |rows| !rows.is_empty()).await;
    assert_eq!(rows, vec![stored]);
    subscriptions.shutdown().await;
}

#[tokio::test]
async fn shutdown_ends_every_stream() {
    let fx = Fixture::start().await;
    let (subscriptions, token) = fx.subscriptions();
    let mut images = subscriptions.images();
    wait_for(&mut images, "the first snapshot", |_| true).await;
    token.cancel();
    tokio::time::timeout(PATIENCE, subscriptions.stopped())
        .await
        .expect("stopped");
    assert!(futures::StreamExt::next(&mut images).await.is_none());
}

#[tokio::test]
async fn reconnects_are_logged_with_attempt_delay_and_cause_but_never_the_secret() {
    let logs = capture_logs();
    let mut fx = Fixture::start().await;
    let (subscriptions, _token) = fx.subscriptions();
    let mut images = subscriptions.images();
    wait_for(&mut images, "the first snapshot", |_| true).await;
    fx.db.images().await.unwrap();
    fx.stack.stop_graphql().await.unwrap();
    wait_for_error(&mut images, "the outage").await;
    fx.stack.start_graphql().await.unwrap();
    let mut state = subscriptions.connection_state();
    tokio::time::timeout(
        PATIENCE,
        state.wait_for(|s| matches!(s, ConnectionState::Connected)),
    )
    .await
    .unwrap()
    .unwrap();
    subscriptions.shutdown().await;

    let text = logs.text();
    let reconnect = text
        .lines()
        .find(|line| line.contains("reconnecting"))
        .unwrap_or_else(|| panic!("no reconnect logged:\n{text}"));
    for field in ["attempt=", "delay_ms=", "cause=", "url="] {
        assert!(reconnect.contains(field), "{field} missing: {reconnect}");
    }
    assert!(text.contains("subscription connection restored"), "{text}");
    assert!(
        !text.contains(devstack::testing::TEST_ADMIN_SECRET),
        "the secret was logged:\n{text}"
    );
}
