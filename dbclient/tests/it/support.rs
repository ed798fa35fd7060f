//! Fixtures: a stack per test, row builders, and waiting on snapshot streams.

use std::time::Duration;

use dbclient::{
    DbClient, DbConfig, DbError, ImageId, InstanceId, InstanceStatus, MandelboxId, MandelboxStatus,
    NewInstance, NewMandelbox, Region, SnapshotStream, SubscriptionClient, UserId,
};
use devstack::testing::{TEST_ADMIN_SECRET, TestStack};
use futures::StreamExt;
use logger::Secret;
use tokio_util::sync::CancellationToken;

/// The longest a single expected result may take on a loaded 2-core machine. Live queries are
/// re-run on NOTIFY (milliseconds) and at worst every refetch interval (1 s).
pub const PATIENCE: Duration = Duration::from_secs(20);

pub const REGION: &str = "us-east-1";
pub const IMAGE: &str = "ami-0123456789abcdef0";
pub const INSTANCE_TYPE: &str = "g4dn.2xlarge";

pub struct Fixture {
    pub stack: TestStack,
    pub db: DbClient,
    pub config: DbConfig,
}

impl Fixture {
    pub async fn start() -> Fixture {
        let stack = TestStack::start().await.expect("test stack");
        let config = config_for(&stack, Some(TEST_ADMIN_SECRET));
        let db = DbClient::new(&config).expect("client");
        Fixture { stack, db, config }
    }

    /// A subscription client and the token that stops it.
    pub fn subscriptions(&self) -> (SubscriptionClient, CancellationToken) {
        let token = CancellationToken::new();
        let client = SubscriptionClient::start(&self.config, token.clone()).expect("start");
        (client, token)
    }

    pub async fn sql(&self) -> tokio_postgres::Client {
        self.stack.sql().await.expect("sql connection")
    }
}

pub fn config_for(stack: &TestStack, secret: Option<&str>) -> DbConfig {
    DbConfig::new(
        &stack.graphql_url(),
        secret.map(|s| Secret::new(s.to_owned())),
    )
    .expect("config")
}

pub fn instance_id(id: &str) -> InstanceId {
    InstanceId::new(id).unwrap()
}

pub fn region(region: &str) -> Region {
    Region::new(region).unwrap()
}

pub fn image(image: &str) -> ImageId {
    ImageId::new(image).unwrap()
}

pub fn new_instance(id: &str, status: InstanceStatus, capacity: u32) -> NewInstance {
    NewInstance {
        id: instance_id(id),
        provider: "AWS".to_owned(),
        region: region(REGION),
        image_id: image(IMAGE),
        client_sha: "0123abcd".to_owned(),
        ip_addr: None,
        instance_type: INSTANCE_TYPE.to_owned(),
        remaining_capacity: capacity,
        status,
    }
}

pub fn new_mandelbox(instance: &str, status: MandelboxStatus, user: Option<&str>) -> NewMandelbox {
    NewMandelbox {
        id: MandelboxId::random(),
        app: "CHROME".to_owned(),
        instance_id: instance_id(instance),
        user_id: user.map(|u| UserId::new(u).unwrap()),
        session_id: Some("1700000000".to_owned()),
        status,
    }
}

/// Inserts instances through the client.
pub async fn seed(db: &DbClient, instances: &[NewInstance]) {
    assert_eq!(
        db.insert_instances(instances).await.unwrap(),
        instances.len()
    );
}

/// Waits for the first `Ok` snapshot that satisfies `want`, skipping earlier snapshots and
/// collecting the errors seen on the way.
pub async fn wait_for<T: std::fmt::Debug>(
    stream: &mut SnapshotStream<T>,
    what: &str,
    want: impl Fn(&T) -> bool,
) -> (T, Vec<DbError>) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut errors = Vec::new();
    let mut last = None;
    loop {
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(Some(Ok(snapshot))) if want(&snapshot) => return (snapshot, errors),
            Ok(Some(Ok(snapshot))) => last = Some(snapshot),
            Ok(Some(Err(error))) => errors.push(error),
            Ok(None) => panic!("the stream ended while waiting for {what}"),
            Err(_) => panic!(
                "no snapshot with {what} within {PATIENCE:?}; last {last:?}, errors {errors:?}"
            ),
        }
    }
}

/// Waits for the next `Err` item.
pub async fn wait_for_error<T: std::fmt::Debug>(
    stream: &mut SnapshotStream<T>,
    what: &str,
) -> DbError {
    match tokio::time::timeout(PATIENCE, stream.next()).await {
        Ok(Some(Err(error))) => error,
        other => panic!("expected an error ({what}), got {other:?}"),
    }
}

thread_local! {
    /// What `dbclient` logged on this thread. `#[tokio::test]` runs each test, and every task it
    /// spawns, on the test's own thread.
    static CAPTURED: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Appends to the current thread's [`CAPTURED`] buffer.
struct ThreadBuffer;

impl std::io::Write for ThreadBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        CAPTURED.with(|captured| captured.borrow_mut().extend_from_slice(buf));
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The logs of the current test.
pub struct CapturedLogs;

impl CapturedLogs {
    pub fn text(&self) -> String {
        CAPTURED.with(|captured| String::from_utf8_lossy(&captured.borrow()).into_owned())
    }
}

/// Captures `dbclient`'s logs (every level) for the calling test. One global subscriber for the
/// whole binary: thread-local subscribers race with tracing's per-callsite interest cache when
/// tests run in parallel.
pub fn capture_logs() -> CapturedLogs {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("dbclient=trace"))
            .with_ansi(false)
            .with_writer(|| ThreadBuffer)
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("no other global subscriber");
    });
    CAPTURED.with(|captured| captured.borrow_mut().clear());
    CapturedLogs
}
