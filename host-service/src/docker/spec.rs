//! The container a mandelbox runs in, as plain data: [`ContainerSpec`], its validation and the
//! create request it becomes.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use bollard::models::{
    ContainerCreateBody, DeviceMapping, HostConfig, HostConfigCgroupnsModeEnum, Mount,
    MountBindOptions, MountBindOptionsPropagationEnum, MountType, PortBinding,
};

use super::ids::validate_object_name;
use super::{LABEL_MANAGED, LABEL_MANAGED_VALUE, MAX_NAME_LEN, Op, RuntimeError};
use crate::ports::{ContainerPort, PortMap};

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
    pub(super) fn to_create_body(&self) -> ContainerCreateBody {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ports::Protocol;
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
}
