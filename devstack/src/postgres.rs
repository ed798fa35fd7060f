//! A throwaway PostgreSQL cluster: `initdb` into a temporary directory, `pg_ctl start` on a free
//! loopback port, `pg_ctl stop` and removal of the directory when dropped.
//!
//! PostgreSQL refuses to run as root, so when this process is root the cluster runs as the
//! `postgres` user (through `runuser`) in a directory that user owns.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// How long `pg_ctl start -w` may take before we call the start failed. A cold start is about
/// 0.1 s here; a loaded CI machine gets generous slack.
const START_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum PostgresError {
    #[error(
        "PostgreSQL binary {0} not found: install PostgreSQL (apt-get install postgresql) or put its bin directory on PATH"
    )]
    MissingBinary(&'static str),
    #[error("{step} failed: {detail}")]
    Command { step: &'static str, detail: String },
    #[error("I/O error while {step}: {source}")]
    Io {
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
}

fn io(step: &'static str) -> impl FnOnce(std::io::Error) -> PostgresError {
    move |source| PostgresError::Io { step, source }
}

/// A running throwaway cluster. Dropping it stops the server and removes its files.
#[derive(Debug)]
pub struct Postgres {
    dir: TempDir,
    data_dir: PathBuf,
    port: u16,
    run_as_postgres: bool,
    stopped: bool,
}

/// The superuser created by `initdb`; local connections are trusted.
pub const SUPERUSER: &str = "postgres";

impl Postgres {
    /// Creates and starts a cluster under a new temporary directory inside `parent` (the system
    /// temporary directory when `None`).
    pub fn start(parent: Option<&Path>) -> Result<Self, PostgresError> {
        let initdb = find_binary("initdb")?;
        let pg_ctl = find_binary("pg_ctl")?;
        let run_as_postgres = nix::unistd::geteuid().is_root();
        let dir = match parent {
            Some(p) => tempfile::Builder::new().prefix("whist-pg-").tempdir_in(p),
            None => tempfile::Builder::new().prefix("whist-pg-").tempdir(),
        }
        .map_err(io("creating the cluster directory"))?;
        if run_as_postgres {
            chown_to_postgres(dir.path())?;
        }
        let data_dir = dir.path().join("data");
        let socket_dir = dir.path().join("run");
        std::fs::create_dir(&socket_dir).map_err(io("creating the socket directory"))?;
        if run_as_postgres {
            chown_to_postgres(&socket_dir)?;
        }

        run(
            "initdb",
            command(run_as_postgres, &initdb)
                .arg("-D")
                .arg(&data_dir)
                .args(["-U", SUPERUSER, "-A", "trust", "-E", "UTF8", "--no-sync"])
                .arg("--locale=C"),
        )?;

        // The port is picked by binding port 0 and releasing it; another process could take it
        // in between, so a failed start retries with a new port.
        let mut last_error = None;
        for _ in 0..5 {
            let port = free_port().map_err(io("finding a free port"))?;
            match pg_ctl_start(run_as_postgres, &pg_ctl, dir.path(), port) {
                Ok(()) => {
                    return Ok(Self {
                        dir,
                        data_dir,
                        port,
                        run_as_postgres,
                        stopped: false,
                    });
                }
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap_or(PostgresError::Command {
            step: "pg_ctl start",
            detail: "no attempt made".into(),
        }))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server log, for diagnosing a failed test.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// A libpq URL for `database` as the superuser over loopback TCP.
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://{SUPERUSER}@127.0.0.1:{}/{database}?sslmode=disable",
            self.port
        )
    }

    /// Creates a database (optionally from a template) and returns its URL.
    pub async fn create_database(
        &self,
        name: &str,
        template: Option<&str>,
    ) -> Result<String, tokio_postgres::Error> {
        let client = connect(&self.url("postgres")).await?;
        let sql = match template {
            Some(t) => format!("CREATE DATABASE \"{name}\" TEMPLATE \"{t}\""),
            None => format!("CREATE DATABASE \"{name}\""),
        };
        client.batch_execute(&sql).await?;
        Ok(self.url(name))
    }

    /// Starts a stopped server again on the same data directory and port (an outage ends).
    /// Nothing happens when it runs.
    pub fn start_again(&mut self) -> Result<(), PostgresError> {
        if !self.stopped && self.data_dir.join("postmaster.pid").exists() {
            return Ok(());
        }
        let pg_ctl = find_binary("pg_ctl")?;
        pg_ctl_start(self.run_as_postgres, &pg_ctl, self.dir.path(), self.port)?;
        self.stopped = false;
        Ok(())
    }

    /// Stops the server now (fast shutdown: open sessions are ended).
    pub fn stop(&mut self) -> Result<(), PostgresError> {
        self.stop_with("fast")
    }

    /// Stops the server the way a crash would look to clients (immediate shutdown).
    pub fn kill(&mut self) -> Result<(), PostgresError> {
        self.stop_with("immediate")
    }

    fn stop_with(&mut self, mode: &str) -> Result<(), PostgresError> {
        // Already stopped (by us, or by someone signalling the server directly).
        if self.stopped || !self.data_dir.join("postmaster.pid").exists() {
            self.stopped = true;
            return Ok(());
        }
        let pg_ctl = find_binary("pg_ctl")?;
        run(
            "pg_ctl stop",
            command(self.run_as_postgres, &pg_ctl)
                .arg("-D")
                .arg(&self.data_dir)
                .args(["-m", mode, "-w", "stop"]),
        )?;
        self.stopped = true;
        Ok(())
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Err(error) = self.stop_with("immediate") {
            tracing::warn!(%error, "could not stop the throwaway PostgreSQL cluster");
        }
    }
}

/// `pg_ctl start` of the cluster in `dir` (`data/`, sockets in `run/`, log `postgres.log`) on
/// `port`, waiting until it accepts connections.
fn pg_ctl_start(
    run_as_postgres: bool,
    pg_ctl: &Path,
    dir: &Path,
    port: u16,
) -> Result<(), PostgresError> {
    let options = format!(
        "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off \
         -c full_page_writes=off -c timezone=UTC -c max_connections=200",
        dir.join("run").display()
    );
    run(
        "pg_ctl start",
        command(run_as_postgres, pg_ctl)
            .arg("-D")
            .arg(dir.join("data"))
            .args(["-o", &options, "-l"])
            .arg(dir.join("postgres.log"))
            .args(["-w", "-t", &START_TIMEOUT.as_secs().to_string(), "start"]),
    )
}

/// Connects without TLS (loopback only) and drives the connection on the current runtime.
pub async fn connect(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// Binds port 0 on loopback to learn a free port.
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn find_binary(name: &'static str) -> Result<PathBuf, PostgresError> {
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    let mut candidates: Vec<PathBuf> = std::env::split_paths(&path_var)
        .map(|p| p.join(name))
        .collect();
    // Debian keeps the server binaries off PATH.
    if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut versions: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        versions.sort();
        candidates.extend(versions.into_iter().rev().map(|v| v.join("bin").join(name)));
    }
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .ok_or(PostgresError::MissingBinary(name))
}

fn command(run_as_postgres: bool, binary: &Path) -> Command {
    if run_as_postgres {
        let mut c = Command::new("runuser");
        c.args(["-u", SUPERUSER, "--"]).arg(binary);
        c
    } else {
        Command::new(binary)
    }
}

fn run(step: &'static str, command: &mut Command) -> Result<(), PostgresError> {
    let started = Instant::now();
    let output = command.stdin(Stdio::null()).output().map_err(io(step))?;
    tracing::debug!(
        step,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "ran"
    );
    if output.status.success() {
        Ok(())
    } else {
        Err(PostgresError::Command {
            step,
            detail: format!(
                "{}: {}{}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim(),
                String::from_utf8_lossy(&output.stdout).trim()
            ),
        })
    }
}

fn chown_to_postgres(path: &Path) -> Result<(), PostgresError> {
    let user = nix::unistd::User::from_name(SUPERUSER)
        .ok()
        .flatten()
        .ok_or_else(|| PostgresError::Command {
            step: "looking up the postgres user",
            detail: "running as root needs a `postgres` system user (apt-get install postgresql creates it)".into(),
        })?;
    std::os::unix::fs::chown(path, Some(user.uid.as_raw()), Some(user.gid.as_raw())).map_err(
        |source| PostgresError::Io {
            step: "handing the cluster directory to the postgres user",
            source,
        },
    )
}

/// Stops a server left running by a killed devstack (best effort: the directory is removed next).
pub fn stop_leftover(data_dir: &Path) {
    let Ok(pg_ctl) = find_binary("pg_ctl") else {
        return;
    };
    let run_as_postgres = nix::unistd::geteuid().is_root();
    let result = run(
        "pg_ctl stop (leftover cluster)",
        command(run_as_postgres, &pg_ctl)
            .arg("-D")
            .arg(data_dir)
            .args(["-m", "immediate", "-w", "stop"]),
    );
    if let Err(error) = result {
        tracing::warn!(%error, data_dir = %data_dir.display(), "could not stop a leftover PostgreSQL");
    }
}
