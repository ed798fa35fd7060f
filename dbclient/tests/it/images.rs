//! Every image operation.

use chrono::{DateTime, Utc};
use dbclient::Image;

use crate::support::*;

fn image_row(provider: &str, region_name: &str, ami: &str, at: &str) -> Image {
    Image {
        provider: provider.to_owned(),
        region: region(region_name),
        image_id: image(ami),
        client_sha: format!("sha-of-{ami}"),
        updated_at: at.parse::<DateTime<Utc>>().unwrap(),
    }
}

#[tokio::test]
async fn upsert_image_inserts_then_replaces_the_image_of_a_provider_and_region() {
    let fx = Fixture::start().await;
    assert_eq!(
        fx.db.latest_image("AWS", &region(REGION)).await.unwrap(),
        None
    );
    assert!(fx.db.images().await.unwrap().is_empty());

    let first = image_row("AWS", REGION, "ami-1", "2022-01-18T12:58:16.95204+00:00");
    assert_eq!(fx.db.upsert_image(&first).await.unwrap(), first);
    let newer = image_row("AWS", REGION, "ami-2", "2022-02-01T20:46:47.5+01:00");
    let stored = fx.db.upsert_image(&newer).await.unwrap();
    assert_eq!(stored.image_id, newer.image_id);
    assert_eq!(stored.client_sha, newer.client_sha);
    // Replacing is an UPDATE: the row trigger stamps the database's clock.
    assert!(stored.updated_at > first.updated_at, "{stored:?}");
    assert_eq!(
        fx.db.latest_image("AWS", &region(REGION)).await.unwrap(),
        Some(stored.clone())
    );

    let west = image_row("AWS", "us-west-2", "ami-3", "2022-03-01T00:00:00+00:00");
    fx.db.upsert_image(&west).await.unwrap();
    assert_eq!(fx.db.images().await.unwrap(), vec![stored, west]);
    assert_eq!(
        fx.db.latest_image("GCP", &region(REGION)).await.unwrap(),
        None
    );
}
