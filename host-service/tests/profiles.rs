//! Users' profiles through moto's S3 (a real S3 server, not a mock): what one session saves the
//! next session of the same user and token loads; another user, a new token or another token
//! start empty; a legacy key is read; a corrupt, hostile or unreadable archive gives an empty
//! profile and a counted failure, never an error to the spin-up; an unversioned bucket or an
//! unreachable S3 is not a crash.
//!
//! Needs moto in the project's virtualenv (`make setup`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_s3::primitives::ByteStream;
use dbclient::types::{MandelboxId, UserId};
use devstack::moto::Moto;
use host_service::mappings::MandelboxDirs;
use host_service::ownership::Owner;
use host_service::profile::archive::Limits;
use host_service::profile::lifecycle::ProfileRequest;
use host_service::profile::store::{Store, StoreConfig};
use host_service::profile::{
    Keys, LoadOutcome, ProfileConfig, Profiles, SaveOutcome, crypto, token_hash,
};
use logger::Secret;
use prometheus::{IntCounterVec, Opts};

const TOKEN: &str = "alice-config-encryption-token";
const OTHER_TOKEN: &str = "alice-second-device-token";
const ENV: &str = "localdevwithdb";
const APP: &str = "browsers/chrome";

struct S3 {
    moto: Moto,
    client: aws_sdk_s3::Client,
}

impl S3 {
    async fn start() -> Self {
        let bin = PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../.venv/bin/moto_server"
        ));
        let moto = Moto::start(&bin).await.expect("moto starts (make setup)");
        let config = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .credentials_provider(Credentials::new("test", "test", None, None, "test"))
            .endpoint_url(moto.endpoint())
            .force_path_style(true)
            .build();
        Self {
            moto,
            client: aws_sdk_s3::Client::from_conf(config),
        }
    }

    async fn bucket(&self, versioned: bool) -> String {
        let name = format!(
            "profiles-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        if versioned {
            // As `make run` prepares it.
            devstack::moto::create_profile_bucket(&self.moto.endpoint(), &name)
                .await
                .unwrap();
        } else {
            self.client
                .create_bucket()
                .bucket(&name)
                .send()
                .await
                .unwrap();
        }
        name
    }

    fn profiles(&self, bucket: &str) -> (Profiles, IntCounterVec) {
        let failures =
            IntCounterVec::new(Opts::new("profile_failures_total", "test"), &["operation"])
                .unwrap();
        let config = ProfileConfig {
            store: StoreConfig {
                bucket: bucket.to_owned(),
                region: "us-east-1".into(),
                endpoint: None,
            },
            limits: Limits::default(),
            max_archive_bytes: 64 * 1024 * 1024,
            save_timeout: Duration::from_secs(5),
        };
        let store = Store::from_client(self.client.clone(), bucket);
        (
            Profiles::new(store, ENV, config, failures.clone()),
            failures,
        )
    }

    async fn put(&self, bucket: &str, key: &str, body: Vec<u8>) {
        self.client
            .put_object()
            .bucket(bucket)
            .key(key)
            .body(ByteStream::from(body))
            .send()
            .await
            .unwrap();
    }
}

/// The mandelbox image's user in these tests (they run as root, as the host does).
const IMAGE_USER: Owner = Owner::new(4242, 4343);

fn request(token: &str, is_new_token: bool) -> ProfileRequest {
    ProfileRequest {
        token: Some(Secret::new(token.to_owned())),
        is_new_token,
        ..ProfileRequest::default()
    }
}

/// One session's spin-up side: its directories, then the load.
async fn session(
    profiles: &Profiles,
    root: &Path,
    user: &str,
    request: &ProfileRequest,
) -> (MandelboxDirs, LoadOutcome) {
    let dirs = MandelboxDirs::new(root, MandelboxId::random()).owned_by(IMAGE_USER);
    dirs.create("1").await.unwrap();
    let user = UserId::new(user).unwrap();
    let pending = profiles.start_load(&dirs, Some(&user), APP);
    let outcome = profiles.finish_load(pending, request).await;
    (dirs, outcome)
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

/// A Rust-made archive of `dir`.
fn archive_of(dir: &Path, token: &str) -> Vec<u8> {
    let header = crypto::Header::random();
    let key = crypto::derive_key(token.as_bytes(), &header.salt).unwrap();
    let fd = nix::fcntl::open(
        dir,
        nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_DIRECTORY,
        nix::sys::stat::Mode::empty(),
    )
    .unwrap();
    let encryptor = crypto::Encryptor::new(Vec::new(), &key, header).unwrap();
    let (encryptor, _) =
        host_service::profile::archive::pack(fd, encryptor, Limits::default()).unwrap();
    encryptor.finish().unwrap()
}

#[tokio::test]
async fn a_profile_saved_at_teardown_is_loaded_by_the_next_session_of_the_same_user_and_token() {
    let s3 = S3::start().await;
    let bucket = s3.bucket(true).await;
    let (profiles, failures) = s3.profiles(&bucket);
    let root = tempfile::tempdir().unwrap();

    // First session: nothing saved yet; the browser writes its profile; teardown saves it.
    let (first, outcome) = session(&profiles, root.path(), "alice", &request(TOKEN, false)).await;
    assert_eq!(outcome, LoadOutcome::NoArchive);
    let profile = first.user_configs();
    std::fs::create_dir_all(profile.join("Default")).unwrap();
    std::fs::write(profile.join("Default/Cookies"), b"logged in").unwrap();
    std::fs::write(profile.join("Default/Bookmarks"), vec![b'b'; 300_000]).unwrap();
    let saved = profiles.save(&first).await;
    let keys = Keys::new("alice", ENV, APP, &token_hash(TOKEN));
    let SaveOutcome::Saved {
        key, version_id, ..
    } = &saved
    else {
        panic!("not saved: {saved:?}");
    };
    assert_eq!(key, &keys.hashed);
    assert!(
        version_id.is_some(),
        "a versioned bucket gives a version id"
    );
    first.remove().await.unwrap();
    // The key is in S3 where the original put it.
    let head = s3
        .client
        .head_object()
        .bucket(&bucket)
        .key(&keys.hashed)
        .send()
        .await;
    assert!(head.is_ok(), "{}", keys.hashed);

    // Second session of the same user and token: the profile is back.
    let (second, outcome) = session(&profiles, root.path(), "alice", &request(TOKEN, false)).await;
    assert!(
        matches!(&outcome, LoadOutcome::Loaded { key, files: 2, .. } if key == &keys.hashed),
        "{outcome:?}"
    );
    let back = second.user_configs();
    assert_eq!(
        std::fs::read(back.join("Default/Cookies")).unwrap(),
        b"logged in"
    );
    assert_eq!(
        std::fs::read(back.join("Default/Bookmarks")).unwrap().len(),
        300_000
    );
    // All of it belongs to the image's user, whoever owned it when it was saved.
    for path in ["", "Default", "Default/Cookies", "Default/Bookmarks"] {
        use std::os::unix::fs::MetadataExt as _;
        let meta = std::fs::symlink_metadata(back.join(path)).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid()),
            (IMAGE_USER.uid(), IMAGE_USER.gid()),
            "{path:?}"
        );
    }
    // Nothing of the load is left beside the profile (downloads and staging are unlinked).
    assert_eq!(
        names(&second.base().join("userConfigs")),
        ["unpacked_configs"]
    );

    // Another user sees none of it.
    let (bob, outcome) = session(&profiles, root.path(), "bob", &request(TOKEN, false)).await;
    assert_eq!(outcome, LoadOutcome::NoArchive);
    assert!(names(&bob.user_configs()).is_empty());

    // The same user with a new token starts fresh.
    let (fresh, outcome) =
        session(&profiles, root.path(), "alice", &request(OTHER_TOKEN, true)).await;
    assert_eq!(outcome, LoadOutcome::Fresh);
    assert!(names(&fresh.user_configs()).is_empty());

    // The same user with another token that is not new: the newest archive is another
    // token's, so the profile stays empty (and the failure is counted).
    assert_eq!(failures.with_label_values(&["load"]).get(), 0);
    let (other, outcome) = session(
        &profiles,
        root.path(),
        "alice",
        &request(OTHER_TOKEN, false),
    )
    .await;
    assert!(matches!(outcome, LoadOutcome::Empty { .. }), "{outcome:?}");
    assert!(names(&other.user_configs()).is_empty());
    assert_eq!(failures.with_label_values(&["load"]).get(), 1);
    assert_eq!(failures.with_label_values(&["save"]).get(), 0);
}

#[tokio::test]
async fn a_legacy_key_is_loaded_and_a_short_or_missing_token_loads_nothing() {
    let s3 = S3::start().await;
    let bucket = s3.bucket(true).await;
    let (profiles, _) = s3.profiles(&bucket);
    let root = tempfile::tempdir().unwrap();
    let source = tempfile::tempdir().unwrap();
    std::fs::write(source.path().join("Preferences"), b"{}").unwrap();
    let keys = Keys::new("carol", ENV, APP, &token_hash(TOKEN));
    s3.put(&bucket, &keys.legacy, archive_of(source.path(), TOKEN))
        .await;

    let (dirs, outcome) = session(&profiles, root.path(), "carol", &request(TOKEN, false)).await;
    assert!(
        matches!(&outcome, LoadOutcome::Loaded { key, .. } if key == &keys.legacy),
        "{outcome:?}"
    );
    assert_eq!(names(&dirs.user_configs()), ["Preferences"]);

    for token in [None, Some("short")] {
        let request = ProfileRequest {
            token: token.map(|t| Secret::new(t.to_owned())),
            ..ProfileRequest::default()
        };
        let (dirs, outcome) = session(&profiles, root.path(), "carol", &request).await;
        assert!(matches!(outcome, LoadOutcome::Empty { .. }), "{outcome:?}");
        assert!(names(&dirs.user_configs()).is_empty());
        // Without a usable token nothing is saved.
        assert_eq!(profiles.save(&dirs).await, SaveOutcome::NotLoaded);
    }
}

#[tokio::test]
async fn a_corrupt_or_hostile_archive_gives_an_empty_profile() {
    let s3 = S3::start().await;
    let bucket = s3.bucket(true).await;
    let (profiles, failures) = s3.profiles(&bucket);
    let root = tempfile::tempdir().unwrap();
    let keys = Keys::new("dave", ENV, APP, &token_hash(TOKEN));

    // Not an archive at all.
    s3.put(&bucket, &keys.hashed, b"salt_garbage".to_vec())
        .await;
    let (dirs, outcome) = session(&profiles, root.path(), "dave", &request(TOKEN, false)).await;
    assert!(matches!(outcome, LoadOutcome::Empty { .. }), "{outcome:?}");
    assert!(names(&dirs.user_configs()).is_empty());

    // Properly encrypted with the user's token, but hostile inside: a name leaving the
    // directory after a harmless file.
    let mut tar = tar::Builder::new(lz4_flex::frame::FrameEncoder::new(Vec::new()));
    let mut fine = tar::Header::new_gnu();
    fine.set_size(2);
    fine.set_path("fine").unwrap();
    fine.set_cksum();
    tar.append(&fine, &b"ok"[..]).unwrap();
    let mut evil = tar::Header::new_gnu();
    evil.as_gnu_mut().unwrap().name[..12].copy_from_slice(b"../../victim");
    evil.set_size(4);
    evil.set_cksum();
    tar.append(&evil, &b"evil"[..]).unwrap();
    let plaintext = tar.into_inner().unwrap().finish().unwrap();
    let header = crypto::Header::random();
    let key = crypto::derive_key(TOKEN.as_bytes(), &header.salt).unwrap();
    let mut encryptor = crypto::Encryptor::new(Vec::new(), &key, header).unwrap();
    encryptor.write_all(&plaintext).unwrap();
    s3.put(&bucket, &keys.hashed, encryptor.finish().unwrap())
        .await;

    let (dirs, outcome) = session(&profiles, root.path(), "dave", &request(TOKEN, false)).await;
    assert!(matches!(outcome, LoadOutcome::Empty { .. }), "{outcome:?}");
    assert!(
        names(&dirs.user_configs()).is_empty(),
        "all or nothing: not even `fine`"
    );
    assert_eq!(
        names(&dirs.base().join("userConfigs")),
        ["unpacked_configs"]
    );
    assert!(!root.path().join("victim").exists());
    assert_eq!(failures.with_label_values(&["load"]).get(), 2);
}

#[tokio::test]
async fn an_unversioned_bucket_or_an_unreachable_bucket_is_not_a_crash() {
    let s3 = S3::start().await;
    let root = tempfile::tempdir().unwrap();

    // No versioning: saved, without a version id.
    let bucket = s3.bucket(false).await;
    let (profiles, _) = s3.profiles(&bucket);
    let (dirs, _) = session(&profiles, root.path(), "erin", &request(TOKEN, false)).await;
    std::fs::write(dirs.user_configs().join("x"), b"x").unwrap();
    let saved = profiles.save(&dirs).await;
    assert!(
        matches!(
            saved,
            SaveOutcome::Saved {
                version_id: None,
                ..
            }
        ),
        "{saved:?}"
    );

    // A bucket that does not exist: the load cannot ask S3, so the empty profile it leaves is
    // not saved over the user's.
    let (profiles, failures) = s3.profiles("no-such-bucket");
    let (dirs, outcome) = session(&profiles, root.path(), "erin", &request(TOKEN, false)).await;
    assert!(
        matches!(outcome, LoadOutcome::Unavailable { .. }),
        "{outcome:?}"
    );
    assert_eq!(profiles.save(&dirs).await, SaveOutcome::NotLoaded);
    // A new token needs no read, so its save is tried, retried until its deadline, and
    // counted as failed.
    let (dirs, outcome) = session(&profiles, root.path(), "erin", &request(TOKEN, true)).await;
    assert_eq!(outcome, LoadOutcome::Fresh);
    let saved = profiles.save(&dirs).await;
    assert!(matches!(saved, SaveOutcome::Failed { .. }), "{saved:?}");
    assert_eq!(failures.with_label_values(&["save"]).get(), 1);
    assert_eq!(failures.with_label_values(&["load"]).get(), 1);
}

#[tokio::test]
async fn a_load_cut_short_is_not_saved_over_the_users_profile() {
    let s3 = S3::start().await;
    let bucket = s3.bucket(true).await;
    let (profiles, failures) = s3.profiles(&bucket);
    let root = tempfile::tempdir().unwrap();
    let dirs = MandelboxDirs::new(root.path(), MandelboxId::random());
    dirs.create("1").await.unwrap();
    let user = UserId::new("frank").unwrap();
    let pending = profiles.start_load(&dirs, Some(&user), APP);
    let mut request = request(TOKEN, false);
    request.browser.cookies = Some("[]".into());
    host_service::profile::lifecycle::put_in_place(
        Some(&profiles),
        Some(pending),
        &dirs,
        &request,
        Duration::ZERO,
    )
    .await;
    assert_eq!(failures.with_label_values(&["load"]).get(), 1);
    assert_eq!(profiles.save(&dirs).await, SaveOutcome::NotLoaded);
    // The initial browser data is written all the same.
    let initial = std::fs::read_to_string(dirs.user_configs().join("user-initial-file")).unwrap();
    assert_eq!(initial, r#"{"cookiesJSON":"[]"}"#);
}
