//! `DockerRuntime` on the real Docker Engine, with the mandelbox stub image
//! (`whist/mandelbox-stub:latest`, built by `make setup-image`, which runs here when the image
//! is missing).
//!
//! Every container a test creates carries `whist.test.run=<run id>`; a [`TestRun`] guard removes
//! them all (and any image tag or mount the test made) when it is dropped, on failure too.
//! Nothing here sleeps to synchronise: tests await the event or the state they need, with a
//! bound.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Command;
use std::sync::{Mutex, Once, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use futures::{Stream, StreamExt};
use host_service::docker::{
    BindMount, ContainerEvent, ContainerEventKind, ContainerId, ContainerRuntime, ContainerSpec,
    ContainerStatus, DEFAULT_SOCKET, Device, DockerRuntime, LABEL_MANAGED, LABEL_MANDELBOX_ID,
    LABEL_SESSION_ID, LABEL_USER_ID, Op, Propagation, RuntimeError, TmpfsMount,
};
use host_service::ports::{ContainerPort, MANDELBOX_PORTS, PortMap, Protocol};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const STUB_IMAGE: &str = "whist/mandelbox-stub:latest";
/// Label that ties a container to one test run, for cleanup.
const TEST_RUN_LABEL: &str = "whist.test.run";
/// Bound on waiting for an event or a state. Generous: 16 containers start in about 2 s here.
const WAIT: Duration = Duration::from_secs(30);

type Events = Pin<Box<dyn Stream<Item = Result<ContainerEvent, RuntimeError>> + Send>>;

/// One test's containers, image tags and mounts, all removed on drop.
struct TestRun {
    id: String,
    runtime: DockerRuntime,
    dir: tempfile::TempDir,
    tags: Mutex<Vec<String>>,
    mounts: Mutex<Vec<PathBuf>>,
}

impl TestRun {
    async fn start() -> anyhow::Result<Self> {
        ensure_stub_image()?;
        let runtime = DockerRuntime::connect(DEFAULT_SOCKET).await?;
        let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
        Ok(Self {
            id,
            runtime,
            dir: tempfile::tempdir()?,
            tags: Mutex::new(Vec::new()),
            mounts: Mutex::new(Vec::new()),
        })
    }

    /// A minimal spec of ours: the stub image, our labels, the secure defaults.
    fn spec(&self, suffix: &str) -> ContainerSpec {
        let mut spec = ContainerSpec::new(format!("whist-test-{}-{suffix}", self.id), STUB_IMAGE);
        spec.labels.insert(TEST_RUN_LABEL.into(), self.id.clone());
        spec.labels
            .insert(LABEL_MANDELBOX_ID.into(), uuid::Uuid::new_v4().to_string());
        spec
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Mounts a small tmpfs at `path` and makes it a shared mount, so `rshared` binds from it
    /// work (this machine's `/` is private: no systemd). Unmounted on drop.
    fn shared_mount(&self, path: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(path)?;
        run(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                "size=1m",
                "whist-test",
                path_str(path)?,
            ],
        )?;
        self.mounts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(path.to_owned());
        run("mount", &["--make-shared", path_str(path)?])?;
        Ok(())
    }
}

impl Drop for TestRun {
    fn drop(&mut self) {
        // Synchronous on purpose: it also runs while a failed test unwinds, outside any runtime.
        let filter = format!("label={TEST_RUN_LABEL}={}", self.id);
        if let Ok(out) = Command::new("docker")
            .args(["ps", "-aq", "--filter", &filter])
            .output()
        {
            let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .map(str::to_owned)
                .collect();
            if !ids.is_empty() {
                let _ = Command::new("docker")
                    .args(["rm", "-f", "-v"])
                    .args(&ids)
                    .output();
            }
        }
        for tag in self.tags.lock().map(|t| t.clone()).unwrap_or_default() {
            let _ = Command::new("docker").args(["rmi", &tag]).output();
        }
        for mount in self.mounts.lock().map(|m| m.clone()).unwrap_or_default() {
            let _ = Command::new("umount").arg(&mount).output();
        }
    }
}

fn path_str(path: &Path) -> anyhow::Result<&str> {
    path.to_str().context("non-UTF-8 temp path")
}

fn run(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(program).args(args).output()?;
    ensure!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Builds the stub image once per test binary when it is missing.
fn ensure_stub_image() -> anyhow::Result<()> {
    static BUILD: Once = Once::new();
    static RESULT: Mutex<Option<String>> = Mutex::new(None);
    BUILD.call_once(|| {
        let present = Command::new("docker")
            .args(["image", "inspect", STUB_IMAGE])
            .output()
            .is_ok_and(|o| o.status.success());
        if !present {
            let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
            let out = Command::new("make")
                .arg("setup-image")
                .current_dir(root)
                .output();
            let error = match out {
                Ok(o) if o.status.success() => None,
                Ok(o) => Some(String::from_utf8_lossy(&o.stderr).into_owned()),
                Err(e) => Some(e.to_string()),
            };
            *RESULT.lock().unwrap_or_else(PoisonError::into_inner) = error;
        }
    });
    if let Some(error) = RESULT
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .as_ref()
    {
        bail!("make setup-image failed: {error}");
    }
    Ok(())
}

/// A host port nothing listens on right now (the kernel's pick).
fn free_port(protocol: Protocol) -> anyhow::Result<u16> {
    Ok(match protocol {
        Protocol::Tcp => TcpListener::bind("0.0.0.0:0")?.local_addr()?.port(),
        Protocol::Udp => UdpSocket::bind("0.0.0.0:0")?.local_addr()?.port(),
    })
}

fn mandelbox_ports() -> anyhow::Result<PortMap> {
    MANDELBOX_PORTS
        .iter()
        .map(|p| Ok((*p, free_port(p.protocol)?)))
        .collect()
}

/// The next event of `id`, skipping other containers' (other tests run beside this one).
async fn next_event_of(events: &mut Events, id: &ContainerId) -> anyhow::Result<ContainerEvent> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let item = tokio::time::timeout_at(deadline, events.next())
            .await
            .with_context(|| format!("no event for {id} within {WAIT:?}"))?
            .context("the event stream ended")?;
        let event = item?;
        if event.id == *id {
            return Ok(event);
        }
    }
}

/// Waits until `path` exists (a file the stub writes), polling with a bound.
async fn wait_for_file(path: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + WAIT;
    while !path.exists() {
        ensure!(
            Instant::now() < deadline,
            "{} did not appear within {WAIT:?}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// Writes the resource-mapping files the stub waits for, both markers included.
fn write_mappings(dir: &Path, ports: &PortMap, session: &str) -> anyhow::Result<()> {
    let p32262 = ports[&ContainerPort {
        port: 32262,
        protocol: Protocol::Tcp,
    }];
    for (name, value) in [
        ("hostPort_for_my_32262_tcp", p32262.to_string()),
        ("tty", "10".to_owned()),
        ("gpu_index", "0".to_owned()),
        ("session_id", session.to_owned()),
        ("timeout", "-1".to_owned()),
        (".paramsReady", String::new()),
        ("config.json", "{\"test\":true}".to_owned()),
        (".configReady", String::new()),
    ] {
        std::fs::write(dir.join(name), value)?;
    }
    Ok(())
}

/// `/proc/<pid>/status` field, e.g. `CapEff`.
fn proc_status(pid: i64, field: &str) -> anyhow::Result<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(|v| v.trim().to_owned())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// A cgroup v1 control file of the process's cgroup, e.g. (`memory`, `memory.limit_in_bytes`);
/// `None` on a host without that v1 controller.
fn cgroup_v1_file(pid: i64, controller: &str, file: &str) -> anyhow::Result<Option<String>> {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    let Some(path) = cgroups.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        controllers
            .split(',')
            .any(|c| c == controller)
            .then(|| path.to_owned())
    }) else {
        return Ok(None);
    };
    let full = format!("/sys/fs/cgroup/{controller}{path}/{file}");
    Ok(Some(
        std::fs::read_to_string(&full)
            .with_context(|| full.clone())?
            .trim()
            .to_owned(),
    ))
}

const CAP_IPC_LOCK: u32 = 14;
const CAP_SYS_NICE: u32 = 23;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_spec_option_takes_effect_and_events_carry_the_exit_code() -> anyhow::Result<()> {
    let t = TestRun::start().await?;
    let docker = t.runtime.client().clone();
    let version = docker.version().await?;
    eprintln!(
        "engine {:?}, API {:?}; negotiated {}",
        version.version,
        version.api_version,
        t.runtime.api_version()
    );
    assert_eq!(Some(t.runtime.api_version()), version.api_version);

    // The event stream is opened and polled (by the forwarding task) before anything exists.
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    let mut source = Box::pin(t.runtime.events());
    let forward = tokio::spawn(async move {
        while let Some(item) = source.next().await {
            if tx.send(item).await.is_err() {
                break;
            }
        }
    });
    let mut events: Events = Box::pin(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }));

    let mappings = t.path("mandelboxResourceMappings");
    let logs = t.path("logs");
    let configs = t.path("userConfigs");
    std::fs::create_dir_all(&mappings)?;
    std::fs::create_dir_all(&logs)?;
    t.shared_mount(&configs)?;
    let uinput = t.path("fake-uinput");
    run("mknod", &[path_str(&uinput)?, "c", "10", "223"])?;

    let ports = mandelbox_ports()?;
    let session = "session-42";
    write_mappings(&mappings, &ports, session)?;

    let mut spec = t.spec("full");
    let mandelbox_id = spec.labels[LABEL_MANDELBOX_ID].clone();
    spec.labels
        .insert(LABEL_USER_ID.into(), "user@example.com".into());
    spec.labels.insert(LABEL_SESSION_ID.into(), session.into());
    spec.env.insert("WHIST_STUB_POLL_MS".into(), "5".into());
    spec.env.insert(
        "WHIST_AES_KEY".into(),
        "0123456789abcdef0123456789abcdef".into(),
    );
    spec.binds = vec![
        BindMount {
            host_path: mappings.clone(),
            container_path: "/whist/resourceMappings".into(),
            read_only: false,
            propagation: None,
        },
        BindMount {
            host_path: logs.clone(),
            container_path: "/var/log/whist".into(),
            read_only: true,
            propagation: Some(Propagation::RPrivate),
        },
        BindMount {
            host_path: configs.clone(),
            container_path: "/whist/userConfigs".into(),
            read_only: false,
            propagation: Some(Propagation::RShared),
        },
    ];
    spec.ports = ports.clone();
    spec.devices = vec![Device {
        host_path: uinput.clone(),
        container_path: "/dev/input/event99".into(),
        permissions: "rwm".into(),
    }];
    spec.cap_add = vec!["SYS_NICE".into(), "IPC_LOCK".into()];
    // docker-default exists wherever AppArmor is on; here it is accepted and ignored.
    spec.apparmor_profile = Some("docker-default".into());
    spec.shm_size_bytes = Some(2 << 30);
    spec.tmpfs = vec![
        TmpfsMount {
            container_path: "/run".into(),
            options: "size=52428800".into(),
        },
        TmpfsMount {
            container_path: "/run/lock".into(),
            options: "size=52428800".into(),
        },
    ];
    spec.memory_bytes = Some(256 << 20);
    spec.nano_cpus = Some(500_000_000);
    spec.pids_limit = Some(128);
    spec.runtime = Some("runc".into());

    let created_at = Instant::now();
    let id = t.runtime.create(&spec).await?;
    let create_latency = created_at.elapsed();

    // What the engine stored.
    let inspect = docker.inspect_container(id.as_str(), None).await?;
    let host = inspect.host_config.clone().context("HostConfig")?;
    let config = inspect.config.clone().context("Config")?;
    assert_eq!(host.cap_drop, Some(vec!["ALL".to_owned()]));
    let caps: BTreeSet<String> = host
        .cap_add
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.trim_start_matches("CAP_").to_owned())
        .collect();
    assert_eq!(
        caps,
        BTreeSet::from(["SYS_NICE".to_owned(), "IPC_LOCK".to_owned()])
    );
    let security = host.security_opt.clone().unwrap_or_default();
    assert!(
        security.iter().any(|o| o.starts_with("no-new-privileges")),
        "{security:?}"
    );
    assert!(
        security.contains(&"apparmor=docker-default".to_owned()),
        "{security:?}"
    );
    assert_eq!(host.privileged, Some(false));
    let bindings = host.port_bindings.clone().unwrap_or_default();
    for (port, host_port) in &ports {
        let binding = bindings
            .get(&port.to_string())
            .cloned()
            .flatten()
            .with_context(|| format!("no binding for {port}"))?;
        assert_eq!(binding.len(), 1);
        assert_eq!(binding[0].host_ip.as_deref(), Some("0.0.0.0"));
        assert_eq!(
            binding[0].host_port.as_deref(),
            Some(host_port.to_string().as_str())
        );
    }
    let mounts = inspect.mounts.clone().unwrap_or_default();
    let mount = |dst: &str| {
        mounts
            .iter()
            .find(|m| m.destination.as_deref() == Some(dst))
            .cloned()
            .with_context(|| format!("no mount at {dst}: {mounts:?}"))
    };
    assert_eq!(mount("/whist/resourceMappings")?.rw, Some(true));
    assert_eq!(mount("/var/log/whist")?.rw, Some(false));
    assert_eq!(
        mount("/var/log/whist")?.propagation.as_deref(),
        Some("rprivate")
    );
    assert_eq!(
        mount("/whist/userConfigs")?.propagation.as_deref(),
        Some("rshared")
    );
    assert_eq!(
        host.tmpfs.clone().unwrap_or_default(),
        HashMap::from([
            ("/run".to_owned(), "size=52428800".to_owned()),
            ("/run/lock".to_owned(), "size=52428800".to_owned()),
        ])
    );
    assert_eq!(host.shm_size, Some(2 << 30));
    assert_eq!(host.memory, Some(256 << 20));
    assert_eq!(host.memory_swap, Some(256 << 20));
    assert_eq!(host.nano_cpus, Some(500_000_000));
    assert_eq!(host.pids_limit, Some(128));
    assert_eq!(host.init, Some(true));
    assert_eq!(host.runtime.as_deref(), Some("runc"));
    let devices = host.devices.clone().unwrap_or_default();
    assert_eq!(devices.len(), 1);
    assert_eq!(devices[0].path_on_host.as_deref(), Some(path_str(&uinput)?));
    assert_eq!(
        devices[0].path_in_container.as_deref(),
        Some("/dev/input/event99")
    );
    assert_eq!(devices[0].cgroup_permissions.as_deref(), Some("rwm"));
    assert_eq!(config.tty, Some(true));
    let labels = config.labels.clone().unwrap_or_default();
    assert_eq!(labels.get(LABEL_MANAGED).map(String::as_str), Some("true"));
    assert_eq!(labels.get(LABEL_MANDELBOX_ID), Some(&mandelbox_id));
    assert_eq!(
        labels.get(LABEL_SESSION_ID).map(String::as_str),
        Some(session)
    );
    assert!(
        config
            .env
            .unwrap_or_default()
            .contains(&"WHIST_STUB_POLL_MS=5".to_owned())
    );

    let started_at = Instant::now();
    t.runtime.start(&id).await?;
    let start_latency = started_at.elapsed();
    eprintln!("bollard latency: create {create_latency:?}, start {start_latency:?}");

    let start = next_event_of(&mut events, &id).await?;
    assert_eq!(start.kind, ContainerEventKind::Start);
    assert_eq!(start.labels.get(LABEL_MANDELBOX_ID), Some(&mandelbox_id));
    assert_eq!(start.name.as_deref(), Some(spec.name.as_str()));

    // What the kernel enforces on the container's init (same PID namespace as the engine here).
    let state = docker
        .inspect_container(id.as_str(), None)
        .await?
        .state
        .context("State")?;
    let pid = state.pid.context("Pid")?;
    assert_eq!(proc_status(pid, "NoNewPrivs")?, "1");
    let expected_caps = format!("{:016x}", (1u64 << CAP_SYS_NICE) | (1u64 << CAP_IPC_LOCK));
    assert_eq!(proc_status(pid, "CapBnd")?, expected_caps);
    assert_eq!(proc_status(pid, "CapEff")?, expected_caps);
    match cgroup_v1_file(pid, "memory", "memory.limit_in_bytes")? {
        Some(limit) => {
            assert_eq!(limit, (256u64 << 20).to_string());
            assert_eq!(
                cgroup_v1_file(pid, "pids", "pids.max")?.as_deref(),
                Some("128")
            );
            assert_eq!(
                cgroup_v1_file(pid, "cpu", "cpu.cfs_quota_us")?.as_deref(),
                Some("50000")
            );
            let allowed = cgroup_v1_file(pid, "devices", "devices.list")?.unwrap_or_default();
            assert!(allowed.lines().any(|l| l == "c 10:223 rwm"), "{allowed}");
        }
        None => eprintln!("no cgroup v1 memory controller: cgroup checks skipped"),
    }

    // The stub read the bind-mounted mapping files, listens behind the published ports, and
    // wrote its readiness marker through the read-write bind.
    wait_for_file(&mappings.join("done_sleeping_until_X_clients")).await?;
    let p32261 = ports[&ContainerPort {
        port: 32261,
        protocol: Protocol::Tcp,
    }];
    let stream = tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, p32261)).await?;
    let (read, mut write) = stream.into_split();
    let mut hello = String::new();
    tokio::time::timeout(WAIT, BufReader::new(read).read_line(&mut hello)).await??;
    assert!(
        hello.contains(&format!("\"session_id\":\"{session}\"")),
        "{hello}"
    );
    let p32262 = ports[&ContainerPort {
        port: 32262,
        protocol: Protocol::Tcp,
    }];
    assert!(
        hello.contains(&format!("\"host_port_32262\":{p32262}")),
        "{hello}"
    );
    write.write_all(b"exit 3\n").await?;

    let die = next_event_of(&mut events, &id).await?;
    assert_eq!(die.kind, ContainerEventKind::Die { exit_code: Some(3) });
    assert_eq!(die.labels.get(LABEL_MANDELBOX_ID), Some(&mandelbox_id));
    assert_eq!(
        die.labels.get(LABEL_USER_ID).map(String::as_str),
        Some("user@example.com")
    );
    assert_eq!(die.labels.get(TEST_RUN_LABEL), Some(&t.id));

    let state = t.runtime.inspect_state(&id).await?.context("still there")?;
    assert_eq!(state.status, ContainerStatus::Exited);
    assert!(!state.running && !state.oom_killed);
    assert_eq!(state.exit_code, Some(3));

    t.runtime.remove(&id, false).await?;
    assert_eq!(
        next_event_of(&mut events, &id).await?.kind,
        ContainerEventKind::Destroy
    );
    t.runtime.remove(&id, false).await?;
    t.runtime.remove(&id, true).await?;
    assert_eq!(t.runtime.inspect_state(&id).await?, None);
    forward.abort();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_between_the_call_and_the_first_poll_are_not_lost() -> anyhow::Result<()> {
    let t = TestRun::start().await?;
    // Opened but not polled: bollard would connect only now, after the start.
    let mut events: Events = Box::pin(t.runtime.events());
    let id = t.runtime.create(&t.spec("lazy")).await?;
    t.runtime.start(&id).await?;
    let first = next_event_of(&mut events, &id).await?;
    assert_eq!(first.kind, ContainerEventKind::Start);
    t.runtime.remove(&id, true).await?;
    let kinds = [
        next_event_of(&mut events, &id).await?.kind,
        next_event_of(&mut events, &id).await?.kind,
    ];
    assert!(
        matches!(
            kinds[0],
            ContainerEventKind::Die {
                exit_code: Some(137)
            }
        ),
        "{kinds:?}"
    );
    assert_eq!(kinds[1], ContainerEventKind::Destroy);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_returns_within_the_grace() -> anyhow::Result<()> {
    let t = TestRun::start().await?;
    // With init, SIGTERM reaches the stub (waiting for .paramsReady) and ends it at once.
    let with_init = t.runtime.create(&t.spec("stop-init")).await?;
    // Without init the stub is PID 1, which the kernel shields from SIGTERM: the engine waits
    // the grace out and kills it.
    let mut bare = t.spec("stop-bare");
    bare.init = false;
    let without_init = t.runtime.create(&bare).await?;
    t.runtime.start(&with_init).await?;
    t.runtime.start(&without_init).await?;

    let grace = Duration::from_secs(10);
    let began = Instant::now();
    t.runtime.stop(&with_init, grace).await?;
    let quick = began.elapsed();
    eprintln!("stop with init: {quick:?} (grace {grace:?})");
    assert!(quick < Duration::from_secs(3), "{quick:?}");
    let state = t
        .runtime
        .inspect_state(&with_init)
        .await?
        .context("exists")?;
    assert_eq!(
        (state.status, state.exit_code),
        (ContainerStatus::Exited, Some(143))
    );

    let grace = Duration::from_secs(1);
    let began = Instant::now();
    t.runtime.stop(&without_init, grace).await?;
    let forced = began.elapsed();
    eprintln!("stop without init: {forced:?} (grace {grace:?})");
    assert!(
        forced >= grace && forced < grace + Duration::from_secs(5),
        "{forced:?}"
    );
    let state = t
        .runtime
        .inspect_state(&without_init)
        .await?
        .context("exists")?;
    assert_eq!(state.exit_code, Some(137));

    // Stopping what is stopped, or gone, is fine.
    t.runtime.stop(&with_init, grace).await?;
    t.runtime.remove(&with_init, false).await?;
    t.runtime.stop(&with_init, grace).await?;
    t.runtime.remove(&without_init, false).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_finds_ours_in_every_state_and_ignores_unlabelled_containers() -> anyhow::Result<()> {
    let t = TestRun::start().await?;
    let created = t.runtime.create(&t.spec("created")).await?;
    let mut published = t.spec("running");
    published.publish_ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
    published.ports = mandelbox_ports()?;
    let running = t.runtime.create(&published).await?;
    let exited = t.runtime.create(&t.spec("exited")).await?;
    t.runtime.start(&running).await?;
    t.runtime.start(&exited).await?;
    t.runtime.stop(&exited, Duration::from_secs(5)).await?;

    // Not created through the runtime: no whist.managed label.
    let unlabelled_name = format!("whist-test-{}-unlabelled", t.id);
    let unlabelled = t
        .runtime
        .client()
        .create_container(
            Some(
                bollard::query_parameters::CreateContainerOptionsBuilder::new()
                    .name(&unlabelled_name)
                    .build(),
            ),
            bollard::models::ContainerCreateBody {
                image: Some(STUB_IMAGE.into()),
                labels: Some(HashMap::from([(TEST_RUN_LABEL.to_owned(), t.id.clone())])),
                ..Default::default()
            },
        )
        .await?;

    let ours: BTreeMap<ContainerId, _> = t
        .runtime
        .list_mandelboxes()
        .await?
        .into_iter()
        .filter(|c| c.labels.get(TEST_RUN_LABEL) == Some(&t.id))
        .map(|c| (c.id.clone(), c))
        .collect();
    assert_eq!(ours.len(), 3, "{ours:#?}");
    assert!(!ours.keys().any(|id| id.as_str() == unlabelled.id));
    assert_eq!(ours[&created].status, ContainerStatus::Created);
    assert_eq!(ours[&running].status, ContainerStatus::Running);
    assert_eq!(ours[&exited].status, ContainerStatus::Exited);
    assert_eq!(ours[&running].name, published.name);
    assert_eq!(ours[&running].ports, published.ports);
    assert!(ours[&created].ports.is_empty() && ours[&exited].ports.is_empty());
    assert!(
        ours.values()
            .all(|c| c.labels.contains_key(LABEL_MANDELBOX_ID))
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_concurrent_mandelboxes_all_run_with_distinct_names() -> anyhow::Result<()> {
    const COUNT: usize = 16;
    let t = TestRun::start().await?;
    let specs: Vec<ContainerSpec> = (0..COUNT).map(|i| t.spec(&format!("many-{i}"))).collect();
    let began = Instant::now();
    let results = futures::future::join_all(specs.iter().map(|spec| {
        let runtime = t.runtime.clone();
        async move {
            let id = runtime.create(spec).await?;
            runtime.start(&id).await?;
            Ok::<_, RuntimeError>(id)
        }
    }))
    .await;
    let elapsed = began.elapsed();
    let failed: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "tried {COUNT}, failed {}: {failed:?}",
        failed.len()
    );
    eprintln!("{COUNT} concurrent create+start: {elapsed:?}");
    let ids: BTreeSet<ContainerId> = results.into_iter().filter_map(Result::ok).collect();
    assert_eq!(ids.len(), COUNT);

    let listed: Vec<_> = t
        .runtime
        .list_mandelboxes()
        .await?
        .into_iter()
        .filter(|c| ids.contains(&c.id))
        .collect();
    assert_eq!(listed.len(), COUNT);
    assert!(listed.iter().all(|c| c.status == ContainerStatus::Running));
    let names: BTreeSet<&str> = listed.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names.len(), COUNT);

    let began = Instant::now();
    let removed = futures::future::join_all(ids.iter().map(|id| t.runtime.remove(id, true))).await;
    assert!(removed.iter().all(Result::is_ok), "{removed:?}");
    eprintln!("{COUNT} concurrent forced removals: {:?}", began.elapsed());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_refusals_are_typed() -> anyhow::Result<()> {
    let t = TestRun::start().await?;
    let spec = t.spec("dup");
    let id = t.runtime.create(&spec).await?;
    assert!(matches!(
        t.runtime.create(&spec).await,
        Err(RuntimeError::Conflict { op: Op::Create, .. })
    ));
    let mut missing = t.spec("no-image");
    missing.image = format!("whist-test-{}/missing:latest", t.id);
    let error = t.runtime.create(&missing).await.unwrap_err();
    assert!(
        matches!(error, RuntimeError::NotFound { op: Op::Create, .. }),
        "{error}"
    );

    let mut all = t.spec("cap-all");
    all.cap_add = vec!["ALL".into()];
    assert!(matches!(
        t.runtime.create(&all).await,
        Err(RuntimeError::Invalid { .. })
    ));

    t.runtime.start(&id).await?;
    t.runtime.start(&id).await?; // already running: fine
    let error = t.runtime.remove(&id, false).await.unwrap_err();
    assert!(
        matches!(error, RuntimeError::Conflict { op: Op::Remove, .. }),
        "{error}"
    );
    t.runtime.remove(&id, true).await?;

    let gone = ContainerId::new(format!("whist-test-{}-never-created", t.id))?;
    assert!(matches!(
        t.runtime.start(&gone).await,
        Err(RuntimeError::NotFound { op: Op::Start, .. })
    ));
    assert_eq!(t.runtime.inspect_state(&gone).await?, None);
    t.runtime.remove(&gone, false).await?;
    Ok(())
}

/// This machine's `/` is a private mount (no systemd), and the engine refuses to start a
/// container with an `rshared` bind from a mount that is not shared. On EC2 hosts systemd makes
/// `/` shared; the lifecycle must surface the start error, which names the path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rshared_bind_from_a_private_mount_fails_at_start_with_the_path() -> anyhow::Result<()> {
    let t = TestRun::start().await?;
    let source = t.path("private");
    std::fs::create_dir_all(&source)?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    let root_is_shared = mountinfo
        .lines()
        .any(|l| l.split(' ').nth(4) == Some("/") && l.contains("shared:"));
    let tmp_is_own_mount = mountinfo.lines().any(|l| {
        l.split(' ')
            .nth(4)
            .is_some_and(|m| m != "/" && source.starts_with(m))
    });
    if root_is_shared || tmp_is_own_mount {
        eprintln!("the temp dir is not on a private `/`: nothing to check here");
        return Ok(());
    }
    let mut spec = t.spec("rshared");
    spec.binds.push(BindMount {
        host_path: source.clone(),
        container_path: "/whist/userConfigs".into(),
        read_only: false,
        propagation: Some(Propagation::RShared),
    });
    let id = t.runtime.create(&spec).await?;
    let error = t.runtime.start(&id).await.unwrap_err();
    assert!(
        matches!(
            error,
            RuntimeError::Engine {
                op: Op::Start,
                status: 500,
                ..
            }
        ),
        "{error}"
    );
    assert!(error.to_string().contains("not a shared mount"), "{error}");
    t.runtime.remove(&id, true).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn find_image_matches_the_app_at_a_path_segment_boundary() -> anyhow::Result<()> {
    let t = TestRun::start().await?;
    let docker = t.runtime.client().clone();
    let tag = |repo: &str| {
        let docker = docker.clone();
        let repo = repo.to_owned();
        let tags = &t.tags;
        async move {
            docker
                .tag_image(
                    STUB_IMAGE,
                    Some(
                        bollard::query_parameters::TagImageOptionsBuilder::new()
                            .repo(&repo)
                            .tag("current-build")
                            .build(),
                    ),
                )
                .await?;
            tags.lock().unwrap().push(format!("{repo}:current-build"));
            anyhow::Ok(())
        }
    };
    // The brief's case, with names of this run only (tags are shared engine state).
    let ns = format!("whist-test-{}", t.id);
    tag(&format!("{ns}/browsers/chrome{}", t.id)).await?;
    tag(&format!("x{}/browsers/chrome{}y", t.id, t.id)).await?;
    tag(&format!("{ns}/mybrowsers/edge{}", t.id)).await?;

    let app = format!("browsers/chrome{}", t.id);
    assert_eq!(
        t.runtime.find_image(&app).await?,
        Some(format!("{ns}/browsers/chrome{}:current-build", t.id))
    );
    assert_eq!(
        t.runtime
            .find_image(&format!("browsers/edge{}", t.id))
            .await?,
        None
    );
    assert_eq!(
        t.runtime
            .find_image(&format!("rowsers/chrome{}", t.id))
            .await?,
        None
    );
    assert_eq!(
        t.runtime.find_image(&format!("chrome{}y", t.id)).await?,
        Some(format!("x{}/browsers/chrome{}y:current-build", t.id, t.id))
    );
    // The image the dev stack builds (`make setup-image`).
    let chrome = t
        .runtime
        .find_image("browsers/chrome")
        .await?
        .context("chrome image")?;
    assert!(
        chrome.ends_with("/browsers/chrome:current-build")
            || chrome == "browsers/chrome:current-build"
    );
    // What the original compiled as a regex is refused, not a panic.
    assert!(matches!(
        t.runtime.find_image("browsers/(chrome").await,
        Err(RuntimeError::Invalid {
            op: Op::FindImage,
            ..
        })
    ));
    Ok(())
}

/// The id the engine reports for the image behind a tag (what the warm pool compares to notice a
/// new build under the same name), checked against the Docker CLI.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_id_follows_the_tag_to_a_new_image() -> anyhow::Result<()> {
    let t = TestRun::start().await?;
    let tag = format!("whist-test-{}/browsers/chrome:current-build", t.id);
    let cli_id = |reference: &str| -> anyhow::Result<String> {
        let out = Command::new("docker")
            .args(["image", "inspect", "--format", "{{.Id}}", reference])
            .output()?;
        anyhow::ensure!(out.status.success(), "docker image inspect {reference}");
        Ok(String::from_utf8(out.stdout)?.trim().to_owned())
    };
    assert_eq!(t.runtime.image_id(&tag).await?, None, "no such tag yet");

    let tagged = Command::new("docker")
        .args(["tag", STUB_IMAGE, &tag])
        .output()?;
    anyhow::ensure!(tagged.status.success(), "docker tag");
    t.tags.lock().unwrap().push(tag.clone());
    let first = t
        .runtime
        .image_id(&tag)
        .await?
        .context("the tagged image")?;
    assert_eq!(first, cli_id(STUB_IMAGE)?);

    // A new build under the same tag (a label makes it a different image).
    let mut build = Command::new("docker")
        .args(["build", "-q", "-t", &tag, "-"])
        .env("DOCKER_BUILDKIT", "0")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    {
        use std::io::Write as _;
        let mut stdin = build.stdin.take().context("stdin")?;
        writeln!(stdin, "FROM {STUB_IMAGE}\nLABEL whist.test.run={}", t.id)?;
    }
    let built = build.wait_with_output()?;
    anyhow::ensure!(
        built.status.success(),
        "docker build: {}",
        String::from_utf8_lossy(&built.stderr)
    );
    let second = t
        .runtime
        .image_id(&tag)
        .await?
        .context("the rebuilt image")?;
    assert_ne!(second, first, "a new image under the same tag has a new id");
    assert_eq!(second, cli_id(&tag)?);
    Ok(())
}
