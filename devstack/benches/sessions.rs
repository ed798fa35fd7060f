//! End-to-end session times on the whole local system (`make run`'s): 20 sessions of the client
//! simulator, one after another, each assign → json_transport (answered once the mandelbox is
//! ready) → TCP connect and first byte from the mandelbox → disconnect. Runs twice in one go,
//! the hosts' warm pool off (`cold`: every session creates and starts its container) and on
//! (`warm`, the default: a session claims a waiting box), and prints p50 and p99 of each step
//! side by side. Needs the workspace's binaries (`make bench` builds them), Docker with the
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
    let cold = runtime.block_on(run("cold", Some("0")));
    let warm = runtime.block_on(run("warm", None));
    println!("sessions: step                   cold p50 / p99 ms      warm p50 / p99 ms");
    for ((name, cold), (_, warm)) in cold.into_iter().zip(warm) {
        println!(
            "sessions: {name:<22} {:>8.1} / {:>8.1}      {:>8.1} / {:>8.1}",
            cold.0, cold.1, warm.0, warm.1
        );
    }
}

/// One system, 20 sessions; `warm`: the hosts' `WHIST_WARM_MANDELBOXES` (`None`: the default).
/// Returns each step's p50 and p99 in milliseconds.
async fn run(label: &str, warm: Option<&str>) -> Vec<(&'static str, (f64, f64))> {
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
    if let Some(warm) = warm {
        options
            .host_env
            .push(("WHIST_WARM_MANDELBOXES".to_owned(), warm.to_owned()));
    }
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
                "sessions ({label}): first host ready and first session done {:.1} s after start",
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
        "sessions ({label}): {} sessions after the first, {} assign attempts",
        SESSIONS - 1,
        attempts
    );
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    [
        ("assign", assign),
        ("json_transport answer", json_transport),
        ("first TCP byte", first_byte),
        ("whole session", total),
    ]
    .into_iter()
    .map(|(name, mut samples)| {
        samples.sort();
        let p = |q| ms(percentile(&samples, q));
        (name, (p(50.0), p(99.0)))
    })
    .collect()
}
