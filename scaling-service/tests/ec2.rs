//! The EC2 host handler against moto (one moto per test), with devstack's fault-injecting HTTP
//! proxy (`devstack::ec2_faults`) in front of moto for throttling, 5xx and lost responses, which
//! moto cannot produce.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use aws_sdk_ec2::Client;
use aws_sdk_ec2::config::{BehaviorVersion, Credentials, Region as SdkRegion};
use aws_sdk_ec2::types::{InstanceAttributeName, ResourceType, Tag, TagSpecification};
use dbclient::types::{ImageId, InstanceId, Region};
use devstack::ec2_faults::{Ec2FaultProxy, Fault};
use devstack::moto::Moto;
use scaling_service::hosts::ec2::{
    AdminSecret, Ec2Config, Ec2HostHandler, HostServiceSettings, RetryPolicy, StaticCredentials,
};
use scaling_service::hosts::faulty::{
    Fault as HandlerFault, FaultRates, FaultyHostHandler, Operation,
};
use scaling_service::hosts::{HostError, HostHandler, HostState, LaunchRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PROFILE: &str = "whist-host-dev";
const SG_NAME: &str = "MandelboxesSecurityGroupdev";
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

fn moto_bin() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../.venv/bin/moto_server"
    ))
}

/// moto with extra environment variables: `Moto::start` takes a binary, so a wrapper script
/// sets them and `exec`s moto (same pid, so dropping `Moto` still kills it).
async fn start_moto(env: &[(&str, &str)]) -> Moto {
    if env.is_empty() {
        return Moto::start(&moto_bin()).await.unwrap();
    }
    static WRAPPERS: AtomicU32 = AtomicU32::new(0);
    let path = std::env::temp_dir().join(format!(
        "whist-moto-{}-{}.sh",
        std::process::id(),
        WRAPPERS.fetch_add(1, Ordering::Relaxed)
    ));
    let exports: String = env
        .iter()
        .map(|(k, v)| format!("export {k}='{v}'\n"))
        .collect();
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\n{exports}exec '{}' \"$@\"\n",
            moto_bin().display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    let moto = Moto::start(&path).await.unwrap();
    // moto has exec'd by now; the script is no longer needed.
    let _ = std::fs::remove_file(&path);
    moto
}

async fn raw_client(endpoint: &str) -> Client {
    let config = aws_sdk_ec2::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(SdkRegion::new("us-east-1"))
        .credentials_provider(Credentials::new("test", "test", None, None, "test"))
        .endpoint_url(endpoint)
        .build();
    Client::from_conf(config)
}

/// What the handler's tag lookups should find in moto, plus an AMI moto knows.
struct Fixture {
    image_id: ImageId,
    subnet_id: String,
    security_group_id: String,
}

async fn fixture(moto: &Moto) -> Fixture {
    let ec2 = raw_client(&moto.endpoint()).await;
    let vpc = ec2.describe_vpcs().send().await.unwrap();
    let vpc_id = vpc.vpcs()[0].vpc_id().unwrap().to_owned();
    let tagged = |resource: ResourceType, tags: &[(&str, &str)]| {
        tags.iter()
            .fold(
                TagSpecification::builder().resource_type(resource),
                |b, (k, v)| b.tags(Tag::builder().key(*k).value(*v).build()),
            )
            .build()
    };
    // A decoy subnet with only one of the two tags: the lookup needs both.
    ec2.create_subnet()
        .vpc_id(&vpc_id)
        .cidr_block("172.31.199.0/24")
        .tag_specifications(tagged(ResourceType::Subnet, &[("Env", "dev")]))
        .send()
        .await
        .unwrap();
    let subnet = ec2
        .create_subnet()
        .vpc_id(&vpc_id)
        .cidr_block("172.31.200.0/24")
        .tag_specifications(tagged(
            ResourceType::Subnet,
            &[("Env", "dev"), ("Terraform", "true")],
        ))
        .send()
        .await
        .unwrap();
    let group = ec2
        .create_security_group()
        .group_name(SG_NAME)
        .description("mandelboxes")
        .vpc_id(&vpc_id)
        .tag_specifications(tagged(ResourceType::SecurityGroup, &[("Name", SG_NAME)]))
        .send()
        .await
        .unwrap();
    let images = ec2.describe_images().owners("amazon").send().await.unwrap();
    let image_id = images.images()[0].image_id().unwrap().to_owned();
    create_instance_profile(moto.port(), PROFILE).await;
    Fixture {
        image_id: ImageId::new(image_id).unwrap(),
        subnet_id: subnet.subnet().unwrap().subnet_id().unwrap().to_owned(),
        security_group_id: group.group_id().unwrap().to_owned(),
    }
}

/// moto refuses a launch whose instance profile does not exist in its IAM; aws-sdk-iam is not a
/// dependency, so one Query-API call by hand (moto does not check signatures).
async fn create_instance_profile(port: u16, name: &str) {
    let body =
        format!("Action=CreateInstanceProfile&InstanceProfileName={name}&Version=2010-05-08");
    let request = format!(
        "POST / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\
         Content-Type: application/x-www-form-urlencoded\r\n\
         Authorization: AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/iam/aws4_request, SignedHeaders=host, Signature=0\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(
        response.starts_with("HTTP/1.1 200") || response.starts_with("HTTP/1.0 200"),
        "{response}"
    );
}

/// Fast retries and polls, so tests finish in milliseconds; the shape is production's.
fn test_policy() -> RetryPolicy {
    RetryPolicy {
        base: Duration::from_millis(10),
        cap: Duration::from_millis(50),
        // moto answers in milliseconds, but DescribeInstanceTypes takes seconds on a loaded
        // 2-core machine: the bounds are generous, the backoff stays short.
        deadline: Duration::from_secs(30),
        attempt_timeout: Duration::from_secs(15),
        connect_timeout: Duration::from_secs(2),
        poll_base: Duration::from_millis(10),
        poll_cap: Duration::from_millis(50),
    }
}

fn config(endpoint: String) -> Ec2Config {
    let mut config = Ec2Config::new(
        Region::new("us-east-1").unwrap(),
        "dev",
        PROFILE,
        HostServiceSettings {
            hasura_graphql_url: "https://hasura.dev.example/v1/graphql".to_owned(),
            admin_secret: AdminSecret::SsmParameter("/whist/dev/hasura-admin-secret".to_owned()),
            sentry_dsn: None,
            image_registry: None,
            log_filter: Some("info".to_owned()),
            ops_addr: None,
            ops_allow: None,
            extra: Default::default(),
        },
    );
    config.endpoint_url = Some(endpoint);
    config.credentials = Some(StaticCredentials {
        access_key_id: "test".to_owned(),
        secret_access_key: "test".to_owned(),
    });
    config.retry = test_policy();
    config
}

async fn handler(endpoint: String) -> Ec2HostHandler {
    Ec2HostHandler::new(config(endpoint)).await.unwrap()
}

fn request(launch_id: &str, count: u32, image_id: &ImageId) -> LaunchRequest {
    LaunchRequest {
        launch_id: launch_id.to_owned(),
        count,
        image_id: image_id.clone(),
        instance_type: "g4dn.xlarge".to_owned(),
        client_sha: COMMIT.to_owned(),
    }
}

/// Every instance moto holds, terminated ones included.
async fn all_instances(ec2: &Client) -> Vec<aws_sdk_ec2::types::Instance> {
    ec2.describe_instances()
        .send()
        .await
        .unwrap()
        .reservations()
        .iter()
        .flat_map(|r| r.instances().to_vec())
        .collect()
}

fn tag<'a>(instance: &'a aws_sdk_ec2::types::Instance, key: &str) -> Option<&'a str> {
    instance
        .tags()
        .iter()
        .find(|t| t.key() == Some(key))
        .and_then(|t| t.value())
}

fn base64_decode(text: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut bits = 0u32;
    let mut count = 0;
    let mut out = Vec::new();
    for c in text.bytes().filter(|c| *c != b'=') {
        let value = ALPHABET.iter().position(|a| *a == c).unwrap() as u32;
        bits = (bits << 6) | value;
        count += 6;
        if count >= 8 {
            count -= 8;
            out.push((bits >> count) as u8);
        }
    }
    out
}

// ---- tests ----

#[tokio::test]
async fn launch_applies_tags_user_data_profile_network_and_ebs_options() {
    let moto = start_moto(&[]).await;
    let fixture = fixture(&moto).await;
    let hosts = handler(moto.endpoint()).await;
    let ec2 = raw_client(&moto.endpoint()).await;

    let started = Instant::now();
    let launched = hosts
        .launch(&request("launch-options-1", 2, &fixture.image_id))
        .await
        .unwrap();
    let cold = started.elapsed();
    let started = Instant::now();
    hosts
        .launch(&request("launch-options-2", 1, &fixture.image_id))
        .await
        .unwrap();
    let warm = started.elapsed();
    eprintln!("launch latency against moto: first {cold:?} (with subnet/SG lookup), then {warm:?}");

    assert_eq!(launched.len(), 2);
    let instances = all_instances(&ec2).await;
    assert_eq!(instances.len(), 3);
    let mut profiles = 0;
    for host in &launched {
        assert_eq!(host.image_id, fixture.image_id);
        assert_eq!(host.instance_type, "g4dn.xlarge");
        assert_eq!(host.launch_id.as_deref(), Some("launch-options-1"));
        assert!(host.launched_at.is_some());
        let instance = instances
            .iter()
            .find(|i| i.instance_id() == Some(host.id.as_str()))
            .unwrap();
        assert_eq!(
            tag(instance, "Name"),
            Some("ec2-us-east-1-dev-0123456-launchop")
        );
        assert_eq!(tag(instance, "whist-env"), Some("dev"));
        assert_eq!(
            tag(instance, "whist-managed-by"),
            Some("whist-scaling-service")
        );
        assert_eq!(tag(instance, "whist-launch-id"), Some("launch-options-1"));
        assert_eq!(tag(instance, "whist-commit"), Some(COMMIT));
        assert_eq!(instance.subnet_id(), Some(fixture.subnet_id.as_str()));
        let groups: Vec<_> = instance
            .security_groups()
            .iter()
            .filter_map(|g| g.group_id())
            .collect();
        assert_eq!(groups, [fixture.security_group_id.as_str()]);
        // moto associates the profile with the first instance of a reservation only.
        if let Some(profile) = instance.iam_instance_profile().and_then(|p| p.arn()) {
            profiles += 1;
            assert!(
                profile.ends_with(&format!("instance-profile/{PROFILE}")),
                "{profile}"
            );
        }
        assert_eq!(instance.ebs_optimized(), Some(true));
        assert_eq!(instance.client_token(), Some("launch-options-1"));

        let attribute = |name: InstanceAttributeName| {
            ec2.describe_instance_attribute()
                .instance_id(host.id.as_str())
                .attribute(name)
                .send()
        };
        let user_data = attribute(InstanceAttributeName::UserData).await.unwrap();
        let user_data = user_data.user_data().and_then(|v| v.value()).unwrap();
        let script = String::from_utf8(base64_decode(user_data)).unwrap();
        assert!(script.starts_with("#!/bin/bash"), "{script}");
        assert!(script.contains("APP_ENV='dev'"));
        assert!(script.contains("HASURA_GRAPHQL_URL='https://hasura.dev.example/v1/graphql'"));
        assert!(script.contains("systemctl enable --now \"$UNIT\""));
        assert!(!script.contains("{{"), "unrendered placeholder");
        let shutdown = attribute(InstanceAttributeName::InstanceInitiatedShutdownBehavior)
            .await
            .unwrap();
        assert_eq!(
            shutdown
                .instance_initiated_shutdown_behavior()
                .and_then(|v| v.value()),
            Some("terminate")
        );
        let ebs = attribute(InstanceAttributeName::EbsOptimized)
            .await
            .unwrap();
        assert_eq!(ebs.ebs_optimized().and_then(|v| v.value()), Some(true));
    }
    assert!(
        profiles >= 1,
        "no instance of the launch has the instance profile"
    );
    hosts
        .wait_running(&ids(&launched), Duration::from_secs(10))
        .await
        .unwrap();
}

fn ids(hosts: &[scaling_service::hosts::HostInstance]) -> Vec<InstanceId> {
    hosts.iter().map(|h| h.id.clone()).collect()
}

#[tokio::test]
async fn retried_launch_with_the_same_launch_id_launches_nothing_new() {
    let moto = start_moto(&[]).await;
    let fixture = fixture(&moto).await;
    let hosts = handler(moto.endpoint()).await;
    let ec2 = raw_client(&moto.endpoint()).await;

    let first = hosts
        .launch(&request("launch-retry", 3, &fixture.image_id))
        .await
        .unwrap();
    let again = hosts
        .launch(&request("launch-retry", 3, &fixture.image_id))
        .await
        .unwrap();
    // A fresh handler (a restarted scaler) sees the same launch.
    let restarted = handler(moto.endpoint()).await;
    let third = restarted
        .launch(&request("launch-retry", 3, &fixture.image_id))
        .await
        .unwrap();

    let mut first_ids = ids(&first);
    first_ids.sort();
    for other in [again, third] {
        let mut other_ids = ids(&other);
        other_ids.sort();
        assert_eq!(other_ids, first_ids);
    }
    assert_eq!(all_instances(&ec2).await.len(), 3);
}

#[tokio::test]
async fn lost_run_instances_response_is_retried_without_a_second_launch() {
    let moto = start_moto(&[]).await;
    let fixture = fixture(&moto).await;
    let proxy = Ec2FaultProxy::start(moto.port()).await.unwrap();
    proxy.inject(
        "RunInstances",
        [Fault::LoseResponse(503, "ServiceUnavailable")],
    );
    let hosts = handler(proxy.endpoint()).await;

    let launched = hosts
        .launch(&request("launch-lost", 2, &fixture.image_id))
        .await
        .unwrap();

    assert_eq!(launched.len(), 2);
    assert_eq!(
        proxy.calls_of("RunInstances"),
        1,
        "the retry found the launch by its tag"
    );
    assert_eq!(
        all_instances(&raw_client(&moto.endpoint()).await)
            .await
            .len(),
        2
    );
}

#[tokio::test]
async fn throttling_and_5xx_are_retried_until_the_launch_succeeds() {
    let moto = start_moto(&[]).await;
    let fixture = fixture(&moto).await;
    let proxy = Ec2FaultProxy::start(moto.port()).await.unwrap();
    proxy.inject(
        "RunInstances",
        [
            Fault::Error(503, "RequestLimitExceeded"),
            Fault::Error(500, "InternalError"),
            Fault::Error(500, "InsufficientInstanceCapacity"),
        ],
    );
    proxy.inject("DescribeInstances", [Fault::Error(503, "Unavailable")]);
    let hosts = handler(proxy.endpoint()).await;

    let launched = hosts
        .launch(&request("launch-throttled", 1, &fixture.image_id))
        .await
        .unwrap();

    assert_eq!(launched.len(), 1);
    assert_eq!(proxy.calls_of("RunInstances"), 4);
    assert_eq!(
        all_instances(&raw_client(&moto.endpoint()).await)
            .await
            .len(),
        1
    );
}

#[tokio::test]
async fn throttling_past_the_deadline_is_reported_as_throttled() {
    let moto = start_moto(&[]).await;
    let proxy = Ec2FaultProxy::start(moto.port()).await.unwrap();
    proxy.inject(
        "DescribeInstanceTypes",
        [Fault::Error(503, "RequestLimitExceeded"); 1000],
    );
    let mut config = config(proxy.endpoint());
    config.retry.deadline = Duration::from_millis(300);
    let hosts = Ec2HostHandler::new(config).await.unwrap();

    let started = Instant::now();
    let error = hosts.instance_type("g4dn.xlarge").await.unwrap_err();

    assert!(matches!(error, HostError::Throttled { .. }), "{error:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert!(proxy.calls_of("DescribeInstanceTypes") > 2);
}

#[tokio::test]
async fn slow_answer_past_the_attempt_timeout_is_retried() {
    let moto = start_moto(&[]).await;
    let proxy = Ec2FaultProxy::start(moto.port()).await.unwrap();
    // Generous against a loaded machine: moto answers in milliseconds, the delay is far longer.
    // moto's DescribeInstanceTypes takes seconds on a loaded 2-core machine, so the attempt
    // timeout and the deadline leave it room; the delayed first answer comes far later.
    let delay = Duration::from_secs(90);
    proxy.inject("DescribeInstanceTypes", [Fault::Delay(delay)]);
    let mut config = config(proxy.endpoint());
    config.retry.attempt_timeout = Duration::from_secs(8);
    config.retry.deadline = Duration::from_secs(60);
    let hosts = Ec2HostHandler::new(config).await.unwrap();

    let started = Instant::now();
    let info = hosts.instance_type("g4dn.xlarge").await.unwrap();

    assert_eq!(info.gpus, 1);
    assert!(proxy.calls_of("DescribeInstanceTypes") >= 2);
    assert!(started.elapsed() < delay, "{:?}", started.elapsed());
}

#[tokio::test]
async fn invalid_ami_fails_fast_without_retries() {
    let moto = start_moto(&[("MOTO_ENABLE_AMI_VALIDATION", "1")]).await;
    let _fixture = fixture(&moto).await;
    let proxy = Ec2FaultProxy::start(moto.port()).await.unwrap();
    let hosts = handler(proxy.endpoint()).await;

    let bogus = ImageId::new("ami-00000000deadbeef0").unwrap();
    let error = hosts
        .launch(&request("launch-bad-ami", 1, &bogus))
        .await
        .unwrap_err();

    assert!(matches!(error, HostError::Invalid { .. }), "{error:?}");
    assert!(!error.is_retryable());
    assert!(error.to_string().contains("InvalidAMIID"), "{error}");
    assert_eq!(proxy.calls_of("RunInstances"), 1);
    assert!(
        all_instances(&raw_client(&moto.endpoint()).await)
            .await
            .is_empty()
    );
}

#[tokio::test]
async fn instance_type_info_counts_gpus_and_vcpus_and_is_cached() {
    let moto = start_moto(&[("MOTO_EC2_ENABLE_INSTANCE_TYPE_VALIDATION", "1")]).await;
    let proxy = Ec2FaultProxy::start(moto.port()).await.unwrap();
    let hosts = handler(proxy.endpoint()).await;

    let small = hosts.instance_type("g4dn.xlarge").await.unwrap();
    let large = hosts.instance_type("g4dn.12xlarge").await.unwrap();
    let again = hosts.instance_type("g4dn.xlarge").await.unwrap();

    assert_eq!((small.gpus, small.vcpus), (1, 4));
    assert_eq!((large.gpus, large.vcpus), (4, 48));
    assert_eq!(again, small);
    assert_eq!(
        proxy.calls_of("DescribeInstanceTypes"),
        2,
        "the second g4dn.xlarge is cached"
    );
    let error = hosts.instance_type("g4dn.bogus").await.unwrap_err();
    assert!(matches!(error, HostError::Invalid { .. }), "{error:?}");
}

#[tokio::test]
async fn terminate_then_wait_terminated_and_unknown_ids_are_already_gone() {
    let moto = start_moto(&[]).await;
    let fixture = fixture(&moto).await;
    let hosts = handler(moto.endpoint()).await;
    let launched = hosts
        .launch(&request("launch-term", 2, &fixture.image_id))
        .await
        .unwrap();
    let launched_ids = ids(&launched);
    hosts
        .wait_running(&launched_ids, Duration::from_secs(10))
        .await
        .unwrap();

    let unknown = InstanceId::new("i-0123456789abcdef0").unwrap();
    let mut with_unknown = launched_ids.clone();
    with_unknown.push(unknown.clone());
    hosts.terminate(&with_unknown).await.unwrap();
    hosts
        .wait_terminated(&with_unknown, Duration::from_secs(10))
        .await
        .unwrap();
    // Terminating again, or only unknown ids, is a success.
    hosts.terminate(&launched_ids).await.unwrap();
    hosts
        .terminate(std::slice::from_ref(&unknown))
        .await
        .unwrap();

    let described = hosts.describe(&launched_ids).await.unwrap();
    assert_eq!(described.len(), 2);
    assert!(
        described.iter().all(|h| h.state == HostState::Terminated),
        "{described:?}"
    );
    let managed = hosts.list_managed().await.unwrap();
    assert!(managed.iter().all(|h| h.state.is_ending()), "{managed:?}");
    // A terminated instance never becomes running: the wait says so at once.
    let error = hosts
        .wait_running(&launched_ids, Duration::from_secs(10))
        .await
        .unwrap_err();
    assert!(!error.is_retryable(), "{error:?}");
}

#[tokio::test]
async fn wait_running_times_out_naming_the_missing_instances() {
    let moto = start_moto(&[]).await;
    let _fixture = fixture(&moto).await;
    let hosts = handler(moto.endpoint()).await;
    // Never launched: to EC2's eventual consistency this looks like a launch not yet visible.
    let ghost = InstanceId::new("i-0fedcba9876543210").unwrap();

    let error = hosts
        .wait_running(std::slice::from_ref(&ghost), Duration::from_millis(200))
        .await
        .unwrap_err();

    assert!(matches!(error, HostError::Timeout { .. }), "{error:?}");
    assert!(error.to_string().contains(ghost.as_str()), "{error}");
}

#[tokio::test]
async fn list_managed_ignores_untagged_and_other_environments() {
    let moto = start_moto(&[]).await;
    let fixture = fixture(&moto).await;
    let hosts = handler(moto.endpoint()).await;
    let ec2 = raw_client(&moto.endpoint()).await;
    let ours = hosts
        .launch(&request("launch-managed", 2, &fixture.image_id))
        .await
        .unwrap();
    // Someone else's instance, and one that claims our marker in another environment.
    ec2.run_instances()
        .image_id(fixture.image_id.as_str())
        .min_count(1)
        .max_count(1)
        .send()
        .await
        .unwrap();
    ec2.run_instances()
        .image_id(fixture.image_id.as_str())
        .min_count(1)
        .max_count(1)
        .tag_specifications(
            TagSpecification::builder()
                .resource_type(ResourceType::Instance)
                .tags(Tag::builder().key("whist-env").value("prod").build())
                .tags(
                    Tag::builder()
                        .key("whist-managed-by")
                        .value("whist-scaling-service")
                        .build(),
                )
                .build(),
        )
        .send()
        .await
        .unwrap();

    let mut managed = ids(&hosts.list_managed().await.unwrap());
    managed.sort();
    let mut expected = ids(&ours);
    expected.sort();
    assert_eq!(managed, expected);
    assert_eq!(all_instances(&ec2).await.len(), 4);
}

#[tokio::test]
async fn missing_subnet_tag_gives_an_error_naming_the_filter() {
    let moto = start_moto(&[]).await;
    let fixture = fixture(&moto).await;
    let mut config = config(moto.endpoint());
    config.subnet_tags = vec![("Env".to_owned(), "staging".to_owned())];
    let hosts = Ec2HostHandler::new(config).await.unwrap();

    let error = hosts.check().await.unwrap_err();
    assert!(matches!(error, HostError::Invalid { .. }), "{error:?}");
    assert!(error.to_string().contains("Env=staging"), "{error}");
    let error = hosts
        .launch(&request("launch-no-subnet", 1, &fixture.image_id))
        .await
        .unwrap_err();
    assert!(error.to_string().contains("subnet"), "{error}");
    assert!(
        all_instances(&raw_client(&moto.endpoint()).await)
            .await
            .is_empty()
    );
}

#[tokio::test]
async fn faulty_handler_lost_launch_response_then_retry_returns_the_same_instances() {
    let moto = start_moto(&[]).await;
    let fixture = fixture(&moto).await;
    let hosts = FaultyHostHandler::scheduled(
        handler(moto.endpoint()).await,
        [
            Some(HandlerFault::LostResponse),
            Some(HandlerFault::Throttle),
            None,
        ],
    )
    .only(&[Operation::Launch]);
    let launch = request("launch-faulty", 2, &fixture.image_id);

    let first = hosts.launch(&launch).await.unwrap_err();
    let second = hosts.launch(&launch).await.unwrap_err();
    let third = hosts.launch(&launch).await.unwrap();

    assert!(first.is_retryable() && second.is_retryable());
    assert!(matches!(second, HostError::Throttled { .. }), "{second:?}");
    assert_eq!(third.len(), 2);
    assert_eq!(
        all_instances(&raw_client(&moto.endpoint()).await)
            .await
            .len(),
        2
    );
    // Untargeted operations pass through without consuming the schedule.
    hosts.list_managed().await.unwrap();
    let injected = hosts.injected();
    assert_eq!(
        (injected.lost_responses, injected.throttles, injected.calls),
        (1, 1, 3)
    );
}

#[tokio::test]
async fn faulty_handler_random_faults_replay_from_the_seed() {
    let moto = start_moto(&[("MOTO_EC2_ENABLE_INSTANCE_TYPE_VALIDATION", "1")]).await;
    let rates = FaultRates {
        throttle: 0.3,
        server_error: 0.2,
        slow: 0.1,
        slow_delay: Duration::from_millis(1),
        ..FaultRates::default()
    };
    let mut outcomes = Vec::new();
    for _ in 0..2 {
        let hosts = FaultyHostHandler::random(handler(moto.endpoint()).await, 7, rates);
        let mut run = Vec::new();
        for _ in 0..40 {
            run.push(match hosts.instance_type("g4dn.xlarge").await {
                Ok(_) => "ok",
                Err(HostError::Throttled { .. }) => "throttled",
                Err(HostError::Server { .. }) => "server",
                Err(other) => panic!("unexpected {other:?}"),
            });
        }
        let injected = hosts.injected();
        assert_eq!(injected.calls, 40);
        assert!(injected.throttles > 0 && injected.server_errors > 0 && injected.slow > 0);
        outcomes.push(run);
    }
    assert_eq!(outcomes[0], outcomes[1]);
}

#[tokio::test]
async fn a_resumed_launch_finds_its_instances_by_tag_and_launches_nothing_new() {
    use dbclient::launches::NewLaunchRecord;
    use devstack::testing::{TEST_ADMIN_SECRET, TestStack};
    use scaling_service::algorithm::{AlgorithmConfig, DefaultAlgorithm};
    use scaling_service::region::{RegionController, RegionSettings};

    let moto = start_moto(&[]).await;
    let fixture = fixture(&moto).await;
    let ec2 = raw_client(&moto.endpoint()).await;
    let stack = TestStack::start().await.unwrap();
    let db = dbclient::DbClient::new(
        &dbclient::DbConfig::new(
            &stack.graphql_url(),
            Some(logger::Secret::new(TEST_ADMIN_SECRET.to_owned())),
        )
        .unwrap(),
    )
    .unwrap();
    let east = Region::new("us-east-1").unwrap();
    // The process that was killed: it recorded the launch and ran RunInstances, no rows.
    let launch_id = "us-east-1-killed-mid-launch";
    db.insert_launch_record(&NewLaunchRecord {
        launch_id: launch_id.to_owned(),
        region: east.clone(),
        image_id: fixture.image_id.clone(),
        instance_type: "g4dn.xlarge".to_owned(),
        count: 2,
        client_sha: COMMIT.to_owned(),
    })
    .await
    .unwrap();
    let first = handler(moto.endpoint())
        .await
        .launch(&request(launch_id, 2, &fixture.image_id))
        .await
        .unwrap();

    // The next process, with a handler of its own.
    let hosts: Arc<dyn HostHandler> = Arc::new(handler(moto.endpoint()).await);
    let mut settings = RegionSettings::new(east.clone(), COMMIT);
    settings.instance_type = "g4dn.xlarge".to_owned();
    settings.capacity_per_instance = 1;
    settings.wait_running = Duration::from_secs(30);
    let algorithm = DefaultAlgorithm::new(AlgorithmConfig {
        desired_free_mandelboxes: 0,
        capacity_per_instance: 1,
        ..AlgorithmConfig::default()
    });
    let mut controller = RegionController::new(settings, db.clone(), hosts, Box::new(algorithm));
    assert_eq!(controller.resume_launches().await.unwrap(), 1);
    controller.settle().await;

    let mut expected = ids(&first);
    expected.sort();
    let mut rows: Vec<InstanceId> = db
        .instances_in_region(&east)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.instance.id)
        .collect();
    rows.sort();
    assert_eq!(rows, expected);
    let all = all_instances(&ec2).await;
    assert_eq!(all.len(), 2, "launched twice");
    assert!(
        all.iter()
            .all(|i| tag(i, "whist-launch-id") == Some(launch_id))
    );
    assert!(db.launch_records_in_region(&east).await.unwrap().is_empty());
    // Reconciliation sees rows for both: no orphans.
    assert_eq!(controller.reconcile_cloud().await.unwrap().0, 0);
}
