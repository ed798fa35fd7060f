//! The rustls configuration both transports use: aws-lc-rs as the crypto provider (named
//! explicitly, so nothing depends on a process-wide default being installed) and the Mozilla
//! roots from `webpki-roots`, so certificate verification behaves the same on every host image.

use std::sync::Arc;

use crate::config::ConfigError;

/// ALPN for the HTTP client: HTTP/2 when the server offers it, HTTP/1.1 otherwise.
const HTTP_ALPN: &[&[u8]] = &[b"h2", b"http/1.1"];
/// ALPN for WebSockets: the upgrade is an HTTP/1.1 request.
const WEBSOCKET_ALPN: &[&[u8]] = &[b"http/1.1"];

fn client_config(alpn: &[&[u8]]) -> Result<rustls::ClientConfig, ConfigError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| ConfigError::Tls(error.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|protocol| protocol.to_vec()).collect();
    Ok(config)
}

/// For reqwest.
pub(crate) fn http_client_config() -> Result<rustls::ClientConfig, ConfigError> {
    client_config(HTTP_ALPN)
}

/// For tokio-tungstenite.
pub(crate) fn websocket_client_config() -> Result<Arc<rustls::ClientConfig>, ConfigError> {
    client_config(WEBSOCKET_ALPN).map(Arc::new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_configs_build_without_a_process_default_provider() {
        let http = http_client_config().unwrap();
        assert_eq!(
            http.alpn_protocols,
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        );
        let ws = websocket_client_config().unwrap();
        assert_eq!(ws.alpn_protocols, vec![b"http/1.1".to_vec()]);
    }
}
