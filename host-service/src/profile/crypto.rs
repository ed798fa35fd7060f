//! The original's encrypted-archive format (`configutils/encryption.go`), byte for byte:
//!
//! ```text
//! "salt_" | salt (16 bytes) | "nonce_" | nonce (12 bytes) | AES-256-GCM ciphertext | tag (16 bytes)
//! ```
//!
//! no associated data; key = Argon2id(password = the token, salt, t = 1, m = 64 MiB, p = 8,
//! 32 bytes). The original held the whole archive in memory to seal it in one call; here GCM is
//! composed from its parts (AES-CTR with a 32-bit big-endian counter starting at J0 + 1, GHASH
//! over the ciphertext and the lengths block, the tag masked with E(J0)) so an archive is
//! encrypted as it is written and checked, then decrypted, as it is read: memory stays constant
//! whatever the profile's size. The tests check the composition against the one-shot `aes-gcm`
//! crate and against Python's `cryptography`.

use std::io::{Read, Write};

use aes::Aes256;
use aes::cipher::{BlockEncrypt as _, KeyInit as _, KeyIvInit as _, StreamCipher as _};
use ghash::GHash;
use ghash::universal_hash::UniversalHash as _;

pub const SALT_TAG: &[u8] = b"salt_";
pub const NONCE_TAG: &[u8] = b"nonce_";
pub const SALT_LEN: usize = 16;
pub const NONCE_LEN: usize = 12;
pub const TAG_LEN: usize = 16;
/// Bytes before the ciphertext.
pub const HEADER_LEN: usize = SALT_TAG.len() + SALT_LEN + NONCE_TAG.len() + NONCE_LEN;
/// The shortest valid file: a header and the tag of an empty plaintext.
pub const MIN_LEN: u64 = (HEADER_LEN + TAG_LEN) as u64;

/// Argon2id's parameters, the original's (Go's `argon2.IDKey(token, salt, 1, 64*1024, 8, 32)`).
const ARGON2_TIME: u32 = 1;
const ARGON2_MEMORY_KIB: u32 = 64 * 1024;
const ARGON2_LANES: u32 = 8;
const KEY_LEN: usize = 32;
const BLOCK: usize = 16;
/// Read and write chunk of the streaming passes.
const CHUNK: usize = 64 * 1024;

type Ctr = ctr::Ctr32BE<Aes256>;

#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("not an encrypted profile: {0}")]
    Format(&'static str),
    /// Wrong token or a corrupt file: GCM cannot tell them apart.
    #[error("the archive does not authenticate (wrong token or corrupt file)")]
    Authentication,
    #[error("key derivation: {0}")]
    Kdf(String),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// The header's random parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub salt: [u8; SALT_LEN],
    pub nonce: [u8; NONCE_LEN],
}

impl Header {
    /// A fresh salt and nonce for one archive.
    pub fn random() -> Self {
        Self {
            salt: rand::random(),
            nonce: rand::random(),
        }
    }

    pub fn to_bytes(self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        let mut at = 0;
        for part in [SALT_TAG, &self.salt, NONCE_TAG, &self.nonce] {
            out[at..at + part.len()].copy_from_slice(part);
            at += part.len();
        }
        out
    }

    pub fn parse(bytes: &[u8; HEADER_LEN]) -> Result<Self, CryptoError> {
        let (salt_tag, rest) = bytes.split_at(SALT_TAG.len());
        let (salt, rest) = rest.split_at(SALT_LEN);
        let (nonce_tag, nonce) = rest.split_at(NONCE_TAG.len());
        if salt_tag != SALT_TAG {
            return Err(CryptoError::Format("no salt_ header"));
        }
        if nonce_tag != NONCE_TAG {
            return Err(CryptoError::Format("no nonce_ header"));
        }
        let mut header = Self {
            salt: [0; SALT_LEN],
            nonce: [0; NONCE_LEN],
        };
        header.salt.copy_from_slice(salt);
        header.nonce.copy_from_slice(nonce);
        Ok(header)
    }
}

/// An AES-256 key derived from a token. Its bytes never leave this module.
pub struct Key([u8; KEY_LEN]);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

/// Argon2id of `token` with `salt`, the original's parameters. CPU-bound (64 MiB of memory
/// hashing): callers on the runtime run it on the blocking pool.
pub fn derive_key(token: &[u8], salt: &[u8; SALT_LEN]) -> Result<Key, CryptoError> {
    let params = argon2::Params::new(ARGON2_MEMORY_KIB, ARGON2_TIME, ARGON2_LANES, Some(KEY_LEN))
        .map_err(|e| CryptoError::Kdf(e.to_string()))?;
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut key = [0u8; KEY_LEN];
    argon
        .hash_password_into(token, salt, &mut key)
        .map_err(|e| CryptoError::Kdf(e.to_string()))?;
    Ok(Key(key))
}

/// GCM's pieces for one key and nonce.
struct Gcm {
    ctr: Ctr,
    ghash: GHash,
    /// E(J0), masks the tag.
    tag_mask: [u8; BLOCK],
    /// Ciphertext bytes not yet hashed (less than a block).
    pending: [u8; BLOCK],
    pending_len: usize,
    total: u64,
}

impl Gcm {
    fn new(key: &Key, nonce: &[u8; NONCE_LEN]) -> Self {
        let cipher = Aes256::new(&key.0.into());
        let mut h = [0u8; BLOCK];
        cipher.encrypt_block((&mut h).into());
        let mut j0 = [0u8; BLOCK];
        j0[..NONCE_LEN].copy_from_slice(nonce);
        j0[BLOCK - 1] = 1;
        let mut tag_mask = j0;
        cipher.encrypt_block((&mut tag_mask).into());
        let mut counter = j0;
        counter[BLOCK - 1] = 2;
        Self {
            ctr: Ctr::new(&key.0.into(), &counter.into()),
            ghash: GHash::new(&h.into()),
            tag_mask,
            pending: [0; BLOCK],
            pending_len: 0,
            total: 0,
        }
    }

    /// Feeds ciphertext to GHASH.
    fn hash(&mut self, mut ciphertext: &[u8]) {
        self.total += ciphertext.len() as u64;
        if self.pending_len > 0 {
            let take = (BLOCK - self.pending_len).min(ciphertext.len());
            self.pending[self.pending_len..self.pending_len + take]
                .copy_from_slice(&ciphertext[..take]);
            self.pending_len += take;
            ciphertext = &ciphertext[take..];
            if self.pending_len < BLOCK {
                return;
            }
            let block = self.pending;
            self.ghash.update(&[block.into()]);
            self.pending_len = 0;
        }
        let whole = ciphertext.len() / BLOCK * BLOCK;
        if whole > 0 {
            self.ghash.update_padded(&ciphertext[..whole]);
        }
        let rest = &ciphertext[whole..];
        self.pending[..rest.len()].copy_from_slice(rest);
        self.pending_len = rest.len();
    }

    fn tag(mut self) -> [u8; TAG_LEN] {
        if self.pending_len > 0 {
            let partial = self.pending;
            self.ghash.update_padded(&partial[..self.pending_len]);
        }
        let mut lengths = [0u8; BLOCK];
        // No associated data: its length (the first half) stays zero.
        lengths[8..].copy_from_slice(&(self.total * 8).to_be_bytes());
        self.ghash.update(&[lengths.into()]);
        let mut tag: [u8; TAG_LEN] = self.ghash.finalize().into();
        for (t, m) in tag.iter_mut().zip(self.tag_mask) {
            *t ^= m;
        }
        tag
    }
}

/// Encrypts everything written to it into `inner` in the archive format; [`finish`]
/// (Encryptor::finish) appends the tag. Dropping it unfinished leaves a file that will not
/// authenticate.
pub struct Encryptor<W: Write> {
    inner: W,
    gcm: Gcm,
    buffer: Vec<u8>,
}

impl<W: Write> std::fmt::Debug for Encryptor<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encryptor")
            .field("written", &self.gcm.total)
            .finish()
    }
}

impl<W: Write> Encryptor<W> {
    /// Writes the header and returns the stream.
    pub fn new(mut inner: W, key: &Key, header: Header) -> Result<Self, CryptoError> {
        inner.write_all(&header.to_bytes())?;
        Ok(Self {
            inner,
            gcm: Gcm::new(key, &header.nonce),
            buffer: Vec::with_capacity(CHUNK),
        })
    }

    /// Appends the tag; returns the inner writer.
    pub fn finish(mut self) -> Result<W, CryptoError> {
        let tag = self.gcm.tag();
        self.inner.write_all(&tag)?;
        self.inner.flush()?;
        Ok(self.inner)
    }
}

impl<W: Write> Write for Encryptor<W> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let take = data.len().min(CHUNK);
        self.buffer.clear();
        self.buffer.extend_from_slice(&data[..take]);
        self.gcm.ctr.apply_keystream(&mut self.buffer);
        self.inner.write_all(&self.buffer)?;
        let Self { gcm, buffer, .. } = self;
        gcm.hash(buffer);
        Ok(take)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Reads the header of an encrypted file of `len` bytes (positioned at its start) and checks
/// that it can hold a tag.
pub fn read_header(file: &mut impl Read, len: u64) -> Result<Header, CryptoError> {
    if len < MIN_LEN {
        return Err(CryptoError::Format("shorter than a header and a tag"));
    }
    let mut bytes = [0u8; HEADER_LEN];
    file.read_exact(&mut bytes)?;
    Header::parse(&bytes)
}

/// First pass: checks the tag of the ciphertext that follows the header in `file` (`len` bytes
/// in all, positioned just after the header). Nothing is decrypted before this passes.
pub fn authenticate(
    file: &mut impl Read,
    len: u64,
    key: &Key,
    header: &Header,
) -> Result<(), CryptoError> {
    let mut remaining = len - MIN_LEN;
    let mut gcm = Gcm::new(key, &header.nonce);
    let mut chunk = vec![0u8; CHUNK];
    while remaining > 0 {
        let take = remaining.min(CHUNK as u64) as usize;
        file.read_exact(&mut chunk[..take])?;
        gcm.hash(&chunk[..take]);
        remaining -= take as u64;
    }
    let mut tag = [0u8; TAG_LEN];
    file.read_exact(&mut tag)?;
    let expected = gcm.tag();
    // Constant time: a timing difference must not say how much of a forged tag was right.
    let difference = tag
        .iter()
        .zip(expected)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b));
    if difference == 0 {
        Ok(())
    } else {
        Err(CryptoError::Authentication)
    }
}

/// Second pass: the plaintext of an authenticated file, read from just after the header.
pub struct Decryptor<R: Read> {
    inner: R,
    ctr: Ctr,
    remaining: u64,
}

impl<R: Read> std::fmt::Debug for Decryptor<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decryptor")
            .field("remaining", &self.remaining)
            .finish()
    }
}

impl<R: Read> Decryptor<R> {
    /// `len` is the whole file's length; `inner` is positioned just after the header.
    pub fn new(inner: R, len: u64, key: &Key, header: &Header) -> Self {
        Self {
            inner,
            ctr: Gcm::new(key, &header.nonce).ctr,
            remaining: len.saturating_sub(MIN_LEN),
        }
    }
}

impl<R: Read> Read for Decryptor<R> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let take = (out.len() as u64).min(self.remaining) as usize;
        if take == 0 {
            return Ok(0);
        }
        let n = self.inner.read(&mut out[..take])?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        self.ctr.apply_keystream(&mut out[..n]);
        self.remaining -= n as u64;
        Ok(n)
    }
}

/// Encrypts `plaintext` whole (tests and small files).
pub fn seal(token: &[u8], header: Header, plaintext: &[u8]) -> Result<Vec<u8>, CryptoError> {
    let key = derive_key(token, &header.salt)?;
    let mut encryptor = Encryptor::new(Vec::new(), &key, header)?;
    encryptor.write_all(plaintext)?;
    encryptor.finish()
}

/// Decrypts a whole file held in memory (tests and small files).
pub fn open(token: &[u8], file: &[u8]) -> Result<Vec<u8>, CryptoError> {
    let len = file.len() as u64;
    let mut reader = file;
    let header = read_header(&mut reader, len)?;
    let key = derive_key(token, &header.salt)?;
    authenticate(&mut reader, len, &key, &header)?;
    let mut plaintext = Vec::new();
    Decryptor::new(&file[HEADER_LEN..], len, &key, &header).read_to_end(&mut plaintext)?;
    Ok(plaintext)
}

#[cfg(test)]
mod tests {
    use aes_gcm::aead::{Aead as _, KeyInit as _};
    use proptest::prelude::*;

    use super::*;

    const TOKEN: &[u8] = b"a-token-of-enough-length";

    fn one_shot(key: &Key, nonce: &[u8; NONCE_LEN], plaintext: &[u8]) -> Vec<u8> {
        let cipher = aes_gcm::Aes256Gcm::new(&key.0.into());
        cipher.encrypt(nonce.into(), plaintext).unwrap()
    }

    #[test]
    fn streaming_gcm_matches_the_one_shot_implementation() {
        let header = Header::random();
        let key = derive_key(TOKEN, &header.salt).unwrap();
        // Lengths around block and chunk edges, written in uneven pieces.
        for len in [
            0,
            1,
            15,
            16,
            17,
            4095,
            CHUNK - 1,
            CHUNK,
            CHUNK + 17,
            3 * CHUNK + 5,
        ] {
            let plaintext: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let mut encryptor = Encryptor::new(Vec::new(), &key, header).unwrap();
            for piece in plaintext.chunks(1000) {
                encryptor.write_all(piece).unwrap();
            }
            let file = encryptor.finish().unwrap();
            assert_eq!(&file[..HEADER_LEN], &header.to_bytes());
            assert_eq!(
                &file[HEADER_LEN..],
                one_shot(&key, &header.nonce, &plaintext),
                "{len} bytes"
            );
        }
    }

    #[test]
    fn a_sealed_file_opens_and_a_wrong_token_or_a_flipped_bit_does_not() {
        let file = seal(TOKEN, Header::random(), b"profile bytes").unwrap();
        assert_eq!(open(TOKEN, &file).unwrap(), b"profile bytes");
        assert!(matches!(
            open(b"another-token-of-length", &file),
            Err(CryptoError::Authentication)
        ));
        for at in [HEADER_LEN, file.len() - 1] {
            let mut corrupt = file.clone();
            corrupt[at] ^= 1;
            assert!(matches!(
                open(TOKEN, &corrupt),
                Err(CryptoError::Authentication)
            ));
        }
        let mut bad_header = file.clone();
        bad_header[0] = b'S';
        assert!(matches!(
            open(TOKEN, &bad_header),
            Err(CryptoError::Format(_))
        ));
        assert!(matches!(
            open(TOKEN, &file[..MIN_LEN as usize - 1]),
            Err(CryptoError::Format(_))
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(16))]
        #[test]
        fn any_plaintext_round_trips(plaintext in proptest::collection::vec(any::<u8>(), 0..5000)) {
            let header = Header::random();
            let key = derive_key(TOKEN, &header.salt).unwrap();
            let mut encryptor = Encryptor::new(Vec::new(), &key, header).unwrap();
            encryptor.write_all(&plaintext).unwrap();
            let file = encryptor.finish().unwrap();
            prop_assert_eq!(&file[HEADER_LEN..], one_shot(&key, &header.nonce, &plaintext));
            let len = file.len() as u64;
            let mut reader = &file[HEADER_LEN..];
            authenticate(&mut reader, len, &key, &header).unwrap();
            let mut back = Vec::new();
            Decryptor::new(&file[HEADER_LEN..], len, &key, &header).read_to_end(&mut back).unwrap();
            prop_assert_eq!(back, plaintext);
        }
    }
}
