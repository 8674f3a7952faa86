"""Idempotency records: one answer per (caller, request id), refused on reuse, pruned after
their retention, on SQLite and PostgreSQL."""

from __future__ import annotations

import array
import asyncio
import datetime as dt
import functools
import random
from typing import Any

import pytest
import sqlalchemy as sa

from centinela.errors import FailedPrecondition, StorageError
from centinela.server.idempotency import (
    MIGRATIONS,
    RETENTION,
    IdempotencyStore,
    SeenKeys,
    current_key,
    idempotency,
)
from centinela.storage import is_sqlite, make_engine, migrate, write_transaction


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


def test_old_records_are_pruned_in_short_transactions_found_on_an_index(db_url: str) -> None:
    """The prune runs once a minute beside the calls being served, whose audit commits need
    the write lock (on SQLite the whole file's): it deletes a batch per transaction, found
    on the index of creation times. Deleting a day's records in one statement scanned the
    whole table under the lock, 0.8 s at 774,000 records (benchmarks/retention.py)."""
    engine = make_engine(db_url)
    migrate(engine, "idempotency", MIGRATIONS[:1])  # a database from before the index
    store = IdempotencyStore(engine)
    now = dt.datetime.now(dt.UTC)
    old = (now - RETENTION - dt.timedelta(hours=1)).timestamp()
    rows = [
        {
            "caller": "muni",
            "client_request_id": f"req-{n:08d}",
            "rpc": "MatchFace",
            "fingerprint": "f" * 64,
            "response": b"answer",
            "created_at": old + n if n < 25 else now.timestamp(),
        }
        for n in range(30)
    ]
    with write_transaction(engine) as conn:
        conn.execute(idempotency.insert(), rows)
    commits = 0

    def count(conn: Any) -> None:
        nonlocal commits
        commits += 1

    sa.event.listen(engine, "commit", count)
    assert store.prune(now, batch=10) == 25
    sa.event.remove(engine, "commit", count)
    assert commits == 3  # 10, 10, then the 5 left
    with engine.connect() as conn:
        left = conn.execute(sa.select(sa.func.count()).select_from(idempotency)).scalar()
        if is_sqlite(engine):
            plan = str(
                conn.exec_driver_sql(
                    "EXPLAIN QUERY PLAN SELECT created_at FROM idempotency"
                    " WHERE created_at < 0 ORDER BY created_at LIMIT 1"
                ).fetchall()
            )
        else:
            plan = str(
                conn.exec_driver_sql(
                    "SELECT indexname FROM pg_indexes WHERE tablename = 'idempotency'"
                ).fetchall()
            )
    assert left == 5
    assert "ix_idempotency_created_at" in plan
    engine.dispose()


def _reader(store: IdempotencyStore) -> Any:
    """The store's own SQLite connection (None until its first read)."""
    return store._reader


def test_sqlite_lookup_on_the_loop_recovers_from_a_broken_connection(sqlite_url: str) -> None:
    store = IdempotencyStore(make_engine(sqlite_url))
    assert store.inline  # SQLite: read on the event loop, on a connection of its own

    async def compute() -> bytes:
        return _store_answer(store, 3)

    async def scenario() -> None:
        await store.run("muni", "req-00000002", "MatchFace", compute, b"A")  # no read: new id
        assert _reader(store) is None
        assert (await store.run("muni", "req-00000002", "MatchFace", compute, b"A"))[1]
        _reader(store).dbapi_connection.close()  # the reader dies under the store's feet
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


def test_an_answer_stored_before_a_restart_is_found_after_it(db_url: str) -> None:
    engine = make_engine(db_url)
    first = IdempotencyStore(engine)
    calls = 0

    async def compute() -> bytes:
        nonlocal calls
        calls += 1
        return _store_answer(first, 5)

    asyncio.run(first.run("muni", "req-00000009", "MatchFace", compute, b"A"))
    first.close()
    # A new process: its filter of stored keys is read from the table, so the retry reads
    # the stored answer instead of deciding (and auditing) again.
    again = IdempotencyStore(engine)
    assert SeenKeys.digest("muni", "req-00000009") in again.seen
    answer = asyncio.run(again.run("muni", "req-00000009", "MatchFace", compute, b"A"))
    assert answer == (b"answer-5", True)
    assert calls == 1
    again.close()
    engine.dispose()


def test_new_request_ids_are_answered_without_reading_the_table(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = IdempotencyStore(make_engine(sqlite_url))
    reads: list[str] = []
    real = store._fetch

    def counted(caller: str, rid: str) -> tuple[Any, ...] | None:
        reads.append(rid)
        return real(caller, rid)

    monkeypatch.setattr(store, "_fetch", counted)

    async def scenario() -> None:
        for i in range(50):
            rid = f"req-{i:08d}"
            await store.run("muni", rid, "MatchFace", functools.partial(_compute, store, i), b"A")
        assert reads == []
        # A retry is read back from the table.
        assert (await store.run("muni", "req-00000007", "MatchFace", _never, b"A")) == (
            b"answer-7",
            True,
        )
        assert reads == ["req-00000007"]

    asyncio.run(scenario())
    store.close()
    store.engine.dispose()


async def _compute(store: IdempotencyStore, index: int) -> bytes:
    return _store_answer(store, index)


async def _never() -> bytes:
    raise AssertionError("a stored answer must be replayed, not computed")


def test_seen_keys_never_miss_a_key_and_forget_only_what_a_prune_deleted() -> None:
    now = [1_000_000.0]
    seen = SeenKeys(capacity=100, clock=lambda: now[0])
    keys = [SeenKeys.digest("muni", f"req-{i:08d}") for i in range(5000)]
    for i, key in enumerate(keys):
        now[0] += 3.0  # 5,000 keys over ~4 hours, past each filter's capacity many times
        seen.add(key)
        assert key in seen, i
    assert all(k in seen for k in keys)
    assert len(seen) == 5000
    assert sum(SeenKeys.digest("other", f"req-{i:08d}") in seen for i in range(5000)) < 250
    # A prune whose cutoff is the last key's time deleted every row before it; the filters
    # of the last two hours before that cutoff stay (an answer may be stored an hour after
    # its key went in), so the newest keys are all still there.
    cutoff = now[0]
    seen.forget_before(cutoff)
    recent = [k for i, k in enumerate(keys) if 1_000_000.0 + 3.0 * (i + 1) >= cutoff - 7200]
    assert all(k in seen for k in recent)
    assert len(seen) < 5000
    # Much later, only the newest filter stays (new keys go into it).
    seen.forget_before(cutoff + 10 * 86400)
    assert keys[-1] in seen


def test_keys_read_at_start_fill_the_filters_as_one_by_one_would() -> None:
    """A start reads a day of keys and adds them at once (numpy), where it added them one by
    one: 3.9 s for 246,514 keys before. The filters must come out bit for bit as the keys
    added one by one in the order of their times would make them, whatever order the table
    gives them in, each filter its period and size, so that no key is missed."""
    now = 1_000_000.0
    times = [now + 2.5 * i for i in range(6000)]  # ~4 hours: two periods, filters overflow
    keys = [SeenKeys.digest(f"muni-{i % 7}", f"req-{i:08d}") for i in range(6000)]
    one = SeenKeys(capacity=500)
    for key, when in zip(keys, times, strict=True):
        one.add(key, when=when)
    shuffled = list(range(6000))
    random.Random(7).shuffle(shuffled)
    many = SeenKeys(capacity=500)
    many.add_many(
        b"".join(keys[i] for i in shuffled), array.array("d", (times[i] for i in shuffled))
    )

    def layout(seen: SeenKeys) -> list[tuple[float, int, int, bytes]]:
        return [(t, f.capacity, f.count, bytes(f._bits)) for t, f in seen._filters]

    assert len(one._filters) > 3  # more than one period, and filters that filled
    assert layout(many) == layout(one)
    assert all(k in many for k in keys)
    many.add_many(b"", array.array("d"))
    assert layout(many) == layout(one)
