//! Command-line and environment settings shared by the service binaries: the deployment
//! environment and how to log.

use std::str::FromStr;

use crate::{LogConfig, LogFormat, Secret};

/// Where a service runs. Parsed from `APP_ENV` with the original services' aliases; unlike the
/// original, an unknown value is an error rather than a silent fall-back to `localdev`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppEnv {
    /// No database: a host service starts mandelboxes from json_transport requests alone.
    LocalDev,
    /// The local stack (devstack) as the database.
    LocalDevWithDb,
    Dev,
    Staging,
    Prod,
}

impl AppEnv {
    /// True for the two local-development environments.
    pub fn is_local(self) -> bool {
        matches!(self, Self::LocalDev | Self::LocalDevWithDb)
    }

    /// The canonical name, as reported to Sentry and in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::LocalDev => "localdev",
            Self::LocalDevWithDb => "localdevwithdb",
            Self::Dev => "dev",
            Self::Staging => "staging",
            Self::Prod => "prod",
        }
    }
}

impl std::fmt::Display for AppEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for AppEnv {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "localdev" | "local" => Ok(Self::LocalDev),
            "localdevwithdb" | "localdev_with_db" | "localdev_with_database" => {
                Ok(Self::LocalDevWithDb)
            }
            "dev" | "development" => Ok(Self::Dev),
            "staging" => Ok(Self::Staging),
            "prod" | "production" => Ok(Self::Prod),
            other => Err(format!(
                "unknown environment {other:?}: expected localdev, localdevwithdb, dev, staging or prod"
            )),
        }
    }
}

/// Logging flags, flattened into each service's configuration.
#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// Log filter in EnvFilter syntax, e.g. `info,dbclient=debug`.
    #[arg(long = "log", env = "WHIST_LOG", default_value = "info")]
    pub filter: String,
    /// `pretty` or `json`; defaults to pretty in local environments and JSON elsewhere.
    #[arg(long, env = "WHIST_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Sentry DSN; unset disables Sentry.
    #[arg(long, env = "SENTRY_DSN", hide_env_values = true)]
    pub sentry_dsn: Option<Secret<String>>,
}

impl LogArgs {
    pub fn to_config(&self, service: &'static str, env: AppEnv, release: &str) -> LogConfig {
        LogConfig {
            service,
            format: self.log_format.unwrap_or(if env.is_local() {
                LogFormat::Pretty
            } else {
                LogFormat::Json
            }),
            filter: self.filter.clone(),
            sentry_dsn: self.sentry_dsn.clone().filter(|d| !d.expose().is_empty()),
            environment: env.as_str().to_owned(),
            release: release.to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_env_accepts_the_original_aliases_and_rejects_others() {
        for (text, env) in [
            ("localdev", AppEnv::LocalDev),
            ("localdev_with_db", AppEnv::LocalDevWithDb),
            ("LOCALDEVWITHDB", AppEnv::LocalDevWithDb),
            ("development", AppEnv::Dev),
            ("staging", AppEnv::Staging),
            ("production", AppEnv::Prod),
        ] {
            assert_eq!(text.parse::<AppEnv>(), Ok(env), "{text}");
        }
        assert!("prdo".parse::<AppEnv>().is_err());
        assert!("".parse::<AppEnv>().is_err());
    }
}
