//! The scaling service's configuration: flags with environment fallbacks, validated once into
//! [`Config`] and logged at start with secrets redacted.

use clap::Parser;
use dbclient::types::Region;
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
    #[command(flatten)]
    pub log: LogArgs,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub app_env: AppEnv,
    pub db: dbclient::DbConfig,
    pub regions: Vec<Region>,
    pub commit: String,
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
        Ok(Config {
            app_env: env,
            db,
            regions,
            commit: BUILD_COMMIT.to_owned(),
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
        ])
        .unwrap();
        assert!(!format!("{c:?}").contains("topsecret"));
    }
}
