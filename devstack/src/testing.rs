//! A stack for integration tests: a throwaway PostgreSQL cluster with the migrations applied and
//! the GraphQL stand-in serving it on a free loopback port. Everything stops when dropped.

pub mod hostile_tokens;

use std::net::SocketAddr;

use tokio_util::sync::CancellationToken;

use crate::hasura::{Hasura, HasuraOptions};
use crate::postgres::Postgres;

/// The admin secret test stacks use.
pub const TEST_ADMIN_SECRET: &str = "test-admin-secret";

#[derive(Debug)]
pub struct TestStack {
    pub postgres: Postgres,
    pub database_url: String,
    pub hasura: Hasura,
    pub addr: SocketAddr,
    shutdown: CancellationToken,
    server: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl TestStack {
    /// Starts PostgreSQL, applies the migrations and serves GraphQL with [`TEST_ADMIN_SECRET`].
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(HasuraOptions {
            admin_secret: Some(TEST_ADMIN_SECRET.to_owned()),
            ..HasuraOptions::default()
        })
        .await
    }

    pub async fn start_with(options: HasuraOptions) -> anyhow::Result<Self> {
        let postgres = Postgres::start(None)?;
        let database_url = postgres.url("postgres");
        let mut client = crate::postgres::connect(&database_url).await?;
        database::migrate(&mut client).await?;
        let hasura = Hasura::new(&database_url, options).await?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let mut stack = Self {
            postgres,
            database_url,
            hasura,
            addr,
            shutdown: CancellationToken::new(),
            server: None,
        };
        stack.serve(listener);
        Ok(stack)
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        self.shutdown = CancellationToken::new();
        let hasura = self.hasura.clone();
        let token = self.shutdown.clone();
        self.server = Some(tokio::spawn(hasura.serve(listener, token)));
    }

    /// `http://127.0.0.1:PORT/v1/graphql`
    pub fn graphql_url(&self) -> String {
        format!("http://{}/v1/graphql", self.addr)
    }

    /// `ws://127.0.0.1:PORT/v1/graphql`
    pub fn graphql_ws_url(&self) -> String {
        format!("ws://{}/v1/graphql", self.addr)
    }

    /// A direct connection to the database, for arranging and checking state behind GraphQL.
    pub async fn sql(&self) -> anyhow::Result<tokio_postgres::Client> {
        Ok(crate::postgres::connect(&self.database_url).await?)
    }

    /// Stops the GraphQL endpoint (its WebSockets are closed) and waits until it has stopped.
    pub async fn stop_graphql(&mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        if let Some(server) = self.server.take() {
            server.await??;
        }
        Ok(())
    }

    /// Serves GraphQL again on the same address.
    pub async fn start_graphql(&mut self) -> anyhow::Result<()> {
        let listener = tokio::net::TcpListener::bind(self.addr).await?;
        self.serve(listener);
        Ok(())
    }
}

impl Drop for TestStack {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
