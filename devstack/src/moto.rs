//! moto's server as the local EC2 and S3 API, run from the project's virtualenv.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

/// moto is up in under 0.4 s here; a cold, loaded CI machine gets generous slack.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the readiness probe asks; short, since start-up is fast.
const READY_POLL: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum MotoError {
    #[error(
        "moto_server not found at {0}: run `make setup` (it creates the virtualenv with moto[server])"
    )]
    Missing(PathBuf),
    #[error("cannot start moto_server: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("moto_server exited before it was ready ({0})")]
    Exited(std::process::ExitStatus),
    #[error("moto_server did not answer within {0:?}")]
    NotReady(Duration),
}

/// A running moto server; killed when dropped.
#[derive(Debug)]
pub struct Moto {
    port: u16,
    child: Child,
}

impl Moto {
    /// Starts `moto_server` (from `bin`) on a free loopback port and waits until it answers.
    pub async fn start(bin: &Path) -> Result<Self, MotoError> {
        if !bin.is_file() {
            return Err(MotoError::Missing(bin.to_owned()));
        }
        let port = crate::postgres::free_port().map_err(MotoError::Spawn)?;
        let mut child = Command::new(bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            // Its own process group: a terminal's Ctrl-C reaches devstack alone, which stops
            // moto last, after the fleet's final EC2 calls.
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(MotoError::Spawn)?;
        let client = reqwest::Client::new();
        let probe = format!("http://127.0.0.1:{port}/moto-api/data.json");
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(MotoError::Exited(status));
            }
            if let Ok(response) = client.get(&probe).send().await
                && response.status().is_success()
            {
                return Ok(Self { port, child });
            }
            if started.elapsed() > READY_TIMEOUT {
                return Err(MotoError::NotReady(READY_TIMEOUT));
            }
            tokio::time::sleep(READY_POLL).await;
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The value for `AWS_ENDPOINT_URL`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Stops the server and waits for it to exit.
    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// An EC2 client for moto (any credentials do: moto checks no signature).
pub fn ec2_client(endpoint: &str, region: &str) -> aws_sdk_ec2::Client {
    use aws_sdk_ec2::config::{BehaviorVersion, Credentials, Region};
    let config = aws_sdk_ec2::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(region.to_owned()))
        .credentials_provider(Credentials::new("test", "test", None, None, "devstack"))
        .endpoint_url(endpoint)
        .build();
    aws_sdk_ec2::Client::from_conf(config)
}

/// What [`seed`] prepared in one region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionSeed {
    pub region: String,
    /// An AMI moto knows, for the region's `whist.images` row.
    pub image_id: String,
    pub subnet_id: String,
    pub security_group_id: String,
}

/// Prepares moto as the account the scaling service expects for `environment`
/// (docs/scaling-service.md): in each region a subnet tagged `Env=<environment>`,
/// `Terraform=true` and a security group named `MandelboxesSecurityGroup<environment>`; the IAM
/// instance profile `whist-host-<environment>`; and picks an AMI per region. Idempotent.
pub async fn seed(
    endpoint: &str,
    environment: &str,
    regions: &[String],
) -> anyhow::Result<Vec<RegionSeed>> {
    use anyhow::Context as _;
    use aws_sdk_ec2::types::{Filter, ResourceType, Tag, TagSpecification};
    let tags = |resource: ResourceType, tags: &[(&str, &str)]| {
        tags.iter()
            .fold(
                TagSpecification::builder().resource_type(resource),
                |b, (k, v)| b.tags(Tag::builder().key(*k).value(*v).build()),
            )
            .build()
    };
    let filter = |name: &str, value: &str| Filter::builder().name(name).values(value).build();
    let group_name = format!("MandelboxesSecurityGroup{environment}");
    let mut seeds = Vec::new();
    for region in regions {
        let ec2 = ec2_client(endpoint, region);
        let vpcs = ec2
            .describe_vpcs()
            .filters(filter("is-default", "true"))
            .send()
            .await
            .with_context(|| format!("moto: DescribeVpcs in {region}"))?;
        let vpc_id = vpcs
            .vpcs()
            .first()
            .and_then(|v| v.vpc_id())
            .with_context(|| format!("moto has no default VPC in {region}"))?
            .to_owned();
        let subnets = ec2
            .describe_subnets()
            .filters(filter("tag:Env", environment))
            .filters(filter("tag:Terraform", "true"))
            .send()
            .await
            .context("moto: DescribeSubnets")?;
        let subnet_id = match subnets.subnets().first().and_then(|s| s.subnet_id()) {
            Some(id) => id.to_owned(),
            None => ec2
                .create_subnet()
                .vpc_id(&vpc_id)
                .cidr_block("172.31.200.0/24")
                .tag_specifications(tags(
                    ResourceType::Subnet,
                    &[("Env", environment), ("Terraform", "true")],
                ))
                .send()
                .await
                .context("moto: CreateSubnet")?
                .subnet()
                .and_then(|s| s.subnet_id())
                .context("moto: CreateSubnet answered no id")?
                .to_owned(),
        };
        let groups = ec2
            .describe_security_groups()
            .filters(filter("tag:Name", &group_name))
            .send()
            .await
            .context("moto: DescribeSecurityGroups")?;
        let security_group_id = match groups.security_groups().first().and_then(|g| g.group_id()) {
            Some(id) => id.to_owned(),
            None => ec2
                .create_security_group()
                .group_name(&group_name)
                .description("mandelboxes (devstack)")
                .vpc_id(&vpc_id)
                .tag_specifications(tags(ResourceType::SecurityGroup, &[("Name", &group_name)]))
                .send()
                .await
                .context("moto: CreateSecurityGroup")?
                .group_id()
                .context("moto: CreateSecurityGroup answered no id")?
                .to_owned(),
        };
        let images = ec2
            .describe_images()
            .owners("amazon")
            .send()
            .await
            .context("moto: DescribeImages")?;
        let mut ids: Vec<&str> = images
            .images()
            .iter()
            .filter_map(|i| i.image_id())
            .collect();
        ids.sort_unstable();
        let image_id = ids
            .first()
            .with_context(|| format!("moto has no Amazon AMI in {region}"))?
            .to_string();
        seeds.push(RegionSeed {
            region: region.clone(),
            image_id,
            subnet_id,
            security_group_id,
        });
    }
    create_instance_profile(endpoint, &format!("whist-host-{environment}")).await?;
    Ok(seeds)
}

/// moto refuses a launch whose instance profile its IAM does not know. One Query-API call (IAM
/// is global; an existing profile is fine).
async fn create_instance_profile(endpoint: &str, name: &str) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let response = reqwest::Client::new()
        .post(format!("{endpoint}/"))
        .header(
            "Authorization",
            "AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/iam/aws4_request, \
             SignedHeaders=host, Signature=0",
        )
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(format!(
            "Action=CreateInstanceProfile&InstanceProfileName={}&Version=2010-05-08",
            url::form_urlencoded::byte_serialize(name.as_bytes()).collect::<String>()
        ))
        .send()
        .await
        .context("moto: CreateInstanceProfile")?;
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    anyhow::ensure!(
        status.is_success() || body.contains("EntityAlreadyExists"),
        "moto: CreateInstanceProfile {name}: {status}: {body}"
    );
    Ok(())
}

/// The users' profile bucket devstack prepares in moto (`WHIST_PROFILE_BUCKET` of its hosts).
pub const PROFILE_BUCKET: &str = "whist-user-profiles-local";

/// Creates the users' profile bucket in moto's S3, versioned as in production
/// (docs/operations.md). Idempotent. moto checks no signature, so plain HTTP requests do.
pub async fn create_profile_bucket(endpoint: &str, bucket: &str) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let client = reqwest::Client::new();
    let url = format!("{}/{bucket}", endpoint.trim_end_matches('/'));
    let created = client
        .put(&url)
        .send()
        .await
        .with_context(|| format!("moto: CreateBucket {bucket}"))?;
    // 409: it exists already (ours, from an earlier start).
    anyhow::ensure!(
        created.status().is_success() || created.status().as_u16() == 409,
        "moto: CreateBucket {bucket}: {}",
        created.status()
    );
    let versioning = client
        .put(format!("{url}?versioning"))
        .body(VERSIONING_ENABLED)
        .send()
        .await
        .with_context(|| format!("moto: PutBucketVersioning {bucket}"))?;
    anyhow::ensure!(
        versioning.status().is_success(),
        "moto: PutBucketVersioning {bucket}: {}",
        versioning.status()
    );
    Ok(())
}

const VERSIONING_ENABLED: &str = r#"<VersioningConfiguration xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Status>Enabled</Status></VersioningConfiguration>"#;
