//! `whist-attest`: the host attestation endpoint (`scaling_service::attest`), deployed beside
//! the scaling service. Configuration (environment):
//!
//! - `WHIST_ATTEST_ADDR` (default `0.0.0.0:7730`);
//! - `WHIST_ATTEST_SIGNING_KEY_FILE`: the RSA signing key, PKCS #8 PEM (required);
//! - `WHIST_ATTEST_PREVIOUS_KEY_FILE`: the key being retired during a rotation (optional);
//! - `WHIST_ATTEST_AWS_CERT_DIR`: `<region>.pem` per region, AWS's RSA certificate for
//!   identity documents (or a `PUBLIC KEY`) (required);
//! - `WHIST_ATTEST_TOKEN_TTL_SECS` (default 900);
//! - `APP_ENV`: the `whist-env` tag instances must carry (required);
//! - `HASURA_GRAPHQL_URL`, `HASURA_ADMIN_SECRET`: the database, as admin;
//! - EC2: the default AWS credential chain; `AWS_ENDPOINT_URL` for moto.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use dbclient::{DbClient, DbConfig};
use scaling_service::attest::document::RegionKeys;
use scaling_service::attest::token::SigningKey;
use scaling_service::attest::{AttestConfig, Attestor, DEFAULT_TOKEN_TTL, router};

fn var(name: &str) -> Result<String, String> {
    std::env::var(name).map_err(|_| format!("{name} is not set"))
}

fn key_file(name: &str) -> Result<Option<SigningKey>, String> {
    match std::env::var(name) {
        Err(_) => Ok(None),
        Ok(path) => {
            let pem = std::fs::read_to_string(&path).map_err(|e| format!("{name}={path}: {e}"))?;
            SigningKey::from_pem(&pem)
                .map(Some)
                .map_err(|e| format!("{name}={path}: {e}"))
        }
    }
}

fn config() -> Result<(AttestConfig, DbConfig, String), String> {
    let signing_key = key_file("WHIST_ATTEST_SIGNING_KEY_FILE")?
        .ok_or("WHIST_ATTEST_SIGNING_KEY_FILE is not set")?;
    let previous_keys = key_file("WHIST_ATTEST_PREVIOUS_KEY_FILE")?
        .into_iter()
        .collect();
    let region_keys =
        RegionKeys::from_dir(std::path::Path::new(&var("WHIST_ATTEST_AWS_CERT_DIR")?))?;
    let token_ttl = match std::env::var("WHIST_ATTEST_TOKEN_TTL_SECS") {
        Err(_) => DEFAULT_TOKEN_TTL,
        Ok(secs) => Duration::from_secs(
            secs.parse::<u64>()
                .ok()
                .filter(|s| (60..=86_400).contains(s))
                .ok_or("WHIST_ATTEST_TOKEN_TTL_SECS must be 60..=86400")?,
        ),
    };
    let db = DbConfig::new(
        &var("HASURA_GRAPHQL_URL")?,
        Some(logger::Secret::new(var("HASURA_ADMIN_SECRET")?)),
    )
    .map_err(|e| e.to_string())?;
    let addr = std::env::var("WHIST_ATTEST_ADDR").unwrap_or_else(|_| "0.0.0.0:7730".to_owned());
    Ok((
        AttestConfig {
            region_keys,
            signing_key,
            previous_keys,
            token_ttl,
            environment: var("APP_ENV")?,
            ec2_endpoint: std::env::var("AWS_ENDPOINT_URL").ok(),
            ec2_credentials: None,
        },
        db,
        addr,
    ))
}

fn main() -> ExitCode {
    let (attest, db, addr) = match config() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("whist-attest: {error}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("whist-attest: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result: Result<(), String> = runtime.block_on(async {
        let db = DbClient::new(&db).map_err(|e| e.to_string())?;
        let app = router(Arc::new(Attestor::new(attest, db)));
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        eprintln!("whist-attest: listening on {addr}");
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await
            .map_err(|e| e.to_string())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("whist-attest: {error}");
            ExitCode::FAILURE
        }
    }
}
