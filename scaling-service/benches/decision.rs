//! Decision time of the default algorithm for one region with 10,000 hosts and 30,000
//! mandelboxes (goal: under 5 ms). `cargo bench -p scaling-service --bench decision`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use chrono::Utc;
use dbclient::types::{ImageId, InstanceId, InstanceStatus};
use scaling_service::algorithm::{AlgorithmConfig, InstanceView, Snapshot, decide};

const HOSTS: usize = 10_000;
const MANDELBOXES: u32 = 30_000;
const ROUNDS: usize = 200;

fn main() {
    let now = Utc::now();
    let current = ImageId::new("ami-current").unwrap();
    let old = ImageId::new("ami-old").unwrap();
    let mut placed = 0u32;
    let instances: Vec<InstanceView> = (0..HOSTS)
        .map(|n| {
            // 4 slots per host: 30,000 users fill 7,500 hosts, 2,500 are free (to retire).
            let used = 4.min(MANDELBOXES - placed);
            placed += used;
            let status = if n % 50 == 0 && used == 0 {
                InstanceStatus::Draining
            } else {
                InstanceStatus::Active
            };
            InstanceView {
                id: InstanceId::new(format!("i-{n:017x}")).unwrap(),
                image_id: if n % 7 == 0 {
                    old.clone()
                } else {
                    current.clone()
                },
                status,
                remaining_capacity: 4 - used,
                capacity: 4,
                mandelboxes: used,
                created_at: now - chrono::Duration::minutes((n % 300) as i64),
                status_since: now - chrono::Duration::minutes((n % 20) as i64),
            }
        })
        .collect();
    let snapshot = Snapshot {
        instances,
        current_image: Some(current.clone()),
        target_image: Some(current),
        ..Snapshot::default()
    };
    let config = AlgorithmConfig {
        desired_free_mandelboxes: 200,
        max_instances: 12_000,
        capacity_per_instance: 4,
        ..AlgorithmConfig::default()
    };
    let mut times: Vec<Duration> = Vec::with_capacity(ROUNDS);
    let mut actions = 0;
    for _ in 0..ROUNDS {
        let start = Instant::now();
        let plan = decide(std::hint::black_box(&snapshot), &config, now);
        times.push(start.elapsed());
        actions = plan.len();
    }
    times.sort();
    let p50 = times[ROUNDS / 2];
    let p99 = times[ROUNDS * 99 / 100];
    println!(
        "decision: {HOSTS} hosts, {placed} mandelboxes, {actions} actions: p50 {:.3} ms, p99 {:.3} ms (goal < 5 ms)",
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3
    );
}
