//! Logging for the whist services.
//!
//! [`init`] installs one `tracing` subscriber for the whole process:
//! - output to stderr, readable (`LogFormat::Pretty`) in development or one JSON object per line
//!   (`LogFormat::Json`) in production, filtered by an `EnvFilter` directive
//!   (`RUST_LOG`-style, e.g. `info,dbclient=debug`);
//! - Sentry, only when a DSN is configured (no network at all otherwise): ERROR events become
//!   Sentry events, WARN and INFO events become breadcrumbs attached to them, over rustls;
//! - a panic hook that logs the panic as an ERROR event (so it reaches the JSON log and Sentry)
//!   before the previous hook runs.
//!
//! Secrets are kept out of logs by type: wrap them in [`Secret`], whose `Debug` and `Display`
//! print `[redacted]`.

mod args;
mod secret;

use std::str::FromStr;

pub use args::{AppEnv, LogArgs};
pub use secret::{REDACTED, Secret};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable, coloured when stderr is a terminal.
    #[default]
    Pretty,
    /// One JSON object per line, for log shippers.
    Json,
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "pretty" | "text" => Ok(Self::Pretty),
            "json" => Ok(Self::Json),
            other => Err(format!(
                "unknown log format {other:?}: expected `pretty` or `json`"
            )),
        }
    }
}

/// Everything [`init`] needs.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// The service's name, reported as Sentry's `service` tag.
    pub service: &'static str,
    pub format: LogFormat,
    /// An `EnvFilter` directive, e.g. `info` or `info,dbclient=debug`.
    pub filter: String,
    /// Sentry DSN; `None` disables Sentry entirely.
    pub sentry_dsn: Option<Secret<String>>,
    /// Deployment environment (`localdev`, `dev`, `staging`, `prod`), reported to Sentry.
    pub environment: String,
    /// Release identifier (git commit), reported to Sentry.
    pub release: String,
}

impl LogConfig {
    /// Development defaults: pretty output at `info`, no Sentry.
    pub fn development(service: &'static str) -> Self {
        Self {
            service,
            format: LogFormat::Pretty,
            filter: "info".to_owned(),
            sentry_dsn: None,
            environment: "localdev".to_owned(),
            release: String::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoggerError {
    #[error("invalid log filter {filter:?}: {source}")]
    Filter {
        filter: String,
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
    #[error("invalid Sentry DSN (value redacted): {0}")]
    SentryDsn(String),
    #[error("a global logger is already installed: {0}")]
    AlreadyInstalled(String),
}

/// Keeps Sentry alive; dropping it flushes pending events (up to Sentry's shutdown timeout).
#[must_use = "dropping the guard flushes and stops Sentry"]
pub struct LoggerGuard {
    _sentry: Option<sentry::ClientInitGuard>,
}

impl std::fmt::Debug for LoggerGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoggerGuard")
            .field("sentry", &self._sentry.is_some())
            .finish()
    }
}

/// Builds the filter from a directive, rejecting typos instead of silently logging nothing.
pub fn parse_filter(filter: &str) -> Result<EnvFilter, LoggerError> {
    EnvFilter::builder()
        .with_default_directive(LevelFilter::INFO.into())
        .parse(filter)
        .map_err(|source| LoggerError::Filter {
            filter: filter.to_owned(),
            source,
        })
}

/// Installs the process-wide subscriber, Sentry (when configured) and the panic hook.
pub fn init(config: &LogConfig) -> Result<LoggerGuard, LoggerError> {
    let filter = parse_filter(&config.filter)?;
    let sentry_guard = match &config.sentry_dsn {
        Some(dsn) => Some(init_sentry(config, dsn)?),
        None => None,
    };

    let output = match config.format {
        LogFormat::Pretty => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_target(true)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .boxed(),
    };
    let sentry_layers = sentry_guard.as_ref().map(|_| {
        sentry::integrations::tracing::ErrorLayer::new()
            .with_filter(LevelFilter::ERROR)
            .and_then(
                sentry::integrations::tracing::BreadcrumbLayer::new().with_filter(
                    tracing_subscriber::filter::filter_fn(|m| {
                        matches!(*m.level(), tracing::Level::WARN | tracing::Level::INFO)
                    }),
                ),
            )
    });
    tracing_subscriber::registry()
        .with(output.with_filter(filter))
        .with(sentry_layers)
        .try_init()
        .map_err(|e| LoggerError::AlreadyInstalled(e.to_string()))?;

    install_panic_hook();
    tracing::debug!(
        service = config.service,
        sentry = sentry_guard.is_some(),
        "logging ready"
    );
    Ok(LoggerGuard {
        _sentry: sentry_guard,
    })
}

fn init_sentry(
    config: &LogConfig,
    dsn: &Secret<String>,
) -> Result<sentry::ClientInitGuard, LoggerError> {
    // The DSN's text is never put in the error: it carries the project's key.
    let parsed = dsn
        .expose()
        .parse::<sentry::types::Dsn>()
        .map_err(|e| LoggerError::SentryDsn(e.to_string()))?;
    let mut options = sentry::ClientOptions::new();
    options.dsn = Some(parsed);
    options.environment = Some(config.environment.clone().into());
    options.release = (!config.release.is_empty()).then(|| config.release.clone().into());
    // Request bodies and headers can hold user tokens: never send them.
    options.send_default_pii = false;
    // TLS to Sentry is always verified.
    options.accept_invalid_certs = false;
    let guard = sentry::init(options);
    sentry::configure_scope(|scope| scope.set_tag("service", config.service));
    Ok(guard)
}

/// Adds tags to every Sentry event this process sends from now on (the host's identity once it
/// has read IMDS: instance id, AMI, region, instance type, commit). Harmless without Sentry.
/// Tag values are identifiers, never secrets: callers pass no credential here.
pub fn tag_scope<'a>(tags: impl IntoIterator<Item = (&'a str, &'a str)>) {
    let tags: Vec<(&str, &str)> = tags.into_iter().collect();
    sentry::configure_scope(|scope| {
        for (key, value) in &tags {
            scope.set_tag(key, value);
        }
    });
}

/// Logs every panic as an ERROR event with its location, then runs the previous hook (Sentry's,
/// when enabled, and Rust's default message).
fn install_panic_hook() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "non-string panic payload".to_owned());
        let location = info
            .location()
            .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()))
            .unwrap_or_default();
        let thread = std::thread::current();
        tracing::error!(
            panic.message = %message,
            panic.location = %location,
            thread = thread.name().unwrap_or("<unnamed>"),
            "panic"
        );
        previous(info);
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_format_parses_known_names_only() {
        assert_eq!("json".parse::<LogFormat>(), Ok(LogFormat::Json));
        assert_eq!("Pretty".parse::<LogFormat>(), Ok(LogFormat::Pretty));
        assert!("yaml".parse::<LogFormat>().is_err());
    }

    #[test]
    fn bad_filter_is_an_error_not_silence() {
        assert!(parse_filter("info,dbclient=debug").is_ok());
        assert!(matches!(
            parse_filter("info,=lol=="),
            Err(LoggerError::Filter { .. })
        ));
    }

    #[test]
    fn bad_dsn_error_does_not_echo_the_dsn() {
        let config = LogConfig {
            sentry_dsn: Some(Secret::new("not a dsn secretkey123".to_owned())),
            ..LogConfig::development("test")
        };
        let error = init(&config).unwrap_err();
        assert!(matches!(error, LoggerError::SentryDsn(_)));
        assert!(!error.to_string().contains("secretkey123"), "{error}");
    }
}
