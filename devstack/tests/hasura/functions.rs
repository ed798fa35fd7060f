//! Tracked SQL functions as Hasura serves them: a `STABLE` one as a query with the return
//! table's `where`/`order_by`/`limit` and relationships, a `VOLATILE` one as a mutation that runs
//! in the request's one transaction, each only under its own root.

use devstack::hasura::{Hasura, HasuraOptions};
use devstack::testing::TestStack;
use serde_json::{Value, json};

use crate::support::insert_instance;

const FUNCTIONS_SQL: &str = "\
    CREATE FUNCTION whist.instances_with_capacity(at_least integer) \
    RETURNS SETOF whist.instances LANGUAGE sql STABLE AS \
    $$ SELECT * FROM whist.instances WHERE remaining_capacity >= at_least $$; \
    CREATE FUNCTION whist.bump_capacity(by_units integer) \
    RETURNS SETOF whist.instances LANGUAGE sql VOLATILE AS \
    $$ UPDATE whist.instances SET remaining_capacity = remaining_capacity + by_units RETURNING * $$;";

/// The project's metadata plus the two functions above (one placed by its volatility).
fn metadata() -> String {
    let mut metadata: Value = serde_json::from_str(database::HASURA_METADATA).unwrap();
    let functions = metadata["sources"][0]["functions"].as_array_mut().unwrap();
    functions.push(json!({
        "function": {"schema": "whist", "name": "instances_with_capacity"},
        "configuration": {"exposed_as": "query"}
    }));
    functions.push(json!({"function": {"schema": "whist", "name": "bump_capacity"}}));
    metadata.to_string()
}

async fn post(url: &str, query: &str) -> Value {
    reqwest::Client::new()
        .post(url)
        .json(&json!({"query": query}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn error_of(response: &Value) -> (String, String) {
    let error = &response["errors"][0];
    (
        error["extensions"]["code"]
            .as_str()
            .unwrap_or("")
            .to_owned(),
        error["message"].as_str().unwrap_or("").to_owned(),
    )
}

#[tokio::test]
async fn tracked_functions_are_served_as_queries_and_mutations() {
    let stack = TestStack::start().await.unwrap();
    let sql = stack.sql().await.unwrap();
    sql.batch_execute(FUNCTIONS_SQL).await.unwrap();
    for (id, capacity) in [("a", 1), ("b", 5), ("c", 3)] {
        insert_instance(&sql, id, "ACTIVE", capacity).await;
    }
    let hasura = Hasura::with_metadata(&stack.database_url, &metadata(), HasuraOptions::default())
        .await
        .unwrap();
    let sdl = hasura.sdl();
    assert!(
        sdl.contains("input whist_bump_capacity_args {\n\tby_units: Int\n}"),
        "{sdl}"
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1/graphql", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, hasura.router()).await });

    let rows = post(
        &url,
        "{ whist_instances_with_capacity(args: {at_least: 3}, order_by: {id: desc}) \
           { id remaining_capacity mandelboxes { id } } }",
    )
    .await;
    assert_eq!(
        rows["data"]["whist_instances_with_capacity"],
        json!([
            {"id": "c", "remaining_capacity": 3, "mandelboxes": []},
            {"id": "b", "remaining_capacity": 5, "mandelboxes": []}
        ]),
        "{rows}"
    );
    let filtered = post(
        &url,
        "{ whist_instances_with_capacity(args: {at_least: 1}, where: {id: {_neq: \"b\"}}, \
           order_by: {id: asc}, limit: 1) { id } }",
    )
    .await;
    assert_eq!(
        filtered["data"]["whist_instances_with_capacity"],
        json!([{"id": "a"}])
    );

    // Each under its own root only.
    let (code, message) =
        error_of(&post(&url, "{ whist_bump_capacity(args: {by_units: 1}) { id } }").await);
    assert_eq!(code, "validation-failed");
    assert!(
        message.contains("not found in type: 'query_root'"),
        "{message}"
    );
    let (code, _) = error_of(
        &post(
            &url,
            "mutation { whist_instances_with_capacity(args: {at_least: 1}) { id } }",
        )
        .await,
    );
    assert_eq!(code, "validation-failed");

    // A mutation field: its writes roll back with a later failing field...
    let failed = post(
        &url,
        "mutation { a: whist_bump_capacity(args: {by_units: 10}) { id } \
           b: insert_whist_instances_one(object: {id: \"a\", provider: \"AWS\", region: \"r\", \
              image_id: \"ami\", client_sha: \"x\", instance_type: \"t\", remaining_capacity: 1, \
              status: \"ACTIVE\"}) { id } }",
    )
    .await;
    assert_eq!(error_of(&failed).0, "constraint-violation", "{failed}");
    let capacities = |rows: &Value| -> Vec<i64> {
        rows["data"]["whist_instances"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["remaining_capacity"].as_i64().unwrap())
            .collect()
    };
    let read = "{ whist_instances(order_by: {id: asc}) { remaining_capacity } }";
    assert_eq!(capacities(&post(&url, read).await), vec![1, 5, 3]);
    // ...and are kept when the request succeeds; its rows are what it returned.
    let bumped = post(
        &url,
        "mutation { whist_bump_capacity(args: {by_units: 2}, order_by: {id: asc}) \
           { id remaining_capacity } }",
    )
    .await;
    assert_eq!(
        bumped["data"]["whist_bump_capacity"],
        json!([
            {"id": "a", "remaining_capacity": 3},
            {"id": "b", "remaining_capacity": 7},
            {"id": "c", "remaining_capacity": 5}
        ]),
        "{bumped}"
    );
    assert_eq!(capacities(&post(&url, read).await), vec![3, 7, 5]);
}
