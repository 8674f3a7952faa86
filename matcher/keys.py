"""Key-encryption keys (KEKs) per data owner, and the provider interface a KMS or HSM implements.

Invariants (DESIGN.md §4; NIST SP 800-57 key hierarchy):

* Each data owner (``pnp``, ``reniec``) has its own KEKs; a KEK only ever wraps that owner's
  data keys, and the wrapping binds owner and KEK id (AES-256-GCM associated data), so a
  wrapped key cannot be moved to another owner or relabelled.
* A KEK never leaves its provider: callers see key ids and wrapped blobs, nothing else.
* The embedded :class:`FileKeyProvider` keeps each KEK in its own file, created on first use
  with mode 0600 inside a directory of mode 0700 owned by the service user. A key file or
  directory that group or others can read or write is refused
  (:class:`~centinela.errors.InsecureKeyFile`), never repaired silently.
* Rotation adds a newer KEK that becomes current; older ones stay usable for unwrapping until
  retired. :meth:`KeyProvider.destroy_owner` destroys every KEK of the owner: every data key
  wrapped under them, and so every template, DNI and plate encrypted under those data keys,
  becomes unrecoverable, backups of the database included (crypto-shredding).
"""

from __future__ import annotations

import dataclasses
import os
import re
import secrets
import stat
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from centinela.errors import DecryptionError, InsecureKeyFile, KeyManagementError, KeyNotFound

OWNERS = ("pnp", "reniec")
_OWNER_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_FILE_RE = re.compile(
    r"^(?P<owner>[a-z][a-z0-9_]{0,31})\.v(?P<version>\d{6})\.(?P<rand>[0-9a-f]{8})\.kek$"
)
_NONCE = 12


@dataclasses.dataclass(frozen=True)
class WrappedKey:
    """A data key encrypted under one of its owner's KEKs."""

    kek_id: str
    blob: bytes


@runtime_checkable
class KeyProvider(Protocol):
    """Where owners' KEKs live. A KMS or HSM adapter implements these five calls."""

    def current_kek_id(self, owner: str) -> str:
        """Id of the KEK that wraps new data keys of ``owner`` (created if none exists)."""
        ...

    def wrap(self, owner: str, data_key: bytes) -> WrappedKey:
        """Encrypt ``data_key`` under the owner's current KEK."""
        ...

    def unwrap(self, owner: str, wrapped: WrappedKey) -> bytes:
        """Recover a data key.

        Raises:
            KeyNotFound: the KEK is unknown, retired or destroyed.
            DecryptionError: the blob does not authenticate for this owner and KEK.
        """
        ...

    def rotate_kek(self, owner: str) -> str:
        """Create a new KEK for ``owner``, make it current, return its id."""
        ...

    def retire_kek(self, owner: str, kek_id: str) -> None:
        """Destroy one non-current KEK once nothing is wrapped under it any more."""
        ...

    def destroy_owner(self, owner: str) -> None:
        """Destroy every KEK of ``owner``: its data keys become unrecoverable."""
        ...


def check_owner(owner: str) -> str:
    """Validate an owner name (lower-case identifier).

    Raises:
        KeyManagementError: the name is not a plain identifier.
    """
    if not _OWNER_RE.match(owner):
        raise KeyManagementError("owner must be a lower-case identifier")
    return owner


def _aad(owner: str, kek_id: str) -> bytes:
    return f"centinela/matcher/kek/v1\x00{owner}\x00{kek_id}".encode()


def _check_private(path: Path, *, directory: bool) -> None:
    try:
        st = path.stat()
    except FileNotFoundError as exc:
        raise KeyNotFound(f"key path {path.name} does not exist") from exc
    if stat.S_IMODE(st.st_mode) & 0o077:
        kind = "directory" if directory else "file"
        raise InsecureKeyFile(
            f"key {kind} {path} is accessible by group or others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); run chmod {'700' if directory else '600'} "
            "on it after checking nobody else read it, or rotate the keys"
        )
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise InsecureKeyFile(f"key path {path} is owned by another user")


class FileKeyProvider:
    """Embedded key provider: one file per KEK under ``keys_dir`` (mode 0600, dir 0700).

    The first run creates the directory and a KEK for each of ``owners``. File names are
    ``<owner>.v<version>.<random>.kek``; the KEK id is the name without the suffix. The
    highest version is current. Thread-safe.
    """

    def __init__(self, keys_dir: Path, *, owners: Sequence[str] = OWNERS) -> None:
        self.keys_dir = Path(keys_dir)
        self._lock = threading.Lock()
        if not self.keys_dir.exists():
            self.keys_dir.mkdir(parents=True, mode=0o700)
            os.chmod(self.keys_dir, 0o700)  # the umask may have removed bits, never added
        _check_private(self.keys_dir, directory=True)
        for path in self.keys_dir.glob("*.kek"):
            _check_private(path, directory=False)
        for owner in owners:  # first run: every owner gets its KEK at once
            self.current_kek_id(owner)

    # ---- files ------------------------------------------------------------------------

    def _versions(self, owner: str) -> list[tuple[int, str]]:
        found: list[tuple[int, str]] = []
        for path in self.keys_dir.iterdir():
            m = _FILE_RE.match(path.name)
            if m and m.group("owner") == owner:
                found.append((int(m.group("version")), path.name[: -len(".kek")]))
        return sorted(found)

    def _path(self, kek_id: str) -> Path:
        return self.keys_dir / f"{kek_id}.kek"

    def _load(self, owner: str, kek_id: str) -> bytes:
        m = _FILE_RE.match(f"{kek_id}.kek")
        if not m or m.group("owner") != owner:
            raise KeyNotFound("KEK id does not belong to this owner")
        path = self._path(kek_id)
        _check_private(self.keys_dir, directory=True)
        _check_private(path, directory=False)
        raw = bytes.fromhex(path.read_text().strip())
        if len(raw) != 32:
            raise KeyManagementError(f"key file {path.name} is malformed")
        return raw

    def _create(self, owner: str, version: int) -> str:
        kek_id = f"{owner}.v{version:06d}.{secrets.token_hex(4)}"
        path = self._path(kek_id)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, (secrets.token_bytes(32).hex() + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(path, 0o600)
        _fsync_dir(self.keys_dir)
        return kek_id

    # ---- KeyProvider --------------------------------------------------------------------

    def current_kek_id(self, owner: str) -> str:
        """Id of the owner's newest KEK; the first call for an owner creates it."""
        check_owner(owner)
        with self._lock:
            versions = self._versions(owner)
            if versions:
                return versions[-1][1]
            return self._create(owner, 1)

    def wrap(self, owner: str, data_key: bytes) -> WrappedKey:
        """Encrypt a data key under the owner's current KEK (AES-256-GCM, owner-bound)."""
        kek_id = self.current_kek_id(owner)
        kek = self._load(owner, kek_id)
        nonce = secrets.token_bytes(_NONCE)
        blob = nonce + AESGCM(kek).encrypt(nonce, data_key, _aad(owner, kek_id))
        return WrappedKey(kek_id=kek_id, blob=blob)

    def unwrap(self, owner: str, wrapped: WrappedKey) -> bytes:
        """Recover a data key wrapped by :meth:`wrap`.

        Raises:
            KeyNotFound: the KEK file is gone (retired or destroyed).
            DecryptionError: the blob does not authenticate for this owner and KEK id.
        """
        check_owner(owner)
        kek = self._load(owner, wrapped.kek_id)
        nonce, body = wrapped.blob[:_NONCE], wrapped.blob[_NONCE:]
        try:
            return AESGCM(kek).decrypt(nonce, body, _aad(owner, wrapped.kek_id))
        except InvalidTag:
            raise DecryptionError("wrapped data key failed authentication") from None

    def rotate_kek(self, owner: str) -> str:
        """Create the owner's next KEK version and make it current."""
        check_owner(owner)
        with self._lock:
            versions = self._versions(owner)
            return self._create(owner, (versions[-1][0] + 1) if versions else 1)

    def retire_kek(self, owner: str, kek_id: str) -> None:
        """Destroy one KEK that is no longer current.

        Raises:
            KeyManagementError: ``kek_id`` is the current KEK.
            KeyNotFound: no such KEK.
        """
        check_owner(owner)
        with self._lock:
            versions = self._versions(owner)
            if versions and versions[-1][1] == kek_id:
                raise KeyManagementError("the current KEK cannot be retired; rotate first")
            if kek_id not in {v[1] for v in versions}:
                raise KeyNotFound("no such KEK for this owner")
            _shred_file(self._path(kek_id))
            _fsync_dir(self.keys_dir)

    def destroy_owner(self, owner: str) -> None:
        """Destroy every KEK of ``owner`` (crypto-shredding); a later use starts afresh."""
        check_owner(owner)
        with self._lock:
            for _version, kek_id in self._versions(owner):
                _shred_file(self._path(kek_id))
            _fsync_dir(self.keys_dir)


def _shred_file(path: Path) -> None:
    # Overwrite before unlinking: best effort only (journaling, copy-on-write and SSD
    # wear-levelling may keep old blocks); the guarantee is that the file is gone.
    try:
        size = path.stat().st_size
        with path.open("r+b") as fh:
            fh.write(b"\0" * size)
            fh.flush()
            os.fsync(fh.fileno())
        path.unlink()
    except FileNotFoundError:
        return


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
