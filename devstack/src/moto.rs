//! moto's server as the local EC2 and S3 API, run from the project's virtualenv.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

/// moto is up in under 0.4 s here; a cold, loaded CI machine gets generous slack.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the readiness probe asks; short, since start-up is fast.
const READY_POLL: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum MotoError {
    #[error(
        "moto_server not found at {0}: run `make setup` (it creates the virtualenv with moto[server])"
    )]
    Missing(PathBuf),
    #[error("cannot start moto_server: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("moto_server exited before it was ready ({0})")]
    Exited(std::process::ExitStatus),
    #[error("moto_server did not answer within {0:?}")]
    NotReady(Duration),
}

/// A running moto server; killed when dropped.
#[derive(Debug)]
pub struct Moto {
    port: u16,
    child: Child,
}

impl Moto {
    /// Starts `moto_server` (from `bin`) on a free loopback port and waits until it answers.
    pub async fn start(bin: &Path) -> Result<Self, MotoError> {
        if !bin.is_file() {
            return Err(MotoError::Missing(bin.to_owned()));
        }
        let port = crate::postgres::free_port().map_err(MotoError::Spawn)?;
        let mut child = Command::new(bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(MotoError::Spawn)?;
        let client = reqwest::Client::new();
        let probe = format!("http://127.0.0.1:{port}/moto-api/data.json");
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(MotoError::Exited(status));
            }
            if let Ok(response) = client.get(&probe).send().await
                && response.status().is_success()
            {
                return Ok(Self { port, child });
            }
            if started.elapsed() > READY_TIMEOUT {
                return Err(MotoError::NotReady(READY_TIMEOUT));
            }
            tokio::time::sleep(READY_POLL).await;
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The value for `AWS_ENDPOINT_URL`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Stops the server and waits for it to exit.
    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}
