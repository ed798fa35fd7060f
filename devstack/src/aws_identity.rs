//! A stand-in for AWS's instance identity document signing: an RSA key playing the role of a
//! region's published "RSA" certificate key, the document IMDS serves at
//! `dynamic/instance-identity/document` (the JSON AWS documents, pretty-printed like IMDS), and
//! its `dynamic/instance-identity/signature` (base64 RSA PKCS #1 v1.5 SHA-256 over the
//! document's bytes). The attestation endpoint is configured with [`DocumentSigner::public_key_pem`]
//! for each local region, as production is with AWS's certificates. Never linked into a service.

use aws_lc_rs::encoding::{AsDer, PublicKeyX509Der};
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::{KeyPair, KeySize};
use aws_lc_rs::signature::{KeyPair as _, RSA_PKCS1_SHA256};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

use crate::imds::Identity;

/// The account id devstack's documents name.
pub const ACCOUNT_ID: &str = "123456789012";

pub struct DocumentSigner {
    pair: KeyPair,
}

impl std::fmt::Debug for DocumentSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DocumentSigner").finish_non_exhaustive()
    }
}

impl DocumentSigner {
    pub fn generate() -> anyhow::Result<Self> {
        let pair = KeyPair::generate(KeySize::Rsa2048)
            .map_err(|_| anyhow::anyhow!("cannot generate an RSA key"))?;
        Ok(Self { pair })
    }

    /// The public key as a PEM `PUBLIC KEY`, what the attestation endpoint verifies with.
    pub fn public_key_pem(&self) -> anyhow::Result<String> {
        let der: PublicKeyX509Der<'_> = self
            .pair
            .public_key()
            .as_der()
            .map_err(|_| anyhow::anyhow!("cannot encode the public key"))?;
        let body = STANDARD.encode(der.as_ref());
        let mut pem = String::from("-----BEGIN PUBLIC KEY-----\n");
        for chunk in body.as_bytes().chunks(64) {
            pem.push_str(&String::from_utf8_lossy(chunk));
            pem.push('\n');
        }
        pem.push_str("-----END PUBLIC KEY-----\n");
        Ok(pem)
    }

    /// The identity document of `identity`, as IMDS serves it.
    pub fn document(identity: &Identity) -> String {
        let zone = identity
            .availability_zone
            .clone()
            .unwrap_or_else(|| format!("{}a", identity.region));
        let document = serde_json::json!({
            "accountId": ACCOUNT_ID,
            "architecture": "x86_64",
            "availabilityZone": zone,
            "imageId": identity.ami_id,
            "instanceId": identity.instance_id,
            "instanceType": identity.instance_type,
            "pendingTime": "2026-01-01T00:00:00Z",
            "privateIp": identity.local_ipv4.to_string(),
            "region": identity.region,
            "version": "2017-09-30",
        });
        serde_json::to_string_pretty(&document).unwrap_or_default()
    }

    /// The base64 signature of `document`'s bytes.
    pub fn sign(&self, document: &str) -> anyhow::Result<String> {
        let mut signature = vec![0; self.pair.public_modulus_len()];
        self.pair
            .sign(
                &RSA_PKCS1_SHA256,
                &SystemRandom::new(),
                document.as_bytes(),
                &mut signature,
            )
            .map_err(|_| anyhow::anyhow!("cannot sign"))?;
        Ok(STANDARD.encode(signature))
    }
}
