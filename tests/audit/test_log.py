"""AuditLog: durable group-committed appends, checkpoints, proofs, fail-closed recovery."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import event
from sqlalchemy.engine import Engine

from centinela.audit.checkpoint import Verifier, open_checkpoint
from centinela.audit.entry import AuditEvent, EventType
from centinela.audit.log import AuditLog
from centinela.audit.merkle import leaf_hash, verify_consistency, verify_inclusion
from centinela.audit.stored_tree import Growth
from centinela.errors import AuditUnavailable, InconsistentCheckpointError, InvalidArgument
from centinela.storage import is_sqlite, make_engine

from .conftest import ORIGIN, rewrite_leaf_hash, sample_entry


def _wait_for(cond: Any, what: str, limit: float = 20.0) -> None:
    deadline = time.monotonic() + limit
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def test_async_appends_are_durable_contiguous_and_provable(audit_log: AuditLog) -> None:
    entries = [sample_entry(i) for i in range(300)]

    async def run() -> list[int]:
        receipts = await asyncio.gather(*(audit_log.append(e) for e in entries))
        return [r.index for r in receipts]

    indexes = asyncio.run(run())
    assert sorted(indexes) == list(range(300))
    # Durable: a fresh reader on another engine sees every entry at its index.
    assert audit_log.store.size() == 300
    stored = audit_log.entries(0, 300)
    assert sorted(stored) == sorted(entries)
    cp = audit_log.checkpoint()
    assert cp.size == 300
    for i in (0, 1, 150, 299):
        proof = audit_log.inclusion_proof(i, 300)
        verify_inclusion(i, 300, leaf_hash(stored[i]), proof, cp.root_hash)
    verify_consistency(7, 300, audit_log.root(7), cp.root_hash, audit_log.consistency_proof(7, 300))


def test_group_commit_batches_concurrent_appends(
    engine: Engine, signing_key: Ed25519PrivateKey
) -> None:
    commits = 0

    def on_commit(_conn: Any) -> None:
        nonlocal commits
        commits += 1

    event.listen(engine, "commit", on_commit)
    log = AuditLog.open(engine, signing_key, ORIGIN, checkpoint_every_seconds=3600)
    try:
        before = commits

        async def run() -> None:
            async def writer(w: int) -> None:
                for i in range(20):
                    await log.append(sample_entry(w * 1000 + i))

            await asyncio.gather(*(writer(w) for w in range(32)))

        asyncio.run(run())
        assert log.size == 640
        assert commits - before < 640 / 4  # many appends share one durable commit
    finally:
        log.close()
        event.remove(engine, "commit", on_commit)


def test_blocking_appends_from_threads(audit_log: AuditLog) -> None:
    got: list[int] = []
    lock = threading.Lock()

    def worker(w: int) -> None:
        for i in range(25):
            r = audit_log.append_blocking(sample_entry(w * 100 + i), timeout=30)
            with lock:
                got.append(r.index)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == list(range(200))


def test_audit_event_objects_are_encoded_and_bad_bytes_refused(audit_log: AuditLog) -> None:
    r = audit_log.append_blocking(AuditEvent(EventType.SERVICE_START))
    assert r.index == 0
    assert len(r.leaf_hash) == 64
    with pytest.raises(InvalidArgument):
        audit_log.append_blocking(b'{"a":\n1}')


def test_checkpoint_every_n_entries_and_every_t_seconds(
    engine: Engine, signing_key: Ed25519PrivateKey
) -> None:
    log = AuditLog.open(
        engine, signing_key, ORIGIN, checkpoint_every_entries=10, checkpoint_every_seconds=3600
    )
    try:
        for i in range(25):
            log.append_blocking(sample_entry(i))
        _wait_for(
            lambda: [c.tree_size for c in log.store.checkpoints()][-1:] == [20],
            "size-20 checkpoint",
        )
    finally:
        log.close()
    assert log.store.checkpoints()[-1].tree_size == 25  # close cuts a final one
    log = AuditLog.open(
        engine, signing_key, ORIGIN, checkpoint_every_entries=10_000, checkpoint_every_seconds=0.05
    )
    try:
        log.append_blocking(sample_entry(99))
        _wait_for(lambda: log.store.checkpoints()[-1].tree_size == 26, "timed checkpoint")
    finally:
        log.close()
    verifier = Verifier(log.verifier_key())
    for stored in log.store.checkpoints():
        assert open_checkpoint(stored.note, [verifier], origin=ORIGIN).size == stored.tree_size


def test_reopen_loads_tree_and_continues(engine: Engine, signing_key: Ed25519PrivateKey) -> None:
    log = AuditLog.open(engine, signing_key, ORIGIN)
    for i in range(37):
        log.append_blocking(sample_entry(i))
    root = log.root()
    log.close()
    again = AuditLog.open(engine, signing_key, ORIGIN)
    try:
        assert again.size == 37
        assert again.root() == root
        assert again.append_blocking(sample_entry(37)).index == 37
    finally:
        again.close()


def test_second_writer_never_gets_an_index_twice(
    engine: Engine, signing_key: Ed25519PrivateKey
) -> None:
    """Two logs on one database (a misconfigured second replica): the database refuses the
    duplicate index, the batch fails closed, and the next append lands after the other's."""
    a = AuditLog.open(engine, signing_key, ORIGIN, checkpoint_every_seconds=3600)
    b = AuditLog.open(engine, signing_key, ORIGIN, checkpoint_every_seconds=3600)
    try:
        assert a.append_blocking(sample_entry(0)).index == 0
        with pytest.raises(AuditUnavailable):
            b.append_blocking(sample_entry(1))  # b believed the next index was 0
        assert b.append_blocking(sample_entry(2)).index == 1  # reloaded, then appended
        with pytest.raises(AuditUnavailable):
            a.append_blocking(sample_entry(3))
        assert a.append_blocking(sample_entry(4)).index == 2
        assert a.entries(0, 3) == [sample_entry(0), sample_entry(2), sample_entry(4)]
        assert [leaf_hash(e) for e in a.entries(0, 3)] == [a.leaf_hash(i) for i in range(3)]
    finally:
        a.close()
        b.close()


def test_after_a_failed_append_the_writer_resumes_only_when_its_guard_allows(
    engine: Engine, signing_key: Ed25519PrivateKey
) -> None:
    """A server's writer appends again after a failure only once it holds its database's
    lock again (``resume_guard``): while the guard says no, every append is refused and
    nothing is written; the guard is asked before resuming, not at every append. The log's
    readiness (``probe``) follows: not ready after a failed append until the store answers
    and the guard allows."""
    allowed = False
    asked = 0

    def guard() -> bool:
        nonlocal asked
        asked += 1
        return allowed

    other = AuditLog.open(engine, signing_key, ORIGIN, checkpoint_every_seconds=3600)
    log = AuditLog.open(
        engine, signing_key, ORIGIN, checkpoint_every_seconds=3600, resume_guard=guard
    )
    try:
        assert log.probe() is None
        assert other.append_blocking(sample_entry(0)).index == 0
        with pytest.raises(AuditUnavailable):
            log.append_blocking(sample_entry(1))  # it believed the next index was 0
        assert asked == 0
        for i in (2, 3):
            with pytest.raises(AuditUnavailable):
                log.append_blocking(sample_entry(i))
        assert asked == 2
        assert log.store.size() == 1
        # Not ready while appends fail; the probe asks the guard too.
        assert log.probe() == "this server does not hold its database's serving lock"
        assert asked == 3
        allowed = True
        # Ready again without an append: the store answers and the guard allows.
        assert log.probe() is None
        assert log.probe() is None
        assert asked == 4  # asked only while not ready
        assert log.append_blocking(sample_entry(4)).index == 1
        assert log.append_blocking(sample_entry(5)).index == 2
        assert asked == 5
    finally:
        log.close()
        other.close()


def _break_and_heal(engine: Engine, db_url: str) -> tuple[Any, Any]:
    """Return (break, heal) callables that make the database really fail for the writer."""
    if is_sqlite(engine):
        holder = sa.create_engine(db_url, connect_args={"isolation_level": None, "timeout": 0.05})
        conn = holder.connect()

        def breaker() -> None:
            conn.exec_driver_sql("BEGIN EXCLUSIVE")

        def healer() -> None:
            conn.exec_driver_sql("COMMIT")
            conn.close()
            holder.dispose()

        return breaker, healer
    admin = sa.create_engine(db_url)

    def pg_break() -> None:
        with admin.begin() as c:
            c.execute(
                sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = :app"
                ),
                {"app": APP},
            )

    return pg_break, admin.dispose


APP = "audit-failclosed-" + uuid.uuid4().hex[:8]


def test_database_failure_fails_closed_then_recovers(
    db_url: str, signing_key: Ed25519PrivateKey
) -> None:
    if db_url.startswith("sqlite"):
        engine = sa.create_engine(
            db_url,
            connect_args={"isolation_level": None, "check_same_thread": False, "timeout": 0.2},
        )

        @event.listens_for(engine, "begin")
        def _begin(conn: Any) -> None:
            mode = conn.get_execution_options().get("sqlite_begin", "")
            conn.exec_driver_sql(f"BEGIN {mode}".strip())

    else:
        engine = make_engine(db_url + f"&application_name={APP}")
    log = AuditLog.open(engine, signing_key, ORIGIN, checkpoint_every_seconds=3600)
    breaker, healer = _break_and_heal(engine, db_url)
    try:
        assert log.append_blocking(sample_entry(0)).index == 0
        breaker()

        async def burst() -> list[object]:
            return await asyncio.gather(
                *(log.append(sample_entry(i)) for i in range(1, 9)), return_exceptions=True
            )

        results = asyncio.run(burst())
        if is_sqlite(engine):
            assert all(isinstance(r, AuditUnavailable) for r in results)
            healer()
        else:
            # The writer's session was terminated between batches: its connection had
            # ended before anything was sent, so the batch went again on a new one, through
            # the reload (ConnectionLost), and nobody was refused.
            assert not any(isinstance(r, BaseException) for r in results), results
            healer()
        r = log.append_blocking(sample_entry(100))
        ok = [x for x in results if not isinstance(x, BaseException)]
        assert r.index == 1 + len(ok)
        assert log.store.size() == log.size == r.index + 1
    finally:
        log.close()
        engine.dispose()


def test_tampered_store_does_not_open(engine: Engine, signing_key: Ed25519PrivateKey) -> None:
    """A DBA drops the trigger and rewrites a leaf: the log refuses to open (and to sign)."""
    log = AuditLog.open(engine, signing_key, ORIGIN)
    for i in range(10):
        log.append_blocking(sample_entry(i))
    log.close()
    rewrite_leaf_hash(engine, 3, leaf_hash(b"{}"))
    with pytest.raises(InconsistentCheckpointError):
        AuditLog.open(engine, signing_key, ORIGIN)


def test_closed_log_refuses_appends(audit_log: AuditLog) -> None:
    audit_log.close()
    with pytest.raises(AuditUnavailable):
        audit_log.append_blocking(sample_entry(0))


def test_key_files_are_private(tmp_path: Path) -> None:
    from centinela.audit.keys import load_or_create_hmac_key, load_or_create_signing_key
    from centinela.errors import InsecureKeyFile

    sk_path = tmp_path / "keys" / "audit-log.ed25519"
    hk_path = tmp_path / "keys" / "audit-hmac.key"
    sk = load_or_create_signing_key(sk_path)
    hk = load_or_create_hmac_key(hk_path)
    assert (sk_path.stat().st_mode & 0o777) == 0o600
    assert (hk_path.stat().st_mode & 0o777) == 0o600
    assert (sk_path.parent.stat().st_mode & 0o077) == 0
    assert load_or_create_signing_key(sk_path).public_key() == sk.public_key()
    assert load_or_create_hmac_key(hk_path) == hk
    assert len(hk) == 32
    for p in (sk_path, hk_path):
        p.chmod(0o640)
        with pytest.raises(InsecureKeyFile):
            (load_or_create_signing_key if p == sk_path else load_or_create_hmac_key)(p)


def test_a_bug_in_the_writer_fails_closed_instead_of_hanging(
    engine: Engine, signing_key: Ed25519PrivateKey
) -> None:
    """An unexpected error in the writer thread (here: publishing the tree after a commit)
    used to kill the thread, and every later append waited forever. Now each waiter gets
    AuditUnavailable."""
    log = AuditLog.open(engine, signing_key, ORIGIN, checkpoint_every_seconds=3600)
    try:
        assert log.append_blocking(sample_entry(0)).index == 0
        real = log._tree

        class Broken:
            size = log.size

            def grow(self, leaves: list[bytes]) -> Growth:
                return real.grow(leaves)

            def apply(self, _growth: Growth) -> None:
                raise RuntimeError("a bug")

        log._tree = Broken()  # type: ignore[assignment]

        async def burst() -> list[object]:
            return await asyncio.gather(
                *(log.append(sample_entry(i)) for i in range(1, 6)), return_exceptions=True
            )

        results = asyncio.run(asyncio.wait_for(burst(), 30))
        assert len(results) == 5
        assert all(isinstance(r, AuditUnavailable) for r in results), results
        with pytest.raises(AuditUnavailable, match="audit writer failed"):
            log.append_blocking(sample_entry(9), timeout=30)
    finally:
        log.close()
