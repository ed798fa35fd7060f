//! A mandelbox's container spec, built without side effects from what the caller gives it.

use std::collections::BTreeMap;
use std::path::PathBuf;

use dbclient::types::{Mandelbox, MandelboxId};
use rand::RngCore as _;

use crate::config::Config;
use crate::docker::{
    BindMount, ContainerSpec, LABEL_MANDELBOX_ID, LABEL_SESSION_ID, LABEL_USER_ID, TmpfsMount,
};
use crate::mappings::MandelboxDirs;
use crate::ports::PortMap;
use crate::resources::Allocation;

use super::{LABEL_GPU, LABEL_INSTANCE_ID, LABEL_TTY};

/// udev's database, bound read-only so the mandelbox's X server sees its input devices.
const UDEV_DATA: &str = "/run/udev/data";

/// `/dev/shm` of a mandelbox: Chrome's renderers share frames through it.
const SHM_SIZE_BYTES: u64 = 2 * 1024 * 1024 * 1024;
/// `/run` and `/run/lock` tmpfs size, as in the original.
const RUN_TMPFS_OPTIONS: &str = "size=52428800";
/// Memory limit of a mandelbox (about 6.1 GiB, the original's figure for a g4dn share).
const MEMORY_BYTES: u64 = 6_552_550_944;
/// Most processes a mandelbox may run: far above a browser's needs, far below a fork bomb's.
const PIDS_LIMIT: u64 = 4096;
/// Capabilities a real mandelbox needs (systemd, X, audio, `mknod` of its TTY); everything else,
/// NET_RAW included, stays dropped. The original added Docker's whole default set.
const CAP_ADD: [&str; 14] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "MKNOD",
    "AUDIT_WRITE",
    "SYS_NICE",
    "IPC_LOCK",
];

/// What the host probes on its machine for every spec: passed in so that the spec is a pure
/// function (and testable without the machine).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Machine {
    /// `/run/udev/data` exists.
    pub udev_data: bool,
    /// CPUs of the host.
    pub cpus: u64,
    /// GPUs the host discovered.
    pub gpus: usize,
}

impl Machine {
    pub fn probe(gpus: usize) -> Self {
        Self {
            udev_data: std::path::Path::new(UDEV_DATA).exists(),
            cpus: std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
                as u64,
            gpus,
        }
    }
}

pub(super) fn host_port(ports: &PortMap, container_port: u16) -> u16 {
    ports
        .iter()
        .find(|(c, _)| c.port == container_port)
        .map_or(0, |(_, h)| *h)
}

/// The protocol expects a decimal session id; anything else becomes the current time in
/// milliseconds, as in the original.
pub fn sanitize_session_id(session_id: Option<&str>) -> String {
    match session_id {
        Some(s) if !s.is_empty() && s.len() <= 19 && s.bytes().all(|b| b.is_ascii_digit()) => {
            s.to_owned()
        }
        _ => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis())
            .to_string(),
    }
}

/// 16 random bytes, hex: the key the protocol encrypts the stream with.
pub(super) fn new_private_key() -> String {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `browsers/chrome` + id → `browsers-chrome-<id>`: Docker names allow `[a-zA-Z0-9_.-]`.
pub fn container_name(app: &str, id: MandelboxId) -> String {
    let app: String = app
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    let app = app.trim_matches(|c: char| !c.is_ascii_alphanumeric());
    if app.is_empty() {
        format!("mandelbox-{id}")
    } else {
        format!("{app}-{id}")
    }
}

/// A mandelbox's container: a pure function of the host's configuration, what was probed on
/// this machine, the row, its resources and its files.
#[allow(clippy::too_many_arguments)]
pub fn build_spec(
    config: &Config,
    machine: &Machine,
    row: &Mandelbox,
    allocation: &Allocation,
    dirs: &MandelboxDirs,
    session_id: &str,
    image: &str,
    private_key: &str,
) -> ContainerSpec {
    let mut spec = ContainerSpec::new(container_name(&row.app, row.id), image);
    spec.env = BTreeMap::from([
        ("WHIST_AES_KEY".to_owned(), private_key.to_owned()),
        ("SENTRY_ENV".to_owned(), config.app_env.as_str().to_owned()),
        (
            "WHIST_INITIAL_USER_DATA_FILE".to_owned(),
            "/whist/userConfigs/user-initial-file".to_owned(),
        ),
        ("NVIDIA_DRIVER_CAPABILITIES".to_owned(), "all".to_owned()),
        (
            // Only its own GPU: the original exposed every GPU to every mandelbox.
            "NVIDIA_VISIBLE_DEVICES".to_owned(),
            allocation
                .gpu
                .map_or_else(|| "void".to_owned(), |g| g.to_string()),
        ),
    ]);
    spec.labels = BTreeMap::from([
        (LABEL_MANDELBOX_ID.to_owned(), row.id.to_string()),
        (LABEL_SESSION_ID.to_owned(), session_id.to_owned()),
        (LABEL_TTY.to_owned(), allocation.tty.to_string()),
        (LABEL_INSTANCE_ID.to_owned(), row.instance_id.to_string()),
    ]);
    if let Some(user) = &row.user_id {
        spec.labels
            .insert(LABEL_USER_ID.to_owned(), user.to_string());
    }
    if let Some(gpu) = allocation.gpu {
        spec.labels.insert(LABEL_GPU.to_owned(), gpu.to_string());
    }
    let bind = |host_path: PathBuf, container: &str, read_only: bool| BindMount {
        host_path,
        container_path: PathBuf::from(container),
        read_only,
        propagation: None,
    };
    spec.binds = vec![
        bind(dirs.mappings(), "/whist/resourceMappings", false),
        bind(dirs.sockets(), "/tmp/sockets", false),
        bind(dirs.logs(session_id), "/var/log/whist", false),
        bind(dirs.user_configs(), "/whist/userConfigs", false),
    ];
    // The host's /sys/fs/cgroup is not bound in (the original did): the container has its own
    // cgroup namespace and sees its own cgroup as the root (`cgroupns_private`, on by default).
    if machine.udev_data {
        spec.binds
            .push(bind(PathBuf::from(UDEV_DATA), UDEV_DATA, true));
    }
    spec.read_only_rootfs = config.read_only_rootfs;
    spec.ports = allocation.ports.clone();
    // No /dev/fuse (the original mapped it for the user's cloud storage): a FUSE mount needs a
    // user namespace or CAP_SYS_ADMIN, and the seccomp and AppArmor profiles deny every mount.
    spec.cap_add = CAP_ADD.iter().map(|c| (*c).to_owned()).collect();
    // The AppArmor profile is the caller's: checked against the kernel at each spin-up.
    spec.shm_size_bytes = Some(SHM_SIZE_BYTES);
    spec.tmpfs = ["/run", "/run/lock"]
        .iter()
        .map(|p| TmpfsMount {
            container_path: PathBuf::from(p),
            options: RUN_TMPFS_OPTIONS.to_owned(),
        })
        .collect();
    spec.memory_bytes = Some(MEMORY_BYTES);
    // Docker refuses a quota above the host's CPU count (small development machines).
    spec.nano_cpus = Some(
        config
            .mandelbox_nano_cpus
            .min(machine.cpus.saturating_mul(1_000_000_000)),
    );
    spec.pids_limit = Some(PIDS_LIMIT);
    spec.init = config.container_init;
    spec.runtime = (machine.gpus > 0 && config.gpu_override.is_none()).then(|| "nvidia".to_owned());
    spec
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_are_digits_or_replaced() {
        assert_eq!(sanitize_session_id(Some("1234")), "1234");
        let replaced = sanitize_session_id(Some("abc"));
        assert!(replaced.bytes().all(|b| b.is_ascii_digit()) && replaced.len() >= 13);
        assert_ne!(sanitize_session_id(None), "");
    }

    #[test]
    fn container_names_are_docker_safe() {
        let id = MandelboxId::random();
        assert_eq!(
            container_name("browsers/chrome", id),
            format!("browsers-chrome-{id}")
        );
        assert_eq!(container_name("../x y", id), format!("x-y-{id}"));
        assert_eq!(container_name("//", id), format!("mandelbox-{id}"));
    }

    fn config(extra: &[&str]) -> Config {
        let mut argv = vec!["whist-host-service", "--app-env", "localdev"];
        argv.extend_from_slice(extra);
        <crate::config::Args as clap::Parser>::try_parse_from(argv)
            .unwrap()
            .validate()
            .unwrap()
    }

    fn row(user: Option<&str>) -> Mandelbox {
        Mandelbox {
            id: MandelboxId::random(),
            app: "browsers/chrome".to_owned(),
            instance_id: dbclient::types::InstanceId::new("i-0123").unwrap(),
            user_id: user.map(|u| dbclient::types::UserId::new(u).unwrap()),
            session_id: Some("1700000000000".to_owned()),
            status: dbclient::types::MandelboxStatus::Allocated,
            created_at: chrono::Utc::now(),
            updated_at: chrono::Utc::now(),
        }
    }

    fn spec_of(
        config: &Config,
        machine: Machine,
        row: &Mandelbox,
        gpu: Option<usize>,
    ) -> ContainerSpec {
        let allocation = Allocation {
            ports: PortMap::new(),
            tty: 7,
            gpu,
        };
        let dirs = MandelboxDirs::new(std::path::Path::new("/whist"), row.id);
        build_spec(
            config,
            &machine,
            row,
            &allocation,
            &dirs,
            "1700000000000",
            "img:1",
            "k",
        )
    }

    #[test]
    fn the_spec_follows_only_what_it_is_given() {
        let small = Machine {
            udev_data: false,
            cpus: 2,
            gpus: 0,
        };
        let config = config(&["--mandelbox-cpus", "4"]);
        let warm = spec_of(&config, small, &row(None), None);
        // A quota above the machine's CPUs is clamped to them; no GPU means no GPU at all.
        assert_eq!(warm.nano_cpus, Some(2_000_000_000));
        assert_eq!(warm.runtime, None);
        assert_eq!(warm.env["NVIDIA_VISIBLE_DEVICES"], "void");
        assert!(!warm.labels.contains_key(LABEL_USER_ID));
        assert!(
            !warm
                .binds
                .iter()
                .any(|b| b.container_path == std::path::Path::new(UDEV_DATA))
        );
        // Every bind a mandelbox writes is its own directory, and nothing of the host's cgroups.
        let writable: Vec<_> = warm.binds.iter().filter(|b| !b.read_only).collect();
        assert_eq!(writable.len(), 4);
        assert!(writable.iter().all(|b| {
            b.host_path
                .to_string_lossy()
                .contains(&warm.labels[LABEL_MANDELBOX_ID])
        }));
        assert!(!warm.binds.iter().any(|b| b.host_path.starts_with("/sys")));

        let big = Machine {
            udev_data: true,
            cpus: 64,
            gpus: 4,
        };
        let claimed = spec_of(&config, big, &row(Some("alice")), Some(3));
        assert_eq!(claimed.nano_cpus, Some(4_000_000_000));
        assert_eq!(claimed.runtime.as_deref(), Some("nvidia"));
        assert_eq!(claimed.env["NVIDIA_VISIBLE_DEVICES"], "3");
        assert_eq!(claimed.labels[LABEL_GPU], "3");
        assert_eq!(claimed.labels[LABEL_USER_ID], "alice");
        assert_eq!(claimed.labels[LABEL_TTY], "7");
        let udev = claimed
            .binds
            .iter()
            .find(|b| b.container_path == std::path::Path::new(UDEV_DATA))
            .expect("udev's data is bound where it exists");
        assert!(udev.read_only);
        // A GPU override (development) never asks for the nvidia runtime.
        let overridden = spec_of(
            &super::tests::config(&["--gpu-override", "2"]),
            big,
            &row(None),
            Some(1),
        );
        assert_eq!(overridden.runtime, None);
    }

    #[test]
    fn private_keys_are_32_hex_and_differ() {
        let (a, b) = (new_private_key(), new_private_key());
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
