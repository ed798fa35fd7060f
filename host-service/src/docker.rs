//! Docker: the engine that runs mandelboxes.
//!
//! [`ContainerRuntime`] is the narrow surface the mandelbox lifecycle needs: create, start, stop
//! and remove a container, read its state, list the ones we own, follow their events and find
//! the local image of an app. [`DockerRuntime`] implements it with bollard over the local socket
//! and is tested against the real engine (`tests/docker.rs`); [`FakeRuntime`] is a stateful
//! in-memory stand-in for the lifecycle's tests that can inject the next error of any operation.
//!
//! Ownership is by label: every container created through [`ContainerRuntime::create`] carries
//! [`LABEL_MANAGED`]`=`[`LABEL_MANAGED_VALUE`], and [`ContainerRuntime::list_mandelboxes`] and
//! [`ContainerRuntime::events`] see only those, so a restarted host service can find (and adopt
//! or clean) what it started before, and never touches anything else on the host.
//!
//! Everything here is idempotent where Docker allows it: removing a container that is gone and
//! stopping one that is stopped or gone both succeed, and inspecting one that is gone answers
//! `None`.

mod fake;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bollard::Docker;
use bollard::models::{
    ContainerCreateBody, ContainerStateStatusEnum, ContainerSummaryStateEnum, DeviceMapping,
    EventMessage, HostConfig, HostConfigCgroupnsModeEnum, Mount, MountBindOptions,
    MountBindOptionsPropagationEnum, MountType, PortBinding, PortSummaryTypeEnum,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, EventsOptionsBuilder, InspectContainerOptionsBuilder,
    ListContainersOptionsBuilder, ListImagesOptionsBuilder, RemoveContainerOptionsBuilder,
    StopContainerOptionsBuilder,
};
use futures::{Stream, StreamExt};

pub use fake::{FakeContainer, FakeRuntime, SIGKILL_EXIT_CODE, SIGTERM_EXIT_CODE};

use crate::ports::{ContainerPort, PortMap, Protocol};

/// Label on every container the host service creates; the filter for listing and events.
pub const LABEL_MANAGED: &str = "whist.managed";
/// The value of [`LABEL_MANAGED`].
pub const LABEL_MANAGED_VALUE: &str = "true";
/// The mandelbox a container runs (its `whist.mandelboxes.id`).
pub const LABEL_MANDELBOX_ID: &str = "whist.mandelbox.id";
/// The user the mandelbox was assigned to.
pub const LABEL_USER_ID: &str = "whist.user.id";
/// The client session the mandelbox serves.
pub const LABEL_SESSION_ID: &str = "whist.session.id";

/// The Docker Engine socket on a Linux host.
pub const DEFAULT_SOCKET: &str = "/var/run/docker.sock";

/// Deadline for one ordinary API call (create, start, inspect, list, remove, image list). Here
/// create takes 13–21 ms and start 170–225 ms, and 16 concurrent start-ups finish in about 2 s;
/// 30 s leaves room for a loaded host and for the nvidia runtime's hooks, and still fails a
/// spin-up instead of hanging it when the daemon is wedged.
pub const API_CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Added to a stop's grace period for its deadline: after the grace the engine kills the
/// container and then still has to reap it and answer.
pub const STOP_TIMEOUT_MARGIN: Duration = Duration::from_secs(15);
/// Longest grace a stop may ask for; a longer request is clamped. A mandelbox that has not
/// exited ten minutes after SIGTERM will not exit on its own, and the drain must not wait longer.
pub const MAX_STOP_GRACE: Duration = Duration::from_secs(600);
/// bollard's own per-request timeout, which covers only the wait for response headers. It is a
/// backstop set above every deadline here (including the longest stop), because a stop's
/// headers arrive only once the container has stopped; the per-call deadlines are what fire.
const BOLLARD_BACKSTOP_TIMEOUT: Duration =
    Duration::from_secs(MAX_STOP_GRACE.as_secs() + STOP_TIMEOUT_MARGIN.as_secs() + 60);
/// Longest Docker object name or id we accept: ids are 64 hex characters, names far shorter.
const MAX_NAME_LEN: usize = 128;

/// The engine operations, to name what failed and, in [`FakeRuntime::fail_next`], what to fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    Connect,
    Create,
    Start,
    Stop,
    Remove,
    Inspect,
    List,
    Events,
    FindImage,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Connect => "connect",
            Self::Create => "create",
            Self::Start => "start",
            Self::Stop => "stop",
            Self::Remove => "remove",
            Self::Inspect => "inspect",
            Self::List => "list",
            Self::Events => "events",
            Self::FindImage => "find image",
        })
    }
}

/// Why a container operation failed. `target` names the container (id or name) or the image
/// pattern the operation was about.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The spec or argument was refused before anything reached the engine.
    #[error("{op} {target}: invalid request: {reason}")]
    Invalid {
        op: Op,
        target: String,
        reason: String,
    },
    /// The container (or, on create, the image) does not exist.
    #[error("{op} {target}: not found: {message}")]
    NotFound {
        op: Op,
        target: String,
        message: String,
    },
    /// The engine refused because of the object's state, e.g. the name is taken or the container
    /// is running and removal was not forced.
    #[error("{op} {target}: conflict: {message}")]
    Conflict {
        op: Op,
        target: String,
        message: String,
    },
    /// Any other error answer from the engine (HTTP status and its message).
    #[error("{op} {target}: the Docker Engine answered {status}: {message}")]
    Engine {
        op: Op,
        target: String,
        status: u16,
        message: String,
    },
    /// No answer within the deadline.
    #[error("{op} {target}: no answer from the Docker Engine within {timeout:?}")]
    Timeout {
        op: Op,
        target: String,
        timeout: Duration,
    },
    /// The engine could not be reached or the connection broke (including a cut event stream).
    #[error("{op} {target}: cannot talk to the Docker Engine at {socket}: {message}")]
    Transport {
        op: Op,
        target: String,
        socket: String,
        message: String,
    },
    /// The engine answered something we could not understand.
    #[error("{op} {target}: unexpected answer from the Docker Engine: {message}")]
    Protocol {
        op: Op,
        target: String,
        message: String,
    },
}

impl RuntimeError {
    /// The operation that failed.
    pub fn op(&self) -> Op {
        match self {
            Self::Invalid { op, .. }
            | Self::NotFound { op, .. }
            | Self::Conflict { op, .. }
            | Self::Engine { op, .. }
            | Self::Timeout { op, .. }
            | Self::Transport { op, .. }
            | Self::Protocol { op, .. } => *op,
        }
    }

    /// Whether trying the same call again later can succeed (the engine was slow or away),
    /// as opposed to a refusal that will repeat.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Timeout { .. } | Self::Transport { .. })
            || matches!(self, Self::Engine { status, .. } if *status >= 500)
    }
}

/// A Docker container id (or name): what the engine returned from create, or found in a list or
/// an event. Validated so it cannot smuggle a path into an API URL.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContainerId(String);

/// A string that is not a container id or name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid container id or name {value:?}: {reason}")]
pub struct InvalidContainerId {
    /// The refused value, cut to 128 characters.
    pub value: String,
    pub reason: &'static str,
}

impl ContainerId {
    pub fn new(value: impl Into<String>) -> Result<Self, InvalidContainerId> {
        let value = value.into();
        validate_object_name(&value).map_err(|reason| InvalidContainerId {
            value: value.chars().take(MAX_NAME_LEN).collect(),
            reason,
        })?;
        Ok(Self(value))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ContainerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for ContainerId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// Docker's rule for container names, `[a-zA-Z0-9][a-zA-Z0-9_.-]*`; ids (hex) satisfy it too.
fn validate_object_name(value: &str) -> Result<(), &'static str> {
    if value.is_empty() {
        return Err("empty");
    }
    if value.len() > MAX_NAME_LEN {
        return Err("longer than 128 characters");
    }
    if !value.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err("must start with an ASCII letter or digit");
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
    {
        return Err("only ASCII letters, digits, '_', '.' and '-' are allowed");
    }
    Ok(())
}

/// Mount propagation of a bind mount (`rshared` lets mounts made inside the container, e.g. a
/// FUSE file system, show on the host).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Propagation {
    Private,
    RPrivate,
    Shared,
    RShared,
    Slave,
    RSlave,
}

impl Propagation {
    /// The name Docker uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Private => "private",
            Self::RPrivate => "rprivate",
            Self::Shared => "shared",
            Self::RShared => "rshared",
            Self::Slave => "slave",
            Self::RSlave => "rslave",
        }
    }

    fn to_bollard(self) -> MountBindOptionsPropagationEnum {
        match self {
            Self::Private => MountBindOptionsPropagationEnum::PRIVATE,
            Self::RPrivate => MountBindOptionsPropagationEnum::RPRIVATE,
            Self::Shared => MountBindOptionsPropagationEnum::SHARED,
            Self::RShared => MountBindOptionsPropagationEnum::RSHARED,
            Self::Slave => MountBindOptionsPropagationEnum::SLAVE,
            Self::RSlave => MountBindOptionsPropagationEnum::RSLAVE,
        }
    }
}

/// A host directory or file mounted into the container. The host path must exist (unlike
/// Docker's legacy `Binds`, which would silently create a root-owned directory).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindMount {
    pub host_path: PathBuf,
    pub container_path: PathBuf,
    pub read_only: bool,
    /// `None`: Docker's default (`rprivate`).
    pub propagation: Option<Propagation>,
}

/// A host device node made available in the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub host_path: PathBuf,
    pub container_path: PathBuf,
    /// cgroup permissions: a non-empty subset of `rwm`.
    pub permissions: String,
}

/// A tmpfs mounted in the container, with mount options such as `size=52428800,mode=1777`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TmpfsMount {
    pub container_path: PathBuf,
    pub options: String,
}

/// Everything needed to create a mandelbox container. Plain data; [`ContainerSpec::new`] fills
/// in the secure defaults.
///
/// Always applied, not configurable: every capability dropped (`cap_drop ALL`) before
/// [`cap_add`](Self::cap_add) adds back exactly the listed ones, and the [`LABEL_MANAGED`]
/// label. `privileged` is never set.
#[derive(Clone, PartialEq, Eq)]
pub struct ContainerSpec {
    /// Container name (unique on the host), `[a-zA-Z0-9][a-zA-Z0-9_.-]*`.
    pub name: String,
    /// Local image reference, e.g. `whist/browsers/chrome:current-build`.
    pub image: String,
    /// Environment. Values may be secrets (the AES key): `Debug` prints the names only.
    pub env: BTreeMap<String, String>,
    /// Labels, e.g. [`LABEL_MANDELBOX_ID`]; [`LABEL_MANAGED`] is added on create.
    pub labels: BTreeMap<String, String>,
    pub binds: Vec<BindMount>,
    /// Container port → host port, published on [`publish_ip`](Self::publish_ip).
    pub ports: PortMap,
    /// Host address the ports are published on; `0.0.0.0` (all interfaces) by default.
    pub publish_ip: IpAddr,
    pub devices: Vec<Device>,
    /// Capabilities added back after dropping all, e.g. `SYS_NICE` (`CAP_` prefix optional).
    /// `ALL` is refused.
    pub cap_add: Vec<String>,
    /// `no-new-privileges`: setuid binaries cannot gain privileges. On by default.
    pub no_new_privileges: bool,
    /// AppArmor profile to confine the container with. Name it only when the profile is loaded
    /// on the host: an engine without AppArmor accepts and silently ignores it.
    pub apparmor_profile: Option<String>,
    /// Size of `/dev/shm` in bytes; `None`: Docker's default (64 MiB).
    pub shm_size_bytes: Option<u64>,
    pub tmpfs: Vec<TmpfsMount>,
    /// Memory limit in bytes (swap included: swap is not granted on top).
    pub memory_bytes: Option<u64>,
    /// CPU quota in billionths of a CPU (`1_500_000_000` = 1.5 CPUs).
    pub nano_cpus: Option<u64>,
    /// Most processes (threads included) the container may run.
    pub pids_limit: Option<u64>,
    /// Run Docker's init (tini) as PID 1: it reaps zombies and forwards signals, so a stop takes
    /// milliseconds instead of the whole grace period. On by default.
    pub init: bool,
    /// Allocate a TTY (the mandelbox's X server and scripts expect one). On by default.
    pub tty: bool,
    /// OCI runtime, e.g. `nvidia`; `None`: the daemon's default.
    pub runtime: Option<String>,
    /// Its own cgroup namespace: the container sees its own cgroup as the root of the tree, not
    /// the host's hierarchy. On by default (Docker's default on cgroup v1 is the host's).
    pub cgroupns_private: bool,
    /// Mount the image's root file system read-only; what the container writes goes to its
    /// binds and tmpfs mounts only. On by default.
    pub read_only_rootfs: bool,
}

impl ContainerSpec {
    /// A spec with secure defaults: no ports, binds, devices or added capabilities,
    /// `no-new-privileges`, `init` and a TTY.
    pub fn new(name: impl Into<String>, image: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            image: image.into(),
            env: BTreeMap::new(),
            labels: BTreeMap::new(),
            binds: Vec::new(),
            ports: PortMap::new(),
            publish_ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            devices: Vec::new(),
            cap_add: Vec::new(),
            no_new_privileges: true,
            apparmor_profile: None,
            shm_size_bytes: None,
            tmpfs: Vec::new(),
            memory_bytes: None,
            nano_cpus: None,
            pids_limit: None,
            init: true,
            tty: true,
            runtime: None,
            cgroupns_private: true,
            read_only_rootfs: true,
        }
    }

    /// Checks what the engine would refuse, or accept and misbehave on, before anything is sent.
    pub fn validate(&self) -> Result<(), RuntimeError> {
        let invalid = |reason: String| RuntimeError::Invalid {
            op: Op::Create,
            target: self.name.chars().take(MAX_NAME_LEN).collect(),
            reason,
        };
        validate_object_name(&self.name)
            .map_err(|reason| invalid(format!("container name: {reason}")))?;
        if self.image.trim().is_empty() || self.image.chars().any(char::is_whitespace) {
            return Err(invalid(format!("image reference {:?}", self.image)));
        }
        for key in self.env.keys() {
            if key.is_empty() || key.contains('=') || key.contains('\0') {
                return Err(invalid(format!("environment variable name {key:?}")));
            }
        }
        if self.env.values().any(|v| v.contains('\0')) {
            return Err(invalid("an environment value contains NUL".to_owned()));
        }
        for cap in &self.cap_add {
            let bare = cap.strip_prefix("CAP_").unwrap_or(cap);
            if bare.eq_ignore_ascii_case("ALL") {
                return Err(invalid(
                    "cap_add ALL is refused: name each capability".to_owned(),
                ));
            }
            if bare.is_empty() || !bare.bytes().all(|b| b.is_ascii_uppercase() || b == b'_') {
                return Err(invalid(format!("capability {cap:?}")));
            }
        }
        for bind in &self.binds {
            if !bind.host_path.is_absolute() || !bind.container_path.is_absolute() {
                return Err(invalid(format!(
                    "bind {} -> {}: both paths must be absolute",
                    bind.host_path.display(),
                    bind.container_path.display()
                )));
            }
        }
        for device in &self.devices {
            if !device.host_path.is_absolute() || !device.container_path.is_absolute() {
                return Err(invalid(format!(
                    "device {}: both paths must be absolute",
                    device.host_path.display()
                )));
            }
            let p = &device.permissions;
            if p.is_empty() || !p.chars().all(|c| matches!(c, 'r' | 'w' | 'm')) {
                return Err(invalid(format!(
                    "device {}: permissions {p:?} must be a subset of \"rwm\"",
                    device.host_path.display()
                )));
            }
        }
        for tmpfs in &self.tmpfs {
            if !tmpfs.container_path.is_absolute() {
                return Err(invalid(format!(
                    "tmpfs {}: the path must be absolute",
                    tmpfs.container_path.display()
                )));
            }
        }
        if let Some(profile) = &self.apparmor_profile
            && (profile.is_empty() || profile.contains([',', '=', ':', '\0']))
        {
            return Err(invalid(format!("AppArmor profile {profile:?}")));
        }
        for (what, value) in [
            ("shm size", self.shm_size_bytes),
            ("memory limit", self.memory_bytes),
            ("CPU quota", self.nano_cpus),
            ("pids limit", self.pids_limit),
        ] {
            match value {
                Some(0) => return Err(invalid(format!("{what} must be positive"))),
                Some(v) if i64::try_from(v).is_err() => {
                    return Err(invalid(format!("{what} {v} is out of range")));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The create request. Call [`validate`](Self::validate) first: out-of-range numbers are
    /// clamped here rather than failed.
    fn to_create_body(&self) -> ContainerCreateBody {
        let to_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let mut labels: HashMap<String, String> = self
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        labels.insert(LABEL_MANAGED.to_owned(), LABEL_MANAGED_VALUE.to_owned());

        let port_bindings: bollard::models::PortMap = self
            .ports
            .iter()
            .map(|(container, host_port)| {
                (
                    container.to_string(),
                    Some(vec![PortBinding {
                        host_ip: Some(self.publish_ip.to_string()),
                        host_port: Some(host_port.to_string()),
                    }]),
                )
            })
            .collect();
        let mounts = self
            .binds
            .iter()
            .map(|b| Mount {
                target: Some(b.container_path.to_string_lossy().into_owned()),
                source: Some(b.host_path.to_string_lossy().into_owned()),
                typ: Some(MountType::BIND),
                read_only: Some(b.read_only),
                bind_options: b.propagation.map(|p| MountBindOptions {
                    propagation: Some(p.to_bollard()),
                    ..MountBindOptions::default()
                }),
                ..Mount::default()
            })
            .collect();
        let devices = self
            .devices
            .iter()
            .map(|d| DeviceMapping {
                path_on_host: Some(d.host_path.to_string_lossy().into_owned()),
                path_in_container: Some(d.container_path.to_string_lossy().into_owned()),
                cgroup_permissions: Some(d.permissions.clone()),
            })
            .collect();
        let mut security_opt = Vec::new();
        if self.no_new_privileges {
            security_opt.push("no-new-privileges:true".to_owned());
        }
        if let Some(profile) = &self.apparmor_profile {
            security_opt.push(format!("apparmor={profile}"));
        }
        let tmpfs = self
            .tmpfs
            .iter()
            .map(|t| {
                (
                    t.container_path.to_string_lossy().into_owned(),
                    t.options.clone(),
                )
            })
            .collect();

        let host_config = HostConfig {
            mounts: Some(mounts),
            port_bindings: Some(port_bindings),
            devices: Some(devices),
            cap_drop: Some(vec!["ALL".to_owned()]),
            cap_add: Some(self.cap_add.clone()),
            security_opt: Some(security_opt),
            shm_size: self.shm_size_bytes.map(to_i64),
            tmpfs: Some(tmpfs),
            memory: self.memory_bytes.map(to_i64),
            // Equal to the memory limit: no swap on top of it.
            memory_swap: self.memory_bytes.map(to_i64),
            nano_cpus: self.nano_cpus.map(to_i64),
            pids_limit: self.pids_limit.map(to_i64),
            init: Some(self.init),
            runtime: self.runtime.clone(),
            privileged: Some(false),
            cgroupns_mode: Some(if self.cgroupns_private {
                HostConfigCgroupnsModeEnum::PRIVATE
            } else {
                HostConfigCgroupnsModeEnum::HOST
            }),
            readonly_rootfs: Some(self.read_only_rootfs),
            ..HostConfig::default()
        };
        ContainerCreateBody {
            image: Some(self.image.clone()),
            env: Some(self.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
            labels: Some(labels),
            exposed_ports: Some(self.ports.keys().map(ContainerPort::to_string).collect()),
            tty: Some(self.tty),
            attach_stdin: Some(false),
            attach_stdout: Some(false),
            attach_stderr: Some(false),
            host_config: Some(host_config),
            ..ContainerCreateBody::default()
        }
    }
}

impl fmt::Debug for ContainerSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Environment values can be secrets (the AES key): names only.
        f.debug_struct("ContainerSpec")
            .field("name", &self.name)
            .field("image", &self.image)
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .field("labels", &self.labels)
            .field("binds", &self.binds)
            .field("ports", &self.ports)
            .field("publish_ip", &self.publish_ip)
            .field("devices", &self.devices)
            .field("cap_add", &self.cap_add)
            .field("no_new_privileges", &self.no_new_privileges)
            .field("apparmor_profile", &self.apparmor_profile)
            .field("shm_size_bytes", &self.shm_size_bytes)
            .field("tmpfs", &self.tmpfs)
            .field("memory_bytes", &self.memory_bytes)
            .field("nano_cpus", &self.nano_cpus)
            .field("pids_limit", &self.pids_limit)
            .field("init", &self.init)
            .field("tty", &self.tty)
            .field("runtime", &self.runtime)
            .field("cgroupns_private", &self.cgroupns_private)
            .field("read_only_rootfs", &self.read_only_rootfs)
            .finish()
    }
}

/// Where a container is in its life, as Docker says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ContainerStatus {
    Created,
    Running,
    Paused,
    Restarting,
    Removing,
    Exited,
    Dead,
    /// A state this code does not know (a newer engine).
    Unknown,
}

impl ContainerStatus {
    fn from_inspect(status: Option<ContainerStateStatusEnum>) -> Self {
        match status {
            Some(ContainerStateStatusEnum::CREATED) => Self::Created,
            Some(ContainerStateStatusEnum::RUNNING) => Self::Running,
            Some(ContainerStateStatusEnum::PAUSED) => Self::Paused,
            Some(ContainerStateStatusEnum::RESTARTING) => Self::Restarting,
            Some(ContainerStateStatusEnum::REMOVING) => Self::Removing,
            Some(ContainerStateStatusEnum::EXITED) => Self::Exited,
            Some(ContainerStateStatusEnum::DEAD) => Self::Dead,
            _ => Self::Unknown,
        }
    }

    fn from_summary(state: Option<ContainerSummaryStateEnum>) -> Self {
        match state {
            Some(ContainerSummaryStateEnum::CREATED) => Self::Created,
            Some(ContainerSummaryStateEnum::RUNNING) => Self::Running,
            Some(ContainerSummaryStateEnum::PAUSED) => Self::Paused,
            Some(ContainerSummaryStateEnum::RESTARTING) => Self::Restarting,
            Some(ContainerSummaryStateEnum::REMOVING) => Self::Removing,
            Some(ContainerSummaryStateEnum::EXITED) => Self::Exited,
            Some(ContainerSummaryStateEnum::DEAD) => Self::Dead,
            _ => Self::Unknown,
        }
    }

    /// Whether the container's process may be alive (running, paused or restarting).
    pub fn is_alive(self) -> bool {
        matches!(self, Self::Running | Self::Paused | Self::Restarting)
    }
}

/// What [`ContainerRuntime::inspect_state`] reports about a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerState {
    pub status: ContainerStatus,
    pub running: bool,
    /// The exit code once the container has exited (or died); `None` before.
    pub exit_code: Option<i64>,
    /// Whether the kernel's OOM killer ended it (the exit code is then 137).
    pub oom_killed: bool,
}

/// A container of ours found by [`ContainerRuntime::list_mandelboxes`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MandelboxContainer {
    pub id: ContainerId,
    /// The name without Docker's leading `/`.
    pub name: String,
    pub status: ContainerStatus,
    pub labels: BTreeMap<String, String>,
    /// The host ports the engine publishes now. Docker reports them only while the container
    /// runs: empty for one that is created or exited.
    pub ports: PortMap,
}

/// What happened to a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContainerEventKind {
    Start,
    /// The process ended; `exit_code` is `None` only when the engine did not say.
    Die {
        exit_code: Option<i64>,
    },
    /// The kernel OOM killer hit the container (a `Die` with code 137 follows).
    Oom,
    /// The container was removed.
    Destroy,
}

/// One container event from [`ContainerRuntime::events`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerEvent {
    pub id: ContainerId,
    pub kind: ContainerEventKind,
    /// The container's name, when the engine sent it.
    pub name: Option<String>,
    /// The container's labels (ours included, e.g. [`LABEL_MANDELBOX_ID`]).
    pub labels: BTreeMap<String, String>,
}

/// Event attributes Docker adds beside the container's labels; not labels themselves.
const NON_LABEL_ATTRIBUTES: [&str; 4] = ["name", "image", "exitCode", "signal"];
/// The actions [`parse_event`] turns into events, also sent to the engine as a filter.
const EVENT_ACTIONS: [&str; 4] = ["start", "die", "oom", "destroy"];

/// Turns one Docker event message into a container event; `None` for anything that is not a
/// container start, die, oom or destroy (health checks, exec, attach, ...), or that lacks an id.
pub fn parse_event(message: &EventMessage) -> Option<ContainerEvent> {
    use bollard::models::EventMessageTypeEnum;
    if let Some(typ) = message.typ
        && typ != EventMessageTypeEnum::CONTAINER
    {
        return None;
    }
    let actor = message.actor.as_ref()?;
    let id = ContainerId::new(actor.id.clone()?).ok()?;
    let empty = HashMap::new();
    let attributes = actor.attributes.as_ref().unwrap_or(&empty);
    let kind = match message.action.as_deref()? {
        "start" => ContainerEventKind::Start,
        "die" => ContainerEventKind::Die {
            exit_code: attributes
                .get("exitCode")
                .and_then(|code| code.trim().parse::<i64>().ok()),
        },
        "oom" => ContainerEventKind::Oom,
        "destroy" => ContainerEventKind::Destroy,
        _ => return None,
    };
    let labels = attributes
        .iter()
        .filter(|(k, _)| !NON_LABEL_ATTRIBUTES.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Some(ContainerEvent {
        id,
        kind,
        name: attributes.get("name").cloned(),
        labels,
    })
}

/// The tag [`ContainerRuntime::find_image`] looks for.
pub const CURRENT_BUILD_TAG: &str = "current-build";

/// Checks an app name for [`ContainerRuntime::find_image`]: lower-case path segments of
/// `[a-z0-9._-]`, separated by single `/`, e.g. `browsers/chrome`.
pub fn validate_app_pattern(app: &str) -> Result<(), RuntimeError> {
    let invalid = |reason: &str| RuntimeError::Invalid {
        op: Op::FindImage,
        target: app.chars().take(MAX_NAME_LEN).collect(),
        reason: reason.to_owned(),
    };
    if app.is_empty() || app.len() > MAX_NAME_LEN {
        return Err(invalid("the app name must have 1 to 128 characters"));
    }
    for segment in app.split('/') {
        if segment.is_empty() {
            return Err(invalid("empty path segment"));
        }
        if !segment.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        }) {
            return Err(invalid(
                "only lower-case ASCII letters, digits, '.', '_', '-' and '/' are allowed",
            ));
        }
    }
    Ok(())
}

/// Whether the image reference `tag` is `<app>:current-build`, possibly under a registry or
/// namespace prefix that ends at a `/`: `browsers/chrome` matches
/// `whist/browsers/chrome:current-build` but not `x/browsers/chromey:current-build` or
/// `x/mybrowsers/chrome:current-build`. A plain string comparison: no regex to panic on.
pub fn image_matches_app(app: &str, tag: &str) -> bool {
    let Some(repository) = tag
        .strip_suffix(CURRENT_BUILD_TAG)
        .and_then(|t| t.strip_suffix(':'))
    else {
        return false;
    };
    match repository.strip_suffix(app) {
        Some("") => true,
        Some(prefix) => prefix.ends_with('/'),
        None => false,
    }
}

/// The engine that runs mandelboxes. Implemented by [`DockerRuntime`] (the real engine) and
/// [`FakeRuntime`] (in memory, for the lifecycle's tests).
///
/// Every method is bounded in time: an implementation answers or fails within its deadline.
pub trait ContainerRuntime: Send + Sync {
    /// Creates a container from `spec` (after [`ContainerSpec::validate`]), labelled
    /// [`LABEL_MANAGED`]. A taken name is [`RuntimeError::Conflict`]; a missing image
    /// [`RuntimeError::NotFound`].
    fn create(
        &self,
        spec: &ContainerSpec,
    ) -> impl Future<Output = Result<ContainerId, RuntimeError>> + Send;

    /// Starts a created (or exited) container; starting a running one succeeds.
    fn start(&self, id: &ContainerId) -> impl Future<Output = Result<(), RuntimeError>> + Send;

    /// Sends SIGTERM, then SIGKILL after `grace` (whole seconds, rounded up; at most
    /// [`MAX_STOP_GRACE`]). Stopping a stopped or missing container succeeds.
    fn stop(
        &self,
        id: &ContainerId,
        grace: Duration,
    ) -> impl Future<Output = Result<(), RuntimeError>> + Send;

    /// Removes a container (with its anonymous volumes); `force` kills a running one first.
    /// Removing a missing container succeeds: it is already gone.
    fn remove(
        &self,
        id: &ContainerId,
        force: bool,
    ) -> impl Future<Output = Result<(), RuntimeError>> + Send;

    /// The container's state, or `None` when it does not exist.
    fn inspect_state(
        &self,
        id: &ContainerId,
    ) -> impl Future<Output = Result<Option<ContainerState>, RuntimeError>> + Send;

    /// Every container labelled [`LABEL_MANAGED`], in any state; nothing else.
    fn list_mandelboxes(
        &self,
    ) -> impl Future<Output = Result<Vec<MandelboxContainer>, RuntimeError>> + Send;

    /// Start, die, oom and destroy events of containers labelled [`LABEL_MANAGED`], from the
    /// moment of this call (events between the call and the first poll are not lost). The
    /// stream ends after yielding an error (e.g. the daemon restarted): open a new one and
    /// reconcile with [`list_mandelboxes`](Self::list_mandelboxes), since events in between are
    /// not replayed.
    fn events(&self) -> impl Stream<Item = Result<ContainerEvent, RuntimeError>> + Send + 'static;

    /// The newest local image tagged `<app>:current-build` (see [`image_matches_app`]), e.g.
    /// `whist/browsers/chrome:current-build` for `browsers/chrome`; `None` when there is none.
    fn find_image(
        &self,
        app: &str,
    ) -> impl Future<Output = Result<Option<String>, RuntimeError>> + Send;
}

/// [`ContainerRuntime`] on the real Docker Engine, through bollard over the local socket, at
/// the API version the engine supports (negotiated at connect: this code's bollard speaks 1.53,
/// while e.g. Engine 20.10 answers 400 to anything above 1.41).
#[derive(Debug, Clone)]
pub struct DockerRuntime {
    docker: Docker,
    socket: String,
}

impl DockerRuntime {
    /// Connects to the engine at `socket` (e.g. [`DEFAULT_SOCKET`]) and negotiates the API
    /// version, within [`API_CALL_TIMEOUT`].
    pub async fn connect(socket: impl AsRef<Path>) -> Result<Self, RuntimeError> {
        let socket = socket.as_ref().to_string_lossy().into_owned();
        let transport = |message: String| RuntimeError::Transport {
            op: Op::Connect,
            target: String::new(),
            socket: socket.clone(),
            message,
        };
        let docker = Docker::connect_with_unix(
            &socket,
            BOLLARD_BACKSTOP_TIMEOUT.as_secs(),
            bollard::API_DEFAULT_VERSION,
        )
        .map_err(|e| transport(error_chain(&e)))?;
        let docker = match tokio::time::timeout(API_CALL_TIMEOUT, docker.negotiate_version()).await
        {
            Ok(Ok(docker)) => docker,
            Ok(Err(e)) => return Err(transport(error_chain(&e))),
            Err(_) => {
                return Err(RuntimeError::Timeout {
                    op: Op::Connect,
                    target: String::new(),
                    timeout: API_CALL_TIMEOUT,
                });
            }
        };
        tracing::debug!(socket, api_version = %docker.client_version(), "connected to the Docker Engine");
        Ok(Self { docker, socket })
    }

    /// The API version in use after negotiation, e.g. `1.41`.
    pub fn api_version(&self) -> String {
        self.docker.client_version().to_string()
    }

    /// The engine's security options (`docker info`), e.g. `name=seccomp,profile=default`.
    pub async fn security_options(&self) -> Result<Vec<String>, RuntimeError> {
        let info = self
            .call(Op::Connect, "", API_CALL_TIMEOUT, self.docker.info())
            .await?;
        Ok(info.security_options.unwrap_or_default())
    }

    /// The bollard client, for tests and diagnostics that need more than the trait.
    pub fn client(&self) -> &Docker {
        &self.docker
    }

    /// Runs one engine call with a deadline and maps its error.
    async fn call<T>(
        &self,
        op: Op,
        target: &str,
        timeout: Duration,
        request: impl Future<Output = Result<T, bollard::errors::Error>>,
    ) -> Result<T, RuntimeError> {
        match tokio::time::timeout(timeout, request).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(map_error(op, target, &self.socket, &e)),
            Err(_) => Err(RuntimeError::Timeout {
                op,
                target: target.to_owned(),
                timeout,
            }),
        }
    }
}

/// Maps a bollard error to ours, keeping the engine's message.
fn map_error(op: Op, target: &str, socket: &str, error: &bollard::errors::Error) -> RuntimeError {
    use bollard::errors::Error as E;
    let target = target.to_owned();
    match error {
        E::DockerResponseServerError {
            status_code,
            message,
        } => match status_code {
            404 => RuntimeError::NotFound {
                op,
                target,
                message: message.clone(),
            },
            409 => RuntimeError::Conflict {
                op,
                target,
                message: message.clone(),
            },
            status => RuntimeError::Engine {
                op,
                target,
                status: *status,
                message: message.clone(),
            },
        },
        E::RequestTimeoutError => RuntimeError::Timeout {
            op,
            target,
            timeout: BOLLARD_BACKSTOP_TIMEOUT,
        },
        E::JsonDataError { .. }
        | E::JsonSerdeError { .. }
        | E::APIVersionParseError {}
        | E::StrParseError { .. } => RuntimeError::Protocol {
            op,
            target,
            message: error_chain(error),
        },
        _ => RuntimeError::Transport {
            op,
            target,
            socket: socket.to_owned(),
            message: error_chain(error),
        },
    }
}

/// An error and its sources on one line.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Docker's `t` for a stop: whole seconds, rounded up, clamped to [`MAX_STOP_GRACE`].
fn stop_grace_seconds(grace: Duration) -> i32 {
    let grace = grace.min(MAX_STOP_GRACE);
    let seconds = grace.as_secs() + u64::from(grace.subsec_nanos() > 0);
    i32::try_from(seconds).unwrap_or(i32::MAX)
}

/// The `since` of an events request: now, as `seconds.nanoseconds` since the epoch.
fn events_since_now() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    format!("{}.{:09}", now.as_secs(), now.subsec_nanos())
}

fn managed_label_filter() -> String {
    format!("{LABEL_MANAGED}={LABEL_MANAGED_VALUE}")
}

fn summary_ports(ports: Option<Vec<bollard::models::PortSummary>>) -> PortMap {
    ports
        .unwrap_or_default()
        .into_iter()
        .filter_map(|p| {
            let protocol = match p.typ {
                Some(PortSummaryTypeEnum::TCP) => Protocol::Tcp,
                Some(PortSummaryTypeEnum::UDP) => Protocol::Udp,
                _ => return None,
            };
            let container = ContainerPort {
                port: p.private_port,
                protocol,
            };
            Some((container, p.public_port?))
        })
        .collect()
}

impl ContainerRuntime for DockerRuntime {
    async fn create(&self, spec: &ContainerSpec) -> Result<ContainerId, RuntimeError> {
        spec.validate()?;
        let options = CreateContainerOptionsBuilder::new()
            .name(&spec.name)
            .build();
        let body = spec.to_create_body();
        let response = self
            .call(
                Op::Create,
                &spec.name,
                API_CALL_TIMEOUT,
                self.docker.create_container(Some(options), body),
            )
            .await?;
        for warning in &response.warnings {
            tracing::warn!(container.name = %spec.name, %warning, "Docker Engine warning on create");
        }
        ContainerId::new(response.id).map_err(|_| RuntimeError::Protocol {
            op: Op::Create,
            target: spec.name.clone(),
            message: "the engine returned an invalid container id".to_owned(),
        })
    }

    async fn start(&self, id: &ContainerId) -> Result<(), RuntimeError> {
        self.call(
            Op::Start,
            id.as_str(),
            API_CALL_TIMEOUT,
            self.docker.start_container(id.as_str(), None),
        )
        .await
    }

    async fn stop(&self, id: &ContainerId, grace: Duration) -> Result<(), RuntimeError> {
        let t = stop_grace_seconds(grace);
        let options = StopContainerOptionsBuilder::new().t(t).build();
        let deadline = Duration::from_secs(u64::from(t.unsigned_abs())) + STOP_TIMEOUT_MARGIN;
        match self
            .call(
                Op::Stop,
                id.as_str(),
                deadline,
                self.docker.stop_container(id.as_str(), Some(options)),
            )
            .await
        {
            Err(RuntimeError::NotFound { .. }) => Ok(()),
            other => other,
        }
    }

    async fn remove(&self, id: &ContainerId, force: bool) -> Result<(), RuntimeError> {
        let options = RemoveContainerOptionsBuilder::new()
            .force(force)
            .v(true)
            .build();
        match self
            .call(
                Op::Remove,
                id.as_str(),
                API_CALL_TIMEOUT,
                self.docker.remove_container(id.as_str(), Some(options)),
            )
            .await
        {
            // Already gone, or already being removed by an earlier call: the goal is reached.
            Err(RuntimeError::NotFound { .. }) => Ok(()),
            Err(RuntimeError::Conflict { message, .. })
                if message.contains("already in progress") =>
            {
                Ok(())
            }
            other => other,
        }
    }

    async fn inspect_state(
        &self,
        id: &ContainerId,
    ) -> Result<Option<ContainerState>, RuntimeError> {
        let options = InspectContainerOptionsBuilder::new().size(false).build();
        let response = match self
            .call(
                Op::Inspect,
                id.as_str(),
                API_CALL_TIMEOUT,
                self.docker.inspect_container(id.as_str(), Some(options)),
            )
            .await
        {
            Ok(response) => response,
            Err(RuntimeError::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let state = response.state.unwrap_or_default();
        let status = ContainerStatus::from_inspect(state.status);
        let exited = matches!(status, ContainerStatus::Exited | ContainerStatus::Dead);
        Ok(Some(ContainerState {
            status,
            running: state.running.unwrap_or(false),
            exit_code: if exited { state.exit_code } else { None },
            oom_killed: state.oom_killed.unwrap_or(false),
        }))
    }

    async fn list_mandelboxes(&self) -> Result<Vec<MandelboxContainer>, RuntimeError> {
        let filters = HashMap::from([("label", vec![managed_label_filter()])]);
        let options = ListContainersOptionsBuilder::new()
            .all(true)
            .filters(&filters)
            .build();
        let summaries = self
            .call(
                Op::List,
                "",
                API_CALL_TIMEOUT,
                self.docker.list_containers(Some(options)),
            )
            .await?;
        let mut containers = Vec::with_capacity(summaries.len());
        for summary in summaries {
            let labels: BTreeMap<String, String> =
                summary.labels.unwrap_or_default().into_iter().collect();
            // The engine filtered already; checking again costs nothing and guards the promise.
            if labels.get(LABEL_MANAGED).map(String::as_str) != Some(LABEL_MANAGED_VALUE) {
                continue;
            }
            let Some(id) = summary.id.and_then(|id| ContainerId::new(id).ok()) else {
                tracing::warn!("the Docker Engine listed a container without a valid id");
                continue;
            };
            let name = summary
                .names
                .unwrap_or_default()
                .into_iter()
                .next()
                .map(|n| n.trim_start_matches('/').to_owned())
                .unwrap_or_default();
            containers.push(MandelboxContainer {
                id,
                name,
                status: ContainerStatus::from_summary(summary.state),
                labels,
                ports: summary_ports(summary.ports),
            });
        }
        Ok(containers)
    }

    fn events(&self) -> impl Stream<Item = Result<ContainerEvent, RuntimeError>> + Send + 'static {
        let filters = HashMap::from([
            ("type", vec!["container".to_owned()]),
            ("label", vec![managed_label_filter()]),
            (
                "event",
                EVENT_ACTIONS.iter().map(|a| (*a).to_owned()).collect(),
            ),
        ]);
        // bollard connects on the first poll; `since` makes the engine replay from its event
        // buffer (the last 256 events) whatever happened between this call and that poll. The
        // engine is on this host (a local socket), so its clock is ours.
        let options = EventsOptionsBuilder::new()
            .since(&events_since_now())
            .filters(&filters)
            .build();
        let socket = self.socket.clone();
        let mut failed = false;
        self.docker
            .events(Some(options))
            .take_while(move |item| {
                // Stop after the first error: the stream is broken from there on.
                let go_on = !failed;
                failed = failed || item.is_err();
                futures::future::ready(go_on)
            })
            .filter_map(move |item| {
                let mapped = match item {
                    Ok(message) => parse_event(&message).map(Ok),
                    Err(e) => Some(Err(map_error(Op::Events, "", &socket, &e))),
                };
                futures::future::ready(mapped)
            })
    }

    async fn find_image(&self, app: &str) -> Result<Option<String>, RuntimeError> {
        validate_app_pattern(app)?;
        let options = ListImagesOptionsBuilder::new().all(false).build();
        let images = self
            .call(
                Op::FindImage,
                app,
                API_CALL_TIMEOUT,
                self.docker.list_images(Some(options)),
            )
            .await?;
        let best = images
            .iter()
            .flat_map(|image| image.repo_tags.iter().map(move |tag| (image.created, tag)))
            .filter(|(_, tag)| image_matches_app(app, tag))
            // Newest first; among tags of one image, the shortest (then lexically first) name.
            .min_by(|(created_a, a), (created_b, b)| {
                created_b
                    .cmp(created_a)
                    .then(a.len().cmp(&b.len()))
                    .then(a.cmp(b))
            })
            .map(|(_, tag)| tag.clone());
        Ok(best)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bollard::models::{EventActor, EventMessageTypeEnum};

    fn message(action: &str, attributes: &[(&str, &str)]) -> EventMessage {
        EventMessage {
            typ: Some(EventMessageTypeEnum::CONTAINER),
            action: Some(action.to_owned()),
            actor: Some(EventActor {
                id: Some("abc123".to_owned()),
                attributes: Some(
                    attributes
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect(),
                ),
            }),
            ..EventMessage::default()
        }
    }

    #[test]
    fn die_exit_code_string_becomes_a_number_and_labels_are_separated() {
        let event = parse_event(&message(
            "die",
            &[
                ("exitCode", "3"),
                ("name", "mb-1"),
                ("image", "whist/mandelbox-stub:latest"),
                (LABEL_MANAGED, "true"),
                (LABEL_MANDELBOX_ID, "m-1"),
            ],
        ))
        .unwrap();
        assert_eq!(event.id.as_str(), "abc123");
        assert_eq!(event.kind, ContainerEventKind::Die { exit_code: Some(3) });
        assert_eq!(event.name.as_deref(), Some("mb-1"));
        assert_eq!(
            event.labels,
            BTreeMap::from([
                (LABEL_MANAGED.to_owned(), "true".to_owned()),
                (LABEL_MANDELBOX_ID.to_owned(), "m-1".to_owned()),
            ])
        );
    }

    #[test]
    fn die_without_a_readable_exit_code_has_none() {
        for attributes in [&[][..], &[("exitCode", "x")][..], &[("exitCode", "")][..]] {
            let event = parse_event(&message("die", attributes)).unwrap();
            assert_eq!(event.kind, ContainerEventKind::Die { exit_code: None });
        }
        let event = parse_event(&message("die", &[("exitCode", "137")])).unwrap();
        assert_eq!(
            event.kind,
            ContainerEventKind::Die {
                exit_code: Some(137)
            }
        );
    }

    #[test]
    fn start_oom_destroy_are_parsed() {
        for (action, kind) in [
            ("start", ContainerEventKind::Start),
            ("oom", ContainerEventKind::Oom),
            ("destroy", ContainerEventKind::Destroy),
        ] {
            assert_eq!(parse_event(&message(action, &[])).unwrap().kind, kind);
        }
    }

    #[test]
    fn unknown_actions_and_other_types_are_ignored() {
        for action in [
            "create",
            "kill",
            "stop",
            "attach",
            "exec_start: sh",
            "health_status: healthy",
            "",
        ] {
            assert_eq!(parse_event(&message(action, &[])), None, "{action}");
        }
        let mut network = message("start", &[]);
        network.typ = Some(EventMessageTypeEnum::NETWORK);
        assert_eq!(parse_event(&network), None);
        let mut no_actor = message("start", &[]);
        no_actor.actor = None;
        assert_eq!(parse_event(&no_actor), None);
        let mut bad_id = message("start", &[]);
        if let Some(actor) = bad_id.actor.as_mut() {
            actor.id = Some("../images".to_owned());
        }
        assert_eq!(parse_event(&bad_id), None);
    }

    #[test]
    fn image_matching_is_anchored_at_a_path_segment() {
        let app = "browsers/chrome";
        assert!(image_matches_app(
            app,
            "whist/browsers/chrome:current-build"
        ));
        assert!(image_matches_app(app, "browsers/chrome:current-build"));
        assert!(image_matches_app(
            app,
            "localhost:5000/whist/browsers/chrome:current-build"
        ));
        assert!(!image_matches_app(app, "x/browsers/chromey:current-build"));
        assert!(!image_matches_app(app, "x/mybrowsers/chrome:current-build"));
        assert!(!image_matches_app(app, "whist/browsers/chrome:latest"));
        assert!(!image_matches_app(
            app,
            "whist/browsers/chrome:current-build-2"
        ));
        assert!(!image_matches_app(app, "whist/browsers/chrome"));
        assert!(!image_matches_app(app, "<none>:<none>"));
    }

    #[test]
    fn app_patterns_that_were_regexes_are_refused_not_a_panic() {
        for bad in [
            "",
            "browsers/(chrome",
            "a//b",
            "/chrome",
            "chrome/",
            "Chrome",
            "c:1",
            "*",
        ] {
            assert!(validate_app_pattern(bad).is_err(), "{bad:?}");
        }
        for good in ["chrome", "browsers/chrome", "a.b_c-d/e"] {
            assert!(validate_app_pattern(good).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn container_ids_cannot_carry_a_path() {
        for bad in ["", "../x", "a/b", "-x", "a b", "a?b=c"] {
            assert!(ContainerId::new(bad).is_err(), "{bad:?}");
        }
        assert!(ContainerId::new("mandelbox-1_a.b").is_ok());
        assert!(ContainerId::new("f".repeat(64)).is_ok());
    }

    #[test]
    fn spec_validation_refuses_what_the_engine_would_refuse_or_misapply() {
        let ok = ContainerSpec::new("mb", "img:tag");
        assert!(ok.validate().is_ok());
        type Mutation = Box<dyn Fn(&mut ContainerSpec)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("name", Box::new(|s| s.name = "/mb".into())),
            ("image", Box::new(|s| s.image = " ".into())),
            (
                "env",
                Box::new(|s| {
                    s.env.insert("A=B".into(), "x".into());
                }),
            ),
            ("cap ALL", Box::new(|s| s.cap_add = vec!["ALL".into()])),
            (
                "cap CAP_ALL",
                Box::new(|s| s.cap_add = vec!["CAP_ALL".into()]),
            ),
            (
                "cap lower",
                Box::new(|s| s.cap_add = vec!["sys_nice".into()]),
            ),
            (
                "bind",
                Box::new(|s| {
                    s.binds.push(BindMount {
                        host_path: "rel".into(),
                        container_path: "/x".into(),
                        read_only: false,
                        propagation: None,
                    })
                }),
            ),
            (
                "device perms",
                Box::new(|s| {
                    s.devices.push(Device {
                        host_path: "/dev/x".into(),
                        container_path: "/dev/x".into(),
                        permissions: "rwx".into(),
                    })
                }),
            ),
            ("memory", Box::new(|s| s.memory_bytes = Some(0))),
            ("pids", Box::new(|s| s.pids_limit = Some(u64::MAX))),
            (
                "apparmor",
                Box::new(|s| s.apparmor_profile = Some("a,b".into())),
            ),
        ];
        for (what, mutate) in cases {
            let mut spec = ok.clone();
            mutate(&mut spec);
            assert!(
                matches!(
                    spec.validate(),
                    Err(RuntimeError::Invalid { op: Op::Create, .. })
                ),
                "{what}"
            );
        }
    }

    #[test]
    fn create_body_always_drops_all_caps_and_labels_the_container_managed() {
        let mut spec = ContainerSpec::new("mb", "img:tag");
        spec.cap_add = vec!["SYS_NICE".into()];
        spec.env
            .insert("WHIST_AES_KEY".into(), "secret-value".into());
        spec.ports.insert(
            ContainerPort {
                port: 32263,
                protocol: Protocol::Udp,
            },
            40000,
        );
        let body = spec.to_create_body();
        let host = body.host_config.unwrap();
        assert_eq!(host.cap_drop, Some(vec!["ALL".to_owned()]));
        assert_eq!(host.cap_add, Some(vec!["SYS_NICE".to_owned()]));
        assert_eq!(host.privileged, Some(false));
        assert_eq!(
            host.cgroupns_mode,
            Some(HostConfigCgroupnsModeEnum::PRIVATE)
        );
        assert_eq!(host.readonly_rootfs, Some(true));
        assert_eq!(
            host.security_opt,
            Some(vec!["no-new-privileges:true".to_owned()])
        );
        assert_eq!(
            body.labels.unwrap().get(LABEL_MANAGED).map(String::as_str),
            Some(LABEL_MANAGED_VALUE)
        );
        assert_eq!(body.exposed_ports, Some(vec!["32263/udp".to_owned()]));
        let binding = &host.port_bindings.unwrap()["32263/udp"];
        assert_eq!(
            binding.as_deref(),
            Some(
                &[PortBinding {
                    host_ip: Some("0.0.0.0".into()),
                    host_port: Some("40000".into())
                }][..]
            )
        );
        // The AES key never reaches a log line through Debug.
        let debug = format!("{spec:?}");
        assert!(debug.contains("WHIST_AES_KEY") && !debug.contains("secret-value"));
    }

    #[test]
    fn stop_grace_rounds_up_and_is_clamped() {
        assert_eq!(stop_grace_seconds(Duration::ZERO), 0);
        assert_eq!(stop_grace_seconds(Duration::from_millis(1)), 1);
        assert_eq!(stop_grace_seconds(Duration::from_secs(10)), 10);
        assert_eq!(stop_grace_seconds(Duration::from_secs(10_000)), 600);
    }

    #[test]
    fn transient_errors_are_the_ones_worth_retrying() {
        let timeout = RuntimeError::Timeout {
            op: Op::Start,
            target: "x".into(),
            timeout: API_CALL_TIMEOUT,
        };
        let conflict = RuntimeError::Conflict {
            op: Op::Create,
            target: "x".into(),
            message: "name in use".into(),
        };
        let server = RuntimeError::Engine {
            op: Op::Start,
            target: "x".into(),
            status: 500,
            message: "oops".into(),
        };
        assert!(timeout.is_transient() && server.is_transient() && !conflict.is_transient());
        assert_eq!(conflict.op(), Op::Create);
    }
}
