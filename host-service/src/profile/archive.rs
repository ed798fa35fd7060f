//! A profile directory as the original archived it (`configutils/compression.go`): a tar whose
//! entry names are relative to the directory, inside an LZ4 frame.
//!
//! Both directions treat the directory and the archive as hostile: the directory was written by
//! code running as root in a mandelbox, the archive comes back from S3 and may have been made by
//! anyone holding the token.
//! - **Packing** walks the directory through descriptors, opening every entry with `O_NOFOLLOW`
//!   (a link swapped in for a directory mid-walk is refused, never followed) and archiving
//!   regular files and directories only (links, FIFOs, sockets and devices are skipped and
//!   counted; the original recorded links as empty files). A file is archived with the size it
//!   had when opened, padded or cut to it, so a file changing meanwhile cannot corrupt the tar.
//! - **Unpacking** goes into a directory only the host sees, through descriptors, and refuses
//!   the whole archive at the first absolute name, `..`, link, hard link, device, FIFO or sparse
//!   entry, and when it would exceed [`Limits`] (entries, bytes written, directory depth). Every
//!   byte read from the decompressed stream is charged to a budget, so a tar header claiming
//!   gigabytes, or a GNU long name or PAX record of gigabytes (which the `tar` crate would read
//!   into memory), fails after at most [`HEADER_BUDGET`] bytes, not after filling memory or disk.

use std::cell::Cell;
use std::ffi::{CString, OsStr};
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Component, Path, PathBuf};
use std::rc::Rc;

use nix::fcntl::{AtFlags, OFlag, openat};
use nix::sys::stat::{FileStat, Mode, SFlag, fchmod, fstat, fstatat, mkdirat};
use nix::unistd::{UnlinkatFlags, unlinkat};

use crate::ownership::Owner;

/// What an archive may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Files and directories.
    pub max_entries: u64,
    /// Bytes of file contents, in all.
    pub max_bytes: u64,
}

impl Default for Limits {
    /// A browser profile is tens to a few hundred MiB in a few thousand files; ten times that
    /// is still a profile, more is a bomb.
    fn default() -> Self {
        Self {
            max_entries: 100_000,
            max_bytes: 2 * 1024 * 1024 * 1024,
        }
    }
}

/// Bytes the `tar` reader may consume between two entries: the previous entry's padding, the
/// next header, and GNU long-name and PAX records (a path is at most 4 KiB on Linux).
pub const HEADER_BUDGET: u64 = 64 * 1024;
/// Directory nesting refused beyond this (a browser profile nests less than 10 deep).
pub const MAX_DEPTH: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("entry {name:?} refused: {reason}")]
    Refused { name: String, reason: &'static str },
    #[error("more than {0} entries")]
    TooManyEntries(u64),
    #[error("more than {0} bytes")]
    TooLarge(u64),
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("archive: {0}")]
    Stream(#[from] std::io::Error),
}

fn io_at(action: &'static str, path: &Path) -> impl FnOnce(nix::Error) -> ArchiveError {
    let path = path.to_owned();
    move |errno| ArchiveError::Io {
        action,
        path,
        source: errno.into(),
    }
}

fn is(stat: &FileStat, kind: SFlag) -> bool {
    SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT == kind
}

/// What packing saw.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PackStats {
    pub files: u64,
    pub dirs: u64,
    pub bytes: u64,
    /// Links, FIFOs, sockets and devices left out.
    pub skipped: u64,
}

/// Archives the directory `dir` (an open descriptor) into `out` as an LZ4 frame of a tar; returns
/// `out` and what went in.
pub fn pack<W: Write>(
    dir: OwnedFd,
    out: W,
    limits: Limits,
) -> Result<(W, PackStats), ArchiveError> {
    let encoder = lz4_flex::frame::FrameEncoder::new(out);
    let mut builder = tar::Builder::new(encoder);
    builder.mode(tar::HeaderMode::Deterministic);
    let mut stats = PackStats::default();
    pack_dir(&mut builder, &dir, Path::new(""), 0, limits, &mut stats)?;
    let encoder = builder.into_inner()?;
    let out = encoder
        .finish()
        .map_err(|e| ArchiveError::Stream(std::io::Error::other(e)))?;
    Ok((out, stats))
}

fn pack_dir<W: Write>(
    builder: &mut tar::Builder<W>,
    dir: &OwnedFd,
    relative: &Path,
    depth: usize,
    limits: Limits,
    stats: &mut PackStats,
) -> Result<(), ArchiveError> {
    if depth > MAX_DEPTH {
        return Err(ArchiveError::Refused {
            name: relative.display().to_string(),
            reason: "nested too deep",
        });
    }
    // Names first, then each opened: a listing is a snapshot either way.
    let listing = nix::dir::Dir::openat(
        dir,
        ".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(io_at("list", relative))?;
    let mut names: Vec<CString> = listing
        .into_iter()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_owned())
        .filter(|n| n.as_bytes() != b"." && n.as_bytes() != b"..")
        .collect();
    names.sort();
    for name in names {
        let path = relative.join(OsStr::from_bytes(name.as_bytes()));
        let stat = match fstatat(dir, name.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(stat) => stat,
            // Removed meanwhile.
            Err(nix::Error::ENOENT) => continue,
            Err(e) => return Err(io_at("stat", &path)(e)),
        };
        let is_dir = is(&stat, SFlag::S_IFDIR);
        if !is_dir && !is(&stat, SFlag::S_IFREG) {
            stats.skipped += 1;
            continue;
        }
        if stats.files + stats.dirs >= limits.max_entries {
            return Err(ArchiveError::TooManyEntries(limits.max_entries));
        }
        let flags = if is_dir {
            OFlag::O_RDONLY | OFlag::O_DIRECTORY
        } else {
            OFlag::O_RDONLY | OFlag::O_NONBLOCK
        } | OFlag::O_NOFOLLOW
            | OFlag::O_CLOEXEC;
        let fd = match openat(dir, name.as_c_str(), flags, Mode::empty()) {
            Ok(fd) => fd,
            // Removed, or swapped for a link or a FIFO, since the stat: left out.
            Err(
                nix::Error::ENOENT | nix::Error::ELOOP | nix::Error::ENOTDIR | nix::Error::ENXIO,
            ) => {
                stats.skipped += 1;
                continue;
            }
            Err(e) => return Err(io_at("open", &path)(e)),
        };
        let stat = fstat(&fd).map_err(io_at("stat", &path))?;
        let mut header = tar::Header::new_gnu();
        header.set_mode(stat.st_mode & 0o777);
        header.set_mtime(u64::try_from(stat.st_mtime).unwrap_or(0));
        if is_dir && is(&stat, SFlag::S_IFDIR) {
            header.set_entry_type(tar::EntryType::Directory);
            header.set_size(0);
            builder.append_data(&mut header, &path, std::io::empty())?;
            stats.dirs += 1;
            pack_dir(builder, &fd, &path, depth + 1, limits, stats)?;
        } else if !is_dir && is(&stat, SFlag::S_IFREG) {
            let size = u64::try_from(stat.st_size).unwrap_or(0);
            if stats.bytes + size > limits.max_bytes {
                return Err(ArchiveError::TooLarge(limits.max_bytes));
            }
            header.set_entry_type(tar::EntryType::Regular);
            header.set_size(size);
            let file = std::fs::File::from(fd);
            let exact = file.take(size).chain(std::io::repeat(0)).take(size);
            builder.append_data(&mut header, &path, exact)?;
            stats.files += 1;
            stats.bytes += size;
        } else {
            stats.skipped += 1;
        }
    }
    Ok(())
}

/// What unpacking wrote.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct UnpackStats {
    pub files: u64,
    pub dirs: u64,
    pub bytes: u64,
}

/// A reader that fails once its budget is spent; the budget is topped up by the unpacker as it
/// moves from entry to entry.
struct Budgeted<R> {
    inner: R,
    budget: Rc<Cell<u64>>,
}

impl<R: Read> Read for Budgeted<R> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let left = self.budget.get();
        if left == 0 {
            return Err(std::io::Error::other("archive exceeds its limits"));
        }
        let take = (out.len() as u64).min(left) as usize;
        let n = self.inner.read(&mut out[..take])?;
        self.budget.set(left - n as u64);
        Ok(n)
    }
}

/// Unpacks an LZ4 frame of a tar from `input` into the directory `into` (an open descriptor of
/// an empty directory only the host can reach), every directory and file it makes given to
/// `owner` when there is one (the archive's own owners are ignored, like the original's). On
/// error, what was written stays: the caller removes the directory.
pub fn unpack<R: Read>(
    input: R,
    into: &OwnedFd,
    limits: Limits,
    owner: Option<Owner>,
) -> Result<UnpackStats, ArchiveError> {
    let give = |fd: &OwnedFd, shown: &str| match owner {
        Some(owner) => owner
            .give(fd)
            .map_err(io_at("change the owner of", Path::new(shown))),
        None => Ok(()),
    };
    let budget = Rc::new(Cell::new(HEADER_BUDGET));
    let reader = Budgeted {
        inner: lz4_flex::frame::FrameDecoder::new(input),
        budget: budget.clone(),
    };
    let mut archive = tar::Archive::new(reader);
    let mut stats = UnpackStats::default();
    let entries = archive.entries()?;
    for entry in entries {
        let mut entry = entry?;
        let raw = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let refuse = |reason| ArchiveError::Refused {
            name: shown.clone(),
            reason,
        };
        let parts = safe_components(&raw).map_err(refuse)?;
        let kind = entry.header().entry_type();
        let is_dir = kind.is_dir();
        if !(is_dir || kind.is_file() || kind.is_contiguous()) {
            return Err(refuse(match kind {
                tar::EntryType::Symlink => "a symbolic link",
                tar::EntryType::Link => "a hard link",
                tar::EntryType::Char | tar::EntryType::Block => "a device",
                tar::EntryType::Fifo => "a FIFO",
                tar::EntryType::GNUSparse => "a sparse file",
                _ => "not a file or directory",
            }));
        }
        if parts.len() > MAX_DEPTH {
            return Err(refuse("nested too deep"));
        }
        if stats.files + stats.dirs >= limits.max_entries {
            return Err(ArchiveError::TooManyEntries(limits.max_entries));
        }
        let mode = entry.header().mode().unwrap_or(0o644) & 0o777;
        if is_dir {
            if parts.is_empty() {
                // The root itself (`.`), which the original archived.
                budget.set(HEADER_BUDGET);
                continue;
            }
            let dir = open_dirs(into, &parts, &shown, &give)?;
            fchmod(&dir, Mode::from_bits_truncate(mode | 0o700))
                .map_err(io_at("set permissions of", Path::new(&shown)))?;
            stats.dirs += 1;
        } else {
            let Some((name, parents)) = parts.split_last() else {
                return Err(refuse("a file without a name"));
            };
            let size = entry.size();
            if stats.bytes.saturating_add(size) > limits.max_bytes {
                return Err(ArchiveError::TooLarge(limits.max_bytes));
            }
            let parent = open_dirs(into, parents, &shown, &give)?;
            let file = create_file(&parent, name, mode | 0o600, &shown)?;
            give(&file, &shown)?;
            // The entry's data, then the budget for the next header.
            budget.set(size);
            let copied = std::io::copy(&mut entry, &mut std::fs::File::from(file))?;
            if copied != size {
                return Err(refuse("shorter than its header says"));
            }
            stats.files += 1;
            stats.bytes += size;
        }
        budget.set(HEADER_BUDGET);
    }
    Ok(stats)
}

/// The normal components of a relative name; `.` components are dropped.
fn safe_components(raw: &[u8]) -> Result<Vec<&OsStr>, &'static str> {
    if raw.contains(&0) {
        return Err("a NUL in the name");
    }
    let mut parts = Vec::new();
    for component in Path::new(OsStr::from_bytes(raw)).components() {
        match component {
            Component::Normal(part) => parts.push(part),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => return Err("an absolute name"),
            Component::ParentDir => return Err("a name with .."),
        }
    }
    Ok(parts)
}

/// Opens (creating as needed, each new one handed to `give`) `parts` below `root`, following
/// no link.
fn open_dirs(
    root: &OwnedFd,
    parts: &[&OsStr],
    shown: &str,
    give: &dyn Fn(&OwnedFd, &str) -> Result<(), ArchiveError>,
) -> Result<OwnedFd, ArchiveError> {
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let path = Path::new(shown);
    let mut dir = openat(root, ".", flags, Mode::empty()).map_err(io_at("open", path))?;
    for part in parts {
        dir = match openat(&dir, *part, flags, Mode::empty()) {
            Ok(fd) => fd,
            Err(nix::Error::ENOENT) => {
                mkdirat(dir.as_fd(), *part, Mode::from_bits_truncate(0o755))
                    .map_err(io_at("create", path))?;
                let made =
                    openat(&dir, *part, flags, Mode::empty()).map_err(io_at("open", path))?;
                give(&made, shown)?;
                made
            }
            Err(e) => return Err(io_at("open", path)(e)),
        };
    }
    Ok(dir)
}

/// Creates `name` in `dir` exclusively, without following a link; an entry already there (a
/// repeated name in the archive) is replaced.
fn create_file(
    dir: &OwnedFd,
    name: &OsStr,
    mode: u32,
    shown: &str,
) -> Result<OwnedFd, ArchiveError> {
    let path = Path::new(shown);
    let flags =
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let mode = Mode::from_bits_truncate(mode);
    let fd = match openat(dir, name, flags, mode) {
        Ok(fd) => fd,
        Err(nix::Error::EEXIST) => {
            unlinkat(dir, name, UnlinkatFlags::NoRemoveDir).map_err(io_at("replace", path))?;
            openat(dir, name, flags, mode).map_err(io_at("create", path))?
        }
        Err(e) => return Err(io_at("create", path)(e)),
    };
    // The umask may have narrowed the mode.
    fchmod(&fd, mode).map_err(io_at("set permissions of", path))?;
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(path: &Path) -> OwnedFd {
        nix::fcntl::open(path, OFlag::O_RDONLY | OFlag::O_DIRECTORY, Mode::empty()).unwrap()
    }

    #[test]
    fn a_directory_round_trips_and_links_and_fifos_are_left_out() {
        let from = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(from.path().join("Default/Local Storage")).unwrap();
        std::fs::write(from.path().join("Default/Cookies"), b"cookie jar").unwrap();
        std::fs::write(
            from.path().join("Default/Local Storage/x"),
            vec![7u8; 300_000],
        )
        .unwrap();
        std::fs::write(from.path().join("top"), b"").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", from.path().join("link")).unwrap();
        nix::unistd::mkfifo(&from.path().join("fifo"), Mode::from_bits_truncate(0o644)).unwrap();
        let (bytes, stats) = pack(open(from.path()), Vec::new(), Limits::default()).unwrap();
        assert_eq!(
            stats,
            PackStats {
                files: 3,
                dirs: 2,
                bytes: 300_010,
                skipped: 2
            }
        );
        let to = tempfile::tempdir().unwrap();
        let owner = Owner::new(4242, 4343);
        let unpacked = unpack(
            bytes.as_slice(),
            &open(to.path()),
            Limits::default(),
            Some(owner),
        )
        .unwrap();
        assert_eq!(
            (unpacked.files, unpacked.dirs, unpacked.bytes),
            (3, 2, 300_010)
        );
        // Everything unpacked belongs to the mandelbox's user (the tests run as root).
        for path in [
            "Default",
            "Default/Cookies",
            "Default/Local Storage",
            "Default/Local Storage/x",
            "top",
        ] {
            use std::os::unix::fs::MetadataExt as _;
            let meta = std::fs::symlink_metadata(to.path().join(path)).unwrap();
            assert_eq!((meta.uid(), meta.gid()), (4242, 4343), "{path}");
        }
        assert_eq!(
            std::fs::read(to.path().join("Default/Cookies")).unwrap(),
            b"cookie jar"
        );
        assert_eq!(
            std::fs::read(to.path().join("Default/Local Storage/x")).unwrap(),
            vec![7u8; 300_000]
        );
        assert!(!to.path().join("link").exists() && !to.path().join("fifo").exists());
    }

    #[test]
    fn packing_refuses_a_profile_over_the_limits() {
        let from = tempfile::tempdir().unwrap();
        for i in 0..5 {
            std::fs::write(from.path().join(format!("f{i}")), [0u8; 100]).unwrap();
        }
        let few = Limits {
            max_entries: 4,
            max_bytes: u64::MAX,
        };
        assert!(matches!(
            pack(open(from.path()), Vec::new(), few),
            Err(ArchiveError::TooManyEntries(4))
        ));
        let small = Limits {
            max_entries: 100,
            max_bytes: 450,
        };
        assert!(matches!(
            pack(open(from.path()), Vec::new(), small),
            Err(ArchiveError::TooLarge(450))
        ));
    }
}
