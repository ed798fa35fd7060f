//! [`DbConfig`]: where Hasura is, how to authenticate, how long to wait.

use std::time::Duration;

use logger::Secret;
use url::Url;

/// A configuration that cannot work. Never contains the admin secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("the GraphQL URL is not a valid URL: {reason}")]
    InvalidUrl { reason: String },
    #[error("the GraphQL URL {url} must use http or https, not {scheme}")]
    UnsupportedScheme { url: String, scheme: String },
    #[error(
        "the GraphQL URL {url_without_credentials} carries credentials; pass the admin secret separately"
    )]
    CredentialsInUrl { url_without_credentials: String },
    #[error("the admin secret is empty; leave it unset for a server without one")]
    EmptyAdminSecret,
    #[error("the admin secret contains characters that cannot be sent in an HTTP header")]
    InvalidAdminSecret,
    #[error("the bearer token contains characters that cannot be sent in an HTTP header")]
    InvalidBearerToken,
    #[error("the {which} timeout must be between 1 ms and {max:?}, got {value:?}")]
    InvalidTimeout {
        which: &'static str,
        value: Duration,
        max: Duration,
    },
    #[error("the connect timeout {connect:?} is longer than the request timeout {request:?}")]
    ConnectLongerThanRequest {
        connect: Duration,
        request: Duration,
    },
    #[error("cannot set up TLS: {0}")]
    Tls(String),
    #[error("cannot build the HTTP client: {0}")]
    HttpClient(String),
    #[error("the subscription client must be started from within a tokio runtime")]
    NoRuntime,
}

/// How to reach Hasura. Built with [`DbConfig::new`], which validates everything once.
#[derive(Debug, Clone)]
pub struct DbConfig {
    graphql_url: Url,
    websocket_url: Url,
    admin_secret: Option<Secret<String>>,
    request_timeout: Duration,
    connect_timeout: Duration,
}

impl DbConfig {
    /// Default deadline for one query or mutation, connect included. Hasura answers our
    /// by-index lookups in milliseconds; 10 s leaves room for a cold connection pool without
    /// letting a hung server stall a scaling decision or a host's heartbeat for long.
    pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
    /// Default deadline for TCP + TLS connect (and the WebSocket handshake up to
    /// `connection_ack`). A healthy endpoint connects in well under a second.
    pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
    /// Longest timeout accepted: anything longer is a configuration mistake.
    pub const MAX_TIMEOUT: Duration = Duration::from_secs(600);

    /// Validates `graphql_url` (`http://` or `https://`, e.g. `https://hasura.example/v1/graphql`;
    /// the WebSocket URL is derived from it: `http` → `ws`, `https` → `wss`, never a downgrade)
    /// and the admin secret, with the default timeouts.
    pub fn new(
        graphql_url: &str,
        admin_secret: Option<Secret<String>>,
    ) -> Result<Self, ConfigError> {
        let graphql_url = Url::parse(graphql_url).map_err(|error| ConfigError::InvalidUrl {
            reason: error.to_string(),
        })?;
        if !graphql_url.username().is_empty() || graphql_url.password().is_some() {
            let mut stripped = graphql_url.clone();
            // Both only fail for URLs that cannot carry credentials, which this one does.
            let _ = stripped.set_username("");
            let _ = stripped.set_password(None);
            return Err(ConfigError::CredentialsInUrl {
                url_without_credentials: stripped.to_string(),
            });
        }
        let websocket_scheme = match graphql_url.scheme() {
            "http" => "ws",
            "https" => "wss",
            other => {
                return Err(ConfigError::UnsupportedScheme {
                    url: graphql_url.to_string(),
                    scheme: other.to_owned(),
                });
            }
        };
        if graphql_url.host_str().is_none_or(str::is_empty) {
            return Err(ConfigError::InvalidUrl {
                reason: "no host".to_owned(),
            });
        }
        let mut websocket_url = graphql_url.clone();
        websocket_url
            .set_scheme(websocket_scheme)
            .map_err(|()| ConfigError::InvalidUrl {
                reason: format!("cannot derive a {websocket_scheme} URL"),
            })?;
        if let Some(secret) = &admin_secret {
            if secret.expose().is_empty() {
                return Err(ConfigError::EmptyAdminSecret);
            }
            if http::HeaderValue::from_str(secret.expose()).is_err() {
                return Err(ConfigError::InvalidAdminSecret);
            }
        }
        Ok(Self {
            graphql_url,
            websocket_url,
            admin_secret,
            request_timeout: Self::DEFAULT_REQUEST_TIMEOUT,
            connect_timeout: Self::DEFAULT_CONNECT_TIMEOUT,
        })
    }

    /// Replaces both timeouts; each must be in `1 ms ..= MAX_TIMEOUT` and `connect <= request`.
    pub fn with_timeouts(
        mut self,
        request_timeout: Duration,
        connect_timeout: Duration,
    ) -> Result<Self, ConfigError> {
        for (which, value) in [("request", request_timeout), ("connect", connect_timeout)] {
            if value < Duration::from_millis(1) || value > Self::MAX_TIMEOUT {
                return Err(ConfigError::InvalidTimeout {
                    which,
                    value,
                    max: Self::MAX_TIMEOUT,
                });
            }
        }
        if connect_timeout > request_timeout {
            return Err(ConfigError::ConnectLongerThanRequest {
                connect: connect_timeout,
                request: request_timeout,
            });
        }
        self.request_timeout = request_timeout;
        self.connect_timeout = connect_timeout;
        Ok(self)
    }

    /// `http(s)://…/v1/graphql`: queries and mutations.
    pub fn graphql_url(&self) -> &Url {
        &self.graphql_url
    }

    /// `ws(s)://…/v1/graphql`: subscriptions.
    pub fn websocket_url(&self) -> &Url {
        &self.websocket_url
    }

    pub fn admin_secret(&self) -> Option<&Secret<String>> {
        self.admin_secret.as_ref()
    }

    pub fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(s: &str) -> Option<Secret<String>> {
        Some(Secret::new(s.to_owned()))
    }

    #[test]
    fn websocket_url_keeps_tls_and_path() {
        let config = DbConfig::new("https://hasura.example:8443/v1/graphql", None).unwrap();
        assert_eq!(
            config.websocket_url().as_str(),
            "wss://hasura.example:8443/v1/graphql"
        );
        let config = DbConfig::new("http://127.0.0.1:8080/v1/graphql", None).unwrap();
        assert_eq!(
            config.websocket_url().as_str(),
            "ws://127.0.0.1:8080/v1/graphql"
        );
    }

    #[test]
    fn bad_urls_are_rejected_with_clear_errors() {
        assert!(matches!(
            DbConfig::new("not a url", None),
            Err(ConfigError::InvalidUrl { .. })
        ));
        assert!(matches!(
            DbConfig::new("ws://hasura/v1/graphql", None),
            Err(ConfigError::UnsupportedScheme { .. })
        ));
        assert!(matches!(
            DbConfig::new("ftp://hasura/v1/graphql", None),
            Err(ConfigError::UnsupportedScheme { .. })
        ));
        let err = DbConfig::new("https://admin:hunter2@hasura/v1/graphql", None).unwrap_err();
        assert!(matches!(err, ConfigError::CredentialsInUrl { .. }));
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    #[test]
    fn admin_secret_is_validated_and_never_printed() {
        assert_eq!(
            DbConfig::new("http://h/v1/graphql", secret("")).unwrap_err(),
            ConfigError::EmptyAdminSecret
        );
        assert_eq!(
            DbConfig::new("http://h/v1/graphql", secret("a\nb")).unwrap_err(),
            ConfigError::InvalidAdminSecret
        );
        let config = DbConfig::new("http://h/v1/graphql", secret("hunter2")).unwrap();
        assert!(!format!("{config:?}").contains("hunter2"));
    }

    #[test]
    fn timeouts_are_validated() {
        let config = DbConfig::new("http://h/v1/graphql", None).unwrap();
        assert_eq!(config.request_timeout(), DbConfig::DEFAULT_REQUEST_TIMEOUT);
        assert!(matches!(
            config
                .clone()
                .with_timeouts(Duration::ZERO, Duration::from_secs(1)),
            Err(ConfigError::InvalidTimeout {
                which: "request",
                ..
            })
        ));
        assert!(matches!(
            config
                .clone()
                .with_timeouts(Duration::from_secs(1), Duration::from_secs(601)),
            Err(ConfigError::InvalidTimeout {
                which: "connect",
                ..
            })
        ));
        assert!(matches!(
            config
                .clone()
                .with_timeouts(Duration::from_secs(1), Duration::from_secs(2)),
            Err(ConfigError::ConnectLongerThanRequest { .. })
        ));
        let config = config
            .with_timeouts(Duration::from_secs(3), Duration::from_secs(1))
            .unwrap();
        assert_eq!(config.connect_timeout(), Duration::from_secs(1));
    }
}
