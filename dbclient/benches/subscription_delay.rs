//! `make bench`: delay from a committed change to its delivery on a live-query subscription,
//! through the real client, the Hasura stand-in and PostgreSQL on loopback.
//! Goal (docs/performance.md): p50 under 50 ms.

use std::time::{Duration, Instant};

use dbclient::types::InstanceId;
use dbclient::{DbConfig, SubscriptionClient};
use devstack::testing::{TEST_ADMIN_SECRET, TestStack};
use futures::StreamExt;
use logger::Secret;
use tokio_util::sync::CancellationToken;

const SAMPLES: usize = 200;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let stack = TestStack::start().await?;
    let sql = stack.sql().await?;
    sql.execute(
        "INSERT INTO whist.instances (id, provider, region, image_id, client_sha, instance_type, \
         remaining_capacity, status) VALUES ('i-bench', 'AWS', 'us-east-1', 'ami-1', 'x', \
         'g4dn.xlarge', 0, 'ACTIVE')",
        &[],
    )
    .await?;
    let config = DbConfig::new(
        &stack.graphql_url(),
        Some(Secret::new(TEST_ADMIN_SECRET.to_owned())),
    )?;
    let shutdown = CancellationToken::new();
    let subscriptions = SubscriptionClient::start(&config, shutdown.clone())?;
    let id = InstanceId::new("i-bench")?;
    let mut stream = subscriptions.instance(&id);
    // The first snapshot is the current state.
    tokio::time::timeout(Duration::from_secs(30), stream.next()).await?;

    let mut delays = Vec::with_capacity(SAMPLES);
    for n in 1..=SAMPLES as i32 {
        sql.execute(
            "UPDATE whist.instances SET remaining_capacity = $1 WHERE id = 'i-bench'",
            &[&n],
        )
        .await?;
        let committed = Instant::now();
        loop {
            let snapshot = tokio::time::timeout(Duration::from_secs(30), stream.next())
                .await?
                .ok_or_else(|| anyhow::anyhow!("stream ended"))??;
            if snapshot.is_some_and(|i| i.instance.remaining_capacity == n as u32) {
                break;
            }
        }
        delays.push(committed.elapsed());
    }
    delays.sort();
    let pct = |p: f64| delays[((delays.len() as f64 * p).ceil() as usize).saturating_sub(1)];
    println!(
        "subscription delay, commit to delivery ({SAMPLES} changes, loopback): p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms (goal: p50 < 50 ms)",
        ms(pct(0.50)),
        ms(pct(0.90)),
        ms(pct(0.99)),
        ms(delays[delays.len() - 1]),
    );
    shutdown.cancel();
    subscriptions.stopped().await;
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
