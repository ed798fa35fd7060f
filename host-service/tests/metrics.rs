//! What an operator's Prometheus reads from the host service's `/metrics`, scraped over HTTP
//! from the running service: json_transport requests by outcome with their latency, spin-up
//! and teardown phases, memory, CPU, the filesystems of the root directory and of Docker's data
//! root, the Docker Engine's probe and event stream, and no GPU series where there is no NVML.
//!
//! Local development (no database), so each test is one host with its own root directory,
//! ports and instance id; the first test runs the real Docker Engine with the mandelbox stub
//! image, the second the in-memory engine to make it fail. Waits are on scraped state, bounded.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dbclient::types::{ImageId, InstanceId, MandelboxId, Region};
use host_service::docker::{
    ContainerRuntime, DEFAULT_SOCKET, DockerRuntime, FakeRuntime, Op, RuntimeError,
};
use host_service::host::Host;
use host_service::mandelbox::LABEL_INSTANCE_ID;
use host_service::metadata::InstanceIdentity;
use host_service::{Config, Signals, Stopped};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);

fn identity() -> InstanceIdentity {
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    InstanceIdentity {
        instance_id: InstanceId::new(format!("i-mx{}", &suffix[..12])).unwrap(),
        ami_id: ImageId::new("ami-0123456789abcdef0").unwrap(),
        region: Region::new("us-east-1").unwrap(),
        instance_type: "g4dn.12xlarge".to_owned(),
        public_ipv4: Some(Ipv4Addr::new(203, 0, 113, 9)),
        private_ipv4: Some(Ipv4Addr::LOCALHOST),
        name: Some("metrics-test".to_owned()),
    }
}

/// Own host ports, 49000-49800: above the ranges of tests/lifecycle.rs (20000-40000),
/// tests/json_transport.rs (40000-48000) and tests/confinement.rs (48200-49000).
fn port_range() -> std::ops::Range<u16> {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let slot = (std::process::id() + n * 3) % 8;
    let start = 49000 + u16::try_from(slot).unwrap() * 100;
    start..start + 100
}

fn config(root: &Path, ops_port: u16) -> Config {
    use clap::Parser as _;
    let mut config =
        host_service::config::Args::try_parse_from(["whist-host-service", "--app-env", "localdev"])
            .unwrap()
            .validate()
            .unwrap();
    config.root_dir = root.to_owned();
    config.port_range = port_range();
    config.gpu_override = Some(6);
    config.ops_addr = format!("127.0.0.1:{ops_port}").parse().unwrap();
    let port = devstack::postgres::free_port().unwrap();
    config.json_transport_addr = format!("127.0.0.1:{port}").parse().unwrap();
    config.json_transport_timeout = Duration::from_secs(30);
    config.ready_timeout = Duration::from_secs(30);
    config.stop_grace = Duration::from_secs(2);
    config.drain_deadline = Duration::from_millis(100);
    config
}

struct Running<R: ContainerRuntime + Clone + 'static> {
    task: tokio::task::JoinHandle<Result<Stopped, host_service::HostError>>,
    _host: Arc<Host<R>>,
    signals: Signals,
    ops: String,
}

impl<R: ContainerRuntime + Clone + 'static> Running<R> {
    async fn start(config: Config, identity: InstanceIdentity, runtime: R) -> Self {
        let ops = format!("http://{}/metrics", config.ops_addr);
        let signals = Signals::new();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(host_service::run_with(
            config,
            identity,
            runtime,
            signals.clone(),
            move |host| {
                let _ = tx.send(host);
            },
        ));
        let host = tokio::time::timeout(WAIT, rx).await.unwrap().unwrap();
        Self {
            task,
            _host: host,
            signals,
            ops,
        }
    }

    async fn scrape(&self) -> Scrape {
        let response = reqwest::get(&self.ops).await.unwrap();
        assert_eq!(response.status(), 200);
        let content_type = response.headers()["content-type"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(content_type.starts_with("text/plain"), "{content_type}");
        Scrape::parse(&response.text().await.unwrap())
    }

    /// Scrapes until `check` holds on a scrape, for at most [`WAIT`]; returns that scrape.
    async fn scrape_until(&self, what: &str, check: impl Fn(&Scrape) -> bool) -> Scrape {
        let started = Instant::now();
        loop {
            let scrape = self.scrape().await;
            if check(&scrape) {
                return scrape;
            }
            assert!(
                started.elapsed() < WAIT,
                "timed out waiting for {what}; last scrape:\n{}",
                scrape.text
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn stop(self) {
        self.signals.drain.cancel();
        assert_eq!(self.task.await.unwrap().unwrap(), Stopped::Drained);
    }
}

/// One scrape in the text exposition format: each sample's name, labels and value.
struct Scrape {
    text: String,
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

impl Scrape {
    fn parse(text: &str) -> Self {
        let mut samples = Vec::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (series, value) = line.rsplit_once(' ').unwrap();
            let value: f64 = value.parse().unwrap();
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => {
                    let labels = rest
                        .trim_end_matches('}')
                        .split("\",")
                        .filter(|l| !l.is_empty())
                        .map(|pair| {
                            let (k, v) = pair.split_once('=').unwrap();
                            (k.to_owned(), v.trim_matches('"').to_owned())
                        })
                        .collect();
                    (name.to_owned(), labels)
                }
                None => (series.to_owned(), BTreeMap::new()),
            };
            samples.push((name, labels, value));
        }
        Self {
            text: text.to_owned(),
            samples,
        }
    }

    /// The value of the one sample named `name` with (at least) these labels.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let matching: Vec<f64> = self
            .samples
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, _, v)| *v)
            .collect();
        assert!(matching.len() <= 1, "{name} {labels:?}: {matching:?}");
        matching.first().copied()
    }

    fn has_prefix(&self, prefix: &str) -> bool {
        self.samples.iter().any(|(n, _, _)| n.starts_with(prefix))
    }
}

fn ensure_stub_image() {
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
}

fn containers_of(instance: &InstanceId) -> Vec<String> {
    let filter = format!("label={LABEL_INSTANCE_ID}={instance}");
    let out = std::process::Command::new("docker")
        .args(["ps", "-aq", "--filter", &filter])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// Removes this test's containers when it ends, whatever way.
struct Containers(InstanceId);

impl Drop for Containers {
    fn drop(&mut self) {
        for id in containers_of(&self.0) {
            let _ = std::process::Command::new("docker")
                .args(["rm", "-f", &id])
                .output();
        }
    }
}

/// A client that trusts the certificate the host wrote to its root directory (made for the
/// identity's addresses, 127.0.0.1 among them).
fn https_client(root: &Path) -> reqwest::Client {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(root.join("cert.pem")).unwrap())
        .unwrap();
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

const SPINUP_PHASES: [&str; 8] = [
    "claim",
    "files",
    "container",
    "params",
    "client",
    "profile",
    "ready",
    "running",
];
const TEARDOWN_PHASES: [&str; 5] = [
    "mark_dying",
    "remove_container",
    "save_profile",
    "remove_files",
    "delete_row",
];

#[tokio::test]
async fn json_transport_phases_disks_memory_cpu_and_docker_are_on_the_metrics_endpoint() {
    ensure_stub_image();
    let root = tempfile::tempdir().unwrap();
    let ops_port = devstack::postgres::free_port().unwrap();
    let config = config(root.path(), ops_port);
    let endpoint = format!("https://{}/json_transport", config.json_transport_addr);
    let identity = identity();
    let _containers = Containers(identity.instance_id.clone());
    let instance = identity.instance_id.clone();
    let runtime = DockerRuntime::connect(DEFAULT_SOCKET).await.unwrap();
    let r = Running::start(config, identity, runtime).await;

    // The engine's first probe answers with its data root.
    let scrape = r
        .scrape_until("the Docker Engine's probe", |s| {
            s.value("whist_host_docker_engine_up", &[]) == Some(1.0)
                && s.value("whist_host_filesystem_size_bytes", &[("volume", "docker")])
                    .is_some()
        })
        .await;
    let root_path = root.path().display().to_string();
    let whist = [("volume", "whist"), ("path", root_path.as_str())];
    let size = scrape
        .value("whist_host_filesystem_size_bytes", &whist)
        .unwrap();
    let available = scrape
        .value("whist_host_filesystem_available_bytes", &whist)
        .unwrap();
    assert!(
        size > 0.0 && available > 0.0 && available <= size,
        "{size} {available}"
    );
    let docker_size = scrape
        .value("whist_host_filesystem_size_bytes", &[("volume", "docker")])
        .unwrap();
    assert!(docker_size > 0.0);
    let memory = scrape.value("whist_host_memory_total_bytes", &[]).unwrap();
    let memory_available = scrape
        .value("whist_host_memory_available_bytes", &[])
        .unwrap();
    assert!(memory > 0.0 && memory_available > 0.0 && memory_available <= memory);
    assert!(
        scrape
            .value("whist_host_cpu_seconds_total", &[("mode", "idle")])
            .unwrap()
            > 0.0
    );
    assert!(scrape.value("whist_host_cpus", &[]).unwrap() >= 1.0);
    assert_eq!(scrape.value("whist_host_docker_events_up", &[]), Some(1.0));
    assert_eq!(
        scrape.value("whist_host_docker_events_reconnects_total", &[]),
        Some(0.0)
    );
    if !Path::new("/dev/nvidiactl").exists() {
        // Six GPUs by override, none through NVML: absent, not zero.
        assert!(!scrape.has_prefix("whist_host_gpu_"), "{}", scrape.text);
    }
    // Nothing was asked yet: no json_transport series.
    assert!(!scrape.has_prefix("whist_host_json_transport_requests_total"));

    // One answered request.
    let client = https_client(root.path());
    let id = MandelboxId::random();
    let answer = client
        .put(&endpoint)
        .json(&json!({"mandelbox_id": id.to_string(), "json_data": "{}"}))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    // One refused request (a malformed body).
    let refused = client
        .put(&endpoint)
        .json(&json!({"mandelbox_id": "not-a-uuid", "json_data": "{}"}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 400);

    let scrape = r.scrape().await;
    let requests = "whist_host_json_transport_requests_total";
    let count = "whist_host_json_transport_request_duration_seconds_count";
    assert_eq!(
        scrape.value(requests, &[("outcome", "ok"), ("code", "ok")]),
        Some(1.0)
    );
    assert_eq!(
        scrape.value(
            requests,
            &[("outcome", "refused"), ("code", "invalid_request")]
        ),
        Some(1.0)
    );
    assert_eq!(scrape.value(count, &[("outcome", "ok")]), Some(1.0));
    assert_eq!(scrape.value(count, &[("outcome", "refused")]), Some(1.0));
    assert_eq!(scrape.value(count, &[("outcome", "failed")]), None);
    let ok_seconds = scrape
        .value(
            "whist_host_json_transport_request_duration_seconds_sum",
            &[("outcome", "ok")],
        )
        .unwrap();
    assert!(ok_seconds > 0.0 && ok_seconds < WAIT.as_secs_f64());
    for phase in SPINUP_PHASES {
        assert_eq!(
            scrape.value(
                "whist_host_spinup_phase_duration_seconds_count",
                &[("phase", phase)]
            ),
            Some(1.0),
            "spin-up phase {phase}"
        );
    }
    assert_eq!(
        scrape.value("whist_host_mandelboxes", &[("phase", "running")]),
        Some(1.0)
    );

    // The container ends by itself: its teardown's phases are timed.
    for container in containers_of(&instance) {
        let status = std::process::Command::new("docker")
            .args(["stop", "-t", "1", &container])
            .output()
            .unwrap();
        assert!(status.status.success());
    }
    let scrape = r
        .scrape_until("the teardown", |s| {
            s.value("whist_host_teardowns_total", &[("reason", "exited")]) == Some(1.0)
        })
        .await;
    for phase in TEARDOWN_PHASES {
        assert_eq!(
            scrape.value(
                "whist_host_teardown_phase_duration_seconds_count",
                &[("phase", phase)]
            ),
            Some(1.0),
            "teardown phase {phase}"
        );
    }
    r.stop().await;
}

#[tokio::test]
async fn a_failing_docker_engine_and_a_broken_event_stream_show_on_the_metrics_endpoint() {
    let root = tempfile::tempdir().unwrap();
    let ops_port = devstack::postgres::free_port().unwrap();
    let config = config(root.path(), ops_port);
    let fake = FakeRuntime::with_images(["whist/browsers/chrome:current-build"]);
    let data_root = tempfile::tempdir().unwrap();
    fake.set_data_root(data_root.path());
    // The engine's first probe fails, as a hung or stopped daemon's does.
    fake.fail_next(
        Op::Info,
        RuntimeError::Transport {
            op: Op::Info,
            target: String::new(),
            socket: "fake".to_owned(),
            message: "connection refused".to_owned(),
        },
    );
    let r = Running::start(config, identity(), fake.clone()).await;
    let started = Instant::now();
    while fake.calls(Op::Info) == 0 {
        assert!(started.elapsed() < WAIT, "the engine is probed at start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let scrape = r
        .scrape_until("the event stream", |s| {
            s.value("whist_host_docker_events_up", &[]) == Some(1.0)
        })
        .await;
    assert_eq!(scrape.value("whist_host_docker_engine_up", &[]), Some(0.0));
    // The engine never said where its data root is: no series for it (the root's is there).
    assert_eq!(
        scrape.value("whist_host_filesystem_size_bytes", &[("volume", "docker")]),
        None
    );
    assert!(
        scrape
            .value("whist_host_filesystem_size_bytes", &[("volume", "whist")])
            .is_some()
    );

    // A daemon restart breaks the stream: it is reopened, and counted.
    fake.disconnect_events();
    let scrape = r
        .scrape_until("the reconnect", |s| {
            s.value("whist_host_docker_events_reconnects_total", &[]) == Some(1.0)
                && s.value("whist_host_docker_events_up", &[]) == Some(1.0)
        })
        .await;
    assert_eq!(scrape.value("whist_host_docker_engine_up", &[]), Some(0.0));
    r.stop().await;
}
