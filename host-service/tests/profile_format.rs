//! The profile archive format against an independent implementation, both ways: archives made
//! by Python's `cryptography`, `argon2-cffi`, `lz4` and `tarfile`
//! (`devstack/python/profile_archive.py`, laid out as the original Go service wrote them) open
//! in Rust, and archives made in Rust open in Python.
//!
//! Needs the project's virtualenv (`make setup`: `.venv` with devstack/python/requirements.txt).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use host_service::profile::archive::{self, Limits};
use host_service::profile::crypto;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

const TOKEN: &str = "a-config-encryption-token-of-some-length";

fn python() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.venv/bin/python"))
}

fn script() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../devstack/python/profile_archive.py"
    ))
}

fn run_python(args: &[&str]) {
    let output = Command::new(python())
        .arg(script())
        .args(args)
        .output()
        .expect("the virtualenv's python runs (make setup)");
    assert!(
        output.status.success(),
        "profile_archive.py {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn open_dir(path: &Path) -> OwnedFd {
    nix::fcntl::open(path, OFlag::O_RDONLY | OFlag::O_DIRECTORY, Mode::empty()).unwrap()
}

/// A small browser profile: nested directories, an empty file, binary and larger contents.
fn write_profile(dir: &Path) {
    std::fs::create_dir_all(dir.join("Default/Local Storage/leveldb")).unwrap();
    std::fs::create_dir_all(dir.join("Default/Extensions")).unwrap();
    std::fs::write(dir.join("Default/Cookies"), b"SQLite format 3\0cookies").unwrap();
    std::fs::write(
        dir.join("Default/Preferences"),
        br#"{"homepage":"https://whist.com"}"#,
    )
    .unwrap();
    let blob: Vec<u8> = (0..700_000u32).map(|i| (i * 31 % 253) as u8).collect();
    std::fs::write(dir.join("Default/Local Storage/leveldb/000003.log"), blob).unwrap();
    std::fs::write(
        dir.join("imported-extensions.json"),
        br#"{"extensions":["abc"]}"#,
    )
    .unwrap();
    std::fs::write(dir.join("empty"), b"").unwrap();
    let long = "n".repeat(120);
    std::fs::write(
        dir.join("Default").join(&long),
        b"a name longer than 100 bytes",
    )
    .unwrap();
}

/// Every file and directory below `dir`, relative, with the file's contents.
fn tree(dir: &Path) -> BTreeMap<String, Option<Vec<u8>>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(current) = stack.pop() {
        for entry in std::fs::read_dir(&current).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            let name = path.strip_prefix(dir).unwrap().display().to_string();
            if entry.file_type().unwrap().is_dir() {
                out.insert(name, None);
                stack.push(path);
            } else {
                out.insert(name, Some(std::fs::read(&path).unwrap()));
            }
        }
    }
    out
}

#[test]
fn an_archive_made_by_python_opens_in_rust() {
    let work = tempfile::tempdir().unwrap();
    let source = work.path().join("source");
    write_profile(&source);
    let file = work.path().join("made-by-python.enc");
    run_python(&[
        "encrypt",
        TOKEN,
        source.to_str().unwrap(),
        file.to_str().unwrap(),
    ]);

    let bytes = std::fs::read(&file).unwrap();
    assert_eq!(&bytes[..5], b"salt_");
    assert_eq!(&bytes[21..27], b"nonce_");
    let plaintext = crypto::open(TOKEN.as_bytes(), &bytes).unwrap();
    let dest = work.path().join("dest");
    std::fs::create_dir(&dest).unwrap();
    let stats = archive::unpack(
        plaintext.as_slice(),
        &open_dir(&dest),
        Limits::default(),
        None,
    )
    .unwrap();
    assert_eq!(stats.files, 6);
    assert_eq!(tree(&dest), tree(&source));

    // The wrong token is told apart from the right one.
    assert!(matches!(
        crypto::open(b"another-token-entirely", &bytes),
        Err(crypto::CryptoError::Authentication)
    ));
}

#[test]
fn an_archive_made_by_rust_opens_in_python() {
    let work = tempfile::tempdir().unwrap();
    let source = work.path().join("source");
    write_profile(&source);
    let header = crypto::Header::random();
    let key = crypto::derive_key(TOKEN.as_bytes(), &header.salt).unwrap();
    let file = work.path().join("made-by-rust.enc");
    let out = std::fs::File::create(&file).unwrap();
    let encryptor = crypto::Encryptor::new(std::io::BufWriter::new(out), &key, header).unwrap();
    let (encryptor, stats) =
        archive::pack(open_dir(&source), encryptor, Limits::default()).unwrap();
    assert_eq!((stats.files, stats.dirs), (6, 4));
    encryptor.finish().unwrap().flush().unwrap();

    let dest = work.path().join("dest");
    std::fs::create_dir(&dest).unwrap();
    run_python(&[
        "decrypt",
        TOKEN,
        file.to_str().unwrap(),
        dest.to_str().unwrap(),
    ]);
    assert_eq!(tree(&dest), tree(&source));
}
