"""Pseudonymous subjects in the store: DNIs encrypted, found by keyed hash only.

Invariants (DESIGN.md §4): a subject is a random reference (``sub_…``); its DNI, if any, is
stored only as an AES-256-GCM ciphertext under the owner's data key, bound to the subject,
and found by HMAC-SHA256 of the normalised DNI under the owner's index key. Owners never
share subjects: the same DNI is a different subject for PNP and for Reniec.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from centinela.errors import InvalidArgument, NotFound
from centinela.matcher.datakeys import DataKeyring, dni_macs, keyed_digest
from centinela.matcher.envelope import Binding, Sealer, encode_bindings
from centinela.matcher.keys import check_owner
from centinela.matcher.schema import chunks, lock_writers, new_ref, new_refs, subjects
from centinela.matcher.writes import Write
from centinela.storage import is_sqlite, write_transaction


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


class SubjectWrite(Write):
    """Subjects planned by :meth:`SubjectRecords.plan_subjects`: ``refs`` in input order,
    ``created`` the new ones (their rows are written when the write is applied)."""

    def __init__(
        self, refs: list[str], created: list[str], rows: list[tuple[Any, ...]], sql: str
    ) -> None:
        def step(conn: Connection) -> None:
            lock_writers(conn)
            conn.exec_driver_sql(sql, rows)

        super().__init__(*([step] if rows else []))
        self.refs = refs
        self.created = created


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
        planned = self.plan_new_subject(owner)
        with write_transaction(self.engine) as conn:
            planned(conn)
        return planned.refs[0]

    def plan_new_subject(self, owner: str) -> SubjectWrite:
        """Planned :meth:`new_subject`: the reference is chosen now, the row written when
        the write is applied."""
        check_owner(owner)
        ref = new_ref("sub")
        row = (ref, owner, None, None, None, None, False, _now())
        return SubjectWrite([ref], [ref], [row], self._insert_subject_sql())

    def ensure_subject(self, owner: str, dni: str) -> str:
        """The owner's subject for ``dni``, created (DNI encrypted) if new."""
        res = self._resolve_subjects(owner, [dni])
        return res[0]

    def plan_subjects(self, owner: str, dnis: Sequence[str]) -> SubjectWrite:
        """The owner's subjects for ``dnis``: found, or planned (DNI encrypted now, rows
        written when the write is applied).

        Raises:
            InvalidArgument: a DNI is not eight digits.
        """
        check_owner(owner)
        self.keyring.current(owner, "index")
        sealer = self.keyring.current_sealer(owner)
        with self.engine.connect() as conn:
            return self._plan_subjects(conn, owner, dnis, sealer)

    def _resolve_subjects(self, owner: str, dnis: Sequence[str]) -> list[str]:
        # Create the owner's keys (their own transaction) before taking the write lock:
        # SQLite allows one writer, and this thread would otherwise wait on itself.
        self.keyring.current(owner, "index")
        sealer = self.keyring.current_sealer(owner)
        with write_transaction(self.engine) as conn:
            lock_writers(conn)
            planned = self._plan_subjects(conn, owner, dnis, sealer)
            planned(conn)
            return planned.refs

    def _plan_subjects(
        self, conn: Connection, owner: str, dnis: Sequence[str], sealer: Sealer
    ) -> SubjectWrite:
        norm = [normalise_dni(d) for d in dnis]
        macs = dni_macs(self.keyring, owner, norm)
        found = self._subjects_by_dni_mac(conn, owner, sorted(set(macs)))
        new: list[tuple[str, str, bytes]] = []
        fresh_refs = iter(new_refs("sub", len(norm)))
        for d, mac in zip(norm, macs, strict=True):
            if mac in found:
                continue
            ref = next(fresh_refs)
            found[mac] = ref
            new.append((ref, d, mac))
        sealed = sealer.seal_many(
            [d.encode() for _, d, _ in new],
            encode_bindings(
                "dni", [r for r, _, _ in new], [r for r, _, _ in new], "", "", sealer.key_id
            ),
        )
        now = _now()
        rows_new = [
            (ref, owner, mac, sealer.key_id, nonce, ct, False, now)
            for (ref, _, mac), (nonce, ct) in zip(new, sealed, strict=True)
        ]
        return SubjectWrite(
            [found[m] for m in macs], [r for r, _, _ in new], rows_new, self._insert_subject_sql()
        )

    @staticmethod
    def _subjects_by_dni_mac(
        conn: Connection, owner: str, macs: Sequence[bytes]
    ) -> dict[bytes, str]:
        """The owner's subjects among these DNI digests, by digest."""
        found: dict[bytes, str] = {}
        mark = "?" if is_sqlite(conn) else "%s"
        for part in chunks(list(macs)):
            # Through the driver: SQLAlchemy would process each of the 500 parameters.
            sql = (
                "SELECT dni_mac, subject_ref FROM matcher_subjects "  # noqa: S608
                f"WHERE dni_mac IN ({', '.join([mark] * len(part))}) AND owner = {mark}"
            )
            rows = conn.exec_driver_sql(sql, (*part, owner)).fetchall()
            found.update({bytes(r[0]): str(r[1]) for r in rows})
        return found

    def _insert_subject_sql(self) -> str:
        mark = "?" if is_sqlite(self.engine) else "%s"
        return (
            "INSERT INTO matcher_subjects (subject_ref, owner, dni_mac, key_id, nonce, dni_ct, "  # noqa: S608
            f"objector, created_at) VALUES ({', '.join([mark] * 8)})"
        )

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
