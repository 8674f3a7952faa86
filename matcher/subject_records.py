"""Pseudonymous subjects in the store: DNIs encrypted, found by keyed hash only.

Invariants (DESIGN.md §4): a subject is a random reference (``sub_…``); its DNI, if any, is
stored only as an AES-256-GCM ciphertext under the owner's data key, bound to the subject,
and found by HMAC-SHA256 of the normalised DNI under the owner's index key. Owners never
share subjects: the same DNI is a different subject for PNP and for Reniec.
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from centinela.errors import InvalidArgument, NotFound
from centinela.matcher.datakeys import DataKeyring, keyed_digest
from centinela.matcher.envelope import Binding
from centinela.matcher.keys import check_owner
from centinela.matcher.schema import bulk_insert, chunks, lock_writers, subjects
from centinela.storage import write_transaction


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


def normalise_dni(dni: str) -> str:
    """A Peruvian DNI: eight digits (spaces ignored).

    Raises:
        InvalidArgument: not eight digits (the message never repeats the value).
    """
    text = "".join(str(dni).split())
    if len(text) != 8 or not text.isascii() or not text.isdigit():
        raise InvalidArgument("DNI must be eight digits", field="dni")
    return text


class SubjectRecords:
    """Subject methods of :class:`~centinela.matcher.store.TemplateStore`."""

    engine: Engine
    keyring: DataKeyring

    def _mac(self, owner: str, kind: bytes, *parts: bytes) -> bytes:
        return keyed_digest(self.keyring, owner, kind, *parts)

    def dni_mac(self, owner: str, dni: str) -> bytes:
        """Keyed digest under which the owner's subject with this DNI is found."""
        return self._mac(owner, b"dni", normalise_dni(dni).encode())

    def find_subject(self, owner: str, dni: str) -> str | None:
        """The owner's pseudonymous subject for ``dni``, or None."""
        mac = self.dni_mac(check_owner(owner), dni)
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(subjects.c.subject_ref).where(
                    subjects.c.owner == owner, subjects.c.dni_mac == mac
                )
            ).first()
        return None if row is None else str(row.subject_ref)

    def new_subject(self, owner: str) -> str:
        """A new pseudonymous subject without a DNI (a wanted person known only by face)."""
        check_owner(owner)
        ref = "sub_" + secrets.token_hex(16)
        with write_transaction(self.engine) as conn:
            lock_writers(conn)
            bulk_insert(
                conn,
                subjects,
                [
                    {
                        "subject_ref": ref,
                        "owner": owner,
                        "dni_mac": None,
                        "key_id": None,
                        "nonce": None,
                        "dni_ct": None,
                        "objector": False,
                        "created_at": _now(),
                    }
                ],
            )
        return ref

    def ensure_subject(self, owner: str, dni: str) -> str:
        """The owner's subject for ``dni``, created (DNI encrypted) if new."""
        res = self._resolve_subjects(owner, [dni])
        return res[0]

    def _resolve_subjects(self, owner: str, dnis: Sequence[str]) -> list[str]:
        # Create the owner's keys (their own transaction) before taking the write lock:
        # SQLite allows one writer, and this thread would otherwise wait on itself.
        self.keyring.current(owner, "index")
        self.keyring.current_sealer(owner)
        with write_transaction(self.engine) as conn:
            lock_writers(conn)
            return self._subjects_in(conn, owner, dnis)

    def _subjects_in(self, conn: Connection, owner: str, dnis: Sequence[str]) -> list[str]:
        norm = [normalise_dni(d) for d in dnis]
        macs = [self._mac(owner, b"dni", d.encode()) for d in norm]
        found: dict[bytes, str] = {}
        for part in chunks(sorted(set(macs))):
            rows = conn.execute(
                sa.select(subjects.c.subject_ref, subjects.c.dni_mac).where(
                    subjects.c.owner == owner, subjects.c.dni_mac.in_(part)
                )
            )
            found.update({bytes(r.dni_mac): str(r.subject_ref) for r in rows})
        sealer = self.keyring.current_sealer(owner)
        new_rows = []
        for d, mac in zip(norm, macs, strict=True):
            if mac in found:
                continue
            ref = "sub_" + secrets.token_hex(16)
            found[mac] = ref
            binding = Binding("dni", ref, ref, "", "", sealer.key_id)
            nonce, ct = sealer.seal(d.encode(), binding)
            new_rows.append(
                {
                    "subject_ref": ref,
                    "owner": owner,
                    "dni_mac": mac,
                    "key_id": sealer.key_id,
                    "nonce": nonce,
                    "dni_ct": ct,
                    "objector": False,
                    "created_at": _now(),
                }
            )
        bulk_insert(conn, subjects, new_rows)
        return [found[m] for m in macs]

    def reveal_dni(self, subject_ref: str) -> str:
        """Decrypt a subject's DNI (for audited administrative use only).

        Raises:
            NotFound: no such subject, or its DNI was erased.
            KeyNotFound, DecryptionError: the key is gone or the row was tampered with.
        """
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(subjects).where(subjects.c.subject_ref == subject_ref)
            ).first()
        if row is None or row.dni_ct is None:
            raise NotFound("no such subject", field="subject_ref")
        sealer = self.keyring.sealer(row.owner, row.key_id)
        binding = Binding("dni", subject_ref, subject_ref, "", "", row.key_id)
        return sealer.open(bytes(row.nonce), bytes(row.dni_ct), binding).decode()
