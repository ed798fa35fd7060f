//! The fake IMDS, moto and the assembled stack, exercised over their real wire protocols.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

use devstack::imds::{FakeImds, Identity, TOKEN_HEADER, TOKEN_TTL_HEADER};
use reqwest::StatusCode;

fn moto_bin() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../.venv/bin/moto_server"
    ))
}

async fn token(client: &reqwest::Client, endpoint: &str) -> String {
    let response = client
        .put(format!("{endpoint}/latest/api/token"))
        .header(TOKEN_TTL_HEADER, "21600")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()[TOKEN_TTL_HEADER],
        "21600",
        "the AWS SDK refuses a token answered without its TTL header"
    );
    response.text().await.unwrap()
}

async fn get(client: &reqwest::Client, url: String, token: &str) -> (StatusCode, String) {
    let response = client
        .get(url)
        .header(TOKEN_HEADER, token)
        .send()
        .await
        .unwrap();
    (response.status(), response.text().await.unwrap())
}

#[tokio::test]
async fn imds_serves_the_identity_only_to_token_holders() {
    let mut identity = Identity::local("i-0abc", "us-west-2");
    identity.tags.insert("Env".into(), "dev".into());
    let imds = FakeImds::spawn(identity.clone()).await.unwrap();
    let endpoint = imds.endpoint();
    let client = reqwest::Client::new();

    // IMDSv1-style GETs are refused.
    let v1 = client
        .get(format!("{endpoint}/latest/meta-data/instance-id"))
        .send()
        .await
        .unwrap();
    assert_eq!(v1.status(), StatusCode::UNAUTHORIZED);
    // A token request needs a TTL, and a proxied one is refused.
    let no_ttl = client
        .put(format!("{endpoint}/latest/api/token"))
        .send()
        .await
        .unwrap();
    assert_eq!(no_ttl.status(), StatusCode::BAD_REQUEST);
    let proxied = client
        .put(format!("{endpoint}/latest/api/token"))
        .header(TOKEN_TTL_HEADER, "60")
        .header("X-Forwarded-For", "10.0.0.1")
        .send()
        .await
        .unwrap();
    assert_eq!(proxied.status(), StatusCode::FORBIDDEN);

    let token = token(&client, &endpoint).await;
    let base = format!("{endpoint}/latest/meta-data");
    for (path, expected) in [
        ("instance-id", "i-0abc"),
        ("ami-id", identity.ami_id.as_str()),
        ("instance-type", "g4dn.xlarge"),
        ("placement/region", "us-west-2"),
        ("placement/availability-zone", "us-west-2a"),
        ("public-ipv4", "127.0.0.1"),
        ("tags/instance/Name", "local-i-0abc"),
        ("tags/instance/Env", "dev"),
    ] {
        assert_eq!(
            get(&client, format!("{base}/{path}"), &token).await,
            (StatusCode::OK, expected.to_owned()),
            "{path}"
        );
    }
    assert_eq!(
        get(&client, format!("{base}/tags/instance"), &token).await,
        (StatusCode::OK, "Env\nName".to_owned())
    );
    assert_eq!(
        get(&client, format!("{base}/tags/instance/Missing"), &token)
            .await
            .0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        get(&client, format!("{base}/instance-id"), "forged")
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );

    // A changed identity is served from then on, e.g. an instance without a public address.
    identity.public_ipv4 = None;
    imds.set_identity(identity);
    assert_eq!(
        get(&client, format!("{base}/public-ipv4"), &token).await.0,
        StatusCode::NOT_FOUND
    );
    imds.stop().await;
}

#[tokio::test]
async fn imds_identities_are_independent_per_listener() {
    let a = FakeImds::spawn(Identity::local("i-a", "us-east-1"))
        .await
        .unwrap();
    let b = FakeImds::spawn(Identity::local("i-b", "ca-central-1"))
        .await
        .unwrap();
    let client = reqwest::Client::new();
    for (imds, id) in [(&a, "i-a"), (&b, "i-b")] {
        let token = token(&client, &imds.endpoint()).await;
        let (status, body) = get(
            &client,
            format!("{}/latest/meta-data/instance-id", imds.endpoint()),
            &token,
        )
        .await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, id));
    }
    // A token is only good at the IMDS that issued it.
    let token_a = token(&client, &a.endpoint()).await;
    let (status, _) = get(
        &client,
        format!("{}/latest/meta-data/instance-id", b.endpoint()),
        &token_a,
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn moto_serves_ec2_and_is_stopped() {
    let moto = devstack::moto::Moto::start(&moto_bin()).await.unwrap();
    let endpoint = moto.endpoint();
    let client = reqwest::Client::new();
    // An EC2 Query API call: moto does not check signatures.
    let response = client
        .post(&endpoint)
        .header(
            "Authorization",
            "AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/ec2/aws4_request, SignedHeaders=host, Signature=0",
        )
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body("Action=DescribeInstances&Version=2016-11-15")
        .send()
        .await
        .unwrap();
    let status = response.status();
    let body = response.text().await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("DescribeInstancesResponse"), "{body}");
    let port = moto.port();
    moto.stop().await;
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err(),
        "moto must be gone after stop"
    );
}

#[tokio::test]
async fn missing_moto_is_a_clear_error() {
    let error = devstack::moto::Moto::start(std::path::Path::new("/nonexistent/moto_server"))
        .await
        .unwrap_err();
    assert!(error.to_string().contains("make setup"), "{error}");
}

#[tokio::test]
async fn stack_up_writes_the_env_file_and_down_removes_everything() {
    use devstack::stack::{Stack, StackOptions};
    let state = tempfile::tempdir().unwrap();
    let identity = Identity::local("i-0stacktest", "us-east-1");
    let stack = Stack::up(StackOptions {
        state_dir: state.path().to_owned(),
        moto_bin: Some(moto_bin()),
        graphql_port: 0,
        control_port: 0,
        admin_secret: None,
        default_identity: identity.clone(),
        default_instance_row: Some("dev".into()),
    })
    .await
    .unwrap();
    let env_file = stack.env_file();
    let text = std::fs::read_to_string(&env_file).unwrap();
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&env_file).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "the env file holds the admin secret");
    let env: std::collections::BTreeMap<String, String> = stack
        .env()
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    for key in [
        "DATABASE_URL",
        "HASURA_GRAPHQL_URL",
        "HASURA_ADMIN_SECRET",
        "AWS_ENDPOINT_URL",
        "AWS_EC2_METADATA_SERVICE_ENDPOINT",
        "WHIST_DEVSTACK_CONTROL_URL",
    ] {
        assert!(text.contains(&format!("export {key}=")), "{key} missing");
        assert!(env.contains_key(key));
    }

    // The GraphQL endpoint enforces the secret and sees the default instance's row.
    let client = reqwest::Client::new();
    let query = serde_json::json!({"query": "{ whist_instances { id status } }"});
    let denied: serde_json::Value = client
        .post(&env["HASURA_GRAPHQL_URL"])
        .json(&query)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(denied["errors"][0]["extensions"]["code"], "access-denied");
    let rows: serde_json::Value = client
        .post(&env["HASURA_GRAPHQL_URL"])
        .header("x-hasura-admin-secret", &env["HASURA_ADMIN_SECRET"])
        .json(&query)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        rows["data"]["whist_instances"][0],
        serde_json::json!({"id": "i-0stacktest", "status": "PRE_CONNECTION"})
    );

    // The control API serves another identity, and stops it again.
    let created: serde_json::Value = client
        .post(format!("{}/imds", env["WHIST_DEVSTACK_CONTROL_URL"]))
        .json(&Identity::local("i-0second", "us-west-2"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let endpoint = created["endpoint"].as_str().unwrap().to_owned();
    let token = token(&client, &endpoint).await;
    assert_eq!(
        get(
            &client,
            format!("{endpoint}/latest/meta-data/instance-id"),
            &token
        )
        .await,
        (StatusCode::OK, "i-0second".to_owned())
    );
    let deleted = client
        .delete(format!(
            "{}/imds/{}",
            env["WHIST_DEVSTACK_CONTROL_URL"], created["port"]
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), StatusCode::NO_CONTENT);

    // A second stack on the same state directory is refused while this one runs.
    let second = Stack::up(StackOptions {
        state_dir: state.path().to_owned(),
        moto_bin: None,
        graphql_port: 0,
        control_port: 0,
        admin_secret: None,
        default_identity: identity,
        default_instance_row: None,
    })
    .await;
    assert!(
        second
            .unwrap_err()
            .to_string()
            .contains("another whist-devstack"),
        "two stacks must not share a state directory"
    );

    stack.down().await.unwrap();
    assert!(!env_file.exists());
    let left: Vec<_> = std::fs::read_dir(state.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "state left behind: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_stops_and_starts_again_on_the_same_ports() {
    use devstack::stack::{Stack, StackOptions};
    use futures::StreamExt as _;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
    let state = tempfile::tempdir().unwrap();
    let stack = Stack::up(StackOptions {
        state_dir: state.path().to_owned(),
        moto_bin: None,
        graphql_port: 0,
        control_port: 0,
        admin_secret: None,
        default_identity: Identity::local("i-0outage", "us-east-1"),
        default_instance_row: Some("dev".into()),
    })
    .await
    .unwrap();
    let env: std::collections::BTreeMap<String, String> = stack
        .env()
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    let url = env["HASURA_GRAPHQL_URL"].clone();
    let client = reqwest::Client::new();
    let query = || {
        client
            .post(&url)
            .header("x-hasura-admin-secret", &env["HASURA_ADMIN_SECRET"])
            .json(&serde_json::json!({"query": "{ whist_instances { id } }"}))
            .send()
    };
    let ids = |body: serde_json::Value| body["data"]["whist_instances"].clone();
    let before = ids(query().await.unwrap().json().await.unwrap());
    assert_eq!(before, serde_json::json!([{"id": "i-0outage"}]));
    let mut request = url
        .replace("http://", "ws://")
        .into_client_request()
        .unwrap();
    request.headers_mut().insert(
        "sec-websocket-protocol",
        "graphql-transport-ws".parse().unwrap(),
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();

    stack.stop_database().await.unwrap();
    // Every part is down: the socket was closed, new connections are refused.
    let closed = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        loop {
            match socket.next().await {
                None | Some(Err(_)) => break,
                Some(Ok(message)) if message.is_close() => break,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the WebSocket was closed by the stop");
    let refused = query().await.unwrap_err();
    assert!(refused.is_connect(), "{refused}");
    assert!(
        devstack::postgres::connect(stack.database_url())
            .await
            .is_err()
    );
    // Stopping twice is harmless.
    stack.stop_database().await.unwrap();

    stack.start_database().await.unwrap();
    // Same URLs, same data.
    let after = ids(query().await.unwrap().json().await.unwrap());
    assert_eq!(after, before);
    let sql = devstack::postgres::connect(stack.database_url())
        .await
        .unwrap();
    let count: i64 = sql
        .query_one("SELECT count(*) FROM whist.instances", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 1);
    stack.down().await.unwrap();
}
