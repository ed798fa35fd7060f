//! The scaling service's configuration: flags with environment fallbacks, validated once into
//! [`Config`] and logged at start with secrets redacted.

use clap::Parser;
use dbclient::types::{ImageId, Region};
use logger::{AppEnv, LogArgs, Secret};

use crate::algorithm::{AlgorithmConfig, AlgorithmKind};

/// The git commit this binary was built from (`WHIST_COMMIT` at build time).
pub const BUILD_COMMIT: &str = match option_env!("WHIST_COMMIT") {
    Some(c) => c,
    None => "dev",
};

#[derive(Debug, Clone, Parser)]
#[command(
    name = "whist-scaling-service",
    version,
    about = "Keeps each region's fleet of hosts the right size and assigns users to mandelboxes"
)]
pub struct Args {
    /// Deployment environment: localdev, localdevwithdb, dev, staging or prod.
    #[arg(long, env = "APP_ENV")]
    pub app_env: AppEnv,
    /// Hasura's GraphQL URL (https outside local development).
    #[arg(long, env = "HASURA_GRAPHQL_URL")]
    pub graphql_url: String,
    /// Hasura's admin secret.
    #[arg(long, env = "HASURA_ADMIN_SECRET", hide_env_values = true)]
    pub admin_secret: Option<Secret<String>>,
    /// Regions this service manages, comma-separated.
    #[arg(
        long,
        env = "WHIST_REGIONS",
        value_delimiter = ',',
        default_value = "us-east-1"
    )]
    pub regions: Vec<String>,
    /// Free mandelboxes to keep ready: `N` for every region, then `region=N` overrides,
    /// comma-separated (`2,us-west-1=4`).
    #[arg(
        long,
        env = "DESIRED_FREE_MANDELBOXES",
        value_delimiter = ',',
        default_value = "2"
    )]
    pub desired_free_mandelboxes: Vec<String>,
    /// The scaling algorithm: `holdover`, `default` or `original` for every region, then
    /// `region=NAME` overrides, comma-separated (`holdover,us-west-1=default`).
    #[arg(
        long,
        env = "WHIST_SCALING_ALGORITHM",
        value_delimiter = ',',
        default_value = "holdover"
    )]
    pub algorithm: Vec<String>,
    /// `holdover`: the longest hold-down, seconds capacity must have been surplus before it is
    /// drained (its hold-down is half the measured session length, at most this; and this
    /// until it has a demand forecast). Default: 900.
    #[arg(long, env = "WHIST_HOLD_DOWN_SECS")]
    pub hold_down_secs: Option<u64>,
    /// `holdover`: seconds after becoming ACTIVE during which a host is never drained
    /// (default: a typical boot, at least EC2's 60 s billing minimum).
    #[arg(long, env = "WHIST_MIN_LIFETIME_SECS")]
    pub min_lifetime_secs: Option<u64>,
    /// Most instances in one region.
    #[arg(long, env = "WHIST_MAX_INSTANCES_PER_REGION", default_value_t = 20)]
    pub max_instances_per_region: u32,
    /// The instance type launched.
    #[arg(long, env = "WHIST_INSTANCE_TYPE", default_value = "g4dn.2xlarge")]
    pub instance_type: String,
    /// The host image each region should run, `region=ami-...` comma-separated (the deploy's
    /// images.json). A region whose image row differs is upgraded.
    #[arg(long, env = "WHIST_IMAGES", value_delimiter = ',')]
    pub images: Vec<String>,
    /// Seconds between two scheduled looks at every region (the first is at start).
    #[arg(long, env = "WHIST_SCHEDULER_INTERVAL_SECS", default_value_t = 60)]
    pub scheduler_interval_secs: u64,
    /// Port of the HTTP API (`/mandelbox/assign`, `/metrics`, `/healthz`, `/readyz`); 0 picks one.
    #[arg(long, env = "PORT", default_value_t = 7730)]
    pub port: u16,
    /// JWKS of the token issuer (Auth0); required outside local development.
    #[arg(long, env = "AUTH0_JWKS_URL")]
    pub auth_jwks_url: Option<url::Url>,
    #[arg(long, env = "AUTH0_AUDIENCE")]
    pub auth_audience: Option<String>,
    #[arg(long, env = "AUTH0_ISSUER")]
    pub auth_issuer: Option<String>,
    /// Where hosts are launched: `ec2` (EC2; in local development, the EC2 API at
    /// AWS_ENDPOINT_URL, i.e. devstack's moto) or `memory` (an in-memory cloud whose hosts never
    /// boot; local development only). Default: `ec2`, or `memory` in local development without
    /// AWS_ENDPOINT_URL.
    #[arg(long, env = "WHIST_CLOUD", value_enum)]
    pub cloud: Option<CloudKind>,
    /// EC2 API endpoint override (moto); by default the region's public endpoint.
    #[arg(long, env = "AWS_ENDPOINT_URL")]
    pub aws_endpoint_url: Option<String>,
    /// IAM instance profile (name or ARN) of launched hosts; it must allow reading the admin
    /// secret's SSM parameter. Default: `whist-host-<APP_ENV>`.
    #[arg(long, env = "WHIST_HOST_INSTANCE_PROFILE")]
    pub host_instance_profile: Option<String>,
    /// SSM SecureString from which a launched host reads Hasura's admin secret (it never
    /// travels in user data). Default: `/whist/<APP_ENV>/hasura-admin-secret`.
    #[arg(long, env = "WHIST_HOST_ADMIN_SECRET_PARAMETER")]
    pub host_admin_secret_parameter: Option<String>,
    /// The Hasura URL launched hosts use. Default: HASURA_GRAPHQL_URL.
    #[arg(long, env = "WHIST_HOST_GRAPHQL_URL")]
    pub host_graphql_url: Option<String>,
    /// Sentry DSN given to launched hosts.
    #[arg(long, env = "WHIST_HOST_SENTRY_DSN", hide_env_values = true)]
    pub host_sentry_dsn: Option<Secret<String>>,
    /// The address of launched hosts' ops endpoint (`PRIVATE_IP:4679` binds the instance's
    /// private IPv4 so Prometheus can scrape it). Default: the host's own, `127.0.0.1:4679`.
    #[arg(long, env = "WHIST_HOST_OPS_ADDR")]
    pub host_ops_addr: Option<String>,
    /// CIDRs, comma-separated, that may reach launched hosts' ops endpoint besides loopback
    /// (the monitoring network). Without it a private-address endpoint refuses Prometheus.
    #[arg(long, env = "WHIST_HOST_OPS_ALLOW")]
    pub host_ops_allow: Option<String>,
    /// Mandelboxes one user may hold at once.
    #[arg(long, env = "MANDELBOX_LIMIT_PER_USER", default_value_t = 3)]
    pub mandelboxes_per_user: usize,
    /// Apps an assign request may ask for, comma-separated (a request naming none gets
    /// `chrome`); each needs its image on the hosts (`<registry>/<env>/browsers/<app>`).
    #[arg(long, env = "WHIST_ALLOWED_APPS", default_value = crate::api::APP)]
    pub allowed_apps: String,
    /// Assign requests per second per client address, checked before authentication.
    #[arg(long, env = "WHIST_ASSIGN_RATE_PER_ADDRESS", default_value_t = crate::admission::DEFAULT_RATE_PER_ADDRESS)]
    pub assign_rate_per_address: f64,
    /// Assign requests one client address may send in a burst.
    #[arg(long, env = "WHIST_ASSIGN_BURST_PER_ADDRESS", default_value_t = crate::admission::DEFAULT_BURST_PER_ADDRESS)]
    pub assign_burst_per_address: u32,
    /// Assign requests per second per user, checked after authentication.
    #[arg(long, env = "WHIST_ASSIGN_RATE_PER_USER", default_value_t = crate::admission::DEFAULT_RATE_PER_USER)]
    pub assign_rate_per_user: f64,
    /// Assign requests one user may send in a burst.
    #[arg(long, env = "WHIST_ASSIGN_BURST_PER_USER", default_value_t = crate::admission::DEFAULT_BURST_PER_USER)]
    pub assign_burst_per_user: u32,
    /// Client addresses (and users) each rate limiter remembers; past it the least recently
    /// seen are forgotten, so memory stays bounded.
    #[arg(long, env = "WHIST_RATE_LIMIT_KEYS", default_value_t = crate::admission::DEFAULT_KEYS)]
    pub rate_limit_keys: usize,
    /// Proxies in front of the API that append the client's address to X-Forwarded-For
    /// (Heroku's router: 1). 0: the TCP peer is the client and the header is ignored.
    #[arg(long, env = "WHIST_TRUSTED_PROXIES", default_value_t = 0)]
    pub trusted_proxies: usize,
    /// Connections the HTTP API holds open at once.
    #[arg(long, env = "WHIST_API_MAX_CONNECTIONS", default_value_t = crate::listener::DEFAULT_MAX_CONNECTIONS)]
    pub api_max_connections: usize,
    /// Connections one client address may hold open (not applied behind trusted proxies,
    /// where every peer is a proxy; 0: no cap).
    #[arg(long, env = "WHIST_API_MAX_CONNECTIONS_PER_ADDRESS", default_value_t = crate::listener::DEFAULT_MAX_CONNECTIONS_PER_ADDRESS)]
    pub api_max_connections_per_address: usize,
    /// Port of the hosts' json_transport endpoint, where `PUT /json_transport` is forwarded.
    #[arg(long, env = "WHIST_HOST_JSON_TRANSPORT_PORT", default_value_t = crate::forward::DEFAULT_HOST_PORT)]
    pub host_json_transport_port: u16,
    /// Seconds a forwarded json_transport request may wait for the host's answer before it is
    /// answered 504 (retry): at most 28, under Heroku's 30 s router timeout.
    #[arg(
        long,
        env = "WHIST_HOST_JSON_TRANSPORT_TIMEOUT_SECS",
        default_value_t = crate::forward::DEFAULT_TIMEOUT.as_secs()
    )]
    pub host_json_transport_timeout_secs: u64,
    #[command(flatten)]
    pub log: LogArgs,
}

/// Which cloud hosts come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CloudKind {
    Ec2,
    Memory,
}

/// What the EC2 host handlers of all regions share.
#[derive(Debug, Clone)]
pub struct Ec2Settings {
    /// `Some`: a local EC2 API (moto).
    pub endpoint_url: Option<String>,
    pub instance_profile: String,
    pub host_graphql_url: String,
    pub admin_secret_parameter: String,
    pub host_sentry_dsn: Option<Secret<String>>,
    pub host_ops_addr: Option<String>,
    pub host_ops_allow: Option<String>,
}

/// Where hosts come from.
#[derive(Debug, Clone)]
pub enum CloudConfig {
    Ec2(Ec2Settings),
    /// An in-memory cloud per region: local development only.
    Memory,
}

/// How assign requests are authenticated.
#[derive(Debug, Clone)]
pub enum AuthConfig {
    Jwks {
        jwks_url: url::Url,
        audience: String,
        issuer: String,
    },
    /// `user:<id>` tokens: local development only.
    LocalTestTokens,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub app_env: AppEnv,
    pub db: dbclient::DbConfig,
    pub regions: Vec<Region>,
    pub commit: String,
    pub desired_free_mandelboxes: PerRegion<u32>,
    pub algorithm: PerRegion<AlgorithmKind>,
    /// `holdover`'s hold-down time and minimum host lifetime.
    pub hold_down: std::time::Duration,
    pub min_lifetime: std::time::Duration,
    pub max_instances_per_region: u32,
    pub instance_type: String,
    /// The image each region should run.
    pub images: std::collections::BTreeMap<Region, ImageId>,
    pub scheduler_interval: std::time::Duration,
    pub port: u16,
    pub auth: AuthConfig,
    pub mandelboxes_per_user: usize,
    /// The apps assign requests may ask for.
    pub allowed_apps: Vec<String>,
    /// Assign's rate limits.
    pub admission: crate::admission::AdmissionSettings,
    /// The HTTP API listener's connection caps.
    pub listener: crate::listener::ListenerLimits,
    pub cloud: CloudConfig,
    /// Where and how long `PUT /json_transport` is forwarded to hosts.
    pub json_transport_forward: crate::forward::ForwardSettings,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0} needs an https:// Hasura URL: the admin secret must not travel in the clear")]
    InsecureGraphqlUrl(AppEnv),
    #[error("{0} needs HASURA_ADMIN_SECRET (--admin-secret)")]
    MissingAdminSecret(AppEnv),
    #[error("invalid Hasura settings: {0}")]
    Db(#[from] dbclient::ConfigError),
    #[error("invalid region {region:?}: {reason}")]
    Region { region: String, reason: String },
    #[error("no region configured (WHIST_REGIONS)")]
    NoRegions,
    #[error("invalid image entry {entry:?} (WHIST_IMAGES): {reason}")]
    Image { entry: String, reason: String },
    #[error("the scheduler interval must be at least one second")]
    SchedulerInterval,
    #[error("{0} needs AUTH0_JWKS_URL, AUTH0_AUDIENCE and AUTH0_ISSUER")]
    MissingAuth(AppEnv),
    #[error("the in-memory cloud (WHIST_CLOUD=memory) is for local development, not {0}")]
    MemoryCloudDeployed(AppEnv),
    #[error("localdev has no database and cannot scale: use localdevwithdb")]
    LocalDevWithoutDb,
    #[error("WHIST_CLOUD=ec2 in local development needs AWS_ENDPOINT_URL (devstack's moto)")]
    LocalEc2WithoutEndpoint,
    #[error("invalid AWS_ENDPOINT_URL {0:?}")]
    Endpoint(String),
    #[error("{what} must not be empty")]
    Empty { what: &'static str },
    #[error("invalid app {0:?} (WHIST_ALLOWED_APPS): 1 to 64 of a-z, 0-9, '-', '_'")]
    App(String),
    #[error("{what} must not be 0")]
    Zero { what: &'static str },
    #[error(
        "WHIST_HOST_JSON_TRANSPORT_TIMEOUT_SECS={0}: at most 28 (Heroku's router drops a request with no answer for 30 s)"
    )]
    ForwardTimeout(u64),
    #[error("invalid {what} entry {entry:?}: {reason}")]
    PerRegion {
        what: &'static str,
        entry: String,
        reason: String,
    },
}

/// A value for every region, with overrides for some.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PerRegion<T> {
    pub default: T,
    pub overrides: std::collections::BTreeMap<Region, T>,
}

impl<T: Clone> PerRegion<T> {
    pub fn new(default: T) -> Self {
        Self {
            default,
            overrides: Default::default(),
        }
    }

    pub fn get(&self, region: &Region) -> T {
        self.overrides.get(region).unwrap_or(&self.default).clone()
    }

    /// Parses `VALUE` and `region=VALUE` entries (the last bare value is the default; none
    /// keeps `default`).
    pub fn parse<E: std::fmt::Display>(
        what: &'static str,
        entries: &[String],
        default: T,
        parse: impl Fn(&str) -> Result<T, E>,
    ) -> Result<Self, ConfigError> {
        let mut out = Self::new(default);
        for entry in entries.iter().map(|e| e.trim()).filter(|e| !e.is_empty()) {
            let bad = |reason: String| ConfigError::PerRegion {
                what,
                entry: entry.to_owned(),
                reason,
            };
            match entry.split_once('=') {
                Some((region, value)) => {
                    let region = Region::new(region.trim()).map_err(|e| bad(e.to_string()))?;
                    let value = parse(value.trim()).map_err(|e| bad(e.to_string()))?;
                    out.overrides.insert(region, value);
                }
                None => out.default = parse(entry).map_err(|e| bad(e.to_string()))?,
            }
        }
        Ok(out)
    }
}

impl Args {
    pub fn validate(self) -> Result<Config, ConfigError> {
        let env = self.app_env;
        if !env.is_local() {
            if !self.graphql_url.starts_with("https://") {
                return Err(ConfigError::InsecureGraphqlUrl(env));
            }
            if self.admin_secret.is_none() {
                return Err(ConfigError::MissingAdminSecret(env));
            }
        }
        let cloud = self.cloud_config(env)?;
        let db = dbclient::DbConfig::new(&self.graphql_url, self.admin_secret)?;
        let mut regions = Vec::new();
        for r in self
            .regions
            .iter()
            .map(|r| r.trim())
            .filter(|r| !r.is_empty())
        {
            let region = Region::new(r).map_err(|e| ConfigError::Region {
                region: r.to_owned(),
                reason: e.to_string(),
            })?;
            if !regions.contains(&region) {
                regions.push(region);
            }
        }
        if regions.is_empty() {
            return Err(ConfigError::NoRegions);
        }
        let mut images = std::collections::BTreeMap::new();
        for entry in self
            .images
            .iter()
            .map(|e| e.trim())
            .filter(|e| !e.is_empty())
        {
            let bad = |reason: &str| ConfigError::Image {
                entry: entry.to_owned(),
                reason: reason.to_owned(),
            };
            let (region, image) = entry
                .split_once('=')
                .ok_or_else(|| bad("expected region=ami-id"))?;
            let region = Region::new(region.trim()).map_err(|e| bad(&e.to_string()))?;
            let image = ImageId::new(image.trim()).map_err(|e| bad(&e.to_string()))?;
            images.insert(region, image);
        }
        if self.scheduler_interval_secs == 0 {
            return Err(ConfigError::SchedulerInterval);
        }
        if self.host_json_transport_port == 0 {
            return Err(ConfigError::Zero {
                what: "WHIST_HOST_JSON_TRANSPORT_PORT",
            });
        }
        if self.host_json_transport_timeout_secs == 0 {
            return Err(ConfigError::Zero {
                what: "WHIST_HOST_JSON_TRANSPORT_TIMEOUT_SECS",
            });
        }
        if self.host_json_transport_timeout_secs > crate::forward::MAX_TIMEOUT.as_secs() {
            return Err(ConfigError::ForwardTimeout(
                self.host_json_transport_timeout_secs,
            ));
        }
        let json_transport_forward = crate::forward::ForwardSettings {
            port: self.host_json_transport_port,
            timeout: std::time::Duration::from_secs(self.host_json_transport_timeout_secs),
            ..Default::default()
        };
        if self.rate_limit_keys == 0 {
            return Err(ConfigError::Zero {
                what: "WHIST_RATE_LIMIT_KEYS",
            });
        }
        if self.api_max_connections == 0 {
            return Err(ConfigError::Zero {
                what: "WHIST_API_MAX_CONNECTIONS",
            });
        }
        for (what, rate) in [
            (
                "WHIST_ASSIGN_RATE_PER_ADDRESS",
                self.assign_rate_per_address,
            ),
            ("WHIST_ASSIGN_RATE_PER_USER", self.assign_rate_per_user),
        ] {
            if !(rate.is_finite() && rate > 0.0) {
                return Err(ConfigError::Zero { what });
            }
        }
        let admission = crate::admission::AdmissionSettings {
            per_address: edge::limit::RateSettings {
                per_second: self.assign_rate_per_address,
                burst: self.assign_burst_per_address,
                capacity: self.rate_limit_keys,
            },
            per_user: edge::limit::RateSettings {
                per_second: self.assign_rate_per_user,
                burst: self.assign_burst_per_user,
                capacity: self.rate_limit_keys,
            },
            trusted_proxies: self.trusted_proxies,
        };
        let listener = crate::listener::ListenerLimits {
            max_connections: self.api_max_connections,
            // Behind proxies every peer is a proxy: a per-peer cap would cap everyone.
            max_connections_per_address: if self.trusted_proxies > 0 {
                0
            } else {
                self.api_max_connections_per_address
            },
            ..Default::default()
        };
        let auth = match (self.auth_jwks_url, self.auth_audience, self.auth_issuer) {
            (Some(jwks_url), Some(audience), Some(issuer)) => AuthConfig::Jwks {
                jwks_url,
                audience,
                issuer,
            },
            _ if env.is_local() => AuthConfig::LocalTestTokens,
            _ => return Err(ConfigError::MissingAuth(env)),
        };
        let defaults = AlgorithmConfig::default();
        Ok(Config {
            cloud,
            json_transport_forward,
            app_env: env,
            port: self.port,
            auth,
            mandelboxes_per_user: self.mandelboxes_per_user,
            allowed_apps: parse_apps(&self.allowed_apps)?,
            admission,
            listener,
            db,
            regions,
            commit: BUILD_COMMIT.to_owned(),
            desired_free_mandelboxes: PerRegion::parse(
                "DESIRED_FREE_MANDELBOXES",
                &self.desired_free_mandelboxes,
                2,
                str::parse::<u32>,
            )?,
            algorithm: PerRegion::parse(
                "WHIST_SCALING_ALGORITHM",
                &self.algorithm,
                AlgorithmKind::Holdover,
                str::parse::<AlgorithmKind>,
            )?,
            hold_down: self
                .hold_down_secs
                .map_or(defaults.hold_down, std::time::Duration::from_secs),
            min_lifetime: self
                .min_lifetime_secs
                .map_or(defaults.min_lifetime, std::time::Duration::from_secs),
            max_instances_per_region: self.max_instances_per_region,
            instance_type: self.instance_type,
            images,
            scheduler_interval: std::time::Duration::from_secs(self.scheduler_interval_secs),
        })
    }
}

impl Args {
    fn cloud_config(&self, env: AppEnv) -> Result<CloudConfig, ConfigError> {
        let endpoint = self
            .aws_endpoint_url
            .as_deref()
            .map(str::trim)
            .filter(|u| !u.is_empty());
        let kind = self.cloud.unwrap_or(match (env.is_local(), endpoint) {
            (true, None) => CloudKind::Memory,
            _ => CloudKind::Ec2,
        });
        match kind {
            CloudKind::Memory if !env.is_local() => Err(ConfigError::MemoryCloudDeployed(env)),
            CloudKind::Memory => Ok(CloudConfig::Memory),
            CloudKind::Ec2 => {
                if env == AppEnv::LocalDev {
                    return Err(ConfigError::LocalDevWithoutDb);
                }
                if env.is_local() && endpoint.is_none() {
                    return Err(ConfigError::LocalEc2WithoutEndpoint);
                }
                if let Some(url) = endpoint
                    && url::Url::parse(url).is_err()
                {
                    return Err(ConfigError::Endpoint(url.to_owned()));
                }
                let non_empty =
                    |value: &Option<String>, what: &'static str, default: String| match value
                        .as_deref()
                        .map(str::trim)
                    {
                        None => Ok(default),
                        Some("") => Err(ConfigError::Empty { what }),
                        Some(v) => Ok(v.to_owned()),
                    };
                let host_graphql_url = non_empty(
                    &self.host_graphql_url,
                    "WHIST_HOST_GRAPHQL_URL",
                    self.graphql_url.clone(),
                )?;
                if !env.is_local() && !host_graphql_url.starts_with("https://") {
                    return Err(ConfigError::InsecureGraphqlUrl(env));
                }
                Ok(CloudConfig::Ec2(Ec2Settings {
                    endpoint_url: endpoint.map(str::to_owned),
                    instance_profile: non_empty(
                        &self.host_instance_profile,
                        "WHIST_HOST_INSTANCE_PROFILE",
                        format!("whist-host-{env}"),
                    )?,
                    host_graphql_url,
                    admin_secret_parameter: non_empty(
                        &self.host_admin_secret_parameter,
                        "WHIST_HOST_ADMIN_SECRET_PARAMETER",
                        format!("/whist/{env}/hasura-admin-secret"),
                    )?,
                    host_sentry_dsn: self.host_sentry_dsn.clone(),
                    host_ops_addr: self.host_ops_addr.clone().filter(|a| !a.is_empty()),
                    host_ops_allow: self.host_ops_allow.clone().filter(|a| !a.is_empty()),
                }))
            }
        }
    }
}

/// `WHIST_ALLOWED_APPS`: comma-separated app names, each the last part of the image's path
/// (`chrome` for `browsers/chrome`).
fn parse_apps(list: &str) -> Result<Vec<String>, ConfigError> {
    let mut apps = Vec::new();
    for app in list.split(',').map(str::trim).filter(|a| !a.is_empty()) {
        let valid = app.len() <= 64
            && app
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if !valid {
            return Err(ConfigError::App(app.to_owned()));
        }
        if !apps.iter().any(|a| a == app) {
            apps.push(app.to_owned());
        }
    }
    if apps.is_empty() {
        return Err(ConfigError::Empty {
            what: "WHIST_ALLOWED_APPS",
        });
    }
    Ok(apps)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> Result<Config, String> {
        let mut argv = vec!["whist-scaling-service"];
        argv.extend_from_slice(extra);
        Args::try_parse_from(argv)
            .map_err(|e| e.to_string())?
            .validate()
            .map_err(|e| e.to_string())
    }

    #[test]
    fn allowed_apps_default_to_chrome_and_are_validated() {
        let base = [
            "--app-env",
            "localdevwithdb",
            "--graphql-url",
            "http://127.0.0.1:1/v1/graphql",
            "--regions",
            "us-east-1",
        ];
        assert_eq!(parse(&base).unwrap().allowed_apps, ["chrome"]);
        let mut listed = base.to_vec();
        listed.extend(["--allowed-apps", "chrome, brave,chrome"]);
        assert_eq!(parse(&listed).unwrap().allowed_apps, ["chrome", "brave"]);
        for bad in ["", " , ", "Chrome", "browsers/brave", "a b"] {
            let mut argv = base.to_vec();
            argv.extend(["--allowed-apps", bad]);
            assert!(parse(&argv).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn regions_are_validated_and_deduplicated() {
        let c = parse(&[
            "--app-env",
            "localdevwithdb",
            "--graphql-url",
            "http://127.0.0.1:1/v1/graphql",
            "--regions",
            "us-east-1, us-west-2,us-east-1",
        ])
        .unwrap();
        assert_eq!(c.regions.len(), 2);
        assert_eq!(c.json_transport_forward.port, 4678);
        assert_eq!(
            c.json_transport_forward.timeout,
            std::time::Duration::from_secs(25)
        );
        assert_eq!(c.admission.trusted_proxies, 0);
        assert_eq!(c.listener.max_connections_per_address, 64);
        let local = [
            "--app-env",
            "localdevwithdb",
            "--graphql-url",
            "http://127.0.0.1:1/v1/graphql",
        ];
        // Past Heroku's router timeout the client would get the router's error, not ours.
        let mut slow = local.to_vec();
        slow.extend(["--host-json-transport-timeout-secs", "29"]);
        assert!(parse(&slow).unwrap_err().contains("at most 28"));
        // Behind a proxy every peer is the proxy: no per-address connection cap.
        let mut proxied = local.to_vec();
        proxied.extend(["--trusted-proxies", "1"]);
        let c = parse(&proxied).unwrap();
        assert_eq!(c.admission.trusted_proxies, 1);
        assert_eq!(c.listener.max_connections_per_address, 0);
        assert!(
            parse(&[
                "--app-env",
                "localdev",
                "--graphql-url",
                "http://x/v1/graphql",
                "--regions",
                " , "
            ])
            .is_err()
        );
    }

    #[test]
    fn algorithm_and_buffer_are_chosen_per_region_with_holdover_by_default() {
        let local = [
            "--app-env",
            "localdevwithdb",
            "--graphql-url",
            "http://h/v1/graphql",
        ];
        let c = parse(&local).unwrap();
        let east = Region::new("us-east-1").unwrap();
        let west = Region::new("us-west-1").unwrap();
        assert_eq!(c.algorithm.get(&east), AlgorithmKind::Holdover);
        assert_eq!(c.desired_free_mandelboxes.get(&east), 2);
        let mut args = local.to_vec();
        args.extend([
            "--algorithm",
            "default,us-west-1=original",
            "--desired-free-mandelboxes",
            "3,us-west-1=5",
        ]);
        let c = parse(&args).unwrap();
        assert_eq!(c.algorithm.get(&east), AlgorithmKind::Default);
        assert_eq!(c.algorithm.get(&west), AlgorithmKind::Original);
        assert_eq!(c.desired_free_mandelboxes.get(&east), 3);
        assert_eq!(c.desired_free_mandelboxes.get(&west), 5);
        let mut bad = local.to_vec();
        bad.extend(["--algorithm", "us-east-1=clever"]);
        assert!(parse(&bad).unwrap_err().contains("clever"));
    }

    #[test]
    fn production_refuses_plain_http_and_keeps_the_secret_out_of_debug() {
        let e = parse(&[
            "--app-env",
            "prod",
            "--graphql-url",
            "http://h/v1/graphql",
            "--admin-secret",
            "x",
        ])
        .unwrap_err();
        assert!(e.contains("https"), "{e}");
        let c = parse(&[
            "--app-env",
            "staging",
            "--graphql-url",
            "https://h/v1/graphql",
            "--admin-secret",
            "topsecret",
            "--auth-jwks-url",
            "https://issuer.example/.well-known/jwks.json",
            "--auth-audience",
            "a",
            "--auth-issuer",
            "https://issuer.example/",
        ])
        .unwrap();
        assert!(!format!("{c:?}").contains("topsecret"));
    }

    #[test]
    fn the_cloud_follows_the_environment_and_refuses_the_memory_cloud_when_deployed() {
        let local = [
            "--app-env",
            "localdevwithdb",
            "--graphql-url",
            "http://h/v1/graphql",
        ];
        assert!(matches!(parse(&local).unwrap().cloud, CloudConfig::Memory));
        let mut with_moto = local.to_vec();
        with_moto.extend(["--aws-endpoint-url", "http://127.0.0.1:5000"]);
        let CloudConfig::Ec2(ec2) = parse(&with_moto).unwrap().cloud else {
            panic!("moto's endpoint selects EC2");
        };
        assert_eq!(ec2.endpoint_url.as_deref(), Some("http://127.0.0.1:5000"));
        assert_eq!(ec2.instance_profile, "whist-host-localdevwithdb");
        assert_eq!(ec2.host_graphql_url, "http://h/v1/graphql");
        let mut ec2_no_endpoint = local.to_vec();
        ec2_no_endpoint.extend(["--cloud", "ec2"]);
        assert!(
            parse(&ec2_no_endpoint)
                .unwrap_err()
                .contains("AWS_ENDPOINT_URL")
        );

        let prod = [
            "--app-env",
            "prod",
            "--graphql-url",
            "https://h/v1/graphql",
            "--admin-secret",
            "s",
            "--auth-jwks-url",
            "https://issuer.example/.well-known/jwks.json",
            "--auth-audience",
            "a",
            "--auth-issuer",
            "https://issuer.example/",
        ];
        let CloudConfig::Ec2(ec2) = parse(&prod).unwrap().cloud else {
            panic!("production launches into EC2");
        };
        assert_eq!(ec2.endpoint_url, None);
        assert_eq!(
            ec2.admin_secret_parameter,
            "/whist/prod/hasura-admin-secret"
        );
        let mut memory = prod.to_vec();
        memory.extend(["--cloud", "memory"]);
        assert!(parse(&memory).unwrap_err().contains("in-memory"));
        let mut plain_http_hosts = prod.to_vec();
        plain_http_hosts.extend(["--host-graphql-url", "http://h/v1/graphql"]);
        assert!(parse(&plain_http_hosts).unwrap_err().contains("https"));
    }
}
