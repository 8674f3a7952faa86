"""Key files for the audit log: the Ed25519 checkpoint signing key and the HMAC audit key.

Invariants:

* A key file is created with mode 0600 (exclusive create, so an existing file is never
  overwritten) inside a directory created with mode 0700.
* A key file that group or others may read or write is refused (``InsecureKeyFile``), and so
  is one that is not a regular file (a symlink to somewhere else, a FIFO).
* The server normally receives keys from its key provider; these helpers are for a data
  directory on a single host and for the offline tools.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)

from centinela.errors import InsecureKeyFile, KeyManagementError

HMAC_KEY_BYTES = 32


def _check_mode(path: Path) -> None:
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        raise InsecureKeyFile(f"key file {path} is not a regular file")
    if st.st_mode & 0o077:
        raise InsecureKeyFile(
            f"key file {path} is accessible by group or others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}"
        )


def _create(path: Path, data: bytes) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _read(path: Path) -> bytes:
    _check_mode(path)
    return path.read_bytes()


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """Load an Ed25519 private key (PEM PKCS8) after checking the file's mode.

    Raises:
        InsecureKeyFile: the file is readable by group or others.
        KeyManagementError: the file does not hold an Ed25519 key.
    """
    data = _read(Path(path))
    try:
        key = load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise KeyManagementError(f"{path} does not hold a PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyManagementError(f"{path} does not hold an Ed25519 key")
    return key


def load_or_create_signing_key(path: Path) -> Ed25519PrivateKey:
    """Load the Ed25519 signing key at ``path``, creating it (mode 0600) if absent.

    Raises:
        InsecureKeyFile: the existing file is readable by group or others.
        KeyManagementError: the file does not hold an Ed25519 key.
    """
    path = Path(path)
    if not path.exists():
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
        try:
            _create(path, pem)
        except FileExistsError:
            pass  # another process won the race; load theirs
        else:
            return key
    return load_signing_key(path)


def load_hmac_key(path: Path) -> bytes:
    """Load the HMAC audit key (32 raw bytes) after checking the file's mode.

    Raises:
        InsecureKeyFile: the file is readable by group or others.
        KeyManagementError: the file is not 32 bytes.
    """
    data = _read(Path(path))
    if len(data) != HMAC_KEY_BYTES:
        raise KeyManagementError(f"{path} must hold exactly {HMAC_KEY_BYTES} bytes")
    return data


def load_or_create_hmac_key(path: Path) -> bytes:
    """Load the HMAC audit key at ``path``, creating 32 random bytes (mode 0600) if absent.

    Raises:
        InsecureKeyFile: the existing file is readable by group or others.
        KeyManagementError: the file is not 32 bytes.
    """
    path = Path(path)
    if not path.exists():
        key = secrets.token_bytes(HMAC_KEY_BYTES)
        try:
            _create(path, key)
        except FileExistsError:
            pass
        else:
            return key
    return load_hmac_key(path)
