//! The scaling service's decisions and actions on `/metrics`: what the algorithm planned per
//! region and kind, and what became of each action (`ok`, `failed`), against the real database
//! (devstack) and the in-memory cloud.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use dbclient::types::Region;
use dbclient::{DbClient, DbConfig};
use devstack::testing::{TEST_ADMIN_SECRET, TestStack};
use scaling_service::algorithm::{AlgorithmConfig, DefaultAlgorithm};
use scaling_service::hosts::HostHandler;
use scaling_service::hosts::fake::FakeHostHandler;
use scaling_service::metrics::Metrics;
use scaling_service::region::{RegionController, RegionSettings};

fn region(name: &str) -> Region {
    Region::new(name).unwrap()
}

/// The value of the sample `series` (name and labels as the text format writes them, labels
/// in name order); `None` when the scrape has no such sample.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test]
async fn failed_and_carried_out_actions_are_counted_per_region_and_kind() {
    let stack = TestStack::start().await.unwrap();
    let db = DbClient::new(
        &DbConfig::new(
            &stack.graphql_url(),
            Some(logger::Secret::new(TEST_ADMIN_SECRET.to_owned())),
        )
        .unwrap(),
    )
    .unwrap();
    let east = region("us-east-1");
    let fake = Arc::new(FakeHostHandler::new(east.clone()));
    let mut settings = RegionSettings::new(east.clone(), "abc1234");
    settings.target_image = Some(dbclient::types::ImageId::new("ami-a").unwrap());
    let hosts: Arc<dyn HostHandler> = fake.clone();
    let metrics = Arc::new(Metrics::new().unwrap());
    let mut c = RegionController::new(
        settings,
        db.clone(),
        hosts,
        Box::new(DefaultAlgorithm::new(AlgorithmConfig {
            desired_free_mandelboxes: 4,
            capacity_per_instance: 2,
            ..AlgorithmConfig::default()
        })),
    )
    .with_metrics(metrics.clone());
    // The launch record's insert fails, as when the database goes down between read and write.
    let sql = stack.sql().await.unwrap();
    sql.batch_execute(
        "CREATE FUNCTION public.refuse_launches() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN RAISE EXCEPTION 'the database is down'; END $$;
         CREATE TRIGGER refuse_launches BEFORE INSERT ON whist.scaling_launches
           FOR EACH ROW EXECUTE FUNCTION public.refuse_launches();",
    )
    .await
    .unwrap();
    c.step().await;
    c.settle().await;
    let text = metrics.render();
    let decided = r#"whist_scaling_decisions_total{kind="launch",region="us-east-1"}"#;
    let failed = r#"whist_scaling_actions_total{kind="launch",region="us-east-1",result="failed"}"#;
    let ok = r#"whist_scaling_actions_total{kind="launch",region="us-east-1",result="ok"}"#;
    assert_eq!(sample(&text, decided), Some(1.0), "{text}");
    assert_eq!(sample(&text, failed), Some(1.0), "{text}");
    assert_eq!(sample(&text, ok), None, "{text}");

    sql.batch_execute("DROP TRIGGER refuse_launches ON whist.scaling_launches")
        .await
        .unwrap();
    c.step().await;
    c.settle().await;
    let text = metrics.render();
    assert_eq!(sample(&text, decided), Some(2.0), "{text}");
    assert_eq!(sample(&text, failed), Some(1.0), "{text}");
    assert_eq!(sample(&text, ok), Some(1.0), "{text}");
    assert_eq!(fake.live().len(), 2);
}

#[tokio::test]
async fn the_metrics_endpoint_shows_each_regions_launch_decisions_and_actions() {
    use clap::Parser;
    let stack = TestStack::start().await.unwrap();
    let port = devstack::postgres::free_port().unwrap().to_string();
    let config = scaling_service::config::Args::try_parse_from([
        "whist-scaling-service",
        "--app-env",
        "localdevwithdb",
        "--port",
        &port,
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
    let url = format!("http://127.0.0.1:{port}/metrics");
    let client = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut text = String::new();
    loop {
        if let Ok(response) = client.get(&url).send().await {
            text = response.text().await.unwrap();
            // A plan's decisions are counted before its actions run: wait for both.
            let launched = ["us-east-1", "us-west-2"].iter().all(|r| {
                let done = sample(
                    &text,
                    &format!(
                        r#"whist_scaling_actions_total{{kind="launch",region="{r}",result="ok"}}"#
                    ),
                );
                let decided = sample(
                    &text,
                    &format!(r#"whist_scaling_decisions_total{{kind="launch",region="{r}"}}"#),
                );
                done.is_some_and(|v| v >= 1.0) && done == decided
            });
            if launched {
                break;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no launch counted in time:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for r in ["us-east-1", "us-west-2"] {
        // None failed.
        assert_eq!(
            sample(
                &text,
                &format!(
                    r#"whist_scaling_actions_total{{kind="launch",region="{r}",result="failed"}}"#
                ),
            ),
            None,
            "{r}:\n{text}"
        );
    }
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), service)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
