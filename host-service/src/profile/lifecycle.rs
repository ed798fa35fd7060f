//! When profiles move: loaded during the spin-up, saved at teardown.
//!
//! **Load** (the original's `loadUserConfigs`). [`Profiles::start_load`] runs as soon as the
//! mandelbox's directories exist, before the client's token is known: it predicts the archive
//! (the newest key under the user's prefix) and streams it into a file. Once the json_transport
//! request brings the token, [`Profiles::finish_load`] corrects the prediction (the key with this
//! token's hash wins), refuses a key of another token, skips everything for a new token, and
//! decrypts and unpacks into a staging directory the mandelbox cannot see, then moves the result
//! into the profile directory. Every failure — a wrong token, a corrupt or missing archive, a
//! bomb, S3 down — ends with the empty profile the mandelbox already has and one log line; the
//! spin-up goes on.
//!
//! **Save** (`BackupUserConfigs`). At teardown, after the container is gone and before its files
//! are, [`Profiles::save`] packs and encrypts the profile into an unlinked temporary file and
//! uploads it to the token's key, retrying with backoff, all within `save_timeout`. A profile
//! that could not be read at load (S3 unavailable) is not saved: an empty profile must not
//! become the user's newest version. The bucket is versioned, so every earlier save stays.

use std::collections::HashMap;
use std::io::{BufReader, BufWriter, Seek as _, SeekFrom, Write as _};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use dbclient::types::{Mandelbox, MandelboxId, UserId};
use edge::backoff::Backoff;
use logger::Secret;
use nix::fcntl::{OFlag, openat, renameat};
use nix::sys::stat::{Mode, mkdirat};
use nix::unistd::{UnlinkatFlags, unlinkat};
use prometheus::IntCounterVec;
use tokio_util::task::AbortOnDropHandle;

use super::archive::{self, Limits};
use super::browser_data::BrowserData;
use super::crypto;
use super::store::{Store, StoreConfig, StoreError};
use super::{Keys, MIN_TOKEN_LEN, token_hash};
use crate::mappings::{self, MandelboxDirs};

/// Upload retries: 500 ms doubling to 5 s with jitter (S3's 503 "slow down" wants spreading);
/// the overall deadline is the configured save timeout.
const SAVE_RETRY: Backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(5))
    .with_jitter(edge::backoff::Jitter::Equal);

/// How profiles are stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileConfig {
    pub store: StoreConfig,
    pub limits: Limits,
    /// The largest encrypted archive downloaded.
    pub max_archive_bytes: u64,
    /// A whole save (pack, encrypt, upload with its retries). Below the 30 s a drain waits for
    /// stopped mandelboxes, so a save never holds a drain past its deadline.
    pub save_timeout: Duration,
}

/// What the client's request says about its profile.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProfileRequest {
    /// `config_encryption_token`.
    pub token: Option<Secret<String>>,
    /// `is_new_config_encryption_token`: start from an empty profile.
    pub is_new_token: bool,
    /// `cookies`, `bookmarks`, `extensions`.
    pub browser: BrowserData,
}

/// How a load ended. Every case leaves a usable (possibly empty) profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadOutcome {
    /// The row names no user.
    NoUser,
    /// The client said the token is new.
    Fresh,
    /// Nothing saved yet.
    NoArchive,
    Loaded {
        key: String,
        files: u64,
        bytes: u64,
    },
    /// The archive was refused (wrong token, corrupt, too large, hostile) or the token was.
    Empty {
        reason: String,
    },
    /// S3 could not be asked; the profile will not be saved over.
    Unavailable {
        reason: String,
    },
}

/// How a save ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SaveOutcome {
    /// No load registered a save for this mandelbox (no user, no usable token, S3 was down).
    NotLoaded,
    Saved {
        key: String,
        bytes: u64,
        version_id: Option<String>,
    },
    Failed {
        reason: String,
    },
}

/// What a save needs, kept from the load.
struct Ticket {
    keys: Keys,
    token: Secret<String>,
    token_hash: String,
}

/// The profiles of this host's mandelboxes.
pub struct Profiles {
    store: Store,
    env: String,
    config: ProfileConfig,
    /// `profile_failures_total{operation}`.
    failures: IntCounterVec,
    tickets: Mutex<HashMap<MandelboxId, Ticket>>,
}

impl std::fmt::Debug for Profiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Profiles")
            .field("bucket", &self.store.bucket())
            .field("env", &self.env)
            .finish_non_exhaustive()
    }
}

/// The prediction's download.
struct Prefetched {
    key: String,
    file: std::fs::File,
    len: u64,
}

/// A load under way (see [`Profiles::start_load`]); dropping it cancels the download.
pub struct PendingLoad {
    dirs: MandelboxDirs,
    user: Option<String>,
    app: String,
    prefetch: Option<AbortOnDropHandle<Result<Option<Prefetched>, StoreError>>>,
}

impl std::fmt::Debug for PendingLoad {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingLoad")
            .field("mandelbox.id", &self.dirs.id())
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
enum LoadError {
    #[error("{0}")]
    Crypto(#[from] crypto::CryptoError),
    #[error("{0}")]
    Archive(#[from] archive::ArchiveError),
    #[error("{0}")]
    Files(#[from] mappings::MappingError),
    #[error("{action}: {source}")]
    Io {
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
}

fn io(action: &'static str) -> impl FnOnce(std::io::Error) -> LoadError {
    move |source| LoadError::Io { action, source }
}

impl Profiles {
    pub fn new(store: Store, env: &str, config: ProfileConfig, failures: IntCounterVec) -> Self {
        Self {
            store,
            env: env.to_owned(),
            config,
            failures,
            tickets: Mutex::new(HashMap::new()),
        }
    }

    /// Connects to the configured bucket.
    pub async fn connect(config: ProfileConfig, env: &str, failures: IntCounterVec) -> Self {
        let store = Store::connect(&config.store).await;
        Self::new(store, env, config, failures)
    }

    fn lock_tickets(&self) -> std::sync::MutexGuard<'_, HashMap<MandelboxId, Ticket>> {
        match self.tickets.lock() {
            Ok(t) => t,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Starts predicting and downloading `user`'s archive for `app` (the directories exist).
    pub fn start_load(
        &self,
        dirs: &MandelboxDirs,
        user: Option<&UserId>,
        app: &str,
    ) -> PendingLoad {
        let user = user.map(|u| u.to_string());
        let prefetch = user.as_ref().map(|user| {
            let store = self.store.clone();
            let prefix = Keys::new(user, &self.env, app, "").prefix;
            let (dirs, limit) = (dirs.clone(), self.config.max_archive_bytes);
            AbortOnDropHandle::new(tokio::spawn(async move {
                let Some(key) = store.newest_archive(&prefix).await? else {
                    return Ok(None);
                };
                download(&store, &dirs, &key, limit).await
            }))
        });
        PendingLoad {
            dirs: dirs.clone(),
            user,
            app: app.to_owned(),
            prefetch,
        }
    }

    /// Finishes a load once the client's request is in; logs one line saying how it ended.
    pub async fn finish_load(&self, pending: PendingLoad, request: &ProfileRequest) -> LoadOutcome {
        let id = pending.dirs.id();
        let outcome = self.load(pending, request).await;
        match &outcome {
            LoadOutcome::Empty { reason } | LoadOutcome::Unavailable { reason } => {
                self.failures.with_label_values(&["load"]).inc();
                tracing::warn!(mandelbox.id = %id, reason, ?outcome, "profile not loaded: the mandelbox starts with an empty profile");
            }
            _ => tracing::info!(mandelbox.id = %id, ?outcome, "profile ready"),
        }
        outcome
    }

    async fn load(&self, pending: PendingLoad, request: &ProfileRequest) -> LoadOutcome {
        let PendingLoad {
            dirs,
            user,
            app,
            prefetch,
        } = pending;
        let (Some(user), Some(prefetch)) = (user, prefetch) else {
            return LoadOutcome::NoUser;
        };
        let token = match request.token.as_ref().map(|t| t.expose().as_str()) {
            None | Some("") => {
                return LoadOutcome::Empty {
                    reason: "the request carried no config_encryption_token".into(),
                };
            }
            Some(t) if t.len() < MIN_TOKEN_LEN => {
                return LoadOutcome::Empty {
                    reason: format!("config_encryption_token shorter than {MIN_TOKEN_LEN}"),
                };
            }
            Some(t) => t.to_owned(),
        };
        let hash = token_hash(&token);
        let keys = Keys::new(&user, &self.env, &app, &hash);
        let ticket = Ticket {
            keys: keys.clone(),
            token: Secret::new(token.clone()),
            token_hash: hash.clone(),
        };
        self.lock_tickets().insert(dirs.id(), ticket);
        if request.is_new_token {
            return LoadOutcome::Fresh;
        }
        let unavailable = |error: StoreError| {
            self.lock_tickets().remove(&dirs.id());
            LoadOutcome::Unavailable {
                reason: error.to_string(),
            }
        };
        let prefetched = match prefetch.await {
            Ok(Ok(prefetched)) => prefetched,
            Ok(Err(error @ StoreError::TooLarge { .. })) => {
                return LoadOutcome::Empty {
                    reason: error.to_string(),
                };
            }
            Ok(Err(error)) => return unavailable(error),
            Err(join) => {
                return unavailable(StoreError::S3 {
                    operation: "prefetch",
                    key: keys.prefix.clone(),
                    message: join.to_string(),
                });
            }
        };
        let predicted = prefetched.as_ref().map(|p| p.key.clone());
        // The original's correction: the prediction if it names this token, else this token's
        // key if it exists, else the prediction.
        let chosen = match &predicted {
            Some(key) if key.contains(&hash) => Some(key.clone()),
            // The listing covered `<prefix>/`, the hashed key's folder too: a user with no
            // archive at all (every new user) costs no second request.
            None => None,
            Some(_) => match self.store.exists(&keys.hashed).await {
                Ok(true) => Some(keys.hashed.clone()),
                Ok(false) => predicted.clone(),
                Err(error) => return unavailable(error),
            },
        };
        let Some(chosen) = chosen else {
            return LoadOutcome::NoArchive;
        };
        if !keys.is_acceptable(&chosen) {
            return LoadOutcome::Empty {
                reason: format!("the newest archive {chosen} was saved with another token"),
            };
        }
        let file = match prefetched {
            Some(p) if p.key == chosen => p,
            _ => match download(&self.store, &dirs, &chosen, self.config.max_archive_bytes).await {
                Ok(Some(p)) => p,
                Ok(None) => return LoadOutcome::NoArchive,
                Err(error @ StoreError::TooLarge { .. }) => {
                    return LoadOutcome::Empty {
                        reason: error.to_string(),
                    };
                }
                Err(error) => return unavailable(error),
            },
        };
        let limits = self.config.limits;
        let unpacked = tokio::task::spawn_blocking(move || {
            decrypt_into_profile(&dirs, file.file, file.len, token.as_bytes(), limits)
        })
        .await;
        match unpacked {
            Ok(Ok(stats)) => LoadOutcome::Loaded {
                key: chosen,
                files: stats.files,
                bytes: stats.bytes,
            },
            Ok(Err(error)) => LoadOutcome::Empty {
                reason: format!("{chosen}: {error}"),
            },
            Err(join) => LoadOutcome::Empty {
                reason: join.to_string(),
            },
        }
    }

    /// Drops what a load registered for saving: a load cut short (it took too long) must not
    /// have its partial or empty profile saved over the user's.
    pub fn forget(&self, id: MandelboxId) {
        self.lock_tickets().remove(&id);
    }

    /// Saves the profile of a mandelbox whose load registered a save; logs how it ended.
    pub async fn save(&self, dirs: &MandelboxDirs) -> SaveOutcome {
        let Some(ticket) = self.lock_tickets().remove(&dirs.id()) else {
            return SaveOutcome::NotLoaded;
        };
        let timeout = self.config.save_timeout;
        let outcome = match tokio::time::timeout(timeout, self.upload(dirs, &ticket, timeout)).await
        {
            Ok(outcome) => outcome,
            Err(_) => SaveOutcome::Failed {
                reason: format!("not done within {timeout:?}"),
            },
        };
        match &outcome {
            SaveOutcome::Failed { reason } => {
                self.failures.with_label_values(&["save"]).inc();
                tracing::warn!(mandelbox.id = %dirs.id(), token.hash = ticket.token_hash, key = ticket.keys.hashed, reason, "profile not saved");
            }
            SaveOutcome::Saved {
                version_id: None, ..
            } => {
                tracing::warn!(mandelbox.id = %dirs.id(), ?outcome, "profile saved, but the bucket gave no version id: is versioning on?")
            }
            _ => tracing::info!(mandelbox.id = %dirs.id(), ?outcome, "profile saved"),
        }
        outcome
    }

    async fn upload(
        &self,
        dirs: &MandelboxDirs,
        ticket: &Ticket,
        deadline: Duration,
    ) -> SaveOutcome {
        let (dirs_owned, token, limits) = (dirs.clone(), ticket.token.clone(), self.config.limits);
        let packed = tokio::task::spawn_blocking(move || {
            pack_profile(&dirs_owned, token.expose().as_bytes(), limits)
        })
        .await;
        let (file, len) = match packed {
            Ok(Ok(packed)) => packed,
            Ok(Err(error)) => {
                return SaveOutcome::Failed {
                    reason: error.to_string(),
                };
            }
            Err(join) => {
                return SaveOutcome::Failed {
                    reason: join.to_string(),
                };
            }
        };
        let key = &ticket.keys.hashed;
        let mut retries = SAVE_RETRY.with_deadline(deadline).start();
        loop {
            let attempt = file
                .try_clone()
                .and_then(|mut f| f.seek(SeekFrom::Start(0)).map(|_| f));
            let result = match attempt {
                Ok(f) => {
                    self.store
                        .upload(key, tokio::fs::File::from_std(f), len)
                        .await
                }
                Err(source) => Err(StoreError::Io {
                    action: "reopen the archive for",
                    key: key.clone(),
                    source,
                }),
            };
            match result {
                Ok(version_id) => {
                    return SaveOutcome::Saved {
                        key: key.clone(),
                        bytes: len,
                        version_id,
                    };
                }
                Err(error) => match retries.next_delay() {
                    Some(delay) => {
                        tracing::debug!(%error, ?delay, "profile upload failed; retrying");
                        tokio::time::sleep(delay).await;
                    }
                    None => {
                        return SaveOutcome::Failed {
                            reason: error.to_string(),
                        };
                    }
                },
            }
        }
    }
}

/// `<id>/userConfigs`, the host's own directory beside the profile.
fn open_parent(dirs: &MandelboxDirs) -> Result<OwnedFd, mappings::MappingError> {
    mappings::open_dir_beneath(dirs.root(), &dirs.user_configs_parent_relative())
}

/// A temporary file in the host's own directory beside the profile, created exclusively without
/// following a link and unlinked at once: it vanishes with its last descriptor.
fn anonymous_file(dirs: &MandelboxDirs, what: &str) -> Result<std::fs::File, LoadError> {
    let parent = open_parent(dirs)?;
    let name = format!(".profile-{what}-{:016x}", rand::random::<u64>());
    let fd = openat(
        &parent,
        name.as_str(),
        OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o600),
    )
    .map_err(|e| io("create a temporary file")(e.into()))?;
    unlinkat(&parent, name.as_str(), UnlinkatFlags::NoRemoveDir)
        .map_err(|e| io("unlink a temporary file")(e.into()))?;
    Ok(std::fs::File::from(fd))
}

async fn download(
    store: &Store,
    dirs: &MandelboxDirs,
    key: &str,
    limit: u64,
) -> Result<Option<Prefetched>, StoreError> {
    let file = anonymous_file(dirs, "download").map_err(|e| StoreError::Io {
        action: "prepare the download of",
        key: key.to_owned(),
        source: std::io::Error::other(e.to_string()),
    })?;
    let mut writer =
        tokio::fs::File::from_std(file.try_clone().map_err(|source| StoreError::Io {
            action: "prepare the download of",
            key: key.to_owned(),
            source,
        })?);
    Ok(store
        .download(key, &mut writer, limit)
        .await?
        .map(|len| Prefetched {
            key: key.to_owned(),
            file,
            len,
        }))
}

/// Decrypts `file` (authenticated first, then streamed) and unpacks it into a staging directory
/// beside the profile, then moves what it holds into the profile.
fn decrypt_into_profile(
    dirs: &MandelboxDirs,
    mut file: std::fs::File,
    len: u64,
    token: &[u8],
    limits: Limits,
) -> Result<archive::UnpackStats, LoadError> {
    file.seek(SeekFrom::Start(0))
        .map_err(io("rewind the download"))?;
    let mut reader = BufReader::new(&file);
    let header = crypto::read_header(&mut reader, len)?;
    let key = crypto::derive_key(token, &header.salt)?;
    crypto::authenticate(&mut reader, len, &key, &header)?;
    drop(reader);
    file.seek(SeekFrom::Start(crypto::HEADER_LEN as u64))
        .map_err(io("rewind the download"))?;
    let plaintext = crypto::Decryptor::new(BufReader::new(file), len, &key, &header);

    let parent = open_parent(dirs)?;
    let staging_name = format!(".profile-staging-{:016x}", rand::random::<u64>());
    mkdirat(
        &parent,
        staging_name.as_str(),
        Mode::from_bits_truncate(0o700),
    )
    .map_err(|e| io("create the staging directory")(e.into()))?;
    let staging_path: PathBuf = dirs
        .root()
        .join(dirs.user_configs_parent_relative())
        .join(&staging_name);
    let result = (|| {
        let staging = openat(
            &parent,
            staging_name.as_str(),
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| io("open the staging directory")(e.into()))?;
        let stats = archive::unpack(plaintext, &staging, limits, dirs.owner())?;
        let profile = mappings::open_dir_beneath(dirs.root(), &dirs.user_configs_relative())?;
        let names: Vec<_> = nix::dir::Dir::openat(&staging, ".", OFlag::O_RDONLY, Mode::empty())
            .map_err(|e| io("list the staging directory")(e.into()))?
            .into_iter()
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_owned())
            .filter(|n| n.as_bytes() != b"." && n.as_bytes() != b"..")
            .collect();
        for name in names {
            // Replaces a link the mandelbox planted under the name; never follows it.
            renameat(&staging, name.as_c_str(), &profile, name.as_c_str())
                .map_err(|e| io("move into the profile")(e.into()))?;
        }
        Ok(stats)
    })();
    // The staging directory is the host's own: nothing in it is followed by removal.
    let _ = std::fs::remove_dir_all(&staging_path);
    result
}

/// Packs and encrypts the profile into an anonymous file; returns it and its length.
fn pack_profile(
    dirs: &MandelboxDirs,
    token: &[u8],
    limits: Limits,
) -> Result<(std::fs::File, u64), LoadError> {
    let profile = mappings::open_dir_beneath(dirs.root(), &dirs.user_configs_relative())?;
    let file = anonymous_file(dirs, "upload")?;
    let header = crypto::Header::random();
    let key = crypto::derive_key(token, &header.salt)?;
    let writer = BufWriter::new(file.try_clone().map_err(io("open the archive"))?);
    let encryptor = crypto::Encryptor::new(writer, &key, header)?;
    let (encryptor, _stats) = archive::pack(profile, encryptor, limits)?;
    let mut writer = encryptor.finish()?;
    writer.flush().map_err(io("write the archive"))?;
    drop(writer);
    let len = file.metadata().map_err(io("measure the archive"))?.len();
    Ok((file, len))
}

/// Teardown's step, before the files go: saves the profile (see [`Profiles::save`]).
pub async fn save(profiles: Option<&Profiles>, dirs: &MandelboxDirs) {
    if let Some(profiles) = profiles {
        profiles.save(dirs).await;
    }
}

/// The spin-up's first step for the profile, once the directories exist: starts the download.
pub fn start(
    profiles: Option<&Profiles>,
    dirs: &MandelboxDirs,
    row: &Mandelbox,
) -> Option<PendingLoad> {
    profiles.map(|p| p.start_load(dirs, row.user_id.as_ref(), &row.app))
}

/// The spin-up's second step, with the client's request: the profile loaded (within `timeout`;
/// a load cut short is not saved later) and the initial browser data written. Never fails: what
/// goes wrong is logged and counted, and the mandelbox gets an empty profile.
pub async fn put_in_place(
    profiles: Option<&Profiles>,
    pending: Option<PendingLoad>,
    dirs: &MandelboxDirs,
    request: &ProfileRequest,
    timeout: Duration,
) {
    if let (Some(profiles), Some(pending)) = (profiles, pending)
        && tokio::time::timeout(timeout, profiles.finish_load(pending, request))
            .await
            .is_err()
    {
        profiles.forget(dirs.id());
        profiles.failures.with_label_values(&["load"]).inc();
        tracing::warn!(
            mandelbox.id = %dirs.id(),
            ?timeout,
            "profile not loaded in time: the mandelbox starts with an empty profile, which is not saved"
        );
    }
    if let Err(error) = super::browser_data::write(dirs, &request.browser).await {
        // The original only logged this too.
        tracing::warn!(mandelbox.id = %dirs.id(), %error, "cannot write the initial browser data");
    }
}
