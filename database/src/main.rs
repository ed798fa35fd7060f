//! `whist-migrate`: applies the `whist` schema's pending migrations to a PostgreSQL database.
//!
//! Reads `--database-url` (env `DATABASE_URL`) and optionally `--ca-file` (env `PGSSLROOTCERT`).
//! Prints what it applied. Exit codes: 0 success (including nothing to do), 1 any failure, such
//! as an unreachable database, a failed migration (nothing of the run is kept) or an applied
//! migration whose text changed, 2 bad arguments.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "whist-migrate",
    version,
    about = "Apply the whist schema's migrations"
)]
struct Args {
    /// PostgreSQL URL, e.g. postgres://user@host:5432/db?sslmode=require
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
    /// Extra CA certificates (PEM) to trust for the database's TLS certificate.
    #[arg(long, env = "PGSSLROOTCERT")]
    ca_file: Option<PathBuf>,
    /// Only list the migrations this binary carries, with their checksums.
    #[arg(long)]
    list: bool,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    if args.list {
        for m in database::MIGRATIONS {
            println!("{:04} {} {}", m.version, m.name, m.checksum());
        }
        return ExitCode::SUCCESS;
    }
    match run(&args).await {
        Ok(report) => {
            for v in &report.applied {
                println!("applied migration {v:04}");
            }
            if report.applied.is_empty() {
                println!(
                    "schema up to date ({} migrations applied before)",
                    report.already_applied.len()
                );
            }
            for v in &report.unknown {
                eprintln!(
                    "warning: the database records migration {v:04}, which this binary does not carry (a newer release ran)"
                );
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("whist-migrate: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: &Args) -> anyhow::Result<database::MigrationReport> {
    let mut client = database::connect(&args.database_url, args.ca_file.as_deref()).await?;
    Ok(database::migrate(&mut client).await?)
}
