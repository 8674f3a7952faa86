"""The encrypted template store: subjects, face templates and stolen plates, with a change log.

Invariants (DESIGN.md §4; LEGAL_RULES R6, R7, R11):

* Templates, DNIs and plates are written only as AES-256-GCM ciphertexts under the owner's
  current data key, bound (associated data) to record id, subject, gallery, model and key id
  (:mod:`centinela.matcher.envelope`); DNIs and plates are found by HMAC under the owner's
  index key, never by their clear value. Subjects are pseudonymous random references.
* Writes are idempotent: a template is identified by (gallery, model, subject, keyed digest of
  its vector); re-sending the same DNI and vector changes nothing and allocates no ``seq``.
* Every change gets a new ``seq`` from one counter whose lock is held until commit, so
  ``changes_since(n)`` never misses a change committed later with a smaller number (see
  :mod:`centinela.matcher.schema`). Bulk writes use one transaction and ``executemany``.
* Crypto-shredding destroys the owner's KEKs first (so the data is unrecoverable even if the
  rest fails), then erases the owner's ciphertexts and tombstones every record so galleries
  replaying the change log empty themselves.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import secrets
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from centinela.errors import InvalidArgument, NotFound
from centinela.matcher.datakeys import DataKeyring
from centinela.matcher.envelope import Binding
from centinela.matcher.key_rotation import KeyRotation
from centinela.matcher.keys import KeyProvider, check_owner
from centinela.matcher.plate_records import PlateRecords
from centinela.matcher.schema import (
    MIGRATIONS,
    allocate,
    bulk_insert,
    chunks,
    lock_writers,
    meta,
    seq,
    subjects,
    templates,
)
from centinela.matcher.subject_records import SubjectRecords
from centinela.storage import migrate, write_transaction


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


def _epoch(when: dt.datetime | None) -> float | None:
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


@dataclasses.dataclass(frozen=True)
class TemplateRecord:
    """One template to store, for a subject given by DNI or by existing ``subject_ref``."""

    vector: npt.NDArray[np.float32]
    dni: str | None = None
    subject_ref: str | None = None
    active: bool = True
    expires_at: dt.datetime | None = None


@dataclasses.dataclass(frozen=True)
class AddResult:
    """Outcome of a bulk write; ids are in input order."""

    inserted: int
    unchanged: int
    replaced: int
    template_ids: list[str]
    subject_refs: list[str]


@dataclasses.dataclass(frozen=True)
class TemplateChange:
    """One row of the change log, as stored (still encrypted)."""

    seq: int
    template_id: str
    subject_ref: str
    gallery: str
    model_id: str
    owner: str
    key_id: str | None
    nonce: bytes | None
    ciphertext: bytes | None
    active: bool
    expires_at: float | None
    objector: bool
    deleted: bool


class TemplateStore(SubjectRecords, PlateRecords, KeyRotation):
    """Encrypted subjects, templates and plates in SQL (SQLite or PostgreSQL)."""

    def __init__(self, engine: Engine, keys: KeyProvider) -> None:
        self.engine = engine
        self.keys = keys
        migrate(engine, "matcher", MIGRATIONS)
        self.keyring = DataKeyring(engine, keys)
        self.store_id = self._store_id()

    def _store_id(self) -> str:
        with write_transaction(self.engine) as conn:
            row = conn.execute(sa.select(meta.c.value).where(meta.c.name == "store_id")).first()
            if row is not None:
                return str(row.value)
            value = uuid.uuid4().hex
            conn.execute(meta.insert().values(name="store_id", value=value))
            return value

    def max_seq(self) -> int:
        """The store's high-water mark: the largest committed change sequence."""
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(seq.c.value).where(seq.c.id == 1)).scalar_one())

    # ---- subjects (see also SubjectRecords) ---------------------------------------------

    def set_objector(self, subject_ref: str, objector: bool) -> int:
        """Record or withdraw an objection (R7); re-sequences the subject's templates."""
        with write_transaction(self.engine) as conn:
            lock_writers(conn)
            done = conn.execute(
                subjects.update()
                .where(subjects.c.subject_ref == subject_ref)
                .values(objector=objector)
            ).rowcount
            if not done:
                raise NotFound("no such subject", field="subject_ref")
            ids = self._live_templates(conn, [subject_ref])
            self._resequence(conn, ids, {})
            return len(ids)

    # ---- templates ----------------------------------------------------------------------

    def add_templates(
        self,
        owner: str,
        gallery: str,
        model_id: str,
        records: Sequence[TemplateRecord],
        *,
        replace_existing: bool = False,
    ) -> AddResult:
        """Store templates durably in one transaction; idempotent.

        A record whose subject already has the same vector in this gallery and model is
        unchanged. With ``replace_existing`` (registry semantics: one template per DNI and
        model), the subject's other live templates there are removed.

        Raises:
            InvalidArgument: a record has neither or both of ``dni``/``subject_ref``, a bad
                DNI, or a non-finite vector.
            NotFound: a ``subject_ref`` does not exist for this owner.
        """
        check_owner(owner)
        if not records:
            return AddResult(0, 0, 0, [], [])
        vecs = []
        for r in records:
            if (r.dni is None) == (r.subject_ref is None):
                raise InvalidArgument("give exactly one of dni and subject_ref", field="subject")
            v = np.ascontiguousarray(np.asarray(r.vector, dtype="<f4").ravel())
            if not np.all(np.isfinite(v)) or v.size == 0:
                raise InvalidArgument("vector has a non-finite value", field="template.vector")
            vecs.append(v.tobytes())
        macs = [self._mac(owner, b"template", gallery.encode(), model_id.encode(), v) for v in vecs]
        sealer = self.keyring.current_sealer(owner)
        with write_transaction(self.engine) as conn:
            lock_writers(conn)
            refs = self._subject_refs(conn, owner, records)
            existing: dict[tuple[str, bytes], tuple[str, bool]] = {}
            others: dict[str, list[str]] = {}
            for part in chunks(sorted(set(refs))):
                rows = conn.execute(
                    sa.select(
                        templates.c.template_id,
                        templates.c.subject_ref,
                        templates.c.content_mac,
                        templates.c.deleted,
                    ).where(
                        templates.c.gallery == gallery,
                        templates.c.model_id == model_id,
                        templates.c.subject_ref.in_(part),
                    )
                )
                for found_row in rows:
                    existing[(found_row.subject_ref, bytes(found_row.content_mac))] = (
                        str(found_row.template_id),
                        bool(found_row.deleted),
                    )
                    if not found_row.deleted:
                        others.setdefault(found_row.subject_ref, []).append(
                            str(found_row.template_id)
                        )
            ids: list[str] = []
            inserts: list[dict[str, Any]] = []
            revive: list[dict[str, Any]] = []
            keep: set[str] = set()
            seen: dict[tuple[str, bytes], str] = {}
            unchanged = 0
            for rec, ref, mac, raw in zip(records, refs, macs, vecs, strict=True):
                found = existing.get((ref, mac))
                same = seen.get((ref, mac)) or (found[0] if found and not found[1] else None)
                if same is not None:
                    unchanged += 1
                    ids.append(same)
                    keep.add(same)
                    continue
                tid = found[0] if found is not None else "tpl_" + secrets.token_hex(16)
                seen[(ref, mac)] = tid
                nonce, ct = sealer.seal(
                    raw, Binding("template", tid, ref, gallery, model_id, sealer.key_id)
                )
                entry: dict[str, Any] = {
                    "_key": (ref, mac),
                    "template_id": tid,
                    "subject_ref": ref,
                    "key_id": sealer.key_id,
                    "nonce": nonce,
                    "ciphertext": ct,
                    "active": rec.active,
                    "expires_at": _epoch(rec.expires_at),
                    "deleted": False,
                }
                (revive if found is not None else inserts).append(entry)
                ids.append(tid)
                keep.add(tid)
            stale: list[str] = []
            if replace_existing:
                for ref in set(refs):
                    stale += [t for t in others.get(ref, []) if t not in keep]
            first = (
                allocate(conn, len(inserts) + len(revive) + len(stale))
                if (inserts or revive or stale)
                else 0
            )
            now = _now()
            for i, entry in enumerate(inserts + revive):
                entry["seq"] = first + i
            if inserts:
                bulk_insert(
                    conn,
                    templates,
                    [
                        {
                            **{k: v for k, v in row.items() if k != "_key"},
                            "gallery": gallery,
                            "model_id": model_id,
                            "owner": owner,
                            "content_mac": row["_key"][1],
                            "created_at": now,
                        }
                        for row in inserts
                    ],
                )
            if revive:
                conn.execute(
                    templates.update()
                    .where(templates.c.template_id == sa.bindparam("b_tid"))
                    .values(
                        seq=sa.bindparam("seq"),
                        key_id=sa.bindparam("key_id"),
                        nonce=sa.bindparam("nonce"),
                        ciphertext=sa.bindparam("ciphertext"),
                        active=sa.bindparam("active"),
                        expires_at=sa.bindparam("expires_at"),
                        deleted=False,
                    ),
                    [
                        {
                            "b_tid": r["template_id"],
                            "seq": r["seq"],
                            "key_id": r["key_id"],
                            "nonce": r["nonce"],
                            "ciphertext": r["ciphertext"],
                            "active": r["active"],
                            "expires_at": r["expires_at"],
                        }
                        for r in revive
                    ],
                )
            if stale:
                self._tombstone(conn, stale, first + len(inserts) + len(revive))
        return AddResult(
            inserted=len(inserts) + len(revive),
            unchanged=unchanged,
            replaced=len(stale),
            template_ids=ids,
            subject_refs=refs,
        )

    def _subject_refs(
        self, conn: Connection, owner: str, records: Sequence[TemplateRecord]
    ) -> list[str]:
        by_dni = [r.dni for r in records if r.dni is not None]
        resolved = iter(self._subjects_in(conn, owner, by_dni)) if by_dni else iter(())
        given = sorted({r.subject_ref for r in records if r.subject_ref is not None})
        known: set[str] = set()
        for part in chunks(given):
            rows = conn.execute(
                sa.select(subjects.c.subject_ref).where(
                    subjects.c.owner == owner, subjects.c.subject_ref.in_(part)
                )
            )
            known.update(str(r.subject_ref) for r in rows)
        if len(known) != len(given):
            raise NotFound("unknown subject for this owner", field="subject_ref")
        return [next(resolved) if r.dni is not None else str(r.subject_ref) for r in records]

    def _live_templates(self, conn: Connection, subject_refs: Sequence[str]) -> list[str]:
        out: list[str] = []
        for part in chunks(list(subject_refs)):
            rows = conn.execute(
                sa.select(templates.c.template_id)
                .where(templates.c.subject_ref.in_(part), templates.c.deleted.is_(False))
                .order_by(templates.c.seq)
            )
            out += [str(r.template_id) for r in rows]
        return out

    def _resequence(self, conn: Connection, ids: Sequence[str], values: dict[str, Any]) -> None:
        if not ids:
            return
        first = allocate(conn, len(ids))
        conn.execute(
            templates.update()
            .where(templates.c.template_id == sa.bindparam("b_tid"))
            .values(seq=sa.bindparam("b_seq"), **values),
            [{"b_tid": t, "b_seq": first + i} for i, t in enumerate(ids)],
        )

    def _tombstone(self, conn: Connection, ids: Sequence[str], first: int) -> None:
        conn.execute(
            templates.update()
            .where(templates.c.template_id == sa.bindparam("b_tid"))
            .values(seq=sa.bindparam("b_seq"), deleted=True, nonce=None, ciphertext=None),
            [{"b_tid": t, "b_seq": first + i} for i, t in enumerate(ids)],
        )

    def templates_of(self, subject_ref: str) -> list[str]:
        """Live template ids of a subject."""
        with self.engine.connect() as conn:
            return self._live_templates(conn, [subject_ref])

    def set_template_state(
        self, template_ids: Sequence[str], *, active: bool, expires_at: dt.datetime | None
    ) -> int:
        """Change active flag and expiry of live templates (lift, renew: R6)."""
        with write_transaction(self.engine) as conn:
            lock_writers(conn)
            live = self._existing_live(conn, template_ids)
            self._resequence(conn, live, {"active": active, "expires_at": _epoch(expires_at)})
            return len(live)

    def _existing_live(self, conn: Connection, template_ids: Sequence[str]) -> list[str]:
        out: list[str] = []
        for part in chunks(list(dict.fromkeys(template_ids))):
            rows = conn.execute(
                sa.select(templates.c.template_id).where(
                    templates.c.template_id.in_(part), templates.c.deleted.is_(False)
                )
            )
            out += sorted(str(r.template_id) for r in rows)
        return out

    def remove_templates(self, template_ids: Sequence[str]) -> int:
        """Remove templates: ciphertext erased, a tombstone replays the removal."""
        with write_transaction(self.engine) as conn:
            lock_writers(conn)
            live = self._existing_live(conn, template_ids)
            if live:
                self._tombstone(conn, live, allocate(conn, len(live)))
            return len(live)

    def remove_subject(self, subject_ref: str) -> int:
        """Remove a subject's templates and erase its DNI; returns templates removed."""
        with write_transaction(self.engine) as conn:
            lock_writers(conn)
            live = self._live_templates(conn, [subject_ref])
            if live:
                self._tombstone(conn, live, allocate(conn, len(live)))
            conn.execute(
                subjects.update()
                .where(subjects.c.subject_ref == subject_ref)
                .values(dni_mac=None, dni_ct=None, nonce=None, key_id=None)
            )
            return len(live)

    # ---- change log ---------------------------------------------------------------------

    def changes_since(
        self, after: int, *, gallery: str | None = None, limit: int = 10_000
    ) -> list[TemplateChange]:
        """Template changes with ``seq > after``, in ``seq`` order, at most ``limit``."""
        q = (
            sa.select(templates, subjects.c.objector)
            .join(subjects, subjects.c.subject_ref == templates.c.subject_ref)
            .where(templates.c.seq > after)
            .order_by(templates.c.seq)
            .limit(limit)
        )
        if gallery is not None:
            q = q.where(templates.c.gallery == gallery)
        with self.engine.connect() as conn:
            rows = conn.execute(q).all()
        return [
            TemplateChange(
                seq=int(r.seq),
                template_id=r.template_id,
                subject_ref=r.subject_ref,
                gallery=r.gallery,
                model_id=r.model_id,
                owner=r.owner,
                key_id=r.key_id,
                nonce=None if r.nonce is None else bytes(r.nonce),
                ciphertext=None if r.ciphertext is None else bytes(r.ciphertext),
                active=bool(r.active),
                expires_at=None if r.expires_at is None else float(r.expires_at),
                objector=bool(r.objector),
                deleted=bool(r.deleted),
            )
            for r in rows
        ]

    def count_changes_since(self, after: int, *, gallery: str | None = None) -> int:
        """How many template changes have ``seq > after`` (the index lag)."""
        q = sa.select(sa.func.count()).select_from(templates).where(templates.c.seq > after)
        if gallery is not None:
            q = q.where(templates.c.gallery == gallery)
        with self.engine.connect() as conn:
            return int(conn.execute(q).scalar_one())

    def open_template(self, change: TemplateChange) -> npt.NDArray[np.float32]:
        """Decrypt a change's vector.

        Raises:
            NotFound: the change is a removal.
            KeyNotFound: the data key was destroyed (crypto-shredded).
            DecryptionError: wrong key, moved or altered ciphertext.
        """
        if change.deleted or change.ciphertext is None or change.nonce is None:
            raise NotFound("template was removed", field="template_id")
        sealer = self.keyring.sealer(change.owner, str(change.key_id))
        binding = Binding(
            "template",
            change.template_id,
            change.subject_ref,
            change.gallery,
            change.model_id,
            str(change.key_id),
        )
        raw = sealer.open(change.nonce, change.ciphertext, binding)
        return np.frombuffer(raw, dtype="<f4").astype(np.float32)
