//! The fleet emulator: moto's instances become real host agents on this machine.
//!
//! moto answers RunInstances but boots nothing. The fleet watches moto for instances tagged
//! `whist-managed-by=whist-scaling-service` and, for every one that reaches `running`, does what
//! EC2 and the user data would: gives it an address of its own on the loopback network
//! (`127.A.B.n`, the instance's "public IP"), a fake IMDSv2 serving its identity (instance id,
//! AMI, type, region, that address, its tags), a `/whist` root of its own, and starts
//! `whist-host-service` for it on this machine's Docker Engine, with json_transport on
//! `<address>:4678` and the operations endpoint on `<address>:4679`.
//!
//! Like systemd with the host-setup unit (`Restart=on-failure`, `RestartPreventExitStatus=2`),
//! a host that dies is started again; one that exits 0 has finished a drain and, like a host
//! with `WHIST_POWEROFF`, powers off: the fleet terminates its instance in moto (its shutdown
//! behaviour is `terminate`). An instance terminated in moto is powered off: SIGTERM (systemd
//! stopping the unit at shutdown), SIGKILL after a grace, and its containers and files are
//! removed, as they vanish with a real instance.
//!
//! With [`FleetOptions::docker_proxy`], each host reaches the Docker Engine through a proxy of
//! its own ([`docker_proxy`], `DOCKER_SOCKET`), whose event streams [`Fleet::cut_docker_events`]
//! cuts as an engine restart would.

pub mod docker_proxy;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use aws_sdk_ec2::types::{Filter, InstanceStateName};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::docker_proxy::{DockerProxy, DockerProxyStats};
use crate::imds::{FakeImds, Identity};

/// The tag the scaling service puts on every instance it launches (its `TAG_MANAGED_BY`).
pub const TAG_MANAGED_BY: &str = "whist-managed-by";
/// The value of [`TAG_MANAGED_BY`].
pub const MANAGED_BY: &str = "whist-scaling-service";
/// The label the host service puts on its containers, naming its instance.
pub const LABEL_INSTANCE_ID: &str = "whist.instance.id";
/// The host's client-facing json_transport port, as on EC2.
pub const JSON_TRANSPORT_PORT: u16 = 4678;
/// The host's operations endpoint port.
pub const OPS_PORT: u16 = 4679;
/// Host ports each emulated host hands to mandelboxes: a range of its own, so two hosts rarely
/// race for a port (the host retries one taken anyway).
const PORTS_PER_HOST: u16 = 400;
const FIRST_HOST_PORT: u16 = 20_000;
const PORT_RANGES: u16 = 60;
/// At most this many restarts within [`RESTART_WINDOW`], as systemd's start limit.
const RESTART_BURST: usize = 5;
const RESTART_WINDOW: Duration = Duration::from_secs(600);
/// The exit code the host service uses for bad configuration: never restarted.
const EXIT_BAD_CONFIG: i32 = 2;

/// What the fleet runs and how.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    /// moto's endpoint.
    pub ec2_endpoint: String,
    pub regions: Vec<String>,
    /// The `whist-host-service` executable.
    pub host_binary: PathBuf,
    /// Each host's root, log and state go under `<dir>/<instance-id>/`.
    pub dir: PathBuf,
    /// Environment every host gets (APP_ENV, Hasura, authentication, ...). Nothing else is
    /// inherited but PATH and HOME.
    pub host_env: Vec<(String, String)>,
    /// `WHIST_CPU_HOST_CAPACITY` of the hosts (the local machine has no GPU): the scaling
    /// service's capacity of the instance type it launches.
    pub host_capacity: u32,
    /// Print every host's log lines, prefixed with its instance id, besides its log file.
    pub echo_logs: bool,
    /// How often moto is asked.
    pub poll: Duration,
    /// Delay before a dead host is started again (systemd's `RestartSec`).
    pub restart_delay: Duration,
    /// Between SIGTERM and SIGKILL when an instance is terminated.
    pub stop_grace: Duration,
    /// Put a [`DockerProxy`] between each host service and the engine (`DOCKER_SOCKET` is
    /// `<dir>/<instance-id>/docker.sock`), for [`Fleet::cut_docker_events`].
    pub docker_proxy: bool,
    /// The engine's socket the proxies forward to.
    pub docker_socket: PathBuf,
}

impl FleetOptions {
    pub fn new(
        ec2_endpoint: String,
        regions: Vec<String>,
        host_binary: PathBuf,
        dir: PathBuf,
    ) -> Self {
        Self {
            ec2_endpoint,
            regions,
            host_binary,
            dir,
            host_env: Vec::new(),
            host_capacity: 2,
            echo_logs: false,
            poll: Duration::from_millis(250),
            restart_delay: Duration::from_secs(1),
            stop_grace: Duration::from_secs(30),
            docker_proxy: false,
            docker_socket: PathBuf::from(docker_proxy::ENGINE_SOCKET),
        }
    }
}

/// One emulated host, as [`Fleet::hosts`] reports it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct HostInfo {
    pub instance_id: String,
    pub region: String,
    pub ip: Ipv4Addr,
    /// The host service's pid while it runs.
    pub pid: Option<u32>,
    /// How many times its host service was started.
    pub starts: u32,
    /// Its exit statuses so far (`None`: killed by a signal).
    pub exits: Vec<Option<i32>>,
    /// Powered off: its instance is terminated (or terminating) and its process gone.
    pub powered_off: bool,
    pub root: PathBuf,
    pub log: PathBuf,
}

impl HostInfo {
    pub fn json_transport_url(&self) -> String {
        format!("https://{}:{JSON_TRANSPORT_PORT}/json_transport", self.ip)
    }

    pub fn ops_url(&self) -> String {
        format!("http://{}:{OPS_PORT}", self.ip)
    }
}

#[derive(Debug)]
struct Host {
    info: HostInfo,
    identity: Identity,
    imds: Option<FakeImds>,
    docker_proxy: Option<DockerProxy>,
    child: Option<Child>,
    restart_at: Option<Instant>,
    recent_starts: Vec<Instant>,
    port_range: (u16, u16),
    /// Set once the instance is terminated or terminating.
    terminating: bool,
}

#[derive(Debug, Default)]
struct State {
    hosts: BTreeMap<String, Host>,
    next_index: u16,
}

/// A running fleet emulator; [`Fleet::stop`] stops every host.
#[derive(Debug)]
pub struct Fleet {
    state: Arc<Mutex<State>>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    network: (u8, u8),
}

impl Fleet {
    pub async fn start(options: FleetOptions) -> anyhow::Result<Self> {
        anyhow::ensure!(
            options.host_binary.is_file(),
            "{} is missing: build it first (cargo build --bins)",
            options.host_binary.display()
        );
        std::fs::create_dir_all(&options.dir)
            .with_context(|| format!("creating {}", options.dir.display()))?;
        // 127.A.B.0/24 for this fleet: A in 64..=191 keeps clear of 127.0.0.x, which everything
        // else on the machine uses, and two fleets (parallel tests) rarely meet.
        let random = uuid::Uuid::new_v4().as_u128();
        let network = (64 + (random % 128) as u8, ((random >> 8) % 256) as u8);
        let fleet = Self {
            state: Arc::new(Mutex::new(State::default())),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            network,
        };
        let watcher = Watcher {
            options: Arc::new(options),
            state: fleet.state.clone(),
            network,
            tasks: fleet.tasks.clone(),
        };
        let stop = fleet.shutdown.clone();
        fleet.tasks.spawn(watcher.run(stop));
        Ok(fleet)
    }

    /// The loopback network `127.A.B.0/24` this fleet's hosts live on.
    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::new(127, self.network.0, self.network.1, 0)
    }

    /// Every host booted so far, powered off ones included.
    pub fn hosts(&self) -> Vec<HostInfo> {
        lock(&self.state)
            .hosts
            .values()
            .map(|h| h.info.clone())
            .collect()
    }

    pub fn host(&self, instance_id: &str) -> Option<HostInfo> {
        lock(&self.state)
            .hosts
            .get(instance_id)
            .map(|h| h.info.clone())
    }

    /// Sends `signal` to a host's service (chaos: SIGKILL is a crash; the fleet restarts it as
    /// systemd would). False when it does not run.
    pub fn signal(&self, instance_id: &str, signal: nix::sys::signal::Signal) -> bool {
        let state = lock(&self.state);
        let Some(pid) = state
            .hosts
            .get(instance_id)
            .and_then(|h| h.child.as_ref())
            .and_then(Child::id)
        else {
            return false;
        };
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal).is_ok()
    }

    /// Cuts the host's Docker event streams (chaos, [`FleetOptions::docker_proxy`]): its open
    /// `/events` connections are closed now, and new ones closed unanswered for `down_for`;
    /// its other Docker requests pass. Returns how many streams were cut, `None` without a
    /// proxy.
    pub fn cut_docker_events(&self, instance_id: &str, down_for: Duration) -> Option<usize> {
        let state = lock(&self.state);
        let proxy = state.hosts.get(instance_id)?.docker_proxy.as_ref()?;
        let cut = proxy.cut_events(down_for);
        tracing::info!(instance.id = %instance_id, cut, ?down_for, "fleet: Docker event streams cut");
        Some(cut)
    }

    /// What the host's Docker proxy has forwarded and cut so far.
    pub fn docker_proxy_stats(&self, instance_id: &str) -> Option<DockerProxyStats> {
        let state = lock(&self.state);
        Some(state.hosts.get(instance_id)?.docker_proxy.as_ref()?.stats())
    }

    /// Stops every host service (SIGTERM, then SIGKILL after the grace) and waits.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    match state.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// An instance as moto reports it.
#[derive(Debug, Clone)]
struct Seen {
    identity: Identity,
    state: InstanceStateName,
}

struct Watcher {
    options: Arc<FleetOptions>,
    state: Arc<Mutex<State>>,
    network: (u8, u8),
    tasks: TaskTracker,
}

impl Watcher {
    async fn run(self, stop: CancellationToken) {
        let clients: Vec<(String, aws_sdk_ec2::Client)> = self
            .options
            .regions
            .iter()
            .map(|r| {
                (
                    r.clone(),
                    crate::moto::ec2_client(&self.options.ec2_endpoint, r),
                )
            })
            .collect();
        loop {
            for (region, client) in &clients {
                match describe(client, region).await {
                    Ok(seen) => {
                        for instance in seen {
                            self.observe(client, instance).await;
                        }
                    }
                    Err(error) => {
                        tracing::warn!(%region, error = format!("{error:#}"), "fleet: moto")
                    }
                }
            }
            self.supervise(&clients).await;
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(self.options.poll) => {}
            }
        }
        let hosts: Vec<Host> = std::mem::take(&mut lock(&self.state).hosts)
            .into_values()
            .collect();
        let grace = self.options.stop_grace;
        futures::future::join_all(hosts.into_iter().map(|mut host| async move {
            stop_child(&mut host, grace, StopKind::Now).await;
            if let Some(proxy) = host.docker_proxy.take() {
                proxy.close();
            }
            if let Some(imds) = host.imds.take() {
                imds.stop().await;
            }
        }))
        .await;
    }

    /// Boots a newly running instance; powers off one moto says is terminated.
    async fn observe(&self, client: &aws_sdk_ec2::Client, seen: Seen) {
        let id = seen.identity.instance_id.clone();
        let known = lock(&self.state).hosts.contains_key(&id);
        match seen.state {
            InstanceStateName::Running if !known => {
                if let Err(error) = self.boot(seen.identity).await {
                    tracing::error!(instance.id = %id, error = format!("{error:#}"), "fleet: cannot boot a host");
                }
            }
            InstanceStateName::ShuttingDown | InstanceStateName::Terminated if known => {
                self.power_off(client, &id, false).await;
            }
            _ => {}
        }
    }

    async fn boot(&self, mut identity: Identity) -> anyhow::Result<()> {
        let (index, ip) = {
            let mut state = lock(&self.state);
            let mut found = None;
            for _ in 0..254 {
                state.next_index = state.next_index % 254 + 1;
                let ip = Ipv4Addr::new(127, self.network.0, self.network.1, state.next_index as u8);
                let used = state
                    .hosts
                    .values()
                    .any(|h| h.info.ip == ip && !h.info.powered_off);
                if !used && std::net::TcpListener::bind((ip, JSON_TRANSPORT_PORT)).is_ok() {
                    found = Some((state.next_index, ip));
                    break;
                }
            }
            found.context("no free address left on the fleet's loopback network")?
        };
        identity.public_ipv4 = Some(ip);
        identity.local_ipv4 = ip;
        let dir = self.options.dir.join(&identity.instance_id);
        let root = dir.join("whist");
        std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
        let imds = FakeImds::spawn(identity.clone())
            .await
            .context("starting its IMDS")?;
        let docker_proxy = if self.options.docker_proxy {
            Some(
                DockerProxy::start(&dir.join("docker.sock"), &self.options.docker_socket)
                    .context("starting its Docker proxy")?,
            )
        } else {
            None
        };
        let first = FIRST_HOST_PORT + (index % PORT_RANGES) * PORTS_PER_HOST;
        let host = Host {
            info: HostInfo {
                instance_id: identity.instance_id.clone(),
                region: identity.region.clone(),
                ip,
                pid: None,
                starts: 0,
                exits: Vec::new(),
                powered_off: false,
                log: dir.join("host-service.log"),
                root,
            },
            identity,
            imds: Some(imds),
            docker_proxy,
            child: None,
            restart_at: Some(Instant::now()),
            recent_starts: Vec::new(),
            port_range: (first, first + PORTS_PER_HOST),
            terminating: false,
        };
        tracing::info!(instance.id = %host.info.instance_id, %ip, region = %host.info.region, "fleet: instance running, booting its host service");
        lock(&self.state)
            .hosts
            .insert(host.info.instance_id.clone(), host);
        Ok(())
    }

    /// Reaps exited host services, restarts crashed ones, powers off drained ones.
    async fn supervise(&self, clients: &[(String, aws_sdk_ec2::Client)]) {
        let mut drained = Vec::new();
        let mut to_start = Vec::new();
        {
            let mut state = lock(&self.state);
            let now = Instant::now();
            for host in state.hosts.values_mut() {
                if host.info.powered_off {
                    continue;
                }
                if let Some(child) = host.child.as_mut()
                    && let Ok(Some(status)) = child.try_wait()
                {
                    host.child = None;
                    host.info.pid = None;
                    host.info.exits.push(status.code());
                    let id = &host.info.instance_id;
                    match status.code() {
                        Some(0) => {
                            tracing::info!(instance.id = %id, "fleet: host service exited 0 (drained): powering off");
                            drained.push((host.info.region.clone(), id.clone()));
                        }
                        Some(EXIT_BAD_CONFIG) => {
                            tracing::error!(instance.id = %id, "fleet: host service refused its configuration (exit 2); not restarted");
                        }
                        _ if host.terminating => {}
                        _ => {
                            host.recent_starts
                                .retain(|t| now.duration_since(*t) < RESTART_WINDOW);
                            if host.recent_starts.len() >= RESTART_BURST {
                                tracing::error!(instance.id = %id, %status, "fleet: host service keeps failing; left stopped (systemd's start limit)");
                            } else {
                                tracing::warn!(instance.id = %id, %status, "fleet: host service died; restarting");
                                host.restart_at = Some(now + self.options.restart_delay);
                            }
                        }
                    }
                }
                if host.child.is_none()
                    && !host.terminating
                    && host.restart_at.is_some_and(|t| t <= now)
                {
                    host.restart_at = None;
                    to_start.push(host.info.instance_id.clone());
                }
            }
        }
        for id in to_start {
            if let Err(error) = self.start_host_service(&id) {
                tracing::error!(instance.id = %id, error = format!("{error:#}"), "fleet: cannot start the host service");
            }
        }
        for (region, id) in drained {
            if let Some((_, client)) = clients.iter().find(|(r, _)| *r == region) {
                self.power_off(client, &id, true).await;
            }
        }
    }

    fn start_host_service(&self, instance_id: &str) -> anyhow::Result<()> {
        let mut state = lock(&self.state);
        let host = state.hosts.get_mut(instance_id).context("unknown host")?;
        let options = &self.options;
        let mut command = Command::new(&options.host_binary);
        command
            // Its own process group, as under systemd: a terminal's Ctrl-C reaches devstack
            // alone, and the host service gets one SIGTERM (a drain) from the fleet, not a
            // SIGINT first that the SIGTERM would turn into "stop the mandelboxes now".
            .process_group(0)
            .env_clear()
            .envs(
                ["PATH", "HOME"]
                    .iter()
                    .filter_map(|k| std::env::var_os(k).map(|v| (*k, v))),
            )
            .envs(
                options
                    .host_env
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str())),
            )
            .env(
                "AWS_EC2_METADATA_SERVICE_ENDPOINT",
                host.imds
                    .as_ref()
                    .map(FakeImds::endpoint)
                    .unwrap_or_default(),
            )
            .envs(
                host.docker_proxy
                    .as_ref()
                    .map(|p| ("DOCKER_SOCKET", p.path().as_os_str())),
            )
            .env("WHIST_ROOT", &host.info.root)
            .env(
                "WHIST_JSON_TRANSPORT_ADDR",
                format!("{}:{JSON_TRANSPORT_PORT}", host.info.ip),
            )
            .env("WHIST_OPS_ADDR", format!("{}:{OPS_PORT}", host.info.ip))
            .env(
                "WHIST_PORT_RANGE",
                format!("{}-{}", host.port_range.0, host.port_range.1),
            )
            .env("WHIST_CPU_HOST_CAPACITY", options.host_capacity.to_string())
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command
            .spawn()
            .with_context(|| format!("starting {}", options.host_binary.display()))?;
        let prefix = format!("[{}] ", host.identity.instance_id);
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
        ]
        .into_iter()
        .flatten()
        {
            self.tasks.spawn(copy_lines(
                stream,
                host.info.log.clone(),
                options.echo_logs.then(|| prefix.clone()),
            ));
        }
        host.info.pid = child.id();
        host.info.starts += 1;
        host.recent_starts.push(Instant::now());
        host.child = Some(child);
        tracing::info!(instance.id = %instance_id, pid = ?host.info.pid, start = host.info.starts, "fleet: host service started");
        Ok(())
    }

    /// The instance goes away: its host service is stopped, its containers and files removed,
    /// its IMDS stopped; `terminate` also terminates it in moto (a host that powered itself off).
    async fn power_off(&self, client: &aws_sdk_ec2::Client, instance_id: &str, terminate: bool) {
        let host = {
            let mut state = lock(&self.state);
            let Some(host) = state.hosts.get_mut(instance_id) else {
                return;
            };
            if host.terminating {
                return;
            }
            host.terminating = true;
            // The host's record stays (powered off) for the tests; its process and IMDS move
            // into the power-off task.
            Host {
                info: host.info.clone(),
                identity: host.identity.clone(),
                imds: host.imds.take(),
                // Closed once the host service has stopped; kept for its figures.
                docker_proxy: None,
                child: host.child.take(),
                restart_at: None,
                recent_starts: Vec::new(),
                port_range: host.port_range,
                terminating: true,
            }
        };
        if terminate
            && let Err(error) = client
                .terminate_instances()
                .instance_ids(instance_id)
                .send()
                .await
        {
            tracing::warn!(instance.id = %instance_id, error = %aws_sdk_ec2::error::DisplayErrorContext(&error), "fleet: moto TerminateInstances");
        }
        let state = self.state.clone();
        let grace = self.options.stop_grace;
        self.tasks.spawn(async move {
            let mut host = host;
            let id = host.info.instance_id.clone();
            let status = stop_child(&mut host, grace, StopKind::Drain).await;
            if let Some(proxy) = lock(&state)
                .hosts
                .get(&id)
                .and_then(|h| h.docker_proxy.as_ref())
            {
                proxy.close();
            }
            remove_containers(&id).await;
            let dir = host.info.root.parent().map(Path::to_path_buf);
            if let Some(imds) = host.imds.take() {
                imds.stop().await;
            }
            if let Some(dir) = dir {
                let _ = tokio::fs::remove_dir_all(dir.join("whist")).await;
            }
            let mut state = lock(&state);
            if let Some(entry) = state.hosts.get_mut(&id) {
                entry.info.pid = None;
                if let Some(code) = status {
                    entry.info.exits.push(code);
                }
                entry.info.powered_off = true;
            }
            tracing::info!(instance.id = %id, "fleet: instance powered off");
        });
    }
}

/// How a host service is stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopKind {
    /// One SIGTERM: it drains (a terminated instance, as systemd stops the unit).
    Drain,
    /// The fleet itself stops (devstack's Ctrl-C): a second SIGTERM after
    /// [`SECOND_SIGNAL_AFTER`] stops its mandelboxes at once instead of waiting for the drain
    /// deadline, as a second Ctrl-C would.
    Now,
}

/// Between the two SIGTERMs of [`StopKind::Now`]: long enough for the first to be taken as its
/// own signal (signals sent together may be delivered as one).
const SECOND_SIGNAL_AFTER: Duration = Duration::from_millis(300);

/// SIGTERM (twice for [`StopKind::Now`]), then SIGKILL after `grace`. Returns the exit code
/// when it had to stop a process.
async fn stop_child(host: &mut Host, grace: Duration, kind: StopKind) -> Option<Option<i32>> {
    let mut child = host.child.take()?;
    let term = |pid: u32| {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    };
    if let Some(pid) = child.id() {
        term(pid);
        if kind == StopKind::Now
            && tokio::time::timeout(SECOND_SIGNAL_AFTER, child.wait())
                .await
                .is_err()
        {
            term(pid);
        }
    }
    let status = match tokio::time::timeout(grace, child.wait()).await {
        Ok(status) => status.ok(),
        Err(_) => {
            tracing::warn!(instance.id = %host.info.instance_id, "fleet: host service ignored SIGTERM; killing it");
            let _ = child.kill().await;
            child.wait().await.ok()
        }
    };
    Some(status.and_then(|s| s.code()))
}

/// What vanishes with a terminated instance: its containers.
async fn remove_containers(instance_id: &str) {
    let listed = Command::new("docker")
        .args(["ps", "-aq", "--filter"])
        .arg(format!("label={LABEL_INSTANCE_ID}={instance_id}"))
        .output()
        .await;
    let Ok(listed) = listed else { return };
    let ids: Vec<String> = String::from_utf8_lossy(&listed.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    if ids.is_empty() {
        return;
    }
    let _ = Command::new("docker")
        .args(["rm", "-f"])
        .args(&ids)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await;
}

/// Copies a process's output, line by line, into its log file and, with a prefix, to stdout.
pub(crate) async fn copy_lines(
    stream: impl tokio::io::AsyncRead + Unpin,
    path: PathBuf,
    echo: Option<String>,
) {
    let mut file = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .await
        .ok();
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if let Some(file) = file.as_mut() {
            let _ = file.write_all(format!("{line}\n").as_bytes()).await;
        }
        if let Some(prefix) = &echo {
            println!("{prefix}{line}");
        }
    }
}

/// Managed instances in one region with the identity IMDS would serve them.
async fn describe(client: &aws_sdk_ec2::Client, region: &str) -> anyhow::Result<Vec<Seen>> {
    let mut seen = Vec::new();
    let mut pages = client
        .describe_instances()
        .filters(
            Filter::builder()
                .name(format!("tag:{TAG_MANAGED_BY}"))
                .values(MANAGED_BY)
                .build(),
        )
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page =
            page.map_err(|e| anyhow::anyhow!("{}", aws_sdk_ec2::error::DisplayErrorContext(&e)))?;
        for instance in page.reservations().iter().flat_map(|r| r.instances()) {
            let (Some(id), Some(state)) = (
                instance.instance_id(),
                instance.state().and_then(|s| s.name()),
            ) else {
                continue;
            };
            let tags = instance
                .tags()
                .iter()
                .filter_map(|t| Some((t.key()?.to_owned(), t.value()?.to_owned())))
                .collect();
            seen.push(Seen {
                identity: Identity {
                    instance_id: id.to_owned(),
                    ami_id: instance.image_id().unwrap_or_default().to_owned(),
                    instance_type: instance
                        .instance_type()
                        .map(|t| t.as_str().to_owned())
                        .unwrap_or_default(),
                    region: region.to_owned(),
                    availability_zone: instance
                        .placement()
                        .and_then(|p| p.availability_zone())
                        .map(str::to_owned),
                    public_ipv4: None,
                    local_ipv4: Ipv4Addr::LOCALHOST,
                    tags,
                },
                state: state.clone(),
            });
        }
    }
    Ok(seen)
}
