"""The leaf and checkpoint tables refuse, by themselves, anything but appending."""

from __future__ import annotations

import hashlib

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from centinela.audit.store import LeafStore
from centinela.errors import AppendOnlyViolation
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
