//! The [`HostHandler`] itself: the EC2 calls, their retries, launches, terminations and waits.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_sdk_ec2::Client;
use aws_sdk_ec2::config::retry::RetryConfig;
use aws_sdk_ec2::config::timeout::TimeoutConfig;
use aws_sdk_ec2::config::{Credentials, Region as SdkRegion};
use aws_sdk_ec2::types::{
    Filter, HttpTokensState, IamInstanceProfileSpecification, InstanceMetadataOptionsRequest,
    InstanceMetadataTagsState, InstanceType, ResourceType, ShutdownBehavior, Tag, TagSpecification,
};
use dbclient::types::{InstanceId, Region};
use tokio::sync::OnceCell;
use tokio::time::Instant;

use super::config::{Ec2Config, Ec2ConfigError, TagFilter};
use super::errors::{classify, invalid, is_not_found, timeout_error};
use super::instances::{
    LIVE_STATES, MANAGED_BY, TAG_COMMIT, TAG_ENVIRONMENT, TAG_LAUNCH_ID, TAG_MANAGED_BY, TAG_NAME,
    client_token, describe_filter, filter, instance_name, tag_filters, to_host_instance,
};
use super::user_data::{
    MAX_USER_DATA_BYTES, USER_DATA_TEMPLATE, base64_encode, render_user_data, user_data_values,
};
use super::{RetryPolicy, exponential};
use crate::hosts::{
    HostError, HostHandler, HostInstance, HostState, InstanceTypeInfo, LaunchRequest,
};

/// At most this many ids per DescribeInstances/TerminateInstances call (EC2's limit is 1000).
const IDS_PER_CALL: usize = 200;

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
