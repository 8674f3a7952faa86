"""Idempotency records: one answer per (caller, request id), refused on reuse, pruned after
their retention, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest

from centinela.errors import FailedPrecondition, StorageError
from centinela.server.idempotency import RETENTION, IdempotencyStore, current_key
from centinela.storage import make_engine, write_transaction


def _store_answer(store: IdempotencyStore, index: int) -> bytes:
    """What the audit writer does: the answer commits with the entry (at ``index``)."""
    key = current_key()
    assert key is not None
    with write_transaction(store.engine) as conn:
        IdempotencyStore.companion(key, lambda i: b"answer-%d" % i)(conn, index)
    return b"answer-%d" % index


def test_answer_stored_reused_refused_and_pruned(db_url: str) -> None:
    store = IdempotencyStore(make_engine(db_url))
    calls = 0

    async def compute() -> bytes:
        nonlocal calls
        calls += 1
        return _store_answer(store, 7)

    async def scenario() -> None:
        assert await store.run("muni", "req-00000001", "MatchFace", compute, b"A") == (
            b"answer-7",
            False,
        )
        assert await store.run("muni", "req-00000001", "MatchFace", compute, b"A") == (
            b"answer-7",
            True,
        )
        with pytest.raises(FailedPrecondition):
            await store.run("muni", "req-00000001", "MatchFace", compute, b"B")

    asyncio.run(scenario())
    assert calls == 1
    later = dt.datetime.now(dt.UTC) + RETENTION + dt.timedelta(minutes=1)
    assert store.prune(dt.datetime.now(dt.UTC)) == 0
    assert store.prune(later) == 1
    store.engine.dispose()


def test_sqlite_lookup_on_the_loop_recovers_from_a_broken_connection(sqlite_url: str) -> None:
    store = IdempotencyStore(make_engine(sqlite_url))
    assert store.inline  # SQLite: read on the event loop, on a connection of its own

    async def compute() -> bytes:
        return _store_answer(store, 3)

    async def scenario() -> None:
        await store.run("muni", "req-00000002", "MatchFace", compute, b"A")
        store._reader.dbapi_connection.close()  # the reader dies under the store's feet
        with pytest.raises(StorageError):
            await store.run("muni", "req-00000002", "MatchFace", compute, b"A")
        # The next look-up reconnects and finds the stored answer.
        assert await store.run("muni", "req-00000002", "MatchFace", compute, b"A") == (
            b"answer-3",
            True,
        )

    asyncio.run(scenario())
    store.close()
    store.engine.dispose()


def test_other_databases_are_read_from_a_thread(pg_url: str) -> None:
    store = IdempotencyStore(make_engine(pg_url))
    assert not store.inline
    store.engine.dispose()
