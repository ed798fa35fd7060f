//! Host attestation (`scaling_service::attest`) against moto, a real PostgreSQL behind the
//! Hasura stand-in in JWT mode, and devstack's stand-in for AWS's document signing key: a
//! running, tagged instance gets a credential that Hasura accepts for its own rows only; forged,
//! tampered, unknown-region, untagged, terminated-instance and replayed documents get nothing;
//! a renewal needs the current credential of that very instance.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_ec2::types::{ResourceType, Tag, TagSpecification};
use dbclient::{DbClient, DbConfig};
use devstack::aws_identity::DocumentSigner;
use devstack::hasura::{HasuraOptions, JwtSecret};
use devstack::imds::{FakeImds, Identity, TOKEN_HEADER, TOKEN_TTL_HEADER};
use devstack::moto::{Moto, ec2_client};
use devstack::testing::{TEST_ADMIN_SECRET, TestStack};
use scaling_service::attest::document::RegionKeys;
use scaling_service::attest::token::SigningKey;
use scaling_service::attest::{AttestConfig, AttestError, Attestor, router};
use serde_json::{Value, json};

const REGION: &str = "us-east-1";

fn moto_bin() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../.venv/bin/moto_server"
    ))
}

struct Fixture {
    _moto: Moto,
    stack: TestStack,
    ec2: aws_sdk_ec2::Client,
    image_id: String,
    aws: Arc<DocumentSigner>,
    attestor: Arc<Attestor>,
    url: String,
}

async fn fixture() -> Fixture {
    let moto = Moto::start(&moto_bin()).await.unwrap();
    let seeds = devstack::moto::seed(&moto.endpoint(), "dev", &[REGION.to_owned()])
        .await
        .unwrap();
    // The endpoint's port first: Hasura is configured with its JWKS URL.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let secret = JwtSecret::parse(
        &json!({"type": "RS256", "jwk_url": format!("{url}/host/jwks.json")}).to_string(),
    )
    .unwrap();
    let stack = TestStack::start_with(HasuraOptions {
        admin_secret: Some(TEST_ADMIN_SECRET.to_owned()),
        jwt_secret: Some(secret),
        ..HasuraOptions::default()
    })
    .await
    .unwrap();
    let aws = Arc::new(DocumentSigner::generate().unwrap());
    let mut region_keys = RegionKeys::default();
    region_keys
        .add_pem(REGION, &aws.public_key_pem().unwrap())
        .unwrap();
    let db = DbClient::new(
        &DbConfig::new(
            &stack.graphql_url(),
            Some(logger::Secret::new(TEST_ADMIN_SECRET.to_owned())),
        )
        .unwrap(),
    )
    .unwrap();
    let attestor = Arc::new(Attestor::new(
        AttestConfig {
            region_keys,
            signing_key: SigningKey::generate().unwrap(),
            previous_keys: Vec::new(),
            token_ttl: Duration::from_secs(600),
            environment: "dev".to_owned(),
            ec2_endpoint: Some(moto.endpoint()),
            ec2_credentials: Some(("test".to_owned(), "test".to_owned())),
        },
        db,
    ));
    let app = router(attestor.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    Fixture {
        ec2: ec2_client(&moto.endpoint(), REGION),
        image_id: seeds[0].image_id.clone(),
        _moto: moto,
        stack,
        aws,
        attestor,
        url,
    }
}

impl Fixture {
    /// Launches an instance in moto with `tags`, and its row in the database.
    async fn launch(&self, tags: &[(&str, &str)]) -> String {
        let spec = tags.iter().fold(
            TagSpecification::builder().resource_type(ResourceType::Instance),
            |spec, (k, v)| spec.tags(Tag::builder().key(*k).value(*v).build()),
        );
        let answer = self
            .ec2
            .run_instances()
            .image_id(&self.image_id)
            .instance_type(aws_sdk_ec2::types::InstanceType::G4dnXlarge)
            .min_count(1)
            .max_count(1)
            .tag_specifications(spec.build())
            .send()
            .await
            .unwrap();
        let id = answer.instances()[0].instance_id().unwrap().to_owned();
        let sql = self.stack.sql().await.unwrap();
        sql.execute(
            "INSERT INTO whist.instances (id, provider, region, image_id, client_sha, ip_addr, \
             instance_type, remaining_capacity, status) VALUES ($1, 'AWS', $2, $3, 'sha', \
             '10.0.0.1', 'g4dn.xlarge', 2, 'ACTIVE')",
            &[&id, &REGION, &self.image_id],
        )
        .await
        .unwrap();
        id
    }

    async fn ours(&self) -> String {
        self.launch(&[
            ("whist-managed-by", "whist-scaling-service"),
            ("whist-env", "dev"),
        ])
        .await
    }

    fn document(&self, instance_id: &str) -> (String, String) {
        let document = DocumentSigner::document(&Identity::local(instance_id, REGION));
        let signature = self.aws.sign(&document).unwrap();
        (document, signature)
    }

    async fn post(&self, body: String, bearer: Option<&str>) -> (u16, Value) {
        let mut request = reqwest::Client::new()
            .post(format!("{}/host/attest", self.url))
            .body(body);
        if let Some(bearer) = bearer {
            request = request.bearer_auth(bearer);
        }
        let response = request.send().await.unwrap();
        (response.status().as_u16(), response.json().await.unwrap())
    }

    async fn graphql(&self, token: &str, query: &str) -> Value {
        reqwest::Client::new()
            .post(self.stack.graphql_url())
            .bearer_auth(token)
            .json(&json!({"query": query}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

fn refused(result: Result<scaling_service::attest::Credential, AttestError>) -> String {
    match result {
        Err(AttestError::Refused(reason)) => reason,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn a_running_tagged_instance_gets_a_credential_hasura_accepts_for_its_rows_only() {
    let f = fixture().await;
    let mine = f.ours().await;
    let other = f.ours().await;
    // The document and signature as the host reads them from (devstack's) IMDSv2.
    let imds = FakeImds::spawn(Identity::local(&mine, REGION))
        .await
        .unwrap()
        .with_signer(f.aws.clone());
    let http = reqwest::Client::new();
    let imds_token = http
        .put(format!("{}/latest/api/token", imds.endpoint()))
        .header(TOKEN_TTL_HEADER, "60")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let mut read = Vec::new();
    for which in ["document", "signature"] {
        let response = http
            .get(format!(
                "{}/latest/dynamic/instance-identity/{which}",
                imds.endpoint()
            ))
            .header(TOKEN_HEADER, &imds_token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        read.push(response.text().await.unwrap());
    }
    let (status, body) = f
        .post(
            json!({"document": read[0], "signature": read[1]}).to_string(),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(body["expires_in"].as_i64().unwrap() > 500, "{body}");
    let token = body["token"].as_str().unwrap();

    let rows = f.graphql(token, "{ whist_instances { id } }").await;
    assert_eq!(rows, json!({"data": {"whist_instances": [{"id": mine}]}}));
    let fingerprint = "b".repeat(64);
    let attack = f
        .graphql(
            token,
            &format!(
                "mutation {{ update_whist_instances(where: {{id: {{_eq: \"{other}\"}}}}, \
                 _set: {{tls_fingerprint: \"{fingerprint}\"}}) {{ affected_rows }} }}"
            ),
        )
        .await;
    assert_eq!(attack["data"]["update_whist_instances"]["affected_rows"], 0);
    let images = f
        .graphql(
            token,
            "mutation { delete_whist_images(where: {}) { affected_rows } }",
        )
        .await;
    assert_eq!(
        images["errors"][0]["extensions"]["code"],
        "validation-failed"
    );

    // The JWKS names the key the token was signed with.
    let jwks: Value = reqwest::get(format!("{}/host/jwks.json", f.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(jwks["keys"].as_array().unwrap().len(), 1);
    assert_eq!(jwks["keys"][0]["alg"], "RS256");
}

#[tokio::test]
async fn forged_tampered_untagged_and_terminated_instances_get_no_credential() {
    let f = fixture().await;
    let mine = f.ours().await;
    let (document, _) = f.document(&mine);

    let stranger = DocumentSigner::generate().unwrap();
    let forged = stranger.sign(&document).unwrap();
    assert!(refused(f.attestor.attest(&document, &forged, None).await).contains("does not verify"));

    let (signed, signature) = f.document(&mine);
    let other = f.ours().await;
    let tampered = signed.replace(&mine, &other);
    assert!(
        refused(f.attestor.attest(&tampered, &signature, None).await).contains("does not verify")
    );

    let elsewhere = DocumentSigner::document(&Identity::local(&mine, "eu-west-1"));
    let signature = f.aws.sign(&elsewhere).unwrap();
    assert!(
        refused(f.attestor.attest(&elsewhere, &signature, None).await)
            .contains("no signing certificate is configured for region eu-west-1")
    );

    let untagged = f.launch(&[("whist-env", "dev")]).await;
    let (document, signature) = f.document(&untagged);
    assert!(
        refused(f.attestor.attest(&document, &signature, None).await)
            .contains("does not carry this deployment's tags")
    );
    let other_env = f
        .launch(&[
            ("whist-managed-by", "whist-scaling-service"),
            ("whist-env", "prod"),
        ])
        .await;
    let (document, signature) = f.document(&other_env);
    assert!(refused(f.attestor.attest(&document, &signature, None).await).contains("tags"));

    let doomed = f.ours().await;
    f.ec2
        .terminate_instances()
        .instance_ids(&doomed)
        .send()
        .await
        .unwrap();
    let (document, signature) = f.document(&doomed);
    let reason = refused(f.attestor.attest(&document, &signature, None).await);
    assert!(reason.contains("not running"), "{reason}");

    let (document, signature) = f.document("i-0000000000000dead");
    let reason = refused(f.attestor.attest(&document, &signature, None).await);
    assert!(reason.contains("EC2 does not know"), "{reason}");

    // Nothing was recorded for any of them.
    let sql = f.stack.sql().await.unwrap();
    let recorded: i64 = sql
        .query_one("SELECT count(*) FROM whist.host_attestations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(recorded, 0);

    // Bad input is a 400 naming the problem.
    let (status, body) = f.post("{\"document\": 1}".to_owned(), None).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "BAD_REQUEST");
    let (status, body) = f
        .post(json!({"document": "x", "signature": "y"}).to_string(), None)
        .await;
    assert_eq!((status, body["error"].as_str()), (400, Some("BAD_REQUEST")));
}

#[tokio::test]
async fn a_replayed_document_gets_nothing_while_the_credential_lives_and_renewal_needs_it() {
    let f = fixture().await;
    let mine = f.ours().await;
    let other = f.ours().await;
    let (document, signature) = f.document(&mine);
    let body = json!({"document": document, "signature": signature}).to_string();

    let (status, first) = f.post(body.clone(), None).await;
    assert_eq!(status, 200, "{first}");
    let first = first["token"].as_str().unwrap().to_owned();

    // The same (valid) document again, without the credential: a replay.
    let (status, replay) = f.post(body.clone(), None).await;
    assert_eq!(
        (status, replay["error"].as_str()),
        (409, Some("ALREADY_ATTESTED"))
    );

    // A renewal with the current credential works, and retires it.
    let (status, renewed) = f.post(body.clone(), Some(&first)).await;
    assert_eq!(status, 200, "{renewed}");
    let second = renewed["token"].as_str().unwrap().to_owned();
    assert_ne!(first, second);
    let (status, stale) = f.post(body.clone(), Some(&first)).await;
    assert_eq!(
        (status, stale["error"].as_str()),
        (409, Some("ALREADY_ATTESTED"))
    );

    // One instance's credential does not renew another's.
    let (other_document, other_signature) = f.document(&other);
    let other_body = json!({"document": other_document, "signature": other_signature}).to_string();
    let (status, refused) = f.post(other_body.clone(), Some(&second)).await;
    assert_eq!(
        (status, refused["error"].as_str()),
        (403, Some("ATTESTATION_REFUSED"))
    );
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .contains("another instance")
    );
    // A credential from elsewhere is not ours.
    let foreign = SigningKey::generate()
        .unwrap()
        .sign(&json!({"sub": mine, "jti": uuid::Uuid::new_v4().to_string()}))
        .unwrap();
    let (status, _) = f.post(body.clone(), Some(&foreign)).await;
    assert_eq!(status, 403);

    // Once the credential has expired (by the database's clock), the instance may attest anew.
    let sql = f.stack.sql().await.unwrap();
    sql.execute(
        "UPDATE whist.host_attestations SET expires_at = now() - interval '1 second'",
        &[],
    )
    .await
    .unwrap();
    let (status, again) = f.post(body, None).await;
    assert_eq!(status, 200, "{again}");
}
