//! EC2 instance identity documents and their signatures.
//!
//! The host sends IMDSv2's `dynamic/instance-identity/document` (the JSON text exactly as IMDS
//! served it) and `dynamic/instance-identity/signature`: per AWS's documentation ("Verify the
//! instance identity document using the base64-encoded signature"), an RSA PKCS #1 v1.5
//! SHA-256 signature over the document's bytes, verified with the region's published "RSA"
//! certificate. The region comes from the document itself and picks the key, so a document
//! signed for one region does not verify with another region's key.

use std::collections::BTreeMap;
use std::path::Path;

use aws_lc_rs::signature::{RSA_PKCS1_2048_8192_SHA256, UnparsedPublicKey};
use base64::Engine as _;
use serde::Deserialize;

/// The fields of an identity document the attestation uses.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IdentityDocument {
    pub instance_id: String,
    pub region: String,
    #[serde(default)]
    pub account_id: Option<String>,
    #[serde(default)]
    pub image_id: Option<String>,
    #[serde(default)]
    pub instance_type: Option<String>,
}

/// Why a document is refused before EC2 is asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DocumentError {
    #[error("the identity document is not the JSON IMDS serves: {0}")]
    Malformed(String),
    #[error("the signature is not base64")]
    SignatureEncoding,
    #[error("no signing certificate is configured for region {0}")]
    UnknownRegion(String),
    #[error("the identity document's signature does not verify")]
    BadSignature,
}

/// The per-region public keys identity documents are verified with.
#[derive(Clone, Default)]
pub struct RegionKeys {
    /// Region → the key's SubjectPublicKeyInfo DER.
    keys: BTreeMap<String, Vec<u8>>,
}

impl std::fmt::Debug for RegionKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegionKeys")
            .field("regions", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl RegionKeys {
    /// Adds `region`'s key from a PEM `CERTIFICATE` (as AWS publishes it) or `PUBLIC KEY`.
    pub fn add_pem(&mut self, region: &str, pem: &str) -> Result<(), String> {
        let (label, der) = pem_block(pem)?;
        let spki = match label.as_str() {
            "CERTIFICATE" => certificate_spki(&der)
                .ok_or_else(|| "the certificate is not DER X.509".to_owned())?
                .to_vec(),
            "PUBLIC KEY" => der,
            other => return Err(format!("expected a CERTIFICATE or PUBLIC KEY, not {other}")),
        };
        self.keys.insert(region.to_owned(), spki);
        Ok(())
    }

    /// Reads every `<region>.pem` in `dir`.
    pub fn from_dir(dir: &Path) -> Result<Self, String> {
        let mut keys = Self::default();
        let entries =
            std::fs::read_dir(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
        for entry in entries {
            let path = entry.map_err(|e| e.to_string())?.path();
            let (Some(region), Some("pem")) = (
                path.file_stem().and_then(|s| s.to_str()),
                path.extension().and_then(|s| s.to_str()),
            ) else {
                continue;
            };
            let pem = std::fs::read_to_string(&path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            keys.add_pem(region, &pem)
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
        if keys.keys.is_empty() {
            return Err(format!("no <region>.pem in {}", dir.display()));
        }
        Ok(keys)
    }

    /// Checks `signature` over `document` with the key of the region the document names, and
    /// returns the parsed document.
    pub fn verify(
        &self,
        document: &str,
        signature: &str,
    ) -> Result<IdentityDocument, DocumentError> {
        let parsed: IdentityDocument =
            serde_json::from_str(document).map_err(|e| DocumentError::Malformed(e.to_string()))?;
        let compact: String = signature.split_whitespace().collect();
        let signature = base64::engine::general_purpose::STANDARD
            .decode(compact)
            .map_err(|_| DocumentError::SignatureEncoding)?;
        let key = self
            .keys
            .get(&parsed.region)
            .ok_or_else(|| DocumentError::UnknownRegion(parsed.region.clone()))?;
        UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, key)
            .verify(document.as_bytes(), &signature)
            .map_err(|_| DocumentError::BadSignature)?;
        Ok(parsed)
    }
}

/// The label and DER of the first PEM block.
pub(crate) fn pem_block(pem: &str) -> Result<(String, Vec<u8>), String> {
    let mut lines = pem
        .lines()
        .map(str::trim)
        .skip_while(|l| !l.starts_with("-----BEGIN "));
    let label = lines
        .next()
        .and_then(|l| l.strip_prefix("-----BEGIN "))
        .and_then(|l| l.strip_suffix("-----"))
        .ok_or_else(|| "no PEM block".to_owned())?
        .to_owned();
    let body: String = lines.take_while(|l| !l.starts_with("-----END ")).collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(body)
        .map_err(|e| format!("the PEM body is not base64: {e}"))?;
    Ok((label, der))
}

/// One DER element, and the input after it.
struct Der<'a> {
    tag: u8,
    /// Tag, length and contents.
    whole: &'a [u8],
    contents: &'a [u8],
    rest: &'a [u8],
}

fn der_element(input: &[u8]) -> Option<Der<'_>> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 || rest.len() < count {
            return None;
        }
        let len = rest[..count]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, &rest[count..])
    };
    if rest.len() < len {
        return None;
    }
    let header = input.len() - rest.len();
    Some(Der {
        tag,
        whole: &input[..header + len],
        contents: &rest[..len],
        rest: &rest[len..],
    })
}

/// The SubjectPublicKeyInfo of a DER X.509 certificate: the seventh element of the
/// `tbsCertificate` (the sixth when the optional `[0]` version is absent, as in v1).
fn certificate_spki(der: &[u8]) -> Option<&[u8]> {
    let certificate = der_element(der)?.contents;
    let mut tbs = der_element(certificate)?.contents;
    let mut index = 0;
    loop {
        let element = der_element(tbs)?;
        tbs = element.rest;
        if index == 0 && element.tag == 0xa0 {
            // The explicit version: not counted.
            continue;
        }
        if index == 5 {
            return (element.tag == 0x30).then_some(element.whole);
        }
        index += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_blocks_and_der_lengths_parse() {
        let (label, der) =
            pem_block("junk\n-----BEGIN PUBLIC KEY-----\nAQID\n-----END PUBLIC KEY-----\n")
                .unwrap();
        assert_eq!(label, "PUBLIC KEY");
        assert_eq!(der, [1, 2, 3]);
        let long = [&[0x30, 0x81, 0x03][..], &[1, 2, 3], &[9]].concat();
        let element = der_element(&long).unwrap();
        assert_eq!(
            (
                element.tag,
                element.whole.len(),
                element.contents,
                element.rest
            ),
            (0x30, 6, &[1u8, 2, 3][..], &[9u8][..])
        );
        assert!(der_element(&[0x30, 0x05, 1]).is_none());
    }

    #[test]
    fn a_certificates_public_key_is_found() {
        let certified = rcgen::generate_simple_self_signed(vec!["aws".to_owned()]).unwrap();
        let spki = certificate_spki(certified.cert.der()).unwrap();
        use rcgen::PublicKeyData as _;
        assert_eq!(spki, certified.signing_key.subject_public_key_info());
        let mut keys = RegionKeys::default();
        keys.add_pem("us-east-1", &certified.cert.pem()).unwrap();
        assert!(
            keys.add_pem("us-east-1", "-----BEGIN FOO-----\nAQID\n-----END FOO-----")
                .is_err()
        );
    }

    #[test]
    fn a_document_without_a_key_for_its_region_is_refused() {
        let keys = RegionKeys::default();
        let document = r#"{"instanceId":"i-1","region":"us-east-1"}"#;
        assert_eq!(
            keys.verify(document, "AAAA"),
            Err(DocumentError::UnknownRegion("us-east-1".into()))
        );
        assert!(matches!(
            keys.verify("not json", "AAAA"),
            Err(DocumentError::Malformed(_))
        ));
        assert_eq!(
            keys.verify(document, "***"),
            Err(DocumentError::SignatureEncoding)
        );
    }
}
