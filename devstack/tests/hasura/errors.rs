//! Hasura's error envelope over HTTP: HTTP 200, one error, `extensions.path` and `.code`.

use devstack::testing::{TEST_ADMIN_SECRET, TestStack};
use serde_json::json;

use crate::support::{expect_error, gql, insert_instance, post_raw};

const INSERT_INSTANCE: &str = "mutation($o: [whist_instances_insert_input!]!) { \
                               insert_whist_instances(objects: $o) { affected_rows } }";

#[tokio::test]
async fn errors_use_hasuras_codes_paths_and_messages() {
    let stack = TestStack::start().await.unwrap();
    let query = json!({"query": "{ __typename }"}).to_string();

    // Authentication.
    let message = expect_error(
        &post_raw(&stack, None, query.clone()).await,
        "access-denied",
        "$",
    );
    assert_eq!(
        message,
        "x-hasura-admin-secret/x-hasura-access-key required, but not found"
    );
    let message = expect_error(
        &post_raw(&stack, Some("wrong"), query.clone()).await,
        "access-denied",
        "$",
    );
    assert_eq!(message, "invalid x-hasura-admin-secret/x-hasura-access-key");
    let response = reqwest::Client::new()
        .post(stack.graphql_url())
        .header("X-Hasura-Access-Key", TEST_ADMIN_SECRET)
        .body(query.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.json::<serde_json::Value>().await.unwrap(),
        json!({"data": {"__typename": "query_root"}}),
        "the deprecated access-key header is accepted, and header names are case-insensitive"
    );

    // The request body.
    let secret = Some(TEST_ADMIN_SECRET);
    expect_error(
        &post_raw(&stack, secret, "{\"query\": ".into()).await,
        "invalid-json",
        "$",
    );
    let message = expect_error(
        &post_raw(&stack, secret, json!({"variables": {}}).to_string()).await,
        "parse-failed",
        "$",
    );
    assert_eq!(message, "the key 'query' was not present");

    // The document.
    let message = expect_error(
        &gql(&stack, "{ whist_instances { id }", json!({})).await,
        "validation-failed",
        "$.query",
    );
    assert_eq!(message, "not a valid graphql query");
    let message = expect_error(
        &gql(&stack, "{ foo }", json!({})).await,
        "validation-failed",
        "$.selectionSet.foo",
    );
    assert_eq!(message, "field 'foo' not found in type: 'query_root'");
    let message = expect_error(
        &gql(&stack, "{ whist_instances { id nope } }", json!({})).await,
        "validation-failed",
        "$.selectionSet.whist_instances.selectionSet.nope",
    );
    assert_eq!(message, "field 'nope' not found in type: 'whist_instances'");
    let message = expect_error(
        &gql(
            &stack,
            "query($id: String!) { whist_instances_by_pk(id: $id) { id } }",
            json!({}),
        )
        .await,
        "validation-failed",
        "$",
    );
    assert_eq!(
        message,
        "expecting a value for non-nullable variable: \"id\""
    );
    let message = expect_error(
        &gql(
            &stack,
            "query a { __typename } query b { __typename }",
            json!({}),
        )
        .await,
        "validation-failed",
        "$",
    );
    assert_eq!(
        message,
        "exactly one operation has to be present in the document when operationName is not specified"
    );
    expect_error(
        &gql(
            &stack,
            "{ whist_instances(limit: 2147483648) { id } }",
            json!({}),
        )
        .await,
        "parse-failed",
        "$.selectionSet.whist_instances.args.limit",
    );
    let message = expect_error(
        &gql(&stack, "subscription { whist_instances { id } }", json!({})).await,
        "unexpected-payload",
        "$",
    );
    assert_eq!(
        message,
        "subscriptions are not supported over HTTP, use websockets instead"
    );

    // Database errors.
    let sql = stack.sql().await.unwrap();
    insert_instance(&sql, "e-1", "ACTIVE", 1).await;
    let row = |id: &str, status: &str| {
        json!({"id": id, "provider": "AWS", "region": "r", "image_id": "a", "client_sha": "s",
               "instance_type": "t", "remaining_capacity": 1, "status": status})
    };
    let message = expect_error(
        &gql(
            &stack,
            INSERT_INSTANCE,
            json!({"o": [row("e-1", "ACTIVE")]}),
        )
        .await,
        "constraint-violation",
        "$.selectionSet.insert_whist_instances.args.objects",
    );
    assert_eq!(
        message,
        "Uniqueness violation. duplicate key value violates unique constraint \"instances_pkey\""
    );
    let message = expect_error(
        &gql(
            &stack,
            "mutation { insert_whist_mandelboxes_one(object: {id: \"5ccdb471-8ab2-4441-a3d1-f7f7146dda0c\", \
             app: \"CHROME\", instance_id: \"missing\", status: \"WAITING\"}) { id } }",
            json!({}),
        )
        .await,
        "constraint-violation",
        "$.selectionSet.insert_whist_mandelboxes_one.args.object",
    );
    assert_eq!(
        message,
        "Foreign key violation. insert or update on table \"mandelboxes\" violates foreign key \
         constraint \"mandelboxes_instance_id_fkey\""
    );
    let mut missing_provider = row("e-2", "ACTIVE");
    missing_provider.as_object_mut().unwrap().remove("provider");
    let message = expect_error(
        &gql(&stack, INSERT_INSTANCE, json!({"o": [missing_provider]})).await,
        "constraint-violation",
        "$.selectionSet.insert_whist_instances.args.objects",
    );
    assert!(
        message.starts_with("Not-NULL violation. null value in column \"provider\""),
        "{message}"
    );
    let message = expect_error(
        &gql(&stack, INSERT_INSTANCE, json!({"o": [row("e-3", "BOGUS")]})).await,
        "permission-error",
        "$.selectionSet.insert_whist_instances.args.objects",
    );
    assert_eq!(
        message,
        "Check constraint violation. new row for relation \"instances\" violates check \
         constraint \"instances_status_check\""
    );
    let message = expect_error(
        &gql(
            &stack,
            "{ whist_mandelboxes(where: {id: {_eq: \"not-a-uuid\"}}) { id } }",
            json!({}),
        )
        .await,
        "data-exception",
        "$",
    );
    assert_eq!(
        message,
        "invalid input syntax for type uuid: \"not-a-uuid\""
    );
    let message = expect_error(
        &gql(
            &stack,
            "{ whist_instances(where: {ip_addr: {_eq: \"10.0.0.300\"}}) { id } }",
            json!({}),
        )
        .await,
        "data-exception",
        "$",
    );
    assert_eq!(
        message,
        "invalid input syntax for type inet: \"10.0.0.300\""
    );
    expect_error(
        &gql(
            &stack,
            "mutation { update_whist_instances(where: {}, _set: {created_at: \"yesterday-ish\"}) \
             { affected_rows } }",
            json!({}),
        )
        .await,
        "data-exception",
        "$",
    );

    // A batch: one answer per request, in order, each with its own envelope.
    let batch = post_raw(
        &stack,
        secret,
        json!([{"query": "{ __typename }"}, {"query": "{ foo }"}]).to_string(),
    )
    .await;
    assert_eq!(batch[0], json!({"data": {"__typename": "query_root"}}));
    expect_error(&batch[1], "validation-failed", "$.selectionSet.foo");

    // GET /healthz.
    let response = reqwest::get(format!("http://{}/healthz", stack.addr))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "OK");
}
