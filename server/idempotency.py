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
* Most request ids are new, and for them no read is made at all: :class:`SeenKeys` holds
  every key whose answer the table may hold (read from the table at start, and each new key
  before its answer can be stored), so a key it does not hold is known absent. This assumes
  one server process per database, which the audit log's single writer already requires and
  :mod:`centinela.server.instance` enforces (a second server refuses to start).
"""

from __future__ import annotations

import array
import asyncio
import contextvars
import dataclasses
import datetime as dt
import hashlib
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from centinela.audit.store import Companion, Rows
from centinela.errors import FailedPrecondition, StorageError
from centinela.logs import get_logger
from centinela.storage import Migration, fetch_one, is_sqlite, migrate, write_transaction

log = get_logger("server.idempotency")

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


def _v2(conn: Connection) -> None:
    # The retention prune finds old records by their time: without an index that was a scan
    # of the whole table (a day of records) once a minute, under SQLite's write lock, which
    # every audit commit waited for: probes waited 0.63-0.84 s at 774,000 records in the
    # benchmarks' server (benchmarks/fairness.py, benchmarks/retention.py).
    conn.exec_driver_sql(
        "CREATE INDEX IF NOT EXISTS ix_idempotency_created_at ON idempotency (created_at)"
    )


#: Every stored answer's key and time: what a start reads into :class:`SeenKeys`.
KEY_ROWS = sa.select(
    idempotency.c.caller, idempotency.c.client_request_id, idempotency.c.created_at
)

MIGRATIONS = [
    Migration(1, "idempotency records", _v1),
    Migration(2, "index on created_at, for the retention prune", _v2),
]

#: Records deleted per transaction by :meth:`IdempotencyStore.prune`: each batch holds the
#: database's write lock (SQLite's is the whole file's) for a few milliseconds, and the audit
#: commits of the calls being served take their turns between batches.
PRUNE_BATCH = 2_000

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


class _Bloom:
    """A Bloom filter of ``capacity`` keys at about 0.1 % false positives (15 bits, 10 probes).

    A key is a 16-byte digest; its two halves give the probes (double hashing).
    """

    PROBES = 10

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.count = 0
        self._m = max(64, capacity * 15)
        self._bits = bytearray((self._m + 7) // 8)

    def _positions(self, digest: bytes) -> Iterator[int]:
        h1, h2, m = int.from_bytes(digest[:8]), int.from_bytes(digest[8:]) | 1, self._m
        return ((h1 + i * h2) % m for i in range(self.PROBES))

    def add(self, digest: bytes) -> None:
        bits = self._bits
        for pos in self._positions(digest):
            bits[pos >> 3] |= 1 << (pos & 7)
        self.count += 1

    def add_many(self, digests: np.ndarray) -> None:
        """Add keys given as an (n, 16) array of digests, as :meth:`add` would one by one:
        a start-up reads a day of them (a key a request), which one at a time took 3.9 s
        for 246,514 keys (``idempotency.keys_loaded``)."""
        if not len(digests):
            return
        halves = digests.view(">u8").astype(np.uint64)  # the two big-endian halves
        m = np.uint64(self._m)
        # Reduced first, the probes stay under 2**64, and (h1 + i h2) mod m is the same.
        h1, h2 = halves[:, 0] % m, (halves[:, 1] | np.uint64(1)) % m
        flags = np.unpackbits(np.frombuffer(self._bits, dtype=np.uint8), bitorder="little")
        for i in range(self.PROBES):  # h1 + i * h2 < 10 m < 2**64: no overflow
            flags[(h1 + np.uint64(i) * h2) % m] = 1
        self._bits[:] = np.packbits(flags, bitorder="little").tobytes()
        self.count += len(digests)

    def __contains__(self, digest: bytes) -> bool:
        bits = self._bits
        return all(bits[pos >> 3] & (1 << (pos & 7)) for pos in self._positions(digest))


class SeenKeys:
    """The (caller, request id) pairs whose answer the table may hold; never misses one.

    Keys go into a filter per three hours of the clock; a filter that fills starts one twice
    as large, and the next period starts at the size the last one reached. A filter is
    dropped once a prune has deleted every row its keys can have (its period ended more than
    an hour before the prune's cutoff), so about ten filters cover the retention period and
    memory follows the traffic of the last day: ~1.9 bytes a request, ~1 % false positives
    (each costs the read every look-up made before).
    """

    WINDOW_S = 3 * 3600.0
    #: A stored answer's ``created_at`` may come this long after its key went in.
    SLACK_S = 3600.0

    def __init__(self, capacity: int = 1 << 16, clock: Callable[[], float] = time.time) -> None:
        self._capacity = capacity
        self._clock = clock
        #: (start of the filter's period, filter), oldest first; keys go into the last.
        self._filters: list[tuple[float, _Bloom]] = []
        #: The loop adds while a prune (in a thread) forgets: no key may be lost between.
        self._lock = threading.Lock()

    @staticmethod
    def digest(caller: str, client_request_id: str) -> bytes:
        return hashlib.blake2b(f"{caller}\x00{client_request_id}".encode(), digest_size=16).digest()

    def add(self, digest: bytes, when: float | None = None) -> None:
        """Note a key whose answer may be stored from now on (or from ``when``)."""
        now = self._clock() if when is None else when
        with self._lock:
            self._room(now - now % self.WINDOW_S).add(digest)

    def _room(self, start: float) -> _Bloom:
        """The filter a key of the period beginning at ``start`` goes into, with room for
        one more: the period's first filter, or one twice as large when the last is full.
        Called under the lock, with periods in time order."""
        filters = self._filters
        if not filters or filters[-1][0] < start:
            size = max(self._capacity, filters[-1][1].capacity if filters else 0)
            filters.append((start, _Bloom(size)))
        last = filters[-1][1]
        if last.count >= last.capacity:
            last = _Bloom(last.capacity * 2)
            filters.append((filters[-1][0], last))
        return last

    def add_many(self, digests: bytes, whens: array.array[float]) -> None:
        """Note many keys (``digests``, 16 bytes each, concatenated) whose answers were
        stored at ``whens``: each goes into the filter :meth:`add` would have put it in,
        had they come in the order of their times."""
        n = len(whens)
        if not n:
            return
        times = np.frombuffer(whens, dtype=np.float64)
        order = np.argsort(times, kind="stable")
        keys = np.frombuffer(digests, dtype=np.uint8).reshape(n, 16)[order]
        starts = (times - np.mod(times, self.WINDOW_S))[order]
        with self._lock:
            i = 0
            while i < n:
                start = float(starts[i])
                end = int(np.searchsorted(starts, start, side="right"))
                while i < end:  # the period's keys, as many as each filter has room for
                    room = self._room(start)
                    upto = min(end, i + room.capacity - room.count)
                    room.add_many(keys[i:upto])
                    i = upto

    def __contains__(self, digest: bytes) -> bool:
        return any(digest in f for _, f in reversed(self._filters))

    def forget_before(self, cutoff: float) -> None:
        """A prune deleted every row created before ``cutoff``: drop what only they needed."""
        limit = cutoff - self.WINDOW_S - self.SLACK_S
        with self._lock:
            old = self._filters
            # The newest filter always stays: new keys go into it.
            self._filters = [(t, f) for t, f in old[:-1] if t >= limit] + old[-1:]

    def __len__(self) -> int:
        return sum(f.count for _, f in self._filters)


class IdempotencyStore:
    """Stored answers by (caller, client request id)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        migrate(engine, "idempotency", MIGRATIONS)
        self._inflight: dict[tuple[str, str], asyncio.Future[bytes]] = {}
        self.inline = is_sqlite(engine)
        self._reader: Any = None  # the event loop's own SQLite connection (``inline``)
        self.seen = SeenKeys()
        self._load_seen()

    def _load_seen(self) -> None:
        """Every key the table holds goes into :attr:`seen` (start-up; O(rows of a day))."""
        began = time.perf_counter()
        digests = bytearray()
        whens = array.array("d")
        digest = SeenKeys.digest
        with self.engine.connect() as conn:
            result = conn.execution_options(stream_results=True, yield_per=10_000).execute(KEY_ROWS)
            for caller, rid, created_at in result:
                digests += digest(caller, rid)
                whens.append(created_at)
        self.seen.add_many(bytes(digests), whens)
        n = len(whens)
        if n:
            log.info(
                "idempotency.keys_loaded", keys=n, ms=round((time.perf_counter() - began) * 1000)
            )

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

    def prune(self, now: dt.datetime | None = None, *, batch: int = PRUNE_BATCH) -> int:
        """Delete records past the retention period, oldest first, ``batch`` (about) per
        transaction so that no transaction holds the write lock for long; return how many.
        Run once a minute it finds the minute's worth that expired; a backlog (after a pause)
        comes out a batch at a time."""
        cutoff = ((now or dt.datetime.now(dt.UTC)) - RETENTION).timestamp()
        created = idempotency.c.created_at
        removed = 0
        while True:
            with write_transaction(self.engine) as conn:
                # The batch's last time, found on the index (None: fewer rows than a batch
                # are left); records with the same time go with it.
                bound = conn.execute(
                    sa.select(created)
                    .where(created < cutoff)
                    .order_by(created)
                    .offset(batch - 1)
                    .limit(1)
                ).scalar()
                upto = created < cutoff if bound is None else created <= bound
                removed += int(conn.execute(idempotency.delete().where(upto)).rowcount)
            if bound is None:
                break
        self.seen.forget_before(cutoff)
        return removed

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
        seen = SeenKeys.digest(caller, client_request_id)
        if seen not in self.seen:
            stored = None  # no answer of this key can be in the table: no read
        elif self.inline:
            stored = self._get(caller, client_request_id, rpc, fingerprint)
        else:
            stored = await asyncio.to_thread(self._get, caller, client_request_id, rpc, fingerprint)
        if stored is not None:
            return stored, True
        # From here its answer may be stored: the key goes in first (a computation that
        # fails leaves a false positive, which costs one read later, never a wrong answer).
        self.seen.add(seen)
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
