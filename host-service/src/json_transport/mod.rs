//! The client-facing HTTPS endpoint, `PUT /json_transport` (reference `host-service.md` §2 and
//! §12; contract in `docs/json-transport.md`, `docs/openapi.yaml`).
//!
//! The client app (through the scaling service, which forwards it) hands its new mandelbox its
//! settings and gets back the mandelbox's host ports and private key. The layers, outside in:
//!
//! - [`tls`]: a certificate made at start, its SHA-256 fingerprint published (log, `/healthz`,
//!   the instance row's `tls_fingerprint`) so clients can pin it;
//! - [`server`]: accept loop with bounded connections and a timeout on every phase;
//! - [`endpoint`]: the router, authentication ([`auth`], RS256 against the issuer's JWKS),
//!   the body parsed into a typed request ([`request`]), the mandelbox checked to be this
//!   host's and the caller's, then [`crate::host::Host::json_transport`] (the pairing with the
//!   spin-up), its result turned into a JSON answer.
//!
//! Bound at start ([`Listening::bind`]: a taken port is fatal before anything else happens),
//! served once the host exists ([`Listening::start`]) until the host's background token.

pub mod auth;
pub mod endpoint;
pub mod request;
pub mod server;
pub mod tls;

use edge::backoff::Backoff;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use dbclient::DbClient;
use dbclient::types::InstanceId;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use auth::{AuthConfig, AuthError, Verifier};
pub use endpoint::{Endpoint, Refusal, router};
pub use request::{JsonTransportRequest, MAX_BODY_BYTES, MAX_JSON_DATA_BYTES, RequestError, parse};
pub use tls::Fingerprint;

use crate::config::Config;
use crate::docker::ContainerRuntime;
use crate::host::Host;
use crate::metadata::InstanceIdentity;

/// Publishing the fingerprint on the instance row is retried through database outages: 250 ms
/// doubling to 10 s, until it works or the service stops (without it the scaling service
/// cannot pin the certificate, so giving up is never right).
const PUBLISH_RETRY: Backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(10));

#[derive(Debug, thiserror::Error)]
pub enum JsonTransportError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("authentication: {0}")]
    Auth(#[from] auth::FetchError),
}

/// The endpoint, bound but not serving yet.
#[derive(Debug)]
pub struct Listening {
    listener: TcpListener,
    identity: tls::Identity,
    tls: Arc<rustls::ServerConfig>,
    verifier: Option<Arc<Verifier>>,
    local_addr: SocketAddr,
    max_connections_per_address: usize,
}

impl Listening {
    /// Generates the certificate (written to the root directory), builds the verifier and binds
    /// `config.json_transport_addr`.
    pub async fn bind(
        config: &Config,
        identity: &InstanceIdentity,
    ) -> Result<Self, JsonTransportError> {
        let addresses: Vec<IpAddr> = [identity.public_ipv4, identity.private_ipv4]
            .into_iter()
            .flatten()
            .map(IpAddr::V4)
            .collect();
        let tls_identity = tls::generate(&addresses)?;
        tls_identity.write_files(&config.root_dir)?;
        let tls = tls_identity.server_config()?;
        let verifier = config
            .auth
            .clone()
            .map(Verifier::new)
            .transpose()?
            .map(Arc::new);
        let addr = config.json_transport_addr;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| JsonTransportError::Bind { addr, source })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| JsonTransportError::Bind { addr, source })?;
        tracing::info!(
            addr = %local_addr,
            tls.fingerprint = %tls_identity.fingerprint,
            tls.names = ?tls_identity.names,
            auth.issuer = config.auth.as_ref().map_or("none (local development)", |a| a.issuer.as_str()),
            "json_transport listening (HTTPS)"
        );
        Ok(Self {
            listener,
            identity: tls_identity,
            tls,
            verifier,
            local_addr,
            max_connections_per_address: config.json_transport_max_connections_per_address,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn fingerprint(&self) -> &Fingerprint {
        &self.identity.fingerprint
    }

    /// Serves requests for `host` until `shutdown`, keeps the JWKS fresh and publishes the
    /// fingerprint on the instance row; every task is the host's, joined at its shutdown.
    pub fn start<R: ContainerRuntime + Clone + 'static>(
        self,
        host: &Arc<Host<R>>,
        shutdown: CancellationToken,
    ) {
        let fingerprint = self.identity.fingerprint.clone();
        if let Some(verifier) = &self.verifier {
            host.spawn_tracked(verifier.clone().keep_fresh(shutdown.clone()));
        }
        if let Some(db) = host.db.clone() {
            host.spawn_tracked(publish_fingerprint(
                db,
                host.instance_id().clone(),
                fingerprint.clone(),
                shutdown.clone(),
            ));
        }
        let endpoint = Arc::new(Endpoint::new(host.clone(), self.verifier, fingerprint));
        host.spawn_tracked(server::serve(
            self.listener,
            self.tls,
            router(endpoint),
            self.max_connections_per_address,
            shutdown,
        ));
    }
}

/// Sets the instance row's `tls_fingerprint`, retrying until it works or `shutdown`.
async fn publish_fingerprint(
    db: DbClient,
    instance_id: InstanceId,
    fingerprint: Fingerprint,
    shutdown: CancellationToken,
) {
    let mut retries = PUBLISH_RETRY.start();
    loop {
        // PUBLISH_RETRY has no deadline: a delay is always handed out.
        let delay = retries.next_delay().unwrap_or(PUBLISH_RETRY.cap);
        match db
            .set_instance_tls_fingerprint(&instance_id, fingerprint.as_str())
            .await
        {
            Ok(true) => {
                tracing::info!(tls.fingerprint = %fingerprint, "certificate fingerprint published");
                return;
            }
            Ok(false) => {
                tracing::warn!("no instance row to publish the certificate fingerprint on");
                return;
            }
            Err(error) => {
                tracing::warn!(%error, retry_in_ms = delay.as_millis() as u64, "cannot publish the certificate fingerprint");
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}
