//! Hostile profile archives: whatever an archive holds, unpacking writes nothing outside its
//! directory, follows no link, makes no device or FIFO, and stops at the limits — the whole
//! archive is refused (the caller then keeps the empty profile).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write as _;
use std::os::fd::OwnedFd;
use std::path::Path;

use host_service::profile::archive::{self, ArchiveError, HEADER_BUDGET, Limits};
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

fn open_dir(path: &Path) -> OwnedFd {
    nix::fcntl::open(path, OFlag::O_RDONLY | OFlag::O_DIRECTORY, Mode::empty()).unwrap()
}

/// A raw header: the name is written as bytes, so `..` and absolute names get through (the
/// `tar` crate's builder refuses them, an attacker's tool does not).
fn header(name: &[u8], kind: tar::EntryType, size: u64) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name);
    header.set_entry_type(kind);
    header.set_size(size);
    header.set_mode(0o644);
    header.set_cksum();
    header
}

/// An LZ4 frame of a tar of `entries` (header, data).
fn lz4_tar(entries: Vec<(tar::Header, Vec<u8>)>) -> Vec<u8> {
    let mut builder = tar::Builder::new(lz4_flex::frame::FrameEncoder::new(Vec::new()));
    for (header, data) in entries {
        builder.append(&header, data.as_slice()).unwrap();
    }
    builder.into_inner().unwrap().finish().unwrap()
}

/// A destination directory inside a parent that must stay untouched.
struct Target {
    parent: tempfile::TempDir,
}

impl Target {
    fn new() -> Self {
        let parent = tempfile::tempdir().unwrap();
        std::fs::create_dir(parent.path().join("profile")).unwrap();
        std::fs::write(parent.path().join("victim"), "untouched").unwrap();
        Self { parent }
    }

    fn unpack(&self, bytes: &[u8], limits: Limits) -> Result<archive::UnpackStats, ArchiveError> {
        archive::unpack(
            bytes,
            &open_dir(&self.parent.path().join("profile")),
            limits,
            None,
        )
    }

    fn outside_untouched(&self) {
        let mut names: Vec<_> = std::fs::read_dir(self.parent.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["profile", "victim"],
            "nothing appears beside the profile"
        );
        assert_eq!(
            std::fs::read_to_string(self.parent.path().join("victim")).unwrap(),
            "untouched"
        );
    }

    /// Nothing but regular files and directories inside.
    fn only_files_and_dirs(&self) {
        let mut stack = vec![self.parent.path().join("profile")];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let entry = entry.unwrap();
                let kind = entry.file_type().unwrap();
                assert!(kind.is_file() || kind.is_dir(), "{:?}", entry.path());
                if kind.is_dir() {
                    stack.push(entry.path());
                }
            }
        }
    }
}

fn refused(result: Result<archive::UnpackStats, ArchiveError>) -> ArchiveError {
    match result {
        Ok(stats) => panic!("a hostile archive was unpacked: {stats:?}"),
        Err(error) => error,
    }
}

#[test]
fn names_leaving_the_directory_are_refused() {
    for name in [
        &b"/etc/evil"[..],
        b"../victim",
        b"a/../../victim",
        b"./../victim",
        b"a/b/../../../victim",
    ] {
        let t = Target::new();
        let bytes = lz4_tar(vec![
            (header(b"fine", tar::EntryType::Regular, 2), b"ok".to_vec()),
            (header(name, tar::EntryType::Regular, 4), b"evil".to_vec()),
        ]);
        let error = refused(t.unpack(&bytes, Limits::default()));
        assert!(
            matches!(error, ArchiveError::Refused { .. }),
            "{}: {error}",
            String::from_utf8_lossy(name)
        );
        t.outside_untouched();
    }
}

#[test]
fn links_devices_and_fifos_are_refused() {
    for kind in [
        tar::EntryType::Symlink,
        tar::EntryType::Link,
        tar::EntryType::Char,
        tar::EntryType::Block,
        tar::EntryType::Fifo,
        tar::EntryType::GNUSparse,
    ] {
        let t = Target::new();
        let mut link = header(b"escape", kind, 0);
        if matches!(kind, tar::EntryType::Symlink | tar::EntryType::Link) {
            link.set_link_name("../victim").unwrap();
            link.set_cksum();
        }
        // A link first, then a file written "through" it: neither may reach the victim.
        let bytes = lz4_tar(vec![
            (link, Vec::new()),
            (
                header(b"escape", tar::EntryType::Regular, 4),
                b"evil".to_vec(),
            ),
        ]);
        let error = refused(t.unpack(&bytes, Limits::default()));
        // The tar reader itself rejects the sparse header it cannot parse.
        assert!(
            matches!(error, ArchiveError::Refused { .. }) || kind == tar::EntryType::GNUSparse,
            "{kind:?}: {error}"
        );
        t.outside_untouched();
        t.only_files_and_dirs();
    }
}

#[test]
fn a_bomb_stops_at_the_byte_limit() {
    let t = Target::new();
    let limits = Limits {
        max_entries: 1000,
        max_bytes: 1024 * 1024,
    };
    // 8 MiB of zeros compress to a few KiB: the limit counts what unpacking writes.
    let bomb = vec![0u8; 8 * 1024 * 1024];
    let bytes = lz4_tar(vec![(
        header(b"zeros", tar::EntryType::Regular, bomb.len() as u64),
        bomb,
    )]);
    assert!(bytes.len() < 100_000, "{} bytes", bytes.len());
    assert!(matches!(
        refused(t.unpack(&bytes, limits)),
        ArchiveError::TooLarge(_)
    ));
    // Many files that are each under the limit, together over it.
    let t = Target::new();
    let files = (0..8)
        .map(|i| {
            let name = format!("f{i}");
            (
                header(name.as_bytes(), tar::EntryType::Regular, 200_000),
                vec![1u8; 200_000],
            )
        })
        .collect();
    assert!(matches!(
        refused(t.unpack(&lz4_tar(files), limits)),
        ArchiveError::TooLarge(_)
    ));
    t.outside_untouched();
}

#[test]
fn a_header_claiming_more_than_the_limit_is_refused_before_any_data() {
    let t = Target::new();
    // A header saying 1 TiB, followed by nothing.
    let raw = header(b"huge", tar::EntryType::Regular, 1 << 40);
    let mut tar_bytes = raw.as_bytes().to_vec();
    tar_bytes.extend_from_slice(&[0u8; 1024]);
    let mut encoder = lz4_flex::frame::FrameEncoder::new(Vec::new());
    encoder.write_all(&tar_bytes).unwrap();
    let bytes = encoder.finish().unwrap();
    assert!(matches!(
        refused(t.unpack(&bytes, Limits::default())),
        ArchiveError::TooLarge(_)
    ));
    assert!(!t.parent.path().join("profile/huge").exists());
}

#[test]
fn too_many_entries_are_refused() {
    let t = Target::new();
    let files = (0..20)
        .map(|i| {
            (
                header(format!("f{i}").as_bytes(), tar::EntryType::Regular, 1),
                vec![b'x'],
            )
        })
        .collect();
    let limits = Limits {
        max_entries: 10,
        max_bytes: u64::MAX,
    };
    assert!(matches!(
        refused(t.unpack(&lz4_tar(files), limits)),
        ArchiveError::TooManyEntries(10)
    ));
}

#[test]
fn a_huge_gnu_long_name_does_not_fill_memory() {
    let t = Target::new();
    // A GNU long-name record of 16 MiB: the tar reader would hold it whole in memory.
    let size = 16 * 1024 * 1024;
    let mut long = tar::Header::new_gnu();
    long.as_gnu_mut().unwrap().name[..13].copy_from_slice(b"././@LongLink");
    long.set_entry_type(tar::EntryType::GNULongName);
    long.set_size(size);
    long.set_cksum();
    let bytes = lz4_tar(vec![
        (long, vec![b'a'; size as usize]),
        (header(b"x", tar::EntryType::Regular, 1), vec![b'x']),
    ]);
    let error = refused(t.unpack(&bytes, Limits::default()));
    assert!(error.to_string().contains("limits"), "{error}");
    assert!(size > HEADER_BUDGET);
}

#[test]
fn garbage_and_truncated_archives_are_errors_not_panics() {
    let t = Target::new();
    assert!(
        t.unpack(b"not an lz4 frame at all", Limits::default())
            .is_err()
    );
    let good = lz4_tar(vec![(
        header(b"f", tar::EntryType::Regular, 5000),
        vec![7u8; 5000],
    )]);
    // Cut inside the file's data. (lz4_flex ends quietly at some cuts between blocks; the
    // encryption's tag is what catches a truncated download.)
    let t = Target::new();
    assert!(
        t.unpack(&good[..good.len() / 2], Limits::default())
            .is_err()
    );
    // Cut right after the frame's magic number: an empty stream, so an empty profile.
    let t = Target::new();
    let stats = t.unpack(&good[..4], Limits::default()).unwrap();
    assert_eq!(stats.files + stats.dirs, 0);
}
