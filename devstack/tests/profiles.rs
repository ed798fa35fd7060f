//! Issue #16 end to end, as `make run` runs it: a user's browser profile follows them. The
//! mandelbox stub counts its sessions in its profile (`stub-visits`) and reports the count it
//! found; the host loads the profile from moto's S3 before `.configReady` and saves it at
//! teardown. So a user's second session sees the first one's count, another user and a new
//! token see none, and the user's first token still finds its own profile after a session with
//! another token.
//!
//! Needs the workspace's binaries (`cargo build --bins`), Docker with the mandelbox test image
//! (`make setup`) and moto in `.venv`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use devstack::client::{Client, ClientOptions, SessionOptions};
use devstack::imds::Identity;
use devstack::stack::StackOptions;
use devstack::system::{System, SystemOptions};
use serde_json::json;

const STEP_DEADLINE: Duration = Duration::from_secs(120);
const REGION: &str = "us-east-1";
const TOKEN: &str = "alice-first-config-token";
const NEW_TOKEN: &str = "alice-second-device-token";

fn moto_bin() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../.venv/bin/moto_server"
    ))
}

/// Users' mandelboxes (warm boxes, which have no user, stay).
async fn live_mandelboxes(sql: &tokio_postgres::Client) -> i64 {
    sql.query_one(
        "SELECT count(*) FROM whist.mandelboxes WHERE user_id IS NOT NULL",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// One session of `user`; returns the stub's greeting once the mandelbox is torn down (the
/// teardown saves the profile before the row goes).
async fn visit(
    system: &System,
    client: &Client,
    sql: &tokio_postgres::Client,
    user: &str,
    token: &str,
    new_token: bool,
) -> serde_json::Value {
    let mut session = SessionOptions::new(user);
    session.hold = Some(Duration::from_millis(500));
    session.wait_for_capacity = Some(STEP_DEADLINE);
    session.config_token = Some(token.to_owned());
    session.new_config_token = new_token;
    let report = match client.run_session(&session).await {
        Ok(report) => report,
        Err(failure) => {
            dump_logs(system);
            panic!("{user}'s session: {failure:?}");
        }
    };
    let started = Instant::now();
    while live_mandelboxes(sql).await > 0 {
        if started.elapsed() > STEP_DEADLINE {
            dump_logs(system);
            panic!("{user}'s mandelbox was not torn down");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    serde_json::from_str(&report.first_line).unwrap()
}

fn dump_logs(system: &System) {
    let tail = |path: &std::path::Path| {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(80)..].join("\n")
    };
    eprintln!("--- scaling service ---\n{}", tail(system.scaling_log()));
    for host in system.fleet().hosts() {
        eprintln!("--- host {} ---\n{}", host.instance_id, tail(&host.log));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_second_session_sees_what_the_first_wrote_and_nobody_else_does() {
    let state = tempfile::tempdir().unwrap();
    let mut options = SystemOptions::new(StackOptions {
        state_dir: state.path().to_owned(),
        moto_bin: Some(moto_bin()),
        graphql_port: 0,
        control_port: 0,
        admin_secret: None,
        default_identity: Identity::local("i-0e2e0000000000aa", REGION),
        default_instance_row: None,
    });
    options.regions = vec![REGION.to_owned()];
    options.desired_free_mandelboxes = 1;
    options.scheduler_interval_secs = 2;
    let system = System::up(options).await.unwrap();
    let sql = devstack::postgres::connect(system.stack().database_url())
        .await
        .unwrap();
    let client = Client::new(ClientOptions {
        scaling_url: system.scaling_url().to_owned(),
        control_url: Some(system.stack().control_url()),
        regions: vec![REGION.to_owned()],
        ..ClientOptions::default()
    })
    .unwrap();

    let first = visit(&system, &client, &sql, "e2e-alice", TOKEN, false).await;
    assert_eq!(
        first["profile_visits"], 0,
        "a new user starts empty: {first}"
    );
    // The initial browser data is in place before `.configReady` (nothing to import: `{}`).
    assert_eq!(first["initial_data"], json!({}), "{first}");

    let second = visit(&system, &client, &sql, "e2e-alice", TOKEN, false).await;
    assert_eq!(
        second["profile_visits"], 1,
        "the first session's profile is back: {second}"
    );
    // What the host unpacked and wrote belongs to the image's user (`WHIST_MANDELBOX_USER`,
    // 1000:1000 by default), not to root: the real browser does not run as root.
    assert_eq!(
        second["profile_owners"],
        json!({"dir": "1000:1000", "stub-visits": "1000:1000", "user-initial-file": "1000:1000"}),
        "{second}"
    );

    let bob = visit(&system, &client, &sql, "e2e-bob", TOKEN, false).await;
    assert_eq!(
        bob["profile_visits"], 0,
        "another user sees none of it: {bob}"
    );

    let fresh = visit(&system, &client, &sql, "e2e-alice", NEW_TOKEN, true).await;
    assert_eq!(
        fresh["profile_visits"], 0,
        "a new token starts empty: {fresh}"
    );

    // The newest archive is now the new token's; the first token's key still wins for it.
    let third = visit(&system, &client, &sql, "e2e-alice", TOKEN, false).await;
    assert_eq!(third["profile_visits"], 2, "{third}");

    system.down().await.unwrap();
}
