//! End-to-end session times on the whole local system (`make run`'s): 20 sessions of the client
//! simulator, one after another, each assign → json_transport (answered once the mandelbox is
//! ready) → TCP connect and first byte from the mandelbox → disconnect. Prints p50 and p99 of
//! each step. Needs the workspace's binaries (`make bench` builds them), Docker with the
//! mandelbox test image, and moto.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use devstack::client::{Client, ClientOptions, SessionOptions};
use devstack::imds::Identity;
use devstack::stack::StackOptions;
use devstack::system::{System, SystemOptions};

const SESSIONS: usize = 20;
const REGION: &str = "us-east-1";

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn main() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(run());
}

async fn run() {
    let state = tempfile::tempdir().unwrap();
    let mut options = SystemOptions::new(StackOptions {
        state_dir: state.path().to_owned(),
        moto_bin: Some(PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../.venv/bin/moto_server"
        ))),
        graphql_port: 0,
        control_port: 0,
        admin_secret: None,
        default_identity: Identity::local("i-0bench00000000000", REGION),
        default_instance_row: None,
    });
    options.desired_free_mandelboxes = 2;
    options.max_instances_per_region = 4;
    options.scheduler_interval_secs = 2;
    let started = Instant::now();
    let system = System::up(options).await.unwrap();
    let client = Client::new(ClientOptions {
        scaling_url: system.scaling_url().to_owned(),
        control_url: Some(system.stack().control_url()),
        regions: vec![REGION.to_owned()],
        ..ClientOptions::default()
    })
    .unwrap();
    let mut assign = Vec::new();
    let mut json_transport = Vec::new();
    let mut first_byte = Vec::new();
    let mut total = Vec::new();
    let mut attempts = 0;
    for n in 0..SESSIONS {
        let mut session = SessionOptions::new(format!("bench-user-{n}"));
        // The first waits for the first host to boot; later ones find the buffer ready.
        session.wait_for_capacity = Some(Duration::from_secs(180));
        let report = match client.run_session(&session).await {
            Ok(report) => report,
            Err(failure) => panic!("session {n} failed: {}", failure.to_json()),
        };
        if n == 0 {
            println!(
                "sessions: first host ready and first session done {:.1} s after start",
                started.elapsed().as_secs_f64()
            );
            continue; // includes the cold start: reported above, not in the percentiles
        }
        attempts += report.assign_attempts;
        let t = &report.timings;
        assign.push(t.assign.unwrap());
        json_transport.push(t.json_transport.unwrap());
        first_byte.push(t.first_byte.unwrap());
        total.push(t.total);
    }
    system.down().await.unwrap();
    println!(
        "sessions: {} sessions after the first, {} assign attempts",
        SESSIONS - 1,
        attempts
    );
    for (name, mut samples) in [
        ("assign", assign),
        ("json_transport answer", json_transport),
        ("first TCP byte", first_byte),
        ("whole session", total),
    ] {
        samples.sort();
        println!(
            "sessions: {name:<22} p50 {:>8.1} ms  p99 {:>8.1} ms",
            percentile(&samples, 50.0).as_secs_f64() * 1e3,
            percentile(&samples, 99.0).as_secs_f64() * 1e3,
        );
    }
}
