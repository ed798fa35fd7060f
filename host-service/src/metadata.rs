//! Who this host is, from the EC2 instance metadata service (IMDSv2).
//!
//! [`InstanceMetadata`] is the narrow surface: one call, [`InstanceMetadata::identity`], that
//! answers everything the host service needs to register itself and tag its logs. Its real
//! implementation, [`ImdsMetadata`], uses aws-config's IMDS client (IMDSv2 only: a session token
//! from `PUT /latest/api/token`, then `GET`s carrying it), so it works on instances that require
//! tokens, where the original's plain IMDSv1 `GET`s would fail. The instance's `Name` comes from
//! instance tags in metadata (`meta-data/tags/instance/Name`), not from the EC2 API: the host
//! service holds no AWS credentials and does not link the EC2 SDK.
//!
//! Absent is not an error: an instance without a public address answers 404 for `public-ipv4`,
//! and one without the `Name` tag (or with tags in metadata disabled) answers 404 for the tag;
//! both become `None`. Anything else that fails names the endpoint and the path.

use edge::error_chain;
use std::future::Future;
use std::net::Ipv4Addr;
use std::time::Duration;

use aws_config::imds::client::error::ImdsError;
use dbclient::types::{ImageId, InstanceId, Region};

/// Connect timeout of each IMDS request. IMDS is a link-local service that answers in about a
/// millisecond; a connect that takes a second means there is no IMDS here (not on EC2, or the
/// hop limit or a firewall drops it).
pub const IMDS_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Read timeout of each IMDS request, for the same reason.
pub const IMDS_READ_TIMEOUT: Duration = Duration::from_secs(1);
/// Attempts per request. The SDK retries only answers worth retrying (5xx, and 401 for an
/// expired token), with jittered exponential backoff from 1 s; three attempts ride out an IMDS
/// hiccup or throttling without stretching the host's start.
pub const IMDS_MAX_ATTEMPTS: u32 = 3;
/// Deadline of one request, all attempts and backoff included: two backoffs (up to 1 s and
/// 2 s) plus three short attempts.
pub const IMDS_OPERATION_TIMEOUT: Duration = Duration::from_secs(6);
/// Deadline of a whole [`InstanceMetadata::identity`] call: the first request (which fetches the
/// token) and then the others, concurrently, each within [`IMDS_OPERATION_TIMEOUT`]; a
/// backstop, since the per-request deadlines fire first.
pub const IDENTITY_TIMEOUT: Duration = Duration::from_secs(13);
/// The session token lifetime asked for. A host reads its identity at start; a short token
/// limits what a leaked one is worth, and the client fetches a new one when it expires.
pub const IMDS_TOKEN_TTL: Duration = Duration::from_secs(300);

/// The endpoint the SDK uses when nothing overrides it.
pub const DEFAULT_IMDS_ENDPOINT: &str = "http://169.254.169.254";
/// The environment variable the SDK reads for an endpoint override.
pub const IMDS_ENDPOINT_ENV: &str = "AWS_EC2_METADATA_SERVICE_ENDPOINT";

const PATH_INSTANCE_ID: &str = "/latest/meta-data/instance-id";
const PATH_AMI_ID: &str = "/latest/meta-data/ami-id";
const PATH_REGION: &str = "/latest/meta-data/placement/region";
const PATH_INSTANCE_TYPE: &str = "/latest/meta-data/instance-type";
const PATH_PUBLIC_IPV4: &str = "/latest/meta-data/public-ipv4";
const PATH_PRIVATE_IPV4: &str = "/latest/meta-data/local-ipv4";
const PATH_NAME_TAG: &str = "/latest/meta-data/tags/instance/Name";

/// Longest value echoed in an error, so a garbage answer cannot flood a log line.
const MAX_ECHOED_CHARS: usize = 80;

/// What this host is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceIdentity {
    pub instance_id: InstanceId,
    /// The machine image the instance was launched from (`ami-...`).
    pub ami_id: ImageId,
    pub region: Region,
    /// e.g. `g4dn.xlarge`.
    pub instance_type: String,
    /// `None` when the instance has no public address.
    pub public_ipv4: Option<Ipv4Addr>,
    /// `None` when IMDS reports none (it always does on EC2; a fake may not).
    pub private_ipv4: Option<Ipv4Addr>,
    /// The `Name` instance tag; `None` when it is missing, empty, or tags in metadata are off.
    pub name: Option<String>,
}

impl InstanceIdentity {
    /// What every error report from this host carries (Sentry's scope tags), so an event names
    /// the host it came from: the identity IMDS gave and the commit this binary was built from.
    pub fn report_tags(&self, commit: &str) -> Vec<(&'static str, String)> {
        let mut tags = vec![
            ("instance.id", self.instance_id.to_string()),
            ("instance.ami", self.ami_id.to_string()),
            ("instance.type", self.instance_type.clone()),
            ("region", self.region.to_string()),
            ("commit", commit.to_owned()),
        ];
        if let Some(name) = &self.name {
            tags.push(("instance.name", name.clone()));
        }
        tags
    }
}

/// Why the identity could not be read. Every variant names the endpoint (and path) involved.
#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    #[error("invalid IMDS endpoint {endpoint:?}: {message}")]
    Endpoint { endpoint: String, message: String },
    #[error("IMDS at {endpoint} is unreachable ({path}): {message}")]
    Unreachable {
        endpoint: String,
        path: String,
        message: String,
    },
    #[error("IMDS at {endpoint} answered HTTP {status} for {path}")]
    Status {
        endpoint: String,
        path: String,
        status: u16,
    },
    #[error("IMDS at {endpoint} refused a session token: {message}")]
    Token { endpoint: String, message: String },
    #[error("IMDS at {endpoint} gave an invalid {path} {value:?}: {reason}")]
    Invalid {
        endpoint: String,
        path: String,
        value: String,
        reason: String,
    },
    #[error("IMDS at {endpoint} did not answer within {timeout:?}")]
    Timeout { endpoint: String, timeout: Duration },
}

/// The instance metadata service.
pub trait InstanceMetadata: Send + Sync {
    /// Reads this instance's identity, within a bounded time. Not cached: the host reads it
    /// once at start, and a failure can simply be retried.
    fn identity(&self) -> impl Future<Output = Result<InstanceIdentity, MetadataError>> + Send;
}

/// [`InstanceMetadata`] over aws-config's IMDSv2 client.
#[derive(Debug, Clone)]
pub struct ImdsMetadata {
    client: aws_config::imds::Client,
    /// Where requests go, for error messages.
    endpoint: String,
}

impl ImdsMetadata {
    /// A client for `endpoint` (e.g. `http://127.0.0.1:1338`), or, with `None`, for the
    /// endpoint the SDK resolves: `AWS_EC2_METADATA_SERVICE_ENDPOINT`, then
    /// `ec2_metadata_service_endpoint` in `~/.aws/config`, then `http://169.254.169.254`.
    pub fn new(endpoint: Option<&str>) -> Result<Self, MetadataError> {
        let builder = aws_config::imds::Client::builder()
            .max_attempts(IMDS_MAX_ATTEMPTS)
            .connect_timeout(IMDS_CONNECT_TIMEOUT)
            .read_timeout(IMDS_READ_TIMEOUT)
            .operation_attempt_timeout(IMDS_CONNECT_TIMEOUT + IMDS_READ_TIMEOUT)
            .operation_timeout(IMDS_OPERATION_TIMEOUT)
            .token_ttl(IMDS_TOKEN_TTL);
        let (builder, described) = match endpoint {
            Some(endpoint) => {
                let builder = builder
                    .endpoint(endpoint)
                    .map_err(|e| MetadataError::Endpoint {
                        endpoint: endpoint.to_owned(),
                        message: e.to_string(),
                    })?;
                (builder, endpoint.to_owned())
            }
            None => {
                let described = match std::env::var(IMDS_ENDPOINT_ENV) {
                    Ok(value) => format!("{value} (from {IMDS_ENDPOINT_ENV})"),
                    Err(_) => format!("{DEFAULT_IMDS_ENDPOINT} (SDK default chain)"),
                };
                (builder, described)
            }
        };
        Ok(Self {
            client: builder.build(),
            endpoint: described,
        })
    }

    /// The endpoint requests go to, as shown in errors.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Reads `path`; `Ok(None)` when IMDS answers 404.
    async fn get_optional(&self, path: &str) -> Result<Option<String>, MetadataError> {
        match self.client.get(path).await {
            Ok(value) => Ok(Some(String::from(value))),
            Err(ImdsError::ErrorResponse(response))
                if response.response().status().as_u16() == 404 =>
            {
                Ok(None)
            }
            Err(error) => Err(self.map_error(path, error)),
        }
    }

    /// Reads `path`, which must exist.
    async fn get_required(&self, path: &str) -> Result<String, MetadataError> {
        match self.client.get(path).await {
            Ok(value) => Ok(String::from(value)),
            Err(error) => Err(self.map_error(path, error)),
        }
    }

    fn map_error(&self, path: &str, error: ImdsError) -> MetadataError {
        let endpoint = self.endpoint.clone();
        let path = path.to_owned();
        let message = error_chain(&error);
        match &error {
            ImdsError::ErrorResponse(response) => MetadataError::Status {
                endpoint,
                path,
                status: response.response().status().as_u16(),
            },
            ImdsError::FailedToLoadToken(token) if !token.is_dispatch_failure() => {
                MetadataError::Token { endpoint, message }
            }
            _ => MetadataError::Unreachable {
                endpoint,
                path,
                message,
            },
        }
    }

    fn invalid(&self, path: &str, value: &str, reason: impl ToString) -> MetadataError {
        MetadataError::Invalid {
            endpoint: self.endpoint.clone(),
            path: path.to_owned(),
            value: value.chars().take(MAX_ECHOED_CHARS).collect(),
            reason: reason.to_string(),
        }
    }

    fn parse_ipv4(
        &self,
        path: &str,
        value: Option<String>,
    ) -> Result<Option<Ipv4Addr>, MetadataError> {
        value
            .map(|v| {
                v.trim()
                    .parse::<Ipv4Addr>()
                    .map_err(|e| self.invalid(path, &v, e))
            })
            .transpose()
    }

    async fn read_identity(&self) -> Result<InstanceIdentity, MetadataError> {
        // The first read alone: it fetches the session token, which the client then caches for
        // the rest. Concurrent first reads would each wait on, and then retry, a failing token
        // fetch, doubling the time to report an unreachable IMDS.
        let instance_id = self.get_required(PATH_INSTANCE_ID).await?;
        let (ami_id, region, instance_type, public_ipv4, private_ipv4, name) = tokio::join!(
            self.get_required(PATH_AMI_ID),
            self.get_required(PATH_REGION),
            self.get_required(PATH_INSTANCE_TYPE),
            self.get_optional(PATH_PUBLIC_IPV4),
            self.get_optional(PATH_PRIVATE_IPV4),
            self.get_optional(PATH_NAME_TAG),
        );
        let ami_id = ami_id?;
        let region = region?;
        let instance_type = instance_type?.trim().to_owned();
        if instance_type.is_empty() {
            return Err(self.invalid(PATH_INSTANCE_TYPE, "", "empty"));
        }
        Ok(InstanceIdentity {
            instance_id: InstanceId::new(instance_id.trim())
                .map_err(|e| self.invalid(PATH_INSTANCE_ID, &instance_id, e))?,
            ami_id: ImageId::new(ami_id.trim())
                .map_err(|e| self.invalid(PATH_AMI_ID, &ami_id, e))?,
            region: Region::new(region.trim())
                .map_err(|e| self.invalid(PATH_REGION, &region, e))?,
            instance_type,
            public_ipv4: self.parse_ipv4(PATH_PUBLIC_IPV4, public_ipv4?)?,
            private_ipv4: self.parse_ipv4(PATH_PRIVATE_IPV4, private_ipv4?)?,
            name: name?.filter(|n| !n.is_empty()),
        })
    }
}

impl InstanceMetadata for ImdsMetadata {
    async fn identity(&self) -> Result<InstanceIdentity, MetadataError> {
        match tokio::time::timeout(IDENTITY_TIMEOUT, self.read_identity()).await {
            Ok(result) => result,
            Err(_) => Err(MetadataError::Timeout {
                endpoint: self.endpoint.clone(),
                timeout: IDENTITY_TIMEOUT,
            }),
        }
    }
}

/// A fixed identity, for tests of code that needs an [`InstanceMetadata`]; `fail_next` makes the
/// next call fail.
#[derive(Debug, Default)]
pub struct FakeMetadata {
    identity: std::sync::Mutex<Option<InstanceIdentity>>,
    next_error: std::sync::Mutex<Option<MetadataError>>,
}

impl FakeMetadata {
    pub fn new(identity: InstanceIdentity) -> Self {
        Self {
            identity: std::sync::Mutex::new(Some(identity)),
            next_error: std::sync::Mutex::new(None),
        }
    }

    /// Makes the next [`InstanceMetadata::identity`] call fail with `error`.
    pub fn fail_next(&self, error: MetadataError) {
        let mut next = match self.next_error.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        *next = Some(error);
    }
}

impl InstanceMetadata for FakeMetadata {
    async fn identity(&self) -> Result<InstanceIdentity, MetadataError> {
        let injected = match self.next_error.lock() {
            Ok(mut guard) => guard.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        if let Some(error) = injected {
            return Err(error);
        }
        let identity = match self.identity.lock() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        identity.ok_or_else(|| MetadataError::Unreachable {
            endpoint: "fake".to_owned(),
            path: PATH_INSTANCE_ID.to_owned(),
            message: "no identity configured".to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> InstanceIdentity {
        InstanceIdentity {
            instance_id: InstanceId::new("i-0123456789abcdef0").unwrap(),
            ami_id: ImageId::new("ami-0123456789abcdef0").unwrap(),
            region: Region::new("us-east-1").unwrap(),
            instance_type: "g4dn.xlarge".into(),
            public_ipv4: None,
            private_ipv4: Some(Ipv4Addr::new(10, 0, 0, 1)),
            name: None,
        }
    }

    #[test]
    fn report_tags_name_the_host_and_its_commit() {
        let tags = identity().report_tags("abc123");
        let get = |key: &str| {
            tags.iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("instance.id"), Some("i-0123456789abcdef0"));
        assert_eq!(get("instance.ami"), Some("ami-0123456789abcdef0"));
        assert_eq!(get("instance.type"), Some("g4dn.xlarge"));
        assert_eq!(get("region"), Some("us-east-1"));
        assert_eq!(get("commit"), Some("abc123"));
        assert_eq!(get("instance.name"), None);
        let named = InstanceIdentity {
            name: Some("host-7".into()),
            ..identity()
        };
        assert!(
            named
                .report_tags("abc123")
                .contains(&("instance.name", "host-7".into()))
        );
    }

    #[tokio::test]
    async fn fake_answers_its_identity_and_fails_once_when_told() {
        let fake = FakeMetadata::new(identity());
        fake.fail_next(MetadataError::Timeout {
            endpoint: "fake".into(),
            timeout: IDENTITY_TIMEOUT,
        });
        assert!(matches!(
            fake.identity().await,
            Err(MetadataError::Timeout { .. })
        ));
        assert_eq!(fake.identity().await.unwrap(), identity());
    }

    #[test]
    fn a_malformed_endpoint_is_a_clear_error() {
        let error = ImdsMetadata::new(Some("http://[::1")).unwrap_err();
        assert!(error.to_string().contains("http://[::1"), "{error}");
    }
}
