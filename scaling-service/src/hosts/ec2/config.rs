//! What an [`Ec2HostHandler`](super::Ec2HostHandler) is built from, and why building one fails.

use std::collections::BTreeMap;
use std::fmt;

use dbclient::types::Region;

use super::RetryPolicy;
use super::user_data::MAX_USER_DATA_BYTES;

/// Static credentials, for moto and tests; production uses the default chain (env, profile, IMDS).
#[derive(Clone)]
pub struct StaticCredentials {
    pub access_key_id: String,
    pub secret_access_key: String,
}

impl fmt::Debug for StaticCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StaticCredentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .finish()
    }
}

/// Where the host finds Hasura's admin secret.
#[derive(Clone)]
pub enum AdminSecret {
    /// The name of an SSM SecureString the instance profile may read (preferred: the secret
    /// never appears in user data).
    SsmParameter(String),
    /// The secret itself, written into user data.
    Inline(String),
}

impl fmt::Debug for AdminSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::SsmParameter(name) => f.debug_tuple("SsmParameter").field(name).finish(),
            Self::Inline(_) => f.debug_tuple("Inline").field(&"<redacted>").finish(),
        }
    }
}

/// The values the user data template takes besides the environment.
#[derive(Debug, Clone)]
pub struct HostServiceSettings {
    pub hasura_graphql_url: String,
    pub admin_secret: AdminSecret,
    pub sentry_dsn: Option<String>,
    pub image_registry: Option<String>,
    pub log_filter: Option<String>,
    /// The host service's `/metrics`, `/healthz`, `/readyz` address (`PRIVATE_IP:PORT` is
    /// resolved on the host).
    pub ops_addr: Option<String>,
    /// CIDRs (comma-separated) besides loopback that may reach that endpoint.
    pub ops_allow: Option<String>,
    /// Values for placeholders this struct does not name yet (a newer template).
    pub extra: BTreeMap<String, String>,
}

/// A set of `tag:KEY = VALUE` filters, all of which must match.
pub type TagFilter = Vec<(String, String)>;

/// Everything an [`Ec2HostHandler`] needs.
#[derive(Debug, Clone)]
pub struct Ec2Config {
    pub region: Region,
    /// `Some` for moto or another local endpoint.
    pub endpoint_url: Option<String>,
    /// `None`: the default credential chain.
    pub credentials: Option<StaticCredentials>,
    /// `dev`, `staging` or `prod`: the `whist-env` tag and the host's `APP_ENV`.
    pub environment: String,
    /// An instance profile name, or its ARN (`arn:...`).
    pub instance_profile: String,
    pub subnet_tags: TagFilter,
    pub security_group_tags: TagFilter,
    pub host_service: HostServiceSettings,
    pub retry: RetryPolicy,
}

impl Ec2Config {
    /// A configuration with the original's lookups: the subnet tagged `Env=<env>` and
    /// `Terraform=true`, the security group tagged `Name=MandelboxesSecurityGroup<env>`.
    pub fn new(
        region: Region,
        environment: impl Into<String>,
        instance_profile: impl Into<String>,
        host_service: HostServiceSettings,
    ) -> Self {
        let environment = environment.into();
        Self {
            region,
            endpoint_url: None,
            credentials: None,
            subnet_tags: vec![
                ("Env".to_owned(), environment.clone()),
                ("Terraform".to_owned(), "true".to_owned()),
            ],
            security_group_tags: vec![(
                "Name".to_owned(),
                format!("MandelboxesSecurityGroup{environment}"),
            )],
            environment,
            instance_profile: instance_profile.into(),
            host_service,
            retry: RetryPolicy::default(),
        }
    }
}

/// Why an [`Ec2HostHandler`] cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum Ec2ConfigError {
    #[error("environment {0:?} must be dev, staging or prod (or localdevwithdb against moto)")]
    Environment(String),
    #[error("localdevwithdb launches only into a local EC2 endpoint (moto): set AWS_ENDPOINT_URL")]
    LocalWithoutEndpoint,
    #[error("instance profile must not be empty")]
    InstanceProfile,
    #[error("user data value {name} is not allowed: {reason}")]
    UserDataValue { name: String, reason: &'static str },
    #[error(
        "user data template has placeholder {{{{{name}}}}} that the scaling service does not fill"
    )]
    UserDataPlaceholder { name: String },
    #[error("user data is {bytes} bytes, over EC2's limit of {MAX_USER_DATA_BYTES}")]
    UserDataTooLarge { bytes: usize },
    #[error("{what} tag filter must not be empty")]
    EmptyFilter { what: &'static str },
    #[error("endpoint URL {url:?} is invalid: {reason}")]
    Endpoint { url: String, reason: String },
}
