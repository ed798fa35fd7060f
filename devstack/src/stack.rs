//! The whole local stack as one value: [`Stack::up`] starts every part on free loopback ports and
//! writes the env file; [`Stack::down`] stops them and removes the temporary state.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use axum::Json;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{delete, get, post};
use serde::Serialize;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use crate::hasura::{Hasura, HasuraOptions};
use crate::imds::{FakeImds, Identity};
use crate::jwks::FakeJwks;
use crate::moto::Moto;
use crate::postgres::Postgres;

/// The env file's name inside the state directory.
pub const ENV_FILE: &str = "env";
const PID_FILE: &str = "devstack.pid";

/// What to start.
#[derive(Debug, Clone)]
pub struct StackOptions {
    /// Where the env file, the pid file and the PostgreSQL cluster live (`.devstack`).
    pub state_dir: PathBuf,
    /// `moto_server` to run; `None` runs the stack without EC2/S3.
    pub moto_bin: Option<PathBuf>,
    /// Port for the GraphQL endpoint (0: a free one).
    pub graphql_port: u16,
    /// Port for devstack's control API (0: a free one).
    pub control_port: u16,
    /// The admin secret Hasura enforces; random when `None`.
    pub admin_secret: Option<String>,
    /// The identity of the default fake IMDS (`AWS_EC2_METADATA_SERVICE_ENDPOINT`).
    pub default_identity: Identity,
    /// Insert a PRE_CONNECTION row for the default identity with this `client_sha`, as the
    /// scaling service would at launch, so a host service started by hand can register.
    pub default_instance_row: Option<String>,
}

/// A running stack.
#[derive(Debug)]
pub struct Stack {
    state_dir: PathBuf,
    /// Shared with the blocking tasks that run `pg_ctl` ([`Stack::stop_database`]).
    postgres: Arc<std::sync::Mutex<Postgres>>,
    database_url: String,
    hasura: Hasura,
    /// The GraphQL endpoint's server while it serves; `None` while the database is stopped.
    graphql: Mutex<Option<GraphqlServer>>,
    graphql_addr: SocketAddr,
    control_addr: SocketAddr,
    admin_secret: String,
    moto: Option<Moto>,
    default_imds: FakeImds,
    extra_imds: Arc<Mutex<BTreeMap<u16, FakeImds>>>,
    jwks: Arc<FakeJwks>,
    shutdown: CancellationToken,
    tasks: tokio_util::task::TaskTracker,
    /// Held for the stack's life: the exclusive lock on the pid file.
    _lock: std::fs::File,
}

impl Stack {
    pub async fn up(options: StackOptions) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&options.state_dir)
            .with_context(|| format!("creating {}", options.state_dir.display()))?;
        let state_dir = options
            .state_dir
            .canonicalize()
            .with_context(|| format!("resolving {}", options.state_dir.display()))?;
        let lock = claim_state_dir(&state_dir)?;
        hand_back_to_sudo_user(&state_dir);
        hand_back_to_sudo_user(&state_dir.join(PID_FILE));

        let postgres = Postgres::start(Some(&state_dir)).context("starting PostgreSQL")?;
        let database_url = postgres.url("postgres");
        let mut sql = crate::postgres::connect(&database_url)
            .await
            .context("connecting to PostgreSQL")?;
        let report = database::migrate(&mut sql).await.context("migrating")?;
        tracing::info!(applied = ?report.applied, "migrations applied");
        if let Some(client_sha) = &options.default_instance_row {
            let identity = &options.default_identity;
            sql.execute(
                "INSERT INTO whist.instances (id, provider, region, image_id, client_sha, \
                 instance_type, remaining_capacity, status) \
                 VALUES ($1, 'AWS', $2, $3, $4, $5, 0, 'PRE_CONNECTION')",
                &[
                    &identity.instance_id,
                    &identity.region,
                    &identity.ami_id,
                    client_sha,
                    &identity.instance_type,
                ],
            )
            .await
            .context("inserting the default instance's row")?;
        }

        let admin_secret = options
            .admin_secret
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
        let hasura = Hasura::new(
            &database_url,
            HasuraOptions {
                admin_secret: Some(admin_secret.clone()),
                ..HasuraOptions::default()
            },
        )
        .await
        .context("starting the GraphQL endpoint")?;

        let shutdown = CancellationToken::new();
        let tasks = tokio_util::task::TaskTracker::new();
        let graphql_listener = bind(options.graphql_port).await?;
        let graphql_addr = graphql_listener.local_addr()?;
        let graphql = GraphqlServer::spawn(&hasura, graphql_listener, &shutdown, &tasks);

        let moto = match &options.moto_bin {
            Some(bin) => {
                let moto = Moto::start(bin).await.context("starting moto")?;
                crate::moto::create_profile_bucket(&moto.endpoint(), crate::moto::PROFILE_BUCKET)
                    .await
                    .context("preparing the profile bucket")?;
                Some(moto)
            }
            None => None,
        };
        let default_imds = FakeImds::spawn(options.default_identity.clone()).await?;

        let jwks = Arc::new(FakeJwks::start().await.context("starting the fake Auth0")?);
        let extra_imds = Arc::new(Mutex::new(BTreeMap::new()));
        let control_listener = bind(options.control_port).await?;
        let control_addr = control_listener.local_addr()?;
        let control = axum::Router::new()
            .route("/healthz", get(|| async { "OK" }))
            .route("/imds", post(create_imds))
            .route("/imds/{port}", delete(delete_imds))
            .route("/token", post(issue_token))
            .with_state(Control {
                imds: extra_imds.clone(),
                jwks: jwks.clone(),
            });
        tasks.spawn({
            let token = shutdown.clone();
            async move {
                if let Err(error) = axum::serve(control_listener, control)
                    .with_graceful_shutdown(token.cancelled_owned())
                    .await
                {
                    tracing::error!(%error, "control API failed");
                }
            }
        });

        let stack = Self {
            state_dir,
            postgres: Arc::new(std::sync::Mutex::new(postgres)),
            database_url,
            hasura,
            graphql: Mutex::new(Some(graphql)),
            graphql_addr,
            control_addr,
            admin_secret,
            moto,
            default_imds,
            extra_imds,
            jwks,
            shutdown,
            tasks,
            _lock: lock,
        };
        stack.write_env_file()?;
        Ok(stack)
    }

    /// The variables the services and tools need, in the order they are written.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        let mut env = vec![
            ("DATABASE_URL", self.database_url.clone()),
            (
                "HASURA_GRAPHQL_URL",
                format!("http://{}/v1/graphql", self.graphql_addr),
            ),
            ("HASURA_ADMIN_SECRET", self.admin_secret.clone()),
            (
                "AWS_EC2_METADATA_SERVICE_ENDPOINT",
                self.default_imds.endpoint(),
            ),
            (
                "WHIST_DEVSTACK_CONTROL_URL",
                format!("http://{}", self.control_addr),
            ),
            // The fake Auth0, under the names the scaling service and the host service read.
            ("AUTH0_JWKS_URL", self.jwks.jwks_url()),
            ("AUTH0_ISSUER", self.jwks.issuer()),
            ("AUTH0_AUDIENCE", crate::jwks::AUDIENCE.to_owned()),
            ("WHIST_AUTH_ISSUER", self.jwks.issuer()),
            ("WHIST_AUTH_JWKS_URL", self.jwks.jwks_url()),
        ];
        if let Some(moto) = &self.moto {
            env.extend([
                ("AWS_ENDPOINT_URL", moto.endpoint()),
                ("AWS_ACCESS_KEY_ID", "test".to_owned()),
                ("AWS_SECRET_ACCESS_KEY", "test".to_owned()),
                ("AWS_REGION", "us-east-1".to_owned()),
                // Users' browser profiles (host service): moto's S3, a versioned bucket.
                (
                    "WHIST_PROFILE_BUCKET",
                    crate::moto::PROFILE_BUCKET.to_owned(),
                ),
                ("WHIST_PROFILE_S3_ENDPOINT", moto.endpoint()),
            ]);
        }
        env
    }

    /// The fake Auth0 (`POST /token` on the control API signs with it).
    pub fn jwks(&self) -> &FakeJwks {
        &self.jwks
    }

    /// `http://127.0.0.1:PORT`: the control API (`POST /imds`, `POST /token`).
    pub fn control_url(&self) -> String {
        format!("http://{}", self.control_addr)
    }

    pub fn database_url(&self) -> &str {
        &self.database_url
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// moto's endpoint, when the stack runs moto.
    pub fn moto_endpoint(&self) -> Option<String> {
        self.moto.as_ref().map(Moto::endpoint)
    }

    pub fn env_file(&self) -> PathBuf {
        self.state_dir.join(ENV_FILE)
    }

    /// The default IMDS identity.
    pub fn default_identity(&self) -> Identity {
        self.default_imds.identity()
    }

    /// A database outage (chaos): the GraphQL endpoint stops — its listener closes, so new
    /// connections are refused, and every open connection ends, its WebSocket subscriptions
    /// closed (1012) — and then PostgreSQL stops (fast shutdown: its sessions are ended). The
    /// ports stay this stack's: [`Stack::start_database`] serves again on them, and the services
    /// reconnect by themselves. Nothing happens when the database is stopped already.
    pub async fn stop_database(&self) -> anyhow::Result<()> {
        let mut graphql = self.graphql.lock().await;
        if let Some(server) = graphql.take() {
            server.stop().await;
        }
        let postgres = self.postgres.clone();
        tokio::task::spawn_blocking(move || lock_postgres(&postgres).stop())
            .await
            .context("stopping PostgreSQL")?
            .context("stopping PostgreSQL")?;
        tracing::info!("database stopped (GraphQL endpoint and PostgreSQL)");
        Ok(())
    }

    /// Ends [`Stack::stop_database`]'s outage: PostgreSQL starts again on its data directory and
    /// port, then the GraphQL endpoint serves again on its address (its pool and change
    /// listener reconnect). Nothing happens when the database runs.
    pub async fn start_database(&self) -> anyhow::Result<()> {
        let mut graphql = self.graphql.lock().await;
        let postgres = self.postgres.clone();
        tokio::task::spawn_blocking(move || lock_postgres(&postgres).start_again())
            .await
            .context("starting PostgreSQL")?
            .context("starting PostgreSQL")?;
        if graphql.is_none() {
            let listener = tokio::net::TcpListener::bind(self.graphql_addr)
                .await
                .with_context(|| format!("binding {} again", self.graphql_addr))?;
            *graphql = Some(GraphqlServer::spawn(
                &self.hasura,
                listener,
                &self.shutdown,
                &self.tasks,
            ));
        }
        tracing::info!("database started again (PostgreSQL and GraphQL endpoint)");
        Ok(())
    }

    fn write_env_file(&self) -> anyhow::Result<()> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut text = String::from(
            "# Written by whist-devstack; removed when it stops. Source it: . .devstack/env\n",
        );
        for (name, value) in self.env() {
            text.push_str(&format!("export {name}={}\n", shell_quote(&value)));
        }
        let path = self.env_file();
        let tmp = self.state_dir.join(".env.tmp");
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600) // it holds the admin secret
            .open(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
        hand_back_to_sudo_user(&path);
        Ok(())
    }

    /// Stops everything and removes the temporary state.
    pub async fn down(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.jwks.stop();
        self.tasks.close();
        self.tasks.wait().await;
        // The endpoint has stopped serving; its sessions (the change listener, the pool) end
        // before PostgreSQL does.
        self.hasura.close_sessions().await;
        if let Some(moto) = self.moto.take() {
            moto.stop().await;
        }
        for (_, imds) in std::mem::take(&mut *self.extra_imds.lock().await) {
            imds.stop().await;
        }
        lock_postgres(&self.postgres)
            .stop()
            .context("stopping PostgreSQL")?;
        let _ = std::fs::remove_file(self.env_file());
        let _ = std::fs::remove_file(self.state_dir.join(PID_FILE));
        Ok(())
    }
}

/// The GraphQL endpoint while it serves: its own stop signal (a child of the stack's) and task.
#[derive(Debug)]
struct GraphqlServer {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl GraphqlServer {
    fn spawn(
        hasura: &Hasura,
        listener: tokio::net::TcpListener,
        shutdown: &CancellationToken,
        tasks: &tokio_util::task::TaskTracker,
    ) -> Self {
        let stop = shutdown.child_token();
        let task = tasks.spawn({
            let hasura = hasura.clone();
            let token = stop.clone();
            async move {
                if let Err(error) = hasura.serve(listener, token).await {
                    tracing::error!(%error, "GraphQL endpoint failed");
                }
            }
        });
        Self { stop, task }
    }

    /// Closes the listener and every connection and waits until `serve` has returned (its
    /// WebSockets get at most the stand-in's shutdown deadline).
    async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

fn lock_postgres(postgres: &std::sync::Mutex<Postgres>) -> std::sync::MutexGuard<'_, Postgres> {
    match postgres.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

async fn bind(port: u16) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .with_context(|| format!("binding 127.0.0.1:{port}"))
}

#[derive(Debug, Serialize)]
struct ImdsCreated {
    endpoint: String,
    port: u16,
}

/// The control API's state.
#[derive(Debug, Clone)]
struct Control {
    imds: Arc<Mutex<BTreeMap<u16, FakeImds>>>,
    jwks: Arc<FakeJwks>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenRequest {
    user_id: String,
}

/// `POST /token {"user_id"}`: what logging in to Auth0 gives the client app, an RS256 access
/// token for that user (an hour), signed with the key the fake JWKS serves.
async fn issue_token(State(control): State<Control>, body: axum::body::Bytes) -> impl IntoResponse {
    let request: TokenRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(error) => {
            return (
                StatusCode::BAD_REQUEST,
                Json(
                    serde_json::json!({ "error": format!("expected {{\"user_id\": \"...\"}}: {error}") }),
                ),
            );
        }
    };
    let user = request.user_id.trim();
    if user.is_empty() || user.len() > 256 || user.chars().any(char::is_control) {
        return (
            StatusCode::BAD_REQUEST,
            Json(serde_json::json!({ "error": "user_id must be 1 to 256 printable characters" })),
        );
    }
    match control.jwks.token(user) {
        Ok(token) => (
            StatusCode::CREATED,
            Json(serde_json::json!({
                "access_token": token,
                "token_type": "Bearer",
                "expires_in": crate::jwks::TOKEN_LIFETIME_SECONDS,
            })),
        ),
        Err(error) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(serde_json::json!({ "error": error.to_string() })),
        ),
    }
}

async fn create_imds(
    State(Control { imds: registry, .. }): State<Control>,
    Json(identity): Json<Identity>,
) -> impl IntoResponse {
    match FakeImds::spawn(identity).await {
        Ok(imds) => {
            let created = ImdsCreated {
                endpoint: imds.endpoint(),
                port: imds.addr().port(),
            };
            registry.lock().await.insert(created.port, imds);
            (StatusCode::CREATED, Json(serde_json::json!(created)))
        }
        Err(error) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(serde_json::json!({ "error": error.to_string() })),
        ),
    }
}

async fn delete_imds(
    State(Control { imds: registry, .. }): State<Control>,
    UrlPath(port): UrlPath<u16>,
) -> impl IntoResponse {
    let removed = registry.lock().await.remove(&port);
    match removed {
        Some(imds) => {
            imds.stop().await;
            StatusCode::NO_CONTENT
        }
        None => StatusCode::NOT_FOUND,
    }
}

/// Run as root through sudo (`make run` for a user who is not root: the host services it starts
/// must be root), the files that user reads or that a later devstack of theirs reuses (the state
/// directory, its pid file, the env file) are handed back to them, so `. .devstack/env` works in
/// their other shells and `make run-stack` works without sudo afterwards.
fn hand_back_to_sudo_user(path: &Path) {
    if !nix::unistd::geteuid().is_root() {
        return;
    }
    let id = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u32>().ok());
    let (Some(uid), Some(gid)) = (id("SUDO_UID"), id("SUDO_GID")) else {
        return;
    };
    if let Err(error) = std::os::unix::fs::chown(path, Some(uid), Some(gid)) {
        tracing::warn!(path = %path.display(), %error, "cannot hand the file back to the sudo user");
    }
}

/// Makes sure no other devstack uses `state_dir` (an exclusive lock on its pid file, held for
/// the stack's life and released by the kernel if the process dies), and clears what a killed
/// one left behind.
fn claim_state_dir(state_dir: &Path) -> anyhow::Result<std::fs::File> {
    use std::io::Write as _;
    let pid_file = state_dir.join(PID_FILE);
    let mut lock = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&pid_file)
        .with_context(|| format!("opening {}", pid_file.display()))?;
    if let Err(error) = lock.try_lock() {
        let holder = std::fs::read_to_string(&pid_file).unwrap_or_default();
        anyhow::bail!(
            "another whist-devstack (pid {}) is using {}; stop it first (Ctrl-C in its terminal): {error}",
            holder.trim(),
            state_dir.display()
        );
    }
    // A devstack that was killed leaves its PostgreSQL running; stop it and remove its files.
    for entry in std::fs::read_dir(state_dir)?.flatten() {
        let name = entry.file_name();
        if name.to_string_lossy().starts_with("whist-pg-") {
            let data = entry.path().join("data");
            if data.join("postmaster.pid").exists() {
                crate::postgres::stop_leftover(&data);
            }
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    let _ = std::fs::remove_file(state_dir.join(ENV_FILE));
    lock.set_len(0)?;
    lock.write_all(std::process::id().to_string().as_bytes())?;
    Ok(lock)
}

/// Single-quotes a value for a POSIX shell.
fn shell_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::shell_quote;

    #[test]
    fn shell_quote_survives_quotes() {
        assert_eq!(shell_quote("a'b"), r"'a'\''b'");
        assert_eq!(shell_quote("http://x/y?z=1&q"), "'http://x/y?z=1&q'");
    }
}
