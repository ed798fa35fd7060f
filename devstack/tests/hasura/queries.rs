//! Query root fields: filters, ordering, paging, primary keys, relationships and the JSON
//! PostgreSQL renders.

use devstack::testing::{TEST_ADMIN_SECRET, TestStack};
use serde_json::{Value, json};

use crate::support::{data, insert_instance, insert_mandelbox, post_text};

fn ids(rows: &Value) -> Vec<&str> {
    rows.as_array()
        .expect("a list")
        .iter()
        .map(|r| r["id"].as_str().expect("id"))
        .collect()
}

async fn instance_ids(stack: &TestStack, arguments: &str) -> Vec<String> {
    let d = data(
        stack,
        &format!("{{ whist_instances({arguments}) {{ id }} }}"),
        json!({}),
    )
    .await;
    ids(&d["whist_instances"])
        .into_iter()
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn queries_filter_order_page_and_follow_relationships() {
    let stack = TestStack::start().await.unwrap();
    let sql = stack.sql().await.unwrap();
    insert_instance(&sql, "i-a", "ACTIVE", 3).await;
    insert_instance(&sql, "i-b", "ACTIVE", 1).await;
    insert_instance(&sql, "i-c", "DRAINING", 0).await;
    insert_instance(&sql, "i-d", "PRE_CONNECTION", 5).await;
    sql.execute(
        "UPDATE whist.instances SET ip_addr = NULL WHERE id = 'i-b'",
        &[],
    )
    .await
    .unwrap();
    sql.execute(
        "UPDATE whist.instances SET ip_addr = '10.0.0.0/24' WHERE id = 'i-d'",
        &[],
    )
    .await
    .unwrap();
    let running = insert_mandelbox(&sql, "i-a", "RUNNING", Some("u1")).await;
    insert_mandelbox(&sql, "i-a", "ALLOCATED", Some("u2")).await;
    insert_mandelbox(&sql, "i-b", "WAITING", None).await;

    // Column operators.
    let cases: &[(&str, &[&str])] = &[
        (r#"where: {status: {_eq: "ACTIVE"}}"#, &["i-a", "i-b"]),
        (r#"where: {status: {_neq: "ACTIVE"}}"#, &["i-c", "i-d"]),
        (
            r#"where: {remaining_capacity: {_gt: 0, _lte: 3}}"#,
            &["i-a", "i-b"],
        ),
        (
            r#"where: {remaining_capacity: {_gte: 3, _lt: 5}}"#,
            &["i-a"],
        ),
        (
            r#"where: {status: {_in: ["DRAINING", "PRE_CONNECTION"]}}"#,
            &["i-c", "i-d"],
        ),
        (
            r#"where: {status: {_nin: ["DRAINING", "PRE_CONNECTION"]}}"#,
            &["i-a", "i-b"],
        ),
        // A single value where a list is expected is a one-element list.
        (r#"where: {status: {_in: "DRAINING"}}"#, &["i-c"]),
        (r#"where: {ip_addr: {_is_null: true}}"#, &["i-b"]),
        (
            r#"where: {ip_addr: {_is_null: false}}"#,
            &["i-a", "i-c", "i-d"],
        ),
        (r#"where: {ip_addr: {_eq: "10.0.0.1"}}"#, &["i-a", "i-c"]),
        (
            r#"where: {id: {_like: "i-%"}, instance_type: {_ilike: "G4DN%"}}"#,
            &["i-a", "i-b", "i-c", "i-d"],
        ),
        (r#"where: {id: {_nlike: "i-_"}}"#, &[]),
        (r#"where: {id: {_regex: "^i-[ab]$"}}"#, &["i-a", "i-b"]),
        (
            r#"where: {created_at: {_lte: "now"}}"#,
            &["i-a", "i-b", "i-c", "i-d"],
        ),
        (r#"where: {}"#, &["i-a", "i-b", "i-c", "i-d"]),
        // Boolean combinators, including a single object where `_and` expects a list.
        (
            r#"where: {_or: [{status: {_eq: "DRAINING"}}, {_and: {remaining_capacity: {_gte: 5}}}]}"#,
            &["i-c", "i-d"],
        ),
        (
            r#"where: {_not: {status: {_eq: "ACTIVE"}}}"#,
            &["i-c", "i-d"],
        ),
        (
            r#"where: {_and: [{status: {_eq: "ACTIVE"}}, {remaining_capacity: {_gt: 1}}]}"#,
            &["i-a"],
        ),
        (r#"where: {_or: []}"#, &[]),
        // Relationship filters: "has at least one such related row".
        (
            r#"where: {mandelboxes: {status: {_eq: "RUNNING"}}}"#,
            &["i-a"],
        ),
        (r#"where: {mandelboxes: {}}"#, &["i-a", "i-b"]),
        (r#"where: {_not: {mandelboxes: {}}}"#, &["i-c", "i-d"]),
    ];
    for (arguments, expected) in cases {
        let got = instance_ids(&stack, &format!("{arguments}, order_by: {{id: asc}}")).await;
        assert_eq!(&got, expected, "{arguments}");
    }

    // Object relationship filter, and the same filter written through variables.
    let d = data(
        &stack,
        "query($s: String!) { whist_mandelboxes(where: {instance: {status: {_eq: $s}}}) { id } }",
        json!({"s": "ACTIVE"}),
    )
    .await;
    assert_eq!(d["whist_mandelboxes"].as_array().unwrap().len(), 3);
    let d = data(
        &stack,
        "query($w: whist_instances_bool_exp, $o: [whist_instances_order_by!]) { \
         whist_instances(where: $w, order_by: $o) { id } }",
        json!({"w": {"status": {"_in": ["ACTIVE"]}}, "o": {"remaining_capacity": "desc"}}),
    )
    .await;
    assert_eq!(ids(&d["whist_instances"]), ["i-a", "i-b"]);

    // Ordering: several keys, directions and null placement.
    assert_eq!(
        instance_ids(
            &stack,
            "order_by: [{status: desc}, {remaining_capacity: asc}]"
        )
        .await,
        ["i-d", "i-c", "i-b", "i-a"]
    );
    assert_eq!(
        instance_ids(&stack, "order_by: [{ip_addr: asc}, {id: asc}]").await,
        ["i-d", "i-a", "i-c", "i-b"],
        "asc puts nulls last"
    );
    assert_eq!(
        instance_ids(&stack, "order_by: [{ip_addr: asc_nulls_first}, {id: asc}]").await,
        ["i-b", "i-d", "i-a", "i-c"]
    );
    assert_eq!(
        instance_ids(&stack, "order_by: [{ip_addr: desc}, {id: desc}]").await,
        ["i-b", "i-c", "i-a", "i-d"],
        "desc puts nulls first"
    );
    assert_eq!(
        instance_ids(&stack, "order_by: [{ip_addr: desc_nulls_last}, {id: asc}]").await,
        ["i-a", "i-c", "i-d", "i-b"]
    );
    let d = data(
        &stack,
        "{ whist_mandelboxes(order_by: [{instance: {remaining_capacity: desc}}, {status: asc}]) \
         { status } }",
        json!({}),
    )
    .await;
    assert_eq!(
        d["whist_mandelboxes"],
        json!([{"status": "ALLOCATED"}, {"status": "RUNNING"}, {"status": "WAITING"}])
    );

    // Paging.
    assert_eq!(
        instance_ids(&stack, "order_by: {id: asc}, limit: 2, offset: 1").await,
        ["i-b", "i-c"]
    );
    assert_eq!(
        instance_ids(&stack, "order_by: {id: asc}, limit: 0").await,
        Vec::<String>::new()
    );

    // Primary keys, relationships with arguments, and the object relationship back.
    let d = data(
        &stack,
        r#"{ whist_instances_by_pk(id: "i-a") {
               id
               mandelboxes(where: {status: {_neq: "DYING"}}, order_by: {user_id: desc}, limit: 1) {
                 user_id instance { id status }
               }
             }
             missing: whist_instances_by_pk(id: "nope") { id } }"#,
        json!({}),
    )
    .await;
    assert_eq!(
        d,
        json!({
            "whist_instances_by_pk": {
                "id": "i-a",
                "mandelboxes": [{"user_id": "u2", "instance": {"id": "i-a", "status": "ACTIVE"}}]
            },
            "missing": null
        })
    );
    let d = data(
        &stack,
        "query($id: uuid!) { whist_mandelboxes_by_pk(id: $id) { id status } \
         whist_mandelboxes(where: {id: {_eq: $id}}) { user_id } }",
        json!({"id": running}),
    )
    .await;
    assert_eq!(
        d["whist_mandelboxes_by_pk"],
        json!({"id": running, "status": "RUNNING"})
    );
    assert_eq!(d["whist_mandelboxes"], json!([{"user_id": "u1"}]));

    // A composite primary key, and PostgreSQL's rendering of timestamptz and inet: UTC offset,
    // trailing zeros of the fraction dropped, no fraction when it is zero, no /32 on a host.
    sql.batch_execute(
        "INSERT INTO whist.images (provider, region, image_id, client_sha, updated_at) VALUES \
         ('AWS', 'us-east-1', 'ami-1', 'sha-1', '2022-01-18 13:58:16.952040+01'), \
         ('AWS', 'eu-west-1', 'ami-2', 'sha-2', '2016-07-20 09:30:00+00')",
    )
    .await
    .unwrap();
    let d = data(
        &stack,
        r#"{ a: whist_images_by_pk(provider: "AWS", region: "us-east-1") { image_id updated_at }
             b: whist_images_by_pk(provider: "AWS", region: "eu-west-1") { updated_at }
             c: whist_images_by_pk(provider: "GCP", region: "us-east-1") { image_id }
             whist_instances(order_by: {id: asc}) { ip_addr } }"#,
        json!({}),
    )
    .await;
    assert_eq!(
        d,
        json!({
            "a": {"image_id": "ami-1", "updated_at": "2022-01-18T12:58:16.95204+00:00"},
            "b": {"updated_at": "2016-07-20T09:30:00+00:00"},
            "c": null,
            "whist_instances": [
                {"ip_addr": "10.0.0.1"}, {"ip_addr": null}, {"ip_addr": "10.0.0.1"},
                {"ip_addr": "10.0.0.0/24"}
            ]
        })
    );

    // Root fields and nested fields come back in selection order, under their aliases.
    let text = post_text(
        &stack,
        Some(TEST_ADMIN_SECRET),
        json!({"query": r#"{ second: whist_instances_by_pk(id: "i-c") { status id } first: __typename }"#})
            .to_string(),
    )
    .await;
    assert_eq!(
        text,
        r#"{"data":{"second":{"status":"DRAINING","id":"i-c"},"first":"query_root"}}"#
    );
}
