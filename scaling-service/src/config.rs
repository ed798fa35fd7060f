//! The scaling service's configuration: flags with environment fallbacks, validated once into
//! [`Config`] and logged at start with secrets redacted.

use clap::Parser;
use dbclient::types::{ImageId, Region};
use logger::{AppEnv, LogArgs, Secret};

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
    /// Free mandelboxes to keep ready in each region.
    #[arg(long, env = "DESIRED_FREE_MANDELBOXES", default_value_t = 2)]
    pub desired_free_mandelboxes: u32,
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
    /// Mandelboxes one user may hold at once.
    #[arg(long, env = "MANDELBOX_LIMIT_PER_USER", default_value_t = 3)]
    pub mandelboxes_per_user: usize,
    /// Assign requests per second over all clients (token bucket refill).
    #[arg(long, env = "WHIST_ASSIGN_RATE", default_value_t = 10.0)]
    pub assign_rate: f64,
    /// Assign requests accepted in a burst.
    #[arg(long, env = "WHIST_ASSIGN_BURST", default_value_t = 50)]
    pub assign_burst: u32,
    #[command(flatten)]
    pub log: LogArgs,
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
    pub desired_free_mandelboxes: u32,
    pub max_instances_per_region: u32,
    pub instance_type: String,
    /// The image each region should run.
    pub images: std::collections::BTreeMap<Region, ImageId>,
    pub scheduler_interval: std::time::Duration,
    pub port: u16,
    pub auth: AuthConfig,
    pub mandelboxes_per_user: usize,
    pub assign_rate: f64,
    pub assign_burst: u32,
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
        let auth = match (self.auth_jwks_url, self.auth_audience, self.auth_issuer) {
            (Some(jwks_url), Some(audience), Some(issuer)) => AuthConfig::Jwks {
                jwks_url,
                audience,
                issuer,
            },
            _ if env.is_local() => AuthConfig::LocalTestTokens,
            _ => return Err(ConfigError::MissingAuth(env)),
        };
        Ok(Config {
            app_env: env,
            port: self.port,
            auth,
            mandelboxes_per_user: self.mandelboxes_per_user,
            assign_rate: self.assign_rate,
            assign_burst: self.assign_burst,
            db,
            regions,
            commit: BUILD_COMMIT.to_owned(),
            desired_free_mandelboxes: self.desired_free_mandelboxes,
            max_instances_per_region: self.max_instances_per_region,
            instance_type: self.instance_type,
            images,
            scheduler_interval: std::time::Duration::from_secs(self.scheduler_interval_secs),
        })
    }
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
}
