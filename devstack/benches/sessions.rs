//! End-to-end session times on the whole local system (`make run`'s): 20 sessions of the client
//! simulator, one after another, each assign → json_transport (answered once the mandelbox is
//! ready) → TCP connect and first byte from the mandelbox → disconnect. Runs twice in one go,
//! the hosts' warm pool off (`cold`: every session creates and starts its container) and on
//! (`warm`, the default: a session claims a waiting box), and prints p50 and p99 of each step
//! side by side. Then 16 sessions at once on a system whose hosts keep 16 warm boxes between
//! them: their json_transport answer, how many claimed a warm box, the pool's refill and a
//! waiting box's memory. Needs the workspace's binaries (`make bench` builds them), Docker with the
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

/// Sessions started at once in the burst phase, each on a warm box of its own.
const BURST: usize = 16;

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
    runtime.block_on(burst());
}

fn system_options(state: &std::path::Path) -> SystemOptions {
    SystemOptions::new(StackOptions {
        state_dir: state.to_owned(),
        moto_bin: Some(PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../.venv/bin/moto_server"
        ))),
        graphql_port: 0,
        control_port: 0,
        admin_secret: None,
        default_identity: Identity::local("i-0bench00000000000", REGION),
        default_instance_row: None,
    })
}

/// The client simulator pointed at `system`, in the bench's region.
fn client_of(system: &System) -> Client {
    Client::new(ClientOptions {
        scaling_url: system.scaling_url().to_owned(),
        control_url: Some(system.stack().control_url()),
        regions: vec![REGION.to_owned()],
        ..ClientOptions::default()
    })
    .unwrap()
}

/// Milliseconds.
fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// `BURST` sessions at once on a system whose hosts keep `BURST` warm boxes between them: the
/// json_transport answer when every session claims a box, how many did, how long the pool takes
/// to fill again, and what one waiting box holds in memory (the stub's; the real image's is
/// larger).
async fn burst() {
    let state = tempfile::tempdir().unwrap();
    let mut options = system_options(state.path());
    options.desired_free_mandelboxes = BURST as u32;
    options.max_instances_per_region = BURST as u32;
    options.scheduler_interval_secs = 2;
    let system = System::up(options).await.unwrap();
    let sql = devstack::postgres::connect(system.stack().database_url())
        .await
        .unwrap();
    let waiting = || async {
        sql.query(
            "SELECT id FROM whist.mandelboxes WHERE status = 'WAITING'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<_, uuid::Uuid>(0).to_string())
        .collect::<std::collections::BTreeSet<String>>()
    };
    let until_full = |what: &'static str| async move {
        let started = Instant::now();
        loop {
            let boxes = waiting().await;
            if boxes.len() >= BURST {
                return (boxes, started.elapsed());
            }
            assert!(
                started.elapsed() < Duration::from_secs(300),
                "{what}: {} of {BURST} warm boxes after 300 s",
                boxes.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let (warm, filled) = until_full("the first fill").await;
    println!(
        "sessions (burst): {BURST} warm boxes waiting {:.1} s after start",
        filled.as_secs_f64()
    );
    let memory = warm_box_memory(&warm);

    let client = client_of(&system);
    let sessions: Vec<_> = (0..BURST)
        .map(|n| {
            let client = client.clone();
            tokio::spawn(async move {
                let mut session = SessionOptions::new(format!("burst-user-{n}"));
                session.wait_for_capacity = Some(Duration::from_secs(60));
                client.run_session(&session).await
            })
        })
        .collect();
    let mut answers = Vec::new();
    let mut claimed_warm = 0;
    for session in sessions {
        let report = match session.await.unwrap() {
            Ok(report) => report,
            Err(failure) => panic!("a burst session failed: {}", failure.to_json()),
        };
        if warm.contains(&report.assignment.mandelbox_id.to_string()) {
            claimed_warm += 1;
        }
        answers.push(report.timings.json_transport.unwrap());
    }
    let (_, refilled) = until_full("the refill").await;
    system.down().await.unwrap();
    answers.sort();
    println!(
        "sessions (burst): {BURST} at once, {claimed_warm} on warm boxes: json_transport answer p50 {:.1} ms, p99 {:.1} ms",
        ms(percentile(&answers, 50.0)),
        ms(percentile(&answers, 99.0))
    );
    println!(
        "sessions (burst): pool full again {:.1} s after the last session left",
        refilled.as_secs_f64()
    );
    match memory {
        Some((p50, max)) => println!(
            "sessions (burst): idle memory of one waiting stub box: p50 {p50:.1} MiB, max {max:.1} MiB (docker stats)"
        ),
        None => {
            println!("sessions (burst): idle memory of a waiting box: docker stats gave nothing")
        }
    }
}

/// The memory Docker counts for each waiting box's container, p50 and max in MiB.
fn warm_box_memory(boxes: &std::collections::BTreeSet<String>) -> Option<(f64, f64)> {
    let out = std::process::Command::new("docker")
        .args([
            "stats",
            "--no-stream",
            "--format",
            "{{.Name}} {{.MemUsage}}",
        ])
        .output()
        .ok()?;
    let mut mib: Vec<f64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|line| boxes.iter().any(|id| line.contains(id.as_str())))
        .filter_map(|line| {
            let usage = line.split_whitespace().nth(1)?;
            let (number, unit) = usage.split_at(usage.find(|c: char| c.is_ascii_alphabetic())?);
            let value: f64 = number.parse().ok()?;
            Some(match unit {
                "KiB" => value / 1024.0,
                "MiB" => value,
                "GiB" => value * 1024.0,
                "B" => value / 1024.0 / 1024.0,
                _ => return None,
            })
        })
        .collect();
    if mib.is_empty() {
        return None;
    }
    mib.sort_by(f64::total_cmp);
    Some((mib[mib.len() / 2], mib[mib.len() - 1]))
}

/// One system, 20 sessions; `warm`: the hosts' `WHIST_WARM_MANDELBOXES` (`None`: the default).
/// Returns each step's p50 and p99 in milliseconds.
async fn run(label: &str, warm: Option<&str>) -> Vec<(&'static str, (f64, f64))> {
    let state = tempfile::tempdir().unwrap();
    let mut options = system_options(state.path());
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
    let client = client_of(&system);
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
