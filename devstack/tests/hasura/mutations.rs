//! Mutation root fields, the per-request transaction, and the guarded update race.

use std::time::{Duration, Instant};

use devstack::testing::TestStack;
use serde_json::{Value, json};

use crate::support::{data, expect_error, gql, insert_instance, insert_mandelbox};

const INSTANCE_FIELDS: &str = "id remaining_capacity status";

fn instance(id: &str, status: &str, capacity: i32) -> Value {
    json!({
        "id": id, "provider": "AWS", "region": "us-east-1", "image_id": "ami-1",
        "client_sha": "sha-1", "instance_type": "g4dn.xlarge",
        "remaining_capacity": capacity, "status": status
    })
}

async fn capacity_and_status(stack: &TestStack, id: &str) -> Value {
    let d = data(
        stack,
        "query($id: String!) { whist_instances_by_pk(id: $id) { remaining_capacity status } }",
        json!({"id": id}),
    )
    .await;
    d["whist_instances_by_pk"].clone()
}

#[tokio::test]
async fn mutations_insert_upsert_update_and_delete() {
    let stack = TestStack::start().await.unwrap();

    // insert: defaults fill omitted columns, explicit null inserts NULL, returning shows rows
    // as stored.
    let mut with_ip = instance("m-1", "ACTIVE", 2);
    with_ip["ip_addr"] = json!("10.1.2.3");
    let mut null_ip = instance("m-2", "ACTIVE", 4);
    null_ip["ip_addr"] = Value::Null;
    let d = data(
        &stack,
        "mutation($objects: [whist_instances_insert_input!]!) { \
         insert_whist_instances(objects: $objects) { affected_rows \
         returning { id ip_addr created_at updated_at mandelboxes { id } } } }",
        json!({"objects": [with_ip, null_ip]}),
    )
    .await;
    let inserted = &d["insert_whist_instances"];
    assert_eq!(inserted["affected_rows"], 2);
    assert_eq!(inserted["returning"][0]["id"], "m-1");
    assert_eq!(inserted["returning"][0]["ip_addr"], "10.1.2.3");
    assert_eq!(inserted["returning"][1]["ip_addr"], Value::Null);
    assert_eq!(inserted["returning"][1]["mandelboxes"], json!([]));
    let created_at = inserted["returning"][0]["created_at"].as_str().unwrap();
    assert!(
        created_at.contains('T') && created_at.ends_with("+00:00"),
        "{created_at}"
    );
    let updated_at = inserted["returning"][0]["updated_at"]
        .as_str()
        .unwrap()
        .to_owned();

    // insert_one with an array of zero objects and with one object.
    let d = data(
        &stack,
        "mutation { insert_whist_instances(objects: []) { affected_rows returning { id } } }",
        json!({}),
    )
    .await;
    assert_eq!(
        d["insert_whist_instances"],
        json!({"affected_rows": 0, "returning": []})
    );
    let d = data(
        &stack,
        &format!(
            "mutation($o: whist_instances_insert_input!) {{ \
             insert_whist_instances_one(object: $o) {{ {INSTANCE_FIELDS} }} }}"
        ),
        json!({"o": instance("m-3", "PRE_CONNECTION", 1)}),
    )
    .await;
    assert_eq!(
        d["insert_whist_instances_one"],
        json!({"id": "m-3", "remaining_capacity": 1, "status": "PRE_CONNECTION"})
    );

    // on_conflict with update_columns: the conflicting row takes the listed columns only.
    let upsert = format!(
        "mutation($o: whist_instances_insert_input!, $c: whist_instances_on_conflict) {{ \
         insert_whist_instances_one(object: $o, on_conflict: $c) {{ {INSTANCE_FIELDS} }} }}"
    );
    let d = data(
        &stack,
        &upsert,
        json!({"o": instance("m-1", "DRAINING", 9),
               "c": {"constraint": "instances_pkey", "update_columns": ["status"]}}),
    )
    .await;
    assert_eq!(
        d["insert_whist_instances_one"],
        json!({"id": "m-1", "remaining_capacity": 2, "status": "DRAINING"})
    );
    // ... only when on_conflict.where holds: here it does not, so nothing is returned.
    let d = data(
        &stack,
        &upsert,
        json!({"o": instance("m-1", "ACTIVE", 9),
               "c": {"constraint": "instances_pkey", "update_columns": ["status", "remaining_capacity"],
                     "where": {"status": {"_eq": "ACTIVE"}}}}),
    )
    .await;
    assert_eq!(d["insert_whist_instances_one"], Value::Null);
    // Empty update_columns (also the default) ignores the conflict.
    let d = data(
        &stack,
        "mutation { insert_whist_instances(objects: [{id: \"m-1\", provider: \"AWS\", \
         region: \"r\", image_id: \"a\", client_sha: \"s\", instance_type: \"t\", \
         remaining_capacity: 7, status: \"ACTIVE\"}], \
         on_conflict: {constraint: instances_pkey}) { affected_rows returning { id } } }",
        json!({}),
    )
    .await;
    assert_eq!(
        d["insert_whist_instances"],
        json!({"affected_rows": 0, "returning": []})
    );
    assert_eq!(
        capacity_and_status(&stack, "m-1").await,
        json!({"remaining_capacity": 2, "status": "DRAINING"})
    );

    // _inc and _set together; updated_at moves (BEFORE UPDATE trigger) and returning shows it.
    let d = data(
        &stack,
        "mutation { update_whist_instances(where: {id: {_eq: \"m-1\"}}, \
         _inc: {remaining_capacity: -1}, _set: {status: \"ACTIVE\"}) { \
         affected_rows returning { remaining_capacity status updated_at } } }",
        json!({}),
    )
    .await;
    let updated = &d["update_whist_instances"];
    assert_eq!(updated["affected_rows"], 1);
    assert_eq!(updated["returning"][0]["remaining_capacity"], 1);
    assert_eq!(updated["returning"][0]["status"], "ACTIVE");
    assert_ne!(updated["returning"][0]["updated_at"], json!(updated_at));

    // A filter matching nothing: zero rows, no error.
    let d = data(
        &stack,
        "mutation { update_whist_instances(where: {id: {_eq: \"none\"}}, \
         _set: {status: \"ACTIVE\"}) { affected_rows returning { id } } }",
        json!({}),
    )
    .await;
    assert_eq!(
        d["update_whist_instances"],
        json!({"affected_rows": 0, "returning": []})
    );

    // update_by_pk: the row, or null when the key does not exist.
    let d = data(
        &stack,
        &format!(
            "mutation {{ a: update_whist_instances_by_pk(pk_columns: {{id: \"m-2\"}}, \
             _inc: {{remaining_capacity: 3}}) {{ {INSTANCE_FIELDS} }} \
             b: update_whist_instances_by_pk(pk_columns: {{id: \"none\"}}, \
             _set: {{status: \"ACTIVE\"}}) {{ id }} }}"
        ),
        json!({}),
    )
    .await;
    assert_eq!(
        d,
        json!({"a": {"id": "m-2", "remaining_capacity": 7, "status": "ACTIVE"}, "b": null})
    );

    // A composite primary key.
    let d = data(
        &stack,
        "mutation { insert_whist_images_one(object: {provider: \"AWS\", region: \"r1\", \
         image_id: \"ami-1\", client_sha: \"s1\"}) { image_id } \
         update_whist_images_by_pk(pk_columns: {provider: \"AWS\", region: \"r1\"}, \
         _set: {image_id: \"ami-2\"}) { image_id client_sha } }",
        json!({}),
    )
    .await;
    assert_eq!(
        d,
        json!({"insert_whist_images_one": {"image_id": "ami-1"},
               "update_whist_images_by_pk": {"image_id": "ami-2", "client_sha": "s1"}})
    );

    // delete_by_pk returns the row once, then null; delete cascades to mandelboxes.
    let sql = stack.sql().await.unwrap();
    let mandelbox = insert_mandelbox(&sql, "m-2", "WAITING", None).await;
    insert_mandelbox(&sql, "m-2", "RUNNING", Some("u1")).await;
    let delete_one =
        "mutation($id: uuid!) { delete_whist_mandelboxes_by_pk(id: $id) { id status } }";
    let d = data(&stack, delete_one, json!({"id": mandelbox})).await;
    assert_eq!(
        d["delete_whist_mandelboxes_by_pk"],
        json!({"id": mandelbox, "status": "WAITING"})
    );
    let d = data(&stack, delete_one, json!({"id": mandelbox})).await;
    assert_eq!(d["delete_whist_mandelboxes_by_pk"], Value::Null);
    let d = data(
        &stack,
        "mutation { delete_whist_instances(where: {id: {_in: [\"m-2\", \"m-3\"]}}) { \
         affected_rows returning { id } } }",
        json!({}),
    )
    .await;
    assert_eq!(d["delete_whist_instances"]["affected_rows"], 2);
    let left: i64 = sql
        .query_one("SELECT count(*) FROM whist.mandelboxes", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
}

#[tokio::test]
async fn mutation_fields_run_in_order_in_one_transaction() {
    let stack = TestStack::start().await.unwrap();

    // A later field sees an earlier one.
    let d = data(
        &stack,
        "mutation($o: whist_instances_insert_input!) { \
         a: insert_whist_instances_one(object: $o) { id } \
         b: update_whist_instances(where: {id: {_eq: \"t-1\"}}, _inc: {remaining_capacity: 1}) { \
            affected_rows returning { remaining_capacity } } }",
        json!({"o": instance("t-1", "ACTIVE", 1)}),
    )
    .await;
    assert_eq!(
        d,
        json!({"a": {"id": "t-1"},
               "b": {"affected_rows": 1, "returning": [{"remaining_capacity": 2}]}})
    );

    // A failing field rolls back the fields before it; the response is the error alone.
    let response = gql(
        &stack,
        "mutation($new: whist_instances_insert_input!, $dup: whist_instances_insert_input!) { \
         a: insert_whist_instances_one(object: $new) { id } \
         b: update_whist_instances(where: {id: {_eq: \"t-1\"}}, _inc: {remaining_capacity: 5}) { affected_rows } \
         c: insert_whist_instances_one(object: $dup) { id } \
         d: delete_whist_instances(where: {}) { affected_rows } }",
        json!({"new": instance("t-2", "ACTIVE", 1), "dup": instance("t-1", "ACTIVE", 1)}),
    )
    .await;
    let message = expect_error(
        &response,
        "constraint-violation",
        "$.selectionSet.c.args.object",
    );
    assert!(message.starts_with("Uniqueness violation. "), "{message}");
    let d = data(
        &stack,
        "{ whist_instances(order_by: {id: asc}) { id remaining_capacity } }",
        json!({}),
    )
    .await;
    assert_eq!(
        d["whist_instances"],
        json!([{"id": "t-1", "remaining_capacity": 2}]),
        "neither the insert nor the update before the failing field was kept"
    );
}

/// Two services claiming the same ALLOCATED mandelbox at once: exactly one update applies.
#[tokio::test]
async fn guarded_update_applies_exactly_once_under_concurrency() {
    let stack = TestStack::start().await.unwrap();
    let sql = stack.sql().await.unwrap();
    insert_instance(&sql, "r-1", "ACTIVE", 1).await;
    let mandelbox = insert_mandelbox(&sql, "r-1", "ALLOCATED", Some("u1")).await;

    // Hold the row so that both claims are certainly waiting on it at the same time.
    let mut locker = stack.sql().await.unwrap();
    let lock = locker.transaction().await.unwrap();
    lock.execute(
        "SELECT 1 FROM whist.mandelboxes WHERE id = $1::text::uuid FOR UPDATE",
        &[&mandelbox],
    )
    .await
    .unwrap();

    let claim = "mutation($id: uuid!, $session: String!) { update_whist_mandelboxes(\
                 where: {id: {_eq: $id}, status: {_eq: \"ALLOCATED\"}}, \
                 _set: {status: \"CONNECTING\", session_id: $session}) { affected_rows } }";
    let first = gql(&stack, claim, json!({"id": mandelbox, "session": "s-1"}));
    let second = gql(&stack, claim, json!({"id": mandelbox, "session": "s-2"}));
    let release = async {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let waiting: i64 = sql
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
                     AND query LIKE '%UPDATE%mandelboxes%'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            if waiting == 2 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "both claims should block on the row"
            );
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        lock.commit().await.unwrap();
    };
    let (first, second, ()) = tokio::join!(first, second, release);

    let applied: Vec<i64> = [&first, &second]
        .iter()
        .map(|r| {
            r["data"]["update_whist_mandelboxes"]["affected_rows"]
                .as_i64()
                .unwrap_or_else(|| panic!("{r}"))
        })
        .collect();
    let mut sorted = applied.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, [0, 1], "exactly one claim applies: {applied:?}");
    let winner = if applied[0] == 1 { "s-1" } else { "s-2" };
    let row = sql
        .query_one(
            "SELECT status, session_id FROM whist.mandelboxes WHERE id = $1::text::uuid",
            &[&mandelbox],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "CONNECTING");
    assert_eq!(row.get::<_, Option<String>>(1).as_deref(), Some(winner));
}
