"""The user-profile archive format made and opened by independent implementations.

Python's `cryptography` (AES-256-GCM), `argon2-cffi` (Argon2id) and `lz4` (LZ4 frames) with the
standard library's `tarfile`, laid out as the original Go service wrote it
(`configutils/encryption.go`, `compression.go`):

    b"salt_" + salt(16) + b"nonce_" + nonce(12) + AES-256-GCM(ciphertext || tag(16))

key = Argon2id(token, salt, t=1, m=64 MiB, p=8, 32 bytes), no associated data; the plaintext is
an LZ4 frame of a tar whose names are relative to the archived directory, the root as ".".

    profile_archive.py encrypt TOKEN SOURCE_DIR OUT_FILE
    profile_archive.py decrypt TOKEN IN_FILE DEST_DIR

host-service/tests/profile_format.rs runs it both ways against the Rust implementation.
"""

import io
import os
import sys
import tarfile

import lz4.frame
from argon2.low_level import Type, hash_secret_raw
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

SALT_TAG = b"salt_"
NONCE_TAG = b"nonce_"


def derive_key(token: bytes, salt: bytes) -> bytes:
    return hash_secret_raw(
        secret=token,
        salt=salt,
        time_cost=1,
        memory_cost=64 * 1024,
        parallelism=8,
        hash_len=32,
        type=Type.ID,
    )


def pack(source: str) -> bytes:
    """A tar of `source` with the original's names: "." for the root, then relative paths."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        tar.add(source, arcname=".", recursive=False)
        for directory, dirs, files in os.walk(source):
            dirs.sort()
            for name in sorted(dirs) + sorted(files):
                path = os.path.join(directory, name)
                tar.add(path, arcname=os.path.relpath(path, source), recursive=False)
    return lz4.frame.compress(buffer.getvalue())


def encrypt(token: bytes, source: str, out: str) -> None:
    salt, nonce = os.urandom(16), os.urandom(12)
    sealed = AESGCM(derive_key(token, salt)).encrypt(nonce, pack(source), None)
    with open(out, "wb") as f:
        f.write(SALT_TAG + salt + NONCE_TAG + nonce + sealed)


def decrypt(token: bytes, path: str, dest: str) -> None:
    with open(path, "rb") as f:
        data = f.read()
    if data[:5] != SALT_TAG or data[21:27] != NONCE_TAG:
        raise SystemExit("not an encrypted profile")
    salt, nonce = data[5:21], data[27:39]
    plaintext = AESGCM(derive_key(token, salt)).decrypt(nonce, data[39:], None)
    with tarfile.open(fileobj=io.BytesIO(lz4.frame.decompress(plaintext)), mode="r:") as tar:
        for member in tar.getmembers():
            if os.path.isabs(member.name) or ".." in member.name.split("/"):
                raise SystemExit(f"unsafe name {member.name!r}")
        tar.extractall(dest, filter="data")


def main() -> None:
    if len(sys.argv) != 5 or sys.argv[1] not in ("encrypt", "decrypt"):
        raise SystemExit(__doc__)
    command, token, source, target = sys.argv[1:]
    (encrypt if command == "encrypt" else decrypt)(token.encode(), source, target)


if __name__ == "__main__":
    main()
