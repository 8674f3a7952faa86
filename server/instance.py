"""One serving process per database: a lock the server holds for as long as it serves.

Several state holders of a server live in its process and are correct only while no other
process writes the same database: the audit writer's tree state (it appends at the index
it knows; another writer's append makes the next batch fail, closed, with UNAVAILABLE),
the idempotency filter :class:`~centinela.server.idempotency.SeenKeys` (a retry answered
by another process would be worked and audited again), the per-caller rate counters
(R14: two processes would each allow the ceiling) and admission. A second ``centinela
serve`` on the same database, started by mistake (a unit file and a shell, a test copy on
another port), would therefore not fail at start but later and at random. This lock makes
it fail at start, with the holder named:

* **SQLite**: an exclusive ``flock`` on ``<database>.serving.lock`` beside the database
  file. The kernel releases it when the process ends, however it ends (``SIGKILL``
  included), so a crash never leaves a stale lock. The file holds the holder's pid, host
  and start time, for the message only.
* **PostgreSQL**: a session-level advisory lock (``pg_try_advisory_lock``) on a key derived
  from the database and the schema, held on a connection of its own. It ends with that
  session: when the server dies, or when the database restarts. :meth:`InstanceLock.check`
  takes it again after a restart, and logs an error if another process took it meanwhile.
  The audit writer asks it before it appends again after a failed append (a restart fails
  the writer's connection too), so no entry is appended between the database's return and
  the lock's, nor while another process holds it: matches are refused UNAVAILABLE until the
  lock is this server's again. The server also asks it every few seconds.

In-memory SQLite databases are private to their process and need no lock.

What replicas behind a load balancer (``deploy/README.md``) would need instead is state
shared through the database: audit appends serialised under a database lock with a
catch-up of the tree, idempotency keys looked up in the table, and rate counters kept
there. That is not built; until it is, one process serves one database.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
import socket
import threading
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from centinela.errors import ConfigError, StorageError
from centinela.logs import get_logger

log = get_logger("server.instance")

LOCK_SUFFIX = ".serving.lock"

_TRY_LOCK = sa.text("SELECT pg_try_advisory_lock(:key)")
_UNLOCK = sa.text("SELECT pg_advisory_unlock(:key)")
_SESSION = sa.text("SELECT pid, backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()")
_HOLDER = sa.text(
    "SELECT a.pid, COALESCE(host(a.client_addr), 'local socket'), a.backend_start"
    " FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
    " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1"
    " AND l.classid = CAST(:hi AS oid) AND l.objid = CAST(:lo AS oid)"
)


class DatabaseInUse(ConfigError):
    """Another server process holds the database."""


def _holder_text() -> str:
    return json.dumps(
        {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }
    )


def advisory_key(database: str, schema: str) -> int:
    """The 64-bit advisory-lock key of one database and schema (signed, as PostgreSQL's)."""
    digest = hashlib.sha256(f"centinela-serve:{database}:{schema}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class InstanceLock:
    """The lock one serving process holds on its database; :meth:`acquire` takes it."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.backend = engine.dialect.name
        self._fd: int | None = None
        self._conn: Connection | None = None
        self._key: int | None = None
        self._held = False
        self._refused_by = ""  # "own" or "other" session: said once, not at every check
        #: The PostgreSQL session (pid, start) that took the lock, to tell it from another
        #: process's when it outlives this server's connection (a partition).
        self._session: tuple[Any, Any] | None = None
        self._private = False
        self._mutex = threading.Lock()

    @classmethod
    def acquire(cls, engine: Engine) -> InstanceLock:
        """Take the lock of ``engine``'s database, or say who holds it.

        Raises:
            DatabaseInUse: another process serves this database.
            StorageError: the database could not be reached.
        """
        lock = cls(engine)
        if lock.backend == "sqlite":
            lock._acquire_file()
        elif lock.backend == "postgresql":
            lock._acquire_advisory()
        else:
            lock._private = True
        return lock

    @property
    def held(self) -> bool:
        """Whether this process holds the lock now (always, for a private database)."""
        return self._private or self._held

    @property
    def needs_watch(self) -> bool:
        """Whether the lock can end with the process still running (a database session)."""
        return self._key is not None

    # --- SQLite ---------------------------------------------------------------------------

    def _acquire_file(self) -> None:
        database = self.engine.url.database
        if not database or database == ":memory:" or database.startswith("file::memory:"):
            self._private = True
            return
        db_file = Path(database).resolve()
        path = db_file.with_name(db_file.name + LOCK_SUFFIX)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise ConfigError(f"cannot open the server lock {path}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
            os.close(fd)
            raise DatabaseInUse(
                f"another Centinela server is serving {database} ({_describe(holder)}); "
                "stop it first, or give this one its own data directory"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, _holder_text().encode(), 0)
        self._fd, self._held = fd, True
        log.info("instance_lock.taken", kind="file")

    # --- PostgreSQL ----------------------------------------------------------------------

    def _acquire_advisory(self) -> None:
        try:
            conn = self.engine.connect()
            try:
                database, schema = conn.exec_driver_sql(
                    "SELECT current_database(), current_schema()"
                ).one()
                key = advisory_key(str(database), str(schema))
                got = bool(conn.execute(_TRY_LOCK, {"key": key}).scalar())
                conn.commit()
                if not got:
                    holder = self._advisory_holder(conn, key)
                    raise DatabaseInUse(
                        f"another Centinela server is serving database {database}, schema "
                        f"{schema} ({holder}); stop it first, or give this one its own schema"
                    )
                session = _session(conn)
            except BaseException:
                conn.close()
                raise
        except sa.exc.SQLAlchemyError as exc:
            raise StorageError(f"could not reach the database: {exc.__class__.__name__}") from exc
        self._conn, self._key, self._held, self._session = conn, key, True, session
        log.info("instance_lock.taken", kind="advisory")

    @staticmethod
    def _advisory_holder(conn: Connection, key: int) -> str:
        row = _holder(conn, key)
        if row is None:
            return "its session is gone or not visible"
        return f"PostgreSQL session pid {row[0]} from {row[1]}, connected {row[2]:%Y-%m-%d %H:%M}"

    def check(self) -> bool:
        """Confirm the lock is still held, taking it again after a database restart.

        Returns whether it is held now. Never raises: a database that is down is the
        audit log's and the health check's to report; this only logs. The audit writer asks
        this before it appends again after a failed append (``AuditLog``'s
        ``resume_guard``), and the server every few seconds (``watch_instance_lock``).
        """
        if self._key is None:
            return self.held
        with self._mutex:
            try:
                if self._conn is not None:
                    self._conn.exec_driver_sql("SELECT 1").scalar()
                    self._conn.commit()
                    return True
            except sa.exc.SQLAlchemyError:
                self._drop()
                if self._held:
                    self._held = False
                    log.warning("instance_lock.lost", reason="database session ended")
            conn: Connection | None = None
            try:
                conn = self.engine.connect()
                got = bool(conn.execute(_TRY_LOCK, {"key": self._key}).scalar())
                conn.commit()
                if got:
                    self._session = _session(conn)
                    self._conn, self._held, self._refused_by = conn, True, ""
                    log.info("instance_lock.taken_again")
                    return True
                holder = _holder(conn, self._key)
            except sa.exc.SQLAlchemyError:
                if conn is not None:  # a lock taken on it ends with its session
                    with contextlib.suppress(Exception):
                        conn.invalidate()
                        conn.close()
                return False  # still down: try again at the next check
            conn.close()
            # This server's own session, which PostgreSQL has not ended yet (it ends it
            # within seconds: storage's liveness settings), is not another server.
            own = holder is not None and (holder[0], holder[2]) == self._session
            refused_by = "own" if own else "other"
            if refused_by == self._refused_by:
                return False  # said already, not at every append the audit writer refuses
            self._refused_by = refused_by
            if own:
                log.info("instance_lock.own_session_lingers")
            else:
                log.error(
                    "instance_lock.held_by_other",
                    hint="another server took this database while it was down; stop one of "
                    "them (this one appends nothing to the audit log meanwhile)",
                )
            return False

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.invalidate()
                conn.close()

    def close(self) -> None:
        """Give the lock up (the process's end does so too)."""
        with self._mutex:
            if self._fd is not None:
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, 0)
                    fcntl.flock(self._fd, fcntl.LOCK_UN)
                os.close(self._fd)
                self._fd = None
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    self._conn.execute(_UNLOCK, {"key": self._key})
                    self._conn.commit()
                self._conn.close()
                self._conn = None
            self._held = False


def _session(conn: Connection) -> tuple[Any, Any]:
    """This connection's PostgreSQL session: (pid, start)."""
    row = conn.execute(_SESSION).one()
    conn.commit()
    return row[0], row[1]


def _holder(conn: Connection, key: int) -> Any:
    """(pid, client address, start) of the session holding advisory lock ``key``, or None."""
    # A bigint key is stored as two 32-bit halves (classid, objid), objsubid 1.
    row = conn.execute(_HOLDER, {"hi": (key >> 32) & 0xFFFFFFFF, "lo": key & 0xFFFFFFFF}).first()
    conn.commit()
    return row


def _describe(holder: str) -> str:
    try:
        doc: Any = json.loads(holder)
        return f"pid {doc['pid']} on {doc['host']}, since {doc['since']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"
