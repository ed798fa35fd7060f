//! The host's vitals, read on every scrape of `/metrics`: memory and CPU (`/proc`), the size and
//! free space of the filesystems that hold the root directory (`/whist`) and Docker's data root,
//! and each GPU's utilisation and memory through NVML. Also the Docker Engine's probe
//! ([`follow_docker_engine`]), which keeps `docker_engine_up` and the data root current.
//!
//! What cannot be read is absent, never zero: on a host without NVML (no driver, or no GPU)
//! there is no GPU series at all, so a dashboard shows "no data" rather than an idle GPU; a
//! volume whose path cannot be read (Docker never answered) has no filesystem series.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{CounterVec, GaugeVec, IntGauge, IntGaugeVec, Opts};
use tokio_util::sync::CancellationToken;

use crate::docker::ContainerRuntime;

/// Linux reports CPU time in `/proc/stat` in USER_HZ ticks, fixed at 100 per second by the
/// kernel's ABI on every architecture a host runs on (x86_64, aarch64), whatever CONFIG_HZ is.
const USER_HZ: f64 = 100.0;
/// The columns of `/proc/stat`'s `cpu` line, in order (proc(5)); `guest` time is already
/// counted in `user`, so it is left out.
const CPU_MODES: [&str; 8] = [
    "user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal",
];
/// The Docker Engine is asked for its data root this often; each answer (or its absence within
/// the engine's API deadline) sets `docker_engine_up`. Ten seconds: a scrape every 15 s sees a
/// failed engine within one scrape, and one `docker info` per 10 s costs the engine nothing.
pub const DOCKER_PROBE_INTERVAL: Duration = Duration::from_secs(10);

/// The volume label of the host's root directory.
pub const VOLUME_ROOT: &str = "whist";
/// The volume label of Docker's data root.
pub const VOLUME_DOCKER: &str = "docker";

/// The host's vitals as Prometheus metrics (see the module doc). Register it once; every
/// collection reads the current figures.
pub struct Vitals {
    descs: Vec<Desc>,
    memory_total_bytes: IntGauge,
    memory_available_bytes: IntGauge,
    cpu_seconds: CounterVec,
    cpus: IntGauge,
    filesystem_size_bytes: IntGaugeVec,
    filesystem_available_bytes: IntGaugeVec,
    gpu_utilization_ratio: GaugeVec,
    gpu_memory_used_bytes: IntGaugeVec,
    gpu_memory_total_bytes: IntGaugeVec,
    /// (volume label, path) of each filesystem reported.
    volumes: Mutex<Vec<(&'static str, PathBuf)>>,
    /// Loaded at the first collection (it is blocking, and most tests never scrape); `None`
    /// where NVML cannot be loaded.
    nvml: OnceLock<Option<nvml_wrapper::Nvml>>,
    /// One collection at a time: each resets the labelled gauges before it sets them, so a
    /// concurrent scrape would see them empty.
    collecting: Mutex<()>,
}

impl std::fmt::Debug for Vitals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vitals")
            .field("volumes", &self.volumes)
            .finish_non_exhaustive()
    }
}

impl Vitals {
    pub fn new() -> Result<Self, prometheus::Error> {
        let memory_total_bytes = IntGauge::new("memory_total_bytes", "Host memory in all")?;
        let memory_available_bytes = IntGauge::new(
            "memory_available_bytes",
            "Host memory available for new work (MemAvailable)",
        )?;
        let cpu_seconds = CounterVec::new(
            Opts::new(
                "cpu_seconds_total",
                "CPU time of the host's CPUs together, by mode",
            ),
            &["mode"],
        )?;
        let cpus = IntGauge::new("cpus", "Online CPUs")?;
        let filesystem_size_bytes = IntGaugeVec::new(
            Opts::new(
                "filesystem_size_bytes",
                "Size of the filesystem holding a volume (whist: the root directory, docker: Docker's data root)",
            ),
            &["volume", "path"],
        )?;
        let filesystem_available_bytes = IntGaugeVec::new(
            Opts::new(
                "filesystem_available_bytes",
                "Space available to unprivileged users on the filesystem holding a volume",
            ),
            &["volume", "path"],
        )?;
        let gpu_utilization_ratio = GaugeVec::new(
            Opts::new(
                "gpu_utilization_ratio",
                "Share of the last sample period a kernel ran on the GPU (NVML), 0 to 1",
            ),
            &["gpu"],
        )?;
        let gpu_memory_used_bytes = IntGaugeVec::new(
            Opts::new("gpu_memory_used_bytes", "GPU memory allocated (NVML)"),
            &["gpu"],
        )?;
        let gpu_memory_total_bytes = IntGaugeVec::new(
            Opts::new("gpu_memory_total_bytes", "GPU memory installed (NVML)"),
            &["gpu"],
        )?;
        let mut descs = Vec::new();
        let collectors: [&dyn Collector; 9] = [
            &memory_total_bytes,
            &memory_available_bytes,
            &cpu_seconds,
            &cpus,
            &filesystem_size_bytes,
            &filesystem_available_bytes,
            &gpu_utilization_ratio,
            &gpu_memory_used_bytes,
            &gpu_memory_total_bytes,
        ];
        for c in collectors {
            descs.extend(c.desc().into_iter().cloned());
        }
        Ok(Self {
            descs,
            memory_total_bytes,
            memory_available_bytes,
            cpu_seconds,
            cpus,
            filesystem_size_bytes,
            filesystem_available_bytes,
            gpu_utilization_ratio,
            gpu_memory_used_bytes,
            gpu_memory_total_bytes,
            volumes: Mutex::new(Vec::new()),
            nvml: OnceLock::new(),
            collecting: Mutex::new(()),
        })
    }

    /// Reports the filesystem holding `path` under `volume` from now on (replacing the
    /// volume's earlier path).
    pub fn watch_volume(&self, volume: &'static str, path: &Path) {
        let mut volumes = match self.volumes.lock() {
            Ok(v) => v,
            Err(poisoned) => poisoned.into_inner(),
        };
        if volumes.iter().any(|(v, p)| *v == volume && p == path) {
            return;
        }
        volumes.retain(|(v, _)| *v != volume);
        volumes.push((volume, path.to_owned()));
    }

    fn read_memory(&self) {
        let Ok(meminfo) = std::fs::read_to_string("/proc/meminfo") else {
            return;
        };
        if let Some((total, available)) = parse_meminfo(&meminfo) {
            self.memory_total_bytes.set(saturating_i64(total));
            self.memory_available_bytes.set(saturating_i64(available));
        }
    }

    fn read_cpu(&self) {
        let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
            return;
        };
        let Some(ticks) = parse_cpu_ticks(&stat) else {
            return;
        };
        for (mode, ticks) in CPU_MODES.iter().zip(ticks) {
            let counter = self.cpu_seconds.with_label_values(&[mode]);
            // A counter only goes up: the kernel's figures are monotonic, so the difference is
            // what passed since the last scrape.
            let delta = ticks as f64 / USER_HZ - counter.get();
            if delta > 0.0 {
                counter.inc_by(delta);
            }
        }
        if let Ok(n) = std::thread::available_parallelism() {
            self.cpus.set(saturating_i64(n.get() as u64));
        }
    }

    fn read_filesystems(&self) {
        let volumes = match self.volumes.lock() {
            Ok(v) => v.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        self.filesystem_size_bytes.reset();
        self.filesystem_available_bytes.reset();
        for (volume, path) in volumes {
            match nix::sys::statvfs::statvfs(&path) {
                Ok(fs) => {
                    let unit = fs.fragment_size();
                    let labels = [volume, &*path.to_string_lossy()];
                    self.filesystem_size_bytes
                        .with_label_values(&labels)
                        .set(saturating_i64(fs.blocks().saturating_mul(unit)));
                    self.filesystem_available_bytes
                        .with_label_values(&labels)
                        .set(saturating_i64(fs.blocks_available().saturating_mul(unit)));
                }
                Err(error) => {
                    tracing::debug!(volume, path = %path.display(), %error, "cannot read the filesystem's size");
                }
            }
        }
    }

    fn read_gpus(&self) {
        let nvml = self.nvml.get_or_init(|| nvml_wrapper::Nvml::init().ok());
        let Some(nvml) = nvml else {
            return;
        };
        let Ok(count) = nvml.device_count() else {
            return;
        };
        self.gpu_utilization_ratio.reset();
        self.gpu_memory_used_bytes.reset();
        self.gpu_memory_total_bytes.reset();
        for index in 0..count {
            let Ok(device) = nvml.device_by_index(index) else {
                continue;
            };
            let gpu = index.to_string();
            if let Ok(rates) = device.utilization_rates() {
                self.gpu_utilization_ratio
                    .with_label_values(&[&gpu])
                    .set(f64::from(rates.gpu) / 100.0);
            }
            if let Ok(memory) = device.memory_info() {
                self.gpu_memory_used_bytes
                    .with_label_values(&[&gpu])
                    .set(saturating_i64(memory.used));
                self.gpu_memory_total_bytes
                    .with_label_values(&[&gpu])
                    .set(saturating_i64(memory.total));
            }
        }
    }
}

impl Collector for Vitals {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    /// Blocking (files under `/proc`, `statvfs`, NVML): the scrape handler collects on a
    /// blocking thread.
    fn collect(&self) -> Vec<MetricFamily> {
        let _one_at_a_time = match self.collecting.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        self.read_memory();
        self.read_cpu();
        self.read_filesystems();
        self.read_gpus();
        let mut families = Vec::new();
        let collectors: [&dyn Collector; 9] = [
            &self.memory_total_bytes,
            &self.memory_available_bytes,
            &self.cpu_seconds,
            &self.cpus,
            &self.filesystem_size_bytes,
            &self.filesystem_available_bytes,
            &self.gpu_utilization_ratio,
            &self.gpu_memory_used_bytes,
            &self.gpu_memory_total_bytes,
        ];
        for c in collectors {
            families.extend(c.collect());
        }
        families
    }
}

/// [`Vitals`] shared between the registry and the code that adds volumes.
#[derive(Debug, Clone)]
pub(crate) struct SharedVitals(pub Arc<Vitals>);

impl Collector for SharedVitals {
    fn desc(&self) -> Vec<&Desc> {
        self.0.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.0.collect()
    }
}

fn saturating_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// `MemTotal` and `MemAvailable` of `/proc/meminfo`, in bytes.
fn parse_meminfo(text: &str) -> Option<(u64, u64)> {
    let field = |name: &str| {
        text.lines().find_map(|line| {
            let rest = line.strip_prefix(name)?.strip_prefix(':')?;
            let kib: u64 = rest.trim().strip_suffix("kB")?.trim().parse().ok()?;
            Some(kib.saturating_mul(1024))
        })
    };
    Some((field("MemTotal")?, field("MemAvailable")?))
}

/// The ticks of [`CPU_MODES`] in `/proc/stat`'s aggregate `cpu` line (missing columns of an
/// old kernel are 0).
fn parse_cpu_ticks(text: &str) -> Option<[u64; 8]> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let mut ticks = [0u64; 8];
    for (slot, value) in ticks.iter_mut().zip(line.split_whitespace().skip(1)) {
        *slot = value.parse().ok()?;
    }
    Some(ticks)
}

/// Asks the engine for its data root every [`DOCKER_PROBE_INTERVAL`] until `shutdown`: an
/// answer sets `engine_up` (`docker_engine_up`) to 1 and reports the data root's filesystem in
/// `vitals`, an error or no answer within the engine's API deadline sets it to 0.
pub async fn follow_docker_engine<R: ContainerRuntime>(
    runtime: R,
    engine_up: IntGauge,
    vitals: Arc<Vitals>,
    shutdown: CancellationToken,
) {
    loop {
        probe_docker_engine(&runtime, &engine_up, &vitals).await;
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(DOCKER_PROBE_INTERVAL) => {}
        }
    }
}

/// One probe of [`follow_docker_engine`]; returns whether the engine answered.
pub async fn probe_docker_engine<R: ContainerRuntime>(
    runtime: &R,
    engine_up: &IntGauge,
    vitals: &Vitals,
) -> bool {
    let was_up = engine_up.get() == 1;
    match runtime.data_root().await {
        Ok(root) => {
            if let Some(root) = root {
                vitals.watch_volume(VOLUME_DOCKER, &root);
            }
            if !was_up {
                tracing::info!("the Docker Engine answers");
            }
            engine_up.set(1);
            true
        }
        Err(error) => {
            if was_up {
                tracing::warn!(%error, "the Docker Engine does not answer");
            }
            engine_up.set(0);
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_and_cpu_lines_are_read_in_bytes_and_ticks() {
        let meminfo = "MemTotal:       16318480 kB\nMemFree:  1 kB\nMemAvailable:    8000000 kB\n";
        assert_eq!(
            parse_meminfo(meminfo),
            Some((16_318_480 * 1024, 8_000_000 * 1024))
        );
        assert_eq!(parse_meminfo("MemTotal: 1 kB\n"), None);
        let stat = "cpu  10 1 20 300 4 0 5 6 0 0\ncpu0 1 1 1 1 1 1 1 1 0 0\n";
        assert_eq!(parse_cpu_ticks(stat), Some([10, 1, 20, 300, 4, 0, 5, 6]));
        assert_eq!(
            parse_cpu_ticks("cpu  1 2 3 4\n"),
            Some([1, 2, 3, 4, 0, 0, 0, 0])
        );
        assert_eq!(parse_cpu_ticks("cpu  x\n"), None);
    }

    #[tokio::test]
    async fn the_engine_probe_says_down_on_an_error_and_up_with_its_data_root() {
        use crate::docker::{FakeRuntime, Op, RuntimeError};
        let engine_up = IntGauge::new("docker_engine_up", "test").unwrap();
        let vitals = Vitals::new().unwrap();
        let docker_paths = |vitals: &Vitals| -> Vec<String> {
            vitals
                .collect()
                .iter()
                .filter(|f| f.name() == "filesystem_size_bytes")
                .flat_map(|f| f.get_metric().to_vec())
                .filter(|m| {
                    m.get_label()
                        .iter()
                        .any(|l| l.name() == "volume" && l.value() == VOLUME_DOCKER)
                })
                .flat_map(|m| {
                    m.get_label()
                        .iter()
                        .filter(|l| l.name() == "path")
                        .map(|l| l.value().to_owned())
                        .collect::<Vec<_>>()
                })
                .collect()
        };
        let fake = FakeRuntime::new();
        let dir = tempfile::tempdir().unwrap();
        fake.set_data_root(dir.path());
        fake.fail_next(
            Op::Info,
            RuntimeError::Transport {
                op: Op::Info,
                target: String::new(),
                socket: "fake".to_owned(),
                message: "connection refused".to_owned(),
            },
        );
        assert!(!probe_docker_engine(&fake, &engine_up, &vitals).await);
        assert_eq!(engine_up.get(), 0);
        assert!(docker_paths(&vitals).is_empty());
        assert!(probe_docker_engine(&fake, &engine_up, &vitals).await);
        assert_eq!(engine_up.get(), 1);
        assert_eq!(docker_paths(&vitals), [dir.path().display().to_string()]);
    }

    #[test]
    fn a_volume_is_reported_once_at_its_latest_path() {
        let vitals = Vitals::new().unwrap();
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        vitals.watch_volume(VOLUME_DOCKER, a.path());
        vitals.watch_volume(VOLUME_DOCKER, b.path());
        vitals.watch_volume(VOLUME_ROOT, a.path());
        let families = vitals.collect();
        let sizes = families
            .iter()
            .find(|f| f.name() == "filesystem_size_bytes")
            .unwrap();
        let paths: Vec<(String, String)> = sizes
            .get_metric()
            .iter()
            .map(|m| {
                let label = |n: &str| {
                    m.get_label()
                        .iter()
                        .find(|l| l.name() == n)
                        .unwrap()
                        .value()
                        .to_owned()
                };
                (label("volume"), label("path"))
            })
            .collect();
        assert_eq!(paths.len(), 2, "{paths:?}");
        assert!(paths.contains(&(VOLUME_DOCKER.to_owned(), b.path().display().to_string())));
        assert!(paths.contains(&(VOLUME_ROOT.to_owned(), a.path().display().to_string())));
    }
}
