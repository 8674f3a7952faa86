"""The audit log's tables: leaves and signed checkpoints, append-only in the database itself.

Invariants (DESIGN.md §6):

* ``audit_leaves`` holds one row per leaf: ``idx`` contiguous from 0, the entry bytes, their
  RFC 9162 leaf hash and the time written. The database rejects UPDATE and DELETE (both
  dialects) and TRUNCATE (PostgreSQL), and an INSERT whose ``idx`` is not exactly the next
  one. On SQLite the contiguity trigger is what stops ``INSERT OR REPLACE``: REPLACE deletes the
  conflicting row without firing DELETE triggers, but the BEFORE INSERT check fires first and
  refuses any index that already exists. PostgreSQL's ``ON CONFLICT DO UPDATE`` hits the UPDATE
  trigger. On PostgreSQL nobody, the owner included, holds UPDATE, DELETE or TRUNCATE on the
  audit tables either, so disabling the triggers is not enough to edit them.
* ``audit_checkpoints`` holds every signed checkpoint (note text verbatim), also append-only;
  the database refuses a checkpoint smaller than an earlier one, a second checkpoint of the
  same size with another root (a split view), and one beyond the number of leaves.
* ``audit_subtrees`` holds the hashes of perfect subtrees at the levels the stored tree keeps
  (:mod:`centinela.audit.stored_tree`): derived data, written in the transaction of the leaf
  that completes each subtree, so it never runs ahead of or behind the leaves; insert-only
  like the rest, and checked against the leaves at every start.
* Only :class:`~centinela.audit.log.AuditLog`'s single writer appends leaves; this module does
  the SQL and nothing else.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from centinela.errors import AppendOnlyViolation, StorageError
from centinela.storage import Migration, is_sqlite, migrate

#: Writes that share an entry's transaction: ``(connection, leaf index) -> None``.
Companion = Callable[[Connection, int], None]


@dataclasses.dataclass(frozen=True)
class Rows:
    """A companion that only inserts rows into one table.

    The writer inserts the rows of every entry of a group commit with one executemany per
    table (see :meth:`LeafStore.append_batch`) instead of one statement per entry: on the
    writer thread, which competes for the GIL with the event loop, that per-entry Python was
    most of the cost of a MatchFace's durable audit (session 3 profile).
    """

    table: sa.Table
    #: The rows for the entry at the given leaf index.
    make: Callable[[int], list[dict[str, Any]]]

    def __call__(self, conn: Connection, index: int) -> None:
        rows = self.make(index)
        if rows:
            conn.execute(self.table.insert(), rows)


@dataclasses.dataclass(frozen=True)
class Companions:
    """Several companions of one entry, run in order (or batched, for :class:`Rows`)."""

    parts: tuple[Companion, ...]

    def __call__(self, conn: Connection, index: int) -> None:
        for part in self.parts:
            part(conn, index)


COMPONENT = "audit"

_SQLITE_V1 = [
    """CREATE TABLE audit_leaves (
        idx INTEGER PRIMARY KEY,
        entry BLOB NOT NULL,
        leaf_hash BLOB NOT NULL CHECK (length(leaf_hash) = 32),
        created_at TEXT NOT NULL
    )""",
    # Covering index: loading every leaf hash at start-up reads 45 bytes a leaf, not the entry.
    "CREATE INDEX audit_leaves_hashes ON audit_leaves (idx, leaf_hash)",
    """CREATE TRIGGER audit_leaves_no_update BEFORE UPDATE ON audit_leaves
       BEGIN SELECT RAISE(ABORT, 'audit_leaves is append-only: UPDATE refused'); END""",
    """CREATE TRIGGER audit_leaves_no_delete BEFORE DELETE ON audit_leaves
       BEGIN SELECT RAISE(ABORT, 'audit_leaves is append-only: DELETE refused'); END""",
    """CREATE TRIGGER audit_leaves_contiguous BEFORE INSERT ON audit_leaves
       WHEN NEW.idx IS NOT (SELECT COALESCE(MAX(idx), -1) + 1 FROM audit_leaves)
       BEGIN SELECT RAISE(ABORT, 'audit_leaves is append-only: idx is not the next index'); END""",
    """CREATE TABLE audit_checkpoints (
        seq INTEGER PRIMARY KEY,
        tree_size INTEGER NOT NULL,
        root_hash BLOB NOT NULL CHECK (length(root_hash) = 32),
        note TEXT NOT NULL,
        created_at TEXT NOT NULL
    )""",
    """CREATE TRIGGER audit_checkpoints_no_update BEFORE UPDATE ON audit_checkpoints
       BEGIN SELECT RAISE(ABORT, 'audit_checkpoints is append-only: UPDATE refused'); END""",
    """CREATE TRIGGER audit_checkpoints_no_delete BEFORE DELETE ON audit_checkpoints
       BEGIN SELECT RAISE(ABORT, 'audit_checkpoints is append-only: DELETE refused'); END""",
    """CREATE TRIGGER audit_checkpoints_guard BEFORE INSERT ON audit_checkpoints
       WHEN NEW.seq IS NOT (SELECT COALESCE(MAX(seq), -1) + 1 FROM audit_checkpoints)
         OR EXISTS (SELECT 1 FROM audit_checkpoints WHERE tree_size > NEW.tree_size)
         OR EXISTS (SELECT 1 FROM audit_checkpoints
                    WHERE tree_size = NEW.tree_size AND root_hash <> NEW.root_hash)
         OR NEW.tree_size > (SELECT COALESCE(MAX(idx), -1) + 1 FROM audit_leaves)
       BEGIN SELECT RAISE(ABORT, 'audit_checkpoints: rollback, split view or gap refused'); END""",
]

_PG_V1 = [
    """CREATE TABLE audit_leaves (
        idx BIGINT PRIMARY KEY,
        entry BYTEA NOT NULL,
        leaf_hash BYTEA NOT NULL CHECK (length(leaf_hash) = 32),
        created_at TEXT NOT NULL
    )""",
    "CREATE INDEX audit_leaves_hashes ON audit_leaves (idx) INCLUDE (leaf_hash)",
    """CREATE TABLE audit_checkpoints (
        seq BIGINT PRIMARY KEY,
        tree_size BIGINT NOT NULL,
        root_hash BYTEA NOT NULL CHECK (length(root_hash) = 32),
        note TEXT NOT NULL,
        created_at TEXT NOT NULL
    )""",
    """CREATE FUNCTION audit_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
       BEGIN
         RAISE EXCEPTION USING
           MESSAGE = TG_TABLE_NAME || ' is append-only: ' || TG_OP || ' refused',
           ERRCODE = 'integrity_constraint_violation';
       END $$""",
    """CREATE FUNCTION audit_leaves_next() RETURNS trigger LANGUAGE plpgsql AS $$
       BEGIN
         IF NEW.idx IS DISTINCT FROM
            (SELECT COALESCE(MAX(idx), -1) + 1 FROM audit_leaves) THEN
           RAISE EXCEPTION 'audit_leaves is append-only: idx is not the next index'
             USING ERRCODE = 'integrity_constraint_violation';
         END IF;
         RETURN NEW;
       END $$""",
    """CREATE FUNCTION audit_checkpoints_guard() RETURNS trigger LANGUAGE plpgsql AS $$
       BEGIN
         IF NEW.seq IS DISTINCT FROM (SELECT COALESCE(MAX(seq), -1) + 1 FROM audit_checkpoints)
            OR EXISTS (SELECT 1 FROM audit_checkpoints WHERE tree_size > NEW.tree_size)
            OR EXISTS (SELECT 1 FROM audit_checkpoints
                       WHERE tree_size = NEW.tree_size AND root_hash <> NEW.root_hash)
            OR NEW.tree_size > (SELECT COALESCE(MAX(idx), -1) + 1 FROM audit_leaves) THEN
           RAISE EXCEPTION 'audit_checkpoints: rollback, split view or gap refused'
             USING ERRCODE = 'integrity_constraint_violation';
         END IF;
         RETURN NEW;
       END $$""",
    """CREATE TRIGGER audit_leaves_no_change BEFORE UPDATE OR DELETE ON audit_leaves
       FOR EACH ROW EXECUTE FUNCTION audit_refuse_change()""",
    """CREATE TRIGGER audit_leaves_no_truncate BEFORE TRUNCATE ON audit_leaves
       FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse_change()""",
    """CREATE TRIGGER audit_leaves_contiguous BEFORE INSERT ON audit_leaves
       FOR EACH ROW EXECUTE FUNCTION audit_leaves_next()""",
    """CREATE TRIGGER audit_checkpoints_no_change BEFORE UPDATE OR DELETE ON audit_checkpoints
       FOR EACH ROW EXECUTE FUNCTION audit_refuse_change()""",
    """CREATE TRIGGER audit_checkpoints_no_truncate BEFORE TRUNCATE ON audit_checkpoints
       FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse_change()""",
    """CREATE TRIGGER audit_checkpoints_guard BEFORE INSERT ON audit_checkpoints
       FOR EACH ROW EXECUTE FUNCTION audit_checkpoints_guard()""",
]


def _create_v1(conn: Connection) -> None:
    for stmt in _SQLITE_V1 if is_sqlite(conn) else _PG_V1:
        conn.exec_driver_sql(stmt)


# PostgreSQL privileges, the second layer (DESIGN.md §6): nobody, the tables' owner included,
# holds UPDATE, DELETE or TRUNCATE on the audit tables. A role that owns a table may disable
# its triggers; with these privileges gone, an UPDATE or DELETE behind disabled triggers is
# still refused. (An owner can grant them back and a superuser bypasses privileges: deploy
# the server with a runtime role that does not own the tables; see docs/audit.md.)
_PG_V2 = [
    "REVOKE UPDATE, DELETE, TRUNCATE ON audit_leaves, audit_checkpoints FROM PUBLIC",
    "REVOKE UPDATE, DELETE, TRUNCATE ON audit_leaves, audit_checkpoints FROM CURRENT_USER",
]


def _privileges_v2(conn: Connection) -> None:
    if not is_sqlite(conn):
        for stmt in _PG_V2:
            conn.exec_driver_sql(stmt)


_SQLITE_V3 = [
    """CREATE TABLE audit_subtrees (
        level INTEGER NOT NULL CHECK (level > 0),
        idx INTEGER NOT NULL CHECK (idx >= 0),
        hash BLOB NOT NULL CHECK (length(hash) = 32),
        PRIMARY KEY (level, idx)
    ) WITHOUT ROWID""",
    """CREATE TRIGGER audit_subtrees_no_update BEFORE UPDATE ON audit_subtrees
       BEGIN SELECT RAISE(ABORT, 'audit_subtrees is append-only: UPDATE refused'); END""",
    """CREATE TRIGGER audit_subtrees_no_delete BEFORE DELETE ON audit_subtrees
       BEGIN SELECT RAISE(ABORT, 'audit_subtrees is append-only: DELETE refused'); END""",
]

_PG_V3 = [
    """CREATE TABLE audit_subtrees (
        level SMALLINT NOT NULL CHECK (level > 0),
        idx BIGINT NOT NULL CHECK (idx >= 0),
        hash BYTEA NOT NULL CHECK (length(hash) = 32),
        PRIMARY KEY (level, idx)
    )""",
    """CREATE TRIGGER audit_subtrees_no_change BEFORE UPDATE OR DELETE ON audit_subtrees
       FOR EACH ROW EXECUTE FUNCTION audit_refuse_change()""",
    """CREATE TRIGGER audit_subtrees_no_truncate BEFORE TRUNCATE ON audit_subtrees
       FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse_change()""",
    "REVOKE UPDATE, DELETE, TRUNCATE ON audit_subtrees FROM PUBLIC",
    "REVOKE UPDATE, DELETE, TRUNCATE ON audit_subtrees FROM CURRENT_USER",
]


def _create_subtrees_v3(conn: Connection) -> None:
    for stmt in _SQLITE_V3 if is_sqlite(conn) else _PG_V3:
        conn.exec_driver_sql(stmt)


MIGRATIONS = [
    Migration(1, "audit leaves and checkpoints, append-only", _create_v1),
    Migration(2, "PostgreSQL: no UPDATE, DELETE or TRUNCATE on audit tables", _privileges_v2),
    # Existing logs get their subtree hashes at the next start (StoredTree.load backfills).
    Migration(3, "audit subtree hashes: the Merkle tree on disk", _create_subtrees_v3),
]


@dataclasses.dataclass(frozen=True, slots=True)
class StoredCheckpoint:
    """A row of ``audit_checkpoints``."""

    seq: int
    tree_size: int
    root_hash: bytes
    note: str
    created_at: str


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _is_append_only_refusal(exc: BaseException) -> bool:
    text = str(exc)
    return "append-only" in text or "split view" in text


class ConnectionLost(StorageError):
    """The connection had ended before the transaction's COMMIT was sent (a database
    restart, a session the server terminated): nothing of the batch was committed, so it
    may be appended again on a new connection."""


def _append_failed(exc: Exception) -> AppendOnlyViolation | StorageError:
    """What a failed append raises: the store's refusal of the index, or a database error."""
    if _is_append_only_refusal(exc):
        return AppendOnlyViolation("the store refused the next leaf index")
    return StorageError(f"audit append failed: {exc.__class__.__name__}")


class LeafStore:
    """SQL access to the audit tables. Create it, call :meth:`migrate`, then use it.

    Writes go through :meth:`append_batch` on a connection the caller holds (the log's writer
    keeps one open); reads check out a pooled connection each.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.sqlite = is_sqlite(engine)
        # Only the driver's placeholder is interpolated into these statements, never a value.
        mark = self._mark = "?" if self.sqlite else "%s"
        self._insert_leaf = (
            "INSERT INTO audit_leaves (idx, entry, leaf_hash, created_at) "  # noqa: S608
            f"VALUES ({mark}, {mark}, {mark}, {mark})"
        )
        self._insert_subtree = (
            "INSERT INTO audit_subtrees (level, idx, hash) "  # noqa: S608
            f"VALUES ({mark}, {mark}, {mark})"
        )
        self._insert_cp = (
            "INSERT INTO audit_checkpoints (seq, tree_size, root_hash, note, created_at) "  # noqa: S608
            f"VALUES ({mark}, {mark}, {mark}, {mark}, {mark})"
        )
        #: Driver-level INSERTs of companion rows, per table and column set.
        self._row_inserts: dict[tuple[sa.Table, tuple[str, ...]], _RowInsert] = {}

    def migrate(self) -> None:
        """Create or upgrade the audit tables.

        Raises:
            StorageError: the database failed.
        """
        migrate(self.engine, COMPONENT, MIGRATIONS)

    # --- writes --------------------------------------------------------------------------

    def append_batch(
        self,
        conn: Connection,
        first_index: int,
        rows: Sequence[tuple[bytes, bytes]],
        companions: Sequence[Companion | None] = (),
        subtrees: Sequence[tuple[int, int, bytes]] = (),
    ) -> None:
        """Insert ``(entry, leaf_hash)`` rows at ``first_index``… in one durable transaction.

        ``subtrees`` are the ``(level, index, hash)`` rows of the perfect subtrees these
        leaves complete (see :mod:`centinela.audit.stored_tree`), written in the same
        transaction.

        ``companions[i]``, when given, runs inside the same transaction with the connection
        and the index of row ``i``: rows that must exist if and only if the entry does
        (an alert raised by the decision, the stored answer of an idempotent request).
        Companions run in entry order, except that the rows of :class:`Rows` companions
        (made in that order, so they may depend on what an entry's earlier parts did) are
        inserted last, one executemany per table in the order the tables first appear
        (nested :class:`Companions` flattened). When every part is :class:`Rows` the
        transaction goes through the driver directly (:meth:`_append_driver`).

        Raises:
            AppendOnlyViolation: the database refused an index (someone else appended).
            ConnectionLost: the connection had ended before COMMIT was sent (through the
                driver only); nothing of the batch was written.
            StorageError: the database failed; nothing of the batch was written.
        """
        now = _now()
        params = [(first_index + i, e, h, now) for i, (e, h) in enumerate(rows)]
        if all(_rows_only(c) for c in companions):
            self._append_driver(conn, params, subtrees, _companion_rows(first_index, companions))
            return
        try:
            if self.sqlite:
                conn = conn.execution_options(sqlite_begin="IMMEDIATE")
            with conn.begin():
                conn.exec_driver_sql(self._insert_leaf, params)
                if subtrees:
                    conn.exec_driver_sql(self._insert_subtree, list(subtrees))
                for table, made in _companion_rows(first_index, companions, conn).items():
                    if made:
                        conn.execute(table.insert(), made)
        except sa.exc.SQLAlchemyError as exc:
            raise _append_failed(exc) from exc

    def _append_driver(
        self,
        conn: Connection,
        params: list[tuple[int, bytes, bytes, str]],
        subtrees: Sequence[tuple[int, int, bytes]],
        made: dict[sa.Table, list[dict[str, Any]]],
    ) -> None:
        """:meth:`append_batch`'s transaction through the DB-API driver itself, when every
        companion is :class:`Rows` (as those of MatchFace, MatchPlate and StreamMatch are).

        The same statements in the same order, without SQLAlchemy's transaction, event and
        statement layers. A one-entry commit with an alert and a stored answer costs the
        writer 1.7-1.8x the CPU through them on SQLite (0.39 against 0.23 ms) and 1.25-1.35x
        on PostgreSQL (1.04 against 0.83 ms; ``benchmarks/audit_append.py``, two runs), CPU
        spent holding the GIL the event loop needs. Values pass the columns' own bind
        processors, so what is stored is what SQLAlchemy would have stored.
        """
        batches = [self._row_insert(table, rows) for table, rows in made.items() if rows]
        raw: Any = conn.connection.dbapi_connection
        error: type[Exception] = self.engine.dialect.loaded_dbapi.Error
        committing = False
        try:
            cur = raw.cursor()
            try:
                if self.sqlite:  # make_engine runs pysqlite without implicit transactions
                    cur.execute("BEGIN IMMEDIATE")
                cur.executemany(self._insert_leaf, params)
                if subtrees:
                    cur.executemany(self._insert_subtree, list(subtrees))
                for sql, values in batches:
                    cur.executemany(sql, values)
                committing = True
                raw.commit()
            except BaseException:
                with contextlib.suppress(error):  # a broken connection: the writer drops it
                    raw.rollback()
                raise
            finally:
                cur.close()
        except error as exc:
            # psycopg's ``broken``: the connection ended abnormally. A failed COMMIT may or
            # may not have committed, so only a failure before it is safe to repeat.
            if not committing and getattr(raw, "broken", False):
                raise ConnectionLost(f"the connection had ended ({type(exc).__name__})") from exc
            raise _append_failed(exc) from exc

    def _row_insert(
        self, table: sa.Table, rows: list[dict[str, Any]]
    ) -> tuple[str, list[tuple[Any, ...]]]:
        """The driver INSERT of ``rows`` into ``table`` and their bound values."""
        cols = tuple(rows[0])
        insert = self._row_inserts.get((table, cols))
        if insert is None:
            insert = _RowInsert.of(self.engine, table, cols, self._mark)
            self._row_inserts[(table, cols)] = insert
        return insert.sql, [insert.values(row) for row in rows]

    def add_checkpoint(self, tree_size: int, root_hash: bytes, note: str) -> StoredCheckpoint:
        """Record a signed checkpoint.

        Raises:
            AppendOnlyViolation: the database refused it (rollback, split view, gap).
            StorageError: the database failed.
        """
        now = _now()
        try:
            with self.engine.connect() as conn:
                if self.sqlite:
                    conn = conn.execution_options(sqlite_begin="IMMEDIATE")
                with conn.begin():
                    seq = conn.exec_driver_sql(
                        "SELECT COALESCE(MAX(seq), -1) + 1 FROM audit_checkpoints"
                    ).scalar_one()
                    conn.exec_driver_sql(
                        self._insert_cp, [(int(seq), tree_size, root_hash, note, now)]
                    )
        except sa.exc.SQLAlchemyError as exc:
            if _is_append_only_refusal(exc):
                raise AppendOnlyViolation("the store refused the checkpoint") from exc
            raise StorageError(f"audit checkpoint write failed: {exc.__class__.__name__}") from exc
        return StoredCheckpoint(int(seq), tree_size, root_hash, note, now)

    # --- reads ---------------------------------------------------------------------------

    def size(self) -> int:
        """Number of leaves stored (the next index)."""
        try:
            with self.engine.connect() as conn:
                n = conn.exec_driver_sql(
                    "SELECT COALESCE(MAX(idx), -1) + 1 FROM audit_leaves"
                ).scalar_one()
            return int(n)
        except sa.exc.SQLAlchemyError as exc:
            raise StorageError(f"audit size read failed: {exc.__class__.__name__}") from exc

    def add_subtrees(self, rows: Sequence[tuple[int, int, bytes]]) -> None:
        """Insert ``(level, index, hash)`` subtree rows in a transaction of their own.

        Only for subtrees the stored leaves already complete (a log from before the table
        existed, filled in at start): the writer stores new ones with their leaves.

        Raises:
            AppendOnlyViolation: a row at that position exists already.
            StorageError: the database failed.
        """
        if not rows:
            return
        try:
            with self.engine.connect() as conn:
                if self.sqlite:
                    conn = conn.execution_options(sqlite_begin="IMMEDIATE")
                with conn.begin():
                    conn.exec_driver_sql(self._insert_subtree, list(rows))
        except sa.exc.IntegrityError as exc:
            raise AppendOnlyViolation("the store already holds one of these subtrees") from exc
        except sa.exc.SQLAlchemyError as exc:
            raise StorageError(f"audit subtree write failed: {exc.__class__.__name__}") from exc

    def count(self, level: int) -> int:
        """Number of stored nodes at ``level`` (0: leaves), as the next index."""
        if level == 0:
            return self.size()
        try:
            with self.engine.connect() as conn:
                n = conn.exec_driver_sql(
                    "SELECT COALESCE(MAX(idx), -1) + 1 FROM audit_subtrees "  # noqa: S608
                    f"WHERE level = {self._mark}",
                    (level,),
                ).scalar_one()
            return int(n)
        except sa.exc.SQLAlchemyError as exc:
            raise StorageError(f"audit subtree read failed: {exc.__class__.__name__}") from exc

    def iter_packed(
        self, level: int, start: int, end: int | None = None, chunk: int = 200_000
    ) -> Iterator[bytes]:
        """Stored hashes at ``level`` (0: the leaf hashes) from ``start`` on, in chunks.

        Each chunk is up to ``chunk`` hashes concatenated, 32 bytes each, in index order; the
        chunks stop at ``end`` (exclusive) or where the stored nodes end, whichever is first.
        Reads through the driver's cursor (the leaves' covering index: a million leaf hashes
        in about a second on SQLite).

        Raises:
            AppendOnlyViolation: the stored indexes have a gap (rows were removed), or a
                hash is not 32 bytes.
            StorageError: the database failed.
        """
        mark = self._mark
        if level == 0:
            sql = (
                "SELECT idx, leaf_hash FROM audit_leaves "  # noqa: S608 - placeholders only
                f"WHERE idx >= {mark} AND idx < {mark} ORDER BY idx LIMIT {int(chunk)}"
            )
            where: tuple[int, ...] = ()
        else:
            sql = (
                "SELECT idx, hash FROM audit_subtrees "  # noqa: S608 - placeholders only
                f"WHERE level = {mark} AND idx >= {mark} AND idx < {mark} "
                f"ORDER BY idx LIMIT {int(chunk)}"
            )
            where = (level,)
        stop = (1 << 62) if end is None else end
        expected = start
        try:
            with self.engine.connect() as conn:
                cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
                try:
                    while expected < stop:
                        cursor.execute(sql, (*where, expected, stop))
                        rows = cursor.fetchall()
                        if not rows:
                            break
                        if rows[0][0] != expected or rows[-1][0] != expected + len(rows) - 1:
                            raise AppendOnlyViolation(
                                f"stored audit hashes of level {level} have a gap after {expected}"
                            )
                        out = b"".join([bytes(r[1]) for r in rows])
                        if len(out) != len(rows) * 32:
                            raise AppendOnlyViolation("a stored audit hash is not 32 bytes")
                        expected += len(rows)
                        yield out
                finally:
                    cursor.close()
        except AppendOnlyViolation:
            raise
        except Exception as exc:  # SQLAlchemy's or, through the raw cursor, the driver's
            raise StorageError(f"audit hash read failed: {exc.__class__.__name__}") from exc

    def packed(self, level: int, start: int, end: int | None = None) -> bytes:
        """Stored hashes at ``level`` in ``[start, end)`` concatenated (see :meth:`iter_packed`)."""
        return b"".join(self.iter_packed(level, start, end))

    def packed_leaf_hashes(self, start: int = 0, end: int | None = None) -> bytes:
        """Leaf hashes from ``start`` to ``end`` (default: the last), concatenated."""
        return self.packed(0, start, end)

    def iter_entries(self, start: int, end: int, chunk: int = 10_000) -> Iterator[bytes]:
        """Entry bytes for indexes ``[start, end)``, in order.

        Raises:
            AppendOnlyViolation: an index in the range is missing.
            StorageError: the database failed.
        """
        mark = self._mark
        pos = start
        try:
            with self.engine.connect() as conn:
                while pos < end:
                    stop = min(end, pos + chunk)
                    rows = conn.exec_driver_sql(
                        "SELECT idx, entry FROM audit_leaves "  # noqa: S608
                        f"WHERE idx >= {mark} AND idx < {mark} ORDER BY idx",
                        (pos, stop),
                    ).fetchall()
                    for idx, entry in rows:
                        if idx != pos:
                            raise AppendOnlyViolation(f"audit leaf {pos} is missing")
                        yield bytes(entry)
                        pos += 1
                    if pos != stop:
                        raise AppendOnlyViolation(f"audit leaf {pos} is missing")
        except sa.exc.SQLAlchemyError as exc:
            raise StorageError(f"audit entry read failed: {exc.__class__.__name__}") from exc

    def entries(self, start: int, end: int) -> list[bytes]:
        """Entry bytes for indexes ``[start, end)``."""
        return list(self.iter_entries(start, end))

    def checkpoints(self) -> list[StoredCheckpoint]:
        """All stored checkpoints, oldest first."""
        try:
            with self.engine.connect() as conn:
                rows = conn.exec_driver_sql(
                    "SELECT seq, tree_size, root_hash, note, created_at FROM audit_checkpoints "
                    "ORDER BY seq"
                ).fetchall()
        except sa.exc.SQLAlchemyError as exc:
            raise StorageError(f"audit checkpoint read failed: {exc.__class__.__name__}") from exc
        return [
            StoredCheckpoint(int(r[0]), int(r[1]), bytes(r[2]), str(r[3]), str(r[4])) for r in rows
        ]

    def latest_checkpoint(self) -> StoredCheckpoint | None:
        """The most recent stored checkpoint, if any."""
        try:
            with self.engine.connect() as conn:
                r = conn.exec_driver_sql(
                    "SELECT seq, tree_size, root_hash, note, created_at FROM audit_checkpoints "
                    "ORDER BY seq DESC LIMIT 1"
                ).first()
        except sa.exc.SQLAlchemyError as exc:
            raise StorageError(f"audit checkpoint read failed: {exc.__class__.__name__}") from exc
        if r is None:
            return None
        return StoredCheckpoint(int(r[0]), int(r[1]), bytes(r[2]), str(r[3]), str(r[4]))


@dataclasses.dataclass(frozen=True)
class _RowInsert:
    """A driver-level INSERT of one column set into one table, with each column's bind
    processor (``None`` where the driver takes the value as it is)."""

    sql: str
    cols: tuple[str, ...]
    processors: tuple[Callable[[Any], Any] | None, ...]

    @classmethod
    def of(cls, engine: Engine, table: sa.Table, cols: tuple[str, ...], mark: str) -> _RowInsert:
        dialect = engine.dialect
        quote = dialect.identifier_preparer.quote
        sql = (
            f"INSERT INTO {dialect.identifier_preparer.format_table(table)} "  # noqa: S608
            f"({', '.join(quote(c) for c in cols)}) VALUES ({', '.join(mark for _ in cols)})"
        )
        types = [table.c[c].type for c in cols]  # KeyError: a column the table lacks
        return cls(sql, cols, tuple(t.dialect_impl(dialect).bind_processor(dialect) for t in types))

    def values(self, row: dict[str, Any]) -> tuple[Any, ...]:
        if len(row) != len(self.cols):  # a missing column is a KeyError below
            raise ValueError("companion rows of one table must share their columns")
        return tuple(
            row[c] if p is None else p(row[c])
            for c, p in zip(self.cols, self.processors, strict=True)
        )


def _parts(companion: Companion | None) -> Iterator[Companion]:
    """A companion's parts in order, nested :class:`Companions` flattened."""
    if isinstance(companion, Companions):
        for part in companion.parts:
            yield from _parts(part)
    elif companion is not None:
        yield companion


def _rows_only(companion: Companion | None) -> bool:
    return all(isinstance(part, Rows) for part in _parts(companion))


def _companion_rows(
    first_index: int, companions: Sequence[Companion | None], conn: Connection | None = None
) -> dict[sa.Table, list[dict[str, Any]]]:
    """Run the companions' own parts on ``conn`` in entry order and make their :class:`Rows`
    (each after its entry's earlier parts ran); return the rows per table, in the order the
    tables first appear. Without ``conn`` every part must be :class:`Rows`."""
    grouped: dict[sa.Table, list[dict[str, Any]]] = {}
    for i, companion in enumerate(companions):
        for part in _parts(companion):
            if isinstance(part, Rows):  # made now, after the entry's earlier parts ran
                grouped.setdefault(part.table, []).extend(part.make(first_index + i))
            elif conn is None:
                raise TypeError("a companion that is not Rows needs the connection")
            else:
                part(conn, first_index + i)
    return grouped
