//! The host's own operations, exactly as the host service calls them, with a host credential
//! (the `host` role of `database/hasura/metadata.json`, Hasura JWT mode): everything a host
//! does to its own rows works; the same calls aimed at another host's rows change nothing.

use dbclient::{BearerToken, DbClient, InstanceStatus, MandelboxStatus, Registration};
use devstack::hasura::{HasuraOptions, JwtSecret};
use devstack::jwks::FakeJwks;
use devstack::testing::{TEST_ADMIN_SECRET, TestStack};
use serde_json::json;

use crate::support::{
    INSTANCE_TYPE, REGION, config_for, image, instance_id, new_instance, new_mandelbox, region,
    seed,
};

fn host_token(jwks: &FakeJwks, instance: &str) -> String {
    let now = chrono::Utc::now().timestamp();
    jwks.key()
        .sign(&json!({
            "sub": instance,
            "exp": now + 600,
            "https://hasura.io/jwt/claims": {
                "x-hasura-allowed-roles": ["host"],
                "x-hasura-default-role": "host",
                "x-hasura-instance-id": instance,
            }
        }))
        .unwrap()
}

#[tokio::test]
async fn a_host_credential_runs_the_hosts_operations_on_its_own_rows_only() {
    let jwks = FakeJwks::start().await.unwrap();
    let stack = TestStack::start_with(HasuraOptions {
        admin_secret: Some(TEST_ADMIN_SECRET.to_owned()),
        jwt_secret: Some(
            JwtSecret::parse(&json!({"type": "RS256", "jwk_url": jwks.jwks_url()}).to_string())
                .unwrap(),
        ),
        ..HasuraOptions::default()
    })
    .await
    .unwrap();
    let admin = DbClient::new(&config_for(&stack, Some(TEST_ADMIN_SECRET))).unwrap();
    seed(
        &admin,
        &[
            new_instance("i-host", InstanceStatus::PreConnection, 0),
            new_instance("i-other", InstanceStatus::PreConnection, 0),
        ],
    )
    .await;
    let token = BearerToken::default();
    token.set(&host_token(&jwks, "i-host")).unwrap();
    let host = DbClient::new(&config_for(&stack, None))
        .unwrap()
        .with_bearer(token);
    let me = instance_id("i-host");
    let other = instance_id("i-other");
    let registration = Registration {
        ip_addr: "10.1.2.3".parse().unwrap(),
        image_id: image(crate::support::IMAGE),
        region: region(REGION),
        instance_type: INSTANCE_TYPE.to_owned(),
        remaining_capacity: 2,
    };

    // Another host's row: registering, heartbeats, the fingerprint, deleting: nothing happens.
    assert!(
        host.register_instance(&other, &registration)
            .await
            .unwrap()
            .is_none()
    );
    assert!(!host.heartbeat(&other).await.unwrap());
    assert!(host.instance(&other).await.unwrap().is_none());
    assert!(!host.delete_instance(&other).await.unwrap());
    assert!(
        !host
            .set_instance_tls_fingerprint(&other, &"c".repeat(64))
            .await
            .unwrap()
    );
    let untouched = admin.instance(&other).await.unwrap().unwrap();
    assert_eq!(untouched.instance.status, InstanceStatus::PreConnection);
    assert_eq!(untouched.instance.tls_fingerprint, None);
    // A warm box on another host is refused by the insert check.
    assert!(
        host.insert_waiting_mandelbox(&new_mandelbox("i-other", MandelboxStatus::Waiting, None))
            .await
            .is_err()
    );

    // Its own row: the whole life of a host.
    let registered = host.register_instance(&me, &registration).await.unwrap();
    assert_eq!(registered.unwrap().status, InstanceStatus::Active);
    assert!(host.heartbeat(&me).await.unwrap());
    assert!(
        host.set_instance_tls_fingerprint(&me, &"d".repeat(64))
            .await
            .unwrap()
    );
    let warm = new_mandelbox("i-host", MandelboxStatus::Waiting, None);
    let row = host.insert_waiting_mandelbox(&warm).await.unwrap().unwrap();
    assert_eq!(row.status, MandelboxStatus::Waiting);
    assert_eq!(host.mandelboxes_on_instance(&me).await.unwrap().len(), 1);
    let running = host
        .transition_mandelbox_status(&row.id, MandelboxStatus::Waiting, MandelboxStatus::Running)
        .await
        .unwrap();
    assert!(running.is_some());
    let seen = host.instance(&me).await.unwrap().unwrap();
    assert_eq!(seen.instance.remaining_capacity, 1);
    assert_eq!(seen.mandelboxes.len(), 1);
    assert!(host.release_mandelbox(&me, &row.id).await.unwrap());
    assert_eq!(
        admin
            .instance(&me)
            .await
            .unwrap()
            .unwrap()
            .instance
            .remaining_capacity,
        2
    );
    assert!(host.delete_instance(&me).await.unwrap());
    assert!(admin.instance(&other).await.unwrap().is_some());
}
