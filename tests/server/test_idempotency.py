"""Idempotency records: one answer per (caller, request id), refused on reuse, pruned after
their retention, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest

from centinela.errors import FailedPrecondition
from centinela.server.idempotency import RETENTION, IdempotencyStore, current_key
from centinela.storage import make_engine, write_transaction


def test_answer_stored_reused_refused_and_pruned(db_url: str) -> None:
    store = IdempotencyStore(make_engine(db_url))
    calls = 0

    async def compute() -> bytes:
        nonlocal calls
        calls += 1
        key = current_key()
        assert key is not None
        # What the audit writer does: the answer commits with the entry (index 7 here).
        with write_transaction(store.engine) as conn:
            IdempotencyStore.companion(key, lambda i: b"answer-%d" % i)(conn, 7)
        return b"answer-7"

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
