//! A Hasura-compatible GraphQL endpoint over the real PostgreSQL (stand-in for Hasura v2,
//! which cannot run here). `shared/reference/hasura-contract.md` is the specification.
//!
//! - The schema is generated like Hasura's from the tables `database::HASURA_METADATA` tracks
//!   and the columns, keys and foreign keys the catalogs report at start ([`Hasura::sdl`];
//!   `schema.graphql` at the repository root is its output).
//! - `POST /v1/graphql` runs queries and mutations in SQL: rows are rendered by PostgreSQL as
//!   JSON, each request's mutation fields run in order in one transaction, and errors come
//!   back in Hasura's envelope with HTTP 200.
//! - `GET /v1/graphql` upgrades to a WebSocket speaking `graphql-transport-ws` or the legacy
//!   `graphql-ws`; subscriptions are live queries re-run on NOTIFY from statement triggers
//!   (installed by [`Hasura::new`] from `devstack/sql/notify.sql`) and every refetch interval.
//! - `GET /healthz` answers `OK`.
//!
//! - Tracked functions that return a tracked table's rows, as queries or mutations (see
//!   `function.rs`).
//!
//! - Roles: admin (the admin secret) and the roles the metadata's permissions name, each with
//!   its own schema and row conditions (`permissions.rs`); JWT mode decides a request's role
//!   (`auth.rs`).
//!
//! Left out, as our services do not use them: aggregates, `distinct_on`, streaming
//! subscriptions, nested inserts, column presets, remote schemas and actions.

mod auth;
mod catalog;
mod error;
mod exec;
mod function;
mod http;
mod live;
mod permissions;
mod resolve;
mod schema;
mod sql;
mod ws;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::routing::get;
use tokio::sync::broadcast;
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;

pub(crate) use self::auth::ADMIN_ROLE;
pub use self::auth::{DEFAULT_CLAIMS_NAMESPACE, JwtSecret};

/// The NOTIFY triggers live queries listen to; devstack only.
const NOTIFY_SQL: &str = include_str!("../../sql/notify.sql");

/// Serializes concurrent installs of [`NOTIFY_SQL`] (two stand-ins starting on one database).
const NOTIFY_INSTALL_LOCK_KEY: i64 = 0x7768_6973_745f_6e74; // "whist_nt"

/// Connections the stand-in opens at most: a devstack runs a handful of services, each with a
/// few live queries; PostgreSQL's test clusters allow 200 connections.
const POOL_SIZE: usize = 16;
/// How long a request waits for a pooled connection before failing.
const POOL_WAIT_TIMEOUT: Duration = Duration::from_secs(10);
/// Floor for the keep-alive and refetch periods: tokio's intervals refuse a zero period.
const MIN_TIMER_PERIOD: Duration = Duration::from_millis(10);
/// The largest request body accepted on `POST /v1/graphql`.
const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;
/// After `serve`'s shutdown, how long open WebSockets and requests get to finish (each socket
/// waits at most its close-reply timeout) before `serve` returns anyway.
const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(2);

/// Settings mirroring Hasura's own (`HASURA_GRAPHQL_*`).
#[derive(Debug, Clone)]
pub struct HasuraOptions {
    /// `HASURA_GRAPHQL_ADMIN_SECRET`; `None` serves without authentication.
    pub admin_secret: Option<String>,
    /// `HASURA_GRAPHQL_JWT_SECRET`: requests without the admin secret are verified as JWTs
    /// and run as the token's role (needs `admin_secret`, as in Hasura).
    pub jwt_secret: Option<JwtSecret>,
    /// `HASURA_GRAPHQL_LIVE_QUERIES_MULTIPLEXED_REFETCH_INTERVAL` (default 1 s). Live queries are
    /// also re-run at once when a row trigger's NOTIFY says a tracked table changed.
    pub refetch_interval: Duration,
    /// `HASURA_GRAPHQL_WEBSOCKET_KEEPALIVE` (default 5 s).
    pub keepalive_interval: Duration,
    /// `HASURA_GRAPHQL_WEBSOCKET_CONNECTION_INIT_TIMEOUT` (default 3 s).
    pub connection_init_timeout: Duration,
}

impl Default for HasuraOptions {
    fn default() -> Self {
        Self {
            admin_secret: None,
            jwt_secret: None,
            refetch_interval: Duration::from_secs(1),
            keepalive_interval: Duration::from_secs(5),
            connection_init_timeout: Duration::from_secs(3),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HasuraError {
    #[error("invalid database URL: {0}")]
    DatabaseUrl(#[source] tokio_postgres::Error),
    #[error("database error while {step}: {source}")]
    Database {
        step: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("invalid Hasura metadata: {0}")]
    Metadata(#[from] serde_json::Error),
    #[error("tracked table {table} does not exist in the database")]
    TableNotFound { table: String },
    #[error("relationship {relationship} on {table}: {reason}")]
    Relationship {
        table: String,
        relationship: String,
        reason: String,
    },
    #[error("tracked function {function}: {reason}")]
    Function { function: String, reason: String },
    #[error("could not build the GraphQL schema: {0}")]
    Schema(String),
    #[error("could not create the connection pool: {0}")]
    Pool(String),
    #[error("invalid JWT secret: {0}")]
    Jwt(String),
}

/// The stand-in: a GraphQL schema generated from the tracked tables, bound to a database.
/// Cloning is cheap; clones share the pool and the change listener, which stops when the last
/// clone is dropped.
#[derive(Debug, Clone)]
pub struct Hasura {
    engine: Arc<Engine>,
}

/// Everything requests share.
pub(crate) struct Engine {
    /// The admin schema.
    schema: async_graphql::dynamic::Schema,
    /// Each role's schema ([`catalog::Model::for_role`]), and the empty one of a role no
    /// permission names.
    role_schemas: std::collections::HashMap<String, async_graphql::dynamic::Schema>,
    empty_schema: async_graphql::dynamic::Schema,
    jwt: Option<auth::JwtVerifier>,
    model: Arc<catalog::Model>,
    pool: deadpool_postgres::Pool,
    options: HasuraOptions,
    /// Qualified names of tables with committed changes, from the LISTEN connection.
    changes: broadcast::Sender<Arc<str>>,
    _stop_listener: DropGuard,
    /// The LISTEN task, taken by [`Hasura::close_sessions`].
    listener: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    stop_listener: CancellationToken,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("tables", &self.model.tables.len())
            .field("refetch_interval", &self.options.refetch_interval)
            .finish_non_exhaustive()
    }
}

/// Router state: the engine and the sockets' shutdown signal and tracker.
#[derive(Debug, Clone)]
pub(crate) struct App {
    engine: Arc<Engine>,
    sockets: SocketControl,
}

#[derive(Debug, Clone)]
pub(crate) struct SocketControl {
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl Hasura {
    /// Ends the endpoint's database sessions: stops the change listener (its LISTEN session)
    /// and waits until it has, and closes the pool (its idle connections dropped), so that
    /// stopping PostgreSQL next is not reported as lost connections. For the stack's final
    /// shutdown, once the endpoint no longer serves; a database outage keeps both (they
    /// reconnect).
    pub async fn close_sessions(&self) {
        self.engine.pool.close();
        self.engine.stop_listener.cancel();
        let task = match self.engine.listener.lock() {
            Ok(mut guard) => guard.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        if let Some(task) = task {
            let _ = task.await;
        }
    }

    /// Connects to `database_url`, installs the NOTIFY triggers live queries listen to, reads the
    /// tracked tables (from `database::HASURA_METADATA`) and their columns from the catalogs,
    /// and builds the schema.
    pub async fn new(database_url: &str, options: HasuraOptions) -> Result<Self, HasuraError> {
        Self::with_metadata(database_url, database::HASURA_METADATA, options).await
    }

    /// As [`Hasura::new`], with another metadata document (Hasura's `replace_metadata` args).
    pub async fn with_metadata(
        database_url: &str,
        metadata: &str,
        options: HasuraOptions,
    ) -> Result<Self, HasuraError> {
        let mut config: tokio_postgres::Config =
            database_url.parse().map_err(HasuraError::DatabaseUrl)?;
        // Timestamps are rendered in the session's time zone; Hasura deployments show +00:00.
        let session_options = match config.get_options() {
            Some(existing) if !existing.is_empty() => format!("{existing} -c TimeZone=UTC"),
            _ => "-c TimeZone=UTC".to_owned(),
        };
        config.options(&session_options);
        if config.get_application_name().is_none() {
            config.application_name("whist-devstack-hasura");
        }

        let (mut client, connection) =
            config
                .connect(tokio_postgres::NoTls)
                .await
                .map_err(|source| HasuraError::Database {
                    step: "connecting",
                    source,
                })?;
        let setup_connection = tokio::spawn(connection);

        let model = catalog::load(&client, metadata).await?;
        install_notify_triggers(&mut client, &model).await?;
        drop(client);
        let _ = setup_connection.await;

        let model = Arc::new(model);
        let schema = schema::build(&model).map_err(|e| HasuraError::Schema(e.0))?;
        let mut role_schemas = std::collections::HashMap::new();
        for role in model.roles() {
            let role_model = Arc::new(model.for_role(&role));
            let built = schema::build(&role_model)
                .map_err(|e| HasuraError::Schema(format!("role {role}: {}", e.0)))?;
            role_schemas.insert(role, built);
        }
        let empty_schema = schema::build(&Arc::new(model.for_role("")))
            .map_err(|e| HasuraError::Schema(format!("empty role: {}", e.0)))?;
        let jwt = options
            .jwt_secret
            .clone()
            .map(auth::JwtVerifier::new)
            .transpose()
            .map_err(HasuraError::Jwt)?;

        let manager = deadpool_postgres::Manager::from_config(
            config.clone(),
            tokio_postgres::NoTls,
            deadpool_postgres::ManagerConfig {
                // A request whose future is dropped mid-way (the client went away) returns its
                // connection inside an open transaction, possibly a read-only one; rolling back
                // on recycle keeps the next request from running in it.
                recycling_method: deadpool_postgres::RecyclingMethod::Custom("ROLLBACK".into()),
            },
        );
        let pool = deadpool_postgres::Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(POOL_WAIT_TIMEOUT))
            .build()
            .map_err(|e| HasuraError::Pool(e.to_string()))?;

        let (listen_client, listen_connection) =
            live::connect_listener(&config)
                .await
                .map_err(|source| HasuraError::Database {
                    step: "listening for table changes",
                    source,
                })?;
        let (changes, _) = broadcast::channel(live::CHANGES_CAPACITY);
        let stop_listener = CancellationToken::new();
        let listener = tokio::spawn(live::run_listener(
            config,
            changes.clone(),
            stop_listener.clone(),
            listen_client,
            listen_connection,
        ));

        tracing::debug!(tables = model.tables.len(), "GraphQL schema generated");
        Ok(Self {
            engine: Arc::new(Engine {
                schema,
                role_schemas,
                empty_schema,
                jwt,
                model,
                pool,
                options,
                changes,
                _stop_listener: stop_listener.clone().drop_guard(),
                listener: std::sync::Mutex::new(Some(listener)),
                stop_listener,
            }),
        })
    }

    /// The generated schema in SDL: what `schema.graphql` holds.
    pub fn sdl(&self) -> String {
        self.engine.schema.sdl()
    }

    /// The schema `role` sees, in SDL.
    pub fn sdl_for_role(&self, role: &str) -> String {
        self.engine.schema_for(role).sdl()
    }

    /// `POST /v1/graphql` (queries, mutations), `GET /v1/graphql` (WebSocket), `GET /healthz`.
    /// WebSockets served by this router stay open until their clients close them; use
    /// [`Hasura::serve`] for a shutdown that closes them.
    pub fn router(&self) -> axum::Router {
        self.router_with(SocketControl {
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
        })
    }

    fn router_with(&self, sockets: SocketControl) -> axum::Router {
        let app = App {
            engine: self.engine.clone(),
            sockets,
        };
        axum::Router::new()
            .route("/v1/graphql", get(ws::upgrade).post(http::graphql))
            .route("/healthz", get(http::healthz))
            .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
            .with_state(app)
    }

    /// Serves until `shutdown` is cancelled; then closes every WebSocket (code 1012) and returns.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: CancellationToken,
    ) -> std::io::Result<()> {
        let tracker = TaskTracker::new();
        let router = self.router_with(SocketControl {
            shutdown: shutdown.clone(),
            tracker: tracker.clone(),
        });
        let result = axum::serve(listener, router)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
        tracker.close();
        if tokio::time::timeout(SHUTDOWN_DEADLINE, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                remaining = tracker.len(),
                "GraphQL sockets and requests still running after the shutdown deadline"
            );
        }
        result
    }
}

async fn install_notify_triggers(
    client: &mut tokio_postgres::Client,
    model: &catalog::Model,
) -> Result<(), HasuraError> {
    let install = |source| HasuraError::Database {
        step: "installing the change-notification triggers",
        source,
    };
    let transaction = client.transaction().await.map_err(install)?;
    transaction
        .execute(
            "SELECT pg_advisory_xact_lock($1)",
            &[&NOTIFY_INSTALL_LOCK_KEY],
        )
        .await
        .map_err(install)?;
    transaction
        .batch_execute(NOTIFY_SQL)
        .await
        .map_err(install)?;
    for table in &model.tables {
        transaction
            .execute(
                "SELECT devstack.track_table_changes($1::text::regclass)",
                &[&table.sql_name()],
            )
            .await
            .map_err(install)?;
    }
    transaction.commit().await.map_err(install)
}

impl Engine {
    /// The schema requests of `role` run against.
    pub(crate) fn schema_for(&self, role: &str) -> &async_graphql::dynamic::Schema {
        if role == ADMIN_ROLE {
            &self.schema
        } else {
            self.role_schemas.get(role).unwrap_or(&self.empty_schema)
        }
    }

    /// The identity of a request with these headers (looked up by lower-case name).
    pub(crate) async fn authenticate(
        &self,
        header: &(dyn Fn(&str) -> Option<String> + Sync),
        names: &[String],
    ) -> Result<auth::Identity, error::GqlError> {
        auth::authenticate(
            self.options.admin_secret.as_deref(),
            self.jwt.as_ref(),
            header,
            names,
        )
        .await
    }
}

/// Compares without an early exit, so response time does not reveal a matching prefix.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
