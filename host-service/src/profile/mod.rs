//! A user's browser data following them from session to session (reference §3.10): the
//! mandelbox's `unpacked_configs` directory (`/whist/userConfigs` inside) is loaded from S3 at
//! spin-up, before `.configReady`, and saved back at teardown (and so at drain), encrypted with
//! a token only the user's client holds.
//!
//! - [`crypto`]: the original's encrypted format, byte for byte, streamed;
//! - [`archive`]: tar inside an LZ4 frame, packed and unpacked through descriptors, hostile-safe;
//! - [`store`]: the bucket (aws-sdk-s3), streamed to and from files;
//! - [`lifecycle`]: the spin-up and teardown hooks ([`Profiles`]);
//! - [`browser_data`]: the client's cookies, bookmarks and extensions for the mandelbox.
//!
//! Key layout, as the original: `<user>/<env>/<app>/<token hash>/fractal-app-config.tar.lz4.enc`,
//! the token hash being standard Base32 (padded) of the token's MD5; the legacy key without the
//! hash is read too. The token itself never reaches a log line or an error: the hash stands for
//! it.

pub mod archive;
pub mod browser_data;
pub mod crypto;
pub mod lifecycle;
pub mod store;

pub use lifecycle::{LoadOutcome, PendingLoad, ProfileConfig, Profiles, SaveOutcome};

use md5::Digest as _;

/// Tokens shorter than this are refused (the original's sanity check).
pub const MIN_TOKEN_LEN: usize = 15;

/// Standard Base32 (RFC 4648, padded) of the token's MD5: the key part naming a token.
pub fn token_hash(token: &str) -> String {
    base32(&md5::Md5::digest(token.as_bytes()))
}

fn base32(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::with_capacity(bytes.len().div_ceil(5) * 8);
    for chunk in bytes.chunks(5) {
        let mut block = [0u8; 5];
        block[..chunk.len()].copy_from_slice(chunk);
        let bits = block.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
        // Characters that carry data: ceil(8 * len / 5); the rest of the 8 are padding.
        let used = (chunk.len() * 8).div_ceil(5);
        for i in 0..8 {
            if i < used {
                let index = ((bits >> (35 - 5 * i)) & 31) as usize;
                out.push(char::from(ALPHABET[index]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The keys of one user's app in one environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    /// `<user>/<env>/<app>`.
    pub prefix: String,
    /// `<prefix>/<token hash>/<archive>`: where saves go.
    pub hashed: String,
    /// `<prefix>/<archive>`: what the earliest clients saved.
    pub legacy: String,
}

impl Keys {
    pub fn new(user: &str, env: &str, app: &str, token_hash: &str) -> Self {
        let prefix = format!("{user}/{}/{app}", env.to_lowercase());
        Self {
            hashed: format!("{prefix}/{token_hash}/{}", store::ARCHIVE_NAME),
            legacy: format!("{prefix}/{}", store::ARCHIVE_NAME),
            prefix,
        }
    }

    /// The original's sanity check on the key it settled on.
    pub fn is_acceptable(&self, key: &str) -> bool {
        key == self.hashed || key == self.legacy
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base32_matches_rfc_4648_vectors() {
        for (input, expected) in [
            ("", ""),
            ("f", "MY======"),
            ("fo", "MZXQ===="),
            ("foo", "MZXW6==="),
            ("foob", "MZXW6YQ="),
            ("fooba", "MZXW6YTB"),
            ("foobar", "MZXW6YTBOI======"),
        ] {
            assert_eq!(base32(input.as_bytes()), expected, "{input:?}");
        }
    }

    #[test]
    fn token_hash_is_base32_of_md5() {
        // md5("hello") = 5d41402abc4b2a76b9719d911017c592
        assert_eq!(token_hash("hello"), "LVAUAKV4JMVHNOLRTWIRAF6FSI======");
    }

    #[test]
    fn keys_follow_the_original_layout() {
        let keys = Keys::new("user123", "PROD", "browsers/chrome", "HASH====");
        assert_eq!(keys.prefix, "user123/prod/browsers/chrome");
        assert_eq!(
            keys.hashed,
            "user123/prod/browsers/chrome/HASH====/fractal-app-config.tar.lz4.enc"
        );
        assert_eq!(
            keys.legacy,
            "user123/prod/browsers/chrome/fractal-app-config.tar.lz4.enc"
        );
        assert!(keys.is_acceptable(&keys.legacy));
        assert!(
            !keys
                .is_acceptable("user123/prod/browsers/chrome/OTHER/fractal-app-config.tar.lz4.enc")
        );
    }
}
