//! The host service on the real Docker Engine and the local stack (real PostgreSQL behind the
//! Hasura stand-in), with the mandelbox stub image: a mandelbox's whole life, many at once,
//! repeated deliveries, SIGKILL and restart, a database outage, drains.
//!
//! Each test is its own "EC2 instance" (its own instance id, row, root directory and port range)
//! and a guard removes every container labelled with that instance id when the test ends.
//! Waits are on real state (rows, containers, files, the host's own counters) with a bound;
//! nothing sleeps in place of synchronisation.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dbclient::types::{
    ImageId, InstanceId, InstanceStatus, MandelboxId, MandelboxStatus, NewMandelbox, Region, UserId,
};
use dbclient::{DbClient, DbConfig};
use devstack::testing::{TEST_ADMIN_SECRET, TestStack};
use host_service::docker::{
    ContainerRuntime, ContainerStatus, DEFAULT_SOCKET, DockerRuntime, LABEL_MANDELBOX_ID,
};
use host_service::host::Host;
use host_service::mandelbox::{LABEL_GPU, LABEL_INSTANCE_ID, LABEL_TTY};
use host_service::metadata::InstanceIdentity;
use host_service::pairing::{ClientAnswer, ClientRequest};
use host_service::{Config, Signals, Stopped};
use logger::Secret;
use tokio::io::{AsyncBufReadExt, BufReader};

const WAIT: Duration = Duration::from_secs(60);
const AMI: &str = "ami-0123456789abcdef0";
const INSTANCE_TYPE: &str = "g4dn.12xlarge";

/// One test's instance: its identity, database and files.
struct TestHost {
    stack: TestStack,
    db: DbClient,
    identity: InstanceIdentity,
    root: tempfile::TempDir,
    port_range: std::ops::Range<u16>,
}

impl TestHost {
    async fn new() -> Self {
        ensure_stub_image();
        let stack = TestStack::start().await.unwrap();
        let db = DbClient::new(&db_config(&stack)).unwrap();
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let identity = InstanceIdentity {
            instance_id: InstanceId::new(format!("i-test{}", &suffix[..12])).unwrap(),
            ami_id: ImageId::new(AMI).unwrap(),
            region: Region::new("us-east-1").unwrap(),
            instance_type: INSTANCE_TYPE.to_owned(),
            public_ipv4: Some(Ipv4Addr::LOCALHOST),
            private_ipv4: Some(Ipv4Addr::LOCALHOST),
            name: Some("test".to_owned()),
        };
        // Port ranges differ per test: nextest runs each test in its own process (consecutive
        // pids), cargo test in threads of one (the counter). Two hosts sharing a range would
        // both pick a port before either container binds it.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let slot = (std::process::id() + n * 37) % 200;
        let start = 20000 + u16::try_from(slot).unwrap() * 100;
        let host = Self {
            stack,
            db,
            identity,
            root: tempfile::tempdir().unwrap(),
            port_range: start..start + 100,
        };
        host.insert_row().await;
        host
    }

    async fn insert_row(&self) {
        let sql = self.stack.sql().await.unwrap();
        sql.execute(
            "INSERT INTO whist.instances (id, provider, region, image_id, client_sha, \
             instance_type, remaining_capacity, status) \
             VALUES ($1, 'AWS', 'us-east-1', $2, $3, $4, 0, 'PRE_CONNECTION')",
            &[
                &self.identity.instance_id.as_str(),
                &AMI,
                &host_service::config::BUILD_COMMIT,
                &INSTANCE_TYPE,
            ],
        )
        .await
        .unwrap();
    }

    fn config(&self) -> Config {
        let mut config = base_config(&self.stack, self.root.path());
        config.port_range = self.port_range.clone();
        config
    }

    /// Starts the host service in this process; returns its task and the host once it follows
    /// allocations.
    async fn start(
        &self,
        config: Config,
    ) -> (
        tokio::task::JoinHandle<Result<Stopped, host_service::HostError>>,
        Arc<Host<DockerRuntime>>,
        Signals,
    ) {
        let runtime = DockerRuntime::connect(DEFAULT_SOCKET).await.unwrap();
        let signals = Signals::new();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(host_service::run_with(
            config,
            self.identity.clone(),
            runtime,
            signals.clone(),
            move |host| {
                let _ = tx.send(host);
            },
        ));
        let host = tokio::time::timeout(WAIT, rx)
            .await
            .expect("the host starts in time")
            .expect("the host starts");
        (task, host, signals)
    }

    /// Assigns a new mandelbox to this instance, as the scaling service does.
    async fn allocate(&self, user: &str) -> MandelboxId {
        let id = MandelboxId::random();
        let row = self
            .db
            .allocate_mandelbox(&NewMandelbox {
                id,
                app: "CHROME".to_owned(),
                instance_id: self.identity.instance_id.clone(),
                user_id: Some(UserId::new(user).unwrap()),
                session_id: Some("1700000000000".to_owned()),
                status: MandelboxStatus::Allocated,
            })
            .await
            .unwrap();
        assert!(row.is_some(), "the instance has capacity");
        id
    }

    async fn containers(&self) -> Vec<host_service::docker::MandelboxContainer> {
        let runtime = DockerRuntime::connect(DEFAULT_SOCKET).await.unwrap();
        let own = self.identity.instance_id.to_string();
        runtime
            .list_mandelboxes()
            .await
            .unwrap()
            .into_iter()
            .filter(|c| c.labels.get(LABEL_INSTANCE_ID) == Some(&own))
            .collect()
    }

    async fn rows(&self) -> Vec<dbclient::types::Mandelbox> {
        self.db
            .mandelboxes_on_instance(&self.identity.instance_id)
            .await
            .unwrap()
    }

    async fn capacity(&self) -> Option<u32> {
        self.db
            .instance(&self.identity.instance_id)
            .await
            .unwrap()
            .map(|i| i.instance.remaining_capacity)
    }

    /// Names under the root other than the host's own bookkeeping.
    fn files(&self) -> Vec<String> {
        let mut names = Vec::new();
        for dir in [
            self.root.path().to_owned(),
            self.root.path().join("temp"),
            self.root.path().join("temp/logs"),
        ] {
            if let Ok(entries) = std::fs::read_dir(&dir) {
                for e in entries.flatten() {
                    let name = e.file_name().to_string_lossy().into_owned();
                    if name.parse::<MandelboxId>().is_ok() {
                        names.push(format!("{}/{name}", dir.display()));
                    }
                }
            }
        }
        names
    }

    /// Waits until `check` holds, looking again every 50 ms, for at most [`WAIT`].
    async fn until<F, Fut>(&self, what: &str, mut check: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let started = Instant::now();
        while !check().await {
            assert!(started.elapsed() < WAIT, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn assert_clean(&self, host: Option<&Host<DockerRuntime>>) {
        self.until("no container left", || async {
            self.containers().await.is_empty()
        })
        .await;
        assert!(self.files().is_empty(), "files left: {:?}", self.files());
        if let Some(host) = host {
            assert_eq!(host.resources_held(), (0, 0, 0), "resources leaked");
            assert_eq!(host.live_mandelboxes(), 0);
        }
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        let filter = format!("label={LABEL_INSTANCE_ID}={}", self.identity.instance_id);
        if let Ok(out) = std::process::Command::new("docker")
            .args(["ps", "-aq", "--filter", &filter])
            .output()
        {
            for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = std::process::Command::new("docker")
                    .args(["rm", "-f", id])
                    .output();
            }
        }
    }
}

fn db_config(stack: &TestStack) -> DbConfig {
    DbConfig::new(
        &stack.graphql_url(),
        Some(Secret::new(TEST_ADMIN_SECRET.to_owned())),
    )
    .unwrap()
}

fn base_config(stack: &TestStack, root: &Path) -> Config {
    use clap::Parser as _;
    let mut config = host_service::config::Args::try_parse_from([
        "whist-host-service",
        "--app-env",
        "localdevwithdb",
        "--graphql-url",
        &stack.graphql_url(),
        "--admin-secret",
        TEST_ADMIN_SECRET,
        // The cold path; the warm pool's tests ask for one.
        "--warm-mandelboxes",
        "0",
    ])
    .unwrap()
    .validate()
    .unwrap();
    config.root_dir = root.to_owned();
    config.gpu_override = Some(6);
    config.ops_addr = "127.0.0.1:0".parse().unwrap();
    config.json_transport_addr = "127.0.0.1:0".parse().unwrap();
    config.json_transport_timeout = Duration::from_secs(30);
    config.ready_timeout = Duration::from_secs(30);
    config.stop_grace = Duration::from_secs(2);
    config.drain_deadline = Duration::from_secs(60);
    config
}

fn ensure_stub_image() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let present = std::process::Command::new("docker")
            .args(["image", "inspect", "whist/browsers/chrome:current-build"])
            .output()
            .is_ok_and(|o| o.status.success());
        if !present {
            let script = concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../devstack/mandelbox/build-image.sh"
            );
            let status = std::process::Command::new(script).status().unwrap();
            assert!(status.success(), "cannot build the mandelbox test image");
        }
    });
}

fn request(id: MandelboxId, user: &str, json: &str) -> ClientRequest {
    ClientRequest {
        mandelbox_id: id,
        json_data: json.to_owned(),
        user_id: Some(UserId::new(user).unwrap()),
        profile: Default::default(),
    }
}

/// Connects to the stub's session port, reads its greeting, and hangs up: the user leaves.
async fn visit_and_leave(answer: &ClientAnswer) -> serde_json::Value {
    let port = answer.host_ports[&32273];
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let mut lines = BufReader::new(stream).lines();
    let greeting = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .expect("the mandelbox answers");
    serde_json::from_str(&greeting).unwrap()
}

#[tokio::test]
async fn full_lifecycle_allocated_to_running_to_exit_leaves_nothing_behind() {
    let t = TestHost::new().await;
    let (task, host, signals) = t.start(t.config()).await;
    let capacity = t.capacity().await.unwrap();
    assert_eq!(capacity, 18, "6 GPUs × 3 mandelboxes");

    let id = t.allocate("alice").await;
    assert_eq!(t.capacity().await, Some(capacity - 1));
    let answer = host
        .json_transport(request(id, "alice", r#"{"dpi":192}"#))
        .await
        .expect("the mandelbox starts");
    assert_eq!(answer.private_key.len(), 32);
    assert_eq!(answer.host_ports.len(), 4);

    let row = t.db.mandelbox(&id).await.unwrap().unwrap();
    assert_eq!(row.status, MandelboxStatus::Running);
    let containers = t.containers().await;
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    assert_eq!(c.status, ContainerStatus::Running);
    assert_eq!(c.labels[LABEL_MANDELBOX_ID], id.to_string());
    let mappings = t
        .root
        .path()
        .join(id.to_string())
        .join("mandelboxResourceMappings");
    assert_eq!(
        std::fs::read_to_string(mappings.join("config.json")).unwrap(),
        r#"{"dpi":192}"#
    );
    assert_eq!(
        std::fs::read_to_string(mappings.join("tty")).unwrap(),
        c.labels[LABEL_TTY]
    );

    // The mandelbox saw what the host wrote.
    let greeting = visit_and_leave(&answer).await;
    assert_eq!(greeting["host_port_32262"], answer.host_ports[&32262]);
    assert_eq!(greeting["config"]["dpi"], 192);

    // The user left: the container exits and everything goes.
    t.until("the row to be gone", || async { t.rows().await.is_empty() })
        .await;
    t.until("the host to finish the teardown", || async {
        host.live_mandelboxes() == 0
    })
    .await;
    t.assert_clean(Some(&host)).await;
    assert_eq!(t.capacity().await, Some(capacity), "capacity restored");

    signals.drain.cancel();
    assert_eq!(task.await.unwrap().unwrap(), Stopped::Drained);
    assert_eq!(t.capacity().await, None, "the instance row is deleted");
}

#[tokio::test]
async fn sixteen_allocated_at_once_all_run_with_distinct_resources() {
    let t = TestHost::new().await;
    let mut config = t.config();
    config.drain_deadline = Duration::from_millis(100);
    let (task, host, signals) = t.start(config).await;

    let mut ids = Vec::new();
    for n in 0..16 {
        ids.push(t.allocate(&format!("user{n}")).await);
    }
    let answers = futures::future::join_all(ids.iter().enumerate().map(|(n, id)| {
        let host = host.clone();
        let req = request(*id, &format!("user{n}"), "{}");
        async move { host.json_transport(req).await }
    }))
    .await;
    let answers: Vec<ClientAnswer> = answers.into_iter().map(|a| a.unwrap()).collect();

    // Distinct per protocol: 32263 is UDP, the others TCP.
    let ports: BTreeSet<(bool, u16)> = answers
        .iter()
        .flat_map(|a| a.host_ports.iter().map(|(c, h)| (*c == 32263, *h)))
        .collect();
    assert_eq!(ports.len(), 16 * 4, "every host port distinct");
    let containers = t.containers().await;
    assert_eq!(containers.len(), 16);
    let ttys: BTreeSet<&String> = containers.iter().map(|c| &c.labels[LABEL_TTY]).collect();
    assert_eq!(ttys.len(), 16, "every TTY distinct");
    let mut gpu_use = std::collections::BTreeMap::<&String, usize>::new();
    for c in &containers {
        *gpu_use.entry(&c.labels[LABEL_GPU]).or_default() += 1;
    }
    assert!(
        gpu_use.values().all(|n| *n <= 3),
        "at most 3 per GPU: {gpu_use:?}"
    );
    assert!(
        t.rows()
            .await
            .iter()
            .all(|r| r.status == MandelboxStatus::Running),
        "every row RUNNING"
    );

    // A drain with a short deadline stops them all.
    signals.drain.cancel();
    assert_eq!(task.await.unwrap().unwrap(), Stopped::Drained);
    t.assert_clean(Some(&host)).await;
    assert_eq!(t.capacity().await, None);
}

#[tokio::test]
async fn the_same_allocation_delivered_twice_starts_once() {
    let t = TestHost::new().await;
    let (task, host, signals) = t.start(t.config()).await;
    let id = t.allocate("bob").await;
    let row = t.db.mandelbox(&id).await.unwrap().unwrap();
    // The live query delivers it; deliver it again by hand, twice, while it spins up.
    host.spawn_mandelbox(host_service::mandelbox::Start::Allocated(row.clone()));
    host.spawn_mandelbox(host_service::mandelbox::Start::Allocated(row.clone()));
    let answer = host.json_transport(request(id, "bob", "{}")).await.unwrap();
    assert_eq!(t.containers().await.len(), 1, "one container");
    visit_and_leave(&answer).await;
    t.until("teardown", || async { host.live_mandelboxes() == 0 })
        .await;
    // A stale delivery after the teardown is a no-op: the claim fails.
    host.spawn_mandelbox(host_service::mandelbox::Start::Allocated(row));
    t.until("the stale delivery to finish", || async {
        host.live_mandelboxes() == 0
    })
    .await;
    t.assert_clean(Some(&host)).await;
    signals.drain.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_database_outage_during_operation_is_survived() {
    let mut t = TestHost::new().await;
    let (task, host, signals) = t.start(t.config()).await;
    let id = t.allocate("carol").await;
    let answer = host
        .json_transport(request(id, "carol", "{}"))
        .await
        .unwrap();

    // Hasura goes away; the user leaves meanwhile; Hasura comes back.
    t.stack.stop_graphql().await.unwrap();
    visit_and_leave(&answer).await;
    t.until("the container to go", || async {
        t.containers().await.is_empty()
    })
    .await;
    t.stack.start_graphql().await.unwrap();
    t.until("the row to be deleted after the outage", || async {
        t.rows().await.is_empty()
    })
    .await;

    // New allocations work again (the subscription reconnected by itself).
    let id = t.allocate("carol").await;
    let answer = host
        .json_transport(request(id, "carol", "{}"))
        .await
        .unwrap();
    visit_and_leave(&answer).await;
    t.until("teardown", || async {
        host.live_mandelboxes() == 0 && t.rows().await.is_empty()
    })
    .await;
    t.assert_clean(Some(&host)).await;
    signals.drain.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn drain_lets_mandelboxes_finish_until_the_deadline_then_stops_them() {
    let t = TestHost::new().await;
    let mut config = t.config();
    config.drain_deadline = Duration::from_secs(2);
    let (task, host, signals) = t.start(config).await;
    let id = t.allocate("dave").await;
    host.json_transport(request(id, "dave", "{}"))
        .await
        .unwrap();

    let started = Instant::now();
    signals.drain.cancel();
    // While draining: the row says DRAINING and new allocations are refused by the database
    // (the assign path requires ACTIVE).
    t.until("the row to say DRAINING", || async {
        matches!(
            t.db.instance(&t.identity.instance_id).await,
            Ok(Some(i)) if i.instance.status == InstanceStatus::Draining
        ) || task.is_finished()
    })
    .await;
    assert_eq!(task.await.unwrap().unwrap(), Stopped::Drained);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(2),
        "the deadline is honoured: {took:?}"
    );
    t.assert_clean(Some(&host)).await;
    assert_eq!(t.capacity().await, None, "the instance row is deleted");
}

#[tokio::test]
async fn draining_row_at_start_ends_startup_gracefully() {
    let t = TestHost::new().await;
    t.db.set_instance_status(&t.identity.instance_id, InstanceStatus::Draining)
        .await
        .unwrap();
    let runtime = DockerRuntime::connect(DEFAULT_SOCKET).await.unwrap();
    let stopped = host_service::run_with(
        t.config(),
        t.identity.clone(),
        runtime,
        Signals::new(),
        |_| panic!("must not start following allocations"),
    )
    .await
    .unwrap();
    assert_eq!(stopped, Stopped::DrainingAtStart);
}

#[tokio::test]
async fn a_row_for_another_image_is_refused() {
    let t = TestHost::new().await;
    let sql = t.stack.sql().await.unwrap();
    sql.execute(
        "UPDATE whist.instances SET image_id = 'ami-other' WHERE id = $1",
        &[&t.identity.instance_id.as_str()],
    )
    .await
    .unwrap();
    let runtime = DockerRuntime::connect(DEFAULT_SOCKET).await.unwrap();
    let error = host_service::run_with(
        t.config(),
        t.identity.clone(),
        runtime,
        Signals::new(),
        |_| {},
    )
    .await
    .unwrap_err();
    assert!(error.to_string().contains("image_id"), "{error}");
}

/// The host service as a child process with this test's identity (through a fake IMDS).
struct Binary {
    imds: devstack::imds::FakeImds,
    ops_port: u16,
}

impl Binary {
    async fn new(t: &TestHost) -> Self {
        let imds = devstack::imds::FakeImds::spawn(devstack::imds::Identity {
            instance_id: t.identity.instance_id.to_string(),
            ami_id: AMI.to_owned(),
            instance_type: INSTANCE_TYPE.to_owned(),
            region: "us-east-1".to_owned(),
            availability_zone: None,
            public_ipv4: Some(Ipv4Addr::LOCALHOST),
            local_ipv4: Ipv4Addr::LOCALHOST,
            tags: Default::default(),
        })
        .await
        .unwrap();
        Self {
            imds,
            ops_port: devstack::postgres::free_port().unwrap(),
        }
    }

    fn spawn(&self, t: &TestHost, drain_deadline: &str) -> tokio::process::Child {
        self.spawn_with_warm(t, drain_deadline, 0)
    }

    fn spawn_with_warm(
        &self,
        t: &TestHost,
        drain_deadline: &str,
        warm: usize,
    ) -> tokio::process::Child {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_whist-host-service"))
            .env("WHIST_WARM_MANDELBOXES", warm.to_string())
            .env("APP_ENV", "localdevwithdb")
            .env("HASURA_GRAPHQL_URL", t.stack.graphql_url())
            .env("HASURA_ADMIN_SECRET", TEST_ADMIN_SECRET)
            .env("AWS_EC2_METADATA_SERVICE_ENDPOINT", self.imds.endpoint())
            .env("WHIST_ROOT", t.root.path())
            .env("WHIST_GPU_OVERRIDE", "6")
            .env(
                "WHIST_PORT_RANGE",
                format!("{}-{}", t.port_range.start, t.port_range.end),
            )
            .env("WHIST_OPS_ADDR", format!("127.0.0.1:{}", self.ops_port))
            .env("WHIST_JSON_TRANSPORT_ADDR", "127.0.0.1:0")
            .env("WHIST_STOP_GRACE", "2s")
            .env("WHIST_DRAIN_DEADLINE", drain_deadline)
            .env("WHIST_LOG", "info")
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    }

    async fn ready(&self) -> bool {
        reqwest::get(format!("http://127.0.0.1:{}/readyz", self.ops_port))
            .await
            .is_ok_and(|r| r.status().is_success())
    }
}

fn signal(child: &tokio::process::Child, signal: nix::sys::signal::Signal) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id().unwrap() as i32),
        signal,
    )
    .unwrap();
}

/// The binary, SIGKILLed while spin-ups are in flight, then started again: the second run
/// finds the first one's containers, rows and files and cleans them all.
#[tokio::test]
async fn sigkill_during_spinups_then_restart_leaves_a_clean_consistent_state() {
    let t = TestHost::new().await;
    let binary = Binary::new(&t).await;

    let mut first = binary.spawn(&t, "1s");
    t.until("the first run to be ready", || binary.ready())
        .await;
    let capacity = t.capacity().await.unwrap();
    for n in 0..4 {
        t.allocate(&format!("u{n}")).await;
    }
    // The spin-ups wait for json_transport requests that never come: kill mid-way.
    t.until("four containers", || async {
        t.containers().await.len() == 4
    })
    .await;
    first.kill().await.unwrap();
    assert!(!t.files().is_empty(), "the killed run left files behind");

    let mut second = binary.spawn(&t, "1s");
    t.until("the second run to be ready", || binary.ready())
        .await;
    t.until("the first run's mandelboxes to be cleaned", || async {
        t.containers().await.is_empty() && t.rows().await.is_empty()
    })
    .await;
    assert!(t.files().is_empty(), "files left: {:?}", t.files());
    assert_eq!(t.capacity().await, Some(capacity), "capacity restored");

    // SIGTERM drains and deletes the row; the process exits 0.
    signal(&second, nix::sys::signal::Signal::SIGTERM);
    let status = tokio::time::timeout(WAIT, second.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
    assert_eq!(t.capacity().await, None);
    t.assert_clean(None).await;
    binary.imds.stop().await;
}

/// SIGKILL in the middle of a drain, then a restart: the row still says DRAINING, so the new
/// run finishes the drain (removes every container, file and row), starts nothing and exits 0.
#[tokio::test]
async fn sigkill_during_drain_then_restart_finishes_the_drain() {
    let t = TestHost::new().await;
    let binary = Binary::new(&t).await;
    let mut first = binary.spawn(&t, "10m");
    t.until("the first run to be ready", || binary.ready())
        .await;
    for n in 0..2 {
        t.allocate(&format!("u{n}")).await;
    }
    t.until("two containers", || async {
        t.containers().await.len() == 2
    })
    .await;
    signal(&first, nix::sys::signal::Signal::SIGTERM);
    t.until("the row to say DRAINING", || async {
        matches!(
            t.db.instance(&t.identity.instance_id).await,
            Ok(Some(i)) if i.instance.status == InstanceStatus::Draining
        )
    })
    .await;
    first.kill().await.unwrap();
    assert_eq!(
        t.containers().await.len(),
        2,
        "the killed drain left its mandelboxes"
    );

    let mut second = binary.spawn(&t, "10m");
    let status = tokio::time::timeout(WAIT, second.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
    assert_eq!(t.capacity().await, None, "the instance row is deleted");
    assert!(t.rows().await.is_empty());
    t.assert_clean(None).await;
    binary.imds.stop().await;
}

#[tokio::test]
async fn health_answers_while_the_row_is_awaited_and_readiness_follows_registration() {
    let t = TestHost::new().await;
    // No row yet: the scaling service has not inserted it.
    let sql = t.stack.sql().await.unwrap();
    sql.execute(
        "DELETE FROM whist.instances WHERE id = $1",
        &[&t.identity.instance_id.as_str()],
    )
    .await
    .unwrap();
    let ops_port = devstack::postgres::free_port().unwrap();
    let mut config = t.config();
    config.ops_addr = format!("127.0.0.1:{ops_port}").parse().unwrap();
    let runtime = DockerRuntime::connect(DEFAULT_SOCKET).await.unwrap();
    let signals = Signals::new();
    let task = tokio::spawn(host_service::run_with(
        config,
        t.identity.clone(),
        runtime,
        signals.clone(),
        |_| {},
    ));
    let get = |path: &'static str| async move {
        reqwest::get(format!("http://127.0.0.1:{ops_port}{path}"))
            .await
            .ok()
            .map(|r| r.status().as_u16())
    };
    t.until("/healthz to answer", || async {
        get("/healthz").await == Some(200)
    })
    .await;
    let readyz: serde_json::Value = reqwest::get(format!("http://127.0.0.1:{ops_port}/readyz"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(readyz["ready"], false);
    assert!(
        readyz["reasons"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!("not registered")),
        "{readyz}"
    );
    t.insert_row().await;
    t.until("/readyz to turn ready", || async {
        get("/readyz").await == Some(200)
    })
    .await;
    signals.drain.cancel();
    assert_eq!(task.await.unwrap().unwrap(), Stopped::Drained);
}

/// Docker refusing to bind a host port that the allocator found free (something took it in
/// between) makes the host create the container again on fresh ports instead of failing.
#[tokio::test]
async fn a_port_taken_between_check_and_bind_is_replaced_by_a_fresh_one() {
    use host_service::docker::{FakeRuntime, Op, RuntimeError};
    let t = TestHost::new().await;
    let fake = FakeRuntime::with_images(["whist/browsers/chrome:current-build"]);
    fake.fail_next(
        Op::Start,
        RuntimeError::Engine {
            op: Op::Start,
            target: "mandelbox".into(),
            status: 500,
            message: "driver failed programming external connectivity on endpoint x: \
                      Bind for 0.0.0.0:20001 failed: port is already allocated"
                .into(),
        },
    );
    let mut config = t.config();
    // The fake container never exits by itself: the drain at the end stops it.
    config.drain_deadline = Duration::from_millis(100);
    let signals = Signals::new();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(host_service::run_with(
        config,
        t.identity.clone(),
        fake.clone(),
        signals.clone(),
        move |host| {
            let _ = tx.send(host);
        },
    ));
    let host = rx.await.unwrap();
    let id = t.allocate("erin").await;
    let client = tokio::spawn({
        let host = host.clone();
        async move { host.json_transport(request(id, "erin", "{}")).await }
    });
    // Play the mandelbox: once the host has written its config, say the app is ready.
    let mappings = t
        .root
        .path()
        .join(id.to_string())
        .join("mandelboxResourceMappings");
    t.until(".configReady", || async {
        mappings.join(".configReady").exists()
    })
    .await;
    std::fs::write(mappings.join("done_sleeping_until_X_clients"), "done").unwrap();
    let answer = client.await.unwrap().unwrap();

    assert_eq!(
        fake.calls(Op::Create),
        2,
        "created again after the refused start"
    );
    let containers = fake.containers();
    assert_eq!(containers.len(), 1, "the refused container was removed");
    let running: BTreeSet<u16> = containers[0].spec.ports.values().copied().collect();
    let answered: BTreeSet<u16> = answer.host_ports.values().copied().collect();
    assert_eq!(
        running, answered,
        "the client gets the ports actually published"
    );
    assert_eq!(
        std::fs::read_to_string(mappings.join("hostPort_for_my_32262_tcp")).unwrap(),
        answer.host_ports[&32262].to_string(),
        "the mandelbox is told the new port"
    );
    assert_eq!(
        host.resources_held().0,
        4,
        "the refused ports were given back"
    );
    signals.drain.cancel();
    task.await.unwrap().unwrap();
}

/// The Docker event stream breaks (as when the daemon restarts) and the mandelbox exits while
/// no stream is open: its `die` event is lost, yet the host reopens the stream (retrying a failed
/// reopen) and its check of every tracked container finds the exit and tears the mandelbox down.
#[tokio::test]
async fn an_exit_missed_while_the_event_stream_was_down_is_still_handled() {
    use host_service::docker::{FakeRuntime, Op, RuntimeError};
    let t = TestHost::new().await;
    let fake = FakeRuntime::with_images(["whist/browsers/chrome:current-build"]);
    let signals = Signals::new();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(host_service::run_with(
        t.config(),
        t.identity.clone(),
        fake.clone(),
        signals.clone(),
        move |host| {
            let _ = tx.send(host);
        },
    ));
    let host = rx.await.unwrap();
    let id = t.allocate("frank").await;
    let client = tokio::spawn({
        let host = host.clone();
        async move { host.json_transport(request(id, "frank", "{}")).await }
    });
    let mappings = t
        .root
        .path()
        .join(id.to_string())
        .join("mandelboxResourceMappings");
    t.until(".configReady", || async {
        mappings.join(".configReady").exists()
    })
    .await;
    std::fs::write(mappings.join("done_sleeping_until_X_clients"), "done").unwrap();
    client.await.unwrap().unwrap();
    let container = fake.containers()[0].id.clone();

    let subscriptions_before = fake.calls(Op::Events);
    fake.fail_next(
        Op::Events,
        RuntimeError::Transport {
            op: Op::Events,
            target: String::new(),
            socket: "fake".into(),
            message: "daemon restarting".into(),
        },
    );
    fake.disconnect_events();
    assert!(fake.exit(&container, 0), "the container was running");
    assert_eq!(
        fake.event_subscribers(),
        0,
        "the exit happened with no stream open"
    );

    t.until("the mandelbox to be torn down", || async {
        host.live_mandelboxes() == 0 && t.rows().await.is_empty()
    })
    .await;
    assert!(fake.containers().is_empty(), "the container was removed");
    assert_eq!(host.resources_held(), (0, 0, 0));
    t.until("the failed reopen to be retried", || async {
        fake.calls(Op::Events) >= subscriptions_before + 2 && fake.event_subscribers() == 1
    })
    .await;
    signals.drain.cancel();
    task.await.unwrap().unwrap();
}

impl TestHost {
    async fn waiting_rows(&self) -> Vec<dbclient::types::Mandelbox> {
        self.rows()
            .await
            .into_iter()
            .filter(|r| r.status == MandelboxStatus::Waiting)
            .collect()
    }

    /// The WAITING rows, once there are `n` of them and each has its running container.
    async fn until_warm(&self, n: usize) -> Vec<dbclient::types::Mandelbox> {
        self.until("the warm boxes to wait", || async {
            let waiting = self.waiting_rows().await;
            let running: BTreeSet<String> = self
                .containers()
                .await
                .into_iter()
                .filter(|c| c.status == ContainerStatus::Running)
                .map(|c| c.labels[LABEL_MANDELBOX_ID].clone())
                .collect();
            waiting.len() == n && waiting.iter().all(|r| running.contains(&r.id.to_string()))
        })
        .await;
        self.waiting_rows().await
    }
}

#[tokio::test]
async fn warm_boxes_wait_with_running_containers_a_claim_serves_its_user_and_the_pool_refills() {
    let t = TestHost::new().await;
    let mut config = t.config();
    config.warm_mandelboxes = host_service::config::WarmTarget::AtMost(2);
    let (task, host, signals) = t.start(config).await;
    let warm = t.until_warm(2).await;
    assert!(warm.iter().all(|r| r.user_id.is_none()));
    assert_eq!(host.metrics.warm_mandelboxes.get(), 2);
    assert_eq!(host.metrics.warm_prepare_seconds.get_sample_count(), 2);
    // Each WAITING row holds its unit of capacity.
    assert_eq!(t.capacity().await, Some(18 - 2));
    for row in &warm {
        let mappings = t
            .root
            .path()
            .join(row.id.to_string())
            .join("mandelboxResourceMappings");
        assert!(mappings.join(".paramsReady").exists(), "parameters ready");
        assert!(!mappings.join("config.json").exists(), "no user config yet");
    }

    let alice = UserId::new("alice").unwrap();
    let claimed =
        t.db.claim_any_waiting_mandelbox(&t.identity.instance_id, &alice, Some("1700000000000"))
            .await
            .unwrap()
            .expect("a warm box to claim");
    assert!(warm.iter().any(|r| r.id == claimed.id));
    assert_eq!(
        t.capacity().await,
        Some(18 - 2),
        "a claim takes no capacity"
    );
    let answer = host
        .json_transport(request(claimed.id, "alice", r#"{"dpi":144}"#))
        .await
        .expect("the claimed warm box answers");
    let row = t.db.mandelbox(&claimed.id).await.unwrap().unwrap();
    assert_eq!(row.status, MandelboxStatus::Running);
    assert_eq!(row.user_id, Some(alice));
    assert_eq!(host.metrics.warm_claims.get(), 1);

    // Refilled at once: two waiting again beside the claimed one.
    let refilled = t.until_warm(2).await;
    assert!(refilled.iter().all(|r| r.id != claimed.id));
    assert_eq!(t.capacity().await, Some(18 - 3));

    let greeting = visit_and_leave(&answer).await;
    assert_eq!(greeting["config"]["dpi"], 144);
    // Used by one user and destroyed after, never reused.
    t.until("the claimed box to be gone", || async {
        t.db.mandelbox(&claimed.id).await.unwrap().is_none()
    })
    .await;
    t.until("its container to be gone", || async {
        t.containers()
            .await
            .iter()
            .all(|c| c.labels[LABEL_MANDELBOX_ID] != claimed.id.to_string())
    })
    .await;
    assert_eq!(t.capacity().await, Some(18 - 2));
    assert_eq!(t.until_warm(2).await.len(), 2);

    // Drain removes the warm boxes without waiting (the deadline is 60 s).
    let started = Instant::now();
    signals.drain.cancel();
    assert_eq!(task.await.unwrap().unwrap(), Stopped::Drained);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "drain waited for warm boxes: {:?}",
        started.elapsed()
    );
    t.assert_clean(Some(&host)).await;
    assert_eq!(host.warm.waiting(), 0);
    assert_eq!(host.metrics.warm_mandelboxes.get(), 0);
    assert_eq!(t.capacity().await, None, "the instance row is deleted");
}

/// SIGKILL with warm boxes waiting, then a restart: the first run's warm containers and rows
/// are removed, and the new run's pool is exactly its own (no container without a row, no row
/// without a container).
#[tokio::test]
async fn sigkill_with_warm_boxes_then_restart_leaves_no_orphan() {
    let t = TestHost::new().await;
    let binary = Binary::new(&t).await;

    let mut first = binary.spawn_with_warm(&t, "1s", 2);
    t.until("the first run to be ready", || binary.ready())
        .await;
    let before: BTreeSet<MandelboxId> = t.until_warm(2).await.iter().map(|r| r.id).collect();
    first.kill().await.unwrap();

    let mut second = binary.spawn_with_warm(&t, "1s", 2);
    t.until("the second run to be ready", || binary.ready())
        .await;
    t.until("only the second run's pool to be left", || async {
        let rows = t.rows().await;
        let containers: BTreeSet<String> = t
            .containers()
            .await
            .iter()
            .map(|c| c.labels[LABEL_MANDELBOX_ID].clone())
            .collect();
        let ids: BTreeSet<String> = rows.iter().map(|r| r.id.to_string()).collect();
        rows.len() == 2
            && rows
                .iter()
                .all(|r| r.status == MandelboxStatus::Waiting && !before.contains(&r.id))
            && ids == containers
    })
    .await;
    let instance =
        t.db.instance(&t.identity.instance_id)
            .await
            .unwrap()
            .unwrap();
    assert_eq!(instance.instance.remaining_capacity, 18 - 2);

    signal(&second, nix::sys::signal::Signal::SIGTERM);
    let status = tokio::time::timeout(WAIT, second.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
    assert_eq!(t.capacity().await, None);
    t.assert_clean(None).await;
    binary.imds.stop().await;
}

/// A new image under the warm app's tag (a new mandelbox build loaded on the host) replaces the
/// boxes waiting on the old one: the next user gets the new image, not a box made before it.
#[tokio::test]
async fn a_new_image_under_the_warm_apps_tag_replaces_the_waiting_boxes() {
    use host_service::docker::{FakeRuntime, Op};
    const TAG: &str = "whist/browsers/chrome:current-build";
    let t = TestHost::new().await;
    let fake = FakeRuntime::with_images([TAG]);
    let mut config = t.config();
    config.warm_mandelboxes = host_service::config::WarmTarget::AtMost(2);
    config.warm_image_check = Duration::from_millis(200);
    // The fake's containers never exit by themselves: the drain at the end stops them.
    config.drain_deadline = Duration::from_millis(100);
    let signals = Signals::new();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(host_service::run_with(
        config,
        t.identity.clone(),
        fake.clone(),
        signals.clone(),
        move |host| {
            let _ = tx.send(host);
        },
    ));
    let host = rx.await.unwrap();
    t.until("two warm boxes to wait", || async {
        t.waiting_rows().await.len() == 2
    })
    .await;
    let old: BTreeSet<MandelboxId> = t.waiting_rows().await.iter().map(|r| r.id).collect();
    let capacity = t.capacity().await;
    // Looks at an unchanged tag replace nothing (two at the boxes' creation, then the pool's).
    let looked = fake.calls(Op::InspectImage);
    t.until("the pool to look at its image again", || async {
        fake.calls(Op::InspectImage) >= looked + 3
    })
    .await;
    let still: BTreeSet<MandelboxId> = t.waiting_rows().await.iter().map(|r| r.id).collect();
    assert_eq!(
        still, old,
        "nothing replaced while the tag names the same image"
    );

    fake.replace_image(TAG);
    t.until("two new boxes to wait in place of the old", || async {
        let waiting = t.waiting_rows().await;
        waiting.len() == 2 && waiting.iter().all(|r| !old.contains(&r.id))
    })
    .await;
    t.until("the old boxes' containers to be gone", || async {
        fake.containers().iter().all(|c| {
            c.spec.labels[LABEL_MANDELBOX_ID]
                .parse::<MandelboxId>()
                .is_ok_and(|id| !old.contains(&id))
        })
    })
    .await;
    assert_eq!(
        host.metrics
            .teardowns
            .with_label_values(&["replaced"])
            .get(),
        2
    );
    assert_eq!(
        t.capacity().await,
        capacity,
        "capacity is exact after the swap"
    );
    signals.drain.cancel();
    assert_eq!(task.await.unwrap().unwrap(), Stopped::Drained);
    assert_eq!(t.capacity().await, None, "the instance row is deleted");
}
