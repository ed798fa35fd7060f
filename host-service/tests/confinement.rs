//! What a mandelbox can do to the host, attacked from a real container on the real Docker
//! Engine (issue #15): a local-development host service starts the mandelbox stub, which plants
//! symbolic links where the host writes after the start, probes whether it may create a user
//! namespace, reads its cgroup paths, tries its root file system and asks the host's operations
//! endpoint (bound to every address) for an answer.
//!
//! The stub's hostile modes are switched on by a [`ContainerRuntime`] wrapper that adds their
//! environment to the spec the host built (and waits, after the start, until the links are
//! planted, so the host's writes come after them); everything else is the host's own spec.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dbclient::types::{ImageId, InstanceId, MandelboxId, Region};
use futures::Stream;
use host_service::docker::{
    ContainerEvent, ContainerId, ContainerRuntime, ContainerSpec, ContainerState, DEFAULT_SOCKET,
    DockerRuntime, MandelboxContainer, RuntimeError,
};
use host_service::host::Host;
use host_service::mandelbox::LABEL_INSTANCE_ID;
use host_service::mappings;
use host_service::metadata::InstanceIdentity;
use host_service::pairing::ClientRequest;
use host_service::{Config, Signals, Stopped};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};

const WAIT: Duration = Duration::from_secs(60);
/// The stub image with its probes, built from this checkout (the shared tags may be older).
const PROBE_IMAGE: &str = "whist/mandelbox-stub:confinement";
const SETTINGS: &str = r#"{"dark_mode":true}"#;
const UNTOUCHED: &str = "untouched";
/// Names the stub plants links at (`PLANTED_NAMES` in devstack/mandelbox).
const PLANTED: [&str; 5] = [
    ".config.json.tmp",
    ".configReady.tmp",
    ".paramsReady.tmp",
    "config.json",
    ".configReady",
];

/// The host's own runtime, with the stub's hostile modes switched on.
#[derive(Clone)]
struct Hostile {
    inner: DockerRuntime,
    env: Vec<(String, String)>,
}

fn mappings_bind(spec: &ContainerSpec) -> Option<PathBuf> {
    spec.binds
        .iter()
        .find(|b| b.container_path == Path::new("/whist/resourceMappings"))
        .map(|b| b.host_path.clone())
}

impl ContainerRuntime for Hostile {
    async fn create(&self, spec: &ContainerSpec) -> Result<ContainerId, RuntimeError> {
        let mut spec = spec.clone();
        spec.image = PROBE_IMAGE.to_owned();
        spec.env.extend(self.env.iter().cloned());
        let mappings = mappings_bind(&spec).expect("the host binds the mapping directory");
        let id = self.inner.create(&spec).await?;
        MAPPINGS
            .lock()
            .unwrap()
            .insert(id.as_str().to_owned(), mappings);
        Ok(id)
    }

    async fn start(&self, id: &ContainerId) -> Result<(), RuntimeError> {
        self.inner.start(id).await?;
        // The host writes `.paramsReady` and the config only after this returns.
        let mappings = MAPPINGS.lock().unwrap().get(id.as_str()).cloned().unwrap();
        let planted = mappings.join("stub_links_planted");
        let started = Instant::now();
        while !planted.exists() {
            assert!(
                started.elapsed() < WAIT,
                "the stub plants its links in time"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    async fn stop(&self, id: &ContainerId, grace: Duration) -> Result<(), RuntimeError> {
        self.inner.stop(id, grace).await
    }

    async fn remove(&self, id: &ContainerId, force: bool) -> Result<(), RuntimeError> {
        self.inner.remove(id, force).await
    }

    async fn inspect_state(
        &self,
        id: &ContainerId,
    ) -> Result<Option<ContainerState>, RuntimeError> {
        self.inner.inspect_state(id).await
    }

    async fn list_mandelboxes(&self) -> Result<Vec<MandelboxContainer>, RuntimeError> {
        self.inner.list_mandelboxes().await
    }

    fn events(&self) -> impl Stream<Item = Result<ContainerEvent, RuntimeError>> + Send + 'static {
        self.inner.events()
    }

    async fn data_root(&self) -> Result<Option<PathBuf>, RuntimeError> {
        self.inner.data_root().await
    }

    async fn find_image(&self, app: &str) -> Result<Option<String>, RuntimeError> {
        self.inner.find_image(app).await
    }

    async fn image_id(&self, reference: &str) -> Result<Option<String>, RuntimeError> {
        self.inner.image_id(reference).await
    }
}

static MAPPINGS: std::sync::Mutex<std::collections::BTreeMap<String, PathBuf>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

fn run(program: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Builds [`PROBE_IMAGE`] from this checkout (every run: the tag is this test's own and the
/// stub may have changed), and the shared tag the host looks up in local development if it is
/// missing.
fn ensure_probe_image() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../devstack/mandelbox/build-image.sh"
        );
        let mut tags = vec![PROBE_IMAGE];
        let shared = std::process::Command::new("docker")
            .args(["image", "inspect", "whist/browsers/chrome:current-build"])
            .output()
            .is_ok_and(|o| o.status.success());
        if !shared {
            tags.extend([
                "whist/mandelbox-stub:latest",
                "whist/browsers/chrome:current-build",
            ]);
        }
        run(script, &tags);
    });
}

/// The Docker bridge's address on the host: where a container reaches the host's services.
fn bridge_gateway() -> Ipv4Addr {
    let out = run("ip", &["-4", "-o", "addr", "show", "docker0"]);
    let inet = out
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .expect("docker0 has an IPv4 address");
    inet.split('/').next().unwrap().parse().unwrap()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("0.0.0.0:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn identity() -> InstanceIdentity {
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    InstanceIdentity {
        instance_id: InstanceId::new(format!("i-cf{}", &suffix[..12])).unwrap(),
        ami_id: ImageId::new("ami-0123456789abcdef0").unwrap(),
        region: Region::new("us-east-1").unwrap(),
        instance_type: "g4dn.xlarge".to_owned(),
        public_ipv4: Some(Ipv4Addr::LOCALHOST),
        private_ipv4: Some(Ipv4Addr::LOCALHOST),
        name: Some("test".to_owned()),
    }
}

fn config(root: &Path, ops_port: u16) -> Config {
    use clap::Parser as _;
    let mut config =
        host_service::config::Args::try_parse_from(["whist-host-service", "--app-env", "localdev"])
            .unwrap()
            .validate()
            .unwrap();
    config.root_dir = root.to_owned();
    // Above the json_transport tests' 40000-48000.
    let start = 48200 + u16::try_from(std::process::id() % 8).unwrap() * 100;
    config.port_range = start..start + 100;
    config.gpu_override = Some(1);
    // Every address: the endpoint itself must turn a container away.
    config.ops_addr = format!("0.0.0.0:{ops_port}").parse().unwrap();
    config.json_transport_addr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    config.json_transport_timeout = Duration::from_secs(30);
    config.ready_timeout = Duration::from_secs(30);
    config.stop_grace = Duration::from_secs(2);
    config.drain_deadline = Duration::from_millis(100);
    config
}

fn remove_containers(instance: &InstanceId) {
    let filter = format!("label={LABEL_INSTANCE_ID}={instance}");
    for id in run("docker", &["ps", "-aq", "--filter", &filter]).split_whitespace() {
        let _ = std::process::Command::new("docker")
            .args(["rm", "-f", id])
            .output();
    }
}

struct RemoveOnDrop(InstanceId);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        remove_containers(&self.0);
    }
}

/// What an HTTP request to `addr` from this host gets: `Some(status line)` or `None` when the
/// connection is closed without a byte.
async fn ops_reply(addr: (IpAddr, u16)) -> Option<String> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    stream
        .write_all(b"GET /healthz HTTP/1.0\r\n\r\n")
        .await
        .ok()?;
    let mut reply = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut reply))
        .await
        .expect("the endpoint answers or closes in time")
        .ok()?;
    let text = String::from_utf8_lossy(&reply).into_owned();
    text.lines().next().map(str::to_owned)
}

#[tokio::test]
async fn a_hostile_mandelbox_cannot_reach_past_its_share() {
    ensure_probe_image();
    let root = tempfile::tempdir().unwrap();
    // The victims: files outside the mandelbox's directory that its links point at.
    let outside = tempfile::tempdir().unwrap();
    for name in PLANTED {
        std::fs::write(outside.path().join(name), UNTOUCHED).unwrap();
    }
    let gateway = bridge_gateway();
    let ops_port = free_port();
    let identity = identity();
    let _cleanup = RemoveOnDrop(identity.instance_id.clone());
    let runtime = Hostile {
        inner: DockerRuntime::connect(DEFAULT_SOCKET).await.unwrap(),
        env: vec![
            (
                "WHIST_STUB_PLANT_LINKS".to_owned(),
                outside.path().display().to_string(),
            ),
            (
                "WHIST_STUB_PROBE_CONNECT".to_owned(),
                format!("{gateway}:{ops_port}"),
            ),
        ],
    };
    let signals = Signals::new();
    let (tx, rx) = tokio::sync::oneshot::channel::<Arc<Host<Hostile>>>();
    let task = tokio::spawn(host_service::run_with(
        config(root.path(), ops_port),
        identity,
        runtime,
        signals.clone(),
        move |host| {
            let _ = tx.send(host);
        },
    ));
    let host = tokio::time::timeout(WAIT, rx).await.unwrap().unwrap();

    let id = MandelboxId::random();
    let answer = tokio::time::timeout(
        WAIT,
        host.json_transport(ClientRequest {
            mandelbox_id: id,
            json_data: SETTINGS.to_owned(),
            user_id: None,
            profile: Default::default(),
        }),
    )
    .await
    .unwrap();

    // 1. Nothing was written through the links: every victim is untouched, nothing new
    // appeared outside, and the host's files are plain files inside the directory.
    for name in PLANTED {
        assert_eq!(
            std::fs::read_to_string(outside.path().join(name)).unwrap(),
            UNTOUCHED,
            "{name} outside the mandelbox"
        );
    }
    assert_eq!(
        std::fs::read_dir(outside.path()).unwrap().count(),
        PLANTED.len()
    );
    let answer = answer.expect("the mandelbox starts despite its links");
    let dir = root
        .path()
        .join(id.to_string())
        .join("mandelboxResourceMappings");
    for name in [
        mappings::CONFIG_JSON,
        mappings::CONFIG_READY,
        mappings::PARAMS_READY,
    ] {
        let meta = std::fs::symlink_metadata(dir.join(name)).unwrap();
        assert!(
            meta.file_type().is_file(),
            "{name} is the host's plain file"
        );
    }
    assert_eq!(
        std::fs::read_to_string(dir.join(mappings::CONFIG_JSON)).unwrap(),
        SETTINGS
    );

    // 2. What the container could do, as it saw it.
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
    let greeting: serde_json::Value = serde_json::from_str(&greeting).unwrap();
    let probe = &greeting["probe"];
    assert_eq!(greeting["config"]["dark_mode"], true, "{greeting}");
    // No new user namespace, by any of the three calls (clone3 answers ENOSYS so that glibc
    // falls back to clone, whose flags seccomp can see).
    assert_ne!(probe["userns"]["unshare"], "ok", "{probe}");
    assert_ne!(probe["userns"]["clone"], "ok", "{probe}");
    assert_eq!(probe["userns"]["clone3"], "ENOSYS", "{probe}");
    // Its own cgroup namespace: its cgroup is the root of every hierarchy it sees.
    let cgroups = probe["cgroups"].as_array().unwrap();
    assert!(!cgroups.is_empty(), "{probe}");
    assert!(cgroups.iter().all(|c| c == "/"), "{probe}");
    assert_eq!(probe["rootfs_writable"], false, "{probe}");
    // The operations endpoint, bound to 0.0.0.0, gave the container nothing.
    assert_ne!(probe["connect"], "reply", "{probe}");

    // 3. The endpoint still answers loopback, and refuses the bridge address from the host too.
    let loopback = ops_reply((IpAddr::V4(Ipv4Addr::LOCALHOST), ops_port)).await;
    assert!(
        loopback.as_deref().is_some_and(|l| l.contains("200")),
        "{loopback:?}"
    );
    assert_eq!(ops_reply((IpAddr::V4(gateway), ops_port)).await, None);

    drop(lines);
    signals.drain.cancel();
    signals.now.cancel();
    let stopped = tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
    assert_eq!(stopped.unwrap(), Stopped::Drained);
}
