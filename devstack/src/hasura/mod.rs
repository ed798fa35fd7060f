//! A Hasura-compatible GraphQL endpoint over the real PostgreSQL (stand-in for Hasura v2,
//! which cannot run here). See `../shared/reference/hasura-contract.md`.
//!
//! STUB: the public API below is the agreed contract; the implementation is in progress.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Settings mirroring Hasura's own (`HASURA_GRAPHQL_*`).
#[derive(Debug, Clone)]
pub struct HasuraOptions {
    /// `HASURA_GRAPHQL_ADMIN_SECRET`; `None` serves without authentication.
    pub admin_secret: Option<String>,
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
            refetch_interval: Duration::from_secs(1),
            keepalive_interval: Duration::from_secs(5),
            connection_init_timeout: Duration::from_secs(3),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HasuraError {
    #[error("not implemented yet")]
    NotImplemented,
}

/// The stand-in: a GraphQL schema generated from the tracked tables, bound to a database.
#[derive(Debug, Clone)]
pub struct Hasura {}

impl Hasura {
    /// Connects to `database_url`, installs the NOTIFY triggers live queries listen to, reads the
    /// tracked tables (from `database::HASURA_METADATA`) and their columns from the catalogs,
    /// and builds the schema.
    pub async fn new(_database_url: &str, _options: HasuraOptions) -> Result<Self, HasuraError> {
        Err(HasuraError::NotImplemented)
    }

    /// The generated schema in SDL: what `schema.graphql` holds.
    pub fn sdl(&self) -> String {
        String::new()
    }

    /// `POST /v1/graphql` (queries, mutations), `GET /v1/graphql` (WebSocket), `GET /healthz`.
    pub fn router(&self) -> axum::Router {
        axum::Router::new()
    }

    /// Serves until `shutdown` is cancelled; then closes every WebSocket (code 1012) and returns.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: CancellationToken,
    ) -> std::io::Result<()> {
        axum::serve(listener, self.router())
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
    }
}
