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
//!
//! **No link is followed below the root.** The resource-mapping directory is bind-mounted
//! read-write into the mandelbox, and code running as root in it can plant a symbolic link (or
//! a FIFO) under any name the host will use. So every read and write the host makes there opens
//! the directory once, walking each component below the root with `O_NOFOLLOW`, and works
//! relative to that descriptor: the temporary file has a random name and is created with
//! `O_CREAT | O_EXCL | O_NOFOLLOW` (a planted link makes the create fail, it is never written
//! through), `renameat` replaces whatever entry holds the final name (a planted link is replaced,
//! not followed), and reads open with `O_NOFOLLOW | O_NONBLOCK` and take regular files only. The
//! root itself (`--root-dir`) is the operator's and may be a link. Removal uses
//! `remove_dir_all`, which never follows links below the path it is given (and removes a link
//! given as that path, not its target).

use std::io::{Read as _, Write as _};
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use dbclient::types::MandelboxId;
use nix::fcntl::{OFlag, openat, renameat};
use nix::sys::stat::{FileStat, Mode, SFlag, fstat, fstatat};
use nix::unistd::{UnlinkatFlags, unlinkat};

use crate::ownership::Owner;

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
/// The largest file the host reads back from a mandelbox's directory (its parameters are a few
/// bytes each): a mandelbox cannot make the host read a huge file into memory.
const MAX_READ_BYTES: u64 = 4096;
/// Temporary names tried before giving up; a collision of 64 random bits means someone is
/// planting names, not chance.
const TEMP_NAME_ATTEMPTS: u32 = 4;
const FILE_MODE: u32 = 0o644;
/// How often a wait for a file the mandelbox writes looks again. The mandelbox's own scripts
/// poll too; 25 ms keeps the readiness wait's added latency negligible next to a container start.
const MARKER_POLL: Duration = Duration::from_millis(25);
/// With an inotify watch, a look every second anyway (a queue overflow loses events).
const WATCHED_POLL: Duration = Duration::from_secs(1);

mod watch;

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
    #[error("{path} is not a plain file name or relative directory")]
    BadName { path: PathBuf },
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
    /// Who owns what the mandelbox may write (the bound directories, the profile); `None`:
    /// left to root (tests that do not run as root).
    owner: Option<Owner>,
}

impl MandelboxDirs {
    pub fn new(root: &Path, id: MandelboxId) -> Self {
        Self {
            root: root.to_owned(),
            id,
            owner: None,
        }
    }

    /// The same paths, with `owner` owning what the mandelbox may write.
    #[must_use]
    pub fn owned_by(mut self, owner: Owner) -> Self {
        self.owner = Some(owner);
        self
    }

    pub fn owner(&self) -> Option<Owner> {
        self.owner
    }

    /// `<root>/<id>`: everything of this mandelbox but its sockets and logs.
    pub fn base(&self) -> PathBuf {
        self.root.join(self.id.to_string())
    }

    pub fn mappings(&self) -> PathBuf {
        self.root.join(self.mappings_relative())
    }

    /// [`mappings`](Self::mappings) below the root: the part that is walked without following
    /// links.
    fn mappings_relative(&self) -> PathBuf {
        PathBuf::from(self.id.to_string()).join("mandelboxResourceMappings")
    }

    pub fn user_configs(&self) -> PathBuf {
        self.root.join(self.user_configs_relative())
    }

    /// [`user_configs`](Self::user_configs) below the root. The profile (reference §3.10) lives
    /// there; it is bound into the mandelbox.
    pub fn user_configs_relative(&self) -> PathBuf {
        self.user_configs_parent_relative().join("unpacked_configs")
    }

    /// `<id>/userConfigs` below the root: the host's own, never bound into the mandelbox, so
    /// profile downloads, uploads and extraction happen there out of the mandelbox's reach.
    pub fn user_configs_parent_relative(&self) -> PathBuf {
        PathBuf::from(self.id.to_string()).join("userConfigs")
    }

    /// The host's root (`--root-dir`).
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn id(&self) -> MandelboxId {
        self.id
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

    /// Creates every directory the container's binds need, owned by [`owner`](Self::owner)
    /// (their parents stay root's: the mandelbox sees only the bound directories themselves).
    pub async fn create(&self, session_id: &str) -> Result<(), MappingError> {
        for dir in [
            self.mappings(),
            self.user_configs(),
            self.sockets(),
            self.logs(session_id),
        ] {
            create_dir(&dir, self.owner).await?;
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

async fn create_dir(dir: &Path, owner: Option<Owner>) -> Result<(), MappingError> {
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(io_error("create", dir))?;
    tokio::fs::set_permissions(dir, std::fs::Permissions::from_mode(DIR_MODE))
        .await
        .map_err(io_error("set permissions of", dir))?;
    if let Some(owner) = owner {
        // Just made under root-only parents that no mandelbox can reach: no link to follow.
        let fd = std::fs::File::open(dir).map_err(io_error("open", dir))?;
        owner
            .give(&fd)
            .map_err(|e| io_error("change the owner of", dir)(e.into()))?;
    }
    Ok(())
}

fn nix_error(action: &'static str, path: &Path) -> impl FnOnce(nix::Error) -> MappingError {
    let path = path.to_owned();
    move |errno| MappingError::Io {
        action,
        path,
        source: std::io::Error::from(errno),
    }
}

/// Opens `root/relative` as a directory without following a link anywhere below `root`.
pub fn open_dir_beneath(root: &Path, relative: &Path) -> Result<OwnedFd, MappingError> {
    let path = root.join(relative);
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
    let mut dir = nix::fcntl::open(root, flags, Mode::empty()).map_err(nix_error("open", root))?;
    for component in relative.components() {
        let Component::Normal(name) = component else {
            return Err(MappingError::BadName { path });
        };
        dir = openat(&dir, name, flags | OFlag::O_NOFOLLOW, Mode::empty())
            .map_err(nix_error("open without following links", &path))?;
    }
    Ok(dir)
}

/// A single file name: no separator, not `.` or `..`, not empty.
fn check_name(dir: &Path, name: &str) -> Result<(), MappingError> {
    let mut components = Path::new(name).components();
    match (components.next(), components.next()) {
        (Some(Component::Normal(n)), None) if n == name => Ok(()),
        _ => Err(MappingError::BadName {
            path: dir.join(name),
        }),
    }
}

/// Writes `contents` to `root/relative/name` atomically, following no link below `root`: a
/// temporary file with a random name, created exclusively in the directory's descriptor, then
/// renamed over whatever holds `name` (a planted link is replaced, never written through).
pub async fn write_atomic(
    root: &Path,
    relative: &Path,
    name: &str,
    contents: &[u8],
) -> Result<(), MappingError> {
    write_atomic_as(root, relative, name, contents, None).await
}

/// [`write_atomic`], the file owned by `owner` (set on the descriptor before the rename), for
/// files the mandelbox's user may rewrite.
pub async fn write_atomic_as(
    root: &Path,
    relative: &Path,
    name: &str,
    contents: &[u8],
    owner: Option<Owner>,
) -> Result<(), MappingError> {
    let root = root.to_owned();
    let relative = relative.to_owned();
    let name = name.to_owned();
    let contents = contents.to_owned();
    let target = root.join(&relative).join(&name);
    let result = tokio::task::spawn_blocking(move || {
        write_atomic_blocking(&root, &relative, &name, &contents, owner)
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

fn write_atomic_blocking(
    root: &Path,
    relative: &Path,
    name: &str,
    contents: &[u8],
    owner: Option<Owner>,
) -> Result<(), MappingError> {
    let dir_path = root.join(relative);
    check_name(&dir_path, name)?;
    let dir = open_dir_beneath(root, relative)?;
    let mut attempt = 1;
    let (tmp, file) = loop {
        let tmp = format!(".{name}.{:016x}.tmp", rand::random::<u64>());
        let created = openat(
            &dir,
            tmp.as_str(),
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(FILE_MODE),
        );
        match created {
            Ok(fd) => break (tmp, std::fs::File::from(fd)),
            Err(nix::Error::EEXIST) if attempt < TEMP_NAME_ATTEMPTS => attempt += 1,
            Err(e) => return Err(nix_error("create", &dir_path.join(&tmp))(e)),
        }
    };
    let tmp_path = dir_path.join(&tmp);
    let written = (|| {
        // The umask may have narrowed the mode; fchmod works on the descriptor, not a path.
        file.set_permissions(std::fs::Permissions::from_mode(FILE_MODE))
            .map_err(io_error("set permissions of", &tmp_path))?;
        if let Some(owner) = owner {
            owner
                .give(&file)
                .map_err(|e| io_error("change the owner of", &tmp_path)(e.into()))?;
        }
        (&file)
            .write_all(contents)
            .map_err(io_error("write", &tmp_path))?;
        renameat(&dir, tmp.as_str(), &dir, name).map_err(nix_error("rename", &tmp_path))
    })();
    if written.is_err() {
        // Best effort: the directory goes with the mandelbox anyway.
        let _ = unlinkat(&dir, tmp.as_str(), UnlinkatFlags::NoRemoveDir);
    }
    written
}

/// Reads the regular file `name` of an open directory, without following a link and without
/// blocking on a FIFO; at most [`MAX_READ_BYTES`].
fn read_beneath(dir: &OwnedFd, dir_path: &Path, name: &str) -> Result<String, MappingError> {
    let path = dir_path.join(name);
    check_name(dir_path, name)?;
    let fd = openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(nix_error("open without following links", &path))?;
    let stat = fstat(&fd).map_err(nix_error("stat", &path))?;
    if !is_regular(&stat) {
        return Err(MappingError::Io {
            action: "read",
            path,
            source: std::io::Error::other("not a regular file"),
        });
    }
    let mut text = String::new();
    std::fs::File::from(fd)
        .take(MAX_READ_BYTES)
        .read_to_string(&mut text)
        .map_err(io_error("read", &path))?;
    Ok(text)
}

fn is_regular(stat: &FileStat) -> bool {
    SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT == SFlag::S_IFREG
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
pub async fn write_params(dirs: &MandelboxDirs, params: &Params) -> Result<(), MappingError> {
    let files = [
        (HOST_PORT_FILE, params.host_port_32262.to_string()),
        (TTY_FILE, params.tty.to_string()),
        (GPU_INDEX_FILE, params.gpu_index.to_string()),
        (SESSION_ID_FILE, params.session_id.clone()),
        (TIMEOUT_FILE, params.protocol_timeout_seconds.to_string()),
    ];
    let relative = dirs.mappings_relative();
    let writes = files
        .iter()
        .map(|(name, value)| write_atomic(&dirs.root, &relative, name, value.as_bytes()));
    futures::future::try_join_all(writes).await?;
    Ok(())
}

/// Replaces `session_id` (a warm box's, written with a host-made id before any user, gets the
/// claimed row's at the claim; the mandelbox reads it again at `.configReady`).
pub async fn write_session_id(dirs: &MandelboxDirs, session_id: &str) -> Result<(), MappingError> {
    write_mapping(dirs, SESSION_ID_FILE, session_id.as_bytes()).await
}

pub async fn mark_params_ready(dirs: &MandelboxDirs) -> Result<(), MappingError> {
    write_mapping(dirs, PARAMS_READY, PARAMS_READY.as_bytes()).await
}

/// Writes `config.json` and then `.configReady`.
pub async fn write_config(dirs: &MandelboxDirs, json_data: &str) -> Result<(), MappingError> {
    write_mapping(dirs, CONFIG_JSON, json_data.as_bytes()).await?;
    write_mapping(dirs, CONFIG_READY, CONFIG_READY.as_bytes()).await
}

async fn write_mapping(
    dirs: &MandelboxDirs,
    name: &str,
    contents: &[u8],
) -> Result<(), MappingError> {
    write_atomic(&dirs.root, &dirs.mappings_relative(), name, contents).await
}

/// Waits until the mandelbox has created `name` in its resource-mapping directory, for at most
/// `timeout`. Any entry counts (a link is not followed to decide).
pub async fn wait_for_file(
    dirs: &MandelboxDirs,
    name: &str,
    timeout: Duration,
) -> Result<(), MappingError> {
    let dir_path = dirs.mappings();
    let path = dir_path.join(name);
    check_name(&dir_path, name)?;
    // Opening a local directory and a stat take microseconds: no need for the blocking pool.
    let dir = open_dir_beneath(&dirs.root, &dirs.mappings_relative())?;
    // Woken by inotify (set up before the first look, so no write is missed); polling only
    // where inotify is not to be had, and as a slow safety net beside it.
    let watch = match watch::DirWatch::new(&dir) {
        Ok(watch) => Some(watch),
        Err(error) => {
            tracing::debug!(%error, "no inotify watch on the resource mappings: polling");
            None
        }
    };
    let started = Instant::now();
    loop {
        match fstatat(&dir, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(_) => return Ok(()),
            Err(nix::Error::ENOENT) => {}
            Err(e) => return Err(nix_error("look for", &path)(e)),
        }
        let Some(left) = timeout
            .checked_sub(started.elapsed())
            .filter(|l| !l.is_zero())
        else {
            return Err(MappingError::Timeout { path, timeout });
        };
        match &watch {
            Some(watch) => {
                let _ = tokio::time::timeout(left.min(WATCHED_POLL), watch.changed()).await;
            }
            None => tokio::time::sleep(left.min(MARKER_POLL)).await,
        }
    }
}

/// Reads back the parameters of a mandelbox found on disk at start-up (reconcile). `None` when
/// any is missing, unreadable or not a regular file.
pub async fn read_params(dirs: &MandelboxDirs) -> Option<Params> {
    let root = dirs.root.clone();
    let relative = dirs.mappings_relative();
    tokio::task::spawn_blocking(move || read_params_blocking(&root, &relative))
        .await
        .ok()
        .flatten()
}

fn read_params_blocking(root: &Path, relative: &Path) -> Option<Params> {
    let dir = open_dir_beneath(root, relative).ok()?;
    let dir_path = root.join(relative);
    let read = |name: &str| {
        read_beneath(&dir, &dir_path, name)
            .ok()
            .map(|s| s.trim().to_owned())
    };
    Some(Params {
        host_port_32262: read(HOST_PORT_FILE)?.parse().ok()?,
        tty: read(TTY_FILE)?.parse().ok()?,
        gpu_index: read(GPU_INDEX_FILE)?.parse().ok()?,
        session_id: read(SESSION_ID_FILE)?,
        protocol_timeout_seconds: read(TIMEOUT_FILE)?.parse().ok()?,
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
        write_params(&dirs, &params()).await.unwrap();
        assert!(!dir.join(PARAMS_READY).exists());
        mark_params_ready(&dirs).await.unwrap();
        assert_eq!(read_params(&dirs).await, Some(params()));
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
        write_config(&dirs, "{}").await.unwrap();
        dirs.remove().await.unwrap();
        dirs.remove().await.unwrap();
        assert!(!dirs.base().exists());
        assert!(!dirs.temp().exists());
        assert!(!dirs.logs_root().exists());
    }

    #[tokio::test(start_paused = true)]
    async fn wait_for_file_times_out() {
        let root = tempfile::tempdir().unwrap();
        let dirs = MandelboxDirs::new(root.path(), MandelboxId::random());
        dirs.create("1").await.unwrap();
        let error = wait_for_file(&dirs, READY_MARKER, Duration::from_secs(2))
            .await
            .unwrap_err();
        assert!(matches!(error, MappingError::Timeout { .. }));
    }

    /// A mandelbox's directory with a victim file outside it, as root in the container would
    /// aim at.
    struct Planted {
        _root: tempfile::TempDir,
        dirs: MandelboxDirs,
        outside: PathBuf,
    }

    const UNTOUCHED: &str = "untouched";

    async fn planted() -> Planted {
        let root = tempfile::tempdir().unwrap();
        let dirs = MandelboxDirs::new(root.path(), MandelboxId::random());
        dirs.create("1").await.unwrap();
        let outside = root.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("victim"), UNTOUCHED).unwrap();
        Planted {
            _root: root,
            dirs,
            outside,
        }
    }

    fn outside_untouched(p: &Planted) {
        let names: Vec<_> = std::fs::read_dir(&p.outside)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, ["victim"], "nothing new appears outside");
        assert_eq!(
            std::fs::read_to_string(p.outside.join("victim")).unwrap(),
            UNTOUCHED
        );
    }

    #[tokio::test]
    async fn a_link_planted_at_the_old_temporary_name_is_never_written_through() {
        let p = planted().await;
        let dir = p.dirs.mappings();
        for name in [".config.json.tmp", ".tty.tmp", ".paramsReady.tmp"] {
            std::os::unix::fs::symlink(p.outside.join("victim"), dir.join(name)).unwrap();
        }
        write_params(&p.dirs, &params()).await.unwrap();
        mark_params_ready(&p.dirs).await.unwrap();
        write_config(&p.dirs, r#"{"x":1}"#).await.unwrap();
        outside_untouched(&p);
        assert_eq!(read_params(&p.dirs).await, Some(params()));
    }

    #[tokio::test]
    async fn a_link_planted_at_the_final_name_is_replaced_not_followed() {
        let p = planted().await;
        let dir = p.dirs.mappings();
        std::os::unix::fs::symlink(p.outside.join("victim"), dir.join(CONFIG_JSON)).unwrap();
        std::os::unix::fs::symlink(p.outside.join("new"), dir.join(CONFIG_READY)).unwrap();
        write_config(&p.dirs, r#"{"x":1}"#).await.unwrap();
        outside_untouched(&p);
        let meta = std::fs::symlink_metadata(dir.join(CONFIG_JSON)).unwrap();
        assert!(
            meta.file_type().is_file(),
            "the link was replaced by the file"
        );
        assert_eq!(
            std::fs::read_to_string(dir.join(CONFIG_JSON)).unwrap(),
            r#"{"x":1}"#
        );
    }

    #[tokio::test]
    async fn a_parent_directory_replaced_by_a_link_is_refused() {
        let p = planted().await;
        let dir = p.dirs.mappings();
        std::fs::remove_dir_all(&dir).unwrap();
        std::os::unix::fs::symlink(&p.outside, &dir).unwrap();
        let error = write_config(&p.dirs, "{}").await.unwrap_err();
        assert!(matches!(error, MappingError::Io { .. }), "{error}");
        outside_untouched(&p);
        // Higher up too: the mandelbox's own directory as a link.
        std::fs::remove_file(&dir).unwrap();
        let base = p.dirs.base();
        std::fs::remove_dir_all(&base).unwrap();
        std::fs::create_dir(p.outside.join("mandelboxResourceMappings")).unwrap();
        std::os::unix::fs::symlink(&p.outside, &base).unwrap();
        assert!(mark_params_ready(&p.dirs).await.is_err());
        assert!(
            wait_for_file(&p.dirs, READY_MARKER, Duration::ZERO)
                .await
                .is_err()
        );
        assert!(
            std::fs::read_dir(p.outside.join("mandelboxResourceMappings"))
                .unwrap()
                .next()
                .is_none(),
            "nothing written through the linked parent"
        );
    }

    #[tokio::test]
    async fn names_with_a_path_are_refused() {
        let p = planted().await;
        for name in ["../outside/victim", "a/b", "..", ".", ""] {
            assert!(
                matches!(
                    write_mapping(&p.dirs, name, b"x").await,
                    Err(MappingError::BadName { .. })
                ),
                "{name:?}"
            );
        }
        outside_untouched(&p);
    }

    #[tokio::test]
    async fn parameters_behind_links_or_in_fifos_are_not_read() {
        let p = planted().await;
        write_params(&p.dirs, &params()).await.unwrap();
        let tty = p.dirs.mappings().join(TTY_FILE);
        std::fs::remove_file(&tty).unwrap();
        std::fs::write(p.outside.join("tty"), "12").unwrap();
        std::os::unix::fs::symlink(p.outside.join("tty"), &tty).unwrap();
        assert_eq!(read_params(&p.dirs).await, None, "a link is not followed");
        std::fs::remove_file(&tty).unwrap();
        nix::unistd::mkfifo(&tty, Mode::from_bits_truncate(0o644)).unwrap();
        // A FIFO with no writer would block a plain open for ever.
        let read = tokio::time::timeout(Duration::from_secs(10), read_params(&p.dirs)).await;
        assert_eq!(read.unwrap(), None, "a FIFO is not read");
    }

    #[tokio::test]
    async fn removal_does_not_follow_links_out_of_the_directory() {
        let p = planted().await;
        let dir = p.dirs.mappings();
        std::os::unix::fs::symlink(&p.outside, dir.join("dir-link")).unwrap();
        std::os::unix::fs::symlink(p.outside.join("victim"), dir.join("file-link")).unwrap();
        std::os::unix::fs::symlink(&p.outside, p.dirs.sockets().join("sockets-link")).unwrap();
        p.dirs.remove().await.unwrap();
        assert!(!p.dirs.base().exists());
        assert!(!p.dirs.temp().exists());
        outside_untouched(&p);
    }
}
