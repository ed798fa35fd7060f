//! The endpoint's certificate: a fresh self-signed ECDSA P-256 certificate at every start, with
//! subject alternative names for the host's public and private addresses and for `localhost`,
//! so a client that pins its fingerprint (published in the log, on `/healthz` and on the
//! instance row) can verify the host instead of turning verification off as the original's
//! clients did. The original made an RSA-4096 certificate for `IP:127.0.0.1` only, with openssl.
//!
//! The certificate and key are also written to the root directory (`cert.pem`, 0644, and
//! `key.pem`, 0600, each written to a temporary file and renamed into place), where local tools
//! find them as they found the original's.

use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::Datelike as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// The certificate file under the root directory (the original's name).
pub const CERT_FILE: &str = "cert.pem";
/// The private key file under the root directory (the original's name), mode 0600.
pub const KEY_FILE: &str = "key.pem";
/// Validity starts a day early, so a client whose clock runs behind still accepts it.
const VALIDITY_BACKDATE_DAYS: i64 = 1;
/// The original's certificates lived 365 days; a new one is made at every start, and hosts are
/// replaced far more often than that.
const VALIDITY: Duration = Duration::from_secs(366 * 24 * 3600);
/// HTTP/1.1 only (see `server`: no HTTP/2).
const ALPN: &[&[u8]] = &[b"http/1.1"];

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot generate the certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("cannot build the TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The SHA-256 of a certificate's DER encoding, as 64 lowercase hexadecimal digits: what the
/// instance row's `tls_fingerprint` holds and what a client compares with the certificate the
/// host presents (`openssl x509 -noout -fingerprint -sha256` prints the same digits, upper case
/// and colon-separated).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Fingerprint(String);

impl Fingerprint {
    pub fn of(der: &[u8]) -> Self {
        Self(edge::pin::fingerprint_of(der))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A generated certificate and its key.
pub struct Identity {
    pub cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
    cert_pem: String,
    key_pem: String,
    pub fingerprint: Fingerprint,
    /// The names the certificate is valid for.
    pub names: Vec<String>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("fingerprint", &self.fingerprint)
            .field("names", &self.names)
            .field("key", &logger::REDACTED)
            .finish()
    }
}

/// Generates a self-signed certificate for `localhost`, the loopback addresses and `addresses`
/// (the host's public and private IPs).
pub fn generate(addresses: &[IpAddr]) -> Result<Identity, TlsError> {
    let mut names = vec![
        "localhost".to_owned(),
        IpAddr::V4(Ipv4Addr::LOCALHOST).to_string(),
        IpAddr::V6(Ipv6Addr::LOCALHOST).to_string(),
    ];
    for address in addresses {
        let name = address.to_string();
        if !names.contains(&name) {
            names.push(name);
        }
    }
    let mut params = rcgen::CertificateParams::new(names.clone())?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "whist host service");
    let start = chrono::Utc::now() - chrono::Duration::days(VALIDITY_BACKDATE_DAYS);
    let (month, day) = (
        u8::try_from(start.month()).unwrap_or(1),
        u8::try_from(start.day()).unwrap_or(1),
    );
    params.not_before = rcgen::date_time_ymd(start.year(), month, day);
    params.not_after = params.not_before + VALIDITY;
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let key_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let cert = params.self_signed(&key_pair)?;
    let der = cert.der().clone();
    Ok(Identity {
        fingerprint: Fingerprint::of(&der),
        cert_pem: cert.pem(),
        key_pem: key_pair.serialize_pem(),
        key: PrivatePkcs8KeyDer::from(key_pair.serialize_der()),
        cert: der,
        names,
    })
}

impl Identity {
    /// Writes `cert.pem` (0644) and `key.pem` (0600) into `dir`, each atomically.
    pub fn write_files(&self, dir: &Path) -> Result<(), TlsError> {
        write_atomically(&dir.join(CERT_FILE), self.cert_pem.as_bytes(), 0o644)?;
        write_atomically(&dir.join(KEY_FILE), self.key_pem.as_bytes(), 0o600)
    }

    /// The server configuration: TLS 1.2 and 1.3 with aws-lc-rs's safe defaults, no client
    /// certificates, ALPN `http/1.1`.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(
                vec![self.cert.clone()],
                PrivateKeyDer::Pkcs8(self.key.clone_key()),
            )?;
        config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
    }
}

/// Writes `contents` to a temporary file created with `mode` (never readable by others, even
/// for an instant, when `mode` says so) beside `path`, then renames it into place.
fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> Result<(), TlsError> {
    let error = |source| TlsError::Write {
        path: path.to_owned(),
        source,
    };
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    // A leftover from a crash may have other permissions: start afresh.
    match std::fs::remove_file(&temporary) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(error(e)),
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&temporary)
        .map_err(error)?;
    // The umask may have narrowed the mode; make it exactly what was asked.
    file.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(error)?;
    file.write_all(contents).map_err(error)?;
    file.sync_all().map_err(error)?;
    drop(file);
    std::fs::rename(&temporary, path).map_err(error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_names_the_host_addresses_and_files_are_private() {
        let public: IpAddr = "203.0.113.7".parse().unwrap();
        let private: IpAddr = "10.0.0.5".parse().unwrap();
        let identity = generate(&[public, private, IpAddr::V4(Ipv4Addr::LOCALHOST)]).unwrap();
        assert_eq!(
            identity.names,
            ["localhost", "127.0.0.1", "::1", "203.0.113.7", "10.0.0.5"]
        );
        assert_eq!(identity.fingerprint.as_str().len(), 64);
        assert_eq!(identity.fingerprint, Fingerprint::of(&identity.cert));
        assert!(!format!("{identity:?}").contains("PRIVATE"));
        identity.server_config().unwrap();

        let dir = tempfile::tempdir().unwrap();
        identity.write_files(dir.path()).unwrap();
        let mode = |name| {
            std::fs::metadata(dir.path().join(name))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode(KEY_FILE), 0o600);
        assert_eq!(mode(CERT_FILE), 0o644);
        // A second start replaces both files.
        let again = generate(&[]).unwrap();
        assert_ne!(again.fingerprint, identity.fingerprint);
        again.write_files(dir.path()).unwrap();
        assert_eq!(mode(KEY_FILE), 0o600);
        let pem = std::fs::read_to_string(dir.path().join(CERT_FILE)).unwrap();
        assert_eq!(pem, again.cert_pem);
    }

    #[test]
    fn fingerprints_are_lowercase_hex_sha256() {
        // SHA-256 of the empty string.
        assert_eq!(
            Fingerprint::of(b"").as_str(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
