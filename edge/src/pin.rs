//! Reaching a host by the certificate it published: hosts generate a self-signed certificate at
//! start and write its SHA-256 to their row (`whist.instances.tls_fingerprint`), so a client
//! that read the row (the scaling service's forwarder, whist-client through its assignment)
//! trusts exactly that certificate, whatever its names, issuer or dates, instead of turning TLS
//! verification off.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use sha2::{Digest as _, Sha256};

/// A fingerprint that is not 64 hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{fingerprint:?}: 64 hex digits (SHA-256) expected")]
pub struct InvalidFingerprint {
    pub fingerprint: String,
}

/// Why a pinned client configuration could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PinError {
    #[error(transparent)]
    Fingerprint(#[from] InvalidFingerprint),
    #[error("TLS configuration: {0}")]
    Tls(String),
}

/// SHA-256 of a certificate's DER as 64 lowercase hex digits: the hosts' published form.
pub fn fingerprint_of(der: &[u8]) -> String {
    Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A fingerprint as 64 lowercase hex digits; openssl's form (`AB:CD:…`, upper case with
/// colons) is accepted too, since that is what an operator copies from `openssl x509`.
pub fn normalize_fingerprint(fingerprint: &str) -> Result<String, InvalidFingerprint> {
    let digits: String = fingerprint
        .trim()
        .chars()
        .filter(|c| *c != ':')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    if digits.len() == 64 && digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(digits)
    } else {
        Err(InvalidFingerprint {
            fingerprint: fingerprint.to_owned(),
        })
    }
}

/// rustls with aws-lc-rs, the only provider compiled in (as the hosts' endpoint).
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The certificate the server presented is not the pinned one.
#[derive(thiserror::Error)]
#[error("certificate fingerprint {presented} is not the pinned {pinned}")]
struct PinMismatch {
    presented: String,
    pinned: String,
}

/// rustls shows a certificate error's cause with `Debug`: make that the sentence.
impl fmt::Debug for PinMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Accepts exactly the server certificate whose SHA-256 is the pin, whatever its names, issuer
/// or dates. The handshake signatures are still verified with the provider's algorithms, so the
/// server must hold the certificate's key. Remembers what it saw, so a failed request can say
/// whether the host was reached and what it presented.
#[derive(Debug)]
pub struct PinnedVerifier {
    pin: String,
    provider: Arc<CryptoProvider>,
    /// The fingerprint of the last certificate presented (the connection got that far).
    seen: Mutex<Option<String>>,
}

impl PinnedVerifier {
    /// `pin` in either of [`normalize_fingerprint`]'s forms.
    pub fn new(pin: &str, provider: Arc<CryptoProvider>) -> Result<Self, InvalidFingerprint> {
        Ok(Self {
            pin: normalize_fingerprint(pin)?,
            provider,
            seen: Mutex::new(None),
        })
    }

    /// The pin, as 64 lowercase hex digits.
    pub fn pin(&self) -> &str {
        &self.pin
    }

    fn lock_seen(&self) -> MutexGuard<'_, Option<String>> {
        match self.seen.lock() {
            Ok(seen) => seen,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Whether the server presented a certificate.
    pub fn reached(&self) -> bool {
        self.lock_seen().is_some()
    }

    /// The fingerprint of a presented certificate other than the pinned one.
    pub fn mismatch(&self) -> Option<String> {
        self.lock_seen().clone().filter(|seen| *seen != self.pin)
    }

    /// A client configuration that trusts only this pin: TLS 1.2 and 1.3, ALPN `http/1.1`
    /// (the hosts' endpoint speaks HTTP/1.1 only).
    pub fn client_config(self: &Arc<Self>) -> Result<rustls::ClientConfig, PinError> {
        let mut config = rustls::ClientConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| PinError::Tls(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(self.clone())
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }
}

/// [`PinnedVerifier::client_config`] for `pin` with aws-lc-rs, when the caller does not need the
/// verifier's record of what was presented.
pub fn pinned_client_config(pin: &str) -> Result<rustls::ClientConfig, PinError> {
    Arc::new(PinnedVerifier::new(pin, crypto_provider())?).client_config()
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let presented = fingerprint_of(end_entity);
        let matches = presented == self.pin;
        *self.lock_seen() = Some(presented.clone());
        if matches {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Other(rustls::OtherError(Arc::new(PinMismatch {
                    presented,
                    pinned: self.pin.clone(),
                }))),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_normalize_from_openssls_form() {
        let fp = "ab".repeat(32);
        assert_eq!(normalize_fingerprint(&fp).as_deref(), Ok(fp.as_str()));
        let openssl = vec!["AB"; 32].join(":");
        assert_eq!(normalize_fingerprint(&openssl).as_deref(), Ok(fp.as_str()));
        assert!(normalize_fingerprint("abc").is_err());
        assert!(normalize_fingerprint(&"zz".repeat(32)).is_err());
    }

    #[test]
    fn fingerprints_are_lowercase_hex_sha256() {
        // SHA-256 of the empty string.
        assert_eq!(
            fingerprint_of(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn a_verifier_remembers_what_was_presented() {
        let verifier = PinnedVerifier::new(&fingerprint_of(b"cert"), crypto_provider()).unwrap();
        assert!(!verifier.reached());
        let name = ServerName::try_from("host").unwrap();
        let ok = verifier.verify_server_cert(
            &CertificateDer::from(b"cert".to_vec()),
            &[],
            &name,
            &[],
            UnixTime::now(),
        );
        assert!(ok.is_ok());
        assert!(verifier.reached());
        assert_eq!(verifier.mismatch(), None);
        let other = verifier.verify_server_cert(
            &CertificateDer::from(b"other".to_vec()),
            &[],
            &name,
            &[],
            UnixTime::now(),
        );
        let message = format!("{:?}", other.unwrap_err());
        assert!(message.contains("is not the pinned"), "{message}");
        assert_eq!(verifier.mismatch(), Some(fingerprint_of(b"other")));
    }
}
