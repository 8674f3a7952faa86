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

import contextlib
import dataclasses
import datetime as dt
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from centinela.errors import DecryptionError, InvalidArgument, KeyManagementError, NotFound
from centinela.matcher.datakeys import DataKeyring, content_macs, dni_macs
from centinela.matcher.envelope import Binding, Sealer, encode_bindings
from centinela.matcher.key_rotation import KeyRotation
from centinela.matcher.keys import KeyProvider, check_owner
from centinela.matcher.plate_records import PlateRecords
from centinela.matcher.schema import (
    MIGRATIONS,
    Statements,
    allocate,
    chunks,
    lock_writers,
    meta,
    new_refs,
    seq,
    subjects,
    templates,
)
from centinela.matcher.subject_records import SubjectRecords, SubjectWrite, normalise_dni
from centinela.matcher.writes import Write
from centinela.storage import is_sqlite, migrate, write_transaction


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
class TemplateColumns:
    """Templates to store, column by column (a bulk import builds no object per record).

    ``vectors`` is ``(n, dim)``; ``dnis[i]`` or ``subject_refs[i]`` names the subject of row
    ``i`` (exactly one of them, unless the write creates one unnamed subject for the rows that
    name none); ``active`` (default: all) and ``expires_at`` (epoch seconds, ``None`` never;
    default: none expires) are per row.
    """

    vectors: npt.NDArray[np.float32]
    dnis: Sequence[str | None]
    subject_refs: Sequence[str | None]
    active: Sequence[bool] | None = None
    expires_at: Sequence[float | None] | None = None

    def __len__(self) -> int:
        return len(self.dnis)

    @classmethod
    def for_dnis(cls, vectors: npt.NDArray[np.float32], dnis: Sequence[str]) -> TemplateColumns:
        return cls(vectors, dnis, [None] * len(dnis))

    @classmethod
    def from_records(cls, records: Sequence[TemplateRecord]) -> TemplateColumns:
        """The records as columns.

        Raises:
            InvalidArgument: the vectors differ in length.
        """
        if not records:
            return cls(np.empty((0, 0), np.float32), [], [])
        rows = [np.asarray(r.vector, dtype="<f4").ravel() for r in records]
        if len({len(v) for v in rows}) != 1:
            raise InvalidArgument("vectors of one write have one dimension", field="vector")
        return cls(
            np.stack(rows),
            [r.dni for r in records],
            [r.subject_ref for r in records],
            [r.active for r in records],
            [_epoch(r.expires_at) for r in records],
        )


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


#: A write of at least this many templates is a bulk load (see :func:`bulk_cache`).
BULK_ROWS = 100
#: SQLite page cache of a connection that writes bulk loads, in KiB (default is 2 MiB).
BULK_CACHE_KIB = 65_536


def bulk_cache(conn: Connection) -> None:
    """Give a SQLite connection that writes bulk loads a page cache that holds the subject
    index of a national registry (~50 MB at a million subjects), once per connection.

    Its keys are keyed digests, so every batch inserts into ~1,000 random pages of it; with
    SQLite's default 2 MiB cache each is read again from the OS (measured at 200k subjects:
    ~14 → ~8 ms a batch for the subject rows). Other connections keep the default.
    """
    if not is_sqlite(conn) or conn.info.get("centinela.bulk_cache"):
        return
    conn.exec_driver_sql(f"PRAGMA cache_size = -{int(BULK_CACHE_KIB)}")
    conn.info["centinela.bulk_cache"] = True


@dataclasses.dataclass
class PreparedTemplates:
    """What :meth:`TemplateStore.prepare_templates` computed without the database: the
    rows' digests, and their encryption under fresh ids (``tids``, ``guess_refs``)."""

    owner: str
    gallery: str
    model_id: str
    cols: TemplateColumns
    vectors: npt.NDArray[np.float32]
    raws: list[memoryview] = dataclasses.field(default_factory=list)
    macs: list[bytes] = dataclasses.field(default_factory=list)
    dni_macs: list[bytes | None] = dataclasses.field(default_factory=list)
    guess_refs: list[str] = dataclasses.field(default_factory=list)
    unnamed_ref: str = ""
    dni_sealed: dict[str, tuple[bytes, bytes]] = dataclasses.field(default_factory=dict)
    tids: list[str] = dataclasses.field(default_factory=list)
    sealed: list[tuple[bytes, bytes]] = dataclasses.field(default_factory=list)
    sealer: Sealer | None = None


class TemplateWrite(Write):
    """Templates (and the subjects they create) planned by :meth:`TemplateStore.plan_templates`;
    ``result`` says what applying it does."""

    def __init__(self, result: AddResult, *steps: Callable[[Connection], None]) -> None:
        super().__init__(*steps)
        self.result = result


class TemplateStore(SubjectRecords, PlateRecords, KeyRotation):
    """Encrypted subjects, templates and plates in SQL (SQLite or PostgreSQL)."""

    def __init__(self, engine: Engine, keys: KeyProvider) -> None:
        self.engine = engine
        self.keys = keys
        migrate(engine, "matcher", MIGRATIONS)
        self.keyring = DataKeyring(engine, keys)
        self.store_id = self._store_id()
        self.sql = Statements(is_sqlite(engine))

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

    def _ensure_keys(self, owner: str) -> None:
        """Create the owner's keys now, in their own transaction: a write applied inside
        another transaction must not need a second connection (SQLite has one writer)."""
        self.keyring.current(owner, "index")
        self.keyring.current_sealer(owner)

    # ---- subjects (see also SubjectRecords) ---------------------------------------------

    def set_objector(self, subject_ref: str, objector: bool) -> int:
        """Record or withdraw an objection (R7); re-sequences the subject's templates.

        Raises:
            NotFound: no such subject.
        """
        with write_transaction(self.engine) as conn:
            lock_writers(conn)
            if not self._subject_exists(conn, subject_ref):
                raise NotFound("no such subject", field="subject_ref")
            count = len(self._live_templates(conn, [subject_ref]))
            self.objector_write(subject_ref, objector)(conn)
            return count

    def objector_write(self, subject_ref: str, objector: bool) -> Write:
        """Planned :meth:`set_objector` (the caller checked that the subject exists or is
        created earlier in the same transaction)."""

        def step(conn: Connection) -> None:
            lock_writers(conn)
            conn.execute(
                subjects.update()
                .where(subjects.c.subject_ref == subject_ref)
                .values(objector=objector)
            )
            self._resequence(conn, self._live_templates(conn, [subject_ref]), {})

        return Write(step)

    @staticmethod
    def _subject_exists(conn: Connection, subject_ref: str) -> bool:
        row = conn.execute(
            sa.select(subjects.c.subject_ref).where(subjects.c.subject_ref == subject_ref)
        ).first()
        return row is not None

    # ---- templates ----------------------------------------------------------------------

    def add_templates(
        self,
        owner: str,
        gallery: str,
        model_id: str,
        records: Sequence[TemplateRecord] | TemplateColumns,
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
        if not len(records):
            return AddResult(0, 0, 0, [], [])
        self._ensure_keys(owner)
        with write_transaction(self.engine) as conn:
            lock_writers(conn)
            write = self.plan_templates(
                owner, gallery, model_id, records, replace_existing=replace_existing, conn=conn
            )
            write(conn)
        return write.result

    def prepare_templates(
        self,
        owner: str,
        gallery: str,
        model_id: str,
        records: Sequence[TemplateRecord] | TemplateColumns,
        *,
        unnamed_subject: bool = False,
    ) -> PreparedTemplates:
        """The part of :meth:`plan_templates` that needs no database: validation, digests,
        and encryption under fresh ids (right for every new record: a record whose subject
        or template turns out to exist is re-encrypted when planned). A bulk import runs it
        outside the write lock.

        Raises:
            InvalidArgument: as :meth:`add_templates`.
        """
        check_owner(owner)
        cols = (
            records
            if isinstance(records, TemplateColumns)
            else TemplateColumns.from_records(records)
        )
        n = len(cols)
        if n == 0:
            return PreparedTemplates(owner, gallery, model_id, cols, np.empty((0, 0), "<f4"))
        vecs = np.ascontiguousarray(cols.vectors, dtype="<f4").reshape(n, -1)
        unnamed = [
            i
            for i, (d, r) in enumerate(zip(cols.dnis, cols.subject_refs, strict=True))
            if (d is None) == (r is None) and not (unnamed_subject and d is None)
        ]
        if unnamed:
            raise InvalidArgument("give exactly one of dni and subject_ref", field="subject")
        if vecs.shape[1] == 0 or not np.all(np.isfinite(vecs)):
            raise InvalidArgument("vector has a non-finite value", field="template.vector")
        self._ensure_keys(owner)
        sealer = self.keyring.current_sealer(owner)
        width = vecs.shape[1] * 4
        flat = memoryview(vecs.tobytes())
        raws = [flat[i * width : (i + 1) * width] for i in range(n)]
        norm = [None if d is None else normalise_dni(d) for d in cols.dnis]
        named = [d for d in norm if d is not None]
        named_macs = iter(dni_macs(self.keyring, owner, named))
        row_dni_macs = [None if d is None else next(named_macs) for d in norm]
        pool = iter(new_refs("sub", n + 1))
        guess_by_mac: dict[bytes, str] = {}
        new_dnis: list[tuple[str, str]] = []
        unnamed_ref = ""
        guess: list[str] = []
        for d, mac, given in zip(norm, row_dni_macs, cols.subject_refs, strict=True):
            if d is not None and mac is not None:
                ref = guess_by_mac.get(mac)
                if ref is None:
                    ref = guess_by_mac[mac] = next(pool)
                    new_dnis.append((ref, d))
                guess.append(ref)
            elif given is not None:
                guess.append(given)
            else:
                unnamed_ref = unnamed_ref or next(pool)
                guess.append(unnamed_ref)
        dni_sealed = sealer.seal_many(
            [d.encode() for _, d in new_dnis],
            encode_bindings(
                "dni", [r for r, _ in new_dnis], [r for r, _ in new_dnis], "", "", sealer.key_id
            ),
        )
        tids = new_refs("tpl", n)
        sealed = sealer.seal_many(
            raws, encode_bindings("template", tids, guess, gallery, model_id, sealer.key_id)
        )
        return PreparedTemplates(
            owner,
            gallery,
            model_id,
            cols,
            vecs,
            raws=raws,
            macs=content_macs(self.keyring, owner, gallery, model_id, raws),
            dni_macs=row_dni_macs,
            guess_refs=guess,
            unnamed_ref=unnamed_ref,
            dni_sealed={r: ct for (r, _), ct in zip(new_dnis, dni_sealed, strict=True)},
            tids=tids,
            sealed=sealed,
            sealer=sealer,
        )

    def plan_templates(
        self,
        owner: str,
        gallery: str,
        model_id: str,
        records: Sequence[TemplateRecord] | TemplateColumns | PreparedTemplates,
        *,
        replace_existing: bool = False,
        unnamed_subject: bool = False,
        conn: Connection | None = None,
    ) -> TemplateWrite:
        """Plan :meth:`add_templates`: validate, look up, encrypt; apply it in a transaction.

        ``records`` may come from :meth:`prepare_templates` (then only the look-ups are
        left). With ``unnamed_subject``, the rows that name neither a DNI nor a subject all
        go to one new pseudonymous subject without DNI (a wanted person known only by face),
        created by the write. Reads use ``conn`` when given, else a connection of their own.

        Raises:
            InvalidArgument, NotFound: as :meth:`add_templates`.
        """
        prep = (
            records
            if isinstance(records, PreparedTemplates)
            else self.prepare_templates(
                owner, gallery, model_id, records, unnamed_subject=unnamed_subject
            )
        )
        if (prep.owner, prep.gallery, prep.model_id) != (owner, gallery, model_id):
            raise InvalidArgument("prepared for another gallery", field="gallery")
        n = len(prep.cols)
        if n == 0:
            return TemplateWrite(AddResult(0, 0, 0, [], []))
        sealer, macs, raws = prep.sealer, prep.macs, prep.raws
        assert sealer is not None  # set for every non-empty preparation
        with contextlib.ExitStack() as stack:
            c = conn if conn is not None else stack.enter_context(self.engine.connect())
            if n >= BULK_ROWS:
                bulk_cache(c)
            subject_write, refs, fresh = self._plan_subject_refs(c, prep)
            existing, others = self._existing_templates(
                c, gallery, model_id, sorted(set(refs) - fresh)
            )
        cols = prep.cols
        ids: list[str] = []
        inserts: list[tuple[Any, ...]] = []
        revive: list[tuple[Any, ...]] = []
        reseal: list[int] = []
        seen: dict[tuple[str, bytes], str] = {}
        unchanged = 0
        for i, (ref, mac) in enumerate(zip(refs, macs, strict=True)):
            key = (ref, mac)
            found = existing.get(key)
            same = seen.get(key) or (found[0] if found and not found[1] else None)
            if same is not None:
                unchanged += 1
                ids.append(same)
                continue
            tid = found[0] if found is not None else prep.tids[i]
            seen[key] = tid
            ids.append(tid)
            if tid != prep.tids[i] or ref != prep.guess_refs[i]:
                reseal.append(i)  # bound to another id than guessed: encrypt again
            (revive if found is not None else inserts).append((i, tid))
        by_row = {i: prep.sealed[i] for i, _ in inserts + revive}
        if reseal:
            again = sealer.seal_many(
                [raws[i] for i in reseal],
                encode_bindings(
                    "template",
                    [ids[i] for i in reseal],
                    [refs[i] for i in reseal],
                    gallery,
                    model_id,
                    sealer.key_id,
                ),
            )
            by_row.update(zip(reseal, again, strict=True))
        active = [True] * n if cols.active is None else [bool(a) for a in cols.active]
        expires = [None] * n if cols.expires_at is None else list(cols.expires_at)
        now = _now()
        insert_rows = [
            (
                tid,
                refs[i],
                gallery,
                model_id,
                owner,
                sealer.key_id,
                *by_row[i],
                macs[i],
                active[i],
                expires[i],
                False,
                now,
            )
            for i, tid in inserts
        ]
        revive_rows = [
            (sealer.key_id, *by_row[i], active[i], expires[i], False, tid) for i, tid in revive
        ]
        stale: list[str] = []
        if replace_existing:
            # One template per subject: the batch's last one for it, as if the records had
            # come one after the other (earlier ones of the batch are written, then removed).
            batch_ids: dict[str, list[str]] = {}
            for ref, tid in zip(refs, ids, strict=True):
                batch_ids.setdefault(ref, []).append(tid)
            for ref, tids in batch_ids.items():
                if len(tids) == 1 and ref not in others:
                    continue  # a new subject with one template: the common case
                for tid in dict.fromkeys([*others.get(ref, []), *tids]):
                    if tid != tids[-1]:
                        stale.append(tid)
        result = AddResult(
            inserted=len(insert_rows) + len(revive_rows),
            unchanged=unchanged,
            replaced=len(stale),
            template_ids=ids,
            subject_refs=refs,
        )
        if not (insert_rows or revive_rows or stale or subject_write.changed):
            return TemplateWrite(result)
        sql = self.sql

        def step(conn: Connection) -> None:
            lock_writers(conn)
            if len(insert_rows) >= BULK_ROWS:
                bulk_cache(conn)
            subject_write(conn)
            count = len(insert_rows) + len(revive_rows) + len(stale)
            first = allocate(conn, count) if count else 0
            if insert_rows:
                conn.exec_driver_sql(
                    sql.insert_template,
                    [(*row, first + k) for k, row in enumerate(insert_rows)],
                )
            base = first + len(insert_rows)
            if revive_rows:
                conn.exec_driver_sql(
                    sql.revive_template,
                    [(base + k, *row) for k, row in enumerate(revive_rows)],
                )
            if stale:
                self._tombstone(conn, stale, base + len(revive_rows))

        return TemplateWrite(result, step)

    def _existing_templates(
        self, conn: Connection, gallery: str, model_id: str, refs: Sequence[str]
    ) -> tuple[dict[tuple[str, bytes], tuple[str, bool]], dict[str, list[str]]]:
        """Templates of these subjects in the gallery: by (subject, content digest) →
        (id, deleted), and each subject's live template ids."""
        existing: dict[tuple[str, bytes], tuple[str, bool]] = {}
        others: dict[str, list[str]] = {}
        for part in chunks(list(refs)):
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
            for row in rows:
                existing[(row.subject_ref, bytes(row.content_mac))] = (
                    str(row.template_id),
                    bool(row.deleted),
                )
                if not row.deleted:
                    others.setdefault(row.subject_ref, []).append(str(row.template_id))
        return existing, others

    def _plan_subject_refs(
        self, conn: Connection, prep: PreparedTemplates
    ) -> tuple[Write, list[str], set[str]]:
        """Each row's subject: found by DNI, created (planned, DNI encrypted beforehand) for a
        new DNI or for the rows naming none, or checked to exist; returns (the write creating
        the new ones, refs, the new refs).

        Raises:
            NotFound: a given ``subject_ref`` does not exist for this owner.
        """
        owner = prep.owner
        named = sorted({m for m in prep.dni_macs if m is not None})
        found = self._subjects_by_dni_mac(conn, owner, named) if named else {}
        given = sorted({r for r in prep.cols.subject_refs if r is not None})
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
        refs: list[str] = []
        new_rows: list[tuple[Any, ...]] = []
        fresh: set[str] = set()
        assert prep.sealer is not None
        now, key_id = _now(), prep.sealer.key_id
        for mac, guess in zip(prep.dni_macs, prep.guess_refs, strict=True):
            ref = found.get(mac, guess) if mac is not None else guess
            refs.append(ref)
            if ref == guess and ref not in fresh and ref not in known:
                fresh.add(ref)
                if mac is not None:
                    nonce, ct = prep.dni_sealed[ref]
                    new_rows.append((ref, owner, mac, key_id, nonce, ct, False, now))
                else:  # the unnamed subject: no DNI
                    new_rows.append((ref, owner, None, None, None, None, False, now))
        write = SubjectWrite(refs, sorted(fresh), new_rows, self.sql.insert_subject)
        return write, refs, fresh

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
            self.template_state_write(live, active=active, expires_at=expires_at)(conn)
            return len(live)

    def template_state_write(
        self, template_ids: Sequence[str], *, active: bool, expires_at: dt.datetime | None
    ) -> Write:
        """Planned :meth:`set_template_state` (ids no longer live when applied are skipped)."""
        ids = list(template_ids)
        values = {"active": active, "expires_at": _epoch(expires_at)}

        def step(conn: Connection) -> None:
            lock_writers(conn)
            self._resequence(conn, self._existing_live(conn, ids), values)

        return Write(step) if ids else Write()

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
            count = len(self._live_templates(conn, [subject_ref]))
            self.remove_subject_write(subject_ref)(conn)
            return count

    def remove_subject_write(self, subject_ref: str) -> Write:
        """Planned :meth:`remove_subject` (removes what is live when applied)."""

        def step(conn: Connection) -> None:
            lock_writers(conn)
            live = self._live_templates(conn, [subject_ref])
            if live:
                self._tombstone(conn, live, allocate(conn, len(live)))
            conn.execute(
                subjects.update()
                .where(subjects.c.subject_ref == subject_ref)
                .values(dni_mac=None, dni_ct=None, nonce=None, key_id=None)
            )

        return Write(step)

    # ---- change log ---------------------------------------------------------------------

    def changes_since(
        self, after: int, *, gallery: str | None = None, limit: int = 10_000
    ) -> list[TemplateChange]:
        """Template changes with ``seq > after``, in ``seq`` order, at most ``limit``.

        Read through the driver's cursor (no per-row processing by SQLAlchemy): the index
        catch-up reads a million rows this way.
        """
        sql = self.sql.changes if gallery is None else self.sql.changes_in_gallery
        params = (after, int(limit)) if gallery is None else (gallery, after, int(limit))
        with self.engine.connect() as conn:
            rows = conn.exec_driver_sql(sql, params).fetchall()
        return [
            TemplateChange(
                int(r[0]),
                r[1],
                r[2],
                r[3],
                r[4],
                r[5],
                r[6],
                None if r[7] is None else bytes(r[7]),
                None if r[8] is None else bytes(r[8]),
                bool(r[9]),
                None if r[10] is None else float(r[10]),
                bool(r[11]),
                bool(r[12]),
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

    def open_templates(
        self, changes: Sequence[TemplateChange]
    ) -> list[npt.NDArray[np.float32] | None]:
        """Decrypt many changes' vectors (``None`` for a removal or a row that fails: wrong
        or destroyed key, moved or altered ciphertext — never indexed)."""
        out: list[npt.NDArray[np.float32] | None] = [None] * len(changes)
        groups: dict[tuple[str, str, str, str], list[int]] = {}
        for i, c in enumerate(changes):
            if not (c.deleted or c.ciphertext is None or c.nonce is None):
                key = (c.owner, str(c.key_id), c.gallery, c.model_id)
                groups.setdefault(key, []).append(i)
        for (owner, key_id, gallery, model_id), rows in groups.items():
            try:
                sealer = self.keyring.sealer(owner, key_id)
            except (KeyManagementError, DecryptionError):
                continue
            aads = encode_bindings(
                "template",
                [changes[i].template_id for i in rows],
                [changes[i].subject_ref for i in rows],
                gallery,
                model_id,
                key_id,
            )
            for i, aad in zip(rows, aads, strict=True):
                c = changes[i]
                try:
                    raw = sealer.open_aad(c.nonce, c.ciphertext, aad)  # type: ignore[arg-type]
                except DecryptionError:
                    continue
                out[i] = np.frombuffer(raw, dtype="<f4")
        return out

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
