//! The reliability suite: faults done to the whole running system (`make run`'s: devstack, the
//! scaling service launching into moto, a host service per instance on the real Docker
//! Engine), each scenario bounded in time and ending with the invariant check of
//! `devstack::invariants` (no leaked container, directory, port, TTY, row or instance; the
//! database, Docker and EC2 agree) and a count of the client requests sent and answered.
//!
//! `make test` runs the short form; `make chaos` the full one (`WHIST_CHAOS=full`: a bigger
//! burst) and then writes each scenario's figures into `docs/reliability.md`
//! (`whist-devstack chaos-report`). Figures go to `WHIST_CHAOS_REPORT_DIR` (default: the test
//! target's temporary directory), one JSON file per scenario.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_ec2::types::InstanceStateName;
use devstack::client::{AccessToken, Assignment, Client, ClientError, ClientOptions, Connection};
use devstack::ec2_faults::{Fault, FaultRates};
use devstack::imds::Identity;
use devstack::invariants::{self, instance_rows, mandelbox_rows};
use devstack::stack::StackOptions;
use devstack::system::{HOST_CAPACITY, System, SystemOptions};
use nix::sys::signal::Signal;
use serde_json::json;

/// Bound on every wait and on recovery.
const DEADLINE: Duration = Duration::from_secs(150);

fn full() -> bool {
    std::env::var("WHIST_CHAOS").is_ok_and(|v| v == "full")
}

fn moto_bin() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../.venv/bin/moto_server"
    ))
}

/// A system plus the client side of a scenario.
struct Harness {
    system: System,
    client: Client,
    sql: tokio_postgres::Client,
    _state: tempfile::TempDir,
}

async fn up(regions: &[&str], desired: u32, max: u32, scaling_env: &[(&str, &str)]) -> Harness {
    up_with(regions, desired, max, scaling_env, None).await
}

async fn up_with(
    regions: &[&str],
    desired: u32,
    max: u32,
    scaling_env: &[(&str, &str)],
    ec2_faults: Option<(FaultRates, Vec<(String, Fault)>)>,
) -> Harness {
    up_configured(regions, desired, max, scaling_env, |options| {
        if let Some((rates, queue)) = ec2_faults {
            options.ec2_faults = Some(rates);
            options.ec2_fault_queue = queue;
        }
    })
    .await
}

/// The system of [`up`], with `configure` applied to its options last.
async fn up_configured(
    regions: &[&str],
    desired: u32,
    max: u32,
    scaling_env: &[(&str, &str)],
    configure: impl FnOnce(&mut SystemOptions),
) -> Harness {
    let state = tempfile::tempdir().unwrap();
    let mut options = SystemOptions::new(StackOptions {
        state_dir: state.path().to_owned(),
        moto_bin: Some(moto_bin()),
        graphql_port: 0,
        control_port: 0,
        admin_secret: None,
        default_identity: Identity::local("i-0chaos0000000000", regions[0]),
        default_instance_row: None,
    });
    options.regions = regions.iter().map(|r| (*r).to_owned()).collect();
    options.desired_free_mandelboxes = desired;
    options.max_instances_per_region = max;
    options.scheduler_interval_secs = 2;
    options.host_stop_grace = Duration::from_secs(20);
    // A client that never comes is given up on in 15 s (60 s in production), so abandoned
    // assignments are cleaned within the scenario's bound.
    options.host_env = vec![("WHIST_JSON_TRANSPORT_TIMEOUT".into(), "15s".into())];
    options.scaling_env = scaling_env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    configure(&mut options);
    let system = System::up(options).await.unwrap();
    let sql = devstack::postgres::connect(system.stack().database_url())
        .await
        .unwrap();
    let client = Client::new(ClientOptions {
        scaling_url: system.scaling_url().to_owned(),
        control_url: Some(system.stack().control_url()),
        regions: regions.iter().map(|r| (*r).to_owned()).collect(),
        ..ClientOptions::default()
    })
    .unwrap();
    Harness {
        system,
        client,
        sql,
        _state: state,
    }
}

impl Harness {
    /// Waits until `count` hosts are ACTIVE with their fingerprint published.
    async fn active_hosts(&self, count: usize) -> Vec<invariants::InstanceRow> {
        let started = Instant::now();
        loop {
            let rows: Vec<_> = instance_rows(&self.sql)
                .await
                .unwrap()
                .into_iter()
                .filter(|r| r.status == "ACTIVE" && r.tls_fingerprint.is_some())
                .collect();
            if rows.len() >= count {
                return rows;
            }
            if started.elapsed() > DEADLINE {
                self.dump();
                panic!("{count} ACTIVE hosts never came (have {})", rows.len());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits for the invariants; fails with what is still wrong. Returns the time it took.
    async fn settled(&self) -> Duration {
        let (report, took) = invariants::settle(&self.system, DEADLINE).await;
        if !report.holds() {
            self.dump();
            panic!(
                "the system did not settle within {DEADLINE:?}: {:#?}",
                report.violations
            );
        }
        took
    }

    fn dump(&self) {
        let tail = |path: &std::path::Path| {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(40)..].join("\n")
        };
        eprintln!("--- scaling ---\n{}", tail(self.system.scaling_log()));
        for host in self.system.fleet().hosts() {
            eprintln!("--- host {} ---\n{}", host.instance_id, tail(&host.log));
        }
    }

    async fn token(&self, user: &str) -> AccessToken {
        self.client.token(user).await.unwrap()
    }
}

/// What a client of a scenario ended with.
#[derive(Debug)]
enum Outcome {
    /// Connected to its mandelbox.
    Connected(Box<Connection>),
    /// Refused or failed with an answer (an HTTP error, a closed connection): answered.
    Refused(String),
}

/// A session as a patient client runs it: json_transport retried for a while when the host
/// cannot be reached (a host restarting), since the client app retries too.
async fn session(client: &Client, token: &AccessToken, assignment: &Assignment) -> Outcome {
    let started = Instant::now();
    let answer = loop {
        match client
            .json_transport(assignment, token, r#"{"chaos":true}"#)
            .await
        {
            Ok(answer) => break answer,
            Err(ClientError::Request { .. } | ClientError::Io { .. })
                if started.elapsed() < Duration::from_secs(30) =>
            {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(error) => return Outcome::Refused(error.to_string()),
        }
    };
    let Some(port) = answer.port(32273) else {
        return Outcome::Refused("no session port".into());
    };
    match client.connect(assignment.ip, port).await {
        Ok(connection) => Outcome::Connected(Box::new(connection)),
        Err(error) => Outcome::Refused(error.to_string()),
    }
}

/// One scenario's figures, as `docs/reliability.md` shows them.
#[derive(Debug, Default)]
struct Figures {
    scenario: &'static str,
    what: String,
    sent: usize,
    answered: usize,
    succeeded: usize,
    refused: usize,
    recovery: Duration,
    leaks: usize,
    notes: String,
}

/// Whether any mandelbox row still has a user; warm boxes (rows without one) stay.
async fn users_hold_mandelboxes(sql: &tokio_postgres::Client) -> bool {
    mandelbox_rows(sql)
        .await
        .unwrap()
        .iter()
        .any(|r| r.user_id.is_some())
}

fn record(f: &Figures) {
    let dir = std::env::var_os("WHIST_CHAOS_REPORT_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("chaos"));
    std::fs::create_dir_all(&dir).unwrap();
    let value = json!({
        "scenario": f.scenario,
        "what": f.what,
        "form": if full() { "full" } else { "short" },
        "sent": f.sent,
        "answered": f.answered,
        "succeeded": f.succeeded,
        "refused": f.refused,
        "recovery_seconds": (f.recovery.as_secs_f64() * 10.0).round() / 10.0,
        "leaks": f.leaks,
        "notes": f.notes,
        "at": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    });
    std::fs::write(
        dir.join(format!("{}.json", f.scenario)),
        serde_json::to_vec_pretty(&value).unwrap(),
    )
    .unwrap();
    eprintln!("{value}");
}

/// Assigns `n` users at once and waits for all answers.
async fn assign_many(
    h: &Harness,
    users: &[String],
) -> Vec<(AccessToken, Result<Assignment, ClientError>)> {
    let mut tokens = Vec::new();
    for user in users {
        tokens.push(h.token(user).await);
    }
    let request = h.client.assign_request(None);
    let results =
        futures::future::join_all(tokens.iter().map(|token| h.client.assign(token, &request)))
            .await;
    tokens.into_iter().zip(results).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_killed_during_spin_ups() {
    let h = up(&["us-east-1"], HOST_CAPACITY, 3, &[]).await;
    let host = h.active_hosts(1).await.remove(0);
    let users: Vec<String> = (0..HOST_CAPACITY).map(|n| format!("spinup-{n}")).collect();
    let assigned = assign_many(&h, &users).await;
    let assigned: Vec<(AccessToken, Assignment)> = assigned
        .into_iter()
        .map(|(t, r)| (t, r.expect("the buffer serves both")))
        .collect();
    assert!(
        assigned
            .iter()
            .all(|(_, a)| a.ip.to_string() == host.ip.clone().unwrap())
    );
    // The clients' json_transport requests go out; the host dies while it starts their
    // mandelboxes (the rows are ALLOCATED, containers being created).
    let client = &h.client;
    let sessions = assigned
        .iter()
        .map(|(token, assignment)| session(client, token, assignment));
    let kill_at = Instant::now();
    let (outcomes, killed) = tokio::join!(futures::future::join_all(sessions), async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        h.system.fleet().signal(&host.id, Signal::SIGKILL)
    });
    assert!(killed, "the host service was running");
    let mut figures = Figures {
        scenario: "host_killed_during_spin_ups",
        what: format!(
            "SIGKILL of a host service 100 ms into {} concurrent spin-ups; restarted as systemd would",
            HOST_CAPACITY
        ),
        sent: outcomes.len(),
        ..Figures::default()
    };
    for outcome in outcomes {
        figures.answered += 1;
        match outcome {
            Outcome::Connected(c) => {
                figures.succeeded += 1;
                c.close().await;
            }
            Outcome::Refused(why) => {
                figures.refused += 1;
                figures.notes = format!("refused: {why}");
            }
        }
    }
    let restarted = h.system.fleet().host(&host.id).unwrap();
    assert!(
        restarted.starts >= 2,
        "the fleet restarted it: {restarted:?}"
    );
    h.settled().await;
    figures.recovery = kill_at.elapsed();
    record(&figures);
    h.system.down().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_killed_during_teardown() {
    let h = up(&["us-east-1"], HOST_CAPACITY, 3, &[]).await;
    let host = h.active_hosts(1).await.remove(0);
    let users = vec!["teardown-0".to_owned()];
    let (token, assignment) = assign_many(&h, &users).await.remove(0);
    let assignment = assignment.unwrap();
    let Outcome::Connected(connection) = session(&h.client, &token, &assignment).await else {
        panic!("the session should start");
    };
    // The client leaves; the mandelbox exits and the host starts tearing it down; the host dies.
    connection.close().await;
    let kill_at = Instant::now();
    // Kill once the teardown has begun: the container has exited (Docker's die event). The
    // host's warm boxes keep running meanwhile.
    let mine = assignment.mandelbox_id.to_string();
    loop {
        let containers = invariants::containers_of(&host.id).unwrap();
        if containers
            .iter()
            .filter(|c| c.mandelbox_id.as_deref() == Some(mine.as_str()))
            .all(|c| c.state != "running")
        {
            break;
        }
        assert!(kill_at.elapsed() < DEADLINE, "the mandelbox never exited");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(h.system.fleet().signal(&host.id, Signal::SIGKILL));
    let recovery = h.settled().await;
    let rows = mandelbox_rows(&h.sql).await.unwrap();
    assert!(
        rows.iter()
            .all(|r| r.user_id.is_none() && r.id != assignment.mandelbox_id),
        "the torn-down mandelbox's row is gone, only warm boxes are left: {rows:?}"
    );
    record(&Figures {
        scenario: "host_killed_during_teardown",
        what: "SIGKILL of a host service while it tears down a mandelbox whose client left".into(),
        sent: 1,
        answered: 1,
        succeeded: 1,
        recovery,
        ..Figures::default()
    });
    h.system.down().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_killed_during_drain() {
    let h = up(&["us-east-1"], HOST_CAPACITY, 3, &[]).await;
    let host = h.active_hosts(1).await.remove(0);
    let users = vec!["drain-0".to_owned()];
    let (token, assignment) = assign_many(&h, &users).await.remove(0);
    let assignment = assignment.unwrap();
    let Outcome::Connected(connection) = session(&h.client, &token, &assignment).await else {
        panic!("the session should start");
    };
    // The host is told to drain (as the scaling service does, by its row), with a user on it;
    // it dies while it waits for that user.
    h.sql
        .execute(
            "UPDATE whist.instances SET status = 'DRAINING' WHERE id = $1",
            &[&host.id],
        )
        .await
        .unwrap();
    let drain_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(h.system.fleet().signal(&host.id, Signal::SIGKILL));
    // Restarted, it finds its row DRAINING and finishes the drain: everything on it removed,
    // its row deleted, exit 0, and the instance powered off (terminated in moto). The scaling
    // service replaces the capacity.
    let started = Instant::now();
    let info = loop {
        let info = h.system.fleet().host(&host.id).unwrap();
        if info.powered_off {
            break info;
        }
        if started.elapsed() > DEADLINE {
            h.dump();
            panic!("the drained host never powered off: {info:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(info.exits.last(), Some(&Some(0)), "{info:?}");
    drop(connection);
    let replacement = h.active_hosts(1).await;
    assert!(replacement.iter().all(|r| r.id != host.id));
    h.settled().await;
    let ec2 = devstack::moto::ec2_client(&h.system.stack().moto_endpoint().unwrap(), "us-east-1");
    let moto = invariants::moto_instances(&ec2).await.unwrap();
    assert_eq!(moto.get(&host.id), Some(&InstanceStateName::Terminated));
    record(&Figures {
        scenario: "host_killed_during_drain",
        what: "SIGKILL of a draining host service with a user on it; restarted, it finishes the drain and powers off".into(),
        sent: 1,
        answered: 1,
        succeeded: 1,
        recovery: drain_at.elapsed(),
        notes: "the user's session ends with the drain (as in the original)".into(),
        ..Figures::default()
    });
    h.system.down().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_service_killed_during_a_launch() {
    let mut h = up(&["us-east-1"], HOST_CAPACITY, 3, &[]).await;
    let first = h.active_hosts(1).await.remove(0);
    let ec2 = devstack::moto::ec2_client(&h.system.stack().moto_endpoint().unwrap(), "us-east-1");
    // A user takes a slot (and keeps it: a session runs throughout): the buffer drops below 2
    // and a launch starts. The scaling service is killed the moment the instance exists in
    // EC2, before its row does.
    let (token, assignment) = assign_many(&h, &["launch-0".to_owned()]).await.remove(0);
    let assignment = assignment.unwrap();
    let pid = h.system.scaling_pid().unwrap();
    let started = Instant::now();
    let watch = async {
        loop {
            let moto = invariants::moto_instances(&ec2).await.unwrap();
            if let Some(id) = moto.keys().find(|id| **id != first.id) {
                let _ =
                    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL);
                break (id.clone(), Instant::now());
            }
            assert!(started.elapsed() < DEADLINE, "no launch began");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let (outcome, (launched, kill_at)) =
        tokio::join!(session(&h.client, &token, &assignment), watch);
    let Outcome::Connected(connection) = outcome else {
        panic!("the session should start: {outcome:?}");
    };
    h.system.signal_scaling(Signal::SIGKILL).await;
    let had_row = instance_rows(&h.sql)
        .await
        .unwrap()
        .iter()
        .any(|r| r.id == launched);
    h.system.start_scaling().await.unwrap();
    // The restarted service finishes the launch: the instance gets its row and serves; nothing
    // was launched twice, nothing terminated as an orphan.
    // (The new process takes the leader lease once the killed one's lapses.)
    let rows = h.active_hosts(2).await;
    assert!(rows.iter().any(|r| r.id == launched), "{rows:?}");
    let recovery = h.settled().await.max(kill_at.elapsed());
    connection.close().await;
    let moto = invariants::moto_instances(&ec2).await.unwrap();
    assert_eq!(
        moto.len(),
        2,
        "exactly one instance launched for the one launch: {moto:?}"
    );
    record(&Figures {
        scenario: "scaling_service_killed_during_a_launch",
        what:
            "SIGKILL of the scaling service once RunInstances answered, before the row; restarted"
                .into(),
        sent: 1,
        answered: 1,
        succeeded: 1,
        recovery,
        notes: format!(
            "row existed at the kill: {had_row}; instances in EC2 afterwards: {}",
            moto.len()
        ),
        ..Figures::default()
    });
    h.system.down().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_assigns_across_three_regions() {
    let regions = ["us-east-1", "us-west-2", "eu-central-1"];
    let (requests, window) = if full() {
        (200usize, Duration::from_secs(10))
    } else {
        (60usize, Duration::from_secs(3))
    };
    // One host per region at most: 2 slots each, 6 in all.
    let h = Arc::new(up(&regions, HOST_CAPACITY, 1, &[]).await);
    h.active_hosts(regions.len()).await;
    let mut tokens = Vec::new();
    for n in 0..requests {
        tokens.push(h.token(&format!("burst-{n}")).await);
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (n, token) in tokens.into_iter().enumerate() {
        let h = h.clone();
        let at = window.mul_f64(n as f64 / requests as f64);
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(tokio::time::Instant::from_std(started + at)).await;
            // Each client lists the regions nearest first, in its own order.
            let mut order = regions.to_vec();
            order.rotate_left(n % regions.len());
            let mut request = h.client.assign_request(None);
            request.regions = order.iter().map(|r| (*r).to_owned()).collect();
            h.client.assign(&token, &request).await
        }));
    }
    let mut figures = Figures {
        scenario: "assign_burst_three_regions",
        what: format!(
            "{requests} assign requests in {} s across 3 regions, 6 slots in all",
            window.as_secs()
        ),
        sent: requests,
        ..Figures::default()
    };
    let mut granted = Vec::new();
    let mut codes = std::collections::BTreeMap::<String, usize>::new();
    for task in tasks {
        match task.await.unwrap() {
            Ok(assignment) => {
                figures.answered += 1;
                figures.succeeded += 1;
                granted.push(assignment.mandelbox_id);
            }
            Err(ClientError::Refused { status, code, .. }) => {
                figures.answered += 1;
                figures.refused += 1;
                *codes
                    .entry(format!("{status} {}", code.unwrap_or_default()))
                    .or_default() += 1;
            }
            Err(other) => panic!("an assign request got no answer: {other}"),
        }
    }
    let answered_in = started.elapsed();
    assert_eq!(figures.answered, requests, "every request is answered");
    granted.sort();
    granted.dedup();
    assert_eq!(granted.len(), figures.succeeded, "no mandelbox given twice");
    // The capacity: never more mandelboxes on a host than it holds.
    let rows = mandelbox_rows(&h.sql).await.unwrap();
    let mut per_host = std::collections::BTreeMap::<&str, u32>::new();
    for row in &rows {
        *per_host.entry(row.instance_id.as_str()).or_default() += 1;
    }
    assert!(
        per_host.values().all(|n| *n <= HOST_CAPACITY),
        "a host was given more than its capacity: {per_host:?}"
    );
    assert!(
        figures.succeeded <= regions.len() * HOST_CAPACITY as usize,
        "{} granted",
        figures.succeeded
    );
    assert!(figures.succeeded > 0, "the buffer served someone");
    // The granted clients never come: their hosts give up on them (15 s here) and clean up.
    let cleanup = Instant::now();
    while users_hold_mandelboxes(&h.sql).await {
        if cleanup.elapsed() > DEADLINE {
            h.dump();
            panic!("abandoned assignments were never cleaned up");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // The burst emptied the warm pools; with the users gone every ACTIVE host fills its pool
    // again: all its units are warm boxes.
    let refill = Instant::now();
    loop {
        let instances = instance_rows(&h.sql).await.unwrap();
        let rows = mandelbox_rows(&h.sql).await.unwrap();
        let full = instances.iter().filter(|i| i.status == "ACTIVE").all(|i| {
            let warm = rows
                .iter()
                .filter(|r| r.instance_id == i.id && r.status == "WAITING")
                .count();
            i.remaining_capacity == 0 && warm == HOST_CAPACITY as usize
        });
        if full {
            break;
        }
        if refill.elapsed() > DEADLINE {
            h.dump();
            panic!("the warm pools never refilled: {instances:?} {rows:?}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    h.settled().await;
    figures.recovery = started.elapsed();
    figures.notes = format!(
        "all answered within {:.1} s; refusals: {}",
        answered_in.as_secs_f64(),
        codes
            .iter()
            .map(|(k, v)| format!("{v}× {k}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    record(&figures);
    let h = Arc::into_inner(h).unwrap();
    h.system.down().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ec2_faults_during_scale_up() {
    // A third of the scaling service's EC2 calls fail: throttled, 5xx, answered after taking
    // effect (the answer lost), or 2 s late. The fleet still reaches the buffer, without a
    // duplicate instance, and serves a session.
    let rates = FaultRates {
        throttle: 0.12,
        server_error: 0.1,
        lost_response: 0.05,
        slow: 0.06,
        delay: Duration::from_secs(2),
    };
    let started = Instant::now();
    // And for certain: the first launch's answer is lost after it took effect, and the first
    // look at the instances is throttled.
    let queue = vec![
        (
            "RunInstances".to_owned(),
            Fault::LoseResponse(500, "InternalError"),
        ),
        (
            "DescribeInstances".to_owned(),
            Fault::Error(400, "RequestLimitExceeded"),
        ),
    ];
    let h = up_with(
        &["us-east-1"],
        2 * HOST_CAPACITY,
        3,
        &[],
        Some((rates, queue)),
    )
    .await;
    let rows = h.active_hosts(2).await;
    let to_buffer = started.elapsed();
    let ec2 = devstack::moto::ec2_client(&h.system.stack().moto_endpoint().unwrap(), "us-east-1");
    let at_buffer = invariants::moto_instances(&ec2).await.unwrap();
    let running_at_buffer = at_buffer
        .values()
        .filter(|s| **s == InstanceStateName::Running)
        .count();
    assert_eq!(
        running_at_buffer, 2,
        "the lost RunInstances answer launched nothing twice: {at_buffer:?}"
    );
    let user = "ec2-faults-0".to_owned();
    let (token, assignment) = assign_many(&h, &[user]).await.remove(0);
    let assignment = assignment.unwrap();
    let Outcome::Connected(connection) = session(&h.client, &token, &assignment).await else {
        panic!("the session should start");
    };
    connection.close().await;
    h.settled().await;
    let moto = invariants::moto_instances(&ec2).await.unwrap();
    let running: Vec<_> = moto
        .iter()
        .filter(|(_, s)| **s == InstanceStateName::Running)
        .collect();
    assert!(running.len() >= rows.len().min(2), "{moto:?}");

    let (calls, faults) = h.system.ec2_faults().unwrap().counts();
    assert!(faults > 0, "faults were injected ({calls} calls)");
    record(&Figures {
        scenario: "ec2_faults_during_scale_up",
        what: "a third of EC2 calls throttled, 5xx, lost after taking effect or 2 s late, from zero to a buffer of 4".into(),
        sent: 1,
        answered: 1,
        succeeded: 1,
        recovery: to_buffer,
        notes: format!(
            "{faults} of {calls} EC2 calls faulted; 2 instances at the buffer, none launched twice; {} in EC2 at the end (the session's slot brings a third); recovery = start to buffer",
            moto.len()
        ),
        ..Figures::default()
    });
    h.system.down().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_outage_under_load() {
    let outage = if full() {
        Duration::from_secs(30)
    } else {
        Duration::from_secs(10)
    };
    // The load: 3 assign requests a second, each a user of its own, from 3 s before the stop
    // until the restart (what comes after is the recovery, measured without load the
    // scenario adds). A client that is granted a mandelbox starts its session and leaves at
    // once (as the app would connect), so no assignment is left to time out.
    let (lead, per_second) = (Duration::from_secs(3), 3.0);
    let mut h = up(&["us-east-1"], HOST_CAPACITY, 3, &[]).await;
    let host = h.active_hosts(1).await.remove(0);
    let (token, assignment) = assign_many(&h, &["outage-session".to_owned()])
        .await
        .remove(0);
    let assignment = assignment.unwrap();
    let Outcome::Connected(mut connection) = session(&h.client, &token, &assignment).await else {
        panic!("the session should start");
    };
    // Enough for the stop, which takes up to the GraphQL endpoint's shutdown deadline (2 s)
    // and pg_ctl's; those due after the restart are not sent.
    let span = lead + outage + Duration::from_secs(5);
    let requests = (span.as_secs_f64() * per_second) as usize;
    let load_over = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tokens = Vec::new();
    for n in 0..requests {
        tokens.push(h.token(&format!("outage-load-{n}")).await);
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (n, token) in tokens.into_iter().enumerate() {
        let client = h.client.clone();
        let load_over = load_over.clone();
        let at = span.mul_f64(n as f64 / requests as f64);
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(tokio::time::Instant::from_std(started + at)).await;
            if load_over.load(std::sync::atomic::Ordering::SeqCst) {
                return None;
            }
            let sent = started.elapsed();
            let result = client.assign(&token, &client.assign_request(None)).await;
            let answered = started.elapsed();
            let outcome = match &result {
                Ok(assignment) => Some(match session(&client, &token, assignment).await {
                    Outcome::Connected(c) => {
                        c.close().await;
                        Ok(())
                    }
                    Outcome::Refused(why) => Err(why),
                }),
                Err(_) => None,
            };
            Some((sent, answered, result, outcome))
        }));
    }
    // The outage, while the running session holds its connection open (a close before the
    // restart fails the scenario).
    let stack = h.system.stack();
    let outage_driver = async {
        tokio::time::sleep(lead).await;
        let stopping = started.elapsed();
        stack.stop_database().await.unwrap();
        let stopped = started.elapsed();
        tokio::time::sleep(outage).await;
        stack.start_database().await.unwrap();
        load_over.store(true, std::sync::atomic::Ordering::SeqCst);
        ((stopping, stopped), started.elapsed(), Instant::now())
    };
    let (stopped, restarted, restarted_at) = tokio::select! {
        held = connection.hold(DEADLINE) => {
            panic!("the running session's connection did not stay open through the outage: {held:?}")
        }
        times = outage_driver => times,
    };
    // The test's own connection to PostgreSQL ended with the server.
    h.sql = devstack::postgres::connect(h.system.stack().database_url())
        .await
        .unwrap();

    // After the restart: a new user's session, as its client retries (503s and refused
    // connections while the services reconnect).
    let token = h.token("outage-after").await;
    let request = h.client.assign_request(None);
    let mut probe_refusals = 0;
    let mut first_grant = None;
    let fresh = loop {
        let outcome = match h.client.assign(&token, &request).await {
            Ok(assignment) => {
                first_grant.get_or_insert(restarted_at.elapsed());
                session(&h.client, &token, &assignment).await
            }
            Err(error) => Outcome::Refused(error.to_string()),
        };
        match outcome {
            Outcome::Connected(c) => break c,
            Outcome::Refused(why) => {
                probe_refusals += 1;
                if restarted_at.elapsed() > DEADLINE {
                    h.dump();
                    panic!("no new session within {DEADLINE:?} of the restart: {why}");
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    };
    let first_session = restarted_at.elapsed();
    let first_grant = first_grant.unwrap_or_default();
    fresh.close().await;
    h.settled().await;
    let recovery = restarted_at.elapsed();

    let mut figures = Figures {
        scenario: "database_outage_under_load",
        what: format!(
            "the GraphQL endpoint and PostgreSQL stopped for {} s, then started again on the same ports; {per_second} assign requests a second (a user each) from 3 s before the stop to the restart; a session running throughout",
            outage.as_secs()
        ),
        recovery,
        ..Figures::default()
    };
    let mut codes = std::collections::BTreeMap::<String, usize>::new();
    let (mut in_outage, mut in_outage_503, mut granted_in_outage) = (0, 0, 0);
    let (mut connected, mut session_failures) = (0, Vec::new());
    let mut slowest = Duration::ZERO;
    let mut unanswered = Vec::new();
    for task in tasks {
        let Some((sent, answered, result, outcome)) = task.await.unwrap() else {
            continue;
        };
        figures.sent += 1;
        let during = sent >= stopped.0 && sent < restarted;
        in_outage += usize::from(during);
        match result {
            Ok(_) => {
                figures.answered += 1;
                figures.succeeded += 1;
                granted_in_outage += usize::from(during);
                slowest = slowest.max(answered - sent);
            }
            Err(ClientError::Refused { status, code, .. }) => {
                figures.answered += 1;
                figures.refused += 1;
                in_outage_503 += usize::from(during && status == 503);
                slowest = slowest.max(answered - sent);
                *codes
                    .entry(format!("{status} {}", code.unwrap_or_default()))
                    .or_default() += 1;
            }
            Err(other) => unanswered.push(format!("sent at {sent:?}: {other}")),
        }
        match outcome {
            Some(Ok(())) => connected += 1,
            Some(Err(why)) => {
                session_failures.push((sent.as_secs_f64() - stopped.0.as_secs_f64(), why))
            }
            None => {}
        }
    }
    if !unanswered.is_empty() {
        h.dump();
        panic!(
            "{} assign requests got no answer: {unanswered:#?}",
            unanswered.len()
        );
    }
    assert!(
        codes.keys().all(|c| c.starts_with("503 ")),
        "refusals are 503s: {codes:?}"
    );
    assert!(in_outage_503 > 0, "the outage was seen: {codes:?}");

    // The running session survived: its mandelbox is RUNNING, its container runs and its
    // connection is still open.
    let rows = mandelbox_rows(&h.sql).await.unwrap();
    let row = rows
        .iter()
        .find(|r| r.id == assignment.mandelbox_id)
        .unwrap_or_else(|| panic!("the running session's row is gone: {rows:?}"));
    assert_eq!(row.status, "RUNNING", "{row:?}");
    let id = assignment.mandelbox_id.to_string();
    let containers = invariants::containers_of(&host.id).unwrap();
    assert!(
        containers
            .iter()
            .any(|c| c.mandelbox_id.as_deref() == Some(id.as_str()) && c.state == "running"),
        "the running session's container runs: {containers:?}"
    );
    connection
        .hold(Duration::from_secs(1))
        .await
        .expect("the running session's connection is still open");
    connection.close().await;
    h.settled().await;

    figures.notes = format!(
        "recovery = restart to a new session served and the invariants held (first assign granted after {:.1} s, first new session connected after {:.1} s, {probe_refusals} refused tries); stop took {:.1} s; {in_outage} requests sent during the outage, {in_outage_503} answered 503, {granted_in_outage} granted; slowest answer {:.1} s; refusals: {}; granted clients' sessions: {connected} connected, {} failed{}; the running session survived (RUNNING, connection open)",
        first_grant.as_secs_f64(),
        first_session.as_secs_f64(),
        (stopped.1 - stopped.0).as_secs_f64(),
        slowest.as_secs_f64(),
        codes
            .iter()
            .map(|(k, v)| format!("{v}× {k}"))
            .collect::<Vec<_>>()
            .join(", "),
        session_failures.len(),
        if session_failures.is_empty() {
            String::new()
        } else {
            format!(
                " (requests sent at {} s from the stop)",
                session_failures
                    .iter()
                    .map(|(at, _)| format!("{at:+.1}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        },
    );
    if !session_failures.is_empty() {
        eprintln!("granted clients' session failures: {session_failures:#?}");
    }
    record(&figures);
    h.system.down().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_event_stream_cut() {
    // Each host reaches Docker through a proxy whose event streams can be cut (restarting the
    // engine itself is not possible on a shared machine). One host at most: no launch or
    // drain comes in between.
    let h = up_configured(&["us-east-1"], HOST_CAPACITY, 1, &[], |options| {
        options.docker_proxy = true;
    })
    .await;
    let host = h.active_hosts(1).await.remove(0);
    let (token, assignment) = assign_many(&h, &["events-cut-0".to_owned()])
        .await
        .remove(0);
    let assignment = assignment.unwrap();
    let Outcome::Connected(connection) = session(&h.client, &token, &assignment).await else {
        panic!("the session should start");
    };
    let fleet = h.system.fleet();
    let before = fleet.docker_proxy_stats(&host.id).unwrap();
    assert!(
        before.events_open >= 1,
        "the host follows Docker's events through its proxy: {before:?}"
    );
    // The stream is cut and stays down (reopen attempts closed unanswered) for `down_for`; the
    // client leaves right after the cut, so the container exits while the stream is down.
    let down_for = Duration::from_secs(if full() { 10 } else { 5 });
    let cut_at = Instant::now();
    let cut = fleet.cut_docker_events(&host.id, down_for).unwrap();
    assert!(cut >= 1, "an event stream was cut");
    connection.close().await;
    let id = assignment.mandelbox_id.to_string();
    let mut exited = None;
    let torn_down = loop {
        let containers = invariants::containers_of(&host.id).unwrap();
        let ours = containers
            .iter()
            .find(|c| c.mandelbox_id.as_deref() == Some(id.as_str()));
        if exited.is_none() && ours.is_none_or(|c| c.state != "running") {
            exited = Some(cut_at.elapsed());
        }
        let rows = mandelbox_rows(&h.sql).await.unwrap();
        if ours.is_none() && rows.iter().all(|r| r.id != assignment.mandelbox_id) {
            break cut_at.elapsed();
        }
        if cut_at.elapsed() > DEADLINE {
            h.dump();
            panic!("the mandelbox whose exit the event stream missed was never torn down");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let exited = exited.unwrap();
    assert!(
        exited < down_for,
        "the container exited while the stream was down ({exited:?} after the cut)"
    );
    h.settled().await;
    let recovery = cut_at.elapsed();
    // The host reopened its stream once the proxy let it.
    let (reopened, stats) = loop {
        let stats = fleet.docker_proxy_stats(&host.id).unwrap();
        if stats.events_open >= 1 && stats.events_opened > before.events_opened {
            break (cut_at.elapsed(), stats);
        }
        assert!(
            cut_at.elapsed() < DEADLINE,
            "the host never reopened its event stream: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let log = std::fs::read_to_string(&h.system.fleet().host(&host.id).unwrap().log).unwrap();
    assert!(
        log.contains("Docker event stream failed; reopening")
            || log.contains("Docker event stream ended; reopening"),
        "the host saw its stream break"
    );
    record(&Figures {
        scenario: "docker_event_stream_cut",
        what: format!(
            "a host's Docker event stream cut (its proxy closes it and refuses reopens for {} s); the client leaves at the cut, so its container exits unseen",
            down_for.as_secs()
        ),
        sent: 1,
        answered: 1,
        succeeded: 1,
        recovery,
        notes: format!(
            "recovery = cut to invariants held; seen exited {:.1} s and torn down (container and row gone) {:.1} s after the cut, while the stream was still down (the host re-checks its containers at each reopen attempt); {} reopen attempts refused, the stream open again {:.1} s after the cut",
            exited.as_secs_f64(),
            torn_down.as_secs_f64(),
            stats.events_refused,
            reopened.as_secs_f64(),
        ),
        ..Figures::default()
    });
    h.system.down().await.unwrap();
}

/// Assigns each of `tokens` at once; each one's latency, panicking on any refusal (a real user
/// must be served).
async fn timed_assigns(h: &Harness, tokens: &[AccessToken]) -> Vec<Duration> {
    let request = h.client.assign_request(None);
    let results = futures::future::join_all(tokens.iter().map(|token| async {
        let started = Instant::now();
        let result = h.client.assign(token, &request).await;
        (started.elapsed(), result)
    }))
    .await;
    results
        .into_iter()
        .map(|(took, result)| match result {
            Ok(_) => took,
            Err(error) => {
                h.dump();
                panic!("a real user was not served: {error}");
            }
        })
        .collect()
}

/// The `q` quantile (nearest rank) of `samples`.
fn quantile(samples: &[Duration], q: f64) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Anonymous and garbage assign requests as fast as `workers` loops can send them from
/// `sources` (loopback addresses other than the users'), until `count` are sent or `limit`
/// passed or `stop`. Returns (sent, answered, answers by status).
async fn flood(
    url: String,
    sources: Vec<std::net::IpAddr>,
    workers: usize,
    count: usize,
    limit: Duration,
    stop: tokio_util::sync::CancellationToken,
    answered_so_far: Arc<std::sync::atomic::AtomicUsize>,
) -> (usize, usize, std::collections::BTreeMap<u16, usize>) {
    use std::sync::atomic::Ordering;
    let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..workers)
        .map(|n| {
            let client = reqwest::Client::builder()
                .local_address(sources[n % sources.len()])
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap();
            let (url, sent, answered, stop) = (
                url.clone(),
                sent.clone(),
                answered_so_far.clone(),
                stop.clone(),
            );
            tokio::spawn(async move {
                let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
                loop {
                    let i = sent.fetch_add(1, Ordering::SeqCst);
                    if i >= count || started.elapsed() > limit || stop.is_cancelled() {
                        sent.fetch_sub(1, Ordering::SeqCst);
                        break;
                    }
                    let request = client.post(&url);
                    let request = match i % 3 {
                        0 => request.body("{}"),
                        1 => request.bearer_auth("not.a.token").body("garbage"),
                        _ => request
                            .header("authorization", format!("Bearer {}", "x".repeat(2048)))
                            .header("content-type", "application/json")
                            .body(r#"{"regions": 7}"#),
                    };
                    if let Ok(response) = request.send().await {
                        answered.fetch_add(1, Ordering::SeqCst);
                        *statuses.entry(response.status().as_u16()).or_default() += 1;
                    }
                }
                statuses
            })
        })
        .collect();
    let mut statuses = std::collections::BTreeMap::new();
    for task in tasks {
        for (status, n) in task.await.unwrap() {
            *statuses.entry(status).or_default() += n;
        }
    }
    (
        sent.load(Ordering::SeqCst),
        answered_so_far.load(Ordering::SeqCst),
        statuses,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_junk_while_users_assign() {
    use std::sync::atomic::Ordering;
    // Full: 10 users (5 hosts) and up to 20,000 junk requests within 30 s; short: 4 users.
    let (users, count, limit) = if full() {
        (10usize, 20_000usize, Duration::from_secs(30))
    } else {
        (4usize, 3_000usize, Duration::from_secs(10))
    };
    let hosts = users.div_ceil(HOST_CAPACITY as usize);
    let h = up(&["us-east-1"], users as u32, hosts as u32, &[]).await;
    h.active_hosts(hosts).await;
    // Without the flood.
    let mut tokens = Vec::new();
    for n in 0..users {
        tokens.push(h.token(&format!("calm-{n}")).await);
    }
    let calm = timed_assigns(&h, &tokens).await;
    // Their mandelboxes are given up on (the clients never come) and the slots come back.
    let cleanup = Instant::now();
    while users_hold_mandelboxes(&h.sql).await {
        assert!(cleanup.elapsed() < DEADLINE, "abandoned assignments stay");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    h.active_hosts(hosts).await;
    let mut tokens = Vec::new();
    for n in 0..users {
        tokens.push(h.token(&format!("flooded-{n}")).await);
    }
    // The flood, from four loopback addresses that are not the users' (127.0.0.1).
    let sources: Vec<std::net::IpAddr> = (66..70)
        .map(|n| std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, n)))
        .collect();
    let stop = tokio_util::sync::CancellationToken::new();
    let answered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let flooding = tokio::spawn(flood(
        format!("{}/mandelbox/assign", h.system.scaling_url()),
        sources,
        32,
        count,
        limit,
        stop.clone(),
        answered.clone(),
    ));
    // The users come once the flood is under way.
    while answered.load(Ordering::SeqCst) < count / 10 && started.elapsed() < limit {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let flooded = timed_assigns(&h, &tokens).await;
    let during = answered.load(Ordering::SeqCst);
    stop.cancel();
    let (sent, answered, statuses) = flooding.await.unwrap();
    let flood_took = started.elapsed();
    assert!(during > 0, "the users were served while the flood ran");
    assert_eq!(answered, sent, "every junk request got an answer");
    assert!(
        statuses.keys().all(|s| *s < 500),
        "junk gets client errors only: {statuses:?}"
    );
    let rows = mandelbox_rows(&h.sql).await.unwrap();
    assert_eq!(
        rows.iter().filter(|r| r.user_id.is_some()).count(),
        users,
        "only the real users' mandelboxes: {rows:?}"
    );
    let cleanup = Instant::now();
    while users_hold_mandelboxes(&h.sql).await {
        assert!(cleanup.elapsed() < DEADLINE, "abandoned assignments stay");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let settle = h.settled().await;
    let ms = |d: Duration| d.as_millis();
    let figures = Figures {
        scenario: "flood_of_junk_while_users_assign",
        what: format!(
            "{sent} anonymous and garbage assign requests from 4 loopback addresses, 32 at a time, while {users} real users assign"
        ),
        sent: sent + 2 * users,
        answered: answered + 2 * users,
        succeeded: 2 * users,
        refused: answered,
        recovery: settle,
        leaks: 0,
        notes: format!(
            "every real user served; their assign p99 {} ms during the flood, {} ms without (p50 {} / {} ms); flood {:.0} requests/s over {:.1} s; junk answers: {}",
            ms(quantile(&flooded, 0.99)),
            ms(quantile(&calm, 0.99)),
            ms(quantile(&flooded, 0.5)),
            ms(quantile(&calm, 0.5)),
            sent as f64 / flood_took.as_secs_f64(),
            flood_took.as_secs_f64(),
            statuses
                .iter()
                .map(|(s, n)| format!("{n}× {s}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    record(&figures);
    h.system.down().await.unwrap();
}
