"""Data keys per owner, stored wrapped by the owner's KEK, unwrapped into memory on use.

Invariants (DESIGN.md §4):

* A data key exists in clear only in this process's memory; the database holds it wrapped by
  the owner's current KEK (:class:`~centinela.matcher.keys.KeyProvider`).
* Each owner has one current ``data`` key (encrypts templates, DNIs, plates) and one ``index``
  key (HMAC look-ups and idempotency digests). Older data keys stay as ``previous`` until
  every record under them is re-encrypted, then are retired.
* KEK rotation re-wraps every data key of the owner in one transaction, then retires the old
  KEKs; records are not touched and nothing stops serving.
* Destroying an owner deletes its wrapped keys and destroys its KEKs: crypto-shredding.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
import threading
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from centinela.errors import KeyNotFound
from centinela.matcher import envelope
from centinela.matcher.envelope import Sealer
from centinela.matcher.keys import KeyProvider, WrappedKey, check_owner
from centinela.matcher.schema import data_keys
from centinela.storage import is_sqlite, write_transaction

PURPOSES = ("data", "index")


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


class DataKeyring:
    """Owners' data keys: create, cache, rotate, destroy. Thread-safe."""

    def __init__(self, engine: Engine, keys: KeyProvider) -> None:
        self.engine = engine
        self.keys = keys
        self._lock = threading.RLock()
        self._plain: dict[str, bytes] = {}
        self._owner_of: dict[str, str] = {}
        self._current: dict[tuple[str, str], str] = {}
        self._sealers: dict[str, Sealer] = {}

    # ---- reading ------------------------------------------------------------------------

    def key(self, owner: str, key_id: str) -> bytes:
        """The clear data key ``key_id`` of ``owner``.

        Raises:
            KeyNotFound: no such key for this owner (never existed, retired or shredded).
            DecryptionError: the wrapped key does not authenticate under the KEK.
        """
        with self._lock:
            cached = self._plain.get(key_id)
            if cached is not None and self._owner_of.get(key_id) == owner:
                return cached
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(data_keys.c.kek_id, data_keys.c.wrapped).where(
                    data_keys.c.key_id == key_id, data_keys.c.owner == owner
                )
            ).first()
        if row is None:
            raise KeyNotFound("data key is unknown or was destroyed")
        plain = self.keys.unwrap(owner, WrappedKey(kek_id=row.kek_id, blob=bytes(row.wrapped)))
        with self._lock:
            self._plain[key_id] = plain
            self._owner_of[key_id] = owner
        return plain

    def sealer(self, owner: str, key_id: str) -> Sealer:
        """A :class:`Sealer` for the owner's key ``key_id`` (cached)."""
        with self._lock:
            s = self._sealers.get(key_id)
            if s is not None and self._owner_of.get(key_id) == owner:
                return s
        s = Sealer(key_id, self.key(owner, key_id))
        with self._lock:
            self._sealers[key_id] = s
        return s

    def current(self, owner: str, purpose: str = "data") -> tuple[str, bytes]:
        """The owner's current key for ``purpose``, created on first use."""
        check_owner(owner)
        with self._lock:
            kid = self._current.get((owner, purpose))
        if kid is None:
            kid = self._current_id(owner, purpose)
            with self._lock:
                self._current[(owner, purpose)] = kid
        return kid, self.key(owner, kid)

    def current_sealer(self, owner: str) -> Sealer:
        """A sealer for the owner's current data key."""
        kid, _ = self.current(owner, "data")
        return self.sealer(owner, kid)

    def _current_id(self, owner: str, purpose: str) -> str:
        with self.engine.connect() as conn:
            found = self._find_current(conn, owner, purpose)
        if found is not None:
            return found
        with write_transaction(self.engine) as conn:
            self._lock_owner(conn, owner)
            found = self._find_current(conn, owner, purpose)
            if found is not None:
                return found
            return self._create(conn, owner, purpose)

    @staticmethod
    def _find_current(conn: Connection, owner: str, purpose: str) -> str | None:
        row = conn.execute(
            sa.select(data_keys.c.key_id).where(
                data_keys.c.owner == owner,
                data_keys.c.purpose == purpose,
                data_keys.c.state == "current",
            )
        ).first()
        return None if row is None else str(row.key_id)

    @staticmethod
    def _lock_owner(conn: Connection, owner: str) -> None:
        if not is_sqlite(conn):
            conn.execute(
                sa.text("SELECT pg_advisory_xact_lock(hashtext(:k))"),
                {"k": f"centinela:matcher:keys:{owner}"},
            )

    def _create(self, conn: Connection, owner: str, purpose: str) -> str:
        prefix = "dek" if purpose == "data" else "idx"
        key_id = f"{prefix}-{owner}-{secrets.token_hex(8)}"
        plain = envelope.new_key()
        wrapped = self.keys.wrap(owner, plain)
        conn.execute(
            data_keys.insert().values(
                key_id=key_id,
                owner=owner,
                purpose=purpose,
                kek_id=wrapped.kek_id,
                wrapped=wrapped.blob,
                state="current",
                created_at=_now(),
            )
        )
        with self._lock:
            self._plain[key_id] = plain
            self._owner_of[key_id] = owner
        return key_id

    def key_ids(self, owner: str, purpose: str = "data") -> list[tuple[str, str]]:
        """``(key_id, state)`` of the owner's keys for ``purpose``."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(data_keys.c.key_id, data_keys.c.state).where(
                    data_keys.c.owner == owner, data_keys.c.purpose == purpose
                )
            ).all()
        return [(str(r.key_id), str(r.state)) for r in rows]

    # ---- rotation -----------------------------------------------------------------------

    def rotate_kek(self, owner: str) -> str:
        """Make a new KEK current and re-wrap every data key of ``owner`` under it.

        Old KEKs are retired after the re-wrap commits. Returns the new KEK id.
        """
        check_owner(owner)
        new_kek = self.keys.rotate_kek(owner)
        with write_transaction(self.engine) as conn:
            self._lock_owner(conn, owner)
            rows = conn.execute(
                sa.select(data_keys.c.key_id, data_keys.c.kek_id, data_keys.c.wrapped).where(
                    data_keys.c.owner == owner
                )
            ).all()
            old_keks = {str(r.kek_id) for r in rows} - {new_kek}
            for r in rows:
                plain = self.keys.unwrap(owner, WrappedKey(str(r.kek_id), bytes(r.wrapped)))
                again = self.keys.wrap(owner, plain)
                conn.execute(
                    data_keys.update()
                    .where(data_keys.c.key_id == r.key_id)
                    .values(kek_id=again.kek_id, wrapped=again.blob)
                )
        for kek in sorted(old_keks):
            try:
                self.keys.retire_kek(owner, kek)
            except KeyNotFound:
                continue
        return new_kek

    def rotate_data_key(self, owner: str) -> str:
        """Make a fresh data key current; the old one becomes ``previous``. Returns its id."""
        check_owner(owner)
        with write_transaction(self.engine) as conn:
            self._lock_owner(conn, owner)
            conn.execute(
                data_keys.update()
                .where(
                    data_keys.c.owner == owner,
                    data_keys.c.purpose == "data",
                    data_keys.c.state == "current",
                )
                .values(state="previous")
            )
            key_id = self._create(conn, owner, "data")
        with self._lock:
            self._current[(owner, "data")] = key_id
        return key_id

    def retire(self, owner: str, key_id: str) -> None:
        """Delete a ``previous`` data key (the caller checked nothing uses it any more)."""
        with write_transaction(self.engine) as conn:
            conn.execute(
                data_keys.delete().where(
                    data_keys.c.owner == owner,
                    data_keys.c.key_id == key_id,
                    data_keys.c.state == "previous",
                )
            )
        self._forget([key_id])

    def destroy_owner(self, conn: Connection, owner: str) -> None:
        """Delete the owner's wrapped keys (inside the caller's transaction)."""
        rows = conn.execute(sa.select(data_keys.c.key_id).where(data_keys.c.owner == owner)).all()
        conn.execute(data_keys.delete().where(data_keys.c.owner == owner))
        self._forget([str(r.key_id) for r in rows])
        with self._lock:
            for purpose in PURPOSES:
                self._current.pop((owner, purpose), None)

    def forget_owner(self, owner: str) -> None:
        """Drop every cached key of ``owner`` from memory."""
        with self._lock:
            ids = [k for k, o in self._owner_of.items() if o == owner]
            for purpose in PURPOSES:
                self._current.pop((owner, purpose), None)
        self._forget(ids)

    def _forget(self, key_ids: list[str]) -> None:
        with self._lock:
            for k in key_ids:
                self._plain.pop(k, None)
                self._owner_of.pop(k, None)
                self._sealers.pop(k, None)


def keyed_digest(keyring: DataKeyring, owner: str, kind: bytes, *parts: bytes) -> bytes:
    """HMAC-SHA256 under the owner's index key over a kind tag and length-prefixed parts."""
    _, key = keyring.current(owner, "index")
    mac = hmac.new(key, kind + b"\0", hashlib.sha256)
    for p in parts:
        mac.update(len(p).to_bytes(4, "big"))
        mac.update(p)
    return mac.digest()


def content_macs(
    keyring: DataKeyring,
    owner: str,
    gallery: str,
    model_id: str,
    vectors: Sequence[bytes | memoryview],
) -> list[bytes]:
    """``keyed_digest(keyring, owner, b"template", gallery, model_id, v)`` for every vector,
    keying the HMAC once (the idempotency digests of a bulk write)."""
    _, key = keyring.current(owner, "index")
    base = hmac.new(key, b"template\0", hashlib.sha256)
    for p in (gallery.encode(), model_id.encode()):
        base.update(len(p).to_bytes(4, "big"))
        base.update(p)
    # The C object under hmac.HMAC when there is one (its copy is ~1 µs cheaper a record).
    inner: Any = getattr(base, "_hmac", None) or base
    out = []
    for v in vectors:
        h = inner.copy()
        size = v.nbytes if isinstance(v, memoryview) else len(v)
        h.update(size.to_bytes(4, "big"))
        h.update(v)
        out.append(h.digest())
    return out


def dni_macs(keyring: DataKeyring, owner: str, dnis: Sequence[str]) -> list[bytes]:
    """``keyed_digest(keyring, owner, b"dni", d)`` for every normalised DNI, keying once."""
    _, key = keyring.current(owner, "index")
    base = hmac.new(key, b"dni\0", hashlib.sha256)
    inner: Any = getattr(base, "_hmac", None) or base
    out = []
    for d in dnis:
        raw = d.encode()
        h = inner.copy()
        h.update(len(raw).to_bytes(4, "big") + raw)
        out.append(h.digest())
    return out
