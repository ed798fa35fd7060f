//! The migration runner and the schema it produces, on a real PostgreSQL.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use database::{MIGRATIONS, MigrateError, Migration, migrate, migrate_with};
use devstack::postgres::{Postgres, connect};
use tokio_postgres::error::SqlState;

async fn fresh() -> (Postgres, tokio_postgres::Client) {
    let pg = Postgres::start(None).unwrap();
    let client = connect(&pg.url("postgres")).await.unwrap();
    (pg, client)
}

async fn table_exists(client: &tokio_postgres::Client, name: &str) -> bool {
    client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&name])
        .await
        .unwrap()
        .get(0)
}

fn migration(version: i32, name: &'static str, sql: &'static str) -> Migration {
    Migration { version, name, sql }
}

#[tokio::test]
async fn migrations_apply_once_and_rerun_is_a_no_op() {
    let (_pg, mut client) = fresh().await;
    let first = migrate(&mut client).await.unwrap();
    let all: Vec<i32> = MIGRATIONS.iter().map(|m| m.version).collect();
    assert_eq!(first.applied, all);
    for table in ["whist.instances", "whist.mandelboxes", "whist.images"] {
        assert!(table_exists(&client, table).await, "{table} missing");
    }
    let second = migrate(&mut client).await.unwrap();
    assert!(second.applied.is_empty());
    assert_eq!(second.already_applied, all);
    let recorded: i64 = client
        .query_one("SELECT count(*) FROM whist_meta.schema_migrations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(recorded, all.len() as i64);
}

#[tokio::test]
async fn applied_migration_whose_text_changed_is_refused() {
    let (_pg, mut client) = fresh().await;
    let original = [migration(1, "t", "CREATE TABLE public.t (a int);")];
    migrate_with(&mut client, &original).await.unwrap();
    let edited = [
        migration(1, "t", "CREATE TABLE public.t (a bigint);"),
        migration(2, "u", "CREATE TABLE public.u (a int);"),
    ];
    let error = migrate_with(&mut client, &edited).await.unwrap_err();
    assert!(
        matches!(error, MigrateError::ChecksumMismatch { version: 1, .. }),
        "{error}"
    );
    assert!(
        !table_exists(&client, "public.u").await,
        "nothing may run after a mismatch"
    );
}

#[tokio::test]
async fn failed_migration_leaves_no_partial_schema() {
    let (_pg, mut client) = fresh().await;
    let migrations = [
        migration(1, "good", "CREATE TABLE public.good (a int);"),
        migration(2, "bad", "CREATE TABLE public.bad (a no_such_type);"),
    ];
    let error = migrate_with(&mut client, &migrations).await.unwrap_err();
    assert!(
        matches!(error, MigrateError::Failed { version: 2, .. }),
        "{error}"
    );
    assert!(!table_exists(&client, "public.good").await);
    assert!(
        !table_exists(&client, "whist_meta.schema_migrations").await,
        "the whole run is one transaction"
    );
}

#[tokio::test]
async fn concurrent_runners_apply_each_migration_exactly_once() {
    let (pg, _client) = fresh().await;
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let url = pg.url("postgres");
        tasks.push(tokio::spawn(async move {
            let mut client = connect(&url).await.unwrap();
            migrate(&mut client).await.unwrap()
        }));
    }
    let mut applied = 0;
    for t in tasks {
        applied += t.await.unwrap().applied.len();
    }
    assert_eq!(applied, MIGRATIONS.len());
}

#[test]
fn every_migration_file_is_compiled_in_in_order() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../database/migrations");
    let mut files: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".sql"))
        .collect();
    files.sort();
    let listed: Vec<String> = MIGRATIONS
        .iter()
        .map(|m| format!("{:04}_{}.sql", m.version, m.name))
        .collect();
    assert_eq!(
        files, listed,
        "database::MIGRATIONS must list every file of database/migrations"
    );
    for (m, f) in MIGRATIONS.iter().zip(&files) {
        let text = std::fs::read_to_string(format!("{dir}/{f}")).unwrap();
        assert_eq!(m.sql, text);
    }
}

/// The constraints the services rely on hold in the database itself.
#[tokio::test]
async fn schema_enforces_statuses_capacity_and_cascade() {
    let (_pg, mut client) = fresh().await;
    migrate(&mut client).await.unwrap();
    let insert_instance = "INSERT INTO whist.instances (id, provider, region, image_id, \
        client_sha, instance_type, remaining_capacity, status) VALUES ($1, 'AWS', 'us-east-1', \
        'ami-1', 'abc', 'g4dn.xlarge', $2, $3)";
    let bad_status = client
        .execute(insert_instance, &[&"i-1", &1i32, &"TERMINATED"])
        .await;
    assert_eq!(
        bad_status.unwrap_err().code(),
        Some(&SqlState::CHECK_VIOLATION)
    );
    let negative = client
        .execute(insert_instance, &[&"i-1", &-1i32, &"ACTIVE"])
        .await;
    assert_eq!(
        negative.unwrap_err().code(),
        Some(&SqlState::CHECK_VIOLATION)
    );
    client
        .execute(insert_instance, &[&"i-1", &2i32, &"ACTIVE"])
        .await
        .unwrap();

    let insert_mandelbox = "INSERT INTO whist.mandelboxes (id, app, instance_id, status) \
        VALUES (gen_random_uuid(), 'chrome', $1, $2)";
    let bad = client.execute(insert_mandelbox, &[&"i-1", &"EXITED"]).await;
    assert_eq!(bad.unwrap_err().code(), Some(&SqlState::CHECK_VIOLATION));
    let orphan = client
        .execute(insert_mandelbox, &[&"i-missing", &"ALLOCATED"])
        .await;
    assert_eq!(
        orphan.unwrap_err().code(),
        Some(&SqlState::FOREIGN_KEY_VIOLATION)
    );
    client
        .execute(insert_mandelbox, &[&"i-1", &"ALLOCATED"])
        .await
        .unwrap();

    // updated_at is kept by the trigger, on mandelboxes too: a client cannot backdate it.
    client
        .execute(
            "UPDATE whist.mandelboxes SET status = 'CONNECTING', updated_at = '2000-01-01'",
            &[],
        )
        .await
        .unwrap();
    let backdated: bool = client
        .query_one(
            "SELECT updated_at < '2001-01-01' FROM whist.mandelboxes",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!backdated, "the trigger must set updated_at to now()");

    // Deleting a host removes its mandelboxes (the original's RESTRICT made this fail).
    client
        .execute("DELETE FROM whist.instances WHERE id = 'i-1'", &[])
        .await
        .unwrap();
    let left: i64 = client
        .query_one("SELECT count(*) FROM whist.mandelboxes", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
}
