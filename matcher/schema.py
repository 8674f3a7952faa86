"""The matcher's tables and their migrations (component ``matcher``).

Invariants (DESIGN.md §4):

* No table holds a template, DNI or plate in clear: ``ciphertext``, ``dni_ct`` and
  ``plate_ct`` are AES-256-GCM ciphertexts; ``dni_mac``, ``plate_mac`` and ``content_mac``
  are HMAC-SHA256 under the owner's index key, for look-up and idempotency only.
* ``seq`` is one change sequence shared by templates and plates, allocated from the single
  row of ``matcher_seq`` inside the writing transaction: the row lock (PostgreSQL) or the
  database write lock (SQLite) is held until commit, so sequence order is commit order and a
  reader that has seen ``seq = n`` will never later see a new change with a smaller ``seq``.
  Every change to a row (insert, state change, removal) gives it a new ``seq``.
* Removal leaves a tombstone (``deleted``, ciphertext erased) so that replay removes it too.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from centinela.storage import Migration, is_sqlite

metadata = sa.MetaData()

meta = sa.Table(
    "matcher_meta",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.String(256), nullable=False),
)

seq = sa.Table(
    "matcher_seq",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("value", sa.BigInteger, nullable=False),
)

data_keys = sa.Table(
    "matcher_data_keys",
    metadata,
    sa.Column("key_id", sa.String(64), primary_key=True),
    sa.Column("owner", sa.String(32), nullable=False, index=True),
    #: "data" (encrypts records) or "index" (HMAC look-ups).
    sa.Column("purpose", sa.String(16), nullable=False),
    sa.Column("kek_id", sa.String(128), nullable=False),
    sa.Column("wrapped", sa.LargeBinary, nullable=False),
    #: "current" (new writes) or "previous" (still decrypts, being re-encrypted away).
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("created_at", sa.String(40), nullable=False),
)

subjects = sa.Table(
    "matcher_subjects",
    metadata,
    sa.Column("subject_ref", sa.String(40), primary_key=True),
    sa.Column("owner", sa.String(32), nullable=False),
    sa.Column("dni_mac", sa.LargeBinary(32), nullable=True),
    sa.Column("key_id", sa.String(64), nullable=True),
    sa.Column("nonce", sa.LargeBinary(12), nullable=True),
    sa.Column("dni_ct", sa.LargeBinary, nullable=True),
    sa.Column("objector", sa.Boolean, nullable=False, default=False),
    sa.Column("created_at", sa.String(40), nullable=False),
    # The keyed digest leads: look-ups by digest use the index whatever the statistics say.
    sa.UniqueConstraint("dni_mac", "owner", name="uq_matcher_subjects_dni"),
)

templates = sa.Table(
    "matcher_templates",
    metadata,
    sa.Column("template_id", sa.String(40), primary_key=True),
    sa.Column("seq", sa.BigInteger, nullable=False, unique=True),
    sa.Column(
        "subject_ref", sa.String(40), sa.ForeignKey("matcher_subjects.subject_ref"), nullable=False
    ),
    sa.Column("gallery", sa.String(64), nullable=False),
    sa.Column("model_id", sa.String(128), nullable=False),
    sa.Column("owner", sa.String(32), nullable=False),
    sa.Column("key_id", sa.String(64), nullable=True),
    sa.Column("nonce", sa.LargeBinary(12), nullable=True),
    sa.Column("ciphertext", sa.LargeBinary, nullable=True),
    sa.Column("content_mac", sa.LargeBinary(32), nullable=False),
    sa.Column("active", sa.Boolean, nullable=False),
    #: Epoch seconds (UTC); NULL = never expires.
    sa.Column("expires_at", sa.Float(precision=53), nullable=True),
    sa.Column("deleted", sa.Boolean, nullable=False),
    sa.Column("created_at", sa.String(40), nullable=False),
    sa.UniqueConstraint(
        "subject_ref", "gallery", "model_id", "content_mac", name="uq_matcher_templates_content"
    ),
    sa.Index("ix_matcher_templates_gallery_seq", "gallery", "seq"),
    sa.Index("ix_matcher_templates_owner_key", "owner", "key_id"),
)

plates = sa.Table(
    "matcher_plates",
    metadata,
    sa.Column("plate_ref", sa.String(40), primary_key=True),
    sa.Column("seq", sa.BigInteger, nullable=False, unique=True),
    sa.Column("owner", sa.String(32), nullable=False),
    sa.Column("plate_mac", sa.LargeBinary(32), nullable=True),
    sa.Column("key_id", sa.String(64), nullable=True),
    sa.Column("nonce", sa.LargeBinary(12), nullable=True),
    sa.Column("plate_ct", sa.LargeBinary, nullable=True),
    sa.Column("active", sa.Boolean, nullable=False),
    sa.Column("deleted", sa.Boolean, nullable=False),
    sa.Column("created_at", sa.String(40), nullable=False),
    sa.UniqueConstraint("plate_mac", "owner", name="uq_matcher_plates_mac"),
)


def _v1(conn: Connection) -> None:
    metadata.create_all(conn, tables=[meta, seq, data_keys, subjects, templates, plates])
    conn.execute(seq.insert().values(id=1, value=0))


MIGRATIONS = [Migration(1, "matcher: keys, subjects, templates, plates, change sequence", _v1)]


def lock_writers(conn: Connection) -> None:
    """Serialise writers until commit (PostgreSQL: row lock on the counter).

    SQLite's ``BEGIN IMMEDIATE`` (``write_transaction``) already holds the write lock.
    """
    if not is_sqlite(conn):
        conn.execute(sa.select(seq.c.value).where(seq.c.id == 1).with_for_update())


def allocate(conn: Connection, count: int) -> int:
    """Reserve ``count`` consecutive change sequence numbers; return the first."""
    conn.execute(seq.update().where(seq.c.id == 1).values(value=seq.c.value + count))
    last = int(conn.execute(sa.select(seq.c.value).where(seq.c.id == 1)).scalar_one())
    return last - count + 1


def chunks(items: Sequence[Any], size: int = 500) -> Iterable[Sequence[Any]]:
    """Slices of at most ``size`` items (keeps IN lists under parameter limits)."""
    for i in range(0, len(items), size):
        yield items[i : i + size]


def bulk_insert(conn: Connection, table: sa.Table, rows: Sequence[dict[str, Any]]) -> None:
    """Insert many rows with one ``executemany`` (psycopg pipelines it; measured cheaper in
    client CPU than one multi-row ``VALUES`` statement)."""
    if not rows:
        return
    conn.execute(table.insert(), list(rows))


def new_ref(prefix: str) -> str:
    """A new reference such as ``sub_0194f2c3a1b7…``: 12 hex digits of the creation time in
    milliseconds, then 80 random bits (unguessable).

    The time prefix keeps the primary-key and subject indexes growing at their right edge
    during a bulk import, instead of touching a random B-tree page for every row (at a
    million rows that is the difference between a few pages and a few thousand pages written
    per batch). It says when a subject or template was stored, which the audit entries say
    anyway; nothing personal.
    """
    return new_refs(prefix, 1)[0]


def new_refs(prefix: str, count: int) -> list[str]:
    """``count`` references as :func:`new_ref` makes them (one call to the random source)."""
    head = f"{prefix}_{time.time_ns() // 1_000_000:012x}"
    pool = secrets.token_hex(10 * count)
    return [head + pool[i * 20 : (i + 1) * 20] for i in range(count)]


_TEMPLATE_COLUMNS = (
    "template_id, subject_ref, gallery, model_id, owner, key_id, nonce, ciphertext, "
    "content_mac, active, expires_at, deleted, created_at, seq"
)
_SUBJECT_COLUMNS = "subject_ref, owner, dni_mac, key_id, nonce, dni_ct, objector, created_at"
_CHANGE_COLUMNS = (
    "t.seq, t.template_id, t.subject_ref, t.gallery, t.model_id, t.owner, t.key_id, t.nonce, "
    "t.ciphertext, t.active, t.expires_at, s.objector, t.deleted"
)


class Statements:
    """The bulk statements, in the driver's own parameter style, for ``exec_driver_sql``:
    bulk writes and the change-log read skip SQLAlchemy's per-row processing."""

    def __init__(self, sqlite: bool) -> None:
        # Only the driver's placeholder is interpolated, never a value.
        mark = "?" if sqlite else "%s"

        def marks(n: int) -> str:
            return ", ".join([mark] * n)

        self.insert_template = (
            f"INSERT INTO matcher_templates ({_TEMPLATE_COLUMNS}) VALUES ({marks(14)})"  # noqa: S608
        )
        self.revive_template = (
            f"UPDATE matcher_templates SET seq = {mark}, key_id = {mark}, nonce = {mark}, "  # noqa: S608
            f"ciphertext = {mark}, active = {mark}, expires_at = {mark}, deleted = {mark} "
            f"WHERE template_id = {mark}"
        )
        self.insert_subject = (
            f"INSERT INTO matcher_subjects ({_SUBJECT_COLUMNS}) VALUES ({marks(8)})"  # noqa: S608
        )
        join = "FROM matcher_templates t JOIN matcher_subjects s ON s.subject_ref = t.subject_ref"
        self.changes = (
            f"SELECT {_CHANGE_COLUMNS} {join} WHERE t.seq > {mark} ORDER BY t.seq LIMIT {mark}"
        )
        self.changes_in_gallery = (
            f"SELECT {_CHANGE_COLUMNS} {join} WHERE t.gallery = {mark} AND t.seq > {mark} "
            f"ORDER BY t.seq LIMIT {mark}"
        )
