//! `ImdsMetadata` against devstack's fake IMDSv2 (tokens required, TTL header sent, tags in
//! metadata), and against endpoints that are not there.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use devstack::imds::{FakeImds, Identity};
use host_service::metadata::{ImdsMetadata, InstanceMetadata, MetadataError};

/// Any failure must come this fast: the client's connect and read timeouts are 1 s each.
const FAILURE_BOUND: Duration = Duration::from_secs(3);

fn identity() -> Identity {
    Identity {
        instance_id: "i-0abc123def4567890".into(),
        ami_id: "ami-0123456789abcdef0".into(),
        instance_type: "g4dn.xlarge".into(),
        region: "us-west-2".into(),
        availability_zone: None,
        public_ipv4: Some(Ipv4Addr::new(203, 0, 113, 7)),
        local_ipv4: Ipv4Addr::new(10, 1, 2, 3),
        tags: BTreeMap::from([("Name".into(), "whist-host-1".into())]),
    }
}

#[tokio::test]
async fn reads_the_full_identity() -> anyhow::Result<()> {
    let imds = FakeImds::spawn(identity()).await?;
    let metadata = ImdsMetadata::new(Some(&imds.endpoint()))?;
    let got = metadata.identity().await?;
    assert_eq!(got.instance_id.as_str(), "i-0abc123def4567890");
    assert_eq!(got.ami_id.as_str(), "ami-0123456789abcdef0");
    assert_eq!(got.region.as_str(), "us-west-2");
    assert_eq!(got.instance_type, "g4dn.xlarge");
    assert_eq!(got.public_ipv4, Some(Ipv4Addr::new(203, 0, 113, 7)));
    assert_eq!(got.private_ipv4, Some(Ipv4Addr::new(10, 1, 2, 3)));
    assert_eq!(got.name.as_deref(), Some("whist-host-1"));
    // A second call (cached token) gives the same answer.
    assert_eq!(metadata.identity().await?, got);
    imds.stop().await;
    Ok(())
}

#[tokio::test]
async fn no_public_ip_is_none_not_an_error() -> anyhow::Result<()> {
    let imds = FakeImds::spawn(Identity {
        public_ipv4: None,
        ..identity()
    })
    .await?;
    let got = ImdsMetadata::new(Some(&imds.endpoint()))?
        .identity()
        .await?;
    assert_eq!(got.public_ipv4, None);
    assert_eq!(got.name.as_deref(), Some("whist-host-1"));
    imds.stop().await;
    Ok(())
}

#[tokio::test]
async fn no_name_tag_is_none_not_an_error() -> anyhow::Result<()> {
    let imds = FakeImds::spawn(Identity {
        tags: BTreeMap::from([("team".into(), "infra".into())]),
        ..identity()
    })
    .await?;
    let got = ImdsMetadata::new(Some(&imds.endpoint()))?
        .identity()
        .await?;
    assert_eq!(got.name, None);
    assert_eq!(got.public_ipv4, Some(Ipv4Addr::new(203, 0, 113, 7)));
    imds.stop().await;
    Ok(())
}

#[tokio::test]
async fn an_invalid_value_is_an_error_naming_the_path() -> anyhow::Result<()> {
    let imds = FakeImds::spawn(Identity {
        region: "Not A Region".into(),
        ..identity()
    })
    .await?;
    let endpoint = imds.endpoint();
    let error = ImdsMetadata::new(Some(&endpoint))?
        .identity()
        .await
        .unwrap_err();
    assert!(matches!(error, MetadataError::Invalid { .. }), "{error}");
    let text = error.to_string();
    assert!(
        text.contains("placement/region") && text.contains(&endpoint),
        "{text}"
    );
    imds.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_closed_port_fails_fast_with_the_endpoint_in_the_error() -> anyhow::Result<()> {
    // Bind and drop: nothing listens there now.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let metadata = ImdsMetadata::new(Some(&endpoint))?;
    let began = Instant::now();
    let error = metadata.identity().await.unwrap_err();
    let elapsed = began.elapsed();
    eprintln!("closed port: {elapsed:?}: {error}");
    assert!(
        matches!(error, MetadataError::Unreachable { .. }),
        "{error}"
    );
    assert!(error.to_string().contains(&endpoint), "{error}");
    assert!(elapsed < FAILURE_BOUND, "{elapsed:?}");
    Ok(())
}

#[tokio::test]
async fn a_silent_endpoint_fails_within_the_timeouts() -> anyhow::Result<()> {
    // Accepts connections and never answers, like a black-holed IMDS.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let endpoint = format!("http://{}", listener.local_addr()?);
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let metadata = ImdsMetadata::new(Some(&endpoint))?;
    let began = Instant::now();
    let error = metadata.identity().await.unwrap_err();
    let elapsed = began.elapsed();
    eprintln!("silent endpoint: {elapsed:?}: {error}");
    assert!(error.to_string().contains(&endpoint), "{error}");
    assert!(elapsed < FAILURE_BOUND, "{elapsed:?}");
    hold.abort();
    Ok(())
}

/// Hostile IMDS answers (any text in any field) give an identity or a clear error, never a
/// panic, and an identity only when every required field is a valid value.
#[tokio::test]
async fn hostile_imds_answers_are_errors_not_panics() {
    use proptest::strategy::{Strategy, ValueTree};
    use proptest::test_runner::TestRunner;
    let strings = proptest::prop_oneof![
        proptest::strategy::Just(String::new()),
        "[ -~]{0,80}",
        "\\PC{0,40}",
        "i-[0-9a-f]{17}",
    ];
    let mut runner = TestRunner::deterministic();
    let imds = FakeImds::spawn(Identity::local("i-0abc", "us-east-1"))
        .await
        .unwrap();
    let client = ImdsMetadata::new(Some(&imds.endpoint())).unwrap();
    for _ in 0..64 {
        let values: Vec<String> = (0..4)
            .map(|_| strings.new_tree(&mut runner).unwrap().current())
            .collect();
        let mut identity = Identity::local("i-0abc", "us-east-1");
        identity.instance_id = values[0].clone();
        identity.ami_id = values[1].clone();
        identity.region = values[2].clone();
        identity.instance_type = values[3].clone();
        imds.set_identity(identity);
        match client.identity().await {
            Ok(found) => {
                assert_eq!(found.instance_id.as_str(), values[0].trim());
                assert_eq!(found.region.as_str(), values[2].trim());
            }
            Err(error) => assert!(!error.to_string().is_empty()),
        }
    }
    imds.stop().await;
}
