//! The `whist` schema: its versioned PostgreSQL migrations, the runner that applies them, and
//! the Hasura metadata that tracks the same tables.
//!
//! Migrations live in `database/migrations/NNNN_name.sql` and are compiled into the binary, so a
//! release always carries exactly the schema it was built and tested against. The runner
//!
//! - records each applied migration (version, name, SHA-256 of its text) in
//!   `whist_meta.schema_migrations`;
//! - is idempotent: running it again applies nothing;
//! - refuses to go on when an applied migration's text has changed since it ran;
//! - applies everything pending in one transaction under an advisory lock, so two deploys racing
//!   each other, or a crash half-way, never leave a half-migrated schema.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use tokio_postgres::Client;

/// One migration: its version (the file's numeric prefix), name and SQL text.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
}

impl Migration {
    /// The hex SHA-256 of the migration's text, as recorded when it is applied.
    pub fn checksum(&self) -> String {
        let digest = Sha256::digest(self.sql.as_bytes());
        digest.iter().fold(String::with_capacity(64), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
    }
}

/// Every migration, in order. A test checks that this list matches `database/migrations/`.
pub static MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "whist_schema",
        sql: include_str!("../migrations/0001_whist_schema.sql"),
    },
    Migration {
        version: 2,
        name: "instance_tls_fingerprint",
        sql: include_str!("../migrations/0002_instance_tls_fingerprint.sql"),
    },
    Migration {
        version: 3,
        name: "scaling_lease",
        sql: include_str!("../migrations/0003_scaling_lease.sql"),
    },
    Migration {
        version: 4,
        name: "scaling_launches",
        sql: include_str!("../migrations/0004_scaling_launches.sql"),
    },
    Migration {
        version: 5,
        name: "assign_function",
        sql: include_str!("../migrations/0005_assign_function.sql"),
    },
    Migration {
        version: 6,
        name: "scaling_lease_fencing",
        sql: include_str!("../migrations/0006_scaling_lease_fencing.sql"),
    },
    Migration {
        version: 7,
        name: "host_attestations",
        sql: include_str!("../migrations/0007_host_attestations.sql"),
    },
];

/// The Hasura metadata (the `args` of a `replace_metadata` call) that tracks the `whist` tables
/// and their relationships. devstack's GraphQL stand-in reads the same file.
pub const HASURA_METADATA: &str = include_str!("../hasura/metadata.json");

/// The schema that holds the runner's own bookkeeping, kept apart from `whist` so Hasura never
/// sees it.
pub const META_SCHEMA: &str = "whist_meta";

/// Any 64-bit number works as long as every runner uses the same one.
const MIGRATION_LOCK_KEY: i64 = 0x7768_6973_745f_6d67; // "whist_mg"

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("database error while migrating: {0}")]
    Database(#[from] tokio_postgres::Error),
    #[error(
        "migration {version} ({name}) was applied with checksum {recorded} but its text now hashes \
         to {current}: applied migrations must never change; add a new migration instead"
    )]
    ChecksumMismatch {
        version: i32,
        name: String,
        recorded: String,
        current: String,
    },
    #[error("migration {version} ({name}) failed: {source}")]
    Failed {
        version: i32,
        name: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MigrationReport {
    /// Versions applied by this run, in order.
    pub applied: Vec<i32>,
    /// Versions that were already applied.
    pub already_applied: Vec<i32>,
    /// Versions recorded in the database that this binary does not know (a newer release ran).
    pub unknown: Vec<i32>,
}

/// Applies every pending migration of [`MIGRATIONS`].
pub async fn migrate(client: &mut Client) -> Result<MigrationReport, MigrateError> {
    migrate_with(client, MIGRATIONS).await
}

/// Applies `migrations` (in the order given) that are not yet recorded, after checking that the
/// recorded ones are unchanged. Everything happens in one transaction: either all pending
/// migrations are applied and recorded, or none is.
pub async fn migrate_with(
    client: &mut Client,
    migrations: &[Migration],
) -> Result<MigrationReport, MigrateError> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK_KEY])
        .await?;
    tx.batch_execute(&format!(
        "CREATE SCHEMA IF NOT EXISTS {META_SCHEMA};
         CREATE TABLE IF NOT EXISTS {META_SCHEMA}.schema_migrations (
             version    integer     PRIMARY KEY,
             name       text        NOT NULL,
             checksum   text        NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now()
         );"
    ))
    .await?;
    let rows = tx
        .query(
            &format!("SELECT version, name, checksum FROM {META_SCHEMA}.schema_migrations ORDER BY version"),
            &[],
        )
        .await?;
    let recorded: Vec<(i32, String, String)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();

    let mut report = MigrationReport::default();
    for (version, name, checksum) in &recorded {
        match migrations.iter().find(|m| m.version == *version) {
            Some(m) => {
                let current = m.checksum();
                if &current != checksum {
                    return Err(MigrateError::ChecksumMismatch {
                        version: *version,
                        name: name.clone(),
                        recorded: checksum.clone(),
                        current,
                    });
                }
                report.already_applied.push(*version);
            }
            None => report.unknown.push(*version),
        }
    }

    for m in migrations {
        if recorded.iter().any(|(v, _, _)| *v == m.version) {
            continue;
        }
        tx.batch_execute(m.sql)
            .await
            .map_err(|source| MigrateError::Failed {
                version: m.version,
                name: m.name,
                source,
            })?;
        tx.execute(
            &format!(
                "INSERT INTO {META_SCHEMA}.schema_migrations (version, name, checksum) VALUES ($1, $2, $3)"
            ),
            &[&m.version, &m.name, &m.checksum()],
        )
        .await?;
        report.applied.push(m.version);
    }
    tx.commit().await?;
    Ok(report)
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("invalid database URL: {0}")]
    Url(#[source] tokio_postgres::Error),
    #[error("cannot read the CA file {path}: {source}")]
    CaFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the CA file {path} holds no usable certificate")]
    NoCertificates { path: String },
    #[error("cannot set up TLS: {0}")]
    Tls(#[source] rustls::Error),
    #[error("cannot connect to PostgreSQL: {0}")]
    Connect(#[source] tokio_postgres::Error),
}

/// Connects to PostgreSQL. TLS follows the URL's `sslmode`: `disable` is plain TCP; `prefer`
/// (the default) and `require` use TLS verified against the Mozilla roots, plus the certificates
/// in `ca_file` when given. Certificates are always verified.
pub async fn connect(url: &str, ca_file: Option<&Path>) -> Result<Client, ConnectError> {
    let config: tokio_postgres::Config = url.parse().map_err(ConnectError::Url)?;
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let shown = path.display().to_string();
        let pem = std::fs::read(path).map_err(|source| ConnectError::CaFile {
            path: shown.clone(),
            source,
        })?;
        let mut added = 0;
        for cert in rustls_pemfile::certs(&mut pem.as_slice()).flatten() {
            if roots.add(cert).is_ok() {
                added += 1;
            }
        }
        if added == 0 {
            return Err(ConnectError::NoCertificates { path: shown });
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let tls_config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(ConnectError::Tls)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tls = tokio_postgres_rustls::MakeRustlsConnect::new(tls_config);
    let (client, connection) = config.connect(tls).await.map_err(ConnectError::Connect)?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::warn!(%error, "PostgreSQL connection ended");
        }
    });
    Ok(client)
}
