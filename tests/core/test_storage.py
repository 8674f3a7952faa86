"""Storage plumbing on SQLite and PostgreSQL: durability settings and migrations."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from centinela.errors import StorageError
from centinela.storage import (
    Migration,
    applied_versions,
    fetch_one,
    make_engine,
    migrate,
    unreachable,
)


def _create_t(conn: Connection) -> None:
    conn.execute(sa.text("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)"))


def _add_col(conn: Connection) -> None:
    conn.execute(sa.text("ALTER TABLE t ADD COLUMN w TEXT"))


STEPS = [Migration(1, "create t", _create_t), Migration(2, "add w", _add_col)]


def test_migrations_apply_once_and_in_order(db_url: str) -> None:
    engine = make_engine(db_url)
    assert migrate(engine, "demo", STEPS[:1]) == [1]
    assert migrate(engine, "demo", STEPS) == [2]
    assert migrate(engine, "demo", STEPS) == []
    assert applied_versions(engine, "demo") == [1, 2]
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO t (id, v, w) VALUES (1, 'a', 'b')"))
    engine.dispose()


def test_failed_migration_leaves_no_record(db_url: str) -> None:
    engine = make_engine(db_url)

    def broken(conn: Connection) -> None:
        conn.execute(sa.text("CREATE TABLE u (id INTEGER PRIMARY KEY)"))
        conn.execute(sa.text("SELECT * FROM no_such_table"))

    with pytest.raises(StorageError, match="migration failed"):
        migrate(engine, "demo", [Migration(1, "broken", broken)])
    assert applied_versions(engine, "demo") == []
    engine.dispose()


def test_sqlite_is_durable_wal(sqlite_url: str) -> None:
    engine = make_engine(sqlite_url)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    engine.dispose()


def test_fetch_one_reads_through_the_driver_and_maps_errors(db_url: str) -> None:
    engine = make_engine(db_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE kv (k VARCHAR(20) PRIMARY KEY, v VARCHAR(20))")
        conn.exec_driver_sql("INSERT INTO kv VALUES ('a', 'x'), ('b', 'y')")
    sql = "SELECT v, k FROM kv WHERE k = {key}"
    assert fetch_one(engine, sql, {"key": "b"}) == ("y", "b")
    assert fetch_one(engine, sql, {"key": "a'; DROP TABLE kv; --"}) is None  # bound, not spliced
    assert fetch_one(engine, sql, {"key": "a"}) == ("x", "a")
    with pytest.raises(StorageError, match="read failed"):
        fetch_one(engine, "SELECT v FROM missing WHERE k = {key}", {"key": "a"})
    engine.dispose()


def test_an_unreachable_database_is_unavailable_and_a_bug_is_not(
    db_url: str, tmp_path: Path
) -> None:
    """``unreachable`` (what the interceptor asks of an error no component mapped): the
    real errors of a database that cannot serve now are StorageError (UNAVAILABLE), named by
    class only; a constraint violation or a bad statement is not."""
    engine = make_engine(db_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t_unreach (k INTEGER PRIMARY KEY)")
        conn.exec_driver_sql("INSERT INTO t_unreach VALUES (1)")
    with pytest.raises(sa.exc.IntegrityError) as dup, engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO t_unreach VALUES (1)")
    assert unreachable(dup.value) is None
    # A bad statement: ProgrammingError on PostgreSQL, OperationalError (SQLITE_ERROR) on
    # SQLite, a bug either way.
    with pytest.raises(sa.exc.DBAPIError) as bad, engine.connect() as conn:
        conn.exec_driver_sql("SELECT no_such_column FROM t_unreach")
    assert unreachable(bad.value) is None
    engine.dispose()

    if db_url.startswith("sqlite"):
        # A file that cannot be opened as a database (its folder does not exist:
        # SQLITE_CANTOPEN).
        gone = make_engine(f"sqlite:///{tmp_path / 'missing' / 'x.db'}")
    else:
        with socket.socket() as s:  # a port nobody listens on: connection refused
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        gone = make_engine(f"postgresql+psycopg://postgres@127.0.0.1:{port}/test")
    with pytest.raises(sa.exc.OperationalError) as down:
        gone.connect()
    gone.dispose()
    err = unreachable(down.value)
    assert isinstance(err, StorageError)
    assert err.status == "UNAVAILABLE"
    assert str(err) == "the database cannot serve now (OperationalError)"
    # Also when a component wrapped it in an error of its own.
    wrapped = RuntimeError("wrapped")
    wrapped.__cause__ = down.value
    assert isinstance(unreachable(wrapped), StorageError)
