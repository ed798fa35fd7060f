//! The host service's configuration: flags with environment fallbacks, validated once into
//! [`Config`], and logged at start with secrets redacted.

use std::net::SocketAddr;
use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use logger::{AppEnv, LogArgs, Secret};

/// The git commit this binary was built from (`WHIST_COMMIT` at build time), checked against the
/// instance row's `client_sha` at registration.
pub const BUILD_COMMIT: &str = match option_env!("WHIST_COMMIT") {
    Some(c) => c,
    None => "dev",
};

#[derive(Debug, Clone, Parser)]
#[command(
    name = "whist-host-service",
    version,
    about = "Runs mandelboxes on this host: registers with the database, starts what is allocated here, drains on request"
)]
pub struct Args {
    /// Deployment environment: localdev, localdevwithdb, dev, staging or prod.
    #[arg(long, env = "APP_ENV")]
    pub app_env: AppEnv,
    /// Hasura's GraphQL URL (https outside local development). Not needed in localdev.
    #[arg(long, env = "HASURA_GRAPHQL_URL")]
    pub graphql_url: Option<String>,
    /// Hasura's admin secret.
    #[arg(long, env = "HASURA_ADMIN_SECRET", hide_env_values = true)]
    pub admin_secret: Option<Secret<String>>,
    /// IMDS endpoint override (local development); by default the SDK's chain.
    #[arg(long, env = "AWS_EC2_METADATA_SERVICE_ENDPOINT")]
    pub imds_endpoint: Option<String>,
    /// Docker Engine socket.
    #[arg(long, env = "DOCKER_SOCKET", default_value = crate::docker::DEFAULT_SOCKET)]
    pub docker_socket: PathBuf,
    /// Root of the mandelboxes' files on the host.
    #[arg(long, env = "WHIST_ROOT", default_value = "/whist")]
    pub root_dir: PathBuf,
    /// Host ports handed to mandelboxes, `FIRST-END` (end exclusive).
    #[arg(long, env = "WHIST_PORT_RANGE", default_value = "1025-49151", value_parser = parse_port_range)]
    pub port_range: Range<u16>,
    /// Mandelboxes per GPU.
    #[arg(long, env = "WHIST_MANDELBOXES_PER_GPU", default_value_t = crate::gpus::MAX_MANDELBOXES_PER_GPU)]
    pub mandelboxes_per_gpu: usize,
    /// CPUs each mandelbox may use (a CFS quota; the original gave relative shares only).
    #[arg(long, env = "WHIST_MANDELBOX_CPUS", default_value_t = 4.0)]
    pub mandelbox_cpus: f64,
    /// Capacity of a host without GPUs.
    #[arg(long, env = "WHIST_CPU_HOST_CAPACITY", default_value_t = 1)]
    pub cpu_host_capacity: usize,
    /// Use this many GPU slots instead of discovering GPUs (local development and tests: the
    /// index is only written to `gpu_index`).
    #[arg(long, env = "WHIST_GPU_OVERRIDE")]
    pub gpu_override: Option<usize>,
    /// Registry prefix of mandelbox images outside local development.
    #[arg(long, env = "WHIST_IMAGE_REGISTRY", default_value = "ghcr.io/whisthq")]
    pub image_registry: String,
    /// How long a spin-up waits for the client's json_transport request.
    #[arg(long, env = "WHIST_JSON_TRANSPORT_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub json_transport_timeout: Duration,
    /// How long a spin-up waits for the mandelbox's readiness marker.
    #[arg(long, env = "WHIST_READY_TIMEOUT", default_value = "20s", value_parser = parse_duration)]
    pub ready_timeout: Duration,
    /// Seconds the protocol inside waits for its client (`timeout` file; negative: forever).
    /// Default: 30, or -1 in local development.
    #[arg(long, env = "WHIST_PROTOCOL_TIMEOUT", allow_negative_numbers = true)]
    pub protocol_timeout: Option<i64>,
    /// Warm mandelboxes to keep created, started and waiting for a user (`WAITING` rows the
    /// scaling service claims at assignment); each holds one unit of capacity. `all` (the
    /// default): every unit no user holds; 0: none.
    #[arg(long, env = "WHIST_WARM_MANDELBOXES", default_value = "all", value_parser = parse_warm)]
    pub warm_mandelboxes: WarmTarget,
    /// How long a drain lets running mandelboxes finish before stopping them.
    #[arg(long, env = "WHIST_DRAIN_DEADLINE", default_value = "10m", value_parser = parse_duration)]
    pub drain_deadline: Duration,
    /// Grace a stopped mandelbox gets between SIGTERM and SIGKILL.
    #[arg(long, env = "WHIST_STOP_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub stop_grace: Duration,
    /// How often the warm pool looks whether its app's image tag names a new image; waiting
    /// boxes made from the old one are then replaced.
    #[arg(long, env = "WHIST_WARM_IMAGE_CHECK", default_value = "10s", value_parser = parse_duration)]
    pub warm_image_check: Duration,
    /// Power the machine off after a drain (`shutdown now`). Refused in local development.
    #[arg(long, env = "WHIST_POWEROFF", default_value_t = false)]
    pub poweroff: bool,
    /// Address of the operations endpoint (`/metrics`, `/healthz`, `/readyz`).
    #[arg(long, env = "WHIST_OPS_ADDR", default_value = "127.0.0.1:4679")]
    pub ops_addr: SocketAddr,
    /// Networks besides loopback whose peers may reach the operations endpoint, comma-separated
    /// `ADDRESS/PREFIX` (e.g. the VPC's, for a Prometheus scraper). Every other peer, a
    /// mandelbox included, is disconnected unread whatever `--ops-addr` binds. Name no network
    /// that holds containers.
    #[arg(long, env = "WHIST_OPS_ALLOW", value_delimiter = ',')]
    pub ops_allow: Vec<crate::ops::AllowedNet>,
    /// Address of the client-facing HTTPS endpoint (`PUT /json_transport`, `GET /healthz`).
    #[arg(
        long,
        env = "WHIST_JSON_TRANSPORT_ADDR",
        default_value = "0.0.0.0:4678"
    )]
    pub json_transport_addr: SocketAddr,
    /// Connections one client address may hold open on the json_transport endpoint (the
    /// scaling service's forwarder is one address: a host's few mandelboxes need a handful).
    #[arg(
        long,
        env = "WHIST_JSON_TRANSPORT_MAX_CONNECTIONS_PER_ADDRESS",
        default_value_t = crate::json_transport::server::DEFAULT_MAX_CONNECTIONS_PER_ADDRESS
    )]
    pub json_transport_max_connections_per_address: usize,
    /// Issuer (`iss`) of the users' access tokens; its JWKS verifies them. Default: the
    /// environment's Auth0 tenant; in local development none, which turns authentication off.
    #[arg(long, env = "WHIST_AUTH_ISSUER")]
    pub auth_issuer: Option<String>,
    /// Audience (`aud`) the users' access tokens must name.
    #[arg(long, env = "WHIST_AUTH_AUDIENCE", default_value = DEFAULT_AUTH_AUDIENCE)]
    pub auth_audience: String,
    /// Where the issuer's signing keys are. Default: `<issuer>.well-known/jwks.json`.
    #[arg(long, env = "WHIST_AUTH_JWKS_URL")]
    pub auth_jwks_url: Option<String>,
    /// Clock skew allowed on a token's `exp` and `nbf` (at most 5m).
    #[arg(long, env = "WHIST_AUTH_LEEWAY", default_value = "30s", value_parser = parse_duration)]
    pub auth_leeway: Duration,
    /// AppArmor profile for mandelboxes. Outside local development a mandelbox starts only under
    /// it (loaded at start if installed but not loaded); locally it is used when loaded.
    #[arg(
        long,
        env = "WHIST_APPARMOR_PROFILE",
        default_value = "mandelbox-apparmor-profile"
    )]
    pub apparmor_profile: String,
    /// Mount the mandelbox image's root file system read-only (what it writes goes to its binds
    /// and tmpfs mounts). `false` for an image that writes to its root at run time.
    #[arg(long, env = "WHIST_READ_ONLY_ROOTFS", default_value_t = true, action = clap::ArgAction::Set)]
    pub read_only_rootfs: bool,
    /// The numeric `UID:GID` the mandelbox image runs its browser as: the owner of the
    /// directories bound into a mandelbox and of the user's profile files (the original forced
    /// `ubuntu` and mode 0777).
    #[arg(long, env = "WHIST_MANDELBOX_USER", default_value_t = crate::ownership::Owner::IMAGE_DEFAULT)]
    pub mandelbox_user: crate::ownership::Owner,
    /// Run Docker's init as the container's PID 1. Default: on in local development (the test
    /// image needs it to stop promptly), off elsewhere (the real image runs systemd as PID 1).
    #[arg(long, env = "WHIST_CONTAINER_INIT")]
    pub container_init: Option<bool>,
    /// S3 bucket of the users' encrypted browser profiles (versioned; docs/operations.md).
    /// Unset: profiles are off and every session starts from an empty profile.
    #[arg(long, env = "WHIST_PROFILE_BUCKET")]
    pub profile_bucket: Option<String>,
    /// Region of the profile bucket's S3 client (the original's `us-east-1`).
    #[arg(long, env = "WHIST_PROFILE_REGION", default_value = "us-east-1")]
    pub profile_region: String,
    /// An S3 endpoint other than AWS's (moto in development), addressed path-style. The SDK's
    /// `AWS_ENDPOINT_URL` is honoured as well.
    #[arg(long, env = "WHIST_PROFILE_S3_ENDPOINT")]
    pub profile_s3_endpoint: Option<String>,
    /// Most bytes of file contents a profile may unpack to (or be saved with).
    #[arg(long, env = "WHIST_PROFILE_MAX_BYTES", default_value_t = 2 * 1024 * 1024 * 1024)]
    pub profile_max_bytes: u64,
    /// Most files and directories in a profile.
    #[arg(long, env = "WHIST_PROFILE_MAX_ENTRIES", default_value_t = 100_000)]
    pub profile_max_entries: u64,
    /// How long a teardown's profile save (pack, encrypt, upload and its retries) may take; at
    /// most 25 s, so that it fits in the 30 s a drain waits for stopped mandelboxes.
    #[arg(long, env = "WHIST_PROFILE_SAVE_TIMEOUT", default_value = "20s", value_parser = parse_duration)]
    pub profile_save_timeout: Duration,
    #[command(flatten)]
    pub log: LogArgs,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub app_env: AppEnv,
    /// `None` in localdev: no database, json_transport requests start mandelboxes by themselves.
    pub db: Option<dbclient::DbConfig>,
    pub imds_endpoint: Option<String>,
    pub docker_socket: PathBuf,
    pub root_dir: PathBuf,
    pub port_range: Range<u16>,
    pub mandelboxes_per_gpu: usize,
    /// CPU quota per mandelbox in billionths of a CPU.
    pub mandelbox_nano_cpus: u64,
    pub cpu_host_capacity: usize,
    pub gpu_override: Option<usize>,
    pub image_registry: String,
    pub json_transport_timeout: Duration,
    pub ready_timeout: Duration,
    pub protocol_timeout: i64,
    pub warm_mandelboxes: WarmTarget,
    pub drain_deadline: Duration,
    pub stop_grace: Duration,
    pub warm_image_check: Duration,
    pub poweroff: bool,
    pub ops_addr: SocketAddr,
    /// Networks besides loopback that may reach the operations endpoint.
    pub ops_allow: Vec<crate::ops::AllowedNet>,
    pub json_transport_addr: SocketAddr,
    pub json_transport_max_connections_per_address: usize,
    /// How json_transport requests are authenticated; `None` (local development only): not at all.
    pub auth: Option<crate::json_transport::AuthConfig>,
    pub apparmor_profile: String,
    pub read_only_rootfs: bool,
    pub mandelbox_user: crate::ownership::Owner,
    pub container_init: bool,
    pub commit: String,
    /// `None`: no bucket configured, profiles off.
    pub profiles: Option<crate::profile::ProfileConfig>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0} needs HASURA_GRAPHQL_URL (--graphql-url)")]
    MissingGraphqlUrl(AppEnv),
    #[error("{0} needs HASURA_ADMIN_SECRET (--admin-secret)")]
    MissingAdminSecret(AppEnv),
    #[error("{0} needs an https:// Hasura URL: the admin secret must not travel in the clear")]
    InsecureGraphqlUrl(AppEnv),
    #[error("invalid Hasura settings: {0}")]
    Db(#[from] dbclient::ConfigError),
    #[error("--poweroff is refused in {0}: it would switch off a developer's machine")]
    PoweroffInLocalDev(AppEnv),
    #[error("--mandelboxes-per-gpu must be at least 1")]
    ZeroPerGpu,
    #[error("--mandelbox-cpus must be between 0.01 and 1024, not {0}")]
    Cpus(f64),
    #[error("the port range {0:?} is too small for one mandelbox")]
    PortRangeTooSmall(Range<u16>),
    #[error("{what} {url:?} is not a valid URL")]
    AuthUrl { what: &'static str, url: String },
    #[error("{0} needs https:// token issuer and JWKS URLs")]
    InsecureAuthUrl(AppEnv),
    #[error("--auth-leeway must be at most {max:?}, not {leeway:?}")]
    AuthLeeway { leeway: Duration, max: Duration },
    #[error("--auth-audience must not be empty")]
    EmptyAudience,
    #[error("--profile-save-timeout must be between 1 s and {max:?}, not {timeout:?}")]
    ProfileSaveTimeout { timeout: Duration, max: Duration },
    #[error("--profile-s3-endpoint {0:?} is not a valid URL")]
    ProfileEndpoint(String),
    #[error("--warm-image-check must be at least {min:?}, not {every:?}")]
    WarmImageCheck { every: Duration, min: Duration },
}

/// The shortest `--warm-image-check`: two Docker calls per look.
pub const MIN_WARM_IMAGE_CHECK: Duration = Duration::from_millis(100);

/// The audience of Whist's Auth0 access tokens (reference §2.2).
pub const DEFAULT_AUTH_AUDIENCE: &str = "https://api.fractal.co";
/// A "small" leeway: larger would keep expired tokens useful for longer than clock skew needs.
const MAX_AUTH_LEEWAY: Duration = Duration::from_secs(300);

/// The environment's Auth0 tenant (reference §2.2); none locally, where authentication is off
/// unless an issuer is given.
pub fn default_auth_issuer(env: AppEnv) -> Option<&'static str> {
    match env {
        AppEnv::LocalDev | AppEnv::LocalDevWithDb => None,
        AppEnv::Dev => Some("https://fractal-dev.us.auth0.com/"),
        AppEnv::Staging => Some("https://fractal-staging.us.auth0.com/"),
        AppEnv::Prod => Some("https://auth.whist.com/"),
    }
}

impl Args {
    pub fn validate(self) -> Result<Config, ConfigError> {
        let env = self.app_env;
        let db = match env {
            AppEnv::LocalDev => None,
            _ => {
                let url = self
                    .graphql_url
                    .clone()
                    .ok_or(ConfigError::MissingGraphqlUrl(env))?;
                if !env.is_local() && !url.starts_with("https://") {
                    return Err(ConfigError::InsecureGraphqlUrl(env));
                }
                if !env.is_local() && self.admin_secret.is_none() {
                    return Err(ConfigError::MissingAdminSecret(env));
                }
                Some(dbclient::DbConfig::new(&url, self.admin_secret.clone())?)
            }
        };
        if self.poweroff && env.is_local() {
            return Err(ConfigError::PoweroffInLocalDev(env));
        }
        if self.mandelboxes_per_gpu == 0 {
            return Err(ConfigError::ZeroPerGpu);
        }
        if self.warm_image_check < MIN_WARM_IMAGE_CHECK {
            return Err(ConfigError::WarmImageCheck {
                every: self.warm_image_check,
                min: MIN_WARM_IMAGE_CHECK,
            });
        }
        if !(0.01..=1024.0).contains(&self.mandelbox_cpus) {
            return Err(ConfigError::Cpus(self.mandelbox_cpus));
        }
        if self.port_range.len() < crate::ports::MANDELBOX_PORTS.len() {
            return Err(ConfigError::PortRangeTooSmall(self.port_range));
        }
        let auth = self.auth_config(env)?;
        let profiles = self.profile_config()?;
        Ok(Config {
            app_env: env,
            db,
            imds_endpoint: self.imds_endpoint,
            docker_socket: self.docker_socket,
            root_dir: self.root_dir,
            port_range: self.port_range,
            mandelboxes_per_gpu: self.mandelboxes_per_gpu,
            mandelbox_nano_cpus: (self.mandelbox_cpus * 1e9).round() as u64,
            cpu_host_capacity: self.cpu_host_capacity,
            gpu_override: self.gpu_override,
            image_registry: self.image_registry.trim_end_matches('/').to_owned(),
            json_transport_timeout: self.json_transport_timeout,
            ready_timeout: self.ready_timeout,
            protocol_timeout: self
                .protocol_timeout
                .unwrap_or(if env.is_local() { -1 } else { 30 }),
            drain_deadline: self.drain_deadline,
            stop_grace: self.stop_grace,
            warm_image_check: self.warm_image_check,
            warm_mandelboxes: self.warm_mandelboxes,
            poweroff: self.poweroff,
            ops_addr: self.ops_addr,
            ops_allow: self.ops_allow,
            json_transport_addr: self.json_transport_addr,
            json_transport_max_connections_per_address: self
                .json_transport_max_connections_per_address,
            auth,
            apparmor_profile: self.apparmor_profile,
            read_only_rootfs: self.read_only_rootfs,
            mandelbox_user: self.mandelbox_user,
            container_init: self.container_init.unwrap_or(env.is_local()),
            commit: BUILD_COMMIT.to_owned(),
            profiles,
        })
    }

    fn profile_config(&self) -> Result<Option<crate::profile::ProfileConfig>, ConfigError> {
        let Some(bucket) = self.profile_bucket.clone().filter(|b| !b.is_empty()) else {
            return Ok(None);
        };
        let timeout = self.profile_save_timeout;
        if timeout < Duration::from_secs(1) || timeout > MAX_PROFILE_SAVE_TIMEOUT {
            return Err(ConfigError::ProfileSaveTimeout {
                timeout,
                max: MAX_PROFILE_SAVE_TIMEOUT,
            });
        }
        if let Some(url) = &self.profile_s3_endpoint
            && url::Url::parse(url).is_err()
        {
            return Err(ConfigError::ProfileEndpoint(url.clone()));
        }
        let limits = crate::profile::archive::Limits {
            max_entries: self.profile_max_entries,
            max_bytes: self.profile_max_bytes,
        };
        Ok(Some(crate::profile::ProfileConfig {
            store: crate::profile::store::StoreConfig {
                bucket,
                region: self.profile_region.clone(),
                endpoint: self.profile_s3_endpoint.clone(),
            },
            limits,
            // Encryption and LZ4 add little; the bound is the unpacked one plus slack.
            max_archive_bytes: limits.max_bytes.saturating_add(64 * 1024 * 1024),
            save_timeout: timeout,
        }))
    }
}

/// A save must end before the drain's 30 s wait for stopped mandelboxes does.
const MAX_PROFILE_SAVE_TIMEOUT: Duration = Duration::from_secs(25);

impl Args {
    /// Authentication of json_transport: on everywhere but in local development without an
    /// issuer; https only outside local development.
    fn auth_config(
        &self,
        env: AppEnv,
    ) -> Result<Option<crate::json_transport::AuthConfig>, ConfigError> {
        let Some(issuer) = self
            .auth_issuer
            .clone()
            .or_else(|| default_auth_issuer(env).map(str::to_owned))
        else {
            return Ok(None);
        };
        let bad = |what, url: &str| ConfigError::AuthUrl {
            what,
            url: url.to_owned(),
        };
        let issuer_url = url::Url::parse(&issuer).map_err(|_| bad("the token issuer", &issuer))?;
        let jwks_url = match &self.auth_jwks_url {
            Some(url) => url::Url::parse(url).map_err(|_| bad("the JWKS URL", url))?,
            None => {
                // `join` replaces the last segment of a base without a trailing slash.
                let mut base = issuer_url.clone();
                if !base.path().ends_with('/') {
                    base.set_path(&format!("{}/", base.path()));
                }
                base.join(".well-known/jwks.json")
                    .map_err(|_| bad("the token issuer", &issuer))?
            }
        };
        for url in [&issuer_url, &jwks_url] {
            if !matches!(url.scheme(), "https" | "http") {
                return Err(bad("the token issuer or JWKS URL", url.as_str()));
            }
            if !env.is_local() && url.scheme() != "https" {
                return Err(ConfigError::InsecureAuthUrl(env));
            }
        }
        if self.auth_audience.trim().is_empty() {
            return Err(ConfigError::EmptyAudience);
        }
        if self.auth_leeway > MAX_AUTH_LEEWAY {
            return Err(ConfigError::AuthLeeway {
                leeway: self.auth_leeway,
                max: MAX_AUTH_LEEWAY,
            });
        }
        Ok(Some(crate::json_transport::AuthConfig {
            issuer,
            audience: self.auth_audience.clone(),
            jwks_url,
            leeway: self.auth_leeway,
            min_refresh_interval: crate::json_transport::auth::DEFAULT_MIN_REFRESH_INTERVAL,
        }))
    }
}

/// `1025-49151` → `1025..49151`.
pub fn parse_port_range(text: &str) -> Result<Range<u16>, String> {
    let (start, end) = text
        .split_once('-')
        .ok_or_else(|| format!("expected FIRST-END, got {text:?}"))?;
    let start: u16 = start
        .trim()
        .parse()
        .map_err(|_| format!("bad port {start:?}"))?;
    let end: u16 = end
        .trim()
        .parse()
        .map_err(|_| format!("bad port {end:?}"))?;
    if start == 0 || start >= end {
        return Err(format!("empty or invalid range {text:?}"));
    }
    Ok(start..end)
}

/// `500ms`, `20s`, `10m`, `1h` (a bare number is seconds).
/// How many warm boxes a host keeps (`--warm-mandelboxes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WarmTarget {
    /// Every unit of capacity no user holds.
    All,
    /// At most this many (0: the pool is off).
    AtMost(usize),
}

impl WarmTarget {
    /// How many boxes to keep on a host of `capacity` units.
    pub fn of(self, capacity: usize) -> usize {
        match self {
            Self::All => capacity,
            Self::AtMost(n) => n.min(capacity),
        }
    }
}

/// `all` or a count.
pub fn parse_warm(text: &str) -> Result<WarmTarget, String> {
    let text = text.trim();
    if text.eq_ignore_ascii_case("all") {
        return Ok(WarmTarget::All);
    }
    text.parse()
        .map(WarmTarget::AtMost)
        .map_err(|_| format!("{text:?}: `all` or a number of mandelboxes expected"))
}

pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("bad duration {text:?}: expected e.g. 500ms, 20s, 10m"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "" | "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n.saturating_mul(60))),
        "h" => Ok(Duration::from_secs(n.saturating_mul(3600))),
        other => Err(format!("bad duration unit {other:?} in {text:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Result<Config, String> {
        let mut argv = vec!["whist-host-service"];
        argv.extend_from_slice(extra);
        Args::try_parse_from(argv)
            .map_err(|e| e.to_string())?
            .validate()
            .map_err(|e| e.to_string())
    }

    #[test]
    fn the_warm_pool_takes_all_free_capacity_unless_told_otherwise() {
        let default = args(&["--app-env", "localdev"]).unwrap().warm_mandelboxes;
        assert_eq!(default, WarmTarget::All);
        assert_eq!(default.of(4), 4);
        let c = args(&["--app-env", "localdev", "--warm-mandelboxes", "3"]).unwrap();
        assert_eq!(c.warm_mandelboxes, WarmTarget::AtMost(3));
        assert_eq!(c.warm_mandelboxes.of(2), 2, "never more than the capacity");
        let off = args(&["--app-env", "localdev", "--warm-mandelboxes", "0"]).unwrap();
        assert_eq!(off.warm_mandelboxes.of(4), 0);
        let all = args(&["--app-env", "localdev", "--warm-mandelboxes", "ALL"]).unwrap();
        assert_eq!(all.warm_mandelboxes, WarmTarget::All);
        let bad = args(&["--app-env", "localdev", "--warm-mandelboxes", "many"]).unwrap_err();
        assert!(bad.contains("`all` or a number"), "{bad}");
    }

    #[test]
    fn localdev_needs_no_database() {
        let c = args(&["--app-env", "localdev"]).unwrap();
        assert!(c.db.is_none());
        assert_eq!(c.protocol_timeout, -1);
        assert!(c.container_init);
    }

    #[test]
    fn production_needs_https_and_a_secret() {
        let e = args(&[
            "--app-env",
            "prod",
            "--graphql-url",
            "http://h/v1/graphql",
            "--admin-secret",
            "s",
        ])
        .unwrap_err();
        assert!(e.contains("https"), "{e}");
        let e = args(&["--app-env", "prod", "--graphql-url", "https://h/v1/graphql"]).unwrap_err();
        assert!(e.contains("HASURA_ADMIN_SECRET"), "{e}");
        let c = args(&[
            "--app-env",
            "prod",
            "--graphql-url",
            "https://h/v1/graphql",
            "--admin-secret",
            "s3cret",
        ])
        .unwrap();
        assert_eq!(c.protocol_timeout, 30);
        assert!(!c.container_init);
        assert!(
            !format!("{c:?}").contains("s3cret"),
            "secret leaked into Debug"
        );
    }

    #[test]
    fn authentication_is_on_outside_local_development() {
        let c = args(&["--app-env", "localdev"]).unwrap();
        assert!(c.auth.is_none(), "no authentication locally by default");
        assert_eq!(c.json_transport_addr, "0.0.0.0:4678".parse().unwrap());
        let prod = [
            "--app-env",
            "prod",
            "--graphql-url",
            "https://h/v1/graphql",
            "--admin-secret",
            "s",
        ];
        let c = args(&prod).unwrap();
        let auth = c.auth.unwrap();
        assert_eq!(auth.issuer, "https://auth.whist.com/");
        assert_eq!(auth.audience, "https://api.fractal.co");
        assert_eq!(
            auth.jwks_url.as_str(),
            "https://auth.whist.com/.well-known/jwks.json"
        );
        let mut insecure = prod.to_vec();
        insecure.extend(["--auth-issuer", "http://issuer.example/"]);
        let e = args(&insecure).unwrap_err();
        assert!(e.contains("https"), "{e}");
        let c = args(&[
            "--app-env",
            "localdev",
            "--auth-issuer",
            "http://127.0.0.1:9/tenant",
            "--auth-leeway",
            "5s",
        ])
        .unwrap();
        let auth = c.auth.unwrap();
        assert_eq!(
            auth.jwks_url.as_str(),
            "http://127.0.0.1:9/tenant/.well-known/jwks.json"
        );
        assert_eq!(auth.leeway, Duration::from_secs(5));
        let e = args(&["--app-env", "localdev", "--auth-issuer", "not a url"]).unwrap_err();
        assert!(e.contains("issuer"), "{e}");
        let e = args(&[
            "--app-env",
            "localdev",
            "--auth-issuer",
            "http://i/",
            "--auth-leeway",
            "1h",
        ])
        .unwrap_err();
        assert!(e.contains("leeway"), "{e}");
    }

    #[test]
    fn poweroff_is_refused_locally() {
        let e = args(&["--app-env", "localdev", "--poweroff"]).unwrap_err();
        assert!(e.contains("poweroff"), "{e}");
    }

    #[test]
    fn durations_and_ranges_parse_strictly() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("2 weeks").is_err());
        assert_eq!(parse_port_range("40000-40100"), Ok(40000..40100));
        assert!(parse_port_range("5-5").is_err());
        assert!(parse_port_range("x").is_err());
        let spin = args(&["--app-env", "localdev", "--warm-image-check", "0s"]).unwrap_err();
        assert!(spin.contains("--warm-image-check"), "{spin}");
        let every = args(&["--app-env", "localdev", "--warm-image-check", "250ms"]).unwrap();
        assert_eq!(every.warm_image_check, Duration::from_millis(250));
    }

    proptest::proptest! {
        /// Any value in any flag gives a configuration or an error, never a panic; a valid
        /// configuration keeps its invariants.
        #[test]
        fn arbitrary_flag_values_never_panic(
            env in proptest::prop_oneof![
                proptest::strategy::Just("localdev".to_owned()),
                proptest::strategy::Just("prod".to_owned()),
                "\\PC{0,12}",
            ],
            duration in "\\PC{0,12}",
            range in "\\PC{0,14}",
            cpus in "\\PC{0,8}",
            url in "\\PC{0,30}",
        ) {
            let argv = [
                "whist-host-service", "--app-env", &env, "--graphql-url", &url,
                "--admin-secret", "s", "--drain-deadline", &duration,
                "--port-range", &range, "--mandelbox-cpus", &cpus,
            ];
            if let Ok(args) = Args::try_parse_from(argv)
                && let Ok(config) = args.validate()
            {
                proptest::prop_assert!(!config.port_range.is_empty());
                proptest::prop_assert!(config.mandelbox_nano_cpus >= 10_000_000);
                if !config.app_env.is_local() {
                    proptest::prop_assert!(config.db.is_some());
                }
            }
        }
    }
}
