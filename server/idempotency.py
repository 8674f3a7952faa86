"""Idempotent retries: the same (caller, client request id) gets the same answer, audited once.

Invariants:

* A stored answer is the serialised response the caller already received; it holds only
  references, scores and decision ids (R10 shaping happened before), never a probe.
* A record is written only after the decision's audit entry is durable, so a retry after a
  crash either finds the answer or runs the request anew — never an answer without its entry.
* Concurrent duplicates are coalesced in process: the second waits for the first's result.
* On SQLite the look-up runs on the event loop, on a connection of its own: a primary-key
  read in WAL mode never waits for the writer and costs tens of microseconds, less than the
  trip to a thread and back under load. Other databases are read from a thread.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import datetime as dt
import hashlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from centinela.audit.store import Companion, Rows
from centinela.errors import FailedPrecondition, StorageError
from centinela.storage import Migration, fetch_one, is_sqlite, migrate

T = TypeVar("T")

metadata = sa.MetaData()
idempotency = sa.Table(
    "idempotency",
    metadata,
    sa.Column("caller", sa.String(128), primary_key=True),
    sa.Column("client_request_id", sa.String(128), primary_key=True),
    sa.Column("rpc", sa.String(64), nullable=False),
    sa.Column("fingerprint", sa.String(64), nullable=False),
    sa.Column("response", sa.LargeBinary, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)


#: One compiled statement for the hot path (``insert().values(...)`` would recompile).
#: The lookup every idempotent call makes first, straight through the driver.
_LOOKUP = (
    "SELECT response, rpc, fingerprint FROM idempotency"
    " WHERE caller = {caller} AND client_request_id = {rid}"
)


def _v1(conn: Connection) -> None:
    metadata.create_all(conn, tables=[idempotency])


MIGRATIONS = [Migration(1, "idempotency records", _v1)]

#: Records older than this are pruned; a retry after a day is a new request.
RETENTION = dt.timedelta(hours=24)


@dataclasses.dataclass(frozen=True)
class Key:
    """The idempotency key of the request being computed."""

    caller: str
    client_request_id: str
    rpc: str
    fingerprint: str


_current: contextvars.ContextVar[Key | None] = contextvars.ContextVar(
    "centinela_idempotency", default=None
)


def current_key() -> Key | None:
    """The key of the idempotent request being computed in this task, if any."""
    return _current.get()


class IdempotencyStore:
    """Stored answers by (caller, client request id)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        migrate(engine, "idempotency", MIGRATIONS)
        self._inflight: dict[tuple[str, str], asyncio.Future[bytes]] = {}
        self.inline = is_sqlite(engine)
        self._reader: Any = None  # the event loop's own SQLite connection (``inline``)

    def close(self) -> None:
        """Give back the event loop's reading connection (SQLite)."""
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.close()

    def _fetch(self, caller: str, rid: str) -> tuple[Any, ...] | None:
        params = {"caller": caller, "rid": rid}
        if not self.inline:
            return fetch_one(self.engine, _LOOKUP, params)
        try:
            if self._reader is None:
                self._reader = self.engine.raw_connection()
            return fetch_one(self.engine, _LOOKUP, params, raw=self._reader)
        except Exception as exc:  # the pool's and the driver's errors alike; reconnect next time
            self.close()
            if isinstance(exc, StorageError):
                raise
            raise StorageError(f"read failed: {exc.__class__.__name__}") from exc

    def _get(self, caller: str, rid: str, rpc: str, fingerprint: str) -> bytes | None:
        try:
            row = self._fetch(caller, rid)
        except StorageError as exc:
            raise StorageError(f"idempotency lookup failed: {exc}") from exc
        if row is None:
            return None
        stored_response, stored_rpc, stored_fingerprint = row
        if stored_rpc != rpc or stored_fingerprint != fingerprint:
            raise FailedPrecondition(
                "was already used for a different request; use a new id for a new request",
                field="context.client_request_id",
            )
        return bytes(stored_response)

    @staticmethod
    def companion(key: Key, answer: Callable[[int], bytes]) -> Companion:
        """Rows written in the audit entry's transaction: the stored answer of ``key``.

        ``answer(index)`` serialises the response for the entry's leaf index, so the stored
        answer is exactly the one the caller receives.
        """

        def row(index: int) -> list[dict[str, Any]]:
            return [
                {
                    "caller": key.caller,
                    "client_request_id": key.client_request_id,
                    "rpc": key.rpc,
                    "fingerprint": key.fingerprint,
                    "response": answer(index),
                    "created_at": dt.datetime.now(dt.UTC).timestamp(),
                }
            ]

        return Rows(idempotency, row)

    def prune(self, now: dt.datetime | None = None) -> int:
        """Delete records past the retention period; return how many."""
        cutoff = ((now or dt.datetime.now(dt.UTC)) - RETENTION).timestamp()
        with self.engine.begin() as conn:
            return int(
                conn.execute(idempotency.delete().where(idempotency.c.created_at < cutoff)).rowcount
            )

    async def run(
        self,
        caller: str,
        client_request_id: str,
        rpc: str,
        compute: Callable[[], Awaitable[bytes]],
        request: bytes = b"",
    ) -> tuple[bytes, bool]:
        """The stored answer, or ``compute()``'s, stored; returns (answer, was_replayed).

        ``request`` (the serialised request) is fingerprinted: the same id with another
        request is refused rather than answered with the first one's result. Without a
        client request id the computation simply runs.

        Raises:
            FailedPrecondition: the id was used for a different request.
        """
        if not client_request_id:
            return await compute(), False
        key = (caller, client_request_id)
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending), True
        fingerprint = hashlib.sha256(request).hexdigest()
        if self.inline:
            stored = self._get(caller, client_request_id, rpc, fingerprint)
        else:
            stored = await asyncio.to_thread(self._get, caller, client_request_id, rpc, fingerprint)
        if stored is not None:
            return stored, True
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        token = _current.set(Key(caller, client_request_id, rpc, fingerprint))
        try:
            answer = await compute()
            fut.set_result(answer)
            return answer, False
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # mark retrieved: a waiter may not exist
            raise
        finally:
            _current.reset(token)
            del self._inflight[key]
