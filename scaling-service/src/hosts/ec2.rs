//! [`HostHandler`] over EC2 (aws-sdk-ec2).
//!
//! What a launch sends: the AMI and type of the request, `MinCount = MaxCount = count` (all or
//! nothing: no silent partial launches), the rendered `host-setup/ec2_userdata.sh` (it writes the
//! host service's environment file and starts its unit), the IAM instance profile, the subnet and
//! security group found by tags (looked up once per handler), IMDSv2 only with a hop limit of 1
//! and instance tags in IMDS, EBS-optimised, shutdown behaviour `terminate`, and tags applied by
//! RunInstances itself (`Name`, `whist-env`, `whist-managed-by`, `whist-launch-id`, `whist-commit`),
//! so an instance is never untagged, even for a moment.
//!
//! Idempotency: a launch is identified by its `launch_id`. Before every attempt the handler looks
//! for instances tagged with that id and returns them if there are any; the `ClientToken`
//! derived from the id covers EC2's eventually consistent tag index (moto ignores the token,
//! real EC2 honours it), so a retried launch never launches twice.
//!
//! Retries: only errors that [`HostError::is_retryable`] accepts (throttling, 5xx, capacity,
//! network, timeouts) are retried, with capped exponential backoff and jitter, within an
//! overall deadline ([`RetryPolicy`]). The SDK's own retries are switched off, so this is the
//! one place that decides.

use edge::backoff::{Backoff, Jitter};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_sdk_ec2::Client;
use aws_sdk_ec2::config::retry::RetryConfig;
use aws_sdk_ec2::config::timeout::TimeoutConfig;
use aws_sdk_ec2::config::{Credentials, Region as SdkRegion};
use aws_sdk_ec2::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::types::{
    Filter, HttpTokensState, IamInstanceProfileSpecification, Instance,
    InstanceMetadataOptionsRequest, InstanceMetadataTagsState, InstanceStateName, InstanceType,
    ResourceType, ShutdownBehavior, Tag, TagSpecification,
};
use chrono::{DateTime, Utc};
use dbclient::types::{ImageId, InstanceId, Region};
use tokio::sync::OnceCell;
use tokio::time::Instant;

use super::{HostError, HostHandler, HostInstance, HostState, InstanceTypeInfo, LaunchRequest};

/// The user data template (see its header for the placeholder contract).
const USER_DATA_TEMPLATE: &str = include_str!("../../../host-setup/ec2_userdata.sh");
/// EC2 refuses user data over 16 KiB (before base64).
const MAX_USER_DATA_BYTES: usize = 16 * 1024;

/// Tag keys. `whist-managed-by` is what [`HostHandler::list_managed`] and reconciliation trust:
/// an instance without it was not launched by us and is never touched.
pub const TAG_NAME: &str = "Name";
pub const TAG_ENVIRONMENT: &str = "whist-env";
pub const TAG_MANAGED_BY: &str = "whist-managed-by";
pub const TAG_LAUNCH_ID: &str = "whist-launch-id";
pub const TAG_COMMIT: &str = "whist-commit";
pub const MANAGED_BY: &str = "whist-scaling-service";

/// Backoff before the first retry of an EC2 call: EC2's throttling guidance starts at a fraction
/// of a second.
pub const API_RETRY_BASE: Duration = Duration::from_millis(250);
/// Longest wait between two attempts: the request-token bucket of EC2 refills within seconds.
pub const API_RETRY_CAP: Duration = Duration::from_secs(10);
/// Give up on one operation after this long: a scaling pass runs every few minutes, so a launch
/// that cannot get through in two is better reported and retried by the next pass.
pub const API_RETRY_DEADLINE: Duration = Duration::from_secs(120);
/// One HTTP attempt: RunInstances answers in about a second; 30 s means the call is lost.
pub const API_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);
/// TCP/TLS connect to the EC2 endpoint.
pub const API_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// First poll interval of `wait_running`/`wait_terminated`: EC2 instances take 10-60 s to run.
pub const POLL_BASE: Duration = Duration::from_secs(2);
/// Longest poll interval: keeps DescribeInstances well under the API rate limit.
pub const POLL_CAP: Duration = Duration::from_secs(15);
/// At most this many ids per DescribeInstances/TerminateInstances call (EC2's limit is 1000).
const IDS_PER_CALL: usize = 200;

/// How [`Ec2HostHandler`] retries and polls. [`RetryPolicy::default`] is production;
/// tests shrink it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub base: Duration,
    pub cap: Duration,
    /// Overall time for one operation, all attempts and waits included.
    pub deadline: Duration,
    pub attempt_timeout: Duration,
    pub connect_timeout: Duration,
    pub poll_base: Duration,
    pub poll_cap: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            base: API_RETRY_BASE,
            cap: API_RETRY_CAP,
            deadline: API_RETRY_DEADLINE,
            attempt_timeout: API_ATTEMPT_TIMEOUT,
            connect_timeout: API_CONNECT_TIMEOUT,
            poll_base: POLL_BASE,
            poll_cap: POLL_CAP,
        }
    }
}

impl RetryPolicy {
    /// EC2 calls' retries as the workspace's one backoff type: "equal jitter", half of the
    /// capped exponential step fixed and half random, so retries from many regions spread out
    /// but never collapse to zero (AWS Architecture Blog, "Exponential Backoff And Jitter"),
    /// within [`RetryPolicy::deadline`].
    pub fn api_backoff(&self) -> Backoff {
        Backoff::new(self.base, self.cap)
            .with_jitter(Jitter::Equal)
            .with_deadline(self.deadline)
    }

    /// `wait_running`/`wait_terminated` polls: no jitter (one instance's poll is no herd).
    pub fn poll_backoff(&self) -> Backoff {
        Backoff::new(self.poll_base, self.poll_cap)
    }

    /// Delay before attempt `attempt + 1` (attempt counts from 1).
    pub fn backoff(&self, attempt: u32) -> Duration {
        self.api_backoff().delay(attempt.saturating_sub(1))
    }
}

/// `base * 2^(attempt-1)`, capped (attempt counts from 1).
fn exponential(base: Duration, cap: Duration, attempt: u32) -> Duration {
    Backoff::new(base, cap).ceiling(attempt.saturating_sub(1))
}

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

/// The subnet and security group a launch uses, found once.
#[derive(Debug, Clone)]
struct Network {
    subnet_id: String,
    security_group_id: String,
}

/// The EC2 [`HostHandler`] for one region.
pub struct Ec2HostHandler {
    client: Client,
    region: Region,
    environment: String,
    instance_profile: String,
    subnet_tags: TagFilter,
    security_group_tags: TagFilter,
    /// Base64 of the rendered user data.
    user_data: String,
    retry: RetryPolicy,
    network: OnceCell<Network>,
    instance_types: Mutex<HashMap<String, InstanceTypeInfo>>,
}

impl fmt::Debug for Ec2HostHandler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Not the user data: it may hold the admin secret.
        f.debug_struct("Ec2HostHandler")
            .field("region", &self.region)
            .field("environment", &self.environment)
            .field("instance_profile", &self.instance_profile)
            .field("subnet_tags", &self.subnet_tags)
            .field("security_group_tags", &self.security_group_tags)
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

impl Ec2HostHandler {
    /// Builds the client and renders the user data. Makes no AWS call: the subnet and security
    /// group are looked up on first use (or by [`Ec2HostHandler::check`]).
    pub async fn new(config: Ec2Config) -> Result<Self, Ec2ConfigError> {
        // The local stack (`localdevwithdb`) launches into moto only: its hosts are this
        // machine's processes, so its user data is never run and may name an http:// Hasura.
        let local = config.environment == "localdevwithdb";
        if !local && !matches!(config.environment.as_str(), "dev" | "staging" | "prod") {
            return Err(Ec2ConfigError::Environment(config.environment));
        }
        if local && config.endpoint_url.is_none() {
            return Err(Ec2ConfigError::LocalWithoutEndpoint);
        }
        if config.instance_profile.trim().is_empty() {
            return Err(Ec2ConfigError::InstanceProfile);
        }
        if config.subnet_tags.is_empty() {
            return Err(Ec2ConfigError::EmptyFilter { what: "subnet" });
        }
        if config.security_group_tags.is_empty() {
            return Err(Ec2ConfigError::EmptyFilter {
                what: "security group",
            });
        }
        let user_data = render_user_data(
            USER_DATA_TEMPLATE,
            &user_data_values(&config.environment, &config.host_service, local)?,
        )?;
        if user_data.len() > MAX_USER_DATA_BYTES {
            return Err(Ec2ConfigError::UserDataTooLarge {
                bytes: user_data.len(),
            });
        }

        let timeouts = TimeoutConfig::builder()
            .connect_timeout(config.retry.connect_timeout)
            .operation_attempt_timeout(config.retry.attempt_timeout)
            .build();
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(SdkRegion::new(config.region.as_str().to_owned()))
            .retry_config(RetryConfig::disabled())
            .timeout_config(timeouts);
        if let Some(url) = &config.endpoint_url {
            if let Err(error) = url::Url::parse(url) {
                return Err(Ec2ConfigError::Endpoint {
                    url: url.clone(),
                    reason: error.to_string(),
                });
            }
            loader = loader.endpoint_url(url);
        }
        if let Some(credentials) = &config.credentials {
            loader = loader.credentials_provider(Credentials::new(
                credentials.access_key_id.clone(),
                credentials.secret_access_key.clone(),
                None,
                None,
                "whist-static",
            ));
        }
        let sdk_config = loader.load().await;
        Ok(Self {
            client: Client::new(&sdk_config),
            region: config.region,
            environment: config.environment,
            instance_profile: config.instance_profile,
            subnet_tags: config.subnet_tags,
            security_group_tags: config.security_group_tags,
            user_data: base64_encode(user_data.as_bytes()),
            retry: config.retry,
            network: OnceCell::new(),
            instance_types: Mutex::new(HashMap::new()),
        })
    }

    /// Resolves the subnet and security group now, so a misconfiguration shows at start-up
    /// rather than at the first launch.
    pub async fn check(&self) -> Result<(), HostError> {
        self.network().await.map(|_| ())
    }

    async fn network(&self) -> Result<&Network, HostError> {
        self.network
            .get_or_try_init(|| async {
                let subnet_id = self.find_subnet().await?;
                let security_group_id = self.find_security_group().await?;
                tracing::info!(
                    region = %self.region,
                    subnet.id = %subnet_id,
                    security_group.id = %security_group_id,
                    "resolved launch network"
                );
                Ok(Network {
                    subnet_id,
                    security_group_id,
                })
            })
            .await
    }

    async fn find_subnet(&self) -> Result<String, HostError> {
        let filters = tag_filters(&self.subnet_tags);
        let subnets = self
            .with_retries("DescribeSubnets", || async {
                self.client
                    .describe_subnets()
                    .set_filters(Some(filters.clone()))
                    .send()
                    .await
                    .map_err(|e| classify("DescribeSubnets", e))
            })
            .await?;
        let mut ids: Vec<&str> = subnets
            .subnets()
            .iter()
            .filter_map(|s| s.subnet_id())
            .collect();
        // Deterministic when several match (the original took the first of an unordered list).
        ids.sort_unstable();
        ids.first().map(|id| (*id).to_owned()).ok_or_else(|| {
            invalid(
                "DescribeSubnets",
                format!(
                    "no subnet in {} matches tags {}",
                    self.region,
                    describe_filter(&self.subnet_tags)
                ),
            )
        })
    }

    async fn find_security_group(&self) -> Result<String, HostError> {
        let filters = tag_filters(&self.security_group_tags);
        let groups = self
            .with_retries("DescribeSecurityGroups", || async {
                self.client
                    .describe_security_groups()
                    .set_filters(Some(filters.clone()))
                    .send()
                    .await
                    .map_err(|e| classify("DescribeSecurityGroups", e))
            })
            .await?;
        let mut ids: Vec<&str> = groups
            .security_groups()
            .iter()
            .filter_map(|g| g.group_id())
            .collect();
        ids.sort_unstable();
        ids.first().map(|id| (*id).to_owned()).ok_or_else(|| {
            invalid(
                "DescribeSecurityGroups",
                format!(
                    "no security group in {} matches tags {}",
                    self.region,
                    describe_filter(&self.security_group_tags)
                ),
            )
        })
    }

    /// Runs `call` until it succeeds, fails with a non-retryable error, or the policy's
    /// deadline would pass before the next attempt.
    async fn with_retries<T, F, Fut>(
        &self,
        operation: &'static str,
        mut call: F,
    ) -> Result<T, HostError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, HostError>>,
    {
        let started = Instant::now();
        let mut attempt = 0u32;
        loop {
            attempt = attempt.saturating_add(1);
            let error = match call().await {
                Ok(value) => return Ok(value),
                Err(error) => error,
            };
            if !error.is_retryable() {
                return Err(error);
            }
            let delay = self.retry.backoff(attempt);
            if started.elapsed() + delay > self.retry.deadline {
                tracing::warn!(
                    region = %self.region,
                    operation,
                    attempts = attempt,
                    %error,
                    "giving up: retry deadline reached"
                );
                return Err(error);
            }
            tracing::info!(
                region = %self.region,
                operation,
                attempt,
                delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                %error,
                "retrying"
            );
            tokio::time::sleep(delay).await;
        }
    }

    /// All instances matching `filters`, across pages.
    async fn describe_filtered(
        &self,
        operation: &'static str,
        filters: Vec<Filter>,
    ) -> Result<Vec<HostInstance>, HostError> {
        let mut instances = Vec::new();
        let mut next_token: Option<String> = None;
        loop {
            let token = next_token.clone();
            let page = self
                .with_retries(operation, || async {
                    self.client
                        .describe_instances()
                        .set_filters(Some(filters.clone()))
                        .set_next_token(token.clone())
                        .send()
                        .await
                        .map_err(|e| classify(operation, e))
                })
                .await?;
            for reservation in page.reservations() {
                for instance in reservation.instances() {
                    if let Some(host) = to_host_instance(instance) {
                        instances.push(host);
                    }
                }
            }
            match page.next_token() {
                Some(token) if !token.is_empty() => next_token = Some(token.to_owned()),
                _ => return Ok(instances),
            }
        }
    }

    /// Instances launched for `launch_id` that have not been terminated.
    async fn find_launch(&self, launch_id: &str) -> Result<Vec<HostInstance>, HostError> {
        let filters = vec![
            filter(&format!("tag:{TAG_LAUNCH_ID}"), [launch_id]),
            filter(
                &format!("tag:{TAG_ENVIRONMENT}"),
                [self.environment.as_str()],
            ),
            filter("instance-state-name", LIVE_STATES),
        ];
        self.describe_filtered("DescribeInstances", filters).await
    }

    async fn run_instances(
        &self,
        request: &LaunchRequest,
        network: &Network,
    ) -> Result<Vec<HostInstance>, HostError> {
        let count = i32::try_from(request.count).map_err(|_| {
            invalid(
                "RunInstances",
                format!("count {} is out of range", request.count),
            )
        })?;
        let name = instance_name(
            self.region.as_str(),
            &self.environment,
            &request.client_sha,
            &request.launch_id,
        );
        let tags = [
            (TAG_NAME, name.as_str()),
            (TAG_ENVIRONMENT, self.environment.as_str()),
            (TAG_MANAGED_BY, MANAGED_BY),
            (TAG_LAUNCH_ID, request.launch_id.as_str()),
            (TAG_COMMIT, request.client_sha.as_str()),
        ];
        let instance_tags = tags
            .iter()
            .fold(
                TagSpecification::builder().resource_type(ResourceType::Instance),
                |b, (k, v)| b.tags(Tag::builder().key(*k).value(*v).build()),
            )
            .build();
        let volume_tags = tags
            .iter()
            .fold(
                TagSpecification::builder().resource_type(ResourceType::Volume),
                |b, (k, v)| b.tags(Tag::builder().key(*k).value(*v).build()),
            )
            .build();
        let profile = if self.instance_profile.starts_with("arn:") {
            IamInstanceProfileSpecification::builder().arn(&self.instance_profile)
        } else {
            IamInstanceProfileSpecification::builder().name(&self.instance_profile)
        }
        .build();
        let metadata = InstanceMetadataOptionsRequest::builder()
            .http_tokens(HttpTokensState::Required)
            .http_put_response_hop_limit(1)
            .instance_metadata_tags(InstanceMetadataTagsState::Enabled)
            .build();
        let output = self
            .client
            .run_instances()
            .image_id(request.image_id.as_str())
            .instance_type(InstanceType::from(request.instance_type.as_str()))
            .min_count(count)
            .max_count(count)
            .user_data(&self.user_data)
            .iam_instance_profile(profile)
            .subnet_id(&network.subnet_id)
            .security_group_ids(&network.security_group_id)
            .ebs_optimized(true)
            .instance_initiated_shutdown_behavior(ShutdownBehavior::Terminate)
            .metadata_options(metadata)
            .tag_specifications(instance_tags)
            .tag_specifications(volume_tags)
            .client_token(client_token(&request.launch_id))
            .send()
            .await
            .map_err(|e| classify("RunInstances", e))?;
        Ok(output
            .instances()
            .iter()
            .filter_map(to_host_instance)
            .collect())
    }

    /// Terminates one chunk; "not found" for the whole call (EC2 fails all ids when one is
    /// unknown) falls back to one call per id, where "not found" means already gone.
    async fn terminate_chunk(&self, ids: &[InstanceId]) -> Result<(), HostError> {
        match self.terminate_call(ids).await {
            Err(error) if is_not_found(&error) && ids.len() > 1 => {
                for id in ids {
                    match self.terminate_call(std::slice::from_ref(id)).await {
                        Err(error) if is_not_found(&error) => {
                            tracing::info!(instance.id = %id, "already gone");
                        }
                        other => other?,
                    }
                }
                Ok(())
            }
            Err(error) if is_not_found(&error) => Ok(()),
            other => other,
        }
    }

    async fn terminate_call(&self, ids: &[InstanceId]) -> Result<(), HostError> {
        let ids: Vec<String> = ids.iter().map(|id| id.as_str().to_owned()).collect();
        self.with_retries("TerminateInstances", || async {
            self.client
                .terminate_instances()
                .set_instance_ids(Some(ids.clone()))
                .send()
                .await
                .map(|_| ())
                .map_err(|e| classify("TerminateInstances", e))
        })
        .await
    }

    /// Polls until every id is in a state `done` accepts; `fatal` states end the wait early.
    /// `timeout` bounds the whole wait, slow or retried DescribeInstances calls included.
    async fn wait_for(
        &self,
        ids: &[InstanceId],
        timeout: Duration,
        operation: &'static str,
        done: fn(Option<&HostState>) -> bool,
        fatal: fn(&HostState) -> bool,
    ) -> Result<(), HostError> {
        let mut pending: Vec<InstanceId> = ids.to_vec();
        let polling = async {
            let mut poll = 0u32;
            loop {
                let found = self.describe(&pending).await?;
                let mut still_pending = Vec::new();
                for id in &pending {
                    let state = found.iter().find(|h| &h.id == id).map(|h| &h.state);
                    if let Some(state) = state
                        && fatal(state)
                    {
                        return Err(invalid(
                            operation,
                            format!("instance {id} is {state:?}, it will not get there"),
                        ));
                    }
                    if !done(state) {
                        still_pending.push(id.clone());
                    }
                }
                pending = still_pending;
                if pending.is_empty() {
                    return Ok(());
                }
                poll = poll.saturating_add(1);
                tokio::time::sleep(exponential(self.retry.poll_base, self.retry.poll_cap, poll))
                    .await;
            }
        };
        match tokio::time::timeout(timeout, polling).await {
            Ok(outcome) => outcome,
            Err(_) => Err(timeout_error(
                operation,
                format!(
                    "after {timeout:?}, still waiting for {}",
                    pending
                        .iter()
                        .map(InstanceId::as_str)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )),
        }
    }
}

/// States in which an instance exists for our purposes (everything but `terminated`).
const LIVE_STATES: [&str; 5] = ["pending", "running", "shutting-down", "stopping", "stopped"];

#[async_trait::async_trait]
impl HostHandler for Ec2HostHandler {
    fn region(&self) -> &Region {
        &self.region
    }

    #[tracing::instrument(skip_all, fields(region = %self.region, launch.id = %request.launch_id, count = request.count))]
    async fn launch(&self, request: &LaunchRequest) -> Result<Vec<HostInstance>, HostError> {
        if request.count == 0 {
            return Ok(Vec::new());
        }
        let network = self.network().await?;
        let started = Instant::now();
        let instances = self
            .with_retries("RunInstances", || async {
                // Level-triggered: whatever an earlier attempt (ours, or a previous process's)
                // launched under this id is the answer.
                let existing = self.find_launch(&request.launch_id).await?;
                if existing.is_empty() {
                    return self.run_instances(request, network).await;
                }
                if existing.len() != request.count as usize {
                    tracing::warn!(
                        found = existing.len(),
                        "launch exists with a different instance count; not launching more"
                    );
                }
                tracing::info!(found = existing.len(), "launch already done");
                Ok(existing)
            })
            .await?;
        tracing::info!(
            instances = instances.len(),
            elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            "launched"
        );
        Ok(instances)
    }

    #[tracing::instrument(skip_all, fields(region = %self.region, instances = ids.len()))]
    async fn terminate(&self, ids: &[InstanceId]) -> Result<(), HostError> {
        for chunk in ids.chunks(IDS_PER_CALL) {
            self.terminate_chunk(chunk).await?;
        }
        Ok(())
    }

    /// In any state, terminated ones included (EC2 keeps those for about an hour): the caller
    /// decides with [`HostState::is_ending`].
    async fn list_managed(&self) -> Result<Vec<HostInstance>, HostError> {
        let filters = vec![
            filter(
                &format!("tag:{TAG_ENVIRONMENT}"),
                [self.environment.as_str()],
            ),
            filter(&format!("tag:{TAG_MANAGED_BY}"), [MANAGED_BY]),
        ];
        self.describe_filtered("DescribeInstances", filters).await
    }

    async fn describe(&self, ids: &[InstanceId]) -> Result<Vec<HostInstance>, HostError> {
        // A filter, not InstanceIds: an unknown id is then simply absent instead of failing
        // the whole call (EC2 forgets terminated instances after about an hour).
        let mut instances = Vec::new();
        for chunk in ids.chunks(IDS_PER_CALL) {
            let filters = vec![filter("instance-id", chunk.iter().map(InstanceId::as_str))];
            instances.extend(self.describe_filtered("DescribeInstances", filters).await?);
        }
        Ok(instances)
    }

    #[tracing::instrument(skip_all, fields(region = %self.region, instances = ids.len()))]
    async fn wait_running(&self, ids: &[InstanceId], timeout: Duration) -> Result<(), HostError> {
        self.wait_for(
            ids,
            timeout,
            "wait_running",
            // Absent right after a launch is EC2's eventual consistency: keep waiting.
            |state| matches!(state, Some(HostState::Running)),
            |state| {
                matches!(
                    state,
                    HostState::ShuttingDown
                        | HostState::Terminated
                        | HostState::Stopping
                        | HostState::Stopped
                )
            },
        )
        .await
    }

    #[tracing::instrument(skip_all, fields(region = %self.region, instances = ids.len()))]
    async fn wait_terminated(
        &self,
        ids: &[InstanceId],
        timeout: Duration,
    ) -> Result<(), HostError> {
        self.wait_for(
            ids,
            timeout,
            "wait_terminated",
            // Absent: EC2 has already forgotten it.
            |state| matches!(state, None | Some(HostState::Terminated)),
            |_| false,
        )
        .await
    }

    async fn instance_type(&self, instance_type: &str) -> Result<InstanceTypeInfo, HostError> {
        if let Some(info) = self.cached_instance_type(instance_type) {
            return Ok(info);
        }
        let output = self
            .with_retries("DescribeInstanceTypes", || async {
                self.client
                    .describe_instance_types()
                    .instance_types(InstanceType::from(instance_type))
                    .send()
                    .await
                    .map_err(|e| classify("DescribeInstanceTypes", e))
            })
            .await?;
        let info = output
            .instance_types()
            .iter()
            .find(|t| t.instance_type().map(InstanceType::as_str) == Some(instance_type))
            .ok_or_else(|| {
                invalid(
                    "DescribeInstanceTypes",
                    format!(
                        "instance type {instance_type} is unknown in {}",
                        self.region
                    ),
                )
            })?;
        let gpus: i32 = info
            .gpu_info()
            .map(|g| g.gpus().iter().filter_map(|d| d.count()).sum())
            .unwrap_or(0);
        let vcpus = info
            .v_cpu_info()
            .and_then(|v| v.default_v_cpus())
            .ok_or_else(|| {
                invalid(
                    "DescribeInstanceTypes",
                    format!("instance type {instance_type} has no vCPU count"),
                )
            })?;
        let info = InstanceTypeInfo {
            gpus: u32::try_from(gpus).unwrap_or(0),
            vcpus: u32::try_from(vcpus).unwrap_or(0),
        };
        if let Ok(mut cache) = self.instance_types.lock() {
            cache.insert(instance_type.to_owned(), info);
        }
        Ok(info)
    }
}

impl Ec2HostHandler {
    fn cached_instance_type(&self, instance_type: &str) -> Option<InstanceTypeInfo> {
        self.instance_types
            .lock()
            .ok()
            .and_then(|cache| cache.get(instance_type).cloned())
    }
}

fn filter<'a>(name: &str, values: impl IntoIterator<Item = &'a str>) -> Filter {
    values
        .into_iter()
        .fold(Filter::builder().name(name), |b, v| b.values(v))
        .build()
}

fn tag_filters(tags: &TagFilter) -> Vec<Filter> {
    tags.iter()
        .map(|(key, value)| filter(&format!("tag:{key}"), [value.as_str()]))
        .collect()
}

fn describe_filter(tags: &TagFilter) -> String {
    tags.iter()
        .map(|(key, value)| format!("{key}={value}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// EC2's `ClientToken`: at most 64 ASCII characters. A launch id that fits is used as is (easy
/// to find in CloudTrail); anything else is hashed.
fn client_token(launch_id: &str) -> String {
    const MAX: usize = 64;
    if !launch_id.is_empty()
        && launch_id.len() <= MAX
        && launch_id.bytes().all(|b| b.is_ascii_graphic())
    {
        launch_id.to_owned()
    } else {
        format!("whist-{:016x}", fnv1a(launch_id.as_bytes()))
    }
}

/// FNV-1a: stable across Rust versions (unlike `DefaultHasher`), so a restarted scaler derives
/// the same token.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, b| {
        (hash ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// `ec2-<region>-<env>-<commit[..7]>-<launch id[..8]>`. Slicing by characters, so a short or
/// empty commit (which panicked the original) gives a short name, not a crash.
pub fn instance_name(region: &str, environment: &str, commit: &str, launch_id: &str) -> String {
    let commit: String = commit
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(7)
        .collect();
    let short_id: String = launch_id
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(8)
        .collect();
    let commit = if commit.is_empty() {
        "unknown".to_owned()
    } else {
        commit
    };
    format!(
        "ec2-{region}-{}-{commit}-{short_id}",
        environment.to_ascii_lowercase()
    )
}

fn tag_value<'a>(instance: &'a Instance, key: &str) -> Option<&'a str> {
    instance
        .tags()
        .iter()
        .find(|t| t.key() == Some(key))
        .and_then(Tag::value)
}

/// The handler's view of an EC2 instance; `None` (logged) when EC2 answers without an id or an
/// image, which it should never do.
fn to_host_instance(instance: &Instance) -> Option<HostInstance> {
    let id = instance
        .instance_id()
        .and_then(|id| InstanceId::new(id).ok());
    let image_id = instance.image_id().and_then(|id| ImageId::new(id).ok());
    let (Some(id), Some(image_id)) = (id, image_id) else {
        tracing::warn!(
            instance.id = instance.instance_id().unwrap_or("<none>"),
            "skipping an instance without a valid id or image id"
        );
        return None;
    };
    let state = match instance.state().and_then(|s| s.name()) {
        Some(InstanceStateName::Pending) => HostState::Pending,
        Some(InstanceStateName::Running) => HostState::Running,
        Some(InstanceStateName::ShuttingDown) => HostState::ShuttingDown,
        Some(InstanceStateName::Terminated) => HostState::Terminated,
        Some(InstanceStateName::Stopping) => HostState::Stopping,
        Some(InstanceStateName::Stopped) => HostState::Stopped,
        _ => HostState::Unknown,
    };
    let launched_at = instance
        .launch_time()
        .and_then(|t| DateTime::<Utc>::from_timestamp(t.secs(), t.subsec_nanos()));
    Some(HostInstance {
        id,
        image_id,
        instance_type: instance
            .instance_type()
            .map(|t| t.as_str().to_owned())
            .unwrap_or_default(),
        state,
        launch_id: tag_value(instance, TAG_LAUNCH_ID).map(str::to_owned),
        launched_at,
    })
}

// ---- errors ----

const THROTTLING_CODES: &[&str] = &[
    "RequestLimitExceeded",
    "Throttling",
    "ThrottlingException",
    "RequestThrottled",
    "RequestThrottledException",
    "TooManyRequestsException",
    "PriorityRequestLimitExceeded",
    "BandwidthLimitExceeded",
    "SlowDown",
];
/// Capacity that may come back (another AZ, a few minutes later). Account quotas
/// (`InstanceLimitExceeded`, `VcpuLimitExceeded`) are not here: waiting does not raise them.
const CAPACITY_CODES: &[&str] = &[
    "InsufficientInstanceCapacity",
    "InsufficientHostCapacity",
    "InsufficientCapacity",
    "InsufficientReservedInstanceCapacity",
];
const SERVER_CODES: &[&str] = &[
    "InternalError",
    "InternalFailure",
    "ServiceUnavailable",
    "Unavailable",
];
const NOT_FOUND_CODES: &[&str] = &["InvalidInstanceID.NotFound"];

/// Maps an SDK error to a [`HostError`], by EC2 error code first and HTTP status second.
fn classify<E>(operation: &'static str, error: SdkError<E>) -> HostError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let status = error.raw_response().map(|r| r.status().as_u16());
    let code = error.code().map(str::to_owned);
    let message = match &code {
        Some(code) => format!("{code}: {}", error.message().unwrap_or("(no message)")),
        None => DisplayErrorContext(&error).to_string(),
    };
    match &error {
        SdkError::TimeoutError(_) => return timeout_error(operation, message),
        SdkError::DispatchFailure(failure) => {
            return if failure.is_timeout() {
                timeout_error(operation, message)
            } else if failure.is_user() {
                invalid(operation, message)
            } else {
                network(operation, message)
            };
        }
        SdkError::ConstructionFailure(_) => return invalid(operation, message),
        _ => {}
    }
    let code = code.as_deref().unwrap_or("");
    if THROTTLING_CODES.contains(&code) || status == Some(429) {
        throttled(operation, message)
    } else if CAPACITY_CODES.contains(&code) {
        capacity(operation, message)
    } else if NOT_FOUND_CODES.contains(&code) {
        not_found(operation, message)
    } else if SERVER_CODES.contains(&code) || status.is_none_or(|s| s >= 500) {
        server(operation, message)
    } else {
        invalid(operation, message)
    }
}

fn is_not_found(error: &HostError) -> bool {
    matches!(error, HostError::NotFound { .. })
}

fn throttled(operation: &'static str, message: String) -> HostError {
    HostError::Throttled { operation, message }
}
fn capacity(operation: &'static str, message: String) -> HostError {
    HostError::Capacity { operation, message }
}
fn server(operation: &'static str, message: String) -> HostError {
    HostError::Server { operation, message }
}
fn invalid(operation: &'static str, message: String) -> HostError {
    HostError::Invalid { operation, message }
}
fn not_found(operation: &'static str, message: String) -> HostError {
    HostError::NotFound { operation, message }
}
fn timeout_error(operation: &'static str, message: String) -> HostError {
    HostError::Timeout { operation, message }
}
fn network(operation: &'static str, message: String) -> HostError {
    HostError::Network { operation, message }
}

// ---- user data ----

/// The template's values: every placeholder of `host-setup/ec2_userdata.sh`, optional ones empty.
fn user_data_values(
    environment: &str,
    settings: &HostServiceSettings,
    allow_http: bool,
) -> Result<BTreeMap<String, String>, Ec2ConfigError> {
    let (ssm_parameter, inline_secret) = match &settings.admin_secret {
        AdminSecret::SsmParameter(name) => (name.clone(), String::new()),
        AdminSecret::Inline(secret) => (String::new(), secret.clone()),
    };
    if ssm_parameter.is_empty() && inline_secret.is_empty() {
        return Err(Ec2ConfigError::UserDataValue {
            name: "HASURA_ADMIN_SECRET".to_owned(),
            reason: "neither an SSM parameter nor a secret is set",
        });
    }
    let url = &settings.hasura_graphql_url;
    let secure = url.starts_with("https://");
    if !(secure || allow_http && url.starts_with("http://")) {
        return Err(Ec2ConfigError::UserDataValue {
            name: "HASURA_GRAPHQL_URL".to_owned(),
            reason: "must be an https:// URL",
        });
    }
    let mut values: BTreeMap<String, String> = settings.extra.clone();
    values.extend(
        [
            ("APP_ENV", environment.to_owned()),
            ("HASURA_GRAPHQL_URL", settings.hasura_graphql_url.clone()),
            ("HASURA_ADMIN_SECRET_SSM_PARAMETER", ssm_parameter),
            ("HASURA_ADMIN_SECRET", inline_secret),
            (
                "SENTRY_DSN",
                settings.sentry_dsn.clone().unwrap_or_default(),
            ),
            (
                "WHIST_IMAGE_REGISTRY",
                settings.image_registry.clone().unwrap_or_default(),
            ),
            ("WHIST_LOG", settings.log_filter.clone().unwrap_or_default()),
            (
                "WHIST_OPS_ADDR",
                settings.ops_addr.clone().unwrap_or_default(),
            ),
        ]
        .map(|(name, value)| (name.to_owned(), value)),
    );
    for (name, value) in &values {
        // The template puts each value between single quotes in a shell script run as root.
        if value.contains('\'') {
            return Err(Ec2ConfigError::UserDataValue {
                name: name.clone(),
                reason: "contains a single quote",
            });
        }
        if value.chars().any(char::is_control) {
            return Err(Ec2ConfigError::UserDataValue {
                name: name.clone(),
                reason: "contains a newline or another control character",
            });
        }
        if value.contains("{{") {
            return Err(Ec2ConfigError::UserDataValue {
                name: name.clone(),
                reason: "contains a template placeholder",
            });
        }
    }
    Ok(values)
}

/// Replaces every `{{NAME}}` with its value; a placeholder without a value is an error, so a
/// template change cannot ship a host that refuses to start.
fn render_user_data(
    template: &str,
    values: &BTreeMap<String, String>,
) -> Result<String, Ec2ConfigError> {
    let mut rendered = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        rendered.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else {
            return Err(Ec2ConfigError::UserDataPlaceholder {
                name: after.chars().take(40).collect(),
            });
        };
        let name = &after[..end];
        let value = values
            .get(name)
            .ok_or_else(|| Ec2ConfigError::UserDataPlaceholder {
                name: name.to_owned(),
            })?;
        rendered.push_str(value);
        rest = &after[end + 2..];
    }
    rendered.push_str(rest);
    Ok(rendered)
}

/// Standard base64 with padding (RFC 4648 §4), as RunInstances expects `UserData`.
fn base64_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let sextet = |shift: u32| char::from(ALPHABET[((n >> shift) & 0x3f) as usize]);
        out.push(sextet(18));
        out.push(sextet(12));
        out.push(if chunk.len() > 1 { sextet(6) } else { '=' });
        out.push(if chunk.len() > 2 { sextet(0) } else { '=' });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> HostServiceSettings {
        HostServiceSettings {
            hasura_graphql_url: "https://hasura.example/v1/graphql".to_owned(),
            admin_secret: AdminSecret::SsmParameter("/whist/dev/hasura".to_owned()),
            sentry_dsn: None,
            image_registry: None,
            log_filter: Some("info".to_owned()),
            ops_addr: Some("PRIVATE_IP:4679".to_owned()),
            extra: BTreeMap::new(),
        }
    }

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64_encode(plain.as_bytes()), encoded, "{plain:?}");
        }
    }

    #[test]
    fn real_template_renders_with_no_placeholder_left() {
        let values = user_data_values("dev", &settings(), false).unwrap();
        let rendered = render_user_data(USER_DATA_TEMPLATE, &values).unwrap();
        assert!(!rendered.contains("{{"), "placeholder left in user data");
        assert!(rendered.contains("APP_ENV='dev'"));
        assert!(rendered.contains("HASURA_ADMIN_SECRET_SSM_PARAMETER='/whist/dev/hasura'"));
        assert!(rendered.contains("HASURA_ADMIN_SECRET=''"));
        assert!(rendered.len() <= MAX_USER_DATA_BYTES);
    }

    #[test]
    fn unknown_placeholder_is_refused_by_name() {
        let values = user_data_values("dev", &settings(), false).unwrap();
        let error = render_user_data("X='{{NEW_THING}}'", &values).unwrap_err();
        assert!(error.to_string().contains("{{NEW_THING}}"), "{error}");
    }

    #[test]
    fn values_that_break_shell_quoting_are_refused() {
        let mut bad = settings();
        bad.log_filter = Some("info' ; rm -rf / ; '".to_owned());
        assert!(matches!(
            user_data_values("dev", &bad, false),
            Err(Ec2ConfigError::UserDataValue { name, .. }) if name == "WHIST_LOG"
        ));
        let mut bad = settings();
        bad.sentry_dsn = Some("a\nb".to_owned());
        assert!(user_data_values("dev", &bad, false).is_err());
    }

    #[test]
    fn instance_name_survives_short_and_empty_commits() {
        assert_eq!(
            instance_name("us-east-1", "DEV", "0123456789abcdef", "5f0c9a2e-1111-2222"),
            "ec2-us-east-1-dev-0123456-5f0c9a2e"
        );
        assert_eq!(
            instance_name("us-east-1", "dev", "ab", "x"),
            "ec2-us-east-1-dev-ab-x"
        );
        assert_eq!(
            instance_name("us-east-1", "dev", "", "x"),
            "ec2-us-east-1-dev-unknown-x"
        );
        assert_eq!(
            instance_name("us-east-1", "dev", "é€x", "x"),
            "ec2-us-east-1-dev-x-x"
        );
    }

    #[test]
    fn client_token_is_stable_and_within_ec2_limits() {
        assert_eq!(client_token("launch-1"), "launch-1");
        let long = "x".repeat(100);
        assert_eq!(client_token(&long), client_token(&long));
        assert!(client_token(&long).len() <= 64);
        assert_ne!(client_token(&long), client_token(&"y".repeat(100)));
        assert!(client_token("has space").is_ascii());
    }

    #[test]
    fn backoff_grows_caps_and_stays_within_jitter_bounds() {
        let policy = RetryPolicy::default();
        for attempt in 1..40 {
            let step = exponential(policy.base, policy.cap, attempt);
            let delay = policy.backoff(attempt);
            assert!(
                delay >= step / 2 && delay <= step,
                "attempt {attempt}: {delay:?}"
            );
            assert!(step <= policy.cap);
        }
        assert_eq!(exponential(policy.base, policy.cap, 1), policy.base);
        assert_eq!(exponential(policy.base, policy.cap, 2), policy.base * 2);
        assert_eq!(exponential(policy.base, policy.cap, 100), policy.cap);
    }
}
