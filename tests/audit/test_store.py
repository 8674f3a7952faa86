"""The leaf and checkpoint tables refuse, by themselves, anything but appending."""

from __future__ import annotations

import datetime as dt
import hashlib

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from centinela.audit.store import Companions, LeafStore, Rows
from centinela.errors import AppendOnlyViolation, StorageError
from centinela.storage import is_sqlite

H = hashlib.sha256(b"x").digest()


@pytest.fixture
def store(engine: Engine) -> LeafStore:
    s = LeafStore(engine)
    s.migrate()
    s.migrate()  # idempotent
    with engine.connect() as conn:
        s.append_batch(conn, 0, [(b'{"a":1}', H), (b'{"a":2}', H)])
    return s


def _insert(engine: Engine, idx: int) -> None:
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO audit_leaves (idx, entry, leaf_hash, created_at) "
                "VALUES (:i, :e, :h, 't')"
            ),
            {"i": idx, "e": b"{}", "h": H},
        )


def test_append_and_read(store: LeafStore) -> None:
    assert store.size() == 2
    assert store.entries(0, 2) == [b'{"a":1}', b'{"a":2}']
    assert store.packed_leaf_hashes() == H + H


def test_companion_rows_of_a_batch_are_inserted_together_after_earlier_parts(
    store: LeafStore, engine: Engine
) -> None:
    """Rows companions of a group commit go in one executemany per table, each made after
    its entry's earlier parts ran (a stored answer may depend on them); a failing part
    leaves nothing of the batch."""
    meta = sa.MetaData()
    side = sa.Table("t_side", meta, sa.Column("idx", sa.Integer), sa.Column("note", sa.Text))
    meta.create_all(engine)
    seen: list[int] = []

    def apply(_conn: sa.Connection, index: int) -> None:
        seen.append(index)

    def entry(k: int) -> Companions:
        return Companions(
            (apply, Rows(side, lambda index: [{"idx": index, "note": f"after {seen[-1]}"}]))
        )

    with engine.connect() as conn:
        store.append_batch(conn, 2, [(b"{}", H)] * 3, [entry(0), None, entry(2)])
    with engine.connect() as conn:
        rows = conn.execute(sa.select(side.c.idx, side.c.note).order_by(side.c.idx)).all()
    assert [tuple(r) for r in rows] == [(2, "after 2"), (4, "after 4")]

    def broken(_conn: sa.Connection, _index: int) -> None:
        raise sa.exc.OperationalError("insert", {}, Exception("disk gone"))

    with pytest.raises(StorageError), engine.connect() as conn:
        store.append_batch(conn, 5, [(b"{}", H)] * 2, [entry(0), broken])
    assert store.size() == 5
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(side)).scalar_one() == 2


def test_next_index_is_accepted_gap_and_reuse_are_refused(store: LeafStore) -> None:
    _insert(store.engine, 2)
    for idx in (2, 4, 0, -1):
        with pytest.raises(sa.exc.DatabaseError, match="append-only"):
            _insert(store.engine, idx)
    with store.engine.connect() as conn, pytest.raises(AppendOnlyViolation):
        store.append_batch(conn, 1, [(b"{}", H)])
    assert store.size() == 3


def test_update_is_refused(store: LeafStore) -> None:
    with pytest.raises(sa.exc.DatabaseError, match="append-only"), store.engine.begin() as conn:
        conn.execute(sa.text("UPDATE audit_leaves SET entry = :e WHERE idx = 0"), {"e": b"{}"})
    assert store.entries(0, 1) == [b'{"a":1}']


def test_delete_is_refused(store: LeafStore) -> None:
    with pytest.raises(sa.exc.DatabaseError, match="append-only"), store.engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM audit_leaves WHERE idx = 1"))
    assert store.size() == 2


def test_truncate_is_refused_on_postgres(store: LeafStore) -> None:
    if is_sqlite(store.engine):
        pytest.skip("SQLite has no TRUNCATE (its DELETE without WHERE is refused above)")
    with pytest.raises(sa.exc.DatabaseError, match="append-only"), store.engine.begin() as conn:
        conn.execute(sa.text("TRUNCATE audit_leaves"))
    assert store.size() == 2


def test_checkpoints_refuse_rollback_split_view_and_gap(store: LeafStore) -> None:
    other = hashlib.sha256(b"y").digest()
    store.add_checkpoint(1, H, "note-1\n")
    store.add_checkpoint(2, H, "note-2\n")
    store.add_checkpoint(2, H, "note-2-again\n")  # same size and root: harmless
    with pytest.raises(AppendOnlyViolation):
        store.add_checkpoint(1, H, "rollback\n")
    with pytest.raises(AppendOnlyViolation):
        store.add_checkpoint(2, other, "split view\n")
    with pytest.raises(AppendOnlyViolation):
        store.add_checkpoint(5, H, "beyond the leaves\n")
    assert [c.tree_size for c in store.checkpoints()] == [1, 2, 2]
    latest = store.latest_checkpoint()
    assert latest is not None
    assert latest.note == "note-2-again\n"
    with pytest.raises(sa.exc.DatabaseError, match="append-only"), store.engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM audit_checkpoints"))
    with pytest.raises(sa.exc.DatabaseError, match="append-only"), store.engine.begin() as conn:
        conn.execute(sa.text("UPDATE audit_checkpoints SET note = 'x'"))


def _typed_side(engine: Engine) -> sa.Table:
    meta = sa.MetaData()
    side = sa.Table(
        "t_typed",
        meta,
        sa.Column("idx", sa.BigInteger, primary_key=True),
        sa.Column("name", sa.String(32), nullable=False),
        sa.Column("blob", sa.LargeBinary, nullable=False),
        sa.Column("score", sa.Float, nullable=False),
        sa.Column("at", sa.DateTime, nullable=False),  # a bind processor on SQLite
    )
    meta.create_all(engine)
    return side


def _side_row(index: int) -> dict[str, object]:
    return {
        "idx": index,
        "name": f"row {index}",
        "blob": bytes([index % 256]) * 3,
        "score": 0.25 + index,
        # Whole seconds: sqlite3's own adapter would store "…10:00:00", SQLAlchemy's
        # "…10:00:00.000000"; a path that skipped the column's bind processor shows.
        "at": dt.datetime(2026, 12, 3, 10, 0, 0),
    }


def _typed_rows(index: int) -> list[dict[str, object]]:
    return [_side_row(index)]


def test_rows_only_batches_store_what_the_general_path_stores(
    store: LeafStore, engine: Engine
) -> None:
    """A batch whose companions are all Rows is written through the driver (the MatchFace
    path); one with a part of its own goes through SQLAlchemy. Both must store
    the same values, bind processors (DateTime) included, byte for byte."""
    side = _typed_side(engine)

    def noop(_conn: sa.Connection, _index: int) -> None:
        pass

    rows_only = Companions((Companions((Rows(side, _typed_rows),)),))  # as Pipeline.commit nests
    general = Companions((noop, Rows(side, _typed_rows)))

    with engine.connect() as conn:
        store.append_batch(conn, 2, [(b"{}", H)] * 2, [rows_only, rows_only])
        store.append_batch(conn, 4, [(b"{}", H)] * 2, [general, general])
    assert store.size() == 6
    with engine.connect() as conn:
        stored = conn.execute(
            sa.text("SELECT idx, name, blob, score, CAST(at AS TEXT) FROM t_typed ORDER BY idx")
        ).all()
    by_path = [tuple(r)[1:] for r in stored]
    expected = [_side_row(i) for i in range(2, 6)]
    assert [r[0] for r in stored] == [2, 3, 4, 5]
    assert [(n, bytes(b), s) for n, b, s, _ in by_path] == [
        (e["name"], e["blob"], e["score"]) for e in expected
    ]
    texts = [str(r[3]) for r in by_path]
    assert texts == [texts[-1]] * 4  # the last two took the general path
    if is_sqlite(engine):
        assert texts[-1] == "2026-12-03 10:00:00.000000"


def test_a_failing_rows_only_batch_leaves_nothing_and_the_connection_usable(
    store: LeafStore, engine: Engine
) -> None:
    side = _typed_side(engine)
    with engine.connect() as conn:
        store.append_batch(conn, 2, [(b"{}", H)], [Rows(side, lambda i: [_side_row(7)])])
        with pytest.raises(StorageError):  # the second row repeats the primary key 7
            store.append_batch(
                conn,
                3,
                [(b"{}", H)] * 2,
                [Rows(side, lambda i: [_side_row(8)]), Rows(side, lambda i: [_side_row(7)])],
            )
        assert store.size() == 3
        store.append_batch(conn, 3, [(b"{}", H)], [Rows(side, _typed_rows)])
    assert store.size() == 4
    with engine.connect() as conn:
        idx = conn.execute(sa.select(side.c.idx).order_by(side.c.idx)).scalars().all()
    assert idx == [3, 7]
    with engine.connect() as conn, pytest.raises(AppendOnlyViolation):
        store.append_batch(conn, 1, [(b"{}", H)], [Rows(side, lambda i: [_side_row(9)])])


def test_a_matchface_shaped_batch_issues_no_sqlalchemy_statement(
    store: LeafStore, engine: Engine
) -> None:
    """The driver path is the point of the Rows-only case: SQLAlchemy's layers cost ~40 % of
    the writer's CPU per commit on SQLite (20-25 % on PostgreSQL), on the thread that
    competes with the event loop for the GIL."""
    side = _typed_side(engine)
    statements: list[str] = []

    def seen(*args: object) -> None:
        statements.append(str(args[2]))

    with engine.connect() as conn:
        sa.event.listen(engine, "before_cursor_execute", seen)
        try:
            store.append_batch(
                conn, 2, [(b"{}", H)], [Companions((Companions((Rows(side, _typed_rows),)),))]
            )
        finally:
            sa.event.remove(engine, "before_cursor_execute", seen)
    assert statements == []
    assert store.size() == 3
    with engine.connect() as conn:
        assert conn.execute(sa.select(side.c.idx)).scalars().all() == [2]
