//! The whole system end to end, as `make run` runs it: devstack, the scaling service launching
//! hosts into moto, a host service per launched instance on this machine's Docker Engine, and a
//! client doing what the client app does. Each step is asserted in the database, in Docker and
//! in moto: scale-up from zero, host ACTIVE, assignment, container running with its config,
//! buffer refilled, teardown after the client leaves, scale-down with drain and termination.
//!
//! Needs the workspace's binaries (`cargo build --bins`; `make test` builds them), Docker with
//! the mandelbox test image (`make setup`) and moto in `.venv`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use aws_sdk_ec2::types::{Filter, InstanceStateName};
use devstack::client::{Client, ClientOptions, SessionOptions};
use devstack::fleet::{HostInfo, LABEL_INSTANCE_ID, MANAGED_BY, TAG_MANAGED_BY};
use devstack::imds::Identity;
use devstack::stack::StackOptions;
use devstack::system::{HOST_CAPACITY, System, SystemOptions};

/// Bound on every wait: host boots take seconds here; a loaded 2-core CI machine is slower.
const STEP_DEADLINE: Duration = Duration::from_secs(120);
const REGION: &str = "us-east-1";

fn moto_bin() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../.venv/bin/moto_server"
    ))
}

/// Polls `probe` until it returns `Some`, failing the test with `what` and the services' logs
/// after [`STEP_DEADLINE`].
async fn wait_for<T, F, Fut>(system: &System, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        if started.elapsed() > STEP_DEADLINE {
            dump_logs(system);
            panic!("timed out after {STEP_DEADLINE:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn dump_logs(system: &System) {
    let tail = |path: &std::path::Path| {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    };
    eprintln!("--- scaling service ---\n{}", tail(system.scaling_log()));
    for host in system.fleet().hosts() {
        eprintln!("--- host {} ---\n{}", host.instance_id, tail(&host.log));
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Row {
    id: String,
    status: String,
    ip: Option<String>,
    remaining_capacity: i32,
    fingerprint: Option<String>,
}

async fn instance_rows(sql: &tokio_postgres::Client) -> Vec<Row> {
    sql.query(
        "SELECT id, status, host(ip_addr), remaining_capacity, tls_fingerprint \
         FROM whist.instances ORDER BY id",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| Row {
        id: r.get(0),
        status: r.get(1),
        ip: r.get(2),
        remaining_capacity: r.get(3),
        fingerprint: r.get(4),
    })
    .collect()
}

/// `(id, instance, user, status)` of every mandelbox row; warm (`WAITING`) rows have no user.
async fn mandelbox_rows(
    sql: &tokio_postgres::Client,
) -> Vec<(uuid::Uuid, String, Option<String>, String)> {
    sql.query(
        "SELECT id, instance_id, user_id, status FROM whist.mandelboxes ORDER BY id",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
    .collect()
}

/// Managed instances in moto by state.
async fn moto_instances(ec2: &aws_sdk_ec2::Client) -> Vec<(String, InstanceStateName)> {
    let out = ec2
        .describe_instances()
        .filters(
            Filter::builder()
                .name(format!("tag:{TAG_MANAGED_BY}"))
                .values(MANAGED_BY)
                .build(),
        )
        .send()
        .await
        .unwrap();
    let mut instances: Vec<(String, InstanceStateName)> = out
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
        .map(|i| {
            (
                i.instance_id().unwrap().to_owned(),
                i.state().and_then(|s| s.name()).unwrap().clone(),
            )
        })
        .collect();
    instances.sort_by(|a, b| a.0.cmp(&b.0));
    instances
}

fn running(instances: &[(String, InstanceStateName)]) -> BTreeSet<String> {
    instances
        .iter()
        .filter(|(_, s)| *s == InstanceStateName::Running)
        .map(|(id, _)| id.clone())
        .collect()
}

/// Containers labelled with an instance id, with their state (`docker ps -a`).
fn containers_of(instance_id: &str) -> Vec<(String, String)> {
    let out = std::process::Command::new("docker")
        .args(["ps", "-a", "--format", "{{.ID}} {{.State}}", "--filter"])
        .arg(format!("label={LABEL_INSTANCE_ID}={instance_id}"))
        .output()
        .unwrap();
    assert!(out.status.success(), "docker ps failed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(id, state)| (id.to_owned(), state.to_owned()))
        .collect()
}

/// The rows of `user`'s mandelboxes.
async fn rows_of_user(
    sql: &tokio_postgres::Client,
    user: &str,
) -> Vec<(uuid::Uuid, String, Option<String>, String)> {
    let mut rows = mandelbox_rows(sql).await;
    rows.retain(|r| r.2.as_deref() == Some(user));
    rows
}

/// The ids of the warm (`WAITING`) rows on `instance`.
async fn warm_rows(sql: &tokio_postgres::Client, instance: &str) -> BTreeSet<uuid::Uuid> {
    mandelbox_rows(sql)
        .await
        .into_iter()
        .filter(|r| r.1 == instance && r.3 == "WAITING")
        .map(|r| r.0)
        .collect()
}

/// The states of the containers of one mandelbox (by its label).
fn containers_of_mandelbox(id: uuid::Uuid) -> Vec<String> {
    let out = std::process::Command::new("docker")
        .args(["ps", "-a", "--format", "{{.State}}", "--filter"])
        .arg(format!(
            "label={}={id}",
            devstack::invariants::LABEL_MANDELBOX_ID
        ))
        .output()
        .unwrap();
    assert!(out.status.success(), "docker ps failed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Waits until `instance`'s warm pool is full: every unit of capacity no user holds is a
/// `WAITING` row with a running container. Returns the warm rows.
async fn until_pool_full(
    system: &System,
    sql: &tokio_postgres::Client,
    instance: &str,
    users: usize,
) -> BTreeSet<uuid::Uuid> {
    wait_for(system, "the host's warm pool to fill", || async {
        let warm = warm_rows(sql, instance).await;
        let row = instance_rows(sql)
            .await
            .into_iter()
            .find(|r| r.id == instance)?;
        let running = warm
            .iter()
            .all(|id| containers_of_mandelbox(*id) == ["running"]);
        (warm.len() + users == HOST_CAPACITY as usize && row.remaining_capacity == 0 && running)
            .then_some(warm)
    })
    .await
}

fn active(rows: &[Row]) -> Vec<Row> {
    rows.iter()
        .filter(|r| r.status == "ACTIVE" && r.fingerprint.is_some())
        .cloned()
        .collect()
}

fn host_of<'a>(hosts: &'a [HostInfo], id: &str) -> &'a HostInfo {
    hosts
        .iter()
        .find(|h| h.instance_id == id)
        .unwrap_or_else(|| panic!("the fleet never booted {id}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_from_scale_up_to_scale_down() {
    let state = tempfile::tempdir().unwrap();
    let mut options = SystemOptions::new(StackOptions {
        state_dir: state.path().to_owned(),
        moto_bin: Some(moto_bin()),
        graphql_port: 0,
        control_port: 0,
        admin_secret: None,
        default_identity: Identity::local("i-0e2e000000000000", REGION),
        default_instance_row: None,
    });
    options.regions = vec![REGION.to_owned()];
    options.desired_free_mandelboxes = HOST_CAPACITY;
    options.max_instances_per_region = 3;
    options.scheduler_interval_secs = 2;
    options.host_stop_grace = Duration::from_secs(20);
    // This walk-through ends with the `default` algorithm's immediate scale-down; the service's
    // own default (`holdover`) would hold the surplus host for its hold-down time.
    options
        .scaling_env
        .push(("WHIST_SCALING_ALGORITHM".to_owned(), "default".to_owned()));
    let system = System::up(options).await.unwrap();
    let sql = devstack::postgres::connect(system.stack().database_url())
        .await
        .unwrap();
    let ec2 = devstack::moto::ec2_client(&system.stack().moto_endpoint().unwrap(), REGION);

    // 1. From zero to the buffer: one instance (2 slots) launched in moto, booted by the fleet,
    //    registered ACTIVE with its own address and its certificate's fingerprint.
    let first = wait_for(&system, "the first host to be ACTIVE", || async {
        let rows = active(&instance_rows(&sql).await);
        (rows.len() == 1).then(|| rows[0].clone())
    })
    .await;
    let moto = moto_instances(&ec2).await;
    assert_eq!(
        running(&moto),
        BTreeSet::from([first.id.clone()]),
        "moto and the rows agree"
    );
    let hosts = system.fleet().hosts();
    let first_host = host_of(&hosts, &first.id);
    assert_eq!(
        first.ip.as_deref(),
        Some(first_host.ip.to_string().as_str())
    );
    assert!(first_host.pid.is_some(), "its host service runs");
    // The host fills its warm pool: every slot is a WAITING row holding its unit of capacity,
    // its container started and waiting for a user.
    let warm = until_pool_full(&system, &sql, &first.id, 0).await;

    // 2. A session: token, assign (a warm box is claimed), json_transport (pinned), connect.
    let client = Client::new(ClientOptions {
        scaling_url: system.scaling_url().to_owned(),
        control_url: Some(system.stack().control_url()),
        regions: vec![REGION.to_owned()],
        ..ClientOptions::default()
    })
    .unwrap();
    let user = "e2e-user-1";
    let token = client.token(user).await.unwrap();
    let request = client.assign_request(None);
    let (assignment, _) = client
        .assign_waiting(&token, &request, Some(STEP_DEADLINE))
        .await
        .unwrap();
    assert_eq!(assignment.ip.to_string(), first_host.ip.to_string());
    assert_eq!(assignment.tls_fingerprint, first.fingerprint);
    assert!(
        warm.contains(&assignment.mandelbox_id),
        "a warm box {warm:?} was claimed, not {}",
        assignment.mandelbox_id
    );
    let mine = rows_of_user(&sql, user).await;
    assert_eq!(mine.len(), 1);
    assert_eq!(mine[0].0, assignment.mandelbox_id);
    assert_eq!(mine[0].1, first.id);

    let settings = SessionOptions::new(user).json_data;
    let answer = client
        .json_transport(&assignment, &token, &settings)
        .await
        .unwrap();
    let port = answer
        .port(32273)
        .expect("the answer names the session port");
    let connection = client.connect(assignment.ip, port).await.unwrap();
    let greeting = connection
        .first_line_json()
        .expect("the mandelbox answers JSON");
    assert!(greeting.is_object(), "{greeting}");
    // The warm box was prepared before anyone asked, yet it goes by the client's session id.
    assert_eq!(
        greeting["session_id"].as_str(),
        request.session_id.as_deref(),
        "{greeting}"
    );

    // The mandelbox runs: its row RUNNING, its container running on that host, its config
    // written byte for byte.
    wait_for(&system, "the mandelbox row to be RUNNING", || async {
        let rows = rows_of_user(&sql, user).await;
        (rows.len() == 1 && rows[0].3 == "RUNNING").then_some(())
    })
    .await;
    assert_eq!(
        containers_of_mandelbox(assignment.mandelbox_id),
        ["running"]
    );
    let config = first_host
        .root
        .join(assignment.mandelbox_id.to_string())
        .join("mandelboxResourceMappings/config.json");
    assert_eq!(std::fs::read_to_string(&config).unwrap(), settings);

    // 3. The buffer is refilled: one slot left < 2, so a second host comes up.
    let second = wait_for(
        &system,
        "a second ACTIVE host (buffer refilled)",
        || async {
            let rows = active(&instance_rows(&sql).await);
            (rows.len() == 2).then(|| rows.into_iter().find(|r| r.id != first.id).unwrap())
        },
    )
    .await;
    assert_eq!(
        running(&moto_instances(&ec2).await),
        BTreeSet::from([first.id.clone(), second.id.clone()])
    );
    assert_ne!(second.ip, first.ip, "every host has its own address");

    // 4. The client leaves: the mandelbox is torn down (row, container, files), never reused.
    connection.close().await;
    wait_for(&system, "the mandelbox to be torn down", || async {
        let gone = rows_of_user(&sql, user).await.is_empty()
            && containers_of_mandelbox(assignment.mandelbox_id).is_empty();
        gone.then_some(())
    })
    .await;
    assert!(
        !first_host
            .root
            .join(assignment.mandelbox_id.to_string())
            .exists()
    );

    // 5. Demand is over: 4 free slots > 2, so one host is drained, exits, and its instance is
    //    terminated; the other stays with the buffer.
    let (kept, gone) = wait_for(&system, "scale-down to one host", || async {
        let rows = instance_rows(&sql).await;
        let moto = moto_instances(&ec2).await;
        let running = running(&moto);
        if rows.len() != 1 || running.len() != 1 || !running.contains(&rows[0].id) {
            return None;
        }
        let gone = if rows[0].id == first.id {
            &second
        } else {
            &first
        };
        let terminated = moto
            .iter()
            .any(|(id, s)| *id == gone.id && *s == InstanceStateName::Terminated);
        terminated.then(|| (rows[0].clone(), gone.clone()))
    })
    .await;
    assert_eq!(kept.status, "ACTIVE");
    until_pool_full(&system, &sql, &kept.id, 0).await;
    let drained = wait_for(&system, "the drained host to power off", || async {
        system.fleet().host(&gone.id).filter(|h| h.powered_off)
    })
    .await;
    assert_eq!(
        drained.exits.first(),
        Some(&Some(0)),
        "the drained host service exited cleanly: {:?}",
        drained.exits
    );
    assert_eq!(drained.starts, 1, "it never crashed");
    assert!(containers_of(&gone.id).is_empty());

    let (report, _) = devstack::invariants::settle(&system, STEP_DEADLINE).await;
    assert!(report.holds(), "{:#?}", report.violations);

    system.down().await.unwrap();
    // Everything stopped with the system: no container of any of its hosts is left.
    assert!(containers_of(&first.id).is_empty() && containers_of(&second.id).is_empty());
}

/// The whole system as `make run` sets it up (a buffer of 2, 2 mandelboxes a host), with the
/// scaling service's own default algorithm.
async fn make_run_system(state: &std::path::Path) -> System {
    let mut options = SystemOptions::new(StackOptions {
        state_dir: state.to_owned(),
        moto_bin: Some(moto_bin()),
        graphql_port: 0,
        control_port: 0,
        admin_secret: None,
        default_identity: Identity::local("i-0e2e000000000000", REGION),
        default_instance_row: None,
    });
    options.regions = vec![REGION.to_owned()];
    options.desired_free_mandelboxes = 2;
    options.scheduler_interval_secs = 2;
    System::up(options).await.unwrap()
}

fn session_client(system: &System) -> Client {
    Client::new(ClientOptions {
        scaling_url: system.scaling_url().to_owned(),
        control_url: Some(system.stack().control_url()),
        regions: vec![REGION.to_owned()],
        ..ClientOptions::default()
    })
    .unwrap()
}

fn one_second_session(user: String) -> SessionOptions {
    let mut session = SessionOptions::new(user);
    session.hold = Some(Duration::from_secs(1));
    session.wait_for_capacity = Some(STEP_DEADLINE);
    session
}

/// Issue #13's thrash: 20 one-second sessions one after another used to launch (and drain) a
/// host per session. The hold-down keeps the fleet: at most the first host and the buffer's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_short_sessions_launch_at_most_two_hosts() {
    let state = tempfile::tempdir().unwrap();
    let system = make_run_system(state.path()).await;
    let sql = devstack::postgres::connect(system.stack().database_url())
        .await
        .unwrap();
    let ec2 = devstack::moto::ec2_client(&system.stack().moto_endpoint().unwrap(), REGION);
    let client = session_client(&system);
    for n in 0..20 {
        let report = client
            .run_session(&one_second_session(format!("e2e-seq-{n}")))
            .await
            .unwrap_or_else(|f| panic!("session {n}: {f:?}"));
        assert!(!report.first_line.is_empty());
        wait_for(
            &system,
            "the session's mandelbox to be torn down",
            || async {
                let user = format!("e2e-seq-{n}");
                rows_of_user(&sql, &user).await.is_empty().then_some(())
            },
        )
        .await;
    }
    let launched = moto_instances(&ec2).await;
    assert!(launched.len() <= 2, "launched {launched:?}");
    let rows = instance_rows(&sql).await;
    assert!(
        rows.iter().all(|r| r.status != "DRAINING"),
        "nothing drained: {rows:?}"
    );
    system.down().await.unwrap();
}

/// Issue #13's refused demand: with 16 sessions at once, hosts used to be drained seconds after
/// they came up while clients were being refused. Refused clients count as demand now, and no
/// host is drained while any of them is still being served or waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_host_is_drained_while_a_burst_is_refused() {
    let state = tempfile::tempdir().unwrap();
    let system = make_run_system(state.path()).await;
    let sql = devstack::postgres::connect(system.stack().database_url())
        .await
        .unwrap();
    let client = std::sync::Arc::new(session_client(&system));
    let sessions: Vec<_> = (0..16)
        .map(|n| {
            let client = client.clone();
            tokio::spawn(async move {
                client
                    .run_session(&one_second_session(format!("e2e-burst-{n}")))
                    .await
            })
        })
        .collect();
    let all_done = futures::future::join_all(sessions);
    tokio::pin!(all_done);
    let mut drained_during_burst = Vec::new();
    let results = loop {
        tokio::select! {
            results = &mut all_done => break results,
            () = tokio::time::sleep(Duration::from_millis(250)) => {
                for row in instance_rows(&sql).await {
                    if row.status == "DRAINING" {
                        drained_during_burst.push(row.id);
                    }
                }
            }
        }
    };
    let mut refused = 0;
    for (n, result) in results.into_iter().enumerate() {
        let report = result
            .unwrap()
            .unwrap_or_else(|f| panic!("session {n}: {f:?}"));
        refused += report.assign_attempts.saturating_sub(1);
    }
    assert!(
        drained_during_burst.is_empty(),
        "drained while the burst ran ({refused} refusals): {drained_during_burst:?}"
    );
    system.down().await.unwrap();
}
