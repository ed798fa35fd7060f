//! Roles and JWT mode, as Hasura does them, with the real metadata's `host` role: a table or
//! column the role may not use is absent from its schema, select filters rows silently, update
//! and delete outside the filter affect nothing, a failed insert check is `permission-error`,
//! live queries are filtered per subscriber; and JWT mode (claims namespace, `Authorization:
//! Bearer` over HTTP and in `connection_init`, `invalid-jwt` / `access-denied`, expiry ends the
//! WebSocket). These are also the attacks one host's credential must not get through.

use std::time::Duration;

use devstack::hasura::{HasuraOptions, JwtSecret};
use devstack::jwks::{FakeJwks, SigningKey};
use devstack::testing::{TEST_ADMIN_SECRET, TestStack};
use futures::StreamExt;
use serde_json::{Value, json};

use crate::support::{Ws, data, expect_error, insert_instance, insert_mandelbox};

const NAMESPACE: &str = "https://hasura.io/jwt/claims";

struct JwtStack {
    stack: TestStack,
    jwks: FakeJwks,
}

async fn jwt_stack() -> JwtStack {
    let jwks = FakeJwks::start().await.unwrap();
    let secret =
        JwtSecret::parse(&json!({"type": "RS256", "jwk_url": jwks.jwks_url()}).to_string())
            .unwrap();
    let stack = TestStack::start_with(HasuraOptions {
        admin_secret: Some(TEST_ADMIN_SECRET.to_owned()),
        jwt_secret: Some(secret),
        ..HasuraOptions::default()
    })
    .await
    .unwrap();
    let sql = stack.sql().await.unwrap();
    insert_instance(&sql, "i-a", "ACTIVE", 4).await;
    insert_instance(&sql, "i-b", "ACTIVE", 4).await;
    JwtStack { stack, jwks }
}

fn host_claims(instance: &str, lifetime: i64) -> Value {
    let now = chrono::Utc::now().timestamp();
    json!({
        "sub": instance,
        "iat": now,
        "exp": now + lifetime,
        NAMESPACE: {
            "x-hasura-allowed-roles": ["host"],
            "x-hasura-default-role": "host",
            "x-hasura-instance-id": instance,
        }
    })
}

impl JwtStack {
    fn token(&self, instance: &str) -> String {
        self.jwks.key().sign(&host_claims(instance, 600)).unwrap()
    }

    async fn post(&self, headers: &[(&str, &str)], query: &str, variables: Value) -> Value {
        let mut request = reqwest::Client::new()
            .post(self.stack.graphql_url())
            .json(&json!({"query": query, "variables": variables}));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 200);
        response.json().await.unwrap()
    }

    async fn as_host(&self, instance: &str, query: &str, variables: Value) -> Value {
        let bearer = format!("Bearer {}", self.token(instance));
        self.post(&[("authorization", &bearer)], query, variables)
            .await
    }

    async fn as_host_data(&self, instance: &str, query: &str, variables: Value) -> Value {
        let response = self.as_host(instance, query, variables).await;
        assert!(response.get("errors").is_none(), "{response}");
        response["data"].clone()
    }
}

fn instance_ids(data: &Value) -> Vec<String> {
    data["whist_instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn select_filters_rows_silently() {
    let s = jwt_stack().await;
    let sql = s.stack.sql().await.unwrap();
    let own_box = insert_mandelbox(&sql, "i-a", "RUNNING", Some("u-a")).await;
    let other_box = insert_mandelbox(&sql, "i-b", "RUNNING", Some("u-b")).await;

    let all = s
        .as_host_data(
            "i-a",
            "{ whist_instances(order_by: {id: asc}) { id } }",
            json!({}),
        )
        .await;
    assert_eq!(instance_ids(&all), ["i-a"]);
    // Another host's row by key is simply not there.
    let other = s
        .as_host_data(
            "i-a",
            "query($id: String!) { whist_instances_by_pk(id: $id) { id ip_addr tls_fingerprint } }",
            json!({"id": "i-b"}),
        )
        .await;
    assert_eq!(other, json!({"whist_instances_by_pk": null}));
    // Mandelboxes: only its own, whatever the where clause asks for.
    let boxes = s
        .as_host_data(
            "i-a",
            "{ whist_mandelboxes(where: {user_id: {_in: [\"u-a\", \"u-b\"]}}) { id instance_id } }",
            json!({}),
        )
        .await;
    assert_eq!(
        boxes,
        json!({"whist_mandelboxes": [{"id": own_box, "instance_id": "i-a"}]})
    );
    let by_pk = s
        .as_host_data(
            "i-a",
            "query($id: uuid!) { whist_mandelboxes_by_pk(id: $id) { id } }",
            json!({"id": other_box}),
        )
        .await;
    assert_eq!(by_pk, json!({"whist_mandelboxes_by_pk": null}));
    // A relationship filter cannot reach the other host's rows either.
    let through = s
        .as_host_data(
            "i-a",
            "{ whist_mandelboxes(where: {instance: {id: {_eq: \"i-b\"}}}) { id } }",
            json!({}),
        )
        .await;
    assert_eq!(through, json!({"whist_mandelboxes": []}));

    // The admin secret still sees everything.
    let admin = data(
        &s.stack,
        "{ whist_instances(order_by: {id: asc}) { id } }",
        json!({}),
    )
    .await;
    assert_eq!(instance_ids(&admin), ["i-a", "i-b"]);
}

#[tokio::test]
async fn update_and_delete_outside_the_filter_affect_zero_rows() {
    let s = jwt_stack().await;
    let sql = s.stack.sql().await.unwrap();
    let other_box = insert_mandelbox(&sql, "i-b", "RUNNING", Some("u-b")).await;
    let fingerprint = "a".repeat(64);

    // Another host's fingerprint and address: nothing matches.
    let response = s
        .as_host_data(
            "i-a",
            "mutation($fp: String!) { update_whist_instances(where: {id: {_eq: \"i-b\"}}, \
             _set: {tls_fingerprint: $fp, ip_addr: \"10.9.9.9\"}) { affected_rows } }",
            json!({"fp": fingerprint}),
        )
        .await;
    assert_eq!(response["update_whist_instances"]["affected_rows"], 0);
    let by_pk = s
        .as_host_data(
            "i-a",
            "mutation($fp: String!) { update_whist_instances_by_pk(pk_columns: {id: \"i-b\"}, \
             _set: {tls_fingerprint: $fp}) { id } }",
            json!({"fp": fingerprint}),
        )
        .await;
    assert_eq!(by_pk, json!({"update_whist_instances_by_pk": null}));
    let everyone = s
        .as_host_data(
            "i-a",
            "mutation { update_whist_instances(where: {}, _inc: {remaining_capacity: 1}) \
             { affected_rows returning { id } } }",
            json!({}),
        )
        .await;
    assert_eq!(
        everyone["update_whist_instances"],
        json!({"affected_rows": 1, "returning": [{"id": "i-a"}]})
    );
    // Another host's mandelboxes cannot be changed or removed, nor that host's row deleted.
    let status = s
        .as_host_data(
            "i-a",
            "mutation($id: uuid!) { update_whist_mandelboxes(where: {id: {_eq: $id}}, \
             _set: {status: \"DYING\"}) { affected_rows } }",
            json!({"id": other_box}),
        )
        .await;
    assert_eq!(status["update_whist_mandelboxes"]["affected_rows"], 0);
    let removed = s
        .as_host_data(
            "i-a",
            "mutation { delete_whist_mandelboxes(where: {}) { affected_rows } \
             delete_whist_instances(where: {id: {_eq: \"i-b\"}}) { affected_rows } }",
            json!({}),
        )
        .await;
    assert_eq!(removed["delete_whist_mandelboxes"]["affected_rows"], 0);
    assert_eq!(removed["delete_whist_instances"]["affected_rows"], 0);

    let row = sql
        .query_one(
            "SELECT tls_fingerprint, host(ip_addr), remaining_capacity FROM whist.instances \
             WHERE id = 'i-b'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, Option<String>>(0), None);
    assert_eq!(row.get::<_, String>(1), "10.0.0.1");
    assert_eq!(row.get::<_, i32>(2), 4);
    let boxes: i64 = sql
        .query_one(
            "SELECT count(*) FROM whist.mandelboxes WHERE status = 'RUNNING'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(boxes, 1);

    // Its own row it can change.
    let own = s
        .as_host_data(
            "i-a",
            "mutation($fp: String!) { update_whist_instances(where: {id: {_eq: \"i-a\"}}, \
             _set: {tls_fingerprint: $fp}) { affected_rows } }",
            json!({"fp": fingerprint}),
        )
        .await;
    assert_eq!(own["update_whist_instances"]["affected_rows"], 1);
}

#[tokio::test]
async fn a_failed_insert_check_is_a_permission_error() {
    let s = jwt_stack().await;
    let sql = s.stack.sql().await.unwrap();
    const INSERT: &str = "mutation($id: uuid!, $instance: String!, $status: String!) { \
        insert_whist_mandelboxes_one(object: {id: $id, app: \"CHROME\", instance_id: $instance, \
        status: $status}) { id } }";
    for (instance, status) in [("i-b", "WAITING"), ("i-a", "ALLOCATED")] {
        let id = uuid::Uuid::new_v4().to_string();
        let response = s
            .as_host(
                "i-a",
                INSERT,
                json!({"id": id, "instance": instance, "status": status}),
            )
            .await;
        let message = expect_error(
            &response,
            "permission-error",
            "$.selectionSet.insert_whist_mandelboxes_one.args.object",
        );
        assert_eq!(
            message,
            "check constraint of an insert/update permission has failed"
        );
    }
    // An upsert onto another host's row changes nothing either.
    let other_box = insert_mandelbox(&sql, "i-b", "RUNNING", Some("u-b")).await;
    let upsert = s
        .as_host(
            "i-a",
            "mutation($id: uuid!) { insert_whist_mandelboxes(objects: [{id: $id, app: \"X\", \
             instance_id: \"i-a\", status: \"WAITING\"}], on_conflict: {constraint: \
             mandelboxes_pkey, update_columns: [status]}) { affected_rows } }",
            json!({"id": other_box}),
        )
        .await;
    assert_eq!(
        upsert["data"]["insert_whist_mandelboxes"]["affected_rows"], 0,
        "{upsert}"
    );
    let rows: Vec<(String, String)> = sql
        .query("SELECT instance_id, status FROM whist.mandelboxes", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(rows, [("i-b".to_owned(), "RUNNING".to_owned())]);

    // Its own warm box goes in.
    let id = uuid::Uuid::new_v4().to_string();
    let ok = s
        .as_host_data(
            "i-a",
            INSERT,
            json!({"id": id, "instance": "i-a", "status": "WAITING"}),
        )
        .await;
    assert_eq!(ok, json!({"insert_whist_mandelboxes_one": {"id": id}}));
}

#[tokio::test]
async fn what_the_role_may_not_use_is_absent_from_its_schema() {
    let s = jwt_stack().await;
    let cases = [
        (
            "{ whist_images { image_id } }",
            "$.selectionSet.whist_images",
            "field 'whist_images' not found in type: 'query_root'",
        ),
        (
            "mutation { delete_whist_images(where: {}) { affected_rows } }",
            "$.selectionSet.delete_whist_images",
            "field 'delete_whist_images' not found in type: 'mutation_root'",
        ),
        (
            "mutation { insert_whist_instances(objects: []) { affected_rows } }",
            "$.selectionSet.insert_whist_instances",
            "field 'insert_whist_instances' not found in type: 'mutation_root'",
        ),
        (
            "mutation { whist_assign_mandelbox(args: {}) { mandelbox_id } }",
            "$.selectionSet.whist_assign_mandelbox",
            "field 'whist_assign_mandelbox' not found in type: 'mutation_root'",
        ),
        (
            "{ whist_scaling_leases { region } }",
            "$.selectionSet.whist_scaling_leases",
            "field 'whist_scaling_leases' not found in type: 'query_root'",
        ),
    ];
    for (query, path, message) in cases {
        let response = s.as_host("i-a", query, json!({})).await;
        assert_eq!(
            expect_error(&response, "validation-failed", path),
            message,
            "{query}"
        );
    }
    // Columns outside the role's insert and update lists are absent from its input types.
    let response = s
        .as_host(
            "i-a",
            "mutation { update_whist_instances(where: {}, _set: {image_id: \"ami-evil\"}) \
             { affected_rows } }",
            json!({}),
        )
        .await;
    assert_eq!(
        expect_error(
            &response,
            "validation-failed",
            "$.selectionSet.update_whist_instances.args._set.image_id"
        ),
        "field 'image_id' not found in type: 'whist_instances_set_input'"
    );
    let response = s
        .as_host(
            "i-a",
            "mutation { insert_whist_mandelboxes_one(object: {id: \"5ccdb471-8ab2-4441-a3d1-f7f7146dda0c\", \
             app: \"X\", instance_id: \"i-a\", status: \"WAITING\", created_at: \"2020-01-01\"}) { id } }",
            json!({}),
        )
        .await;
    assert_eq!(
        expect_error(
            &response,
            "validation-failed",
            "$.selectionSet.insert_whist_mandelboxes_one.args.object.created_at"
        ),
        "field 'created_at' not found in type: 'whist_mandelboxes_insert_input'"
    );
    // The admin schema has all of it.
    let sdl = s.stack.hasura.sdl_for_role("host");
    assert!(!sdl.contains("whist_images"), "{sdl}");
    assert!(!sdl.contains("scaling"), "{sdl}");
    assert!(s.stack.hasura.sdl().contains("whist_images"));
}

#[tokio::test]
async fn jwt_errors_have_hasuras_codes_and_messages() {
    let s = jwt_stack().await;
    let query = "{ whist_instances { id } }";
    let stranger = SigningKey::generate("stranger").unwrap();
    let expired = s.jwks.key().sign(&host_claims("i-a", -60)).unwrap();
    let now = chrono::Utc::now().timestamp();
    let no_namespace = s
        .jwks
        .key()
        .sign(&json!({"sub": "i-a", "exp": now + 600}))
        .unwrap();
    let forged = stranger.sign(&host_claims("i-a", 600)).unwrap();
    let valid = s.token("i-a");
    type Case = (Vec<(&'static str, String)>, &'static str, &'static str);
    let cases: Vec<Case> = vec![
        (
            vec![],
            "invalid-headers",
            "Missing 'Authorization' or 'Cookie' header in JWT authentication mode",
        ),
        (
            vec![("authorization", format!("Token {valid}"))],
            "invalid-headers",
            "Malformed Authorization header",
        ),
        (
            vec![("authorization", format!("Bearer {forged}"))],
            "invalid-jwt",
            "Could not verify JWT: JWSError JWSInvalidSignature",
        ),
        (
            vec![("authorization", format!("Bearer {expired}"))],
            "invalid-jwt",
            "Could not verify JWT: JWTExpired",
        ),
        (
            vec![("authorization", format!("Bearer {no_namespace}"))],
            "jwt-invalid-claims",
            "claims key: 'https://hasura.io/jwt/claims' not found",
        ),
        (
            vec![
                ("authorization", format!("Bearer {valid}")),
                ("x-hasura-role", "admin".to_owned()),
            ],
            "access-denied",
            "Your requested role is not in allowed roles",
        ),
        (
            vec![("x-hasura-admin-secret", "wrong".to_owned())],
            "access-denied",
            "invalid x-hasura-admin-secret/x-hasura-access-key",
        ),
    ];
    for (headers, code, message) in cases {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        let response = s.post(&headers, query, json!({})).await;
        assert_eq!(expect_error(&response, code, "$"), message, "{headers:?}");
    }
    // A tampered payload (another instance id under a valid signature) fails the signature.
    let mut parts: Vec<String> = valid.split('.').map(str::to_owned).collect();
    use base64::Engine as _;
    let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let payload = String::from_utf8(engine.decode(&parts[1]).unwrap())
        .unwrap()
        .replace("i-a", "i-b");
    parts[1] = engine.encode(payload);
    let tampered = parts.join(".");
    let response = s
        .post(
            &[("authorization", &format!("Bearer {tampered}"))],
            query,
            json!({}),
        )
        .await;
    assert_eq!(
        expect_error(&response, "invalid-jwt", "$"),
        "Could not verify JWT: JWSError JWSInvalidSignature"
    );
}

#[tokio::test]
async fn connection_init_carries_the_bearer_token_and_live_queries_are_per_subscriber() {
    let s = jwt_stack().await;
    let sql = s.stack.sql().await.unwrap();
    const LIVE: &str = "subscription { whist_instances(order_by: {id: asc}) \
        { id remaining_capacity } }";
    let mut subscribers = Vec::new();
    for (protocol, instance) in [("graphql-ws", "i-a"), ("graphql-transport-ws", "i-b")] {
        let mut ws = Ws::connect(&s.stack, Some(protocol)).await;
        ws.send(json!({"type": "connection_init", "payload": {"headers":
            {"Authorization": format!("Bearer {}", s.token(instance))}}}))
            .await;
        assert_eq!(ws.recv().await, json!({"type": "connection_ack"}));
        let start = if protocol == "graphql-ws" {
            "start"
        } else {
            "subscribe"
        };
        ws.send(json!({"id": "1", "type": start, "payload": {"query": LIVE}}))
            .await;
        let first = ws.recv().await;
        assert_eq!(
            first["payload"]["data"]["whist_instances"],
            json!([{"id": instance, "remaining_capacity": 4}]),
            "{first}"
        );
        subscribers.push(ws);
    }
    // B's change reaches B only; A's next message is about A's own change.
    sql.execute(
        "UPDATE whist.instances SET remaining_capacity = 1 WHERE id = 'i-b'",
        &[],
    )
    .await
    .unwrap();
    let b = subscribers[1].recv().await;
    assert_eq!(
        b["payload"]["data"]["whist_instances"],
        json!([{"id": "i-b", "remaining_capacity": 1}])
    );
    sql.execute(
        "UPDATE whist.instances SET remaining_capacity = 2 WHERE id = 'i-a'",
        &[],
    )
    .await
    .unwrap();
    let a = subscribers[0].recv().await;
    assert_eq!(
        a["payload"]["data"]["whist_instances"],
        json!([{"id": "i-a", "remaining_capacity": 2}])
    );

    // A bad token in connection_init is refused as Hasura refuses a bad admin secret.
    let stranger = SigningKey::generate("stranger").unwrap();
    let forged = stranger.sign(&host_claims("i-a", 600)).unwrap();
    let mut legacy = Ws::connect(&s.stack, Some("graphql-ws")).await;
    legacy
        .send(json!({"type": "connection_init",
                     "payload": {"headers": {"Authorization": format!("Bearer {forged}")}}}))
        .await;
    assert_eq!(
        legacy.recv().await,
        json!({"type": "connection_error",
               "payload": "Could not verify JWT: JWSError JWSInvalidSignature"})
    );
    let mut transport = Ws::connect(&s.stack, Some("graphql-transport-ws")).await;
    transport
        .send(json!({"type": "connection_init",
                     "payload": {"headers": {"Authorization": format!("Bearer {forged}")}}}))
        .await;
    assert_eq!(transport.expect_close().await.0, 4403);
}

#[tokio::test]
async fn an_expired_token_ends_the_websocket() {
    let s = jwt_stack().await;
    let token = s.jwks.key().sign(&host_claims("i-a", 2)).unwrap();
    let mut ws = Ws::connect(&s.stack, Some("graphql-transport-ws")).await;
    ws.send(json!({"type": "connection_init",
                   "payload": {"headers": {"Authorization": format!("Bearer {token}")}}}))
        .await;
    assert_eq!(ws.recv().await, json!({"type": "connection_ack"}));
    // The socket ends once `exp` passes (bounded wait; keep-alives until then).
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match ws.stream_mut().next().await {
                None | Some(Err(_)) => break,
                Some(Ok(tokio_tungstenite::tungstenite::Message::Close(_))) => break,
                Some(Ok(_)) => continue,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the socket outlived its token");
}
