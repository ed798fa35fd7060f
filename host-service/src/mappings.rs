//! The files through which the host and a mandelbox talk (reference §3.8, §3.9).
//!
//! Layout under the host's root (`/whist` in production):
//!
//! ```text
//! <root>/<mandelbox id>/mandelboxResourceMappings/   ↔ /whist/resourceMappings in the container
//! <root>/<mandelbox id>/userConfigs/unpacked_configs/ ↔ /whist/userConfigs
//! <root>/temp/<mandelbox id>/sockets/                 ↔ /tmp/sockets
//! <root>/temp/logs/<mandelbox id>/<session id>/       ↔ /var/log/whist
//! ```
//!
//! Every file the container reads is written to a temporary file in the same directory and
//! renamed into place, so a crash of the host service never leaves half a file for the mandelbox
//! to read. The files are not fsynced: they matter only while the container runs, and a power
//! loss ends the container too (an fsync per file cost milliseconds on every spin-up). The
//! directories are 0755 and the files 0644, owned by root (the original made all of it 0777).

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use dbclient::types::MandelboxId;

/// Host port bound to the protocol's discovery port, read by `run-whist-server.sh`.
pub const HOST_PORT_FILE: &str = "hostPort_for_my_32262_tcp";
pub const TTY_FILE: &str = "tty";
pub const GPU_INDEX_FILE: &str = "gpu_index";
pub const SESSION_ID_FILE: &str = "session_id";
/// Seconds the protocol waits for a client before the mandelbox exits (`-1`: forever).
pub const TIMEOUT_FILE: &str = "timeout";
/// Written once the parameters are in place and the container runs; `whist-startup.sh` waits.
pub const PARAMS_READY: &str = ".paramsReady";
/// The client's settings (`json_data` of the json_transport request).
pub const CONFIG_JSON: &str = "config.json";
/// Written after `config.json`; `run-whist-server.sh` waits for it.
pub const CONFIG_READY: &str = ".configReady";
/// Written by the mandelbox once its application has an X client: the host's readiness marker.
pub const READY_MARKER: &str = "done_sleeping_until_X_clients";

const DIR_MODE: u32 = 0o755;
const FILE_MODE: u32 = 0o644;
/// How often a wait for a file the mandelbox writes looks again. The mandelbox's own scripts
/// poll too; 25 ms keeps the readiness wait's added latency negligible next to a container start.
const MARKER_POLL: Duration = Duration::from_millis(25);

#[derive(Debug, thiserror::Error)]
pub enum MappingError {
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} did not appear within {timeout:?}")]
    Timeout { path: PathBuf, timeout: Duration },
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> MappingError {
    let path = path.to_owned();
    move |source| MappingError::Io {
        action,
        path,
        source,
    }
}

/// The paths of one mandelbox under the host's root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MandelboxDirs {
    root: PathBuf,
    id: MandelboxId,
}

impl MandelboxDirs {
    pub fn new(root: &Path, id: MandelboxId) -> Self {
        Self {
            root: root.to_owned(),
            id,
        }
    }

    /// `<root>/<id>`: everything of this mandelbox but its sockets and logs.
    pub fn base(&self) -> PathBuf {
        self.root.join(self.id.to_string())
    }

    pub fn mappings(&self) -> PathBuf {
        self.base().join("mandelboxResourceMappings")
    }

    pub fn user_configs(&self) -> PathBuf {
        self.base().join("userConfigs").join("unpacked_configs")
    }

    /// `<root>/temp/<id>`: the uinput socket directory lives below it.
    pub fn temp(&self) -> PathBuf {
        self.root.join("temp").join(self.id.to_string())
    }

    pub fn sockets(&self) -> PathBuf {
        self.temp().join("sockets")
    }

    pub fn logs(&self, session_id: &str) -> PathBuf {
        self.logs_root().join(session_id)
    }

    /// `<root>/temp/logs/<id>`.
    pub fn logs_root(&self) -> PathBuf {
        self.root
            .join("temp")
            .join("logs")
            .join(self.id.to_string())
    }

    /// Creates every directory the container's binds need.
    pub async fn create(&self, session_id: &str) -> Result<(), MappingError> {
        for dir in [
            self.mappings(),
            self.user_configs(),
            self.sockets(),
            self.logs(session_id),
        ] {
            create_dir(&dir).await?;
        }
        Ok(())
    }

    /// Removes everything of this mandelbox (its directories, sockets and logs). Missing
    /// directories are fine: removal is idempotent.
    pub async fn remove(&self) -> Result<(), MappingError> {
        for dir in [self.base(), self.temp(), self.logs_root()] {
            match tokio::fs::remove_dir_all(&dir).await {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_error("remove", &dir)(e)),
            }
        }
        Ok(())
    }
}

async fn create_dir(dir: &Path) -> Result<(), MappingError> {
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(io_error("create", dir))?;
    tokio::fs::set_permissions(dir, std::fs::Permissions::from_mode(DIR_MODE))
        .await
        .map_err(io_error("set permissions of", dir))
}

/// Writes `contents` to `dir/name` atomically: a temporary file in the same directory, then
/// renamed over the target.
pub async fn write_atomic(dir: &Path, name: &str, contents: &[u8]) -> Result<(), MappingError> {
    let dir = dir.to_owned();
    let name = name.to_owned();
    let contents = contents.to_owned();
    let target = dir.join(&name);
    let result = tokio::task::spawn_blocking(move || -> Result<(), MappingError> {
        let tmp = dir.join(format!(".{name}.tmp"));
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(FILE_MODE)
            .open(&tmp)
            .map_err(io_error("create", &tmp))?;
        file.write_all(&contents).map_err(io_error("write", &tmp))?;
        std::fs::rename(&tmp, dir.join(&name)).map_err(io_error("rename", &tmp))
    })
    .await;
    match result {
        Ok(r) => r,
        Err(join) => Err(MappingError::Io {
            action: "write",
            path: target,
            source: std::io::Error::other(join.to_string()),
        }),
    }
}

/// The resource-mapping parameters, written before `.paramsReady`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Params {
    pub host_port_32262: u16,
    pub tty: u8,
    pub gpu_index: usize,
    pub session_id: String,
    /// Seconds the protocol waits for its client; negative waits forever.
    pub protocol_timeout_seconds: i64,
}

/// Writes the parameter files, then `.paramsReady` last, so the mandelbox never sees the marker
/// before every parameter.
pub async fn write_params(dir: &Path, params: &Params) -> Result<(), MappingError> {
    let files = [
        (HOST_PORT_FILE, params.host_port_32262.to_string()),
        (TTY_FILE, params.tty.to_string()),
        (GPU_INDEX_FILE, params.gpu_index.to_string()),
        (SESSION_ID_FILE, params.session_id.clone()),
        (TIMEOUT_FILE, params.protocol_timeout_seconds.to_string()),
    ];
    let writes = files
        .iter()
        .map(|(name, value)| write_atomic(dir, name, value.as_bytes()));
    futures::future::try_join_all(writes).await?;
    Ok(())
}

pub async fn mark_params_ready(dir: &Path) -> Result<(), MappingError> {
    write_atomic(dir, PARAMS_READY, PARAMS_READY.as_bytes()).await
}

/// Writes `config.json` and then `.configReady`.
pub async fn write_config(dir: &Path, json_data: &str) -> Result<(), MappingError> {
    write_atomic(dir, CONFIG_JSON, json_data.as_bytes()).await?;
    write_atomic(dir, CONFIG_READY, CONFIG_READY.as_bytes()).await
}

/// Waits until the mandelbox has created `dir/name`, for at most `timeout`.
pub async fn wait_for_file(dir: &Path, name: &str, timeout: Duration) -> Result<(), MappingError> {
    let path = dir.join(name);
    let started = Instant::now();
    loop {
        // A stat of a local file takes microseconds: no need for the blocking pool.
        match path.try_exists() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => return Err(io_error("look for", &path)(e)),
        }
        if started.elapsed() >= timeout {
            return Err(MappingError::Timeout { path, timeout });
        }
        tokio::time::sleep(MARKER_POLL).await;
    }
}

/// Reads back the parameters of a mandelbox found on disk at start-up (reconcile).
pub async fn read_params(dir: &Path) -> Option<Params> {
    let read = |name: &'static str| {
        let path = dir.join(name);
        async move {
            tokio::fs::read_to_string(path)
                .await
                .ok()
                .map(|s| s.trim().to_owned())
        }
    };
    Some(Params {
        host_port_32262: read(HOST_PORT_FILE).await?.parse().ok()?,
        tty: read(TTY_FILE).await?.parse().ok()?,
        gpu_index: read(GPU_INDEX_FILE).await?.parse().ok()?,
        session_id: read(SESSION_ID_FILE).await?,
        protocol_timeout_seconds: read(TIMEOUT_FILE).await?.parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> Params {
        Params {
            host_port_32262: 40001,
            tty: 12,
            gpu_index: 1,
            session_id: "1700000000000".into(),
            protocol_timeout_seconds: 30,
        }
    }

    #[tokio::test]
    async fn params_round_trip_and_marker_comes_last() {
        let root = tempfile::tempdir().unwrap();
        let dirs = MandelboxDirs::new(root.path(), MandelboxId::random());
        dirs.create("1700000000000").await.unwrap();
        let dir = dirs.mappings();
        write_params(&dir, &params()).await.unwrap();
        assert!(!dir.join(PARAMS_READY).exists());
        mark_params_ready(&dir).await.unwrap();
        assert_eq!(read_params(&dir).await, Some(params()));
        let mode = std::fs::metadata(dir.join(TTY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, FILE_MODE);
        // No temporary file is left behind.
        let leftovers: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty());
    }

    #[tokio::test]
    async fn remove_is_idempotent_and_complete() {
        let root = tempfile::tempdir().unwrap();
        let dirs = MandelboxDirs::new(root.path(), MandelboxId::random());
        dirs.create("1").await.unwrap();
        write_config(&dirs.mappings(), "{}").await.unwrap();
        dirs.remove().await.unwrap();
        dirs.remove().await.unwrap();
        assert!(!dirs.base().exists());
        assert!(!dirs.temp().exists());
        assert!(!dirs.logs_root().exists());
    }

    #[tokio::test(start_paused = true)]
    async fn wait_for_file_times_out() {
        let root = tempfile::tempdir().unwrap();
        let error = wait_for_file(root.path(), READY_MARKER, Duration::from_secs(2))
            .await
            .unwrap_err();
        assert!(matches!(error, MappingError::Timeout { .. }));
    }
}
