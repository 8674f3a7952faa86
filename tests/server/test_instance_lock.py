"""One server per database: a second ``centinela serve`` on the same database refuses to
start and names the holder; a crashed holder leaves no stale lock; on PostgreSQL the lock
is taken again after the database ends its session (as a restart does)."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
import structlog

from centinela.config import Settings
from centinela.errors import ConfigError
from centinela.server.instance import LOCK_SUFFIX, DatabaseInUse, InstanceLock, advisory_key
from centinela.server.testing import ServerThread
from centinela.server.wiring import build_components
from centinela.storage import make_engine


def _held(lock: InstanceLock) -> bool:
    return lock.held


def _serve_argv(data: Path) -> list[str]:
    argv = [sys.executable, "-m", "centinela.cli", "serve", "--data-dir", str(data)]
    return [*argv, "--listen", "127.0.0.1:0"]


def test_second_server_on_the_same_sqlite_database_refuses_to_start(settings: Settings) -> None:
    with ServerThread(settings):
        # In-process, the way a second start would build its components.
        other = dataclasses.replace(settings, listen="127.0.0.1:0")
        with pytest.raises(DatabaseInUse) as refused:
            build_components(other)
        assert f"pid {os.getpid()}" in str(refused.value)
        assert "centinela.db" in str(refused.value)
        # And the command: exit status 2 and the reason on stderr, nothing served.
        proc = subprocess.run(
            _serve_argv(settings.data_dir), capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 2, proc.stderr
        assert "another Centinela server is serving" in proc.stderr
        assert f"pid {os.getpid()}" in proc.stderr
        assert "serving on" not in proc.stdout
    # Once the first has stopped, the database is free again.
    with ServerThread(settings) as again:
        assert again.port > 0


def test_a_killed_server_leaves_no_stale_lock(tmp_path: Path) -> None:
    data = tmp_path / "data"
    lock_file = data / ("centinela.db" + LOCK_SUFFIX)
    proc = subprocess.Popen(_serve_argv(data), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while f'"pid": {proc.pid}' not in (lock_file.read_text() if lock_file.exists() else ""):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "the server never took its lock"
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    settings = Settings(data_dir=data, listen="127.0.0.1:0", shutdown_grace_s=1.0)
    with ServerThread(settings) as srv:  # the kernel released the dead holder's lock
        assert srv.port > 0


def test_in_memory_sqlite_needs_no_lock() -> None:
    engine = sa.create_engine("sqlite://")
    try:
        assert InstanceLock.acquire(engine).held
        assert InstanceLock.acquire(engine).held  # private to the process: nothing to share
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_postgres_second_holder_refused_then_lock_taken_again_after_session_ends(
    pg_url: str,
) -> None:
    first_engine, second_engine = make_engine(pg_url), make_engine(pg_url)
    try:
        first = InstanceLock.acquire(first_engine)
        assert first.held
        assert first.needs_watch
        with pytest.raises(DatabaseInUse) as refused:
            InstanceLock.acquire(second_engine)
        assert "PostgreSQL session pid" in str(refused.value)
        assert first.check()

        # The database ends the holder's session (as a restart does): the lock is free,
        # another process may take it, and the first then knows it no longer holds it.
        with first_engine.connect() as admin:
            database, schema = admin.exec_driver_sql(
                "SELECT current_database(), current_schema()"
            ).one()
            key = advisory_key(str(database), str(schema))
            holder = admin.execute(  # the lock as PostgreSQL lists it: held by one session
                sa.text(
                    "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
                    " AND objsubid = 1 AND classid = CAST(:hi AS oid) AND objid = CAST(:lo AS oid)"
                ),
                {"hi": (key >> 32) & 0xFFFFFFFF, "lo": key & 0xFFFFFFFF},
            ).scalar_one()
            assert admin.execute(
                sa.text("SELECT pg_terminate_backend(:p, 10000)"), {"p": holder}
            ).scalar()
            admin.commit()
        second = InstanceLock.acquire(second_engine)
        assert second.held
        with structlog.testing.capture_logs() as logs:
            assert not first.check()
            assert not first.check()  # asked at every append the audit writer refuses
        assert not _held(first)
        # Said once, not at every check.
        assert [e["event"] for e in logs] == ["instance_lock.lost", "instance_lock.held_by_other"]

        # The second stops; the first's next check takes the lock again.
        second.close()
        assert first.check()
        assert _held(first)
        with pytest.raises(DatabaseInUse):
            InstanceLock.acquire(second_engine)
        first.close()
        InstanceLock.acquire(second_engine).close()
    finally:
        first_engine.dispose()
        second_engine.dispose()


@pytest.mark.postgres
def test_postgres_lock_is_per_schema(pg_url: str) -> None:
    other_schema_url = pg_url.rsplit("%3D", 1)[0] + "%3Dpublic"
    a, b = make_engine(pg_url), make_engine(other_schema_url)
    try:
        first = InstanceLock.acquire(a)
        second = InstanceLock.acquire(b)  # another schema is another database here
        assert first.held
        assert second.held
        first.close()
        second.close()
    finally:
        a.dispose()
        b.dispose()


def test_a_lock_that_cannot_be_opened_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / ("centinela.db" + LOCK_SUFFIX)).mkdir()  # in the way, for root too
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'centinela.db'}")
    try:
        with pytest.raises(ConfigError, match=r"cannot open the server lock .*directory"):
            InstanceLock.acquire(engine)
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_postgres_own_lingering_session_is_not_called_another_server(pg_url: str) -> None:
    """A partition: the server gave its lock's connection up, but PostgreSQL has not ended
    that session yet, which still holds the lock. The check says so (not "another server":
    nobody is to be stopped) and takes the lock once the session ends."""
    engine = make_engine(pg_url)
    try:
        lock = InstanceLock.acquire(engine)
        lingering = lock._conn  # the session PostgreSQL keeps, as if the network had failed
        lock._conn = None
        with structlog.testing.capture_logs() as logs:
            assert not lock.check()
            assert not lock.check()
        assert [e["event"] for e in logs] == ["instance_lock.own_session_lingers"]
        assert lingering is not None
        lingering.invalidate()  # its socket closed: PostgreSQL ends the session
        lingering.close()
        deadline = time.monotonic() + 30  # the backend exits a moment after the close
        while not lock.check():
            assert time.monotonic() < deadline, "the lock was not taken again"
            time.sleep(0.05)
        assert lock.held
        lock.close()
    finally:
        engine.dispose()
